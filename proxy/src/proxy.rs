//! What the whole proxy and each connection share: the process-wide [`Proxy`], a connection's
//! [`Context`], and the types passed between the stages; nothing here knows a protocol.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use remora_init::PortList;

use crate::client::connect::{ConnectParams, Keepalive};
use crate::client::Dialer;
use crate::discover::Discovery;
use crate::identity::Identity;
use crate::metrics::{Direction, DirectionMetrics, Metrics, PeerMetrics};
use crate::rate_limit::RateLimit;
use crate::runtime::drain::Drain;
use crate::runtime::listen::{self, Listening};
use crate::runtime::workers::Workers;
use crate::server_first::ServerFirst;

pub use crate::client::BoxError;

/// What every connection shares; lives for the whole process.
#[derive(Debug)]
pub struct Proxy {
    pub connect_timeout: Duration,
    /// Dead-peer detection for sockets whose peer is outside the pod; `None` when off.
    pub keepalive: Option<Keepalive>,
    pub opaque_ports: PortList,
    /// The outbound and inbound listener ports: a destination on one of them is a loop.
    pub proxy_ports: [u16; 2],
    pub access_log: bool,
    /// Prior-knowledge HTTP/2 is relayed frame by frame (`--h2-mode relay`).
    pub h2_relay: bool,
    pub metrics: Metrics,
    /// Destinations whose clients sent nothing first, inbound then outbound (see [`Context`]).
    pub server_first: [ServerFirst; 2],
    pub drain: Drain,
    /// Spreads connections over the worker threads.
    pub workers: Workers<Handoff>,
    /// Set once every required listener is bound.
    pub ready: AtomicBool,
    /// The control plane's client (`--control`); `None` forwards every connection as it came.
    pub discovery: Option<Discovery>,
    /// `--inbound-rate-limit`; `None` lets every inbound request in.
    pub inbound_rate_limit: Option<RateLimit>,
    /// The workload certificate, once remora-control has signed one.
    pub identity: Identity,
    /// Who may come in: `--inbound-mtls`, `--allow-from`, `--inbound-probes`.
    pub inbound_mtls: crate::inbound_mtls::Mtls,
}

/// One connection's direction, the handles it updates, and how its direction dials and serves
/// (made by `inbound::context` and `outbound::context`).
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub proxy: &'static Proxy,
    pub metrics: &'static DirectionMetrics,
    /// The client's connection and request counts: plaintext, or its mTLS identity's.
    pub peer: &'static PeerMetrics,
    pub server_first: &'static ServerFirst,
    /// How this direction's upstreams are dialed.
    pub connect_params: ConnectParams,
    /// Whether a client's request head must come within hyper's header read timeout.
    pub header_read_timeout: bool,
}

impl Context {
    pub fn new(
        proxy: &'static Proxy,
        direction: Direction,
        connect_params: ConnectParams,
        header_read_timeout: bool,
    ) -> Self {
        let [inbound, outbound] = &proxy.server_first;
        let metrics = proxy.metrics.direction(direction);
        Self {
            proxy,
            metrics,
            peer: &metrics.plain,
            server_first: match direction {
                Direction::Inbound => inbound,
                Direction::Outbound => outbound,
            },
            connect_params,
            header_read_timeout,
        }
    }

    pub fn direction(&self) -> &'static str {
        self.metrics.direction.as_str()
    }

    /// Dials as [`Self::connect_params`] say, counting failed dials in this direction.
    pub fn dialer(&self) -> Dialer {
        Dialer {
            params: self.connect_params,
            errors: &self.metrics.connect_errors,
            identity: &self.proxy.identity,
            metrics: self.metrics,
        }
    }
}

/// A connection on its way to another worker.
pub type Handoff = listen::Handoff<Context>;

/// An accepted connection's peer and context, and what it holds while it is served.
pub type Accepted = listen::Accepted<Context>;

impl Listening for Context {
    fn drain(&self) -> &'static Drain {
        &self.proxy.drain
    }

    fn workers(&self) -> &'static Workers<Handoff> {
        &self.proxy.workers
    }

    fn direction(&self) -> &'static str {
        Context::direction(self)
    }
}
