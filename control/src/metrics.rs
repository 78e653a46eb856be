//! remora-control's Prometheus metrics: objects read, open proxy streams, snapshots sent, and how
//! long a change takes to reach every stream.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::objects::ObjectSet;

/// The content type of what [`Metrics::encode`] writes (prometheus-client emits OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Push latency buckets in seconds: a change normally reaches every stream within milliseconds;
/// the SPEC's bound is 1 s, so a few buckets past it show how far off a bad case is.
const PUSH_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Why a certificate was not issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// No reviewer or no CA: this control plane issues none.
    NotConfigured,
    InvalidCsr,
    Unauthenticated,
    NotServiceAccount,
    NotRemoraPod,
    /// The TokenReview could not be made (the API down): the proxy asks again.
    ReviewUnavailable,
    Internal,
}

impl Rejection {
    const ALL: [Rejection; 7] = [
        Rejection::NotConfigured,
        Rejection::InvalidCsr,
        Rejection::Unauthenticated,
        Rejection::NotServiceAccount,
        Rejection::NotRemoraPod,
        Rejection::ReviewUnavailable,
        Rejection::Internal,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejection::NotConfigured => "not_configured",
            Rejection::InvalidCsr => "invalid_csr",
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::NotServiceAccount => "not_service_account",
            Rejection::NotRemoraPod => "not_remora_pod",
            Rejection::ReviewUnavailable => "review_unavailable",
            Rejection::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    objects: Family<KindLabels, Gauge>,
    watches: Gauge,
    snapshots_sent: Counter,
    push_duration: Histogram,
    certificates_issued: Counter,
    certificates_refused: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remora_control");
        let objects = Family::<KindLabels, Gauge>::default();
        for (kind, _) in ObjectSet::default().counts() {
            let _ = objects.get_or_create(&KindLabels { kind });
        }
        registry.register(
            "objects",
            "Objects the index is built from, by kind",
            objects.clone(),
        );
        let watches = Gauge::default();
        registry.register(
            "watches",
            "Open Watch streams (one per proxy and target)",
            watches.clone(),
        );
        let snapshots_sent = Counter::default();
        registry.register(
            "snapshots_sent",
            "Snapshots written to Watch streams, the first of each stream included",
            snapshots_sent.clone(),
        );
        let push_duration = Histogram::new(PUSH_BUCKETS);
        registry.register(
            "push_duration_seconds",
            "From a change of the objects seen to every open stream having its new snapshot \
             written (or found unchanged), in seconds",
            push_duration.clone(),
        );
        let certificates_issued = Counter::default();
        registry.register(
            "certificates_issued",
            "Workload certificates issued (remora.identity.v1 Certify)",
            certificates_issued.clone(),
        );
        let certificates_refused = Family::<ReasonLabels, Counter>::default();
        for rejection in Rejection::ALL {
            let _ = certificates_refused.get_or_create(&ReasonLabels {
                reason: rejection.label(),
            });
        }
        registry.register(
            "certificates_refused",
            "Certify requests answered without a certificate, by reason",
            certificates_refused.clone(),
        );
        Self {
            registry,
            objects,
            watches,
            snapshots_sent,
            push_duration,
            certificates_issued,
            certificates_refused,
        }
    }

    pub fn set_objects(&self, objects: &ObjectSet) {
        for (kind, count) in objects.counts() {
            self.objects
                .get_or_create(&KindLabels { kind })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    pub fn watch_opened(&self) {
        self.watches.inc();
    }

    pub fn watch_closed(&self) {
        self.watches.dec();
    }

    pub fn watches(&self) -> i64 {
        self.watches.get()
    }

    pub fn snapshot_sent(&self) {
        self.snapshots_sent.inc();
    }

    pub fn snapshots_sent(&self) -> u64 {
        self.snapshots_sent.get()
    }

    pub fn pushed(&self, elapsed: Duration) {
        self.push_duration.observe(elapsed.as_secs_f64());
    }

    pub fn certificate_issued(&self) {
        self.certificates_issued.inc();
    }

    pub fn certificates_issued(&self) -> u64 {
        self.certificates_issued.get()
    }

    pub fn certificate_refused(&self, rejection: Rejection) {
        self.certificates_refused
            .get_or_create(&ReasonLabels {
                reason: rejection.label(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_from_the_start() {
        let text = Metrics::new().encode();
        for line in [
            "remora_control_objects{kind=\"Service\"} 0",
            "remora_control_objects{kind=\"EndpointSlice\"} 0",
            "remora_control_objects{kind=\"HTTPRoute\"} 0",
            "remora_control_objects{kind=\"GRPCRoute\"} 0",
            "remora_control_objects{kind=\"ReferenceGrant\"} 0",
            "remora_control_watches 0",
            "remora_control_snapshots_sent_total 0",
            "remora_control_push_duration_seconds_count 0",
            "remora_control_certificates_issued_total 0",
            "remora_control_certificates_refused_total{reason=\"invalid_csr\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
