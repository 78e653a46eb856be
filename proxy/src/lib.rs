//! The remora sidecar proxy as a library: the binary `remora-proxy` wires these modules into
//! worker threads, and the fuzz targets and tests reach the parsers through them.
// Unsafe code only where a syscall has no safe wrapper (`sched`) and in the allocator (`alloc`).
#![deny(unsafe_code)]

pub mod admin;
pub mod alloc;
pub mod client;
pub mod config;
pub mod detect;
pub mod drain;
pub mod h2_relay;
pub mod hpack;
pub mod http;
#[cfg(test)]
mod http2_tests;
#[cfg(test)]
mod http_tests;
pub mod listen;
pub mod metrics;
pub mod opaque;
pub mod orig_dst;
pub mod proxy;
pub mod sched;
pub mod telemetry;
pub mod workers;
