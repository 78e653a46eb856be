//! How fast an endpoint change reaches open Watch streams, and what the server holds in memory:
//! 10,000 Services × 10 endpoints held in memory (no files), the real index and server code on a
//! loopback socket (plaintext), 1,000 open streams.
//!
//! `cargo run -p remora-control --example push_bench --release [-- SERVICES STREAMS ROUNDS]`
//!
//! Two cases, each timed from the new objects being handed to the server to the last affected
//! stream receiving its snapshot:
//! - fan-out: the 1,000 streams are 1,000 clients (distinct namespaces and pods) of one Service;
//!   one of its endpoints changes, so every stream gets a snapshot.
//! - distinct: the 1,000 streams watch 1,000 different Services; one endpoint of one of them
//!   changes, so one stream gets a snapshot and 999 find theirs unchanged.
//!
//! The client side runs in the same process, so the RSS figures include it; the line "before
//! streams" is the server with its objects and index alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use remora_api::discovery::discovery_client::DiscoveryClient;
use remora_api::discovery::WatchRequest;
use remora_control::index::SERVICE_NAME_LABEL;
use remora_control::metrics::Metrics;
use remora_control::objects::ObjectSet;
use remora_control::server::{self, Hub};
use remora_control::watch::Snapshot;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};

const ENDPOINTS: u32 = 10;
/// Streams per client connection: a proxy holds one connection with a stream per target.
const STREAMS_PER_CONNECTION: usize = 50;

fn cluster_ip(n: u32) -> String {
    format!("10.96.{}.{}", n / 250, n % 250 + 1)
}

fn objects(services: u32) -> ObjectSet {
    let mut objects = ObjectSet::default();
    for n in 0..services {
        let name = format!("svc-{n}");
        let meta = |name: String, labels| ObjectMeta {
            name: Some(name),
            namespace: Some("bench".into()),
            labels,
            ..ObjectMeta::default()
        };
        objects.services.push(Arc::new(Service {
            metadata: meta(name.clone(), None),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip(n)),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::Int(8080)),
                    app_protocol: Some("http".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }));
        let endpoints = (0..ENDPOINTS)
            .map(|e| Endpoint {
                addresses: vec![format!("10.{}.{}.{}", 1 + e, n / 250, n % 250 + 1)],
                node_name: Some(format!("node-{e}")),
                zone: Some(format!("zone-{}", e % 3)),
                ..Endpoint::default()
            })
            .collect();
        objects.endpoint_slices.push(Arc::new(EndpointSlice {
            metadata: meta(
                format!("{name}-abcde"),
                Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), name)])),
            ),
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..EndpointPort::default()
            }]),
        }));
    }
    objects
}

/// Moves the first endpoint of Service `n` to an address unique to `round`: a new EndpointSlice
/// object, as a source makes one for each change, the others shared with the last set.
fn change_endpoint(objects: &mut ObjectSet, n: u32, round: u32) {
    let slice = Arc::make_mut(&mut objects.endpoint_slices[n as usize]);
    if let Some(endpoint) = slice.endpoints.as_mut().and_then(|e| e.first_mut()) {
        endpoint.addresses = vec![format!("10.200.{}.{}", round / 250, round % 250 + 1)];
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn connect(addr: std::net::SocketAddr) -> Channel {
    GrpcEndpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("connecting to the server")
}

/// Opens `targets.len()` streams and forwards each snapshot's arrival time to the returned
/// receiver; waits until every first snapshot has arrived.
async fn open_streams(
    addr: std::net::SocketAddr,
    targets: &[String],
) -> mpsc::UnboundedReceiver<Instant> {
    let (arrivals, mut received) = mpsc::unbounded_channel();
    let mut client = DiscoveryClient::new(connect(addr).await);
    for (i, target) in targets.iter().enumerate() {
        if i % STREAMS_PER_CONNECTION == 0 && i > 0 {
            client = DiscoveryClient::new(connect(addr).await);
        }
        let mut stream = client
            .watch(WatchRequest {
                target: target.clone(),
                namespace: format!("client-{i}"),
                pod: format!("pod-{i}"),
            })
            .await
            .expect("opening a stream")
            .into_inner();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {
                if arrivals.send(Instant::now()).is_err() {
                    return;
                }
            }
        });
    }
    for _ in 0..targets.len() {
        received.recv().await.expect("a first snapshot");
    }
    received
}

/// Changes Service `service` `rounds` times; each time waits for `affected` snapshots and
/// returns how long the last one took.
async fn rounds(
    source: &watch::Sender<Arc<Snapshot>>,
    objects: &mut ObjectSet,
    received: &mut mpsc::UnboundedReceiver<Instant>,
    service: u32,
    affected: usize,
    rounds: u32,
    first_round: u32,
) -> Vec<Duration> {
    let mut times = Vec::new();
    for round in first_round..first_round + rounds {
        change_endpoint(objects, service, round);
        let snapshot = Arc::new(Snapshot {
            objects: objects.clone(),
            problems: Vec::new(),
        });
        let changed = Instant::now();
        // Dropped after the round: freeing the old objects is the bench's cost, not the server's.
        let _previous = source.send_replace(snapshot);
        let mut last = changed;
        for _ in 0..affected {
            let arrived = tokio::time::timeout(Duration::from_secs(10), received.recv())
                .await
                .expect("every affected stream within 10 s")
                .expect("the streams are open");
            last = last.max(arrived);
        }
        times.push(last - changed);
        // Nothing else may arrive: unaffected streams send nothing.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            received.try_recv().is_err(),
            "an unchanged snapshot was sent"
        );
    }
    times.sort();
    times
}

fn summary(name: &str, times: &[Duration]) {
    println!(
        "{name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} changes",
        percentile(times, 0.5).as_secs_f64() * 1e3,
        percentile(times, 0.99).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        times.len()
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>().ok());
    let services = args.next().flatten().unwrap_or(10_000);
    let streams = args.next().flatten().unwrap_or(1_000) as usize;
    let round_count = args.next().flatten().unwrap_or(100);
    assert!(streams as u32 <= services, "more streams than Services");
    println!(
        "{services} Services x {ENDPOINTS} endpoints, {streams} streams, {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "optimised"
        }
    );
    println!("RSS at start: {:.1} MiB", rss_mib());

    let mut objects = objects(services);
    let (source, receiver) = watch::channel(Arc::new(Snapshot {
        objects: objects.clone(),
        problems: Vec::new(),
    }));
    let metrics = Arc::new(Metrics::new());
    let hub = Hub::start(receiver, Arc::clone(&metrics)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding loopback");
    let addr = listener.local_addr().expect("a local address");
    tokio::spawn(server::serve(listener, hub, None, std::future::pending()));
    println!(
        "RSS with objects and index, before streams: {:.1} MiB",
        rss_mib()
    );

    // Fan-out: every stream watches Service 0.
    let same: Vec<String> = (0..streams)
        .map(|_| format!("{}:80", cluster_ip(0)))
        .collect();
    let mut received = open_streams(addr, &same).await;
    println!("RSS with {streams} streams open: {:.1} MiB", rss_mib());
    let fan_out = rounds(
        &source,
        &mut objects,
        &mut received,
        0,
        streams,
        round_count,
        0,
    )
    .await;
    summary(
        &format!("fan-out, one Service's endpoint change to all {streams} streams"),
        &fan_out,
    );
    drop(received);

    // Distinct: stream i watches Service i; Service (round % streams) changes.
    let distinct: Vec<String> = (0..streams as u32)
        .map(|n| format!("{}:80", cluster_ip(n)))
        .collect();
    let mut received = open_streams(addr, &distinct).await;
    println!(
        "RSS with {streams} more streams to distinct Services: {:.1} MiB",
        rss_mib()
    );
    let mut times = Vec::new();
    for round in 0..round_count {
        let service = (round * 7) % streams as u32;
        times.extend(
            rounds(
                &source,
                &mut objects,
                &mut received,
                service,
                1,
                1,
                round_count + round,
            )
            .await,
        );
    }
    times.sort();
    summary(
        &format!("distinct, one Service's endpoint change among {streams} watched Services"),
        &times,
    );
    println!(
        "server's own histogram: {}",
        metrics
            .encode()
            .lines()
            .filter(
                |line| line.starts_with("remora_control_push_duration_seconds_")
                    && !line.contains("bucket")
            )
            .collect::<Vec<_>>()
            .join(", ")
    );
}
