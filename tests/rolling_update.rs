//! The proxy's own restart on Kubernetes costs no request. A test front plays
//! the Service: it keeps sending new connections to the terminating proxy
//! for 2 s after its SIGTERM (kube-proxy and load balancers learn of the
//! endpoint removal late), then to the new one. With `shutdown.drain_delay`
//! the old proxy turns unready at once but keeps accepting and serving, each
//! HTTP/1.1 answer with `Connection: close` so clients reconnect: PutObject
//! every 100 ms and a keep-alive GET loop, SDK retries off, see no failure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::workload::{Workload, read_loop};
use support::{ProxyProcess, S3Backend, s3_client, wait_until};
use tokio::net::{TcpListener, TcpStream};

/// A Service of the test's own: each new connection goes to the current
/// endpoint, relayed until either side closes; a refused connect closes the
/// client's connection, as a Service with a dead endpoint does.
struct Service {
    address: SocketAddr,
    endpoint: Arc<Mutex<SocketAddr>>,
}

impl Service {
    async fn start(endpoint: SocketAddr) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let endpoint = Arc::new(Mutex::new(endpoint));
        let current = Arc::clone(&endpoint);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = *current.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Service { address, endpoint }
    }

    fn route_to(&self, endpoint: SocketAddr) {
        *self.endpoint.lock().unwrap() = endpoint;
    }
}

async fn proxy(backend: &S3Backend) -> ProxyProcess {
    ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\n[shutdown]\ndrain_delay = \"3s\"\ngrace = \"5s\"\n",
        backend.address
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_the_proxy_costs_no_request() {
    let backend = S3Backend::start().await.unwrap();
    let old = proxy(&backend).await;
    let new = proxy(&backend).await;
    let service = Service::start(old.address()).await;
    let s3 = s3_client(&format!("http://{}", service.address));
    s3.create_bucket().bucket("rolling").send().await.unwrap();
    s3.put_object()
        .bucket("rolling")
        .key("read-me")
        .body(b"steady".to_vec().into())
        .send()
        .await
        .unwrap();

    let writes = Workload::start(&s3, "rolling");
    let stop_reads = Arc::new(AtomicBool::new(false));
    let reads = read_loop(
        &s3,
        "rolling",
        "read-me",
        b"steady",
        Arc::clone(&stop_reads),
    );
    wait_until(Duration::from_secs(10), "writes under way", || async {
        old.admin.metrics().await.contains("s3fp_requests_total")
    })
    .await
    .unwrap();

    old.signal("-TERM");
    // The old pod is unready at once.
    wait_until(Duration::from_secs(5), "the old proxy unready", || async {
        support::http_status(old.admin.address, "GET", "/readyz").await != Some(200)
    })
    .await
    .unwrap();
    // The endpoint removal takes 2 s to reach the Service.
    tokio::time::sleep(Duration::from_secs(2)).await; // the propagation delay: the input under test
    service.route_to(new.address());

    assert!(
        old.exit_status().await.success(),
        "the old proxy exits cleanly"
    );
    stop_reads.store(true, Ordering::SeqCst);
    let failed_reads = reads.await.unwrap();
    assert!(failed_reads.is_empty(), "failed GETs: {failed_reads:?}");
    let results = writes.stop_and_check().await;
    assert!(results.len() >= 30, "{} writes", results.len());
}

/// A cleartext HTTP/2 connection (prior knowledge): its sender, and the
/// connection task, which ends once the proxy has closed the connection.
async fn http2_connection(
    address: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(address).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(connection))
}

async fn answered(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    address: SocketAddr,
) -> bool {
    let request = http::Request::get(format!("http://{address}/"))
        .body(http_body_util::Empty::new())
        .unwrap();
    sender.send_request(request).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_are_sent_goaway_as_the_drain_begins() {
    let backend = S3Backend::start().await.unwrap();
    // A drain delay longer than the test: a connection that ends did so
    // because of GOAWAY, not because the proxy stopped.
    let mut proxy = ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\n[shutdown]\ndrain_delay = \"120s\"\n",
        backend.address
    ))
    .await
    .unwrap();
    let address = proxy.address();
    let (mut before, before_ended) = http2_connection(address).await;
    assert!(answered(&mut before, address).await);

    proxy.signal("-TERM");
    wait_until(
        Duration::from_secs(10),
        "the HTTP/2 connection opened before SIGTERM to be closed by GOAWAY",
        || async { before_ended.is_finished() },
    )
    .await
    .unwrap();
    assert!(before_ended.await.unwrap().is_ok(), "a graceful close");

    // A connection opened during the drain is served, then sent GOAWAY.
    // Two PINGs answered first: the proxy has served the connection for two
    // round trips, so a GOAWAY it sent at the start (and the closing GOAWAY
    // after its own PING, which the client answers) would be here by now.
    let tcp = TcpStream::connect(address).await.unwrap();
    let (during, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping_pong = connection.ping_pong().unwrap();
    let during_ended = tokio::spawn(connection);
    for _ in 0..2 {
        ping_pong
            .ping(h2::Ping::opaque())
            .await
            .expect("the connection opened while draining is open");
    }
    let request = http::Request::get(format!("http://{address}/"))
        .body(())
        .unwrap();
    let (response, _) = during
        .ready()
        .await
        .expect("the connection opened while draining takes a request")
        .send_request(request, true)
        .unwrap();
    assert!(response.await.is_ok(), "served while draining");
    wait_until(
        Duration::from_secs(10),
        "the HTTP/2 connection opened while draining to be closed by GOAWAY",
        || async { during_ended.is_finished() },
    )
    .await
    .unwrap();
    assert!(proxy.is_running(), "the proxy is still in its drain delay");
}
