//! Replay: which requests may be sent to the backend a second time, and the
//! request body wrapper that makes a second send possible.
//!
//! The proxy never owns a client's body outright. [`ReplayableBody`] keeps the
//! client's stream and hands the upstream one [`AttemptBody`] per attempt. An
//! attempt that never reached the backend leaves the stream untouched, so the
//! request can be held and sent again whatever its size. While an attempt pulls
//! from the client, the frames are also kept, up to `hold.replay_buffer` bytes;
//! past that the copy is dropped (memory stays bounded) and the request can no
//! longer be replayed once it has reached the backend. The wrapper also records
//! when the body last moved, which the hang detector reads.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, header};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::delivery::Delivery;
use crate::replay_memory::ReplayMemory;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes of a body's end kept by [`ReplayableBody::keep_tail`]: room for an
/// `aws-chunked` body's last chunk line and its trailer (a checksum and a
/// trailer signature take about 200).
pub const TAIL_BYTES: usize = 1024;

/// Whether sending this request twice can change its outcome, judged from the
/// method and headers alone (S3 semantics). Bodies are judged separately.
pub fn is_idempotent(method: &Method, headers: &HeaderMap) -> bool {
    let conditional_write = headers.contains_key(header::IF_NONE_MATCH)
        || headers.contains_key(header::IF_MATCH)
        || headers.contains_key(crate::s3_header::X_AMZ_WRITE_OFFSET_BYTES);
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => true,
        Method::PUT | Method::DELETE => !conditional_write,
        _ => false,
    }
}

/// Why no further attempt can be made with this body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("the request body outgrew the replay buffer")]
    Overflowed,
    #[error("the client's request body failed")]
    ClientFailed,
}

/// A client's request body, shareable across attempts.
pub struct ReplayableBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

struct Shared<B> {
    source: B,
    hint: SizeHint,
    /// Frames pulled so far, kept while they fit in `limit`.
    kept: Vec<Frame<Bytes>>,
    kept_len: usize,
    limit: usize,
    /// The budget all requests' copies share (`hold.replay_memory`).
    memory: Arc<ReplayMemory>,
    /// The last [`TAIL_BYTES`] pulled, whatever was kept, when asked for
    /// ([`ReplayableBody::keep_tail`]): an `aws-chunked` body's trailer.
    tail: Option<Vec<u8>>,
    overflowed: bool,
    /// The backend answered: nothing more will be replayed, keep nothing.
    committed: bool,
    source_done: bool,
    client_failed: bool,
    bytes_pulled: u64,
    last_progress: Instant,
    /// The last poll of the client's body found nothing to read: the
    /// request is waiting for the client, not for the backend.
    waiting_on_client: bool,
    generation: u64,
}

/// How long a request has made no progress, and whose turn it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// When a body byte last moved (or the attempt began).
    pub since: Instant,
    /// True when the proxy is waiting for the client's next body bytes; false
    /// when it waits for the backend (to accept bytes, or to answer).
    pub on_client: bool,
}

impl<B> Clone for ReplayableBody<B> {
    fn clone(&self) -> Self {
        ReplayableBody {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> ReplayableBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    /// Keeps at most `limit` bytes of the body for replay, and only while
    /// `memory` has room for them.
    pub fn new(source: B, limit: usize, memory: Arc<ReplayMemory>) -> Self {
        let hint = source.size_hint();
        let source_done = source.is_end_stream();
        ReplayableBody {
            shared: Arc::new(Mutex::new(Shared {
                source,
                hint,
                kept: Vec::new(),
                kept_len: 0,
                limit,
                memory,
                tail: None,
                overflowed: false,
                committed: false,
                source_done,
                client_failed: false,
                bytes_pulled: 0,
                last_progress: Instant::now(),
                waiting_on_client: false,
                generation: 0,
            })),
        }
    }

    /// A body for the next attempt: what was kept, then the rest of the stream,
    /// sent as `delivery` allows. Fails when part of the stream was consumed
    /// and not kept.
    pub fn attempt(&self, delivery: Arc<Delivery>) -> Result<AttemptBody<B>, ReplayError> {
        let mut shared = lock(&self.shared);
        if shared.client_failed {
            return Err(ReplayError::ClientFailed);
        }
        if shared.overflowed || (shared.committed && shared.bytes_pulled > 0) {
            return Err(ReplayError::Overflowed);
        }
        shared.generation += 1;
        shared.last_progress = Instant::now();
        shared.waiting_on_client = false;
        Ok(AttemptBody {
            shared: Arc::clone(&self.shared),
            generation: shared.generation,
            position: 0,
            delivery,
            continue_wait: None,
        })
    }

    /// Keeps the last [`TAIL_BYTES`] of the body from now on, whether or not
    /// the body fits the replay buffer (an `aws-chunked` body's trailer, to
    /// settle a write the proxy did not keep).
    pub fn keep_tail(&self) {
        lock(&self.shared).tail.get_or_insert_with(Vec::new);
    }

    /// The last [`TAIL_BYTES`] of the body, once all of it was read (the
    /// client's body ended, or reached its `Content-Length`); `None` if
    /// [`ReplayableBody::keep_tail`] was not asked for.
    pub fn tail(&self) -> Option<Vec<u8>> {
        let shared = lock(&self.shared);
        let ended = shared.source_done || shared.hint.exact() == Some(shared.bytes_pulled);
        ended.then(|| shared.tail.clone()).flatten()
    }

    /// True when no byte of the body has been read from the client yet.
    pub fn untouched(&self) -> bool {
        lock(&self.shared).bytes_pulled == 0
    }

    /// True when another attempt could send the whole body again.
    pub fn can_replay(&self) -> bool {
        let shared = lock(&self.shared);
        !shared.client_failed && !shared.overflowed && !shared.committed
    }

    /// The data of the whole body, when every byte of it is kept (the
    /// client's body ended, or reached its `Content-Length`, and fit the
    /// replay buffer): shared, not copied. hyper stops polling a body once
    /// its length is sent, so the end is not always seen.
    pub fn kept_whole(&self) -> Option<Vec<Bytes>> {
        let shared = lock(&self.shared);
        let ended = shared.source_done || shared.hint.exact() == Some(shared.kept_len as u64);
        if !ended || shared.overflowed || shared.committed || shared.client_failed {
            return None;
        }
        Some(
            shared
                .kept
                .iter()
                .filter_map(|frame| frame.data_ref().cloned())
                .collect(),
        )
    }

    pub fn client_failed(&self) -> bool {
        lock(&self.shared).client_failed
    }

    /// The backend answered: stop keeping frames and free the copy.
    pub fn commit(&self) {
        let mut shared = lock(&self.shared);
        shared.committed = true;
        shared.drop_copy();
    }

    /// When a body byte last moved (or the attempt began), and whether the
    /// request now waits for the client or for the backend.
    pub fn stall(&self) -> Stall {
        let shared = lock(&self.shared);
        Stall {
            since: shared.last_progress,
            on_client: shared.waiting_on_client,
        }
    }

    /// Bytes read from the client so far.
    pub fn bytes_in(&self) -> u64 {
        lock(&self.shared).bytes_pulled
    }

    /// Reads the rest of the client's body and throws it away, for at most
    /// `limit`: the backend answered before the body ended, and a client
    /// still sending must be able to read that answer rather than meet a
    /// connection reset (nginx's "lingering close"). The attempt still
    /// holding the body is superseded: nothing more reaches the backend.
    pub async fn discard_rest(self, limit: std::time::Duration) {
        lock(&self.shared).generation += 1;
        let drain = std::future::poll_fn(|cx| {
            let mut shared = lock(&self.shared);
            loop {
                if shared.source_done {
                    return Poll::Ready(());
                }
                match Pin::new(&mut shared.source).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        let len = frame.data_ref().map_or(0, Bytes::len);
                        shared.bytes_pulled += len as u64;
                    }
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                        shared.source_done = true;
                    }
                }
            }
        });
        let _ = tokio::time::timeout(limit, drain).await;
    }
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The body of one attempt, as the upstream connection sees it.
pub struct AttemptBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    generation: u64,
    /// Kept frames this attempt has already sent again.
    position: usize,
    /// Whether the backend has asked for the body, and whether it has ended.
    delivery: Arc<Delivery>,
    /// Runs while the body waits for the backend's `100 Continue`
    /// ([`Delivery::continue_timeout`]).
    continue_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Error of an attempt body: the client's own body failed, or the attempt was
/// superseded by a newer one.
#[derive(Debug, thiserror::Error)]
pub enum AttemptBodyError {
    #[error("client request body failed: {0}")]
    Client(BoxError),
    #[error("attempt superseded by a replay")]
    Superseded,
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = AttemptBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let mut shared = lock(&this.shared);
        if shared.generation != this.generation {
            return Poll::Ready(Some(Err(AttemptBodyError::Superseded)));
        }
        if this.delivery.poll_withheld(cx) {
            // A backend that never sends `100 Continue` gets the body once
            // it has been silent for `backend.expect_continue_timeout`.
            let Some(timeout) = this.delivery.continue_timeout() else {
                return Poll::Pending;
            };
            let wait = this
                .continue_wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.delivery.release_unasked();
        }
        if let Some(frame) = shared.kept.get(this.position) {
            let frame = clone_frame(frame);
            this.position += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if shared.source_done {
            this.delivery.mark_complete();
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut shared.source).poll_frame(cx);
        shared.waiting_on_client = polled.is_pending();
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.source_done = true;
                this.delivery.mark_complete();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                shared.client_failed = true;
                Poll::Ready(Some(Err(AttemptBodyError::Client(error.into()))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let kept = shared.keep(&frame);
                if kept {
                    this.position += 1;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let mut shared = lock(&self.shared);
        // A body of known length has ended once its last byte was read:
        // hyper then stops polling it (it would not ask for the `None` that
        // marks the delivery complete, and the connection, not known to be
        // past the body, would not be reused).
        if !shared.source_done && shared.source.is_end_stream() {
            shared.source_done = true;
        }
        let ended = shared.source_done && self.position >= shared.kept.len();
        if ended {
            // hyper stops polling a body that says it has ended.
            self.delivery.mark_complete();
        }
        ended
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.shared).hint
    }
}

impl<B> Shared<B> {
    /// Records a frame pulled from the client; returns whether it was kept.
    fn keep(&mut self, frame: &Frame<Bytes>) -> bool {
        let len = frame.data_ref().map_or(0, Bytes::len);
        self.bytes_pulled += len as u64;
        self.last_progress = Instant::now();
        if let (Some(tail), Some(data)) = (&mut self.tail, frame.data_ref()) {
            keep_end(tail, data);
        }
        if self.overflowed || self.committed {
            return false;
        }
        if self.kept_len + len > self.limit || !self.memory.try_reserve(len) {
            self.overflowed = true;
            self.drop_copy();
            return false;
        }
        self.kept_len += len;
        self.kept.push(clone_frame(frame));
        true
    }

    /// Frees the copy and gives its bytes back to the budget.
    fn drop_copy(&mut self) {
        self.memory.release(self.kept_len);
        self.kept = Vec::new();
        self.kept_len = 0;
    }
}

/// Appends `data` to `tail`, keeping only the last [`TAIL_BYTES`].
fn keep_end(tail: &mut Vec<u8>, data: &[u8]) {
    if data.len() >= TAIL_BYTES {
        tail.clear();
        tail.extend_from_slice(&data[data.len() - TAIL_BYTES..]);
        return;
    }
    tail.extend_from_slice(data);
    if tail.len() > TAIL_BYTES {
        tail.drain(..tail.len() - TAIL_BYTES);
    }
}

impl<B> Drop for Shared<B> {
    fn drop(&mut self) {
        self.memory.release(self.kept_len);
    }
}

fn clone_frame(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match frame.data_ref() {
        Some(data) => Frame::data(data.clone()),
        None => Frame::trailers(frame.trailers_ref().cloned().unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::collections::VecDeque;

    /// A client body that hands out one chunk per poll.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    fn unlimited() -> Arc<ReplayMemory> {
        Arc::new(ReplayMemory::unmetered(usize::MAX))
    }

    fn delivery() -> Arc<Delivery> {
        Arc::new(Delivery::default())
    }

    fn chunks(parts: &[&'static str]) -> Chunks {
        Chunks(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }

    async fn collect<B>(body: AttemptBody<B>) -> Result<Bytes, AttemptBodyError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        Ok(body.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn an_untouched_body_can_be_sent_whatever_its_size() {
        let body = ReplayableBody::new(Full::new(Bytes::from(vec![7u8; 4096])), 16, unlimited());
        let first = body.attempt(delivery()).unwrap();
        drop(first);
        assert!(body.untouched());
        let second = collect(body.attempt(delivery()).unwrap()).await.unwrap();
        assert_eq!(second.len(), 4096);
    }

    #[tokio::test]
    async fn a_small_body_is_replayed_byte_for_byte() {
        let body = ReplayableBody::new(chunks(&["hello ", "world"]), 1024, unlimited());
        assert_eq!(
            collect(body.attempt(delivery()).unwrap()).await.unwrap(),
            "hello world"
        );
        assert!(body.can_replay());
        assert_eq!(
            collect(body.attempt(delivery()).unwrap()).await.unwrap(),
            "hello world"
        );
    }

    #[tokio::test]
    async fn a_partly_sent_body_is_replayed_from_the_start() {
        let body = ReplayableBody::new(chunks(&["abc", "def", "ghi"]), 1024, unlimited());
        let mut first = body.attempt(delivery()).unwrap();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        drop(first);
        assert_eq!(
            collect(body.attempt(delivery()).unwrap()).await.unwrap(),
            "abcdefghi"
        );
    }

    #[tokio::test]
    async fn a_body_past_the_buffer_cannot_be_replayed() {
        let body = ReplayableBody::new(chunks(&["0123456789", "0123456789"]), 15, unlimited());
        assert_eq!(
            collect(body.attempt(delivery()).unwrap())
                .await
                .unwrap()
                .len(),
            20
        );
        assert!(!body.can_replay());
        assert_eq!(
            body.attempt(delivery()).err(),
            Some(ReplayError::Overflowed)
        );
    }

    #[tokio::test]
    async fn copies_share_the_memory_budget_and_give_it_back() {
        let memory = Arc::new(ReplayMemory::unmetered(15));
        let first = ReplayableBody::new(chunks(&["0123456789"]), 1024, Arc::clone(&memory));
        let second = ReplayableBody::new(chunks(&["0123456789"]), 1024, Arc::clone(&memory));
        collect(first.attempt(delivery()).unwrap()).await.unwrap();
        collect(second.attempt(delivery()).unwrap()).await.unwrap();
        assert!(first.can_replay(), "the first copy fits");
        assert!(
            !second.can_replay(),
            "no room left: streamed without a copy"
        );
        assert_eq!(memory.used(), 10);
        first.commit();
        assert_eq!(memory.used(), 0, "the backend answered: the copy is freed");
        let third = ReplayableBody::new(chunks(&["abc"]), 1024, Arc::clone(&memory));
        collect(third.attempt(delivery()).unwrap()).await.unwrap();
        drop(third);
        assert_eq!(memory.used(), 0, "a request that ends gives its copy back");
    }

    #[tokio::test]
    async fn the_tail_is_kept_past_the_replay_buffer() {
        let body = ReplayableBody::new(chunks(&["0123456789", "abc"]), 4, unlimited());
        body.keep_tail();
        assert_eq!(body.tail(), None, "not read yet");
        collect(body.attempt(delivery()).unwrap()).await.unwrap();
        assert!(!body.can_replay());
        assert_eq!(body.tail().unwrap(), b"0123456789abc");
        let mut tail = Vec::new();
        keep_end(&mut tail, &vec![1u8; TAIL_BYTES - 1]);
        keep_end(&mut tail, &[2, 3]);
        assert_eq!(tail.len(), TAIL_BYTES);
        assert_eq!(&tail[TAIL_BYTES - 3..], &[1, 2, 3]);
    }

    #[tokio::test]
    async fn a_superseded_attempt_fails() {
        let body = ReplayableBody::new(chunks(&["abc"]), 1024, unlimited());
        let mut old = body.attempt(delivery()).unwrap();
        let _new = body.attempt(delivery()).unwrap();
        assert!(matches!(
            old.frame().await,
            Some(Err(AttemptBodyError::Superseded))
        ));
    }

    #[test]
    fn s3_idempotency_follows_method_and_conditions() {
        let plain = HeaderMap::new();
        let mut conditional = HeaderMap::new();
        conditional.insert(header::IF_NONE_MATCH, "*".parse().unwrap());
        assert!(is_idempotent(&Method::GET, &plain));
        assert!(is_idempotent(&Method::PUT, &plain));
        assert!(is_idempotent(&Method::DELETE, &plain));
        assert!(!is_idempotent(&Method::POST, &plain));
        assert!(!is_idempotent(&Method::PUT, &conditional));
    }
}
