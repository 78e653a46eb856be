//! The proxy's workload identity: the key it made, the certificate remora-control signed for it
//! (`remora.identity.v1`), and the trust anchors that verify its peers. [`Identity`] holds the
//! current [`Credentials`]; whoever makes TLS connections reads them from there, and a renewal
//! replaces them without a pause.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

mod certify;

pub use certify::{start, Certifier, CertifyError};

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
    /// Set while `/ready` waits for a first certificate: from the start of a proxy that asks
    /// for one until it comes or `--identity-wait` runs out.
    holding_readiness: AtomicBool,
}

impl Identity {
    /// The credentials in force now, or `None` before the first certificate.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Puts `credentials` in force for every connection made from now on.
    pub fn set(&self, credentials: Credentials) {
        self.current.store(Some(Arc::new(credentials)));
        self.release_readiness();
    }

    /// Takes the credentials out of force (they expired): connections made from now on are
    /// plaintext, as before the first certificate, rather than presenting an expired one.
    pub fn clear(&self) {
        self.current.store(None);
    }

    /// Keeps `/ready` false until a first certificate is [`set`](Self::set) or
    /// [`release_readiness`](Self::release_readiness) is called.
    pub fn hold_readiness(&self) {
        self.holding_readiness.store(true, Ordering::Release);
    }

    /// Lets `/ready` turn true with or without a certificate; whether it was held until now.
    pub fn release_readiness(&self) -> bool {
        self.holding_readiness.swap(false, Ordering::AcqRel)
    }

    /// Whether `/ready` still waits for a first certificate.
    pub fn holds_readiness(&self) -> bool {
        self.holding_readiness.load(Ordering::Acquire)
    }
}
