//! The identity CA kept in a Secret (`remora-system/remora-identity-ca`, keys `ca.crt` and
//! `ca.key`), by the rules the injector keeps its webhook CA by, so that every replica signs
//! with one CA:
//! - the Secret is created only if absent; a replica that loses the create race (409
//!   AlreadyExists) reads it again and adopts the winner's CA;
//! - a Secret without a usable CA (a key missing, garbled, not the certificate's, expired) is
//!   replaced only with the `resourceVersion` that was read; a 409 Conflict means another
//!   replica wrote first: read again and adopt;
//! - each replica looks again now and then and adopts what the Secret holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;

use super::ca::{Ca, CA_LIFETIME};
use super::CaSlot;

pub const KEY_CA_CERT: &str = "ca.crt";
pub const KEY_CA_KEY: &str = "ca.key";
/// How many times one pass reads again after losing a race to another replica.
const MAX_ATTEMPTS: u32 = 5;
/// How often each replica looks at the Secret again.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Where the CA is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretName {
    pub namespace: String,
    pub name: String,
}

impl Default for SecretName {
    fn default() -> Self {
        Self {
            namespace: "remora-system".to_string(),
            name: "remora-identity-ca".to_string(),
        }
    }
}

impl std::fmt::Display for SecretName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret {}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Kubernetes API: {action} {secret}: {source}")]
    Api {
        action: &'static str,
        secret: String,
        source: Box<kube::Error>,
    },
    #[error("{secret} kept changing under us: gave up after {MAX_ATTEMPTS} attempts")]
    TooManyConflicts { secret: String },
    #[error("making a new CA: {0}")]
    Generate(#[from] super::ca::CaError),
}

/// What one pass did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret held a usable CA.
    Adopted,
    /// There was none; this replica created the Secret.
    Created,
    /// It held no usable CA; this replica replaced it.
    Replaced,
}

/// The CA the Secret holds, creating or repairing it first if it holds none.
pub async fn ensure(
    client: &Client,
    secret: &SecretName,
    trust_domain: &str,
) -> Result<Ca, SecretError> {
    ensure_with_outcome(client, secret, trust_domain)
        .await
        .map(|(ca, _)| ca)
}

pub async fn ensure_with_outcome(
    client: &Client,
    secret: &SecretName,
    trust_domain: &str,
) -> Result<(Ca, Outcome), SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &secret.namespace);
    let api_error = |action: &'static str| {
        let secret = secret.to_string();
        move |source: kube::Error| SecretError::Api {
            action,
            secret,
            source: Box::new(source),
        }
    };
    for _ in 0..MAX_ATTEMPTS {
        let stored = api
            .get_opt(&secret.name)
            .await
            .map_err(api_error("reading"))?;
        let now = SystemTime::now();
        let resource_version = match &stored {
            Some(stored) => match usable(stored, now) {
                Ok(ca) => {
                    return Ok((ca, Outcome::Adopted));
                }
                Err(reason) => {
                    tracing::warn!(%secret, reason, "the identity CA Secret holds no usable CA; replacing it");
                    stored.metadata.resource_version.clone()
                }
            },
            None => None,
        };
        let (cert, key) = Ca::generate(trust_domain, now, CA_LIFETIME)?;
        let ca = Ca::from_pem(&cert, &key, now)?;
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(secret.name.clone()),
                namespace: Some(secret.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_string(),
                    "remora-control".to_string(),
                )])),
                resource_version: resource_version.clone(),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_string()),
            data: Some(BTreeMap::from([
                (KEY_CA_CERT.to_string(), ByteString(cert.into_bytes())),
                (KEY_CA_KEY.to_string(), ByteString(key.into_bytes())),
            ])),
            ..Secret::default()
        };
        let written = match resource_version {
            None => api.create(&PostParams::default(), &object).await,
            Some(_) => {
                api.replace(&secret.name, &PostParams::default(), &object)
                    .await
            }
        };
        match written {
            Ok(_) => {
                let outcome = if object.metadata.resource_version.is_some() {
                    Outcome::Replaced
                } else {
                    Outcome::Created
                };
                tracing::info!(%secret, ?outcome, not_after = ca.not_after(), "made a new identity CA");
                return Ok((ca, outcome));
            }
            // Another replica created or replaced it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::info!(%secret, "another replica wrote the identity CA first; reading theirs");
            }
            Err(error) => {
                let action = if object.metadata.resource_version.is_some() {
                    "replacing"
                } else {
                    "creating"
                };
                return Err(api_error(action)(error));
            }
        }
    }
    Err(SecretError::TooManyConflicts {
        secret: secret.to_string(),
    })
}

/// The CA of a Secret, or why there is none.
fn usable(secret: &Secret, now: SystemTime) -> Result<Ca, String> {
    let text = |key: &str| -> Result<String, String> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|data| data.get(key))
            .ok_or_else(|| format!("no {key}"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| format!("{key} is not text"))
    };
    let (cert, key) = (text(KEY_CA_CERT)?, text(KEY_CA_KEY)?);
    Ca::from_pem(&cert, &key, now).map_err(|error| error.to_string())
}

/// Looks at the Secret every `interval` and puts the CA it holds into `slot` (repairing it
/// if it holds none), so that every replica signs with the CA the others adopted.
pub async fn watch(
    client: Client,
    secret: SecretName,
    trust_domain: String,
    slot: CaSlot,
    interval: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        match ensure(&client, &secret, &trust_domain).await {
            Ok(ca) => {
                let same = slot
                    .load()
                    .as_ref()
                    .is_some_and(|current| current.certificate() == ca.certificate());
                if !same {
                    tracing::info!(%secret, not_after = ca.not_after(), "the identity CA changed; signing with the new one");
                    slot.store(Some(Arc::new(ca)));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "looking at the identity CA Secret; keeping the CA")
            }
        }
    }
}
