//! The active probe: while the gate is not Up, one task asks the backend at a
//! short interval whether it is frontend-up again, and tells the gate.
//!
//! A probe is a TCP connect followed by a cheap `HEAD` request; any HTTP answer
//! but a gateway error (502/503/504) counts as serving, since an S3 server
//! answers an unsigned request with 403 long before anything else works. There
//! is one probe loop per backend, so probe traffic does not grow with the number
//! of held requests. It asks wherever the [`BackendTarget`] points, as the
//! upstream pool connects there.
//!
//! The same probe confirms a suspected outage: when one request fails (reset,
//! early close, no progress), [`Prober::confirm`] asks the backend at once on a
//! fresh connection, and only a failed check takes the gate down. Requests
//! that failed before a check began share its verdict, so a crash that cuts
//! a hundred requests costs one check.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend_target::BackendTarget;
use crate::connector::Connector;
use crate::gate::{Gate, Phase};
use crate::metrics::Metrics;
use crate::outcome::ProbeResult;

/// How and how often to probe; shared with the reload path.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub path: String,
}

/// Why one probe did not see the backend serving.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("request failed: {0}")]
    Io(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("not an HTTP answer")]
    NotHttp,
    #[error("answered {0}, a gateway error")]
    GatewayError(u16),
}

/// Watches one backend address for the gate.
pub struct Prober {
    gate: Arc<Gate>,
    target: Arc<BackendTarget>,
    settings: RwLock<ProbeSettings>,
    sentinel: Mutex<Option<TcpStream>>,
    metrics: Arc<Metrics>,
    /// The last confirmation; the lock makes checks run one at a time.
    confirmation: tokio::sync::Mutex<Option<Confirmation>>,
}

/// The verdict of one confirmation check and when it began.
#[derive(Debug, Clone, Copy)]
struct Confirmation {
    ended: Instant,
    serving: bool,
}

impl Prober {
    pub fn new(
        gate: Arc<Gate>,
        target: Arc<BackendTarget>,
        settings: ProbeSettings,
        metrics: Arc<Metrics>,
    ) -> Prober {
        Prober {
            gate,
            target,
            settings: RwLock::new(settings),
            sentinel: Mutex::new(None),
            metrics,
            confirmation: tokio::sync::Mutex::new(None),
        }
    }

    pub fn update_settings(&self, settings: ProbeSettings) {
        *self.settings.write().unwrap() = settings;
    }

    fn settings(&self) -> ProbeSettings {
        self.settings.read().unwrap().clone()
    }

    /// Opens the sentinel connection for a pause; a backend that cannot be
    /// reached is already gone.
    pub async fn arm_sentinel(&self) {
        let settings = self.settings();
        let connector = self.target.connector();
        match tokio::time::timeout(settings.timeout, connector.connect_tcp()).await {
            Ok(Ok(stream)) => *self.sentinel.lock().unwrap() = Some(stream),
            _ => self.gate.backend_gone(),
        }
    }

    /// Reports a closed sentinel to the gate; drops it once the pause is over.
    fn check_sentinel(&self) {
        let mut sentinel = self.sentinel.lock().unwrap();
        if self.gate.paused_for().is_none() {
            *sentinel = None;
            return;
        }
        let Some(stream) = sentinel.as_ref() else {
            return;
        };
        let mut byte = [0u8; 1];
        let closed = match stream.try_read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
        };
        if closed {
            tracing::info!("the paused backend went away");
            *sentinel = None;
            self.gate.backend_gone();
        }
    }

    /// Whether the backend serves, asked on a fresh connection for a request
    /// that failed at `failed_at`; a check that ended after that moment (one
    /// under way when the request failed) answers for it too.
    pub async fn confirm(&self, failed_at: Instant) -> bool {
        let mut last = self.confirmation.lock().await;
        if let Some(done) = *last
            && done.ended >= failed_at
        {
            return done.serving;
        }
        let result = probe_once(&self.target.connector(), &self.settings()).await;
        if let Err(error) = &result {
            tracing::debug!(%error, "confirmation: backend not serving");
        }
        let serving = result.is_ok();
        *last = Some(Confirmation {
            ended: Instant::now(),
            serving,
        });
        serving
    }

    /// Probes whenever the gate is not Up, until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        let mut phase = self.gate.phase();
        loop {
            if phase.wait_for(|p| *p != Phase::Up).await.is_err() {
                return;
            }
            let current = self.settings();
            self.check_sentinel();
            let probed = probe_once(&self.target.connector(), &current).await;
            let result = ProbeResult::of(probed.is_ok());
            match &probed {
                Ok(status) => tracing::debug!(status, result = result.as_str(), "probe"),
                Err(error) => tracing::debug!(%error, result = result.as_str(), "probe"),
            }
            self.metrics.probe(result);
            self.gate.probe_result(result.is_serving());
            if *phase.borrow_and_update() != Phase::Up {
                tokio::time::sleep(current.interval).await;
            }
        }
    }
}

/// One probe through `connector`: the HTTP status the backend answered, or
/// why it did not.
pub async fn probe_once(
    connector: &Connector,
    settings: &ProbeSettings,
) -> Result<u16, ProbeError> {
    match tokio::time::timeout(settings.timeout, ask(connector, &settings.path)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(settings.timeout)),
    }
}

async fn ask(connector: &Connector, path: &str) -> Result<u16, ProbeError> {
    let mut stream = connector.connect().await.map_err(ProbeError::Connect)?;
    let address = connector.address();
    let request = format!(
        "HEAD {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: s3-failover-proxy-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while head.len() < 12 {
        let n = stream.read(&mut buf).await.map_err(ProbeError::Io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status = parse_status(&head).ok_or(ProbeError::NotHttp)?;
    if matches!(status, 502..=504) {
        return Err(ProbeError::GatewayError(status));
    }
    Ok(status)
}

/// The status code of an `HTTP/1.x NNN` status line.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.strip_prefix(b"HTTP/1.")?;
    let code = line.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read() {
        assert_eq!(parse_status(b"HTTP/1.1 403 Forbidden\r\n"), Some(403));
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH"), None);
    }

    #[tokio::test]
    async fn a_closed_port_is_not_serving() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let settings = ProbeSettings {
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
            path: "/".into(),
        };
        assert!(matches!(
            probe_once(&Connector::plain(address.into()), &settings).await,
            Err(ProbeError::Connect(_))
        ));
    }

    #[tokio::test]
    async fn a_listener_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = ProbeSettings {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(100),
            path: "/".into(),
        };
        let connector = Connector::plain(listener.local_addr().unwrap().into());
        let result = probe_once(&connector, &settings).await;
        assert!(matches!(result, Err(ProbeError::Timeout(_))));
    }
}
