//! The proxy's workload identity: the key it made, the certificate remora-control signed for it
//! (`remora.identity.v1`), and the trust anchors that verify its peers. [`Identity`] holds the
//! current [`Credentials`]; whoever makes TLS connections reads them from there, and a renewal
//! replaces them without a pause.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// One certificate and what goes with it; replaced whole at each renewal.
#[derive(Debug)]
pub struct Credentials {
    /// The identity the certificate names: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub id: String,
    /// The leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key, made in this process (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// The trust anchors that verify peers' certificates.
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// The leaf's notAfter.
    pub expires: SystemTime,
}

/// The current credentials, if any: `None` until a first certificate comes (the proxy then
/// talks plaintext, as without the mesh).
#[derive(Debug, Default)]
pub struct Identity {
    current: ArcSwapOption<Credentials>,
}

impl Identity {
    /// The credentials in force now, or `None` before the first certificate.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Puts `credentials` in force for every connection made from now on.
    pub fn set(&self, credentials: Credentials) {
        self.current.store(Some(Arc::new(credentials)));
    }
}
