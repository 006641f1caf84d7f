//! Per-component settings, derived from a validated [`Config`] in one place:
//! [`crate::server`] builds the components from them at start, and
//! [`crate::reload`] hands them to the running components on a reload. A key
//! that feeds a component is read here and nowhere else.

use std::time::Duration;

use crate::admin::AdminSettings;
use crate::config::Config;
use crate::connector::Connector;
use crate::gate::GateSettings;
use crate::listener::ClientLimits;
use crate::probe::ProbeSettings;
use crate::proxy::ProxySettings;
use crate::tls::TlsError;
use crate::upstream::UpstreamSettings;

/// What each component takes from the configuration.
#[derive(Debug)]
pub struct Settings {
    pub gate: GateSettings,
    pub proxy: ProxySettings,
    pub upstream: UpstreamSettings,
    pub probe: ProbeSettings,
    pub admin: AdminSettings,
    /// How long a poison request stays quarantined (`quarantine.duration`).
    pub quarantine: Duration,
    /// How to reach the backend named in the file (TLS files read): the
    /// [`crate::backend_target::BackendTarget`] takes it.
    pub connector: Connector,
    /// The client connection limits; restart-only.
    pub client_limits: ClientLimits,
    /// Threads serving client connections (see [`crate::lanes`]); restart-only.
    pub lanes: usize,
}

impl Settings {
    /// The settings `config` describes; fails when the backend TLS files do
    /// not load.
    pub fn new(config: &Config) -> Result<Settings, TlsError> {
        Ok(Settings {
            gate: gate(config),
            proxy: proxy(config),
            upstream: upstream(config),
            probe: probe(config),
            admin: admin(config),
            quarantine: config.quarantine.duration,
            connector: Connector::from_config(&config.backend)?,
            client_limits: client_limits(config),
            lanes: config.listener.threads,
        })
    }
}

fn gate(config: &Config) -> GateSettings {
    GateSettings {
        max_held: config.hold.max_requests,
        max_held_per_client: config.hold.max_requests_per_client,
        fail_fast_after: config.hold.fail_fast_after,
        release_concurrency: config.hold.release_concurrency,
        max_pause: config.hold.max_pause,
    }
}

fn proxy(config: &Config) -> ProxySettings {
    ProxySettings {
        hold_timeout: config.hold.timeout,
        replay_buffer: config.hold.replay_buffer,
        replay_memory: config.hold.replay_memory,
        max_replays: config.hold.max_replays,
        response_timeout: config.backend.response_timeout,
        retry_after: config.hold.retry_after,
        forwarding: config.forwarding.clone(),
        client_body_timeout: config.listener.client_body_timeout,
        first_byte_timeout: config.backend.first_byte_timeout,
        slow_first_byte_timeout: config.backend.slow_first_byte_timeout,
        expect_continue_timeout: config.backend.expect_continue_timeout,
        settle: config.settle.clone(),
    }
}

fn upstream(config: &Config) -> UpstreamSettings {
    UpstreamSettings {
        connect_timeout: config.backend.connect_timeout,
        max_idle: config.backend.max_idle_connections,
        queue_timeout: config.backend.queue_timeout,
        idle_timeout: config.backend.idle_timeout,
        max_headers: config.backend.max_headers,
        max_head_bytes: config.backend.max_head_bytes,
        max_read_bytes: config.backend.max_read_bytes,
    }
}

fn probe(config: &Config) -> ProbeSettings {
    ProbeSettings {
        interval: config.probe.interval,
        timeout: config.probe.timeout,
        path: config.probe.path.clone(),
    }
}

fn admin(config: &Config) -> AdminSettings {
    AdminSettings {
        drain_timeout: config.admin.drain_timeout,
        token: config.admin.token.clone(),
    }
}

fn client_limits(config: &Config) -> ClientLimits {
    ClientLimits {
        max_headers: config.listener.max_headers,
        max_head_bytes: config.listener.max_head_bytes,
        max_read_bytes: config.listener.max_read_bytes,
        header_timeout: config.listener.header_timeout,
        send_timeout: config.listener.send_timeout,
        raw_http1: config.listener.raw_http1,
    }
}
