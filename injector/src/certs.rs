//! Self-managed certificates: a CA and the webhook's serving certificate kept in a Secret, written to the files the server serves, the webhook's `caBundle` kept in sync, and remora-control's serving certificate issued by the same CA.
//!
//! Every replica runs the same loop, and the Secret is the only shared state:
//! - it is created only if absent; a replica that loses the create race (409 AlreadyExists)
//!   re-reads it and adopts the winner's CA, so two replicas starting together end with one CA;
//! - it is updated only with the `resourceVersion` that was read (409 Conflict: re-read, re-plan);
//! - the serving certificate is renewed at two thirds of its lifetime, and never outlives its CA;
//! - the CA is rotated at two thirds of its lifetime. The new CA goes into `ca-bundle.crt` (and so
//!   into the webhook's `caBundle`) next to the old one, which stays until it expires. The serving
//!   certificate is not re-issued on rotation: it still chains to the old CA, and its next regular
//!   renewal uses the new one. The API server therefore trusts the new CA long before any
//!   certificate signed by it is served.
//!
//! Unless `--control-tls-secret` is empty, the same CA signs a serving certificate for
//! remora-control, kept by the same rules in a Secret of its own (`remora-control-tls`), and the
//! CA bundle is written beside the webhook's files as `ca.crt`, for a control plane that serves
//! that Secret with proxies given that bundle as `--trust-anchors` (a new CA is then trusted
//! before remora-control serves from it). The manifests do neither: there remora-control issues
//! its own certificate from its identity CA, whose `ca.crt` is the trust anchors (SPEC).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tracing::{debug, info, warn};

/// Secret keys. `tls.crt`/`tls.key` follow the `kubernetes.io/tls` convention.
pub const KEY_CA_CERT: &str = "ca.crt";
pub const KEY_CA_KEY: &str = "ca.key";
pub const KEY_CA_BUNDLE: &str = "ca-bundle.crt";
pub const KEY_TLS_CERT: &str = "tls.crt";
pub const KEY_TLS_KEY: &str = "tls.key";

/// The CA bundle's file name beside the serving certificate, as in a `kubernetes.io/tls` Secret.
pub const CA_FILE_NAME: &str = "ca.crt";

/// How many times one pass re-reads and retries after losing a race to another replica.
const MAX_ATTEMPTS: u32 = 5;
/// Backdating new certificates tolerates clocks a little behind ours (API server, other nodes).
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Old CAs kept in the bundle at most: one rotation in flight needs two.
const MAX_BUNDLE_CAS: usize = 4;

/// What the certificate manager manages, and how long things live.
#[derive(Debug, Clone)]
pub struct CertOptions {
    /// The injector's namespace, where the Secret and the Service are.
    pub namespace: String,
    /// The Secret holding the CA and the serving certificate.
    pub secret_name: String,
    /// The Service the API server calls; the serving certificate names it.
    pub service_name: String,
    /// The MutatingWebhookConfiguration whose every webhook gets the CA bundle.
    pub webhook_config_name: String,
    /// Where the server reads its certificate chain and key (`--tls-cert`, `--tls-key`).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_lifetime: Duration,
    pub serving_lifetime: Duration,
    /// How often each replica re-checks the Secret and the webhook registration.
    pub resync_period: Duration,
    /// Where the CA bundle is written (`ca.crt` beside the certificate), if anywhere.
    pub ca_file: Option<PathBuf>,
    /// Another Service whose serving certificate the CA issues: remora-control's.
    pub service_cert: Option<ServiceCert>,
}

/// A serving certificate for another Service in the same namespace, kept in its own Secret
/// (`kubernetes.io/tls`: `tls.crt`, `tls.key`, and `ca.crt`, the CA bundle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCert {
    pub secret_name: String,
    pub service_name: String,
}

impl CertOptions {
    pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    pub const DEFAULT_SERVING_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
    pub const DEFAULT_RESYNC_PERIOD: Duration = Duration::from_secs(60);

    /// Options with the default Secret name (`<service>-tls`) and lifetimes.
    pub fn new(
        namespace: impl Into<String>,
        service_name: impl Into<String>,
        webhook_config_name: impl Into<String>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        let service_name = service_name.into();
        CertOptions {
            namespace: namespace.into(),
            secret_name: format!("{service_name}-tls"),
            service_name,
            webhook_config_name: webhook_config_name.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            ca_lifetime: Self::DEFAULT_CA_LIFETIME,
            serving_lifetime: Self::DEFAULT_SERVING_LIFETIME,
            resync_period: Self::DEFAULT_RESYNC_PERIOD,
            ca_file: None,
            service_cert: None,
        }
    }

    /// The names the API server may use for the Service: it dials `<service>.<namespace>.svc`.
    pub fn dns_names(&self) -> Vec<String> {
        service_dns_names(&self.service_name, &self.namespace)
    }
}

/// The names a client in the cluster may dial a Service by.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// The `serve` flags that turn the certificate manager on.
#[derive(Debug, Clone, clap::Args)]
pub struct ManageCertsArgs {
    /// Keep a self-managed webhook CA and serving certificate in a Secret, write the pair to
    /// --tls-cert/--tls-key, and keep the webhook registration's caBundle in sync. Without it
    /// the files come from elsewhere (e.g. a cert-manager Secret).
    #[arg(long, env = "REMORA_MANAGE_CERTS")]
    pub manage_certs: bool,

    /// The Secret holding the CA and the serving certificate.
    #[arg(
        long,
        env = "REMORA_TLS_SECRET",
        value_name = "NAME",
        default_value = "remora-injector-tls"
    )]
    pub tls_secret: String,

    /// The MutatingWebhookConfiguration whose webhooks get the caBundle.
    #[arg(
        long,
        env = "REMORA_WEBHOOK_CONFIG_NAME",
        value_name = "NAME",
        default_value = "remora-injector"
    )]
    pub webhook_config_name: String,

    /// The Service in front of the injector; the serving certificate names it.
    #[arg(
        long,
        env = "REMORA_SERVICE_NAME",
        value_name = "NAME",
        default_value = "remora-injector"
    )]
    pub service_name: String,

    /// The Secret that gets remora-control's serving certificate, signed by the same CA (whose
    /// bundle --manage-certs writes as ca.crt beside --tls-cert: point --trust-anchors at it).
    /// Empty: none (the manifests' choice: remora-control issues its own from its identity CA).
    #[arg(
        long,
        env = "REMORA_CONTROL_TLS_SECRET",
        value_name = "NAME",
        default_value = "remora-control-tls"
    )]
    pub control_tls_secret: String,

    /// The Service in front of remora-control, in the same namespace; its certificate names it.
    #[arg(
        long,
        env = "REMORA_CONTROL_SERVICE_NAME",
        value_name = "NAME",
        default_value = "remora-control"
    )]
    pub control_service_name: String,

    /// The injector's namespace (the Secret's and the Service's), from the downward API.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "NAMESPACE",
        default_value = "remora-system"
    )]
    pub namespace: String,
}

impl ManageCertsArgs {
    /// The manager's options, or `None` when --manage-certs is off.
    pub fn options(&self, cert_file: &Path, key_file: &Path) -> Option<CertOptions> {
        self.manage_certs.then(|| CertOptions {
            secret_name: self.tls_secret.clone(),
            ca_file: Some(cert_file.with_file_name(CA_FILE_NAME)),
            service_cert: (!self.control_tls_secret.trim().is_empty()).then(|| ServiceCert {
                secret_name: self.control_tls_secret.trim().to_string(),
                service_name: self.control_service_name.clone(),
            }),
            ..CertOptions::new(
                &self.namespace,
                &self.service_name,
                &self.webhook_config_name,
                cert_file,
                key_file,
            )
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("Kubernetes API: {action} {object}: {source}")]
    Api {
        action: &'static str,
        object: String,
        source: Box<kube::Error>,
    },
    #[error("{object} kept changing under us: gave up after {MAX_ATTEMPTS} attempts (another writer is fighting over it?)")]
    TooManyConflicts { object: String },
    #[error("connecting to the Kubernetes API (in-cluster service account, or kubeconfig outside a cluster) for --manage-certs: {0}")]
    Client(Box<kube::Error>),
    #[error("writing {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The five PEM documents the Secret holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub ca_cert: String,
    pub ca_key: String,
    /// Every CA the webhook trusts: the signing CA first, then older ones that have not expired.
    pub ca_bundle: String,
    pub tls_cert: String,
    pub tls_key: String,
}

/// The same documents as read from a Secret, each possibly missing or not UTF-8.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub ca_cert: Option<String>,
    pub ca_key: Option<String>,
    pub ca_bundle: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}

impl Stored {
    pub fn from_secret(secret: &Secret) -> Stored {
        let data = secret.data.as_ref();
        let get = |key: &str| {
            data.and_then(|d| d.get(key))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        Stored {
            ca_cert: get(KEY_CA_CERT),
            ca_key: get(KEY_CA_KEY),
            ca_bundle: get(KEY_CA_BUNDLE),
            tls_cert: get(KEY_TLS_CERT),
            tls_key: get(KEY_TLS_KEY),
        }
    }
}

impl From<&Material> for Stored {
    fn from(m: &Material) -> Stored {
        Stored {
            ca_cert: Some(m.ca_cert.clone()),
            ca_key: Some(m.ca_key.clone()),
            ca_bundle: Some(m.ca_bundle.clone()),
            tls_cert: Some(m.tls_cert.clone()),
            tls_key: Some(m.tls_key.clone()),
        }
    }
}

impl Material {
    fn secret_data(&self) -> BTreeMap<String, ByteString> {
        [
            (KEY_CA_CERT, &self.ca_cert),
            (KEY_CA_KEY, &self.ca_key),
            (KEY_CA_BUNDLE, &self.ca_bundle),
            (KEY_TLS_CERT, &self.tls_cert),
            (KEY_TLS_KEY, &self.tls_key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
        .collect()
    }
}

/// Why a pass changed the Secret; logged, and what the tests check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// There was no usable CA (absent, unreadable, key mismatch or expired).
    NewCa { reason: String },
    /// The CA reached two thirds of its lifetime; the old one stays in the bundle.
    RotatedCa,
    /// Expired CAs left the bundle, or the bundle did not match the CAs.
    Bundle,
    /// A serving certificate was issued.
    NewServing { reason: String },
}

/// The Secret content one pass wants, and why it differs from what was stored.
#[derive(Debug, Clone)]
pub struct Plan {
    pub material: Material,
    pub changes: Vec<Change>,
}

/// A certificate, parsed for what the decisions need.
struct CertInfo {
    der: Vec<u8>,
    not_before: i64,
    not_after: i64,
    is_ca: bool,
    public_key: Vec<u8>,
}

impl CertInfo {
    fn parse_der(der: &[u8]) -> Option<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(CertInfo {
            der: der.to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca: cert.is_ca(),
            public_key: cert
                .tbs_certificate
                .subject_pki
                .subject_public_key
                .data
                .to_vec(),
        })
    }

    /// The first certificate of a PEM document.
    fn parse_pem(pem: &str) -> Option<CertInfo> {
        pem_certs(pem).first().and_then(|der| Self::parse_der(der))
    }

    /// Two thirds into the validity period: late enough to be rare, early enough that a
    /// long outage of the injector still leaves a third of the lifetime to recover in.
    fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }

    fn key_matches(&self, key_pem: &str) -> bool {
        KeyPair::from_pem(key_pem).is_ok_and(|key| key.public_key_raw() == self.public_key)
    }
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .map(|der| der.to_vec())
        .collect()
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn to_offset(t: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A CA and its key, both PEM.
#[derive(Debug, Clone)]
pub struct CaPair {
    pub cert: String,
    pub key: String,
}

/// Makes a new self-signed CA valid from `now` (minus a little clock skew) for `lifetime`.
pub fn new_ca(now: SystemTime, lifetime: Duration) -> Result<CaPair, CertError> {
    let generate = |source| CertError::Generate {
        what: "webhook CA",
        source,
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "remora-injector webhook CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "remora");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let start = unix_seconds(now) - CLOCK_SKEW.as_secs() as i64;
    params.not_before = to_offset(start);
    params.not_after = to_offset(unix_seconds(now) + lifetime.as_secs() as i64);
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok(CaPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issues a serving certificate for `dns_names` signed by `ca`, valid from `now` for
/// `lifetime` but never past the CA's own expiry. Returns (certificate PEM, key PEM).
pub fn issue_serving(
    ca: &CaPair,
    dns_names: &[String],
    now: SystemTime,
    lifetime: Duration,
) -> Result<(String, String), CertError> {
    let generate = |source| CertError::Generate {
        what: "serving certificate",
        source,
    };
    let ca_key = KeyPair::from_pem(&ca.key).map_err(generate)?;
    let ca_info = CertInfo::parse_pem(&ca.cert).ok_or(CertError::Generate {
        what: "serving certificate",
        source: rcgen::Error::CouldNotParseCertificate,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(generate)?;
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(dns_names.to_vec()).map_err(generate)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(name) = dns_names.get(2).or(dns_names.first()) {
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let start = unix_seconds(now) - CLOCK_SKEW.as_secs() as i64;
    let end = (unix_seconds(now) + lifetime.as_secs() as i64).min(ca_info.not_after);
    params.not_before = to_offset(start);
    params.not_after = to_offset(end);
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks that `cert_pem` chains to one of `bundle` and is valid for every name at `now`.
fn verifies(cert_pem: &str, bundle: &[Vec<u8>], dns_names: &[String], now: SystemTime) -> bool {
    let Some(leaf) = pem_certs(cert_pem).into_iter().next() else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in bundle {
        if roots.add(CertificateDer::from(der.clone())).is_err() {
            return false;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
    else {
        return false;
    };
    let Ok(since_epoch) = now.duration_since(UNIX_EPOCH) else {
        return false;
    };
    let leaf = CertificateDer::from(leaf);
    dns_names.iter().all(|name| {
        ServerName::try_from(name.clone()).is_ok_and(|server_name| {
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &server_name,
                    &[],
                    UnixTime::since_unix_epoch(since_epoch),
                )
                .is_ok()
        })
    })
}

/// Decides what the Secret should hold, from what it holds: pure apart from key generation.
pub fn plan(
    stored: &Stored,
    dns_names: &[String],
    now: SystemTime,
    ca_lifetime: Duration,
    serving_lifetime: Duration,
) -> Result<Plan, CertError> {
    let now_s = unix_seconds(now);
    let mut changes = Vec::new();

    // The signing CA: reuse it while it is sound and young enough.
    let stored_ca = stored.ca_cert.as_deref().and_then(CertInfo::parse_pem);
    let usable_ca = match (&stored_ca, stored.ca_key.as_deref()) {
        (None, _) => Err("absent or unreadable"),
        (Some(_), None) => Err("its key is absent"),
        (Some(info), Some(_)) if !info.is_ca => Err("not a CA certificate"),
        (Some(info), Some(key)) if !info.key_matches(key) => Err("its key does not match"),
        (Some(info), Some(_)) if now_s >= info.not_after => Err("expired"),
        (Some(info), Some(_)) => Ok(info),
    };
    let ca = match usable_ca {
        Ok(info) if now_s < info.renew_at() => CaPair {
            cert: stored.ca_cert.clone().unwrap_or_default(),
            key: stored.ca_key.clone().unwrap_or_default(),
        },
        Ok(_) => {
            changes.push(Change::RotatedCa);
            new_ca(now, ca_lifetime)?
        }
        Err(reason) => {
            changes.push(Change::NewCa {
                reason: reason.to_string(),
            });
            new_ca(now, ca_lifetime)?
        }
    };

    // The bundle: the signing CA, then every other unexpired CA we knew, so that certificates
    // they signed keep verifying while they are still served.
    let mut bundle: Vec<CertInfo> = Vec::new();
    let candidates = pem_certs(&ca.cert)
        .into_iter()
        .chain(stored.ca_cert.as_deref().map(pem_certs).unwrap_or_default())
        .chain(
            stored
                .ca_bundle
                .as_deref()
                .map(pem_certs)
                .unwrap_or_default(),
        );
    for der in candidates {
        let Some(info) = CertInfo::parse_der(&der) else {
            continue;
        };
        if info.is_ca
            && now_s < info.not_after
            && !bundle.iter().any(|b| b.der == info.der)
            && bundle.len() < MAX_BUNDLE_CAS
        {
            bundle.push(info);
        }
    }
    let ca_bundle: String = bundle
        .iter()
        .map(|info| certificate_pem(&info.der))
        .collect::<Vec<_>>()
        .concat();
    if stored.ca_bundle.as_deref() != Some(ca_bundle.as_str())
        && !changes
            .iter()
            .any(|c| matches!(c, Change::NewCa { .. } | Change::RotatedCa))
    {
        changes.push(Change::Bundle);
    }

    let bundle_der: Vec<Vec<u8>> = bundle.iter().map(|b| b.der.clone()).collect();
    let serving_problem = serving_problem(stored, &bundle_der, dns_names, now);
    let (tls_cert, tls_key) = match serving_problem {
        None => (
            stored.tls_cert.clone().unwrap_or_default(),
            stored.tls_key.clone().unwrap_or_default(),
        ),
        Some(reason) => {
            changes.push(Change::NewServing {
                reason: reason.to_string(),
            });
            issue_serving(&ca, dns_names, now, serving_lifetime)?
        }
    };

    Ok(Plan {
        material: Material {
            ca_cert: ca.cert,
            ca_key: ca.key,
            ca_bundle,
            tls_cert,
            tls_key,
        },
        changes,
    })
}

/// Why the stored serving certificate must be re-issued, if it must: it is kept while it
/// verifies for every name against the bundle and is younger than two thirds of its lifetime.
fn serving_problem(
    stored: &Stored,
    bundle_der: &[Vec<u8>],
    dns_names: &[String],
    now: SystemTime,
) -> Option<&'static str> {
    let stored_serving = stored.tls_cert.as_deref().and_then(CertInfo::parse_pem);
    match (&stored_serving, stored.tls_key.as_deref()) {
        (None, _) => Some("absent or unreadable"),
        (Some(_), None) => Some("its key is absent"),
        (Some(info), Some(key)) if !info.key_matches(key) => Some("its key does not match"),
        (Some(_), Some(_))
            if !verifies(
                stored.tls_cert.as_deref().unwrap_or_default(),
                bundle_der,
                dns_names,
                now,
            ) =>
        {
            Some("it does not verify against the CA bundle for every Service name")
        }
        (Some(info), Some(_)) if unix_seconds(now) >= info.renew_at() => {
            Some("two thirds of its lifetime passed")
        }
        _ => None,
    }
}

/// What another Service's Secret holds: its serving pair and the CA bundle that verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMaterial {
    pub tls_cert: String,
    pub tls_key: String,
    /// The CA bundle, as in the webhook's Secret.
    pub ca_cert: String,
}

impl ServiceMaterial {
    fn secret_data(&self) -> BTreeMap<String, ByteString> {
        [
            (KEY_TLS_CERT, &self.tls_cert),
            (KEY_TLS_KEY, &self.tls_key),
            (KEY_CA_CERT, &self.ca_cert),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
        .collect()
    }
}

/// Decides what another Service's Secret should hold, given the webhook's current `material`
/// (whose CA signs and whose bundle verifies): the stored pair while it is sound, else a new
/// one from the signing CA. Pure apart from key generation.
pub fn plan_service(
    stored: &Stored,
    material: &Material,
    dns_names: &[String],
    now: SystemTime,
    lifetime: Duration,
) -> Result<(ServiceMaterial, Vec<Change>), CertError> {
    let mut changes = Vec::new();
    let (tls_cert, tls_key) =
        match serving_problem(stored, &pem_certs(&material.ca_bundle), dns_names, now) {
            None => (
                stored.tls_cert.clone().unwrap_or_default(),
                stored.tls_key.clone().unwrap_or_default(),
            ),
            Some(reason) => {
                changes.push(Change::NewServing {
                    reason: reason.to_string(),
                });
                let ca = CaPair {
                    cert: material.ca_cert.clone(),
                    key: material.ca_key.clone(),
                };
                issue_serving(&ca, dns_names, now, lifetime)?
            }
        };
    if stored.ca_cert.as_deref() != Some(material.ca_bundle.as_str()) && changes.is_empty() {
        changes.push(Change::Bundle);
    }
    Ok((
        ServiceMaterial {
            tls_cert,
            tls_key,
            ca_cert: material.ca_bundle.clone(),
        },
        changes,
    ))
}

/// One certificate as a PEM block, 64 columns, as `openssl` writes it.
pub(crate) fn certificate_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The JSON patch that sets every webhook's `clientConfig.caBundle` to `bundle`, or `None`
/// when all already match. Each replaced entry is guarded by a `test` of its name, and the
/// whole patch by the `resourceVersion` read: a list reordered or edited in between makes the
/// API server refuse the patch (422) instead of writing into the wrong webhook.
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    bundle: &[u8],
) -> Option<(json_patch::Patch, Vec<String>)> {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
    let mut ops = Vec::new();
    if let Some(rv) = &config.metadata.resource_version {
        ops.push(
            serde_json::json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}),
        );
    }
    let mut stale = Vec::new();
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            == Some(bundle)
        {
            continue;
        }
        stale.push(webhook.name.clone());
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name}));
        ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
    }
    if stale.is_empty() {
        return None;
    }
    let patch = serde_json::from_value(serde_json::Value::Array(ops)).ok()?;
    Some((patch, stale))
}

/// What happened to the webhook registration in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookSync {
    InSync,
    /// These webhooks had a stale or missing `caBundle`.
    Patched(Vec<String>),
    /// Not registered (yet): `kubectl apply` may create it after the Deployment.
    Missing,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Changes this replica wrote into the Secret (empty when it adopted or reused one).
    pub changes: Vec<Change>,
    /// The Secret was created by this replica.
    pub created: bool,
    pub webhook: WebhookSync,
    /// The certificate, key or CA bundle file was rewritten.
    pub files_written: bool,
    pub material: Material,
    pub service: ServiceSync,
}

/// What happened to the other Service's Secret (remora-control's) in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceSync {
    /// Not managed (`--control-tls-secret ''`).
    Off,
    /// Holds a sound certificate; `changes` are what this replica wrote.
    Done {
        material: ServiceMaterial,
        changes: Vec<Change>,
        created: bool,
    },
    /// Could not be brought up to date. The webhook does not depend on it, so this is logged
    /// and retried at the next pass rather than failing the pass.
    Failed(String),
}

fn api_error(
    action: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(kube::Error) -> CertError {
    let object = object.into();
    move |source| CertError::Api {
        action,
        object,
        source: Box::new(source),
    }
}

fn is_status(err: &kube::Error, pred: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(err, kube::Error::Api(status) if pred(status))
}

/// One pass at the current time: see [`ensure_at`].
pub async fn ensure(client: &Client, opts: &CertOptions) -> Result<Reconciled, CertError> {
    ensure_at(client, opts, SystemTime::now()).await
}

/// One pass: brings the Secret up to date (or adopts another replica's), syncs the webhook's
/// `caBundle`, then writes the files — in that order, so the API server is told about a new CA
/// before this replica serves anything it signed.
pub async fn ensure_at(
    client: &Client,
    opts: &CertOptions,
    now: SystemTime,
) -> Result<Reconciled, CertError> {
    let (material, changes, created) = ensure_secret(client, opts, now).await?;
    let webhook = sync_webhook(client, opts, material.ca_bundle.as_bytes()).await?;
    let service = match &opts.service_cert {
        None => ServiceSync::Off,
        Some(service) => match ensure_service_secret(client, opts, service, &material, now).await {
            Ok((material, changes, created)) => ServiceSync::Done {
                material,
                changes,
                created,
            },
            Err(error) => {
                warn!(secret = %service.secret_name, %error, "could not update the control plane's certificate; will retry");
                ServiceSync::Failed(error.to_string())
            }
        },
    };
    let key_written = write_if_changed(&opts.key_file, material.tls_key.as_bytes(), 0o600)?;
    let cert_written = write_if_changed(&opts.cert_file, material.tls_cert.as_bytes(), 0o644)?;
    let ca_written = match &opts.ca_file {
        Some(path) => write_if_changed(path, material.ca_bundle.as_bytes(), 0o644)?,
        None => false,
    };
    Ok(Reconciled {
        changes,
        created,
        webhook,
        files_written: key_written || cert_written || ca_written,
        material,
        service,
    })
}

async fn ensure_secret(
    client: &Client,
    opts: &CertOptions,
    now: SystemTime,
) -> Result<(Material, Vec<Change>, bool), CertError> {
    let dns_names = opts.dns_names();
    reconcile_secret(client, &opts.namespace, &opts.secret_name, |stored| {
        let plan = plan(
            stored,
            &dns_names,
            now,
            opts.ca_lifetime,
            opts.serving_lifetime,
        )?;
        let data = plan.material.secret_data();
        Ok((plan.material, data, plan.changes))
    })
    .await
}

/// One pass over another Service's Secret (remora-control's), signed by `material`'s CA.
async fn ensure_service_secret(
    client: &Client,
    opts: &CertOptions,
    service: &ServiceCert,
    material: &Material,
    now: SystemTime,
) -> Result<(ServiceMaterial, Vec<Change>, bool), CertError> {
    let dns_names = service_dns_names(&service.service_name, &opts.namespace);
    reconcile_secret(client, &opts.namespace, &service.secret_name, |stored| {
        let (wanted, changes) =
            plan_service(stored, material, &dns_names, now, opts.serving_lifetime)?;
        let data = wanted.secret_data();
        Ok((wanted, data, changes))
    })
    .await
}

/// Brings one Secret to what `plan` wants from what it holds: created if absent (a lost create
/// race re-reads and adopts the winner's), replaced with the `resourceVersion` read (a lost
/// update race re-reads and re-plans). Returns what it holds now, the changes this replica
/// wrote, and whether it created the Secret.
async fn reconcile_secret<T>(
    client: &Client,
    namespace: &str,
    name: &str,
    mut plan: impl FnMut(&Stored) -> Result<(T, BTreeMap<String, ByteString>, Vec<Change>), CertError>,
) -> Result<(T, Vec<Change>, bool), CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let object = format!("Secret {namespace}/{name}");
    for attempt in 1..=MAX_ATTEMPTS {
        let existing = secrets
            .get_opt(name)
            .await
            .map_err(api_error("reading", &object))?;
        let stored = existing
            .as_ref()
            .map(Stored::from_secret)
            .unwrap_or_default();
        let (wanted, data, changes) = plan(&stored)?;
        let held = existing.as_ref().and_then(|secret| secret.data.as_ref());
        let current = data
            .iter()
            .all(|(key, value)| held.and_then(|held| held.get(key)) == Some(value));
        if changes.is_empty() && current {
            debug!(%object, "certificates are current");
            return Ok((wanted, Vec::new(), false));
        }
        let result = match existing {
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: Some(namespace.to_string()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "remora-injector".to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    type_: Some("kubernetes.io/tls".to_string()),
                    data: Some(data),
                    ..Secret::default()
                };
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .map(|_| true)
            }
            Some(mut secret) => {
                // Keep the read resourceVersion: a concurrent writer makes this a 409 Conflict.
                let mut held = secret.data.take().unwrap_or_default();
                held.extend(data);
                secret.data = Some(held);
                secrets
                    .replace(name, &PostParams::default(), &secret)
                    .await
                    .map(|_| false)
            }
        };
        match result {
            Ok(created) => {
                for change in &changes {
                    info!(%object, ?change, created, "wrote certificates");
                }
                return Ok((wanted, changes, created));
            }
            Err(err) if is_status(&err, |s| s.is_already_exists() || s.is_conflict()) => {
                info!(%object, attempt, "another replica wrote the Secret first; re-reading to adopt its certificates");
            }
            Err(err) => return Err(api_error("writing", &object)(err)),
        }
    }
    Err(CertError::TooManyConflicts { object })
}

async fn sync_webhook(
    client: &Client,
    opts: &CertOptions,
    bundle: &[u8],
) -> Result<WebhookSync, CertError> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let object = format!("MutatingWebhookConfiguration {}", opts.webhook_config_name);
    for attempt in 1..=MAX_ATTEMPTS {
        let Some(config) = configs
            .get_opt(&opts.webhook_config_name)
            .await
            .map_err(api_error("reading", &object))?
        else {
            warn!(%object, "not found (yet); its caBundle will be set once it exists");
            return Ok(WebhookSync::Missing);
        };
        let Some((patch, stale)) = ca_bundle_patch(&config, bundle) else {
            return Ok(WebhookSync::InSync);
        };
        match configs
            .patch(
                &opts.webhook_config_name,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await
        {
            Ok(_) => {
                info!(%object, webhooks = ?stale, "set caBundle");
                return Ok(WebhookSync::Patched(stale));
            }
            // 409 from a write race, 422 from a failed `test` (edited in between): re-read.
            Err(err) if is_status(&err, |s| s.is_conflict() || s.is_invalid()) => {
                info!(%object, attempt, "changed while patching caBundle; re-reading");
            }
            Err(err) => return Err(api_error("patching", &object)(err)),
        }
    }
    Err(CertError::TooManyConflicts { object })
}

/// Writes atomically (temp file + rename in the same directory) so the server's reload never
/// sees half a file; leaves an identical file alone so it does not reload for nothing.
fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool, CertError> {
    if std::fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(false);
    }
    let fail = |source| CertError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(fail)?;
    file.write_all(contents).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    Ok(true)
}

/// `period` give or take 20%, so replicas started together do not poll in lockstep.
fn jittered(period: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let spread = period.as_millis() as u64 / 5;
    if spread == 0 {
        return period;
    }
    let offset = random % (2 * spread + 1);
    Duration::from_millis(period.as_millis() as u64 - spread + offset)
}

/// Makes sure the certificates exist and are written (so the server can start), then keeps
/// them current in the background. An error here means the first pass failed.
pub async fn start(
    client: Client,
    opts: CertOptions,
) -> Result<tokio::task::JoinHandle<()>, CertError> {
    let first = ensure(&client, &opts).await?;
    info!(
        secret = %opts.secret_name,
        created = first.created,
        webhook = ?first.webhook,
        "webhook certificates ready"
    );
    let missing = first.webhook == WebhookSync::Missing;
    Ok(tokio::spawn(run_after(client, opts, missing)))
}

/// `serve --manage-certs`: connects to the API server with the pod's service account, makes
/// sure the certificate files are written, and keeps them current in the background. Without
/// the flag it does nothing and the files are expected from elsewhere.
pub async fn start_if_enabled(
    args: &ManageCertsArgs,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Option<tokio::task::JoinHandle<()>>, CertError> {
    let Some(opts) = args.options(cert_file, key_file) else {
        return Ok(None);
    };
    // The kube client builds its TLS config from the process default provider: make it ring,
    // the workspace's one provider, whatever else is linked.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default()
        .await
        .map_err(|e| CertError::Client(Box::new(e)))?;
    start(client, opts).await.map(Some)
}

/// Keeps the certificates current forever: one pass per resync period (with jitter), sooner
/// while the webhook registration is missing, backing off on API errors.
pub async fn run(client: Client, opts: CertOptions) {
    run_after(client, opts, false).await
}

async fn run_after(client: Client, opts: CertOptions, mut webhook_missing: bool) {
    let short = Duration::from_secs(5).min(opts.resync_period);
    let mut failures: u32 = 0;
    loop {
        let delay = if failures > 0 {
            (short * 2u32.saturating_pow(failures.min(6))).min(opts.resync_period)
        } else if webhook_missing {
            short
        } else {
            opts.resync_period
        };
        tokio::time::sleep(jittered(delay)).await;
        match ensure(&client, &opts).await {
            Ok(done) => {
                failures = 0;
                webhook_missing = done.webhook == WebhookSync::Missing;
                if done.files_written {
                    info!(cert = %opts.cert_file.display(), "serving certificate files updated");
                }
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                warn!(error = %err, failures, "webhook certificate pass failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The manager against a fake API server that answers as the real one does: objects with
    //! `resourceVersion`, and `Status` bodies for 404 NotFound, 409 AlreadyExists, 409 Conflict
    //! and 422 Invalid (a failed JSON patch `test`).

    use super::*;
    use bytes::Bytes;
    use http::{Method, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use serde_json::{json, Value};
    use std::convert::Infallible;
    use std::sync::Mutex;

    const NS: &str = "remora-system";
    const SECRETS: &str = "/api/v1/namespaces/remora-system/secrets";
    const SECRET: &str = "/api/v1/namespaces/remora-system/secrets/remora-injector-tls";
    const MWC: &str =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/remora-injector";
    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[derive(Default)]
    struct State {
        objects: BTreeMap<String, Value>,
        next_rv: u64,
        requests: Vec<(Method, String)>,
        /// Stored under the path just before the next POST is answered: a replica that won.
        race_on_create: Option<(String, Value)>,
        /// Applied to the stored object just before the next PUT is answered: a replica that
        /// wrote in between our read and our write.
        race_on_update: Option<(String, Value)>,
        /// Stored under the path just before the next PATCH is answered: an edit in between.
        race_on_patch: Option<(String, Value)>,
        /// Paths answered 403 Forbidden, as RBAC would.
        forbidden: Vec<String>,
    }

    #[derive(Clone, Default)]
    struct FakeApi(Arc<Mutex<State>>);

    fn status(code: u16, reason: &str, message: String, kind: &str, name: &str) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason,
            "details": {"name": name, "kind": kind}, "code": code
        })
    }

    impl FakeApi {
        fn client(&self) -> Client {
            let api = self.clone();
            let service = tower::service_fn(move |req: Request<kube::client::Body>| {
                let api = api.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let (code, value) = api.answer(&parts.method, parts.uri.path(), &body);
                    let response = Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(value.to_string())))
                        .unwrap_or_default();
                    Ok::<_, Infallible>(response)
                }
            });
            Client::new(service, NS)
        }

        fn put(&self, path: &str, mut object: Value) {
            let mut state = self.0.lock().unwrap();
            state.next_rv += 1;
            object["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
            state.objects.insert(path.to_string(), object);
        }

        fn get(&self, path: &str) -> Option<Value> {
            self.0.lock().unwrap().objects.get(path).cloned()
        }

        fn writes(&self) -> Vec<(Method, String)> {
            let state = self.0.lock().unwrap();
            state
                .requests
                .iter()
                .filter(|(m, _)| m != Method::GET)
                .cloned()
                .collect()
        }

        fn clear_log(&self) {
            self.0.lock().unwrap().requests.clear();
        }

        fn answer(&self, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
            let mut state = self.0.lock().unwrap();
            state.requests.push((method.clone(), path.to_string()));
            let kind = if path.contains("/secrets") {
                "secrets"
            } else {
                "mutatingwebhookconfigurations"
            };
            if state.forbidden.iter().any(|p| path.starts_with(p.as_str())) {
                let name = path.rsplit('/').next().unwrap_or_default();
                return (
                    StatusCode::FORBIDDEN,
                    status(
                        403,
                        "Forbidden",
                        format!("{kind} \"{name}\" is forbidden"),
                        kind,
                        name,
                    ),
                );
            }
            let Ok(mut sent) =
                serde_json::from_slice::<Value>(if body.is_empty() { b"null" } else { body })
            else {
                return (
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", "bad body".into(), kind, ""),
                );
            };
            match *method {
                Method::GET => match state.objects.get(path) {
                    Some(object) => (StatusCode::OK, object.clone()),
                    None => {
                        let name = path.rsplit('/').next().unwrap_or_default();
                        (
                            StatusCode::NOT_FOUND,
                            status(
                                404,
                                "NotFound",
                                format!("{kind} \"{name}\" not found"),
                                kind,
                                name,
                            ),
                        )
                    }
                },
                Method::POST => {
                    let name = sent["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let path = format!("{path}/{name}");
                    if let Some((race_path, winner)) = state.race_on_create.take() {
                        state.next_rv += 1;
                        let mut winner = winner;
                        winner["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                        state.objects.insert(race_path, winner);
                    }
                    if state.objects.contains_key(&path) {
                        return (
                            StatusCode::CONFLICT,
                            status(
                                409,
                                "AlreadyExists",
                                format!("{kind} \"{name}\" already exists"),
                                kind,
                                &name,
                            ),
                        );
                    }
                    state.next_rv += 1;
                    sent["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                    sent["metadata"]["uid"] = json!(format!("uid-{}", state.next_rv));
                    state.objects.insert(path, sent.clone());
                    (StatusCode::CREATED, sent)
                }
                Method::PUT => {
                    let name = path.rsplit('/').next().unwrap_or_default().to_string();
                    if let Some((race_path, data)) = state.race_on_update.take() {
                        state.next_rv += 1;
                        let rv = state.next_rv.to_string();
                        if let Some(object) = state.objects.get_mut(&race_path) {
                            object["data"] = data;
                            object["metadata"]["resourceVersion"] = json!(rv);
                        }
                    }
                    let Some(current) = state.objects.get(path) else {
                        return (
                            StatusCode::NOT_FOUND,
                            status(
                                404,
                                "NotFound",
                                format!("{kind} \"{name}\" not found"),
                                kind,
                                &name,
                            ),
                        );
                    };
                    if sent["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]
                    {
                        return (StatusCode::CONFLICT, status(409, "Conflict", format!("Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"), kind, &name));
                    }
                    state.next_rv += 1;
                    sent["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                    state.objects.insert(path.to_string(), sent.clone());
                    (StatusCode::OK, sent)
                }
                Method::PATCH => {
                    let name = path.rsplit('/').next().unwrap_or_default().to_string();
                    if let Some((race_path, mut edited)) = state.race_on_patch.take() {
                        state.next_rv += 1;
                        edited["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                        state.objects.insert(race_path, edited);
                    }
                    let Some(mut object) = state.objects.get(path).cloned() else {
                        return (
                            StatusCode::NOT_FOUND,
                            status(
                                404,
                                "NotFound",
                                format!("{kind} \"{name}\" not found"),
                                kind,
                                &name,
                            ),
                        );
                    };
                    let Ok(patch) = serde_json::from_value::<json_patch::Patch>(sent) else {
                        return (
                            StatusCode::BAD_REQUEST,
                            status(400, "BadRequest", "not a JSON patch".into(), kind, &name),
                        );
                    };
                    if let Err(err) = json_patch::patch(&mut object, &patch) {
                        return (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            status(422, "Invalid", err.to_string(), kind, &name),
                        );
                    }
                    state.next_rv += 1;
                    object["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                    state.objects.insert(path.to_string(), object.clone());
                    (StatusCode::OK, object)
                }
                _ => (
                    StatusCode::METHOD_NOT_ALLOWED,
                    status(405, "MethodNotAllowed", "no".into(), kind, ""),
                ),
            }
        }
    }

    fn webhook_config(bundles: [Option<&[u8]>; 2]) -> Value {
        use base64::Engine as _;
        let hook = |name: &str, path: &str, bundle: Option<&[u8]>| {
            let mut client_config = json!({"service": {"name": "remora-injector", "namespace": NS, "path": path, "port": 443}});
            if let Some(bundle) = bundle {
                client_config["caBundle"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(bundle));
            }
            json!({
                "name": name, "clientConfig": client_config,
                "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]
            })
        };
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "remora-injector"},
            "webhooks": [
                hook("namespace.inject.remora.io", "/inject", bundles[0]),
                hook("pod.inject.remora.io", "/inject/opt-in", bundles[1]),
            ]
        })
    }

    /// Each webhook's caBundle, decoded (PEM text reads better in a failed assertion).
    fn registered_bundles(api: &FakeApi) -> Vec<String> {
        let config: MutatingWebhookConfiguration =
            serde_json::from_value(api.get(MWC).unwrap()).unwrap();
        config
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| {
                String::from_utf8_lossy(&w.client_config.ca_bundle.map(|b| b.0).unwrap_or_default())
                    .into_owned()
            })
            .collect()
    }

    fn stored(api: &FakeApi) -> Stored {
        Stored::from_secret(&serde_json::from_value(api.get(SECRET).unwrap()).unwrap())
    }

    /// A registration whose two webhooks both carry `material`'s CA bundle.
    fn in_sync_webhook_config(material: &Material) -> Value {
        let bundle = material.ca_bundle.as_bytes();
        webhook_config([Some(bundle), Some(bundle)])
    }

    fn options(dir: &tempfile::TempDir) -> CertOptions {
        CertOptions::new(
            NS,
            "remora-injector",
            "remora-injector",
            dir.path().join("tls/tls.crt"),
            dir.path().join("tls/tls.key"),
        )
    }

    /// A Secret as another replica would have written it, issued at `issued`.
    fn secret_issued_at(issued: SystemTime, opts: &CertOptions) -> (Value, Material) {
        let ca = new_ca(issued, opts.ca_lifetime).unwrap();
        let (tls_cert, tls_key) =
            issue_serving(&ca, &opts.dns_names(), issued, opts.serving_lifetime).unwrap();
        let material = Material {
            ca_bundle: ca.cert.clone(),
            ca_cert: ca.cert,
            ca_key: ca.key,
            tls_cert,
            tls_key,
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(opts.secret_name.clone()),
                namespace: Some(NS.into()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(material.secret_data()),
            ..Secret::default()
        };
        (serde_json::to_value(secret).unwrap(), material)
    }

    fn serves_for_every_name(material: &Material, opts: &CertOptions, now: SystemTime) -> bool {
        verifies(
            &material.tls_cert,
            &pem_certs(&material.ca_bundle),
            &opts.dns_names(),
            now,
        )
    }

    fn not_after(pem: &str) -> i64 {
        CertInfo::parse_pem(pem).unwrap().not_after
    }

    const CONTROL_SECRET: &str = "/api/v1/namespaces/remora-system/secrets/remora-control-tls";

    /// As `serve --manage-certs` runs by default: also remora-control's Secret and `ca.crt`.
    fn options_with_control(dir: &tempfile::TempDir) -> CertOptions {
        CertOptions {
            ca_file: Some(dir.path().join("tls/ca.crt")),
            service_cert: Some(ServiceCert {
                secret_name: "remora-control-tls".into(),
                service_name: "remora-control".into(),
            }),
            ..options(dir)
        }
    }

    fn control_material(api: &FakeApi) -> ServiceMaterial {
        let stored =
            Stored::from_secret(&serde_json::from_value(api.get(CONTROL_SECRET).unwrap()).unwrap());
        ServiceMaterial {
            tls_cert: stored.tls_cert.unwrap(),
            tls_key: stored.tls_key.unwrap(),
            ca_cert: stored.ca_cert.unwrap(),
        }
    }

    fn control_names() -> Vec<String> {
        service_dns_names("remora-control", NS)
    }

    #[tokio::test]
    async fn the_same_ca_issues_the_control_planes_certificate_and_its_bundle_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options_with_control(&dir);
        let api = FakeApi::default();
        api.put(MWC, webhook_config([None, None]));
        let now = SystemTime::now();

        let done = ensure_at(&api.client(), &opts, now).await.unwrap();

        let ServiceSync::Done {
            material: control,
            changes,
            created: true,
        } = &done.service
        else {
            panic!("{:?}", done.service);
        };
        assert!(
            matches!(&changes[..], [Change::NewServing { .. }]),
            "{changes:?}"
        );
        assert_eq!(&control_material(&api), control);
        let secret = api.get(CONTROL_SECRET).unwrap();
        assert_eq!(secret["type"], "kubernetes.io/tls");
        // The proxies' trust anchors (the bundle, in ca.crt) verify remora-control by the name
        // they dial; the webhook's own certificate is not one remora-control could present.
        let anchors = std::fs::read_to_string(opts.ca_file.as_ref().unwrap()).unwrap();
        assert_eq!(anchors, done.material.ca_bundle);
        assert_eq!(control.ca_cert, anchors);
        assert!(verifies(
            &control.tls_cert,
            &pem_certs(&anchors),
            &control_names(),
            now
        ));
        assert!(!verifies(
            &done.material.tls_cert,
            &pem_certs(&anchors),
            &control_names()[2..3],
            now
        ));
        assert!(!verifies(
            &control.tls_cert,
            &pem_certs(&anchors),
            &opts.dns_names()[2..3],
            now
        ));

        api.clear_log();
        let again = ensure_at(&api.client(), &opts, now).await.unwrap();
        assert_eq!(api.writes(), vec![]);
        assert!(!again.files_written);
        assert!(
            matches!(&again.service, ServiceSync::Done { changes, created: false, .. } if changes.is_empty())
        );
    }

    #[tokio::test]
    async fn an_aging_control_certificate_is_renewed_and_a_rotated_ca_reaches_its_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options_with_control(&dir);
        let api = FakeApi::default();
        api.put(MWC, webhook_config([None, None]));
        let start = SystemTime::now() - 70 * DAY;
        ensure_at(&api.client(), &opts, start).await.unwrap();
        let (webhook_before, control_before) = (stored(&api), control_material(&api));

        // 70 days on: both serving certificates are past two thirds; the CA stays.
        let now = SystemTime::now();
        let done = ensure_at(&api.client(), &opts, now).await.unwrap();
        let control = control_material(&api);
        assert_ne!(control.tls_cert, control_before.tls_cert);
        assert_eq!(done.material.ca_cert, webhook_before.ca_cert.unwrap());
        assert!(verifies(
            &control.tls_cert,
            &pem_certs(&control.ca_cert),
            &control_names(),
            now
        ));

        // Years on, the CA rotates: remora-control keeps its certificate (the old CA is still in
        // the bundle) and its Secret's ca.crt gets the bundle with both.
        let later = now + 7 * 365 * DAY;
        let config = CertOptions {
            serving_lifetime: 3000 * DAY,
            ..opts.clone()
        };
        let long = ensure_at(&api.client(), &config, now + 6 * 365 * DAY)
            .await
            .unwrap();
        assert!(
            (long.changes.iter()).all(|c| !matches!(c, Change::RotatedCa | Change::NewCa { .. })),
            "{:?}",
            long.changes
        );
        assert!(matches!(long.service, ServiceSync::Done { .. }));
        let before_rotation = control_material(&api);
        let rotated = ensure_at(&api.client(), &config, later).await.unwrap();
        assert_eq!(rotated.changes, vec![Change::RotatedCa]);
        let after = control_material(&api);
        assert_eq!(after.tls_cert, before_rotation.tls_cert);
        assert_eq!(after.ca_cert, rotated.material.ca_bundle);
        assert_eq!(pem_certs(&after.ca_cert).len(), 2);
        assert!(
            matches!(&rotated.service, ServiceSync::Done { changes, .. } if changes == &[Change::Bundle])
        );
        assert_eq!(
            std::fs::read_to_string(opts.ca_file.as_ref().unwrap()).unwrap(),
            rotated.material.ca_bundle
        );
    }

    #[tokio::test]
    async fn a_control_secret_the_injector_may_not_write_does_not_stop_the_webhook() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options_with_control(&dir);
        let api = FakeApi::default();
        api.put(MWC, webhook_config([None, None]));
        api.0.lock().unwrap().forbidden.push(CONTROL_SECRET.into());

        let done = ensure_at(&api.client(), &opts, SystemTime::now())
            .await
            .unwrap();

        assert!(
            matches!(&done.service, ServiceSync::Failed(error) if error.contains("remora-control-tls")),
            "{:?}",
            done.service
        );
        assert!(done.created && done.files_written);
        assert!(opts.cert_file.exists() && opts.ca_file.as_ref().unwrap().exists());
    }

    #[tokio::test]
    async fn fresh_start_creates_the_secret_registers_the_ca_and_writes_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        api.put(MWC, webhook_config([None, None]));
        let now = SystemTime::now();

        let done = ensure_at(&api.client(), &opts, now).await.unwrap();

        assert!(done.created);
        assert!(
            matches!(
                &done.changes[..],
                [Change::NewCa { .. }, Change::NewServing { .. }]
            ),
            "{:?}",
            done.changes
        );
        assert_eq!(
            done.webhook,
            WebhookSync::Patched(vec![
                "namespace.inject.remora.io".into(),
                "pod.inject.remora.io".into()
            ])
        );
        assert_eq!(
            api.writes(),
            vec![
                (Method::POST, SECRETS.to_string()),
                (Method::PATCH, MWC.to_string())
            ]
        );
        let secret = api.get(SECRET).unwrap();
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(stored(&api), Stored::from(&done.material));
        let bundle = done.material.ca_bundle.clone();
        assert_eq!(registered_bundles(&api), vec![bundle.clone(), bundle]);
        assert_eq!(
            std::fs::read_to_string(&opts.cert_file).unwrap(),
            done.material.tls_cert
        );
        assert_eq!(
            std::fs::read_to_string(&opts.key_file).unwrap(),
            done.material.tls_key
        );
        assert!(serves_for_every_name(&done.material, &opts, now));
        assert!(!verifies(
            &done.material.tls_cert,
            &pem_certs(&done.material.ca_bundle),
            &["other.remora-system.svc".into()],
            now
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&opts.key_file)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key file readable by others: {mode:o}");
        }
    }

    #[tokio::test]
    async fn an_existing_valid_secret_is_reused_without_any_write() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        let (secret, material) = secret_issued_at(SystemTime::now() - DAY, &opts);
        api.put(SECRET, secret);
        api.put(MWC, in_sync_webhook_config(&material));

        let done = ensure(&api.client(), &opts).await.unwrap();

        assert!(done.changes.is_empty() && !done.created);
        assert_eq!(done.webhook, WebhookSync::InSync);
        assert_eq!(api.writes(), vec![]);
        assert_eq!(done.material, material);
        assert!(done.files_written);
        assert_eq!(
            std::fs::read_to_string(&opts.cert_file).unwrap(),
            material.tls_cert
        );

        // Files already current: not rewritten (no needless reload in the server).
        let again = ensure(&api.client(), &opts).await.unwrap();
        assert!(!again.files_written);
    }

    #[tokio::test]
    async fn losing_the_create_race_adopts_the_winners_ca() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        api.put(MWC, webhook_config([None, None]));
        let (winner, theirs) = secret_issued_at(SystemTime::now(), &opts);
        api.0.lock().unwrap().race_on_create = Some((SECRET.to_string(), winner));

        let done = ensure(&api.client(), &opts).await.unwrap();

        assert!(!done.created && done.changes.is_empty(), "{done:?}");
        assert_eq!(done.material, theirs);
        assert_eq!(stored(&api), Stored::from(&theirs));
        let methods: Vec<Method> = api
            .0
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|(m, _)| m.clone())
            .collect();
        // GET (absent) → POST (409 AlreadyExists) → GET (theirs) → webhook GET → PATCH.
        assert_eq!(
            methods,
            vec![
                Method::GET,
                Method::POST,
                Method::GET,
                Method::GET,
                Method::PATCH
            ]
        );
        let bundle = theirs.ca_bundle.clone();
        assert_eq!(registered_bundles(&api), vec![bundle.clone(), bundle]);
        assert_eq!(
            std::fs::read_to_string(&opts.cert_file).unwrap(),
            theirs.tls_cert
        );
    }

    #[tokio::test]
    async fn two_replicas_starting_together_end_with_one_ca() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (opts_a, opts_b) = (options(&dir_a), options(&dir_b));
        let api = FakeApi::default();
        api.put(MWC, webhook_config([None, None]));
        let (client_a, client_b) = (api.client(), api.client());

        let (a, b) = tokio::join!(ensure(&client_a, &opts_a), ensure(&client_b, &opts_b));
        let (a, b) = (a.unwrap(), b.unwrap());

        assert_eq!(a.material, b.material);
        assert_eq!(stored(&api), Stored::from(&a.material));
        assert_eq!(pem_certs(&a.material.ca_bundle).len(), 1);
        assert_eq!(
            std::fs::read(&opts_a.cert_file).unwrap(),
            std::fs::read(&opts_b.cert_file).unwrap()
        );
        let bundle = a.material.ca_bundle.clone();
        assert_eq!(registered_bundles(&api), vec![bundle.clone(), bundle]);
    }

    #[tokio::test]
    async fn a_stale_ca_bundle_is_patched_and_a_matching_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        let (secret, material) = secret_issued_at(SystemTime::now(), &opts);
        api.put(SECRET, secret);
        let other = new_ca(SystemTime::now(), DAY).unwrap();
        api.put(
            MWC,
            webhook_config([
                Some(material.ca_bundle.as_bytes()),
                Some(other.cert.as_bytes()),
            ]),
        );

        let done = ensure(&api.client(), &opts).await.unwrap();

        assert_eq!(
            done.webhook,
            WebhookSync::Patched(vec!["pod.inject.remora.io".into()])
        );
        assert_eq!(api.writes(), vec![(Method::PATCH, MWC.to_string())]);
        let bundle = material.ca_bundle.clone();
        assert_eq!(registered_bundles(&api), vec![bundle.clone(), bundle]);

        api.clear_log();
        let again = ensure(&api.client(), &opts).await.unwrap();
        assert_eq!(again.webhook, WebhookSync::InSync);
        assert_eq!(api.writes(), vec![]);
    }

    #[tokio::test]
    async fn a_webhook_list_edited_between_read_and_patch_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        let (secret, material) = secret_issued_at(SystemTime::now(), &opts);
        api.put(SECRET, secret);
        api.put(MWC, webhook_config([None, None]));
        // Someone re-applies the registration between our read and our patch: the patch's
        // `test` of the resourceVersion fails with 422, and the pass re-reads and patches again.
        api.0.lock().unwrap().race_on_patch = Some((MWC.into(), webhook_config([None, None])));

        let done = ensure(&api.client(), &opts).await.unwrap();
        assert!(matches!(done.webhook, WebhookSync::Patched(_)));
        assert_eq!(
            api.writes(),
            vec![
                (Method::PATCH, MWC.to_string()),
                (Method::PATCH, MWC.to_string())
            ]
        );
        let bundle = material.ca_bundle.clone();
        assert_eq!(registered_bundles(&api), vec![bundle.clone(), bundle]);
    }

    #[tokio::test]
    async fn a_missing_webhook_registration_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();

        let done = ensure(&api.client(), &opts).await.unwrap();

        assert_eq!(done.webhook, WebhookSync::Missing);
        assert!(done.created && done.files_written);
    }

    #[tokio::test]
    async fn a_serving_certificate_close_to_expiry_is_renewed_with_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        let now = SystemTime::now();
        // Issued 70 of its 90 days ago: past two thirds, still valid.
        let (secret, old) = secret_issued_at(now - 70 * DAY, &opts);
        api.put(SECRET, secret);
        api.put(MWC, in_sync_webhook_config(&old));
        assert!(serves_for_every_name(&old, &opts, now));

        let done = ensure_at(&api.client(), &opts, now).await.unwrap();

        assert!(
            matches!(&done.changes[..], [Change::NewServing { .. }]),
            "{:?}",
            done.changes
        );
        assert_eq!(api.writes(), vec![(Method::PUT, SECRET.to_string())]);
        assert_eq!(done.material.ca_cert, old.ca_cert);
        assert_ne!(done.material.tls_cert, old.tls_cert);
        assert!(not_after(&done.material.tls_cert) > not_after(&old.tls_cert) + 60 * 24 * 3600);
        assert!(serves_for_every_name(&done.material, &opts, now));
        assert_eq!(
            std::fs::read_to_string(&opts.cert_file).unwrap(),
            done.material.tls_cert
        );
        assert_eq!(stored(&api), Stored::from(&done.material));
    }

    #[tokio::test]
    async fn a_stale_resource_version_is_reread_and_the_other_replicas_renewal_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        let now = SystemTime::now();
        let (secret, old) = secret_issued_at(now - 70 * DAY, &opts);
        api.put(SECRET, secret);
        api.put(MWC, in_sync_webhook_config(&old));
        // Another replica renews the serving certificate between our read and our write.
        let ca = CaPair {
            cert: old.ca_cert.clone(),
            key: old.ca_key.clone(),
        };
        let (tls_cert, tls_key) =
            issue_serving(&ca, &opts.dns_names(), now, opts.serving_lifetime).unwrap();
        let theirs = Material {
            tls_cert,
            tls_key,
            ..old.clone()
        };
        api.0.lock().unwrap().race_on_update = Some((
            SECRET.into(),
            serde_json::to_value(theirs.secret_data()).unwrap(),
        ));

        let done = ensure_at(&api.client(), &opts, now).await.unwrap();

        assert!(done.changes.is_empty(), "{:?}", done.changes);
        assert_eq!(done.material, theirs);
        assert_eq!(api.writes(), vec![(Method::PUT, SECRET.to_string())]);
        assert_eq!(stored(&api), Stored::from(&theirs));
    }

    #[tokio::test]
    async fn an_aging_ca_is_rotated_and_the_old_one_stays_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&dir);
        let api = FakeApi::default();
        let now = SystemTime::now();
        // CA issued 7 of its 10 years ago; the serving certificate is fresh.
        let old_ca = new_ca(now - 7 * 365 * DAY, opts.ca_lifetime).unwrap();
        let (tls_cert, tls_key) =
            issue_serving(&old_ca, &opts.dns_names(), now - DAY, opts.serving_lifetime).unwrap();
        let old = Material {
            ca_bundle: old_ca.cert.clone(),
            ca_cert: old_ca.cert.clone(),
            ca_key: old_ca.key,
            tls_cert,
            tls_key,
        };
        let (mut secret, _) = secret_issued_at(now, &opts);
        secret["data"] = serde_json::to_value(old.secret_data()).unwrap();
        api.put(SECRET, secret);
        api.put(MWC, in_sync_webhook_config(&old));

        let done = ensure_at(&api.client(), &opts, now).await.unwrap();

        assert_eq!(done.changes, vec![Change::RotatedCa]);
        assert_ne!(done.material.ca_cert, old.ca_cert);
        let bundle = pem_certs(&done.material.ca_bundle);
        assert_eq!(
            bundle,
            [pem_certs(&done.material.ca_cert), pem_certs(&old.ca_cert)].concat()
        );
        // Still serving the certificate the old CA signed, which the API server still trusts.
        assert_eq!(done.material.tls_cert, old.tls_cert);
        assert!(serves_for_every_name(&done.material, &opts, now));
        let registered = done.material.ca_bundle.clone();
        assert_eq!(
            registered_bundles(&api),
            vec![registered.clone(), registered]
        );

        // At its next renewal the serving certificate comes from the new CA.
        let later = now + 61 * DAY;
        let renewed = plan(
            &Stored::from(&done.material),
            &opts.dns_names(),
            later,
            opts.ca_lifetime,
            opts.serving_lifetime,
        )
        .unwrap();
        assert!(
            matches!(&renewed.changes[..], [Change::NewServing { .. }]),
            "{:?}",
            renewed.changes
        );
        assert!(verifies(
            &renewed.material.tls_cert,
            &pem_certs(&done.material.ca_cert),
            &opts.dns_names(),
            later
        ));
    }

    #[test]
    fn an_expired_ca_leaves_the_bundle_and_everything_is_reissued() {
        let opts = CertOptions::new(NS, "remora-injector", "remora-injector", "c", "k");
        let now = SystemTime::now();
        let old_ca = new_ca(now - 11 * 365 * DAY, opts.ca_lifetime).unwrap();
        let stored = Stored {
            ca_bundle: Some(old_ca.cert.clone()),
            ca_cert: Some(old_ca.cert),
            ca_key: Some(old_ca.key),
            tls_cert: None,
            tls_key: None,
        };

        let planned = plan(
            &stored,
            &opts.dns_names(),
            now,
            opts.ca_lifetime,
            opts.serving_lifetime,
        )
        .unwrap();

        assert!(
            matches!(&planned.changes[..], [Change::NewCa { reason }, Change::NewServing { .. }] if reason == "expired"),
            "{:?}",
            planned.changes
        );
        assert_eq!(
            pem_certs(&planned.material.ca_bundle),
            pem_certs(&planned.material.ca_cert)
        );
        assert!(serves_for_every_name(&planned.material, &opts, now));
    }

    #[test]
    fn a_serving_certificate_never_outlives_its_ca() {
        let now = SystemTime::now();
        let ca = new_ca(now, 30 * DAY).unwrap();
        let (cert, _) = issue_serving(&ca, &["a.b.svc".into()], now, 90 * DAY).unwrap();
        assert_eq!(not_after(&cert), not_after(&ca.cert));
    }

    #[test]
    fn a_garbled_secret_is_replaced() {
        let opts = CertOptions::new(NS, "remora-injector", "remora-injector", "c", "k");
        let garbage = Some("not a certificate".to_string());
        let stored = Stored {
            ca_cert: garbage.clone(),
            ca_key: garbage.clone(),
            ca_bundle: garbage.clone(),
            tls_cert: garbage.clone(),
            tls_key: garbage,
        };
        let planned = plan(
            &stored,
            &opts.dns_names(),
            SystemTime::now(),
            opts.ca_lifetime,
            opts.serving_lifetime,
        )
        .unwrap();
        assert!(
            matches!(
                &planned.changes[..],
                [Change::NewCa { .. }, Change::NewServing { .. }]
            ),
            "{:?}",
            planned.changes
        );
    }

    #[tokio::test]
    async fn the_background_loop_repairs_a_reset_registration_and_lost_files() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CertOptions {
            resync_period: Duration::from_millis(50),
            ..options(&dir)
        };
        let api = FakeApi::default();
        api.put(MWC, webhook_config([None, None]));
        let manager = start(api.client(), opts.clone()).await.unwrap();
        let material = stored(&api);
        let bundle = material.ca_bundle.clone().unwrap();
        assert_eq!(
            registered_bundles(&api),
            vec![bundle.clone(), bundle.clone()]
        );

        // `kubectl replace` of the registration drops caBundle; the files vanish.
        api.put(MWC, webhook_config([None, None]));
        std::fs::remove_file(&opts.cert_file).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && (registered_bundles(&api) != vec![bundle.clone(), bundle.clone()]
                || !opts.cert_file.exists())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        manager.abort();

        assert_eq!(registered_bundles(&api), vec![bundle.clone(), bundle]);
        assert_eq!(
            std::fs::read_to_string(&opts.cert_file).ok(),
            material.tls_cert
        );
        assert_eq!(stored(&api), material, "the loop rewrote a valid Secret");
    }

    #[test]
    fn the_flags_name_the_installed_objects_by_default() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            certs: ManageCertsArgs,
        }
        let off = Cli::parse_from(["x"]).certs;
        assert!(off.options(Path::new("c"), Path::new("k")).is_none());
        let on = Cli::parse_from(["x", "--manage-certs", "--namespace", "mesh"]).certs;
        let opts = on
            .options(Path::new("/t/tls.crt"), Path::new("/t/tls.key"))
            .unwrap();
        assert_eq!(opts.ca_file.as_deref(), Some(Path::new("/t/ca.crt")));
        assert_eq!(
            opts.service_cert,
            Some(ServiceCert {
                secret_name: "remora-control-tls".into(),
                service_name: "remora-control".into()
            })
        );
        let without = Cli::parse_from(["x", "--manage-certs", "--control-tls-secret", ""]).certs;
        let without = without.options(Path::new("c"), Path::new("k")).unwrap();
        assert_eq!(without.service_cert, None);
        assert_eq!(
            (opts.secret_name.as_str(), opts.webhook_config_name.as_str()),
            ("remora-injector-tls", "remora-injector")
        );
        assert_eq!(opts.dns_names()[2], "remora-injector.mesh.svc");
        assert_eq!(opts.key_file, Path::new("/t/tls.key"));
    }

    #[test]
    fn jitter_stays_within_a_fifth_of_the_period() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(60));
            assert!(
                d >= Duration::from_secs(48) && d <= Duration::from_secs(72),
                "{d:?}"
            );
        }
    }
}
