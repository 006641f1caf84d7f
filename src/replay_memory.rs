//! The replay memory budget: body bytes kept for replay by all requests
//! together, at most `hold.replay_memory`, on top of each request's own
//! `hold.replay_buffer`.
//!
//! A request keeps a copy of its body only while the budget has room; past
//! it, the request streams on without a copy (and is no longer replayable
//! once it has reached the backend), so a burst of large uploads cannot grow
//! memory beyond the budget. Reserved bytes are returned when the copy is
//! dropped: the backend answered, the copy outgrew a limit, or the request
//! ended.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::{IntCounter, IntGauge};

/// Bytes kept for replay across all requests, and the most allowed.
#[derive(Debug)]
pub struct ReplayMemory {
    used: AtomicUsize,
    limit: AtomicUsize,
    /// `s3fp_replay_memory_bytes`.
    in_use: IntGauge,
    /// `s3fp_replay_memory_exhausted_total`.
    exhausted: IntCounter,
}

impl ReplayMemory {
    /// A budget of `limit` bytes, reported through `in_use` and `exhausted`.
    pub fn new(limit: usize, in_use: IntGauge, exhausted: IntCounter) -> ReplayMemory {
        ReplayMemory {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            in_use,
            exhausted,
        }
    }

    /// A budget of its own for tests and tools: no metrics registry.
    pub fn unmetered(limit: usize) -> ReplayMemory {
        ReplayMemory::new(
            limit,
            IntGauge::new("replay_memory_bytes", "unregistered").expect("valid gauge"),
            IntCounter::new("replay_memory_exhausted", "unregistered").expect("valid counter"),
        )
    }

    /// A new `hold.replay_memory` (a reload): copies already kept stay; new
    /// reservations follow the new limit.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Takes `bytes` from the budget; false (and counted) when they do not
    /// fit, and then nothing is taken.
    pub fn try_reserve(&self, bytes: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let reserved = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .is_ok();
        if reserved {
            self.in_use.add(bytes as i64);
        } else {
            self.exhausted.inc();
        }
        reserved
    }

    /// Returns `bytes` taken with [`ReplayMemory::try_reserve`].
    pub fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.in_use.sub(bytes as i64);
        }
    }

    /// Bytes kept for replay now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_limit_and_come_back_on_release() {
        let memory = ReplayMemory::unmetered(100);
        assert!(memory.try_reserve(60));
        assert!(!memory.try_reserve(41), "past the limit: nothing taken");
        assert_eq!(memory.used(), 60);
        assert!(memory.try_reserve(40));
        memory.release(60);
        assert!(memory.try_reserve(50));
        assert_eq!(memory.used(), 90);
        assert_eq!(memory.exhausted.get(), 1);
    }

    #[test]
    fn a_lower_limit_applies_to_new_reservations() {
        let memory = ReplayMemory::unmetered(100);
        assert!(memory.try_reserve(80));
        memory.set_limit(50);
        assert!(!memory.try_reserve(1));
        memory.release(80);
        assert!(memory.try_reserve(50));
    }
}
