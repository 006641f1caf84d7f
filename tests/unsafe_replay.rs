//! Replay only what is safe. A request that reached a backend which then died
//! is sent again only when that cannot change the outcome; otherwise the
//! client gets an error, never a 200 for data not stored, never a duplicate,
//! never a truncated body passed off as complete.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::relay::Relay;
use support::{ChunkFeed, ProxyUnderTest, S3Backend, s3_client, sign_unsigned_payload, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_upload_fails_the_upload_and_stores_nothing() {
    let mut backend = S3Backend::start().await.unwrap();
    // The relay shows how much of the upload reached the backend.
    let relay = Relay::start(backend.address).await.unwrap();
    let proxy = ProxyUnderTest::start(relay.address, "[hold]\nreplay_buffer = \"1MiB\"\n")
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("uploads").send().await.unwrap();

    let total: usize = 16 << 20;
    let chunk = Bytes::from(vec![b'x'; 64 << 10]);
    let host = proxy.address.to_string();
    let url = format!("http://{host}/uploads/half");
    let signed = sign_unsigned_payload("PUT", &url, &host, &[]);
    let (feed, body) = tokio::sync::mpsc::channel::<Bytes>(4);
    let mut request = http::Request::builder()
        .method("PUT")
        .uri(&url)
        .header("content-length", total.to_string());
    for (name, value) in &signed {
        request = request.header(name, value);
    }
    let request = request.body(ChunkFeed(body)).unwrap();
    let client: Client<_, ChunkFeed> = Client::builder(TokioExecutor::new()).build_http();
    let upload = tokio::spawn(async move { client.request(request).await });

    // Send 4 MiB; once 2 MiB, past the replay buffer, reached the backend,
    // crash it.
    for _ in 0..64 {
        feed.send(chunk.clone()).await.unwrap();
    }
    let sent = || -> usize { relay.connections().iter().map(|c| c.to_backend.len()).sum() };
    wait_until(
        Duration::from_secs(10),
        "2 MiB of the upload at the backend",
        || async { sent() > 2 << 20 },
    )
    .await
    .unwrap();
    backend.kill9();
    for _ in 64..(total / chunk.len()) {
        if feed.send(chunk.clone()).await.is_err() {
            break;
        }
    }
    drop(feed);
    match upload.await.unwrap() {
        Ok(response) => {
            let status = response.status();
            let body = response.into_body().collect().await.map(|b| b.to_bytes());
            assert_eq!(status, 503, "an unreplayable upload gets an error");
            assert!(
                String::from_utf8_lossy(&body.unwrap()).contains("<Code>ServiceUnavailable</Code>")
            );
        }
        Err(error) => eprintln!("upload failed at the connection level, as allowed: {error}"),
    }

    backend.restart().await.unwrap();
    let head = s3.head_object().bucket("uploads").key("half").send().await;
    assert!(head.is_err(), "no partial object appears");
    let listed = s3.list_objects_v2().bucket("uploads").send().await.unwrap();
    assert!(
        listed.contents().is_empty(),
        "nothing stored: {:?}",
        listed.contents()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_download_and_not_back_in_time_aborts_the_client_connection() {
    let mut backend = S3Backend::start().await.unwrap();
    // The download is resumable: the proxy holds it for the hold timeout.
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\ntimeout = \"1s\"\n")
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("downloads").send().await.unwrap();
    let content = vec![7u8; 64 << 20];
    s3.put_object()
        .bucket("downloads")
        .key("large")
        .body(ByteStream::from(content.clone()))
        .send()
        .await
        .unwrap();

    let mut got = s3
        .get_object()
        .bucket("downloads")
        .key("large")
        .send()
        .await
        .unwrap();
    let first = got.body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    backend.kill9();
    let mut received = first.len();
    let ended = loop {
        match got.body.next().await {
            Some(Ok(bytes)) => received += bytes.len(),
            Some(Err(error)) => break Err(error),
            None => break Ok(()),
        }
    };
    assert!(
        ended.is_err(),
        "the truncated download must fail, got {received} bytes and a clean end"
    );
    assert!(received < content.len());
    let metrics = proxy.admin.metrics().await;
    let failed = r#"s3fp_download_resumes_total{outcome="failed"}"#;
    assert_eq!(support::metric_sample(&metrics, failed), Some(1.0));
}

async fn frozen_backend_proxy() -> (S3Backend, ProxyUnderTest, aws_sdk_s3::Client) {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start_quick_to_notice_hangs(backend.address).await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("replays").send().await.unwrap();
    (backend, proxy, s3)
}

fn error_code<E: aws_sdk_s3::error::ProvideErrorMetadata>(error: &E) -> Option<String> {
    error.code().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_put_that_reached_a_hung_backend_is_replayed() {
    let (backend, proxy, s3) = frozen_backend_proxy().await;
    let put = s3
        .put_object()
        .bucket("replays")
        .key("plain")
        .body(ByteStream::from_static(b"v1"))
        .send();
    proxy
        .through_a_hang(&backend, put)
        .await
        .expect("an idempotent PUT is replayed");
    assert_eq!(support::read_object(&s3, "replays", "plain").await, b"v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_hung_backend_is_not_replayed() {
    let (backend, proxy, s3) = frozen_backend_proxy().await;
    let create = s3
        .create_multipart_upload()
        .bucket("replays")
        .key("mpu")
        .send();
    let result = proxy.through_a_hang(&backend, create).await;
    let error = result.expect_err("CreateMultipartUpload must not be sent twice");
    assert_eq!(error_code(&error).as_deref(), Some("ServiceUnavailable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_put_that_reached_a_hung_backend_is_not_replayed() {
    let (backend, proxy, s3) = frozen_backend_proxy().await;
    let put = s3
        .put_object()
        .bucket("replays")
        .key("once")
        .if_none_match("*")
        .body(ByteStream::from_static(b"first"))
        .send();
    let result = proxy.through_a_hang(&backend, put).await;
    let error = result.expect_err("a conditional write must not be replayed");
    assert_eq!(error_code(&error).as_deref(), Some("ServiceUnavailable"));
}
