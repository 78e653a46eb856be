//! An HTTP/1.1 and HTTP/2 (prior knowledge) server that answers every request with its own name:
//! the endpoints behind a Service, so a test (or the demo) can count which one answered.
//!
//! `/sleep/<ms>[/…]` answers after that many milliseconds, on top of the server's own delay.
//! A server made with [`Echo::pod`] plays a pod of the Gateway API conformance instead: it answers
//! with a JSON [report](Echo::pod) of what it received, and gRPC calls (`application/grpc`) with
//! that report as the one message, `grpc-status: 0` in the trailers. Any server obeys
//! `x-echo-delay: <ms>` (answer that much later) and `x-echo-fail: <action>/<times>`: the first
//! `<times>` requests carrying the same `x-echo-key` (else the same path) get `<action>` instead
//! of an answer, a status code (`503`), `reset` (the connection or stream dropped, unanswered) or
//! `sleep<ms>` (answered that much later): how a test makes a flaky endpoint for retries.
//! [`Backend`] runs one inside a namespace on a thread of its own and can be killed as a process
//! would be: the listener and every connection closed at once, requests in flight unanswered.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{http, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::NetNs;

/// What one server has seen.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Requests that reached the handler (including those after a kill, never answered).
    pub received: usize,
    /// Requests whose answer the handler returned.
    pub answered: usize,
    /// Requests in the handler when the server was killed.
    pub in_flight_at_kill: usize,
    /// When each request arrived, in order.
    pub arrivals: Vec<Instant>,
    /// Each request's `x-echo-key` (else its path and query), in order of arrival.
    pub keys: Vec<String>,
    /// Each request's key and the length of the body received, once read.
    pub bodies: Vec<(String, usize)>,
    killed: bool,
    /// How many times each key has had its `x-echo-fail` action.
    failed: HashMap<String, u32>,
}

impl Stats {
    /// Requests received and never answered: the ones a client may have seen fail.
    pub fn unanswered(&self) -> usize {
        self.received - self.answered
    }

    /// Requests that arrived at or after `since`.
    pub fn arrived_since(&self, since: Instant) -> usize {
        self.arrivals.iter().filter(|&&at| at >= since).count()
    }

    /// Requests whose key starts with `prefix`.
    pub fn keyed(&self, prefix: &str) -> usize {
        self.keys
            .iter()
            .filter(|key| key.starts_with(prefix))
            .count()
    }
}

/// The pod a conformance echo server plays, as its report names it.
#[derive(Debug, Clone)]
struct PodIdentity {
    namespace: String,
    /// Every answer has this status (the report still in the body): a backend that always fails.
    status: StatusCode,
}

/// What `x-echo-fail` asks for, the first few times a key is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailAction {
    Status(StatusCode),
    Reset,
    Sleep(Duration),
}

impl FailAction {
    /// `<action>/<times>`, e.g. `503/2`, `reset/1`, `sleep1000/1`.
    fn parse(value: &str) -> Option<(Self, u32)> {
        let (action, times) = value.split_once('/')?;
        let times = times.trim().parse().ok()?;
        let action = match action.trim() {
            "reset" => Self::Reset,
            sleep if sleep.starts_with("sleep") => {
                Self::Sleep(Duration::from_millis(sleep["sleep".len()..].parse().ok()?))
            }
            code => Self::Status(StatusCode::from_u16(code.parse().ok()?).ok()?),
        };
        Some((action, times))
    }
}

/// The error that makes hyper drop a connection (HTTP/1.1) or reset a stream (HTTP/2) unanswered.
#[derive(Debug)]
pub struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped on purpose (x-echo-fail: reset)")
    }
}

impl std::error::Error for Dropped {}

/// A response body: one data frame, then trailers if any (gRPC's status).
#[derive(Debug, Default)]
pub struct Answer {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Answer {
    fn text(data: impl Into<Bytes>) -> Self {
        Self {
            data: Some(data.into()),
            trailers: None,
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|trailers| Ok(Frame::trailers(trailers))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let length = self.data.as_ref().map_or(0, |data| data.len() as u64);
        if self.trailers.is_some() {
            let mut hint = SizeHint::new();
            hint.set_lower(length);
            hint
        } else {
            SizeHint::with_exact(length)
        }
    }
}

/// A gRPC message frame: uncompressed flag, big-endian length, the message.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(message);
    frame.freeze()
}

/// One echo server's identity and behaviour.
#[derive(Debug)]
pub struct Echo {
    pub name: String,
    /// Added to every request.
    pub delay: Duration,
    /// Set: the server reports what it received, as a conformance pod.
    pod: Option<PodIdentity>,
    stats: Mutex<Stats>,
}

impl Echo {
    pub fn new(name: impl Into<String>, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            delay,
            pod: None,
            stats: Mutex::new(Stats::default()),
        })
    }

    /// The pod `name` in `namespace`, answering with `status` after `delay`: every answer is a
    /// JSON object `{"namespace", "pod", "method", "path" (with the query), "host" (the Host
    /// header, else the URI's authority), "protocol" ("HTTP/1.1" or "HTTP/2.0"), "headers" (each
    /// name lower-cased, with its values in order), "body_length"}`, what the Gateway API conformance's echo
    /// server tells its client.
    pub fn pod(
        name: impl Into<String>,
        namespace: impl Into<String>,
        delay: Duration,
        status: StatusCode,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            delay,
            pod: Some(PodIdentity {
                namespace: namespace.into(),
                status,
            }),
            stats: Mutex::new(Stats::default()),
        })
    }

    pub fn stats(&self) -> Stats {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn answer(&self, request: Request<Incoming>) -> Result<Response<Answer>, Dropped> {
        let sleep = request
            .uri()
            .path()
            .strip_prefix("/sleep/")
            .and_then(|rest| rest.split('/').next()?.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or_default();
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        let asked_delay = header("x-echo-delay")
            .and_then(|ms| ms.trim().parse().ok())
            .map(Duration::from_millis)
            .unwrap_or_default();
        let key = header("x-echo-key").map_or_else(
            || {
                request
                    .uri()
                    .path_and_query()
                    .map_or("/", |path| path.as_str())
                    .to_string()
            },
            str::to_string,
        );
        let fail = header("x-echo-fail").and_then(FailAction::parse);
        let (killed, action) = {
            let mut stats = self.lock();
            stats.received += 1;
            stats.arrivals.push(Instant::now());
            stats.keys.push(key.clone());
            let action = fail.and_then(|(action, times)| {
                let failed = stats.failed.entry(key.clone()).or_default();
                (*failed < times).then(|| {
                    *failed += 1;
                    action
                })
            });
            (stats.killed, action)
        };
        if killed {
            // A dead server answers nothing; the runtime going away drops this future.
            std::future::pending::<()>().await;
        }
        let grpc = header("content-type").is_some_and(|kind| kind.starts_with("application/grpc"));
        let (parts, mut body) = request.into_parts();
        // Counted frame by frame, so that a body cut short still counts what arrived.
        let mut body_length = 0;
        while let Some(Ok(frame)) = body.frame().await {
            body_length += frame.data_ref().map_or(0, Bytes::len);
        }
        self.lock().bodies.push((key, body_length));
        let report = self
            .pod
            .as_ref()
            .map(|pod| report(&pod.namespace, &self.name, &parts, body_length));
        let extra = match action {
            Some(FailAction::Sleep(extra)) => extra,
            _ => Duration::ZERO,
        };
        tokio::time::sleep(self.delay + sleep + asked_delay + extra).await;
        if action == Some(FailAction::Reset) {
            self.lock().answered += 1;
            return Err(Dropped);
        }
        self.lock().answered += 1;
        let failed = match action {
            Some(FailAction::Status(status)) => Some(status),
            _ => None,
        };
        let Some(report) = report else {
            let mut response = Response::new(Answer::text(format!("{}\n", self.name)));
            if let Some(status) = failed {
                *response.status_mut() = status;
            }
            return Ok(response);
        };
        let status = failed.or(self.pod.as_ref().map(|pod| pod.status));
        let mut response = if grpc {
            let mut trailers = HeaderMap::new();
            let grpc_status = match status {
                Some(status) if status != StatusCode::OK => "14",
                _ => "0",
            };
            trailers.insert("grpc-status", HeaderValue::from_static(grpc_status));
            let mut response = Response::new(Answer {
                data: Some(grpc_frame(report.as_bytes())),
                trailers: Some(trailers),
            });
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            response
        } else {
            let mut response = Response::new(Answer::text(report));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(status) = status {
                *response.status_mut() = status;
            }
            response
        };
        response.headers_mut().insert(
            "x-echo-pod",
            HeaderValue::from_str(&self.name).unwrap_or(HeaderValue::from_static("?")),
        );
        Ok(response)
    }
}

/// The JSON report of a conformance pod (see [`Echo::pod`]).
fn report(
    namespace: &str,
    pod: &str,
    request: &http::request::Parts,
    body_length: usize,
) -> String {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &request.headers {
        headers
            .entry(name.as_str().to_ascii_lowercase())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let host = request
        .headers
        .get(hyper::header::HOST)
        .map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned())
        .or_else(|| {
            request
                .uri
                .authority()
                .map(|authority| authority.to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "namespace": namespace,
        "pod": pod,
        "method": request.method.as_str(),
        "path": request.uri.path_and_query().map_or("/", |path| path.as_str()),
        "host": host,
        "protocol": format!("{:?}", request.version),
        "body_length": body_length,
        "headers": headers,
    })
    .to_string()
}

/// Serves `listener` until the future is dropped; every connection is a task of the runtime.
pub async fn serve(listener: tokio::net::TcpListener, echo: Arc<Echo>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let echo = Arc::clone(&echo);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let echo = Arc::clone(&echo);
                async move { echo.answer(request).await }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An echo server running inside a namespace, on its own thread and runtime.
pub struct Backend {
    pub addr: SocketAddr,
    pub echo: Arc<Echo>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Binds `addr` inside `ns` (so the port is open when this returns) and serves it.
    pub fn start(ns: &NetNs, addr: SocketAddr, echo: Arc<Echo>) -> Result<Self> {
        let listener = ns
            .run_in(move || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let served = Arc::clone(&echo);
        let thread = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    () = serve(listener, served) => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task: their sockets close, as a
            // killed process's would.
            drop(runtime);
        });
        Ok(Self {
            addr,
            echo,
            kill: Some(kill),
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.echo.name
    }

    pub fn stats(&self) -> Stats {
        self.echo.stats()
    }

    /// Kills the server: from now on nothing is answered, and when this returns its listener
    /// and every connection are closed. Returns its stats at the moment of the kill.
    pub fn kill(&mut self) -> Stats {
        let at_kill = {
            let mut stats = self.echo.lock();
            stats.killed = true;
            stats.in_flight_at_kill = stats.received - stats.answered;
            stats.clone()
        };
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        at_kill
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}
