//! `--log-level` and `--log-format`, as the injector and the control plane take them: tracing
//! events to standard error, one JSON object or one plain line each.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// The form of each log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Plain,
}

/// The words `--log-level` takes alone.
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Installs the global subscriber. `level` is a level or tracing directives; a lone word that is
/// not a level is refused, because it would parse as a target name and quietly log nothing.
/// `example` shows directives in the error, e.g. `remora_control=debug,info`.
pub fn init(level: &str, format: LogFormat, example: &str) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level, example)?)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
    }
    Ok(())
}

fn filter(level: &str, example: &str) -> anyhow::Result<EnvFilter> {
    let expected = || {
        format!(
            "--log-level {level:?}: expected one of {} or tracing directives such as {example}",
            LEVELS.join(", ")
        )
    };
    let is_directives = level.contains('=') || level.contains(',');
    if !is_directives && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        anyhow::bail!(expected());
    }
    EnvFilter::try_new(level).with_context(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_are_taken_and_a_lone_target_is_not() {
        for level in [
            "info",
            "DEBUG",
            "off",
            "remora_control=debug,info",
            "warn,h2=off",
        ] {
            assert!(filter(level, "x=debug").is_ok(), "{level}");
        }
        let error = filter("verbose", "remora_control=debug,info")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"verbose\"")
                && error.contains("off, error, warn, info, debug, trace")
                && error.contains("remora_control=debug,info"),
            "{error}"
        );
    }
}
