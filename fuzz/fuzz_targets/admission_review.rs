//! The AdmissionReview → decision path (`injector/src/review.rs`, `inject.rs`), through
//! `review::review`, the function the webhook handler calls.
//!
//! Input, by its first byte: even, the rest is an AdmissionReview body as the API server might
//! send it (any bytes); odd, the rest is read as a structure: a pod creation whose labels,
//! annotations (the `remora.io/` keys among them) and namespace are arbitrary strings. Checked:
//! no panic; a valid review always gets an answer, for its uid; an injected pod's JSON Patch
//! applies to the pod it was made for, and the result is still a pod, with the proxy in it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use remora_injector::annotations;
use remora_injector::config::Config;
use remora_injector::inject::PROXY_CONTAINER_NAME;
use remora_injector::review::{review, Outcome, WebhookPath};
use serde_json::{json, Map, Value};

fn config() -> &'static Config {
    static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    CONFIG.get_or_init(Config::default)
}

/// Keys remora reads, so that arbitrary values meet their parsers often.
const KEYS: [&str; 17] = [
    annotations::INJECT,
    annotations::STATUS,
    annotations::PROXY_IMAGE,
    annotations::INIT_IMAGE,
    annotations::PROXY_CPU_REQUEST,
    annotations::PROXY_CPU_LIMIT,
    annotations::PROXY_MEMORY_REQUEST,
    annotations::PROXY_MEMORY_LIMIT,
    annotations::PROXY_LOG_LEVEL,
    annotations::PROXY_UID,
    annotations::INCLUDE_INBOUND_PORTS,
    annotations::EXCLUDE_INBOUND_PORTS,
    annotations::INCLUDE_OUTBOUND_CIDRS,
    annotations::EXCLUDE_OUTBOUND_CIDRS,
    annotations::EXCLUDE_OUTBOUND_PORTS,
    annotations::OPAQUE_PORTS,
    "remora.io/Inject",
];

/// One label or annotation: a key remora reads or any string, and any value.
#[derive(Debug)]
struct Entry(String, String);

impl<'a> Arbitrary<'a> for Entry {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let key = match u.int_in_range(0..=KEYS.len())? {
            i if i < KEYS.len() => KEYS[i].to_string(),
            _ => String::arbitrary(u)?,
        };
        Ok(Self(key, String::arbitrary(u)?))
    }
}

#[derive(Debug, Arbitrary)]
struct PodInput {
    opt_in_path: bool,
    namespace: Option<String>,
    labels: Vec<Entry>,
    annotations: Vec<Entry>,
    host_network: bool,
    /// Ports of the app container.
    ports: Vec<u16>,
    init_container: bool,
}

fn map(entries: &[Entry]) -> Value {
    let mut map = Map::new();
    for Entry(key, value) in entries {
        map.insert(key.clone(), Value::String(value.clone()));
    }
    Value::Object(map)
}

fn pod_review(input: &PodInput) -> Value {
    let ports: Vec<Value> = input
        .ports
        .iter()
        .filter(|&&port| port != 0)
        .take(8)
        .map(|&port| json!({ "containerPort": port }))
        .collect();
    let mut spec = json!({
        "containers": [{ "name": "app", "image": "example/app:1", "ports": ports }],
        "hostNetwork": input.host_network,
    });
    if input.init_container {
        spec["initContainers"] = json!([{ "name": "setup", "image": "busybox:1.36" }]);
    }
    let mut metadata = json!({
        "generateName": "app-",
        "labels": map(&input.labels),
        "annotations": map(&input.annotations),
    });
    if let Some(namespace) = &input.namespace {
        metadata["namespace"] = json!(namespace);
    }
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "fuzz-uid",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "fuzz",
            "operation": "CREATE",
            "object": { "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec },
        },
    })
}

/// Checks an answer; `object` is the pod the review carried.
fn check(response: &Value, object: Option<&Value>, uid: Option<&str>, outcome: Outcome) {
    let answer = &response["response"];
    if let Some(uid) = uid {
        assert_eq!(answer["uid"], uid);
    }
    assert_eq!(answer["allowed"], outcome != Outcome::Denied);
    if outcome == Outcome::Denied {
        let message = answer["status"]["message"]
            .as_str()
            .expect("a deny message");
        assert!(!message.is_empty());
    }
    if outcome != Outcome::Injected {
        assert!(answer.get("patch").is_none());
        return;
    }
    assert_eq!(answer["patchType"], "JSONPatch");
    let patch = answer["patch"].as_str().expect("a base64 patch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
    // The API server always sends a pod's metadata and spec; the patch adds to them. Without
    // them it could not apply, but neither could such a pod be created.
    let Some(object) = object.filter(|o| o["metadata"].is_object() && o["spec"].is_object()) else {
        return;
    };
    let mut patched = object.clone();
    if let Err(error) = json_patch::patch(&mut patched, &patch) {
        panic!("the patch does not apply: {error}\npatch: {patch:?}\nobject: {object}");
    }
    let pod: Pod = serde_json::from_value(patched).expect("the patched pod is a pod");
    let spec = pod.spec.expect("a spec");
    let proxy = |c: &k8s_openapi::api::core::v1::Container| c.name == PROXY_CONTAINER_NAME;
    let in_init = spec.init_containers.iter().flatten().any(proxy);
    assert!(
        in_init || spec.containers.iter().any(proxy),
        "no proxy container"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let path = if mode & 2 == 0 {
            WebhookPath::Inject
        } else {
            WebhookPath::OptIn
        };
        let Ok(reviewed) = review(rest, path, config()) else {
            return;
        };
        // The pod the review carried is what the patch applies to. The fields the webhook
        // ignores are skipped unchecked (a lone surrogate in `userInfo`, say), so the body may
        // not be JSON that reads whole.
        let body = serde_json::from_slice::<Value>(rest).ok();
        let object = body.as_ref().and_then(|body| body["request"].get("object"));
        check(&reviewed.response, object, None, reviewed.outcome);
        return;
    }
    let Ok(input) = PodInput::arbitrary(&mut Unstructured::new(rest)) else {
        return;
    };
    let path = if input.opt_in_path {
        WebhookPath::OptIn
    } else {
        WebhookPath::Inject
    };
    let body = pod_review(&input);
    let bytes = serde_json::to_vec(&body).expect("JSON");
    let reviewed = match review(&bytes, path, config()) {
        Ok(reviewed) => reviewed,
        Err(error) => panic!("a valid pod review was refused: {error}\n{body}"),
    };
    let object = &body["request"]["object"];
    check(
        &reviewed.response,
        Some(object),
        Some("fuzz-uid"),
        reviewed.outcome,
    );
});
