//! How to reach the backend: a TCP connection to its address, wrapped in TLS
//! when the backend only serves HTTPS. The upstream pool and the probe share
//! one [`Connector`], so "frontend-up" means the TLS handshake works too.
//!
//! Every backend connection has TCP keep-alive on (`backend.tcp_keepalive`;
//! HAProxy's `option srvtcpka`, nginx's `proxy_socket_keepalive`): a backend
//! whose node vanished sends no FIN or reset, and a connection waiting for
//! its bytes (a download's body, an idle pooled connection) would wait
//! forever. The kernel probes a silent connection and, when three probes go
//! unanswered, fails its reads with `ETIMEDOUT`, which the proxy handles as
//! any other cut: a download is resumed, a pooled connection is dropped.
//! Keep-alive waits while bytes the proxy sent are unacknowledged (a request
//! just written), so the raw path's connections, which carry only GET and
//! HEAD heads, also have `TCP_USER_TIMEOUT` (RFC 5482) of the same limit:
//! bytes unacknowledged that long end the connection the same way. Not the
//! others: Linux counts a zero window (a backend slow to read an upload's
//! body, alive and acknowledging every probe) against that timeout too, and
//! would cut the upload of a slow backend.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::backend_address::BackendAddress;
use crate::backend_slots::Slot;
use crate::config::{BackendConfig, BackendTlsConfig};
use crate::tls::{self, TlsError};

/// Opens connections to the backend.
pub struct Connector {
    address: BackendAddress,
    tls: Option<TlsClient>,
    /// What this connector was built from, to tell whether a reload changed it.
    source: Option<BackendTlsConfig>,
    /// `backend.tcp_keepalive`.
    tcp_keepalive: Duration,
}

/// `backend.tcp_keepalive` by default.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(5);

/// Unanswered keep-alive probes after which the kernel ends a connection.
const KEEPALIVE_PROBES: u32 = 3;

struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl fmt::Display for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.address)
    }
}

impl PartialEq for Connector {
    fn eq(&self, other: &Self) -> bool {
        self.address == other.address
            && self.source == other.source
            && self.tcp_keepalive == other.tcp_keepalive
    }
}

impl Connector {
    /// A plain-TCP connector.
    pub fn plain(address: BackendAddress) -> Connector {
        Connector {
            address,
            tls: None,
            source: None,
            tcp_keepalive: DEFAULT_TCP_KEEPALIVE,
        }
    }

    /// The connector the `[backend]` section describes, towards its
    /// [`BackendConfig::target`] (reads the TLS files).
    pub fn from_config(config: &BackendConfig) -> Result<Connector, TlsError> {
        let address = config.target();
        let Some(tls) = &config.tls else {
            return Ok(Connector {
                tcp_keepalive: config.tcp_keepalive,
                ..Connector::plain(address.clone())
            });
        };
        let client_pair = tls
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let client = tls::client_config(&tls.ca, client_pair, tls.files)?;
        let name = tls
            .server_name
            .clone()
            .unwrap_or_else(|| address.host().to_owned());
        let server_name = ServerName::try_from(name).map_err(|e| {
            TlsError::Settings(rustls::Error::General(format!("invalid server name: {e}")))
        })?;
        Ok(Connector {
            address: address.clone(),
            tls: Some(TlsClient {
                connector: TlsConnector::from(Arc::new(client)),
                server_name,
            }),
            source: Some(tls.clone()),
            tcp_keepalive: config.tcp_keepalive,
        })
    }

    /// The same TLS settings towards another address (a new pod IP).
    pub fn retarget(&self, address: BackendAddress) -> Connector {
        Connector {
            address,
            tls: self.tls.as_ref().map(|tls| TlsClient {
                connector: tls.connector.clone(),
                server_name: tls.server_name.clone(),
            }),
            source: self.source.clone(),
            tcp_keepalive: self.tcp_keepalive,
        }
    }

    /// True when the backend is reached over plain TCP (no TLS).
    pub fn is_plain(&self) -> bool {
        self.tls.is_none()
    }

    pub fn address(&self) -> &BackendAddress {
        &self.address
    }

    /// Connects, and completes the TLS handshake if the backend uses TLS.
    pub async fn connect(&self) -> io::Result<BackendStream> {
        let stream = self.connect_tcp().await?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => Ok(BackendStream::new(Transport::Plain(stream))),
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), stream)
                    .await?;
                Ok(BackendStream::new(Transport::Tls(Box::new(stream))))
            }
        }
    }

    /// Opens a TCP connection without TLS (the pause sentinel needs no more).
    pub async fn connect_tcp(&self) -> io::Result<TcpStream> {
        let stream = self.address.connect().await?;
        // A safety net: a connection without it still serves.
        if let Err(error) = self.keep_alive(&stream) {
            tracing::debug!(%error, "TCP keep-alive not set on a backend connection");
        }
        Ok(stream)
    }

    /// Opens a TCP connection for requests without a body (the raw path's
    /// GET and HEAD): as [`Connector::connect_tcp`], and ended when what it
    /// sent stays unacknowledged as long as a silent one lives.
    pub async fn connect_for_reads(&self) -> io::Result<TcpStream> {
        let stream = self.connect_tcp().await?;
        let dead_after = self.dead_after_ms();
        if let Err(error) = rustix::net::sockopt::set_tcp_user_timeout(&stream, dead_after) {
            tracing::debug!(%error, "TCP_USER_TIMEOUT not set on a backend connection");
        }
        Ok(stream)
    }

    /// Turns TCP keep-alive on for `stream`: probes after
    /// `backend.tcp_keepalive` of silence, one each as long, the connection
    /// ended after [`KEEPALIVE_PROBES`] unanswered (tcp(7): `SO_KEEPALIVE`,
    /// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`).
    fn keep_alive(&self, stream: &TcpStream) -> io::Result<()> {
        use rustix::net::sockopt;
        sockopt::set_tcp_keepidle(stream, self.tcp_keepalive)?;
        sockopt::set_tcp_keepintvl(stream, self.tcp_keepalive)?;
        sockopt::set_tcp_keepcnt(stream, KEEPALIVE_PROBES)?;
        sockopt::set_socket_keepalive(stream, true)?;
        Ok(())
    }

    /// How long a silent backend connection lives: the first probe and
    /// [`KEEPALIVE_PROBES`] more intervals, in milliseconds.
    fn dead_after_ms(&self) -> u32 {
        let dead_after = self.tcp_keepalive * (1 + KEEPALIVE_PROBES);
        u32::try_from(dead_after.as_millis()).unwrap_or(u32::MAX)
    }
}

/// A connection to the backend, plain or TLS.
///
/// A failed write is reported only once the read side has ended: a backend
/// that answers early and closes (a `403` to an upload it will not read) makes
/// the next write fail with `EPIPE`/`ECONNRESET`, and hyper would report that
/// error instead of the complete answer waiting in the receive buffer. Held
/// back, the error lets hyper read the answer first; once reads end (EOF or an
/// error) the write error is returned as it was.
pub struct BackendStream {
    transport: Transport,
    write_error: Option<io::Error>,
    read_ended: bool,
    write_waker: Option<Waker>,
    /// Its place under `backend.max_connections`, given back with the socket.
    _slot: Slot,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendStream {
    fn new(transport: Transport) -> BackendStream {
        BackendStream {
            transport,
            write_error: None,
            read_ended: false,
            write_waker: None,
            _slot: Slot::default(),
        }
    }

    /// This connection, holding `slot` for as long as its socket is open.
    pub fn holding(mut self, slot: Slot) -> BackendStream {
        self._slot = slot;
        self
    }

    /// `Pending` while a write error is held back for the reads to finish.
    fn poll_write_result<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(Err(error)) if !self.read_ended && is_peer_gone(&error) => {
                self.write_error = Some(error);
                self.poll_held_write_error(cx)
            }
            other => other,
        }
    }

    /// `write` on the transport, a write error held as
    /// [`BackendStream::poll_write_result`] holds it.
    fn poll_transport_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(
            Pin<&mut (dyn AsyncWrite + Send + Unpin)>,
            &mut Context<'_>,
        ) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.write_error.is_some() {
            return self.poll_held_write_error(cx);
        }
        let result = match &mut self.transport {
            Transport::Plain(stream) => write(Pin::new(stream), cx),
            Transport::Tls(stream) => write(Pin::new(stream.as_mut()), cx),
        };
        self.poll_write_result(cx, result)
    }

    fn poll_held_write_error<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.read_ended {
            let error = self.write_error.take().expect("a held write error");
            return Poll::Ready(Err(error));
        }
        self.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The errors a write gets when the backend closed its end.
fn is_peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.transport {
            Transport::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        };
        let ended = match &polled {
            Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if ended {
            this.read_ended = true;
            if let Some(waker) = this.write_waker.take() {
                waker.wake();
            }
        }
        polled
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_transport_write(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    /// Several buffers in one `writev` (hyper sends a request's head and
    /// body chunks so, instead of copying each body byte into its own
    /// buffer first when the stream says it cannot: about 8 % of the
    /// CPU of a large PUT).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_transport_write(cx, |stream, cx| stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(stream) => stream.is_write_vectored(),
            Transport::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_transport_write(cx, |stream, cx| stream.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt;

    /// A connector with `backend.tcp_keepalive = "7s"` to a listener.
    async fn connector_with_7s() -> (tokio::net::TcpListener, Connector) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: BackendAddress = listener.local_addr().unwrap().to_string().parse().unwrap();
        let connector = Connector {
            tcp_keepalive: Duration::from_secs(7),
            ..Connector::plain(address)
        };
        (listener, connector)
    }

    #[tokio::test]
    async fn a_backend_connection_is_probed_after_a_silent_keepalive_time() {
        let (_listener, connector) = connector_with_7s().await;
        let stream = connector.connect_tcp().await.unwrap();

        assert!(sockopt::socket_keepalive(&stream).unwrap());
        assert_eq!(
            sockopt::tcp_keepidle(&stream).unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(
            sockopt::tcp_keepintvl(&stream).unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(sockopt::tcp_keepcnt(&stream).unwrap(), 3);
        // An upload's body may wait in a zero window for longer.
        assert_eq!(sockopt::tcp_user_timeout(&stream).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_connection_for_reads_ends_when_its_request_stays_unacknowledged() {
        let (_listener, connector) = connector_with_7s().await;
        let stream = connector.connect_for_reads().await.unwrap();

        assert!(sockopt::socket_keepalive(&stream).unwrap());
        // 7 s and three more probes 7 s apart.
        assert_eq!(sockopt::tcp_user_timeout(&stream).unwrap(), 28_000);
    }

    #[tokio::test]
    async fn a_plain_backend_connection_takes_several_buffers_in_one_write() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, connector) = connector_with_7s().await;
        let mut stream = connector.connect().await.unwrap();
        let (mut backend, _) = listener.accept().await.unwrap();

        // hyper copies every body byte into a buffer of its own for a
        // stream that says it cannot.
        assert!(stream.is_write_vectored());
        let parts = [
            io::IoSlice::new(b"PUT / HTTP/1.1\r\n\r\n"),
            io::IoSlice::new(b"body"),
        ];
        let written = stream.write_vectored(&parts).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut received = Vec::new();
        backend.read_to_end(&mut received).await.unwrap();
        assert_eq!(written, 22);
        assert_eq!(received, b"PUT / HTTP/1.1\r\n\r\nbody");
    }
}
