//! Where connections from outside the pod go: the pod's own app, at the original destination,
//! unless that is loopback. The inbound side's settings are here too: its clients may be anyone
//! outside the pod, its upstream is the pod's own app, its HTTP requests may be rate limited,
//! and who may come in ([`crate::inbound_mtls`]: `--inbound-mtls`, `--allow-from`,
//! `--inbound-probes`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::client::connect::{ConnectParams, Keepalive};
use crate::client::Endpoint;
use crate::inbound_mtls::Plaintext;
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

#[cfg(test)]
mod tests {
    use super::*;

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
