//! Test harness, a library the integration tests in `tests/` link (as
//! `support`): a real S3 backend process (`s3s-fs`) that a test can kill with
//! SIGKILL, stop, and restart on the same port and data directory; the real
//! proxy running in-process on loopback sockets, or as its binary with a
//! config file, signals and a captured log, each with an [`AdminClient`];
//! an `aws-sdk-s3` client with retries off; and small helpers to talk raw
//! HTTP and SigV4. The other backends and tools are in the modules below.

pub mod admin;
pub mod fake_kube;
pub mod radosgw;
pub mod relay;
pub mod tls;
pub mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use s3_failover_proxy::{Config, Listeners};

pub use admin::AdminClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const ACCESS_KEY: &str = "s3fp-test-access";
pub const SECRET_KEY: &str = "s3fp-test-secret-key-0123456789";
pub const REGION: &str = "us-east-1";

/// Polls `check` until it holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

/// Writes `content` to `path` with mode 0600 in one step (a sibling renamed
/// over it, as a Kubernetes Secret update swaps its files): the admin token
/// file of a test.
pub fn write_secret(path: &std::path::Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    let staged = path.with_extension("staged");
    std::fs::write(&staged, content).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// A port nobody listens on right now (for a process that must bind it
/// itself), on 127.0.0.1 nor on 127.0.0.2, and never handed out before in
/// this test process. A stopped backend keeps its port, and a moved one
/// takes it to 127.0.0.2 (`S3Backend::move_to`): a test running alongside
/// must not start a server there meanwhile, or a probe meant to find nothing
/// finds that server (two Kubernetes tests once did: one's pod took the
/// other's traffic).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let free_on_the_other_address = std::net::TcpListener::bind(("127.0.0.2", port)).is_ok();
        if free_on_the_other_address && HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

fn s3s_fs_binary() -> PathBuf {
    if let Ok(path) = std::env::var("S3S_FS_BIN") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/s3fp/tools/bin/s3s-fs")
}

/// A real S3 server process on 127.0.0.1 with a data directory that survives restarts.
pub struct S3Backend {
    pub address: SocketAddr,
    data: tempfile::TempDir,
    /// The process's standard error, across restarts (outside `data`, which
    /// s3s-fs serves): quoted when it exits before serving.
    stderr: tempfile::NamedTempFile,
    child: Option<Child>,
}

impl S3Backend {
    /// Starts the backend and waits until it answers HTTP. A process that
    /// exits before serving (its port taken between [`free_port`] and its
    /// bind, by another process's outgoing connection) is started again on
    /// another port, twice at most.
    pub async fn start() -> anyhow::Result<S3Backend> {
        let mut backend = S3Backend::stopped()?;
        let mut tries = 1;
        loop {
            match backend.restart().await {
                Ok(()) => return Ok(backend),
                Err(error) if tries < 3 && backend.exited_early() => {
                    eprintln!("s3s-fs did not start, trying another port: {error:#}");
                    backend.child = None;
                    backend.address.set_port(free_port());
                    tries += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// A backend with an address and data directory but no process yet.
    pub fn stopped() -> anyhow::Result<S3Backend> {
        Ok(S3Backend {
            address: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data: tempfile::tempdir()?,
            stderr: tempfile::NamedTempFile::new()?,
            child: None,
        })
    }

    /// The process ended by itself (not killed by the test).
    fn exited_early(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    /// Moves a stopped backend to another loopback IP, same port and data
    /// (a rescheduled pod: new IP, same volume).
    pub fn move_to(&mut self, ip: &str) {
        assert!(self.child.is_none(), "stop the backend before moving it");
        self.address = SocketAddr::new(ip.parse().unwrap(), self.address.port());
    }

    /// Starts the process (again) on the same port and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_serving(Duration::from_secs(20)).await
    }

    /// Starts the process without waiting for it to serve.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "backend already running");
        let binary = s3s_fs_binary();
        let child = Command::new(&binary)
            .arg("--host")
            .arg(self.address.ip().to_string())
            .arg("--port")
            .arg(self.address.port().to_string())
            .arg("--access-key")
            .arg(ACCESS_KEY)
            .arg("--secret-key")
            .arg(SECRET_KEY)
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(self.stderr.reopen()?)
            .spawn()
            .with_context(|| {
                format!("starting {} (run .ci/run to install it)", binary.display())
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the backend answers HTTP; an error at once if the process
    /// exits first, quoting its standard error.
    pub async fn wait_serving(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if http_status(self.address, "HEAD", "/").await.is_some() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let stderr = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
                let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
                bail!(
                    "s3s-fs on {} exited ({status}) before serving: {}",
                    self.address,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("timed out after {limit:?} waiting for the S3 backend to answer")
    }

    /// SIGKILL, as a crash: no clean shutdown, connections reset.
    pub fn kill9(&mut self) {
        kill_now(&mut self.child);
    }

    /// SIGSTOP: the process keeps its socket but answers nothing (a hang).
    pub fn freeze(&self) {
        stop_process(self.child.as_ref().expect("backend running"));
    }

    /// SIGCONT after [`S3Backend::freeze`].
    pub fn thaw(&self) {
        send_signal(self.child.as_ref().expect("backend running"), "-CONT");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw_quietly();
        }
        self.kill9();
    }
}

impl S3Backend {
    fn thaw_quietly(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
    }
}

/// SIGKILL and reap a backend process: a crash, no clean shutdown.
pub(crate) fn kill_now(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `which` (`-STOP`, `-CONT`) to a running backend process.
pub(crate) fn send_signal(child: &Child, which: &str) {
    let status = Command::new("kill")
        .arg(which)
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGSTOP, returning once every thread of the process has stopped.
///
/// `kill` returns once the signal is queued, and one thread is woken to
/// take it: the others stop only once that thread ran (signal(7), "group
/// stop"). On a loaded machine the others go on serving meanwhile, so
/// requests sent right after `kill` were seen answered by a "frozen"
/// backend.
pub(crate) fn stop_process(child: &Child) {
    send_signal(child, "-STOP");
    let tasks = format!("/proc/{}/task", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !every_thread_stopped(&tasks) {
        assert!(
            Instant::now() < deadline,
            "{tasks}: not every thread stopped 10 s after SIGSTOP"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// True when each thread under `/proc/<pid>/task` is stopped (state `T`),
/// or exiting (`Z`, `X`: it serves nothing either).
fn every_thread_stopped(tasks: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return false;
    };
    entries.flatten().all(|task| {
        // `pid (comm) S ...`: the state follows the last `)`, comm may hold any.
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat.get(stat.rfind(')')? + 2..)?.chars().next())
            .is_some_and(|state| matches!(state, 'T' | 'Z' | 'X'))
    })
}

/// Sends one raw request and returns the status code, if any HTTP came back.
pub async fn http_status(address: SocketAddr, method: &str, path: &str) -> Option<u16> {
    let mut stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(address))
        .await
        .ok()?
        .ok()?;
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// `listener.raw_http1` for a proxy whose config is `text`, as the run asks:
/// `S3FP_TEST_RAW_HTTP1=0` runs the suite again with the raw path off, so the
/// hyper path serves every request (see `.ci/run`), `=1` with it on; a test
/// whose config names the setting keeps its own. `None`: the config decides.
pub fn raw_path_for_the_run(text: &str) -> Option<bool> {
    let asked = std::env::var("S3FP_TEST_RAW_HTTP1").ok()?;
    if text.contains("raw_http1") {
        return None;
    }
    Some(asked != "0")
}

/// The proxy, running in this test process on loopback sockets.
pub struct ProxyUnderTest {
    pub address: SocketAddr,
    /// The HTTPS listener, when the config has `[listener.tls]`.
    pub tls_address: Option<SocketAddr>,
    pub admin: AdminClient,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl ProxyUnderTest {
    /// Starts the proxy in front of `backend` with extra TOML settings
    /// (sections `[hold]`, `[probe]`, ... as the config file would have them).
    pub async fn start(backend: SocketAddr, extra: &str) -> anyhow::Result<ProxyUnderTest> {
        ProxyUnderTest::start_with(backend, "", extra).await
    }

    /// Like [`ProxyUnderTest::start`], with extra keys for the `[backend]` table.
    pub async fn start_with(
        backend: SocketAddr,
        backend_keys: &str,
        extra: &str,
    ) -> anyhow::Result<ProxyUnderTest> {
        ProxyUnderTest::start_raw(&format!(
            "[backend]\naddress = \"{backend}\"\n{backend_keys}\n{extra}"
        ))
        .await
    }

    /// Starts the proxy with exactly this config text; its listeners get
    /// fresh loopback ports whatever the text says. Waits until it is ready.
    pub async fn start_raw(text: &str) -> anyhow::Result<ProxyUnderTest> {
        let proxy = ProxyUnderTest::start_unready(text).await?;
        let admin = proxy.admin.address;
        wait_until(
            Duration::from_secs(10),
            "the proxy to be ready",
            || async move { http_status(admin, "GET", "/readyz").await == Some(200) },
        )
        .await?;
        Ok(proxy)
    }

    /// Starts the proxy and waits only until its admin listener answers.
    pub async fn start_unready(text: &str) -> anyhow::Result<ProxyUnderTest> {
        if let Ok(filter) = std::env::var("S3FP_TEST_LOG") {
            // Logs for a test being debugged: S3FP_TEST_LOG=debug cargo test ...
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let mut config = Config::parse(text)?;
        if let Some(raw) = raw_path_for_the_run(text) {
            config.listener.raw_http1 = raw;
        }
        if !text.contains("drain_delay") {
            // No load balancer to wait for: a test's stop is at once.
            config.shutdown.drain_delay = Duration::ZERO;
        }
        let s3 = TcpListener::bind("127.0.0.1:0").await?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        // The HTTPS listener, if configured, also gets a fresh loopback port.
        let s3_tls = match config.listener.tls {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await?),
            None => None,
        };
        let tls_address = s3_tls.as_ref().map(|l| l.local_addr()).transpose()?;
        let address = s3.local_addr()?;
        let admin_address = admin.local_addr()?;
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(s3_failover_proxy::run(
            Listeners::new(s3, s3_tls, admin),
            config,
            async move {
                let _ = stop.await;
            },
        ));
        let proxy = ProxyUnderTest {
            address,
            tls_address,
            admin: AdminClient::new(admin_address),
            shutdown: Some(shutdown),
            task: Some(task),
        };
        wait_until(Duration::from_secs(5), "the admin listener", || async {
            http_status(admin_address, "GET", "/healthz").await == Some(200)
        })
        .await?;
        Ok(proxy)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A proxy that notices a hung backend quickly (no response for 500 ms,
    /// probes give up after 200 ms) and holds for up to 20 s; its hyper path
    /// serves every request (`listener.raw_http1 = false`: the raw path's
    /// hang check is tested apart).
    pub async fn start_quick_to_notice_hangs(backend: SocketAddr) -> ProxyUnderTest {
        ProxyUnderTest::start_with(
            backend,
            "response_timeout = \"500ms\"",
            "[listener]\nraw_http1 = false\n[probe]\ntimeout = \"200ms\"\n[hold]\ntimeout = \"20s\"\n",
        )
        .await
        .unwrap()
    }

    /// Runs `request` while the backend is frozen (SIGSTOP), so it reaches the
    /// backend and hangs; thaws the backend once the proxy saw the hang.
    pub async fn through_a_hang<T, F>(&self, backend: &S3Backend, request: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        backend.freeze();
        let running = tokio::spawn(request);
        self.admin.wait_reason("hang_timeout").await;
        backend.thaw();
        running.await.unwrap()
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for ProxyUnderTest {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// One request over a fresh connection: status and whole body.
pub async fn raw_request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<(u16, Bytes)> {
    let response = send(address, method, path, headers, body).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// One request over a fresh connection: the response with its headers.
pub async fn send(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Ok(client.request(request.body(Full::new(body))?).await?)
}

/// An S3 client with its retries off, pointed at `endpoint`.
/// The `<Code>` of an S3 XML error body.
pub fn s3_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let start = text.find("<Code>").expect("an S3 error body") + "<Code>".len();
    let end = text.find("</Code>").unwrap();
    text[start..end].to_string()
}

pub fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(s3_config(endpoint).build())
}

/// The test client's configuration (path-style, retries off, the test
/// user's keys), for a test to change before building its client.
pub fn s3_config(endpoint: &str) -> aws_sdk_s3::config::Builder {
    let credentials =
        aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test");
    aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .endpoint_url(endpoint)
        .region(aws_sdk_s3::config::Region::new(REGION))
        .credentials_provider(credentials)
        .force_path_style(true)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
}

/// The bytes of a SigV4-signed HTTP/1.1 request (payload unsigned) for
/// `path` on `proxy`, with `body` (and its `Content-Length`) for a PUT.
pub fn signed_request_bytes(proxy: SocketAddr, method: &str, path: &str, body: &str) -> Vec<u8> {
    let host = proxy.to_string();
    let signed = sign_unsigned_payload(method, &format!("http://{host}{path}"), &host, &[]);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in signed {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "PUT" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    [head.as_bytes(), body.as_bytes()].concat()
}

/// SigV4 headers for a request whose payload is sent unsigned (streaming).
pub fn sign_unsigned_payload(
    method: &str,
    url: &str,
    host: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    sign_unsigned_payload_with(SECRET_KEY, method, url, host, extra)
}

/// [`sign_unsigned_payload`] with another secret key (a wrong one gets 403).
pub fn sign_unsigned_payload_with(
    secret: &str,
    method: &str,
    url: &str,
    host: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    use aws_sigv4::http_request::{
        PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
    };
    use aws_sigv4::sign::v4;
    let identity =
        aws_credential_types::Credentials::new(ACCESS_KEY, secret, None, None, "test").into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("s3")
        .time(std::time::SystemTime::now())
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let mut headers: Vec<(&str, &str)> = vec![("host", host)];
    headers.extend_from_slice(extra);
    let signable = SignableRequest::new(
        method,
        url,
        headers.into_iter(),
        SignableBody::UnsignedPayload,
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut request = http::Request::builder().uri(url).body(()).unwrap();
    instructions.apply_to_request_http1x(&mut request);
    request
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
        .collect()
}

/// The whole content of an object, read with the SDK (panics on failure).
pub async fn read_object(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    let got = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    got.body.collect().await.unwrap().into_bytes().to_vec()
}

/// Deterministic object content for key `n`.
pub fn object_content(n: usize, size: usize) -> Vec<u8> {
    (0..size).map(|i| ((i * 31 + n * 7) % 251) as u8).collect()
}

/// A request body fed chunk by chunk by the test, to control what the proxy
/// has sent when something happens.
pub struct ChunkFeed(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChunkFeed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// The bytes of a presigned GET of `bucket/key` (valid 5 minutes) as a
/// client sends them on a raw connection to where `s3` points.
pub async fn presigned_get(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    let presigned = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .presigned(
            aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(300)).unwrap(),
        )
        .await
        .unwrap();
    let uri: http::Uri = presigned.uri().parse().unwrap();
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        uri.path_and_query().unwrap(),
        uri.authority().unwrap()
    )
    .into_bytes()
}

/// Reads one response from a raw connection (head, then a `Content-Length`
/// body): its status and body.
pub async fn read_response(stream: &mut (impl AsyncReadExt + Unpin)) -> (u16, String) {
    let (head, body) = read_head_and_body(stream).await;
    let status = head[9..12].parse().unwrap_or_else(|_| panic!("{head}"));
    (status, body)
}

/// Reads one response from a raw connection: its head as sent, and its
/// `Content-Length` body.
pub async fn read_head_and_body(stream: &mut (impl AsyncReadExt + Unpin)) -> (String, String) {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("the answer arrives");
        assert_eq!(n, 1, "connection closed before an answer: {bytes:?}");
        bytes.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&bytes).to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8_lossy(&body).into())
}

/// A signed PUT (unsigned payload) whose body the test feeds chunk by chunk,
/// to control what the proxy has received when something happens.
pub struct FedUpload {
    pub feed: tokio::sync::mpsc::Sender<Bytes>,
    pub response: tokio::task::JoinHandle<
        Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    >,
}

impl FedUpload {
    /// Starts the PUT of `length` bytes to `path` through `proxy`.
    pub fn start(proxy: SocketAddr, path: &str, length: usize) -> FedUpload {
        let host = proxy.to_string();
        let url = format!("http://{host}{path}");
        let (feed, body) = tokio::sync::mpsc::channel::<Bytes>(4);
        let mut request = http::Request::builder()
            .method("PUT")
            .uri(&url)
            .header("content-length", length.to_string());
        for (name, value) in sign_unsigned_payload("PUT", &url, &host, &[]) {
            request = request.header(name, value);
        }
        let request = request.body(ChunkFeed(body)).unwrap();
        let client: Client<_, ChunkFeed> = Client::builder(TokioExecutor::new()).build_http();
        FedUpload {
            feed,
            response: tokio::spawn(async move { client.request(request).await }),
        }
    }

    /// Sends `bytes` in 64 KiB chunks; false once the body is no longer read.
    pub async fn send(&self, bytes: &[u8]) -> bool {
        for chunk in bytes.chunks(64 << 10) {
            if self.feed.send(Bytes::copy_from_slice(chunk)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Ends the body and waits for the answer: its status and body.
    pub async fn status(self) -> (u16, Bytes) {
        drop(self.feed);
        let response = self.response.await.unwrap().unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }
}

/// The proxy binary cargo built for this test run. `CARGO_BIN_EXE_*` names it
/// only to a test of the proxy's own package at compile time, and this
/// harness is a crate of its own: where cargo does not set it at run time,
/// the binary is the one in the profile directory above the running test's
/// `deps/` (`target/debug/s3-failover-proxy`).
fn proxy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_s3-failover-proxy") {
        return path.into();
    }
    let test = std::env::current_exe().expect("the running test's path");
    let profile = test
        .parent()
        .and_then(std::path::Path::parent)
        .expect("a test under target/<profile>/deps/");
    let binary = profile.join("s3-failover-proxy");
    assert!(
        binary.exists(),
        "{} missing: run the test through cargo test, which builds it",
        binary.display()
    );
    binary
}

/// The proxy binary as an operator runs it: a separate process with a config
/// file the test can rewrite, and signals.
pub struct ProxyProcess {
    pub port: u16,
    pub admin: AdminClient,
    pub config: tempfile::NamedTempFile,
    /// Everything the process wrote to stderr: its log.
    log: tempfile::NamedTempFile,
    child: Child,
}

impl ProxyProcess {
    /// Starts the binary with `[listener]` and `[admin]` on free loopback ports
    /// plus `body` (which must name the backend), and waits until it is ready.
    pub async fn start(body: &str) -> anyhow::Result<ProxyProcess> {
        ProxyProcess::start_as(body, Command::new(proxy_binary())).await
    }

    /// Like [`ProxyProcess::start`], with at most `descriptors` open files
    /// (`ulimit -n` in the shell that execs the binary).
    pub async fn start_with_descriptor_limit(
        body: &str,
        descriptors: u32,
    ) -> anyhow::Result<ProxyProcess> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {descriptors} && exec \"$0\" \"$@\""))
            .arg(proxy_binary());
        ProxyProcess::start_as(body, command).await
    }

    /// Starts `command` (the binary, or what execs it) with `--config`.
    async fn start_as(body: &str, mut command: Command) -> anyhow::Result<ProxyProcess> {
        let (port, admin_port) = (free_port(), free_port());
        let config = tempfile::NamedTempFile::new()?;
        let mut process = ProxyProcess {
            port,
            admin: AdminClient::new(SocketAddr::from(([127, 0, 0, 1], admin_port))),
            config,
            log: tempfile::NamedTempFile::new()?,
            child: Command::new("true").spawn()?,
        };
        process.write_config(body);
        process.child = command
            .arg("--config")
            .arg(process.config.path())
            .stderr(process.log.reopen()?)
            .spawn()?;
        let admin = process.admin.address;
        wait_until(
            Duration::from_secs(10),
            "the proxy process to be ready",
            || async move { http_status(admin, "GET", "/readyz").await == Some(200) },
        )
        .await?;
        Ok(process)
    }

    /// Starts a second process with this one's config and `--take-over`: it
    /// takes the listening sockets over through `listener.handover_socket`
    /// (which the config must set), and this one drains. Waits until the new
    /// process serves.
    pub async fn take_over(&self) -> anyhow::Result<ProxyProcess> {
        let config = tempfile::NamedTempFile::new()?;
        std::fs::copy(self.config.path(), config.path())?;
        let log = tempfile::NamedTempFile::new()?;
        let child = Command::new(proxy_binary())
            .arg("--config")
            .arg(config.path())
            .arg("--take-over")
            .stderr(log.reopen()?)
            .spawn()?;
        let successor = ProxyProcess {
            port: self.port,
            admin: self.admin.clone(),
            config,
            log,
            child,
        };
        wait_until(
            Duration::from_secs(10),
            "the new process to serve in place of the old one",
            || async {
                successor
                    .log_lines()
                    .iter()
                    .any(|line| line.contains("serving in place of the old process"))
            },
        )
        .await?;
        Ok(successor)
    }

    /// Writes the config: the generated `[listener]` and `[admin]` sections
    /// plus `body`; a `[listener]` section at the start of `body` is merged
    /// into the generated one.
    pub fn write_config(&self, body: &str) {
        self.write_config_with_mode(body, 0o600);
    }

    /// [`ProxyProcess::write_config`], the file appearing with permission
    /// bits `mode` (set before it replaces the old one: the file watcher
    /// never sees it with others).
    pub fn write_config_with_mode(&self, body: &str, mode: u32) {
        let (listener, rest) = match body.strip_prefix("[listener]\n") {
            Some(after) => after.split_at(after.find("\n[").map_or(after.len(), |end| end + 1)),
            None => ("", body),
        };
        let raw = match raw_path_for_the_run(listener) {
            Some(true) => "raw_http1 = true\n",
            Some(false) => "raw_http1 = false\n",
            None => "",
        };
        let text = format!(
            "[listener]\naddress = \"127.0.0.1:{}\"\n{raw}{listener}\n[admin]\naddress = \"{}\"\n{rest}",
            self.port, self.admin.address
        );
        self.replace_config_with_mode(&text, mode);
    }

    /// Replaces the config file in one step (write a sibling, rename over),
    /// as editors and ConfigMap updates do, so the file watcher never reads
    /// half a file.
    pub fn replace_config(&self, text: &str) {
        self.replace_config_with_mode(text, 0o600);
    }

    /// [`ProxyProcess::replace_config`] with permission bits `mode`.
    fn replace_config_with_mode(&self, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.config.path();
        let staged = path.with_extension("staged");
        std::fs::write(&staged, text).unwrap();
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).unwrap();
        std::fs::rename(&staged, path).unwrap();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .arg(which)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// True until the process has exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The most memory the process has held resident so far (VmHWM).
    pub fn peak_resident_bytes(&self) -> u64 {
        self.memory_status("VmHWM:")
    }

    /// The memory the process holds resident now (VmRSS).
    pub fn resident_bytes(&self) -> u64 {
        self.memory_status("VmRSS:")
    }

    /// CPU time (user and system, in clock ticks) each thread of the
    /// process whose name starts with `prefix` has used, by thread name.
    pub fn thread_cpu_ticks(&self, prefix: &str) -> std::collections::BTreeMap<String, u64> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut ticks = std::collections::BTreeMap::new();
        for task in std::fs::read_dir(tasks).unwrap() {
            let task = task.unwrap().path();
            let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
                continue;
            };
            let name = name.trim_end().to_owned();
            if !name.starts_with(prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(task.join("stat")).unwrap();
            // After the name in parentheses: state is field 3, utime 14, stime 15.
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            let used = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            ticks.insert(name, used);
        }
        ticks
    }

    fn memory_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// The complete log lines written so far (a line still being written,
    /// without its newline yet, is left for the next read).
    pub fn log_lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.log.path()).unwrap();
        let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
        lines.pop();
        lines
    }

    /// Waits up to `limit` for a log line that contains `text`; panics
    /// naming `text` when none comes.
    pub async fn wait_for_log(&self, text: &str, limit: Duration) {
        let found = || self.log_lines().iter().any(|line| line.contains(text));
        wait_until(limit, &format!("a log line with {text:?}"), || async {
            found()
        })
        .await
        .unwrap();
    }

    /// Waits for the process to exit after a signal.
    pub async fn exit_status(mut self) -> std::process::ExitStatus {
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("S3FP_TEST_LOG").is_some() {
            eprintln!(
                "{}",
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            );
        }
    }
}

/// The value of one sample, `name{labels}` exactly as exposed.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))?
        .parse()
        .ok()
}

/// An HTTP/2 frame (RFC 9113 section 4.1), for clients written frame by frame.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut bytes = vec![length[1], length[2], length[3], kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_backend_that_cannot_bind_its_port_says_so_at_once() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut backend = S3Backend::stopped().unwrap();
        backend.address = taken.local_addr().unwrap();
        // The process's exit, with what it wrote, rather than a wait for the
        // whole start-up limit.
        let error = backend.restart().await.unwrap_err().to_string();
        assert!(error.contains("exited"), "{error}");
        println!("{error}");
    }
}
