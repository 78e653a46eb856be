//! The webhook's certificate flags. The files are served, and re-read when they change, by
//! `remora_serving::tls`, which remora-control's gRPC listener shares.

use std::path::PathBuf;

pub use remora_serving::tls::{
    load_pair, server_config, CertReloader, CertResolver, Reload, ReloadEvent, TlsError, TlsFiles,
    RELOAD_INTERVAL,
};

/// The ALPN protocols the webhook offers: the API server speaks either.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Where the webhook's certificate and key are.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain, server certificate first. Re-read when it changes.
    #[arg(
        long = "tls-cert",
        env = "REMORA_TLS_CERT",
        value_name = "FILE",
        default_value = "/etc/remora/tls/tls.crt"
    )]
    pub cert: PathBuf,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for the certificate. Re-read when it changes.
    #[arg(
        long = "tls-key",
        env = "REMORA_TLS_KEY",
        value_name = "FILE",
        default_value = "/etc/remora/tls/tls.key"
    )]
    pub key: PathBuf,
}

impl TlsArgs {
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}
