//! The cap on connections open to the backend at once
//! (`backend.max_connections`; HAProxy's server `maxconn`, nginx's upstream
//! `max_conns`).
//!
//! Every connection the proxy's two pools open to the backend (hyper's
//! [`crate::upstream`] and the raw path's [`crate::raw_backend`]) holds a
//! [`Slot`] for as long as its socket lives. With the cap unset there is
//! no limit: each client connection may have one backend connection, and
//! the file-descriptor budget counts two per client connection. With it
//! set, an idle client connection costs one descriptor, not two: idle
//! client connections keep no backend connection (the pools keep at most
//! `backend.max_idle_connections`), so a process limited to 20 000
//! descriptors can keep 10 000 client connections open.
//!
//! A request that finds every slot taken waits for one, at most
//! `backend.queue_timeout` (HAProxy's `timeout queue`), then gets `503
//! SlowDown` with `Retry-After` (S3 SDKs retry it): the backend is not
//! blamed, no outage is counted. While a request waits, a connection of
//! hyper's pool that comes free is handed to it (kept in the pool, and the
//! waiting requests told: [`BackendSlots::connection_idle`]); the raw
//! path's, which hyper cannot use, are closed rather than kept, so the
//! slots they hold go to the waiting requests ([`BackendSlots::wanted`]);
//! so are hyper's left idle a moment, which the waiting requests (then
//! raw-path resumes) cannot use.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The slots of `backend.max_connections`, shared by both pools.
#[derive(Debug)]
pub struct BackendSlots {
    /// `None`: no cap.
    free: Option<Arc<Semaphore>>,
    /// Requests waiting for a slot now.
    waiting: AtomicUsize,
    /// Told when a request starts to wait, so that idle connections are
    /// closed at once rather than at the pools' next check.
    wanted: Notify,
    /// Told when a connection of hyper's pool comes free while requests
    /// wait.
    idle: Notify,
}

/// A backend connection's place under the cap, given back when dropped
/// (with the connection's socket).
#[derive(Debug, Default)]
pub struct Slot {
    _place: Option<OwnedSemaphorePermit>,
}

impl BackendSlots {
    /// At most `max` connections at once; `None`: as many as asked for.
    pub fn new(max: Option<usize>) -> BackendSlots {
        BackendSlots {
            free: max.map(|max| Arc::new(Semaphore::new(max))),
            waiting: AtomicUsize::new(0),
            wanted: Notify::new(),
            idle: Notify::new(),
        }
    }

    /// A slot if one is free now (always, without a cap).
    pub fn try_take(&self) -> Option<Slot> {
        match &self.free {
            None => Some(Slot::default()),
            Some(free) => Arc::clone(free).try_acquire_owned().ok().map(Slot::of),
        }
    }

    /// A slot, waiting up to `patience` for one to be given back; `None`
    /// when none was in time. While it waits, [`BackendSlots::wanted`] is
    /// true.
    pub async fn take(&self, patience: Duration) -> Option<Slot> {
        if let Some(slot) = self.try_take() {
            return Some(slot);
        }
        let free = Arc::clone(self.free.as_ref()?);
        let _waiting = Waiting::enter(self);
        self.wanted.notify_waiters();
        tokio::time::timeout(patience, free.acquire_owned())
            .await
            .ok()?
            .ok()
            .map(Slot::of)
    }

    /// True while a request waits for a slot: a connection that comes free
    /// should be closed, not pooled, and idle ones closed.
    pub fn wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// How many requests wait for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Ready when a request starts to wait for a slot, once polled or
    /// enabled (tokio's [`Notify::notify_waiters`]).
    pub fn wanted_soon(&self) -> Notified<'_> {
        self.wanted.notified()
    }

    /// A pooled connection came free for the requests waiting.
    pub fn connection_idle(&self) {
        self.idle.notify_waiters();
    }

    /// Ready when [`BackendSlots::connection_idle`] is called, once polled
    /// or enabled.
    pub fn idle_soon(&self) -> Notified<'_> {
        self.idle.notified()
    }
}

impl Slot {
    fn of(place: OwnedSemaphorePermit) -> Slot {
        Slot {
            _place: Some(place),
        }
    }
}

/// Counts one waiting request while it lives.
struct Waiting<'a>(&'a BackendSlots);

impl<'a> Waiting<'a> {
    fn enter(slots: &'a BackendSlots) -> Waiting<'a> {
        slots.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_cap_every_connection_gets_a_slot() {
        let slots = BackendSlots::new(None);
        let taken: Vec<Slot> = (0..1000).filter_map(|_| slots.try_take()).collect();
        assert_eq!(taken.len(), 1000);
        assert!(!slots.wanted());
    }

    #[tokio::test]
    async fn a_request_over_the_cap_waits_for_a_slot_given_back() {
        let slots = Arc::new(BackendSlots::new(Some(2)));
        let first = slots.try_take().expect("a free slot");
        let _second = slots.try_take().expect("a free slot");
        assert!(slots.try_take().is_none(), "two at most");
        let waiter = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.take(Duration::from_secs(30)).await.is_some() }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !slots.wanted() {
            assert!(tokio::time::Instant::now() < deadline, "never waited");
            tokio::task::yield_now().await;
        }
        drop(first);
        assert!(
            waiter.await.unwrap(),
            "the slot given back went to the waiter"
        );
        assert!(!slots.wanted());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_finds_no_slot_in_time_gets_none() {
        let slots = BackendSlots::new(Some(1));
        let _only = slots.try_take().expect("a free slot");
        assert!(slots.take(Duration::from_secs(3)).await.is_none());
        assert!(!slots.wanted(), "no longer waiting");
    }

    #[tokio::test]
    async fn the_pools_hear_when_a_request_starts_to_wait() {
        let slots = Arc::new(BackendSlots::new(Some(1)));
        let _only = slots.try_take().expect("a free slot");
        let told = slots.wanted_soon();
        let mut told = std::pin::pin!(told);
        told.as_mut().enable();
        let waiter = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.take(Duration::from_secs(30)).await.is_some() }
        });
        tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .expect("told of the waiting request");
        waiter.abort();
    }
}
