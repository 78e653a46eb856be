//! `--inbound-rate-limit` end to end: a pod with remora-init's rules and the proxy, an app in it,
//! and clients on the remote host offering more than the limit, paced, over real sockets.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_e2e::*;

const APP_PORT: u16 = 8080;

/// A pod with remora-init's rules, a proxy with `proxy_args` and an app answering 200 on
/// [`APP_PORT`] (both families).
struct Mesh {
    // Field order: the proxy is killed before the namespaces go.
    _proxy: Proc,
    log: PathBuf,
    pod: Pod,
}

impl Mesh {
    fn new(proxy_args: &[&str]) -> Self {
        let pod = Pod::new().expect("building the pod");
        let out = pod
            .pod
            .command(bin("remora-init"))
            .output()
            .expect("spawning remora-init");
        assert!(
            out.status.success(),
            "remora-init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::env::temp_dir().join(format!("{}-proxy.log", pod.pod.name()));
        let file = std::fs::File::create(&log).expect("creating the proxy log");
        let proxy = Proc::spawn(
            pod.pod
                .command_as(PROXY_UID, PROXY_UID, bin("remora-proxy"))
                .args(["--log-format", "plain"])
                .args(proxy_args)
                .stdout(Stdio::null())
                .stderr(file),
        )
        .expect("spawning remora-proxy");
        let mesh = Self {
            _proxy: proxy,
            log,
            pod,
        };
        assert!(
            wait_until(Duration::from_secs(10), || mesh.admin("/ready").0 == 200),
            "the proxy never became ready: {}",
            mesh.log()
        );
        app(&mesh.pod.pod, addr(POD_V4, APP_PORT));
        app(&mesh.pod.pod, addr(POD_V6, APP_PORT));
        mesh
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin port's status and body for `path`.
    fn admin(&self, path: &str) -> (u16, String) {
        let out = self
            .pod
            .pod
            .command("curl")
            .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:15020{path}"))
            .stdin(Stdio::null())
            .output()
            .expect("spawning curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn metric(&self, series: &str) -> f64 {
        series_value(&self.admin("/metrics").1, series)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- remora-proxy log ---\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// An HTTP/1.1 and HTTP/2 server inside `ns` answering every request 200 `ok`.
fn app(ns: &NetNs, at: SocketAddr) {
    let listener = ns
        .run_in(move || std::net::TcpListener::bind(at))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {at}: {e}"));
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_request| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
}

/// What one client saw while it offered its load.
#[derive(Debug, Default)]
struct Outcome {
    /// 200s among the requests sent after the warm-up.
    allowed: usize,
    /// 429s among the requests sent after the warm-up.
    limited: usize,
    /// 429s (all of them) without a `Retry-After` of whole seconds, at least 1.
    limited_without_retry_after: usize,
    /// Anything else: another status, an error, a timeout.
    failed: usize,
}

/// How an HTTP client in the remote namespace talks to the pod.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// `connections` keep-alive connections, requests one at a time on each.
    Http1 { connections: usize },
    /// One prior-knowledge connection, its streams concurrent.
    H2,
}

const WARM_UP: Duration = Duration::from_secs(1);
const MEASURED: Duration = Duration::from_secs(3);

/// Offers `rate` requests per second from `source` to `target` for [`WARM_UP`] then
/// [`MEASURED`]; counts what the requests sent during the measured time got (the warm-up spends
/// the bucket's first second's worth). Bounded: every request has a deadline, and no new one
/// starts after the two periods.
fn offer(ns: &NetNs, source: IpAddr, target: SocketAddr, rate: u32, protocol: Protocol) -> Outcome {
    ns.run_in(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(offer_async(source, target, rate, protocol))
    })
    .expect("running the client in its namespace")
}

/// What one request got: its status and whether a 429 said when to come back, properly.
type Got = Option<(StatusCode, bool)>;

async fn connect(source: IpAddr, target: SocketAddr) -> tokio::net::TcpStream {
    let socket = match target {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(2), socket.connect(target))
        .await
        .expect("connect timed out")
        .expect("connecting to the pod");
    stream.set_nodelay(true).unwrap();
    stream
}

fn judge<B>(response: &Response<B>) -> (StatusCode, bool) {
    let retry_after = response
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    (
        response.status(),
        retry_after.is_some_and(|seconds| seconds >= 1),
    )
}

fn request(target: SocketAddr) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{target}/limited"))
        .body(Empty::new())
        .unwrap()
}

async fn offer_async(source: IpAddr, target: SocketAddr, rate: u32, protocol: Protocol) -> Outcome {
    let start = Instant::now();
    let end = start + WARM_UP + MEASURED;
    let deadline = Duration::from_secs(2);
    // (sent at, what it got), from every task.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Got)>();
    match protocol {
        Protocol::Http1 { connections } => {
            let period = Duration::from_secs_f64(connections as f64 / f64::from(rate));
            for n in 0..connections {
                let tx = tx.clone();
                let stream = connect(source, target).await;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .expect("HTTP/1 handshake");
                tokio::spawn(connection);
                tokio::spawn(async move {
                    // Staggered, so that the connections' requests spread over each period.
                    let first = tokio::time::Instant::from_std(start)
                        + period.mul_f64(n as f64 / connections as f64);
                    let mut ticks = tokio::time::interval_at(first, period);
                    loop {
                        let at = ticks.tick().await.into_std();
                        if at >= end {
                            break;
                        }
                        let got = tokio::time::timeout(deadline, async {
                            sender.ready().await.ok()?;
                            let response = sender.send_request(request(target)).await.ok()?;
                            let judged = judge(&response);
                            response.into_body().collect().await.ok()?;
                            Some(judged)
                        })
                        .await
                        .ok()
                        .flatten();
                        let _ = tx.send((at, got));
                    }
                });
            }
        }
        Protocol::H2 => {
            let stream = connect(source, target).await;
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("HTTP/2 handshake");
            tokio::spawn(connection);
            let tx = tx.clone();
            tokio::spawn(async move {
                let period = Duration::from_secs_f64(1.0 / f64::from(rate));
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::from_std(start), period);
                loop {
                    let at = ticks.tick().await.into_std();
                    if at >= end {
                        break;
                    }
                    let mut sender = sender.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let got = tokio::time::timeout(deadline, async {
                            let response = sender.send_request(request(target)).await.ok()?;
                            let judged = judge(&response);
                            response.into_body().collect().await.ok()?;
                            Some(judged)
                        })
                        .await
                        .ok()
                        .flatten();
                        let _ = tx.send((at, got));
                    });
                }
            });
        }
    }
    drop(tx);
    let mut outcome = Outcome::default();
    let measured_from = start + WARM_UP;
    // Every sender ends by `end` plus one deadline: bounded.
    let wait = tokio::time::timeout(WARM_UP + MEASURED + 2 * deadline, async {
        while let Some((at, got)) = rx.recv().await {
            let measured = at >= measured_from;
            match got {
                Some((StatusCode::OK, _)) if measured => outcome.allowed += 1,
                Some((StatusCode::OK, _)) => {}
                Some((StatusCode::TOO_MANY_REQUESTS, retry_after)) => {
                    outcome.limited_without_retry_after += usize::from(!retry_after);
                    outcome.limited += usize::from(measured);
                }
                _ => outcome.failed += 1,
            }
        }
    });
    wait.await.expect("the clients never finished");
    outcome
}

/// `allowed` over [`MEASURED`] is `rate` per second, ±10 %.
fn assert_rate(what: &str, outcome: &Outcome, rate: f64) {
    let seconds = MEASURED.as_secs_f64();
    let per_second = outcome.allowed as f64 / seconds;
    eprintln!("{what}: {per_second:.1}/s allowed: {outcome:?}");
    assert!(
        (rate * 0.9..=rate * 1.1).contains(&per_second),
        "{what}: {per_second:.1}/s allowed, expected {rate}/s ±10%: {outcome:?}"
    );
}

#[test]
fn at_300_per_second_offered_100_are_allowed_and_every_429_says_when_to_retry() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&["--inbound-rate-limit", "100/s"]);
    let target = addr(POD_V4, APP_PORT);
    let outcome = offer(
        &mesh.pod.remote,
        REMOTE_V4.into(),
        target,
        300,
        Protocol::Http1 { connections: 6 },
    );
    assert_eq!(outcome.failed, 0, "{outcome:?}");
    assert_eq!(outcome.limited_without_retry_after, 0, "{outcome:?}");
    assert_rate("HTTP/1", &outcome, 100.0);
    assert!(outcome.limited > 0, "{outcome:?}");
    let counted = mesh.metric("remora_proxy_rate_limited_total");
    assert!(
        counted >= outcome.limited as f64,
        "remora_proxy_rate_limited_total {counted}: {outcome:?}"
    );
    assert!(
        mesh.metric(
            "remora_proxy_requests_total{direction=\"inbound\",protocol=\"http1\",status_code=\"429\",tls=\"false\",client_id=\"\"}"
        ) >= outcome.limited as f64
    );

    // HTTP/2 too (the limit turns the relay off for inbound: each stream is answered). The
    // bucket has refilled by the time it starts; the warm-up spends that again.
    let target = addr(POD_V6, APP_PORT);
    let outcome = offer(
        &mesh.pod.remote,
        REMOTE_V6.into(),
        target,
        300,
        Protocol::H2,
    );
    assert_eq!(outcome.failed, 0, "{outcome:?}");
    assert_eq!(outcome.limited_without_retry_after, 0, "{outcome:?}");
    assert_rate("HTTP/2", &outcome, 100.0);
}

#[test]
fn each_client_is_held_to_its_share() {
    if !can_run() {
        return;
    }
    // Two clients at 150/s each: the total (200/s) would let both through at 100/s; their share
    // (50/s) holds each.
    let mesh = Mesh::new(&["--inbound-rate-limit", "200/s,50/s per-client"]);
    let target = addr(POD_V4, APP_PORT);
    let remote = &mesh.pod.remote;
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            offer(
                remote,
                REMOTE_V4.into(),
                target,
                150,
                Protocol::Http1 { connections: 3 },
            )
        });
        let second = scope.spawn(|| offer(remote, REMOTE2_V4.into(), target, 150, Protocol::H2));
        (first.join().unwrap(), second.join().unwrap())
    });
    for (what, outcome) in [("first client", &first), ("second client", &second)] {
        assert_eq!(outcome.failed, 0, "{what}: {outcome:?}");
        assert_eq!(
            outcome.limited_without_retry_after, 0,
            "{what}: {outcome:?}"
        );
        assert_rate(what, outcome, 50.0);
    }
}

#[test]
fn without_the_flag_nothing_is_limited() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[]);
    let outcome = offer(
        &mesh.pod.remote,
        REMOTE_V4.into(),
        addr(POD_V4, APP_PORT),
        300,
        Protocol::Http1 { connections: 6 },
    );
    assert_eq!((outcome.limited, outcome.failed), (0, 0), "{outcome:?}");
    assert_rate("unlimited", &outcome, 300.0);
    assert_eq!(mesh.metric("remora_proxy_rate_limited_total"), 0.0);
}

/// A TCP server inside `ns` that echoes what it reads until the client shuts down its side.
fn tcp_echo(ns: &NetNs, at: SocketAddr) {
    let listener = ns
        .run_in(move || std::net::TcpListener::bind(at))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {at}: {e}"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

#[test]
fn opaque_tcp_is_not_limited() {
    use std::io::{Read, Write};
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&["--inbound-rate-limit", "1/s", "--opaque-ports", "9000"]);
    tcp_echo(&mesh.pod.pod, addr(POD_V4, 9000));
    // The limit holds for HTTP here: one request a second, the next at once refused.
    let statuses: Vec<String> = (0..2)
        .map(|_| {
            let out = mesh
                .pod
                .remote
                .command("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(format!("http://{}/", addr(POD_V4, APP_PORT)))
                .stdin(Stdio::null())
                .output()
                .expect("spawning curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect();
    assert_eq!(statuses, ["200", "429"]);
    // Ten connections within well under a second: every one is carried.
    for n in 0..10 {
        let echoed = mesh
            .pod
            .remote
            .run_in(move || -> std::io::Result<String> {
                let target = addr(POD_V4, 9000);
                let mut stream =
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(format!("ping {n}").as_bytes())?;
                stream.shutdown(std::net::Shutdown::Write)?;
                let mut echoed = String::new();
                stream.read_to_string(&mut echoed)?;
                Ok(echoed)
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("connection {n}: {e}"));
        assert_eq!(echoed, format!("ping {n}"));
    }
    assert_eq!(mesh.metric("remora_proxy_rate_limited_total"), 1.0);
}
