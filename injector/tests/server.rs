//! The webhook through its real HTTPS face: TLS handshakes, HTTP/1.1 and HTTP/2, limits, certificate reload.

mod server_support;

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use hyper::{Method, StatusCode};
use remora_injector::metrics::{ReloadResult, ReviewResult};
use remora_injector::server::{Timeouts, MAX_BODY_BYTES};
use serde_json::{json, Value};
use server_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn run<F: std::future::Future<Output = ()>>(test: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(TEST_DEADLINE, test)
            .await
            .expect("test finished within its deadline");
    });
}

/// Applies a JSON patch the way the API server does (kubectl uses the same library).
fn kubectl_patch(pod: &Value, patch: &Value) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let pod_file = dir.path().join("pod.json");
    std::fs::write(&pod_file, pod.to_string()).expect("write pod.json");
    let output = Command::new("kubectl")
        .args(["patch", "--local", "--type=json", "-o", "json", "-f"])
        .arg(&pod_file)
        .arg("-p")
        .arg(patch.to_string())
        // Never reach for a cluster: --local needs none.
        .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .output()
        .expect("run kubectl (Debian package kubernetes-client)");
    assert!(
        output.status.success(),
        "kubectl patch failed: {}\npatch: {patch}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kubectl printed JSON")
}

/// Checks the envelope and returns the decoded patch, if any.
fn response_patch(answer: &Answer, uid: &str) -> Option<Value> {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let review = answer.json();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let response = &review["response"];
    assert_eq!(response["uid"], uid);
    assert_eq!(response["allowed"], true, "{review}");
    match &response["patch"] {
        Value::Null => {
            assert!(response.get("patchType").is_none(), "{review}");
            None
        }
        Value::String(encoded) => {
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .expect("patch is base64");
            Some(serde_json::from_slice(&bytes).expect("patch is JSON"))
        }
        other => panic!("patch must be a base64 string, got {other}"),
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|items| items.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn a_pod_comes_out_injected_and_reinvocation_changes_nothing() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        for version in [Version::Http1, Version::Http2] {
            let client = Client::new(server.addr, &pki.ca_pem, version);
            let mut conn = client.connect().await;

            // A pod with an init container of its own, which must end up after ours.
            let mut pod = pod("web", 2);
            pod["spec"]["initContainers"] =
                json!([{"name": "migrate", "image": "registry.example/migrate:1"}]);
            let uid = format!("uid-{version:?}");
            let answer = conn
                .request(
                    Method::POST,
                    "/inject",
                    admission_review(&uid, &pod).to_string(),
                )
                .await;
            let patch = response_patch(&answer, &uid).expect("a patch for a plain pod on /inject");
            let injected = kubectl_patch(&pod, &patch);

            let spec = &injected["spec"];
            assert_eq!(
                names(&spec["initContainers"]),
                ["remora-init", "remora-proxy", "migrate"]
            );
            assert_eq!(names(&spec["containers"]), ["app", "app-1"]);
            assert_eq!(spec["containers"], pod["spec"]["containers"]);
            let proxy = &spec["initContainers"][1];
            assert_eq!(proxy["restartPolicy"], "Always");
            assert!(spec["initContainers"][0].get("restartPolicy").is_none());
            assert!(injected["metadata"]["annotations"]["remora.io/status"].is_string());
            assert_eq!(injected["metadata"]["labels"], pod["metadata"]["labels"]);

            // Reinvocation (reinvocationPolicy: IfNeeded) on the injected pod: no patch, on the
            // same keep-alive connection.
            let again = conn
                .request(
                    Method::POST,
                    "/inject",
                    admission_review("again", &injected).to_string(),
                )
                .await;
            assert_eq!(response_patch(&again, "again"), None);
        }
        assert_eq!(server.metrics.reviews(ReviewResult::Injected), 2);
        assert_eq!(server.metrics.reviews(ReviewResult::Skipped), 2);
        server.stop().await;
    });
}

#[test]
fn a_pod_without_annotations_or_volumes_gets_them_created() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        });
        let answer = client
            .post("/inject", admission_review("bare", &pod).to_string())
            .await;
        let patch = response_patch(&answer, "bare").expect("patch");
        let injected = kubectl_patch(&pod, &patch);
        assert!(injected["metadata"]["annotations"]["remora.io/status"].is_string());
        assert!(names(&injected["spec"]["volumes"]).contains(&"remora-xtables-lock"));
        server.stop().await;
    });
}

#[test]
fn a_large_pod_is_reviewed_too() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http2);
        // Large enough to be reviewed on the blocking pool rather than inline.
        let pod = pod("large", 3000);
        let body = admission_review("large", &pod).to_string();
        assert!(body.len() > 256 * 1024, "{} bytes", body.len());
        let answer = client.post("/inject", body).await;
        let patch = response_patch(&answer, "large").expect("a patch");
        let injected = kubectl_patch(&pod, &patch);
        assert_eq!(
            names(&injected["spec"]["initContainers"]),
            ["remora-init", "remora-proxy"]
        );
        assert_eq!(injected["spec"]["containers"], pod["spec"]["containers"]);
        server.stop().await;
    });
}

#[test]
fn the_opt_in_path_injects_only_pods_that_opt_in() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);

        let plain = pod("plain", 1);
        let answer = client
            .post(
                "/inject/opt-in",
                admission_review("plain", &plain).to_string(),
            )
            .await;
        assert_eq!(response_patch(&answer, "plain"), None);

        let mut opted = pod("opted", 1);
        opted["metadata"]["annotations"] = json!({"remora.io/inject": "true"});
        let answer = client
            .post(
                "/inject/opt-in",
                admission_review("opted", &opted).to_string(),
            )
            .await;
        let patch = response_patch(&answer, "opted").expect("an opted-in pod is injected");
        let injected = kubectl_patch(&opted, &patch);
        assert_eq!(
            names(&injected["spec"]["initContainers"]),
            ["remora-init", "remora-proxy"]
        );
        server.stop().await;
    });
}

#[test]
fn a_bad_annotation_is_denied_with_a_message_naming_it() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http2);
        let mut pod = pod("bad", 1);
        pod["metadata"]["annotations"] = json!({"remora.io/exclude-inbound-ports": "99999"});
        let answer = client
            .post("/inject", admission_review("bad", &pod).to_string())
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let response = &answer.json()["response"];
        assert_eq!(response["uid"], "bad");
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().expect("message");
        assert!(
            message.contains("remora.io/exclude-inbound-ports") && message.contains("99999"),
            "{message}"
        );
        assert!(response.get("patch").is_none());
        assert_eq!(server.metrics.reviews(ReviewResult::Denied), 1);
        server.stop().await;
    });
}

#[test]
fn a_bad_inbound_rate_limit_is_denied_naming_the_key_the_value_and_the_form() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);
        let mut pod = pod("limited", 1);
        pod["metadata"]["annotations"] =
            json!({"remora.io/inbound-rate-limit": "100/s,10/s per-pod"});
        let answer = client
            .post("/inject", admission_review("limited", &pod).to_string())
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let response = &answer.json()["response"];
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().expect("message");
        assert!(
            message.starts_with("annotation remora.io/inbound-rate-limit: \"100/s,10/s per-pod\""),
            "{message}"
        );
        assert!(
            message.contains("e.g. 100/s or 100/s,10/s per-client"),
            "{message}"
        );
        assert!(response.get("patch").is_none());

        // The same pod with a good value is injected, its proxy given the flag.
        pod["metadata"]["annotations"] =
            json!({"remora.io/inbound-rate-limit": "100/s, 10/s per-client"});
        let answer = client
            .post("/inject", admission_review("limited", &pod).to_string())
            .await;
        let patch = response_patch(&answer, "limited").expect("a good limit is injected");
        let injected = kubectl_patch(&pod, &patch);
        let args = &injected["spec"]["initContainers"][1]["args"];
        let args: Vec<&str> = args
            .as_array()
            .expect("proxy args")
            .iter()
            .filter_map(|arg| arg.as_str())
            .collect();
        let at = args
            .iter()
            .position(|arg| *arg == "--inbound-rate-limit")
            .unwrap_or_else(|| panic!("no --inbound-rate-limit in {args:?}"));
        assert_eq!(args[at + 1], "100/s,10/s per-client");
        assert_eq!(server.metrics.reviews(ReviewResult::Denied), 1);
        server.stop().await;
    });
}

#[test]
fn bodies_that_are_not_admission_reviews_get_400() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);
        let mut conn = client.connect().await;
        let bodies: [&[u8]; 5] = [
            b"",
            b"not json at all",
            b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
            b"[1,2,3]",
            &[0xff, 0xfe, 0x00, 0x7b],
        ];
        for body in bodies {
            // The same connection throughout: a 400 does not cost the client its connection.
            let answer = conn.request(Method::POST, "/inject", body.to_vec()).await;
            assert_eq!(
                answer.status,
                StatusCode::BAD_REQUEST,
                "body {:?}",
                String::from_utf8_lossy(body)
            );
            let content_type = answer.headers["content-type"].to_str().expect("ascii");
            assert!(content_type.starts_with("text/plain"), "{content_type}");
            assert!(
                answer.text().contains("AdmissionReview"),
                "{}",
                answer.text()
            );
        }
        assert_eq!(server.metrics.reviews(ReviewResult::Error), 5);

        // Wrong method or path: the router's own answers, not reviews.
        assert_eq!(
            conn.request(Method::GET, "/inject", "").await.status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            conn.request(Method::POST, "/elsewhere", "{}").await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(server.metrics.reviews(ReviewResult::Error), 5);
        server.stop().await;
    });
}

#[test]
fn a_body_over_8_mib_gets_413() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        for version in [Version::Http1, Version::Http2] {
            let client = Client::new(server.addr, &pki.ca_pem, version);
            let answer = client.post("/inject", vec![b' '; MAX_BODY_BYTES + 1]).await;
            assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{version:?}");
        }
        assert_eq!(server.metrics.reviews(ReviewResult::Error), 2);

        // Just under the limit is read and judged on its content.
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);
        let answer = client.post("/inject", vec![b' '; MAX_BODY_BYTES]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        server.stop().await;
    });
}

#[test]
fn health_readiness_and_metrics() {
    run(async {
        let pki = Pki::new("remora test CA");
        let server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);
        let mut conn = client.connect().await;
        assert_eq!(
            conn.request(Method::GET, "/healthz", "").await.status,
            StatusCode::OK
        );
        assert_eq!(
            conn.request(Method::GET, "/readyz", "").await.status,
            StatusCode::OK
        );

        let scrape = conn.request(Method::GET, "/metrics", "").await;
        assert_eq!(scrape.status, StatusCode::OK);
        assert!(scrape.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/openmetrics-text"));
        let before = scrape.text();
        assert!(
            before.contains("remora_injector_reviews_total{result=\"injected\"} 0"),
            "{before}"
        );
        assert!(before.contains("remora_injector_review_duration_seconds_count 0"));
        assert!(before.contains("remora_injector_tls_reloads_total{result=\"loaded\"} 1"));
        let expiration: i64 = before
            .lines()
            .find_map(|line| {
                line.strip_prefix("remora_injector_tls_certificate_expiration_timestamp_seconds ")
            })
            .expect("expiration gauge")
            .parse()
            .expect("integer seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        // rcgen's default validity runs far into the future.
        assert!(expiration > now, "{expiration} <= {now}");

        let review = admission_review("m", &pod("m", 1)).to_string();
        conn.request(Method::POST, "/inject", review).await;
        conn.request(Method::POST, "/inject", "garbage").await;
        let after = conn.request(Method::GET, "/metrics", "").await.text();
        for line in [
            "remora_injector_reviews_total{result=\"injected\"} 1",
            "remora_injector_reviews_total{result=\"error\"} 1",
            "remora_injector_reviews_total{result=\"skipped\"} 0",
            "remora_injector_reviews_total{result=\"denied\"} 0",
            "remora_injector_review_duration_seconds_count 2",
        ] {
            assert!(after.contains(line), "missing {line:?} in\n{after}");
        }
        server.stop().await;
    });
}

#[test]
fn a_certificate_swapped_on_disk_is_served_on_the_next_handshake() {
    run(async {
        let first = Pki::new("first CA");
        let mut server = TestServer::start(Some(&first), Timeouts::default()).await;
        let old_client = Client::new(server.addr, &first.ca_pem, Version::Http1);
        let (_, presented) = old_client.handshake().await.expect("handshake");
        assert_eq!(presented, first.cert_der);
        let mut kept = old_client.connect().await;

        // A new CA and certificate, swapped in the way the kubelet updates a Secret volume.
        let second = Pki::new("second CA");
        server.secret.write_pki(&second);
        let new_client = Client::new(server.addr, &second.ca_pem, Version::Http1);
        let presented = eventually(Duration::from_secs(10), || async {
            new_client.handshake().await.ok().map(|(_, cert)| cert)
        })
        .await
        .expect("the new certificate is served within 10 s");
        assert_eq!(presented, second.cert_der);
        assert_eq!(
            new_client.get("/readyz").await.status,
            StatusCode::OK,
            "still ready"
        );
        // Clients of the old CA are now refused, and a connection made before the swap goes on.
        assert!(old_client.handshake().await.is_err());
        assert_eq!(
            kept.request(Method::GET, "/healthz", "").await.status,
            StatusCode::OK
        );

        // A broken update (a key that does not match) is not taken: the second one stays.
        let third = Pki::new("third CA");
        server.secret.write(&third.cert_pem, &second.key_pem);
        let metrics = server.metrics.clone();
        eventually(Duration::from_secs(10), || async {
            (metrics.reloads(ReloadResult::Rejected) == 1).then_some(())
        })
        .await
        .expect("the mismatched pair is rejected");
        let (_, presented) = new_client.handshake().await.expect("handshake");
        assert_eq!(presented, second.cert_der);
        assert_eq!(server.metrics.reloads(ReloadResult::Loaded), 2);
        assert_eq!(server.metrics.reloads(ReloadResult::Rejected), 1);
        server.stop().await;
    });
}

#[test]
fn serving_starts_once_certificate_files_appear() {
    run(async {
        let mut server = TestServer::start(None, Timeouts::default()).await;
        let pki = Pki::new("late CA");
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);
        // No certificate: the handshake fails rather than hanging.
        assert!(client.handshake().await.is_err());

        server.secret.write_pki(&pki);
        let presented = eventually(Duration::from_secs(10), || async {
            client.handshake().await.ok().map(|(_, cert)| cert)
        })
        .await
        .expect("served once the files exist");
        assert_eq!(presented, pki.cert_der);
        assert_eq!(client.get("/readyz").await.status, StatusCode::OK);
        server.stop().await;
    });
}

/// Waits for the server to close `stream`, reading and discarding whatever it sends first.
async fn closed_by_server(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn slow_and_idle_connections_do_not_hold_up_others() {
    run(async {
        let pki = Pki::new("remora test CA");
        let timeouts = Timeouts {
            tls_handshake: Duration::from_secs(2),
            header_read: Duration::from_secs(2),
            idle: Duration::from_secs(2),
            request: Duration::from_secs(2),
            drain: Duration::from_secs(2),
        };
        let server = TestServer::start(Some(&pki), timeouts).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http1);

        // Many TCP connections that never say anything, and one that starts a TLS
        // ClientHello and stalls.
        let mut silent = Vec::new();
        for _ in 0..50 {
            silent.push(TcpStream::connect(server.addr).await.expect("connect"));
        }
        let mut stalled = TcpStream::connect(server.addr).await.expect("connect");
        stalled
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .expect("write");
        // A TLS connection that sends half a request header and stops (slowloris).
        let (mut slow, _) = client.handshake().await.expect("handshake");
        slow.write_all(b"POST /inject HTTP/1.1\r\nhost: localhost\r\n")
            .await
            .expect("write");
        // And one that sends its headers but only part of the body it announced.
        let (mut trickle, _) = client.handshake().await.expect("handshake");
        trickle
            .write_all(
                b"POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n{\"api",
            )
            .await
            .expect("write");

        let started = std::time::Instant::now();
        let answer = client
            .post(
                "/inject",
                admission_review("busy", &pod("busy", 1)).to_string(),
            )
            .await;
        assert!(response_patch(&answer, "busy").is_some());
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "a fresh client waited {:?} behind idle connections",
            started.elapsed()
        );

        // And the server lets go of them: handshake timeout, header timeout, idle timeout.
        for stream in silent.iter_mut().chain([&mut stalled]) {
            assert!(
                closed_by_server(stream, Duration::from_secs(5)).await,
                "a connection that never finished its handshake stayed open"
            );
        }
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a connection stuck in its request headers stayed open"
        );

        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), trickle.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "a connection trickling its body stayed open");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

        // An HTTP/2 connection that goes quiet is closed after the idle timeout.
        let h2 = Client::new(server.addr, &pki.ca_pem, Version::Http2);
        let mut conn = h2.connect().await;
        conn.request(Method::GET, "/healthz", "").await;
        let Conn::Http2(send) = &conn else {
            unreachable!("an HTTP/2 client")
        };
        let closed = eventually(Duration::from_secs(6), || async {
            send.is_closed().then_some(())
        })
        .await;
        assert!(
            closed.is_some(),
            "an idle HTTP/2 connection stayed open past the idle timeout"
        );
        server.stop().await;
    });
}

#[test]
fn shutdown_finishes_in_flight_work_and_stops_listening() {
    run(async {
        let pki = Pki::new("remora test CA");
        let mut server = TestServer::start(Some(&pki), Timeouts::default()).await;
        let client = Client::new(server.addr, &pki.ca_pem, Version::Http2);
        let mut conn = client.connect().await;
        conn.request(Method::GET, "/healthz", "").await;
        // An idle keep-alive connection must not keep the server from stopping.
        server.signal_shutdown();
        tokio::time::timeout(Duration::from_secs(5), server.join_handle())
            .await
            .expect("stopped well within the drain timeout")
            .expect("no panic");
        assert!(TcpStream::connect(server.addr).await.is_err());
    });
}
