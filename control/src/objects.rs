//! The Kubernetes objects remora-control reads, and reading them from `--objects` files.
//!
//! A file holds YAML documents separated by `---` (or one JSON value); a document is an object
//! or a `List` of them. Services, EndpointSlices, HTTPRoutes, GRPCRoutes, ReferenceGrants and
//! Pods are kept;
//! other kinds are skipped. A document that can't be read becomes a [`Problem`] naming the file
//! and the document, and the rest of the file is still read, so one typo never empties the mesh.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::gateway::{GrpcRoute, HttpRoute, ReferenceGrant};

/// Every object read, whole: what the index is built from.
///
/// Objects are shared, not copied: a set published after one change holds the same `Arc`s as
/// the one before for everything else, which is how the index tells what changed (and a copy of
/// the set is a copy of pointers).
#[derive(Debug, Clone, Default)]
pub struct ObjectSet {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub http_routes: Vec<Arc<Stored<HttpRoute>>>,
    pub grpc_routes: Vec<Arc<Stored<GrpcRoute>>>,
    /// What lets a route's backendRef name a Service in another namespace.
    pub reference_grants: Vec<Arc<ReferenceGrant>>,
    /// Their `remora.io/status` annotation marks them meshed, and with which identity.
    pub pods: Vec<Arc<Pod>>,
}

/// Equal when every object is, in the same order; objects shared by both sets are not compared
/// field by field.
impl PartialEq for ObjectSet {
    fn eq(&self, other: &Self) -> bool {
        fn same<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
        }
        same(&self.services, &other.services)
            && same(&self.endpoint_slices, &other.endpoint_slices)
            && same(&self.http_routes, &other.http_routes)
            && same(&self.grpc_routes, &other.grpc_routes)
            && same(&self.reference_grants, &other.reference_grants)
            && same(&self.pods, &other.pods)
    }
}

/// A Service by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A route, whichever kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Http(Arc<Stored<HttpRoute>>),
    Grpc(Arc<Stored<GrpcRoute>>),
}

impl Route {
    fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::Http(route) => &route.metadata,
            Self::Grpc(route) => &route.metadata,
        }
    }

    pub fn namespace(&self) -> &str {
        self.metadata().namespace.as_deref().unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    /// The route as stored, as JSON (see [`crate::objects::stored_json`]).
    pub fn json(&self) -> &Arc<str> {
        match self {
            Self::Http(route) => &route.json,
            Self::Grpc(route) => &route.json,
        }
    }
}

/// An object read, and the JSON it was read from: what is sent of a route is the object as
/// stored, which remora's own (read-only, partial) types could not write back.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<T> {
    pub object: T,
    /// The object as compact JSON, as [`stored_json`] keeps it.
    pub json: Arc<str>,
}

impl<T> std::ops::Deref for Stored<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.object
    }
}

/// An object's JSON as it is kept beside the object: whole, but without `status` and the
/// metadata that changes on every write (`resourceVersion`, `managedFields`), so that only a
/// change of the object itself is one to publish; with its `apiVersion` and `kind` first (the
/// items of a list may have been sent without them); namespaced in `default` when it names no
/// namespace, as the object read from it is.
pub fn stored_json(value: &Value, api_version: &str, kind: &str) -> Arc<str> {
    let mut object = serde_json::Map::new();
    object.insert("apiVersion".to_string(), Value::from(api_version));
    object.insert("kind".to_string(), Value::from(kind));
    for (field, value) in value.as_object().into_iter().flatten() {
        if matches!(field.as_str(), "apiVersion" | "kind" | "status") {
            continue;
        }
        object.insert(field.clone(), value.clone());
    }
    if let Some(Value::Object(metadata)) = object.get_mut("metadata") {
        metadata.remove("resourceVersion");
        metadata.remove("managedFields");
        let namespace = metadata.get("namespace").and_then(Value::as_str);
        if namespace.is_none_or(str::is_empty) {
            metadata.insert("namespace".to_string(), Value::from("default"));
        }
    }
    Arc::from(Value::Object(object).to_string())
}

impl ObjectSet {
    /// How many objects of each kind, for logs and metrics.
    pub fn counts(&self) -> [(&'static str, usize); 6] {
        [
            ("Service", self.services.len()),
            ("EndpointSlice", self.endpoint_slices.len()),
            ("HTTPRoute", self.http_routes.len()),
            ("GRPCRoute", self.grpc_routes.len()),
            ("ReferenceGrant", self.reference_grants.len()),
            ("Pod", self.pods.len()),
        ]
    }

    /// Adds `other`'s objects (shared, not copied).
    pub fn append(&mut self, other: &ObjectSet) {
        self.services.extend_from_slice(&other.services);
        self.endpoint_slices
            .extend_from_slice(&other.endpoint_slices);
        self.http_routes.extend_from_slice(&other.http_routes);
        self.grpc_routes.extend_from_slice(&other.grpc_routes);
        self.reference_grants
            .extend_from_slice(&other.reference_grants);
        self.pods.extend_from_slice(&other.pods);
    }
}

/// Where in the input something went wrong: a file, a document (1-based) and, inside a `List`,
/// an item (0-based, as `items[N]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub document: Option<usize>,
    pub item: Option<usize>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(document) = self.document {
            write!(f, ", document {document}")?;
        }
        if let Some(item) = self.item {
            write!(f, ", items[{item}]")?;
        }
        Ok(())
    }
}

/// Something in the input that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{path}: cannot read: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{at}: not YAML or JSON: {message}")]
    Syntax { at: Location, message: String },
    #[error("{at}: {message} (expected an object with apiVersion and kind, or a List)")]
    NotAnObject { at: Location, message: String },
    #[error("{at}: {kind} {name}: field `{field}`: {message}")]
    Invalid {
        at: Location,
        kind: String,
        name: String,
        field: String,
        message: String,
    },
    /// An object from the API server (the cluster source, which has no file to name) that does
    /// not read as its kind.
    #[error("{kind} {namespace}/{name}: field `{field}`: {message}")]
    Object {
        kind: String,
        namespace: String,
        name: String,
        field: String,
        message: String,
    },
}

/// Reads every path (a file, or a directory read recursively for `*.yaml`, `*.yml` and
/// `*.json`) and returns what they hold and what had to be skipped.
pub fn read_paths(paths: &[PathBuf]) -> (ObjectSet, Vec<Problem>) {
    let mut objects = ObjectSet::default();
    let mut problems = Vec::new();
    for file in files(paths, &mut problems) {
        let (read, skipped) = read_file(&file);
        objects.append(&read);
        problems.extend(skipped);
    }
    (objects, problems)
}

/// Reads one file, whatever its name: JSON if it ends in `.json`, else YAML.
pub fn read_file(path: &Path) -> (ObjectSet, Vec<Problem>) {
    match fs::read_to_string(path) {
        Ok(text) => read_file_text(path, &text),
        Err(err) => (
            ObjectSet::default(),
            vec![Problem::Io {
                path: path.to_path_buf(),
                message: err.to_string(),
            }],
        ),
    }
}

/// The files `paths` name, in a stable order: each path given that is a file (whatever its
/// name), and under each directory every `*.yaml`, `*.yml` and `*.json` file.
///
/// Names starting with `.` are skipped: a ConfigMap volume keeps its real files under
/// `..data/` and `..<timestamp>/` beside the symlinks named for the keys, so reading those
/// too would read every object two or three times; editors' swap files start with `.` as well.
pub fn files(paths: &[PathBuf], problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut seen_directories = HashSet::new();
    for path in paths {
        match fs::metadata(path) {
            Ok(metadata) if metadata.is_dir() => {
                walk(path, &mut seen_directories, &mut out, problems)
            }
            Ok(_) => out.push(path.clone()),
            Err(err) => problems.push(Problem::Io {
                path: path.clone(),
                message: err.to_string(),
            }),
        }
    }
    out
}

fn walk(
    directory: &Path,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
    problems: &mut Vec<Problem>,
) {
    // Symlinks are followed, so a link back up the tree must not loop for ever.
    let real = fs::canonicalize(directory).unwrap_or_else(|_| directory.to_path_buf());
    if !seen.insert(real) {
        return;
    }
    let entries = match fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(err) => {
            problems.push(Problem::Io {
                path: directory.to_path_buf(),
                message: err.to_string(),
            });
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| !name.starts_with('.'))
        })
        .collect();
    paths.sort();
    for path in paths {
        match fs::metadata(&path) {
            Ok(metadata) if metadata.is_dir() => walk(&path, seen, out, problems),
            Ok(_) if is_manifest(&path) => out.push(path),
            Ok(_) => {}
            // A dangling symlink, or a file removed while we looked: nothing to read.
            Err(_) => {}
        }
    }
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|extension| extension.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Reads one file's text: `path` only names it in problems, and says whether it is JSON.
pub fn read_file_text(path: &Path, text: &str) -> (ObjectSet, Vec<Problem>) {
    let mut objects = ObjectSet::default();
    let mut problems = Vec::new();
    let at = |number: usize| Location {
        path: path.to_path_buf(),
        document: Some(number),
        item: None,
    };
    let json = path
        .extension()
        .is_some_and(|extension| extension == "json");
    if json {
        // A JSON file may hold a stream of values, as kubectl reads it; after a syntax error
        // there is no telling where the next value starts, so reading stops there.
        let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        for (index, value) in stream.enumerate() {
            match value {
                Ok(value) => read_value(value, &at(index + 1), &mut objects, &mut problems),
                Err(err) => {
                    problems.push(Problem::Syntax {
                        at: at(index + 1),
                        message: err.to_string(),
                    });
                    break;
                }
            }
        }
        return (objects, problems);
    }
    let mut syntax_errors = 0;
    for (index, document) in split_documents(text).into_iter().enumerate() {
        match parse_yaml(&document, syntax_errors < RECOUNTED_ERRORS) {
            Ok(Some(value)) => read_value(value, &at(index + 1), &mut objects, &mut problems),
            Ok(None) => {}
            Err(message) => {
                syntax_errors += 1;
                problems.push(Problem::Syntax {
                    at: at(index + 1),
                    message,
                });
            }
        }
    }
    (objects, problems)
}

/// One YAML document of a file, and where it starts there.
#[derive(Debug, PartialEq)]
struct Document<'a> {
    /// 1-based line of the file the text starts on.
    line: usize,
    /// 0-based column the text starts at: 3 after a `---` marker, else 0.
    column: usize,
    text: &'a str,
}

/// Splits a YAML stream at its `---` markers (YAML forbids `---` at column 0 inside a scalar,
/// so a line-based split is exact). Splitting first lets a broken document be skipped alone,
/// where the parser's own multi-document reader stops at the first error.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut documents = Vec::new();
    let mut current = Document {
        line: 1,
        column: 0,
        text: "",
    };
    let mut start = 0;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        if marker {
            current.text = &text[start..offset];
            documents.push(current);
            // Content after the marker on its line (`--- {…}`) belongs to the next document.
            start = offset + 3;
            current = Document {
                line: index + 1,
                column: 3,
                text: "",
            };
        }
        offset += line.len();
    }
    current.text = &text[start..];
    documents.push(current);
    // Only documents with content count, so the numbers match what a reader sees between
    // markers (a leading `---` does not make an empty document 1).
    documents
        .into_iter()
        .filter(|document| {
            document.text.lines().any(|line| {
                let line = line.trim();
                !line.is_empty() && !line.starts_with('#') && !line.starts_with('%')
            })
        })
        .collect()
}

/// Syntax errors per file whose positions are recounted in the file. Recounting parses the
/// document again behind as many blank lines as precede it, so a file of many broken documents
/// must not make the read quadratic.
const RECOUNTED_ERRORS: usize = 20;

/// A YAML document as JSON; `None` when it is empty or `null`. On an error, `recount` says
/// whether to find the position in the file (else the message says where counting starts).
fn parse_yaml(document: &Document<'_>, recount: bool) -> Result<Option<Value>, String> {
    let parse = |text: &str| -> Result<Value, String> {
        // kubectl honours `<<: *anchor` merge keys; objects written with them should read the
        // same. Merging needs the YAML tree, an extra copy of the document most never need.
        if !text.contains("<<") {
            return serde_yaml_ng::from_str(text).map_err(|err| err.to_string());
        }
        let mut yaml: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|err| err.to_string())?;
        yaml.apply_merge().map_err(|err| err.to_string())?;
        serde_json::to_value(yaml).map_err(|err| err.to_string())
    };
    let yaml = match parse(document.text) {
        Ok(yaml) => yaml,
        Err(message) if !recount => {
            return Err(format!(
                "{message} (line 1 there is line {} of the file)",
                document.line
            ))
        }
        Err(message) => {
            // Parsed again at its place in the file, so that the lines and columns the parser
            // names are the ones the user's editor shows. Only on error: padding every
            // document would make reading a large file quadratic.
            let mut padded = "\n".repeat(document.line - 1);
            padded.extend(std::iter::repeat_n(' ', document.column));
            padded.push_str(document.text);
            return Err(parse(&padded).err().unwrap_or(message));
        }
    };
    Ok(Some(yaml).filter(|value| !value.is_null()))
}

/// Files one parsed document (an object or a List) into `objects`.
fn read_value(value: Value, at: &Location, objects: &mut ObjectSet, problems: &mut Vec<Problem>) {
    let Value::Object(mut map) = value else {
        problems.push(Problem::NotAnObject {
            at: at.clone(),
            message: format!("a {} is not an object", json_type(&value)),
        });
        return;
    };
    let field = |name: &str| {
        map.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    // `kind: List` (kubectl) or a typed list such as `ServiceList` (the API), whose items carry
    // no apiVersion and kind of their own.
    if kind.ends_with("List") && at.item.is_none() {
        let item_kind = kind.strip_suffix("List").filter(|kind| !kind.is_empty());
        let item_kind = item_kind.map(str::to_string);
        let items = match map.remove("items") {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None => Vec::new(),
            Some(other) => {
                problems.push(Problem::NotAnObject {
                    at: at.clone(),
                    message: format!("{kind} has `items` that is a {}", json_type(&other)),
                });
                return;
            }
        };
        for (index, mut item) in items.into_iter().enumerate() {
            if let (Some(item_kind), Value::Object(fields)) = (&item_kind, &mut item) {
                fields
                    .entry("kind")
                    .or_insert_with(|| Value::String(item_kind.clone()));
                fields
                    .entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.clone()));
            }
            let at = Location {
                item: Some(index),
                ..at.clone()
            };
            read_value(item, &at, objects, problems);
        }
        return;
    }
    if api_version.is_empty() || kind.is_empty() {
        problems.push(Problem::NotAnObject {
            at: at.clone(),
            message: "an object without apiVersion or kind".to_string(),
        });
        return;
    }
    let value = Value::Object(map);
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            if let Some(object) = typed(value, at, &kind, problems) {
                objects.services.push(Arc::new(object));
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(object) = typed(value, at, &kind, problems) {
                objects.endpoint_slices.push(Arc::new(object));
            }
        }
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
            let json = stored_json(&value, &api_version, &kind);
            if let Some(object) = typed(value, at, &kind, problems) {
                objects.http_routes.push(Arc::new(Stored { object, json }));
            }
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
            let json = stored_json(&value, &api_version, &kind);
            if let Some(object) = typed(value, at, &kind, problems) {
                objects.grpc_routes.push(Arc::new(Stored { object, json }));
            }
        }
        // v1beta1 is the version clusters serve; v1 is read too, for files written ahead.
        (
            "gateway.networking.k8s.io/v1beta1" | "gateway.networking.k8s.io/v1",
            "ReferenceGrant",
        ) => {
            if let Some(object) = typed(value, at, &kind, problems) {
                objects.reference_grants.push(Arc::new(object));
            }
        }
        ("v1", "Pod") => {
            if let Some(object) = typed(value, at, &kind, problems) {
                objects.pods.push(Arc::new(object));
            }
        }
        _ => {
            tracing::debug!(%at, api_version, kind, "objects: a kind remora does not read, skipped")
        }
    }
}

/// An object with metadata: namespaced objects written without a namespace are in `default`,
/// as `kubectl apply` would put them.
trait Namespaced {
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
}

macro_rules! namespaced {
    ($($type:ty),+) => {$(
        impl Namespaced for $type {
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    )+};
}

namespaced!(
    Service,
    EndpointSlice,
    HttpRoute,
    GrpcRoute,
    ReferenceGrant,
    Pod
);

fn typed<T: DeserializeOwned + Namespaced>(
    value: Value,
    at: &Location,
    kind: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string);
    let invalid = |field: String, message: String| Problem::Invalid {
        at: at.clone(),
        kind: kind.to_string(),
        name: name.clone().unwrap_or_else(|| "(unnamed)".to_string()),
        field,
        message,
    };
    let mut object: T = match serde_path_to_error::deserialize(value) {
        Ok(object) => object,
        Err(err) => {
            problems.push(invalid(err.path().to_string(), err.inner().to_string()));
            return None;
        }
    };
    if name.as_deref().is_none_or(str::is_empty) {
        problems.push(invalid(
            "metadata.name".to_string(),
            "missing (every object needs a name)".to_string(),
        ));
        return None;
    }
    let metadata = object.metadata_mut();
    if metadata.namespace.as_deref().is_none_or(str::is_empty) {
        metadata.namespace = Some("default".to_string());
    }
    Some(object)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn read(name: &str, text: &str) -> (ObjectSet, Vec<Problem>) {
        read_file_text(Path::new(name), text)
    }

    fn names<'a>(metadata: impl Iterator<Item = &'a ObjectMeta>) -> Vec<String> {
        metadata
            .map(|meta| {
                format!(
                    "{}/{}",
                    meta.namespace.as_deref().unwrap_or("?"),
                    meta.name.as_deref().unwrap_or("?")
                )
            })
            .collect()
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn an_empty_list_holds_nothing_and_is_no_problem() {
        for (case, text) in [
            ("kubectl List", "apiVersion: v1\nkind: List\nitems: []\n"),
            ("List without items", "apiVersion: v1\nkind: List\n"),
            (
                "typed list",
                "apiVersion: v1\nkind: ServiceList\nitems: null\n",
            ),
        ] {
            let (objects, problems) = read("a.yaml", text);
            assert_eq!(objects, ObjectSet::default(), "{case}");
            assert_eq!(problems, Vec::new(), "{case}");
        }
    }

    #[test]
    fn a_list_of_mixed_kinds_keeps_the_kinds_read_and_skips_the_others() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: shop}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.1.0.1]}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: r, namespace: shop}
- apiVersion: gateway.networking.k8s.io/v1beta1
  kind: ReferenceGrant
  metadata: {name: g, namespace: data}
  spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}], to: [{group: '', kind: Service}]}
- apiVersion: gateway.networking.k8s.io/v1
  kind: GRPCRoute
  metadata: {name: g, namespace: shop}
- apiVersion: v1
  kind: Pod
  metadata: {name: p, namespace: shop}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c}
"#;
        let (objects, problems) = read("list.yaml", text);
        assert_eq!(problems, Vec::new());
        assert_eq!(
            objects.counts(),
            [
                ("Service", 1),
                ("EndpointSlice", 1),
                ("HTTPRoute", 1),
                ("GRPCRoute", 1),
                ("ReferenceGrant", 1),
                ("Pod", 1)
            ]
        );
    }

    #[test]
    fn a_typed_list_gives_its_items_their_kind() {
        let text = "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {name: a, namespace: x}\n- metadata: {name: b, namespace: x}\n";
        let (objects, problems) = read("a.yaml", text);
        assert_eq!(problems, Vec::new());
        assert_eq!(
            names(objects.services.iter().map(|s| &s.metadata)),
            ["x/a", "x/b"]
        );
    }

    #[test]
    fn a_broken_document_is_reported_with_file_and_number_and_the_others_kept() {
        let text = format!(
            "# leading comment\n---\n{SERVICE}---\nkind: Service\nmetadata: [unclosed\n---\n{}",
            SERVICE.replace("web", "api")
        );
        let (objects, problems) = read("dir/mesh.yaml", &text);
        assert_eq!(
            names(objects.services.iter().map(|s| &s.metadata)),
            ["shop/web", "shop/api"]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        let message = problems[0].to_string();
        assert!(
            message.starts_with("dir/mesh.yaml, document 2: not YAML or JSON"),
            "{message}"
        );
    }

    #[test]
    fn an_object_with_a_bad_field_is_named_with_its_field() {
        let text = format!(
            "{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {{ports: [{{port: eighty}}]}}\n"
        );
        let (objects, problems) = read("s.yaml", &text);
        assert_eq!(objects.services.len(), 1);
        assert_eq!(problems.len(), 1);
        let Problem::Invalid {
            at,
            kind,
            name,
            field,
            ..
        } = &problems[0]
        else {
            panic!("{problems:?}");
        };
        assert_eq!(at.document, Some(2));
        assert_eq!(
            (kind.as_str(), name.as_str(), field.as_str()),
            ("Service", "bad", "spec.ports[0].port")
        );
    }

    #[test]
    fn a_broken_list_item_names_its_index_and_the_other_items_are_kept() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n- 42\n- {apiVersion: v1, kind: Service, metadata: {}}\n- {apiVersion: v1, kind: Service, metadata: {name: b}}\n";
        let (objects, problems) = read("l.yaml", text);
        assert_eq!(
            names(objects.services.iter().map(|s| &s.metadata)),
            ["default/a", "default/b"]
        );
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "l.yaml, document 1, items[1]: a number is not an object (expected an object with apiVersion and kind, or a List)",
                "l.yaml, document 1, items[2]: Service (unnamed): field `metadata.name`: missing (every object needs a name)",
            ]
        );
    }

    #[test]
    fn merge_keys_and_tags_read_as_kubectl_reads_them() {
        let text = "\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: x}
spec:
  ports:
  - &http {name: http, port: 80, appProtocol: http}
  - <<: *http
    name: alt
    port: 8080
---
apiVersion: v1
kind: Service
metadata: {name: !!str b, namespace: x}
";
        let (objects, problems) = read("m.yaml", text);
        assert_eq!(problems, Vec::new());
        let ports = objects.services[0]
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap();
        let alt = &ports[1];
        assert_eq!(
            (alt.name.as_deref(), alt.port, alt.app_protocol.as_deref()),
            (Some("alt"), 8080, Some("http"))
        );
        assert_eq!(objects.services[1].metadata.name.as_deref(), Some("b"));
    }

    #[test]
    fn objects_without_a_namespace_are_in_default() {
        let (objects, _) = read(
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
        );
        assert_eq!(
            objects.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn a_json_file_is_read_as_json_even_with_tabs() {
        let text = "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"List\",\n\t\"items\": [{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}}]\n}\n";
        let (objects, problems) = read("a.json", text);
        assert_eq!(problems, Vec::new());
        assert_eq!(objects.services.len(), 1);
    }

    #[test]
    fn documents_are_numbered_as_a_reader_counts_them() {
        let document = |line, column, text| Document { line, column, text };
        let cases = [
            (
                "leading marker",
                "---\na: 1\n---\nb: 2\n",
                vec![document(1, 3, "\na: 1\n"), document(3, 3, "\nb: 2\n")],
            ),
            ("no marker", "a: 1\n", vec![document(1, 0, "a: 1\n")]),
            (
                "content on the marker line",
                "x: 0\n--- {a: 1}\n",
                vec![document(1, 0, "x: 0\n"), document(2, 3, " {a: 1}\n")],
            ),
            ("comments only", "# c\n---\n# d\n", vec![]),
            (
                "marker-like text",
                "a: |\n  ---x\n",
                vec![document(1, 0, "a: |\n  ---x\n")],
            ),
        ];
        for (case, text, expected) in cases {
            assert_eq!(split_documents(text), expected, "{case}");
        }
    }

    #[test]
    fn syntax_errors_name_the_line_and_column_in_the_file() {
        let text = "a: 1\n---\nb: 2\n---\nc: [1,\n--- {d: [}\n";
        let (_, problems) = read("f.yaml", text);
        // Documents 1 and 2 are read (and refused for want of a kind); 3 and 4 are not YAML.
        let messages: Vec<String> = problems
            .iter()
            .filter(|problem| matches!(problem, Problem::Syntax { .. }))
            .map(ToString::to_string)
            .collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with("f.yaml, document 3: not YAML or JSON"),
            "{messages:?}"
        );
        assert!(messages[0].contains("line 6 column 1"), "{messages:?}");
        assert!(
            messages[1].starts_with("f.yaml, document 4: not YAML or JSON"),
            "{messages:?}"
        );
        assert!(messages[1].contains("line 6 column 10"), "{messages:?}");
    }

    #[test]
    fn past_the_recount_budget_syntax_errors_say_where_their_lines_count_from() {
        let text = "a: [\n---\n".repeat(RECOUNTED_ERRORS + 1);
        let (_, problems) = read("f.yaml", &text);
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), RECOUNTED_ERRORS + 1);
        // Document N starts on line 2N - 2 (after its marker) and breaks at line 2N.
        let recounted = &messages[RECOUNTED_ERRORS - 1];
        let line = 2 * RECOUNTED_ERRORS;
        assert!(
            recounted.contains(&format!("line {line} column 1")),
            "{recounted}"
        );
        let first_past = &messages[RECOUNTED_ERRORS];
        let start = 2 * (RECOUNTED_ERRORS + 1) - 2;
        assert!(
            first_past.ends_with(&format!("at line 3 column 1, while parsing a flow node (line 1 there is line {start} of the file)")),
            "{first_past}"
        );
    }

    #[test]
    fn a_json_stream_is_read_until_its_first_syntax_error() {
        let service = |name: &str| {
            format!(
                r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "{name}"}}}}"#
            )
        };
        let text = format!(
            "{}\n{}\n{{\"broken\": \n{}",
            service("a"),
            service("b"),
            service("c")
        );
        let (objects, problems) = read("s.json", &text);
        assert_eq!(
            names(objects.services.iter().map(|s| &s.metadata)),
            ["default/a", "default/b"]
        );
        assert_eq!(problems.len(), 1);
        assert!(problems[0]
            .to_string()
            .starts_with("s.json, document 3: not YAML or JSON"));
    }

    #[test]
    fn a_directory_tree_is_read_recursively_for_manifest_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join("..data")).unwrap();
        fs::write(root.join("one.yaml"), SERVICE).unwrap();
        fs::write(root.join("a/two.yml"), SERVICE.replace("web", "two")).unwrap();
        fs::write(
            root.join("a/b/three.json"),
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "three"}}"#,
        )
        .unwrap();
        fs::write(root.join("a/notes.txt"), "kind: Service").unwrap();
        fs::write(root.join("..data/dup.yaml"), SERVICE).unwrap();
        fs::write(root.join(".hidden.yaml"), SERVICE).unwrap();
        std::os::unix::fs::symlink(root, root.join("a/loop")).unwrap();
        let (objects, problems) = read_paths(&[root.to_path_buf()]);
        assert_eq!(problems, Vec::new());
        assert_eq!(
            names(objects.services.iter().map(|s| &s.metadata)),
            ["default/three", "shop/two", "shop/web"]
        );
    }

    #[test]
    fn a_file_named_directly_is_read_whatever_its_name_and_a_missing_path_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("objects.txt");
        fs::write(&file, SERVICE).unwrap();
        let missing = dir.path().join("missing.yaml");
        let (objects, problems) = read_paths(&[file, missing.clone()]);
        assert_eq!(objects.services.len(), 1);
        assert!(matches!(&problems[..], [Problem::Io { path, .. }] if *path == missing));
    }
}
