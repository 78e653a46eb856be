//! The values of the proxy's mTLS flags: `--inbound-mtls`, `--allow-from` and `--inbound-probes`,
//! parsed from the pod's annotations (the first two) or built from its probes (the third).
//!
//! Nothing here knows Kubernetes types, so that the proxy could parse its flags with the very
//! same grammar, as it does `--inbound-rate-limit` with `remora_init::rate_limit`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use remora_init::quoted;

/// What inbound plaintext the proxy accepts: `--inbound-mtls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InboundMtls {
    /// mTLS and plaintext both.
    #[default]
    Permissive,
    /// mTLS only, but for the admin port and the pod's own kubelet probes.
    Strict,
}

impl InboundMtls {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

impl FromStr for InboundMtls {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim() {
            "permissive" => Ok(Self::Permissive),
            "strict" => Ok(Self::Strict),
            _ => Err(format!(
                "{} is not an inbound mTLS mode (expected permissive or strict)",
                quoted(value)
            )),
        }
    }
}

impl fmt::Display for InboundMtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a message says `allow-from` accepts.
const ALLOW_FROM_FORM: &str = "expected a comma-separated list of NAMESPACE/SERVICEACCOUNT or \
     NAMESPACE/*, each name a DNS label (lowercase letters, digits and '-', at most 63), e.g. \
     shop/checkout,monitoring/*";

/// One entry of `--allow-from`: the workloads of one ServiceAccount, or of a whole namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowedClient {
    pub namespace: String,
    /// `None` for `ns/*`.
    pub service_account: Option<String>,
}

impl fmt::Display for AllowedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let account = self.service_account.as_deref().unwrap_or("*");
        write!(f, "{}/{account}", self.namespace)
    }
}

/// The clients the proxy lets in by their identity: `--allow-from`. Empty lets anyone in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowFrom(pub Vec<AllowedClient>);

impl AllowFrom {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A DNS label (RFC 1123) as Kubernetes checks namespace names.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl FromStr for AllowFrom {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let mut clients = Vec::new();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let client = item.split_once('/').and_then(|(namespace, account)| {
                let service_account = match account {
                    "*" => None,
                    account if is_dns_label(account) => Some(account.to_string()),
                    _ => return None,
                };
                is_dns_label(namespace).then(|| AllowedClient {
                    namespace: namespace.to_string(),
                    service_account,
                })
            });
            match client {
                Some(client) if !clients.contains(&client) => clients.push(client),
                Some(_) => {}
                None if item == value.trim() => {
                    return Err(format!(
                        "{} is not a client identity ({ALLOW_FROM_FORM})",
                        quoted(value)
                    ))
                }
                None => {
                    return Err(format!(
                        "{} is invalid: {} is not a client identity ({ALLOW_FROM_FORM})",
                        quoted(value),
                        quoted(item)
                    ))
                }
            }
        }
        Ok(Self(clients))
    }
}

impl fmt::Display for AllowFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, client) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            client.fmt(f)?;
        }
        Ok(())
    }
}

/// One plaintext exception of strict mode: a whole port, or one HTTP path on a port.
///
/// Ordered by port, the whole port before its paths, the paths by their text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeTarget {
    pub port: u16,
    /// `None`: any connection to the port (tcpSocket, gRPC, HTTPS probes).
    pub path: Option<String>,
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            None => write!(f, "{}", self.port),
            Some(path) => write!(f, "{}:{path}", self.port),
        }
    }
}

/// The pod's own kubelet probes, which strict mode still answers in plaintext:
/// `--inbound-probes`, e.g. `8080:/healthz,8080:/ready,9000`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundProbes(BTreeSet<ProbeTarget>);

impl InboundProbes {
    /// Adds a target; a path on a port already open as a whole is not worth listing.
    pub fn insert(&mut self, target: ProbeTarget) {
        let whole = ProbeTarget {
            port: target.port,
            path: None,
        };
        if self.0.contains(&whole) {
            return;
        }
        if target.path.is_none() {
            self.0.retain(|t| t.port != target.port);
        }
        self.0.insert(target);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ProbeTarget> {
        self.0.iter()
    }
}

impl fmt::Display for InboundProbes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, target) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            target.fmt(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_mtls_modes() {
        let cases: &[(&str, Option<InboundMtls>)] = &[
            ("permissive", Some(InboundMtls::Permissive)),
            ("strict", Some(InboundMtls::Strict)),
            (" strict ", Some(InboundMtls::Strict)),
            ("STRICT", None),
            ("disabled", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<InboundMtls>().ok(), *want, "{text:?}");
        }
        let err = "mtls".parse::<InboundMtls>().unwrap_err();
        assert!(
            err.contains("\"mtls\"") && err.contains("permissive or strict"),
            "{err}"
        );
    }

    #[test]
    fn allow_from_lists() {
        // Name, value, what it renders as (None: refused).
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("one account", "shop/checkout", Some("shop/checkout")),
            ("a namespace", "monitoring/*", Some("monitoring/*")),
            (
                "spaces and empty items",
                " shop/checkout , ,monitoring/* ",
                Some("shop/checkout,monitoring/*"),
            ),
            ("duplicates once", "a/b,a/b", Some("a/b")),
            ("empty is anyone", "", Some("")),
            ("no slash", "shop", None),
            ("wildcard namespace", "*/checkout", None),
            ("everything", "*", None),
            ("uppercase", "Shop/checkout", None),
            ("dotted account", "shop/check.out", None),
            ("leading dash", "-shop/a", None),
            ("trailing dash", "shop/a-", None),
            ("two slashes", "shop/a/b", None),
            ("empty account", "shop/", None),
            ("spiffe uri", "spiffe://cluster.local/ns/shop/sa/a", None),
        ];
        for (name, value, want) in cases {
            let got = value.parse::<AllowFrom>().map(|list| list.to_string());
            match want {
                Some(rendered) => assert_eq!(got.as_deref(), Ok(*rendered), "case {name}"),
                None => {
                    let err = got.expect_err(name);
                    assert!(
                        err.contains("NAMESPACE/SERVICEACCOUNT"),
                        "case {name}: {err}"
                    );
                }
            }
        }
        let long = format!("{}/a", "n".repeat(63));
        assert!(long.parse::<AllowFrom>().is_ok());
        assert!(format!("n{long}").parse::<AllowFrom>().is_err());
        // The bad item is named after the whole value.
        let err = "shop/a, Bad/b".parse::<AllowFrom>().unwrap_err();
        assert!(
            err.starts_with("\"shop/a, Bad/b\" is invalid: \"Bad/b\" is not"),
            "{err}"
        );
    }

    #[test]
    fn probes_are_sorted_deduplicated_and_a_whole_port_covers_its_paths() {
        let mut probes = InboundProbes::default();
        let path = |port, path: &str| ProbeTarget {
            port,
            path: Some(path.to_string()),
        };
        let whole = |port| ProbeTarget { port, path: None };
        probes.insert(path(8080, "/ready"));
        probes.insert(path(8080, "/healthz"));
        probes.insert(path(8080, "/ready"));
        probes.insert(path(443, "/x"));
        probes.insert(whole(9000));
        probes.insert(path(9000, "/live"));
        probes.insert(whole(443));
        probes.insert(whole(80));
        assert_eq!(probes.to_string(), "80,443,8080:/healthz,8080:/ready,9000");
        assert!(InboundProbes::default().is_empty());
    }
}
