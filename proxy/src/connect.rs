//! Connections from the proxy to original destinations, bounded by `--connect-timeout`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Connects to `target` or fails within `limit`; a timeout is reported as `TimedOut`.
pub async fn connect(target: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
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
    Ok(stream)
}

/// Closes `stream` with a TCP reset instead of a FIN, so the peer sees the failure as one.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
