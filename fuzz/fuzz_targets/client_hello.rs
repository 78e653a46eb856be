//! An inbound connection's first bytes read as a ClientHello (`proxy/src/tls.rs`:
//! `is_handshake`, then `offers_mesh`, with rustls's `Acceptor`, as `read_hello` does while the
//! bytes come in).
//!
//! The first byte picks the input:
//! - 0: the rest, as a client's first bytes. Checked: no panic; once a prefix is classified
//!   (mesh or other TLS) or refused, every longer prefix says the same, so bytes arriving later
//!   never change a verdict.
//! - 1: a ClientHello made by rustls's client, offering the ALPN protocols the rest names
//!   (length-prefixed, `remora/1` added when the second byte is odd), cut or altered at a
//!   position the rest picks. Checked: the whole hello is classified mesh exactly when it offers
//!   `remora/1`, and a cut one is never classified until it is whole.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use remora_proxy::tls::{is_handshake, offers_mesh, BadHello, ALPN};

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => first_bytes(rest),
        Some((1, rest)) => made_hello(rest),
        _ => {}
    }
});

/// A verdict: `Some(Ok(mesh))`, `Some(Err(too_long))` refused, `None` not whole yet.
fn verdict(bytes: &[u8]) -> Option<Result<bool, bool>> {
    match offers_mesh(bytes) {
        Ok(Some(mesh)) => Some(Ok(mesh)),
        Ok(None) => None,
        Err(BadHello::TooLong) => Some(Err(true)),
        Err(_) => Some(Err(false)),
    }
}

fn first_bytes(data: &[u8]) {
    if !is_handshake(data) {
        return;
    }
    // The bytes as they come, in pieces: `read_hello` asks again after each read and stops at
    // the first verdict, so a later one may only agree with it (or find the bytes too many).
    let mut first: Option<Result<bool, bool>> = None;
    let step = (data.len() / 24).max(1);
    for end in (1..=data.len()).step_by(step).chain([data.len()]) {
        let now = verdict(&data[..end]);
        match (first, now) {
            (None, now) => first = now,
            (Some(_), Some(Err(true))) => {}
            (Some(before), now) => assert_eq!(now, Some(before), "prefix {end}"),
        }
    }
}

fn made_hello(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let mut protocols: Vec<Vec<u8>> = Vec::new();
    let mut rest = rest;
    // Protocols: a length byte (1..=32) and that many bytes, up to 4 of them.
    while protocols.len() < 4 {
        let Some((&len, tail)) = rest.split_first() else {
            break;
        };
        let len = (len as usize % 32) + 1;
        if tail.len() < len {
            break;
        }
        protocols.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    if choice & 1 == 1 {
        let at = (choice as usize >> 1) % (protocols.len() + 1);
        protocols.insert(at, ALPN.to_vec());
    }
    let hello = client_hello(protocols.clone());
    assert!(is_handshake(&hello));
    let mesh = protocols.iter().any(|p| p == ALPN);
    assert_eq!(verdict(&hello), Some(Ok(mesh)), "protocols {protocols:?}");
    // Cut: never a verdict before the hello is whole (a cut `remora/1` hello is no other TLS).
    let pick = |i: usize| rest.get(i).map_or(0, |b| *b as usize);
    let cut = (pick(0) << 8 | pick(1)) % hello.len();
    assert_eq!(
        verdict(&hello[..cut]),
        None,
        "cut at {cut} of {}",
        hello.len()
    );
}

/// A ClientHello from rustls's client, TLS 1.3 as a meshed proxy sends it, offering
/// `protocols`.
fn client_hello(protocols: Vec<Vec<u8>>) -> Vec<u8> {
    static CONFIG: OnceLock<rustls::ClientConfig> = OnceLock::new();
    let base = CONFIG.get_or_init(|| {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    });
    let mut config = base.clone();
    config.alpn_protocols = protocols;
    let name = rustls::pki_types::ServerName::try_from("peer.test").unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut hello).unwrap();
    }
    hello
}
