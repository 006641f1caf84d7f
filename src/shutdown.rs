//! The phases every client connection follows while the proxy shuts down
//! (or hands its sockets to a new process), and the wait for the last one.
//!
//! [`Phase::Serving`] until shutdown begins. [`Phase::Draining`]: the
//! listeners still accept and serve, every HTTP/1.1 answer carries
//! `Connection: close`, and HTTP/2 connections get GOAWAY (RFC 9113 §6.8: the
//! two-step form, so a request the client sent meanwhile is still served).
//! [`Phase::Closing`]: accepting has stopped; each connection closes once
//! its requests are answered (an idle HTTP/1.1 keep-alive connection at once).

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
