//! The S3 listeners: accept loops for plain HTTP and for HTTPS, and serving
//! each client connection (HTTP/1.1, or HTTP/2 by ALPN or prior knowledge).
//!
//! Every connection is watched for graceful shutdown. A TLS handshake gets
//! [`HANDSHAKE_TIMEOUT`]; a client that sends anything but a TLS handshake is
//! dropped and counted, and the listener carries on. The departure watch of
//! [`Peer`] sits on the TCP socket below TLS, so it works for both.
//!
//! Client-side limits ([`ClientLimits`]): a request head must arrive within
//! `listener.header_timeout` of the connection's start or of the previous
//! response (so an idle HTTP/1.1 keep-alive connection is closed then too);
//! HTTP/2 connections are pinged at that interval and closed when the client
//! stops answering; a client that takes no response byte for
//! `listener.send_timeout` is cut ([`SendTimeout`]). A connection that sends
//! no byte for `listener.header_timeout`, or an HTTP/2 one with no request in
//! progress for as long, is closed ([`Silence`]). At most
//! `listener.max_connections` connections are open at once: one more gets
//! `503 SlowDown` (plain HTTP) or is closed (HTTPS) at once.
//!
//! A plain-HTTP/1.1 connection that has rested between requests leaves its
//! task for [`crate::resting`] (`rest`), keeping only what a
//! [`ParkedConnection`] holds, and comes back in a new task with a new
//! [`Peer`] when its next bytes arrive ([`resting_connections`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::keep_alive::{self, Prefixed, Rounds};
use crate::lanes::Lanes;
use crate::peer::{ClientSocket, Peer, RequestInProgress};
use crate::proxy::Proxy;
use crate::raw_http1::RawPath;
use crate::read_budget::ReadBudget;
use crate::request_target::{Silence, TargetWatch};
use crate::response::ProxyBody;
use crate::resting::Resting;
use crate::round_kind::{COMMON_FIELDS, LargeBodyReads, RoundKind, RoundKinds};
use crate::s3_error::ProxyError;
use crate::send_timeout::SendTimeout;
use crate::shutdown::{Phase, ShutdownWatch};
use crate::splice::Pipes;

/// Longest a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/2 client may take to answer a ping.
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Refused connections being answered at once; beyond, they are closed.
const MAX_REFUSING: usize = 256;
/// How long a refused client's bytes are read (so the answer is not lost
/// to a reset), and how many.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL_LINGER_BYTES: usize = 64 << 10;

/// One S3 listening socket, plain or TLS.
pub struct S3Listener {
    pub socket: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub limits: ClientLimits,
    /// Shared by every S3 listener: `listener.max_connections` permits.
    pub slots: Arc<ConnectionSlots>,
    /// The shutdown phase, watched by every connection: while draining,
    /// every HTTP/1.x answer carries `Connection: close` and HTTP/2
    /// connections get GOAWAY, so clients reconnect (elsewhere, once the
    /// load balancer knows, or to the process that took the sockets over).
    pub shutdown: ShutdownWatch,
    /// Where plain-HTTP/1.1 connections rest between requests; `None` for
    /// TLS (a TLS connection is served in its task throughout).
    pub resting: Option<RestingConnections>,
    /// The memory large request bodies are read in (see [`crate::round_kind`]):
    /// plain HTTP/1.1 only, whose connections are served in rounds; `None`
    /// for TLS, or with large reads off.
    pub read_budget: Option<Arc<ReadBudget>>,
    /// Where accepted connections are served, each on one lane throughout.
    pub lanes: Arc<Lanes>,
}

/// What a client connection may send and how long it may take: a larger
/// head than `max_headers` / `max_head_bytes` gets `431`; a request body of
/// at least `max_read_bytes` is read in reads of up to that many bytes
/// (plain HTTP/1.1, see [`BodyReads`]); the timeouts are
/// `listener.header_timeout` and `listener.send_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_headers: usize,
    pub max_head_bytes: usize,
    pub max_read_bytes: usize,
    pub header_timeout: Duration,
    pub send_timeout: Duration,
    /// Plain GET and HEAD requests take the raw path
    /// (`listener.raw_http1`, [`crate::raw_http1`]).
    pub raw_http1: bool,
}

/// One open client connection's place, counted in `s3fp_client_connections`.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<crate::metrics::Metrics>,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<crate::metrics::Metrics>) -> ConnectionSlot {
        metrics.client_connection(true);
        ConnectionSlot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.metrics.client_connection(false);
    }
}

/// The client connections the listeners may have open at once.
#[derive(Debug)]
pub struct ConnectionSlots {
    open: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    /// The pipes the raw path splices large bodies through.
    pipes: Arc<Pipes>,
}

impl ConnectionSlots {
    /// `max_connections` places, one eighth as many (at most
    /// [`MAX_REFUSING`]) for connections being refused, and `max_pipes`
    /// pipes: the file-descriptor budget counts all three.
    pub fn new(max_connections: usize, max_pipes: usize) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            open: Arc::new(Semaphore::new(max_connections)),
            refusing: Arc::new(Semaphore::new((max_connections / 8).clamp(1, MAX_REFUSING))),
            pipes: Arc::new(Pipes::new(max_pipes)),
        })
    }

    /// The pipes the raw path splices large bodies through.
    pub fn pipes(&self) -> Arc<Pipes> {
        Arc::clone(&self.pipes)
    }
}

impl S3Listener {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// Accepts until `stop` turns true; connections live on, each watching the
/// shutdown phase.
pub async fn accept_loop(listener: S3Listener, proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, address)) => accept(stream, address, &listener, &proxy),
            Err(error) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn accept(stream: TcpStream, address: SocketAddr, listener: &S3Listener, proxy: &Arc<Proxy>) {
    let _ = stream.set_nodelay(true);
    let Ok(permit) = Arc::clone(&listener.slots.open).try_acquire_owned() else {
        proxy.metrics().connection_refused();
        refuse(stream, address, listener);
        return;
    };
    let slot = ConnectionSlot::new(permit, Arc::clone(proxy.metrics()));
    // The socket moves to the lane's event loop.
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(%error, client = %address, "an accepted connection could not be handed to a lane");
            return;
        }
    };
    let proxy = Arc::clone(proxy);
    let scheme = listener.scheme();
    let limits = listener.limits;
    let shutdown = listener.shutdown.clone();
    let resting = listener.resting.clone();
    let read_budget = listener.read_budget.clone();
    let pipes = listener.slots.pipes();
    let tls = listener.tls.clone();
    listener.lanes.spawn(async move {
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, client = %address, "an accepted connection could not join a lane");
                return;
            }
        };
        let (stream, peer) = ClientSocket::new(stream, address);
        let connection = Connection {
            peer,
            proxy,
            scheme,
            limits,
            shutdown,
            _slot: slot,
            resting,
            read_budget,
            pipes,
        };
        match tls {
            None => serve(stream, connection).await,
            Some(acceptor) => handshake_and_serve(acceptor, stream, connection).await,
        }
    });
}

/// Serves an HTTPS connection once its TLS handshake is done, within
/// [`HANDSHAKE_TIMEOUT`].
async fn handshake_and_serve(acceptor: TlsAcceptor, stream: ClientSocket, connection: Connection) {
    let metrics = Arc::clone(connection.proxy.metrics());
    let address = connection.peer.address;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => serve(tls, connection).await,
        Ok(Err(error)) => {
            metrics.tls_handshake_failed();
            tracing::debug!(%error, client = %address, "TLS handshake failed");
        }
        Err(_) => {
            metrics.tls_handshake_failed();
            tracing::debug!(client = %address, "TLS handshake timed out");
        }
    }
}

/// A connection over `listener.max_connections`: plain HTTP gets `503
/// SlowDown` (S3 SDKs retry it) and its further bytes are read for a moment
/// so the answer arrives; HTTPS is closed (answering would take a handshake).
fn refuse(stream: TcpStream, address: SocketAddr, listener: &S3Listener) {
    tracing::debug!(client = %address, "refused: listener.max_connections connections are open");
    if listener.tls.is_some() {
        return;
    }
    let Ok(refusing) = Arc::clone(&listener.slots.refusing).try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _refusing = refusing;
        let mut stream = stream;
        let answer = ProxyError::TooManyConnections.to_http1_bytes(
            &hyper::Method::GET,
            "",
            &crate::access_log::next_request_id(),
        );
        if stream.write_all(&answer).await.is_err() || stream.shutdown().await.is_err() {
            return;
        }
        let mut scratch = [0u8; 8 << 10];
        let mut dropped = 0;
        let linger = async {
            while dropped < REFUSAL_LINGER_BYTES {
                match stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => dropped += n,
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
    });
}

/// What serving one client connection needs.
struct Connection {
    peer: Arc<Peer>,
    proxy: Arc<Proxy>,
    scheme: &'static str,
    limits: ClientLimits,
    shutdown: ShutdownWatch,
    _slot: ConnectionSlot,
    /// Where the connection rests between requests (plain TCP only).
    resting: Option<RestingConnections>,
    /// For large request bodies (plain TCP only, see [`BodyReads`]).
    read_budget: Option<Arc<ReadBudget>>,
    /// For large answer bodies on the raw path.
    pipes: Arc<Pipes>,
}

impl Connection {
    /// How this connection's socket is wrapped for hyper.
    fn layers(&self) -> ClientLayers {
        ClientLayers {
            peer: Arc::clone(&self.peer),
            limits: self.limits,
            read_budget: self.read_budget.clone(),
            raw: self.raw_http1(),
            raw_uploads_from: raw_uploads_from(self.proxy.settings().replay_buffer),
        }
    }

    /// Whether the connection's plain GETs and HEADs take the raw path: plain
    /// TCP (the connections that rest) with `listener.raw_http1`.
    fn raw_http1(&self) -> bool {
        self.limits.raw_http1 && self.resting.is_some()
    }
}

/// What the requests of one connection tell its shutdown watch: that it
/// speaks HTTP/2, and that a request arrived while draining (GOAWAY due).
#[derive(Default)]
struct GoAway {
    http2: AtomicBool,
    due: Notify,
}

/// How a client socket is wrapped for hyper: the send timeout, then the
/// request-target watch (see [`TargetWatch`] and [`Silence`]).
struct ClientLayers {
    peer: Arc<Peer>,
    limits: ClientLimits,
    read_budget: Option<Arc<ReadBudget>>,
    /// Raw rounds ([`crate::raw_http1`]): plain TCP with `listener.raw_http1`.
    raw: bool,
    /// The smallest upload body a raw round takes, in bytes.
    raw_uploads_from: u64,
}

/// The smallest upload body the raw path takes, in bytes: one worth a pipe
/// ([`crate::splice::WORTH_SPLICING`]) that the hyper path could not keep a
/// copy of (`hold.replay_buffer`, `replay_buffer` bytes) to send again
/// after a crash, so that splicing it loses nothing. The raw path checks
/// the buffer again for each upload (it may be reloaded).
fn raw_uploads_from(replay_buffer: usize) -> u64 {
    (replay_buffer as u64)
        .saturating_add(1)
        .max(crate::splice::WORTH_SPLICING)
}

impl ClientLayers {
    fn watch<I>(&self, socket: I) -> TargetWatch<SendTimeout<I>> {
        let (limits, peer) = (&self.limits, &self.peer);
        let watch = TargetWatch::new(
            SendTimeout::new(socket, limits.send_timeout),
            Arc::clone(&peer.cut_targets),
            limits.max_head_bytes,
            Silence::new(
                limits.header_timeout,
                (
                    Arc::clone(&peer.requests_in_progress),
                    Arc::clone(&peer.requests_started),
                ),
                Arc::clone(&peer.paces),
                limits.send_timeout,
            ),
        );
        let large = match &self.read_budget {
            Some(budget) if limits.max_read_bytes > limits.max_head_bytes => Some(
                LargeBodyReads::new(Arc::clone(budget), limits.max_read_bytes),
            ),
            _ => None,
        };
        let rounds = RoundKinds::new(limits.max_headers, large, self.raw)
            .map(|rounds| rounds.with_raw_uploads(self.raw_uploads_from));
        watch.with_rounds(rounds)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> keep_alive::Layers<I> for ClientLayers {
    type Inner = SendTimeout<I>;

    fn wrap(&self, socket: I) -> TargetWatch<SendTimeout<I>> {
        self.watch(socket).after_a_rest()
    }

    fn unwrap(&self, io: TargetWatch<SendTimeout<I>>) -> I {
        io.into_inner().into_inner()
    }

    fn http1(&self, kind: RoundKind) -> http1::Builder {
        let limits = &self.limits;
        // hyper's largest read is also its limit on a head and on the
        // response bytes it queues: larger only in a round the watch keeps
        // to large request bodies (see `round_kind`).
        let max_buf_size = match kind {
            RoundKind::LargeBodies => limits.max_head_bytes.max(limits.max_read_bytes),
            RoundKind::Common | RoundKind::ManyFields | RoundKind::Raw => limits.max_head_bytes,
        };
        let mut builder = http1::Builder::new();
        builder
            // Header names reach the backend, and come back, as written.
            .preserve_header_case(true)
            // A client that half-closes after its request still gets the answer.
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(max_buf_size);
        // Unset, hyper parses into its 100 field slots on the stack; set, it
        // allocates and fills that many per head (see `round_kind`).
        let common = matches!(kind, RoundKind::Common | RoundKind::Raw);
        if !common || limits.max_headers < COMMON_FIELDS {
            builder.max_headers(limits.max_headers);
        }
        builder
    }
}

/// A connection's serving once its protocol is known, boxed (see [`serve`]).
type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A client socket that may rest without a task ([`Resting`]): the plain
/// TCP one; a TLS session keeps state of its own and never rests.
trait Parkable: Sized {
    fn into_client_socket(self) -> Result<ClientSocket, Self>;
}

impl Parkable for ClientSocket {
    fn into_client_socket(self) -> Result<ClientSocket, Self> {
        Ok(self)
    }
}

impl Parkable for tokio_rustls::server::TlsStream<ClientSocket> {
    fn into_client_socket(self) -> Result<ClientSocket, Self> {
        Err(self)
    }
}

/// Serves one client connection. Each stage is boxed and built in a block
/// of its own: the task is sized for what it keeps between stages, not for
/// the stages.
async fn serve<I>(io: I, mut connection: Connection)
where
    I: AsyncRead + AsyncWrite + Parkable + Unpin + Send + 'static,
{
    let serving: Serving = {
        let head_due = tokio::time::Instant::now() + connection.limits.header_timeout;
        let layers = connection.layers();
        // The first bytes say HTTP/1.1, or HTTP/2 by its preface (after
        // ALPN `h2`, or with prior knowledge over plain TCP). Read in this
        // block, so that the space for what it returns is not kept in the
        // task for the length of the connection.
        let sniffed = {
            let peer = &connection.peer;
            Box::pin(sniff(layers.watch(io), &mut connection.shutdown, peer))
        };
        let Some((io, first)) = sniffed.await else {
            crate::heap_trim::released();
            return;
        };
        if io.is_http2() {
            Box::pin(serve_http2_connection(io, first, connection))
        } else {
            let start = Box::new((io, head_due, first));
            Box::pin(serve_http1_connection(start, layers, connection))
        }
    };
    serving.await;
    crate::heap_trim::released();
}

/// The service a connection's requests go to.
fn service(
    connection: &Connection,
    go_away: &Arc<GoAway>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<ProxyBody>,
    Error = Infallible,
    Future = Answer,
> + Clone
+ Unpin
+ Send
+ use<> {
    let shutdown = connection.shutdown.clone();
    let go_away = Arc::clone(go_away);
    let peer = Arc::clone(&connection.peer);
    let proxy = Arc::clone(&connection.proxy);
    let scheme = connection.scheme;
    service_fn(move |request: hyper::Request<Incoming>| -> Answer {
        if request.version() >= hyper::Version::HTTP_2 {
            go_away.http2.store(true, Ordering::Relaxed);
            if *shutdown.borrow() != Phase::Serving {
                go_away.due.notify_one();
            }
        }
        Box::pin(respond(
            request,
            Arc::clone(&proxy),
            Arc::clone(&peer),
            scheme,
            shutdown.clone(),
        ))
    })
}

async fn serve_http2_connection<I>(
    io: TargetWatch<SendTimeout<I>>,
    first: Bytes,
    connection: Connection,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let go_away = Arc::new(GoAway::default());
    let service = service(&connection, &go_away);
    let io = TokioIo::new(Prefixed::new(first, io));
    let shutdown = connection.shutdown.clone();
    if let Err(error) = serve_http2(io, service, connection.limits, shutdown, go_away).await {
        tracing::debug!(%error, client = %connection.peer.address, "client connection ended with an error");
    }
}

/// Serves an HTTP/1.1 connection in rounds ([`keep_alive`]). A plain TCP
/// connection that rests leaves this task for [`Resting`] ([`rest`]).
/// (A function that returns its future boxed: it and [`rest`] call each
/// other.)
fn serve_http1_connection<I>(
    start: Box<keep_alive::Start<SendTimeout<I>>>,
    layers: ClientLayers,
    connection: Connection,
) -> Serving
where
    I: AsyncRead + AsyncWrite + Parkable + Unpin + Send + 'static,
{
    Box::pin(serve_http1_rounds(start, layers, connection))
}

async fn serve_http1_rounds<I>(
    start: Box<keep_alive::Start<SendTimeout<I>>>,
    layers: ClientLayers,
    mut connection: Connection,
) where
    I: AsyncRead + AsyncWrite + Parkable + Unpin + Send + 'static,
{
    let served = {
        let go_away = Arc::new(GoAway::default());
        let rounds = Rounds {
            in_progress: Arc::clone(&connection.peer.requests_in_progress),
            started: Arc::clone(&connection.peer.requests_started),
            layers,
            rests: connection.resting.is_some(),
            header_timeout: connection.limits.header_timeout,
            // Plain TCP only, at first.
            raw: connection.raw_http1().then(|| {
                RawPath::new(
                    Arc::clone(&connection.proxy),
                    Arc::clone(&connection.peer),
                    connection.scheme,
                    connection.limits.header_timeout,
                    connection.limits.max_head_bytes,
                    connection.limits.send_timeout,
                    Arc::clone(&connection.pipes),
                )
            }),
        };
        let service = service(&connection, &go_away);
        Box::pin(keep_alive::serve_http1(
            start,
            service,
            rounds,
            &mut connection.shutdown,
        ))
        .await
    };
    match served {
        Ok(keep_alive::Served::Ended) => {}
        Ok(keep_alive::Served::Rested { socket, head_due }) => match socket.into_client_socket() {
            Ok(socket) => rest(socket, head_due, connection).await,
            // Only plain TCP rests (`rests` is false for any other).
            Err(socket) => drop(socket),
        },
        Err(error) => {
            tracing::debug!(%error, client = %connection.peer.address, "client connection ended with an error");
        }
    }
}

/// A rested connection: parked in [`Resting`] until its next bytes, its
/// head timeout or the proxy closing, without its task or its [`Peer`]
/// (a new one is made when it resumes). Should the socket not leave
/// tokio, it waits here instead.
fn rest(socket: ClientSocket, head_due: tokio::time::Instant, connection: Connection) -> Serving {
    Box::pin(rest_until_next_bytes(socket, head_due, connection))
}

async fn rest_until_next_bytes(
    socket: ClientSocket,
    head_due: tokio::time::Instant,
    mut connection: Connection,
) {
    let Some(resting) = connection.resting.clone() else {
        return;
    };
    match socket.into_std() {
        Ok(Ok(socket)) => {
            let kept = ParkedConnection::from(connection);
            // Back to this lane when it resumes: its backend connections are here.
            let lane = crate::lanes::current().unwrap_or(0);
            let parked = resting.park(socket, head_due.into_std(), lane, kept);
            if let Err((socket, kept)) = parked
                && let Ok(stream) = TcpStream::from_std(socket)
            {
                resting.resume(stream, head_due.into_std(), kept).await;
            }
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, client = %connection.peer.address, "a resting connection could not leave the runtime: closed");
        }
        Err(socket) => {
            let tcp = socket.shared();
            let layers = connection.layers();
            let next = keep_alive::next_bytes(&tcp, head_due, &mut connection.shutdown).await;
            drop(tcp);
            if !next {
                keep_alive::shut_down(keep_alive::Layers::wrap(&layers, socket)).await;
                return;
            }
            let io = keep_alive::Layers::wrap(&layers, socket);
            let start = Box::new((io, head_due, Bytes::new()));
            serve_http1_connection(start, layers, connection).await;
        }
    }
}

/// Where plain-HTTP/1.1 connections rest between requests.
pub type RestingConnections = Resting<ParkedConnection>;

/// What a parked connection keeps of its `Connection`: what is the same
/// for every connection (the proxy, the limits) is kept once, by
/// [`resting_connections`], and a new [`Peer`] is made when it resumes.
pub struct ParkedConnection {
    address: SocketAddr,
    shutdown: ShutdownWatch,
    slot: ConnectionSlot,
}

impl From<Connection> for ParkedConnection {
    fn from(connection: Connection) -> ParkedConnection {
        ParkedConnection {
            address: connection.peer.address,
            shutdown: connection.shutdown,
            slot: connection._slot,
        }
    }
}

/// Starts the resting place of the plain-HTTP listener's connections.
pub fn resting_connections(
    proxy: Arc<Proxy>,
    limits: ClientLimits,
    read_budget: Option<Arc<ReadBudget>>,
    lanes: Arc<Lanes>,
    pipes: Arc<Pipes>,
) -> std::io::Result<RestingConnections> {
    Resting::start(
        Box::new(move |lane, resumed| lanes.spawn_on(lane, resumed)),
        Box::new(move |resting, stream, head_due, kept| {
            let resumed = Resumed {
                proxy: Arc::clone(&proxy),
                limits,
                resting,
                read_budget: read_budget.clone(),
                pipes: Arc::clone(&pipes),
            };
            Box::pin(resume(stream, head_due.into(), kept, resumed))
        }),
    )
}

/// What a resumed connection gets back besides what it kept.
struct Resumed {
    proxy: Arc<Proxy>,
    limits: ClientLimits,
    resting: RestingConnections,
    read_budget: Option<Arc<ReadBudget>>,
    pipes: Arc<Pipes>,
}

/// A parked connection back from [`Resting`]: its socket had bytes.
async fn resume(
    stream: TcpStream,
    head_due: tokio::time::Instant,
    kept: ParkedConnection,
    resumed: Resumed,
) {
    let (socket, peer) = ClientSocket::new(stream, kept.address);
    let connection = Connection {
        peer,
        proxy: resumed.proxy,
        scheme: "http",
        limits: resumed.limits,
        shutdown: kept.shutdown,
        _slot: kept.slot,
        resting: Some(resumed.resting),
        read_budget: resumed.read_budget,
        pipes: resumed.pipes,
    };
    let layers = connection.layers();
    let io = keep_alive::Layers::wrap(&layers, socket);
    let start = Box::new((io, head_due, Bytes::new()));
    serve_http1_connection(start, layers, connection).await;
    crate::heap_trim::released();
}

/// The connection's first bytes, read through its watch, and the watch;
/// `None` when the connection ended first (closed, timed out, refused, or
/// the proxy closing).
async fn sniff<I: AsyncRead + AsyncWrite + Unpin>(
    mut io: TargetWatch<I>,
    shutdown: &mut ShutdownWatch,
    peer: &Peer,
) -> Option<(TargetWatch<I>, bytes::Bytes)> {
    let first = tokio::select! {
        first = keep_alive::first_bytes(&mut io) => first,
        _ = shutdown.wait_for(|phase| *phase == Phase::Closing) => return None,
    };
    match first {
        // (Empty, and the first request waits for a round of its own.)
        Ok(first) if !first.is_empty() || io.switch_pending() => Some((io, first)),
        Ok(_) => {
            // The client closed, or its first request line was refused:
            // the refusal is written as the connection shuts down.
            let _ = io.shutdown().await;
            None
        }
        Err(error) => {
            tracing::debug!(%error, client = %peer.address, "client connection ended before its first request");
            None
        }
    }
}

/// A request's answer, boxed: hyper keeps a slot the size of the service's
/// future on every connection, idle or not.
type Answer = Pin<Box<dyn Future<Output = Result<hyper::Response<ProxyBody>, Infallible>> + Send>>;

/// Serves an HTTP/2 connection until it ends: GOAWAY when the drain begins
/// (or at its first request after), and once the proxy closes.
async fn serve_http2<I, S>(
    io: I,
    service: S,
    limits: ClientLimits,
    mut shutdown: ShutdownWatch,
    go_away: Arc<GoAway>,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(PING_TIMEOUT);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    // The watch is a clone of the listener's, which saw only the phase the
    // proxy started in: a connection opened during the drain would see the
    // drain as news and get GOAWAY before the first request it is owed
    // (`go_away.due` sends it after that request).
    shutdown.borrow_and_update();
    // Each connection is shut down gracefully at most once.
    let mut shut = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => return ended,
            _ = go_away.due.notified(), if !shut => {
                connection.as_mut().graceful_shutdown();
                shut = true;
            }
            changed = shutdown.changed(), if !shut => {
                let phase = if changed.is_ok() { *shutdown.borrow_and_update() } else { Phase::Closing };
                if phase != Phase::Serving {
                    connection.as_mut().graceful_shutdown();
                    shut = true;
                }
            }
        }
    }
}

/// One request's answer. An HTTP/1.1 answer given while draining carries
/// `Connection: close` (RFC 9112 §9.6): hyper closes the connection after it.
async fn respond(
    request: hyper::Request<Incoming>,
    proxy: Arc<Proxy>,
    peer: Arc<Peer>,
    scheme: &'static str,
    shutdown: ShutdownWatch,
) -> Result<hyper::Response<ProxyBody>, Infallible> {
    let in_progress = RequestInProgress::start(&peer);
    let http1 = request.version() < hyper::Version::HTTP_2;
    let mut response = proxy.handle(request, &peer, scheme).await;
    // Over HTTP/2 a stalled stream does not stall the socket: its pace is
    // followed instead (`client_pace`), from the answer on.
    let pace = (!http1).then(|| peer.paces.track());
    if http1 && *shutdown.borrow() != Phase::Serving {
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    Ok(response.map(|body| {
        let body = match pace {
            Some(pace) => body.paced(pace),
            None => body,
        };
        body.after_response(move || drop(in_progress))
    }))
}
