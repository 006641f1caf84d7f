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
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::backend_slots::BackendSlots;
use crate::backend_target::BackendTarget;
use crate::config::{Config, KubernetesConfig};
use crate::gate::{Gate, Transition};
use crate::handover::{self, HandoverListener, ListenerRole, ListenerSockets, Predecessor};
use crate::kubernetes::{self, Steering};
use crate::lanes::Lanes;
use crate::listener::{ConnectionSlots, S3Listener, accept_loop, resting_connections};
use crate::metrics::Metrics;
use crate::probe::Prober;
use crate::proxy::Proxy;
use crate::quarantine::Quarantine;
use crate::read_budget::ReadBudget;
use crate::reload::{self, LiveParts, ReloadSource};
use crate::settings::Settings;
use crate::settle_key;
use crate::shutdown::{Phase, Shutdown};
use crate::tls::{self, ServerCertificate};
use crate::upstream::Upstream;

/// How often the listener's certificate files are checked for a new pair.
const CERTIFICATE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long, after the shutdown grace, the 503 answers of requests still held
/// get to be written before the remaining connections are closed.
const HELD_ANSWER_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long `--take-over` waits for the addresses of a proxy that was
/// exiting to be released, before giving up with "address in use".
const ADDRESS_RELEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// Pause after a failed accept on the admin listener.
const ADMIN_ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(20);

/// The sockets the proxy serves, bound (or taken over) before [`run`] is
/// called.
pub struct Listeners {
    pub s3: TcpListener,
    /// The HTTPS listener, when `[listener.tls]` is configured.
    pub s3_tls: Option<TcpListener>,
    pub admin: TcpListener,
    /// `listener.handover_socket`: where a new process may take these over.
    pub handover: Option<HandoverListener>,
    /// The process these were taken over from: told once this one serves,
    /// and then replaced at `listener.handover_socket`.
    pub predecessor: Option<Predecessor>,
}

impl Listeners {
    /// Sockets the caller bound itself (tests, the experiment), with no
    /// handover.
    pub fn new(s3: TcpListener, s3_tls: Option<TcpListener>, admin: TcpListener) -> Listeners {
        Listeners {
            s3,
            s3_tls,
            admin,
            handover: None,
            predecessor: None,
        }
    }

    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        // First, so that a proxy already running there is named as such.
        let handover = match &config.listener.handover_socket {
            Some(path) => Some(
                HandoverListener::bind(path)
                    .await
                    .map_err(io::Error::other)?,
            ),
            None => None,
        };
        let s3 = bind(config.listener.address, "listener.address").await?;
        let admin = bind(config.admin.address, "admin.address").await?;
        let s3_tls = match &config.listener.tls {
            Some(tls) => Some(bind(tls.address, "listener.tls.address").await?),
            None => None,
        };
        Ok(Listeners {
            s3,
            s3_tls,
            admin,
            handover,
            predecessor: None,
        })
    }

    /// Takes the listening sockets over from the proxy serving at
    /// `listener.handover_socket` (a hot upgrade); an address the config
    /// names differently from the running proxy's is bound afresh. With no
    /// proxy answering there, binds like [`Listeners::bind`].
    pub async fn take_over(config: &Config) -> io::Result<Listeners> {
        let path = config.listener.handover_socket.as_deref().ok_or_else(|| {
            io::Error::other("--take-over needs listener.handover_socket in the config")
        })?;
        let Some(inherited) = handover::take_over(path).await.map_err(io::Error::other)? else {
            tracing::info!(
                path = %path.display(),
                "no running proxy answers at listener.handover_socket; binding the listeners"
            );
            return Listeners::bind_once_free(config).await;
        };
        let mut sockets = inherited.sockets;
        let s3 = inherit_or_bind(&mut sockets, ListenerRole::S3, config.listener.address).await?;
        let admin =
            inherit_or_bind(&mut sockets, ListenerRole::Admin, config.admin.address).await?;
        let s3_tls = match &config.listener.tls {
            Some(tls) => {
                Some(inherit_or_bind(&mut sockets, ListenerRole::S3Tls, tls.address).await?)
            }
            None => None,
        };
        for (role, socket) in sockets {
            tracing::info!(
                role = role.as_str(),
                address = ?socket.local_addr().ok(),
                "a listening socket of the old process is not in this config; closing this process's copy"
            );
        }
        Ok(Listeners {
            s3,
            s3_tls,
            admin,
            handover: None,
            predecessor: Some(inherited.predecessor),
        })
    }

    /// [`Listeners::bind`], waiting up to [`ADDRESS_RELEASE`] for addresses
    /// still in use: a proxy that was exiting as it was asked to hand over
    /// may not have closed them yet.
    async fn bind_once_free(config: &Config) -> io::Result<Listeners> {
        let give_up = tokio::time::Instant::now() + ADDRESS_RELEASE;
        loop {
            match Listeners::bind(config).await {
                Err(error)
                    if error.kind() == io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < give_up =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                bound => return bound,
            }
        }
    }

    /// Copies of the listening sockets, for a handover.
    fn sockets(&self) -> io::Result<ListenerSockets> {
        let mut sockets = ListenerSockets::default();
        sockets.add(ListenerRole::S3, self.s3.as_fd())?;
        if let Some(tls) = &self.s3_tls {
            sockets.add(ListenerRole::S3Tls, tls.as_fd())?;
        }
        sockets.add(ListenerRole::Admin, self.admin.as_fd())?;
        Ok(sockets)
    }
}

async fn bind(address: SocketAddr, key: &str) -> io::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{key} {address}: {e}")))
}

/// The inherited socket of `role` if it listens on `address`, else a new one.
async fn inherit_or_bind(
    sockets: &mut Vec<(ListenerRole, std::net::TcpListener)>,
    role: ListenerRole,
    address: SocketAddr,
) -> io::Result<TcpListener> {
    let found = sockets.iter().position(|(inherited, socket)| {
        *inherited == role && socket.local_addr().is_ok_and(|local| local == address)
    });
    match found {
        Some(index) => {
            let (_, socket) = sockets.remove(index);
            socket.set_nonblocking(true)?;
            tracing::info!(role = role.as_str(), %address, "listening socket taken over");
            TcpListener::from_std(socket)
        }
        None => bind(address, role.config_key()).await,
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
    let read_budget = Arc::new(ReadBudget::new(
        config.backend.large_read_memory,
        config.backend.max_read_bytes,
    ));
    let lanes = Arc::new(Lanes::start(settings.lanes).map_err(|error| {
        io::Error::other(format!(
            "listener.threads = {}: cannot start the threads: {error}",
            settings.lanes
        ))
    })?);
    let upstream = Upstream::new(
        settings.upstream,
        lanes.count(),
        Arc::clone(&target),
        Arc::clone(&read_budget),
        Arc::new(BackendSlots::new(config.backend.max_connections)),
    );
    // Large request bodies share it (plain HTTP/1.1: a TLS connection is
    // served in one round).
    let body_budget = (config.backend.large_read_memory > 0).then_some(read_budget);
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
    let idle_reaper = tokio::spawn(Arc::clone(&proxy).close_idle_backend_connections());
    let settle_key_task = tokio::spawn(settle_key::watch(Arc::clone(&proxy), Arc::clone(&metrics)));
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
    let sockets = match config.listener.handover_socket {
        Some(_) => Some(listeners.sockets()?),
        None => None,
    };
    let (admin_stop, admin_stopped) = watch::channel(false);
    let admin_task = tokio::spawn(serve_admin(listeners.admin, admin, admin_stopped));
    tracing::info!(
        listener = %listeners.s3.local_addr()?,
        backend = %config.backend.target(),
        "s3-failover-proxy serving"
    );
    crate::heap_trim::start();

    let shutdown_phases = Shutdown::default();
    let (stop_accepting, stop) = watch::channel(false);
    let limits = settings.client_limits;
    let cap = connection_cap(&config)?;
    let slots = ConnectionSlots::new(cap.connections, cap.pipes);
    let resting = resting_connections(
        Arc::clone(&proxy),
        limits,
        body_budget.clone(),
        Arc::clone(&lanes),
        slots.pipes(),
    )?;
    // Resting connections are closed with the idle ones.
    tokio::spawn({
        let resting = resting.clone();
        let mut phase = shutdown_phases.watch();
        async move {
            let _ = phase.wait_for(|phase| *phase == Phase::Closing).await;
            resting.close_all();
        }
    });
    let plain = S3Listener {
        socket: listeners.s3,
        tls: None,
        limits,
        slots: Arc::clone(&slots),
        shutdown: shutdown_phases.watch(),
        resting: Some(resting),
        read_budget: body_budget,
        lanes: Arc::clone(&lanes),
    };
    let secure = match (listeners.s3_tls, &certificate) {
        (Some(socket), Some(certificate)) => {
            let config = tls::server_config(Arc::clone(certificate)).map_err(io::Error::other)?;
            Some(S3Listener {
                socket,
                tls: Some(TlsAcceptor::from(Arc::new(config))),
                limits,
                slots,
                shutdown: shutdown_phases.watch(),
                resting: None,
                read_budget: None,
                lanes: Arc::clone(&lanes),
            })
        }
        _ => None,
    };
    // Serving: the process these sockets came from may now drain, and this
    // one takes its place at `listener.handover_socket`.
    let handover = match (listeners.predecessor, listeners.handover) {
        (Some(predecessor), _) => match predecessor.serving().await {
            Ok(handover) => {
                tracing::info!("serving in place of the old process, which now drains");
                Some(handover)
            }
            Err(error) => {
                tracing::warn!(%error, "serving, but no handover socket: this process cannot be taken over");
                None
            }
        },
        (None, handover) => handover,
    };
    let admin_stop = Arc::new(admin_stop);
    // Take-overs are answered until this process exits, also while it
    // drains; `handed` turns true once a new process serves on the sockets.
    let (handed_tx, mut handed) = watch::channel(false);
    let handover_task = match (handover, sockets) {
        (Some(handover), Some(sockets)) => {
            let gate = Arc::clone(&gate);
            let admin_stop = Arc::clone(&admin_stop);
            Some(tokio::spawn(async move {
                let paused = move || {
                    gate.status().paused.then(|| {
                        "this proxy is paused (POST /admin/pause); resume it, then take over"
                            .to_owned()
                    })
                };
                handover.handed_over(sockets, paused).await;
                // The new process answers on the admin address from now on.
                let _ = admin_stop.send(true);
                let _ = handed_tx.send(true);
            }))
        }
        _ => None,
    };
    let handed_over = async move {
        if handed.wait_for(|handed| *handed).await.is_err() {
            // No handover socket: never.
            std::future::pending::<()>().await;
        }
    };
    let serve_secure = async {
        if let Some(secure) = secure {
            accept_loop(secure, Arc::clone(&proxy), stop.clone()).await;
        }
    };
    // Resolves once accepting should stop; true if the sockets were handed
    // over to a new process (which accepts from them from then on).
    let trigger = async {
        tokio::pin!(handed_over);
        let handed = tokio::select! {
            _ = shutdown => {
                // The Kubernetes order: unready at once, serve on while the
                // endpoint removal reaches kube-proxy and load balancers,
                // then stop accepting (or at once if a new process takes the
                // sockets over meanwhile).
                ready.store(false, Ordering::SeqCst);
                shutdown_phases.drain();
                tracing::info!(
                    drain_delay = ?config.shutdown.drain_delay,
                    "shutting down: unready; still serving for shutdown.drain_delay, each HTTP/1.1 answer with Connection: close, HTTP/2 connections sent GOAWAY"
                );
                tokio::select! {
                    _ = tokio::time::sleep(config.shutdown.drain_delay) => false,
                    _ = &mut handed_over => true,
                }
            }
            _ = &mut handed_over => {
                ready.store(false, Ordering::SeqCst);
                shutdown_phases.drain();
                true
            }
        };
        if handed {
            tracing::info!(
                drain_delay = ?config.shutdown.drain_delay,
                "listening sockets handed over: the new process serves; this one stops accepting, and its connections close after their next answer (idle ones after shutdown.drain_delay)"
            );
        }
        let _ = stop_accepting.send(true);
        handed
    };
    let ((), (), handed_over) = tokio::join!(
        accept_loop(plain, Arc::clone(&proxy), stop.clone()),
        serve_secure,
        trigger
    );
    if handed_over {
        // Keep-alive clients move to the new process as their connections
        // close after an answer; only those idle all along are closed under
        // them (the HTTP/1.1 race a client cannot avoid, RFC 9112 §9.6).
        let _ = tokio::time::timeout(
            config.shutdown.drain_delay,
            shutdown_phases.connections_ended(),
        )
        .await;
    }
    tracing::info!(
        held = gate.status().held,
        in_flight = proxy.in_flight().current(),
        grace = ?config.shutdown.grace,
        "shutting down: no new connections; waiting for in-flight and held requests"
    );
    shutdown_phases.close();
    let ended = shutdown_phases.connections_ended();
    tokio::pin!(ended);
    match tokio::time::timeout(config.shutdown.grace, &mut ended).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => {
            tracing::warn!(
                held = gate.status().held,
                in_flight = proxy.in_flight().current(),
                "shutdown grace period over; answering held requests 503 and closing remaining connections"
            );
            proxy.stop_holding();
            // Every connection was told to close after its answer, so
            // those of held requests end once their 503 is written.
            let _ = tokio::time::timeout(HELD_ANSWER_WRITE, &mut ended).await;
        }
    }
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    if let Some(task) = handover_task {
        // Removes the handover socket, unless a successor's is there now.
        task.abort();
        let _ = task.await;
    }
    probe_task.abort();
    idle_reaper.abort();
    settle_key_task.abort();
    for task in [reload_task, certificate_task]
        .into_iter()
        .flatten()
        .chain(discovery_tasks)
    {
        task.abort();
    }
    lanes.stop();
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
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = async { let _ = stop.wait_for(|stopped| *stopped).await; } => {
                    // A keep-alive health checker or scraper moves to the
                    // process that now owns the address (after a handover).
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
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

/// What the file-descriptor limit is spent on: client connections, and the
/// pipes the raw path splices large bodies through (HAProxy's `maxconn` and
/// `maxpipes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DescriptorBudget {
    connections: usize,
    pipes: usize,
}

/// What client connections may cost in file descriptors: the keys that
/// decide it.
#[derive(Debug, Clone, Copy)]
struct DescriptorShares {
    /// `backend.max_connections`; `None`: one backend connection per
    /// client connection.
    backend_max: Option<u64>,
    /// `listener.raw_http1`: pipes for splicing.
    pipes: bool,
}

impl DescriptorShares {
    /// The pipes `connections` client connections get: one per four of
    /// them (HAProxy's default `maxpipes`), at most one per backend
    /// connection (a pipe carries one backend connection's body).
    fn pipes(self, connections: u64) -> u64 {
        if self.pipes {
            (connections / 4).min(self.backend(connections))
        } else {
            0
        }
    }

    /// Backend connections `connections` client connections may open.
    fn backend(self, connections: u64) -> u64 {
        self.backend_max
            .map_or(connections, |max| max.min(connections))
    }

    /// File descriptors `connections` client connections may use at most:
    /// one each, one per eighth of them for the connections being refused
    /// past the cap, their backend connections, and two per pipe.
    fn needed(self, connections: u64) -> u64 {
        connections
            .saturating_add(connections.div_ceil(8))
            .saturating_add(self.backend(connections))
            .saturating_add(self.pipes(connections).saturating_mul(2))
    }

    /// The most client connections `available` descriptors are enough for.
    fn fitting(self, available: u64) -> u64 {
        // `needed` grows with the count: the largest count within it.
        let (mut fits, mut over) = (0u64, available.saturating_add(1));
        while over - fits > 1 {
            let middle = fits + (over - fits) / 2;
            if self.needed(middle) <= available {
                fits = middle;
            } else {
                over = middle;
            }
        }
        fits
    }

    /// What the shares are, for an error message.
    fn describe(self) -> String {
        let backend = match self.backend_max {
            None => "one per backend connection (one per client connection without backend.max_connections)".to_string(),
            Some(max) => format!("one per backend connection (backend.max_connections = {max})"),
        };
        let pipes = if self.pipes {
            ", one pipe (two) per four client connections and at most one per backend connection for listener.raw_http1"
        } else {
            ""
        };
        format!("one per client connection, one per eighth of them for refusals, {backend}{pipes}")
    }
}

/// The client connection cap in force: `listener.max_connections`, if the
/// process may open the descriptors they may need ([`DescriptorShares`]),
/// on top of [`RESERVED_FDS`] and the lanes' own. The soft limit (`ulimit
/// -n`) is raised toward the hard one when needed. A limit too low stops
/// start-up when the key was set, and lowers the default cap (with a
/// warning) when it was not.
fn connection_cap(config: &Config) -> io::Result<DescriptorBudget> {
    use rlimit::Resource;
    let listener = &config.listener;
    let wanted = listener.max_connections as u64;
    let shares = DescriptorShares {
        backend_max: config.backend.max_connections.map(|max| max as u64),
        pipes: listener.raw_http1,
    };
    // Kept for the process itself, and for the lanes' event loops.
    let reserved = RESERVED_FDS
        + crate::lanes::FILE_DESCRIPTORS_PER_LANE.saturating_mul(listener.threads as u64);
    let needed = shares.needed(wanted).saturating_add(reserved);
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft < needed {
        // Best effort: a hard limit below `needed` still leaves more room.
        let _ = Resource::NOFILE.set(needed.min(hard), hard);
    }
    let (soft, _) = Resource::NOFILE.get()?;
    let fits = shares.fitting(soft.saturating_sub(reserved));
    if fits == 0 {
        return Err(io::Error::other(format!(
            "the process may open {soft} file descriptors (ulimit -n, hard limit {hard}): no room for client connections ({}) after the {reserved} the proxy keeps for itself and its listener.threads ({}); raise the limit or lower the key",
            shares.describe(),
            listener.threads
        )));
    }
    let cap = if fits >= wanted {
        wanted
    } else if listener.max_connections_set {
        let remedy = match shares.backend_max {
            None => "raise the limit, lower the key or set backend.max_connections",
            Some(_) => "raise the limit, lower the key or lower backend.max_connections",
        };
        return Err(io::Error::other(format!(
            "listener.max_connections = {wanted} needs {needed} file descriptors ({}, and {reserved} more for the process and its listener.threads), but the process may open {soft} (ulimit -n, hard limit {hard}): {remedy}",
            shares.describe()
        )));
    } else {
        tracing::warn!(
            fd_limit = soft,
            max_connections = fits,
            "the file-descriptor limit is too low for the default listener.max_connections; using what fits"
        );
        fits
    };
    let pipes = shares.pipes(cap);
    let connections = usize::try_from(cap).unwrap_or(usize::MAX).max(1);
    let pipes = usize::try_from(pipes).unwrap_or(usize::MAX);
    tracing::info!(
        fd_limit = soft,
        max_connections = connections,
        max_pipes = pipes,
        "client connection cap"
    );
    Ok(DescriptorBudget { connections, pipes })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW_WITHOUT_BACKEND_CAP: DescriptorShares = DescriptorShares {
        backend_max: None,
        pipes: true,
    };

    #[test]
    fn without_a_backend_cap_each_client_connection_counts_two_descriptors_and_its_shares() {
        // 8 connections: 8 client, 1 refusal, 8 backend, 2 pipes of two.
        assert_eq!(RAW_WITHOUT_BACKEND_CAP.needed(8), 8 + 1 + 8 + 4);
        let hyper_only = DescriptorShares {
            pipes: false,
            ..RAW_WITHOUT_BACKEND_CAP
        };
        assert_eq!(hyper_only.needed(8), 8 + 1 + 8);
        // A hard limit of 20 000 (this project's test machines) less the
        // reserve of two lanes: about 7 600 client connections.
        let fits = RAW_WITHOUT_BACKEND_CAP.fitting(20_000 - 40);
        assert_eq!(fits, 7_603);
        assert!(RAW_WITHOUT_BACKEND_CAP.needed(fits) <= 19_960);
        assert!(RAW_WITHOUT_BACKEND_CAP.needed(fits + 1) > 19_960);
    }

    #[test]
    fn a_backend_cap_lets_ten_thousand_client_connections_fit_in_twenty_thousand_descriptors() {
        let capped = DescriptorShares {
            backend_max: Some(1024),
            pipes: true,
        };
        // 10 000 client, 1 250 refusals, 1 024 backend, 1 024 pipes of two.
        assert_eq!(capped.needed(10_000), 10_000 + 1_250 + 1_024 + 2_048);
        assert!(capped.fitting(20_000 - 40) >= 10_000);
        assert_eq!(
            capped.pipes(10_000),
            1_024,
            "a pipe per backend connection at most"
        );
        assert_eq!(capped.pipes(400), 100, "one per four client connections");
    }

    #[test]
    fn no_descriptor_left_fits_no_connection() {
        assert_eq!(RAW_WITHOUT_BACKEND_CAP.fitting(0), 0);
        assert_eq!(
            RAW_WITHOUT_BACKEND_CAP.fitting(2),
            0,
            "a client and its backend need a refusal's share too"
        );
        assert_eq!(RAW_WITHOUT_BACKEND_CAP.fitting(3), 1);
    }
}
