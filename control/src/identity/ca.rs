//! The certificate authority of workload identities: a CA certificate and key (PEM, from files or
//! the `remora-identity-ca` Secret), the workload certificates it signs, and remora-control's own
//! serving certificate.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateDer;

/// How long a CA made by remora-control lives.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating tolerates peers whose clocks are a little behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CA certificate is not a PEM certificate")]
    NoCertificate,
    #[error("the CA certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa,
    #[error("the CA key does not parse (PEM PKCS#8, PKCS#1 or SEC1 expected): {0}")]
    BadKey(rcgen::Error),
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate expired")]
    Expired,
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A CA that can sign: its certificate and its key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    not_before: i64,
    not_after: i64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A workload certificate just signed.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: CertificateDer<'static>,
    /// Its notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

impl Ca {
    /// The CA of a PEM certificate (the first of the document) and its PEM key, checked: a CA
    /// certificate, not expired at `now`, the key its own.
    pub fn from_pem(cert_pem: &str, key_pem: &str, now: SystemTime) -> Result<Self, CaError> {
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .find_map(Result::ok)
            .ok_or(CaError::NoCertificate)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|error| CaError::BadCertificate(error.to_string()))?;
        if !parsed.is_ca() {
            return Err(CaError::NotCa);
        }
        let not_before = parsed.validity().not_before.timestamp();
        let not_after = parsed.validity().not_after.timestamp();
        if not_after <= unix(now) {
            return Err(CaError::Expired);
        }
        let key = KeyPair::from_pem(key_pem).map_err(CaError::BadKey)?;
        if key.public_key_raw() != &*parsed.tbs_certificate.subject_pki.subject_public_key.data {
            return Err(CaError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|error| CaError::BadCertificate(error.to_string()))?;
        Ok(Self {
            issuer,
            certificate: der.into_owned(),
            not_before,
            not_after,
        })
    }

    /// A new self-signed CA, as PEM certificate and key.
    pub fn generate(
        trust_domain: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("remora identity CA {trust_domain}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(serial());
        let certificate = params.self_signed(&key)?;
        Ok((certificate.pem(), key.serialize_pem()))
    }

    /// The CA certificate, DER: the trust anchor of what it signs.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The CA's notAfter, seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// A workload certificate for `public_key` (a DER SubjectPublicKeyInfo) whose only SAN is the
    /// URI `identity`: digitalSignature, serverAuth and clientAuth, valid for `lifetime` from
    /// `now` (a little backdated) and never past the CA.
    pub fn certify(
        &self,
        public_key: &SubjectPublicKeyInfo,
        identity: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        // No subject: the identity is the SAN, marked critical as RFC 5280 asks then.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial());
        let (not_before, not_after) = self.validity(now, lifetime);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let certificate = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            certificate: certificate.der().clone(),
            not_after: unix(not_after),
        })
    }

    /// A serving certificate for `dns_names` with a fresh key: (certificate DER, PKCS#8 key DER).
    pub fn serving(
        &self,
        dns_names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(CertificateDer<'static>, Vec<u8>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().cloned().unwrap_or_default(),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial());
        let (not_before, not_after) = self.validity(now, lifetime);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok((certificate.der().clone(), key.serialize_der()))
    }

    /// From a little before `now` (not before the CA) to `lifetime` after it (not after the CA).
    fn validity(&self, now: SystemTime, lifetime: Duration) -> (SystemTime, SystemTime) {
        let from = (now - CLOCK_SKEW).max(at(self.not_before));
        let until = (now + lifetime).min(at(self.not_after));
        (from, until)
    }
}

/// `--ca-cert` and `--ca-key`.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--ca-cert {} / --ca-key {}: {source}", cert.display(), key.display())]
    Ca {
        cert: PathBuf,
        key: PathBuf,
        source: CaError,
    },
}

impl CaFiles {
    /// The CA the files hold now.
    pub fn read(&self) -> Result<Ca, CaFileError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaFileError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let (cert, key) = (read(&self.cert)?, read(&self.key)?);
        Ca::from_pem(&cert, &key, SystemTime::now()).map_err(|source| CaFileError::Ca {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        })
    }

    fn modified(&self) -> [Option<SystemTime>; 2] {
        [&self.cert, &self.key].map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
    }

    /// Re-reads the files whenever they change (cert-manager renews them in place; a Secret
    /// volume swaps a symlink) and puts the CA they hold into `slot`; a pair that does not
    /// read (one file written, not yet the other) is logged and the CA before it kept.
    pub async fn watch(self, slot: super::CaSlot, interval: Duration) {
        let mut seen = self.modified();
        loop {
            tokio::time::sleep(interval).await;
            let now = self.modified();
            if now == seen {
                continue;
            }
            seen = now;
            match self.read() {
                Ok(ca) => {
                    tracing::info!(cert = %self.cert.display(), not_after = ca.not_after(), "identity CA re-read");
                    slot.store(Some(std::sync::Arc::new(ca)));
                }
                Err(error) => {
                    tracing::warn!(%error, "identity CA files changed and do not read; keeping the CA read before")
                }
            }
        }
    }
}

fn unix(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn at(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(seconds) => UNIX_EPOCH + Duration::from_secs(seconds),
        Err(_) => UNIX_EPOCH,
    }
}

/// A random positive 128-bit serial: renewals for one key must not repeat one (rcgen's default
/// is derived from the key).
fn serial() -> SerialNumber {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = Vec::with_capacity(16);
    for _ in 0..2 {
        // RandomState is seeded from the OS's randomness once per process, then per instance.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        bytes.extend_from_slice(&hasher.finish().to_be_bytes());
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn ca(now: SystemTime) -> Ca {
        let (cert, key) = Ca::generate("cluster.local", now, CA_LIFETIME).unwrap();
        Ca::from_pem(&cert, &key, now).unwrap()
    }

    #[test]
    fn a_workload_certificate_names_the_identity_alone() {
        let now = SystemTime::now();
        let ca = ca(now);
        let key = KeyPair::generate().unwrap();
        let public = SubjectPublicKeyInfo::from_pem(&key.public_key_pem()).unwrap();
        let issued = ca
            .certify(&public, "spiffe://cluster.local/ns/shop/sa/web", now, DAY)
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.certificate).unwrap();
        assert_eq!(cert.validity().not_after.timestamp(), issued.not_after);
        assert_eq!(issued.not_after - unix(now), 24 * 3600);
        assert_eq!(
            cert.tbs_certificate.subject_pki.subject_public_key.data,
            key.public_key_raw()
        );
        assert!(!cert.is_ca());
        let mut sans = Vec::new();
        for extension in cert.extensions() {
            match extension.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    assert!(extension.critical, "no subject: the SAN is critical");
                    sans.extend(san.general_names.iter().map(|name| match name {
                        GeneralName::URI(uri) => uri.to_string(),
                        other => format!("{other:?}"),
                    }));
                }
                ParsedExtension::KeyUsage(usage) => {
                    assert!(usage.digital_signature() && !usage.key_cert_sign());
                }
                ParsedExtension::ExtendedKeyUsage(usage) => {
                    assert!(usage.server_auth && usage.client_auth && !usage.any);
                }
                _ => {}
            }
        }
        assert_eq!(sans, ["spiffe://cluster.local/ns/shop/sa/web"]);
        // Verified by the CA's key.
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.certificate()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn a_certificate_never_outlives_its_ca() {
        let now = SystemTime::now();
        let (cert, key) = Ca::generate("td", now, DAY).unwrap();
        let ca = Ca::from_pem(&cert, &key, now).unwrap();
        let key = KeyPair::generate().unwrap();
        let public = SubjectPublicKeyInfo::from_pem(&key.public_key_pem()).unwrap();
        let issued = ca
            .certify(&public, "spiffe://td/ns/a/sa/b", now, 7 * DAY)
            .unwrap();
        assert_eq!(issued.not_after, ca.not_after());
    }

    #[test]
    fn bad_ca_material_is_named() {
        let now = SystemTime::now();
        let (cert, key) = Ca::generate("td", now, DAY).unwrap();
        let (_, other_key) = Ca::generate("td", now, DAY).unwrap();
        let leaf = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
        let cases: [(&str, String, String, &str); 5] = [
            (
                "not PEM",
                "garbage".into(),
                key.clone(),
                "not a PEM certificate",
            ),
            (
                "not a CA",
                leaf.cert.pem(),
                leaf.signing_key.serialize_pem(),
                "not a CA",
            ),
            (
                "bad key",
                cert.clone(),
                "garbage".into(),
                "CA key does not parse",
            ),
            ("another key", cert.clone(), other_key, "does not belong"),
            ("expired", cert.clone(), key.clone(), "expired"),
        ];
        for (case, cert, key, expected) in cases {
            let when = if case == "expired" {
                now + 2 * DAY
            } else {
                now
            };
            let error = Ca::from_pem(&cert, &key, when).unwrap_err().to_string();
            assert!(error.contains(expected), "{case}: {error}");
        }
    }

    #[test]
    fn serials_differ() {
        let a = serial();
        let b = serial();
        assert_ne!(a, b);
    }
}
