//! The HPACK decoder the HTTP/2 relay follows header blocks with (`proxy/src/serve/hpack.rs`).
//!
//! Input: one byte choosing the side (even: responses, odd: requests), then header blocks, each
//! after a two-byte big-endian length (the last one takes what is left), all through one decoder
//! as a connection's blocks go. Checked: no panic; the fields a block gives, written again as
//! plain literals, decode to the same fields on a fresh decoder; a decoder that refused a block
//! is not used again, as the relay stops following that direction.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proxy::serve::hpack::{Decoder, Fields, Side};

fuzz_target!(|data: &[u8]| {
    let Some((&side, mut rest)) = data.split_first() else {
        return;
    };
    let side = if side % 2 == 0 {
        Side::Responses
    } else {
        Side::Requests
    };
    let mut decoder = Decoder::new(side);
    while !rest.is_empty() {
        let block = match rest {
            [hi, lo, tail @ ..] => {
                let len = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
                let (block, tail) = tail.split_at(len);
                rest = tail;
                block
            }
            _ => std::mem::take(&mut rest),
        };
        let Ok(fields) = decoder.decode(block) else {
            return;
        };
        check(side, &fields);
    }
});

fn check(side: Side, fields: &Fields) {
    if let Some(status) = fields.status {
        assert!((100..=999).contains(&status), "status {status}");
    }
    if side == Side::Responses {
        assert!(fields.method.is_none() && fields.authority.is_none());
        assert!(fields.path.is_none() && fields.host.is_none());
    } else {
        assert_eq!(fields.status, None);
    }
    let again = Decoder::new(side)
        .decode(&literals(fields))
        .expect("plain literals decode");
    assert_eq!(&again, fields);
}

/// The fields as literals without indexing and with literal names (RFC 7541 §6.2.2).
fn literals(fields: &Fields) -> Vec<u8> {
    let mut block = Vec::new();
    let status = fields.status.map(|status| status.to_string().into_bytes());
    let known: [(&[u8], Option<&[u8]>); 5] = [
        (b":status", status.as_deref()),
        (b":method", fields.method.as_deref()),
        (b":authority", fields.authority.as_deref()),
        (b":path", fields.path.as_deref()),
        (b"host", fields.host.as_deref()),
    ];
    for (name, value) in known {
        if let Some(value) = value {
            block.push(0);
            string(&mut block, name);
            string(&mut block, value);
        }
    }
    block
}

/// A raw string literal: a 7-bit-prefix length (§5.1), then the bytes.
fn string(block: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    if len < 127 {
        block.push(len as u8);
    } else {
        block.push(127);
        len -= 127;
        while len >= 128 {
            block.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        block.push(len as u8);
    }
    block.extend_from_slice(bytes);
}
