//! A body moved from one TCP socket to another through a pipe, with Linux's
//! `splice(2)`: the bytes never enter the proxy's memory (HAProxy's
//! `option splice-response`, nginx's `sendfile` for files).
//!
//! Reading a body into a buffer and writing it out again costs two copies
//! per byte; splicing hands the kernel's own pages from the backend socket to
//! a pipe and from the pipe to the client socket. The raw HTTP/1.1 path
//! ([`crate::raw_http1`]) uses it for the rest of a large answer body whose
//! length is known, once its head and first bytes went out as bytes, and
//! for a large upload's body, client to backend.
//!
//! The pipe is filled with at most what it holds and emptied to the client
//! before the next fill, so when the backend fails every byte read from it
//! has reached the client: what [`Spliced::moved`] counts is what the
//! client has, which is where a resumed download starts again.
//!
//! Memory: a pipe holds at most 1 MiB of the kernel's pages per download,
//! while the client is slower than the backend. Linux bounds the pipes of an
//! unprivileged user together (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB
//! by default); past that a new pipe gets one page, and a body moves a page
//! at a time.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::net::RecvFlags;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit};

/// The pipe's capacity asked for, in bytes: 16 times Linux's default of
/// 64 KiB, so a large body moves in few system calls. An unprivileged
/// process may ask up to `/proc/sys/fs/pipe-max-size` (1 MiB by default);
/// when the kernel refuses, the pipe keeps what it has (`pipe(7)`). Four
/// GETs of 512 MiB in a row (2026-12-02): 0.37-0.48 CPU-s per GiB with 1 MiB,
/// 0.56-0.69 with 256 KiB, 0.58-0.62 with 64 KiB, 0.90-1.06 read and written
/// through a buffer.
const PIPE_CAPACITY: usize = 1 << 20;

/// Splices that find no byte while a read would find one before the
/// backend's bytes count as stuck at the urgent mark (bytes that arrive
/// between a splice and the check make one such try, never three).
const STUCK_AFTER: usize = 3;

/// Bodies shorter than this, in bytes, are not worth a pipe (two file
/// descriptors and four system calls to set up and close).
pub const WORTH_SPLICING: u64 = 256 << 10;

/// The pipes that may be open at once. Each holds two file descriptors,
/// counted at start with the connections' (`listener.max_connections`, as
/// HAProxy counts its `maxpipes`): when none is free, a body goes through a
/// buffer instead.
#[derive(Debug)]
pub struct Pipes {
    free: Semaphore,
}

impl Pipes {
    /// Room for `max` pipes at once.
    pub fn new(max: usize) -> Pipes {
        Pipes {
            free: Semaphore::new(max),
        }
    }

    /// A new pipe, non-blocking and closed on exec, when the budget has room
    /// and the kernel gives one (`pipe2(2)` fails with `EMFILE` when the
    /// process is out of descriptors).
    pub fn open(&self) -> Option<Pipe<'_>> {
        let place = self.free.try_acquire().ok()?;
        let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
        let capacity = fcntl_setpipe_size(&write_end, PIPE_CAPACITY)
            .or_else(|_| fcntl_getpipe_size(&write_end))
            .ok()?;
        Some(Pipe {
            read_end,
            write_end,
            capacity,
            _place: place,
        })
    }
}

/// A pipe between two sockets, holding its place in [`Pipes`].
pub struct Pipe<'a> {
    read_end: OwnedFd,
    write_end: OwnedFd,
    capacity: usize,
    _place: SemaphorePermit<'a>,
}

/// How a splice of a body went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes the client socket took.
    pub moved: u64,
    pub end: SpliceEnd,
}

/// Why a splice of a body stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Every byte asked for reached the client socket.
    Done,
    /// The backend closed its side or failed before the end.
    BackendBroke,
    /// The client failed, or took nothing for the send timeout.
    ClientGone,
    /// The backend's next bytes cannot be spliced: they wait behind TCP's
    /// urgent mark (RFC 9293 section 3.8.5), where Linux's splice stops
    /// without a byte and without blocking, and which a read passes. The rest
    /// goes through a buffer.
    NotSpliceable,
}

/// What one splice from the backend into the pipe came to.
pub(crate) enum Fill {
    Bytes(usize),
    /// Bytes wait that splice will not take (see [`SpliceEnd::NotSpliceable`]).
    Stuck,
}

impl Pipe<'_> {
    /// The most the pipe holds, in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves `length` bytes from `from` to `to`; a wait for `to` to take
    /// bytes that lasts `send_timeout` ends it ([`SpliceEnd::ClientGone`]),
    /// as `listener.send_timeout` ends a write on the hyper path.
    pub async fn pass(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        length: u64,
        send_timeout: Duration,
    ) -> Spliced {
        let mut moved = 0;
        while moved < length {
            let asked = (length - moved).min(self.capacity as u64) as usize;
            let filled = match self.fill(from, asked).await {
                Ok(Fill::Bytes(0)) | Err(_) => {
                    return Spliced::stopped(moved, SpliceEnd::BackendBroke);
                }
                Ok(Fill::Stuck) => return Spliced::stopped(moved, SpliceEnd::NotSpliceable),
                Ok(Fill::Bytes(filled)) => filled,
            };
            let mut in_pipe = filled;
            while in_pipe > 0 {
                let drained = tokio::time::timeout(send_timeout, self.drain(to, in_pipe));
                match drained.await {
                    Ok(Ok(drained)) if drained > 0 => {
                        in_pipe -= drained;
                        moved += drained as u64;
                    }
                    _ => return Spliced::stopped(moved, SpliceEnd::ClientGone),
                }
            }
        }
        Spliced {
            moved,
            end: SpliceEnd::Done,
        }
    }

    /// Splices up to `asked` bytes from `from` into the (empty) pipe: none
    /// at the end of `from`'s stream.
    pub(crate) async fn fill(&self, from: &TcpStream, asked: usize) -> io::Result<Fill> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        from.async_io(Interest::READABLE, || {
            for _ in 0..STUCK_AFTER {
                match rustix::pipe::splice(from, None, &self.write_end, None, asked, flags) {
                    Ok(filled) => return Ok(Fill::Bytes(filled)),
                    // Nothing to splice: a wait for more, unless a read
                    // would find bytes, which may have come just now (try
                    // again) or wait at the urgent mark.
                    Err(rustix::io::Errno::AGAIN) if bytes_wait(from) => {}
                    Err(rustix::io::Errno::AGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                    Err(error) => return Err(error.into()),
                }
            }
            Ok(Fill::Stuck)
        })
        .await
    }

    /// Splices up to `in_pipe` bytes from the pipe into `to`.
    pub(crate) async fn drain(&self, to: &TcpStream, in_pipe: usize) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        to.async_io(Interest::WRITABLE, || {
            Ok(rustix::pipe::splice(
                &self.read_end,
                None,
                to,
                None,
                in_pipe,
                flags,
            )?)
        })
        .await
    }
}

/// Whether a read of `socket` would find a byte now.
fn bytes_wait(socket: &TcpStream) -> bool {
    let peek = RecvFlags::PEEK | RecvFlags::DONTWAIT;
    matches!(rustix::net::recv(socket, &mut [0u8; 1], peek), Ok((read, _)) if read > 0)
}

impl Spliced {
    fn stopped(moved: u64, end: SpliceEnd) -> Spliced {
        Spliced { moved, end }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of sockets: (the one written to, the one read from).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn pattern(length: usize) -> Vec<u8> {
        (0..length).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_body_larger_than_the_pipe_arrives_byte_for_byte() {
        let (mut backend, from) = socket_pair().await;
        let (to, mut client) = socket_pair().await;
        let body = pattern(3 * PIPE_CAPACITY + 12_345);
        let sent = body.clone();
        let sender = tokio::spawn(async move { backend.write_all(&sent).await.unwrap() });
        let receiver = tokio::spawn(async move {
            let mut received = vec![0; body.len()];
            client.read_exact(&mut received).await.unwrap();
            received == body
        });
        let pipes = Pipes::new(1);
        let pipe = pipes.open().unwrap();
        let length = 3 * PIPE_CAPACITY as u64 + 12_345;
        let spliced = pipe.pass(&from, &to, length, Duration::from_secs(30)).await;
        assert_eq!(
            spliced,
            Spliced {
                moved: length,
                end: SpliceEnd::Done
            }
        );
        sender.await.unwrap();
        assert!(receiver.await.unwrap(), "the client got other bytes");
    }

    #[tokio::test]
    async fn a_backend_that_closes_early_ends_it_with_what_the_client_has() {
        let (mut backend, from) = socket_pair().await;
        let (to, mut client) = socket_pair().await;
        backend.write_all(&pattern(100_000)).await.unwrap();
        drop(backend);
        let pipes = Pipes::new(1);
        let pipe = pipes.open().unwrap();
        let spliced = pipe
            .pass(&from, &to, 1 << 30, Duration::from_secs(30))
            .await;
        assert_eq!(
            spliced,
            Spliced {
                moved: 100_000,
                end: SpliceEnd::BackendBroke
            }
        );
        drop(to);
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, pattern(100_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_that_arrive_while_the_pipe_is_filled_are_spliced_too() {
        let (mut backend, from) = socket_pair().await;
        let (to, mut client) = socket_pair().await;
        const LENGTH: usize = 64 << 20;
        let sender = tokio::spawn(async move {
            for piece in pattern(LENGTH).chunks(4096) {
                backend.write_all(piece).await.unwrap();
            }
        });
        let receiver = tokio::spawn(async move {
            let mut received = vec![0; LENGTH];
            client.read_exact(&mut received).await.unwrap();
            received == pattern(LENGTH)
        });
        let pipes = Pipes::new(1);
        let pipe = pipes.open().unwrap();
        let spliced = pipe
            .pass(&from, &to, LENGTH as u64, Duration::from_secs(30))
            .await;
        assert_eq!(
            spliced,
            Spliced {
                moved: LENGTH as u64,
                end: SpliceEnd::Done
            }
        );
        sender.await.unwrap();
        assert!(receiver.await.unwrap(), "the client got other bytes");
    }

    #[tokio::test]
    async fn bytes_behind_an_urgent_mark_are_left_to_a_read() {
        let (mut backend, mut from) = socket_pair().await;
        let (to, mut client) = socket_pair().await;
        backend.write_all(&pattern(100_000)).await.unwrap();
        rustix::net::send(&backend, b"!", rustix::net::SendFlags::OOB).unwrap();
        backend.write_all(&pattern(50_000)).await.unwrap();
        let pipes = Pipes::new(1);
        let pipe = pipes.open().unwrap();
        let spliced = tokio::time::timeout(
            Duration::from_secs(10),
            pipe.pass(&from, &to, 150_000, Duration::from_secs(30)),
        )
        .await
        .expect("splice does not wait at the urgent mark");
        assert_eq!(spliced.end, SpliceEnd::NotSpliceable);
        // What came before the mark reached the client; a read takes the rest.
        let mut before = vec![0; spliced.moved as usize];
        client.read_exact(&mut before).await.unwrap();
        assert_eq!(before, pattern(100_000)[..before.len()]);
        let mut rest = vec![0; 150_000 - before.len()];
        from.read_exact(&mut rest).await.unwrap();
        let expected = [pattern(100_000), pattern(50_000)].concat();
        assert_eq!(rest, expected[before.len()..]);
    }

    #[tokio::test]
    async fn a_client_that_takes_nothing_ends_it_after_the_send_timeout() {
        let (mut backend, from) = socket_pair().await;
        let (to, _client_not_reading) = socket_pair().await;
        let body = pattern(64 << 20);
        let sender = tokio::spawn(async move {
            let _ = backend.write_all(&body).await;
        });
        let pipes = Pipes::new(1);
        let pipe = pipes.open().unwrap();
        let spliced = pipe
            .pass(&from, &to, 64 << 20, Duration::from_millis(200))
            .await;
        assert_eq!(spliced.end, SpliceEnd::ClientGone);
        assert!(spliced.moved < 64 << 20);
        sender.abort();
    }
}
