//! In-flight accounting: how many requests are at the backend right now, and
//! a way to wait until none are (admin pause, shutdown).

use std::time::Duration;

use tokio::sync::watch;

/// Counts requests in flight to the backend.
#[derive(Debug, Clone)]
pub struct InFlight {
    count: watch::Sender<usize>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            count: watch::Sender::new(0),
        }
    }
}

impl InFlight {
    /// Counts one request until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.count.send_modify(|n| *n += 1);
        InFlightGuard {
            count: self.count.clone(),
        }
    }

    pub fn current(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until nothing is in flight or `limit` passes; returns what is left.
    pub async fn drained_within(&self, limit: Duration) -> usize {
        let mut rx = self.count.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        self.current()
    }
}

/// One request in flight; dropping it ends the count.
#[derive(Debug)]
pub struct InFlightGuard {
    count: watch::Sender<usize>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn draining_waits_for_the_last_request() {
        let in_flight = InFlight::default();
        let guard = in_flight.enter();
        let waiter = {
            let in_flight = in_flight.clone();
            tokio::spawn(async move { in_flight.drained_within(Duration::from_secs(5)).await })
        };
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(guard);
        assert_eq!(waiter.await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_gives_up_with_what_is_left() {
        let in_flight = InFlight::default();
        let _guard = in_flight.enter();
        assert_eq!(in_flight.drained_within(Duration::from_secs(1)).await, 1);
    }
}
