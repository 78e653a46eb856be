//! A server's TLS certificate: read from PEM files and re-read whenever they change.
//!
//! The files are the single source of the certificate: a mounted Secret, or whatever writes a
//! certificate into the same files (cert-manager, a script). Kubernetes updates a Secret volume by
//! swapping a `..data` symlink, so the files are polled and their *content* compared rather than
//! watched.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// How often the certificate files are re-read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Where the certificate and key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: not valid PEM: {source}")]
    Pem { path: PathBuf, source: io::Error },
    #[error(
        "{path}: no CERTIFICATE block (expected a PEM certificate chain, server certificate first)"
    )]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key block (expected PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)")]
    NoKey { path: PathBuf },
    #[error("{key} does not go with the certificate in {cert}: {source}")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The crypto provider of the whole workspace.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Hands rustls whichever certificate was loaded last; none (failed handshakes) before the first.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl CertResolver {
    /// Whether a certificate has been loaded, i.e. handshakes can succeed.
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn install(&self, key: CertifiedKey) {
        self.current.store(Some(Arc::new(key)));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// A rustls server configuration that takes its certificate from `resolver` on every handshake
/// and offers the ALPN protocols `alpn`, most preferred first.
pub fn server_config(
    resolver: Arc<CertResolver>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

/// Parses a PEM certificate chain and key and checks that they belong together.
pub fn load_pair(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()
        .map_err(|source| TlsError::Pem {
            path: files.cert.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Pem {
            path: files.key.clone(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: files.key.clone(),
        })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Unusable {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The end-entity certificate's notAfter in Unix seconds.
fn not_after(key: &CertifiedKey) -> Option<i64> {
    let der = key.end_entity_cert().ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// What one look at the files found.
#[derive(Debug)]
pub enum Reload {
    /// Same content as the certificate being served.
    Unchanged,
    /// New content, loaded and now served.
    Reloaded,
    /// The files can't be read or don't form a usable pair; the previous certificate (if any) stays.
    Failed(TlsError),
}

/// What [`CertReloader::poll_and_log`] tells its observer (a server's metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadEvent {
    /// New files were loaded and are being served; the certificate's notAfter in Unix seconds.
    Loaded { not_after: Option<i64> },
    /// New files could not be used; the previous certificate, if any, stays.
    Rejected,
}

type Observer = Box<dyn Fn(ReloadEvent) + Send>;

/// Re-reads the certificate files and installs a new pair into the resolver when their content
/// changes. A bad pair is reported and the old certificate kept.
pub struct CertReloader {
    files: TlsFiles,
    resolver: Arc<CertResolver>,
    /// The file contents behind the certificate being served.
    installed: Option<(Vec<u8>, Vec<u8>)>,
    /// The last failure seen and whether it was logged, so a lasting problem is logged once.
    last_failure: Option<(String, bool)>,
    observer: Option<Observer>,
}

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("files", &self.files)
            .field("loaded", &self.installed.is_some())
            .field("last_failure", &self.last_failure)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    pub fn new(files: TlsFiles, resolver: Arc<CertResolver>) -> Self {
        Self {
            files,
            resolver,
            installed: None,
            last_failure: None,
            observer: None,
        }
    }

    /// Also tells `observer` of every logged reload and rejection (to count them, say).
    pub fn with_observer(mut self, observer: impl Fn(ReloadEvent) + Send + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Reads both files once; loads and installs them if their content is new.
    pub fn poll(&mut self) -> Reload {
        let pair = match read(&self.files.cert).and_then(|cert| Ok((cert, read(&self.files.key)?)))
        {
            Ok(pair) => pair,
            Err(error) => return Reload::Failed(error),
        };
        if self.installed.as_ref() == Some(&pair) {
            return Reload::Unchanged;
        }
        match load_pair(&self.files, &pair.0, &pair.1) {
            Ok(key) => {
                self.resolver.install(key);
                self.installed = Some(pair);
                Reload::Reloaded
            }
            Err(error) => Reload::Failed(error),
        }
    }

    /// Polls once and logs the result. A failure is logged at once when `eager` (at startup);
    /// otherwise only when it is seen twice in a row, because a writer replacing the certificate
    /// and the key one after the other briefly leaves a mismatched pair.
    pub fn poll_and_log(&mut self, eager: bool) -> bool {
        match self.poll() {
            Reload::Unchanged => {
                self.last_failure = None;
                false
            }
            Reload::Reloaded => {
                self.last_failure = None;
                let expires = self.resolver.current().and_then(|key| not_after(&key));
                tracing::info!(
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    not_after = expires,
                    "loaded the TLS certificate"
                );
                if let Some(observer) = &self.observer {
                    observer(ReloadEvent::Loaded { not_after: expires });
                }
                true
            }
            Reload::Failed(error) => {
                let message = error.to_string();
                let (seen_before, logged) = match &self.last_failure {
                    Some((last, logged)) if *last == message => (true, *logged),
                    _ => (false, false),
                };
                let log_now = !logged && (eager || seen_before);
                if log_now {
                    if let Some(observer) = &self.observer {
                        observer(ReloadEvent::Rejected);
                    }
                    if self.resolver.is_loaded() {
                        tracing::warn!(%error, "TLS certificate files changed but can't be used; still serving the previous certificate");
                    } else {
                        tracing::error!(%error, "no usable TLS certificate yet; not ready until there is one");
                    }
                }
                self.last_failure = Some((message, logged || log_now));
                false
            }
        }
    }

    /// Polls the files every `interval`, forever. The file reads are tiny, so they run inline.
    pub async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            ticker.tick().await;
            self.poll_and_log(first);
            first = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key generation");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }

    /// Writes a fresh self-signed pair for `name` to `files`; returns the certificate PEM.
    fn write_pair(files: &TlsFiles, name: &str) -> String {
        let (cert, key) = self_signed(name);
        std::fs::write(&files.cert, &cert).expect("write cert");
        std::fs::write(&files.key, &key).expect("write key");
        cert
    }

    #[test]
    fn loads_a_pair_and_reloads_only_on_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = files(dir.path());
        write_pair(&files, "one.test");
        let resolver = Arc::new(CertResolver::default());
        let mut reloader = CertReloader::new(files.clone(), resolver.clone());
        assert!(matches!(reloader.poll(), Reload::Reloaded));
        assert!(resolver.is_loaded());
        assert!(matches!(reloader.poll(), Reload::Unchanged));

        write_pair(&files, "two.test");
        let before = resolver.current().expect("loaded");
        assert!(matches!(reloader.poll(), Reload::Reloaded));
        let after = resolver.current().expect("loaded");
        assert_ne!(before.cert, after.cert);
    }

    #[test]
    fn a_bad_pair_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = files(dir.path());
        let cert = write_pair(&files, "one.test");
        let resolver = Arc::new(CertResolver::default());
        let mut reloader = CertReloader::new(files.clone(), resolver.clone());
        assert!(matches!(reloader.poll(), Reload::Reloaded));
        let served = resolver.current().expect("loaded").cert.clone();

        // A new certificate with the old key: mismatched.
        let (cert2, _) = self_signed("two.test");
        std::fs::write(&files.cert, &cert2).expect("write cert");
        match reloader.poll() {
            Reload::Failed(TlsError::Unusable { .. }) => {}
            other => panic!("expected a key mismatch, got {other:?}"),
        }
        assert_eq!(resolver.current().expect("kept").cert, served);

        std::fs::write(&files.cert, "not pem at all").expect("write cert");
        assert!(matches!(
            reloader.poll(),
            Reload::Failed(TlsError::NoCertificate { .. })
        ));
        std::fs::remove_file(&files.key).expect("remove key");
        std::fs::write(&files.cert, &cert).expect("write cert");
        assert!(matches!(
            reloader.poll(),
            Reload::Failed(TlsError::Read { .. })
        ));
        assert_eq!(resolver.current().expect("kept").cert, served);
    }

    #[test]
    fn the_observer_hears_of_loads_and_of_lasting_rejections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = files(dir.path());
        write_pair(&files, "one.test");
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&events);
        let mut reloader = CertReloader::new(files.clone(), Arc::new(CertResolver::default()))
            .with_observer(move |event| seen.lock().unwrap().push(event));
        assert!(reloader.poll_and_log(true));
        assert!(!reloader.poll_and_log(false));

        std::fs::write(&files.cert, "not pem at all").expect("write cert");
        // Once may be a writer between the two files; twice in a row is a rejection, told once.
        for _ in 0..3 {
            assert!(!reloader.poll_and_log(false));
        }
        let events = events.lock().unwrap();
        let [ReloadEvent::Loaded {
            not_after: Some(not_after),
        }, ReloadEvent::Rejected] = events[..]
        else {
            panic!("expected a load then one rejection, got {events:?}");
        };
        assert!(not_after > 1_700_000_000, "{not_after}");
    }

    #[test]
    fn nothing_is_served_before_a_certificate_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let resolver = Arc::new(CertResolver::default());
        let mut reloader = CertReloader::new(files(dir.path()), resolver.clone());
        let error = match reloader.poll() {
            Reload::Failed(error) => error.to_string(),
            other => panic!("expected a failure, got {other:?}"),
        };
        assert!(error.contains("tls.crt"), "{error}");
        assert!(!resolver.is_loaded());
    }

    #[test]
    fn errors_name_the_file_and_the_expected_form() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = files(dir.path());
        let (cert, _) = self_signed("one.test");
        let error = load_pair(&files, cert.as_bytes(), b"")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls.key") && error.contains("PRIVATE KEY"),
            "{error}"
        );
    }
}
