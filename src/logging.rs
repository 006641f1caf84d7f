//! Log output: human-readable lines by default (coloured only on a terminal,
//! so files and `kubectl logs` get plain text), JSON on request, filtered by a
//! tracing directive (`log.level`, overridable with `RUST_LOG`). The filter can
//! be changed while running, through the [`LogLevel`] handle the reload uses.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::{LogConfig, LogFormat};

/// Changes the active log filter.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set at start: it wins over the config file.
    pinned_by_env: bool,
}

impl LogLevel {
    /// Applies a new `log.level` directive (validated by the config).
    pub fn set(&self, directive: &str) {
        if self.pinned_by_env {
            tracing::info!("RUST_LOG is set; log.level from the config is not applied");
            return;
        }
        match EnvFilter::try_new(directive) {
            Ok(filter) => {
                if let Err(error) = self.handle.reload(filter) {
                    tracing::warn!(%error, "cannot change the log level");
                }
            }
            Err(error) => tracing::warn!(%error, directive, "invalid log level"),
        }
    }
}

/// Installs the global subscriber; call once, from `main`.
pub fn init(config: &LogConfig) -> LogLevel {
    let from_env = EnvFilter::try_from_default_env().ok();
    let pinned_by_env = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&config.level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match config.format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    LogLevel {
        handle,
        pinned_by_env,
    }
}
