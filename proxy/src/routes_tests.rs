//! Routes on real sockets: an in-process control plane feeds a Service snapshot with a
//! `RouteTable`, the proxy serves HTTP/1 and HTTP/2 clients on loopback, and echo servers stand
//! for the backends' endpoints, recording what reached them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_api::discovery as api;
use remora_api::discovery::discovery_server::{Discovery as DiscoveryApi, DiscoveryServer};
use remora_api::discovery::{filter, path_match, snapshot, value_match};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::discover::{ControlConfig, Discovery};
use crate::http_tests::{proxy_with, within};
use crate::metrics::ControlMetrics;
use crate::outbound;
use crate::proxy::Proxy;
use crate::serve::detect::{detect, Detected, Rewound};

/// The last octet of the next harness's ClusterIP: each its own, since the workers' state for
/// a target is per thread and outlives a harness.
static NEXT_CLUSTER_IP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// A control plane that answers every watch with the latest snapshot fed to it.
struct Fake(watch::Receiver<api::Snapshot>);

#[tonic::async_trait]
impl DiscoveryApi for Fake {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<api::Snapshot, tonic::Status>> + Send>>;

    async fn watch(
        &self,
        _request: tonic::Request<api::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Ok(tonic::Response::new(Box::pin(
            WatchStream::new(self.0.clone()).map(Ok),
        )))
    }
}

/// What one echo server saw of a request.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) uri: String,
    /// The URI's authority: HTTP/2's `:authority`.
    pub(crate) authority: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// An echo server standing for one backend's endpoint: it answers `x-backend: NAME`, and
/// `?status=N` / `?delay=MS` in the query change its answer; it records every request.
#[derive(Clone)]
pub(crate) struct Echo {
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
    /// This many requests from now on are answered 503 (a failing backend).
    pub(crate) failing: Arc<AtomicUsize>,
    /// This many connections from now on are closed without an answer.
    pub(crate) dropping: Arc<AtomicUsize>,
    /// Every answer waits this many milliseconds.
    pub(crate) delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Echo {
    pub(crate) async fn start(name: &'static str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo = Echo {
            name,
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            failing: Arc::default(),
            dropping: Arc::default(),
            delay_ms: Arc::default(),
        };
        let server = echo.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let take = |count: &AtomicUsize| {
                    count
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                };
                if take(&server.dropping) {
                    // Reads the request, then closes: a connection error after the request left.
                    let mut buf = [0u8; 1024];
                    let _ = stream.readable().await;
                    let _ = stream.try_read(&mut buf);
                    drop(stream);
                    continue;
                }
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.answer(request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        echo
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        // `?early`: answered at once, the body left unread.
        let early = parts.uri.query().is_some_and(|q| q.contains("early"));
        let body = if early {
            Bytes::new()
        } else {
            body.collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default()
        };
        let uri = parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), ToString::to_string);
        let query = parts.uri.query().unwrap_or("").to_string();
        self.seen.lock().unwrap().push(Seen {
            method: parts.method,
            uri,
            authority: parts
                .uri
                .authority()
                .map_or(String::new(), ToString::to_string),
            headers: parts.headers,
            body,
        });
        let delay = self.delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let mut status = StatusCode::OK;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("delay", ms)) => {
                    tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await
                }
                Some(("status", code)) => status = code.parse().unwrap(),
                _ => {}
            }
        }
        let failing = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
        Response::builder()
            .status(status)
            .header("x-backend", self.name)
            .header("x-upstream-header", "from-backend")
            .body(Full::new(Bytes::from(self.name)))
            .unwrap()
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub(crate) fn endpoint(&self) -> api::Endpoint {
        api::Endpoint {
            ip: self.addr.ip().to_string(),
            port: u32::from(self.addr.port()),
            ..Default::default()
        }
    }

    /// This echo server as a resolved backend of the route table.
    pub(crate) fn backend(&self) -> api::Backend {
        api::Backend {
            namespace: "shop".into(),
            name: self.name.into(),
            port: 80,
            resolved: true,
            app_protocol: "http".into(),
            endpoints: vec![self.endpoint()],
            policy: None,
        }
    }
}

/// The Service `shop/cart:80` whose own endpoint is `own`, with `table` as its routes.
pub(crate) fn snapshot(own: &Echo, table: api::RouteTable) -> api::Snapshot {
    api::Snapshot {
        kind: Some(snapshot::Kind::Service(api::Service {
            namespace: "shop".into(),
            name: "cart".into(),
            port: 80,
            app_protocol: "http".into(),
            endpoints: vec![own.endpoint()],
            route_table: Some(table),
            ..Default::default()
        })),
    }
}

/// A proxy with a control plane that serves the snapshots sent on the returned feed, listening
/// on loopback for connections that it takes to be for a ClusterIP of its own.
pub(crate) struct Harness {
    pub(crate) proxy: &'static Proxy,
    pub(crate) listen: SocketAddr,
    pub(crate) feed: watch::Sender<api::Snapshot>,
}

impl Harness {
    pub(crate) async fn start(first: api::Snapshot) -> Harness {
        Self::start_with(first, |_| ()).await
    }

    /// [`Harness::start`] with the proxy's settings changed by `configure`.
    pub(crate) async fn start_with(
        first: api::Snapshot,
        configure: impl FnOnce(&mut Proxy),
    ) -> Harness {
        let (feed, snapshots) = watch::channel(first);
        let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control_addr = control.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(Fake(snapshots)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(control)),
        );
        let config = ControlConfig {
            addr: control_addr.to_string(),
            name: "unused".into(),
            trust_anchors: None,
            namespace: "shop".into(),
            pod: "web-1".into(),
        };
        let discovery = Discovery::new(
            config,
            tokio::runtime::Handle::current(),
            ControlMetrics::default(),
        )
        .unwrap();
        let proxy = proxy_with(|proxy| {
            proxy.discovery = Some(discovery);
            configure(proxy);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap();
        // The Service's ClusterIP:port: never dialled, its endpoints are.
        let octet = NEXT_CLUSTER_IP.fetch_add(1, Ordering::Relaxed);
        let target = SocketAddr::from(([198, 18, 0, octet], 80));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let destination = outbound::destination(proxy, target).await;
                    let cx = outbound::context(proxy);
                    let Ok((protocol, first)) = detect(&stream).await else {
                        return;
                    };
                    let stream = Rewound::new(stream.into(), first);
                    match protocol {
                        Detected::Http1 => {
                            crate::serve::http::serve_http1(stream, target, destination, cx).await
                        }
                        Detected::H2 => {
                            crate::serve::serve_h2(stream, target, destination, cx).await
                        }
                        Detected::Opaque => {}
                    }
                });
            }
        });
        Harness {
            proxy,
            listen,
            feed,
        }
    }

    /// How many requests `route_requests_total` counted for `route` and `status`.
    pub(crate) fn counted(&self, route: &str, status: u16) -> u64 {
        let discovery = self.proxy.discovery.as_ref().unwrap();
        discovery
            .metrics()
            .route_requests("shop", "cart", route, status)
            .get()
    }
}

/// Which protocol a test's client speaks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Client {
    Http1,
    H2,
}

pub(crate) const BOTH: [Client; 2] = [Client::Http1, Client::H2];

/// An answer as the client got it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Answer {
    pub(crate) fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .map_or("", |v| v.to_str().unwrap())
    }
}

/// A request built as a client would send it: `Host: cart` (HTTP/1) or `:authority` (HTTP/2).
pub(crate) fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .uri(path)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Sends one request through the proxy on a new connection.
async fn send(harness: &Harness, client: Client, mut request: Request<Full<Bytes>>) -> Answer {
    let stream = TcpStream::connect(harness.listen).await.unwrap();
    let io = TokioIo::new(stream);
    let response = match client {
        Client::Http1 => {
            request
                .headers_mut()
                .entry(http::header::HOST)
                .or_insert(http::HeaderValue::from_static("cart"));
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
        Client::H2 => {
            let path = request.uri().to_string();
            *request.uri_mut() = format!("http://cart{path}").parse().unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        }
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends within the test's step limit.
pub(crate) async fn ask(
    harness: &Harness,
    client: Client,
    request: Request<Full<Bytes>>,
) -> Answer {
    within(
        "a request through the proxy",
        send(harness, client, request),
    )
    .await
}

pub(crate) fn get(path: &str) -> Request<Full<Bytes>> {
    request("GET", path, &[], "")
}

fn path_match(kind: path_match::Kind, value: &str) -> Option<api::PathMatch> {
    Some(api::PathMatch {
        kind: kind as i32,
        value: value.into(),
    })
}

pub(crate) fn prefix(value: &str) -> Option<api::PathMatch> {
    path_match(path_match::Kind::Prefix, value)
}

/// A rule named `name` sending to the weighted backends (index, weight).
pub(crate) fn rule(name: &str, backends: &[(u32, u32)]) -> api::RouteRule {
    api::RouteRule {
        kind: "HTTPRoute".into(),
        namespace: "shop".into(),
        name: name.into(),
        backends: backends
            .iter()
            .map(|&(backend, weight)| api::WeightedBackend {
                backend,
                weight,
                filters: Vec::new(),
            })
            .collect(),
        ..Default::default()
    }
}

pub(crate) fn match_rule(rule: u32, path: Option<api::PathMatch>) -> api::RouteMatch {
    api::RouteMatch {
        rule,
        path,
        ..Default::default()
    }
}

/// Sends until `done` holds of an answer (a new snapshot reaching the proxy), at most 5 s.
async fn until(harness: &Harness, client: Client, path: &str, done: impl Fn(&Answer) -> bool) {
    let start = Instant::now();
    loop {
        let answer = ask(harness, client, get(path)).await;
        if done(&answer) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "still {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_weights_and_the_answers_of_rules_that_cannot_send() {
    let (own, v1, v2, empty) = (
        Echo::start("own").await,
        Echo::start("v1").await,
        Echo::start("v2").await,
        Echo::start("empty").await,
    );
    let mut no_endpoints = empty.backend();
    no_endpoints.endpoints.clear();
    let mut missing = v1.backend();
    missing.name = "missing".into();
    missing.resolved = false;
    let mut invalid = rule("invalid", &[(0, 1)]);
    invalid.invalid = "unknown filter".into();
    let table = api::RouteTable {
        matches: vec![
            api::RouteMatch {
                rule: 0,
                headers: vec![api::ValueMatch {
                    kind: value_match::Kind::Exact as i32,
                    name: "x-canary".into(),
                    value: "1".into(),
                }],
                ..Default::default()
            },
            match_rule(1, prefix("/split")),
            match_rule(2, prefix("/missing")),
            match_rule(3, prefix("/invalid")),
            match_rule(4, prefix("/no-weight")),
            match_rule(5, prefix("/no-endpoints")),
        ],
        rules: vec![
            rule("canary", &[(1, 1)]),
            // v1 3:1 v2, and the missing backend at weight 0 takes nothing.
            rule("split", &[(0, 3), (1, 1), (2, 0)]),
            rule("missing", &[(2, 1)]),
            invalid,
            rule("no-weight", &[(0, 0)]),
            rule("no-endpoints", &[(3, 1)]),
        ],
        backends: vec![v1.backend(), v2.backend(), missing, no_endpoints],
    };
    let harness = Harness::start(snapshot(&own, table)).await;
    for client in BOTH {
        let canary = request("GET", "/split", &[("X-Canary", "1")], "");
        assert_eq!(
            ask(&harness, client, canary).await.backend(),
            "v2",
            "{client:?}"
        );
        let mut counts = [0usize; 2];
        for _ in 0..200 {
            let answer = ask(&harness, client, get("/split/x")).await;
            assert_eq!(answer.status, StatusCode::OK, "{client:?}");
            counts[usize::from(answer.backend() == "v2")] += 1;
        }
        // 150 expected on v1: well inside 150 ± 30.
        assert!((120..=180).contains(&counts[0]), "{client:?}: {counts:?}");
        for (path, status) in [
            ("/other", StatusCode::NOT_FOUND),
            ("/splitter", StatusCode::NOT_FOUND),
            ("/missing", StatusCode::INTERNAL_SERVER_ERROR),
            ("/invalid", StatusCode::INTERNAL_SERVER_ERROR),
            ("/no-weight", StatusCode::INTERNAL_SERVER_ERROR),
            ("/no-endpoints", StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let answer = ask(&harness, client, get(path)).await;
            assert_eq!(answer.status, status, "{client:?} {path}: {answer:?}");
        }
    }
    assert!(
        own.seen().is_empty(),
        "with routes, the Service's own endpoints get nothing"
    );
    assert!(empty.seen().is_empty());
    assert_eq!(harness.counted("split", 200), 400);
    assert_eq!(harness.counted("canary", 200), 2);
    assert_eq!(harness.counted("unmatched", 404), 4);
    assert_eq!(harness.counted("invalid", 500), 2);
    assert_eq!(harness.counted("no-endpoints", 503), 2);
    assert_eq!(harness.counted("default", 200), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_come_and_go_with_the_snapshots() {
    let (own, v2) = (Echo::start("own").await, Echo::start("v2").await);
    let harness = Harness::start(snapshot(&own, api::RouteTable::default())).await;
    for client in BOTH {
        assert_eq!(ask(&harness, client, get("/")).await.backend(), "own");
    }
    assert_eq!(harness.counted("default", 200), 2);
    let table = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![rule("to-v2", &[(0, 1)])],
        backends: vec![v2.backend()],
    };
    harness.feed.send_replace(snapshot(&own, table));
    for client in BOTH {
        until(&harness, client, "/", |answer| answer.backend() == "v2").await;
    }
    harness
        .feed
        .send_replace(snapshot(&own, api::RouteTable::default()));
    for client in BOTH {
        until(&harness, client, "/", |answer| answer.backend() == "own").await;
    }
}

fn header(name: &str, value: &str) -> api::Header {
    api::Header {
        name: name.into(),
        value: value.into(),
    }
}

fn with_filters(mut rule: api::RouteRule, filters: Vec<filter::Kind>) -> api::RouteRule {
    rule.filters = filters
        .into_iter()
        .map(|kind| api::Filter { kind: Some(kind) })
        .collect();
    rule
}

fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_modifiers_apply_rule_then_backend_level() {
    let (own, v1) = (Echo::start("own").await, Echo::start("v1").await);
    let rule_level = with_filters(
        rule("headers", &[(0, 1)]),
        vec![
            filter::Kind::RequestHeaderModifier(api::HeaderModifier {
                set: vec![header("X-Header-Set", "set-overwrites-values")],
                add: vec![header("X-Header-Add", "add-appends-values")],
                remove: vec!["X-Header-Remove".into()],
            }),
            filter::Kind::ResponseHeaderModifier(api::HeaderModifier {
                set: vec![header("X-Upstream-Header", "replaced")],
                add: vec![header("X-Response-Add", "added")],
                remove: vec!["x-backend".into()],
            }),
        ],
    );
    let mut rule_level = rule_level;
    rule_level.backends[0].filters = vec![api::Filter {
        kind: Some(filter::Kind::RequestHeaderModifier(api::HeaderModifier {
            add: vec![header("x-header-add", "backend-level")],
            ..Default::default()
        })),
    }];
    let table = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![rule_level],
        backends: vec![v1.backend()],
    };
    let harness = Harness::start(snapshot(&own, table)).await;
    for client in BOTH {
        let sent = request(
            "GET",
            "/headers",
            &[
                ("x-header-set", "some-other-value"),
                ("X-Header-Add", "original"),
                ("x-header-remove", "one"),
                ("X-HEADER-REMOVE", "two"),
                ("x-kept", "yes"),
            ],
            "",
        );
        let answer = ask(&harness, client, sent).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "v1");
        assert!(answer.headers.get("x-backend").is_none(), "{client:?}");
        assert_eq!(values(&answer.headers, "x-upstream-header"), ["replaced"]);
        assert_eq!(values(&answer.headers, "x-response-add"), ["added"]);
        let seen = v1.seen().pop().unwrap();
        assert_eq!(
            values(&seen.headers, "x-header-set"),
            ["set-overwrites-values"]
        );
        assert_eq!(
            values(&seen.headers, "x-header-add"),
            ["original,add-appends-values,backend-level"],
            "{client:?}"
        );
        assert!(values(&seen.headers, "x-header-remove").is_empty());
        assert_eq!(values(&seen.headers, "x-kept"), ["yes"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_rewrites() {
    use remora_api::discovery::path_modifier::Kind::{ReplaceFullPath, ReplacePrefixMatch};
    let (own, v1) = (Echo::start("own").await, Echo::start("v1").await);
    let modifier = |kind: remora_api::discovery::path_modifier::Kind, value: &str| {
        Some(api::PathModifier {
            kind: kind as i32,
            value: value.into(),
        })
    };
    let redirect = |redirect: api::RequestRedirect| {
        with_filters(
            rule("redirect", &[]),
            vec![filter::Kind::RequestRedirect(redirect)],
        )
    };
    let rewrite = |rewrite: api::UrlRewrite| {
        with_filters(
            rule("rewrite", &[(0, 1)]),
            vec![filter::Kind::UrlRewrite(rewrite)],
        )
    };
    let table = api::RouteTable {
        matches: vec![
            match_rule(0, prefix("/hostname-redirect")),
            match_rule(1, prefix("/port-and-status")),
            match_rule(2, prefix("/original-prefix")),
            match_rule(3, prefix("/scheme")),
            match_rule(4, prefix("/prefix/one")),
            match_rule(5, prefix("/strip-prefix")),
            match_rule(6, prefix("/full")),
            match_rule(7, prefix("/host")),
        ],
        rules: vec![
            redirect(api::RequestRedirect {
                hostname: "example.org".into(),
                ..Default::default()
            }),
            redirect(api::RequestRedirect {
                port: 8083,
                status_code: 301,
                ..Default::default()
            }),
            redirect(api::RequestRedirect {
                path: modifier(ReplacePrefixMatch, "/replacement-prefix"),
                ..Default::default()
            }),
            redirect(api::RequestRedirect {
                scheme: "https".into(),
                ..Default::default()
            }),
            rewrite(api::UrlRewrite {
                path: modifier(ReplacePrefixMatch, "/one"),
                ..Default::default()
            }),
            rewrite(api::UrlRewrite {
                path: modifier(ReplacePrefixMatch, "/"),
                ..Default::default()
            }),
            rewrite(api::UrlRewrite {
                path: modifier(ReplaceFullPath, "/one"),
                ..Default::default()
            }),
            rewrite(api::UrlRewrite {
                hostname: "one.example.org".into(),
                ..Default::default()
            }),
        ],
        backends: vec![v1.backend()],
    };
    let harness = Harness::start(snapshot(&own, table)).await;
    for client in BOTH {
        for (path, status, location) in [
            (
                "/hostname-redirect",
                302,
                "http://example.org/hostname-redirect",
            ),
            (
                "/port-and-status?a=1",
                301,
                "http://cart:8083/port-and-status?a=1",
            ),
            (
                "/original-prefix/lemon",
                302,
                "http://cart/replacement-prefix/lemon",
            ),
            ("/scheme", 302, "https://cart/scheme"),
        ] {
            let answer = ask(&harness, client, get(path)).await;
            assert_eq!(answer.status.as_u16(), status, "{client:?} {path}");
            assert_eq!(
                values(&answer.headers, "location"),
                [location],
                "{client:?} {path}"
            );
        }
        for (path, upstream) in [
            ("/prefix/one/two", "/one/two"),
            ("/prefix/one", "/one"),
            ("/strip-prefix/three?x=1", "/three?x=1"),
            ("/strip-prefix", "/"),
            ("/full/one/two", "/one"),
        ] {
            let answer = ask(&harness, client, get(path)).await;
            assert_eq!(answer.status, StatusCode::OK, "{client:?} {path}");
            assert_eq!(v1.seen().pop().unwrap().uri, upstream, "{client:?} {path}");
        }
        ask(&harness, client, get("/host")).await;
        let seen = v1.seen().pop().unwrap();
        let host = match client {
            Client::Http1 => values(&seen.headers, "host"),
            // hyper's server gives HTTP/2's `:authority` as the URI's, not as a Host field.
            Client::H2 => vec![seen.authority.clone()],
        };
        assert_eq!(host, ["one.example.org"], "{client:?}");
    }
    assert_eq!(harness.counted("redirect", 302), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_backend_request_timeouts_answer_504() {
    let (own, v1) = (Echo::start("own").await, Echo::start("v1").await);
    let mut whole = rule("whole", &[(0, 1)]);
    whole.request_timeout_ms = 300;
    let mut one_try = rule("one-try", &[(0, 1)]);
    one_try.backend_request_timeout_ms = 300;
    let table = api::RouteTable {
        matches: vec![
            match_rule(0, prefix("/whole")),
            match_rule(1, prefix("/try")),
        ],
        rules: vec![whole, one_try],
        backends: vec![v1.backend()],
    };
    let harness = Harness::start(snapshot(&own, table)).await;
    for client in BOTH {
        for path in ["/whole", "/try"] {
            let fast = ask(&harness, client, get(&format!("{path}?delay=10"))).await;
            assert_eq!(fast.status, StatusCode::OK, "{client:?} {path}");
            let started = Instant::now();
            let slow = ask(&harness, client, get(&format!("{path}?delay=3000"))).await;
            assert_eq!(
                slow.status,
                StatusCode::GATEWAY_TIMEOUT,
                "{client:?} {path}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_listed_codes_and_connection_errors_within_the_attempts() {
    let (own, v1) = (Echo::start("own").await, Echo::start("v1").await);
    let mut retried = rule("retried", &[(0, 1)]);
    retried.retry = Some(api::Retry {
        codes: vec![503],
        attempts: 2,
        backoff_ms: 10,
    });
    let mut limited = rule("limited", &[(0, 1)]);
    limited.request_timeout_ms = 500;
    limited.backend_request_timeout_ms = 200;
    limited.retry = Some(api::Retry {
        codes: vec![503],
        attempts: 10,
        backoff_ms: 0,
    });
    let mut flaky = rule("flaky", &[(1, 1)]);
    flaky.retry = Some(api::Retry {
        codes: Vec::new(),
        attempts: 1,
        backoff_ms: 0,
    });
    let mut unretried = rule("unretried", &[(1, 1)]);
    unretried.retry = None;
    let mut table = api::RouteTable {
        matches: vec![
            match_rule(0, prefix("/retried")),
            match_rule(1, prefix("/limited")),
            match_rule(2, prefix("/flaky")),
        ],
        rules: vec![retried, limited, flaky],
        backends: vec![v1.backend()],
    };
    for client in BOTH {
        // A backend of its own per client, so that its first connection is a new one.
        let dropping = Echo::start("dropping").await;
        dropping.dropping.store(1, Ordering::SeqCst);
        table.backends.truncate(1);
        table.backends.push(dropping.backend());
        let harness = Harness::start(snapshot(&own, table.clone())).await;
        // Two failures, two retries: the third try answers, with the body each time.
        v1.seen.lock().unwrap().clear();
        v1.failing.store(2, Ordering::SeqCst);
        let sent = request("POST", "/retried", &[], "the body");
        let answer = ask(&harness, client, sent).await;
        assert_eq!(answer.status, StatusCode::OK, "{client:?}");
        let seen = v1.seen();
        assert_eq!(seen.len(), 3, "{client:?}");
        assert!(seen
            .iter()
            .all(|s| s.body == "the body" && s.method == Method::POST));
        assert_eq!(harness.counted("retried", 200), 1, "{client:?}");
        // Three failures: the last answer is the client's.
        v1.failing.store(3, Ordering::SeqCst);
        let answer = ask(&harness, client, get("/retried")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{client:?}");
        assert_eq!(v1.failing.load(Ordering::SeqCst), 0);
        // A connection closed without an answer is retried too.
        let answer = ask(&harness, client, get("/flaky")).await;
        assert_eq!(answer.status, StatusCode::OK, "{client:?}: {answer:?}");
        assert_eq!(dropping.dropping.load(Ordering::SeqCst), 0, "{client:?}");
        // The whole request timeout bounds the retries of slow tries: 504 at 500 ms.
        let started = Instant::now();
        let answer = ask(&harness, client, get("/limited?delay=1000")).await;
        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{client:?}");
        assert!(started.elapsed() < Duration::from_millis(1500));
        // A body over the replay limit goes once, in full, and is not retried.
        let big = "x".repeat(crate::serve::http::REPLAY_LIMIT + 1);
        v1.seen.lock().unwrap().clear();
        v1.failing.store(1, Ordering::SeqCst);
        let answer = ask(&harness, client, request("POST", "/retried", &[], &big)).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{client:?}: {answer:?}"
        );
        assert_eq!(v1.seen().len(), 1);
        assert_eq!(v1.seen()[0].body.len(), big.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_get_a_copy_and_the_client_does_not_wait() {
    let (own, v1, mirror) = (
        Echo::start("own").await,
        Echo::start("v1").await,
        Echo::start("mirror").await,
    );
    let mirrored = with_filters(
        rule("mirrored", &[(0, 1)]),
        vec![filter::Kind::RequestMirror(api::RequestMirror {
            backend: 1,
            numerator: 1,
            denominator: 1,
        })],
    );
    let half = with_filters(
        rule("half", &[(0, 1)]),
        vec![filter::Kind::RequestMirror(api::RequestMirror {
            backend: 1,
            numerator: 50,
            denominator: 100,
        })],
    );
    let table = api::RouteTable {
        matches: vec![
            match_rule(0, prefix("/mirrored")),
            match_rule(1, prefix("/half")),
        ],
        rules: vec![mirrored, half],
        backends: vec![v1.backend(), mirror.backend()],
    };
    let harness = Harness::start(snapshot(&own, table)).await;
    for client in BOTH {
        mirror.seen.lock().unwrap().clear();
        // The mirror takes 3 s to answer; the client has its answer long before.
        let started = Instant::now();
        let sent = request(
            "POST",
            "/mirrored?delay=3000",
            &[("x-trace", "7")],
            "payload",
        );
        let answer = ask(&harness, client, sent).await;
        assert_eq!(answer.backend(), "v1");
        let _ = started;
        let copy = within("the mirrored copy", async {
            loop {
                if let Some(copy) = mirror.seen().pop() {
                    return copy;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(copy.method, Method::POST);
        assert_eq!(copy.body, "payload");
        assert_eq!(values(&copy.headers, "x-trace"), ["7"]);
    }
    // Half the requests, give or take.
    mirror.delay_ms.store(0, Ordering::SeqCst);
    mirror.seen.lock().unwrap().clear();
    for _ in 0..200 {
        ask(&harness, Client::Http1, get("/half")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copies = mirror.seen().len();
    assert!((60..=140).contains(&copies), "{copies} of 200 mirrored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_keeps_its_backend_when_the_routes_change() {
    let (own, v1, v2) = (
        Echo::start("own").await,
        Echo::start("v1").await,
        Echo::start("v2").await,
    );
    let mut retried = rule("retried", &[(0, 1)]);
    retried.retry = Some(api::Retry {
        codes: vec![503],
        attempts: 1,
        backoff_ms: 500,
    });
    let before = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![retried.clone()],
        backends: vec![v1.backend()],
    };
    // The same route, its backend now second: a request that started before the change and
    // retries after it must still find v1, by name, not by its old index.
    retried.backends[0].backend = 1;
    let after = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![retried],
        backends: vec![v2.backend(), v1.backend()],
    };
    for client in BOTH {
        let harness = Harness::start(snapshot(&own, before.clone())).await;
        assert_eq!(ask(&harness, client, get("/")).await.backend(), "v1");
        v1.failing.store(1, Ordering::SeqCst);
        let in_flight = tokio::spawn({
            let (listen, proxy) = (harness.listen, harness.proxy);
            async move {
                let harness = Harness {
                    proxy,
                    listen,
                    feed: watch::channel(api::Snapshot::default()).0,
                };
                ask(&harness, client, get("/")).await
            }
        });
        // The first try has failed and the retry waits its backoff: the routes change now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(v1.failing.load(Ordering::SeqCst), 0, "{client:?}");
        harness.feed.send_replace(snapshot(&own, after.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = within("the request in flight", in_flight).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{client:?}");
        assert_eq!(answer.backend(), "v1", "{client:?}");
        until(&harness, client, "/", |answer| answer.backend() == "v1").await;
    }
    assert!(v2.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_body_is_not_held_back_by_a_rule_that_retries() {
    use http_body::Frame;
    use http_body_util::StreamBody;
    let (own, v1) = (Echo::start("own").await, Echo::start("v1").await);
    let mut retried = rule("retried", &[(0, 1)]);
    retried.retry = Some(api::Retry {
        codes: vec![503],
        attempts: 2,
        backoff_ms: 0,
    });
    let table = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![retried],
        backends: vec![v1.backend()],
    };
    let harness = Harness::start(snapshot(&own, table)).await;
    // HTTP/2 only: over HTTP/1 the proxy sends a body in full before it passes on an early
    // 2xx answer (the server may still read it; see `client::h1::exchange`), routes or not.
    for client in [Client::H2] {
        // A body of unknown length whose client waits for the answer before it sends the rest
        // (as a gRPC bidirectional call does): the answer must come without it.
        let (more, frames) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        more.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(frames));
        let stream = TcpStream::connect(harness.listen).await.unwrap();
        let io = TokioIo::new(stream);
        let response = match client {
            Client::Http1 => {
                let request = Request::post("/stream?early")
                    .header("host", "cart")
                    .body(body)
                    .unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(connection);
                within("the answer", sender.send_request(request)).await
            }
            Client::H2 => {
                let request = Request::post("http://cart/stream?early")
                    .body(body)
                    .unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .unwrap();
                tokio::spawn(connection);
                within("the answer", sender.send_request(request)).await
            }
        };
        assert_eq!(response.unwrap().status(), StatusCode::OK, "{client:?}");
        drop(more);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_covers_a_body_read_ahead() {
    use http_body::Frame;
    use http_body_util::StreamBody;
    let (own, v1) = (Echo::start("own").await, Echo::start("v1").await);
    let mut retried = rule("retried", &[(0, 1)]);
    retried.request_timeout_ms = 300;
    retried.retry = Some(api::Retry {
        codes: vec![503],
        attempts: 1,
        backoff_ms: 0,
    });
    let table = api::RouteTable {
        matches: vec![match_rule(0, prefix("/"))],
        rules: vec![retried],
        backends: vec![v1.backend()],
    };
    let harness = Harness::start(snapshot(&own, table)).await;
    // Ten bytes announced, five sent: the proxy waits for the rest, within the timeout.
    let (more, frames) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    more.send(Ok(Frame::data(Bytes::from_static(b"12345"))))
        .await
        .unwrap();
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(frames));
    let request = Request::post("http://cart/slow")
        .header("content-length", "10")
        .body(body)
        .unwrap();
    let io = TokioIo::new(TcpStream::connect(harness.listen).await.unwrap());
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    let response = within("the answer", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(v1.seen().is_empty());
    drop(more);
}
