//! Where connections from outside the pod go: the pod's own app, at the original destination,
//! unless that is loopback. The inbound side's settings are here too: its clients may be anyone
//! outside the pod, its upstream is the pod's own app, its HTTP requests may be rate limited,
//! and who may come in ([`Mtls`]: `--inbound-mtls`, `--allow-from`, `--inbound-probes`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use crate::client::connect::{ConnectParams, Keepalive};
use crate::client::Endpoint;
use crate::metrics::Direction;
use crate::outbound::Destination;
use crate::proxy::{Context, Proxy};
use crate::rate_limit::{ClientLimit, RateLimit};

/// An inbound connection to loopback, refused.
#[derive(Debug, thiserror::Error)]
#[error("inbound to loopback {0} (an app bound to loopback stays private)")]
pub struct Loopback(pub SocketAddr);

/// Where an inbound connection to `original` goes, or why it is refused: an app bound to
/// loopback stays private.
pub fn destination(original: SocketAddr) -> Result<Destination, Loopback> {
    if original.ip().is_loopback() {
        return Err(Loopback(original));
    }
    Ok(Destination::Forward(Endpoint::new(original)))
}

/// The context of an inbound connection. Its upstream is the pod's own app: no dead-peer
/// detection. Its client may be anyone, so a request head must come within hyper's header read
/// timeout.
pub fn context(proxy: &'static Proxy) -> Context {
    let connect = ConnectParams {
        timeout: proxy.connect_timeout,
        keepalive: None,
    };
    Context::new(proxy, Direction::Inbound, connect, true)
}

/// The dead-peer detection on the inbound listeners' accepted sockets: their clients are outside
/// the pod (set on the listener, which its accepted sockets inherit).
pub fn listener_keepalive(proxy: &Proxy) -> Option<Keepalive> {
    proxy.keepalive
}

/// `--inbound-rate-limit`, for an inbound connection; `None` for an outbound one or without it.
pub fn rate_limit(cx: &Context) -> Option<&'static RateLimit> {
    match cx.metrics.direction {
        Direction::Inbound => cx.proxy.inbound_rate_limit.as_ref(),
        Direction::Outbound => None,
    }
}

/// The limit an inbound connection's requests are held to, if any. `client` gives the client's
/// address, asked for only when the limit is per client; one that cannot be had counts as one
/// unknown client.
pub fn client_limit(cx: &Context, client: impl FnOnce() -> Option<IpAddr>) -> Option<ClientLimit> {
    let limit = rate_limit(cx)?;
    let client = if limit.per_client() {
        client().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    Some(ClientLimit::new(limit, client))
}

/// The paths a plaintext HTTP/1 connection to `target` may ask for, when only the pod's probes
/// may use it in plaintext; `None` for any other connection.
pub fn probe_paths(cx: &Context, target: SocketAddr, tls: bool) -> Option<&'static [String]> {
    if tls || cx.metrics.direction != Direction::Inbound {
        return None;
    }
    match cx.proxy.inbound_mtls.plaintext(target.port()) {
        Plaintext::Paths(paths) => Some(paths),
        _ => None,
    }
}

/// `--inbound-mtls`: whether plaintext clients are let in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MtlsMode {
    /// mTLS and plaintext both accepted.
    #[default]
    Permissive,
    /// Plaintext refused (a TCP reset), except the pod's own probes (`--inbound-probes`); the
    /// admin port is never redirected, so it is not refused either.
    Strict,
}

/// Who may come in: `--inbound-mtls`, `--allow-from` and `--inbound-probes` together.
#[derive(Debug, Clone, Default)]
pub struct Mtls {
    pub mode: MtlsMode,
    pub allow_from: AllowFrom,
    pub probes: Probes,
}

/// What becomes of an inbound connection that is not mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plaintext<'a> {
    /// Served as before.
    Allowed,
    /// Only HTTP/1 requests for these paths (the pod's httpGet probes on that port); other
    /// requests get 403, other protocols a reset.
    Paths(&'a [String]),
    /// Strict mode: reset.
    Refused,
    /// `--allow-from` names identities and a plaintext client has none: 403 for HTTP, a reset
    /// for TCP, as for an mTLS client it does not name.
    Denied,
}

impl Mtls {
    /// What a plaintext connection to `port` gets. The pod's probes are let through whatever
    /// the mode; an `--allow-from` list, which a client without an identity cannot be on,
    /// keeps other plaintext out even when permissive.
    pub fn plaintext(&self, port: u16) -> Plaintext<'_> {
        if self.mode == MtlsMode::Permissive && self.allow_from.is_anyone() {
            return Plaintext::Allowed;
        }
        if self.probes.ports.contains(&port) {
            return Plaintext::Allowed;
        }
        if let Some((_, paths)) = self.probes.paths.iter().find(|(p, _)| *p == port) {
            return Plaintext::Paths(paths);
        }
        match self.mode {
            MtlsMode::Strict => Plaintext::Refused,
            MtlsMode::Permissive => Plaintext::Denied,
        }
    }
}

/// `--allow-from`: comma-separated `ns/sa` or `ns/*`; empty lets anyone in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowFrom(Vec<(String, Option<String>)>);

impl AllowFrom {
    pub fn is_anyone(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a client with `identity` (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; `None`
    /// for a plaintext client) may come in.
    pub fn allows(&self, identity: Option<&str>) -> bool {
        if self.is_anyone() {
            return true;
        }
        let Some((namespace, account)) = identity.and_then(namespace_and_account) else {
            return false;
        };
        self.0
            .iter()
            .any(|(ns, sa)| ns == namespace && sa.as_deref().is_none_or(|sa| sa == account))
    }
}

/// The namespace and ServiceAccount of a SPIFFE identity of remora's form; the trust anchors
/// already vouched for its trust domain.
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

impl FromStr for AllowFrom {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let mut list = Vec::new();
        for item in value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let bad =
                || format!("{item:?} is not ns/sa or ns/* (expected e.g. shop/cart,billing/*)");
            let (ns, sa) = item.split_once('/').ok_or_else(bad)?;
            let name = |s: &str| {
                !s.is_empty()
                    && s.len() <= 253
                    && s.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
                    })
            };
            if !name(ns) || !(sa == "*" || name(sa)) {
                return Err(bad());
            }
            list.push((ns.to_owned(), (sa != "*").then(|| sa.to_owned())));
        }
        Ok(Self(list))
    }
}

impl fmt::Display for AllowFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (ns, sa)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{ns}/{}", sa.as_deref().unwrap_or("*"))?;
        }
        Ok(())
    }
}

/// `--inbound-probes`: the pod's own kubelet probes, which stay plaintext in strict mode:
/// `PORT` (the whole port) or `PORT:/path` (that path on that port), comma-separated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probes {
    ports: Vec<u16>,
    paths: Vec<(u16, Vec<String>)>,
}

impl FromStr for Probes {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let mut probes = Self::default();
        for item in value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let bad =
                || format!("{item:?} is not PORT or PORT:/path (expected e.g. 8080:/healthz,9000)");
            let (port, path) = match item.split_once(':') {
                Some((port, path)) => (port, Some(path)),
                None => (item, None),
            };
            let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
            match path {
                None => probes.ports.push(port),
                Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                    match probes.paths.iter_mut().find(|(p, _)| *p == port) {
                        Some((_, paths)) => paths.push(path.to_owned()),
                        None => probes.paths.push((port, vec![path.to_owned()])),
                    }
                }
                Some(_) => return Err(bad()),
            }
        }
        Ok(probes)
    }
}

/// Whether `path` (a request target, query included) is one of `probes`: compared without the
/// query, as kubelet sends the path the pod spec names.
pub fn is_probe_path(probes: &[String], path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    probes
        .iter()
        .any(|probe| probe.split('?').next() == Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_from_names_namespaces_and_accounts() {
        let list: AllowFrom = "shop/cart, billing/*".parse().unwrap();
        assert_eq!(list.to_string(), "shop/cart,billing/*");
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
        for bad in [
            "shop",
            "shop/",
            "/cart",
            "Shop/cart",
            "shop/ca rt",
            "*/cart",
        ] {
            let error = bad.parse::<AllowFrom>().unwrap_err();
            assert!(error.contains("ns/sa"), "{bad}: {error}");
        }
    }

    #[test]
    fn plaintext_is_let_in_as_the_mode_and_probes_say() {
        let mtls = |mode, allow: &str, probes: &str| Mtls {
            mode,
            allow_from: allow.parse().unwrap(),
            probes: probes.parse().unwrap(),
        };
        let probes = "8080:/healthz,8080:/ready,9000";
        let permissive = mtls(MtlsMode::Permissive, "", probes);
        assert_eq!(permissive.plaintext(80), Plaintext::Allowed);
        let strict = mtls(MtlsMode::Strict, "", probes);
        assert_eq!(strict.plaintext(80), Plaintext::Refused);
        assert_eq!(strict.plaintext(9000), Plaintext::Allowed);
        let paths = ["/healthz".to_owned(), "/ready".to_owned()];
        assert_eq!(strict.plaintext(8080), Plaintext::Paths(&paths));
        let named = mtls(MtlsMode::Permissive, "shop/*", probes);
        assert_eq!(named.plaintext(80), Plaintext::Denied);
        assert_eq!(named.plaintext(9000), Plaintext::Allowed);
        assert!(is_probe_path(&paths, "/ready?verbose=1"));
        assert!(!is_probe_path(&paths, "/readyz"));
        for bad in ["0", "x", "8080:healthz", "8080:", "70000"] {
            let error = bad.parse::<Probes>().unwrap_err();
            assert!(error.contains("PORT"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_app_is_reached_unless_it_is_bound_to_loopback() {
        for (original, ok) in [
            ("198.18.0.1:8080", true),
            ("[2001:2::1]:8080", true),
            ("127.0.0.1:8080", false),
            ("[::1]:8080", false),
        ] {
            let result = destination(original.parse().unwrap());
            assert_eq!(result.is_ok(), ok, "{original}: {result:?}");
        }
    }

    #[test]
    fn only_inbound_requests_are_held_to_the_limit_and_the_address_asked_only_per_client() {
        use crate::rate_limit::RateLimit;
        let with = |setting: &str| {
            let limit = RateLimit::new(setting.parse().unwrap(), Default::default());
            crate::http_tests::proxy_with(|proxy| proxy.inbound_rate_limit = Some(limit))
        };
        let client: IpAddr = "198.18.0.2".parse().unwrap();

        let proxy = with("1/s");
        assert!(rate_limit(&crate::outbound::context(proxy)).is_none());
        let asked = std::cell::Cell::new(false);
        let limit = client_limit(&context(proxy), || {
            asked.set(true);
            Some(client)
        })
        .expect("inbound is limited");
        assert!(!asked.get(), "the address is not needed for a total limit");
        assert!(limit.check().is_ok());
        assert!(limit.check().is_err());

        let proxy = with("10/s,1/s per-client");
        let limit = client_limit(&context(proxy), || Some(client)).unwrap();
        let other = client_limit(&context(proxy), || Some("198.18.0.3".parse().unwrap())).unwrap();
        assert!(limit.check().is_ok());
        assert!(limit.check().is_err());
        assert!(other.check().is_ok(), "another client has its own share");

        assert!(client_limit(&context(crate::http_tests::new_proxy()), || None).is_none());
    }
}
