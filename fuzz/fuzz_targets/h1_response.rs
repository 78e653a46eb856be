//! The HTTP/1 upstream response reader (`proxy/src/client/h1.rs`): `read_head` (status line,
//! headers, interim responses, framing) and `body_step` (length, chunked and close framing,
//! trailers), the two functions the proxy reads every upstream response with.
//!
//! Input: a flags byte (bit 0: the request was a HEAD), a byte seeding how the response is split
//! into reads, then the response bytes. Checked: no panic, no hang; a length-framed body is as
//! long as its `Content-Length`; and the response read in pieces is the response read in one
//! read: same head, same body bytes, same trailers, same error.
#![no_main]

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use http::{HeaderMap, Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use remora_proxy::client::h1::{body_step, read_head, BodyStep, State};
use tokio::io::{AsyncRead, ReadBuf};

/// The response as the proxy would pass it on, or the error it stopped at.
#[derive(Debug, PartialEq)]
struct Read {
    status: StatusCode,
    headers: HeaderMap,
    keep_alive: bool,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    /// The body ended as framed (not broken off).
    complete: bool,
}

/// The response's bytes handed out in pieces: every read returns at most the next piece.
struct Pieces<'a> {
    bytes: &'a [u8],
    /// What is left of the current piece.
    piece: &'a [u8],
    seed: u32,
    /// `false`: everything in one read.
    split: bool,
}

impl<'a> Pieces<'a> {
    /// The next piece (empty at the end), up to `room` bytes of it.
    fn next(&mut self, room: usize) -> &'a [u8] {
        if self.piece.is_empty() {
            let n = if self.split {
                self.seed ^= self.seed << 13;
                self.seed ^= self.seed >> 17;
                self.seed ^= self.seed << 5;
                (self.seed >> 8) as usize % 97 + 1
            } else {
                self.bytes.len()
            };
            (self.piece, self.bytes) = self.bytes.split_at(n.min(self.bytes.len()));
        }
        let taken;
        (taken, self.piece) = self.piece.split_at(room.min(self.piece.len()));
        taken
    }
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let piece = self.get_mut().next(out.remaining());
        out.put_slice(piece);
        Poll::Ready(Ok(()))
    }
}

fn read(bytes: &[u8], seed: u32, split: bool, method: &Method) -> Result<Read, String> {
    let mut io = Pieces {
        bytes,
        piece: &[],
        seed,
        split,
    };
    let mut buf = BytesMut::new();
    let mut task = Context::from_waker(Waker::noop());
    let parsed = {
        let mut head = pin!(read_head(&mut io, &mut buf, method, false));
        // Reads from memory never wait: one poll decides.
        match head.as_mut().poll(&mut task) {
            Poll::Ready(parsed) => parsed,
            Poll::Pending => panic!("read_head waited on a reader that never does"),
        }
    };
    let (response, mut state, keep_alive) = parsed.map_err(|(error, _)| error.to_string())?;
    let length = match state {
        State::Length(n) => Some(n),
        _ => None,
    };
    let mut read = Read {
        status: response.status(),
        headers: response.headers().clone(),
        keep_alive,
        body: Vec::new(),
        trailers: None,
        complete: false,
    };
    loop {
        match body_step(&mut state, &mut buf).map_err(|error| error.to_string())? {
            BodyStep::Frame(frame) => match frame.into_data() {
                Ok(data) => read.body.extend_from_slice(&data),
                Err(frame) => {
                    let trailers = frame.into_trailers().expect("data or trailers");
                    assert!(read.trailers.is_none(), "trailers twice");
                    read.trailers = Some(trailers);
                }
            },
            BodyStep::End => {
                assert_eq!(state, State::Done);
                read.complete = true;
                break;
            }
            BodyStep::More(_) => {
                let piece = io.next(usize::MAX);
                if piece.is_empty() {
                    if state == State::Close {
                        read.complete = true;
                        break;
                    }
                    return Err("the connection closed inside the body".to_string());
                }
                buf.extend_from_slice(piece);
            }
        }
        assert!(read.body.len() <= bytes.len(), "more body than bytes");
    }
    if let Some(length) = length {
        assert_eq!(read.body.len() as u64, length, "Content-Length");
    }
    Ok(read)
}

fuzz_target!(|data: &[u8]| {
    let [flags, seed, response @ ..] = data else {
        return;
    };
    let method = if flags & 1 != 0 {
        Method::HEAD
    } else {
        Method::GET
    };
    let seed = u32::from(*seed) << 8 | 0x9e37_79b9;
    let whole = read(response, seed, false, &method);
    let pieces = read(response, seed, true, &method);
    assert_eq!(whole, pieces);
});
