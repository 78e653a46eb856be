//! Opaque TCP: bytes copied both ways until each side has closed, half-closes preserved.

use std::io;
use std::net::SocketAddr;

use tracing::{debug, warn};

use super::ClientIo;
use crate::client::connect::reset;
use crate::client::{Endpoint, Failure};
use crate::io::Io;
use crate::metrics::CountingIo;
use crate::outbound::balance::Pick;
use crate::outbound::service::NoEndpoint;
use crate::outbound::Destination;
use crate::proxy::Context;

/// Carries `client`'s bytes, the connection to `target`, to where `destination` says.
pub async fn forward(
    client: ClientIo,
    target: SocketAddr,
    destination: &Destination,
    cx: &Context,
) {
    // Held while the connection is open: a Service endpoint's open connections are its load.
    let (upstream, _pick) = match dial(target, destination, cx).await {
        Ok(upstream) => upstream,
        Err(error) => {
            warn!(direction = cx.direction(), destination = %target, %error, "no upstream; resetting the client");
            reset(client.into_inner().into_tcp());
            return;
        }
    };
    let mut client = CountingIo::new(client, cx.metrics);
    let mut upstream = upstream;
    // copy_bidirectional shuts down each write side when the other side's read ends, which is
    // exactly TCP half-close.
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        debug!(direction = cx.direction(), destination = %target, %error, "opaque connection ended with an error; resetting both sides");
        reset(client.into_inner().into_inner().into_tcp());
        reset(upstream.into_tcp());
    }
}

/// The upstream connection: to the original destination, or to the Service endpoint with the
/// fewest open connections, moving on to the next when a connect fails (nothing was sent yet).
async fn dial(
    target: SocketAddr,
    destination: &Destination,
    cx: &Context,
) -> io::Result<(Io, Option<Pick>)> {
    let dialer = cx.dialer();
    let dial = |endpoint: Endpoint| async move {
        match dialer.dial(&endpoint).await {
            Ok(upstream) => Ok(upstream),
            Err(Failure::Connect(error)) => Err(error),
            Err(failure) => Err(io::Error::other(failure.to_string())),
        }
    };
    let service = match destination {
        Destination::Forward(endpoint) => return Ok((dial(endpoint.clone()).await?, None)),
        Destination::Service(service) => service,
    };
    let mut tried = Vec::new();
    let mut last_error = None;
    loop {
        let pick = match service.pick(&tried, true) {
            Ok(pick) => pick,
            Err(NoEndpoint::NoneReady) => {
                cx.metrics.connect_errors.inc();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{}: no ready endpoint", service.name()),
                ));
            }
            Err(NoEndpoint::AllFailed) => {
                return Err(last_error.unwrap_or_else(|| io::Error::other("every endpoint failed")))
            }
        };
        match dial(pick.endpoint()).await {
            Ok(upstream) => return Ok((upstream, Some(pick))),
            Err(error) => {
                debug!(direction = cx.direction(), destination = %target, endpoint = %pick.addr(), %error, "endpoint refused; trying another");
                tried.push(pick.addr());
                pick.failed();
                last_error = Some(error);
            }
        }
    }
}
