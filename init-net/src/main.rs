//! `remora-init`: parse the flags, then write (or print, or remove) the rules.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{error::ErrorKind, CommandFactory, Parser};
use remora_init::InitConfig;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Bad flags exit 2 with clap's message naming the flag, before anything is touched.
    let config = InitConfig::parse();
    if let Err(err) = config.validate() {
        InitConfig::command()
            .error(ErrorKind::ArgumentConflict, err)
            .exit();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("REMORA_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    if config.proxy_uid == 0 || config.proxy_gid() == 0 {
        tracing::warn!(
            "the proxy uid or gid is 0: every process running as root bypasses the proxy"
        );
    }
    match remora_init::iptables::run(&config, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("remora-init: error: {err}");
            ExitCode::FAILURE
        }
    }
}
