//! The HTTP/2 relay's frame follower (`proxy/src/serve/h2_relay.rs`, `Follower`): the frame
//! heads and header blocks of both directions, fed in arbitrary splits.
//!
//! Input: a flags byte (bit 0: with an access log, so the client's header blocks are decoded
//! too), a byte seeding the splits, the client stream's length (two bytes, big-endian), the
//! client stream (preface first) and the upstream stream (the rest). Checked: no panic; every
//! frame boundary the follower reports in the upstream's bytes (where the drain's `GOAWAY` goes)
//! is the last one a plain walk of the frame heads finds in those bytes; and the requests it
//! tracks do not depend on how each direction was split.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use remora_proxy::metrics::Metrics;
use remora_proxy::proxy::Proxy;
use remora_proxy::serve::h2_relay::Follower;

const TARGET: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);

fn proxy(access_log: bool) -> &'static Proxy {
    static PROXIES: [OnceLock<&'static Proxy>; 2] = [OnceLock::new(), OnceLock::new()];
    PROXIES[usize::from(access_log)].get_or_init(|| {
        Box::leak(Box::new(Proxy {
            connect_timeout: Duration::from_secs(1),
            keepalive: None,
            opaque_ports: Default::default(),
            proxy_ports: [15001, 15006],
            access_log,
            h2_relay: true,
            metrics: Metrics::new(),
            server_first: Default::default(),
            drain: Default::default(),
            workers: remora_proxy::runtime::workers::Workers::new(1).0,
            ready: Default::default(),
            discovery: None,
            inbound_rate_limit: None,
            identity: Default::default(),
            inbound_mtls: Default::default(),
        }))
    })
}

/// Piece sizes from a small generator seeded by the input: 1 to 64 bytes, sometimes larger.
struct Splits(u32);

impl Splits {
    fn next(&mut self) -> u32 {
        // xorshift32: deterministic for a given input, so a crash replays.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    fn piece(&mut self) -> usize {
        let r = self.next();
        if r.is_multiple_of(8) {
            (r >> 8) as usize % 4096 + 1
        } else {
            (r >> 8) as usize % 64 + 1
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, seed, hi, lo, rest @ ..] = data else {
        return;
    };
    let split = (usize::from(*hi) << 8 | usize::from(*lo)).min(rest.len());
    let (client, server) = rest.split_at(split);
    let cx = remora_proxy::inbound::context(proxy(flags & 1 != 0));
    let boundaries = server_boundaries(server);
    let mut splits = Splits(u32::from(*seed) << 8 | 0x9e37_79b9);

    // Both directions interleaved, each in pieces.
    let mut follower = Follower::new(cx, TARGET);
    let (mut c, mut s) = (0, 0);
    while c < client.len() || s < server.len() {
        let take_client =
            s == server.len() || (c < client.len() && splits.next().is_multiple_of(2));
        if take_client {
            let end = (c + splits.piece()).min(client.len());
            follower.client(&client[c..end]);
            c = end;
        } else {
            let end = (s + splits.piece()).min(server.len());
            let reported = follower.server(&server[s..end]).map(|at| s + at);
            let expected = boundaries.iter().rev().find(|&&at| at >= s && at <= end);
            assert_eq!(reported, expected.copied(), "boundary in {s}..{end}");
            s = end;
        }
    }
    assert_eq!(
        follower.at_server_boundary(),
        boundaries.last() == Some(&server.len())
    );

    // The client's bytes, then the upstream's: in pieces, and each whole, track the same.
    let mut pieces = Follower::new(cx, TARGET);
    for (stream, client_side) in [(client, true), (server, false)] {
        let mut at = 0;
        while at < stream.len() {
            let end = (at + splits.piece()).min(stream.len());
            if client_side {
                pieces.client(&stream[at..end]);
            } else {
                pieces.server(&stream[at..end]);
            }
            at = end;
        }
    }
    let mut whole = Follower::new(cx, TARGET);
    whole.client(client);
    whole.server(server);
    assert_eq!(pieces.in_flight(), whole.in_flight());
    assert_eq!(pieces.counting(), whole.counting());
});

/// The offsets in the upstream's bytes where a frame ends, after the first, outside a header
/// block: a plain walk of the frame heads (RFC 9113 §4.1, §6.10).
fn server_boundaries(server: &[u8]) -> Vec<usize> {
    let mut boundaries = Vec::new();
    let (mut at, mut in_block) = (0, false);
    while let Some(head) = server.get(at..at + 9) {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let end = at + 9 + len;
        if end > server.len() {
            break;
        }
        if matches!(head[3], 1 | 5 | 9) {
            in_block = head[4] & 0x4 == 0;
        }
        if !in_block {
            boundaries.push(end);
        }
        at = end;
    }
    boundaries
}
