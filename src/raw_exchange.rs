//! One exchange with the backend on the raw HTTP/1.1 path
//! ([`crate::raw_http1`]): a request head sent on a pooled or new plain
//! connection ([`crate::raw_backend`]), and the answer's head read back,
//! watched while late as the hyper path watches it (`backend.response_timeout`,
//! the prober's check, `backend.first_byte_timeout`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::backend_slots::Slot;
use crate::connector::Connector;
use crate::proxy::Proxy;
use crate::raw_backend::{AnswerHead, NotTaken, Parsed, RawConnection, parse_answer};

/// Why a backend exchange ended before the client had a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The request never reached the backend (no connection, or one that
    /// failed before the head was written), or the answer is not one this
    /// path takes: the hyper path may send the request again.
    Failed,
    /// The head was written and the connection ended or failed before an
    /// answer head: the backend may have died with the request (the
    /// quarantine's suspect, once the outage is confirmed); the hyper path
    /// may send it again.
    Cut,
    /// An answer head hyper's client refuses as well
    /// ([`crate::raw_backend::NotTaken::Invalid`]): `502`, not sent again.
    Invalid,
    /// No answer head within `backend.first_byte_timeout` from a backend
    /// that serves: `504`, not sent again (the backend may still run it).
    Slow,
    /// No answer head, and the backend did not serve when checked: the gate
    /// is down, and the hyper path holds the request.
    Hung,
    /// Every slot of `backend.max_connections` is taken: nothing was sent,
    /// nothing is known of the backend.
    Busy,
}

/// The times an exchange waits for its answer head.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub connect_timeout: Duration,
    /// `backend.response_timeout`: how long an answer may be late before
    /// the backend is checked.
    pub response_timeout: Duration,
    /// `backend.first_byte_timeout`.
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// `backend.max_head_bytes` and `backend.max_headers`.
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// `backend.max_idle_connections`: how many the pool keeps after.
    pub max_idle: usize,
}

impl Patience {
    /// The proxy's settings now.
    pub fn now(proxy: &Proxy) -> Patience {
        let settings = proxy.settings();
        let upstream = proxy.upstream_settings();
        Patience {
            connect_timeout: upstream.connect_timeout,
            response_timeout: settings.response_timeout,
            first_byte_timeout: settings.first_byte_timeout,
            idle_timeout: upstream.idle_timeout,
            max_head_bytes: upstream.max_head_bytes,
            max_headers: upstream.max_headers,
            max_idle: upstream.max_idle,
        }
    }
}

/// Sends `outbound` on a pooled or new plain connection and reads the
/// answer's head into `answer` (`1xx` answers dropped). A late head is
/// watched as `send_watched` watches it on the hyper path: checked after
/// each `response_timeout`, [`Unanswered::Hung`] when the backend does not
/// serve, [`Unanswered::Slow`] at `first_byte_timeout`, on `timer` (the
/// connection's own, moved later at each request: see [`watched`]).
pub async fn exchange(
    proxy: &Proxy,
    connector: &Arc<Connector>,
    outbound: &[u8],
    answer: &mut Vec<u8>,
    head_request: bool,
    patience: Patience,
    mut timer: Pin<&mut Sleep>,
) -> Result<(RawConnection, AnswerHead), Unanswered> {
    // A pooled connection the backend closed just before it was taken
    // gives no answer at all: the request is sent once more on a new one
    // (a connection the backend closed never ran it). When no new one can
    // be made, the backend is gone: it may have died with the request.
    let mut unanswered = Unanswered::Failed;
    if let Some(pooled) = proxy
        .raw_backend()
        .checkout(connector, patience.idle_timeout)
    {
        let sent = send_on(
            proxy,
            pooled,
            outbound,
            answer,
            head_request,
            patience,
            timer.as_mut(),
        );
        match sent.await {
            Err(failed @ (Unanswered::Failed | Unanswered::Cut)) if answer.is_empty() => {
                unanswered = failed;
            }
            // A `408` on a reused connection is the backend closing it for
            // idleness as the request came (or just before), not its answer
            // to it: the request goes again on a new connection (RFC 9110
            // section 15.5.9; browsers do the same), and the connection,
            // whose framing is now out of step, is dropped with whatever it
            // still held.
            Ok((_, head)) if head.status == 408 => {
                answer.clear();
            }
            sent => return sent,
        }
    }
    // A new connection only if a slot is free (the callers wait for one:
    // the hyper path, or a resume); a pooled connection cut under the
    // request says more than the cap.
    let slot = proxy
        .raw_backend()
        .slots()
        .try_take()
        .ok_or(match unanswered {
            Unanswered::Failed => Unanswered::Busy,
            cut => cut,
        })?;
    let exchange = Exchange {
        outbound,
        head_request,
        patience,
    };
    connect_and_send(proxy, connector, slot, unanswered, exchange, answer, timer).await
}

/// What [`connect_and_send`] sends and how long it waits.
pub struct Exchange<'a> {
    pub outbound: &'a [u8],
    pub head_request: bool,
    pub patience: Patience,
}

/// The second half of [`exchange`]: a new connection holding `slot`, and
/// the request sent on it; `unanswered` when no connection can be made.
/// Also for a caller that brings a slot of its own (a resume).
pub async fn connect_and_send(
    proxy: &Proxy,
    connector: &Arc<Connector>,
    slot: Slot,
    unanswered: Unanswered,
    exchange: Exchange<'_>,
    answer: &mut Vec<u8>,
    timer: Pin<&mut Sleep>,
) -> Result<(RawConnection, AnswerHead), Unanswered> {
    let Exchange {
        outbound,
        head_request,
        patience,
    } = exchange;
    let connect = tokio::time::timeout(patience.connect_timeout, connector.connect_for_reads());
    let stream = connect
        .await
        .map_err(|_| unanswered)?
        .map_err(|_| unanswered)?;
    let _ = stream.set_nodelay(true);
    let stream = RawConnection::new(stream, slot);
    send_on(
        proxy,
        stream,
        outbound,
        answer,
        head_request,
        patience,
        timer,
    )
    .await
}

/// A new plain connection for an upload's head and body (never a pooled
/// one: a body sent on a connection the backend was closing for idleness
/// would be lost with the bytes already taken from the client), on a free
/// slot of `backend.max_connections`, else on the slot of an idle pooled
/// connection, closed for it; [`Unanswered::Busy`] without,
/// [`Unanswered::Failed`] when no connection can be made.
pub async fn connect_for_upload(
    proxy: &Proxy,
    connector: &Arc<Connector>,
    patience: Patience,
) -> Result<RawConnection, Unanswered> {
    let backend = proxy.raw_backend();
    let slot = match backend.slots().try_take() {
        Some(slot) => slot,
        None => backend
            .checkout(connector, patience.idle_timeout)
            .ok_or(Unanswered::Busy)?
            .take_slot(),
    };
    // As the hyper path connects for a body: no `TCP_USER_TIMEOUT`, which
    // would also end a connection whose backend reads slowly (a full
    // window); a stalled upload is the stall watch's to judge.
    let connect = tokio::time::timeout(patience.connect_timeout, connector.connect_tcp());
    let stream = connect
        .await
        .map_err(|_| Unanswered::Failed)?
        .map_err(|_| Unanswered::Failed)?;
    let _ = stream.set_nodelay(true);
    Ok(RawConnection::new(stream, slot))
}

/// [`exchange`] on `backend`.
async fn send_on(
    proxy: &Proxy,
    mut backend: RawConnection,
    outbound: &[u8],
    answer: &mut Vec<u8>,
    head_request: bool,
    patience: Patience,
    timer: Pin<&mut Sleep>,
) -> Result<(RawConnection, AnswerHead), Unanswered> {
    let generation = proxy.gate().generation();
    backend
        .write_all(outbound)
        .await
        .map_err(|_| Unanswered::Failed)?;
    let head = {
        let read_head = std::pin::pin!(read_answer_head(
            &mut backend,
            answer,
            head_request,
            patience
        ));
        watched(proxy, read_head, patience, generation, timer).await?
    };
    Ok((backend, head))
}

/// Reads an answer head into `answer`, dropping `1xx` answers.
pub(crate) async fn read_answer_head(
    backend: &mut TcpStream,
    answer: &mut Vec<u8>,
    head_request: bool,
    patience: Patience,
) -> Result<AnswerHead, Unanswered> {
    loop {
        if backend
            .read_buf(answer)
            .await
            .map_err(|_| Unanswered::Cut)?
            == 0
        {
            return Err(Unanswered::Cut);
        }
        loop {
            let parsed = parse_answer(answer, head_request, patience.max_headers);
            match parsed.map_err(|not_taken| match not_taken {
                NotTaken::ForHyper => Unanswered::Failed,
                NotTaken::Invalid => Unanswered::Invalid,
            })? {
                Parsed::Partial if answer.len() <= patience.max_head_bytes => break,
                Parsed::Partial => return Err(Unanswered::Failed),
                Parsed::Informational(length) => drop(answer.drain(..length)),
                Parsed::Final(head) => return Ok(head),
            }
        }
    }
}

/// Waits for `read_head` as `send_watched` waits for an answer, on
/// `timer`: a timer per request was inserted into tokio's timer wheel and
/// taken out again (under its lock) for every answer; one kept by the
/// connection and only ever moved later is not (tokio notes the later
/// deadline and reinserts the timer only when the earlier one comes).
pub(crate) async fn watched<T>(
    proxy: &Proxy,
    mut read_head: Pin<&mut impl Future<Output = Result<T, Unanswered>>>,
    patience: Patience,
    generation: u64,
    mut timer: Pin<&mut Sleep>,
) -> Result<T, Unanswered> {
    let sent = tokio::time::Instant::now();
    let ceiling = sent + patience.first_byte_timeout;
    let mut confirmed_at = sent;
    loop {
        timer
            .as_mut()
            .reset((confirmed_at + patience.response_timeout).min(ceiling));
        tokio::select! {
            head = read_head.as_mut() => return head,
            () = timer.as_mut() => {}
        }
        let now = tokio::time::Instant::now();
        if now >= ceiling {
            tracing::warn!(timeout = ?patience.first_byte_timeout, "the backend serves but did not answer in time");
            return Err(Unanswered::Slow);
        }
        let serving = tokio::select! {
            head = read_head.as_mut() => return head,
            serving = proxy.late_answer_serving(now, generation) => serving,
        };
        if !serving {
            return Err(Unanswered::Hung);
        }
        tracing::info!(waited = ?now - sent, "no answer yet but the backend serves: slow, not dead");
        confirmed_at = tokio::time::Instant::now();
    }
}
