//! Request targets the HTTP parser would change silently (a raw `#`) or
//! refuse with a bare `400` (bytes its URI parser does not take).
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
//!
//! A request line whose target hyper would refuse (bytes the `http` crate's
//! URI parser does not take, such as `<`, `>` and `` ` `` in a path, or
//! control bytes) never reaches hyper: the watch ends the connection's input
//! just before it, hyper answers the requests before it and closes, and the
//! watch then writes an S3 `400 InvalidURI` itself, the last bytes on the
//! connection. Until a request line is whole, its bytes are held back from
//! hyper, so it never holds part of a refused request.
//!
//! A request head longer than `listener.max_head_bytes`, counted as sent,
//! is refused the same way, with hyper's own `431` and its bytes: hyper's
//! own check counts its read buffer, which grows past the limit on a
//! connection that has served requests (heads of up to about 120 KiB got
//! through).
//!
//! A request head that needs hyper settings of another kind (many header
//! fields, a large body: [`crate::round_kind`]) is held: the watch stops
//! before it until hyper has answered everything before, and the
//! connection's next round starts there ([`crate::keep_alive`]).
//!
//! On an HTTP/2 connection the request heads are followed frame by frame
//! and decoded ([`crate::h2_heads`]): a `:path` with a raw `#` is recorded
//! and refused the same way. Bytes hyper refuses for another reason end the
//! watch.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use std::future::Future;
use std::task::ready;
use std::time::Duration;

use hyper::Method;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::access_log::next_request_id;
use crate::h2_heads::{self, H2Heads, RequestHead};
use crate::round_kind::{COMMON_FIELDS, HeadSeen, RoundKind, RoundKinds};
use crate::s3_error::ProxyError;

/// Refused request lines remembered at once per connection; a client that
/// pipelines more has every later request refused.
const MAX_RECORDED: usize = 64;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 16 << 10;
/// Longest request line held back from hyper while it is incomplete: a
/// longer target gets hyper's own `414` (its limit is 65 534 bytes).
const MAX_REQUEST_LINE: usize = 64 << 10;

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

    /// Refuses every later request on the connection: its bytes could not
    /// be followed.
    fn distrust(&self) {
        self.overflowed
            .store(true, std::sync::atomic::Ordering::Release);
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
    /// Longest head followed.
    max_head: usize,
    framing: Framing,
    /// The part of a head, chunk-size line or trailer read so far.
    pending: Vec<u8>,
    /// What the fields of a head taken line by line say about its body.
    fields: FieldsSoFar,
    /// The start of a request whose request line is not whole yet: read,
    /// not handed to hyper.
    withheld: Vec<u8>,
    /// Bytes followed and approved, not yet handed to hyper.
    released: Vec<u8>,
    /// The answer to a request line hyper would refuse: hyper's input ends
    /// before it, and it is written when hyper shuts the connection down.
    refusal: Option<Refusal>,
    /// Past the connection's first bytes (where HTTP/2 starts).
    started: bool,
    /// Closes a connection that stays silent (see [`Silence`]).
    silence: Silence,
    /// The request heads of an HTTP/2 connection.
    h2: Option<Box<H2Heads>>,
    /// Set while the stream rests between HTTP/1.1 requests with hyper
    /// waiting for the next one (see [`TargetWatch::rest_signal`]).
    resting: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Rounds of hyper connections of more than one kind.
    rounds: Option<Box<RoundKinds>>,
}

/// The framing fields of a head taken line by line, and its length so far.
#[derive(Debug, Default)]
struct FieldsSoFar {
    /// The last `Transfer-Encoding` value, trimmed and lower-case.
    transfer_encoding: Option<String>,
    /// The first `Content-Length` value, trimmed.
    content_length: Option<String>,
    bytes: usize,
}

/// How long a client connection may go without a request where hyper does
/// not watch (`listener.header_timeout`): from its start (after its TLS
/// handshake) until hyper has its first bytes (a connection that sends
/// nothing, or an unfinished first request line, which the watch holds back
/// from hyper), and, over HTTP/2, while no request of it is in progress and
/// it is silent (an idle connection; over HTTP/1.1 hyper's own header timer
/// takes over once it has bytes). Then the connection ends: with an error
/// before hyper had a byte, as the client's end over HTTP/2.
pub struct Silence {
    pub limit: Duration,
    /// The connection's requests in progress (`Peer::requests_in_progress`).
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
    /// The connection's requests started so far (`Peer::requests_started`):
    /// an idle HTTP/2 connection's time counts from its last request, not
    /// from its last frame (PINGs and SETTINGS do not keep it open).
    started: Arc<std::sync::atomic::AtomicU64>,
    /// `started` when the idle timer was armed.
    armed_after: u64,
    /// Armed from the connection's start, and while an idle HTTP/2
    /// connection is silent.
    since: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Over HTTP/2: the responses' paces, and how long one may go untaken
    /// (`listener.send_timeout`, see [`crate::client_pace`]).
    paces: Arc<crate::client_pace::Paces>,
    send_timeout: Duration,
    /// Armed while a response goes untaken.
    untaken: Option<Pin<Box<tokio::time::Sleep>>>,
    /// hyper has had bytes.
    handed: bool,
}

impl Silence {
    pub fn new(
        limit: Duration,
        (requests, started): (
            Arc<std::sync::atomic::AtomicUsize>,
            Arc<std::sync::atomic::AtomicU64>,
        ),
        paces: Arc<crate::client_pace::Paces>,
        send_timeout: Duration,
    ) -> Silence {
        Silence {
            limit,
            requests,
            started,
            armed_after: 0,
            since: None,
            paces,
            send_timeout,
            untaken: None,
            handed: false,
        }
    }
}

/// An S3 error written by the watch itself, after hyper's last answer.
#[derive(Debug)]
struct Refusal {
    response: Vec<u8>,
    written: usize,
    /// Once written and the write side shut: until when the client's
    /// further bytes are read and dropped.
    lingering: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes dropped so far.
    dropped: usize,
}

/// Lingering close after a refusal (nginx's `lingering_close`): the client
/// may still be sending the refused request; closing with its bytes unread
/// would reset the connection and could destroy the answer before the
/// client reads it. Its bytes are read and dropped until it closes, for at
/// most this long and this many bytes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// What the bytes held for a round of the other kind came to.
enum Held {
    /// None are held.
    Nothing,
    /// They wait for the round to start.
    Waiting,
    /// The round started and they were followed.
    Followed,
}

/// Where following a read stopped short of its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A request line starts at this offset and is not whole yet.
    Withhold(usize),
    /// A request line hyper would refuse starts at this offset.
    Refuse(usize),
    /// A head that needs a round of the other kind starts at this offset
    /// (see [`RoundKinds`]).
    Switch(usize),
    /// The head being read passes `listener.max_head_bytes` at this offset.
    TooLarge(usize),
}

impl Stop {
    /// The same stop at offset `at` of a read.
    fn at(self, at: usize) -> Stop {
        match self {
            Stop::Withhold(_) => Stop::Withhold(at),
            Stop::Refuse(_) => Stop::Refuse(at),
            Stop::Switch(_) => Stop::Switch(at),
            Stop::TooLarge(_) => Stop::TooLarge(at),
        }
    }
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
    /// In the header fields of a head that did not come in one read: its
    /// request line was judged, and its fields are taken line by line.
    Fields,
    /// HTTP/2 frames.
    H2,
    /// Lost: nothing more is watched.
    Off,
}

impl<I> TargetWatch<I> {
    /// Follows `inner`; a head longer than `max_head` bytes
    /// (`listener.max_head_bytes`) is refused with hyper's own `431`, before
    /// hyper holds that many bytes of it.
    pub fn new(
        inner: I,
        cut: Arc<CutTargets>,
        max_head: usize,
        silence: Silence,
    ) -> TargetWatch<I> {
        TargetWatch {
            inner,
            silence,
            max_head,
            cut,
            framing: Framing::Head,
            pending: Vec::new(),
            fields: FieldsSoFar::default(),
            withheld: Vec::new(),
            released: Vec::new(),
            refusal: None,
            started: false,
            h2: None,
            resting: None,
            rounds: None,
        }
    }

    /// Serves heads in rounds of the kind each needs (see [`RoundKinds`]);
    /// without, every round is [`RoundKind::ManyFields`].
    pub fn with_rounds(mut self, rounds: Option<RoundKinds>) -> TargetWatch<I> {
        self.rounds = rounds.map(Box::new);
        self
    }

    /// A flag the watch sets when it waits for a round of another kind:
    /// hyper has every byte before the head that needs it and asked for
    /// more. `None` when every round is of one kind.
    pub fn switch_signal(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        Some(self.rounds.as_deref()?.switch_signal())
    }

    /// The watch waits for a round of another kind.
    pub fn switch_pending(&self) -> bool {
        self.rounds.as_deref().is_some_and(RoundKinds::switching)
    }

    /// The kind of the round being served.
    pub fn round_kind(&self) -> RoundKind {
        self.rounds
            .as_deref()
            .map_or(RoundKind::ManyFields, RoundKinds::kind)
    }

    /// The raw path handed the round to hyper: the raw path's next head
    /// gets a round of its own ([`RoundKinds::handed_over`]).
    pub fn handed_over(&mut self) {
        if let Some(rounds) = self.rounds.as_deref_mut() {
            rounds.handed_over();
        }
    }

    /// The bytes left of the request body being read, when the watch is in
    /// one framed by `Content-Length` and holds no byte it read (so the
    /// body's next bytes are the socket's next bytes): a raw upload may
    /// then take them from the socket itself ([`TargetWatch::body_passed`]).
    pub fn body_left(&self) -> Option<u64> {
        let holds_bytes = !self.pending.is_empty()
            || !self.withheld.is_empty()
            || !self.released.is_empty()
            || self
                .rounds
                .as_deref()
                .is_some_and(|rounds| !rounds.unfollowed.is_empty());
        match self.framing {
            Framing::Body(left) if !holds_bytes => Some(left),
            _ => None,
        }
    }

    /// `moved` bytes of the body ([`TargetWatch::body_left`]) were taken
    /// from the socket past the watch: it follows on from after them.
    pub fn body_passed(&mut self, moved: u64) {
        if let Framing::Body(left) = self.framing {
            self.framing = match left.saturating_sub(moved) {
                0 => Framing::Head,
                left => Framing::Body(left),
            };
        }
    }

    /// A round of the kind the held head needs starts: the bytes held for
    /// it are followed now.
    pub fn switch_round(&mut self) {
        if let Some(rounds) = self.rounds.as_deref_mut() {
            rounds.start_next();
        }
    }

    /// The watch of a connection that served a request and rested (its
    /// first bytes were HTTP/1.1): nothing of the last request is left to
    /// follow.
    pub fn after_a_rest(mut self) -> TargetWatch<I> {
        self.started = true;
        self.silence.handed = true;
        self
    }

    /// The I/O object watched.
    pub fn into_inner(self) -> I {
        self.inner
    }

    /// True once the connection's first bytes were HTTP/2's preface.
    pub fn is_http2(&self) -> bool {
        self.framing == Framing::H2
    }

    /// True once the connection's first bytes said which protocol it speaks.
    pub fn has_started(&self) -> bool {
        self.started
    }

    /// A flag the watch keeps set while the connection rests between
    /// HTTP/1.1 requests: every byte of the last request was handed to
    /// hyper, none of the next was read, and hyper's last read found nothing
    /// to read (it waits for the next request). Cleared by any byte read or
    /// written.
    pub fn rest_signal(&mut self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(self.resting.get_or_insert_with(Arc::default))
    }

    /// Between two HTTP/1.1 requests, with nothing of the next one read.
    fn between_requests(&self) -> bool {
        self.started
            && self.framing == Framing::Head
            && self.pending.is_empty()
            && self.withheld.is_empty()
            && self.released.is_empty()
            && self.refusal.is_none()
            && self
                .rounds
                .as_deref()
                .is_none_or(|rounds| rounds.unfollowed.is_empty())
    }

    /// Records whether a read (or write) left the connection at rest.
    fn mark_rest(&self, waiting: bool) {
        if let Some(resting) = &self.resting {
            let at_rest = waiting && self.between_requests();
            resting.store(at_rest, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Follows newly read bytes; where it stops short, the bytes from there
    /// on must not reach hyper (yet).
    fn scan(&mut self, bytes: &[u8]) -> Option<Stop> {
        let mut read = bytes;
        while !read.is_empty() {
            let at = bytes.len() - read.len();
            read = match self.framing {
                Framing::Off => return None,
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
                Framing::Head => match self.head(read) {
                    Ok(rest) => rest,
                    Err(stop) => return Some(stop.at(at)),
                },
                Framing::ChunkSize => self.chunk_size(read),
                Framing::Trailers => self.trailer_line(read),
                Framing::Fields => match self.field_line(read) {
                    Ok(rest) => rest,
                    Err(stop) => return Some(stop.at(at)),
                },
                Framing::H2 => self.h2_frames(read),
            };
        }
        None
    }

    /// Follows HTTP/2 frames; records each request whose `:path` has a raw
    /// `#`, as `METHOD SP path-before-#`.
    fn h2_frames<'r>(&mut self, read: &'r [u8]) -> &'r [u8] {
        let Some(h2) = self.h2.as_mut() else {
            return self.lose();
        };
        let cut = &self.cut;
        let followed = h2.follow(read, &mut |head: RequestHead| {
            if let Some(hash) = memchr::memchr(b'#', &head.path) {
                cut.record([&head.method[..], b" ", &head.path[..hash]].concat());
            }
        });
        if followed.is_err() {
            self.cut.distrust();
            return self.lose();
        }
        &[]
    }

    /// At the connection's first bytes: HTTP/2 starts with its preface.
    fn starts_http2(&mut self, read: &[u8]) -> Result<bool, Stop> {
        let compared = read.len().min(h2_heads::PREFACE.len());
        if read[..compared] != h2_heads::PREFACE[..compared] {
            self.started = true;
            return Ok(false);
        }
        if compared < h2_heads::PREFACE.len() {
            return Err(Stop::Withhold(0));
        }
        self.started = true;
        self.framing = Framing::H2;
        self.h2 = Some(Box::default());
        Ok(true)
    }

    /// Takes head bytes; at the end of the head, records a cut target and
    /// moves to the body. Returns what is left of `read`, or where a
    /// request starting in `read` must stop.
    fn head<'r>(&mut self, read: &'r [u8]) -> Result<&'r [u8], Stop> {
        if !self.started && self.starts_http2(read)? {
            return Ok(read);
        }
        // The common case, a head within one read, is parsed in place.
        let parsed = parse_head(read);
        if matches!(parsed, Head::Complete { length, .. } if length > self.max_head) {
            return Err(Stop::TooLarge(0));
        }
        if let Some(rounds) = self.rounds.as_deref_mut()
            && rounds.switch_for(parsed.seen()).is_some()
        {
            return Err(Stop::Switch(0));
        }
        match parsed {
            Head::RefusedTarget => Err(Stop::Refuse(0)),
            Head::Invalid { .. } => Ok(self.lose()),
            Head::Complete {
                length, cut, body, ..
            } => {
                if let Some(line) = cut {
                    self.cut.record(line);
                }
                self.framing = body;
                Ok(&read[length..])
            }
            Head::Partial => self.partial_head(read),
        }
    }

    /// A head that did not come in one read: until its request line is
    /// whole, it is withheld; then the line is judged and recorded, and the
    /// fields are taken line by line ([`Framing::Fields`]), keeping only the
    /// framing fields and the line being read (a head read a few bytes at a
    /// time costs its length, and its memory is hyper's alone).
    fn partial_head<'r>(&mut self, read: &'r [u8]) -> Result<&'r [u8], Stop> {
        let Some(line_end) = request_line_end(read) else {
            return Err(Stop::Withhold(0));
        };
        if line_end >= self.max_head {
            return Err(Stop::TooLarge(0));
        }
        let mut line = read[..line_end].to_vec();
        line.extend_from_slice(b"\r\n");
        match parse_head(&line) {
            Head::RefusedTarget => return Err(Stop::Refuse(0)),
            Head::Complete { cut, .. } => {
                if let Some(line) = cut {
                    self.cut.record(line);
                }
            }
            Head::Partial | Head::Invalid { .. } => return Ok(self.lose()),
        }
        self.framing = Framing::Fields;
        self.fields = FieldsSoFar {
            bytes: line_end,
            ..FieldsSoFar::default()
        };
        Ok(&read[line_end..])
    }

    /// Takes one header field line; the empty line ends the head and moves
    /// to the body its fields frame.
    fn field_line<'r>(&mut self, read: &'r [u8]) -> Result<&'r [u8], Stop> {
        let before = self.pending.len();
        let Some(rest) = self.take_line(read) else {
            self.count_head_bytes(read.len(), false)?;
            return Ok(&[]);
        };
        let last = matches!(self.pending.as_slice(), b"\r\n" | b"\n");
        self.count_head_bytes(self.pending.len() - before, last)?;
        if self.framing == Framing::Off {
            return Ok(&[]);
        }
        if last {
            let fields = std::mem::take(&mut self.fields);
            self.framing = framing_of(
                fields.transfer_encoding.as_deref(),
                fields.content_length.as_deref(),
            );
            self.pending.clear();
            return Ok(rest);
        }
        // One field, read as hyper reads it (an invalid one: hyper refuses
        // the request too).
        self.pending.extend_from_slice(b"\r\n");
        let mut field = [httparse::EMPTY_HEADER; 1];
        let parsed = httparse::parse_headers(&self.pending, &mut field);
        let Ok(httparse::Status::Complete((_, [field]))) = parsed else {
            return Ok(self.lose());
        };
        let value = || {
            String::from_utf8_lossy(field.value)
                .trim()
                .to_ascii_lowercase()
        };
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            self.fields.transfer_encoding = Some(value());
        } else if field.name.eq_ignore_ascii_case("content-length")
            && self.fields.content_length.is_none()
        {
            self.fields.content_length = Some(value());
        }
        self.pending.clear();
        Ok(rest)
    }

    /// Counts head bytes taken line by line: a head refused as hyper
    /// refuses one, once `max_head` bytes of it are not the whole of it
    /// (so hyper never holds that many of an unfinished head, and never
    /// answers it itself).
    fn count_head_bytes(&mut self, taken: usize, whole: bool) -> Result<(), Stop> {
        self.fields.bytes += taken;
        if self.fields.bytes > self.max_head || (!whole && self.fields.bytes >= self.max_head) {
            return Err(Stop::TooLarge(0));
        }
        Ok(())
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
            if self.pending.len() > MAX_LINE.max(self.max_head) {
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
        self.h2 = None;
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
    /// More bytes are needed.
    Partial,
    Invalid {
        /// httparse stopped at more than [`COMMON_FIELDS`] fields first.
        many_fields: bool,
    },
    /// hyper would refuse the request target (RFC 9112 section 3.2 as the
    /// `http` crate's URI parser reads it).
    RefusedTarget,
    Complete {
        /// Bytes of the head.
        length: usize,
        /// `METHOD SP target-before-#` when the target has a raw `#`.
        cut: Option<Vec<u8>>,
        /// How the body is framed.
        body: Framing,
        /// More than [`COMMON_FIELDS`] fields.
        many_fields: bool,
        /// One the raw path takes ([`crate::raw_head::is_raw`]).
        raw: bool,
        /// An upload the raw path may take ([`crate::raw_head::raw_upload`]).
        raw_upload: bool,
    },
}

impl Head {
    /// What the kind of round it is served in goes by.
    fn seen(&self) -> HeadSeen {
        let (whole, many_fields, body, (raw, raw_upload)) = match *self {
            Head::Partial => (false, false, Framing::Off, (false, false)),
            Head::Invalid { many_fields } => (true, many_fields, Framing::Off, (false, false)),
            Head::RefusedTarget => (true, false, Framing::Off, (false, false)),
            Head::Complete {
                body,
                many_fields,
                raw,
                raw_upload,
                ..
            } => (true, many_fields, body, (raw, raw_upload)),
        };
        HeadSeen {
            whole,
            many_fields,
            raw,
            raw_upload,
            content_length: match body {
                Framing::Body(length) => Some(length),
                _ => None,
            },
        }
    }
}

/// Parses a request head as hyper does (httparse): first into as many
/// field slots as hyper has by default, as an error past them in hyper's
/// parse would be its `431`, then, when that is too few, into as many as
/// the head could hold.
fn parse_head(bytes: &[u8]) -> Head {
    // Uninitialised, as hyper's: httparse writes a field before it is read.
    let mut few = [const { MaybeUninit::uninit() }; COMMON_FIELDS];
    match head_of(&mut few, bytes, false) {
        Ok(head) => head,
        Err(httparse::Error::TooManyHeaders) => {
            // A field takes at least 4 bytes (`a:` CRLF).
            let mut many = Vec::with_capacity(bytes.len() / 4 + 1);
            many.resize_with(bytes.len() / 4 + 1, MaybeUninit::uninit);
            head_of(&mut many, bytes, true).unwrap_or(Head::Invalid { many_fields: true })
        }
        Err(_) => Head::Invalid { many_fields: false },
    }
}

fn head_of<'b>(
    fields: &mut [MaybeUninit<httparse::Header<'b>>],
    bytes: &'b [u8],
    many_fields: bool,
) -> Result<Head, httparse::Error> {
    let mut request = httparse::Request::new(&mut []);
    let parsed = request.parse_with_uninit_headers(bytes, fields);
    // As hyper tells them apart: a bad token after the method is the target's.
    if parsed == Err(httparse::Error::Token) && request.method.is_some() {
        return Ok(Head::RefusedTarget);
    }
    if request.path.is_some_and(uri_parser_refuses) {
        return Ok(Head::RefusedTarget);
    }
    let length = match parsed? {
        httparse::Status::Complete(length) => length,
        httparse::Status::Partial => {
            return Ok(Head::Partial);
        }
    };
    let (Some(method), Some(path)) = (request.method, request.path) else {
        return Ok(Head::Invalid { many_fields });
    };
    let cut = path.find('#').map(|hash| {
        let kept = origin_form(&path.as_bytes()[..hash]);
        [method.as_bytes(), b" ", &kept].concat()
    });
    Ok(Head::Complete {
        length,
        cut,
        body: body_framing(request.headers),
        many_fields,
        raw: !many_fields && crate::raw_head::is_raw(&request),
        raw_upload: !many_fields && crate::raw_head::raw_upload(&request).is_some(),
    })
}

/// True when hyper would answer this request target with its bare `400`:
/// the `http` crate's URI parser, which hyper runs on every target, does not
/// take it. Targets longer than hyper's limit get its `414` instead.
fn uri_parser_refuses(target: &str) -> bool {
    // Almost every target is made of bytes every parser takes.
    let plain = |b: &u8| b.is_ascii_alphanumeric() || b"/-._~%!$&'()*+,;=:@?".contains(b);
    if target.starts_with('/') && target.as_bytes().iter().all(plain) {
        return false;
    }
    target.len() <= MAX_URI && http::Uri::try_from(target).is_err()
}

/// hyper's longest request target (`MAX_URI_LEN`).
const MAX_URI: usize = (u16::MAX - 1) as usize;

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

/// How the body of a head with these fields is framed.
fn body_framing(fields: &[httparse::Header<'_>]) -> Framing {
    framing_of(
        values(fields, "transfer-encoding")
            .last()
            .map(String::as_str),
        values(fields, "content-length").first().map(String::as_str),
    )
}

/// RFC 9112 section 6.3: `Transfer-Encoding` ending in chunked wins over
/// `Content-Length`; neither means no body. Values trimmed and lower-case:
/// the last `Transfer-Encoding`, the first `Content-Length`.
fn framing_of(transfer_encoding: Option<&str>, content_length: Option<&str>) -> Framing {
    if let Some(coding) = transfer_encoding {
        return match coding.rsplit(',').next().map(str::trim) {
            Some("chunked") => Framing::ChunkSize,
            _ => Framing::Off,
        };
    }
    match content_length.map(str::parse::<u64>) {
        None | Some(Ok(0)) => Framing::Head,
        Some(Ok(length)) => Framing::Body(length),
        Some(Err(_)) => Framing::Off,
    }
}

/// Where the request line of a head starting `read` ends (after its `\n`;
/// empty lines before it, which parsers skip, count with it), if it does.
fn request_line_end(read: &[u8]) -> Option<usize> {
    let start = read.iter().position(|&b| b != b'\r' && b != b'\n')?;
    memchr::memchr(b'\n', &read[start..]).map(|end| start + end + 1)
}

impl<I> TargetWatch<I> {
    /// Follows `read` (bytes that directly follow what hyper has) and
    /// returns how many of them hyper may have now; the rest is withheld or
    /// refused.
    fn follow(&mut self, read: &[u8]) -> usize {
        match self.scan(read) {
            None => read.len(),
            Some(Stop::Withhold(at)) if read.len() - at >= self.max_head => {
                self.refuse_too_large();
                at
            }
            Some(Stop::Withhold(at)) => {
                if read.len() - at > MAX_REQUEST_LINE {
                    // Too long to be judged: hyper judges it (and has it
                    // once: nothing of it stays withheld).
                    self.withheld = Vec::new();
                    self.lose();
                    return read.len();
                }
                self.withheld = read[at..].to_vec();
                at
            }
            Some(Stop::Refuse(at)) => {
                self.refusal = Some(Refusal::invalid_uri(&read[at..]));
                self.lose();
                at
            }
            Some(Stop::TooLarge(at)) => {
                self.refuse_too_large();
                at
            }
            Some(Stop::Switch(at)) => {
                if let Some(rounds) = self.rounds.as_deref_mut() {
                    rounds.unfollowed = read[at..].to_vec();
                    rounds.replay = false;
                }
                at
            }
        }
    }

    /// Bytes held for a round of the other kind: until it starts, hyper
    /// is told to wait; once it has, they are followed as if just read
    /// (queued for hyper as far as approved).
    fn held_for_a_switch(&mut self) -> Held {
        let Some(rounds) = self.rounds.as_deref_mut() else {
            return Held::Nothing;
        };
        if rounds.unfollowed.is_empty() {
            return Held::Nothing;
        }
        if !rounds.replay {
            rounds.switch_is_due();
            return Held::Waiting;
        }
        rounds.replay = false;
        let mut bytes = std::mem::take(&mut rounds.unfollowed);
        let approved = self.follow(&bytes);
        bytes.truncate(approved);
        self.released = bytes;
        Held::Followed
    }

    /// Ends hyper's input before a head longer than `listener.max_head_bytes`
    /// and answers it as hyper answers one, `431` (hyper's own check counts
    /// its buffer, which can be larger than the limit once it has grown).
    fn refuse_too_large(&mut self) {
        self.refusal = Some(Refusal::head_too_large());
        self.withheld = Vec::new();
        self.lose();
    }

    /// Follows bytes read after a withheld request start, and queues what
    /// hyper may have of both.
    fn follow_withheld(&mut self, read: &[u8]) {
        if !read.is_empty() && memchr::memchr(b'\n', read).is_none() {
            // The line is still not whole: only its new bytes were looked at
            // (a line read a few bytes at a time costs its length, not more).
            self.withheld.extend_from_slice(read);
            if self.withheld.len() <= MAX_REQUEST_LINE && self.withheld.len() < self.max_head {
                return;
            }
        }
        let mut bytes = std::mem::take(&mut self.withheld);
        if read.is_empty() {
            // The client ended mid-line: hyper sees what it sent, then the end.
            self.lose();
        } else {
            if memchr::memchr(b'\n', read).is_some() {
                bytes.extend_from_slice(read);
            }
            let approved = self.follow(&bytes);
            bytes.truncate(approved);
        }
        self.released = bytes;
    }

    /// Nothing to read: past the silence a connection may keep (see
    /// [`Silence`]), it ends.
    fn when_silent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(stalled) = self.client_stalled(cx) {
            return Poll::Ready(Err(stalled));
        }
        let before_first_byte = !self.silence.handed;
        let idle_http2 = self.framing == Framing::H2
            && self
                .silence
                .requests
                .load(std::sync::atomic::Ordering::Acquire)
                == 0;
        if !(before_first_byte || idle_http2) {
            self.silence.since = None;
            return Poll::Pending;
        }
        // Idle time counts from the last request's end: a request since the
        // timer was armed starts it again.
        let started = self
            .silence
            .started
            .load(std::sync::atomic::Ordering::Acquire);
        if started != self.silence.armed_after {
            self.silence.armed_after = started;
            self.silence.since = None;
        }
        let limit = self.silence.limit;
        let since = self
            .silence
            .since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(since.as_mut().poll(cx));
        if before_first_byte {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request line for listener.header_timeout",
            )));
        }
        // An idle HTTP/2 connection: its end, as if the client had closed.
        self.framing = Framing::Off;
        Poll::Ready(Ok(()))
    }

    /// Over HTTP/2: a response the client has not taken for
    /// `listener.send_timeout` (its stream's window never opened) ends the
    /// connection ([`crate::client_pace`]).
    fn client_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.framing != Framing::H2 {
            return Poll::Pending;
        }
        self.silence.paces.set_reader(cx.waker());
        let Some(since) = self.silence.paces.stalled_since() else {
            self.silence.untaken = None;
            return Poll::Pending;
        };
        let deadline = since + self.silence.send_timeout;
        let timer = self
            .silence
            .untaken
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no response data for listener.send_timeout",
        ))
    }

    /// Hands queued bytes to hyper.
    fn release(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.released.len().min(buf.remaining());
        buf.put_slice(&self.released[..n]);
        self.released.drain(..n);
        if self.released.is_empty() {
            // Its memory is not kept for the rest of the round.
            self.released = Vec::new();
        }
    }
}

impl Refusal {
    /// hyper's answer to a head over its limit, byte for byte.
    fn head_too_large() -> Refusal {
        tracing::debug!("request head over listener.max_head_bytes refused");
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let response = format!(
            "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
        );
        Refusal {
            response: response.into_bytes(),
            written: 0,
            lingering: None,
            dropped: 0,
        }
    }

    /// `400 InvalidURI` for the request that starts with `request`.
    fn invalid_uri(request: &[u8]) -> Refusal {
        let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
        let text = String::from_utf8_lossy(line);
        let mut words = text.split(' ');
        let method = words.next().unwrap_or_default();
        let target = words.next().unwrap_or_default();
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        let request_id = next_request_id();
        tracing::debug!(%method, target, request_id, "request target refused before parsing");
        Refusal {
            response: ProxyError::InvalidUri.to_http1_bytes(&method, target, &request_id),
            written: 0,
            lingering: None,
            dropped: 0,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TargetWatch<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = self.as_mut().read_followed(cx, buf);
        self.mark_rest(polled.is_pending());
        polled
    }
}

impl<I: AsyncRead + Unpin> TargetWatch<I> {
    /// Reads what hyper may have (see [`TargetWatch::follow`]).
    fn read_followed(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.released.is_empty() {
                this.release(buf);
                this.silence.handed = true;
                return Poll::Ready(Ok(()));
            }
            if this.refusal.is_some() {
                // hyper's input ends before the refused request.
                return Poll::Ready(Ok(()));
            }
            match this.held_for_a_switch() {
                // The round ends once hyper has answered what it has.
                Held::Waiting => return Poll::Pending,
                // Approved, refused, or held again: as after a read.
                Held::Followed => continue,
                Held::Nothing => {}
            }
            if let Poll::Ready(stalled) = this.client_stalled(cx) {
                return Poll::Ready(Err(stalled));
            }
            let before = buf.filled().len();
            let Poll::Ready(read) = Pin::new(&mut this.inner).poll_read(cx, buf) else {
                return this.when_silent(cx);
            };
            read?;
            let read = &buf.filled()[before..];
            if !this.withheld.is_empty() {
                let read = read.to_vec();
                buf.set_filled(before);
                this.follow_withheld(&read);
                continue;
            }
            if read.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let approved = this.follow(read);
            buf.set_filled(before + approved);
            if approved > 0 {
                this.silence.handed = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TargetWatch<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.mark_rest(false);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.mark_rest(false);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Writes a pending refusal after hyper's last answer, shuts down, and
    /// lingers (see [`LINGER`]).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(refusal) = &mut this.refusal else {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        };
        if refusal.lingering.is_none() {
            while refusal.written < refusal.response.len() {
                let rest = &refusal.response[refusal.written..];
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, rest))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                refusal.written += n;
            }
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            refusal.lingering = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 8 << 10];
        while refusal.dropped < LINGER_BYTES {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    refusal.dropped += buf.filled().len();
                }
                Poll::Ready(_) => break,
                Poll::Pending => match refusal.lingering.as_mut() {
                    Some(until) => {
                        ready!(until.as_mut().poll(cx));
                        break;
                    }
                    None => break,
                },
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silence() -> Silence {
        Silence::new(
            Duration::from_secs(60),
            (Arc::default(), Arc::default()),
            Arc::default(),
            Duration::from_secs(60),
        )
    }

    fn watched(reads: &[&[u8]]) -> Arc<CutTargets> {
        let cut = Arc::new(CutTargets::default());
        let mut watch = TargetWatch::new((), Arc::clone(&cut), 1 << 20, silence());
        for read in reads {
            // As `poll_read` follows them.
            if watch.withheld.is_empty() {
                watch.follow(read);
            } else {
                watch.follow_withheld(read);
            }
        }
        cut
    }

    /// A client connection that delivers `reads` one read each, then ends,
    /// and keeps what is written to it.
    #[derive(Default)]
    struct Client {
        reads: VecDeque<Vec<u8>>,
        written: Vec<u8>,
        /// Past `reads`, the client waits (its connection open) instead of
        /// ending it.
        stays_open: bool,
    }

    impl AsyncRead for Client {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.reads.is_empty() && self.stays_open {
                return Poll::Pending;
            }
            if let Some(mut read) = self.reads.pop_front() {
                if read.len() > buf.remaining() {
                    let rest = read.split_off(buf.remaining());
                    self.reads.push_front(rest);
                }
                buf.put_slice(&read);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Client {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What hyper reads when the client sends `reads` and ends, and what the
    /// client gets once hyper shuts the connection down.
    async fn through_the_watch(reads: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let client = Client {
            reads: reads.iter().map(|read| read.to_vec()).collect(),
            ..Client::default()
        };
        let mut watch = TargetWatch::new(client, Arc::default(), 1 << 20, silence());
        let mut hyper_read = Vec::new();
        watch.read_to_end(&mut hyper_read).await.unwrap();
        watch.shutdown().await.unwrap();
        (hyper_read, watch.inner.written)
    }

    const HEAD_LIMIT: usize = 64 << 10;
    const MAX_READ: usize = 512 << 10;
    use crate::read_budget::{READS_HELD, ReadBudget};
    use crate::round_kind::LargeBodyReads;
    const SHARE: usize = READS_HELD * MAX_READ;

    /// A watch with large body reads over a client that sends `reads`.
    fn large_body_watch(budget: &Arc<ReadBudget>, reads: Vec<Vec<u8>>) -> TargetWatch<Client> {
        let client = Client {
            reads: reads.into(),
            stays_open: true,
            ..Client::default()
        };
        // At most 100 fields: every other round is a common one.
        let large = LargeBodyReads::new(Arc::clone(budget), MAX_READ);
        TargetWatch::new(client, Arc::default(), HEAD_LIMIT, silence())
            .with_rounds(RoundKinds::new(COMMON_FIELDS, Some(large), false))
    }

    /// One read by hyper with room for `MAX_READ` bytes: what it got, or
    /// `None` when told to wait.
    fn hyper_reads(watch: &mut TargetWatch<Client>) -> Option<Vec<u8>> {
        let mut room = vec![0u8; MAX_READ];
        let mut buf = ReadBuf::new(&mut room);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(watch).poll_read(&mut cx, &mut buf) {
            Poll::Ready(read) => {
                read.unwrap();
                Some(buf.filled().to_vec())
            }
            Poll::Pending => None,
        }
    }

    fn put_head(body: usize) -> Vec<u8> {
        format!("PUT /b/k HTTP/1.1\r\nHost: s3\r\nContent-Length: {body}\r\n\r\n").into_bytes()
    }

    #[test]
    fn a_large_body_is_read_in_a_round_of_its_own_with_a_share_of_the_budget() {
        let budget = Arc::new(ReadBudget::new(4 * SHARE, MAX_READ));
        let get = b"GET /b/small HTTP/1.1\r\nHost: s3\r\n\r\n".to_vec();
        let body = vec![7u8; 1 << 20];
        let first_read = [get.clone(), put_head(body.len()), body[..1000].to_vec()].concat();
        let rest_of_body = body[1000..].to_vec();
        let mut watch = large_body_watch(&budget, vec![first_read, rest_of_body, get.clone()]);
        let switch = watch.switch_signal().unwrap();

        assert_eq!(
            hyper_reads(&mut watch).unwrap(),
            get,
            "what comes before goes as it is"
        );
        assert_eq!(
            hyper_reads(&mut watch),
            None,
            "hyper waits for the next round"
        );
        assert!(switch.load(std::sync::atomic::Ordering::Relaxed));
        assert!(watch.switch_pending() && watch.round_kind() == RoundKind::Common);
        assert_eq!(
            budget.available(),
            3 * SHARE,
            "the large round's share is taken"
        );

        watch.switch_round();
        assert_eq!(watch.round_kind(), RoundKind::LargeBodies);
        assert!(!switch.load(std::sync::atomic::Ordering::Relaxed));
        let mut large_round = Vec::new();
        while let Some(read) = hyper_reads(&mut watch) {
            large_round.extend(read);
        }
        assert_eq!(
            large_round,
            [put_head(body.len()), body].concat(),
            "the PUT whole, nothing after it"
        );
        assert!(switch.load(std::sync::atomic::Ordering::Relaxed));

        watch.switch_round();
        assert_eq!(watch.round_kind(), RoundKind::Common);
        assert_eq!(
            budget.available(),
            4 * SHARE,
            "an ordinary round gives the share back"
        );
        assert_eq!(hyper_reads(&mut watch).unwrap(), get);
    }

    /// A head of `length` bytes, whole.
    fn head_of_length(length: usize) -> Vec<u8> {
        let start = b"GET /b/k HTTP/1.1\r\nX-Pad: ".to_vec();
        let pad = length - start.len() - 4;
        [start, vec![b'p'; pad], b"\r\n\r\n".to_vec()].concat()
    }

    /// What hyper reads and what the client gets, as `through_the_watch`,
    /// with the listener's default head limit.
    async fn through_the_head_limit(reads: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let client = Client {
            reads: reads.iter().map(|read| read.to_vec()).collect(),
            ..Client::default()
        };
        let mut watch = TargetWatch::new(client, Arc::default(), HEAD_LIMIT, silence());
        // With room for more than the limit, as hyper's grown buffer has.
        let (mut hyper_read, mut room) = (Vec::new(), vec![0u8; 2 * HEAD_LIMIT]);
        loop {
            let n = watch.read(&mut room).await.unwrap();
            if n == 0 {
                break;
            }
            hyper_read.extend_from_slice(&room[..n]);
        }
        watch.shutdown().await.unwrap();
        (hyper_read, watch.inner.written)
    }

    fn is_hypers_431(answer: &[u8]) -> bool {
        let answer = String::from_utf8_lossy(answer);
        let (head, date) = answer.split_once("date: ").unwrap_or_default();
        head == "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n"
            && date.len() == "Tue, 01 Dec 2026 01:34:17 GMT\r\n\r\n".len()
            && date.ends_with(" GMT\r\n\r\n")
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_over_the_limit_is_answered_431_however_it_arrives() {
        let ok = b"GET /ok HTTP/1.1\r\n\r\n".to_vec();
        let over = head_of_length(HEAD_LIMIT + 1);
        let (read, answer) = through_the_head_limit(&[&[ok.clone(), over.clone()].concat()]).await;
        assert!(
            read == ok,
            "hyper answers what came before, then its input ends: {} bytes",
            read.len()
        );
        assert!(
            is_hypers_431(&answer),
            "{}",
            String::from_utf8_lossy(&answer)
        );

        // In pieces: hyper gets part of it, never the limit's worth (which
        // it would answer itself), then its input ends.
        let pieces: Vec<&[u8]> = over.chunks(10_000).collect();
        let (read, answer) = through_the_head_limit(&pieces).await;
        assert!(read.len() < HEAD_LIMIT, "{}", read.len());
        assert!(is_hypers_431(&answer));

        // A request line longer than the limit, never finished.
        let line = [b"GET /".to_vec(), vec![b'a'; HEAD_LIMIT]].concat();
        let (read, answer) = through_the_head_limit(&[&line[..30_000], &line[30_000..]]).await;
        assert!(read.is_empty(), "{} bytes", read.len());
        assert!(is_hypers_431(&answer));
    }

    #[tokio::test]
    async fn a_head_of_exactly_the_limit_goes_to_hyper_whole() {
        let exact = head_of_length(HEAD_LIMIT);
        for reads in [vec![&exact[..]], exact.chunks(10_000).collect()] {
            let (read, answer) = through_the_head_limit(&reads).await;
            assert!(read == exact, "{} bytes", read.len());
            assert!(answer.is_empty());
        }
    }

    /// A watch whose rounds are common until a head needs many fields.
    fn many_fields_watch(reads: Vec<Vec<u8>>) -> TargetWatch<Client> {
        let client = Client {
            reads: reads.into(),
            stays_open: true,
            ..Client::default()
        };
        TargetWatch::new(client, Arc::default(), HEAD_LIMIT, silence())
            .with_rounds(RoundKinds::new(500, None, false))
    }

    fn get_with_fields(fields: usize) -> Vec<u8> {
        let extra: String = (1..fields).map(|n| format!("X-{n}: {n}\r\n")).collect();
        format!("GET /b/k HTTP/1.1\r\nHost: s3\r\n{extra}\r\n").into_bytes()
    }

    /// Everything hyper reads until it is told to wait.
    fn hyper_reads_all(watch: &mut TargetWatch<Client>) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(read) = hyper_reads(watch).filter(|read| !read.is_empty()) {
            all.extend(read);
        }
        all
    }

    #[test]
    fn a_head_of_more_than_a_hundred_fields_waits_for_a_round_that_takes_them() {
        let (common, many) = (get_with_fields(100), get_with_fields(101));
        let read = [common.clone(), many.clone(), common.clone()].concat();
        let mut watch = many_fields_watch(vec![read]);
        assert_eq!(watch.round_kind(), RoundKind::Common);
        assert_eq!(
            hyper_reads_all(&mut watch),
            common,
            "100 fields go as they are"
        );
        assert!(watch.switch_pending(), "101 wait for the next round");
        watch.switch_round();
        assert_eq!(watch.round_kind(), RoundKind::ManyFields);
        assert_eq!(
            hyper_reads_all(&mut watch),
            [many, common].concat(),
            "that round keeps what comes after"
        );
        assert!(!watch.switch_pending());
    }

    #[test]
    fn a_head_in_pieces_waits_for_a_round_that_takes_many_fields() {
        let head = get_with_fields(3);
        let (start, end) = head.split_at(30);
        let mut watch = many_fields_watch(vec![start.to_vec(), end.to_vec()]);
        assert_eq!(hyper_reads(&mut watch), None);
        assert!(watch.switch_pending());
        watch.switch_round();
        assert_eq!(watch.round_kind(), RoundKind::ManyFields);
        assert_eq!(hyper_reads_all(&mut watch), head);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_target_right_after_a_large_body_is_answered_at_once() {
        use tokio::io::AsyncWriteExt;
        let budget = Arc::new(ReadBudget::new(4 * SHARE, MAX_READ));
        let body = vec![7u8; 1 << 20];
        let refused = b"GET /a<b HTTP/1.1\r\nHost: s3\r\n\r\n".to_vec();
        let read = [put_head(body.len()), body.clone(), refused].concat();
        let mut watch = large_body_watch(&budget, vec![read]);
        assert_eq!(hyper_reads(&mut watch), None);
        watch.switch_round();
        let mut large_round = Vec::new();
        while let Some(read) = hyper_reads(&mut watch) {
            large_round.extend(read);
        }
        assert_eq!(large_round, [put_head(body.len()), body].concat());
        watch.switch_round();
        assert_eq!(
            hyper_reads(&mut watch),
            Some(Vec::new()),
            "hyper's input ends before the refused request, while the client stays"
        );
        watch.shutdown().await.unwrap();
        assert!(watch.inner.written.starts_with(b"HTTP/1.1 400"));
    }

    #[test]
    fn a_head_over_the_limit_in_pieces_or_past_the_budget_stays_in_an_ordinary_round() {
        let long_head = [
            b"PUT /b/k HTTP/1.1\r\nX-Amz-Meta-Long: ".to_vec(),
            vec![b'a'; HEAD_LIMIT],
            b"\r\nContent-Length: 1048576\r\n\r\n".to_vec(),
        ]
        .concat();
        let in_pieces = put_head(1 << 20);
        let (start, end) = in_pieces.split_at(20);
        let cases = [
            ("a head over listener.max_head_bytes", vec![long_head]),
            ("a head in two reads", vec![start.to_vec(), end.to_vec()]),
            (
                "a body under listener.max_read_bytes",
                vec![put_head(MAX_READ - 1)],
            ),
        ];
        for (case, reads) in cases {
            let budget = Arc::new(ReadBudget::new(4 * SHARE, MAX_READ));
            let mut watch = large_body_watch(&budget, reads);
            while hyper_reads(&mut watch).is_some_and(|read| !read.is_empty()) {}
            assert!(!watch.switch_pending(), "{case}");
            assert_eq!(budget.available(), 4 * SHARE, "{case}");
        }

        let spent = Arc::new(ReadBudget::new(4 * SHARE, MAX_READ));
        let _others: Vec<_> = (0..4).map(|_| spent.take(SHARE).unwrap()).collect();
        let mut watch = large_body_watch(&spent, vec![put_head(1 << 20)]);
        assert_eq!(
            hyper_reads(&mut watch).unwrap(),
            put_head(1 << 20),
            "past the budget"
        );
        assert!(!watch.switch_pending());
    }

    #[tokio::test]
    async fn hyper_reads_up_to_a_refused_target_and_the_client_gets_invalid_uri() {
        let (read, answer) = through_the_watch(&[
            b"GET /ok HTTP/1.1\r\n\r\nGET /a<b HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n",
        ])
        .await;
        assert_eq!(read, b"GET /ok HTTP/1.1\r\n\r\n");
        let answer = String::from_utf8(answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("</Error>"), "{answer}");
        assert!(answer.contains("<Code>InvalidURI</Code>"), "{answer}");
    }

    #[tokio::test]
    async fn a_request_line_too_long_to_judge_reaches_hyper_once() {
        let line = [
            b"GET /".to_vec(),
            vec![b'a'; 70_000],
            b" HTTP/1.1\r\n\r\n".to_vec(),
        ]
        .concat();
        let (read, _) =
            through_the_watch(&[&line[..8192], &line[8192..68_000], &line[68_000..]]).await;
        assert!(
            read == line,
            "hyper read {} bytes of {}",
            read.len(),
            line.len()
        );
    }

    #[tokio::test]
    async fn a_request_line_split_across_reads_is_judged_whole() {
        let (read, answer) = through_the_watch(&[b"GET /a", b"`b HTTP/1.1\r\n\r\n"]).await;
        assert_eq!(read, b"", "hyper never has part of a refused request");
        assert!(answer.starts_with(b"HTTP/1.1 400"));

        let (read, answer) = through_the_watch(&[
            b"PUT /k HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET /",
            b"fine HTTP/1.1\r\n\r\n",
        ])
        .await;
        assert_eq!(
            read,
            b"PUT /k HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET /fine HTTP/1.1\r\n\r\n"
        );
        assert_eq!(answer, b"");
    }

    #[tokio::test]
    async fn control_bytes_in_a_target_are_refused_and_a_bad_method_is_left_to_hyper() {
        let (read, answer) = through_the_watch(&[b"GET /a\x01b HTTP/1.1\r\n\r\n"]).await;
        assert_eq!(read, b"");
        assert!(answer.starts_with(b"HTTP/1.1 400"));

        let sent = b"G(T /a HTTP/1.1\r\n\r\n";
        let (read, answer) = through_the_watch(&[sent]).await;
        assert_eq!(read, sent, "hyper gives its own answer");
        assert_eq!(answer, b"");
    }

    #[tokio::test]
    async fn a_client_that_ends_mid_line_leaves_hyper_what_it_sent() {
        let (read, answer) = through_the_watch(&[b"GET /unfinished"]).await;
        assert_eq!(read, b"GET /unfinished");
        assert_eq!(answer, b"");
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
    fn a_head_whose_fields_come_in_pieces_is_framed_by_them() {
        let cut = watched(&[
            b"PUT /b/k HTTP/1.1\r\nHost: s3\r\nContent-Le",
            b"ngth: 29\r",
            b"\n\r\n",
            b"GET /b/in-body#x HTTP/1.1\r\n\r\n",
            b"GET /b/after#y HTTP/1.1\r\n\r\n",
        ]);
        assert!(!cut.take("GET", "/b/in-body"), "a body is not a request");
        assert!(cut.take("GET", "/b/after"));
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
    fn http2_request_heads_are_followed() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([
            (&b":method"[..], &b"PUT"[..]),
            (&b":path"[..], &b"/b/hash#frag"[..]),
        ]);
        let mut frame = vec![0, 0, block.len() as u8, 0x1, 0x4, 0, 0, 0, 1];
        frame.extend_from_slice(&block);
        let (preface, start) = h2_heads::PREFACE.split_at(10);
        let cut = watched(&[preface, start, &frame]);
        assert!(cut.take("PUT", "/b/hash"));
    }
}
