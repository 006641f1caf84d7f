//! Request targets the HTTP parser would change silently: a raw `#`.
//!
//! `#` starts a URI fragment (RFC 3986 section 3.5), which is never part of a
//! request target (RFC 9112 section 3.2), and the `http` crate's parser drops
//! it and everything after it. A client that sends `PUT /bucket/hash#frag`
//! would have its object stored as `hash`: a different object than it asked
//! for. The proxy refuses such a request instead (`400 InvalidURI`).
//!
//! hyper hands the proxy only the parsed target, so [`TargetWatch`] looks at
//! the bytes of an HTTP/1.1 connection as they are read: a line that starts
//! like a request line (`METHOD SP target`) and has a `#` in its target is
//! recorded as `METHOD SP target-before-#`; the handler then asks whether
//! the request it got is one of those. Body bytes that look like such a line
//! can only make an entry no request matches; entries are few and bounded.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Request lines remembered at once per connection.
const MAX_RECORDED: usize = 8;
/// Longest request-line prefix followed across reads.
const MAX_LINE: usize = 16 << 10;
/// The first byte of a line given up on: no request line starts with it.
const GIVEN_UP: u8 = b'#';

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

/// A client connection's reads, watched for request lines with a raw `#`.
pub struct TargetWatch<I> {
    inner: I,
    cut: Arc<CutTargets>,
    /// The current line so far, when it may still be a request line.
    line: Vec<u8>,
}

impl<I> TargetWatch<I> {
    pub fn new(inner: I, cut: Arc<CutTargets>) -> TargetWatch<I> {
        TargetWatch {
            inner,
            cut,
            line: Vec::new(),
        }
    }

    /// Looks at newly read bytes.
    fn scan(&mut self, read: &[u8]) {
        let mut start = 0;
        for hash in memchr::memchr_iter(b'#', read) {
            if hash < start {
                continue;
            }
            let line_start = memchr::memrchr(b'\n', &read[start..hash]).map(|i| start + i + 1);
            let prefix = match line_start {
                Some(line_start) => read[line_start..hash].to_vec(),
                None => [self.line.as_slice(), &read[start..hash]].concat(),
            };
            if is_request_line_prefix(&prefix) {
                self.cut.record(prefix);
            }
            // The rest of this line is of no interest.
            self.line.clear();
            start = match memchr::memchr(b'\n', &read[hash..]) {
                Some(end) => hash + end + 1,
                None => {
                    self.give_up();
                    return;
                }
            };
        }
        self.carry(&read[start..]);
    }

    /// Keeps the unfinished last line while it may be a request line.
    fn carry(&mut self, rest: &[u8]) {
        match memchr::memrchr(b'\n', rest) {
            Some(end) => {
                self.line.clear();
                self.keep(&rest[end + 1..]);
            }
            None => self.keep(rest),
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.line.first() == Some(&GIVEN_UP) {
            return;
        }
        if self.line.len() + bytes.len() > MAX_LINE {
            self.give_up();
            return;
        }
        self.line.extend_from_slice(bytes);
        if !is_request_line_prefix(&self.line) {
            self.give_up();
        }
    }

    /// Marks the current line as not a request line until the next `\n`.
    fn give_up(&mut self) {
        self.line.clear();
        self.line.push(GIVEN_UP);
    }
}

/// `METHOD SP target` so far: an upper-case token, one space, a target
/// without spaces (or a prefix of that). A line marked with a leading `#`
/// (given up on) never is.
fn is_request_line_prefix(line: &[u8]) -> bool {
    let method_end = line
        .iter()
        .position(|&b| !b.is_ascii_uppercase())
        .unwrap_or(line.len());
    if method_end == 0 {
        return line.is_empty();
    }
    match line.get(method_end) {
        None => true,
        Some(b' ') => !line[method_end + 1..].contains(&b' '),
        Some(_) => false,
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
    fn a_request_line_split_across_reads_is_followed() {
        let cut = watched(&[
            b"GET /b/k HTTP/1.1\r\n\r\nGET /b/ha",
            b"sh#x HTTP/1.1\r\n\r\n",
        ]);
        assert!(cut.take("GET", "/b/hash"));
    }

    #[test]
    fn hashes_in_header_values_and_bodies_match_no_request() {
        let cut = watched(&[
            b"PUT /b/k HTTP/1.1\r\nx-amz-meta-tag: #1\r\n\r\nbody # with hashes\nget /b/k#",
        ]);
        assert!(!cut.take("PUT", "/b/k"));
        assert!(!cut.take("get", "/b/k"), "not a request line");
    }

    #[test]
    fn an_encoded_hash_is_not_a_raw_one() {
        let cut = watched(&[b"GET /b/hash%23frag HTTP/1.1\r\n\r\n"]);
        assert!(!cut.take("GET", "/b/hash%23frag"));
        assert!(!cut.take("GET", "/b/hash"));
    }
}
