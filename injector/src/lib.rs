//! remora-injector as a library: the pure injection core and the faces (webhook, offline) on it.

#![forbid(unsafe_code)]

pub mod annotations;
pub mod certs;
pub mod config;
pub mod inject;
pub mod metrics;
pub mod offline;
pub mod probes;
pub mod review;
pub mod server;
pub mod tls;
pub mod trust;
pub mod trust_reload;
pub mod values;
pub mod yaml;
