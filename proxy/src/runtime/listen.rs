//! The listeners: binding them (IPv6 companions optional), accepting until the drain starts, and
//! handing each connection to the worker that serves it. What serving is, the caller says.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::drain::{Drain, Guard};
use super::workers::{Assigned, Workers};
use crate::client::connect::Keepalive;

/// What the accept loop needs from the context its listener's connections are served in.
pub trait Listening: Copy + 'static {
    /// The drain: accepting stops when it starts, and each connection holds a place in it.
    fn drain(&self) -> &'static Drain;
    /// The workers a connection may be handed to.
    fn workers(&self) -> &'static Workers<Handoff<Self>>;
    /// The direction, for the logs.
    fn direction(&self) -> &'static str;
}

/// A connection on its way to another worker.
pub type Handoff<C> = (std::net::TcpStream, Accepted<C>);

/// An accepted connection's peer and context `C`, and what it holds while it is served: its
/// place in the drain and in its worker's count.
pub struct Accepted<C> {
    pub peer: SocketAddr,
    pub cx: C,
    /// Held, not read: the drain waits for it.
    pub guard: Guard,
    /// Held, not read: counts the connection against its worker.
    pub placed: Assigned,
}

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

/// Accepts connections until the drain starts, then drops the listener (closing it), and gives
/// each to `serve` on the worker that serves it. Runs on worker thread `worker`, which owns the
/// listener; a connection stays on the thread that serves it, this one unless
/// [`Workers`] hands it to a less busy worker. Sockets are
/// accepted unregistered and join a reactor only on the worker that serves them, so a hand-over
/// costs no `epoll_ctl` here (tokio's own listener registers each one, and handing it over then
/// took two more calls to undo that).
pub async fn accept_loop<C: Listening>(
    listener: std::net::TcpListener,
    cx: C,
    worker: usize,
    serve: impl Fn(Handoff<C>) + Copy,
) {
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
            _ = cx.drain().signaled() => break,
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
                let placed = cx.workers().place(worker);
                let to = placed.worker();
                let accepted = Accepted {
                    peer,
                    cx,
                    guard: cx.drain().guard(),
                    placed,
                };
                let stream = std::net::TcpStream::from(stream);
                if to == worker {
                    serve((stream, accepted));
                } else {
                    hand_over(stream, accepted, to, serve);
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
fn hand_over<C: Listening>(
    stream: std::net::TcpStream,
    accepted: Accepted<C>,
    to: usize,
    serve: impl Fn(Handoff<C>),
) {
    let (direction, peer) = (accepted.cx.direction(), accepted.peer);
    debug!(direction, %peer, worker = to, "handing the connection to a less busy worker");
    if let Err(handoff) = accepted.cx.workers().hand_over(to, (stream, accepted)) {
        // That worker is gone (the process is exiting): serve it here after all.
        serve(handoff);
    }
}

/// Gives `serve` the connections other workers hand to this one; runs on every worker.
pub async fn inbox_loop<C>(
    mut inbox: mpsc::UnboundedReceiver<Handoff<C>>,
    serve: impl Fn(Handoff<C>),
) {
    while let Some(handoff) = inbox.recv().await {
        serve(handoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
