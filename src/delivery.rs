//! One attempt's request body as the backend asked for it and received it.
//!
//! Two rules keep the backend from ever reading bytes it did not ask for
//! (request smuggling through a pooled connection):
//! - **`Expect: 100-continue` is honoured end to end** (RFC 9110 section
//!   10.1.1). A request that carries it sends no body byte until the backend
//!   answers `100 Continue`. Only then does the proxy read the client's
//!   body, which is when hyper sends the client its own `100`. A backend
//!   that answers with a final status instead never gets the body, and the
//!   client is never asked for it, exactly as without the proxy.
//!
//!   A backend that never sends `100` (radosgw with `rgw_print_continue =
//!   false`) would never get the body: with `backend.expect_continue_timeout`
//!   set, the body is sent once the backend has said nothing for that long,
//!   as a client sends it when tired of waiting (the RFC lets it). Such a
//!   backend may answer without reading it, even `200` (a GET with a body),
//!   and read it as its next request: the connection is never reused
//!   ([`Delivery::sent_unasked`]), and what the backend makes of those bytes
//!   on that connection is what it would make of them from the client.
//! - **A connection on which the backend answered before the whole body was
//!   delivered is never reused**: the backend may take the rest for the next
//!   request. [`Delivery::complete`] says whether the body had ended when the
//!   response head arrived.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::{HeaderMap, Version, header};
use tokio::sync::Notify;
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
    /// How long the body waits for `100 Continue` before it is sent
    /// anyway (`backend.expect_continue_timeout`); `None`: for ever.
    continue_timeout: Option<Duration>,
    /// The body was sent without the backend asking for it.
    sent_unasked: AtomicBool,
    /// Set while the attempt waits for one of `backend.max_connections`:
    /// the time is the cap's, not the backend's.
    waiting_for_connection: AtomicBool,
    /// Told when that wait begins.
    wait_began: Notify,
    /// When the attempt got its connection after waiting for one.
    connection_at: OnceLock<Instant>,
}

impl Delivery {
    /// The state for a request: withheld when it expects `100 Continue`.
    pub fn for_request(version: Version, headers: &HeaderMap) -> Delivery {
        let delivery = Delivery::default();
        let withheld = expectation(version, headers) == Expectation::Continue;
        delivery.withheld.store(withheld, Ordering::Release);
        delivery
    }

    /// The same, sending the body unasked after `timeout` without a
    /// `100 Continue` (`None`: never).
    pub fn with_continue_timeout(mut self, timeout: Option<Duration>) -> Delivery {
        self.continue_timeout = timeout;
        self
    }

    /// How long the body waits for `100 Continue` before it is sent anyway.
    pub fn continue_timeout(&self) -> Option<Duration> {
        self.continue_timeout
    }

    /// The backend said nothing for [`Delivery::continue_timeout`]: the body
    /// goes unasked, and the connection must not be reused.
    pub fn release_unasked(&self) {
        self.sent_unasked.store(true, Ordering::Release);
        self.release();
    }

    /// True when the body was sent without the backend asking for it: the
    /// backend may not have read it, whatever it answered.
    pub fn sent_unasked(&self) -> bool {
        self.sent_unasked.load(Ordering::Acquire)
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

    /// The attempt waits for one of `backend.max_connections` to come free.
    pub fn connection_wait_begins(&self) {
        self.waiting_for_connection.store(true, Ordering::Release);
        self.wait_began.notify_one();
    }

    /// The wait for a connection ended (with one, or none in time).
    pub fn connection_wait_ends(&self) {
        let _ = self.connection_at.set(Instant::now());
        self.waiting_for_connection.store(false, Ordering::Release);
    }

    /// True while the attempt waits for one of `backend.max_connections`.
    pub fn is_waiting_for_connection(&self) -> bool {
        self.waiting_for_connection.load(Ordering::Acquire)
    }

    /// When the attempt's wait for a connection ended, if it waited: the
    /// backend's time counts from then.
    pub fn connection_at(&self) -> Option<Instant> {
        self.connection_at.get().copied()
    }

    /// Returns once the attempt begins to wait for a connection (at once if
    /// it began since the last call).
    pub async fn connection_wait_began(&self) {
        self.wait_began.notified().await;
    }
}

/// What a request's `Expect` field asks for (RFC 9110 section 10.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    /// None, or one the server must ignore (`100-continue` from HTTP/1.0).
    Nothing,
    /// `100 Continue` before the body.
    Continue,
    /// Anything else, or more than one: backends differ on what that means
    /// (one may wait for the body, another not), so the proxy refuses it with
    /// `417 Expectation Failed`, as RFC 9110 allows.
    Unsupported,
}

/// The request's expectation: `100-continue` (case-insensitive) is the only
/// one defined, and an HTTP/1.0 server must ignore it.
pub fn expectation(version: Version, headers: &HeaderMap) -> Expectation {
    let mut values = headers.get_all(header::EXPECT).iter();
    let Some(first) = values.next() else {
        return Expectation::Nothing;
    };
    if values.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"100-continue") {
        return Expectation::Unsupported;
    }
    match version {
        Version::HTTP_11 => Expectation::Continue,
        _ => Expectation::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn a_body_without_expect_is_not_withheld() {
        let delivery = Delivery::for_request(Version::HTTP_11, &HeaderMap::new());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(!delivery.poll_withheld(&mut cx));
    }

    #[test]
    fn an_expecting_body_waits_for_the_backends_continue() {
        let mut headers = HeaderMap::new();
        headers.insert(header::EXPECT, "100-Continue".parse().unwrap());
        let delivery = Delivery::for_request(Version::HTTP_11, &headers);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(delivery.poll_withheld(&mut cx));
        delivery.release();
        assert!(!delivery.poll_withheld(&mut cx));
    }

    #[test]
    fn a_body_sent_unasked_is_told_apart_from_one_the_backend_asked_for() {
        let mut headers = HeaderMap::new();
        headers.insert(header::EXPECT, "100-continue".parse().unwrap());
        let asked = Delivery::for_request(Version::HTTP_11, &headers);
        assert_eq!(asked.continue_timeout(), None);
        asked.release();
        assert!(!asked.is_withheld() && !asked.sent_unasked());
        let unasked = Delivery::for_request(Version::HTTP_11, &headers)
            .with_continue_timeout(Some(Duration::from_secs(1)));
        unasked.release_unasked();
        assert!(!unasked.is_withheld() && unasked.sent_unasked());
    }

    #[test]
    fn http_1_0_ignores_the_expectation_and_others_are_unsupported() {
        let mut continue_ = HeaderMap::new();
        continue_.insert(header::EXPECT, "100-continue".parse().unwrap());
        assert_eq!(
            expectation(Version::HTTP_10, &continue_),
            Expectation::Nothing
        );
        let mut two = continue_.clone();
        two.append(header::EXPECT, "foo".parse().unwrap());
        assert_eq!(
            expectation(Version::HTTP_11, &two),
            Expectation::Unsupported
        );
        let mut other = HeaderMap::new();
        other.insert(header::EXPECT, "foo".parse().unwrap());
        assert_eq!(
            expectation(Version::HTTP_11, &other),
            Expectation::Unsupported
        );
    }
}
