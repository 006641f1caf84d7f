//! Keep-alive connections at rest, kept without a task.
//!
//! A plain-HTTP/1.1 connection whose stream has rested ([`crate::keep_alive`])
//! needs nothing but its socket until the client's next bytes come. A task
//! waiting on the socket would keep tokio's readiness record (256 bytes), a
//! timer and a shutdown waiter besides the task itself: some 2 KB per idle
//! connection, where nginx and HAProxy spend under 1.2 KB. So the connection
//! is *parked* here instead: its socket leaves tokio's event loop and joins
//! one epoll set, which one small thread waits on (as [`crate::peer`]'s
//! departure watch does), with what resuming it takes.
//!
//! The thread hands a parked connection back to the lane that served it
//! ([`crate::lanes`]) when its socket turns readable (a request, or the client's FIN: either is the next
//! round's to read), closes it (`FIN`) when its head is due
//! (`listener.header_timeout` since the rest began, as hyper's header timer
//! and the in-task wait did), and closes every parked connection once the
//! proxy closes its connections ([`Resting::close_all`]), as an idle
//! keep-alive connection is closed then. Nothing is read or written while a
//! connection is parked, so the client sees the same bytes.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::BoxFuture;
use rustix::event::{EventfdFlags, Timespec, epoll, eventfd};

/// What resumes a parked connection, the same for all: given the socket
/// back in the runtime, when its head is due, and what the connection kept
/// (`T`), it serves the connection's next round.
pub type Resume<T> = Box<
    dyn Fn(Resting<T>, tokio::net::TcpStream, Instant, T) -> BoxFuture<'static, ()> + Send + Sync,
>;

/// Where a connection that resumes runs: given the lane it was parked from
/// (see [`Resting::park`]) and the future that takes its socket back into a
/// runtime (on the thread it runs on) and serves it.
pub type Spawn = Box<dyn Fn(usize, BoxFuture<'static, ()>) + Send + Sync>;

/// The parked connections (each keeping a `T`) and the thread that
/// watches them.
pub struct Resting<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Resting<T> {
    fn clone(&self) -> Self {
        Resting {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<T> {
    epoll: OwnedFd,
    /// Wakes the thread: a nearer deadline, or closing.
    wake: OwnedFd,
    state: Mutex<State<T>>,
    spawn: Spawn,
    resume: Resume<T>,
}

struct State<T> {
    /// Kept in place (no allocation of their own): a parked connection
    /// costs its entry here and in `due`.
    parked: HashMap<u64, Parked<T>>,
    /// Head deadlines, earliest first.
    due: BTreeSet<(Instant, u64)>,
    next_key: u64,
    closing: bool,
}

struct Parked<T> {
    socket: std::net::TcpStream,
    head_due: Instant,
    /// Handed back to [`Spawn`] when the connection resumes.
    lane: usize,
    kept: T,
}

/// The epoll key of the wake event (connection keys start at 1).
const WAKE_KEY: u64 = 0;

/// Events read per wait.
const EVENTS: usize = 256;

impl<T: Send + 'static> Resting<T> {
    /// Starts the watching thread; parked connections resume through `spawn`,
    /// through `resume`.
    pub fn start(spawn: Spawn, resume: Resume<T>) -> io::Result<Resting<T>> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(
            &epoll,
            &wake,
            epoll::EventData::new_u64(WAKE_KEY),
            epoll::EventFlags::IN,
        )?;
        let shared = Arc::new(Shared {
            epoll,
            wake,
            state: Mutex::new(State {
                parked: HashMap::new(),
                due: BTreeSet::new(),
                next_key: WAKE_KEY + 1,
                closing: false,
            }),
            spawn,
            resume,
        });
        let watched = Resting {
            shared: Arc::clone(&shared),
        };
        std::thread::Builder::new()
            .name("s3fp-resting".into())
            .spawn(move || watched.watch())?;
        Ok(Resting { shared })
    }

    /// Parks a connection, keeping `kept`, until its socket turns readable
    /// (then it resumes through `Spawn`, given `lane`), until `head_due`
    /// (then it is closed), or until [`Resting::close_all`]. Both come back
    /// (`Err`) if the socket cannot be watched.
    pub fn park(
        &self,
        socket: std::net::TcpStream,
        head_due: Instant,
        lane: usize,
        kept: T,
    ) -> Result<(), (std::net::TcpStream, T)> {
        let mut state = self.shared.state.lock().unwrap();
        if state.closing {
            drop(state);
            close(&socket);
            return Ok(());
        }
        let key = state.next_key;
        // Level-triggered, once: bytes (or a FIN) already waiting are
        // reported at once, and the socket is taken out when they are.
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
        if let Err(error) = epoll::add(
            &self.shared.epoll,
            &socket,
            epoll::EventData::new_u64(key),
            flags,
        ) {
            tracing::debug!(%error, "cannot park a resting connection");
            return Err((socket, kept));
        }
        state.next_key += 1;
        let nearest = state.due.first().is_none_or(|(due, _)| head_due < *due);
        state.due.insert((head_due, key));
        state.parked.insert(
            key,
            Parked {
                socket,
                head_due,
                lane,
                kept,
            },
        );
        drop(state);
        if nearest {
            self.shared.wake();
        }
        Ok(())
    }

    /// Closes every parked connection, and each one parked from now on.
    pub fn close_all(&self) {
        self.shared.state.lock().unwrap().closing = true;
        self.shared.wake();
    }

    /// Resumes a connection at once, in the caller's task (one that could
    /// not be parked).
    pub fn resume(
        &self,
        stream: tokio::net::TcpStream,
        head_due: Instant,
        kept: T,
    ) -> BoxFuture<'static, ()> {
        (self.shared.resume)(self.clone(), stream, head_due, kept)
    }

    /// The thread: resumes, expires and closes parked connections.
    fn watch(&self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(EVENTS);
        loop {
            events.clear();
            let timeout = self.timeout();
            match epoll::wait(
                &self.shared.epoll,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(error) => {
                    tracing::error!(%error, "the resting connections' watch stopped");
                    return;
                }
            }
            for event in &events {
                match event.data.u64() {
                    WAKE_KEY => {
                        let mut drained = [0u8; 8];
                        let _ = rustix::io::read(&self.shared.wake, &mut drained);
                    }
                    key => self.readable(key),
                }
            }
            self.expire(Instant::now());
        }
    }

    /// How long until the nearest head deadline (`None`: none).
    fn timeout(&self) -> Option<Timespec> {
        let state = self.shared.state.lock().unwrap();
        if state.closing && !state.parked.is_empty() {
            return Some(Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            });
        }
        let (due, _) = state.due.first()?;
        let left = due.saturating_duration_since(Instant::now());
        // In whole milliseconds, rounded up (epoll_wait counts them): a
        // wake before the deadline would only wait again.
        let millis = i64::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX);
        Some(Timespec {
            tv_sec: millis / 1000,
            tv_nsec: millis % 1000 * 1_000_000,
        })
    }

    /// Hands a readable connection back to the runtime.
    fn readable(&self, key: u64) {
        let Some(parked) = self.take(key) else {
            return;
        };
        let _ = epoll::delete(&self.shared.epoll, &parked.socket);
        let resting = self.clone();
        let lane = parked.lane;
        (self.shared.spawn)(
            lane,
            Box::pin(async move {
                match tokio::net::TcpStream::from_std(parked.socket) {
                    Ok(stream) => resting.resume(stream, parked.head_due, parked.kept).await,
                    Err(error) => {
                        tracing::debug!(%error, "a resting connection could not rejoin the runtime: closed");
                    }
                }
            }),
        );
    }

    /// Closes the connections whose head is due by `now`, or all of them
    /// once closing.
    fn expire(&self, now: Instant) {
        loop {
            let parked = {
                let mut state = self.shared.state.lock().unwrap();
                let key = match state.closing {
                    true => state.parked.keys().next().copied(),
                    false => state
                        .due
                        .first()
                        .filter(|(due, _)| *due <= now)
                        .map(|(_, key)| *key),
                };
                let Some(key) = key else {
                    return;
                };
                state.take(key)
            };
            if let Some(parked) = parked {
                let _ = epoll::delete(&self.shared.epoll, &parked.socket);
                close(&parked.socket);
            }
        }
    }

    fn take(&self, key: u64) -> Option<Parked<T>> {
        self.shared.state.lock().unwrap().take(key)
    }
}

impl<T> Shared<T> {
    fn wake(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

impl<T> State<T> {
    fn take(&mut self, key: u64) -> Option<Parked<T>> {
        let parked = self.parked.remove(&key)?;
        self.due.remove(&(parked.head_due, key));
        Some(parked)
    }
}

/// Closes a parked connection as an idle one is closed: FIN, then the
/// descriptor (nothing unread is left: the socket was not readable).
fn close(socket: &std::net::TcpStream) {
    let _ = socket.shutdown(Shutdown::Write);
}
