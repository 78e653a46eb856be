//! The proxy's side of the discovery API (SPEC: `remora-control`): one watch per target that
//! this pod connects to, shared by all worker threads.
//!
//! - **Lazy**: a target is asked for on its first connection, and dropped once no connection
//!   has used it for [`IDLE_EXPIRY`]. A pod that talks to ten Services holds ten watches however
//!   many Services the cluster has.
//! - **Fail open**: a connection waits for a target's first snapshot at most [`FIRST_SNAPSHOT_WAIT`],
//!   and not at all once the control plane is known to be unreachable; without a snapshot it
//!   goes to its original destination (kube-proxy still balances it per connection).
//! - **Last snapshot kept**: a stream that fails keeps what it had and reconnects with backoff;
//!   a restarted control plane sends whole snapshots again.
//!
//! The watches run on the admin thread's runtime; workers read them through `tokio::sync::watch`
//! receivers, so a snapshot reaches a worker's next request without crossing a lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use remora_api::discovery::discovery_client::DiscoveryClient;
use remora_api::discovery::{self as api, snapshot};
use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig};
use tracing::{debug, info, warn};

use crate::client::Endpoint;
use crate::metrics::{ControlMetrics, ResilienceMetrics};
use crate::outbound::policy::Policy;
use crate::outbound::routes::Routes;

/// How long a connection waits for its target's first snapshot before it is forwarded to its
/// original destination (SPEC: at most 1 s).
pub const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_millis(900);
/// A target no connection used for this long is dropped (SPEC: 60 s).
pub const IDLE_EXPIRY: Duration = Duration::from_secs(60);
/// Reconnect backoff after a failed stream: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How long the control plane gets to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How a Service port's traffic is recognised: its `appProtocol`, or detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// No `appProtocol`: detect as for any destination.
    Detect,
    /// `http`, `http2`, `kubernetes.io/h2c`, `grpc`: HTTP, the client speaks first.
    Http,
    /// `tcp` and every other value (`mysql`, `redis`, …): a byte stream, no detection.
    Opaque,
}

impl AppProtocol {
    pub fn of(app_protocol: &str) -> Self {
        match app_protocol {
            "" => Self::Detect,
            "http" | "http2" | "kubernetes.io/h2c" | "grpc" => Self::Http,
            _ => Self::Opaque,
        }
    }
}

/// One Service port as the last snapshot described it.
#[derive(Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub protocol: AppProtocol,
    /// Ready endpoints, sorted, with the identity of those that are meshed pods.
    pub endpoints: Vec<Endpoint>,
    /// The routes that apply, compiled; `None` when none does.
    pub routes: Option<Arc<Routes>>,
    /// Its resilience policy: the SPEC's defaults when the snapshot has none.
    pub policy: Arc<Policy>,
    /// Its retry and ejection counters.
    pub resilience: ResilienceMetrics,
    /// The failure accrual of each backend of `routes`, in its order: the backend Service's
    /// own policy (consecutive, max ejection percent) and its `endpoint_ejections_total`.
    pub backend_accrual: Vec<(u32, u32, Counter)>,
}

/// What the proxy knows of one target.
#[derive(Debug, Clone)]
pub enum Known {
    /// No snapshot yet; the control plane has not failed either.
    Waiting,
    /// No snapshot, and the control plane could not be reached: forward (fail open).
    Unreachable,
    /// Not a Service address: forward to the original destination; with the identity it must
    /// present when it is a meshed pod's own IP:port.
    Passthrough(Option<Arc<str>>),
    Service(Arc<Service>),
}

impl Known {
    pub fn service(&self) -> Option<&Arc<Service>> {
        match self {
            Known::Service(service) => Some(service),
            _ => None,
        }
    }
}

/// How the proxy reaches the control plane (from its flags).
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// `host:port`.
    pub addr: String,
    /// The name the control plane's certificate must carry.
    pub name: String,
    /// PEM trust anchors; `None` for plaintext.
    pub trust_anchors: Option<Vec<u8>>,
    /// The proxy's own pod.
    pub namespace: String,
    pub pod: String,
}

/// One target's watch, shared by the workers.
#[derive(Debug)]
pub struct Watched {
    pub known: watch::Receiver<Known>,
    /// Connections using the target now.
    active: AtomicU32,
    /// When the last of them ended, in milliseconds since the discovery started.
    released_ms: AtomicU64,
    /// Set when the target is dropped for want of use; a worker holding it asks again.
    expired: AtomicBool,
    epoch: Instant,
}

/// A connection's use of a target: keeps the target's watch from expiring while it is open.
#[derive(Debug)]
pub struct InUse {
    watched: Arc<Watched>,
    epoch: Instant,
}

impl InUse {
    pub fn known(&self) -> &watch::Receiver<Known> {
        &self.watched.known
    }

    pub fn watched(&self) -> Arc<Watched> {
        Arc::clone(&self.watched)
    }

    /// One more use of a target a worker already holds; `None` if it has just expired (then
    /// [`Discovery::watch`] starts it again). Pairs with [`Discovery::expired`]: each side
    /// writes its own flag, then reads the other's, so at least one of them sees the other.
    pub fn again(watched: &Arc<Watched>) -> Option<InUse> {
        watched.active.fetch_add(1, SeqCst);
        if watched.expired.load(SeqCst) {
            watched.active.fetch_sub(1, SeqCst);
            return None;
        }
        Some(InUse {
            watched: Arc::clone(watched),
            epoch: watched.epoch,
        })
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.watched
            .released_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
        self.watched.active.fetch_sub(1, Relaxed);
    }
}

/// The process's discovery client.
pub struct Discovery {
    client: DiscoveryClient<Channel>,
    /// The client's channel, shared with the identity client (one connection, one TLS setup).
    channel: Channel,
    config: ControlConfig,
    targets: Mutex<HashMap<SocketAddr, Arc<Watched>>>,
    /// Where the watches run (the admin thread's runtime).
    runtime: tokio::runtime::Handle,
    epoch: Instant,
    metrics: ControlMetrics,
    /// Streams that are receiving now: `control_connected` is 1 while any is.
    connected_streams: AtomicU32,
    /// [`IDLE_EXPIRY`], shorter in tests.
    idle_expiry: Duration,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("control", &self.config.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("--control {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("trust anchors: {0}")]
    TrustAnchors(String),
}

impl Discovery {
    /// Must be called inside `runtime` (the channel's tasks start there); connects lazily, on
    /// the first watch.
    pub fn new(
        config: ControlConfig,
        runtime: tokio::runtime::Handle,
        metrics: ControlMetrics,
    ) -> Result<Self, DiscoveryError> {
        let scheme = if config.trust_anchors.is_some() {
            "https"
        } else {
            "http"
        };
        let uri = format!("{scheme}://{}", config.addr);
        let address_error = |reason: String| DiscoveryError::Address {
            addr: config.addr.clone(),
            reason,
        };
        let mut endpoint = Channel::from_shared(uri)
            .map_err(|error| address_error(error.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        if let Some(pem) = &config.trust_anchors {
            let tls = ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                .domain_name(config.name.clone());
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|error| DiscoveryError::TrustAnchors(error.to_string()))?;
        }
        let channel = endpoint.connect_lazy();
        Ok(Self {
            client: DiscoveryClient::new(channel.clone()),
            channel,
            config,
            targets: Mutex::new(HashMap::new()),
            runtime,
            epoch: Instant::now(),
            metrics,
            connected_streams: AtomicU32::new(0),
            idle_expiry: IDLE_EXPIRY,
        })
    }

    /// The watch of `target`, started on first use; the caller holds the returned [`InUse`]
    /// while its connection is open.
    pub fn watch(&'static self, target: SocketAddr) -> InUse {
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        let watched = targets.entry(target).or_insert_with(|| {
            let (tx, known) = watch::channel(Known::Waiting);
            let watched = Arc::new(Watched {
                known,
                active: AtomicU32::new(0),
                released_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
                expired: AtomicBool::new(false),
                epoch: self.epoch,
            });
            self.runtime
                .spawn(self.follow(target, tx, Arc::clone(&watched)));
            watched
        });
        // Under the lock: `expired` sees either no use yet and a fresh release time, or this use.
        watched.active.fetch_add(1, SeqCst);
        InUse {
            watched: Arc::clone(watched),
            epoch: self.epoch,
        }
    }

    /// The channel to the control plane, for its other APIs (`remora.identity.v1`).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    pub fn metrics(&'static self) -> &'static ControlMetrics {
        &self.metrics
    }

    /// Targets watched now.
    pub fn len(&self) -> usize {
        self.targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn idle(&self, watched: &Watched) -> bool {
        watched.active.load(Relaxed) == 0
            && self.epoch.elapsed().as_millis() as u64
                >= watched.released_ms.load(Relaxed) + self.idle_expiry.as_millis() as u64
    }

    /// Follows one target until it expires: streams its snapshots, reconnecting with backoff.
    async fn follow(
        &'static self,
        target: SocketAddr,
        tx: watch::Sender<Known>,
        watched: Arc<Watched>,
    ) {
        let request = api::WatchRequest {
            target: target.to_string(),
            namespace: self.config.namespace.clone(),
            pod: self.config.pod.clone(),
        };
        let mut backoff = BACKOFF.0;
        let mut gauge: Option<Gauge> = None;
        // The target's routes, whose regular expressions the next snapshot reuses.
        let mut routes: Option<Arc<Routes>> = None;
        while !self.expired(target, &watched) {
            match self.client.clone().watch(request.clone()).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    let mut receiving = Receiving::new(self);
                    loop {
                        let next = tokio::select! {
                            next = stream.message() => next,
                            () = tokio::time::sleep(self.idle_expiry / 4) => {
                                if self.idle(&watched) {
                                    break;
                                }
                                continue;
                            }
                        };
                        match next {
                            Ok(Some(snapshot)) => {
                                receiving.started();
                                backoff = BACKOFF.0;
                                tx.send_replace(self.known(
                                    target,
                                    snapshot,
                                    &mut gauge,
                                    &mut routes,
                                ));
                            }
                            Ok(None) => {
                                debug!(destination = %target, "control plane ended the watch");
                                break;
                            }
                            Err(status) => {
                                debug!(destination = %target, %status, "watch failed");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    if matches!(*tx.borrow(), Known::Waiting) {
                        tx.send_replace(Known::Unreachable);
                        warn!(destination = %target, control = %self.config.addr, %status,
                            "control plane unreachable: forwarding to the original destination until it answers");
                    } else {
                        debug!(destination = %target, %status, "watch failed; keeping the last snapshot");
                    }
                }
            }
            if self.idle(&watched) {
                continue;
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF.1);
        }
        if let Some(gauge) = gauge {
            gauge.set(0);
        }
        debug!(destination = %target, "target unused, dropped");
    }

    /// Whether the target is unused and was dropped; checked under the map's lock so that a
    /// connection taking the target at the same moment keeps it followed.
    fn expired(&self, target: SocketAddr, watched: &Watched) -> bool {
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.idle(watched) {
            return false;
        }
        watched.expired.store(true, SeqCst);
        if watched.active.load(SeqCst) > 0 {
            // A worker took it again at this very moment.
            watched.expired.store(false, SeqCst);
            return false;
        }
        targets.remove(&target);
        true
    }

    fn known(
        &self,
        target: SocketAddr,
        snapshot: api::Snapshot,
        gauge: &mut Option<Gauge>,
        previous: &mut Option<Arc<Routes>>,
    ) -> Known {
        match snapshot.kind {
            Some(snapshot::Kind::Service(service)) => {
                let endpoints = Endpoint::from_snapshot(&service.endpoints, target);
                let handle =
                    self.metrics
                        .endpoints(&service.namespace, &service.name, service.port);
                handle.set(endpoints.len() as i64);
                let name = format!("{}/{}:{}", service.namespace, service.name, service.port);
                // Once per target at info: later snapshots (endpoint churn) at debug.
                if gauge.replace(handle).is_none() {
                    info!(destination = %target, service = %name, endpoints = endpoints.len(), "balancing over the Service's endpoints");
                } else {
                    debug!(destination = %target, service = %name, endpoints = endpoints.len(), "snapshot");
                }
                let routes = service
                    .route_table
                    .as_ref()
                    .and_then(|table| Routes::compile(table, target, previous.as_deref()))
                    .map(Arc::new);
                previous.clone_from(&routes);
                if let Some(routes) = &routes {
                    for rule in routes.rules.iter() {
                        if let Some(why) = &rule.invalid {
                            debug!(destination = %target, service = %name, route = %rule.route, reason = %why, "a rule that cannot be honoured answers 500");
                        }
                    }
                }
                let policy = Arc::new(Policy::of(service.policy.as_ref()));
                let resilience = self.metrics.resilience(&service.namespace, &service.name);
                let backend_accrual = service
                    .route_table
                    .iter()
                    .flat_map(|table| &table.backends)
                    .map(|backend| {
                        let policy = Policy::of(backend.policy.as_ref());
                        let counter = self
                            .metrics
                            .resilience(&backend.namespace, &backend.name)
                            .ejections;
                        (
                            policy.failure_accrual_consecutive,
                            policy.max_ejection_percent,
                            counter,
                        )
                    })
                    .collect();
                Known::Service(Arc::new(Service {
                    backend_accrual,
                    routes,
                    policy,
                    resilience,
                    namespace: service.namespace,
                    name: service.name,
                    port: u16::try_from(service.port).unwrap_or(target.port()),
                    protocol: AppProtocol::of(&service.app_protocol),
                    endpoints,
                }))
            }
            Some(snapshot::Kind::Passthrough(_)) | None => {
                *previous = None;
                if let Some(gauge) = gauge.take() {
                    gauge.set(0);
                }
                let identity = match snapshot.kind {
                    Some(snapshot::Kind::Passthrough(passthrough)) => passthrough.identity,
                    _ => String::new(),
                };
                Known::Passthrough(Endpoint::meshed(target, &identity).identity)
            }
        }
    }
}

/// A stream that is receiving: `control_connected` is 1 while any is.
struct Receiving {
    discovery: &'static Discovery,
    started: bool,
}

impl Receiving {
    fn new(discovery: &'static Discovery) -> Self {
        Self {
            discovery,
            started: false,
        }
    }

    fn started(&mut self) {
        if !std::mem::replace(&mut self.started, true)
            && self.discovery.connected_streams.fetch_add(1, Relaxed) == 0
        {
            self.discovery.metrics.connected.set(1);
        }
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if self.started && self.discovery.connected_streams.fetch_sub(1, Relaxed) == 1 {
            self.discovery.metrics.connected.set(0);
        }
    }
}

/// `delay` ± up to a quarter, so that many watches that failed together don't retry together.
pub(crate) fn jitter(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let quarter = delay / 4;
    delay - quarter + quarter * 2 * (nanos % 1000) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{Stream, StreamExt};
    use remora_api::discovery::discovery_server::{Discovery as DiscoveryApi, DiscoveryServer};
    use std::pin::Pin;
    use tokio_stream::wrappers::WatchStream;

    /// A control plane that answers every watch with the latest of `snapshots`, until `down`
    /// says it is down: then its streams end with an error and new ones are refused.
    struct Fake {
        snapshots: watch::Receiver<api::Snapshot>,
        down: watch::Receiver<bool>,
    }

    #[tonic::async_trait]
    impl DiscoveryApi for Fake {
        type WatchStream = Pin<Box<dyn Stream<Item = Result<api::Snapshot, tonic::Status>> + Send>>;

        async fn watch(
            &self,
            request: tonic::Request<api::WatchRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            let request = request.into_inner();
            assert_eq!(
                (request.namespace.as_str(), request.pod.as_str()),
                ("shop", "web-1")
            );
            if *self.down.borrow() {
                return Err(tonic::Status::unavailable("down"));
            }
            let mut down = self.down.clone();
            let stream = WatchStream::new(self.snapshots.clone())
                .map(Ok)
                .take_until(async move {
                    let _ = down.wait_for(|down| *down).await;
                })
                .chain(futures_util::stream::once(async {
                    Err(tonic::Status::unavailable("down"))
                }));
            Ok(tonic::Response::new(Box::pin(stream)))
        }
    }

    fn service(endpoints: &[(&str, u32)]) -> api::Snapshot {
        api::Snapshot {
            kind: Some(snapshot::Kind::Service(api::Service {
                namespace: "shop".into(),
                name: "cart".into(),
                port: 80,
                app_protocol: "http".into(),
                endpoints: endpoints
                    .iter()
                    .map(|(ip, port)| api::Endpoint {
                        ip: (*ip).into(),
                        port: *port,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
        }
    }

    /// Serves `snapshots` on `addr` while `down` is false.
    async fn serve(
        addr: SocketAddr,
        snapshots: watch::Receiver<api::Snapshot>,
        down: watch::Receiver<bool>,
    ) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(Fake { snapshots, down }))
                .serve_with_incoming(incoming),
        );
    }

    fn discovery(addr: SocketAddr) -> &'static Discovery {
        discovery_expiring(addr, IDLE_EXPIRY)
    }

    fn discovery_expiring(addr: SocketAddr, idle_expiry: Duration) -> &'static Discovery {
        let config = ControlConfig {
            addr: addr.to_string(),
            name: "unused".into(),
            trust_anchors: None,
            namespace: "shop".into(),
            pod: "web-1".into(),
        };
        let mut discovery = Discovery::new(
            config,
            tokio::runtime::Handle::current(),
            ControlMetrics::default(),
        )
        .unwrap();
        discovery.idle_expiry = idle_expiry;
        Box::leak(Box::new(discovery))
    }

    fn free_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    async fn until(known: &mut watch::Receiver<Known>, what: impl FnMut(&Known) -> bool) -> Known {
        tokio::time::timeout(Duration::from_secs(10), known.wait_for(what))
            .await
            .expect("no such snapshot within 10 s")
            .unwrap()
            .clone()
    }

    fn endpoint_count(known: &Known) -> Option<usize> {
        known.service().map(|service| service.endpoints.len())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_arrive_are_kept_while_the_control_plane_is_down_and_resume() {
        let addr = free_port();
        let (feed, snapshots) =
            watch::channel(service(&[("198.18.0.2", 8080), ("198.18.0.3", 8080)]));
        let (down, is_down) = watch::channel(false);
        serve(addr, snapshots, is_down).await;
        let discovery = discovery(addr);
        let target: SocketAddr = "198.18.0.100:80".parse().unwrap();
        let in_use = discovery.watch(target);
        let mut known = in_use.known().clone();

        let first = until(&mut known, |k| endpoint_count(k) == Some(2)).await;
        let cart = first.service().unwrap();
        assert_eq!(
            (cart.name.as_str(), cart.protocol),
            ("cart", AppProtocol::Http)
        );
        assert_eq!(discovery.metrics.connected.get(), 1);

        feed.send_replace(service(&[("198.18.0.2", 8080)]));
        until(&mut known, |k| endpoint_count(k) == Some(1)).await;

        // Down: the last snapshot stays.
        down.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), async {
            while discovery.metrics.connected.get() != 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("control_connected back to 0");
        assert_eq!(endpoint_count(&known.borrow()), Some(1));

        // Back, with a change made while it was down.
        feed.send_replace(service(&[("198.18.0.2", 8080), ("198.18.0.4", 8080)]));
        down.send_replace(false);
        until(&mut known, |k| endpoint_count(k) == Some(2)).await;
        drop(in_use);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_target_is_dropped_once_unused_and_asked_for_again_on_its_next_connection() {
        let addr = free_port();
        let (_feed, snapshots) = watch::channel(service(&[("198.18.0.2", 8080)]));
        let (_down, is_down) = watch::channel(false);
        serve(addr, snapshots, is_down).await;
        let expiry = Duration::from_millis(400);
        let discovery = discovery_expiring(addr, expiry);
        let target: SocketAddr = "198.18.0.100:80".parse().unwrap();
        let gauge = || discovery.metrics.endpoints("shop", "cart", 80).get();

        let first = discovery.watch(target);
        let mut known = first.known().clone();
        until(&mut known, |k| endpoint_count(k) == Some(1)).await;
        assert_eq!((discovery.len(), gauge()), (1, 1));

        // In use for longer than the expiry: kept.
        tokio::time::sleep(expiry * 3).await;
        assert_eq!(discovery.len(), 1, "a target in use never expires");
        let again = InUse::again(&first.watched()).expect("still followed");
        drop(first);
        drop(again);

        // Unused: dropped after the expiry, and its gauge with it.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !discovery.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the unused target dropped");
        assert_eq!(gauge(), 0);
        assert!(known.has_changed().is_err(), "its watch is closed");

        // The next connection asks again.
        let next = discovery.watch(target);
        let mut known = next.known().clone();
        until(&mut known, |k| endpoint_count(k) == Some(1)).await;
        assert_eq!(discovery.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_control_plane_fails_open_at_once() {
        let discovery = discovery(free_port());
        let in_use = discovery.watch("198.18.0.100:80".parse().unwrap());
        let mut known = in_use.known().clone();
        let started = Instant::now();
        until(&mut known, |k| matches!(k, Known::Unreachable)).await;
        assert!(
            started.elapsed() < FIRST_SNAPSHOT_WAIT,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn app_protocols_name_the_path() {
        for http in ["http", "http2", "kubernetes.io/h2c", "grpc"] {
            assert_eq!(AppProtocol::of(http), AppProtocol::Http, "{http}");
        }
        for opaque in [
            "tcp",
            "mysql",
            "redis",
            "kubernetes.io/ws",
            "kubernetes.io/h2",
        ] {
            assert_eq!(AppProtocol::of(opaque), AppProtocol::Opaque, "{opaque}");
        }
        assert_eq!(AppProtocol::of(""), AppProtocol::Detect);
    }
}
