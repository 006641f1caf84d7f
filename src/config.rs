//! Configuration: the TOML file an operator writes, read in two layers.
//!
//! [`RawConfig`] mirrors the file (serde, `deny_unknown_fields`, humantime
//! durations, every key optional with a default); [`Config::from_raw`] turns it
//! into a validated [`Config`] whose errors name the offending key. `main` and
//! the reload path both go through [`Config::load`], which reads the file, and
//! the certificate, key and token files it names, through [`trusted_file`]
//! (no world-writable file, none over 1 MiB).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::admin_token::AdminToken;
use crate::backend_address::BackendAddress;
use crate::read_budget::READS_HELD;
use crate::trusted_file::{self, FileError, FilePolicy};

/// A configuration that could not be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file: {0}")]
    File(#[from] FileError),
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The proxy's own key for read-backs (`[settle]` in the config).
#[derive(Clone, PartialEq, Eq)]
pub struct SettleCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The SigV4 signing region (`us-east-1` unless set).
    pub region: String,
    /// The file the secret was read from (watched for a new secret).
    pub secret_access_key_file: std::path::PathBuf,
}

impl std::fmt::Debug for SettleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettleCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("region", &self.region)
            .finish()
    }
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listener: ListenerConfig,
    pub forwarding: ForwardingConfig,
    pub backend: BackendConfig,
    pub hold: HoldConfig,
    pub probe: ProbeConfig,
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
    pub quarantine: QuarantineConfig,
    pub log: LogConfig,
    /// The proxy's own key for reading back ambiguous writes (`[settle]`);
    /// `None`: writes whose answer was lost are not settled.
    pub settle: Option<SettleCredentials>,
    /// Which config, certificate, key and token files are accepted: from the
    /// command line, never from the file itself.
    pub files: FilePolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Where S3 clients connect over plain HTTP.
    pub address: SocketAddr,
    /// A second listener for HTTPS, when configured.
    pub tls: Option<ListenerTlsConfig>,
    /// Most header fields in a request head (HTTP/1.1); more get `431`.
    pub max_headers: usize,
    /// Most bytes in a request head (HTTP/1.1), or in an HTTP/2 header list.
    pub max_head_bytes: usize,
    /// Largest read of a request body of at least this many bytes, over
    /// plain HTTP/1.1, within `backend.large_read_memory` (see
    /// `round_kind`). Restart-only.
    pub max_read_bytes: usize,
    /// A client silent this long in the middle of its request body gets
    /// `408 RequestTimeout` (nginx's `client_body_timeout`).
    pub client_body_timeout: Duration,
    /// Longest wait for a whole request head, counted from the connection's
    /// start (after its TLS handshake) or the end of the previous response:
    /// so also how long an idle HTTP/1.1 keep-alive connection is kept. Then
    /// the connection is closed (nginx's `client_header_timeout`; HAProxy's
    /// `timeout http-request` and `http-keep-alive`). Restart-only.
    pub header_timeout: Duration,
    /// A client that takes no response byte for this long is cut (nginx's
    /// `send_timeout`; HAProxy's `timeout client`). Restart-only.
    pub send_timeout: Duration,
    /// Client connections open at once; more are answered `503 SlowDown`
    /// and closed. Each may use two file descriptors (client and backend),
    /// checked against the process's limit at start. Restart-only.
    pub max_connections: usize,
    /// True when `max_connections` was set in the file (not the default):
    /// then a file-descriptor limit too low for it stops start-up.
    pub max_connections_set: bool,
    /// Threads that serve client connections, each running its own event
    /// loop with its share of the connections and of the backend pool
    /// ([`crate::lanes`]; HAProxy's `nbthread`, nginx's `worker_processes`).
    /// By default one per core the process may use. Restart-only.
    pub threads: usize,
    /// A UNIX socket where the running proxy hands its listening sockets to
    /// a new process started with `--take-over` (a hot binary upgrade on one
    /// host, as HAProxy's `expose-fd listeners`); unset, there is none.
    /// Created with mode 0600; only a process of the same user is served.
    /// Restart-only.
    pub handover_socket: Option<PathBuf>,
    /// Plain-HTTP/1.1 GET and HEAD requests with no body, while the backend
    /// is up, are forwarded as the bytes that came, without hyper
    /// ([`crate::raw_http1`]): about 40 % less CPU per small request, and
    /// large bodies moved with `splice(2)`. On by default. Restart-only.
    pub raw_http1: bool,
}

/// The `X-Forwarded-For` / `X-Forwarded-Proto` headers the proxy adds.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardingConfig {
    /// Add them at all; `false` forwards requests with no header added.
    pub enabled: bool,
    /// Hops (addresses or CIDR ranges) whose `X-Forwarded-Proto` is kept: a
    /// TLS-terminating load balancer in front of the proxy.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The backend's own limits on a request head (header fields, bytes): the
    /// forwarding headers are left out of a request they would push over
    /// them, so the backend answers it as it would without the proxy.
    pub backend_max_headers: usize,
    pub backend_max_head_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTlsConfig {
    /// Where S3 clients connect over HTTPS (HTTP/1.1 or HTTP/2 by ALPN).
    pub address: SocketAddr,
    /// PEM certificate chain, end-entity first; reloaded when it changes.
    pub cert: PathBuf,
    /// PEM private key of the certificate.
    pub key: PathBuf,
    /// How the pair's files are read, at start and on every reload.
    pub files: FilePolicy,
}

/// TLS towards a backend that only serves HTTPS.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendTlsConfig {
    /// PEM bundle of the CAs the backend's certificate must chain to.
    pub ca: PathBuf,
    /// Name to verify the certificate against; default: the backend host.
    pub server_name: Option<String>,
    /// Client certificate and key, for a backend that asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// How these files are read.
    pub files: FilePolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// The one S3 backend (static discovery).
    pub address: BackendAddress,
    /// A connect that takes longer counts as the backend being down.
    pub connect_timeout: Duration,
    /// TCP keep-alive on backend connections (whole seconds): idle this long,
    /// the kernel probes the backend every as long, and ends the connection
    /// after three probes go unanswered (see [`crate::connector`]).
    pub tcp_keepalive: Duration,
    /// A request that makes no progress while waiting for the backend (its
    /// body not accepted, or no response head) for this long makes the proxy
    /// probe the backend: hung if the probe fails, slow if it answers.
    pub response_timeout: Duration,
    /// Longest wait for the response head while the backend serves.
    pub first_byte_timeout: Duration,
    /// The same for operations known to be slow (see `s3_operation`).
    pub slow_first_byte_timeout: Duration,
    /// How long a request body that expects `100 Continue` waits for it
    /// before it is sent anyway; `None`: until the backend asks (see
    /// [`crate::delivery`]).
    pub expect_continue_timeout: Option<Duration>,
    /// Idle keep-alive connections kept to the backend.
    pub max_idle_connections: usize,
    /// Connections open to the backend at once, idle or busy; `None`: no
    /// cap (see [`crate::backend_slots`]). Restart-only.
    pub max_connections: Option<usize>,
    /// Longest wait of a request for a backend connection when
    /// `max_connections` are open; then `503 SlowDown`.
    pub queue_timeout: Duration,
    /// Idle connections older than this are closed rather than reused.
    pub idle_timeout: Duration,
    /// Most header fields accepted in a response head from the backend.
    pub max_headers: usize,
    /// Most bytes accepted in a response head from the backend.
    pub max_head_bytes: usize,
    /// Largest read of a response body that arrives faster than it is read.
    pub max_read_bytes: usize,
    /// Memory all connections together may hold in reads larger than
    /// their head limit (see `read_budget`): backend connections reading
    /// response bodies, and client connections reading large request
    /// bodies (`listener.max_read_bytes`); 0 keeps reads under it.
    pub large_read_memory: usize,
    pub tls: Option<BackendTlsConfig>,
    /// Find the backend through a Service's EndpointSlices instead of `address`.
    pub kubernetes: Option<KubernetesConfig>,
}

impl BackendConfig {
    /// Where connections go at start: the Service address when
    /// `backend.kubernetes.route = "service"` (discovery then never moves
    /// it), else `address` (which discovery, when on, replaces with a pod's).
    pub fn target(&self) -> &BackendAddress {
        self.kubernetes
            .as_ref()
            .and_then(|kubernetes| kubernetes.route_to_service.as_ref())
            .unwrap_or(&self.address)
    }
}

/// EndpointSlice discovery and the coordinated-pause Lease.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesConfig {
    pub namespace: String,
    /// The Service whose slices (`kubernetes.io/service-name`) are watched.
    pub service: String,
    /// The endpoint port, by name (`s3`) or number.
    pub port: String,
    /// A kubeconfig file, for running outside the cluster; default in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Name of the Lease (same namespace) that pauses every replica while valid.
    pub pause_lease: String,
    /// Where requests go: the usable pod's IP (default), or this Service
    /// address (its ClusterIP through DNS, e.g. `s3gw.s3gw.svc:80`).
    pub route_to_service: Option<BackendAddress>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HoldConfig {
    /// Longest time one request may spend held, summed over its holds.
    pub timeout: Duration,
    /// Requests held at once; beyond this new ones get `SlowDown`.
    pub max_requests: usize,
    /// Requests one client (access key, or address) may have held at once;
    /// beyond this its new ones get `SlowDown` while others still queue.
    pub max_requests_per_client: usize,
    /// Outage length after which new requests fail at once.
    pub fail_fast_after: Duration,
    /// Request body bytes kept so a request that reached the backend can be replayed.
    pub replay_buffer: usize,
    /// Request body bytes kept for replay by all requests together; past
    /// it, new bytes are not kept (those requests are not replayable).
    pub replay_memory: usize,
    /// How often one request that reached the backend may be sent again.
    pub max_replays: u32,
    /// Held requests sent to a freshly recovered backend at once.
    pub release_concurrency: usize,
    /// Longest admin pause; a forgotten pause ends by itself after this.
    pub max_pause: Duration,
    /// `Retry-After` seconds sent with 503 answers.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// Time between probes while the backend is down.
    pub interval: Duration,
    /// Deadline for one probe (connect plus HTTP answer).
    pub timeout: Duration,
    /// Path of the cheap HTTP request (`HEAD`) a probe sends.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// How long `POST /admin/pause` waits for in-flight requests by default.
    pub drain_timeout: Duration,
    /// The bearer token `/admin/*` requires (`admin.token_file`); required
    /// when `address` is not loopback, read again on every reload.
    pub token: Option<AdminToken>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineConfig {
    /// How long a request that crashed the backend twice is refused, and how
    /// long a request in flight at one crash stays a suspect.
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long the proxy keeps accepting and serving (unready,
    /// HTTP/1.1 answers with `Connection: close`) while load balancers and
    /// kube-proxy stop sending it new connections. Zero: stop at once.
    pub drain_delay: Duration,
    /// After the drain delay, how long in-flight and held requests may take.
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive, e.g. `info` or `s3_failover_proxy=debug`.
    pub level: String,
}

/// The file as written: every section and key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    forwarding: RawForwarding,
    #[serde(default)]
    backend: RawBackend,
    #[serde(default)]
    hold: RawHold,
    #[serde(default)]
    probe: RawProbe,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    quarantine: RawQuarantine,
    #[serde(default)]
    log: RawLog,
    settle: Option<RawSettle>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettle {
    access_key_id: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    region: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Option<String>,
    tls: Option<RawListenerTls>,
    max_headers: Option<usize>,
    max_head_bytes: Option<ByteSize>,
    max_read_bytes: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    client_body_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    send_timeout: Option<Duration>,
    max_connections: Option<usize>,
    threads: Option<usize>,
    handover_socket: Option<PathBuf>,
    raw_http1: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwarding {
    enabled: Option<bool>,
    trusted_proxies: Option<Vec<String>>,
    backend_max_headers: Option<usize>,
    backend_max_head_bytes: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenerTls {
    address: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    namespace: Option<String>,
    service: Option<String>,
    port: Option<toml::Value>,
    kubeconfig: Option<PathBuf>,
    pause_lease: Option<String>,
    route: Option<String>,
    service_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTls {
    ca: Option<PathBuf>,
    server_name: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<String>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    tcp_keepalive: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    first_byte_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    slow_first_byte_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    expect_continue_timeout: Option<Duration>,
    max_idle_connections: Option<usize>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    queue_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    max_headers: Option<usize>,
    max_head_bytes: Option<ByteSize>,
    max_read_bytes: Option<ByteSize>,
    large_read_memory: Option<ByteSize>,
    tls: Option<RawBackendTls>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHold {
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    max_requests: Option<usize>,
    max_requests_per_client: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    fail_fast_after: Option<Duration>,
    replay_buffer: Option<ByteSize>,
    replay_memory: Option<ByteSize>,
    max_replays: Option<u32>,
    release_concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    max_pause: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_after: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuarantine {
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    #[serde(default, with = "humantime_serde")]
    drain_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    grace: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

/// A byte count written as an integer (`1048576`) or with a unit (`"1MiB"`).
#[derive(Debug, Clone, Copy)]
struct ByteSize(u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(u64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Number(n) => Ok(ByteSize(n)),
            Either::Text(s) => parse_byte_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"512"`, `"64KiB"`, `"1MiB"`, `"1MB"`, `"2GiB"` (spaces allowed).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a byte size such as 1048576 or \"1MiB\""))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown byte unit `{other}` in `{text}`")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

fn parse_address(
    key: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_string());
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("`{text}` is not an IP address with a port, such as 127.0.0.1:8080"),
        )
    })
}

fn positive_duration(
    key: &'static str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if value.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(value)
}

/// A TCP keep-alive time: whole seconds from 1 to 32 767, Linux's range
/// for `TCP_KEEPIDLE` and `TCP_KEEPINTVL` (tcp(7)).
fn keepalive_duration(
    key: &'static str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if value.subsec_nanos() != 0 || !(1..=32_767).contains(&value.as_secs()) {
        return Err(invalid(
            key,
            "must be whole seconds, from 1s to 32767s (TCP_KEEPIDLE, tcp(7))",
        ));
    }
    Ok(value)
}

/// `backend.max_read_bytes` and `listener.max_read_bytes` by default: a GiB
/// streamed in reads of 512 KiB costs about half the CPU it costs in reads
/// of 64 KiB (`benches/HISTORY.md`).
const DEFAULT_MAX_READ_BYTES: u64 = 512 << 10;
/// The largest `backend.max_read_bytes` and `listener.max_read_bytes`.
const MAX_READ_BYTES: u64 = 16 << 20;
/// `backend.large_read_memory` by default: 16 connections reading in reads
/// of 512 KiB at once (each holds about three reads, see `read_budget`).
const DEFAULT_LARGE_READ_MEMORY: u64 = 24 << 20;

fn max_read_bytes(key: &'static str, value: Option<ByteSize>) -> Result<usize, ConfigError> {
    let bytes = value.map_or(DEFAULT_MAX_READ_BYTES, |b| b.0);
    if bytes < MIN_HEAD_BYTES {
        return Err(invalid(key, "must be at least 8KiB"));
    }
    if bytes > MAX_READ_BYTES {
        return Err(invalid(key, "must be at most 16MiB"));
    }
    usize::try_from(bytes).map_err(|_| invalid(key, "too large"))
}

/// `backend.large_read_memory`: 0 (large reads off) or room for at least
/// one connection's large reads ([`READS_HELD`] reads of the larger of
/// `backend.max_read_bytes` and `listener.max_read_bytes`).
fn large_read_memory(value: Option<ByteSize>, max_read_bytes: usize) -> Result<usize, ConfigError> {
    let key = "backend.large_read_memory";
    let bytes = value.map_or(DEFAULT_LARGE_READ_MEMORY, |b| b.0);
    let bytes = usize::try_from(bytes).map_err(|_| invalid(key, "too large"))?;
    let share = max_read_bytes.saturating_mul(READS_HELD);
    if bytes != 0 && bytes < share {
        return Err(invalid(
            key,
            format!(
                "{bytes} bytes is less than one connection's large reads ({share} bytes: three reads of backend.max_read_bytes or listener.max_read_bytes, the larger); give at least that, or 0 to turn large reads off"
            ),
        ));
    }
    Ok(bytes)
}

/// `hold.replay_memory`: 256 MiB unless set; at least 1 byte.
fn replay_memory(size: Option<ByteSize>) -> Result<usize, ConfigError> {
    let bytes = size.map_or(256 << 20, |size| size.0);
    if bytes == 0 {
        return Err(invalid(
            "hold.replay_memory",
            "must be at least 1 byte (use hold.replay_buffer = 0 to keep no copy at all)",
        ));
    }
    usize::try_from(bytes).map_err(|_| invalid("hold.replay_memory", "too large"))
}

/// Longest path a UNIX socket address holds (`sun_path`, 108 bytes on
/// Linux, one of them the terminating NUL; unix(7)).
const MAX_UNIX_SOCKET_PATH: usize = 107;

fn handover_socket(path: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = path else { return Ok(None) };
    let length = path.as_os_str().len();
    if length == 0 {
        return Err(invalid("listener.handover_socket", "must not be empty"));
    }
    if !path.is_absolute() {
        return Err(invalid(
            "listener.handover_socket",
            format!(
                "{} is relative; give an absolute path, so that a new process started elsewhere finds the same socket",
                path.display()
            ),
        ));
    }
    if length > MAX_UNIX_SOCKET_PATH {
        return Err(invalid(
            "listener.handover_socket",
            format!(
                "{} is {length} bytes long; a UNIX socket path holds at most {MAX_UNIX_SOCKET_PATH}",
                path.display()
            ),
        ));
    }
    Ok(Some(path))
}

fn positive_count<T: Default + PartialEq>(
    key: &'static str,
    value: Option<T>,
    default: T,
) -> Result<T, ConfigError> {
    let value = value.unwrap_or(default);
    if value == T::default() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(value)
}

/// Most connections `backend.max_connections` may allow: Linux's default
/// ceiling on a process's file descriptors (`fs.nr_open`, 2^20).
const MAX_BACKEND_CONNECTIONS: usize = 1 << 20;

/// `backend.max_connections`: at least one, at most
/// [`MAX_BACKEND_CONNECTIONS`].
fn backend_max_connections(max: usize) -> Result<usize, ConfigError> {
    let max = positive_count("backend.max_connections", Some(max), max)?;
    if max > MAX_BACKEND_CONNECTIONS {
        return Err(invalid(
            "backend.max_connections",
            format!(
                "must be at most {MAX_BACKEND_CONNECTIONS} (fs.nr_open's default: no process opens more)"
            ),
        ));
    }
    Ok(max)
}

/// Most `listener.threads`: far more than cores is only context switches.
const MAX_THREADS: usize = 1024;

/// `listener.threads`: by default the cores this process may run on
/// (`std::thread::available_parallelism`, which follows CPU affinity and
/// cgroup quotas).
fn threads(value: Option<usize>) -> Result<usize, ConfigError> {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    let threads = positive_count("listener.threads", value, cores.min(MAX_THREADS))?;
    if threads > MAX_THREADS {
        return Err(invalid(
            "listener.threads",
            format!("{threads} is more than {MAX_THREADS}"),
        ));
    }
    Ok(threads)
}

/// Header fields per message head, by default: S3 allows about 2 KB of user
/// metadata, which can be hundreds of short `x-amz-meta-*` fields.
const DEFAULT_MAX_HEADERS: usize = 500;
/// Client connections open at once, by default (HAProxy derives its `maxconn`
/// from the file-descriptor limit; nginx serves `worker_connections` per worker).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Bytes per message head, by default.
const DEFAULT_MAX_HEAD_BYTES: u64 = 64 << 10;
/// The smallest head limit: hyper's smallest read buffer.
const MIN_HEAD_BYTES: u64 = 8 << 10;

fn head_bytes(key: &'static str, value: Option<ByteSize>) -> Result<usize, ConfigError> {
    let bytes = value.map_or(DEFAULT_MAX_HEAD_BYTES, |b| b.0);
    if bytes < MIN_HEAD_BYTES {
        return Err(invalid(key, "must be at least 8KiB"));
    }
    usize::try_from(bytes).map_err(|_| invalid(key, "too large"))
}

/// `X-Forwarded-*`: on by default; trusted hops as addresses or CIDR ranges.
fn forwarding(raw: RawForwarding) -> Result<ForwardingConfig, ConfigError> {
    let trusted_proxies = raw
        .trusted_proxies
        .unwrap_or_default()
        .iter()
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    invalid(
                        "forwarding.trusted_proxies",
                        format!("`{text}` is not an IP address or CIDR range such as 10.0.0.0/8"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(ForwardingConfig {
        enabled: raw.enabled.unwrap_or(true),
        trusted_proxies,
        // hyper-based servers (s3s-fs) take 100 fields; radosgw's beast
        // frontend 16 KiB of head (`max_header_size`).
        backend_max_headers: positive_count(
            "forwarding.backend_max_headers",
            raw.backend_max_headers,
            100,
        )?,
        backend_max_head_bytes: usize::try_from(
            raw.backend_max_head_bytes.map_or(16 << 10, |b| b.0),
        )
        .map_err(|_| invalid("forwarding.backend_max_head_bytes", "too large"))?,
    })
}

/// The HTTPS listener: both files must be given and form a usable pair.
fn listener_tls(raw: RawListenerTls, files: FilePolicy) -> Result<ListenerTlsConfig, ConfigError> {
    let cert = raw.cert.ok_or_else(|| {
        invalid(
            "listener.tls.cert",
            "required: a PEM certificate chain file",
        )
    })?;
    let key = raw
        .key
        .ok_or_else(|| invalid("listener.tls.key", "required: a PEM private key file"))?;
    // The error names the file (certificate or key) it is about.
    crate::tls::ServerCertificate::load(&cert, &key, files)
        .map_err(|e| invalid("listener.tls", e.to_string()))?;
    Ok(ListenerTlsConfig {
        address: parse_address("listener.tls.address", raw.address, "127.0.0.1:8443")?,
        cert,
        key,
        files,
    })
}

/// Discovery: namespace, Service and port are required.
fn kubernetes(raw: RawKubernetes) -> Result<KubernetesConfig, ConfigError> {
    let name = |key: &'static str, value: Option<String>| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid(key, "required with [backend.kubernetes]"))
    };
    let port = match raw.port {
        Some(toml::Value::String(name)) if !name.is_empty() => name,
        Some(toml::Value::Integer(number)) if (1..=65535).contains(&number) => number.to_string(),
        Some(other) => {
            return Err(invalid(
                "backend.kubernetes.port",
                format!("`{other}` is not a port name or number"),
            ));
        }
        None => {
            return Err(invalid(
                "backend.kubernetes.port",
                "required with [backend.kubernetes]",
            ));
        }
    };
    let namespace = name("backend.kubernetes.namespace", raw.namespace)?;
    let service = name("backend.kubernetes.service", raw.service)?;
    let route_to_service = match raw.route.as_deref().unwrap_or("pod") {
        "pod" => None,
        "service" => {
            let address = raw
                .service_address
                .unwrap_or_else(|| format!("{service}.{namespace}.svc:80"));
            Some(
                address
                    .parse()
                    .map_err(|reason| invalid("backend.kubernetes.service_address", reason))?,
            )
        }
        other => {
            return Err(invalid(
                "backend.kubernetes.route",
                format!("`{other}` is neither \"pod\" nor \"service\""),
            ));
        }
    };
    Ok(KubernetesConfig {
        namespace,
        service,
        port,
        kubeconfig: raw.kubeconfig,
        pause_lease: raw
            .pause_lease
            .unwrap_or_else(|| "s3-failover-proxy-pause".into()),
        route_to_service,
    })
}

/// TLS to the backend: a CA bundle, and a client pair only as a pair.
fn backend_tls(raw: RawBackendTls, files: FilePolicy) -> Result<BackendTlsConfig, ConfigError> {
    let ca = raw
        .ca
        .ok_or_else(|| invalid("backend.tls.ca", "required: a PEM CA bundle"))?;
    let client_cert = match (raw.cert, raw.key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid("backend.tls.key", "required with backend.tls.cert"));
        }
        (None, Some(_)) => {
            return Err(invalid("backend.tls.cert", "required with backend.tls.key"));
        }
    };
    let pair = client_cert
        .as_ref()
        .map(|(c, k)| (c.as_path(), k.as_path()));
    crate::tls::client_config(&ca, pair, files)
        .map_err(|e| invalid("backend.tls.ca", e.to_string()))?;
    Ok(BackendTlsConfig {
        ca,
        server_name: raw.server_name,
        client_cert,
        files,
    })
}

impl Config {
    /// Reads, parses and validates the file at `path`, and the files it
    /// names, under `files`.
    pub fn load(path: &Path, files: FilePolicy) -> Result<Config, ConfigError> {
        let text = trusted_file::read_to_string(path, files)?;
        Config::parse_with(&text, files).map_err(|error| match error {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text; the files it names are read under
    /// the strict default [`FilePolicy`].
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, FilePolicy::default())
    }

    /// Parses and validates TOML text, reading the files it names under `files`.
    pub fn parse_with(text: &str, files: FilePolicy) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.to_string(),
        })?;
        Config::from_raw(raw, files)
    }

    /// The validation layer: defaults filled in, every rule checked.
    pub fn from_raw(raw: RawConfig, files: FilePolicy) -> Result<Config, ConfigError> {
        let max_requests = positive_count("hold.max_requests", raw.hold.max_requests, 10_000)?;
        let hold = HoldConfig {
            timeout: positive_duration("hold.timeout", raw.hold.timeout, Duration::from_secs(30))?,
            max_requests,
            max_requests_per_client: positive_count(
                "hold.max_requests_per_client",
                raw.hold.max_requests_per_client,
                max_requests.div_ceil(2),
            )?,
            fail_fast_after: positive_duration(
                "hold.fail_fast_after",
                raw.hold.fail_fast_after,
                Duration::from_secs(120),
            )?,
            replay_buffer: usize::try_from(raw.hold.replay_buffer.map_or(1 << 20, |b| b.0))
                .map_err(|_| invalid("hold.replay_buffer", "too large"))?,
            replay_memory: replay_memory(raw.hold.replay_memory)?,
            max_replays: raw.hold.max_replays.unwrap_or(1),
            release_concurrency: positive_count(
                "hold.release_concurrency",
                raw.hold.release_concurrency,
                64,
            )?,
            max_pause: positive_duration(
                "hold.max_pause",
                raw.hold.max_pause,
                Duration::from_secs(60),
            )?,
            retry_after: positive_duration(
                "hold.retry_after",
                raw.hold.retry_after,
                Duration::from_secs(1),
            )?,
        };
        let probe = ProbeConfig {
            interval: positive_duration(
                "probe.interval",
                raw.probe.interval,
                Duration::from_millis(10),
            )?,
            timeout: positive_duration(
                "probe.timeout",
                raw.probe.timeout,
                Duration::from_millis(500),
            )?,
            path: raw.probe.path.unwrap_or_else(|| "/".into()),
        };
        if !probe.path.starts_with('/') || probe.path.contains(char::is_whitespace) {
            return Err(invalid(
                "probe.path",
                "must start with `/` and contain no spaces",
            ));
        }
        let backend = BackendConfig {
            address: raw
                .backend
                .address
                .as_deref()
                .unwrap_or("127.0.0.1:7480")
                .parse()
                .map_err(|reason| invalid("backend.address", reason))?,
            connect_timeout: positive_duration(
                "backend.connect_timeout",
                raw.backend.connect_timeout,
                Duration::from_secs(1),
            )?,
            tcp_keepalive: keepalive_duration(
                "backend.tcp_keepalive",
                raw.backend.tcp_keepalive,
                Duration::from_secs(5),
            )?,
            response_timeout: positive_duration(
                "backend.response_timeout",
                raw.backend.response_timeout,
                Duration::from_secs(30),
            )?,
            first_byte_timeout: positive_duration(
                "backend.first_byte_timeout",
                raw.backend.first_byte_timeout,
                Duration::from_secs(300),
            )?,
            slow_first_byte_timeout: positive_duration(
                "backend.slow_first_byte_timeout",
                raw.backend.slow_first_byte_timeout,
                Duration::from_secs(1800),
            )?,
            expect_continue_timeout: raw
                .backend
                .expect_continue_timeout
                .map(|wait| positive_duration("backend.expect_continue_timeout", Some(wait), wait))
                .transpose()?,
            max_idle_connections: raw.backend.max_idle_connections.unwrap_or(512),
            max_connections: raw
                .backend
                .max_connections
                .map(backend_max_connections)
                .transpose()?,
            queue_timeout: positive_duration(
                "backend.queue_timeout",
                raw.backend.queue_timeout,
                Duration::from_secs(30),
            )?,
            idle_timeout: positive_duration(
                "backend.idle_timeout",
                raw.backend.idle_timeout,
                Duration::from_secs(30),
            )?,
            max_headers: positive_count(
                "backend.max_headers",
                raw.backend.max_headers,
                DEFAULT_MAX_HEADERS,
            )?,
            max_head_bytes: head_bytes("backend.max_head_bytes", raw.backend.max_head_bytes)?,
            max_read_bytes: max_read_bytes("backend.max_read_bytes", raw.backend.max_read_bytes)?,
            large_read_memory: large_read_memory(
                raw.backend.large_read_memory,
                max_read_bytes("backend.max_read_bytes", raw.backend.max_read_bytes)?.max(
                    max_read_bytes("listener.max_read_bytes", raw.listener.max_read_bytes)?,
                ),
            )?,
            tls: raw
                .backend
                .tls
                .map(|tls| backend_tls(tls, files))
                .transpose()?,
            kubernetes: raw.backend.kubernetes.map(kubernetes).transpose()?,
        };
        let listener = ListenerConfig {
            address: parse_address("listener.address", raw.listener.address, "127.0.0.1:8080")?,
            tls: raw
                .listener
                .tls
                .map(|tls| listener_tls(tls, files))
                .transpose()?,
            max_headers: positive_count(
                "listener.max_headers",
                raw.listener.max_headers,
                DEFAULT_MAX_HEADERS,
            )?,
            max_head_bytes: head_bytes("listener.max_head_bytes", raw.listener.max_head_bytes)?,
            max_read_bytes: max_read_bytes("listener.max_read_bytes", raw.listener.max_read_bytes)?,
            client_body_timeout: positive_duration(
                "listener.client_body_timeout",
                raw.listener.client_body_timeout,
                Duration::from_secs(60),
            )?,
            header_timeout: positive_duration(
                "listener.header_timeout",
                raw.listener.header_timeout,
                Duration::from_secs(60),
            )?,
            send_timeout: positive_duration(
                "listener.send_timeout",
                raw.listener.send_timeout,
                Duration::from_secs(60),
            )?,
            max_connections: positive_count(
                "listener.max_connections",
                raw.listener.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            max_connections_set: raw.listener.max_connections.is_some(),
            threads: threads(raw.listener.threads)?,
            handover_socket: handover_socket(raw.listener.handover_socket)?,
            raw_http1: raw.listener.raw_http1.unwrap_or(true),
        };
        let forwarding = forwarding(raw.forwarding)?;
        let log = LogConfig {
            format: raw.log.format.unwrap_or(LogFormat::Text),
            level: raw.log.level.unwrap_or_else(|| "info".into()),
        };
        tracing_subscriber::EnvFilter::try_new(&log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(Config {
            listener,
            forwarding,
            backend,
            hold,
            probe,
            admin: admin(raw.admin, files)?,
            shutdown: ShutdownConfig {
                drain_delay: raw.shutdown.drain_delay.unwrap_or(Duration::from_secs(5)),
                grace: positive_duration(
                    "shutdown.grace",
                    raw.shutdown.grace,
                    Duration::from_secs(30),
                )?,
            },
            quarantine: QuarantineConfig {
                duration: positive_duration(
                    "quarantine.duration",
                    raw.quarantine.duration,
                    Duration::from_secs(600),
                )?,
            },
            log,
            settle: raw.settle.map(|raw| settle(raw, files)).transpose()?,
            files,
        })
    }
}

/// The read-back key: an access key id and the file holding its secret
/// (a mounted Secret), both required once the section is there.
fn settle(raw: RawSettle, files: FilePolicy) -> Result<SettleCredentials, ConfigError> {
    let access_key_id = raw
        .access_key_id
        .filter(|id| !id.trim().is_empty())
        .ok_or_else(|| invalid("settle.access_key_id", "required in [settle]"))?;
    let file = raw
        .secret_access_key_file
        .ok_or_else(|| invalid("settle.secret_access_key_file", "required in [settle]"))?;
    let secret = trusted_file::read_to_string(&file, files)
        .map_err(|e| invalid("settle.secret_access_key_file", e.to_string()))?;
    let secret_access_key = secret.trim().to_owned();
    if secret_access_key.is_empty() {
        return Err(invalid(
            "settle.secret_access_key_file",
            format!("{} holds no key", file.display()),
        ));
    }
    Ok(SettleCredentials {
        access_key_id: access_key_id.trim().to_owned(),
        secret_access_key,
        region: raw.region.unwrap_or_else(|| "us-east-1".to_owned()),
        secret_access_key_file: file,
    })
}

/// The admin listener: a token (read now) whenever it is set, and required
/// off loopback, where anyone who reaches the port could pause all traffic.
fn admin(raw: RawAdmin, files: FilePolicy) -> Result<AdminConfig, ConfigError> {
    let address = parse_address("admin.address", raw.address, "127.0.0.1:9090")?;
    let token = raw
        .token_file
        .map(|file| {
            AdminToken::read(&file, files).map_err(|e| invalid("admin.token_file", e.to_string()))
        })
        .transpose()?;
    if token.is_none() && !address.ip().is_loopback() {
        return Err(invalid(
            "admin.token_file",
            format!(
                "required when admin.address ({address}) is not a loopback address: \
                 anyone who reaches it could pause all traffic"
            ),
        ));
    }
    Ok(AdminConfig {
        address,
        drain_timeout: positive_duration(
            "admin.drain_timeout",
            raw.drain_timeout,
            Duration::from_secs(30),
        )?,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.listener.address, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.backend.address.to_string(), "127.0.0.1:7480");
        assert_eq!(config.hold.timeout, Duration::from_secs(30));
        assert_eq!(config.hold.max_requests, 10_000);
        assert_eq!(config.hold.max_requests_per_client, 5_000);
        assert_eq!(config.hold.fail_fast_after, Duration::from_secs(120));
        assert_eq!(config.hold.replay_buffer, 1 << 20);
        assert_eq!(config.hold.replay_memory, 256 << 20);
        assert!(config.probe.interval < Duration::from_millis(100));
        assert_eq!(config.admin.address, "127.0.0.1:9090".parse().unwrap());
    }

    #[test]
    fn durations_and_sizes_are_read_with_units() {
        let config = Config::parse(
            "[hold]\ntimeout = \"250ms\"\nreplay_buffer = \"64KiB\"\n[probe]\ninterval = \"10ms\"\n",
        )
        .unwrap();
        assert_eq!(config.hold.timeout, Duration::from_millis(250));
        assert_eq!(config.hold.replay_buffer, 64 * 1024);
        assert_eq!(config.probe.interval, Duration::from_millis(10));
    }

    #[test]
    fn a_handover_socket_path_too_long_for_a_unix_socket_is_named() {
        let path = format!("/run/{}", "s".repeat(120));
        let message = error_of(&format!("[listener]\nhandover_socket = \"{path}\"\n"));
        assert!(message.contains("listener.handover_socket"), "{message}");
        assert!(message.contains("at most 107"), "{message}");
        let message = error_of("[listener]\nhandover_socket = \"run/s3fp.sock\"\n");
        assert!(message.contains("absolute"), "{message}");
        let config = Config::parse("[listener]\nhandover_socket = \"/run/s3fp.sock\"\n").unwrap();
        assert_eq!(
            config.listener.handover_socket.as_deref(),
            Some(Path::new("/run/s3fp.sock"))
        );
    }

    #[test]
    fn a_tcp_keepalive_is_whole_seconds_that_linux_takes() {
        assert_eq!(
            Config::parse("").unwrap().backend.tcp_keepalive,
            Duration::from_secs(5)
        );
        let config = Config::parse("[backend]\ntcp_keepalive = \"1m\"\n").unwrap();
        assert_eq!(config.backend.tcp_keepalive, Duration::from_secs(60));
        for refused in ["0s", "500ms", "1500ms", "10h"] {
            let message = error_of(&format!("[backend]\ntcp_keepalive = \"{refused}\"\n"));
            assert!(message.contains("backend.tcp_keepalive"), "{message}");
            assert!(message.contains("whole seconds"), "{message}");
        }
    }

    #[test]
    fn an_unknown_key_is_named() {
        let message = error_of("[hold]\ntimeoot = \"1s\"\n");
        assert!(message.contains("timeoot"), "{message}");
    }

    #[test]
    fn a_bad_duration_is_named() {
        let message = error_of("[hold]\ntimeout = \"thirty seconds\"\n");
        assert!(message.contains("timeout"), "{message}");
    }

    #[test]
    fn an_unparsable_address_is_named() {
        let message = error_of("[backend]\naddress = \"localhost\"\n");
        assert!(message.contains("backend.address"), "{message}");
        let message = error_of("[listener]\naddress = \"localhost:8080\"\n");
        assert!(message.contains("listener.address"), "{message}");
    }

    #[test]
    fn limits_of_zero_are_refused() {
        assert!(error_of("[hold]\nmax_requests = 0\n").contains("hold.max_requests"));
        assert!(error_of("[hold]\ntimeout = \"0s\"\n").contains("hold.timeout"));
        assert!(error_of("[hold]\nrelease_concurrency = 0\n").contains("hold.release_concurrency"));
    }

    #[test]
    fn a_body_waits_for_the_backends_continue_unless_a_timeout_is_set() {
        assert_eq!(
            Config::parse("").unwrap().backend.expect_continue_timeout,
            None
        );
        let config = Config::parse("[backend]\nexpect_continue_timeout = \"1s\"\n").unwrap();
        assert_eq!(
            config.backend.expect_continue_timeout,
            Some(Duration::from_secs(1))
        );
        let message = error_of("[backend]\nexpect_continue_timeout = \"0s\"\n");
        assert!(
            message.contains("backend.expect_continue_timeout"),
            "{message}"
        );
    }

    #[test]
    fn backend_connections_are_not_capped_unless_set_and_a_cap_must_be_one_a_process_can_open() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.backend.max_connections, None);
        assert_eq!(config.backend.queue_timeout, Duration::from_secs(30));
        let config =
            Config::parse("[backend]\nmax_connections = 1024\nqueue_timeout = \"5s\"\n").unwrap();
        assert_eq!(config.backend.max_connections, Some(1024));
        assert_eq!(config.backend.queue_timeout, Duration::from_secs(5));
        for bad in ["0", "1048577", "2305843009213693952"] {
            let message = error_of(&format!("[backend]\nmax_connections = {bad}\n"));
            assert!(
                message.contains("backend.max_connections"),
                "{bad}: {message}"
            );
        }
        let message = error_of("[backend]\nqueue_timeout = \"0s\"\n");
        assert!(message.contains("backend.queue_timeout"), "{message}");
    }

    #[test]
    fn client_connections_are_served_by_one_thread_per_core_unless_set() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(Config::parse("").unwrap().listener.threads, cores);
        let config = Config::parse("[listener]\nthreads = 3\n").unwrap();
        assert_eq!(config.listener.threads, 3);
        let message = error_of("[listener]\nthreads = 0\n");
        assert!(message.contains("listener.threads"), "{message}");
        let message = error_of("[listener]\nthreads = 5000\n");
        assert!(
            message.contains("listener.threads") && message.contains("1024"),
            "{message}"
        );
    }

    #[test]
    fn kubernetes_discovery_needs_namespace_service_and_port() {
        let config = Config::parse(
            "[backend.kubernetes]\nnamespace = \"s3gw\"\nservice = \"s3gw-s3gw\"\nport = \"s3\"\n",
        )
        .unwrap();
        let kubernetes = config.backend.kubernetes.unwrap();
        assert_eq!(kubernetes.port, "s3");
        assert_eq!(kubernetes.pause_lease, "s3-failover-proxy-pause");
        assert!(
            error_of("[backend.kubernetes]\nnamespace = \"s3gw\"\nport = 80\n")
                .contains("backend.kubernetes.service")
        );
        assert!(
            error_of("[backend.kubernetes]\nnamespace = \"a\"\nservice = \"b\"\nport = 0\n")
                .contains("backend.kubernetes.port")
        );
    }

    #[test]
    fn an_admin_listener_off_loopback_needs_a_token() {
        let message = error_of("[admin]\naddress = \"0.0.0.0:9090\"\n");
        assert!(message.contains("admin.token_file"), "{message}");
        assert!(Config::parse("[admin]\naddress = \"[::1]:9090\"\n").is_ok());
        let token = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token.path(), "t0ken\n").unwrap();
        let config = Config::parse(&format!(
            "[admin]\naddress = \"0.0.0.0:9090\"\ntoken_file = \"{}\"\n",
            token.path().display()
        ))
        .unwrap();
        assert!(config.admin.token.unwrap().authorizes(b"Bearer t0ken"));
    }

    #[test]
    fn large_reads_default_to_sixteen_connections_of_512_kib() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.backend.max_read_bytes, 512 << 10);
        assert_eq!(config.listener.max_read_bytes, 512 << 10);
        assert_eq!(config.backend.large_read_memory, 24 << 20);
    }

    #[test]
    fn large_read_limits_outside_their_range_name_the_key() {
        let error = error_of("[backend]\nmax_read_bytes = \"4KiB\"\n");
        assert!(error.contains("backend.max_read_bytes"), "{error}");
        assert!(error.contains("at least 8KiB"), "{error}");
        let error = error_of("[backend]\nmax_read_bytes = \"32MiB\"\n");
        assert!(error.contains("at most 16MiB"), "{error}");
        let error = error_of("[backend]\nlarge_read_memory = \"1KiB\"\n");
        assert!(error.contains("backend.large_read_memory"), "{error}");
        assert!(
            error.contains("less than one connection's large reads"),
            "{error}"
        );
        let error = error_of("[listener]\nmax_read_bytes = \"32MiB\"\n");
        assert!(error.contains("listener.max_read_bytes"), "{error}");
        assert!(error.contains("at most 16MiB"), "{error}");
        // The budget holds one connection's reads of the larger of the two.
        let error = error_of(
            "[listener]\nmax_read_bytes = \"8MiB\"\n[backend]\nlarge_read_memory = \"20MiB\"\n",
        );
        assert!(error.contains("backend.large_read_memory"), "{error}");
        let off = Config::parse("[backend]\nlarge_read_memory = 0\n").unwrap();
        assert_eq!(off.backend.large_read_memory, 0);
    }

    #[test]
    fn byte_sizes_parse_with_and_without_units() {
        assert_eq!(parse_byte_size("512").unwrap(), 512);
        assert_eq!(parse_byte_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_byte_size("1 MB").unwrap(), 1_000_000);
        assert!(parse_byte_size("1 parsec").is_err());
    }
}
