//! Connections from the proxy to original destinations, bounded by `--connect-timeout`, and
//! dead-peer detection (`--tcp-keepalive`) for the sockets whose peer is outside the pod.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// TCP keepalive probes, for a socket whose peer is outside the pod.
///
/// A peer that is gone without a FIN or a reset (its node lost power, the network split) never
/// tells the proxy so, and a request waiting for its response would wait for ever. Here, once
/// the connection has been silent for one idle period, three probes go out one idle period
/// apart (`TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`); a peer that answered none of them is
/// gone after four periods, and the socket's reads and writes fail with `ETIMEDOUT`: a 502 for
/// a request that had no response yet, a reset for a byte stream. A live peer's kernel answers
/// every probe, however long its application takes to respond.
///
/// No `TCP_USER_TIMEOUT`. It would also bound a request written to a peer that died within the
/// last four periods, which now waits for the kernel's retransmissions (about 15 minutes; probes
/// wait while data is unacknowledged). But Linux (5.11 on) also applies it to a live peer that
/// keeps its receive window shut, so a client that pauses a download for that long, or a server
/// that stops reading an upload while it works, would be cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    idle: Duration,
}

impl Keepalive {
    /// Unanswered probes after which the peer counts as gone.
    const PROBES: u32 = 3;
    /// The longest idle period the kernel takes (`TCP_KEEPIDLE` is at most 32767 s).
    pub const MAX_IDLE: Duration = Duration::from_secs(32_767);

    /// Probes after `idle` of silence; `None` for a zero `idle` (off). `idle` must be whole
    /// seconds from 1 s to [`Self::MAX_IDLE`], as the kernel counts it (the flag's parser checks).
    pub fn after(idle: Duration) -> Option<Self> {
        (!idle.is_zero()).then_some(Self { idle })
    }

    /// Sets the options on `socket`. A listener's accepted sockets inherit them.
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        let probes = TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.idle)
            .with_retries(Self::PROBES);
        socket.set_tcp_keepalive(&probes)
    }
}

/// How to dial a destination: within `timeout` (`--connect-timeout`), and with `keepalive`'s
/// dead-peer detection when the peer is outside the pod (an outbound destination; an inbound one
/// is the pod's own app).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectParams {
    pub timeout: Duration,
    pub keepalive: Option<Keepalive>,
}

/// Connects to `target` as `params` say, or fails within `params.timeout`; a timeout is
/// reported as `TimedOut`.
pub async fn connect(target: SocketAddr, params: ConnectParams) -> io::Result<TcpStream> {
    let limit = params.timeout;
    let stream = match tokio::time::timeout(limit, TcpStream::connect(target)).await {
        Ok(result) => result?,
        Err(_elapsed) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {limit:?}"),
            ))
        }
    };
    // Requests and responses are written whole; Nagle would only add latency to the last segment.
    stream.set_nodelay(true)?;
    if let Some(keepalive) = params.keepalive {
        keepalive.apply(SockRef::from(&stream))?;
    }
    Ok(stream)
}

/// Closes `stream` with a TCP reset instead of a FIN, so the peer sees the failure as one.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Asserts that `socket` carries [`Keepalive::after`]`(idle)`'s options and no user timeout.
#[cfg(test)]
pub fn assert_keepalive(socket: SockRef<'_>, idle: Duration) {
    assert!(socket.keepalive().unwrap());
    assert_eq!(socket.tcp_keepalive_time().unwrap(), idle);
    assert_eq!(socket.tcp_keepalive_interval().unwrap(), idle);
    assert_eq!(socket.tcp_keepalive_retries().unwrap(), Keepalive::PROBES);
    assert_eq!(socket.tcp_user_timeout().unwrap(), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_idle_period_is_off() {
        assert_eq!(Keepalive::after(Duration::ZERO), None);
        assert!(Keepalive::after(Duration::from_secs(1)).is_some());
    }

    #[test]
    fn the_options_reach_the_socket() {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let idle = Duration::from_secs(7);
        Keepalive::after(idle)
            .unwrap()
            .apply(SockRef::from(&socket))
            .unwrap();
        assert_keepalive(SockRef::from(&socket), idle);
    }
}
