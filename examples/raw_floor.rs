//! The floor of an HTTP/1.1 forwarder that does not use hyper, for
//! `benches/small_requests.sh`: heads are parsed with httparse only to find
//! where they end and how long the answer's body is, and are forwarded as
//! the bytes that came (names, case and order untouched, nothing rebuilt).
//! Served as the proxy and `hyper_floor` serve: one accept loop, each
//! connection on one of the proxy's lanes (`s3_failover_proxy::lanes`), a
//! backend pool per lane. It measures what the tokio event loop and the
//! kernel cost without an HTTP library's request and response objects, to
//! set beside `hyper_floor` and HAProxy.
//!
//!     cargo build --release --example raw_floor
//!     bash benches/small_requests.sh target/release/s3-failover-proxy,target/release/examples/raw_floor
//!
//! Not a product, not even a proxy: requests with a body, chunked answers,
//! `Expect`, HTTP/1.0 and every failure end the connection.
//!
//! With `RAW_FLOOR_PROXY_WORK=1` in its environment it also does, per
//! request, the work the proxy's own request path would keep on such a
//! path, with the proxy's own code: the method as an `http::Method`, the
//! gate's admission (`Gate::admit_at_once`), the in-flight count, the
//! forwarding headers appended to the head (after looking for a signature
//! and earlier ones), the answer's hop-by-hop fields and
//! `x-amz-request-id` looked for, `Metrics::request` and the request line
//! written through the proxy's logging (text, at info, to stderr).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method};
use s3_failover_proxy::access_log::{ProxyRequestId, RequestId, RequestLine};
use s3_failover_proxy::config::{LogConfig, LogFormat};
use s3_failover_proxy::drain::InFlight;
use s3_failover_proxy::gate::{Gate, GateSettings};
use s3_failover_proxy::lanes::{self, Lanes};
use s3_failover_proxy::metrics::Metrics;
use s3_failover_proxy::outcome::RequestOutcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Pool = Arc<Mutex<Vec<TcpStream>>>;

#[derive(serde::Deserialize)]
struct Config {
    listener: Address,
    backend: Address,
}

#[derive(serde::Deserialize)]
struct Address {
    address: String,
}

/// Most fields of a head parsed; more ends the connection.
const MAX_FIELDS: usize = 100;

/// Reads into `buffer` until it holds a whole head; its length and, for an
/// answer, its `Content-Length`. `None` when the peer closed or sent what
/// this floor does not forward.
async fn read_head(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    request: bool,
) -> Option<(usize, usize)> {
    loop {
        if stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let parsed = if request {
            let mut head = httparse::Request::new(&mut fields);
            let status = head.parse(buffer).ok()?;
            status
                .is_complete()
                .then(|| (status.unwrap(), content_length(head.headers)))
        } else {
            let mut head = httparse::Response::new(&mut fields);
            let status = head.parse(buffer).ok()?;
            status
                .is_complete()
                .then(|| (status.unwrap(), content_length(head.headers)))
        };
        if let Some((length, body)) = parsed {
            let body = body?;
            if request && body > 0 {
                return None;
            }
            return Some((length, body));
        }
    }
}

/// The `Content-Length` of a head, 0 without one; `None` if unreadable.
fn content_length(fields: &[httparse::Header<'_>]) -> Option<usize> {
    fields
        .iter()
        .find(|field| field.name.eq_ignore_ascii_case("content-length"))
        .map_or(Some(0), |field| {
            std::str::from_utf8(field.value).ok()?.parse().ok()
        })
}

/// What the proxy's request path shares between requests.
struct ProxyWork {
    gate: Arc<Gate>,
    in_flight: InFlight,
    metrics: Metrics,
}

impl ProxyWork {
    fn new() -> ProxyWork {
        ProxyWork {
            gate: Gate::new(GateSettings {
                max_held: 10_000,
                max_held_per_client: 5_000,
                fail_fast_after: Duration::from_secs(60),
                release_concurrency: 64,
                max_pause: Duration::from_secs(60),
            }),
            in_flight: InFlight::default(),
            metrics: Metrics::new(),
        }
    }

    /// The head sent to the backend: `head` with the forwarding headers
    /// appended unless the request carries them or a signature.
    fn outbound(&self, head: &[u8]) -> Option<Vec<u8>> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut request = httparse::Request::new(&mut fields);
        request.parse(head).ok()?;
        let carries = |name: &str| {
            request
                .headers
                .iter()
                .any(|field| field.name.eq_ignore_ascii_case(name))
        };
        if carries("authorization") || carries("x-forwarded-for") || carries("x-forwarded-proto") {
            return Some(head.to_vec());
        }
        let end = head.len() - 2;
        Some(
            [
                &head[..end],
                b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n",
            ]
            .concat(),
        )
    }

    /// What the answer's head says for the request line.
    fn answer(answer: &[u8]) -> Option<(u16, RequestId)> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut response = httparse::Response::new(&mut fields);
        response.parse(answer).ok()?;
        let hop_by_hop = [
            "keep-alive",
            "proxy-connection",
            "te",
            "transfer-encoding",
            "upgrade",
        ];
        let mut id = None;
        for field in response.headers.iter() {
            if hop_by_hop
                .iter()
                .any(|n| field.name.eq_ignore_ascii_case(n))
            {
                return None;
            }
            if field.name.eq_ignore_ascii_case("x-amz-request-id") {
                id = HeaderValue::from_bytes(field.value).ok();
            }
        }
        let request_id = match id {
            Some(value) => RequestId::from_backend(Some(&value)),
            None => RequestId::Proxy(ProxyRequestId::next()),
        };
        Some((response.code?, request_id))
    }
}

async fn serve(
    mut client: TcpStream,
    pool: Pool,
    backend: Arc<str>,
    work: Option<Arc<ProxyWork>>,
) -> Option<()> {
    let mut request = Vec::with_capacity(8192);
    let mut answer = Vec::with_capacity(8192);
    loop {
        request.clear();
        let (head, _) = read_head(&mut client, &mut request, true).await?;
        if let Some(work) = &work {
            serve_one(
                &mut client,
                &pool,
                &backend,
                work,
                &request[..head],
                &mut answer,
            )
            .await?;
            continue;
        }
        let pooled = pool.lock().unwrap().pop();
        let mut upstream = match pooled {
            Some(upstream) => upstream,
            None => {
                let upstream = TcpStream::connect(&*backend).await.ok()?;
                upstream.set_nodelay(true).ok()?;
                upstream
            }
        };
        upstream.write_all(&request[..head]).await.ok()?;
        answer.clear();
        let (head, body) = read_head(&mut upstream, &mut answer, false).await?;
        while answer.len() < head + body {
            if upstream.read_buf(&mut answer).await.ok()? == 0 {
                return None;
            }
        }
        pool.lock().unwrap().push(upstream);
        client.write_all(&answer).await.ok()?;
    }
}

/// One request with the proxy's work around it.
async fn serve_one(
    client: &mut TcpStream,
    pool: &Pool,
    backend: &str,
    work: &ProxyWork,
    head: &[u8],
    answer: &mut Vec<u8>,
) -> Option<()> {
    let started = Instant::now();
    let method = Method::from_bytes(&head[..head.iter().position(|&b| b == b' ')?]).ok()?;
    let _admission = work.gate.admit_at_once()?;
    let _in_flight = work.in_flight.enter();
    let outbound = work.outbound(head)?;
    let pooled = pool.lock().unwrap().pop();
    let mut upstream = match pooled {
        Some(upstream) => upstream,
        None => {
            let upstream = TcpStream::connect(backend).await.ok()?;
            upstream.set_nodelay(true).ok()?;
            upstream
        }
    };
    upstream.write_all(&outbound).await.ok()?;
    answer.clear();
    let (answer_head, body) = read_head(&mut upstream, answer, false).await?;
    while answer.len() < answer_head + body {
        if upstream.read_buf(answer).await.ok()? == 0 {
            return None;
        }
    }
    pool.lock().unwrap().push(upstream);
    let (status, request_id) = ProxyWork::answer(&answer[..answer_head])?;
    client.write_all(answer).await.ok()?;
    let path_end = head
        .iter()
        .skip(method.as_str().len() + 1)
        .position(|&b| b == b' ')?;
    let path = std::str::from_utf8(&head[method.as_str().len() + 1..][..path_end]).ok()?;
    let duration = started.elapsed();
    work.metrics
        .request(&method, status, duration, 0, body as u64);
    RequestLine {
        method: &method,
        path,
        status,
        held_ms: 0,
        replays: 0,
        resumes: 0,
        bytes_in: 0,
        bytes_out: body as u64,
        duration_ms: duration.as_millis() as u64,
        request_id: &request_id,
        outcome: RequestOutcome::Ok,
    }
    .log();
    Some(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .skip_while(|arg| arg != "--config")
        .nth(1)
        .ok_or("usage: raw_floor --config FILE")?;
    let config: Config = toml::from_str(&std::fs::read_to_string(path)?)?;
    let work = std::env::var_os("RAW_FLOOR_PROXY_WORK").map(|_| {
        let log = LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        };
        // Kept for the process's life: dropping it would stop the flushes.
        std::mem::forget(s3_failover_proxy::logging::init(&log));
        Arc::new(ProxyWork::new())
    });
    let backend: Arc<str> = config.backend.address.into();
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    let lanes = Lanes::start(cores)?;
    let pools: Arc<Vec<Pool>> = Arc::new((0..cores).map(|_| Pool::default()).collect());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&config.listener.address).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let stream = stream.into_std()?;
                let (pools, backend) = (Arc::clone(&pools), Arc::clone(&backend));
                let work = work.clone();
                lanes.spawn(async move {
                    let Ok(stream) = TcpStream::from_std(stream) else {
                        return;
                    };
                    let pool = Arc::clone(&pools[lanes::current().unwrap_or(0)]);
                    serve(stream, pool, backend, work).await;
                });
            }
        })
}
