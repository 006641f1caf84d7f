//! The gate: what the proxy believes about the backend, and the queue of
//! requests held while it is away.
//!
//! States are `Up` (requests pass), `Down` (with a [`DownReason`]; requests are
//! held) and `Resuming` (the backend is back; held requests are released in
//! arrival order, at most `release_concurrency` at a time, and new arrivals
//! queue behind them). The proxy handler asks [`Gate::admit`] before every
//! attempt; passive detection ([`Gate::mark_down`]), the probe
//! ([`Gate::probe_result`]) and the admin API ([`Gate::pause`],
//! [`Gate::resume`]) move the state. The gate does no I/O: it is a state
//! machine over a mutex, a `watch` channel for the probe loop, and tokio time,
//! so it is unit-tested with paused time.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::outcome::labels;

labels! {
    /// Why the backend is considered down.
    pub enum DownReason {
        /// A connection to the backend was refused.
        Refused => "refused",
        /// An established connection was reset or closed mid-request.
        Reset => "reset",
        /// The backend accepted a request but made no progress in time.
        HangTimeout => "hang_timeout",
        /// The active probe failed (after a pause ended without the backend back).
        ProbeFailed => "probe_failed",
        /// An operator (or a pre-stop hook) paused traffic.
        AdminPause => "admin_pause",
        /// Service discovery says no usable backend exists.
        Discovery => "discovery",
    }
}

labels! {
    /// The coarse state, published on a `watch` channel for the probe loop.
    pub enum Phase {
        Up => "up",
        Down => "down",
        Resuming => "resuming",
    }
}

/// The limits the gate enforces; they can change while requests are held.
#[derive(Debug, Clone, PartialEq)]
pub struct GateSettings {
    pub max_held: usize,
    /// Requests one client may have held at once (`hold.max_requests_per_client`).
    pub max_held_per_client: usize,
    pub fail_fast_after: Duration,
    pub release_concurrency: usize,
    pub max_pause: Duration,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the hold queue is full")]
    QueueFull,
    #[error("the client already holds its share of the hold queue")]
    ClientShare,
    #[error("the request was held for its whole hold timeout")]
    HoldTimeout,
    #[error("the backend has been down longer than hold.fail_fast_after")]
    FailFast,
}

/// Arrival order of one request; kept across its holds so a request that is
/// held again after a failed attempt keeps its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Permission to send one attempt to the backend.
#[derive(Debug)]
pub struct Admission {
    /// Time this admission spent in the queue.
    pub held_for: Duration,
    /// Present when released from the queue: counts against
    /// `release_concurrency` until dropped.
    slot: Option<ReleaseSlot>,
}

impl Admission {
    /// True when the request waited in the queue.
    pub fn was_held(&self) -> bool {
        self.slot.is_some()
    }

    /// Frees the release slot: call once the attempt has its answer.
    pub fn settle(&mut self) {
        self.slot.take();
    }
}

/// One of the `release_concurrency` slots of a resuming gate.
#[derive(Debug)]
struct ReleaseSlot {
    gate: Arc<Gate>,
    armed: bool,
}

impl Drop for ReleaseSlot {
    fn drop(&mut self) {
        if self.armed {
            self.gate.slot_done();
        }
    }
}

/// What `GET /admin/status` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct GateStatus {
    pub phase: Phase,
    pub reason: Option<DownReason>,
    /// Time since the last state change.
    pub since: Duration,
    pub held: usize,
    pub paused: bool,
}

/// A state change, reported to observers (logs, metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    pub reason: Option<DownReason>,
    /// Set when the backend came back: Down to Up.
    pub outage: Option<Duration>,
}

type Observer = Box<dyn Fn(&Transition) + Send + Sync>;

#[derive(Debug)]
enum State {
    Up,
    Down { reason: DownReason, since: Instant },
    Resuming { outage_started: Instant },
}

#[derive(Debug)]
struct Pause {
    started: Instant,
    /// The pause ends by itself once the old backend went away and a new one serves.
    backend_seen_gone: bool,
}

#[derive(Debug)]
struct Waiter {
    ticket: Ticket,
    client: ClientKey,
    tx: oneshot::Sender<ReleaseSlot>,
}

/// Who a held request is from, for fair holding: see
/// [`crate::client_identity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(pub u64);

struct Inner {
    settings: GateSettings,
    state: State,
    changed_at: Instant,
    queue: VecDeque<Waiter>,
    /// Queued requests per client.
    held_by: HashMap<ClientKey, usize>,
    /// Released requests that have not settled yet.
    releasing: usize,
    pause: Option<Pause>,
    /// Discovery says no endpoint is usable: a serving probe must not resume.
    discovery_hold: bool,
}

/// The backend state machine and hold queue. Shared as `Arc<Gate>`.
pub struct Gate {
    inner: Mutex<Inner>,
    phase: watch::Sender<Phase>,
    observers: Mutex<Vec<Observer>>,
    next_ticket: AtomicU64,
    /// Outages so far: what a connection made before the last one failing
    /// says nothing about the backend serving since.
    generation: AtomicU64,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("phase", &*self.phase.borrow())
            .finish()
    }
}

impl Gate {
    /// A gate that starts Up: the first refused connection takes it down.
    pub fn new(settings: GateSettings) -> Arc<Gate> {
        Arc::new(Gate {
            inner: Mutex::new(Inner {
                settings,
                state: State::Up,
                changed_at: Instant::now(),
                queue: VecDeque::new(),
                held_by: HashMap::new(),
                releasing: 0,
                pause: None,
                discovery_hold: false,
            }),
            next_ticket: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            phase: watch::Sender::new(Phase::Up),
            observers: Mutex::new(Vec::new()),
        })
    }

    /// Calls `observer` on every state change (after the change is made,
    /// under the gate's lock: in order, and it must not call the gate).
    pub fn observe(&self, observer: impl Fn(&Transition) + Send + Sync + 'static) {
        self.observers.lock().unwrap().push(Box::new(observer));
    }

    /// A receiver that sees every phase change (the probe loop waits on it).
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Changes the limits; held requests stay held.
    pub fn update_settings(self: &Arc<Self>, settings: GateSettings) {
        let mut inner = self.lock();
        let transition = {
            inner.settings = settings;
            self.release_more(&mut inner)
        };
        self.notify(transition);
    }

    /// The backend generation: it changes every time the gate goes down, so
    /// a failure seen on a connection of an earlier generation (a download
    /// still streaming from the killed process) is not taken for a failure
    /// of the backend serving now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn ticket(&self) -> Ticket {
        Ticket(self.next_ticket.fetch_add(1, Ordering::Relaxed))
    }

    /// Waits until the request may go to the backend, or says why not.
    /// Dropping the returned future (the client went away) frees the slot.
    pub async fn admit(
        self: &Arc<Self>,
        ticket: Ticket,
        deadline: Instant,
    ) -> Result<Admission, Rejection> {
        self.admit_from(ticket, || ClientKey(0), deadline).await
    }

    /// [`Gate::admit`] for a request from `client` (asked only if the
    /// request is to be held): a client that already holds
    /// `max_held_per_client` requests is refused ([`Rejection::ClientShare`]),
    /// while others may still queue.
    pub async fn admit_from(
        self: &Arc<Self>,
        ticket: Ticket,
        client: impl FnOnce() -> ClientKey,
        deadline: Instant,
    ) -> Result<Admission, Rejection> {
        let mut rx = {
            let mut inner = self.lock();
            if matches!(inner.state, State::Up) && inner.queue.is_empty() {
                return Ok(Admission {
                    held_for: Duration::ZERO,
                    slot: None,
                });
            }
            if let State::Down { since, .. } = inner.state
                && inner.pause.is_none()
                && since.elapsed() >= inner.settings.fail_fast_after
            {
                return Err(Rejection::FailFast);
            }
            if inner.queue.len() >= inner.settings.max_held {
                return Err(Rejection::QueueFull);
            }
            let client = client();
            let most = inner.settings.max_held_per_client;
            let held = inner.held_by.entry(client).or_insert(0);
            if *held >= most {
                return Err(Rejection::ClientShare);
            }
            *held += 1;
            let (tx, rx) = oneshot::channel();
            let position = inner.queue.partition_point(|w| w.ticket < ticket);
            inner.queue.insert(position, Waiter { ticket, client, tx });
            self.release_more(&mut inner);
            rx
        };
        let started = Instant::now();
        let queued = Queued { gate: self, ticket };
        let released = match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(Ok(slot)) => Some(slot),
            Ok(Err(_)) => None,
            // Released at the same moment the timer fired: honour the release.
            Err(_) => rx.try_recv().ok(),
        };
        drop(queued);
        match released {
            Some(slot) => Ok(Admission {
                held_for: started.elapsed(),
                slot: Some(slot),
            }),
            None => Err(Rejection::HoldTimeout),
        }
    }

    /// Passive detection: a request saw the backend fail.
    pub fn mark_down(&self, reason: DownReason) {
        let mut inner = self.lock();
        let transition = {
            if let Some(pause) = inner.pause.as_mut() {
                pause.backend_seen_gone = true;
            }
            self.down_unless_down(&mut inner, reason)
        };
        self.notify(transition);
    }

    /// A request got an answer from the backend: if the gate was down for a
    /// failure (not a pause), the backend is evidently serving again.
    pub fn backend_answered(self: &Arc<Self>) {
        // The common case, checked without taking the gate's lock.
        if *self.phase.borrow() == Phase::Up {
            return;
        }
        let mut inner = self.lock();
        let transition = {
            match inner.state {
                State::Down { reason, since }
                    if inner.pause.is_none()
                        && !inner.discovery_hold
                        && reason != DownReason::Discovery =>
                {
                    Some(self.go_resuming(&mut inner, since))
                }
                _ => None,
            }
        };
        self.notify(transition);
    }

    /// The probe's verdict: `true` when the backend answered HTTP.
    pub fn probe_result(self: &Arc<Self>, serving: bool) {
        let mut inner = self.lock();
        let transition = self.apply_probe(&mut inner, serving);
        self.notify(transition);
    }

    fn apply_probe(self: &Arc<Self>, inner: &mut Inner, serving: bool) -> Option<Transition> {
        let max_pause = inner.settings.max_pause;
        if let Some(pause) = inner.pause.as_mut() {
            let expired = pause.started.elapsed() >= max_pause;
            if !serving {
                pause.backend_seen_gone = true;
            }
            let replaced = serving && pause.backend_seen_gone;
            if !expired && !replaced {
                return None;
            }
            if expired {
                tracing::warn!(max_pause = ?max_pause, "admin pause reached hold.max_pause and ends");
            }
            inner.pause = None;
        }
        match inner.state {
            State::Down { since, .. } if serving && !inner.discovery_hold => {
                Some(self.go_resuming(inner, since))
            }
            State::Down {
                reason: DownReason::AdminPause,
                since,
            } => {
                inner.state = State::Down {
                    reason: DownReason::ProbeFailed,
                    since,
                };
                None
            }
            _ => None,
        }
    }

    /// Holds new requests until resumed or until the backend has been seen to
    /// go away and come back. Idempotent.
    pub fn pause(&self) {
        let mut inner = self.lock();
        let transition = {
            if inner.pause.is_some() {
                return;
            }
            inner.pause = Some(Pause {
                started: Instant::now(),
                backend_seen_gone: matches!(inner.state, State::Down { .. }),
            });
            self.down_unless_down(&mut inner, DownReason::AdminPause)
        };
        self.notify(transition);
    }

    /// Ends an admin pause. Idempotent; a backend that is down stays down.
    pub fn resume(self: &Arc<Self>) {
        let mut inner = self.lock();
        let transition = {
            if inner.pause.take().is_none() {
                return;
            }
            match inner.state {
                State::Down {
                    reason: DownReason::AdminPause,
                    since,
                } if inner.discovery_hold => {
                    inner.state = State::Down {
                        reason: DownReason::Discovery,
                        since,
                    };
                    None
                }
                State::Down {
                    reason: DownReason::AdminPause,
                    since,
                } => Some(self.go_resuming(&mut inner, since)),
                _ => None,
            }
        };
        self.notify(transition);
    }

    /// Discovery found no usable endpoint: hold new requests, and do not
    /// resume on a serving probe until [`Gate::release_discovery`].
    pub fn hold_for_discovery(&self) {
        self.discovery_down(true);
    }

    /// Discovery has a usable endpoint again; the probe decides when it serves.
    pub fn release_discovery(&self) {
        self.lock().discovery_hold = false;
    }

    /// The backend address changed: hold until the probe sees the new one serve.
    pub fn backend_moved(&self) {
        self.discovery_down(false);
    }

    fn discovery_down(&self, hold: bool) {
        let mut inner = self.lock();
        let transition = {
            inner.discovery_hold = hold;
            self.down_unless_down(&mut inner, DownReason::Discovery)
        };
        self.notify(transition);
    }

    /// Takes an Up or Resuming gate down; a gate already down keeps its reason.
    fn down_unless_down(&self, inner: &mut Inner, reason: DownReason) -> Option<Transition> {
        match inner.state {
            State::Down { .. } => None,
            State::Up | State::Resuming { .. } => Some(self.go_down(inner, reason, Instant::now())),
        }
    }

    /// The paused backend was seen to go away (its process closed a connection).
    pub fn backend_gone(&self) {
        if let Some(pause) = self.lock().pause.as_mut() {
            pause.backend_seen_gone = true;
        }
    }

    /// Time since the current admin pause began, if one is in force.
    pub fn paused_for(&self) -> Option<Duration> {
        self.lock().pause.as_ref().map(|p| p.started.elapsed())
    }

    pub fn status(&self) -> GateStatus {
        let inner = self.lock();
        let (phase, reason) = match inner.state {
            State::Up => (Phase::Up, None),
            State::Down { reason, .. } => (Phase::Down, Some(reason)),
            State::Resuming { .. } => (Phase::Resuming, None),
        };
        GateStatus {
            phase,
            reason,
            since: inner.changed_at.elapsed(),
            held: inner.queue.len(),
            paused: inner.pause.is_some(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn go_down(&self, inner: &mut Inner, reason: DownReason, now: Instant) -> Transition {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let from = phase_of(&inner.state);
        inner.state = State::Down { reason, since: now };
        inner.changed_at = now;
        self.phase.send_replace(Phase::Down);
        Transition {
            from,
            to: Phase::Down,
            reason: Some(reason),
            outage: None,
        }
    }

    fn go_resuming(self: &Arc<Self>, inner: &mut Inner, outage_started: Instant) -> Transition {
        inner.state = State::Resuming { outage_started };
        inner.changed_at = Instant::now();
        self.phase.send_replace(Phase::Resuming);
        let transition = Transition {
            from: Phase::Down,
            to: Phase::Resuming,
            reason: None,
            outage: Some(outage_started.elapsed()),
        };
        // Releasing may finish the resume at once (empty queue): report that
        // as the one Down -> Up change observers care about.
        match self.release_more(inner) {
            Some(up) => Transition {
                from: Phase::Down,
                ..up
            },
            None => transition,
        }
    }

    /// Releases queued requests while the gate is resuming and slots are free;
    /// goes Up once the queue is empty. Returns the Up transition if made.
    fn release_more(self: &Arc<Self>, inner: &mut Inner) -> Option<Transition> {
        let State::Resuming { outage_started } = inner.state else {
            return None;
        };
        while inner.releasing < inner.settings.release_concurrency {
            let Some(waiter) = inner.queue.pop_front() else {
                break;
            };
            inner.left_queue(waiter.client);
            inner.releasing += 1;
            let slot = ReleaseSlot {
                gate: Arc::clone(self),
                armed: true,
            };
            if let Err(mut unsent) = waiter.tx.send(slot) {
                // The waiter is being dropped right now; reuse its slot.
                unsent.armed = false;
                inner.releasing -= 1;
            }
        }
        if !inner.queue.is_empty() {
            return None;
        }
        inner.state = State::Up;
        inner.changed_at = Instant::now();
        self.phase.send_replace(Phase::Up);
        Some(Transition {
            from: Phase::Resuming,
            to: Phase::Up,
            reason: None,
            outage: Some(outage_started.elapsed()),
        })
    }

    fn slot_done(self: &Arc<Self>) {
        let mut inner = self.lock();
        let transition = {
            inner.releasing = inner.releasing.saturating_sub(1);
            self.release_more(&mut inner)
        };
        self.notify(transition);
    }

    fn dequeue(&self, ticket: Ticket) {
        let mut inner = self.lock();
        if let Some(position) = inner.queue.iter().position(|w| w.ticket == ticket)
            && let Some(waiter) = inner.queue.remove(position)
        {
            inner.left_queue(waiter.client);
        }
    }

    /// Reports `transition` to the observers. Every caller still holds the
    /// gate's lock, so two changes made one after the other on two threads
    /// are reported in that order (released first, a later change could
    /// log before an earlier one); observers must not call the gate. Not
    /// tested: the gap it closes lies between releasing one lock and taking
    /// the next, too narrow for a test to hit on the old code.
    fn notify(&self, transition: Option<Transition>) {
        let Some(transition) = transition else {
            return;
        };
        for observer in self.observers.lock().unwrap().iter() {
            observer(&transition);
        }
    }
}

impl Inner {
    /// A request of `client` left the queue (released, or gone).
    fn left_queue(&mut self, client: ClientKey) {
        if let Some(held) = self.held_by.get_mut(&client) {
            *held -= 1;
            if *held == 0 {
                self.held_by.remove(&client);
            }
        }
    }
}

fn phase_of(state: &State) -> Phase {
    match state {
        State::Up => Phase::Up,
        State::Down { .. } => Phase::Down,
        State::Resuming { .. } => Phase::Resuming,
    }
}

/// Removes a waiter from the queue when its `admit` future ends or is dropped.
struct Queued<'a> {
    gate: &'a Arc<Gate>,
    ticket: Ticket,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.gate.dequeue(self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GateSettings {
        GateSettings {
            max_held: 3,
            max_held_per_client: 3,
            fail_fast_after: Duration::from_secs(120),
            release_concurrency: 2,
            max_pause: Duration::from_secs(60),
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    fn hold(gate: &Arc<Gate>) -> tokio::task::JoinHandle<Result<Admission, Rejection>> {
        let gate = Arc::clone(gate);
        let ticket = gate.ticket();
        tokio::spawn(async move { gate.admit(ticket, far()).await })
    }

    async fn settle_tasks() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn hold_from(
        gate: &Arc<Gate>,
        client: u64,
    ) -> tokio::task::JoinHandle<Result<Admission, Rejection>> {
        let gate = Arc::clone(gate);
        let ticket = gate.ticket();
        tokio::spawn(async move { gate.admit_from(ticket, || ClientKey(client), far()).await })
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_holding_its_share_is_refused_while_others_still_queue() {
        let gate = Gate::new(GateSettings {
            max_held_per_client: 2,
            ..settings()
        });
        gate.mark_down(DownReason::Refused);
        let first = hold_from(&gate, 1);
        let second = hold_from(&gate, 1);
        settle_tasks().await;
        let third = gate.admit_from(gate.ticket(), || ClientKey(1), far()).await;
        assert_eq!(third.unwrap_err(), Rejection::ClientShare);
        let other = hold_from(&gate, 2);
        settle_tasks().await;
        assert_eq!(gate.status().held, 3, "another client still queues");

        first.abort();
        settle_tasks().await;
        let again = hold_from(&gate, 1);
        settle_tasks().await;
        assert_eq!(gate.status().held, 3, "a place left is the client's again");
        gate.probe_result(true);
        for held in [second, other, again] {
            assert!(held.await.unwrap().is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_up_gate_admits_at_once() {
        let gate = Gate::new(settings());
        let admission = gate.admit(gate.ticket(), far()).await.unwrap();
        assert!(!admission.was_held());
    }

    #[tokio::test(start_paused = true)]
    async fn a_down_gate_holds_until_the_probe_sees_the_backend() {
        let gate = Gate::new(settings());
        gate.mark_down(DownReason::Refused);
        let held = hold(&gate);
        settle_tasks().await;
        assert_eq!(gate.status().held, 1);
        assert_eq!(gate.status().reason, Some(DownReason::Refused));
        tokio::time::advance(Duration::from_millis(1500)).await;
        gate.probe_result(true);
        let admission = held.await.unwrap().unwrap();
        assert!(admission.was_held());
        assert_eq!(admission.held_for, Duration::from_millis(1500));
        assert_eq!(gate.status().phase, Phase::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_keeps_requests_held() {
        let gate = Gate::new(settings());
        gate.mark_down(DownReason::Reset);
        let held = hold(&gate);
        settle_tasks().await;
        gate.probe_result(false);
        settle_tasks().await;
        assert!(!held.is_finished());
        assert_eq!(gate.status().phase, Phase::Down);
    }

    #[tokio::test(start_paused = true)]
    async fn overflow_is_rejected_at_once() {
        let gate = Gate::new(settings());
        gate.mark_down(DownReason::Refused);
        let _held: Vec<_> = (0..3).map(|_| hold(&gate)).collect();
        settle_tasks().await;
        let overflow = gate.admit(gate.ticket(), far()).await;
        assert_eq!(overflow.unwrap_err(), Rejection::QueueFull);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_ends_at_its_deadline() {
        let gate = Gate::new(settings());
        gate.mark_down(DownReason::Refused);
        let deadline = Instant::now() + Duration::from_secs(2);
        let result = gate.admit(gate.ticket(), deadline).await;
        assert_eq!(result.unwrap_err(), Rejection::HoldTimeout);
        assert_eq!(Instant::now(), deadline);
        assert_eq!(gate.status().held, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_frees_its_slot() {
        let gate = Gate::new(settings());
        gate.mark_down(DownReason::Refused);
        let held = hold(&gate);
        settle_tasks().await;
        assert_eq!(gate.status().held, 1);
        held.abort();
        settle_tasks().await;
        assert_eq!(gate.status().held, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_outage_fails_new_requests_fast() {
        let gate = Gate::new(settings());
        gate.mark_down(DownReason::Refused);
        let early = {
            let gate = Arc::clone(&gate);
            let ticket = gate.ticket();
            let deadline = Instant::now() + Duration::from_secs(300);
            tokio::spawn(async move { gate.admit(ticket, deadline).await })
        };
        settle_tasks().await;
        tokio::time::advance(Duration::from_secs(121)).await;
        let late = gate.admit(gate.ticket(), far()).await;
        assert_eq!(late.unwrap_err(), Rejection::FailFast);
        settle_tasks().await;
        assert!(!early.is_finished(), "held requests keep their own timeout");
        gate.probe_result(true);
        assert!(gate.admit(gate.ticket(), far()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn resume_releases_in_arrival_order_with_a_cap() {
        let gate = Gate::new(settings());
        gate.mark_down(DownReason::Refused);
        let first = hold(&gate);
        settle_tasks().await;
        let second = hold(&gate);
        settle_tasks().await;
        let third = hold(&gate);
        settle_tasks().await;
        gate.probe_result(true);
        settle_tasks().await;
        assert!(first.is_finished() && second.is_finished());
        assert!(!third.is_finished(), "only release_concurrency go at once");
        assert_eq!(gate.status().phase, Phase::Resuming);
        let mut first = first.await.unwrap().unwrap();
        first.settle();
        let _third = third.await.unwrap().unwrap();
        assert_eq!(gate.status().phase, Phase::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_held_again_keeps_its_place() {
        let gate = Gate::new(settings());
        let early_ticket = gate.ticket();
        gate.mark_down(DownReason::Refused);
        let later = hold(&gate);
        settle_tasks().await;
        let early = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { gate.admit(early_ticket, far()).await })
        };
        settle_tasks().await;
        gate.update_settings(GateSettings {
            release_concurrency: 1,
            ..settings()
        });
        gate.probe_result(true);
        settle_tasks().await;
        assert!(early.is_finished());
        assert!(!later.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_until_the_backend_went_away_and_came_back() {
        let gate = Gate::new(settings());
        gate.pause();
        gate.pause();
        let held = hold(&gate);
        settle_tasks().await;
        gate.probe_result(true);
        settle_tasks().await;
        assert!(
            !held.is_finished(),
            "the old backend still serving ends nothing"
        );
        gate.probe_result(false);
        gate.probe_result(true);
        held.await.unwrap().unwrap();
        assert_eq!(gate.status().phase, Phase::Up);
        assert!(!gate.status().paused);
    }

    #[tokio::test(start_paused = true)]
    async fn resume_ends_a_pause_and_is_idempotent() {
        let gate = Gate::new(settings());
        gate.pause();
        let held = hold(&gate);
        settle_tasks().await;
        gate.resume();
        gate.resume();
        held.await.unwrap().unwrap();
        assert_eq!(gate.status().phase, Phase::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_pause_ends_after_max_pause() {
        let gate = Gate::new(settings());
        gate.pause();
        let held = hold(&gate);
        tokio::time::advance(Duration::from_secs(61)).await;
        gate.probe_result(true);
        held.await.unwrap().unwrap();
        assert!(!gate.status().paused);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_that_expires_with_the_backend_gone_stays_down() {
        let gate = Gate::new(settings());
        gate.pause();
        tokio::time::advance(Duration::from_secs(61)).await;
        gate.probe_result(false);
        let status = gate.status();
        assert_eq!(status.phase, Phase::Down);
        assert_eq!(status.reason, Some(DownReason::ProbeFailed));
        assert!(!status.paused);
    }

    #[tokio::test(start_paused = true)]
    async fn a_discovery_hold_ignores_serving_probes_until_released() {
        let gate = Gate::new(settings());
        gate.hold_for_discovery();
        let held = hold(&gate);
        settle_tasks().await;
        gate.probe_result(true);
        gate.backend_answered();
        settle_tasks().await;
        assert!(
            !held.is_finished(),
            "a draining backend still answers probes"
        );
        assert_eq!(gate.status().reason, Some(DownReason::Discovery));
        gate.release_discovery();
        gate.probe_result(true);
        held.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_backend_is_trusted_only_after_a_probe() {
        let gate = Gate::new(settings());
        gate.backend_moved();
        let held = hold(&gate);
        settle_tasks().await;
        gate.backend_answered();
        settle_tasks().await;
        assert!(!held.is_finished());
        gate.probe_result(true);
        held.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn observers_see_the_outage_length() {
        let gate = Gate::new(settings());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        gate.observe(move |t| sink.lock().unwrap().push(t.clone()));
        gate.mark_down(DownReason::Refused);
        tokio::time::advance(Duration::from_millis(700)).await;
        gate.probe_result(true);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].to, Phase::Down);
        assert_eq!(seen[1].to, Phase::Up);
        assert_eq!(seen[1].outage, Some(Duration::from_millis(700)));
    }
}
