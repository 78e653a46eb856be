//! The cluster source: the objects remora-control serves, read from the Kubernetes API.
//!
//! One list+watch per kind for the whole cluster, each with kube-runtime's `watcher`: it lists,
//! watches from the list's resourceVersion, resumes a dropped watch from the last version seen
//! (bookmarks included) and lists again after `410 Gone`. A failed request (401, a refused
//! connection, …) is logged and asked again after a growing wait; an event that does not read
//! is logged and skipped without a wait. Nothing ends the source.
//!
//! Objects are converted to remora's types as they arrive and kept converted, so a publish only
//! copies them (a reflector's store would keep the raw objects, to be converted again on every
//! publish). An object that does not read as its kind is kept in its place as a [`Problem`]
//! naming its kind, namespace and name, so fixing or deleting it clears the problem. The whole set
//! is published as a [`Snapshot`], as the file source does, at most once per
//! [`Options::coalesce`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{NamespaceResourceScope, PartialObjectMeta};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::gateway::{GrpcRoute, HttpRoute, ReferenceGrant, GATEWAY_GROUP};
use crate::objects::{stored_json, ObjectSet, Problem, Stored};
use crate::watch::Snapshot;

/// How long a change waits for the ones following it before a snapshot is published: a relist
/// or a rollout's burst of EndpointSlice updates becomes one snapshot, and no change waits longer.
pub const COALESCE: Duration = Duration::from_millis(50);

/// How often a kind the API server does not serve (a Gateway API CRD not installed) is asked for
/// again.
pub const ABSENT_RETRY: Duration = Duration::from_secs(30);

/// The wait before asking again after a failed list or watch, doubled for each failure in a row
/// up to [`BACKOFF_MAX`] and back to this after anything is read.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The cluster source's timings; [`watch_cluster`] uses the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub coalesce: Duration,
    pub absent_retry: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            coalesce: COALESCE,
            absent_retry: ABSENT_RETRY,
        }
    }
}

/// Lists and watches Services, EndpointSlices, HTTPRoutes, GRPCRoutes, ReferenceGrants and Pods
/// (metadata only)
/// across the cluster. Returns once every kind the API server serves has been listed, with that
/// set as the first snapshot; a new whole snapshot follows each change. The watches stop when
/// every receiver is gone. Must be called inside a tokio runtime.
pub async fn watch_cluster(client: Client) -> anyhow::Result<watch::Receiver<Arc<Snapshot>>> {
    watch_cluster_with(client, Options::default()).await
}

/// [`watch_cluster`] with other timings (tests shorten them).
pub async fn watch_cluster_with(
    client: Client,
    options: Options,
) -> anyhow::Result<watch::Receiver<Arc<Snapshot>>> {
    let (ready, mut ready_receiver) = watch::channel(false);
    let shared = Arc::new(Shared {
        stores: Mutex::new(Stores::default()),
        changed: Notify::new(),
        ready,
    });
    let retry = options.absent_retry;
    let tasks = Tasks(vec![
        tokio::spawn(run_kind(
            Kind::Service,
            Api::<Checked<Service>>::all(client.clone()),
            checked::<Service>,
            |stores| &mut stores.services,
            Arc::clone(&shared),
            retry,
        )),
        tokio::spawn(run_kind(
            Kind::EndpointSlice,
            Api::<Checked<EndpointSlice>>::all(client.clone()),
            checked::<EndpointSlice>,
            |stores| &mut stores.endpoint_slices,
            Arc::clone(&shared),
            retry,
        )),
        tokio::spawn(run_kind(
            Kind::HttpRoute,
            Api::<Checked<HttpRoute>>::all(client.clone()),
            checked_stored::<HttpRoute>,
            |stores| &mut stores.http_routes,
            Arc::clone(&shared),
            retry,
        )),
        tokio::spawn(run_kind(
            Kind::GrpcRoute,
            Api::<Checked<GrpcRoute>>::all(client.clone()),
            checked_stored::<GrpcRoute>,
            |stores| &mut stores.grpc_routes,
            Arc::clone(&shared),
            retry,
        )),
        tokio::spawn(run_kind(
            Kind::ReferenceGrant,
            Api::<Checked<ReferenceGrant>>::all(client.clone()),
            checked::<ReferenceGrant>,
            |stores| &mut stores.reference_grants,
            Arc::clone(&shared),
            retry,
        )),
        tokio::spawn(run_kind(
            Kind::Pod,
            Api::<PartialObjectMeta<Pod>>::all(client),
            pod,
            |stores| &mut stores.pods,
            Arc::clone(&shared),
            retry,
        )),
    ]);
    tracing::info!(
        "cluster: listing Services, EndpointSlices, HTTPRoutes, GRPCRoutes, ReferenceGrants and Pods"
    );
    // Dropped before every kind is listed (the caller gave up), `tasks` stops the watches.
    ready_receiver.wait_for(|ready| *ready).await?;
    let first = shared.snapshot();
    let absent: Vec<&str> = shared
        .phases()
        .into_iter()
        .filter(|(_, phase)| *phase == Phase::Absent)
        .map(|(kind, _)| kind.name())
        .collect();
    tracing::info!(
        counts = ?first.objects.counts(),
        problems = first.problems.len(),
        ?absent,
        "cluster: synced"
    );
    let (sender, receiver) = watch::channel(Arc::new(first));
    tokio::spawn(publish(shared, sender, options.coalesce, tasks));
    Ok(receiver)
}

/// The kinds read, in the order their problems are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
    HttpRoute,
    GrpcRoute,
    ReferenceGrant,
    Pod,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::Pod => "Pod",
        }
    }

    /// Gateway API kinds come from CRDs a cluster may not have installed.
    fn optional(self) -> bool {
        matches!(
            self,
            Kind::HttpRoute | Kind::GrpcRoute | Kind::ReferenceGrant
        )
    }
}

/// Where a kind's list stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not listed whole yet.
    Listing,
    /// Listed once; kept current by the watch since.
    Synced,
    /// The API server does not serve the kind (404): nothing of it, asked for again later.
    Absent,
}

/// namespace, name.
type Key = (String, String);

/// An object as remora reads it, or why it could not be.
type Entry<T> = Result<Arc<T>, Problem>;

/// One kind's objects, kept as the watcher reports them.
struct Store<T> {
    objects: BTreeMap<Key, Entry<T>>,
    /// Objects of a list in progress, which replace `objects` whole when it is done: what a
    /// relist does not name was deleted during the gap.
    listing: Option<BTreeMap<Key, Entry<T>>>,
    phase: Phase,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            listing: None,
            phase: Phase::Listing,
        }
    }
}

impl<T: PartialEq> Store<T> {
    /// Applies one watcher event; says whether the objects published changed.
    fn apply(&mut self, event: Event<(Key, Entry<T>)>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply((key, entry)) => {
                self.listing.get_or_insert_default().insert(key, entry);
                false
            }
            Event::InitDone => {
                let mut listed = self.listing.take().unwrap_or_default();
                // What the relist finds unchanged stays the object it was, so that the index
                // keeps what it computed for it.
                for (key, entry) in &mut listed {
                    match self.objects.get(key) {
                        Some(kept) if kept == entry => *entry = kept.clone(),
                        _ => {}
                    }
                }
                let changed = self.phase != Phase::Synced || listed != self.objects;
                self.objects = listed;
                self.phase = Phase::Synced;
                changed
            }
            Event::Apply((key, entry)) => {
                if self.objects.get(&key) == Some(&entry) {
                    return false;
                }
                self.objects.insert(key, entry);
                true
            }
            Event::Delete((key, _)) => self.objects.remove(&key).is_some(),
        }
    }

    /// The API server does not serve the kind (any more): none of it exists.
    fn absent(&mut self) -> bool {
        self.listing = None;
        self.phase = Phase::Absent;
        let changed = !self.objects.is_empty();
        self.objects.clear();
        changed
    }

    fn readable(&self) -> impl Iterator<Item = &Arc<T>> {
        self.objects
            .values()
            .filter_map(|entry| entry.as_ref().ok())
    }

    fn problems(&self) -> impl Iterator<Item = &Problem> {
        self.objects
            .values()
            .filter_map(|entry| entry.as_ref().err())
    }

    fn len(&self) -> usize {
        self.objects.len()
    }
}

#[derive(Default)]
struct Stores {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    http_routes: Store<Stored<HttpRoute>>,
    grpc_routes: Store<Stored<GrpcRoute>>,
    reference_grants: Store<ReferenceGrant>,
    pods: Store<Pod>,
}

impl Stores {
    fn phases(&self) -> [(Kind, Phase); 6] {
        [
            (Kind::Service, self.services.phase),
            (Kind::EndpointSlice, self.endpoint_slices.phase),
            (Kind::HttpRoute, self.http_routes.phase),
            (Kind::GrpcRoute, self.grpc_routes.phase),
            (Kind::ReferenceGrant, self.reference_grants.phase),
            (Kind::Pod, self.pods.phase),
        ]
    }

    /// Every kind listed once, or found not served when it may be absent.
    fn ready(&self) -> bool {
        self.phases().iter().all(|(kind, phase)| match phase {
            Phase::Synced => true,
            Phase::Absent => kind.optional(),
            Phase::Listing => false,
        })
    }

    fn snapshot(&self) -> Snapshot {
        // Pointers only: the objects are shared with the stores (and with the index, which
        // tells by them what changed).
        let objects = ObjectSet {
            services: self.services.readable().cloned().collect(),
            endpoint_slices: self.endpoint_slices.readable().cloned().collect(),
            http_routes: self.http_routes.readable().cloned().collect(),
            grpc_routes: self.grpc_routes.readable().cloned().collect(),
            reference_grants: self.reference_grants.readable().cloned().collect(),
            pods: self.pods.readable().cloned().collect(),
        };
        let problems = self
            .services
            .problems()
            .chain(self.endpoint_slices.problems())
            .chain(self.http_routes.problems())
            .chain(self.grpc_routes.problems())
            .chain(self.reference_grants.problems())
            .chain(self.pods.problems())
            .cloned()
            .collect();
        Snapshot { objects, problems }
    }
}

/// What the kinds' tasks and the publisher share.
struct Shared {
    stores: Mutex<Stores>,
    /// Woken when the objects published change.
    changed: Notify,
    /// Whether every kind has been listed once (or found absent).
    ready: watch::Sender<bool>,
}

impl Shared {
    /// Changes the stores with `update`, which says whether the objects published changed.
    fn update<R>(&self, update: impl FnOnce(&mut Stores) -> (bool, R)) -> R {
        let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        let (changed, result) = update(&mut stores);
        let ready = stores.ready();
        drop(stores);
        if changed {
            self.changed.notify_one();
        }
        self.ready.send_if_modified(|current| {
            let differs = *current != ready;
            *current = ready;
            differs
        });
        result
    }

    fn snapshot(&self) -> Snapshot {
        self.stores
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot()
    }

    fn phases(&self) -> [(Kind, Phase); 6] {
        self.stores
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phases()
    }
}

/// The kinds' tasks, stopped when this is dropped.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Publishes the whole set after changes, at most once per `coalesce`, until every receiver is
/// gone; then the watches stop with `tasks`.
async fn publish(
    shared: Arc<Shared>,
    sender: watch::Sender<Arc<Snapshot>>,
    coalesce: Duration,
    tasks: Tasks,
) {
    loop {
        tokio::select! {
            () = shared.changed.notified() => {}
            () = sender.closed() => break,
        }
        tokio::time::sleep(coalesce).await;
        let snapshot = shared.snapshot();
        let counts = snapshot.objects.counts();
        let problems = snapshot.problems.len();
        let sent = sender.send_if_modified(|current| {
            // Changes seen while the first snapshot was taken leave a wake-up for what it
            // already holds.
            let differs = **current != snapshot;
            if differs {
                *current = Arc::new(snapshot);
            }
            differs
        });
        if sent {
            tracing::debug!(?counts, problems, "cluster: published");
        }
    }
    drop(tasks);
}

/// How a kind's watcher is started again.
enum Restart {
    /// At once, with a new list.
    Relist,
    /// After the absent-kind interval.
    Absent,
}

/// Lists and watches one kind for as long as the source lives, keeping its store current.
async fn run_kind<K, T>(
    kind: Kind,
    api: Api<K>,
    convert: fn(K) -> (Key, Entry<T>),
    store: fn(&mut Stores) -> &mut Store<T>,
    shared: Arc<Shared>,
    absent_retry: Duration,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: PartialEq + Send + Sync + 'static,
{
    let mut absent_logged = false;
    let mut backoff = BACKOFF_FIRST;
    loop {
        // Not kube-runtime's `default_backoff`, which waits after every error: an unreadable
        // event in a healthy watch must not delay the events behind it.
        let mut events = pin!(watcher::watcher(api.clone(), watcher::Config::default()));
        let restart = loop {
            let Some(item) = events.next().await else {
                break Restart::Relist;
            };
            let event = match item {
                // `Init` comes before the list is asked for: it says nothing of the server.
                Ok(Event::Init) => Event::Init,
                Ok(event) => {
                    backoff = BACKOFF_FIRST;
                    event
                }
                Err(err) => match what_to_do(kind, &err) {
                    Next::Restart(restart) => break restart,
                    Next::Skip => continue,
                    Next::Wait => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            let listed = matches!(event, Event::InitDone);
            if listed {
                absent_logged = false;
            }
            let event = map_event(event, convert);
            let (count, problems) = shared.update(|stores| {
                let store = store(stores);
                let changed = store.apply(event);
                (changed, (store.len(), store.problems().count()))
            });
            if listed {
                tracing::info!(kind = kind.name(), count, problems, "cluster: listed");
            }
        };
        if let Restart::Absent = restart {
            shared.update(|stores| (store(stores).absent(), ()));
            if absent_logged {
                tracing::debug!(kind = kind.name(), "cluster: still not served");
            } else {
                absent_logged = true;
                tracing::warn!(
                    kind = kind.name(),
                    retry_in = ?absent_retry,
                    "cluster: the API server does not serve this kind (its Gateway API CRD is not installed?); \
                     going on without it and asking again"
                );
            }
            tokio::time::sleep(absent_retry).await;
        }
    }
}

/// What follows a watcher error.
enum Next {
    /// Go on at once: the watch itself is fine, or the watcher lists again by itself.
    Skip,
    /// Go on after the backoff: the watcher asks again for what failed.
    Wait,
    Restart(Restart),
}

/// What a watcher error means for the kind.
fn what_to_do(kind: Kind, err: &watcher::Error) -> Next {
    use watcher::Error::{InitialListFailed, WatchError, WatchFailed, WatchStartFailed};
    match err {
        InitialListFailed(kube::Error::Api(status))
        | WatchStartFailed(kube::Error::Api(status))
            if status.code == 404 && kind.optional() =>
        {
            Next::Restart(Restart::Absent)
        }
        // The watcher retries a watch refused at its start with the same resourceVersion; after
        // `410 Gone` (an API server that answers so, where most send an ERROR event) only a new
        // list helps.
        WatchStartFailed(kube::Error::Api(status)) if status.code == 410 => {
            tracing::info!(kind = kind.name(), %err, "cluster: resourceVersion expired; listing again");
            Next::Restart(Restart::Relist)
        }
        WatchError(status) if status.code == 410 => {
            tracing::info!(kind = kind.name(), %err, "cluster: resourceVersion expired; listing again");
            Next::Skip
        }
        WatchFailed(kube::Error::SerdeError(_)) => {
            tracing::warn!(kind = kind.name(), %err, "cluster: an unreadable watch event, skipped");
            Next::Skip
        }
        _ => {
            tracing::warn!(kind = kind.name(), %err, "cluster: list or watch failed; retrying");
            Next::Wait
        }
    }
}

fn map_event<K, T>(event: Event<K>, convert: fn(K) -> (Key, Entry<T>)) -> Event<(Key, Entry<T>)> {
    match event {
        Event::Apply(object) => Event::Apply(convert(object)),
        Event::Delete(object) => Event::Delete(convert(object)),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(convert(object)),
        Event::InitDone => Event::InitDone,
    }
}

/// An object as the API server sent it, read as `K` if it can be. Watching `Checked<K>` rather
/// than `K` keeps an object remora's types refuse (a newer Gateway API field, a bad value in a
/// CRD without validation) from failing the whole list it is in, which would keep the kind from
/// ever syncing.
#[derive(Debug, Clone)]
struct Checked<K> {
    /// Read on its own, so that the watch can resume past the object and the store name it.
    metadata: ObjectMeta,
    object: Result<K, Unreadable>,
    /// The object's JSON as [`stored_json`] keeps it, for the kinds whose JSON is sent.
    json: Option<Arc<str>>,
}

/// Whether a kind's JSON is kept beside it (routes: the snapshots carry them as stored), and
/// its apiVersion and kind, which the items of a list may come without.
trait KeepsJson {
    const KEEPS_JSON_AS: Option<(&'static str, &'static str)> = None;
}

impl KeepsJson for Service {}
impl KeepsJson for EndpointSlice {}
impl KeepsJson for ReferenceGrant {}

impl KeepsJson for HttpRoute {
    const KEEPS_JSON_AS: Option<(&'static str, &'static str)> =
        Some(("gateway.networking.k8s.io/v1", "HTTPRoute"));
}

impl KeepsJson for GrpcRoute {
    const KEEPS_JSON_AS: Option<(&'static str, &'static str)> =
        Some(("gateway.networking.k8s.io/v1", "GRPCRoute"));
}

/// Why an object does not read as its kind.
#[derive(Debug, Clone)]
struct Unreadable {
    field: String,
    message: String,
}

impl<'de, K: DeserializeOwned + KeepsJson> Deserialize<'de> for Checked<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        // Not an object at all: a broken event rather than an object to name in a problem.
        if !value.is_object() {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Other("a non-object"),
                &"a Kubernetes object",
            ));
        }
        let metadata = metadata_of(&value);
        let json =
            K::KEEPS_JSON_AS.map(|(api_version, kind)| stored_json(&value, api_version, kind));
        let object = serde_path_to_error::deserialize(value).map_err(|err| Unreadable {
            field: err.path().to_string(),
            message: err.inner().to_string(),
        });
        Ok(Self {
            metadata,
            object,
            json,
        })
    }
}

/// An object's metadata, or what can be picked out of it when it does not read whole.
fn metadata_of(value: &Value) -> ObjectMeta {
    let metadata = value.get("metadata").unwrap_or(&Value::Null);
    ObjectMeta::deserialize(metadata).unwrap_or_else(|_| {
        let text = |field: &str| {
            metadata
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        ObjectMeta {
            name: text("name"),
            namespace: text("namespace"),
            resource_version: text("resourceVersion"),
            uid: text("uid"),
            ..ObjectMeta::default()
        }
    })
}

impl<K: Resource> Resource for Checked<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dynamic)
    }

    fn group(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dynamic)
    }

    fn version(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dynamic)
    }

    fn plural(dynamic: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dynamic)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

macro_rules! gateway_resource {
    ($type:ty, $version:literal, $kind:literal, $plural:literal) => {
        impl Resource for $type {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GATEWAY_GROUP)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

gateway_resource!(HttpRoute, "v1", "HTTPRoute", "httproutes");
gateway_resource!(GrpcRoute, "v1", "GRPCRoute", "grpcroutes");
// The version clusters serve it at (v1.6 still has no v1).
gateway_resource!(
    ReferenceGrant,
    "v1beta1",
    "ReferenceGrant",
    "referencegrants"
);

fn key_of(metadata: &ObjectMeta) -> Key {
    (
        metadata.namespace.clone().unwrap_or_default(),
        metadata.name.clone().unwrap_or_default(),
    )
}

/// Drops what changes on every write and remora never reads, so that a status update (a Pod's,
/// most often) is not a change to publish, and the copies kept are smaller.
fn tidy(metadata: &mut ObjectMeta) {
    metadata.resource_version = None;
    metadata.managed_fields = None;
}

fn checked<K: Resource<DynamicType = ()>>(checked: Checked<K>) -> (Key, Entry<K>) {
    let (key, read) = read(checked);
    (key, read.map(|(object, _)| Arc::new(object)))
}

/// A route, kept with its JSON.
fn checked_stored<K: Resource<DynamicType = ()>>(checked: Checked<K>) -> (Key, Entry<Stored<K>>) {
    let (key, read) = read(checked);
    let entry = read.map(|(object, json)| {
        Arc::new(Stored {
            object,
            json: json.unwrap_or_else(|| Arc::from("{}")),
        })
    });
    (key, entry)
}

/// An object (tidied) and its JSON if kept, or the problem naming it.
type Read<K> = Result<(K, Option<Arc<str>>), Problem>;

fn read<K: Resource<DynamicType = ()>>(checked: Checked<K>) -> (Key, Read<K>) {
    let key = key_of(&checked.metadata);
    let read = match checked.object {
        Ok(mut object) => {
            tidy(object.meta_mut());
            Ok((object, checked.json))
        }
        Err(Unreadable { field, message }) => {
            let problem = Problem::Object {
                kind: K::kind(&()).into_owned(),
                namespace: key.0.clone(),
                name: key.1.clone(),
                field,
                message,
            };
            tracing::warn!(%problem, "cluster: skipped");
            Err(problem)
        }
    };
    (key, read)
}

/// A Pod from its metadata alone: only its annotations matter to remora.
fn pod(partial: PartialObjectMeta<Pod>) -> (Key, Entry<Pod>) {
    let mut metadata = partial.metadata;
    tidy(&mut metadata);
    let key = key_of(&metadata);
    (
        key,
        Ok(Arc::new(Pod {
            metadata,
            ..Pod::default()
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, addresses: &str) -> Value {
        serde_json::from_str(&format!(
            r#"{{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {{"name": "{name}", "namespace": "ns", "resourceVersion": "7"}},
                "addressType": "IPv4", "endpoints": [{{"addresses": {addresses}}}]}}"#
        ))
        .unwrap()
    }

    fn entry(value: Value) -> (Key, Entry<EndpointSlice>) {
        checked(Checked::<EndpointSlice>::deserialize(value).unwrap())
    }

    #[test]
    fn an_unreadable_object_is_a_problem_naming_it_and_its_field() {
        let (key, entry) = entry(slice("bad", r#""10.0.0.1""#));
        assert_eq!(key, ("ns".to_string(), "bad".to_string()));
        let problem = entry.unwrap_err();
        assert_eq!(
            problem.to_string(),
            "EndpointSlice ns/bad: field `endpoints[0].addresses`: invalid type: string \"10.0.0.1\", expected a sequence"
        );
    }

    #[test]
    fn broken_metadata_still_gives_the_name_and_resource_version() {
        let mut value = slice("odd", r#"["10.0.0.1"]"#);
        value["metadata"]["labels"] = Value::from(5);
        let checked = Checked::<EndpointSlice>::deserialize(value).unwrap();
        assert_eq!(checked.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(checked.metadata.name.as_deref(), Some("odd"));
        assert!(checked.object.is_err());
    }

    fn route(status: &str) -> Value {
        serde_json::from_str(&format!(
            r#"{{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {{"name": "r", "namespace": "ns", "resourceVersion": "9",
                              "managedFields": [{{"manager": "kubectl"}}]}},
                "spec": {{"parentRefs": [{{"group": "", "kind": "Service", "name": "web"}}],
                          "rules": [{{"backendRefs": [{{"name": "web", "port": 80, "weight": 3}}],
                                      "notModelled": {{"kept": 1}}}}]}},
                "status": {{"parents": [{status}]}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_route_keeps_its_json_as_stored_but_for_status_and_write_stamps() {
        let (key, entry) = checked_stored(Checked::<HttpRoute>::deserialize(route("")).unwrap());
        assert_eq!(key, ("ns".to_string(), "r".to_string()));
        let route_read = entry.unwrap();
        assert_eq!(route_read.spec.parent_refs[0].name, "web");
        let json: Value = serde_json::from_str(&route_read.json).unwrap();
        let mut expected = route("");
        expected.as_object_mut().unwrap().remove("status");
        let metadata = expected["metadata"].as_object_mut().unwrap();
        metadata.remove("resourceVersion");
        metadata.remove("managedFields");
        assert_eq!(json, expected);

        // A status written by a controller is no change to publish; a spec edit is.
        let mut store = Store::<Stored<HttpRoute>>::default();
        store.apply(Event::Init);
        store.apply(Event::InitApply((key, Ok(route_read))));
        store.apply(Event::InitDone);
        let status = route(r#"{"controllerName": "example.com/x"}"#);
        let read = |value| checked_stored(Checked::<HttpRoute>::deserialize(value).unwrap());
        assert!(!store.apply(Event::Apply(read(status))));
        let mut edited = route("");
        edited["spec"]["rules"][0]["notModelled"]["kept"] = Value::from(2);
        assert!(store.apply(Event::Apply(read(edited))));
    }

    #[test]
    fn a_relist_replaces_the_objects_whole() {
        let mut store = Store::<EndpointSlice>::default();
        store.apply(Event::Init);
        store.apply(Event::InitApply(entry(slice("a", r#"["10.0.0.1"]"#))));
        store.apply(Event::InitApply(entry(slice("b", r#"["10.0.0.2"]"#))));
        assert_eq!(store.len(), 0, "nothing until the list is done");
        assert!(store.apply(Event::InitDone));
        assert_eq!(store.len(), 2);
        // The same object again, its resourceVersion aside: nothing to publish.
        let mut again = slice("a", r#"["10.0.0.1"]"#);
        again["metadata"]["resourceVersion"] = Value::from("8");
        assert!(!store.apply(Event::Apply(entry(again))));
        // `b` was deleted while no watch was open: the relist does not name it.
        let a = store.objects[&("ns".to_string(), "a".to_string())].clone();
        store.apply(Event::Init);
        store.apply(Event::InitApply(entry(slice("a", r#"["10.0.0.1"]"#))));
        assert!(store.apply(Event::InitDone));
        // `a` did not change: it is still the same object, not an equal copy.
        let kept = &store.objects[&("ns".to_string(), "a".to_string())];
        assert!(Arc::ptr_eq(a.as_ref().unwrap(), kept.as_ref().unwrap()));
        let names: Vec<&str> = store
            .objects
            .keys()
            .map(|(_, name)| name.as_str())
            .collect();
        assert_eq!(names, ["a"]);
    }
}
