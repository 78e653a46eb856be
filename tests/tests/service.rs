//! The Service path end to end: remora-control reads a Service and its EndpointSlice from
//! `--objects` files, remora-proxy (`--control`) balances the pod's requests to the Service's
//! ClusterIP over the endpoints, per request, and keeps working when the control plane does not.
//!
//! The pod: remora-init's rules, remora-proxy as uid 1337 and remora-control on the pod's
//! loopback (the proxy's own traffic is not redirected, so it reaches it directly). The remote
//! host: three endpoints on 198.18.0.2, .3 and .4, each answering with its own address. The
//! ClusterIP 198.18.0.100 belongs to no host: only the proxy's balancing can answer it (the
//! fail-open test gives it to a stand-in for kube-proxy). Each test skips, loudly, when
//! remora-control or remora-proxy has not been built.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_e2e::echo::{Backend, Echo};
use remora_e2e::*;

/// The Service's virtual address: no host has it, the pod's rules send it to the proxy.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The third endpoint's address, added to the remote host beside REMOTE_V4 and REMOTE2_V4.
const REMOTE3_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const ENDPOINTS: [Ipv4Addr; 3] = [REMOTE_V4, REMOTE2_V4, REMOTE3_V4];

const NAMESPACE: &str = "shop";
const SERVICE: &str = "echo";
/// The client pod, as the downward API names it to the proxy.
const POD_NAMESPACE: &str = "storefront";
const POD_NAME: &str = "storefront-7d9c-x2x4q";

/// remora-control inside the pod's namespace, on loopback.
const CONTROL_LISTEN: &str = "127.0.0.1:8090";
/// What the injector gives every proxy by default, and the name the search list makes of it.
const CONTROL_NAME: &str = "remora-control.remora-system.svc:8090";
const CONTROL_FQDN: &str = "remora-control.remora-system.svc.cluster.local";
const CONTROL_READY: &str = "http://127.0.0.1:9990/ready";
const PROXY_METRICS: &str = "http://127.0.0.1:15020/metrics";
const PROXY_READY: &str = "http://127.0.0.1:15020/ready";

const BALANCER_ENDPOINTS: &str =
    "remora_proxy_balancer_endpoints{namespace=\"shop\",service=\"echo\",port=\"80\"}";
const CONTROL_CONNECTED: &str = "remora_proxy_control_connected";

/// One Service port and the port it targets on the endpoints.
#[derive(Debug, Clone, Copy)]
struct Port {
    name: &'static str,
    port: u16,
    target: u16,
    app_protocol: Option<&'static str>,
}

/// HTTP with no appProtocol: the proxy detects HTTP/1 or HTTP/2 on the first bytes.
const HTTP: Port = Port {
    name: "http",
    port: 80,
    target: 8080,
    app_protocol: None,
};
const GRPC: Port = Port {
    name: "grpc",
    port: 80,
    target: 9090,
    app_protocol: Some("grpc"),
};
const TCP: Port = Port {
    name: "tcp",
    port: 7000,
    target: 7000,
    app_protocol: Some("tcp"),
};

/// The Service `shop/echo` with one port, and an EndpointSlice listing `endpoints` as ready, as
/// the API server would store them; YAML, as `remora-control --objects` reads it.
fn objects(port: Port, endpoints: &[Ipv4Addr]) -> String {
    let Port {
        name,
        port,
        target,
        app_protocol,
    } = port;
    let app_protocol = app_protocol
        .map(|protocol| format!("\n    appProtocol: {protocol}"))
        .unwrap_or_default();
    let endpoints: String = endpoints
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            format!(
                "\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
                 nodeName: node-{i}\n  targetRef: {{kind: Pod, namespace: {NAMESPACE}, name: {SERVICE}-{i}}}"
            )
        })
        .collect();
    let endpoints = if endpoints.is_empty() {
        " []".to_string()
    } else {
        endpoints
    };
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {SERVICE}
  namespace: {NAMESPACE}
spec:
  type: ClusterIP
  clusterIP: {CLUSTER_IP}
  clusterIPs: [\"{CLUSTER_IP}\"]
  selector: {{app: {SERVICE}}}
  ports:
  - name: {name}
    protocol: TCP
    port: {port}
    targetPort: {target}{app_protocol}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {SERVICE}-x7k2p
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {SERVICE}
addressType: IPv4
ports:
- name: {name}
  protocol: TCP
  port: {target}
endpoints:{endpoints}
"
    )
}

/// One pod at a time: the spread figures compare endpoints' latencies, and pods of other tests
/// running beside one (each with its proxy, three endpoint threads and a load) make some of its
/// endpoints slower than others, which a latency-aware balancer then rightly sends less.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How the proxy is told where remora-control is.
enum ControlAt {
    /// `--control 127.0.0.1:8090`.
    Address,
    /// `--control remora-control.remora-system.svc:8090`, as the injector writes it, found
    /// through the pod's resolv.conf and a DNS server that knows only the full name.
    DnsName,
}

/// A meshed pod whose proxy asks remora-control about its destinations.
struct ServiceMesh {
    // Field order: the processes go before the namespaces, and the turn is given up last.
    control: Option<Proc>,
    proxy: Proc,
    /// The pod's resolver, when the proxy is given remora-control's name.
    dns: Option<dns::DnsServer>,
    control_bin: PathBuf,
    /// Logs, and `objects/` (what remora-control reads).
    dir: PathBuf,
    pod: Pod,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl ServiceMesh {
    /// The pod with `objects` in the control plane's files, and remora-control started first
    /// when `control` is true. `None` (after a loud message) when a binary is missing or the
    /// tests cannot run here.
    fn start(objects: &str, control: bool) -> Option<Self> {
        Self::start_with(objects, control, ControlAt::Address)
    }

    fn start_with(objects: &str, control: bool, control_at: ControlAt) -> Option<Self> {
        if !can_run() {
            return None;
        }
        let control_bin = built("remora-control")?;
        let proxy_bin = built("remora-proxy")?;
        let init_bin = built("remora-init")?;
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);

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
        let dir = std::env::temp_dir().join(format!("{}-service", pod.pod.name()));
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        let (dns, control_arg) = match control_at {
            ControlAt::Address => (None, CONTROL_LISTEN.to_string()),
            ControlAt::DnsName => {
                let search = format!("{POD_NAMESPACE}.svc.cluster.local");
                let dns = dns::DnsServer::start(
                    &pod.pod,
                    &[&search, "svc.cluster.local", "cluster.local"],
                    &[(CONTROL_FQDN, Ipv4Addr::LOCALHOST)],
                )
                .expect("starting the pod's DNS server");
                (Some(dns), CONTROL_NAME.to_string())
            }
        };
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let proxy = Proc::spawn(
            pod.pod
                .command_as(PROXY_UID, PROXY_UID, proxy_bin)
                .env("POD_NAMESPACE", POD_NAMESPACE)
                .env("POD_NAME", POD_NAME)
                .args(["--log-format", "plain", "--access-log"])
                .args(["--control", &control_arg, "--control-plaintext"])
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("spawning remora-proxy");
        let mut mesh = Self {
            _turn: turn,
            control: None,
            proxy,
            dns,
            control_bin,
            dir,
            pod,
        };
        mesh.write_objects(objects);
        if control {
            mesh.start_control();
        }
        assert!(
            wait_until(Duration::from_secs(10), || status(
                &mesh.pod.pod,
                PROXY_READY
            ) == Some(200)),
            "the proxy never became ready"
        );
        Some(mesh)
    }

    /// Starts remora-control (again) and waits until it is ready: its files read.
    fn start_control(&mut self) {
        assert!(self.control.is_none(), "remora-control runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("control.log"))
            .unwrap();
        let objects = self.dir.join("objects");
        self.control = Some(
            Proc::spawn(
                self.pod
                    .pod
                    .command(&self.control_bin)
                    .arg("serve")
                    .args(["--plaintext", "--log-format", "plain"])
                    .arg("--objects")
                    .arg(&objects)
                    .args(["--listen", CONTROL_LISTEN])
                    .args(["--admin-listen", "127.0.0.1:9990"])
                    .stdout(Stdio::null())
                    .stderr(log),
            )
            .expect("spawning remora-control"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || status(
                &self.pod.pod,
                CONTROL_READY
            ) == Some(200)),
            "remora-control never became ready"
        );
    }

    /// SIGKILL, as a node failure or an OOM kill would end it.
    fn kill_control(&mut self) {
        drop(self.control.take().expect("remora-control is not running"));
    }

    /// Replaces the objects file as a ConfigMap volume changes: a new file renamed over the old.
    fn write_objects(&self, yaml: &str) {
        let staged = self.dir.join("objects.yaml.staged");
        std::fs::write(&staged, yaml).unwrap();
        std::fs::rename(&staged, self.dir.join("objects").join("echo.yaml")).unwrap();
    }

    /// The proxy never crashes, whatever the control plane or the endpoints do.
    fn assert_proxy_alive(&mut self) {
        let exited = self.proxy.child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "remora-proxy exited: {exited:?}\n{}",
            self.logs()
        );
    }

    fn metrics(&self) -> String {
        let out = curl(&self.pod.pod, &[PROXY_METRICS]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn metric(&self, series: &str) -> f64 {
        series_value(&self.metrics(), series)
    }

    fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- remora-proxy log ---\n{}\n--- remora-control log ---\n{}",
            read("proxy.log"),
            read("control.log")
        )
    }
}

impl Drop for ServiceMesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An echo server on each endpoint at `port`, named for its address; the third endpoint's
/// answers are delayed by `third_delay`.
fn backends(remote: &NetNs, port: u16, third_delay: Duration) -> Vec<Backend> {
    ENDPOINTS
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let delay = if i == 2 { third_delay } else { Duration::ZERO };
            Backend::start(remote, addr(*ip, port), Echo::new(ip.to_string(), delay)).unwrap()
        })
        .collect()
}

fn names() -> Vec<String> {
    ENDPOINTS.iter().map(Ipv4Addr::to_string).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    /// HTTP/1.1, each client connection kept alive for all its requests.
    One,
    /// HTTP/2 with prior knowledge (h2c): one connection, the requests in flight multiplexed.
    Two,
}

/// Requests to send from the pod: `requests` in all, `in_flight` at a time (HTTP/1.1: that many
/// keep-alive connections; HTTP/2: that many streams on one connection).
#[derive(Debug, Clone)]
struct Load {
    http: Http,
    target: SocketAddr,
    path: String,
    requests: usize,
    in_flight: usize,
    /// Set to end the load early; the requests already sent still finish.
    stop: Arc<AtomicBool>,
}

impl Load {
    fn new(http: Http, requests: usize, in_flight: usize) -> Self {
        Self {
            http,
            target: addr(CLUSTER_IP, HTTP.port),
            path: "/".to_string(),
            requests,
            in_flight,
            stop: Arc::default(),
        }
    }

    fn path(mut self, path: &str) -> Self {
        self.path = path.to_string();
        self
    }

    fn until(mut self, stop: &Arc<AtomicBool>) -> Self {
        self.stop = Arc::clone(stop);
        self
    }

    /// Takes the right to send one more request.
    fn ticket(&self, sent: &AtomicUsize) -> bool {
        !self.stop.load(Ordering::Relaxed) && sent.fetch_add(1, Ordering::Relaxed) < self.requests
    }
}

/// Who answered how many requests, what failed, and how many client connections were made.
#[derive(Debug, Default)]
struct Tally {
    answers: BTreeMap<String, usize>,
    failures: Vec<String>,
    connections: usize,
}

impl Tally {
    fn answered(&self) -> usize {
        self.answers.values().sum()
    }

    fn count(&self, name: &str) -> usize {
        self.answers.get(name).copied().unwrap_or(0)
    }

    /// `name`'s share of the answers, in percent.
    fn share(&self, name: &str) -> f64 {
        100.0 * self.count(name) as f64 / self.answered().max(1) as f64
    }

    fn shares(&self) -> String {
        self.answers
            .keys()
            .map(|name| format!("{name} {:.1} %", self.share(name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn merge(&mut self, other: Tally) {
        for (name, count) in other.answers {
            *self.answers.entry(name).or_default() += count;
        }
        self.failures.extend(other.failures);
        self.connections += other.connections;
    }
}

/// A whole load, however it goes, ends within this.
const LOAD_LIMIT: Duration = Duration::from_secs(60);
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// Runs `load` from inside `ns` (a thread of its own, entered into the namespace) to the end.
fn drive(ns: &NetNs, load: Load) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let shared = Arc::clone(&tally);
    ns.run_in(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let load = Arc::new(load);
            let sent = Arc::new(AtomicUsize::new(0));
            let run = async {
                let mut workers = tokio::task::JoinSet::new();
                match load.http {
                    Http::One => {
                        for _ in 0..load.in_flight {
                            workers.spawn(h1_worker(
                                Arc::clone(&load),
                                Arc::clone(&sent),
                                Arc::clone(&shared),
                            ));
                        }
                    }
                    Http::Two => match h2_connect(load.target).await {
                        Ok(sender) => {
                            shared.lock().unwrap().connections += 1;
                            for _ in 0..load.in_flight {
                                workers.spawn(h2_worker(
                                    Arc::clone(&load),
                                    sender.clone(),
                                    Arc::clone(&sent),
                                    Arc::clone(&shared),
                                ));
                            }
                        }
                        Err(error) => shared.lock().unwrap().failures.push(error),
                    },
                }
                while workers.join_next().await.is_some() {}
            };
            if tokio::time::timeout(LOAD_LIMIT, run).await.is_err() {
                shared
                    .lock()
                    .unwrap()
                    .failures
                    .push(format!("the load did not finish within {LOAD_LIMIT:?}"));
            }
        });
    })
    .expect("the load's thread");
    Arc::try_unwrap(tally)
        .expect("every worker has ended")
        .into_inner()
        .unwrap()
}

type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn tcp_connect(target: SocketAddr) -> Result<TokioIo<tokio::net::TcpStream>, String> {
    let stream = tokio::time::timeout(REQUEST_LIMIT, tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| format!("connecting to {target}: timed out"))?
        .map_err(|error| format!("connecting to {target}: {error}"))?;
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

async fn h1_connect(target: SocketAddr) -> Result<H1Sender, String> {
    let (sender, connection) = hyper::client::conn::http1::handshake(tcp_connect(target).await?)
        .await
        .map_err(|error| format!("HTTP/1.1 handshake: {error}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn h2_connect(target: SocketAddr) -> Result<H2Sender, String> {
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), tcp_connect(target).await?)
            .await
            .map_err(|error| format!("HTTP/2 handshake: {error}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The answering endpoint's name from a 200 response, or what went wrong.
async fn answer_of(response: Response<Incoming>) -> Result<String, String> {
    let status = response.status();
    let body = tokio::time::timeout(REQUEST_LIMIT, response.into_body().collect())
        .await
        .map_err(|_| "reading the body: timed out".to_string())?
        .map_err(|error| format!("reading the body: {error}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).trim().to_string();
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    Ok(body)
}

fn record(tally: &Mutex<Tally>, result: Result<String, String>) {
    let mut tally = tally.lock().unwrap();
    match result {
        Ok(name) => *tally.answers.entry(name).or_default() += 1,
        Err(error) => tally.failures.push(error),
    }
}

/// One keep-alive connection sending requests one after the other; a new connection only when
/// the proxy has closed the old one (counted).
async fn h1_worker(load: Arc<Load>, sent: Arc<AtomicUsize>, tally: Arc<Mutex<Tally>>) {
    let mut sender: Option<H1Sender> = None;
    while load.ticket(&sent) {
        let result = async {
            let mut current = match sender.take() {
                Some(current) if !current.is_closed() => current,
                _ => {
                    tally.lock().unwrap().connections += 1;
                    h1_connect(load.target).await?
                }
            };
            current
                .ready()
                .await
                .map_err(|error| format!("connection not ready: {error}"))?;
            let request = Request::get(load.path.as_str())
                .header(hyper::header::HOST, load.target.to_string())
                .body(Empty::new())
                .unwrap();
            let response = tokio::time::timeout(REQUEST_LIMIT, current.send_request(request))
                .await
                .map_err(|_| "no response: timed out".to_string())?
                .map_err(|error| format!("no response: {error}"))?;
            let answer = answer_of(response).await;
            sender = Some(current);
            answer
        }
        .await;
        record(&tally, result);
    }
}

/// One of the streams in flight on a shared HTTP/2 connection.
async fn h2_worker(
    load: Arc<Load>,
    mut sender: H2Sender,
    sent: Arc<AtomicUsize>,
    tally: Arc<Mutex<Tally>>,
) {
    let uri = format!("http://{}{}", load.target, load.path);
    while load.ticket(&sent) {
        let result = async {
            sender
                .ready()
                .await
                .map_err(|error| format!("connection not ready: {error}"))?;
            let request = Request::get(uri.as_str()).body(Empty::new()).unwrap();
            let response = tokio::time::timeout(REQUEST_LIMIT, sender.send_request(request))
                .await
                .map_err(|_| "no response: timed out".to_string())?
                .map_err(|error| format!("no response: {error}"))?;
            answer_of(response).await
        }
        .await;
        record(&tally, result);
    }
}

/// Every request answered, on exactly the connections expected.
fn assert_all_answered(what: &str, tally: &Tally, requests: usize, connections: usize) {
    assert!(
        tally.failures.is_empty() && tally.answered() == requests,
        "{what}: {} of {requests} answered; failures: {:?}",
        tally.answered(),
        tally.failures
    );
    assert_eq!(tally.connections, connections, "{what}: client connections");
}

/// Each endpoint within ±5 points of an even share.
fn assert_even(what: &str, tally: &Tally) {
    eprintln!("{what}: {}", tally.shares());
    for name in names() {
        let share = tally.share(&name);
        assert!(
            (share - 100.0 / 3.0).abs() <= 5.0,
            "{what}: {name} got {share:.1} % (expected 33.3 ± 5): {}",
            tally.shares()
        );
    }
}

/// No endpoint starves: each at least 10 %.
fn assert_none_starves(what: &str, tally: &Tally) {
    eprintln!("{what}: {}", tally.shares());
    for name in names() {
        let share = tally.share(&name);
        assert!(
            share >= 10.0,
            "{what}: {name} got {share:.1} % (expected ≥ 10): {}",
            tally.shares()
        );
    }
}

#[test]
fn the_objects_these_tests_write_are_what_remora_control_reads() {
    use remora_control::index::Index;
    use remora_control::objects::read_file_text;
    for (port, endpoints) in [
        (HTTP, &ENDPOINTS[..]),
        (GRPC, &ENDPOINTS[..2]),
        (TCP, &[][..]),
    ] {
        let (set, problems) =
            read_file_text(std::path::Path::new("echo.yaml"), &objects(port, endpoints));
        assert!(problems.is_empty(), "{problems:?}");
        let index = Index::build(&set);
        let target = index
            .lookup(addr(CLUSTER_IP, port.port))
            .unwrap_or_else(|| panic!("no target for {CLUSTER_IP}:{}", port.port));
        assert_eq!(
            (
                target.service.namespace.as_str(),
                target.service.name.as_str()
            ),
            (NAMESPACE, SERVICE)
        );
        assert_eq!(target.app_protocol.as_deref(), port.app_protocol);
        let ready: Vec<SocketAddr> = target.endpoints.iter().map(|e| e.addr).collect();
        let expected: Vec<SocketAddr> = endpoints.iter().map(|ip| addr(*ip, port.target)).collect();
        assert_eq!(ready, expected);
    }
}

#[test]
fn http1_keep_alive_requests_spread_over_the_endpoints() {
    let Some(mesh) = ServiceMesh::start(&objects(HTTP, &ENDPOINTS), true) else {
        return;
    };
    let _backends = backends(&mesh.pod.remote, HTTP.target, Duration::ZERO);

    let concurrent = drive(&mesh.pod.pod, Load::new(Http::One, 500, 10));
    assert_all_answered("HTTP/1.1, 10 in flight", &concurrent, 500, 10);
    assert_even("HTTP/1.1, 10 in flight", &concurrent);

    let sequential = drive(&mesh.pod.pod, Load::new(Http::One, 300, 1));
    assert_all_answered("HTTP/1.1, one at a time", &sequential, 300, 1);
    assert_none_starves("HTTP/1.1, one at a time", &sequential);

    let metrics = mesh.metrics();
    assert_eq!(series_value(&metrics, BALANCER_ENDPOINTS), 3.0, "{metrics}");
    assert_eq!(series_value(&metrics, CONTROL_CONNECTED), 1.0, "{metrics}");
}

#[test]
fn the_proxy_finds_remora_control_by_the_name_the_injector_gives_it() {
    // The name goes through the pod's search list, as in a cluster: the first two tries are
    // NXDOMAIN, the third is the full name. remora-proxy is a static binary: this is glibc's
    // built-in "dns" name service at work, with no module to load.
    let Some(mesh) = ServiceMesh::start_with(&objects(HTTP, &ENDPOINTS), true, ControlAt::DnsName)
    else {
        return;
    };
    let _backends = backends(&mesh.pod.remote, HTTP.target, Duration::ZERO);
    let tally = drive(&mesh.pod.pod, Load::new(Http::One, 60, 3));
    assert_all_answered(
        "HTTP/1.1 through a control plane found by name",
        &tally,
        60,
        3,
    );
    let metrics = mesh.metrics();
    assert_eq!(series_value(&metrics, CONTROL_CONNECTED), 1.0, "{metrics}");
    assert_eq!(series_value(&metrics, BALANCER_ENDPOINTS), 3.0, "{metrics}");
    let queries = mesh.dns.as_ref().unwrap().queries();
    assert!(
        queries.iter().any(|name| name == CONTROL_FQDN),
        "the proxy never asked for {CONTROL_FQDN}: {queries:?}"
    );
}

#[test]
fn h2_prior_knowledge_requests_spread_over_the_endpoints() {
    let Some(mesh) = ServiceMesh::start(&objects(HTTP, &ENDPOINTS), true) else {
        return;
    };
    let _backends = backends(&mesh.pod.remote, HTTP.target, Duration::ZERO);

    // One client connection: only per-request balancing can spread it.
    let concurrent = drive(&mesh.pod.pod, Load::new(Http::Two, 500, 10));
    assert_all_answered("HTTP/2, 10 streams in flight", &concurrent, 500, 1);
    assert_even("HTTP/2, 10 streams in flight", &concurrent);

    let sequential = drive(&mesh.pod.pod, Load::new(Http::Two, 300, 1));
    assert_all_answered("HTTP/2, one stream at a time", &sequential, 300, 1);
    assert_none_starves("HTTP/2, one stream at a time", &sequential);
}

/// tests/grpc_echo.py, the gRPC client and server (Python grpcio).
fn grpc_echo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("grpc_echo.py")
}

/// `grpc_echo.py call` from inside `ns`: one channel to the ClusterIP.
fn grpc_calls(ns: &NetNs, target: SocketAddr, requests: usize, in_flight: usize) -> Tally {
    let out = ns
        .command("timeout")
        .args(["90", "python3"])
        .arg(grpc_echo())
        .args(["call", &target.to_string()])
        .args([requests.to_string(), in_flight.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("spawning python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|error| {
        panic!(
            "grpc_echo.py call: {error}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut tally = Tally {
        connections: 1,
        ..Tally::default()
    };
    for (name, count) in report["answers"].as_object().into_iter().flatten() {
        tally
            .answers
            .insert(name.clone(), count.as_u64().unwrap_or(0) as usize);
    }
    for failure in report["failures"].as_array().into_iter().flatten() {
        tally.failures.push(failure.to_string());
    }
    tally
}

#[test]
fn grpc_calls_spread_over_the_endpoints() {
    let Some(mesh) = ServiceMesh::start(&objects(GRPC, &ENDPOINTS), true) else {
        return;
    };
    let python = mesh
        .pod
        .remote
        .command("python3")
        .args(["-c", "import grpc"])
        .output()
        .expect("spawning python3");
    assert!(
        python.status.success(),
        "python3 has no grpcio (scripts/install-deps.sh test installs it): {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let _servers: Vec<Proc> = ENDPOINTS
        .iter()
        .map(|ip| {
            let listen = addr(*ip, GRPC.target);
            let server = Proc::spawn(
                mesh.pod
                    .remote
                    .command("python3")
                    .arg(grpc_echo())
                    .args(["serve", &listen.to_string(), &ip.to_string()])
                    .stdout(Stdio::null()),
            )
            .unwrap();
            assert!(
                wait_for_listener(&mesh.pod.remote, listen, Duration::from_secs(10)),
                "the gRPC server on {listen} never listened"
            );
            server
        })
        .collect();

    let concurrent = grpc_calls(&mesh.pod.pod, addr(CLUSTER_IP, GRPC.port), 500, 10);
    assert_all_answered("gRPC, 10 calls in flight", &concurrent, 500, 1);
    assert_even("gRPC, 10 calls in flight", &concurrent);

    let sequential = grpc_calls(&mesh.pod.pod, addr(CLUSTER_IP, GRPC.port), 300, 1);
    assert_all_answered("gRPC, one call at a time", &sequential, 300, 1);
    assert_none_starves("gRPC, one call at a time", &sequential);
}

#[test]
fn an_endpoint_50ms_slower_gets_under_10_percent() {
    let Some(mesh) = ServiceMesh::start(&objects(HTTP, &ENDPOINTS), true) else {
        return;
    };
    let backends = backends(&mesh.pod.remote, HTTP.target, Duration::from_millis(50));
    let slow = backends[2].name().to_string();
    let tally = drive(&mesh.pod.pod, Load::new(Http::One, 500, 10));
    assert_all_answered("HTTP/1.1, 10 in flight", &tally, 500, 10);
    eprintln!("one endpoint 50 ms slower: {}", tally.shares());
    assert!(
        tally.share(&slow) < 10.0,
        "{slow}, 50 ms slower, got {:.1} %: {}",
        tally.share(&slow),
        tally.shares()
    );
}

#[test]
fn a_killed_endpoint_fails_only_the_requests_in_flight_on_it() {
    let Some(mut mesh) = ServiceMesh::start(&objects(HTTP, &ENDPOINTS), true) else {
        return;
    };
    let mut backends = backends(&mesh.pod.remote, HTTP.target, Duration::ZERO);
    // Every request takes 20 ms at the endpoint, so some are in flight on it when it dies.
    let loads = [
        Load::new(Http::One, 150, 1).path("/sleep/20"),
        Load::new(Http::One, 600, 10).path("/sleep/20"),
        Load::new(Http::Two, 600, 10).path("/sleep/20"),
    ];
    let requests: usize = loads.iter().map(|load| load.requests).sum();
    let (at_kill, tally) = std::thread::scope(|scope| {
        let runs = loads
            .clone()
            .map(|load| scope.spawn(|| drive(&mesh.pod.pod, load)));
        assert!(
            wait_until(Duration::from_secs(10), || backends[2].stats().answered
                >= 30),
            "the endpoint to kill never got busy: {:?}",
            backends.iter().map(Backend::stats).collect::<Vec<_>>()
        );
        let at_kill = backends[2].kill();
        let mut tally = Tally::default();
        for run in runs {
            tally.merge(run.join().expect("a load panicked"));
        }
        (at_kill, tally)
    });
    let victim = backends[2].stats();
    eprintln!(
        "killed {} with {} requests in flight ({} unanswered in all); {} of {requests} \
         requests failed: {:?}; answers {:?}",
        backends[2].name(),
        at_kill.in_flight_at_kill,
        victim.unanswered(),
        tally.failures.len(),
        tally.failures,
        tally.answers
    );
    assert_eq!(
        tally.answered() + tally.failures.len(),
        requests,
        "every request ends, answered or failed"
    );
    assert!(
        tally.failures.len() <= victim.unanswered(),
        "{} requests failed, but only {} were in flight on the killed endpoint: {:?}",
        tally.failures.len(),
        victim.unanswered(),
        tally.failures
    );
    // The survivors took the rest.
    assert_eq!(
        tally.count(backends[0].name()) + tally.count(backends[1].name()),
        requests - tally.failures.len() - victim.answered,
    );
    mesh.assert_proxy_alive();
}

#[test]
fn endpoints_removed_and_added_in_the_file_are_dropped_and_used_within_a_second() {
    let Some(mesh) = ServiceMesh::start(&objects(HTTP, &ENDPOINTS), true) else {
        return;
    };
    let backends = backends(&mesh.pod.remote, HTTP.target, Duration::ZERO);
    let victim = &backends[2];
    let in_flight = |backend: &Backend| backend.stats().unanswered();
    std::thread::scope(|scope| {
        // Long requests first, alone, so that some are surely in flight on the victim.
        let long = scope.spawn(|| {
            drive(
                &mesh.pod.pod,
                Load::new(Http::Two, 12, 12).path("/sleep/2500"),
            )
        });
        assert!(
            wait_until(Duration::from_secs(3), || backends
                .iter()
                .map(in_flight)
                .sum::<usize>()
                == 12),
            "the long requests never all arrived"
        );
        let long_on_victim = in_flight(victim);
        assert!(
            long_on_victim > 0,
            "no long request went to {}",
            victim.name()
        );

        // Short requests all along: one at a time on one connection, and 4 streams.
        let stop = Arc::new(AtomicBool::new(false));
        let short = [
            Load::new(Http::One, 1_000_000, 1).until(&stop),
            Load::new(Http::Two, 1_000_000, 4).until(&stop),
        ]
        .map(|load| scope.spawn(|| drive(&mesh.pod.pod, load)));
        std::thread::sleep(Duration::from_millis(300));
        assert!(victim.stats().answered > 0, "{} unused", victim.name());

        let removed = Instant::now();
        mesh.write_objects(&objects(HTTP, &ENDPOINTS[..2]));
        std::thread::sleep(Duration::from_millis(2500));
        let stats = victim.stats();
        let last = stats
            .arrivals
            .last()
            .map(|at| at.saturating_duration_since(removed));
        eprintln!(
            "removed {}: its last request arrived {last:?} after the file changed",
            victim.name()
        );
        assert_eq!(
            stats.arrived_since(removed + Duration::from_millis(1500)),
            0,
            "{} still got requests more than 1.5 s after its removal (last {last:?} after)",
            victim.name()
        );
        let long = long.join().expect("the long load panicked");
        assert_all_answered("long requests across the removal", &long, 12, 1);
        assert_eq!(long.count(victim.name()), long_on_victim, "{long:?}");

        let added = Instant::now();
        mesh.write_objects(&objects(HTTP, &ENDPOINTS));
        assert!(
            wait_until(Duration::from_millis(1500), || victim
                .stats()
                .arrived_since(added)
                > 0),
            "{} added back, unused after 1.5 s",
            victim.name()
        );
        let first = victim.stats().arrivals.into_iter().find(|&at| at >= added);
        eprintln!(
            "added {} back: its first request arrived {:?} after the file changed",
            victim.name(),
            first.map(|at| at - added)
        );
        stop.store(true, Ordering::Relaxed);
        for run in short {
            let tally = run.join().expect("a short load panicked");
            assert!(tally.failures.is_empty(), "{:?}", tally.failures);
        }
    });
}

/// A plain TCP server: writes its name and a newline on accept, then holds the connection until
/// the client closes it.
fn greeter(ns: &NetNs, addr: SocketAddr, name: String) {
    let listener = ns
        .run_in(move || std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let greeting = format!("{name}\n");
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = stream.write_all(greeting.as_bytes());
                let mut buf = [0u8; 64];
                while matches!(std::io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

#[test]
fn opaque_tcp_connections_to_a_service_spread_over_the_endpoints() {
    let Some(mesh) = ServiceMesh::start(&objects(TCP, &ENDPOINTS), true) else {
        return;
    };
    for ip in ENDPOINTS {
        greeter(&mesh.pod.remote, addr(ip, TCP.target), ip.to_string());
    }
    // All kept open, so that fewest-open balancing has something to count.
    let target = addr(CLUSTER_IP, TCP.port);
    let mut open = Vec::new();
    let mut tally = Tally::default();
    for _ in 0..30 {
        let stream = mesh
            .pod
            .pod
            .run_in(move || TcpStream::connect_timeout(&target, Duration::from_secs(3)))
            .unwrap()
            .expect("connecting to the ClusterIP");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut line = String::new();
        let result = BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(|error| error.to_string())
            .map(|_| line.trim().to_string());
        match result {
            Ok(name) if !name.is_empty() => *tally.answers.entry(name).or_default() += 1,
            Ok(_) => tally.failures.push("closed without a greeting".into()),
            Err(error) => tally.failures.push(error),
        }
        open.push(stream);
    }
    eprintln!("30 opaque connections: {:?}", tally.answers);
    assert!(tally.failures.is_empty(), "{:?}", tally.failures);
    for name in names() {
        let count = tally.count(&name);
        assert!(
            (6..=14).contains(&count),
            "{name} got {count} of 30 connections (fewest-open gives about 10): {:?}",
            tally.answers
        );
    }
}

#[test]
fn fail_open_without_control_plane_then_balanced_then_last_snapshot_then_resumed() {
    let Some(mut mesh) = ServiceMesh::start(&objects(HTTP, &ENDPOINTS), false) else {
        return;
    };
    let backends = backends(&mesh.pod.remote, HTTP.target, Duration::ZERO);
    // kube-proxy's stand-in: the ClusterIP on the remote host, answering for itself.
    mesh.pod
        .remote
        .exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{CLUSTER_IP}/24"),
            "dev",
            "eth0",
        ])
        .unwrap();
    let _kube_proxy = Backend::start(
        &mesh.pod.remote,
        addr(CLUSTER_IP, HTTP.port),
        Echo::new("via-clusterip", Duration::ZERO),
    )
    .unwrap();

    // No control plane: the first connection goes to the original destination within ~1 s.
    let start = Instant::now();
    let first = drive(&mesh.pod.pod, Load::new(Http::One, 1, 1));
    let elapsed = start.elapsed();
    assert_eq!(first.count("via-clusterip"), 1, "{first:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    eprintln!("without a control plane: answered via the ClusterIP after {elapsed:?}");
    assert_eq!(mesh.metric(CONTROL_CONNECTED), 0.0);

    // The control plane starts: new requests are balanced within a few seconds.
    mesh.start_control();
    let started = Instant::now();
    let all_three = |tally: &Tally| names().iter().all(|name| tally.count(name) > 0);
    let mut last = Tally::default();
    let balanced = wait_until(Duration::from_secs(10), || {
        last = drive(&mesh.pod.pod, Load::new(Http::One, 30, 3));
        last.failures.is_empty() && last.count("via-clusterip") == 0 && all_three(&last)
    });
    assert!(
        balanced,
        "not balanced 10 s after the control plane started: {last:?}"
    );
    eprintln!(
        "control plane started: balanced after {:?}",
        started.elapsed()
    );
    let metrics = mesh.metrics();
    assert_eq!(series_value(&metrics, CONTROL_CONNECTED), 1.0, "{metrics}");
    assert_eq!(series_value(&metrics, BALANCER_ENDPOINTS), 3.0, "{metrics}");

    // Killed: the last snapshot keeps balancing, on new connections too.
    mesh.kill_control();
    assert!(
        wait_until(Duration::from_secs(5), || mesh.metric(CONTROL_CONNECTED)
            == 0.0),
        "control_connected still 1 after remora-control was killed"
    );
    let without = drive(&mesh.pod.pod, Load::new(Http::One, 60, 6));
    assert_all_answered("with the control plane killed", &without, 60, 6);
    assert_eq!(without.count("via-clusterip"), 0, "{without:?}");
    assert!(all_three(&without), "{without:?}");

    // A change made while it is down is seen once it is back.
    mesh.write_objects(&objects(HTTP, &ENDPOINTS[..2]));
    mesh.start_control();
    let restarted = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || mesh.metric(BALANCER_ENDPOINTS)
            == 2.0),
        "the endpoint removed while the control plane was down is still known: {}",
        mesh.metrics()
    );
    eprintln!(
        "control plane restarted: the change seen after {:?}",
        restarted.elapsed()
    );
    let after = drive(&mesh.pod.pod, Load::new(Http::One, 60, 6));
    assert_all_answered("after the restart", &after, 60, 6);
    assert_eq!(after.count(backends[2].name()), 0, "{after:?}");
    assert_eq!(after.count("via-clusterip"), 0, "{after:?}");
    assert_eq!(mesh.metric(CONTROL_CONNECTED), 1.0);
    mesh.assert_proxy_alive();
}
