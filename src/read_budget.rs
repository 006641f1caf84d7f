//! Large reads of bodies (backend responses, and client uploads over plain
//! HTTP/1.1), within one memory budget for the whole process.
//!
//! hyper reads a connection into one buffer, whose largest size
//! (`max_buf_size`) is also its limit on a message head, and a buffer once
//! grown stays with its connection. Streaming a large object in reads of
//! 64 KiB costs about twice the CPU per GiB of reads of 512 KiB
//! (`benches/HISTORY.md`), but 512 KiB kept by every pooled connection, or by every
//! slow download, is not bounded memory. So the upstream gives hyper room
//! for `backend.max_read_bytes` and [`BudgetedRead`] decides, per
//! connection, how much of it a read may fill: below the head limit until a
//! read comes back full (the body arrives faster than it is read) and the
//! [`ReadBudget`] has room for one more large buffer; from then on as much
//! as hyper asks. The connection keeps its share until the upstream rebuilds
//! hyper's side of it (which frees the buffer) or closes it. A client's
//! large request body takes a share of the same budget for the round of
//! its own it is read in ([`crate::keep_alive`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf, Take};

/// Reads' worth of memory a connection reading in large reads holds: the
/// buffer hyper reads into, the chunk on its way to the client, and the
/// chunk being written to the client (each read is a slice of hyper's
/// buffer, which cannot be reused while a slice of it lives). Measured: 64
/// downloads in reads of 512 KiB held about 1.75 MB each.
pub const READS_HELD: usize = 3;

/// The bytes all connections together may hold in large read buffers.
#[derive(Debug)]
pub struct ReadBudget {
    available: AtomicUsize,
    /// What one connection's large reads hold: [`READS_HELD`] reads.
    share: usize,
}

impl ReadBudget {
    /// A budget of `total` bytes for connections reading in reads of up to
    /// `max_read_bytes`.
    pub fn new(total: usize, max_read_bytes: usize) -> ReadBudget {
        ReadBudget {
            available: AtomicUsize::new(total),
            share: max_read_bytes.saturating_mul(READS_HELD),
        }
    }

    /// Bytes one connection's large reads take from the budget.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Bytes not taken by any connection.
    pub fn available(&self) -> usize {
        self.available.load(Ordering::Relaxed)
    }

    /// `bytes` of the budget, if it has them left.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Option<Share> {
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(bytes)
            })
            .ok()?;
        Some(Share {
            budget: Arc::clone(self),
            bytes,
        })
    }
}

/// One connection's part of the budget, given back when dropped (the
/// large buffers it stood for are freed by then, and counted toward the
/// next heap trim).
#[derive(Debug)]
pub struct Share {
    budget: Arc<ReadBudget>,
    bytes: usize,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget
            .available
            .fetch_add(self.bytes, Ordering::AcqRel);
        crate::heap_trim::released_bytes(self.bytes);
    }
}

/// Whether a connection reads in large reads, seen from outside its task.
#[derive(Debug, Clone, Default)]
pub struct LargeReads(Arc<AtomicBool>);

impl LargeReads {
    /// True once the connection took a share: its read buffer may have grown.
    pub fn taken(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// An I/O object whose reads stay below `small_read` bytes until the
/// budget gives it a share (see the module doc).
#[derive(Debug)]
pub struct BudgetedRead<T> {
    /// Limits a read only when told to (`set_limit` before each): reads
    /// that need no limit go to the I/O object itself.
    inner: Take<T>,
    budget: Arc<ReadBudget>,
    /// The longest read without a share: one byte under the largest power
    /// of two within the head limit, so that hyper's adaptive read size
    /// (which doubles after a read that fills it) never grows past the head
    /// limit on its own.
    small_read: usize,
    share: Option<Share>,
    large: LargeReads,
}

impl<T: AsyncRead> BudgetedRead<T> {
    /// Wraps `inner`, whose reads stay below `max_head_bytes` without a
    /// share of `budget`; `large` tells whether it took one.
    pub fn new(
        inner: T,
        budget: Arc<ReadBudget>,
        max_head_bytes: usize,
        large: LargeReads,
    ) -> BudgetedRead<T> {
        BudgetedRead {
            inner: inner.take(0),
            budget,
            small_read: largest_power_of_two_within(max_head_bytes) - 1,
            share: None,
            large,
        }
    }
}

impl<T: AsyncRead> BudgetedRead<T> {
    /// The I/O object, its share (if any) given back.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

/// The largest power of two that is at most `n` (`n` at least 1).
fn largest_power_of_two_within(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.max(1).leading_zeros())
}

impl<T: AsyncRead + Unpin> AsyncRead for BudgetedRead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.share.is_some() || buf.remaining() <= this.small_read {
            return Pin::new(this.inner.get_mut()).poll_read(cx, buf);
        }
        // `Take` limits this one read without copying or initialising.
        this.inner.set_limit(this.small_read as u64);
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() - before == this.small_read {
            this.share = this.budget.take(this.budget.share);
            if this.share.is_some() {
                this.large.0.store(true, Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for BudgetedRead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().inner.get_mut()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().inner.get_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.get_ref().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.get_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.get_mut()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const HEAD_LIMIT: usize = 64 << 10;
    const MAX_READ: usize = 512 << 10;
    const SHARE: usize = READS_HELD * MAX_READ;

    type Pipe = tokio::io::DuplexStream;

    /// A connection over an in-memory pipe whose far end (returned too, to
    /// keep it open) has `waiting` bytes written into it already.
    async fn reading(
        budget: &Arc<ReadBudget>,
        waiting: usize,
    ) -> (BudgetedRead<Pipe>, LargeReads, Pipe) {
        let (ours, mut theirs) = tokio::io::duplex(2 * MAX_READ);
        theirs.write_all(&vec![7u8; waiting]).await.unwrap();
        let large = LargeReads::default();
        let read = BudgetedRead::new(ours, Arc::clone(budget), HEAD_LIMIT, large.clone());
        (read, large, theirs)
    }

    async fn read_once(read: &mut BudgetedRead<Pipe>, room: usize) -> usize {
        let mut buf = vec![0u8; room];
        read.read(&mut buf).await.unwrap()
    }

    #[tokio::test]
    async fn reads_stay_under_the_head_limit_until_one_comes_back_full() {
        let budget = Arc::new(ReadBudget::new(4 * SHARE, MAX_READ));
        let (mut read, large, _backend) = reading(&budget, 2 * MAX_READ).await;
        assert_eq!(read_once(&mut read, MAX_READ).await, HEAD_LIMIT - 1);
        assert!(large.taken(), "a full read takes a share");
        assert_eq!(budget.available(), 3 * SHARE);
        assert_eq!(
            read_once(&mut read, MAX_READ).await,
            MAX_READ,
            "then reads fill what hyper offers"
        );
    }

    #[tokio::test]
    async fn a_slow_body_takes_no_share() {
        let budget = Arc::new(ReadBudget::new(4 * SHARE, MAX_READ));
        let (mut read, large, _backend) = reading(&budget, 1000).await;
        assert_eq!(read_once(&mut read, MAX_READ).await, 1000);
        assert!(!large.taken());
        assert_eq!(budget.available(), 4 * SHARE);
    }

    #[tokio::test]
    async fn past_the_budget_reads_stay_small() {
        let budget = Arc::new(ReadBudget::new(SHARE, MAX_READ));
        let (mut first, first_large, _first_backend) = reading(&budget, 2 * MAX_READ).await;
        let (mut second, second_large, _second_backend) = reading(&budget, 2 * MAX_READ).await;
        read_once(&mut first, MAX_READ).await;
        assert!(first_large.taken());
        for _ in 0..3 {
            assert_eq!(read_once(&mut second, MAX_READ).await, HEAD_LIMIT - 1);
        }
        assert!(!second_large.taken(), "the budget was spent");
        drop(first);
        assert_eq!(
            budget.available(),
            SHARE,
            "a closed connection gives its share back"
        );
        read_once(&mut second, MAX_READ).await;
        assert!(second_large.taken());
    }

    #[test]
    fn the_small_read_stays_under_the_power_of_two_within_the_head_limit() {
        assert_eq!(largest_power_of_two_within(64 << 10), 64 << 10);
        assert_eq!(largest_power_of_two_within(100 << 10), 64 << 10);
        assert_eq!(largest_power_of_two_within(8 << 10), 8 << 10);
        assert_eq!(largest_power_of_two_within(1), 1);
    }
}
