//! `hold.replay_memory` bounds what all requests keep for replay together.
//! A burst of uploads keeps at most that much (the rest stream on without a
//! copy), and every upload is still stored while the backend is up. An
//! upload that found no room for its copy is not replayed when the backend
//! dies under it: its client gets `503`, as for a body past
//! `hold.replay_buffer`, where one with its copy is replayed and stored.

use std::time::Duration;

use support::{
    FedUpload, ProxyUnderTest, S3Backend, metric_sample, object_content, read_object, s3_client,
    wait_until,
};

const KIB: usize = 1024;

async fn sample(proxy: &ProxyUnderTest, series: &str) -> f64 {
    metric_sample(&proxy.admin.metrics().await, series).unwrap_or(0.0)
}

async fn proxy_with(backend: &S3Backend, replay_memory: &str, bucket: &str) -> ProxyUnderTest {
    let proxy = ProxyUnderTest::start(
        backend.address,
        &format!("[hold]\nreplay_buffer = \"1MiB\"\nreplay_memory = \"{replay_memory}\"\n"),
    )
    .await
    .unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_uploads_keeps_at_most_the_replay_memory_and_every_upload_is_stored() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(&backend, "1MiB", "burst").await;
    let contents: Vec<Vec<u8>> = (0..4).map(|n| object_content(n, 512 * KIB)).collect();
    let uploads: Vec<FedUpload> = (0..4)
        .map(|n| FedUpload::start(proxy.address, &format!("/burst/u{n}"), 512 * KIB))
        .collect();
    // 1.5 MiB on its way, 1 MiB of room for copies.
    for (upload, content) in uploads.iter().zip(&contents) {
        assert!(upload.send(&content[..384 * KIB]).await);
    }
    wait_until(
        Duration::from_secs(10),
        "the replay memory in full use",
        || async { sample(&proxy, "s3fp_replay_memory_exhausted_total").await >= 1.0 },
    )
    .await
    .unwrap();
    let kept = sample(&proxy, "s3fp_replay_memory_bytes").await;
    assert!(kept <= (1 << 20) as f64, "{kept} bytes kept");

    let s3 = s3_client(&proxy.endpoint());
    for (n, (upload, content)) in uploads.into_iter().zip(&contents).enumerate() {
        assert!(upload.send(&content[384 * KIB..]).await);
        let (status, body) = upload.status().await;
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(&read_object(&s3, "burst", &format!("u{n}")).await, content);
    }
    assert_eq!(
        sample(&proxy, "s3fp_replay_memory_bytes").await,
        0.0,
        "answered: every copy freed"
    );
}

/// A 512 KiB upload, 384 KiB sent, then the backend is killed under it and
/// restarted; returns the client's status and whether the object is stored.
async fn upload_through_a_crash(replay_memory: &str, bucket: &str) -> (u16, bool) {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(&backend, replay_memory, bucket).await;
    let content = object_content(7, 512 * KIB);
    let upload = FedUpload::start(proxy.address, &format!("/{bucket}/object"), 512 * KIB);
    assert!(upload.send(&content[..384 * KIB]).await);
    wait_until(Duration::from_secs(10), "the first bytes taken", || async {
        sample(&proxy, "s3fp_replay_memory_bytes").await > 0.0
            || sample(&proxy, "s3fp_replay_memory_exhausted_total").await > 0.0
    })
    .await
    .unwrap();
    backend.kill9();
    wait_until(Duration::from_secs(10), "held or answered", || async {
        upload.response.is_finished() || proxy.admin.held().await == 1
    })
    .await
    .unwrap();
    backend.restart().await.unwrap();
    if !upload.response.is_finished() {
        assert!(upload.send(&content[384 * KIB..]).await);
    }
    let (status, _) = upload.status().await;
    let stored = s3_client(&proxy.endpoint())
        .head_object()
        .bucket(bucket)
        .key("object")
        .send()
        .await
        .is_ok();
    (status, stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_found_no_room_for_its_copy_is_not_replayed() {
    assert_eq!(
        upload_through_a_crash("1MiB", "roomy").await,
        (200, true),
        "with its copy kept, the upload is replayed and stored"
    );
    assert_eq!(
        upload_through_a_crash("128KiB", "cramped").await,
        (503, false),
        "without room for its copy, it cannot be replayed"
    );
}
