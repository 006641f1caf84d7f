//! Tests of the gate: its queue and public methods with paused time, and
//! [`machine::step`] and [`queue::step`] row by row against their tables.

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

/// A confirmed failure on the backend serving now.
fn down(gate: &Arc<Gate>, reason: DownReason) {
    gate.mark_down(reason, gate.generation());
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
    tokio::spawn(async move { gate.admit_from(ticket, || from(client), far()).await })
}

/// Held as a request of `client`, with no lane.
fn from(client: u64) -> HeldAs {
    HeldAs {
        client: ClientKey(client),
        lane: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_holding_its_share_is_refused_while_others_still_queue() {
    let gate = Gate::new(GateSettings {
        max_held_per_client: 2,
        ..settings()
    });
    down(&gate, DownReason::Refused);
    let first = hold_from(&gate, 1);
    let second = hold_from(&gate, 1);
    settle_tasks().await;
    let third = gate.admit_from(gate.ticket(), || from(1), far()).await;
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
async fn only_an_up_gate_with_nobody_queued_admits_without_waiting() {
    let gate = Gate::new(settings());
    assert!(gate.admit_at_once().is_some_and(|a| !a.was_held()));
    down(&gate, DownReason::Refused);
    assert!(gate.admit_at_once().is_none(), "down");
    let held: Vec<_> = (0..3).map(|_| hold(&gate)).collect();
    settle_tasks().await;
    gate.probe_result(true);
    settle_tasks().await;
    assert!(
        gate.admit_at_once().is_none(),
        "one held request still waits its turn to be released"
    );
    for request in held {
        request.await.unwrap().unwrap().settle();
    }
    assert!(gate.admit_at_once().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_down_gate_holds_until_the_probe_sees_the_backend() {
    let gate = Gate::new(settings());
    down(&gate, DownReason::Refused);
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
    down(&gate, DownReason::Reset);
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
    down(&gate, DownReason::Refused);
    let _held: Vec<_> = (0..3).map(|_| hold(&gate)).collect();
    settle_tasks().await;
    let overflow = gate.admit(gate.ticket(), far()).await;
    assert_eq!(overflow.unwrap_err(), Rejection::QueueFull);
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_at_its_deadline() {
    let gate = Gate::new(settings());
    down(&gate, DownReason::Refused);
    let deadline = Instant::now() + Duration::from_secs(2);
    let result = gate.admit(gate.ticket(), deadline).await;
    assert_eq!(result.unwrap_err(), Rejection::HoldTimeout);
    assert_eq!(Instant::now(), deadline);
    assert_eq!(gate.status().held, 0);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_frees_its_slot() {
    let gate = Gate::new(settings());
    down(&gate, DownReason::Refused);
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
    down(&gate, DownReason::Refused);
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
    down(&gate, DownReason::Refused);
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
    down(&gate, DownReason::Refused);
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
    down(&gate, DownReason::Refused);
    tokio::time::advance(Duration::from_millis(700)).await;
    gate.probe_result(true);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].to, Phase::Down);
    assert_eq!(seen[1].to, Phase::Up);
    assert_eq!(seen[1].outage, Some(Duration::from_millis(700)));
}

#[tokio::test(start_paused = true)]
async fn other_requests_wait_until_every_due_suspect_was_sent_again() {
    let gate = Gate::new(settings());
    let deadline = Instant::now() + Duration::from_secs(30);
    assert!(gate.suspects_sent(deadline).await.is_some(), "none due");

    let first = gate.suspect_due();
    let second = gate.suspect_due();
    let waiting = tokio::spawn({
        let gate = Arc::clone(&gate);
        async move { gate.suspects_sent(deadline).await }
    });
    drop(first);
    settle_tasks().await;
    assert!(!waiting.is_finished(), "one suspect is still due");
    drop(second);
    assert!(waiting.await.unwrap().is_some());

    let _stuck = gate.suspect_due();
    assert!(
        gate.suspects_sent(deadline).await.is_none(),
        "waits no longer than the deadline"
    );
}

/// Holds a request for the object `lane` (client 0).
fn hold_for(gate: &Arc<Gate>, lane: u64) -> tokio::task::JoinHandle<Result<Admission, Rejection>> {
    let gate = Arc::clone(gate);
    let ticket = gate.ticket();
    let held_as = move || HeldAs {
        client: ClientKey(0),
        lane: Some(ObjectLane(lane)),
    };
    tokio::spawn(async move { gate.admit_from(ticket, held_as, far()).await })
}

/// Holds requests for the objects `lanes`, one after the other (each
/// queued before the next arrives), on a gate that is down.
async fn held_in_order(
    gate: &Arc<Gate>,
    lanes: &[u64],
) -> Vec<tokio::task::JoinHandle<Result<Admission, Rejection>>> {
    let mut held = Vec::new();
    for &lane in lanes {
        held.push(hold_for(gate, lane));
        settle_tasks().await;
    }
    held
}

#[tokio::test(start_paused = true)]
async fn held_requests_for_one_object_go_one_at_a_time_in_arrival_order() {
    let gate = Gate::new(settings());
    down(&gate, DownReason::Refused);
    let mut held = held_in_order(&gate, &[1, 1, 1]).await.into_iter();
    let (first, second, third) = (
        held.next().unwrap(),
        held.next().unwrap(),
        held.next().unwrap(),
    );
    gate.probe_result(true);
    settle_tasks().await;
    assert!(first.is_finished());
    assert!(!second.is_finished(), "waits for the first to be answered");
    let mut first = first.await.unwrap().unwrap();
    first.settle();
    let second = second.await.unwrap().unwrap();
    settle_tasks().await;
    assert!(!third.is_finished(), "waits for the second");
    drop(second);
    third.await.unwrap().unwrap();
    assert_eq!(gate.status().phase, Phase::Up);
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_its_object_holds_no_slot_and_blocks_no_other_object() {
    let gate = Gate::new(GateSettings {
        max_held: 4,
        max_held_per_client: 4,
        ..settings()
    });
    down(&gate, DownReason::Refused);
    let held = held_in_order(&gate, &[1, 1, 2, 3]).await;
    let [put, delete, other, last] = <[_; 4]>::try_from(held).unwrap();
    gate.probe_result(true);
    settle_tasks().await;
    assert!(
        put.is_finished() && other.is_finished(),
        "two slots, two objects"
    );
    assert!(!delete.is_finished() && !last.is_finished());
    let mut other = other.await.unwrap().unwrap();
    other.settle();
    settle_tasks().await;
    assert!(last.is_finished(), "the free slot goes to the next object");
    assert!(
        !delete.is_finished(),
        "its object's request is still unanswered"
    );
    let mut put = put.await.unwrap().unwrap();
    put.settle();
    assert!(delete.await.unwrap().unwrap().was_held());
}

#[tokio::test(start_paused = true)]
async fn requests_arriving_while_one_waits_for_its_object_queue_and_pass_it() {
    let gate = Gate::new(settings());
    down(&gate, DownReason::Refused);
    let [put, delete] = <[_; 2]>::try_from(held_in_order(&gate, &[1, 1]).await).unwrap();
    gate.probe_result(true);
    settle_tasks().await;
    assert_eq!(gate.status().phase, Phase::Resuming, "one still held");
    let late = hold_for(&gate, 2);
    settle_tasks().await;
    assert!(
        late.await.unwrap().unwrap().was_held(),
        "queued, then released"
    );
    assert!(!delete.is_finished());
    drop(put.await.unwrap().unwrap());
    delete.await.unwrap().unwrap();
    assert_eq!(gate.status().phase, Phase::Up);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_leaves_while_waiting_for_its_object_frees_its_place() {
    let gate = Gate::new(settings());
    down(&gate, DownReason::Refused);
    let [put, delete] = <[_; 2]>::try_from(held_in_order(&gate, &[1, 1]).await).unwrap();
    gate.probe_result(true);
    settle_tasks().await;
    delete.abort();
    settle_tasks().await;
    assert_eq!(gate.status().held, 0);
    assert_eq!(gate.status().phase, Phase::Up, "nothing left to release");
    drop(put.await.unwrap().unwrap());
    let again = hold_for(&gate, 1);
    assert!(!again.await.unwrap().unwrap().was_held(), "the gate is up");
}

/// [`queue::step`], one test per row of its table (pure: no gate).
mod queue_table {
    use super::*;
    use queue::{Event, Held, HoldQueue, step};

    const LANE: ObjectLane = ObjectLane(7);

    fn held(ticket: u64, lane: Option<ObjectLane>) -> Event<u64> {
        Event::Held(Held {
            ticket: Ticket(ticket),
            lane,
            waiter: ticket,
        })
    }

    /// A queue that was given `events` in order.
    fn queue(events: Vec<Event<u64>>) -> HoldQueue<u64> {
        let mut queue = HoldQueue::default();
        for event in events {
            step(&mut queue, event);
        }
        queue
    }

    /// The tickets released, one `SlotFree` at a time, until none goes.
    fn released(queue: &mut HoldQueue<u64>) -> Vec<u64> {
        std::iter::from_fn(|| step(queue, Event::SlotFree).map(|held| held.waiter)).collect()
    }

    fn left(ticket: u64, lane: Option<ObjectLane>) -> Event<u64> {
        Event::Left {
            ticket: Ticket(ticket),
            lane,
        }
    }

    #[test]
    fn a_request_without_a_lane_goes_at_its_tickets_place() {
        let mut queue = queue(vec![held(2, None), held(1, None), held(3, None)]);
        assert_eq!(queue.len(), 3);
        assert_eq!(released(&mut queue), [1, 2, 3]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_request_behind_one_of_its_lane_is_set_aside() {
        let mut queue = queue(vec![
            held(1, Some(LANE)),
            held(2, Some(LANE)),
            held(3, None),
        ]);
        assert_eq!(released(&mut queue), [1, 3], "2 waits for 1, 3 passes it");
        assert_eq!(queue.len(), 1);
        step(&mut queue, held(4, Some(LANE)));
        assert_eq!(
            released(&mut queue),
            [] as [u64; 0],
            "1 is not answered yet"
        );
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn a_request_held_again_goes_before_the_later_ones_of_its_lane() {
        let mut queue = queue(vec![held(2, Some(LANE)), held(1, Some(LANE))]);
        assert_eq!(released(&mut queue), [1]);
        step(&mut queue, Event::Answered(LANE));
        assert_eq!(released(&mut queue), [2]);
    }

    #[test]
    fn the_first_of_an_idle_lane_goes_in_the_release_order() {
        let other = ObjectLane(8);
        let mut queue = queue(vec![
            held(1, Some(LANE)),
            held(2, Some(other)),
            held(3, None),
        ]);
        assert_eq!(released(&mut queue), [1, 2, 3]);
    }

    #[test]
    fn a_free_slot_with_only_set_aside_requests_releases_nothing() {
        let mut queue = queue(vec![]);
        assert!(step(&mut queue, Event::SlotFree).is_none());
        let mut queue = queue_with_one_released_and_two_set_aside();
        assert!(step(&mut queue, Event::SlotFree).is_none());
        assert_eq!(queue.len(), 2);
    }

    /// Lane 7: ticket 1 released and unanswered; 2 and 3 set aside.
    fn queue_with_one_released_and_two_set_aside() -> HoldQueue<u64> {
        let mut queue = queue(vec![
            held(1, Some(LANE)),
            held(2, Some(LANE)),
            held(3, Some(LANE)),
        ]);
        assert_eq!(released(&mut queue), [1]);
        queue
    }

    #[test]
    fn a_released_request_goes_with_its_lane() {
        let mut queue = queue(vec![held(1, Some(LANE))]);
        let first = step(&mut queue, Event::SlotFree).unwrap();
        assert_eq!(first.ticket, Ticket(1));
        assert_eq!(first.lane, Some(LANE));
    }

    #[test]
    fn an_answer_lets_the_next_of_its_lane_go_one_at_a_time() {
        let mut queue = queue_with_one_released_and_two_set_aside();
        step(&mut queue, Event::Answered(LANE));
        assert_eq!(released(&mut queue), [2]);
        step(&mut queue, Event::Answered(LANE));
        assert_eq!(released(&mut queue), [3]);
        step(&mut queue, Event::Answered(LANE));
        assert!(queue.is_empty());
        assert_eq!(
            format!("{queue:?}"),
            format!("{:?}", HoldQueue::<u64>::default()),
            "idle lanes are forgotten"
        );
    }

    #[test]
    fn one_that_leaves_the_release_order_makes_way_for_the_next_of_its_lane() {
        let mut queue = queue(vec![held(1, Some(LANE)), held(2, Some(LANE))]);
        let gone = step(&mut queue, left(1, Some(LANE))).unwrap();
        assert_eq!(gone.waiter, 1);
        assert_eq!(queue.len(), 1);
        assert_eq!(released(&mut queue), [2]);
    }

    #[test]
    fn one_that_leaves_while_set_aside_is_removed() {
        let mut queue = queue_with_one_released_and_two_set_aside();
        assert_eq!(step(&mut queue, left(2, Some(LANE))).unwrap().waiter, 2);
        assert_eq!(queue.len(), 1);
        step(&mut queue, Event::Answered(LANE));
        assert_eq!(released(&mut queue), [3]);
    }

    #[test]
    fn one_that_leaves_after_its_release_changes_nothing() {
        let mut queue = queue_with_one_released_and_two_set_aside();
        assert!(step(&mut queue, left(1, Some(LANE))).is_none());
        assert!(step(&mut queue, left(9, None)).is_none());
        assert_eq!(queue.len(), 2);
        assert!(
            step(&mut queue, Event::SlotFree).is_none(),
            "1 is still unanswered"
        );
    }
}

/// [`machine::step`], one test per row of its table (pure: no gate, no
/// queue, times given).
mod step_table {
    use super::*;
    use machine::{Pause, step};

    const MAX_PAUSE: Duration = Duration::from_secs(60);

    fn t(seconds: u64) -> Instant {
        // One origin for every test: the rows compare instants only.
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now) + Duration::from_secs(seconds)
    }

    fn up() -> Machine {
        Machine::new(t(0))
    }

    /// Down for `reason` since t(0), in generation 1.
    fn down_for(reason: DownReason) -> Machine {
        Machine {
            state: State::Down {
                reason,
                since: t(0),
            },
            generation: 1,
            ..up()
        }
    }

    /// Resuming from an outage that began at t(0), in generation 1.
    fn resuming() -> Machine {
        Machine {
            state: State::Resuming {
                outage_started: t(0),
            },
            generation: 1,
            ..up()
        }
    }

    /// Paused at t(0), with the backend gone or not.
    fn paused(backend_seen_gone: bool) -> Machine {
        Machine {
            pause: Some(Pause {
                started: t(0),
                backend_seen_gone,
            }),
            ..down_for(DownReason::AdminPause)
        }
    }

    fn failed(reason: DownReason, generation: u64) -> Event {
        Event::Failed { reason, generation }
    }

    fn probed(serving: bool) -> Event {
        Event::Probed {
            serving,
            max_pause: MAX_PAUSE,
        }
    }

    fn to_down(from: Phase, reason: DownReason) -> Option<Transition> {
        Some(Transition {
            from,
            to: Phase::Down,
            reason: Some(reason),
            outage: None,
        })
    }

    fn to_resuming(outage: u64) -> Option<Transition> {
        Some(Transition {
            from: Phase::Down,
            to: Phase::Resuming,
            reason: None,
            outage: Some(Duration::from_secs(outage)),
        })
    }

    /// Asserts that `event` at t(1) leaves `machine` exactly as it was.
    fn unchanged(mut machine: Machine, event: Event) {
        let before = machine.clone();
        assert_eq!(step(&mut machine, event, t(1)), None, "{event:?}");
        assert_eq!(machine, before, "{event:?}");
    }

    #[test]
    fn a_failure_of_an_earlier_generation_changes_nothing() {
        unchanged(resuming(), failed(DownReason::Reset, 0));
        unchanged(paused(false), failed(DownReason::Reset, 0));
    }

    #[test]
    fn a_failure_takes_up_and_resuming_down_into_a_new_generation() {
        for (mut machine, from) in [(up(), Phase::Up), (resuming(), Phase::Resuming)] {
            let generation = machine.generation;
            let made = step(&mut machine, failed(DownReason::Reset, generation), t(1));
            assert_eq!(made, to_down(from, DownReason::Reset));
            assert_eq!(
                machine.state,
                State::Down {
                    reason: DownReason::Reset,
                    since: t(1)
                }
            );
            assert_eq!(machine.generation, generation + 1);
            assert_eq!(machine.changed_at, t(1));
        }
    }

    #[test]
    fn a_failure_keeps_a_down_gate_down_with_its_reason_and_tells_a_pause() {
        let mut machine = paused(false);
        assert_eq!(step(&mut machine, failed(DownReason::Reset, 1), t(1)), None);
        assert_eq!(machine.state, paused(false).state);
        assert!(machine.pause.unwrap().backend_seen_gone);
    }

    #[test]
    fn an_answer_resumes_a_gate_down_for_a_failure_only() {
        let mut machine = down_for(DownReason::Reset);
        assert_eq!(step(&mut machine, Event::Answered, t(2)), to_resuming(2));
        assert_eq!(
            machine.state,
            State::Resuming {
                outage_started: t(0)
            }
        );
        unchanged(paused(true), Event::Answered);
        unchanged(down_for(DownReason::Discovery), Event::Answered);
        let held = Machine {
            discovery_hold: true,
            ..down_for(DownReason::Refused)
        };
        unchanged(held, Event::Answered);
        unchanged(up(), Event::Answered);
        unchanged(resuming(), Event::Answered);
    }

    #[test]
    fn a_probe_during_a_pause_that_is_not_over_changes_nothing_but_notes_the_backend_gone() {
        unchanged(paused(false), probed(true));
        let mut machine = paused(false);
        assert_eq!(step(&mut machine, probed(false), t(1)), None);
        assert_eq!(machine.state, paused(false).state);
        assert!(machine.pause.unwrap().backend_seen_gone);
    }

    #[test]
    fn a_pause_is_over_when_the_backend_came_back_or_after_max_pause() {
        let mut replaced = paused(true);
        assert_eq!(step(&mut replaced, probed(true), t(1)), to_resuming(1));
        assert_eq!(replaced.pause, None);
        let mut expired = paused(false);
        assert_eq!(step(&mut expired, probed(true), t(60)), to_resuming(60));
        assert_eq!(expired.pause, None);
    }

    #[test]
    fn a_serving_probe_resumes_a_down_gate_unless_discovery_holds() {
        let mut machine = down_for(DownReason::Refused);
        assert_eq!(step(&mut machine, probed(true), t(3)), to_resuming(3));
        let held = Machine {
            discovery_hold: true,
            ..down_for(DownReason::Refused)
        };
        unchanged(held, probed(true));
        unchanged(down_for(DownReason::Refused), probed(false));
        unchanged(up(), probed(true));
    }

    #[test]
    fn a_pause_that_ends_without_the_backend_back_turns_into_probe_failed() {
        let mut machine = paused(false);
        assert_eq!(step(&mut machine, probed(false), t(60)), None);
        assert_eq!(
            machine.state,
            State::Down {
                reason: DownReason::ProbeFailed,
                since: t(0)
            }
        );
        assert_eq!(machine.pause, None);
        assert_eq!(machine.changed_at, t(0), "the phase did not change");
    }

    #[test]
    fn a_pause_takes_up_and_resuming_down() {
        for (mut machine, from) in [(up(), Phase::Up), (resuming(), Phase::Resuming)] {
            let generation = machine.generation;
            let made = step(&mut machine, Event::Pause, t(1));
            assert_eq!(made, to_down(from, DownReason::AdminPause));
            assert_eq!(machine.generation, generation + 1);
            assert_eq!(
                machine.pause,
                Some(Pause {
                    started: t(1),
                    backend_seen_gone: false
                })
            );
        }
    }

    #[test]
    fn a_pause_of_a_down_gate_knows_the_backend_gone_and_a_second_pause_changes_nothing() {
        let mut machine = down_for(DownReason::Refused);
        assert_eq!(step(&mut machine, Event::Pause, t(1)), None);
        assert_eq!(machine.state, down_for(DownReason::Refused).state);
        assert!(machine.pause.unwrap().backend_seen_gone);
        unchanged(paused(false), Event::Pause);
    }

    #[test]
    fn resume_under_a_discovery_hold_stays_down_for_discovery() {
        let mut machine = Machine {
            discovery_hold: true,
            ..paused(false)
        };
        assert_eq!(step(&mut machine, Event::Resume, t(1)), None);
        assert_eq!(
            machine.state,
            State::Down {
                reason: DownReason::Discovery,
                since: t(0)
            }
        );
        assert_eq!(machine.pause, None);
    }

    #[test]
    fn resume_resumes_a_paused_gate() {
        let mut machine = paused(false);
        assert_eq!(step(&mut machine, Event::Resume, t(4)), to_resuming(4));
        assert_eq!(machine.pause, None);
    }

    #[test]
    fn resume_of_a_gate_down_for_another_reason_only_ends_the_pause() {
        let mut machine = Machine {
            pause: paused(true).pause,
            ..down_for(DownReason::Refused)
        };
        assert_eq!(step(&mut machine, Event::Resume, t(1)), None);
        assert_eq!(machine.state, down_for(DownReason::Refused).state);
        assert_eq!(machine.pause, None);
        unchanged(up(), Event::Resume);
    }

    #[test]
    fn no_endpoint_holds_for_discovery() {
        let mut machine = up();
        let made = step(&mut machine, Event::NoEndpoint, t(1));
        assert_eq!(made, to_down(Phase::Up, DownReason::Discovery));
        assert!(machine.discovery_hold);
        let mut machine = down_for(DownReason::Refused);
        assert_eq!(step(&mut machine, Event::NoEndpoint, t(1)), None);
        assert_eq!(machine.state, down_for(DownReason::Refused).state);
        assert!(machine.discovery_hold);
    }

    #[test]
    fn a_usable_endpoint_lifts_the_discovery_hold_and_nothing_else() {
        let mut machine = Machine {
            discovery_hold: true,
            ..down_for(DownReason::Discovery)
        };
        assert_eq!(step(&mut machine, Event::EndpointUsable, t(1)), None);
        assert_eq!(machine, down_for(DownReason::Discovery));
    }

    #[test]
    fn a_move_holds_until_the_probe_sees_the_new_backend() {
        let mut machine = up();
        let made = step(&mut machine, Event::Moved, t(1));
        assert_eq!(made, to_down(Phase::Up, DownReason::Discovery));
        assert!(!machine.discovery_hold);
        let mut machine = Machine {
            discovery_hold: true,
            ..down_for(DownReason::Discovery)
        };
        assert_eq!(step(&mut machine, Event::Moved, t(1)), None);
        assert_eq!(machine, down_for(DownReason::Discovery));
    }

    #[test]
    fn a_gone_backend_is_noted_by_a_pause_only() {
        let mut machine = paused(false);
        assert_eq!(step(&mut machine, Event::BackendGone, t(1)), None);
        assert_eq!(machine, paused(true));
        unchanged(down_for(DownReason::Refused), Event::BackendGone);
    }

    #[test]
    fn drained_ends_a_resume_with_the_outage_length() {
        let mut machine = resuming();
        let made = step(&mut machine, Event::Drained, t(5));
        assert_eq!(
            made,
            Some(Transition {
                from: Phase::Resuming,
                to: Phase::Up,
                reason: None,
                outage: Some(Duration::from_secs(5)),
            })
        );
        assert_eq!(machine.state, State::Up);
        assert_eq!(machine.changed_at, t(5));
        unchanged(down_for(DownReason::Refused), Event::Drained);
    }

    #[test]
    fn suspects_due_are_counted_and_change_nothing_else() {
        let mut machine = down_for(DownReason::Refused);
        assert_eq!(step(&mut machine, Event::SuspectDue, t(1)), None);
        assert_eq!(machine.suspects_due, 1);
        assert_eq!(step(&mut machine, Event::SuspectSent, t(2)), None);
        assert_eq!(machine, down_for(DownReason::Refused));
    }
}
