//! Log output: human-readable lines by default (coloured only on a terminal,
//! so files and `kubectl logs` get plain text), JSON on request, filtered by a
//! tracing directive (`log.level`, overridable with `RUST_LOG`). The filter can
//! be changed while running, through the [`LogLevel`] handle the reload uses.
//!
//! Request lines (target [`ACCESS_TARGET`]) in the text format, not to a
//! terminal, are written by [`crate::access_log`] straight into the log
//! buffer ([`write_request_line`]), in the default text format's shape
//! (`name=value`, values as `Debug`): tracing's dispatch, visitors and
//! formatting machinery were most of a request line's cost (tests compare
//! the bytes with the default's). Through tracing (tests' own subscribers),
//! their fields are written by [`AccessFields`], the same shape without the
//! default's styling: it paints every name and `=` even with colours off.
//! Every other line keeps the default formatter, and JSON lines are
//! tracing-subscriber's.
//!
//! Request lines are gathered in a [`WRITE_BUFFER`]
//! buffer and written to stderr when it fills, when any other line is logged
//! (which is written at once, after the request lines before it), and at
//! least every [`FLUSH_INTERVAL`] by a small thread: one `write` for many
//! requests instead of one each (nginx's `access_log ... buffer= flush=`).
//! Nothing is dropped: a logger that finds the buffer full writes it out
//! itself, waiting for stderr as every logger did before. [`LogFlush`] writes
//! what is left at the end of `main`, and a panic writes it before its
//! message.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::{BufWriter, IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{Format, FormatEvent, FormatFields, Full, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::{LogConfig, LogFormat};

/// The target of the one line per request ([`crate::access_log`]).
pub const ACCESS_TARGET: &str = "s3_failover_proxy::access";

/// Request lines gathered before a write: some 250 of them.
pub const WRITE_BUFFER: usize = 64 << 10;

/// Longest a request line waits in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// stderr (or, in tests, another sink) behind the request-line buffer;
/// every line is one `write_all` under the lock, so lines never interleave.
struct Buffered<W: Write>(Arc<Mutex<BufWriter<W>>>);

type BufferedStderr = Buffered<std::io::Stderr>;

impl<W: Write> Clone for Buffered<W> {
    fn clone(&self) -> Self {
        Buffered(Arc::clone(&self.0))
    }
}

impl<W: Write> Buffered<W> {
    fn new(sink: W) -> Buffered<W> {
        Buffered(Arc::new(Mutex::new(BufWriter::with_capacity(
            WRITE_BUFFER,
            sink,
        ))))
    }

    fn flush(&self) {
        // A poisoned lock only means a logger panicked mid-line.
        let mut stderr = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = stderr.flush();
    }
}

/// One line's writer: `write_through` for every line but a request's.
struct LineWriter<'a, W: Write> {
    stderr: &'a Mutex<BufWriter<W>>,
    write_through: bool,
}

impl<W: Write> Write for LineWriter<'_, W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut stderr = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        stderr.write_all(line)?;
        if self.write_through {
            stderr.flush()?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for Buffered<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> LineWriter<'a, W> {
        LineWriter {
            stderr: &self.0,
            write_through: true,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineWriter<'a, W> {
        LineWriter {
            stderr: &self.0,
            write_through: meta.target() != ACCESS_TARGET,
        }
    }
}

/// The text format: tracing-subscriber's default for every line, except
/// that a request line's fields are written by [`AccessFields`] (to a
/// terminal, with colours, the default writes them all).
#[derive(Default)]
struct TextLines {
    default: Format<Full, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let metadata = event.metadata();
        if metadata.target() != ACCESS_TARGET || writer.has_ansi_escapes() {
            return self.default.format_event(context, writer, event);
        }
        // The default's layout with colours off: time, level, target, fields.
        write_time(&mut writer, std::time::SystemTime::now())?;
        writer.write_str(" ")?;
        writer.write_str(padded_level(metadata.level()))?;
        writer.write_str(" ")?;
        writer.write_str(metadata.target())?;
        writer.write_str(": ")?;
        let mut fields = AccessFields.make_visitor(writer.by_ref());
        event.record(&mut fields);
        fields.finish()?;
        writeln!(writer)
    }
}

/// The request-line buffer, set by [`init`] when lines are plain text (the
/// text format, not to a terminal): request lines then go straight into it
/// ([`write_request_line`]), past tracing's dispatch and visitors.
static PLAIN_REQUEST_LINES: OnceLock<BufferedStderr> = OnceLock::new();

thread_local! {
    /// One request line being written, kept for the thread's next one.
    static REQUEST_LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
}

/// Writes a request line as the text format writes it (time, level, target,
/// then what `fields` writes: the message and fields, as
/// [`AccessFields`] would) into the request-line buffer. False, and nothing
/// written, when lines are not plain text: the caller logs through tracing.
/// The caller checks that request lines are enabled.
pub fn write_request_line(fields: impl Fn(&mut String)) -> bool {
    let Some(buffer) = PLAIN_REQUEST_LINES.get() else {
        return false;
    };
    let write = |line: &mut String| write_request_line_to(buffer, line, &fields);
    // The thread's line, unless the thread is being torn down.
    if REQUEST_LINE
        .try_with(|line| write(&mut line.borrow_mut()))
        .is_err()
    {
        write(&mut String::new());
    }
    true
}

/// Writes one request line into `buffer`, built in `line`.
fn write_request_line_to<W: Write>(
    buffer: &Buffered<W>,
    line: &mut String,
    fields: impl Fn(&mut String),
) {
    line.clear();
    // Writing to a `String` cannot fail.
    let _ = write_time(&mut Writer::new(line), std::time::SystemTime::now());
    line.push(' ');
    line.push_str(padded_level(&tracing::Level::INFO));
    line.push(' ');
    line.push_str(ACCESS_TARGET);
    line.push_str(": ");
    fields(line);
    line.push('\n');
    let mut stderr = buffer.0.lock().unwrap_or_else(|e| e.into_inner());
    let _ = stderr.write_all(line.as_bytes());
}

/// Seconds from the Unix epoch to the year 10 000, from which on (as before
/// 1970) the default's own timestamp is written.
const YEAR_10000: u64 = 253_402_300_800;

/// `now` as the default text format writes it (RFC 3339, UTC, microseconds:
/// `2026-11-30T20:28:07.123456Z`). The date and time to the second come from
/// humantime once per second and thread, the microseconds are appended as
/// digits: formatting the whole stamp for every line cost more than the rest
/// of a request line.
fn write_time(writer: &mut Writer<'_>, now: std::time::SystemTime) -> std::fmt::Result {
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) if since.as_secs() < YEAR_10000 => {
            SECOND.with_borrow_mut(|second| {
                if second.unix != Some(since.as_secs()) {
                    second.unix = Some(since.as_secs());
                    second.text.clear();
                    let whole = std::time::UNIX_EPOCH + Duration::from_secs(since.as_secs());
                    // `2026-11-30T20:28:07Z`, kept without its `Z`.
                    let _ = write!(second.text, "{}", humantime::format_rfc3339_seconds(whole));
                    second.text.pop();
                }
                writer.write_str(&second.text)
            })?;
            let micros = since.subsec_micros();
            let mut digits = *b".000000Z";
            let mut buffer = itoa::Buffer::new();
            let written = buffer.format(micros).as_bytes();
            digits[7 - written.len()..7].copy_from_slice(written);
            // ASCII digits and punctuation only.
            writer.write_str(std::str::from_utf8(&digits).unwrap_or(".000000Z"))
        }
        _ => SystemTime.format_time(writer),
    }
}

/// The second [`write_time`] last formatted on this thread.
struct FormattedSecond {
    unix: Option<u64>,
    /// `2026-11-30T20:28:07`.
    text: String,
}

thread_local! {
    static SECOND: RefCell<FormattedSecond> = const {
        RefCell::new(FormattedSecond { unix: None, text: String::new() })
    };
}

/// A level right-aligned in five columns, as the default writes it.
fn padded_level(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::TRACE => "TRACE",
        tracing::Level::DEBUG => "DEBUG",
        tracing::Level::INFO => " INFO",
        tracing::Level::WARN => " WARN",
        tracing::Level::ERROR => "ERROR",
    }
}

/// The field format of request lines: `name=value` with values as `Debug`
/// (strings quoted, numbers and `%`-recorded values plain), separated by
/// spaces, the message first and bare: what the default text format writes
/// with colours off, without its per-field styling.
struct AccessFields;

/// Writes one request line's fields.
struct AccessVisitor<'a> {
    writer: Writer<'a>,
    /// Nothing written yet: no separating space.
    first: bool,
    result: std::fmt::Result,
}

impl<'a> MakeVisitor<Writer<'a>> for AccessFields {
    type Visitor = AccessVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> AccessVisitor<'a> {
        AccessVisitor {
            writer,
            first: true,
            result: Ok(()),
        }
    }
}

impl Visit for AccessVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_plain(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_plain(field, itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record_plain(field, if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let separator = self.separator();
        let name = match field.name() {
            "message" => None,
            name => Some(name),
        };
        self.result = self
            .write_name(separator, name)
            .and_then(|()| write!(self.writer, "{value:?}"));
    }
}

impl AccessVisitor<'_> {
    fn separator(&mut self) -> &'static str {
        if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        }
    }

    /// A value written as it is (numbers, booleans): what `Debug` writes,
    /// without the formatting machinery.
    fn record_plain(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = self.separator();
        self.result = self
            .write_name(separator, Some(field.name()))
            .and_then(|()| self.writer.write_str(value));
    }

    /// What comes before a value: the separator, and `name=` unless the
    /// field is the message.
    fn write_name(&mut self, separator: &str, name: Option<&str>) -> std::fmt::Result {
        self.writer.write_str(separator)?;
        if let Some(name) = name {
            self.writer.write_str(name)?;
            self.writer.write_str("=")?;
        }
        Ok(())
    }
}

impl VisitOutput<std::fmt::Result> for AccessVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.result
    }
}

impl VisitFmt for AccessVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.writer
    }
}

/// Writes the request lines still buffered, on [`LogFlush::now`] and when
/// dropped.
#[derive(Clone)]
pub struct LogFlush(BufferedStderr);

impl LogFlush {
    pub fn now(&self) {
        self.0.flush();
    }
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Changes the active log filter.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set at start: it wins over the config file.
    pinned_by_env: bool,
}

impl LogLevel {
    /// Applies a new `log.level` directive (validated by the config).
    pub fn set(&self, directive: &str) {
        if self.pinned_by_env {
            tracing::info!("RUST_LOG is set; log.level from the config is not applied");
            return;
        }
        match EnvFilter::try_new(directive) {
            Ok(filter) => {
                if let Err(error) = self.handle.reload(filter) {
                    tracing::warn!(%error, "cannot change the log level");
                }
            }
            Err(error) => tracing::warn!(%error, directive, "invalid log level"),
        }
    }
}

/// Installs the global subscriber and starts the flush thread; call once,
/// from `main`, and keep the [`LogFlush`] until the runtime has stopped.
pub fn init(config: &LogConfig) -> (LogLevel, LogFlush) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let pinned_by_env = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&config.level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let writer = BufferedStderr::new(std::io::stderr());
    let flusher = writer.clone();
    let spawned = std::thread::Builder::new()
        .name("s3fp-log-flush".into())
        .spawn(move || {
            loop {
                std::thread::sleep(FLUSH_INTERVAL);
                flusher.flush();
            }
        });
    if let Err(error) = spawned {
        // Without the thread, request lines wait for a full buffer or the
        // next other line: later, never lost.
        eprintln!("s3-failover-proxy: cannot start the log flush thread: {error}");
    }
    let on_panic = writer.clone();
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The lines before the panic come before its message; `try_lock`,
        // as the panic may have struck while the lock was held.
        if let Ok(mut stderr) = on_panic.0.try_lock() {
            let _ = stderr.flush();
        }
        previous_hook(info);
    }));
    let ansi = std::io::stderr().is_terminal();
    if config.format == LogFormat::Text && !ansi {
        let _ = PLAIN_REQUEST_LINES.set(writer.clone());
    }
    match config.format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(ansi)
                    .event_format(TextLines::default())
                    .with_writer(writer.clone()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(writer.clone()),
            )
            .init(),
    }
    let level = LogLevel {
        handle,
        pinned_by_env,
    };
    (level, LogFlush(writer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read while the writer holds it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn request_lines_wait_for_the_next_other_line_or_a_flush_and_keep_their_order() {
        let sink = Sink::default();
        let writer = Buffered::new(sink.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: ACCESS_TARGET, n = 1, "request");
            tracing::info!(target: ACCESS_TARGET, n = 2, "request");
            assert_eq!(sink.text(), "", "request lines are buffered");
            tracing::warn!("backend state change");
            let text = sink.text();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "{text}");
            assert!(
                lines[0].contains("n=1") && lines[1].contains("n=2"),
                "{text}"
            );
            assert!(lines[2].contains("backend state change"), "{text}");
            tracing::info!(target: ACCESS_TARGET, n = 3, "request");
        });
        writer.flush();
        assert!(sink.text().lines().nth(3).unwrap().contains("n=3"));
    }

    #[test]
    fn timestamps_are_written_in_the_default_form() {
        let written = |since_epoch: Duration| {
            let mut text = String::new();
            let now = std::time::UNIX_EPOCH + since_epoch;
            write_time(&mut Writer::new(&mut text), now).unwrap();
            text
        };
        assert_eq!(
            written(Duration::new(1_796_070_487, 123_456_789)),
            "2026-11-30T20:28:07.123456Z"
        );
        assert_eq!(written(Duration::ZERO), "1970-01-01T00:00:00.000000Z");
        // The same second again, then the next one: the second is
        // reformatted only when it changes, the microseconds always.
        assert_eq!(
            written(Duration::new(0, 999_999_999)),
            "1970-01-01T00:00:00.999999Z"
        );
        assert_eq!(
            written(Duration::new(1, 5_000)),
            "1970-01-01T00:00:01.000005Z"
        );
        assert_eq!(
            written(Duration::new(1_796_070_487, 7_000_000)),
            "2026-11-30T20:28:07.007000Z"
        );
        let mut default = String::new();
        SystemTime
            .format_time(&mut Writer::new(&mut default))
            .unwrap();
        let ours = written(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap(),
        );
        let shape = |text: &str| text.replace(|c: char| c.is_ascii_digit(), "0");
        assert_eq!(shape(&ours), shape(&default));
    }

    #[test]
    fn request_lines_written_directly_start_as_the_default_starts_them() {
        let sink = Sink::default();
        let writer = Buffered::new(sink.clone());
        write_request_line_to(&writer, &mut String::new(), |line| {
            line.push_str("request n=1")
        });
        assert_eq!(sink.text(), "", "request lines are buffered");
        writer.flush();
        let direct = sink.text();
        let default = Sink::default();
        let dispatch = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(Buffered::new(default.clone()))
            .into();
        tracing::dispatcher::with_default(
            &dispatch,
            || tracing::info!(target: ACCESS_TARGET, n = 1, "request"),
        );
        drop(dispatch);
        let shape = |text: &str| text.replace(|c: char| c.is_ascii_digit(), "0");
        assert_eq!(shape(&direct), shape(&default.text()));
    }

    #[test]
    fn levels_are_padded_as_the_default_pads_them() {
        for level in [
            tracing::Level::TRACE,
            tracing::Level::DEBUG,
            tracing::Level::INFO,
            tracing::Level::WARN,
            tracing::Level::ERROR,
        ] {
            assert_eq!(padded_level(&level), format!("{level:>5}"));
        }
    }

    /// Lines as `format` writes them, without their timestamps.
    fn lines_without_time(format: impl Fn(&Sink) -> tracing::Dispatch, log: impl Fn()) -> String {
        let sink = Sink::default();
        tracing::dispatcher::with_default(&format(&sink), log);
        sink.text()
            .lines()
            .map(|line| line.split_once(' ').expect("a timestamp first").1)
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn request_lines_read_exactly_as_the_default_text_format_writes_them() {
        let log = || {
            let error = std::io::Error::other("reset \"by\" peer");
            tracing::info!(
                target: ACCESS_TARGET,
                method = %http::Method::PUT,
                path = %"/bucket/a b",
                status = 503u16,
                held_ms = 1500u64,
                replays = 1u32,
                resumes = 0usize,
                bytes_in = 0u64,
                offset = -3i64,
                cut = true,
                request_id = %"tx0001",
                detail = ?Some("x"),
                error = %error,
                outcome = "held_too_long",
                "request"
            );
            tracing::warn!(state = "down", "backend state change");
        };
        let ours = lines_without_time(
            |sink| {
                tracing_subscriber::fmt()
                    .with_ansi(false)
                    .event_format(TextLines::default())
                    .with_writer(Buffered::new(sink.clone()))
                    .into()
            },
            log,
        );
        let default = lines_without_time(
            |sink| {
                tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_writer(Buffered::new(sink.clone()))
                    .into()
            },
            log,
        );
        assert_eq!(ours, default);
        assert!(
            ours.contains(" INFO s3_failover_proxy::access: request method=PUT"),
            "{ours}"
        );
    }
}
