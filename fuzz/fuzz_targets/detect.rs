//! Protocol detection on a connection's first bytes (`proxy/src/serve/detect.rs`, `classify`).
//!
//! Checked: no panic, and a verdict never changes as more bytes come, since detection decides
//! on the bytes seen so far: every prefix that `classify` decides is decided the same way by
//! the whole input, and `None` (too few bytes) only ever comes before a verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proxy::serve::detect::{classify, Detected};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    assert_eq!(whole.is_none(), data.is_empty() || undecided(data));
    let mut first: Option<Detected> = None;
    for end in 0..=data.len().min(32) {
        match (classify(&data[..end]), first) {
            (Some(verdict), None) => first = Some(verdict),
            (Some(verdict), Some(earlier)) => assert_eq!(verdict, earlier, "prefix {end}"),
            (None, Some(earlier)) => panic!("prefix {end} undecided after {earlier:?}"),
            (None, None) => {}
        }
    }
    if let (Some(first), Some(whole)) = (first, whole) {
        assert_eq!(first, whole);
    }
});

/// Whether `bytes` could still begin the HTTP/2 preface or an HTTP/1 method: the only inputs
/// on which detection waits for more.
fn undecided(bytes: &[u8]) -> bool {
    const STARTS: [&[u8]; 10] = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    STARTS
        .iter()
        .any(|start| bytes.len() < start.len() && start.starts_with(bytes))
}
