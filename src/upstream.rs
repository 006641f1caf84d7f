//! The upstream: HTTP/1.1 connections to the one backend, kept alive in a
//! small pool, and the errors of sending a request on them.
//!
//! The contract the rest of the proxy relies on is in [`UpstreamError`]: every
//! failure says whether any byte of the request reached the backend. A refused
//! connect, or a pooled connection that hyper hands the request back from
//! (`TrySendError::take_message`), guarantees nothing was sent; anything after
//! hyper took the request counts as sent. A stale pooled connection is retried
//! on another one, since nothing was sent on it.
//!
//! Each request comes with its [`Delivery`]: `Expect: 100-continue` holds its
//! body back until the backend's `100`, and a connection goes back to the pool
//! only when the request body had ended before the response head arrived
//! and, for a request with a body, the answer is a success (otherwise the
//! backend may not have read the body, and would read the rest as the next
//! request). Header name
//! case is kept both ways (hyper's `preserve_header_case`, carried in the
//! request and response extensions).
//!
//! Where connections go is the [`BackendTarget`]'s, read at each connect; a
//! connection is reused only while the target is the one it was opened to.
//!
//! Response bodies that arrive fast are read in large reads, within the
//! [`ReadBudget`] (see [`crate::read_budget`]); hyper's buffer is then as
//! large as `backend.max_read_bytes`, so a response head is held to
//! `backend.max_head_bytes` here rather than by hyper's buffer, and a
//! connection that read in large reads goes back to the pool with hyper's
//! side of it built again on the same socket, which frees the buffer.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::backend_address::BackendAddress;
use crate::backend_slots::{BackendSlots, Slot};
use crate::backend_target::BackendTarget;
use crate::connector::{BackendStream, Connector};
use crate::delivery::Delivery;
use crate::gate::DownReason;
use crate::read_budget::{BudgetedRead, LargeReads, ReadBudget};
use crate::replay::BoxError;

/// hyper's smallest read buffer (its `max_buf_size` panics below this).
const MIN_BUF_SIZE: usize = 8192;

/// How long a pooled connection that read in large reads keeps its buffer
/// and budget share for the next response before they are freed: long
/// enough for a client's next part or range request, short enough that a
/// burst's buffers do not outlive it.
pub const LARGE_READS_REST: Duration = Duration::from_millis(250);

/// Longest one checkout waits for pooled connections to turn ready.
const CHECKOUT_WAIT: Duration = Duration::from_millis(50);

/// Why a request could not be sent, or got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the backend at {addr}: {source}")]
    Connect {
        addr: BackendAddress,
        source: io::Error,
    },
    #[error("the backend connection closed before the request was sent: {0}")]
    ClosedBeforeSend(hyper::Error),
    #[error("the backend failed after the request was sent: {0}")]
    Failed(hyper::Error),
    #[error("the backend made no progress for {0:?}")]
    Hang(Duration),
    #[error(
        "the backend's response head is {bytes} bytes, more than backend.max_head_bytes ({limit})"
    )]
    HeadTooLarge { bytes: usize, limit: usize },
    /// Every slot of `backend.max_connections` stayed taken for
    /// `backend.queue_timeout`: nothing was sent, and nothing is known of
    /// the backend.
    #[error("backend.max_connections connections stayed open for {0:?}")]
    NoSlot(Duration),
}

impl UpstreamError {
    /// True for a failed connect: conclusive by itself about the backend.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }

    /// True when some byte of the request may have reached the backend.
    pub fn reached_backend(&self) -> bool {
        matches!(
            self,
            UpstreamError::Failed(_) | UpstreamError::Hang(_) | UpstreamError::HeadTooLarge { .. }
        )
    }

    /// What this failure says about the backend; `None` when it says nothing
    /// about availability (an invalid response, a client body that failed).
    pub fn down_reason(&self) -> Option<DownReason> {
        match self {
            UpstreamError::Connect { source, .. } if source.kind() == io::ErrorKind::TimedOut => {
                Some(DownReason::HangTimeout)
            }
            UpstreamError::Connect { .. } => Some(DownReason::Refused),
            UpstreamError::ClosedBeforeSend(_) => Some(DownReason::Reset),
            UpstreamError::Failed(error) if error.is_parse() || error.is_user() => None,
            UpstreamError::Failed(_) => Some(DownReason::Reset),
            UpstreamError::Hang(_) => Some(DownReason::HangTimeout),
            UpstreamError::HeadTooLarge { .. } | UpstreamError::NoSlot(_) => None,
        }
    }
}

/// Connection settings for the backend.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub max_idle: usize,
    /// Longest wait for a slot under `backend.max_connections`.
    pub queue_timeout: Duration,
    pub idle_timeout: Duration,
    /// Most header fields accepted in a response head.
    pub max_headers: usize,
    /// Most bytes accepted in a response head (as written with `name:
    /// value` lines, RFC 9112 section 2.1).
    pub max_head_bytes: usize,
    /// Largest read of a response body that arrives fast, within the budget.
    pub max_read_bytes: usize,
}

/// A pool of keep-alive connections to the backend.
pub struct Upstream<B> {
    settings: RwLock<Arc<UpstreamSettings>>,
    target: Arc<BackendTarget>,
    /// One pool per lane ([`crate::lanes`]), whose connections' tasks run
    /// there, and one last for requests off the lanes.
    idle: Box<[IdlePool<B>]>,
    connects: AtomicU64,
    /// Shared by every connection's large reads.
    budget: Arc<ReadBudget>,
    /// `backend.max_connections`, shared with the raw path's pool.
    slots: Arc<BackendSlots>,
}

struct Idle<B> {
    connection: Connection<B>,
    since: Instant,
}

/// One HTTP/1.1 connection to the backend: the handle to send on and the
/// task that drives it, aborted (closing the socket) when the connection is
/// dropped.
struct Connection<B> {
    sender: SendRequest<B>,
    /// Where the connection goes; once the target moved it is not reused.
    connector: Arc<Connector>,
    /// `None` once detached: the task then ends by itself.
    task: Option<tokio::task::AbortHandle>,
    /// Whether the connection took a share of the read budget.
    large: LargeReads,
    /// Set when the connection is handed back to its task to be built
    /// again: to when it went idle, which the rebuilt one keeps (its
    /// `backend.idle_timeout` counts from there).
    rebuild: Rebuild,
}

impl<B> Connection<B> {
    /// Lets the task finish what it is sending and close by itself.
    fn detach(mut self) {
        self.task = None;
    }

    /// Hands the socket back to the task, which builds hyper's side of the
    /// connection again (freeing its read buffer and budget share) and puts
    /// it in the pool as idle since `since`.
    fn rebuild(self, since: Instant) {
        let _ = self.rebuild.set(since);
        self.detach();
    }
}

impl<B> Drop for Connection<B> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What was sent that decides whether the connection may be reused.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// The request went out as HTTP/1.0.
    http10: bool,
    /// The request had a body (not known empty when sent).
    body: bool,
}

/// When a connection handed back to be built again went idle.
type Rebuild = Arc<OnceLock<Instant>>;

/// What a response body needs to return its connection to the pool.
struct GiveBack<B> {
    connection: Connection<B>,
    pool: IdlePool<B>,
    max_idle: usize,
    slots: Arc<BackendSlots>,
}

type IdlePool<B> = Arc<Mutex<Vec<Idle<B>>>>;

/// Part `index` of a pool split over `lanes` lanes (part `lanes` is off
/// them): its share of `max_idle`, the shares adding up to `max_idle`.
fn idle_share(max_idle: usize, lanes: usize, index: usize) -> usize {
    if lanes == 0 {
        max_idle
    } else if index >= lanes {
        0
    } else {
        max_idle / lanes + usize::from(index < max_idle % lanes)
    }
}

/// Puts `connection`, idle since `since`, in the pool, or closes it when
/// the pool is full; while requests wait for one of
/// `backend.max_connections`, it is kept for them whatever the pool holds,
/// and they are told.
fn put_back<B>(
    pool: &IdlePool<B>,
    connection: Connection<B>,
    since: Instant,
    max_idle: usize,
    slots: &BackendSlots,
) {
    let wanted = slots.wanted();
    {
        let mut idle = pool.lock().unwrap();
        if idle.len() < max_idle || wanted {
            idle.push(Idle { connection, since });
        }
    }
    if wanted {
        slots.connection_idle();
    }
}

/// What a request waiting for one of `backend.max_connections` got.
enum Waited<B> {
    Slot(Slot),
    Pooled(Connection<B>),
}

/// What building hyper's side of a backend connection takes.
struct Handshake<B> {
    settings: Arc<UpstreamSettings>,
    connector: Arc<Connector>,
    budget: Arc<ReadBudget>,
    /// Where a connection built again goes, and how many that part of
    /// the pool keeps.
    pool: IdlePool<B>,
    max_idle: usize,
    slots: Arc<BackendSlots>,
}

type BackendIo = TokioIo<BudgetedRead<BackendStream>>;

impl<B> Handshake<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// hyper's side of a connection on `stream`, and the task that drives it.
    async fn build(self, stream: BackendStream) -> Result<Connection<B>, hyper::Error> {
        let (sender, connection, large) = self.open(stream).await?;
        let task_handle = Arc::new(OnceLock::new());
        let rebuild = Rebuild::default();
        let connector = Arc::clone(&self.connector);
        let task = tokio::spawn(drive(
            connection,
            Arc::clone(&rebuild),
            self,
            Arc::clone(&task_handle),
        ));
        let task = task_handle.get_or_init(|| task.abort_handle()).clone();
        Ok(Connection {
            sender,
            connector,
            task: Some(task),
            large,
            rebuild,
        })
    }

    /// hyper's handshake on `stream`, its reads within the budget.
    async fn open(
        &self,
        stream: BackendStream,
    ) -> Result<(SendRequest<B>, http1::Connection<BackendIo, B>, LargeReads), hyper::Error> {
        let settings = &self.settings;
        let large = LargeReads::default();
        let io = BudgetedRead::new(
            stream,
            Arc::clone(&self.budget),
            settings.max_head_bytes,
            large.clone(),
        );
        // hyper's largest read is also its head limit: the head limit is
        // checked apart (`head_bytes`), and the budget keeps reads under it
        // until a connection takes a share.
        let max_buf_size = settings
            .max_head_bytes
            .max(settings.max_read_bytes)
            .max(MIN_BUF_SIZE);
        let (sender, connection) = http1::Builder::new()
            .preserve_header_case(true)
            .max_headers(settings.max_headers)
            .max_buf_size(max_buf_size)
            .handshake(TokioIo::new(io))
            .await?;
        Ok((sender, connection, large))
    }
}

/// Drives one backend connection until hyper is done with it; then closes
/// the socket (as hyper would), or, when the connection was handed back to
/// be built again and nothing is left unread, builds hyper's side again on
/// the same socket, pools it and drives that.
async fn drive<B>(
    mut connection: http1::Connection<BackendIo, B>,
    mut rebuild: Rebuild,
    handshake: Handshake<B>,
    task_handle: Arc<OnceLock<tokio::task::AbortHandle>>,
) where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    loop {
        let parts = match connection.without_shutdown().await {
            Ok(parts) => parts,
            Err(error) => {
                tracing::debug!(%error, "backend connection ended");
                return;
            }
        };
        let mut stream = parts.io.into_inner().into_inner();
        let task = task_handle.get().cloned();
        let (Some(&since), true, Some(task)) = (rebuild.get(), parts.read_buf.is_empty(), task)
        else {
            if let Err(error) = stream.shutdown().await {
                tracing::debug!(%error, "backend connection ended");
            }
            return;
        };
        drop(parts.read_buf);
        let (sender, opened, large) = match handshake.open(stream).await {
            Ok(opened) => opened,
            Err(error) => {
                tracing::debug!(%error, "backend connection ended");
                return;
            }
        };
        connection = opened;
        rebuild = Rebuild::default();
        let rebuilt = Connection {
            sender,
            connector: Arc::clone(&handshake.connector),
            task: Some(task),
            large,
            rebuild: Arc::clone(&rebuild),
        };
        put_back(
            &handshake.pool,
            rebuilt,
            since,
            handshake.max_idle,
            &handshake.slots,
        );
    }
}

/// The size of a response head as written with `name: value` lines (RFC
/// 9112 section 2.1): what `backend.max_head_bytes` limits.
fn head_bytes<T>(response: &Response<T>) -> usize {
    let reason = match response.extensions().get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => reason.as_bytes().len(),
        None => response.status().canonical_reason().map_or(0, str::len),
    };
    let status_line = "HTTP/1.1 200 \r\n".len() + reason;
    response
        .headers()
        .iter()
        .fold(status_line + "\r\n".len(), |bytes, (name, value)| {
            bytes + name.as_str().len() + ": \r\n".len() + value.len()
        })
}

impl<B> Upstream<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// A pool of connections to wherever `target` points, in a part for
    /// each of `lanes` lanes. Large reads share `budget`; each connection
    /// holds one of `slots`.
    pub fn new(
        settings: UpstreamSettings,
        lanes: usize,
        target: Arc<BackendTarget>,
        budget: Arc<ReadBudget>,
        slots: Arc<BackendSlots>,
    ) -> Self {
        Upstream {
            settings: RwLock::new(Arc::new(settings)),
            target,
            idle: (0..=lanes).map(|_| IdlePool::default()).collect(),
            connects: AtomicU64::new(0),
            budget,
            slots,
        }
    }

    /// The slots of `backend.max_connections` its connections hold.
    pub fn slots(&self) -> Arc<BackendSlots> {
        Arc::clone(&self.slots)
    }

    /// The lanes the pool has a part for.
    pub fn lanes(&self) -> usize {
        self.idle.len() - 1
    }

    pub(crate) fn settings(&self) -> Arc<UpstreamSettings> {
        Arc::clone(&self.settings.read().unwrap())
    }

    /// The calling lane's part of the pool.
    fn pool(&self) -> &IdlePool<B> {
        &self.idle[self.pool_index()]
    }

    /// Which part of the pool the calling lane uses (the last: off the lanes).
    fn pool_index(&self) -> usize {
        let off_lanes = self.idle.len() - 1;
        crate::lanes::current()
            .filter(|lane| *lane < off_lanes)
            .unwrap_or(off_lanes)
    }

    /// Most idle connections the calling lane's part of the pool keeps: an
    /// even share of `backend.max_idle_connections` (the remainder to the
    /// first lanes), so that the parts together keep no more than it. Off
    /// the lanes nothing is kept while lanes serve.
    fn max_idle_per_pool(&self, settings: &UpstreamSettings) -> usize {
        idle_share(settings.max_idle, self.idle.len() - 1, self.pool_index())
    }

    /// Applies new settings (on reload).
    pub fn update_settings(&self, settings: UpstreamSettings) {
        *self.settings.write().unwrap() = Arc::new(settings);
    }

    /// Where connections go now (the backend target's connector).
    pub fn connector(&self) -> Arc<Connector> {
        self.target.connector()
    }

    /// Connections opened to the backend so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Sends `request` (origin-form URI) and waits for the response head.
    /// `delivery` is the state of the request's body (see the module doc);
    /// a `100 Continue` from the backend releases it.
    pub async fn send(
        &self,
        mut request: Request<B>,
        delivery: &Arc<Delivery>,
    ) -> Result<Response<PooledBody<B>>, UpstreamError> {
        // Only a withheld body waits for `100 Continue`; hyper skips the
        // 1xx answers of a request with no callback.
        if delivery.is_withheld() {
            let released = Arc::clone(delivery);
            hyper::ext::on_informational(&mut request, move |response| {
                if response.status() == http::StatusCode::CONTINUE {
                    released.release();
                }
            });
        }
        let sent = Sent {
            http10: request.version() == http::Version::HTTP_10,
            body: !request.body().is_end_stream(),
        };
        let settings = self.settings();
        while let Some(mut connection) = self.checkout(&settings).await {
            match connection.sender.try_send_request(request).await {
                Ok(response) => {
                    return self.answered(&settings, response, connection, delivery, sent);
                }
                Err(mut error) => match error.take_message() {
                    // The pooled connection was already closing: nothing sent.
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Failed(error.into_error())),
                },
            }
        }
        loop {
            let (mut connection, fresh) = Box::pin(self.connect(&settings, delivery)).await?;
            match connection.sender.try_send_request(request).await {
                Ok(response) => {
                    return self.answered(&settings, response, connection, delivery, sent);
                }
                Err(mut error) => match error.take_message() {
                    // One handed over from the pool was closing: another.
                    Some(unsent) if !fresh => request = unsent,
                    Some(_) => return Err(UpstreamError::ClosedBeforeSend(error.into_error())),
                    None => return Err(UpstreamError::Failed(error.into_error())),
                },
            }
        }
    }

    /// Closes the idle connections unused for `idle_timeout`. Checkout
    /// skips them too, but a pool no request draws from would otherwise keep
    /// them, each with its socket and its read buffer (up to
    /// `max_head_bytes`), for as long as the process lives.
    pub fn close_expired(&self) -> usize {
        let idle_timeout = self.settings().idle_timeout;
        let mut expired: Vec<Idle<B>> = Vec::new();
        for pool in &self.idle {
            let mut idle = pool.lock().unwrap();
            let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|idle| idle.since.elapsed() <= idle_timeout);
            *idle = kept;
            expired.extend(gone);
        }
        // Dropped outside the lock: each drop aborts its connection's task.
        let closed = expired.len();
        drop(expired);
        for _ in 0..closed {
            crate::heap_trim::released();
        }
        closed
    }

    /// Frees the read buffers and budget shares of the idle connections
    /// that read in large reads and have rested `rest` (the proxy's is
    /// [`LARGE_READS_REST`]): their tasks build them again and put them back.
    /// Returns how many.
    pub fn free_rested_large_reads(&self, rest: Duration) -> usize {
        let mut rested: Vec<Idle<B>> = Vec::new();
        for pool in &self.idle {
            let mut idle = pool.lock().unwrap();
            if !idle.iter().any(|idle| idle.connection.large.taken()) {
                continue;
            }
            let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|idle| idle.connection.large.taken() && idle.since.elapsed() >= rest);
            *idle = kept;
            rested.extend(done);
        }
        let count = rested.len();
        for idle in rested {
            idle.connection.rebuild(idle.since);
        }
        count
    }

    /// How long an idle connection may wait for its next request.
    pub fn idle_timeout(&self) -> Duration {
        self.settings().idle_timeout
    }

    /// Drops every idle connection (after the backend went away).
    pub fn clear_idle(&self) {
        for pool in &self.idle {
            pool.lock().unwrap().clear();
        }
    }

    /// Closes up to `count` idle connections that have rested at least
    /// `rested`, the longest idle first in each part of the pool, giving
    /// their slots back; returns how many. For requests waiting for one of
    /// `backend.max_connections` that cannot use a pooled connection (a
    /// raw-path resume): one a waiting request could use is taken within
    /// moments of coming free.
    pub fn shed_idle(&self, count: usize, rested: Duration) -> usize {
        let mut shed: Vec<Idle<B>> = Vec::new();
        for pool in &self.idle {
            let mut idle = pool.lock().unwrap();
            let mut index = 0;
            while index < idle.len() && shed.len() < count {
                if idle[index].since.elapsed() >= rested {
                    shed.push(idle.remove(index));
                } else {
                    index += 1;
                }
            }
        }
        // Dropped outside the locks: each drop aborts its connection's task.
        shed.len()
    }

    /// An idle connection ready for a request, if one is. The wait for
    /// readiness is one [`CHECKOUT_WAIT`] for the whole checkout, not one per
    /// connection: past it each remaining connection gets one poll, so a pool
    /// full of stale connections costs at most that wait. Connections to an
    /// earlier target are dropped on the way.
    async fn checkout(&self, settings: &UpstreamSettings) -> Option<Connection<B>> {
        self.checkout_from(self.pool(), settings).await
    }

    /// [`Upstream::checkout`] from any part of the pool, the calling lane's
    /// first: for a request that waits for one of `backend.max_connections`
    /// (a connection serves from any lane; its task stays on its own).
    async fn checkout_any(&self, settings: &UpstreamSettings) -> Option<Connection<B>> {
        let own = self.pool_index();
        let others = (0..self.idle.len()).filter(|index| *index != own);
        for index in std::iter::once(own).chain(others) {
            if let Some(connection) = self.checkout_from(&self.idle[index], settings).await {
                return Some(connection);
            }
        }
        None
    }

    /// [`Upstream::checkout`] from `pool`.
    async fn checkout_from(
        &self,
        pool: &IdlePool<B>,
        settings: &UpstreamSettings,
    ) -> Option<Connection<B>> {
        let target = self.target.connector();
        let deadline = Instant::now() + CHECKOUT_WAIT;
        loop {
            let mut idle = pool.lock().unwrap().pop()?;
            if idle.connection.sender.is_closed()
                || idle.since.elapsed() > settings.idle_timeout
                || *idle.connection.connector != *target
            {
                continue;
            }
            // Returned at the end of a response body; the connection task
            // needs one turn to accept the next request.
            if let Ok(Ok(())) =
                tokio::time::timeout_at(deadline, idle.connection.sender.ready()).await
            {
                return Some(idle.connection);
            }
        }
    }

    /// A new connection, once it has a slot of `backend.max_connections`;
    /// or, when every slot is taken, the first that comes: a free slot for
    /// a new one, or a pooled connection another request gave back. The
    /// wait is at most `backend.queue_timeout`, and `delivery` tells the
    /// attempt's watch of it. True with a new connection.
    async fn connect(
        &self,
        settings: &Arc<UpstreamSettings>,
        delivery: &Delivery,
    ) -> Result<(Connection<B>, bool), UpstreamError> {
        let slot = match self.slots.try_take() {
            Some(slot) => slot,
            None => {
                delivery.connection_wait_begins();
                let waited = self.wait_for_connection(settings).await;
                delivery.connection_wait_ends();
                match waited? {
                    Waited::Slot(slot) => slot,
                    Waited::Pooled(connection) => return Ok((connection, false)),
                }
            }
        };
        self.open(settings, slot)
            .await
            .map(|connection| (connection, true))
    }

    /// Waits up to `backend.queue_timeout` for a slot or a pooled
    /// connection given back, whichever comes first.
    async fn wait_for_connection(
        &self,
        settings: &UpstreamSettings,
    ) -> Result<Waited<B>, UpstreamError> {
        let deadline = Instant::now() + settings.queue_timeout;
        loop {
            let given_back = self.slots.idle_soon();
            let mut given_back = std::pin::pin!(given_back);
            given_back.as_mut().enable();
            if let Some(connection) = self.checkout_any(settings).await {
                return Ok(Waited::Pooled(connection));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                slot = self.slots.take(left) => {
                    return slot.map(Waited::Slot).ok_or(UpstreamError::NoSlot(settings.queue_timeout));
                }
                () = given_back => {}
            }
        }
    }

    /// A new connection holding `slot`.
    async fn open(
        &self,
        settings: &Arc<UpstreamSettings>,
        slot: Slot,
    ) -> Result<Connection<B>, UpstreamError> {
        let connector = self.target.connector();
        let addr = connector.address().clone();
        self.connects.fetch_add(1, Ordering::Relaxed);
        let stream = match tokio::time::timeout(settings.connect_timeout, connector.connect()).await
        {
            Ok(Ok(stream)) => stream.holding(slot),
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Err(_) => {
                let source = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                return Err(UpstreamError::Connect { addr, source });
            }
        };
        let handshake = Handshake {
            settings: Arc::clone(settings),
            connector,
            budget: Arc::clone(&self.budget),
            pool: Arc::clone(self.pool()),
            max_idle: self.max_idle_per_pool(settings),
            slots: Arc::clone(&self.slots),
        };
        handshake
            .build(stream)
            .await
            .map_err(UpstreamError::ClosedBeforeSend)
    }

    /// The response, with a body that returns the connection to the pool
    /// when it ends, if the connection may carry another request; an error
    /// when its head is over `backend.max_head_bytes` (the connection is
    /// closed then: its body is not read).
    fn answered(
        &self,
        settings: &UpstreamSettings,
        response: Response<Incoming>,
        connection: Connection<B>,
        delivery: &Delivery,
        sent: Sent,
    ) -> Result<Response<PooledBody<B>>, UpstreamError> {
        let bytes = head_bytes(&response);
        if bytes > settings.max_head_bytes {
            tracing::warn!(
                bytes,
                limit = settings.max_head_bytes,
                "the backend's response head is over backend.max_head_bytes: answered 502"
            );
            return Err(UpstreamError::HeadTooLarge {
                bytes,
                limit: settings.max_head_bytes,
            });
        }
        let (parts, body) = response.into_parts();
        let keep_alive = !parts
            .headers
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        // Answered before the whole body went out: the backend may read the
        // rest as a request. A withheld body is never sent: close the
        // connection with the response; a body still flowing finishes first.
        // A connection that carried HTTP/1.0 either way stays HTTP/1.0 in
        // hyper's client: later requests on it would go out as HTTP/1.0, and
        // a chunked body would lose its framing. It is not reused.
        let http11 = !sent.http10 && parts.version == http::Version::HTTP_11;
        // A body handed over whole is not a body the backend read: one that
        // answers early (an error before reading, as radosgw can after
        // `100 Continue`) and neither drains nor closes would take the rest
        // as the start of the next request, from any client. Only a success
        // says the body was consumed (S3 reads the whole body to store it).
        let consumed = !sent.body || parts.status.is_success();
        // A body sent unasked may be unread whatever the answer.
        let reusable =
            keep_alive && http11 && delivery.complete() && consumed && !delivery.sent_unasked();
        let (give_back, closing) = if reusable {
            let give_back = GiveBack {
                connection,
                pool: Arc::clone(self.pool()),
                max_idle: self.max_idle_per_pool(settings),
                slots: Arc::clone(&self.slots),
            };
            (Some(give_back), None)
        } else if delivery.is_withheld() {
            (None, Some(connection))
        } else {
            connection.detach();
            (None, None)
        };
        let mut pooled = PooledBody {
            inner: body,
            give_back,
            _closing: closing,
        };
        if pooled.inner.is_end_stream() {
            pooled.give_back();
        }
        Ok(Response::from_parts(parts, pooled))
    }
}

/// A response body that returns its connection to the pool once read to the end.
pub struct PooledBody<B> {
    inner: Incoming,
    give_back: Option<GiveBack<B>>,
    /// A connection closed when this body is dropped.
    _closing: Option<Connection<B>>,
}

impl<B> PooledBody<B> {
    fn give_back(&mut self) {
        if let Some(back) = self.give_back.take() {
            put_back(
                &back.pool,
                back.connection,
                Instant::now(),
                back.max_idle,
                &back.slots,
            );
        }
    }
}

impl<B> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            // hyper stops polling a body that says it has ended, so the last
            // frame returns the connection, not the `None` after it.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => {
                self.give_back.take();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Unpin for PooledBody<B> {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    /// A pooled connection that never turns ready: its connection task is
    /// alive but never runs (as one stuck behind a busy socket).
    async fn stale() -> Idle<Empty<Bytes>> {
        stale_with_peer().await.0
    }

    /// [`stale`], and the backend's end of its connection.
    async fn stale_with_peer() -> (Idle<Empty<Bytes>>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64);
        let (sender, connection) = http1::handshake(TokioIo::new(ours)).await.unwrap();
        let task = tokio::spawn(async move {
            let _never_polled = connection;
            std::future::pending::<()>().await
        });
        let connector = Arc::new(Connector::plain("127.0.0.1:9".parse().unwrap()));
        let idle = Idle {
            connection: Connection {
                sender,
                connector,
                task: Some(task.abort_handle()),
                large: LargeReads::default(),
                rebuild: Arc::default(),
            },
            since: Instant::now(),
        };
        (idle, theirs)
    }

    #[test]
    fn the_lanes_shares_of_idle_connections_add_up_to_the_limit() {
        for (max_idle, lanes) in [(512, 2), (1, 4), (5, 3), (0, 2), (7, 1)] {
            let shares: Vec<usize> = (0..=lanes)
                .map(|i| idle_share(max_idle, lanes, i))
                .collect();
            assert_eq!(shares.iter().sum::<usize>(), max_idle, "{shares:?}");
            assert!(
                shares[..lanes].iter().max().unwrap() - shares[..lanes].iter().min().unwrap() <= 1
            );
        }
        assert_eq!(idle_share(64, 0, 0), 64, "one pool without lanes");
    }

    fn pool(idle_timeout: Duration) -> Upstream<Empty<Bytes>> {
        let target = BackendTarget::new(Connector::plain("127.0.0.1:9".parse().unwrap()), false);
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(1),
            max_idle: 64,
            queue_timeout: Duration::from_secs(30),
            idle_timeout,
            max_headers: 100,
            max_head_bytes: 64 * 1024,
            max_read_bytes: 512 * 1024,
        };
        let budget = Arc::new(ReadBudget::new(32 << 20, 512 << 10));
        let slots = Arc::new(BackendSlots::new(None));
        Upstream::new(settings, 0, target, budget, slots)
    }

    #[tokio::test(start_paused = true)]
    async fn connections_idle_for_the_idle_timeout_are_closed_even_if_no_request_comes() {
        use tokio::io::AsyncReadExt;
        let upstream = pool(Duration::from_secs(30));
        let (old, mut old_backend) = stale_with_peer().await;
        upstream.pool().lock().unwrap().push(old);
        tokio::time::advance(Duration::from_secs(20)).await;
        let (recent, mut recent_backend) = stale_with_peer().await;
        upstream.pool().lock().unwrap().push(recent);
        tokio::time::advance(Duration::from_secs(11)).await;

        assert_eq!(upstream.close_expired(), 1);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), old_backend.read(&mut byte))
            .await
            .expect("the backend sees the old connection closed");
        assert_eq!(read.unwrap(), 0);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), recent_backend.read(&mut byte))
                .await
                .is_err(),
            "the recent one stays open"
        );
        assert_eq!(upstream.pool().lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn only_connections_left_idle_a_while_are_shed_for_waiting_requests() {
        let upstream = pool(Duration::from_secs(30));
        let (old, _old_backend) = stale_with_peer().await;
        upstream.pool().lock().unwrap().push(old);
        tokio::time::advance(Duration::from_millis(200)).await;
        let (fresh, _fresh_backend) = stale_with_peer().await;
        upstream.pool().lock().unwrap().push(fresh);

        assert_eq!(upstream.shed_idle(5, Duration::from_millis(50)), 1);
        assert_eq!(
            upstream.pool().lock().unwrap().len(),
            1,
            "the one just given back stays for a waiting request to take"
        );
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(upstream.shed_idle(5, Duration::from_millis(50)), 1);
        assert!(upstream.pool().lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_of_stale_connections_costs_one_wait_not_one_per_connection() {
        let upstream = pool(Duration::from_secs(30));
        for _ in 0..64 {
            let idle = stale().await;
            upstream.pool().lock().unwrap().push(idle);
        }
        let started = Instant::now();
        assert!(upstream.checkout(&upstream.settings()).await.is_none());
        // Paused time: the clock moved only by the waits checkout made.
        assert_eq!(started.elapsed(), CHECKOUT_WAIT);
        assert!(upstream.pool().lock().unwrap().is_empty());
    }

    /// A backend on 127.0.0.1 that answers every request on a connection
    /// with `head` and then `body_bytes` bytes, and counts its connections.
    async fn backend(head: String, body_bytes: usize) -> (Connector, Arc<AtomicU64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&accepted);
        let answer = Bytes::from([head.into_bytes(), vec![b'x'; body_bytes]].concat());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::Relaxed);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n @ 1..) = socket.read(&mut buf).await else {
                            return;
                        };
                        request.extend_from_slice(&buf[..n]);
                        if request.windows(4).any(|w| w == b"\r\n\r\n") {
                            request.clear();
                            if socket.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (Connector::plain(address.into()), accepted)
    }

    fn upstream_to(connector: Connector, budget: &Arc<ReadBudget>) -> Upstream<Empty<Bytes>> {
        upstream_capped(connector, budget, None, Duration::from_secs(30))
    }

    /// [`upstream_to`] with `backend.max_connections` and
    /// `backend.queue_timeout`.
    fn upstream_capped(
        connector: Connector,
        budget: &Arc<ReadBudget>,
        max_connections: Option<usize>,
        queue_timeout: Duration,
    ) -> Upstream<Empty<Bytes>> {
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(5),
            max_idle: 64,
            queue_timeout,
            idle_timeout: Duration::from_secs(30),
            max_headers: 100,
            max_head_bytes: 64 << 10,
            max_read_bytes: 512 << 10,
        };
        Upstream::new(
            settings,
            0,
            BackendTarget::new(connector, false),
            Arc::clone(budget),
            Arc::new(BackendSlots::new(max_connections)),
        )
    }

    /// A GET with nothing left to send.
    async fn get(upstream: &Upstream<Empty<Bytes>>) -> Result<Bytes, UpstreamError> {
        use http_body_util::BodyExt;
        let response = get_head(upstream).await?;
        Ok(response.into_body().collect().await.unwrap().to_bytes())
    }

    /// The response head of a GET with nothing left to send, its body unread.
    async fn get_head(
        upstream: &Upstream<Empty<Bytes>>,
    ) -> Result<Response<PooledBody<Empty<Bytes>>>, UpstreamError> {
        let request = Request::get("/bucket/key")
            .header("host", "backend")
            .body(Empty::new())
            .unwrap();
        let delivery = Arc::new(Delivery::for_request(request.version(), request.headers()));
        delivery.mark_complete();
        upstream.send(request, &delivery).await
    }

    fn ok_head(body_bytes: usize, extra: &str) -> String {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {body_bytes}\r\n{extra}\r\n")
    }

    #[tokio::test]
    async fn a_response_head_over_the_head_limit_is_refused_though_reads_are_larger() {
        let filler = format!("X-Amz-Meta-Filler: {}\r\n", "f".repeat(70 << 10));
        let (connector, _) = backend(ok_head(2, &filler), 2).await;
        let budget = Arc::new(ReadBudget::new(4 << 20, 512 << 10));
        let upstream = upstream_to(connector, &budget);
        match get(&upstream).await {
            Err(UpstreamError::HeadTooLarge { bytes, limit }) => {
                assert_eq!(bytes, ok_head(2, &filler).len());
                assert_eq!(limit, 64 << 10);
            }
            other => panic!("expected HeadTooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_head_within_the_limit_is_counted_as_written() {
        let (connector, _) = backend(ok_head(2, "ETag: \"abc\"\r\n"), 2).await;
        let budget = Arc::new(ReadBudget::new(4 << 20, 512 << 10));
        let upstream = upstream_to(connector, &budget);
        let request = Request::get("/").body(Empty::new()).unwrap();
        let delivery = Arc::new(Delivery::for_request(request.version(), request.headers()));
        delivery.mark_complete();
        let response = upstream.send(request, &delivery).await.unwrap();
        assert_eq!(head_bytes(&response), ok_head(2, "ETag: \"abc\"\r\n").len());
    }

    #[tokio::test]
    async fn a_fast_body_is_read_in_large_reads_whose_buffer_is_freed_once_the_connection_rests() {
        const BODY: usize = 8 << 20;
        let (connector, accepted) = backend(ok_head(BODY, ""), BODY).await;
        let budget = Arc::new(ReadBudget::new(4 << 20, 512 << 10));
        let upstream = upstream_to(connector, &budget);

        assert_eq!(get(&upstream).await.unwrap().len(), BODY);
        assert_eq!(
            budget.available(),
            (4 << 20) - budget.share(),
            "one share taken"
        );
        let idle_since = upstream.pool().lock().unwrap()[0].since;
        assert_eq!(upstream.free_rested_large_reads(Duration::ZERO), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while budget.available() != 4 << 20 || upstream.pool().lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the share never came back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            upstream.pool().lock().unwrap()[0].since,
            idle_since,
            "backend.idle_timeout still counts from when the connection went idle"
        );

        assert_eq!(get(&upstream).await.unwrap().len(), BODY);
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "the same socket served both"
        );
        assert_eq!(upstream.connects(), 1);
    }

    #[tokio::test]
    async fn a_request_over_the_backend_cap_waits_for_the_connection_a_finished_one_gives_back() {
        use http_body_util::BodyExt;
        let (connector, accepted) = backend(ok_head(2, ""), 2).await;
        let budget = Arc::new(ReadBudget::new(4 << 20, 512 << 10));
        let upstream = Arc::new(upstream_capped(
            connector,
            &budget,
            Some(1),
            Duration::from_secs(30),
        ));
        let first = get_head(&upstream).await.unwrap();
        let second = tokio::spawn({
            let upstream = Arc::clone(&upstream);
            async move { get(&upstream).await }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !upstream.slots().wanted() {
            assert!(Instant::now() < deadline, "the second request never waited");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one connection at most"
        );

        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 2);
        assert_eq!(second.await.unwrap().unwrap().len(), 2);
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "the first connection was handed to the waiting request"
        );
        assert_eq!(upstream.connects(), 1);
    }

    #[tokio::test]
    async fn a_request_that_waits_the_queue_timeout_for_a_backend_connection_is_not_sent() {
        let (connector, accepted) = backend(ok_head(2, ""), 2).await;
        let budget = Arc::new(ReadBudget::new(4 << 20, 512 << 10));
        let upstream = upstream_capped(connector, &budget, Some(1), Duration::from_millis(200));
        let _busy = get_head(&upstream).await.unwrap();
        let error = get(&upstream).await.expect_err("no slot came free");
        assert!(matches!(error, UpstreamError::NoSlot(_)), "{error:?}");
        assert!(!error.reached_backend());
        assert_eq!(error.down_reason(), None, "says nothing of the backend");
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }
}
