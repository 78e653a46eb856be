//! The `remora-injector` binary itself: `serve` over real HTTPS until SIGTERM, `inject` exit codes.

mod server_support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;
use server_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_remora-injector");

/// Kills the child if a test fails before it exits on its own.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to `limit` for the child to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn serve_answers_over_https_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("cli CA");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &pki.cert_pem).expect("write cert");
    std::fs::write(&key, &pki.key_pem).expect("write key");

    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start remora-injector serve");
    let mut server = Running(child);

    // Log lines are JSON; the "serving" one names the bound address.
    let stderr = server.0.stderr.take().expect("stderr");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("a 'serving' log line within 20 s");
        let entry: Value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("log line is not JSON ({error}): {line}"));
        assert!(entry["level"].is_string(), "{line}");
        if entry["message"] == "serving the admission webhook over HTTPS" {
            break entry["addr"]
                .as_str()
                .expect("addr field")
                .parse()
                .expect("addr is ip:port");
        }
    };

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let client = Client::new(addr, &pki.ca_pem, Version::Http2);
            assert_eq!(client.get("/readyz").await.status, StatusCode::OK);
            let answer = client
                .post(
                    "/inject",
                    admission_review("cli", &pod("cli", 1)).to_string(),
                )
                .await;
            assert_eq!(answer.status, StatusCode::OK);
            assert!(answer.json()["response"]["patch"].is_string());
        })
        .await
        .expect("requests answered within 30 s");
    });

    // Each decision is logged with the pod it was about, for whoever runs the webhook.
    let logged = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("an 'injected' log line");
        let entry: Value = serde_json::from_str(&line).unwrap();
        if entry["message"] == "injected" {
            break entry;
        }
    };
    assert_eq!(logged["pod"], "shop/cli", "{logged}");
    assert_eq!(logged["path"], "/inject", "{logged}");

    let pid = server.0.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = wait_exit(&mut server.0, Duration::from_secs(15)).expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

/// Starts `serve` with `extra` flags on an ephemeral port; returns it, its address, and its log
/// lines (JSON) from then on.
fn start_serve(
    dir: &std::path::Path,
    pki: &Pki,
    extra: &[&str],
) -> (Running, SocketAddr, mpsc::Receiver<String>) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, &pki.cert_pem).expect("write cert");
    std::fs::write(&key, &pki.key_pem).expect("write key");
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("REMORA_") {
            command.env_remove(name);
        }
    }
    let child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start remora-injector serve");
    let mut server = Running(child);
    let stderr = server.0.stderr.take().expect("stderr");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            panic!(
                "no 'serving' log line within 20 s; it said:\n{}",
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
    (server, addr, lines)
}

/// The REMORA_TRUST_ANCHORS value in the patch the webhook answers for a new pod, if any.
async fn injected_trust_anchors(client: &Client) -> Option<String> {
    use base64::Engine as _;
    let answer = client
        .post(
            "/inject",
            admission_review("anchors", &pod("anchors", 1)).to_string(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let patch = answer.json()["response"]["patch"]
        .as_str()
        .expect("patch")
        .to_owned();
    let patch: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("base64"),
    )
    .expect("JSON patch");
    let proxy = patch
        .as_array()
        .expect("operations")
        .iter()
        .find_map(|op| match op["value"].as_array() {
            Some(containers) => containers
                .iter()
                .find(|c| c["name"] == "remora-proxy")
                .cloned(),
            None => (op["value"]["name"] == "remora-proxy").then(|| op["value"].clone()),
        })
        .expect("the proxy container");
    proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "REMORA_TRUST_ANCHORS")
        .map(|e| e["value"].as_str().expect("value").to_owned())
}

#[test]
fn serve_checks_the_trust_anchors_at_start_and_rereads_them_when_they_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("serving CA");
    let anchors = dir.path().join("ca.crt");
    let anchors_flag = format!("--trust-anchors={}", anchors.display());

    // Missing at start: refused, naming the file.
    let mut missing = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", anchors_flag.as_str()])
        .args([
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let status = wait_exit(&mut missing, Duration::from_secs(15)).expect("exits at once");
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut missing.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains(&anchors.display().to_string()) && stderr.contains("cannot read"),
        "{stderr}"
    );

    // Replaced as a Secret volume or the certificate manager replaces it: a rename.
    let replace = |pem: &str| {
        let staged = dir.path().join(".ca.crt.tmp");
        std::fs::write(&staged, pem).expect("write");
        std::fs::rename(&staged, &anchors).expect("rename");
    };
    let (first, second) = (
        Pki::new("control CA 1").ca_pem,
        Pki::new("control CA 2").ca_pem,
    );
    replace(&first);
    let (_server, addr, _lines) = start_serve(dir.path(), &pki, &[anchors_flag.as_str()]);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(40), async {
            let client = Client::new(addr, &pki.ca_pem, Version::Http1);
            assert_eq!(
                injected_trust_anchors(&client).await.as_deref(),
                Some(first.as_str())
            );

            let both = format!("{second}{first}");
            replace(&both);
            let changed = Instant::now();
            while injected_trust_anchors(&client).await.as_deref() != Some(both.as_str()) {
                assert!(
                    changed.elapsed() < Duration::from_secs(10),
                    "not re-read within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }

            // A broken file keeps what was injected.
            replace("not a certificate\n");
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(
                injected_trust_anchors(&client).await.as_deref(),
                Some(both.as_str())
            );
        })
        .await
        .expect("within 40 s");
    });
}

#[test]
fn serve_refuses_a_listen_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Command::new(BIN)
        .args(["serve", "--listen", &addr, "--log-format", "plain"])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let mut server = Running(child);
    let status = wait_exit(&mut server.0, Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(server.0.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(
        stderr.contains(&format!("binding the webhook listener on {addr}")),
        "{stderr}"
    );
}

#[test]
fn a_bad_log_level_is_named() {
    let output = Command::new(BIN)
        .args(["--log-level", "loud", "inject", "-f", "-"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--log-level \"loud\""), "{stderr}");
}

#[test]
fn inject_reports_a_missing_file_and_exits_1() {
    let output = Command::new(BIN)
        .args(["inject", "-f", "/nonexistent/remora/pod.yaml"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("remora-injector: ") && stderr.contains("/nonexistent/remora/pod.yaml"),
        "{stderr}"
    );
}

#[test]
fn inject_reads_standard_input_and_writes_yaml() {
    let mut child = Command::new(BIN)
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: app\n    image: app:1\n")
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pod: Value = serde_yaml_ng::from_slice(&output.stdout).expect("YAML out");
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .expect("initContainers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(init, ["remora-init", "remora-proxy"]);
}
