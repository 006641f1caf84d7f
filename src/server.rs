//! Wiring and lifecycle: builds the gate, upstream, proxy and probe from a
//! [`Config`], serves the S3 and admin listeners, and shuts down gracefully.
//!
//! [`run`] takes already-bound listeners and a shutdown future from outside,
//! so tests hand it `127.0.0.1:0` sockets and their own trigger. On shutdown,
//! in the Kubernetes order: `/readyz` turns unready at once, and the S3
//! listeners keep accepting and serving for `shutdown.drain_delay` (every
//! HTTP/1.1 answer then carries `Connection: close`) while the endpoint
//! removal reaches kube-proxy and load balancers; then they stop accepting,
//! keep-alive connections are closed once idle (HTTP/2: GOAWAY), and
//! in-flight and held requests get `shutdown.grace` to finish; requests still
//! held then are answered `503 ServiceUnavailable` (with `Retry-After`)
//! before the function returns.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::backend_target::BackendTarget;
use crate::config::{Config, KubernetesConfig};
use crate::gate::{Gate, Transition};
use crate::kubernetes::{self, Steering};
use crate::listener::{ConnectionSlots, S3Listener, accept_loop};
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::proxy::Proxy;
use crate::quarantine::Quarantine;
use crate::reload::{self, LiveParts, ReloadSource};
use crate::settings::Settings;
use crate::tls::{self, ServerCertificate};
use crate::upstream::Upstream;

/// How often the listener's certificate files are checked for a new pair.
const CERTIFICATE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long, after the shutdown grace, the 503 answers of requests still held
/// get to be written before the remaining connections are closed.
const HELD_ANSWER_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// Pause after a failed accept on the admin listener.
const ADMIN_ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(20);

/// The sockets the proxy serves, bound before [`run`] is called.
pub struct Listeners {
    pub s3: TcpListener,
    /// The HTTPS listener, when `[listener.tls]` is configured.
    pub s3_tls: Option<TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        let s3 = TcpListener::bind(config.listener.address)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener.address {}: {e}", config.listener.address),
                )
            })?;
        let admin = TcpListener::bind(config.admin.address).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("admin.address {}: {e}", config.admin.address),
            )
        })?;
        let s3_tls = match &config.listener.tls {
            Some(tls) => Some(TcpListener::bind(tls.address).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener.tls.address {}: {e}", tls.address),
                )
            })?),
            None => None,
        };
        Ok(Listeners { s3, s3_tls, admin })
    }
}

/// Serves until `shutdown` resolves, then drains within `shutdown.grace`.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    run_with_reload(listeners, config, shutdown, None).await
}

/// Like [`run`], reloading the configuration from `reload` while serving.
pub async fn run_with_reload(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
    reload: Option<ReloadSource>,
) -> io::Result<()> {
    let settings = Settings::new(&config).map_err(io::Error::other)?;
    let metrics = Arc::new(Metrics::new());
    metrics.config(&config);
    let gate = Gate::new(settings.gate);
    gate.observe(log_transition);
    gate.observe({
        let metrics = Arc::clone(&metrics);
        move |transition| metrics.transition(transition)
    });
    let target = BackendTarget::new(settings.connector, config.backend.kubernetes.is_some());
    let upstream = Upstream::new(settings.upstream, Arc::clone(&target));
    let prober = Arc::new(Prober::new(
        Arc::clone(&gate),
        Arc::clone(&target),
        settings.probe,
        Arc::clone(&metrics),
    ));
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&gate),
        Arc::clone(&prober),
        upstream,
        settings.proxy,
        Quarantine::new(settings.quarantine),
        Arc::clone(&metrics),
    ));
    let probe_task = tokio::spawn(Arc::clone(&prober).run());
    let ready = Arc::new(AtomicBool::new(true));
    let synced = Arc::new(AtomicBool::new(config.backend.kubernetes.is_none()));
    let discovery_tasks = match &config.backend.kubernetes {
        Some(kubernetes) => {
            let steering = Steering {
                gate: Arc::clone(&gate),
                target: Arc::clone(&target),
                prober: Arc::clone(&prober),
                synced: Arc::clone(&synced),
                via_service: kubernetes.route_to_service.is_some(),
            };
            start_discovery(kubernetes, steering).await?
        }
        None => Vec::new(),
    };
    let admin = Arc::new(Admin {
        proxy: Arc::clone(&proxy),
        prober: Arc::clone(&prober),
        ready: Arc::clone(&ready),
        synced: Arc::clone(&synced),
        settings: settings.admin.into(),
    });
    let certificate = match &config.listener.tls {
        Some(tls) => Some(Arc::new(
            ServerCertificate::load(&tls.cert, &tls.key, tls.files).map_err(io::Error::other)?,
        )),
        None => None,
    };
    let certificate_task = certificate.as_ref().map(|certificate| {
        tokio::spawn(reload::watch_certificate(
            Arc::clone(certificate),
            Arc::clone(&metrics),
            CERTIFICATE_POLL,
        ))
    });
    let reload_task = reload.map(|source| {
        let parts = LiveParts {
            gate: Arc::clone(&gate),
            target: Arc::clone(&target),
            proxy: Arc::clone(&proxy),
            prober: Arc::clone(&prober),
            metrics: Arc::clone(&metrics),
            certificate: certificate.clone(),
            admin: Arc::clone(&admin),
        };
        tokio::spawn(reload::run(source, config.clone(), parts))
    });
    let (admin_stop, admin_stopped) = watch::channel(false);
    let admin_task = tokio::spawn(serve_admin(listeners.admin, admin, admin_stopped));
    tracing::info!(
        listener = %listeners.s3.local_addr()?,
        backend = %config.backend.target(),
        "s3-failover-proxy serving"
    );

    let graceful = GracefulShutdown::new();
    let (stop_accepting, stop) = watch::channel(false);
    let limits = settings.client_limits;
    let slots = ConnectionSlots::new(connection_cap(&config.listener)?);
    let draining = Arc::new(AtomicBool::new(false));
    let plain = S3Listener {
        socket: listeners.s3,
        tls: None,
        limits,
        slots: Arc::clone(&slots),
        draining: Arc::clone(&draining),
    };
    let secure = match (listeners.s3_tls, &certificate) {
        (Some(socket), Some(certificate)) => {
            let config = tls::server_config(Arc::clone(certificate)).map_err(io::Error::other)?;
            Some(S3Listener {
                socket,
                tls: Some(TlsAcceptor::from(Arc::new(config))),
                limits,
                slots,
                draining: Arc::clone(&draining),
            })
        }
        _ => None,
    };
    let serve_secure = async {
        if let Some(secure) = secure {
            accept_loop(secure, Arc::clone(&proxy), &graceful, stop.clone()).await;
        }
    };
    let trigger = async {
        shutdown.await;
        // The Kubernetes order: unready at once, serve on while the endpoint
        // removal reaches kube-proxy and load balancers, then stop accepting.
        ready.store(false, Ordering::SeqCst);
        draining.store(true, Ordering::SeqCst);
        tracing::info!(
            drain_delay = ?config.shutdown.drain_delay,
            "shutting down: unready; still serving, each HTTP/1.1 answer with Connection: close, for shutdown.drain_delay"
        );
        tokio::time::sleep(config.shutdown.drain_delay).await;
        let _ = stop_accepting.send(true);
    };
    tokio::join!(
        accept_loop(plain, Arc::clone(&proxy), &graceful, stop.clone()),
        serve_secure,
        trigger
    );
    tracing::info!(
        held = gate.status().held,
        in_flight = proxy.in_flight().current(),
        grace = ?config.shutdown.grace,
        "shutting down: no new connections; waiting for in-flight and held requests"
    );
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    match tokio::time::timeout(config.shutdown.grace, &mut drained).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => {
            tracing::warn!(
                held = gate.status().held,
                in_flight = proxy.in_flight().current(),
                "shutdown grace period over; answering held requests 503 and closing remaining connections"
            );
            proxy.stop_holding();
            // Shutdown told every connection to close after its answer, so
            // those of held requests end once their 503 is written.
            let _ = tokio::time::timeout(HELD_ANSWER_WRITE, &mut drained).await;
        }
    }
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    probe_task.abort();
    for task in [reload_task, certificate_task]
        .into_iter()
        .flatten()
        .chain(discovery_tasks)
    {
        task.abort();
    }
    Ok(())
}

/// Holds until discovery knows the backend, and starts the EndpointSlice and
/// pause-Lease watches.
async fn start_discovery(
    config: &KubernetesConfig,
    steering: Steering,
) -> io::Result<Vec<tokio::task::JoinHandle<()>>> {
    steering.gate.hold_for_discovery();
    let client = kubernetes::client(config.kubeconfig.as_deref())
        .await
        .map_err(|e| io::Error::other(format!("backend.kubernetes: {e}")))?;
    let lease = tokio::spawn(kubernetes::watch_pause_lease(
        client.clone(),
        config.namespace.clone(),
        config.pause_lease.clone(),
        Arc::clone(&steering.gate),
        Arc::clone(&steering.prober),
    ));
    let endpoints = tokio::spawn(kubernetes::watch_endpoints(
        client,
        config.clone(),
        steering,
    ));
    Ok(vec![endpoints, lease])
}

async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: the error repeats at
                // once until a descriptor frees up, so back off as the S3
                // listener does rather than spin a core. tests/binary.rs sees
                // the line and the recovery; the pause itself saves CPU time,
                // which a test could only observe by timing.
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(ADMIN_ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        let service = service_fn(move |request| {
            let admin = Arc::clone(&admin);
            async move { admin.handle(request).await }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn log_transition(transition: &Transition) {
    let outage_ms = transition.outage.map(|d| d.as_millis() as u64);
    match transition.reason {
        Some(reason) => tracing::warn!(
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            reason = reason.as_str(),
            "backend state change: holding new requests"
        ),
        None => tracing::info!(
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            outage_ms,
            "backend state change"
        ),
    }
}

/// File descriptors kept for everything but client connections: listeners,
/// the admin API, probes, discovery, config and certificate files.
const RESERVED_FDS: u64 = 32;

/// The client connection cap in force: `listener.max_connections`, if the
/// process may open two file descriptors for each (client and backend) on top
/// of [`RESERVED_FDS`]. The soft limit (`ulimit -n`) is raised toward the
/// hard one when needed. A limit too low stops start-up when the key was set,
/// and lowers the default cap (with a warning) when it was not.
fn connection_cap(listener: &crate::config::ListenerConfig) -> io::Result<usize> {
    use rlimit::Resource;
    let wanted = listener.max_connections as u64;
    // Two per connection (client, backend), and one per eighth of them for
    // the connections being refused past the cap.
    let needed = wanted
        .saturating_mul(17)
        .div_ceil(8)
        .saturating_add(RESERVED_FDS);
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft < needed {
        // Best effort: a hard limit below `needed` still leaves more room.
        let _ = Resource::NOFILE.set(needed.min(hard), hard);
    }
    let (soft, _) = Resource::NOFILE.get()?;
    let fits = soft.saturating_sub(RESERVED_FDS) * 8 / 17;
    if fits == 0 {
        return Err(io::Error::other(format!(
            "the process may open {soft} file descriptors (ulimit -n, hard limit {hard}): no room for client connections after the {RESERVED_FDS} the proxy keeps for itself; raise the limit"
        )));
    }
    let cap = if fits >= wanted {
        wanted
    } else if listener.max_connections_set {
        return Err(io::Error::other(format!(
            "listener.max_connections = {wanted} needs {needed} file descriptors (two per connection, one per eighth of them for refusals, and {RESERVED_FDS} more), but the process may open {soft} (ulimit -n, hard limit {hard}): raise the limit or lower the key"
        )));
    } else {
        tracing::warn!(
            fd_limit = soft,
            max_connections = fits,
            "the file-descriptor limit is too low for the default listener.max_connections; using what fits"
        );
        fits
    };
    tracing::info!(
        fd_limit = soft,
        max_connections = cap,
        "client connection cap"
    );
    Ok(usize::try_from(cap).unwrap_or(usize::MAX).max(1))
}
