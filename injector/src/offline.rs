//! `remora-injector inject`: manifests in, injected manifests out. (Interface stub.)

use std::path::PathBuf;

use crate::config::ConfigArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The manifest file to read, or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: PathBuf,

    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {}

/// Reads the input, injects every pod template, writes YAML to standard output.
pub fn run(_args: &InjectArgs) -> Result<(), OfflineError> {
    Ok(())
}
