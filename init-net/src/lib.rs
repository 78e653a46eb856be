//! remora-init as a library: the flags (shared with the injector, which writes them) and the rules;
//! also the proxy's flag values the injector writes and the proxy reads: its `--control` address,
//! its `--inbound-rate-limit` and its mTLS flags.

#![forbid(unsafe_code)]

pub mod config;
pub mod control_addr;
pub mod iptables;
pub mod mtls;
pub mod rate_limit;
pub mod rules;

pub use config::{
    quoted, Backend, Cidr, CidrList, CidrSelection, ConfigError, InitConfig, Ipv6Mode, List,
    ParseError, PortList, PortRange, PortSelection, Selection,
};
