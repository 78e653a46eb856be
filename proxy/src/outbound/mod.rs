//! Where the pod's own outbound connections and requests go: a [`Destination`] obtained from the
//! original destination. Today every destination is [`Destination::Forward`] to it.
//!
//! The outbound side's settings are here too: its clients are the pod's own app, and its
//! upstreams are outside the pod.

use std::net::SocketAddr;

pub mod balance;
pub mod discover;
pub mod service;

use crate::client::connect::{ConnectParams, Keepalive};
use crate::client::Endpoint;
use crate::metrics::Direction;
use crate::proxy::{Context, Proxy};

/// Where a connection, or each of its requests, goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// To the one endpoint the client connected to, as it would have gone without the proxy.
    /// Only such a destination may have its HTTP/2 relayed frame by frame.
    Forward(Endpoint),
}

impl Destination {
    /// The endpoint the next request (or a connection's bytes) goes to: the one place where an
    /// upstream is chosen.
    pub fn pick(&self) -> &Endpoint {
        match self {
            Self::Forward(endpoint) => endpoint,
        }
    }
}

/// Where an outbound connection to `original` goes.
pub fn destination(original: SocketAddr) -> Destination {
    Destination::Forward(Endpoint::new(original))
}

/// The context of an outbound connection. Its upstream is outside the pod, so its socket gets the
/// dead-peer detection. Its client is the pod's own app, which has no reason to trickle headers:
/// no header read timeout, which would arm a timer for every request.
pub fn context(proxy: &'static Proxy) -> Context {
    let connect = ConnectParams {
        timeout: proxy.connect_timeout,
        keepalive: proxy.keepalive,
    };
    Context::new(proxy, Direction::Outbound, connect, false)
}

/// The dead-peer detection on the outbound listeners' accepted sockets: none, their clients are
/// the pod's own app, whose end a crash still closes.
pub fn listener_keepalive(_proxy: &Proxy) -> Option<Keepalive> {
    None
}
