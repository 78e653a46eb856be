//! remora-control's own serving certificate, issued by the identity CA when no `--tls-cert` is
//! given: the trust anchors that verify peer proxies then verify the control plane too.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::ca::{Ca, CaError};
use super::CaSlot;

/// How long a self-issued serving certificate lives; renewed at two thirds, or at once when
/// the CA changes.
pub const LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the CA is looked at for a change.
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The names a proxy may dial the control plane by.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Hands rustls the certificate issued last.
#[derive(Debug, Default)]
pub struct SelfIssued {
    current: ArcSwapOption<CertifiedKey>,
}

impl ResolvesServerCert for SelfIssued {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("no identity CA to issue remora-control's serving certificate with (give --tls-cert/--tls-key, --ca-cert/--ca-key, or let it keep its CA Secret)")]
    NoCa,
    #[error("issuing remora-control's serving certificate: {0}")]
    Issue(#[from] CaError),
    #[error("remora-control's serving certificate: {0}")]
    Tls(#[from] rustls::Error),
}

impl SelfIssued {
    /// A certificate issued now by the CA in `slot`.
    pub fn issue(&self, ca: &Ca, names: &[String]) -> Result<(), ServingError> {
        let (cert, key) = ca.serving(names, SystemTime::now(), LIFETIME)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(vec![cert], key, &provider)?;
        self.current.store(Some(Arc::new(certified)));
        Ok(())
    }

    /// Issues the first certificate, then keeps one current: renewed at two thirds of its
    /// lifetime, and when the CA in `slot` changes.
    pub fn start(slot: CaSlot, names: Vec<String>) -> Result<Arc<Self>, ServingError> {
        let ca = slot.load_full().ok_or(ServingError::NoCa)?;
        let issued = Arc::new(Self::default());
        issued.issue(&ca, &names)?;
        let keeper = Arc::clone(&issued);
        tokio::spawn(async move {
            let mut signer = ca;
            let mut renew_at = tokio::time::Instant::now() + LIFETIME * 2 / 3;
            loop {
                tokio::time::sleep(CHECK_INTERVAL).await;
                let Some(ca) = slot.load_full() else { continue };
                let changed = ca.certificate() != signer.certificate();
                if !changed && tokio::time::Instant::now() < renew_at {
                    continue;
                }
                match keeper.issue(&ca, &names) {
                    Ok(()) => {
                        tracing::info!(
                            ca_changed = changed,
                            "issued remora-control's serving certificate"
                        );
                        signer = ca;
                        renew_at = tokio::time::Instant::now() + LIFETIME * 2 / 3;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "renewing the serving certificate; retrying")
                    }
                }
            }
        });
        Ok(issued)
    }

    /// A TLS server configuration serving these certificates, offering `h2` alone (gRPC).
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, ServingError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}
