//! remora-control's core: Kubernetes objects read from files or the API, indexed for the proxies.
#![forbid(unsafe_code)]

pub mod admin;
pub mod compile;
pub mod gateway;
pub mod identity;
pub mod index;
#[cfg(feature = "cluster")]
pub mod kube_source;
pub mod mesh;
pub mod metrics;
pub mod objects;
pub mod policy;
pub mod routes;
pub mod server;
pub mod watch;
