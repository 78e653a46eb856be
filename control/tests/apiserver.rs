//! The cluster source against an API server on loopback that speaks list and watch as the
//! Kubernetes API documents them (api-concepts: "Efficient detection of changes", "Watch
//! bookmarks", "Resource versions"): lists carry `metadata.resourceVersion` and page with
//! `limit`/`continue`; `?watch=true&resourceVersion=N` streams newline-delimited WatchEvents
//! (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) after N; a resourceVersion older than the kept
//! history is `410 Gone` with a `Status` of reason `Expired`; a refused token is `401` with a
//! `Status`; a kind not served (a CRD not installed) is `404`. A real `kube::Client` talks to it.
//! It also answers what remora-control writes: `POST` of a TokenReview (authentication.k8s.io/v1,
//! as `kubectl create --raw` would: the review back with its `status`), and `GET`/`POST`/`PUT` of
//! Secrets in `remora-system` (`409 AlreadyExists` on a create of one that exists, `409 Conflict`
//! on a replace whose resourceVersion is not the stored one).
#![cfg(feature = "cluster")]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use remora_control::index::Index;
use remora_control::kube_source::{watch_cluster_with, Options};
use remora_control::objects::{read_paths, Problem};
use remora_control::watch::Snapshot;

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
const GRPC_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/grpcroutes";
const GRANTS: &str = "/apis/gateway.networking.k8s.io/v1beta1/referencegrants";
const PODS: &str = "/api/v1/pods";
const RESOURCES: [&str; 6] = [SERVICES, SLICES, HTTP_ROUTES, GRPC_ROUTES, GRANTS, PODS];

const TOKEN: &str = "Bearer remora-test-token";
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const SECRETS: &str = "/api/v1/namespaces/remora-system/secrets";

/// Far above what each step needs, so a slow machine does not fail the tests; the SPEC's 1 s for
/// a change is checked on its own.
const DEADLINE: Duration = Duration::from_secs(10);

fn kind_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        SERVICES => ("Service", "v1"),
        SLICES => ("EndpointSlice", "discovery.k8s.io/v1"),
        HTTP_ROUTES => ("HTTPRoute", "gateway.networking.k8s.io/v1"),
        GRPC_ROUTES => ("GRPCRoute", "gateway.networking.k8s.io/v1"),
        GRANTS => ("ReferenceGrant", "gateway.networking.k8s.io/v1beta1"),
        PODS => ("Pod", "v1"),
        _ => unreachable!("{resource}"),
    }
}

/// One change in the server's history, as a watch sends it.
struct Change {
    resource_version: u64,
    resource: &'static str,
    /// The WatchEvent line with the whole object, and with its metadata only.
    line: String,
    metadata_line: String,
}

/// What one request asked for, for the tests to check the client's behaviour.
#[derive(Debug, Clone)]
struct Logged {
    path: String,
    query: HashMap<String, String>,
    accept: String,
}

impl Logged {
    fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }
}

#[derive(Default)]
struct World {
    resource_version: u64,
    /// A watch from a resourceVersion before this is `410 Gone`: the history was compacted.
    oldest: u64,
    served: HashMap<&'static str, bool>,
    objects: HashMap<&'static str, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Bumped to end every open watch; `abrupt` ends them without the last chunk.
    cut: u64,
    abrupt: bool,
    unauthorized: bool,
    /// Answer a too-old watch with an HTTP 410 rather than an ERROR event.
    expire_with_status_code: bool,
    bookmark_every: Option<Duration>,
    /// Lists in progress by `continue` token: the resourceVersion and items left.
    continues: HashMap<String, (u64, Vec<Value>)>,
    requests: Vec<Logged>,
    /// The tokens the authenticator knows.
    tokens: HashMap<String, Holder>,
    /// Answer reviews without `status.audiences`, as an authenticator unaware of audiences would.
    audience_unaware: bool,
    /// The TokenReviews received.
    reviews: Vec<Value>,
    /// Secrets of remora-system by name.
    secrets: BTreeMap<String, Value>,
    /// Stored just before a create of a Secret is answered, as another replica's create.
    race_on_create: Option<Value>,
    /// Every write: method and path.
    writes: Vec<(String, String)>,
}

/// Whose a token is, as the authenticator would find.
#[derive(Clone)]
struct Holder {
    user: String,
    audiences: Vec<String>,
    pod: Option<String>,
}

/// The API server: a `World` behind a lock, and a signal for open watches.
#[derive(Clone)]
struct ApiServer {
    addr: SocketAddr,
    world: Arc<Mutex<World>>,
    changes: watch::Sender<u64>,
}

type Body = BoxBody<Bytes, io::Error>;

impl ApiServer {
    async fn start(routes_served: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut world = World {
            resource_version: 1,
            oldest: 1,
            ..World::default()
        };
        for resource in RESOURCES {
            let served = routes_served || !matches!(resource, HTTP_ROUTES | GRPC_ROUTES | GRANTS);
            world.served.insert(resource, served);
            world.objects.insert(resource, BTreeMap::new());
        }
        let server = Self {
            addr: listener.local_addr().unwrap(),
            world: Arc::new(Mutex::new(world)),
            changes: watch::channel(0).0,
        };
        let accepting = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let server = accepting.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let server = server.clone();
                        async move {
                            let response = if request.method() == http::Method::GET {
                                server.answer(request)
                            } else {
                                server.write(request).await
                            };
                            Ok::<_, Infallible>(response)
                        }
                    });
                    // A watch cut abruptly ends its connection with an error: expected.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        server
    }

    fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config
            .headers
            .push((AUTHORIZATION, HeaderValue::from_static(TOKEN)));
        kube::Client::try_from(config).unwrap()
    }

    fn with<R>(&self, change: impl FnOnce(&mut World) -> R) -> R {
        let result = change(&mut self.world.lock().unwrap());
        self.changes.send_modify(|generation| *generation += 1);
        result
    }

    /// Creates or replaces an object, as a write to the API would.
    fn apply(&self, resource: &'static str, object: Value) -> u64 {
        self.with(|world| world.apply(resource, object))
    }

    fn delete(&self, resource: &'static str, namespace: &str, name: &str) {
        self.with(|world| world.delete(resource, namespace, name));
    }

    fn requests(&self) -> Vec<Logged> {
        self.world.lock().unwrap().requests.clone()
    }

    fn lists(&self, resource: &str) -> usize {
        self.requests()
            .iter()
            .filter(|logged| logged.path == resource && !logged.is_watch())
            .count()
    }

    fn answer(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_string();
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let accept = request
            .headers()
            .get(ACCEPT)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let authorized = request
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|value| value == TOKEN);
        let logged = Logged {
            path: path.clone(),
            query: query.clone(),
            accept: accept.clone(),
        };
        let mut world = self.world.lock().unwrap();
        world.requests.push(logged.clone());
        if world.unauthorized || !authorized {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        if let Some(name) = path
            .strip_prefix(SECRETS)
            .and_then(|rest| rest.strip_prefix('/'))
        {
            return match world.secrets.get(name) {
                Some(secret) => json_response(StatusCode::OK, secret),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("secrets \"{name}\" not found"),
                ),
            };
        }
        let Some(resource) = RESOURCES
            .into_iter()
            .find(|resource| *resource == path && world.served[resource])
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        let metadata_only = accept.contains("as=PartialObjectMetadata");
        if logged.is_watch() {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|version| version.parse().ok())
                .unwrap_or(0);
            if from < world.oldest && world.expire_with_status_code {
                let message = format!("too old resource version: {from} ({})", world.oldest);
                return status(StatusCode::GONE, "Expired", &message);
            }
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|seconds| seconds.parse().ok())
                .map_or(Duration::from_secs(290), Duration::from_secs);
            let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
            let generation = world.cut;
            drop(world);
            return self.watch(
                resource,
                from,
                generation,
                metadata_only,
                bookmarks,
                timeout,
            );
        }
        world.list(resource, &query, metadata_only)
    }

    /// A POST or PUT: a TokenReview, or a Secret created or replaced.
    async fn write(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let authorized = request
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|value| value == TOKEN);
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body is not JSON",
            );
        };
        let mut world = self.world.lock().unwrap();
        world.writes.push((method.clone(), path.clone()));
        if world.unauthorized || !authorized {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        match (method.as_str(), path.as_str()) {
            ("POST", TOKEN_REVIEWS) => {
                world.reviews.push(object.clone());
                object["status"] = world.review(&object["spec"]);
                json_response(StatusCode::CREATED, &object)
            }
            ("POST", SECRETS) => {
                let name = key_of(&object).1;
                if let Some(theirs) = world.race_on_create.take() {
                    world.store_secret(theirs);
                }
                if world.secrets.contains_key(&name) {
                    let message = format!("secrets \"{name}\" already exists");
                    return status(StatusCode::CONFLICT, "AlreadyExists", &message);
                }
                let stored = world.store_secret(object);
                json_response(StatusCode::CREATED, &stored)
            }
            ("PUT", _) if path.starts_with(SECRETS) => {
                let name = path.rsplit('/').next().unwrap_or_default().to_string();
                let Some(held) = world.secrets.get(&name) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "not found");
                };
                if held["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"] {
                    let message = format!("Operation cannot be fulfilled on secrets \"{name}\": the object has been modified; please apply your changes to the latest version and try again");
                    return status(StatusCode::CONFLICT, "Conflict", &message);
                }
                let stored = world.store_secret(object);
                json_response(StatusCode::OK, &stored)
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    }

    /// A watch's streamed body: the changes after `from`, then each new one, bookmarks if asked
    /// for, until the timeout or a cut.
    fn watch(
        &self,
        resource: &'static str,
        from: u64,
        generation: u64,
        metadata_only: bool,
        bookmarks: bool,
        timeout: Duration,
    ) -> Response<Body> {
        let (frames, receiver) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(64);
        let world = Arc::clone(&self.world);
        let mut changes = self.changes.subscribe();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut sent = from;
            let mut bookmark_due = false;
            let bookmark_every = world.lock().unwrap().bookmark_every.filter(|_| bookmarks);
            let mut bookmark_timer =
                tokio::time::interval(bookmark_every.unwrap_or(Duration::from_secs(3600)));
            bookmark_timer.tick().await;
            loop {
                changes.borrow_and_update();
                let (mut lines, end) = {
                    let world = world.lock().unwrap();
                    if world.cut != generation {
                        (Vec::new(), Some(world.abrupt))
                    } else if sent < world.oldest {
                        // The history from `from` on is gone: an ERROR event, as the API sends
                        // it from its watch cache, and the end of this watch.
                        let expired = json!({"type": "ERROR", "object": status_body(
                            410, "Expired",
                            &format!("too old resource version: {sent} ({})", world.oldest),
                        )});
                        (vec![expired.to_string()], Some(false))
                    } else {
                        let lines = world
                            .history
                            .iter()
                            .filter(|change| {
                                change.resource == resource && change.resource_version > sent
                            })
                            .map(|change| {
                                if metadata_only {
                                    change.metadata_line.clone()
                                } else {
                                    change.line.clone()
                                }
                            })
                            .collect();
                        sent = world.resource_version;
                        (lines, None)
                    }
                };
                if bookmark_due && end.is_none() {
                    let (kind, api_version) = kind_of(resource);
                    let (kind, api_version) = if metadata_only {
                        ("PartialObjectMetadata", "meta.k8s.io/v1")
                    } else {
                        (kind, api_version)
                    };
                    lines.push(
                        json!({"type": "BOOKMARK", "object": {
                            "kind": kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": sent.to_string()},
                        }})
                        .to_string(),
                    );
                    bookmark_due = false;
                }
                for line in lines {
                    let frame = Frame::data(Bytes::from(line + "\n"));
                    if frames.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                match end {
                    Some(true) => {
                        let _ = frames
                            .send(Err(io::Error::other("watch cut by the test")))
                            .await;
                        return;
                    }
                    Some(false) => return,
                    None => {}
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = bookmark_timer.tick(), if bookmark_every.is_some() => bookmark_due = true,
                    () = tokio::time::sleep_until(deadline) => return,
                    () = frames.closed() => return,
                }
            }
        });
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(StreamBody::new(stream).boxed())
            .unwrap()
    }
}

impl World {
    /// A TokenReview's status, as the API server's authenticator gives it.
    fn review(&self, spec: &Value) -> Value {
        let token = spec["token"].as_str().unwrap_or_default();
        let asked: Vec<String> = spec["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|audience| audience.as_str().map(str::to_string))
            .collect();
        let Some(holder) = self.tokens.get(token) else {
            return json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"});
        };
        let common: Vec<&String> = holder
            .audiences
            .iter()
            .filter(|a| asked.contains(a))
            .collect();
        if common.is_empty() && !self.audience_unaware {
            return json!({"user": {}, "error": format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                holder.audiences, asked)});
        }
        let mut extra = serde_json::Map::new();
        if let Some(pod) = &holder.pod {
            extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
            extra.insert(
                "authentication.kubernetes.io/pod-uid".into(),
                json!(["a3b1c2d4"]),
            );
        }
        let mut status = json!({"authenticated": true,
            "user": {"username": holder.user, "uid": "u-1",
                     "groups": ["system:serviceaccounts", "system:authenticated"], "extra": extra}});
        if !self.audience_unaware {
            status["audiences"] = json!(common);
        }
        status
    }

    /// Stores a Secret of remora-system with a new resourceVersion, as the API server returns it.
    fn store_secret(&mut self, mut secret: Value) -> Value {
        self.resource_version += 1;
        secret["kind"] = json!("Secret");
        secret["apiVersion"] = json!("v1");
        secret["metadata"]["namespace"] = json!("remora-system");
        secret["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        let name = key_of(&secret).1;
        self.secrets.insert(name, secret.clone());
        secret
    }

    fn apply(&mut self, resource: &'static str, mut object: Value) -> u64 {
        self.resource_version += 1;
        let version = self.resource_version;
        let (kind, api_version) = kind_of(resource);
        object["kind"] = json!(kind);
        object["apiVersion"] = json!(api_version);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = key_of(&object);
        let existed = self
            .objects
            .get_mut(resource)
            .unwrap()
            .insert(key, object.clone())
            .is_some();
        let event = if existed { "MODIFIED" } else { "ADDED" };
        self.record(resource, event, &object);
        version
    }

    fn delete(&mut self, resource: &'static str, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let mut object = self
            .objects
            .get_mut(resource)
            .unwrap()
            .remove(&key)
            .expect("deleting an object that exists");
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.record(resource, "DELETED", &object);
    }

    fn record(&mut self, resource: &'static str, event: &str, object: &Value) {
        self.history.push(Change {
            resource_version: self.resource_version,
            resource,
            line: json!({"type": event, "object": object}).to_string(),
            metadata_line: json!({"type": event, "object": partial(object)}).to_string(),
        });
    }

    /// A line that is not a WatchEvent, in the open watches of `resource`.
    fn garbage(&mut self, resource: &'static str, line: &str) {
        self.resource_version += 1;
        self.history.push(Change {
            resource_version: self.resource_version,
            resource,
            line: line.to_string(),
            metadata_line: line.to_string(),
        });
    }

    /// Forgets the history so far: a watch from an earlier resourceVersion is `410 Gone`.
    fn compact(&mut self) {
        self.oldest = self.resource_version;
        self.continues.clear();
    }

    /// Ends every open watch; `abrupt`: without the chunked body's end, as a dropped connection.
    fn cut_watches(&mut self, abrupt: bool) {
        self.cut += 1;
        self.abrupt = abrupt;
    }

    fn list(
        &mut self,
        resource: &'static str,
        query: &HashMap<String, String>,
        metadata_only: bool,
    ) -> Response<Body> {
        let (version, mut items) = match query.get("continue") {
            Some(token) => match self.continues.remove(token) {
                Some(rest) => rest,
                None => {
                    return status(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result.",
                    )
                }
            },
            None => (
                self.resource_version,
                self.objects[resource]
                    .values()
                    .map(|object| {
                        // Items of a list carry no kind and apiVersion of their own.
                        let mut item = object.clone();
                        if metadata_only {
                            item = partial(&item);
                        } else if let Value::Object(fields) = &mut item {
                            fields.remove("kind");
                            fields.remove("apiVersion");
                        }
                        item
                    })
                    .collect(),
            ),
        };
        let mut metadata = json!({"resourceVersion": version.to_string()});
        let limit = query
            .get("limit")
            .and_then(|limit| limit.parse::<usize>().ok());
        if let Some(limit) = limit.filter(|limit| *limit > 0 && items.len() > *limit) {
            let rest = items.split_off(limit);
            let token = format!("{version}-{}", self.continues.len() + self.requests.len());
            metadata["continue"] = json!(token);
            metadata["remainingItemCount"] = json!(rest.len());
            self.continues.insert(token, (version, rest));
        }
        let (kind, api_version) = if metadata_only {
            ("PartialObjectMetadataList".to_string(), "meta.k8s.io/v1")
        } else {
            let (kind, api_version) = kind_of(resource);
            (format!("{kind}List"), api_version)
        };
        let body =
            json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items});
        json_response(StatusCode::OK, &body)
    }
}

fn key_of(object: &Value) -> (String, String) {
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (text("namespace"), text("name"))
}

/// An object as a metadata-only request (`as=PartialObjectMetadata`) gets it.
fn partial(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "details": {}, "code": code})
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_body(code.as_u16(), reason, message))
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

// The objects.

fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                               "targetPort": 8080, "appProtocol": "http"}]}})
}

fn slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|address| json!({"addresses": [address], "conditions": {"ready": true}, "zone": "z1"}))
        .collect();
    json!({"metadata": {"name": name, "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

/// A route for `service` in `service_namespace`, from `namespace` (a consumer route when they
/// differ).
fn http_route(namespace: &str, name: &str, service_namespace: &str, service: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "namespace": service_namespace,
                                    "name": service, "port": 80}],
                    "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                               "backendRefs": [{"name": service, "port": 80}]}]}})
}

fn grpc_route(namespace: &str, name: &str, service: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": service}],
                    "rules": [{"backendRefs": [{"name": service, "port": 80}]}]}})
}

fn grant(namespace: &str, name: &str, from_namespace: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace},
           "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": from_namespace}],
                    "to": [{"group": "", "kind": "Service"}]}})
}

fn pod(namespace: &str, name: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace,
                        "annotations": {"remora.io/status": "injected"}},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]},
           "status": {"phase": "Running"}})
}

/// The objects most tests start from.
fn populate(server: &ApiServer, routes: bool) {
    server.apply(SERVICES, service("shop", "web", "10.96.0.10"));
    server.apply(SERVICES, service("shop", "api", "10.96.0.11"));
    server.apply(
        SLICES,
        slice("shop", "web-a", "web", &["10.1.0.1", "10.1.0.2"]),
    );
    server.apply(SLICES, slice("shop", "api-a", "api", &["10.1.1.1"]));
    if routes {
        server.apply(HTTP_ROUTES, http_route("shop", "web-v2", "shop", "web"));
        server.apply(GRPC_ROUTES, grpc_route("shop", "api-grpc", "api"));
        server.apply(GRANTS, grant("shop", "from-other", "other"));
    }
    server.apply(PODS, pod("shop", "web-0"));
}

// Watching the source.

fn options() -> Options {
    Options {
        coalesce: Duration::from_millis(50),
        absent_retry: Duration::from_millis(300),
    }
}

async fn start(server: &ApiServer) -> watch::Receiver<Arc<Snapshot>> {
    tokio::time::timeout(DEADLINE, watch_cluster_with(server.client(), options()))
        .await
        .expect("the source synced in time")
        .unwrap()
}

fn addresses(snapshot: &Snapshot, name: &str) -> Vec<String> {
    let mut addresses: Vec<String> = snapshot
        .objects
        .endpoint_slices
        .iter()
        .filter(|slice| slice.metadata.name.as_deref() == Some(name))
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .flat_map(|endpoint| endpoint.addresses.iter().cloned())
        .collect();
    addresses.sort();
    addresses
}

fn slice_names(snapshot: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .objects
        .endpoint_slices
        .iter()
        .filter_map(|slice| slice.metadata.name.clone())
        .collect();
    names.sort();
    names
}

/// Waits (at most `within`) for a snapshot that satisfies `test`; says how long it took.
async fn until(
    receiver: &mut watch::Receiver<Arc<Snapshot>>,
    within: Duration,
    what: &str,
    test: impl Fn(&Snapshot) -> bool,
) -> Duration {
    let start = Instant::now();
    let result = tokio::time::timeout(within, async {
        loop {
            if test(&receiver.borrow_and_update()) {
                return;
            }
            receiver.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "{what}: not within {within:?}; last snapshot: {:#?}",
        receiver.borrow()
    );
    start.elapsed()
}

/// Log lines written while a test runs (its runtime is current-thread, so every task of the
/// source logs on the test's thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Logs {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn the_first_snapshot_holds_the_listed_objects_and_a_change_follows_within_a_second() {
    let (logs, _guard) = Logs::capture();
    let server = ApiServer::start(true).await;
    populate(&server, true);
    let mut receiver = start(&server).await;
    {
        let snapshot = receiver.borrow_and_update();
        assert_eq!(
            snapshot.objects.counts(),
            [
                ("Service", 2),
                ("EndpointSlice", 2),
                ("HTTPRoute", 1),
                ("GRPCRoute", 1),
                ("ReferenceGrant", 1),
                ("Pod", 1)
            ]
        );
        assert_eq!(snapshot.problems, Vec::<Problem>::new());
        assert_eq!(addresses(&snapshot, "web-a"), ["10.1.0.1", "10.1.0.2"]);
        // Pods come as metadata only, their annotations kept.
        let pod = &snapshot.objects.pods[0];
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()["remora.io/status"],
            "injected"
        );
        assert_eq!(pod.spec, None);
    }
    let requests = server.requests();
    for logged in &requests {
        assert!(
            RESOURCES.contains(&logged.path.as_str()),
            "only the five kinds are asked for, no discovery: {logged:?}"
        );
        if logged.path == PODS {
            assert!(
                logged.accept.contains("as=PartialObjectMetadata"),
                "{logged:?}"
            );
        }
    }
    for resource in RESOURCES {
        assert_eq!(server.lists(resource), 1, "{resource}");
    }
    let log = logs.text();
    assert!(log.contains("cluster: synced"), "{log}");
    assert!(log.contains("kind=\"EndpointSlice\" count=2"), "{log}");

    // Each change within the SPEC's second.
    for (step, addresses_now) in [
        vec!["10.1.0.1", "10.1.0.3"],
        vec!["10.1.0.3"],
        vec!["10.1.0.3", "10.1.0.4", "10.1.0.5"],
    ]
    .into_iter()
    .enumerate()
    {
        server.apply(SLICES, slice("shop", "web-a", "web", &addresses_now));
        let took = until(&mut receiver, DEADLINE, "the slice change", |snapshot| {
            addresses(snapshot, "web-a") == addresses_now
        })
        .await;
        assert!(
            took < Duration::from_secs(1),
            "step {step}: {took:?} from the write to the snapshot"
        );
    }
    server.delete(SERVICES, "shop", "api");
    until(&mut receiver, DEADLINE, "the deletion", |snapshot| {
        snapshot.objects.services.len() == 1
    })
    .await;
    // Every watch started from the list's resourceVersion, with bookmarks asked for.
    let watches: Vec<Logged> = server
        .requests()
        .into_iter()
        .filter(Logged::is_watch)
        .collect();
    assert_eq!(watches.len(), RESOURCES.len(), "{watches:?}");
    for watch in watches {
        assert_eq!(
            watch.query.get("allowWatchBookmarks").map(String::as_str),
            Some("true")
        );
        assert!(watch.query.contains_key("resourceVersion"), "{watch:?}");
    }
}

#[tokio::test]
async fn a_burst_of_changes_is_published_as_few_snapshots() {
    let server = ApiServer::start(true).await;
    populate(&server, true);
    let mut receiver = start(&server).await;
    receiver.borrow_and_update();
    let mut published = 0;
    let burst = async {
        for step in 0..40 {
            let address = format!("10.1.2.{step}");
            server.apply(SLICES, slice("shop", "web-a", "web", &[&address]));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let count = async {
        loop {
            receiver.changed().await.unwrap();
            published += 1;
            if addresses(&receiver.borrow_and_update(), "web-a") == ["10.1.2.39"] {
                return;
            }
        }
    };
    let (_, result) = tokio::join!(burst, tokio::time::timeout(DEADLINE, count));
    result.expect("the last change of the burst arrived");
    // 40 writes over at least 200 ms, one publish per 50 ms at most.
    assert!(
        (1..=10).contains(&published),
        "{published} snapshots for 40 changes"
    );
}

/// After the history is compacted and the watches cut, the source lists again and ends
/// consistent: what was deleted in the gap is gone, what was added is there.
async fn relists_after_expiry(expire_with_status_code: bool) {
    let (logs, _guard) = Logs::capture();
    let server = ApiServer::start(true).await;
    populate(&server, true);
    server.with(|world| world.expire_with_status_code = expire_with_status_code);
    let mut receiver = start(&server).await;
    assert_eq!(
        slice_names(&receiver.borrow_and_update()),
        ["api-a", "web-a"]
    );
    server.with(|world| {
        world.delete(SLICES, "shop", "web-a");
        world.apply(SLICES, slice("shop", "web-b", "web", &["10.1.0.9"]));
        world.compact();
        world.cut_watches(false);
    });
    until(&mut receiver, DEADLINE, "the relist", |snapshot| {
        slice_names(snapshot) == ["api-a", "web-b"]
    })
    .await;
    assert_eq!(server.lists(SLICES), 2, "listed again after 410");
    let expired: Vec<Logged> = server
        .requests()
        .into_iter()
        .filter(|logged| logged.path == SLICES && logged.is_watch())
        .collect();
    assert!(expired.len() >= 2, "{expired:?}");
    // The source stays live after the relist.
    server.apply(SLICES, slice("shop", "web-b", "web", &["10.1.0.10"]));
    until(
        &mut receiver,
        DEADLINE,
        "a change after the relist",
        |snapshot| addresses(snapshot, "web-b") == ["10.1.0.10"],
    )
    .await;
    let log = logs.text();
    assert!(
        log.contains("resourceVersion expired; listing again"),
        "{log}"
    );
}

#[tokio::test]
async fn an_expired_resource_version_in_a_watch_event_relists() {
    relists_after_expiry(false).await;
}

#[tokio::test]
async fn an_expired_resource_version_answered_410_relists() {
    relists_after_expiry(true).await;
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_the_last_resource_version() {
    let server = ApiServer::start(true).await;
    populate(&server, true);
    let mut receiver = start(&server).await;
    receiver.borrow_and_update();
    let seen = server.apply(SLICES, slice("shop", "web-a", "web", &["10.1.0.7"]));
    until(
        &mut receiver,
        DEADLINE,
        "the change before the drop",
        |snapshot| addresses(snapshot, "web-a") == ["10.1.0.7"],
    )
    .await;
    // The connection drops mid-stream, and a change lands while no watch is open.
    server.with(|world| {
        world.cut_watches(true);
        world.apply(SLICES, slice("shop", "web-a", "web", &["10.1.0.8"]));
    });
    until(
        &mut receiver,
        DEADLINE,
        "the change made during the drop",
        |snapshot| addresses(snapshot, "web-a") == ["10.1.0.8"],
    )
    .await;
    assert_eq!(server.lists(SLICES), 1, "resumed, not listed again");
    let resumed: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|logged| logged.path == SLICES && logged.is_watch())
        .filter_map(|logged| logged.query.get("resourceVersion").cloned())
        .collect();
    assert_eq!(
        resumed.last(),
        Some(&seen.to_string()),
        "resumed from the last event seen: {resumed:?}"
    );
}

#[tokio::test]
async fn bookmarks_move_the_resume_point_past_other_kinds_changes() {
    let server = ApiServer::start(true).await;
    populate(&server, true);
    server.with(|world| world.bookmark_every = Some(Duration::from_millis(100)));
    let mut receiver = start(&server).await;
    receiver.borrow_and_update();
    // Many changes to Services alone: the EndpointSlice watch sees none of them, only bookmarks.
    for step in 0..20 {
        server.apply(
            SERVICES,
            service("shop", &format!("extra-{step}"), "10.96.1.1"),
        );
    }
    until(&mut receiver, DEADLINE, "the new Services", |snapshot| {
        snapshot.objects.services.len() == 22
    })
    .await;
    // Long enough for a bookmark on every watch.
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.with(|world| {
        world.compact();
        world.cut_watches(true);
    });
    server.apply(SLICES, slice("shop", "web-a", "web", &["10.1.0.6"]));
    until(
        &mut receiver,
        DEADLINE,
        "the change after the cut",
        |snapshot| addresses(snapshot, "web-a") == ["10.1.0.6"],
    )
    .await;
    for resource in RESOURCES {
        assert_eq!(
            server.lists(resource),
            1,
            "{resource}: resumed from its bookmark, not expired"
        );
    }
}

#[tokio::test]
async fn absent_gateway_kinds_do_not_block_and_appear_once_served() {
    let (logs, _guard) = Logs::capture();
    let server = ApiServer::start(false).await;
    populate(&server, false);
    let mut receiver = start(&server).await;
    assert_eq!(
        receiver.borrow_and_update().objects.counts(),
        [
            ("Service", 2),
            ("EndpointSlice", 2),
            ("HTTPRoute", 0),
            ("GRPCRoute", 0),
            ("ReferenceGrant", 0),
            ("Pod", 1)
        ]
    );
    let log = logs.text();
    assert!(
        log.contains("kind=\"HTTPRoute\"") && log.contains("does not serve this kind"),
        "{log}"
    );
    // The CRD is installed and a route created: seen at the next retry.
    server.with(|world| {
        world.served.insert(HTTP_ROUTES, true);
        world.apply(HTTP_ROUTES, http_route("shop", "web-v2", "shop", "web"));
    });
    until(&mut receiver, DEADLINE, "the route", |snapshot| {
        snapshot.objects.http_routes.len() == 1
    })
    .await;
    // Retried, and logged loudly only once.
    assert!(
        server
            .requests()
            .iter()
            .filter(|logged| logged.path == GRPC_ROUTES)
            .count()
            >= 2
    );
    let warnings = logs.text().matches("kind=\"GRPCRoute\" retry_in").count();
    assert_eq!(warnings, 1, "{}", logs.text());
    // The CRD removed: its routes go with it.
    server.with(|world| {
        world.served.insert(HTTP_ROUTES, false);
        world.cut_watches(false);
    });
    until(&mut receiver, DEADLINE, "the routes gone", |snapshot| {
        snapshot.objects.http_routes.is_empty()
    })
    .await;
}

#[tokio::test]
async fn unauthorized_is_logged_and_retried() {
    let (logs, _guard) = Logs::capture();
    let server = ApiServer::start(true).await;
    populate(&server, true);
    server.with(|world| world.unauthorized = true);
    let source = tokio::spawn(watch_cluster_with(server.client(), options()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !source.is_finished(),
        "not synced while every request is refused"
    );
    let log = logs.text();
    assert!(log.contains("401") && log.contains("Unauthorized"), "{log}");
    server.with(|world| world.unauthorized = false);
    let mut receiver = tokio::time::timeout(DEADLINE * 2, source)
        .await
        .expect("synced once the token is accepted")
        .unwrap()
        .unwrap();
    assert_eq!(
        slice_names(&receiver.borrow_and_update()),
        ["api-a", "web-a"]
    );

    // Refused again while watching (a token expired): the change made meanwhile still arrives.
    server.with(|world| {
        world.unauthorized = true;
        world.cut_watches(false);
        world.apply(SLICES, slice("shop", "web-a", "web", &["10.1.0.42"]));
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    server.with(|world| world.unauthorized = false);
    until(
        &mut receiver,
        DEADLINE * 2,
        "the change made while refused",
        |snapshot| addresses(snapshot, "web-a") == ["10.1.0.42"],
    )
    .await;
}

#[tokio::test]
async fn garbage_and_unreadable_objects_do_not_stop_the_source() {
    let (logs, _guard) = Logs::capture();
    let server = ApiServer::start(true).await;
    populate(&server, true);
    // An unreadable object already in the first list: the rest is listed all the same.
    server.apply(
        HTTP_ROUTES,
        json!({"metadata": {"name": "broken", "namespace": "shop"},
               "spec": {"parentRefs": "not-a-list"}}),
    );
    let mut receiver = start(&server).await;
    {
        let snapshot = receiver.borrow_and_update();
        assert_eq!(snapshot.objects.http_routes.len(), 1);
        let problems: Vec<String> = snapshot.problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("HTTPRoute shop/broken: field `spec.parentRefs`"),
            "{problems:?}"
        );
    }
    server.with(|world| {
        world.garbage(SLICES, "this is not JSON");
        world.garbage(SLICES, r#"{"type": "ADDED", "object": 42}"#);
        world.garbage(SLICES, r#"{"type": "SIDEWAYS", "object": {}}"#);
    });
    // An object whose fields do not read: a problem naming it, the others served.
    let mut bad = slice("shop", "web-bad", "web", &["10.1.0.1"]);
    bad["endpoints"] = json!("everywhere");
    server.apply(SLICES, bad);
    server.apply(SLICES, slice("shop", "web-a", "web", &["10.1.0.77"]));
    until(
        &mut receiver,
        DEADLINE,
        "the change after the garbage",
        |snapshot| {
            addresses(snapshot, "web-a") == ["10.1.0.77"]
                && snapshot.problems.iter().any(|problem| {
                    problem
                        .to_string()
                        .starts_with("EndpointSlice shop/web-bad: field `endpoints`")
                })
        },
    )
    .await;
    assert_eq!(
        server.lists(SLICES),
        1,
        "the garbage did not force a relist"
    );
    // Fixed, the problem goes; deleted, the route's goes.
    server.apply(SLICES, slice("shop", "web-bad", "web", &["10.1.0.5"]));
    server.delete(HTTP_ROUTES, "shop", "broken");
    until(
        &mut receiver,
        DEADLINE,
        "the problems cleared",
        |snapshot| snapshot.problems.is_empty() && addresses(snapshot, "web-bad") == ["10.1.0.5"],
    )
    .await;
    let log = logs.text();
    assert!(log.contains("an unreadable watch event, skipped"), "{log}");
    assert!(log.contains("EndpointSlice shop/web-bad"), "{log}");
}

#[tokio::test]
async fn a_long_list_is_read_in_pages() {
    let server = ApiServer::start(true).await;
    for index in 0..1203 {
        server.apply(
            SLICES,
            slice("bulk", &format!("s-{index:04}"), "bulk", &["10.2.0.1"]),
        );
    }
    let mut receiver = start(&server).await;
    assert_eq!(
        receiver.borrow_and_update().objects.endpoint_slices.len(),
        1203
    );
    let pages = server
        .requests()
        .iter()
        .filter(|logged| logged.path == SLICES && !logged.is_watch())
        .count();
    assert_eq!(pages, 3, "500 per page");
}

#[tokio::test]
async fn the_index_of_a_cluster_snapshot_answers_as_the_files_do() {
    let server = ApiServer::start(true).await;
    populate(&server, true);
    server.apply(SERVICES, service("other", "db", "10.96.0.20"));
    server.apply(
        SLICES,
        slice("other", "db-a", "db", &["10.1.3.1", "10.1.3.2"]),
    );
    server.apply(HTTP_ROUTES, http_route("other", "consumer", "shop", "web"));
    // The same objects as files, as `--objects` reads them.
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    {
        let world = server.world.lock().unwrap();
        for resource in RESOURCES {
            for object in world.objects[resource].values() {
                let mut object = object.clone();
                object["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("resourceVersion");
                text.push_str(&object.to_string());
                text.push('\n');
            }
        }
    }
    std::fs::write(dir.path().join("objects.json"), text).unwrap();
    let (from_files, problems) = read_paths(&[dir.path().to_path_buf()]);
    assert_eq!(problems, Vec::<Problem>::new());

    let mut receiver = start(&server).await;
    let snapshot = receiver.borrow_and_update().clone();
    assert_eq!(snapshot.objects.counts(), from_files.counts());
    let (cluster, files) = (Index::build(&snapshot.objects), Index::build(&from_files));
    assert_eq!(cluster.len(), files.len());
    assert_eq!(cluster.len(), 3);
    for address in [
        "10.96.0.10:80",
        "10.96.0.11:80",
        "10.96.0.20:80",
        "10.96.0.10:81",
    ] {
        let address: SocketAddr = address.parse().unwrap();
        assert_eq!(cluster.lookup(address), files.lookup(address), "{address}");
        if let Some(target) = cluster.lookup(address) {
            let sort = |routes: &[remora_control::index::AttachedRoute]| {
                let mut routes = routes.to_vec();
                routes.sort_by(|a, b| {
                    (a.route.namespace(), a.route.name())
                        .cmp(&(b.route.namespace(), b.route.name()))
                });
                routes
            };
            assert_eq!(
                sort(cluster.routes(&target.service)),
                sort(files.routes(&target.service)),
                "{address}"
            );
        }
    }
    let web = cluster.lookup("10.96.0.10:80".parse().unwrap()).unwrap();
    let endpoints: Vec<String> = web.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(endpoints, ["10.1.0.1:8080", "10.1.0.2:8080"]);
    assert_eq!(
        cluster.routes(&web.service).len(),
        2,
        "producer and consumer"
    );
}

// Identity: TokenReviews and the CA's Secret.

mod identity {
    use super::*;
    use arc_swap::ArcSwapOption;
    use rcgen::{CertificateParams, KeyPair};
    use remora_api::identity::identity_server::Identity as _;
    use remora_api::identity::CertifyRequest;
    use remora_control::identity::ca::Ca;
    use remora_control::identity::review::cluster::TokenReviewer;
    use remora_control::identity::review::{ReviewError, Reviewed};
    use remora_control::identity::secret::{ensure_with_outcome, Outcome, SecretName};
    use remora_control::identity::{CaSlot, IdentityService, Reviewer};
    use remora_control::metrics::Metrics;
    use remora_control::server::Hub;
    use std::time::SystemTime;
    use tonic::Code;

    fn holder(user: &str, audiences: &[&str], pod: Option<&str>) -> Holder {
        Holder {
            user: user.to_string(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            pod: pod.map(str::to_string),
        }
    }

    fn with_tokens(server: &ApiServer) {
        server.with(|world| {
            let tokens = [
                (
                    "web-token",
                    holder(
                        "system:serviceaccount:shop:web",
                        &["remora.io/identity"],
                        Some("web-0"),
                    ),
                ),
                (
                    "unbound-token",
                    holder(
                        "system:serviceaccount:shop:web",
                        &["remora.io/identity"],
                        None,
                    ),
                ),
                (
                    "stranger-token",
                    holder(
                        "system:serviceaccount:shop:web",
                        &["remora.io/identity"],
                        Some("plain-0"),
                    ),
                ),
                (
                    "api-audience-token",
                    holder(
                        "system:serviceaccount:shop:web",
                        &["https://kubernetes.default.svc"],
                        Some("web-0"),
                    ),
                ),
                ("user-token", holder("alice", &["remora.io/identity"], None)),
            ];
            for (token, holder) in tokens {
                world.tokens.insert(token.to_string(), holder);
            }
        });
    }

    #[tokio::test]
    async fn a_token_review_names_the_service_account_and_the_pod() {
        let server = ApiServer::start(false).await;
        with_tokens(&server);
        let reviewer = TokenReviewer::new(server.client());

        assert_eq!(
            reviewer.review("web-token").await,
            Ok(Reviewed {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod: Some("web-0".into())
            })
        );
        // The review as the API documents it: our audience asked for, the token as read.
        let sent = server.world.lock().unwrap().reviews[0].clone();
        assert_eq!(sent["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(sent["kind"], "TokenReview");
        assert_eq!(sent["spec"]["audiences"], json!(["remora.io/identity"]));
        assert_eq!(sent["spec"]["token"], "web-token");

        // (case, token, what is refused)
        let refused: [(&str, &str, &str); 3] = [
            ("not authenticated", "forged", "invalid bearer token"),
            ("another audience", "api-audience-token", "token audiences"),
            ("not a service account", "user-token", "alice"),
        ];
        for (case, token, words) in refused {
            let error = reviewer.review(token).await.unwrap_err();
            assert!(
                matches!(
                    error,
                    ReviewError::Unauthenticated(_) | ReviewError::NotServiceAccount(_)
                ),
                "{case}: {error:?}"
            );
            assert!(error.to_string().contains(words), "{case}: {error}");
        }

        // An authenticator that ignores audiences says nothing of ours: not good enough.
        server.with(|world| world.audience_unaware = true);
        let error = reviewer.review("web-token").await.unwrap_err();
        assert!(
            matches!(&error, ReviewError::Unauthenticated(message) if message.contains("not for audience remora.io/identity")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn the_api_down_is_unavailable() {
        // A port nobody listens on: connection refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = kube::Config::new(format!("http://{closed}").parse().unwrap());
        let reviewer = TokenReviewer::new(kube::Client::try_from(config).unwrap());
        let error = reviewer.review("web-token").await.unwrap_err();
        assert!(matches!(error, ReviewError::Unavailable(_)), "{error:?}");

        // Through Certify: UNAVAILABLE, which the proxy retries.
        let service = identity_service(
            Reviewer::Api(reviewer),
            tokio::sync::watch::channel(Arc::new(Snapshot::default())).1,
        )
        .await;
        let status = certify(&service, "web-token", "web-0").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    async fn identity_service(
        reviewer: Reviewer,
        source: watch::Receiver<Arc<Snapshot>>,
    ) -> IdentityService {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::start(source, Arc::clone(&metrics)).await;
        let now = SystemTime::now();
        let (cert, key) = Ca::generate("cluster.local", now, Duration::from_secs(3600)).unwrap();
        let slot: CaSlot = Arc::new(ArcSwapOption::from_pointee(
            Ca::from_pem(&cert, &key, now).unwrap(),
        ));
        IdentityService::new(
            slot,
            Some(reviewer),
            "cluster.local",
            Duration::from_secs(60),
            hub,
            metrics,
        )
    }

    async fn certify(
        service: &IdentityService,
        token: &str,
        pod: &str,
    ) -> Result<remora_api::identity::CertifyResponse, tonic::Status> {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        service
            .certify(tonic::Request::new(CertifyRequest {
                token: token.into(),
                csr: csr.der().to_vec(),
                namespace: "shop".into(),
                pod: pod.into(),
            }))
            .await
            .map(tonic::Response::into_inner)
    }

    #[tokio::test]
    async fn certify_reviews_the_token_and_wants_a_remora_pod() {
        let server = ApiServer::start(false).await;
        populate(&server, false);
        server.apply(
            PODS,
            json!({"metadata": {"name": "plain-0", "namespace": "shop"}, "spec": {"containers": []}}),
        );
        with_tokens(&server);
        let source = start(&server).await;
        let service =
            identity_service(Reviewer::Api(TokenReviewer::new(server.client())), source).await;

        let issued = certify(&service, "web-token", "ignored-the-token-names-web-0")
            .await
            .unwrap();
        assert_eq!(issued.identity, "spiffe://cluster.local/ns/shop/sa/web");
        // A token bound to no pod: the pod the request names must be a remora pod.
        let issued = certify(&service, "unbound-token", "web-0").await.unwrap();
        assert_eq!(issued.identity, "spiffe://cluster.local/ns/shop/sa/web");

        // (case, token, pod, code)
        let refused: [(&str, &str, &str, Code); 5] = [
            (
                "bound to a pod without remora.io/status",
                "stranger-token",
                "web-0",
                Code::PermissionDenied,
            ),
            (
                "naming a pod without remora.io/status",
                "unbound-token",
                "plain-0",
                Code::PermissionDenied,
            ),
            (
                "not authenticated",
                "forged",
                "web-0",
                Code::Unauthenticated,
            ),
            (
                "another audience",
                "api-audience-token",
                "web-0",
                Code::Unauthenticated,
            ),
            (
                "not a service account",
                "user-token",
                "web-0",
                Code::PermissionDenied,
            ),
        ];
        for (case, token, pod, code) in refused {
            let status = certify(&service, token, pod).await.unwrap_err();
            assert_eq!(status.code(), code, "{case}: {status:?}");
        }
    }

    /// In cluster mode a pod is known by its metadata alone: its endpoints, and its own
    /// address through them, carry its identity once it is seen, within the SPEC's second.
    #[tokio::test]
    async fn a_meshed_pod_seen_by_its_metadata_gives_its_endpoints_an_identity() {
        const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
        let server = ApiServer::start(false).await;
        server.apply(SERVICES, service("shop", "web", "10.96.0.10"));
        let mut endpoints = slice("shop", "web-a", "web", &["10.1.0.1", "10.1.0.2"]);
        endpoints["endpoints"][0]["targetRef"] =
            json!({"kind": "Pod", "name": "web-0", "namespace": "shop"});
        endpoints["endpoints"][1]["targetRef"] = json!({"kind": "Pod", "name": "web-1"});
        server.apply(SLICES, endpoints);
        let mut receiver = start(&server).await;
        let identities = |snapshot: &Snapshot| -> Vec<Option<String>> {
            let index = Index::build(&snapshot.objects);
            let target = index.lookup("10.96.0.10:80".parse().unwrap()).unwrap();
            target
                .endpoints
                .iter()
                .map(|endpoint| endpoint.identity.as_deref().map(str::to_string))
                .collect()
        };
        assert_eq!(identities(&receiver.borrow_and_update()), [None, None]);

        let status = format!(r#"{{"version":"0.1.0","identity":"{WEB}"}}"#);
        for name in ["web-0", "web-1"] {
            server.apply(
                PODS,
                json!({"metadata": {"name": name, "namespace": "shop",
                                    "annotations": {"remora.io/status": status}},
                       "spec": {"containers": [{"name": "app", "image": "app:1"}]},
                       "status": {"podIP": "10.1.0.9"}}),
            );
        }
        let took = until(&mut receiver, DEADLINE, "the pods' identity", |snapshot| {
            identities(snapshot) == [Some(WEB.to_string()), Some(WEB.to_string())]
        })
        .await;
        assert!(took < Duration::from_secs(1), "took {took:?}");
        let index = Index::build(&receiver.borrow().objects);
        // Its own address by the slice (a metadata watch has no podIP: 10.1.0.9 is unknown).
        assert_eq!(
            index
                .pod_identity("10.1.0.2:8080".parse().unwrap())
                .map(|id| id.to_string()),
            Some(WEB.to_string())
        );
        assert_eq!(index.pod_identity("10.1.0.9:8080".parse().unwrap()), None);
        assert!(index.remora_pod("shop", "web-1").is_some());
    }

    fn secret_name() -> SecretName {
        SecretName::default()
    }

    fn stored_ca(server: &ApiServer) -> String {
        let world = server.world.lock().unwrap();
        let data = &world.secrets["remora-identity-ca"]["data"]["ca.crt"];
        data.as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn an_absent_ca_secret_is_created_and_then_adopted() {
        let server = ApiServer::start(false).await;
        let client = server.client();
        let (created, outcome) = ensure_with_outcome(&client, &secret_name(), "cluster.local")
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Created);
        let writes = server.world.lock().unwrap().writes.clone();
        assert_eq!(writes, [("POST".to_string(), SECRETS.to_string())]);
        let secret = server.world.lock().unwrap().secrets["remora-identity-ca"].clone();
        assert_eq!(secret["metadata"]["namespace"], "remora-system");
        assert!(secret["data"]["ca.key"].is_string());

        // Another replica (or a restart) adopts it without writing.
        let (adopted, outcome) = ensure_with_outcome(&client, &secret_name(), "cluster.local")
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Adopted);
        assert_eq!(adopted.certificate(), created.certificate());
        assert_eq!(server.world.lock().unwrap().writes.len(), 1);
    }

    fn secret_of(cert: &str, key: &str) -> Value {
        let b64 = |text: &str| {
            serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).unwrap()
        };
        json!({"metadata": {"name": "remora-identity-ca"}, "type": "Opaque",
               "data": {"ca.crt": b64(cert), "ca.key": b64(key)}})
    }

    #[tokio::test]
    async fn losing_the_create_race_adopts_the_other_replicas_ca() {
        let server = ApiServer::start(false).await;
        let (theirs, their_key) = Ca::generate(
            "cluster.local",
            SystemTime::now(),
            Duration::from_secs(86_400),
        )
        .unwrap();
        server.with(|world| world.race_on_create = Some(secret_of(&theirs, &their_key)));
        let (ca, outcome) = ensure_with_outcome(&server.client(), &secret_name(), "cluster.local")
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Adopted);
        let their_key_pem = their_key.clone();
        let theirs = Ca::from_pem(&theirs, &their_key, SystemTime::now()).unwrap();
        assert_eq!(ca.certificate(), theirs.certificate());
        let stored: k8s_openapi::ByteString =
            serde_json::from_value(Value::from(stored_ca(&server))).unwrap();
        let stored = String::from_utf8(stored.0).unwrap();
        assert_eq!(
            Ca::from_pem(&stored, &their_key_pem, SystemTime::now())
                .unwrap()
                .certificate(),
            theirs.certificate(),
            "the Secret still holds theirs"
        );
        let writes = server.world.lock().unwrap().writes.clone();
        assert_eq!(
            writes,
            [("POST".to_string(), SECRETS.to_string())],
            "one create, lost"
        );
    }

    #[tokio::test]
    async fn a_secret_without_a_usable_ca_is_replaced_at_its_resource_version() {
        let server = ApiServer::start(false).await;
        server.with(|world| {
            world.store_secret(secret_of("garbage", "garbage"));
        });
        let (ca, outcome) = ensure_with_outcome(&server.client(), &secret_name(), "cluster.local")
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Replaced);
        let writes = server.world.lock().unwrap().writes.clone();
        assert_eq!(
            writes,
            [("PUT".to_string(), format!("{SECRETS}/remora-identity-ca"))]
        );
        let (again, outcome) =
            ensure_with_outcome(&server.client(), &secret_name(), "cluster.local")
                .await
                .unwrap();
        assert_eq!(outcome, Outcome::Adopted);
        assert_eq!(again.certificate(), ca.certificate());
    }
}
