//! Times `Index::build` for 10,000 Services × 10 endpoints (two ports each), the size the issue
//! asks remora-control to rebuild on every change, and reading the same objects back from one
//! `--objects` YAML file. `cargo run -p remora-control --example index_build [--release]`
//! prints the times; a debug build is several times slower.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use remora_control::index::{Index, SERVICE_NAME_LABEL};
use remora_control::objects::{read_file_text, ObjectSet};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;
const ROUNDS: usize = 7;

fn meta(name: String, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(String::from("bench")),
        labels,
        ..ObjectMeta::default()
    }
}

fn objects() -> ObjectSet {
    let mut objects = ObjectSet::default();
    for n in 0..SERVICES {
        let name = format!("svc-{n}");
        let port = |name: &str, port: i32, target: i32| ServicePort {
            name: Some(name.to_string()),
            port,
            target_port: Some(IntOrString::Int(target)),
            ..ServicePort::default()
        };
        objects.services.push(Arc::new(Service {
            metadata: meta(name.clone(), None),
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{}.{}", n / 250, n % 250 + 1)),
                ports: Some(vec![port("http", 80, 8080), port("admin", 9000, 9090)]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }));
        let endpoints = (0..ENDPOINTS)
            .map(|e| Endpoint {
                addresses: vec![format!("10.{}.{}.{}", 1 + e, n / 250, n % 250 + 1)],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                node_name: Some(format!("node-{e}")),
                zone: Some(format!("zone-{}", e % 3)),
                ..Endpoint::default()
            })
            .collect();
        let slice_port = |name: &str, port: i32| EndpointPort {
            name: Some(name.to_string()),
            port: Some(port),
            ..EndpointPort::default()
        };
        objects.endpoint_slices.push(Arc::new(EndpointSlice {
            metadata: meta(
                format!("{name}-abcde"),
                Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), name)])),
            ),
            address_type: "IPv4".to_string(),
            endpoints: Some(endpoints),
            ports: Some(vec![slice_port("http", 8080), slice_port("admin", 9090)]),
        }));
    }
    objects
}

fn main() {
    let objects = objects();
    let mut times: Vec<Duration> = Vec::with_capacity(ROUNDS);
    let mut entries = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let index = Index::build(&objects);
        times.push(start.elapsed());
        entries = index.len();
    }
    times.sort();
    let mut index = Index::build(&objects);
    // One EndpointSlice changed per round, the index updated from the last one.
    let mut changed = objects.clone();
    let mut updates: Vec<Duration> = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let slice = Arc::make_mut(&mut changed.endpoint_slices[round * 997]);
        if let Some(endpoint) = slice.endpoints.as_mut().and_then(|e| e.first_mut()) {
            endpoint.addresses = vec![format!("10.200.0.{}", round + 1)];
        }
        let start = Instant::now();
        let updated = index.update(&changed);
        updates.push(start.elapsed());
        index = updated;
    }
    updates.sort();
    println!(
        "Index::update after one EndpointSlice change: min {:?}, median {:?}, max {:?} over {ROUNDS} rounds",
        updates[0],
        updates[ROUNDS / 2],
        updates[ROUNDS - 1],
    );
    let probe: std::net::SocketAddr = "10.96.20.1:80".parse().unwrap_or_else(|_| unreachable!());
    let lookups = 1_000_000;
    let start = Instant::now();
    let mut found = 0;
    for _ in 0..lookups {
        found += usize::from(index.lookup(std::hint::black_box(probe)).is_some());
    }
    let lookup = start.elapsed() / lookups;
    let mut yaml = String::new();
    for service in &objects.services {
        yaml.push_str(&serde_yaml_ng::to_string(&**service).unwrap_or_default());
        yaml.push_str("---\n");
    }
    for slice in &objects.endpoint_slices {
        yaml.push_str(&serde_yaml_ng::to_string(&**slice).unwrap_or_default());
        yaml.push_str("---\n");
    }
    let start = Instant::now();
    let (read, problems) = read_file_text(std::path::Path::new("bench.yaml"), &yaml);
    let read_time = start.elapsed();
    println!(
        "Index::build, {SERVICES} Services x {ENDPOINTS} endpoints x 2 ports ({entries} entries, {}): \
         min {:?}, median {:?}, max {:?} over {ROUNDS} rounds; lookup {lookup:?} ({found} hits)\n\
         reading them from {} MiB of YAML: {read_time:?} ({} Services, {} EndpointSlices, {} problems)",
        if cfg!(debug_assertions) { "debug build" } else { "optimised build" },
        times[0],
        times[ROUNDS / 2],
        times[ROUNDS - 1],
        yaml.len() >> 20,
        read.services.len(),
        read.endpoint_slices.len(),
        problems.len(),
    );
}
