//! The injector test inputs of Istio and Linkerd, read in place from the shared peer data (and
//! skipped where it is absent): every document comes out injected, warned about, or is no
//! workload at all, so `inject | kubectl apply` never leaves a workload unmeshed silently.

use std::path::PathBuf;

use base64::Engine as _;

use remora_injector::config::Config;
use remora_injector::offline::{inject_documents, OfflineError};
use remora_injector::review::{review, Outcome, WebhookPath};
use serde_json::{json, Value};

const FIXTURES: &str = "shared/peer-data/injector-fixtures";

/// `REMORA_PEER_FIXTURES`, else the first `shared/peer-data/injector-fixtures` above the crate.
fn fixtures_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("REMORA_PEER_FIXTURES") {
        return Some(PathBuf::from(dir));
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join(FIXTURES))
        .find(|dir| dir.is_dir())
}

/// The objects of a YAML stream, the items of a `List` in its place.
fn objects(yaml: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(document).unwrap();
        match value["items"].as_array() {
            Some(items) if value["kind"] == "List" => objects.extend(items.iter().cloned()),
            _ if value.is_null() => {}
            _ => objects.push(value),
        }
    }
    objects
}

/// The pod spec a workload carries, wherever its kind keeps it.
fn pod_spec(object: &Value) -> Option<&Value> {
    let spec = &object["spec"];
    [
        &spec["template"]["spec"],
        &spec["jobTemplate"]["spec"]["template"]["spec"],
    ]
    .into_iter()
    .find(|candidate| candidate.is_object())
    .or_else(|| spec["containers"].is_array().then_some(spec))
}

/// `Kind namespace/name`, as the injector's messages name an object.
fn described(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("object");
    let name = object["metadata"]["name"].as_str().unwrap_or("(unnamed)");
    match object["metadata"]["namespace"].as_str() {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The pod an object's controller would create from its pod spec.
fn created_pod(object: &Value, spec: &Value) -> Value {
    let template = &object["spec"]["template"];
    let metadata = if object["kind"] == "Pod" || !template["spec"].is_object() {
        &object["metadata"]
    } else {
        &template["metadata"]
    };
    let metadata = if metadata.is_object() {
        metadata.clone()
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

/// The pod's creation as the API server sends it to the webhook.
fn admission_review(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "5b0c51d2-0000-4000-8000-000000000003",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "peer",
            "operation": "CREATE",
            "object": pod,
        }
    }))
    .unwrap()
}

/// The same workloads' pods through the webhook: each is injected (and a second review of the
/// result leaves it alone, silently), left alone with a warning, or denied with a message.
#[test]
fn every_peer_pod_is_decided_by_the_webhook() {
    let Some(dir) = fixtures_dir() else {
        eprintln!(
            "skipped: no {FIXTURES} above {}",
            env!("CARGO_MANIFEST_DIR")
        );
        return;
    };
    let config = Config::default();
    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    for project in ["istio", "linkerd"] {
        for entry in std::fs::read_dir(dir.join(project)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.display();
            let input = std::fs::read_to_string(&path).unwrap();
            // Linkerd's deliberately broken input is the offline test's business.
            if inject_documents(&input, &config).is_err() {
                continue;
            }
            for object in objects(&input) {
                let Some(spec) = pod_spec(&object) else {
                    continue;
                };
                let described = described(&object);
                let mut pod = created_pod(&object, spec);
                // The API server refuses a non-string annotation or label before admission.
                let strings_only = ["annotations", "labels"].iter().all(|map| {
                    pod["metadata"][*map]
                        .as_object()
                        .is_none_or(|entries| entries.values().all(Value::is_string))
                });
                if !strings_only {
                    *outcomes.entry("refused by the API server").or_default() += 1;
                    continue;
                }
                let decide = |pod: &Value| {
                    review(&admission_review(pod), WebhookPath::Inject, &config)
                        .unwrap_or_else(|err| panic!("{name}: {described}: {err}"))
                };
                let reviewed = decide(&pod);
                let response = &reviewed.response["response"];
                match reviewed.outcome {
                    Outcome::Injected => {
                        let patch = base64::engine::general_purpose::STANDARD
                            .decode(response["patch"].as_str().unwrap())
                            .unwrap();
                        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
                        json_patch::patch(&mut pod, &patch)
                            .unwrap_or_else(|err| panic!("{name}: {described}: {err}"));
                        let again = decide(&pod);
                        assert_eq!(again.outcome, Outcome::Skipped, "{name}: {described}");
                        assert!(
                            again.response["response"].get("warnings").is_none(),
                            "{name}: {described}: {}",
                            again.response
                        );
                    }
                    Outcome::Skipped => assert!(
                        response["warnings"].is_array(),
                        "{name}: {described} left alone without a warning"
                    ),
                    Outcome::Denied => assert!(
                        response["status"]["message"].is_string(),
                        "{name}: {described}"
                    ),
                }
                *outcomes.entry(reviewed.outcome.as_str()).or_default() += 1;
            }
        }
    }
    eprintln!("webhook outcomes: {outcomes:?}");
    assert!(
        outcomes.get("injected").copied().unwrap_or(0) > 100,
        "{outcomes:?}"
    );
}

#[test]
fn every_peer_workload_is_injected_or_warned_about() {
    let Some(dir) = fixtures_dir() else {
        eprintln!(
            "skipped: no {FIXTURES} above {}",
            env!("CARGO_MANIFEST_DIR")
        );
        return;
    };
    let mut files = 0;
    let (mut injected, mut warned, mut not_workloads, mut unparsable) = (0, 0, 0, 0);
    for project in ["istio", "linkerd"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join(project))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
            })
            .collect();
        paths.sort();
        for path in paths {
            files += 1;
            let name = path.display();
            let input = std::fs::read_to_string(&path).unwrap();
            let result = match inject_documents(&input, &Config::default()) {
                Ok(result) => result,
                Err(err @ OfflineError::Parse { .. }) => {
                    // Linkerd's deliberately broken input: one position, counted in the file.
                    let message = err.to_string();
                    assert_eq!(message.matches("line").count(), 1, "{name}: {message}");
                    unparsable += 1;
                    continue;
                }
                Err(err) => panic!("{name}: {err}"),
            };
            for warning in &result.warnings {
                assert!(
                    !warning.contains("  ") && !warning.contains('\n'),
                    "{name}: {warning:?}"
                );
            }
            for object in objects(&result.output) {
                let Some(spec) = pod_spec(&object) else {
                    not_workloads += 1;
                    continue;
                };
                let meshed = spec["initContainers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|container| container["name"] == "remora-proxy");
                let object_name = described(&object);
                let named = result
                    .warnings
                    .iter()
                    .any(|warning| warning.contains(&format!("), {object_name}: ")));
                assert!(
                    meshed || named,
                    "{name}: {object_name} left unmeshed without a warning"
                );
                if meshed {
                    injected += 1;
                } else {
                    warned += 1;
                }
            }
        }
    }
    eprintln!(
        "{files} files: {injected} workloads injected, {warned} left alone with a warning, \
         {not_workloads} other objects, {unparsable} unparsable"
    );
    assert!(
        files >= 140,
        "only {files} fixture files in {}",
        dir.display()
    );
    assert_eq!(
        unparsable, 1,
        "only Linkerd's .bad. input is meant not to parse"
    );
}
