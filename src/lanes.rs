//! Lanes: the threads that serve client connections, one event loop each.
//!
//! tokio's multi-thread scheduler lets an idle worker steal the tasks of a
//! busy one, and wakes a sleeping worker whenever work arrives: with small
//! requests that is a thread woken and put back to sleep (a `futex` call and
//! a context switch) for about every request, and a connection's tasks run
//! on whichever thread is free, so the data each touches moves between the
//! cores' caches. A lane is one thread running a current-thread runtime:
//! every connection the [`crate::listener`] accepts is handed to one lane
//! (in turn) and lives there to the end, with the backend connections its
//! requests use ([`crate::upstream`] keeps a pool per lane) and its timers.
//! This is the thread-per-core design of HAProxy and nginx (one event loop
//! per thread or process, connections spread at accept). What the lanes
//! share (the gate, the probe, metrics, the admin listener) stays on the
//! main runtime and is reached through `Arc`s and tokio's thread-safe
//! channels.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The lane this thread runs, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// File descriptors each lane keeps open (counted with 101 lanes): its event
/// loop's epoll set twice (tokio keeps a duplicate for registering
/// sockets), the eventfd that wakes it, and its end of tokio's signal
/// pipe.
pub const FILE_DESCRIPTORS_PER_LANE: u64 = 4;

/// The lane the calling thread runs, or `None` off the lanes (the main
/// runtime, tests).
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The running lanes, until [`Lanes::stop`] or drop.
pub struct Lanes {
    lanes: Vec<Lane>,
    next: AtomicUsize,
}

struct Lane {
    handle: Handle,
    /// Taken to stop the lane, then its thread joined.
    running: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl Lanes {
    /// Starts `count` lanes (at least one), threads named `s3fp-lane-N`.
    ///
    /// # Errors
    /// The operating system refused a thread or a runtime's event loop.
    pub fn start(count: usize) -> io::Result<Lanes> {
        let lanes = (0..count.max(1))
            .map(Lane::start)
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Lanes {
            lanes,
            next: AtomicUsize::new(0),
        })
    }

    /// How many lanes run.
    pub fn count(&self) -> usize {
        self.lanes.len()
    }

    /// Runs `task` on the next lane in turn.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let lane = self.next.fetch_add(1, Ordering::Relaxed);
        self.spawn_on(lane, task);
    }

    /// Runs `task` on lane `lane` (modulo the lanes): a connection that
    /// comes back from rest goes back to the lane that served it, where
    /// its part of the backend pool is.
    pub fn spawn_on<F>(&self, lane: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.lanes[lane % self.lanes.len()].handle.spawn(task);
    }

    /// Stops every lane: the tasks still on them (connections past the
    /// shutdown grace) are dropped, which closes their sockets, and their
    /// threads are joined. Tasks spawned afterwards are dropped at once.
    pub fn stop(&self) {
        let running: Vec<_> = self
            .lanes
            .iter()
            .filter_map(|lane| lane.running.lock().unwrap().take())
            .collect();
        for (stop, thread) in running {
            drop(stop);
            let _ = thread.join();
        }
    }
}

impl Lane {
    fn start(index: usize) -> io::Result<Lane> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("s3fp-lane-{index}"))
            .spawn(move || {
                CURRENT.with(|current| current.set(Some(index)));
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Lane {
            handle,
            running: Mutex::new(Some((stop, thread))),
        })
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn tasks_go_to_the_lanes_in_turn_and_run_there() {
        let lanes = Lanes::start(2).unwrap();
        let (ran_on, ran) = mpsc::channel();
        for _ in 0..4 {
            let ran_on = ran_on.clone();
            lanes.spawn(async move { ran_on.send(current()).unwrap() });
        }
        let mut seen: Vec<_> = (0..4)
            .map(|_| ran.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, [Some(0), Some(0), Some(1), Some(1)]);
        assert_eq!(current(), None, "the caller is no lane");
    }

    #[test]
    fn stopping_drops_the_tasks_still_on_the_lanes() {
        struct Dropped(mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let lanes = Lanes::start(1).unwrap();
        let (dropped, was_dropped) = mpsc::channel();
        let (started, has_started) = mpsc::channel();
        lanes.spawn(async move {
            let _guard = Dropped(dropped);
            started.send(()).unwrap();
            std::future::pending::<()>().await;
        });
        has_started.recv_timeout(Duration::from_secs(10)).unwrap();
        lanes.stop();
        assert!(
            was_dropped.try_recv().is_ok(),
            "dropped by the time stop returns"
        );
    }
}
