//! mTLS between two proxies in one process, over real loopback sockets: a client's outbound
//! proxy dials a meshed endpoint, whose inbound proxy terminates the TLS and carries the
//! request to its app. Certificates come from test CAs made here (rcgen); a tap between the two
//! proxies records what crossed the wire.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use remora_init::mtls::InboundMtls;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::client::Endpoint;
use crate::http_tests::{metric, proxy_with, within};
use crate::identity::Credentials;
use crate::inbound_mtls::Mtls;
use crate::io::Io;
use crate::outbound::Destination;
use crate::proxy::Proxy;
use crate::serve::detect::{detect, Rewound};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";
/// What the app's clients send and the apps send back: never to be seen between the proxies.
const SECRET: &str = "secret-payload-4711";

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// Credentials for `id`, signed by this CA and trusting `trusted`.
    fn credentials(&self, id: &str, trusted: &Ca) -> Credentials {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        Credentials {
            id: id.to_owned(),
            chain: vec![leaf.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            trust_anchors: vec![trusted.issuer.der().clone()],
            expires: SystemTime::now() + Duration::from_secs(3600),
        }
    }
}

/// A proxy holding `credentials` (none: `None`), configured further by `configure`.
fn meshed_proxy(
    credentials: Option<Credentials>,
    configure: impl FnOnce(&mut Proxy),
) -> &'static Proxy {
    let proxy = proxy_with(configure);
    if let Some(credentials) = credentials {
        proxy.identity.set(credentials);
    }
    proxy
}

fn loopback(v6: bool) -> &'static str {
    if v6 {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    }
}

/// An app answering HTTP/1 and HTTP/2 with the request's path and the secret; counts its
/// connections.
async fn http_app(v6: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(loopback(v6)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let body = format!("app saw {} {SECRET}", request.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, connections)
}

/// An app that echoes every byte (opaque TCP).
async fn echo_app(v6: bool) -> SocketAddr {
    let listener = TcpListener::bind(loopback(v6)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// An inbound proxy in front of apps: each connection to it goes to `app` (the original
/// destination a redirect would have kept), through the inbound path of `serve`.
async fn start_inbound(proxy: &'static Proxy, app: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(app.ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let destination = Destination::Forward(Endpoint::new(app));
            let cx = crate::inbound::context(proxy);
            tokio::spawn(crate::serve::inbound_connection(
                stream,
                app,
                destination,
                cx,
            ));
        }
    });
    addr
}

/// An outbound proxy whose every connection goes to `endpoint`.
async fn start_outbound(proxy: &'static Proxy, endpoint: Endpoint) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(endpoint.addr.ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let Ok((protocol, first)) = detect(&stream).await else {
                    return;
                };
                let stream = Rewound::new(Io::Plain(stream), first);
                let target = endpoint.addr;
                let destination = Destination::Forward(endpoint);
                let cx = crate::outbound::context(proxy);
                crate::serve::carry(stream, protocol, target, destination, cx).await;
            });
        }
    });
    addr
}

/// A TCP relay to `to` that records the bytes going there: the wire between two proxies.
async fn tap(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind(SocketAddr::new(to.ip(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::join!(
                    copy_recording(&mut client_read, &mut server_write, &recorded),
                    copy_recording(&mut server_read, &mut client_write, &recorded),
                );
            });
        }
    });
    (addr, seen)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// One GET over a new connection, HTTP/1 or prior-knowledge HTTP/2: its status and body.
async fn get(addr: SocketAddr, h2: bool, path: &str) -> Result<(StatusCode, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let io = TokioIo::new(stream);
    let request = Request::get(format!("http://test{path}"))
        .header("x-secret", SECRET)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await
    }
    .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends `message` as opaque TCP, half-closes, and reads what comes back until the end; an
/// error (a reset) is `Err`.
async fn opaque(addr: SocketAddr, message: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(message.as_bytes()).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await?;
    Ok(back)
}

/// Two meshed pods in one process: the client side's outbound proxy (its identity
/// [`CLIENT_ID`]) and the server side's inbound proxy ([`SERVER_ID`]) in front of an HTTP app
/// and an echo app, with a tap on the wire between them.
struct Mesh {
    http: SocketAddr,
    echo: SocketAddr,
    wire: Arc<Mutex<Vec<u8>>>,
    server: &'static Proxy,
    client: &'static Proxy,
    app_connections: Arc<AtomicUsize>,
}

impl Mesh {
    async fn new(
        v6: bool,
        client: Option<Credentials>,
        server: Option<Credentials>,
        expected: &str,
        configure_server: impl FnOnce(&mut Proxy),
    ) -> Self {
        let (http_app, app_connections) = http_app(v6).await;
        let echo_app = echo_app(v6).await;
        let server = meshed_proxy(server, configure_server);
        let client = meshed_proxy(client, |_| ());
        let inbound_http = start_inbound(server, http_app).await;
        let inbound_echo = start_inbound(server, echo_app).await;
        let (tap_http, wire) = tap(inbound_http).await;
        let tap_echo = {
            let (addr, seen) = tap(inbound_echo).await;
            // One record of the wire for both.
            let wire = Arc::clone(&wire);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let bytes = std::mem::take(&mut *seen.lock().unwrap());
                    wire.lock().unwrap().extend(bytes);
                }
            });
            addr
        };
        Self {
            http: start_outbound(client, Endpoint::meshed(tap_http, expected)).await,
            echo: start_outbound(client, Endpoint::meshed(tap_echo, expected)).await,
            wire,
            server,
            client,
            app_connections,
        }
    }

    fn wire(&self) -> Vec<u8> {
        self.wire.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn meshed_pods_talk_http1_h2_and_opaque_over_mtls_on_both_ip_families() {
    let ca = Ca::new("mesh CA");
    for v6 in [false, true] {
        let mesh = Mesh::new(
            v6,
            Some(ca.credentials(CLIENT_ID, &ca)),
            Some(ca.credentials(SERVER_ID, &ca)),
            SERVER_ID,
            |_| (),
        )
        .await;
        for h2 in [false, true] {
            let (status, body) = within("GET", get(mesh.http, h2, "/cart")).await.unwrap();
            assert_eq!(status, StatusCode::OK, "v6 {v6}, h2 {h2}: {body}");
            assert_eq!(body, format!("app saw /cart {SECRET}"));
        }
        let back = within("echo", opaque(mesh.echo, SECRET)).await.unwrap();
        assert_eq!(back, SECRET.as_bytes(), "v6 {v6}");

        tokio::time::sleep(Duration::from_millis(20)).await;
        let wire = mesh.wire();
        assert_eq!(wire.first(), Some(&0x16), "v6 {v6}: a TLS handshake first");
        assert!(
            contains(&wire, "remora/1"),
            "v6 {v6}: ALPN remora/1 offered"
        );
        for clear in [SECRET, "/cart", "HTTP/1.1", "PRI * HTTP/2.0"] {
            assert!(
                !contains(&wire, clear),
                "v6 {v6}: {clear:?} crossed the wire in clear"
            );
        }
        assert_eq!(
            metric(
                mesh.client,
                "remora_proxy_connect_errors_total{direction=\"outbound\"}"
            ),
            Some(0)
        );
        // The client's identity is in the server's counts, and the dials in the client's.
        let id = format!("tls=\"true\",client_id=\"{CLIENT_ID}\"}}");
        for (series, count) in [
            (format!("remora_proxy_tcp_connections_total{{direction=\"inbound\",{id}"), 3),
            (format!("remora_proxy_requests_total{{direction=\"inbound\",protocol=\"http1\",status_code=\"200\",{id}"), 1),
            (format!("remora_proxy_requests_total{{direction=\"inbound\",protocol=\"h2\",status_code=\"200\",{id}"), 1),
        ] {
            assert_eq!(metric(mesh.server, &series), Some(count), "v6 {v6}: {series}");
        }
        let plain = "remora_proxy_tcp_connections_total{direction=\"inbound\",tls=\"false\",client_id=\"\"}";
        assert_eq!(metric(mesh.server, plain), Some(0), "v6 {v6}");
        let dials = "remora_proxy_upstream_connections_total{direction=\"outbound\",tls=\"true\"}";
        assert_eq!(metric(mesh.client, dials), Some(3), "v6 {v6}");
    }
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused_as_a_failed_connect() {
    let ca = Ca::new("mesh CA");
    let other = "spiffe://cluster.local/ns/shop/sa/impostor";
    let mesh = Mesh::new(
        false,
        Some(ca.credentials(CLIENT_ID, &ca)),
        Some(ca.credentials(other, &ca)),
        SERVER_ID,
        |_| (),
    )
    .await;
    let (status, body) = within("GET", get(mesh.http, false, "/")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("impostor"),
        "the 502 names what was presented: {body}"
    );
    assert!(within("echo", opaque(mesh.echo, SECRET))
        .await
        .map_or(true, |back| back.is_empty()));
    assert_eq!(
        metric(
            mesh.client,
            "remora_proxy_connect_errors_total{direction=\"outbound\"}"
        ),
        Some(2)
    );
    assert_eq!(mesh.app_connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_by_either_side() {
    let (ca, rogue) = (Ca::new("mesh CA"), Ca::new("rogue CA"));
    // The server's certificate is the rogue CA's: the client refuses it.
    let mesh = Mesh::new(
        false,
        Some(ca.credentials(CLIENT_ID, &ca)),
        Some(rogue.credentials(SERVER_ID, &ca)),
        SERVER_ID,
        |_| (),
    )
    .await;
    let (status, _) = within("GET", get(mesh.http, false, "/")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(mesh.app_connections.load(Ordering::SeqCst), 0);

    // The client's certificate is the rogue CA's: the server refuses it, the app sees nothing.
    // In TLS 1.3 the client learns it only when it reads (the server's alert), so this is an
    // upstream failure, not a failed connect.
    let mesh = Mesh::new(
        false,
        Some(rogue.credentials(CLIENT_ID, &ca)),
        Some(ca.credentials(SERVER_ID, &ca)),
        SERVER_ID,
        |_| (),
    )
    .await;
    let (status, _) = within("GET", get(mesh.http, false, "/")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(mesh.app_connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_endpoint_without_identity_or_a_proxy_without_credentials_stays_plaintext() {
    let ca = Ca::new("mesh CA");
    // Not meshed: plaintext, as before, whatever the credentials.
    let mesh = Mesh::new(
        false,
        Some(ca.credentials(CLIENT_ID, &ca)),
        Some(ca.credentials(SERVER_ID, &ca)),
        "",
        |_| (),
    )
    .await;
    let (status, body) = within("GET", get(mesh.http, false, "/plain"))
        .await
        .unwrap();
    assert_eq!((status, body.contains(SECRET)), (StatusCode::OK, true));
    let wire = mesh.wire();
    assert!(
        contains(&wire, SECRET),
        "{}",
        String::from_utf8_lossy(&wire)
    );

    // Meshed, but the client has no certificate yet: plaintext, which a permissive peer takes.
    let mesh = Mesh::new(
        false,
        None,
        Some(ca.credentials(SERVER_ID, &ca)),
        SERVER_ID,
        |_| (),
    )
    .await;
    let (status, _) = within("GET", get(mesh.http, true, "/h2")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(contains(&mesh.wire(), "PRI * HTTP/2.0"));
}

/// The inbound side alone, in front of an HTTP app with an httpGet probe, an echo app with a
/// tcpSocket probe, and one more HTTP app whose port no probe names.
struct Strict {
    http: SocketAddr,
    echo: SocketAddr,
    other: SocketAddr,
}

#[tokio::test]
async fn strict_refuses_plaintext_except_the_probes_and_still_takes_mtls() {
    let ca = Ca::new("mesh CA");
    let (http_app_addr, _) = http_app(false).await;
    let echo_app_addr = echo_app(false).await;
    let (other_app_addr, _) = http_app(false).await;
    let probes = format!("{}:/healthz,{}", http_app_addr.port(), echo_app_addr.port());
    let server = meshed_proxy(Some(ca.credentials(SERVER_ID, &ca)), |proxy| {
        proxy.inbound_mtls = Mtls {
            mode: InboundMtls::Strict,
            allow_from: Default::default(),
            probes: probes.parse().unwrap(),
        }
    });
    let strict = Strict {
        http: start_inbound(server, http_app_addr).await,
        echo: start_inbound(server, echo_app_addr).await,
        other: start_inbound(server, other_app_addr).await,
    };
    // The httpGet probe's path answers in plaintext; another path on its port gets 403.
    let (status, body) = within("probe", get(strict.http, false, "/healthz?x=1"))
        .await
        .unwrap();
    assert_eq!((status, body.contains("/healthz")), (StatusCode::OK, true));
    let (status, _) = within("not a probe", get(strict.http, false, "/admin"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Plaintext HTTP/2 on that port: refused.
    assert!(within("h2", get(strict.http, true, "/healthz"))
        .await
        .is_err());
    // The tcpSocket probe's port takes any plaintext.
    let back = within("echo", opaque(strict.echo, "ping")).await.unwrap();
    assert_eq!(back, b"ping");
    // A port no probe names: reset, for HTTP and TCP alike.
    assert!(within("other", get(strict.other, false, "/healthz"))
        .await
        .is_err());
    assert!(within("other tcp", opaque(strict.other, "ping"))
        .await
        .map_or(true, |back| back.is_empty()));

    // mTLS still comes in, on every port.
    let client = meshed_proxy(Some(ca.credentials(CLIENT_ID, &ca)), |_| ());
    let to_other = start_outbound(client, Endpoint::meshed(strict.other, SERVER_ID)).await;
    let (status, _) = within("mtls", get(to_other, false, "/admin"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn allow_from_lets_named_clients_in_and_refuses_others_with_403_or_a_reset() {
    let ca = Ca::new("mesh CA");
    for (allow, allowed) in [("shop/web", true), ("shop/*", true), ("billing/*", false)] {
        let mesh = Mesh::new(
            false,
            Some(ca.credentials(CLIENT_ID, &ca)),
            Some(ca.credentials(SERVER_ID, &ca)),
            SERVER_ID,
            |proxy| proxy.inbound_mtls.allow_from = allow.parse().unwrap(),
        )
        .await;
        for h2 in [false, true] {
            let (status, body) = within("GET", get(mesh.http, h2, "/")).await.unwrap();
            let expected = if allowed {
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(status, expected, "{allow}, h2 {h2}: {body}");
        }
        let back = within("echo", opaque(mesh.echo, SECRET)).await;
        if allowed {
            assert_eq!(back.unwrap(), SECRET.as_bytes(), "{allow}");
        } else {
            assert!(back.map_or(true, |back| back.is_empty()), "{allow}");
            // Only the HTTP app could have been reached; it was not.
            assert_eq!(mesh.app_connections.load(Ordering::SeqCst), 0, "{allow}");
        }
        // A plaintext client has no identity: refused too once a list is given.
        let inbound = start_inbound(mesh.server, echo_app(false).await).await;
        let back = within("plain", opaque(inbound, "ping")).await;
        assert!(
            back.map_or(true, |back| back.is_empty()),
            "{allow}: plaintext"
        );
    }
}

/// A ClientHello as a rustls client would send it, offering `alpn`.
fn client_hello(alpn: &[u8]) -> Vec<u8> {
    let ca = Ca::new("any");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("peer.test").unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test]
async fn a_truncated_client_hello_is_refused_and_the_proxy_serves_on() {
    let ca = Ca::new("mesh CA");
    let (app, connections) = http_app(false).await;
    let server = meshed_proxy(Some(ca.credentials(SERVER_ID, &ca)), |_| ());
    let inbound = start_inbound(server, app).await;
    let hello = client_hello(b"remora/1");
    for cut in [1, 5, 40, hello.len() - 1] {
        let mut stream = TcpStream::connect(inbound).await.unwrap();
        stream.write_all(&hello[..cut]).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        let read = within("refusal", stream.read_to_end(&mut back)).await;
        assert!(
            read.map_or(true, |_| back.is_empty()),
            "cut at {cut}: {back:?}"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "nothing reached the app"
    );
    // Garbage that starts like a handshake record is refused too.
    let mut stream = TcpStream::connect(inbound).await.unwrap();
    stream
        .write_all(b"\x16\x03\x01\x00\x05hello")
        .await
        .unwrap();
    let mut back = Vec::new();
    let read = within("garbage", stream.read_to_end(&mut back)).await;
    assert!(read.map_or(true, |_| back.is_empty()));
    // And the proxy still serves.
    let (status, _) = within("GET", get(inbound, false, "/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn alpn_remora_without_a_client_certificate_is_refused() {
    let ca = Ca::new("mesh CA");
    let (app, connections) = http_app(false).await;
    let server = meshed_proxy(Some(ca.credentials(SERVER_ID, &ca)), |_| ());
    let inbound = start_inbound(server, app).await;
    // A client that takes the server's certificate but presents none.
    let verifier = Arc::new(AnyServer(
        rustls::crypto::ring::default_provider().signature_verification_algorithms,
    ));
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(verifier)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"remora/1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(inbound.ip().into());
    let outcome = within("handshake", async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        let mut back = Vec::new();
        tls.read_to_end(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    })
    .await;
    assert!(outcome.map_or(true, |back| back.is_empty()), "refused");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "nothing reached the app"
    );
}

/// A verifier that takes any server certificate: a client that only wants to be refused.
#[derive(Debug)]
struct AnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_endpoint_that_fails_the_handshake_is_skipped_for_another() {
    use crate::routes_tests::{ask, get, Echo, Harness, BOTH};
    use remora_api::discovery as api;
    let ca = Ca::new("mesh CA");
    let (impostor, good) = (Echo::start("impostor").await, Echo::start("good").await);
    let impostor_id = "spiffe://cluster.local/ns/shop/sa/impostor";
    let wrong = meshed_proxy(Some(ca.credentials(impostor_id, &ca)), |_| ());
    let right = meshed_proxy(Some(ca.credentials(SERVER_ID, &ca)), |_| ());
    // Both endpoints are expected to be SERVER_ID; one presents another identity.
    let meshed = |addr: SocketAddr| api::Endpoint {
        ip: addr.ip().to_string(),
        port: u32::from(addr.port()),
        identity: SERVER_ID.into(),
        ..Default::default()
    };
    let endpoints = vec![
        meshed(start_inbound(wrong, impostor.addr).await),
        meshed(start_inbound(right, good.addr).await),
    ];
    let snapshot = api::Snapshot {
        kind: Some(api::snapshot::Kind::Service(api::Service {
            namespace: "shop".into(),
            name: "cart".into(),
            port: 80,
            app_protocol: "http".into(),
            endpoints,
            ..Default::default()
        })),
    };
    let credentials = ca.credentials(CLIENT_ID, &ca);
    let harness = Harness::start_with(snapshot, |proxy| proxy.identity.set(credentials)).await;
    for client in BOTH {
        for _ in 0..4 {
            let answer = ask(&harness, client, get("/")).await;
            assert_eq!(answer.status, StatusCode::OK, "{client:?}");
            assert_eq!(answer.headers["x-backend"], "good", "{client:?}");
        }
    }
    assert!(impostor.seen().is_empty(), "the impostor's app saw nothing");
    let errors = metric(
        harness.proxy,
        "remora_proxy_connect_errors_total{direction=\"outbound\"}",
    );
    assert!(
        errors.is_some_and(|n| n >= 1),
        "failed handshakes count: {errors:?}"
    );
}

/// Copies `from` to `to` until either ends, appending every byte to `recorded`, then shuts
/// `to` down: one direction of the tap.
async fn copy_recording(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    recorded: &Mutex<Vec<u8>>,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// An app that records every byte it is sent, and answers nothing.
async fn recording_app(v6: bool) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind(loopback(v6)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let mut buf = [0; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn h2_over_mtls_is_relayed_frame_by_frame_on_both_sides() {
    // A terminating proxy would send its own SETTINGS and never a setting it does not know, nor
    // a PING of the client's: the app getting the client's exact bytes shows that both proxies
    // relayed them, the TLS between them notwithstanding.
    let ca = Ca::new("mesh CA");
    let mut sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS with one unknown setting (0xf00d = 0xc0ffee), which RFC 9113 §6.5.2 says to ignore.
    sent.extend([0, 0, 6, 4, 0, 0, 0, 0, 0, 0xf0, 0x0d, 0, 0xc0, 0xff, 0xee]);
    // PING with opaque data the app alone can have seen.
    sent.extend([0, 0, 8, 6, 0, 0, 0, 0, 0]);
    sent.extend(*b"rel4y-me");
    for v6 in [false, true] {
        let (app, received) = recording_app(v6).await;
        let relay = |proxy: &mut Proxy| proxy.h2_relay = true;
        let server = meshed_proxy(Some(ca.credentials(SERVER_ID, &ca)), relay);
        let client = meshed_proxy(Some(ca.credentials(CLIENT_ID, &ca)), relay);
        let (tap, wire) = tap(start_inbound(server, app).await).await;
        let outbound = start_outbound(client, Endpoint::meshed(tap, SERVER_ID)).await;

        let mut stream = TcpStream::connect(outbound).await.unwrap();
        stream.write_all(&sent).await.unwrap();
        within("the app gets every byte", async {
            while received.lock().unwrap().len() < sent.len() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(*received.lock().unwrap(), sent, "v6 {v6}");
        let wire = wire.lock().unwrap().clone();
        assert_eq!(wire.first(), Some(&0x16), "v6 {v6}: a TLS handshake first");
        assert!(
            !contains(&wire, "rel4y-me"),
            "v6 {v6}: the PING crossed in clear"
        );
        let dials = "remora_proxy_upstream_connections_total{direction=\"outbound\",tls=\"true\"}";
        assert_eq!(metric(client, dials), Some(1), "v6 {v6}");
        let id = format!("tls=\"true\",client_id=\"{CLIENT_ID}\"}}");
        let inbound = format!("remora_proxy_tcp_connections_total{{direction=\"inbound\",{id}");
        assert_eq!(metric(server, &inbound), Some(1), "v6 {v6}");

        // A request relayed so is counted under the client's identity, as a terminated one is.
        let (app, _) = http_app(v6).await;
        let outbound = start_outbound(
            client,
            Endpoint::meshed(start_inbound(server, app).await, SERVER_ID),
        )
        .await;
        let (status, body) = within("GET", get(outbound, true, "/relayed"))
            .await
            .unwrap();
        assert_eq!(
            (status, body),
            (StatusCode::OK, format!("app saw /relayed {SECRET}"))
        );
        let requests = format!("remora_proxy_requests_total{{direction=\"inbound\",protocol=\"h2\",status_code=\"200\",{id}");
        assert_eq!(metric(server, &requests), Some(1), "v6 {v6}");
    }
}
