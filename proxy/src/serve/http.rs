//! HTTP/1.1 and HTTP/2 proxied request by request: each request goes to the endpoint its
//! [`Destination`] picks, over that endpoint's connections. Upstream connections are reused for
//! the whole client connection and, for HTTP/1, pooled per worker thread across client
//! connections; upgrades and CONNECT become byte tunnels. The upstream side of HTTP/1 is
//! [`crate::client::h1`], of HTTP/2 [`crate::client::h2`]; hyper serves the client side and
//! carries tunnels. HTTP/2 comes here only with `--h2-mode terminate`, or when the relay
//! ([`super::h2_relay`], the default) could not reach the destination (see [`super::serve_h2`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_h1;
use hyper::server::conn::{http1 as server_h1, http2 as server_h2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, warn};

use super::ClientIo;
use crate::client::h1::{self, Conn, RequestHead, UpstreamBody};
use crate::client::{h2, with_causes, Endpoint, Failure};
use crate::io::Io;
use crate::metrics::{CountingIo, Protocol, RetryReason};
use crate::outbound::balance::Pick;
use crate::outbound::service::{NoEndpoint, ServiceTarget, Start, DEFAULT_ROUTE};
use crate::outbound::Destination;
use crate::proxy::{BoxError, Context};
use crate::rate_limit::{ClientLimit, Limited};
use crate::telemetry::access_log::AccessLog;
use crate::{inbound, inbound_mtls};

mod routed;
use routed::Target;
pub use routed::REPLAY_LIMIT;

/// One client connection's destination, shared by its requests.
struct Route {
    /// Where the client connected to: what the logs and 502s name.
    target: SocketAddr,
    destination: Destination,
    cx: Context,
    protocol: Protocol,
    /// `--inbound-rate-limit` on an inbound connection.
    limit: Option<ClientLimit>,
    /// On an inbound plaintext connection to a port whose httpGet probes are all that strict
    /// mode (or `--allow-from`) lets through in plaintext: their paths.
    probe_paths: Option<&'static [String]>,
}

impl Route {
    fn new(
        target: SocketAddr,
        destination: Destination,
        cx: Context,
        protocol: Protocol,
        stream: &ClientIo,
    ) -> Self {
        let client = || {
            stream
                .get_ref()
                .tcp()
                .peer_addr()
                .ok()
                .map(|peer| peer.ip())
        };
        Self {
            target,
            destination,
            cx,
            protocol,
            limit: inbound::client_limit(&cx, client),
            probe_paths: inbound::probe_paths(&cx, target, stream.get_ref().is_tls()),
        }
    }

    /// The 403 for a plaintext request that only a probe may make, if it is one. Inlined: for
    /// any other connection a request pays one test of `probe_paths`.
    #[inline]
    fn not_a_probe(&self, uri: &http::Uri) -> Option<Response<Inner>> {
        let paths = self.probe_paths?;
        let path = uri.path_and_query().map_or("/", |path| path.as_str());
        (!inbound_mtls::is_probe_path(paths, path)).then(|| {
            forbidden("plaintext is refused here (--inbound-mtls strict or --allow-from) except the pod's probes")
        })
    }

    /// The 429 for a request over `--inbound-rate-limit`, if it is one. Inlined: without the
    /// limit, a request pays one test of `limit`.
    #[inline]
    fn over_limit(&self) -> Option<Response<Inner>> {
        let limited = self.limit?.check().err()?;
        Some(too_many_requests(limited))
    }

    async fn dial(&self, endpoint: &Endpoint) -> Result<Io, Failure> {
        self.cx.dialer().dial(endpoint).await
    }

    /// Turns the upstream result into the client's response and records it.
    fn respond(
        &self,
        start: Instant,
        log: Option<Box<AccessLog>>,
        result: Result<Response<Inner>, Failure>,
    ) -> Response<ResponseBody> {
        self.respond_as(DEFAULT_ROUTE, start, log, result, 1)
    }

    /// [`Route::respond`] for a request that `route` (its `route_requests_total` label) took,
    /// in `tries` tries.
    fn respond_as(
        &self,
        route: &str,
        start: Instant,
        log: Option<Box<AccessLog>>,
        result: Result<Response<Inner>, Failure>,
        tries: u32,
    ) -> Response<ResponseBody> {
        let response = match result {
            Ok(response) => response,
            Err(failure) => {
                let status = if matches!(failure, Failure::NoEndpoint) {
                    warn!(direction = self.cx.direction(), destination = %self.target, "no ready endpoint: answering 503");
                    StatusCode::SERVICE_UNAVAILABLE
                } else if matches!(failure, Failure::Timeout) {
                    debug!(direction = self.cx.direction(), destination = %self.target, "request timeout: answering 504");
                    StatusCode::GATEWAY_TIMEOUT
                } else if failure.is_client_error() {
                    // The client's own fault, so not worth a warning (an inbound client may be
                    // anyone); hyper closes its connection, whose request was never complete.
                    debug!(direction = self.cx.direction(), destination = %self.target, error = %failure, "answering 400");
                    StatusCode::BAD_REQUEST
                } else {
                    warn!(direction = self.cx.direction(), destination = %self.target, error = %failure, "answering 502");
                    StatusCode::BAD_GATEWAY
                };
                let body = Bytes::from(format!("remora-proxy: {}: {failure}\n", self.target));
                let mut response = Response::new(Inner::Local(Some(body)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                response
            }
        };
        let status = response.status().as_u16();
        self.cx.metrics.latency.observe(start.elapsed());
        self.cx.peer.count_request(self.protocol, status);
        if let Destination::Service(service) = &self.destination {
            service.count_request(route, status);
        }
        let log = log.map(|mut log| {
            log.status = status;
            log.tries = tries;
            log
        });
        response.map(|inner| ResponseBody { inner, log })
    }

    /// What the client's HTTP/2 stream gets when the upstream left its request unprocessed
    /// (`error`) and the request had a body: it went up with the request and is gone, so the
    /// request cannot go again from here. A 502 would tell the client the request may have been
    /// processed; `REFUSED_STREAM` (RFC 9113 §8.7) tells it the truth, that nothing was, so it
    /// may send the request again, as it would have done without the proxy (gRPC clients retry
    /// such a stream on their own). It counts as no request; the access log shows status 0.
    fn refused(&self, error: &::h2::Error) -> ::h2::Error {
        warn!(direction = self.cx.direction(), destination = %self.target, error = %with_causes(error), "the upstream left a request with a body unprocessed; refusing the client's stream so that it can send it again");
        ::h2::Error::from(::h2::Reason::REFUSED_STREAM)
    }

    fn access_log<B>(&self, request: &Request<B>, start: Instant) -> Option<Box<AccessLog>> {
        self.cx.proxy.access_log.then(|| {
            let direction = self.cx.metrics.direction;
            Box::new(AccessLog::new(
                direction,
                self.protocol,
                self.target,
                request,
                start,
            ))
        })
    }
}

/// Serves one HTTP/1 client connection until it closes or the drain asks it to.
pub async fn serve_http1(
    stream: ClientIo,
    target: SocketAddr,
    destination: Destination,
    cx: Context,
) {
    let state = Arc::new(Http1Upstream {
        route: Route::new(target, destination, cx, Protocol::http1, &stream),
        current: h1::Slot::default(),
    });
    let service = service_fn(move |request| Http1Upstream::forward(state.clone(), request));
    let io = TokioIo::new(CountingIo::new(stream, cx.metrics));
    let mut builder = server_h1::Builder::new();
    builder.timer(TokioTimer::new());
    // A client may send its request and then shut down its write side (`curl -T`, `nc -N`): it
    // still waits for the response.
    builder.half_close(true);
    // The header read timeout arms a timer for every request: only for the directions whose
    // clients may be anyone (see `inbound::context` and `outbound::context`).
    if !cx.header_read_timeout {
        builder.header_read_timeout(None);
    }
    let mut connection = pin!(builder.serve_connection(io, service).with_upgrades());
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = cx.proxy.drain.signaled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(direction = cx.direction(), destination = %target, %error, "HTTP/1 client connection ended with an error");
    }
}

/// Serves one HTTP/2 client connection terminated, request by request, its streams sharing one
/// upstream HTTP/2 connection. `failed` is the relay's dial to the destination that just
/// failed, if any (see [`super::serve_h2`]).
pub async fn serve_h2(
    stream: ClientIo,
    target: SocketAddr,
    destination: Destination,
    cx: Context,
    failed: Option<(std::io::Error, Instant)>,
) {
    let state = Arc::new(H2Upstream {
        upstream: match &destination {
            Destination::Forward(endpoint) => {
                Some(h2::Upstream::new(endpoint.clone(), cx.dialer(), failed))
            }
            Destination::Service(_) => None,
        },
        route: Route::new(target, destination, cx, Protocol::h2, &stream),
    });
    let service = service_fn(move |request| H2Upstream::forward(state.clone(), request));
    let io = TokioIo::new(CountingIo::new(stream, cx.metrics));
    let mut connection = pin!(server_h2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(h2::MAX_HEADER_LIST)
        .serve_connection(io, service));
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = cx.proxy.drain.signaled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(direction = cx.direction(), destination = %target, %error, "HTTP/2 client connection ended with an error");
    }
}

/// A 403 with `why` as its text.
#[cold]
fn forbidden(why: &str) -> Response<Inner> {
    let body = Bytes::from(format!("remora-proxy: forbidden: {why}\n"));
    let mut response = Response::new(Inner::Local(Some(body)));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Answers every request of an inbound client that `--allow-from` does not let in with 403,
/// counted as requests are; the app never sees them. HTTP/1 connections close after it.
pub async fn serve_forbidden(stream: ClientIo, h2: bool, target: SocketAddr, cx: Context) {
    let protocol = if h2 { Protocol::h2 } else { Protocol::http1 };
    let client = stream.get_ref().tcp().peer_addr().ok();
    let service = service_fn(move |_request: Request<Incoming>| async move {
        let response = forbidden("this client is not allowed in (--allow-from)");
        cx.peer
            .count_request(protocol, StatusCode::FORBIDDEN.as_u16());
        Ok::<_, Infallible>(response.map(|inner| ResponseBody { inner, log: None }))
    });
    let io = TokioIo::new(CountingIo::new(stream, cx.metrics));
    let result = if h2 {
        server_h2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service)
            .await
    } else {
        server_h1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(false)
            .serve_connection(io, service)
            .await
    };
    if let Err(error) = result {
        debug!(direction = cx.direction(), destination = %target, ?client, %error, "refused client connection ended with an error");
    }
}

/// The answer to a request over `--inbound-rate-limit`: 429, and when to come back.
#[cold]
fn too_many_requests(limited: Limited) -> Response<Inner> {
    let body = format!(
        "remora-proxy: too many requests (inbound rate limit); retry after {}s\n",
        limited.retry_after_secs
    );
    let mut response = Response::new(Inner::Local(Some(Bytes::from(body))));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(limited.retry_after_secs),
    );
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The upstream side of one HTTP/1 client connection.
struct Http1Upstream {
    route: Route,
    /// The upstream connection of this client connection, between its requests. HTTP/1 serves
    /// one request at a time, so this per-connection mutex is never contended.
    current: h1::Slot,
}

impl Http1Upstream {
    /// One request from start to end: the connection's service. It owns its `Arc` so that
    /// hyper holds this future itself, not one wrapped around it (a copy of it per request).
    async fn forward(
        self: Arc<Self>,
        mut request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let start = Instant::now();
        let log = self.route.access_log(&request, start);
        if let Some(refusal) = self.route.over_limit() {
            return Ok(self.route.respond(start, log, Ok(refusal)));
        }
        if let Some(refusal) = self.route.not_a_probe(request.uri()) {
            return Ok(self.route.respond(start, log, Ok(refusal)));
        }
        if wants_tunnel(&request) {
            let result = self.tunnel(request).await;
            return Ok(self.route.respond(start, log, result));
        }
        strip_hop_by_hop(request.headers_mut());
        let first = match &self.route.destination {
            Destination::Forward(_) => None,
            Destination::Service(service) => match service.start(start) {
                // None ready: the request waits in the Service's queue, boxed as a cold path.
                Start::Direct(Err(NoEndpoint::NoneReady)) => {
                    Some(Box::pin(service.pick_queued()).await)
                }
                Start::Direct(first) => Some(first),
                // Boxed, as the routed one: its state would otherwise enlarge every request's
                // future.
                Start::Guarded(applying) => {
                    let policy = &applying.policy;
                    let (result, tries) =
                        Box::pin(routed::serve_guarded(&*self, service, policy, request)).await;
                    return Ok(self
                        .route
                        .respond_as(DEFAULT_ROUTE, start, log, result, tries));
                }
                // Boxed: hyper keeps this future in a block of its size for each connection,
                // routed or not. Unboxed, a routed request would save about 600 instructions
                // (the allocation and free of 3,632 bytes) and every HTTP/1 connection would
                // hold 4,264 bytes there instead of 3,264.
                Start::Routed(applying) => {
                    let (route, result, tries) =
                        Box::pin(routed::serve(&*self, service, &applying, request)).await;
                    return Ok(self.route.respond_as(route, start, log, result, tries));
                }
            },
        };
        // The response comes without hop-by-hop headers: `h1` drops them as it reads the head.
        let result = self
            .send(request, first)
            .await
            .map(|response| response.map(Inner::Upstream));
        Ok(self.route.respond(start, log, result))
    }

    /// Sends to the destination's endpoint, or to the Service endpoint the balancer picked
    /// (`first`).
    async fn send(
        &self,
        request: Request<Incoming>,
        first: Option<Result<Pick, NoEndpoint>>,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let (parts, body) = request.into_parts();
        let head = RequestHead::new(&parts, &body.size_hint(), self.route.target)
            .map_err(Failure::Http1)?;
        let retryable = body.is_end_stream() && parts.method.is_idempotent();
        let mut body = Some(body);
        match (&self.route.destination, first) {
            (Destination::Service(service), Some(first)) => {
                // Boxed: its state would otherwise enlarge every forwarded request's future too.
                let target = Target::Own;
                let tries = &mut 0;
                Box::pin(
                    self.send_balanced(service, target, first, &head, &mut body, retryable, tries),
                )
                .await
            }
            (Destination::Forward(endpoint), _) => {
                self.send_to(endpoint, &head, &mut body, retryable).await
            }
            (Destination::Service(_), None) => Err(Failure::NoEndpoint),
        }
    }

    /// The balancer of `target` picks the endpoint (`first`, then others); one that cannot be
    /// connected to is skipped for another (nothing has been sent yet, so this is safe for any
    /// request). The response head ends the request's latency sample. Counts the endpoints
    /// tried in `tries`.
    #[allow(clippy::too_many_arguments)] // the Service path's and the routed one's, each its own
    async fn send_balanced(
        &self,
        service: &ServiceTarget,
        target: Target<'_>,
        first: Result<Pick, NoEndpoint>,
        head: &RequestHead,
        body: &mut Option<Incoming>,
        retryable: bool,
        tries: &mut u32,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let mut tried = Vec::new();
        let mut last_failure = None;
        let mut first = Some(first);
        loop {
            let next = match first.take() {
                Some(first) => first,
                None => target.pick(service, &tried),
            };
            let pick = match next {
                Ok(pick) => pick,
                Err(NoEndpoint::NoneReady) => return Err(Failure::NoEndpoint),
                Err(NoEndpoint::AllFailed) => {
                    return Err(last_failure.unwrap_or(Failure::NoEndpoint))
                }
            };
            if last_failure.is_some() {
                service.service.resilience.retried(RetryReason::Connect);
            }
            let endpoint = pick.endpoint();
            *tries += 1;
            match self.send_to(&endpoint, head, body, retryable).await {
                Ok(response) => {
                    pick.responded(response.status().as_u16());
                    return Ok(response);
                }
                Err(failure @ Failure::Connect(_)) => {
                    debug!(direction = self.route.cx.direction(), destination = %self.route.target, %endpoint, error = %failure, "endpoint refused; trying another");
                    tried.push(endpoint.addr);
                    pick.failed();
                    last_failure = Some(failure);
                }
                Err(failure) => return Err(failure),
            }
        }
    }

    /// Sends on this connection's upstream connection to `endpoint`, else a pooled one, else a
    /// new one. An idempotent request without a body is retried once on a new connection when a
    /// reused one fails before answering (the server closed it as the request went out).
    async fn send_to<B: h1::RequestBody>(
        &self,
        endpoint: &Endpoint,
        head: &RequestHead,
        body: &mut Option<B>,
        retryable: bool,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let mut reused = self.take(endpoint);
        loop {
            let (conn, fresh) = match reused.take() {
                Some(conn) => (conn, false),
                None => (Conn::new(self.route.dial(endpoint).await?), true),
            };
            let home = match &self.route.destination {
                Destination::Forward(_) => h1::Home::Slot(self.current.clone()),
                Destination::Service(_) => h1::Home::Pool(endpoint.clone()),
            };
            match h1::send(conn, head, body.take(), home).await {
                Ok(response) => return Ok(response),
                Err(failed) if !fresh && retryable && failed.nothing_received => {
                    debug!(direction = self.route.cx.direction(), destination = %self.route.target, error = %failed.error, "reused upstream connection failed; retrying on a new one");
                }
                Err(failed) => return Err(Failure::Http1(failed.error)),
            }
        }
    }

    /// An upgrade or CONNECT: hyper's client sends it, and the connection becomes a tunnel once
    /// the destination accepts.
    async fn tunnel(&self, mut request: Request<Incoming>) -> Result<Response<Inner>, Failure> {
        let is_connect = request.method() == Method::CONNECT;
        let client_side = hyper::upgrade::on(&mut request);
        // A Service's tunnel goes to one endpoint, chosen as a request's is.
        let pick = match &self.route.destination {
            Destination::Forward(_) => None,
            Destination::Service(service) => {
                Some(service.pick(&[], false).map_err(|_| Failure::NoEndpoint)?)
            }
        };
        let picked = pick.as_ref().map(|pick| pick.endpoint());
        let endpoint = match (&picked, &self.route.destination) {
            (Some(picked), _) => picked,
            (None, Destination::Forward(endpoint)) => endpoint,
            (None, Destination::Service(_)) => unreachable!("a Service tunnel has picked"),
        };
        let io = match self.take(endpoint).and_then(Conn::into_stream) {
            Some(stream) => stream,
            None => self.route.dial(endpoint).await?,
        };
        let (mut sender, connection) = client_h1::handshake(TokioIo::new(io))
            .await
            .map_err(Failure::Upstream)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(%error, "upstream HTTP/1 connection ended with an error");
            }
        });
        let mut response = sender
            .send_request(request)
            .await
            .map_err(Failure::Upstream)?;
        let accepted = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (is_connect && response.status().is_success());
        if accepted {
            let upstream_side = hyper::upgrade::on(&mut response);
            let guard = self.route.cx.proxy.drain.guard();
            let direction = self.route.cx.direction();
            tokio::spawn(async move {
                let _guard = guard;
                match tokio::try_join!(client_side, upstream_side) {
                    Ok((client, upstream)) => {
                        let (mut client, mut upstream) =
                            (TokioIo::new(client), TokioIo::new(upstream));
                        if let Err(error) =
                            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                        {
                            debug!(direction, %error, "tunnel ended with an error");
                        }
                    }
                    Err(error) => debug!(direction, %error, "upgrade failed"),
                }
            });
        }
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(response.headers_mut());
        }
        if is_connect && accepted {
            // A 2xx to CONNECT has no body (RFC 9110 §9.3.6): the tunnel's bytes follow the head.
            // hyper refuses to send one with a length, and the client would get nothing.
            response.headers_mut().remove(header::CONTENT_LENGTH);
            response.headers_mut().remove(header::TRANSFER_ENCODING);
        } else if !accepted {
            // A refusal goes back as an ordinary response, read by hyper's client, which keeps
            // the framing headers as they came: hyper's server refuses to send both, or a
            // length twice, and would pass a list on.
            h1::one_framing(response.headers_mut()).map_err(Failure::Http1)?;
        }
        Ok(response.map(|body| Inner::Hyper(body, None)))
    }

    /// The connection's current upstream connection (a forward's, to its one endpoint), if
    /// usable, else a pooled one to `endpoint` (a Service's connections are all in the pool).
    fn take(&self, endpoint: &Endpoint) -> Option<Conn> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        current
            .filter(Conn::is_usable)
            .or_else(|| h1::checkout(endpoint))
    }
}

impl Drop for Http1Upstream {
    /// The client connection is gone: its upstream connection can serve other clients.
    fn drop(&mut self) {
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let (Some(conn), Destination::Forward(endpoint)) = (current, &self.route.destination) {
            if !self.route.cx.proxy.drain.is_draining() {
                h1::checkin(endpoint, conn);
            }
        }
    }
}

/// How many times one HTTP/2 request is sent again after the upstream left it unprocessed.
const MAX_REFUSALS: u32 = 2;

/// The head of a bodyless HTTP/2 request, kept to send it again.
struct Resend {
    method: Method,
    uri: http::Uri,
    version: Version,
    headers: header::HeaderMap,
}

impl Resend {
    fn of(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn request(&self) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// The head to send upstream over HTTP/2, the body if there is one, and the head again if
/// there is none.
fn prepare_h2(request: Request<Incoming>) -> (Request<()>, Option<Incoming>, Option<Resend>) {
    let (mut parts, body) = request.into_parts();
    if parts.uri.authority().is_none() {
        // RFC 9113 §8.3.1: a request may carry `Host` instead of `:authority` (one translated
        // from HTTP/1.1 does). The h2 crate sends such a request as it came (`:scheme` http,
        // no `:authority`, `Host` as a field) when its version says HTTP/1.1; as HTTP/2 it would
        // refuse it for want of an authority.
        parts.version = Version::HTTP_11;
    }
    // A bodyless request can go again if the upstream leaves its stream unprocessed (a server
    // may lower its stream limit, refuse streams when it is busy, or shut down gracefully).
    let (body, resend) = if body.is_end_stream() {
        (None, Some(Resend::of(&parts)))
    } else {
        (Some(body), None)
    };
    (Request::from_parts(parts, ()), body, resend)
}

/// The upstream side of one HTTP/2 client connection: for a forward, one multiplexed upstream
/// connection of its own; for a Service, each stream on the worker's shared connection to the
/// endpoint the balancer picks.
struct H2Upstream {
    route: Route,
    /// A forward's connection to its endpoint, whose first dial may have failed already (the
    /// relay's); `None` for a Service.
    upstream: Option<h2::Upstream>,
}

/// A Service stream's endpoint: the worker's connection to it and the balancer's pick.
type Chosen = (Arc<h2::Upstream>, Pick);

impl H2Upstream {
    /// The connection a stream goes on: the one place where an HTTP/2 stream's endpoint is
    /// chosen. A forward has one endpoint, whose connection is this client connection's own; a
    /// Service stream takes the endpoint the balancer picks from `target` (skipping `tried`,
    /// where a connect failed for it) and the worker's connection to it.
    fn choose(
        &self,
        target: Target<'_>,
        tried: &[SocketAddr],
    ) -> Result<Option<Chosen>, NoEndpoint> {
        match &self.route.destination {
            Destination::Forward(_) => Ok(None),
            Destination::Service(service) => Ok(Some(self.chosen(target.pick(service, tried)?))),
        }
    }

    /// The worker's connection to the endpoint of `pick`.
    fn chosen(&self, pick: Pick) -> Chosen {
        let endpoint = pick.endpoint();
        (h2::shared(&endpoint, self.route.cx.dialer()), pick)
    }

    fn upstream<'a>(&'a self, chosen: &'a Option<Chosen>) -> &'a h2::Upstream {
        match (chosen, &self.upstream) {
            (Some((shared, _)), _) => shared,
            (None, Some(own)) => own,
            (None, None) => unreachable!("a Service stream has chosen its endpoint"),
        }
    }

    /// One stream from start to end. hyper runs each stream as a task of its own and moves this
    /// future into it, so it is kept small: one flat future (a nested one would hold the request
    /// a second time) whose cold path, the dial, is boxed.
    ///
    /// Fails, so that hyper resets the client's stream with the error's reason, in one case: the
    /// upstream left a request with a body unprocessed (see [`Route::refused`]).
    async fn forward(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ::h2::Error> {
        let start = Instant::now();
        let log = self.route.access_log(&request, start);
        if let Some(refusal) = self.route.over_limit() {
            return Ok(self.route.respond(start, log, Ok(refusal)));
        }
        if request.method() == Method::CONNECT {
            // Boxed, as the dial is: a rare path whose state would enlarge every stream's future.
            let result = Box::pin(self.tunnel(request)).await;
            return Ok(self.route.respond(start, log, result));
        }
        // A Service stream's endpoint, when the Service path picks it here.
        let mut first = None;
        if let Destination::Service(service) = &self.route.destination {
            match service.start(start) {
                Start::Direct(Ok(pick)) => first = Some(pick),
                Start::Direct(Err(NoEndpoint::NoneReady)) => {
                    match Box::pin(service.pick_queued()).await {
                        Ok(pick) => first = Some(pick),
                        Err(_) => {
                            return Ok(self.route.respond(start, log, Err(Failure::NoEndpoint)))
                        }
                    }
                }
                Start::Direct(Err(_)) => {
                    return Ok(self.route.respond(start, log, Err(Failure::NoEndpoint)))
                }
                Start::Guarded(applying) => {
                    let policy = &applying.policy;
                    let (result, tries) =
                        Box::pin(routed::serve_guarded(&*self, service, policy, request)).await;
                    return Ok(self
                        .route
                        .respond_as(DEFAULT_ROUTE, start, log, result, tries));
                }
                Start::Routed(applying) => {
                    let (route, result, tries) =
                        Box::pin(routed::serve(&*self, service, &applying, request)).await;
                    return Ok(self.route.respond_as(route, start, log, result, tries));
                }
            }
        }
        let (head, mut body, resend) = prepare_h2(request);
        // Logged as one try, as the HTTP/1 Service path does.
        let mut tries = 0;
        let result = self
            .send(
                Target::Own,
                first,
                &mut Some(head),
                &mut body,
                resend.as_ref(),
                &mut tries,
            )
            .await;
        let streamed = resend.is_none();
        match result {
            Err(Failure::H2(error)) if streamed && h2::unprocessed(&error) => {
                Err(self.route.refused(&error))
            }
            result => Ok(self.route.respond(start, log, result)),
        }
    }

    /// Sends a request on the connection to its endpoint: `first` when the caller picked it,
    /// else one of `target`'s. An endpoint that refuses the connect is skipped for another; a
    /// bodyless request (`resend` holds its head again) that the upstream leaves unprocessed
    /// (`REFUSED_STREAM`, or past a `GOAWAY`'s last stream) goes again, up to [`MAX_REFUSALS`]
    /// times, balanced anew: both are always safe, nothing having reached the application.
    /// Counts the endpoints tried in `tries`. A request with a body left unprocessed fails
    /// with that error, for the caller to say so.
    ///
    /// The request comes by reference: this future then holds it once, in its caller's.
    async fn send(
        &self,
        target: Target<'_>,
        first: Option<Pick>,
        head: &mut Option<Request<()>>,
        body: &mut Option<Incoming>,
        resend: Option<&Resend>,
        tries: &mut u32,
    ) -> Result<Response<Inner>, Failure> {
        let mut chosen = first.map(|pick| self.chosen(pick));
        *tries += u32::from(chosen.is_some());
        let (mut tried, mut last_failure) = (Vec::new(), None);
        let (mut replace, mut refusals) = (false, 0);
        loop {
            if chosen.is_none() {
                match self.choose(target, &tried) {
                    Ok(choice) => {
                        // A try per endpoint picked; a closing connection replaced is none.
                        *tries += 1;
                        chosen = choice;
                    }
                    Err(NoEndpoint::NoneReady) => return Err(Failure::NoEndpoint),
                    Err(NoEndpoint::AllFailed) => {
                        return Err(last_failure.take().unwrap_or(Failure::NoEndpoint))
                    }
                }
            }
            // What `ready_sender` does, written out: awaited as a future of its own, it made
            // every stream's future nest one more and cost 0.4% more instructions per stream.
            let (sender, fresh) = match self.upstream(&chosen).sender(replace).await {
                Ok(sender) => sender,
                // Nothing went to that endpoint: another one takes the stream.
                Err(failure @ Failure::Connect(_)) if chosen.is_some() => {
                    if let Some((_, pick)) = chosen.take() {
                        tried.push(pick.addr());
                        pick.failed();
                    }
                    if let Destination::Service(service) = &self.route.destination {
                        service.service.resilience.retried(RetryReason::Connect);
                    }
                    last_failure = Some(failure);
                    continue;
                }
                Err(failure) => return Err(failure),
            };
            let mut sender = match sender.ready().await {
                Ok(sender) => sender,
                // The connection was closing: the request has not left, so a new one takes it.
                Err(_) if !fresh => {
                    replace = true;
                    continue;
                }
                Err(error) => return Err(Failure::H2(error)),
            };
            let request = match head.take() {
                Some(head) => head,
                None => resend
                    .expect("only a bodyless request goes again")
                    .request(),
            };
            let (response, stream) = match sender.send_request(request, body.is_none()) {
                Ok(sent) => sent,
                // The connection failed or was told to go away after it said it was ready: a
                // bodyless request goes on a new one.
                Err(_) if !fresh && resend.is_some() => {
                    replace = true;
                    continue;
                }
                Err(error) => return Err(Failure::H2(error)),
            };
            if let Some(body) = body.take() {
                tokio::spawn(h2::pipe(body, stream));
            }
            let error = match response.await {
                Ok(response) => {
                    if let Some((_, pick)) = chosen.take() {
                        pick.responded(response.status().as_u16());
                    }
                    return Ok(response.map(|stream| Inner::H2(h2::UpstreamBody::new(stream))));
                }
                Err(error) => error,
            };
            if !h2::unprocessed(&error) || resend.is_none() || refusals == MAX_REFUSALS {
                return Err(Failure::H2(error));
            }
            refusals += 1;
            if let Destination::Service(service) = &self.route.destination {
                service.service.resilience.retried(RetryReason::Connect);
            }
            debug!(direction = self.route.cx.direction(), destination = %self.route.target, %error, "upstream left the stream unprocessed; sending the request again");
            // After a GOAWAY the connection takes no new stream: `ready` then fails on it, and
            // the next pass dials a new one unless another stream already has. A Service stream
            // is balanced again.
            replace = false;
            chosen = None;
        }
    }

    /// A `CONNECT` (RFC 9113 §8.5): once the upstream answers 2xx, the client's stream and the
    /// upstream one carry bytes both ways, as a tunnel over HTTP/1.1 does. Any other answer goes
    /// back as it came. A `CONNECT` is not sent again on a refusal: it is for the client to retry.
    async fn tunnel(&self, mut request: Request<Incoming>) -> Result<Response<Inner>, Failure> {
        // hyper gives a `CONNECT` no body: the stream's bytes come through the upgrade.
        let client_side = hyper::upgrade::on(&mut request);
        let head = request.map(|_empty| ());
        let chosen = self
            .choose(Target::Own, &[])
            .map_err(|_| Failure::NoEndpoint)?;
        let (mut sender, _) = self.upstream(&chosen).ready_sender(false).await?;
        let (response, mut up) = sender.send_request(head, false).map_err(Failure::H2)?;
        let (mut parts, down) = response.await.map_err(Failure::H2)?.into_parts();
        if !parts.status.is_success() {
            // No tunnel: the request stream ends here, the answer goes back with its body.
            let _ = up.send_data(Bytes::new(), true);
            let body = Inner::H2(h2::UpstreamBody::new(down));
            return Ok(Response::from_parts(parts, body));
        }
        // The tunnel's bytes are no body: hyper refuses a 2xx to `CONNECT` that has a length.
        parts.headers.remove(header::CONTENT_LENGTH);
        let guard = self.route.cx.proxy.drain.guard();
        let direction = self.route.cx.direction();
        tokio::spawn(async move {
            let _guard = guard;
            match client_side.await {
                Ok(client) => {
                    if let Err(error) = h2::tunnel(TokioIo::new(client), up, down).await {
                        debug!(direction, %error, "tunnel ended with an error");
                    }
                }
                Err(error) => debug!(direction, %error, "upgrade failed"),
            }
        });
        Ok(Response::from_parts(parts, Inner::Local(None)))
    }
}

/// Removes the headers that concern only one hop (RFC 9110 §7.6.1): `Connection`, the headers
/// it names, `Keep-Alive` and `Proxy-Connection`. The client's connection and the upstream one are
/// managed apart: a client's `Connection: close` closes its own connection, and forwarding it
/// would close the upstream connection too, which the pool would otherwise hand to the next
/// client (a new connection per request would then cost an upstream connect each time).
fn strip_hop_by_hop(headers: &mut header::HeaderMap) {
    // Most messages carry none of them, and most others only `Connection: keep-alive` or
    // `close`: one pass over the names, then a hashed removal for each name present.
    let (mut connection, mut keep_alive, mut proxy_connection) = (false, false, false);
    for name in headers.keys().filter(|name| h1::is_hop_by_hop(name)) {
        match name.as_str() {
            "connection" => connection = true,
            "keep-alive" => keep_alive = true,
            _ => proxy_connection = true,
        }
    }
    if connection {
        // Except the framing headers: a message's framing is never one hop's alone (RFC 9112
        // §6.3), and the body that follows is forwarded. `h1` frames requests from what hyper
        // decoded; this keeps their transfer codings other than chunked.
        let listed: Vec<header::HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(h1::connection_options)
            .filter_map(|option| header::HeaderName::from_bytes(option.as_bytes()).ok())
            .filter(|name| name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING)
            .collect();
        headers.remove(header::CONNECTION);
        for name in listed {
            headers.remove(name);
        }
    }
    if keep_alive {
        headers.remove("keep-alive");
    }
    if proxy_connection {
        headers.remove("proxy-connection");
    }
}

/// An HTTP/1 request that asks to leave HTTP: `Upgrade` (WebSocket) or `CONNECT`.
fn wants_tunnel<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT || request.headers().contains_key(header::UPGRADE)
}

enum Inner {
    /// An HTTP/1 response read by [`crate::client::h1`].
    Upstream(UpstreamBody),
    /// An HTTP/2 response read by [`crate::client::h2`].
    H2(h2::UpstreamBody),
    /// A tunnel's response, read by hyper's client, and its error held back for one poll.
    Hyper(Incoming, Option<hyper::Error>),
    /// A response the proxy makes itself (502).
    Local(Option<Bytes>),
}

/// The body sent back to the client: the upstream body as it streams in, or the proxy's own.
pub struct ResponseBody {
    inner: Inner,
    log: Option<Box<AccessLog>>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let poll = match &mut this.inner {
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Hyper(_, error @ Some(_)) => Poll::Ready(error.take().map(|e| Err(e.into()))),
            Inner::Hyper(body, held) => match Pin::new(body).poll_frame(cx) {
                // As `h1`'s body does: returned at once, the error would make hyper drop the
                // connection before the head it has not flushed yet, and the client would get
                // nothing where it should see a response cut short.
                Poll::Ready(Some(Err(error))) => {
                    *held = Some(error);
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                poll => poll.map_err(Into::into),
            },
            Inner::Local(body) => Poll::Ready(body.take().map(|data| Ok(Frame::data(data)))),
        };
        if let (Some(log), Poll::Ready(Some(Ok(frame)))) = (this.log.as_mut(), &poll) {
            if let Some(data) = frame.data_ref() {
                log.bytes += data.len() as u64;
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::H2(body) => body.is_end_stream(),
            Inner::Hyper(body, _) => body.is_end_stream(),
            Inner::Local(body) => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::H2(body) => body.size_hint(),
            Inner::Hyper(body, _) => body.size_hint(),
            Inner::Local(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |data| data.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut headers = header::HeaderMap::new();
        for (name, value) in [
            ("connection", "close, X-Trace"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("x-trace", "1"),
            ("x-other", "2"),
            ("host", "example"),
            ("te", "trailers"),
        ] {
            headers.append(
                header::HeaderName::from_static(name),
                header::HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|name| name.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "te"]);
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_found() {
        // The pass that looks for any hop-by-hop name before the removals must see each one.
        for name in ["connection", "keep-alive", "proxy-connection"] {
            let mut headers = header::HeaderMap::new();
            headers.insert(
                header::HeaderName::from_static(name),
                header::HeaderValue::from_static("x"),
            );
            headers.insert(header::HOST, header::HeaderValue::from_static("example"));
            strip_hop_by_hop(&mut headers);
            let left: Vec<_> = headers.keys().map(|name| name.as_str()).collect();
            assert_eq!(left, ["host"], "{name}");
        }
    }
}
