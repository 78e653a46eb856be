//! The `--control` address the injector writes into the proxy's flags and the proxy reads: one
//! parser for both, so a value the injector accepts is one the proxy can dial.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Where a proxy reaches remora-control: `host:port`, the host a DNS name or an IP literal
/// (SPEC "What the proxy does with it"). Shown as the proxy reads it, IPv6 in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlAddr {
    host: ControlHost,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ControlHost {
    Dns(String),
    Ip(IpAddr),
}

const CONTROL_ADDR_FORM: &str =
    "expected host:port, e.g. remora-control.remora-system.svc:8090, 10.96.0.20:8090 or [fd00::20]:8090";

impl ControlAddr {
    /// `None` for an empty value: no control plane.
    pub fn parse_optional(text: &str) -> Result<Option<Self>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for ControlAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let quoted = format!("{text:?}");
        if text.contains("://") {
            return Err(format!(
                "{quoted} has a scheme; give the address alone ({CONTROL_ADDR_FORM})"
            ));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let Some((ip, after)) = rest.split_once(']') else {
                return Err(format!("{quoted} has no closing ] ({CONTROL_ADDR_FORM})"));
            };
            let Ok(ip) = ip.parse::<Ipv6Addr>() else {
                return Err(format!(
                    "{quoted}: {ip:?} in brackets is not an IPv6 address ({CONTROL_ADDR_FORM})"
                ));
            };
            let Some(port) = after.strip_prefix(':') else {
                return Err(format!("{quoted} has no :port ({CONTROL_ADDR_FORM})"));
            };
            (ControlHost::Ip(IpAddr::V6(ip)), port)
        } else {
            let Some((host, port)) = text.rsplit_once(':') else {
                return Err(format!("{quoted} has no :port ({CONTROL_ADDR_FORM})"));
            };
            if host.contains(':') {
                return Err(format!(
                    "{quoted}: an IPv6 address goes in brackets, as in [fd00::20]:8090 ({CONTROL_ADDR_FORM})"
                ));
            }
            let host = match host.parse::<Ipv4Addr>() {
                Ok(ip) => ControlHost::Ip(IpAddr::V4(ip)),
                Err(_) => ControlHost::Dns(
                    check_dns_name(host)
                        .map_err(|problem| format!("{quoted}: {problem} ({CONTROL_ADDR_FORM})"))?,
                ),
            };
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                return Err(format!(
                    "{quoted}: port {port:?} is not a number from 1 to 65535 ({CONTROL_ADDR_FORM})"
                ))
            }
        };
        Ok(ControlAddr { host, port })
    }
}

/// A DNS name as a proxy can dial it and verify a certificate for: dot-separated labels of
/// letters, digits and `-` (not first or last), 1 to 63 characters each, 253 in all, and a
/// last label that is not all digits (that would be a mistyped IPv4 address).
fn check_dns_name(host: &str) -> Result<String, String> {
    let problem = if host.is_empty() {
        Some("the host is empty".to_string())
    } else if host.len() > 253 {
        Some(format!(
            "the host is {} characters long, more than a DNS name's 253",
            host.len()
        ))
    } else if let Some(label) = host.split('.').find(|label| {
        label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    }) {
        Some(format!(
            "{host:?} is not a DNS name or an IP address (label {label:?}: DNS labels are 1 to 63 \
             letters, digits and '-', not starting or ending with '-')"
        ))
    } else if host
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        Some(format!(
            "{host:?} is neither an IPv4 address nor a DNS name"
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(problem),
        None => Ok(host.to_string()),
    }
}

impl fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            ControlHost::Dns(name) => write!(f, "{name}:{}", self.port),
            ControlHost::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            ControlHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_CONTROL_ADDR: &str = "remora-control.remora-system.svc:8090";

    #[test]
    fn control_addresses_the_proxy_can_dial() {
        let good = [
            ("the default", DEFAULT_CONTROL_ADDR, DEFAULT_CONTROL_ADDR),
            ("short name", "remora-control:8090", "remora-control:8090"),
            ("IPv4", "10.96.0.20:8090", "10.96.0.20:8090"),
            ("IPv6 in brackets", "[fd00:0::20]:8090", "[fd00::20]:8090"),
            ("spaces around", " remora-control:1 ", "remora-control:1"),
            (
                "digits in labels",
                "cp-2.mesh-1.svc:65535",
                "cp-2.mesh-1.svc:65535",
            ),
        ];
        for (name, text, shown) in good {
            let parsed = ControlAddr::parse_optional(text)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap_or_else(|| panic!("{name}: empty"));
            assert_eq!(parsed.to_string(), shown, "{name}");
        }
        assert_eq!(ControlAddr::parse_optional("").unwrap(), None);
        assert_eq!(ControlAddr::parse_optional("  ").unwrap(), None);

        let bad = [
            ("no port", "remora-control", "has no :port"),
            ("port zero", "remora-control:0", "1 to 65535"),
            ("port too big", "remora-control:65536", "1 to 65535"),
            ("port not a number", "remora-control:grpc", "\"grpc\""),
            ("bare IPv6", "fd00::20:8090", "goes in brackets"),
            ("bracketed non-IPv6", "[remora]:8090", "not an IPv6 address"),
            ("unclosed bracket", "[fd00::20:8090", "no closing ]"),
            ("bracketed without port", "[fd00::20]", "has no :port"),
            ("a scheme", "https://remora-control:8090", "has a scheme"),
            (
                "underscore",
                "remora_control:8090",
                "label \"remora_control\"",
            ),
            (
                "leading hyphen",
                "-remora:8090",
                "not starting or ending with '-'",
            ),
            ("empty label", "remora..svc:8090", "label \"\""),
            ("trailing dot", "remora.svc.:8090", "label \"\""),
            (
                "bad IPv4",
                "10.96.0.256:8090",
                "neither an IPv4 address nor a DNS name",
            ),
            ("empty host", ":8090", "the host is empty"),
            (
                "long label",
                &format!("{}.svc:8090", "a".repeat(64)),
                "1 to 63",
            ),
        ];
        for (name, text, needle) in bad {
            let error = ControlAddr::parse_optional(text).expect_err(name);
            assert!(error.contains(needle), "{name}: {error:?} lacks {needle:?}");
            assert!(error.contains("expected host:port"), "{name}: {error}");
        }
    }
}
