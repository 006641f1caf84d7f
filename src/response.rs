//! Response bodies going back to clients: a backend body streamed through, or
//! an answer the proxy made itself.
//!
//! A streamed body counts bytes, keeps the request counted as in flight until
//! it ends, and if the backend fails mid-stream passes the error on, so hyper
//! aborts the client connection instead of ending the response cleanly (a
//! truncated object must never look complete); the failure is also reported
//! as a suspected outage, which the proxy confirms before the gate goes down.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use std::sync::Arc;

use crate::access_log::RequestRecord;
use crate::client_pace::Pace;
use crate::drain::InFlightGuard;
use crate::outcome::RequestOutcome;
use crate::replay::BoxError;

/// The body type of every response the S3 listener sends.
pub struct ProxyBody {
    kind: Kind,
    record: Option<RequestRecord>,
    /// Runs once the response is over (sent, or the client gone).
    after: Option<Box<dyn FnOnce() + Send>>,
    /// The whole body was handed to hyper.
    finished: bool,
}

enum Kind {
    Full(Option<Bytes>),
    Streamed(Streamed),
}

struct Streamed {
    inner: Pin<Box<dyn Body<Data = Bytes, Error = hyper::Error> + Send>>,
    /// Over HTTP/2: when hyper last asked for data ([`crate::client_pace`]).
    pace: Option<Arc<Pace>>,
    /// Reports the backend's failure mid-stream, once.
    on_failure: Option<StreamFailure>,
    _in_flight: InFlightGuard,
}

impl Streamed {
    /// Polls the backend body, telling the pace (if any) that hyper asked.
    fn poll_paced(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Some(pace) = &self.pace {
            pace.asked(polled.is_pending());
        }
        polled
    }
}

/// What to do when the backend fails while its response streams.
pub type StreamFailure = Box<dyn FnOnce() + Send>;

impl ProxyBody {
    /// A body the proxy made itself.
    pub fn full(bytes: Bytes, record: RequestRecord) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(Some(bytes).filter(|b| !b.is_empty())),
            record: Some(record),
            after: None,
            finished: false,
        }
    }

    /// A backend body streamed to the client.
    pub fn streamed(
        inner: impl Body<Data = Bytes, Error = hyper::Error> + Send + 'static,
        on_failure: StreamFailure,
        in_flight: InFlightGuard,
        record: RequestRecord,
    ) -> ProxyBody {
        ProxyBody {
            kind: Kind::Streamed(Streamed {
                inner: Box::pin(inner),
                pace: None,
                on_failure: Some(on_failure),
                _in_flight: in_flight,
            }),
            record: Some(record),
            after: None,
            finished: false,
        }
    }

    /// Reports each ask for data of a streamed body to `pace`.
    pub fn paced(mut self, pace: Arc<Pace>) -> ProxyBody {
        if let Kind::Streamed(streamed) = &mut self.kind {
            streamed.pace = Some(pace);
        }
        self
    }

    /// Runs `after` once the response is over (after what was set before).
    pub fn after_response(mut self, after: impl FnOnce() + Send + 'static) -> ProxyBody {
        self.after = Some(match self.after.take() {
            Some(first) => Box::new(move || {
                first();
                after();
            }),
            None => Box::new(after),
        });
        self
    }
}

impl Drop for ProxyBody {
    /// A body dropped before its end was cut on the client's side (it left,
    /// or took nothing for `listener.send_timeout`): logged `response_cut`.
    fn drop(&mut self) {
        let cut = !self.finished && !self.is_end_stream();
        if let Some(record) = self.record.as_mut()
            && cut
            && record.outcome == RequestOutcome::Ok
        {
            record.outcome = RequestOutcome::ResponseCut;
        }
        if let Some(after) = self.after.take() {
            after();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Streamed(streamed) => match streamed.poll_paced(cx) {
                Poll::Ready(Some(Err(error))) => {
                    tracing::warn!(%error, "backend failed while streaming a response; aborting the client connection");
                    if let Some(report) = streamed.on_failure.take() {
                        report();
                    }
                    if let Some(record) = this.record.as_mut() {
                        record.outcome = RequestOutcome::ResponseAborted;
                    }
                    Poll::Ready(Some(Err(error.into())))
                }
                other => other.map(|frame| frame.map(|result| result.map_err(BoxError::from))),
            },
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(record)) = (&polled, this.record.as_mut())
            && let Some(data) = frame.data_ref()
        {
            record.bytes_out += data.len() as u64;
        }
        if let Poll::Ready(None) = polled {
            this.finished = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Streamed(streamed) => streamed.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Streamed(streamed) => streamed.inner.size_hint(),
        }
    }
}
