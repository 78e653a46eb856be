//! What remora-control's identity service reads from a proxy (`control/src/identity/`): the DER
//! CSR (`parse_csr`, then `Ca::certify` when it is accepted) and the `--identity-tokens` file
//! (`review::parse_tokens`, then `review::service_account` for each user).
//!
//! The first byte picks the input: even, the rest is a CSR; odd, the rest is the token file's
//! text. Checked: no panic; an accepted CSR is signed, and the certificate's only SAN is the
//! SPIFFE URI given to `certify`, whatever SANs or subject the CSR asked for; a user accepted as
//! a ServiceAccount makes a SPIFFE URI that parses back to the same namespace and name.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use remora_control::identity::ca::Ca;
use remora_control::identity::review::{parse_tokens, service_account};
use remora_control::identity::{parse_csr, spiffe_id};
use x509_parser::extensions::{GeneralName, ParsedExtension};

const IDENTITY: &str = "spiffe://cluster.local/ns/fuzz/sa/target";

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let now = SystemTime::now();
        let (cert, key) = Ca::generate("cluster.local", now, Duration::from_secs(3600)).unwrap();
        Ca::from_pem(&cert, &key, now).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((choice, rest)) if choice & 1 == 0 => csr(rest),
        Some((_, rest)) => tokens(rest),
        None => {}
    }
});

fn csr(der: &[u8]) {
    let Ok(public_key) = parse_csr(der) else {
        return;
    };
    let issued = ca()
        .certify(
            &public_key,
            IDENTITY,
            SystemTime::now(),
            Duration::from_secs(60),
        )
        .expect("an accepted CSR is signed");
    let (rest, certificate) = x509_parser::parse_x509_certificate(&issued.certificate).unwrap();
    assert!(rest.is_empty());
    assert!(certificate.subject().iter().next().is_none(), "no subject");
    let mut sans = Vec::new();
    for extension in certificate.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            sans.extend(san.general_names.iter().map(|name| format!("{name:?}")));
            assert!(
                extension.critical,
                "the SAN extension of a subject-less certificate"
            );
        }
    }
    assert_eq!(
        sans,
        [format!("{:?}", GeneralName::URI(IDENTITY))],
        "the only SAN is the identity"
    );
}

fn tokens(text: &[u8]) {
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(users) = parse_tokens(text) else {
        return;
    };
    for (token, user) in users {
        assert!(!token.trim().is_empty() && token == token.trim());
        let Ok((namespace, name)) = service_account(&user) else {
            continue;
        };
        let uri = spiffe_id("cluster.local", &namespace, &name);
        let path = uri.strip_prefix("spiffe://cluster.local/ns/").unwrap();
        let (ns, sa) = path.split_once("/sa/").unwrap();
        assert_eq!((ns, sa), (namespace.as_str(), name.as_str()), "{uri}");
        assert!(!sa.contains('/') && !ns.contains('/'));
    }
}
