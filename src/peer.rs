//! The client at the other end of a connection, and how to notice it left.
//!
//! hyper does not read a request body the handler has not asked for, so a
//! client that gives up while its PUT is held would only be noticed when the
//! hold ends. [`Peer::gone`] watches the connection's socket for the peer's
//! FIN (`EPOLLRDHUP`) without reading a byte, and resolves when it comes.
//!
//! The watch costs no file descriptor: the socket itself is added, the first
//! time a request on it is held, to one process-wide epoll set that a small
//! thread waits on (a second epoll set leaves tokio's readiness untouched).
//! The kernel drops the registration when the socket closes. The socket is
//! shared between the connection's [`ClientSocket`] and a weak reference in
//! its [`Peer`], so a watch is only ever added to the open socket itself,
//! never to a descriptor number another connection reused.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};

use rustix::event::epoll;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::request_target::CutTargets;

/// One client connection.
#[derive(Debug)]
pub struct Peer {
    pub address: SocketAddr,
    /// The socket while the connection has it open.
    socket: Weak<TcpStream>,
    /// The departure watch's key, once registered.
    watch: Mutex<Option<u64>>,
    departure: Arc<Departure>,
    /// Request lines read on this connection whose target had a raw `#`.
    pub cut_targets: Arc<CutTargets>,
    /// Requests of this connection being handled or answered now.
    pub requests_in_progress: Arc<AtomicUsize>,
    /// Requests of this connection started so far.
    pub requests_started: Arc<AtomicU64>,
    /// How the client takes its HTTP/2 responses.
    pub paces: Arc<crate::client_pace::Paces>,
    /// `address` as `X-Forwarded-For` writes it, once a request needs it
    /// (the same for every request of the connection).
    forwarded_for: OnceLock<http::HeaderValue>,
}

/// One request of a connection in progress, until dropped (its response
/// sent or abandoned).
#[derive(Debug)]
pub struct RequestInProgress(Arc<AtomicUsize>);

impl RequestInProgress {
    pub fn start(peer: &Peer) -> RequestInProgress {
        peer.requests_started.fetch_add(1, Ordering::AcqRel);
        peer.requests_in_progress.fetch_add(1, Ordering::AcqRel);
        RequestInProgress(Arc::clone(&peer.requests_in_progress))
    }
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Set once by the watch thread when the client's FIN arrives.
#[derive(Debug, Default)]
struct Departure {
    gone: AtomicBool,
    notify: Notify,
}

impl Departure {
    fn mark_gone(&self) {
        self.gone.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

impl Peer {
    /// The client's address as `X-Forwarded-For` writes it.
    pub fn forwarded_for(&self) -> http::HeaderValue {
        let value = || crate::headers::address_value(self.address.ip());
        self.forwarded_for.get_or_init(value).clone()
    }

    /// The client's socket while the connection has it open (to move a body
    /// into it without a buffer: [`crate::splice`]).
    pub fn socket(&self) -> Option<Arc<TcpStream>> {
        self.socket.upgrade()
    }

    /// Resolves once the client has closed its side of the connection.
    /// Never resolves when the socket could not be watched.
    pub async fn gone(&self) {
        if self.watch() {
            loop {
                // Created before the check, so a departure in between wakes it.
                let notified = self.departure.notify.notified();
                if self.departure.gone.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        }
        std::future::pending::<()>().await
    }

    /// Registers the socket with the departure watch, once; false when it
    /// cannot be watched (closed, or no epoll on this system).
    fn watch(&self) -> bool {
        let mut watch = self.watch.lock().unwrap();
        if watch.is_some() {
            return true;
        }
        // Holding the socket keeps it open until it is registered.
        let (Some(socket), Some(watcher)) = (self.socket.upgrade(), DepartureWatcher::get()) else {
            return false;
        };
        match watcher.add(socket.as_fd(), &self.departure) {
            Ok(key) => {
                *watch = Some(key);
                true
            }
            Err(error) => {
                tracing::debug!(%error, client = %self.address, "cannot watch the client socket");
                false
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let watch = self.watch.get_mut().map(|w| *w).unwrap_or(None);
        if let (Some(key), Some(watcher)) = (watch, DepartureWatcher::get()) {
            watcher.forget(key);
        }
    }
}

/// The process-wide epoll set of watched client sockets and its thread.
struct DepartureWatcher {
    epoll: OwnedFd,
    watched: Mutex<HashMap<u64, Weak<Departure>>>,
    next_key: AtomicU64,
}

impl DepartureWatcher {
    /// The watcher, started on first use; `None` if epoll is unavailable.
    fn get() -> Option<&'static DepartureWatcher> {
        static WATCHER: OnceLock<Option<DepartureWatcher>> = OnceLock::new();
        WATCHER
            .get_or_init(|| match DepartureWatcher::start() {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    tracing::warn!(%error, "cannot watch client sockets; held clients that leave are noticed when their hold ends");
                    None
                }
            })
            .as_ref()
    }

    fn start() -> io::Result<DepartureWatcher> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let waiter = epoll.try_clone()?;
        std::thread::Builder::new()
            .name("s3fp-peer-watch".into())
            .spawn(move || DepartureWatcher::wait_loop(waiter))?;
        Ok(DepartureWatcher {
            epoll,
            watched: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
        })
    }

    fn add(&self, socket: BorrowedFd<'_>, departure: &Arc<Departure>) -> io::Result<u64> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.watched
            .lock()
            .unwrap()
            .insert(key, Arc::downgrade(departure));
        // Edge-triggered on the FIN only: unread request bytes are hyper's
        // and do not wake the thread. A FIN already there is reported at once.
        let flags = epoll::EventFlags::RDHUP | epoll::EventFlags::ET | epoll::EventFlags::ONESHOT;
        let data = epoll::EventData::new_u64(key);
        // A socket that rested (`crate::resting`) comes back with a new
        // `Peer`; an earlier one's registration is then replaced.
        let added = match epoll::add(&self.epoll, socket, data, flags) {
            Err(rustix::io::Errno::EXIST) => epoll::modify(&self.epoll, socket, data, flags),
            added => added,
        };
        if let Err(error) = added {
            self.forget(key);
            return Err(error.into());
        }
        Ok(key)
    }

    fn forget(&self, key: u64) {
        self.watched.lock().unwrap().remove(&key);
    }

    /// The watch thread: waits for departures and wakes their held requests.
    fn wait_loop(epoll: OwnedFd) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        loop {
            events.clear();
            match epoll::wait(&epoll, rustix::buffer::spare_capacity(&mut events), None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(error) => {
                    tracing::error!(%error, "the client departure watch stopped");
                    return;
                }
            }
            let Some(watcher) = DepartureWatcher::get() else {
                return;
            };
            for event in &events {
                let key = event.data.u64();
                let departure = watcher.watched.lock().unwrap().remove(&key);
                if let Some(departure) = departure.and_then(|weak| weak.upgrade()) {
                    departure.mark_gone();
                }
            }
        }
    }
}

/// A client's TCP socket, owned for hyper (below TLS when there is TLS) and
/// watched through its [`Peer`]. Dropping it closes the connection, unless a
/// departure watch is being registered at that instant.
pub struct ClientSocket {
    stream: Arc<TcpStream>,
}

impl ClientSocket {
    /// Takes an accepted connection; the [`Peer`] is shared with its requests.
    pub fn new(stream: TcpStream, address: SocketAddr) -> (ClientSocket, Arc<Peer>) {
        let stream = Arc::new(stream);
        let peer = Arc::new(Peer {
            address,
            socket: Arc::downgrade(&stream),
            watch: Mutex::new(None),
            departure: Arc::default(),
            cut_targets: Arc::default(),
            requests_in_progress: Arc::default(),
            requests_started: Arc::default(),
            paces: Arc::default(),
            forwarded_for: OnceLock::new(),
        });
        (ClientSocket { stream }, peer)
    }

    /// The socket itself, to wait on for readability while no one reads it.
    pub fn shared(&self) -> Arc<TcpStream> {
        Arc::clone(&self.stream)
    }

    /// The socket taken out of tokio's event loop (to rest in
    /// [`crate::resting`]); an error if that failed (the socket is then
    /// closed). The same socket back (`Err`) while it is shared, as it is
    /// while a departure watch is being registered.
    pub fn into_std(self) -> Result<io::Result<std::net::TcpStream>, ClientSocket> {
        match Arc::try_unwrap(self.stream) {
            Ok(stream) => Ok(stream.into_std()),
            Err(stream) => Err(ClientSocket { stream }),
        }
    }
}

/// Retries `io` until it does not block, waiting for readiness with `ready`.
///
/// `io` returns how many bytes it moved and whether that drained the socket:
/// a read that left room in the buffer, or a write that took less than it
/// was given (epoll is edge-triggered, so the socket then has nothing more
/// for now). Readiness is then cleared, as tokio's own `TcpStream::poll_read`
/// and `poll_write` do, so the next poll waits for the next event instead of
/// trying a system call that can only fail with `EAGAIN` (one per request on
/// a keep-alive connection otherwise).
fn poll_io(
    stream: &TcpStream,
    interest: Interest,
    cx: &mut Context<'_>,
    mut io: impl FnMut() -> io::Result<(usize, bool)>,
) -> Poll<io::Result<usize>> {
    loop {
        let ready = match interest {
            Interest::READABLE => stream.poll_read_ready(cx),
            _ => stream.poll_write_ready(cx),
        };
        std::task::ready!(ready)?;
        let mut drained = None;
        let tried = stream.try_io(interest, || match io() {
            Ok((moved, true)) if moved > 0 => {
                drained = Some(moved);
                Err(io::ErrorKind::WouldBlock.into())
            }
            Ok((moved, _)) => Ok(moved),
            Err(error) => Err(error),
        });
        match (tried, drained) {
            (_, Some(moved)) => return Poll::Ready(Ok(moved)),
            (Err(error), None) if error.kind() == io::ErrorKind::WouldBlock => continue,
            (result, None) => return Poll::Ready(result),
        }
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &self.stream;
        let room = buf.remaining();
        poll_io(stream, Interest::READABLE, cx, || {
            stream.try_read_buf(buf).map(|read| (read, read < room))
        })
        .map_ok(|_| ())
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.stream;
        poll_io(stream, Interest::WRITABLE, cx, || {
            stream
                .try_write(buf)
                .map(|wrote| (wrote, wrote < buf.len()))
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.stream;
        let given: usize = bufs.iter().map(|buf| buf.len()).sum();
        poll_io(stream, Interest::WRITABLE, cx, || {
            stream
                .try_write_vectored(bufs)
                .map(|wrote| (wrote, wrote < given))
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(&*self.stream, rustix::net::Shutdown::Write).map_err(Into::into),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn connected() -> (TcpStream, ClientSocket, Arc<Peer>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_side, address) = listener.accept().await.unwrap();
        let (socket, peer) = ClientSocket::new(server_side, address);
        (client, socket, peer)
    }

    #[tokio::test]
    async fn a_client_that_closes_is_seen_gone_even_with_unread_bytes() {
        let (mut client, _socket, peer) = connected().await;
        client.write_all(b"PUT /b/k HTTP/1.1\r\n").await.unwrap();
        let watcher = tokio::spawn(async move { peer.gone().await });
        tokio::task::yield_now().await;
        assert!(!watcher.is_finished());
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("the departure is seen")
            .unwrap();
    }

    #[tokio::test]
    async fn a_client_gone_before_the_watch_starts_is_seen_at_once() {
        let (client, _socket, peer) = connected().await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), peer.gone())
            .await
            .expect("the FIN already there is reported");
    }

    #[tokio::test]
    async fn a_closed_socket_is_never_watched() {
        let (_client, socket, peer) = connected().await;
        drop(socket);
        assert!(
            !peer.watch(),
            "its descriptor number may belong to another file now"
        );
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_and_a_shutdown_reaches_the_client() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut socket, _peer) = connected().await;
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        socket.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        socket.write_all(b"pong").await.unwrap();
        socket.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");
    }

    /// Polls the socket's read readiness once, as the connection's task would.
    fn readable_now(socket: &ClientSocket) -> bool {
        let shared = socket.shared();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        shared.poll_read_ready(&mut cx).is_ready()
    }

    #[tokio::test]
    async fn a_read_that_drains_the_socket_waits_for_the_next_bytes_without_trying_again() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut socket, _peer) = connected().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buffer = [0u8; 8192];
        let read = socket.read(&mut buffer).await.unwrap();
        assert_eq!(&buffer[..read], b"GET / HTTP/1.1\r\n\r\n");
        assert!(
            !readable_now(&socket),
            "a short read drained the socket: the next read waits for epoll \
             instead of a read that can only fail with EAGAIN"
        );
        client.write_all(b"next").await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer))
            .await
            .expect("new bytes wake the reader")
            .unwrap();
        assert_eq!(&buffer[..read], b"next");
    }

    #[tokio::test]
    async fn a_read_that_fills_the_buffer_reads_again_at_once() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut socket, _peer) = connected().await;
        client.write_all(b"0123456789").await.unwrap();
        let mut four = [0u8; 4];
        let deadline = Duration::from_secs(5);
        for expected in [&b"0123"[..], b"4567"] {
            let read = tokio::time::timeout(deadline, socket.read(&mut four))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&four[..read], expected);
        }
        let read = tokio::time::timeout(deadline, socket.read(&mut four))
            .await
            .expect("the bytes left are read, not waited for")
            .unwrap();
        assert_eq!(&four[..read], b"89");
    }
}
