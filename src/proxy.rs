//! The request path: hold, forward, and decide what a failure means.
//!
//! For each client request [`Proxy::handle`] loops: ask the gate for admission
//! (which may hold the request), send one attempt upstream with a hang
//! watchdog, and then either stream the response back or classify the failure:
//! a failure that sent nothing takes the gate down and holds the request again;
//! a failure after bytes reached the backend replays only an idempotent request
//! whose body is still fully kept, at most `hold.max_replays` times; anything
//! else becomes an S3 error via [`ProxyError`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::access_log::{RequestRecord, next_request_id};
use crate::config::ForwardingConfig;
use crate::delivery::Delivery;
use crate::drain::{InFlight, InFlightGuard};
use crate::gate::{Admission, Gate, Ticket};
use crate::headers;
use crate::metrics::{Metrics, ReplayOutcome};
use crate::peer::Peer;
use crate::replay::{self, AttemptBody, ReplayableBody};
use crate::response::ProxyBody;
use crate::s3_error::ProxyError;
use crate::upstream::{PooledBody, Upstream, UpstreamError};

/// Request-path settings; replaced as a whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub hold_timeout: Duration,
    pub replay_buffer: usize,
    pub max_replays: u32,
    pub response_timeout: Duration,
    pub retry_after: Duration,
    pub forwarding: ForwardingConfig,
}

type ClientBody = ReplayableBody<Incoming>;
type BackendResponse = Response<PooledBody<AttemptBody<Incoming>>>;

/// The shared state of the S3 listener.
pub struct Proxy {
    gate: Arc<Gate>,
    upstream: Upstream<AttemptBody<Incoming>>,
    /// Replaced on reload; held requests watch it to pick up a new hold timeout.
    settings: watch::Sender<Arc<ProxySettings>>,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
}

/// What is sent upstream, minus the body: rebuilt for every attempt.
struct Outbound {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The client request's extensions: hyper's record of the header names'
    /// case travels in them, so the backend sees the names as the client
    /// wrote them.
    extensions: http::Extensions,
}

impl Outbound {
    fn request(&self, body: AttemptBody<Incoming>) -> Request<AttemptBody<Incoming>> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
    }
}

/// How one request went, for its log line.
struct Progress {
    started: Instant,
    held: Duration,
    was_held: bool,
    replays: u32,
}

impl Proxy {
    pub fn new(
        gate: Arc<Gate>,
        upstream: Upstream<AttemptBody<Incoming>>,
        settings: ProxySettings,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        Proxy {
            gate,
            upstream,
            settings: watch::Sender::new(Arc::new(settings)),
            in_flight: InFlight::default(),
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    pub fn upstream_connects(&self) -> u64 {
        self.upstream.connects()
    }

    pub fn settings(&self) -> Arc<ProxySettings> {
        Arc::clone(&self.settings.borrow())
    }

    pub fn update_upstream(&self, settings: crate::upstream::UpstreamSettings) {
        self.upstream.update_settings(settings);
    }

    pub fn upstream(&self) -> &Upstream<AttemptBody<Incoming>> {
        &self.upstream
    }

    pub fn update_settings(&self, settings: ProxySettings) {
        self.settings.send_replace(Arc::new(settings));
    }

    /// Serves one client request.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: &Peer,
        scheme: &'static str,
    ) -> Response<ProxyBody> {
        let settings = self.settings();
        let progress = Progress {
            started: Instant::now(),
            held: Duration::ZERO,
            was_held: false,
            replays: 0,
        };
        let (parts, body) = request.into_parts();
        let outbound = outbound(parts, peer.address, scheme, &settings.forwarding);
        let body = ReplayableBody::new(body, settings.replay_buffer);
        self.forward(outbound, body, peer, &settings, progress)
            .await
    }

    async fn forward(
        &self,
        outbound: Outbound,
        body: ClientBody,
        peer: &Peer,
        settings: &ProxySettings,
        mut progress: Progress,
    ) -> Response<ProxyBody> {
        match self
            .attempts(&outbound, &body, peer, settings, &mut progress)
            .await
        {
            Ok((response, in_flight)) => {
                self.stream(response, in_flight, &outbound, body, progress)
            }
            Err(error) => self.answer(error, &outbound, &body, &progress, settings),
        }
    }

    /// Holds and sends until the backend answers or the request must fail.
    async fn attempts(
        &self,
        outbound: &Outbound,
        body: &ClientBody,
        peer: &Peer,
        settings: &ProxySettings,
        progress: &mut Progress,
    ) -> Result<(BackendResponse, InFlightGuard), ProxyError> {
        let ticket = self.gate.ticket();
        let idempotent = replay::is_idempotent(&outbound.method, &outbound.headers);
        loop {
            let queued_at = Instant::now();
            let admitted = self.admit(ticket, progress.started, peer).await;
            if let Err(ProxyError::Held(_) | ProxyError::ClientGone) = admitted {
                progress.was_held = true;
                progress.held += queued_at.elapsed();
            }
            let mut admission = admitted?;
            progress.held += admission.held_for;
            progress.was_held |= admission.was_held();
            let delivery = Arc::new(Delivery::for_request(&outbound.headers));
            let attempt = body
                .attempt(Arc::clone(&delivery))
                .map_err(|_| ProxyError::NotReplayable)?;
            let in_flight = self.in_flight.enter();
            let result = self
                .send_watched(
                    outbound.request(attempt),
                    &delivery,
                    body,
                    settings.response_timeout,
                )
                .await;
            admission.settle();
            match result {
                Ok(response) => {
                    body.commit();
                    self.gate.backend_answered();
                    return Ok((response, in_flight));
                }
                Err(error) => {
                    drop(in_flight);
                    self.after_failure(&error, outbound, body, idempotent, settings, progress)?;
                }
            }
        }
    }

    /// Decides what a failed attempt means: `Ok` to hold and send again,
    /// `Err` with the answer the client gets.
    fn after_failure(
        &self,
        error: &UpstreamError,
        outbound: &Outbound,
        body: &ClientBody,
        idempotent: bool,
        settings: &ProxySettings,
        progress: &mut Progress,
    ) -> Result<(), ProxyError> {
        if body.client_failed() {
            return Err(ProxyError::ClientBody);
        }
        let reason = error.down_reason();
        if let Some(reason) = reason {
            self.gate.mark_down(reason);
            self.upstream.clear_idle();
        }
        if error.reached_backend() {
            tracing::warn!(method = %outbound.method, path = outbound.uri.path(), %error, "backend failed after the request reached it");
        } else {
            // Every held request passes here during an outage: keep it quiet.
            tracing::debug!(method = %outbound.method, path = outbound.uri.path(), %error, "backend unreachable; holding");
        }
        if !error.reached_backend() {
            return Ok(());
        }
        if reason.is_none() {
            return Err(ProxyError::BadGateway);
        }
        if idempotent && body.can_replay() && progress.replays < settings.max_replays {
            progress.replays += 1;
            self.metrics.replay(ReplayOutcome::Replayed);
            return Ok(());
        }
        self.metrics.replay(ReplayOutcome::RefusedUnsafe);
        Err(ProxyError::NotReplayable)
    }

    /// Admission, abandoned as soon as the client leaves.
    /// A reload that changes `hold.timeout` applies to requests already held:
    /// they are queued again, at the same place, with the new deadline.
    async fn admit(
        &self,
        ticket: Ticket,
        started: Instant,
        peer: &Peer,
    ) -> Result<Admission, ProxyError> {
        let mut reloads = self.settings.subscribe();
        loop {
            let deadline = started + reloads.borrow_and_update().hold_timeout;
            tokio::select! {
                biased;
                admitted = self.gate.admit(ticket, deadline) => return admitted.map_err(ProxyError::Held),
                () = peer.gone() => return Err(ProxyError::ClientGone),
                _ = reloads.changed() => continue,
            }
        }
    }

    /// Sends one attempt; fails with `Hang` when neither a body byte nor the
    /// response head moves for `timeout`.
    async fn send_watched(
        &self,
        request: Request<AttemptBody<Incoming>>,
        delivery: &Arc<Delivery>,
        body: &ClientBody,
        timeout: Duration,
    ) -> Result<BackendResponse, UpstreamError> {
        let send = self.upstream.send(request, delivery);
        tokio::pin!(send);
        loop {
            let stalled_at = body.last_progress() + timeout;
            tokio::select! {
                result = &mut send => return result,
                () = tokio::time::sleep_until(stalled_at) => {
                    if body.last_progress() + timeout <= Instant::now() {
                        return Err(UpstreamError::Hang(timeout));
                    }
                }
            }
        }
    }

    fn stream(
        &self,
        response: BackendResponse,
        in_flight: InFlightGuard,
        outbound: &Outbound,
        body: ClientBody,
        progress: Progress,
    ) -> Response<ProxyBody> {
        let (mut parts, backend_body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let request_id = response_request_id(&mut parts.headers);
        let record = self.record(
            outbound,
            parts.status.as_u16(),
            request_id,
            body,
            &progress,
            "ok",
        );
        let proxied = ProxyBody::streamed(backend_body, Arc::clone(&self.gate), in_flight, record);
        Response::from_parts(parts, proxied)
    }

    fn record(
        &self,
        outbound: &Outbound,
        status: u16,
        request_id: String,
        body: ClientBody,
        progress: &Progress,
        outcome: &'static str,
    ) -> RequestRecord {
        RequestRecord {
            method: outbound.method.clone(),
            path: outbound.uri.path().to_owned(),
            status,
            request_id,
            held: progress.held,
            was_held: progress.was_held,
            replays: progress.replays,
            bytes_out: 0,
            bytes_in: Box::new(move || body.bytes_in()),
            started: progress.started,
            outcome,
            metrics: Arc::clone(&self.metrics),
        }
    }

    fn answer(
        &self,
        error: ProxyError,
        outbound: &Outbound,
        body: &ClientBody,
        progress: &Progress,
        settings: &ProxySettings,
    ) -> Response<ProxyBody> {
        let request_id = next_request_id();
        let response = error.to_response(
            &outbound.method,
            outbound.uri.path(),
            &request_id,
            settings.retry_after,
        );
        let status = response.status().as_u16();
        let record = self.record(
            outbound,
            status,
            request_id,
            body.clone(),
            progress,
            error.label(),
        );
        response.map(|bytes: Bytes| ProxyBody::full(bytes, record))
    }
}

/// The S3 request id of a backend response, for the request log. A backend
/// that sends none gets one made by the proxy, added to the response so the
/// client can quote the id its log line carries.
fn response_request_id(headers: &mut HeaderMap) -> String {
    const REQUEST_ID: &str = "x-amz-request-id";
    if let Some(id) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        return id.to_owned();
    }
    let id = next_request_id();
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, value);
    }
    id
}

/// The request as the backend should see it: origin-form target, hop-by-hop
/// headers gone, forwarding headers added, everything signed untouched.
fn outbound(
    parts: http::request::Parts,
    client: SocketAddr,
    scheme: &'static str,
    forwarding: &ForwardingConfig,
) -> Outbound {
    let http::request::Parts {
        method,
        uri,
        mut headers,
        extensions,
        ..
    } = parts;
    headers::strip_hop_by_hop(&mut headers);
    headers::add_forwarded(&mut headers, uri.query(), client.ip(), scheme, forwarding);
    if !headers.contains_key(header::HOST) {
        // HTTP/2 carries the host as :authority; HTTP/1.1 needs it as Host.
        if let Some(value) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    Outbound {
        method,
        uri: target.parse().unwrap_or_else(|_| Uri::from_static("/")),
        headers,
        extensions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backends_request_id_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert("x-amz-request-id", HeaderValue::from_static("tx000abc"));
        assert_eq!(response_request_id(&mut headers), "tx000abc");
        assert_eq!(headers["x-amz-request-id"], "tx000abc");
    }

    #[test]
    fn a_response_without_a_request_id_gets_the_logged_one() {
        let mut headers = HeaderMap::new();
        let id = response_request_id(&mut headers);
        assert_eq!(headers["x-amz-request-id"], id.as_str());
    }
}
