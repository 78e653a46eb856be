//! The `remora.identity.v1.Identity` service: a proxy's CSR and projected token in, a workload
//! certificate out, whose only SAN is the SPIFFE URI of the ServiceAccount the token review
//! names — never anything the CSR asks for.

pub mod ca;
pub mod review;
#[cfg(feature = "cluster")]
pub mod secret;
pub mod serving;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rcgen::SubjectPublicKeyInfo;
use remora_api::identity::identity_server::{Identity, IdentityServer};
use remora_api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::metrics::{Metrics, Rejection};
use crate::server::Hub;
use ca::Ca;
use review::{ReviewError, Reviewed, StaticTokens};

/// The trust domain when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// A workload certificate's lifetime when none is given.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A CSR larger than this is no CSR a proxy sends (an RSA-4096 one is under 2 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// The CA currently signing, shared with whatever loads it (files re-read, the Secret).
pub type CaSlot = Arc<ArcSwapOption<Ca>>;

/// Who reviews tokens.
#[derive(Debug)]
pub enum Reviewer {
    /// `--identity-tokens FILE`.
    Tokens(StaticTokens),
    /// TokenReview by the Kubernetes API; the pod must also be a remora pod.
    #[cfg(feature = "cluster")]
    Api(review::cluster::TokenReviewer),
}

impl Reviewer {
    async fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
        match self {
            Reviewer::Tokens(tokens) => tokens.review(token),
            #[cfg(feature = "cluster")]
            Reviewer::Api(api) => api.review(token).await,
        }
    }

    /// Whether the holder's pod must be a remora pod: a review by the API names real pods; a
    /// token file stands in for a cluster that may hold none.
    fn checks_pods(&self) -> bool {
        !matches!(self, Reviewer::Tokens(_))
    }
}

/// The SPIFFE identity of a ServiceAccount.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Whether `text` is a trust domain as SPIFFE allows it: lowercase letters, digits, `.`, `-`
/// and `_`.
pub fn valid_trust_domain(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 255
        && text.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// The Identity gRPC service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ca: CaSlot,
    reviewer: Option<Reviewer>,
    trust_domain: String,
    lifetime: Duration,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

impl IdentityService {
    /// Without a reviewer, or while `ca` is empty, every request is refused (FAILED_PRECONDITION).
    pub fn new(
        ca: CaSlot,
        reviewer: Option<Reviewer>,
        trust_domain: impl Into<String>,
        lifetime: Duration,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                reviewer,
                trust_domain: trust_domain.into(),
                lifetime,
                hub,
                metrics,
            }),
        }
    }

    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    async fn certify(&self, request: CertifyRequest) -> Result<CertifyResponse, Refused> {
        let inner = &*self.inner;
        let reviewer = inner.reviewer.as_ref().ok_or(Refused::NoReviewer)?;
        let ca = inner.ca.load_full().ok_or(Refused::NoCa)?;
        let public_key = parse_csr(&request.csr).map_err(Refused::Csr)?;
        if request.token.trim().is_empty() {
            return Err(Refused::Review(ReviewError::Unauthenticated(
                "the token is empty".into(),
            )));
        }
        let reviewed = reviewer
            .review(request.token.trim())
            .await
            .map_err(Refused::Review)?;
        let pod = reviewed.pod.clone().unwrap_or_else(|| request.pod.clone());
        if reviewer.checks_pods() {
            let published = inner.hub.current();
            if published
                .index
                .remora_pod(&reviewed.namespace, &pod)
                .is_none()
            {
                return Err(Refused::NotRemoraPod(format!(
                    "pod {}/{pod} is not a remora pod (no remora.io/status annotation), or not seen yet",
                    reviewed.namespace
                )));
            }
        }
        let identity = spiffe_id(
            &inner.trust_domain,
            &reviewed.namespace,
            &reviewed.service_account,
        );
        let issued = ca
            .certify(&public_key, &identity, SystemTime::now(), inner.lifetime)
            .map_err(|error| Refused::Internal(error.to_string()))?;
        tracing::info!(
            %identity,
            namespace = reviewed.namespace,
            pod,
            expires = issued.not_after,
            "issued a workload certificate"
        );
        Ok(CertifyResponse {
            identity,
            certificate_chain: vec![issued.certificate.to_vec()],
            trust_anchors: vec![ca.certificate().to_vec()],
            expires_unix_seconds: issued.not_after,
        })
    }
}

/// Why a request got no certificate.
#[derive(Debug)]
enum Refused {
    NoReviewer,
    NoCa,
    Csr(String),
    Review(ReviewError),
    NotRemoraPod(String),
    Internal(String),
}

impl Refused {
    fn rejection(&self) -> Rejection {
        match self {
            Refused::NoReviewer | Refused::NoCa => Rejection::NotConfigured,
            Refused::Csr(_) => Rejection::InvalidCsr,
            Refused::Review(ReviewError::Unauthenticated(_)) => Rejection::Unauthenticated,
            Refused::Review(ReviewError::NotServiceAccount(_)) => Rejection::NotServiceAccount,
            Refused::Review(ReviewError::Unavailable(_)) => Rejection::ReviewUnavailable,
            Refused::NotRemoraPod(_) => Rejection::NotRemoraPod,
            Refused::Internal(_) => Rejection::Internal,
        }
    }

    fn status(self) -> Status {
        match self {
            Refused::NoReviewer => Status::failed_precondition(
                "this control plane issues no certificates: it has neither --identity-tokens nor a Kubernetes API to review tokens with",
            ),
            Refused::NoCa => Status::failed_precondition(
                "this control plane has no CA to sign with (--ca-cert/--ca-key, or the remora-identity-ca Secret)",
            ),
            Refused::Csr(message) => Status::invalid_argument(message),
            Refused::Review(ReviewError::Unavailable(message)) => Status::unavailable(message),
            Refused::Review(error @ ReviewError::Unauthenticated(_)) => {
                Status::unauthenticated(error.to_string())
            }
            Refused::Review(error @ ReviewError::NotServiceAccount(_)) => {
                Status::permission_denied(error.to_string())
            }
            Refused::NotRemoraPod(message) => Status::permission_denied(message),
            Refused::Internal(message) => Status::internal(message),
        }
    }
}

/// The public key of a DER PKCS#10 request whose signature its own key verifies; else what is
/// wrong with it.
pub fn parse_csr(der: &[u8]) -> Result<SubjectPublicKeyInfo, String> {
    if der.is_empty() {
        return Err("csr is empty: a DER PKCS#10 certification request is expected".into());
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(format!(
            "csr is {} bytes, over the {MAX_CSR_BYTES} a certification request needs",
            der.len()
        ));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|error| format!("csr is not a DER PKCS#10 certification request: {error}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "csr has {} bytes after the certification request",
            rest.len()
        ));
    }
    csr.verify_signature().map_err(|error| {
        format!("csr's signature does not verify with its own public key: {error}")
    })?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw).map_err(
        |error| {
            format!("csr's public key is of a kind remora does not sign (ECDSA P-256 or P-384, Ed25519, RSA): {error}")
        },
    )
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let request = request.into_inner();
        let (namespace, pod) = (request.namespace.clone(), request.pod.clone());
        match IdentityService::certify(self, request).await {
            Ok(response) => {
                self.inner.metrics.certificate_issued();
                Ok(Response::new(response))
            }
            Err(refused) => {
                self.inner.metrics.certificate_refused(refused.rejection());
                let status = refused.status();
                tracing::info!(
                    namespace,
                    pod,
                    code = ?status.code(),
                    reason = status.message(),
                    "refused a certificate"
                );
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    #[test]
    fn csrs() {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["evil.example".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let der = csr.der().to_vec();
        let public = parse_csr(&der).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&public),
            key.public_key_raw()
        );

        let mut tampered = der.clone();
        // A byte of the subject's public key: the signature no longer verifies.
        let at = tampered
            .windows(8)
            .position(|window| window == &key.public_key_raw()[1..9])
            .unwrap();
        tampered[at] ^= 0xff;
        let mut trailing = der.clone();
        trailing.push(0);
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("empty", Vec::new(), "csr is empty"),
            ("garbage", b"garbage".to_vec(), "not a DER PKCS#10"),
            (
                "truncated",
                der[..der.len() / 2].to_vec(),
                "not a DER PKCS#10",
            ),
            ("tampered", tampered, "does not verify"),
            (
                "trailing bytes",
                trailing,
                "after the certification request",
            ),
        ];
        for (case, bytes, expected) in cases {
            let error = parse_csr(&bytes).unwrap_err();
            assert!(error.contains(expected), "{case}: {error}");
        }
    }

    #[test]
    fn trust_domains() {
        for good in ["cluster.local", "example.org", "a_b-c.1"] {
            assert!(valid_trust_domain(good), "{good}");
        }
        for bad in ["", "Cluster.local", "a/b", "spiffe://x", "a b"] {
            assert!(!valid_trust_domain(bad), "{bad}");
        }
    }
}
