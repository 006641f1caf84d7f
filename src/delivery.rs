//! One attempt's request body as the backend asked for it and received it.
//!
//! Two rules keep the backend from ever reading bytes it did not ask for
//! (request smuggling through a pooled connection):
//! - **`Expect: 100-continue` is honoured end to end** (RFC 9110 section
//!   10.1.1). A request that carries it sends no body byte until the backend
//!   answers `100 Continue`, or has said nothing for [`CONTINUE_WAIT`], as
//!   long as a client waits before it sends the body anyway (the RFC lets
//!   it; a backend may never send a `100`: radosgw with
//!   `rgw_print_continue = false`). Only then does the proxy read the
//!   client's body, which is when hyper sends the client its own `100`. A
//!   backend that answers with a final status first never gets the body, and
//!   the client is never asked for it, exactly as without the proxy. (A
//!   connection that carried a body is reused only after a success answer,
//!   so a backend that answered without reading a body it got unasked
//!   cannot take it for the next request: [`crate::upstream`].)
//! - **A connection on which the backend answered before the whole body was
//!   delivered is never reused**: the backend may take the rest for the next
//!   request. [`Delivery::complete`] says whether the body had ended when the
//!   response head arrived.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;

use futures_util::task::AtomicWaker;
use http::{HeaderMap, Version, header};
use tokio::time::Instant;

/// How long a request body waits for the backend's `100 Continue` before
/// it is sent anyway: what curl (`--expect100-timeout`) and botocore wait
/// before they send a body unasked.
pub const CONTINUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// The state for a request: withheld when it expects `100 Continue`.
    pub fn for_request(version: Version, headers: &HeaderMap) -> Delivery {
        let delivery = Delivery::default();
        let withheld = expectation(version, headers) == Expectation::Continue;
        delivery.withheld.store(withheld, Ordering::Release);
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
