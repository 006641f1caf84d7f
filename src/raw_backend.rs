//! The backend side of the raw HTTP/1.1 path ([`crate::raw_http1`]): plain
//! TCP connections to the backend kept per lane beside hyper's pool, and
//! the backend's answer read as bytes: its head parsed with httparse (RFC
//! 9112 section 2) to learn its framing (section 6.3), its body followed by
//! `Content-Length`, by chunk sizes (section 7.1) or to the connection's
//! end, and passed on unchanged.
//!
//! An answer this path does not pass on as it came (a hop-by-hop field
//! other than a plain `Connection` or `Transfer-Encoding: chunked`, both a
//! length and chunks, an HTTP/1.0 status line, more fields than
//! [`MAX_FIELDS`], `101`) is [`NotTaken::ForHyper`]: the request goes to
//! the hyper path, which sends it again (only GET and HEAD take this path).
//! One hyper's client would refuse as well is [`NotTaken::Invalid`]: it is
//! answered `502` at once, not sent again to be refused.

use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::backend_slots::{BackendSlots, Slot};
use crate::connector::Connector;

/// Most header fields of an answer read here: hyper's own default, parsed
/// into slots on the stack. An answer with more goes the hyper way.
pub const MAX_FIELDS: usize = 100;

/// Idle plain connections to the backend, a part per lane (and one last
/// part for callers off the lanes), each kept with the connector it was
/// opened by: a connection is reused only while the backend is reached the
/// same way.
pub struct RawBackend {
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// `backend.max_connections`, shared with hyper's pool.
    slots: Arc<BackendSlots>,
}

struct Idle {
    stream: RawConnection,
    since: Instant,
    connector: Arc<Connector>,
}

/// A plain connection to the backend, holding its slot under
/// `backend.max_connections` for as long as its socket is open.
pub struct RawConnection {
    stream: TcpStream,
    slot: Slot,
}

impl RawConnection {
    pub fn new(stream: TcpStream, slot: Slot) -> RawConnection {
        RawConnection { stream, slot }
    }

    /// Takes the connection's slot before its socket is closed: for a
    /// connection that failed, whose replacement takes the slot over.
    pub fn take_slot(&mut self) -> Slot {
        std::mem::take(&mut self.slot)
    }
}

impl Deref for RawConnection {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl DerefMut for RawConnection {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl RawBackend {
    /// A pool in a part for each of `lanes` lanes, each connection holding
    /// one of `slots`.
    pub fn new(lanes: usize, slots: Arc<BackendSlots>) -> RawBackend {
        RawBackend {
            idle: (0..=lanes).map(|_| Mutex::default()).collect(),
            slots,
        }
    }

    /// The slots of `backend.max_connections`.
    pub fn slots(&self) -> &BackendSlots {
        &self.slots
    }

    /// The part of the calling lane.
    fn part(&self) -> &Mutex<Vec<Idle>> {
        let off_lanes = self.idle.len() - 1;
        let index = crate::lanes::current()
            .filter(|lane| *lane < off_lanes)
            .unwrap_or(off_lanes);
        &self.idle[index]
    }

    /// An idle connection opened by `connector`, idle for at most
    /// `idle_timeout` and not closed by the backend meanwhile.
    pub fn checkout(
        &self,
        connector: &Arc<Connector>,
        idle_timeout: Duration,
    ) -> Option<RawConnection> {
        let mut idle = self.part().lock().unwrap();
        while let Some(candidate) = idle.pop() {
            let same =
                Arc::ptr_eq(&candidate.connector, connector) || *candidate.connector == **connector;
            if same && candidate.since.elapsed() <= idle_timeout && is_open(&candidate.stream) {
                return Some(candidate.stream);
            }
        }
        None
    }

    /// Keeps `stream` for the next request of this lane, within `max_idle`
    /// (`backend.max_idle_connections`, shared by the lanes); closes it when
    /// the part is full or a request waits for a slot.
    pub fn put_back(&self, stream: RawConnection, connector: Arc<Connector>, max_idle: usize) {
        self.keep(stream, connector, max_idle, usize::MAX);
    }

    /// Keeps an upload's connection only while this lane has no idle one.
    /// Uploads never take from the pool ([`crate::raw_exchange::connect_for_upload`]):
    /// each one kept beside another would idle until `backend.idle_timeout`
    /// (break-it round of 2026-12-04: one client alternating 60 uploads and
    /// GETs held 62 backend connections open, going straight 1).
    pub fn put_back_spare(
        &self,
        stream: RawConnection,
        connector: Arc<Connector>,
        max_idle: usize,
    ) {
        self.keep(stream, connector, max_idle, 1);
    }

    /// Keeps `stream` while this lane's part holds fewer than `at_most`
    /// and its share of `max_idle`.
    fn keep(
        &self,
        stream: RawConnection,
        connector: Arc<Connector>,
        max_idle: usize,
        at_most: usize,
    ) {
        if self.slots.wanted() {
            return;
        }
        let lanes = self.idle.len() - 1;
        let share = (max_idle / lanes.max(1)).max(1);
        let mut idle = self.part().lock().unwrap();
        if idle.len() < share.min(at_most) {
            idle.push(Idle {
                stream,
                since: Instant::now(),
                connector,
            });
        }
    }

    /// Closes the idle connections unused for `idle_timeout`; returns how many.
    pub fn close_expired(&self, idle_timeout: Duration) -> usize {
        let mut closed = 0;
        for part in &self.idle {
            let mut idle = part.lock().unwrap();
            let before = idle.len();
            idle.retain(|idle| idle.since.elapsed() <= idle_timeout);
            closed += before - idle.len();
        }
        closed
    }

    /// Closes up to `count` idle connections, the longest idle first in
    /// each part, giving their slots back; returns how many.
    pub fn shed_idle(&self, count: usize) -> usize {
        let mut shed = 0;
        for part in &self.idle {
            let mut idle = part.lock().unwrap();
            let take = (count - shed).min(idle.len());
            idle.drain(..take);
            shed += take;
        }
        shed
    }
}

/// Whether an idle connection is still open: nothing to read, not even
/// its end (a backend that closed it, or sent bytes unasked, such as a
/// `408` before its idle timeout closes the connection).
///
/// Asked of the socket itself (a peek that does not wait), not of tokio's
/// readiness, which may not know yet of bytes that have just arrived (its
/// event loop learns of them at its next turn) and answers "not ready" to
/// a task that has spent its cooperative budget: unasked bytes read as the
/// answer to another client's request would be that client's answer (a
/// build that asked tokio first took three to ten times as many of them,
/// break-it round of 2026-12-03).
fn is_open(stream: &TcpStream) -> bool {
    use rustix::net::RecvFlags;
    let mut byte = [0u8; 1];
    let peeked = rustix::net::recv(stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT);
    matches!(peeked, Err(rustix::io::Errno::AGAIN))
}

/// How an answer's body is framed (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// None: an answer to HEAD, a `204` or a `304`.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

/// What the proxy needs of an answer head.
#[derive(Debug)]
pub struct AnswerHead {
    /// Its length in bytes, with the empty line that ends it.
    pub length: usize,
    pub status: u16,
    pub framing: BodyFraming,
    /// The backend keeps the connection open after it (no `Connection:
    /// close`, a framed body).
    pub keep_alive: bool,
    /// Where the value of its `x-amz-request-id` is, if it has one.
    pub request_id: Option<std::ops::Range<usize>>,
    /// It has a `Date` field.
    pub dated: bool,
    /// Where its hop-by-hop field lines are (`Keep-Alive`, `TE`, ...), which
    /// are not passed on, as `headers::strip_hop_by_hop` drops them.
    pub dropped: Vec<std::ops::Range<usize>>,
}

impl AnswerHead {
    /// Drops the hop-by-hop field lines from `answer`, which starts with
    /// this head; the head's length after.
    pub fn drop_hop_by_hop(&self, answer: &mut Vec<u8>) -> usize {
        for line in self.dropped.iter().rev() {
            answer.drain(line.clone());
        }
        self.length
            - self
                .dropped
                .iter()
                .map(ExactSizeIterator::len)
                .sum::<usize>()
    }
}

/// An answer head this path does not pass on as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTaken {
    /// One the hyper path passes on changed (or reads with settings of its
    /// own): the request goes there, and is sent again.
    ForHyper,
    /// One hyper's client refuses as well (httparse with hyper's default
    /// settings refuses a line of it, such as an obs-fold or a field line
    /// starting with a space; or two `Content-Length` lines that differ):
    /// the hyper path would send the request again only to answer `502`.
    Invalid,
}

/// What the bytes read so far start with.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A `1xx` other than `101`, this many bytes long: dropped, as hyper's
    /// client drops them for a request that did not ask for them.
    Informational(usize),
    /// The final answer's head.
    Final(AnswerHead),
}

/// Parses the answer head at the start of `bytes`, for a request that was
/// a HEAD or not, of at most `max_fields` fields (`backend.max_headers`):
/// into [`MAX_FIELDS`] slots on the stack, else into as many as allowed.
pub fn parse_answer(
    bytes: &[u8],
    head_request: bool,
    max_fields: usize,
) -> Result<Parsed, NotTaken> {
    // Uninitialised, as hyper's: httparse writes a slot before it is read
    // (setting a hundred slots first cost a sixth of the parse).
    let mut slots = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    match parse_into(bytes, head_request, &mut slots) {
        Err(Refused::Parser(httparse::Error::TooManyHeaders)) if max_fields > MAX_FIELDS => {
            let mut slots = Vec::with_capacity(max_fields);
            slots.resize_with(max_fields, MaybeUninit::uninit);
            parse_into(bytes, head_request, &mut slots).map_err(Refused::not_taken)
        }
        parsed => parsed.map_err(Refused::not_taken),
    }
}

/// Why [`parse_into`] did not take a head.
enum Refused {
    /// httparse refused it.
    Parser(httparse::Error),
    Not(NotTaken),
}

impl Refused {
    fn not_taken(self) -> NotTaken {
        match self {
            // Past this path's slots, within `backend.max_headers`: hyper's
            // limit is its own.
            Refused::Parser(httparse::Error::TooManyHeaders) => NotTaken::ForHyper,
            Refused::Parser(_) => NotTaken::Invalid,
            Refused::Not(not_taken) => not_taken,
        }
    }
}

impl From<NotTaken> for Refused {
    fn from(not_taken: NotTaken) -> Refused {
        Refused::Not(not_taken)
    }
}

/// [`parse_answer`] into `slots`.
fn parse_into<'b>(
    bytes: &'b [u8],
    head_request: bool,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Parsed, Refused> {
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        bytes,
        slots,
    );
    let length = match parsed {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(error) => return Err(Refused::Parser(error)),
    };
    // A `Date` is added before the head's last CRLF: a head ended with
    // bare LFs goes the hyper way.
    if response.version != Some(1) || !bytes[..length].ends_with(b"\r\n\r\n") {
        return Err(NotTaken::ForHyper.into());
    }
    let status = response.code.ok_or(Refused::Not(NotTaken::ForHyper))?;
    match status {
        101 => return Err(NotTaken::ForHyper.into()),
        100..=199 => return Ok(Parsed::Informational(length)),
        _ => {}
    }
    let mut fields = Fields::default();
    for field in response.headers.iter() {
        fields.take(field, bytes)?;
    }
    let framing = if head_request || status == 204 || status == 304 {
        BodyFraming::Empty
    } else if fields.chunked {
        BodyFraming::Chunked
    } else if fields.lengths.refused_by_hyper {
        // hyper's client frames this answer by its length, and refuses it.
        return Err(NotTaken::Invalid.into());
    } else {
        fields
            .lengths
            .plain
            .map_or(BodyFraming::UntilClose, BodyFraming::Length)
    };
    // Lengths hyper reads otherwise, or drops (the answer to a HEAD, a
    // `204`, a `304`, one with chunks).
    if fields.lengths.not_plain || (fields.chunked && fields.lengths.seen) {
        return Err(NotTaken::ForHyper.into());
    }
    Ok(Parsed::Final(AnswerHead {
        length,
        status,
        framing,
        keep_alive: !fields.close && framing != BodyFraming::UntilClose,
        request_id: fields.request_id,
        dated: fields.dated,
        dropped: fields.dropped,
    }))
}

/// What an answer's `Content-Length` lines say.
#[derive(Default)]
struct Lengths {
    seen: bool,
    /// The length every line gives as one plain number.
    plain: Option<u64>,
    /// A line that is not one plain number, or gives another.
    not_plain: bool,
    /// The length as hyper's client reads it: every value of every line
    /// (comma-separated, trimmed) the same number of ASCII digits.
    by_hyper: Option<u64>,
    /// hyper's client refuses the lines (it answers `502` where it frames
    /// the answer by them).
    refused_by_hyper: bool,
}

impl Lengths {
    fn take(&mut self, value: &[u8]) {
        self.seen = true;
        match number(value) {
            Some(length) if self.plain.is_none_or(|earlier| earlier == length) => {
                self.plain = Some(length);
            }
            _ => self.not_plain = true,
        }
        // As hyper's `headers::content_length_parse_all_values`.
        for part in value.split(|&b| b == b',') {
            match number(part.trim_ascii()) {
                Some(length) if self.by_hyper.is_none_or(|earlier| earlier == length) => {
                    self.by_hyper = Some(length);
                }
                _ => self.refused_by_hyper = true,
            }
        }
    }
}

/// `bytes` as a number of ASCII digits alone (no sign, no space), if it
/// fits a `u64`.
fn number(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// What an answer's fields say about its framing and the connection.
#[derive(Default)]
struct Fields {
    lengths: Lengths,
    chunked: bool,
    close: bool,
    dated: bool,
    request_id: Option<std::ops::Range<usize>>,
    dropped: Vec<std::ops::Range<usize>>,
}

/// Where the line of `field` is in `head`, its CRLF included.
fn line_of(field: &httparse::Header<'_>, head: &[u8]) -> Option<std::ops::Range<usize>> {
    let start = field.name.as_ptr() as usize - head.as_ptr() as usize;
    let value_end = field.value.as_ptr() as usize - head.as_ptr() as usize + field.value.len();
    let end = value_end + head[value_end..].iter().position(|&b| b == b'\n')? + 1;
    Some(start..end)
}

impl Fields {
    fn take(&mut self, field: &httparse::Header<'_>, head: &[u8]) -> Result<(), NotTaken> {
        let name = field.name;
        let value = field.value.trim_ascii();
        if name.eq_ignore_ascii_case("content-length") {
            self.lengths.take(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if self.chunked || !value.eq_ignore_ascii_case(b"chunked") {
                return Err(NotTaken::ForHyper);
            }
            self.chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            // Kept as it came when it says only `close` or `keep-alive`, as
            // `headers::strip_hop_by_hop` keeps it.
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Err(NotTaken::ForHyper);
                }
            }
        } else if is_hop_by_hop(name) {
            self.dropped
                .push(line_of(field, head).ok_or(NotTaken::ForHyper)?);
        } else if name.eq_ignore_ascii_case("date") {
            self.dated = true;
        } else if name.eq_ignore_ascii_case("x-amz-request-id") {
            let start = field.value.as_ptr() as usize - head.as_ptr() as usize;
            self.request_id = Some(start..start + field.value.len());
        }
        Ok(())
    }
}

/// The hop-by-hop fields `headers::strip_hop_by_hop` drops, but for
/// `Connection` and `Transfer-Encoding`, which frame the answer (RFC 9110
/// section 7.6.1).
fn is_hop_by_hop(name: &str) -> bool {
    [
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ]
    .iter()
    .any(|hop| name.eq_ignore_ascii_case(hop))
}

/// Where a chunked body is, followed byte by byte as it passes (RFC 9112
/// section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunks {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data: this many bytes to go.
    Data(u64),
    /// At the CRLF after a chunk's data: this many of its bytes to go.
    DataEnd(u8),
    /// In the trailer section.
    Trailers,
    /// The body has ended.
    Done,
}

/// Longest chunk-size or trailer line followed, with its CRLF, however it
/// arrives: a longer one ends the body with an error (hyper refuses such
/// lines too).
const MAX_LINE: usize = 16 << 10;

/// A chunked body that is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunks;

impl Chunks {
    /// Follows `bytes`, the body's next ones: how many of them it takes
    /// (up to the body's end, and short of a line not whole yet).
    pub fn follow(&mut self, bytes: &[u8]) -> Result<usize, BadChunks> {
        let mut at = 0;
        loop {
            let rest = &bytes[at..];
            match *self {
                Chunks::Done => return Ok(at),
                Chunks::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) if used <= MAX_LINE => {
                        at += used;
                        *self = if size == 0 {
                            Chunks::Trailers
                        } else {
                            Chunks::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if rest.len() < MAX_LINE => return Ok(at),
                    // What came before the line is passed on first.
                    _ if at > 0 => return Ok(at),
                    _ => return Err(BadChunks),
                },
                Chunks::Data(left) => {
                    let taken = left.min(rest.len() as u64);
                    if taken == 0 {
                        return Ok(at);
                    }
                    at += taken as usize;
                    *self = match left - taken {
                        0 => Chunks::DataEnd(2),
                        left => Chunks::Data(left),
                    };
                }
                Chunks::DataEnd(left) => {
                    let Some(&byte) = rest.first() else {
                        return Ok(at);
                    };
                    if byte != if left == 2 { b'\r' } else { b'\n' } {
                        return Err(BadChunks);
                    }
                    at += 1;
                    *self = if left == 2 {
                        Chunks::DataEnd(1)
                    } else {
                        Chunks::Size
                    };
                }
                Chunks::Trailers => match rest.windows(2).position(|pair| pair == b"\r\n") {
                    Some(0) => {
                        at += 2;
                        *self = Chunks::Done;
                    }
                    Some(end) if end + 2 <= MAX_LINE => at += end + 2,
                    None if rest.len() < MAX_LINE => return Ok(at),
                    _ if at > 0 => return Ok(at),
                    _ => return Err(BadChunks),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> AnswerHead {
        match parse_answer(bytes, false, MAX_FIELDS) {
            Ok(Parsed::Final(head)) => head,
            other => panic!("not a final head: {other:?}"),
        }
    }

    #[test]
    fn an_answer_is_framed_by_its_length_or_its_chunks_or_its_end() {
        let length = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(length.framing, BodyFraming::Length(5));
        assert!(length.keep_alive);
        let chunked = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(chunked.framing, BodyFraming::Chunked);
        let until_close = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(until_close.framing, BodyFraming::UntilClose);
        assert!(!until_close.keep_alive, "its end is the connection's");
        let closing = head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        assert!(!closing.keep_alive);
    }

    #[test]
    fn an_answer_to_head_has_no_body_whatever_its_length() {
        let parsed = parse_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            true,
            MAX_FIELDS,
        );
        assert!(matches!(
            parsed,
            Ok(Parsed::Final(AnswerHead {
                framing: BodyFraming::Empty,
                ..
            }))
        ));
    }

    #[test]
    fn answers_the_hyper_path_would_change_are_not_taken() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nConnection: x-private\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: abc\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        ] {
            assert_eq!(
                parse_answer(answer, false, MAX_FIELDS).err(),
                Some(NotTaken::ForHyper),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn answers_hypers_client_refuses_are_invalid() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n Leading: space\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert_eq!(
                parse_answer(answer, false, MAX_FIELDS).err(),
                Some(NotTaken::Invalid),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn hop_by_hop_field_lines_are_dropped_as_the_hyper_path_drops_them() {
        let bytes = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nETag: \"x\"\r\nTE:  trailers \r\nContent-Length: 2\r\n\r\nok";
        let answer_head = head(bytes);
        let mut answer = bytes.to_vec();
        let length = answer_head.drop_hop_by_hop(&mut answer);
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            "HTTP/1.1 200 OK\r\nETag: \"x\"\r\nContent-Length: 2\r\n\r\nok"
        );
        assert_eq!(
            length,
            bytes.len() - 2 - "Keep-Alive: timeout=5\r\nTE:  trailers \r\n".len()
        );
    }

    #[test]
    fn an_informational_answer_is_skipped_whole() {
        let bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert!(matches!(
            parse_answer(bytes, false, MAX_FIELDS),
            Ok(Parsed::Informational(25))
        ));
    }

    #[test]
    fn the_request_id_is_found_where_it_is() {
        let bytes = b"HTTP/1.1 200 OK\r\nx-amz-request-id: tx00abc\r\nContent-Length: 0\r\n\r\n";
        let range = head(bytes).request_id.unwrap();
        assert_eq!(&bytes[range], b"tx00abc");
    }

    #[test]
    fn chunks_are_followed_to_the_body_end_across_reads() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut chunks = Chunks::Size;
            let mut carried: Vec<u8> = Vec::new();
            let mut taken = 0;
            for part in [&body[..split], &body[split..]] {
                carried.extend_from_slice(part);
                let used = chunks.follow(&carried).unwrap();
                taken += used;
                carried.drain(..used);
            }
            assert_eq!(chunks, Chunks::Done, "split at {split}");
            assert_eq!(taken, body.len() - 4, "split at {split}");
        }
    }

    #[test]
    fn a_line_over_the_limit_is_refused_however_it_is_split_and_what_came_before_goes_on() {
        let long_trailer = format!("x-tr: {}\r\n", "t".repeat(MAX_LINE));
        let body = format!("3\r\nabc\r\n0\r\n{long_trailer}\r\n");
        let before = "3\r\nabc\r\n0\r\n".len();
        for split in [0, 5, before, before + 10, body.len() - 3, body.len()] {
            let mut chunks = Chunks::Size;
            let mut carried: Vec<u8> = Vec::new();
            let mut taken = 0;
            let mut refused = false;
            for part in [&body.as_bytes()[..split], &body.as_bytes()[split..]] {
                carried.extend_from_slice(part);
                loop {
                    match chunks.follow(&carried) {
                        Ok(0) => break,
                        Ok(used) => {
                            taken += used;
                            carried.drain(..used);
                        }
                        Err(BadChunks) => {
                            refused = true;
                            break;
                        }
                    }
                }
            }
            let at_end = chunks.follow(&carried);
            assert!(refused || at_end.is_err(), "split at {split}");
            assert_eq!(taken, before, "split at {split}");
        }
    }

    #[test]
    fn chunk_data_without_its_crlf_is_refused() {
        let mut chunks = Chunks::Size;
        assert_eq!(chunks.follow(b"3\r\nabcXY"), Err(BadChunks));
    }
}
