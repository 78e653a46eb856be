//! AdmissionReview in, AdmissionReview out: the webhook's whole answer, built around [`decide`].
//!
//! The response JSON is written here rather than with kube-core's `AdmissionResponse`, which
//! serialises `patch` as an array of numbers; the API server (and the Kubernetes docs) want the
//! base64 string.

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Config;
pub use crate::inject::WebhookPath;
use crate::inject::{decide, Decision};

/// What a review decided, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped,
    Denied,
}

impl Outcome {
    /// The `result` label value of `remora_injector_reviews_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped => "skipped",
            Self::Denied => "denied",
        }
    }
}

/// A decided review: the whole AdmissionReview response body.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub response: serde_json::Value,
    pub outcome: Outcome,
    /// Why the pod was left alone (e.g. `hostNetwork`, `not a pod creation`), for logs.
    pub skip_reason: Option<&'static str>,
    /// `namespace/name` of the pod (`namespace/generateName*` before it has a name), for logs.
    pub pod: String,
}

/// A body that is not an AdmissionReview: answered with HTTP 400 and this message.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    NotAReview(String),
}

const API_VERSION: &str = "admission.k8s.io/v1";

/// The parts of an `admission.k8s.io/v1` AdmissionReview the injector reads. Everything else
/// the API server sends (userInfo, resource, options, …) is accepted and ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionReview {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<AdmissionRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionRequest {
    uid: String,
    kind: Option<GroupVersionKind>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    operation: Option<String>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Decides one AdmissionReview body coming through `path`.
pub fn review(body: &[u8], path: WebhookPath, config: &Config) -> Result<Reviewed, ReviewError> {
    let review: AdmissionReview = serde_json::from_slice(body)
        .map_err(|err| ReviewError::NotAReview(format!("invalid JSON: {err}")))?;
    if review.api_version.as_deref() != Some(API_VERSION)
        || review.kind.as_deref() != Some("AdmissionReview")
    {
        return Err(ReviewError::NotAReview(format!(
            "expected apiVersion {API_VERSION} and kind AdmissionReview, got apiVersion {} and kind {}",
            remora_init::quoted(&review.api_version.unwrap_or_default()),
            remora_init::quoted(&review.kind.unwrap_or_default())
        )));
    }
    let request = review
        .request
        .ok_or_else(|| ReviewError::NotAReview("no request".to_string()))?;

    // A pod itself, not one of its subresources (binding, eviction, ephemeralcontainers, …).
    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|gvk| gvk.group.is_empty() && gvk.kind == "Pod")
        && request
            .sub_resource
            .as_deref()
            .unwrap_or_default()
            .is_empty();
    let named = |name: Option<&str>| {
        format!(
            "{}/{}",
            request.namespace.as_deref().unwrap_or_default(),
            name.unwrap_or("(unnamed)")
        )
    };
    let object = match request.object {
        Some(object) if is_pod && request.operation.as_deref() == Some("CREATE") => object,
        // Only pod creations are ours to change; anything else is let through untouched.
        _ => {
            let pod = named(request.name.as_deref());
            return Ok(skipped(&request.uid, pod, "not a pod creation", None));
        }
    };
    let mut pod: Pod = serde_path_to_error::deserialize(object)
        .map_err(|err| ReviewError::NotAReview(format!("request.object is not a Pod: {err}")))?;
    // A pod being created often has only generateName, and its namespace may be left to the
    // request; fill the namespace in so the decision sees the pod as it will be stored.
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace = request.namespace.clone();
    }
    let generated = pod
        .metadata
        .generate_name
        .as_ref()
        .map(|prefix| format!("{prefix}*"));
    let pod_name = named(pod.metadata.name.as_deref().or(generated.as_deref()));

    Ok(match decide(&pod, path, config) {
        Decision::Inject { patch, warnings } => {
            let patch = serde_json::to_vec(&patch).unwrap_or_default();
            let mut response = json!({
                "uid": request.uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            });
            if !warnings.is_empty() {
                response["warnings"] = json!(warnings);
            }
            Reviewed {
                response: envelope(response),
                outcome: Outcome::Injected,
                skip_reason: None,
                pod: pod_name,
            }
        }
        Decision::Skip { reason, warning } => {
            skipped(&request.uid, pod_name, reason.as_str(), warning)
        }
        Decision::Deny { message } => Reviewed {
            response: envelope(json!({
                "uid": request.uid,
                "allowed": false,
                "status": { "code": 400, "message": message },
            })),
            outcome: Outcome::Denied,
            skip_reason: None,
            pod: pod_name,
        },
    })
}

fn skipped(uid: &str, pod: String, reason: &'static str, warning: Option<String>) -> Reviewed {
    let mut response = json!({ "uid": uid, "allowed": true });
    if let Some(warning) = warning {
        response["warnings"] = json!([warning]);
    }
    Reviewed {
        response: envelope(response),
        outcome: Outcome::Skipped,
        skip_reason: Some(reason),
        pod,
    }
}

fn envelope(response: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission_review(operation: &str, kind: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": "web-", "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        })
    }

    fn run(body: &[u8], path: WebhookPath) -> Reviewed {
        review(body, path, &Config::default()).unwrap()
    }

    #[test]
    fn inject_answers_with_a_base64_json_patch_string() {
        let reviewed = run(
            &admission_review("CREATE", "Pod", pod(json!({}))),
            WebhookPath::Inject,
        );
        assert_eq!(reviewed.outcome, Outcome::Injected);
        // Named for the logs by its generateName until the API server names it.
        assert_eq!(reviewed.pod, "shop/web-*");
        let response = &reviewed.response;
        assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(response["kind"], "AdmissionReview");
        let inner = &response["response"];
        assert_eq!(inner["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(inner["allowed"], true);
        assert_eq!(inner["patchType"], "JSONPatch");
        let encoded = inner["patch"].as_str().expect("patch is a string");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&decoded).unwrap();
        assert!(!patch.0.is_empty());
        assert!(inner.get("warnings").is_none());
        assert!(inner.get("status").is_none());
    }

    #[test]
    fn skips_carry_no_patch_keys() {
        let cases: &[(&str, Vec<u8>, WebhookPath)] = &[
            (
                "update",
                admission_review("UPDATE", "Pod", pod(json!({}))),
                WebhookPath::Inject,
            ),
            (
                "delete without object",
                admission_review("DELETE", "Pod", Value::Null),
                WebhookPath::Inject,
            ),
            (
                "not a pod",
                admission_review("CREATE", "ConfigMap", json!({"data": {}})),
                WebhookPath::Inject,
            ),
            (
                "pod subresource",
                {
                    let mut review: Value =
                        serde_json::from_slice(&admission_review("CREATE", "Pod", pod(json!({}))))
                            .unwrap();
                    review["request"]["subResource"] = json!("ephemeralcontainers");
                    serde_json::to_vec(&review).unwrap()
                },
                WebhookPath::Inject,
            ),
            (
                "opt-in path, no opt-in",
                admission_review("CREATE", "Pod", pod(json!({}))),
                WebhookPath::OptIn,
            ),
            (
                "opted out",
                admission_review("CREATE", "Pod", pod(json!({"remora.io/inject": "false"}))),
                WebhookPath::Inject,
            ),
        ];
        for (name, body, path) in cases {
            let reviewed = run(body, *path);
            assert_eq!(reviewed.outcome, Outcome::Skipped, "case {name}");
            let inner = reviewed.response["response"].as_object().unwrap();
            assert_eq!(inner["allowed"], true, "case {name}");
            assert!(
                !inner.contains_key("patch") && !inner.contains_key("patchType"),
                "case {name}"
            );
            assert!(!inner.contains_key("warnings"), "case {name}");
        }
    }

    #[test]
    fn opt_in_path_injects_a_pod_that_opts_in() {
        let body = admission_review("CREATE", "Pod", pod(json!({"remora.io/inject": "enabled"})));
        assert_eq!(run(&body, WebhookPath::OptIn).outcome, Outcome::Injected);
    }

    #[test]
    fn surprising_skip_warns() {
        let mut object = pod(json!({}));
        object["spec"]["hostNetwork"] = json!(true);
        let reviewed = run(
            &admission_review("CREATE", "Pod", object),
            WebhookPath::Inject,
        );
        assert_eq!(reviewed.outcome, Outcome::Skipped);
        let warnings = reviewed.response["response"]["warnings"]
            .as_array()
            .unwrap();
        assert!(warnings[0].as_str().unwrap().contains("hostNetwork"));
        assert_eq!(reviewed.skip_reason, Some("hostNetwork"));
        assert!(reviewed.response["response"].get("patch").is_none());
    }

    #[test]
    fn deny_has_status_400_and_the_message() {
        let body = admission_review(
            "CREATE",
            "Pod",
            pod(json!({"remora.io/exclude-inbound-ports": "9100-9000"})),
        );
        let reviewed = run(&body, WebhookPath::Inject);
        assert_eq!(reviewed.outcome, Outcome::Denied);
        let inner = &reviewed.response["response"];
        assert_eq!(inner["allowed"], false);
        assert_eq!(inner["status"]["code"], 400);
        let message = inner["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("remora.io/exclude-inbound-ports") && message.contains("9100-9000"),
            "{message}"
        );
        assert!(inner.get("patch").is_none());
    }

    #[test]
    fn not_a_review_is_an_error() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("empty", b"", "invalid JSON"),
            ("garbage", b"\x00\xffnot json", "invalid JSON"),
            ("array", b"[1,2]", "invalid JSON"),
            ("no request", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "no request"),
            ("request without uid", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#, "uid"),
            ("wrong kind", br#"{"apiVersion":"v1","kind":"Pod","request":{"uid":"1"}}"#, "expected apiVersion"),
            (
                "object not a pod",
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"1","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","object":{"spec":{"containers":7}}}}"#,
                "not a Pod: spec.containers: invalid type",
            ),
        ];
        for (name, body, needle) in cases {
            let err = review(body, WebhookPath::Inject, &Config::default())
                .expect_err(name)
                .to_string();
            assert!(
                err.starts_with("not an AdmissionReview") && err.contains(needle),
                "case {name}: {err}"
            );
        }
    }
}
