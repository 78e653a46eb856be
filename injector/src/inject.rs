//! The injection decision and the JSON Patch: a pure function from a Pod and the config.
//!
//! The webhook (`review`) and offline injection (`offline`) both call [`decide`]; nothing here
//! knows HTTP, TLS, files or the clock.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use crate::annotations::{self, InjectChoice, PodSettings, Resources};
use crate::config::{Config, VERSION};
use crate::review::WebhookPath;

pub const INIT_CONTAINER_NAME: &str = "remora-init";
pub const PROXY_CONTAINER_NAME: &str = "remora-proxy";
pub const XTABLES_LOCK_VOLUME: &str = "remora-xtables-lock";
/// Named so that a probe or a Service can refer to it; at most 15 characters, as Kubernetes requires.
pub const ADMIN_PORT_NAME: &str = "remora-admin";
pub const ADMIN_PORT: u16 = remora_init::config::ADMIN_PORT;
/// Ports the proxy listens on inside the pod's network namespace.
const PROXY_PORTS: [u16; 3] = [
    remora_init::config::DEFAULT_OUTBOUND_PORT,
    remora_init::config::DEFAULT_INBOUND_PORT,
    ADMIN_PORT,
];
const OS_LABEL: &str = "kubernetes.io/os";

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Apply this patch; tell the user these warnings.
    Inject { patch: Patch, warnings: Vec<String> },
    /// Leave the pod alone; a reason the user may not expect comes with a warning.
    Skip {
        reason: SkipReason,
        warning: Option<String>,
    },
    /// Refuse the pod: the message names the annotation, the bad value and the accepted form.
    Deny { message: String },
}

/// Why a pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    OptedOut,
    NotOptedIn,
    AlreadyInjected,
    InjectedByHand,
    HostNetwork,
    Windows,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OptedOut => "the pod opts out",
            Self::NotOptedIn => "the pod does not opt in",
            Self::AlreadyInjected => "already injected",
            Self::InjectedByHand => "remora containers already present",
            Self::HostNetwork => "hostNetwork",
            Self::Windows => "windows node",
        }
    }
}

fn skip(reason: SkipReason, warning: Option<String>) -> Decision {
    Decision::Skip { reason, warning }
}

/// Decides whether and how to inject `pod`, per the decision table of SPEC ("Opting in and
/// out", "The webhook"), and builds the patch.
pub fn decide(pod: &Pod, path: WebhookPath, config: &Config) -> Decision {
    let metadata = &pod.metadata;
    let empty_spec = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty_spec);

    match annotations::inject_choice(metadata.labels.as_ref(), metadata.annotations.as_ref()) {
        Err(err) => {
            return Decision::Deny {
                message: err.to_string(),
            }
        }
        Ok(InjectChoice::OptOut) => return skip(SkipReason::OptedOut, None),
        Ok(InjectChoice::Unset) if path == WebhookPath::OptIn => {
            return skip(SkipReason::NotOptedIn, None)
        }
        Ok(InjectChoice::Unset | InjectChoice::OptIn) => {}
    }

    // Our own status annotation: a reinvocation (or injected output fed back in) — silently.
    if metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.contains_key(annotations::STATUS))
    {
        return skip(SkipReason::AlreadyInjected, None);
    }
    if let Some(name) = remora_name_taken(spec) {
        return skip(
            SkipReason::InjectedByHand,
            Some(format!(
                "remora: not injected: the pod already has {name}, so it was set up by hand \
                 (remove it, or opt out with remora.io/inject: \"false\")"
            )),
        );
    }
    if spec.host_network == Some(true) {
        return skip(
            SkipReason::HostNetwork,
            Some(
                "remora: not injected: the pod uses hostNetwork, and redirecting its traffic \
                 would redirect the node's"
                    .to_string(),
            ),
        );
    }
    if requires_windows(spec) {
        return skip(
            SkipReason::Windows,
            Some(
                "remora: not injected: the pod runs on Windows nodes, which remora-init and \
                 remora-proxy do not support"
                    .to_string(),
            ),
        );
    }

    let (settings, mut warnings) =
        match annotations::pod_settings(metadata.annotations.as_ref(), config) {
            Ok(parsed) => parsed,
            Err(err) => {
                return Decision::Deny {
                    message: err.to_string(),
                }
            }
        };
    warnings.extend(collision_warnings(spec, settings.proxy_uid));
    Decision::Inject {
        patch: build_patch(pod, spec, &settings),
        warnings,
    }
}

/// A container, init container or volume already named like one remora adds.
fn remora_name_taken(spec: &PodSpec) -> Option<String> {
    let is_ours = |name: &str| name == INIT_CONTAINER_NAME || name == PROXY_CONTAINER_NAME;
    let containers = spec.containers.iter().map(|c| ("a container", c));
    let init_containers = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| ("an init container", c));
    if let Some((kind, container)) = containers
        .chain(init_containers)
        .find(|(_, container)| is_ours(&container.name))
    {
        return Some(format!("{kind} named {}", container.name));
    }
    spec.volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == XTABLES_LOCK_VOLUME)
        .map(|_| format!("a volume named {XTABLES_LOCK_VOLUME}"))
}

/// Whether the pod can only be scheduled on Windows: `spec.os.name`, a `kubernetes.io/os`
/// nodeSelector, or a required node affinity every term of which asks for Windows only.
fn requires_windows(spec: &PodSpec) -> bool {
    if spec.os.as_ref().is_some_and(|os| os.name == "windows") {
        return true;
    }
    if spec
        .node_selector
        .as_ref()
        .and_then(|selector| selector.get(OS_LABEL))
        .is_some_and(|os| os == "windows")
    {
        return true;
    }
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|affinity| affinity.node_affinity.as_ref())
        .and_then(|node| {
            node.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|required| required.node_selector_terms.as_slice())
        .unwrap_or_default();
    // Terms are ORed: Windows is required only if every term requires it. Within a term the
    // expressions are ANDed: one `kubernetes.io/os In [windows]` is enough.
    !terms.is_empty()
        && terms.iter().all(|term| {
            term.match_expressions.iter().flatten().any(|expression| {
                expression.key == OS_LABEL
                    && expression.operator == "In"
                    && expression.values.as_ref().is_some_and(|values| {
                        !values.is_empty() && values.iter().all(|v| v == "windows")
                    })
            })
        })
}

/// Warnings for pod containers that would bypass or collide with the proxy.
fn collision_warnings(spec: &PodSpec, proxy_uid: u32) -> Vec<String> {
    let pod_uid = spec
        .security_context
        .as_ref()
        .and_then(|context| context.run_as_user);
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    let mut warnings = Vec::new();
    for container in all {
        let uid = container
            .security_context
            .as_ref()
            .and_then(|context| context.run_as_user)
            .or(pod_uid);
        if uid == Some(i64::from(proxy_uid)) {
            warnings.push(format!(
                "remora: container {} runs as uid {proxy_uid}, the proxy's uid: its traffic is \
                 not redirected and bypasses the proxy (set remora.io/proxy-uid to another uid)",
                container.name
            ));
        }
        for port in container.ports.iter().flatten() {
            if PROXY_PORTS
                .iter()
                .any(|&p| i32::from(p) == port.container_port)
            {
                warnings.push(format!(
                    "remora: container {} declares port {}, which remora-proxy uses \
                     (15001, 15006 and 15020 are reserved in a meshed pod)",
                    container.name, port.container_port
                ));
            }
        }
    }
    warnings
}

/// The `remora.io/status` annotation's value: what was injected, by which version.
pub fn status_annotation() -> String {
    json!({
        "version": VERSION,
        "initContainers": [INIT_CONTAINER_NAME, PROXY_CONTAINER_NAME],
        "volumes": [XTABLES_LOCK_VOLUME],
    })
    .to_string()
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    // `from_tokens` escapes `~` and `/` inside a token (as `~0` and `~1`).
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    // Serialising k8s-openapi types into a Value cannot fail: no maps with non-string keys.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The explicit RFC 6902 operations: every missing map or list is created before anything is
/// added into it, so the patch applies to any valid pod.
fn build_patch(pod: &Pod, spec: &PodSpec, settings: &PodSettings) -> Patch {
    let mut operations = Vec::new();

    let status = (annotations::STATUS.to_string(), status_annotation());
    match &pod.metadata.annotations {
        None => operations.push(add(
            pointer(&["metadata", "annotations"]),
            json!({ status.0: status.1 }),
        )),
        Some(_) => operations.push(add(
            pointer(&["metadata", "annotations", &status.0]),
            Value::String(status.1),
        )),
    }

    let init = to_value(&init_container(settings));
    let proxy = to_value(&proxy_container(settings));
    match &spec.init_containers {
        None => operations.push(add(
            pointer(&["spec", "initContainers"]),
            Value::Array(vec![init, proxy]),
        )),
        Some(_) => {
            operations.push(add(pointer(&["spec", "initContainers", "0"]), init));
            operations.push(add(pointer(&["spec", "initContainers", "1"]), proxy));
        }
    }

    let volume = to_value(&Volume {
        name: XTABLES_LOCK_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    match &spec.volumes {
        None => operations.push(add(
            pointer(&["spec", "volumes"]),
            Value::Array(vec![volume]),
        )),
        Some(_) => operations.push(add(pointer(&["spec", "volumes", "-"]), volume)),
    }

    Patch(operations)
}

fn resources(resources: &Resources) -> ResourceRequirements {
    let quantity = |q: &annotations::Quantity| K8sQuantity(q.as_str().to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), quantity(&resources.cpu_request)),
            ("memory".to_string(), quantity(&resources.memory_request)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), quantity(&resources.cpu_limit)),
            ("memory".to_string(), quantity(&resources.memory_limit)),
        ])),
        ..ResourceRequirements::default()
    }
}

fn runtime_default_seccomp() -> Option<SeccompProfile> {
    Some(SeccompProfile {
        type_: "RuntimeDefault".to_string(),
        ..SeccompProfile::default()
    })
}

/// `remora-init`: root with NET_ADMIN/NET_RAW, for iptables-restore only; `/run` is writable
/// for iptables' lock file while the root filesystem is read-only.
fn init_container(settings: &PodSettings) -> Container {
    Container {
        name: INIT_CONTAINER_NAME.to_string(),
        image: Some(settings.init_image.clone()),
        args: Some(settings.init.to_args()),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                drop: Some(vec!["ALL".to_string()]),
            }),
            seccomp_profile: runtime_default_seccomp(),
            ..SecurityContext::default()
        }),
        resources: Some(resources(&settings.init_resources)),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_LOCK_VOLUME.to_string(),
            mount_path: "/run".to_string(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn downward_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn admin_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Option<Probe> {
    Some(Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    })
}

/// `remora-proxy`: a native sidecar (an init container with `restartPolicy: Always`), so it
/// starts before — and, through its startup probe, is ready before — the pod's own containers.
fn proxy_container(settings: &PodSettings) -> Container {
    let uid = i64::from(settings.proxy_uid);
    Container {
        name: PROXY_CONTAINER_NAME.to_string(),
        image: Some(settings.proxy_image.clone()),
        args: Some(vec![
            "--log-level".to_string(),
            settings.proxy_log_level.to_string(),
            "--opaque-ports".to_string(),
            settings.opaque_ports.to_string(),
        ]),
        restart_policy: Some("Always".to_string()),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.to_string()),
            container_port: i32::from(ADMIN_PORT),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        env: Some(vec![
            downward_env("POD_NAME", "metadata.name"),
            downward_env("POD_NAMESPACE", "metadata.namespace"),
            downward_env("POD_IP", "status.podIP"),
        ]),
        // Checked every second for up to two minutes: the pod's own containers wait for it.
        startup_probe: admin_probe("/ready", 1, 120),
        readiness_probe: admin_probe("/ready", 5, 3),
        liveness_probe: admin_probe("/live", 10, 3),
        security_context: Some(SecurityContext {
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            seccomp_profile: runtime_default_seccomp(),
            ..SecurityContext::default()
        }),
        resources: Some(resources(&settings.proxy_resources)),
        ..Container::default()
    }
}
