//! How the proxy talks to one [`Endpoint`]: dialing it ([`connect`](mod@connect)), this
//! worker's idle HTTP/1 connections to it ([`pool`]), and the upstream side of HTTP/1 ([`h1`])
//! and HTTP/2 ([`h2`]).
//! Nothing here knows the client connection a request came on.

use std::fmt;
use std::net::SocketAddr;

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use connect::{connect, ConnectParams};

pub mod connect;
pub mod h1;
pub mod h2;
pub mod pool;

/// The error of a body or task that may fail in any of several ways.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One upstream the proxy talks to: its address (later also the TLS identity it must present).
/// Upstream connections are kept and shared per endpoint, so it is the key of [`pool`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// How a connection's upstreams are dialed, and the counter a failed dial adds to.
#[derive(Debug, Clone, Copy)]
pub struct Dialer {
    pub params: ConnectParams,
    pub errors: &'static Counter,
}

impl Dialer {
    /// A new connection to `endpoint`; a failure is counted.
    pub async fn dial(&self, endpoint: &Endpoint) -> Result<TcpStream, Failure> {
        match connect(endpoint.addr, self.params).await {
            Ok(stream) => Ok(stream),
            Err(error) => {
                self.errors.inc();
                Err(Failure::Connect(error))
            }
        }
    }
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
