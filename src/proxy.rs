//! The request path: hold, forward, and decide what a failure means.
//!
//! For each client request [`Proxy::handle`] loops: ask the gate for admission
//! (which may hold the request), send one attempt upstream with a hang
//! watchdog, and then either stream the response back or classify the failure:
//! a failure that sent nothing takes the gate down and holds the request again;
//! a failure after bytes reached the backend replays only an idempotent request
//! whose body is still fully kept, at most `hold.max_replays` times; anything
//! else becomes an S3 error via [`ProxyError`]. Before a write that reached
//! a failed backend is replayed or refused, it is settled ([`Proxy::settle`],
//! [`crate::write_settle`]): a hung attempt's own late answer, or a
//! read-back that proves the backend stores the client's bytes, answers the
//! client instead. A download whose body is cut
//! by a backend failure is resumed ([`crate::download_resume`]): [`Rest`]
//! holds like a request does and asks the backend for the missing bytes.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::access_log::{ProxyRequestId, RequestId, RequestRecord};
use crate::client_identity::client_key;
use crate::config::{ForwardingConfig, SettleCredentials};
use crate::connector::Connector;
use crate::delivery::{self, Delivery, Expectation};
use crate::download_resume::{
    self, Continuation, Download, NotResumable, Refetch, ResumeError, Resumes, ResumingBody,
};
use crate::drain::{InFlight, InFlightGuard};
use crate::gate::{Admission, DownReason, Gate, HeldAs, Rejection, SuspectDue, Ticket};
use crate::headers;
use crate::metrics::Metrics;
use crate::object_lane::object_lane;
use crate::outbound::{Outbound, outbound};
use crate::outcome::{
    CheckVerdict, QuarantineOutcome, ReplayOutcome, RequestOutcome, ResumeOutcome, SettleOutcome,
};
use crate::peer::Peer;
use crate::probe::Prober;
use crate::quarantine::{Fingerprint, Quarantine};
use crate::raw_backend::RawBackend;
use crate::replay::{self, AttemptBody, ReplayableBody};
use crate::replay_memory::ReplayMemory;
use crate::response::{ProxyBody, StreamFailure};
use crate::s3_error::ProxyError;
use crate::s3_operation;
use crate::signature_expiry;
use crate::upstream::{LARGE_READS_REST, PooledBody, Upstream, UpstreamError};
use crate::write_settle::{self, Declared, KeptBody, ReadBackError, Settlement, Stored, Write};

/// Request-path settings; replaced as a whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub hold_timeout: Duration,
    pub replay_buffer: usize,
    /// `hold.replay_memory`: bytes kept for replay by all requests together.
    pub replay_memory: usize,
    pub max_replays: u32,
    pub response_timeout: Duration,
    pub retry_after: Duration,
    pub forwarding: ForwardingConfig,
    /// A client silent this long mid-body gets `408`.
    pub client_body_timeout: Duration,
    /// No progress this long while the backend serves: `504`, no replay.
    pub first_byte_timeout: Duration,
    /// The same for operations known to be slow ([`s3_operation::is_slow`]).
    pub slow_first_byte_timeout: Duration,
    /// `backend.expect_continue_timeout`.
    pub expect_continue_timeout: Option<Duration>,
    /// The key ambiguous writes are read back with (`[settle]`); `None`:
    /// they are not settled.
    pub settle: Option<SettleCredentials>,
}

/// Longest the proxy reads and drops the rest of a body the backend answered
/// early (nginx's `lingering_time`).
const LINGERING_CLOSE: Duration = Duration::from_secs(30);

/// Unsent attempts retried at once on a fresh connection while the backend
/// is confirmed serving (a pooled connection the backend had just closed).
const MAX_UNSENT_RETRIES: u32 = 3;

/// How long a pooled connection may sit idle while requests wait for one
/// of `backend.max_connections` before it is closed for its slot: a
/// waiting request that can use it takes it at once.
const UNTAKEN_AFTER: Duration = Duration::from_millis(50);

type ClientBody = ReplayableBody<Incoming>;
type BackendBody = PooledBody<AttemptBody<Incoming>>;
type BackendResponse = Response<BackendBody>;
/// An attempt still waiting for its answer on its own connection.
type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<BackendResponse, UpstreamError>> + Send + 'a>>;

/// The shared state of the S3 listener.
pub struct Proxy {
    gate: Arc<Gate>,
    /// Requests that crash the backend.
    quarantine: Quarantine,
    /// Confirms a suspected outage before the gate goes down.
    prober: Arc<Prober>,
    upstream: Upstream<AttemptBody<Incoming>>,
    /// Replaced on reload; held requests watch it to pick up a new hold timeout.
    settings: watch::Sender<Arc<ProxySettings>>,
    in_flight: InFlight,
    /// What all requests' replay copies may take together.
    replay_memory: Arc<ReplayMemory>,
    metrics: Arc<Metrics>,
    /// Turned on when the shutdown grace is over: held requests get
    /// `ShuttingDown` instead of losing their connection.
    holding_ended: watch::Sender<bool>,
    /// Plain backend connections of the raw path ([`crate::raw_http1`]).
    raw_backend: RawBackend,
}

/// What the watchdog of one attempt needs.
struct Watch<'a> {
    delivery: &'a Arc<Delivery>,
    body: &'a ClientBody,
    /// The client, whose leaving ends a wait for a backend connection.
    peer: Option<&'a Peer>,
    settings: &'a ProxySettings,
    first_byte_timeout: Duration,
    /// The backend generation when the attempt began.
    generation: u64,
}

/// One failed attempt, for `after_failure`.
struct Failed<'a, 'p> {
    error: &'a UpstreamError,
    /// The attempt's answer, still awaitable (a hang).
    pending: Option<Pending<'p>>,
    generation: u64,
    idempotent: bool,
    /// The attempt was a crash suspect's, alone in the suspect lane.
    suspect: bool,
    /// The backend had the whole request, or the proxy was not waiting
    /// for the client's next bytes when the attempt failed.
    blamable: bool,
}

/// A request waiting for its answer (held, or sent and not yet answered),
/// logged when dropped before it has one: hyper drops the request when its
/// HTTP/2 stream is reset (`RST_STREAM`, RFC 9113 §6.4) or its connection
/// is cut. The line says no answer was sent (status 499) and why: the
/// client left (`client_gone`), or the shutdown grace ended and the proxy
/// closed the connection (`shutting_down`).
struct Unanswered<'a> {
    proxy: &'a Proxy,
    outbound: &'a Outbound,
    body: &'a ClientBody,
    progress: Progress,
    armed: bool,
}

impl Unanswered<'_> {
    /// The request has its answer: nothing to log on drop.
    fn answered(mut self) -> Progress {
        self.armed = false;
        self.progress
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut progress = self.progress;
        if let Some(since) = progress.waiting_since {
            progress.waited(since);
        }
        let outcome = match *self.proxy.holding_ended.borrow() {
            true => RequestOutcome::ShuttingDown,
            false => RequestOutcome::ClientGone,
        };
        // No answer was sent: logged with nginx's 499 for a request that
        // got none, the outcome saying who ended it.
        drop(self.proxy.record(
            self.outbound,
            NO_ANSWER,
            RequestId::Proxy(ProxyRequestId::next()),
            self.body.clone(),
            &progress,
            outcome,
        ));
    }
}

/// The status logged for a request that got no answer (nginx's 499).
const NO_ANSWER: u16 = 499;

/// How one request went, for its log line.
#[derive(Clone, Copy)]
struct Progress {
    started: Instant,
    held: Duration,
    was_held: bool,
    replays: u32,
    /// Attempts that failed before sending anything while the backend served.
    unsent_retries: u32,
    /// Set while the request waits in the hold queue (or for a crash's
    /// suspects): a request dropped then was held until it was dropped.
    waiting_since: Option<Instant>,
}

impl Progress {
    /// Adds a wait that began at `since` and has just ended.
    fn waited(&mut self, since: Instant) {
        self.waiting_since = None;
        self.was_held = true;
        self.held += since.elapsed();
    }
}

/// The backend's response to one attempt.
struct Answered {
    response: BackendResponse,
    /// The request body's state when the response head came.
    delivery: Arc<Delivery>,
    in_flight: InFlightGuard,
    /// The backend generation the response comes from.
    generation: u64,
    /// The request's place in the hold queue, kept for a resume.
    ticket: Ticket,
}

/// Why one attempt produced no backend response.
enum AttemptFailure<'a> {
    /// The upstream failed; what it means is decided in `after_failure`.
    /// A hung attempt keeps its connection open and its answer awaitable:
    /// a frozen backend that resumes finishes the request and answers it.
    Upstream(UpstreamError, Option<Pending<'a>>),
    /// The proxy answers at once (client too slow, backend too slow).
    Answer(ProxyError),
}

/// What follows a failed attempt that the client is not answered an error for.
enum Next {
    /// Hold (if the backend is down) and send again; with a [`SuspectDue`]
    /// when the request is a crash suspect (others wait for it).
    SendAgain(Option<SuspectDue>),
    /// The hung attempt's own answer came after all.
    Answered(BackendResponse),
    /// Read back: the backend stores the write; this is the client's answer.
    Settled(Response<Bytes>),
}

/// What [`Proxy::attempts`] ends with.
enum Reply {
    Backend(Answered),
    Settled(Response<Bytes>),
}

/// What one request's failure says about the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The backend is down (or went down since the attempt began): the
    /// request died with it.
    Outage,
    /// The backend serves: the failure is this request's alone.
    Alone,
}

impl Proxy {
    pub fn new(
        gate: Arc<Gate>,
        prober: Arc<Prober>,
        upstream: Upstream<AttemptBody<Incoming>>,
        settings: ProxySettings,
        quarantine: Quarantine,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        let upstream_lanes = upstream.lanes();
        let slots = upstream.slots();
        Proxy {
            gate,
            quarantine,
            prober,
            upstream,
            replay_memory: Arc::new(metrics.replay_memory(settings.replay_memory)),
            settings: watch::Sender::new(Arc::new(settings)),
            in_flight: InFlight::default(),
            metrics,
            holding_ended: watch::Sender::new(false),
            raw_backend: RawBackend::new(upstream_lanes, slots),
        }
    }

    /// Answers every held request, and every later one, `503
    /// ServiceUnavailable` with `Retry-After` ([`ProxyError::ShuttingDown`]):
    /// the shutdown grace is over. In-flight requests are not touched.
    pub fn stop_holding(&self) {
        self.holding_ended.send_replace(true);
    }

    /// Resolves once the shutdown grace is over ([`Proxy::stop_holding`]):
    /// a request still waiting for its answer then is cut.
    pub fn grace_over(&self) -> impl Future<Output = ()> + Send + 'static {
        crate::shutdown::reached(self.holding_ended.subscribe(), |ended| *ended)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    pub fn quarantine(&self) -> &Quarantine {
        &self.quarantine
    }

    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    pub fn upstream_connects(&self) -> u64 {
        self.upstream.connects()
    }

    pub fn settings(&self) -> Arc<ProxySettings> {
        Arc::clone(&self.settings.borrow())
    }

    /// The settings as they change (a reload replaces them).
    pub fn watch_settings(&self) -> watch::Receiver<Arc<ProxySettings>> {
        self.settings.subscribe()
    }

    /// How the backend is reached now.
    pub fn backend_connector(&self) -> Arc<Connector> {
        self.upstream.connector()
    }

    pub fn update_upstream(&self, settings: crate::upstream::UpstreamSettings) {
        self.upstream.update_settings(settings);
    }

    pub fn update_settings(&self, settings: ProxySettings) {
        self.replay_memory.set_limit(settings.replay_memory);
        self.settings.send_replace(Arc::new(settings));
    }

    /// Serves one client request.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        peer: &Peer,
        scheme: &'static str,
    ) -> Response<ProxyBody> {
        let settings = self.settings();
        let progress = Progress {
            started: Instant::now(),
            held: Duration::ZERO,
            was_held: false,
            replays: 0,
            unsent_retries: 0,
            waiting_since: None,
        };
        let (parts, body) = request.into_parts();
        let refusal = refusal(&parts, peer);
        let forwarded_for = || peer.forwarded_for();
        let outbound = outbound(
            parts,
            peer.address,
            forwarded_for,
            scheme,
            &settings.forwarding,
        );
        let body = ReplayableBody::new(
            body,
            settings.replay_buffer,
            Arc::clone(&self.replay_memory),
        );
        if settings.settle.is_some() && write_settle::is_aws_chunked(&outbound.headers) {
            // Its trailer may prove a write the proxy did not keep.
            body.keep_tail();
        }
        if let Some(refusal) = refusal {
            return self.answer(refusal, &outbound, &body, &progress, &settings);
        }
        if self.quarantine.watches_any() && self.quarantine.is_quarantined(outbound.fingerprint()) {
            self.metrics.quarantine(QuarantineOutcome::Refused);
            tracing::warn!(fingerprint = %outbound.fingerprint(), "refused: the request is quarantined");
            return self.answer(ProxyError::Poison, &outbound, &body, &progress, &settings);
        }
        self.forward(outbound, body, peer, &settings, progress)
            .await
    }

    async fn forward(
        self: &Arc<Self>,
        outbound: Outbound,
        body: ClientBody,
        peer: &Peer,
        settings: &ProxySettings,
        progress: Progress,
    ) -> Response<ProxyBody> {
        let mut unanswered = Unanswered {
            proxy: self,
            outbound: &outbound,
            body: &body,
            progress,
            armed: true,
        };
        let attempts = self
            .attempts(&outbound, &body, peer, settings, &mut unanswered.progress)
            .await;
        let progress = unanswered.answered();
        match attempts {
            Ok(Reply::Backend(answered)) => {
                self.stream(answered, outbound, body, peer.address, progress)
            }
            Ok(Reply::Settled(response)) => self.settled(response, &outbound, &body, &progress),
            Err(error) => self.answer(error, &outbound, &body, &progress, settings),
        }
    }

    /// Holds and sends until the backend answers or the request must fail.
    async fn attempts(
        &self,
        outbound: &Outbound,
        body: &ClientBody,
        peer: &Peer,
        settings: &ProxySettings,
        progress: &mut Progress,
    ) -> Result<Reply, ProxyError> {
        let ticket = self.gate.ticket();
        let idempotent = replay::is_idempotent(&outbound.method, &outbound.headers);
        let first_byte_timeout =
            if s3_operation::is_slow(&outbound.method, &outbound.uri, &outbound.headers) {
                settings.slow_first_byte_timeout
            } else {
                settings.first_byte_timeout
            };
        // Set while this request is a suspect the proxy is to send again.
        let mut replay_due: Option<SuspectDue> = None;
        loop {
            let mut admission = self.admit_counted(ticket, outbound, peer, progress).await?;
            // A suspect of a crash goes alone, so a second crash names it.
            let suspect =
                self.quarantine.watches_any() && self.quarantine.is_suspect(outbound.fingerprint());
            let deadline = progress.started + settings.hold_timeout;
            let _lane = match suspect {
                true => match self.quarantine.try_enter_lane() {
                    Some(lane) => Some(lane),
                    None => {
                        let lane = self.quarantine.enter_lane(deadline);
                        Some(Box::pin(self.held_for(lane, outbound, peer, progress)).await?)
                    }
                },
                false if replay_due.is_none() && self.gate.suspects_due() => {
                    let replayed = self.gate.suspects_sent(deadline);
                    Box::pin(self.held_for(replayed, outbound, peer, progress)).await?;
                    None
                }
                false => None,
            };
            let delivery = Arc::new(
                Delivery::for_request(outbound.version, &outbound.headers)
                    .with_continue_timeout(settings.expect_continue_timeout),
            );
            let attempt = body
                .attempt(Arc::clone(&delivery))
                .map_err(|_| ProxyError::NotReplayable)?;
            let generation = self.gate.generation();
            let in_flight = self.in_flight.enter();
            let watch = Watch {
                delivery: &delivery,
                body,
                peer: Some(peer),
                settings,
                first_byte_timeout,
                generation,
            };
            let send = self.send(outbound.request(attempt), &delivery);
            let result = self.send_watched(send, watch).await;
            admission.settle();
            match result {
                Ok(response) => {
                    body.commit();
                    self.gate.backend_answered();
                    if suspect {
                        self.quarantine.answered(outbound.fingerprint());
                    }
                    return Ok(Reply::Backend(Answered {
                        response,
                        delivery: Arc::clone(&delivery),
                        in_flight,
                        generation,
                        ticket,
                    }));
                }
                Err(AttemptFailure::Answer(error)) => return Err(error),
                Err(AttemptFailure::Upstream(error, pending)) => {
                    drop(in_flight);
                    let failed = Failed {
                        error: &error,
                        pending,
                        generation,
                        idempotent,
                        suspect,
                        // Waiting on the client's next bytes, the backend
                        // was not working on this request when it died.
                        blamable: delivery.complete() || !body.stall().on_client,
                    };
                    let holder = Holder { ticket, peer };
                    // The previous due (if any) ends once this is decided.
                    replay_due = match Box::pin(
                        self.after_failure(failed, holder, outbound, body, settings, progress),
                    )
                    .await?
                    {
                        Next::SendAgain(due) => due,
                        Next::Settled(response) => return Ok(Reply::Settled(response)),
                        Next::Answered(response) => {
                            self.gate.backend_answered();
                            return Ok(Reply::Backend(Answered {
                                response,
                                delivery: Arc::clone(&delivery),
                                in_flight: self.in_flight.enter(),
                                generation: self.gate.generation(),
                                ticket,
                            }));
                        }
                    };
                }
            }
        }
    }

    /// Waits for the crash suspects before a request is sent: the suspect
    /// lane (suspects go one at a time), or until the suspects of the last
    /// crash were sent again (everyone else waits for them, as the gate
    /// says). `None` from
    /// `wait` is the hold deadline; the client leaving or the shutdown grace
    /// ending cut the wait short too. The wait counts as held time.
    async fn held_for<T>(
        &self,
        wait: impl Future<Output = Option<T>>,
        outbound: &Outbound,
        peer: &Peer,
        progress: &mut Progress,
    ) -> Result<T, ProxyError> {
        let since = Instant::now();
        progress.waiting_since = Some(since);
        let mut holding_ended = self.holding_ended.subscribe();
        let waited = tokio::select! {
            biased;
            _ = holding_ended.wait_for(|ended| *ended) => Err(ProxyError::ShuttingDown),
            waited = wait => waited.ok_or(ProxyError::Held(Rejection::HoldTimeout)),
            expired = signature_ends(outbound) => Err(expired),
            () = peer.gone() => Err(ProxyError::ClientGone),
        };
        progress.waited(since);
        waited
    }

    /// Decides what a failed attempt means: `Ok` to hold (if the backend is
    /// down) and send again, or with the answer a settled write gets (see
    /// [`Proxy::settle`]), or `Err` with the error the client gets.
    async fn after_failure<'p>(
        &self,
        failed: Failed<'_, 'p>,
        holder: Holder<'_>,
        outbound: &Outbound,
        body: &ClientBody,
        settings: &ProxySettings,
        progress: &mut Progress,
    ) -> Result<Next, ProxyError> {
        let Failed {
            error,
            pending,
            generation,
            idempotent,
            suspect,
            blamable,
        } = failed;
        if body.client_failed() {
            return Err(ProxyError::ClientBody);
        }
        if let UpstreamError::NoSlot(_) = error {
            return Err(ProxyError::BackendBusy);
        }
        let Some(suspicion) = error.down_reason() else {
            // An invalid response says nothing about availability.
            return Err(ProxyError::BadGateway);
        };
        let verdict = self.judge(suspicion, error.is_connect(), generation).await;
        if error.reached_backend() {
            tracing::warn!(method = %outbound.method, path = outbound.uri.path(), %error, ?verdict, bytes_in = body.bytes_in(), can_replay = body.can_replay(), "backend failed after the request reached it");
        } else {
            // Every held request passes here during an outage: keep it quiet.
            tracing::debug!(method = %outbound.method, path = outbound.uri.path(), %error, ?verdict, "backend unreachable");
        }
        let died_with_it = error.reached_backend() && verdict == Verdict::Outage;
        if died_with_it {
            // The backend died with this request in flight. A crash while a
            // slow upload waits for its client is not the upload's doing.
            let fingerprint = outbound.fingerprint();
            if self.quarantine.died_with(fingerprint, suspect && blamable) {
                self.metrics.quarantine(QuarantineOutcome::Quarantined);
                tracing::error!(%fingerprint, "the backend died twice with this request in flight: quarantined, not sent again");
                return Err(ProxyError::Poison);
            }
        }
        if !error.reached_backend() {
            if verdict == Verdict::Alone {
                progress.unsent_retries += 1;
                if progress.unsent_retries > MAX_UNSENT_RETRIES {
                    return Err(ProxyError::BadGateway);
                }
            }
            return Ok(Next::SendAgain(None));
        }
        if let Some(credentials) = &settings.settle
            && let Some(write) = Write::of(&outbound.method, &outbound.uri, &outbound.headers)
        {
            let ask = ReadBack {
                credentials,
                write,
                outbound,
                body,
                arrived: std::time::SystemTime::now() - progress.started.elapsed(),
            };
            if let Some(next) = self
                .settle(ask, pending, holder, settings, progress)
                .await?
            {
                return Ok(next);
            }
        }
        if idempotent && body.can_replay() && progress.replays < settings.max_replays {
            progress.replays += 1;
            self.metrics.replay(ReplayOutcome::Replayed);
            return Ok(Next::SendAgain(
                died_with_it.then(|| self.gate.suspect_due()),
            ));
        }
        self.metrics.replay(ReplayOutcome::RefusedUnsafe);
        Err(match verdict {
            Verdict::Outage => ProxyError::NotReplayable,
            Verdict::Alone => ProxyError::BadGateway,
        })
    }

    /// Settles a write whose answer was lost, before any replay. A hung
    /// attempt's own answer is awaited first while its connection stays
    /// open (a frozen backend that resumes finishes the write and answers
    /// it: the answer is the truth, and no read-back can race it). Then the
    /// request holds until the backend serves and the write is read back
    /// ([`crate::write_settle`]). `Ok(Some)` answers the client; `Ok(None)`
    /// leaves it to the replay rule. The time spent counts against the
    /// request's `hold.timeout`.
    async fn settle<'p>(
        &self,
        ask: ReadBack<'_>,
        pending: Option<Pending<'p>>,
        holder: Holder<'_>,
        settings: &ProxySettings,
        progress: &mut Progress,
    ) -> Result<Option<Next>, ProxyError> {
        let deadline = progress.started + settings.hold_timeout;
        if let Some(pending) = pending {
            let original = async { tokio::time::timeout_at(deadline, pending).await.ok() };
            let ended = self
                .held_for(original, ask.outbound, holder.peer, progress)
                .await;
            match ended {
                Ok(Ok(response)) => {
                    self.metrics.write_settle(SettleOutcome::Answered);
                    tracing::info!(
                        status = response.status().as_u16(),
                        "the hung write was answered once the backend resumed"
                    );
                    return Ok(Some(Next::Answered(response)));
                }
                Ok(Err(error)) => {
                    tracing::info!(%error, "the hung write's connection ended without an answer");
                }
                Err(error) => {
                    self.metrics.write_settle(SettleOutcome::Failed);
                    return Err(error);
                }
            }
        }
        let mut admission = self
            .admit_counted(holder.ticket, ask.outbound, holder.peer, progress)
            .await
            .inspect_err(|_| self.metrics.write_settle(SettleOutcome::Failed))?;
        let connector = self.upstream.connector();
        let read = tokio::time::timeout_at(deadline, ask.settle(&connector)).await;
        admission.settle();
        let verdict = match read {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(error)) => {
                tracing::warn!(%error, "the write could not be read back");
                self.metrics.write_settle(SettleOutcome::Failed);
                return Ok(None);
            }
            Err(_) => {
                self.metrics.write_settle(SettleOutcome::Failed);
                return Err(ProxyError::Held(Rejection::HoldTimeout));
            }
        };
        self.metrics.write_settle(verdict.outcome());
        tracing::info!(outcome = verdict.outcome().as_str(), method = %ask.outbound.method, path = ask.outbound.uri.path(), "a write whose answer was lost was read back");
        Ok(ask.answer(verdict).map(Next::Settled))
    }

    /// Whether one request's failure is an outage. A failed connect is, by
    /// itself (a crash is seen at once). Anything else only when the backend,
    /// asked at once on a fresh connection, does not serve; then the gate goes
    /// down. A failure on a connection of an earlier backend generation (the
    /// gate went down since the attempt began) belongs to that outage and
    /// never takes the serving backend down.
    async fn judge(&self, suspicion: DownReason, conclusive: bool, generation: u64) -> Verdict {
        if self.gate.generation() != generation {
            return Verdict::Outage;
        }
        if !conclusive {
            let serving = self.prober.confirm(Instant::now()).await;
            self.metrics
                .outage_check(suspicion, CheckVerdict::of(serving));
            if serving {
                tracing::info!(
                    suspicion = suspicion.as_str(),
                    "one request failed but the backend serves: no outage"
                );
                return Verdict::Alone;
            }
        }
        self.go_down(suspicion, generation);
        Verdict::Outage
    }

    /// Reports a backend that failed while its response streamed, as a
    /// suspected outage to confirm in the background; a cut download that
    /// could not be resumed is counted, with why in the log.
    fn stream_failure(
        self: &Arc<Self>,
        generation: u64,
        not_resumable: NotResumable,
    ) -> StreamFailure {
        let proxy = Arc::clone(self);
        Box::new(move || {
            if not_resumable.is_download() {
                tracing::warn!(reason = %not_resumable, "the cut download cannot be resumed");
                proxy.metrics.download_resume(ResumeOutcome::NotResumable);
            }
            tokio::spawn(async move {
                proxy.judge(DownReason::Reset, false, generation).await;
            });
        })
    }

    /// A raw-path answer body broke ([`crate::raw_http1`]): judged as a
    /// streamed body that breaks on the hyper path is.
    pub(crate) fn body_broke(self: &Arc<Self>, generation: u64) {
        let proxy = Arc::clone(self);
        tokio::spawn(async move {
            proxy.judge(DownReason::Reset, false, generation).await;
        });
    }

    /// Whether the backend serves, asked when a raw-path answer is late
    /// (as `send_watched` asks): counted as a hang check, and the gate goes
    /// down when it does not serve.
    pub(crate) async fn late_answer_serving(&self, now: Instant, generation: u64) -> bool {
        let serving = Box::pin(self.prober.confirm(now)).await;
        self.metrics
            .outage_check(DownReason::HangTimeout, CheckVerdict::of(serving));
        if !serving {
            self.go_down(DownReason::HangTimeout, generation);
        }
        serving
    }

    /// Confirms the cut of a raw-path download before it is resumed (as
    /// `fetch_rest` does).
    pub(crate) async fn judge_cut(&self, generation: u64) {
        self.judge(DownReason::Reset, false, generation).await;
    }

    /// A raw-path request cut after it reached the backend (sent in
    /// backend generation `generation`), before any answer: judged as the
    /// hyper path judges such a failure, and on an outage its fingerprint
    /// becomes a suspect, so that the hyper path, which sends it again,
    /// sends it through the suspect lane (a request that crashes the
    /// backend crashes it at most twice, [`crate::quarantine`]).
    /// Returns whether it was an outage.
    pub(crate) async fn raw_request_cut(&self, fingerprint: &Fingerprint, generation: u64) -> bool {
        let outage = self.judge(DownReason::Reset, false, generation).await == Verdict::Outage;
        if outage {
            self.quarantine.died_with(fingerprint, false);
        }
        outage
    }

    /// The raw path's backend connections.
    pub(crate) fn raw_backend(&self) -> &RawBackend {
        &self.raw_backend
    }

    /// The backend connection settings now.
    pub(crate) fn upstream_settings(&self) -> Arc<crate::upstream::UpstreamSettings> {
        self.upstream.settings()
    }

    /// Closes idle backend connections past `backend.idle_timeout`, checking
    /// twice per timeout (a reloaded timeout applies from the next check),
    /// and frees the large read buffers of those that rested
    /// [`LARGE_READS_REST`] (checking twice per rest). Runs until aborted.
    pub async fn close_idle_backend_connections(self: Arc<Self>) {
        loop {
            let every = (self.upstream.idle_timeout() / 2)
                .min(LARGE_READS_REST / 2)
                .max(Duration::from_millis(100));
            // A request waiting for a slot of `backend.max_connections`
            // gets the idle connections' slots at once.
            let slots = self.upstream.slots();
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = slots.wanted_soon() => {}
            }
            // hyper's idle connections are handed to the waiting requests
            // that can use them; the raw path's, which hyper cannot use,
            // give their slots, and so do hyper's left idle a while (the
            // waiting are then raw-path resumes, which cannot use them).
            let waiting = slots.waiting();
            if waiting > 0 {
                let shed = self.raw_backend.shed_idle(waiting);
                self.upstream.shed_idle(waiting - shed, UNTAKEN_AFTER);
            }
            self.upstream.close_expired();
            self.raw_backend.close_expired(self.upstream.idle_timeout());
            self.upstream.free_rested_large_reads(LARGE_READS_REST);
        }
    }

    /// Takes the gate down for `reason`, unless it already went down since
    /// `generation`; the idle connections went down with the backend.
    fn go_down(&self, reason: DownReason, generation: u64) {
        if self.gate.mark_down(reason, generation) {
            self.upstream.clear_idle();
        }
    }

    /// Admission, abandoned as soon as the client leaves or the shutdown
    /// grace ends.
    /// A reload that changes `hold.timeout` applies to requests already held:
    /// they are queued again, at the same place, with the new deadline.
    async fn admit(
        &self,
        ticket: Ticket,
        outbound: &Outbound,
        started: Instant,
        peer: &Peer,
    ) -> Result<Admission, ProxyError> {
        // The common case, as the wait below would decide it at once (its
        // first two branches), without building the wait.
        if !*self.holding_ended.borrow()
            && let Some(admission) = self.gate.admit_at_once()
        {
            return Ok(admission);
        }
        Box::pin(self.admit_held(ticket, outbound, started, peer)).await
    }

    /// [`Proxy::admit`], with the time it waits in the queue added to the
    /// request's time held, whether it ends admitted or turned away, or the
    /// request is dropped while it waits (`Progress::waiting_since`).
    async fn admit_counted(
        &self,
        ticket: Ticket,
        outbound: &Outbound,
        peer: &Peer,
        progress: &mut Progress,
    ) -> Result<Admission, ProxyError> {
        let queued_at = Instant::now();
        progress.waiting_since = Some(queued_at);
        let admitted = self.admit(ticket, outbound, progress.started, peer).await;
        progress.waiting_since = None;
        if let Err(ProxyError::Held(_) | ProxyError::ClientGone | ProxyError::ShuttingDown) =
            admitted
        {
            progress.waited(queued_at);
        }
        let admission = admitted?;
        progress.held += admission.held_for;
        progress.was_held |= admission.was_held();
        Ok(admission)
    }

    /// [`Proxy::admit`] for a request that may be held.
    async fn admit_held(
        &self,
        ticket: Ticket,
        outbound: &Outbound,
        started: Instant,
        peer: &Peer,
    ) -> Result<Admission, ProxyError> {
        let held_as = || held_as(outbound, peer.address.ip());
        let mut reloads = self.settings.subscribe();
        let mut holding_ended = self.holding_ended.subscribe();
        loop {
            let deadline = started + reloads.borrow_and_update().hold_timeout;
            tokio::select! {
                biased;
                _ = holding_ended.wait_for(|ended| *ended) => return Err(ProxyError::ShuttingDown),
                admitted = self.gate.admit_from(ticket, held_as, deadline) => return admitted.map_err(ProxyError::Held),
                // Polled only once the request is queued: a request admitted
                // at once never has its signature read.
                expired = signature_ends(outbound) => return Err(expired),
                () = peer.gone() => return Err(ProxyError::ClientGone),
                _ = reloads.changed() => continue,
            }
        }
    }

    /// One attempt's sending, boxed: the request is not kept in the future
    /// of the attempt that waits for it.
    fn send<'a>(
        &'a self,
        request: Request<AttemptBody<Incoming>>,
        delivery: &'a Arc<Delivery>,
    ) -> Pending<'a> {
        Box::pin(self.upstream.send(request, delivery))
    }

    /// Sends one attempt and watches it. Time the request spends waiting for
    /// the client is the client's: silent for `client_body_timeout` mid-body,
    /// it gets `408`. Time spent waiting for the backend (to accept body bytes,
    /// or to answer) is checked every `response_timeout` without progress: a
    /// backend the probe finds serving is slow, not dead, and the request
    /// keeps waiting up to its first-byte timeout (then `504`, nothing
    /// replayed: the backend may still be executing it); a backend that does
    /// not serve takes the gate down (`Hang`). Time spent waiting for one of
    /// `backend.max_connections` is neither's: the backend's time counts
    /// from when the wait ended, and a client that leaves meanwhile ends the
    /// attempt (nothing was sent).
    async fn send_watched<'a>(
        &'a self,
        mut send: Pending<'a>,
        watch: Watch<'a>,
    ) -> Result<BackendResponse, AttemptFailure<'a>> {
        let settings = watch.settings;
        // When the backend was last confirmed serving during this attempt.
        let mut confirmed_at = Instant::now();
        loop {
            let stall = watch.body.stall();
            let waiting = watch.delivery.is_waiting_for_connection();
            let connected = watch.delivery.connection_at();
            let since_connected = connected.unwrap_or(stall.since);
            let checkpoint = stall.since.max(confirmed_at).max(since_connected);
            let backend_since = watch
                .delivery
                .completed_at()
                .unwrap_or(stall.since)
                .max(since_connected);
            let ceiling = backend_since.max(stall.since) + watch.first_byte_timeout;
            let deadline = if stall.on_client {
                stall.since + settings.client_body_timeout
            } else {
                (checkpoint + settings.response_timeout).min(ceiling)
            };
            // Awake at least every client_body_timeout: the stall may move to
            // the client meanwhile, and its timeout must not wait for this one.
            let wake = deadline.min(Instant::now() + settings.client_body_timeout);
            tokio::select! {
                result = &mut send => return result.map_err(|e| AttemptFailure::Upstream(e, None)),
                () = tokio::time::sleep_until(wake) => {}
                () = watch.delivery.connection_wait_began(), if !waiting => {}
                () = client_gone(watch.peer), if waiting => {
                    return Err(AttemptFailure::Answer(ProxyError::ClientGone));
                }
            }
            let now = Instant::now();
            if watch.delivery.is_waiting_for_connection() {
                // Bounded by `backend.queue_timeout`, not by these.
                confirmed_at = now;
                continue;
            }
            if watch.body.stall() != stall
                || watch.delivery.connection_at() != connected
                || now < deadline
            {
                continue;
            }
            if stall.on_client {
                return Err(AttemptFailure::Answer(ProxyError::ClientTimeout));
            }
            if now >= ceiling {
                tracing::warn!(timeout = ?watch.first_byte_timeout, "the backend serves but did not answer in time");
                return Err(AttemptFailure::Answer(ProxyError::SlowBackend));
            }
            let serving = tokio::select! {
                result = &mut send => return result.map_err(|e| AttemptFailure::Upstream(e, None)),
                serving = Box::pin(self.prober.confirm(now)) => serving,
            };
            self.metrics
                .outage_check(DownReason::HangTimeout, CheckVerdict::of(serving));
            if !serving {
                self.go_down(DownReason::HangTimeout, watch.generation);
                let hang = UpstreamError::Hang(settings.response_timeout);
                return Err(AttemptFailure::Upstream(hang, Some(send)));
            }
            tracing::info!(waited = ?now - stall.since, "no answer yet but the backend serves: slow, not dead");
            confirmed_at = Instant::now();
        }
    }

    fn stream(
        self: &Arc<Self>,
        answered: Answered,
        outbound: Outbound,
        body: ClientBody,
        client: SocketAddr,
        progress: Progress,
    ) -> Response<ProxyBody> {
        let Answered {
            response,
            delivery,
            in_flight,
            generation,
            ticket,
        } = answered;
        // An answer before the body ended: once it is sent, read what the
        // client still sends and drop it, so the client can read the answer.
        // A withheld body was never asked for: the client sends nothing.
        let linger = !delivery.complete() && !delivery.is_withheld();
        let rest = body.clone();
        let (mut parts, backend_body) = response.into_parts();
        headers::drop_overridden_content_length(&mut parts.headers);
        headers::keep_one_content_length(&mut parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers);
        let request_id = response_request_id(&parts.headers);
        let record = self.record(
            &outbound,
            parts.status.as_u16(),
            request_id,
            body.clone(),
            &progress,
            RequestOutcome::Ok,
        );
        let plan = download_resume::plan(
            &outbound.method,
            &outbound.uri,
            &outbound.headers,
            parts.status,
            &parts.headers,
        );
        let mut proxied = match plan {
            Ok(download) => {
                let resend = Resend {
                    outbound,
                    body,
                    client,
                    ticket,
                    generation: AtomicU64::new(generation),
                    held_before: progress.held,
                    resumes: record.resumes.clone(),
                    download,
                };
                self.resumable(backend_body, resend, in_flight, record)
            }
            Err(not_resumable) => {
                let on_failure = self.stream_failure(generation, not_resumable);
                ProxyBody::streamed(backend_body, on_failure, in_flight, record)
            }
        };
        if linger {
            proxied = proxied.after_response(move || {
                tokio::spawn(rest.discard_rest(LINGERING_CLOSE));
            });
        }
        Response::from_parts(parts, proxied)
    }

    /// A download's body that resumes when cut, at most `hold.max_replays`
    /// times; an error reaching the client is one it could not resume.
    fn resumable(
        self: &Arc<Self>,
        backend_body: BackendBody,
        resend: Resend,
        in_flight: InFlightGuard,
        record: RequestRecord,
    ) -> ProxyBody {
        let download = resend.download.clone();
        let resumes = resend.resumes.clone();
        let rest = Rest {
            proxy: Arc::clone(self),
            resend: Arc::new(resend),
        };
        let max_resumes = self.settings().max_replays;
        let resuming = ResumingBody::new(backend_body, download, max_resumes, rest, resumes);
        ProxyBody::streamed(resuming, Box::new(|| {}), in_flight, record)
    }

    /// Asks the backend for the rest of a cut download: confirms the cut
    /// (the gate goes down if the backend does not serve), holds until the
    /// backend serves within what is left of the request's `hold.timeout`,
    /// sends the request with the continuation's `Range` and `If-Match`, and
    /// checks the answer. A failure before an answer is tried again, at most
    /// [`MAX_UNSENT_RETRIES`] times.
    async fn fetch_rest(
        &self,
        resend: &Resend,
        continuation: Continuation,
    ) -> Result<BackendBody, ResumeError> {
        let cut = resend.generation.load(Ordering::Acquire);
        self.judge(DownReason::Reset, false, cut).await;
        let mut tries = 0;
        loop {
            let settings = self.settings();
            let mut admission = self.admit_rest(resend, &settings).await?;
            let delivery = Arc::new(Delivery::for_request(
                resend.outbound.version,
                &resend.outbound.headers,
            ));
            let attempt = resend
                .body
                .attempt(Arc::clone(&delivery))
                .map_err(|error| ResumeError::Failed(error.into()))?;
            let mut request = resend.outbound.request(attempt);
            continuation.apply(request.headers_mut());
            let generation = self.gate.generation();
            let watch = Watch {
                delivery: &delivery,
                body: &resend.body,
                peer: None,
                settings: &settings,
                first_byte_timeout: settings.first_byte_timeout,
                generation,
            };
            let send = self.send(request, &delivery);
            let result = self.send_watched(send, watch).await;
            admission.settle();
            let error = match result {
                Ok(response) => {
                    self.gate.backend_answered();
                    resend.generation.store(generation, Ordering::Release);
                    let (parts, body) = response.into_parts();
                    resend
                        .download
                        .check(&continuation, parts.status, &parts.headers)?;
                    return Ok(body);
                }
                Err(AttemptFailure::Answer(error)) => {
                    return Err(ResumeError::Failed(error.into()));
                }
                Err(AttemptFailure::Upstream(error, _)) => error,
            };
            tries += 1;
            if tries > MAX_UNSENT_RETRIES || error.down_reason().is_none() {
                return Err(ResumeError::Failed(error.into()));
            }
            let suspicion = error.down_reason().unwrap_or(DownReason::Reset);
            self.judge(suspicion, error.is_connect(), generation).await;
        }
    }

    /// Admission for a resume: held like a request, with what is left of
    /// the request's `hold.timeout`, behind the replays of a crash's
    /// suspects; the time held is added to the request's.
    async fn admit_rest(
        &self,
        resend: &Resend,
        settings: &ProxySettings,
    ) -> Result<Admission, ResumeError> {
        let used = resend.held_before + resend.resumes.held();
        let since = Instant::now();
        let deadline = since + settings.hold_timeout.saturating_sub(used);
        // Counted however the wait ends: the body may be dropped while it
        // waits (the client left), and the request line still logs it.
        let _held = HeldWhileResuming {
            resumes: &resend.resumes,
            since,
        };
        let outbound = &resend.outbound;
        let held_as = || held_as(outbound, resend.client.ip());
        let mut holding_ended = self.holding_ended.subscribe();
        let admitted = tokio::select! {
            biased;
            _ = holding_ended.wait_for(|ended| *ended) => Err(ProxyError::ShuttingDown),
            admitted = async {
                if self.gate.suspects_due() {
                    self.gate.suspects_sent(deadline).await.ok_or(Rejection::HoldTimeout)?;
                }
                self.gate.admit_from(resend.ticket, held_as, deadline).await
            } => admitted.map_err(ProxyError::Held),
        };
        admitted.map_err(|error| ResumeError::Failed(error.into()))
    }

    fn record(
        &self,
        outbound: &Outbound,
        status: u16,
        request_id: RequestId,
        body: ClientBody,
        progress: &Progress,
        outcome: RequestOutcome,
    ) -> RequestRecord {
        RequestRecord {
            method: outbound.method.clone(),
            uri: outbound.uri.clone(),
            status,
            request_id,
            held: progress.held,
            was_held: progress.was_held,
            replays: progress.replays,
            resumes: Resumes::default(),
            bytes_out: 0,
            body,
            started: progress.started,
            outcome,
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// The answer of a write settled by reading it back.
    fn settled(
        &self,
        response: Response<Bytes>,
        outbound: &Outbound,
        body: &ClientBody,
        progress: &Progress,
    ) -> Response<ProxyBody> {
        let request_id = response_request_id(response.headers());
        let record = self.record(
            outbound,
            response.status().as_u16(),
            request_id,
            body.clone(),
            progress,
            RequestOutcome::Settled,
        );
        response.map(|bytes| ProxyBody::full(bytes, record))
    }

    fn answer(
        &self,
        error: ProxyError,
        outbound: &Outbound,
        body: &ClientBody,
        progress: &Progress,
        settings: &ProxySettings,
    ) -> Response<ProxyBody> {
        let request_id = ProxyRequestId::next();
        let response = error.to_response(
            &outbound.method,
            outbound.uri.path(),
            &request_id.to_string(),
            settings.retry_after,
        );
        let status = response.status().as_u16();
        let record = self.record(
            outbound,
            status,
            RequestId::Proxy(request_id),
            body.clone(),
            progress,
            error.outcome(),
        );
        response.map(|bytes: Bytes| ProxyBody::full(bytes, record))
    }
}

/// What holding a request for a settle needs: its place in the queue and
/// its client.
struct Holder<'a> {
    ticket: Ticket,
    peer: &'a Peer,
}

/// One ambiguous write to read back.
struct ReadBack<'a> {
    credentials: &'a SettleCredentials,
    write: Write,
    outbound: &'a Outbound,
    body: &'a ClientBody,
    /// When the write reached the proxy (wall clock).
    arrived: std::time::SystemTime,
}

impl ReadBack<'_> {
    /// The `Host` the client addressed (virtual-hosted buckets live in it).
    fn host(&self, connector: &Connector) -> String {
        self.outbound
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| connector.address().to_string(), str::to_owned)
    }

    /// What the kept body proves (its MD5, its `aws-chunked` trailer).
    fn kept(&self) -> Option<KeptBody> {
        let frames = self.body.kept_whole()?;
        KeptBody::of(
            &frames,
            write_settle::is_aws_chunked(&self.outbound.headers),
        )
    }

    /// What the client declared, the trailer of a kept body included.
    fn declared(&self) -> Declared {
        let declared = Declared::of(&self.outbound.headers);
        match declared.checksum.is_some() || !write_settle::is_aws_chunked(&self.outbound.headers) {
            true => declared,
            false => declared.with_trailer(
                self.kept()
                    .and_then(|kept| kept.trailer)
                    .or_else(|| write_settle::trailer_in_tail(&self.body.tail()?)),
            ),
        }
    }

    /// Reads the write back and judges it.
    async fn settle(&self, connector: &Connector) -> Result<Settlement, ReadBackError> {
        let host = self.host(connector);
        let path = self.outbound.uri.path();
        let target = self.write.read_back(path);
        match &self.write {
            Write::PutObject => {
                let Some(stored) = self.head_written(connector, &host, &target).await? else {
                    return Ok(Settlement::Absent);
                };
                Ok(write_settle::compare(
                    &self.declared(),
                    || self.kept(),
                    stored,
                ))
            }
            Write::CopyObject { source } => {
                let Some(copy) = self.head_written(connector, &host, &target).await? else {
                    return Ok(Settlement::Absent);
                };
                // The source is named path-style (`bucket/key`): asked for
                // by the backend's own address, never a virtual host.
                let backend = connector.address().to_string();
                Ok(
                    match self
                        .head(connector, &backend, &source.path_and_query)
                        .await?
                    {
                        Some(original) => write_settle::compare_copy(source, &original, copy),
                        None => Settlement::NoProof,
                    },
                )
            }
            Write::UploadPart { part_number, .. } => {
                let answer = self
                    .credentials
                    .ask(connector, Method::GET, &host, &target)
                    .await?;
                match answer.status {
                    StatusCode::OK => {}
                    StatusCode::NOT_FOUND => return Ok(Settlement::Absent),
                    status => return Err(ReadBackError::Status(status)),
                }
                let xml = std::str::from_utf8(&answer.body).map_err(|_| ReadBackError::Body)?;
                Ok(match Stored::of_part(xml, *part_number, &answer.headers) {
                    Some(stored) => write_settle::compare(&self.declared(), || self.kept(), stored),
                    None => Settlement::Absent,
                })
            }
            Write::CompleteMultipartUpload { .. } => {
                self.settle_complete(connector, &host, &target).await
            }
        }
    }

    /// HeadObject of `target`: what is stored there, `None` when nothing is.
    async fn head(
        &self,
        connector: &Connector,
        host: &str,
        target: &str,
    ) -> Result<Option<Stored>, ReadBackError> {
        let answer = self
            .credentials
            .ask(connector, Method::HEAD, host, target)
            .await?;
        match answer.status {
            StatusCode::OK => Ok(Some(
                Stored::of_head(&answer.headers).ok_or(ReadBackError::Body)?,
            )),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(ReadBackError::Status(status)),
        }
    }

    /// The object at `target` if this write may have stored it: `None`
    /// when nothing is there or what is there predates the write.
    async fn head_written(
        &self,
        connector: &Connector,
        host: &str,
        target: &str,
    ) -> Result<Option<Stored>, ReadBackError> {
        let stored = self.head(connector, host, target).await?;
        Ok(stored.filter(|stored| !stored.predates(self.arrived)))
    }

    /// A Complete is done when its upload is gone (or holds no part) and
    /// the object carries the multipart ETag of the parts the client listed.
    async fn settle_complete(
        &self,
        connector: &Connector,
        host: &str,
        list_parts: &str,
    ) -> Result<Settlement, ReadBackError> {
        let upload = self
            .credentials
            .ask(connector, Method::GET, host, list_parts)
            .await?;
        // s3s-fs answers a completed upload's ListParts with an empty list;
        // an upload that still holds parts lists at least one.
        match upload.status {
            StatusCode::NOT_FOUND => {}
            StatusCode::OK if !write_settle::lists_a_part(&upload.body) => {}
            StatusCode::OK => return Ok(Settlement::Absent),
            status => return Err(ReadBackError::Status(status)),
        }
        let Some(stored) = self.head(connector, host, self.outbound.uri.path()).await? else {
            return Ok(Settlement::Absent);
        };
        let listed = self
            .body
            .kept_whole()
            .and_then(|frames| write_settle::listed_parts(&frames.concat()));
        Ok(
            match listed.and_then(|parts| write_settle::multipart_etag(&parts)) {
                Some(etag) if etag == stored.etag => Settlement::Stored(stored),
                Some(_) => Settlement::Different,
                None => Settlement::NoProof,
            },
        )
    }

    /// The success the client gets for a write proven stored.
    fn answer(&self, verdict: Settlement) -> Option<Response<Bytes>> {
        let Settlement::Stored(stored) = verdict else {
            return None;
        };
        Some(match self.write {
            Write::CompleteMultipartUpload { .. } => {
                let host = self
                    .outbound
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                write_settle::complete_success(&stored, host, self.outbound.uri.path())
            }
            Write::CopyObject { .. } => write_settle::copy_success(&stored),
            _ => write_settle::success(&stored, &self.declared()),
        })
    }
}

/// What a cut download needs to be asked for again.
struct Resend {
    outbound: Outbound,
    /// The request's (empty) body, for each resume attempt.
    body: ClientBody,
    client: SocketAddr,
    /// The request's place in the hold queue.
    ticket: Ticket,
    /// The backend generation the body now streams from.
    generation: AtomicU64,
    /// Time held before the first answer.
    held_before: Duration,
    resumes: Resumes,
    download: Download,
}

/// A wait for the rest of a download, added to its time held when it ends.
struct HeldWhileResuming<'a> {
    resumes: &'a Resumes,
    since: Instant,
}

impl Drop for HeldWhileResuming<'_> {
    fn drop(&mut self) {
        self.resumes.add_held(self.since.elapsed());
    }
}

/// The proxy's way to fetch the rest of one download.
struct Rest {
    proxy: Arc<Proxy>,
    resend: Arc<Resend>,
}

impl Refetch for Rest {
    type Body = BackendBody;

    fn refetch(
        &self,
        continuation: Continuation,
    ) -> BoxFuture<'static, Result<BackendBody, ResumeError>> {
        let proxy = Arc::clone(&self.proxy);
        let resend = Arc::clone(&self.resend);
        Box::pin(async move { proxy.fetch_rest(&resend, continuation).await })
    }

    fn outcome(&self, outcome: ResumeOutcome) {
        self.proxy.metrics.download_resume(outcome);
    }
}

/// Why the proxy refuses a request before sending it: a target the URI parser
/// cut at a raw `#`, a target that is not a path (authority-form such as
/// `GET host:80`, which would otherwise become `GET /`), an expectation the
/// proxy cannot honour for every backend alike.
fn refusal(parts: &http::request::Parts, peer: &Peer) -> Option<ProxyError> {
    if parts.version < Version::HTTP_2 && parts.uri.path_and_query().is_none() {
        return Some(ProxyError::InvalidUri);
    }
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    if peer.cut_targets.take(parts.method.as_str(), target) {
        return Some(ProxyError::InvalidUri);
    }
    match delivery::expectation(parts.version, &parts.headers) {
        Expectation::Unsupported => Some(ProxyError::ExpectationFailed),
        _ => None,
    }
}

/// What `outbound` from `address` is held as: its client, for the
/// client's share of the queue; its object, for its order on release.
fn held_as(outbound: &Outbound, address: IpAddr) -> HeldAs {
    HeldAs {
        client: client_key(&outbound.headers, &outbound.uri, address),
        lane: object_lane(&outbound.uri),
    }
}

/// The S3 request id of a backend response, for the request log; one made
/// by the proxy when the backend sent none. The response itself is never
/// changed: the client sees the headers the backend sent.
fn response_request_id(headers: &HeaderMap) -> RequestId {
    RequestId::from_backend(headers.get(crate::s3_header::X_AMZ_REQUEST_ID))
}

/// How long before its signature ends a held request is answered: the
/// backend must still receive its head in time.
const SIGNATURE_MARGIN: Duration = Duration::from_secs(1);

/// Resolves when a held request's signature is about to end (less than
/// [`SIGNATURE_MARGIN`] left, or already past), with the S3 error the backend
/// would give it; never for a request with no signature time.
async fn signature_ends(outbound: &Outbound) -> ProxyError {
    let Some(end) = signature_expiry::signature_end(&outbound.headers, &outbound.uri) else {
        return std::future::pending().await;
    };
    let left = end
        .at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(SIGNATURE_MARGIN);
    tokio::time::sleep(left).await;
    ProxyError::SignatureExpired(end.limit)
}

/// Returns when `peer` has left; never without one.
async fn client_gone(peer: Option<&Peer>) {
    match peer {
        Some(peer) => peer.gone().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_backends_request_id_is_logged() {
        let mut headers = HeaderMap::new();
        headers.insert("x-amz-request-id", HeaderValue::from_static("tx000abc"));
        assert_eq!(response_request_id(&headers).to_string(), "tx000abc");
    }

    #[test]
    fn a_response_without_a_request_id_is_logged_with_one_and_left_alone() {
        let headers = HeaderMap::new();
        assert!(!response_request_id(&headers).to_string().is_empty());
        assert!(headers.is_empty());
    }
}
