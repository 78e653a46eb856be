//! The values of the proxy's mTLS flags `--inbound-mtls`, `--allow-from` and `--inbound-probes`,
//! which the injector writes (from the annotations `remora.io/inbound-mtls` and
//! `remora.io/allow-from`, and from the pod's probes) and the proxy reads: one grammar for both,
//! so what the webhook lets through is what the proxy starts with.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::config::quoted;

/// What a message says `--inbound-mtls` accepts.
pub const INBOUND_MTLS_FORM: &str = "expected permissive or strict";

/// What inbound plaintext the proxy accepts: `--inbound-mtls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InboundMtls {
    /// mTLS and plaintext both accepted.
    #[default]
    Permissive,
    /// Plaintext refused (a TCP reset), except the pod's own probes (`--inbound-probes`); the
    /// admin port is never redirected, so it is not refused either.
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
                "{} is not an inbound mTLS mode ({INBOUND_MTLS_FORM})",
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

/// What a message says `--allow-from` accepts.
pub const ALLOW_FROM_FORM: &str = "expected a comma-separated list of NAMESPACE/SERVICEACCOUNT or \
     NAMESPACE/*, the namespace a DNS label (lowercase letters, digits and '-', at most 63) and \
     the service account a DNS subdomain (such labels joined by '.', at most 253), e.g. \
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
pub struct AllowFrom(Vec<AllowedClient>);

impl AllowFrom {
    /// Whether the list is empty, which lets anyone in.
    pub fn is_anyone(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a client with `identity` (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; `None` for a
    /// plaintext client) may come in. The trust domain is not compared: the trust anchors
    /// already vouched for it.
    pub fn allows(&self, identity: Option<&str>) -> bool {
        if self.is_anyone() {
            return true;
        }
        let Some((namespace, account)) = identity.and_then(namespace_and_account) else {
            return false;
        };
        self.0.iter().any(|client| {
            client.namespace == namespace
                && client
                    .service_account
                    .as_deref()
                    .is_none_or(|sa| sa == account)
        })
    }
}

/// The namespace and ServiceAccount of a SPIFFE identity of remora's form.
fn namespace_and_account(identity: &str) -> Option<(&str, &str)> {
    let path = identity.strip_prefix("spiffe://")?;
    let (_trust_domain, path) = path.split_once('/')?;
    let mut parts = path.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => {
            Some((ns, sa))
        }
        _ => None,
    }
}

/// A DNS label (RFC 1123), as Kubernetes checks a namespace's name.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS subdomain (RFC 1123), as Kubernetes checks a ServiceAccount's name.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

impl FromStr for AllowFrom {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let mut clients = Vec::new();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let client = item.split_once('/').and_then(|(namespace, account)| {
                let service_account = match account {
                    "*" => None,
                    account if is_dns_subdomain(account) => Some(account.to_string()),
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
    /// The canonical form, which [`FromStr`] reads back to the same list.
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

/// What a message says `--inbound-probes` accepts.
pub const INBOUND_PROBES_FORM: &str = "expected a comma-separated list of PORT or PORT:/path, \
     the port from 1 to 65535, the path starting with / and without commas, spaces, ? or #, e.g. \
     8080:/healthz,8080:/ready,9000";

/// One plaintext exception of strict mode: a whole port, or one HTTP path on a port.
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

/// Whether `path` can be an item's path in `--inbound-probes`: it starts with `/`, and has no
/// comma (the list's separator), no space or control character, and no query or fragment
/// (kubelet's request is matched by its path alone).
pub fn is_probe_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains(|c: char| {
            c == ',' || c == '?' || c == '#' || c.is_whitespace() || c.is_control()
        })
}

/// What strict mode lets in on one port of `--inbound-probes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbePort {
    /// Any connection (a tcpSocket, HTTPS or gRPC probe).
    Whole,
    /// Only HTTP/1 requests for these paths (httpGet probes), sorted, each once.
    Paths(Vec<String>),
}

/// The pod's own kubelet probes, which strict mode (or `--allow-from`) still answers in
/// plaintext: `--inbound-probes`, e.g. `8080:/healthz,8080:/ready,9000`.
///
/// Shown by port, a whole port alone, the paths of a port sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundProbes(BTreeMap<u16, ProbePort>);

impl InboundProbes {
    /// Adds a target; a path on a port already open as a whole is not worth listing.
    pub fn insert(&mut self, target: ProbeTarget) {
        match target.path {
            None => {
                self.0.insert(target.port, ProbePort::Whole);
            }
            Some(path) => match self
                .0
                .entry(target.port)
                .or_insert_with(|| ProbePort::Paths(Vec::new()))
            {
                ProbePort::Whole => {}
                ProbePort::Paths(paths) => {
                    if let Err(at) = paths.binary_search(&path) {
                        paths.insert(at, path);
                    }
                }
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What is let in on `port` in plaintext; `None` for nothing.
    pub fn port(&self, port: u16) -> Option<&ProbePort> {
        self.0.get(&port)
    }
}

impl FromStr for InboundProbes {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let mut probes = Self::default();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (port, path) = match item.split_once(':') {
                Some((port, path)) => (port, Some(path)),
                None => (item, None),
            };
            // `u16::from_str` takes a leading `+`; a port is digits only.
            let port = Some(port)
                .filter(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|port| port.parse::<u16>().ok())
                .filter(|port| *port != 0);
            match (port, path) {
                (Some(port), None) => probes.insert(ProbeTarget { port, path: None }),
                (Some(port), Some(path)) if is_probe_path(path) => probes.insert(ProbeTarget {
                    port,
                    path: Some(path.to_string()),
                }),
                _ if item == value.trim() => {
                    return Err(format!(
                        "{} is not a probe ({INBOUND_PROBES_FORM})",
                        quoted(value)
                    ))
                }
                _ => {
                    return Err(format!(
                        "{} is invalid: {} is not a probe ({INBOUND_PROBES_FORM})",
                        quoted(value),
                        quoted(item)
                    ))
                }
            }
        }
        Ok(probes)
    }
}

impl fmt::Display for InboundProbes {
    /// The canonical form, which [`FromStr`] reads back to the same probes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut item = |f: &mut fmt::Formatter<'_>, target: fmt::Arguments<'_>| {
            if !std::mem::take(&mut first) {
                f.write_str(",")?;
            }
            f.write_fmt(target)
        };
        for (port, open) in &self.0 {
            match open {
                ProbePort::Whole => item(f, format_args!("{port}"))?,
                ProbePort::Paths(paths) => {
                    for path in paths {
                        item(f, format_args!("{port}:{path}"))?;
                    }
                }
            }
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
            err.starts_with("\"mtls\"") && err.contains(INBOUND_MTLS_FORM),
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
            // A ServiceAccount's name is a DNS subdomain, a namespace's a DNS label.
            ("dotted account", "shop/check.out", Some("shop/check.out")),
            ("dotted namespace", "sh.op/checkout", None),
            ("empty label in the account", "shop/check..out", None),
            ("account ending in a dot", "shop/checkout.", None),
            ("no slash", "shop", None),
            ("wildcard namespace", "*/checkout", None),
            ("everything", "*", None),
            ("uppercase", "Shop/checkout", None),
            ("leading dash", "-shop/a", None),
            ("trailing dash", "shop/a-", None),
            ("two slashes", "shop/a/b", None),
            ("empty account", "shop/", None),
            ("empty namespace", "/cart", None),
            ("space inside", "shop/ca rt", None),
            ("spiffe uri", "spiffe://cluster.local/ns/shop/sa/a", None),
        ];
        for (name, value, want) in cases {
            let got = value.parse::<AllowFrom>().map(|list| list.to_string());
            match want {
                Some(rendered) => assert_eq!(got.as_deref(), Ok(*rendered), "case {name}"),
                None => {
                    let err = got.expect_err(name);
                    assert!(
                        err.starts_with(&quoted(value)) && err.contains(ALLOW_FROM_FORM),
                        "case {name}: {err}"
                    );
                }
            }
        }
        let long = format!("{}/a", "n".repeat(63));
        assert!(long.parse::<AllowFrom>().is_ok());
        assert!(format!("n{long}").parse::<AllowFrom>().is_err());
        let label = "a".repeat(63);
        let account = [label.as_str(); 4].join("."); // 255 characters
        assert!(format!("shop/{}", &account[2..])
            .parse::<AllowFrom>()
            .is_ok());
        assert!(format!("shop/{}", &account[1..])
            .parse::<AllowFrom>()
            .is_err());
        // The bad item is named after the whole value.
        let err = "shop/a, Bad/b".parse::<AllowFrom>().unwrap_err();
        assert!(
            err.starts_with("\"shop/a, Bad/b\" is invalid: \"Bad/b\" is not"),
            "{err}"
        );
    }

    #[test]
    fn allow_from_names_namespaces_and_accounts() {
        let list: AllowFrom = "shop/cart, billing/*".parse().unwrap();
        for (identity, allowed) in [
            (Some("spiffe://cluster.local/ns/shop/sa/cart"), true),
            (Some("spiffe://other.domain/ns/shop/sa/cart"), true),
            (Some("spiffe://cluster.local/ns/shop/sa/web"), false),
            (Some("spiffe://cluster.local/ns/billing/sa/anything"), true),
            (Some("spiffe://cluster.local/ns/shopx/sa/cart"), false),
            (Some("spiffe://cluster.local/ns/shop/sa/cart/extra"), false),
            (Some("https://cluster.local/ns/shop/sa/cart"), false),
            (None, false),
        ] {
            assert_eq!(list.allows(identity), allowed, "{identity:?}");
        }
        let anyone: AllowFrom = "".parse().unwrap();
        assert!(anyone.is_anyone() && anyone.allows(None));
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
        assert_eq!(probes.port(443), Some(&ProbePort::Whole));
        assert_eq!(
            probes.port(8080),
            Some(&ProbePort::Paths(vec!["/healthz".into(), "/ready".into()]))
        );
        assert_eq!(probes.port(8081), None);
        assert!(InboundProbes::default().is_empty());
    }

    #[test]
    fn probe_lists() {
        // Name, value, what it renders as (None: refused).
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("a whole port", "9000", Some("9000")),
            ("a path", "8080:/healthz", Some("8080:/healthz")),
            (
                "sorted, spaces and empty items",
                " 9000 , 8080:/ready,,8080:/healthz ",
                Some("8080:/healthz,8080:/ready,9000"),
            ),
            ("the root path", "7000:/", Some("7000:/")),
            ("a whole port covers its paths", "80:/a,80", Some("80")),
            ("empty is none", "", Some("")),
            ("port zero", "0", None),
            ("not a port", "x", None),
            ("port too big", "70000", None),
            ("a plus sign", "+80", None),
            ("a path without /", "8080:healthz", None),
            ("no path after the colon", "8080:", None),
            ("no port before the colon", ":/healthz", None),
            ("a space in the path", "8080:/a b", None),
            ("a query", "8080:/ready?deep=1", None),
            ("a fragment", "8080:/ready#x", None),
            ("a scheme", "http://8080/healthz", None),
        ];
        for (name, value, want) in cases {
            let got = value.parse::<InboundProbes>().map(|p| p.to_string());
            match want {
                Some(rendered) => assert_eq!(got.as_deref(), Ok(*rendered), "case {name}"),
                None => {
                    let err = got.expect_err(name);
                    assert!(
                        err.starts_with(&quoted(value)) && err.contains(INBOUND_PROBES_FORM),
                        "case {name}: {err}"
                    );
                }
            }
        }
        let err = "9000, 8080:healthz".parse::<InboundProbes>().unwrap_err();
        assert!(
            err.starts_with("\"9000, 8080:healthz\" is invalid: \"8080:healthz\" is not"),
            "{err}"
        );
    }

    /// What the injector renders, the proxy parses back to the same value.
    #[test]
    fn every_value_reads_back_as_it_was_shown() {
        for mode in [InboundMtls::Permissive, InboundMtls::Strict] {
            assert_eq!(mode.to_string().parse::<InboundMtls>(), Ok(mode));
        }
        let lists = [
            "",
            "shop/checkout",
            "monitoring/*",
            "shop/checkout,monitoring/*,shop/check.out",
            "a/b,a/*",
        ];
        for text in lists {
            let list: AllowFrom = text.parse().unwrap();
            assert_eq!(list.to_string().parse::<AllowFrom>(), Ok(list), "{text:?}");
        }
        let path = |port, path: &str| ProbeTarget {
            port,
            path: Some(path.to_string()),
        };
        let whole = |port| ProbeTarget { port, path: None };
        let sets: [&[ProbeTarget]; 4] = [
            &[],
            &[whole(1), whole(65535)],
            &[path(8080, "/healthz"), path(8080, "/ready"), whole(9000)],
            &[path(7000, "/"), path(80, "/a:b;c=d"), path(80, "/%2C")],
        ];
        for targets in sets {
            let mut probes = InboundProbes::default();
            for target in targets {
                probes.insert(target.clone());
            }
            assert_eq!(
                probes.to_string().parse::<InboundProbes>(),
                Ok(probes.clone()),
                "{targets:?}"
            );
        }
    }
}
