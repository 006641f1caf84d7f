//! The gate's state machine: what the proxy believes about the backend, and
//! every rule that changes that belief, in one function, [`step`].
//!
//! The machine knows nothing of the hold queue, channels or observers: the
//! [`super::Gate`] feeds it [`Event`]s under its lock and acts on the
//! [`Transition`] it returns (publishing the phase, releasing held requests,
//! telling observers).

use std::time::Duration;

use tokio::time::Instant;

use super::{DownReason, Phase, Transition};

/// What the proxy believes about the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Up,
    Down {
        reason: DownReason,
        since: Instant,
    },
    /// The backend is back; held requests are being released.
    Resuming {
        outage_started: Instant,
    },
}

impl State {
    pub(super) fn phase(&self) -> Phase {
        match self {
            State::Up => Phase::Up,
            State::Down { .. } => Phase::Down,
            State::Resuming { .. } => Phase::Resuming,
        }
    }
}

/// An admin pause in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pause {
    pub(super) started: Instant,
    /// The pause ends by itself once the old backend went away and a new one serves.
    pub(super) backend_seen_gone: bool,
}

/// Everything [`step`] reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Machine {
    pub(super) state: State,
    /// When the phase last changed.
    pub(super) changed_at: Instant,
    pub(super) pause: Option<Pause>,
    /// Discovery says no endpoint is usable: a serving probe must not resume.
    pub(super) discovery_hold: bool,
    /// Outages so far: what a connection made before the last one failing
    /// says nothing about the backend serving since.
    pub(super) generation: u64,
    /// Crash suspects the proxy is yet to send again: every other request
    /// waits for them before it is sent (see [`crate::quarantine`]).
    pub(super) suspects_due: usize,
}

impl Machine {
    /// Up, unpaused, generation 0.
    pub(super) fn new(now: Instant) -> Machine {
        Machine {
            state: State::Up,
            changed_at: now,
            pause: None,
            discovery_hold: false,
            generation: 0,
            suspects_due: 0,
        }
    }
}

/// What can happen to the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// A request that began in `generation` saw the backend fail, and the
    /// failure is an outage: a refused connect (conclusive by itself), or a
    /// reset or hang that a check on a fresh connection confirmed.
    Failed { reason: DownReason, generation: u64 },
    /// A request got an answer from the backend.
    Answered,
    /// The probe's verdict; a pause ends after `max_pause`.
    Probed { serving: bool, max_pause: Duration },
    /// An operator (or the pause Lease) paused traffic.
    Pause,
    /// The operator ended the pause.
    Resume,
    /// Discovery has no usable endpoint.
    NoEndpoint,
    /// Discovery has a usable endpoint again.
    EndpointUsable,
    /// Discovery moved the target to a new endpoint.
    Moved,
    /// The paused backend closed the pause's sentinel connection.
    BackendGone,
    /// A resuming gate released its last held request.
    Drained,
    /// A request the backend died with (a crash suspect) is to be sent again.
    SuspectDue,
    /// A due suspect's next attempt concluded, or its request ended.
    SuspectSent,
}

/// Applies `event` at `now` to `machine`; returns the phase change, if the
/// event made one. The whole table (any event not listed for a state leaves
/// the machine as it is):
///
/// | state | event | when | becomes | reported |
/// |---|---|---|---|---|
/// | any | `Failed` | of an earlier generation | unchanged (a connection to the previous backend) | - |
/// | Up, Resuming | `Failed(r)` | | Down(r), next generation; a pause notes the backend gone | to Down |
/// | Down | `Failed` | | unchanged (keeps its reason); a pause notes the backend gone | - |
/// | Down(r) | `Answered` | no pause, no discovery hold, r is not discovery | Resuming | Down to Resuming |
/// | any | `Probed` | paused, pause not over: neither `max_pause` old nor the backend back after it was seen gone | unchanged; a failed probe notes the backend gone | - |
/// | any | `Probed` | paused, pause over | the pause ends, then as unpaused | |
/// | Down | `Probed(serving)` | no discovery hold | Resuming | Down to Resuming |
/// | Down(admin_pause) | `Probed` | otherwise | Down(probe_failed): the pause ended, the backend is not back | - |
/// | Up, Resuming | `Pause` | not paused | Down(admin_pause), next generation; paused | to Down |
/// | Down | `Pause` | not paused | unchanged; paused, the backend already gone | - |
/// | Down(admin_pause) | `Resume` | paused, discovery hold | Down(discovery); the pause ends | - |
/// | Down(admin_pause) | `Resume` | paused | Resuming; the pause ends | Down to Resuming |
/// | other | `Resume` | | the pause ends | - |
/// | Up, Resuming | `NoEndpoint` | | Down(discovery), next generation; discovery hold | to Down |
/// | Down | `NoEndpoint` | | discovery hold | - |
/// | any | `EndpointUsable` | | no discovery hold (the probe decides) | - |
/// | Up, Resuming | `Moved` | | Down(discovery), next generation; no discovery hold | to Down |
/// | Down | `Moved` | | no discovery hold (the probe decides) | - |
/// | any | `BackendGone` | paused | the pause notes the backend gone | - |
/// | Resuming | `Drained` | | Up | Resuming to Up (with the outage's length) |
/// | any | `SuspectDue` | | one more suspect due: other requests wait before they are sent | - |
/// | any | `SuspectSent` | | one suspect fewer due | - |
pub(super) fn step(machine: &mut Machine, event: Event, now: Instant) -> Option<Transition> {
    match event {
        Event::Failed { generation, .. } if generation != machine.generation => None,
        Event::Failed { reason, .. } => {
            note_backend_gone(machine);
            go_down(machine, reason, now)
        }
        Event::Answered => match machine.state {
            State::Down { reason, since }
                if machine.pause.is_none()
                    && !machine.discovery_hold
                    && reason != DownReason::Discovery =>
            {
                Some(go_resuming(machine, since, now))
            }
            _ => None,
        },
        Event::Probed { serving, max_pause } => probed(machine, serving, max_pause, now),
        Event::Pause if machine.pause.is_some() => None,
        Event::Pause => {
            machine.pause = Some(Pause {
                started: now,
                backend_seen_gone: matches!(machine.state, State::Down { .. }),
            });
            go_down(machine, DownReason::AdminPause, now)
        }
        Event::Resume => machine.pause.take().and_then(|_| resumed(machine, now)),
        Event::NoEndpoint => {
            machine.discovery_hold = true;
            go_down(machine, DownReason::Discovery, now)
        }
        Event::EndpointUsable => {
            machine.discovery_hold = false;
            None
        }
        Event::Moved => {
            machine.discovery_hold = false;
            go_down(machine, DownReason::Discovery, now)
        }
        Event::BackendGone => {
            note_backend_gone(machine);
            None
        }
        Event::Drained => match machine.state {
            State::Resuming { outage_started } => {
                set_state(machine, State::Up, now);
                Some(Transition {
                    from: Phase::Resuming,
                    to: Phase::Up,
                    reason: None,
                    outage: Some(now - outage_started),
                })
            }
            _ => None,
        },
        Event::SuspectDue => {
            machine.suspects_due += 1;
            None
        }
        Event::SuspectSent => {
            machine.suspects_due = machine.suspects_due.saturating_sub(1);
            None
        }
    }
}

/// The probe's verdict: first whether a pause is over, then whether the
/// backend is back.
fn probed(
    machine: &mut Machine,
    serving: bool,
    max_pause: Duration,
    now: Instant,
) -> Option<Transition> {
    if let Some(pause) = machine.pause.as_mut() {
        let expired = now - pause.started >= max_pause;
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
        machine.pause = None;
    }
    match machine.state {
        State::Down { since, .. } if serving && !machine.discovery_hold => {
            Some(go_resuming(machine, since, now))
        }
        State::Down {
            reason: DownReason::AdminPause,
            since,
        } => {
            machine.state = State::Down {
                reason: DownReason::ProbeFailed,
                since,
            };
            None
        }
        _ => None,
    }
}

/// The state once an admin pause was lifted.
fn resumed(machine: &mut Machine, now: Instant) -> Option<Transition> {
    match machine.state {
        State::Down {
            reason: DownReason::AdminPause,
            since,
        } if machine.discovery_hold => {
            machine.state = State::Down {
                reason: DownReason::Discovery,
                since,
            };
            None
        }
        State::Down {
            reason: DownReason::AdminPause,
            since,
        } => Some(go_resuming(machine, since, now)),
        _ => None,
    }
}

fn note_backend_gone(machine: &mut Machine) {
    if let Some(pause) = machine.pause.as_mut() {
        pause.backend_seen_gone = true;
    }
}

/// Takes an Up or Resuming machine down for `reason` and starts a new
/// generation; a machine already down keeps its reason.
fn go_down(machine: &mut Machine, reason: DownReason, now: Instant) -> Option<Transition> {
    if let State::Down { .. } = machine.state {
        return None;
    }
    let from = machine.state.phase();
    machine.generation += 1;
    set_state(machine, State::Down { reason, since: now }, now);
    Some(Transition {
        from,
        to: Phase::Down,
        reason: Some(reason),
        outage: None,
    })
}

fn go_resuming(machine: &mut Machine, outage_started: Instant, now: Instant) -> Transition {
    set_state(machine, State::Resuming { outage_started }, now);
    Transition {
        from: Phase::Down,
        to: Phase::Resuming,
        reason: None,
        outage: Some(now - outage_started),
    }
}

fn set_state(machine: &mut Machine, state: State, now: Instant) {
    machine.state = state;
    machine.changed_at = now;
}
