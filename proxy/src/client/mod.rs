//! How the proxy talks to one [`Endpoint`]: dialing it ([`connect`](mod@connect)), this
//! worker's idle HTTP/1 connections to it ([`pool`]), and the upstream side of HTTP/1 ([`h1`])
//! and HTTP/2 ([`h2`]).
//! Nothing here knows the client connection a request came on.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use tracing::warn;

use crate::identity::Identity;
use crate::io::Io;
use crate::metrics::DirectionMetrics;
use connect::{connect, ConnectParams};

pub mod connect;
pub mod h1;
pub mod h2;
pub mod pool;

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
