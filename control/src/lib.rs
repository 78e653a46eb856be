//! remora-control's core: Kubernetes objects read from files or the API, indexed for the proxies.
#![forbid(unsafe_code)]

pub mod gateway;
pub mod index;
pub mod objects;
pub mod watch;
