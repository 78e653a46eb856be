//! The trust anchors injected proxies verify remora-control with: a PEM file, checked (re-read
//! by `serve` when it changes: [`crate::trust_reload`]).
//!
//! Only the certificates travel: they are re-encoded one by one, so comments, stray blocks and
//! line endings of the file never reach a pod spec, and a file holding a private key is refused
//! rather than copied into every meshed pod.

use std::path::{Path, PathBuf};

use rustls_pemfile::Item;

use crate::certs::certificate_pem;

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

    pub(crate) fn ca_pem(name: &str) -> String {
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
}
