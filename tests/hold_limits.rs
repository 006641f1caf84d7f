//! The bounds of holding: a hold that times out, a full queue, one client's
//! share of the queue, a long outage, and a client that gives up while held.
//! Each answer is an S3 XML error with `Retry-After`, which S3 SDKs retry on
//! their own.

use std::time::Duration;

use bytes::Bytes;
use support::{
    ProxyUnderTest, S3Backend, metric_sample, raw_request, read_response, s3_code, send, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_times_out_answers_service_unavailable_with_retry_after() {
    let backend = S3Backend::stopped().unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\ntimeout = \"300ms\"\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let response = send(proxy.address, "GET", "/bucket/key", &[], Bytes::new())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the request was held first"
    );
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["content-type"], "application/xml");
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(s3_code(&body), "ServiceUnavailable");
    assert_eq!(proxy.admin.held().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_slow_down_at_once() {
    let backend = S3Backend::stopped().unwrap();
    let proxy = ProxyUnderTest::start(
        backend.address,
        "[hold]\nmax_requests = 2\nmax_requests_per_client = 2\ntimeout = \"30s\"\n",
    )
    .await
    .unwrap();
    let address = proxy.address;
    let held: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(async move {
                raw_request(address, "GET", &format!("/b/held-{i}"), &[], Bytes::new()).await
            })
        })
        .collect();
    proxy.admin.wait_held(2).await;
    let (status, body) = raw_request(address, "GET", "/b/overflow", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(s3_code(&body), "SlowDown");
    assert_eq!(
        proxy.admin.held().await,
        2,
        "the held requests are still held"
    );
    for request in held {
        request.abort();
    }
}

/// SigV4's `Authorization` naming `access_key` (the backend is down: the
/// signature is never checked).
fn signed_by(access_key: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/20261130/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_greedy_client_cannot_take_more_than_its_share_of_the_queue() {
    let mut backend = S3Backend::stopped().unwrap();
    let proxy = ProxyUnderTest::start(
        backend.address,
        "[hold]\nmax_requests = 6\nmax_requests_per_client = 3\ntimeout = \"30s\"\n",
    )
    .await
    .unwrap();
    let address = proxy.address;
    let request = move |access_key: &str, key: String| {
        let authorization = signed_by(access_key);
        async move {
            raw_request(
                address,
                "GET",
                &format!("/b/{key}"),
                &[("authorization", &authorization)],
                Bytes::new(),
            )
            .await
            .unwrap()
        }
    };
    let greedy: Vec<_> = (0..3)
        .map(|i| tokio::spawn(request("GREEDY", format!("greedy-{i}"))))
        .collect();
    proxy.admin.wait_held(3).await;
    let (status, body) = request("GREEDY", "one-too-many".into()).await;
    assert_eq!(status, 503);
    assert_eq!(s3_code(&body), "SlowDown");

    // Another client still queues, though the greedy one was refused.
    let polite = tokio::spawn(request("POLITE", "polite".into()));
    proxy.admin.wait_held(4).await;
    backend.spawn().unwrap();
    for held in greedy.into_iter().chain([polite]) {
        let (status, _) = held.await.unwrap();
        assert_ne!(status, 503, "held, then answered by the backend");
    }
    let metrics = proxy.admin.metrics().await;
    assert_eq!(
        metric_sample(
            &metrics,
            "s3fp_hold_outcomes_total{outcome=\"client_share\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_fail_fast_after_new_requests_fail_at_once_until_the_backend_is_back() {
    let mut backend = S3Backend::stopped().unwrap();
    let proxy = ProxyUnderTest::start(
        backend.address,
        "[hold]\nfail_fast_after = \"300ms\"\ntimeout = \"30s\"\n",
    )
    .await
    .unwrap();
    let address = proxy.address;
    let early =
        tokio::spawn(async move { raw_request(address, "HEAD", "/", &[], Bytes::new()).await });
    proxy.admin.wait_held(1).await;
    // Until the outage is 300 ms old new requests are held; after, they fail at once.
    wait_until(Duration::from_secs(10), "a fast failure", || async {
        let attempt = raw_request(address, "GET", "/b/k", &[], Bytes::new());
        match tokio::time::timeout(Duration::from_millis(250), attempt).await {
            Ok(Ok((status, body))) => status == 503 && s3_code(&body) == "ServiceUnavailable",
            _ => false,
        }
    })
    .await
    .unwrap();
    assert_eq!(
        proxy.admin.held().await,
        1,
        "the early request is still held"
    );
    backend.restart().await.unwrap();
    let (status, _) = early.await.unwrap().unwrap();
    assert_ne!(status, 503, "the held request was answered by the backend");
    let (status, _) = raw_request(address, "HEAD", "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_ne!(status, 503, "new requests pass again");
}

/// A backend that answers the probe and records every other request line.
async fn recording_backend() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (seen, requests) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer_one(stream, seen.clone()));
        }
    });
    (address, requests)
}

/// Reads one request (asking for its body with `100 Continue` when it
/// expects one, as an HTTP/1.1 server does), records its request line and
/// answers `200 OK`.
async fn answer_one(mut stream: TcpStream, seen: tokio::sync::mpsc::UnboundedSender<String>) {
    let mut head = vec![0u8; 4096];
    let n = stream.read(&mut head).await.unwrap_or(0);
    let text = String::from_utf8_lossy(&head[..n]).into_owned();
    let line = text.lines().next().unwrap_or("").to_string();
    if !line.starts_with("HEAD") {
        let _ = seen.send(line);
    }
    if text
        .to_ascii_lowercase()
        .contains("\r\nexpect: 100-continue\r\n")
    {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        let _ = stream.read(&mut head).await;
    }
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_held_frees_its_slot_and_nothing_reaches_the_backend() {
    let (backend, mut requests) = recording_backend().await;
    let proxy = ProxyUnderTest::start(backend, "").await.unwrap();
    proxy.admin.post("/admin/pause?wait=1s").await;

    let mut client = TcpStream::connect(proxy.address).await.unwrap();
    client
        .write_all(b"PUT /bucket/abandoned HTTP/1.1\r\nHost: s3\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    proxy.admin.wait_held(1).await;
    // While held, the proxy does not ask for the body.
    let mut interim = [0u8; 32];
    let asked = tokio::time::timeout(Duration::from_millis(300), client.read(&mut interim)).await;
    assert!(asked.is_err(), "no 100 Continue while held: {:?}", asked);
    drop(client);
    proxy.admin.wait_held(0).await;

    proxy.admin.post("/admin/resume").await;
    let (status, _) = raw_request(proxy.address, "GET", "/bucket/after", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let first = requests.recv().await.unwrap();
    assert_eq!(
        first, "GET /bucket/after HTTP/1.1",
        "the abandoned PUT never reached the backend"
    );
}

/// A keep-alive connection rests between its requests outside its task
/// (`src/resting.rs`) and comes back with a new watch on its socket: a
/// client that leaves while its second request is held is still seen
/// leaving (its socket was watched for its first held request too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_held_is_seen_after_its_connection_rested() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\ntimeout = \"60s\"\n")
        .await
        .unwrap();
    // Any answer will do (unsigned: s3s-fs refuses it), on a kept-alive
    // connection.
    let get = b"GET /bucket/k HTTP/1.1\r\nHost: s3\r\n\r\n";
    let mut client = TcpStream::connect(proxy.address).await.unwrap();
    proxy.admin.post("/admin/pause?wait=1s").await;
    client.write_all(get).await.unwrap();
    proxy.admin.wait_held(1).await;
    proxy.admin.post("/admin/resume").await;
    let (status, _) = read_response(&mut client).await;
    assert_eq!(status, 403, "answered by the backend");
    // The client idles (the input under test): the connection rests.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.admin.post("/admin/pause?wait=1s").await;
    client.write_all(get).await.unwrap();
    proxy.admin.wait_held(1).await;
    drop(client);
    // Seen leaving well before the hold timeout (60 s).
    proxy.admin.wait_held(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_with_expect_continue_is_asked_for_its_body_once_released() {
    let (backend, mut requests) = recording_backend().await;
    let proxy = ProxyUnderTest::start(backend, "").await.unwrap();
    proxy.admin.post("/admin/pause?wait=1s").await;
    let mut client = TcpStream::connect(proxy.address).await.unwrap();
    client
        .write_all(b"PUT /bucket/k HTTP/1.1\r\nHost: s3\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    proxy.admin.wait_held(1).await;
    proxy.admin.post("/admin/resume").await;
    let mut interim = vec![0u8; 25];
    client.read_exact(&mut interim).await.unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    client.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&rest).contains("\r\n\r\n") {
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "a final answer arrives");
        rest.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&rest).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(requests.recv().await.unwrap(), "PUT /bucket/k HTTP/1.1");
}
