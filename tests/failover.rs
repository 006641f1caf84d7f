//! The product promise: a backend that crashes and restarts costs clients no
//! failed request. A real S3 server process is killed with SIGKILL and
//! restarted on the same port and data directory while an SDK client with
//! retries off writes an object every 100 ms through the proxy.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use support::workload::Workload;
use support::{ProxyUnderTest, S3Backend, object_content, s3_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_every_100ms_sees_no_failure_across_sigkill_restarts() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\ntimeout = \"20s\"\n")
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("restarts").send().await.unwrap();

    let workload = Workload::start(&s3, "restarts");
    for downtime_ms in [1000, 1500, 2000] {
        // Let traffic flow for a moment, then crash the backend.
        tokio::time::sleep(Duration::from_millis(700)).await;
        backend.kill9();
        // The downtime is the scenario.
        tokio::time::sleep(Duration::from_millis(downtime_ms)).await;
        backend.restart().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let results = workload.stop_and_check().await;
    // The outages happened and were masked: some writes waited through them.
    let held_through_outage = results
        .iter()
        .filter(|(_, took, _)| *took >= Duration::from_millis(800))
        .count();
    assert!(
        held_through_outage >= 3,
        "only {held_through_outage} writes waited through an outage"
    );
    let status = proxy.admin.status().await;
    assert_eq!(status["state"], "up");
    proxy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_while_the_backend_is_down_holds_until_it_comes() {
    let mut backend = S3Backend::stopped().unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    let create = tokio::spawn({
        let s3 = s3.clone();
        async move { s3.create_bucket().bucket("late").send().await }
    });
    proxy.admin.wait_held(1).await;
    // The request may be held before the first probe has said why.
    support::wait_until(Duration::from_secs(10), "the reason: refused", || async {
        proxy.admin.status().await["reason"] == "refused"
    })
    .await
    .unwrap();
    backend.restart().await.unwrap();
    create
        .await
        .unwrap()
        .expect("the held request succeeds once the backend serves");
    proxy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_is_detected_and_the_read_replayed_when_it_answers() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start_quick_to_notice_hangs(backend.address).await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("hang").send().await.unwrap();
    s3.put_object()
        .bucket("hang")
        .key("k")
        .body(ByteStream::from_static(b"still here"))
        .send()
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    let read = s3.get_object().bucket("hang").key("k").send();
    let got = proxy
        .through_a_hang(&backend, read)
        .await
        .expect("the read succeeds after the backend answers again");
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"still here"
    );
    proxy.stop().await.unwrap();
}

/// On the raw HTTP/1.1 path (`listener.raw_http1`) a read that meets a hang
/// is checked the same way, then held and replayed by the hyper path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_met_on_the_raw_path_is_detected_and_the_read_replayed() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start_with(
        backend.address,
        "response_timeout = \"500ms\"",
        "[listener]\nraw_http1 = true\n[probe]\ntimeout = \"200ms\"\n[hold]\ntimeout = \"20s\"\n",
    )
    .await
    .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("hang").send().await.unwrap();
    s3.put_object()
        .bucket("hang")
        .key("k")
        .body(ByteStream::from_static(b"still here"))
        .send()
        .await
        .unwrap();
    let address = proxy.address;
    let host = address.to_string();
    let signed =
        support::sign_unsigned_payload("GET", &format!("http://{host}/hang/k"), &host, &[]);
    let read = async move {
        let fields: Vec<(&str, &str)> = signed
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        support::raw_request(address, "GET", "/hang/k", &fields, Bytes::new())
            .await
            .unwrap()
    };
    let (status, body) = proxy.through_a_hang(&backend, read).await;
    assert_eq!((status, body.as_ref()), (200, &b"still here"[..]));
    let outages = proxy.admin.outages().await;
    assert_eq!(outages, 1.0, "the hang was seen as an outage");
    proxy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_aws_chunked_upload_is_held_through_a_restart() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("streamed").send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload.bin");
    // Larger than the replay buffer: only holding (nothing sent) can save it.
    let content = object_content(4, 3 << 20);
    std::fs::write(&path, &content).unwrap();

    backend.kill9();
    let body = ByteStream::from_path(&path).await.unwrap();
    let put = tokio::spawn({
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("streamed")
                .key("big")
                .body(body)
                .send()
                .await
        }
    });
    proxy.admin.wait_held(1).await;
    backend.restart().await.unwrap();
    put.await
        .unwrap()
        .expect("the held upload is sent once the backend serves");
    assert_eq!(
        support::read_object(&s3, "streamed", "big").await,
        content.as_slice()
    );
}
