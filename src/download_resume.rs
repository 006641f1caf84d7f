//! Resuming a download cut by a backend crash.
//!
//! When the backend dies while a GET's body streams, the client has part of
//! the representation and the response head promised the rest. Instead of
//! aborting the client connection, [`ResumingBody`] asks the backend again
//! (through a [`Refetch`], which the proxy implements: it holds until the
//! backend is back) for the missing bytes with `Range: bytes=<next>-<last>`
//! (RFC 9110 section 14.2) and `If-Match: <ETag of the first response>`
//! (section 13.1.1), checks the answer's `Content-Range` (section 14.4), and
//! continues the same body. Anything but the exact continuation of the same
//! representation (a `412`, another ETag, other positions or length) ends the
//! body with an error, so hyper aborts the client connection as it did
//! before: a spliced body must never look complete.
//!
//! A request is resumable only if adding those two fields keeps its
//! signature valid ([`resumable_request`]): SigV4 covers `host` and the
//! fields listed in `SignedHeaders` (or a presigned URL's
//! `X-Amz-SignedHeaders`), so a request whose own `Range` or `If-Match` is
//! signed cannot be changed; SigV2's string to sign holds neither field.
//! The proxy module builds the plan ([`Download::of`]) from the first
//! response and wraps its body; this module does no I/O of its own and is
//! unit-tested with a scripted [`Refetch`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};

use crate::headers::signed_headers;
use crate::outcome::ResumeOutcome;
use crate::replay::BoxError;

/// Why a download cannot be resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotResumable {
    #[error("not a GET")]
    NotGet,
    #[error("a GET of one part (partNumber) cannot carry a Range")]
    PartNumber,
    #[error("the request's Range is covered by its SigV4 signature")]
    SignedRange,
    #[error("the request's If-Match is covered by its SigV4 signature")]
    SignedIfMatch,
    #[error("the request is signed with a scheme the proxy does not know")]
    UnknownSignature,
    #[error("the response is not 200 or 206")]
    NotADownload,
    #[error("the response has no strong ETag to ask If-Match with")]
    NoStrongEtag,
    #[error("the response has no Content-Length or single-part Content-Range")]
    NoLength,
    #[error("the response body is empty")]
    Empty,
}

impl NotResumable {
    /// True when the request was a download (a GET answered `200` or `206`)
    /// that cannot be resumed: a cut of it counts as `not_resumable`.
    pub fn is_download(self) -> bool {
        !matches!(self, NotResumable::NotGet | NotResumable::NotADownload)
    }
}

/// Why a resume failed; each maps to a [`ResumeOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The object is not the one whose first bytes the client has: `412
    /// Precondition Failed`, or a continuation with another ETag (s3s-fs
    /// ignores `If-Match` on GET).
    #[error("the object changed while the backend was away: {0}")]
    Changed(&'static str),
    /// The continuation is not the exact rest of the representation.
    #[error("the backend's continuation does not fit: {0}")]
    Mismatch(&'static str),
    /// The response was cut more often than `hold.max_replays` allows.
    #[error("the download was cut again and has no resume left")]
    Exhausted,
    /// The hold, the backend or the shutdown ended the resume.
    #[error("the resume failed: {0}")]
    Failed(BoxError),
}

impl ResumeError {
    /// The metric outcome of this failure.
    pub fn outcome(&self) -> ResumeOutcome {
        match self {
            ResumeError::Changed(_) => ResumeOutcome::Changed,
            _ => ResumeOutcome::Failed,
        }
    }
}

/// Whether `Range` and `If-Match` can be added to (or replace those of) this
/// request without breaking its signature: SigV4 (header or presigned) when
/// neither field is signed, SigV2 (its string to sign has neither field), or
/// no signature. A GET of one part (`partNumber`) cannot carry a `Range`.
pub fn resumable_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), NotResumable> {
    if method != Method::GET {
        return Err(NotResumable::NotGet);
    }
    let query = uri.query();
    if query.is_some_and(|q| q.split('&').any(|pair| pair.starts_with("partNumber="))) {
        return Err(NotResumable::PartNumber);
    }
    match signature_scheme(headers, query) {
        Scheme::SigV4 => {
            let signed = signed_headers(headers, query);
            if signed.iter().any(|name| name == "range") {
                Err(NotResumable::SignedRange)
            } else if signed.iter().any(|name| name == "if-match") {
                Err(NotResumable::SignedIfMatch)
            } else {
                Ok(())
            }
        }
        Scheme::SigV2 | Scheme::Anonymous => Ok(()),
        Scheme::Unknown => Err(NotResumable::UnknownSignature),
    }
}

/// How a request is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `AWS4-HMAC-SHA256` or `AWS4-ECDSA-P256-SHA256`, header or presigned.
    SigV4,
    /// `Authorization: AWS <key>:<signature>`, or presigned `Signature=`.
    SigV2,
    Anonymous,
    Unknown,
}

fn signature_scheme(headers: &HeaderMap, query: Option<&str>) -> Scheme {
    if let Some(authorization) = headers.get(header::AUTHORIZATION) {
        let value = authorization.as_bytes();
        return if value.starts_with(b"AWS4-") {
            Scheme::SigV4
        } else if value.starts_with(b"AWS ") {
            Scheme::SigV2
        } else {
            Scheme::Unknown
        };
    }
    let names = || {
        query
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split('=').next())
    };
    if names().any(|name| name.eq_ignore_ascii_case("X-Amz-Signature")) {
        Scheme::SigV4
    } else if names().any(|name| name == "Signature") {
        Scheme::SigV2
    } else {
        Scheme::Anonymous
    }
}

/// One `Content-Range` of a single-part `206` (RFC 9110 section 14.4):
/// `bytes <first>-<last>/<complete>`, positions in bytes of the selected
/// representation, `complete` `None` for `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    pub last: u64,
    pub complete: Option<u64>,
}

impl ContentRange {
    /// Parses `bytes first-last/complete`; `None` for anything else (an
    /// unsatisfied range, another unit, a last before the first).
    pub fn parse(value: &HeaderValue) -> Option<ContentRange> {
        let value = value.to_str().ok()?;
        let (unit, rest) = value.split_once(' ')?;
        if !unit.eq_ignore_ascii_case("bytes") {
            return None;
        }
        let (range, complete) = rest.trim().split_once('/')?;
        let (first, last) = range.split_once('-')?;
        let first: u64 = digits(first)?;
        let last: u64 = digits(last)?;
        let complete = match complete {
            "*" => None,
            length => Some(digits(length)?),
        };
        let fits = first <= last && complete.is_none_or(|c| last < c);
        fits.then_some(ContentRange {
            first,
            last,
            complete,
        })
    }
}

/// A decimal number of ASCII digits only (no sign, no space).
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// What the first response promised: which bytes of which representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// The strong ETag of the representation, as the backend sent it.
    etag: HeaderValue,
    /// The bytes of the representation the body carries, inclusive.
    range: ContentRange,
}

impl Download {
    /// The plan for a response to a resumable request: a `200` with a
    /// `Content-Length`, or a single-part `206`, either with a strong ETag.
    pub fn of(status: StatusCode, headers: &HeaderMap) -> Result<Download, NotResumable> {
        let range = match status {
            StatusCode::OK => {
                let length = content_length(headers).ok_or(NotResumable::NoLength)?;
                if length == 0 {
                    return Err(NotResumable::Empty);
                }
                ContentRange {
                    first: 0,
                    last: length - 1,
                    complete: Some(length),
                }
            }
            StatusCode::PARTIAL_CONTENT => headers
                .get(header::CONTENT_RANGE)
                .and_then(ContentRange::parse)
                .ok_or(NotResumable::NoLength)?,
            _ => return Err(NotResumable::NotADownload),
        };
        let etag = headers
            .get(header::ETAG)
            .filter(|etag| is_strong(etag))
            .cloned()
            .ok_or(NotResumable::NoStrongEtag)?;
        Ok(Download { etag, range })
    }

    /// Bytes the whole body carries.
    pub fn length(&self) -> u64 {
        self.range.last - self.range.first + 1
    }

    /// The fields that ask for the rest once `delivered` body bytes went to
    /// the client: `Range` and `If-Match`.
    pub fn continuation(&self, delivered: u64) -> Continuation {
        let next = self.range.first + delivered;
        let range = format!("bytes={next}-{}", self.range.last);
        Continuation {
            range: HeaderValue::from_str(&range).expect("digits and ASCII"),
            if_match: self.etag.clone(),
            delivered,
        }
    }

    /// Whether `response` is the exact continuation asked for by
    /// `continuation`: a `206` of the same ETag with `Content-Range` from
    /// the next byte to the same last byte of a representation of the same
    /// complete length, and a `Content-Length` (if any) that agrees.
    pub fn check(
        &self,
        continuation: &Continuation,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Result<(), ResumeError> {
        if status == StatusCode::PRECONDITION_FAILED {
            return Err(ResumeError::Changed("412 Precondition Failed"));
        }
        if status != StatusCode::PARTIAL_CONTENT {
            return Err(ResumeError::Mismatch("the status is not 206"));
        }
        match headers.get(header::ETAG) {
            Some(etag) if *etag == self.etag => {}
            Some(_) => return Err(ResumeError::Changed("another ETag")),
            None => return Err(ResumeError::Mismatch("no ETag")),
        }
        let Some(range) = headers
            .get(header::CONTENT_RANGE)
            .and_then(ContentRange::parse)
        else {
            return Err(ResumeError::Mismatch(
                "no single byte range in Content-Range",
            ));
        };
        let next = self.range.first + continuation.delivered;
        if range.first != next || range.last != self.range.last {
            return Err(ResumeError::Mismatch("Content-Range is not the rest"));
        }
        if let (Some(now), Some(before)) = (range.complete, self.range.complete)
            && now != before
        {
            return Err(ResumeError::Changed("another length"));
        }
        match content_length(headers) {
            Some(length) if length != range.last - range.first + 1 => Err(ResumeError::Mismatch(
                "Content-Length disagrees with Content-Range",
            )),
            _ => Ok(()),
        }
    }
}

/// A strong entity tag (RFC 9110 section 8.8.3): `If-Match` compares
/// strongly, so a weak one would never match.
fn is_strong(etag: &HeaderValue) -> bool {
    let value = etag.as_bytes();
    value.len() >= 2 && value.starts_with(b"\"") && value.ends_with(b"\"")
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    digits(headers.get(header::CONTENT_LENGTH)?.to_str().ok()?)
}

/// The two fields a resume request carries in place of the client's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    /// `Range: bytes=<next>-<last>`.
    pub range: HeaderValue,
    /// `If-Match: <ETag of the first response>`.
    pub if_match: HeaderValue,
    /// Body bytes the client already has.
    pub delivered: u64,
}

impl Continuation {
    /// Sets `Range` and `If-Match` on a copy of the request's fields.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(header::RANGE, self.range.clone());
        headers.insert(header::IF_MATCH, self.if_match.clone());
    }
}

/// How a [`ResumingBody`] gets the rest of a download: the proxy holds while
/// the backend is down, sends the request with the continuation's fields,
/// and answers with a response that passed [`Download::check`].
pub trait Refetch: Send + Sync + 'static {
    type Body: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;

    /// Asks for the rest (holding while the backend is down).
    fn refetch(
        &self,
        continuation: Continuation,
    ) -> BoxFuture<'static, Result<Self::Body, ResumeError>>;

    /// How one cut ended (for the metric).
    fn outcome(&self, outcome: ResumeOutcome);
}

/// The resumes of one response so far, shared with its request log line:
/// how many, and how long they were held (which counts against the
/// request's `hold.timeout` with the time it was held before its answer).
#[derive(Debug, Clone, Default)]
pub struct Resumes(Arc<ResumesInner>);

#[derive(Debug, Default)]
struct ResumesInner {
    count: AtomicU32,
    /// Microseconds held while resuming.
    held_us: AtomicU64,
}

impl Resumes {
    /// Cuts resumed.
    pub fn count(&self) -> u32 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// Time held while resuming.
    pub fn held(&self) -> Duration {
        Duration::from_micros(self.0.held_us.load(Ordering::Relaxed))
    }

    /// Adds time held while resuming.
    pub fn add_held(&self, held: Duration) {
        let micros = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        self.0.held_us.fetch_add(micros, Ordering::Relaxed);
    }

    fn add_one(&self) {
        self.0.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// A download's body that continues across backend crashes.
pub struct ResumingBody<R: Refetch> {
    state: State<R::Body>,
    download: Download,
    /// Body bytes handed on to the client so far.
    delivered: u64,
    /// Cuts this body may still resume (`hold.max_replays`).
    resumes_left: u32,
    refetch: R,
    resumes: Resumes,
}

enum State<B> {
    Streaming(Pin<Box<B>>),
    Refetching(BoxFuture<'static, Result<B, ResumeError>>),
    Failed,
}

impl<R: Refetch> ResumingBody<R> {
    /// Wraps the first response's `body`; at most `max_resumes` cuts are resumed.
    pub fn new(
        body: R::Body,
        download: Download,
        max_resumes: u32,
        refetch: R,
        resumes: Resumes,
    ) -> Self {
        ResumingBody {
            state: State::Streaming(Box::pin(body)),
            download,
            delivered: 0,
            resumes_left: max_resumes,
            refetch,
            resumes,
        }
    }

    fn remaining(&self) -> u64 {
        self.download.length().saturating_sub(self.delivered)
    }

    /// A cut stream: ask for the rest, or fail if no resume is left.
    fn cut(&mut self, error: BoxError) -> Result<(), ResumeError> {
        if self.resumes_left == 0 {
            tracing::warn!(%error, delivered = self.delivered, "download cut again, no resume left");
            return Err(ResumeError::Exhausted);
        }
        self.resumes_left -= 1;
        tracing::warn!(%error, delivered = self.delivered, remaining = self.remaining(), "download cut; resuming it once the backend serves");
        let continuation = self.download.continuation(self.delivered);
        self.state = State::Refetching(self.refetch.refetch(continuation));
        Ok(())
    }

    /// Data from the backend: counted, and never more than promised.
    fn pass(&mut self, frame: Frame<Bytes>) -> Result<Frame<Bytes>, ResumeError> {
        if let Some(data) = frame.data_ref() {
            let length = data.len() as u64;
            if length > self.remaining() {
                return Err(ResumeError::Mismatch("more bytes than the length"));
            }
            self.delivered += length;
        }
        Ok(frame)
    }

    /// Ends the body with `error`, reporting its outcome.
    fn fail(&mut self, error: ResumeError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.refetch.outcome(error.outcome());
        self.state = State::Failed;
        Poll::Ready(Some(Err(error.into())))
    }
}

// Nothing of `R` is ever pinned: the body is moved freely.
impl<R: Refetch> Unpin for ResumingBody<R> {}

impl<R: Refetch> Body for ResumingBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Failed => return Poll::Ready(None),
                State::Refetching(rest) => match rest.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(error)) => return this.fail(error),
                    Poll::Ready(Ok(body)) => {
                        this.resumes.add_one();
                        this.refetch.outcome(ResumeOutcome::Resumed);
                        tracing::info!(
                            delivered = this.delivered,
                            remaining = this.remaining(),
                            "download resumed"
                        );
                        this.state = State::Streaming(Box::pin(body));
                    }
                },
                State::Streaming(body) => match body.as_mut().poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        return match this.pass(frame) {
                            Ok(frame) => Poll::Ready(Some(Ok(frame))),
                            Err(error) => this.fail(error),
                        };
                    }
                    // Every promised byte went out: the client has it all.
                    Poll::Ready(Some(Err(_))) if this.remaining() == 0 => {
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Some(Err(error))) => {
                        if let Err(error) = this.cut(error.into()) {
                            return this.fail(error);
                        }
                    }
                    Poll::Ready(None) if this.remaining() > 0 => {
                        return this.fail(ResumeError::Mismatch("the body ended early"));
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Streaming(body) => self.remaining() == 0 && body.is_end_stream(),
            State::Refetching(_) => false,
            State::Failed => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining())
    }
}

/// The plan to resume the response to a request, or why it cannot be.
pub fn plan(
    method: &Method,
    uri: &Uri,
    request_headers: &HeaderMap,
    status: StatusCode,
    response_headers: &HeaderMap,
) -> Result<Download, NotResumable> {
    if !matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
        return Err(NotResumable::NotADownload);
    }
    resumable_request(method, uri, request_headers)?;
    Download::of(status, response_headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Mutex;

    use futures_util::stream;
    use http_body_util::{BodyExt, StreamBody};

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn get(uri: &str, fields: &[(&str, &str)]) -> Result<(), NotResumable> {
        resumable_request(&Method::GET, &uri.parse().unwrap(), &headers(fields))
    }

    const SIGV4: &str = "AWS4-HMAC-SHA256 Credential=a/20260101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=0";

    #[test]
    fn a_sigv4_get_is_resumable_unless_its_range_or_if_match_is_signed() {
        assert_eq!(get("/b/k", &[("authorization", SIGV4)]), Ok(()));
        // An unsigned Range of the client's own is replaced, not signed.
        assert_eq!(
            get("/b/k", &[("authorization", SIGV4), ("range", "bytes=0-9")]),
            Ok(())
        );
        let range = SIGV4.replace("host;", "host;range;");
        assert_eq!(
            get("/b/k", &[("authorization", &range)]),
            Err(NotResumable::SignedRange)
        );
        let if_match = SIGV4.replace("host;", "host;if-match;");
        assert_eq!(
            get("/b/k", &[("authorization", &if_match)]),
            Err(NotResumable::SignedIfMatch)
        );
    }

    #[test]
    fn a_presigned_urls_signed_headers_decide_too() {
        let plain =
            "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-SignedHeaders=host&X-Amz-Signature=0";
        assert_eq!(get(plain, &[("range", "bytes=5-")]), Ok(()));
        let ranged = "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-SignedHeaders=host%3Brange&X-Amz-Signature=0";
        assert_eq!(get(ranged, &[]), Err(NotResumable::SignedRange));
    }

    #[test]
    fn sigv2_and_anonymous_gets_are_resumable_other_schemes_and_parts_not() {
        assert_eq!(get("/b/k", &[("authorization", "AWS key:c2ln")]), Ok(()));
        assert_eq!(
            get("/b/k?AWSAccessKeyId=key&Expires=1&Signature=c2ln", &[]),
            Ok(())
        );
        assert_eq!(get("/b/k", &[]), Ok(()));
        assert_eq!(
            get("/b/k", &[("authorization", "Bearer token")]),
            Err(NotResumable::UnknownSignature)
        );
        assert_eq!(get("/b/k?partNumber=2", &[]), Err(NotResumable::PartNumber));
        let put = resumable_request(&Method::PUT, &"/b/k".parse().unwrap(), &HeaderMap::new());
        assert_eq!(put, Err(NotResumable::NotGet));
    }

    #[test]
    fn content_range_takes_one_satisfied_byte_range_only() {
        let parse = |text: &str| ContentRange::parse(&HeaderValue::from_str(text).unwrap());
        let range = |first, last, complete| {
            Some(ContentRange {
                first,
                last,
                complete,
            })
        };
        assert_eq!(parse("bytes 0-9/10"), range(0, 9, Some(10)));
        assert_eq!(parse("bytes 5-9/*"), range(5, 9, None));
        for refused in [
            "bytes */10",
            "bytes 9-5/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes +1-2/3",
            "bytes 1-2",
        ] {
            assert_eq!(parse(refused), None, "{refused}");
        }
    }

    fn download(status: u16, fields: &[(&str, &str)]) -> Result<Download, NotResumable> {
        Download::of(StatusCode::from_u16(status).unwrap(), &headers(fields))
    }

    #[test]
    fn a_download_needs_a_strong_etag_and_a_known_length() {
        let whole = download(200, &[("content-length", "100"), ("etag", "\"e\"")]).unwrap();
        assert_eq!(whole.length(), 100);
        let part = download(
            206,
            &[("content-range", "bytes 10-59/100"), ("etag", "\"e\"")],
        );
        assert_eq!(part.unwrap().length(), 50);
        let weak = download(200, &[("content-length", "100"), ("etag", "W/\"e\"")]);
        assert_eq!(weak, Err(NotResumable::NoStrongEtag));
        let none = download(200, &[("content-length", "100")]);
        assert_eq!(none, Err(NotResumable::NoStrongEtag));
        let chunked = download(200, &[("etag", "\"e\"")]);
        assert_eq!(chunked, Err(NotResumable::NoLength));
        let multipart = download(
            206,
            &[
                ("content-type", "multipart/byteranges; boundary=x"),
                ("etag", "\"e\""),
            ],
        );
        assert_eq!(multipart, Err(NotResumable::NoLength));
        let empty = download(200, &[("content-length", "0"), ("etag", "\"e\"")]);
        assert_eq!(empty, Err(NotResumable::Empty));
    }

    #[test]
    fn the_continuation_starts_after_what_was_delivered_offset_by_the_clients_range() {
        let whole = download(200, &[("content-length", "100"), ("etag", "\"e\"")]).unwrap();
        let rest = whole.continuation(40);
        assert_eq!(rest.range, "bytes=40-99");
        assert_eq!(rest.if_match, "\"e\"");
        let part = download(
            206,
            &[("content-range", "bytes 10-59/100"), ("etag", "\"e\"")],
        );
        assert_eq!(part.unwrap().continuation(5).range, "bytes=15-59");
    }

    #[test]
    fn only_the_exact_rest_of_the_same_object_is_accepted() {
        let whole = download(200, &[("content-length", "100"), ("etag", "\"e\"")]).unwrap();
        let rest = whole.continuation(40);
        let check = |status: u16, fields: &[(&str, &str)]| {
            whole.check(
                &rest,
                StatusCode::from_u16(status).unwrap(),
                &headers(fields),
            )
        };
        let exact = [
            ("content-range", "bytes 40-99/100"),
            ("content-length", "60"),
            ("etag", "\"e\""),
        ];
        assert!(check(206, &exact).is_ok());
        assert!(matches!(check(412, &[]), Err(ResumeError::Changed(_))));
        let other_etag = [("content-range", "bytes 40-99/100"), ("etag", "\"f\"")];
        assert!(matches!(
            check(206, &other_etag),
            Err(ResumeError::Changed(_))
        ));
        let longer = [("content-range", "bytes 40-99/120"), ("etag", "\"e\"")];
        assert!(matches!(check(206, &longer), Err(ResumeError::Changed(_))));
        let elsewhere = [("content-range", "bytes 41-99/100"), ("etag", "\"e\"")];
        assert!(matches!(
            check(206, &elsewhere),
            Err(ResumeError::Mismatch(_))
        ));
        let short = [("content-range", "bytes 40-98/100"), ("etag", "\"e\"")];
        assert!(matches!(check(206, &short), Err(ResumeError::Mismatch(_))));
        let bad_length = [
            ("content-range", "bytes 40-99/100"),
            ("content-length", "59"),
            ("etag", "\"e\""),
        ];
        assert!(matches!(
            check(206, &bad_length),
            Err(ResumeError::Mismatch(_))
        ));
        assert!(matches!(
            check(200, &exact[2..]),
            Err(ResumeError::Mismatch(_))
        ));
        assert!(matches!(
            check(206, &exact[..2]),
            Err(ResumeError::Mismatch(_))
        ));
    }

    type Chunks = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, io::Error>>>>;

    /// A backend body: `data` in chunks, then a cut if `cut`.
    fn chunks(data: &[&'static [u8]], cut: bool) -> Chunks {
        let mut frames: Vec<Result<Frame<Bytes>, io::Error>> = data
            .iter()
            .map(|d| Ok(Frame::data(Bytes::from_static(d))))
            .collect();
        if cut {
            frames.push(Err(io::Error::from(io::ErrorKind::ConnectionReset)));
        }
        StreamBody::new(stream::iter(frames))
    }

    /// Answers each refetch with the next scripted result; records what it
    /// was asked and the outcomes.
    #[derive(Default, Clone)]
    struct Script {
        answers: Arc<Mutex<Vec<Result<Chunks, ResumeError>>>>,
        asked: Arc<Mutex<Vec<Continuation>>>,
        outcomes: Arc<Mutex<Vec<ResumeOutcome>>>,
    }

    impl Refetch for Script {
        type Body = Chunks;

        fn refetch(
            &self,
            continuation: Continuation,
        ) -> BoxFuture<'static, Result<Chunks, ResumeError>> {
            self.asked.lock().unwrap().push(continuation);
            let answer = self.answers.lock().unwrap().remove(0);
            Box::pin(async move { answer })
        }

        fn outcome(&self, outcome: ResumeOutcome) {
            self.outcomes.lock().unwrap().push(outcome);
        }
    }

    fn ten_bytes() -> Download {
        download(200, &[("content-length", "10"), ("etag", "\"e\"")]).unwrap()
    }

    async fn collect(
        first: Chunks,
        answers: Vec<Result<Chunks, ResumeError>>,
        max_resumes: u32,
    ) -> (Result<Bytes, BoxError>, Script, Resumes) {
        let script = Script::default();
        *script.answers.lock().unwrap() = answers;
        let resumes = Resumes::default();
        let body = ResumingBody::new(
            first,
            ten_bytes(),
            max_resumes,
            script.clone(),
            resumes.clone(),
        );
        let collected = body.collect().await.map(|c| c.to_bytes());
        (collected, script, resumes)
    }

    #[tokio::test]
    async fn a_cut_body_goes_on_with_the_rest() {
        let first = chunks(&[b"0123"], true);
        let rest = vec![Ok(chunks(&[b"456", b"789"], false))];
        let (collected, script, resumes) = collect(first, rest, 1).await;
        assert_eq!(collected.unwrap(), &b"0123456789"[..]);
        assert_eq!(script.asked.lock().unwrap()[0].range, "bytes=4-9");
        assert_eq!(*script.outcomes.lock().unwrap(), [ResumeOutcome::Resumed]);
        assert_eq!(resumes.count(), 1);
    }

    #[tokio::test]
    async fn a_body_cut_more_often_than_allowed_fails() {
        let first = chunks(&[b"0123"], true);
        let rest = vec![Ok(chunks(&[b"45"], true))];
        let (collected, script, resumes) = collect(first, rest, 1).await;
        assert!(collected.is_err());
        assert_eq!(
            *script.outcomes.lock().unwrap(),
            [ResumeOutcome::Resumed, ResumeOutcome::Failed]
        );
        assert_eq!(resumes.count(), 1);
    }

    #[tokio::test]
    async fn a_changed_object_fails_the_body() {
        let first = chunks(&[b"0123"], true);
        let (collected, script, _) =
            collect(first, vec![Err(ResumeError::Changed("412"))], 1).await;
        assert!(collected.is_err());
        assert_eq!(*script.outcomes.lock().unwrap(), [ResumeOutcome::Changed]);
    }

    #[tokio::test]
    async fn more_bytes_than_promised_or_an_early_end_fail_the_body() {
        let first = chunks(&[b"0123"], true);
        let (too_long, _, _) = collect(first, vec![Ok(chunks(&[b"4567890"], false))], 1).await;
        assert!(too_long.is_err());
        let first = chunks(&[b"0123"], true);
        let (too_short, _, _) = collect(first, vec![Ok(chunks(&[b"45"], false))], 1).await;
        assert!(too_short.is_err());
    }

    #[tokio::test]
    async fn a_cut_after_the_last_byte_ends_the_body_as_complete() {
        let (collected, script, _) = collect(chunks(&[b"0123456789"], true), vec![], 1).await;
        assert_eq!(collected.unwrap(), &b"0123456789"[..]);
        assert!(script.asked.lock().unwrap().is_empty());
    }
}
