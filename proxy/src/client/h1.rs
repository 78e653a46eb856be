//! The upstream side of proxied HTTP/1: the request written and the response read straight on
//! the upstream socket, inside the client connection's own task.
//!
//! hyper still serves the client side (parsing, keep-alive, pipelining, `Expect: 100-continue`,
//! upgrades). Its client side would put every upstream connection in a task of its own, and a
//! request would then cross tasks four times: the request, the response head, the demand for
//! the body and the body itself. Here one task does it all, so a keep-alive request costs a
//! single wake-up, as in the opaque TCP relay.
//!
//! What this side decides (RFC 9112):
//! - Requests go out as HTTP/1.1, with a `Host` added when an HTTP/1.0 client sent none. Their
//!   framing is the one hyper decoded the body with, never read again from the client's header
//!   lines (which a client can list in `Connection`, repeat or pad): a `Content-Length` the
//!   proxy writes itself for a body of known length, else chunked (re-encoded from what hyper
//!   decoded, trailers included). The head then always frames exactly the bytes sent after it,
//!   so no byte of a body can reach the server as a request of its own (RFC 9112 §6.3, §11.2).
//!   The response is read while the body goes out: a server may answer before the body ends.
//! - `Expect: 100-continue` goes to the server, and the body waits for its `100 Continue`
//!   (which hyper then passes on to the client as it reads the body) or is never sent when
//!   the server answers at once (RFC 9110 §10.1.1). A server that says nothing for
//!   [`CONTINUE_WAIT`] gets the body anyway, as a client that stops waiting would send it.
//! - The response's hop-by-hop headers (`Connection`, the headers it lists, `Keep-Alive`,
//!   `Proxy-Connection`) are read and dropped with its head: the client's hop has its own.
//! - Other interim 1xx responses are skipped. A `101` outside an upgrade is an error.
//! - The response body ends at its `Content-Length`, at the end of its chunked coding, or when
//!   the server closes; HEAD, 204 and 304 have none. The client gets one framing in one value:
//!   a `Content-Length` list of one repeated number becomes that number, a `Content-Length`
//!   next to `Transfer-Encoding` is dropped, and a chunked coding that is not applied once and
//!   last is refused.
//! - A connection is reused only after a complete HTTP/1.1 response without `Connection:
//!   close`, nothing unread behind it, no body framed by the close, and the whole request body
//!   sent before the response came (a server that answered early may not read the rest).

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::{header, request, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::pool::{Pool, Reusable};
use super::Endpoint;
use crate::io::Io;

thread_local! {
    /// This worker thread's idle upstream HTTP/1 connections. Each worker is a single-threaded
    /// runtime whose connections never leave it, so a per-worker pool needs no lock and every
    /// connection it hands out is driven by the same thread. Touched when a client connection
    /// needs its first upstream connection and when it closes, and per request when a Service's
    /// requests are balanced over its endpoints (the connection to the last one goes back; the
    /// one to the next comes out).
    static POOL: RefCell<Pool<Conn>> = RefCell::new(Pool::default());
}

/// A usable pooled connection to `endpoint`, if this worker has one.
pub fn checkout(endpoint: &Endpoint) -> Option<Conn> {
    POOL.with_borrow_mut(|pool| pool.checkout(endpoint))
}

/// Keeps `conn`, a connection to `endpoint`, in this worker's pool, if still usable.
pub fn checkin(endpoint: &Endpoint, conn: Conn) {
    // `try_with`: a connection dropped while the thread exits finds the pool already gone.
    let _ = POOL.try_with(|pool| pool.borrow_mut().checkin(endpoint, conn));
}

/// Drops this worker's expired and closed pooled connections.
pub fn sweep_pool() {
    POOL.with_borrow_mut(Pool::sweep);
}

/// Headers accepted in one response head or trailer section (hyper's own limit).
const MAX_HEADERS: usize = 100;
/// The largest response head or trailer section.
pub const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// What a read asks the socket for at least, and at most.
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 64 * 1024;
/// How long a request body that expects `100 Continue` waits for the server's answer before it
/// goes anyway: curl's wait, so a server that ignores `Expect` costs no more than without us.
pub const CONTINUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a finished response puts its connection back: the client connection's slot.
pub type Slot = Arc<Mutex<Option<Conn>>>;

/// Where a connection goes when its response has ended cleanly and it can serve again.
#[derive(Debug, Clone)]
pub enum Home {
    /// The client connection's slot: its next request, which goes to the same place, takes it.
    Slot(Slot),
    /// For a Service, whose next request may go anywhere: the worker's pool, under the
    /// endpoint, where any client connection's request to it finds it. Kept with one client
    /// connection instead, it waited there while the others dialled their own: 93 upstream
    /// connections for 50 client connections, against HAProxy's 51.
    Pool(Endpoint),
}

/// An upstream connection and what was read from it but not used yet.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    buf: BytesMut,
}

impl Conn {
    pub fn new(io: impl Into<Io>) -> Self {
        Self {
            io: io.into(),
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can take a request: the server has neither closed it nor sent
    /// anything unasked. In plaintext, no syscall unless the socket turned readable since it was
    /// last drained. Over TLS the socket is peeked, never read: a byte taken from under the TLS
    /// session would break it, and a server that closes sends a `close_notify` first, which
    /// makes the socket readable as its FIN does.
    pub fn is_usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        match &self.io {
            Io::Plain(tcp) => {
                matches!(tcp.try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
            }
            Io::Tls(_) => !self.io.tls_buffered() && idle_socket(self.io.tcp()),
        }
    }

    /// The connection, for one that leaves HTTP/1 (an upgrade); `None` if bytes are pending.
    pub fn into_stream(self) -> Option<Io> {
        self.buf.is_empty().then_some(self.io)
    }

    /// Drops a big read buffer before the connection idles in a pool.
    pub fn shrink(&mut self) {
        if self.buf.capacity() > READ_MAX {
            self.buf = BytesMut::new();
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        poll_fill(&mut self.io, &mut self.buf, cx, want)
    }
}

impl Reusable for Conn {
    fn is_usable(&self) -> bool {
        Conn::is_usable(self)
    }

    fn shrink(&mut self) {
        Conn::shrink(self)
    }
}

/// Whether nothing is waiting on `tcp`, neither bytes nor its end: peeked without waiting.
fn idle_socket(tcp: &tokio::net::TcpStream) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut probe = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    matches!(recv(tcp.as_raw_fd(), &mut probe, flags), Err(Errno::EAGAIN))
}

/// Reads more into `buf`; `Ok(0)` is the end of the stream. Through `poll_read`, so a short read
/// marks the socket drained: the next read, and the next [`Conn::is_usable`], wait for epoll
/// instead of asking the kernel again.
fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    buf.reserve(want.clamp(READ_MIN, READ_MAX));
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the destination closed the connection without a response")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("invalid response: {0}")]
    Invalid(String),
    #[error("reading the request body: {0}")]
    RequestBody(hyper::Error),
    #[error("invalid request: {0}")]
    Request(String),
}

impl Error {
    /// Whether the client is at fault (a 400), not the server (a 502).
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::RequestBody(_) | Self::Request(_))
    }
}

fn invalid(what: impl Into<String>) -> Error {
    Error::Invalid(what.into())
}

/// A request that failed, and whether the server can have seen none of it acted upon: the
/// connection failed before a single response byte, so an idempotent request may be retried.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    pub nothing_received: bool,
}

/// A request head ready to write, and how its body is framed.
pub struct RequestHead {
    bytes: Vec<u8>,
    chunked: bool,
    /// The body waits for the server's `100 Continue`.
    expect_continue: bool,
    method: Method,
}

impl RequestHead {
    /// Writes `parts` as an HTTP/1.1 request head. Hop-by-hop headers are already gone. `body`
    /// is the size hint of the body as hyper decoded it: an exact size for a `Content-Length`
    /// body (0 for none), none for a chunked one. The framing written follows it, not the
    /// client's framing headers. Fails on a chunked coding applied more than once or not last,
    /// which servers read differently.
    pub fn new(parts: &request::Parts, body: &SizeHint, target: SocketAddr) -> Result<Self, Error> {
        let length = body.exact();
        let chunked = length.is_none();
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(parts.method.as_str().as_bytes());
        bytes.push(b' ');
        let uri = &parts.uri;
        if uri.scheme().is_some() {
            // Absolute form, as the client sent it (it took us for a forward proxy).
            bytes.extend_from_slice(uri.to_string().as_bytes());
        } else {
            let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
            bytes.extend_from_slice(target.as_bytes());
        }
        bytes.extend_from_slice(b" HTTP/1.1\r\n");
        let (mut host, mut had_length, mut expect) = (false, false, false);
        // Whether the Transfer-Encoding lines so far end with chunked.
        let mut codings = None;
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH {
                // Written below from the decoded length: one value, as hyper counted it.
                had_length = true;
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                if !chunked {
                    continue;
                }
                // hyper decoded one chunked layer, the last coding: a chunked coding before it
                // would be a second layer, which servers read differently.
                codings = Some(chunked_last(value, codings).map_err(|_| {
                    Error::Request(format!(
                        "Transfer-Encoding {value:?}: chunked must come once, as the last coding"
                    ))
                })?);
            } else if name == header::EXPECT {
                // As hyper reads it: it then sends `100 Continue` on the first read of the body.
                expect = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            host |= name == header::HOST;
            put_field(&mut bytes, name, value);
        }
        match length {
            // hyper decodes chunked only after a Transfer-Encoding ending with it, which is
            // forwarded as it came: this is a safeguard.
            None if codings != Some(true) => {
                bytes.extend_from_slice(b"transfer-encoding: chunked\r\n")
            }
            None => {}
            Some(0) if !had_length => {}
            Some(length) => {
                use std::io::Write as _;
                // Into the Vec: no allocation of its own.
                let _ = write!(bytes, "content-length: {length}\r\n");
            }
        }
        if !host {
            // HTTP/1.1 requires Host; an HTTP/1.0 client may have sent none.
            let host = uri
                .authority()
                .map_or_else(|| target.to_string(), |authority| authority.to_string());
            bytes.extend_from_slice(b"host: ");
            bytes.extend_from_slice(host.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        Ok(Self {
            bytes,
            chunked,
            // hyper waits for the read only when there is a body and the client speaks 1.1.
            expect_continue: expect && length != Some(0) && parts.version > http::Version::HTTP_10,
            method: parts.method.clone(),
        })
    }
}

fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A request body as `send` takes it: hyper's, or one a route replays (the same error type, so
/// a failing client body is told apart from a failing server).
pub trait RequestBody: http_body::Body<Data = Bytes, Error = hyper::Error> + Unpin {}

impl<B: http_body::Body<Data = Bytes, Error = hyper::Error> + Unpin> RequestBody for B {}

/// Sends one request on `conn` and reads the response head. The response body reads the rest
/// and, when it ends cleanly on a reusable connection, sends the connection `home`.
pub async fn send<B: RequestBody>(
    mut conn: Conn,
    head: &RequestHead,
    body: Option<B>,
    home: Home,
) -> Result<Response<UpstreamBody>, Failed> {
    let failed = |error, nothing_received| Failed {
        error,
        nothing_received,
    };
    let mut body = body.filter(|body| !body.is_end_stream());
    // The body's first frame, when hyper has it already (it came in with the head, as most
    // bodies do): a body the client framed wrongly is then refused before a byte reaches the
    // server, and the head and the first data go out in one write. Not with `Expect`: reading
    // the body is what makes hyper tell the client to send it.
    let mut first = None;
    if let (Some(incoming), false) = (body.as_mut(), head.expect_continue) {
        match incoming.frame().now_or_never() {
            Some(Some(Err(error))) => return Err(failed(Error::RequestBody(error), true)),
            Some(Some(Ok(frame))) => first = Some(frame),
            Some(None) => body = None,
            None => {}
        }
    }
    let written = match first {
        Some(frame) => write_frame(&mut conn.io, &head.bytes, frame, head.chunked).await,
        None => conn.io.write_all(&head.bytes).await.map(|()| false),
    };
    let ended = match written {
        Ok(ended) => ended,
        Err(error) => return Err(failed(Error::Io(error), true)),
    };
    let (parsed, body_sent) = match body {
        // Boxed: the wait and its timer are rare, and inline they would grow every request's
        // future.
        Some(body) if head.expect_continue => {
            match Box::pin(continue_or_final(&mut conn, head)).await {
                None => exchange(&mut conn, head, body, ended).await?,
                // Answered without the body: it is dropped unread, so hyper does not send the
                // client `100 Continue` either, and closes the client connection after the response
                // unless the body was there already to be drained. The server may still expect it:
                // the connection is not reused.
                Some(parsed) => (parsed, false),
            }
        }
        Some(body) => exchange(&mut conn, head, body, ended).await?,
        None => {
            if head.chunked {
                if let Err(error) = conn.io.write_all(b"0\r\n\r\n").await {
                    return Err(failed(Error::Io(error), true));
                }
            }
            let Conn { io, buf } = &mut conn;
            (read_head(io, buf, &head.method, false).await, true)
        }
    };
    let (response, framing, keep_alive) = parsed.map_err(|(error, none)| failed(error, none))?;
    let mut body = UpstreamBody {
        conn: Some(conn),
        state: framing,
        // The server answered before the whole request body went out: it expects the rest (or
        // has stopped reading), so the connection cannot carry another request.
        keep_alive: keep_alive && body_sent,
        home: Some(home),
        error: None,
    };
    if matches!(body.state, State::Length(0)) {
        body.finish();
    }
    Ok(response.map(|()| body))
}

/// The response head, or the error and whether nothing at all was received.
pub type Parsed = Result<(Response<()>, State, bool), (Error, bool)>;

/// Waits for the server's answer to `Expect: 100-continue`: `None` once it asks for the body
/// with `100 Continue` (or has said nothing for [`CONTINUE_WAIT`]), else its final response.
async fn continue_or_final(conn: &mut Conn, head: &RequestHead) -> Option<Parsed> {
    let Conn { io, buf } = conn;
    // Cancelling the read on the timeout loses nothing: what came in is in `buf`.
    match tokio::time::timeout(CONTINUE_WAIT, read_head(io, buf, &head.method, true)).await {
        Ok(Ok((response, ..))) if response.status() == StatusCode::CONTINUE => None,
        Ok(parsed) => Some(parsed),
        Err(_elapsed) => None,
    }
}

/// Streams the request body while reading the response head: a server may answer before the
/// body is complete. An early error status or `Connection: close` means it wants no more of the
/// body (RFC 9112 §9.5: a 413, a 401), so the rest is not sent; writing it all first would have
/// turned that answer into a 502 when the server closes, or a stall once the socket buffers fill
/// when it does not. After any other early answer the server may still read on, so the body
/// goes out in full first. Also says whether the server can take another request on the
/// connection as far as this request goes: the body went out in full before the response came.
/// A server that answers before the end of the body may not read the rest; if it does not, the
/// rest would be read as the next request.
async fn exchange<B: RequestBody>(
    conn: &mut Conn,
    head: &RequestHead,
    body: B,
    ended: bool,
) -> Result<(Parsed, bool), Failed> {
    match &mut conn.io {
        Io::Plain(tcp) => {
            let (reader, writer) = tcp.split();
            exchange_on(reader, writer, &mut conn.buf, head, body, ended).await
        }
        // TLS reads and writes share one session: halves that take turns through a lock.
        Io::Tls(tls) => {
            let (reader, writer) = tokio::io::split(tls.as_mut());
            exchange_on(reader, writer, &mut conn.buf, head, body, ended).await
        }
    }
}

/// [`exchange`] over the connection's two halves.
async fn exchange_on<R: AsyncRead + Unpin, W: AsyncWrite + Unpin, B: RequestBody>(
    mut reader: R,
    mut writer: W,
    buf: &mut BytesMut,
    head: &RequestHead,
    body: B,
    ended: bool,
) -> Result<(Parsed, bool), Failed> {
    // Whether the body went out in full; the client's own failure ends the exchange. A write
    // error is the server closing: what it answered before is still read.
    let outcome = |result| match result {
        Err(Error::RequestBody(error)) => Err(Failed {
            error: Error::RequestBody(error),
            nothing_received: false,
        }),
        result => Ok(Result::is_ok(&result)),
    };
    let sending = write_body(&mut writer, head.chunked, body, ended);
    let reading = read_head(&mut reader, buf, &head.method, false);
    tokio::pin!(sending, reading);
    let mut sent = None;
    let parsed = loop {
        tokio::select! {
            result = &mut sending, if sent.is_none() => sent = Some(outcome(result)?),
            parsed = &mut reading => break parsed,
        }
    };
    let early = sent.is_none();
    let refused = match &parsed {
        Ok((response, _, keep_alive)) => {
            response.status().is_client_error()
                || response.status().is_server_error()
                || !keep_alive
        }
        Err(_) => true,
    };
    if sent.is_none() && !refused {
        sent = Some(outcome(sending.await)?);
    }
    Ok((parsed, sent == Some(true) && !early))
}

/// Writes the rest of a request body in its framing: as it comes for `Content-Length`,
/// re-encoded when chunked (a last chunk is added if the client's body ended without one).
/// `ended` says whether the last chunk went out already (trailers as the first frame).
async fn write_body<W: AsyncWrite + Unpin, B: RequestBody>(
    io: &mut W,
    chunked: bool,
    mut body: B,
    mut ended: bool,
) -> Result<(), Error> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Error::RequestBody)?;
        ended |= write_frame(io, &[], frame, chunked).await?;
    }
    if chunked && !ended {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

/// Writes `prefix` (the request head, before the first frame) and one body frame in the
/// request's framing, in one write where the socket takes it. Says whether the frame was the
/// chunked body's last chunk (its trailers).
async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    prefix: &[u8],
    frame: Frame<Bytes>,
    chunked: bool,
) -> io::Result<bool> {
    match frame.into_data() {
        Ok(data) if !chunked => io.write_all_buf(&mut prefix.chain(data)).await?,
        Ok(data) if data.is_empty() => io.write_all(prefix).await?,
        Ok(data) => {
            let size = format!("{:x}\r\n", data.len());
            let mut chunk = prefix
                .chain(size.as_bytes())
                .chain(data)
                .chain(&b"\r\n"[..]);
            io.write_all_buf(&mut chunk).await?;
        }
        Err(frame) => match (frame.into_trailers(), chunked) {
            (Ok(trailers), true) => {
                let mut last = prefix.to_vec();
                last.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    put_field(&mut last, name, value);
                }
                last.extend_from_slice(b"\r\n");
                io.write_all(&last).await?;
                return Ok(true);
            }
            _ => io.write_all(prefix).await?,
        },
    }
    Ok(false)
}

/// Reads the final response head (skipping interim 1xx ones), or a `100 Continue` if
/// `until_continue` (as a response of that status, no body, no reuse); the error says whether
/// nothing at all was received. Public for the fuzz targets.
pub async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    method: &Method,
    until_continue: bool,
) -> Parsed {
    let mut received = false;
    loop {
        if !buf.is_empty() {
            // Left uninitialised: httparse writes the fields it finds, and filling all 100
            // first would cost more than parsing a typical head.
            let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let config = httparse::ParserConfig::default();
            match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
                // The limit is the head's, not the buffer's: a head is refused by its length
                // however the reads split it, not only when it came in small reads.
                Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                    return Err((invalid("a response head over 64 KiB"), false))
                }
                Ok(httparse::Status::Complete(len)) => {
                    // Where each field lies in the buffer: the head is then split off as one
                    // shared `Bytes`, and header values become slices of it instead of copies.
                    let base = buf.as_ptr() as usize;
                    let offset = |part: &[u8]| {
                        let start = part.as_ptr() as usize - base;
                        // A head is parsed before the buffer grows past MAX_HEAD and one read
                        // more: far below 4 GiB.
                        (start as u32, (start + part.len()) as u32)
                    };
                    let mut spans = [Span::default(); MAX_HEADERS];
                    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
                        *span = Span {
                            name: offset(field.name.as_bytes()),
                            value: offset(field.value),
                        };
                    }
                    let fields = parsed.headers.len();
                    let (code, version) = (parsed.code, parsed.version);
                    let head = buf.split_to(len).freeze();
                    let response = head_from(code, version, &head, &spans[..fields], method)
                        .map_err(|error| (error, false))?;
                    if let Some(response) = response {
                        return Ok(response);
                    }
                    if until_continue && code == Some(100) {
                        let mut response = Response::new(());
                        *response.status_mut() = StatusCode::CONTINUE;
                        return Ok((response, State::Done, false));
                    }
                    continue;
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err((invalid("a response head over 64 KiB"), false))
                }
                Err(error) => return Err((invalid(error.to_string()), false)),
            }
        }
        match std::future::poll_fn(|cx| poll_fill(io, buf, cx, READ_MIN)).await {
            Ok(0) if !received => return Err((Error::Closed, true)),
            Ok(0) => {
                return Err((
                    invalid("the connection closed inside the response head"),
                    false,
                ))
            }
            Ok(_) => received = true,
            Err(error) => return Err((Error::Io(error), !received)),
        }
    }
}

/// Where a header field's name and value lie in the response head: start and end offsets,
/// `u32` to keep the array of them small (it is zeroed for every response).
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

impl Span {
    fn of(range: (u32, u32)) -> std::ops::Range<usize> {
        range.0 as usize..range.1 as usize
    }
}

/// The response, its body framing and whether the connection stays open after it; `None` for
/// an interim 1xx response.
fn head_from(
    code: Option<u16>,
    version: Option<u8>,
    head: &Bytes,
    spans: &[Span],
    method: &Method,
) -> Result<Option<(Response<()>, State, bool)>, Error> {
    let (Some(code), Some(version)) = (code, version) else {
        return Err(invalid("no status line"));
    };
    let status = StatusCode::from_u16(code).map_err(|_| invalid(format!("status {code}")))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(invalid(
            "101 Switching Protocols to a request that asked no upgrade",
        ));
    }
    if status.is_informational() {
        return Ok(None);
    }
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut close = version == 0;
    let mut chunked = None;
    let mut length: Option<u64> = None;
    // `Connection` values that list further hop-by-hop headers (rare: no allocation without).
    let mut listing = Vec::new();
    for span in spans {
        let name = &head[Span::of(span.name)];
        let name = HeaderName::from_bytes(name)
            .map_err(|_| invalid(format!("header name {:?}", String::from_utf8_lossy(name))))?;
        let value = HeaderValue::from_maybe_shared(head.slice(Span::of(span.value)))
            .map_err(|_| invalid(format!("value of header {name}")))?;
        if is_hop_by_hop(&name) {
            // This hop's business: read here, never forwarded.
            // `keep-alive`, what most servers send, neither closes nor lists anything.
            if name == header::CONNECTION && !value.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
                close |= has_token(&value, "close");
                if connection_options(&value).next().is_some() {
                    listing.push(value);
                }
            }
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            chunked = Some(chunked_last(&value, chunked)?);
        } else if name == header::CONTENT_LENGTH {
            let first = length.is_none();
            let (parsed, plain) = content_length(&value, length)?;
            length = Some(parsed);
            // One value reaches the client: a repeated line adds nothing, and a list of one
            // repeated number (RFC 9110 §8.6) becomes that number.
            if !first {
                continue;
            }
            if !plain {
                headers.append(name, HeaderValue::from(parsed));
                continue;
            }
        }
        headers.append(name, value);
    }
    for value in &listing {
        for option in connection_options(value) {
            headers.remove(option);
        }
    }
    if chunked.is_some() && length.is_some() {
        // Transfer-Encoding wins (RFC 9112 §6.3). Next to a Content-Length it is a smuggling
        // pattern: the length is dropped, so the client never sees both (for HEAD, 204 and 304
        // too: hyper refuses to send both), and the connection is not reused.
        headers.remove(header::CONTENT_LENGTH);
        length = None;
        close = true;
    }
    let state = if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        State::Length(0)
    } else if let Some(chunked) = chunked {
        if chunked {
            State::Chunked(Chunk::Size)
        } else {
            State::Close
        }
    } else if let Some(length) = length {
        State::Length(length)
    } else {
        State::Close
    };
    let keep_alive = !close && !matches!(state, State::Close);
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(Some((response, state, keep_alive)))
}

/// Whether a header concerns only one hop by its name alone (RFC 9110 §7.6.1): `Connection`
/// itself, and `Keep-Alive` and `Proxy-Connection`, which senders use without listing them there.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The further header names a `Connection` value makes hop-by-hop: its options other than
/// `close`, which names no header, and `keep-alive`, which `is_hop_by_hop` already covers.
pub fn connection_options(value: &HeaderValue) -> impl Iterator<Item = &str> {
    tokens(value).filter(|option| {
        !option.is_empty()
            && !option.eq_ignore_ascii_case("close")
            && !option.eq_ignore_ascii_case("keep-alive")
    })
}

fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value.to_str().unwrap_or("").split(',').map(str::trim)
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// Leaves a response's headers, as another reader (hyper's client) parsed them, with one
/// framing in one value, as [`head_from`] does for the responses read here: Content-Length goes
/// beside Transfer-Encoding, a Content-Length list or repeat becomes one number. Fails, for a
/// 502, on what cannot be made unambiguous: chunked not once and last, differing lengths.
pub fn one_framing(headers: &mut HeaderMap) -> Result<(), Error> {
    let mut chunked = None;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        chunked = Some(chunked_last(value, chunked)?);
    }
    if chunked.is_some() {
        headers.remove(header::CONTENT_LENGTH);
        return Ok(());
    }
    let (mut length, mut values, mut plain) = (None, 0, false);
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let (parsed, is_plain) = content_length(value, length)?;
        // A lone value that is one number as it is stays; anything else becomes that number.
        plain = is_plain;
        length = Some(parsed);
        values += 1;
    }
    if let Some(length) = length {
        if values > 1 || !plain {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    Ok(())
}

/// Whether a message's transfer codings, `value` and the `earlier` lines', end with chunked.
/// Chunked frames the body only when applied once and last (RFC 9112 §6.1): before another
/// coding or after itself it would let a recipient that reads it otherwise find another end.
fn chunked_last(value: &HeaderValue, earlier: Option<bool>) -> Result<bool, Error> {
    let mut chunked = earlier == Some(true);
    let mut any = false;
    for coding in tokens(value).filter(|t| !t.is_empty()) {
        if chunked {
            return Err(invalid(format!(
                "Transfer-Encoding {value:?}: a coding after chunked (chunked must come once, last)"
            )));
        }
        chunked = coding.eq_ignore_ascii_case("chunked");
        any = true;
    }
    if any {
        Ok(chunked)
    } else {
        Err(invalid(
            "an empty Transfer-Encoding (expected codings ending with chunked)",
        ))
    }
}

/// A Content-Length value (possibly a list of one repeated number, RFC 9110 §8.6) that must
/// agree with any earlier one, and whether the value was that number alone (it can then be
/// passed on as it is).
fn content_length(value: &HeaderValue, earlier: Option<u64>) -> Result<(u64, bool), Error> {
    let agreed = |length: Option<u64>, parsed: u64| match length {
        Some(length) if length != parsed => Err(invalid("conflicting Content-Length values")),
        _ => Ok(parsed),
    };
    // The usual value is one number: read it without splitting it as a list.
    if let Some(parsed) = decimal(value.as_bytes()) {
        return Ok((agreed(earlier, parsed)?, true));
    }
    let mut length = earlier;
    for token in tokens(value) {
        let parsed = decimal(token.as_bytes())
            .ok_or_else(|| invalid(format!("Content-Length {token:?}")))?;
        length = Some(agreed(length, parsed)?);
    }
    let length = length.ok_or_else(|| invalid("an empty Content-Length"))?;
    Ok((length, false))
}

/// A number of decimal digits only (no sign, no space), as Content-Length takes it: `None` when
/// empty, anything else, or past `u64`. One pass over the bytes, on every response's length.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |number, &digit| {
        let digit = digit.wrapping_sub(b'0');
        (digit < 10)
            .then(|| number.checked_mul(10)?.checked_add(u64::from(digit)))
            .flatten()
    })
}

/// Where the body reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Until the server closes.
    Close,
    Done,
    /// Broken off; the error is still to be returned.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// A response body read from the upstream connection as the client's side asks for it.
#[derive(Debug)]
pub struct UpstreamBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    home: Option<Home>,
    error: Option<Error>,
}

impl UpstreamBody {
    /// The body is complete: the connection goes home if it can serve again.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) {
            if self.keep_alive && conn.buf.is_empty() {
                match home {
                    Home::Slot(slot) => {
                        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn)
                    }
                    Home::Pool(endpoint) => checkin(&endpoint, conn),
                }
            }
        }
    }

    /// Stops reading after an error: the connection is dropped, never reused. The error is
    /// returned on the next poll, after a yield: hyper flushes what the client has been sent so
    /// far (the head at least), so the client sees a response cut short rather than none.
    fn fail(
        &mut self,
        error: Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.state = State::Failed;
        self.conn = None;
        self.error = Some(error);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Takes up to `limit` buffered bytes as one data frame.
fn take_data(buf: &mut BytesMut, limit: u64) -> Bytes {
    let n = usize::try_from(limit).map_or(buf.len(), |limit| limit.min(buf.len()));
    buf.split_to(n).freeze()
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let want = match body_step(&mut this.state, &mut conn.buf) {
                Ok(BodyStep::More(want)) => want,
                Ok(BodyStep::Frame(frame)) => {
                    if this.state == State::Done {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(BodyStep::End) => {
                    if this.state == State::Done {
                        this.finish();
                    }
                    return Poll::Ready(None);
                }
                Err(error) => return this.fail(error, cx),
            };
            match ready!(conn.poll_fill(cx, want)) {
                Ok(0) if matches!(this.state, State::Close) => {
                    // A body framed by the close: the close is its end.
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(invalid("the connection closed inside the body"), cx),
                Ok(_) => {}
                Err(error) => return this.fail(Error::Io(error), cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(left) => SizeHint::with_exact(left),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// What the body framing makes of the bytes buffered so far.
#[derive(Debug)]
pub enum BodyStep {
    /// A data frame, or the trailers. `state` is `Done` if it ended the body.
    Frame(Frame<Bytes>),
    /// The body has ended (`state` is `Done`), or was broken off before (`Failed`).
    End,
    /// More bytes are needed: ask the socket for about this many.
    More(usize),
}

/// Reads the body framing `state` from what `buf` holds, taking what it uses. The socket side
/// ([`UpstreamBody`]) and the fuzz targets both read bodies through it; an end of stream is the
/// caller's to judge (the end of a body framed by the close, else an error).
pub fn body_step(state: &mut State, buf: &mut BytesMut) -> Result<BodyStep, Error> {
    loop {
        // What the buffer holds is used first; the socket is read only when it is not enough.
        match *state {
            State::Done | State::Failed => return Ok(BodyStep::End),
            State::Length(left) => {
                if buf.is_empty() {
                    return Ok(BodyStep::More(usize::try_from(left).unwrap_or(READ_MAX)));
                }
                let data = take_data(buf, left);
                let left = left - data.len() as u64;
                *state = if left == 0 {
                    State::Done
                } else {
                    State::Length(left)
                };
                return Ok(BodyStep::Frame(Frame::data(data)));
            }
            State::Close => {
                if buf.is_empty() {
                    return Ok(BodyStep::More(READ_MAX));
                }
                return Ok(BodyStep::Frame(Frame::data(buf.split().freeze())));
            }
            // The limits below are on the line and the section, wherever the reads split them:
            // what the buffer holds without their end is already longer.
            State::Chunked(Chunk::Size) => match buf.iter().position(|&b| b == b'\n') {
                Some(end) if end > MAX_CHUNK_LINE => {
                    return Err(invalid("a chunk-size line over 4 KiB"))
                }
                Some(end) => {
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 1);
                    *state = State::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                None if buf.len() > MAX_CHUNK_LINE => {
                    return Err(invalid("a chunk-size line over 4 KiB"))
                }
                None => return Ok(BodyStep::More(READ_MIN)),
            },
            State::Chunked(Chunk::Data(left)) => {
                if buf.is_empty() {
                    return Ok(BodyStep::More(usize::try_from(left).unwrap_or(READ_MAX)));
                }
                let data = take_data(buf, left);
                let left = left - data.len() as u64;
                *state = State::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                return Ok(BodyStep::Frame(Frame::data(data)));
            }
            State::Chunked(Chunk::DataEnd) => {
                if buf.len() < 2 {
                    return Ok(BodyStep::More(READ_MIN));
                }
                if !buf.starts_with(b"\r\n") {
                    return Err(invalid("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = State::Chunked(Chunk::Size);
            }
            State::Chunked(Chunk::Trailers) => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    *state = State::Done;
                    return Ok(BodyStep::End);
                }
                match find(buf, b"\r\n\r\n") {
                    Some(end) if end > MAX_HEAD => return Err(invalid("trailers over 64 KiB")),
                    Some(end) => {
                        let trailers = parse_trailers(&buf[..end + 4])?;
                        buf.advance(end + 4);
                        *state = State::Done;
                        return Ok(BodyStep::Frame(Frame::trailers(trailers)));
                    }
                    None if buf.len() > MAX_HEAD + 3 => {
                        return Err(invalid("trailers over 64 KiB"))
                    }
                    None => return Ok(BodyStep::More(READ_MIN)),
                }
            }
        }
    }
}

/// The size on a chunk-size line (without its LF), extensions ignored.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .map_or(line, |end| &line[..end]);
    if digits.is_empty() || digits.len() > 15 {
        return Err(invalid("a bad chunk size"));
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = (b as char)
            .to_digit(16)
            .ok_or_else(|| invalid("a bad chunk size"))?;
        Ok(size << 4 | u64::from(digit))
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn parse_trailers(block: &[u8]) -> Result<HeaderMap, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(block, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| invalid("a trailer name"))?;
                let value =
                    HeaderValue::from_bytes(field.value).map_err(|_| invalid("a trailer value"))?;
                trailers.append(name, value);
            }
            Ok(trailers)
        }
        _ => Err(invalid("malformed trailers")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Sends a GET through [`send`] to a server that answers `response` one byte at a time, so
    /// every parser state meets a read boundary; returns the decoded frames and the slot.
    async fn dribbled(response: &'static [u8]) -> (Vec<Frame<Bytes>>, Slot) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            for byte in response {
                socket.write_all(&[*byte]).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_micros(300)).await;
            }
        });
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let head = RequestHead::new(&parts, &SizeHint::with_exact(0), addr).unwrap();
        let conn = Conn::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let slot = Slot::default();
        let mut body = send::<hyper::body::Incoming>(conn, &head, None, Home::Slot(slot.clone()))
            .await
            .unwrap()
            .into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap());
        }
        assert!(body.is_end_stream());
        server.await.unwrap();
        (frames, slot)
    }

    fn data(frames: &[Frame<Bytes>]) -> Vec<u8> {
        frames
            .iter()
            .filter_map(Frame::data_ref)
            .flatten()
            .copied()
            .collect()
    }

    #[tokio::test]
    async fn chunked_bodies_and_trailers_survive_any_read_boundary() {
        let (frames, slot) = dribbled(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-sum: 42\r\n\r\n",
        )
        .await;
        assert_eq!(data(&frames), b"hello world");
        let trailers = frames.last().and_then(Frame::trailers_ref).unwrap();
        assert_eq!(trailers["x-sum"], "42");
        assert!(
            slot.lock().unwrap().is_some(),
            "a complete response frees the connection"
        );
    }

    #[tokio::test]
    async fn length_bodies_survive_any_read_boundary() {
        let (frames, slot) =
            dribbled(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world").await;
        assert_eq!(data(&frames), b"hello world");
        assert!(slot.lock().unwrap().is_some());
    }

    #[tokio::test]
    async fn a_close_delimited_body_ends_at_the_close_and_frees_nothing() {
        let (frames, slot) = dribbled(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
        assert_eq!(data(&frames), b"until the end");
        assert!(
            slot.lock().unwrap().is_none(),
            "a closed connection is not reused"
        );
    }

    #[test]
    fn chunk_sizes_are_hex_with_extensions_ignored() {
        assert_eq!(chunk_size(b"1a\r").unwrap(), 26);
        assert_eq!(chunk_size(b"FF;name=value\r").unwrap(), 255);
        assert_eq!(chunk_size(b"0").unwrap(), 0);
        for bad in [&b"\r"[..], b"xyz\r", b"-1\r", b"1234567890abcdef0\r"] {
            assert!(chunk_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_frames_a_body_only_once_and_last() {
        let value = |s: &'static str| HeaderValue::from_static(s);
        for (codings, earlier, chunked) in [
            ("chunked", None, Some(true)),
            ("gzip, Chunked", None, Some(true)),
            ("chunked", Some(false), Some(true)),
            ("gzip", None, Some(false)),
            ("chunked, gzip", None, None),
            ("chunked, chunked", None, None),
            ("chunked", Some(true), None),
            ("gzip", Some(true), None),
            (" , ", None, None),
        ] {
            let got = chunked_last(&value(codings), earlier).ok();
            assert_eq!(got, chunked, "{codings:?} after {earlier:?}");
        }
    }

    #[test]
    fn one_framing_leaves_one_value_or_fails() {
        let headers = |fields: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in fields {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        let framing = |map: &HeaderMap| {
            let all = |name| {
                map.get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_string())
            };
            (
                all("content-length").collect::<Vec<_>>(),
                all("transfer-encoding").collect::<Vec<_>>(),
            )
        };
        for (fields, length, codings) in [
            (&[("content-length", "5")][..], vec!["5"], vec![]),
            (&[("content-length", "5, 5")], vec!["5"], vec![]),
            (
                &[("content-length", "5"), ("content-length", "5")],
                vec!["5"],
                vec![],
            ),
            (
                &[("content-length", "5"), ("transfer-encoding", "chunked")],
                vec![],
                vec!["chunked"],
            ),
            (&[("transfer-encoding", "gzip")], vec![], vec!["gzip"]),
        ] {
            let mut map = headers(fields);
            one_framing(&mut map).unwrap();
            assert_eq!(
                framing(&map),
                (
                    length.iter().map(|s| s.to_string()).collect(),
                    codings.iter().map(|s| s.to_string()).collect()
                ),
                "{fields:?}"
            );
        }
        for fields in [
            &[("content-length", "5, 6")][..],
            &[("content-length", "5"), ("content-length", "6")],
            &[("transfer-encoding", "chunked, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "gzip"),
            ],
        ] {
            assert!(one_framing(&mut headers(fields)).is_err(), "{fields:?}");
        }
    }

    #[test]
    fn content_length_lists_must_agree() {
        let value = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(content_length(&value("42"), None).unwrap(), (42, true));
        assert_eq!(content_length(&value("42, 42"), None).unwrap(), (42, false));
        assert!(content_length(&value("42, 43"), None).is_err());
        assert!(content_length(&value("42"), Some(41)).is_err());
        assert!(content_length(&value("+42"), None).is_err());
        assert!(content_length(&value(""), None).is_err());
        assert!(content_length(&value("4 2"), None).is_err());
        assert!(content_length(&value("-1"), None).is_err());
        assert_eq!(content_length(&value("0042"), None).unwrap(), (42, true));
        assert_eq!(content_length(&value(" 7 ,7"), None).unwrap(), (7, false));
        assert_eq!(
            content_length(&value("18446744073709551615"), None).unwrap(),
            (u64::MAX, true)
        );
        assert!(content_length(&value("18446744073709551616"), None).is_err());
    }

    /// Reads a response that comes in two reads at most (the first ends at `split`): its body
    /// bytes, or the error it stopped at.
    async fn read_in_two(response: &[u8], split: usize) -> Result<Vec<u8>, String> {
        let (first, second) = response.split_at(split);
        let mut io = AsyncReadExt::chain(first, second);
        let mut buf = BytesMut::new();
        let (_, mut state, _) = read_head(&mut io, &mut buf, &Method::GET, false)
            .await
            .map_err(|(error, _)| error.to_string())?;
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        buf.extend_from_slice(&rest);
        let mut body = Vec::new();
        loop {
            match body_step(&mut state, &mut buf).map_err(|error| error.to_string())? {
                BodyStep::Frame(frame) => body.extend(frame.into_data().unwrap_or_default()),
                BodyStep::End => return Ok(body),
                BodyStep::More(_) => return Err("more wanted".to_string()),
            }
        }
    }

    /// Found with the h1_response fuzz target's check that a response read in pieces reads as
    /// it does whole (fuzz/regressions/h1_response): a head, chunk-size line or trailer section
    /// over its limit was refused only when its reads split it finely; in larger reads it
    /// passed. The limits are now on their length.
    #[tokio::test]
    async fn limits_hold_when_everything_comes_in_one_read() {
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let extension = format!("{chunked}5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(5000));
        let trailers = format!("{chunked}0\r\nx: {}\r\n\r\n", "b".repeat(70_000));
        let head = format!(
            "HTTP/1.1 200 OK\r\nx: {}\r\ncontent-length: 0\r\n\r\n",
            "c".repeat(66_000)
        );
        // The head in two reads: the first leaves the buffer just under the limit, and the
        // second, into a buffer grown to twice that, completes it.
        for (response, split, error) in [
            (&extension, extension.len(), "a chunk-size line over 4 KiB"),
            (&trailers, trailers.len(), "trailers over 64 KiB"),
            (&head, 60_000, "a response head over 64 KiB"),
        ] {
            let read = read_in_two(response.as_bytes(), split).await;
            assert_eq!(read, Err(format!("invalid response: {error}")), "{error}");
        }
        // Just within the limits, all pass.
        let extension = format!("{chunked}5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(4000));
        let read = read_in_two(extension.as_bytes(), extension.len()).await;
        assert_eq!(read.unwrap(), b"hello");
        let trailers = format!("{chunked}0\r\nx: {}\r\n\r\n", "b".repeat(60_000));
        let read = read_in_two(trailers.as_bytes(), trailers.len()).await;
        assert_eq!(read.unwrap(), b"");
    }
}
