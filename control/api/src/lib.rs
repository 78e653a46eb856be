//! remora's discovery API, `remora.discovery.v1` (`control/proto/remora/discovery/v1/discovery.proto`):
//! a proxy names a target and receives whole snapshots for it; and its identity API,
//! `remora.identity.v1`: a proxy's workload certificate. Generated at build time.

#![forbid(unsafe_code)]

/// `remora.discovery.v1`.
pub mod discovery {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("remora.discovery.v1");
}

/// `remora.identity.v1`: a proxy's CSR and token in, its workload certificate out.
pub mod identity {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("remora.identity.v1");
}

impl discovery::Policy {
    /// The policy of a Service without `remora.io/` annotations: the SPEC table's defaults (no
    /// timeout, no `retry-on`, 2 attempts, idempotent methods only, a `20%,10/s` budget,
    /// `consecutive=5` failure accrual, `50%` max ejection, a `100,3s` queue). remora-control
    /// starts every Service's policy from it; a proxy applies it to a snapshot without one.
    pub fn spec_defaults() -> Self {
        Self {
            timeout_ms: 0,
            retry: Some(discovery::RetryPolicy {
                on_5xx: false,
                on_gateway_error: false,
                on_reset: false,
                status_codes: Vec::new(),
                grpc_codes: Vec::new(),
                attempts: 2,
                non_idempotent: false,
                budget_percent: 20,
                budget_floor_per_second: 10,
            }),
            failure_accrual_consecutive: 5,
            max_ejection_percent: 50,
            queue_size: 100,
            queue_timeout_ms: 3_000,
        }
    }
}
