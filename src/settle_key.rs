//! Checking the `[settle]` key against the backend before a write needs it.
//!
//! A read-back signed with a key the backend does not know, or with the
//! wrong secret, is answered `403` and the write it was for is not settled.
//! That must not wait for a crash to show: once the backend answers, the
//! proxy sends one ListBuckets (`GET /`, S3 API Reference) signed with the
//! `[settle]` key, at start and whenever a reload changes the key, logs the
//! verdict and sets `s3fp_settle_key_rejected`; again when the backend's
//! address changes (another pod, a reload). An answer that says nothing of
//! the key (a `5xx`) is no verdict: the proxy asks again, less and less
//! often. The check never blocks start-up or traffic: the backend may be
//! down when the proxy starts. It cannot see whether the key may read the
//! buckets clients write to (ListBuckets needs no bucket).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use crate::config::SettleCredentials;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::write_settle::ReadBackError;

/// How long to wait before asking again when the backend gave no verdict,
/// at first and at most (doubling in between).
const RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// How often the backend's address is compared with the one the key was
/// checked at (Kubernetes discovery moves it with every new pod).
const ADDRESS_CHECK: Duration = Duration::from_secs(10);

/// The S3 error codes that mean the key itself is not usable (S3 API
/// Reference, "Error responses"; `NotSignedUp` is s3s's unknown key,
/// `UserSuspended` radosgw's): not a permission the key lacks.
const KEY_REJECTED: [&str; 6] = [
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidSecurity",
    "NotSignedUp",
    "UserSuspended",
    "AccountProblem",
];

/// What the backend made of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    /// Signed requests with it are served: ListBuckets answered, or
    /// refused only for want of permission (`AccessDenied`).
    Accepted,
    /// The backend does not know the key, its secret, or lets it do
    /// nothing: the S3 error code.
    Rejected(String),
    /// An answer that says nothing about the key (a `5xx`, another error):
    /// asked again later.
    Unknown(String),
}

impl KeyVerdict {
    /// The verdict of a ListBuckets answer: its status and body.
    pub fn of(status: StatusCode, body: &[u8]) -> KeyVerdict {
        let code = s3_error_code(body);
        match (status, code) {
            (StatusCode::OK, _) => KeyVerdict::Accepted,
            (StatusCode::FORBIDDEN, Some("AccessDenied")) => KeyVerdict::Accepted,
            (StatusCode::FORBIDDEN, Some(code)) if KEY_REJECTED.contains(&code) => {
                KeyVerdict::Rejected(code.to_owned())
            }
            (status, code) => KeyVerdict::Unknown(format!("{status} {}", code.unwrap_or(""))),
        }
    }
}

/// The `<Code>` of an S3 error body.
fn s3_error_code(body: &[u8]) -> Option<&str> {
    crate::write_settle::element(std::str::from_utf8(body).ok()?, "Code")
}

/// What a check was about: the key, and the backend it was checked at.
type Checked = (SettleCredentials, String);

/// Checks each `[settle]` key the proxy runs with, at each backend address
/// it reaches, once the backend gives a verdict; until the proxy's settings
/// are dropped (it shut down).
pub async fn watch(proxy: Arc<Proxy>, metrics: Arc<Metrics>) {
    let mut settings = proxy.watch_settings();
    let mut checked: Option<Checked> = None;
    loop {
        let key = settings.borrow_and_update().settle.clone();
        let address = proxy.backend_connector().address().to_string();
        let current = key.map(|key| (key, address));
        if current.is_none() {
            metrics.settle_key_rejected(false);
        }
        if let Some(due) = current
            .as_ref()
            .filter(|due| Some(*due) != checked.as_ref())
        {
            tokio::select! {
                verdict = verdict(&proxy, &due.0) => report(&metrics, &due.0, &verdict),
                // A reload replaced the key before the backend answered.
                changed = settings.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return,
                },
            }
        }
        checked = current;
        tokio::select! {
            changed = settings.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(ADDRESS_CHECK) => {}
        }
    }
}

/// Asks until the backend gives a verdict.
async fn verdict(proxy: &Proxy, key: &SettleCredentials) -> KeyVerdict {
    let mut wait = RETRY;
    loop {
        let connector = proxy.backend_connector();
        let host = connector.address().to_string();
        match key.ask(&connector, Method::GET, &host, "/").await {
            Ok(answer) => match KeyVerdict::of(answer.status, &answer.body) {
                KeyVerdict::Unknown(said) => {
                    tracing::debug!(
                        said,
                        "the backend's answer says nothing of the [settle] key yet"
                    );
                }
                verdict => return verdict,
            },
            // A ListBuckets answer over its size limit: served.
            Err(ReadBackError::Body) => return KeyVerdict::Accepted,
            Err(error) => {
                tracing::debug!(%error, "the [settle] key could not be checked yet");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RETRY);
    }
}

fn report(metrics: &Metrics, key: &SettleCredentials, verdict: &KeyVerdict) {
    match verdict {
        KeyVerdict::Accepted => {
            metrics.settle_key_rejected(false);
            tracing::info!(access_key_id = %key.access_key_id, "the backend accepts the [settle] key");
        }
        // Never reported: [`verdict`] asks again until it has one.
        KeyVerdict::Unknown(_) => {}
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
    fn an_unknown_or_suspended_key_on_s3s_or_radosgw_is_rejected() {
        for code in ["NotSignedUp", "UserSuspended"] {
            assert_eq!(
                KeyVerdict::of(StatusCode::FORBIDDEN, error(code).as_bytes()),
                KeyVerdict::Rejected(code.into())
            );
        }
    }

    #[test]
    fn an_answer_that_is_not_about_the_key_gives_no_verdict() {
        let unavailable = KeyVerdict::of(StatusCode::SERVICE_UNAVAILABLE, b"<html>down</html>");
        assert!(
            matches!(unavailable, KeyVerdict::Unknown(_)),
            "{unavailable:?}"
        );
        let other = KeyVerdict::of(StatusCode::BAD_REQUEST, error("InvalidRequest").as_bytes());
        assert!(matches!(other, KeyVerdict::Unknown(_)), "{other:?}");
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
