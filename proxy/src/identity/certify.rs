//! Getting and renewing the workload certificate: a key made here at start and never sent, a
//! certificate signing request for it and the pod's projected token sent to remora-control
//! (`remora.identity.v1/Certify`), the answer put in force in [`Identity`]. Renewed at 70 % of
//! its lifetime, retried with backoff, never a crash: without a certificate the proxy talks
//! plaintext, as without the mesh.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::gauge::Gauge;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, PKCS_ECDSA_P256_SHA256};
use remora_api::identity::identity_client::IdentityClient;
use remora_api::identity::{CertifyRequest, CertifyResponse};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use super::{Credentials, Identity};
use crate::discover::{jitter, Discovery};

/// The part of a certificate's lifetime after which it is renewed (SPEC: 70 %).
const RENEW_AT: f64 = 0.7;
/// Retry backoff after a failed request: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("making the key and its certificate signing request: {0}")]
    Key(#[from] rcgen::Error),
    #[error(
        "reading the identity token {path}: {error} (the injector mounts it; see --identity-token)"
    )]
    Token { path: String, error: std::io::Error },
    #[error("the identity token {path} is empty")]
    EmptyToken { path: String },
    #[error("remora-control: {0}")]
    Status(#[from] tonic::Status),
    #[error("remora-control did not answer within {0:?}")]
    Timeout(Duration),
    #[error("remora-control's answer cannot be used: {0}")]
    Answer(String),
}

/// Starts getting the workload certificate on `runtime`, over the control plane's own channel,
/// with the token at `token`; `/ready` waits for the first certificate at most `wait`. Without
/// a token file there is no identity at all (logged once); returns whether it started.
pub fn start(
    discovery: &Discovery,
    token: &Path,
    wait: Duration,
    identity: &'static Identity,
    expiration: Gauge,
    runtime: &tokio::runtime::Handle,
) -> bool {
    if !token.exists() {
        info!(token = %token.display(), "no identity token: no workload certificate, plaintext with every peer");
        return false;
    }
    let control = discovery.config();
    let certifier = match Certifier::new(
        discovery.channel(),
        token.to_path_buf(),
        control.namespace.clone(),
        control.pod.clone(),
        expiration,
    ) {
        Ok(certifier) => certifier,
        Err(error) => {
            error!(%error, "no workload certificate: plaintext with every peer");
            return false;
        }
    };
    info!(token = %token.display(), wait = ?wait, "asking remora-control for a workload certificate; plaintext with every peer until it comes");
    if !wait.is_zero() {
        identity.hold_readiness();
        runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            if identity.release_readiness() {
                warn!(wait = ?wait, "no workload certificate within --identity-wait: ready, plaintext with every peer until one comes");
            }
        });
    }
    runtime.spawn(certifier.run(identity));
    true
}

/// The proxy's key, and how it asks for certificates for it.
pub struct Certifier {
    client: IdentityClient<Channel>,
    token: PathBuf,
    namespace: String,
    pod: String,
    /// ECDSA P-256, made at start; only its public half leaves the process, in `csr`.
    key: KeyPair,
    /// PKCS#10, DER: the same for every request, as the key is.
    csr: Vec<u8>,
    /// `identity_expiration_timestamp_seconds`.
    expiration: Gauge,
    backoff: (Duration, Duration),
}

impl Certifier {
    /// Makes the key and its request; connects nowhere yet.
    pub fn new(
        channel: Channel,
        token: PathBuf,
        namespace: String,
        pod: String,
        expiration: Gauge,
    ) -> Result<Self, CertifyError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        // No subject and no SAN: the control plane names the certificate from the token alone.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key)?.der().to_vec();
        Ok(Self {
            client: IdentityClient::new(channel),
            token,
            namespace,
            pod,
            key,
            csr,
            expiration,
            backoff: BACKOFF,
        })
    }

    /// Keeps a certificate in force for as long as the process runs: asks for one, renews it at
    /// 70 % of its lifetime, retries failures with backoff, and takes an expired one out of
    /// force while a renewal keeps failing.
    pub async fn run(self, identity: &Identity) {
        let mut backoff = self.backoff.0;
        let mut failures = 0u32;
        loop {
            let asked = SystemTime::now();
            match self.certify().await {
                Ok(credentials) => {
                    let renew_in = renewal(asked, credentials.expires)
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(self.backoff.0);
                    let expires = unix_seconds(credentials.expires);
                    if identity.current().is_none() {
                        info!(identity = %credentials.id, expires, renew_in = ?renew_in, failures, "workload certificate in force: mTLS with meshed peers");
                    } else {
                        info!(identity = %credentials.id, expires, renew_in = ?renew_in, failures, "workload certificate renewed");
                    }
                    self.expiration.set(expires);
                    identity.set(credentials);
                    failures = 0;
                    backoff = self.backoff.0;
                    tokio::time::sleep(renew_in).await;
                }
                Err(error) => {
                    if failures == 0 {
                        if identity.current().is_some() {
                            warn!(%error, "renewing the workload certificate failed; the current one stays in force until it expires; retrying");
                        } else {
                            warn!(%error, "no workload certificate yet: plaintext with every peer; retrying");
                        }
                    } else {
                        debug!(%error, failures, "workload certificate request failed again");
                    }
                    failures += 1;
                    let delay = jitter(backoff);
                    backoff = (backoff * 2).min(self.backoff.1);
                    self.sleep_expiring(identity, delay).await;
                }
            }
        }
    }

    /// One request: the token as the kubelet last wrote it, the request, the answer checked.
    async fn certify(&self) -> Result<Credentials, CertifyError> {
        let token = read_token(&self.token)?;
        let request = CertifyRequest {
            token,
            csr: self.csr.clone(),
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.clone().certify(request))
            .await
            .map_err(|_| CertifyError::Timeout(REQUEST_TIMEOUT))??;
        self.credentials(response.into_inner(), SystemTime::now())
    }

    /// The answer as credentials, if they can be used at `now`: a leaf for this proxy's key,
    /// trust anchors, not expired.
    fn credentials(
        &self,
        response: CertifyResponse,
        now: SystemTime,
    ) -> Result<Credentials, CertifyError> {
        let unusable = |why: &str| CertifyError::Answer(why.to_string());
        let Some(leaf) = response.certificate_chain.first() else {
            return Err(unusable("no certificate"));
        };
        if response.trust_anchors.is_empty() {
            return Err(unusable("no trust anchors"));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|error| CertifyError::Answer(format!("the certificate: {error}")))?;
        if parsed.public_key().raw != self.key.subject_public_key_info().as_slice() {
            return Err(unusable("the certificate is for another key"));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let expires_unix = match response.expires_unix_seconds {
            seconds if seconds > 0 => seconds.min(not_after),
            _ => not_after,
        };
        let expires = UNIX_EPOCH + Duration::from_secs(u64::try_from(expires_unix).unwrap_or(0));
        if expires <= now {
            return Err(CertifyError::Answer(format!(
                "the certificate expired at {expires_unix} (Unix seconds): is a clock wrong?"
            )));
        }
        Ok(Credentials {
            id: response.identity,
            chain: response
                .certificate_chain
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der())),
            trust_anchors: response
                .trust_anchors
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            expires,
        })
    }

    /// Sleeps `delay`, taking the credentials in force out of force if they expire meanwhile:
    /// the data path then talks plaintext rather than present an expired certificate.
    async fn sleep_expiring(&self, identity: &Identity, delay: Duration) {
        let end = tokio::time::Instant::now() + delay;
        if let Some(current) = identity.current() {
            let left = current
                .expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if left < delay {
                tokio::time::sleep(left).await;
                identity.clear();
                self.expiration.set(0);
                warn!(identity = %current.id, "the workload certificate expired before a renewal: plaintext with every peer until a new one comes");
            }
        }
        tokio::time::sleep_until(end).await;
    }
}

/// When a certificate asked for at `asked` is renewed: 70 % of the way from then to its
/// expiry. From the request rather than its notBefore: a CA that backdates notBefore against
/// clock skew would otherwise have a short-lived certificate renewed at once, again and again.
fn renewal(asked: SystemTime, expires: SystemTime) -> SystemTime {
    asked
        + expires
            .duration_since(asked)
            .unwrap_or_default()
            .mul_f64(RENEW_AT)
}

/// The token file, read afresh each time: the kubelet rotates it.
fn read_token(path: &Path) -> Result<String, CertifyError> {
    let text = std::fs::read_to_string(path).map_err(|error| CertifyError::Token {
        path: path.display().to_string(),
        error,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CertifyError::EmptyToken {
            path: path.display().to_string(),
        });
    }
    Ok(token.to_string())
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, PoisonError};

    use rcgen::{BasicConstraints, CertificateSigningRequestParams, IsCa, Issuer, SanType};
    use remora_api::identity::identity_server::{Identity as IdentityApi, IdentityServer};
    use rustls::SignatureScheme;

    use super::*;
    use crate::discover::ControlConfig;
    use crate::metrics::ControlMetrics;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
    /// The longest any awaited step may take before the test fails instead of hanging.
    const WAIT: Duration = Duration::from_secs(10);

    /// One request as the fake control plane saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        at: SystemTime,
        token: String,
        namespace: String,
        pod: String,
        /// The CSR's public key (SubjectPublicKeyInfo, DER).
        public_key: Vec<u8>,
        /// The notAfter of the certificate it signed; `None` when it refused.
        not_after: Option<SystemTime>,
    }

    #[derive(Debug, Default)]
    struct State {
        /// How many of the next requests are refused with UNAVAILABLE (`u32::MAX`: all).
        refuse: u32,
        seen: Vec<Seen>,
    }

    type Shared = Arc<Mutex<State>>;

    fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
        state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A control plane that signs every CSR with its own CA, as remora-control does: the SAN
    /// its own, notBefore backdated an hour, notAfter `lifetime` on (whole seconds).
    struct Fake {
        ca: Issuer<'static, KeyPair>,
        ca_der: Vec<u8>,
        lifetime: Duration,
        state: Shared,
    }

    #[tonic::async_trait]
    impl IdentityApi for Fake {
        async fn certify(
            &self,
            request: tonic::Request<CertifyRequest>,
        ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
            let request = request.into_inner();
            let now = SystemTime::now();
            let mut csr = CertificateSigningRequestParams::from_der(&request.csr.as_slice().into())
                .map_err(|error| tonic::Status::invalid_argument(error.to_string()))?;
            let mut state = lock(&self.state);
            let mut seen = Seen {
                at: now,
                token: request.token,
                namespace: request.namespace,
                pod: request.pod,
                public_key: csr.public_key.subject_public_key_info(),
                not_after: None,
            };
            if state.refuse > 0 {
                if state.refuse != u32::MAX {
                    state.refuse -= 1;
                }
                state.seen.push(seen);
                return Err(tonic::Status::unavailable("restarting"));
            }
            let not_after_unix = unix_seconds(now + self.lifetime);
            let not_after = UNIX_EPOCH + Duration::from_secs(not_after_unix as u64);
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = not_after.into();
            csr.params = params;
            let leaf = csr
                .signed_by(&self.ca)
                .map_err(|error| tonic::Status::internal(error.to_string()))?;
            seen.not_after = Some(not_after);
            state.seen.push(seen);
            Ok(tonic::Response::new(CertifyResponse {
                identity: ID.into(),
                certificate_chain: vec![leaf.der().to_vec()],
                trust_anchors: vec![self.ca_der.clone()],
                expires_unix_seconds: not_after_unix,
            }))
        }
    }

    /// The name the control plane's serving certificate carries.
    const CONTROL_NAME: &str = "remora-control.remora-system.svc";

    /// The fake's state and its CA certificate; serves once [`ControlPlane::serve`] is called.
    struct ControlPlane {
        state: Shared,
        ca_der: Vec<u8>,
        ca_pem: String,
        fake: Option<Fake>,
    }

    fn control_plane(lifetime: Duration, refuse: u32) -> ControlPlane {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let (ca_der, ca_pem) = (ca.der().to_vec(), ca.pem());
        let state = Arc::new(Mutex::new(State {
            refuse,
            seen: Vec::new(),
        }));
        let fake = Fake {
            ca: Issuer::new(ca_params, ca_key),
            ca_der: ca_der.clone(),
            lifetime,
            state: Arc::clone(&state),
        };
        ControlPlane {
            state,
            ca_der,
            ca_pem,
            fake: Some(fake),
        }
    }

    impl ControlPlane {
        async fn serve(&mut self, addr: SocketAddr) {
            self.serve_with(addr, false).await;
        }

        /// Serves over TLS with a certificate for [`CONTROL_NAME`] from its own CA, as
        /// remora-control does.
        async fn serve_tls(&mut self, addr: SocketAddr) {
            self.serve_with(addr, true).await;
        }

        async fn serve_with(&mut self, addr: SocketAddr, tls: bool) {
            let fake = self.fake.take().expect("served once");
            let mut server = tonic::transport::Server::builder();
            if tls {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(vec![CONTROL_NAME.to_string()])
                    .unwrap()
                    .signed_by(&key, &fake.ca)
                    .unwrap();
                let identity =
                    tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
                server = server
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .unwrap();
            }
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(
                server
                    .add_service(IdentityServer::new(fake))
                    .serve_with_incoming(incoming),
            );
        }

        fn seen(&self) -> Vec<Seen> {
            lock(&self.state).seen.clone()
        }

        fn refuse(&self, refuse: u32) {
            lock(&self.state).refuse = refuse;
        }

        /// Waits until the fake has seen `count` requests.
        async fn until_seen(&self, count: usize) -> Vec<Seen> {
            until(&format!("{count} requests"), || {
                let seen = self.seen();
                (seen.len() >= count).then_some(seen)
            })
            .await
        }
    }

    async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(value) = check() {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
    }

    fn free_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    /// The discovery client the proxy would make for a plaintext `--control addr`.
    fn discovery(addr: SocketAddr) -> Discovery {
        discovery_verifying(addr, None)
    }

    /// The discovery client for `--control addr`, over TLS verified by `trust_anchors` (PEM).
    fn discovery_verifying(addr: SocketAddr, trust_anchors: Option<&str>) -> Discovery {
        let config = ControlConfig {
            addr: addr.to_string(),
            name: CONTROL_NAME.into(),
            trust_anchors: trust_anchors.map(|pem| pem.as_bytes().to_vec()),
            namespace: "shop".into(),
            pod: "web-1".into(),
        };
        Discovery::new(
            config,
            tokio::runtime::Handle::current(),
            ControlMetrics::default(),
        )
        .unwrap()
    }

    /// A certifier on the discovery client's channel, with a short backoff, running on a
    /// process-long identity; and the identity and gauge it keeps.
    fn run(addr: SocketAddr, token: &Path) -> (&'static Identity, Gauge) {
        run_on(&discovery(addr), token)
    }

    fn run_on(discovery: &Discovery, token: &Path) -> (&'static Identity, Gauge) {
        let gauge = Gauge::default();
        let mut certifier = Certifier::new(
            discovery.channel(),
            token.to_path_buf(),
            "shop".into(),
            "web-1".into(),
            gauge.clone(),
        )
        .unwrap();
        certifier.backoff = (Duration::from_millis(100), Duration::from_millis(400));
        let identity: &'static Identity = Box::leak(Box::default());
        tokio::spawn(certifier.run(identity));
        (identity, gauge)
    }

    fn token_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    async fn until_certified(identity: &Identity) -> Arc<Credentials> {
        until("a certificate in force", || identity.current()).await
    }

    fn seconds(from: SystemTime, to: SystemTime) -> f64 {
        match to.duration_since(from) {
            Ok(after) => after.as_secs_f64(),
            Err(before) => -before.duration().as_secs_f64(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_certificate_comes_for_the_key_the_proxy_holds() {
        let addr = free_port();
        let mut control = control_plane(Duration::from_secs(60), 0);
        control.serve(addr).await;
        let (_dir, token) = token_file("token-1\n");
        let (identity, gauge) = run(addr, &token);
        identity.hold_readiness();

        let credentials = until_certified(identity).await;
        let seen = control.seen();
        assert_eq!(seen.len(), 1);
        let asked = &seen[0];
        assert_eq!(
            (
                asked.token.as_str(),
                asked.namespace.as_str(),
                asked.pod.as_str()
            ),
            ("token-1", "shop", "web-1")
        );
        assert_eq!(credentials.id, ID);
        assert_eq!(credentials.chain.len(), 1);
        assert_eq!(credentials.trust_anchors.len(), 1);
        assert_eq!(
            credentials.trust_anchors[0].as_ref(),
            control.ca_der.as_slice()
        );
        assert_eq!(Some(credentials.expires), asked.not_after);
        assert_eq!(gauge.get(), unix_seconds(credentials.expires));
        assert!(
            !identity.holds_readiness(),
            "the certificate releases /ready"
        );

        // The certificate carries the CSR's key, and the key the proxy holds is its private half:
        // what it signs, the certificate verifies.
        let (_, leaf) = x509_parser::parse_x509_certificate(&credentials.chain[0]).unwrap();
        assert_eq!(leaf.public_key().raw, asked.public_key.as_slice());
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&credentials.key).unwrap();
        let signer = key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .expect("a P-256 key");
        let signature = signer.sign(b"remora/1").unwrap();
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let (_, verifiers) = algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == SignatureScheme::ECDSA_NISTP256_SHA256)
            .unwrap();
        let public_key = &leaf.public_key().subject_public_key.data;
        verifiers[0]
            .verify_signature(public_key, b"remora/1", &signature)
            .expect("the certificate verifies what the key signed");
        assert!(verifiers[0]
            .verify_signature(public_key, b"remora/2", &signature)
            .is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certified_over_the_discovery_channels_tls_and_only_to_a_verified_control_plane() {
        let addr = free_port();
        let mut control = control_plane(Duration::from_secs(60), 0);
        control.serve_tls(addr).await;
        let (_dir, token) = token_file("token-1");

        // Trust anchors of another CA: the control plane is not believed, nothing is sent.
        let stranger = control_plane(Duration::from_secs(60), 0);
        let (unverified, _) = run_on(&discovery_verifying(addr, Some(&stranger.ca_pem)), &token);
        let (identity, _) = run_on(&discovery_verifying(addr, Some(&control.ca_pem)), &token);
        let credentials = until_certified(identity).await;
        assert_eq!(credentials.id, ID);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(unverified.current().is_none());
        assert_eq!(control.seen().len(), 1, "only the verifying client asked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewed_at_70_percent_of_its_lifetime_with_the_token_read_again() {
        let addr = free_port();
        let mut control = control_plane(Duration::from_secs(3), 0);
        control.serve(addr).await;
        let (_dir, token) = token_file("token-1");
        let (identity, gauge) = run(addr, &token);
        until_certified(identity).await;
        // The kubelet rotates the token.
        std::fs::write(&token, "token-2").unwrap();

        let seen = control.until_seen(2).await;
        let (first, renewal) = (&seen[0], &seen[1]);
        let not_after = first.not_after.unwrap();
        // 70 % of the way from the request to notAfter (whole seconds, so 2 s to 3 s away);
        // not from the backdated notBefore, which would have renewed at once.
        let expected = 0.7 * seconds(first.at, not_after);
        let after = seconds(first.at, renewal.at);
        assert!(
            (after - expected).abs() < 0.3,
            "renewed {after:.3}s after the first request, expected {expected:.3}s"
        );
        assert_eq!(renewal.token, "token-2", "the token is read again");
        assert_eq!(
            renewal.public_key, first.public_key,
            "the same key, made at start"
        );

        let renewed = renewal.not_after.unwrap();
        assert!(renewed > not_after);
        until("the renewed certificate in force", || {
            (identity.current()?.expires == renewed).then_some(())
        })
        .await;
        assert_eq!(gauge.get(), unix_seconds(renewed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unavailable_is_retried_with_growing_backoff_until_a_certificate_comes() {
        let addr = free_port();
        let mut control = control_plane(Duration::from_secs(60), 4);
        control.serve(addr).await;
        let (_dir, token) = token_file("token-1");
        let (identity, gauge) = run(addr, &token);
        identity.hold_readiness();

        until_certified(identity).await;
        let seen = control.seen();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert!(seen[..4].iter().all(|seen| seen.not_after.is_none()));
        assert!(!identity.holds_readiness());
        assert!(gauge.get() > 0);
        // 100 ms doubling to the 400 ms cap, each ± a quarter.
        for (gap, nominal) in seen.windows(2).zip([100.0, 200.0, 400.0, 400.0]) {
            let gap = seconds(gap[0].at, gap[1].at) * 1000.0;
            assert!(
                gap >= 0.75 * nominal - 5.0 && gap <= 1.25 * nominal + 250.0,
                "a retry {gap:.0} ms after the last, expected {nominal} ms ± 25 %"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_token_and_an_unreachable_control_plane_are_waited_out() {
        let addr = free_port();
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let (identity, gauge) = run(addr, &token);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(identity.current().is_none());

        std::fs::write(&token, "token-1").unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(identity.current().is_none(), "nobody to ask yet");
        assert_eq!(gauge.get(), 0);

        let mut control = control_plane(Duration::from_secs(60), 0);
        control.serve(addr).await;
        until_certified(identity).await;
        let seen = control.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].token, "token-1");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_certificate_stays_until_it_expires_then_plaintext_until_a_new_one() {
        let addr = free_port();
        let mut control = control_plane(Duration::from_secs(2), 0);
        control.serve(addr).await;
        let (_dir, token) = token_file("token-1");
        let (identity, gauge) = run(addr, &token);
        let first = until_certified(identity).await;
        control.refuse(u32::MAX);

        // The renewal fails: the certificate stays in force while it is valid.
        control.until_seen(2).await;
        if SystemTime::now() < first.expires {
            assert!(
                identity.current().is_some(),
                "the last good certificate stays"
            );
        }
        until("the expired certificate out of force", || {
            identity.current().is_none().then_some(())
        })
        .await;
        let late = seconds(first.expires, SystemTime::now());
        assert!(
            (-0.05..1.0).contains(&late),
            "cleared {late:.3}s after notAfter"
        );
        assert_eq!(gauge.get(), 0);

        // The control plane is back: a new certificate.
        control.refuse(0);
        let second = until_certified(identity).await;
        assert!(second.expires > first.expires);
        assert_eq!(gauge.get(), unix_seconds(second.expires));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_without_a_token_asks_for_nothing_and_holds_nothing() {
        let discovery = discovery(free_port());
        let identity: &'static Identity = Box::leak(Box::default());
        let dir = tempfile::tempdir().unwrap();
        let started = start(
            &discovery,
            &dir.path().join("token"),
            Duration::from_secs(5),
            identity,
            Gauge::default(),
            &tokio::runtime::Handle::current(),
        );
        assert!(!started);
        assert!(!identity.holds_readiness());
        assert!(identity.current().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_holds_ready_for_at_most_the_wait_without_a_certificate() {
        let discovery = discovery(free_port());
        let identity: &'static Identity = Box::leak(Box::default());
        let (_dir, token) = token_file("token-1");
        let wait = Duration::from_millis(500);
        let started_at = std::time::Instant::now();
        assert!(start(
            &discovery,
            &token,
            wait,
            identity,
            Gauge::default(),
            &tokio::runtime::Handle::current(),
        ));
        assert!(identity.holds_readiness());
        until("/ready released", || {
            (!identity.holds_readiness()).then_some(())
        })
        .await;
        let waited = started_at.elapsed();
        assert!(
            waited >= wait && waited < wait + Duration::from_millis(500),
            "{waited:?}"
        );
        assert!(identity.current().is_none(), "ready, and plaintext");
    }

    #[test]
    fn renewal_is_70_percent_from_the_request_to_the_expiry() {
        let asked = UNIX_EPOCH + Duration::from_secs(1_000);
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(
            renewal(asked, asked + day),
            asked + Duration::from_secs(60_480)
        );
        assert_eq!(renewal(asked, asked - day), asked);
    }

    #[tokio::test]
    async fn an_answer_that_cannot_be_used_is_an_error() {
        let certifier = Certifier::new(
            tonic::transport::Channel::from_static("http://127.0.0.1:1").connect_lazy(),
            PathBuf::from("unused"),
            "shop".into(),
            "web-1".into(),
            Gauge::default(),
        )
        .unwrap();
        let now = SystemTime::now();
        let reason = |response: CertifyResponse| match certifier.credentials(response, now) {
            Err(CertifyError::Answer(why)) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(CertifyResponse::default()), "no certificate");
        // A certificate for another key.
        let other = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.not_after = (now + Duration::from_secs(60)).into();
        let foreign = params.self_signed(&other).unwrap().der().to_vec();
        let anchors = vec![foreign.clone()];
        assert_eq!(
            reason(CertifyResponse {
                identity: ID.into(),
                certificate_chain: vec![foreign.clone()],
                trust_anchors: Vec::new(),
                expires_unix_seconds: 0,
            }),
            "no trust anchors"
        );
        assert_eq!(
            reason(CertifyResponse {
                identity: ID.into(),
                certificate_chain: vec![foreign],
                trust_anchors: anchors.clone(),
                expires_unix_seconds: 0,
            }),
            "the certificate is for another key"
        );
        // Its own key, but expired.
        let mut params = CertificateParams::default();
        params.not_after = (now - Duration::from_secs(60)).into();
        let expired = params.self_signed(&certifier.key).unwrap().der().to_vec();
        let why = reason(CertifyResponse {
            identity: ID.into(),
            certificate_chain: vec![expired],
            trust_anchors: anchors.clone(),
            expires_unix_seconds: 0,
        });
        assert!(why.contains("expired"), "{why}");
        assert!(matches!(
            certifier.credentials(
                CertifyResponse {
                    identity: ID.into(),
                    certificate_chain: vec![b"garbage".to_vec()],
                    trust_anchors: anchors,
                    expires_unix_seconds: 0,
                },
                now
            ),
            Err(CertifyError::Answer(_))
        ));
    }
}
