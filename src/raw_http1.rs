//! The raw HTTP/1.1 path (`listener.raw_http1`): plain GET and HEAD
//! requests forwarded as the bytes that came, without hyper, while the
//! backend is up; and large uploads, their bodies spliced ([`upload`]).
//!
//! hyper parses every request into a `Request`, every answer into a
//! `Response`, and writes both out again; on a small request that is most
//! of the proxy's CPU (`benches/small_requests.sh`: the hyper floor alone
//! costs 1.1-1.4x HAProxy's CPU per request, a floor that forwards heads as
//! bytes 0.7-0.8x). This path serves a request head that needs nothing of
//! what the hyper path does for it: its bytes go to the backend with the
//! forwarding headers appended as `headers::add_forwarded` would add them,
//! and the answer's bytes come back unchanged (names, case, order and
//! framing as the backend sent them, as direct access gives), with `Date`
//! added to an answer without one, as hyper adds it.
//!
//! It serves the raw rounds of a plain-TCP connection
//! ([`crate::round_kind::RoundKind::Raw`], [`crate::keep_alive`]): the
//! connection's watch starts one at a head [`crate::raw_head::is_raw`] takes
//! (`GET` or `HEAD`, HTTP/1.1, a plain origin-form target, no body, no
//! `Expect`, no hop-by-hop field but `Connection: keep-alive`, no
//! forwarding header of its own, at most [`COMMON_FIELDS`] fields) and ends
//! it at the first head it does not. A request is served here while the
//! gate admits at once, it is neither a suspect nor quarantined
//! ([`crate::quarantine`]), no crash suspect is due, the proxy is not
//! draining and the backend is plain TCP. Any other
//! request, and any failure before a byte of the answer reached the client,
//! goes to a hyper round with every byte read (a GET or HEAD may then reach
//! the backend twice: the hyper path sends it again, and sees the outage,
//! holds, replays as always). A late answer is watched as on the hyper
//! path ([`crate::raw_exchange`]); a download cut by a crash is resumed
//! ([`crate::raw_resume`]); a body that breaks otherwise ends the client
//! connection, as hyper's does.
//!
//! Per request it keeps what the hyper path keeps: the connection's
//! requests in progress, the proxy's in-flight count (drain), the gate told
//! the backend answered, `Metrics::request` and the request line.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::{HeaderValue, Method};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access_log::{RequestId, RequestLine};
use crate::backend_slots::Slot;
use crate::download_resume::NotResumable;
use crate::outcome::RequestOutcome;
use crate::outcome::ResumeOutcome;
use crate::peer::{Peer, RequestInProgress};
use crate::proxy::Proxy;
use crate::quarantine::Fingerprint;
use crate::raw_backend::{AnswerHead, BodyFraming, Chunks, RawConnection};
use crate::raw_exchange::{Patience, Unanswered, exchange};
use crate::raw_head::RawUpload;
use crate::raw_resume::RawDownload;
use crate::request_target::TargetWatch;
use crate::round_kind::COMMON_FIELDS;
use crate::s3_error::ProxyError;
use crate::shutdown::{Phase, ShutdownWatch};
use crate::splice::{Pipes, SpliceEnd, Spliced};

mod upload;

/// Bytes of an answer gathered before its first write: a small answer
/// goes to the client in one write, head and body.
const GATHERED: usize = 16 << 10;
/// Largest read of a streamed answer body, kept per connection while it
/// streams (reads of 256 KiB moved a 2 GiB GET for no less CPU than reads of
/// 32 KiB, `benches/large_objects.sh`, 2026-12-02).
const STREAM_READ: usize = 64 << 10;

/// A connection's one wait for a step of the shutdown (the end of the drain,
/// [`Phase::Closing`]; the end of the grace, [`Proxy::grace_over`]), polled
/// by each of its requests in turn ([`crate::shutdown::reached`]).
type ShutdownStep<'c> = std::pin::Pin<&'c mut (dyn Future<Output = ()> + Send + 'c)>;

/// When the head [`RawPath::read_head`] waits for is due.
struct HeadDue<'t> {
    /// `listener.header_timeout` from the last answer (or the first byte).
    head_due: Instant,
    /// How long the connection may wait for a head before it rests.
    rest_grace: Option<Duration>,
    /// The connection's timer, set to the earlier of the two.
    timer: std::pin::Pin<&'t mut tokio::time::Sleep>,
}

/// The raw path of one client connection.
pub struct RawPath {
    proxy: Arc<Proxy>,
    peer: Arc<Peer>,
    scheme: &'static str,
    /// `listener.header_timeout`: how long the next head may take.
    header_timeout: Duration,
    /// `listener.max_head_bytes`.
    max_head_bytes: usize,
    /// `listener.send_timeout`: how long the client may take no byte of an
    /// answer.
    send_timeout: Duration,
    /// The pipes large bodies are spliced through.
    pipes: Arc<Pipes>,
}

/// How the raw path left a connection.
pub enum RawEnd {
    /// For a hyper round, with the bytes read and not served.
    HandOver(Bytes),
    /// For a hyper round of the kind the watch holds a head for
    /// ([`TargetWatch::switch_pending`]), with the bytes read before it.
    Switch(Bytes),
    /// It rested (its rest grace passed with nothing read): nothing is kept.
    Rested,
    /// It is over: shut it down.
    Over,
}

/// What reading the next request head came to.
enum HeadRead {
    /// A head this path takes.
    Taken(RawRequest),
    /// Something else: the hyper path's.
    HandOver,
    Switch,
    Rest,
    Over,
}

/// A request head this path takes, read off its bytes.
struct RawRequest {
    /// Its length, with the empty line that ends it.
    length: usize,
    method: Method,
    /// For an upload (`PUT`), its body ([`upload`]).
    upload: Option<RawUpload>,
    /// Where its target is in the head.
    target: std::ops::Range<usize>,
    /// The forwarding headers to append (`X-Forwarded-For`, `-Proto`).
    forwarding: (bool, bool),
}

/// How forwarding one request went.
enum Forwarded {
    /// Answered; the connection may serve the next one.
    KeepAlive,
    /// Answered or broken after the client had bytes: the connection ends.
    Close,
    /// Nothing reached the client: the hyper path's.
    NotSent,
}

impl RawPath {
    pub fn new(
        proxy: Arc<Proxy>,
        peer: Arc<Peer>,
        scheme: &'static str,
        header_timeout: Duration,
        max_head_bytes: usize,
        send_timeout: Duration,
        pipes: Arc<Pipes>,
    ) -> RawPath {
        RawPath {
            proxy,
            peer,
            scheme,
            header_timeout,
            max_head_bytes,
            send_timeout,
            pipes,
        }
    }

    /// Serves the requests this path takes from `io`, `ahead` being bytes
    /// already read from it, the first head due by `head_due`; rests after
    /// `rest_grace` with nothing read, when it may rest (plain TCP:
    /// `keep_alive::REST_GRACE`).
    pub async fn serve<I>(
        &self,
        io: &mut TargetWatch<I>,
        ahead: Bytes,
        mut head_due: Instant,
        rest_grace: Option<Duration>,
        shutdown: &mut ShutdownWatch,
    ) -> RawEnd
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buffer = BytesMut::from(ahead);
        // One timer for every head this connection waits for, moved later
        // at each: tokio moves a later deadline without touching its timer
        // wheel, where a new timer per request was inserted and removed,
        // and woke the lane's own event loop (an eventfd write) whenever
        // the wheel held no earlier deadline.
        let mut head_timer = std::pin::pin!(tokio::time::sleep_until(head_due));
        // And one for every answer it waits for (`raw_exchange::watched`).
        let mut answer_timer = std::pin::pin!(tokio::time::sleep_until(head_due));
        // One wait for the end of the drain (an idle connection closes)
        // and one for the end of the grace (a request in flight is cut),
        // each on a watch of its own: a wait per request put a waiter on
        // the shutdown watch's list and took it off again, under its lock
        // (about 2 % of the CPU per small request, perf).
        let mut closing = std::pin::pin!(crate::shutdown::reached(shutdown.clone(), |phase| {
            *phase == Phase::Closing
        }));
        let mut grace_over = std::pin::pin!(self.proxy.grace_over());
        loop {
            let request = match self
                .read_head(
                    io,
                    &mut buffer,
                    HeadDue {
                        head_due,
                        rest_grace,
                        timer: head_timer.as_mut(),
                    },
                    closing.as_mut(),
                )
                .await
            {
                HeadRead::Taken(request) => request,
                HeadRead::HandOver => return RawEnd::HandOver(buffer.freeze()),
                HeadRead::Switch => return RawEnd::Switch(buffer.freeze()),
                HeadRead::Rest => return RawEnd::Rested,
                HeadRead::Over => return RawEnd::Over,
            };
            if *shutdown.borrow() != Phase::Serving {
                // Draining: the hyper path answers with `Connection: close`.
                return RawEnd::HandOver(buffer.freeze());
            }
            let forwarded = match request.upload {
                // Takes the head and body from `buffer` once it sends the body.
                Some(upload) => {
                    self.upload(
                        io,
                        &mut buffer,
                        (&request, upload),
                        (shutdown, grace_over.as_mut()),
                        answer_timer.as_mut(),
                    )
                    .await
                }
                None => {
                    self.forward(
                        io,
                        &buffer[..request.length],
                        &request,
                        (shutdown, grace_over.as_mut()),
                        answer_timer.as_mut(),
                    )
                    .await
                }
            };
            match forwarded {
                Forwarded::KeepAlive => {
                    if request.upload.is_none() {
                        buffer.advance(request.length);
                    }
                    head_due = Instant::now() + self.header_timeout;
                }
                Forwarded::Close => return RawEnd::Over,
                Forwarded::NotSent => return RawEnd::HandOver(buffer.freeze()),
            }
        }
    }

    /// Reads until `buffer` starts with a whole head, and says whether this
    /// path takes it.
    async fn read_head<I>(
        &self,
        io: &mut TargetWatch<I>,
        buffer: &mut BytesMut,
        due: HeadDue<'_>,
        mut closing: ShutdownStep<'_>,
    ) -> HeadRead
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let HeadDue {
            head_due,
            rest_grace,
            mut timer,
        } = due;
        let rest_due = rest_grace.map(|grace| Instant::now() + grace);
        let switch = io.switch_signal();
        loop {
            if !buffer.is_empty() {
                match self.parse_request(buffer) {
                    Some(Some(request)) => return HeadRead::Taken(request),
                    Some(None) if buffer.len() < self.max_head_bytes => {}
                    _ => return HeadRead::HandOver,
                }
            }
            let rest_due = rest_due.filter(|due| buffer.is_empty() && *due < head_due);
            let resting = rest_due.is_some();
            timer.as_mut().reset(rest_due.unwrap_or(head_due));
            if buffer.capacity() - buffer.len() < 1024 {
                buffer.reserve(4096);
            }
            let switch_due = || {
                switch
                    .as_ref()
                    .is_some_and(|due| due.load(std::sync::atomic::Ordering::Relaxed))
            };
            let read = {
                let mut read = std::pin::pin!(io.read_buf(buffer));
                // The watch holds a head for a round of its own: nothing
                // more comes this way.
                let read = std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
                    std::task::Poll::Pending if switch_due() => std::task::Poll::Ready(None),
                    polled => polled.map(Some),
                });
                tokio::select! {
                    read = read => read,
                    () = timer.as_mut() => {
                        return if resting { HeadRead::Rest } else { HeadRead::HandOver };
                    }
                    () = closing.as_mut() => {
                        return HeadRead::Over;
                    }
                }
            };
            match read {
                None => return HeadRead::Switch,
                // The client closed, or the watch refused what came: the
                // hyper path ends the connection as it does now.
                Some(Ok(0)) => return HeadRead::HandOver,
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::debug!(%error, client = %self.peer.address, "client connection ended with an error");
                    return HeadRead::Over;
                }
            }
        }
    }

    /// The head at the start of `bytes`: `Some(Some(_))` taken,
    /// `Some(None)` not whole yet, `None` for the hyper path.
    fn parse_request(&self, bytes: &[u8]) -> Option<Option<RawRequest>> {
        // Uninitialised, as hyper's: httparse writes a slot before it is read.
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; COMMON_FIELDS];
        let mut head = httparse::Request::new(&mut []);
        let length = match head.parse_with_uninit_headers(bytes, &mut slots).ok()? {
            httparse::Status::Complete(length) => length,
            httparse::Status::Partial => return Some(None),
        };
        // The forwarding lines go before the head's last CRLF: a head ended
        // with bare LFs goes the hyper way.
        if !bytes[..length].ends_with(b"\r\n\r\n") {
            return None;
        }
        let settings = self.proxy.settings();
        let (method, upload) = if crate::raw_head::is_raw(&head) {
            match head.method? {
                "HEAD" => (Method::HEAD, None),
                _ => (Method::GET, None),
            }
        } else {
            let upload = crate::raw_head::raw_upload(&head)?;
            (upload::takes(&upload, &settings)).then_some((Method::PUT, Some(upload)))?
        };
        let path = head.path?;
        let start = path.as_ptr() as usize - bytes.as_ptr() as usize;
        let query = path.split_once('?').map(|(_, query)| query);
        let forwarding =
            crate::headers::forwarding_lines(head.headers, query, &settings.forwarding);
        Some(Some(RawRequest {
            length,
            method,
            upload,
            target: start..start + path.len(),
            forwarding,
        }))
    }

    /// Sends the request whose head is `head` and passes its answer on.
    async fn forward<I>(
        &self,
        io: &mut TargetWatch<I>,
        head: &[u8],
        request: &RawRequest,
        (shutdown, grace_over): (&ShutdownWatch, ShutdownStep<'_>),
        answer_timer: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Forwarded
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let started = std::time::Instant::now();
        let proxy = &self.proxy;
        let connector = proxy.backend_connector();
        if !connector.is_plain() || proxy.gate().suspects_due() || self.watched(head, request) {
            return Forwarded::NotSent;
        }
        let Some(mut admission) = proxy.gate().admit_at_once() else {
            return Forwarded::NotSent;
        };
        let in_progress = RequestInProgress::start(&self.peer);
        let in_flight = proxy.in_flight().enter();
        let outbound = self.outbound(head, request);
        let mut answer = Vec::with_capacity(GATHERED);
        let head_request = request.method == Method::HEAD;
        let patience = Patience::now(proxy);
        let generation = proxy.gate().generation();
        let exchanged = exchange(
            proxy,
            &connector,
            &outbound,
            &mut answer,
            head_request,
            patience,
            answer_timer,
        );
        let exchanged = tokio::select! {
            exchanged = exchanged => exchanged,
            // The shutdown grace is over with no answer yet: the connection
            // is closed with none, as the hyper path closes it (before the
            // grace, past the drain, a request in flight is waited for).
            () = grace_over => {
                let mut line = Line::new(request, head, started);
                line.status = 499;
                line.outcome = RequestOutcome::ShuttingDown;
                self.log(&line, &RequestId::from_backend(None));
                return Forwarded::Close;
            }
        };
        let (mut backend, answer_head) = match exchanged {
            Ok(exchanged) => exchanged,
            Err(Unanswered::Slow) => {
                let line = Line::new(request, head, started);
                return self.answer_error(io, line, ProxyError::SlowBackend).await;
            }
            Err(Unanswered::Invalid) => {
                let line = Line::new(request, head, started);
                return self.answer_error(io, line, ProxyError::BadGateway).await;
            }
            // With every slot of `backend.max_connections` taken, the
            // request goes the hyper way, which waits for one.
            Err(Unanswered::Failed | Unanswered::Busy) => return Forwarded::NotSent,
            Err(Unanswered::Cut | Unanswered::Hung) => {
                if let Some(fingerprint) = fingerprint(head, request) {
                    proxy.raw_request_cut(&fingerprint, generation).await;
                }
                return Forwarded::NotSent;
            }
        };
        admission.settle();
        proxy.gate().backend_answered();
        // Counted before the client can see the answer.
        proxy.metrics().raw_request();
        let request_id = match answer_head.request_id.clone() {
            Some(range) => {
                RequestId::from_backend(HeaderValue::from_bytes(&answer[range]).ok().as_ref())
            }
            None => RequestId::from_backend(None),
        };
        let mut download = Download::Unplanned(outbound);
        // An answer given while the proxy drains says `Connection: close`,
        // as the hyper path's do, and the connection ends after it.
        let draining = *shutdown.borrow() != Phase::Serving;
        let passed = self
            .pass_on(
                io,
                (&mut backend, &answer_head),
                &mut answer,
                draining,
                &mut download,
            )
            .await;
        let (bytes_out, reusable, outcome) = match passed {
            Passed::Whole { bytes, reusable } => (bytes, reusable, RequestOutcome::Ok),
            Passed::Broken { bytes, outcome } => (bytes, false, outcome),
            Passed::NotSent => return Forwarded::NotSent,
        };
        let keep_alive = outcome == RequestOutcome::Ok && answer_head.keep_alive;
        if keep_alive && reusable {
            let max_idle = patience.max_idle;
            proxy.raw_backend().put_back(backend, connector, max_idle);
        }
        drop(in_flight);
        drop(in_progress);
        let mut line = Line::new(request, head, started);
        line.status = answer_head.status;
        line.bytes_out = bytes_out;
        line.outcome = outcome;
        if let Download::Planned(download) = &download {
            line.resumes = download.resumes;
            line.held = download.held;
        }
        self.log(&line, &request_id);
        if keep_alive && !draining {
            Forwarded::KeepAlive
        } else {
            Forwarded::Close
        }
    }

    /// Whether the quarantine watches this request: a suspect (the hyper
    /// path sends it through the suspect lane) or quarantined (it refuses
    /// it). Every other request stays on this path while suspects are
    /// remembered (`quarantine.duration`, after a crash).
    fn watched(&self, head: &[u8], request: &RawRequest) -> bool {
        let quarantine = self.proxy.quarantine();
        if !quarantine.watches_any() {
            return false;
        }
        let Some(fingerprint) = fingerprint(head, request) else {
            return true;
        };
        quarantine.is_quarantined(&fingerprint) || quarantine.is_suspect(&fingerprint)
    }

    /// Answers `error` as the hyper path answers it: `504 GatewayTimeout`
    /// (S3's `SlowBackend`) for a backend that serves but did not answer in
    /// time, `502` for an answer hyper's client refuses; the connection
    /// ends after it.
    async fn answer_error<I>(
        &self,
        io: &mut TargetWatch<I>,
        mut line: Line<'_>,
        error: ProxyError,
    ) -> Forwarded
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let request_id = RequestId::Proxy(crate::access_log::ProxyRequestId::next());
        line.status = error.status().as_u16();
        line.outcome = error.outcome();
        let answer = error.to_http1_bytes(line.method, line.path, &request_id.to_string());
        if io.write_all(&answer).await.is_err() {
            line.outcome = RequestOutcome::ResponseCut;
        }
        self.log(&line, &request_id);
        Forwarded::Close
    }

    /// Writes the answer to the client: `answer` holds its head and the
    /// first bytes of its body, the rest comes from `backend` (or, after a
    /// cut, from the backend again: `download`).
    async fn pass_on<I>(
        &self,
        io: &mut TargetWatch<I>,
        (backend, head): (&mut RawConnection, &AnswerHead),
        answer: &mut Vec<u8>,
        closing: bool,
        download: &mut Download,
    ) -> Passed
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut body = Body::new(head.framing);
        // What the backend has sent already goes in one write with the
        // head (a small answer whole); nothing is waited for first. A cut
        // before that write goes to the hyper path.
        while !body.ends_within(&answer[head.length..]) && answer.len() < GATHERED {
            match backend.read_buf(answer).now_or_never() {
                None => break,
                Some(Ok(0)) if head.framing == BodyFraming::UntilClose => break,
                Some(Ok(read)) if read > 0 => {}
                Some(_) => return Passed::NotSent,
            }
        }
        let Ok(taken) = body.take(&answer[head.length..]) else {
            return Passed::NotSent;
        };
        if !body.done() {
            download.plan(&answer[..head.length]);
        }
        // Bytes past what the body took: the start of a line not whole
        // yet (chunked), or, past the body's end, bytes the backend was not
        // asked for.
        let mut carried = answer.split_off(head.length + taken);
        let mut reusable = carried.is_empty();
        let mut head_length = head.drop_hop_by_hop(answer);
        if closing {
            head_length = say_close(answer, head_length);
        }
        if !head.dated {
            dated(answer, head_length);
        }
        if io.write_all(answer).await.is_err() {
            return Passed::cut(0);
        }
        let mut sent = taken as u64;
        let generation = self.proxy.gate().generation();
        std::mem::swap(answer, &mut carried);
        let mut may_splice = true;
        while !body.done() {
            if answer.is_empty() && may_splice {
                match self.splice(backend, &mut body).await {
                    Some(Spliced {
                        moved,
                        end: SpliceEnd::ClientGone,
                    }) => return Passed::cut(sent + moved),
                    Some(Spliced {
                        moved,
                        end: SpliceEnd::NotSpliceable,
                    }) => {
                        sent += moved;
                        may_splice = false;
                    }
                    Some(Spliced { moved, .. }) => sent += moved,
                    None => {}
                }
                if body.done() {
                    break;
                }
            }
            answer.reserve(STREAM_READ);
            match backend.read_buf(answer).await {
                Ok(0) if head.framing == BodyFraming::UntilClose => break,
                Ok(read) if read > 0 => {}
                _ => {
                    // The cut connection is done with: its slot goes to the
                    // resume, ahead of requests waiting for one.
                    let slot = backend.take_slot();
                    match self.resume(download, sent, generation, slot).await {
                        Some(mut rest) => {
                            *backend = rest.backend;
                            *answer = rest.answer.split_off(rest.head_length);
                        }
                        None => return Passed::aborted(sent),
                    }
                }
            }
            let Ok(taken) = body.take(answer) else {
                return Passed::aborted(sent);
            };
            if io.write_all(&answer[..taken]).await.is_err() {
                return Passed::cut(sent);
            }
            sent += taken as u64;
            // What is left is carried to the next read; past the body's end,
            // the connection is not reused.
            answer.drain(..taken);
            reusable = answer.is_empty();
        }
        Passed::Whole {
            bytes: sent,
            reusable,
        }
    }

    /// Moves the rest of a large body of known length from `backend` to the
    /// client without reading it ([`crate::splice`]): `None` when it is not
    /// worth it or cannot be (no pipe free), the body then goes through a
    /// buffer. A backend that broke is left to the next read to find.
    async fn splice(&self, backend: &TcpStream, body: &mut Body) -> Option<Spliced> {
        let Body::Length(left) = body else {
            return None;
        };
        if *left < crate::splice::WORTH_SPLICING {
            return None;
        }
        let client = self.peer.socket()?;
        let pipe = self.pipes.open()?;
        let spliced = pipe.pass(backend, &client, *left, self.send_timeout).await;
        *left -= spliced.moved;
        Some(spliced)
    }

    /// The rest of a download cut after `sent` body bytes (in backend
    /// generation `generation`), if it can be resumed; counted in
    /// `s3fp_download_resumes_total` as the hyper path counts it.
    async fn resume(
        &self,
        download: &mut Download,
        sent: u64,
        generation: u64,
        slot: Slot,
    ) -> Option<crate::raw_resume::Rest> {
        let metrics = self.proxy.metrics();
        let download = match download {
            Download::Planned(download) => download,
            Download::NotResumable(why) => {
                if why.is_download() {
                    tracing::warn!(reason = %why, "the cut download cannot be resumed");
                    metrics.download_resume(ResumeOutcome::NotResumable);
                }
                self.proxy.body_broke(generation);
                return None;
            }
            Download::Unplanned(_) => {
                self.proxy.body_broke(generation);
                return None;
            }
        };
        if download.resumes >= self.proxy.settings().max_replays {
            // As the hyper path says it (`download_resume`).
            tracing::warn!(delivered = sent, "download cut again, no resume left");
            metrics.download_resume(ResumeOutcome::Failed);
            return None;
        }
        match download
            .refetch(&self.proxy, &self.peer, sent, generation, slot)
            .await
        {
            Ok(rest) => {
                download.resumes += 1;
                metrics.download_resume(ResumeOutcome::Resumed);
                Some(rest)
            }
            Err(error) => {
                tracing::warn!(%error, "the cut download was not resumed");
                metrics.download_resume(error.outcome());
                None
            }
        }
    }

    /// The head the backend gets: `head` with the forwarding headers
    /// appended as the last field lines (in lower case, as hyper writes a
    /// name the proxy added).
    fn outbound(&self, head: &[u8], request: &RawRequest) -> Vec<u8> {
        let end = head.len() - 2;
        let mut outbound = Vec::with_capacity(head.len() + 64);
        outbound.extend_from_slice(&head[..end]);
        if request.forwarding.0 {
            outbound.extend_from_slice(b"x-forwarded-for: ");
            outbound.extend_from_slice(self.peer.forwarded_for().as_bytes());
            outbound.extend_from_slice(b"\r\n");
        }
        if request.forwarding.1 {
            outbound.extend_from_slice(b"x-forwarded-proto: ");
            outbound.extend_from_slice(self.scheme.as_bytes());
            outbound.extend_from_slice(b"\r\n");
        }
        outbound.extend_from_slice(b"\r\n");
        outbound
    }

    /// The request's metrics and request line, as `RequestRecord` writes them.
    fn log(&self, line: &Line<'_>, request_id: &RequestId) {
        let duration = line.started.elapsed();
        self.proxy.metrics().request(
            line.method,
            line.status,
            duration,
            line.bytes_in,
            line.bytes_out,
        );
        RequestLine {
            method: line.method,
            path: line.path,
            status: line.status,
            held_ms: line.held.as_millis() as u64,
            replays: 0,
            resumes: line.resumes,
            bytes_in: line.bytes_in,
            bytes_out: line.bytes_out,
            duration_ms: duration.as_millis() as u64,
            request_id,
            outcome: line.outcome,
        }
        .log();
    }
}

/// The quarantine's fingerprint of the request whose head is `head`, as
/// the hyper path takes it ([`Fingerprint::of`]: the target, and of the
/// fields only `x-amz-copy-source` and `Content-Length`); `None` for a
/// target the URI parser refuses.
fn fingerprint(head: &[u8], request: &RawRequest) -> Option<Fingerprint> {
    let target = std::str::from_utf8(&head[request.target.clone()]).ok()?;
    let uri = target.parse::<http::Uri>().ok()?;
    let mut slots = [httparse::EMPTY_HEADER; COMMON_FIELDS];
    let mut parsed = httparse::Request::new(&mut slots);
    parsed.parse(head).ok()?;
    let mut fields = http::HeaderMap::new();
    for field in parsed.headers.iter() {
        for name in ["x-amz-copy-source", "content-length"] {
            if field.name.eq_ignore_ascii_case(name) {
                fields.append(name, HeaderValue::from_bytes(field.value).ok()?);
            }
        }
    }
    Some(Fingerprint::of(&request.method, &uri, &fields))
}

/// What one request's line says.
struct Line<'a> {
    method: &'a Method,
    /// The target's path (its query left out, as on the hyper path).
    path: &'a str,
    started: std::time::Instant,
    status: u16,
    /// Request body bytes sent to the backend (an upload's).
    bytes_in: u64,
    bytes_out: u64,
    outcome: RequestOutcome,
    resumes: u32,
    held: Duration,
}

impl<'a> Line<'a> {
    fn new(request: &'a RawRequest, head: &'a [u8], started: std::time::Instant) -> Line<'a> {
        let target = std::str::from_utf8(&head[request.target.clone()]).unwrap_or_default();
        Line {
            method: &request.method,
            path: target.split_once('?').map_or(target, |(path, _)| path),
            started,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            outcome: RequestOutcome::Ok,
            resumes: 0,
            held: Duration::ZERO,
        }
    }
}

/// What passing an answer on came to.
enum Passed {
    /// The whole body went to the client: its bytes, and whether the
    /// backend connection may serve another request (it sent nothing past
    /// the answer).
    Whole { bytes: u64, reusable: bool },
    /// Cut before the client had a byte: the hyper path's.
    NotSent,
    /// Broken after the client had `bytes` body bytes.
    Broken { bytes: u64, outcome: RequestOutcome },
}

impl Passed {
    /// The client left, or took nothing for `listener.send_timeout`.
    fn cut(bytes: u64) -> Passed {
        Passed::Broken {
            bytes,
            outcome: RequestOutcome::ResponseCut,
        }
    }

    /// The backend failed and the body could not go on.
    fn aborted(bytes: u64) -> Passed {
        Passed::Broken {
            bytes,
            outcome: RequestOutcome::ResponseAborted,
        }
    }
}

/// Whether a download streaming to the client could be resumed.
enum Download {
    /// Not looked at yet: the head sent.
    Unplanned(Vec<u8>),
    Planned(RawDownload),
    NotResumable(NotResumable),
}

impl Download {
    /// Plans the download answered with `answer_head` (its bytes).
    fn plan(&mut self, answer_head: &[u8]) {
        if let Download::Unplanned(outbound) = self {
            let outbound = std::mem::take(outbound);
            *self = match RawDownload::of(outbound, answer_head) {
                Ok(download) => Download::Planned(download),
                Err(why) => Download::NotResumable(why),
            };
        }
    }
}

/// Adds a `Date` field at the end of the head of `answer` (`head_length`
/// bytes long), as hyper adds one to an answer without (RFC 9110 section
/// 6.6.1: an origin with a clock must send one).
fn dated(answer: &mut Vec<u8>, head_length: usize) {
    let field = format!(
        "date: {}\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    let at = head_length - 2;
    answer.splice(at..at, field.into_bytes());
}

/// Makes the answer head at the start of `answer` (`head_length` bytes,
/// ended by an empty line) say `Connection: close`, as the hyper path's
/// answers say it while the proxy drains (RFC 9112 section 9.6): the value
/// of its first `Connection` line replaced, the name kept as the backend
/// wrote it (hyper keeps a replaced field's name and place), else a
/// `connection: close` line added last (as hyper writes a name the proxy
/// adds). Returns the head's length after.
fn say_close(answer: &mut Vec<u8>, head_length: usize) -> usize {
    const NAME: &[u8] = b"connection:";
    let head = &answer[..head_length];
    let mut lines = head
        .windows(2)
        .enumerate()
        .filter(|(_, pair)| *pair == b"\r\n")
        .map(|(at, _)| at);
    // Field lines start after the status line.
    let mut start = lines.next().map_or(head_length, |end| end + 2);
    for end in lines {
        let line = &head[start..end];
        if line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) {
            let value = start + NAME.len()..end;
            let removed = value.len();
            answer.splice(value, b" close".iter().copied());
            return head_length - removed + b" close".len();
        }
        start = end + 2;
    }
    let line = b"connection: close\r\n";
    let at = head_length - 2;
    answer.splice(at..at, line.iter().copied());
    head_length + line.len()
}

/// An answer body followed as it passes.
enum Body {
    Empty,
    Length(u64),
    Chunked(Chunks),
    UntilClose,
}

impl Body {
    fn new(framing: BodyFraming) -> Body {
        match framing {
            BodyFraming::Empty => Body::Empty,
            BodyFraming::Length(length) => Body::Length(length),
            BodyFraming::Chunked => Body::Chunked(Chunks::Size),
            BodyFraming::UntilClose => Body::UntilClose,
        }
    }

    /// Whether the body ends within `bytes` (its first bytes).
    fn ends_within(&self, bytes: &[u8]) -> bool {
        match self {
            Body::Empty => true,
            Body::Length(length) => bytes.len() as u64 >= *length,
            Body::Chunked(chunks) => {
                let mut chunks = *chunks;
                chunks.follow(bytes).is_err() || chunks == Chunks::Done
            }
            Body::UntilClose => false,
        }
    }

    /// Follows `bytes`, the body's next ones: how many belong to it.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, crate::raw_backend::BadChunks> {
        match self {
            Body::Empty => Ok(0),
            Body::Length(left) => {
                let taken = (*left).min(bytes.len() as u64);
                *left -= taken;
                Ok(taken as usize)
            }
            Body::Chunked(chunks) => chunks.follow(bytes),
            Body::UntilClose => Ok(bytes.len()),
        }
    }

    fn done(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Length(left) => *left == 0,
            Body::Chunked(chunks) => *chunks == Chunks::Done,
            Body::UntilClose => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::say_close;

    fn closed(head: &str) -> String {
        let mut answer = format!("{head}body").into_bytes();
        let length = say_close(&mut answer, head.len());
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer[..length].ends_with("\r\n\r\n"), "{answer}");
        assert_eq!(&answer[length..], "body");
        answer
    }

    #[test]
    fn a_head_without_connection_gets_one_last() {
        assert_eq!(
            closed("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"),
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nconnection: close\r\n\r\nbody"
        );
    }

    #[test]
    fn a_connection_line_says_close_in_its_place_with_its_name() {
        assert_eq!(
            closed("HTTP/1.1 200 OK\r\nCONNECTION:keep-alive\r\nContent-Length: 4\r\n\r\n"),
            "HTTP/1.1 200 OK\r\nCONNECTION: close\r\nContent-Length: 4\r\n\r\nbody"
        );
    }
}
