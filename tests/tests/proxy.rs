//! remora-proxy end to end: a pod made of namespaces, remora-init's real rules, the proxy as uid
//! 1337, an app in the pod and servers on the remote host; real sockets throughout.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_e2e::*;

/// A pod with remora-init's rules and a running remora-proxy.
struct Mesh {
    // Field order: the proxy is killed before the namespaces go.
    proxy: Proc,
    log: PathBuf,
    pod: Pod,
}

impl Mesh {
    fn new(init_args: &[&str], proxy_args: &[&str]) -> Self {
        Self::build(Pod::new().expect("building the pod"), init_args, proxy_args)
    }

    /// A pod whose kernel has IPv6 switched off, as on an IPv4-only cluster.
    fn ipv4_only() -> Self {
        let pod = Pod::new().expect("building the pod");
        for conf in ["all", "default", "lo", "eth0"] {
            pod.pod
                .exec_ok(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{conf}.disable_ipv6=1"),
                ])
                .unwrap();
        }
        Self::build(pod, &[], &[])
    }

    fn build(pod: Pod, init_args: &[&str], proxy_args: &[&str]) -> Self {
        let out = pod
            .pod
            .command(bin("remora-init"))
            .args(init_args)
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
                .args(["--log-format", "plain", "--access-log"])
                .args(proxy_args)
                .stdout(Stdio::null())
                .stderr(file),
        )
        .expect("spawning remora-proxy");
        let mesh = Self { proxy, log, pod };
        assert!(
            wait_until(Duration::from_secs(10), || mesh.ready() == Some(200)),
            "the proxy never became ready: {}",
            mesh.log()
        );
        mesh
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/ready`'s status code, or `None` when the admin port does not answer.
    fn ready(&self) -> Option<u16> {
        let out = curl(
            &self.pod.pod,
            &["-o", "/dev/null", "-w", "%{http_code}", ADMIN_READY],
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .ok()
            .filter(|&code| code != 0)
    }

    fn metrics(&self) -> String {
        let out = curl(&self.pod.pod, &["http://127.0.0.1:15020/metrics"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The value of one series, `name{labels}` exactly as exposed; 0 when absent.
    fn metric(&self, series: &str) -> f64 {
        series_value(&self.metrics(), series)
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

const ADMIN_READY: &str = "http://127.0.0.1:15020/ready";

/// `curl -w '%{http_code} '` + body.
fn get(ns: &NetNs, args: &[&str]) -> (u16, String) {
    let mut argv = vec!["-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    let out = curl(ns, &argv);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// An HTTP/1.1 + HTTP/2 (prior knowledge) server on `addr` inside `ns`:
/// `/slow` answers after 1.5 s and `/sleep/<ms>[/anything]` after that many ms (counted in
/// [`STARTED`] as it arrives), `/ws` upgrades and `CONNECT` tunnels, then both echo bytes;
/// anything else says `hello <path> <version>`. Every response carries `x-connection`, the
/// number of the connection it came on.
fn http_server(ns: &NetNs, addr: SocketAddr) {
    let listener = ns
        .run_in(move || std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let mut accepted = 0u32;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                accepted += 1;
                let connection = accepted;
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| async move {
                        let mut response = answer(request).await?;
                        response
                            .headers_mut()
                            .insert("x-connection", connection.into());
                        Ok::<_, Infallible>(response)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
}

/// How many requests for each `/sleep/` path have reached a server, across all tests.
static STARTED: std::sync::Mutex<BTreeMap<String, usize>> = std::sync::Mutex::new(BTreeMap::new());

fn started(path: &str) -> usize {
    STARTED.lock().unwrap().get(path).copied().unwrap_or(0)
}

async fn answer(mut request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    if let Some(rest) = path.strip_prefix("/sleep/") {
        let ms = rest.split('/').next().and_then(|ms| ms.parse().ok());
        *STARTED.lock().unwrap().entry(path.clone()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(ms.unwrap_or(0))).await;
    }
    if path == "/ws" || request.method() == hyper::Method::CONNECT {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut reader, mut writer) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        if request.method() == hyper::Method::CONNECT {
            return Ok(response);
        }
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        response
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(response);
    }
    let _ = request.body_mut().collect().await;
    let body = format!("hello {path} {:?}", request.version());
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// A plain TCP server inside `ns`: `greet` is written on accept (a server-first protocol),
/// then every byte read is echoed.
fn tcp_server(ns: &NetNs, addr: SocketAddr, greet: &'static [u8]) {
    let listener = ns
        .run_in(move || std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = stream.write_all(greet);
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
}

/// Connects from inside `ns` with short timeouts.
fn connect(ns: &NetNs, addr: SocketAddr) -> std::io::Result<TcpStream> {
    ns.run_in(move || {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        // These fail on a connection the other side has already reset; reads then fail at once.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
        let _ = stream.set_nodelay(true);
        Ok(stream)
    })
    .unwrap()
}

fn read_until_closed_or(stream: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

const OUT_H1: &str =
    "remora_proxy_requests_total{direction=\"outbound\",protocol=\"http1\",status_code=\"200\",tls=\"false\",client_id=\"\"}";
const OUT_H2: &str =
    "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"}";
const OUT_502: &str =
    "remora_proxy_requests_total{direction=\"outbound\",protocol=\"http1\",status_code=\"502\",tls=\"false\",client_id=\"\"}";
const IN_H1: &str =
    "remora_proxy_requests_total{direction=\"inbound\",protocol=\"http1\",status_code=\"200\",tls=\"false\",client_id=\"\"}";
const OUT_CONNS: &str =
    "remora_proxy_tcp_connections_total{direction=\"outbound\",tls=\"false\",client_id=\"\"}";
const IN_CONNS: &str =
    "remora_proxy_tcp_connections_total{direction=\"inbound\",tls=\"false\",client_id=\"\"}";
const OUT_CONNECT_ERRORS: &str = "remora_proxy_connect_errors_total{direction=\"outbound\"}";

#[test]
fn outbound_http1_and_h2_go_through_the_proxy_on_both_families() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
    http_server(&mesh.pod.remote, addr(REMOTE_V6, 8080));

    let (code, body) = get(&mesh.pod.pod, &["http://198.18.0.2:8080/one"]);
    assert_eq!((code, body.as_str()), (200, "hello /one HTTP/1.1"));
    let (code, body) = get(&mesh.pod.pod, &["http://[2001:2::2]:8080/six"]);
    assert_eq!((code, body.as_str()), (200, "hello /six HTTP/1.1"));
    // Two requests on one client connection: both proxied, one upstream connection reused.
    let (code, body) = get(
        &mesh.pod.pod,
        &["http://198.18.0.2:8080/a", "http://198.18.0.2:8080/b"],
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("hello /a") && body.contains("hello /b"),
        "{body}"
    );
    let (code, body) = get(
        &mesh.pod.pod,
        &["--http2-prior-knowledge", "http://198.18.0.2:8080/two"],
    );
    assert_eq!((code, body.as_str()), (200, "hello /two HTTP/2.0"));

    let metrics = mesh.metrics();
    assert_eq!(series_value(&metrics, OUT_H1), 4.0, "{metrics}");
    assert_eq!(series_value(&metrics, OUT_H2), 1.0, "{metrics}");
    assert_eq!(series_value(&metrics, OUT_CONNS), 4.0, "{metrics}");
    assert!(
        series_value(
            &metrics,
            "remora_proxy_tcp_bytes_total{direction=\"outbound\",flow=\"tx\"}"
        ) > 0.0
    );
    assert!(
        series_value(
            &metrics,
            "remora_proxy_request_duration_seconds_count{direction=\"outbound\"}"
        ) >= 5.0
    );
    assert!(
        mesh.log().contains("path=/two"),
        "access log: {}",
        mesh.log()
    );
}

#[test]
fn inbound_reaches_the_app_and_a_loopback_only_app_stays_private() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    http_server(&mesh.pod.pod, addr(POD_V4, 8080));
    http_server(&mesh.pod.pod, addr(POD_V6, 8080));
    http_server(&mesh.pod.pod, addr(std::net::Ipv4Addr::LOCALHOST, 8081));

    let (code, body) = get(&mesh.pod.remote, &["http://198.18.0.1:8080/in"]);
    assert_eq!((code, body.as_str()), (200, "hello /in HTTP/1.1"));
    let (code, body) = get(
        &mesh.pod.remote,
        &["--http2-prior-knowledge", "http://[2001:2::1]:8080/in6"],
    );
    assert_eq!((code, body.as_str()), (200, "hello /in6 HTTP/2.0"));
    assert_eq!(mesh.metric(IN_H1), 1.0);
    assert_eq!(
        mesh.metric(
            "remora_proxy_requests_total{direction=\"inbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"}"
        ),
        1.0
    );

    // The proxy dials the pod IP, never 127.0.0.1: the loopback-only app is not reached.
    let (code, body) = get(&mesh.pod.remote, &["http://198.18.0.1:8081/private"]);
    assert_eq!(code, 502, "{body}");
    assert!(!body.contains("hello"), "{body}");
    // Inside the pod the app works as before (loopback is never redirected).
    let (code, _) = get(&mesh.pod.pod, &["http://127.0.0.1:8081/local"]);
    assert_eq!(code, 200);
    assert_eq!(mesh.metric(IN_CONNS), 3.0);
}

#[test]
fn a_server_first_protocol_answers_without_a_stall() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    // 7000 is not an opaque port: detection must give up quickly on its own.
    tcp_server(&mesh.pod.remote, addr(REMOTE_V4, 7000), b"220 ready\r\n");
    // 3306 is opaque by default: no detection at all.
    tcp_server(&mesh.pod.remote, addr(REMOTE_V4, 3306), b"mysql-greeting\n");
    for (port, greeting, limit_ms) in [(7000, "220 ready", 500), (3306, "mysql-greeting", 100)] {
        let start = Instant::now();
        let mut stream = connect(&mesh.pod.pod, addr(REMOTE_V4, port)).unwrap();
        let seen = read_until_closed_or(&mut stream, greeting);
        let elapsed = start.elapsed();
        assert!(seen.contains(greeting), "port {port}: {seen:?}");
        assert!(
            elapsed < Duration::from_millis(limit_ms),
            "port {port}: greeting after {elapsed:?}"
        );
        // Then it is a normal byte stream both ways, and half-close is carried.
        stream.write_all(b"QUIT\r\n").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let rest = read_until_closed_or(&mut stream, "never");
        assert_eq!(rest, "QUIT\r\n", "port {port}");
    }
    assert_eq!(mesh.metric(OUT_CONNS), 2.0);
}

/// The start of a MariaDB server's handshake packet: what its clients wait for before they write.
const MARIADB_GREETING: &[u8] = b"\x4a\x00\x00\x00\x0a5.5.5-11.4.2-MariaDB\x00";

/// From inside `ns`: how long from the start of connect() until the server's greeting has
/// arrived, timed on the connecting thread itself; then the connection, greeting read.
fn time_to_greeting(ns: &NetNs, addr: SocketAddr) -> (Duration, TcpStream) {
    ns.run_in(move || {
        let start = Instant::now();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
        let mut greeting = vec![0; MARIADB_GREETING.len()];
        stream
            .read_exact(&mut greeting)
            .unwrap_or_else(|e| panic!("reading {addr}'s greeting: {e}"));
        let elapsed = start.elapsed();
        assert_eq!(greeting, MARIADB_GREETING, "{addr}");
        (elapsed, stream)
    })
    .unwrap()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

const OUT_DETECT_TIMEOUTS: &str = "remora_proxy_detect_timeouts_total{direction=\"outbound\"}";
const OUT_DETECT_SKIPPED: &str = "remora_proxy_detect_skipped_total{direction=\"outbound\"}";
const OUT_SERVER_FIRST: &str = "remora_proxy_server_first_destinations{direction=\"outbound\"}";

#[test]
fn a_server_first_protocol_on_an_unlisted_port_waits_for_detection_only_once() {
    if !can_run() {
        return;
    }
    // The same server on 198.18.0.3, which the rules leave alone, is the direct baseline.
    let mesh = Mesh::new(&["--exclude-outbound-cidrs", "198.18.0.3/32"], &[]);
    let (meshed, direct) = (addr(REMOTE_V4, 3307), addr(REMOTE2_V4, 3307));
    tcp_server(&mesh.pod.remote, meshed, MARIADB_GREETING);
    tcp_server(&mesh.pod.remote, direct, MARIADB_GREETING);

    // The first connection through the proxy waits out detection, and works.
    let (first, mut stream) = time_to_greeting(&mesh.pod.pod, meshed);
    stream.write_all(b"\x01\x00\x00\x01\x01").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let echoed = read_until_closed_or(&mut stream, "\u{0}never");
    assert_eq!(echoed.as_bytes(), b"\x01\x00\x00\x01\x01");
    assert_eq!(mesh.metric(OUT_DETECT_TIMEOUTS), 1.0);
    assert_eq!(mesh.metric(OUT_SERVER_FIRST), 1.0);

    // The next ones, whichever worker serves them, skip the wait: within 10 ms of direct.
    const ROUNDS: usize = 5;
    let (mut via_mesh, mut without) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(time_to_greeting(&mesh.pod.pod, direct).0);
        via_mesh.push(time_to_greeting(&mesh.pod.pod, meshed).0);
    }
    let (via_mesh, without) = (median(via_mesh), median(without));
    eprintln!(
        "time to greeting: first via the mesh {first:?}; median of {ROUNDS} after it \
         {via_mesh:?}, direct {without:?}"
    );
    assert!(
        via_mesh <= without + Duration::from_millis(10),
        "median time to greeting via the mesh {via_mesh:?}, direct {without:?}"
    );
    let metrics = mesh.metrics();
    assert_eq!(
        series_value(&metrics, OUT_DETECT_TIMEOUTS),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        series_value(&metrics, OUT_DETECT_SKIPPED),
        ROUNDS as f64,
        "{metrics}"
    );
    assert_eq!(series_value(&metrics, OUT_SERVER_FIRST), 1.0, "{metrics}");
    assert_eq!(
        series_value(&metrics, OUT_CONNS),
        1.0 + ROUNDS as f64,
        "{metrics}"
    );
}

#[test]
fn a_client_first_protocol_reaches_the_server_byte_for_byte() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    // An echo server on a port detection runs on; it sends nothing first.
    tcp_server(&mesh.pod.remote, addr(REMOTE_V4, 7001), b"");
    // Detection reads the first bytes itself; each case must still arrive whole and in order.
    let large: Vec<u8> = b"SET k "
        .iter()
        .copied()
        .chain((0..20_000).map(|i| b'a' + (i % 26) as u8))
        .collect();
    let cases: [(&str, &[u8]); 3] = [
        ("a TLS-like binary hello", b"\x16\x03\x01\x00\x05hello"),
        ("undecided bytes, then a close", b"GE"),
        ("a first write larger than detection's read", &large),
    ];
    for (name, bytes) in cases {
        let mut stream = connect(&mesh.pod.pod, addr(REMOTE_V4, 7001)).unwrap();
        stream.write_all(bytes).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let echoed = read_until_closed_or(&mut stream, "\u{0}never");
        assert!(
            echoed.as_bytes() == bytes,
            "{name}: {} bytes back",
            echoed.len()
        );
    }
    assert_eq!(mesh.metric(OUT_CONNS), 3.0);
}

#[test]
fn excluded_ports_bypass_the_proxy() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&["--exclude-outbound-ports", "9000"], &[]);
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 9000));
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 9001));
    let (code, _) = get(&mesh.pod.pod, &["http://198.18.0.2:9000/direct"]);
    assert_eq!(code, 200);
    assert_eq!(
        mesh.metric(OUT_CONNS),
        0.0,
        "port 9000 went through the proxy"
    );
    let (code, _) = get(&mesh.pod.pod, &["http://198.18.0.2:9001/meshed"]);
    assert_eq!(code, 200);
    assert_eq!(mesh.metric(OUT_CONNS), 1.0);
}

#[test]
fn a_refused_destination_gives_502_quickly_or_a_reset_and_is_counted() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    let start = Instant::now();
    let (code, body) = get(&mesh.pod.pod, &["http://198.18.0.2:8099/nobody"]);
    assert_eq!(code, 502, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // Opaque: the client's connection is reset.
    // (The reset can win the race with connect() itself.)
    let error = connect(&mesh.pod.pod, addr(REMOTE_V4, 3306))
        .and_then(|mut stream| stream.read(&mut [0u8; 16]))
        .expect_err("a reset, not data or EOF");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    let metrics = mesh.metrics();
    assert_eq!(series_value(&metrics, OUT_502), 1.0, "{metrics}");
    assert_eq!(series_value(&metrics, OUT_CONNECT_ERRORS), 2.0, "{metrics}");
}

#[test]
fn an_inbound_client_that_stops_reading_a_while_is_not_cut_off() {
    if !can_run() {
        return;
    }
    // Four keepalive periods are 4 s; the client reads nothing for 6 s while the proxy has data
    // for it and its window is shut. A live peer's shut window is no sign of death.
    let mesh = Mesh::new(&[], &["--tcp-keepalive", "1s"]);
    const SIZE: usize = 16 << 20;
    let app = addr(POD_V4, 9001);
    let listener = mesh
        .pod
        .pod
        .run_in(move || std::net::TcpListener::bind(app))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.set_write_timeout(Some(Duration::from_secs(20)));
        let block = vec![b'x'; 1 << 16];
        for _ in 0..SIZE / block.len() {
            if stream.write_all(&block).is_err() {
                return;
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
    });
    let mut client = connect(&mesh.pod.remote, app).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut received = 0;
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        match client.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => received += n,
            Err(error) => break Some(error),
        }
    };
    assert_eq!(
        (received, ended.map(|e| e.kind())),
        (SIZE, None),
        "{}",
        mesh.log()
    );
}

/// From now on, `ns` sends nothing more on TCP `port` (`--sport` or `--dport`): to its peer it
/// looks like a host that vanished without a FIN or a reset (a node that lost power, a split).
fn fall_silent(ns: &NetNs, direction: &str, port: u16) {
    ns.exec_ok(&[
        "iptables",
        "-w",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        direction,
        &port.to_string(),
        "-j",
        "DROP",
    ])
    .unwrap();
}

/// Established TCP connections in `ns` with local port `port`.
fn established(ns: &NetNs, port: u16) -> usize {
    let out = ns
        .exec_ok(&[
            "ss",
            "-Htn",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// curl in the background, bounded at 20 s: the proxy must answer well before.
fn curl_in_background(ns: &NetNs, args: &[&str]) -> std::process::Child {
    ns.command("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning curl")
}

#[test]
fn a_destination_that_falls_silent_is_given_up_and_a_slow_live_one_answers() {
    if !can_run() {
        return;
    }
    // Found dead after 4 s of silence.
    let mesh = Mesh::new(&[], &["--tcp-keepalive", "1s"]);
    let (pod, remote) = (&mesh.pod.pod, &mesh.pod.remote);
    http_server(remote, addr(REMOTE_V4, 8080));
    http_server(remote, addr(REMOTE_V4, 8081));
    // Both answer after 6 s, longer than it takes to find a silent peer dead.
    let start = Instant::now();
    let (live, dead) = ("/sleep/6000/live", "/sleep/6000/dead");
    let url = |port: u16, path: &str| format!("http://198.18.0.2:{port}{path}");
    let live_curls = [
        curl_in_background(pod, &[&url(8080, live)]),
        curl_in_background(pod, &["--http2-prior-knowledge", &url(8080, live)]),
    ];
    let dead_curls = [
        curl_in_background(pod, &[&url(8081, dead)]),
        curl_in_background(pod, &["--http2-prior-knowledge", &url(8081, dead)]),
    ];
    // Once both requests are at the server on 8081 (no connect can fail instead, and nothing
    // is left unacknowledged, which the kernel would retransmit for minutes), it goes silent.
    assert!(
        wait_until(Duration::from_secs(3), || started(dead) == 2
            && started(live) == 2),
        "the requests never reached the servers"
    );
    std::thread::sleep(Duration::from_millis(300)); // a delayed ACK is out by now
    fall_silent(remote, "--sport", 8081);
    let silent = Instant::now();
    // HTTP/1.1 gets a 502; relayed HTTP/2 carries the connection itself, so its client
    // connection is reset, as a byte stream's would be.
    for (curl, expected) in dead_curls
        .into_iter()
        .zip(["502", "000"])
        .chain(live_curls.into_iter().map(|curl| (curl, "200")))
    {
        let out = curl.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        assert_eq!(code, expected, "{body} {stderr}\n{}", mesh.log());
        if expected == "200" {
            assert!(body.starts_with("hello /sleep/6000/live HTTP/"), "{body}");
            continue;
        }
        // 4 s of keepalive, not curl's 20 s.
        let waited = silent.elapsed();
        assert!(waited < Duration::from_secs(10), "{waited:?}: {body}");
        if expected == "502" {
            assert!(body.contains("timed out"), "{body}");
        } else {
            assert!(stderr.contains("reset"), "{stderr}");
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let metrics = mesh.metrics();
    for (protocol, code, expected) in [
        ("http1", "200", 1.0),
        ("http1", "502", 1.0),
        ("h2", "200", 1.0),
        ("h2", "502", 0.0),
    ] {
        let series = format!(
            "remora_proxy_requests_total{{direction=\"outbound\",protocol=\"{protocol}\",status_code=\"{code}\",tls=\"false\",client_id=\"\"}}"
        );
        assert_eq!(
            series_value(&metrics, &series),
            expected,
            "{series}\n{metrics}"
        );
    }
}

#[test]
fn an_inbound_client_that_falls_silent_is_let_go_and_the_app_freed() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &["--tcp-keepalive", "1s"]);
    let (pod, remote) = (&mesh.pod.pod, &mesh.pod.remote);
    // The app: one connection, read until it ends; reports how it ended and when.
    let app = addr(POD_V4, 9000);
    let listener = pod
        .run_in(move || std::net::TcpListener::bind(app))
        .unwrap()
        .unwrap();
    let (ended_tx, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
        let mut buf = [0u8; 64];
        let how = loop {
            match stream.read(&mut buf) {
                Ok(0) => break "closed".to_string(),
                Ok(_) => continue,
                Err(error) => break error.kind().to_string(),
            }
        };
        let _ = ended_tx.send((how, Instant::now()));
    });
    let mut client = connect(remote, app).unwrap();
    client.write_all(b"hello app\n").unwrap();
    let open = "remora_proxy_tcp_open_connections{direction=\"inbound\"}";
    assert!(wait_until(Duration::from_secs(3), || {
        mesh.metric(open) == 1.0 && established(pod, 9000) == 1
    }));
    // The client's host vanishes: nothing it sends on this connection arrives any more.
    fall_silent(remote, "--dport", 9000);
    let silent = Instant::now();
    let (how, at) = ended
        .recv_timeout(Duration::from_secs(25))
        .expect("the app's connection never ended");
    // The proxy resets both sides of a byte stream that fails, as within 4 s here; the app's
    // own read timeout (20 s) would say it held the connection open.
    assert_eq!(how, "connection reset", "after {:?}", at - silent);
    assert!(
        at - silent < Duration::from_secs(10),
        "{how} after {:?}",
        at - silent
    );
    assert!(wait_until(Duration::from_secs(2), || mesh.metric(open) == 0.0));
    drop(client);
}

#[test]
fn a_direct_connection_to_a_listener_is_refused_not_looped() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    for target in [
        addr(std::net::Ipv4Addr::LOCALHOST, 15001),
        addr(POD_V4, 15006),
    ] {
        let mut stream = match connect(&mesh.pod.pod, target) {
            Ok(stream) => stream,
            // Refused (reset) before connect() even returned.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => continue,
            Err(error) => panic!("{target}: {error}"),
        };
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: loop\r\n\r\n");
        let start = Instant::now();
        let seen = read_until_closed_or(&mut stream, "HTTP/1.1");
        assert!(seen.is_empty(), "{target}: {seen:?}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    // From the remote host, the inbound port itself is not a way back into the proxy either.
    let (code, _) = get(&mesh.pod.remote, &["http://198.18.0.1:15006/"]);
    assert_ne!(code, 200);
    assert_eq!(mesh.ready(), Some(200));
    // One accepted connection each, no loop of connections.
    let metrics = mesh.metrics();
    assert_eq!(series_value(&metrics, OUT_CONNS), 1.0, "{metrics}");
    assert!(series_value(&metrics, IN_CONNS) <= 3.0, "{metrics}");
    assert!(mesh.log().contains("connection refused"), "{}", mesh.log());
}

#[test]
fn a_websocket_upgrade_is_tunneled_both_ways() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
    let mut stream = connect(&mesh.pod.pod, addr(REMOTE_V4, 8080)).unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: remote\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let head = read_until_closed_or(&mut stream, "\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    for message in ["first frame", "second frame"] {
        stream.write_all(message.as_bytes()).unwrap();
        let echoed = read_until_closed_or(&mut stream, message);
        assert_eq!(echoed, message);
    }
    let metrics = mesh.metrics();
    assert_eq!(
        series_value(
            &metrics,
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"http1\",status_code=\"101\",tls=\"false\",client_id=\"\"}"
        ),
        1.0,
        "{metrics}"
    );
}

/// Issue 22's reproduction: a request naming its own framing header in `Connection` must not
/// carry a second request to the app inside its body, one the proxy never saw or logged.
#[test]
fn a_request_body_never_reaches_the_app_as_a_request_of_its_own() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    http_server(&mesh.pod.pod, addr(POD_V4, 8080));
    // The app counts requests for `/sleep/` paths as they arrive.
    let smuggled = "GET /sleep/0/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    for (connection, framing, body) in [
        (
            "content-length",
            format!("Content-Length: {}", smuggled.len()),
            smuggled.to_string(),
        ),
        (
            "transfer-encoding",
            "Transfer-Encoding: chunked".to_string(),
            format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()),
        ),
    ] {
        let mut stream = connect(&mesh.pod.remote, addr(POD_V4, 8080)).unwrap();
        let request = format!(
            "POST /front HTTP/1.1\r\nHost: app\r\nConnection: {connection}\r\n{framing}\r\n\r\n{body}"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let response = read_until_closed_or(&mut stream, "hello /front HTTP/1.1");
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{connection}: {response:?}"
        );
        assert!(response.ends_with("hello /front HTTP/1.1"), "{response:?}");
    }
    // Time for a smuggled request to be served, had it reached the app.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        started("/sleep/0/smuggled"),
        0,
        "the app served a request inside a body"
    );
    assert_eq!(mesh.metric(IN_H1), 2.0);
}

/// Issue 22's measurement: curl uploads with `Expect: 100-continue` to a server that refuses at
/// once. The proxy forwards the expectation, so curl gets the 413 before sending a body byte, as
/// it does direct; it used to get the proxy's own 100 and send megabytes first.
#[test]
fn an_upload_refused_at_once_sends_no_body_byte_through_the_proxy() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    let listener = mesh
        .pod
        .remote
        .run_in(|| std::net::TcpListener::bind((REMOTE_V4, 8081)))
        .unwrap()
        .unwrap();
    let (report, body_bytes) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        let mut got = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let _ = stream.write_all(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
        );
        // Whatever comes after the head until the proxy closes (or 3 s pass) is body.
        let mut after = got.len() - head_end;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            after += n;
        }
        let _ = report.send((
            String::from_utf8_lossy(&got[..head_end]).into_owned(),
            after,
        ));
    });
    let upload = std::env::temp_dir().join(format!("{}-upload", mesh.pod.pod.name()));
    std::fs::write(&upload, vec![b'x'; 4 << 20]).unwrap();
    let out = curl(
        &mesh.pod.pod,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload}",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", upload.display()),
            "http://198.18.0.2:8081/upload",
        ],
    );
    let _ = std::fs::remove_file(&upload);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, after) = body_bytes
        .recv_timeout(Duration::from_secs(10))
        .expect("the server's report");
    assert!(
        head.to_ascii_lowercase().contains("expect: 100-continue"),
        "{head:?}"
    );
    assert_eq!(
        after, 0,
        "body bytes reached a server that refused them; curl: {text}"
    );
    assert_eq!(text, "413 0", "curl's status and bytes uploaded");
}

#[test]
fn connect_is_tunneled_and_upstream_connections_are_reused_across_clients() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(&[], &[]);
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
    let mut stream = connect(&mesh.pod.pod, addr(REMOTE_V4, 8080)).unwrap();
    stream
        .write_all(b"CONNECT 198.18.0.2:8080 HTTP/1.1\r\nHost: 198.18.0.2:8080\r\n\r\n")
        .unwrap();
    let head = read_until_closed_or(&mut stream, "\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    stream.write_all(b"through the tunnel").unwrap();
    assert_eq!(
        read_until_closed_or(&mut stream, "through the tunnel"),
        "through the tunnel"
    );
    drop(stream);

    // Two curl processes, two client connections: the second reuses the first's upstream
    // connection from the pool (the server numbers its connections).
    let upstream_connection_with = |header: &str| {
        let out = curl(
            &mesh.pod.pod,
            &[
                "-H",
                header,
                "-D",
                "-",
                "-o",
                "/dev/null",
                "http://198.18.0.2:8080/pooled",
            ],
        );
        let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
        head.lines()
            .find_map(|line| {
                line.strip_prefix("x-connection:")
                    .map(|n| n.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no x-connection in {head:?}"))
    };
    let upstream_connection = || upstream_connection_with("X-Client: curl");
    let first = upstream_connection();
    // The pool takes a connection back when the client connection's task has ended.
    assert!(wait_until(Duration::from_secs(1), || upstream_connection() == first));
    // A client's `Connection: close` (and what it names) concerns its own hop only: the
    // upstream connection stays open and serves the next client.
    // Twice: forwarding the header would close `first` after the first closing client.
    let closing = || upstream_connection_with("Connection: close, X-Hop");
    for _ in 0..2 {
        assert!(wait_until(Duration::from_secs(1), || closing() == first));
    }
}

#[test]
fn sigterm_lets_a_slow_request_finish_then_exits_0() {
    if !can_run() {
        return;
    }
    let mut mesh = Mesh::new(&[], &["--drain-timeout", "5s"]);
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
    // Over HTTP/1.1 and over relayed HTTP/2, whose client gets a GOAWAY and then closes.
    let slow = ["--http1.1", "--http2-prior-knowledge"].map(|version| {
        mesh.pod
            .pod
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                version,
                "http://198.18.0.2:8080/slow",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    let open = "remora_proxy_tcp_open_connections{direction=\"outbound\"}";
    assert!(wait_until(Duration::from_secs(2), || mesh.metric(open) == 2.0));
    let start = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mesh.proxy.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Not ready at once; the request still completes.
    assert!(wait_until(Duration::from_millis(500), || mesh.ready() == Some(503)));
    for (curl, answer) in slow
        .into_iter()
        .zip(["hello /slow HTTP/1.1", "hello /slow HTTP/2.0"])
    {
        let out = curl.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            answer,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = (0..100)
        .find_map(|_| {
            let status = mesh.proxy.child.try_wait().unwrap();
            if status.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            status
        })
        .expect("the proxy did not exit after the drain");
    assert!(status.success(), "{status:?}\n{}", mesh.log());
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn garbage_and_resets_never_crash_the_proxy() {
    if !can_run() {
        return;
    }
    let mut mesh = Mesh::new(&[], &[]);
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
    http_server(&mesh.pod.pod, addr(POD_V4, 8080));
    // A remote that resets every connection as soon as it has read something.
    let resetter = mesh
        .pod
        .remote
        .run_in(|| std::net::TcpListener::bind((REMOTE_V4, 8666)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for stream in resetter.incoming().take(20) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf);
            let _ = nix::sys::socket::setsockopt(
                &stream,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
        }
    });
    let garbage: [&[u8]; 6] = [
        b"\x00\xff\x13\x37garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \x00\xff\r\nContent-Length: -5\r\n\r\n",
        b"GET /\xff\xfe HTTP/9.9\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"GET ",
    ];
    for (ns, target) in [
        (&mesh.pod.pod, addr(REMOTE_V4, 8080)),
        (&mesh.pod.remote, addr(POD_V4, 8080)),
    ] {
        for bytes in garbage {
            if let Ok(mut stream) = connect(ns, target) {
                let _ = stream.write_all(bytes);
                let _ = stream.shutdown(Shutdown::Write);
                let _ = read_until_closed_or(&mut stream, "\u{0}never");
            }
            // Abrupt resets from the client side, mid-request.
            if let Ok(stream) = connect(ns, target) {
                let mut stream = stream;
                let _ = stream.write_all(&bytes[..bytes.len() / 2]);
                let _ = nix::sys::socket::setsockopt(
                    &stream,
                    nix::sys::socket::sockopt::Linger,
                    &nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                );
            }
        }
    }
    // Upstream resets: HTTP gets a 502, opaque bytes get a reset.
    let (code, _) = get(&mesh.pod.pod, &["http://198.18.0.2:8666/reset"]);
    assert_eq!(code, 502);
    if let Ok(mut stream) = connect(&mesh.pod.pod, addr(REMOTE_V4, 8666)) {
        let _ = stream.write_all(b"\x01\x02opaque");
        let _ = read_until_closed_or(&mut stream, "never");
    }
    // Still alive, still ready, still proxying.
    assert!(
        mesh.proxy.child.try_wait().unwrap().is_none(),
        "{}",
        mesh.log()
    );
    assert_eq!(mesh.ready(), Some(200), "{}", mesh.log());
    let (code, body) = get(&mesh.pod.pod, &["http://198.18.0.2:8080/after"]);
    assert_eq!((code, body.as_str()), (200, "hello /after HTTP/1.1"));
    let (code, _) = get(&mesh.pod.remote, &["http://198.18.0.1:8080/after"]);
    assert_eq!(code, 200);
}

#[test]
fn an_ipv4_only_pod_runs_without_the_ipv6_listeners() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::ipv4_only();
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
    let (code, body) = get(&mesh.pod.pod, &["http://198.18.0.2:8080/v4"]);
    assert_eq!((code, body.as_str()), (200, "hello /v4 HTTP/1.1"));
    assert_eq!(mesh.metric(OUT_H1), 1.0);
    let log = mesh.log();
    assert!(log.contains("no IPv6 listener"), "{log}");
    // Logged once, not once per worker thread. ([::] still binds with IPv6 disabled; only
    // [::1] is gone.)
    assert_eq!(log.matches("addr=[::1]:15001").count(), 1, "{log}");
}

/// The file descriptors registered in each of the process's epoll instances, one set per
/// instance (a runtime's epoll descriptor may be open twice, under two numbers).
fn epoll_registrations(pid: i32) -> Vec<BTreeSet<u32>> {
    let mut sets = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:[eventpoll]" {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let set: BTreeSet<u32> = std::fs::read_to_string(info)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.strip_prefix("tfd:"))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        if !sets.contains(&set) {
            sets.push(set);
        }
    }
    sets
}

#[test]
fn connections_spread_evenly_over_the_workers() {
    if !can_run() {
        return;
    }
    let mesh = Mesh::new(
        &[],
        &[
            "--workers",
            "2",
            "--log-level",
            "info,remora_proxy::runtime::listen=debug",
        ],
    );
    http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
    // Long-lived keep-alive connections: the kernel hashes them over the two workers'
    // listeners, and the proxy evens out what the hash leaves uneven. A hash that happens to
    // alternate needs no hand-over, so connections are added until one has been made (each
    // new connection has roughly even odds of making one once the hash leans, so 200 is
    // never reached in practice).
    const HANDED: &str = "handing the connection to a less busy worker";
    let mut clients = Vec::new();
    while clients.len() < 40 || !mesh.log().contains(HANDED) {
        assert!(
            clients.len() < 200,
            "no connection was handed over:\n{}",
            mesh.log()
        );
        let i = clients.len();
        let mut client = connect(&mesh.pod.pod, addr(REMOTE_V4, 8080)).unwrap();
        write!(client, "GET /c{i} HTTP/1.1\r\nHost: remote\r\n\r\n").unwrap();
        let answer = read_until_closed_or(&mut client, &format!("hello /c{i} HTTP/1.1"));
        assert!(
            answer.contains(&format!("hello /c{i} HTTP/1.1")),
            "{answer}"
        );
        clients.push(client);
    }
    // Each worker's epoll holds its listeners and waker, and a client and an upstream
    // socket per connection it serves; the admin runtime's holds a few.
    let mut sizes: Vec<usize> = epoll_registrations(mesh.proxy.pid())
        .iter()
        .map(BTreeSet::len)
        .collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let (a, b) = (sizes[0], sizes[1]);
    assert!(a + b >= 2 * clients.len(), "{sizes:?}");
    // At most one connection apart, each two descriptors.
    assert!(a - b <= 2, "uneven workers: {sizes:?}\n{}", mesh.log());
    // A handed-over connection carries further requests.
    for (i, client) in clients.iter_mut().enumerate() {
        write!(client, "GET /again{i} HTTP/1.1\r\nHost: remote\r\n\r\n").unwrap();
        let answer = read_until_closed_or(client, &format!("hello /again{i} HTTP/1.1"));
        assert!(answer.contains(&format!("hello /again{i}")), "{answer}");
    }
    assert_eq!(mesh.metric(OUT_H1), 2.0 * clients.len() as f64);
}

/// The scheduling policy of each of the proxy's threads, by thread name: field 41 of its
/// /proc stat (0 is SCHED_OTHER, 3 is SCHED_BATCH).
fn thread_policies(pid: i32) -> Vec<(String, u32)> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        let policy = stat[close + 2..].split(' ').nth(41 - 3).unwrap();
        policies.push((stat[open + 1..close].to_string(), policy.parse().unwrap()));
    }
    policies.sort();
    policies
}

#[test]
fn sched_policy_batch_covers_every_thread_and_the_default_none() {
    if !can_run() {
        return;
    }
    let batch = Mesh::new(&[], &["--sched-policy", "batch", "--workers", "2"]);
    http_server(&batch.pod.remote, addr(REMOTE_V4, 8080));
    let (code, body) = get(&batch.pod.pod, &["http://198.18.0.2:8080/batch"]);
    assert_eq!((code, body.as_str()), (200, "hello /batch HTTP/1.1"));
    let policies = thread_policies(batch.proxy.pid());
    let workers = policies
        .iter()
        .filter(|(name, _)| name.starts_with("remora-worker"));
    assert_eq!(workers.count(), 2, "{policies:?}");
    assert!(
        policies.iter().all(|(_, policy)| *policy == 3),
        "{policies:?}"
    );
    assert!(
        batch.log().contains("sched_policy=Batch"),
        "{}",
        batch.log()
    );
    drop(batch);

    // By default the proxy keeps the policy it was started with: this test's own, normally
    // SCHED_OTHER.
    let inherited = thread_policies(std::process::id() as i32)[0].1;
    let normal = Mesh::new(&[], &[]);
    let policies = thread_policies(normal.proxy.pid());
    assert!(
        policies.iter().all(|(_, policy)| *policy == inherited),
        "{policies:?}"
    );
}

#[test]
fn a_control_plane_that_cannot_be_used_leaves_the_proxy_forwarding() {
    if !can_run() {
        return;
    }
    // What an injector without --trust-anchors gives every proxy: --control and no anchors.
    // Also a control plane that is not there at all (nothing listens on 198.18.0.2:8090).
    for args in [
        &["--control", "remora-control.remora-system.svc:8090"][..],
        &["--control", "198.18.0.2:8090", "--control-plaintext"][..],
    ] {
        let mesh = Mesh::new(&[], args);
        http_server(&mesh.pod.remote, addr(REMOTE_V4, 8080));
        let started = Instant::now();
        let (code, body) = get(&mesh.pod.pod, &["http://198.18.0.2:8080/plain"]);
        assert_eq!(
            (code, body.as_str()),
            (200, "hello /plain HTTP/1.1"),
            "{args:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{args:?}: {:?}",
            started.elapsed()
        );
        assert_eq!(mesh.metric("remora_proxy_control_connected"), 0.0);
        if args.len() == 2 {
            assert!(
                mesh.log().contains("not using the control plane"),
                "{}",
                mesh.log()
            );
        }
    }
}
