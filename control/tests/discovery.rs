//! The Discovery service in process, over real loopback sockets, fed by `--objects` files: the
//! snapshots it answers, how fast a file edit reaches open streams, and what bad peers can't do.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_api::discovery::discovery_client::DiscoveryClient;
use remora_api::discovery::{self as pb, snapshot::Kind};
use remora_control::metrics::Metrics;
use remora_control::server::{self, Hub};
use remora_control::watch::watch_objects;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

/// The SPEC's bound for a change to reach a stream.
const CHANGE_DEADLINE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(50);

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00::10']
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: grpc, port: 9000, appProtocol: kubernetes.io/h2c}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
";

const ROUTES: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: own, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}, {group: '', kind: Service, name: web}]
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

/// The EndpointSlice of `web` with the given last octets as ready endpoints (10.1.0.N).
fn slice(octets: &[u8]) -> String {
    let mut endpoints = String::new();
    for n in octets {
        endpoints.push_str(&format!(
            "- {{addresses: [10.1.0.{n}], zone: zone-{n}, nodeName: node-{n}, targetRef: {{kind: Pod, name: web-{n}, namespace: shop}}}}\n"
        ));
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-v4, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: grpc, port: 9090}}]\nendpoints:\n{endpoints}"
    )
}

/// Replaces a file the way an editor or `kubectl cp` would: whole, by rename.
fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, text).unwrap();
    fs::rename(&temporary, path).unwrap();
}

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    dir: tempfile::TempDir,
}

impl Server {
    /// A plaintext server on loopback reading a fresh directory holding `files`.
    async fn start(files: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        let source = watch_objects(vec![dir.path().to_path_buf()], POLL);
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::start(source, Arc::clone(&metrics)).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(server::serve(listener, hub, None, std::future::pending()));
        Server { addr, metrics, dir }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> DiscoveryClient<Channel> {
        DiscoveryClient::new(self.channel().await)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Waits (bounded) until `remora_control_watches` is `expected`.
    async fn until_watches(&self, expected: i64, within: Duration) {
        let start = Instant::now();
        while self.metrics.watches() != expected {
            assert!(
                start.elapsed() < within,
                "remora_control_watches is {} after {within:?}, expected {expected}",
                self.metrics.watches()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn watch(
    client: &mut DiscoveryClient<Channel>,
    target: &str,
    namespace: &str,
) -> Streaming<pb::Snapshot> {
    client
        .watch(pb::WatchRequest {
            target: target.into(),
            namespace: namespace.into(),
            pod: "client-0".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next snapshot on `stream`, which must come within `within`.
async fn next(stream: &mut Streaming<pb::Snapshot>, within: Duration) -> pb::Snapshot {
    tokio::time::timeout(within, stream.message())
        .await
        .unwrap_or_else(|_| panic!("no snapshot within {within:?}"))
        .unwrap()
        .expect("the stream ended")
}

fn service(snapshot: &pb::Snapshot) -> &pb::Service {
    match &snapshot.kind {
        Some(Kind::Service(service)) => service,
        other => panic!("expected a service snapshot, got {other:?}"),
    }
}

fn endpoint_ips(snapshot: &pb::Snapshot) -> Vec<String> {
    service(snapshot)
        .endpoints
        .iter()
        .map(|endpoint| format!("{}:{}", endpoint.ip, endpoint.port))
        .collect()
}

#[tokio::test]
async fn a_service_target_gets_its_port_endpoints_and_routes() {
    let server = Server::start(&[
        ("services.yaml", SERVICE),
        ("slice.yaml", &slice(&[3, 1, 2])),
        ("routes.yaml", ROUTES),
    ])
    .await;
    let mut client = server.client().await;

    let mut stream = watch(&mut client, "10.96.0.10:80", "client").await;
    let first = next(&mut stream, CHANGE_DEADLINE).await;
    let got = service(&first);
    assert_eq!(
        (
            got.namespace.as_str(),
            got.name.as_str(),
            got.port,
            got.port_name.as_str(),
            got.app_protocol.as_str()
        ),
        ("shop", "web", 80, "http", "http")
    );
    assert_eq!(
        got.endpoints[0],
        pb::Endpoint {
            ip: "10.1.0.1".into(),
            port: 8080,
            zone: "zone-1".into(),
            node: "node-1".into(),
            pod: "web-1".into(),
            identity: String::new(),
        }
    );
    assert_eq!(
        endpoint_ips(&first),
        ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"],
        "sorted by address"
    );
    // The consumer route of the client's namespace, alone: it wins over the producer route
    // (GAMMA); not the GRPCRoute of port 9000.
    let routes: Vec<(&str, &str, &str, &str)> = got
        .routes
        .iter()
        .map(|r| {
            (
                r.kind.as_str(),
                r.namespace.as_str(),
                r.name.as_str(),
                r.role.as_str(),
            )
        })
        .collect();
    assert_eq!(routes, [("HTTPRoute", "client", "mine", "consumer")]);
    let json: serde_json::Value = serde_json::from_str(&got.routes[0].json).unwrap();
    assert_eq!(json["kind"], "HTTPRoute");
    assert_eq!(json["metadata"]["name"], "mine");

    // Another namespace gets the producer route, once though two of its parentRefs name port 80.
    let mut stream = watch(&mut client, "10.96.0.10:80", "elsewhere").await;
    let elsewhere = next(&mut stream, CHANGE_DEADLINE).await;
    let names: Vec<String> = service(&elsewhere)
        .routes
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(names, ["own"]);
    let json: serde_json::Value =
        serde_json::from_str(&service(&elsewhere).routes[0].json).unwrap();
    assert_eq!(json["kind"], "HTTPRoute");
    assert_eq!(json["metadata"]["name"], "own");

    // The other port, its own endpoint port, protocol and route.
    let mut stream = watch(&mut client, "10.96.0.10:9000", "elsewhere").await;
    let grpc = next(&mut stream, CHANGE_DEADLINE).await;
    assert_eq!(service(&grpc).app_protocol, "kubernetes.io/h2c");
    assert_eq!(endpoint_ips(&grpc)[0], "10.1.0.1:9090");
    // `own` has a parentRef without a port, which governs every port, but a GRPCRoute on the
    // same port wins over an HTTPRoute (GEP-1426).
    let names: Vec<&str> = service(&grpc)
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["rpc"]);

    // The v6 ClusterIP in brackets: the Service, with no v6 endpoints.
    let mut stream = watch(&mut client, "[fd00::10]:80", "client").await;
    let v6 = next(&mut stream, CHANGE_DEADLINE).await;
    assert_eq!(service(&v6).name, "web");
    assert!(service(&v6).endpoints.is_empty());
}

/// A route with what remora's Gateway API types do not model (a filter's fields, an
/// extension's, a status), without a namespace.
const FULL_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: full
  labels: {team: web}
  annotations: {example.com/note: kept}
  resourceVersion: '41'
  managedFields: [{manager: kubectl, operation: Apply}]
spec:
  parentRefs: [{group: '', kind: Service, name: other, namespace: shop, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: 'yes'}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-from, value: remora}]}
    backendRefs:
    - {name: other, port: 80, weight: 90}
    - {name: other-canary, port: 80, weight: 10}
    timeouts: {request: 10s}
    futureField: {kept: true}
status:
  parents: [{parentRef: {name: other}, controllerName: example.com/x, conditions: []}]
";

#[tokio::test]
async fn a_route_is_sent_as_stored_and_an_edit_of_its_spec_is_pushed() {
    let server = Server::start(&[("services.yaml", SERVICE), ("route.yaml", FULL_ROUTE)]).await;
    let mut client = server.client().await;
    let mut stream = watch(&mut client, "10.96.0.20:80", "default").await;
    let first = next(&mut stream, CHANGE_DEADLINE).await;
    let routes = &service(&first).routes;
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(
        (routes[0].namespace.as_str(), routes[0].role.as_str()),
        ("default", "consumer")
    );
    let sent: serde_json::Value = serde_json::from_str(&routes[0].json).unwrap();
    // The object as written, but for what changes on every write or is not the route's own:
    // status, resourceVersion, managedFields; and in the namespace it was read into.
    let mut expected: serde_json::Value = serde_yaml_ng::from_str(FULL_ROUTE).unwrap();
    expected.as_object_mut().unwrap().remove("status");
    let metadata = expected["metadata"].as_object_mut().unwrap();
    metadata.remove("resourceVersion");
    metadata.remove("managedFields");
    metadata.insert("namespace".into(), "default".into());
    assert_eq!(sent, expected);

    // A change to the spec alone (a weight) reaches the open stream with the new JSON.
    write_atomically(
        &server.path("route.yaml"),
        &FULL_ROUTE.replace("weight: 90", "weight: 50"),
    );
    let second = next(&mut stream, CHANGE_DEADLINE).await;
    let sent: serde_json::Value = serde_json::from_str(&service(&second).routes[0].json).unwrap();
    assert_eq!(sent["spec"]["rules"][0]["backendRefs"][0]["weight"], 50);
    assert_eq!(sent["spec"]["rules"][0]["futureField"]["kept"], true);
}

/// A canary on `web`: `x-canary: 1` under /api goes to `other`, the rest splits 90/10 with a
/// mirror of everything to `other` too.
const CANARY: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - name: split
    backendRefs: [{name: web, port: 80, weight: 90}, {name: other, port: 80, weight: 10}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: other, port: 80}, percent: 5}}]
  - name: header
    matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: '1'}]}]
    backendRefs: [{name: other, port: 80}]
";

/// The EndpointSlice of `other` with the given last octets (10.2.0.N, port 80).
fn other_slice(octets: &[u8]) -> String {
    let endpoints: String = octets
        .iter()
        .map(|n| format!("- {{addresses: [10.2.0.{n}]}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: other, namespace: shop, labels: {{kubernetes.io/service-name: other}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{endpoints}"
    )
}

/// Each backend of a table: name, whether resolved, its endpoints.
fn backends(table: &pb::RouteTable) -> Vec<(String, bool, Vec<String>)> {
    table
        .backends
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                b.resolved,
                b.endpoints
                    .iter()
                    .map(|e| format!("{}:{}", e.ip, e.port))
                    .collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_route_table_is_resolved_and_follows_its_backends_endpoints() {
    let server = Server::start(&[
        ("services.yaml", SERVICE),
        ("slice.yaml", &slice(&[1])),
        ("other.yaml", &other_slice(&[1])),
        ("canary.yaml", CANARY),
    ])
    .await;
    let mut client = server.client().await;
    let mut stream = watch(&mut client, "10.96.0.10:80", "shop").await;
    let first = next(&mut stream, CHANGE_DEADLINE).await;
    let table = service(&first).route_table.clone().unwrap();
    // The header match of the second rule first: a longer prefix than the first rule's `/`.
    let order: Vec<(String, u32)> = table
        .matches
        .iter()
        .map(|m| (m.path.as_ref().unwrap().value.clone(), m.rule))
        .collect();
    assert_eq!(order, [("/api".to_string(), 1), ("/".to_string(), 0)]);
    assert_eq!(table.rules[0].rule_name, "split");
    assert_eq!(table.rules[0].invalid, "");
    let weights: Vec<(u32, u32)> = table.rules[0]
        .backends
        .iter()
        .map(|b| (b.backend, b.weight))
        .collect();
    assert_eq!(weights, [(0, 90), (1, 10)]);
    assert_eq!(
        backends(&table),
        [
            ("web".into(), true, vec!["10.1.0.1:8080".into()]),
            ("other".into(), true, vec!["10.2.0.1:80".into()]),
        ]
    );

    // `other`'s endpoints change: the stream of `web` gets a new table with them, at once.
    write_atomically(&server.path("other.yaml"), &other_slice(&[1, 2]));
    let second = next(&mut stream, CHANGE_DEADLINE).await;
    let table = service(&second).route_table.clone().unwrap();
    assert_eq!(
        backends(&table)[1],
        (
            "other".into(),
            true,
            vec!["10.2.0.1:80".into(), "10.2.0.2:80".into()]
        )
    );
    // Its own endpoints are unchanged.
    assert_eq!(endpoint_ips(&second), ["10.1.0.1:8080"]);

    // `other` removed: unresolved, its share answers 500 at the proxy; the rest still applies.
    write_atomically(
        &server.path("services.yaml"),
        &SERVICE[..SERVICE
            .find("---\napiVersion: v1\nkind: Service\nmetadata: {name: other")
            .unwrap()],
    );
    let third = next(&mut stream, CHANGE_DEADLINE).await;
    let table = service(&third).route_table.clone().unwrap();
    assert_eq!(backends(&table)[1], ("other".into(), false, vec![]));
    assert!(backends(&table)[0].1);

    // A target with no route: an empty table.
    let mut plain = watch(&mut client, "10.96.0.10:9000", "shop").await;
    let snapshot = next(&mut plain, CHANGE_DEADLINE).await;
    assert_eq!(
        service(&snapshot).route_table,
        Some(pb::RouteTable::default())
    );
}

/// `web` sends everything to `db` in namespace `data`.
const TO_DB: &str = "\
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: 10.96.0.30, ports: [{port: 5432}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-db, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: db, namespace: data, port: 5432}]}]
";

const DB_GRANT: &str = "\
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-shop, namespace: data}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: '', kind: Service, name: db}]
";

#[tokio::test]
async fn a_reference_grant_written_and_removed_reaches_open_streams() {
    let server = Server::start(&[("services.yaml", SERVICE), ("to-db.yaml", TO_DB)]).await;
    let mut client = server.client().await;
    let mut stream = watch(&mut client, "10.96.0.10:80", "shop").await;
    let resolved = |snapshot: &pb::Snapshot| {
        let table = service(snapshot).route_table.as_ref().unwrap();
        assert_eq!(table.backends.len(), 1, "{table:?}");
        table.backends[0].resolved
    };
    assert!(!resolved(&next(&mut stream, CHANGE_DEADLINE).await));
    fs::write(server.path("grant.yaml"), DB_GRANT).unwrap();
    assert!(resolved(&next(&mut stream, CHANGE_DEADLINE).await));
    fs::remove_file(server.path("grant.yaml")).unwrap();
    assert!(!resolved(&next(&mut stream, CHANGE_DEADLINE).await));
}

#[tokio::test]
async fn a_target_that_is_no_service_is_passthrough() {
    let server = Server::start(&[("services.yaml", SERVICE)]).await;
    let mut client = server.client().await;
    for target in ["10.96.0.10:81", "192.0.2.1:443", "[2001:db8::1]:80"] {
        let mut stream = watch(&mut client, target, "client").await;
        let snapshot = next(&mut stream, CHANGE_DEADLINE).await;
        assert_eq!(
            snapshot.kind,
            Some(Kind::Passthrough(pb::Passthrough::default())),
            "{target}"
        );
    }
}

#[tokio::test]
async fn a_bad_target_is_an_invalid_argument_naming_it() {
    let server = Server::start(&[("services.yaml", SERVICE)]).await;
    let mut client = server.client().await;
    for target in ["10.96.0.10", "fd00::10:80", "web.shop:80", ""] {
        let status = client
            .watch(pb::WatchRequest {
                target: target.into(),
                ..pb::WatchRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{target}");
        assert!(
            status.message().contains(&format!("{target:?}"))
                && status.message().contains("[fd00::10]:80"),
            "{status:?}"
        );
    }
    assert_eq!(server.metrics.watches(), 0);
}

#[tokio::test]
async fn an_endpoint_removed_and_added_in_the_file_reaches_open_streams_within_a_second() {
    let server = Server::start(&[
        ("services.yaml", SERVICE),
        ("slice.yaml", &slice(&[1, 2, 3])),
    ])
    .await;
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for namespace in ["a", "b", "c"] {
        let mut stream = watch(&mut client, "10.96.0.10:80", namespace).await;
        assert_eq!(
            endpoint_ips(&next(&mut stream, CHANGE_DEADLINE).await).len(),
            3
        );
        streams.push(stream);
    }
    let mut unaffected = watch(&mut client, "10.96.0.20:80", "a").await;
    next(&mut unaffected, CHANGE_DEADLINE).await;
    let pushes_before = server.metrics.encode();

    let started = Instant::now();
    write_atomically(&server.path("slice.yaml"), &slice(&[1, 3]));
    for stream in &mut streams {
        let snapshot = next(stream, CHANGE_DEADLINE).await;
        assert_eq!(endpoint_ips(&snapshot), ["10.1.0.1:8080", "10.1.0.3:8080"]);
    }
    let removed = started.elapsed();

    let started = Instant::now();
    write_atomically(&server.path("slice.yaml"), &slice(&[1, 3, 4]));
    for stream in &mut streams {
        let snapshot = next(stream, CHANGE_DEADLINE).await;
        assert_eq!(
            endpoint_ips(&snapshot),
            ["10.1.0.1:8080", "10.1.0.3:8080", "10.1.0.4:8080"]
        );
    }
    let added = started.elapsed();
    assert!(
        removed < CHANGE_DEADLINE && added < CHANGE_DEADLINE,
        "{removed:?} {added:?}"
    );

    // The other Service's stream got nothing: its snapshot did not change.
    let quiet = tokio::time::timeout(Duration::from_millis(300), unaffected.message()).await;
    assert!(quiet.is_err(), "an unchanged snapshot was sent: {quiet:?}");
    // 4 first snapshots, then 3 + 3 changes.
    assert_eq!(server.metrics.snapshots_sent(), 10);
    // Every change was timed from the file read to the last stream's write.
    let count = |text: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix("remora_control_push_duration_seconds_count "))
            .map(|n| n.parse::<u64>().unwrap())
            .unwrap()
    };
    assert_eq!(count(&pushes_before), 0);
    let deadline = Instant::now() + CHANGE_DEADLINE;
    while count(&server.metrics.encode()) < 2 {
        assert!(Instant::now() < deadline, "{}", server.metrics.encode());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_touch_without_a_change_sends_nothing() {
    let server = Server::start(&[("services.yaml", SERVICE), ("slice.yaml", &slice(&[1]))]).await;
    let mut client = server.client().await;
    let mut stream = watch(&mut client, "10.96.0.10:80", "a").await;
    next(&mut stream, CHANGE_DEADLINE).await;
    // A change elsewhere rebuilds the index; this stream's snapshot is the same.
    fs::write(
        server.path("more.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: x}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(600), stream.message()).await;
    assert!(quiet.is_err(), "a duplicate snapshot was sent: {quiet:?}");
    // A Service appearing at a watched address turns passthrough into service.
    let mut later = watch(&mut client, "10.96.0.77:80", "a").await;
    assert!(matches!(
        next(&mut later, CHANGE_DEADLINE).await.kind,
        Some(Kind::Passthrough(_))
    ));
    fs::write(
        server.path("later.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: later, namespace: x}\nspec: {clusterIP: 10.96.0.77, ports: [{port: 80}]}\n",
    )
    .unwrap();
    assert_eq!(
        service(&next(&mut later, CHANGE_DEADLINE).await).name,
        "later"
    );
}

#[tokio::test]
async fn garbage_on_the_grpc_port_does_not_hurt_other_streams() {
    let server =
        Server::start(&[("services.yaml", SERVICE), ("slice.yaml", &slice(&[1, 2]))]).await;
    let mut client = server.client().await;
    let mut stream = watch(&mut client, "10.96.0.10:80", "a").await;
    next(&mut stream, CHANGE_DEADLINE).await;

    // Garbage that closes, garbage that stays open, a half HTTP/2 preface that stalls, and
    // an HTTP/1 request.
    let mut closed = TcpStream::connect(server.addr).await.unwrap();
    closed.write_all(&[0xff; 4096]).await.unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), closed.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the server kept a garbage connection open");
    let mut open = TcpStream::connect(server.addr).await.unwrap();
    open.write_all(b"\x16\x03\x01\x00\xffgarbage")
        .await
        .unwrap();
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut http1 = TcpStream::connect(server.addr).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    // The open stream still gets changes, and new streams open.
    write_atomically(&server.path("slice.yaml"), &slice(&[2]));
    assert_eq!(
        endpoint_ips(&next(&mut stream, CHANGE_DEADLINE).await),
        ["10.1.0.2:8080"]
    );
    let mut fresh = server.client().await;
    let mut stream = watch(&mut fresh, "10.96.0.10:80", "a").await;
    assert_eq!(
        endpoint_ips(&next(&mut stream, CHANGE_DEADLINE).await),
        ["10.1.0.2:8080"]
    );
    drop((open, stalled, http1));
}

#[tokio::test]
async fn a_thousand_streams_opened_and_abandoned_leave_no_watch_behind() {
    let server =
        Server::start(&[("services.yaml", SERVICE), ("slice.yaml", &slice(&[1, 2]))]).await;
    // 500 streams on one connection, then dropped one by one (a reset each, connection kept).
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for n in 0..500 {
        let target = if n % 2 == 0 {
            "10.96.0.10:80"
        } else {
            "10.0.0.1:80"
        };
        streams.push(watch(&mut client, target, "a").await);
    }
    // 500 more over 10 connections, abandoned by dropping the connections.
    let mut connections = Vec::new();
    for _ in 0..10 {
        let mut client = server.client().await;
        let mut on_it = Vec::new();
        for _ in 0..50 {
            on_it.push(watch(&mut client, "10.96.0.10:9000", "b").await);
        }
        connections.push((client, on_it));
    }
    server.until_watches(1000, Duration::from_secs(5)).await;
    // Read a first snapshot on some, not on others.
    for stream in streams.iter_mut().step_by(7) {
        next(stream, CHANGE_DEADLINE).await;
    }
    // A change while they are all open.
    write_atomically(&server.path("slice.yaml"), &slice(&[1]));
    tokio::time::sleep(Duration::from_millis(400)).await;

    drop(streams);
    server.until_watches(500, Duration::from_secs(5)).await;
    drop(client);
    drop(connections);
    server.until_watches(0, Duration::from_secs(5)).await;

    // A change after they are gone costs nothing and the server still serves.
    write_atomically(&server.path("slice.yaml"), &slice(&[2]));
    let mut client = server.client().await;
    let mut stream = watch(&mut client, "10.96.0.10:80", "a").await;
    let first = next(&mut stream, CHANGE_DEADLINE).await;
    assert!(matches!(first.kind, Some(Kind::Service(_))));
}

/// `web` and `other` of [`SERVICE`], `web` with the given annotation lines (block style, each
/// `key: value`) and `other` with a policy of its own.
fn annotated_services(web_annotations: &[&str]) -> String {
    let annotations: String = web_annotations
        .iter()
        .map(|line| format!("\n    {line}"))
        .collect();
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("\n  annotations:{annotations}")
    };
    format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop{annotations}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]
---
apiVersion: v1
kind: Service
metadata:
  name: other
  namespace: shop
  annotations:
    remora.io/retry-on: '5xx,grpc=unavailable'
    remora.io/retry-attempts: '1'
    remora.io/queue: '10,500ms'
spec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]}}
"
    )
}

/// The policy of a Service without annotations, written out: the proxy has no defaults.
fn default_policy() -> pb::Policy {
    pb::Policy {
        timeout_ms: 0,
        retry: Some(pb::RetryPolicy {
            on_5xx: false,
            on_gateway_error: false,
            on_reset: false,
            status_codes: vec![],
            grpc_codes: vec![],
            attempts: 2,
            non_idempotent: false,
            budget_percent: 20,
            budget_floor_per_second: 10,
        }),
        failure_accrual_consecutive: 5,
        max_ejection_percent: 50,
        queue_size: 100,
        queue_timeout_ms: 3_000,
    }
}

/// The policy `other` of [`annotated_services`] has.
fn other_policy() -> pb::Policy {
    let mut policy = default_policy();
    let retry = policy.retry.as_mut().unwrap();
    retry.on_5xx = true;
    retry.grpc_codes = vec![14];
    retry.attempts = 1;
    policy.queue_size = 10;
    policy.queue_timeout_ms = 500;
    policy
}

/// Each backend of a snapshot's route table by name, with its policy.
fn backend_policies(snapshot: &pb::Snapshot) -> Vec<(String, Option<pb::Policy>)> {
    let table = service(snapshot).route_table.as_ref().unwrap();
    table
        .backends
        .iter()
        .map(|backend| (backend.name.clone(), backend.policy.clone()))
        .collect()
}

#[tokio::test]
async fn a_policy_annotation_edit_reaches_open_streams_and_each_backend_has_its_own() {
    let server = Server::start(&[
        ("services.yaml", &annotated_services(&[])),
        ("slice.yaml", &slice(&[1])),
        ("other.yaml", &other_slice(&[1])),
        ("canary.yaml", CANARY),
    ])
    .await;
    let mut client = server.client().await;
    let mut web = watch(&mut client, "10.96.0.10:80", "shop").await;
    let first = next(&mut web, CHANGE_DEADLINE).await;
    assert_eq!(service(&first).policy, Some(default_policy()));
    assert_eq!(
        backend_policies(&first),
        [
            ("web".to_string(), Some(default_policy())),
            ("other".to_string(), Some(other_policy())),
        ]
    );
    let mut other = watch(&mut client, "10.96.0.20:80", "shop").await;
    let snapshot = next(&mut other, CHANGE_DEADLINE).await;
    assert_eq!(service(&snapshot).policy, Some(other_policy()));

    // `web`'s annotations edited: its own stream gets the new policy, in the Service and in
    // the route backend that is `web`, within the SPEC's bound.
    let started = Instant::now();
    write_atomically(
        &server.path("services.yaml"),
        &annotated_services(&[
            "remora.io/timeout: 5s",
            "remora.io/retry-on: gateway-error",
            "remora.io/retry-non-idempotent: 'true'",
        ]),
    );
    let second = next(&mut web, CHANGE_DEADLINE).await;
    assert!(
        started.elapsed() < CHANGE_DEADLINE,
        "{:?}",
        started.elapsed()
    );
    let mut edited = default_policy();
    edited.timeout_ms = 5_000;
    let retry = edited.retry.as_mut().unwrap();
    retry.on_gateway_error = true;
    retry.non_idempotent = true;
    assert_eq!(service(&second).policy, Some(edited.clone()));
    assert_eq!(
        backend_policies(&second),
        [
            ("web".to_string(), Some(edited)),
            ("other".to_string(), Some(other_policy())),
        ]
    );
    // `other`'s snapshot is the same: nothing is sent on its stream.
    let quiet = tokio::time::timeout(Duration::from_millis(300), other.message()).await;
    assert!(quiet.is_err(), "an unchanged snapshot was sent: {quiet:?}");

    // The same annotations written again (new objects, same policy): nothing is sent either.
    // Written as the others are, by a rename: a poll that lands between an in-place write's
    // truncation and its bytes reads the file empty (the Service gone for one round).
    write_atomically(
        &server.path("services.yaml"),
        &annotated_services(&[
            "remora.io/retry-non-idempotent: 'true'",
            "remora.io/retry-on: gateway-error",
            "remora.io/timeout: 5s",
        ]),
    );
    let quiet = tokio::time::timeout(Duration::from_millis(600), web.message()).await;
    assert!(quiet.is_err(), "an unchanged snapshot was sent: {quiet:?}");

    // Annotations removed: back to every default.
    write_atomically(&server.path("services.yaml"), &annotated_services(&[]));
    let third = next(&mut web, CHANGE_DEADLINE).await;
    assert_eq!(service(&third).policy, Some(default_policy()));
}

/// `web-1` and `web-2` of the `web` slice, meshed (the injector's `remora.io/status` with an
/// identity); `web-2` keeps 9090 out of its proxy.
const MESHED_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  annotations: {remora.io/status: '{"version":"0.1.0","identity":"spiffe://cluster.local/ns/shop/sa/web"}'}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  namespace: shop
  annotations:
    remora.io/status: '{"version":"0.1.0","identity":"spiffe://cluster.local/ns/shop/sa/web"}'
    remora.io/exclude-inbound-ports: '9090'
spec: {containers: [{name: app, image: app}]}
"#;

fn identities(snapshot: &pb::Snapshot) -> Vec<(String, String)> {
    service(snapshot)
        .endpoints
        .iter()
        .map(|endpoint| (endpoint.ip.clone(), endpoint.identity.clone()))
        .collect()
}

fn passthrough_identity(snapshot: &pb::Snapshot) -> &str {
    match &snapshot.kind {
        Some(Kind::Passthrough(passthrough)) => &passthrough.identity,
        other => panic!("expected a passthrough snapshot, got {other:?}"),
    }
}

#[tokio::test]
async fn meshed_pods_give_their_endpoints_and_own_addresses_an_identity_and_changes_are_pushed() {
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    let server = Server::start(&[
        ("services.yaml", SERVICE),
        ("slice.yaml", &slice(&[1, 2, 3])),
    ])
    .await;
    let mut client = server.client().await;
    let mut http = watch(&mut client, "10.96.0.10:80", "client").await;
    let mut grpc = watch(&mut client, "10.96.0.10:9000", "client").await;
    // web-2's own address, as a pod-to-pod call dials it (its slice address: no podIPs).
    let mut direct = watch(&mut client, "10.1.0.2:8080", "client").await;
    let mut admin = watch(&mut client, "10.1.0.2:15020", "client").await;
    let none = |ips: &[&str]| -> Vec<(String, String)> {
        ips.iter()
            .map(|ip| (ip.to_string(), String::new()))
            .collect()
    };
    let first = next(&mut http, CHANGE_DEADLINE).await;
    assert_eq!(
        identities(&first),
        none(&["10.1.0.1", "10.1.0.2", "10.1.0.3"])
    );
    next(&mut grpc, CHANGE_DEADLINE).await;
    assert_eq!(
        passthrough_identity(&next(&mut direct, CHANGE_DEADLINE).await),
        ""
    );
    assert_eq!(
        passthrough_identity(&next(&mut admin, CHANGE_DEADLINE).await),
        ""
    );

    // The pods appear: every open stream they change gets a new snapshot within the bound.
    fs::write(server.path("pods.yaml"), MESHED_PODS).unwrap();
    let meshed = next(&mut http, CHANGE_DEADLINE).await;
    let expected = vec![
        ("10.1.0.1".to_string(), WEB.to_string()),
        ("10.1.0.2".to_string(), WEB.to_string()),
        ("10.1.0.3".to_string(), String::new()),
    ];
    assert_eq!(identities(&meshed), expected);
    // Port 9090 of web-2 is not taken in by its proxy: plaintext there.
    let grpc_meshed = next(&mut grpc, CHANGE_DEADLINE).await;
    assert_eq!(
        identities(&grpc_meshed),
        [
            ("10.1.0.1".to_string(), WEB.to_string()),
            ("10.1.0.2".to_string(), String::new()),
            ("10.1.0.3".to_string(), String::new()),
        ]
    );
    assert_eq!(
        passthrough_identity(&next(&mut direct, CHANGE_DEADLINE).await),
        WEB
    );
    // web-1 by its own podIP, v4-mapped as a v6 socket may report it.
    let mut own = watch(&mut client, "[::ffff:10.1.0.1]:8080", "client").await;
    assert_eq!(
        passthrough_identity(&next(&mut own, CHANGE_DEADLINE).await),
        WEB
    );
    // The admin port is never mTLS: nothing to push there.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), admin.message())
            .await
            .is_err(),
        "the admin port's snapshot did not change"
    );

    // The pods go: back to plaintext.
    fs::remove_file(server.path("pods.yaml")).unwrap();
    assert_eq!(
        identities(&next(&mut http, CHANGE_DEADLINE).await),
        none(&["10.1.0.1", "10.1.0.2", "10.1.0.3"])
    );
    assert_eq!(
        passthrough_identity(&next(&mut direct, CHANGE_DEADLINE).await),
        ""
    );
}
