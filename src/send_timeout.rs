//! A client connection's writes, bounded by `listener.send_timeout`.
//!
//! A client that stops reading (a zero TCP window) would otherwise hold its
//! connection, and the backend connection feeding it, for as long as it
//! likes. [`SendTimeout`] fails a write, flush or shutdown that has made no
//! progress for the timeout with [`io::ErrorKind::TimedOut`]: hyper then
//! closes the connection, and the response is logged as cut (nginx's
//! `send_timeout`, HAProxy's `timeout client`). Reads pass through untouched;
//! the timer exists only while a write is stuck.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// An I/O object whose writes time out when the peer takes nothing.
pub struct SendTimeout<I> {
    inner: I,
    limit: Duration,
    /// Armed when a write found the peer not reading.
    stuck: Option<Pin<Box<Sleep>>>,
}

impl<I> SendTimeout<I> {
    pub fn new(inner: I, limit: Duration) -> SendTimeout<I> {
        SendTimeout {
            inner,
            limit,
            stuck: None,
        }
    }

    /// The I/O object.
    pub fn into_inner(self) -> I {
        self.inner
    }

    /// Passes on a write's outcome; a pending one counts against the limit.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stuck = None;
            return polled;
        }
        let limit = self.limit;
        let stuck = self
            .stuck
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stuck.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no response byte for listener.send_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SendTimeout<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SendTimeout<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_nothing_times_out_and_one_that_reads_does_not() {
        let (mut peer, ours) = tokio::io::duplex(16);
        let mut writer = SendTimeout::new(ours, Duration::from_secs(60));
        writer.write_all(&[0; 16]).await.unwrap();
        let stuck = writer.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(stuck.kind(), io::ErrorKind::TimedOut);

        let mut writer = SendTimeout::new(writer.inner, Duration::from_secs(60));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            // The 16 bytes from before, then the 64: every 30 s a little.
            let mut taken = 0;
            let mut sink = [0u8; 16];
            while taken < 80 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                taken += peer.read(&mut sink).await.unwrap();
            }
            peer
        });
        // Takes minutes in all, never a minute without progress.
        writer.write_all(&[0; 64]).await.unwrap();
        drop(reader.await.unwrap());
    }
}
