//! What the whole proxy and each connection share: the process-wide [`Proxy`], a connection's
//! [`Context`], and the types passed between the stages; nothing here knows a protocol.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use remora_init::PortList;
use tokio::net::TcpStream;

use crate::client::connect::{ConnectParams, Keepalive};
use crate::client::Dialer;
use crate::detect::{Rewound, ServerFirst};
use crate::drain::{Drain, Guard};
use crate::metrics::{Direction, DirectionMetrics, Metrics};
use crate::workers::{Assigned, Workers};

pub use crate::client::BoxError;

/// An accepted client connection, holding the first bytes that detection read.
pub type ClientIo = Rewound<TcpStream>;

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
}

/// One connection's direction and the handles it updates.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub proxy: &'static Proxy,
    pub metrics: &'static DirectionMetrics,
    pub server_first: &'static ServerFirst,
}

impl Context {
    pub fn new(proxy: &'static Proxy, direction: Direction) -> Self {
        let [inbound, outbound] = &proxy.server_first;
        Self {
            proxy,
            metrics: proxy.metrics.direction(direction),
            server_first: match direction {
                Direction::Inbound => inbound,
                Direction::Outbound => outbound,
            },
        }
    }

    pub fn direction(&self) -> &'static str {
        self.metrics.direction.as_str()
    }

    /// How this connection's upstream is dialed: an outbound destination is outside the pod, so
    /// its socket gets the dead-peer detection; an inbound one is the pod's own app.
    pub fn connect_params(&self) -> ConnectParams {
        ConnectParams {
            timeout: self.proxy.connect_timeout,
            keepalive: match self.metrics.direction {
                Direction::Outbound => self.proxy.keepalive,
                Direction::Inbound => None,
            },
        }
    }

    /// Dials as [`Self::connect_params`] say, counting failed dials in this direction.
    pub fn dialer(&self) -> Dialer {
        Dialer {
            params: self.connect_params(),
            errors: &self.metrics.connect_errors,
        }
    }
}

/// A connection on its way to another worker.
pub type Handoff = (std::net::TcpStream, Accepted);

/// An accepted connection's peer and context, and what it holds while it is served: its
/// place in the drain and in its worker's count.
pub struct Accepted {
    pub peer: SocketAddr,
    pub cx: Context,
    /// Held, not read: the drain waits for it.
    pub guard: Guard,
    /// Held, not read: counts the connection against its worker.
    pub placed: Assigned,
}
