//! The upstream side of proxied HTTP/2, on the h2 crate's client directly: one [`Upstream`]
//! connection to an endpoint, dialled when first needed, whose handle the streams share.
//!
//! hyper still serves the client side. Its client side would hand every request through a
//! channel to the connection's task, spawn a task per request to wait for the response, and send
//! the response back over a oneshot: a task and three wake-ups for each stream, where one wake-up
//! does. Here the stream's own task opens the upstream stream and awaits its response; only a
//! request body needs a task of its own ([`pipe`]), since it may still be going up while the
//! response comes down. In callgrind this saves 11% of the instructions an h2 request costs.
//!
//! What this side decides (RFC 9113):
//! - The client's settings: no server push; the windows, frame size and send buffer hyper's
//!   client would use; one stream at a time until the server's SETTINGS say how many it takes.
//! - A request body goes up as its chunks come, each only once the stream has window for it, so
//!   what waits in memory per stream is the unsent rest of one chunk and the next one read.
//!   Its trailers follow; an error reading it resets the upstream stream.
//! - A response body's window is given back as the client side takes each chunk, so a client
//!   that stops reading holds the upstream stream, not the proxy's memory. A `RST_STREAM` with
//!   `NO_ERROR` after the response head ends the body early (RFC 9113 §8.1), as a finished one.
//! - A `CONNECT` accepted with a 2xx ([`tunnel`]) carries its bytes the same two ways, the
//!   client's side read into the request body's pipe; each side's end is the other's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::fast::RandomState;
use futures_util::TryStreamExt;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::ReaderStream;
use tracing::debug;

use super::{BoxError, Dialer, Endpoint, Failure};

/// The send half of an upstream HTTP/2 connection; clones share the connection.
pub type Sender = SendRequest<Bytes>;

/// Windows, frame size and send buffer as hyper's HTTP/2 client sets them.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Opens an HTTP/2 connection over `io` and drives it in a task of its own, which ends when
/// every [`Sender`] is gone and its last stream is done.
pub async fn handshake<T>(io: T, max_header_list: u32) -> Result<Sender, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(max_header_list)
        // One stream until the server's SETTINGS say how many it takes at once (they are the
        // first thing it sends). The h2 crate would assume 100, and a server with a lower limit
        // refuses the rest of a first burst; a refused request with a body cannot go again.
        .initial_max_send_streams(1)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(sender)
}

/// The largest header (or trailer) section taken over HTTP/2 from either side, as SETTINGS tell
/// the peer: the HTTP/1 path's limit, not the 16 KiB hyper defaults to, so a request with a large
/// cookie is not a 431 over one protocol only.
pub const MAX_HEADER_LIST: u32 = super::h1::MAX_HEAD as u32;

/// How long a failed dial answers for the next one on the same [`Upstream`]: long enough for
/// the first streams of an HTTP/2 client connection, which come at once, short enough that a
/// client that connected early (a gRPC channel) and sends its first call later finds a
/// destination that has come up.
const FAILED_DIAL_HOLDS: Duration = Duration::from_secs(1);

/// Whether the upstream left the stream unprocessed, so that sending it again is safe whatever
/// its method: it refused it (`REFUSED_STREAM`, RFC 9113 §8.7), or its `GOAWAY` named a last
/// stream below it (§6.8; the h2 crate fails only those streams with the `GOAWAY` itself, the
/// others go on or fail with the connection). A server shutting down gracefully, as in a
/// rolling update, does the latter to the streams in flight.
pub fn unprocessed(error: &h2::Error) -> bool {
    error.is_remote()
        && (error.is_go_away()
            || (error.is_reset() && error.reason() == Some(Reason::REFUSED_STREAM)))
}

/// One multiplexed upstream HTTP/2 connection to one [`Endpoint`], dialled when first needed
/// and again when it closes; its holders' streams share it.
pub struct Upstream {
    endpoint: Endpoint,
    dialer: Dialer,
    /// Held across the dial so that a burst of first streams opens one connection, not many;
    /// afterwards each stream holds it only to clone the handle.
    current: tokio::sync::Mutex<Option<Sender>>,
    /// A dial that failed before, and when: a dial within [`FAILED_DIAL_HOLDS`] of it fails
    /// with it instead of trying again at once.
    failed: std::sync::Mutex<Option<(io::Error, Instant)>>,
}

impl Upstream {
    /// No connection yet; `failed` is a dial to `endpoint` that just failed, if any.
    pub fn new(endpoint: Endpoint, dialer: Dialer, failed: Option<(io::Error, Instant)>) -> Self {
        Self {
            endpoint,
            dialer,
            current: tokio::sync::Mutex::new(None),
            failed: std::sync::Mutex::new(failed),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A handle that can open a stream now, and whether its connection was just dialled: on
    /// the current upstream connection (a new one if `replace`), or on a new one when the
    /// current one turns out to be closing, since no stream has left yet. For the cold paths;
    /// the per-stream path does the same inline.
    pub async fn ready_sender(&self, replace: bool) -> Result<(Sender, bool), Failure> {
        let (sender, fresh) = self.sender(replace).await?;
        match sender.ready().await {
            Ok(sender) => Ok((sender, fresh)),
            Err(_) if !fresh => {
                let (sender, _) = self.sender(true).await?;
                Ok((sender.ready().await.map_err(Failure::H2)?, true))
            }
            Err(error) => Err(Failure::H2(error)),
        }
    }

    /// The upstream connection's handle and whether it was just dialled.
    pub async fn sender(&self, replace: bool) -> Result<(Sender, bool), Failure> {
        let mut current = self.current.lock().await;
        if let Some(sender) = current.as_ref() {
            if !replace {
                return Ok((sender.clone(), false));
            }
        }
        // Boxed: the dial and the handshake are the cold path, and inline their state would
        // make every stream's future larger, copied each time hyper and tokio move it into the
        // stream's task.
        let sender = Box::pin(self.connect()).await?;
        *current = Some(sender.clone());
        Ok((sender, true))
    }

    /// A new upstream HTTP/2 connection, driven by a task of its own.
    async fn connect(&self) -> Result<Sender, Failure> {
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((error, at)) = failed {
            if at.elapsed() < FAILED_DIAL_HOLDS {
                return Err(Failure::Connect(error));
            }
        }
        let io = self.dialer.dial(&self.endpoint).await?;
        handshake(io, MAX_HEADER_LIST).await.map_err(Failure::H2)
    }
}

/// How long a worker keeps its shared connection to an endpoint that no stream has used.
pub const SHARED_IDLE: Duration = Duration::from_secs(30);

thread_local! {
    /// This worker's HTTP/2 connections to Service endpoints, shared by the streams of every
    /// client connection on the worker, and when each was last handed out.
    static SHARED: RefCell<HashMap<Endpoint, (Arc<Upstream>, Instant), RandomState>> = RefCell::new(HashMap::default());
}

/// This worker's connection to `endpoint`, shared across client connections (a Service's
/// endpoints, where each stream may go to another endpoint).
pub fn shared(endpoint: &Endpoint, dialer: Dialer) -> Arc<Upstream> {
    SHARED.with_borrow_mut(|shared| {
        let now = Instant::now();
        // Looked up per request: the key is cloned only for an endpoint new to this worker.
        if let Some((upstream, used)) = shared.get_mut(endpoint) {
            *used = now;
            return Arc::clone(upstream);
        }
        let upstream = Arc::new(Upstream::new(endpoint.clone(), dialer, None));
        shared.insert(endpoint.clone(), (Arc::clone(&upstream), now));
        upstream
    })
}

/// Drops this worker's shared connections unused for [`SHARED_IDLE`] (an endpoint that left
/// its Service among them); streams still on one finish first.
pub fn sweep_shared() {
    let _ = SHARED.try_with(|shared| {
        shared
            .borrow_mut()
            .retain(|_, (_, used)| used.elapsed() < SHARED_IDLE);
    });
}

/// Sends a request body up `stream` until it ends, the client side fails (the upstream stream
/// is then reset) or the upstream resets the stream. Run as a task of its own.
pub async fn pipe<B>(body: B, stream: SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut pipe = Pipe {
        body,
        stream,
        held: None,
    };
    if let Err(error) = std::future::poll_fn(|cx| pipe.poll(cx)).await {
        debug!(%error, "request body not sent upstream in full");
    }
}

/// Carries a `CONNECT` tunnel (RFC 9113 §8.5) until both directions have ended: the bytes of
/// `client`, the client's stream that hyper hands over once the tunnel is accepted, go up `up`,
/// and those of `down` come back. Each side's end of stream passes on as the other's
/// (half-close). An upstream reset or a failing client ends both: the upstream stream, if still
/// open, is reset as its handles drop; the client's is ended, since hyper ends a tunnel's
/// stream when it is dropped (and reads the client's `CANCEL` as an end).
pub async fn tunnel<T>(client: T, up: SendStream<Bytes>, down: RecvStream) -> Result<(), BoxError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (read, mut write) = tokio::io::split(client);
    let mut upward = Pipe {
        body: StreamBody::new(ReaderStream::with_capacity(read, TUNNEL_READ).map_ok(Frame::data)),
        stream: up,
        held: None,
    };
    let upward = async {
        std::future::poll_fn(|cx| upward.poll(cx))
            .await
            .map_err(BoxError::from)
    };
    let downward = async {
        let mut body = UpstreamBody::new(down);
        while let Some(frame) = body.frame().await {
            if let Ok(chunk) = frame?.into_data() {
                write.write_all(&chunk).await?;
            }
        }
        write.shutdown().await?;
        Ok::<_, BoxError>(())
    };
    tokio::try_join!(upward, downward).map(|_| ())
}

/// How much of a tunnel's client side is read at once: one full-size DATA frame.
const TUNNEL_READ: usize = MAX_FRAME_SIZE as usize;

struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A chunk read from the body, waiting for the stream's window; and whether it is the last.
    held: Option<(Bytes, bool)>,
}

#[derive(Debug, thiserror::Error)]
enum PipeError {
    #[error("the upstream reset the stream: {0}")]
    Reset(Reason),
    #[error("{0}")]
    Upstream(#[from] h2::Error),
    #[error("reading the client's body: {0}")]
    Client(BoxError),
    #[error("the upstream stream closed before the body was sent")]
    Closed,
}

impl<B> Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        loop {
            // Registered on every pass: the task then wakes if the upstream resets the stream
            // while it waits for the client's next chunk or for window.
            if let Poll::Ready(reset) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(PipeError::Reset(reset?)));
            }
            if let Some((chunk, last)) = self.held.take() {
                if self.stream.capacity() == 0 {
                    let wait = self.stream.poll_capacity(cx);
                    self.held = Some((chunk, last));
                    match ready!(wait) {
                        Some(Ok(_)) => continue,
                        Some(Err(error)) => return Poll::Ready(Err(error.into())),
                        None => return Poll::Ready(Err(PipeError::Closed)),
                    }
                }
                // Window for part of it is enough: the h2 crate sends the rest as more comes.
                self.stream.send_data(chunk, last)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next chunk is read before any window is claimed: a claim held while the client
            // is slow would pin connection window other streams may need.
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    self.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(PipeError::Client(error.into())));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            };
            match frame.into_data() {
                Ok(chunk) => {
                    let last = self.body.is_end_stream();
                    if chunk.is_empty() {
                        if last {
                            self.stream.send_data(chunk, true)?;
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    self.stream.reserve_capacity(1);
                    self.held = Some((chunk, last));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.stream.reserve_capacity(0);
                        self.stream.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

/// An upstream response body as the client side reads it (the HTTP/2 counterpart of
/// [`crate::client::h1::UpstreamBody`]).
pub struct UpstreamBody {
    stream: RecvStream,
    data_done: bool,
}

impl UpstreamBody {
    pub fn new(stream: RecvStream) -> Self {
        Self {
            stream,
            data_done: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // Given back as it is taken: the stream's window then follows the client.
                    let _ = self.stream.flow_control().release_capacity(chunk.len());
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Some(Err(error)) if error.reason() == Some(Reason::NO_ERROR) => {
                    return Poll::Ready(None)
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(trailers) => {
                Poll::Ready(trailers.map(|trailers: HeaderMap| Ok(Frame::trailers(trailers))))
            }
            Err(error) if error.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::stream;
    use http::Request;
    use http_body_util::StreamBody;

    use crate::http_tests::within;

    /// An h2 server on the other end of an in-memory pipe: the body of its first stream, read
    /// to its end, as the chunk lengths received and how it ended (`None` cleanly, else the
    /// reason of the reset).
    async fn receiver(io: tokio::io::DuplexStream) -> (Vec<usize>, Option<Reason>) {
        let mut connection = h2::server::handshake(io).await.unwrap();
        let (request, _respond) = connection.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while connection.accept().await.is_some() {} });
        let mut body = request.into_body();
        let mut chunks = Vec::new();
        loop {
            match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    chunks.push(chunk.len());
                }
                Some(Err(error)) => return (chunks, error.reason()),
                None => return (chunks, None),
            }
        }
    }

    /// Pipes `frames` up a new stream to [`receiver`] and returns what it saw.
    async fn piped(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> (Vec<usize>, Option<Reason>) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let received = tokio::spawn(receiver(far));
        let sender = handshake(near, 16 * 1024).await.unwrap();
        let mut sender = sender.ready().await.unwrap();
        let request = Request::post("http://receiver.test/").body(()).unwrap();
        // The response is held, as the stream's own task holds it while the body goes up.
        let (_response, stream) = sender.send_request(request, false).unwrap();
        within(
            "the pipe",
            pipe(StreamBody::new(stream::iter(frames)), stream),
        )
        .await;
        within("the receiver", received).await.unwrap()
    }

    fn chunk(len: usize) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from(vec![b'b'; len])))
    }

    #[tokio::test]
    async fn a_body_that_fails_midway_resets_the_stream_instead_of_ending_it() {
        let (chunks, end) = piped(vec![chunk(5), Err("the client went away".into())]).await;
        // The reset may overtake the chunk queued before it: h2 drops a reset stream's frames.
        assert!(chunks.iter().sum::<usize>() <= 5, "{chunks:?}");
        assert_eq!(end, Some(Reason::CANCEL));
    }

    #[tokio::test]
    async fn a_body_larger_than_the_window_passes_whole_and_ends_cleanly() {
        // 64 chunks of 16 KiB: 1 MiB against the receiver's 64 KiB initial window.
        let (chunks, end) = piped((0..64).map(|_| chunk(16 * 1024)).collect()).await;
        assert_eq!(chunks.iter().sum::<usize>(), 1024 * 1024);
        assert_eq!(end, None);
    }
}
