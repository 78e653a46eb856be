//! The injection decision and the JSON Patch: a pure function from a Pod and the config.
//!
//! The webhook (`review`) and offline injection (`offline`) both call [`decide`]; nothing here
//! knows HTTP, TLS, files or the clock.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use crate::annotations::{self, InjectChoice, PodSettings};
use crate::config::{Config, VERSION};
use crate::probes;
use crate::values::{Quantity, Resources};
use remora_init::mtls::InboundMtls;

pub const INIT_CONTAINER_NAME: &str = "remora-init";
pub const PROXY_CONTAINER_NAME: &str = "remora-proxy";
pub const XTABLES_LOCK_VOLUME: &str = "remora-xtables-lock";
/// The projected ServiceAccount token the proxy trades for its workload certificate.
pub const IDENTITY_TOKEN_VOLUME: &str = "remora-identity-token";
/// Where the proxy finds the token (as `token`): its `--identity-token` default is in there.
pub const IDENTITY_TOKEN_DIR: &str = "/var/run/secrets/remora.io/identity";
/// The audience remora-control's TokenReview asks for: a token for the API server won't do.
pub const IDENTITY_TOKEN_AUDIENCE: &str = "remora.io/identity";
/// An hour, Kubernetes' default for a projected token; kubelet renews it at 80 % of that.
const IDENTITY_TOKEN_SECONDS: i64 = 3600;
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
/// The proxy's variable for the PEM CA certificates that verify remora-control.
pub const TRUST_ANCHORS_ENV: &str = "REMORA_TRUST_ANCHORS";

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

/// Which of the two webhooks a review came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookPath {
    /// `POST /inject`: namespaces labelled `remora.io/inject=enabled`; inject unless the pod opts out.
    Inject,
    /// `POST /inject/opt-in`: every other namespace; inject only a pod that opts in.
    OptIn,
}

impl WebhookPath {
    /// The URL path, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inject => "/inject",
            Self::OptIn => "/inject/opt-in",
        }
    }
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
            // A near miss such as `remora.io/Inject` would otherwise leave the pod out silently.
            let warning = misspelled_inject(metadata).map(|(kind, key)| {
                format!(
                    "remora: not injected: the pod does not opt in; its {kind} {key} is not \
                     read (did you mean {}?)",
                    annotations::INJECT
                )
            });
            return skip(SkipReason::NotOptedIn, warning);
        }
        Ok(InjectChoice::Unset | InjectChoice::OptIn) => {}
    }

    // Our own status annotation: a reinvocation (or injected output fed back in) — silently,
    // unless the remora containers are missing: then the annotation was copied from an
    // injected pod (`kubectl get pod -o yaml`), and the user expects a meshed pod.
    if metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.contains_key(annotations::STATUS))
    {
        let warning = remora_name_taken(spec).is_none().then(|| {
            format!(
                "remora: not injected: the pod carries the {} annotation but no remora \
                 containers (copied from an injected pod?); remove the annotation to inject it",
                annotations::STATUS
            )
        });
        return skip(SkipReason::AlreadyInjected, warning);
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

    let (mut settings, mut warnings) =
        match annotations::pod_settings(metadata.annotations.as_ref(), config) {
            Ok(parsed) => parsed,
            Err(err) => {
                return Decision::Deny {
                    message: err.to_string(),
                }
            }
        };
    // Strict mode refuses plaintext, and so does an allow-from list (a plaintext client has no
    // identity to be on it); kubelet's probes are plaintext: the proxy is told which of them to
    // let through.
    if settings.inbound_mtls == Some(InboundMtls::Strict) || !settings.allow_from.is_anyone() {
        match probes::inbound_probes(spec, &settings.init) {
            Ok(probes) => settings.inbound_probes = probes,
            Err(message) => return Decision::Deny { message },
        }
    }
    // Misspelled annotations are warned about by `pod_settings`; only `remora.io/inject` is
    // read as a label, so a near miss among the labels is told here.
    if let Some(("label", key)) = misspelled_inject(metadata) {
        warnings.push(format!(
            "remora: label {key} is not one remora reads and is ignored (did you mean {}?)",
            annotations::INJECT
        ));
    }
    warnings.extend(collision_warnings(spec, settings.proxy_uid));
    let identity = pod_identity(pod, &config.trust_domain);
    Decision::Inject {
        patch: build_patch(pod, spec, &settings, &identity),
        warnings,
    }
}

/// The first `remora.io/` label or annotation (labels first) that is no key remora reads and
/// most likely meant `remora.io/inject`.
fn misspelled_inject(metadata: &ObjectMeta) -> Option<(&'static str, &str)> {
    let labels = metadata
        .labels
        .iter()
        .flatten()
        .map(|(key, _)| ("label", key));
    let annotation_keys = metadata
        .annotations
        .iter()
        .flatten()
        .map(|(key, _)| ("annotation", key));
    labels
        .chain(annotation_keys)
        .map(|(kind, key)| (kind, key.as_str()))
        .find(|(_, key)| {
            key.starts_with(annotations::PREFIX)
                && !annotations::KNOWN.contains(key)
                && annotations::closest_known(key) == Some(annotations::INJECT)
        })
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
        .find(|volume| volume.name == XTABLES_LOCK_VOLUME || volume.name == IDENTITY_TOKEN_VOLUME)
        .map(|volume| format!("a volume named {}", volume.name))
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
    let pod_context = spec.security_context.as_ref();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    let mut warnings = Vec::new();
    for container in all {
        let context = container.security_context.as_ref();
        // remora-init exempts the proxy's uid and its gid (the same number): either one
        // inherited from the pod or set on the container lets traffic skip the proxy.
        let uid = context
            .and_then(|c| c.run_as_user)
            .or(pod_context.and_then(|c| c.run_as_user));
        let gid = context
            .and_then(|c| c.run_as_group)
            .or(pod_context.and_then(|c| c.run_as_group));
        let proxy_id = Some(i64::from(proxy_uid));
        let runs_as = match (uid == proxy_id, gid == proxy_id) {
            (true, _) => Some("uid"),
            (false, true) => Some("gid"),
            (false, false) => None,
        };
        if let Some(id) = runs_as {
            warnings.push(format!(
                "remora: container {} runs as {id} {proxy_uid}, the proxy's {id}: its traffic is \
                 not redirected and bypasses the proxy (set remora.io/proxy-uid to another uid)",
                container.name
            ));
        }
        // The proxy listens on TCP only; a UDP or SCTP port of the same number is no clash.
        let tcp_ports = container
            .ports
            .iter()
            .flatten()
            .filter(|port| port.protocol.as_deref().is_none_or(|p| p == "TCP"));
        for port in tcp_ports {
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

/// The `remora.io/status` annotation's value: what was injected, by which version, and the
/// identity the pod's proxy will be certified as (remora-control reads it to know which
/// endpoints are meshed, and as whom).
pub fn status_annotation(identity: &str) -> String {
    json!({
        "version": VERSION,
        "initContainers": [INIT_CONTAINER_NAME, PROXY_CONTAINER_NAME],
        "volumes": [XTABLES_LOCK_VOLUME, IDENTITY_TOKEN_VOLUME],
        "identity": identity,
    })
    .to_string()
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`: the SAN remora-control signs
/// for this pod's token. The namespace is the pod's (the webhook fills it in from the request;
/// `default` when nothing names one); the ServiceAccount is `serviceAccountName`, else the
/// deprecated `serviceAccount`, else `default` — as the API server's ServiceAccount admission
/// resolves it.
pub fn pod_identity(pod: &Pod, trust_domain: &str) -> String {
    let non_empty = |name: Option<&String>| name.filter(|name| !name.is_empty()).cloned();
    let namespace =
        non_empty(pod.metadata.namespace.as_ref()).unwrap_or_else(|| "default".to_string());
    let spec = pod.spec.as_ref();
    let service_account = non_empty(spec.and_then(|spec| spec.service_account_name.as_ref()))
        .or_else(|| non_empty(spec.and_then(|spec| spec.service_account.as_ref())))
        .unwrap_or_else(|| "default".to_string());
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Puts `name`, `image` and `args` first (k8s-openapi writes fields alphabetically), so that
/// `inject` output and `kubectl get -o yaml` of a fresh pod read naturally.
fn readable(container: Value) -> Value {
    let Value::Object(mut fields) = container else {
        return container;
    };
    let mut ordered = serde_json::Map::new();
    for key in ["name", "image", "args"] {
        if let Some(value) = fields.shift_remove(key) {
            ordered.insert(key.to_string(), value);
        }
    }
    ordered.extend(fields);
    Value::Object(ordered)
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
fn build_patch(pod: &Pod, spec: &PodSpec, settings: &PodSettings, identity: &str) -> Patch {
    let mut operations = Vec::new();

    let status = (annotations::STATUS.to_string(), status_annotation(identity));
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

    let init = readable(to_value(&init_container(settings)));
    let proxy = readable(to_value(&proxy_container(settings)));
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

    let volumes = [xtables_lock_volume(), identity_token_volume()].map(|v| to_value(&v));
    match &spec.volumes {
        None => operations.push(add(
            pointer(&["spec", "volumes"]),
            Value::Array(volumes.into()),
        )),
        Some(_) => operations.extend(
            volumes
                .into_iter()
                .map(|volume| add(pointer(&["spec", "volumes", "-"]), volume)),
        ),
    }

    Patch(operations)
}

fn xtables_lock_volume() -> Volume {
    Volume {
        name: XTABLES_LOCK_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

/// A projected token rather than the pod's own ServiceAccount token: it is for remora-control
/// alone (its audience), it expires, and it is there even with `automountServiceAccountToken:
/// false`, which governs only the API server token.
fn identity_token_volume() -> Volume {
    Volume {
        name: IDENTITY_TOKEN_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(IDENTITY_TOKEN_AUDIENCE.to_string()),
                    expiration_seconds: Some(IDENTITY_TOKEN_SECONDS),
                    path: "token".to_string(),
                    ..ServiceAccountTokenProjection::default()
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn resources(resources: &Resources) -> ResourceRequirements {
    let quantity = |q: &Quantity| K8sQuantity(q.as_str().to_string());
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

fn proxy_args(settings: &PodSettings) -> Vec<String> {
    let mut args = vec![
        "--log-level".to_string(),
        settings.proxy_log_level.to_string(),
        "--opaque-ports".to_string(),
        settings.opaque_ports.to_string(),
    ];
    if let Some(limit) = settings.inbound_rate_limit {
        args.extend(["--inbound-rate-limit".to_string(), limit.to_string()]);
    }
    if let Some(mode) = settings.inbound_mtls {
        args.extend(["--inbound-mtls".to_string(), mode.to_string()]);
    }
    if !settings.allow_from.is_anyone() {
        args.extend(["--allow-from".to_string(), settings.allow_from.to_string()]);
    }
    if !settings.inbound_probes.is_empty() {
        args.extend([
            "--inbound-probes".to_string(),
            settings.inbound_probes.to_string(),
        ]);
    }
    if let Some(control) = &settings.control_addr {
        args.extend(["--control".to_string(), control.to_string()]);
    }
    args
}

/// The pod's identity from the downward API (the proxy names itself to the control plane with
/// it), and the CAs that verify the control plane.
fn proxy_env(settings: &PodSettings) -> Vec<EnvVar> {
    let mut env = vec![
        downward_env("POD_NAME", "metadata.name"),
        downward_env("POD_NAMESPACE", "metadata.namespace"),
        downward_env("POD_IP", "status.podIP"),
    ];
    if let Some(anchors) = &settings.trust_anchors {
        env.push(EnvVar {
            name: TRUST_ANCHORS_ENV.to_string(),
            value: Some(anchors.pem().to_string()),
            ..EnvVar::default()
        });
    }
    env
}

/// `remora-proxy`: a native sidecar (an init container with `restartPolicy: Always`), so it
/// starts before — and, through its startup probe, is ready before — the pod's own containers.
fn proxy_container(settings: &PodSettings) -> Container {
    let uid = i64::from(settings.proxy_uid);
    Container {
        name: PROXY_CONTAINER_NAME.to_string(),
        image: Some(settings.proxy_image.clone()),
        args: Some(proxy_args(settings)),
        restart_policy: Some("Always".to_string()),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.to_string()),
            container_port: i32::from(ADMIN_PORT),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        env: Some(proxy_env(settings)),
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
        // Only the proxy sees the token: the app's containers have no use for it, and a token
        // they could read would let them pass for the pod's identity elsewhere.
        volume_mounts: Some(vec![VolumeMount {
            name: IDENTITY_TOKEN_VOLUME.to_string(),
            mount_path: IDENTITY_TOKEN_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use pretty_assertions::assert_eq;
    use serde_json::json;

    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("test pod parses")
    }

    fn base_pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        })
    }

    /// `base_pod` with `edit` applied to its JSON.
    fn pod_with(edit: impl Fn(&mut Value)) -> Pod {
        let mut value = base_pod();
        edit(&mut value);
        pod(value)
    }

    fn annotate(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&mut Value) {
        move |pod| {
            for (key, value) in pairs {
                pod["metadata"]["annotations"][*key] = json!(value);
            }
        }
    }

    fn label(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&mut Value) {
        move |pod| {
            for (key, value) in pairs {
                pod["metadata"]["labels"][*key] = json!(value);
            }
        }
    }

    #[derive(Debug, PartialEq)]
    enum Want {
        Inject,
        Skip(SkipReason, bool),
        Deny(&'static str),
    }

    fn summary(decision: &Decision) -> Want {
        match decision {
            Decision::Inject { .. } => Want::Inject,
            Decision::Skip { reason, warning } => Want::Skip(*reason, warning.is_some()),
            Decision::Deny { .. } => Want::Deny(""),
        }
    }

    /// One row per case of the decision table: name, webhook path, pod, wanted outcome.
    fn decision_cases() -> Vec<(&'static str, WebhookPath, Pod, Want)> {
        use SkipReason::*;
        use WebhookPath::{Inject as Enabled, OptIn};
        let windows_affinity = |terms: Value| {
            move |pod: &mut Value| {
                pod["spec"]["affinity"] = json!({"nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms.clone()}
                }});
            }
        };
        let os_in = |values: &[&str]| json!({"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": values}]});
        vec![
            (
                "enabled namespace, pod says nothing",
                Enabled,
                pod(base_pod()),
                Want::Inject,
            ),
            (
                "enabled namespace, annotation true",
                Enabled,
                pod_with(annotate(&[("remora.io/inject", "true")])),
                Want::Inject,
            ),
            (
                "enabled namespace, annotation false",
                Enabled,
                pod_with(annotate(&[("remora.io/inject", "false")])),
                Want::Skip(OptedOut, false),
            ),
            (
                "enabled namespace, annotation disabled",
                Enabled,
                pod_with(annotate(&[("remora.io/inject", "disabled")])),
                Want::Skip(OptedOut, false),
            ),
            (
                "enabled namespace, label false",
                Enabled,
                pod_with(label(&[("remora.io/inject", "false")])),
                Want::Skip(OptedOut, false),
            ),
            (
                "label true beats annotation false",
                Enabled,
                pod_with(|p| {
                    annotate(&[("remora.io/inject", "false")])(p);
                    label(&[("remora.io/inject", "true")])(p)
                }),
                Want::Inject,
            ),
            (
                "label false beats annotation true",
                OptIn,
                pod_with(|p| {
                    annotate(&[("remora.io/inject", "true")])(p);
                    label(&[("remora.io/inject", "false")])(p)
                }),
                Want::Skip(OptedOut, false),
            ),
            (
                "opt-in path, pod says nothing",
                OptIn,
                pod(base_pod()),
                Want::Skip(NotOptedIn, false),
            ),
            (
                "opt-in path, annotation true",
                OptIn,
                pod_with(annotate(&[("remora.io/inject", "true")])),
                Want::Inject,
            ),
            (
                "opt-in path, annotation enabled",
                OptIn,
                pod_with(annotate(&[("remora.io/inject", "enabled")])),
                Want::Inject,
            ),
            (
                "opt-in path, label enabled",
                OptIn,
                pod_with(label(&[("remora.io/inject", "enabled")])),
                Want::Inject,
            ),
            (
                "opt-in path, annotation false",
                OptIn,
                pod_with(annotate(&[("remora.io/inject", "false")])),
                Want::Skip(OptedOut, false),
            ),
            (
                "unknown inject annotation value",
                Enabled,
                pod_with(annotate(&[("remora.io/inject", "yes")])),
                Want::Deny(""),
            ),
            (
                "unknown inject label value",
                OptIn,
                pod_with(label(&[("remora.io/inject", "on")])),
                Want::Deny(""),
            ),
            (
                "hostNetwork",
                Enabled,
                pod_with(|p| p["spec"]["hostNetwork"] = json!(true)),
                Want::Skip(HostNetwork, true),
            ),
            (
                "hostNetwork false",
                Enabled,
                pod_with(|p| p["spec"]["hostNetwork"] = json!(false)),
                Want::Inject,
            ),
            (
                "hostNetwork but opted out: no warning",
                Enabled,
                pod_with(|p| {
                    p["spec"]["hostNetwork"] = json!(true);
                    annotate(&[("remora.io/inject", "false")])(p)
                }),
                Want::Skip(OptedOut, false),
            ),
            (
                "hostNetwork on opt-in path without opt-in: no warning",
                OptIn,
                pod_with(|p| p["spec"]["hostNetwork"] = json!(true)),
                Want::Skip(NotOptedIn, false),
            ),
            (
                "already injected (status annotation and containers): silent",
                Enabled,
                pod_with(|p| {
                    annotate(&[("remora.io/status", "{}")])(p);
                    p["spec"]["initContainers"] = json!([{"name": "remora-init", "image": "x"}, {"name": "remora-proxy", "image": "x"}]);
                }),
                Want::Skip(AlreadyInjected, false),
            ),
            (
                "status annotation without remora containers (copied from an injected pod): warns",
                Enabled,
                pod_with(annotate(&[("remora.io/status", "{}")])),
                Want::Skip(AlreadyInjected, true),
            ),
            (
                "opt-in path, misspelled inject annotation: warns",
                OptIn,
                pod_with(annotate(&[("remora.io/Inject", "true")])),
                Want::Skip(NotOptedIn, true),
            ),
            (
                "opt-in path, misspelled inject label: warns",
                OptIn,
                pod_with(label(&[("remora.io/injection", "enabled")])),
                Want::Skip(NotOptedIn, true),
            ),
            (
                "opt-in path, an unrelated remora.io annotation: silent",
                OptIn,
                pod_with(annotate(&[("remora.io/proxy-cpu-limit", "2")])),
                Want::Skip(NotOptedIn, false),
            ),
            (
                "container named remora-proxy",
                Enabled,
                pod_with(
                    |p| p["spec"]["containers"] = json!([{"name": "web", "image": "nginx"}, {"name": "remora-proxy", "image": "x"}]),
                ),
                Want::Skip(InjectedByHand, true),
            ),
            (
                "init container named remora-init",
                Enabled,
                pod_with(|p| {
                    p["spec"]["initContainers"] = json!([{"name": "remora-init", "image": "x"}])
                }),
                Want::Skip(InjectedByHand, true),
            ),
            (
                "init container named remora-proxy",
                Enabled,
                pod_with(|p| {
                    p["spec"]["initContainers"] = json!([{"name": "remora-proxy", "image": "x"}])
                }),
                Want::Skip(InjectedByHand, true),
            ),
            (
                "volume named remora-xtables-lock",
                Enabled,
                pod_with(|p| {
                    p["spec"]["volumes"] = json!([{"name": "remora-xtables-lock", "emptyDir": {}}])
                }),
                Want::Skip(InjectedByHand, true),
            ),
            (
                "nodeSelector windows",
                Enabled,
                pod_with(|p| p["spec"]["nodeSelector"] = json!({"kubernetes.io/os": "windows"})),
                Want::Skip(Windows, true),
            ),
            (
                "nodeSelector linux",
                Enabled,
                pod_with(|p| p["spec"]["nodeSelector"] = json!({"kubernetes.io/os": "linux"})),
                Want::Inject,
            ),
            (
                "spec.os windows",
                Enabled,
                pod_with(|p| p["spec"]["os"] = json!({"name": "windows"})),
                Want::Skip(Windows, true),
            ),
            (
                "required affinity windows",
                Enabled,
                pod_with(windows_affinity(json!([os_in(&["windows"])]))),
                Want::Skip(Windows, true),
            ),
            (
                "required affinity: every term windows",
                Enabled,
                pod_with(windows_affinity(json!([
                    os_in(&["windows"]),
                    os_in(&["windows"])
                ]))),
                Want::Skip(Windows, true),
            ),
            (
                "required affinity: one term allows linux",
                Enabled,
                pod_with(windows_affinity(json!([
                    os_in(&["windows"]),
                    os_in(&["linux"])
                ]))),
                Want::Inject,
            ),
            (
                "required affinity: windows or linux",
                Enabled,
                pod_with(windows_affinity(json!([os_in(&["windows", "linux"])]))),
                Want::Inject,
            ),
            (
                "required affinity NotIn windows",
                Enabled,
                pod_with(windows_affinity(
                    json!([{"matchExpressions": [{"key": "kubernetes.io/os", "operator": "NotIn", "values": ["windows"]}]}]),
                )),
                Want::Inject,
            ),
            (
                "preferred affinity windows only",
                Enabled,
                pod_with(
                    |p| p["spec"]["affinity"] = json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": os_in(&["windows"])}]}}),
                ),
                Want::Inject,
            ),
            (
                "malformed config annotation",
                Enabled,
                pod_with(annotate(&[(
                    "remora.io/exclude-outbound-cidrs",
                    "10.0.0.0/40",
                )])),
                Want::Deny(""),
            ),
            (
                "malformed config annotation on opted-out pod",
                Enabled,
                pod_with(annotate(&[
                    ("remora.io/inject", "false"),
                    ("remora.io/proxy-uid", "root"),
                ])),
                Want::Skip(OptedOut, false),
            ),
        ]
    }

    #[test]
    fn decision_table() {
        for (name, path, pod, want) in decision_cases() {
            let decision = decide(&pod, path, &Config::default());
            assert_eq!(summary(&decision), want, "case {name}: {decision:?}");
            if let Decision::Skip {
                warning: Some(warning),
                ..
            } = &decision
            {
                assert_short(warning);
            }
        }
    }

    /// Every warning and deny message in `decision`.
    fn messages(decision: &Decision) -> Vec<&str> {
        match decision {
            Decision::Inject { warnings, .. } => warnings.iter().map(String::as_str).collect(),
            Decision::Skip { warning, .. } => warning.iter().map(String::as_str).collect(),
            Decision::Deny { message } => vec![message.as_str()],
        }
    }

    /// A warning or deny message is one line of single-spaced words: `kubectl` prints warnings
    /// as they are, and a message broken by a lost `\` continuation reads as garbage there.
    pub(crate) fn assert_tidy(message: &str) {
        assert!(
            !message.contains("  ") && !message.contains(['\n', '\r', '\t']),
            "a run of spaces or a line break in {message:?}"
        );
    }

    /// Pods that draw each warning `decide` can give while injecting.
    fn warned_pods() -> Vec<(&'static str, Pod)> {
        vec![
            (
                "runs as the proxy uid, declares a proxy port",
                pod_with(|p| {
                    p["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1337});
                    p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 15001}]);
                }),
            ),
            (
                "runs as the proxy gid",
                pod_with(|p| p["spec"]["securityContext"] = json!({"runAsGroup": 1337})),
            ),
            (
                "unknown annotations, with and without a near key",
                pod_with(annotate(&[
                    ("remora.io/proxy-cpu-limits", "2"),
                    ("remora.io/sidecar", "x"),
                ])),
            ),
            (
                "misspelled inject label",
                pod_with(label(&[("remora.io/Inject", "true")])),
            ),
        ]
    }

    /// Values that every `remora.io/` annotation refuses at least one of; a line break in the
    /// value must come out escaped.
    const BAD_VALUES: [&str; 11] = [
        "",
        "x y",
        "-1",
        "0",
        "lots",
        "99999",
        "*,80",
        "10.0.0.0/33",
        "9100-9000",
        "True",
        "80\n90",
    ];

    #[test]
    fn no_message_has_a_run_of_spaces_or_a_line_break() {
        let config = Config::default();
        let mut checked = 0;
        let mut check = |name: &str, decision: &Decision| {
            for message in messages(decision) {
                assert_tidy(message);
                assert!(!message.is_empty(), "case {name}");
                checked += 1;
            }
        };
        for (name, path, pod, _) in decision_cases() {
            check(name, &decide(&pod, path, &config));
        }
        for (name, pod) in warned_pods() {
            let decision = decide(&pod, WebhookPath::Inject, &config);
            assert!(!messages(&decision).is_empty(), "case {name}: no warning");
            check(name, &decision);
        }
        // Each annotation's deny messages (and the label's), and requests against limits.
        for key in annotations::KNOWN
            .iter()
            .filter(|k| **k != annotations::STATUS)
        {
            let mut denied = false;
            for value in BAD_VALUES {
                let edit = |p: &mut Value| p["metadata"]["annotations"][*key] = json!(value);
                let decision = decide(&pod_with(edit), WebhookPath::Inject, &config);
                denied |= matches!(decision, Decision::Deny { .. });
                check(key, &decision);
            }
            assert!(denied, "{key}: none of {BAD_VALUES:?} is denied");
        }
        for (name, pod) in [
            ("bad label", pod_with(label(&[("remora.io/inject", "on")]))),
            (
                "request above limit",
                pod_with(annotate(&[("remora.io/proxy-cpu-request", "3")])),
            ),
            (
                "limit below request",
                pod_with(annotate(&[("remora.io/proxy-memory-limit", "1Mi")])),
            ),
        ] {
            let decision = decide(&pod, WebhookPath::Inject, &config);
            assert!(matches!(decision, Decision::Deny { .. }), "case {name}");
            check(name, &decision);
        }
        assert!(checked > 40, "only {checked} messages checked");
    }

    /// The API server may truncate a warning past 256 characters.
    fn assert_short(warning: &str) {
        assert!(
            warning.len() <= 256,
            "{} characters: {warning}",
            warning.len()
        );
    }

    fn inject(pod: &Pod) -> (Patch, Vec<String>) {
        match decide(pod, WebhookPath::Inject, &Config::default()) {
            Decision::Inject { patch, warnings } => (patch, warnings),
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    fn applied(pod_json: &Value) -> Value {
        let (patch, _) = inject(&pod(pod_json.clone()));
        let mut out = pod_json.clone();
        json_patch::patch(&mut out, &patch).expect("patch applies");
        out
    }

    fn paths(patch: &Patch) -> Vec<String> {
        patch
            .0
            .iter()
            .map(|op| match op {
                PatchOperation::Add(add) => format!("add {}", add.path),
                other => format!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(
            pointer(&["metadata", "annotations", "remora.io/status"]).to_string(),
            "/metadata/annotations/remora.io~1status"
        );
        assert_eq!(pointer(&["a~b/c", "~/"]).to_string(), "/a~0b~1c/~0~1");
    }

    #[test]
    fn a_bare_pod_gets_its_maps_and_lists_created() {
        let (patch, warnings) = inject(&pod(base_pod()));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            paths(&patch),
            [
                "add /metadata/annotations",
                "add /spec/initContainers",
                "add /spec/volumes"
            ]
        );
    }

    #[test]
    fn existing_maps_and_lists_are_added_into_with_escaped_pointers() {
        let (patch, _) = inject(&pod_with(|p| {
            p["metadata"]["annotations"] = json!({"example.com/owner": "shop"});
            p["spec"]["initContainers"] = json!([{"name": "migrate", "image": "flyway"}]);
            p["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        }));
        assert_eq!(
            paths(&patch),
            [
                "add /metadata/annotations/remora.io~1status",
                "add /spec/initContainers/0",
                "add /spec/initContainers/1",
                "add /spec/volumes/-",
                "add /spec/volumes/-",
            ]
        );
    }

    #[test]
    fn patched_pod_has_remora_first_then_its_own_init_containers() {
        let out = applied(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "annotations": {"a~b/c": "d"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "flyway"}, {"name": "seed", "image": "seed"}],
                "containers": [{"name": "web", "image": "nginx"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        }));
        let names: Vec<&str> = out["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["remora-init", "remora-proxy", "migrate", "seed"]);
        let volumes: Vec<&str> = out["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            volumes,
            ["data", "remora-xtables-lock", "remora-identity-token"]
        );
        assert_eq!(out["metadata"]["annotations"]["a~b/c"], "d");
        let status: Value = serde_json::from_str(
            out["metadata"]["annotations"]["remora.io/status"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(status["version"], VERSION);
        assert_eq!(
            status["initContainers"],
            json!(["remora-init", "remora-proxy"])
        );
        assert_eq!(
            status["volumes"],
            json!(["remora-xtables-lock", "remora-identity-token"])
        );
        // No namespace anywhere, no ServiceAccount: the defaults.
        assert_eq!(
            status["identity"],
            "spiffe://cluster.local/ns/default/sa/default"
        );
    }

    /// The `identity` of the status annotation that injecting `value` with `config` writes.
    fn status_identity(value: Value, config: &Config) -> String {
        let Decision::Inject { patch, .. } =
            decide(&pod(value.clone()), WebhookPath::Inject, config)
        else {
            panic!("expected an injection");
        };
        let mut out = value;
        json_patch::patch(&mut out, &patch).expect("patch applies");
        let status: Value = serde_json::from_str(
            out["metadata"]["annotations"]["remora.io/status"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        status["identity"].as_str().unwrap().to_string()
    }

    #[test]
    fn status_names_the_identity_of_the_pods_service_account() {
        // Name, pod namespace, serviceAccountName, deprecated serviceAccount, wanted identity.
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
        );
        let cases: &[Case] = &[
            (
                "no service account",
                Some("shop"),
                None,
                None,
                "spiffe://cluster.local/ns/shop/sa/default",
            ),
            (
                "serviceAccountName",
                Some("shop"),
                Some("checkout"),
                None,
                "spiffe://cluster.local/ns/shop/sa/checkout",
            ),
            (
                "empty serviceAccountName",
                Some("shop"),
                Some(""),
                None,
                "spiffe://cluster.local/ns/shop/sa/default",
            ),
            (
                "deprecated serviceAccount only",
                Some("shop"),
                None,
                Some("legacy"),
                "spiffe://cluster.local/ns/shop/sa/legacy",
            ),
            (
                "serviceAccountName wins",
                Some("shop"),
                Some("checkout"),
                Some("legacy"),
                "spiffe://cluster.local/ns/shop/sa/checkout",
            ),
            (
                "no namespace",
                None,
                Some("checkout"),
                None,
                "spiffe://cluster.local/ns/default/sa/checkout",
            ),
            (
                "empty namespace",
                Some(""),
                None,
                None,
                "spiffe://cluster.local/ns/default/sa/default",
            ),
        ];
        for (name, namespace, account_name, account, want) in cases {
            let mut value = base_pod();
            value["metadata"]["namespace"] = json!(namespace);
            if namespace.is_none() {
                value["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("namespace");
            }
            if let Some(account_name) = account_name {
                value["spec"]["serviceAccountName"] = json!(account_name);
            }
            if let Some(account) = account {
                value["spec"]["serviceAccount"] = json!(account);
            }
            assert_eq!(
                status_identity(value, &Config::default()),
                *want,
                "case {name}"
            );
        }
        let config = Config {
            trust_domain: "prod.example".to_string(),
            ..Config::default()
        };
        assert_eq!(
            status_identity(base_pod(), &config),
            "spiffe://prod.example/ns/shop/sa/default"
        );
    }

    #[test]
    fn only_the_proxy_mounts_the_identity_token() {
        let out = applied(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "automountServiceAccountToken": false,
                "initContainers": [{"name": "migrate", "image": "flyway"}],
                "containers": [
                    {"name": "web", "image": "nginx", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                    {"name": "worker", "image": "worker"},
                ],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        }));
        assert_eq!(
            out["spec"]["volumes"][2],
            json!({"name": "remora-identity-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "remora.io/identity", "expirationSeconds": 3600, "path": "token",
            }}]}})
        );
        // Projected tokens do not depend on automountServiceAccountToken: left as it was.
        assert_eq!(out["spec"]["automountServiceAccountToken"], false);
        let spec = &out["spec"];
        let all = spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(spec["containers"].as_array().unwrap());
        let mounting: Vec<(&str, &Value)> = all
            .flat_map(|c| {
                c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|m| m["name"] == IDENTITY_TOKEN_VOLUME)
                    .map(|m| (c["name"].as_str().unwrap(), m))
            })
            .collect();
        assert_eq!(
            mounting,
            [(
                "remora-proxy",
                &json!({"mountPath": "/var/run/secrets/remora.io/identity", "name": "remora-identity-token", "readOnly": true})
            )]
        );
    }

    /// The proxy's args for `value`, or the deny message.
    fn proxy_args_of(value: Value) -> Result<Vec<String>, String> {
        match decide(&pod(value.clone()), WebhookPath::Inject, &Config::default()) {
            Decision::Inject { patch, .. } => {
                let mut out = value;
                json_patch::patch(&mut out, &patch).expect("patch applies");
                Ok(
                    serde_json::from_value(out["spec"]["initContainers"][1]["args"].clone())
                        .unwrap(),
                )
            }
            Decision::Deny { message } => Err(message),
            other => panic!("expected an injection or a deny, got {other:?}"),
        }
    }

    /// The value of `flag` among `args`, if it is there.
    fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).map(String::as_str)
    }

    #[test]
    fn mtls_annotations_become_proxy_flags() {
        // Name, annotations, --inbound-mtls, --allow-from.
        type Case = (
            &'static str,
            &'static [(&'static str, &'static str)],
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            ("neither", &[], None, None),
            (
                "permissive said",
                &[("remora.io/inbound-mtls", "permissive")],
                Some("permissive"),
                None,
            ),
            (
                "strict",
                &[("remora.io/inbound-mtls", "strict")],
                Some("strict"),
                None,
            ),
            (
                "allow-from alone",
                &[("remora.io/allow-from", "shop/checkout, monitoring/*")],
                None,
                Some("shop/checkout,monitoring/*"),
            ),
            (
                "empty allow-from is anyone",
                &[("remora.io/allow-from", " ")],
                None,
                None,
            ),
            (
                "both",
                &[
                    ("remora.io/inbound-mtls", "strict"),
                    ("remora.io/allow-from", "shop/*"),
                ],
                Some("strict"),
                Some("shop/*"),
            ),
        ];
        for (name, annotations, mode, allow) in cases {
            let mut value = base_pod();
            for (key, v) in *annotations {
                value["metadata"]["annotations"][*key] = json!(v);
            }
            let args = proxy_args_of(value).unwrap();
            assert_eq!(
                flag(&args, "--inbound-mtls"),
                *mode,
                "case {name}: {args:?}"
            );
            assert_eq!(flag(&args, "--allow-from"), *allow, "case {name}: {args:?}");
            // No probes in base_pod: no exception to list.
            assert_eq!(flag(&args, "--inbound-probes"), None, "case {name}");
        }
    }

    #[test]
    fn bad_mtls_annotations_are_denied_naming_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "remora.io/inbound-mtls",
                "on",
                "expected permissive or strict",
            ),
            (
                "remora.io/inbound-mtls",
                "",
                "expected permissive or strict",
            ),
            (
                "remora.io/allow-from",
                "checkout",
                "NAMESPACE/SERVICEACCOUNT or NAMESPACE/*",
            ),
            (
                "remora.io/allow-from",
                "shop/a,Shop/b",
                "NAMESPACE/SERVICEACCOUNT or NAMESPACE/*",
            ),
        ];
        for (key, value, form) in cases {
            let mut pod = base_pod();
            pod["metadata"]["annotations"][*key] = json!(value);
            let message = proxy_args_of(pod).expect_err(key);
            assert!(
                message.starts_with(&format!("annotation {key}: {value:?}"))
                    && message.contains(form),
                "{key}={value:?}: {message}"
            );
        }
    }

    /// `base_pod` in strict mode with these containers (and init containers).
    fn strict_pod(containers: Value, init_containers: Option<Value>) -> Value {
        let mut value = base_pod();
        value["metadata"]["annotations"] = json!({"remora.io/inbound-mtls": "strict"});
        value["spec"]["containers"] = containers;
        if let Some(init) = init_containers {
            value["spec"]["initContainers"] = init;
        }
        value
    }

    #[test]
    fn strict_mode_or_allow_from_passes_the_pods_probes_to_the_proxy() {
        let http = |port: Value, path: &str| json!({"httpGet": {"port": port, "path": path}});
        let containers = json!([
            {
                "name": "web", "image": "web",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9901}],
                "livenessProbe": http(json!("http"), "/healthz?verbose=1"),
                "readinessProbe": http(json!(8080), "ready"),
                "startupProbe": http(json!("http"), "/healthz"),
            },
            {
                "name": "tls", "image": "tls",
                "livenessProbe": {"httpGet": {"port": 8443, "path": "/live", "scheme": "HTTPS"}},
                "readinessProbe": {"grpc": {"port": 9090}},
                "startupProbe": {"tcpSocket": {"port": 5432}},
            },
            {
                "name": "plain", "image": "plain",
                "livenessProbe": {"exec": {"command": ["true"]}},
                "readinessProbe": {"httpGet": {"port": 7000}},
                // 5432 already open as a whole: its path is not listed.
                "startupProbe": http(json!(5432), "/up"),
            },
        ]);
        let init = json!([
            // A native sidecar's probes count; a plain init container has none to count.
            {"name": "logs", "image": "logs", "restartPolicy": "Always",
             "readinessProbe": {"tcpSocket": {"port": 2020}}},
            {"name": "migrate", "image": "flyway"},
        ]);
        let all = Some("2020,5432,7000:/,8080:/healthz,8080:/ready,8443,9090");
        let args = proxy_args_of(strict_pod(containers.clone(), Some(init.clone()))).unwrap();
        assert_eq!(flag(&args, "--inbound-probes"), all, "{args:?}");

        // An allow-from list keeps plaintext clients out in permissive mode too (they have no
        // identity to be on it): the same probes, said permissive or not.
        let mut listed = strict_pod(containers.clone(), Some(init));
        listed["metadata"]["annotations"] = json!({"remora.io/allow-from": "shop/*"});
        let args = proxy_args_of(listed.clone()).unwrap();
        assert_eq!(flag(&args, "--inbound-mtls"), None, "{args:?}");
        assert_eq!(flag(&args, "--inbound-probes"), all, "{args:?}");
        listed["metadata"]["annotations"]["remora.io/inbound-mtls"] = json!("permissive");
        let args = proxy_args_of(listed.clone()).unwrap();
        assert_eq!(flag(&args, "--inbound-probes"), all, "{args:?}");
        // An empty list lets anyone in: nothing to pass.
        listed["metadata"]["annotations"]["remora.io/allow-from"] = json!(" ");
        let args = proxy_args_of(listed).unwrap();
        assert_eq!(flag(&args, "--inbound-probes"), None, "{args:?}");

        // Permissive (said or not) without a list: every plaintext request is let in already.
        let mut permissive = strict_pod(containers, None);
        permissive["metadata"]["annotations"]["remora.io/inbound-mtls"] = json!("permissive");
        assert_eq!(
            flag(
                &proxy_args_of(permissive.clone()).unwrap(),
                "--inbound-probes"
            ),
            None
        );
        permissive["metadata"]["annotations"] = json!({});
        assert_eq!(
            flag(&proxy_args_of(permissive).unwrap(), "--inbound-probes"),
            None
        );
    }

    #[test]
    fn probes_on_ports_the_redirect_skips_need_nothing() {
        let containers = json!([{
            "name": "web", "image": "web",
            "livenessProbe": {"tcpSocket": {"port": 9000}},
            "readinessProbe": {"httpGet": {"port": 8080, "path": "/ready"}},
            "startupProbe": {"httpGet": {"port": 15020, "path": "/ready"}},
        }]);
        let mut value = strict_pod(containers, None);
        value["metadata"]["annotations"]["remora.io/exclude-inbound-ports"] = json!("9000");
        let args = proxy_args_of(value.clone()).unwrap();
        assert_eq!(
            flag(&args, "--inbound-probes"),
            Some("8080:/ready"),
            "{args:?}"
        );
        // Only 9000 redirected: 8080 needs nothing either.
        value["metadata"]["annotations"]["remora.io/exclude-inbound-ports"] = json!("");
        value["metadata"]["annotations"]["remora.io/include-inbound-ports"] = json!("9000");
        let args = proxy_args_of(value).unwrap();
        assert_eq!(flag(&args, "--inbound-probes"), Some("9000"), "{args:?}");
    }

    #[test]
    fn strict_mode_or_allow_from_denies_a_probe_it_cannot_pass() {
        // Name, container, the words the message must hold.
        let cases: &[(&str, Value, &[&str])] = &[
            (
                "unknown port name",
                json!({"name": "web", "image": "web", "ports": [{"name": "http", "containerPort": 8080}],
                       "readinessProbe": {"httpGet": {"port": "metrics", "path": "/ready"}}}),
                &[
                    "container web",
                    "readinessProbe",
                    "\"metrics\"",
                    "it names http",
                ],
            ),
            (
                "a name of another container's port",
                json!({"name": "side", "image": "side",
                       "livenessProbe": {"tcpSocket": {"port": "http"}}}),
                &[
                    "container side",
                    "livenessProbe",
                    "\"http\"",
                    "it names none",
                ],
            ),
            (
                "a comma in the path",
                json!({"name": "web", "image": "web",
                       "startupProbe": {"httpGet": {"port": 8080, "path": "/a,b"}}}),
                &[
                    "container web",
                    "startupProbe",
                    "\"/a,b\"",
                    "without commas",
                ],
            ),
        ];
        for (name, container, needles) in cases {
            let containers = json!([{"name": "web0", "image": "w", "ports": [{"name": "http", "containerPort": 80}]}, container]);
            let strict = strict_pod(containers, None);
            let mut listed = strict.clone();
            listed["metadata"]["annotations"] = json!({"remora.io/allow-from": "shop/web"});
            for (how, pod) in [("strict", strict), ("allow-from", listed)] {
                let message = proxy_args_of(pod).expect_err(name);
                for needle in *needles {
                    assert!(message.contains(needle), "case {name}, {how}: {message}");
                }
            }
        }
        // Neither strict nor a list: the probes are not read, so nothing to deny.
        let containers = json!([{"name": "web", "image": "web",
            "livenessProbe": {"tcpSocket": {"port": "nope"}}}]);
        let mut value = strict_pod(containers, None);
        value["metadata"]["annotations"]["remora.io/inbound-mtls"] = json!("permissive");
        assert!(proxy_args_of(value.clone()).is_ok());
        value["metadata"]["annotations"]["remora.io/allow-from"] = json!("");
        assert!(proxy_args_of(value.clone()).is_ok());
        value["metadata"]["annotations"]["remora.io/allow-from"] = json!("shop/web");
        let message = proxy_args_of(value).unwrap_err();
        assert!(message.contains("remora.io/allow-from"), "{message}");
    }

    #[test]
    fn a_volume_named_like_the_identity_token_means_injected_by_hand() {
        let decision = decide(
            &pod_with(|p| {
                p["spec"]["volumes"] = json!([{"name": "remora-identity-token", "emptyDir": {}}]);
            }),
            WebhookPath::Inject,
            &Config::default(),
        );
        assert_eq!(
            summary(&decision),
            Want::Skip(SkipReason::InjectedByHand, true)
        );
    }

    #[test]
    fn injected_containers_are_exactly_as_specified() {
        let out = applied(&base_pod());
        let version = VERSION;
        assert_eq!(
            out["spec"]["initContainers"][0],
            json!({
                "args": ["--exclude-inbound-ports", "15020"],
                "image": format!("ghcr.io/remora-mesh/remora-init:{version}"),
                "name": "remora-init",
                "resources": {
                    "limits": {"cpu": "100m", "memory": "64Mi"},
                    "requests": {"cpu": "10m", "memory": "16Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                    "readOnlyRootFilesystem": true,
                    "runAsNonRoot": false,
                    "runAsUser": 0,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumeMounts": [{"mountPath": "/run", "name": "remora-xtables-lock"}],
            })
        );
        let probe = |path: &str, period: i32, failures: i32| json!({"failureThreshold": failures, "httpGet": {"path": path, "port": 15020}, "periodSeconds": period});
        let env = |name: &str, field: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}});
        assert_eq!(
            out["spec"]["initContainers"][1],
            json!({
                "args": [
                    "--log-level", "info", "--opaque-ports", "21,25,110,143,587,3306,4222",
                    "--control", "remora-control.remora-system.svc:8090",
                ],
                "env": [
                    env("POD_NAME", "metadata.name"),
                    env("POD_NAMESPACE", "metadata.namespace"),
                    env("POD_IP", "status.podIP"),
                ],
                "image": format!("ghcr.io/remora-mesh/remora-proxy:{version}"),
                "livenessProbe": probe("/live", 10, 3),
                "name": "remora-proxy",
                "ports": [{"containerPort": 15020, "name": "remora-admin", "protocol": "TCP"}],
                "readinessProbe": probe("/ready", 5, 3),
                "resources": {
                    "limits": {"cpu": "1", "memory": "256Mi"},
                    "requests": {"cpu": "100m", "memory": "64Mi"},
                },
                "restartPolicy": "Always",
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": true,
                    "runAsGroup": 1337,
                    "runAsNonRoot": true,
                    "runAsUser": 1337,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "startupProbe": probe("/ready", 1, 120),
                "volumeMounts": [{"mountPath": "/var/run/secrets/remora.io/identity", "name": "remora-identity-token", "readOnly": true}],
            })
        );
        assert_eq!(
            out["spec"]["volumes"],
            json!([
                {"emptyDir": {}, "name": "remora-xtables-lock"},
                {"name": "remora-identity-token", "projected": {"sources": [{"serviceAccountToken": {
                    "audience": "remora.io/identity", "expirationSeconds": 3600, "path": "token",
                }}]}},
            ])
        );
    }

    /// The proxy container of `base_pod` injected with `config`.
    fn proxy_with(config: &Config) -> Value {
        let Decision::Inject { patch, .. } = decide(&pod(base_pod()), WebhookPath::Inject, config)
        else {
            panic!("expected an injection");
        };
        let mut out = base_pod();
        json_patch::patch(&mut out, &patch).expect("patch applies");
        out["spec"]["initContainers"][1].clone()
    }

    #[test]
    fn control_plane_flag_and_trust_anchors_are_there_only_when_configured() {
        let anchors = crate::trust::tests::anchors(2);
        // Name, the injector's control address, whether it has trust anchors.
        let cases = [
            ("neither", None, false),
            (
                "address only",
                Some("remora-control.remora-system.svc:8090"),
                false,
            ),
            ("IPv6 address", Some("[fd00::20]:8090"), false),
            ("both", Some("10.96.0.20:8090"), true),
            ("anchors only", None, true),
        ];
        for (name, control, with_anchors) in cases {
            let want_pem = with_anchors.then(|| anchors.pem());
            let config = Config {
                control_addr: control.map(|addr| addr.parse().unwrap()),
                trust_anchors: with_anchors.then(|| anchors.clone()),
                ..Config::default()
            };
            let proxy = proxy_with(&config);
            let args: Vec<&str> = proxy["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let control_args: Vec<&str> = args
                .iter()
                .position(|a| *a == "--control")
                .map(|at| args[at..].to_vec())
                .unwrap_or_default();
            match control {
                Some(addr) => assert_eq!(control_args, ["--control", addr], "{name}"),
                None => assert!(control_args.is_empty(), "{name}: {args:?}"),
            }
            let env = proxy["env"].as_array().unwrap();
            let anchors_env: Vec<&Value> = env
                .iter()
                .filter(|e| e["name"] == TRUST_ANCHORS_ENV)
                .collect();
            match want_pem {
                Some(pem) => assert_eq!(
                    anchors_env,
                    [&json!({"name": "REMORA_TRUST_ANCHORS", "value": pem})],
                    "{name}"
                ),
                None => assert!(anchors_env.is_empty(), "{name}: {env:?}"),
            }
            // The downward API variables are there either way.
            assert_eq!(
                env[..3]
                    .iter()
                    .map(|e| e["name"].as_str().unwrap())
                    .collect::<Vec<_>>(),
                ["POD_NAME", "POD_NAMESPACE", "POD_IP"],
                "{name}"
            );
        }
    }

    #[test]
    fn init_args_parse_back_in_remora_init() {
        use clap::Parser;
        let out = applied(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "annotations": {
                "remora.io/proxy-uid": "2102",
                "remora.io/exclude-outbound-cidrs": "10.96.0.0/12,fd00::/8",
                "remora.io/include-inbound-ports": "8080",
            }},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        }));
        let args: Vec<String> =
            serde_json::from_value(out["spec"]["initContainers"][0]["args"].clone()).unwrap();
        let parsed = remora_init::InitConfig::try_parse_from(
            std::iter::once("remora-init".to_string()).chain(args),
        )
        .unwrap();
        assert_eq!(parsed.proxy_uid, 2102);
        assert_eq!(parsed.proxy_gid(), 2102);
        assert_eq!(parsed.include_inbound_ports.to_string(), "8080");
        assert!(parsed.exclude_inbound_ports.contains(15020));
        assert_eq!(
            parsed.exclude_outbound_cidrs.to_string(),
            "10.96.0.0/12,fd00::/8"
        );
        assert_eq!(
            out["spec"]["initContainers"][1]["securityContext"]["runAsUser"],
            2102
        );
    }

    #[test]
    fn reinjecting_the_output_changes_nothing() {
        for input in [
            base_pod(),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "web", "annotations": {"x": "y"}},
                   "spec": {"initContainers": [{"name": "a", "image": "a"}], "containers": [{"name": "web", "image": "nginx"}], "volumes": []}}),
        ] {
            let out = applied(&input);
            for path in [WebhookPath::Inject, WebhookPath::OptIn] {
                let again = decide(&pod(out.clone()), path, &Config::default());
                let want = if path == WebhookPath::Inject {
                    Want::Skip(SkipReason::AlreadyInjected, false)
                } else {
                    Want::Skip(SkipReason::NotOptedIn, false)
                };
                assert_eq!(summary(&again), want);
            }
        }
    }

    #[test]
    fn reinvocation_after_another_webhook_added_containers_changes_nothing() {
        // IfNeeded: another webhook ran after us and added a sidecar and an init container.
        let mut out = applied(&base_pod());
        out["spec"]["containers"].as_array_mut().unwrap().push(
            json!({"name": "vault-agent", "image": "vault", "ports": [{"containerPort": 15001}]}),
        );
        out["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"name": "vault-init", "image": "vault"}));
        for path in [WebhookPath::Inject, WebhookPath::OptIn] {
            let again = decide(&pod(out.clone()), path, &Config::default());
            let want = if path == WebhookPath::Inject {
                Want::Skip(SkipReason::AlreadyInjected, false)
            } else {
                Want::Skip(SkipReason::NotOptedIn, false)
            };
            assert_eq!(summary(&again), want, "{path:?}");
        }
    }

    #[test]
    fn warns_about_the_proxy_uid_and_reserved_ports() {
        let (_, warnings) = inject(&pod(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web"},
            "spec": {
                "securityContext": {"runAsUser": 1337},
                "initContainers": [{"name": "setup", "image": "a", "securityContext": {"runAsUser": 1000}}],
                "containers": [
                    {"name": "web", "image": "nginx", "ports": [{"containerPort": 15006}, {"containerPort": 8080}]},
                    {"name": "admin", "image": "x", "securityContext": {"runAsUser": 1337}, "ports": [{"containerPort": 15020}]},
                ],
            },
        })));
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        warnings.iter().for_each(|w| assert_short(w));
        assert!(
            warnings[0].contains("container web runs as uid 1337"),
            "{warnings:#?}"
        );
        assert!(
            warnings[1].contains("container web declares port 15006"),
            "{warnings:#?}"
        );
        assert!(
            warnings[2].contains("container admin runs as uid 1337"),
            "{warnings:#?}"
        );
        assert!(
            warnings[3].contains("container admin declares port 15020"),
            "{warnings:#?}"
        );
        assert!(!warnings.iter().any(|w| w.contains("setup")));
    }

    #[test]
    fn warns_about_a_misspelled_inject_label() {
        // The annotation typo is warned about with every unknown remora.io/ annotation; only
        // remora.io/inject is read as a label, so a near miss there gets its own warning.
        let (_, warnings) = inject(&pod_with(label(&[("remora.io/Inject", "false")])));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("label remora.io/Inject")
                && warnings[0].contains("did you mean remora.io/inject?"),
            "{warnings:?}"
        );
        let (_, warnings) = inject(&pod_with(label(&[("remora.io/team", "shop")])));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn only_tcp_ports_collide_with_the_proxy() {
        let (_, warnings) = inject(&pod_with(|p| {
            p["spec"]["containers"][0]["ports"] = json!([
                {"containerPort": 15001, "protocol": "UDP"},
                {"containerPort": 15006, "protocol": "SCTP"},
                {"containerPort": 15020, "protocol": "TCP"},
            ]);
        }));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("port 15020"), "{warnings:?}");
    }

    #[test]
    fn warns_about_the_proxy_gid() {
        let (_, warnings) = inject(&pod_with(|p| {
            p["spec"]["securityContext"] = json!({"runAsUser": 1000, "runAsGroup": 1337});
        }));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("container web runs as gid 1337"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_custom_proxy_uid_is_what_collides() {
        let mut value = base_pod();
        value["metadata"]["annotations"] = json!({"remora.io/proxy-uid": "2000"});
        value["spec"]["securityContext"] = json!({"runAsUser": 1337});
        let (_, warnings) = inject(&pod(value.clone()));
        assert!(warnings.is_empty(), "{warnings:?}");
        value["spec"]["securityContext"] = json!({"runAsUser": 2000});
        let (_, warnings) = inject(&pod(value));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn a_pod_with_200_containers() {
        let containers: Vec<Value> = (0..200)
            .map(|i| json!({"name": format!("c{i}"), "image": "busybox", "ports": [{"containerPort": 8000 + i}]}))
            .collect();
        let init_containers: Vec<Value> = (0..5)
            .map(|i| json!({"name": format!("init{i}"), "image": "busybox"}))
            .collect();
        let input = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big"},
            "spec": {"containers": containers, "initContainers": init_containers},
        });
        let out = applied(&input);
        assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 200);
        let init = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init.len(), 7);
        assert_eq!(init[0]["name"], "remora-init");
        assert_eq!(init[1]["name"], "remora-proxy");
        assert_eq!(init[6]["name"], "init4");
        assert_eq!(out["spec"]["containers"][199]["name"], "c199");
        let again = decide(&pod(out), WebhookPath::Inject, &Config::default());
        assert_eq!(
            summary(&again),
            Want::Skip(SkipReason::AlreadyInjected, false)
        );
    }

    #[test]
    fn deny_messages_name_the_annotation() {
        let decision = decide(
            &pod_with(annotate(&[("remora.io/proxy-memory-limit", "lots")])),
            WebhookPath::Inject,
            &Config::default(),
        );
        let Decision::Deny { message } = decision else {
            panic!("expected a deny, got {decision:?}");
        };
        assert!(
            message.starts_with("annotation remora.io/proxy-memory-limit: \"lots\""),
            "{message}"
        );
        assert!(message.contains("128Mi"), "{message}");
    }
}
