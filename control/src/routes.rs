//! Gateway API routes resolved for the proxy: for one Service port and one client namespace,
//! the routes that govern it, their matches in the specification's precedence, each rule
//! validated, each backendRef named with its Service's endpoints (`pb::RouteTable`).
//!
//! Two steps. [`CompiledRoute::new`] (`crate::compile`) reads one route object alone once per
//! object; the index keeps it with the route. [`resolve`] then picks the routes of one target
//! and client namespace and resolves their backends against the index. [`Tables`] keeps each
//! generation's answers so that many streams on one target share one resolution, and carries
//! an answer over to the next generation when nothing it was read from changed.
//!
//! Choices the Gateway API leaves open, as made here (and in `crate::compile`, for one route):
//! - Which routes: the consumer routes of the client's namespace when there is one for the port,
//!   else the producer routes (GAMMA). Among those, GRPCRoutes win over HTTPRoutes on one port
//!   (GEP-1426: the HTTPRoute is not accepted), so one table never mixes the two orders.
//! - Ties across routes: the older `creationTimestamp` (a route without one counts as newer
//!   than any with one), then `namespace/name`; within a route, rule order, then match order.
//! - A backend's endpoints are those of its Service's primary IP family.
//! - `hostnames` are not read: a mesh route attaches to the Service's ClusterIP and port, not to
//!   the Host header.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use remora_api::discovery as pb;

use crate::compile::{BackendRef, CompiledRoute, CompiledRule, Rank, RuleFilter};
use crate::gateway::ReferenceGrant;
use crate::index::{AttachedRoute, Index, Route, RouteRole, ServiceKey, ServiceVersion};
use crate::policy;

/// What a table was read from, to tell whether a later index would give the same.
#[derive(Debug, Clone)]
struct Sources {
    /// Every route attached to the Service, by object.
    attached: Vec<Arc<CompiledRoute>>,
    /// The name of the Service port (what a `sectionName` names).
    port_name: Option<String>,
    /// Each backend's Service.
    backends: Vec<(ServiceKey, Option<ServiceVersion>)>,
    /// The ReferenceGrants of each namespace a backendRef crossed into.
    grants: Vec<(String, Vec<Arc<ReferenceGrant>>)>,
}

impl Sources {
    fn hold(&self, index: &Index, service: &ServiceKey, port: u16) -> bool {
        let attached = index.routes(service);
        attached.len() == self.attached.len()
            && attached
                .iter()
                .zip(&self.attached)
                .all(|(now, then)| Arc::ptr_eq(&now.compiled, then))
            && index.port_name(service, port) == self.port_name.as_deref()
            && self
                .backends
                .iter()
                .all(|(key, version)| index.service_version(key) == *version)
            && self.grants.iter().all(|(namespace, grants)| {
                let now = index.reference_grants(namespace);
                now.len() == grants.len() && now.iter().zip(grants).all(|(a, b)| Arc::ptr_eq(a, b))
            })
    }
}

/// A resolved table and the routes it was made of.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub table: pb::RouteTable,
    /// The routes that apply, as `Service.routes` lists them.
    pub routes: Vec<pb::Route>,
    sources: Sources,
}

/// Equal when they answer the same (what they were read from aside).
impl PartialEq for Resolved {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || (self.table == other.table && self.routes == other.routes)
    }
}

/// The routes that govern port `port` of `service` for clients in `client_namespace`, resolved.
pub fn resolve(index: &Index, service: &ServiceKey, port: u16, client_namespace: &str) -> Resolved {
    let attached = index.routes(service);
    let port_name = index.port_name(service, port);
    let governs = |a: &&AttachedRoute| a.governs(port, port_name);
    let consumers: Vec<&AttachedRoute> = attached
        .iter()
        .filter(governs)
        .filter(|a| a.role == RouteRole::Consumer && a.route.namespace() == client_namespace)
        .collect();
    let mut chosen = if consumers.is_empty() {
        attached
            .iter()
            .filter(governs)
            .filter(|a| a.role == RouteRole::Producer)
            .collect()
    } else {
        consumers
    };
    if chosen.iter().any(|a| matches!(a.route, Route::Grpc(_))) {
        chosen.retain(|a| matches!(a.route, Route::Grpc(_)));
    }
    // Each route once, though several of its parentRefs may name this port.
    let mut once = HashSet::new();
    chosen.retain(|a| once.insert(Arc::as_ptr(&a.compiled)));
    chosen.sort_by(|a, b| a.compiled.tie_order().cmp(&b.compiled.tie_order()));

    let mut builder = TableBuilder {
        index,
        service,
        backends: HashMap::new(),
        table: pb::RouteTable::default(),
        versions: Vec::new(),
        grants: Vec::new(),
    };
    let mut ranked: Vec<(Rank, usize, u32, &pb::RouteMatch)> = Vec::new();
    for (order, a) in chosen.iter().enumerate() {
        for rule in &a.compiled.rules {
            let number = u32::try_from(builder.table.rules.len()).unwrap_or(u32::MAX);
            for (rank, m) in &rule.matches {
                ranked.push((*rank, order, number, m));
            }
            builder.rule(a, rule);
        }
    }
    // Stable: rule and match order are kept among equals.
    ranked.sort_by_key(|(rank, order, _, _)| (*rank, *order));
    builder.table.matches = ranked
        .into_iter()
        .map(|(_, _, rule, m)| pb::RouteMatch { rule, ..m.clone() })
        .collect();

    let routes = chosen
        .iter()
        .map(|a| pb::Route {
            kind: a.compiled.kind.to_string(),
            namespace: a.route.namespace().to_string(),
            name: a.route.name().to_string(),
            role: match a.role {
                RouteRole::Producer => "producer",
                RouteRole::Consumer => "consumer",
            }
            .to_string(),
            json: a.route.json().to_string(),
        })
        .collect();
    let TableBuilder {
        table,
        versions,
        grants,
        ..
    } = builder;
    Resolved {
        table,
        routes,
        sources: Sources {
            attached: attached.iter().map(|a| Arc::clone(&a.compiled)).collect(),
            port_name: port_name.map(str::to_string),
            backends: versions,
            grants,
        },
    }
}

struct TableBuilder<'a> {
    index: &'a Index,
    /// The Service the table is for.
    service: &'a ServiceKey,
    /// Each backend written, by what decides it: the reference and whether it may be used.
    backends: HashMap<(BackendRef, bool), u32>,
    table: pb::RouteTable,
    versions: Vec<(ServiceKey, Option<ServiceVersion>)>,
    grants: Vec<(String, Vec<Arc<ReferenceGrant>>)>,
}

impl TableBuilder<'_> {
    fn rule(&mut self, attached: &AttachedRoute, rule: &CompiledRule) {
        let backends = rule
            .backends
            .iter()
            .map(|backend| pb::WeightedBackend {
                backend: self.backend(attached, &backend.backend),
                weight: backend.weight,
                filters: self.filters(attached, &backend.filters),
            })
            .collect();
        let compiled = &attached.compiled;
        let filters = self.filters(attached, &rule.filters);
        self.table.rules.push(pb::RouteRule {
            kind: compiled.kind.to_string(),
            namespace: compiled.namespace.clone(),
            name: compiled.name.clone(),
            rule_name: rule.name.clone(),
            invalid: rule.invalid.clone().unwrap_or_default(),
            filters,
            backends,
            request_timeout_ms: rule.request_timeout_ms,
            backend_request_timeout_ms: rule.backend_request_timeout_ms,
            retry: rule.retry.clone(),
        });
    }

    fn filters(&mut self, attached: &AttachedRoute, filters: &[RuleFilter]) -> Vec<pb::Filter> {
        filters
            .iter()
            .map(|filter| {
                let kind = match filter {
                    RuleFilter::Ready(kind) => kind.clone(),
                    RuleFilter::Mirror {
                        backend,
                        numerator,
                        denominator,
                    } => pb::filter::Kind::RequestMirror(pb::RequestMirror {
                        backend: self.backend(attached, backend),
                        numerator: *numerator,
                        denominator: *denominator,
                    }),
                };
                pb::Filter { kind: Some(kind) }
            })
            .collect()
    }

    /// Whether a ReferenceGrant in `backend`'s namespace lets this route name it.
    fn granted(&mut self, attached: &AttachedRoute, backend: &BackendRef) -> bool {
        let grants = self.index.reference_grants(&backend.namespace);
        if !self
            .grants
            .iter()
            .any(|(seen, _)| *seen == backend.namespace)
        {
            self.grants
                .push((backend.namespace.clone(), grants.to_vec()));
        }
        grants.iter().any(|grant| {
            grant.allows_service(
                attached.compiled.kind,
                attached.route.namespace(),
                &backend.name,
            )
        })
    }

    /// The index of `backend` in the table, added on first use.
    fn backend(&mut self, attached: &AttachedRoute, backend: &BackendRef) -> u32 {
        let key = backend.key();
        let route_namespace = attached.route.namespace();
        // A consumer route names its parent Service in another namespace by nature; it needs no
        // ReferenceGrant to send there. Any other crossing needs one in the backend's namespace.
        let crosses = backend.namespace != route_namespace;
        let allowed = !crosses
            || (attached.role == RouteRole::Consumer && key == *self.service)
            || (backend.service && self.granted(attached, backend));
        if let Some(at) = self.backends.get(&(backend.clone(), allowed)) {
            return *at;
        }
        let found = match backend.port {
            Some(port) if backend.service && allowed => self.index.service_port(&key, port),
            _ => None,
        };
        if backend.service && !self.versions.iter().any(|(seen, _)| *seen == key) {
            self.versions
                .push((key.clone(), self.index.service_version(&key)));
        }
        let at = u32::try_from(self.table.backends.len()).unwrap_or(u32::MAX);
        self.table.backends.push(pb::Backend {
            namespace: backend.namespace.clone(),
            name: backend.name.clone(),
            port: backend.port.map_or(0, u32::from),
            resolved: found.is_some(),
            app_protocol: found
                .as_ref()
                .and_then(|found| found.app_protocol.clone())
                .unwrap_or_default(),
            // An unresolved backend takes no requests; a policy all the same, so that the proxy
            // never needs defaults of its own.
            policy: Some(
                found
                    .as_ref()
                    .map_or_else(policy::defaults, |found| (*found.policy).clone()),
            ),
            endpoints: found
                .map(|found| found.endpoints.iter().map(endpoint).collect())
                .unwrap_or_default(),
        });
        self.backends.insert((backend.clone(), allowed), at);
        at
    }
}

/// An endpoint as the API writes it.
pub fn endpoint(endpoint: &crate::index::Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        ip: endpoint.addr.ip().to_string(),
        port: u32::from(endpoint.addr.port()),
        zone: endpoint.zone.clone().unwrap_or_default(),
        node: endpoint.node.clone().unwrap_or_default(),
        pod: endpoint.pod.clone().unwrap_or_default(),
        identity: endpoint.identity.as_deref().unwrap_or_default().to_string(),
    }
}

/// One generation's resolved tables, shared by every stream reading that index.
#[derive(Debug, Default)]
pub struct Tables {
    inner: Mutex<TablesInner>,
}

#[derive(Debug, Default)]
struct TablesInner {
    /// By what a stream asks: Service, port and client namespace.
    asked: HashMap<(ServiceKey, u16, String), Arc<Resolved>>,
    /// By what decides the answer: Service, port, and the client namespace only when it has
    /// consumer routes there.
    resolved: HashMap<TableKey, Arc<Resolved>>,
    /// Earlier generations' answers, to carry over what did not change, with how many
    /// generations ago each was last asked for.
    previous: HashMap<TableKey, (Arc<Resolved>, u32)>,
}

/// Generations an answer nobody asks for is kept for: long enough to outlast a burst of
/// changes that streams skip through, short enough that a Service gone is forgotten.
const KEPT_GENERATIONS: u32 = 8;

type TableKey = (ServiceKey, u16, Option<String>);

impl Tables {
    /// Empty tables for a new index, reusing `previous`'s answers where they still hold.
    pub fn after(previous: &Tables) -> Self {
        let held = previous.lock();
        let mut carried: HashMap<TableKey, (Arc<Resolved>, u32)> = held
            .previous
            .iter()
            .filter(|(_, (_, age))| *age < KEPT_GENERATIONS)
            .map(|(key, (resolved, age))| (key.clone(), (Arc::clone(resolved), age + 1)))
            .collect();
        carried.extend(
            held.resolved
                .iter()
                .map(|(key, resolved)| (key.clone(), (Arc::clone(resolved), 0))),
        );
        Self {
            inner: Mutex::new(TablesInner {
                previous: carried,
                ..TablesInner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TablesInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The table of `service` port `port` for a client in `client_namespace`, from `index`
    /// (the index these tables belong to): resolved once per generation, or carried over.
    pub fn get(
        &self,
        index: &Index,
        service: &ServiceKey,
        port: u16,
        client_namespace: &str,
    ) -> Arc<Resolved> {
        let asked = (service.clone(), port, client_namespace.to_string());
        if let Some(found) = self.lock().asked.get(&asked) {
            return Arc::clone(found);
        }
        let consumer = index.routes(service).iter().any(|a| {
            a.role == RouteRole::Consumer
                && a.applies_to_port(port)
                && a.route.namespace() == client_namespace
        });
        let key = (
            service.clone(),
            port,
            consumer.then(|| client_namespace.to_string()),
        );
        let found = {
            let inner = self.lock();
            inner.resolved.get(&key).cloned().or_else(|| {
                inner
                    .previous
                    .get(&key)
                    .filter(|(kept, _)| kept.sources.hold(index, service, port))
                    .map(|(kept, _)| Arc::clone(kept))
            })
        };
        // Resolved outside the lock: another stream may do the same at once, and the first
        // one stored wins, so every stream shares one answer.
        let found =
            found.unwrap_or_else(|| Arc::new(resolve(index, service, port, client_namespace)));
        let mut inner = self.lock();
        let found = Arc::clone(inner.resolved.entry(key).or_insert(found));
        inner.asked.insert(asked, Arc::clone(&found));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::DEFAULT_RETRY_ATTEMPTS;
    use crate::objects::read_file_text;
    use pretty_assertions::assert_eq;
    use std::cmp::Reverse;
    use std::path::Path;

    fn index(yaml: &str) -> Index {
        let (objects, problems) = read_file_text(Path::new("test.yaml"), yaml);
        assert_eq!(problems, Vec::new());
        Index::build(&objects)
    }

    /// Services `web` (ports 80 `http` and 81 `admin`), `api` (port 8080, appProtocol http,
    /// two endpoints) in `shop`, and `db` in `data`.
    const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: admin, port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 8080, targetPort: 9090, appProtocol: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints: [{addresses: [10.1.0.2]}, {addresses: [10.1.0.1]}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: 10.96.0.12, ports: [{port: 5432}]}
---
";

    /// An HTTPRoute in `namespace` on `web`, with the given rules (YAML flow list).
    fn http_route(namespace: &str, name: &str, extra_metadata: &str, rules: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {namespace}{extra_metadata}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web, namespace: shop}}]\n  rules: {rules}\n---\n"
        )
    }

    fn web(yaml: &str, client: &str) -> Resolved {
        let index = index(&(SERVICES.to_string() + yaml));
        resolve(&index, &ServiceKey::new("shop", "web"), 80, client)
    }

    /// Each match as text: path kind and value, method, header and query counts, and the rule's
    /// route and rule number within its route.
    fn order(resolved: &Resolved) -> Vec<String> {
        let table = &resolved.table;
        table
            .matches
            .iter()
            .map(|m| {
                let rule = &table.rules[m.rule as usize];
                let path = m
                    .path
                    .as_ref()
                    .map_or("any".to_string(), |p| format!("{:?} {}", p.kind(), p.value));
                format!(
                    "{path} {} h{} q{} {}",
                    if m.method.is_empty() { "-" } else { &m.method },
                    m.headers.len(),
                    m.query_params.len(),
                    rule.rule_name,
                )
            })
            .collect()
    }

    #[test]
    fn http_matches_follow_the_specification_precedence_not_list_order() {
        let route = http_route(
            "shop",
            "r",
            "",
            "[{name: r, matches: [
                {path: {type: PathPrefix, value: /}},
                {path: {type: PathPrefix, value: /a}},
                {path: {type: PathPrefix, value: /a/b}},
                {path: {type: RegularExpression, value: '/a/.*'}},
                {path: {type: RegularExpression, value: '/.*'}},
                {path: {type: Exact, value: /a}},
                {path: {type: PathPrefix, value: /a}, method: GET},
                {path: {type: PathPrefix, value: /a}, headers: [{name: x, value: '1'}]},
                {path: {type: PathPrefix, value: /a}, headers: [{name: x, value: '1'}, {name: y, value: '2'}]},
                {path: {type: PathPrefix, value: /a}, queryParams: [{name: q, value: '1'}]},
                {path: {type: PathPrefix, value: /a}, method: GET, queryParams: [{name: q, value: '1'}]},
            ]}]",
        );
        assert_eq!(
            order(&web(&route, "shop")),
            [
                "Exact /a - h0 q0 r",
                "Regex /a/.* - h0 q0 r",
                "Regex /.* - h0 q0 r",
                "Prefix /a/b - h0 q0 r",
                "Prefix /a GET h0 q1 r",
                "Prefix /a GET h0 q0 r",
                "Prefix /a - h2 q0 r",
                "Prefix /a - h1 q0 r",
                "Prefix /a - h0 q1 r",
                "Prefix /a - h0 q0 r",
                "Prefix / - h0 q0 r",
            ]
        );
    }

    #[test]
    fn ties_go_to_the_older_route_then_its_name_then_rule_and_match_order() {
        let rule = |name: &str| {
            format!("{{name: {name}, matches: [{{path: {{value: /same}}}}, {{path: {{value: /same}}}}]}}")
        };
        let routes = [
            // Newest, and first by name: last among those with a timestamp.
            http_route(
                "shop",
                "a-new",
                ", creationTimestamp: '2026-01-03T00:00:00Z'",
                &format!("[{}]", rule("new")),
            ),
            http_route(
                "shop",
                "z-old",
                ", creationTimestamp: '2026-01-01T00:00:00Z'",
                &format!("[{}, {}]", rule("old1"), rule("old2")),
            ),
            // Same time as z-old, earlier by name.
            http_route(
                "shop",
                "m-old",
                ", creationTimestamp: '2026-01-01T00:00:00Z'",
                &format!("[{}]", rule("mid")),
            ),
            // No timestamp: after every route with one.
            http_route("shop", "b-unknown", "", &format!("[{}]", rule("unknown"))),
            // A longer prefix beats any age.
            http_route(
                "shop",
                "y-young",
                ", creationTimestamp: '2026-02-01T00:00:00Z'",
                "[{name: longer, matches: [{path: {value: /same/x}}]}]",
            ),
        ]
        .concat();
        let resolved = web(&routes, "shop");
        let names: Vec<String> = order(&resolved)
            .iter()
            .map(|m| m.rsplit(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "longer", "mid", "mid", "old1", "old1", "old2", "old2", "new", "new", "unknown",
                "unknown"
            ]
        );
        // The two matches of one rule keep their order: the first written, first.
        let table = &resolved.table;
        assert!(table
            .matches
            .windows(2)
            .all(|pair| pair[0].rule <= pair[1].rule
                || table.rules[pair[0].rule as usize].name
                    != table.rules[pair[1].rule as usize].name));
    }

    #[test]
    fn consumer_routes_of_the_client_namespace_replace_producer_routes() {
        let routes = [
            http_route("shop", "producer", "", "[{}]"),
            http_route("client", "consumer", "", "[{}]"),
            http_route("other", "elsewhere", "", "[{}]"),
        ]
        .concat();
        let names = |client: &str| -> Vec<(String, String)> {
            web(&routes, client)
                .routes
                .iter()
                .map(|r| (r.name.clone(), r.role.clone()))
                .collect()
        };
        assert_eq!(names("client"), [("consumer".into(), "consumer".into())]);
        assert_eq!(names("other"), [("elsewhere".into(), "consumer".into())]);
        assert_eq!(names("shop"), [("producer".into(), "producer".into())]);
        assert_eq!(names("nobody"), [("producer".into(), "producer".into())]);
        // The table holds the same rules as the routes listed.
        let table = web(&routes, "client").table;
        assert_eq!(table.rules.len(), 1);
        assert_eq!(table.rules[0].name, "consumer");
    }

    #[test]
    fn a_parent_port_or_section_picks_the_service_port() {
        let route = |name: &str, parent: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{parentRefs: [{{group: '', kind: Service, name: web{parent}}}]}}\n---\n"
            )
        };
        let yaml = SERVICES.to_string()
            + &route("any-port", "")
            + &route("port-80", ", port: 80")
            + &route("port-81", ", port: 81")
            + &route("section-http", ", sectionName: http")
            + &route(
                "section-and-port-disagree",
                ", sectionName: admin, port: 80",
            )
            + &route("another-kind", "")
                .replace("kind: Service", "kind: Gateway")
                .replace("group: ''", "group: gateway.networking.k8s.io");
        let index = index(&yaml);
        let names = |port: u16| -> Vec<String> {
            resolve(&index, &ServiceKey::new("shop", "web"), port, "shop")
                .routes
                .into_iter()
                .map(|r| r.name)
                .collect()
        };
        assert_eq!(names(80), ["any-port", "port-80", "section-http"]);
        assert_eq!(names(81), ["any-port", "port-81"]);
    }

    fn grpc_route(name: &str, parent: &str, rules: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {parent}}}]\n  rules: {rules}\n---\n"
        )
    }

    #[test]
    fn grpc_matches_become_paths_in_grpc_precedence() {
        let route = grpc_route(
            "rpc",
            "web",
            "[
              {name: all},
              {name: service, matches: [{method: {service: pkg.Echo}}]},
              {name: method, matches: [{method: {method: Say}}]},
              {name: both, matches: [{method: {service: pkg.Echo, method: Say}}]},
              {name: both-header, matches: [{method: {service: pkg.Echo, method: Say}, headers: [{name: x, value: '1'}]}]},
              {name: regex, matches: [{method: {type: RegularExpression, service: 'pkg\\.E.*', method: 'S.+'}}]},
              {name: header-only, matches: [{headers: [{name: x, value: '1'}]}]},
            ]",
        );
        // An HTTPRoute on the same port is not used: one table never mixes the two.
        let http = http_route("shop", "http", "", "[{name: http}]");
        assert_eq!(
            order(&web(&(route + &http), "shop")),
            [
                // Equal service and method lengths (8 and 3) as written: rule order.
                "Exact /pkg.Echo/Say - h1 q0 both-header",
                "Exact /pkg.Echo/Say - h0 q0 both",
                "Regex /(?:pkg\\.E.*)/(?:S.+) - h0 q0 regex",
                "Regex /pkg\\.Echo/[^/]+ - h0 q0 service",
                "Regex /[^/]+/Say - h0 q0 method",
                "any - h1 q0 header-only",
                "any - h0 q0 all",
            ]
        );
    }

    #[test]
    fn grpc_paths_match_what_they_say() {
        let route = grpc_route(
            "rpc",
            "web",
            "[{matches: [{method: {service: pkg.Echo}}, {method: {method: Say}}, {method: {type: RegularExpression, service: 'pkg\\.E.*', method: 'S.+'}}]}]",
        );
        let table = web(&route, "shop").table;
        let full = |pattern: &str, path: &str| {
            regex::Regex::new(&format!("^(?:{pattern})$"))
                .unwrap()
                .is_match(path)
        };
        let patterns: Vec<String> = table
            .matches
            .iter()
            .map(|m| m.path.as_ref().unwrap().value.clone())
            .collect();
        let cases = [
            ("/pkg.Echo/Say", [true, true, true]),
            ("/pkg.Echo/Other", [true, false, false]),
            ("/pkg.Exx/Say", [false, true, true]),
            ("/pkgxEcho/Say", [false, true, false]),
            ("/other.Svc/Say", [false, true, false]),
            ("/pkg.Echo/Say/more", [false, false, true]),
        ];
        // Regex first (longer service pattern), then service-only, then method-only.
        let by_name = [&patterns[1], &patterns[2], &patterns[0]];
        for (path, expected) in cases {
            let got = by_name.map(|pattern| full(pattern, path));
            assert_eq!(got, expected, "{path}: {patterns:?}");
        }
    }

    #[test]
    fn rules_that_cannot_be_honoured_are_marked_and_the_others_kept() {
        let route = http_route(
            "shop",
            "r",
            "",
            "[
              {name: fine, matches: [{path: {value: /ok}}], filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: a, value: b}]}}], backendRefs: [{name: api, port: 8080}]},
              {name: unknown-filter, matches: [{path: {value: /u}}], filters: [{type: CORS, cors: {}}]},
              {name: extension, matches: [{path: {value: /e}}], filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: K, name: k}}]},
              {name: bad-regex, matches: [{path: {type: RegularExpression, value: '/('}}, {path: {value: /kept}}]},
              {name: bad-header-regex, matches: [{path: {value: /h}, headers: [{type: RegularExpression, name: x, value: '[z-a]'}]}]},
              {name: prefix-rewrite-on-exact, matches: [{path: {type: Exact, value: /x}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]},
              {name: bad-status, matches: [{path: {value: /s}}], filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]},
              {name: bad-timeout, matches: [{path: {value: /t}}], timeouts: {request: 1d}},
              {name: backend-longer, matches: [{path: {value: /l}}], timeouts: {request: 1s, backendRequest: 2s}},
              {name: two-rewrites, matches: [{path: {value: /w}}], filters: [{type: URLRewrite, urlRewrite: {hostname: a}}, {type: URLRewrite, urlRewrite: {hostname: b}}]},
              {name: bad-backend-filter, matches: [{path: {value: /b}}], backendRefs: [{name: api, port: 8080, filters: [{type: Nope}]}]},
              {name: bad-mirror, matches: [{path: {value: /m}}], filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api, port: 8080}, fraction: {numerator: 3, denominator: 2}}}]},
              {name: retry-code, matches: [{path: {value: /r}}], retry: {codes: [200]}},
            ]",
        );
        let resolved = web(&route, "shop");
        let table = &resolved.table;
        let invalid: Vec<(&str, &str)> = table
            .rules
            .iter()
            .map(|rule| (rule.rule_name.as_str(), rule.invalid.as_str()))
            .collect();
        let expect = [
            ("fine", ""),
            (
                "unknown-filter",
                "does not support the filter type \"CORS\"",
            ),
            ("extension", "no extension filters"),
            ("bad-regex", "\"/(\" is not a valid regular expression"),
            ("bad-header-regex", "header \"x\""),
            (
                "prefix-rewrite-on-exact",
                "ReplacePrefixMatch needs every match",
            ),
            ("bad-status", "status 305"),
            ("bad-timeout", "timeouts.request"),
            ("backend-longer", "longer than timeouts.request"),
            ("two-rewrites", "URLRewrite appears more than once"),
            ("bad-backend-filter", "\"Nope\""),
            ("bad-mirror", "3/2"),
            ("retry-code", "retry code 200"),
        ];
        assert_eq!(invalid.len(), expect.len());
        for ((name, reason), (expected_name, part)) in invalid.iter().zip(expect) {
            assert_eq!(*name, expected_name);
            if part.is_empty() {
                assert_eq!(*reason, "", "{name}");
            } else {
                assert!(reason.contains(part), "{name}: {reason}");
            }
        }
        // Never half-applied, but still there: its filters and backends as written, and its
        // matches that can be evaluated in their place.
        let fine = &table.rules[0];
        assert_eq!(fine.filters.len(), 1);
        assert_eq!(fine.backends.len(), 1);
        let paths: Vec<&str> = table
            .matches
            .iter()
            .map(|m| m.path.as_ref().unwrap().value.as_str())
            .collect();
        assert!(
            paths.contains(&"/kept") && !paths.contains(&"/("),
            "{paths:?}"
        );
        assert!(!paths.contains(&"/h"), "{paths:?}");
        assert!(paths.contains(&"/u") && paths.contains(&"/ok"), "{paths:?}");
        // What the proxy will compile, compiles.
        for m in &table.matches {
            let path = m.path.as_ref().unwrap();
            if path.kind() == pb::path_match::Kind::Regex {
                regex::Regex::new(&path.value).unwrap();
            }
        }
    }

    #[test]
    fn invalid_rules_are_counted_once_per_route_object() {
        let index = index(
            &(SERVICES.to_string()
                + &http_route("shop", "r", "", "[{filters: [{type: CORS}]}, {}]")),
        );
        let attached = index.routes(&ServiceKey::new("shop", "web"));
        let invalid: Vec<(usize, &str)> = attached[0].compiled.invalid_rules().collect();
        assert_eq!(invalid.len(), 1);
        assert_eq!(invalid[0].0, 0);
    }

    #[test]
    fn a_new_version_of_a_route_takes_its_pattern_checks_from_the_last() {
        let yaml = SERVICES.to_string()
            + &http_route(
                "shop",
                "r",
                "",
                "[{matches: [{path: {type: RegularExpression, value: '/a.*'}}]}]",
            );
        let index = index(&yaml);
        let attached = &index.routes(&ServiceKey::new("shop", "web"))[0];
        assert_eq!(attached.compiled.patterns.get("/a.*"), Some(&None));
        // An earlier version that (as a stand-in for a check already made) holds a verdict:
        // it is taken, not compiled again.
        let mut earlier = (*attached.compiled).clone();
        earlier
            .patterns
            .insert("/a.*".into(), Some("remembered".into()));
        let again = CompiledRoute::new(&attached.route, Some(&earlier));
        assert_eq!(again.rules[0].invalid.as_deref(), Some("path: remembered"));
        let fresh = CompiledRoute::new(&attached.route, None);
        assert_eq!(fresh.rules[0].invalid, None);
    }

    #[test]
    fn backends_are_named_once_with_their_endpoints_or_unresolved() {
        let route = http_route(
            "shop",
            "r",
            "",
            "[
              {name: split, backendRefs: [{name: api, port: 8080, weight: 90}, {name: api, port: 8080, weight: 0}, {name: missing, port: 80}, {name: api, port: 9999}, {name: api}]},
              {name: again, matches: [{path: {value: /again}}], backendRefs: [{name: api, port: 8080}, {name: db, namespace: data, port: 5432}, {group: example.com, kind: Bucket, name: b}]},
            ]",
        );
        let resolved = web(&route, "shop");
        let table = &resolved.table;
        let backends: Vec<(String, u32, bool, &str, Vec<String>)> = table
            .backends
            .iter()
            .map(|b| {
                (
                    format!("{}/{}", b.namespace, b.name),
                    b.port,
                    b.resolved,
                    b.app_protocol.as_str(),
                    b.endpoints
                        .iter()
                        .map(|e| format!("{}:{}", e.ip, e.port))
                        .collect(),
                )
            })
            .collect();
        let api = vec!["10.1.0.1:9090".to_string(), "10.1.0.2:9090".to_string()];
        assert_eq!(
            backends,
            [
                ("shop/api".into(), 8080, true, "http", api),
                ("shop/missing".into(), 80, false, "", vec![]),
                ("shop/api".into(), 9999, false, "", vec![]),
                ("shop/api".into(), 0, false, "", vec![]),
                // Another namespace, no ReferenceGrant.
                ("data/db".into(), 5432, false, "", vec![]),
                ("shop/b".into(), 0, false, "", vec![]),
            ]
        );
        let weights = |rule: usize| -> Vec<(u32, u32)> {
            table.rules[rule]
                .backends
                .iter()
                .map(|b| (b.backend, b.weight))
                .collect()
        };
        assert_eq!(weights(0), [(0, 90), (0, 0), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(weights(1), [(0, 1), (4, 1), (5, 1)]);
    }

    #[test]
    fn a_consumer_route_may_send_to_its_parent_in_another_namespace_without_a_grant() {
        let route = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: client}
spec:
  parentRefs: [{group: '', kind: Service, name: api, namespace: shop}]
  rules: [{backendRefs: [{name: api, namespace: shop, port: 8080}, {name: db, namespace: data, port: 5432}]}]
";
        let index = index(&(SERVICES.to_string() + route));
        let table = resolve(&index, &ServiceKey::new("shop", "api"), 8080, "client").table;
        let resolved: Vec<(&str, bool, usize)> = table
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.resolved, b.endpoints.len()))
            .collect();
        assert_eq!(resolved, [("api", true, 2), ("db", false, 0)]);
    }

    const GRANT: &str = "\
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-to-db, namespace: data}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: '', kind: Service, name: db}]
---
";

    #[test]
    fn a_cross_namespace_backend_needs_a_reference_grant_of_its_namespace() {
        let route = http_route(
            "shop",
            "r",
            "",
            "[{backendRefs: [{name: db, namespace: data, port: 5432}]}]",
        );
        let db = |yaml: &str| -> bool { web(yaml, "shop").table.backends[0].resolved };
        assert!(!db(&route));
        assert!(db(&(route.clone() + GRANT)));
        // A grant for another kind, namespace or Service does not do.
        for (case, other) in [
            ("kind", GRANT.replace("kind: HTTPRoute", "kind: GRPCRoute")),
            (
                "from namespace",
                GRANT.replace("namespace: shop", "namespace: else"),
            ),
            ("Service", GRANT.replace("name: db", "name: cache")),
            (
                "its namespace",
                GRANT.replace("namespace: data", "namespace: shop"),
            ),
        ] {
            assert!(!db(&(route.clone() + &other)), "{case}");
        }
        // A grant without a name opens every Service of its namespace.
        assert!(db(&(route + &GRANT.replace(", name: db", ""))));
    }

    #[test]
    fn a_grant_added_later_is_not_hidden_by_a_carried_table() {
        let route = http_route(
            "shop",
            "r",
            "",
            "[{backendRefs: [{name: db, namespace: data, port: 5432}]}]",
        );
        let (mut objects, _) =
            read_file_text(Path::new("t.yaml"), &(SERVICES.to_string() + &route));
        let first = Index::build(&objects);
        let web = ServiceKey::new("shop", "web");
        let tables = Tables::default();
        assert!(!tables.get(&first, &web, 80, "shop").table.backends[0].resolved);
        let (grant, _) = read_file_text(Path::new("g.yaml"), GRANT);
        objects.reference_grants.extend(grant.reference_grants);
        let second = first.update(&objects);
        let next = Tables::after(&tables);
        assert!(next.get(&second, &web, 80, "shop").table.backends[0].resolved);
    }

    #[test]
    fn filters_timeouts_and_retry_reach_the_table() {
        let route = http_route(
            "shop",
            "r",
            "",
            "[{
              filters: [
                {type: RequestMirror, requestMirror: {backendRef: {name: api, port: 8080}}},
                {type: RequestMirror, requestMirror: {backendRef: {name: db, namespace: data, port: 5432}, percent: 25}},
                {type: RequestMirror, requestMirror: {backendRef: {name: api, port: 8080}, fraction: {numerator: 1, denominator: 3}}},
                {type: RequestRedirect, requestRedirect: {scheme: https, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}},
                {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: a, value: b}], remove: [c]}},
              ],
              backendRefs: [{name: api, port: 8080, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x, value: y}]}}]}],
              timeouts: {request: 1m30s, backendRequest: 500ms},
              retry: {codes: [500, 503], attempts: 3, backoff: 100ms},
            }, {retry: {}}]",
        );
        let resolved = web(&route, "shop");
        let table = &resolved.table;
        let rule = &table.rules[0];
        use pb::filter::Kind;
        let mirrors: Vec<(String, u32, u32)> = rule
            .filters
            .iter()
            .filter_map(|f| match &f.kind {
                Some(Kind::RequestMirror(m)) => Some((
                    table.backends[m.backend as usize].name.clone(),
                    m.numerator,
                    m.denominator,
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            mirrors,
            [
                ("api".into(), 1, 1),
                ("db".into(), 25, 100),
                ("api".into(), 1, 3)
            ]
        );
        assert_eq!(
            rule.filters[3].kind,
            Some(Kind::RequestRedirect(pb::RequestRedirect {
                scheme: "https".into(),
                hostname: String::new(),
                port: 8443,
                path: Some(pb::PathModifier {
                    kind: pb::path_modifier::Kind::ReplaceFullPath.into(),
                    value: "/new".into(),
                }),
                status_code: 301,
            }))
        );
        assert!(matches!(
            rule.filters[4].kind,
            Some(Kind::ResponseHeaderModifier(_))
        ));
        assert_eq!(rule.backends[0].filters.len(), 1);
        assert_eq!(
            (rule.request_timeout_ms, rule.backend_request_timeout_ms),
            (90_000, 500)
        );
        assert_eq!(
            rule.retry,
            Some(pb::Retry {
                codes: vec![500, 503],
                attempts: 3,
                backoff_ms: 100
            })
        );
        assert_eq!(
            table.rules[1].retry,
            Some(pb::Retry {
                codes: vec![],
                attempts: DEFAULT_RETRY_ATTEMPTS,
                backoff_ms: 0
            })
        );
        assert_eq!(rule.invalid, "");
    }

    #[test]
    fn ten_thousand_rules_on_one_service_resolve_in_order() {
        let mut rules = String::from("[");
        for n in 0..10_000 {
            rules.push_str(&format!(
                "{{name: r{n}, matches: [{{path: {{value: /p/{n}}}}}], backendRefs: [{{name: api, port: 8080, weight: {}}}]}},",
                n % 7
            ));
        }
        rules.push(']');
        let resolved = web(&http_route("shop", "big", "", &rules), "shop");
        let table = &resolved.table;
        assert_eq!(table.rules.len(), 10_000);
        assert_eq!(table.matches.len(), 10_000);
        assert_eq!(table.backends.len(), 1);
        // Longer prefixes first, and among equal lengths the rule order.
        let keys: Vec<(Reverse<usize>, u32)> = table
            .matches
            .iter()
            .map(|m| (Reverse(m.path.as_ref().unwrap().value.len()), m.rule))
            .collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(table.matches[0].path.as_ref().unwrap().value, "/p/1000");
    }

    #[test]
    fn tables_are_shared_within_a_generation_and_carried_over_while_they_hold() {
        let routes = http_route(
            "shop",
            "r",
            "",
            "[{backendRefs: [{name: api, port: 8080}]}]",
        ) + &http_route("client", "mine", "", "[{}]");
        let (mut objects, problems) =
            read_file_text(Path::new("t.yaml"), &(SERVICES.to_string() + &routes));
        assert_eq!(problems, Vec::new());
        let first = Index::build(&objects);
        let web = ServiceKey::new("shop", "web");
        let tables = Tables::default();
        let a = tables.get(&first, &web, 80, "a");
        // Another namespace without consumer routes shares the producer table.
        assert!(Arc::ptr_eq(&a, &tables.get(&first, &web, 80, "b")));
        let mine = tables.get(&first, &web, 80, "client");
        assert!(!Arc::ptr_eq(&a, &mine));
        assert_eq!(mine.routes[0].name, "mine");

        // An unrelated change: the next generation keeps the same tables.
        let (db, _) = read_file_text(
            Path::new("u.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: x}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 1}]}\n",
        );
        objects.services.extend(db.services);
        let second = first.update(&objects);
        let next = Tables::after(&tables);
        assert!(Arc::ptr_eq(&a, &next.get(&second, &web, 80, "a")));

        // A backend's endpoints change: a new table with them.
        let slice = objects
            .endpoint_slices
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some("api-1"))
            .unwrap();
        Arc::make_mut(slice).endpoints.as_mut().unwrap()[0].addresses = vec!["10.1.0.7".into()];
        let third = second.update(&objects);
        let after = Tables::after(&next);
        let changed = after.get(&third, &web, 80, "a");
        assert!(!Arc::ptr_eq(&a, &changed));
        let ips: Vec<&str> = changed.table.backends[0]
            .endpoints
            .iter()
            .map(|e| e.ip.as_str())
            .collect();
        assert_eq!(ips, ["10.1.0.1", "10.1.0.7"]);
        // The consumer's table did not depend on it: carried over.
        assert!(Arc::ptr_eq(&mine, &after.get(&third, &web, 80, "client")));
    }
}
