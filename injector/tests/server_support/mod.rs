//! Test harness for the HTTPS webhook: certificates, an in-process server on 127.0.0.1:0, a TLS client.
#![allow(dead_code)] // Each test file uses its own subset.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_injector::config::ConfigArgs;
use remora_injector::metrics::Metrics;
use remora_injector::server::{Server, Timeouts};
use remora_injector::tls::{CertReloader, CertResolver, TlsFiles};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Every test runs under this bound, so a hang fails instead of stalling the suite.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);

/// How often the test server re-reads its certificate files.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(100);

/// A fresh CA and a serving certificate for `localhost` / 127.0.0.1 signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(ca_name: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");

        let key = rcgen::KeyPair::generate().expect("server key");
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        }
    }
}

/// Lays the certificate out the way the kubelet mounts a Secret: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<generation>/`, and an update swaps the `..data` symlink in one rename.
pub struct SecretDir {
    pub dir: PathBuf,
    generation: u32,
}

impl SecretDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            generation: 0,
        }
    }

    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join("tls.crt"),
            key: self.dir.join("tls.key"),
        }
    }

    pub fn write(&mut self, cert_pem: &str, key_pem: &str) {
        self.generation += 1;
        let version = format!("..gen_{}", self.generation);
        let version_dir = self.dir.join(&version);
        std::fs::create_dir(&version_dir).expect("create version dir");
        std::fs::write(version_dir.join("tls.crt"), cert_pem).expect("write tls.crt");
        std::fs::write(version_dir.join("tls.key"), key_pem).expect("write tls.key");
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staged).expect("symlink ..data_tmp");
        std::fs::rename(&staged, self.dir.join("..data")).expect("swap ..data");
        for name in ["tls.crt", "tls.key"] {
            let link = self.dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("symlink");
            }
        }
    }

    pub fn write_pki(&mut self, pki: &Pki) {
        self.write(&pki.cert_pem, &pki.key_pem);
    }
}

/// The injector defaults exactly as `serve` gets them with no flags.
pub fn default_config() -> remora_injector::config::Config {
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        config: ConfigArgs,
    }
    Flags::parse_from(["remora-injector"])
        .config
        .load()
        .expect("default config")
}

/// The webhook running in this process on an ephemeral loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub secret: SecretDir,
    _dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    reloader: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(pki: Option<&Pki>, timeouts: Timeouts) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut secret = SecretDir::new(dir.path());
        if let Some(pki) = pki {
            secret.write_pki(pki);
        }
        let metrics = Arc::new(Metrics::new());
        let certs = Arc::new(CertResolver::default());
        let mut reloader = CertReloader::new(secret.files(), certs.clone())
            .with_observer(metrics.reload_observer());
        reloader.poll_and_log(true);
        let reloader = tokio::spawn(reloader.run(RELOAD_INTERVAL));

        let server = Server::new(default_config(), certs, metrics.clone())
            .expect("server")
            .with_timeouts(timeouts);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(listener, async {
            let _ = stop.await;
        }));
        Self {
            addr,
            metrics,
            secret,
            _dir: dir,
            shutdown: Some(shutdown),
            server,
            reloader,
        }
    }

    /// Signals shutdown and waits (bounded) for the server to finish draining.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), &mut self.server)
            .await
            .expect("server stops within the drain timeout")
            .expect("server task did not panic");
        self.reloader.abort();
    }

    pub fn join_handle(&mut self) -> &mut JoinHandle<()> {
        &mut self.server
    }

    pub fn signal_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.abort();
        self.reloader.abort();
    }
}

/// Which HTTP version a client connection speaks (chosen by ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// A TLS client that trusts one CA.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    connector: TlsConnector,
    version: Version,
}

/// An HTTP connection over TLS; requests on it reuse the connection (keep-alive).
pub enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A response with its whole body.
pub struct Answer {
    pub status: hyper::StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "response is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub fn new(addr: SocketAddr, ca_pem: &str, version: Version) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // Every handshake a full one: a resumed session presents no certificate, and the tests
        // look at the certificate the server presents now.
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = match version {
            Version::Http1 => vec![b"http/1.1".to_vec()],
            Version::Http2 => vec![b"h2".to_vec()],
        };
        Self {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
            version,
        }
    }

    /// A TLS handshake with the server, returning the stream and the certificate it presented.
    pub async fn handshake(
        &self,
    ) -> std::io::Result<(TlsStream<TcpStream>, CertificateDer<'static>)> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = tokio::time::timeout(Duration::from_secs(5), self.connector.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .cloned()
            .ok_or_else(|| std::io::Error::other("no peer certificate"))?;
        Ok((tls, presented))
    }

    pub async fn connect(&self) -> Conn {
        let (tls, _) = self.handshake().await.expect("TLS handshake");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        match self.version {
            Version::Http1 => {
                assert_eq!(negotiated.as_deref(), Some(&b"http/1.1"[..]));
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("HTTP/1 handshake");
                tokio::spawn(conn);
                Conn::Http1(send)
            }
            Version::Http2 => {
                assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]));
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("HTTP/2 handshake");
                tokio::spawn(conn);
                Conn::Http2(send)
            }
        }
    }

    /// One request on a new connection.
    pub async fn request(&self, method: Method, path: &str, body: impl Into<Bytes>) -> Answer {
        self.connect().await.request(method, path, body).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Answer {
        self.request(Method::POST, path, body).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, Bytes::new()).await
    }
}

impl Conn {
    pub async fn try_request(
        &mut self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> hyper::Result<Answer> {
        let body = body.into();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header("content-type", "application/json");
        if matches!(self, Conn::Http1(_)) {
            request = request.header("host", "localhost");
        }
        let request = request.body(Full::new(body)).expect("request");
        let response: Response<hyper::body::Incoming> = match self {
            Conn::Http1(send) => {
                send.ready().await?;
                send.send_request(request).await?
            }
            Conn::Http2(send) => {
                send.ready().await?;
                send.send_request(request).await?
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn request(&mut self, method: Method, path: &str, body: impl Into<Bytes>) -> Answer {
        self.try_request(method, path, body)
            .await
            .expect("HTTP request")
    }
}

/// An `admission.k8s.io/v1` AdmissionReview for creating `pod`, as the API server sends it.
pub fn admission_review(uid: &str, pod: &Value) -> Value {
    let namespace = pod["metadata"]["namespace"].clone();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"].clone(),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// A plain pod with `containers` app containers and no opinion about injection.
pub fn pod(name: &str, containers: usize) -> Value {
    let containers: Vec<Value> = (0..containers)
        .map(|i| {
            json!({
                "name": if i == 0 { "app".to_owned() } else { format!("app-{i}") },
                "image": "registry.example/app:1.0",
                "ports": [{"containerPort": 8080 + i, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {"containers": containers}
    })
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
