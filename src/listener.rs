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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::peer::{ClientSocket, Peer, RequestInProgress};
use crate::proxy::Proxy;
use crate::request_target::{Silence, TargetWatch};
use crate::response::ProxyBody;
use crate::s3_error::ProxyError;
use crate::send_timeout::SendTimeout;
use crate::shutdown::{Phase, ShutdownWatch};

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
}

/// What a client connection may send and how long it may take: a larger
/// head than `max_headers` / `max_head_bytes` gets `431`; the timeouts are
/// `listener.header_timeout` and `listener.send_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_headers: usize,
    pub max_head_bytes: usize,
    pub header_timeout: Duration,
    pub send_timeout: Duration,
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
}

impl ConnectionSlots {
    /// `max_connections` places, and one eighth as many (at most
    /// [`MAX_REFUSING`]) for connections being refused: the file-descriptor
    /// budget counts both.
    pub fn new(max_connections: usize) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            open: Arc::new(Semaphore::new(max_connections)),
            refusing: Arc::new(Semaphore::new((max_connections / 8).clamp(1, MAX_REFUSING))),
        })
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
    let (stream, peer) = ClientSocket::new(stream, address);
    let connection = Connection {
        peer,
        proxy: Arc::clone(proxy),
        scheme: listener.scheme(),
        limits: listener.limits,
        shutdown: listener.shutdown.clone(),
        _slot: slot,
    };
    match listener.tls.clone() {
        None => {
            tokio::spawn(serve(stream, connection));
        }
        Some(acceptor) => {
            tokio::spawn(async move {
                let metrics = Arc::clone(connection.proxy.metrics());
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
            });
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
}

/// What the requests of one connection tell its shutdown watch: that it
/// speaks HTTP/2, and that a request arrived while draining (GOAWAY due).
#[derive(Default)]
struct GoAway {
    http2: AtomicBool,
    due: Notify,
}

async fn serve<I>(io: I, connection: Connection)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Connection {
        peer,
        proxy,
        scheme,
        limits,
        mut shutdown,
        _slot,
    } = connection;
    let address = peer.address;
    let io = TargetWatch::new(
        SendTimeout::new(io, limits.send_timeout),
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
    let go_away = Arc::new(GoAway::default());
    let service = service_fn({
        let shutdown = shutdown.clone();
        let go_away = Arc::clone(&go_away);
        move |request: hyper::Request<Incoming>| {
            if request.version() >= hyper::Version::HTTP_2 {
                go_away.http2.store(true, Ordering::Relaxed);
                if *shutdown.borrow() != Phase::Serving {
                    go_away.due.notify_one();
                }
            }
            respond(
                request,
                Arc::clone(&proxy),
                Arc::clone(&peer),
                scheme,
                shutdown.clone(),
            )
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Header names reach the backend, and come back, as written.
        .preserve_header_case(true)
        // A client that half-closes after its request still gets the answer.
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_head_bytes);
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX))
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout)
        .keep_alive_timeout(PING_TIMEOUT);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    tokio::pin!(connection);
    // Each connection is shut down gracefully at most once: HTTP/2 when the
    // drain begins (or at its first request after), HTTP/1.1 (and a
    // connection that has not said which) once accepting stops.
    let mut shut = false;
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            _ = go_away.due.notified(), if !shut => {
                connection.as_mut().graceful_shutdown();
                shut = true;
            }
            changed = shutdown.changed(), if !shut => {
                let phase = if changed.is_ok() { *shutdown.borrow_and_update() } else { Phase::Closing };
                let http2 = go_away.http2.load(Ordering::Relaxed);
                if phase == Phase::Closing || (phase == Phase::Draining && http2) {
                    connection.as_mut().graceful_shutdown();
                    shut = true;
                }
            }
        }
    };
    if let Err(error) = ended {
        tracing::debug!(%error, client = %address, "client connection ended with an error");
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
