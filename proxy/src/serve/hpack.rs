//! Just enough HPACK (RFC 7541) for [`super::h2_relay`], which carries header blocks without
//! re-encoding them: the `:status` of responses, and for the access log the `:method`,
//! `:authority` (or `Host`) and `:path` of requests.
//!
//! The relay passes every header block on as it came, so it only has to follow the sender's
//! dynamic table, not keep its contents: an entry is kept as its size (which decides evictions)
//! and, for a field the decoder reads, its value. Strings are decoded only where that is needed:
//! a literal name that may be one of those fields, their values, and the length of a
//! Huffman-coded string that enters the table. Everything else is skipped by its length.

use std::collections::VecDeque;

/// Why a header block could not be followed. The relay then stops reading that direction's
/// blocks on the connection; the two ends check the blocks themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed header block: {0}")]
pub struct Malformed(pub &'static str);

/// The largest table the decoder follows. The receiving end allows the sender what it announced
/// in `SETTINGS_HEADER_TABLE_SIZE` (4096 unless it says otherwise) and checks the limit itself;
/// a larger table is not followed, so that a peer cannot make the proxy keep an unbounded one.
const MAX_TABLE_SIZE: usize = 1 << 20;

/// Whose header blocks a decoder reads, which decides the fields it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `:status`.
    Responses,
    /// `:method`, `:authority`, `:path` and `host`.
    Requests,
}

/// A field a decoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Status,
    Method,
    Authority,
    Path,
    Host,
}

impl Known {
    /// The field `name` names, if `side` reads it.
    fn of(side: Side, name: &[u8]) -> Option<Self> {
        match (side, name) {
            (Side::Responses, b":status") => Some(Self::Status),
            (Side::Requests, b":method") => Some(Self::Method),
            (Side::Requests, b":authority") => Some(Self::Authority),
            (Side::Requests, b":path") => Some(Self::Path),
            (Side::Requests, b"host") => Some(Self::Host),
            _ => None,
        }
    }
}

/// The fields of one header block that its decoder reads; `None` where the block had none.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fields {
    /// Three digits, else `None`.
    pub status: Option<u16>,
    pub method: Option<Box<[u8]>>,
    pub authority: Option<Box<[u8]>>,
    pub path: Option<Box<[u8]>>,
    pub host: Option<Box<[u8]>>,
}

impl Fields {
    fn set(&mut self, known: Known, value: &[u8]) {
        let slot = match known {
            Known::Status => {
                self.status = parse_status(value);
                return;
            }
            Known::Method => &mut self.method,
            Known::Authority => &mut self.authority,
            Known::Path => &mut self.path,
            Known::Host => &mut self.host,
        };
        *slot = Some(value.into());
    }
}

/// An entry of the sender's dynamic table, as far as the relay needs it.
#[derive(Debug, Clone)]
struct Entry {
    name_len: u32,
    value_len: u32,
    /// The field, if the decoder reads it, and its value.
    known: Option<(Known, Box<[u8]>)>,
}

impl Entry {
    /// Its size by RFC 7541 §4.1.
    fn size(&self) -> usize {
        self.name_len as usize + self.value_len as usize + 32
    }
}

/// The decoding side of one direction's header compression.
#[derive(Debug)]
pub struct Decoder {
    side: Side,
    /// Newest first, as HPACK indexes them.
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

/// A header name as the decoder sees it: its length and the field it names, if read.
#[derive(Clone, Copy)]
struct Name {
    len: u32,
    known: Option<Known>,
}

impl Decoder {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            entries: VecDeque::new(),
            size: 0,
            // RFC 9113 §6.5.2: SETTINGS_HEADER_TABLE_SIZE starts at 4096.
            max: 4096,
        }
    }

    /// Reads one complete header block (the fragments of a `HEADERS` or `PUSH_PROMISE` and its
    /// `CONTINUATION`s, joined), updates the table as the sender did, and returns the fields
    /// this decoder reads.
    pub fn decode(&mut self, mut block: &[u8]) -> Result<Fields, Malformed> {
        let mut fields = Fields::default();
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = integer(&mut block, 7)?;
                self.indexed(index, &mut fields)?;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                let max = integer(&mut block, 5)?;
                if max > MAX_TABLE_SIZE {
                    return Err(Malformed("table size above the limit followed"));
                }
                self.max = max;
                self.evict(0);
            } else {
                // A literal: with incremental indexing (§6.2.1, 6-bit prefix), the only kind
                // that enters the table, or without indexing or never indexed (§6.2.2, §6.2.3).
                let indexing = first & 0xc0 == 0x40;
                let index = integer(&mut block, if indexing { 6 } else { 4 })?;
                let name = self.literal_name(&mut block, index)?;
                let (huffman, bytes) = raw_string(&mut block)?;
                let mut value_len = bytes.len() as u32;
                let mut known = None;
                if let Some(field) = name.known {
                    let value = if huffman {
                        let mut value = Vec::with_capacity(bytes.len() * 8 / 5);
                        huffman::decode(bytes, |byte| value.push(byte))?;
                        value.into_boxed_slice()
                    } else {
                        bytes.into()
                    };
                    value_len = value.len() as u32;
                    fields.set(field, &value);
                    known = Some((field, value));
                } else if indexing && huffman {
                    value_len = 0;
                    huffman::decode(bytes, |_| value_len += 1)?;
                }
                if indexing {
                    self.insert(Entry {
                        name_len: name.len,
                        value_len,
                        known,
                    });
                }
            }
        }
        Ok(fields)
    }

    /// Reads table entry `index` (1-based, static entries first) into `fields`.
    fn indexed(&self, index: usize, fields: &mut Fields) -> Result<(), Malformed> {
        if let Some((name, value)) = index.checked_sub(1).and_then(|at| STATIC.get(at)) {
            if let Some(known) = Known::of(self.side, name.as_bytes()) {
                fields.set(known, value.as_bytes());
            }
            return Ok(());
        }
        if let Some((known, value)) = &self.entry(index)?.known {
            fields.set(*known, value);
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<&Entry, Malformed> {
        index
            .checked_sub(1 + STATIC.len())
            .and_then(|at| self.entries.get(at))
            .ok_or(Malformed("index beyond the table"))
    }

    /// A literal's name: by `index` into the table, or (index 0) the string that follows.
    fn literal_name(&self, block: &mut &[u8], index: usize) -> Result<Name, Malformed> {
        if index == 0 {
            return name_string(block, self.side);
        }
        if let Some((name, _)) = STATIC.get(index - 1) {
            return Ok(Name {
                len: name.len() as u32,
                known: Known::of(self.side, name.as_bytes()),
            });
        }
        let entry = self.entry(index)?;
        Ok(Name {
            len: entry.name_len,
            known: entry.known.as_ref().map(|(known, _)| *known),
        })
    }

    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        if size > self.max {
            // §4.4: an entry larger than the table empties it and is not added.
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.entries.push_front(entry);
    }

    /// Evicts the oldest entries until `room` more fits.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some(oldest) = self.entries.pop_back() else {
                break;
            };
            self.size -= oldest.size();
        }
    }
}

/// An HPACK integer with an `n`-bit prefix (§5.1), taken off the front of `block`.
fn integer(block: &mut &[u8], n: u32) -> Result<usize, Malformed> {
    let (&first, mut rest) = block.split_first().ok_or(Malformed("truncated integer"))?;
    let mask = (1usize << n) - 1;
    let mut value = first as usize & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&byte, tail) = rest.split_first().ok_or(Malformed("truncated integer"))?;
            rest = tail;
            if shift > 21 {
                return Err(Malformed("integer too large"));
            }
            value += ((byte & 0x7f) as usize) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

/// A string literal's head (§5.2): whether it is Huffman-coded, and its bytes.
fn raw_string<'a>(block: &mut &'a [u8]) -> Result<(bool, &'a [u8]), Malformed> {
    let huffman = block.first().ok_or(Malformed("truncated string"))? & 0x80 != 0;
    let len = integer(block, 7)?;
    if len > block.len() {
        return Err(Malformed("truncated string"));
    }
    let (bytes, rest) = block.split_at(len);
    *block = rest;
    Ok((huffman, bytes))
}

/// A literal name: its decoded length and the field it names, if `side` reads it.
fn name_string(block: &mut &[u8], side: Side) -> Result<Name, Malformed> {
    let (huffman, bytes) = raw_string(block)?;
    if !huffman {
        return Ok(Name {
            len: bytes.len() as u32,
            known: Known::of(side, bytes),
        });
    }
    // The names read are at most 10 bytes long; a longer one is only counted.
    let mut short = [0u8; 10];
    let mut len = 0usize;
    huffman::decode(bytes, |byte| {
        if let Some(slot) = short.get_mut(len) {
            *slot = byte;
        }
        len += 1;
    })?;
    let known = short.get(..len).and_then(|name| Known::of(side, name));
    Ok(Name {
        len: len as u32,
        known,
    })
}

fn parse_status(value: &[u8]) -> Option<u16> {
    match value {
        [a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// The static table (RFC 7541 Appendix A).
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The Huffman code of RFC 7541 Appendix B, decoded as a canonical code.
mod huffman {
    use super::Malformed;

    /// The code length of each symbol, 0–255 and EOS (256), from RFC 7541 Appendix B. The code
    /// is canonical (within a length, codes rise with the symbol), so the lengths define it.
    const LENGTHS: [u8; 257] = [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30,
        28, 28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
        5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5,
        7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22,
        22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23,
        22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22,
        21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26,
        26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20,
        24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27,
        27, 28, 27, 27, 27, 27, 27, 26, 30,
    ];
    const EOS: u16 = 256;
    const MIN: usize = 5;
    const MAX: usize = 30;

    /// Per code length: the first code, the end of the codes (first + count), and where the
    /// length's symbols start in `symbols`.
    pub(super) struct Code {
        pub(super) first: [u32; MAX + 1],
        pub(super) end: [u32; MAX + 1],
        offset: [u16; MAX + 1],
        /// Symbols by code length, then by value.
        symbols: [u16; 257],
    }

    pub(super) static CODE: Code = build();

    /// The code length of the symbol whose code begins with a byte, where it is 8 bits or fewer
    /// (the common symbols: letters, digits, most punctuation), else 0.
    static SHORT: [u8; 256] = short();

    const fn short() -> [u8; 256] {
        let mut table = [0u8; 256];
        let mut byte = 0;
        while byte < 256 {
            let mut len = MIN;
            while len <= 8 {
                if (byte >> (8 - len)) < CODE.end[len] as usize {
                    table[byte] = len as u8;
                    break;
                }
                len += 1;
            }
            byte += 1;
        }
        table
    }

    const fn build() -> Code {
        let mut count = [0u32; MAX + 1];
        let mut sym = 0;
        while sym < 257 {
            count[LENGTHS[sym] as usize] += 1;
            sym += 1;
        }
        let mut code = Code {
            first: [0; MAX + 1],
            end: [0; MAX + 1],
            offset: [0; MAX + 1],
            symbols: [0; 257],
        };
        let (mut next, mut at) = (0u32, 0u16);
        let mut len = 1;
        while len <= MAX {
            code.first[len] = next;
            code.end[len] = next + count[len];
            code.offset[len] = at;
            at += count[len] as u16;
            next = (next + count[len]) << 1;
            len += 1;
        }
        let mut filled = [0u16; MAX + 1];
        let mut sym = 0;
        while sym < 257 {
            let len = LENGTHS[sym] as usize;
            code.symbols[(code.offset[len] + filled[len]) as usize] = sym as u16;
            filled[len] += 1;
            sym += 1;
        }
        code
    }

    /// Encodes `text` with the code (for tests: the proxy never encodes).
    #[cfg(test)]
    pub(super) fn encode(text: &[u8]) -> Vec<u8> {
        let (mut out, mut acc, mut bits) = (Vec::new(), 0u64, 0u32);
        for &byte in text {
            let len = LENGTHS[usize::from(byte)] as usize;
            let rank = CODE.symbols[usize::from(CODE.offset[len])..]
                .iter()
                .position(|&symbol| symbol == u16::from(byte))
                .unwrap() as u32;
            acc = (acc << len) | u64::from(CODE.first[len] + rank);
            bits += len as u32;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        out
    }

    /// Decodes `bytes`, handing each symbol to `out`. The padding must be at most 7 bits of
    /// the EOS code's leading ones (§5.2); EOS itself is an error.
    pub(super) fn decode(bytes: &[u8], mut out: impl FnMut(u8)) -> Result<(), Malformed> {
        // The bits not yet decoded, the next one topmost.
        let (mut acc, mut bits, mut rest) = (0u64, 0u32, bytes);
        loop {
            while bits <= 56 {
                let Some((&byte, tail)) = rest.split_first() else {
                    break;
                };
                acc |= u64::from(byte) << (56 - bits);
                bits += 8;
                rest = tail;
            }
            if bits == 0 {
                return Ok(());
            }
            // The next 30 bits, padded with ones past the end, as EOS would continue.
            let pad = u64::MAX.checked_shr(bits).unwrap_or(0);
            let window = ((acc | pad) >> (64 - MAX)) as u32;
            let mut len = usize::from(SHORT[(window >> (MAX - 8)) as usize]);
            if len == 0 {
                len = 9;
                while len <= MAX && (window >> (MAX - len)) >= CODE.end[len] {
                    len += 1;
                }
            }
            if len as u32 > bits {
                // What is left is padding: fewer than 8 bits, all ones.
                return if bits < 8 && acc >> (64 - bits) == (1 << bits) - 1 {
                    Ok(())
                } else {
                    Err(Malformed("bad Huffman padding"))
                };
            }
            let value = window >> (MAX - len);
            let symbol =
                CODE.symbols[(u32::from(CODE.offset[len]) + value - CODE.first[len]) as usize];
            if symbol == EOS {
                return Err(Malformed("EOS in a Huffman string"));
            }
            out(symbol as u8);
            acc <<= len;
            bits -= len as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
            .collect()
    }

    fn huffman(bytes: &[u8]) -> Result<Vec<u8>, Malformed> {
        let mut out = Vec::new();
        huffman::decode(bytes, |byte| out.push(byte))?;
        Ok(out)
    }

    #[test]
    fn the_huffman_code_is_complete_and_has_the_rfcs_codes() {
        // A complete prefix code: the Kraft sum is exactly one.
        let kraft: u64 = (5..=30)
            .map(|len| u64::from(huffman::CODE.end[len] - huffman::CODE.first[len]) << (30 - len))
            .sum();
        assert_eq!(kraft, 1 << 30);
        // Codes from RFC 7541 Appendix B: '0' 00000, 'a' 00011, ' ' 010100, 0 |11111111|11000.
        assert_eq!(huffman::CODE.first[5], 0);
        assert_eq!(huffman::CODE.first[6], 0x14);
        assert_eq!(huffman::CODE.first[13], 0x1ff8);
        assert_eq!(huffman::CODE.end[30], 0x3fff_ffff + 1);
    }

    #[test]
    fn huffman_strings_of_rfc_7541_appendix_c_decode() {
        let cases = [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
            ("640e ff", "307"),
        ];
        for (coded, text) in cases {
            assert_eq!(huffman(&hex(coded)).unwrap(), text.as_bytes(), "{text}");
        }
    }

    /// A small deterministic generator, for inputs of every byte value.
    fn bytes(seed: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (*seed >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn every_byte_value_round_trips_through_the_code() {
        let mut seed = 1;
        for len in 0..300 {
            let text = bytes(&mut seed, len);
            assert_eq!(huffman(&huffman::encode(&text)).unwrap(), text, "{text:?}");
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman(&huffman::encode(&all)).unwrap(), all);
        // The RFC's own example, as encoded here.
        assert_eq!(
            huffman::encode(b"www.example.com"),
            hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder() {
        let mut seed = 7;
        for len in 0..2000 {
            let block = bytes(&mut seed, len % 97);
            let _ = huffman(&block);
            for side in [Side::Requests, Side::Responses] {
                let _ = Decoder::new(side).decode(&block);
            }
        }
    }

    #[test]
    fn bad_huffman_padding_and_eos_are_refused() {
        // "302" followed by a full byte of ones: padding longer than 7 bits.
        assert!(huffman(&hex("6402 ff")).is_err());
        // '0' (00000) padded with zeros instead of ones.
        assert!(huffman(&hex("00")).is_err());
        // EOS, 30 ones, inside the string.
        assert!(huffman(&hex("ffff ffff")).is_err());
        assert_eq!(huffman(&[]).unwrap(), b"");
    }

    fn status(decoder: &mut Decoder, block: &str) -> Option<u16> {
        decoder.decode(&hex(block)).unwrap().status
    }

    #[test]
    fn the_responses_of_rfc_7541_c6_give_their_statuses_and_keep_the_table_in_step() {
        // C.6 encodes three responses into a 256-byte table with Huffman coding: the second
        // refers to entries the first added and evicts the first `:status`, the third refers to
        // entries after evictions. Prefixed by a size update to 256, as the sender announces it.
        let mut decoder = Decoder::new(Side::Responses);
        let blocks = [
            (
                "3fe101 4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0
                 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                302,
            ),
            ("4883 640e ffc1 c0bf", 307),
            (
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
                 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
                 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                200,
            ),
        ];
        for (block, expected) in blocks {
            assert_eq!(status(&mut decoder, block), Some(expected));
        }
        // C.6.3 ends with three entries, 215 bytes.
        assert_eq!(decoder.entries.len(), 3);
        assert_eq!(decoder.size, 215);
        // An index past the table is malformed.
        assert!(decoder.decode(&hex("c2")).is_err());
    }

    #[test]
    fn the_requests_of_rfc_7541_c4_give_method_authority_and_path() {
        let mut decoder = Decoder::new(Side::Requests);
        let blocks = [
            ("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", "GET", "/"),
            ("8286 84be 5886 a8eb 1064 9cbf", "GET", "/"),
            (
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                "GET",
                "/index.html",
            ),
        ];
        for (block, method, path) in blocks {
            let fields = decoder.decode(&hex(block)).unwrap();
            assert_eq!(fields.method.as_deref(), Some(method.as_bytes()));
            assert_eq!(fields.path.as_deref(), Some(path.as_bytes()));
            // The authority of the first, from the dynamic table in the others.
            assert_eq!(fields.authority.as_deref(), Some(&b"www.example.com"[..]));
            assert_eq!(fields.status, None);
        }
        // C.4.3 ends with three entries, 164 bytes.
        assert_eq!(decoder.size, 164);
        // `host`, as a literal name; a response decoder reads none of these.
        let host = "0004 686f 7374 0a74 6573 742e 6c6f 6361 6c";
        let fields = decoder.decode(&hex(host)).unwrap();
        assert_eq!(fields.host.as_deref(), Some(&b"test.local"[..]));
        let fields = Decoder::new(Side::Responses).decode(&hex(host)).unwrap();
        assert_eq!(fields, Fields::default());
    }

    #[test]
    fn a_status_in_each_representation_is_read() {
        let mut decoder = Decoder::new(Side::Responses);
        // Raw literal with incremental indexing, then the dynamic entry it made (62).
        assert_eq!(status(&mut decoder, "4803 3330 37"), Some(307));
        assert_eq!(status(&mut decoder, "be"), Some(307));
        // Without indexing and never indexed, name by index.
        assert_eq!(status(&mut decoder, "0803 3530 33"), Some(503));
        assert_eq!(status(&mut decoder, "1803 3130 33"), Some(103));
        // The name as a raw literal, and Huffman-coded (":status" is b8 84 8d 36 a3).
        assert_eq!(
            status(&mut decoder, "0007 3a73 7461 7475 7303 3432 39"),
            Some(429)
        );
        assert_eq!(
            status(&mut decoder, "0085 b884 8d36 a303 3230 31"),
            Some(201)
        );
        // No status (trailers), and a block of other fields only.
        assert_eq!(status(&mut decoder, "4001 7801 79"), None);
        assert_eq!(status(&mut decoder, ""), None);
        // A table size update to 0 empties the table.
        assert_eq!(status(&mut decoder, "20"), None);
        assert!(decoder.decode(&hex("be")).is_err());
    }

    #[test]
    fn truncated_and_oversized_blocks_are_malformed() {
        let mut decoder = Decoder::new(Side::Responses);
        assert!(decoder.decode(&hex("48")).is_err());
        assert!(decoder.decode(&hex("4805 3330")).is_err());
        assert!(decoder.decode(&hex("7f")).is_err());
        assert!(decoder.decode(&hex("80")).is_err());
        // A size update beyond what is followed.
        assert!(decoder.decode(&hex("3fe1 ff7f")).is_err());
        // An integer that never ends.
        assert!(decoder.decode(&hex("ffff ffff ffff ff")).is_err());
    }
}
