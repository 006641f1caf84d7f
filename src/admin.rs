//! The admin listener: health, readiness, status, and the planned switch-over
//! controls, on a socket separate from S3 traffic (loopback by default).
//!
//! - `GET /healthz`: the process runs.
//! - `GET /readyz`: the S3 listener accepts and can hold. It stays ready while
//!   the backend is down (with discovery: once the first complete list of
//!   EndpointSlices arrived): a proxy that went unready during an outage would be
//!   taken out of its own Service, the very failure it exists to prevent.
//! - `GET /metrics`: Prometheus text exposition (see [`crate::metrics`]).
//! - `GET /admin/status`: JSON (state, reason, since, held, in flight, paused).
//! - `POST /admin/pause[?wait=10s]`: hold new requests, wait for in-flight ones
//!   (up to `wait`, default `admin.drain_timeout`) and say what is left.
//! - `POST /admin/resume`: end a pause. Both are idempotent.
//! - `DELETE /admin/quarantine`: forget every quarantined (poison) request.
//!
//! With `admin.token_file` set, every `/admin/*` request must carry
//! `Authorization: Bearer <token>` ([`AdminToken`]); without it, or with
//! another token, the answer is `401` with `WWW-Authenticate: Bearer` (RFC
//! 6750) and nothing happens. `/healthz`, `/readyz` and `/metrics` stay open:
//! the kubelet and Prometheus carry no token, and they change nothing. A
//! reload swaps the token (and the drain timeout) in [`Admin::update_settings`].

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;

use crate::admin_token::AdminToken;
use crate::metrics::Snapshot;
use crate::probe::Prober;
use crate::proxy::Proxy;

/// What the admin endpoints need from the running proxy.
pub struct Admin {
    pub proxy: Arc<Proxy>,
    pub prober: Arc<Prober>,
    /// The S3 listener accepts (false once shutdown began).
    pub ready: Arc<AtomicBool>,
    /// Discovery has its first complete list (always true without discovery).
    pub synced: Arc<AtomicBool>,
    /// What a reload may change; read once per request.
    pub settings: RwLock<AdminSettings>,
}

/// The admin API's part of the configuration, live on reload.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Default wait of `POST /admin/pause` (`admin.drain_timeout`).
    pub drain_timeout: Duration,
    /// Required on `/admin/*` when set (`admin.token_file`).
    pub token: Option<AdminToken>,
}

/// Why an `/admin/*` request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unauthorized {
    /// No `Authorization` header.
    Missing,
    /// A header, but not `Bearer <the token>`.
    Invalid,
}

impl Unauthorized {
    fn as_str(self) -> &'static str {
        match self {
            Unauthorized::Missing => "missing",
            Unauthorized::Invalid => "invalid",
        }
    }

    /// The 401 answer; `WWW-Authenticate` as RFC 6750 section 3 has it.
    fn response(self) -> Response<Full<Bytes>> {
        let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        let challenge = match self {
            Unauthorized::Missing => r#"Bearer realm="s3-failover-proxy admin""#,
            Unauthorized::Invalid => {
                r#"Bearer realm="s3-failover-proxy admin", error="invalid_token""#
            }
        };
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(challenge),
        );
        response
    }
}

impl Admin {
    /// Swaps in the settings of a reloaded configuration.
    pub fn update_settings(&self, settings: AdminSettings) {
        *self.settings.write().unwrap() = settings;
    }

    /// Checks the bearer token of an `/admin/*` request, when one is required.
    fn authorize<B>(&self, request: &Request<B>) -> Result<(), Unauthorized> {
        let settings = self.settings.read().unwrap();
        let Some(token) = &settings.token else {
            return Ok(());
        };
        match request.headers().get(header::AUTHORIZATION) {
            None => Err(Unauthorized::Missing),
            Some(value) if token.authorizes(value.as_bytes()) => Ok(()),
            Some(_) => Err(Unauthorized::Invalid),
        }
    }

    pub async fn handle<B>(
        &self,
        request: Request<B>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = request.uri().path();
        if (path == "/admin" || path.starts_with("/admin/"))
            && let Err(refused) = self.authorize(&request)
        {
            tracing::warn!(
                method = %request.method(),
                path,
                credentials = refused.as_str(),
                "admin: request refused without a valid bearer token"
            );
            return Ok(refused.response());
        }
        let drain_timeout = self.settings.read().unwrap().drain_timeout;
        let response = match (request.method(), path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => self.readiness(),
            (&Method::GET, "/admin/status") => json_response(StatusCode::OK, self.status()),
            (&Method::GET, "/metrics") => self.metrics(),
            (&Method::POST, "/admin/pause") => match wait_parameter(request.uri().query()) {
                Ok(wait) => self.pause(wait.unwrap_or(drain_timeout)).await,
                Err(message) => text(StatusCode::BAD_REQUEST, &message),
            },
            (&Method::DELETE, "/admin/quarantine") => {
                let cleared = self.proxy.quarantine().clear();
                tracing::info!(cleared, "admin: quarantine cleared");
                json_response(StatusCode::OK, json!({ "cleared": cleared }))
            }
            (&Method::POST, "/admin/resume") => {
                self.proxy.gate().resume();
                tracing::info!("admin: resume");
                json_response(StatusCode::OK, self.status())
            }
            (
                _,
                "/healthz" | "/readyz" | "/metrics" | "/admin/status" | "/admin/pause"
                | "/admin/resume" | "/admin/quarantine",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        };
        Ok(response)
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let snapshot = Snapshot {
            gate: self.proxy.gate().status(),
            in_flight: self.proxy.in_flight().current(),
            backend_connects: self.proxy.upstream_connects(),
            waiting_for_backend_connection: self.proxy.raw_backend().slots().waiting(),
        };
        let mut response = Response::new(Full::new(Bytes::from(
            self.proxy.metrics().encode(&snapshot),
        )));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8".parse().unwrap(),
        );
        response
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        if self.ready.load(Ordering::SeqCst) && self.synced.load(Ordering::SeqCst) {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
    }

    async fn pause(&self, wait: Duration) -> Response<Full<Bytes>> {
        if self.proxy.gate().paused_for().is_none() {
            self.prober.arm_sentinel().await;
        }
        self.proxy.gate().pause();
        tracing::info!(wait = ?wait, "admin: pause; draining in-flight requests");
        let left = self.proxy.in_flight().drained_within(wait).await;
        let mut status = self.status();
        status["drained"] = json!(left == 0);
        json_response(StatusCode::OK, status)
    }

    fn status(&self) -> serde_json::Value {
        let gate = self.proxy.gate().status();
        json!({
            "state": gate.phase.as_str(),
            "reason": gate.reason.map(|r| r.as_str()),
            "since_seconds": gate.since.as_secs_f64(),
            "held": gate.held,
            "in_flight": self.proxy.in_flight().current(),
            "paused": gate.paused,
            "backend_connects": self.proxy.upstream_connects(),
            "quarantined": self.proxy.quarantine().entries().iter().map(|entry| json!({
                "fingerprint": entry.fingerprint,
                "remaining_seconds": entry.remaining.as_secs_f64(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Reads `wait=<duration>` from a query string.
fn wait_parameter(query: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("wait="))
    else {
        return Ok(None);
    };
    humantime::parse_duration(value)
        .map(Some)
        .map_err(|e| format!("invalid wait `{value}`: {e}\n"))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().unwrap(),
    );
    response
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_parameter_is_a_duration() {
        assert_eq!(wait_parameter(None), Ok(None));
        assert_eq!(
            wait_parameter(Some("wait=250ms")),
            Ok(Some(Duration::from_millis(250)))
        );
        assert!(wait_parameter(Some("wait=soon")).is_err());
    }
}
