//! The listeners: binding them (IPv6 companions optional), accepting until the drain starts, and
//! sending each connection down the right path (refuse, opaque, HTTP/1, HTTP/2).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::client::connect::{reset, Keepalive};
use crate::detect::{detect_unless_known, DecidedBy, Detected, Rewound};
use crate::metrics::DirectionMetrics;
use crate::proxy::{Accepted, Context, Handoff};
use crate::{http, opaque, orig_dst};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Binds one listener. IPv6 listeners are IPv6-only so that `[::]` and `0.0.0.0` on one port
/// can coexist and each family's SO_ORIGINAL_DST is read the right way. With `reuse_port`,
/// every worker thread binds its own socket on the same address and the kernel spreads new
/// connections over them (only sockets of the same uid may join). The accepted sockets inherit
/// `keepalive`, set on the listener once.
pub fn bind(
    addr: SocketAddr,
    reuse_port: bool,
    keepalive: Option<Keepalive>,
) -> Result<std::net::TcpListener, BindError> {
    let bind = || -> io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt per listener
        // instead of one per connection. Responses are written whole; Nagle would only delay
        // their last segment.
        socket.set_tcp_nodelay(true)?;
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        if let Some(keepalive) = keepalive {
            keepalive.apply(socket2::SockRef::from(&socket))?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    bind().map_err(|source| BindError { addr, source })
}

/// Binds `addrs`: the first is required, the others (IPv6 companions) are skipped when the pod
/// has no IPv6 — with a log line if `log_skips`.
pub fn bind_all(
    addrs: &[SocketAddr],
    what: &str,
    reuse_port: bool,
    keepalive: Option<Keepalive>,
    log_skips: bool,
) -> Result<Vec<std::net::TcpListener>, BindError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for (i, &addr) in addrs.iter().enumerate() {
        match bind(addr, reuse_port, keepalive) {
            Ok(listener) => listeners.push(listener),
            Err(error) if i > 0 => {
                if log_skips {
                    warn!(listener = what, %addr, %error, "no IPv6 listener (a pod without IPv6?); continuing with IPv4 only");
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(listeners)
}

/// Accepts connections until the drain starts, then drops the listener (closing it). Runs on
/// worker thread `worker`, which owns the listener; a connection stays on the thread that
/// serves it, this one unless [`Workers`](crate::workers::Workers) hands it to a less busy
/// worker. Sockets are accepted unregistered and join a reactor only on the worker that serves
/// them, so a hand-over costs no `epoll_ctl` here (tokio's own listener registers each one, and
/// handing it over then took two more calls to undo that).
pub async fn accept_loop(listener: std::net::TcpListener, cx: Context, worker: usize) {
    let listener = mio::net::TcpListener::from_std(listener);
    // SAFETY: the mio listener owns its descriptor and keeps it open, unchanged, until the
    // AsyncFd drops it; nothing else holds or closes it.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) };
    let listener = match registered {
        Ok(listener) => listener,
        Err(error) => {
            warn!(direction = cx.direction(), %error, "cannot register a listener");
            return;
        }
    };
    loop {
        let mut ready = tokio::select! {
            biased;
            _ = cx.proxy.drain.signaled() => break,
            ready = listener.readable() => match ready {
                Ok(ready) => ready,
                // The reactor is gone: the runtime is shutting down.
                Err(_) => break,
            },
        };
        let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) else {
            continue; // nothing left to accept: wait for the next readiness
        };
        // AsyncFd's readiness takes nothing from the task's budget, as tokio's own accept does:
        // without this, a burst of connections would be accepted before any of them is served.
        tokio::task::consume_budget().await;
        match accepted {
            Ok((stream, peer)) => {
                let placed = cx.proxy.workers.place(worker);
                let to = placed.worker();
                let accepted = Accepted {
                    peer,
                    cx,
                    guard: cx.proxy.drain.guard(),
                    placed,
                };
                let stream = std::net::TcpStream::from(stream);
                if to == worker {
                    serve((stream, accepted));
                } else {
                    hand_over(stream, accepted, to);
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(direction = cx.direction(), %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sends an accepted connection to worker `to`.
fn hand_over(stream: std::net::TcpStream, accepted: Accepted, to: usize) {
    let (direction, peer) = (accepted.cx.direction(), accepted.peer);
    debug!(direction, %peer, worker = to, "handing the connection to a less busy worker");
    if let Err(handoff) = accepted.cx.proxy.workers.hand_over(to, (stream, accepted)) {
        // That worker is gone (the process is exiting): serve it here after all.
        serve(handoff);
    }
}

/// Serves the connections other workers hand to this one; runs on every worker.
pub async fn inbox_loop(mut inbox: mpsc::UnboundedReceiver<Handoff>) {
    while let Some(handoff) = inbox.recv().await {
        serve(handoff);
    }
}

/// Registers an accepted connection with this worker's reactor and serves it here.
fn serve((stream, accepted): Handoff) {
    match TcpStream::from_std(stream) {
        Ok(stream) => drop(tokio::spawn(handle(stream, accepted))),
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

/// Serves one connection; `accepted` holds its place in the drain and its worker's count until
/// this returns.
async fn handle(stream: TcpStream, accepted: Accepted) {
    let (peer, cx) = (accepted.peer, accepted.cx);
    cx.metrics.connections.inc();
    cx.metrics.open.inc();
    let _open = Open(cx.metrics);
    let target = match orig_dst::target(&stream, cx.metrics.direction, &cx.proxy.proxy_ports) {
        Ok(target) => target,
        Err(refused) => {
            warn!(direction = cx.direction(), %peer, reason = %refused, "connection refused");
            reset(stream);
            return;
        }
    };
    let (protocol, first) = if cx.proxy.opaque_ports.contains(target.port()) {
        (Detected::Opaque, Bytes::new())
    } else {
        match detect_remembering(&stream, target, &cx).await {
            Ok(detected) => detected,
            Err(error) => {
                debug!(direction = cx.direction(), %peer, %error, "client gone during detection");
                return;
            }
        }
    };
    debug!(direction = cx.direction(), %peer, destination = %target, ?protocol, "connection");
    let stream = Rewound::new(stream, first);
    match protocol {
        Detected::Opaque => opaque::forward(stream, target, &cx).await,
        Detected::Http1 => http::serve_http1(stream, target, cx).await,
        Detected::H2 => http::serve_h2(stream, target, cx).await,
    }
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
    use crate::metrics::Direction;

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
        let outbound = Context::new(proxy, Direction::Outbound);
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
        let inbound = Context::new(proxy, Direction::Inbound);
        let (_client, accepted) = pair().await;
        detect_remembering(&accepted, mariadb, &inbound)
            .await
            .unwrap();
        assert_eq!(counts(&inbound), (1, 0, 1));
        assert_eq!(counts(&outbound), (2, 2, 1));
    }

    #[test]
    fn accepted_connections_inherit_tcp_nodelay() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), false, None).unwrap();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
        assert!(!socket2::SockRef::from(&accepted).keepalive().unwrap());
    }

    #[test]
    fn accepted_connections_inherit_the_dead_peer_detection() {
        let idle = Duration::from_secs(5);
        let listener = bind(
            "127.0.0.1:0".parse().unwrap(),
            false,
            Keepalive::after(idle),
        )
        .unwrap();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        crate::client::connect::assert_keepalive(socket2::SockRef::from(&accepted), idle);
    }
}
