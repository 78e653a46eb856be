//! AdmissionReview in, AdmissionReview out. (Interface stub: the injection-core work fills this in.)

use crate::config::Config;

/// Which of the two webhooks a review came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookPath {
    /// `POST /inject`: namespaces labelled `remora.io/inject=enabled`; inject unless the pod opts out.
    Inject,
    /// `POST /inject/opt-in`: every other namespace; inject only a pod that opts in.
    OptIn,
}

/// What a review decided, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped,
    Denied,
}

/// A decided review: the whole AdmissionReview response body.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub response: serde_json::Value,
    pub outcome: Outcome,
}

/// A body that is not an AdmissionReview: answered with HTTP 400 and this message.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    NotAReview(String),
}

pub fn review(_body: &[u8], _path: WebhookPath, _config: &Config) -> Result<Reviewed, ReviewError> {
    Err(ReviewError::NotAReview("not implemented yet".into()))
}
