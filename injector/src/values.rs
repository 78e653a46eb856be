//! The values a pod annotation and a webhook flag may both give: resource quantities, the
//! proxy's log level and uid. Parsed here with messages that name the bad value and the
//! accepted form; [`crate::annotations`] adds the annotation's name, [`crate::config`] the flag's.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use remora_init::quoted;

/// The largest uid Kubernetes accepts in `runAsUser`.
const MAX_UID: u32 = 2_147_483_647;

/// A Kubernetes resource quantity such as `100m`, `0.5`, `128Mi`, `1Gi` or `1e3`.
///
/// Kept as written (the API server canonicalises it) together with its exact value in
/// nano-units, which is what requests and limits are compared by.
#[derive(Debug, Clone)]
pub struct Quantity {
    text: String,
    nanos: u128,
}

/// Why a string is not a quantity; shown after the quoted value.
const QUANTITY_FORM: &str =
    "expected a Kubernetes quantity such as 100m, 0.5, 128Mi or 1Gi: digits with an optional \
     fraction, then one of n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or an exponent like e3";

impl Quantity {
    pub fn zero() -> Self {
        Self {
            text: "0".to_string(),
            nanos: 0,
        }
    }

    /// Parses the grammar of Kubernetes' `resource.Quantity` (apimachinery), without a sign:
    /// a container resource can't be negative.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{} is not a quantity ({QUANTITY_FORM})", quoted(text));
        let unsigned = match text.strip_prefix('+') {
            Some(rest) => rest,
            None if text.starts_with('-') => {
                return Err(format!(
                    "{} is negative (expected a quantity of at least 0, such as 100m or 128Mi)",
                    quoted(text)
                ))
            }
            None => text,
        };
        let number_end = unsigned
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(unsigned.len());
        let (number, suffix) = unsigned.split_at(number_end);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(bad());
        }
        // value = digits × 2^binary × 10^decimal, in units of 10^-9.
        let (binary, decimal): (u32, i64) = match suffix {
            "" => (0, 0),
            "n" => (0, -9),
            "u" => (0, -6),
            "m" => (0, -3),
            "k" => (0, 3),
            "M" => (0, 6),
            "G" => (0, 9),
            "T" => (0, 12),
            "P" => (0, 15),
            "E" => (0, 18),
            "Ki" => (10, 0),
            "Mi" => (20, 0),
            "Gi" => (30, 0),
            "Ti" => (40, 0),
            "Pi" => (50, 0),
            "Ei" => (60, 0),
            exponent => {
                let digits = exponent
                    .strip_prefix('e')
                    .or_else(|| exponent.strip_prefix('E'))
                    .ok_or_else(bad)?;
                let unsigned_digits = digits
                    .strip_prefix('+')
                    .or_else(|| digits.strip_prefix('-'))
                    .unwrap_or(digits);
                if unsigned_digits.is_empty()
                    || !unsigned_digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(bad());
                }
                (0, digits.parse::<i64>().map_err(|_| bad())?)
            }
        };
        // Kubernetes clamps a quantity to 2^63-1 units rather than refusing it; so do we.
        let max = u128::from(i64::MAX.unsigned_abs()) * 1_000_000_000;
        let digits = format!("{whole}{fraction}");
        let digits = digits.trim_start_matches('0');
        let scale = decimal + 9 - fraction.len() as i64;
        let nanos = if digits.is_empty() {
            0
        } else if digits.len() > 38 || scale > 38 {
            max
        } else {
            let mantissa: u128 = digits.parse().map_err(|_| bad())?;
            let scaled = mantissa.checked_mul(1u128 << binary);
            match (
                scaled,
                u32::try_from(scale.unsigned_abs())
                    .ok()
                    .and_then(|s| 10u128.checked_pow(s)),
            ) {
                (None, _) => max,
                (Some(value), Some(factor)) if scale >= 0 => {
                    value.checked_mul(factor).unwrap_or(max)
                }
                // Finer than a nano-unit: Kubernetes rounds up, and so do we.
                (Some(value), Some(divisor)) => value.div_ceil(divisor),
                (Some(value), None) => u128::from(value > 0),
            }
            .min(max)
        };
        Ok(Self {
            text: text.to_string(),
            nanos,
        })
    }

    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Quantity {
    fn eq(&self, other: &Self) -> bool {
        self.nanos == other.nanos
    }
}

impl Eq for Quantity {}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Quantity {
    fn cmp(&self, other: &Self) -> Ordering {
        self.nanos.cmp(&other.nanos)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// CPU and memory requests and limits of one injected container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Quantity,
    pub cpu_limit: Quantity,
    pub memory_request: Quantity,
    pub memory_limit: Quantity,
}

/// `remora-proxy --log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "error" => Ok(Self::Error),
            "warn" => Ok(Self::Warn),
            "info" => Ok(Self::Info),
            "debug" => Ok(Self::Debug),
            "trace" => Ok(Self::Trace),
            _ => Err(format!(
                "{} is not a log level (expected error, warn, info, debug or trace)",
                quoted(value)
            )),
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The proxy uid: it runs as non-root (`runAsNonRoot: true`), so 0 is refused.
pub fn parse_proxy_uid(value: &str) -> Result<u32, String> {
    match value.trim().parse::<u32>() {
        Ok(uid) if (1..=MAX_UID).contains(&uid) => Ok(uid),
        _ => Err(format!(
            "{} is not a proxy uid (expected a number from 1 to {MAX_UID}: the proxy runs as non-root)",
            quoted(value)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantity_nanos(text: &str) -> Result<u128, String> {
        Quantity::parse(text).map(|q| q.nanos)
    }

    #[test]
    fn quantities() {
        const GI: u128 = 1 << 30;
        const MAX: u128 = i64::MAX as u128 * 1_000_000_000;
        let cases: &[(&str, &str, Option<u128>)] = &[
            ("plain integer", "1", Some(1_000_000_000)),
            ("milli", "100m", Some(100_000_000)),
            ("fraction", "0.5", Some(500_000_000)),
            ("leading dot", ".5", Some(500_000_000)),
            ("trailing dot", "5.", Some(5_000_000_000)),
            ("plus sign", "+1", Some(1_000_000_000)),
            ("binary", "1Gi", Some(GI * 1_000_000_000)),
            ("binary fraction", "1.5Ki", Some(1536 * 1_000_000_000)),
            ("decimal SI", "128M", Some(128_000_000 * 1_000_000_000)),
            ("kilo", "2k", Some(2_000 * 1_000_000_000)),
            ("exa", "1E", Some(10u128.pow(27))),
            ("exponent", "1e3", Some(1_000 * 1_000_000_000)),
            ("upper exponent", "1E3", Some(1_000 * 1_000_000_000)),
            ("negative exponent", "5e-3", Some(5_000_000)),
            ("nano", "1n", Some(1)),
            ("micro", "3u", Some(3_000)),
            ("sub-nano rounds up", "0.1n", Some(1)),
            ("zero", "0", Some(0)),
            ("zero with suffix", "0Mi", Some(0)),
            ("empty", "", None),
            ("suffix only", "Mi", None),
            ("dot only", ".", None),
            ("two dots", "1.2.3", None),
            ("negative", "-1", None),
            ("space", "1 Gi", None),
            ("lowercase binary", "1gi", None),
            ("unknown suffix", "1Qi", None),
            ("bytes word", "1GB", None),
            ("bare exponent", "1e", None),
            ("exponent without digits", "1e+", None),
            ("fraction exponent", "1e1.5", None),
            (
                "huge clamps",
                "99999999999999999999999999999999999999999",
                Some(MAX),
            ),
            ("beyond int64 clamps", "10Ei", Some(MAX)),
        ];
        for (name, text, want) in cases {
            let got = quantity_nanos(text);
            match want {
                Some(nanos) => assert_eq!(got.as_ref(), Ok(nanos), "case {name}: {text:?}"),
                None => {
                    let err = got.expect_err(name);
                    assert!(err.contains(&format!("{text:?}")), "case {name}: {err}");
                }
            }
        }
    }

    #[test]
    fn quantities_compare_by_value_and_keep_their_text() {
        let q = |text| Quantity::parse(text).unwrap();
        assert_eq!(q("1"), q("1000m"));
        assert_eq!(q("1Ki"), q("1024"));
        assert!(q("100m") < q("0.2"));
        assert!(q("1Gi") > q("1G"));
        assert_eq!(q("1000m").to_string(), "1000m");
    }

    #[test]
    fn log_levels() {
        let cases: &[(&str, Option<LogLevel>)] = &[
            ("error", Some(LogLevel::Error)),
            ("warn", Some(LogLevel::Warn)),
            ("info", Some(LogLevel::Info)),
            ("debug", Some(LogLevel::Debug)),
            ("trace", Some(LogLevel::Trace)),
            ("DEBUG", Some(LogLevel::Debug)),
            ("warning", None),
            ("", None),
            ("verbose", None),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<LogLevel>().ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn proxy_uids() {
        let cases: &[(&str, Option<u32>)] = &[
            ("1337", Some(1337)),
            ("1", Some(1)),
            ("2147483647", Some(2_147_483_647)),
            ("0", None),
            ("2147483648", None),
            ("-1", None),
            ("proxy", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_proxy_uid(text).ok(), *want, "{text:?}");
        }
    }
}
