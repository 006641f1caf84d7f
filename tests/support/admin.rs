//! The admin API of a proxy under test, as an operator's client sees it: the
//! one client both harnesses hand out ([`crate::ProxyUnderTest::admin`] in
//! process, [`crate::ProxyProcess::admin`] for the binary), with the waits
//! tests need (held requests, a gate reason, a metric value).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::{metric_sample, send, wait_until};

/// How long a wait on the admin API may take before the test fails:
/// generous, as only a failing test waits it out, and a loaded machine
/// once took more than 10 s to get 100 requests to a frozen backend.
const WAIT: Duration = Duration::from_secs(30);

/// Requests to one admin listener, with a bearer token when given one.
#[derive(Debug, Clone)]
pub struct AdminClient {
    pub address: SocketAddr,
    token: Option<String>,
}

impl AdminClient {
    pub fn new(address: SocketAddr) -> AdminClient {
        AdminClient {
            address,
            token: None,
        }
    }

    /// The same client, sending `Authorization: Bearer <token>`.
    pub fn with_token(&self, token: &str) -> AdminClient {
        AdminClient {
            address: self.address,
            token: Some(token.to_owned()),
        }
    }

    /// One request; the response with its headers.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let authorization = self.token.as_ref().map(|token| format!("Bearer {token}"));
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|value| ("authorization", value.as_str()))
            .collect();
        send(self.address, method, path, &headers, Bytes::new()).await
    }

    /// One request: status and whole body.
    pub async fn request(&self, method: &str, path: &str) -> (u16, Bytes) {
        let response = self.send(method, path).await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// `GET /admin/status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let (_, body) = self.request("GET", "/admin/status").await;
        serde_json::from_slice(&body).expect("status is JSON")
    }

    /// A `POST` (pause, resume) that must answer 200; its JSON.
    pub async fn post(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.request("POST", path).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("admin answers JSON")
    }

    /// The Prometheus exposition of `/metrics`, which must answer 200.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.request("GET", "/metrics").await;
        assert_eq!(status, 200);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The outages the proxy counted, every reason but admin pauses and
    /// discovery.
    pub async fn outages(&self) -> f64 {
        let text = self.metrics().await;
        ["refused", "reset", "hang_timeout", "probe_failed"]
            .iter()
            .filter_map(|reason| {
                metric_sample(&text, &format!("s3fp_outages_total{{reason=\"{reason}\"}}"))
            })
            .sum()
    }

    /// Requests held now.
    pub async fn held(&self) -> u64 {
        self.status().await["held"].as_u64().unwrap()
    }

    /// Waits until `held` requests are held.
    pub async fn wait_held(&self, held: u64) {
        wait_until(WAIT, &format!("{held} held requests"), || async {
            self.held().await == held
        })
        .await
        .unwrap();
    }

    /// Waits until the gate reports `reason` (e.g. `hang_timeout`).
    pub async fn wait_reason(&self, reason: &str) {
        wait_until(WAIT, &format!("the gate to report {reason}"), || async {
            self.status().await["reason"] == reason
        })
        .await
        .unwrap();
    }

    /// Waits until the exposition has `series` with `value`.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        self.wait_sample(series, &format!("= {value}"), |v| v == value)
            .await;
    }

    /// Waits until the exposition has `series` at `minimum` or more: a signal
    /// and the file watcher may both pick up one edit.
    pub async fn wait_metric_at_least(&self, series: &str, minimum: f64) {
        self.wait_sample(series, &format!(">= {minimum}"), |v| v >= minimum)
            .await;
    }

    async fn wait_sample(&self, series: &str, what: &str, holds: impl Fn(f64) -> bool) {
        let waited = wait_until(WAIT, &format!("{series} {what}"), || async {
            metric_sample(&self.metrics().await, series).is_some_and(&holds)
        })
        .await;
        if let Err(error) = waited {
            let last = metric_sample(&self.metrics().await, series);
            panic!("{error}; last seen: {last:?}");
        }
    }
}
