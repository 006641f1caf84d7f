//! Checking the `[settle]` key against the backend before a write needs it.
//!
//! A read-back signed with a key the backend does not know, or with the
//! wrong secret, is answered `403` and the write it was for is not settled.
//! That must not wait for a crash to show: once the backend answers, the
//! proxy sends one ListBuckets (`GET /`, S3 API Reference) signed with the
//! `[settle]` key, at start and whenever a reload changes the key, logs the
//! verdict and sets `s3fp_settle_key_rejected`. The check never blocks
//! start-up or traffic: the backend may be down when the proxy starts.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use crate::config::SettleCredentials;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::write_settle::ReadBackError;

/// How long to wait before asking again when the backend did not answer.
const RETRY: Duration = Duration::from_secs(2);

/// The S3 error codes that mean the key itself is wrong (S3 API Reference,
/// "Error responses"): not a permission the key lacks.
const KEY_REJECTED: [&str; 3] = [
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidSecurity",
];

/// What the backend made of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    /// Signed requests with it are served (ListBuckets answered, or refused
    /// only for want of permission).
    Accepted,
    /// The backend does not know the key or its secret: the S3 error code.
    Rejected(String),
}

impl KeyVerdict {
    /// The verdict of a ListBuckets answer: its status and body.
    pub fn of(status: StatusCode, body: &[u8]) -> KeyVerdict {
        let code = s3_error_code(body);
        match code {
            Some(code) if status == StatusCode::FORBIDDEN && KEY_REJECTED.contains(&code) => {
                KeyVerdict::Rejected(code.to_owned())
            }
            _ => KeyVerdict::Accepted,
        }
    }
}

/// The `<Code>` of an S3 error body.
fn s3_error_code(body: &[u8]) -> Option<&str> {
    let xml = std::str::from_utf8(body).ok()?;
    let start = xml.find("<Code>")? + "<Code>".len();
    let end = start + xml[start..].find("</Code>")?;
    Some(xml[start..end].trim())
}

/// Checks each `[settle]` key the proxy runs with, once the backend answers,
/// until the proxy's settings are dropped (it shut down).
pub async fn watch(proxy: Arc<Proxy>, metrics: Arc<Metrics>) {
    let mut settings = proxy.watch_settings();
    let mut checked: Option<SettleCredentials> = None;
    loop {
        let key = settings.borrow_and_update().settle.clone();
        if key != checked {
            metrics.settle_key_rejected(false);
            if let Some(key) = &key {
                tokio::select! {
                    verdict = verdict(&proxy, key) => report(&metrics, key, &verdict),
                    // A reload replaced the key before the backend answered.
                    changed = settings.changed() => match changed {
                        Ok(()) => continue,
                        Err(_) => return,
                    },
                }
            }
            checked = key;
        }
        if settings.changed().await.is_err() {
            return;
        }
    }
}

/// Asks until the backend answers.
async fn verdict(proxy: &Proxy, key: &SettleCredentials) -> KeyVerdict {
    loop {
        let connector = proxy.backend_connector();
        let host = connector.address().to_string();
        match key.ask(&connector, Method::GET, &host, "/").await {
            Ok(answer) => return KeyVerdict::of(answer.status, &answer.body),
            Err(ReadBackError::Body) => return KeyVerdict::Accepted,
            Err(error) => {
                tracing::debug!(%error, "the [settle] key could not be checked yet");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

fn report(metrics: &Metrics, key: &SettleCredentials, verdict: &KeyVerdict) {
    match verdict {
        KeyVerdict::Accepted => {
            tracing::info!(access_key_id = %key.access_key_id, "the backend accepts the [settle] key");
        }
        KeyVerdict::Rejected(code) => {
            metrics.settle_key_rejected(true);
            tracing::error!(
                access_key_id = %key.access_key_id,
                code = code.as_str(),
                "the backend rejects the [settle] key (settle.access_key_id, settle.secret_access_key_file): writes whose answer is lost cannot be read back, and are replayed or answered 503 as without [settle]"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: &str) -> String {
        format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m</Message></Error>")
    }

    #[test]
    fn an_unknown_key_or_a_wrong_secret_is_rejected() {
        for code in ["InvalidAccessKeyId", "SignatureDoesNotMatch"] {
            assert_eq!(
                KeyVerdict::of(StatusCode::FORBIDDEN, error(code).as_bytes()),
                KeyVerdict::Rejected(code.into())
            );
        }
    }

    #[test]
    fn a_key_without_permission_to_list_is_accepted() {
        let denied = error("AccessDenied");
        assert_eq!(
            KeyVerdict::of(StatusCode::FORBIDDEN, denied.as_bytes()),
            KeyVerdict::Accepted
        );
        assert_eq!(
            KeyVerdict::of(StatusCode::OK, b"<ListAllMyBucketsResult/>"),
            KeyVerdict::Accepted
        );
    }
}
