//! The pod's own kubelet probes as the proxy's `--inbound-probes`: what strict mTLS or an
//! allow-from list still answers in plaintext, since kubelet probes the pod IP, through the
//! inbound redirect, without a certificate.

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use remora_init::{quoted, InitConfig, PortSelection};

use remora_init::mtls::{is_probe_path, InboundProbes, ProbeTarget};

/// Why a probe the proxy cannot be told about refuses the pod.
const NEEDED: &str = "needed because remora.io/inbound-mtls is strict or remora.io/allow-from \
     keeps plaintext clients out";

/// Every probe of the pod's app containers and native sidecars (init containers with
/// `restartPolicy: Always`; other init containers cannot have probes), on ports the inbound
/// redirect catches: tcpSocket, gRPC and HTTPS probes open their whole port, HTTP probes their
/// path (without the query string). A named port is looked up in the container's ports; one it
/// does not declare is an error naming the container and the probe.
pub fn inbound_probes(spec: &PodSpec, init: &InitConfig) -> Result<InboundProbes, String> {
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let mut probes = InboundProbes::default();
    for container in spec.containers.iter().chain(sidecars) {
        let kinds = [
            ("livenessProbe", &container.liveness_probe),
            ("readinessProbe", &container.readiness_probe),
            ("startupProbe", &container.startup_probe),
        ];
        for (kind, probe) in kinds {
            let Some(probe) = probe else { continue };
            let Some(target) = probe_target(container, kind, probe)? else {
                continue;
            };
            if redirected(init, target.port) {
                probes.insert(target);
            }
        }
    }
    Ok(probes)
}

/// Whether remora-init sends inbound connections to this port through the proxy.
fn redirected(init: &InitConfig, port: u16) -> bool {
    let included = match &init.include_inbound_ports {
        PortSelection::All => true,
        PortSelection::List(list) => list.contains(port),
    };
    included && !init.exclude_inbound_ports.contains(port)
}

/// What one probe needs in plaintext; `None` for an exec probe (nothing on the network).
fn probe_target(
    container: &Container,
    kind: &str,
    probe: &Probe,
) -> Result<Option<ProbeTarget>, String> {
    let whole = |port| Some(ProbeTarget { port, path: None });
    if let Some(tcp) = &probe.tcp_socket {
        return resolve(container, kind, &tcp.port).map(whole);
    }
    if let Some(grpc) = &probe.grpc {
        return resolve(container, kind, &IntOrString::Int(grpc.port)).map(whole);
    }
    let Some(http) = &probe.http_get else {
        return Ok(None);
    };
    let port = resolve(container, kind, &http.port)?;
    // The proxy can't see a path inside TLS: an HTTPS probe needs its whole port.
    if http.scheme.as_deref() == Some("HTTPS") {
        return Ok(whole(port));
    }
    // kubelet sends the path as written, with a `/` in front if it lacks one, and "/" for none.
    let written = http.path.as_deref().unwrap_or_default();
    let path = written.split(['?', '#']).next().unwrap_or_default();
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    if !is_probe_path(&path) {
        return Err(format!(
            "container {}: {kind} path {} cannot be passed to the proxy, whose --inbound-probes \
             list is separated by commas (expected a path without commas or spaces, or a \
             tcpSocket probe), {NEEDED}",
            container.name,
            quoted(written)
        ));
    }
    Ok(Some(ProbeTarget {
        port,
        path: Some(path),
    }))
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve(container: &Container, kind: &str, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(number) => u16::try_from(*number)
            .ok()
            .filter(|number| *number > 0)
            .ok_or_else(|| {
                format!(
                    "container {}: {kind} port {number} is not a port (expected a number from 1 \
                     to 65535)",
                    container.name
                )
            }),
        IntOrString::String(name) => {
            let declared = container.ports.iter().flatten();
            let found = declared
                .clone()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok());
            found.ok_or_else(|| {
                let names: Vec<&str> = declared.filter_map(|p| p.name.as_deref()).collect();
                let names = match names.as_slice() {
                    [] => "it names none".to_string(),
                    names => format!("it names {}", names.join(", ")),
                };
                format!(
                    "container {}: {kind} port {} is no port the container declares ({names}; \
                     expected a port number or the name of one of its ports), {NEEDED}",
                    container.name,
                    quoted(name)
                )
            })
        }
    }
}
