//! Conformance tests of the HTTP/2 path: hyper's HTTP/2 client and server, real sockets, on
//! either side of `serve_h2`. What they pin: streams of one client connection share one upstream
//! connection, bodies and trailers pass byte exact in both directions under flow control, a
//! request with `Host` instead of `:authority` passes as it came, an upstream's stream limit
//! queues streams instead of failing them, a stream refused or left behind a GOAWAY goes again
//! when it can (and is refused to the client when its body is gone), an unreachable, closing or
//! resetting upstream costs only the streams it has to, a client stream that fails midway is
//! cancelled upstream, and the upstream connection closes with the client's. Header sections may be as large as over HTTP/1. A `CONNECT` becomes a
//! tunnel both ways, half-close included, or comes back refused as the upstream answered.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2 as client_h2;
use hyper::server::conn::http2 as server_h2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::Endpoint;
use crate::http_tests::{closed_port, metric, pattern, proxy_with, within};
use crate::outbound::{self, Destination};
use crate::proxy::{BoxError, Proxy};
use crate::serve::detect::{detect, Rewound};
use crate::serve::serve_h2;

type Body = BoxBody<Bytes, BoxError>;
type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

/// A body of `data` followed by `trailers`.
fn with_trailers(data: Vec<u8>, trailers: HeaderMap) -> Body {
    StreamBody::new(stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from(data))),
        Ok(Frame::trailers(trailers)),
    ]))
    .boxed()
}

/// An HTTP/2 upstream: every stream of every connection is answered by `handle`.
struct Upstream {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

async fn upstream<F, Fut>(
    configure: fn(&mut server_h2::Builder<TokioExecutor>),
    handle: F,
) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let handle: Handler = Arc::new(move |request| Box::pin(handle(request)));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let handle = handle.clone();
            let service = service_fn(move |request| {
                let answer = handle(request);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let mut builder = server_h2::Builder::new(TokioExecutor::new());
            builder.max_header_list_size(1 << 20);
            configure(&mut builder);
            tokio::spawn(async move {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream { addr, accepts }
}

fn defaults(_: &mut server_h2::Builder<TokioExecutor>) {}

thread_local! {
    /// The proxies this thread's test starts relay HTTP/2 (`--h2-mode relay`); set by the tests
    /// in [`relayed`], each of which runs on a thread of its own.
    static RELAY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A loopback listener whose every connection `serve_h2` forwards to `target`.
async fn start_proxy(target: SocketAddr) -> (SocketAddr, &'static Proxy) {
    let relay = RELAY.get();
    start_proxy_with(target, |proxy| proxy.h2_relay = relay).await
}

/// [`start_proxy`] with a proxy changed by `configure`.
async fn start_proxy_with(
    target: SocketAddr,
    configure: impl FnOnce(&mut Proxy),
) -> (SocketAddr, &'static Proxy) {
    let proxy = proxy_with(configure);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Through detection, as the listener does: the preface reaches hyper rewound.
                if let Ok((_, first)) = detect(&stream).await {
                    let stream = Rewound::new(stream.into(), first);
                    let destination = Destination::Forward(Endpoint::new(target));
                    serve_h2(stream, target, destination, outbound::context(proxy)).await;
                }
            });
        }
    });
    (addr, proxy)
}

/// One prior-knowledge HTTP/2 client connection to `addr`.
async fn client(addr: SocketAddr) -> client_h2::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    // Lenient, as the test upstream is: the limits under test are the proxy's.
    let (sender, connection) = client_h2::Builder::new(TokioExecutor::new())
        .max_header_list_size(1 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn client_of(upstream: &Upstream) -> (client_h2::SendRequest<Body>, &'static Proxy) {
    let (addr, proxy) = start_proxy(upstream.addr).await;
    (client(addr).await, proxy)
}

fn request(method: Method, path: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("http://example.test{path}"))
        .body(body)
        .unwrap()
}

/// Sends `request` and reads the whole answer: status, headers, body and trailers.
async fn exchange(
    sender: &mut client_h2::SendRequest<Body>,
    request: Request<Body>,
) -> (StatusCode, HeaderMap, Vec<u8>, Option<HeaderMap>) {
    let response = within("the response head", sender.send_request(request))
        .await
        .expect("a response");
    let (parts, body) = response.into_parts();
    let collected = within("the response body", body.collect())
        .await
        .expect("a complete body");
    let trailers = collected.trailers().cloned();
    (
        parts.status,
        parts.headers,
        collected.to_bytes().to_vec(),
        trailers,
    )
}

/// After a failed or cancelled stream, `/ok` (answered `fine` by the test's upstream) still
/// goes through, on the one upstream connection.
async fn next_stream_is_served_on_the_same_upstream_connection(
    sender: &mut client_h2::SendRequest<Body>,
    upstream: &Upstream,
) {
    let (status, _, body, _) = exchange(sender, request(Method::GET, "/ok", empty())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"fine");
    assert_eq!(upstream.accepts.load(Ordering::SeqCst), 1);
}

/// The body of a GET of `path`, once its head has come.
async fn body_of(sender: &mut client_h2::SendRequest<Body>, path: &str) -> Incoming {
    within(
        "the response head",
        sender.send_request(request(Method::GET, path, empty())),
    )
    .await
    .expect("a response")
    .into_body()
}

/// After the drain's GOAWAY the client may open no more streams on its connection.
async fn a_stream_after_the_drain_is_not_served(sender: &mut client_h2::SendRequest<Body>) {
    let next = within(
        "the answer to a stream after the drain",
        sender.send_request(request(Method::GET, "/late", empty())),
    )
    .await;
    assert!(next.is_err(), "a stream opened after the drain was served");
}

/// An upstream that answers each request with its method, path and `:authority`.
async fn describing() -> Upstream {
    upstream(defaults, |request: Request<Incoming>| async move {
        let authority = request.uri().authority().map(|a| a.to_string());
        let host = request.headers().get(header::HOST).cloned();
        Response::new(full(format!(
            "{} {} authority={authority:?} host={host:?}",
            request.method(),
            request.uri().path()
        )))
    })
    .await
}

#[tokio::test]
async fn concurrent_streams_share_one_upstream_connection() {
    let upstream = describing().await;
    let (sender, proxy) = client_of(&upstream).await;
    let requests = (0..20).map(|i| {
        let mut sender = sender.clone();
        async move {
            let path = format!("/stream/{i}");
            let (status, _, body, _) =
                exchange(&mut sender, request(Method::GET, &path, empty())).await;
            (status, String::from_utf8(body).unwrap(), path)
        }
    });
    for (status, body, path) in futures_util::future::join_all(requests).await {
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with(&format!("GET {path} ")), "{body}");
    }
    assert_eq!(upstream.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"}"
        ),
        Some(20)
    );
}

#[tokio::test]
async fn authority_reaches_the_upstream_as_authority() {
    let upstream = describing().await;
    let (mut sender, _) = client_of(&upstream).await;
    let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/a", empty())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "GET /a authority=Some(\"example.test\") host=None"
    );
}

/// RFC 9113 §8.3.1 lets a request carry `Host` instead of `:authority` (an intermediary that
/// translated it from HTTP/1.1 does so). It must still reach the upstream, `Host` intact.
#[tokio::test]
async fn request_with_host_instead_of_authority_is_forwarded() {
    let upstream = describing().await;
    let (mut sender, _) = client_of(&upstream).await;
    // hyper's client leaves out `:authority` (and sends `Host` as a field) for a request whose
    // URI has only a path and whose version says it was translated from HTTP/1.1.
    let request = Request::builder()
        .version(Version::HTTP_11)
        .uri("/translated?q=1")
        .header(header::HOST, "legacy.test:8080")
        .body(empty())
        .unwrap();
    let (status, _, body, _) = exchange(&mut sender, request).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("GET /translated "), "{body}");
    assert!(
        body.contains("\"legacy.test:8080\""),
        "the upstream saw neither the authority nor the Host: {body}"
    );
}

#[tokio::test]
async fn four_mebibyte_bodies_pass_byte_exact_both_ways() {
    // The upstream echoes the request body: 4 MiB each way is far past every default window.
    let upstream = upstream(defaults, |request: Request<Incoming>| async move {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(body))
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    let sent = pattern(4 << 20);
    let (status, _, body, _) = exchange(
        &mut sender,
        request(Method::POST, "/echo", full(sent.clone())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), sent.len());
    assert!(body == sent, "the echoed body differs from the one sent");
}

#[tokio::test]
async fn request_and_response_trailers_pass() {
    // gRPC's shape: a body and trailers each way, the status in the response trailers.
    let upstream = upstream(defaults, |request: Request<Incoming>| async move {
        // gRPC servers refuse a call without `te: trailers`.
        let te = request.headers().get(header::TE).cloned();
        let collected = request.into_body().collect().await.unwrap();
        let checksum = collected
            .trailers()
            .and_then(|trailers| trailers.get("x-checksum").cloned())
            .unwrap_or_else(|| HeaderValue::from_static("missing"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("x-seen-checksum", checksum);
        if let Some(te) = te {
            trailers.insert("x-seen-te", te);
        }
        let mut response = Response::new(with_trailers(collected.to_bytes().to_vec(), trailers));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
    let mut sent = request(
        Method::POST,
        "/pkg.Service/Call",
        with_trailers(b"\0\0\0\0\x05hello".to_vec(), trailers),
    );
    sent.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    let (status, headers, body, trailers) = exchange(&mut sender, sent).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
    assert_eq!(body, b"\0\0\0\0\x05hello");
    let trailers = trailers.expect("response trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-seen-checksum"], "abc123");
    assert_eq!(
        trailers.get("x-seen-te").map(|te| te.as_bytes()),
        Some(&b"trailers"[..])
    );
}

#[tokio::test]
async fn a_trailers_only_response_passes() {
    // gRPC answers a failed call with one HEADERS frame that ends the stream and carries the
    // status: no body, no separate trailers.
    let upstream = upstream(defaults, |_request: Request<Incoming>| async move {
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        headers.insert("grpc-message", HeaderValue::from_static("unavailable"));
        response
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    let (status, headers, body, _) = exchange(
        &mut sender,
        request(Method::POST, "/pkg.Service/Call", empty()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "14");
    assert_eq!(headers["grpc-message"], "unavailable");
    assert!(body.is_empty());
}

#[tokio::test]
async fn upstream_stream_limit_queues_streams_instead_of_failing_them() {
    // A burst of streams on a new upstream connection to a server that takes one at a time:
    // none may be refused, those with a body (which could not go again) included.
    let upstream = upstream(
        |builder| {
            builder.max_concurrent_streams(1);
        },
        |request: Request<Incoming>| async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            tokio::time::sleep(Duration::from_millis(10)).await;
            Response::new(full(body))
        },
    )
    .await;
    let (sender, _) = client_of(&upstream).await;
    let requests = (0..8).map(|i| {
        let mut sender = sender.clone();
        async move {
            let (method, sent) = match i % 2 {
                0 => (Method::GET, String::new()),
                _ => (Method::POST, format!("upload {i}")),
            };
            let (status, _, body, _) =
                exchange(&mut sender, request(method, "/", full(sent.clone()))).await;
            let body = String::from_utf8(body).unwrap();
            assert_eq!(status, StatusCode::OK, "request {i}: {body}");
            assert_eq!(body, sent);
        }
    });
    futures_util::future::join_all(requests).await;
    assert_eq!(upstream.accepts.load(Ordering::SeqCst), 1);
}

/// An upstream (the h2 crate's server, which can refuse a stream) that refuses the first
/// `refusals` streams with `REFUSED_STREAM`, answers the rest with `answered`, and counts them.
pub(crate) async fn refusing(refusals: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let counter = streams.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(stream).await.unwrap();
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    if counter.fetch_add(1, Ordering::SeqCst) < refusals {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let mut body = respond.send_response(Response::new(()), false).unwrap();
                    body.send_data(Bytes::from_static(b"answered"), true)
                        .unwrap();
                }
            });
        }
    });
    (addr, streams)
}

#[tokio::test]
async fn a_refused_request_without_a_body_goes_again_at_most_twice() {
    let (target, streams) = refusing(2).await;
    let (addr, _) = start_proxy(target).await;
    let mut sender = client(addr).await;
    let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"answered");
    assert_eq!(streams.load(Ordering::SeqCst), 3);

    let (target, streams) = refusing(3).await;
    let (addr, _) = start_proxy(target).await;
    let mut sender = client(addr).await;
    let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("refused"), "{body}");
    assert_eq!(streams.load(Ordering::SeqCst), 3);
}

/// Sends `request` and expects its stream reset with `REFUSED_STREAM`, not an answer.
async fn refused(sender: &mut client_h2::SendRequest<Body>, request: Request<Body>) {
    let error = within("the refusal", sender.send_request(request))
        .await
        .expect_err("a refused stream, not a response");
    let reason = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM), "{error:?}");
}

#[tokio::test]
async fn a_refused_request_with_a_body_is_refused_for_the_client_too() {
    // Its body went out as it streamed in, so there is nothing left to send again: the client
    // learns that nothing was processed, as it would without the proxy, and may send it again.
    let (target, streams) = refusing(1).await;
    let (addr, _) = start_proxy(target).await;
    let mut sender = client(addr).await;
    refused(&mut sender, request(Method::POST, "/", full("upload"))).await;
    assert_eq!(streams.load(Ordering::SeqCst), 1);
    // The connection is fine: the request sent again is answered.
    let (status, _, body, _) =
        exchange(&mut sender, request(Method::POST, "/", full("upload"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"answered");
}

#[tokio::test]
async fn refused_destination_is_a_502_naming_it_and_the_connection_stays_usable() {
    let target = closed_port().await;
    let (addr, proxy) = start_proxy(target).await;
    let mut sender = client(addr).await;
    for _ in 0..2 {
        let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains(&target.to_string()), "{body}");
    }
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_connect_errors_total{direction=\"outbound\"}"
        ),
        Some(2)
    );
}

/// An upstream whose every connection serves one request, answered `conn N`, and then shuts
/// down gracefully (GOAWAY), as a restarting server does; and how many connections it took.
async fn one_request_per_connection() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let index = counter.fetch_add(1, Ordering::SeqCst);
            let (done, served) = tokio::sync::oneshot::channel::<()>();
            let done = std::sync::Mutex::new(Some(done));
            let service = service_fn(move |_request: Request<Incoming>| {
                if let Some(done) = done.lock().unwrap().take() {
                    let _ = done.send(());
                }
                async move { Ok::<_, Infallible>(Response::new(full(format!("conn {index}")))) }
            });
            tokio::spawn(async move {
                let connection = server_h2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = served => {}
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        }
    });
    (target, accepts)
}

#[tokio::test]
async fn upstream_closing_its_connection_between_requests_is_not_a_502() {
    let (target, accepts) = one_request_per_connection().await;
    let (addr, _) = start_proxy(target).await;
    let mut sender = client(addr).await;
    for expected in ["conn 0", "conn 1", "conn 2"] {
        let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, expected.as_bytes());
        // Let the GOAWAY and the close reach the proxy before the next request.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_upstream_reset_fails_only_its_own_stream() {
    // `/early` is reset before its head goes out; `/late` after its head and part of its body.
    let upstream = upstream(defaults, |request: Request<Incoming>| async move {
        let late = match request.uri().path() {
            "/early" => false,
            "/late" => true,
            _ => return Response::new(full("fine")),
        };
        // Early: the error follows the data in the same poll, so the upstream drops the queued
        // head and data and sends only the reset. Late: the head and data go out first.
        let failing = stream::unfold(0, move |step| async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"partial"))), 1)),
                1 => {
                    if late {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Some((Err(BoxError::from("upstream gave up")), 2))
                }
                _ => None,
            }
        });
        Response::new(StreamBody::new(failing).boxed())
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;

    let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/early", empty())).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("internal error"), "{body}");

    let response = within(
        "the late reset's head",
        sender.send_request(request(Method::GET, "/late", empty())),
    )
    .await
    .expect("the head, sent before the reset");
    assert_eq!(response.status(), StatusCode::OK);
    let body = within("the late reset's body", response.into_body().collect()).await;
    assert!(
        body.is_err(),
        "a stream cut short reached the client as a complete body"
    );

    next_stream_is_served_on_the_same_upstream_connection(&mut sender, &upstream).await;
}

#[tokio::test]
async fn a_32_kib_header_passes_both_ways() {
    // The HTTP/1 path takes heads up to 64 KiB; HTTP/2's default header list limit is 16 KiB.
    let value = "v".repeat(32 * 1024);
    let upstream = upstream(defaults, |request: Request<Incoming>| async move {
        let mut response = Response::new(empty());
        if let Some(big) = request.headers().get("x-big") {
            response.headers_mut().insert("x-big-echo", big.clone());
        }
        response
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    let mut sent = request(Method::GET, "/big", empty());
    sent.headers_mut()
        .insert("x-big", HeaderValue::from_str(&value).unwrap());
    let (status, headers, _, _) = exchange(&mut sender, sent).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-big-echo"], value.as_str());
}

/// An HTTP/1-only server: it answers the HTTP/2 connection preface with a 400 and closes.
async fn http1_only() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_that_does_not_speak_http2_is_a_502() {
    let target = http1_only().await;
    let (addr, _) = start_proxy(target).await;
    let mut sender = client(addr).await;
    for _ in 0..2 {
        let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
        let body = String::from_utf8(body).unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert!(body.contains(&target.to_string()), "{body}");
    }
}

#[tokio::test]
async fn a_client_that_cancels_a_stream_cancels_it_upstream_too() {
    // `/endless` streams 64 KiB chunks until it is cancelled, and says when it was dropped.
    let dropped = Arc::new(tokio::sync::Notify::new());
    let notify = dropped.clone();
    let upstream = upstream(defaults, move |request: Request<Incoming>| {
        let notify = notify.clone();
        async move {
            if request.uri().path() != "/endless" {
                return Response::new(full("fine"));
            }
            struct Dropped(Arc<tokio::sync::Notify>);
            impl Drop for Dropped {
                fn drop(&mut self) {
                    self.0.notify_one();
                }
            }
            let guard = Dropped(notify);
            let chunks = stream::unfold(guard, |guard| async move {
                tokio::task::yield_now().await;
                Some((Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))), guard))
            });
            Response::new(StreamBody::new(chunks).boxed())
        }
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    let mut body = body_of(&mut sender, "/endless").await;
    let first = within("the first chunk", body.frame()).await;
    assert!(matches!(first, Some(Ok(frame)) if frame.is_data()));
    drop(body);
    within("the upstream stream's cancel", dropped.notified()).await;
    next_stream_is_served_on_the_same_upstream_connection(&mut sender, &upstream).await;
}

#[tokio::test]
async fn a_drain_lets_open_streams_finish_then_closes_the_connection() {
    let upstream = upstream(defaults, |_request: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Response::new(full("finished"))
    })
    .await;
    let (mut sender, proxy) = client_of(&upstream).await;
    let open = tokio::spawn({
        let mut sender = sender.clone();
        async move { exchange(&mut sender, request(Method::GET, "/slow", empty())).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.drain.start();
    let (status, _, body, _) = within("the open stream", open).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"finished");
    a_stream_after_the_drain_is_not_served(&mut sender).await;
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_reaches_the_client() {
    // The upstream answers 413 without reading the body (RFC 9113 §8.1 lets a server answer
    // early and reset the rest with NO_ERROR); the client streams 8 MiB, more than any window.
    let upstream = upstream(defaults, |_request: Request<Incoming>| async move {
        let mut response = Response::new(full("too large"));
        *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        response
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    let chunks = stream::iter(
        (0..128).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'u'; 64 * 1024])))),
    );
    let upload = request(Method::POST, "/upload", StreamBody::new(chunks).boxed());
    let (status, _, body, _) = exchange(&mut sender, upload).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body, b"too large");
    let (status, _, _, _) = exchange(&mut sender, request(Method::GET, "/next", empty())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(upstream.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_body_that_fails_midway_is_cancelled_upstream() {
    // The client's body breaks its own `Content-Length` after the upstream has read the first
    // chunk, so the proxy's side of the client stream fails it while the upstream stream is
    // open. The upstream must see that stream cancelled: not a body that ends cleanly and looks
    // complete, and not one left open.
    let (first_read, mut first) = tokio::sync::mpsc::unbounded_channel();
    let (seen, mut outcome) = tokio::sync::mpsc::unbounded_channel();
    let upstream = upstream(defaults, move |request: Request<Incoming>| {
        let (first_read, seen) = (first_read.clone(), seen.clone());
        async move {
            if request.uri().path() != "/upload" {
                return Response::new(full("fine"));
            }
            let mut body = request.into_body();
            let _ = body.frame().await;
            let _ = first_read.send(());
            let result = body.collect().await;
            let reason = result.err().map(|error| {
                let error: &(dyn std::error::Error + 'static) = &error;
                anyhow::Chain::new(error)
                    .find_map(|cause| cause.downcast_ref::<h2::Error>())
                    .and_then(h2::Error::reason)
            });
            let _ = seen.send(reason);
            Response::new(full("read"))
        }
    })
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    let (chunks, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, BoxError>>();
    let body = StreamBody::new(tokio_stream_of(rx)).boxed();
    let mut upload = request(Method::POST, "/upload", body);
    upload
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("20000"));
    let client = tokio::spawn({
        let mut sender = sender.clone();
        async move { sender.send_request(upload).await.map(|_| ()) }
    });
    chunks
        .send(Ok(Frame::data(Bytes::from(vec![b'u'; 16 * 1024]))))
        .unwrap();
    within("the upstream's read of the first chunk", first.recv()).await;
    chunks
        .send(Ok(Frame::data(Bytes::from(vec![b'u'; 16 * 1024]))))
        .unwrap();
    let reason = within("the upstream's read of the rest", outcome.recv()).await;
    if RELAY.get() {
        // Relayed, the upstream reads the excess itself, as it would without the proxy, and
        // resets the stream (RFC 9113 §8.1.1).
        assert_eq!(reason, Some(Some(Some(h2::Reason::PROTOCOL_ERROR))));
    } else {
        assert_eq!(reason, Some(Some(Some(h2::Reason::CANCEL))));
    }
    let answer = within("the client's answer", client).await.unwrap();
    assert!(
        answer.is_err(),
        "the client's broken upload was answered: {answer:?}"
    );
    next_stream_is_served_on_the_same_upstream_connection(&mut sender, &upstream).await;
}

/// The frames sent on `rx`, as a stream a body can be made of.
fn tokio_stream_of<T>(
    rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures_util::Stream<Item = T> {
    stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[tokio::test]
async fn the_upstream_connection_closes_with_the_client_connection() {
    // An upstream connection lives as long as the client connection it serves: once the client
    // has gone, and its streams with it, the upstream sees its connection closed.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (closed, mut closes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    // A body to read, so the stream has a request pipe as well.
                    let _ = request.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(full("fine")))
                });
                let _ = server_h2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                let _ = closed.send(());
            });
        }
    });
    let (addr, _) = start_proxy(target).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = client_h2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let client = tokio::spawn(connection);
    let (status, _, body, _) =
        exchange(&mut sender, request(Method::POST, "/", full("upload"))).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"fine"[..]));
    drop(sender);
    within("the client connection's end", client)
        .await
        .unwrap()
        .unwrap();
    within("the upstream connection's close", closes.recv()).await;
}

/// An upstream whose first connection answers the first stream with a `GOAWAY` naming stream 0
/// as the last it processed, as a server shutting down between reading the stream's frames and
/// handling them does; it closes that connection after `linger`. Later connections answer
/// `fine`. Returns the address and the number of connections accepted.
async fn going_away_before_the_first_stream(linger: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                let service = service_fn(|_request: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(full("fine")))
                });
                tokio::spawn(
                    server_h2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
                continue;
            }
            tokio::spawn(async move {
                // Frames by hand (RFC 9113 §4.1): a 9-byte header of length, type, flags and
                // stream, then the payload.
                fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
                    let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
                    bytes.extend([kind, flags, 0, 0, 0, 0]);
                    bytes.extend_from_slice(payload);
                    bytes
                }
                let mut preface = [0; 24];
                stream.read_exact(&mut preface).await.unwrap();
                stream.write_all(&frame(0x4, 0, &[])).await.unwrap();
                loop {
                    let mut head = [0; 9];
                    if stream.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0; length];
                    stream.read_exact(&mut payload).await.unwrap();
                    match (head[3], head[4] & 0x1) {
                        // SETTINGS, not an ACK: acknowledge it.
                        (0x4, 0) => stream.write_all(&frame(0x4, 0x1, &[])).await.unwrap(),
                        // HEADERS: GOAWAY, last stream 0, NO_ERROR.
                        (0x1, _) => {
                            stream.write_all(&frame(0x7, 0, &[0; 8])).await.unwrap();
                            tokio::time::sleep(linger).await;
                            return;
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, accepts)
}

#[tokio::test]
async fn a_request_a_goaway_left_unprocessed_goes_again_on_a_new_connection() {
    // The first connection stays open a while after its GOAWAY: the stream fails on the
    // GOAWAY itself, not on the connection's close.
    let (target, accepts) = going_away_before_the_first_stream(Duration::from_secs(2)).await;
    let (addr, _) = start_proxy(target).await;
    let mut sender = client(addr).await;
    let (status, _, body, _) = exchange(&mut sender, request(Method::POST, "/", empty())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"fine");
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_with_a_body_a_goaway_left_unprocessed_is_refused_so_the_client_can_retry() {
    // Its body went up with it and is gone, so it cannot go again from the proxy. The client
    // learns that nothing was processed (REFUSED_STREAM, not a 502) and may send it again.
    let (target, accepts) = going_away_before_the_first_stream(Duration::from_secs(2)).await;
    let (addr, proxy) = start_proxy(target).await;
    let mut sender = client(addr).await;
    refused(&mut sender, request(Method::POST, "/", full("upload"))).await;
    assert_eq!(accepts.load(Ordering::SeqCst), 1);
    // The client does what it would do without the proxy: the request goes again, and through.
    let (status, _, body, _) =
        exchange(&mut sender, request(Method::POST, "/", full("upload"))).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"fine"[..]));
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
    // Counted once, as the request that was answered.
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"}"
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"502\",tls=\"false\",client_id=\"\"}"
        ),
        None
    );
}

#[tokio::test]
async fn streams_that_find_their_connection_going_away_share_one_new_connection() {
    // Five streams at once; the upstream's GOAWAY leaves them unprocessed or finds them not yet
    // sent. They all go again, on one new connection, not one each.
    let (target, accepts) = going_away_before_the_first_stream(Duration::from_secs(2)).await;
    let (addr, _) = start_proxy(target).await;
    let sender = client(addr).await;
    let streams: Vec<_> = (0..5)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                exchange(&mut sender, request(Method::GET, &format!("/{i}"), empty())).await
            })
        })
        .collect();
    for stream in streams {
        let (status, _, body, _) = within("a stream's answer", stream).await.unwrap();
        assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"fine"[..]));
    }
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
}

/// Bytes the upstream read from the client's side of an `early.test:443` tunnel.
static EARLY_READ: AtomicUsize = AtomicUsize::new(0);

/// An upstream that turns a `CONNECT` to `open.test:443` into an echo tunnel, which closes its
/// side once the client's side has ended; to `early.test:443` into one that says `bye` and ends
/// its side at once, then reads the client's side to its end (counted in [`EARLY_READ`]);
/// refuses any other `CONNECT` (403) and answers other requests `fine`.
async fn tunnelling() -> Upstream {
    upstream(defaults, |mut request: Request<Incoming>| async move {
        if request.method() != Method::CONNECT {
            return Response::new(full("fine"));
        }
        let authority = request.uri().authority().map(|a| a.to_string());
        let early = match authority.as_deref() {
            Some("open.test:443") => false,
            Some("early.test:443") => true,
            _ => {
                let mut response = Response::new(full("not there"));
                *response.status_mut() = StatusCode::FORBIDDEN;
                return response;
            }
        };
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.expect("the tunnel"));
            let mut buf = vec![0u8; 32 * 1024];
            if early {
                io.write_all(b"bye").await.unwrap();
                io.shutdown().await.unwrap();
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    EARLY_READ.fetch_add(n, Ordering::SeqCst);
                }
                return;
            }
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = io.shutdown().await;
        });
        Response::new(empty())
    })
    .await
}

fn connect_to(authority: &str) -> Request<Body> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(empty())
        .unwrap()
}

/// A `CONNECT` to `authority` that the upstream accepts, and the client's side of its tunnel.
async fn open_tunnel(
    sender: &mut client_h2::SendRequest<Body>,
    authority: &str,
) -> TokioIo<hyper::upgrade::Upgraded> {
    let response = within("the answer", sender.send_request(connect_to(authority)))
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    let tunnel = within("the tunnel", hyper::upgrade::on(response))
        .await
        .expect("a tunnel");
    TokioIo::new(tunnel)
}

#[tokio::test]
async fn connect_becomes_a_tunnel_both_ways_and_keeps_half_close() {
    let upstream = tunnelling().await;
    let (mut sender, proxy) = client_of(&upstream).await;
    let tunnel = open_tunnel(&mut sender, "open.test:443").await;
    let (mut read, mut write) = tokio::io::split(tunnel);
    // Larger than every stream window on the way: flow control holds in both directions.
    let sent = pattern(5 << 20);
    let expected = sent.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        // Only the client's side ends: the echo's rest must still come back, then its end.
        write.shutdown().await.unwrap();
        write
    });
    let mut echoed = Vec::new();
    within("the echo and its end", read.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert!(
        echoed == expected,
        "{} of {} bytes came back",
        echoed.len(),
        expected.len()
    );
    drop(within("the writer", writer).await.unwrap());
    next_stream_is_served_on_the_same_upstream_connection(&mut sender, &upstream).await;
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"}"
        ),
        Some(2)
    );
}

#[tokio::test]
async fn a_refused_connect_comes_back_as_the_upstream_answered() {
    let upstream = tunnelling().await;
    let (mut sender, _) = client_of(&upstream).await;
    let (status, _, body, _) = exchange(&mut sender, connect_to("closed.test:443")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, b"not there");
    next_stream_is_served_on_the_same_upstream_connection(&mut sender, &upstream).await;
}

#[tokio::test]
async fn a_tunnel_the_upstream_ends_first_still_carries_the_client_side() {
    let upstream = tunnelling().await;
    let (mut sender, _) = client_of(&upstream).await;
    let mut tunnel = open_tunnel(&mut sender, "early.test:443").await;
    let mut received = Vec::new();
    within("the upstream's end", tunnel.read_to_end(&mut received))
        .await
        .unwrap();
    assert_eq!(received, b"bye");
    tunnel.write_all(&pattern(300 * 1024)).await.unwrap();
    tunnel.shutdown().await.unwrap();
    within("the upstream reading it all", async {
        while EARLY_READ.load(Ordering::SeqCst) != 300 * 1024 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Relayed HTTP/2 only (`--h2-mode relay`)

/// An upstream (the h2 crate's server, whose HPACK encoder indexes fields in its dynamic table
/// and Huffman-codes them) that answers `/status/NNN` with NNN, after a `103` when NNN is 299,
/// with fields that change per request so that the table keeps evicting.
async fn answering_statuses() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(stream).await.unwrap();
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let path = request.uri().path().to_string();
                    let status: u16 = path.trim_start_matches("/status/").parse().unwrap();
                    if status == 299 {
                        let hints = Response::builder().status(103).body(()).unwrap();
                        respond.send_informational(hints).unwrap();
                    }
                    let response = Response::builder()
                        .status(status)
                        .header("x-path", &path)
                        .header("x-filler", "f".repeat(700) + &path)
                        .header(header::CONTENT_TYPE, "text/plain")
                        .body(())
                        .unwrap();
                    let mut body = respond.send_response(response, false).unwrap();
                    body.send_data(Bytes::from(path), true).unwrap();
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn relayed_responses_are_counted_by_their_status_through_header_compression() {
    RELAY.set(true);
    let (addr, proxy) = start_proxy(answering_statuses().await).await;
    let mut sender = client(addr).await;
    let statuses = [200, 201, 404, 503, 302, 299, 200, 204];
    for round in 0..10 {
        for status in statuses {
            let path = format!("/status/{status}");
            let (got, headers, body, _) =
                exchange(&mut sender, request(Method::GET, &path, empty())).await;
            assert_eq!(got.as_u16(), status, "round {round}");
            assert_eq!(headers["x-path"], path.as_str());
            assert_eq!(body, path.as_bytes());
        }
    }
    let count = |status: u16| {
        metric(
            proxy,
            &format!("remora_proxy_requests_total{{direction=\"outbound\",protocol=\"h2\",status_code=\"{status}\",tls=\"false\",client_id=\"\"}}"),
        )
    };
    assert_eq!(count(200), Some(20));
    for status in [201, 404, 503, 302, 299, 204] {
        assert_eq!(count(status), Some(10), "status {status}");
    }
    assert_eq!(count(103), None, "an informational head is no request");
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_request_duration_seconds_count{direction=\"outbound\"}"
        ),
        Some(80)
    );
    let bytes = |flow: &str| {
        metric(
            proxy,
            &format!("remora_proxy_tcp_bytes_total{{direction=\"outbound\",flow=\"{flow}\"}}"),
        )
        .unwrap_or(0)
    };
    // Each path's 700-byte filler reached the client at least once (then the table had it).
    assert!(bytes("tx") > 8 * 700, "tx {}", bytes("tx"));
    assert!(bytes("rx") > 80 * 10, "rx {}", bytes("rx"));
}

#[tokio::test]
async fn a_relayed_refused_stream_reaches_the_client_and_counts_as_no_request() {
    RELAY.set(true);
    let (target, streams) = refusing(1).await;
    let (addr, proxy) = start_proxy(target).await;
    let mut sender = client(addr).await;
    // The upstream's own answer, as the client would get it without the proxy: it may send
    // the request again, and does.
    refused(&mut sender, request(Method::GET, "/", empty())).await;
    let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"answered");
    assert_eq!(streams.load(Ordering::SeqCst), 2);
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"}"
        ),
        Some(1)
    );
    assert!(!proxy.metrics.encode().contains("status_code=\"502\""));
}

/// The access-log lines written on this thread from now until the guard is dropped.
pub(crate) fn capture_access_log() -> (
    Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("remora_proxy::access=info")
        .with_ansi(false)
        .with_writer(move || Writer(writer.clone()))
        .finish();
    struct Writer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Writer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    (lines, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn relayed_requests_get_access_log_lines_like_terminated_ones() {
    let (lines, _guard) = capture_access_log();
    let statuses = answering_statuses().await;
    let (addr, _) = start_proxy_with(statuses, |proxy| {
        proxy.h2_relay = true;
        proxy.access_log = true;
    })
    .await;
    let mut sender = client(addr).await;
    for path in ["/status/201?q=1", "/status/404"] {
        let (status, _, _, _) = exchange(&mut sender, request(Method::GET, path, empty())).await;
        assert!(status == 201 || status == 404);
    }
    // A request the upstream resets before its head: logged when the reset passes, status 0.
    let (target, _) = refusing(1).await;
    let (addr, _) = start_proxy_with(target, |proxy| {
        proxy.h2_relay = true;
        proxy.access_log = true;
    })
    .await;
    refused(
        &mut client(addr).await,
        request(Method::POST, "/upload", full("x")),
    )
    .await;
    let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
    let logged: Vec<&str> = text.lines().collect();
    assert_eq!(logged.len(), 3, "{text}");
    for (line, expected) in logged.iter().zip([
        [
            "method=GET",
            "authority=example.test",
            "path=/status/201 ",
            "status=201",
            "bytes=11",
        ],
        [
            "method=GET",
            "authority=example.test",
            "path=/status/404 ",
            "status=404",
            "bytes=11",
        ],
        [
            "method=POST",
            "authority=example.test",
            "path=/upload ",
            "status=0",
            "bytes=0",
        ],
    ]) {
        for field in expected {
            assert!(line.contains(field), "{field} not in {line}");
        }
        assert!(line.contains("protocol=h2"), "{line}");
    }
}

#[tokio::test]
async fn relayed_websocket_over_http2_works_where_the_upstream_offers_it() {
    // Extended CONNECT (RFC 8441): the upstream announces it in its SETTINGS, which the relay
    // passes on, and the tunnel's bytes pass both ways.
    RELAY.set(true);
    let upstream = upstream(
        |builder| {
            builder.enable_connect_protocol();
        },
        |mut request: Request<Incoming>| async move {
            let protocol = request.extensions().get::<hyper::ext::Protocol>().cloned();
            if request.method() != Method::CONNECT || protocol.is_none() {
                return Response::new(full("fine"));
            }
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let mut io = TokioIo::new(upgrade.await.expect("the tunnel"));
                let mut buf = [0u8; 64];
                let n = io.read(&mut buf).await.unwrap();
                io.write_all(&[b"echo: ", &buf[..n]].concat())
                    .await
                    .unwrap();
                io.shutdown().await.unwrap();
            });
            Response::new(empty())
        },
    )
    .await;
    let (mut sender, _) = client_of(&upstream).await;
    // A first request, so that the upstream's SETTINGS have come before the CONNECT is built.
    let (status, _, _, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
    assert_eq!(status, StatusCode::OK);
    let mut websocket = Request::builder()
        .method(Method::CONNECT)
        .uri("http://example.test/chat")
        .body(empty())
        .unwrap();
    websocket
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = within("the answer", sender.send_request(websocket))
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    let mut tunnel = TokioIo::new(
        within("the tunnel", hyper::upgrade::on(response))
            .await
            .expect("a tunnel"),
    );
    tunnel.write_all(b"hello").await.unwrap();
    let mut echoed = Vec::new();
    within("the echo", tunnel.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, b"echo: hello");
}

#[tokio::test]
async fn a_relayed_connection_whose_dial_failed_dials_again_for_a_later_stream() {
    // A client that connects early (a gRPC channel) and sends its first call later gets the
    // answer of a dial made then, not the failure from when it connected.
    RELAY.set(true);
    let (addr, proxy) = start_proxy(closed_port().await).await;
    let mut sender = client(addr).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _, _, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // The relay's dial when the client connected, and the stream's own.
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_connect_errors_total{direction=\"outbound\"}"
        ),
        Some(2)
    );
}

#[tokio::test]
async fn a_relayed_upstream_goaway_reaches_the_client_which_reconnects() {
    // The client sees its server's graceful shutdown itself, as without the proxy: its
    // connection takes no more streams, and a new one reaches a new upstream connection.
    RELAY.set(true);
    let (target, accepts) = one_request_per_connection().await;
    let (addr, _) = start_proxy(target).await;
    for expected in ["conn 0", "conn 1"] {
        let mut sender = client(addr).await;
        let (status, _, body, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, expected.as_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let next = within(
            "the answer to a stream after the upstream's GOAWAY",
            sender.send_request(request(Method::GET, "/", empty())),
        )
        .await;
        assert!(next.is_err(), "a stream after the GOAWAY was served");
    }
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn garbage_either_way_through_the_relay_costs_only_its_connection() {
    // An upstream that answers the preface with HTTP/1.1, and a client whose frames are
    // nonsense: each connection fails at its other end, the proxy keeps serving.
    RELAY.set(true);
    let (addr, _) = start_proxy(http1_only().await).await;
    let mut sender = client(addr).await;
    let answer = within(
        "the failure",
        sender.send_request(request(Method::GET, "/", empty())),
    )
    .await;
    assert!(answer.is_err(), "{answer:?}");

    let upstream = describing().await;
    let (addr, proxy) = start_proxy(upstream.addr).await;
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // A HEADERS frame of 40 bytes of garbage on stream 1, then a frame head claiming 16 MiB.
    let mut garbage = vec![0, 0, 40, 1, 5, 0, 0, 0, 1];
    garbage.extend(pattern(40));
    garbage.extend([0xff, 0xff, 0xff, 1, 0, 0, 0, 0, 3]);
    let _ = raw.write_all(&garbage).await;
    let mut rest = Vec::new();
    let _ = within("the upstream's end of it", raw.read_to_end(&mut rest)).await;
    // The proxy still serves a well-behaved client, and counted nothing for the garbage.
    let mut sender = client(addr).await;
    let (status, _, _, _) = exchange(&mut sender, request(Method::GET, "/", empty())).await;
    assert_eq!(status, StatusCode::OK);
    let text = proxy.metrics.encode();
    assert_eq!(
        metric(
            proxy,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"}"
        ),
        Some(1),
        "{text}"
    );
}

#[tokio::test]
async fn a_relayed_drain_during_a_download_goes_between_frames_and_the_download_completes() {
    // 64 KiB chunks for 8 MiB: the drain's GOAWAY must go in at a frame boundary of a stream
    // of full reads, or the client would read a broken frame.
    RELAY.set(true);
    let upstream = upstream(defaults, |_request: Request<Incoming>| async move {
        let chunks = futures_util::StreamExt::then(stream::iter(0..128u32), |i| async move {
            tokio::task::yield_now().await;
            Ok::<_, BoxError>(Frame::data(Bytes::from(pattern(64 * 1024 + i as usize))))
        });
        Response::new(StreamBody::new(chunks).boxed())
    })
    .await;
    let (mut sender, proxy) = client_of(&upstream).await;
    let mut body = body_of(&mut sender, "/download").await;
    let mut received = within("the first chunk", body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .len();
    proxy.drain.start();
    while let Some(frame) = within("the rest of the download", body.frame()).await {
        received += frame
            .expect("an intact download")
            .into_data()
            .map_or(0, |d| d.len());
    }
    let expected: usize = (0..128).map(|i| 64 * 1024 + i).sum();
    assert_eq!(received, expected);
    a_stream_after_the_drain_is_not_served(&mut sender).await;
}

#[tokio::test]
async fn a_relayed_drain_before_the_upstreams_settings_waits_for_them() {
    // The upstream's SETTINGS must be the first frame the client reads (RFC 9113 §3.4), so the
    // drain's GOAWAY may not overtake it. This upstream takes 300 ms to start; the client reads
    // the frames as they come.
    RELAY.set(true);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let service = service_fn(|_request: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(empty()))
                });
                let _ = server_h2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let (addr, proxy) = start_proxy(target).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.drain.start();
    let mut kinds = Vec::new();
    while !kinds.contains(&7) {
        let mut head = [0u8; 9];
        within("the next frame", client.read_exact(&mut head))
            .await
            .expect("frames until a GOAWAY");
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0; len];
        client.read_exact(&mut payload).await.unwrap();
        kinds.push(head[3]);
    }
    assert_eq!(
        kinds[0], 4,
        "the first frame was not the upstream's SETTINGS: {kinds:?}"
    );
}

/// The tests above whose behaviour holds as well when HTTP/2 is relayed frame by frame
/// (`--h2-mode relay`), run again that way. Those left out pin what only a terminating proxy
/// does: queue streams under the upstream's limit before its settings have come, send a refused
/// or unprocessed stream again, keep a client connection across upstream connections, answer 502
/// for an upstream that fails after the connection was made.
mod relayed {
    macro_rules! relayed {
        ($($test:ident),* $(,)?) => {$(
            #[test]
            fn $test() {
                super::RELAY.set(true);
                super::$test();
            }
        )*};
    }

    relayed!(
        concurrent_streams_share_one_upstream_connection,
        authority_reaches_the_upstream_as_authority,
        request_with_host_instead_of_authority_is_forwarded,
        four_mebibyte_bodies_pass_byte_exact_both_ways,
        request_and_response_trailers_pass,
        a_trailers_only_response_passes,
        refused_destination_is_a_502_naming_it_and_the_connection_stays_usable,
        a_32_kib_header_passes_both_ways,
        a_client_that_cancels_a_stream_cancels_it_upstream_too,
        a_drain_lets_open_streams_finish_then_closes_the_connection,
        an_answer_before_the_upload_ends_reaches_the_client,
        a_client_body_that_fails_midway_is_cancelled_upstream,
        the_upstream_connection_closes_with_the_client_connection,
        connect_becomes_a_tunnel_both_ways_and_keeps_half_close,
        a_refused_connect_comes_back_as_the_upstream_answered,
        a_tunnel_the_upstream_ends_first_still_carries_the_client_side,
    );
}
