//! The floor of a hyper 1.x HTTP/1.1 proxy, for `benches/small_requests.sh`:
//! accept, forward on a pooled backend connection, stream the answer back;
//! nothing else (no hold, no log, no metrics, no header rewriting). It uses
//! the proxy's hyper settings (header-name case kept; request heads in
//! hyper's default 100 field slots, as the proxy's common rounds parse them,
//! response heads of up to 500 fields), so the difference between the two is
//! the proxy's own work per request. Connections are served as the proxy
//! serves them: each on one of the proxy's lanes (one current-thread runtime
//! per core, `s3_failover_proxy::lanes`), with a backend pool per lane.
//!
//!     cargo build --release --example hyper_floor
//!     bash benches/small_requests.sh target/release/s3-failover-proxy,target/release/examples/hyper_floor
//!
//! Reads `listener.address` and `backend.address` from the `--config` file
//! the bench script writes. Not a product: a failed backend is a 502 and
//! nothing more.

use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use s3_failover_proxy::lanes::{self, Lanes};
use tokio::net::{TcpListener, TcpStream};

type Pool = Arc<Mutex<Vec<SendRequest<Incoming>>>>;
type ProxyBody = BoxBody<Bytes, hyper::Error>;

#[derive(serde::Deserialize)]
struct Config {
    listener: Address,
    backend: Address,
}

#[derive(serde::Deserialize)]
struct Address {
    address: String,
}

/// A ready pooled connection, or a new one.
async fn checkout(pool: &Pool, backend: &str) -> std::io::Result<SendRequest<Incoming>> {
    loop {
        let pooled = pool.lock().unwrap().pop();
        let Some(mut sender) = pooled else { break };
        if sender.ready().await.is_ok() {
            return Ok(sender);
        }
    }
    let stream = TcpStream::connect(backend).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .max_headers(500)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn forward(pool: Pool, backend: Arc<str>, request: Request<Incoming>) -> Response<ProxyBody> {
    let answer = match checkout(&pool, &backend).await {
        Ok(mut sender) => {
            let answer = sender.send_request(request).await;
            pool.lock().unwrap().push(sender);
            answer.ok()
        }
        Err(_) => None,
    };
    match answer {
        Some(response) => response.map(BodyExt::boxed),
        None => {
            let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .skip_while(|arg| arg != "--config")
        .nth(1)
        .ok_or("usage: hyper_floor --config FILE")?;
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
                    let service = hyper::service::service_fn(move |request| {
                        let (pool, backend) = (Arc::clone(&pool), Arc::clone(&backend));
                        async move {
                            Ok::<_, std::convert::Infallible>(forward(pool, backend, request).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .preserve_header_case(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
}
