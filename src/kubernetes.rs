//! Kubernetes: the watches that tell the proxy where the backend is and when
//! an operator paused every replica.
//!
//! [`watch_endpoints`] follows the Service's EndpointSlices with kube-runtime's
//! `watcher` (back-off on errors, atomic relist on `InitDone`) into the pure
//! [`EndpointIndex`], and acts on [`choose`]: keep the pod in use, move to a
//! new one (trusted once the probe sees it serve S3), or hold while none is
//! usable. With `route = "service"` requests and probes go to the Service
//! address instead and only the holding follows the slices. A watch error or
//! a 410 keeps the last known backend: a control-plane blip is not a backend
//! outage. Readiness turns on after the first complete list.
//!
//! [`watch_pause_lease`] implements the coordinated pause: while a
//! `coordination.k8s.io/v1` Lease of the configured name exists and has not
//! expired (`renewTime` or `acquireTime` plus `leaseDurationSeconds`, to the
//! microsecond), every replica holds new requests. A Lease, rather than a
//! Service annotation, because its expiry is part of the object: a pre-stop
//! hook that dies mid-way cannot leave traffic paused, and the Service (often
//! owned by a GitOps tool) is not mutated. Deleting the Lease resumes; so does the pause's own end once the
//! old backend went away and a new one serves, and `hold.max_pause`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::backend_address::BackendAddress;
use crate::backend_target::BackendTarget;
use crate::config::KubernetesConfig;
use crate::discovery::{Choice, EndpointIndex, PortSelector, choose};
use crate::gate::Gate;
use crate::probe::Prober;

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot read kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "no in-cluster Kubernetes configuration (set backend.kubernetes.kubeconfig to run outside a cluster): {0}"
    )]
    InCluster(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from the kubeconfig file if given, else the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    // kube's TLS uses the process-wide rustls provider; make it ring, as for
    // the rest of the proxy (an error means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let failed = |message: String| KubernetesError::Kubeconfig {
                path: path.display().to_string(),
                message,
            };
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| failed(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| failed(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| KubernetesError::InCluster(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

/// What discovery steers: the gate, and the backend target requests and
/// probes follow.
pub struct Steering {
    pub gate: Arc<Gate>,
    pub target: Arc<BackendTarget>,
    /// Arms the pause sentinel for the pause Lease.
    pub prober: Arc<Prober>,
    /// Turned on after the first complete list.
    pub synced: Arc<AtomicBool>,
    /// Requests and probes go to the Service address, set at start and never
    /// moved (`backend.kubernetes.route = "service"`): discovery then only
    /// holds and releases, and a new pod is trusted once the probe sees the
    /// Service serve.
    pub via_service: bool,
}

impl Steering {
    /// A new pod is usable at `address`: send requests and probes there
    /// (through the Service, they stay where they are), and hold until the
    /// probe sees it serve.
    fn move_to(&self, address: SocketAddr) {
        if !self.via_service {
            self.target.move_to(BackendAddress::from(address));
        }
        self.gate.backend_moved();
    }

    fn act(&self, choice: Choice, previous: Option<Choice>) {
        if previous != Some(choice) {
            tracing::info!(?choice, "discovery: backend endpoints changed");
        }
        match choice {
            Choice::Keep(_) => self.gate.release_discovery(),
            Choice::SwitchTo(address) => self.move_to(address),
            Choice::Hold { .. } => self.gate.hold_for_discovery(),
        }
    }
}

/// Follows the Service's EndpointSlices until the task is aborted.
pub async fn watch_endpoints(client: Client, config: KubernetesConfig, steering: Steering) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &config.namespace);
    let selector = format!("kubernetes.io/service-name={}", config.service);
    let port = PortSelector::parse(&config.port);
    let mut events = watcher::watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut index = EndpointIndex::default();
    let mut relist: Vec<EndpointSlice> = Vec::new();
    let mut current: Option<SocketAddr> = None;
    let mut last_choice: Option<Choice> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(slice)) => {
                relist.push(slice);
                continue;
            }
            Ok(Event::InitDone) => {
                index.reset(&relist, &port);
                relist.clear();
                if !steering.synced.swap(true, Ordering::SeqCst) {
                    tracing::info!(service = %config.service, "discovery: first complete list of EndpointSlices");
                }
            }
            Ok(Event::Apply(slice)) => index.apply(&slice, &port),
            Ok(Event::Delete(slice)) => index.delete(&slice),
            Err(error) => {
                tracing::warn!(%error, "EndpointSlice watch failed; keeping the last known backend and retrying");
                continue;
            }
        }
        if !steering.synced.load(Ordering::SeqCst) {
            continue;
        }
        let choice = choose(current, &index.endpoints());
        if let Choice::Keep(address) | Choice::SwitchTo(address) = choice {
            current = Some(address);
        }
        steering.act(choice, last_choice);
        last_choice = Some(choice);
    }
}

/// A pause held by one Lease acquisition.
#[derive(Debug, Clone, PartialEq)]
struct LeasePause {
    /// uid and acquire time: a renewed lease is the same pause.
    id: String,
    expires_in: Duration,
}

/// Whether `lease` asks for a pause at `now`, and for how long: until
/// `renewTime` (else `acquireTime`, else creation) plus
/// `leaseDurationSeconds`, to the microsecond.
fn lease_pause(lease: &Lease, now: k8s_openapi::jiff::Timestamp) -> Option<LeasePause> {
    let spec = lease.spec.as_ref()?;
    let since = spec
        .renew_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| spec.acquire_time.as_ref().map(|t| t.0))
        .or_else(|| lease.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    // MicroTime keeps microseconds: whole seconds would end a pause up to a
    // second early or late.
    let duration = k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
        spec.lease_duration_seconds.unwrap_or(0).max(0),
    ));
    let expires = since.checked_add(duration).ok()?;
    let expires_in = Duration::try_from(expires.duration_since(now))
        .ok()
        .filter(|remaining| !remaining.is_zero())?;
    let acquired = spec
        .acquire_time
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    Some(LeasePause {
        id: format!(
            "{}/{acquired}",
            lease.metadata.uid.clone().unwrap_or_default()
        ),
        expires_in,
    })
}

/// Follows the pause Lease until the task is aborted.
pub async fn watch_pause_lease(
    client: Client,
    namespace: String,
    name: String,
    gate: Arc<Gate>,
    prober: Arc<Prober>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let fields = format!("metadata.name={name}");
    let mut events = watcher::watcher(api, watcher::Config::default().fields(&fields))
        .default_backoff()
        .boxed();
    let mut lease: Option<Lease> = None;
    let mut relist: Option<Lease> = None;
    let mut active: Option<String> = None;
    let mut consumed: Option<String> = None;
    loop {
        let now = k8s_openapi::jiff::Timestamp::now();
        let wanted = lease.as_ref().and_then(|l| lease_pause(l, now));
        match (&wanted, &active) {
            (Some(pause), _)
                if active.as_ref() != Some(&pause.id) && consumed.as_ref() != Some(&pause.id) =>
            {
                tracing::info!(lease = %name, expires_in = ?pause.expires_in, "pause Lease: holding new requests on every replica");
                if gate.paused_for().is_none() {
                    prober.arm_sentinel().await;
                }
                gate.pause();
                active = Some(pause.id.clone());
                consumed = Some(pause.id.clone());
            }
            (None, Some(_)) => {
                tracing::info!(lease = %name, "pause Lease gone or expired: resuming");
                gate.resume();
                active = None;
            }
            _ => {}
        }
        let expiry = wanted
            .map(|p| p.expires_in)
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(Event::Apply(object))) => lease = Some(object),
                Some(Ok(Event::Delete(_))) => lease = None,
                Some(Ok(Event::Init)) => relist = None,
                Some(Ok(Event::InitApply(object))) => relist = Some(object),
                Some(Ok(Event::InitDone)) => lease = relist.take(),
                Some(Err(error)) => tracing::warn!(%error, "pause Lease watch failed; retrying"),
                None => return,
            },
            () = tokio::time::sleep(expiry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(renewed_seconds_ago: i64, duration: i32) -> Lease {
        let now = k8s_openapi::jiff::Timestamp::now();
        let renewed =
            k8s_openapi::jiff::Timestamp::from_second(now.as_second() - renewed_seconds_ago)
                .unwrap();
        let mut lease = Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renewed)),
                acquire_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
            ..Default::default()
        };
        lease.metadata.uid = Some("u1".into());
        lease
    }

    #[test]
    fn a_fresh_lease_pauses_until_it_expires() {
        let now = k8s_openapi::jiff::Timestamp::now();
        let pause = lease_pause(&lease(10, 60), now).expect("paused");
        assert!(
            pause.expires_in <= Duration::from_secs(50)
                && pause.expires_in >= Duration::from_secs(49)
        );
    }

    /// A Lease renewed at `renewed` for `seconds`, as the API server sends it.
    fn lease_renewed_at(renewed: &str, seconds: i32) -> Lease {
        let renewed: k8s_openapi::jiff::Timestamp = renewed.parse().unwrap();
        let mut lease = lease(0, seconds);
        let spec = lease.spec.as_mut().unwrap();
        spec.renew_time = Some(MicroTime(renewed));
        spec.acquire_time = Some(MicroTime(renewed));
        lease
    }

    #[test]
    fn a_lease_renewed_mid_second_lasts_to_the_microsecond() {
        let lease = lease_renewed_at("2026-11-30T12:00:00.660000Z", 5);
        let at = |time: &str| lease_pause(&lease, time.parse().unwrap()).map(|p| p.expires_in);
        assert_eq!(
            at("2026-11-30T12:00:04.166000Z"),
            Some(Duration::from_micros(1_494_000))
        );
        assert_eq!(
            at("2026-11-30T12:00:05.659999Z"),
            Some(Duration::from_micros(1))
        );
        assert_eq!(at("2026-11-30T12:00:05.660000Z"), None);
        assert_eq!(
            at("2026-11-30T12:00:05.100000Z").map(|d| d.as_millis()),
            Some(560)
        );
    }

    #[test]
    fn an_expired_lease_does_not_pause() {
        let now = k8s_openapi::jiff::Timestamp::now();
        assert_eq!(lease_pause(&lease(61, 60), now), None);
    }
}
