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
use crate::metrics::{HoldOutcome, Metrics};

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
    pub outcome: &'static str,
    pub metrics: Arc<Metrics>,
}

impl RequestRecord {
    /// How the hold queue figured in this request, if it did.
    fn hold_outcome(&self) -> Option<HoldOutcome> {
        match self.outcome {
            "queue_full" => Some(HoldOutcome::QueueFull),
            "client_share" => Some(HoldOutcome::ClientShare),
            "fail_fast" => Some(HoldOutcome::FailFast),
            "hold_timeout" => Some(HoldOutcome::TimedOut),
            "client_gone" => Some(HoldOutcome::ClientGone),
            "shutting_down" => Some(HoldOutcome::ShuttingDown),
            "ok" if self.was_held => Some(HoldOutcome::Released),
            _ if self.was_held => Some(HoldOutcome::ReleasedFailed),
            _ => None,
        }
    }
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
        if let Some(outcome) = self.hold_outcome() {
            self.metrics.hold_outcome(outcome, held);
        }
        tracing::info!(
            target: "s3_failover_proxy::access",
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
            outcome = self.outcome,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_held_until_shutdown_counts_as_shutting_down() {
        let record = RequestRecord {
            method: Method::PUT,
            path: "/bucket/key".into(),
            status: 503,
            request_id: next_request_id(),
            held: Duration::from_secs(1),
            was_held: true,
            replays: 0,
            resumes: Resumes::default(),
            bytes_out: 0,
            bytes_in: Box::new(|| 0),
            started: Instant::now(),
            outcome: "shutting_down",
            metrics: Arc::new(Metrics::new()),
        };
        assert_eq!(record.hold_outcome(), Some(HoldOutcome::ShuttingDown));
    }

    #[test]
    fn request_ids_are_unique() {
        assert_ne!(next_request_id(), next_request_id());
    }
}
