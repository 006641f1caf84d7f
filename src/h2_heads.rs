//! HTTP/2 request heads as the client sent them.
//!
//! The `h2` crate hands hyper a request's `:path` already parsed by the
//! `http` crate, which drops a `#` and everything after it. A raw `#` is not
//! allowed in `:path` (RFC 9113 section 8.3.1: path and query only), so such
//! a request is malformed; the proxy must refuse it rather than send the cut
//! key. [`H2Heads`] follows the client's side of an HTTP/2 connection (the
//! preface, then frames, RFC 9113 section 4.1) and decodes every header
//! block (HEADERS and its CONTINUATION frames) with an HPACK decoder of its
//! own (RFC 7541), kept in step with the client's encoder, to see each
//! request's `:method` and `:path` as sent. Frame payloads other than header
//! blocks are skipped, never copied.

use std::borrow::Cow;

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types and flags (RFC 9113 sections 6.2 and 6.10).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The dynamic table size the proxy's HTTP/2 server allows (the `h2`
/// crate's default `SETTINGS_HEADER_TABLE_SIZE`).
const HEADER_TABLE_SIZE: usize = 4096;
/// Longest header block followed; the server refuses longer ones too.
const MAX_BLOCK: usize = 1 << 20;

/// A request's `:method` and `:path`, as the client encoded them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Vec<u8>,
    pub path: Vec<u8>,
}

/// The client's bytes could not be followed (bad HPACK, a block too long):
/// the server will refuse them too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

/// Follows the client side of one HTTP/2 connection.
pub struct H2Heads {
    /// Preface bytes still to skip.
    preface_left: usize,
    /// The frame header being read (9 bytes).
    frame_header: Vec<u8>,
    /// The frame being read: its type, flags, and payload bytes to go.
    frame: Option<Frame>,
    /// The payload of a HEADERS or CONTINUATION frame read so far.
    payload: Vec<u8>,
    /// The header block being assembled.
    block: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: u8,
    flags: u8,
    left: usize,
}

impl Default for H2Heads {
    fn default() -> H2Heads {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        H2Heads {
            preface_left: PREFACE.len(),
            frame_header: Vec::with_capacity(9),
            frame: None,
            payload: Vec::new(),
            block: Vec::new(),
            decoder,
        }
    }
}

impl H2Heads {
    /// Follows newly read bytes (starting at the preface); calls `head` for
    /// every request head completed in them.
    pub fn follow(
        &mut self,
        mut read: &[u8],
        head: &mut impl FnMut(RequestHead),
    ) -> Result<(), Lost> {
        let skipped = self.preface_left.min(read.len());
        self.preface_left -= skipped;
        read = &read[skipped..];
        while !read.is_empty() {
            read = match self.frame {
                None => self.frame_header(read, head)?,
                Some(frame) => self.frame_payload(frame, read, head)?,
            };
        }
        Ok(())
    }

    fn frame_header<'r>(
        &mut self,
        read: &'r [u8],
        head: &mut impl FnMut(RequestHead),
    ) -> Result<&'r [u8], Lost> {
        let taken = (9 - self.frame_header.len()).min(read.len());
        self.frame_header.extend_from_slice(&read[..taken]);
        if self.frame_header.len() == 9 {
            let h = &self.frame_header;
            let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let frame = Frame {
                kind: h[3],
                flags: h[4],
                left: length,
            };
            self.frame_header.clear();
            if is_header_block(frame.kind) && self.block.len() + length > MAX_BLOCK {
                return Err(Lost);
            }
            self.frame = Some(frame);
            if length == 0 {
                self.frame_done(frame, head)?;
            }
        }
        Ok(&read[taken..])
    }

    fn frame_payload<'r>(
        &mut self,
        frame: Frame,
        read: &'r [u8],
        head: &mut impl FnMut(RequestHead),
    ) -> Result<&'r [u8], Lost> {
        let taken = frame.left.min(read.len());
        if is_header_block(frame.kind) {
            self.payload.extend_from_slice(&read[..taken]);
        }
        let left = frame.left - taken;
        self.frame = Some(Frame { left, ..frame });
        if left == 0 {
            self.frame_done(frame, head)?;
        }
        Ok(&read[taken..])
    }

    /// A whole frame was read: a header block fragment joins the block, and
    /// a whole block is decoded.
    fn frame_done(&mut self, frame: Frame, head: &mut impl FnMut(RequestHead)) -> Result<(), Lost> {
        self.frame = None;
        if !is_header_block(frame.kind) {
            return Ok(());
        }
        let payload = std::mem::take(&mut self.payload);
        let fragment = match frame.kind {
            HEADERS => headers_fragment(&payload, frame.flags).ok_or(Lost)?,
            _ => &payload[..],
        };
        self.block.extend_from_slice(fragment);
        self.payload = payload;
        self.payload.clear();
        if frame.flags & END_HEADERS != 0 {
            let block = std::mem::take(&mut self.block);
            self.decode(&block, head)?;
            self.block = block;
            self.block.clear();
        }
        Ok(())
    }

    /// Decodes one header block, keeping the dynamic table in step; a block
    /// with a `:path` is a request head (trailers have none).
    fn decode(&mut self, block: &[u8], head: &mut impl FnMut(RequestHead)) -> Result<(), Lost> {
        let mut method = None;
        let mut path = None;
        self.decoder
            .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| match &*name {
                b":method" => method = Some(value.into_owned()),
                b":path" => path = Some(value.into_owned()),
                _ => {}
            })
            .map_err(|_| Lost)?;
        if let (Some(method), Some(path)) = (method, path) {
            head(RequestHead { method, path });
        }
        Ok(())
    }
}

fn is_header_block(kind: u8) -> bool {
    kind == HEADERS || kind == CONTINUATION
}

/// The header block fragment of a HEADERS frame's payload: without its
/// padding and priority fields (RFC 9113 section 6.2).
fn headers_fragment(payload: &[u8], flags: u8) -> Option<&[u8]> {
    let (padding, mut start) = match flags & PADDED {
        0 => (0, 0),
        _ => (usize::from(*payload.first()?), 1),
    };
    if flags & PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(padding)?;
    payload.get(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = payload.len();
        let mut bytes = vec![
            (length >> 16) as u8,
            (length >> 8) as u8,
            length as u8,
            kind,
            flags,
        ];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn heads(reads: &[&[u8]]) -> Result<Vec<RequestHead>, Lost> {
        let mut heads = H2Heads::default();
        let mut seen = Vec::new();
        for read in reads {
            heads.follow(read, &mut |head| seen.push(head))?;
        }
        Ok(seen)
    }

    fn head(method: &str, path: &str) -> RequestHead {
        RequestHead {
            method: method.into(),
            path: path.into(),
        }
    }

    fn block(encoder: &mut loona_hpack::Encoder<'_>, fields: &[(&str, &str)]) -> Vec<u8> {
        encoder.encode(
            fields
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
        )
    }

    #[test]
    fn a_request_head_is_seen_as_encoded_with_its_hash() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = block(
            &mut encoder,
            &[
                (":method", "PUT"),
                (":scheme", "https"),
                (":path", "/b/hash#frag"),
                (":authority", "s3"),
            ],
        );
        let settings = frame(0x4, 0, 0, &[]);
        let headers = frame(HEADERS, END_HEADERS, 1, &block);
        let data = frame(0x0, 0x1, 1, b"PUT /b/not-a-head HTTP/1.1\r\n");
        let bytes = [PREFACE, &settings, &headers, &data].concat();
        assert_eq!(heads(&[&bytes]), Ok(vec![head("PUT", "/b/hash#frag")]));
        // Byte by byte, the same.
        let reads: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(heads(&reads), Ok(vec![head("PUT", "/b/hash#frag")]));
    }

    #[test]
    fn continuation_padding_priority_and_the_dynamic_table_are_followed() {
        // RFC 7541 by hand: `:method GET` (static index 2), then `:path`
        // (static name 4) with its value added to the dynamic table (index 62).
        let first = [&[0x82, 0x44, 0x06][..], b"/b/a#1"].concat();
        // The second block names both by index, the path from the dynamic table.
        let second = [0x82, 0x80 | 62];
        let (start, end) = first.split_at(first.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]); // priority fields
        padded.extend_from_slice(&second);
        padded.extend_from_slice(&[0, 0, 0]); // padding
        let bytes = [
            PREFACE,
            &frame(HEADERS, 0, 1, start),
            &frame(CONTINUATION, END_HEADERS, 1, end),
            &frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 3, &padded),
        ]
        .concat();
        assert_eq!(
            heads(&[&bytes]),
            Ok(vec![head("GET", "/b/a#1"), head("GET", "/b/a#1")])
        );
    }

    #[test]
    fn a_block_that_does_not_decode_loses_the_connection() {
        let bytes = [PREFACE, &frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff])].concat();
        assert_eq!(heads(&[&bytes]), Err(Lost));
    }
}
