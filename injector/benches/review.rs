//! Time of one `review()` (parse, decide, patch, encode) for a small pod and a 200-container pod.
//! `cargo bench -p remora-injector --bench review`; prints mean, p50 and p99 per review.

use std::time::{Duration, Instant};

use remora_injector::config::Config;
use remora_injector::review::{review, Outcome, WebhookPath};
use serde_json::{json, Value};

fn admission_review(containers: usize) -> Vec<u8> {
    let containers: Vec<Value> = (0..containers)
        .map(|i| {
            json!({
                "name": format!("worker-{i}"),
                "image": "registry.example/worker:1.0",
                "ports": [{"containerPort": 8000 + i, "name": format!("p{i}")}],
                "env": [{"name": "INDEX", "value": i.to_string()}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
            })
        })
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-4000-8000-000000000000",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bench",
            "operation": "CREATE",
            "userInfo": {"username": "bench"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"generateName": "bench-", "labels": {"app": "bench"}, "annotations": {"remora.io/exclude-outbound-cidrs": "10.96.0.0/12"}},
                "spec": {"containers": containers},
            },
        }
    }))
    .expect("serialisable")
}

fn measure(name: &str, body: &[u8], iterations: usize) {
    let config = Config::default();
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let reviewed = review(body, WebhookPath::Inject, &config).expect("a review");
        samples.push(start.elapsed());
        assert_eq!(reviewed.outcome, Outcome::Injected);
        std::hint::black_box(reviewed);
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / iterations as u32;
    let percentile = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "{name:<28} body {:>7} bytes  mean {:>9.1?}  p50 {:>9.1?}  p99 {:>9.1?}  ({iterations} reviews)",
        body.len(),
        mean,
        percentile(50),
        percentile(99),
    );
}

fn main() {
    // Bounded: a fixed count per case, a few seconds in all.
    measure("pod with 1 container", &admission_review(1), 5_000);
    measure("pod with 200 containers", &admission_review(200), 500);
}
