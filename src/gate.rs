//! The gate: what the proxy believes about the backend, and the queue of
//! requests held while it is away.
//!
//! States are `Up` (requests pass), `Down` (with a [`DownReason`]; requests are
//! held) and `Resuming` (the backend is back; held requests are released in
//! arrival order, at most `release_concurrency` at a time, and new arrivals
//! queue behind them). Held requests for one S3 object (one [`ObjectLane`])
//! are released one at a time, each once the one before it was answered;
//! which request goes next is a row of the table of [`queue::step`]. The
//! proxy handler asks [`Gate::admit`] before every attempt; a confirmed failure ([`Gate::mark_down`]), an answer
//! ([`Gate::backend_answered`]), the probe ([`Gate::probe_result`]), the
//! admin API ([`Gate::pause`], [`Gate::resume`]) and discovery move the
//! state, and crash suspects due to be sent again go before every other
//! request ([`Gate::suspect_due`]). Every such rule is one row of the table
//! of [`machine::step`]; the public methods only turn a call into its event.
//! The gate does no I/O: it is that state machine and the queue over a
//! mutex, `watch` channels for the probe loop and the requests that wait for
//! suspects, and tokio time, so it is unit-tested with paused time
//! (`gate/tests.rs`).

mod machine;
mod queue;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::outcome::labels;
use machine::{Event, Machine, State};
use queue::{Held, HoldQueue};

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

/// One of the `release_concurrency` slots of a resuming gate; while it
/// lives, the other held requests of its lane wait.
#[derive(Debug)]
struct ReleaseSlot {
    gate: Arc<Gate>,
    lane: Option<ObjectLane>,
    armed: bool,
}

impl Drop for ReleaseSlot {
    fn drop(&mut self) {
        if self.armed {
            self.gate.slot_done(self.lane);
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

impl Transition {
    /// `first` and then `then`, reported as one change: a resume that
    /// released every held request at once is one Down to Up.
    fn merge(first: Option<Transition>, then: Option<Transition>) -> Option<Transition> {
        match (first, then) {
            (Some(first), Some(then)) => Some(Transition {
                from: first.from,
                ..then
            }),
            (first, then) => first.or(then),
        }
    }
}

type Observer = Box<dyn Fn(&Transition) + Send + Sync>;

#[derive(Debug)]
struct Waiter {
    client: ClientKey,
    tx: oneshot::Sender<ReleaseSlot>,
}

/// Who a held request is from, for fair holding: see
/// [`crate::client_identity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(pub u64);

/// The S3 object a held request names, for its order on release: held
/// requests of one lane are released one at a time, in arrival order. See
/// [`crate::object_lane`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectLane(pub u64);

/// What a request is held as, asked only if it is to be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldAs {
    /// Its client, for the client's share of the queue.
    pub client: ClientKey,
    /// Its object, for its order on release; `None`: released in arrival
    /// order with no wait for another request.
    pub lane: Option<ObjectLane>,
}

struct Inner {
    settings: GateSettings,
    machine: Machine,
    queue: HoldQueue<Waiter>,
    /// Queued requests per client.
    held_by: HashMap<ClientKey, usize>,
    /// Released requests that have not settled yet.
    releasing: usize,
}

/// The backend state machine and hold queue. Shared as `Arc<Gate>`.
pub struct Gate {
    inner: Mutex<Inner>,
    /// The machine's phase, for the probe loop and lock-free reads.
    phase: watch::Sender<Phase>,
    /// The machine's suspects due, for the requests that wait for them.
    suspects_due: watch::Sender<usize>,
    observers: Mutex<Vec<Observer>>,
    next_ticket: AtomicU64,
    /// The machine's generation, readable without the lock on every attempt.
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
                machine: Machine::new(Instant::now()),
                queue: HoldQueue::default(),
                held_by: HashMap::new(),
                releasing: 0,
            }),
            next_ticket: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            phase: watch::Sender::new(Phase::Up),
            suspects_due: watch::Sender::new(0),
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
        inner.settings = settings;
        let transition = self.release_more(&mut inner);
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
        let held_as = || HeldAs {
            client: ClientKey(0),
            lane: None,
        };
        self.admit_from(ticket, held_as, deadline).await
    }

    /// The admission [`Gate::admit_from`] would give at once (the backend up
    /// and nobody queued), if so: no future to build or poll for the
    /// common case.
    pub fn admit_at_once(&self) -> Option<Admission> {
        self.lock().admits_at_once().then_some(Admission {
            held_for: Duration::ZERO,
            slot: None,
        })
    }

    /// [`Gate::admit`] for a request held as `held_as` (asked only if the
    /// request is to be held): a client that already holds
    /// `max_held_per_client` requests is refused ([`Rejection::ClientShare`]),
    /// while others may still queue; a request of a lane is released once
    /// the one of its lane released before it was answered.
    pub async fn admit_from(
        self: &Arc<Self>,
        ticket: Ticket,
        held_as: impl FnOnce() -> HeldAs,
        deadline: Instant,
    ) -> Result<Admission, Rejection> {
        let (mut rx, lane) = {
            let mut inner = self.lock();
            if inner.admits_at_once() {
                return Ok(Admission {
                    held_for: Duration::ZERO,
                    slot: None,
                });
            }
            let queued = inner.enqueue(ticket, held_as)?;
            let transition = self.release_more(&mut inner);
            self.notify(transition);
            queued
        };
        let started = Instant::now();
        let queued = Queued {
            gate: self,
            ticket,
            lane,
        };
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

    /// A request that began in `generation` saw the backend fail, and the
    /// failure is an outage (a refused connect, or a failure a check
    /// confirmed): the gate goes down, unless it already went down since
    /// (the failure was on a connection to the previous backend). True
    /// when the failure is of the current generation.
    pub fn mark_down(self: &Arc<Self>, reason: DownReason, generation: u64) -> bool {
        let current = generation == self.generation();
        self.apply(Event::Failed { reason, generation });
        current
    }

    /// A request got an answer from the backend: if the gate was down for a
    /// failure (not a pause), the backend is evidently serving again.
    pub fn backend_answered(self: &Arc<Self>) {
        // The common case, checked without taking the gate's lock.
        if *self.phase.borrow() != Phase::Up {
            self.apply(Event::Answered);
        }
    }

    /// The probe's verdict: `true` when the backend answered HTTP.
    pub fn probe_result(self: &Arc<Self>, serving: bool) {
        let max_pause = self.lock().settings.max_pause;
        self.apply(Event::Probed { serving, max_pause });
    }

    /// Holds new requests until resumed or until the backend has been seen to
    /// go away and come back. Idempotent.
    pub fn pause(self: &Arc<Self>) {
        self.apply(Event::Pause);
    }

    /// Ends an admin pause. Idempotent; a backend that is down stays down.
    pub fn resume(self: &Arc<Self>) {
        self.apply(Event::Resume);
    }

    /// Discovery found no usable endpoint: hold new requests, and do not
    /// resume on a serving probe until [`Gate::release_discovery`].
    pub fn hold_for_discovery(self: &Arc<Self>) {
        self.apply(Event::NoEndpoint);
    }

    /// Discovery has a usable endpoint again; the probe decides when it serves.
    pub fn release_discovery(self: &Arc<Self>) {
        self.apply(Event::EndpointUsable);
    }

    /// The backend address changed: hold until the probe sees the new one serve.
    pub fn backend_moved(self: &Arc<Self>) {
        self.apply(Event::Moved);
    }

    /// The paused backend was seen to go away (its process closed a connection).
    pub fn backend_gone(self: &Arc<Self>) {
        self.apply(Event::BackendGone);
    }

    /// A request the backend died with (a crash suspect) is to be sent
    /// again: every other request waits ([`Gate::suspects_sent`]) until the
    /// returned guard is dropped (its next attempt concluded, or the request
    /// ended), so that at a second crash the suspect is alone in flight.
    pub fn suspect_due(self: &Arc<Self>) -> SuspectDue {
        self.apply(Event::SuspectDue);
        SuspectDue {
            gate: Arc::clone(self),
        }
    }

    /// True while a crash suspect is due to be sent again.
    pub fn suspects_due(&self) -> bool {
        *self.suspects_due.borrow() > 0
    }

    /// Waits until no crash suspect is due to be sent again; `None` at
    /// `deadline`. Returns at once in the common case (no suspect).
    pub async fn suspects_sent(&self, deadline: Instant) -> Option<()> {
        let mut due = self.suspects_due.subscribe();
        let sent = tokio::time::timeout_at(deadline, due.wait_for(|due| *due == 0)).await;
        sent.ok().map(|_| ())
    }

    /// Time since the current admin pause began, if one is in force.
    pub fn paused_for(&self) -> Option<Duration> {
        self.lock().machine.pause.map(|p| p.started.elapsed())
    }

    pub fn status(&self) -> GateStatus {
        let inner = self.lock();
        let machine = &inner.machine;
        let reason = match machine.state {
            State::Down { reason, .. } => Some(reason),
            State::Up | State::Resuming { .. } => None,
        };
        GateStatus {
            phase: machine.state.phase(),
            reason,
            since: machine.changed_at.elapsed(),
            held: inner.queue.len(),
            paused: machine.pause.is_some(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `event` to the machine and reports the change it made; a
    /// gate that began resuming releases held requests at once (and is Up
    /// again right away if none were held).
    fn apply(self: &Arc<Self>, event: Event) {
        let mut inner = self.lock();
        let stepped = machine::step(&mut inner.machine, event, Instant::now());
        self.publish(&inner.machine);
        let released = match &stepped {
            Some(transition) if transition.to == Phase::Resuming => self.release_more(&mut inner),
            _ => None,
        };
        self.notify(Transition::merge(stepped, released));
    }

    /// Makes the machine's phase, generation and suspects due visible
    /// without the lock.
    fn publish(&self, machine: &Machine) {
        publish_if_changed(&self.phase, machine.state.phase());
        publish_if_changed(&self.suspects_due, machine.suspects_due);
        self.generation.store(machine.generation, Ordering::Release);
    }

    /// Releases queued requests while the gate is resuming and slots are free;
    /// goes Up once the queue is empty. Returns the Up transition if made.
    fn release_more(self: &Arc<Self>, inner: &mut Inner) -> Option<Transition> {
        if !matches!(inner.machine.state, State::Resuming { .. }) {
            return None;
        }
        while inner.releasing < inner.settings.release_concurrency {
            let Some(held) = queue::step(&mut inner.queue, queue::Event::SlotFree) else {
                break;
            };
            inner.left_queue(held.waiter.client);
            inner.releasing += 1;
            let slot = ReleaseSlot {
                gate: Arc::clone(self),
                lane: held.lane,
                armed: true,
            };
            if let Err(mut unsent) = held.waiter.tx.send(slot) {
                // The waiter is being dropped right now; reuse its slot.
                unsent.armed = false;
                inner.slot_done(held.lane);
            }
        }
        if !inner.queue.is_empty() {
            return None;
        }
        let up = machine::step(&mut inner.machine, Event::Drained, Instant::now());
        self.publish(&inner.machine);
        up
    }

    /// A released request was answered (or ended): its slot and its lane
    /// are free for the next.
    fn slot_done(self: &Arc<Self>, lane: Option<ObjectLane>) {
        let mut inner = self.lock();
        inner.slot_done(lane);
        let transition = self.release_more(&mut inner);
        self.notify(transition);
    }

    fn dequeue(self: &Arc<Self>, ticket: Ticket, lane: Option<ObjectLane>) {
        let mut inner = self.lock();
        let left = queue::Event::Left { ticket, lane };
        if let Some(held) = queue::step(&mut inner.queue, left) {
            inner.left_queue(held.waiter.client);
            // The lane's next request may go in its place.
            let transition = self.release_more(&mut inner);
            self.notify(transition);
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
    /// A request arriving now goes to the backend at once: it is up and
    /// nobody is queued before it.
    fn admits_at_once(&self) -> bool {
        self.machine.state == State::Up && self.queue.is_empty()
    }

    /// Queues a request in ticket order (behind its lane), or says why it
    /// may not wait: fail-fast in a long outage (not during a pause), a full
    /// queue, or a client that holds its share. Returns the channel its
    /// release slot comes on, and its lane.
    fn enqueue(
        &mut self,
        ticket: Ticket,
        held_as: impl FnOnce() -> HeldAs,
    ) -> Result<(oneshot::Receiver<ReleaseSlot>, Option<ObjectLane>), Rejection> {
        if let State::Down { since, .. } = self.machine.state
            && self.machine.pause.is_none()
            && since.elapsed() >= self.settings.fail_fast_after
        {
            return Err(Rejection::FailFast);
        }
        if self.queue.len() >= self.settings.max_held {
            return Err(Rejection::QueueFull);
        }
        let HeldAs { client, lane } = held_as();
        let held = self.held_by.entry(client).or_insert(0);
        if *held >= self.settings.max_held_per_client {
            return Err(Rejection::ClientShare);
        }
        *held += 1;
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { client, tx };
        let held = Held {
            ticket,
            lane,
            waiter,
        };
        queue::step(&mut self.queue, queue::Event::Held(held));
        Ok((rx, lane))
    }

    /// A released request was answered: one release slot fewer in use, and
    /// its lane's next request may join the release order.
    fn slot_done(&mut self, lane: Option<ObjectLane>) {
        self.releasing = self.releasing.saturating_sub(1);
        if let Some(lane) = lane {
            queue::step(&mut self.queue, queue::Event::Answered(lane));
        }
    }

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

/// Sets `value` on `channel`, waking its receivers only if it changed.
fn publish_if_changed<T: PartialEq>(channel: &watch::Sender<T>, value: T) {
    channel.send_if_modified(|published| {
        let changed = *published != value;
        *published = value;
        changed
    });
}

/// A crash suspect due to be sent again (see [`Gate::suspect_due`]).
#[derive(Debug)]
pub struct SuspectDue {
    gate: Arc<Gate>,
}

impl Drop for SuspectDue {
    fn drop(&mut self) {
        self.gate.apply(Event::SuspectSent);
    }
}

/// Removes a waiter from the queue when its `admit` future ends or is dropped.
struct Queued<'a> {
    gate: &'a Arc<Gate>,
    ticket: Ticket,
    lane: Option<ObjectLane>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.gate.dequeue(self.ticket, self.lane);
    }
}
