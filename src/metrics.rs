//! Prometheus metrics: what operators watch to see every pause, how long it
//! lasted, how many requests it held and how each of them ended.
//!
//! All metrics live in one [`Metrics`] registry served at `GET /metrics` on the
//! admin listener. Label values are bounded: methods are folded into a fixed
//! set, statuses into classes, outcomes and reasons come from closed enums.
//! Values that already live elsewhere (held now, in flight, state age,
//! backend connects) are read from their owners at scrape time.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Registry, TextEncoder, register_gauge_with_registry, register_histogram_vec_with_registry,
    register_histogram_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_vec_with_registry,
    register_int_gauge_with_registry,
};

use crate::config::Config;
use crate::gate::{DownReason, GateStatus, Phase, Transition};
use crate::outcome::{
    CheckVerdict, HoldOutcome, ProbeResult, QuarantineOutcome, ReloadResult, ReplayOutcome,
    ResumeOutcome, SettleOutcome,
};
use crate::replay_memory::ReplayMemory;

/// Buckets from milliseconds to minutes: a hold can last 5 ms or 5 minutes.
const PAUSE_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// The methods that get a label of their own; any other is `other`.
const METHODS: [&str; 6] = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"];
const _: () = assert!(METHOD_LABELS.len() == METHODS.len() + 1);

/// The status classes of `s3fp_requests_total` created at zero.
const STATUS_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// Every method label, `other` last: the index of [`method_index`].
const METHOD_LABELS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "other"];

/// Every status class label: the index of [`status_class_index`].
const CLASS_LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The series each answered request counts in, looked up in their vectors
/// once (a lookup hashes the label values under the vector's lock) and each
/// made on first use, so none appears in a scrape before it is wanted.
#[derive(Default)]
struct RequestSeries {
    requests: [[OnceLock<IntCounter>; CLASS_LABELS.len()]; METHOD_LABELS.len()],
    duration: [OnceLock<Histogram>; METHOD_LABELS.len()],
}

/// The outage reasons a single request's failure is checked for.
const CHECKED_SUSPICIONS: [DownReason; 2] = [DownReason::Reset, DownReason::HangTimeout];

/// The proxy's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    gate_state: IntGaugeVec,
    gate_state_seconds: Gauge,
    outages: IntCounterVec,
    outage_duration: Histogram,
    held_now: IntGauge,
    hold_outcomes: IntCounterVec,
    hold_duration: Histogram,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    request_series: RequestSeries,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    raw_requests: IntCounter,
    in_flight: IntGauge,
    waiting_for_backend_connection: IntGauge,
    replay_memory: IntGauge,
    replay_memory_exhausted: IntCounter,
    settle_key_rejected: IntGauge,
    replays: IntCounterVec,
    download_resumes: IntCounterVec,
    write_settles: IntCounterVec,
    probes: IntCounterVec,
    outage_checks: IntCounterVec,
    quarantine: IntCounterVec,
    backend_connects: IntCounter,
    /// The upstream's connect count already added to `backend_connects`:
    /// each scrape claims only the part above it, so concurrent scrapes
    /// never add the same connects twice.
    backend_connects_counted: AtomicU64,
    reloads: IntCounterVec,
    hold_timeout: Gauge,
    hold_max_requests: IntGauge,
    hold_fail_fast_after: Gauge,
    certificate_reloads: IntCounterVec,
    tls_handshake_failures: IntCounter,
    connections_refused: IntCounter,
    client_connections: IntGauge,
}

/// What the scrape reads from the running proxy.
pub struct Snapshot {
    pub gate: GateStatus,
    pub in_flight: usize,
    pub backend_connects: u64,
    /// Requests waiting for a slot of `backend.max_connections`.
    pub waiting_for_backend_connection: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A metric registered under a name no other metric has (a programming
/// error otherwise, caught by every test that builds a [`Metrics`]).
fn registered<T>(metric: prometheus::Result<T>) -> T {
    metric.expect("a valid, uniquely named metric")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let build_info = registered(register_int_gauge_vec_with_registry!(
            "s3fp_build_info",
            "Always 1; the version label names the running build.",
            &["version"],
            r
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Metrics {
            gate_state: registered(register_int_gauge_vec_with_registry!(
                "s3fp_gate_state",
                "1 for the gate's current state (up, down, resuming), 0 for the others.",
                &["state"],
                r
            )),
            gate_state_seconds: registered(register_gauge_with_registry!(
                "s3fp_gate_state_seconds",
                "Seconds since the gate last changed state.",
                r
            )),
            outages: registered(register_int_counter_vec_with_registry!(
                "s3fp_outages_total",
                "Times the gate went down, by reason (refused, reset, hang_timeout, probe_failed, admin_pause, discovery).",
                &["reason"],
                r
            )),
            outage_duration: registered(register_histogram_with_registry!(
                "s3fp_outage_duration_seconds",
                "Length of each outage, from the gate going down to the backend serving again.",
                PAUSE_BUCKETS.to_vec(),
                r
            )),
            held_now: registered(register_int_gauge_with_registry!(
                "s3fp_held_requests",
                "Requests held in the queue right now.",
                r
            )),
            hold_outcomes: registered(register_int_counter_vec_with_registry!(
                "s3fp_hold_outcomes_total",
                "Requests that met the hold queue, by how they ended (released, released_failed, timed_out, queue_full, fail_fast, client_gone, shutting_down).",
                &["outcome"],
                r
            )),
            hold_duration: registered(register_histogram_with_registry!(
                "s3fp_hold_duration_seconds",
                "Time each held request spent in the queue, summed over its holds.",
                PAUSE_BUCKETS.to_vec(),
                r
            )),
            requests: registered(register_int_counter_vec_with_registry!(
                "s3fp_requests_total",
                "Requests answered, by method and status class (2xx, 3xx, 4xx, 5xx).",
                &["method", "status_class"],
                r
            )),
            request_duration: registered(register_histogram_vec_with_registry!(
                "s3fp_request_duration_seconds",
                "Time from request arrival until its response ended, holds included.",
                &["method"],
                PAUSE_BUCKETS.to_vec(),
                r
            )),
            request_bytes: registered(register_int_counter_with_registry!(
                "s3fp_request_bytes_total",
                "Request body bytes read from clients.",
                r
            )),
            response_bytes: registered(register_int_counter_with_registry!(
                "s3fp_response_bytes_total",
                "Response body bytes sent to clients.",
                r
            )),
            raw_requests: registered(register_int_counter_with_registry!(
                "s3fp_raw_http1_requests_total",
                "Requests sent to the backend as the bytes that came, without hyper (listener.raw_http1).",
                r
            )),
            in_flight: registered(register_int_gauge_with_registry!(
                "s3fp_backend_in_flight_requests",
                "Requests sent to the backend whose response has not ended.",
                r
            )),
            waiting_for_backend_connection: registered(register_int_gauge_with_registry!(
                "s3fp_backend_connection_waiting_requests",
                "Requests waiting for one of backend.max_connections backend connections to come free (at most backend.queue_timeout, then 503 SlowDown).",
                r
            )),
            replay_memory: registered(register_int_gauge_with_registry!(
                "s3fp_replay_memory_bytes",
                "Request body bytes kept for replay now, by all requests together (at most hold.replay_memory).",
                r
            )),
            replay_memory_exhausted: registered(register_int_counter_with_registry!(
                "s3fp_replay_memory_exhausted_total",
                "Times a request body's bytes could not be kept for replay because hold.replay_memory was in use: that request streamed on without a copy.",
                r
            )),
            settle_key_rejected: registered(register_int_gauge_with_registry!(
                "s3fp_settle_key_rejected",
                "1 when the backend rejected the [settle] key at its last check (InvalidAccessKeyId, SignatureDoesNotMatch): ambiguous writes cannot be read back; else 0.",
                r
            )),
            replays: registered(register_int_counter_vec_with_registry!(
                "s3fp_replays_total",
                "Requests that reached a failing backend: replayed, or refused as unsafe to replay.",
                &["outcome"],
                r
            )),
            download_resumes: registered(register_int_counter_vec_with_registry!(
                "s3fp_download_resumes_total",
                "Downloads cut by a backend failure, by outcome: resumed (the rest sent on), changed (the object changed meanwhile: aborted), not_resumable (aborted: a signed Range or If-Match, no strong ETag), failed (aborted: hold timeout, mismatched answer, no resume left).",
                &["outcome"],
                r
            )),
            write_settles: registered(register_int_counter_vec_with_registry!(
                "s3fp_write_settles_total",
                "Writes whose response was lost in a backend failure, read back once the backend served, by outcome: stored (answered success), answered (the original's own answer came), absent, different, no_proof (replayed if kept, else 503), failed (the read-back got no answer).",
                &["outcome"],
                r
            )),
            probes: registered(register_int_counter_vec_with_registry!(
                "s3fp_probes_total",
                "Backend probes while the gate was not up, by result (serving, not_serving).",
                &["result"],
                r
            )),
            quarantine: registered(register_int_counter_vec_with_registry!(
                "s3fp_quarantine_total",
                "Poison requests: quarantined (in flight at two backend crashes), refused (the same request while quarantined).",
                &["outcome"],
                r
            )),
            outage_checks: registered(register_int_counter_vec_with_registry!(
                "s3fp_outage_checks_total",
                "Checks of the backend after one request failed, by what the request saw (reset, hang_timeout) and the verdict (serving: no outage, the failure stayed that request's; down: the gate went down).",
                &["suspicion", "result"],
                r
            )),
            backend_connects: registered(register_int_counter_with_registry!(
                "s3fp_backend_connections_total",
                "TCP connections opened to the backend for requests (probes not included).",
                r
            )),
            backend_connects_counted: AtomicU64::new(0),
            reloads: registered(register_int_counter_vec_with_registry!(
                "s3fp_config_reloads_total",
                "Configuration reloads, by result (success, failure).",
                &["result"],
                r
            )),
            hold_timeout: registered(register_gauge_with_registry!(
                "s3fp_hold_timeout_seconds",
                "Configured hold.timeout: the longest a request is held.",
                r
            )),
            hold_max_requests: registered(register_int_gauge_with_registry!(
                "s3fp_hold_max_requests",
                "Configured hold.max_requests: the size of the hold queue.",
                r
            )),
            hold_fail_fast_after: registered(register_gauge_with_registry!(
                "s3fp_hold_fail_fast_after_seconds",
                "Configured hold.fail_fast_after: outage length after which new requests fail at once.",
                r
            )),
            certificate_reloads: registered(register_int_counter_vec_with_registry!(
                "s3fp_tls_certificate_reloads_total",
                "Changes of the HTTPS listener's certificate files, by result (success, failure).",
                &["result"],
                r
            )),
            tls_handshake_failures: registered(register_int_counter_with_registry!(
                "s3fp_tls_handshake_failures_total",
                "Client connections dropped because the TLS handshake failed or timed out.",
                r
            )),
            client_connections: registered(register_int_gauge_with_registry!(
                "s3fp_client_connections",
                "Client connections open now (listener.max_connections at most).",
                r
            )),
            connections_refused: registered(register_int_counter_with_registry!(
                "s3fp_client_connections_refused_total",
                "Client connections refused because listener.max_connections were open.",
                r
            )),
            request_series: RequestSeries::default(),
            registry,
        };
        metrics.set_phase(Phase::Up);
        metrics.initialise_series();
        metrics
    }

    /// Creates every labelled series at zero, so rates and ratios exist (and
    /// availability reads 1) before the first failure.
    fn initialise_series(&self) {
        for reason in DownReason::ALL {
            self.outages.with_label_values(&[reason.as_str()]);
        }
        for outcome in HoldOutcome::ALL {
            self.hold_outcomes.with_label_values(&[outcome.as_str()]);
        }
        for suspicion in CHECKED_SUSPICIONS {
            for verdict in CheckVerdict::ALL {
                self.outage_checks
                    .with_label_values(&[suspicion.as_str(), verdict.as_str()]);
            }
        }
        for method in METHOD_LABELS {
            for class in STATUS_CLASSES {
                self.requests.with_label_values(&[method, class]);
            }
        }
        for outcome in ReplayOutcome::ALL {
            self.replays.with_label_values(&[outcome.as_str()]);
        }
        for outcome in ResumeOutcome::ALL {
            self.download_resumes.with_label_values(&[outcome.as_str()]);
        }
        for outcome in SettleOutcome::ALL {
            self.write_settles.with_label_values(&[outcome.as_str()]);
        }
        for result in ProbeResult::ALL {
            self.probes.with_label_values(&[result.as_str()]);
        }
        for outcome in QuarantineOutcome::ALL {
            self.quarantine.with_label_values(&[outcome.as_str()]);
        }
        for result in ReloadResult::ALL {
            self.reloads.with_label_values(&[result.as_str()]);
            self.certificate_reloads
                .with_label_values(&[result.as_str()]);
        }
    }

    fn set_phase(&self, phase: Phase) {
        for &candidate in Phase::ALL {
            self.gate_state
                .with_label_values(&[candidate.as_str()])
                .set(i64::from(candidate == phase));
        }
    }

    /// Records a gate transition (registered as a gate observer).
    pub fn transition(&self, transition: &Transition) {
        self.set_phase(transition.to);
        if let (Phase::Down, Some(reason)) = (transition.to, transition.reason) {
            self.outages.with_label_values(&[reason.as_str()]).inc();
        }
        if let (Phase::Up, Some(outage)) = (transition.to, transition.outage) {
            self.outage_duration.observe(outage.as_secs_f64());
        }
    }

    pub fn hold_outcome(&self, outcome: HoldOutcome, held: Duration) {
        self.hold_outcomes
            .with_label_values(&[outcome.as_str()])
            .inc();
        if outcome.waited() {
            self.hold_duration.observe(held.as_secs_f64());
        }
    }

    pub fn request(
        &self,
        method: &http::Method,
        status: u16,
        duration: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let method = method_index(method);
        let class = status_class_index(status);
        self.request_series.requests[method][class]
            .get_or_init(|| {
                self.requests
                    .with_label_values(&[METHOD_LABELS[method], CLASS_LABELS[class]])
            })
            .inc();
        self.request_series.duration[method]
            .get_or_init(|| {
                self.request_duration
                    .with_label_values(&[METHOD_LABELS[method]])
            })
            .observe(duration.as_secs_f64());
        self.request_bytes.inc_by(bytes_in);
        self.response_bytes.inc_by(bytes_out);
    }

    /// A request the raw path forwarded ([`crate::raw_http1`]).
    pub fn raw_request(&self) {
        self.raw_requests.inc();
    }

    /// The replay memory budget of `limit` bytes, reported in
    /// `s3fp_replay_memory_bytes` and `s3fp_replay_memory_exhausted_total`.
    pub fn replay_memory(&self, limit: usize) -> ReplayMemory {
        ReplayMemory::new(
            limit,
            self.replay_memory.clone(),
            self.replay_memory_exhausted.clone(),
        )
    }

    pub fn replay(&self, outcome: ReplayOutcome) {
        self.replays.with_label_values(&[outcome.as_str()]).inc();
    }

    /// A download cut by a backend failure ended as `outcome`.
    pub fn download_resume(&self, outcome: ResumeOutcome) {
        self.download_resumes
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Whether the backend rejected the `[settle]` key at its last check.
    pub fn settle_key_rejected(&self, rejected: bool) {
        self.settle_key_rejected.set(i64::from(rejected));
    }

    /// An ambiguous write was settled as `outcome`.
    pub fn write_settle(&self, outcome: SettleOutcome) {
        self.write_settles
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// A poison request was quarantined, or refused while quarantined.
    pub fn quarantine(&self, outcome: QuarantineOutcome) {
        self.quarantine.with_label_values(&[outcome.as_str()]).inc();
    }

    /// A single request's failure was checked with a probe.
    pub fn outage_check(&self, suspicion: DownReason, verdict: CheckVerdict) {
        self.outage_checks
            .with_label_values(&[suspicion.as_str(), verdict.as_str()])
            .inc();
    }

    pub fn probe(&self, result: ProbeResult) {
        self.probes.with_label_values(&[result.as_str()]).inc();
    }

    /// Publishes the limits alerts compare against (at start and on reload).
    pub fn config(&self, config: &Config) {
        self.hold_timeout.set(config.hold.timeout.as_secs_f64());
        self.hold_max_requests.set(config.hold.max_requests as i64);
        self.hold_fail_fast_after
            .set(config.hold.fail_fast_after.as_secs_f64());
    }

    pub fn certificate_reload(&self, result: ReloadResult) {
        self.certificate_reloads
            .with_label_values(&[result.as_str()])
            .inc();
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A client connection opened (`true`) or ended.
    pub fn client_connection(&self, opened: bool) {
        match opened {
            true => self.client_connections.inc(),
            false => self.client_connections.dec(),
        }
    }

    pub fn reload(&self, result: ReloadResult) {
        self.reloads.with_label_values(&[result.as_str()]).inc();
    }

    /// Names of every metric family this registry exports.
    pub fn names(&self) -> Vec<String> {
        self.registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect()
    }

    /// Brings `s3fp_backend_connections_total` up to `connects`, the
    /// upstream's count so far. `fetch_max` hands each scrape the count
    /// already claimed and claims up to `connects` in one atomic step, so
    /// two scrapes never add the same connects (reading the counter and then
    /// adding, two scrapes could both add the same difference). Not tested:
    /// the race lies between two adjacent instructions, and a test of it
    /// passes on the racy code too.
    fn count_backend_connects(&self, connects: u64) {
        let counted = self
            .backend_connects_counted
            .fetch_max(connects, Ordering::AcqRel);
        if connects > counted {
            self.backend_connects.inc_by(connects - counted);
        }
    }

    /// The text exposition of every metric, with scrape-time values filled in.
    pub fn encode(&self, snapshot: &Snapshot) -> Vec<u8> {
        self.set_phase(snapshot.gate.phase);
        self.gate_state_seconds
            .set(snapshot.gate.since.as_secs_f64());
        self.held_now.set(snapshot.gate.held as i64);
        self.in_flight.set(snapshot.in_flight as i64);
        self.waiting_for_backend_connection
            .set(snapshot.waiting_for_backend_connection as i64);
        self.count_backend_connects(snapshot.backend_connects);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        out
    }
}

/// Methods as a bounded label: the index in [`METHOD_LABELS`].
fn method_index(method: &http::Method) -> usize {
    METHODS
        .iter()
        .position(|known| *known == method.as_str())
        .unwrap_or(METHODS.len())
}

/// The index in [`CLASS_LABELS`].
fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(metrics: &Metrics) -> String {
        let snapshot = Snapshot {
            gate: GateStatus {
                phase: Phase::Up,
                reason: None,
                since: Duration::from_secs(3),
                held: 0,
                paused: false,
            },
            in_flight: 2,
            backend_connects: 7,
            waiting_for_backend_connection: 3,
        };
        String::from_utf8(metrics.encode(&snapshot)).unwrap()
    }

    #[test]
    fn an_outage_is_counted_by_reason_and_timed() {
        let metrics = Metrics::new();
        metrics.transition(&Transition {
            from: Phase::Up,
            to: Phase::Down,
            reason: Some(DownReason::Refused),
            outage: None,
        });
        metrics.transition(&Transition {
            from: Phase::Down,
            to: Phase::Up,
            reason: None,
            outage: Some(Duration::from_millis(1500)),
        });
        let text = scrape(&metrics);
        assert!(
            text.contains("s3fp_outages_total{reason=\"refused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("s3fp_outages_total{reason=\"reset\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("s3fp_outage_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("s3fp_outage_duration_seconds_bucket{le=\"2\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("s3fp_outage_duration_seconds_bucket{le=\"1\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn unknown_methods_fold_into_one_label() {
        let metrics = Metrics::new();
        let method = http::Method::from_bytes(b"PROPFIND").unwrap();
        metrics.request(&method, 405, Duration::from_millis(3), 0, 10);
        let text = scrape(&metrics);
        assert!(
            text.contains("s3fp_requests_total{method=\"other\",status_class=\"4xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("s3fp_backend_in_flight_requests 2"), "{text}");
        assert!(
            text.contains("s3fp_backend_connection_waiting_requests 3"),
            "{text}"
        );
        assert!(text.contains("s3fp_backend_connections_total 7"), "{text}");
    }
}
