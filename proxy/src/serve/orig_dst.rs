//! Where a redirected connection was going (SO_ORIGINAL_DST), and the refusal of connections
//! that were not redirected at all, which would otherwise be forwarded back to the proxy.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt, SockaddrIn, SockaddrIn6};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("reading the local address: {0}")]
    LocalAddr(std::io::Error),
    #[error("not redirected: the original destination {0} is the proxy itself")]
    Itself(SocketAddr),
    #[error("the original destination {0} is a proxy listener port")]
    ProxyPort(SocketAddr),
}

/// The destination a client connected to before remora-init's REDIRECT rules sent it here.
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> nix::Result<SocketAddr> {
    match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst)
            .map(|raw| SocketAddrV4::from(SockaddrIn::from(raw)).into()),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .map(|raw| SocketAddrV6::from(SockaddrIn6::from(raw)).into()),
    }
}

/// The destination to forward to, or why the connection must be refused.
///
/// Without NAT there is no original destination (or the kernel reports the local address):
/// the client dialled the listener itself. A destination on one of the proxy's own ports at a
/// local address would come straight back to a listener, so it is refused too rather than
/// forwarded in a loop.
pub fn target(stream: &TcpStream, proxy_ports: &[u16]) -> Result<SocketAddr, Refused> {
    let local = stream.local_addr().map_err(Refused::LocalAddr)?;
    let original = original_dst(stream, local).unwrap_or(local);
    check(original, local, proxy_ports)
}

fn check(
    original: SocketAddr,
    local: SocketAddr,
    proxy_ports: &[u16],
) -> Result<SocketAddr, Refused> {
    let ip = original.ip();
    if original == local {
        return Err(Refused::Itself(original));
    }
    if proxy_ports.contains(&original.port())
        && (ip.is_loopback() || ip.is_unspecified() || ip == local.ip())
    {
        return Err(Refused::ProxyPort(original));
    }
    Ok(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: [u16; 2] = [15001, 15006];

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn redirected_destinations_pass_and_loops_are_refused() {
        // Inbound to loopback is refused too, by `inbound::destination`.
        for (name, original, local, ok) in [
            (
                "outbound to a remote",
                "198.18.0.2:80",
                "127.0.0.1:15001",
                true,
            ),
            ("outbound v6", "[2001:2::2]:80", "[::1]:15001", true),
            (
                "inbound to the app",
                "198.18.0.1:8080",
                "198.18.0.1:15006",
                true,
            ),
            (
                "direct to outbound",
                "127.0.0.1:15001",
                "127.0.0.1:15001",
                false,
            ),
            (
                "direct to inbound",
                "198.18.0.1:15006",
                "198.18.0.1:15006",
                false,
            ),
            (
                "inbound to the inbound port",
                "198.18.0.1:15006",
                "198.18.0.1:15006",
                false,
            ),
            (
                "outbound to own outbound port",
                "127.0.0.1:15006",
                "127.0.0.1:15001",
                false,
            ),
            (
                "outbound to pod ip proxy port",
                "198.18.0.1:15001",
                "198.18.0.1:15006",
                false,
            ),
            (
                "outbound to loopback app",
                "127.0.0.1:8080",
                "127.0.0.1:15001",
                true,
            ),
            (
                "remote on a proxy port",
                "198.18.0.2:15001",
                "127.0.0.1:15001",
                true,
            ),
        ] {
            let result = check(sa(original), sa(local), &PORTS);
            assert_eq!(result.is_ok(), ok, "{name}: {result:?}");
        }
    }
}
