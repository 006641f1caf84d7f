//! Whether an HTTP/2 client takes the responses it is sent.
//!
//! Over HTTP/1.1 a client that stops reading stops the socket, and
//! [`crate::send_timeout`] sees it. Over HTTP/2 one stream can stall while the
//! connection lives on: the client answers PINGs but never opens the stream's
//! flow-control window (RFC 9113 section 5.2), so hyper never asks the
//! response body for more, and the backend request behind it is held for as
//! long as the client likes. Each streaming response of an HTTP/2 connection
//! therefore keeps a [`Pace`]: when hyper last asked it for data, and whether
//! it then had to wait for the backend. A response that had data ready but
//! was not asked again for `listener.send_timeout` means the client stopped
//! taking it; the connection's reader then ends the connection (as nginx's
//! `send_timeout` does for a connection it cannot write to).

use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;

use tokio::time::Instant;

/// The paces of one connection's streaming responses.
#[derive(Debug, Default)]
pub struct Paces {
    responses: Mutex<Vec<Weak<Pace>>>,
    /// The connection's reader, woken when a response may start to stall
    /// (it had been waiting for the backend, or it is new), so that it arms
    /// its timer even if the client sends nothing more.
    reader: Mutex<Option<Waker>>,
}

/// One streaming response's pace; it ends when the response does.
#[derive(Debug)]
pub struct Pace {
    state: Mutex<PaceState>,
    owner: Weak<Paces>,
}

#[derive(Debug, Clone, Copy)]
struct PaceState {
    /// When hyper last asked for data (or the response started).
    asked: Instant,
    /// The last ask found no backend data yet: the wait is the backend's.
    waiting_on_backend: bool,
}

impl Paces {
    /// Starts following a response.
    pub fn track(self: &Arc<Self>) -> Arc<Pace> {
        let pace = Arc::new(Pace {
            state: Mutex::new(PaceState {
                asked: Instant::now(),
                waiting_on_backend: false,
            }),
            owner: Arc::downgrade(self),
        });
        let mut responses = self.responses.lock().unwrap();
        responses.retain(|response| response.strong_count() > 0);
        responses.push(Arc::downgrade(&pace));
        drop(responses);
        self.wake_reader();
        pace
    }

    /// The connection's reader to wake when a response may start to stall.
    pub fn set_reader(&self, waker: &Waker) {
        let mut reader = self.reader.lock().unwrap();
        if !reader.as_ref().is_some_and(|known| known.will_wake(waker)) {
            *reader = Some(waker.clone());
        }
    }

    fn wake_reader(&self) {
        if let Some(reader) = self.reader.lock().unwrap().take() {
            reader.wake();
        }
    }

    /// Since when the oldest response with data to send has not been asked
    /// for it, if one has not.
    pub fn stalled_since(&self) -> Option<Instant> {
        let responses = self.responses.lock().unwrap();
        responses
            .iter()
            .filter_map(Weak::upgrade)
            .map(|pace| *pace.state.lock().unwrap())
            .filter(|state| !state.waiting_on_backend)
            .map(|state| state.asked)
            .min()
    }
}

impl Pace {
    /// hyper asked for data; `waiting_on_backend` when there was none yet.
    pub fn asked(&self, waiting_on_backend: bool) {
        let was_waiting = {
            let mut state = self.state.lock().unwrap();
            let was_waiting = state.waiting_on_backend;
            *state = PaceState {
                asked: Instant::now(),
                waiting_on_backend,
            };
            was_waiting
        };
        if was_waiting
            && !waiting_on_backend
            && let Some(owner) = self.owner.upgrade()
        {
            owner.wake_reader();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_response_not_asked_for_is_stalled_and_one_waiting_on_the_backend_is_not() {
        let paces = Arc::new(Paces::default());
        assert_eq!(paces.stalled_since(), None);
        let started = Instant::now();
        let waiting = paces.track();
        waiting.asked(true);
        assert_eq!(paces.stalled_since(), None, "the backend's wait");

        let stuck = paces.track();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(paces.stalled_since(), Some(started), "never asked again");
        stuck.asked(false);
        assert_eq!(paces.stalled_since(), Some(Instant::now()));
        drop(stuck);
        assert_eq!(
            paces.stalled_since(),
            None,
            "an ended response is forgotten"
        );
    }
}
