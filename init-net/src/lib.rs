//! remora-init as a library: the flags (shared with the injector, which writes them) and the rules.

#![forbid(unsafe_code)]

pub mod config;

pub use config::{
    Backend, Cidr, CidrList, CidrSelection, InitConfig, Ipv6Mode, ParseError, PortList, PortRange,
    PortSelection,
};
