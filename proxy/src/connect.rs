//! Connections from the proxy to original destinations, bounded by `--connect-timeout`, and
//! dead-peer detection (`--tcp-keepalive`) for the sockets whose peer is outside the pod.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::listen::Context;
use crate::metrics::Direction;

/// TCP keepalive probes with a user timeout, for a socket whose peer is outside the pod.
///
/// A peer that is gone without a FIN or a reset (its node lost power, the network split) never
/// tells the proxy so. Without this, a request waiting for its response waits for ever, and one
/// written to such a peer waits for the kernel's retransmissions (about 15 minutes). Here the
/// peer is found dead once it has answered nothing for four idle periods: three probes one idle
/// period apart after the connection fell silent for one (`TCP_KEEPIDLE`, `TCP_KEEPINTVL`,
/// `TCP_KEEPCNT`), or data it has not acknowledged for as long (`TCP_USER_TIMEOUT`). The
/// socket's reads and writes then fail with `ETIMEDOUT`: a 502 for a request that had no
/// response yet, a reset for a byte stream. A live peer's kernel answers every probe, however
/// long its application takes to respond, so a slow server is never cut off.
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

    /// How long a silent peer takes to be declared gone.
    pub fn dead_after(&self) -> Duration {
        self.idle * (Self::PROBES + 1)
    }

    /// Sets the options on `socket`. A listener's accepted sockets inherit them.
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        let probes = TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.idle)
            .with_retries(Self::PROBES);
        socket.set_tcp_keepalive(&probes)?;
        socket.set_tcp_user_timeout(Some(self.dead_after()))
    }
}

/// Connects to `target` for a connection in `cx`'s direction, or fails within
/// `--connect-timeout`; a timeout is reported as `TimedOut`. An outbound destination is outside
/// the pod, so its socket gets the dead-peer detection; an inbound one is the pod's own app.
pub async fn connect(target: SocketAddr, cx: &Context) -> io::Result<TcpStream> {
    let limit = cx.proxy.connect_timeout;
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
    if let (Direction::Outbound, Some(keepalive)) = (cx.metrics.direction, cx.proxy.keepalive) {
        keepalive.apply(SockRef::from(&stream))?;
    }
    Ok(stream)
}

/// Closes `stream` with a TCP reset instead of a FIN, so the peer sees the failure as one.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_idle_period_is_off() {
        assert_eq!(Keepalive::after(Duration::ZERO), None);
        let keepalive = Keepalive::after(Duration::from_secs(10)).unwrap();
        assert_eq!(keepalive.dead_after(), Duration::from_secs(40));
    }

    #[test]
    fn the_options_reach_the_socket() {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        Keepalive::after(Duration::from_secs(7))
            .unwrap()
            .apply(SockRef::from(&socket))
            .unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(28))
        );
    }
}
