//! The phases every client connection follows while the proxy shuts down
//! (or hands its sockets to a new process), and the wait for the last one.
//!
//! [`Phase::Serving`] until shutdown begins. [`Phase::Draining`]: the
//! listeners still accept and serve, every HTTP/1.1 answer carries
//! `Connection: close`, and HTTP/2 connections get GOAWAY (RFC 9113 §6.8: the
//! two-step form, so a request the client sent meanwhile is still served).
//! [`Phase::Closing`]: accepting has stopped; each connection closes once
//! its requests are answered (an idle HTTP/1.1 keep-alive connection at once).

use std::future::Future;
use std::pin::pin;
use std::task::{Poll, Waker};

use tokio::sync::watch;

/// Where the proxy is in its shutdown, as each connection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

/// The proxy's side: moves every connection through the phases and waits
/// until they have all ended.
#[derive(Debug)]
pub struct Shutdown {
    phase: watch::Sender<Phase>,
}

/// A connection's (or listener's) side: holding one keeps
/// [`Shutdown::connections_ended`] waiting.
pub type ShutdownWatch = watch::Receiver<Phase>;

/// Resolves once the proxy closes its connections ([`Phase::Closing`]).
pub async fn closing(watch: &mut ShutdownWatch) {
    let _ = watch.wait_for(|phase| *phase == Phase::Closing).await;
}

/// Resolves once `watch` holds a value for which `reached` is true (a step
/// of the shutdown: [`Phase::Closing`], the end of the grace). Made to be
/// polled again and again by a connection's requests for as long as the
/// connection lives: while nothing was sent on the watch since it was made
/// and the waker is the one it registered, a poll reads one atomic and
/// returns, where a poll of tokio's own wait takes the watch's waiter-list
/// lock.
pub fn reached<T>(
    watch: watch::Receiver<T>,
    reached: impl Fn(&T) -> bool + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static
where
    T: Send + Sync + 'static,
{
    let unchanged = watch.clone();
    async move {
        let mut watch = watch;
        let mut wait = pin!(watch.wait_for(reached));
        let mut registered: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            let same_waker = registered
                .as_ref()
                .is_some_and(|waker| waker.will_wake(cx.waker()));
            if same_waker && !unchanged.has_changed().unwrap_or(true) {
                return Poll::Pending;
            }
            match wait.as_mut().poll(cx) {
                Poll::Ready(_) => Poll::Ready(()),
                Poll::Pending => {
                    registered = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            phase: watch::Sender::new(Phase::Serving),
        }
    }
}

impl Shutdown {
    /// A watch for one more connection.
    pub fn watch(&self) -> ShutdownWatch {
        self.phase.subscribe()
    }

    /// Enters [`Phase::Draining`] (no-op if already there or past it).
    pub fn drain(&self) {
        self.advance(Phase::Draining);
    }

    /// Enters [`Phase::Closing`].
    pub fn close(&self) {
        self.advance(Phase::Closing);
    }

    fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|phase| {
            let later = to > *phase;
            if later {
                *phase = to;
            }
            later
        });
    }

    /// Resolves once every watch handed out has been dropped: every
    /// connection has ended.
    pub async fn connections_ended(&self) {
        self.phase.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_step_is_reached_when_the_watch_gets_there_and_not_before() {
        use futures_util::FutureExt;
        let shutdown = Shutdown::default();
        let mut closing = pin!(reached(shutdown.watch(), |phase| *phase == Phase::Closing));
        assert_eq!(closing.as_mut().now_or_never(), None, "serving");
        assert_eq!(closing.as_mut().now_or_never(), None, "still serving");
        shutdown.drain();
        assert_eq!(closing.as_mut().now_or_never(), None, "draining");
        shutdown.close();
        assert_eq!(closing.as_mut().now_or_never(), Some(()), "closing");
        let already = reached(shutdown.watch(), |phase| *phase == Phase::Closing);
        assert_eq!(already.now_or_never(), Some(()), "made after the step");
    }

    #[tokio::test]
    async fn a_step_wakes_the_task_that_waits_for_it() {
        let shutdown = Shutdown::default();
        let closing = tokio::spawn(reached(shutdown.watch(), |phase| *phase == Phase::Closing));
        tokio::task::yield_now().await;
        shutdown.close();
        tokio::time::timeout(Duration::from_secs(5), closing)
            .await
            .expect("woken")
            .unwrap();
    }

    #[tokio::test]
    async fn phases_only_move_forward() {
        let shutdown = Shutdown::default();
        let watch = shutdown.watch();
        shutdown.close();
        shutdown.drain();
        assert_eq!(*watch.borrow(), Phase::Closing);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_with_the_last_connection() {
        let shutdown = Shutdown::default();
        let first = shutdown.watch();
        let second = first.clone();
        drop(first);
        let still_open =
            tokio::time::timeout(Duration::from_secs(1), shutdown.connections_ended()).await;
        assert!(still_open.is_err(), "one connection is still open");
        drop(second);
        shutdown.connections_ended().await;
    }
}
