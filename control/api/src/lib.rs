//! remora's discovery API, `remora.discovery.v1` (`control/proto/remora/discovery/v1/discovery.proto`):
//! a proxy names a target and receives whole snapshots for it. Generated at build time.

#![forbid(unsafe_code)]

/// `remora.discovery.v1`.
pub mod discovery {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("remora.discovery.v1");
}
