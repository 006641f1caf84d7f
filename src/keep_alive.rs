//! An idle HTTP/1.1 keep-alive connection that holds no buffers.
//!
//! hyper keeps a connection's read buffer (8-16 KiB), write buffer (8 KiB)
//! and a slot for the service's future for as long as the connection is
//! open, idle or not: 30 KB and more per idle keep-alive connection, where
//! nginx and HAProxy spend under 1.2 KB. So a plain-HTTP/1.1 connection is
//! served in rounds ([`serve_http1`]): a hyper connection serves requests
//! until the stream has rested between two requests for [`REST_GRACE`]
//! (every byte of the last one read, its answer written, hyper waiting for
//! the next, see [`TargetWatch::rest_signal`]); then that hyper connection
//! is ended
//! without touching the socket (`graceful_shutdown` of an idle hyper
//! connection closes nothing but itself, and its answer headers were
//! written long before, so a client sees the same bytes) and its buffers
//! are freed. Bytes hyper had read ahead start the next round at once
//! ([`Prefixed`]); with none, the socket goes back to the caller
//! ([`Served::Rested`]: the listener parks it in [`crate::resting`], outside
//! any task, or waits in the task with [`next_bytes`]) with its head due
//! `listener.header_timeout` later, like hyper's header timer, and the
//! caller starts the next round when the next bytes come. The watches the socket is wrapped in are rebuilt
//! for each round too ([`Layers`]), and every stage is boxed. Over TLS the
//! session keeps buffers of its own, so a TLS connection never rests.
//!
//! hyper keeps some settings for a whole connection: its limit on header
//! fields, and its largest read. A head that needs other settings (more
//! than 100 fields, a large body: [`crate::round_kind`]) starts a round of
//! another kind: the watch stops before it and, once hyper has answered
//! everything before, the round ends at once and the next begins with the
//! same watch, which then hands hyper the bytes it kept.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::heap_trim;
use crate::raw_http1::{RawEnd, RawPath};
use crate::request_target::TargetWatch;
use crate::round_kind::RoundKind;
use crate::shutdown::{ShutdownWatch, closing};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An I/O object whose first bytes are `prefix`: bytes already read from
/// it, given back.
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Bytes, inner: I) -> Prefixed<I> {
        Prefixed { prefix, inner }
    }

    /// The bytes not read yet, and the I/O object.
    pub fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.inner)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // Frees the allocation the prefix came in.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
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

/// How long a connection rests before its hyper connection is ended: a
/// client that sends its next request at once (a benchmark, an SDK in a
/// loop) keeps its hyper connection, since a new one per request costs CPU
/// (15-25 % more per small request, `benches/small_requests.sh`); one that
/// stays idle longer frees its buffers.
pub const REST_GRACE: Duration = Duration::from_millis(100);

/// Most bytes read to tell HTTP/1.1 from HTTP/2 (they go to hyper after).
const FIRST_READ: usize = 4 << 10;

/// Reads the connection's first bytes, until they say which protocol it
/// speaks ([`TargetWatch::is_http2`]); empty if the client closed first.
/// (Empty too when the first request starts a round of its own: see
/// [`TargetWatch::switch_pending`].)
pub async fn first_bytes<I: AsyncRead + Unpin>(io: &mut TargetWatch<I>) -> io::Result<Bytes> {
    use tokio::io::AsyncReadExt;
    let switch = io.switch_signal();
    let switch_due = || {
        switch
            .as_ref()
            .is_some_and(|due| due.load(Ordering::Relaxed))
    };
    let mut first = BytesMut::with_capacity(FIRST_READ);
    while first.is_empty() || !io.has_started() {
        let mut read = std::pin::pin!(io.read_buf(&mut first));
        // The watch holds a head for a round of its own: nothing more comes.
        let read = std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
            Poll::Pending if switch_due() => Poll::Ready(None),
            polled => polled.map(Some),
        });
        let Some(read) = read.await else {
            break;
        };
        if read? == 0 {
            break;
        }
    }
    if first.is_empty() {
        // Not kept for the round: the first request waits for its own.
        return Ok(Bytes::new());
    }
    Ok(first.freeze())
}

/// The layers a client socket is wrapped in while hyper has it. Between
/// requests they hold nothing worth keeping (no byte, no timer), so a
/// resting connection keeps only its socket and they are built anew for
/// each round.
pub trait Layers<R> {
    type Inner: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The socket wrapped for a round after a rest.
    fn wrap(&self, socket: R) -> TargetWatch<Self::Inner>;
    /// The socket back, at a rest.
    fn unwrap(&self, io: TargetWatch<Self::Inner>) -> R;
    /// hyper's HTTP/1.1 settings for a round of this kind
    /// ([`TargetWatch::round_kind`]).
    fn http1(&self, kind: RoundKind) -> http1::Builder;
}

/// What a connection's rounds share.
pub struct Rounds<L> {
    pub layers: L,
    /// The connection's requests being handled or answered now.
    pub in_progress: Arc<AtomicUsize>,
    /// The connection's requests started so far.
    pub started: Arc<AtomicU64>,
    /// Whether the connection may rest between rounds (plain TCP); a TLS
    /// connection is served in one round.
    pub rests: bool,
    /// How long a request head may take, from the connection's start or
    /// the previous answer (`listener.header_timeout`): also how long an
    /// idle connection waits for its next request.
    pub header_timeout: Duration,
    /// Serves what it takes of each round before hyper does
    /// (`listener.raw_http1`, see [`crate::raw_http1`]).
    pub raw: Option<RawPath>,
}

/// How serving a connection ended.
pub enum Served<R> {
    /// The connection is over (its socket shut down).
    Ended,
    /// It rested with no byte read ahead: the socket, for the caller to
    /// wait on, and when the next request's head is due.
    Rested { socket: R, head_due: Instant },
}

/// How a round ended.
enum RoundEnd {
    /// The connection rested: serve the next request in a new round.
    Rested,
    /// The watch holds a head for a round of the other kind.
    Switched,
    /// hyper ended the connection (`Connection: close`, the client left)
    /// or the proxy is closing: shut the socket down.
    Over,
}

/// What a connection's first round starts from: its I/O object, when its
/// first request head is due, and the bytes already read through it.
pub type Start<I> = (TargetWatch<I>, Instant, Bytes);

/// What comes after a round, with the bytes hyper had read ahead.
enum Next<R, I> {
    /// The connection rested: its socket.
    Rested(R, Bytes),
    /// A round of the other kind, over the same watch.
    Switch(Box<TargetWatch<I>>, Bytes),
    /// Nothing: the socket is shut down.
    Over,
}

/// Serves an HTTP/1.1 connection from its [`Start`], in rounds. (The start
/// comes boxed: the arguments of an `async fn` stay in its future for as
/// long as it runs, and this one runs while the connection rests.)
pub async fn serve_http1<R, L, S, B>(
    start: Box<Start<L::Inner>>,
    service: S,
    rounds: Rounds<L>,
    shutdown: &mut ShutdownWatch,
) -> Result<Served<R>, hyper::Error>
where
    L: Layers<R>,
    S: HttpService<Incoming, ResBody = B> + Clone + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    // Each wait is boxed, so that the connection's task is sized for what
    // a resting connection keeps (its socket), not for what a round needs.
    // (Each future is made in a block of its own: a future stored in a
    // local for the length of the function would be kept in the task too.)
    let first_round = {
        let (mut io, head_due, first) = unbox(start);
        if first.is_empty() && io.switch_pending() {
            // The first request needs a round of its own.
            io.switch_round();
        }
        Box::pin(round(
            io,
            first,
            service.clone(),
            &rounds,
            head_due,
            shutdown,
        ))
    };
    let mut next = first_round.await?;
    loop {
        // The next request's head is due by then.
        let head_due = Instant::now() + rounds.header_timeout;
        let round = {
            let (io, ahead) = match next {
                Next::Over => return Ok(Served::Ended),
                Next::Switch(io, ahead) => {
                    let mut io = unbox(io);
                    io.switch_round();
                    (io, ahead)
                }
                Next::Rested(socket, ahead) => {
                    heap_trim::released();
                    if ahead.is_empty() {
                        return Ok(Served::Rested { socket, head_due });
                    }
                    (rounds.layers.wrap(socket), ahead)
                }
            };
            Box::pin(round(
                io,
                ahead,
                service.clone(),
                &rounds,
                head_due,
                shutdown,
            ))
        };
        next = round.await?;
    }
}

/// The value out of its box, the box freed now. (A box moved out of in
/// place is freed when its binding ends: for an argument of an `async fn`,
/// when the future ends.)
#[expect(
    clippy::boxed_local,
    reason = "taking the box is the point: it is freed here"
)]
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Shuts the connection's write side down (a refusal the watch still owes
/// is written first, see [`TargetWatch`]).
pub async fn shut_down<I: AsyncWrite + Unpin>(mut io: I) {
    let _ = io.shutdown().await;
}

/// Waits for the resting connection's next bytes: `false` when none came
/// by `head_due` or the proxy closes.
pub async fn next_bytes(
    socket: &TcpStream,
    head_due: Instant,
    shutdown: &mut ShutdownWatch,
) -> bool {
    // The socket's own read-readiness slot keeps the waker (nobody reads it
    // meanwhile), so the wait keeps no future of its own for it.
    let head_timer = std::pin::pin!(tokio::time::sleep_until(head_due));
    let closing = std::pin::pin!(closing(shutdown));
    let (mut head_timer, mut closing) = (head_timer, closing);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(readable) = socket.poll_read_ready(cx) {
            return Poll::Ready(readable.is_ok());
        }
        if head_timer.as_mut().poll(cx).is_ready() || closing.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        Poll::Pending
    })
    .await
}

/// Serves a round: a raw one with the raw path first (what it hands over,
/// and every other kind of round, with hyper: [`one_round`]).
async fn round<L, R, S, B>(
    mut io: TargetWatch<L::Inner>,
    ahead: Bytes,
    service: S,
    rounds: &Rounds<L>,
    head_due: Instant,
    shutdown: &mut ShutdownWatch,
) -> Result<Next<R, L::Inner>, hyper::Error>
where
    L: Layers<R>,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    let ahead = match &rounds.raw {
        Some(raw) if io.round_kind() == RoundKind::Raw && !io.switch_pending() => {
            let served = Box::pin(raw.serve(
                &mut io,
                ahead,
                head_due,
                rounds.rests.then_some(REST_GRACE),
                shutdown,
            ));
            match served.await {
                RawEnd::HandOver(ahead) => {
                    io.handed_over();
                    ahead
                }
                RawEnd::Switch(ahead) => {
                    io.switch_round();
                    ahead
                }
                RawEnd::Rested => return Ok(Next::Rested(rounds.layers.unwrap(io), Bytes::new())),
                RawEnd::Over => {
                    shut_down(io).await;
                    return Ok(Next::Over);
                }
            }
        }
        _ => ahead,
    };
    one_round(io, ahead, service, rounds, head_due, shutdown).await
}

/// Serves `io` with one hyper connection until it rests (the socket and
/// the bytes read ahead of hyper), needs a round of the other kind (the
/// watch), or ends (the socket shut down).
async fn one_round<L, R, S, B>(
    mut io: TargetWatch<L::Inner>,
    ahead: Bytes,
    service: S,
    rounds: &Rounds<L>,
    head_due: Instant,
    shutdown: &mut ShutdownWatch,
) -> Result<Next<R, L::Inner>, hyper::Error>
where
    L: Layers<R>,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    let resting = io.rest_signal();
    let switch = io.switch_signal();
    let connection = rounds
        .layers
        .http1(io.round_kind())
        .serve_connection(TokioIo::new(Prefixed::new(ahead, io)), service);
    let mut round = Round {
        connection: Box::new(connection),
        resting: &resting,
        switch: switch.as_deref(),
        switched: false,
        in_progress: &rounds.in_progress,
        started: &rounds.started,
        started_before: rounds.started.load(Ordering::Acquire),
        head_due,
        may_rest: rounds.rests,
        rest_timer: None,
        timing_rest: false,
        rested: false,
        closing: false,
    };
    let end = round.run(shutdown).await;
    let parts = round.connection.into_parts();
    let (unread, io) = parts.io.into_inner().into_parts();
    match end {
        Ok(RoundEnd::Rested) => {
            let ahead = [unread, parts.read_buf].concat().into();
            Ok(Next::Rested(rounds.layers.unwrap(io), ahead))
        }
        Ok(RoundEnd::Switched) => {
            let ahead = [unread, parts.read_buf].concat().into();
            Ok(Next::Switch(Box::new(io), ahead))
        }
        Ok(RoundEnd::Over) => {
            // hyper's buffer is freed first: a refusal the watch writes
            // lingers (see `TargetWatch`).
            drop(parts.read_buf);
            shut_down(io).await;
            Ok(Next::Over)
        }
        Err(error) => {
            // hyper answered what it refused (`400`, `431`) and leaves the
            // socket to its owner: shut down as hyper's own close would.
            drop(parts.read_buf);
            shut_down(io).await;
            Err(error)
        }
    }
}

/// One hyper connection over the socket, until it rests or ends.
struct Round<'a, C> {
    connection: Box<C>,
    resting: &'a AtomicBool,
    /// Set when the watch holds a head for a round of the other kind
    /// ([`TargetWatch::switch_signal`]).
    switch: Option<&'a AtomicBool>,
    /// hyper was asked to end for a round of the other kind.
    switched: bool,
    in_progress: &'a AtomicUsize,
    started: &'a AtomicU64,
    /// `started` when the round began.
    started_before: u64,
    /// When the round's first request head is due: hyper's header timer
    /// starts with the round, so the time already waited is counted here.
    head_due: Instant,
    /// Whether this connection is served in rounds (plain TCP).
    may_rest: bool,
    /// Set at a rest: when it ends the round ([`REST_GRACE`]).
    rest_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The rest `rest_timer` is armed for is going on.
    timing_rest: bool,
    /// hyper was asked to end at a rest.
    rested: bool,
    /// hyper was asked to end because the proxy closes.
    closing: bool,
}

impl<I, S, B> Round<'_, http1::Connection<TokioIo<Prefixed<TargetWatch<I>>>, S>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    async fn run(&mut self, shutdown: &mut ShutdownWatch) -> Result<RoundEnd, hyper::Error> {
        let head_due = self.head_due;
        let mut head_timer = true;
        loop {
            tokio::select! {
                ended = std::future::poll_fn(|cx| self.poll_until_rest(cx)) => {
                    ended?;
                    return Ok(match (self.closing, self.switched, self.rested) {
                        (false, true, _) => RoundEnd::Switched,
                        (false, false, true) => RoundEnd::Rested,
                        _ => RoundEnd::Over,
                    });
                }
                () = closing(shutdown), if !self.closing => {
                    // Answers in progress are finished; an idle
                    // connection ends at once.
                    Pin::new(&mut *self.connection).graceful_shutdown();
                    self.closing = true;
                }
                () = tokio::time::sleep_until(head_due), if head_timer => {
                    // No head by its time: closed, as hyper's timer does.
                    if !self.has_a_request() {
                        return Ok(RoundEnd::Over);
                    }
                    head_timer = false;
                }
            }
        }
    }

    /// Whether a request of this round reached the proxy.
    fn has_a_request(&self) -> bool {
        self.started.load(Ordering::Acquire) != self.started_before
    }

    /// Drives hyper; when the stream has rested with no request in
    /// progress for [`REST_GRACE`], or at once when the watch holds a head
    /// for a round of the other kind and no request is in progress, asks
    /// hyper to end (it does at once: it is idle).
    fn poll_until_rest(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        loop {
            let polled = self.connection.poll_without_shutdown(cx);
            let idle = self.in_progress.load(Ordering::Acquire) == 0;
            let at_rest = self.resting.load(Ordering::Relaxed) && idle;
            if polled.is_ready() || self.rested || self.switched {
                return polled;
            }
            if idle && self.switch.is_some_and(|due| due.load(Ordering::Relaxed)) {
                self.switched = true;
                Pin::new(&mut *self.connection).graceful_shutdown();
                continue;
            }
            // (A connection that never rests, TLS, still switches rounds.)
            if !self.may_rest || !at_rest {
                self.timing_rest = false;
                return polled;
            }
            if !self.rest_over(cx) {
                return polled;
            }
            self.rested = true;
            Pin::new(&mut *self.connection).graceful_shutdown();
        }
    }

    /// Whether the rest going on has lasted [`REST_GRACE`]; arms the timer
    /// (one per round, reset for each rest) when it begins.
    fn rest_over(&mut self, cx: &mut Context<'_>) -> bool {
        let due = Instant::now() + REST_GRACE;
        let timer = self
            .rest_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if !self.timing_rest {
            timer.as_mut().reset(due);
            self.timing_rest = true;
        }
        timer.as_mut().poll(cx).is_ready()
    }
}
