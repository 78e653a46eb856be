//! The Identity service in process, over real loopback sockets, beside Discovery on one port:
//! tokens from an `--identity-tokens` file, the CA from PEM files, what a certificate holds and
//! what bad requests get.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, KeyPair, SanType};
use remora_api::identity::identity_client::IdentityClient;
use remora_api::identity::{CertifyRequest, CertifyResponse};
use remora_control::identity::ca::{Ca, CA_LIFETIME};
use remora_control::identity::review::StaticTokens;
use remora_control::identity::{CaSlot, IdentityService, Reviewer};
use remora_control::metrics::Metrics;
use remora_control::server::{self, Hub};
use remora_control::watch::watch_objects;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use x509_parser::extensions::{GeneralName, ParsedExtension};

const TOKENS: &str = "\
web-token,system:serviceaccount:shop:web,uid-1,\"system:serviceaccounts,system:serviceaccounts:shop\"
admin-token,admin,uid-2
";

struct Server {
    metrics: Arc<Metrics>,
    channel: Channel,
    ca: Option<Vec<u8>>,
    _dir: tempfile::TempDir,
}

/// A server on loopback with the token file (when `tokens`) and a CA (when `with_ca`).
async fn start(tokens: bool, with_ca: bool, lifetime: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    fs::create_dir(&objects).unwrap();
    let source = watch_objects(vec![objects], Duration::from_millis(50));
    let metrics = Arc::new(Metrics::new());
    let hub = Hub::start(source, Arc::clone(&metrics)).await;
    let slot: CaSlot = Arc::new(ArcSwapOption::empty());
    let mut ca_der = None;
    if with_ca {
        let (cert, key) = Ca::generate("cluster.local", SystemTime::now(), CA_LIFETIME).unwrap();
        let ca = Ca::from_pem(&cert, &key, SystemTime::now()).unwrap();
        ca_der = Some(ca.certificate().to_vec());
        slot.store(Some(Arc::new(ca)));
    }
    let reviewer = tokens.then(|| {
        let path = dir.path().join("tokens.csv");
        fs::write(&path, TOKENS).unwrap();
        Reviewer::Tokens(StaticTokens::load(&path).unwrap())
    });
    let identity = IdentityService::new(
        slot,
        reviewer,
        "cluster.local",
        lifetime,
        Arc::clone(&hub),
        Arc::clone(&metrics),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve_routes(
        listener,
        server::routes(hub).add_service(identity.into_server()),
        None,
        std::future::pending(),
    ));
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    Server {
        metrics,
        channel,
        ca: ca_der,
        _dir: dir,
    }
}

/// A CSR for `key` that asks for names of its own choosing.
fn csr(key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params.serialize_request(key).unwrap().der().to_vec()
}

async fn certify(
    server: &Server,
    token: &str,
    csr: Vec<u8>,
) -> Result<CertifyResponse, tonic::Status> {
    IdentityClient::new(server.channel.clone())
        .certify(CertifyRequest {
            token: token.into(),
            csr,
            namespace: "shop".into(),
            pod: "web-0".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_certificate_names_the_tokens_service_account_alone_whatever_the_csr_asks() {
    let server = start(true, true, Duration::from_secs(60)).await;
    let key = KeyPair::generate().unwrap();
    let answer = certify(&server, "web-token\n", csr(&key)).await.unwrap();

    assert_eq!(answer.identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(answer.trust_anchors, vec![server.ca.clone().unwrap()]);
    assert_eq!(answer.certificate_chain.len(), 1);
    let (_, leaf) = x509_parser::parse_x509_certificate(&answer.certificate_chain[0]).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(&answer.trust_anchors[0]).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    assert_eq!(leaf.issuer(), ca.subject());
    assert_eq!(
        leaf.tbs_certificate.subject_pki.subject_public_key.data,
        key.public_key_raw(),
        "the CSR's key"
    );
    let sans: Vec<String> = leaf
        .extensions()
        .iter()
        .filter_map(|extension| match extension.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
            _ => None,
        })
        .flatten()
        .map(|name| match name {
            GeneralName::URI(uri) => uri.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["spiffe://cluster.local/ns/shop/sa/web"]);
    // The lifetime asked for (60 s), less nothing: notAfter is now + 60 s.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(
        answer.expires_unix_seconds,
        leaf.validity().not_after.timestamp()
    );
    assert!(
        (55..=61).contains(&(answer.expires_unix_seconds - now)),
        "{}",
        answer.expires_unix_seconds - now
    );
    assert!(leaf.validity().not_before.timestamp() <= now);
    assert_eq!(server.metrics.certificates_issued(), 1);
    assert!(server
        .metrics
        .encode()
        .contains("remora_control_certificates_issued_total 1"));
}

#[tokio::test]
async fn bad_requests_are_refused_with_what_is_wrong() {
    let server = start(true, true, Duration::from_secs(3600)).await;
    let key = KeyPair::generate().unwrap();
    let good = csr(&key);
    // (case, token, csr, code, words in the message)
    let cases: [(&str, &str, Vec<u8>, Code, &str); 6] = [
        (
            "garbage CSR",
            "web-token",
            b"garbage".to_vec(),
            Code::InvalidArgument,
            "csr is not a DER PKCS#10",
        ),
        (
            "empty CSR",
            "web-token",
            Vec::new(),
            Code::InvalidArgument,
            "csr is empty",
        ),
        (
            "truncated CSR",
            "web-token",
            good[..good.len() - 10].to_vec(),
            Code::InvalidArgument,
            "csr",
        ),
        (
            "unknown token",
            "who-knows",
            good.clone(),
            Code::Unauthenticated,
            "not in the --identity-tokens file",
        ),
        (
            "empty token",
            "",
            good.clone(),
            Code::Unauthenticated,
            "empty",
        ),
        (
            "not a service account",
            "admin-token",
            good.clone(),
            Code::PermissionDenied,
            "not a ServiceAccount",
        ),
    ];
    for (case, token, csr, code, words) in cases {
        let status = certify(&server, token, csr).await.unwrap_err();
        assert_eq!(status.code(), code, "{case}: {status:?}");
        assert!(status.message().contains(words), "{case}: {status:?}");
    }
    assert_eq!(server.metrics.certificates_issued(), 0);
    let text = server.metrics.encode();
    for line in [
        "remora_control_certificates_refused_total{reason=\"invalid_csr\"} 3",
        "remora_control_certificates_refused_total{reason=\"unauthenticated\"} 2",
        "remora_control_certificates_refused_total{reason=\"not_service_account\"} 1",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[tokio::test]
async fn without_a_reviewer_or_a_ca_no_certificate_is_issued() {
    let key = KeyPair::generate().unwrap();
    let no_reviewer = start(false, true, Duration::from_secs(3600)).await;
    let status = certify(&no_reviewer, "web-token", csr(&key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("--identity-tokens"), "{status:?}");

    let no_ca = start(true, false, Duration::from_secs(3600)).await;
    let status = certify(&no_ca, "web-token", csr(&key)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("--ca-cert"), "{status:?}");
}
