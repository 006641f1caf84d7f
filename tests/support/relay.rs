//! A recording TCP relay on 127.0.0.1 in front of a backend address: one
//! backend connection per client connection, bytes copied both ways and
//! recorded per connection. It is how a test sees exactly what the backend
//! received (`tests/transparency.rs`): put it between a client and the
//! backend (straight path) or between the proxy and the backend (proxied path).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What one relayed connection carried so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionRecord {
    /// Bytes written to the backend, in order.
    pub to_backend: Vec<u8>,
    /// Bytes the backend sent back, in order.
    pub from_backend: Vec<u8>,
    /// Both directions have ended (EOF or error).
    pub closed: bool,
    /// For each write to the backend: where it starts in `to_backend`, and
    /// how much of `from_backend` the backend had sent when it began. Says
    /// whether the backend had asked for bytes (`100 Continue`) before it got them.
    pub writes: Vec<(usize, usize)>,
}

impl ConnectionRecord {
    /// What the backend had sent back when byte `offset` of `to_backend` was
    /// written to it.
    pub fn answered_before(&self, offset: usize) -> &[u8] {
        let sent = self
            .writes
            .iter()
            .take_while(|(start, _)| *start <= offset)
            .last()
            .map_or(0, |(_, answered)| *answered);
        &self.from_backend[..sent]
    }
}

/// Byte counts of every connection at one moment, to read what came after.
#[derive(Debug, Clone, Default)]
pub struct Mark(Vec<(usize, usize)>);

#[derive(Default)]
struct Recorded {
    connections: Vec<ConnectionRecord>,
    /// When each connection last moved a byte (or opened, or closed).
    touched: Vec<Instant>,
}

impl Recorded {
    /// When every open connection will have been quiet long enough, or
    /// `None` if they are all closed already.
    fn quiet_at(&self, quiet: Duration) -> Option<Instant> {
        self.connections
            .iter()
            .zip(&self.touched)
            .filter(|(connection, _)| !connection.closed)
            .map(|(_, touched)| *touched + quiet)
            .max()
    }
}

struct Shared {
    recorded: Mutex<Recorded>,
    /// Bumped on every recorded event, so waiters wake without polling.
    activity: watch::Sender<u64>,
}

impl Shared {
    fn record(&self, connection: usize, change: impl FnOnce(&mut ConnectionRecord)) {
        let mut recorded = self.recorded.lock().unwrap();
        change(&mut recorded.connections[connection]);
        recorded.touched[connection] = Instant::now();
        drop(recorded);
        self.activity.send_modify(|n| *n += 1);
    }

    fn open(&self) -> usize {
        let mut recorded = self.recorded.lock().unwrap();
        recorded.connections.push(ConnectionRecord::default());
        recorded.touched.push(Instant::now());
        let index = recorded.connections.len() - 1;
        drop(recorded);
        self.activity.send_modify(|n| *n += 1);
        index
    }
}

/// The relay; stops accepting and copying when dropped.
pub struct Relay {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on a fresh loopback port and relays every connection to `backend`.
    pub async fn start(backend: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            recorded: Mutex::new(Recorded::default()),
            activity: watch::Sender::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, backend, Arc::clone(&shared)));
        Ok(Relay {
            address,
            shared,
            task,
        })
    }

    /// Every connection so far, in the order they were accepted.
    pub fn connections(&self) -> Vec<ConnectionRecord> {
        self.shared.recorded.lock().unwrap().connections.clone()
    }

    /// The current length of every connection's record.
    pub fn mark(&self) -> Mark {
        let recorded = self.shared.recorded.lock().unwrap();
        Mark(
            recorded
                .connections
                .iter()
                .map(|c| (c.to_backend.len(), c.from_backend.len()))
                .collect(),
        )
    }

    /// What each connection carried after `mark`, for the connections that
    /// carried anything (or were opened) since then.
    pub fn since(&self, mark: &Mark) -> Vec<ConnectionRecord> {
        let recorded = self.shared.recorded.lock().unwrap();
        recorded
            .connections
            .iter()
            .enumerate()
            .filter_map(|(index, connection)| {
                let (sent, received) = mark.0.get(index).copied().unwrap_or_default();
                let opened_after = index >= mark.0.len();
                let new = ConnectionRecord {
                    to_backend: connection.to_backend[sent..].to_vec(),
                    from_backend: connection.from_backend[received..].to_vec(),
                    closed: connection.closed,
                    writes: connection
                        .writes
                        .iter()
                        .filter(|(start, _)| *start >= sent)
                        .map(|(start, answered)| (start - sent, answered.saturating_sub(received)))
                        .collect(),
                };
                let carried = !new.to_backend.is_empty() || !new.from_backend.is_empty();
                (opened_after || carried).then_some(new)
            })
            .collect()
    }

    /// Waits until every connection is closed or has been quiet (moved no
    /// byte) for `quiet`; gives up after `limit`.
    pub async fn wait_settled(&self, quiet: Duration, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut activity = self.shared.activity.subscribe();
        loop {
            activity.mark_unchanged();
            let Some(quiet_at) = self.shared.recorded.lock().unwrap().quiet_at(quiet) else {
                return Ok(());
            };
            let now = Instant::now();
            if now >= quiet_at {
                return Ok(());
            }
            if now >= deadline {
                anyhow::bail!("the relayed connections did not settle within {limit:?}");
            }
            let _ = tokio::time::timeout_at(quiet_at.min(deadline), activity.changed()).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, backend: SocketAddr, shared: Arc<Shared>) {
    let mut copies = tokio::task::JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        let index = shared.open();
        copies.spawn(relay_connection(
            client,
            backend,
            index,
            Arc::clone(&shared),
        ));
    }
}

async fn relay_connection(
    client: TcpStream,
    backend: SocketAddr,
    index: usize,
    shared: Arc<Shared>,
) {
    let Ok(upstream) = TcpStream::connect(backend).await else {
        shared.record(index, |c| c.closed = true);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (backend_read, backend_write) = upstream.into_split();
    let up = copy(
        client_read,
        backend_write,
        Direction::ToBackend,
        index,
        &shared,
    );
    let down = copy(
        backend_read,
        client_write,
        Direction::FromBackend,
        index,
        &shared,
    );
    tokio::join!(up, down);
    shared.record(index, |c| c.closed = true);
}

#[derive(Clone, Copy)]
enum Direction {
    ToBackend,
    FromBackend,
}

/// Copies until EOF or an error, recording what was written; passes the EOF
/// on as a half-close so either side can shut down its writing half alone.
async fn copy(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    index: usize,
    shared: &Shared,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let answered = shared.recorded.lock().unwrap().connections[index]
            .from_backend
            .len();
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
        shared.record(index, |c| match direction {
            Direction::ToBackend => {
                c.writes.push((c.to_backend.len(), answered));
                c.to_backend.extend_from_slice(&buffer[..read]);
            }
            Direction::FromBackend => c.from_backend.extend_from_slice(&buffer[..read]),
        });
    }
    let _ = to.shutdown().await;
}
