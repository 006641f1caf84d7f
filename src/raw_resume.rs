//! Resuming a download of the raw path ([`crate::raw_http1`]) cut by a
//! backend crash, as [`crate::download_resume`] resumes one on the hyper
//! path, with its rules: the plan is made from the first answer
//! ([`download_resume::plan`]: a GET answered `200` or `206` with a length
//! and a strong ETag, whose `Range` and `If-Match` are not signed); after a
//! cut the proxy confirms it, holds until the backend serves (within what
//! is left of `hold.timeout`), sends the head again with `Range` for the
//! missing bytes and `If-Match` (RFC 9110 sections 14.2 and 13.1.1) in
//! place of the client's own, and goes on only with the exact continuation
//! ([`Download::check`]); anything else ends the client connection.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use tokio::time::Instant;

use crate::backend_slots::Slot;
use crate::download_resume::{self, Continuation, Download, NotResumable, ResumeError};
use crate::peer::Peer;
use crate::proxy::Proxy;
use crate::raw_backend::{BodyFraming, RawConnection};
use crate::raw_exchange::{Exchange, Patience, Unanswered, connect_and_send, exchange};

/// Most failed sends of one resume before it gives up (the hyper path's
/// `MAX_UNSENT_RETRIES`).
const MAX_TRIES: u32 = 3;

/// A raw-path download that may be resumed.
pub struct RawDownload {
    plan: Download,
    /// The head sent to the backend, sent again for the rest.
    outbound: Vec<u8>,
    /// Resumes so far.
    pub resumes: u32,
    /// Time held while resuming, counted against `hold.timeout`.
    pub held: Duration,
}

/// The continuation the backend sent: its connection, the bytes read
/// (its head, then the first of its body), and its head's length.
pub struct Rest {
    pub backend: RawConnection,
    pub answer: Vec<u8>,
    pub head_length: usize,
}

impl RawDownload {
    /// The plan for the answer whose head is `answer_head` to the request
    /// sent as `outbound`, or why it has none.
    pub fn of(outbound: Vec<u8>, answer_head: &[u8]) -> Result<RawDownload, NotResumable> {
        let (method, uri, request_headers) =
            request_parts(&outbound).ok_or(NotResumable::NotGet)?;
        let (status, response_headers) =
            answer_parts(answer_head).ok_or(NotResumable::NotADownload)?;
        let plan =
            download_resume::plan(&method, &uri, &request_headers, status, &response_headers)?;
        Ok(RawDownload {
            plan,
            outbound,
            resumes: 0,
            held: Duration::ZERO,
        })
    }

    /// The head that asks for the rest: the one sent, without its `Range`
    /// and `If-Match`, with the continuation's (in lower case, as hyper
    /// writes a name the proxy set).
    fn continued(&self, continuation: &Continuation) -> Option<Vec<u8>> {
        let line_end = self.outbound.windows(2).position(|pair| pair == b"\r\n")? + 2;
        let mut slots = [httparse::EMPTY_HEADER; crate::raw_backend::MAX_FIELDS];
        let mut request = httparse::Request::new(&mut slots);
        request.parse(&self.outbound).ok()?;
        let mut head = self.outbound[..line_end].to_vec();
        for field in request.headers.iter() {
            let replaced = field.name.eq_ignore_ascii_case("range")
                || field.name.eq_ignore_ascii_case("if-match");
            if !replaced {
                head.extend_from_slice(field.name.as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(field.value);
                head.extend_from_slice(b"\r\n");
            }
        }
        for (name, value) in [
            ("range", &continuation.range),
            ("if-match", &continuation.if_match),
        ] {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Some(head)
    }

    /// Asks the backend for the rest once `delivered` body bytes reached
    /// the client, the cut having happened in backend generation `cut`, on
    /// a new connection holding `slot` (the cut one's place under
    /// `backend.max_connections`, kept ahead of requests waiting for one).
    pub async fn refetch(
        &mut self,
        proxy: &Proxy,
        peer: &Peer,
        delivered: u64,
        cut: u64,
        slot: Slot,
    ) -> Result<Rest, ResumeError> {
        let mut slot = Some(slot);
        proxy.judge_cut(cut).await;
        let continuation = self.plan.continuation(delivered);
        let head = self.continued(&continuation).ok_or(ResumeError::Mismatch(
            "the request head cannot be sent again",
        ))?;
        let rest_length = self.plan.length() - delivered;
        let mut tries = 0;
        while tries < MAX_TRIES {
            let mut admission = self.hold(proxy, peer).await?;
            let connector = proxy.backend_connector();
            if !connector.is_plain() {
                return Err(failed("the backend is no longer reached over plain TCP"));
            }
            let mut answer = Vec::with_capacity(8 << 10);
            let patience = Patience::now(proxy);
            let timer = std::pin::pin!(tokio::time::sleep(patience.response_timeout));
            let exchanged = match slot.take() {
                Some(slot) => {
                    let exchange = Exchange {
                        outbound: &head,
                        head_request: false,
                        patience,
                    };
                    let failed = Unanswered::Failed;
                    connect_and_send(
                        proxy,
                        &connector,
                        slot,
                        failed,
                        exchange,
                        &mut answer,
                        timer,
                    )
                    .await
                }
                None => {
                    exchange(
                        proxy,
                        &connector,
                        &head,
                        &mut answer,
                        false,
                        patience,
                        timer,
                    )
                    .await
                }
            };
            admission.settle();
            let (backend, answer_head) = match exchanged {
                Ok(exchanged) => exchanged,
                Err(Unanswered::Slow) => return Err(failed("the backend did not answer in time")),
                // Not a try: the next one goes on the slot that came free.
                Err(Unanswered::Busy) => {
                    slot = Some(wait_for_slot(proxy, peer).await?);
                    continue;
                }
                Err(
                    Unanswered::Failed | Unanswered::Cut | Unanswered::Invalid | Unanswered::Hung,
                ) => {
                    tries += 1;
                    proxy.judge_cut(proxy.gate().generation()).await;
                    continue;
                }
            };
            proxy.gate().backend_answered();
            let (status, headers) = answer_parts(&answer[..answer_head.length])
                .ok_or(ResumeError::Mismatch("an unreadable answer head"))?;
            self.plan.check(&continuation, status, &headers)?;
            if answer_head.framing != BodyFraming::Length(rest_length) {
                return Err(ResumeError::Mismatch("the body is not the rest's length"));
            }
            return Ok(Rest {
                backend,
                answer,
                head_length: answer_head.length,
            });
        }
        Err(failed("the backend failed every try"))
    }

    /// Holds until the gate admits, within what is left of `hold.timeout`,
    /// or the client leaves.
    async fn hold(
        &mut self,
        proxy: &Proxy,
        peer: &Peer,
    ) -> Result<crate::gate::Admission, ResumeError> {
        let since = Instant::now();
        let left = proxy.settings().hold_timeout.saturating_sub(self.held);
        let gate = proxy.gate();
        let admitted = tokio::select! {
            admitted = gate.admit(gate.ticket(), since + left) => {
                admitted.map_err(|rejection| failed(&format!("held: {rejection:?}")))
            }
            () = peer.gone() => Err(failed("the client left")),
        };
        self.held += since.elapsed();
        admitted
    }
}

fn failed(why: &str) -> ResumeError {
    ResumeError::Failed(why.to_owned().into())
}

/// A request head's method, target and fields, as the `http` crate has them.
fn request_parts(head: &[u8]) -> Option<(Method, Uri, HeaderMap)> {
    let mut slots = [httparse::EMPTY_HEADER; crate::raw_backend::MAX_FIELDS];
    let mut request = httparse::Request::new(&mut slots);
    request.parse(head).ok()?;
    let method = Method::from_bytes(request.method?.as_bytes()).ok()?;
    let uri = request.path?.parse().ok()?;
    Some((method, uri, header_map(request.headers)?))
}

/// An answer head's status and fields, as the `http` crate has them.
fn answer_parts(head: &[u8]) -> Option<(StatusCode, HeaderMap)> {
    let mut slots = vec![httparse::EMPTY_HEADER; 1000];
    let mut response = httparse::Response::new(&mut slots);
    response.parse(head).ok()?;
    let status = StatusCode::from_u16(response.code?).ok()?;
    Some((status, header_map(response.headers)?))
}

fn header_map(fields: &[httparse::Header<'_>]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        map.append(
            HeaderName::from_bytes(field.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(field.value).ok()?,
        );
    }
    Some(map)
}

/// One of `backend.max_connections` for a resume, within
/// `backend.queue_timeout`, unless the client leaves first.
async fn wait_for_slot(proxy: &Proxy, peer: &Peer) -> Result<Slot, ResumeError> {
    let queue_timeout = proxy.upstream_settings().queue_timeout;
    tokio::select! {
        slot = proxy.raw_backend().slots().take(queue_timeout) => {
            slot.ok_or_else(|| failed("backend.max_connections stayed busy for backend.queue_timeout"))
        }
        () = peer.gone() => Err(failed("the client left")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENT: &[u8] =
        b"GET /b/k HTTP/1.1\r\nHost: s3\r\nRange: bytes=0-99\r\nx-forwarded-for: 127.0.0.1\r\n\r\n";
    const ANSWER: &[u8] = b"HTTP/1.1 206 Partial Content\r\nETag: \"abc\"\r\nContent-Range: bytes 0-99/1000\r\nContent-Length: 100\r\n\r\n";

    #[test]
    fn the_rest_is_asked_for_with_range_and_if_match_in_place_of_the_clients() {
        let download = RawDownload::of(SENT.to_vec(), ANSWER).unwrap();
        let continuation = download.plan.continuation(40);
        let head = String::from_utf8(download.continued(&continuation).unwrap()).unwrap();
        assert_eq!(
            head,
            "GET /b/k HTTP/1.1\r\nHost: s3\r\nx-forwarded-for: 127.0.0.1\r\nrange: bytes=40-99\r\nif-match: \"abc\"\r\n\r\n"
        );
    }

    #[test]
    fn a_download_without_a_strong_etag_is_not_resumable() {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
        assert_eq!(
            RawDownload::of(SENT.to_vec(), answer).err(),
            Some(NotResumable::NoStrongEtag)
        );
    }
}
