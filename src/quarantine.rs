//! Poison requests: a request that crashes the backend is not sent again.
//!
//! A request in flight when the backend died (its attempt failed after
//! reaching the backend, and the probe confirmed the outage) is a *suspect*:
//! its [`Fingerprint`] is remembered. Every later attempt with a suspect
//! fingerprint (the replay, or the client's own retry) goes through the
//! *suspect lane*, one at a time, so that if the backend dies again only one
//! suspect can be blamed. A suspect attempt that is in flight at a second
//! crash is *poison*, unless the proxy was waiting for that client's next
//! body bytes (a crash in the middle of a slow upload is not its doing): its
//! client gets `400 InvalidRequest` (a client error, which S3 SDKs do not
//! retry, unlike 500/503; the message says why) and the
//! fingerprint is quarantined for `quarantine.duration`: the same request is
//! answered at once, without reaching the backend. A suspect attempt the
//! backend answers clears the suspicion. This is the seed study's
//! "crash-triggering input" rule: recognise the input and block it so the
//! restarted backend survives; the backend crashes at most twice for it.
//!
//! Suspects go first: while a request the backend died with is due to be
//! sent again by the proxy itself, every other request waits before it is
//! sent, so that at a second crash the suspect is alone in flight and no
//! innocent request is cut (or blamed) with it. That wait is the gate's
//! ([`crate::gate::Gate::suspect_due`]), as every other decision of who may
//! be sent when.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, Method, Uri, header};
use tokio::time::Instant;

/// What identifies "the same request" across a client's retries: method,
/// bucket, key, the subresource query parameters with their values (not
/// those of a presigned URL's signature, which change on every signing,
/// [`is_signing_parameter`]; a retry keeps its
/// `uploadId` and `partNumber`), the copy source and the content length.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    method: Method,
    bucket: String,
    key: String,
    subresources: Vec<String>,
    copy_source: Option<String>,
    content_length: Option<u64>,
}

impl Fingerprint {
    /// The fingerprint of a request (path-style: `/bucket/key`).
    pub fn of(method: &Method, uri: &Uri, headers: &HeaderMap) -> Fingerprint {
        let path = uri.path().trim_start_matches('/');
        let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
        let mut subresources: Vec<String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty() && !is_signing_parameter(pair))
            .map(str::to_owned)
            .collect();
        subresources.sort();
        subresources.dedup();
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Fingerprint {
            method: method.clone(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            subresources,
            copy_source: text("x-amz-copy-source"),
            content_length: text(header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()),
        }
    }
}

/// A query parameter of a presigned URL's signature, which changes on every
/// signing: SigV4's `X-Amz-*` ones, and SigV2's `AWSAccessKeyId`,
/// `Signature` and `Expires` (S3's "Authenticating Requests: Using Query
/// Parameters", the form boto3 presigns by default).
fn is_signing_parameter(pair: &str) -> bool {
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    name.starts_with("X-Amz-") || matches!(name, "AWSAccessKeyId" | "Signature" | "Expires")
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} /{}/{}", self.method, self.bucket, self.key)?;
        if !self.subresources.is_empty() {
            write!(f, "?{}", self.subresources.join("&"))?;
        }
        if let Some(source) = &self.copy_source {
            write!(f, " copy-source={source}")?;
        }
        if let Some(length) = self.content_length {
            write!(f, " length={length}")?;
        }
        Ok(())
    }
}

/// Suspects, the lane they take one at a time, and the quarantine.
pub struct Quarantine {
    duration: Mutex<Duration>,
    state: Mutex<State>,
    lane: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Fingerprints in flight at a crash, and when that was.
    suspects: HashMap<Fingerprint, Instant>,
    /// Poison fingerprints and when their quarantine ends.
    quarantined: HashMap<Fingerprint, Instant>,
}

/// One quarantined fingerprint, for `/admin/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineEntry {
    pub fingerprint: String,
    pub remaining: Duration,
}

impl Quarantine {
    pub fn new(duration: Duration) -> Quarantine {
        Quarantine {
            duration: Mutex::new(duration),
            state: Mutex::new(State::default()),
            lane: tokio::sync::Mutex::new(()),
        }
    }

    /// A new `quarantine.duration` (on reload); entries keep their end.
    pub fn set_duration(&self, duration: Duration) {
        *self.duration.lock().unwrap() = duration;
    }

    fn duration(&self) -> Duration {
        *self.duration.lock().unwrap()
    }

    /// False while there is neither a suspect nor a quarantined request:
    /// the common case, which needs no fingerprint.
    pub fn watches_any(&self) -> bool {
        let state = self.state.lock().unwrap();
        !state.suspects.is_empty() || !state.quarantined.is_empty()
    }

    /// True while `fingerprint` is quarantined.
    pub fn is_quarantined(&self, fingerprint: &Fingerprint) -> bool {
        let mut state = self.state.lock().unwrap();
        let now = Instant::now();
        state.quarantined.retain(|_, until| *until > now);
        state.quarantined.contains_key(fingerprint)
    }

    /// True while `fingerprint` is a suspect: its attempts take the lane.
    pub fn is_suspect(&self, fingerprint: &Fingerprint) -> bool {
        let mut state = self.state.lock().unwrap();
        let forget_before = Instant::now().checked_sub(self.duration());
        if let Some(forget_before) = forget_before {
            state.suspects.retain(|_, since| *since > forget_before);
        }
        state.suspects.contains_key(fingerprint)
    }

    /// The backend died with this request in flight. Returns true when it
    /// was a suspect attempt: it is poison, and now quarantined.
    pub fn died_with(&self, fingerprint: &Fingerprint, suspect_attempt: bool) -> bool {
        let mut state = self.state.lock().unwrap();
        if suspect_attempt {
            state.suspects.remove(fingerprint);
            let until = Instant::now() + self.duration();
            state.quarantined.insert(fingerprint.clone(), until);
            return true;
        }
        state.suspects.insert(fingerprint.clone(), Instant::now());
        false
    }

    /// The backend answered a suspect attempt: the request is innocent.
    pub fn answered(&self, fingerprint: &Fingerprint) {
        self.state.lock().unwrap().suspects.remove(fingerprint);
    }

    /// The suspect lane, if no other suspect attempt has it.
    pub fn try_enter_lane(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.lane.try_lock().ok()
    }

    /// Waits for the suspect lane (one suspect attempt at a time), or `None`
    /// at `deadline`.
    pub async fn enter_lane(&self, deadline: Instant) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        tokio::time::timeout_at(deadline, self.lane.lock())
            .await
            .ok()
    }

    /// Quarantined fingerprints now.
    pub fn entries(&self) -> Vec<QuarantineEntry> {
        let state = self.state.lock().unwrap();
        let now = Instant::now();
        let mut entries: Vec<QuarantineEntry> = state
            .quarantined
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(fingerprint, until)| QuarantineEntry {
                fingerprint: fingerprint.to_string(),
                remaining: *until - now,
            })
            .collect();
        entries.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        entries
    }

    /// Ends every quarantine and suspicion (`DELETE /admin/quarantine`);
    /// returns how many fingerprints were quarantined.
    pub fn clear(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        state.suspects.clear();
        std::mem::take(&mut state.quarantined).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(target: &str, copy: Option<&str>) -> Fingerprint {
        let mut headers = HeaderMap::new();
        if let Some(source) = copy {
            headers.insert("x-amz-copy-source", source.parse().unwrap());
        }
        Fingerprint::of(&Method::PUT, &target.parse().unwrap(), &headers)
    }

    #[test]
    fn a_retry_with_a_new_signature_has_the_same_fingerprint() {
        let first = fingerprint(
            "/b/k?partNumber=1&uploadId=7&X-Amz-Signature=aa",
            Some("/src/anyfilename%25.txt"),
        );
        let retry = fingerprint(
            "/b/k?uploadId=7&partNumber=1&X-Amz-Signature=bb",
            Some("/src/anyfilename%25.txt"),
        );
        assert_eq!(first, retry);
        assert_eq!(
            first.to_string(),
            "PUT /b/k?partNumber=1&uploadId=7 copy-source=/src/anyfilename%25.txt"
        );
        assert_ne!(first, fingerprint("/b/k?partNumber=1&uploadId=7", None));
        let other_upload = fingerprint(
            "/b/k?partNumber=1&uploadId=8",
            Some("/src/anyfilename%25.txt"),
        );
        assert_ne!(
            first, other_upload,
            "another upload's part is another request"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspect_that_dies_again_is_quarantined_for_the_duration() {
        let quarantine = Quarantine::new(Duration::from_secs(60));
        let poison = fingerprint("/b/poison", None);
        assert!(
            !quarantine.died_with(&poison, false),
            "first crash: a suspect"
        );
        assert!(quarantine.is_suspect(&poison));
        assert!(quarantine.died_with(&poison, true), "second crash: poison");
        assert!(quarantine.is_quarantined(&poison));
        assert_eq!(quarantine.entries().len(), 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!quarantine.is_quarantined(&poison));
    }

    /// boto3 presigns with SigV2 by default: a retry presigned anew is
    /// the same request.
    #[test]
    fn a_retry_presigned_anew_with_sigv2_has_the_same_fingerprint() {
        let first = fingerprint(
            "/b/poison?AWSAccessKeyId=AK&Signature=aa%3D&Expires=1700000000",
            None,
        );
        let retry = fingerprint(
            "/b/poison?AWSAccessKeyId=AK&Signature=bb%3D&Expires=1700000060",
            None,
        );
        assert_eq!(first, retry);
        assert_eq!(first.to_string(), "PUT /b/poison");
    }

    #[test]
    fn an_answered_suspect_is_innocent() {
        let quarantine = Quarantine::new(Duration::from_secs(60));
        let innocent = fingerprint("/b/innocent", None);
        quarantine.died_with(&innocent, false);
        quarantine.answered(&innocent);
        assert!(!quarantine.is_suspect(&innocent));
    }

    #[test]
    fn clearing_ends_every_quarantine() {
        let quarantine = Quarantine::new(Duration::from_secs(60));
        let poison = fingerprint("/b/poison", None);
        quarantine.died_with(&poison, true);
        assert_eq!(quarantine.clear(), 1);
        assert!(!quarantine.is_quarantined(&poison));
    }
}
