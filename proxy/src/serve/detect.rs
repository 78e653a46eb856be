//! Protocol detection on the first bytes a client sends. The bytes are read, not peeked: the
//! chosen protocol handler gets them back first through [`Rewound`], so a connection costs one
//! read of its first segment instead of a peek and a read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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

/// How much of the first segment detection reads at once: hyper's first read of a connection
/// asks for as much, so a request head that fits is read by this one call alone.
const FIRST_READ: usize = 8 * 1024;

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

/// What decided a connection's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The client's first bytes, or its close.
    Client,
    /// The client sent nothing within [`DETECT_TIMEOUT`]: its destination speaks first.
    Silence,
    /// Nothing had arrived yet and the destination was known to speak first, so detection did
    /// not wait.
    Memory,
}

/// Reads the client's first bytes until they decide the protocol, the client closes, or
/// [`DETECT_TIMEOUT`] passes. Returns what was read with the verdict: the handler must see those
/// bytes first (opaque connections included).
pub async fn detect(stream: &TcpStream) -> io::Result<(Detected, Bytes)> {
    let (detected, first, _) = detect_unless_known(stream, || false).await?;
    Ok((detected, first))
}

/// [`detect`], except that when no bytes have arrived by the first read and
/// `known_server_first` says the destination speaks first, the connection is opaque at once
/// instead of after [`DETECT_TIMEOUT`]. `known_server_first` is only asked then: a client whose
/// first bytes are already here is classified by them alone, so the cache costs it nothing.
pub async fn detect_unless_known(
    stream: &TcpStream,
    known_server_first: impl FnOnce() -> bool,
) -> io::Result<(Detected, Bytes, DecidedBy)> {
    // A client-first protocol's bytes are usually here by the time the connection is accepted:
    // one non-blocking read then decides without arming a timer or waiting for the reactor.
    let mut seen = read_now(stream)?;
    if let Some(detected) = classify(&seen) {
        return Ok((detected, seen.freeze(), DecidedBy::Client));
    }
    if seen.is_empty() && known_server_first() {
        return Ok((Detected::Opaque, seen.freeze(), DecidedBy::Memory));
    }
    let deadline = Instant::now() + DETECT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            // Undecided bytes and then silence are still the client speaking first.
            Err(_elapsed) if !seen.is_empty() => {
                return Ok((Detected::Opaque, seen.freeze(), DecidedBy::Client))
            }
            Err(_elapsed) => return Ok((Detected::Opaque, seen.freeze(), DecidedBy::Silence)),
            Ok(ready) => ready?,
        }
        if seen.capacity() == seen.len() {
            seen.reserve(FIRST_READ);
        }
        match stream.try_read_buf(&mut seen) {
            // Closed before the bytes decided: whatever came is still carried, as opaque TCP.
            Ok(0) => return Ok((Detected::Opaque, seen.freeze(), DecidedBy::Client)),
            Ok(_) => {
                if let Some(detected) = classify(&seen) {
                    return Ok((detected, seen.freeze(), DecidedBy::Client));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

/// Reads the first bytes of a client known to speak first (a Service port whose appProtocol is
/// HTTP): as [`detect`], but without [`DETECT_TIMEOUT`], so a client slow to send its first
/// request is not taken for a server-first protocol. Bytes that decide nothing are opaque.
pub async fn detect_client_first(stream: &TcpStream) -> io::Result<(Detected, Bytes)> {
    let mut seen = read_now(stream)?;
    loop {
        if let Some(detected) = classify(&seen) {
            return Ok((detected, seen.freeze()));
        }
        stream.readable().await?;
        if seen.capacity() == seen.len() {
            seen.reserve(FIRST_READ);
        }
        match stream.try_read_buf(&mut seen) {
            Ok(0) => return Ok((Detected::Opaque, seen.freeze())),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

/// [`detect`] on a stream that is not a socket (the decrypted side of an mTLS connection):
/// reads until the bytes decide, the stream ends, or [`DETECT_TIMEOUT`] passes.
pub async fn detect_io<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<(Detected, Bytes)> {
    use tokio::io::AsyncReadExt;
    let mut seen = BytesMut::with_capacity(FIRST_READ);
    let deadline = Instant::now() + DETECT_TIMEOUT;
    loop {
        if seen.capacity() == seen.len() {
            seen.reserve(FIRST_READ);
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut seen)).await {
            Err(_elapsed) => return Ok((Detected::Opaque, seen.freeze())),
            Ok(Ok(0)) => return Ok((Detected::Opaque, seen.freeze())),
            Ok(Ok(_)) => {
                if let Some(detected) = classify(&seen) {
                    return Ok((detected, seen.freeze()));
                }
            }
            Ok(Err(error)) => return Err(error),
        }
    }
}

/// Reads what has already arrived, without waiting. Tokio only attempts a read once its reactor
/// has reported the socket readable, which a just-accepted socket has not been yet, so this reads
/// the descriptor directly. Reading behind tokio's back is safe: its readiness is a hint that
/// the next read finding nothing clears, and bytes arriving later raise a new edge.
fn read_now(stream: &TcpStream) -> io::Result<BytesMut> {
    use nix::errno::Errno;
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; FIRST_READ];
    match recv(stream.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
        Ok(n) => Ok(BytesMut::from(&buf[..n])),
        // Nothing yet; an EOF (zero bytes) is seen again by the waiting path, which reports it.
        Err(Errno::EAGAIN | Errno::EINTR) => Ok(BytesMut::new()),
        Err(errno) => Err(errno.into()),
    }
}

pin_project_lite::pin_project! {
    /// A client connection whose first bytes detection has already read: reads return those
    /// bytes before any more from the socket.
    #[derive(Debug)]
    pub struct Rewound<T> {
        first: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Rewound<T> {
    pub fn new(inner: T, first: Bytes) -> Self {
        Self { first, inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    /// The stream and the bytes read from it that it has not handed on yet.
    pub fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.first)
    }
}

impl<T: AsyncRead> AsyncRead for Rewound<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.first.is_empty() {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.first.len().min(buf.remaining());
        buf.put_slice(&this.first[..n]);
        this.first.advance(n);
        if this.first.is_empty() {
            // Free the block now rather than with the connection, which may live for hours.
            *this.first = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewound<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair over loopback: (client, accepted).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    /// What the handler reads through [`Rewound`], in reads of at most `chunk` bytes, until EOF.
    async fn read_all(stream: TcpStream, first: Bytes, chunk: usize) -> Vec<u8> {
        let mut rewound = Rewound::new(stream, first);
        let (mut all, mut buf) = (Vec::new(), vec![0; chunk]);
        loop {
            let n = rewound.read(&mut buf).await.unwrap();
            if n == 0 {
                return all;
            }
            all.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn the_handler_reads_every_byte_detection_read_then_the_rest() {
        let (mut client, accepted) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        // Wait until the bytes are there, so the first, immediate read takes them.
        accepted.readable().await.unwrap();
        let (detected, first) = detect(&accepted).await.unwrap();
        assert_eq!(detected, Detected::Http1);
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
        client.write_all(b"GET /2 HTTP/1.1\r\n").await.unwrap();
        drop(client);
        // Reads smaller than what detection holds hand it out across several reads.
        let all = read_all(accepted, first, 5).await;
        assert_eq!(all, b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_first_segment_too_short_to_decide_is_kept_while_detection_waits_for_more() {
        let (mut client, accepted) = pair().await;
        client.write_all(b"PRI * HTTP/2").await.unwrap();
        accepted.readable().await.unwrap();
        let detection = tokio::spawn(async move {
            let detected = detect(&accepted).await.unwrap();
            (detected, accepted)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(&H2_PREFACE[b"PRI * HTTP/2".len()..])
            .await
            .unwrap();
        client.write_all(b"\x00\x00\x00\x04").await.unwrap();
        let ((detected, first), accepted) = detection.await.unwrap();
        assert_eq!(detected, Detected::H2);
        drop(client);
        let mut expected = H2_PREFACE.to_vec();
        expected.extend_from_slice(b"\x00\x00\x00\x04");
        let all = read_all(accepted, first, 64).await;
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn undecided_bytes_then_a_close_are_carried_as_opaque() {
        let (mut client, accepted) = pair().await;
        client.write_all(b"GE").await.unwrap();
        client.shutdown().await.unwrap();
        let started = Instant::now();
        let (detected, first) = detect(&accepted).await.unwrap();
        assert_eq!(detected, Detected::Opaque);
        assert_eq!(&first[..], b"GE");
        // The close decides at once; only silence waits for the timeout.
        assert!(
            started.elapsed() < DETECT_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout_with_nothing_read() {
        let (_client, accepted) = pair().await;
        let started = Instant::now();
        let (detected, first, decided_by) = detect_unless_known(&accepted, || false).await.unwrap();
        assert_eq!(
            (detected, decided_by),
            (Detected::Opaque, DecidedBy::Silence)
        );
        assert!(first.is_empty());
        assert!(started.elapsed() >= DETECT_TIMEOUT);
    }

    #[tokio::test]
    async fn a_silent_client_of_a_known_server_first_destination_is_opaque_without_the_wait() {
        let (_client, accepted) = pair().await;
        let (detected, first, decided_by) = detect_unless_known(&accepted, || true).await.unwrap();
        // Memory, not Silence: the verdict came before any timer was armed.
        assert_eq!(
            (detected, decided_by),
            (Detected::Opaque, DecidedBy::Memory)
        );
        assert!(first.is_empty());
    }

    #[tokio::test]
    async fn a_client_that_speaks_first_is_judged_by_its_bytes_alone() {
        // Bytes already here decide without asking the memory, even for a known destination.
        let (mut client, accepted) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        accepted.readable().await.unwrap();
        let asked = std::cell::Cell::new(false);
        let (detected, _, decided_by) = detect_unless_known(&accepted, || {
            asked.set(true);
            true
        })
        .await
        .unwrap();
        assert_eq!((detected, decided_by), (Detected::Http1, DecidedBy::Client));
        assert!(
            !asked.get(),
            "the memory was asked although the bytes were here"
        );

        // Undecided bytes and then silence: the client spoke, so nothing is learned from it.
        let (mut client, accepted) = pair().await;
        client.write_all(b"GE").await.unwrap();
        accepted.readable().await.unwrap();
        let (detected, first, decided_by) = detect_unless_known(&accepted, || {
            asked.set(true);
            true
        })
        .await
        .unwrap();
        assert_eq!(
            (detected, decided_by),
            (Detected::Opaque, DecidedBy::Client)
        );
        assert_eq!(&first[..], b"GE");
        assert!(!asked.get());
    }
}
