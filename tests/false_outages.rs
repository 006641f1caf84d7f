//! Hold only for real outages. A client that pauses its upload, a backend
//! that is slow before its first byte, a backend that refuses an upload and
//! closes: none of them is an outage. Every client gets the status it would
//! get straight from the backend, no other client is held, nothing is
//! replayed; the proxy's own limits (`listener.client_body_timeout`,
//! `backend.first_byte_timeout`) answer `408` and `504` without blaming the
//! backend.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::{
    FedUpload, ProxyUnderTest, S3Backend, metric_sample, object_content, raw_request, read_object,
    s3_client, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

async fn replays(proxy: &ProxyUnderTest) -> f64 {
    metric_sample(
        &proxy.admin.metrics().await,
        "s3fp_replays_total{outcome=\"replayed\"}",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pauses_its_upload_is_no_outage() {
    let backend = S3Backend::start().await.unwrap();
    // The proxy checks a silent backend after 300 ms; this client is silent
    // five times that long, mid-body.
    let proxy = ProxyUnderTest::start_with(backend.address, "response_timeout = \"300ms\"", "")
        .await
        .unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("paused")
        .send()
        .await
        .unwrap();
    let content = object_content(1, 1 << 20);
    let upload = FedUpload::start(proxy.address, "/paused/object", content.len());
    assert!(upload.send(&content[..512 << 10]).await);
    tokio::time::sleep(Duration::from_millis(1500)).await; // the client's pause: the input under test
    assert!(upload.send(&content[512 << 10..]).await);
    let (status, body) = upload.status().await;

    assert_eq!(status, 200, "{body:?}");
    let s3 = s3_client(&proxy.endpoint());
    assert_eq!(read_object(&s3, "paused", "object").await, content);
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "a pausing client is no outage"
    );
    assert_eq!(replays(&proxy).await, 0.0, "nothing was sent twice");
}

/// The figures, with the shipped defaults (`backend.response_timeout`
/// 30 s, `listener.client_body_timeout` 60 s): a 1 MiB PUT paused 35 s after
/// 512 KiB is stored; one silent for good gets `408` after 60 s. About a
/// minute of wall time, run alongside the rest of this file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_timeouts_a_35_s_pause_is_stored_and_a_60_s_silence_gets_408() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("defaults").send().await.unwrap();
    let content = object_content(3, 1 << 20);
    let paused = FedUpload::start(proxy.address, "/defaults/paused", content.len());
    let silent = FedUpload::start(proxy.address, "/defaults/silent", content.len());
    assert!(paused.send(&content[..512 << 10]).await);
    assert!(silent.send(&content[..512 << 10]).await);

    tokio::time::sleep(Duration::from_secs(35)).await; // the client's pause: the input under test
    assert!(paused.send(&content[512 << 10..]).await);
    let (status, body) = paused.status().await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(read_object(&s3, "defaults", "paused").await, content);

    // The silent client never sends the rest; its feed stays open.
    let response = silent.response.await.unwrap().unwrap();
    assert_eq!(response.status(), 408);
    drop(silent.feed);
    let head = s3
        .head_object()
        .bucket("defaults")
        .key("silent")
        .send()
        .await;
    assert!(head.is_err(), "nothing stored: {head:?}");
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "neither client is an outage"
    );
    assert_eq!(replays(&proxy).await, 0.0, "nothing was sent twice");
}

/// A `client_body_timeout` far shorter than `response_timeout` still ends
/// the wait in its own time: the watchdog wakes for the client's silence,
/// not only for the backend's check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_client_body_timeout_is_not_held_up_by_a_long_response_timeout() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start_with(
        backend.address,
        "response_timeout = \"10m\"",
        "[listener]\nclient_body_timeout = \"1s\"\n",
    )
    .await
    .unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("short")
        .send()
        .await
        .unwrap();
    let upload = FedUpload::start(proxy.address, "/short/object", 1 << 20);
    assert!(upload.send(&object_content(4, 512 << 10)).await);
    let response = tokio::time::timeout(Duration::from_secs(30), upload.response)
        .await
        .expect("408 well before the 10 min backend check")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 408);
    drop(upload.feed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_past_client_body_timeout_gets_408_and_nothing_is_stored() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start_with(
        backend.address,
        "response_timeout = \"300ms\"",
        "[listener]\nclient_body_timeout = \"1s\"\n",
    )
    .await
    .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("silent").send().await.unwrap();
    let content = object_content(2, 1 << 20);
    let upload = FedUpload::start(proxy.address, "/silent/object", content.len());
    assert!(upload.send(&content[..512 << 10]).await);
    // Never sends the rest; the feed stays open.
    let response = upload.response.await.unwrap().unwrap();

    assert_eq!(response.status(), 408);
    assert_eq!(response.headers()["connection"], "close");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("<Code>RequestTimeout</Code>"),
        "{body:?}"
    );
    let head = s3.head_object().bucket("silent").key("object").send().await;
    assert!(head.is_err(), "nothing stored: {head:?}");
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "the client's silence is no outage"
    );
    assert_eq!(replays(&proxy).await, 0.0);
    drop(upload.feed);
}

/// A backend that answers the probe (`HEAD /`) at once and, for every other
/// request, reads its body and answers `200` after `delay`; it reports each
/// request line it received.
async fn slow_backend(delay: Duration) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (seen, lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_slowly(stream, delay, seen.clone()));
        }
    });
    (address, lines)
}

async fn serve_slowly(mut stream: TcpStream, delay: Duration, seen: mpsc::UnboundedSender<String>) {
    loop {
        let Some((line, body_length)) = read_head(&mut stream).await else {
            return;
        };
        let mut body = vec![0u8; body_length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        if !line.starts_with("HEAD / ") {
            let _ = seen.send(line);
            tokio::time::sleep(delay).await;
        }
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// One request head: its request line and Content-Length.
async fn read_head(stream: &mut TcpStream) -> Option<(String, usize)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let length = text
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    Some((text.lines().next()?.to_string(), length))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_byte_from_a_serving_backend_is_waited_for() {
    let (backend, mut lines) = slow_backend(Duration::from_millis(2000)).await;
    let proxy = ProxyUnderTest::start_with(backend, "response_timeout = \"300ms\"", "")
        .await
        .unwrap();
    let (status, body) = raw_request(proxy.address, "PUT", "/b/k", &[], Bytes::from("data"))
        .await
        .unwrap();

    assert_eq!(status, 200);
    assert_eq!(body, "ok");
    assert_eq!(lines.recv().await.unwrap(), "PUT /b/k HTTP/1.1");
    assert!(lines.try_recv().is_err(), "the request was sent once");
    assert_eq!(proxy.admin.outages().await, 0.0, "slow is not dead");
    let checks = metric_sample(
        &proxy.admin.metrics().await,
        "s3fp_outage_checks_total{result=\"serving\",suspicion=\"hang_timeout\"}",
    )
    .unwrap();
    assert!(checks >= 1.0, "the proxy asked the backend, which served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_backend_past_the_first_byte_timeout_gets_504_and_no_replay() {
    serving_backend_past_the_first_byte_timeout_gets_504_and_no_replay(
        "[listener]\nraw_http1 = false\n",
    )
    .await;
}

/// The same on the raw HTTP/1.1 path (`listener.raw_http1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_backend_past_the_first_byte_timeout_gets_504_and_no_replay_on_the_raw_path() {
    serving_backend_past_the_first_byte_timeout_gets_504_and_no_replay(
        "[listener]\nraw_http1 = true\n",
    )
    .await;
}

async fn serving_backend_past_the_first_byte_timeout_gets_504_and_no_replay(extra: &str) {
    let (backend, mut lines) = slow_backend(Duration::from_secs(5)).await;
    let proxy = ProxyUnderTest::start_with(
        backend,
        "response_timeout = \"300ms\"\nfirst_byte_timeout = \"1s\"",
        extra,
    )
    .await
    .unwrap();
    let (status, body) = raw_request(proxy.address, "GET", "/b/k", &[], Bytes::new())
        .await
        .unwrap();

    assert_eq!(status, 504);
    assert!(String::from_utf8_lossy(&body).contains("<Code>GatewayTimeout</Code>"));
    assert_eq!(lines.recv().await.unwrap(), "GET /b/k HTTP/1.1");
    assert!(
        lines.try_recv().is_err(),
        "not replayed: the backend may still run it"
    );
    assert_eq!(proxy.admin.outages().await, 0.0);
    assert_eq!(proxy.admin.status().await["state"], "up");
}

/// A backend that refuses every upload with a complete `403` as soon as it
/// has the head, and closes without reading the body.
async fn refusing_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some((line, _)) = read_head(&mut stream).await else {
                    return;
                };
                let answer: &[u8] = if line.starts_with("HEAD / ") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nConnection: close\r\n\r\nforbidden"
                };
                let _ = stream.write_all(answer).await;
                // Closing with the body unread sends a reset.
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_after_a_complete_403_is_no_outage() {
    let backend = refusing_backend().await;
    let proxy = ProxyUnderTest::start(backend, "").await.unwrap();
    for attempt in 0..20 {
        let content = object_content(attempt, 4 << 20);
        let FedUpload { feed, response } =
            FedUpload::start(proxy.address, &format!("/b/k{attempt}"), content.len());
        // The client streams on while the answer comes back.
        let sender = tokio::spawn(async move {
            for chunk in content.chunks(64 << 10) {
                if feed.send(Bytes::copy_from_slice(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let response = response.await.unwrap().unwrap();
        sender.abort();
        assert_eq!(response.status(), 403, "try {attempt}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "forbidden");
    }
    assert_eq!(proxy.admin.outages().await, 0.0);
    assert_eq!(replays(&proxy).await, 0.0);
    wait_until(Duration::from_secs(5), "the gate to be up", || async {
        proxy.admin.status().await["state"] == "up"
    })
    .await
    .unwrap();
}
