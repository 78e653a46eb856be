//! Protocol detection on the first bytes a client sends, without consuming them (peek), so the
//! chosen protocol handler reads the connection from its very first byte.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long detection waits for the client's first bytes before treating the connection as
/// opaque. A client-first protocol writes as soon as its connect() returns, so its first bytes
/// are here within a millisecond or two even on a busy node; a server-first protocol (SMTP,
/// MySQL, …) writes nothing until the server greets it, and pays this delay once per
/// connection. 100 ms is far above scheduling jitter and far below what a person or a client
/// timeout notices (Linkerd's 10 s stalls such protocols for 10 s). A late HTTP client only loses
/// per-request metrics: its bytes are still carried, as opaque TCP.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods followed by the space of the request line. An explicit list (rather than
/// any token) keeps text protocols like Redis's inline `SET k v` out of the HTTP path.
const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    H2,
    Opaque,
}

/// Classifies the bytes seen so far; `None` means too few bytes to tell yet.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.starts_with(H2_PREFACE) {
        return Some(Detected::H2);
    }
    let mut undecided = H2_PREFACE.starts_with(bytes);
    for method in HTTP1_METHODS {
        if bytes.starts_with(method) {
            return Some(Detected::Http1);
        }
        undecided |= method.starts_with(bytes);
    }
    if undecided {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Peeks at the client's first bytes until they decide the protocol, the client closes, or
/// [`DETECT_TIMEOUT`] passes.
pub async fn detect(stream: &TcpStream) -> std::io::Result<Detected> {
    let mut buf = [0u8; H2_PREFACE.len()];
    // A client-first protocol's bytes are usually here by the time the connection is accepted:
    // one non-blocking peek then decides without arming a timer or waiting for the reactor.
    if let Some(detected) = peek_now(stream, &mut buf).and_then(|n| classify(&buf[..n])) {
        return Ok(detected);
    }
    let deadline = Instant::now() + DETECT_TIMEOUT;
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_elapsed) => return Ok(Detected::Opaque),
            Ok(result) => result?,
        };
        if n == 0 {
            return Ok(Detected::Opaque);
        }
        if let Some(detected) = classify(&buf[..n]) {
            return Ok(detected);
        }
        // A partial first segment (rare: clients write whole request lines): peek returns at
        // once while the same bytes wait, so pause briefly instead of spinning.
        if n == seen {
            if Instant::now() >= deadline {
                return Ok(Detected::Opaque);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
    }
}

/// Peeks without waiting; `None` when nothing has arrived yet or the peek failed (the
/// waiting path then sees the same state and reports it).
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    match recv(
        stream.as_raw_fd(),
        buf,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        // Zero bytes is the client closing: the waiting path reads the same and says so.
        Ok(n) if n > 0 => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_classify() {
        use Detected::*;
        for (name, bytes, expected) in [
            ("get", &b"GET / HTTP/1.1\r\n"[..], Some(Http1)),
            ("post", b"POST /x HTTP/1.1\r\n", Some(Http1)),
            ("connect", b"CONNECT a:443 HTTP/1.1\r\n", Some(Http1)),
            ("h2 preface", H2_PREFACE, Some(H2)),
            ("partial method", b"GE", None),
            ("partial preface", b"PRI * HTTP/2", None),
            ("shared first letter", b"P", None),
            ("tls client hello", b"\x16\x03\x01\x02\x00", Some(Opaque)),
            ("redis inline", b"SET k v\r\n", Some(Opaque)),
            ("lowercase", b"get / HTTP/1.1\r\n", Some(Opaque)),
            ("method without space", b"GETX", Some(Opaque)),
            (
                "postgres startup",
                b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
                Some(Opaque),
            ),
            ("nothing", b"", None),
        ] {
            assert_eq!(classify(bytes), expected, "{name}");
        }
    }
}
