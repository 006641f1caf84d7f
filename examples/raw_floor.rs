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

use std::sync::{Arc, Mutex};

use s3_failover_proxy::lanes::{self, Lanes};
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

async fn serve(mut client: TcpStream, pool: Pool, backend: Arc<str>) -> Option<()> {
    let mut request = Vec::with_capacity(8192);
    let mut answer = Vec::with_capacity(8192);
    loop {
        request.clear();
        let (head, _) = read_head(&mut client, &mut request, true).await?;
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .skip_while(|arg| arg != "--config")
        .nth(1)
        .ok_or("usage: raw_floor --config FILE")?;
    let config: Config = toml::from_str(&std::fs::read_to_string(path)?)?;
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
                lanes.spawn(async move {
                    let Ok(stream) = TcpStream::from_std(stream) else {
                        return;
                    };
                    let pool = Arc::clone(&pools[lanes::current().unwrap_or(0)]);
                    serve(stream, pool, backend).await;
                });
            }
        })
}
