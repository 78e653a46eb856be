//! `remora-injector serve --manage-certs` against a fake Kubernetes API on loopback: the binary
//! creates the Secret, registers its CA in the webhook configuration, and serves a certificate
//! the API server would accept for the Service name; a second replica adopts the same one.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_remora-injector");
const NS: &str = "remora-system";
const SECRET: &str = "/api/v1/namespaces/remora-system/secrets/remora-injector-tls";
const MWC: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/remora-injector";
const CONTROL_SECRET: &str = "/api/v1/namespaces/remora-system/secrets/remora-control-tls";
/// The name proxies dial remora-control by (SPEC "Fixed numbers").
const CONTROL_DNS: &str = "remora-control.remora-system.svc";
/// The name the API server dials, and so the one it verifies.
const SERVICE_DNS: &str = "remora-injector.remora-system.svc";

/// The slice of the API the certificate manager uses, with resourceVersion semantics and the
/// API server's Status bodies.
#[derive(Default)]
struct Objects {
    by_path: BTreeMap<String, Value>,
    next_rv: u64,
}

fn status(code: StatusCode, reason: &str, message: String) -> (StatusCode, String) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    (code, body.to_string())
}

fn answer(objects: &mut Objects, method: &Method, path: &str, body: &[u8]) -> (StatusCode, String) {
    let sent: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let name = path.rsplit('/').next().unwrap_or_default().to_string();
    match *method {
        Method::GET => match objects.by_path.get(path) {
            Some(object) => (StatusCode::OK, object.to_string()),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("\"{name}\" not found"),
            ),
        },
        Method::POST => {
            let mut object = sent;
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let path = format!("{path}/{name}");
            if objects.by_path.contains_key(&path) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("\"{name}\" already exists"),
                );
            }
            objects.next_rv += 1;
            object["metadata"]["resourceVersion"] = json!(objects.next_rv.to_string());
            objects.by_path.insert(path, object.clone());
            (StatusCode::CREATED, object.to_string())
        }
        Method::PUT => {
            let Some(current) = objects.by_path.get(path) else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("\"{name}\" not found"),
                );
            };
            if sent["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!("\"{name}\": the object has been modified"),
                );
            }
            let mut object = sent;
            objects.next_rv += 1;
            object["metadata"]["resourceVersion"] = json!(objects.next_rv.to_string());
            objects.by_path.insert(path.to_string(), object.clone());
            (StatusCode::OK, object.to_string())
        }
        Method::PATCH => {
            let Some(mut object) = objects.by_path.get(path).cloned() else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("\"{name}\" not found"),
                );
            };
            let Ok(patch) = serde_json::from_value::<json_patch::Patch>(sent) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "not a JSON patch".into(),
                );
            };
            if let Err(error) = json_patch::patch(&mut object, &patch) {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    error.to_string(),
                );
            }
            objects.next_rv += 1;
            object["metadata"]["resourceVersion"] = json!(objects.next_rv.to_string());
            objects.by_path.insert(path.to_string(), object.clone());
            (StatusCode::OK, object.to_string())
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            method.to_string(),
        ),
    }
}

async fn start_fake_api(objects: Arc<Mutex<Objects>>) -> SocketAddr {
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let objects = objects.clone();
        async move {
            let mut objects = objects.lock().unwrap();
            let (code, body) = answer(&mut objects, &method, uri.path(), &body);
            (code, [("content-type", "application/json")], body)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn webhook_config() -> Value {
    let hook = |name: &str, path: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
               "clientConfig": {"service": {"name": "remora-injector", "namespace": NS, "path": path, "port": 443}}})
    };
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
           "metadata": {"name": "remora-injector", "resourceVersion": "1"},
           "webhooks": [hook("namespace.inject.remora.io", "/inject"), hook("pod.inject.remora.io", "/inject/opt-in")]})
}

/// Kills the child if a test fails before it is done with it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a replica with a kubeconfig pointing at the fake API; returns it and its address.
fn start_replica(kubeconfig: &std::path::Path, tls_dir: &std::path::Path) -> (Running, SocketAddr) {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("REMORA_") || key.starts_with("KUBERNETES_") {
            command.env_remove(key);
        }
    }
    let child = command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--manage-certs",
        ])
        .arg("--tls-cert")
        .arg(tls_dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(tls_dir.join("tls.key"))
        // The CA bundle the manager writes beside the pair: the proxies' trust anchors.
        .arg("--trust-anchors")
        .arg(tls_dir.join("ca.crt"))
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", NS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start remora-injector serve --manage-certs");
    let mut replica = Running(child);
    let stderr = replica.0.stderr.take().expect("stderr");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            panic!(
                "no 'serving' log line within 30 s; the replica said:\n{}",
                seen.join("\n")
            );
        };
        let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if entry["message"] == "serving the admission webhook over HTTPS" {
            break entry["addr"]
                .as_str()
                .expect("addr")
                .parse()
                .expect("ip:port");
        }
        seen.push(line);
    };
    (replica, addr)
}

/// `GET /healthz` as the API server would call it: trusting only `ca_bundle`, verifying the
/// Service name. Returns the status line and the certificate the replica presented.
async fn healthz(addr: SocketAddr, ca_bundle: &str) -> (String, CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_bundle.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from(SERVICE_DNS).unwrap(), tcp)
        .await
        .expect("the served certificate verifies against the registered caBundle");
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(
        format!("GET /healthz HTTP/1.1\r\nhost: {SERVICE_DNS}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    (
        text.lines().next().unwrap_or_default().to_string(),
        presented,
    )
}

fn secret_entry(objects: &Arc<Mutex<Objects>>, key: &str) -> String {
    entry_of(objects, SECRET, key)
}

fn entry_of(objects: &Arc<Mutex<Objects>>, secret: &str, key: &str) -> String {
    let objects = objects.lock().unwrap();
    let encoded = objects.by_path[secret]["data"][key]
        .as_str()
        .unwrap()
        .to_string();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

/// What a proxy injected by the replica at `addr` gets in REMORA_TRUST_ANCHORS.
async fn injected_trust_anchors(addr: SocketAddr, ca_bundle: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_bundle.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from(SERVICE_DNS).unwrap(), tcp)
        .await
        .unwrap();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "1", "operation": "CREATE", "namespace": "shop",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                       "spec": {"containers": [{"name": "app", "image": "app"}]}}}
    })
    .to_string();
    tls.write_all(
        format!(
            "POST /inject HTTP/1.1\r\nhost: {SERVICE_DNS}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{review}",
            review.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let patch = base64::engine::general_purpose::STANDARD
        .decode(body["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    let containers = patch
        .as_array()
        .unwrap()
        .iter()
        .find(|op| op["path"] == "/spec/initContainers")
        .unwrap()["value"]
        .clone();
    containers[1]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "REMORA_TRUST_ANCHORS")
        .expect("REMORA_TRUST_ANCHORS")["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A real TLS handshake with a server presenting `cert`/`key`, from a client that trusts only
/// `anchors` and dials `name`, as a proxy dials remora-control.
async fn handshake(cert: &str, key: &str, anchors: &str, name: &str) -> Result<(), String> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = rustls_pemfile::private_key(&mut key.as_bytes())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut anchors.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    served.abort();
    result
}

#[test]
fn replicas_create_then_adopt_one_secret_register_its_ca_and_serve_for_the_service_name() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let objects = Arc::new(Mutex::new(Objects::default()));
    objects
        .lock()
        .unwrap()
        .by_path
        .insert(MWC.into(), webhook_config());
    let api = runtime.block_on(start_fake_api(objects.clone()));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://{api}'}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {NS}}}}}]\n"
        ),
    )
    .unwrap();

    let (_first, first_addr) = start_replica(&kubeconfig, &dir.path().join("first"));
    let bundle = secret_entry(&objects, "ca-bundle.crt");
    let registered: Vec<String> = {
        let objects = objects.lock().unwrap();
        objects.by_path[MWC]["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                w["clientConfig"]["caBundle"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(&bundle);
    assert_eq!(registered, vec![encoded.clone(), encoded]);

    let (status_line, first_cert) = runtime.block_on(healthz(first_addr, &bundle));
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    let served = rustls_pemfile::certs(&mut secret_entry(&objects, "tls.crt").as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(first_cert, served);

    // A second replica finds the Secret and serves the very same certificate: one CA.
    let rv_before = objects.lock().unwrap().by_path[SECRET]["metadata"]["resourceVersion"].clone();
    let (_second, second_addr) = start_replica(&kubeconfig, &dir.path().join("second"));
    let (status_line, second_cert) = runtime.block_on(healthz(second_addr, &bundle));
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    assert_eq!(second_cert, first_cert);
    let rv_after = objects.lock().unwrap().by_path[SECRET]["metadata"]["resourceVersion"].clone();
    assert_eq!(
        rv_before, rv_after,
        "the second replica rewrote a valid Secret"
    );

    // remora-control's Secret, from the same CA: the trust anchors both replicas inject verify
    // it for the name proxies dial, and not the webhook's certificate under that name.
    let (control_cert, control_key) = (
        entry_of(&objects, CONTROL_SECRET, "tls.crt"),
        entry_of(&objects, CONTROL_SECRET, "tls.key"),
    );
    assert_eq!(entry_of(&objects, CONTROL_SECRET, "ca.crt"), bundle);
    for addr in [first_addr, second_addr] {
        let anchors = runtime.block_on(injected_trust_anchors(addr, &bundle));
        assert_eq!(anchors, bundle);
        runtime
            .block_on(handshake(
                &control_cert,
                &control_key,
                &anchors,
                CONTROL_DNS,
            ))
            .expect("remora-control's certificate verifies with the injected anchors");
        let webhook_cert = secret_entry(&objects, "tls.crt");
        let webhook_key = secret_entry(&objects, "tls.key");
        assert!(runtime
            .block_on(handshake(
                &webhook_cert,
                &webhook_key,
                &anchors,
                CONTROL_DNS
            ))
            .is_err());
    }
    let objects = objects.lock().unwrap();
    assert_eq!(objects.by_path[CONTROL_SECRET]["type"], "kubernetes.io/tls");
}
