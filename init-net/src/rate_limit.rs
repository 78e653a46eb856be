//! The inbound rate limit the injector writes into the proxy's `--inbound-rate-limit` (from the
//! pod annotation `remora.io/inbound-rate-limit`) and the proxy reads: one grammar for both.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use crate::config::quoted;

/// The highest rate: far beyond what one proxy serves, and low enough that a token is a whole
/// number of nanoseconds.
pub const MAX_RATE: u32 = 1_000_000;

/// What a message says is accepted.
pub const RATE_LIMIT_FORM: &str =
    "expected N/s, or N/s,M/s per-client with M at most N, N and M whole numbers from 1 to \
     1000000, e.g. 100/s or 100/s,10/s per-client";

/// Requests per second the pod's proxy lets in over all its inbound HTTP, and optionally per
/// client IP address. Each is a token bucket holding one second's worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundRateLimit {
    pub total: NonZeroU32,
    pub per_client: Option<NonZeroU32>,
}

impl FromStr for InboundRateLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |problem: &str| format!("{} {problem} ({RATE_LIMIT_FORM})", quoted(text));
        let (total, per_client) = match text.split_once(',') {
            Some((total, per_client)) => (total, Some(per_client)),
            None => (text, None),
        };
        let total = per_second(total).map_err(|problem| bad(&problem))?;
        let per_client = match per_client {
            None => None,
            Some(item) => {
                let item = item.trim();
                let Some(rate) = item
                    .strip_suffix("per-client")
                    .filter(|rate| rate.ends_with(char::is_whitespace))
                else {
                    return Err(bad(&format!(
                        "has {} after the comma, not a per-client rate such as 10/s per-client",
                        quoted(item)
                    )));
                };
                let per_client = per_second(rate).map_err(|problem| bad(&problem))?;
                if per_client > total {
                    return Err(bad(&format!(
                        "lets one client have {per_client}/s, more than the total {total}/s"
                    )));
                }
                Some(per_client)
            }
        };
        Ok(Self { total, per_client })
    }
}

/// `N/s`, spaces around it allowed; the problem with it otherwise.
fn per_second(item: &str) -> Result<NonZeroU32, String> {
    let item = item.trim();
    let Some(number) = item.strip_suffix("/s") else {
        return Err(format!("has {} where a rate N/s goes", quoted(item)));
    };
    // `u32::from_str` takes a leading `+`; a rate is digits only.
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("has {} where a rate N/s goes", quoted(item)));
    }
    match number
        .parse::<u32>()
        .ok()
        .filter(|rate| *rate <= MAX_RATE)
        .and_then(NonZeroU32::new)
    {
        Some(rate) => Ok(rate),
        None => Err(format!(
            "has the rate {}, not a whole number from 1 to {MAX_RATE} (to lift the limit, \
             remove it)",
            quoted(item)
        )),
    }
}

impl fmt::Display for InboundRateLimit {
    /// The canonical form, which [`FromStr`] reads back to the same limit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.total)?;
        if let Some(per_client) = self.per_client {
            write!(f, ",{per_client}/s per-client")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(total: u32, per_client: Option<u32>) -> InboundRateLimit {
        InboundRateLimit {
            total: NonZeroU32::new(total).unwrap(),
            per_client: per_client.map(|rate| NonZeroU32::new(rate).unwrap()),
        }
    }

    #[test]
    fn good_rate_limits_and_their_canonical_form() {
        let cases = [
            ("total only", "100/s", limit(100, None), "100/s"),
            ("one a second", "1/s", limit(1, None), "1/s"),
            (
                "the largest",
                "1000000/s",
                limit(MAX_RATE, None),
                "1000000/s",
            ),
            (
                "with per-client",
                "100/s,10/s per-client",
                limit(100, Some(10)),
                "100/s,10/s per-client",
            ),
            (
                "spaces around the items",
                " 100/s , 10/s  per-client ",
                limit(100, Some(10)),
                "100/s,10/s per-client",
            ),
            (
                "per-client equal to the total",
                "50/s,50/s per-client",
                limit(50, Some(50)),
                "50/s,50/s per-client",
            ),
            ("leading zeros", "0100/s", limit(100, None), "100/s"),
        ];
        for (name, text, want, shown) in cases {
            let got: InboundRateLimit = text.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name}");
            assert_eq!(got.to_string(), shown, "{name}");
            assert_eq!(
                shown.parse::<InboundRateLimit>(),
                Ok(want),
                "{name}: round trip"
            );
        }
    }

    #[test]
    fn bad_rate_limits_name_the_value_and_the_form() {
        let cases = [
            ("empty", "", "\"\" where a rate N/s goes"),
            ("no unit", "100", "\"100\" where a rate N/s goes"),
            ("per minute", "100/m", "\"100/m\" where a rate N/s goes"),
            ("zero", "0/s", "remove it"),
            ("too big", "1000001/s", "1 to 1000000"),
            ("beyond u32", "4294967296/s", "1 to 1000000"),
            ("negative", "-1/s", "\"-1/s\" where a rate N/s goes"),
            ("plus sign", "+1/s", "\"+1/s\" where a rate N/s goes"),
            ("fraction", "1.5/s", "\"1.5/s\" where a rate N/s goes"),
            ("unit only", "/s", "\"/s\" where a rate N/s goes"),
            ("space inside", "10 0/s", "\"10 0/s\" where a rate N/s goes"),
            (
                "per-client without its word",
                "100/s,10/s",
                "\"10/s\" after the comma",
            ),
            (
                "per-client word glued",
                "100/s,10/sper-client",
                "after the comma",
            ),
            ("another word", "100/s,10/s per-pod", "after the comma"),
            ("empty after the comma", "100/s,", "\"\" after the comma"),
            ("zero per client", "100/s,0/s per-client", "remove it"),
            (
                "per-client above the total",
                "10/s,20/s per-client",
                "20/s, more than the total 10/s",
            ),
            (
                "three items",
                "100/s,10/s per-client,5/s",
                "\"10/s per-client,5/s\" after the comma",
            ),
        ];
        for (name, text, needle) in cases {
            let error = text.parse::<InboundRateLimit>().expect_err(name);
            assert!(
                error.starts_with(&quoted(text)),
                "{name}: {error:?} does not start with the value"
            );
            assert!(error.contains(needle), "{name}: {error:?} lacks {needle:?}");
            assert!(error.contains(RATE_LIMIT_FORM), "{name}: {error}");
        }
    }
}
