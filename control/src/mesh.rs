//! Which pods are remora pods, and as whom the meshed ones talk mTLS: read from each Pod's
//! `remora.io/status` annotation (the injector writes it, with `"identity": "spiffe://…"`), and
//! found again by address through the EndpointSlices that name them (a metadata-only watch of
//! Pods has no IPs) or the Pods' own `status.podIPs` (files). Pure: a function of the objects.
//!
//! An identity is only given for a port the pod's proxy takes in: never the admin port, and
//! only ports its `remora.io/include-inbound-ports` / `exclude-inbound-ports` leave redirected;
//! mTLS to a port the proxy does not see would reach the application as garbage.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

/// The annotation the injector marks its pods with.
pub const STATUS_ANNOTATION: &str = "remora.io/status";
const INCLUDE_INBOUND_PORTS: &str = "remora.io/include-inbound-ports";
const EXCLUDE_INBOUND_PORTS: &str = "remora.io/exclude-inbound-ports";
/// The proxy's admin port: never redirected, never mTLS.
const ADMIN_PORT: u16 = 15020;

/// A pod by namespace and name.
pub type PodKey = (String, String);

/// A remora pod (one with a `remora.io/status` annotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshedPod {
    /// Its SPIFFE identity, when the status names one (older injectors did not).
    pub identity: Option<Arc<str>>,
    /// The inbound ports its proxy takes in.
    inbound: Inbound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Inbound {
    /// Every port but the admin port, less these ranges.
    All { except: Vec<(u16, u16)> },
    /// Only these ranges, less those.
    Only {
        ports: Vec<(u16, u16)>,
        except: Vec<(u16, u16)>,
    },
    /// The annotations do not read (the webhook denies such pods): no port is trusted to be
    /// redirected.
    Unknown,
}

impl MeshedPod {
    fn of(pod: &Pod) -> Option<Self> {
        let annotations = pod.metadata.annotations.as_ref()?;
        let status = annotations.get(STATUS_ANNOTATION)?;
        let identity = serde_json::from_str::<Value>(status)
            .ok()
            .and_then(|status| status.get("identity")?.as_str().map(str::to_string))
            .filter(|identity| identity.starts_with("spiffe://"))
            .map(Arc::from);
        let ranges = |key: &str| annotations.get(key).map(|text| parse_ranges(text));
        let except = match ranges(EXCLUDE_INBOUND_PORTS) {
            None => Some(Vec::new()),
            Some(parsed) => parsed,
        };
        let include = annotations
            .get(INCLUDE_INBOUND_PORTS)
            .map(|text| text.trim())
            .filter(|text| *text != "*");
        let inbound = match (include.map(parse_ranges), except) {
            (None, Some(except)) => Inbound::All { except },
            (Some(Some(ports)), Some(except)) => Inbound::Only { ports, except },
            _ => Inbound::Unknown,
        };
        Some(Self { identity, inbound })
    }

    /// The identity to expect at `port` of this pod: `None` when it has none or its proxy does
    /// not take that port in.
    pub fn identity_at(&self, port: u16) -> Option<&Arc<str>> {
        let within = |ranges: &[(u16, u16)]| {
            ranges
                .iter()
                .any(|(first, last)| (*first..=*last).contains(&port))
        };
        let redirected = port != ADMIN_PORT
            && match &self.inbound {
                Inbound::All { except } => !within(except),
                Inbound::Only { ports, except } => within(ports) && !within(except),
                Inbound::Unknown => false,
            };
        self.identity.as_ref().filter(|_| redirected)
    }
}

/// `8080,9000-9100` (spaces allowed); `None` when any item is not a port or range. Empty: none.
fn parse_ranges(text: &str) -> Option<Vec<(u16, u16)>> {
    let mut out = Vec::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (first, last) = item.split_once('-').unwrap_or((item, item));
        let first: u16 = first.trim().parse().ok()?;
        let last: u16 = last.trim().parse().ok()?;
        if first == 0 || last < first {
            return None;
        }
        out.push((first, last));
    }
    Some(out)
}

/// Every remora pod by name, and the meshed ones (with an identity) by address.
#[derive(Debug, Default, PartialEq)]
pub struct Pods {
    named: Arc<Named>,
    /// Meshed pods by the addresses of the EndpointSlice endpoints that name them.
    by_slice_ip: HashMap<IpAddr, Arc<MeshedPod>>,
}

/// What the Pods alone give.
#[derive(Debug, Default, PartialEq)]
struct Named {
    /// By namespace, then name: looked up by borrowed names, once per endpoint.
    by_name: HashMap<String, HashMap<String, Arc<MeshedPod>>>,
    /// Meshed pods by their own `status.podIPs` (Pods from files; a metadata watch has none).
    by_own_ip: HashMap<IpAddr, Arc<MeshedPod>>,
}

impl Named {
    /// Every pod by (namespace, name).
    fn flat(&self) -> HashMap<(&str, &str), &Arc<MeshedPod>> {
        self.by_name
            .iter()
            .flat_map(|(namespace, pods)| {
                pods.iter()
                    .map(move |(name, pod)| ((namespace.as_str(), name.as_str()), pod))
            })
            .collect()
    }

    fn build(pods: &[Arc<Pod>]) -> Self {
        let mut out = Self::default();
        for pod in pods {
            let Some(meshed) = MeshedPod::of(pod) else {
                continue;
            };
            let meshed = Arc::new(meshed);
            if meshed.identity.is_some() {
                let status = pod.status.as_ref();
                let ips = status
                    .and_then(|status| status.pod_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|ip| ip.ip.as_str())
                    .chain(status.and_then(|status| status.pod_ip.as_deref()));
                for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                    out.by_own_ip.insert(ip, Arc::clone(&meshed));
                }
            }
            out.by_name
                .entry(pod.metadata.namespace.clone().unwrap_or_default())
                .or_default()
                .insert(pod.metadata.name.clone().unwrap_or_default(), meshed);
        }
        out
    }
}

impl Pods {
    /// The remora pods among `pods`, found by address in their own `status.podIPs` and in the
    /// addresses of EndpointSlice endpoints whose `targetRef` names them.
    pub fn build(pods: &[Arc<Pod>], slices: &[Arc<EndpointSlice>]) -> Self {
        Self::with_slices(Arc::new(Named::build(pods)), slices)
    }

    /// The same pods with other EndpointSlices.
    pub fn update_slices(&self, slices: &[Arc<EndpointSlice>]) -> Self {
        Self::with_slices(Arc::clone(&self.named), slices)
    }

    fn with_slices(named: Arc<Named>, slices: &[Arc<EndpointSlice>]) -> Self {
        let mut out = Self {
            named,
            by_slice_ip: HashMap::new(),
        };
        // Nothing to find when no pod is meshed: the common case before mTLS is rolled out.
        if out
            .named
            .by_name
            .values()
            .flat_map(HashMap::values)
            .any(|pod| pod.identity.is_some())
        {
            for slice in slices {
                let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
                for endpoint in slice.endpoints.iter().flatten() {
                    let Some(meshed) = out.pod_of(namespace, endpoint.target_ref.as_ref()) else {
                        continue;
                    };
                    if meshed.identity.is_none() {
                        continue;
                    }
                    let meshed = Arc::clone(meshed);
                    for ip in endpoint
                        .addresses
                        .iter()
                        .filter_map(|address| address.parse::<IpAddr>().ok())
                    {
                        out.by_slice_ip.insert(ip, Arc::clone(&meshed));
                    }
                }
            }
        }
        out
    }

    /// The remora pod `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<MeshedPod>> {
        self.named.by_name.get(namespace)?.get(name)
    }

    /// The remora pod an EndpointSlice endpoint's `targetRef` names (its namespace, or the
    /// slice's).
    pub fn pod_of(
        &self,
        slice_namespace: &str,
        target: Option<&k8s_openapi::api::core::v1::ObjectReference>,
    ) -> Option<&Arc<MeshedPod>> {
        let target = target.filter(|target| target.kind.as_deref() == Some("Pod"))?;
        let namespace = target
            .namespace
            .as_deref()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or(slice_namespace);
        self.get(namespace, target.name.as_deref()?)
    }

    /// The identity of the meshed pod whose own address `ip:port` is, if it is one.
    pub fn identity_at(&self, ip: IpAddr, port: u16) -> Option<&Arc<str>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        self.by_slice_ip
            .get(&ip)
            .or_else(|| self.named.by_own_ip.get(&ip))?
            .identity_at(port)
    }

    /// The pods whose entry differs between `self` and `other` (added, removed or changed).
    pub fn changed(&self, other: &Pods) -> HashSet<PodKey> {
        let mut out: HashSet<PodKey> = HashSet::new();
        if Arc::ptr_eq(&self.named, &other.named) {
            return out;
        }
        let (mine, theirs) = (self.named.flat(), other.named.flat());
        for (key, pod) in &mine {
            if theirs.get(key) != Some(pod) {
                out.insert((key.0.to_string(), key.1.to_string()));
            }
        }
        for key in theirs.keys() {
            if !mine.contains_key(key) {
                out.insert((key.0.to_string(), key.1.to_string()));
            }
        }
        out
    }

    /// Whether any endpoint of `slice` names one of `pods`.
    pub fn names_any(slice: &EndpointSlice, pods: &HashSet<PodKey>) -> bool {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        slice.endpoints.iter().flatten().any(|endpoint| {
            let Some(target) = endpoint
                .target_ref
                .as_ref()
                .filter(|target| target.kind.as_deref() == Some("Pod"))
            else {
                return false;
            };
            let pod_namespace = target
                .namespace
                .as_deref()
                .filter(|namespace| !namespace.is_empty())
                .unwrap_or(namespace);
            let name = target.name.clone().unwrap_or_default();
            pods.contains(&(pod_namespace.to_string(), name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::read_file_text;
    use std::path::Path;

    fn pods(yaml: &str) -> Pods {
        let (objects, problems) = read_file_text(Path::new("test.yaml"), yaml);
        assert_eq!(problems, Vec::new());
        Pods::build(&objects.pods, &objects.endpoint_slices)
    }

    fn pod(name: &str, annotations: &str, status: &str) -> String {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, annotations: {{{annotations}}}}}\nspec: {{containers: []}}\nstatus: {{{status}}}\n---\n")
    }

    const ID: &str = r#"remora.io/status: '{"version":"0.1.0","identity":"spiffe://cluster.local/ns/shop/sa/web"}'"#;

    #[test]
    fn identity_by_port() {
        // (case, annotations besides the status, port, meshed at that port)
        let cases: [(&str, &str, u16, bool); 9] = [
            ("every port by default", "", 8080, true),
            ("never the admin port", "", 15020, false),
            (
                "excluded",
                "remora.io/exclude-inbound-ports: '8080,9000-9100'",
                9050,
                false,
            ),
            (
                "not excluded",
                "remora.io/exclude-inbound-ports: '8080'",
                8081,
                true,
            ),
            (
                "include star",
                "remora.io/include-inbound-ports: '*'",
                22,
                true,
            ),
            (
                "included",
                "remora.io/include-inbound-ports: '80, 8000-8100'",
                8050,
                true,
            ),
            (
                "not included",
                "remora.io/include-inbound-ports: '80'",
                81,
                false,
            ),
            (
                "included then excluded",
                "remora.io/include-inbound-ports: '80-90', remora.io/exclude-inbound-ports: '85'",
                85,
                false,
            ),
            (
                "unreadable ports trust none",
                "remora.io/exclude-inbound-ports: 'x'",
                8080,
                false,
            ),
        ];
        for (case, extra, port, meshed) in cases {
            let annotations = if extra.is_empty() {
                ID.to_string()
            } else {
                format!("{ID}, {extra}")
            };
            let pods = pods(&pod("web-0", &annotations, "podIP: 10.1.0.1"));
            let got = pods.identity_at("10.1.0.1".parse().unwrap(), port);
            assert_eq!(got.is_some(), meshed, "{case}");
        }
    }

    #[test]
    fn remora_pods_and_their_addresses() {
        let yaml = pod("web-0", ID, "podIPs: [{ip: 10.1.0.1}, {ip: 'fd00::1'}]")
            + &pod("old", "remora.io/status: '{}'", "podIP: 10.1.0.2")
            + &pod("plain", "other: x", "podIP: 10.1.0.3")
            // Metadata only, as the cluster source keeps it: found by the slice's address.
            + &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: web-1, namespace: shop, annotations: {{{ID}}}}}\n---\n")
            + "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, namespace: shop}\naddressType: IPv4\nendpoints: [{addresses: [10.1.0.9], targetRef: {kind: Pod, name: web-1}}]\n";
        let pods = pods(&yaml);
        let at = |ip: &str| {
            pods.identity_at(ip.parse().unwrap(), 80)
                .map(|id| id.to_string())
        };
        let web = Some("spiffe://cluster.local/ns/shop/sa/web".to_string());
        assert_eq!(at("10.1.0.1"), web);
        assert_eq!(at("fd00::1"), web);
        assert_eq!(at("::ffff:10.1.0.1"), web);
        assert_eq!(at("10.1.0.9"), web);
        assert_eq!(at("10.1.0.2"), None, "a remora pod without an identity");
        assert_eq!(at("10.1.0.3"), None, "not a remora pod");
        assert!(pods.get("shop", "old").is_some());
        assert!(pods.get("shop", "plain").is_none());
    }
}
