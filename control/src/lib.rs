//! remora-control's core: Kubernetes objects read from files or the API, indexed for the proxies.
#![forbid(unsafe_code)]

pub mod gateway;
pub mod index;
#[cfg(feature = "cluster")]
pub mod kube_source;
pub mod objects;
pub mod watch;
