//! The remora sidecar proxy as a library: the binary `remora-proxy` wires these modules into
//! worker threads, and the fuzz targets and tests reach the parsers through them.
//!
//! A connection goes down, never back up: [`runtime`] accepts it and places it on a worker;
//! [`serve`] serves the client's side, asking [`outbound`] or [`inbound`] for its
//! [`Destination`](outbound::Destination) (for a Service, balanced per request over endpoints
//! the control plane named through [`discover`]); [`client`] talks to each endpoint. [`proxy`]
//! holds what they share, [`metrics`] and [`telemetry`] what they report.
// Unsafe code only where a syscall has no safe wrapper (`sched`) and in the allocator (`alloc`).
#![deny(unsafe_code)]

pub mod admin;
pub mod client;
pub mod config;
pub mod discover;
#[cfg(test)]
mod http2_tests;
#[cfg(test)]
mod http_tests;
pub mod identity;
pub mod inbound;
pub mod inbound_mtls;
pub mod io;
pub mod metrics;
#[cfg(test)]
mod mtls_tests;
pub mod outbound;
#[cfg(test)]
mod policy_tests;
pub mod proxy;
pub mod rate_limit;
#[cfg(test)]
mod routes_tests;
pub mod runtime;
pub mod serve;
pub mod server_first;
pub mod telemetry;
pub mod tls;
