//! The hold queue: the requests held while the backend is away, and which of
//! them is released next, in one function, [`step`].
//!
//! Held requests leave in arrival order ([`Ticket`] order), except that the
//! requests of one [`ObjectLane`] (one S3 object, see
//! [`crate::object_lane`]) go one at a time: a later request of a lane is
//! set aside, holding no release slot, until the released request before it
//! was answered, and requests of other lanes pass it meanwhile. So a PUT and
//! then a DELETE of one key held together reach the backend in that order,
//! while different keys go in parallel. The queue is pure (no channels, no
//! time): the [`super::Gate`] keeps it under its lock, next to the machine.

use std::collections::{BTreeMap, HashMap};

use super::{ObjectLane, Ticket};

/// One held request: its place, its lane, and what the gate needs to
/// release it (`T`: the gate's channel to the waiting request).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Held<T> {
    pub(super) ticket: Ticket,
    pub(super) lane: Option<ObjectLane>,
    pub(super) waiter: T,
}

/// What the queue knows of one lane; dropped once it has nothing to say.
#[derive(Debug)]
struct Lane<T> {
    /// A request of the lane was released and its attempt is not answered yet.
    released: bool,
    /// The lane's request in the release order, if any (never more than one).
    next: Option<Ticket>,
    /// The lane's other held requests, in ticket order: set aside, they hold
    /// no release slot and block no other lane.
    behind: BTreeMap<Ticket, T>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Lane {
            released: false,
            next: None,
            behind: BTreeMap::new(),
        }
    }
}

impl<T> Lane<T> {
    fn is_idle(&self) -> bool {
        !self.released && self.next.is_none() && self.behind.is_empty()
    }
}

/// The held requests: the release order and the lanes' requests set aside.
#[derive(Debug)]
pub(super) struct HoldQueue<T> {
    /// The requests that go as soon as a release slot is free, in ticket
    /// order: those without a lane, and per lane its first held request
    /// while none of the lane is released.
    order: BTreeMap<Ticket, (Option<ObjectLane>, T)>,
    lanes: HashMap<ObjectLane, Lane<T>>,
    /// Held requests, set aside ones included.
    len: usize,
}

impl<T> Default for HoldQueue<T> {
    fn default() -> Self {
        HoldQueue {
            order: BTreeMap::new(),
            lanes: HashMap::new(),
            len: 0,
        }
    }
}

impl<T> HoldQueue<T> {
    /// Requests held, set aside ones included.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What can happen to the queue.
#[derive(Debug)]
pub(super) enum Event<T> {
    /// A request is held (a request held again keeps its first ticket).
    Held(Held<T>),
    /// A release slot is free: the first request of the release order goes.
    SlotFree,
    /// The released request of a lane was answered (its response head came
    /// back, its attempt failed or ended, or it was never sent).
    Answered(ObjectLane),
    /// A held request left: its hold ended or its client went away.
    Left {
        ticket: Ticket,
        lane: Option<ObjectLane>,
    },
}

/// Applies `event` to `queue`; returns the request that left the queue, if
/// the event took one out. The whole table:
///
/// | event | when | becomes | returned |
/// |---|---|---|---|
/// | `Held` | no lane | in the release order at its ticket's place | - |
/// | `Held(lane)` | the lane has a request released and not answered, or an earlier one in the release order | set aside in its lane, at its ticket's place | - |
/// | `Held(lane)` | the lane's request in the release order is a later one (this one is held again) | in the release order; that later one set aside | - |
/// | `Held(lane)` | otherwise | in the release order | - |
/// | `SlotFree` | the release order is empty | unchanged (set-aside requests wait for their lane) | - |
/// | `SlotFree` | | the first of the release order leaves; its lane has it released | that request |
/// | `Answered(lane)` | | the lane has none released; its first set-aside request joins the release order | - |
/// | `Left` | in the release order | removed; its lane's first set-aside request takes its place | that request |
/// | `Left` | set aside | removed | that request |
/// | `Left` | not held (released already, or never held) | unchanged | - |
pub(super) fn step<T>(queue: &mut HoldQueue<T>, event: Event<T>) -> Option<Held<T>> {
    match event {
        Event::Held(held) => {
            hold(queue, held);
            None
        }
        Event::SlotFree => release_first(queue),
        Event::Answered(lane) => {
            if let Some(state) = queue.lanes.get_mut(&lane) {
                state.released = false;
            }
            promote(queue, lane);
            None
        }
        Event::Left { ticket, lane } => leave(queue, ticket, lane),
    }
}

/// The `Held` rows.
fn hold<T>(queue: &mut HoldQueue<T>, held: Held<T>) {
    queue.len += 1;
    let Held {
        ticket,
        lane,
        waiter,
    } = held;
    let Some(lane) = lane else {
        queue.order.insert(ticket, (None, waiter));
        return;
    };
    let state = queue.lanes.entry(lane).or_default();
    match state.next {
        _ if state.released => {
            state.behind.insert(ticket, waiter);
        }
        Some(next) if next < ticket => {
            state.behind.insert(ticket, waiter);
        }
        Some(later) => {
            state.next = Some(ticket);
            if let Some((_, waiter)) = queue.order.remove(&later) {
                state.behind.insert(later, waiter);
            }
            queue.order.insert(ticket, (Some(lane), waiter));
        }
        None => {
            state.next = Some(ticket);
            queue.order.insert(ticket, (Some(lane), waiter));
        }
    }
}

/// The `SlotFree` rows.
fn release_first<T>(queue: &mut HoldQueue<T>) -> Option<Held<T>> {
    let (ticket, (lane, waiter)) = queue.order.pop_first()?;
    queue.len -= 1;
    if let Some(state) = lane.and_then(|lane| queue.lanes.get_mut(&lane)) {
        state.next = None;
        state.released = true;
    }
    Some(Held {
        ticket,
        lane,
        waiter,
    })
}

/// The `Left` rows.
fn leave<T>(queue: &mut HoldQueue<T>, ticket: Ticket, lane: Option<ObjectLane>) -> Option<Held<T>> {
    let waiter = match queue.order.remove(&ticket) {
        Some((_, waiter)) => {
            if let Some(state) = lane.and_then(|lane| queue.lanes.get_mut(&lane)) {
                state.next = None;
            }
            waiter
        }
        None => lane
            .and_then(|lane| queue.lanes.get_mut(&lane))
            .and_then(|state| state.behind.remove(&ticket))?,
    };
    queue.len -= 1;
    if let Some(lane) = lane {
        promote(queue, lane);
    }
    Some(Held {
        ticket,
        lane,
        waiter,
    })
}

/// Moves the lane's first set-aside request into the release order when
/// the lane has none released and none there; forgets an idle lane.
fn promote<T>(queue: &mut HoldQueue<T>, lane: ObjectLane) {
    let Some(state) = queue.lanes.get_mut(&lane) else {
        return;
    };
    if !state.released
        && state.next.is_none()
        && let Some((ticket, waiter)) = state.behind.pop_first()
    {
        state.next = Some(ticket);
        queue.order.insert(ticket, (Some(lane), waiter));
    }
    if state.is_idle() {
        queue.lanes.remove(&lane);
    }
}
