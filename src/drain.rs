//! In-flight accounting: how many requests are at the backend right now, and
//! a way to wait until none are (admin pause, shutdown).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Counts requests in flight to the backend.
///
/// A plain atomic count: every request enters and leaves it, on every lane,
/// so it must cost no lock and wake no one unless a drain is waiting (a
/// `watch` channel took a lock and notified its eight waiter lists twice per
/// request).
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    count: AtomicUsize,
    /// Notified when the count drops to zero.
    none_left: Notify,
}

impl InFlight {
    /// Counts one request until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.shared.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard {
            shared: Arc::clone(&self.shared),
        }
    }

    pub fn current(&self) -> usize {
        self.shared.count.load(Ordering::Acquire)
    }

    /// Waits until nothing is in flight or `limit` passes; returns what is left.
    pub async fn drained_within(&self, limit: Duration) -> usize {
        let none_left = async {
            loop {
                let notified = self.shared.none_left.notified();
                tokio::pin!(notified);
                // Registered before the count is read: a drop to zero in
                // between still wakes this wait.
                notified.as_mut().enable();
                if self.current() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, none_left).await;
        self.current()
    }
}

/// One request in flight; dropping it ends the count.
#[derive(Debug)]
pub struct InFlightGuard {
    shared: Arc<Shared>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.shared.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.none_left.notify_waiters();
        }
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
        // Paused time: without a wake-up the 5 s limit would end it instead.
        let left = tokio::time::timeout(Duration::from_millis(10), waiter)
            .await
            .expect("the drain ends when the last request does");
        assert_eq!(left.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_waits_for_every_request_and_requests_entering_meanwhile() {
        let in_flight = InFlight::default();
        let first = in_flight.enter();
        let second = in_flight.enter();
        let waiter = {
            let in_flight = in_flight.clone();
            tokio::spawn(async move { in_flight.drained_within(Duration::from_secs(5)).await })
        };
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(first);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        drop(second);
        let third = in_flight.enter();
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(third);
        let left = tokio::time::timeout(Duration::from_millis(10), waiter)
            .await
            .expect("the drain ends when the last request does");
        assert_eq!(left.unwrap(), 0);
        assert_eq!(in_flight.drained_within(Duration::ZERO).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_gives_up_with_what_is_left() {
        let in_flight = InFlight::default();
        let _guard = in_flight.enter();
        assert_eq!(in_flight.drained_within(Duration::from_secs(1)).await, 1);
    }
}
