//! The client's side of one connection: where it was going, which protocol it speaks, where it
//! goes ([`Destination`], from [`crate::outbound`] or [`crate::inbound`]), and the path that
//! carries it: [`opaque`] bytes, [`http`] (HTTP/1, and HTTP/2 terminated), or the HTTP/2
//! [`h2_relay`], only for a [`Destination::Forward`].

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use remora_init::mtls::InboundMtls;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::client::connect::reset;
use crate::client::Failure;
use crate::discover::AppProtocol;
use crate::inbound_mtls::Plaintext;
use crate::io::Io;
use crate::metrics::{Direction, DirectionMetrics};
use crate::outbound::Destination;
use crate::proxy::{Accepted, Context, Handoff};
use crate::tls::{self, Hello};
use crate::{inbound, outbound};
use detect::{detect_unless_known, DecidedBy, Detected, Rewound};

pub mod detect;
pub mod h2_relay;
pub mod hpack;
pub mod http;
pub mod opaque;
pub mod orig_dst;

/// An accepted client connection (plaintext, or mTLS terminated), holding the first bytes that
/// detection read.
pub type ClientIo = Rewound<Io>;

/// Registers an accepted connection with this worker's reactor and serves it here.
pub fn start((stream, accepted): Handoff) {
    match TcpStream::from_std(stream) {
        Ok(stream) => drop(tokio::spawn(connection(stream, accepted))),
        Err(error) => {
            let (direction, peer) = (accepted.cx.direction(), accepted.peer);
            warn!(direction, %peer, %error, "cannot register an accepted connection");
        }
    }
}

/// Decrements the open-connections gauge however the connection ends.
struct Open(&'static DirectionMetrics);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

/// Serves one connection: its original destination, its protocol, where it goes, then the path
/// for that protocol. `accepted` holds its place in the drain and its worker's count until this
/// returns.
async fn connection(stream: TcpStream, accepted: Accepted) {
    let (peer, cx) = (accepted.peer, accepted.cx);
    // An inbound connection is counted once it is known whether its client came over mTLS.
    let inbound = cx.metrics.direction == Direction::Inbound;
    if !inbound {
        cx.peer.connections.inc();
    }
    cx.metrics.open.inc();
    let _open = Open(cx.metrics);
    let refuse = |stream: TcpStream, refused: &dyn std::fmt::Display| {
        if inbound {
            cx.peer.connections.inc();
        }
        warn!(direction = cx.direction(), %peer, reason = %refused, "connection refused");
        reset(stream);
    };
    let target = match orig_dst::target(&stream, &cx.proxy.proxy_ports) {
        Ok(target) => target,
        Err(refused) => return refuse(stream, &refused),
    };
    let destination = match cx.metrics.direction {
        Direction::Outbound => outbound::destination(cx.proxy, target).await,
        Direction::Inbound => match inbound::destination(target) {
            Ok(destination) => return inbound_connection(stream, target, destination, cx).await,
            Err(refused) => return refuse(stream, &refused),
        },
    };
    // A Service port's appProtocol, where there is one, says what the port carries, ahead of
    // --opaque-ports (which guesses by port number alone) and without detection's wait.
    let detected = match destination.app_protocol() {
        AppProtocol::Opaque => Ok((Detected::Opaque, Bytes::new())),
        AppProtocol::Http => detect::detect_client_first(&stream).await,
        AppProtocol::Detect if cx.proxy.opaque_ports.contains(target.port()) => {
            Ok((Detected::Opaque, Bytes::new()))
        }
        AppProtocol::Detect => detect_remembering(&stream, target, &cx).await,
    };
    let (protocol, first) = match detected {
        Ok(detected) => detected,
        Err(error) => {
            debug!(direction = cx.direction(), %peer, %error, "client gone during detection");
            return;
        }
    };
    debug!(direction = cx.direction(), %peer, destination = %target, ?protocol, "connection");
    let stream = Rewound::new(Io::Plain(stream), first);
    // As `carry` does, written out: one future less around every outbound connection.
    match protocol {
        Detected::Opaque => opaque::forward(stream, target, &destination, &cx).await,
        Detected::Http1 => http::serve_http1(stream, target, destination, cx).await,
        Detected::H2 => serve_h2(stream, target, destination, cx).await,
    }
}

/// Carries a client connection whose protocol is known to its destination.
pub(crate) async fn carry(
    stream: ClientIo,
    protocol: Detected,
    target: SocketAddr,
    destination: Destination,
    cx: Context,
) {
    match protocol {
        Detected::Opaque => opaque::forward(stream, target, &destination, &cx).await,
        Detected::Http1 => http::serve_http1(stream, target, destination, cx).await,
        Detected::H2 => serve_h2(stream, target, destination, cx).await,
    }
}

/// Serves an inbound connection: mTLS from another meshed proxy (a ClientHello offering ALPN
/// `remora/1`) is terminated, its client identified and held to `--allow-from`, and what it
/// carries goes on to the app in plaintext; anything else goes on as it came, unless
/// `--inbound-mtls strict` or `--allow-from` keeps plaintext out (see [`crate::inbound_mtls::Mtls`]).
///
/// The first bytes are read even on an opaque port, where a meshed client's ClientHello must be
/// seen; without credentials in permissive mode nothing can be terminated, and such a port is
/// carried at once as before. In strict mode a silent client is never remembered as
/// server-first: a meshed client always speaks first, and a plaintext one is refused.
pub(crate) async fn inbound_connection(
    stream: TcpStream,
    target: SocketAddr,
    destination: Destination,
    cx: Context,
) {
    let mtls = &cx.proxy.inbound_mtls;
    let strict = mtls.mode == InboundMtls::Strict;
    let opaque_port = cx.proxy.opaque_ports.contains(target.port());
    let detected = if strict {
        detect::detect(&stream).await
    } else if opaque_port && cx.proxy.identity.current().is_none() {
        Ok((Detected::Opaque, Bytes::new()))
    } else {
        detect_remembering(&stream, target, &cx).await
    };
    let peer = stream.peer_addr().ok();
    let (mut protocol, mut first) = match detected {
        Ok(detected) => detected,
        Err(error) => {
            cx.peer.connections.inc();
            debug!(direction = cx.direction(), ?peer, %error, "client gone during detection");
            return;
        }
    };
    if tls::is_handshake(&first) {
        match tls::read_hello(&stream, first).await {
            Ok(Hello::Mesh(hello)) => {
                return terminate(stream, hello, target, destination, cx).await;
            }
            Ok(Hello::Other(hello)) => (protocol, first) = (Detected::Opaque, hello),
            Err(bad) => {
                cx.peer.connections.inc();
                debug!(direction = cx.direction(), ?peer, destination = %target, reason = %bad, "TLS client refused");
                return reset(stream);
            }
        }
    }
    cx.peer.connections.inc();
    if opaque_port {
        protocol = Detected::Opaque;
    }
    debug!(direction = cx.direction(), ?peer, destination = %target, ?protocol, "plaintext connection");
    match mtls.plaintext(target.port()) {
        Plaintext::Allowed => {}
        // Each request's path is checked (see `http::Route`).
        Plaintext::Paths(_) if protocol == Detected::Http1 => {}
        Plaintext::Refused | Plaintext::Paths(_) => {
            debug!(direction = cx.direction(), ?peer, destination = %target, "plaintext refused (--inbound-mtls strict)");
            return reset(stream);
        }
        Plaintext::Denied => {
            let stream = Rewound::new(Io::Plain(stream), first);
            return deny(stream, protocol, target, cx).await;
        }
    }
    let stream = Rewound::new(Io::Plain(stream), first);
    carry(stream, protocol, target, destination, cx).await
}

/// Terminates an inbound mTLS connection whose ClientHello is `hello`, then carries what it
/// carries to the app, if `--allow-from` lets its client in. Without credentials, or when the
/// handshake fails (no client certificate, one no trust anchor vouches for), a reset.
async fn terminate(
    stream: TcpStream,
    hello: Bytes,
    target: SocketAddr,
    destination: Destination,
    mut cx: Context,
) {
    let peer = stream.peer_addr().ok();
    let Some(credentials) = cx.proxy.identity.current() else {
        cx.peer.connections.inc();
        warn!(direction = cx.direction(), ?peer, destination = %target, "an mTLS client, and no workload certificate yet: resetting");
        return reset(stream);
    };
    let (mut io, client_id) = match tls::accept(stream, hello, &credentials).await {
        Ok(accepted) => accepted,
        Err((stream, error)) => {
            cx.peer.connections.inc();
            debug!(direction = cx.direction(), ?peer, destination = %target, %error, "mTLS handshake failed");
            if let Some(stream) = stream {
                reset(stream);
            }
            return;
        }
    };
    // From here on the connection and its requests count as this client identity's.
    cx.peer = cx.metrics.peer(client_id.as_deref().unwrap_or_default());
    cx.peer.connections.inc();
    let (protocol, first) = match detect::detect_io(&mut io).await {
        Ok(detected) => detected,
        Err(error) => {
            debug!(direction = cx.direction(), ?peer, %error, "mTLS client gone during detection");
            return;
        }
    };
    let protocol = if cx.proxy.opaque_ports.contains(target.port()) {
        Detected::Opaque
    } else {
        protocol
    };
    let client = client_id.as_deref().unwrap_or_default();
    debug!(direction = cx.direction(), ?peer, destination = %target, ?protocol, client, "mTLS connection");
    let stream = Rewound::new(io, first);
    if !cx
        .proxy
        .inbound_mtls
        .allow_from
        .allows(client_id.as_deref())
    {
        debug!(direction = cx.direction(), ?peer, destination = %target, client, "client not in --allow-from: refused");
        return deny(stream, protocol, target, cx).await;
    }
    carry(stream, protocol, target, destination, cx).await
}

/// Refuses a client `--allow-from` does not let in: 403 to each HTTP request, a reset for TCP.
async fn deny(stream: ClientIo, protocol: Detected, target: SocketAddr, cx: Context) {
    match protocol {
        Detected::Opaque => reset(stream.into_inner().into_tcp()),
        Detected::Http1 => http::serve_forbidden(stream, false, target, cx).await,
        Detected::H2 => http::serve_forbidden(stream, true, target, cx).await,
    }
}

/// Serves one HTTP/2 client connection: relayed frame by frame when its destination is
/// [`Destination::Forward`] and `--h2-mode relay` (see [`h2_relay`]), else terminated, request
/// by request ([`http::serve_h2`]). The relay cannot answer 502, so when its upstream
/// connection cannot be made, the connection is terminated; nor 429, so inbound HTTP/2 under
/// `--inbound-rate-limit` is terminated too. Either side may be mTLS: a meshed client whose TLS
/// was terminated here, an upstream that is a meshed pod (dialled with mTLS).
pub async fn serve_h2(stream: ClientIo, target: SocketAddr, destination: Destination, cx: Context) {
    let relay = cx.proxy.h2_relay && inbound::rate_limit(&cx).is_none();
    let failed = match &destination {
        Destination::Forward(endpoint) if relay => match cx.dialer().dial(endpoint).await {
            Ok(upstream) => return h2_relay::relay(stream, upstream, target, cx).await,
            // A stream that comes at once gets its 502 from this failure; later ones dial.
            Err(Failure::Connect(error)) => Some((error, Instant::now())),
            Err(other) => Some((io::Error::other(other.to_string()), Instant::now())),
        },
        _ => None,
    };
    http::serve_h2(stream, target, destination, cx, failed).await
}

/// Detects the protocol of a connection to `target`. A destination whose client sent nothing
/// within the detection wait is remembered as server-first, and its later connections are
/// opaque at once instead of waiting again; one whose client speaks first is forgotten. The
/// cost to a client whose first bytes are here at accept (HTTP, mostly) is a relaxed load and a
/// bit test (plus a set lookup when its port shares a bit with a remembered destination's);
/// one whose bytes are not here yet costs a lock-free load of the shared set and, unless the
/// set is empty, one hash lookup.
async fn detect_remembering(
    stream: &TcpStream,
    target: SocketAddr,
    cx: &Context,
) -> io::Result<(Detected, Bytes)> {
    let server_first = cx.server_first;
    let known = || server_first.knows(&target, std::time::Instant::now);
    let (protocol, first, decided_by) = detect_unless_known(stream, known).await?;
    match decided_by {
        DecidedBy::Client => {
            if !first.is_empty() && server_first.may_hold(&target) {
                let change = server_first.forget(&target);
                cx.metrics.server_first_destinations.inc_by(change);
            }
        }
        DecidedBy::Memory => {
            cx.metrics.detect_skipped.inc();
        }
        DecidedBy::Silence => {
            cx.metrics.detect_timeouts.inc();
            let change = server_first.learn(target, std::time::Instant::now());
            cx.metrics.server_first_destinations.inc_by(change);
        }
    }
    Ok((protocol, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair over loopback: (client, accepted).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    #[tokio::test]
    async fn a_silent_destination_waits_once_then_its_connections_skip_the_wait() {
        use tokio::io::AsyncWriteExt;
        let proxy = crate::http_tests::new_proxy();
        let outbound = outbound::context(proxy);
        let mariadb: SocketAddr = "198.18.0.2:3307".parse().unwrap();
        let counts = |cx: &Context| {
            (
                cx.metrics.detect_timeouts.get(),
                cx.metrics.detect_skipped.get(),
                cx.metrics.server_first_destinations.get(),
            )
        };

        // The first connection waits out detection, and the destination is remembered.
        let (_client, accepted) = pair().await;
        let (protocol, first) = detect_remembering(&accepted, mariadb, &outbound)
            .await
            .unwrap();
        assert_eq!(protocol, Detected::Opaque);
        assert!(first.is_empty());
        assert_eq!(counts(&outbound), (1, 0, 1));
        assert!(outbound
            .server_first
            .knows(&mariadb, std::time::Instant::now));

        // The next ones do not wait: counted as skipped, not as another timeout.
        for n in 1..=2 {
            let (_client, accepted) = pair().await;
            let (protocol, _) = detect_remembering(&accepted, mariadb, &outbound)
                .await
                .unwrap();
            assert_eq!(protocol, Detected::Opaque);
            assert_eq!(counts(&outbound), (1, n, 1));
        }

        // A client that speaks first is still read, and is evidence enough to forget the
        // destination: the next silent client waits again.
        let (mut client, accepted) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        accepted.readable().await.unwrap();
        let (protocol, _) = detect_remembering(&accepted, mariadb, &outbound)
            .await
            .unwrap();
        assert_eq!(protocol, Detected::Http1);
        assert_eq!(counts(&outbound), (1, 2, 0));
        assert!(!outbound
            .server_first
            .knows(&mariadb, std::time::Instant::now));
        let (_client, accepted) = pair().await;
        detect_remembering(&accepted, mariadb, &outbound)
            .await
            .unwrap();
        assert_eq!(counts(&outbound), (2, 2, 1));

        // Each direction learns for itself: an inbound connection to that address still waits.
        let inbound = inbound::context(proxy);
        let (_client, accepted) = pair().await;
        detect_remembering(&accepted, mariadb, &inbound)
            .await
            .unwrap();
        assert_eq!(counts(&inbound), (1, 0, 1));
        assert_eq!(counts(&outbound), (2, 2, 1));
    }
}
