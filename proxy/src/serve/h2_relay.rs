//! HTTP/2 carried frame by frame (`--h2-mode relay`, the default): the client connection and
//! one upstream connection of its own exchange their frames through the proxy unchanged, and the
//! proxy reads only what the metrics and the access log need.
//!
//! Terminating HTTP/2 ([`crate::serve::http::serve_h2`] with `--h2-mode terminate`) decodes every
//! request and response, keeps two sets of stream state and encodes everything again; that is
//! most of what an HTTP/2 request costs a proxy. Here each direction is copied as it is read.
//! The frame heads are followed in both directions: a `HEADERS` from the client on a new stream
//! starts a request, and the first final `:status` the upstream sends on that stream answers it.
//! That is one request in `requests_total` and `request_duration_seconds`, measured as the
//! terminating path measures it (to the response head). The upstream's header blocks are
//! decoded only as far as [`super::hpack`] needs to follow its dynamic table and read
//! `:status`; the client's only with `--access-log`, for the method, authority and path. The
//! log line is written when the response ends or either side resets the stream (status 0 if it
//! had no response head), as the terminating path writes it when the response body ends.
//!
//! What the two ends then own, as they would without the proxy: settings, flow control, stream
//! limits, `GOAWAY` and resets, retrying the streams the upstream refused or left unprocessed.
//! A stream reset before its response head counts as no request, and a connection that fails
//! (the upstream vanished, say) is reset on both sides. When the drain starts, the proxy tells
//! the client `GOAWAY` (last stream 2^31-1, `NO_ERROR`: every stream it has sent so far reaches
//! the upstream) at the next frame boundary after the upstream's first frame, and the connection
//! ends when the client closes it or the drain timeout does. A destination that cannot be
//! reached is left to the terminating path, which answers 502.

use std::future::{poll_fn, Future};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::{pin, Pin};
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Instant;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

use super::{hpack, ClientIo};
use crate::client::connect::reset;
use crate::io::Io;
use crate::metrics::Protocol;
use crate::proxy::Context;
use crate::telemetry::access_log::AccessLog;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, which the client sends before its first frame.
const PREFACE_LEN: usize = 24;
/// Read at most this much at a time in each direction: one frame at the default size.
const BUF: usize = 16 * 1024;
/// `GOAWAY`, last stream 2^31-1, `NO_ERROR` (RFC 9113 §6.8).
const GOAWAY: [u8; 17] = [
    0, 0, 8, 7, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0,
];
/// The largest header-carrying frame payload or header block the proxy collects to read a
/// status. A larger one stops the counting on that connection; its bytes still pass.
const MAX_BLOCK: usize = 256 * 1024;
/// Requests awaiting their response head that the proxy keeps track of. Beyond it (the
/// upstream's stream limit is usually 100–250), new streams pass uncounted.
const MAX_TRACKED: usize = 4096;

// Frame types and flags (RFC 9113 §6).
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const PUSH_PROMISE: u8 = 5;
const GOAWAY_TYPE: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Carries one prior-knowledge HTTP/2 client connection over `upstream`, already connected to
/// its original destination, until both sides have closed. Either side may be mTLS (a meshed
/// client terminated here, a meshed upstream dialled so): the frames inside are the same.
pub async fn relay(client: ClientIo, mut upstream: Io, target: SocketAddr, cx: Context) {
    let (mut client, first) = client.into_parts();
    let mut relay = Relay {
        // Detection reads at most about two reads' worth; the buffer takes it whole.
        up: Flow::new(BUF.max(first.len())),
        // Room behind a full read for a `GOAWAY` put in at a frame boundary.
        down: Flow::new(BUF + GOAWAY.len()),
        follower: Follower::new(cx, target),
        draining: false,
        told_goaway: false,
    };
    // The bytes detection read come first.
    let n = first.len();
    relay.up.buf[..n].copy_from_slice(&first);
    relay.up.end = n;
    relay.observe_client(n);

    let mut drain = pin!(cx.proxy.drain.signaled());
    let result = poll_fn(|task| {
        if !relay.draining && drain.as_mut().poll(task).is_ready() {
            relay.draining = true;
        }
        relay.poll(task, &mut client, &mut upstream)
    })
    .await;
    if let Err(error) = result {
        // Requests in flight fail with it: worth a warning, as a 502 is on the terminating path.
        let in_flight = relay.follower.in_flight();
        if in_flight > 0 {
            warn!(direction = cx.direction(), destination = %target, %error, in_flight, "relayed HTTP/2 connection failed; resetting both sides");
        } else {
            debug!(direction = cx.direction(), destination = %target, %error, "relayed HTTP/2 connection ended with an error; resetting both sides");
        }
        reset(client.into_tcp());
        reset(upstream.into_tcp());
    }
}

/// One direction's bytes: read into `buf`, then written out from `start` to `end`.
struct Flow {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The source has closed.
    eof: bool,
    /// The destination's write side has been shut down after `eof`.
    done: bool,
}

impl Flow {
    fn new(size: usize) -> Self {
        Self {
            buf: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            done: false,
        }
    }

    /// Writes what is pending to `dst` (and through TLS, flushes it); then, if `src` has
    /// closed, shuts `dst`'s write side. Ready once nothing is pending (`Ok(true)` if the flow
    /// has ended).
    fn poll_write(
        &mut self,
        task: &mut TaskContext<'_>,
        dst: &mut Io,
        mut written: impl FnMut(usize),
    ) -> Poll<io::Result<bool>> {
        match dst {
            Io::Plain(dst) => {
                while self.start < self.end {
                    ready!(dst.poll_write_ready(task))?;
                    match dst.try_write(&self.buf[self.start..self.end]) {
                        Ok(n) => {
                            self.start += n;
                            written(n);
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(error) => return Poll::Ready(Err(error)),
                    }
                }
            }
            Io::Tls(dst) => {
                let mut dst = Pin::new(dst.as_mut());
                while self.start < self.end {
                    match ready!(dst
                        .as_mut()
                        .poll_write(task, &self.buf[self.start..self.end]))?
                    {
                        0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        n => {
                            self.start += n;
                            written(n);
                        }
                    }
                }
                // rustls keeps the records a socket would not take yet.
                ready!(dst.poll_flush(task))?;
            }
        }
        (self.start, self.end) = (0, 0);
        if self.eof && !self.done {
            // A half-close: the peer reads an end of stream and may still answer. Through TLS,
            // a close_notify first (TLS 1.3 lets the other direction go on).
            let shut = match dst {
                Io::Plain(dst) => SockRef::from(&*dst).shutdown(Shutdown::Write),
                Io::Tls(dst) => ready!(Pin::new(dst.as_mut()).poll_shutdown(task)),
            };
            if let Err(error) = shut {
                if error.kind() != io::ErrorKind::NotConnected {
                    return Poll::Ready(Err(error));
                }
            }
            self.done = true;
        }
        Poll::Ready(Ok(self.done))
    }

    /// Reads what `src` has into the empty buffer: `Ok(n)`, 0 when it has closed.
    fn poll_read(&mut self, task: &mut TaskContext<'_>, src: &mut Io) -> Poll<io::Result<usize>> {
        let n = match src {
            Io::Plain(src) => loop {
                ready!(src.poll_read_ready(task))?;
                match src.try_read(&mut self.buf[..BUF]) {
                    Ok(n) => break n,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(error) => return Poll::Ready(Err(error)),
                }
            },
            Io::Tls(src) => {
                let mut read = ReadBuf::new(&mut self.buf[..BUF]);
                match ready!(Pin::new(src.as_mut()).poll_read(task, &mut read)) {
                    Ok(()) => read.filled().len(),
                    // The peer closed its socket without a close_notify: as a plaintext
                    // client's close, the end of its side (an HTTP/2 peer tells a cut frame or
                    // stream from a finished one itself).
                    Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => 0,
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
        };
        self.eof = n == 0;
        self.end = n;
        Poll::Ready(Ok(n))
    }
}

struct Relay {
    /// Client to upstream.
    up: Flow,
    /// Upstream to client.
    down: Flow,
    follower: Follower,
    draining: bool,
    told_goaway: bool,
}

impl Relay {
    fn poll(
        &mut self,
        task: &mut TaskContext<'_>,
        client: &mut Io,
        upstream: &mut Io,
    ) -> Poll<io::Result<()>> {
        let up = self.poll_up(task, client, upstream)?;
        let down = self.poll_down(task, client, upstream)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Client to upstream; ready when that direction has ended.
    fn poll_up(
        &mut self,
        task: &mut TaskContext<'_>,
        client: &mut Io,
        upstream: &mut Io,
    ) -> Poll<io::Result<()>> {
        loop {
            if ready!(self.up.poll_write(task, upstream, |_| ()))? {
                return Poll::Ready(Ok(()));
            }
            let n = ready!(self.up.poll_read(task, client))?;
            self.observe_client(n);
        }
    }

    /// Upstream to client; ready when that direction has ended.
    fn poll_down(
        &mut self,
        task: &mut TaskContext<'_>,
        client: &mut Io,
        upstream: &mut Io,
    ) -> Poll<io::Result<()>> {
        let metrics = self.follower.book.cx.metrics;
        loop {
            let written = |n: usize| {
                metrics.tx.inc_by(n as u64);
            };
            if ready!(self.down.poll_write(task, client, written))? {
                return Poll::Ready(Ok(()));
            }
            if self.wants_goaway() && self.follower.server_frames.at_boundary() {
                // Nothing pending and no frame begun: the GOAWAY goes alone.
                self.down.buf[..GOAWAY.len()].copy_from_slice(&GOAWAY);
                self.down.end = GOAWAY.len();
                self.told_goaway = true;
                continue;
            }
            let n = ready!(self.down.poll_read(task, upstream))?;
            self.observe_server(n);
        }
    }

    fn wants_goaway(&self) -> bool {
        self.draining && !self.told_goaway && !self.follower.book.upstream_goaway
    }

    /// Counts and follows the frames of the `n` bytes just read from the client.
    fn observe_client(&mut self, n: usize) {
        self.follower.book.cx.metrics.rx.inc_by(n as u64);
        self.follower.client(&self.up.buf[..n]);
    }

    /// Follows the frames of the `n` bytes just read from the upstream, and puts the drain's
    /// `GOAWAY` in at the last frame boundary among them if it is due.
    fn observe_server(&mut self, n: usize) {
        let boundary = self.follower.server(&self.down.buf[..n]);
        if let (true, Some(at)) = (self.wants_goaway(), boundary) {
            self.down.buf.copy_within(at..n, at + GOAWAY.len());
            self.down.buf[at..at + GOAWAY.len()].copy_from_slice(&GOAWAY);
            self.down.end = n + GOAWAY.len();
            self.told_goaway = true;
        }
    }
}

/// What the relay reads of the bytes it carries: the frames of both directions and the header
/// blocks that count and log requests. Apart from the sockets so that the fuzz targets can feed
/// it bytes split as they like.
pub struct Follower {
    client_frames: Frames,
    server_frames: Frames,
    book: Book,
}

impl Follower {
    pub fn new(cx: Context, target: SocketAddr) -> Self {
        Self {
            client_frames: Frames::new(PREFACE_LEN),
            server_frames: Frames::new(0),
            book: Book::new(cx, target),
        }
    }

    /// Follows the next bytes from the client, the preface first.
    pub fn client(&mut self, bytes: &[u8]) {
        let book = &mut self.book;
        let blocks = book.requests.is_some();
        self.client_frames.feed(
            bytes,
            |head| blocks && matches!(head.kind, HEADERS | CONTINUATION),
            |head, payload| book.client_frame(head, payload),
        );
    }

    /// Follows the next bytes from the upstream. Returns the offset of the last frame boundary
    /// in them where a frame of the proxy's may go, if there is one.
    pub fn server(&mut self, bytes: &[u8]) -> Option<usize> {
        let book = &mut self.book;
        self.server_frames.feed(
            bytes,
            |head| matches!(head.kind, HEADERS | PUSH_PROMISE | CONTINUATION),
            |head, payload| book.server_frame(head, payload),
        )
    }

    /// Whether the upstream's bytes so far end where a frame of the proxy's may go.
    pub fn at_server_boundary(&self) -> bool {
        self.server_frames.at_boundary()
    }

    /// Requests tracked: awaiting their response head, or with an access log their end.
    pub fn in_flight(&self) -> usize {
        self.book.open.len()
    }

    /// Whether the upstream's requests are still counted (its header blocks could be followed).
    pub fn counting(&self) -> bool {
        self.book.counting
    }
}

/// A frame's head (RFC 9113 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(bytes: &[u8; 9]) -> Self {
        Self {
            len: usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        }
    }
}

/// What is kept of the payload of the frame being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// Not wanted: passed by.
    Skip,
    /// Wanted: gathered in `Frames::kept`.
    Keep,
    /// Wanted, but larger than `MAX_BLOCK`.
    TooLarge,
}

/// Where the frames begin and end in one direction's bytes, however they were split into reads.
struct Frames {
    /// Bytes of the preface still to pass before the first frame.
    skip: usize,
    head: [u8; 9],
    /// Bytes of `head` read so far.
    have: usize,
    /// The frame whose payload is being read, and how much of it is still to come.
    current: Option<Head>,
    remaining: usize,
    /// Whether the current frame's payload is wanted.
    payload: Payload,
    /// The wanted payload so far; kept from frame to frame so that reading one costs no
    /// allocation.
    kept: Vec<u8>,
    /// A header block has begun and a `CONTINUATION` must end it: no frame may come between.
    in_block: bool,
    /// A whole frame has passed: the first (the upstream's `SETTINGS`) must come before any
    /// frame of the proxy's.
    begun: bool,
}

impl Frames {
    fn new(skip: usize) -> Self {
        Self {
            skip,
            head: [0; 9],
            have: 0,
            current: None,
            remaining: 0,
            payload: Payload::Skip,
            kept: Vec::new(),
            in_block: false,
            begun: false,
        }
    }

    /// Between frames, after the first, where another frame may be put.
    fn at_boundary(&self) -> bool {
        self.begun && self.have == 0 && self.current.is_none() && !self.in_block
    }

    /// Reads `bytes`, calling `frame` with each frame that ends in them and its payload when
    /// `wants` asked for it (empty when not, `None` if it was too large to keep). Returns the
    /// offset of the last frame boundary in `bytes`, if there is one.
    fn feed(
        &mut self,
        bytes: &[u8],
        wants: impl Fn(&Head) -> bool,
        mut frame: impl FnMut(Head, Option<&[u8]>),
    ) -> Option<usize> {
        let mut boundary = self.at_boundary().then_some(0);
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            if self.skip > 0 {
                let n = self.skip.min(rest.len());
                self.skip -= n;
                at += n;
            } else if self.current.is_some() {
                let n = self.remaining.min(rest.len());
                if self.payload == Payload::Keep {
                    self.kept.extend_from_slice(&rest[..n]);
                }
                self.remaining -= n;
                at += n;
            } else {
                let n = (9 - self.have).min(rest.len());
                self.head[self.have..self.have + n].copy_from_slice(&rest[..n]);
                self.have += n;
                at += n;
                if self.have == 9 {
                    self.have = 0;
                    let head = Head::parse(&self.head);
                    self.current = Some(head);
                    self.remaining = head.len;
                    self.payload = match (wants(&head), head.len <= MAX_BLOCK) {
                        (false, _) => Payload::Skip,
                        (true, true) => Payload::Keep,
                        (true, false) => Payload::TooLarge,
                    };
                    self.kept.clear();
                }
            }
            if let (Some(head), 0) = (self.current, self.remaining) {
                self.current = None;
                self.begun = true;
                match head.kind {
                    HEADERS | PUSH_PROMISE | CONTINUATION => {
                        self.in_block = head.flags & END_HEADERS == 0;
                    }
                    _ => {}
                }
                match self.payload {
                    Payload::Skip => frame(head, Some(&[])),
                    Payload::Keep => frame(head, Some(&self.kept)),
                    Payload::TooLarge => frame(head, None),
                }
                if self.kept.capacity() > BUF {
                    // A large header block was read: its memory goes back.
                    self.kept = Vec::new();
                }
            }
            if self.at_boundary() {
                boundary = Some(at);
            }
        }
        boundary
    }
}

/// Reads the header blocks of one direction: joins a block's fragments and decodes it.
struct Blocks {
    decoder: hpack::Decoder,
    /// The fragments so far of a block that `CONTINUATION`s go on.
    joined: Vec<u8>,
    /// The block being read.
    of: Option<Block>,
}

/// Where a header block belongs.
#[derive(Debug, Clone, Copy)]
struct Block {
    stream: u32,
    /// A push promise, whose block is a request's, not a response's.
    push: bool,
    /// Its `HEADERS` ended the stream.
    end_stream: bool,
}

impl Blocks {
    fn new(side: hpack::Side) -> Self {
        Self {
            decoder: hpack::Decoder::new(side),
            joined: Vec::new(),
            of: None,
        }
    }

    /// Takes a `HEADERS`, `PUSH_PROMISE` or `CONTINUATION`; when it ends a block, returns where
    /// the block belongs and its fields. An error means the direction's blocks can no longer be
    /// followed.
    fn frame(
        &mut self,
        head: Head,
        payload: Option<&[u8]>,
    ) -> Result<Option<(Block, hpack::Fields)>, &'static str> {
        const TOO_LARGE: &str = "a header block too large to follow";
        let fragment = match head.kind {
            HEADERS | PUSH_PROMISE => {
                self.joined.clear();
                self.of = Some(Block {
                    stream: head.stream,
                    push: head.kind == PUSH_PROMISE,
                    end_stream: head.kind == HEADERS && head.flags & END_STREAM != 0,
                });
                payload.ok_or(TOO_LARGE)?;
                fragment_of(head, payload).ok_or("a malformed HEADERS or PUSH_PROMISE frame")?
            }
            _ => {
                if self.of.map(|block| block.stream) != Some(head.stream) {
                    return Err("a CONTINUATION without its HEADERS");
                }
                payload.ok_or(TOO_LARGE)?
            }
        };
        let complete = head.flags & END_HEADERS != 0;
        let joined;
        let block = if complete && self.joined.is_empty() {
            // The usual case, a block in one frame, is read where it lies.
            fragment
        } else {
            if self.joined.len() + fragment.len() > MAX_BLOCK {
                return Err(TOO_LARGE);
            }
            self.joined.extend_from_slice(fragment);
            if !complete {
                return Ok(None);
            }
            joined = std::mem::take(&mut self.joined);
            &joined[..]
        };
        let of = self.of.take().expect("a block has begun");
        match self.decoder.decode(block) {
            Ok(fields) => Ok(Some((of, fields))),
            Err(hpack::Malformed(why)) => Err(why),
        }
    }
}

/// A request of a relayed connection, from its `HEADERS` to its response head, or with an access
/// log to its end.
struct Open {
    stream: u32,
    start: Instant,
    answered: bool,
    log: Option<Box<AccessLog>>,
}

/// The requests of one relayed connection, and what reads their header blocks.
struct Book {
    cx: Context,
    target: SocketAddr,
    open: Vec<Open>,
    /// The highest stream the client has opened.
    last: u32,
    responses: Blocks,
    /// With `--access-log`: the client's header blocks, for the log's method, authority and path.
    requests: Option<Blocks>,
    /// Cleared when the upstream's header blocks can no longer be followed: the connection's
    /// further requests pass uncounted.
    counting: bool,
    /// The upstream has sent a `GOAWAY` itself; the drain's would raise its last stream.
    upstream_goaway: bool,
}

impl Book {
    fn new(cx: Context, target: SocketAddr) -> Self {
        Self {
            cx,
            target,
            open: Vec::new(),
            last: 0,
            responses: Blocks::new(hpack::Side::Responses),
            requests: cx
                .proxy
                .access_log
                .then(|| Blocks::new(hpack::Side::Requests)),
            counting: true,
            upstream_goaway: false,
        }
    }

    fn client_frame(&mut self, head: Head, payload: Option<&[u8]>) {
        if head.kind == HEADERS && head.stream % 2 == 1 && head.stream > self.last {
            self.last = head.stream;
            if self.counting && self.open.len() < MAX_TRACKED {
                self.open.push(Open {
                    stream: head.stream,
                    start: Instant::now(),
                    answered: false,
                    log: None,
                });
            }
        }
        match head.kind {
            HEADERS | CONTINUATION => self.request_block(head, payload),
            RST_STREAM => self.end(head.stream),
            _ => {}
        }
    }

    /// With an access log: begins the line of the request whose head a client block completes.
    fn request_block(&mut self, head: Head, payload: Option<&[u8]>) {
        let Some(requests) = &mut self.requests else {
            return;
        };
        match requests.frame(head, payload) {
            Ok(Some((block, fields))) => {
                let (cx, target) = (self.cx, self.target);
                if let Some(open) = self.find(block.stream) {
                    if open.log.is_none() {
                        let log = AccessLog::relayed(
                            cx.metrics.direction,
                            target,
                            fields.method.as_deref(),
                            fields.authority.as_deref().or(fields.host.as_deref()),
                            fields.path.as_deref(),
                            open.start,
                        );
                        open.log = Some(Box::new(log));
                    }
                }
            }
            Ok(None) => {}
            Err(why) => {
                debug!(
                    direction = self.cx.direction(),
                    why, "no longer logging this relayed connection's requests"
                );
                self.requests = None;
            }
        }
    }

    fn server_frame(&mut self, head: Head, payload: Option<&[u8]>) {
        match head.kind {
            HEADERS | PUSH_PROMISE | CONTINUATION if self.counting => {
                match self.responses.frame(head, payload) {
                    Ok(Some((block, fields))) if !block.push => {
                        if let Some(status) = fields.status.filter(|&status| status >= 200) {
                            self.answered(block.stream, status);
                        }
                        if block.end_stream {
                            self.end(block.stream);
                        }
                    }
                    Ok(_) => {}
                    Err(why) => self.stop(why),
                }
            }
            DATA => {
                if let Some(log) = self.find(head.stream).and_then(|open| open.log.as_mut()) {
                    log.bytes += head.len as u64;
                }
                if head.flags & END_STREAM != 0 {
                    self.end(head.stream);
                }
            }
            RST_STREAM => self.end(head.stream),
            GOAWAY_TYPE => self.upstream_goaway = true,
            _ => {}
        }
    }

    fn find(&mut self, stream: u32) -> Option<&mut Open> {
        self.open.iter_mut().find(|open| open.stream == stream)
    }

    /// The final response head of `stream` has come: one request. Without an access log the
    /// request is done with here.
    fn answered(&mut self, stream: u32, status: u16) {
        let Some(at) = self.open.iter().position(|open| open.stream == stream) else {
            return;
        };
        let open = &mut self.open[at];
        if open.answered {
            return;
        }
        open.answered = true;
        self.cx.metrics.latency.observe(open.start.elapsed());
        self.cx.peer.count_request(Protocol::h2, status);
        match &mut open.log {
            Some(log) => log.status = status,
            None => drop(self.open.swap_remove(at)),
        }
    }

    /// `stream` has ended or been reset: its access-log line, if any, is written.
    fn end(&mut self, stream: u32) {
        if let Some(at) = self.open.iter().position(|open| open.stream == stream) {
            self.open.swap_remove(at);
        }
    }

    fn stop(&mut self, why: &str) {
        if self.counting {
            debug!(
                direction = self.cx.direction(),
                why, "no longer counting this relayed connection's requests"
            );
        }
        self.counting = false;
        self.open = Vec::new();
    }
}

/// The header block fragment of a `HEADERS` or `PUSH_PROMISE` payload: without its padding, its
/// priority fields or its promised stream (RFC 9113 §6.2, §6.6). `None` if malformed or missing.
fn fragment_of(head: Head, payload: Option<&[u8]>) -> Option<&[u8]> {
    let mut payload = payload?;
    let mut pad = 0;
    if head.flags & PADDED != 0 {
        let (&len, rest) = payload.split_first()?;
        pad = usize::from(len);
        payload = rest;
    }
    let skip = match head.kind {
        HEADERS if head.flags & PRIORITY != 0 => 5,
        PUSH_PROMISE => 4,
        _ => 0,
    };
    let end = payload.len().checked_sub(pad)?;
    payload.get(skip..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// A frame as `Frames::feed` reported it.
    type Seen = (Head, Option<Vec<u8>>);

    /// Feeds `bytes` in pieces of `step`, collecting the frames and the boundaries reported.
    fn feed_in_steps(frames: &mut Frames, bytes: &[u8], step: usize) -> (Vec<Seen>, Vec<usize>) {
        let (mut seen, mut boundaries) = (Vec::new(), Vec::new());
        for (i, piece) in bytes.chunks(step).enumerate() {
            let boundary = frames.feed(
                piece,
                |head| head.kind == HEADERS,
                |head, payload| seen.push((head, payload.map(<[u8]>::to_vec))),
            );
            if let Some(at) = boundary {
                boundaries.push(i * step + at);
            }
        }
        (seen, boundaries)
    }

    #[test]
    fn frames_are_found_however_the_bytes_are_split() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        bytes.extend(frame(HEADERS, 0x5, 1, b"\x82\x86"));
        bytes.extend(frame(DATA, 0x1, 1, &[7; 40]));
        bytes.extend(frame(4, 1, 0, &[]));
        for step in [1, 2, 7, 9, 10, 33, bytes.len()] {
            let mut frames = Frames::new(PREFACE_LEN);
            let (seen, boundaries) = feed_in_steps(&mut frames, &bytes, step);
            let kinds: Vec<u8> = seen.iter().map(|(head, _)| head.kind).collect();
            assert_eq!(kinds, [4, HEADERS, DATA, 4], "step {step}");
            assert_eq!(seen[1].0.stream, 1);
            assert_eq!(seen[1].1.as_deref(), Some(&b"\x82\x86"[..]));
            // Not wanted: an empty payload rather than the bytes.
            assert_eq!(seen[2].1.as_deref(), Some(&[][..]));
            assert_eq!(boundaries.last(), Some(&bytes.len()), "step {step}");
            assert!(frames.at_boundary());
        }
    }

    #[test]
    fn no_boundary_before_the_first_frame_inside_a_header_block_or_inside_a_frame() {
        let mut bytes = frame(HEADERS, 0, 1, b"\x82");
        let block_end = bytes.len() + 9 + 1;
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b"\x86"));
        let mut frames = Frames::new(0);
        let (_, boundaries) = feed_in_steps(&mut frames, &bytes, 1);
        assert_eq!(boundaries, [block_end]);
        // After a first frame, a read that begins between frames may take one at its start.
        let settings = frame(4, 0, 0, &[]);
        let mut frames = Frames::new(0);
        assert_eq!(frames.feed(&settings, |_| false, |_, _| ()), Some(9));
        assert_eq!(frames.feed(&bytes[..5], |_| false, |_, _| ()), Some(0));
        assert_eq!(frames.feed(&bytes[5..12], |_| false, |_, _| ()), None);
    }

    #[test]
    fn padding_priority_and_promised_streams_are_not_part_of_the_fragment() {
        let head = |kind, flags| Head {
            len: 0,
            kind,
            flags,
            stream: 1,
        };
        let padded = [2, 0x88, 0, 0];
        assert_eq!(
            fragment_of(head(HEADERS, PADDED), Some(&padded)),
            Some(&[0x88][..])
        );
        let prioritized = [0, 0, 0, 3, 15, 0x88];
        assert_eq!(
            fragment_of(head(HEADERS, PRIORITY), Some(&prioritized)),
            Some(&[0x88][..])
        );
        let promise = [1, 0, 0, 0, 2, 0x82, 0];
        assert_eq!(
            fragment_of(head(PUSH_PROMISE, PADDED), Some(&promise)),
            Some(&[0x82][..])
        );
        assert_eq!(fragment_of(head(HEADERS, PADDED), Some(&[9, 0x88])), None);
        assert_eq!(fragment_of(head(HEADERS, PADDED), Some(&[])), None);
    }
}
