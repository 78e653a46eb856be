//! The trust anchors injected proxies verify remora-control with: a PEM file, checked, and re-read by `serve` when it changes.
//!
//! Only the certificates travel: they are re-encoded one by one, so comments, stray blocks and
//! line endings of the file never reach a pod spec, and a file holding a private key is refused
//! rather than copied into every meshed pod.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pemfile::Item;

use crate::certs::certificate_pem;
use crate::config::Config;

/// The most PEM text a pod carries: a few CAs (a rotation holds two), never a system bundle.
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// The CA certificates, as canonical PEM, that go into the proxy's `REMORA_TRUST_ANCHORS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchors {
    pem: String,
    count: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustAnchorsError {
    #[error("trust anchors file {}: cannot read it: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trust anchors file {}: not valid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "trust anchors file {}: no CERTIFICATE block (expected the PEM CA certificates that \
         verify remora-control, such as the ca.crt of Secret remora-identity-ca)",
        path.display()
    )]
    NoCertificate { path: PathBuf },
    #[error(
        "trust anchors file {}: it holds a private key, which would be copied into every meshed \
         pod; give a file with the CA certificates only",
        path.display()
    )]
    PrivateKey { path: PathBuf },
    #[error(
        "trust anchors file {}: certificate {number} is not a valid X.509 certificate: {reason}",
        path.display()
    )]
    BadCertificate {
        path: PathBuf,
        number: usize,
        reason: String,
    },
    #[error(
        "trust anchors file {}: {bytes} bytes of certificates, more than {MAX_PEM_BYTES}; every \
         meshed pod carries them (expected the few CAs that verify remora-control, not a system \
         CA bundle)",
        path.display()
    )]
    TooLarge { path: PathBuf, bytes: usize },
}

impl TrustAnchors {
    /// Reads and checks the file at `path`.
    pub fn read(path: &Path) -> Result<Self, TrustAnchorsError> {
        let bytes = std::fs::read(path).map_err(|source| TrustAnchorsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &bytes)
    }

    /// Checks `bytes` (read from `path`, which messages name): at least one certificate, each
    /// a parseable X.509 certificate, no private key, at most [`MAX_PEM_BYTES`] re-encoded.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, TrustAnchorsError> {
        let mut pem = String::new();
        let mut count = 0;
        for item in rustls_pemfile::read_all(&mut &bytes[..]) {
            let item = item.map_err(|source| TrustAnchorsError::Pem {
                path: path.to_path_buf(),
                source,
            })?;
            match item {
                Item::X509Certificate(der) => {
                    count += 1;
                    if let Err(error) = x509_parser::parse_x509_certificate(&der) {
                        return Err(TrustAnchorsError::BadCertificate {
                            path: path.to_path_buf(),
                            number: count,
                            reason: error.to_string(),
                        });
                    }
                    pem.push_str(&certificate_pem(&der));
                }
                Item::Pkcs1Key(_) | Item::Pkcs8Key(_) | Item::Sec1Key(_) => {
                    return Err(TrustAnchorsError::PrivateKey {
                        path: path.to_path_buf(),
                    })
                }
                // CRLs, CSRs and the like verify nothing: left out.
                _ => {}
            }
        }
        if count == 0 {
            return Err(TrustAnchorsError::NoCertificate {
                path: path.to_path_buf(),
            });
        }
        if pem.len() > MAX_PEM_BYTES {
            return Err(TrustAnchorsError::TooLarge {
                path: path.to_path_buf(),
                bytes: pem.len(),
            });
        }
        Ok(TrustAnchors { pem, count })
    }

    /// The certificates, one PEM block each.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// How many certificates.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// What one look at the file found.
#[derive(Debug)]
pub enum Reload {
    /// The file holds what is being injected.
    Unchanged,
    /// The file changed; it is taken once it reads the same twice in a row, so a writer that
    /// does not replace it atomically is never caught halfway (a bundle cut after its first CA
    /// is still valid PEM).
    Settling,
    /// New certificates, injected from now on.
    Reloaded(usize),
    /// Unreadable or invalid; the certificates injected so far stay.
    Failed(TrustAnchorsError),
}

/// Re-reads the trust anchors file and swaps new certificates into the webhook's config.
#[derive(Debug)]
pub struct AnchorsReloader {
    path: PathBuf,
    config: Arc<ArcSwap<Config>>,
    /// The file content last seen, and whether it was seen on the poll before this one.
    seen: Option<Vec<u8>>,
    /// The last failure logged, so a lasting problem is logged once.
    logged_failure: Option<String>,
}

impl AnchorsReloader {
    pub fn new(path: PathBuf, config: Arc<ArcSwap<Config>>) -> Self {
        Self {
            path,
            config,
            seen: None,
            logged_failure: None,
        }
    }

    /// Reads the file once and installs its certificates when they are new and settled.
    pub fn poll(&mut self) -> Reload {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(source) => {
                self.seen = None;
                return Reload::Failed(TrustAnchorsError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        if self.seen.as_ref() != Some(&bytes) {
            self.seen = Some(bytes);
            return Reload::Settling;
        }
        let anchors = match TrustAnchors::parse(&self.path, &bytes) {
            Ok(anchors) => anchors,
            Err(error) => return Reload::Failed(error),
        };
        let current = self.config.load();
        if current.trust_anchors.as_ref() == Some(&anchors) {
            return Reload::Unchanged;
        }
        let count = anchors.count();
        self.config.store(Arc::new(Config {
            trust_anchors: Some(anchors),
            ..Config::clone(&current)
        }));
        Reload::Reloaded(count)
    }

    /// Polls once and logs what changed; a failure once until it changes.
    pub fn poll_and_log(&mut self) {
        match self.poll() {
            Reload::Unchanged => self.logged_failure = None,
            Reload::Settling => {}
            Reload::Reloaded(certificates) => {
                self.logged_failure = None;
                tracing::info!(
                    file = %self.path.display(),
                    certificates,
                    "loaded new trust anchors; pods injected from now on get them"
                );
            }
            Reload::Failed(error) => {
                let message = error.to_string();
                if self.logged_failure.as_ref() != Some(&message) {
                    tracing::warn!(%error, "trust anchors file changed but can't be used; still injecting the previous certificates");
                    self.logged_failure = Some(message);
                }
            }
        }
    }

    /// Polls the file every `interval`, forever.
    pub async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.poll_and_log();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `count` fresh CA certificates, checked as a file would be.
    pub(crate) fn anchors(count: usize) -> TrustAnchors {
        let pem: String = (0..count)
            .map(|i| ca_pem(&format!("test CA {i}")))
            .collect();
        TrustAnchors::parse(Path::new("test.pem"), pem.as_bytes()).expect("test anchors")
    }

    fn ca_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("CA").pem()
    }

    fn parse(text: &str) -> Result<TrustAnchors, TrustAnchorsError> {
        TrustAnchors::parse(Path::new("/etc/remora/ca.crt"), text.as_bytes())
    }

    #[test]
    fn certificates_are_kept_and_everything_else_dropped() {
        let (one, two) = (ca_pem("one"), ca_pem("two"));
        let messy = format!(
            "# the control plane's CAs\r\n{}\nsome text between\n{}",
            one.replace('\n', "\r\n"),
            two
        );
        let anchors = parse(&messy).unwrap();
        assert_eq!(anchors.count(), 2);
        assert_eq!(anchors.pem(), format!("{one}{two}"));
        // Canonical: the same certificates give the same text, whatever the file looked like.
        assert_eq!(anchors, parse(&format!("{one}{two}")).unwrap());
    }

    #[test]
    fn errors_name_the_file_and_what_is_expected() {
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let broken = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let huge: String = (0..150).map(|i| ca_pem(&format!("ca {i}"))).collect();
        let cases: &[(&str, String, &[&str])] = &[
            ("empty", String::new(), &["no CERTIFICATE block", "ca.crt"]),
            (
                "text only",
                "not a certificate\n".into(),
                &["no CERTIFICATE block"],
            ),
            (
                "a key beside the CA",
                format!("{}{key}", ca_pem("ca")),
                &["private key", "certificates only"],
            ),
            (
                "not X.509 inside",
                broken.into(),
                &["certificate 1", "not a valid X.509"],
            ),
            (
                "a system bundle",
                huge,
                &["more than 65536", "not a system CA bundle"],
            ),
        ];
        for (name, text, needles) in cases {
            let error = match parse(text) {
                Ok(anchors) => panic!("{name}: accepted {} certificates", anchors.count()),
                Err(error) => error.to_string(),
            };
            assert!(error.contains("/etc/remora/ca.crt"), "{name}: {error}");
            for needle in *needles {
                assert!(error.contains(needle), "{name}: {error:?} lacks {needle:?}");
            }
        }
        let missing = TrustAnchors::read(Path::new("/nonexistent/ca.crt"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("/nonexistent/ca.crt") && missing.contains("cannot read"),
            "{missing}"
        );
    }

    #[test]
    fn a_changed_file_is_taken_once_settled_and_a_bad_one_keeps_the_old_anchors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        let (one, two) = (ca_pem("one"), ca_pem("two"));
        std::fs::write(&path, &one).unwrap();
        let config = Arc::new(ArcSwap::from_pointee(Config {
            trust_anchors: Some(TrustAnchors::read(&path).unwrap()),
            ..Config::default()
        }));
        let mut reloader = AnchorsReloader::new(path.clone(), config.clone());
        let injected = || {
            config
                .load()
                .trust_anchors
                .clone()
                .unwrap()
                .pem()
                .to_owned()
        };

        assert!(matches!(reloader.poll(), Reload::Settling));
        assert!(matches!(reloader.poll(), Reload::Unchanged));

        std::fs::write(&path, format!("{two}{one}")).unwrap();
        assert!(matches!(reloader.poll(), Reload::Settling));
        assert_eq!(injected(), one);
        assert!(matches!(reloader.poll(), Reload::Reloaded(2)));
        assert_eq!(injected(), format!("{two}{one}"));
        // The other settings are untouched.
        assert_eq!(config.load().control_addr, Config::default().control_addr);

        std::fs::write(&path, "garbage").unwrap();
        reloader.poll();
        assert!(matches!(
            reloader.poll(),
            Reload::Failed(TrustAnchorsError::NoCertificate { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            reloader.poll(),
            Reload::Failed(TrustAnchorsError::Read { .. })
        ));
        assert_eq!(injected(), format!("{two}{one}"));
    }
}
