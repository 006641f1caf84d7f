//! The request log: one line per request when its response is over (method,
//! path, status, time held, replays, resumes of a cut download, bytes each
//! way, S3 request id, outcome).
//!
//! A [`RequestRecord`] travels inside the response body and writes its line
//! when dropped, so the line carries the bytes really streamed and notes a
//! response cut short.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use tokio::time::Instant;

use crate::download_resume::Resumes;
use crate::metrics::Metrics;
use crate::outcome::{HoldOutcome, RequestOutcome};

/// Request ids for answers the proxy makes itself: unique per process run.
pub fn next_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("P{start:X}{n:08X}")
}

/// What is known about one request; logged on drop.
pub struct RequestRecord {
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub request_id: String,
    pub held: Duration,
    /// The request met the hold queue (held, or turned away by it).
    pub was_held: bool,
    pub replays: u32,
    /// Cuts of the response body resumed ([`crate::download_resume`]).
    pub resumes: Resumes,
    pub bytes_out: u64,
    /// Reads the request body bytes taken from the client.
    pub bytes_in: Box<dyn Fn() -> u64 + Send>,
    pub started: Instant,
    /// `ok`, or why the proxy answered itself or the response broke.
    pub outcome: RequestOutcome,
    pub metrics: Arc<Metrics>,
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let bytes_in = (self.bytes_in)();
        let duration = self.started.elapsed();
        self.metrics.request(
            &self.method,
            self.status,
            duration,
            bytes_in,
            self.bytes_out,
        );
        let held = self.held + self.resumes.held();
        if let Some(outcome) = HoldOutcome::of(self.outcome, self.was_held) {
            self.metrics.hold_outcome(outcome, held);
        }
        tracing::info!(
            target: crate::logging::ACCESS_TARGET,
            method = %self.method,
            path = %self.path,
            status = self.status,
            held_ms = held.as_millis() as u64,
            replays = self.replays,
            resumes = self.resumes.count(),
            bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = duration.as_millis() as u64,
            request_id = %self.request_id,
            outcome = self.outcome.as_str(),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique() {
        assert_ne!(next_request_id(), next_request_id());
    }
}
