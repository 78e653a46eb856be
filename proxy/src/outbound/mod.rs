//! Where the pod's own outbound connections and requests go: a [`Destination`] obtained from the
//! original destination. Without a control plane, or for an address that is not a Service's,
//! that is [`Destination::Forward`] to it; for a Service's ClusterIP:port it is
//! [`Destination::Service`], whose requests are balanced over its ready endpoints
//! ([`service`], [`balance`], fed by [`crate::discover`]), or, when routes apply to it, matched
//! against them ([`routes`]) and sent to a backend with the rule's [`filters`] applied.
//!
//! The outbound side's settings are here too: its clients are the pod's own app, and its
//! upstreams are outside the pod.

use std::net::SocketAddr;
use std::sync::Arc;

pub mod balance;
pub mod filters;
pub mod policy;
pub mod retry;
pub mod routes;
pub mod service;

use crate::client::connect::{ConnectParams, Keepalive};
use crate::client::Endpoint;
use crate::discover::{self, AppProtocol};
use crate::metrics::Direction;
use crate::proxy::{Context, Proxy};
use service::{Resolved, ServiceTarget};

/// Where a connection, or each of its requests, goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// To the one endpoint the client connected to, as it would have gone without the proxy.
    /// Only such a destination may have its HTTP/2 relayed frame by frame.
    Forward(Endpoint),
    /// To one of a Service's ready endpoints, chosen per request (per connection for opaque
    /// TCP) by [`ServiceTarget::pick`].
    Service(Arc<ServiceTarget>),
}

impl Destination {
    /// How the Service's port says its traffic is to be carried; `Detect` for a forward.
    pub fn app_protocol(&self) -> AppProtocol {
        match self {
            Self::Forward(_) => AppProtocol::Detect,
            Self::Service(service) => service.service.protocol,
        }
    }
}

/// Where an outbound connection to `original` goes: asked of the control plane when there is
/// one (at most [`discover::FIRST_SNAPSHOT_WAIT`] for a target not seen before), else forward.
pub async fn destination(proxy: &'static Proxy, original: SocketAddr) -> Destination {
    let Some(discovery) = &proxy.discovery else {
        return Destination::Forward(Endpoint::new(original));
    };
    match service::resolve(discovery, original).await {
        Resolved::Service(service) => Destination::Service(Arc::new(service)),
        Resolved::Forward(identity) => Destination::Forward(Endpoint {
            addr: original,
            identity,
        }),
    }
}

/// Drops this worker's state for targets that expired, now and then. Runs on each worker.
pub async fn sweep_forever() {
    let mut tick = tokio::time::interval(discover::IDLE_EXPIRY / 4);
    loop {
        tick.tick().await;
        service::sweep();
    }
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
