//! Request targets the HTTP parser would change silently (a raw `#`) or
//! refuse with a bare `400` of its own (`<`, `>`, `` ` `` in a path; `"`,
//! `<`, `>` in a query).
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
//! An HTTP/2 connection, or bytes hyper refuses too, end the watch. A target
//! with bytes the URI parser refuses is marked in place (each such byte
//! becomes `_`, in the read buffer hyper is about to parse) and recorded, so
//! the request reaches the handler, which answers an S3 `400 InvalidURI`
//! instead of hyper's bare `400`; it never reaches the backend.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Request lines remembered at once per connection.
const MAX_RECORDED: usize = 8;
/// Longest head followed (larger ones hyper refuses too).
const MAX_HEAD: usize = 1 << 20;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 16 << 10;

/// The request lines with a raw `#` seen on one connection.
#[derive(Debug, Default)]
pub struct CutTargets {
    recorded: Mutex<VecDeque<Vec<u8>>>,
}

impl CutTargets {
    /// True (once) when a request line `method SP target#...` was read.
    pub fn take(&self, method: &str, target: &str) -> bool {
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
            recorded.pop_front();
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
    /// Bytes of the current head's target were marked as refused.
    marked: bool,
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
            marked: false,
        }
    }

    /// Follows newly read bytes (and may mark a refused target in them).
    fn scan(&mut self, read: &mut [u8]) {
        let mut at = 0;
        while at < read.len() {
            let rest = &mut read[at..];
            at += match self.framing {
                Framing::Off => return,
                Framing::Body(left) | Framing::ChunkData(left) => {
                    let taken = left.min(rest.len() as u64);
                    let left = left - taken;
                    self.framing = match (self.framing, left) {
                        (Framing::Body(_), 0) => Framing::Head,
                        (Framing::Body(_), _) => Framing::Body(left),
                        (_, 0) => Framing::ChunkSize,
                        _ => Framing::ChunkData(left),
                    };
                    taken as usize
                }
                Framing::Head => self.head(rest),
                Framing::ChunkSize => self.chunk_size(rest),
                Framing::Trailers => self.trailer_line(rest),
            };
        }
    }

    /// Takes head bytes; at the end of the head, records a refused target
    /// and moves to the body. Returns how many bytes of `read` it took.
    fn head(&mut self, read: &mut [u8]) -> usize {
        // Marked as they arrive, before hyper sees them: a head can come in
        // pieces (hyper-util reads 24 bytes first to tell HTTP/2 apart).
        self.marked |= mark_refused(&self.pending, read);
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
                    self.lose();
                }
                read.len()
            }
            Head::Invalid => {
                self.lose();
                read.len()
            }
            Head::Complete {
                length,
                method,
                target,
                body,
            } => {
                let target = match before {
                    0 => &read[target],
                    _ => &self.pending[target],
                };
                let hash = memchr::memchr(b'#', target);
                if self.marked || hash.is_some() {
                    let kept = &target[..hash.unwrap_or(target.len())];
                    self.cut.record([method.as_bytes(), b" ", kept].concat());
                }
                self.marked = false;
                self.framing = body;
                self.pending.clear();
                length - before
            }
        }
    }

    /// Takes a chunk-size line (RFC 9112 section 7.1).
    fn chunk_size(&mut self, read: &[u8]) -> usize {
        let Some(end) = memchr::memchr(b'\n', read) else {
            self.pending.extend_from_slice(read);
            if self.pending.len() > MAX_LINE {
                self.lose();
            }
            return read.len();
        };
        self.pending.extend_from_slice(&read[..=end]);
        self.framing = match httparse::parse_chunk_size(&self.pending) {
            Ok(httparse::Status::Complete((_, 0))) => Framing::Trailers,
            Ok(httparse::Status::Complete((_, size))) => Framing::ChunkData(size + 2),
            _ => Framing::Off,
        };
        self.pending.clear();
        end + 1
    }

    /// Takes one trailer line; an empty one ends the message.
    fn trailer_line(&mut self, read: &[u8]) -> usize {
        let Some(end) = memchr::memchr(b'\n', read) else {
            self.pending.extend_from_slice(read);
            if self.pending.len() > MAX_LINE {
                self.lose();
            }
            return read.len();
        };
        self.pending.extend_from_slice(&read[..=end]);
        if matches!(self.pending.as_slice(), b"\r\n" | b"\n") {
            self.framing = Framing::Head;
        }
        self.pending.clear();
        end + 1
    }

    /// Stops watching: HTTP/2, or bytes hyper will refuse too.
    fn lose(&mut self) {
        self.framing = Framing::Off;
        self.pending = Vec::new();
    }
}

/// What a request head says, once complete.
enum Head {
    Partial,
    Invalid,
    Complete {
        /// Bytes of the head.
        length: usize,
        method: String,
        /// Where the request target is in the head's bytes.
        target: std::ops::Range<usize>,
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
    let start = path.as_ptr() as usize - bytes.as_ptr() as usize;
    Ok(Head::Complete {
        length,
        method: method.to_owned(),
        target: start..start + path.len(),
        body: body_framing(request.headers),
    })
}

/// Bytes the URI parser refuses in a path (`<`, `>`, `` ` ``) or a query
/// (`"`, `<`, `>`): hyper would answer a bare `400` of its own.
fn refused_byte(byte: u8, in_query: bool) -> bool {
    match in_query {
        false => matches!(byte, b'<' | b'>' | b'`'),
        true => matches!(byte, b'"' | b'<' | b'>'),
    }
}

/// Marks (as `_`) the bytes of the request target in `read` that the URI
/// parser refuses, `seen` being the head's bytes before it: so that hyper
/// takes the request to the handler, which answers `400 InvalidURI`, where
/// it would answer a bare `400` itself. Returns whether it marked any.
fn mark_refused(seen: &[u8], read: &mut [u8]) -> bool {
    // The target: after the request line's first space, up to the next
    // space or line end; a `#` ends what the parser reads of it.
    let mut spaces = 0;
    let mut in_query = false;
    let mut marked = false;
    for index in 0..seen.len() + read.len() {
        let byte = match index.checked_sub(seen.len()) {
            None => seen[index],
            Some(at) => read[at],
        };
        match byte {
            b' ' => {
                spaces += 1;
                if spaces == 2 {
                    break;
                }
                continue;
            }
            b'\r' | b'\n' if spaces == 1 => break,
            _ if spaces == 0 => continue,
            b'#' => break,
            b'?' => in_query = true,
            _ => {}
        }
        if refused_byte(byte, in_query)
            && let Some(at) = index.checked_sub(seen.len())
        {
            read[at] = b'_';
            marked = true;
        }
    }
    marked
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
            this.scan(&mut buf.filled_mut()[before..]);
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
            watch.scan(&mut read.to_vec());
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
    fn bytes_the_uri_parser_refuses_are_marked_for_an_s3_error() {
        let cut = Arc::new(CutTargets::default());
        let mut watch = TargetWatch::new((), Arc::clone(&cut));
        let mut read = b"GET /b/tick`s?x=\"q\" HTTP/1.1\r\n\r\n".to_vec();
        watch.scan(&mut read);
        assert!(
            read.starts_with(b"GET /b/tick_s?x=_q_ HTTP/1.1"),
            "{read:?}"
        );
        assert!(cut.take("GET", "/b/tick_s?x=_q_"));
    }

    #[test]
    fn an_encoded_hash_is_not_a_raw_one() {
        let cut = watched(&[b"GET /b/hash%23frag HTTP/1.1\r\n\r\n"]);
        assert!(!cut.take("GET", "/b/hash"));
    }

    #[test]
    fn http2_is_not_watched() {
        let mut watch = TargetWatch::new((), Arc::default());
        watch.scan(&mut b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec());
        assert_eq!(watch.framing, Framing::Off);
    }
}
