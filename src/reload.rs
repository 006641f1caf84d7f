//! Hot reload: on SIGHUP, and when the config file's content changes, the file
//! is read again and validated; what can change live is applied without
//! touching a connection or a held request, what cannot (listen addresses, log
//! format, `backend.kubernetes`...) keeps its running value and is reported,
//! and an invalid file is rejected with a log line and a metric while the old
//! configuration stays in force.
//!
//! The file is compared by content, polled every second, so a Kubernetes
//! ConfigMap update (a symlink swap) is seen like an edit in place. The admin
//! token file is watched the same way: a rotated Secret reloads the
//! configuration, and the new token replaces the old one at once. Both are
//! read through [`trusted_file`] (size checked before reading), and a file
//! that is refused (world-writable, over 1 MiB, an empty token) fails the
//! reload, once per change, and the running configuration stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::admin::Admin;
use crate::backend_target::BackendTarget;
use crate::config::Config;
use crate::gate::Gate;
use crate::logging::LogLevel;
use crate::metrics::Metrics;
use crate::outcome::ReloadResult;
use crate::probe::Prober;
use crate::proxy::Proxy;
use crate::settings::Settings;
use crate::tls::{CertificateReload, ServerCertificate, TlsError};
use crate::trusted_file;

/// Where reloads come from.
pub struct ReloadSource {
    /// The config file to read again.
    pub path: PathBuf,
    /// One message per reload request (SIGHUP in `main`).
    pub requests: mpsc::Receiver<()>,
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// The live log filter, when `main` installed one.
    pub log_level: Option<LogLevel>,
}

/// The parts of the running proxy a reload changes.
pub struct LiveParts {
    pub gate: Arc<Gate>,
    /// Where requests and probes go; a reload changes how to connect.
    pub target: Arc<BackendTarget>,
    pub proxy: Arc<Proxy>,
    pub prober: Arc<Prober>,
    pub metrics: Arc<Metrics>,
    /// The HTTPS listener's certificate, checked on every reload request.
    pub certificate: Option<Arc<ServerCertificate>>,
    /// The admin API, whose token and drain timeout change live.
    pub admin: Arc<Admin>,
}

/// Sets every restart-only key of `new` back to its value in `running`
/// (listen addresses, request head limits, log format, discovery, shutdown
/// grace: what `server::run` read once at start) and names the keys that
/// differed, so a reload applies only what can change live and records what
/// is in force.
fn keep_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            keep_running(&mut changed, $key, &running.$($field).+, &mut new.$($field).+)
        };
    }
    keep!("listener.address", listener.address);
    keep!("listener.tls", listener.tls);
    keep!("listener.max_headers", listener.max_headers);
    keep!("listener.max_head_bytes", listener.max_head_bytes);
    keep!("listener.max_read_bytes", listener.max_read_bytes);
    keep!("listener.header_timeout", listener.header_timeout);
    keep!("listener.send_timeout", listener.send_timeout);
    if keep!("listener.max_connections", listener.max_connections) {
        new.listener.max_connections_set = running.listener.max_connections_set;
    }
    keep!("listener.threads", listener.threads);
    keep!("listener.handover_socket", listener.handover_socket);
    keep!("admin.address", admin.address);
    keep!("log.format", log.format);
    keep!("backend.kubernetes", backend.kubernetes);
    keep!("backend.max_connections", backend.max_connections);
    keep!("backend.max_read_bytes", backend.max_read_bytes);
    keep!("backend.large_read_memory", backend.large_read_memory);
    keep!("shutdown.drain_delay", shutdown.drain_delay);
    keep!("shutdown.grace", shutdown.grace);
    changed
}

/// Sets `new` back to `running` when they differ, naming `key` in
/// `changed`; true when it did.
fn keep_running<T: PartialEq + Clone>(
    changed: &mut Vec<&'static str>,
    key: &'static str,
    running: &T,
    new: &mut T,
) -> bool {
    if running == new {
        return false;
    }
    *new = running.clone();
    changed.push(key);
    true
}

/// Applies the live part of `new`; fails (changing nothing) when the new
/// backend TLS files do not load.
fn apply(parts: &LiveParts, new: &Config, log_level: Option<&LogLevel>) -> Result<(), TlsError> {
    let settings = Settings::new(new)?;
    parts.target.reconfigure(settings.connector);
    parts.gate.update_settings(settings.gate);
    parts.proxy.update_settings(settings.proxy);
    parts.proxy.quarantine().set_duration(settings.quarantine);
    parts.proxy.update_upstream(settings.upstream);
    parts.prober.update_settings(settings.probe);
    parts.metrics.config(new);
    parts.admin.update_settings(settings.admin);
    if let Some(log_level) = log_level {
        log_level.set(&new.log.level);
    }
    Ok(())
}

/// Applies what can change live of `new` and returns the configuration now
/// in force: `new` with the running restart-only values, every key kept
/// that way logged.
fn live_part(
    running: &Config,
    mut new: Config,
    parts: &LiveParts,
    log_level: Option<&LogLevel>,
) -> Result<Config, String> {
    let kept = keep_restart_only(running, &mut new);
    apply(parts, &new, log_level).map_err(|e| e.to_string())?;
    for key in kept {
        tracing::warn!(
            key,
            "config reload: this setting only changes on restart; keeping the running value until the proxy restarts"
        );
    }
    Ok(new)
}

/// Reloads until `source.requests` closes (the proxy shut down).
pub async fn run(mut source: ReloadSource, initial: Config, parts: LiveParts) {
    let mut last_seen = watched_files(&source.path, &initial).unwrap_or_default();
    let mut current = initial;
    let mut ticker = tokio::time::interval(source.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            request = source.requests.recv() => match request {
                Some(()) => "signal",
                None => return,
            },
            _ = ticker.tick() => "file change",
        };
        if trigger == "signal"
            && let Some(certificate) = &parts.certificate
        {
            check_certificate(certificate, &parts.metrics);
        }
        let Some(seen) = watched_files(&source.path, &current) else {
            continue;
        };
        if trigger == "file change" && seen == last_seen {
            continue;
        }
        last_seen = seen;
        match Config::load(&source.path, current.files)
            .map_err(|e| e.to_string())
            .and_then(|new| live_part(&current, new, &parts, source.log_level.as_ref()))
        {
            Ok(new) => {
                parts.metrics.reload(ReloadResult::Success);
                tracing::info!(trigger, path = %source.path.display(), "config reloaded");
                current = new;
            }
            Err(error) => {
                parts.metrics.reload(ReloadResult::Failure);
                tracing::error!(trigger, %error, "config reload rejected; the running configuration stays in force");
            }
        }
    }
}

/// What the config file, the running admin token file and `[settle]`
/// secret file hold now (or why they cannot be read): a change of any is a
/// reason to reload. `None` when the process is out of file descriptors,
/// which says nothing about them.
fn watched_files(path: &Path, current: &Config) -> Option<Vec<Result<Vec<u8>, String>>> {
    let token_file = current.admin.token.as_ref().map(|token| token.file());
    let settle_secret = current
        .settle
        .as_ref()
        .map(|settle| settle.secret_access_key_file.as_path());
    std::iter::once(path)
        .chain(token_file)
        .chain(settle_secret)
        .map(|file| match trusted_file::read(file, current.files) {
            Err(error) if error.is_descriptor_shortage() => None,
            read => Some(read.map_err(|e| e.to_string())),
        })
        .collect()
}

/// Swaps in a changed certificate pair; a broken one is logged and counted,
/// and the old pair keeps serving.
pub fn check_certificate(certificate: &ServerCertificate, metrics: &Metrics) {
    match certificate.reload_if_changed() {
        CertificateReload::Unchanged => {}
        CertificateReload::Reloaded => {
            metrics.certificate_reload(ReloadResult::Success);
            tracing::info!("TLS certificate reloaded; new handshakes use the new pair");
        }
        CertificateReload::Rejected(error) => {
            metrics.certificate_reload(ReloadResult::Failure);
            tracing::error!(%error, "new TLS certificate rejected; the old pair keeps serving");
        }
    }
}

/// Checks the certificate files every `poll` until the task is aborted.
pub async fn watch_certificate(
    certificate: Arc<ServerCertificate>,
    metrics: Arc<Metrics>,
    poll: Duration,
) {
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        check_certificate(&certificate, &metrics);
    }
}
