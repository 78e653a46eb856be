//! mTLS between two meshed pods, end to end: remora-control signs each proxy's certificate (its
//! CA from files, tokens from `--identity-tokens`) and tells the client's proxy that the Service's
//! endpoint is a meshed pod and as whom; the client pod's proxy talks TLS to the server pod's
//! proxy, which terminates it and hands the app plaintext. tcpdump on the veth between them
//! shows what crosses the wire.
//!
//! The client pod (namespace `storefront`, ServiceAccount `web`) is `Pod::pod`, with
//! remora-control on its 8090 (kept out of its inbound rules, so the server pod's proxy reaches it
//! directly). The server pod (`shop`, `echo`) is `Pod::remote`, with its own remora-init rules and
//! proxy; its app answers on 198.18.0.2:8080. On 198.18.0.3:8081 (excluded from the server pod's
//! inbound rules) an app no proxy stands in front of: an unmeshed destination. Each test skips,
//! loudly, when a binary has not been built.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use remora_e2e::echo::{Backend, Echo};
use remora_e2e::*;

/// The meshed Service `shop/echo` (endpoint 198.18.0.2:8080) and the unmeshed `shop/plain`
/// (endpoint 198.18.0.3:8081): ClusterIPs no host has.
const ECHO_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const PLAIN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
const APP_PORT: u16 = 8080;
const PLAIN_PORT: u16 = 8081;
/// Another port of the server pod's app: no probe on it.
const OTHER_PORT: u16 = 8083;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/storefront/sa/web";

/// Bytes that only the application sends: in the request (path and header) and in the answer
/// (the echo server's name is its body).
const REQUEST_MARK: &str = "herring-request-5d1e";
const ANSWER_MARK: &str = "mackerel-answer-77c0";

const METRICS: &str = "http://127.0.0.1:15020/metrics";

/// How the server pod's proxy is run, and as whom it is known.
#[derive(Debug, Clone)]
struct Server {
    /// The ServiceAccount its token names (the objects always say `echo`).
    service_account: &'static str,
    args: Vec<&'static str>,
    /// remora-control's `--identity-lifetime` (its default, 24 h, when `None`).
    lifetime: Option<&'static str>,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            service_account: "echo",
            args: Vec::new(),
            lifetime: None,
        }
    }
}

/// Two meshed pods, the control plane, and the apps.
struct Mesh {
    // Field order: processes before the namespaces.
    _control: Proc,
    client_proxy: Proc,
    server_proxy: Proc,
    _apps: Vec<Backend>,
    dir: PathBuf,
    pod: Pod,
}

/// A CA's certificate and key, PEM files in `dir`.
fn write_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// The objects remora-control reads: both Services, their slices, both pods (meshed, with the
/// identity the injector would have written into `remora.io/status`).
fn objects() -> String {
    let service = |name: &str, ip: Ipv4Addr, target: u16, endpoint: Ipv4Addr, pod: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  clusterIP: {ip}
  clusterIPs: [\"{ip}\"]
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: {target}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: {target}}}]
endpoints:
- addresses: [\"{endpoint}\"]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, namespace: shop, name: {pod}}}
---
"
        )
    };
    let pod = |namespace: &str, name: &str, sa: &str, ip: Ipv4Addr| {
        format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  annotations:
    remora.io/status: '{{\"version\":\"test\",\"identity\":\"spiffe://cluster.local/ns/{namespace}/sa/{sa}\"}}'
spec:
  serviceAccountName: {sa}
  containers: [{{name: app, image: app}}]
status:
  podIP: \"{ip}\"
  podIPs: [{{ip: \"{ip}\"}}]
---
"
        )
    };
    [
        service("echo", ECHO_IP, APP_PORT, REMOTE_V4, "echo-0"),
        service("plain", PLAIN_IP, PLAIN_PORT, REMOTE2_V4, "plain-0"),
        pod("shop", "echo-0", "echo", REMOTE_V4),
        pod("storefront", "web-0", "web", POD_V4),
    ]
    .concat()
}

impl Mesh {
    fn start(server: Server) -> Option<Self> {
        if !can_run() {
            return None;
        }
        let control_bin = built("remora-control")?;
        let proxy_bin = built("remora-proxy")?;
        let init_bin = built("remora-init")?;
        let pod = Pod::new().expect("building the pods");
        let dir = std::env::temp_dir().join(format!("{}-mtls", pod.pod.name()));
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        std::fs::write(dir.join("objects/mesh.yaml"), objects()).unwrap();
        let (ca_cert, ca_key) = write_ca(&dir, "mesh-ca");
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "tok-web,system:serviceaccount:storefront:web,uid-web\n\
                 tok-server,system:serviceaccount:shop:{},uid-server\n",
                server.service_account
            ),
        )
        .unwrap();
        for (name, token) in [("web.token", "tok-web"), ("server.token", "tok-server")] {
            std::fs::write(dir.join(name), token).unwrap();
        }
        // The proxies run as 1337 and read their token files.
        run(std::process::Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir))
        .unwrap();

        let init = |ns: &NetNs, args: &[&str]| {
            let out = ns.command(&init_bin).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "remora-init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        init(&pod.pod, &["--exclude-inbound-ports", "8090"]);
        init(&pod.remote, &["--exclude-inbound-ports", "8081"]);

        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let control = Proc::spawn(
            pod.pod
                .command(&control_bin)
                .arg("serve")
                .args(["--plaintext", "--log-format", "plain"])
                .arg("--objects")
                .arg(dir.join("objects"))
                .args([
                    "--listen",
                    "0.0.0.0:8090",
                    "--admin-listen",
                    "127.0.0.1:9990",
                ])
                .arg("--ca-cert")
                .arg(&ca_cert)
                .arg("--ca-key")
                .arg(&ca_key)
                .arg("--identity-tokens")
                .arg(dir.join("tokens.csv"))
                .args(
                    server
                        .lifetime
                        .map(|lifetime| ["--identity-lifetime", lifetime])
                        .iter()
                        .flatten(),
                )
                .stdout(Stdio::null())
                .stderr(log("control.log")),
        )
        .expect("spawning remora-control");
        let apps = vec![
            Backend::start(
                &pod.remote,
                addr(REMOTE_V4, APP_PORT),
                Echo::new(ANSWER_MARK, Duration::ZERO),
            )
            .unwrap(),
            Backend::start(
                &pod.remote,
                addr(REMOTE2_V4, PLAIN_PORT),
                Echo::new(ANSWER_MARK, Duration::ZERO),
            )
            .unwrap(),
            Backend::start(
                &pod.remote,
                addr(REMOTE_V4, OTHER_PORT),
                Echo::new(ANSWER_MARK, Duration::ZERO),
            )
            .unwrap(),
        ];
        let proxy = |ns: &NetNs,
                     control: &str,
                     namespace: &str,
                     name: &str,
                     token: &str,
                     extra: &[&str],
                     log_name: &str| {
            Proc::spawn(
                ns.command_as(PROXY_UID, PROXY_UID, &proxy_bin)
                    .env("POD_NAMESPACE", namespace)
                    .env("POD_NAME", name)
                    .args(["--log-format", "plain"])
                    .args(["--control", control, "--control-plaintext"])
                    .arg("--identity-token")
                    .arg(dir.join(token))
                    .args(extra)
                    .stdout(Stdio::null())
                    .stderr(log(log_name)),
            )
            .expect("spawning remora-proxy")
        };
        let client_proxy = proxy(
            &pod.pod,
            "127.0.0.1:8090",
            "storefront",
            "web-0",
            "web.token",
            &[],
            "client-proxy.log",
        );
        let server_proxy = proxy(
            &pod.remote,
            "198.18.0.1:8090",
            "shop",
            "echo-0",
            "server.token",
            &server.args,
            "server-proxy.log",
        );
        let mesh = Self {
            _control: control,
            client_proxy,
            server_proxy,
            _apps: apps,
            dir,
            pod,
        };
        for ns in [&mesh.pod.pod, &mesh.pod.remote] {
            assert!(
                wait_until(Duration::from_secs(15), || {
                    series_value(
                        &mesh.metrics(ns),
                        "remora_proxy_identity_expiration_timestamp_seconds",
                    ) > 0.0
                }),
                "a proxy never got its certificate\n{}",
                mesh.logs()
            );
        }
        Some(mesh)
    }

    fn metrics(&self, ns: &NetNs) -> String {
        String::from_utf8_lossy(&curl(ns, &[METRICS]).stdout).into_owned()
    }

    fn logs(&self) -> String {
        ["control.log", "client-proxy.log", "server-proxy.log"]
            .iter()
            .map(|name| {
                format!(
                    "--- {name} ---\n{}\n",
                    std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
                )
            })
            .collect()
    }

    /// A request from the client pod's app (through its proxy), with the marks in it: the status
    /// and body, `None` when nothing answered.
    fn request(&self, target: SocketAddr, http2: bool) -> Option<(u16, String)> {
        let url = format!("http://{target}/{REQUEST_MARK}");
        let mut args = vec!["-H", "x-mark: herring-request-5d1e", "-w", "\n%{http_code}"];
        if http2 {
            args.push("--http2-prior-knowledge");
        }
        args.push(&url);
        answer(curl(&self.pod.pod, &args))
    }

    /// A plaintext request straight to the server pod's app address from the client pod, as uid
    /// 1337 (whose traffic the client pod's rules leave alone): no proxy of ours originates TLS.
    fn plaintext_request(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let url = format!("http://{REMOTE_V4}:{port}{path}");
        let out = self
            .pod
            .pod
            .command_as(PROXY_UID, PROXY_UID, "curl")
            .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", &url])
            .stdin(Stdio::null())
            .output()
            .expect("spawning curl");
        answer(out)
    }

    fn assert_alive(&mut self) {
        for (name, proc) in [
            ("client", &mut self.client_proxy),
            ("server", &mut self.server_proxy),
        ] {
            let exited = proc.child.try_wait().unwrap();
            assert!(exited.is_none(), "the {name} proxy exited: {exited:?}");
        }
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

/// curl's `-w "\n%{http_code}"` output as (status, body); `None` when nothing answered.
fn answer(out: Output) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n')?;
    let code: u16 = code.trim().parse().ok()?;
    (code != 0).then(|| (code, body.to_string()))
}

/// tcpdump on the server pod's end of the veth, writing raw packets to a file until dropped.
struct Capture {
    proc: Option<Proc>,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &NetNs, file: PathBuf) -> Self {
        let log = file.with_extension("log");
        let proc = Proc::spawn(
            ns.command("tcpdump")
                // Packets written as they come (without --immediate-mode, tcpdump here wrote none
                // before it was stopped), and as root, into the test's own directory.
                .args([
                    "-i",
                    "eth0",
                    "--immediate-mode",
                    "-U",
                    "-Z",
                    "root",
                    "-n",
                    "-s",
                    "0",
                ])
                .arg("-w")
                .arg(&file)
                .arg("tcp")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        )
        .expect("spawning tcpdump (scripts/install-deps.sh test installs it)");
        assert!(
            wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")),
            "tcpdump never started: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            proc: Some(proc),
            file,
        }
    }

    /// Everything captured, once the file holds what `expected` looks for and has stopped
    /// growing for half a second (at most 10 s), then tcpdump is stopped so the file is whole.
    /// Stopping it at once could lose packets still queued for it on a busy machine.
    fn bytes(mut self, expected: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut seen = (0, Instant::now());
        wait_until(Duration::from_secs(10), || {
            let wire = std::fs::read(&self.file).unwrap_or_default();
            if wire.len() != seen.0 {
                seen = (wire.len(), Instant::now());
            }
            expected(&wire) && seen.1.elapsed() >= Duration::from_millis(500)
        });
        if let Some(proc) = self.proc.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(proc.pid()),
                nix::sys::signal::Signal::SIGINT,
            );
            std::thread::sleep(Duration::from_millis(300));
            drop(proc);
        }
        std::fs::read(&self.file).unwrap_or_default()
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn between_meshed_pods_no_application_byte_crosses_the_wire_in_clear() {
    let Some(mut mesh) = Mesh::start(Server::default()) else {
        return;
    };
    let capture = Capture::start(&mesh.pod.remote, mesh.dir.join("meshed.pcap"));
    for http2 in [false, true] {
        let got = mesh.request(addr(ECHO_IP, 80), http2);
        let (code, body) =
            got.unwrap_or_else(|| panic!("no answer (h2: {http2})\n{}", mesh.logs()));
        assert_eq!(code, 200, "h2: {http2}: {body}\n{}", mesh.logs());
        assert!(body.contains(ANSWER_MARK), "{body}");
    }
    let wire = capture.bytes(|wire| wire.len() > 1000);
    assert!(
        wire.len() > 1000,
        "the capture saw the traffic: {} bytes",
        wire.len()
    );
    for mark in [REQUEST_MARK, ANSWER_MARK] {
        assert!(!contains(&wire, mark), "{mark} crossed the wire in clear");
    }

    // The server pod's proxy says who called, over TLS; the client's says it used TLS.
    let server = mesh.metrics(&mesh.pod.remote);
    assert!(
        server
            .lines()
            .any(|line| line.contains(&format!("client_id=\"{CLIENT_ID}\""))
                && line.contains("tls=\"true\"")
                && !line.starts_with('#')),
        "no inbound series names the client's identity over TLS:\n{server}"
    );
    let client = mesh.metrics(&mesh.pod.pod);
    assert!(
        client
            .lines()
            .any(|line| line.contains("direction=\"outbound\"") && line.contains("tls=\"true\"")),
        "no outbound series says TLS:\n{client}"
    );

    // To an unmeshed destination: plaintext, as before, and the capture shows it.
    let capture = Capture::start(&mesh.pod.remote, mesh.dir.join("plain.pcap"));
    let (code, body) = mesh.request(addr(PLAIN_IP, 80), false).expect("no answer");
    assert_eq!(code, 200, "{body}");
    let wire = capture.bytes(|wire| {
        [REQUEST_MARK, ANSWER_MARK]
            .iter()
            .all(|mark| contains(wire, mark))
    });
    for mark in [REQUEST_MARK, ANSWER_MARK] {
        assert!(
            contains(&wire, mark),
            "{mark} did not cross in clear to the unmeshed app"
        );
    }
    mesh.assert_alive();
}

#[test]
fn a_pod_that_presents_another_identity_is_refused() {
    // The control plane says shop/echo-0 is `echo`; its proxy's token names `impostor`, so its
    // certificate does too. The client's proxy refuses it: 502, and the app never sees a byte.
    let Some(mut mesh) = Mesh::start(Server {
        service_account: "impostor",
        ..Server::default()
    }) else {
        return;
    };
    let (code, body) = mesh.request(addr(ECHO_IP, 80), false).expect("no answer");
    assert_eq!(code, 502, "{body}\n{}", mesh.logs());
    mesh.assert_alive();
}

#[test]
fn a_strict_pod_refuses_plaintext_but_answers_its_probes_and_allow_from_decides() {
    let Some(mut mesh) = Mesh::start(Server {
        args: vec![
            "--inbound-mtls",
            "strict",
            "--inbound-probes",
            "8080:/healthz",
            "--allow-from",
            "storefront/web",
        ],
        ..Server::default()
    }) else {
        return;
    };
    // The meshed client, allowed.
    let (code, body) = mesh.request(addr(ECHO_IP, 80), false).expect("no answer");
    assert_eq!(code, 200, "{body}\n{}", mesh.logs());
    // Plaintext: refused — the connection reset on a port without probes; on the probe's port,
    // any other path answered 403 by the proxy, never by the app — but for the kubelet's probe
    // and the admin port.
    assert_eq!(
        mesh.plaintext_request(OTHER_PORT, "/"),
        None,
        "{}",
        mesh.logs()
    );
    let (code, body) = mesh
        .plaintext_request(APP_PORT, "/other")
        .expect("no answer on the probe's port");
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains(ANSWER_MARK), "the app answered: {body}");
    let (code, body) = mesh
        .plaintext_request(APP_PORT, "/healthz")
        .expect("the probe got no answer");
    assert_eq!(code, 200);
    assert!(body.contains(ANSWER_MARK), "{body}");
    let admin = curl(
        &mesh.pod.pod,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://198.18.0.2:15020/ready",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&admin.stdout), "200");
    mesh.assert_alive();
    drop(mesh);

    // The same pod allowing only another namespace: the meshed client gets 403.
    let Some(mut mesh) = Mesh::start(Server {
        args: vec!["--inbound-mtls", "strict", "--allow-from", "payments/*"],
        ..Server::default()
    }) else {
        return;
    };
    let (code, body) = mesh.request(addr(ECHO_IP, 80), false).expect("no answer");
    assert_eq!(code, 403, "{body}\n{}", mesh.logs());
    mesh.assert_alive();
}

#[test]
fn connections_keep_working_while_certificates_are_renewed() {
    // 12 s certificates (remora-control's shortest is 10 s): each proxy renews at about 8.4 s,
    // so 20 s of requests cross at least one renewal on both sides.
    let Some(mut mesh) = Mesh::start(Server {
        lifetime: Some("12s"),
        ..Server::default()
    }) else {
        return;
    };
    let expiry = |mesh: &Mesh, ns: &NetNs| {
        series_value(
            &mesh.metrics(ns),
            "remora_proxy_identity_expiration_timestamp_seconds",
        )
    };
    let first = [
        expiry(&mesh, &mesh.pod.pod),
        expiry(&mesh, &mesh.pod.remote),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut answered, mut failed) = (0, Vec::new());
    while Instant::now() < deadline {
        // One request on a new client connection; the proxies reuse their upstream
        // connection when it is still there, and make a new one (with the newest certificate)
        // when not.
        match mesh.request(addr(ECHO_IP, 80), answered % 2 == 1) {
            Some((200, _)) => answered += 1,
            other => failed.push(other),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = [
        expiry(&mesh, &mesh.pod.pod),
        expiry(&mesh, &mesh.pod.remote),
    ];
    println!(
        "RESULT rotation: {answered} answered, {} failed; expiry {first:?} -> {last:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}\n{}", mesh.logs());
    assert!(answered >= 40, "only {answered} requests in 20 s");
    for (before, after) in first.iter().zip(&last) {
        assert!(
            after > before,
            "no renewal: expiry {before} -> {after}\n{}",
            mesh.logs()
        );
    }
    mesh.assert_alive();
}
