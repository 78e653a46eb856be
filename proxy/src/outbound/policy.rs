//! A Service's resilience policy (SPEC "Resilience: Service annotations") as the proxy applies
//! it: compiled once per snapshot from the control plane's `Policy`. A snapshot without one
//! (a control plane that does not send it yet) gets the SPEC's defaults, written once here.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use remora_api::discovery as api;

use crate::metrics::RetryReason;

/// How clients treat one Service's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The whole request, retries included (504); `None` = none. A route rule's request
    /// timeout wins over it.
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// Consecutive gateway errors or connect failures that eject an endpoint; 0 = off.
    pub failure_accrual_consecutive: u32,
    /// The most endpoints ejected at once, in percent (rounded down).
    pub max_ejection_percent: u32,
    pub queue_size: u32,
    pub queue_timeout: Duration,
}

/// When and how often a request goes again, besides the always-safe cases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_reset: bool,
    pub status_codes: Vec<u16>,
    pub grpc_codes: Vec<u32>,
    /// Retries after the first try.
    pub attempts: u32,
    /// POST and PATCH (any method not idempotent) may be retried too.
    pub non_idempotent: bool,
    pub budget_percent: u32,
    pub budget_floor_per_second: u32,
}

/// The SPEC table's defaults, as remora-control sends them for a Service without annotations
/// (`api::Policy::spec_defaults`); for a snapshot that has no policy.
pub fn defaults() -> Policy {
    Policy::from_api(&api::Policy::spec_defaults())
}

impl Default for Policy {
    fn default() -> Self {
        defaults()
    }
}

impl Policy {
    /// The snapshot's policy; the defaults when it has none (or none for retries).
    pub fn of(policy: Option<&api::Policy>) -> Policy {
        match policy {
            Some(policy) => Policy::from_api(policy),
            None => defaults(),
        }
    }

    fn from_api(policy: &api::Policy) -> Policy {
        let retry = match &policy.retry {
            Some(retry) => RetryPolicy {
                on_5xx: retry.on_5xx,
                on_gateway_error: retry.on_gateway_error,
                on_reset: retry.on_reset,
                status_codes: retry
                    .status_codes
                    .iter()
                    .filter_map(|code| u16::try_from(*code).ok())
                    .collect(),
                grpc_codes: retry.grpc_codes.clone(),
                attempts: retry.attempts,
                non_idempotent: retry.non_idempotent,
                budget_percent: retry.budget_percent,
                budget_floor_per_second: retry.budget_floor_per_second,
            },
            // spec_defaults has a retry policy: no recursion.
            None => defaults().retry,
        };
        Policy {
            timeout: (policy.timeout_ms > 0).then(|| Duration::from_millis(policy.timeout_ms)),
            retry,
            failure_accrual_consecutive: policy.failure_accrual_consecutive,
            max_ejection_percent: policy.max_ejection_percent.min(100),
            queue_size: policy.queue_size,
            queue_timeout: Duration::from_millis(policy.queue_timeout_ms),
        }
    }

    /// Whether a request needs more than the plain path: a deadline, or a `retry-on` (its body
    /// is then kept to be sent again). Otherwise a request costs nothing more than without
    /// a policy.
    pub fn guards(&self) -> bool {
        self.timeout.is_some() || self.retry.retries()
    }
}

impl RetryPolicy {
    /// Whether any `retry-on` kind is set.
    pub fn retries(&self) -> bool {
        self.attempts > 0
            && (self.on_5xx
                || self.on_gateway_error
                || self.on_reset
                || !self.status_codes.is_empty()
                || !self.grpc_codes.is_empty())
    }

    /// Whether a request with `method` may be retried on `retry-on`.
    pub fn allows(&self, method: &Method) -> bool {
        self.non_idempotent || method.is_idempotent()
    }

    /// Why an answer is retried, if it is: its status, or a `grpc-status` in its headers (a
    /// trailers-only gRPC answer carries it there).
    pub fn answer(&self, status: StatusCode, headers: &HeaderMap) -> Option<RetryReason> {
        let code = status.as_u16();
        if self.status_codes.contains(&code) {
            return Some(RetryReason::Status);
        }
        if self.on_gateway_error && matches!(code, 502..=504) {
            return Some(RetryReason::GatewayError);
        }
        if self.on_5xx && status.is_server_error() {
            return Some(RetryReason::Status5xx);
        }
        if !self.grpc_codes.is_empty() {
            let grpc = headers
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u32>().ok());
            if grpc.is_some_and(|grpc| self.grpc_codes.contains(&grpc)) {
                return Some(RetryReason::Grpc);
            }
        }
        None
    }

    /// Why a failure after the request left (the connection or stream reset) is retried.
    pub fn reset(&self) -> Option<RetryReason> {
        (self.on_reset || self.on_5xx).then_some(RetryReason::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_policy_is_the_spec_defaults() {
        let policy = Policy::of(None);
        assert_eq!(policy, defaults());
        assert_eq!(policy.timeout, None);
        assert_eq!(policy.retry.attempts, 2);
        assert!(!policy.retry.non_idempotent);
        assert_eq!(
            (
                policy.retry.budget_percent,
                policy.retry.budget_floor_per_second
            ),
            (20, 10)
        );
        assert_eq!(policy.failure_accrual_consecutive, 5);
        assert_eq!(policy.max_ejection_percent, 50);
        assert_eq!(
            (policy.queue_size, policy.queue_timeout),
            (100, Duration::from_secs(3))
        );
        assert!(!policy.guards(), "the defaults cost a request nothing");
    }

    #[test]
    fn a_policy_from_the_control_plane_is_taken_as_sent() {
        let sent = api::Policy {
            timeout_ms: 1500,
            retry: Some(api::RetryPolicy {
                on_gateway_error: true,
                status_codes: vec![429, 70000],
                grpc_codes: vec![14],
                attempts: 3,
                non_idempotent: true,
                budget_percent: 50,
                budget_floor_per_second: 1,
                ..Default::default()
            }),
            failure_accrual_consecutive: 0,
            max_ejection_percent: 30,
            queue_size: 10,
            queue_timeout_ms: 250,
        };
        let policy = Policy::of(Some(&sent));
        assert_eq!(policy.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(policy.retry.status_codes, [429]);
        assert!(policy.guards());
        assert!(policy.retry.allows(&Method::POST));
        assert_eq!(policy.failure_accrual_consecutive, 0);
        assert_eq!(policy.queue_timeout, Duration::from_millis(250));
    }

    #[test]
    fn answers_are_retried_by_kind() {
        let headers = HeaderMap::new();
        let mut grpc_unavailable = HeaderMap::new();
        grpc_unavailable.insert("grpc-status", "14".parse().unwrap());
        let policy = |edit: fn(&mut RetryPolicy)| {
            let mut retry = defaults().retry;
            edit(&mut retry);
            retry
        };
        let five = policy(|r| r.on_5xx = true);
        let gateway = policy(|r| r.on_gateway_error = true);
        let listed = policy(|r| r.status_codes = vec![409]);
        let grpc = policy(|r| r.grpc_codes = vec![14]);
        let status = |code: u16| StatusCode::from_u16(code).unwrap();
        for (name, retry, code, headers, expected) in [
            (
                "5xx: 500",
                &five,
                500,
                &headers,
                Some(RetryReason::Status5xx),
            ),
            (
                "5xx: 503",
                &five,
                503,
                &headers,
                Some(RetryReason::Status5xx),
            ),
            ("5xx: 404", &five, 404, &headers, None),
            ("gateway: 500", &gateway, 500, &headers, None),
            (
                "gateway: 502",
                &gateway,
                502,
                &headers,
                Some(RetryReason::GatewayError),
            ),
            (
                "gateway: 504",
                &gateway,
                504,
                &headers,
                Some(RetryReason::GatewayError),
            ),
            (
                "listed: 409",
                &listed,
                409,
                &headers,
                Some(RetryReason::Status),
            ),
            ("listed: 503", &listed, 503, &headers, None),
            (
                "grpc: 200 + 14",
                &grpc,
                200,
                &grpc_unavailable,
                Some(RetryReason::Grpc),
            ),
            ("grpc: 200", &grpc, 200, &headers, None),
            ("none", &defaults().retry, 503, &headers, None),
        ] {
            assert_eq!(retry.answer(status(code), headers), expected, "{name}");
        }
        assert!(!defaults().retry.allows(&Method::POST));
        assert!(!defaults().retry.allows(&Method::PATCH));
        for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(
                defaults().retry.allows(&method.parse().unwrap()),
                "{method}"
            );
        }
        assert_eq!(defaults().retry.reset(), None);
        assert_eq!(
            policy(|r| r.on_reset = true).reset(),
            Some(RetryReason::Reset)
        );
    }
}
