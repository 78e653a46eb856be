//! Injector defaults (images, resources, proxy uid, log level, opaque ports, control plane) from flags, environment and a config file.
//!
//! Precedence, per setting: command-line flag > `REMORA_*` environment variable > `--config` YAML
//! file > built-in default. Every value is validated once here, with the same parsers the
//! per-pod annotations use, so a bad default fails at startup rather than on the first pod.

use std::path::{Path, PathBuf};

pub use remora_init::control_addr::ControlAddr;
use remora_init::PortList;
use serde::Deserialize;

use crate::trust::{TrustAnchors, TrustAnchorsError};
use crate::values::{self, LogLevel, Quantity, Resources};

/// The injector's own version: the default image tags and the `remora.io/status` annotation use it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The proxy's default opaque ports: one list shared with remora-proxy's own default.
pub use remora_init::config::DEFAULT_OPAQUE_PORTS;

/// The proxy's default log level.
pub const DEFAULT_LOG_LEVEL: LogLevel = LogLevel::Info;

/// Where remora-control is in the standard install (SPEC "Fixed numbers").
pub const DEFAULT_CONTROL_ADDR: &str = "remora-control.remora-system.svc:8090";

/// The SPIFFE trust domain of workload identities, as remora-control's own `--trust-domain`.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The flags shared by `serve` and `inject` that set the injector's defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// YAML file with defaults (keys as the flags below, e.g. `proxy-image: …`); flags and
    /// environment variables override it.
    #[arg(long = "config", env = "REMORA_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// Image of the remora-proxy sidecar [default: ghcr.io/remora-mesh/remora-proxy:<version>].
    #[arg(long, env = "REMORA_PROXY_IMAGE", value_name = "IMAGE")]
    pub proxy_image: Option<String>,

    /// Image of the remora-init container [default: ghcr.io/remora-mesh/remora-init:<version>].
    #[arg(long, env = "REMORA_INIT_IMAGE", value_name = "IMAGE")]
    pub init_image: Option<String>,

    /// CPU request of remora-proxy [default: 100m].
    #[arg(long, env = "REMORA_PROXY_CPU_REQUEST", value_name = "QUANTITY")]
    pub proxy_cpu_request: Option<String>,

    /// CPU limit of remora-proxy [default: 1].
    #[arg(long, env = "REMORA_PROXY_CPU_LIMIT", value_name = "QUANTITY")]
    pub proxy_cpu_limit: Option<String>,

    /// Memory request of remora-proxy [default: 64Mi].
    #[arg(long, env = "REMORA_PROXY_MEMORY_REQUEST", value_name = "QUANTITY")]
    pub proxy_memory_request: Option<String>,

    /// Memory limit of remora-proxy [default: 256Mi].
    #[arg(long, env = "REMORA_PROXY_MEMORY_LIMIT", value_name = "QUANTITY")]
    pub proxy_memory_limit: Option<String>,

    /// CPU request of remora-init [default: 10m].
    #[arg(long, env = "REMORA_INIT_CPU_REQUEST", value_name = "QUANTITY")]
    pub init_cpu_request: Option<String>,

    /// CPU limit of remora-init [default: 100m].
    #[arg(long, env = "REMORA_INIT_CPU_LIMIT", value_name = "QUANTITY")]
    pub init_cpu_limit: Option<String>,

    /// Memory request of remora-init [default: 16Mi].
    #[arg(long, env = "REMORA_INIT_MEMORY_REQUEST", value_name = "QUANTITY")]
    pub init_memory_request: Option<String>,

    /// Memory limit of remora-init [default: 64Mi].
    #[arg(long, env = "REMORA_INIT_MEMORY_LIMIT", value_name = "QUANTITY")]
    pub init_memory_limit: Option<String>,

    /// The uid (and gid) remora-proxy runs as; its traffic is never redirected [default: 1337].
    #[arg(long, env = "REMORA_PROXY_UID", value_name = "UID")]
    pub proxy_uid: Option<String>,

    /// remora-proxy's log level: error, warn, info, debug or trace [default: info].
    #[arg(long, env = "REMORA_PROXY_LOG_LEVEL", value_name = "LEVEL")]
    pub proxy_log_level: Option<String>,

    /// Ports remora-proxy forwards as plain TCP without protocol detection
    /// [default: 21,25,110,143,587,3306,4222 — server-first protocols].
    #[arg(long, env = "REMORA_OPAQUE_PORTS", value_name = "LIST")]
    pub opaque_ports: Option<String>,

    /// Where injected proxies reach remora-control (their --control): host:port, the host a DNS
    /// name or an IP address, IPv6 in brackets. Empty: proxies get no --control and forward to
    /// original destinations only [default: remora-control.remora-system.svc:8090].
    #[arg(long, env = "REMORA_CONTROL_ADDR", value_name = "HOST:PORT")]
    pub control_addr: Option<String>,

    /// PEM file of the CA certificates that verify remora-control; injected proxies get them
    /// in their REMORA_TRUST_ANCHORS variable. Checked at startup (at least one certificate, no
    /// private key); `serve` re-reads it when it changes. Empty: none [default: none].
    // Not REMORA_TRUST_ANCHORS: that is the proxy's variable, and holds the PEM itself.
    // An OsString, not a PathBuf, so that an empty value (none) parses.
    #[arg(long, env = "REMORA_TRUST_ANCHORS_FILE", value_name = "FILE")]
    pub trust_anchors: Option<std::ffi::OsString>,

    /// The SPIFFE trust domain of the identities written to remora.io/status
    /// (spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>); must be remora-control's
    /// --trust-domain [default: cluster.local].
    #[arg(long, env = "REMORA_TRUST_DOMAIN", value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
}

/// The same settings as the flags, read from the `--config` YAML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ConfigFile {
    proxy_image: Option<String>,
    init_image: Option<String>,
    proxy_cpu_request: Option<ScalarString>,
    proxy_cpu_limit: Option<ScalarString>,
    proxy_memory_request: Option<ScalarString>,
    proxy_memory_limit: Option<ScalarString>,
    init_cpu_request: Option<ScalarString>,
    init_cpu_limit: Option<ScalarString>,
    init_memory_request: Option<ScalarString>,
    init_memory_limit: Option<ScalarString>,
    proxy_uid: Option<ScalarString>,
    proxy_log_level: Option<String>,
    opaque_ports: Option<ScalarString>,
    control_addr: Option<String>,
    trust_anchors: Option<PathBuf>,
    trust_domain: Option<String>,
}

/// A YAML scalar taken as its text, so `proxy-uid: 1337` and `proxy-cpu-limit: 1` work unquoted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ScalarString {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl ScalarString {
    fn into_string(self) -> String {
        match self {
            Self::Text(text) => text,
            Self::Integer(number) => number.to_string(),
            Self::Float(number) => number.to_string(),
        }
    }
}

/// The resolved defaults the injection core reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub proxy_image: String,
    pub init_image: String,
    pub proxy_resources: Resources,
    pub init_resources: Resources,
    pub proxy_uid: u32,
    pub proxy_log_level: LogLevel,
    pub opaque_ports: PortList,
    /// The proxy's `--control`; `None` leaves the flag out.
    pub control_addr: Option<ControlAddr>,
    /// The proxy's `REMORA_TRUST_ANCHORS`; `None` leaves the variable out.
    pub trust_anchors: Option<TrustAnchors>,
    /// Of the identity in `remora.io/status`.
    pub trust_domain: String,
}

impl Default for Config {
    fn default() -> Self {
        // The built-in values are constants known to parse; tests below check each of them.
        let quantity = |text: &str| Quantity::parse(text).unwrap_or_else(|_| Quantity::zero());
        Self {
            proxy_image: format!("ghcr.io/remora-mesh/remora-proxy:{VERSION}"),
            init_image: format!("ghcr.io/remora-mesh/remora-init:{VERSION}"),
            proxy_resources: Resources {
                cpu_request: quantity("100m"),
                cpu_limit: quantity("1"),
                memory_request: quantity("64Mi"),
                memory_limit: quantity("256Mi"),
            },
            init_resources: Resources {
                cpu_request: quantity("10m"),
                cpu_limit: quantity("100m"),
                memory_request: quantity("16Mi"),
                memory_limit: quantity("64Mi"),
            },
            proxy_uid: remora_init::config::DEFAULT_PROXY_UID,
            proxy_log_level: DEFAULT_LOG_LEVEL,
            opaque_ports: DEFAULT_OPAQUE_PORTS.parse().unwrap_or_default(),
            control_addr: DEFAULT_CONTROL_ADDR.parse().ok(),
            trust_anchors: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML for the injector (keys are the flag names, e.g. proxy-image): {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error(
        "injector setting {setting} (flag --{setting}, variable {}, or key {setting} of the \
         config file): {message}",
        env_variable(setting)
    )]
    Invalid {
        setting: &'static str,
        message: String,
    },
    #[error(transparent)]
    TrustAnchors(#[from] TrustAnchorsError),
}

/// The environment variable of a setting: `proxy-cpu-limit` is `REMORA_PROXY_CPU_LIMIT`.
fn env_variable(setting: &str) -> String {
    format!("REMORA_{}", setting.to_ascii_uppercase().replace('-', "_"))
}

impl ConfigArgs {
    /// Resolves every setting (flag > environment > file > built-in) and validates it, the
    /// trust anchors file included.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let (mut config, trust_anchors) = self.resolve()?;
        if let Some(path) = trust_anchors {
            config.trust_anchors = Some(TrustAnchors::read(&path)?);
        }
        Ok(config)
    }

    /// Resolves and validates every setting but the trust anchors, whose file is only named:
    /// `serve --manage-certs` writes that file itself before reading it.
    pub fn resolve(&self) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let file = match &self.config_file {
            Some(path) => read_config_file(path)?,
            None => ConfigFile::default(),
        };
        let defaults = Config::default();
        let text = |flag: &Option<String>, from_file: Option<ScalarString>| {
            flag.clone().or(from_file.map(ScalarString::into_string))
        };

        let image = |setting: &'static str, value: Option<String>, default: String| {
            match value {
            None => Ok(default),
            Some(image) if image.trim().is_empty() => Err(ConfigError::Invalid {
                setting,
                message: "the image must not be empty (expected e.g. ghcr.io/remora-mesh/remora-proxy:0.1.0)".into(),
            }),
            Some(image) => Ok(image.trim().to_string()),
        }
        };
        let quantity = |setting: &'static str, value: Option<String>, default: &Quantity| {
            value.map_or(Ok(default.clone()), |text| {
                Quantity::parse(&text).map_err(|err| ConfigError::Invalid {
                    setting,
                    message: err.to_string(),
                })
            })
        };

        let proxy_resources = Resources {
            cpu_request: quantity(
                "proxy-cpu-request",
                text(&self.proxy_cpu_request, file.proxy_cpu_request),
                &defaults.proxy_resources.cpu_request,
            )?,
            cpu_limit: quantity(
                "proxy-cpu-limit",
                text(&self.proxy_cpu_limit, file.proxy_cpu_limit),
                &defaults.proxy_resources.cpu_limit,
            )?,
            memory_request: quantity(
                "proxy-memory-request",
                text(&self.proxy_memory_request, file.proxy_memory_request),
                &defaults.proxy_resources.memory_request,
            )?,
            memory_limit: quantity(
                "proxy-memory-limit",
                text(&self.proxy_memory_limit, file.proxy_memory_limit),
                &defaults.proxy_resources.memory_limit,
            )?,
        };
        let init_resources = Resources {
            cpu_request: quantity(
                "init-cpu-request",
                text(&self.init_cpu_request, file.init_cpu_request),
                &defaults.init_resources.cpu_request,
            )?,
            cpu_limit: quantity(
                "init-cpu-limit",
                text(&self.init_cpu_limit, file.init_cpu_limit),
                &defaults.init_resources.cpu_limit,
            )?,
            memory_request: quantity(
                "init-memory-request",
                text(&self.init_memory_request, file.init_memory_request),
                &defaults.init_resources.memory_request,
            )?,
            memory_limit: quantity(
                "init-memory-limit",
                text(&self.init_memory_limit, file.init_memory_limit),
                &defaults.init_resources.memory_limit,
            )?,
        };
        check_requests_within_limits(
            ("proxy-cpu-request", "proxy-memory-request"),
            &proxy_resources,
        )?;
        check_requests_within_limits(("init-cpu-request", "init-memory-request"), &init_resources)?;

        let proxy_uid = match text(&self.proxy_uid, file.proxy_uid) {
            None => defaults.proxy_uid,
            Some(value) => {
                values::parse_proxy_uid(&value).map_err(|message| ConfigError::Invalid {
                    setting: "proxy-uid",
                    message,
                })?
            }
        };
        let proxy_log_level = match self.proxy_log_level.clone().or(file.proxy_log_level) {
            None => defaults.proxy_log_level,
            Some(value) => value.parse().map_err(|message| ConfigError::Invalid {
                setting: "proxy-log-level",
                message,
            })?,
        };
        let opaque_ports = match text(&self.opaque_ports, file.opaque_ports) {
            None => defaults.opaque_ports,
            Some(value) => {
                value
                    .parse()
                    .map_err(|err: remora_init::ParseError| ConfigError::Invalid {
                        setting: "opaque-ports",
                        message: err.to_string(),
                    })?
            }
        };

        let control_addr = match self.control_addr.clone().or(file.control_addr) {
            None => defaults.control_addr,
            Some(value) => {
                ControlAddr::parse_optional(&value).map_err(|message| ConfigError::Invalid {
                    setting: "control-addr",
                    message,
                })?
            }
        };
        let trust_anchors = self
            .trust_anchors
            .clone()
            .map(PathBuf::from)
            .or(file.trust_anchors)
            .filter(|path| !path.as_os_str().is_empty());
        let trust_domain = match self.trust_domain.clone().or(file.trust_domain) {
            None => defaults.trust_domain,
            Some(value) => parse_trust_domain(&value).map_err(|message| ConfigError::Invalid {
                setting: "trust-domain",
                message,
            })?,
        };

        let config = Config {
            proxy_image: image(
                "proxy-image",
                self.proxy_image.clone().or(file.proxy_image),
                defaults.proxy_image,
            )?,
            init_image: image(
                "init-image",
                self.init_image.clone().or(file.init_image),
                defaults.init_image,
            )?,
            proxy_resources,
            init_resources,
            proxy_uid,
            proxy_log_level,
            opaque_ports,
            control_addr,
            trust_anchors: None,
            trust_domain,
        };
        Ok((config, trust_anchors))
    }
}

/// A SPIFFE trust domain name: lowercase letters, digits, `.`, `-` and `_` (the SPIFFE ID
/// standard), at most 255 bytes.
pub fn parse_trust_domain(value: &str) -> Result<String, String> {
    let domain = value.trim();
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
    if domain.is_empty() || domain.len() > 255 || !domain.bytes().all(allowed) {
        return Err(format!(
            "{} is not a trust domain (expected lowercase letters, digits, '.', '-' and '_', \
             e.g. cluster.local)",
            remora_init::quoted(value)
        ));
    }
    Ok(domain.to_string())
}

fn read_config_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // An empty file (or one holding only comments) is a file with no settings.
    if text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---"
    }) {
        return Ok(ConfigFile::default());
    }
    serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Kubernetes refuses a container whose request is above its limit: refuse such defaults at
/// startup, naming the request setting.
fn check_requests_within_limits(
    (cpu_setting, memory_setting): (&'static str, &'static str),
    resources: &Resources,
) -> Result<(), ConfigError> {
    if resources.cpu_request > resources.cpu_limit {
        return Err(ConfigError::Invalid {
            setting: cpu_setting,
            message: format!(
                "the request {} is greater than the limit {} (expected a request at most the limit)",
                resources.cpu_request, resources.cpu_limit
            ),
        });
    }
    if resources.memory_request > resources.memory_limit {
        return Err(ConfigError::Invalid {
            setting: memory_setting,
            message: format!(
                "the request {} is greater than the limit {} (expected a request at most the limit)",
                resources.memory_request, resources.memory_limit
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        config: ConfigArgs,
    }

    /// Parses flags only: the `REMORA_*` variables are not set in unit tests (the environment
    /// precedence is tested through the binary, tests/inject_cli.rs, so it cannot leak in here).
    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .expect("flags parse")
            .config
            .load()
    }

    #[test]
    fn messages_name_each_settings_real_variable() {
        use clap::Args;
        let command = ConfigArgs::augment_args(clap::Command::new("remora-injector"));
        for arg in command.get_arguments() {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                continue;
            };
            // The trust anchors' errors name their file, not the variable; and the proxy's
            // REMORA_TRUST_ANCHORS holds the PEM itself, so the injector's path is another name.
            if long == "trust-anchors" {
                assert_eq!(env.to_string_lossy(), "REMORA_TRUST_ANCHORS_FILE");
            } else if long != "config" {
                assert_eq!(env_variable(long), env.to_string_lossy(), "--{long}");
            }
        }
    }

    #[test]
    fn built_in_defaults() {
        let config = load(&[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(
            config.proxy_image,
            format!("ghcr.io/remora-mesh/remora-proxy:{VERSION}")
        );
        assert_eq!(
            config.init_image,
            format!("ghcr.io/remora-mesh/remora-init:{VERSION}")
        );
        assert_eq!(config.proxy_uid, 1337);
        assert_eq!(config.proxy_log_level, LogLevel::Info);
        assert_eq!(config.opaque_ports.to_string(), DEFAULT_OPAQUE_PORTS);
        assert_eq!(config.proxy_resources.cpu_request.to_string(), "100m");
        assert_eq!(config.proxy_resources.cpu_limit.to_string(), "1");
        assert_eq!(config.proxy_resources.memory_request.to_string(), "64Mi");
        assert_eq!(config.proxy_resources.memory_limit.to_string(), "256Mi");
        assert_eq!(config.init_resources.cpu_request.to_string(), "10m");
        assert_eq!(config.init_resources.memory_limit.to_string(), "64Mi");
        assert_eq!(config.trust_domain, "cluster.local");
    }

    #[test]
    fn trust_domain_from_flag_and_file() {
        let file = config_file("trust-domain: prod.example\n");
        let path = file.path().to_str().unwrap();
        assert_eq!(
            load(&["--config", path]).unwrap().trust_domain,
            "prod.example"
        );
        let config = load(&["--config", path, "--trust-domain", "mesh_1.example"]).unwrap();
        assert_eq!(config.trust_domain, "mesh_1.example");
        for bad in [
            "",
            "Cluster.Local",
            "cluster.local/ns",
            "spiffe://cluster.local",
        ] {
            let err = load(&["--trust-domain", bad]).expect_err(bad).to_string();
            assert!(
                err.contains("--trust-domain")
                    && err.contains("REMORA_TRUST_DOMAIN")
                    && err.contains(&format!("{bad:?}"))
                    && err.contains("e.g. cluster.local"),
                "{bad:?}: {err}"
            );
        }
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_built_ins() {
        let file = config_file(
            "proxy-image: registry.example/proxy:file\n\
             init-image: registry.example/init:file\n\
             proxy-uid: 2102\n\
             proxy-cpu-limit: 2\n\
             proxy-log-level: debug\n\
             opaque-ports: 3306\n",
        );
        let path = file.path().to_str().unwrap();
        let config = load(&[
            "--config",
            path,
            "--proxy-image",
            "registry.example/proxy:flag",
        ])
        .unwrap();
        assert_eq!(config.proxy_image, "registry.example/proxy:flag");
        assert_eq!(config.init_image, "registry.example/init:file");
        assert_eq!(config.proxy_uid, 2102);
        assert_eq!(config.proxy_resources.cpu_limit.to_string(), "2");
        assert_eq!(config.proxy_log_level, LogLevel::Debug);
        assert_eq!(config.opaque_ports.to_string(), "3306");
        assert_eq!(
            config.proxy_resources.memory_limit,
            Config::default().proxy_resources.memory_limit
        );
    }

    #[test]
    fn empty_config_file_means_built_ins() {
        let file = config_file("# nothing here\n");
        let config = load(&["--config", file.path().to_str().unwrap()]).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn errors_name_the_setting_and_the_accepted_form() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "bad quantity",
                &["--proxy-cpu-limit", "lots"],
                &["proxy-cpu-limit", "lots", "quantity"],
            ),
            (
                "request above limit",
                &["--proxy-memory-request", "1Gi"],
                &["proxy-memory-request", "1Gi", "256Mi"],
            ),
            (
                "root uid",
                &["--proxy-uid", "0"],
                &["proxy-uid", "\"0\"", "1 to 2147483647"],
            ),
            (
                "bad log level",
                &["--proxy-log-level", "loud"],
                &[
                    "proxy-log-level",
                    "loud",
                    "error, warn, info, debug or trace",
                ],
            ),
            (
                "bad opaque port",
                &["--opaque-ports", "3306,99999"],
                &["opaque-ports", "99999"],
            ),
            (
                "empty image",
                &["--proxy-image", " "],
                &["proxy-image", "empty"],
            ),
        ];
        for (name, args, needles) in cases {
            let err = load(args).expect_err(name).to_string();
            for needle in *needles {
                assert!(
                    err.contains(needle),
                    "case {name}: {err:?} lacks {needle:?}"
                );
            }
        }
    }

    #[test]
    fn control_addr_and_trust_anchors_from_flags_and_file() {
        assert_eq!(
            load(&[]).unwrap().control_addr.map(|a| a.to_string()),
            Some(DEFAULT_CONTROL_ADDR.to_string())
        );
        assert_eq!(load(&["--control-addr", ""]).unwrap().control_addr, None);
        let err = load(&["--control-addr", "remora-control"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--control-addr") && err.contains("REMORA_CONTROL_ADDR"),
            "{err}"
        );

        let anchors = crate::trust::tests::anchors(1);
        let pem = config_file(anchors.pem());
        let file = config_file(&format!(
            "control-addr: \"[fd00::20]:8090\"\ntrust-anchors: {}\n",
            pem.path().display()
        ));
        let config = load(&["--config", file.path().to_str().unwrap()]).unwrap();
        assert_eq!(config.control_addr.unwrap().to_string(), "[fd00::20]:8090");
        assert_eq!(config.trust_anchors, Some(anchors));
        // A flag empties what the file set.
        let config = load(&[
            "--config",
            file.path().to_str().unwrap(),
            "--control-addr=",
            "--trust-anchors=",
        ])
        .unwrap();
        assert_eq!((config.control_addr, config.trust_anchors), (None, None));

        let err = load(&["--trust-anchors", "/nonexistent/ca.crt"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.crt"), "{err}");
        // `serve --manage-certs` writes the file after resolving: only its name is taken then.
        let (config, path) = Cli::try_parse_from(["t", "--trust-anchors", "/later/ca.crt"])
            .unwrap()
            .config
            .resolve()
            .unwrap();
        assert_eq!(
            (config.trust_anchors, path),
            (None, Some(PathBuf::from("/later/ca.crt")))
        );
    }

    #[test]
    fn config_file_errors() {
        let err = load(&["--config", "/nonexistent/remora.yaml"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/remora.yaml"), "{err}");

        let file = config_file("proxy-imag: typo\n");
        let err = load(&["--config", file.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy-imag"), "{err}");
    }
}
