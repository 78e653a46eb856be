//! A Service's resilience policy from its `remora.io/` annotations (SPEC "Resilience: Service
//! annotations"), every default filled in so the proxy needs none of its own.
//!
//! Each annotation is parsed on its own: a bad value is reported and that annotation alone takes
//! its default; the others still apply, and the Service is always served. The accepted forms:
//! - `remora.io/timeout`: `0` (none) or a Gateway API duration, 1 to 4 groups of 1 to 5 digits
//!   each followed by `h`, `m`, `s` or `ms` (`500ms`, `3s`, `1m30s`).
//! - `remora.io/retry-on`: a comma list (spaces around items allowed, case-insensitive) of
//!   `5xx`, `gateway-error`, `reset`, `retriable-status-codes=C[,C...]` (HTTP codes 100 to 599)
//!   and `grpc=NAME[,NAME...]` (the 17 gRPC code names, `-` or `_` between words). An item
//!   without `=` that is not one of the three words continues the list opened by the last `=`
//!   item, as the SPEC writes `grpc=unavailable,…`; empty = none.
//! - `remora.io/retry-attempts`: a whole number (retries after the first try).
//! - `remora.io/retry-non-idempotent`: `true` or `false` (any case).
//! - `remora.io/retry-budget`: `P%,N/s`, whole numbers, P at most 100.
//! - `remora.io/failure-accrual`: `consecutive=N` (N at least 1) or `off` (any case).
//! - `remora.io/max-ejection`: `N%`, a whole number at most 100.
//! - `remora.io/queue`: `N,DURATION`, N a whole number, DURATION as for the timeout.
//!
//! Spaces around a value and around its comma-separated parts are ignored; a whole number is
//! digits alone (no sign, no fraction) that fits 32 bits.

use std::collections::BTreeMap;
use std::time::Duration;

use remora_api::discovery as pb;

use crate::gateway::parse_duration;

pub const TIMEOUT: &str = "remora.io/timeout";
pub const RETRY_ON: &str = "remora.io/retry-on";
pub const RETRY_ATTEMPTS: &str = "remora.io/retry-attempts";
pub const RETRY_NON_IDEMPOTENT: &str = "remora.io/retry-non-idempotent";
pub const RETRY_BUDGET: &str = "remora.io/retry-budget";
pub const FAILURE_ACCRUAL: &str = "remora.io/failure-accrual";
pub const MAX_EJECTION: &str = "remora.io/max-ejection";
pub const QUEUE: &str = "remora.io/queue";

/// Every annotation read, in the order they are parsed.
pub const KEYS: [&str; 8] = [
    TIMEOUT,
    RETRY_ON,
    RETRY_ATTEMPTS,
    RETRY_NON_IDEMPOTENT,
    RETRY_BUDGET,
    FAILURE_ACCRUAL,
    MAX_EJECTION,
    QUEUE,
];

/// The gRPC status codes by name, their number their place.
const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// An annotation whose value is not of its form: it takes its default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {value:?} is not {form}; its default applies")]
pub struct BadAnnotation {
    pub key: &'static str,
    pub value: String,
    /// The accepted form, as a user would write it.
    pub form: &'static str,
}

/// The accepted form of `key`, for messages.
pub fn form(key: &str) -> &'static str {
    match key {
        TIMEOUT => "a duration (e.g. 0 for none, 500ms, 3s, 1m30s)",
        RETRY_ON => {
            "a comma list of 5xx, gateway-error, reset, retriable-status-codes=CODE[,CODE...], \
             grpc=NAME[,NAME...] (e.g. 5xx,grpc=unavailable,deadline-exceeded)"
        }
        RETRY_ATTEMPTS => "a whole number of retries (e.g. 2)",
        RETRY_NON_IDEMPOTENT => "true or false",
        RETRY_BUDGET => "PERCENT%,N/s with PERCENT at most 100 (e.g. 20%,10/s)",
        FAILURE_ACCRUAL => "consecutive=N with N at least 1, or off (e.g. consecutive=5)",
        MAX_EJECTION => "a percentage at most 100 (e.g. 50%)",
        QUEUE => "SIZE,DURATION (e.g. 100,3s)",
        _ => "",
    }
}

/// The policy of a Service without annotations (the SPEC's defaults).
pub fn defaults() -> pb::Policy {
    pb::Policy::spec_defaults()
}

/// The policy `annotations` give, and the annotations that were bad (in [`KEYS`] order) and so
/// took their defaults.
pub fn parse(annotations: Option<&BTreeMap<String, String>>) -> (pb::Policy, Vec<BadAnnotation>) {
    let mut policy = defaults();
    let mut bad = Vec::new();
    let Some(annotations) = annotations else {
        return (policy, bad);
    };
    for key in KEYS {
        let Some(value) = annotations.get(key) else {
            continue;
        };
        if apply(&mut policy, key, value).is_none() {
            bad.push(BadAnnotation {
                key,
                value: value.clone(),
                form: form(key),
            });
        }
    }
    (policy, bad)
}

/// The `remora.io/` annotations `annotations` holds, to tell whether a Service's policy changed
/// without parsing it again.
pub fn read(annotations: Option<&BTreeMap<String, String>>) -> Vec<(&'static str, String)> {
    KEYS.iter()
        .filter_map(|key| Some((*key, annotations?.get(*key)?.clone())))
        .collect()
}

/// Sets what `value` of `key` says into `policy`; `None` (and `policy` unchanged) when `value`
/// is not of the key's form.
fn apply(policy: &mut pb::Policy, key: &str, value: &str) -> Option<()> {
    let value = value.trim();
    let retry = policy.retry.get_or_insert_with(Default::default);
    match key {
        TIMEOUT => policy.timeout_ms = duration_ms(value)?,
        RETRY_ON => {
            let parsed = retry_on(value)?;
            retry.on_5xx = parsed.on_5xx;
            retry.on_gateway_error = parsed.on_gateway_error;
            retry.on_reset = parsed.on_reset;
            retry.status_codes = parsed.status_codes;
            retry.grpc_codes = parsed.grpc_codes;
        }
        RETRY_ATTEMPTS => retry.attempts = whole(value)?,
        RETRY_NON_IDEMPOTENT => {
            retry.non_idempotent = match value.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => return None,
            }
        }
        RETRY_BUDGET => {
            let (share, floor) = value.split_once(',')?;
            let percent = percent(share.trim())?;
            let floor = whole(floor.trim().strip_suffix("/s")?)?;
            retry.budget_percent = percent;
            retry.budget_floor_per_second = floor;
        }
        FAILURE_ACCRUAL => {
            let lower = value.trim().to_ascii_lowercase();
            policy.failure_accrual_consecutive = if lower == "off" {
                0
            } else {
                let count = whole(lower.strip_prefix("consecutive=")?)?;
                // 0 would read as `off`: say `off`.
                if count == 0 {
                    return None;
                }
                count
            };
        }
        MAX_EJECTION => policy.max_ejection_percent = percent(value.trim())?,
        QUEUE => {
            let (size, timeout) = value.split_once(',')?;
            let size = whole(size.trim())?;
            let timeout = duration_ms(timeout.trim())?;
            policy.queue_size = size;
            policy.queue_timeout_ms = timeout;
        }
        _ => return None,
    }
    Some(())
}

/// A whole number written with digits alone.
fn whole(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `N%`, N at most 100.
fn percent(text: &str) -> Option<u32> {
    whole(text.strip_suffix('%')?).filter(|percent| *percent <= 100)
}

/// `0` or a Gateway API duration, in milliseconds.
fn duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "0" {
        return Some(0);
    }
    let duration: Duration = parse_duration(text).ok()?;
    u64::try_from(duration.as_millis()).ok()
}

/// The retry conditions of a `remora.io/retry-on` value.
fn retry_on(value: &str) -> Option<pb::RetryPolicy> {
    enum List {
        None,
        StatusCodes,
        Grpc,
    }
    let mut parsed = pb::RetryPolicy::default();
    let value = value.trim();
    if value.is_empty() {
        return Some(parsed);
    }
    let mut open = List::None;
    for item in value.split(',') {
        let item = item.trim().to_ascii_lowercase();
        let (list, element) = match item.split_once('=') {
            Some(("retriable-status-codes", element)) => (List::StatusCodes, element),
            Some(("grpc", element)) => (List::Grpc, element),
            Some(_) => return None,
            None => {
                match item.as_str() {
                    "5xx" => parsed.on_5xx = true,
                    "gateway-error" => parsed.on_gateway_error = true,
                    "reset" => parsed.on_reset = true,
                    _ => {
                        match open {
                            List::StatusCodes => parsed.status_codes.push(status_code(&item)?),
                            List::Grpc => parsed.grpc_codes.push(grpc_code(&item)?),
                            List::None => return None,
                        }
                        continue;
                    }
                }
                open = List::None;
                continue;
            }
        };
        match list {
            List::StatusCodes => parsed.status_codes.push(status_code(element.trim())?),
            List::Grpc => parsed.grpc_codes.push(grpc_code(element.trim())?),
            List::None => return None,
        }
        open = list;
    }
    parsed.status_codes.sort_unstable();
    parsed.status_codes.dedup();
    parsed.grpc_codes.sort_unstable();
    parsed.grpc_codes.dedup();
    Some(parsed)
}

fn status_code(text: &str) -> Option<u32> {
    whole(text).filter(|code| (100..=599).contains(code))
}

/// A gRPC code's number from its name (lower case), `-` or `_` between words.
fn grpc_code(name: &str) -> Option<u32> {
    let name = name.replace('_', "-");
    let at = GRPC_CODES.iter().position(|known| *known == name)?;
    u32::try_from(at).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    /// One row of a table: the case, the annotation's value, what it gives (`None` = bad).
    type Case<T> = (&'static str, &'static str, Option<T>);

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
            .collect()
    }

    /// The policy of one annotation `key: value`; `None` when it was reported bad (and then
    /// the policy must be the defaults).
    fn one(key: &str, value: &str) -> Option<pb::Policy> {
        let (policy, bad) = parse(Some(&annotations(&[(key, value)])));
        match bad.as_slice() {
            [] => Some(policy),
            [bad] => {
                assert_eq!(policy, defaults(), "{key}: {value:?}");
                assert_eq!((bad.key, bad.value.as_str()), (key, value));
                assert_eq!(bad.form, form(key));
                None
            }
            more => panic!("{key}: {value:?}: {more:?}"),
        }
    }

    fn retry(policy: &pb::Policy) -> &pb::RetryPolicy {
        policy.retry.as_ref().unwrap()
    }

    #[test]
    fn no_annotations_give_every_default() {
        let (policy, bad) = parse(None);
        assert!(bad.is_empty());
        assert_eq!(policy, defaults());
        let unrelated = annotations(&[("remora.io/inject", "enabled"), ("timeout", "5s")]);
        assert_eq!(parse(Some(&unrelated)), (defaults(), Vec::new()));
        assert_eq!(policy.timeout_ms, 0);
        assert_eq!(retry(&policy).attempts, 2);
        assert!(!retry(&policy).non_idempotent);
        assert_eq!(
            (
                retry(&policy).budget_percent,
                retry(&policy).budget_floor_per_second
            ),
            (20, 10)
        );
        assert_eq!(policy.failure_accrual_consecutive, 5);
        assert_eq!(policy.max_ejection_percent, 50);
        assert_eq!((policy.queue_size, policy.queue_timeout_ms), (100, 3_000));
    }

    #[test]
    fn timeout() {
        // (case, value, milliseconds; None = bad)
        let cases: [Case<u64>; 14] = [
            ("zero is none", "0", Some(0)),
            ("zero seconds", "0s", Some(0)),
            ("milliseconds", "500ms", Some(500)),
            ("seconds", "3s", Some(3_000)),
            ("minutes", "1m", Some(60_000)),
            ("hours", "1h", Some(3_600_000)),
            ("groups", "1m30s", Some(90_000)),
            ("spaces around", " 2s ", Some(2_000)),
            ("no unit", "5", None),
            ("fraction", "1.5s", None),
            ("negative", "-1s", None),
            ("upper case unit", "3S", None),
            ("six digits", "100000s", None),
            ("empty", "", None),
        ];
        for (case, value, expected) in cases {
            let got = one(TIMEOUT, value).map(|policy| policy.timeout_ms);
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn retry_on() {
        // (case, value, (5xx, gateway-error, reset, status codes, gRPC codes); None = bad)
        type Conditions = (bool, bool, bool, Vec<u32>, Vec<u32>);
        let cases: Vec<Case<Conditions>> = vec![
            ("empty", "", Some((false, false, false, vec![], vec![]))),
            ("5xx", "5xx", Some((true, false, false, vec![], vec![]))),
            (
                "gateway-error",
                "gateway-error",
                Some((false, true, false, vec![], vec![])),
            ),
            ("reset", "reset", Some((false, false, true, vec![], vec![]))),
            (
                "all words, spaces, any case",
                "5XX, Gateway-Error ,RESET",
                Some((true, true, true, vec![], vec![])),
            ),
            (
                "one status code",
                "retriable-status-codes=503",
                Some((false, false, false, vec![503], vec![])),
            ),
            (
                "status codes continue after the comma, sorted, once",
                "retriable-status-codes=503,502,503",
                Some((false, false, false, vec![502, 503], vec![])),
            ),
            (
                "a word ends the list",
                "retriable-status-codes=502,reset",
                Some((false, false, true, vec![502], vec![])),
            ),
            (
                "grpc names to numbers",
                "grpc=unavailable,deadline-exceeded,resource-exhausted",
                Some((false, false, false, vec![], vec![4, 8, 14])),
            ),
            (
                "grpc names in any case, with underscores",
                "GRPC=UNAVAILABLE,Deadline_Exceeded",
                Some((false, false, false, vec![], vec![4, 14])),
            ),
            (
                "grpc and status codes and words",
                "5xx,grpc=internal,retriable-status-codes=409,grpc=aborted",
                Some((true, false, false, vec![409], vec![10, 13])),
            ),
            ("an unknown word", "5xx,connect-failure", None),
            ("an empty item", "5xx,,reset", None),
            ("a trailing comma", "5xx,", None),
            (
                "a status code out of range",
                "retriable-status-codes=600",
                None,
            ),
            (
                "a status code that is no number",
                "retriable-status-codes=5xx0",
                None,
            ),
            ("an empty status code list", "retriable-status-codes=", None),
            ("semicolons", "retriable-status-codes=502;503", None),
            ("an unknown gRPC name", "grpc=unavailable,busy", None),
            ("a gRPC number", "grpc=14", None),
            ("an unknown list", "http=502", None),
            ("a number without a list", "502", None),
        ];
        for (case, value, expected) in cases {
            let got = one(RETRY_ON, value).map(|policy| {
                let retry = retry(&policy);
                assert_eq!(retry.attempts, 2, "{case}: the rest untouched");
                (
                    retry.on_5xx,
                    retry.on_gateway_error,
                    retry.on_reset,
                    retry.status_codes.clone(),
                    retry.grpc_codes.clone(),
                )
            });
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn every_grpc_name_maps_to_its_code() {
        for (code, name) in GRPC_CODES.iter().enumerate() {
            let policy = one(RETRY_ON, &format!("grpc={name}")).unwrap();
            assert_eq!(retry(&policy).grpc_codes, vec![code as u32], "{name}");
        }
        assert_eq!(grpc_code("unavailable"), Some(14));
        assert_eq!(grpc_code("deadline-exceeded"), Some(4));
        assert_eq!(grpc_code("unauthenticated"), Some(16));
    }

    #[test]
    fn retry_attempts() {
        let cases: [Case<u32>; 8] = [
            ("none", "0", Some(0)),
            ("some", "3", Some(3)),
            ("spaces around", " 3 ", Some(3)),
            ("negative", "-1", None),
            ("a sign", "+3", None),
            ("a fraction", "2.5", None),
            ("a word", "two", None),
            ("too large", "4294967296", None),
        ];
        for (case, value, expected) in cases {
            let got = one(RETRY_ATTEMPTS, value).map(|policy| retry(&policy).attempts);
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn retry_non_idempotent() {
        let cases: [Case<bool>; 7] = [
            ("true", "true", Some(true)),
            ("false", "false", Some(false)),
            ("spaces around", " true ", Some(true)),
            ("any case", "True", Some(true)),
            ("yes", "yes", None),
            ("one", "1", None),
            ("empty", "", None),
        ];
        for (case, value, expected) in cases {
            let got = one(RETRY_NON_IDEMPOTENT, value).map(|policy| retry(&policy).non_idempotent);
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn retry_budget() {
        let cases: [Case<(u32, u32)>; 10] = [
            ("the default written out", "20%,10/s", Some((20, 10))),
            ("other numbers", "50%,1/s", Some((50, 1))),
            ("spaces around", "10% , 0/s", Some((10, 0))),
            ("all", "100%,100/s", Some((100, 100))),
            ("over 100 percent", "101%,10/s", None),
            ("no floor", "20%", None),
            ("no percent sign", "20,10/s", None),
            ("no per second", "20%,10", None),
            ("a fraction", "20.5%,10/s", None),
            ("swapped", "10/s,20%", None),
        ];
        for (case, value, expected) in cases {
            let got = one(RETRY_BUDGET, value).map(|policy| {
                let retry = retry(&policy);
                (retry.budget_percent, retry.budget_floor_per_second)
            });
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn failure_accrual() {
        let cases: [Case<u32>; 8] = [
            ("consecutive", "consecutive=3", Some(3)),
            ("off", "off", Some(0)),
            ("any case", "Consecutive=7", Some(7)),
            ("off in capitals", "OFF", Some(0)),
            ("zero in a row", "consecutive=0", None),
            ("no count", "consecutive=", None),
            ("a bare number", "5", None),
            ("another kind", "success-rate=0.9", None),
        ];
        for (case, value, expected) in cases {
            let got = one(FAILURE_ACCRUAL, value).map(|policy| policy.failure_accrual_consecutive);
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn max_ejection() {
        let cases: [Case<u32>; 7] = [
            ("half", "50%", Some(50)),
            ("none", "0%", Some(0)),
            ("all", "100%", Some(100)),
            ("over all", "101%", None),
            ("no percent sign", "50", None),
            ("a fraction", "33.3%", None),
            ("a count", "2", None),
        ];
        for (case, value, expected) in cases {
            let got = one(MAX_EJECTION, value).map(|policy| policy.max_ejection_percent);
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn queue() {
        let cases: [Case<(u32, u64)>; 8] = [
            ("the default written out", "100,3s", Some((100, 3_000))),
            ("no waiting", "0,0", Some((0, 0))),
            ("milliseconds, spaces", "10, 250ms", Some((10, 250))),
            ("no time", "100", None),
            ("a time without unit", "100,3", None),
            ("a negative size", "-1,3s", None),
            ("swapped", "3s,100", None),
            ("three parts", "100,3s,1", None),
        ];
        for (case, value, expected) in cases {
            let got = one(QUEUE, value).map(|policy| (policy.queue_size, policy.queue_timeout_ms));
            assert_eq!(got, expected, "{case}");
        }
    }

    #[test]
    fn a_bad_annotation_takes_its_default_and_the_others_apply() {
        let (policy, bad) = parse(Some(&annotations(&[
            (TIMEOUT, "5s"),
            (RETRY_ON, "5xx,teapot"),
            (RETRY_ATTEMPTS, "3"),
            (QUEUE, "lots"),
            (MAX_EJECTION, "30%"),
        ])));
        let mut expected = defaults();
        expected.timeout_ms = 5_000;
        expected.retry.as_mut().unwrap().attempts = 3;
        expected.max_ejection_percent = 30;
        assert_eq!(policy, expected);
        assert_eq!(
            bad,
            vec![
                BadAnnotation {
                    key: RETRY_ON,
                    value: "5xx,teapot".into(),
                    form: form(RETRY_ON),
                },
                BadAnnotation {
                    key: QUEUE,
                    value: "lots".into(),
                    form: form(QUEUE),
                },
            ]
        );
        assert_eq!(
            bad[1].to_string(),
            "annotation remora.io/queue: \"lots\" is not SIZE,DURATION (e.g. 100,3s); its default applies"
        );
    }

    #[test]
    fn read_keeps_only_the_policy_annotations() {
        let all = annotations(&[
            (QUEUE, "1,1s"),
            ("remora.io/inject", "enabled"),
            (TIMEOUT, "1s"),
        ]);
        assert_eq!(
            read(Some(&all)),
            vec![(TIMEOUT, "1s".to_string()), (QUEUE, "1,1s".to_string())]
        );
        assert!(read(None).is_empty());
    }
}
