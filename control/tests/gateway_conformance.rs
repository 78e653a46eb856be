//! Every HTTPRoute and GRPCRoute of the Gateway API v1.6 mesh conformance manifests, read in
//! place from the shared peer data (skipped where it is absent): each parses, attaches to a
//! Service, and uses only filters and match types remora knows.

use std::path::{Path, PathBuf};

use remora_control::gateway::{Filter, MatchType, PathMatchType, PathModifierType};
use remora_control::index::{Index, ServiceKey};
use remora_control::objects::{read_paths, ObjectSet};
use remora_control::routes;

const MANIFESTS: &str = "shared/peer-data/gateway-api-mesh";

/// `REMORA_GATEWAY_API_MESH`, else the first `shared/peer-data/gateway-api-mesh` above the crate.
fn manifests_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("REMORA_GATEWAY_API_MESH") {
        return Some(PathBuf::from(dir));
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join(MANIFESTS))
        .find(|dir| dir.is_dir())
}

/// Route documents counted without remora's reader: every document of every file whose kind
/// is HTTPRoute or GRPCRoute.
fn route_documents(dir: &std::path::Path) -> (usize, usize) {
    let (mut http, mut grpc) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
            match value["kind"].as_str() {
                Some("HTTPRoute") => http += 1,
                Some("GRPCRoute") => grpc += 1,
                _ => {}
            }
        }
    }
    (http, grpc)
}

#[test]
fn every_mesh_conformance_route_parses_and_attaches_to_a_service() {
    let Some(dir) = manifests_dir() else {
        eprintln!(
            "skipped: no {MANIFESTS} above {}",
            env!("CARGO_MANIFEST_DIR")
        );
        return;
    };
    let (objects, problems) = read_paths(std::slice::from_ref(&dir));
    assert!(problems.is_empty(), "{problems:#?}");
    let (http, grpc) = route_documents(&dir);
    eprintln!(
        "{} HTTPRoutes and {} GRPCRoutes read from {}",
        objects.http_routes.len(),
        objects.grpc_routes.len(),
        dir.display()
    );
    assert_eq!(
        (objects.http_routes.len(), objects.grpc_routes.len()),
        (http, grpc)
    );
    assert!(
        http >= 20 && grpc >= 2,
        "fewer routes than v1.6.1 has: {http} {grpc}"
    );

    let mut filters: Vec<&Filter> = Vec::new();
    for route in &objects.http_routes {
        let name = route.metadata.name.as_deref().unwrap_or_default();
        assert!(
            route.spec.parent_refs.iter().any(|p| p.is_service()),
            "{name}"
        );
        for rule in &route.spec.rules {
            for m in &rule.matches {
                assert!(
                    !matches!(m.path.match_type, PathMatchType::Unknown(_)),
                    "{name}"
                );
                for header in m.headers.iter().chain(&m.query_params) {
                    assert!(
                        !matches!(header.match_type, MatchType::Unknown(_)),
                        "{name}"
                    );
                }
            }
            filters.extend(&rule.filters);
            filters.extend(rule.backend_refs.iter().flat_map(|b| &b.filters));
        }
    }
    for route in &objects.grpc_routes {
        let name = route.metadata.name.as_deref().unwrap_or_default();
        assert!(
            route.spec.parent_refs.iter().any(|p| p.is_service()),
            "{name}"
        );
        for rule in &route.spec.rules {
            filters.extend(&rule.filters);
            filters.extend(rule.backend_refs.iter().flat_map(|b| &b.filters));
        }
    }
    for filter in &filters {
        match filter {
            Filter::Unsupported { .. } | Filter::ExtensionRef(_) => panic!("{filter:?}"),
            Filter::UrlRewrite(rewrite) => assert!(rewrite
                .path
                .as_ref()
                .is_none_or(|p| !matches!(p.modifier_type, PathModifierType::Unknown(_)))),
            _ => {}
        }
    }
    assert!(!filters.is_empty());

    // The manifests' Services have no ClusterIP (the API server assigns one), but the routes
    // still index under the Service they name.
    let index = Index::build(&objects);
    let echo = ServiceKey::new("gateway-conformance-mesh", "echo");
    assert!(!index.routes(&echo).is_empty());
}

#[test]
fn every_mesh_conformance_route_resolves_with_every_rule_valid_and_every_backend_found() {
    let Some(dir) = manifests_dir() else {
        eprintln!(
            "skipped: no {MANIFESTS} above {}",
            env!("CARGO_MANIFEST_DIR")
        );
        return;
    };
    // As the suite runs them: the shared manifests, and one test's routes at a time.
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tests"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut tables = 0;
    for file in &files {
        let (objects, problems) = read_paths(&[dir.join("mesh/manifests.yaml"), file.clone()]);
        assert!(problems.is_empty(), "{problems:#?}");
        tables += check_every_route_resolves(&objects, file);
    }
    assert!(files.len() >= 20, "{files:?}");
    assert!(tables >= 22, "{tables}");
}

/// Resolves every (route, parent Service, port) `objects` attach, for a client in the route's
/// own namespace (where the suite's clients of consumer routes are); returns how many.
fn check_every_route_resolves(objects: &ObjectSet, file: &Path) -> usize {
    let index = Index::build(objects);
    let parents = objects
        .http_routes
        .iter()
        .map(|r| ("HTTPRoute", &r.metadata, &r.spec.parent_refs))
        .chain(
            objects
                .grpc_routes
                .iter()
                .map(|r| ("GRPCRoute", &r.metadata, &r.spec.parent_refs)),
        );
    let mut tables = 0;
    for (kind, metadata, parent_refs) in parents {
        let namespace = metadata.namespace.as_deref().unwrap();
        let name = metadata.name.as_deref().unwrap();
        let route = format!("{}: {kind} {namespace}/{name}", file.display());
        for parent in parent_refs.iter().filter(|p| p.is_service()) {
            let service = ServiceKey::new(
                parent.namespace.as_deref().unwrap_or(namespace),
                parent.name.as_str(),
            );
            let object = objects
                .services
                .iter()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(service.namespace.as_str())
                        && s.metadata.name.as_deref() == Some(service.name.as_str())
                })
                .unwrap_or_else(|| panic!("{route}: no Service {service}"));
            let ports: Vec<u16> = match parent.port {
                Some(port) => vec![port],
                None => object
                    .spec
                    .iter()
                    .flat_map(|spec| spec.ports.iter().flatten())
                    .map(|port| u16::try_from(port.port).unwrap())
                    .collect(),
            };
            for port in ports {
                let resolved = routes::resolve(&index, &service, port, namespace);
                let table = &resolved.table;
                assert!(
                    resolved
                        .routes
                        .iter()
                        .any(|r| r.kind == kind && r.name == name && r.namespace == namespace),
                    "{route} does not apply to {service}:{port}"
                );
                for rule in &table.rules {
                    assert_eq!(rule.invalid, "", "{route}");
                }
                // A Service that does not exist is only named with weight 0 (grpcroute-weight's
                // echo-v3), so it takes no traffic.
                for (at, backend) in table.backends.iter().enumerate() {
                    let weights: Vec<u32> = table
                        .rules
                        .iter()
                        .flat_map(|rule| &rule.backends)
                        .filter(|b| b.backend as usize == at)
                        .map(|b| b.weight)
                        .collect();
                    assert!(
                        backend.resolved || weights.iter().all(|w| *w == 0),
                        "{route}: {}/{}:{} {weights:?}",
                        backend.namespace,
                        backend.name,
                        backend.port
                    );
                }
                assert!(!table.matches.is_empty(), "{route}");
                tables += 1;
            }
        }
    }
    tables
}
