//! The Service resilience annotations end to end (SPEC "Resilience: Service annotations"),
//! measured: retries and their budget, failure accrual, the retry storm, the request timeout and
//! the queue, each under a paced load against endpoints that fail as a test tells them to.
//!
//! The pod: remora-init's rules, remora-proxy (one worker, so that the per-worker balancer and
//! retry budget are the whole proxy's) and remora-control on the pod's loopback reading the
//! Services from `--objects`. The remote host: three endpoints on 198.18.0.2, .3 and .4, each a
//! small HTTP server of this file whose behaviour a test switches while it runs ([`Mode`]), and
//! which writes down every try it gets in one [`Ledger`]: the request id, when it came, whether
//! its body was intact. The client sends requests at a fixed rate from inside the pod, each on a
//! connection of its own, every one with a deadline. Each scenario prints one `RESULT` line
//! (success rate, load multiplier, ejections) for the table.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_e2e::*;

/// The third endpoint's address, added to the remote host beside REMOTE_V4 and REMOTE2_V4.
const REMOTE3_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const ENDPOINTS: [Ipv4Addr; 3] = [REMOTE_V4, REMOTE2_V4, REMOTE3_V4];
/// The port every endpoint serves; the Services listen on 80.
const TARGET_PORT: u16 = 8080;

const NAMESPACE: &str = "shop";
const CONTROL_LISTEN: &str = "127.0.0.1:8090";
const CONTROL_READY: &str = "http://127.0.0.1:9990/ready";
const PROXY_METRICS: &str = "http://127.0.0.1:15020/metrics";
const PROXY_READY: &str = "http://127.0.0.1:15020/ready";

/// Every request's own deadline at the client, and the bound on a whole load.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
const LOAD_LIMIT: Duration = Duration::from_secs(30);

/// One Service `shop/<name>` on port 80 at `cluster_ip`, its annotations, and its ready
/// endpoints (on [`TARGET_PORT`]).
struct Svc {
    name: &'static str,
    cluster_ip: Ipv4Addr,
    annotations: Vec<(&'static str, &'static str)>,
    endpoints: Vec<Ipv4Addr>,
}

impl Svc {
    fn new(
        name: &'static str,
        last_octet: u8,
        annotations: &[(&'static str, &'static str)],
    ) -> Self {
        Self {
            name,
            cluster_ip: Ipv4Addr::new(198, 18, 0, last_octet),
            annotations: annotations.to_vec(),
            endpoints: ENDPOINTS.to_vec(),
        }
    }

    fn without_endpoints(mut self) -> Self {
        self.endpoints.clear();
        self
    }

    fn target(&self) -> SocketAddr {
        addr(self.cluster_ip, 80)
    }
}

/// The Services and their EndpointSlices as the API server would store them, YAML for
/// `remora-control --objects`.
fn objects(services: &[Svc]) -> String {
    let mut yaml = String::new();
    for svc in services {
        let name = svc.name;
        let ip = svc.cluster_ip;
        let annotations: String = svc
            .annotations
            .iter()
            .map(|(key, value)| format!("\n    {key}: {}", serde_json::json!(value)))
            .collect();
        let annotations = if annotations.is_empty() {
            " {}".to_string()
        } else {
            annotations
        };
        let endpoints: String = svc
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                format!(
                    "\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                     targetRef: {{kind: Pod, namespace: {NAMESPACE}, name: {name}-{i}}}"
                )
            })
            .collect();
        let endpoints = if endpoints.is_empty() {
            " []".to_string()
        } else {
            endpoints
        };
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
  annotations:{annotations}
spec:
  type: ClusterIP
  clusterIP: {ip}
  clusterIPs: [\"{ip}\"]
  selector: {{app: {name}}}
  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: {TARGET_PORT}
    appProtocol: http
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-x7k2p
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: {TARGET_PORT}
endpoints:{endpoints}
"
        ));
    }
    yaml
}

/// One test at a time: the figures are rates and latencies, which tests running beside each
/// other (each with its proxy, endpoints and load on two shared cores) would disturb.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A meshed pod whose proxy asks remora-control about the Services, and the endpoints.
struct Mesh {
    // Field order: the servers and processes go before the namespaces; the turn last.
    endpoints: Endpoints,
    _control: Proc,
    proxy: Proc,
    dir: PathBuf,
    pod: Pod,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Mesh {
    /// `None` (after a loud message) when the tests cannot run here or a binary is missing.
    fn start(services: &[Svc]) -> Option<Self> {
        if !can_run() {
            return None;
        }
        let control_bin = built("remora-control")?;
        let proxy_bin = built("remora-proxy")?;
        let init_bin = built("remora-init")?;
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let pod = Pod::new().expect("building the pod");
        pod.remote
            .exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("{REMOTE3_V4}/24"),
                "dev",
                "eth0",
            ])
            .unwrap();
        let out = pod
            .pod
            .command(init_bin)
            .output()
            .expect("spawning remora-init");
        assert!(
            out.status.success(),
            "remora-init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let endpoints = Endpoints::start(&pod.remote);
        let dir = std::env::temp_dir().join(format!("{}-resilience", pod.pod.name()));
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        std::fs::write(dir.join("objects").join("services.yaml"), objects(services)).unwrap();
        let control_log = std::fs::File::create(dir.join("control.log")).unwrap();
        let control = Proc::spawn(
            pod.pod
                .command(control_bin)
                .arg("serve")
                .args(["--plaintext", "--log-format", "plain"])
                .arg("--objects")
                .arg(dir.join("objects"))
                .args(["--listen", CONTROL_LISTEN])
                .args(["--admin-listen", "127.0.0.1:9990"])
                .stdout(Stdio::null())
                .stderr(control_log),
        )
        .expect("spawning remora-control");
        let proxy_log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let proxy = Proc::spawn(
            pod.pod
                .command_as(PROXY_UID, PROXY_UID, proxy_bin)
                .env("POD_NAMESPACE", "storefront")
                .env("POD_NAME", "storefront-7d9c-x2x4q")
                .args(["--log-format", "plain", "--workers", "1"])
                .args(["--control", CONTROL_LISTEN, "--control-plaintext"])
                .stdout(Stdio::null())
                .stderr(proxy_log),
        )
        .expect("spawning remora-proxy");
        let mesh = Self {
            endpoints,
            _control: control,
            proxy,
            dir,
            pod,
            _turn: turn,
        };
        for (what, url) in [
            ("remora-control", CONTROL_READY),
            ("the proxy", PROXY_READY),
        ] {
            assert!(
                wait_until(Duration::from_secs(10), || status(&mesh.pod.pod, url)
                    == Some(200)),
                "{what} never became ready\n{}",
                mesh.logs()
            );
        }
        // Each Service with endpoints answers once (a warm-up the endpoints do not record) before
        // a test measures anything: the proxy has its snapshot by then.
        for svc in services.iter().filter(|svc| !svc.endpoints.is_empty()) {
            let target = svc.target();
            let warm = wait_until(Duration::from_secs(10), || {
                let got = mesh.fire(target, vec![Req::warm_up()], 100.0);
                got[0].status == Some(200)
            });
            assert!(warm, "{} never answered\n{}", svc.name, mesh.logs());
        }
        Some(mesh)
    }

    /// Sends `requests` at `rate` per second from inside the pod; see [`fire`].
    fn fire(&self, target: SocketAddr, requests: Vec<Req>, rate: f64) -> Vec<Got> {
        fire(&self.pod.pod, target, requests, rate)
    }

    fn metrics(&self) -> String {
        String::from_utf8_lossy(&curl(&self.pod.pod, &[PROXY_METRICS]).stdout).into_owned()
    }

    /// The sum of `name`'s series for Service `service` (all other labels summed over).
    fn metric(&self, name: &str, service: &str) -> f64 {
        let label = format!("service=\"{service}\"");
        self.metrics()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (series_name, labels) = series.split_once('{').unwrap_or((series, ""));
                (series_name == name && labels.contains(&label))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }

    /// The proxy's resident memory, in KiB.
    fn proxy_rss_kib(&self) -> u64 {
        let pid = self.proxy.pid();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "remora-proxy", "pid {pid} is not the proxy");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in the proxy's status")
    }

    fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(80)..].join("\n")
        };
        format!(
            "--- remora-proxy log (tail) ---\n{}\n--- remora-control log (tail) ---\n{}",
            tail(read("proxy.log")),
            tail(read("control.log"))
        )
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The endpoints.

/// What an endpoint does with each try it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 200.
    Healthy,
    /// 503 for exactly `percent` % of the first tries of requests, of the second tries, and so
    /// on (counted over all endpoints), spread evenly over their arrivals ([`fails`]): a share
    /// of failures that is the same every run, so that what retries make of it is exact too.
    FailShare(u64),
    /// This status, always.
    Always(u16),
    /// This status after this long.
    Slow(Duration, u16),
}

/// One try an endpoint got.
#[derive(Debug, Clone)]
struct Try {
    id: String,
    endpoint: usize,
    at: Instant,
    /// The body's length and digest were those the client sent in `x-body-length` and
    /// `x-body-digest` (true when it sent none).
    body_intact: bool,
}

/// Every try every endpoint got, in order of arrival.
#[derive(Debug, Default)]
struct Ledger {
    tries: Vec<Try>,
    /// Tries so far per request id.
    per_id: HashMap<String, u64>,
    /// Tries so far by their number among their request's tries (1 for the first).
    per_number: HashMap<u64, u64>,
}

impl Ledger {
    fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Try> + 'a {
        self.tries.iter().filter(move |t| t.id.starts_with(prefix))
    }

    fn tries_of(&self, id: &str) -> u64 {
        self.per_id.get(id).copied().unwrap_or(0)
    }
}

/// A 64-bit mix (splitmix64's finaliser): the bytes of a POST body.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a: the body digest.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether arrival number `arrival` (0 for the first) of a kind fails under a share of
/// `percent`: of any `m` arrivals from the first, exactly ⌊m × percent / 100⌋ fail.
fn fails(arrival: u64, percent: u64) -> bool {
    (arrival + 1) * percent / 100 > arrival * percent / 100
}

/// The three endpoints, each an HTTP/1.1 and HTTP/2 server on its own thread inside the remote
/// namespace; their modes and the ledger are shared with the test.
struct Endpoints {
    modes: Vec<Arc<Mutex<Mode>>>,
    ledger: Arc<Mutex<Ledger>>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Endpoints {
    fn start(remote: &NetNs) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut endpoints = Self {
            modes: Vec::new(),
            ledger: Arc::clone(&ledger),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for (index, ip) in ENDPOINTS.iter().enumerate() {
            let at = addr(*ip, TARGET_PORT);
            let listener = remote
                .run_in(move || std::net::TcpListener::bind(at))
                .unwrap()
                .unwrap_or_else(|e| panic!("binding {at}: {e}"));
            listener.set_nonblocking(true).unwrap();
            let mode = Arc::new(Mutex::new(Mode::Healthy));
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let server = Server {
                index,
                mode: Arc::clone(&mode),
                ledger: Arc::clone(&ledger),
            };
            endpoints.threads.push(std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        () = server.serve(listener) => {}
                        _ = stopped => {}
                    }
                });
            }));
            endpoints.modes.push(mode);
            endpoints.stops.push(stop);
        }
        endpoints
    }

    fn set(&self, endpoint: usize, mode: Mode) {
        *self.modes[endpoint].lock().unwrap() = mode;
    }

    fn set_all(&self, mode: Mode) {
        for endpoint in 0..self.modes.len() {
            self.set(endpoint, mode);
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Clone)]
struct Server {
    index: usize,
    mode: Arc<Mutex<Mode>>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Server {
    async fn serve(self, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, std::convert::Infallible>(server.answer(request).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn answer(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        let id = header("x-request-id").unwrap_or_default();
        let expected_length: Option<usize> = header("x-body-length").and_then(|v| v.parse().ok());
        let expected_digest: Option<u64> = header("x-body-digest").and_then(|v| v.parse().ok());
        let at = Instant::now();
        let body = request
            .into_body()
            .collect()
            .await
            .map(|body| body.to_bytes())
            .unwrap_or_default();
        let reply = |status: u16| {
            let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", self.index))));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
        };
        if id == "warm-up" {
            return reply(200);
        }
        let body_intact = expected_length.is_none_or(|length| length == body.len())
            && expected_digest.is_none_or(|digest| digest == fnv(&body));
        let mode = *self.mode.lock().unwrap();
        let arrival = {
            let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
            let n = {
                let count = ledger.per_id.entry(id.clone()).or_default();
                *count += 1;
                *count
            };
            let arrival = {
                let count = ledger.per_number.entry(n).or_default();
                *count += 1;
                *count - 1
            };
            ledger.tries.push(Try {
                id,
                endpoint: self.index,
                at,
                body_intact,
            });
            arrival
        };
        match mode {
            Mode::Healthy => reply(200),
            Mode::FailShare(percent) if fails(arrival, percent) => reply(503),
            Mode::FailShare(_) => reply(200),
            Mode::Always(status) => reply(status),
            Mode::Slow(delay, status) => {
                tokio::time::sleep(delay).await;
                reply(status)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

/// One request to send.
#[derive(Debug, Clone)]
struct Req {
    id: String,
    method: Method,
    body: Bytes,
}

impl Req {
    fn get(id: String) -> Self {
        Self {
            id,
            method: Method::GET,
            body: Bytes::new(),
        }
    }

    /// A POST with a 16 KiB body of its own (made from its id), under the proxy's replay limit.
    fn post(id: String) -> Self {
        Self::post_of(id, 16 * 1024)
    }

    /// A POST with a body of `length` bytes of its own (made from its id).
    fn post_of(id: String, length: u64) -> Self {
        let seed = fnv(id.as_bytes());
        let body: Vec<u8> = (0..length).map(|i| (mix(seed ^ i) & 0xff) as u8).collect();
        Self {
            id,
            method: Method::POST,
            body: Bytes::from(body),
        }
    }

    fn warm_up() -> Self {
        Self::get("warm-up".to_string())
    }
}

/// What one request got.
#[derive(Debug, Clone)]
struct Got {
    id: String,
    /// When it was sent (the time it was due, by the pace).
    sent: Instant,
    /// Its status; `None` when it failed (an error or its deadline).
    status: Option<u16>,
    elapsed: Duration,
    error: Option<String>,
}

/// Sends `requests` to `target` from inside `ns`, request `i` at `i / rate` seconds, each on a
/// connection of its own (so a slow one holds up none after it) with a deadline of
/// [`REQUEST_LIMIT`]; the whole load is bounded by [`LOAD_LIMIT`]. Returns what each got, in
/// the order sent.
fn fire(ns: &NetNs, target: SocketAddr, requests: Vec<Req>, rate: f64) -> Vec<Got> {
    ns.run_in(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let start = tokio::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for (i, request) in requests.into_iter().enumerate() {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due).await;
                tasks.spawn(async move {
                    let sent = Instant::now();
                    let id = request.id.clone();
                    let result = tokio::time::timeout(REQUEST_LIMIT, send(target, request)).await;
                    let elapsed = sent.elapsed();
                    let (status, error) = match result {
                        Ok(Ok(status)) => (Some(status), None),
                        Ok(Err(error)) => (None, Some(error)),
                        Err(_) => (None, Some("timed out".to_string())),
                    };
                    (
                        i,
                        Got {
                            id,
                            sent,
                            status,
                            elapsed,
                            error,
                        },
                    )
                });
            }
            let mut got = Vec::new();
            let all = async {
                while let Some(done) = tasks.join_next().await {
                    got.push(done.expect("a request task panicked"));
                }
            };
            tokio::time::timeout(LOAD_LIMIT, all)
                .await
                .expect("the load did not finish in time");
            got.sort_by_key(|(i, _)| *i);
            got.into_iter().map(|(_, got)| got).collect()
        })
    })
    .expect("the client's thread")
}

async fn send(target: SocketAddr, request: Req) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(request.method)
        .uri(format!("http://{target}/orders"))
        .header("host", "svc.shop")
        .header("x-request-id", &request.id);
    if !request.body.is_empty() {
        builder = builder
            .header("x-body-length", request.body.len())
            .header("x-body-digest", fnv(&request.body));
    }
    let response = sender
        .send_request(builder.body(Full::new(request.body)).unwrap())
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?;
    Ok(status)
}

fn count(got: &[Got], status: u16) -> usize {
    got.iter().filter(|g| g.status == Some(status)).count()
}

/// The requests that got no answer, and why.
fn errors(got: &[Got]) -> Vec<String> {
    got.iter()
        .filter_map(|g| Some(format!("{}: {}", g.id, g.error.as_deref()?)))
        .collect()
}

fn ids(prefix: &str, n: usize) -> impl Iterator<Item = String> + '_ {
    (0..n).map(move |i| format!("{prefix}-{i}"))
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

const RETRIES: &str = "remora_proxy_retries_total";
const BUDGET_EXHAUSTED: &str = "remora_proxy_retry_budget_exhausted_total";
const EJECTIONS: &str = "remora_proxy_endpoint_ejections_total";
const QUEUE_REJECTIONS: &str = "remora_proxy_queue_rejections_total";

/// Endpoints failing 30 % of tries with 503, `retry-on: 5xx`, 50 requests/s: the client sees
/// what 1 − 0.3³ promises, every retry within the default budget; POSTs are retried only when
/// the Service allows it, and then arrive with their bodies intact.
#[test]
fn thirty_percent_503s_are_retried_within_the_budget_and_posts_only_when_allowed() {
    let Some(mesh) = Mesh::start(&[
        Svc::new("flaky", 100, &[("remora.io/retry-on", "5xx")]),
        Svc::new(
            "flaky-post",
            101,
            &[
                ("remora.io/retry-on", "5xx"),
                ("remora.io/retry-non-idempotent", "true"),
            ],
        ),
    ]) else {
        return;
    };
    mesh.endpoints.set_all(Mode::FailShare(30));
    let flaky = addr(Ipv4Addr::new(198, 18, 0, 100), 80);
    let flaky_post = addr(Ipv4Addr::new(198, 18, 0, 101), 80);

    // GETs: 300 at 50/s.
    const GETS: usize = 300;
    let got = mesh.fire(flaky, ids("get", GETS).map(Req::get).collect(), 50.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    let ok = count(&got, 200);
    let success = ok as f64 / GETS as f64;
    // 90 first tries fail, 27 of their retries, 8 of those retries' retries: with every retry
    // made, 8 requests fail (2.7 %).
    let doomed = (GETS * 3 / 10) * 3 / 10 * 3 / 10;
    let (tries, bad_bodies) = {
        let ledger = mesh.endpoints.ledger();
        (
            ledger.with_prefix("get-").count(),
            ledger
                .with_prefix("get-")
                .filter(|t| !t.body_intact)
                .count(),
        )
    };
    let retries = mesh.metric(RETRIES, "flaky");
    let multiplier = tries as f64 / GETS as f64;
    eprintln!(
        "RESULT 30% 503, retry-on 5xx, 300 GETs at 50/s: success {:.1} % ({ok}/{GETS}; with \
         every retry made {} would be), load multiplier {multiplier:.2}, retries {retries}, \
         budget exhausted {}",
        100.0 * success,
        GETS - doomed,
        mesh.metric(BUDGET_EXHAUSTED, "flaky"),
    );
    assert_eq!(
        ok,
        GETS - doomed,
        "every retry the draws called for was made"
    );
    assert!(success >= 0.97, "success {success}");
    assert_eq!(bad_bodies, 0);
    // Each retry is one more try at an endpoint, and the metric counts each.
    assert_eq!(retries as usize, tries - GETS);
    // The default budget: 20 % of the requests plus 10/s over the 10 s window.
    let budget = 0.2 * (GETS + 1) as f64 + 10.0 * 10.0;
    assert!(
        retries <= budget,
        "retries {retries} over the budget {budget}"
    );

    // POSTs where the Service does not allow retrying them: one try each, the 503 goes back.
    const POSTS: usize = 100;
    let got = mesh.fire(flaky, ids("post", POSTS).map(Req::post).collect(), 50.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    let failed = count(&got, 503);
    {
        let ledger = mesh.endpoints.ledger();
        for id in ids("post", POSTS) {
            assert_eq!(ledger.tries_of(&id), 1, "{id} was tried more than once");
        }
        assert_eq!(
            ledger
                .with_prefix("post-")
                .filter(|t| !t.body_intact)
                .count(),
            0
        );
    }
    assert_eq!(failed, POSTS - count(&got, 200));
    assert!(
        failed >= 10,
        "30 % should fail unretried: {failed} of {POSTS}"
    );
    eprintln!(
        "RESULT 30% 503, POST without retry-non-idempotent: success {:.1} %, tries per request 1.00",
        100.0 * count(&got, 200) as f64 / POSTS as f64
    );

    // POSTs where it does: retried, and every try carries the whole 16 KiB body.
    let got = mesh.fire(
        flaky_post,
        ids("postr", POSTS).map(Req::post).collect(),
        50.0,
    );
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    let (tries, retried, bad_bodies) = {
        let ledger = mesh.endpoints.ledger();
        let retried = ids("postr", POSTS)
            .filter(|id| ledger.tries_of(id) > 1)
            .count();
        (
            ledger.with_prefix("postr-").count(),
            retried,
            ledger
                .with_prefix("postr-")
                .filter(|t| !t.body_intact)
                .count(),
        )
    };
    let success = count(&got, 200) as f64 / POSTS as f64;
    eprintln!(
        "RESULT 30% 503, POST with retry-non-idempotent: success {:.1} %, load multiplier {:.2}, \
         {retried} requests retried, bodies damaged {bad_bodies}",
        100.0 * success,
        tries as f64 / POSTS as f64
    );
    assert!(retried >= 10, "{retried} POSTs retried");
    assert_eq!(bad_bodies, 0, "a retried POST arrived with another body");
    assert!(success >= 0.95, "success {success}");

    // A body over 64 KiB is not kept for a retry: each such POST goes once, whole.
    const BIG: usize = 40;
    let got = mesh.fire(
        flaky_post,
        ids("big", BIG)
            .map(|id| Req::post_of(id, 100 * 1024))
            .collect(),
        50.0,
    );
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    {
        let ledger = mesh.endpoints.ledger();
        for id in ids("big", BIG) {
            assert_eq!(ledger.tries_of(&id), 1, "{id} (100 KiB) was tried again");
        }
        assert_eq!(
            ledger
                .with_prefix("big-")
                .filter(|t| !t.body_intact)
                .count(),
            0
        );
    }
    assert!(count(&got, 503) >= 5, "30 % should fail unretried: {got:?}");
    eprintln!(
        "RESULT 30% 503, 100 KiB POSTs with retry-non-idempotent: success {:.1} %, tries per \
         request 1.00 (over the 64 KiB replay limit)",
        100.0 * count(&got, 200) as f64 / BIG as f64
    );
}

/// One endpoint of three answering 502 always, `failure-accrual: consecutive=3`, no retries:
/// ejected after three, then only its probes fail; back once it recovers; with all three
/// failing, never more than one (50 % of three, rounded down) ejected.
#[test]
fn an_endpoint_answering_502_is_ejected_probed_and_back_and_no_more_than_the_share_is_out() {
    const N: usize = 3;
    let Some(mesh) = Mesh::start(&[Svc::new(
        "breaker",
        100,
        &[("remora.io/failure-accrual", "consecutive=3")],
    )]) else {
        return;
    };
    let target = addr(Ipv4Addr::new(198, 18, 0, 100), 80);
    let bad = 0;
    mesh.endpoints.set(bad, Mode::Always(502));

    // 2 s at 50/s.
    let got = mesh.fire(target, ids("eject", 100).map(Req::get).collect(), 50.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    let failed = count(&got, 502);
    let ejections = mesh.metric(EJECTIONS, "breaker") as usize;
    let to_bad = mesh
        .endpoints
        .ledger()
        .with_prefix("eject-")
        .filter(|t| t.endpoint == bad)
        .count();
    eprintln!(
        "RESULT 1 of 3 answering 502, consecutive=3, 100 requests at 50/s: success {:.1} %, \
         client errors {failed} (3 to eject, then one per failed probe), ejections {ejections}",
        100.0 * count(&got, 200) as f64 / got.len() as f64
    );
    assert!(ejections >= 1, "never ejected");
    // Three failures eject; after that only a probe goes to it, and its failure ejects again.
    assert_eq!(failed, to_bad, "only the bad endpoint fails");
    assert!(
        failed <= N + (ejections - 1),
        "{failed} errors: more than {N} plus one per probe ({})",
        ejections - 1
    );
    // Its backoffs (0.5 to 1 s, then 1 to 2 s) leave room for at most two probes in 2 s.
    assert!(ejections <= 3, "{ejections} ejections in 2 s");
    assert_eq!(count(&got, 200) + failed, got.len());

    // It recovers: its next probe (within its backoff, at most 4 s) brings it back.
    mesh.endpoints.set(bad, Mode::Healthy);
    let mut back_after = None;
    let started = Instant::now();
    for round in 0..8 {
        let prefix = format!("back{round}");
        let got = mesh.fire(target, ids(&prefix, 50).map(Req::get).collect(), 50.0);
        assert!(errors(&got).is_empty(), "{:?}", errors(&got));
        let to_bad = mesh
            .endpoints
            .ledger()
            .with_prefix(&format!("{prefix}-"))
            .filter(|t| t.endpoint == bad)
            .count();
        if to_bad >= 10 {
            assert_eq!(
                count(&got, 200),
                got.len(),
                "a recovered endpoint's round fails"
            );
            back_after = Some(started.elapsed());
            break;
        }
    }
    let back_after = back_after.expect("the recovered endpoint never took requests again");
    eprintln!("RESULT 1 of 3 recovered: back in rotation within {back_after:.1?}");

    // All three failing: at most one is ejected at a time, so the other two keep taking the
    // requests (and failing them: without retries the client sees every 502).
    mesh.endpoints.set_all(Mode::Always(502));
    let before = mesh.metric(EJECTIONS, "breaker");
    let got = mesh.fire(target, ids("all", 100).map(Req::get).collect(), 50.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    assert_eq!(count(&got, 502), got.len());
    let last_second = got[50].sent;
    let per_endpoint: Vec<usize> = {
        let ledger = mesh.endpoints.ledger();
        (0..3)
            .map(|e| {
                ledger
                    .with_prefix("all-")
                    .filter(|t| t.endpoint == e && t.at >= last_second)
                    .count()
            })
            .collect()
    };
    let ejections = mesh.metric(EJECTIONS, "breaker") - before;
    eprintln!(
        "RESULT 3 of 3 answering 502: requests per endpoint in the last second {per_endpoint:?}, \
         ejections {ejections}"
    );
    assert!(ejections >= 1.0, "nothing ejected");
    // An ejected endpoint gets its probe at most; one in rotation a share of 50 requests.
    let serving = per_endpoint.iter().filter(|&&n| n >= 5).count();
    assert!(
        serving >= 2,
        "more than one endpoint ejected at once: {per_endpoint:?}"
    );
    assert_eq!(
        per_endpoint.iter().sum::<usize>(),
        50,
        "one try per request"
    );
}

/// Every endpoint failing with 503, `retry-on: 5xx` and a budget of 20 % without a floor: the
/// retries add at most a fifth to the load the endpoints see, the budget's refusals are counted,
/// nothing queues and the proxy's memory stays flat. Under the default budget (`20%,10/s`) the
/// floor adds its 100 retries per window on top, at most.
#[test]
fn a_retry_storm_is_capped_by_the_budget_and_memory_stays_flat() {
    let Some(mesh) = Mesh::start(&[
        Svc::new(
            "storm",
            100,
            &[
                ("remora.io/retry-on", "5xx"),
                ("remora.io/retry-budget", "20%,0/s"),
            ],
        ),
        Svc::new("storm-default", 101, &[("remora.io/retry-on", "5xx")]),
    ]) else {
        return;
    };
    let target = addr(Ipv4Addr::new(198, 18, 0, 100), 80);
    mesh.endpoints.set_all(Mode::Always(503));
    // A warm-up second (the proxy's buffers and connections made), then four measured ones.
    let warm = mesh.fire(target, ids("stormw", 100).map(Req::get).collect(), 100.0);
    assert!(errors(&warm).is_empty(), "{:?}", errors(&warm));
    let rss_before = mesh.proxy_rss_kib();
    let got = mesh.fire(target, ids("storm", 400).map(Req::get).collect(), 100.0);
    let rss_after = mesh.proxy_rss_kib();
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    assert_eq!(count(&got, 503), got.len(), "every request fails, with 503");

    let requests = (warm.len() + got.len()) as f64;
    let tries = mesh.endpoints.ledger().with_prefix("storm").count() as f64;
    let multiplier = tries / requests;
    let exhausted = mesh.metric(BUDGET_EXHAUSTED, "storm");
    let retries = mesh.metric(RETRIES, "storm");
    let slowest = got.iter().map(|g| g.elapsed).max().unwrap_or_default();
    eprintln!(
        "RESULT storm, all 503, retry-on 5xx, budget 20%,0/s, 500 requests at 100/s: success 0 %, \
         load multiplier {multiplier:.3}, retries {retries}, budget exhausted {exhausted}, \
         slowest answer {slowest:.0?}, proxy RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(multiplier <= 1.2, "load multiplier {multiplier}");
    assert!(
        multiplier >= 1.1,
        "the budget's retries were not made: {multiplier}"
    );
    assert_eq!(retries, tries - requests);
    assert!(exhausted > 0.0, "no retry refused by the budget");
    assert!(
        exhausted + retries >= requests,
        "a failed request neither retried nor refused"
    );
    assert_eq!(mesh.metric(QUEUE_REJECTIONS, "storm"), 0.0);
    // Retries wait at most 25 + 50 ms of backoff: no answer is held long.
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    assert!(
        rss_after <= rss_before + 4 * 1024,
        "the proxy grew from {rss_before} to {rss_after} KiB"
    );

    // The default budget, 400 requests over 4 s: 20 % of them plus the floor's 10/s × 10 s.
    const REQUESTS: usize = 400;
    let target = addr(Ipv4Addr::new(198, 18, 0, 101), 80);
    let got = mesh.fire(target, ids("dflt", REQUESTS).map(Req::get).collect(), 100.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    assert_eq!(count(&got, 503), got.len());
    let tries = mesh.endpoints.ledger().with_prefix("dflt-").count();
    let multiplier = tries as f64 / REQUESTS as f64;
    let bound = (REQUESTS as f64 * 1.2 + 100.0) / REQUESTS as f64;
    eprintln!(
        "RESULT storm, all 503, retry-on 5xx, default budget 20%,10/s, 400 requests at 100/s: \
         success 0 %, load multiplier {multiplier:.3} (the budget's bound {bound:.3}), budget \
         exhausted {}",
        mesh.metric(BUDGET_EXHAUSTED, "storm-default")
    );
    assert!(
        multiplier <= bound,
        "load multiplier {multiplier} over {bound}"
    );
    assert!(
        multiplier > 1.2,
        "the floor's retries were not made: {multiplier}"
    );
}

/// A slow endpoint under `remora.io/timeout: 500ms`: 504 at the deadline, and with `retry-on`
/// every retry happens inside the deadline, none after it.
#[test]
fn a_slow_endpoint_gets_504_at_the_deadline_with_the_retries_inside_it() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let Some(mesh) = Mesh::start(&[
        Svc::new("slow", 100, &[("remora.io/timeout", "500ms")]),
        Svc::new(
            "slow-retried",
            101,
            &[
                ("remora.io/timeout", "500ms"),
                ("remora.io/retry-on", "5xx"),
            ],
        ),
    ]) else {
        return;
    };
    // Too slow for the deadline: one try each, cut at 500 ms.
    mesh.endpoints
        .set_all(Mode::Slow(Duration::from_secs(2), 200));
    let slow = addr(Ipv4Addr::new(198, 18, 0, 100), 80);
    let got = mesh.fire(slow, ids("slow", 10).map(Req::get).collect(), 10.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    assert_eq!(count(&got, 504), got.len(), "{got:?}");
    let elapsed: Vec<Duration> = got.iter().map(|g| g.elapsed).collect();
    let (fastest, slowest) = (
        elapsed.iter().min().copied().unwrap_or_default(),
        elapsed.iter().max().copied().unwrap_or_default(),
    );
    eprintln!(
        "RESULT slow endpoint (2 s), timeout 500ms: 504 after {fastest:.0?} to {slowest:.0?}"
    );
    assert!(fastest >= TIMEOUT, "{fastest:?}");
    assert!(
        slowest <= TIMEOUT + Duration::from_millis(250),
        "{slowest:?}"
    );

    // Each try answers 503 after 200 ms: the first ends at 200 ms, the second by about 425 ms
    // (25 ms of backoff at most), the third starts by about 475 ms and is cut at 500 ms.
    mesh.endpoints
        .set_all(Mode::Slow(Duration::from_millis(200), 503));
    let retried = addr(Ipv4Addr::new(198, 18, 0, 101), 80);
    let got = mesh.fire(retried, ids("deadline", 10).map(Req::get).collect(), 10.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    assert_eq!(count(&got, 504), got.len(), "{got:?}");
    // Well after the last answer: no try may arrive any more.
    std::thread::sleep(Duration::from_millis(700));
    let ledger = mesh.endpoints.ledger();
    let mut tries_per_request = Vec::new();
    for g in &got {
        let tries: Vec<&Try> = ledger.tries.iter().filter(|t| t.id == g.id).collect();
        tries_per_request.push(tries.len());
        for t in &tries {
            let after = t.at.saturating_duration_since(g.sent);
            assert!(
                after < TIMEOUT + Duration::from_millis(50),
                "{}: a try {after:?} after it was sent, past its deadline",
                g.id
            );
        }
        assert!(
            g.elapsed >= TIMEOUT && g.elapsed <= TIMEOUT + Duration::from_millis(250),
            "{}: 504 after {:?}",
            g.id,
            g.elapsed
        );
    }
    let total: usize = tries_per_request.iter().sum();
    drop(ledger);
    let retries = mesh.metric(RETRIES, "slow-retried") as usize;
    eprintln!(
        "RESULT slow endpoint (503 after 200 ms), timeout 500ms, retry-on 5xx: 504 for all, \
         tries per request {tries_per_request:?}, retries counted {retries}"
    );
    assert!(
        tries_per_request.iter().all(|&n| (2..=3).contains(&n)),
        "{tries_per_request:?}"
    );
    assert_eq!(
        retries,
        total - got.len(),
        "every retry counted, each one a try"
    );
}

/// `remora.io/queue: 2,1s` with no ready endpoint: two requests wait their second and get 503,
/// the rest get 503 at once; each counted. With room and time, a queued request is sent once an
/// endpoint turns ready.
#[test]
fn beyond_the_queue_requests_get_503_at_once() {
    let Some(mesh) = Mesh::start(&[
        Svc::new("empty", 100, &[("remora.io/queue", "2,1s")]).without_endpoints(),
        Svc::new("late", 101, &[("remora.io/queue", "5,3s")]).without_endpoints(),
    ]) else {
        return;
    };
    let empty = addr(Ipv4Addr::new(198, 18, 0, 100), 80);
    // Ten at once (a millisecond apart).
    let got = mesh.fire(empty, ids("queue", 10).map(Req::get).collect(), 1000.0);
    assert!(errors(&got).is_empty(), "{:?}", errors(&got));
    assert_eq!(count(&got, 503), got.len(), "{got:?}");
    let (waited, at_once): (Vec<&Got>, Vec<&Got>) = got
        .iter()
        .partition(|g| g.elapsed >= Duration::from_millis(900));
    let rejections = mesh.metric(QUEUE_REJECTIONS, "empty");
    let slowest_at_once = at_once.iter().map(|g| g.elapsed).max().unwrap_or_default();
    eprintln!(
        "RESULT queue 2,1s, no ready endpoint, 10 requests at once: {} waited ({:?}), {} got 503 \
         within {slowest_at_once:.0?}, queue rejections {rejections}",
        waited.len(),
        waited.iter().map(|g| g.elapsed).collect::<Vec<_>>(),
        at_once.len(),
    );
    assert_eq!(waited.len(), 2, "{got:?}");
    assert!(
        waited
            .iter()
            .all(|g| g.elapsed <= Duration::from_millis(1500)),
        "{waited:?}"
    );
    assert!(
        slowest_at_once < Duration::from_millis(250),
        "beyond the queue, not at once: {slowest_at_once:?}"
    );
    assert_eq!(rejections, 10.0);

    // Three requests queue for `late`; its endpoints turn ready half a second later.
    let late = Svc::new("late", 101, &[("remora.io/queue", "5,3s")]);
    let file = mesh.dir.join("objects").join("services.yaml");
    let staged = mesh.dir.join("services.yaml.staged");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let empty = Svc::new("empty", 100, &[("remora.io/queue", "2,1s")]).without_endpoints();
        std::fs::write(&staged, objects(&[empty, late])).unwrap();
        std::fs::rename(&staged, &file).unwrap();
    });
    let target = addr(Ipv4Addr::new(198, 18, 0, 101), 80);
    let got = mesh.fire(target, ids("late", 3).map(Req::get).collect(), 100.0);
    writer.join().unwrap();
    eprintln!(
        "RESULT queue 5,3s, endpoints ready after 0.5 s: statuses {:?} after {:?}",
        got.iter().map(|g| g.status).collect::<Vec<_>>(),
        got.iter().map(|g| g.elapsed).collect::<Vec<_>>()
    );
    assert_eq!(count(&got, 200), got.len(), "{got:?}");
    assert!(
        got.iter().all(|g| g.elapsed >= Duration::from_millis(400)),
        "answered before any endpoint was ready: {got:?}"
    );
    assert_eq!(mesh.metric(QUEUE_REJECTIONS, "late"), 0.0);
}

#[test]
fn the_objects_these_tests_write_are_what_remora_control_reads() {
    use remora_control::index::Index;
    use remora_control::objects::read_file_text;
    let services = [
        Svc::new(
            "flaky",
            100,
            &[
                ("remora.io/retry-on", "5xx"),
                ("remora.io/retry-budget", "20%,0/s"),
                ("remora.io/queue", "2,1s"),
            ],
        ),
        Svc::new("plain", 101, &[]).without_endpoints(),
    ];
    let (set, problems) =
        read_file_text(std::path::Path::new("services.yaml"), &objects(&services));
    assert!(problems.is_empty(), "{problems:?}");
    let index = Index::build(&set);
    let flaky = index.lookup(services[0].target()).expect("flaky's target");
    assert_eq!(flaky.service.name, "flaky");
    let ready: Vec<SocketAddr> = flaky.endpoints.iter().map(|e| e.addr).collect();
    let expected: Vec<SocketAddr> = ENDPOINTS.iter().map(|ip| addr(*ip, TARGET_PORT)).collect();
    assert_eq!(ready, expected);
    let retry = flaky.policy.retry.as_ref().expect("a retry policy");
    assert!(retry.on_5xx);
    assert_eq!(
        (retry.budget_percent, retry.budget_floor_per_second),
        (20, 0)
    );
    assert_eq!(
        (flaky.policy.queue_size, flaky.policy.queue_timeout_ms),
        (2, 1_000)
    );
    let plain = index.lookup(services[1].target()).expect("plain's target");
    assert!(plain.endpoints.is_empty());
    assert_eq!(plain.policy.queue_size, 100, "the defaults");
}

#[test]
fn the_share_of_failures_is_exact_from_the_first_arrival() {
    for percent in [0, 30, 50, 100] {
        for m in [1, 7, 10, 90, 300] {
            let failed = (0..m).filter(|&arrival| fails(arrival, percent)).count() as u64;
            assert_eq!(failed, m * percent / 100, "{m} arrivals at {percent} %");
        }
    }
}
