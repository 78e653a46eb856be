//! Opaque TCP: bytes copied both ways until each side has closed, half-closes preserved.

use std::net::SocketAddr;

use tracing::{debug, warn};

use super::ClientIo;
use crate::client::connect::{connect, reset};
use crate::metrics::CountingIo;
use crate::outbound::Destination;
use crate::proxy::Context;

/// Carries `client`'s bytes, the connection to `target`, to where `destination` says.
pub async fn forward(
    client: ClientIo,
    target: SocketAddr,
    destination: &Destination,
    cx: &Context,
) {
    let endpoint = destination.pick();
    let upstream = match connect(endpoint.addr, cx.connect_params).await {
        Ok(upstream) => upstream,
        Err(error) => {
            cx.metrics.connect_errors.inc();
            warn!(direction = cx.direction(), destination = %target, %error, "connect failed; resetting the client");
            reset(client.into_inner());
            return;
        }
    };
    let mut client = CountingIo::new(client, cx.metrics);
    let mut upstream = upstream;
    // copy_bidirectional shuts down each write side when the other side's read ends, which is
    // exactly TCP half-close.
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        debug!(direction = cx.direction(), destination = %target, %error, "opaque connection ended with an error; resetting both sides");
        reset(client.into_inner().into_inner());
        reset(upstream);
    }
}
