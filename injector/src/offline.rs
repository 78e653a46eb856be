//! `remora-injector inject`: manifests in, injected manifests out, by the webhook's own decision.
//!
//! Every pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController,
//! Job, CronJob, and the items of a `List`) goes through [`decide`] with the `/inject` semantics,
//! and its patch is applied to the template exactly as the API server would apply it to the pod.
//! Documents that nothing changes are written back as they were read, comments and all; one of
//! another kind that carries a pod template (a CRD's, OpenShift's) draws a warning.

use std::io::{Read, Write};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use crate::config::{Config, ConfigArgs, ConfigError};
use crate::inject::WebhookPath;
use crate::inject::{decide, Decision};

#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The manifest file to read, or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: PathBuf,

    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// `line` and `column` are counted in the whole input, as an editor shows them; `message`
    /// is the parser's, without its own positions (which count from the document's start).
    #[error(
        "cannot parse document {document} at line {line}{}: {message} (expected YAML or JSON Kubernetes objects separated by ---)",
        column.map(|column| format!(" column {column}")).unwrap_or_default()
    )]
    Parse {
        document: usize,
        line: usize,
        column: Option<usize>,
        message: String,
    },
    #[error("document {document} (line {line}), {object}: {message}")]
    Invalid {
        document: usize,
        line: usize,
        object: String,
        message: String,
    },
    #[error("cannot write the output: {0}")]
    Write(std::io::Error),
}

/// The injected manifests and the warnings the webhook would have given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// YAML documents separated by `---`.
    pub output: String,
    pub warnings: Vec<String>,
}

/// Reads the input, injects every pod template, writes YAML to standard output and the
/// warnings to standard error.
pub fn run(args: &InjectArgs) -> Result<(), OfflineError> {
    let config = args.config.load()?;
    let name = args.file.display().to_string();
    let read_error = |source| OfflineError::Read {
        path: if name == "-" {
            "standard input".to_string()
        } else {
            name.clone()
        },
        source,
    };
    let mut input = String::new();
    if name == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .map_err(read_error)?;
    } else {
        input = std::fs::read_to_string(&args.file).map_err(read_error)?;
    }
    let injected = inject_documents(&input, &config)?;
    let source = if name == "-" { "standard input" } else { &name };
    for warning in &injected.warnings {
        eprintln!("warning: {source}: {warning}");
    }
    // Documents nothing changed come out as they went in: a difference means a pod was injected.
    if injected.output != input {
        if let Some(warning) = missing_trust_anchors(&config) {
            eprintln!("warning: {warning}");
        }
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(injected.output.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(OfflineError::Write)
}

/// Proxies told to use a control plane they have no certificates to verify cannot use it.
fn missing_trust_anchors(config: &Config) -> Option<String> {
    let control = config.control_addr.as_ref()?;
    config.trust_anchors.is_none().then(|| {
        format!(
            "the proxies get --control {control} but no trust anchors to verify it with, so \
             they forward to original destinations only; pass --trust-anchors with the \
             control plane's CA, e.g. from `kubectl -n remora-system get secret \
             remora-identity-ca -o jsonpath='{{.data.ca\\.crt}}' | base64 -d > ca.crt`, or \
             --control-addr '' for no control plane"
        )
    })
}

/// One document of the input stream, with the line it starts on (1-based).
struct Document<'a> {
    number: usize,
    line: usize,
    /// Where `text` starts in its first line: 3 after a `---` marker, else 0.
    column: usize,
    text: &'a str,
}

impl Document<'_> {
    /// The line the object itself starts on, past the marker and any comments before it: the
    /// line messages about the object name.
    fn object_line(&self) -> usize {
        let offset = self
            .text
            .split('\n')
            .position(|line| {
                let line = line.trim();
                !line.is_empty() && !line.starts_with('#')
            })
            .unwrap_or(0);
        self.line + offset
    }
}

/// Splits a YAML stream at its `---` markers. A marker can't occur inside a scalar at column 0
/// (YAML forbids it), so a line-based split is exact; `...` ends a document early.
fn split_documents<'a>(input: &'a str) -> Vec<Document<'a>> {
    let mut documents = Vec::new();
    let mut start = 0; // byte offset where the current document starts
    let mut start_line = 1;
    let mut start_column = 0;
    let mut end: Option<usize> = None; // set by a `...` marker
    let mut offset = 0;
    let push = |from: usize,
                to: usize,
                (line, column): (usize, usize),
                documents: &mut Vec<Document<'a>>| {
        let text = &input[from..to];
        let blank = text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l.starts_with('%')
        });
        if !blank {
            documents.push(Document {
                number: documents.len() + 1,
                line,
                column,
                text,
            });
        }
    };
    for (index, line) in input.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = |marker: &str| {
            bare.strip_prefix(marker)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        if is_marker("---") {
            push(
                start,
                end.unwrap_or(offset),
                (start_line, start_column),
                &mut documents,
            );
            // Content after the marker on the same line (`--- {…}`) belongs to the new document.
            start = offset + 3;
            start_line = index + 1;
            start_column = 3;
            end = None;
        } else if is_marker("...") && end.is_none() {
            end = Some(offset);
        }
        offset += line.len();
    }
    push(
        start,
        end.unwrap_or(offset),
        (start_line, start_column),
        &mut documents,
    );
    documents
}

fn parse(document: &Document<'_>) -> Result<Value, OfflineError> {
    let text = document.text;
    let at_start = |message: String| OfflineError::Parse {
        document: document.number,
        line: document.object_line(),
        column: None,
        message,
    };
    // JSON first where it looks like JSON: YAML would balk at JSON's tab indentation.
    if text.trim_start().starts_with(['{', '[']) {
        if let Ok(value) = serde_json::from_str(text) {
            return Ok(value);
        }
    }
    // The parser counts lines and columns from the document's start; the user's editor counts
    // them in the file.
    let located = |err: serde_yaml_ng::Error| {
        let message = without_positions(&err.to_string());
        match err.location() {
            Some(location) => OfflineError::Parse {
                document: document.number,
                line: document.line + location.line().saturating_sub(1),
                column: Some(if location.line() <= 1 {
                    location.column() + document.column
                } else {
                    location.column()
                }),
                message,
            },
            None => at_start(message),
        }
    };
    let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(located)?;
    // kubectl honours `<<: *anchor` merge keys; without this the output would carry a literal
    // `<<` field, which no Kubernetes object has.
    yaml.apply_merge().map_err(located)?;
    to_json(yaml).map_err(at_start)
}

/// The parser's message without the ` at line L column C` (or ` at position P`) it puts after
/// the problem and after its context: those count from the document's start.
fn without_positions(message: &str) -> String {
    let digits =
        |text: &str| text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" at ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " at ".len()..];
        let skip = if let Some(line) = after.strip_prefix("line ") {
            let line_digits = digits(line);
            let column = line[line_digits..].strip_prefix(" column ");
            match column.map(digits) {
                Some(column_digits) if line_digits > 0 && column_digits > 0 => {
                    "line ".len() + line_digits + " column ".len() + column_digits
                }
                _ => 0,
            }
        } else if let Some(position) = after.strip_prefix("position ") {
            match digits(position) {
                0 => 0,
                position_digits => "position ".len() + position_digits,
            }
        } else {
            0
        };
        if skip == 0 {
            // Not a position: keep the words.
            out.push_str(" at ");
        }
        rest = &after[skip..];
    }
    out.push_str(rest);
    out
}

/// A YAML value as JSON, turning scalar keys into strings as kubectl's decoder does (`8080: x`
/// is the key `"8080"`), so that a document the injector does not even change never stops it.
fn to_json(yaml: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Yaml;
    Ok(match yaml {
        Yaml::Mapping(mapping) => {
            let mut object = serde_json::Map::new();
            for (key, value) in mapping {
                let key = match key {
                    Yaml::String(key) => key,
                    Yaml::Number(number) => number.to_string(),
                    Yaml::Bool(flag) => flag.to_string(),
                    Yaml::Null => "null".to_string(),
                    other => return Err(format!("a mapping key is not a scalar: {other:?}")),
                };
                object.insert(key, to_json(value)?);
            }
            Value::Object(object)
        }
        Yaml::Sequence(items) => {
            Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Tagged(tagged) => to_json(tagged.value)?,
        scalar => serde_yaml_ng::from_value(scalar).map_err(|err| err.to_string())?,
    })
}

/// Reads the file modes of volumes (`defaultMode`, `mode`) written as plain `0644` the way
/// kubectl does: YAML 1.1 takes a leading zero as octal, while the YAML 1.2 parser here keeps
/// it as the string "0644", which no pod accepts. Where people write octal numbers in a pod,
/// these are the fields; a CSI driver's `volumeAttributes` are its own strings and stay so.
fn octal_file_modes(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                match (key.as_str(), &*field) {
                    ("volumeAttributes", _) => {}
                    ("defaultMode" | "mode", Value::String(text)) => {
                        let octal = text.strip_prefix('0').filter(|digits| !digits.is_empty());
                        if let Some(mode) =
                            octal.and_then(|digits| u32::from_str_radix(digits, 8).ok())
                        {
                            *field = Value::from(mode);
                        }
                    }
                    _ => octal_file_modes(field),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(octal_file_modes),
        _ => {}
    }
}

/// Injects every pod template in a stream of YAML or JSON documents.
pub fn inject_documents(input: &str, config: &Config) -> Result<Injected, OfflineError> {
    let mut output = String::new();
    let mut warnings = Vec::new();
    for document in split_documents(input) {
        let mut value = parse(&document)?;
        let mut context = Context {
            document: &document,
            config,
            warnings: &mut warnings,
        };
        let changed = inject_object(&mut value, &mut context)?;
        if !output.is_empty() {
            output.push_str("---\n");
        }
        if changed {
            output.push_str(&crate::yaml::to_yaml(&value));
        } else {
            output.push_str(document.text.trim_matches('\n'));
            output.push('\n');
        }
    }
    Ok(Injected { output, warnings })
}

struct Context<'a, 'd> {
    document: &'a Document<'d>,
    config: &'a Config,
    warnings: &'a mut Vec<String>,
}

impl Context<'_, '_> {
    /// A warning about `object` (as [`describe`] names it), saying where its document starts.
    fn warn(&mut self, object: &str, warning: &str) {
        self.warnings.push(format!(
            "document {} (line {}), {object}: {warning}",
            self.document.number,
            self.document.object_line()
        ));
    }
}

/// Where an object of a kind `inject` does not know carries a pod spec, as a workload would,
/// and what its pods then depend on: `spec.template.spec` (OpenShift's DeploymentConfig, Argo's
/// Rollout, Knative's Service, …), `spec.jobTemplate.spec.template.spec`, or, for a `Pod` under
/// an apiVersion that has none, `spec.containers`.
fn unknown_pod_template(object: &Value) -> Option<(&'static str, &'static str)> {
    const WEBHOOK: &str =
        "its pods are meshed only if the webhook injects them when they are created";
    let spec = &object["spec"];
    if spec["template"]["spec"].is_object() {
        Some(("pod template (spec.template)", WEBHOOK))
    } else if spec["jobTemplate"]["spec"]["template"]["spec"].is_object() {
        Some(("pod template (spec.jobTemplate.spec.template)", WEBHOOK))
    } else if object["kind"] == "Pod" && spec["containers"].is_array() {
        Some(("pod spec (spec)", "a Pod is apiVersion v1"))
    } else {
        None
    }
}

/// `Deployment shop/web`, for messages.
fn describe(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("object");
    let name = object["metadata"]["name"]
        .as_str()
        .or_else(|| object["metadata"]["generateName"].as_str())
        .unwrap_or("(unnamed)");
    match object["metadata"]["namespace"].as_str() {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Injects the object's pod templates; returns whether anything changed.
fn inject_object(object: &mut Value, context: &mut Context<'_, '_>) -> Result<bool, OfflineError> {
    let api_version = object["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let template: &[&str] = match (group, kind.as_str()) {
        ("", "Pod") => &[],
        ("", "ReplicationController")
        | ("apps" | "extensions", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => &["spec", "template"],
        ("batch", "CronJob") => &["spec", "jobTemplate", "spec", "template"],
        (_, "List") => {
            let mut changed = false;
            if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    changed |= inject_object(item, context)?;
                }
            }
            return Ok(changed);
        }
        _ => {
            // Piped to `kubectl apply`, such a workload would run unmeshed: say so.
            if let Some((template, consequence)) = unknown_pod_template(object) {
                let named = |field: &str| match field {
                    "" => "(none)".to_string(),
                    field => field.to_string(),
                };
                context.warn(
                    &describe(object),
                    &format!(
                        "remora: not injected: inject knows no kind {} of apiVersion {}, so its \
                         {template} passes through unchanged; {consequence}",
                        named(&kind),
                        named(&api_version)
                    ),
                );
            }
            return Ok(false);
        }
    };
    let description = describe(object);
    // The pods' namespace is the workload's: a template carries none of its own.
    let namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
    let mut target = &mut *object;
    for key in template {
        target = match target.get_mut(*key) {
            Some(next) if next.is_object() => next,
            _ => {
                let path = template.join(".");
                return Err(OfflineError::Invalid {
                    document: context.document.number,
                    line: context.document.object_line(),
                    object: description,
                    message: format!("has no {path} object (expected a pod template there)"),
                });
            }
        };
    }
    inject_pod_template(target, namespace, &description, context)
}

/// Runs the webhook's decision on a pod (or pod template: metadata and spec) and applies the
/// patch to it. `namespace` is the one the pods will be created in, as far as the document says
/// (the identity in `remora.io/status` names it; without one, `default`, where `kubectl apply`
/// puts them unless told otherwise).
fn inject_pod_template(
    template: &mut Value,
    namespace: Option<String>,
    description: &str,
    context: &mut Context<'_, '_>,
) -> Result<bool, OfflineError> {
    // The patch addresses a Pod, so hand the template over as one.
    let mut pod_value = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata").filter(|m| m.is_object()).cloned().unwrap_or_else(|| json!({})),
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    });
    if let Some(volumes) = pod_value["spec"].get_mut("volumes") {
        octal_file_modes(volumes);
    }
    // `remora.io/inject: true` unquoted is the usual slip; say which value, not just "expected
    // a string".
    // An empty value (`key:`) is "" to kubectl, and so here.
    for (kind, map) in [("annotation", "annotations"), ("label", "labels")] {
        let entries = pod_value["metadata"]
            .get_mut(map)
            .and_then(Value::as_object_mut);
        for value in entries.into_iter().flat_map(|entries| entries.values_mut()) {
            if value.is_null() {
                *value = Value::String(String::new());
            }
        }
        let unquoted = pod_value["metadata"][map]
            .as_object()
            .and_then(|entries| entries.iter().find(|(_, value)| !value.is_string()));
        if let Some((key, value)) = unquoted {
            return Err(OfflineError::Invalid {
                document: context.document.number,
                line: context.document.object_line(),
                object: description.to_string(),
                message: format!(
                    "{kind} {key}: {value} is not a string (quote {kind} values in YAML, e.g. \"{value}\")"
                ),
            });
        }
    }
    // The path (`spec.containers[0].ports[0].containerPort`) says where a bad field is.
    let mut pod: Pod = serde_path_to_error::deserialize(pod_value.clone()).map_err(|err| {
        OfflineError::Invalid {
            document: context.document.number,
            line: context.document.object_line(),
            object: description.to_string(),
            message: format!("the pod template is not a valid pod: {err}"),
        }
    })?;
    // As the webhook does with the request's namespace; only the decision sees it, the
    // template is left without one.
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace = namespace;
    }
    if pod.spec.is_none() {
        return Err(OfflineError::Invalid {
            document: context.document.number,
            line: context.document.object_line(),
            object: description.to_string(),
            message: "the pod template has no spec".to_string(),
        });
    }
    match decide(&pod, WebhookPath::Inject, context.config) {
        Decision::Inject { patch, warnings } => {
            json_patch::patch(&mut pod_value, &patch).map_err(|err| OfflineError::Invalid {
                document: context.document.number,
                line: context.document.object_line(),
                object: description.to_string(),
                message: format!("the injection patch does not apply: {err}"),
            })?;
            for warning in warnings {
                context.warn(description, &warning);
            }
            // `insert` keeps an existing key where it was, so the output reads like the input.
            let object = template
                .as_object_mut()
                .ok_or_else(|| OfflineError::Invalid {
                    document: context.document.number,
                    line: context.document.object_line(),
                    object: description.to_string(),
                    message: "the pod template is not an object".to_string(),
                })?;
            object.insert("metadata".to_string(), pod_value["metadata"].take());
            object.insert("spec".to_string(), pod_value["spec"].take());
            Ok(true)
        }
        Decision::Skip { warning, .. } => {
            if let Some(warning) = warning {
                context.warn(description, &warning);
            }
            Ok(false)
        }
        Decision::Deny { message } => Err(OfflineError::Invalid {
            document: context.document.number,
            line: context.document.object_line(),
            object: description.to_string(),
            message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(input: &str) -> Result<Injected, OfflineError> {
        inject_documents(input, &Config::default())
    }

    #[test]
    fn splits_at_document_markers() {
        let input = "a: 1\n---\n\n# only a comment\n---   \nb: 2\n--- {c: 3}\n...\nignored: after end\n---\n";
        let documents: Vec<(usize, usize, usize, &str)> = split_documents(input)
            .iter()
            .map(|d| (d.number, d.line, d.column, d.text))
            .collect();
        assert_eq!(
            documents,
            [
                (1, 1, 0, "a: 1\n"),
                (2, 5, 3, "   \nb: 2\n"),
                (3, 7, 3, " {c: 3}\n")
            ]
        );
        assert!(split_documents("").is_empty());
        assert!(split_documents("# nothing\n---\n").is_empty());
        // `----` or `---x` is content, not a marker.
        assert_eq!(split_documents("a: |\n  ---x\n").len(), 1);
    }

    #[test]
    fn empty_input_gives_empty_output() {
        assert_eq!(inject("").unwrap().output, "");
        assert_eq!(inject("---\n# nothing\n").unwrap().output, "");
    }

    #[test]
    fn other_kinds_come_out_verbatim() {
        let input = "apiVersion: v1\nkind: ConfigMap   # keep me\nmetadata: {name: c}\n---\napiVersion: example.com/v1\nkind: Deployment\nmetadata: {name: not-apps}\nspec: {template: {}}\n";
        let injected = inject(input).unwrap();
        assert_eq!(injected.output, input);
        assert!(injected.warnings.is_empty());
    }

    #[test]
    fn unknown_kinds_with_a_pod_template_pass_through_with_a_warning() {
        let template = "{metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}";
        let cases = [
            (
                "apps.openshift.io/v1",
                "DeploymentConfig",
                format!("spec: {{replicas: 1, template: {template}}}"),
                "pod template (spec.template)",
            ),
            (
                "argoproj.io/v1alpha1",
                "Rollout",
                format!("spec:\n  template: {template}  # keep me"),
                "pod template (spec.template)",
            ),
            (
                "example.com/v1",
                "ScheduledTask",
                format!("spec: {{jobTemplate: {{spec: {{template: {template}}}}}}}"),
                "pod template (spec.jobTemplate.spec.template)",
            ),
            (
                "apps/v1",
                "Pod",
                "spec: {containers: [{name: c, image: i}]}".to_string(),
                "pod spec (spec)",
            ),
        ];
        for (api_version, kind, spec, template) in cases {
            let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n";
            let input = format!(
                "{config_map}---\n# {kind}\n\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: w, namespace: n}}\n{spec}\n"
            );
            let injected = inject(&input).unwrap();
            assert_eq!(injected.output, input, "{kind}: not byte for byte");
            assert_eq!(
                injected.warnings.len(),
                1,
                "{kind}: {:?}",
                injected.warnings
            );
            let warning = &injected.warnings[0];
            // The document, the line its object starts on (past the marker and the comment),
            // the object, and why.
            let want = format!(
                "document 2 (line 7), {kind} n/w: remora: not injected: inject knows no kind {kind} of apiVersion {api_version}, so its {template} passes through unchanged; "
            );
            assert!(warning.starts_with(&want), "{warning}");
            crate::inject::tests::assert_tidy(warning);
        }
        // Within a List: the item is named.
        let input = format!("apiVersion: v1\nkind: List\nitems:\n- apiVersion: serving.knative.dev/v1\n  kind: Service\n  metadata: {{name: k}}\n  spec: {{template: {template}}}\n");
        let injected = inject(&input).unwrap();
        assert_eq!(injected.output, input);
        assert_eq!(injected.warnings.len(), 1, "{:?}", injected.warnings);
        assert!(
            injected.warnings[0].starts_with("document 1 (line 1), Service k: remora: not injected: inject knows no kind Service of apiVersion serving.knative.dev/v1"),
            "{:?}",
            injected.warnings
        );
    }

    #[test]
    fn json_documents_with_tabs_are_read() {
        let input = "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Pod\",\n\t\"metadata\": {\"name\": \"p\"},\n\t\"spec\": {\"containers\": [{\"name\": \"a\", \"image\": \"b\"}]}\n}\n";
        let injected = inject(input).unwrap();
        let pod: Value = serde_yaml_ng::from_str(&injected.output).unwrap();
        assert_eq!(pod["spec"]["initContainers"][1]["name"], "remora-proxy");
        // The pod's own key order is kept; new keys come after.
        let keys: Vec<&String> = pod.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["apiVersion", "kind", "metadata", "spec"]);
    }

    #[test]
    fn parse_errors_name_the_document_and_one_line_counted_in_the_input() {
        // (input, document, line and column in the input, as an editor shows them)
        let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n";
        let cases = [
            // Linkerd's inject_gettest_deployment.bad.input.yml: `spec` less indented than
            // the `metadata` before it, in the second document.
            (
                format!("{config_map}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec:\n  template:\n      metadata:\n            labels: {{app: d}}\n    spec:\n      containers: []\n"),
                2,
                12,
                5,
            ),
            // An unclosed flow sequence, found where the next key starts.
            (
                format!("{config_map}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\nspec: {{}}\n"),
                2,
                9,
                5,
            ),
            // A bad first document: lines count from the top.
            (
                format!("a: b\n c: d\n---\n{config_map}"),
                1,
                2,
                3,
            ),
            // Content on the marker's own line: columns count from the line's start.
            (
                format!("{config_map}--- {{a: [}}\n"),
                2,
                4,
                10,
            ),
        ];
        for (input, want_document, want_line, want_column) in cases {
            let err = inject(&input).unwrap_err();
            let message = err.to_string();
            let OfflineError::Parse {
                document,
                line,
                column,
                ..
            } = &err
            else {
                panic!("expected a parse error, got {err:?}");
            };
            assert_eq!(
                (*document, *line, *column),
                (want_document, want_line, Some(want_column)),
                "{message}\n{input}"
            );
            assert!(
                message.starts_with(&format!(
                    "cannot parse document {want_document} at line {want_line} column {want_column}: "
                )),
                "{message}"
            );
            assert_eq!(message.matches("line").count(), 1, "{message}");
            assert_eq!(message.matches("column").count(), 1, "{message}");
            crate::inject::tests::assert_tidy(&message);
        }
    }

    #[test]
    fn only_positions_are_taken_out_of_parser_messages() {
        let cases = [
            (
                "did not find expected key at line 16 column 5, while parsing a block mapping at line 8 column 3",
                "did not find expected key, while parsing a block mapping",
            ),
            ("found unexpected end of stream at position 12", "found unexpected end of stream"),
            ("spec: invalid type: map at line 2 column 1", "spec: invalid type: map"),
            ("look at line 5 and at position x", "look at line 5 and at position x"),
            ("at line 3 column 4", "at line 3 column 4"),
        ];
        for (message, want) in cases {
            assert_eq!(without_positions(message), want, "{message}");
        }
    }

    #[test]
    fn a_bad_annotation_fails_with_the_deny_message() {
        let input = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  template:\n    metadata:\n      annotations: {remora.io/proxy-uid: root}\n    spec:\n      containers: [{name: web, image: nginx}]\n";
        let message = inject(input).unwrap_err().to_string();
        assert!(
            message.starts_with("document 1 (line 1), Deployment shop/web: annotation remora.io/proxy-uid: \"root\""),
            "{message}"
        );
    }

    #[test]
    fn a_workload_without_a_template_is_an_error() {
        let message = inject("apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec: {schedule: '* * * * *'}\n")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("CronJob c") && message.contains("spec.jobTemplate.spec.template"),
            "{message}"
        );
        let message =
            inject("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n")
                .unwrap_err()
                .to_string();
        assert!(
            message.contains("Pod p") && message.contains("not a valid pod"),
            "{message}"
        );
    }

    #[test]
    fn every_workload_kind_is_injected() {
        let template = "{metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}";
        let cases = [
            (
                "apps/v1",
                "Deployment",
                format!("spec: {{template: {template}}}"),
            ),
            (
                "apps/v1",
                "StatefulSet",
                format!("spec: {{template: {template}}}"),
            ),
            (
                "apps/v1",
                "DaemonSet",
                format!("spec: {{template: {template}}}"),
            ),
            (
                "apps/v1",
                "ReplicaSet",
                format!("spec: {{template: {template}}}"),
            ),
            ("batch/v1", "Job", format!("spec: {{template: {template}}}")),
            (
                "v1",
                "ReplicationController",
                format!("spec: {{template: {template}}}"),
            ),
            (
                "batch/v1",
                "CronJob",
                format!("spec: {{jobTemplate: {{spec: {{template: {template}}}}}}}"),
            ),
        ];
        for (api_version, kind, spec) in cases {
            let input =
                format!("apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: w}}\n{spec}\n");
            let injected = inject(&input).unwrap();
            assert!(
                injected.output.contains("name: remora-proxy")
                    && injected.output.contains("remora.io/status"),
                "{kind}: {}",
                injected.output
            );
            // And a second pass leaves it alone.
            assert_eq!(
                inject(&injected.output).unwrap().output,
                injected.output,
                "{kind}"
            );
        }
    }

    #[test]
    fn identity_namespace_is_the_documents_else_default() {
        let identities = |input: &str| -> Vec<String> {
            use serde::Deserialize;
            let output = inject(input).unwrap().output;
            let mut pod_metadata = Vec::new();
            for document in serde_yaml_ng::Deserializer::from_str(&output) {
                let value = Value::deserialize(document).unwrap();
                let items = value["items"].as_array().cloned().unwrap_or_default();
                for object in std::iter::once(value).chain(items) {
                    match object["kind"].as_str() {
                        Some("Pod") => pod_metadata.push(object["metadata"].clone()),
                        Some("Deployment") => {
                            let metadata = &object["spec"]["template"]["metadata"];
                            // The template gets no namespace of its own.
                            assert!(metadata.get("namespace").is_none(), "{metadata}");
                            pod_metadata.push(metadata.clone());
                        }
                        _ => {}
                    }
                }
            }
            pod_metadata
                .iter()
                .map(|metadata| {
                    let status = metadata["annotations"]["remora.io/status"]
                        .as_str()
                        .unwrap();
                    let status: Value = serde_json::from_str(status).unwrap();
                    status["identity"].as_str().unwrap().to_string()
                })
                .collect()
        };
        let template = "template: {metadata: {labels: {app: a}}, spec: {serviceAccountName: shopper, containers: [{name: a, image: busybox}]}}";
        let input = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: a, namespace: shop}}\nspec: {{{template}}}\n\
             ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: b}}\nspec: {{{template}}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: c, namespace: payments}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n\
             ---\napiVersion: v1\nkind: List\nitems:\n- {{apiVersion: apps/v1, kind: Deployment, metadata: {{name: d, namespace: ops}}, spec: {{{template}}}}}\n"
        );
        assert_eq!(
            identities(&input),
            [
                "spiffe://cluster.local/ns/shop/sa/shopper",
                "spiffe://cluster.local/ns/default/sa/shopper",
                "spiffe://cluster.local/ns/payments/sa/default",
                "spiffe://cluster.local/ns/ops/sa/shopper",
            ]
        );
    }

    #[test]
    fn yaml_merge_keys_are_applied_as_kubectl_applies_them() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: m}\nspec:\n  containers:\n  - &base {name: a, image: busybox}\n  - <<: *base\n    name: b\n";
        let injected = inject(input).unwrap();
        let pod: Value = serde_yaml_ng::from_str(&injected.output).unwrap();
        assert_eq!(
            pod["spec"]["containers"],
            json!([{"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}]),
            "{}",
            injected.output
        );
    }

    #[test]
    fn scalar_keys_of_documents_left_alone_do_not_stop_the_run() {
        let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {8080: x}\n";
        let input = format!("{config_map}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p, labels: {{1: a}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\n");
        let injected = inject(&input).unwrap();
        assert!(
            injected.output.starts_with(config_map),
            "{}",
            injected.output
        );
        assert!(injected.output.contains("'1': a"), "{}", injected.output);
    }

    #[test]
    fn octal_file_modes_are_read_as_kubectl_reads_them() {
        // YAML 1.1 (kubectl) reads a plain 0644 as octal, 420; YAML 1.2 as the string "0644".
        let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: m}\nspec:\n  containers: [{name: a, image: busybox}]\n  volumes:\n  - name: s\n    secret: {secretName: s, defaultMode: 0644, items: [{key: k, path: p, mode: 0400}]}\n  - name: p\n    projected: {defaultMode: 0755, sources: [{configMap: {name: c, items: [{key: k, path: q, mode: 0600}]}}]}\n  - name: v\n    csi: {driver: d, volumeAttributes: {mode: '0700'}}\n";
        let injected = inject(input).unwrap();
        let pod: Value = serde_yaml_ng::from_str(&injected.output).unwrap();
        let volumes = &pod["spec"]["volumes"];
        assert_eq!(
            volumes[0]["secret"]["defaultMode"], 0o644,
            "{}",
            injected.output
        );
        assert_eq!(volumes[0]["secret"]["items"][0]["mode"], 0o400);
        assert_eq!(volumes[1]["projected"]["defaultMode"], 0o755);
        assert_eq!(
            volumes[1]["projected"]["sources"][0]["configMap"]["items"][0]["mode"],
            0o600
        );
        // A CSI driver's own attributes are strings, whatever they are called.
        assert_eq!(volumes[2]["csi"]["volumeAttributes"]["mode"], "0700");
    }

    #[test]
    fn an_unquoted_annotation_value_is_named() {
        let input = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  template:\n    metadata:\n      labels: {app: w}\n      annotations:\n        remora.io/proxy-uid: 2102\n    spec:\n      containers: [{name: a, image: busybox}]\n";
        let message = inject(input).unwrap_err().to_string();
        assert!(
            message.contains("annotation remora.io/proxy-uid: 2102 is not a string")
                && message.contains("\"2102\""),
            "{message}"
        );
        let message = inject(&input.replace("remora.io/proxy-uid: 2102", "remora.io/inject: true"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("annotation remora.io/inject: true is not a string"),
            "{message}"
        );
    }

    #[test]
    fn an_invalid_pod_template_names_the_field() {
        let input = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: busybox, ports: [{containerPort: http}]}]\n";
        let message = inject(input).unwrap_err().to_string();
        assert!(
            message.contains(
                "spec.containers[0].ports[0].containerPort: invalid type: string \"http\""
            ),
            "{message}"
        );
    }

    #[test]
    fn warnings_name_the_document_and_object() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\nspec: {hostNetwork: true, containers: [{name: c, image: i}]}\n";
        let injected = inject(input).unwrap();
        assert_eq!(injected.output, input);
        assert_eq!(injected.warnings.len(), 1);
        assert!(
            injected.warnings[0].starts_with("document 1 (line 1), Pod n/p: remora: not injected"),
            "{:?}",
            injected.warnings
        );
    }
}
