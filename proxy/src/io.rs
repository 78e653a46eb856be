//! The one stream type of both sides of the proxy: a plain TCP socket, or TLS over it (mTLS to
//! and from another meshed proxy). A plaintext read or write costs one branch more than on the
//! socket itself.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;

use crate::serve::detect::Rewound;

/// TLS over a socket. The socket is [`Rewound`] because the inbound side reads the ClientHello
/// before it knows whether to terminate it (detection reads, never peeks); a dialled one starts
/// with nothing read. Under rustls, a read buffer of one TLS record: rustls asks for 4 KiB at a
/// time, so a burst of HTTP/2 frames would otherwise cost a read syscall per 4 KiB.
pub type TlsStream = tokio_rustls::TlsStream<Rewound<BufReader<TcpStream>>>;

/// The read buffer under rustls: one whole TLS record (16 KiB of plaintext and its overhead).
pub const TLS_READ_BUFFER: usize = 16 * 1024 + 256;

/// The socket of a new TLS connection, buffered for rustls's reads; `first`, the bytes already
/// read from it (an inbound ClientHello), come first.
pub fn tls_socket(tcp: TcpStream, first: bytes::Bytes) -> Rewound<BufReader<TcpStream>> {
    Rewound::new(BufReader::with_capacity(TLS_READ_BUFFER, tcp), first)
}

/// A connection to or from a client or an upstream.
#[derive(Debug)]
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Io {
    /// The socket under the stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(tls) => tls.get_ref().0.get_ref().get_ref(),
        }
    }

    /// Whether bytes already read from the socket wait in a TLS connection's buffers (read but
    /// not yet decrypted, or decrypted but not yet taken); always false for a plain socket.
    pub fn tls_buffered(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Tls(tls) => !tls.get_ref().0.get_ref().buffer().is_empty(),
        }
    }

    /// The socket, dropping any TLS state (to reset the connection).
    pub fn into_tcp(self) -> TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(tls) => match *tls {
                tokio_rustls::TlsStream::Client(tls) => {
                    tls.into_inner().0.into_inner().into_inner()
                }
                tokio_rustls::TlsStream::Server(tls) => {
                    tls.into_inner().0.into_inner().into_inner()
                }
            },
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

impl From<TcpStream> for Io {
    fn from(stream: TcpStream) -> Self {
        Self::Plain(stream)
    }
}

impl AsyncRead for Io {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            // A socket buffers nothing of its own (tokio's flush is a no-op): hyper flushes
            // several times per request, and this keeps each one a branch.
            Self::Plain(_) => Poll::Ready(Ok(())),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
