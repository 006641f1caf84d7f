//! Wiring and lifecycle: builds the gate, upstream, proxy and probe from a
//! [`Config`], serves the S3 and admin listeners, and shuts down gracefully.
//!
//! [`run`] takes already-bound listeners and a shutdown future from outside,
//! so tests hand it `127.0.0.1:0` sockets and their own trigger. On shutdown the
//! S3 listener stops accepting, `/readyz` turns unready, keep-alive connections
//! are closed once idle, and in-flight and held requests get `shutdown.grace`
//! to finish before the function returns anyway.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admin::Admin;
use crate::config::Config;
use crate::gate::{Gate, GateSettings, Transition};
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::probe::{ProbeSettings, Prober};
use crate::proxy::{Proxy, ProxySettings};
use crate::reload::{self, LiveParts, ReloadSource};
use crate::upstream::{Upstream, UpstreamSettings};

/// The sockets the proxy serves, bound before [`run`] is called.
pub struct Listeners {
    pub s3: TcpListener,
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
        Ok(Listeners { s3, admin })
    }
}

pub fn gate_settings(config: &Config) -> GateSettings {
    GateSettings {
        max_held: config.hold.max_requests,
        fail_fast_after: config.hold.fail_fast_after,
        release_concurrency: config.hold.release_concurrency,
        max_pause: config.hold.max_pause,
    }
}

pub fn proxy_settings(config: &Config) -> ProxySettings {
    ProxySettings {
        hold_timeout: config.hold.timeout,
        replay_buffer: config.hold.replay_buffer,
        max_replays: config.hold.max_replays,
        response_timeout: config.backend.response_timeout,
        retry_after: config.hold.retry_after,
    }
}

pub fn probe_settings(config: &Config) -> ProbeSettings {
    ProbeSettings {
        address: config.backend.address.clone(),
        interval: config.probe.interval,
        timeout: config.probe.timeout,
        path: config.probe.path.clone(),
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
    let metrics = Arc::new(Metrics::new());
    metrics.config(&config);
    let gate = Gate::new(gate_settings(&config));
    gate.observe(log_transition);
    gate.observe({
        let metrics = Arc::clone(&metrics);
        move |transition| metrics.transition(transition)
    });
    let upstream = Upstream::new(UpstreamSettings::from(&config.backend));
    let proxy = Arc::new(Proxy::new(
        Arc::clone(&gate),
        upstream,
        proxy_settings(&config),
        Arc::clone(&metrics),
    ));
    let prober = Arc::new(Prober::new(
        Arc::clone(&gate),
        probe_settings(&config),
        Arc::clone(&metrics),
    ));
    let probe_task = tokio::spawn(Arc::clone(&prober).run());
    let ready = Arc::new(AtomicBool::new(true));
    let admin = Arc::new(Admin {
        proxy: Arc::clone(&proxy),
        prober: Arc::clone(&prober),
        ready: Arc::clone(&ready),
        drain_timeout: config.admin.drain_timeout,
    });
    let reload_task = reload.map(|source| {
        let parts = LiveParts {
            gate: Arc::clone(&gate),
            proxy: Arc::clone(&proxy),
            prober: Arc::clone(&prober),
            metrics: Arc::clone(&metrics),
        };
        tokio::spawn(reload::run(source, config.clone(), parts))
    });
    let (admin_stop, admin_stopped) = watch::channel(false);
    let admin_task = tokio::spawn(serve_admin(listeners.admin, admin, admin_stopped));
    tracing::info!(
        listener = %listeners.s3.local_addr()?,
        backend = %config.backend.address,
        "s3-failover-proxy serving"
    );

    let graceful = GracefulShutdown::new();
    serve_s3(&listeners.s3, &proxy, &graceful, shutdown).await;
    drop(listeners.s3);
    ready.store(false, Ordering::SeqCst);
    tracing::info!(
        held = gate.status().held,
        in_flight = proxy.in_flight().current(),
        grace = ?config.shutdown.grace,
        "shutting down: no new connections; waiting for in-flight and held requests"
    );
    match tokio::time::timeout(config.shutdown.grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections finished"),
        Err(_) => tracing::warn!("shutdown grace period over; closing remaining connections"),
    }
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    probe_task.abort();
    if let Some(task) = reload_task {
        task.abort();
    }
    Ok(())
}

async fn serve_s3(
    listener: &TcpListener,
    proxy: &Arc<Proxy>,
    graceful: &GracefulShutdown,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, address)) => serve_s3_connection(stream, address, proxy, graceful),
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
        }
    }
}

fn serve_s3_connection(
    stream: TcpStream,
    address: SocketAddr,
    proxy: &Arc<Proxy>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let peer = Arc::new(Peer::watched(address, &stream));
    let proxy = Arc::clone(proxy);
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let proxy = Arc::clone(&proxy);
        let peer = Arc::clone(&peer);
        async move { Ok::<_, Infallible>(proxy.handle(request, &peer, "http").await) }
    });
    let connection = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, client = %address, "client connection ended with an error");
        }
    });
}

async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
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
