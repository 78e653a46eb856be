//! mTLS between meshed proxies (SPEC: "Workload identity and mTLS"): the rustls configurations
//! made from the workload's [`Credentials`], the verifier that checks a server's SPIFFE
//! identity, the handshakes of both sides, and the identity a peer's certificate names.
//!
//! TLS 1.3 only, ALPN `remora/1`. The configurations are made once per credentials and per
//! worker thread (a thread-local cache, so a handshake takes no lock) and made again when a
//! renewal replaces the credentials.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{Acceptor, ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;

use crate::identity::Credentials;
use crate::io::Io;

/// The ALPN protocol of proxy-to-proxy mTLS: a ClientHello that offers it is for the proxy, any
/// other TLS is the app's own.
pub const ALPN: &[u8] = b"remora/1";

/// Why the TLS configurations cannot be made from the credentials.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the identity's certificate or key is unusable: {0}")]
    Credentials(rustls::Error),
    #[error("the trust anchors verify nothing: {0}")]
    TrustAnchors(String),
}

/// A server presented a valid certificate for another identity than the snapshot expects.
#[derive(Debug, thiserror::Error)]
#[error("the peer is {presented:?}, not the expected {expected:?}")]
pub struct WrongIdentity {
    pub expected: String,
    pub presented: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(credentials: &Credentials) -> Result<Arc<RootCertStore>, ConfigError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(credentials.trust_anchors.clone());
    if added == 0 {
        return Err(ConfigError::TrustAnchors(format!(
            "none of {} certificates parses",
            credentials.trust_anchors.len()
        )));
    }
    Ok(Arc::new(roots))
}

/// The server side of proxy-to-proxy mTLS: our certificate, a client certificate required and
/// verified against the trust anchors, no session tickets (nothing is sent after the handshake
/// that the client did not ask for).
pub fn server_config(credentials: &Credentials) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(credentials)?, Arc::clone(&provider))
            .build()
            .map_err(|error| ConfigError::TrustAnchors(error.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ConfigError::Credentials)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(credentials.chain.clone(), credentials.key.clone_key())
        .map_err(ConfigError::Credentials)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side, towards a server that must be `expected`: our certificate, and
/// [`IdentityVerifier`] for the server's.
pub fn client_config(
    credentials: &Credentials,
    expected: &str,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        roots: roots(credentials)?,
        expected: expected.to_owned(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ConfigError::Credentials)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(credentials.chain.clone(), credentials.key.clone_key())
        .map_err(ConfigError::Credentials)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Verifies a server's certificate as webpki does (a chain to one of the trust anchors, valid
/// now), then that its URI SAN is the identity the snapshot expects. rustls checks DNS names and
/// IP addresses only, so the server name of the handshake is a placeholder and the expected
/// identity is held here, one verifier (and client configuration) per identity.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match peer_identity(end_entity) {
            Some(presented) if presented == self.expected => Ok(ServerCertVerified::assertion()),
            presented => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.clone(),
                    presented: presented.unwrap_or_default(),
                }))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The SPIFFE identity a certificate names: its first `spiffe://` URI SAN.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some((*uri).to_owned())
        }
        _ => None,
    })
}

/// This worker's configurations for the credentials in force; made again when they change.
struct Configs {
    credentials: Arc<Credentials>,
    server: Option<Arc<ServerConfig>>,
    clients: HashMap<Arc<str>, Arc<ClientConfig>>,
}

thread_local! {
    static CONFIGS: RefCell<Option<Configs>> = const { RefCell::new(None) };
}

/// Runs `f` on this worker's configurations for `credentials`, made anew if they are not the
/// ones cached (a renewal, or the first use).
fn with_configs<T>(credentials: &Arc<Credentials>, f: impl FnOnce(&mut Configs) -> T) -> T {
    CONFIGS.with_borrow_mut(|cached| {
        let current = cached
            .as_ref()
            .is_some_and(|configs| Arc::ptr_eq(&configs.credentials, credentials));
        if !current {
            *cached = Some(Configs {
                credentials: Arc::clone(credentials),
                server: None,
                clients: HashMap::new(),
            });
        }
        f(cached.as_mut().expect("just set"))
    })
}

/// The server configuration for `credentials`, cached per worker.
pub fn server(credentials: &Arc<Credentials>) -> Result<Arc<ServerConfig>, ConfigError> {
    with_configs(credentials, |configs| {
        if let Some(server) = &configs.server {
            return Ok(Arc::clone(server));
        }
        let server = server_config(credentials)?;
        configs.server = Some(Arc::clone(&server));
        Ok(server)
    })
}

/// The client configuration for `credentials` towards `expected`, cached per worker.
pub fn client(
    credentials: &Arc<Credentials>,
    expected: &Arc<str>,
) -> Result<Arc<ClientConfig>, ConfigError> {
    with_configs(credentials, |configs| {
        if let Some(client) = configs.clients.get(expected) {
            return Ok(Arc::clone(client));
        }
        let client = client_config(credentials, expected)?;
        // Identities are few (one per meshed ServiceAccount called); a bound all the same.
        if configs.clients.len() >= 1024 {
            configs.clients.clear();
        }
        configs
            .clients
            .insert(Arc::clone(expected), Arc::clone(&client));
        Ok(client)
    })
}

/// The client handshake over `tcp`, a new connection to `addr`, which must be `expected`.
pub async fn connect(
    tcp: TcpStream,
    addr: SocketAddr,
    credentials: &Arc<Credentials>,
    expected: &Arc<str>,
) -> io::Result<Io> {
    let config = client(credentials, expected).map_err(io::Error::other)?;
    // A placeholder: the verifier checks the identity, and an IP address sends no SNI.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, crate::io::tls_socket(tcp, Bytes::new()))
        .await?;
    Ok(Io::Tls(Box::new(tls.into())))
}

/// How long a client that started a TLS handshake has to send the rest of its ClientHello.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest ClientHello read: a full TLS record and its header, with room for a second.
const MAX_HELLO: usize = 2 * (16 * 1024 + 5);

/// Whether a client's first bytes start a TLS handshake record (a ClientHello).
pub fn is_handshake(first: &[u8]) -> bool {
    first.first() == Some(&0x16) && first.get(1).is_none_or(|major| *major == 3)
}

/// What the ClientHello that starts an inbound connection asks for.
#[derive(Debug)]
pub enum Hello {
    /// It offers ALPN `remora/1`: a meshed proxy, to terminate. The bytes read so far.
    Mesh(Bytes),
    /// Any other TLS: the app's own, carried as before. The bytes read so far.
    Other(Bytes),
}

/// Why a ClientHello was refused.
#[derive(Debug, thiserror::Error)]
pub enum BadHello {
    #[error("the client closed before its ClientHello was whole")]
    Truncated,
    #[error("no whole ClientHello within {HELLO_TIMEOUT:?}")]
    Slow,
    #[error("a ClientHello longer than {MAX_HELLO} bytes")]
    TooLong,
    #[error("not a ClientHello: {0}")]
    Malformed(rustls::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads the whole ClientHello whose start is `first` (read from `stream` by detection) and
/// tells whether it is for the proxy. Read, not peeked, as detection reads: the bytes go on
/// with the connection, to the handshake or to the app.
pub async fn read_hello(stream: &TcpStream, first: Bytes) -> Result<Hello, BadHello> {
    let mut seen = BytesMut::from(&first[..]);
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        if let Some(mesh) = offers_mesh(&seen)? {
            let seen = seen.freeze();
            return Ok(if mesh {
                Hello::Mesh(seen)
            } else {
                Hello::Other(seen)
            });
        }
        if seen.len() >= MAX_HELLO {
            return Err(BadHello::TooLong);
        }
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_elapsed) => return Err(BadHello::Slow),
            Ok(ready) => ready?,
        }
        seen.reserve(4096);
        match stream.try_read_buf(&mut seen) {
            Ok(0) => return Err(BadHello::Truncated),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error.into()),
        }
    }
}

/// Whether the ClientHello in `bytes` offers ALPN `remora/1`; `None` while it is not whole.
/// Public for the fuzz target `client_hello`: it reads a client's first bytes as they come.
pub fn offers_mesh(bytes: &[u8]) -> Result<Option<bool>, BadHello> {
    let mut acceptor = Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_full) => return Err(BadHello::TooLong),
        }
    }
    match acceptor.accept() {
        Ok(None) => Ok(None),
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Ok(Some(
                hello
                    .alpn()
                    .is_some_and(|mut protocols| protocols.any(|p| p == ALPN)),
            ))
        }
        Err((error, _alert)) => Err(BadHello::Malformed(error)),
    }
}

/// The server handshake of an mTLS connection whose ClientHello (`first`) was read from `tcp`:
/// the connection and the client's identity (its certificate's URI SAN; `None` when it names
/// none). On failure, why, and the socket to reset (gone, closed, when the handshake timed out).
pub async fn accept(
    tcp: TcpStream,
    first: Bytes,
    credentials: &Arc<Credentials>,
) -> Result<(Io, Option<String>), (Option<TcpStream>, io::Error)> {
    let config = match server(credentials) {
        Ok(config) => config,
        Err(error) => return Err((Some(tcp), io::Error::other(error))),
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config)
        .accept(crate::io::tls_socket(tcp, first))
        .into_fallible();
    let tls = match tokio::time::timeout(HELLO_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((error, io))) => return Err((Some(io.into_inner().into_inner()), error)),
        Err(_elapsed) => {
            let error = io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time");
            return Err((None, error));
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(peer_identity);
    Ok((Io::Tls(Box::new(tls.into())), identity))
}
