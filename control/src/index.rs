//! The index the proxies are answered from: ClusterIP:port → Service port → ready endpoints, and
//! the routes attached to each Service. Pure: a function of an [`ObjectSet`] alone.
//!
//! Built whole once ([`Index::build`]), then from the previous index on each change
//! ([`Index::update`]). The common change, EndpointSlices edited in place, computes the Services
//! of those slices alone and copies the rest of the index (pointers). Any other change makes a
//! pass over every Service, in which a Service whose object and EndpointSlices are the same
//! `Arc`s as last time keeps the entries computed then. The answers are those of a whole build.
//!
//! Objects are read as the API server stores them:
//! - Only TCP Service ports are indexed (the proxy carries TCP; a DNS Service's 53/UDP beside its
//!   53/TCP must not shadow it). Headless (`clusterIP: None`) and ExternalName Services have no
//!   ClusterIP and so no entry; `spec.clusterIPs` gives both families of a dual-stack Service.
//! - Endpoints belong to a Service by the `kubernetes.io/service-name` label of their
//!   EndpointSlice in the same namespace, and to a Service port by the slice port of the same
//!   name (unnamed matches unnamed). A named `targetPort` that no slice port is named for is looked
//!   up by that name instead, for slices written by hand. The slice port's number is the
//!   endpoint's port; a slice port without one ("all ports") takes the Service port's
//!   `targetPort`, or its `port` when it has none.
//! - An endpoint is ready unless its `ready` condition is false or it is `terminating` (an
//!   endpoint without conditions is ready, as the API documents). Its first address is used, as
//!   kube-proxy does; only endpoints of the ClusterIP's family serve it. Several slices of one
//!   Service are merged and the same address:port kept once.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use remora_api::discovery as pb;

use crate::compile::CompiledRoute;
use crate::gateway::{ParentReference, ReferenceGrant};
use crate::mesh::{PodKey, Pods};
use crate::objects::ObjectSet;
pub use crate::objects::{Route, ServiceKey};
use crate::policy;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What a ClusterIP:port is: one port of one Service, and where it really is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: Arc<ServiceKey>,
    pub port_name: Option<String>,
    pub port: u16,
    /// The Service port's `appProtocol` (`http`, `kubernetes.io/h2c`, `grpc`, `tcp`, …).
    pub app_protocol: Option<String>,
    /// Ready endpoints, sorted by address.
    pub endpoints: Vec<Endpoint>,
    /// The Service's resilience policy, every default filled in.
    pub policy: Arc<pb::Policy>,
}

/// One ready endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's address and the port the Service port targets on it.
    pub addr: SocketAddr,
    pub zone: Option<String>,
    pub node: Option<String>,
    /// The Pod behind it (`targetRef` of kind Pod), if any.
    pub pod: Option<String>,
    /// The meshed pod's identity, when the pod is meshed and its proxy takes this port in.
    pub identity: Option<Arc<str>>,
}

/// Whose route it is, seen from the Service it attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteRole {
    /// In the Service's namespace: applies to every client.
    Producer,
    /// In another namespace: applies to clients in that namespace only, before producer routes.
    Consumer,
}

/// A route attached to a Service by one of its `parentRefs`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedRoute {
    pub route: Route,
    /// Its rules as the route table needs them, computed once per route object.
    pub compiled: Arc<CompiledRoute>,
    pub role: RouteRole,
    /// The `parentRefs[].port`: the Service port it governs; `None` for every port.
    pub port: Option<u16>,
    pub section_name: Option<String>,
}

impl AttachedRoute {
    /// Whether this attachment governs the Service port `port`.
    pub fn applies_to_port(&self, port: u16) -> bool {
        self.port.is_none_or(|own| own == port)
    }

    /// Whether this attachment governs the Service port `port` named `port_name`: its `port`
    /// and `sectionName` (a Service parent's section is the port's name) both agree.
    pub fn governs(&self, port: u16, port_name: Option<&str>) -> bool {
        self.applies_to_port(port)
            && self
                .section_name
                .as_deref()
                .is_none_or(|section| Some(section) == port_name)
    }
}

/// One port of a Service as a backend: what a route table names of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPort {
    pub name: Option<String>,
    pub app_protocol: Option<String>,
    /// Ready endpoints, sorted by address, of the Service's first IP family.
    pub endpoints: Vec<Endpoint>,
    /// The Service's resilience policy, every default filled in.
    pub policy: Arc<pb::Policy>,
}

/// Which computation of a Service an answer came from: the same handle in two indexes means
/// the Service and its EndpointSlices are the same objects in both, so nothing read from them
/// changed.
#[derive(Debug, Clone)]
pub struct ServiceVersion(Arc<Computed>);

impl PartialEq for ServiceVersion {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// ClusterIP:port → [`Target`], and Service → attached routes.
#[derive(Debug, Default)]
pub struct Index {
    targets: HashMap<SocketAddr, Arc<Target>>,
    routes: Arc<HashMap<ServiceKey, Vec<AttachedRoute>>>,
    /// Each Service by name (the first object read of a name), for the backends of routes.
    services: HashMap<ServiceKey, Arc<Computed>>,
    /// Each route object's compiled rules, by the address of its `Arc` (kept alive by
    /// `objects`), for the next [`Index::update`] to reuse.
    compiled_routes: Arc<HashMap<usize, Arc<CompiledRoute>>>,
    /// ReferenceGrants by their namespace (the namespace they open to others).
    grants: Arc<HashMap<String, Vec<Arc<ReferenceGrant>>>>,
    /// The remora pods, and the meshed ones by address.
    pods: Arc<Pods>,
    /// The objects it answers for (pointers), to tell what the next [`Index::update`] changes.
    objects: ObjectSet,
    /// What each Service object gave, by the address of its `Arc` (kept alive by the entry, so
    /// no other object can have it), for the next [`Index::update`] to reuse.
    computed: HashMap<usize, Arc<Computed>>,
}

/// Equal when they answer the same (what was kept for reuse aside).
impl PartialEq for Index {
    fn eq(&self, other: &Self) -> bool {
        self.targets == other.targets
            && self.routes == other.routes
            && self.grants == other.grants
            && self.pods == other.pods
            && self.services.len() == other.services.len()
            && self.services.iter().all(|(key, computed)| {
                other
                    .services
                    .get(key)
                    .is_some_and(|theirs| computed.answers_as(theirs))
            })
    }
}

/// One Service's entries and the objects they were computed from.
#[derive(Debug)]
struct Computed {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    targets: Vec<(SocketAddr, Arc<Target>)>,
    policy: Arc<ServicePolicy>,
}

/// A Service's policy and the annotations it was parsed from: parsed (and a bad value logged)
/// once per change of those annotations, not per change of the object or per stream.
#[derive(Debug)]
struct ServicePolicy {
    annotations: Vec<(&'static str, String)>,
    policy: Arc<pb::Policy>,
}

impl ServicePolicy {
    /// The policy of `service`, the one `previous` held when its annotations are the same.
    fn of(service: &Service, key: &ServiceKey, previous: Option<&Arc<ServicePolicy>>) -> Arc<Self> {
        let annotations = policy::read(service.metadata.annotations.as_ref());
        if let Some(previous) = previous.filter(|previous| previous.annotations == annotations) {
            return Arc::clone(previous);
        }
        let (parsed, bad) = policy::parse(service.metadata.annotations.as_ref());
        for bad in bad {
            tracing::warn!(
                service = %key, annotation = bad.key, value = bad.value, expected = bad.form,
                "a bad annotation value; its default applies"
            );
        }
        Arc::new(Self {
            annotations,
            policy: Arc::new(parsed),
        })
    }
}

impl Computed {
    /// Whether both were computed from the same objects and give the same entries.
    fn answers_as(&self, other: &Computed) -> bool {
        let slices: Vec<&Arc<EndpointSlice>> = other.slices.iter().collect();
        self.holds(&other.service, &slices) && self.targets == other.targets
    }

    /// Whether an endpoint of these entries names one of `pods` (whose identity changed).
    fn names_any(&self, pods: &HashSet<PodKey>) -> bool {
        !pods.is_empty() && self.slices.iter().any(|slice| Pods::names_any(slice, pods))
    }

    /// Whether these entries are the ones `service` with `slices` gives.
    fn holds(&self, service: &Arc<Service>, slices: &[&Arc<EndpointSlice>]) -> bool {
        Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(kept, slice)| Arc::ptr_eq(kept, slice))
    }
}

impl Index {
    /// The index of `objects`, computed whole.
    pub fn build(objects: &ObjectSet) -> Self {
        Self::build_from(objects, None)
    }

    /// The index of `objects`, reusing this one's entries for every Service whose object and
    /// EndpointSlices are the same `Arc`s as in the set this one was built from. Equal to
    /// `Index::build(objects)`.
    pub fn update(&self, objects: &ObjectSet) -> Self {
        self.slices_edited(objects)
            .unwrap_or_else(|| Self::build_from(objects, Some(self)))
    }

    /// Most changes are an EndpointSlice edited in place: the same Services, the same routes,
    /// each changed slice at its place and of the same Service. Then only the Services of those
    /// slices are computed again, and their entries swapped in; their ClusterIP:ports (from the
    /// Service alone) and which Service a contested one goes to are as before. `None` for any
    /// other change.
    fn slices_edited(&self, objects: &ObjectSet) -> Option<Self> {
        /// More changes at once than this are left to the pass over every Service.
        const MOST: usize = 64;
        let old = &self.objects;
        if !same(&old.services, &objects.services)
            || !same(&old.http_routes, &objects.http_routes)
            || !same(&old.grpc_routes, &objects.grpc_routes)
            || !same(&old.reference_grants, &objects.reference_grants)
            || old.endpoint_slices.len() != objects.endpoint_slices.len()
        {
            return None;
        }
        let mut edits: Vec<(&Arc<EndpointSlice>, &Arc<EndpointSlice>)> = Vec::new();
        for (before, after) in old.endpoint_slices.iter().zip(&objects.endpoint_slices) {
            if !Arc::ptr_eq(before, after) {
                if edits.len() == MOST || owner(before) != owner(after) {
                    return None;
                }
                edits.push((before, after));
            }
        }
        // A slice held twice would be edited at one place only.
        let once = |list: &[Arc<EndpointSlice>], slice: &Arc<EndpointSlice>| {
            list.iter().filter(|held| Arc::ptr_eq(held, slice)).count() == 1
        };
        if !edits.iter().all(|(before, after)| {
            once(&old.endpoint_slices, before) && once(&objects.endpoint_slices, after)
        }) {
            return None;
        }
        let pods = self.pods_for(objects);
        // A pod's identity changed: the Services whose endpoints name it are computed again.
        if !self.pods.changed(&pods).is_empty() {
            return None;
        }
        let owners: Vec<(&str, &str)> =
            edits.iter().filter_map(|(slice, _)| owner(slice)).collect();
        let mut index = Self {
            targets: self.targets.clone(),
            routes: Arc::clone(&self.routes),
            services: self.services.clone(),
            compiled_routes: Arc::clone(&self.compiled_routes),
            grants: Arc::clone(&self.grants),
            pods,
            objects: objects.clone(),
            computed: self.computed.clone(),
        };
        for service in &objects.services {
            let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
            let name = service.metadata.name.as_deref().unwrap_or_default();
            if !owners.contains(&(namespace, name)) {
                continue;
            }
            let id = Arc::as_ptr(service) as usize;
            let kept = Arc::clone(index.computed.get(&id)?);
            let slices: Vec<Arc<EndpointSlice>> = kept
                .slices
                .iter()
                .map(|slice| {
                    let edit = edits.iter().find(|(before, _)| Arc::ptr_eq(before, slice));
                    Arc::clone(edit.map_or(slice, |(_, after)| after))
                })
                .collect();
            if slices
                .iter()
                .zip(&kept.slices)
                .all(|(slice, held)| Arc::ptr_eq(slice, held))
            {
                // Done already: the same object twice in the list.
                continue;
            }
            let key = match kept.targets.first() {
                Some((_, target)) => Arc::clone(&target.service),
                None => Arc::new(ServiceKey::new(namespace, name)),
            };
            let own: Vec<&Arc<EndpointSlice>> = slices.iter().collect();
            let targets = service_targets(service, &key, &own, &kept.policy.policy, &index.pods);
            if targets.len() != kept.targets.len() {
                return None;
            }
            for ((addr, target), (kept_addr, kept_target)) in targets.iter().zip(&kept.targets) {
                if addr != kept_addr {
                    return None;
                }
                if let Some(held) = index.targets.get_mut(addr) {
                    if Arc::ptr_eq(held, kept_target) {
                        *held = Arc::clone(target);
                    }
                }
            }
            let computed = Arc::new(Computed {
                service: Arc::clone(service),
                slices,
                targets,
                policy: Arc::clone(&kept.policy),
            });
            if let Some(held) = index.services.get_mut(&ServiceKey::new(namespace, name)) {
                if Arc::ptr_eq(held, &kept) {
                    *held = Arc::clone(&computed);
                }
            }
            index.computed.insert(id, computed);
        }
        Some(index)
    }

    /// The pods of `objects`: this index's when they and the EndpointSlices are the same.
    fn pods_for(&self, objects: &ObjectSet) -> Arc<Pods> {
        let old = &self.objects;
        match (
            same(&old.pods, &objects.pods),
            same(&old.endpoint_slices, &objects.endpoint_slices),
        ) {
            (true, true) => Arc::clone(&self.pods),
            (true, false) => Arc::new(self.pods.update_slices(&objects.endpoint_slices)),
            (false, _) => Arc::new(Pods::build(&objects.pods, &objects.endpoint_slices)),
        }
    }

    fn build_from(objects: &ObjectSet, previous: Option<&Index>) -> Self {
        let pods = match previous {
            Some(previous) => previous.pods_for(objects),
            None => Arc::new(Pods::build(&objects.pods, &objects.endpoint_slices)),
        };
        let changed_pods =
            previous.map_or_else(HashSet::new, |previous| previous.pods.changed(&pods));
        let mut slices: HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> = HashMap::new();
        for slice in &objects.endpoint_slices {
            if let Some(owner) = owner(slice) {
                slices.entry(owner).or_default().push(slice);
            }
        }
        let mut targets: HashMap<SocketAddr, Arc<Target>> =
            HashMap::with_capacity(previous.map_or(0, |previous| previous.targets.len()));
        let mut computed = HashMap::with_capacity(objects.services.len());
        let mut services: HashMap<ServiceKey, Arc<Computed>> =
            HashMap::with_capacity(objects.services.len());
        for service in &objects.services {
            let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
            let name = service.metadata.name.as_deref().unwrap_or_default();
            let own_slices = slices
                .get(&(namespace, name))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let id = Arc::as_ptr(service) as usize;
            // The same object twice in the list shares one entry, so that the Service's name
            // and its address answer from the same computation.
            let kept = computed.get(&id).or_else(|| {
                previous
                    .and_then(|previous| previous.computed.get(&id))
                    .filter(|kept| {
                        kept.holds(service, own_slices) && !kept.names_any(&changed_pods)
                    })
            });
            let entry = match kept {
                Some(kept) => Arc::clone(kept),
                None => {
                    let key = Arc::new(ServiceKey::new(namespace, name));
                    let earlier = previous
                        .and_then(|previous| previous.services.get(&key))
                        .map(|earlier| &earlier.policy);
                    let policy = ServicePolicy::of(service, &key, earlier);
                    Arc::new(Computed {
                        service: Arc::clone(service),
                        slices: own_slices.iter().map(|slice| Arc::clone(slice)).collect(),
                        targets: service_targets(service, &key, own_slices, &policy.policy, &pods),
                        policy,
                    })
                }
            };
            for (addr, target) in &entry.targets {
                if let Some(first) = targets.get(addr) {
                    tracing::warn!(
                        %addr, first = %first.service, ignored = %target.service,
                        "two Services claim one ClusterIP and port; the first one read is used"
                    );
                    continue;
                }
                targets.insert(*addr, Arc::clone(target));
            }
            services
                .entry(ServiceKey::new(namespace, name))
                .or_insert_with(|| Arc::clone(&entry));
            computed.insert(id, entry);
        }
        let mut routes: HashMap<ServiceKey, Vec<AttachedRoute>> = HashMap::new();
        let mut compiled_routes = HashMap::new();
        // The previous version of each route by name, made only once a route needs compiling.
        let mut by_name: Option<HashMap<(&str, &str, &str), &CompiledRoute>> = None;
        let http = objects.http_routes.iter().map(|route| {
            (
                Route::Http(Arc::clone(route)),
                Arc::as_ptr(route) as usize,
                route.spec.parent_refs.as_slice(),
            )
        });
        let grpc = objects.grpc_routes.iter().map(|route| {
            (
                Route::Grpc(Arc::clone(route)),
                Arc::as_ptr(route) as usize,
                route.spec.parent_refs.as_slice(),
            )
        });
        for (route, id, parents) in http.chain(grpc) {
            if !parents.iter().any(ParentReference::is_service) {
                continue;
            }
            let compiled = compiled_routes
                .entry(id)
                .or_insert_with(|| {
                    match previous.and_then(|previous| previous.compiled_routes.get(&id)) {
                        Some(kept) => Arc::clone(kept),
                        None => {
                            let earlier = by_name.get_or_insert_with(|| {
                                previous
                                    .iter()
                                    .flat_map(|previous| previous.compiled_routes.values())
                                    .map(|compiled| (compiled.id(), &**compiled))
                                    .collect()
                            });
                            let kind = match route {
                                Route::Http(_) => "HTTPRoute",
                                Route::Grpc(_) => "GRPCRoute",
                            };
                            let name = (kind, route.namespace(), route.name());
                            Arc::new(CompiledRoute::new(&route, earlier.get(&name).copied()))
                        }
                    }
                })
                .clone();
            for parent in parents.iter().filter(|parent| parent.is_service()) {
                let (service, attached) = attach(&route, &compiled, parent);
                routes.entry(service).or_default().push(attached);
            }
        }
        let mut grants: HashMap<String, Vec<Arc<ReferenceGrant>>> = HashMap::new();
        for grant in &objects.reference_grants {
            let namespace = grant.metadata.namespace.clone().unwrap_or_default();
            grants.entry(namespace).or_default().push(Arc::clone(grant));
        }
        Self {
            targets,
            routes: Arc::new(routes),
            services,
            compiled_routes: Arc::new(compiled_routes),
            grants: Arc::new(grants),
            pods,
            objects: objects.clone(),
            computed,
        }
    }

    /// The Service port behind a ClusterIP:port, if it is one.
    pub fn lookup(&self, addr: SocketAddr) -> Option<&Target> {
        // A v4 destination may reach us written as a v4-mapped v6 address.
        let addr = match addr {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
                None => addr,
            },
            SocketAddr::V4(_) => addr,
        };
        self.targets.get(&addr).map(|target| &**target)
    }

    /// Every route attached to a Service, producer and consumer, in the order read.
    pub fn routes(&self, service: &ServiceKey) -> &[AttachedRoute] {
        self.routes
            .get(service)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// A Service port as a route's backend: `None` when the Service or its TCP port `port` does
    /// not exist. Its endpoints are those of the Service's first ClusterIP (its primary
    /// family), or, without a ClusterIP (headless, or not yet assigned in files), of the first
    /// of its `ipFamilies` (IPv4 when it names none).
    pub fn service_port(&self, service: &ServiceKey, port: u16) -> Option<BackendPort> {
        let computed = self.services.get(service)?;
        let spec = computed.service.spec.as_ref()?;
        let spec_port = spec.ports.iter().flatten().find(|candidate| {
            is_tcp(candidate.protocol.as_deref()) && candidate.port == i32::from(port)
        })?;
        let endpoints = match computed
            .targets
            .iter()
            .find(|(addr, _)| addr.port() == port)
        {
            Some((_, target)) => target.endpoints.clone(),
            None => {
                let v6 = spec
                    .ip_families
                    .as_ref()
                    .and_then(|families| families.first())
                    .is_some_and(|family| family == "IPv6");
                let family = if v6 {
                    IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
                };
                let slices: Vec<&Arc<EndpointSlice>> = computed.slices.iter().collect();
                endpoints(spec_port, family, &slices, &self.pods)
            }
        };
        Some(BackendPort {
            name: spec_port.name.clone().filter(|name| !name.is_empty()),
            app_protocol: spec_port.app_protocol.clone(),
            endpoints,
            policy: Arc::clone(&computed.policy.policy),
        })
    }

    /// The name of TCP port `port` of `service`, if it has one (what a `sectionName` names).
    pub fn port_name(&self, service: &ServiceKey, port: u16) -> Option<&str> {
        let spec = self.services.get(service)?.service.spec.as_ref()?;
        spec.ports
            .iter()
            .flatten()
            .find(|candidate| {
                is_tcp(candidate.protocol.as_deref()) && candidate.port == i32::from(port)
            })?
            .name
            .as_deref()
            .filter(|name| !name.is_empty())
    }

    /// What [`Index::service_port`] answers for `service` was read from: equal in two indexes
    /// when it answers the same in both. `None` when there is no such Service.
    pub fn service_version(&self, service: &ServiceKey) -> Option<ServiceVersion> {
        self.services
            .get(service)
            .map(|computed| ServiceVersion(Arc::clone(computed)))
    }

    /// The ReferenceGrants of `namespace`, in the order read.
    pub fn reference_grants(&self, namespace: &str) -> &[Arc<ReferenceGrant>] {
        self.grants
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The remora pod `namespace/name`, if there is one.
    pub fn remora_pod(&self, namespace: &str, name: &str) -> Option<&crate::mesh::MeshedPod> {
        self.pods.get(namespace, name).map(|pod| &**pod)
    }

    /// The identity of the meshed pod whose own address `addr` is (a target that is no
    /// Service), when its proxy takes that port in.
    pub fn pod_identity(&self, addr: SocketAddr) -> Option<&Arc<str>> {
        self.pods.identity_at(addr.ip(), addr.port())
    }

    /// How many ClusterIP:port entries there are.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Whether two lists hold the same objects (not equal copies) in the same order.
fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// The namespace and name of the Service an EndpointSlice belongs to, if it names one.
fn owner(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
    let labels = slice.metadata.labels.as_ref()?;
    let service = labels.get(SERVICE_NAME_LABEL)?;
    Some((namespace, service.as_str()))
}

fn attach(
    route: &Route,
    compiled: &Arc<CompiledRoute>,
    parent: &ParentReference,
) -> (ServiceKey, AttachedRoute) {
    let route_namespace = route.namespace();
    let namespace = parent.namespace.as_deref().unwrap_or(route_namespace);
    let role = if namespace == route_namespace {
        RouteRole::Producer
    } else {
        RouteRole::Consumer
    };
    (
        ServiceKey::new(namespace, parent.name.as_str()),
        AttachedRoute {
            route: route.clone(),
            compiled: Arc::clone(compiled),
            role,
            port: parent.port,
            section_name: parent.section_name.clone(),
        },
    )
}

/// The ClusterIP:port entries of one Service.
fn service_targets(
    service: &Service,
    key: &Arc<ServiceKey>,
    slices: &[&Arc<EndpointSlice>],
    policy: &Arc<pb::Policy>,
    pods: &Pods,
) -> Vec<(SocketAddr, Arc<Target>)> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let written: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for text in written {
        if text.is_empty() || text == "None" {
            continue;
        }
        let Ok(ip) = text.parse::<IpAddr>() else {
            tracing::warn!(service = %key, cluster_ip = text, "a ClusterIP that is not an IP address; skipped");
            continue;
        };
        for port in spec.ports.iter().flatten() {
            if !is_tcp(port.protocol.as_deref()) {
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            if number == 0 {
                continue;
            }
            out.push((
                SocketAddr::new(ip, number),
                Arc::new(Target {
                    service: Arc::clone(key),
                    port_name: port.name.clone().filter(|name| !name.is_empty()),
                    port: number,
                    app_protocol: port.app_protocol.clone(),
                    endpoints: endpoints(port, ip, slices, pods),
                    policy: Arc::clone(policy),
                }),
            ));
        }
    }
    out
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|protocol| protocol == "TCP")
}

/// The ready endpoints of one Service port, in the family of `cluster_ip`.
fn endpoints(
    port: &ServicePort,
    cluster_ip: IpAddr,
    slices: &[&Arc<EndpointSlice>],
    pods: &Pods,
) -> Vec<Endpoint> {
    let family = if cluster_ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut out = Vec::new();
    for slice in slices.iter().filter(|slice| slice.address_type == family) {
        let Some(endpoint_port) = slice_port(port, slice) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|address| address.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if ip.is_ipv4() != cluster_ip.is_ipv4() {
                continue;
            }
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"))
                .and_then(|target| target.name.clone());
            let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
            let identity = pods
                .pod_of(namespace, endpoint.target_ref.as_ref())
                .and_then(|meshed| meshed.identity_at(endpoint_port))
                .cloned();
            out.push(Endpoint {
                addr: SocketAddr::new(ip, endpoint_port),
                zone: endpoint.zone.clone(),
                node: endpoint.node_name.clone(),
                pod,
                identity,
            });
        }
    }
    out.sort_by_key(|endpoint| endpoint.addr);
    out.dedup_by_key(|endpoint| endpoint.addr);
    out
}

/// The port number the Service port targets on this slice's endpoints, if the slice serves it.
fn slice_port(port: &ServicePort, slice: &EndpointSlice) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let name_of = |p: &EndpointPort| p.name.clone().unwrap_or_default();
    let service_port_name = port.name.clone().unwrap_or_default();
    let tcp = |p: &&EndpointPort| is_tcp(p.protocol.as_deref());
    let by_name = |name: &str| ports.iter().filter(tcp).find(|p| name_of(p) == name);
    let matched = by_name(&service_port_name).or_else(|| match &port.target_port {
        Some(IntOrString::String(target_name)) => by_name(target_name),
        _ => None,
    })?;
    let number = match matched.port {
        Some(number) => number,
        // "All ports": the Service port's own target.
        None => match &port.target_port {
            Some(IntOrString::Int(number)) => *number,
            None => port.port,
            Some(IntOrString::String(_)) => return None,
        },
    };
    u16::try_from(number).ok().filter(|number| *number != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::read_file_text;
    use k8s_openapi::api::core::v1::Pod;
    use pretty_assertions::assert_eq;
    use std::path::Path;

    fn index(yaml: &str) -> Index {
        let (objects, problems) = read_file_text(Path::new("test.yaml"), yaml);
        assert_eq!(problems, Vec::new());
        Index::build(&objects)
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// The endpoint addresses the index gives for `at`, or None when `at` is no Service.
    fn endpoints_at(index: &Index, at: &str) -> Option<Vec<String>> {
        index.lookup(addr(at)).map(|target| {
            target
                .endpoints
                .iter()
                .map(|endpoint| endpoint.addr.to_string())
                .collect()
        })
    }

    fn service(spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {spec}\n---\n")
    }

    fn slice(name: &str, extra: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n{extra}\n---\n"
        )
    }

    #[test]
    fn reading_rules() {
        // (case, objects, lookup address, expected endpoints; None = not a Service address)
        let cases: Vec<(&str, String, &str, Option<Vec<&str>>)> = vec![
            (
                "slice port number is the endpoint port",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80, targetPort: 8080}]}")
                    + &slice("a", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:8080"]),
            ),
            (
                "service port without targetPort targets its port",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice("a", "addressType: IPv4\nports: [{}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:80"]),
            ),
            (
                "slice port without number takes a numeric targetPort",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80, targetPort: 9090}]}")
                    + &slice("a", "addressType: IPv4\nports: [{}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:9090"]),
            ),
            (
                "named targetPort resolved by the slice port of the service port's name",
                service("{clusterIP: 10.0.0.1, ports: [{name: http, port: 80, targetPort: web}]}")
                    + &slice("a", "addressType: IPv4\nports: [{name: http, port: 8081}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:8081"]),
            ),
            (
                "named targetPort resolved by a slice port of its own name",
                service("{clusterIP: 10.0.0.1, ports: [{name: http, port: 80, targetPort: web}]}")
                    + &slice("a", "addressType: IPv4\nports: [{name: web, port: 8082}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:8082"]),
            ),
            (
                "named targetPort with a different number per slice, as pods differ",
                service("{clusterIP: 10.0.0.1, ports: [{name: http, port: 80, targetPort: web}]}")
                    + &slice("a", "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}]")
                    + &slice("b", "addressType: IPv4\nports: [{name: http, port: 9090}]\nendpoints: [{addresses: [10.1.0.2]}]"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:8080", "10.1.0.2:9090"]),
            ),
            (
                "named targetPort unresolvable without a number",
                service("{clusterIP: 10.0.0.1, ports: [{name: http, port: 80, targetPort: web}]}")
                    + &slice("a", "addressType: IPv4\nports: [{name: http}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec![]),
            ),
            (
                "ports match by name across a multi-port service",
                service("{clusterIP: 10.0.0.1, ports: [{name: http, port: 80}, {name: admin, port: 9000}]}")
                    + &slice("a", "addressType: IPv4\nports: [{name: admin, port: 9901}, {name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:9000",
                Some(vec!["10.1.0.1:9901"]),
            ),
            (
                "a slice without the port's name serves nothing for it",
                service("{clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}")
                    + &slice("a", "addressType: IPv4\nports: [{name: other, port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec![]),
            ),
            (
                "a slice with no ports defines none",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice("a", "addressType: IPv4\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                Some(vec![]),
            ),
            (
                "conditions: absent and ready count, not ready and terminating do not",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice("a", "addressType: IPv4\nports: [{port: 80}]\nendpoints:\n- {addresses: [10.1.0.1]}\n- {addresses: [10.1.0.2], conditions: {}}\n- {addresses: [10.1.0.3], conditions: {ready: true, serving: true}}\n- {addresses: [10.1.0.4], conditions: {ready: false}}\n- {addresses: [10.1.0.5], conditions: {serving: true, terminating: true}}\n- {addresses: [10.1.0.6], conditions: {ready: false, serving: true, terminating: true}}"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"]),
            ),
            (
                "slices of one service merge and deduplicate",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice("a", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.2]}, {addresses: [10.1.0.1]}]")
                    + &slice("b", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.1]}, {addresses: [10.1.0.3]}]"),
                "10.0.0.1:80",
                Some(vec!["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"]),
            ),
            (
                "slices of another service or namespace do not count",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: o, namespace: shop, labels: {kubernetes.io/service-name: other}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.7]}]\n---\n"
                    + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: n, namespace: elsewhere, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.8]}]\n---\n"
                    + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: u, namespace: shop}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.9]}]\n",
                "10.0.0.1:80",
                Some(vec![]),
            ),
            (
                "dual stack: each ClusterIP gets its own family's endpoints",
                service("{clusterIP: 10.0.0.1, clusterIPs: [10.0.0.1, 'fd00::1'], ports: [{port: 80}]}")
                    + &slice("a", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.1]}]")
                    + &slice("b", "addressType: IPv6\nports: [{port: 80}]\nendpoints: [{addresses: ['fd00:1::1']}]"),
                "[fd00::1]:80",
                Some(vec!["[fd00:1::1]:80"]),
            ),
            (
                "v4-mapped v6 destination finds the v4 ClusterIP",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice("a", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "[::ffff:10.0.0.1]:80",
                Some(vec!["10.1.0.1:80"]),
            ),
            (
                "FQDN slices are not read",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}")
                    + &slice("a", "addressType: FQDN\nports: [{port: 80}]\nendpoints: [{addresses: [example.com]}]"),
                "10.0.0.1:80",
                Some(vec![]),
            ),
            (
                "headless service has no entry",
                service("{clusterIP: None, ports: [{port: 80}]}")
                    + &slice("a", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.1.0.1]}]"),
                "10.0.0.1:80",
                None,
            ),
            (
                "ExternalName service has no entry",
                service("{type: ExternalName, externalName: example.com, clusterIP: 10.0.0.1, ports: [{port: 80}]}"),
                "10.0.0.1:80",
                None,
            ),
            (
                "UDP port is not indexed",
                service("{clusterIP: 10.0.0.1, ports: [{name: dns, port: 53, protocol: UDP}]}"),
                "10.0.0.1:53",
                None,
            ),
            (
                "another port of the ClusterIP is no Service address",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}"),
                "10.0.0.1:81",
                None,
            ),
            (
                "a service with no slices has an entry with no endpoints",
                service("{clusterIP: 10.0.0.1, ports: [{port: 80}]}"),
                "10.0.0.1:80",
                Some(vec![]),
            ),
        ];
        for (case, yaml, at, expected) in cases {
            let index = index(&yaml);
            let expected = expected.map(|list| list.into_iter().map(str::to_string).collect());
            assert_eq!(endpoints_at(&index, at), expected, "{case}");
        }
    }

    #[test]
    fn a_target_names_its_service_port_and_endpoint_details() {
        let index = index(
            &(service("{clusterIP: 10.0.0.1, ports: [{name: grpc, port: 9000, appProtocol: kubernetes.io/h2c}]}")
                + &slice("a", "addressType: IPv4\nports: [{name: grpc, port: 9090}]\nendpoints: [{addresses: [10.1.0.1], zone: z1, nodeName: n1, targetRef: {kind: Pod, name: web-0, namespace: shop}}]")),
        );
        let target = index.lookup(addr("10.0.0.1:9000")).unwrap();
        assert_eq!(
            *target,
            Target {
                service: Arc::new(ServiceKey::new("shop", "web")),
                port_name: Some("grpc".into()),
                port: 9000,
                app_protocol: Some("kubernetes.io/h2c".into()),
                endpoints: vec![Endpoint {
                    addr: addr("10.1.0.1:9090"),
                    zone: Some("z1".into()),
                    node: Some("n1".into()),
                    pod: Some("web-0".into()),
                    identity: None,
                }],
                policy: Arc::new(policy::defaults()),
            }
        );
    }

    #[test]
    fn routes_attach_to_their_parent_services_as_producer_or_consumer() {
        let yaml = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: own, namespace: shop}
spec:
  parentRefs:
  - {group: '', kind: Service, name: web, port: 80}
  - {name: a-gateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: client}
spec:
  parentRefs: [{group: '', kind: Service, name: web, namespace: shop}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 9000}]
";
        let index = index(yaml);
        let attached: Vec<(&str, &str, RouteRole, Option<u16>)> = index
            .routes(&ServiceKey::new("shop", "web"))
            .iter()
            .map(|a| (a.route.namespace(), a.route.name(), a.role, a.port))
            .collect();
        assert_eq!(
            attached,
            [
                ("shop", "own", RouteRole::Producer, Some(80)),
                ("client", "mine", RouteRole::Consumer, None),
                ("shop", "rpc", RouteRole::Producer, Some(9000)),
            ]
        );
        let on_80: Vec<&str> = index
            .routes(&ServiceKey::new("shop", "web"))
            .iter()
            .filter(|a| a.applies_to_port(80))
            .map(|a| a.route.name())
            .collect();
        assert_eq!(on_80, ["own", "mine"]);
        assert!(index
            .routes(&ServiceKey::new("shop", "a-gateway"))
            .is_empty());
    }

    #[test]
    fn the_first_service_read_keeps_a_contested_cluster_ip() {
        let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: first, namespace: a}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: second, namespace: a}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
";
        let index = index(yaml);
        assert_eq!(index.len(), 1);
        assert_eq!(
            index.lookup(addr("10.0.0.1:80")).unwrap().service.name,
            "first"
        );
    }

    /// A small deterministic generator (xorshift64*), so that a failing sequence can be replayed.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    /// One object read from YAML.
    fn object(yaml: &str) -> ObjectSet {
        let (objects, problems) = read_file_text(Path::new("random.yaml"), yaml);
        assert_eq!(problems, Vec::new(), "{yaml}");
        objects
    }

    /// A Service from a small pool of names and addresses, so that they collide: two objects of
    /// one Service, two Services of one ClusterIP, dual stack, headless, ExternalName, UDP.
    fn random_service(random: &mut Random) -> Arc<Service> {
        let namespace = random.pick(&["a", "b"]);
        let name = random.pick(&["s0", "s1", "s2", "s3"]);
        let ips = random.pick(&[
            "clusterIP: 10.0.0.1",
            "clusterIP: 10.0.0.2",
            "clusterIP: 10.0.0.3",
            "clusterIP: None",
            "clusterIPs: [10.0.0.1, 'fd00::1']",
            "clusterIPs: ['fd00::2']",
            "type: ExternalName, externalName: x.example, clusterIP: 10.0.0.2",
        ]);
        let ports = random.pick(&[
            "[{name: http, port: 80, targetPort: 8080}]",
            "[{name: http, port: 80, targetPort: web}, {port: 81, name: plain}]",
            "[{port: 80}]",
            "[{name: dns, port: 53, protocol: UDP}, {name: dnst, port: 53}]",
            "[{name: http, port: 80, appProtocol: http}, {name: grpc, port: 9000, appProtocol: grpc}]",
        ]);
        // From the picks above, not a pick of its own, so that the sequence of changes (and
        // how often an update takes the slices-only path) stays what it was.
        let annotations = [
            "",
            ", annotations: {remora.io/timeout: 1s}",
            ", annotations: {remora.io/timeout: 2s, remora.io/retry-attempts: bad}",
        ][(ips.len() + ports.len()) % 3];
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}{annotations}}}\nspec: {{{ips}, ports: {ports}}}\n"
        );
        object(&yaml).services.remove(0)
    }

    fn random_slice(random: &mut Random) -> Arc<EndpointSlice> {
        let namespace = random.pick(&["a", "b"]);
        let name = random.pick(&["e0", "e1", "e2", "e3", "e4"]);
        let labels = random.pick(&[
            "{kubernetes.io/service-name: s0}",
            "{kubernetes.io/service-name: s1}",
            "{kubernetes.io/service-name: s2}",
            "{kubernetes.io/service-name: s3}",
            "{}",
        ]);
        let (family, addresses) = if random.below(4) == 0 {
            ("IPv6", ["'fd00:1::1'", "'fd00:1::2'", "'fd00:1::3'"])
        } else {
            ("IPv4", ["10.1.0.1", "10.1.0.2", "10.1.0.3"])
        };
        let ports = random.pick(&[
            "[{name: http, port: 8080}]",
            "[{name: web, port: 9090}, {name: plain, port: 8081}]",
            "[{}]",
            "[{name: dnst, port: 5353}, {name: grpc, port: 9090}]",
            "[]",
        ]);
        let mut endpoints = String::new();
        for _ in 0..random.below(4) {
            let address = addresses[random.below(addresses.len())];
            let conditions = random.pick(&[
                "{}",
                "{ready: false}",
                "{ready: true, terminating: true}",
                "{ready: true}",
            ]);
            let zone = random.pick(&["z1", "z2"]);
            endpoints.push_str(&format!(
                "- {{addresses: [{address}], conditions: {conditions}, zone: {zone}, targetRef: {{kind: Pod, name: p-{zone}}}}}\n"
            ));
        }
        let yaml = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}\naddressType: {family}\nports: {ports}\nendpoints:\n{endpoints}"
        );
        object(&yaml).endpoint_slices.remove(0)
    }

    fn random_route(random: &mut Random, kind: &str) -> ObjectSet {
        let namespace = random.pick(&["a", "b", "c"]);
        let name = random.pick(&["r0", "r1", "r2"]);
        let parents = random.pick(&[
            "[{group: '', kind: Service, name: s0}]",
            "[{group: '', kind: Service, name: s1, port: 80}, {name: a-gateway}]",
            "[{group: '', kind: Service, name: s2, namespace: a}]",
            "[]",
        ]);
        object(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{parentRefs: {parents}}}\n"
        ))
    }

    /// A Pod that the random slices' endpoints may name (`p-z1`, `p-z2`): not a remora pod, a
    /// remora pod without an identity, or meshed as one of two identities, with or without
    /// port 8080 excluded.
    fn random_pod(random: &mut Random) -> Arc<Pod> {
        let namespace = random.pick(&["a", "b"]);
        let name = random.pick(&["p-z1", "p-z2"]);
        let annotations = random.pick(&[
            "{}",
            "{remora.io/status: '{}'}",
            r#"{remora.io/status: '{"identity":"spiffe://td/ns/a/sa/one"}'}"#,
            r#"{remora.io/status: '{"identity":"spiffe://td/ns/a/sa/two"}'}"#,
            r#"{remora.io/status: '{"identity":"spiffe://td/ns/a/sa/one"}', remora.io/exclude-inbound-ports: '8080'}"#,
        ]);
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, annotations: {annotations}}}\nspec: {{containers: []}}\n"
        );
        object(&yaml).pods.remove(0)
    }

    /// Removes, replaces or inserts one element at random.
    fn change<T>(random: &mut Random, list: &mut Vec<T>, new: impl FnOnce(&mut Random) -> T) {
        match random.below(3) {
            0 if !list.is_empty() => {
                let at = random.below(list.len());
                list.remove(at);
            }
            1 if !list.is_empty() => {
                let at = random.below(list.len());
                list[at] = new(random);
            }
            _ => {
                let at = random.below(list.len() + 1);
                let object = new(random);
                list.insert(at, object);
            }
        }
    }

    #[test]
    fn an_update_answers_as_a_whole_build_over_random_changes() {
        let mut edited_only = 0;
        let mut pods_changed = 0;
        for seed in 1..=6u64 {
            let mut random = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            // Pods change by a sequence of their own, so that the others stay what they were.
            let mut pod_random = Random(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut objects = ObjectSet::default();
            let mut index = Index::build(&objects);
            for step in 0..400 {
                // Usually one change, as a source publishes; sometimes a burst.
                for _ in 0..1 + random.below(3) * random.below(2) {
                    match random.below(15) {
                        0..=2 => change(&mut random, &mut objects.services, random_service),
                        3..=6 => change(&mut random, &mut objects.endpoint_slices, random_slice),
                        // A slice edited in place, as an EndpointSlice controller does.
                        11..=13 if !objects.endpoint_slices.is_empty() => {
                            let at = random.below(objects.endpoint_slices.len());
                            let held = &objects.endpoint_slices[at];
                            let mut edited = (*random_slice(&mut random)).clone();
                            edited.metadata.namespace = held.metadata.namespace.clone();
                            edited.metadata.labels = held.metadata.labels.clone();
                            objects.endpoint_slices[at] = Arc::new(edited);
                        }
                        // One slice object held twice.
                        14 if !objects.endpoint_slices.is_empty() => {
                            let at = random.below(objects.endpoint_slices.len());
                            let again = Arc::clone(&objects.endpoint_slices[at]);
                            objects.endpoint_slices.push(again);
                        }
                        7 => change(&mut random, &mut objects.http_routes, |random| {
                            random_route(random, "HTTPRoute").http_routes.remove(0)
                        }),
                        8 => change(&mut random, &mut objects.grpc_routes, |random| {
                            random_route(random, "GRPCRoute").grpc_routes.remove(0)
                        }),
                        // The order decides a contested ClusterIP.
                        9 if objects.services.len() > 1 => {
                            let (i, j) = (
                                random.below(objects.services.len()),
                                random.below(objects.services.len()),
                            );
                            objects.services.swap(i, j);
                        }
                        // The same object twice (a file named twice), or an equal copy.
                        _ if !objects.services.is_empty() => {
                            let at = random.below(objects.services.len());
                            let again = if random.below(2) == 0 {
                                Arc::clone(&objects.services[at])
                            } else {
                                Arc::new((*objects.services[at]).clone())
                            };
                            objects.services.push(again);
                        }
                        _ => {}
                    }
                }
                if pod_random.below(8) == 0 {
                    change(&mut pod_random, &mut objects.pods, random_pod);
                    pods_changed += 1;
                }
                edited_only += usize::from(index.slices_edited(&objects).is_some());
                let updated = index.update(&objects);
                let whole = Index::build(&objects);
                assert_eq!(updated, whole, "seed {seed}, step {step}: {objects:#?}");
                index = updated;
            }
        }
        // Both ways of updating were taken, many times (a pod whose identity changed takes
        // the whole pass).
        assert!(edited_only > 250, "{edited_only}");
        assert!(pods_changed > 200, "{pods_changed}");
    }

    #[test]
    fn an_update_reuses_the_entries_of_unchanged_services_only() {
        let yaml = (0..3)
            .map(|n| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: a}}\nspec: {{clusterIP: 10.0.0.{n}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{n}, namespace: a, labels: {{kubernetes.io/service-name: s{n}}}}}\naddressType: IPv4\nports: [{{}}]\nendpoints: [{{addresses: [10.1.0.{n}]}}]\n---\n"
                )
            })
            .collect::<String>();
        let mut objects = object(&yaml);
        let index = Index::build(&objects);
        let slice = Arc::make_mut(&mut objects.endpoint_slices[1]);
        slice.endpoints.as_mut().unwrap()[0].addresses = vec!["10.1.0.9".to_string()];
        let updated = index.update(&objects);
        assert_eq!(updated, Index::build(&objects));
        let shared = |n: u8| {
            let at = SocketAddr::from(([10, 0, 0, n], 80));
            Arc::ptr_eq(&index.targets[&at], &updated.targets[&at])
        };
        assert_eq!((shared(0), shared(1), shared(2)), (true, false, true));
        assert_eq!(
            endpoints_at(&updated, "10.0.0.1:80"),
            Some(vec!["10.1.0.9:80".to_string()])
        );
    }

    #[test]
    fn a_service_policy_is_on_its_targets_and_backend_and_kept_until_its_annotations_change() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, annotations: {remora.io/timeout: 2s, remora.io/queue: bad}}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n---\n".to_string()
            + &slice("a", "addressType: IPv4\nports: [{}]\nendpoints: [{addresses: [10.1.0.1]}]");
        let mut objects = object(&yaml);
        let index = Index::build(&objects);
        let mut expected = policy::defaults();
        expected.timeout_ms = 2_000;
        let at = addr("10.0.0.1:80");
        assert_eq!(*index.lookup(at).unwrap().policy, expected);
        let web = ServiceKey::new("shop", "web");
        assert_eq!(*index.service_port(&web, 80).unwrap().policy, expected);

        // An EndpointSlice edited: the same policy, not parsed again.
        let slice = Arc::make_mut(&mut objects.endpoint_slices[0]);
        slice.endpoints.as_mut().unwrap()[0].addresses = vec!["10.1.0.2".to_string()];
        assert!(index.slices_edited(&objects).is_some());
        let edited = index.update(&objects);
        assert_eq!(edited, Index::build(&objects));
        let policy_of = |index: &Index| Arc::clone(&index.lookup(at).unwrap().policy);
        assert!(Arc::ptr_eq(&policy_of(&index), &policy_of(&edited)));

        // The Service edited but not its annotations: still the same policy.
        let service = Arc::make_mut(&mut objects.services[0]);
        service.metadata.labels = Some([("tier".to_string(), "front".to_string())].into());
        let relabelled = edited.update(&objects);
        assert!(Arc::ptr_eq(&policy_of(&index), &policy_of(&relabelled)));

        // An annotation edited: a new policy, equal to a whole build's.
        let service = Arc::make_mut(&mut objects.services[0]);
        let annotations = service.metadata.annotations.as_mut().unwrap();
        annotations.insert("remora.io/queue".to_string(), "5,1s".to_string());
        let annotated = relabelled.update(&objects);
        assert_eq!(annotated, Index::build(&objects));
        expected.queue_size = 5;
        expected.queue_timeout_ms = 1_000;
        assert_eq!(*policy_of(&annotated), expected);
        assert_eq!(*annotated.service_port(&web, 80).unwrap().policy, expected);
    }
}
