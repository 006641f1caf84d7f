//! The S3 listeners: accept loops for plain HTTP and for HTTPS, and serving
//! each client connection (HTTP/1.1, or HTTP/2 by ALPN or prior knowledge).
//!
//! Every connection is watched for graceful shutdown. A TLS handshake gets
//! [`HANDSHAKE_TIMEOUT`]; a client that sends anything but a TLS handshake is
//! dropped and counted, and the listener carries on. The departure watch of
//! [`Peer`] sits on the TCP socket below TLS, so it works for both.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::peer::{ClientSocket, Peer};
use crate::proxy::Proxy;
use crate::request_target::TargetWatch;

/// Longest a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One S3 listening socket, plain or TLS.
pub struct S3Listener {
    pub socket: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub limits: HeadLimits,
}

/// How large a request head may be (`listener.max_headers`,
/// `listener.max_head_bytes`); a larger one gets `431`.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_headers: usize,
    pub max_head_bytes: usize,
}

impl S3Listener {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// Accepts until `stop` turns true; connections live on under `graceful`.
pub async fn accept_loop(
    listener: S3Listener,
    proxy: Arc<Proxy>,
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, address)) => accept(stream, address, &listener, &proxy, graceful),
            Err(error) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn accept(
    stream: TcpStream,
    address: SocketAddr,
    listener: &S3Listener,
    proxy: &Arc<Proxy>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let (stream, peer) = ClientSocket::new(stream, address);
    let proxy = Arc::clone(proxy);
    let scheme = listener.scheme();
    let limits = listener.limits;
    let watcher = graceful.watcher();
    match listener.tls.clone() {
        None => {
            tokio::spawn(serve(stream, peer, proxy, scheme, limits, watcher));
        }
        Some(acceptor) => {
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve(tls, peer, proxy, scheme, limits, watcher).await,
                    Ok(Err(error)) => {
                        proxy.metrics().tls_handshake_failed();
                        tracing::debug!(%error, client = %address, "TLS handshake failed");
                    }
                    Err(_) => {
                        proxy.metrics().tls_handshake_failed();
                        tracing::debug!(client = %address, "TLS handshake timed out");
                    }
                }
            });
        }
    }
}

async fn serve<I>(
    io: I,
    peer: Arc<Peer>,
    proxy: Arc<Proxy>,
    scheme: &'static str,
    limits: HeadLimits,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let address = peer.address;
    let io = TargetWatch::new(io, Arc::clone(&peer.cut_targets));
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        let peer = Arc::clone(&peer);
        async move { Ok::<_, Infallible>(proxy.handle(request, &peer, scheme).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Header names reach the backend, and come back, as written.
        .preserve_header_case(true)
        // A client that half-closes after its request still gets the answer.
        .half_close(true)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_head_bytes);
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%error, client = %address, "client connection ended with an error");
    }
}
