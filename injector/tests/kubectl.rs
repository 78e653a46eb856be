//! The webhook's patch applied by real kubectl (`kubectl patch --local --type=json`, the JSON
//! Patch code the API server uses), and the result checked against what Kubernetes 1.33 accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;
use k8s_openapi::api::core::v1::{Container, Pod};
use remora_injector::config::Config;
use remora_injector::review::{review, Outcome, WebhookPath};
use remora_injector::trust::TrustAnchors;
use remora_injector::values::Quantity;
use serde_json::{json, Value};

const KUBECTL: &str = "kubectl";

fn admission_review(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3a2e7c1b-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    }))
    .unwrap()
}

/// The patch the webhook answers with, as the text the API server would decode.
fn webhook_patch(pod: &Value) -> String {
    webhook_patch_with(pod, &Config::default())
}

/// The patch of a webhook configured with `config`.
fn webhook_patch_with(pod: &Value, config: &Config) -> String {
    let reviewed = review(&admission_review(pod), WebhookPath::Inject, config).unwrap();
    assert_eq!(
        reviewed.outcome,
        Outcome::Injected,
        "{:#}",
        reviewed.response
    );
    let encoded = reviewed.response["response"]["patch"]
        .as_str()
        .expect("patch is a base64 string");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

fn kubectl_patch(pod: &Value, patch: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.json");
    std::fs::write(&file, serde_json::to_vec_pretty(pod).unwrap()).unwrap();
    let output = Command::new(KUBECTL)
        .args(["patch", "--local", "--type=json", "-o", "json", "-f"])
        .arg(&file)
        .args(["-p", patch])
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run kubectl (scripts/install-deps.sh test installs it): {err}")
        });
    assert!(
        output.status.success(),
        "kubectl patch failed: {}\npatch: {patch}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn names(containers: &Value) -> Vec<String> {
    containers
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| c["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The checks of Kubernetes' schema and pod validation that an injected pod could fail.
fn assert_kubernetes_accepts(pod: &Value) {
    // Strict schema: every field is one the Pod type knows, with the right type — a pod that
    // survives a round trip through the typed struct unchanged has no unknown or mistyped field.
    let typed: Pod = serde_json::from_value(pod.clone()).expect("the pod parses as a Pod");
    assert_eq!(
        &serde_json::to_value(&typed).unwrap(),
        pod,
        "the pod has fields the Pod schema does not know"
    );
    let spec = typed.spec.as_ref().expect("spec");
    let init = spec.init_containers.clone().unwrap_or_default();
    let all: Vec<&Container> = init.iter().chain(spec.containers.iter()).collect();

    let mut seen = BTreeSet::new();
    for container in &all {
        assert!(
            seen.insert(container.name.clone()),
            "duplicate container name {}",
            container.name
        );
    }
    let volumes: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(
        volumes.len(),
        spec.volumes.as_ref().map_or(0, Vec::len),
        "duplicate volume names"
    );
    // Pod validation of a projected ServiceAccount token: at least 10 minutes, at most 2^32
    // seconds, a relative path without `..`.
    for volume in spec.volumes.iter().flatten() {
        let sources = volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten());
        for token in sources.filter_map(|source| source.service_account_token.as_ref()) {
            let seconds = token.expiration_seconds.unwrap_or(3600);
            assert!(
                (600..=1 << 32).contains(&seconds),
                "{}: {seconds}",
                volume.name
            );
            assert!(
                !token.path.is_empty()
                    && !token.path.starts_with('/')
                    && !token.path.split('/').any(|part| part == ".."),
                "{}: path {:?}",
                volume.name,
                token.path
            );
        }
    }
    for container in &all {
        for mount in container.volume_mounts.iter().flatten() {
            assert!(mount.mount_path.starts_with('/'), "{}", mount.mount_path);
        }
        for port in container.ports.iter().flatten() {
            if let Some(name) = &port.name {
                let valid = name.len() <= 15
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && name.bytes().any(|b| b.is_ascii_lowercase())
                    && !name.starts_with('-')
                    && !name.ends_with('-')
                    && !name.contains("--");
                assert!(valid, "port name {name:?} is not an IANA service name");
            }
            assert!((1..=65535).contains(&port.container_port));
        }
        for mount in container.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(&mount.name),
                "mount of missing volume {}",
                mount.name
            );
        }
        if let Some(resources) = &container.resources {
            for (resource, request) in resources.requests.iter().flatten() {
                if let Some(limit) = resources.limits.as_ref().and_then(|l| l.get(resource)) {
                    let request = Quantity::parse(&request.0).unwrap();
                    let limit = Quantity::parse(&limit.0).unwrap();
                    assert!(
                        request <= limit,
                        "{}: {resource} request {request} > limit {limit}",
                        container.name
                    );
                }
            }
        }
        if let Some(context) = &container.security_context {
            if context.run_as_non_root == Some(true) {
                assert_ne!(context.run_as_user, Some(0), "{}", container.name);
            }
        }
    }
    for container in &init {
        let sidecar = container.restart_policy.as_deref() == Some("Always");
        if let Some(policy) = &container.restart_policy {
            assert_eq!(policy, "Always", "init containers accept only Always");
        }
        if !sidecar {
            assert!(
                container.startup_probe.is_none()
                    && container.readiness_probe.is_none()
                    && container.liveness_probe.is_none(),
                "plain init container {} has probes",
                container.name
            );
        }
    }
}

/// Runs the webhook again on its own output: it must answer with no patch at all.
fn assert_reinvocation_is_a_no_op(pod: &Value) {
    let reviewed = review(
        &admission_review(pod),
        WebhookPath::Inject,
        &Config::default(),
    )
    .unwrap();
    assert_eq!(reviewed.outcome, Outcome::Skipped);
    let response = reviewed.response["response"].as_object().unwrap();
    assert_eq!(response["allowed"], true);
    assert!(!response.contains_key("patch") && !response.contains_key("patchType"));
    assert!(!response.contains_key("warnings"), "{response:?}");
}

/// The control plane's address and a two-CA bundle (a rotation) as kubectl applies them: the
/// PEM arrives in the variable byte for byte, and the reinvoked webhook leaves the pod alone.
#[test]
fn control_plane_address_and_trust_anchors_patch_cleanly() {
    let ca = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    };
    let bundle = format!("{}{}", ca(), ca());
    let config = Config {
        control_addr: Some("[fd00:10:96::20]:8090".parse().unwrap()),
        trust_anchors: Some(
            TrustAnchors::parse(std::path::Path::new("ca.crt"), bundle.as_bytes()).unwrap(),
        ),
        ..Config::default()
    };
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cart", "namespace": "shop"},
        "spec": {"containers": [{"image": "cart:1", "name": "cart",
                  "env": [{"name": "REMORA_TRUST_ANCHORS", "value": "the app's own"}]}]},
    });
    let out = kubectl_patch(&pod, &webhook_patch_with(&pod, &config));
    assert_kubernetes_accepts(&out);
    let proxy = &out["spec"]["initContainers"][1];
    let args = proxy["args"].as_array().unwrap();
    assert_eq!(
        args[args.len() - 2..],
        [json!("--control"), json!("[fd00:10:96::20]:8090")]
    );
    let env = proxy["env"].as_array().unwrap();
    assert_eq!(
        env.last().unwrap(),
        &json!({"name": "REMORA_TRUST_ANCHORS", "value": bundle})
    );
    // The app's variable of the same name is its own.
    assert_eq!(
        out["spec"]["containers"][0]["env"],
        pod["spec"]["containers"][0]["env"]
    );

    let reviewed = review(&admission_review(&out), WebhookPath::Inject, &config).unwrap();
    assert_eq!(reviewed.outcome, Outcome::Skipped);
}

#[test]
fn bare_pod_gets_annotations_init_containers_and_volumes_created() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        // As a ReplicaSet creates it: the namespace is the request's alone.
        "metadata": {"generateName": "web-"},
        "spec": {
            "serviceAccountName": "storefront",
            "automountServiceAccountToken": false,
            "containers": [{"image": "nginx:1.27", "name": "web"}],
        },
    });
    let out = kubectl_patch(&pod, &webhook_patch(&pod));
    assert_kubernetes_accepts(&out);

    assert_eq!(
        names(&out["spec"]["initContainers"]),
        ["remora-init", "remora-proxy"]
    );
    assert_eq!(names(&out["spec"]["containers"]), ["web"]);
    let init = &out["spec"]["initContainers"][0];
    let proxy = &out["spec"]["initContainers"][1];
    assert!(init.get("restartPolicy").is_none());
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(
        init["securityContext"],
        json!({
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": false,
            "runAsUser": 0,
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    assert_eq!(
        proxy["securityContext"],
        json!({
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": true,
            "runAsGroup": 1337,
            "runAsNonRoot": true,
            "runAsUser": 1337,
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    assert_eq!(
        init["volumeMounts"],
        json!([{"mountPath": "/run", "name": "remora-xtables-lock"}])
    );
    assert_eq!(
        out["spec"]["volumes"],
        json!([
            {"emptyDir": {}, "name": "remora-xtables-lock"},
            {"name": "remora-identity-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "remora.io/identity", "expirationSeconds": 3600, "path": "token"}}]}},
        ])
    );
    // The token is the proxy's alone, whatever automountServiceAccountToken says.
    assert_eq!(
        proxy["volumeMounts"],
        json!([{"mountPath": "/var/run/secrets/remora.io/identity", "name": "remora-identity-token", "readOnly": true}])
    );
    assert!(out["spec"]["containers"][0].get("volumeMounts").is_none());
    assert_eq!(out["spec"]["automountServiceAccountToken"], false);
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(
        proxy["ports"],
        json!([{"containerPort": 15020, "name": "remora-admin", "protocol": "TCP"}])
    );
    let annotations = out["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(annotations.len(), 1);
    let status: Value = serde_json::from_str(annotations["remora.io/status"].as_str().unwrap())
        .expect("status is JSON");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        status["identity"],
        "spiffe://cluster.local/ns/shop/sa/storefront"
    );

    assert_reinvocation_is_a_no_op(&out);
}

#[test]
fn existing_annotations_init_containers_and_volumes_are_kept_in_order() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "labels": {"app": "web"},
            "annotations": {
                "example.com/owner": "shop~team/a",
                "weird~key/with/slashes": "1",
                "remora.io/exclude-inbound-ports": "9090",
            },
        },
        "spec": {
            "initContainers": [
                {"image": "flyway", "name": "migrate"},
                {"image": "log-shipper", "name": "logs", "restartPolicy": "Always"},
            ],
            "containers": [
                {"image": "nginx", "name": "web", "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]},
                {"image": "busybox", "name": "side"},
            ],
            "volumes": [{"emptyDir": {}, "name": "cache"}],
        },
    });
    let patch = webhook_patch(&pod);
    assert!(
        patch.contains("/metadata/annotations/remora.io~1status"),
        "{patch}"
    );
    let out = kubectl_patch(&pod, &patch);
    assert_kubernetes_accepts(&out);

    assert_eq!(
        names(&out["spec"]["initContainers"]),
        ["remora-init", "remora-proxy", "migrate", "logs"]
    );
    assert_eq!(names(&out["spec"]["containers"]), ["web", "side"]);
    assert_eq!(
        names(&out["spec"]["volumes"]),
        ["cache", "remora-xtables-lock", "remora-identity-token"]
    );
    let annotations = out["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(annotations["example.com/owner"], "shop~team/a");
    assert_eq!(annotations["weird~key/with/slashes"], "1");
    assert!(annotations.contains_key("remora.io/status"));
    assert_eq!(
        out["spec"]["initContainers"][0]["args"],
        json!(["--exclude-inbound-ports", "9090,15020"])
    );

    assert_reinvocation_is_a_no_op(&out);
}

/// Strict mTLS with its probe exceptions and an allow list, on a pod with native sidecars and
/// named probe ports, as the API server would apply it.
#[test]
fn strict_mtls_pod_patches_cleanly_with_its_probes() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "cart-",
            "annotations": {
                "remora.io/inbound-mtls": "strict",
                "remora.io/allow-from": "shop/checkout,monitoring/*",
            },
        },
        "spec": {
            "serviceAccountName": "cart",
            "initContainers": [
                {"image": "envoy", "name": "edge", "restartPolicy": "Always",
                 "ports": [{"containerPort": 9901, "name": "edge-admin"}],
                 "readinessProbe": {"httpGet": {"port": "edge-admin", "path": "/ready"}}},
            ],
            "containers": [{
                "image": "cart:1", "name": "cart",
                "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090, "name": "grpc"}],
                "livenessProbe": {"httpGet": {"port": "http", "path": "/healthz?full=1"}},
                "readinessProbe": {"grpc": {"port": 9090}},
                "startupProbe": {"tcpSocket": {"port": "http"}},
            }],
        },
    });
    let out = kubectl_patch(&pod, &webhook_patch(&pod));
    assert_kubernetes_accepts(&out);
    let args: Vec<String> =
        serde_json::from_value(out["spec"]["initContainers"][1]["args"].clone()).unwrap();
    let at = args
        .iter()
        .position(|a| a == "--inbound-mtls")
        .expect("--inbound-mtls");
    assert_eq!(
        args[at..at + 6],
        [
            "--inbound-mtls",
            "strict",
            "--allow-from",
            "shop/checkout,monitoring/*",
            "--inbound-probes",
            // The tcpSocket probe opens all of 8080, which covers its /healthz.
            "8080,9090,9901:/ready",
        ]
    );
    let status: Value = serde_json::from_str(
        out["metadata"]["annotations"]["remora.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["identity"], "spiffe://cluster.local/ns/shop/sa/cart");
    assert_reinvocation_is_a_no_op(&out);
}

#[test]
fn bad_mtls_annotations_are_denied_with_status_400() {
    for (key, value) in [
        ("remora.io/inbound-mtls", "enforce"),
        ("remora.io/allow-from", "shop"),
    ] {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "cart-", "annotations": {key: value}},
            "spec": {"containers": [{"image": "cart:1", "name": "cart"}]},
        });
        let reviewed = review(
            &admission_review(&pod),
            WebhookPath::Inject,
            &Config::default(),
        )
        .unwrap();
        assert_eq!(reviewed.outcome, Outcome::Denied, "{key}");
        let response = &reviewed.response["response"];
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("annotation {key}: \"{value}\""))
                && message.contains("expected"),
            "{message}"
        );
        assert!(response.get("patch").is_none());
    }
}

#[test]
fn annotations_shape_the_injected_containers() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "db-client",
            "annotations": {
                "remora.io/proxy-image": "registry.example/remora-proxy:dev",
                "remora.io/init-image": "registry.example/remora-init:dev",
                "remora.io/proxy-cpu-request": "2",
                "remora.io/proxy-cpu-limit": "2000m",
                "remora.io/proxy-memory-request": "0.5Gi",
                "remora.io/proxy-memory-limit": "1Gi",
                "remora.io/proxy-log-level": "debug",
                "remora.io/proxy-uid": "2102",
                "remora.io/include-outbound-cidrs": "198.18.0.0/15,2001:2::/48",
                "remora.io/exclude-outbound-ports": "5432,6000-6010",
                "remora.io/opaque-ports": "5432",
            },
        },
        "spec": {"containers": [{"image": "psql", "name": "client"}], "initContainers": [], "volumes": []},
    });
    let out = kubectl_patch(&pod, &webhook_patch(&pod));
    assert_kubernetes_accepts(&out);
    let init = &out["spec"]["initContainers"][0];
    let proxy = &out["spec"]["initContainers"][1];
    assert_eq!(init["image"], "registry.example/remora-init:dev");
    assert_eq!(
        init["args"],
        json!([
            "--proxy-uid",
            "2102",
            "--exclude-inbound-ports",
            "15020",
            "--include-outbound-cidrs",
            "198.18.0.0/15,2001:2::/48",
            "--exclude-outbound-ports",
            "5432,6000-6010",
        ])
    );
    assert_eq!(proxy["image"], "registry.example/remora-proxy:dev");
    assert_eq!(
        proxy["args"],
        json!([
            "--log-level",
            "debug",
            "--opaque-ports",
            "5432",
            "--control",
            "remora-control.remora-system.svc:8090"
        ])
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["securityContext"]["runAsGroup"], 2102);
    assert_eq!(
        proxy["resources"],
        json!({"limits": {"cpu": "2000m", "memory": "1Gi"}, "requests": {"cpu": "2", "memory": "0.5Gi"}})
    );
    assert_reinvocation_is_a_no_op(&out);
}

#[test]
fn a_pod_with_200_containers_patches_cleanly() {
    let containers: Vec<Value> = (0..200)
        .map(|i| json!({"image": "busybox", "name": format!("worker-{i}")}))
        .collect();
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "wide"},
        "spec": {"containers": containers},
    });
    let out = kubectl_patch(&pod, &webhook_patch(&pod));
    assert_kubernetes_accepts(&out);
    assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 200);
    assert_reinvocation_is_a_no_op(&out);
}

/// The objects in `yaml` as kubectl's own manifest decoder reads them (`kubectl label --local`
/// prints one JSON object per object read).
fn kubectl_read(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(KUBECTL)
        .args([
            "label",
            "--local",
            "-f",
            "-",
            "remora-check=read",
            "-o",
            "json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kubectl could not read the output: {}\n{yaml}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// `remora-injector inject` output, read back by kubectl's own manifest decoder.
#[test]
fn offline_output_is_read_by_kubectl() {
    let input = include_str!("golden/multi-document.in.yaml");
    let injected = remora_injector::offline::inject_documents(input, &Config::default()).unwrap();
    let items = kubectl_read(&injected.output);
    let kinds: BTreeMap<String, usize> = items.iter().fold(BTreeMap::new(), |mut counts, item| {
        *counts
            .entry(item["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
        counts
    });
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("ConfigMap".to_string(), 1),
            ("Deployment".to_string(), 1),
            ("Job".to_string(), 1),
            ("Pod".to_string(), 2),
            ("Service".to_string(), 1),
            ("StatefulSet".to_string(), 1),
        ])
    );
    for item in &items {
        let pod = match item["kind"].as_str().unwrap() {
            "Pod" => item.clone(),
            "Deployment" | "StatefulSet" => {
                let mut pod = item["spec"]["template"].clone();
                pod["apiVersion"] = json!("v1");
                pod["kind"] = json!("Pod");
                pod
            }
            _ => continue,
        };
        let typed: Pod = serde_json::from_value(pod).unwrap();
        let init = typed.spec.unwrap().init_containers.unwrap_or_default();
        assert_eq!(init[0].name, "remora-init", "{}", item["metadata"]["name"]);
        assert_eq!(init[1].name, "remora-proxy");
    }
}

/// A ReplicationController (core v1) is injected offline like the apps/v1 workloads, and the
/// pods its controller creates are injected by the webhook, which sees pods, not their owners.
#[test]
fn a_replication_controller_is_injected_offline_and_its_pods_by_the_webhook() {
    let input = "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: legacy, namespace: shop}\nspec:\n  replicas: 2\n  selector: {app: legacy}\n  template:\n    metadata: {labels: {app: legacy}}\n    spec:\n      containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]\n";
    let injected = remora_injector::offline::inject_documents(input, &Config::default()).unwrap();
    let items = kubectl_read(&injected.output);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["kind"], "ReplicationController");
    let mut pod = items[0]["spec"]["template"].clone();
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["remora-init", "remora-proxy"]
    );
    assert_kubernetes_accepts(&pod);

    // The controller's pod, as the API server hands it to the webhook.
    let created = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "legacy-", "namespace": "shop", "labels": {"app": "legacy"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "ReplicationController", "name": "legacy",
                "uid": "6f1c1d9e-0000-4000-8000-000000000002", "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]},
    });
    let out = kubectl_patch(&created, &webhook_patch(&created));
    assert_eq!(
        names(&out["spec"]["initContainers"]),
        ["remora-init", "remora-proxy"]
    );
    assert_kubernetes_accepts(&out);
    assert_reinvocation_is_a_no_op(&out);
}

/// kubectl reads YAML 1.1, where plain `yes`, `on`, `n` or `1_000` are not strings: every string
/// the output re-writes must come back from kubectl as the same string.
#[test]
fn offline_output_strings_survive_kubectls_yaml_1_1() {
    let tricky = [
        "yes",
        "Yes",
        "NO",
        "on",
        "Off",
        "y",
        "n",
        "Y",
        "true",
        "False",
        "null",
        "~",
        "",
        "1_000",
        "1:20",
        "0755",
        "0x1F",
        "0o17",
        "1e3",
        ".5",
        ".inf",
        "-.NaN",
        "+1",
        "2024-01-01",
        "12",
        "-",
        "- a",
        "a: b",
        "a #b",
        "#c",
        "<<",
        "=",
        "@x",
        "`x",
        "!x",
        "&x",
        "*x",
        "|",
        ">",
        "%x",
        "?",
        "? x",
        "[a]",
        "{a}",
        "'q'",
        "\"q\"",
        " lead",
        "trail ",
        "tab\tin",
        "line1\nline2",
        "line1\nline2\n",
        "ends\n\n",
        "\nlead",
        "  indented\nx",
        "bell\u{7}",
        "ünïcødé",
        "a\\b",
        "x\r\ny",
        "sep\u{2028}x",
        "nel\u{85}x",
        "100m",
        "64Mi",
        "24h",
        "12h",
        "--since",
        "-c",
        "1E",
        "0b1",
        "1493e89",
        "2001-12-14t21:59:43.10-05:00",
        "it's",
    ];
    let env: Vec<Value> = tricky
        .iter()
        .enumerate()
        .map(|(i, value)| json!({"name": format!("V{i}"), "value": value}))
        .collect();
    let labels: serde_json::Map<String, Value> = ["yes", "on", "n", "1_000", "0755", "true"]
        .iter()
        .enumerate()
        .map(|(i, value)| (format!("l{i}"), json!(value)))
        .collect();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tricky", "labels": labels, "annotations": {"yes": "no", "on": "off"}},
        "spec": {"containers": [{"name": "app", "image": "busybox", "command": tricky.to_vec(), "env": env}]},
    });
    let injected = remora_injector::offline::inject_documents(
        &serde_json::to_string_pretty(&pod).unwrap(),
        &Config::default(),
    )
    .unwrap();
    let read = kubectl_read(&injected.output).remove(0);
    assert_eq!(read["spec"]["containers"], pod["spec"]["containers"]);
    assert_eq!(read["metadata"]["annotations"]["yes"], "no");
    assert_eq!(read["metadata"]["annotations"]["on"], "off");
    for (key, value) in pod["metadata"]["labels"].as_object().unwrap() {
        assert_eq!(&read["metadata"]["labels"][key], value, "label {key}");
    }
    assert_eq!(read["spec"]["initContainers"][1]["name"], "remora-proxy");
}

/// Every golden output, as users pipe it to `kubectl apply -f -`, is read by kubectl.
#[test]
fn every_golden_output_is_read_by_kubectl() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".out.yaml") {
            continue;
        }
        let yaml = std::fs::read_to_string(&path).unwrap();
        let documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|document| serde::Deserialize::deserialize(document).unwrap())
            .collect();
        let objects: usize = documents
            .iter()
            .map(|document| match document["kind"].as_str() {
                Some("List") => document["items"].as_array().map_or(0, Vec::len),
                _ => 1,
            })
            .sum();
        assert_eq!(kubectl_read(&yaml).len(), objects, "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} golden outputs found");
}
