//! One attempt's request body as the backend asked for it and received it.
//!
//! Two rules keep the backend from ever reading bytes it did not ask for
//! (request smuggling through a pooled connection):
//! - **`Expect: 100-continue` is honoured end to end** (RFC 9110 section
//!   10.1.1). A request that carries it sends no body byte until the backend
//!   answers `100 Continue`. Only then does the proxy read the client's body,
//!   which is when hyper sends the client its own `100`. A backend that
//!   answers with a final status instead never gets the body, and the client
//!   is never asked for it, exactly as without the proxy.
//! - **A connection on which the backend answered before the whole body was
//!   delivered is never reused**: the backend may take the rest for the next
//!   request. [`Delivery::complete`] says whether the body had ended when the
//!   response head arrived.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;

use futures_util::task::AtomicWaker;
use http::{HeaderMap, header};
use tokio::time::Instant;

/// The body state of one attempt, shared by the body (which waits on it) and
/// the upstream connection (which reads it when the response head arrives).
#[derive(Debug, Default)]
pub struct Delivery {
    /// Waiting for the backend's `100 Continue` before the first body byte.
    withheld: AtomicBool,
    waker: AtomicWaker,
    /// When the body reported its end to the connection.
    completed_at: OnceLock<Instant>,
}

impl Delivery {
    /// The state for a request with these headers: withheld when they carry
    /// `Expect: 100-continue`.
    pub fn for_request(headers: &HeaderMap) -> Delivery {
        let delivery = Delivery::default();
        delivery
            .withheld
            .store(expects_continue(headers), Ordering::Release);
        delivery
    }

    /// The backend asked for the body (`100 Continue`).
    pub fn release(&self) {
        self.withheld.store(false, Ordering::Release);
        self.waker.wake();
    }

    /// True while the body must not be sent; registers `cx` to be woken by
    /// [`Delivery::release`].
    pub fn poll_withheld(&self, cx: &mut Context<'_>) -> bool {
        if !self.withheld.load(Ordering::Acquire) {
            return false;
        }
        self.waker.register(cx.waker());
        self.withheld.load(Ordering::Acquire)
    }

    /// True while the backend has not asked for the body.
    pub fn is_withheld(&self) -> bool {
        self.withheld.load(Ordering::Acquire)
    }

    /// The body has ended (every byte handed to the connection).
    pub fn mark_complete(&self) {
        let _ = self.completed_at.set(Instant::now());
    }

    /// Whether the whole body has been handed to the connection.
    pub fn complete(&self) -> bool {
        self.completed_at.get().is_some()
    }

    /// When the whole body had been handed to the connection: from then on
    /// only the backend can make progress.
    pub fn completed_at(&self) -> Option<Instant> {
        self.completed_at.get().copied()
    }
}

/// Whether the request asks for `100 Continue` before its body (RFC 9110
/// section 10.1.1: the only expectation defined is `100-continue`, compared
/// case-insensitively).
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::EXPECT)
        .iter()
        .any(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn a_body_without_expect_is_not_withheld() {
        let delivery = Delivery::for_request(&HeaderMap::new());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(!delivery.poll_withheld(&mut cx));
    }

    #[test]
    fn an_expecting_body_waits_for_the_backends_continue() {
        let mut headers = HeaderMap::new();
        headers.insert(header::EXPECT, "100-Continue".parse().unwrap());
        let delivery = Delivery::for_request(&headers);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(delivery.poll_withheld(&mut cx));
        delivery.release();
        assert!(!delivery.poll_withheld(&mut cx));
    }
}
