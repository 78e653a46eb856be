//! A request to a Service that has routes, over HTTP/1 or HTTP/2: matched
//! ([`Routes::find`]), answered here when no route matches (404), its rule cannot be honoured
//! (500) or redirects (3xx); else its filters applied, a backend drawn by weight, mirrored, and
//! sent to one of the backend's endpoints under the rule's timeouts and retry policy.
//!
//! Only this path reads a request body ahead of sending it, and only when the rule retries or
//! mirrors: up to [`REPLAY_LIMIT`], and for a body of unknown length only what has already come
//! (see [`read_up_to`]). A body read in full is kept and sent again for each retry (and copied
//! to the mirrors); any other goes once, streamed after what was read, and is neither retried
//! nor mirrored. A request without a body is always replayable.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::request::Parts;
use http::{header, HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::{
    h1, h2, prepare_h2, H2Upstream, Http1Upstream, Inner, ResponseBody, Route, MAX_REFUSALS,
};
use crate::client::h1::RequestHead;
use crate::client::{Dialer, Endpoint, Failure};
use crate::metrics::{Protocol, RetryReason};
use crate::outbound::balance::Pick;
use crate::outbound::policy::Policy;
use crate::outbound::retry;
use crate::outbound::routes::{random, Filters, Retry, Routes, Rule, WeightedBackend};
use crate::outbound::service::{Applying, NoEndpoint, ServiceTarget, UNMATCHED_ROUTE};

/// The largest request body kept to be sent again (retries) or copied (mirrors).
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// One try of a request on one endpoint, in the client's protocol.
pub(super) trait TryOnce {
    fn route(&self) -> &Route;

    /// Sends `head` and the body to `endpoint`; the body is taken only once the connection is
    /// made, so that a failed connect leaves it for another endpoint.
    async fn try_once(
        &self,
        endpoint: &Endpoint,
        head: &Parts,
        body: &mut Option<RequestBody>,
    ) -> Result<Response<Inner>, Failure>;

    /// Sends a request that nothing will send again and nothing times (no retry, mirror or
    /// timeout) to `target`: what [`send_with_retries`] does for it (pick, skip an endpoint
    /// that refuses the connect, send once), by the protocol's Service path, without the
    /// general path's levels. Counts the endpoints tried in `tries`.
    async fn send_once(
        &self,
        service: &ServiceTarget,
        target: Target<'_>,
        head: Parts,
        body: Incoming,
        tries: &mut u32,
    ) -> Result<Response<Inner>, Failure>;
}

/// A request that nothing will send again, each try under `try_timeout`: the general path.
/// Boxed, so that [`TryOnce::send_once`]'s shorter way does not carry this one's state.
#[allow(clippy::too_many_arguments)] // send_with_retries's, less the body kept
async fn send_timed<U: TryOnce>(
    upstream: &U,
    service: &ServiceTarget,
    target: Target<'_>,
    retrying: &Retrying<'_>,
    try_timeout: Duration,
    head: Parts,
    body: Incoming,
    tries: &mut u32,
) -> Result<Response<Inner>, Failure> {
    let body = streamed(body);
    Box::pin(send_with_retries(
        upstream,
        service,
        target,
        retrying,
        Some(try_timeout),
        &head,
        body,
        tries,
    ))
    .await
}

impl TryOnce for Http1Upstream {
    fn route(&self) -> &Route {
        &self.route
    }

    async fn try_once(
        &self,
        endpoint: &Endpoint,
        head: &Parts,
        body: &mut Option<RequestBody>,
    ) -> Result<Response<Inner>, Failure> {
        let parts = head;
        let size = body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let request_head =
            RequestHead::new(parts, &size, self.route.target).map_err(Failure::Http1)?;
        let retryable =
            body.as_ref().is_none_or(Body::is_end_stream) && parts.method.is_idempotent();
        let response = self
            .send_to(endpoint, &request_head, body, retryable)
            .await?;
        Ok(response.map(Inner::Upstream))
    }

    async fn send_once(
        &self,
        service: &ServiceTarget,
        target: Target<'_>,
        head: Parts,
        body: Incoming,
        tries: &mut u32,
    ) -> Result<Response<Inner>, Failure> {
        let request_head = RequestHead::new(&head, &body.size_hint(), self.route.target)
            .map_err(Failure::Http1)?;
        let retryable = body.is_end_stream() && head.method.is_idempotent();
        let first = target.pick(service, &[]);
        let body = &mut Some(body);
        let response = self
            .send_balanced(
                service,
                target,
                first,
                &request_head,
                body,
                retryable,
                tries,
            )
            .await?;
        Ok(response.map(Inner::Upstream))
    }
}

impl TryOnce for H2Upstream {
    fn route(&self) -> &Route {
        &self.route
    }

    async fn try_once(
        &self,
        endpoint: &Endpoint,
        head: &Parts,
        body: &mut Option<RequestBody>,
    ) -> Result<Response<Inner>, Failure> {
        send_h2(self.route.cx.dialer(), endpoint, head, body).await
    }

    /// Also as the general path: a bodyless stream the upstream leaves unprocessed goes again.
    async fn send_once(
        &self,
        _service: &ServiceTarget,
        target: Target<'_>,
        head: Parts,
        body: Incoming,
        tries: &mut u32,
    ) -> Result<Response<Inner>, Failure> {
        let (head, mut body, resend) = prepare_h2(Request::from_parts(head, body));
        let head = &mut Some(head);
        self.send(target, None, head, &mut body, resend.as_ref(), tries)
            .await
    }
}

/// One HTTP/2 request on the worker's shared connection to `endpoint`.
async fn send_h2(
    dialer: Dialer,
    endpoint: &Endpoint,
    head: &Parts,
    body: &mut Option<RequestBody>,
) -> Result<Response<Inner>, Failure> {
    let upstream = h2::shared(endpoint, dialer);
    let (mut sender, _) = upstream.ready_sender(false).await?;
    let mut request = Request::from_parts(copy(head), ());
    if request.uri().authority().is_none() {
        // As `prepare_h2` does: sent with `Host`, as it came.
        *request.version_mut() = Version::HTTP_11;
    }
    let body = body.take().filter(|body| !body.is_end_stream());
    let (response, stream) = sender
        .send_request(request, body.is_none())
        .map_err(Failure::H2)?;
    if let Some(body) = body {
        tokio::spawn(h2::pipe(body, stream));
    }
    let response = response.await.map_err(Failure::H2)?;
    Ok(response.map(|stream| Inner::H2(h2::UpstreamBody::new(stream))))
}

/// What a request served here took: the `route` label it counts under, the response or why
/// there is none, and how many tries it took.
pub(super) type Served<'a> = (&'a str, Result<Response<Inner>, Failure>, u32);

/// Serves one request to a Service without routes under its `policy`: the whole request under
/// its timeout, and retried as its `retry-on` says (the body kept up to [`REPLAY_LIMIT`]).
/// Returns the response or why there is none, and how many tries it took.
pub(super) async fn serve_guarded<U: TryOnce>(
    upstream: &U,
    service: &Arc<ServiceTarget>,
    policy: &Policy,
    request: Request<Incoming>,
) -> (Result<Response<Inner>, Failure>, u32) {
    let (head, body) = request.into_parts();
    let replay = policy.retry.retries() && policy.retry.allows(&head.method);
    let mut tries = 0;
    let send = async {
        let body = read_ahead(body, replay).await?;
        let retrying = Retrying {
            route: None,
            policy,
            method: policy.retry.allows(&head.method),
        };
        send_with_retries(
            upstream,
            service,
            Target::Own,
            &retrying,
            None,
            &head,
            body,
            &mut tries,
        )
        .await
    };
    let result = match policy.timeout {
        Some(timeout) => tokio::time::timeout(timeout, send)
            .await
            .unwrap_or(Err(Failure::Timeout)),
        None => send.await,
    };
    (result, tries)
}

/// The body as a try sends it: kept to be sent again when `replay` (up to [`REPLAY_LIMIT`]),
/// else streamed once.
async fn read_ahead(body: Incoming, replay: bool) -> Result<RequestBody, Failure> {
    Ok(if replay && !body.is_end_stream() {
        read_up_to(body, REPLAY_LIMIT).await?
    } else {
        streamed(body)
    })
}

/// The body as a try sends it when nothing will send it again: streamed once (a body that has
/// ended is replayable still, as it holds nothing).
fn streamed(body: Incoming) -> RequestBody {
    if body.is_end_stream() {
        RequestBody::Buffered(None, None)
    } else {
        RequestBody::Streaming(body)
    }
}

/// Serves one request to `service` by its `routes`, under the Service's `policy` where the
/// rule says nothing: the rule's request timeout wins over the policy's, and a rule's `retry`
/// rules its requests (any method, its codes, attempts and backoff) while the policy's
/// `retry-on` applies to a rule without one; both draw on the Service's retry budget.
pub(super) async fn serve<'a, U: TryOnce>(
    upstream: &U,
    service: &Arc<ServiceTarget>,
    applying: &'a Applying,
    request: Request<Incoming>,
) -> Served<'a> {
    let (routes, policy) = (applying.routes(), &*applying.policy);
    let (mut parts, body) = request.into_parts();
    let Some(matched) = routes.find(&parts.method, &parts.uri, &parts.headers) else {
        let response = local(StatusCode::NOT_FOUND, "no route matches the request".into());
        return (UNMATCHED_ROUTE, Ok(response), 0);
    };
    let rule = &routes.rules[matched.rule];
    let label = &*rule.route;
    if let Some(why) = &rule.invalid {
        let text = format!("route {} cannot be honoured: {why}", rule.route);
        return (label, Ok(local(StatusCode::INTERNAL_SERVER_ERROR, text)), 0);
    }
    let port = service.service.port;
    if let Some(response) = apply(&rule.filters, &mut parts, matched.prefix, port) {
        return (label, Ok(response), 0);
    }
    let Some(weighted) = rule.choose(random()) else {
        let text = format!("route {} has no backend with a weight", rule.route);
        return (label, Ok(local(StatusCode::INTERNAL_SERVER_ERROR, text)), 0);
    };
    let backend = &routes.backends[weighted.backend];
    if !backend.resolved {
        let key = &backend.key;
        let text = format!(
            "route {}: backend {}/{}:{} does not exist or may not be referred to",
            rule.route, key.namespace, key.name, key.port
        );
        return (label, Ok(local(StatusCode::INTERNAL_SERVER_ERROR, text)), 0);
    }
    if let Some(response) = apply(&weighted.filters, &mut parts, matched.prefix, port) {
        return (label, Ok(response), 0);
    }
    let mirrors = rule.filters.mirrors.iter().chain(&weighted.filters.mirrors);
    let retrying = Retrying {
        route: rule.retry.as_ref(),
        policy,
        method: policy.retry.allows(&parts.method),
    };
    let replay = retrying.may_retry() || mirrors.clone().next().is_some();
    let timeout = rule.request_timeout.or(policy.timeout);
    let target = Target::Route(routes, weighted.backend);
    let mut tries = 0;
    if !replay && timeout.is_none() {
        // Most routed requests: nothing to read ahead or mirror, no deadline. Sent without the
        // wrapping below, whose state every level of the send would be moved through.
        let result = match rule.backend_request_timeout {
            None => {
                upstream
                    .send_once(service, target, parts, body, &mut tries)
                    .await
            }
            Some(try_timeout) => {
                send_timed(
                    upstream,
                    service,
                    target,
                    &retrying,
                    try_timeout,
                    parts,
                    body,
                    &mut tries,
                )
                .await
            }
        };
        return (label, respond_filtered(result, rule, weighted), tries);
    }
    // The request timeout counts from here: reading the body ahead, then every try.
    let send = async {
        let body = read_ahead(body, replay).await?;
        for mirror in mirrors {
            let sampled =
                u64::from(mirror.numerator) > random() % u64::from(mirror.denominator.max(1));
            if !sampled {
                continue;
            }
            match body.replay() {
                Some(mirrored) => spawn_mirror(
                    upstream.route(),
                    Arc::clone(service),
                    Arc::clone(routes),
                    mirror.backend,
                    copy(&parts),
                    mirrored,
                ),
                None => {
                    debug!(destination = %upstream.route().target, "request body not read in full: not mirrored")
                }
            }
        }
        let head = parts;
        send_with_retries(
            upstream,
            service,
            target,
            &retrying,
            rule.backend_request_timeout,
            &head,
            body,
            &mut tries,
        )
        .await
    };
    // Boxed: the fast path above does not carry this one's state.
    let result = match timeout {
        Some(timeout) => Box::pin(tokio::time::timeout(timeout, send))
            .await
            .unwrap_or(Err(Failure::Timeout)),
        None => Box::pin(send).await,
    };
    (label, respond_filtered(result, rule, weighted), tries)
}

/// The response with the rule's and the backend's response header filters applied.
fn respond_filtered(
    result: Result<Response<Inner>, Failure>,
    rule: &Rule,
    weighted: &WeightedBackend,
) -> Result<Response<Inner>, Failure> {
    result.map(|mut response| {
        let modifiers = rule
            .filters
            .response_headers
            .iter()
            .chain(&weighted.filters.response_headers);
        for modifier in modifiers {
            modifier.apply(response.headers_mut());
        }
        response
    })
}

/// Applies a rule's or backend's request filters to the request; a redirect is the response.
fn apply(
    filters: &Filters,
    parts: &mut http::request::Parts,
    prefix: &str,
    service_port: u16,
) -> Option<Response<Inner>> {
    if let Some(redirect) = &filters.redirect {
        let location = redirect.location(&parts.uri, &parts.headers, service_port, prefix);
        let mut response = Response::new(Inner::Local(None));
        *response.status_mut() = redirect.status;
        if let Ok(location) = header::HeaderValue::try_from(location) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response.headers_mut().insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from_static("0"),
        );
        return Some(response);
    }
    for modifier in &filters.request_headers {
        modifier.apply(&mut parts.headers);
    }
    if let Some(rewrite) = &filters.rewrite {
        rewrite.apply(&mut parts.uri, &mut parts.headers, prefix);
    }
    None
}

/// A copy of a request head, for a try that consumes it (HTTP/2) or a mirror; without the
/// extensions, which only hyper's own side of the request reads.
fn copy(parts: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// A response the proxy makes itself, with a line saying why.
fn local(status: StatusCode, text: String) -> Response<Inner> {
    let mut response = Response::new(Inner::Local(Some(Bytes::from(format!(
        "remora-proxy: {text}\n"
    )))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Where a try's endpoint comes from: the Service's own endpoints, or a route's backend.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    Own,
    Route(&'a Arc<Routes>, usize),
}

impl Target<'_> {
    pub(super) fn pick(
        self,
        service: &ServiceTarget,
        tried: &[SocketAddr],
    ) -> Result<Pick, NoEndpoint> {
        match self {
            Target::Own => service.pick(tried, false),
            Target::Route(routes, backend) => service.pick_backend(routes, backend, tried),
        }
    }
}

/// Which answers and failures a request is retried on, and how often: by its route rule's
/// `retry` when it has one, else by the Service policy's `retry-on` (for the methods it
/// allows).
pub(super) struct Retrying<'a> {
    route: Option<&'a Retry>,
    policy: &'a Policy,
    /// Whether the policy allows the request's method to be retried.
    method: bool,
}

impl Retrying<'_> {
    /// Whether anything may retry the request.
    fn may_retry(&self) -> bool {
        self.route.is_some() || (self.method && self.policy.retry.retries())
    }

    fn attempts(&self) -> u32 {
        match self.route {
            Some(retry) => retry.attempts,
            None if self.may_retry() => self.policy.retry.attempts,
            None => 0,
        }
    }

    /// Why `result` is retried, if it is.
    fn reason(&self, result: &Result<Response<Inner>, Failure>) -> Option<RetryReason> {
        if let Some(retry) = self.route {
            // A route retries the codes it lists, and every connection error or try timeout.
            return match result {
                Ok(response) => retry
                    .codes
                    .contains(&response.status().as_u16())
                    .then_some(RetryReason::Status),
                Err(Failure::NoEndpoint) => None,
                Err(Failure::Connect(_)) => Some(RetryReason::Connect),
                Err(failure) => (!failure.is_client_error()).then_some(RetryReason::Reset),
            };
        }
        if !self.may_retry() {
            return None;
        }
        let retry = &self.policy.retry;
        match result {
            Ok(response) => retry.answer(response.status(), response.headers()),
            // Every endpoint refused the connect already (each skipped for the next), or none
            // is ready, or the client's own fault: nothing another try would change.
            Err(Failure::Connect(_) | Failure::NoEndpoint | Failure::Timeout) => None,
            Err(failure) if failure.is_client_error() => None,
            Err(_) => retry.reset(),
        }
    }

    /// The wait before retry number `retry`.
    fn backoff(&self, retry: u32) -> Duration {
        match self.route {
            Some(route) => route.backoff,
            None => retry::backoff(retry),
        }
    }
}

/// Tries the request on its target, then again as `retrying` says, while attempts are left,
/// the body can be sent again and the Service's retry budget allows; each retry goes to
/// another endpoint when there is one. Each try has `try_timeout`. Counts the tries in `tries`.
#[allow(clippy::too_many_arguments)] // one call per request path, each argument its own
async fn send_with_retries<U: TryOnce>(
    upstream: &U,
    service: &ServiceTarget,
    target: Target<'_>,
    retrying: &Retrying<'_>,
    try_timeout: Option<Duration>,
    head: &Parts,
    body: RequestBody,
    tries: &mut u32,
) -> Result<Response<Inner>, Failure> {
    let again = body.replay();
    let mut body = Some(body);
    let (mut retries, attempts) = (0, retrying.attempts());
    let mut refusals = 0;
    let mut last = None;
    let resilience = &service.service.resilience;
    loop {
        let attempt = try_backend(upstream, service, target, head, &mut body, &mut last, tries);
        let result = match try_timeout {
            Some(timeout) => tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or(Err(Failure::Timeout)),
            None => attempt.await,
        };
        // An HTTP/2 stream the upstream left unprocessed goes again whatever the policy, as on
        // the path without routes (a transport resend, not a retry, outside the budget).
        let unprocessed = matches!(&result, Err(Failure::H2(error)) if h2::unprocessed(error));
        if unprocessed && refusals < MAX_REFUSALS {
            if let Some(next) = again.as_ref().and_then(RequestBody::replay) {
                refusals += 1;
                resilience.retried(RetryReason::Connect);
                body = Some(next);
                continue;
            }
        }
        let Some(reason) = retrying.reason(&result) else {
            return result;
        };
        let next = again.as_ref().and_then(RequestBody::replay);
        if retries == attempts || next.is_none() {
            return result;
        }
        let workers = upstream.route().cx.proxy.workers.count();
        if !service.withdraw_retry(retrying.policy, workers) {
            debug!(destination = %upstream.route().target, "retry budget exhausted: not retrying");
            return result;
        }
        retries += 1;
        resilience.retried(reason);
        debug!(destination = %upstream.route().target, reason = reason.as_str(), retry = retries, "retrying");
        drop(result);
        body = next;
        let backoff = retrying.backoff(retries);
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
    }
}

/// One try on the target's endpoints, avoiding the endpoint of the try before (`last`) when
/// another is ready: an endpoint that cannot be connected to is skipped for another, as on
/// the path without routes. Sets `last` to the endpoint that took the request.
async fn try_backend<U: TryOnce>(
    upstream: &U,
    service: &ServiceTarget,
    target: Target<'_>,
    head: &Parts,
    body: &mut Option<RequestBody>,
    last: &mut Option<SocketAddr>,
    tries: &mut u32,
) -> Result<Response<Inner>, Failure> {
    let mut tried: Vec<SocketAddr> = last.iter().copied().collect();
    let mut avoiding = last.is_some();
    let mut last_failure = None;
    let mut queued = false;
    loop {
        let pick = match target.pick(service, &tried) {
            Ok(pick) => pick,
            // None ready: the Service's own endpoints have a queue to wait in, once per try.
            Err(NoEndpoint::NoneReady) if matches!(target, Target::Own) && !queued => {
                queued = true;
                if service.queue().await {
                    continue;
                }
                return Err(Failure::NoEndpoint);
            }
            Err(NoEndpoint::AllFailed) if avoiding && tried.len() == 1 => {
                // The endpoint of the try before is the only one: it takes the retry.
                avoiding = false;
                tried.clear();
                continue;
            }
            Err(NoEndpoint::NoneReady) => return Err(Failure::NoEndpoint),
            Err(NoEndpoint::AllFailed) => return Err(last_failure.unwrap_or(Failure::NoEndpoint)),
        };
        if last_failure.is_some() {
            // A connect failed for this try: this pick is an always-safe retry.
            service.service.resilience.retried(RetryReason::Connect);
        }
        let endpoint = pick.endpoint();
        *tries += 1;
        *last = Some(endpoint.addr);
        match upstream.try_once(&endpoint, head, body).await {
            Ok(response) => {
                pick.responded(response.status().as_u16());
                return Ok(response);
            }
            Err(failure @ Failure::Connect(_)) => {
                tried.push(endpoint.addr);
                pick.failed();
                last_failure = Some(failure);
            }
            Err(failure) => return Err(failure),
        }
    }
}

/// Sends a copy of the request to backend `backend` of `routes`, in a task of its own: the
/// client never waits for it, and its response is read and dropped.
fn spawn_mirror(
    route: &Route,
    service: Arc<ServiceTarget>,
    routes: Arc<Routes>,
    backend: usize,
    head: Parts,
    body: RequestBody,
) {
    let (dialer, target, protocol) = (route.cx.dialer(), route.target, route.protocol);
    tokio::spawn(async move {
        let Ok(pick) = service.pick_backend(&routes, backend, &[]) else {
            debug!(destination = %target, "mirror backend has no ready endpoint");
            return;
        };
        let endpoint = pick.endpoint();
        let mut body = Some(body);
        let send = async {
            let response = match protocol {
                Protocol::http1 => mirror_h1(dialer, target, &endpoint, &head, &mut body).await,
                Protocol::h2 => send_h2(dialer, &endpoint, &head, &mut body).await,
            }?;
            // Read to its end, so that its connection can serve again.
            let body = ResponseBody {
                inner: response.into_body(),
                log: None,
            };
            let _ = body.collect().await;
            Ok::<_, Failure>(())
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
            Ok(Ok(())) => pick.answered(),
            Ok(Err(failure)) => {
                debug!(destination = %target, %endpoint, error = %failure, "mirrored request failed")
            }
            Err(_) => debug!(destination = %target, %endpoint, "mirrored request timed out"),
        }
    });
}

/// One HTTP/1 request on a pooled or new connection to `endpoint`.
async fn mirror_h1(
    dialer: Dialer,
    target: std::net::SocketAddr,
    endpoint: &Endpoint,
    head: &Parts,
    body: &mut Option<RequestBody>,
) -> Result<Response<Inner>, Failure> {
    let parts = head;
    let size = body
        .as_ref()
        .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
    let request_head = RequestHead::new(parts, &size, target).map_err(Failure::Http1)?;
    let conn = match h1::checkout(endpoint) {
        Some(conn) => conn,
        None => h1::Conn::new(dialer.dial(endpoint).await?),
    };
    let home = h1::Home::Pool(endpoint.clone());
    let response = h1::send(conn, &request_head, body.take(), home)
        .await
        .map_err(|failed| Failure::Http1(failed.error))?;
    Ok(response.map(Inner::Upstream))
}

/// Reads a request body ahead, up to `limit` bytes: all of it, to be sent as often as needed,
/// or the part read followed by the rest as it comes, to be sent once. A body of known length
/// is waited for; one of unknown length (chunked, or HTTP/2 without `content-length`, as gRPC
/// sends) is taken only as far as it has already come: a client that streams its request and
/// waits for the response before it sends more (a gRPC bidirectional call) is never held
/// waiting on the proxy.
async fn read_up_to(mut body: Incoming, limit: usize) -> Result<RequestBody, Failure> {
    let known = body.size_hint().exact();
    if known.is_some_and(|size| size > limit as u64) {
        return Ok(RequestBody::Streaming(body));
    }
    let mut read = BytesMut::new();
    let mut trailers = None;
    loop {
        let next = match known {
            Some(_) => body.frame().await,
            None => match body.frame().now_or_never() {
                Some(next) => next,
                None => {
                    let read = (!read.is_empty()).then(|| read.freeze());
                    return Ok(RequestBody::Partial(read, body));
                }
            },
        };
        let Some(frame) = next else {
            break;
        };
        let frame = frame.map_err(|error| Failure::Http1(h1::Error::RequestBody(error)))?;
        match frame.into_data() {
            Ok(data) => {
                read.extend_from_slice(&data);
                if read.len() > limit {
                    return Ok(RequestBody::Partial(Some(read.freeze()), body));
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let data = (!read.is_empty()).then(|| read.freeze());
    Ok(RequestBody::Buffered(data, trailers))
}

/// A request body as a routed request sends it.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's, as it comes: sent once.
    Streaming(Incoming),
    /// Read in full (data, trailers): sent as often as needed.
    Buffered(Option<Bytes>, Option<HeaderMap>),
    /// What was read, then the rest as it comes: sent once.
    Partial(Option<Bytes>, Incoming),
}

impl RequestBody {
    /// A copy to send again, if the body was read in full.
    fn replay(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Buffered(data, trailers) => {
                Some(RequestBody::Buffered(data.clone(), trailers.clone()))
            }
            _ => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Buffered(data, trailers) => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers
                    .take()
                    .map(|trailers| Ok(Frame::trailers(trailers))),
            }),
            RequestBody::Partial(read, body) => match read.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Pin::new(body).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(body) => body.is_end_stream(),
            RequestBody::Buffered(data, trailers) => data.is_none() && trailers.is_none(),
            RequestBody::Partial(read, body) => read.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(body) => body.size_hint(),
            // With trailers, a length would leave them no place in HTTP/1: chunked then.
            RequestBody::Buffered(data, None) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            RequestBody::Buffered(_, Some(_)) => SizeHint::default(),
            RequestBody::Partial(read, body) => match body.size_hint().exact() {
                Some(rest) => {
                    SizeHint::with_exact(rest + read.as_ref().map_or(0, |read| read.len() as u64))
                }
                None => SizeHint::default(),
            },
        }
    }
}
