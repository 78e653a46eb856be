//! The Gateway API v1.6 mesh conformance suite, replayed without a cluster, and remora's own
//! route tests: timeouts, retries, mirrors and the edges of route rules.
//!
//! What each test sends and expects is data: `tests/data/gateway-mesh.yaml` (the cases of the
//! upstream Go tables in our words, stricter where they are loose). The objects are the suite's
//! own manifests, read in place from the shared copy (`shared/peer-data/gateway-api-mesh` above
//! this crate, or `REMORA_GATEWAY_API_MESH`; every test skips loudly when it is absent), plus
//! `tests/data/gateway-extra.yaml`.
//!
//! One "cluster" per client of a test: a client pod (remora-init's rules, remora-proxy as uid
//! 1337 with `POD_NAMESPACE` = the client's namespace, remora-control on its loopback reading
//! `--objects`) and a remote host on which every Deployment's pod is an echo server
//! ([`Echo::pod`]) on its own address. Each Service gets a ClusterIP no host has, and an
//! EndpointSlice listing the pods its selector picks; only the proxy can answer a ClusterIP.
//!
//! Every case runs and is reported (pass or fail, with why) before a test fails: the failure
//! message lists each failed case.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_e2e::echo::{grpc_frame, Backend, Echo};
use remora_e2e::*;
use serde::Deserialize;
use serde_json::{json, Value};

const MANIFESTS: &str = "shared/peer-data/gateway-api-mesh";
const BASE_MANIFEST: &str = "mesh/manifests.yaml";
/// remora's own equivalent of the suite's base, for its own tests when the suite is absent.
const OWN_BASE_MANIFEST: &str = "data/gateway-base.yaml";
const MESH_NAMESPACE: &str = "gateway-conformance-mesh";
const SUITE_FILE: &str = "data/gateway-mesh.yaml";

/// Pods get 198.18.0.10 and up, ClusterIPs 198.18.0.100 and up: all on the /24 of the pod's
/// `eth0`, so the pod routes them without a gateway.
const FIRST_POD_HOST: u8 = 10;
const FIRST_CLUSTER_IP_HOST: u8 = 100;

const CONTROL_LISTEN: &str = "127.0.0.1:8090";
const CONTROL_READY: &str = "http://127.0.0.1:9990/ready";
const PROXY_READY: &str = "http://127.0.0.1:15020/ready";

/// The path of a gRPC call whose case names none.
const GRPC_METHOD: &str = "/remora.conformance.Echo/Echo";
/// Every request carries its own key: the echo servers count requests by it (retries, mirrors)
/// and key their `x-echo-fail` behaviour on it.
const KEY_HEADER: &str = "x-echo-key";

const REQUEST_LIMIT: Duration = Duration::from_secs(5);
/// The time the proxy may take to have every target of a client ready.
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);
/// How long a mirror may take to deliver what it copies.
const MIRROR_SETTLE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The suite as data.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Suite {
    tests: Vec<TestSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSpec {
    name: String,
    #[serde(default = "yes")]
    needs_routes: bool,
    manifests: Vec<String>,
    clients: Vec<ClientSpec>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSpec {
    namespace: String,
    #[serde(default)]
    cases: Vec<Case>,
    #[serde(default)]
    splits: Vec<Split>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Http1,
    H2,
    Grpc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    request: RequestSpec,
    #[serde(default)]
    expect: Expect,
    protocols: Option<Vec<Protocol>>,
    #[serde(default = "one")]
    repeat: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestSpec {
    #[serde(default = "echo_host")]
    host: String,
    method: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// A body of this many bytes.
    #[serde(default)]
    body_bytes: usize,
}

fn echo_host() -> String {
    "echo".to_string()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: Option<u16>,
    grpc_status: Option<u32>,
    backend: Option<String>,
    namespace: Option<String>,
    path: Option<String>,
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    absent_headers: Vec<String>,
    #[serde(default)]
    response_headers: BTreeMap<String, String>,
    #[serde(default)]
    absent_response_headers: Vec<String>,
    location: Option<String>,
    within_ms: Option<u64>,
    body_length: Option<usize>,
    #[serde(default)]
    seen: Vec<Seen>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Seen {
    backend: String,
    count: Option<usize>,
    /// Each request of the case the pod saw had a body this long: none cut short.
    body_length: Option<usize>,
    share: Option<f64>,
    #[serde(default)]
    tolerance: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Split {
    name: String,
    request: RequestSpec,
    #[serde(default = "http1")]
    protocol: Protocol,
    weights: BTreeMap<String, f64>,
    #[serde(default = "five_points")]
    tolerance: f64,
    #[serde(default = "a_thousand")]
    requests: usize,
    #[serde(default = "ten")]
    in_flight: usize,
    #[serde(default = "two")]
    rounds: usize,
}

fn http1() -> Protocol {
    Protocol::Http1
}
fn five_points() -> f64 {
    0.05
}
fn a_thousand() -> usize {
    1000
}
fn ten() -> usize {
    10
}
fn two() -> usize {
    2
}

fn suite() -> Suite {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SUITE_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// `REMORA_GATEWAY_API_MESH`, else the first `shared/peer-data/gateway-api-mesh` above the crate.
/// Set empty, it runs the tests as a checkout without the manifests does: only remora's own.
fn manifests_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("REMORA_GATEWAY_API_MESH") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join(MANIFESTS))
        .find(|dir| dir.is_dir())
}

/// A manifest reference of the suite file (`upstream:PATH` or `local:PATH`) as a file.
fn manifest_path(upstream: &Path, reference: &str) -> PathBuf {
    if let Some(path) = reference.strip_prefix("upstream:") {
        upstream.join(path)
    } else if let Some(path) = reference.strip_prefix("local:") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    } else {
        panic!("manifest {reference:?}: neither upstream:PATH nor local:PATH")
    }
}

/// Every document of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        })
        .filter(|value| !value.is_null())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The objects: Services with ClusterIPs, pods with addresses, EndpointSlices, routes.

#[derive(Debug, Clone)]
struct ServicePort {
    name: String,
    port: u16,
    target: u16,
    app_protocol: Option<String>,
}

#[derive(Debug, Clone)]
struct ServiceDef {
    namespace: String,
    name: String,
    cluster_ip: Ipv4Addr,
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
    /// The document as written, given its ClusterIP.
    object: Value,
}

#[derive(Debug, Clone)]
struct PodDef {
    namespace: String,
    deployment: String,
    name: String,
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
    delay: Duration,
    status: StatusCode,
    ports: BTreeSet<u16>,
}

#[derive(Debug, Clone)]
struct World {
    services: Vec<ServiceDef>,
    pods: Vec<PodDef>,
    routes: Vec<Value>,
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_string())))
        .collect()
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

impl World {
    /// The base manifests (`base`) and a test's own, read into Services, pods and routes.
    fn read(upstream: &Path, base: &Path, manifests: &[String]) -> Self {
        let mut all = documents(base);
        for reference in manifests {
            all.extend(documents(&manifest_path(upstream, reference)));
        }
        let mut world = World {
            services: Vec::new(),
            pods: Vec::new(),
            routes: Vec::new(),
        };
        for document in all {
            let namespace = document["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = text(&document["metadata"]["name"]);
            match document["kind"].as_str() {
                Some("Service") => {
                    let cluster_ip = Ipv4Addr::new(
                        198,
                        18,
                        0,
                        FIRST_CLUSTER_IP_HOST + world.services.len() as u8,
                    );
                    let ports = document["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|port| {
                            let number = port["port"].as_u64().expect("a port number") as u16;
                            ServicePort {
                                name: text(&port["name"]),
                                port: number,
                                target: port["targetPort"].as_u64().map_or(number, |p| p as u16),
                                app_protocol: port["appProtocol"].as_str().map(str::to_string),
                            }
                        })
                        .collect();
                    let mut object = document.clone();
                    object["spec"]["type"] = json!("ClusterIP");
                    object["spec"]["clusterIP"] = json!(cluster_ip.to_string());
                    object["spec"]["clusterIPs"] = json!([cluster_ip.to_string()]);
                    world.services.push(ServiceDef {
                        namespace,
                        name,
                        cluster_ip,
                        selector: string_map(&document["spec"]["selector"]),
                        ports,
                        object,
                    });
                }
                Some("Deployment") => {
                    let template = &document["spec"]["template"];
                    let args: Vec<String> = template["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|container| {
                            container["args"].as_array().cloned().unwrap_or_default()
                        })
                        .map(|arg| text(&arg))
                        .collect();
                    let flag = |name: &str| {
                        args.iter()
                            .find_map(|arg| arg.strip_prefix(name)?.parse::<u64>().ok())
                    };
                    let index = world.pods.len();
                    world.pods.push(PodDef {
                        // As a ReplicaSet names its pods: the Deployment's name first.
                        name: format!("{name}-6f9c7d8b5-{}", pod_suffix(index)),
                        deployment: name,
                        namespace,
                        ip: Ipv4Addr::new(198, 18, 0, FIRST_POD_HOST + index as u8),
                        labels: string_map(&template["metadata"]["labels"]),
                        delay: Duration::from_millis(flag("--delay-ms=").unwrap_or(0)),
                        status: flag("--status=")
                            .and_then(|code| StatusCode::from_u16(code as u16).ok())
                            .unwrap_or(StatusCode::OK),
                        // The port a test may dial on the pod itself.
                        ports: BTreeSet::from([8080]),
                    });
                }
                Some("HTTPRoute" | "GRPCRoute") => world.routes.push(document),
                _ => {}
            }
        }
        // Each pod listens on every port a Service of its sends to it.
        for i in 0..world.pods.len() {
            let targets: Vec<u16> = world
                .selected_by_pod(i)
                .flat_map(|service| service.ports.iter().map(|port| port.target))
                .collect();
            world.pods[i].ports.extend(targets);
        }
        world
    }

    fn selects(service: &ServiceDef, pod: &PodDef) -> bool {
        service.namespace == pod.namespace
            && !service.selector.is_empty()
            && service
                .selector
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
    }

    fn selected_by_pod(&self, pod: usize) -> impl Iterator<Item = &ServiceDef> {
        let pod = &self.pods[pod];
        self.services
            .iter()
            .filter(move |service| Self::selects(service, pod))
    }

    /// Services and their EndpointSlices, as the API server would store them, and the routes:
    /// one JSON `List` for `remora-control --objects`.
    fn objects(&self) -> Value {
        let mut items: Vec<Value> = Vec::new();
        for service in &self.services {
            items.push(service.object.clone());
            let endpoints: Vec<Value> = self
                .pods
                .iter()
                .filter(|pod| Self::selects(service, pod))
                .map(|pod| {
                    json!({
                        "addresses": [pod.ip.to_string()],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": "node-0",
                        "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name},
                    })
                })
                .collect();
            let ports: Vec<Value> = service
                .ports
                .iter()
                .map(|port| {
                    let mut value =
                        json!({"name": port.name, "protocol": "TCP", "port": port.target});
                    if let Some(app_protocol) = &port.app_protocol {
                        value["appProtocol"] = json!(app_protocol);
                    }
                    value
                })
                .collect();
            items.push(json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-k8s7q", service.name),
                    "namespace": service.namespace,
                    "labels": {"kubernetes.io/service-name": service.name},
                },
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": endpoints,
            }));
        }
        items.extend(self.routes.iter().cloned());
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    }

    /// Where a case's `host` dials, for a client in `namespace`.
    fn resolve(
        &self,
        host: &str,
        namespace: &str,
        protocol: Protocol,
    ) -> Result<SocketAddr, String> {
        if let Some(rest) = host.strip_prefix("pod:") {
            let (deployment, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("{host:?}: pod:DEPLOYMENT:PORT"))?;
            let port: u16 = port.parse().map_err(|_| format!("{host:?}: bad port"))?;
            let pod = self
                .pods
                .iter()
                .find(|pod| pod.deployment == deployment && pod.namespace == namespace)
                .ok_or_else(|| format!("{host:?}: no such Deployment in {namespace}"))?;
            return Ok(addr(pod.ip, port));
        }
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (
                name,
                port.parse().map_err(|_| format!("{host:?}: bad port"))?,
            ),
            None if protocol == Protocol::Grpc => (host, 7070),
            None => (host, 80),
        };
        let (name, service_namespace) = name.split_once('.').unwrap_or((name, namespace));
        let service_namespace = service_namespace
            .strip_suffix(".svc.cluster.local")
            .or_else(|| service_namespace.strip_suffix(".svc"))
            .unwrap_or(service_namespace);
        let service = self
            .services
            .iter()
            .find(|service| service.name == name && service.namespace == service_namespace)
            .ok_or_else(|| format!("{host:?}: no Service {service_namespace}/{name}"))?;
        Ok(addr(service.cluster_ip, port))
    }

    /// The Host header a case sends: its own `Host` header, else what it dials by name.
    fn host_header(&self, request: &RequestSpec, target: SocketAddr) -> String {
        if let Some((_, host)) = request
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            return host.clone();
        }
        if request.host.starts_with("pod:") {
            return target.to_string();
        }
        request.host.clone()
    }
}

/// Five lowercase letters, distinct per index, as a pod name's random tail.
fn pod_suffix(index: usize) -> String {
    let letters = b"bcdfghjklmnpqrstvwxz";
    (0..5)
        .map(|i| letters[(index * 7 + i * 3 + index / 20) % letters.len()] as char)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// One client's cluster.

/// Tests at once: each runs a control plane, a proxy and a dozen echo threads on 2 shared cores.
const AT_ONCE: usize = 2;
static RUNNING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

struct Turn;

impl Turn {
    fn take() -> Self {
        let (count, freed) = &RUNNING;
        let mut running = count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *running >= AT_ONCE {
            running = freed
                .wait(running)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *running += 1;
        Self
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let (count, freed) = &RUNNING;
        *count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
        freed.notify_one();
    }
}

struct Cluster {
    // Field order: processes and servers go before the namespaces that hold them.
    _control: Proc,
    proxy: Proc,
    _servers: Vec<Backend>,
    /// Each pod's echo, by pod name.
    echoes: BTreeMap<String, (String, Arc<Echo>)>,
    world: Arc<World>,
    namespace: String,
    dir: PathBuf,
    pod: Pod,
}

impl Cluster {
    fn start(world: Arc<World>, namespace: &str) -> Self {
        let pod = Pod::new().expect("building the pods' network");
        let dir = std::env::temp_dir().join(format!("{}-gateway", pod.pod.name()));
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        std::fs::write(
            dir.join("objects").join("objects.json"),
            serde_json::to_vec_pretty(&world.objects()).unwrap(),
        )
        .unwrap();

        let mut servers = Vec::new();
        let mut echoes = BTreeMap::new();
        for def in &world.pods {
            pod.remote
                .exec_ok(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", def.ip),
                    "dev",
                    "eth0",
                ])
                .unwrap();
            let echo = Echo::pod(&def.name, &def.namespace, def.delay, def.status);
            for &port in &def.ports {
                servers.push(
                    Backend::start(&pod.remote, addr(def.ip, port), Arc::clone(&echo)).unwrap(),
                );
            }
            echoes.insert(def.name.clone(), (def.namespace.clone(), echo));
        }

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
        let control = Proc::spawn(
            pod.pod
                .command(bin("remora-control"))
                .arg("serve")
                .args(["--plaintext", "--log-format", "plain"])
                .arg("--objects")
                .arg(dir.join("objects"))
                .args(["--listen", CONTROL_LISTEN])
                .args(["--admin-listen", "127.0.0.1:9990"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("control.log")).unwrap()),
        )
        .expect("spawning remora-control");
        let proxy = Proc::spawn(
            pod.pod
                .command_as(PROXY_UID, PROXY_UID, bin("remora-proxy"))
                .env("POD_NAMESPACE", namespace)
                .env("POD_NAME", "client-5d8f7c6b9-qwxyz")
                .args(["--log-format", "plain", "--access-log"])
                .args(["--control", CONTROL_LISTEN, "--control-plaintext"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap()),
        )
        .expect("spawning remora-proxy");
        let cluster = Self {
            _control: control,
            proxy,
            _servers: servers,
            echoes,
            world,
            namespace: namespace.to_string(),
            dir,
            pod,
        };
        for (what, url) in [
            ("remora-control", CONTROL_READY),
            ("remora-proxy", PROXY_READY),
        ] {
            assert!(
                wait_until(Duration::from_secs(10), || ready(&cluster.pod.pod, url)),
                "{what} never became ready\n{}",
                cluster.logs()
            );
        }
        cluster
    }

    /// Runs the future `make` builds on a thread inside the client pod's namespace.
    fn in_pod<T: Send + 'static, F: Future<Output = T> + 'static>(
        &self,
        make: impl FnOnce() -> F + Send + 'static,
    ) -> T {
        self.pod
            .pod
            .run_in(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime")
                    .block_on(make())
            })
            .expect("the client's thread")
    }

    /// Sends to each target until it answers through the proxy (its snapshot is there).
    fn warm_up(&self, targets: &[(SocketAddr, Protocol)]) {
        let deadline = Instant::now() + WARM_UP_LIMIT;
        for &(target, protocol) in targets {
            let request = Outgoing {
                target,
                host: target.to_string(),
                method: Method::GET,
                path: "/".to_string(),
                headers: Vec::new(),
                body_bytes: 0,
                protocol,
            };
            while Instant::now() < deadline {
                let request = request.clone();
                let answered = self.in_pod(move || async move { send(&request).await });
                if matches!(&answered, Ok(got) if got.status < 502 || got.status > 504) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Requests a pod (by name prefix, in the namespace given) saw with keys under `prefix`.
    fn seen(&self, backend: &str, namespace: &str, prefix: &str) -> usize {
        self.echoes
            .iter()
            .filter(|(name, (pod_namespace, _))| {
                name.starts_with(backend) && pod_namespace == namespace
            })
            .map(|(_, (_, echo))| echo.stats().keyed(prefix))
            .sum()
    }

    /// The body lengths a pod (by name prefix, in the namespace given) saw under `prefix`.
    fn bodies(&self, backend: &str, namespace: &str, prefix: &str) -> Vec<usize> {
        self.echoes
            .iter()
            .filter(|(name, (pod_namespace, _))| {
                name.starts_with(backend) && pod_namespace == namespace
            })
            .flat_map(|(_, (_, echo))| echo.stats().bodies)
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(_, length)| length)
            .collect()
    }

    fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- remora-proxy log (last 40 lines) ---\n{}\n--- remora-control log (last 40 lines) ---\n{}",
            tail("proxy.log"),
            tail("control.log")
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ready(ns: &NetNs, url: &str) -> bool {
    ns.command("curl")
        .args([
            "-sS",
            "--max-time",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.stdout == b"200")
}

// ---------------------------------------------------------------------------------------------
// The client: HTTP/1.1, HTTP/2 (prior knowledge) and unary gRPC, one connection per request.

#[derive(Debug, Clone)]
struct Outgoing {
    target: SocketAddr,
    /// The Host header (HTTP/1.1) or the authority (HTTP/2).
    host: String,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body_bytes: usize,
    protocol: Protocol,
}

#[derive(Debug)]
struct Got {
    status: u16,
    /// A gRPC answer's status (trailers, or headers for a trailers-only answer).
    grpc_status: Option<String>,
    headers: HeaderMap,
    /// What the answering pod reported, when a pod answered.
    report: Option<Value>,
    elapsed: Duration,
}

async fn send(request: &Outgoing) -> Result<Got, String> {
    let started = Instant::now();
    let exchange = async {
        let mut connection = Connection::open(request.target, request.protocol).await?;
        connection.exchange(request).await
    };
    tokio::time::timeout(REQUEST_LIMIT, exchange)
        .await
        .map_err(|_| format!("no answer within {REQUEST_LIMIT:?}"))?
        .map(|mut got| {
            got.elapsed = started.elapsed();
            got
        })
}

/// A client connection: HTTP/1.1 kept alive, or HTTP/2 (gRPC too).
enum Connection {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    async fn open(target: SocketAddr, protocol: Protocol) -> Result<Self, String> {
        let stream = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|error| format!("connecting to {target}: {error}"))?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        Ok(match protocol {
            Protocol::Http1 => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|error| format!("HTTP/1.1 handshake: {error}"))?;
                tokio::spawn(connection);
                Self::Http1(sender)
            }
            Protocol::H2 | Protocol::Grpc => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|error| format!("HTTP/2 handshake: {error}"))?;
                tokio::spawn(connection);
                Self::Http2(sender)
            }
        })
    }

    fn is_closed(&self) -> bool {
        match self {
            Self::Http1(sender) => sender.is_closed(),
            Self::Http2(sender) => sender.is_closed(),
        }
    }

    /// One request and its whole answer on this connection.
    async fn exchange(&mut self, request: &Outgoing) -> Result<Got, String> {
        let started = Instant::now();
        let mut got = self.exchange_untimed(request).await?;
        got.elapsed = started.elapsed();
        Ok(got)
    }

    async fn exchange_untimed(&mut self, request: &Outgoing) -> Result<Got, String> {
        let grpc = request.protocol == Protocol::Grpc;
        let mut builder = Request::builder().method(if grpc {
            Method::POST
        } else {
            request.method.clone()
        });
        builder = match request.protocol {
            Protocol::Http1 => builder
                .uri(request.path.as_str())
                .header(hyper::header::HOST, request.host.as_str()),
            Protocol::H2 | Protocol::Grpc => {
                builder.uri(format!("http://{}{}", request.host, request.path))
            }
        };
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body = if grpc {
            builder = builder
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            Full::new(grpc_frame(b""))
        } else {
            Full::new(Bytes::from(vec![b'x'; request.body_bytes]))
        };
        let outgoing = builder
            .body(body)
            .map_err(|error| format!("building the request: {error}"))?;
        let response = match self {
            Self::Http1(sender) => {
                sender
                    .ready()
                    .await
                    .map_err(|error| format!("connection not ready: {error}"))?;
                sender.send_request(outgoing).await
            }
            Self::Http2(sender) => {
                sender
                    .ready()
                    .await
                    .map_err(|error| format!("connection not ready: {error}"))?;
                sender.send_request(outgoing).await
            }
        }
        .map_err(|error| format!("no response: {error}"))?;
        let (parts, body) = response.into_parts();
        let collected = body
            .collect()
            .await
            .map_err(|error| format!("reading the body: {error}"))?;
        let grpc_status = grpc
            .then(|| {
                collected
                    .trailers()
                    .and_then(|trailers| trailers.get("grpc-status"))
                    .or_else(|| parts.headers.get("grpc-status"))
                    .map(|status| String::from_utf8_lossy(status.as_bytes()).into_owned())
            })
            .flatten();
        let bytes = collected.to_bytes();
        let message = if grpc && bytes.len() >= 5 {
            bytes.slice(5..)
        } else {
            bytes
        };
        let report = parts
            .headers
            .contains_key("x-echo-pod")
            .then(|| serde_json::from_slice(&message).ok())
            .flatten();
        Ok(Got {
            status: parts.status.as_u16(),
            grpc_status,
            headers: parts.headers,
            report,
            elapsed: Duration::ZERO,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Checking a case.

/// What went wrong with one answer, by the case's expectations; empty when it passes.
fn problems(
    expect: &Expect,
    sent: &Outgoing,
    answer: &Result<Got, String>,
    expected_path: &str,
) -> Vec<String> {
    let got = match answer {
        Ok(got) => got,
        Err(error) => return vec![error.clone()],
    };
    let mut problems = Vec::new();
    let status = expect.status.unwrap_or(200);
    if let Some(code) = expect.grpc_status {
        // gRPC reads an HTTP 404 as UNIMPLEMENTED (12), the code a gRPC "no route" answers.
        let code = code.to_string();
        let http_equivalent = code == "12" && got.status == 404;
        if !http_equivalent && (got.status != 200 || got.grpc_status.as_ref() != Some(&code)) {
            problems.push(format!(
                "status {}, grpc-status {:?} (expected grpc-status {code})",
                got.status, got.grpc_status
            ));
        }
    } else if got.status != status {
        problems.push(format!("status {} (expected {status})", got.status));
    } else if sent.protocol == Protocol::Grpc
        && status == 200
        && got.grpc_status.as_deref() != Some("0")
    {
        problems.push(format!("grpc-status {:?} (expected 0)", got.grpc_status));
    }
    if let Some(limit) = expect.within_ms {
        if got.elapsed > Duration::from_millis(limit) {
            problems.push(format!(
                "answered after {:?} (limit {limit} ms)",
                got.elapsed
            ));
        }
    }
    let header = |name: &str| {
        got.headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    if let Some(location) = &expect.location {
        if header("location").as_ref() != Some(location) {
            problems.push(format!(
                "Location {:?} (expected {location:?})",
                header("location")
            ));
        }
    }
    for (name, value) in &expect.response_headers {
        if header(name).as_ref() != Some(value) {
            problems.push(format!(
                "response header {name}: {:?} (expected {value:?})",
                header(name)
            ));
        }
    }
    for name in &expect.absent_response_headers {
        if let Some(value) = header(name) {
            problems.push(format!("response header {name}: {value:?} (expected none)"));
        }
    }
    let needs_report = expect.backend.is_some()
        || !expect.headers.is_empty()
        || !expect.absent_headers.is_empty()
        || expect.path.is_some()
        || expect.host.is_some()
        || (expect.grpc_status.is_none() && (200..300).contains(&status));
    if !needs_report {
        return problems;
    }
    let Some(report) = &got.report else {
        problems.push(format!(
            "no pod answered (status {}, expected a pod's report)",
            got.status
        ));
        return problems;
    };
    let pod = report["pod"].as_str().unwrap_or_default();
    if let Some(backend) = &expect.backend {
        if !pod.starts_with(backend.as_str()) {
            problems.push(format!("answered by {pod} (expected {backend}-…)"));
        }
    }
    let namespace = expect.namespace.as_deref().unwrap_or(MESH_NAMESPACE);
    if report["namespace"] != namespace {
        problems.push(format!(
            "answered from namespace {} (expected {namespace})",
            report["namespace"]
        ));
    }
    if report["path"] != expected_path {
        problems.push(format!(
            "the pod saw the path {} (expected {expected_path:?})",
            report["path"]
        ));
    }
    let host = expect.host.as_deref().unwrap_or(sent.host.as_str());
    if report["host"] != host {
        problems.push(format!(
            "the pod saw Host {} (expected {host:?})",
            report["host"]
        ));
    }
    let seen_header = |name: &str| -> Option<String> {
        let values = report["headers"][name.to_ascii_lowercase()].as_array()?;
        Some(
            values
                .iter()
                .map(|value| value.as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(","),
        )
    };
    for (name, value) in &expect.headers {
        if seen_header(name).as_ref() != Some(value) {
            problems.push(format!(
                "the pod saw {name}: {:?} (expected {value:?})",
                seen_header(name)
            ));
        }
    }
    for name in &expect.absent_headers {
        if let Some(value) = seen_header(name) {
            problems.push(format!("the pod saw {name}: {value:?} (expected none)"));
        }
    }
    if let Some(length) = expect.body_length {
        if report["body_length"] != length {
            problems.push(format!(
                "the pod saw a body of {} bytes (expected {length})",
                report["body_length"]
            ));
        }
    }
    problems
}

/// One line per case run: its outcome.
#[derive(Debug, Default)]
struct Outcomes {
    lines: Vec<String>,
    failed: usize,
}

impl Outcomes {
    fn record(&mut self, what: String, problems: Vec<String>) {
        if problems.is_empty() {
            self.lines.push(format!("pass  {what}"));
        } else {
            self.failed += 1;
            self.lines
                .push(format!("FAIL  {what}: {}", problems.join("; ")));
        }
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http1 => "HTTP/1.1",
        Protocol::H2 => "HTTP/2",
        Protocol::Grpc => "gRPC",
    }
}

fn outgoing(
    world: &World,
    namespace: &str,
    request: &RequestSpec,
    protocol: Protocol,
) -> Result<Outgoing, String> {
    let target = world.resolve(&request.host, namespace, protocol)?;
    let method = request.method.as_deref().unwrap_or("GET");
    let default_path = if protocol == Protocol::Grpc {
        GRPC_METHOD
    } else {
        "/"
    };
    Ok(Outgoing {
        target,
        host: world.host_header(request, target),
        method: Method::from_bytes(method.as_bytes()).map_err(|_| format!("method {method:?}"))?,
        path: request
            .path
            .clone()
            .unwrap_or_else(|| default_path.to_string()),
        headers: request
            .headers
            .iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("host"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        body_bytes: request.body_bytes,
        protocol,
    })
}

/// Runs one case over one protocol, `repeat` times; its problems, each with how often.
fn run_case(cluster: &Cluster, case: &Case, protocol: Protocol, key: &str) -> Vec<String> {
    let request = match outgoing(&cluster.world, &cluster.namespace, &case.request, protocol) {
        Ok(request) => request,
        Err(error) => return vec![format!("the case itself: {error}")],
    };
    let expected_path = case
        .expect
        .path
        .clone()
        .unwrap_or_else(|| request.path.clone());
    let expect = case.expect.clone();
    let repeat = case.repeat;
    let key = key.to_string();
    let tally: BTreeMap<String, usize> = {
        let key = key.clone();
        cluster.in_pod(move || async move {
            let mut tally: BTreeMap<String, usize> = BTreeMap::new();
            for n in 0..repeat {
                let mut request = request.clone();
                request
                    .headers
                    .push((KEY_HEADER.to_string(), format!("{key}{n}")));
                let answer = send(&request).await;
                for problem in problems(&expect, &request, &answer, &expected_path) {
                    *tally.entry(problem).or_default() += 1;
                }
            }
            tally
        })
    };
    let mut found: Vec<String> = tally
        .into_iter()
        .map(|(problem, times)| {
            if repeat > 1 {
                format!("{problem} ({times} of {repeat})")
            } else {
                problem
            }
        })
        .collect();
    for seen in &case.expect.seen {
        let namespace = case.expect.namespace.as_deref().unwrap_or(MESH_NAMESPACE);
        let count = || cluster.seen(&seen.backend, namespace, &key);
        if let Some(expected) = seen.count {
            // Mirrors arrive on their own time; a count must also stay where it is.
            wait_until(MIRROR_SETTLE, || count() >= expected && expected > 0);
            std::thread::sleep(Duration::from_millis(200));
            if count() != expected {
                found.push(format!(
                    "{} saw {} of these requests (expected {expected})",
                    seen.backend,
                    count()
                ));
            }
        }
        if let Some(length) = seen.body_length {
            if seen.count.is_none() {
                // Nothing to wait for: give a late copy the time to arrive.
                std::thread::sleep(MIRROR_SETTLE / 2);
            }
            let bodies = cluster.bodies(&seen.backend, namespace, &key);
            if bodies.iter().any(|&seen| seen != length) {
                found.push(format!(
                    "{} saw bodies of {bodies:?} bytes (expected {length} each)",
                    seen.backend
                ));
            }
        }
        if let Some(share) = seen.share {
            std::thread::sleep(Duration::from_millis(500));
            wait_until(MIRROR_SETTLE, || {
                let got = count() as f64 / repeat as f64;
                (got - share).abs() <= seen.tolerance
            });
            let got = count() as f64 / repeat as f64;
            if (got - share).abs() > seen.tolerance {
                found.push(format!(
                    "{} saw {:.3} of these requests (expected {share} ± {})",
                    seen.backend, got, seen.tolerance
                ));
            }
        }
    }
    found
}

/// Runs one weighted split: `rounds` batches, each within tolerance, each worker sending its
/// requests one after the other on one kept-alive connection (the split is per request). Upstream passes when one
/// of up to ten batches is; here every batch must, because the Service without its route is
/// balanced by latency, and a skewed batch that happens to match the weights proves nothing.
/// With 1000 requests, 0.05 is over three standard deviations of a fair 70/30 draw.
fn run_split(cluster: &Cluster, split: &Split, key: &str) -> Vec<String> {
    let request = match outgoing(
        &cluster.world,
        &cluster.namespace,
        &split.request,
        split.protocol,
    ) {
        Ok(request) => request,
        Err(error) => return vec![format!("the split itself: {error}")],
    };
    let mut last = Vec::new();
    for round in 0..split.rounds {
        let (requests, in_flight) = (split.requests, split.in_flight);
        let request = request.clone();
        let key = format!("{key}{round}-");
        let answers: Vec<Result<String, String>> = cluster.in_pod(move || async move {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..in_flight {
                let (next, request, key) = (Arc::clone(&next), request.clone(), key.clone());
                workers.spawn(async move {
                    let mut answers = Vec::new();
                    let mut connection: Option<Connection> = None;
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n >= requests {
                            return answers;
                        }
                        let mut request = request.clone();
                        request
                            .headers
                            .push((KEY_HEADER.to_string(), format!("{key}{n}")));
                        let exchange = async {
                            let mut current = match connection.take() {
                                Some(current) if !current.is_closed() => current,
                                _ => Connection::open(request.target, request.protocol).await?,
                            };
                            let got = current.exchange(&request).await;
                            connection = Some(current);
                            got
                        };
                        let answer = tokio::time::timeout(REQUEST_LIMIT, exchange)
                            .await
                            .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_LIMIT:?}")));
                        answers.push(match answer {
                            Ok(got) if got.status == 200 => got
                                .report
                                .and_then(|report| Some(report["pod"].as_str()?.to_string()))
                                .ok_or_else(|| "a 200 with no pod's report".to_string()),
                            // A split may expect a share of errors: `status 500`.
                            Ok(got) => Ok(format!("status {}", got.status)),
                            Err(error) => Err(error),
                        });
                    }
                });
            }
            let mut all = Vec::new();
            while let Some(answers) = workers.join_next().await {
                all.extend(answers.unwrap_or_default());
            }
            all
        });
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut failures: BTreeMap<String, usize> = BTreeMap::new();
        for answer in answers {
            match answer {
                Ok(pod) => match split
                    .weights
                    .keys()
                    .find(|name| pod.starts_with(name.as_str()))
                {
                    Some(name) => *counts.entry(name.clone()).or_default() += 1,
                    None if pod.starts_with("status ") => *failures.entry(pod).or_default() += 1,
                    None => *failures.entry(format!("answered by {pod}")).or_default() += 1,
                },
                Err(error) => *failures.entry(error).or_default() += 1,
            }
        }
        last = failures
            .iter()
            .map(|(failure, times)| format!("{failure} ({times} of {requests})"))
            .collect();
        for (name, weight) in &split.weights {
            let share = counts.get(name).copied().unwrap_or(0) as f64 / requests as f64;
            if (share - weight).abs() > split.tolerance {
                last.push(format!(
                    "{name} got {share:.3} (expected {weight} ± {})",
                    split.tolerance
                ));
            }
        }
        eprintln!(
            "  split {:?} round {}: {counts:?}, failures {failures:?}",
            split.name,
            round + 1
        );
        if !last.is_empty() {
            last.push(format!("in round {} of {}", round + 1, split.rounds));
            return last;
        }
    }
    last
}

// ---------------------------------------------------------------------------------------------
// Running a test of the suite.

fn run(name: &str) {
    let suite = suite();
    let spec = suite
        .tests
        .iter()
        .find(|test| test.name == name)
        .unwrap_or_else(|| panic!("{SUITE_FILE} has no test {name}"));
    // remora's own tests stand on remora's own base when the suite's manifests are absent.
    let own_only = spec.manifests.iter().all(|m| m.starts_with("local:"));
    let (upstream, base) = match manifests_dir() {
        Some(upstream) => {
            let base = upstream.join(BASE_MANIFEST);
            (upstream, base)
        }
        None if own_only => (
            PathBuf::new(),
            Path::new(env!("CARGO_MANIFEST_DIR")).join(OWN_BASE_MANIFEST),
        ),
        None => {
            eprintln!(
                "\n!!! SKIPPED {name}: no {MANIFESTS} above {} (or REMORA_GATEWAY_API_MESH).\n",
                env!("CARGO_MANIFEST_DIR")
            );
            return;
        }
    };
    if !can_run()
        || built("remora-control").is_none()
        || built("remora-proxy").is_none()
        || built("remora-init").is_none()
    {
        return;
    }
    let _turn = Turn::take();
    let world = Arc::new(World::read(&upstream, &base, &spec.manifests));
    let mut outcomes = Outcomes::default();
    let mut logs = Vec::new();
    for (client_index, client) in spec.clients.iter().enumerate() {
        let cluster = Cluster::start(Arc::clone(&world), &client.namespace);
        let mut targets: Vec<(SocketAddr, Protocol)> = Vec::new();
        for (request, protocols) in client
            .cases
            .iter()
            .map(|case| (&case.request, protocols(case)))
            .chain(
                client
                    .splits
                    .iter()
                    .map(|split| (&split.request, vec![split.protocol])),
            )
        {
            for protocol in protocols {
                let warm = if protocol == Protocol::Grpc {
                    Protocol::Grpc
                } else {
                    Protocol::Http1
                };
                if let Ok(target) = world.resolve(&request.host, &client.namespace, protocol) {
                    if !targets.contains(&(target, warm)) {
                        targets.push((target, warm));
                    }
                }
            }
        }
        cluster.warm_up(&targets);
        for (case_index, case) in client.cases.iter().enumerate() {
            for protocol in protocols(case) {
                let key = format!("{name}/{client_index}/{case_index}/{protocol:?}/");
                let found = run_case(&cluster, case, protocol, &key);
                outcomes.record(
                    format!(
                        "{name} [{}] {} ({})",
                        client.namespace,
                        case.name,
                        protocol_name(protocol)
                    ),
                    found,
                );
            }
        }
        for (split_index, split) in client.splits.iter().enumerate() {
            let key = format!("{name}/{client_index}/split{split_index}/");
            let found = run_split(&cluster, split, &key);
            outcomes.record(
                format!(
                    "{name} [{}] split: {} ({})",
                    client.namespace,
                    split.name,
                    protocol_name(split.protocol)
                ),
                found,
            );
        }
        if outcomes.failed > 0 {
            logs.push(format!(
                "client in {} (proxy pid {}):\n{}",
                client.namespace,
                cluster.proxy.pid(),
                cluster.logs()
            ));
        }
    }
    let report = outcomes.lines.join("\n");
    eprintln!("{name}:\n{report}");
    assert!(
        outcomes.failed == 0,
        "{name}: {} of {} case runs failed\n{report}\n{}",
        outcomes.failed,
        outcomes.lines.len(),
        logs.join("\n")
    );
}

fn protocols(case: &Case) -> Vec<Protocol> {
    case.protocols
        .clone()
        .unwrap_or_else(|| vec![Protocol::Http1, Protocol::H2])
}

/// One `#[test]` per test of the suite file, named after it; `TESTS` lists them all.
macro_rules! suite_tests {
    ($($function:ident => $name:literal,)*) => {
        const TESTS: &[&str] = &[$($name),*];
        $(
            #[test]
            fn $function() {
                run($name);
            }
        )*
    };
}

suite_tests! {
    mesh_basic => "MeshBasic",
    harness_without_routes => "HarnessWithoutRoutes",
    mesh_frontend => "MeshFrontend",
    mesh_frontend_hostname => "MeshFrontendHostname",
    mesh_ports => "MeshPorts",
    mesh_consumer_route => "MeshConsumerRoute",
    mesh_traffic_split => "MeshTrafficSplit",
    mesh_httproute_simple_same_namespace => "MeshHTTPRouteSimpleSameNamespace",
    mesh_httproute_matching => "MeshHTTPRouteMatching",
    mesh_httproute_query_param_matching => "MeshHTTPRouteQueryParamMatching",
    mesh_httproute_redirect_host_and_status => "MeshHTTPRouteRedirectHostAndStatus",
    mesh_httproute_redirect_path => "MeshHTTPRouteRedirectPath",
    mesh_httproute_redirect_port => "MeshHTTPRouteRedirectPort",
    mesh_httproute_scheme_redirect => "MeshHTTPRouteSchemeRedirect",
    mesh_httproute_303_redirect => "MeshHTTPRoute303Redirect",
    mesh_httproute_307_redirect => "MeshHTTPRoute307Redirect",
    mesh_httproute_308_redirect => "MeshHTTPRoute308Redirect",
    mesh_httproute_rewrite_path => "MeshHTTPRouteRewritePath",
    mesh_httproute_request_header_modifier => "MeshHTTPRouteRequestHeaderModifier",
    mesh_httproute_backend_request_header_modifier => "MeshHTTPRouteBackendRequestHeaderModifier",
    mesh_httproute_named_rule => "MeshHTTPRouteNamedRule",
    mesh_httproute_weight => "MeshHTTPRouteWeight",
    mesh_grpcroute_weight => "MeshGRPCRouteWeight",
    mesh_grpcroute_request_header_modifier => "MeshGRPCRouteRequestHeaderModifier",
    route_timeouts => "RouteTimeouts",
    route_retries => "RouteRetries",
    route_mirrors => "RouteMirrors",
    route_edges => "RouteEdges",
    service_policy => "ServicePolicy",
}

// ---------------------------------------------------------------------------------------------
// The suite file itself (no root needed).

#[test]
fn the_suite_file_has_a_test_function_for_each_test_and_uses_every_upstream_manifest() {
    let suite = suite();
    let names: BTreeSet<&str> = suite.tests.iter().map(|test| test.name.as_str()).collect();
    assert_eq!(names.len(), suite.tests.len(), "a test name is repeated");
    assert_eq!(names, TESTS.iter().copied().collect::<BTreeSet<_>>());
    for test in &suite.tests {
        assert!(!test.clients.is_empty(), "{}: no client", test.name);
        for client in &test.clients {
            assert!(
                !client.cases.is_empty() || !client.splits.is_empty(),
                "{}: a client with nothing to send",
                test.name
            );
        }
        if !test.needs_routes {
            assert!(
                test.manifests.is_empty(),
                "{}: routes without needing them",
                test.name
            );
        }
    }
    let Some(upstream) = manifests_dir() else {
        eprintln!("\n!!! SKIPPED the manifest check: no {MANIFESTS} here.\n");
        return;
    };
    let used: BTreeSet<PathBuf> = suite
        .tests
        .iter()
        .flat_map(|test| test.manifests.iter())
        .map(|reference| manifest_path(&upstream, reference))
        .collect();
    for path in &used {
        assert!(path.is_file(), "{} is missing", path.display());
    }
    for entry in std::fs::read_dir(upstream.join("tests")).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            used.contains(&path),
            "{} is used by no test of {SUITE_FILE}: a new upstream test to replay",
            path.display()
        );
    }
}

#[test]
fn the_objects_the_harness_writes_are_what_remora_control_reads() {
    use remora_control::index::Index;
    use remora_control::objects::read_file_text;
    let Some(upstream) = manifests_dir() else {
        eprintln!("\n!!! SKIPPED: no {MANIFESTS} here.\n");
        return;
    };
    let world = World::read(
        &upstream,
        &upstream.join(BASE_MANIFEST),
        &["local:data/gateway-extra.yaml".to_string()],
    );
    assert_eq!(world.services.len(), 6, "{:#?}", world.services);
    assert_eq!(world.pods.len(), 6, "{:#?}", world.pods);
    let text = serde_json::to_string(&world.objects()).unwrap();
    let (set, problems) = read_file_text(Path::new("objects.json"), &text);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!((set.http_routes.len(), set.grpc_routes.len()), (4, 1));
    let index = Index::build(&set);
    for service in &world.services {
        for port in &service.ports {
            let target = index
                .lookup(addr(service.cluster_ip, port.port))
                .unwrap_or_else(|| panic!("no target for {}:{}", service.name, port.port));
            assert_eq!(
                (
                    target.service.namespace.as_str(),
                    target.service.name.as_str()
                ),
                (service.namespace.as_str(), service.name.as_str())
            );
            let mut ready: Vec<SocketAddr> = target.endpoints.iter().map(|e| e.addr).collect();
            ready.sort();
            let expected: Vec<SocketAddr> = world
                .pods
                .iter()
                .filter(|pod| World::selects(service, pod))
                .map(|pod| addr(pod.ip, port.target))
                .collect();
            assert_eq!(ready, expected, "{}:{}", service.name, port.port);
            assert!(!expected.is_empty(), "{}: no pod", service.name);
        }
    }
    // The Service `echo` picks both pods of its namespace, not the consumer namespace's.
    let echo = world
        .resolve("echo", MESH_NAMESPACE, Protocol::Http1)
        .unwrap();
    assert_eq!(index.lookup(echo).unwrap().endpoints.len(), 2);
    let pod_names: BTreeSet<&str> = world.pods.iter().map(|pod| pod.name.as_str()).collect();
    assert_eq!(pod_names.len(), world.pods.len(), "pod names repeat");
    let slow = world
        .pods
        .iter()
        .find(|pod| pod.deployment == "mirror-slow")
        .unwrap();
    assert_eq!(
        (slow.delay, slow.status),
        (
            Duration::from_millis(1500),
            StatusCode::INTERNAL_SERVER_ERROR
        )
    );
}

#[test]
fn the_checks_catch_each_way_an_answer_can_be_wrong() {
    let sent = Outgoing {
        target: addr(Ipv4Addr::new(198, 18, 0, 100), 80),
        host: "echo".to_string(),
        method: Method::GET,
        path: "/a?b=c".to_string(),
        headers: Vec::new(),
        body_bytes: 0,
        protocol: Protocol::Http1,
    };
    let expect: Expect = serde_yaml_ng::from_str(
        "{backend: echo-v1, headers: {X-Set: one, X-Add: 'a,b'}, absent_headers: [X-Gone], \
          response_headers: {X-Header-Set: set}, absent_response_headers: [X-Not]}",
    )
    .unwrap();
    let answer = |status: u16, pod: &str, path: &str, host: &str, headers: Value| {
        let mut response_headers = HeaderMap::new();
        response_headers.insert("x-header-set", "set".parse().unwrap());
        Ok(Got {
            status,
            grpc_status: None,
            headers: response_headers,
            report: Some(json!({
                "namespace": MESH_NAMESPACE, "pod": pod, "path": path, "host": host,
                "headers": headers,
            })),
            elapsed: Duration::from_millis(3),
        })
    };
    let good_headers = json!({"x-set": ["one"], "x-add": ["a", "b"]});
    let right = answer(200, "echo-v1-abc", "/a?b=c", "echo", good_headers.clone());
    assert_eq!(
        problems(&expect, &sent, &right, "/a?b=c"),
        Vec::<String>::new()
    );
    let wrong = [
        answer(404, "echo-v1-abc", "/a?b=c", "echo", good_headers.clone()),
        answer(200, "echo-v2-abc", "/a?b=c", "echo", good_headers.clone()),
        answer(200, "echo-v1-abc", "/a", "echo", good_headers.clone()),
        answer(
            200,
            "echo-v1-abc",
            "/a?b=c",
            "echo-v1",
            good_headers.clone(),
        ),
        answer(
            200,
            "echo-v1-abc",
            "/a?b=c",
            "echo",
            json!({"x-set": ["two"], "x-add": ["a", "b"]}),
        ),
        answer(
            200,
            "echo-v1-abc",
            "/a?b=c",
            "echo",
            json!({"x-set": ["one"], "x-add": ["a"]}),
        ),
        answer(
            200,
            "echo-v1-abc",
            "/a?b=c",
            "echo",
            json!({"x-set": ["one"], "x-add": ["a", "b"], "x-gone": ["1"]}),
        ),
        Err("no response".to_string()),
    ];
    for answer in &wrong {
        assert_eq!(
            problems(&expect, &sent, answer, "/a?b=c").len(),
            1,
            "{answer:?}"
        );
    }
    let redirect: Expect =
        serde_yaml_ng::from_str("{status: 302, location: 'http://echo:8083/port'}").unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("location", "http://echo/port".parse().unwrap());
    let moved = Ok(Got {
        status: 302,
        grpc_status: None,
        headers,
        report: None,
        elapsed: Duration::ZERO,
    });
    assert_eq!(problems(&redirect, &sent, &moved, "/port").len(), 1);
}
