//! Gateway API objects as a user writes them, through remora-control's reader
//! (`control/src/objects.rs`), index, route compilation and resolution (`control/src/compile.rs`,
//! `routes.rs`), and the table it sends through remora-proxy's compile, match and filters
//! (`proxy/src/outbound/routes.rs`, `filters.rs`): a route a cluster admits, or a file
//! `--objects` reads, must never crash either.
//!
//! Input: YAML documents (Services, EndpointSlices, HTTPRoutes, GRPCRoutes, ReferenceGrants), then
//! a line `#request` and one request: its method and path on the first line, then `name: value`
//! header lines. Checked: no panic; every snapshot encodes; a matched rule's backend is one the
//! table holds; a rewritten path is still a path, and a redirect's `Location` starts with its
//! scheme.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use remora_api::discovery::snapshot;
use remora_control::index::Index;
use remora_control::objects::read_file_text;
use remora_control::server::snapshot_for;
use remora_proxy::outbound::filters;
use remora_proxy::outbound::routes::Routes;

/// The request part: method, path and headers; `None` when it can't be one.
fn request(text: &str) -> Option<(Method, Uri, HeaderMap)> {
    let mut lines = text.lines();
    let (method, path) = lines.next()?.split_once(' ')?;
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let uri = path.parse::<Uri>().ok()?;
    let mut headers = HeaderMap::new();
    for line in lines.take(32) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(name, value);
        }
    }
    Some((method, uri, headers))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (objects_text, request_text) = text.split_once("\n#request\n").unwrap_or((text, ""));
    let (objects, _problems) = read_file_text(Path::new("fuzz.yaml"), objects_text);
    let index = Index::build(&objects);
    let request = request(request_text);

    // Every Service port, asked by a client in the Service's namespace, in each route's
    // namespace (consumer routes) and in one that has none.
    let mut namespaces: Vec<String> = vec!["elsewhere".into()];
    namespaces.extend(
        objects
            .http_routes
            .iter()
            .filter_map(|r| r.metadata.namespace.clone()),
    );
    namespaces.extend(
        objects
            .grpc_routes
            .iter()
            .filter_map(|r| r.metadata.namespace.clone()),
    );
    for service in objects.services.iter().take(8) {
        let Some(spec) = &service.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let own = service.metadata.namespace.clone().unwrap_or_default();
        for port in spec.ports.iter().flatten().take(4) {
            let Ok(port) = u16::try_from(port.port) else {
                continue;
            };
            let target = SocketAddr::new(ip, port);
            for namespace in std::iter::once(&own).chain(namespaces.iter().take(4)) {
                let snapshot = snapshot_for(&index, target, namespace);
                let _ = snapshot.encode_to_vec();
                let Some(snapshot::Kind::Service(service)) = snapshot.kind else {
                    continue;
                };
                let Some(table) = service.route_table else {
                    continue;
                };
                let Some(routes) = Routes::compile(&table, target, None) else {
                    continue;
                };
                let Some((method, uri, headers)) = &request else {
                    continue;
                };
                let Some(matched) = routes.find(method, uri, headers) else {
                    continue;
                };
                let rule = &routes.rules[matched.rule];
                for random in [0, 1, u64::MAX / 3, u64::MAX] {
                    if let Some(chosen) = rule.choose(random) {
                        assert!(chosen.backend < routes.backends.len());
                    }
                }
                let (mut uri, mut headers) = (uri.clone(), headers.clone());
                for modifier in &rule.filters.request_headers {
                    modifier.apply(&mut headers);
                }
                if let Some(redirect) = &rule.filters.redirect {
                    let location = redirect.location(&uri, &headers, port, matched.prefix);
                    let scheme = redirect.scheme.as_deref().unwrap_or("http");
                    assert!(location.starts_with(&format!("{scheme}://")), "{location}");
                }
                if let Some(rewrite) = &rule.filters.rewrite {
                    rewrite.apply(&mut uri, &mut headers, matched.prefix);
                    assert!(uri.path().starts_with('/'), "{uri}");
                }
                let _ = filters::request_host(&uri, &headers);
            }
        }
    }
});
