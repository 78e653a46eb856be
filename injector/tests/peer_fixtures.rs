//! The injector test inputs of Istio and Linkerd, read in place from the shared peer data (and
//! skipped where it is absent): every document comes out injected, warned about, or is no
//! workload at all, so `inject | kubectl apply` never leaves a workload unmeshed silently.

use std::path::PathBuf;

use remora_injector::config::Config;
use remora_injector::offline::{inject_documents, OfflineError};
use serde_json::Value;

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
