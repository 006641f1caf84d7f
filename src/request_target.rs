//! Request targets the HTTP parser would change silently: a raw `#`.
//!
//! `#` starts a URI fragment (RFC 3986 section 3.5), which is never part of a
//! request target (RFC 9112 section 3.2), and the `http` crate's parser drops
//! it and everything after it. A client that sends `PUT /bucket/hash#frag`
//! would have its object stored as `hash`: a different object than it asked
//! for. The proxy refuses such a request instead (`400 InvalidURI`).
//!
//! hyper hands the proxy only the parsed target, so [`TargetWatch`] follows
//! the bytes of an HTTP/1.1 connection as they are read, message by message
//! (each head parsed with httparse, as hyper parses it, then its body skipped
//! by `Content-Length` or chunk sizes): a request whose target has a `#` is
//! recorded as `METHOD SP target-before-#`, and the handler asks whether the
//! request it got is one of those. Body bytes are never taken for a request.
//! An HTTP/2 connection, or bytes hyper refuses too, end the watch.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Refused request lines remembered at once per connection; a client that
/// pipelines more has every later request refused.
const MAX_RECORDED: usize = 64;
/// Longest head followed (larger ones hyper refuses too).
const MAX_HEAD: usize = 1 << 20;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 16 << 10;

/// The request lines with a raw `#` seen on one connection.
#[derive(Debug, Default)]
pub struct CutTargets {
    recorded: Mutex<VecDeque<Vec<u8>>>,
    /// More were recorded than kept: no request on the connection is trusted.
    overflowed: std::sync::atomic::AtomicBool,
}

impl CutTargets {
    /// True (once) when a request line `method SP target#...` was read,
    /// `target` in origin-form (an absolute-form target is compared by its
    /// path and query, as the backend receives the rest in the `Host`).
    pub fn take(&self, method: &str, target: &str) -> bool {
        if self.overflowed.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        let mut recorded = self.recorded.lock().unwrap();
        if recorded.is_empty() {
            return false;
        }
        let wanted = [method.as_bytes(), b" ", target.as_bytes()].concat();
        match recorded.iter().position(|line| *line == wanted) {
            Some(index) => {
                recorded.remove(index);
                true
            }
            None => false,
        }
    }

    fn record(&self, line: Vec<u8>) {
        let mut recorded = self.recorded.lock().unwrap();
        if recorded.len() == MAX_RECORDED {
            self.overflowed
                .store(true, std::sync::atomic::Ordering::Release);
            return;
        }
        recorded.push_back(line);
    }
}

/// A client connection's reads, followed request by request (HTTP/1.1
/// framing: the head, then a `Content-Length` or chunked body) so that the
/// target of each request is seen as it was sent.
pub struct TargetWatch<I> {
    inner: I,
    cut: Arc<CutTargets>,
    framing: Framing,
    /// The part of a head, chunk-size line or trailer read so far.
    pending: Vec<u8>,
}

/// Where the connection's byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// In a request head.
    Head,
    /// In a body with this many bytes to go.
    Body(u64),
    /// At a chunk-size line of a chunked body.
    ChunkSize,
    /// In a chunk: this many bytes of data and CRLF to go.
    ChunkData(u64),
    /// In the trailer section after the last chunk.
    Trailers,
    /// Not HTTP/1.x, or lost: nothing more is watched.
    Off,
}

impl<I> TargetWatch<I> {
    pub fn new(inner: I, cut: Arc<CutTargets>) -> TargetWatch<I> {
        TargetWatch {
            inner,
            cut,
            framing: Framing::Head,
            pending: Vec::new(),
        }
    }

    /// Follows newly read bytes.
    fn scan(&mut self, mut read: &[u8]) {
        while !read.is_empty() {
            read = match self.framing {
                Framing::Off => return,
                Framing::Body(left) | Framing::ChunkData(left) => {
                    let taken = left.min(read.len() as u64);
                    let left = left - taken;
                    self.framing = match (self.framing, left) {
                        (Framing::Body(_), 0) => Framing::Head,
                        (Framing::Body(_), _) => Framing::Body(left),
                        (_, 0) => Framing::ChunkSize,
                        _ => Framing::ChunkData(left),
                    };
                    &read[taken as usize..]
                }
                Framing::Head => self.head(read),
                Framing::ChunkSize => self.chunk_size(read),
                Framing::Trailers => self.trailer_line(read),
            };
        }
    }

    /// Takes head bytes; at the end of the head, records a cut target and
    /// moves to the body. Returns what is left of `read`.
    fn head<'r>(&mut self, read: &'r [u8]) -> &'r [u8] {
        // The common case, a head within one read, is parsed in place.
        let (parsed, before) = if self.pending.is_empty() {
            (parse_head(read), 0)
        } else {
            let before = self.pending.len();
            self.pending.extend_from_slice(read);
            (parse_head(&self.pending), before)
        };
        match parsed {
            Head::Partial => {
                if self.pending.is_empty() {
                    self.pending.extend_from_slice(read);
                }
                if self.pending.len() > MAX_HEAD {
                    return self.lose();
                }
                &[]
            }
            Head::Invalid => self.lose(),
            Head::Complete { length, cut, body } => {
                if let Some(line) = cut {
                    self.cut.record(line);
                }
                self.framing = body;
                self.pending.clear();
                &read[length - before..]
            }
        }
    }

    /// Takes a chunk-size line (RFC 9112 section 7.1).
    fn chunk_size<'r>(&mut self, read: &'r [u8]) -> &'r [u8] {
        let Some(rest) = self.take_line(read) else {
            return &[];
        };
        self.framing = match chunk_size(&self.pending) {
            Some(0) => Framing::Trailers,
            Some(size) => size.checked_add(2).map_or(Framing::Off, Framing::ChunkData),
            None => Framing::Off,
        };
        self.pending.clear();
        rest
    }

    /// Takes one trailer line; an empty one ends the message.
    fn trailer_line<'r>(&mut self, read: &'r [u8]) -> &'r [u8] {
        let Some(rest) = self.take_line(read) else {
            return &[];
        };
        // As hyper reads it: the trailer section ends at an empty CRLF line.
        if self.pending.as_slice() == b"\r\n" {
            self.framing = Framing::Head;
        }
        self.pending.clear();
        rest
    }

    /// Adds `read` up to its first `\n` to the pending line; the rest of
    /// `read` once the line is whole, `None` while it is not (a line longer
    /// than [`MAX_LINE`] ends the watch).
    fn take_line<'r>(&mut self, read: &'r [u8]) -> Option<&'r [u8]> {
        let Some(end) = memchr::memchr(b'\n', read) else {
            self.pending.extend_from_slice(read);
            if self.pending.len() > MAX_LINE {
                self.lose();
            }
            return None;
        };
        self.pending.extend_from_slice(&read[..=end]);
        Some(&read[end + 1..])
    }

    /// Stops watching: HTTP/2, or bytes hyper will refuse too.
    fn lose<'r>(&mut self) -> &'r [u8] {
        self.framing = Framing::Off;
        self.pending = Vec::new();
        &[]
    }
}

/// The size on a chunk-size line (hex digits, any number of leading zeros,
/// then extensions): leniently, as hyper takes more forms than httparse.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    line[..digits].iter().try_fold(0u64, |size, &digit| {
        let value = (digit as char).to_digit(16)? as u64;
        size.checked_mul(16)?.checked_add(value)
    })
}

/// What a request head says, once complete.
enum Head {
    Partial,
    Invalid,
    Complete {
        /// Bytes of the head.
        length: usize,
        /// `METHOD SP target-before-#` when the target has a raw `#`.
        cut: Option<Vec<u8>>,
        /// How the body is framed.
        body: Framing,
    },
}

/// Parses a request head as hyper does (httparse), with room for as many
/// fields as any listener allows.
fn parse_head(bytes: &[u8]) -> Head {
    let mut few = [httparse::EMPTY_HEADER; 128];
    match head_of(&mut few, bytes) {
        Ok(head) => head,
        Err(httparse::Error::TooManyHeaders) => {
            let mut many = vec![httparse::EMPTY_HEADER; MAX_HEAD / 4];
            head_of(&mut many, bytes).unwrap_or(Head::Invalid)
        }
        Err(_) => Head::Invalid,
    }
}

fn head_of<'b>(
    fields: &mut [httparse::Header<'b>],
    bytes: &'b [u8],
) -> Result<Head, httparse::Error> {
    let mut request = httparse::Request::new(fields);
    let length = match request.parse(bytes)? {
        httparse::Status::Complete(length) => length,
        httparse::Status::Partial => return Ok(Head::Partial),
    };
    let (Some(method), Some(path)) = (request.method, request.path) else {
        return Ok(Head::Invalid);
    };
    let cut = path.find('#').map(|hash| {
        let kept = origin_form(&path.as_bytes()[..hash]);
        [method.as_bytes(), b" ", &kept].concat()
    });
    Ok(Head::Complete {
        length,
        cut,
        body: body_framing(request.headers),
    })
}

/// A target in origin-form: an absolute-form one (`HTTP://host/p?q`) loses
/// its scheme and authority, as `http::Uri` keeps them apart; an empty path
/// is `/`.
fn origin_form(target: &[u8]) -> Vec<u8> {
    let Some(scheme_end) = target.windows(3).position(|w| w == b"://") else {
        return target.to_vec();
    };
    let after = &target[scheme_end + 3..];
    let rest = after
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .map_or(&[][..], |at| &after[at..]);
    match rest.first() {
        Some(b'/') => rest.to_vec(),
        _ => [b"/".as_slice(), rest].concat(),
    }
}

/// The trimmed, lower-case values of the fields called `name`.
fn values(fields: &[httparse::Header<'_>], name: &str) -> Vec<String> {
    fields
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case(name))
        .map(|field| {
            String::from_utf8_lossy(field.value)
                .trim()
                .to_ascii_lowercase()
        })
        .collect()
}

/// RFC 9112 section 6.3: `Transfer-Encoding` ending in chunked wins over
/// `Content-Length`; neither means no body.
fn body_framing(fields: &[httparse::Header<'_>]) -> Framing {
    if let Some(coding) = values(fields, "transfer-encoding").last() {
        return match coding.rsplit(',').next().map(str::trim) {
            Some("chunked") => Framing::ChunkSize,
            _ => Framing::Off,
        };
    }
    match values(fields, "content-length")
        .first()
        .map(|v| v.parse::<u64>())
    {
        None | Some(Ok(0)) => Framing::Head,
        Some(Ok(length)) => Framing::Body(length),
        Some(Err(_)) => Framing::Off,
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TargetWatch<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            this.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TargetWatch<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(reads: &[&[u8]]) -> Arc<CutTargets> {
        let cut = Arc::new(CutTargets::default());
        let mut watch = TargetWatch::new((), Arc::clone(&cut));
        for read in reads {
            watch.scan(read);
        }
        cut
    }

    #[test]
    fn a_raw_hash_in_a_request_target_is_recorded() {
        let cut = watched(&[b"PUT /b/hash#frag HTTP/1.1\r\nHost: s3\r\n\r\n"]);
        assert!(cut.take("PUT", "/b/hash"));
        assert!(!cut.take("PUT", "/b/hash"), "answered once");
    }

    #[test]
    fn a_head_split_across_reads_is_followed() {
        let cut = watched(&[
            b"GET /b/k HTTP/1.1\r\n\r\nGET /b/ha",
            b"sh#x HTTP/1.1\r\n\r\n",
        ]);
        assert!(cut.take("GET", "/b/hash"));
    }

    #[test]
    fn the_request_after_a_body_without_a_newline_is_followed() {
        let cut = watched(&[
            b"PUT /b/first HTTP/1.1\r\nContent-Length: 4\r\n\r\ndataPUT /b/fnw#frag HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        ]);
        assert!(cut.take("PUT", "/b/fnw"));
    }

    #[test]
    fn a_request_line_inside_a_body_is_not_a_request() {
        let body = b"GET /b/doc.md#section HTTP/1.1\r\n";
        let head = format!(
            "PUT /b/k HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let cut = watched(&[head.as_bytes(), body, b"GET /b/doc.md HTTP/1.1\r\n\r\n"]);
        assert!(!cut.take("GET", "/b/doc.md"));
    }

    #[test]
    fn chunked_bodies_and_trailers_are_skipped() {
        let cut = watched(&[
            b"PUT /b/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nGET /\r\n",
            b"0\r\nx-amz-checksum-crc32: AAAA\r\n\r\nGET /b/h#x HTTP/1.1\r\n\r\n",
        ]);
        assert!(cut.take("GET", "/b/h"));
    }

    #[test]
    fn an_absolute_form_target_is_compared_by_path() {
        let cut =
            watched(&[b"PUT HTTP://x/b/hash#f HTTP/1.1\r\n\r\nGET http://x#f HTTP/1.1\r\n\r\n"]);
        assert!(cut.take("PUT", "/b/hash"));
        assert!(cut.take("GET", "/"));
    }

    #[test]
    fn a_long_chunk_size_and_a_bare_lf_trailer_keep_the_framing() {
        let cut = watched(&[
            b"PUT /b/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000003\r\nabc\r\n0\r\nX-T: a\n\nGET /z HTTP/1.1\r\n\r\n",
            b"PUT /b/hash#frag HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        ]);
        assert!(cut.take("PUT", "/b/hash"));
    }

    #[test]
    fn too_many_pipelined_refusals_refuse_the_rest() {
        let mut reads = Vec::new();
        for k in 0..70 {
            reads.push(format!("GET /b/h{k}#f HTTP/1.1\r\n\r\n").into_bytes());
        }
        let reads: Vec<&[u8]> = reads.iter().map(Vec::as_slice).collect();
        let cut = watched(&reads);
        assert!(cut.take("GET", "/b/h0"));
        assert!(
            cut.take("GET", "/anything"),
            "past the limit nothing is trusted"
        );
    }

    #[test]
    fn an_encoded_hash_is_not_a_raw_one() {
        let cut = watched(&[b"GET /b/hash%23frag HTTP/1.1\r\n\r\n"]);
        assert!(!cut.take("GET", "/b/hash"));
    }

    #[test]
    fn http2_is_not_watched() {
        let mut watch = TargetWatch::new((), Arc::default());
        watch.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(watch.framing, Framing::Off);
    }
}
