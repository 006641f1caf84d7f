//! Large uploads on the raw path: a `PUT` (PutObject, UploadPart) whose
//! `Content-Length` body is too large for `hold.replay_buffer`, its head
//! forwarded as it came and its body spliced from the client socket to the
//! backend socket ([`crate::splice`]), never entering the proxy's memory.
//!
//! Read into a buffer and written out again, each body byte costs two
//! copies, most of an upload's CPU (perf, a 2 GiB PUT: `_copy_to_iter` and
//! `_copy_from_iter`, 36 % of the samples). Such a body could never be sent
//! twice: the hyper path keeps no copy of it either, so a crash mid-body
//! fails it there too. So nothing is lost by splicing it; with settle
//! credentials (`[settle]`), whose read-back may prove such a write, or a
//! body the replay buffer can hold, the hyper path serves it.
//!
//! What the hyper path does for an upload, this does too:
//! - **`Expect: 100-continue` end to end** (RFC 9110 section 10.1.1, see
//!   [`crate::delivery`]): the head goes alone, the client gets
//!   `100 Continue` once the backend sent one (or said nothing for
//!   `backend.expect_continue_timeout`), and a final answer instead is
//!   passed on as it came, the body never asked for (the connection then
//!   ends: whether the client sends the body after all is not known).
//! - **Until a body byte is taken from the client**, any failure hands the
//!   request to the hyper path, which sends it again and holds it through
//!   an outage, as for a GET.
//! - **Once body bytes are taken**, the request ends with an answer: the
//!   backend's own, even one given before the body ended (the rest of the
//!   body is then read and dropped for up to 30 s, so the client can read
//!   it: nginx's lingering close); else the proxy's, as the hyper path's:
//!   `503 ServiceUnavailable` when the backend died with it (an outage),
//!   `502` when it failed alone, `504` when it serves but took no byte of
//!   the body for its first-byte timeout, `408` when the client sent none
//!   for `listener.client_body_timeout`, `400 IncompleteBody` when the
//!   client's body ended early. The backend connection is then closed
//!   mid-body, so the backend stores nothing.
//! - **A backend that stops taking the body** is checked every
//!   `backend.response_timeout` as `send_watched` checks it: one that does
//!   not serve takes the gate down.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::{Download, Forwarded, GATHERED, Line, Passed, RawPath, RawRequest, ShutdownStep};
use crate::access_log::RequestId;
use crate::download_resume::NotResumable;
use crate::outcome::RequestOutcome;
use crate::peer::RequestInProgress;
use crate::proxy::{Proxy, ProxySettings};
use crate::raw_backend::{AnswerHead, NotTaken, Parsed, RawConnection, parse_answer};
use crate::raw_exchange::{Patience, Unanswered, connect_for_upload, read_answer_head, watched};
use crate::raw_head::RawUpload;
use crate::request_target::TargetWatch;
use crate::s3_error::ProxyError;
use crate::shutdown::{Phase, ShutdownWatch};
use crate::splice::{Fill, Pipe, WORTH_SPLICING};

/// What the client gets when its body is asked for, as hyper writes it.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Longest the rest of a body the backend answered early is read and
/// dropped (the hyper path's `LINGERING_CLOSE`, nginx's `lingering_time`).
const LINGERING_CLOSE: Duration = Duration::from_secs(30);

/// Body bytes read at a time where the body cannot be spliced.
const BUFFERED_READ: usize = 64 << 10;

/// Whether the raw path takes `upload` under `settings`: a body worth a
/// pipe, larger than `hold.replay_buffer`, and no write settling.
pub(super) fn takes(upload: &RawUpload, settings: &ProxySettings) -> bool {
    upload.length >= WORTH_SPLICING
        && upload.length > settings.replay_buffer as u64
        && settings.settle.is_none()
}

/// How an upload's exchange with the backend ended.
enum Uploaded {
    /// No body byte was taken from the client: the hyper path's.
    NotSent,
    /// The backend answered (its head at the start of the answer bytes).
    Answered {
        backend: RawConnection,
        head: AnswerHead,
        body: BodyState,
    },
    /// The proxy answers this, and the connection ends.
    Failed(ProxyError),
    /// The client left: nothing to answer.
    ClientGone,
}

/// What the backend said to a head that expects `100 Continue`.
enum Asked {
    /// `100 Continue`.
    Yes,
    /// Nothing for `backend.expect_continue_timeout`: the body goes unasked.
    NotInTime,
    /// A final answer (its head): the body is not wanted.
    No(AnswerHead),
}

/// Where the request body was when the answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// Every byte reached the backend.
    Sent,
    /// Never asked for (`Expect: 100-continue` answered finally): the
    /// client may or may not send it, so the connection ends after.
    NotAsked,
    /// Cut short by an answer: this many bytes are still to come from the
    /// client, read and dropped.
    Left(u64),
}

/// Why moving the body stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    /// The backend sent bytes or closed its side, or a write to it failed:
    /// what it says is read next.
    BackendStopped,
    /// It took nothing for `backend.response_timeout` and did not serve
    /// when checked (the gate is down).
    BackendHung,
    /// It serves but took nothing for its first-byte timeout.
    BackendSlow,
    /// The client's body ended or broke.
    ClientEnded,
    /// The client sent nothing for `listener.client_body_timeout`.
    ClientSilent,
}

/// What an upload's exchange works with.
struct Upload<'u> {
    head: &'u [u8],
    request: &'u RawRequest,
    upload: RawUpload,
    patience: Patience,
    generation: u64,
    /// Body bytes taken from the client so far.
    taken: u64,
    /// Body bytes the backend socket took so far (fewer than `taken` while
    /// some wait in the pipe or a buffer).
    sent: u64,
    /// The backend's connection may serve another request after: not when
    /// the body went unasked (`backend.expect_continue_timeout`).
    reusable: bool,
}

impl RawPath {
    /// Forwards the upload whose head starts `buffer` (`request`), taking
    /// its head and body bytes from `buffer` once the body goes.
    pub(super) async fn upload<I>(
        &self,
        io: &mut TargetWatch<I>,
        buffer: &mut BytesMut,
        (request, upload): (&RawRequest, RawUpload),
        (shutdown, grace_over): (&ShutdownWatch, ShutdownStep<'_>),
        mut answer_timer: Pin<&mut Sleep>,
    ) -> Forwarded
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let started = std::time::Instant::now();
        let head = buffer[..request.length].to_vec();
        let proxy = &self.proxy;
        let connector = proxy.backend_connector();
        if !connector.is_plain() || proxy.gate().suspects_due() || self.watched(&head, request) {
            return Forwarded::NotSent;
        }
        let Some(pipe) = self.pipes.open() else {
            return Forwarded::NotSent;
        };
        let Some(mut admission) = proxy.gate().admit_at_once() else {
            return Forwarded::NotSent;
        };
        let in_progress = RequestInProgress::start(&self.peer);
        let in_flight = proxy.in_flight().enter();
        let mut answer = Vec::with_capacity(GATHERED);
        let mut exchange = Upload {
            head: &head,
            request,
            upload,
            patience: Patience::now(proxy),
            generation: proxy.gate().generation(),
            taken: 0,
            sent: 0,
            reusable: true,
        };
        let uploaded = tokio::select! {
            uploaded = self.exchange(io, buffer, &mut exchange, (&pipe, &mut answer), answer_timer.as_mut()) => uploaded,
            // As on the rest of the raw path: past the grace, cut.
            () = grace_over => {
                let mut line = Line::new(request, &head, started);
                line.bytes_in = exchange.sent;
                line.status = 499;
                line.outcome = RequestOutcome::ShuttingDown;
                self.log(&line, &RequestId::from_backend(None));
                return Forwarded::Close;
            }
        };
        drop(pipe);
        let mut line = Line::new(request, &head, started);
        line.bytes_in = exchange.sent;
        let (mut backend, answer_head, body) = match uploaded {
            Uploaded::NotSent => return Forwarded::NotSent,
            Uploaded::Failed(error) => {
                drop((in_flight, in_progress));
                return self.answer_error(io, line, error).await;
            }
            Uploaded::ClientGone => {
                drop((in_flight, in_progress));
                line.status = 499;
                line.outcome = RequestOutcome::ClientGone;
                self.log(&line, &RequestId::from_backend(None));
                return Forwarded::Close;
            }
            Uploaded::Answered {
                backend,
                head,
                body,
            } => (backend, head, body),
        };
        admission.settle();
        proxy.gate().backend_answered();
        proxy.metrics().raw_request();
        let request_id = match answer_head.request_id.clone() {
            Some(range) => {
                RequestId::from_backend(http::HeaderValue::from_bytes(&answer[range]).ok().as_ref())
            }
            None => RequestId::from_backend(None),
        };
        let closing = *shutdown.borrow() != Phase::Serving;
        let mut download = Download::NotResumable(NotResumable::NotGet);
        let passed = self
            .pass_on(
                io,
                (&mut backend, &answer_head),
                &mut answer,
                closing,
                &mut download,
            )
            .await;
        let (bytes_out, reusable, outcome) = match passed {
            Passed::Whole { bytes, reusable } => (bytes, reusable, RequestOutcome::Ok),
            Passed::Broken { bytes, outcome } => (bytes, false, outcome),
            // The answer broke before the client had a byte of it.
            Passed::NotSent => {
                drop((in_flight, in_progress));
                return self.answer_error(io, line, ProxyError::BadGateway).await;
            }
        };
        // A body never asked for may still come, or not: the connection
        // ends after the answer (passed on as it came, as hyper passes it).
        let mut keep_alive = outcome == RequestOutcome::Ok
            && answer_head.keep_alive
            && !closing
            && body != BodyState::NotAsked;
        if keep_alive && reusable && exchange.reusable && body == BodyState::Sent {
            proxy
                .raw_backend()
                .put_back_spare(backend, connector, exchange.patience.max_idle);
        } else {
            drop(backend);
        }
        if let BodyState::Left(left) = body
            && outcome == RequestOutcome::Ok
        {
            // Every byte read (in time) or the connection ends.
            keep_alive &= self.drop_rest(io, buffer, left).await;
        }
        drop((in_flight, in_progress));
        line.status = answer_head.status;
        line.bytes_out = bytes_out;
        line.outcome = outcome;
        self.log(&line, &request_id);
        if keep_alive {
            Forwarded::KeepAlive
        } else {
            Forwarded::Close
        }
    }

    /// Sends the head, then (asked for) the body, and reads the answer.
    async fn exchange<I>(
        &self,
        io: &mut TargetWatch<I>,
        buffer: &mut BytesMut,
        upload: &mut Upload<'_>,
        (pipe, answer): (&Pipe<'_>, &mut Vec<u8>),
        mut timer: Pin<&mut Sleep>,
    ) -> Uploaded
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let proxy = &*self.proxy;
        let connector = proxy.backend_connector();
        let Ok(mut backend) = connect_for_upload(proxy, &connector, upload.patience).await else {
            return Uploaded::NotSent;
        };
        let outbound = self.outbound(upload.head, upload.request);
        if backend.write_all(&outbound).await.is_err() {
            return Uploaded::NotSent;
        }
        if upload.upload.expects_continue {
            match self
                .asked_for_body(&mut backend, answer, upload, timer.as_mut())
                .await
            {
                Ok(Asked::Yes) => {}
                Ok(Asked::NotInTime) => upload.reusable = false,
                Ok(Asked::No(head)) => {
                    return Uploaded::Answered {
                        backend,
                        head,
                        body: BodyState::NotAsked,
                    };
                }
                Err(unanswered) => return self.unsent(unanswered, upload).await,
            }
            if io.write_all(CONTINUE).await.is_err() {
                return Uploaded::ClientGone;
            }
        }
        // From here on the body is taken from the client: no going back.
        buffer.advance(upload.request.length);
        let ahead = (buffer.len() as u64).min(upload.upload.length) as usize;
        let ahead = buffer.split_to(ahead);
        upload.taken = ahead.len() as u64;
        let mut watch = TakingWatch::new(proxy, upload.patience, upload.generation);
        let ended = match watch.send_all(&backend, &ahead).await {
            Ok(()) => {
                upload.sent = upload.taken;
                self.move_body(io, buffer, (&backend, pipe), upload, &mut watch)
                    .await
            }
            Err(end) => Err(end),
        };
        let left = upload.upload.length - upload.taken;
        let body = match ended {
            Ok(()) => BodyState::Sent,
            Err(BodyEnd::BackendStopped) => BodyState::Left(left),
            Err(BodyEnd::ClientEnded) => return Uploaded::Failed(ProxyError::ClientBody),
            Err(BodyEnd::ClientSilent) => return Uploaded::Failed(ProxyError::ClientTimeout),
            Err(BodyEnd::BackendSlow) => return Uploaded::Failed(ProxyError::SlowBackend),
            Err(BodyEnd::BackendHung) => return self.died_with_it(upload).await,
        };
        answer.clear();
        let head = {
            let read_head = std::pin::pin!(read_answer_head(
                &mut backend,
                answer,
                false,
                upload.patience
            ));
            watched(proxy, read_head, upload.patience, upload.generation, timer).await
        };
        match head {
            Ok(head) => Uploaded::Answered {
                backend,
                head,
                body,
            },
            Err(Unanswered::Slow) => Uploaded::Failed(ProxyError::SlowBackend),
            Err(Unanswered::Invalid | Unanswered::Failed | Unanswered::Busy) => {
                Uploaded::Failed(ProxyError::BadGateway)
            }
            Err(Unanswered::Cut | Unanswered::Hung) => self.died_with_it(upload).await,
        }
    }

    /// Waits for the backend to ask for the body or answer without it
    /// (its head read into `answer`), watched as an answer is.
    async fn asked_for_body(
        &self,
        backend: &mut RawConnection,
        answer: &mut Vec<u8>,
        upload: &Upload<'_>,
        timer: Pin<&mut Sleep>,
    ) -> Result<Asked, Unanswered> {
        let proxy = &*self.proxy;
        let patience = upload.patience;
        let read = std::pin::pin!(read_continue(
            backend,
            answer,
            patience.max_head_bytes,
            patience.max_headers
        ));
        let watched = watched(proxy, read, patience, upload.generation, timer);
        let asked = |head: Option<AnswerHead>| head.map_or(Asked::Yes, Asked::No);
        match proxy.settings().expect_continue_timeout {
            // Said nothing for so long: the body goes, as a client sends
            // it when tired of waiting.
            Some(wait) => match tokio::time::timeout(wait, watched).await {
                Ok(head) => head.map(asked),
                Err(_) => Ok(Asked::NotInTime),
            },
            None => watched.await.map(asked),
        }
    }

    /// A failure before any body byte was taken: the hyper path sends the
    /// request again (a backend cut under it may have died with it: its
    /// suspect), or the proxy answers.
    async fn unsent(&self, unanswered: Unanswered, upload: &Upload<'_>) -> Uploaded {
        match unanswered {
            Unanswered::Failed | Unanswered::Busy => Uploaded::NotSent,
            Unanswered::Cut | Unanswered::Hung => {
                if let Some(fingerprint) = super::fingerprint(upload.head, upload.request) {
                    self.proxy
                        .raw_request_cut(&fingerprint, upload.generation)
                        .await;
                }
                Uploaded::NotSent
            }
            Unanswered::Slow => Uploaded::Failed(ProxyError::SlowBackend),
            Unanswered::Invalid => Uploaded::Failed(ProxyError::BadGateway),
        }
    }

    /// The backend failed after body bytes were taken, with no answer: as
    /// the hyper path judges it, `503` on an outage (the request may have
    /// died with it: its suspect), `502` when it failed alone.
    async fn died_with_it(&self, upload: &Upload<'_>) -> Uploaded {
        let outage = match super::fingerprint(upload.head, upload.request) {
            Some(fingerprint) => {
                self.proxy
                    .raw_request_cut(&fingerprint, upload.generation)
                    .await
            }
            None => false,
        };
        tracing::warn!(
            bytes_in = upload.sent,
            outage,
            "backend failed after the upload reached it"
        );
        self.proxy
            .metrics()
            .replay(crate::outcome::ReplayOutcome::RefusedUnsafe);
        Uploaded::Failed(match outage {
            true => ProxyError::NotReplayable,
            false => ProxyError::BadGateway,
        })
    }

    /// Moves the rest of the body (past what came with the head) from the
    /// client to the backend: spliced while the watch holds none of its
    /// bytes, else through `buffer`.
    async fn move_body<I>(
        &self,
        io: &mut TargetWatch<I>,
        buffer: &mut BytesMut,
        (backend, pipe): (&TcpStream, &Pipe<'_>),
        upload: &mut Upload<'_>,
        watch: &mut TakingWatch<'_>,
    ) -> Result<(), BodyEnd>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let client_timeout = self.proxy.settings().client_body_timeout;
        let left = upload.upload.length - upload.taken;
        let client = self.peer.socket();
        if let Some(client) = client.filter(|_| io.body_left() == Some(left)) {
            let before = upload.taken;
            let spliced = splice_body(
                (&client, backend, pipe),
                left,
                client_timeout,
                watch,
                (&mut upload.taken, &mut upload.sent),
            )
            .await;
            io.body_passed(upload.taken - before);
            match spliced {
                Ok(true) => return Ok(()),
                // Bytes behind the urgent mark: the rest through a buffer.
                Ok(false) => {}
                Err(end) => return Err(end),
            }
        }
        while upload.taken < upload.upload.length {
            if buffer.is_empty() {
                buffer.reserve(BUFFERED_READ);
                let read = tokio::select! {
                    biased;
                    () = backend_spoke(backend) => return Err(BodyEnd::BackendStopped),
                    read = tokio::time::timeout(client_timeout, io.read_buf(buffer)) => read,
                };
                match read {
                    Err(_) => return Err(BodyEnd::ClientSilent),
                    Ok(Ok(0) | Err(_)) => return Err(BodyEnd::ClientEnded),
                    Ok(Ok(_)) => {}
                }
            }
            let left = upload.upload.length - upload.taken;
            let take = (buffer.len() as u64).min(left) as usize;
            let bytes = buffer.split_to(take);
            upload.taken += take as u64;
            watch.send_all(backend, &bytes).await?;
            upload.sent = upload.taken;
        }
        Ok(())
    }

    /// After an answer given before the body ended: reads and drops the
    /// `left` bytes still to come, for at most [`LINGERING_CLOSE`], so that
    /// a client still sending reads the answer rather than a reset. Whether
    /// the connection may serve on (every byte came).
    async fn drop_rest<I>(&self, io: &mut TargetWatch<I>, buffer: &mut BytesMut, left: u64) -> bool
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut left = left;
        let drop_all = async {
            loop {
                let take = (buffer.len() as u64).min(left);
                buffer.advance(take as usize);
                left -= take;
                if left == 0 {
                    return true;
                }
                buffer.reserve(BUFFERED_READ);
                if !matches!(io.read_buf(buffer).await, Ok(read) if read > 0) {
                    return false;
                }
            }
        };
        tokio::time::timeout(LINGERING_CLOSE, drop_all)
            .await
            .unwrap_or(false)
    }
}

/// Splices `left` body bytes from `client` to `backend` through `pipe`,
/// counting those taken from the client and those sent on: `Ok(true)` when
/// all went, `Ok(false)` when the client's next bytes cannot be spliced
/// (TCP's urgent mark).
async fn splice_body(
    (client, backend, pipe): (&TcpStream, &TcpStream, &Pipe<'_>),
    left: u64,
    client_timeout: Duration,
    watch: &mut TakingWatch<'_>,
    (taken, sent): (&mut u64, &mut u64),
) -> Result<bool, BodyEnd> {
    let end = *taken + left;
    while *taken < end {
        let asked = (end - *taken).min(pipe.capacity() as u64) as usize;
        let filled = tokio::select! {
            biased;
            () = backend_spoke(backend) => return Err(BodyEnd::BackendStopped),
            filled = tokio::time::timeout(client_timeout, pipe.fill(client, asked)) => filled,
        };
        let mut in_pipe = match filled {
            Err(_) => return Err(BodyEnd::ClientSilent),
            Ok(Ok(Fill::Bytes(0)) | Err(_)) => return Err(BodyEnd::ClientEnded),
            Ok(Ok(Fill::Stuck)) => return Ok(false),
            Ok(Ok(Fill::Bytes(filled))) => filled,
        };
        *taken += in_pipe as u64;
        while in_pipe > 0 {
            let drained = watch.wait(backend, pipe.drain(backend, in_pipe)).await?;
            in_pipe -= drained;
            *sent += drained as u64;
        }
    }
    Ok(true)
}

/// Watches the backend take body bytes, as `send_watched` watches it on
/// the hyper path: checked after each `backend.response_timeout` without
/// progress, [`BodyEnd::BackendHung`] when it does not serve,
/// [`BodyEnd::BackendSlow`] after its first-byte timeout without progress;
/// any byte it sends (an early answer) or its end stops the body.
struct TakingWatch<'p> {
    proxy: &'p Proxy,
    patience: Patience,
    generation: u64,
    /// When the backend last took bytes.
    took_at: Instant,
    /// When it last took bytes or was found serving.
    checked_at: Instant,
}

impl<'p> TakingWatch<'p> {
    fn new(proxy: &'p Proxy, patience: Patience, generation: u64) -> TakingWatch<'p> {
        let now = Instant::now();
        TakingWatch {
            proxy,
            patience,
            generation,
            took_at: now,
            checked_at: now,
        }
    }

    /// Sends all of `bytes` to `backend`.
    async fn send_all(&mut self, backend: &TcpStream, mut bytes: &[u8]) -> Result<(), BodyEnd> {
        while !bytes.is_empty() {
            let sent = self.wait(backend, send_some(backend, bytes)).await?;
            bytes = &bytes[sent..];
        }
        Ok(())
    }

    /// Waits for `write`, a write to `backend`: the bytes it took.
    async fn wait(
        &mut self,
        backend: &TcpStream,
        write: impl Future<Output = io::Result<usize>>,
    ) -> Result<usize, BodyEnd> {
        let mut write = std::pin::pin!(write);
        loop {
            let due = (self.checked_at + self.patience.response_timeout)
                .min(self.took_at + self.patience.first_byte_timeout);
            tokio::select! {
                biased;
                () = backend_spoke(backend) => return Err(BodyEnd::BackendStopped),
                written = write.as_mut() => {
                    return match written {
                        Ok(written) if written > 0 => {
                            self.took_at = Instant::now();
                            self.checked_at = self.took_at;
                            Ok(written)
                        }
                        _ => Err(BodyEnd::BackendStopped),
                    };
                }
                () = tokio::time::sleep_until(due) => {}
            }
            let now = Instant::now();
            if now >= self.took_at + self.patience.first_byte_timeout {
                tracing::warn!(timeout = ?self.patience.first_byte_timeout, "the backend serves but took no byte of the upload in time");
                return Err(BodyEnd::BackendSlow);
            }
            if !self.proxy.late_answer_serving(now, self.generation).await {
                return Err(BodyEnd::BackendHung);
            }
            tracing::info!(waited = ?now - self.took_at, "the backend takes no byte of the upload but serves: slow, not dead");
            self.checked_at = Instant::now();
        }
    }
}

/// One write of `bytes` to `backend` when it takes bytes.
async fn send_some(backend: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    backend
        .async_io(Interest::WRITABLE, || {
            Ok(rustix::net::send(
                backend,
                bytes,
                rustix::net::SendFlags::NOSIGNAL,
            )?)
        })
        .await
}

/// Resolves once `backend` has sent a byte of a final answer, closed its
/// side or failed (peeked, not read: what it sent is the answer, read
/// next). An interim (`1xx`) answer is read and dropped, as hyper's client
/// drops it: a `100 Continue` that comes after the body went unasked
/// (`backend.expect_continue_timeout`) asks for what is already coming.
async fn backend_spoke(backend: &TcpStream) {
    let _ = backend
        .async_io(Interest::READABLE, || {
            loop {
                let mut peeked = [0u8; 1024];
                let peek = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
                let length = match rustix::net::recv(backend, &mut peeked, peek) {
                    Err(rustix::io::Errno::AGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                    Ok((length, _)) if length > 0 => length,
                    _ => return Ok(()),
                };
                match parse_answer(&peeked[..length], false, crate::raw_backend::MAX_FIELDS) {
                    Ok(Parsed::Informational(interim)) => {
                        let drop = rustix::net::RecvFlags::DONTWAIT;
                        if rustix::net::recv(backend, &mut peeked[..interim], drop).is_err() {
                            return Ok(());
                        }
                    }
                    // The rest of an interim head is still to come.
                    Ok(Parsed::Partial)
                        if length < peeked.len() && peeked.starts_with(b"HTTP/1.1 1") =>
                    {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    _ => return Ok(()),
                }
            }
        })
        .await;
}

/// Reads the backend's first answer to a head that expects `100 Continue`
/// into `answer`: `None` for `100` (its bytes dropped), the head of a final
/// answer; other `1xx` answers are dropped, as hyper's client drops them.
async fn read_continue(
    backend: &mut TcpStream,
    answer: &mut Vec<u8>,
    max_head_bytes: usize,
    max_headers: usize,
) -> Result<Option<AnswerHead>, Unanswered> {
    loop {
        let read = backend
            .read_buf(answer)
            .await
            .map_err(|_| Unanswered::Cut)?;
        if read == 0 {
            return Err(Unanswered::Cut);
        }
        loop {
            let parsed =
                parse_answer(answer, false, max_headers).map_err(|not_taken| match not_taken {
                    NotTaken::ForHyper => Unanswered::Failed,
                    NotTaken::Invalid => Unanswered::Invalid,
                })?;
            match parsed {
                Parsed::Partial if answer.len() <= max_head_bytes => break,
                Parsed::Partial => return Err(Unanswered::Failed),
                Parsed::Informational(length) => {
                    let is_continue = answer.get(9..12) == Some(b"100");
                    answer.drain(..length);
                    if is_continue {
                        return Ok(None);
                    }
                }
                Parsed::Final(head) => return Ok(Some(head)),
            }
        }
    }
}
