//! `remora-init`: parse the flags, then write (or print, or remove) the rules.

#![forbid(unsafe_code)]

use clap::Parser;
use remora_init::InitConfig;

fn main() -> anyhow::Result<()> {
    let config = InitConfig::parse();
    println!("{config:?}");
    Ok(())
}
