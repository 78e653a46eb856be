//! The webhook's Prometheus metrics: reviews by result and how long they took.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::review::Outcome;
use crate::tls::ReloadEvent;

/// The content type of what [`Metrics::encode`] writes (prometheus-client emits OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Review latency buckets in seconds: a review is normally well under a millisecond, and the
/// API server gives up after `timeoutSeconds` (at most a few seconds), so nothing past 5 s matters.
const DURATION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The `result` label of `remora_injector_reviews_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReviewResult {
    Injected,
    Skipped,
    Denied,
    /// The body was not an AdmissionReview or was too large (HTTP 400 / 413).
    Error,
}

impl ReviewResult {
    pub const ALL: [ReviewResult; 4] = [Self::Injected, Self::Skipped, Self::Denied, Self::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped => "skipped",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

impl From<Outcome> for ReviewResult {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Injected => Self::Injected,
            Outcome::Skipped => Self::Skipped,
            Outcome::Denied => Self::Denied,
        }
    }
}

impl EncodeLabelValue for ReviewResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReviewLabels {
    result: ReviewResult,
}

/// The `result` label of `remora_injector_tls_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// New certificate files were loaded and are being served.
    Loaded,
    /// New certificate files could not be used; the previous certificate stays.
    Rejected,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Rejected => "rejected",
        }
    }
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

/// The registry and the handles the server updates.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reviews: Family<ReviewLabels, Counter>,
    review_duration: Histogram,
    tls_reloads: Family<ReloadLabels, Counter>,
    tls_expiration: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remora_injector");
        let reviews = Family::<ReviewLabels, Counter>::default();
        // Every result is present from the start, so a dashboard's rate() has a zero to start from.
        for result in ReviewResult::ALL {
            let _ = reviews.get_or_create(&ReviewLabels { result });
        }
        registry.register(
            "reviews",
            "AdmissionReview requests answered, by result",
            reviews.clone(),
        );
        let review_duration = Histogram::new(DURATION_BUCKETS);
        registry.register(
            "review_duration_seconds",
            "Time from a complete request body to a response, in seconds",
            review_duration.clone(),
        );
        let tls_reloads = Family::<ReloadLabels, Counter>::default();
        for result in [ReloadResult::Loaded, ReloadResult::Rejected] {
            let _ = tls_reloads.get_or_create(&ReloadLabels { result });
        }
        registry.register(
            "tls_reloads",
            "Changes of the TLS certificate files, by whether they were loaded or rejected",
            tls_reloads.clone(),
        );
        let tls_expiration = Gauge::default();
        registry.register(
            "tls_certificate_expiration_timestamp_seconds",
            "When the served certificate expires (notAfter, Unix seconds); 0 before one is loaded",
            tls_expiration.clone(),
        );
        Self {
            registry,
            reviews,
            review_duration,
            tls_reloads,
            tls_expiration,
        }
    }

    /// Counts one answered request and how long it took.
    pub fn record(&self, result: ReviewResult, elapsed: Duration) {
        self.reviews.get_or_create(&ReviewLabels { result }).inc();
        self.review_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one change of the certificate files; `expires` is the new certificate's notAfter
    /// in Unix seconds, when it was loaded and could be read.
    pub fn record_reload(&self, result: ReloadResult, expires: Option<i64>) {
        self.tls_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
        if let Some(expires) = expires {
            self.tls_expiration.set(expires);
        }
    }

    /// What counts the reloads of a [`CertReloader`](crate::tls::CertReloader), for its
    /// `with_observer`.
    pub fn reload_observer(self: &Arc<Self>) -> impl Fn(ReloadEvent) + Send + 'static {
        let metrics = Arc::clone(self);
        move |event| match event {
            ReloadEvent::Loaded { not_after } => {
                metrics.record_reload(ReloadResult::Loaded, not_after)
            }
            ReloadEvent::Rejected => metrics.record_reload(ReloadResult::Rejected, None),
        }
    }

    /// The current value of `remora_injector_tls_reloads_total{result}`.
    pub fn reloads(&self, result: ReloadResult) -> u64 {
        self.tls_reloads
            .get_or_create(&ReloadLabels { result })
            .get()
    }

    /// The current value of `remora_injector_reviews_total{result}`.
    pub fn reviews(&self, result: ReviewResult) -> u64 {
        self.reviews.get_or_create(&ReviewLabels { result }).get()
    }

    /// The exposition text served at `/metrics` (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
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
    fn every_result_is_exposed_from_the_start() {
        let text = Metrics::new().encode();
        for result in ReviewResult::ALL {
            let line = format!(
                "remora_injector_reviews_total{{result=\"{}\"}} 0",
                result.as_str()
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.contains("# TYPE remora_injector_review_duration_seconds histogram"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn record_moves_the_counter_and_the_histogram() {
        let metrics = Metrics::new();
        metrics.record(ReviewResult::Injected, Duration::from_micros(300));
        metrics.record(ReviewResult::Error, Duration::from_micros(50));
        assert_eq!(metrics.reviews(ReviewResult::Injected), 1);
        assert_eq!(metrics.reviews(ReviewResult::Error), 1);
        assert_eq!(metrics.reviews(ReviewResult::Denied), 0);
        let text = metrics.encode();
        assert!(
            text.contains("remora_injector_review_duration_seconds_count 2"),
            "{text}"
        );
        // 300 µs falls in the 0.0005 bucket, 50 µs in the first one.
        assert!(text.contains("remora_injector_review_duration_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("remora_injector_review_duration_seconds_bucket{le=\"0.0005\"} 2"));
    }

    #[test]
    fn reloads_and_the_expiry_are_exported() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        assert!(text.contains("remora_injector_tls_reloads_total{result=\"rejected\"} 0"));
        assert!(text.contains("remora_injector_tls_certificate_expiration_timestamp_seconds 0"));
        metrics.record_reload(ReloadResult::Loaded, Some(1_900_000_000));
        metrics.record_reload(ReloadResult::Rejected, None);
        let text = metrics.encode();
        assert!(text.contains("remora_injector_tls_reloads_total{result=\"loaded\"} 1"));
        assert!(text.contains("remora_injector_tls_reloads_total{result=\"rejected\"} 1"));
        assert!(
            text.contains(
                "remora_injector_tls_certificate_expiration_timestamp_seconds 1900000000"
            ),
            "{text}"
        );
    }
}
