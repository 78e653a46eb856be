//! Injector defaults (images, resources, proxy uid) from flags, environment and a config file.
//! (Interface stub: the injection-core work fills this in.)

/// The flags shared by `serve` and `inject` that set the injector's defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {}

/// The resolved defaults the injection core reads.
#[derive(Debug, Clone, Default)]
pub struct Config {}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Ok(Config::default())
    }
}
