//! The proxy's Prometheus metrics, with every per-connection and per-request handle created up
//! front so the data path only does relaxed atomic adds: no label hashing, no locks. The
//! per-request ones are sharded by worker thread, so two workers never write the same cache line.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{self, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values are `http1` and `h2`
pub enum Protocol {
    http1,
    h2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Flow {
    rx,
    tx,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    namespace: String,
    service: String,
    route: String,
    status_code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RetryLabels {
    namespace: String,
    service: String,
    reason: RetryReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceNameLabels {
    namespace: String,
    service: String,
}

/// Why a request was sent again: the `reason` label of `retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// Any 5xx answer (`retry-on: 5xx`).
    Status5xx,
    /// 502, 503 or 504 (`gateway-error`).
    GatewayError,
    /// The connection or stream failed after the request left (`reset`).
    Reset,
    /// A status code listed by `retriable-status-codes` or a route's `retry.codes`.
    Status,
    /// A `grpc-status` listed by `grpc=`.
    Grpc,
    /// The request never reached the app (connect failure, HTTP/2 stream left unprocessed):
    /// always safe, outside the budget.
    Connect,
}

impl RetryReason {
    pub const ALL: [RetryReason; 6] = [
        RetryReason::Status5xx,
        RetryReason::GatewayError,
        RetryReason::Reset,
        RetryReason::Status,
        RetryReason::Grpc,
        RetryReason::Connect,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Status5xx => "5xx",
            RetryReason::GatewayError => "gateway-error",
            RetryReason::Reset => "reset",
            RetryReason::Status => "status",
            RetryReason::Grpc => "grpc",
            RetryReason::Connect => "connect",
        }
    }
}

impl EncodeLabelValue for RetryReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// One Service's resilience counters, made once per snapshot, never hashed per request.
#[derive(Debug, Clone, Default)]
pub struct ResilienceMetrics {
    /// `retries_total`, indexed as [`RetryReason::ALL`].
    retries: [Counter; 6],
    pub budget_exhausted: Counter,
    pub ejections: Counter,
    pub queue_rejections: Counter,
}

impl ResilienceMetrics {
    pub fn retried(&self, reason: RetryReason) {
        let index = RetryReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.retries[index].inc();
    }

    pub fn retries(&self, reason: RetryReason) -> u64 {
        let index = RetryReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.retries[index].get()
    }
}

/// What the proxy knows from the control plane, and the requests it balanced.
#[derive(Debug, Clone, Default)]
pub struct ControlMetrics {
    /// 1 while a watch is receiving from the control plane.
    pub connected: Gauge,
    endpoints: Family<ServiceLabels, Gauge>,
    routes: Family<RouteLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    budget_exhausted: Family<ServiceNameLabels, Counter>,
    ejections: Family<ServiceNameLabels, Counter>,
    queue_rejections: Family<ServiceNameLabels, Counter>,
}

impl ControlMetrics {
    /// The `balancer_endpoints` handle of one Service port.
    pub fn endpoints(&self, namespace: &str, service: &str, port: u32) -> Gauge {
        self.endpoints
            .get_or_create(&ServiceLabels {
                namespace: namespace.to_string(),
                service: service.to_string(),
                port: u16::try_from(port).unwrap_or(0),
            })
            .clone()
    }

    /// The resilience counters of one Service (`retries_total`, `retry_budget_exhausted_total`,
    /// `endpoint_ejections_total`).
    pub fn resilience(&self, namespace: &str, service: &str) -> ResilienceMetrics {
        let retries = RetryReason::ALL.map(|reason| {
            self.retries
                .get_or_create(&RetryLabels {
                    namespace: namespace.to_string(),
                    service: service.to_string(),
                    reason,
                })
                .clone()
        });
        let labels = ServiceNameLabels {
            namespace: namespace.to_string(),
            service: service.to_string(),
        };
        let budget_exhausted = self.budget_exhausted.get_or_create(&labels).clone();
        let ejections = self.ejections.get_or_create(&labels).clone();
        let queue_rejections = self.queue_rejections.get_or_create(&labels).clone();
        ResilienceMetrics {
            retries,
            budget_exhausted,
            ejections,
            queue_rejections,
        }
    }

    /// The `route_requests_total` handle of one Service, route and status: made once per
    /// status by the caller's cache, never hashed per request.
    pub fn route_requests(
        &self,
        namespace: &str,
        service: &str,
        route: &str,
        status_code: u16,
    ) -> Counter {
        self.routes
            .get_or_create(&RouteLabels {
                namespace: namespace.to_string(),
                service: service.to_string(),
                route: route.to_string(),
                status_code,
            })
            .clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    direction: Direction,
    flow: Flow,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    direction: Direction,
    protocol: Protocol,
    status_code: u16,
    tls: bool,
    client_id: String,
}

/// `tcp_connections_total`'s labels: whether the client came over mTLS, and as whom.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionLabels {
    direction: Direction,
    tls: bool,
    client_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsDialLabels {
    direction: Direction,
    tls: bool,
}

/// Distinct client identities given series of their own in one direction; later ones share
/// `client_id="other"`. Identities are one per meshed ServiceAccount that calls this pod.
const MAX_CLIENT_IDS: usize = 256;

/// Shards of the per-request metrics: workers beyond this many share shards (still correct).
const SHARDS: usize = 8;

thread_local! {
    /// This thread's shard of the per-request metrics: its worker index (0 off the workers).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread write to shard `worker` (mod [`SHARDS`]); run once per worker.
pub fn use_shard(worker: usize) {
    SHARD.set(worker % SHARDS);
}

fn shard() -> usize {
    SHARD.get()
}

/// An atomic on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// A counter value spread over per-worker cache lines; reads add the shards up. Increments stay
/// on the writing core, where a shared atomic bounced its line between the workers' cores on
/// every request.
#[derive(Debug, Default)]
pub struct Sharded([Padded<AtomicU64>; SHARDS]);

impl counter::Atomic<u64> for Sharded {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    fn inc_by(&self, v: u64) -> u64 {
        self.0[shard()].0.fetch_add(v, Ordering::Relaxed)
    }

    fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|cell| cell.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// A counter written on the request path.
pub type HotCounter = Counter<u64, Sharded>;

/// Request latency buckets in seconds: sub-millisecond hops inside a node up to slow backends.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram made of atomics, one set per worker shard. prometheus-client's own takes a lock
/// on every observation, which would be the only lock on the request path.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    shards: [Padded<HistogramShard>; SHARDS],
}

#[derive(Debug, Default)]
struct HistogramShard {
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS`], then the `+Inf` overflow.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let shard = &self.shards[shard()].0;
        shard.buckets[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: [(f64, u64); LATENCY_BUCKETS.len() + 1] = std::array::from_fn(|i| {
            let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            let count = self
                .shards
                .iter()
                .map(|shard| shard.0.buckets[i].load(Ordering::Relaxed));
            (bound, count.sum())
        });
        let sum_nanos = self.shards.iter().fold(0u64, |sum, shard| {
            sum.wrapping_add(shard.0.sum_nanos.load(Ordering::Relaxed))
        });
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = Duration::from_nanos(sum_nanos).as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The handles one direction's connections and requests update.
#[derive(Debug)]
pub struct DirectionMetrics {
    pub direction: Direction,
    /// The counts of plaintext clients (`tls="false"`, `client_id=""`); an outbound client,
    /// the pod's own app, is always one.
    pub plain: PeerMetrics,
    /// Those of each mTLS client identity, made on its first connection.
    peers: Mutex<HashMap<String, &'static PeerMetrics>>,
    connections: Family<ConnectionLabels, Counter>,
    /// Upstream connections made: with mTLS (`tls="true"`), or plaintext.
    pub dials_tls: Counter,
    pub dials_plain: Counter,
    /// Plaintext dials to a meshed endpoint, for want of a workload certificate.
    pub plaintext_to_meshed: Counter,
    pub open: Gauge,
    pub rx: HotCounter,
    pub tx: HotCounter,
    pub connect_errors: Counter,
    /// Connections whose client sent nothing within the detection wait.
    pub detect_timeouts: Counter,
    /// Connections carried as opaque without the wait: their destination was known to speak
    /// first.
    pub detect_skipped: Counter,
    /// Destinations remembered as speaking first (see `detect::ServerFirst`).
    pub server_first_destinations: Gauge,
    pub latency: Arc<LatencyHistogram>,
    requests: Family<RequestLabels, HotCounter>,
}

/// One kind of client's connection and request counts: plaintext, or one mTLS identity. A
/// connection picks its own once; its requests then count without a lookup.
#[derive(Debug)]
pub struct PeerMetrics {
    pub connections: Counter,
    direction: Direction,
    tls: bool,
    client_id: String,
    requests: Family<RequestLabels, HotCounter>,
    /// `requests_total` handles per protocol and status code 100..=599, made on first use and
    /// then read without touching the family's lock and hash map.
    by_status: [Box<[OnceLock<HotCounter>]>; 2],
}

impl DirectionMetrics {
    /// Counts a request of a plaintext client.
    pub fn count_request(&self, protocol: Protocol, status: u16) {
        self.plain.count_request(protocol, status);
    }

    /// The counts of mTLS clients that are `client_id` ("" when their certificate names none).
    /// Takes a lock: once per mTLS connection, never per request.
    pub fn peer(&'static self, client_id: &str) -> &'static PeerMetrics {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(peer) = peers.get(client_id) {
            return peer;
        }
        let key = if peers.len() < MAX_CLIENT_IDS {
            client_id
        } else {
            "other"
        };
        if let Some(peer) = peers.get(key) {
            return peer;
        }
        // Leaked: a series, once shown, stays for the life of the process, and there are at
        // most MAX_CLIENT_IDS of them.
        let peer: &'static PeerMetrics = Box::leak(Box::new(PeerMetrics::new(
            self.direction,
            true,
            key,
            &self.connections,
            &self.requests,
        )));
        peers.insert(key.to_owned(), peer);
        peer
    }
}

impl PeerMetrics {
    fn new(
        direction: Direction,
        tls: bool,
        client_id: &str,
        connections: &Family<ConnectionLabels, Counter>,
        requests: &Family<RequestLabels, HotCounter>,
    ) -> Self {
        let labels = ConnectionLabels {
            direction,
            tls,
            client_id: client_id.to_owned(),
        };
        let connections = connections.get_or_create(&labels).clone();
        Self {
            connections,
            direction,
            tls,
            client_id: client_id.to_owned(),
            requests: requests.clone(),
            by_status: std::array::from_fn(|_| (100..600).map(|_| OnceLock::new()).collect()),
        }
    }

    pub fn count_request(&self, protocol: Protocol, status: u16) {
        let table = &self.by_status[protocol as usize];
        match table.get(usize::from(status).wrapping_sub(100)) {
            Some(slot) => slot
                .get_or_init(|| self.request_counter(protocol, status))
                .inc(),
            None => self.request_counter(protocol, status).inc(),
        };
    }

    fn request_counter(&self, protocol: Protocol, status_code: u16) -> HotCounter {
        self.requests
            .get_or_create(&RequestLabels {
                direction: self.direction,
                protocol,
                status_code,
                tls: self.tls,
                client_id: self.client_id.clone(),
            })
            .clone()
    }
}

/// The registry and both directions' handles.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub inbound: DirectionMetrics,
    pub outbound: DirectionMetrics,
    pub control: ControlMetrics,
    /// Inbound HTTP requests answered 429 by `--inbound-rate-limit`.
    pub rate_limited: Counter,
    /// The workload certificate's notAfter in Unix seconds; 0 without one.
    pub identity_expiration: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remora_proxy");
        let connections = Family::<ConnectionLabels, Counter>::default();
        let dials = Family::<TlsDialLabels, Counter>::default();
        let plaintext_to_meshed = Family::<DirectionLabels, Counter>::default();
        let open = Family::<DirectionLabels, Gauge>::default();
        let bytes = Family::<BytesLabels, HotCounter>::default();
        let requests = Family::<RequestLabels, HotCounter>::default();
        let latency = Family::<DirectionLabels, SharedHistogram>::default();
        let connect_errors = Family::<DirectionLabels, Counter>::default();
        let detect_timeouts = Family::<DirectionLabels, Counter>::default();
        let detect_skipped = Family::<DirectionLabels, Counter>::default();
        let server_first = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "tcp_connections",
            "TCP connections accepted",
            connections.clone(),
        );
        registry.register(
            "upstream_connections",
            "Connections made to destinations, with mTLS (a meshed pod) or in plaintext",
            dials.clone(),
        );
        registry.register(
            "plaintext_to_meshed",
            "Connections made in plaintext to a meshed pod, for want of a workload certificate",
            plaintext_to_meshed.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "TCP connections currently open",
            open.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Bytes received from (rx) and sent to (tx) the connecting client",
            bytes.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests answered, by status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from an HTTP request to its response headers",
            latency.clone(),
        );
        registry.register(
            "connect_errors",
            "Connections to a destination that failed or timed out",
            connect_errors.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Inbound HTTP requests answered 429 over --inbound-rate-limit",
            rate_limited.clone(),
        );
        // Beyond the SPEC's list: what server-first protocols on unlisted ports cost.
        registry.register(
            "detect_timeouts",
            "Connections whose client sent nothing within the protocol-detection wait (carried \
             as opaque TCP, the destination then remembered as server-first)",
            detect_timeouts.clone(),
        );
        registry.register(
            "detect_skipped",
            "Connections carried as opaque TCP without the protocol-detection wait, their \
             destination remembered as server-first",
            detect_skipped.clone(),
        );
        registry.register(
            "server_first_destinations",
            "Destinations remembered as server-first (held a few minutes, a bounded number)",
            server_first.clone(),
        );
        let identity_expiration = Gauge::default();
        registry.register(
            "identity_expiration_timestamp_seconds",
            "When the workload certificate in force expires (its notAfter, Unix seconds); 0 \
             without one",
            identity_expiration.clone(),
        );
        let control = ControlMetrics::default();
        registry.register(
            "control_connected",
            "1 while the proxy receives from the control plane (remora-control), else 0",
            control.connected.clone(),
        );
        registry.register(
            "balancer_endpoints",
            "Ready endpoints known for a Service port this pod sends to",
            control.endpoints.clone(),
        );
        registry.register(
            "route_requests",
            "Outbound HTTP requests to Services, by route and status code",
            control.routes.clone(),
        );
        registry.register(
            "retries",
            "Outbound requests to Services sent again, by reason (connect: never reached the \
             app, outside the retry budget)",
            control.retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries a Service's policy asked for that its retry budget refused",
            control.budget_exhausted.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Endpoints taken out of balancing after consecutive failures (failure accrual)",
            control.ejections.clone(),
        );
        registry.register(
            "queue_rejections",
            "Requests to a Service with no ready endpoint answered 503 because its queue was \
             full or their wait ran out",
            control.queue_rejections.clone(),
        );
        // One `let` per handle: get_or_create returns a lock guard, and guards kept alive as
        // temporaries of one struct expression would deadlock on the same family.
        let direction_metrics = |direction| {
            let labels = DirectionLabels { direction };
            let flow = |flow| BytesLabels { direction, flow };
            let plain = PeerMetrics::new(direction, false, "", &connections, &requests);
            let dial = |tls| TlsDialLabels { direction, tls };
            let dials_tls = dials.get_or_create(&dial(true)).clone();
            let dials_plain = dials.get_or_create(&dial(false)).clone();
            let plaintext_to_meshed_handle = plaintext_to_meshed.get_or_create(&labels).clone();
            let open_handle = open.get_or_create(&labels).clone();
            let rx = bytes.get_or_create(&flow(Flow::rx)).clone();
            let tx = bytes.get_or_create(&flow(Flow::tx)).clone();
            let connect_errors_handle = connect_errors.get_or_create(&labels).clone();
            let detect_timeouts_handle = detect_timeouts.get_or_create(&labels).clone();
            let detect_skipped_handle = detect_skipped.get_or_create(&labels).clone();
            let server_first_handle = server_first.get_or_create(&labels).clone();
            let latency_handle = latency.get_or_create(&labels).0.clone();
            DirectionMetrics {
                direction,
                plain,
                peers: Mutex::default(),
                connections: connections.clone(),
                dials_tls,
                dials_plain,
                plaintext_to_meshed: plaintext_to_meshed_handle,
                open: open_handle,
                rx,
                tx,
                connect_errors: connect_errors_handle,
                detect_timeouts: detect_timeouts_handle,
                detect_skipped: detect_skipped_handle,
                server_first_destinations: server_first_handle,
                latency: latency_handle,
                requests: requests.clone(),
            }
        };
        Self {
            inbound: direction_metrics(Direction::Inbound),
            outbound: direction_metrics(Direction::Outbound),
            control,
            rate_limited,
            identity_expiration,
            registry,
        }
    }

    pub fn direction(&self, direction: Direction) -> &DirectionMetrics {
        match direction {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// A [`LatencyHistogram`] shared between the registry and the data path.
#[derive(Debug, Clone, Default)]
pub struct SharedHistogram(pub Arc<LatencyHistogram>);

impl TypedMetric for SharedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for SharedHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pin_project_lite::pin_project! {
    /// A client connection that adds what it reads and writes to its direction's byte counters
    /// as it goes, so long-lived connections show up before they close.
    pub struct CountingIo<T> {
        #[pin]
        inner: T,
        rx: HotCounter,
        tx: HotCounter,
    }
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, metrics: &DirectionMetrics) -> Self {
        Self {
            inner,
            rx: metrics.rx.clone(),
            tx: metrics.tx.clone(),
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let poll = this.inner.poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.rx.inc_by(read as u64);
        }
        poll
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.tx.inc_by(n as u64);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            this.tx.inc_by(n as u64);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_written_by_different_workers_add_up() {
        let metrics = Metrics::new();
        std::thread::scope(|scope| {
            for worker in 0..(SHARDS + 3) {
                let metrics = &metrics;
                scope.spawn(move || {
                    use_shard(worker);
                    for _ in 0..1000 {
                        metrics.outbound.rx.inc_by(2);
                        metrics.outbound.count_request(Protocol::http1, 200);
                        metrics.outbound.latency.observe(Duration::from_micros(300));
                    }
                });
            }
        });
        let text = metrics.encode();
        let workers = SHARDS as u64 + 3;
        for line in [
            format!("remora_proxy_tcp_bytes_total{{direction=\"outbound\",flow=\"rx\"}} {}", 2000 * workers),
            format!("remora_proxy_requests_total{{direction=\"outbound\",protocol=\"http1\",status_code=\"200\",tls=\"false\",client_id=\"\"}} {}", 1000 * workers),
            format!("remora_proxy_request_duration_seconds_bucket{{le=\"0.0005\",direction=\"outbound\"}} {}", 1000 * workers),
            format!("remora_proxy_request_duration_seconds_count{{direction=\"outbound\"}} {}", 1000 * workers),
        ] {
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn mtls_clients_count_under_their_identity_and_their_number_is_bounded() {
        let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let peer = metrics.inbound.peer(web);
        assert!(std::ptr::eq(peer, metrics.inbound.peer(web)), "made once");
        peer.connections.inc();
        peer.count_request(Protocol::h2, 200);
        metrics.inbound.plain.connections.inc();
        for n in 0..MAX_CLIENT_IDS + 10 {
            metrics
                .inbound
                .peer(&format!("spiffe://cluster.local/ns/n{n}/sa/a"));
        }
        metrics.outbound.dials_tls.inc();
        let text = metrics.encode();
        for line in [
            format!("remora_proxy_tcp_connections_total{{direction=\"inbound\",tls=\"true\",client_id=\"{web}\"}} 1"),
            "remora_proxy_tcp_connections_total{direction=\"inbound\",tls=\"false\",client_id=\"\"} 1".to_owned(),
            format!("remora_proxy_requests_total{{direction=\"inbound\",protocol=\"h2\",status_code=\"200\",tls=\"true\",client_id=\"{web}\"}} 1"),
            "remora_proxy_tcp_connections_total{direction=\"inbound\",tls=\"true\",client_id=\"other\"} 0".to_owned(),
            "remora_proxy_upstream_connections_total{direction=\"outbound\",tls=\"true\"} 1".to_owned(),
        ] {
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        let series = text
            .lines()
            .filter(|line| {
                line.starts_with(
                    "remora_proxy_tcp_connections_total{direction=\"inbound\",tls=\"true\"",
                )
            })
            .count();
        assert_eq!(
            series,
            MAX_CLIENT_IDS + 1,
            "the identities beyond the bound share one series"
        );
    }

    #[test]
    fn the_exposition_has_the_spec_names() {
        let metrics = Metrics::new();
        metrics.outbound.plain.connections.inc();
        metrics.outbound.count_request(Protocol::h2, 200);
        metrics.outbound.count_request(Protocol::h2, 200);
        metrics.inbound.count_request(Protocol::http1, 502);
        metrics.inbound.count_request(Protocol::http1, 999);
        metrics.inbound.latency.observe(Duration::from_millis(3));
        metrics.inbound.latency.observe(Duration::from_secs(60));
        metrics.rate_limited.inc();
        let text = metrics.encode();
        for line in [
            "remora_proxy_tcp_connections_total{direction=\"outbound\",tls=\"false\",client_id=\"\"} 1",
            "remora_proxy_tcp_open_connections{direction=\"inbound\"} 0",
            "remora_proxy_tcp_bytes_total{direction=\"outbound\",flow=\"rx\"} 0",
            "remora_proxy_requests_total{direction=\"outbound\",protocol=\"h2\",status_code=\"200\",tls=\"false\",client_id=\"\"} 2",
            "remora_proxy_requests_total{direction=\"inbound\",protocol=\"http1\",status_code=\"502\",tls=\"false\",client_id=\"\"} 1",
            "remora_proxy_requests_total{direction=\"inbound\",protocol=\"http1\",status_code=\"999\",tls=\"false\",client_id=\"\"} 1",
            "remora_proxy_request_duration_seconds_bucket{le=\"0.005\",direction=\"inbound\"} 1",
            "remora_proxy_request_duration_seconds_bucket{le=\"+Inf\",direction=\"inbound\"} 2",
            "remora_proxy_request_duration_seconds_count{direction=\"inbound\"} 2",
            "remora_proxy_connect_errors_total{direction=\"inbound\"} 0",
            "remora_proxy_rate_limited_total 1",
            "remora_proxy_detect_timeouts_total{direction=\"outbound\"} 0",
            "remora_proxy_detect_skipped_total{direction=\"inbound\"} 0",
            "remora_proxy_server_first_destinations{direction=\"outbound\"} 0",
            "remora_proxy_identity_expiration_timestamp_seconds 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
