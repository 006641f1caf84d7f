//! The request log: one line per request when its response is over (method,
//! path, status, time held, replays, resumes of a cut download, bytes each
//! way, S3 request id, outcome).
//!
//! A [`RequestRecord`] travels inside the response body and writes its line
//! when dropped, so the line carries the bytes really streamed and notes a
//! response cut short.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Uri};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::download_resume::Resumes;
use crate::metrics::Metrics;
use crate::outcome::{HoldOutcome, RequestOutcome};
use crate::replay::ReplayableBody;

/// Request ids for answers the proxy makes itself: unique per process run.
pub fn next_request_id() -> String {
    ProxyRequestId::next().to_string()
}

/// A request id the proxy made: the process's start time and a counter,
/// formatted only when written.
#[derive(Debug, Clone, Copy)]
pub struct ProxyRequestId {
    start: u64,
    n: u64,
}

impl ProxyRequestId {
    pub fn next() -> ProxyRequestId {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let start = *START.get_or_init(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        ProxyRequestId {
            start,
            n: COUNTER.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// The longest id: `P`, then 16 hex digits twice.
const PROXY_ID_LENGTH: usize = 33;

impl ProxyRequestId {
    /// `P`, the start time in upper-case hex, the counter in upper-case hex
    /// of eight digits at least (`format!("P{:X}{:08X}")`, written without
    /// the formatting machinery, which cost a twentieth of a small
    /// request's own work).
    fn text(&self) -> ([u8; PROXY_ID_LENGTH], usize) {
        let mut text = [0u8; PROXY_ID_LENGTH];
        text[0] = b'P';
        let mut length = 1;
        for (value, width) in [(self.start, 1), (self.n, 8)] {
            let digits = ((64 - value.leading_zeros()).div_ceil(4) as usize).max(width);
            for place in 0..digits {
                let nibble = (value >> (4 * (digits - 1 - place))) & 0xF;
                text[length + place] = b"0123456789ABCDEF"[nibble as usize];
            }
            length += digits;
        }
        (text, length)
    }
}

impl std::fmt::Display for ProxyRequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (text, length) = self.text();
        // Upper-case hex digits and `P` only.
        f.write_str(std::str::from_utf8(&text[..length]).unwrap_or_default())
    }
}

/// The S3 request id a request is logged with, kept as it came (a header
/// value is a reference-counted copy) and formatted only into the line.
#[derive(Debug, Clone)]
pub enum RequestId {
    /// The backend's `x-amz-request-id`, checked to be visible ASCII.
    Backend(HeaderValue),
    Proxy(ProxyRequestId),
}

impl RequestId {
    /// The backend's id, if `value` is one that can be logged as text;
    /// else one the proxy makes.
    pub fn from_backend(value: Option<&HeaderValue>) -> RequestId {
        match value {
            Some(value) if value.to_str().is_ok() => RequestId::Backend(value.clone()),
            _ => RequestId::Proxy(ProxyRequestId::next()),
        }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestId::Backend(value) => f.write_str(value.to_str().unwrap_or_default()),
            RequestId::Proxy(id) => id.fmt(f),
        }
    }
}

impl RequestId {
    /// Writes the id quoted ([`write_quoted`]): the backend's id is its
    /// text, which may hold spaces or quotes.
    fn write_quoted(&self, line: &mut String) {
        match self {
            RequestId::Backend(value) => write_quoted(line, value.to_str().unwrap_or_default()),
            RequestId::Proxy(id) => {
                let (text, length) = id.text();
                line.push('"');
                line.push_str(std::str::from_utf8(&text[..length]).unwrap_or_default());
                line.push('"');
            }
        }
    }
}

/// Writes `text` as a quoted string, as `Debug` writes a `str` and as the
/// text format writes a `str` field: quotes and backslashes escaped, and
/// control, separator and other unprintable characters as `\u{..}`, so a
/// value the client or the backend chose (a path with spaces or U+0085, an
/// id holding `outcome="ok"`) cannot read as fields or lines of its own.
fn write_quoted(line: &mut String, text: &str) {
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if plain {
        // What `Debug` writes for it, without its formatting machinery.
        line.push('"');
        line.push_str(text);
        line.push('"');
    } else {
        // Writing to a `String` cannot fail.
        let _ = write!(line, "{text:?}");
    }
}

/// What is known about one request; logged on drop.
pub struct RequestRecord {
    pub method: Method,
    /// The target as sent to the backend: its path is logged.
    pub uri: Uri,
    pub status: u16,
    pub request_id: RequestId,
    pub held: Duration,
    /// The request met the hold queue (held, or turned away by it).
    pub was_held: bool,
    pub replays: u32,
    /// Cuts of the response body resumed ([`crate::download_resume`]).
    pub resumes: Resumes,
    pub bytes_out: u64,
    /// The request body: how many bytes were taken from the client.
    pub body: ReplayableBody<Incoming>,
    pub started: Instant,
    /// `ok`, or why the proxy answered itself or the response broke.
    pub outcome: RequestOutcome,
    pub metrics: Arc<Metrics>,
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let bytes_in = self.body.bytes_in();
        let duration = self.started.elapsed();
        self.metrics.request(
            &self.method,
            self.status,
            duration,
            bytes_in,
            self.bytes_out,
        );
        let held = self.held + self.resumes.held();
        if let Some(outcome) = HoldOutcome::of(self.outcome, self.was_held) {
            self.metrics.hold_outcome(outcome, held);
        }
        RequestLine {
            method: &self.method,
            path: self.uri.path(),
            status: self.status,
            held_ms: held.as_millis() as u64,
            replays: self.replays,
            resumes: self.resumes.count(),
            bytes_in,
            bytes_out: self.bytes_out,
            duration_ms: duration.as_millis() as u64,
            request_id: &self.request_id,
            outcome: self.outcome,
        }
        .log();
    }
}

/// The fields of one request line (logged by [`RequestRecord`]; public for
/// `examples/raw_floor.rs`, which logs the same line).
pub struct RequestLine<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub status: u16,
    pub held_ms: u64,
    pub replays: u32,
    pub resumes: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    pub request_id: &'a RequestId,
    pub outcome: RequestOutcome,
}

impl RequestLine<'_> {
    /// Logs the line: as plain text straight into the log buffer when the
    /// text format is in use, else as a tracing event.
    pub fn log(&self) {
        if !tracing::enabled!(target: crate::logging::ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        if !crate::logging::write_request_line(|line| self.write_fields(line)) {
            self.event();
        }
    }

    fn event(&self) {
        tracing::info!(
            target: crate::logging::ACCESS_TARGET,
            method = %self.method,
            path = self.path,
            status = self.status,
            held_ms = self.held_ms,
            replays = self.replays,
            resumes = self.resumes,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = self.duration_ms,
            request_id = self.request_id.to_string().as_str(),
            outcome = self.outcome.as_str(),
            "request"
        );
    }

    /// The message and fields as the text format writes [`Self::event`]'s.
    fn write_fields(&self, line: &mut String) {
        let mut number = itoa::Buffer::new();
        line.push_str("request method=");
        line.push_str(self.method.as_str());
        line.push_str(" path=");
        write_quoted(line, self.path);
        for (name, value) in [
            (" status=", u64::from(self.status)),
            (" held_ms=", self.held_ms),
            (" replays=", u64::from(self.replays)),
            (" resumes=", u64::from(self.resumes)),
            (" bytes_in=", self.bytes_in),
            (" bytes_out=", self.bytes_out),
            (" duration_ms=", self.duration_ms),
        ] {
            line.push_str(name);
            line.push_str(number.format(value));
        }
        line.push_str(" request_id=");
        self.request_id.write_quoted(line);
        line.push_str(" outcome=\"");
        line.push_str(self.outcome.as_str());
        line.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the default text format writes after `target: ` for `line`'s event.
    fn as_the_default_writes(line: &RequestLine<'_>) -> String {
        #[derive(Clone, Default)]
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || line.event());
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let prefix = format!(" INFO {}: ", crate::logging::ACCESS_TARGET);
        text.strip_prefix(&prefix)
            .expect("one request line")
            .to_owned()
    }

    #[test]
    fn request_lines_written_directly_read_as_the_default_text_format_writes_them() {
        let backend_id = RequestId::from_backend(Some(&HeaderValue::from_static("tx00-ab")));
        let proxy_id = RequestId::Proxy(ProxyRequestId::next());
        let spaced_id = RequestId::from_backend(Some(&HeaderValue::from_static("a \"b\"\t\\c")));
        let empty_id = RequestId::from_backend(Some(&HeaderValue::from_static("")));
        for (method, path, request_id) in [
            (Method::GET, "/bucket/key", &backend_id),
            (Method::PUT, "/bucket/a b/ü\"q", &proxy_id),
            (Method::from_bytes(b"PROPFIND").unwrap(), "/", &backend_id),
            (Method::HEAD, "/bucket/key", &spaced_id),
            (Method::GET, "/", &empty_id),
            (
                Method::GET,
                "/k\u{a0}status=200\u{85}\u{2028}x\t",
                &backend_id,
            ),
        ] {
            for &outcome in RequestOutcome::ALL {
                let line = RequestLine {
                    method: &method,
                    path,
                    status: 503,
                    held_ms: 1500,
                    replays: 2,
                    resumes: 1,
                    bytes_in: 0,
                    bytes_out: u64::MAX,
                    duration_ms: 12,
                    request_id,
                    outcome,
                };
                let mut direct = String::new();
                line.write_fields(&mut direct);
                direct.push('\n');
                assert_eq!(direct, as_the_default_writes(&line));
            }
        }
    }

    /// The text of a GET's line with `path` and `request_id`.
    fn text_of(path: &str, request_id: &RequestId) -> String {
        let line = RequestLine {
            method: &Method::GET,
            path,
            status: 403,
            held_ms: 0,
            replays: 0,
            resumes: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 1,
            request_id,
            outcome: RequestOutcome::Ok,
        };
        let mut text = String::new();
        line.write_fields(&mut text);
        text
    }

    #[test]
    fn a_path_cannot_add_fields_or_lines() {
        let id = RequestId::Proxy(ProxyRequestId::next());
        let text = text_of("/k\u{a0}status=200\u{a0}outcome=\"ok\"\u{2028}x", &id);
        assert!(
            text.starts_with(
                r#"request method=GET path="/k\u{a0}status=200\u{a0}outcome=\"ok\"\u{2028}x" status=403 "#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_backend_request_id_cannot_add_fields_to_the_line() {
        let forged = HeaderValue::from_static("tx1 outcome=\"forged\" status=200");
        let text = text_of("/bucket/key", &RequestId::from_backend(Some(&forged)));
        assert!(
            text.ends_with(r#" request_id="tx1 outcome=\"forged\" status=200" outcome="ok""#),
            "{text}"
        );
    }

    #[test]
    fn a_proxy_request_id_is_the_start_and_the_counter_in_hex() {
        for (start, n) in [
            (0, 0),
            (1, 0xA),
            (0x6931_2F00, 0x1_2345_6789),
            (u64::MAX, u64::MAX),
        ] {
            let id = ProxyRequestId { start, n };
            assert_eq!(id.to_string(), format!("P{start:X}{n:08X}"));
            let mut line = String::new();
            RequestId::Proxy(id).write_quoted(&mut line);
            assert_eq!(line, format!("\"P{start:X}{n:08X}\""));
        }
    }

    #[test]
    fn request_ids_are_unique() {
        assert_ne!(next_request_id(), next_request_id());
    }

    #[test]
    fn a_backend_id_that_is_not_text_is_replaced_by_one_the_proxy_makes() {
        let text = HeaderValue::from_static("tx000abc");
        assert_eq!(RequestId::from_backend(Some(&text)).to_string(), "tx000abc");
        let binary = HeaderValue::from_bytes(b"tx\xff").unwrap();
        assert!(
            RequestId::from_backend(Some(&binary))
                .to_string()
                .starts_with('P')
        );
        assert!(RequestId::from_backend(None).to_string().starts_with('P'));
    }
}
