//! The `remora-control` binary as a process: its flags, TLS with a certificate rotated under it,
//! the admin endpoints, a malformed `--objects` document, and SIGTERM.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use remora_api::discovery::discovery_client::DiscoveryClient;
use remora_api::discovery::{self as pb, snapshot::Kind};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const BINARY: &str = env!("CARGO_BIN_EXE_remora-control");
const STARTUP: Duration = Duration::from_secs(10);
/// The name the test certificates are issued for.
const SERVER_NAME: &str = "remora-control.test";

const OBJECTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
";

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `remora-control`, killed when dropped; its standard error goes to a file.
struct Process {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `remora-control serve` on fresh loopback ports with `args` added.
    fn start(args: &[&str]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(BINARY)
            .arg("serve")
            .args(["--listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--log-level", "debug"])
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut process = Process {
            child,
            grpc,
            admin,
            log,
            _dir: dir,
        };
        process.until_ready();
        process
    }

    fn until_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("remora-control exited with {status}:\n{}", self.log());
            }
            if get(self.admin, "/ready").is_some_and(|(status, _)| status == 200) {
                return;
            }
            assert!(
                start.elapsed() < STARTUP,
                "not ready within {STARTUP:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits (bounded) for the exit.
    fn stop(&mut self, signal: &str) -> (ExitStatus, Duration) {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, sent.elapsed());
            }
            assert!(
                sent.elapsed() < Duration::from_secs(10),
                "still running 10 s after SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET: the status code and the body, or `None` when nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Runs the binary with `args` to its end: exit code and standard error.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(BINARY)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn objects_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

async fn first_snapshot(channel: Channel, target: &str) -> pb::Snapshot {
    let mut client = DiscoveryClient::new(channel);
    let mut stream = client
        .watch(pb::WatchRequest {
            target: target.into(),
            namespace: "client".into(),
            pod: "client-0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a first snapshot within 5 s")
        .unwrap()
        .expect("a snapshot, not the end")
}

fn service_name(snapshot: &pb::Snapshot) -> &str {
    match &snapshot.kind {
        Some(Kind::Service(service)) => &service.name,
        other => panic!("expected a service snapshot, got {other:?}"),
    }
}

#[test]
fn bad_flags_are_usage_errors_naming_the_flags() {
    // (case, args, expected exit code, words the message must hold)
    let cases: [(&str, &[&str], i32, &[&str]); 14] = [
        (
            "no transport, no CA",
            &["serve", "--objects", "."],
            2,
            &["--tls-cert", "--plaintext", "--ca-cert"],
        ),
        (
            "both transports",
            &["serve", "--plaintext", "--tls-cert", "c", "--tls-key", "k"],
            2,
            &["--plaintext", "excludes"],
        ),
        (
            "a cert without key",
            &["serve", "--tls-cert", "c"],
            2,
            &["--tls-key"],
        ),
        (
            "a key without cert",
            &["serve", "--tls-key", "k"],
            2,
            &["--tls-cert"],
        ),
        (
            "a listen address without port",
            &["serve", "--plaintext", "--listen", "0.0.0.0"],
            2,
            &["--listen", "0.0.0.0"],
        ),
        (
            "an unknown log format",
            &["serve", "--plaintext", "--log-format", "xml"],
            2,
            &["--log-format", "json", "plain"],
        ),
        (
            "a CA certificate without its key",
            &["serve", "--plaintext", "--ca-cert", "ca.crt"],
            2,
            &["--ca-key"],
        ),
        (
            "a CA key without its certificate",
            &["serve", "--plaintext", "--ca-key", "ca.key"],
            2,
            &["--ca-cert"],
        ),
        (
            "a lifetime that is no duration",
            &["serve", "--plaintext", "--identity-lifetime", "a day"],
            2,
            &["--identity-lifetime", "a day", "24h"],
        ),
        (
            "a lifetime too short",
            &["serve", "--plaintext", "--identity-lifetime", "1s"],
            2,
            &["--identity-lifetime", "10s"],
        ),
        (
            "a trust domain that is none",
            &["serve", "--plaintext", "--trust-domain", "Cluster/Local"],
            2,
            &["--trust-domain", "Cluster/Local", "cluster.local"],
        ),
        (
            "a token file that is not there",
            &[
                "serve",
                "--plaintext",
                "--objects",
                ".",
                "--identity-tokens",
                "/nonexistent/tokens.csv",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            1,
            &["/nonexistent/tokens.csv"],
        ),
        (
            "CA files that are not there",
            &[
                "serve",
                "--plaintext",
                "--objects",
                ".",
                "--ca-cert",
                "/nonexistent/ca.crt",
                "--ca-key",
                "/nonexistent/ca.key",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            1,
            &["/nonexistent/ca.crt"],
        ),
        (
            "a log level that is none",
            &["serve", "--plaintext", "--log-level", "loud"],
            1,
            &["--log-level", "loud", "debug"],
        ),
    ];
    for (case, args, code, words) in cases {
        let (got, stderr) = run(args);
        assert_eq!(got, Some(code), "{case}: {stderr}");
        for word in words {
            assert!(stderr.contains(word), "{case}: {word:?} not in {stderr}");
        }
    }
}

#[test]
fn missing_certificate_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let (code, stderr) = run(&[
        "serve",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--objects",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("tls.crt"), "{stderr}");
}

#[test]
fn help_describes_serve() {
    let (code, _) = run(&["serve", "--help"]);
    assert_eq!(code, Some(0));
    let output = Command::new(BINARY)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--admin-listen",
        "--tls-cert",
        "--tls-key",
        "--plaintext",
        "--objects",
        "--log-level",
        "--log-format",
        "--ca-cert",
        "--ca-key",
        "--identity-tokens",
        "--identity-lifetime",
        "--trust-domain",
        "remora-identity-ca",
        "remora.identity.v1",
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
}

#[tokio::test]
async fn admin_endpoints_a_malformed_document_and_sigterm() {
    let dir = objects_dir(&[
        ("good.yaml", OBJECTS),
        (
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: x}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n---\nkind: [\n",
        ),
    ]);
    let mut process = Process::start(&["--plaintext", "--objects", dir.path().to_str().unwrap()]);

    let log = process.log();
    let named = log.lines().any(|line| {
        line.contains("bad.yaml") && line.contains("document 2") && line.contains("WARN")
    });
    assert!(named, "no warning naming bad.yaml, document 2 in:\n{log}");

    assert_eq!(get(process.admin, "/live").map(|r| r.0), Some(200));
    assert_eq!(get(process.admin, "/ready").map(|r| r.0), Some(200));

    let channel = Endpoint::from_shared(format!("http://{}", process.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // The objects of both files are served, the good document of the bad file included.
    let web = first_snapshot(channel.clone(), "10.96.0.10:80").await;
    assert_eq!(service_name(&web), "web");
    let ok = first_snapshot(channel.clone(), "10.96.0.11:80").await;
    assert_eq!(service_name(&ok), "ok");

    let (status, metrics) = get(process.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in [
        "remora_control_objects{kind=\"Service\"} 2",
        "remora_control_objects{kind=\"EndpointSlice\"} 1",
        "remora_control_snapshots_sent_total 2",
        "remora_control_push_duration_seconds_count 0",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // The streams were dropped with their calls; the channel is still open.
    let start = Instant::now();
    loop {
        let metrics = get(process.admin, "/metrics").unwrap().1;
        if metrics.contains("remora_control_watches 0") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM with a stream open: exit 0, promptly.
    let mut client = DiscoveryClient::new(channel);
    let _open = client
        .watch(pb::WatchRequest {
            target: "10.96.0.10:80".into(),
            ..pb::WatchRequest::default()
        })
        .await
        .unwrap();
    let (status, took) = process.stop("TERM");
    assert!(status.success(), "{status}:\n{}", process.log());
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn sigint_exits_zero() {
    let dir = objects_dir(&[("good.yaml", OBJECTS)]);
    let mut process = Process::start(&["--plaintext", "--objects", dir.path().to_str().unwrap()]);
    let (status, _) = process.stop("INT");
    assert!(status.success(), "{status}");
}

/// A CA and a server certificate for [`SERVER_NAME`] it signed, as PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki(ca_name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![SERVER_NAME.to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn write_pair(dir: &Path, pki: &Pki) {
    // Key first, then certificate: the server may see a mismatched pair for a moment, which it
    // must ride out with the old one.
    fs::write(dir.join("tls.key.tmp"), &pki.key).unwrap();
    fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key")).unwrap();
    fs::write(dir.join("tls.crt.tmp"), &pki.cert).unwrap();
    fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt")).unwrap();
}

async fn tls_channel(addr: SocketAddr, ca: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(SERVER_NAME),
        )?
        .connect()
        .await
}

#[tokio::test]
async fn tls_verified_by_the_ca_and_a_rotated_certificate_served_to_new_connections() {
    let certs = tempfile::tempdir().unwrap();
    let first = pki("first CA");
    write_pair(certs.path(), &first);
    let objects = objects_dir(&[("good.yaml", OBJECTS)]);
    let cert = certs.path().join("tls.crt");
    let key = certs.path().join("tls.key");
    let process = Process::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--objects",
        objects.path().to_str().unwrap(),
    ]);

    let channel = tls_channel(process.grpc, &first.ca).await.unwrap();
    let mut client = DiscoveryClient::new(channel);
    let mut open = client
        .watch(pb::WatchRequest {
            target: "10.96.0.10:80".into(),
            ..pb::WatchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = tokio::time::timeout(Duration::from_secs(5), open.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(service_name(&snapshot), "web");

    // Plaintext HTTP/2 on the TLS port gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", process.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = DiscoveryClient::new(plain)
        .watch(pb::WatchRequest {
            target: "10.96.0.10:80".into(),
            ..pb::WatchRequest::default()
        })
        .await;
    assert!(refused.is_err(), "plaintext served on the TLS port");
    // A client trusting another CA is refused.
    let stranger = pki("a stranger's CA");
    assert!(tls_channel(process.grpc, &stranger.ca).await.is_err());

    // Rotate to a certificate from a second CA: new connections get it within the reload
    // interval (1 s) plus slack.
    let second = pki("second CA");
    write_pair(certs.path(), &second);
    let start = Instant::now();
    let rotated = loop {
        if let Ok(channel) = tls_channel(process.grpc, &second.ca).await {
            break channel;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the new certificate was not served within 5 s:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        service_name(&first_snapshot(rotated, "10.96.0.10:80").await),
        "web"
    );
    // The old CA no longer verifies new connections.
    assert!(tls_channel(process.grpc, &first.ca).await.is_err());
    // The stream opened before the rotation is still there.
    let still = tokio::time::timeout(Duration::from_millis(300), open.message()).await;
    assert!(
        still.is_err(),
        "the old stream ended or got data: {still:?}"
    );
}

#[tokio::test]
async fn a_bad_policy_annotation_is_logged_once_and_the_rest_of_the_service_is_served() {
    let annotated = OBJECTS.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata:\n  name: web\n  namespace: shop\n  annotations:\n    remora.io/retry-attempts: lots\n    remora.io/timeout: 2s",
    );
    let dir = objects_dir(&[("web.yaml", &annotated)]);
    let mut process = Process::start(&["--plaintext", "--objects", dir.path().to_str().unwrap()]);
    let channel = Endpoint::from_shared(format!("http://{}", process.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let web = first_snapshot(channel.clone(), "10.96.0.10:80").await;
    let Some(Kind::Service(service)) = &web.kind else {
        panic!("expected a service snapshot, got {web:?}");
    };
    assert_eq!(service.endpoints.len(), 1);
    // The good annotation applies; the bad one has its default.
    let policy = service.policy.as_ref().unwrap();
    assert_eq!(policy.timeout_ms, 2_000);
    assert_eq!(policy.retry.as_ref().unwrap().attempts, 2);

    let bad_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("remora.io/retry-attempts"))
            .map(str::to_string)
            .collect()
    };
    let log = process.log();
    let lines = bad_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    for part in ["WARN", "shop/web", "lots", "a whole number of retries"] {
        assert!(lines[0].contains(part), "{part} not in {}", lines[0]);
    }

    // Another Service appears: the index is built again, the bad value is not logged again.
    fs::write(
        dir.path().join("more.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: more, namespace: x}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let start = Instant::now();
    loop {
        let snapshot = first_snapshot(channel.clone(), "10.96.0.12:80").await;
        if matches!(snapshot.kind, Some(Kind::Service(_))) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{snapshot:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // web edited but not its annotations (a label added): a new object, the same policy.
    let labelled = annotated.replace(
        "  namespace: shop\n",
        "  namespace: shop\n  labels: {tier: front}\n",
    );
    assert_ne!(labelled, annotated);
    fs::write(dir.path().join("web.yaml"), labelled).unwrap();
    let start = Instant::now();
    while process.log().matches("index built").count() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the index was not rebuilt:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = process.log();
    assert_eq!(bad_lines(&log).len(), 1, "{log}");
    let (status, _) = process.stop("TERM");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn without_a_cluster_certificates_come_from_the_token_file_and_the_ca_files() {
    use remora_api::identity::identity_client::IdentityClient;
    use remora_api::identity::CertifyRequest;

    let dir = objects_dir(&[("objects.yaml", OBJECTS)]);
    let ca = {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test identity CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert, key)
    };
    let secrets = tempfile::tempdir().unwrap();
    let (ca_cert, ca_key, tokens) = (
        secrets.path().join("ca.crt"),
        secrets.path().join("ca.key"),
        secrets.path().join("tokens.csv"),
    );
    fs::write(&ca_cert, ca.0.pem()).unwrap();
    fs::write(&ca_key, ca.1.serialize_pem()).unwrap();
    fs::write(&tokens, "t-web,system:serviceaccount:shop:web,1\n").unwrap();
    let process = Process::start(&[
        "--plaintext",
        "--objects",
        dir.path().to_str().unwrap(),
        "--ca-cert",
        ca_cert.to_str().unwrap(),
        "--ca-key",
        ca_key.to_str().unwrap(),
        "--identity-tokens",
        tokens.to_str().unwrap(),
        "--identity-lifetime",
        "60s",
        "--trust-domain",
        "example.org",
    ]);
    let channel = Endpoint::from_shared(format!("http://{}", process.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(vec!["other.example".to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let answer = IdentityClient::new(channel)
        .certify(CertifyRequest {
            token: "t-web".into(),
            csr: csr.der().to_vec(),
            namespace: "shop".into(),
            pod: "web-0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.identity, "spiffe://example.org/ns/shop/sa/web");
    assert_eq!(answer.trust_anchors, vec![ca.0.der().to_vec()]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let left = answer.expires_unix_seconds - now;
    assert!((50..=61).contains(&left), "{left} s left");
    let log = process.log();
    assert!(
        log.contains("issued a workload certificate") && log.contains("web-0"),
        "{log}"
    );
    let (_, metrics) = get(process.admin, "/metrics").unwrap();
    assert!(
        metrics.contains("remora_control_certificates_issued_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn without_tls_files_the_identity_ca_issues_the_serving_certificate() {
    let dir = objects_dir(&[("objects.yaml", OBJECTS)]);
    let secrets = tempfile::tempdir().unwrap();
    let new_ca = || {
        remora_control::identity::ca::Ca::generate(
            "cluster.local",
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap()
    };
    let (issuer_pem, issuer_key) = new_ca();
    let (ca_cert, ca_key) = (secrets.path().join("ca.crt"), secrets.path().join("ca.key"));
    fs::write(&ca_cert, &issuer_pem).unwrap();
    fs::write(&ca_key, &issuer_key).unwrap();
    let process = Process::start(&[
        "--objects",
        dir.path().to_str().unwrap(),
        "--ca-cert",
        ca_cert.to_str().unwrap(),
        "--ca-key",
        ca_key.to_str().unwrap(),
    ]);
    let connect = |domain: &'static str, ca: String| async move {
        Endpoint::from_shared(format!("https://{}", process.grpc))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(domain),
            )
            .unwrap()
            .connect()
            .await
    };
    // Verified by the identity CA, for the name proxies dial.
    let channel = connect("remora-control.remora-system.svc", issuer_pem.clone())
        .await
        .unwrap();
    let web = first_snapshot(channel, "10.96.0.10:80").await;
    assert_eq!(service_name(&web), "web");
    // Not for another name, and not by another CA.
    let (other_pem, _) = new_ca();
    assert!(connect("remora-control.remora-system.svc", other_pem)
        .await
        .is_err());
    assert!(connect("elsewhere.example", issuer_pem.clone())
        .await
        .is_err());
}
