//! The `remora-init` flag parsers (`init-net/src/config.rs`): the clap type from an arbitrary
//! argv, and each value parser from an arbitrary string.
//!
//! Input: lines. The first line picks the check by its first byte; for argv, each further line
//! is one argument; for a value parser, the rest is the value. Checked: no panic; whatever
//! parses renders back to text (flags for `InitConfig::to_args`, the value's own form for the
//! others) that parses to the same value, and renders the same again.
#![no_main]

use std::fmt::Display;
use std::str::FromStr;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use remora_init::config::{parse_id, parse_port_flag};
use remora_init::{CidrList, CidrSelection, InitConfig, PortList, PortRange, PortSelection};

fn round_trip<T>(value: &str)
where
    T: FromStr + Display + PartialEq + std::fmt::Debug,
    T::Err: Display,
{
    let Ok(parsed) = value.parse::<T>() else {
        return;
    };
    let text = parsed.to_string();
    match text.parse::<T>() {
        Ok(again) => {
            assert_eq!(again, parsed, "{value:?} rendered as {text:?}");
            assert_eq!(again.to_string(), text);
        }
        Err(error) => panic!("{value:?} parsed, but its rendering {text:?} does not: {error}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (choice, rest) = text.split_once('\n').unwrap_or((text, ""));
    match choice.bytes().next().unwrap_or(0) % 8 {
        0 => {
            let argv = std::iter::once("remora-init").chain(rest.split('\n'));
            let Ok(config) = InitConfig::try_parse_from(argv) else {
                return;
            };
            let _ = config.validate();
            let args = config.to_args();
            let argv = std::iter::once("remora-init".to_string()).chain(args.iter().cloned());
            match InitConfig::try_parse_from(argv) {
                Ok(again) => {
                    assert_eq!(again, config, "rendered as {args:?}");
                    assert_eq!(again.to_args(), args);
                }
                Err(error) => panic!("rendered as {args:?}, which does not parse: {error}"),
            }
        }
        1 => {
            if let Ok(id) = parse_id(rest) {
                assert_eq!(parse_id(&id.to_string()).ok(), Some(id));
            }
        }
        2 => {
            if let Ok(port) = parse_port_flag(rest) {
                assert_ne!(port, 0);
                assert_eq!(parse_port_flag(&port.to_string()).ok(), Some(port));
            }
        }
        3 => round_trip::<PortRange>(rest),
        4 => round_trip::<PortList>(rest),
        5 => round_trip::<PortSelection>(rest),
        6 => round_trip::<CidrList>(rest),
        _ => {
            round_trip::<CidrSelection>(rest);
            round_trip::<remora_init::Cidr>(rest);
        }
    }
});
