//! How the proxy talks to one [`Endpoint`]: dialing it ([`connect`](mod@connect)), idle
//! connections kept for it ([`pool`]), and the upstream side of HTTP/1 ([`h1`], whose worker
//! pool it is) and HTTP/2 ([`h2`]).
//! Nothing here knows the client connection a request came on.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use remora_api::discovery as api;
use tracing::warn;

use crate::identity::Identity;
use crate::io::Io;
use crate::metrics::DirectionMetrics;
use connect::{connect, ConnectParams};

pub mod connect;
pub mod h1;
pub mod h2;
pub mod pool;

/// Drops this worker's expired and closed upstream connections every [`pool::POOL_IDLE`]: idle
/// HTTP/1 connections in its pool, and HTTP/2 connections no stream has used for a while, so
/// idle sockets do not linger. Runs on each worker thread.
pub async fn sweep_forever() {
    let mut tick = tokio::time::interval(pool::POOL_IDLE);
    loop {
        tick.tick().await;
        h1::sweep_pool();
        h2::sweep_shared();
    }
}

/// The error of a body or task that may fail in any of several ways.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One upstream the proxy talks to: its address and, for a meshed pod, the identity it must
/// present (mTLS). Upstream connections are kept and shared per endpoint, so it is the key of
/// [`pool`]: a plaintext and an mTLS connection to one address never stand in for each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `spiffe://…` when the endpoint is a meshed pod: dialled with mTLS, which it must present.
    pub identity: Option<Arc<str>>,
}

impl Endpoint {
    /// An endpoint that is not a meshed pod: plaintext.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            identity: None,
        }
    }

    /// An endpoint that the snapshot names as `identity` ("" for one that is not meshed).
    pub fn meshed(addr: SocketAddr, identity: &str) -> Self {
        Self {
            addr,
            identity: (!identity.is_empty()).then(|| Arc::from(identity)),
        }
    }

    /// A snapshot's endpoints, sorted by address, each with the identity it must present when
    /// it is a meshed pod; one that does not parse is skipped (logged, naming `target`).
    pub fn from_snapshot(list: &[api::Endpoint], target: SocketAddr) -> Vec<Self> {
        let mut addrs: Vec<Endpoint> = list
            .iter()
            .filter_map(|endpoint| {
                let ip = endpoint.ip.parse::<IpAddr>().ok();
                let port = u16::try_from(endpoint.port).ok().filter(|port| *port != 0);
                match (ip, port) {
                    (Some(ip), Some(port)) => Some(Endpoint::meshed(
                        SocketAddr::new(ip, port),
                        &endpoint.identity,
                    )),
                    _ => {
                        warn!(destination = %target, ip = %endpoint.ip, port = endpoint.port, "endpoint skipped: not an IP and port");
                        None
                    }
                }
            })
            .collect();
        addrs.sort_by(|a, b| (a.addr, &a.identity).cmp(&(b.addr, &b.identity)));
        addrs.dedup_by(|a, b| a.addr == b.addr);
        addrs
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// How a connection's upstreams are dialed, with which credentials, and the counter a failed
/// dial adds to.
#[derive(Debug, Clone, Copy)]
pub struct Dialer {
    pub params: ConnectParams,
    pub errors: &'static Counter,
    /// The workload's credentials, for an endpoint that is a meshed pod.
    pub identity: &'static Identity,
    /// Where dials are counted, by TLS.
    pub metrics: &'static DirectionMetrics,
}

impl Dialer {
    /// A new connection to `endpoint`: mTLS when it is a meshed pod and this proxy has
    /// credentials, else plaintext. A failure, the TLS handshake's included (a peer with the
    /// wrong identity or from another CA), is a failure to connect, and counted.
    pub async fn dial(&self, endpoint: &Endpoint) -> Result<Io, Failure> {
        match self.connect(endpoint).await {
            Ok(io) => Ok(io),
            Err(error) => {
                self.errors.inc();
                Err(Failure::Connect(error))
            }
        }
    }

    async fn connect(&self, endpoint: &Endpoint) -> std::io::Result<Io> {
        let Some(identity) = &endpoint.identity else {
            let io = Io::Plain(connect(endpoint.addr, self.params).await?);
            self.metrics.dials_plain.inc();
            return Ok(io);
        };
        let Some(credentials) = self.identity.current() else {
            plaintext_to_meshed(endpoint);
            let io = Io::Plain(connect(endpoint.addr, self.params).await?);
            self.metrics.dials_plain.inc();
            self.metrics.plaintext_to_meshed.inc();
            return Ok(io);
        };
        // The handshake is part of the connect, and within its timeout.
        let limit = self.params.timeout;
        let dial = async {
            let tcp = connect(endpoint.addr, self.params).await?;
            crate::tls::connect(tcp, endpoint.addr, &credentials, identity).await
        };
        match tokio::time::timeout(limit, dial).await {
            Ok(result) => {
                if result.is_ok() {
                    self.metrics.dials_tls.inc();
                }
                result
            }
            Err(_elapsed) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TLS handshake within {limit:?}"),
            )),
        }
    }
}

/// Logs, once per endpoint, that a meshed pod is reached in plaintext: this proxy has no
/// certificate yet (SPEC: plaintext, logged and counted; a strict peer refuses it).
#[cold]
fn plaintext_to_meshed(endpoint: &Endpoint) {
    static SEEN: Mutex<Vec<Endpoint>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    if seen.contains(endpoint) || seen.len() >= 1024 {
        return;
    }
    seen.push(endpoint.clone());
    let identity = endpoint.identity.as_deref().unwrap_or_default();
    warn!(%endpoint, identity, "no workload certificate yet: a meshed endpoint is reached in plaintext");
}

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("{}", with_causes(.0))]
    Upstream(hyper::Error),
    #[error("{}", with_causes(.0))]
    H2(::h2::Error),
    #[error("{0}")]
    Http1(h1::Error),
    /// A Service with no ready endpoint.
    #[error("no ready endpoint")]
    NoEndpoint,
    /// A route's request or backend request timeout fired before the response head came.
    #[error("timed out waiting for the response")]
    Timeout,
}

impl Failure {
    /// A request the client got wrong (its body, its framing), which no upstream could answer.
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::Http1(error) if error.is_client_error())
    }
}

/// `error` and what caused it: hyper's own text (`http2 error`) names only the layer.
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let texts: Vec<String> = anyhow::Chain::new(error).map(ToString::to_string).collect();
    texts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_carry_the_identity_of_meshed_pods() {
        let target: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";
        let list = [
            api::Endpoint {
                ip: "198.18.0.2".into(),
                port: 8080,
                identity: cart.into(),
                ..Default::default()
            },
            api::Endpoint {
                ip: "2001:2::1".into(),
                port: 8080,
                ..Default::default()
            },
        ];
        let v4: SocketAddr = "198.18.0.2:8080".parse().unwrap();
        let v6: SocketAddr = "[2001:2::1]:8080".parse().unwrap();
        assert_eq!(
            Endpoint::from_snapshot(&list, target),
            [Endpoint::meshed(v4, cart), Endpoint::new(v6)]
        );
        assert_eq!(Endpoint::meshed(v6, "").identity, None);
    }

    #[test]
    fn endpoints_that_do_not_parse_are_skipped() {
        let list = [
            api::Endpoint {
                ip: "198.18.0.3".into(),
                port: 80,
                ..Default::default()
            },
            api::Endpoint {
                ip: "nope".into(),
                port: 80,
                ..Default::default()
            },
            api::Endpoint {
                ip: "198.18.0.2".into(),
                port: 70000,
                ..Default::default()
            },
            api::Endpoint {
                ip: "2001:2::5".into(),
                port: 80,
                ..Default::default()
            },
            api::Endpoint {
                ip: "198.18.0.2".into(),
                port: 80,
                ..Default::default()
            },
        ];
        let target = "198.18.0.100:80".parse().unwrap();
        let addrs: Vec<String> = Endpoint::from_snapshot(&list, target)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addrs, ["198.18.0.2:80", "198.18.0.3:80", "[2001:2::5]:80"]);
    }
}
