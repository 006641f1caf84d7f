//! A hold never outlives the request's signature. S3 refuses a request
//! signed more than 15 minutes ago (`RequestTimeTooSkewed`) and a presigned
//! URL past its expiry (`AccessDenied`); a request held until then would
//! only be released into that `403`. So a held request is answered with S3's
//! own error as its signature is about to end, while the backend is still
//! down, and counted as `signature_expired`. While the backend is up, such a
//! request is the backend's to judge: it gets the backend's answer, as it
//! would without the proxy.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_smithy_async::time::StaticTimeSource;
use bytes::Bytes;
use support::{
    ProxyUnderTest, S3Backend, metric_sample, raw_request, s3_client, s3_code, s3_config,
};

/// A hold timeout longer than any wait here: an answer before it is the
/// signature's doing.
const HOLD: &str = "[hold]\ntimeout = \"60s\"\n";

/// An SDK client whose clock is `ago` behind: it signs every request as sent
/// that long ago.
fn client_signing_in_the_past(endpoint: &str, ago: Duration) -> aws_sdk_s3::Client {
    let config = s3_config(endpoint)
        .time_source(StaticTimeSource::new(SystemTime::now() - ago))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

async fn hold_outcome(proxy: &ProxyUnderTest, outcome: &str) -> f64 {
    metric_sample(
        &proxy.admin.metrics().await,
        &format!("s3fp_hold_outcomes_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_signed_almost_fifteen_minutes_ago_is_answered_before_its_signature_ends() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, HOLD).await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("signed").send().await.unwrap();
    backend.kill9();

    // Signed 14 min 55 s ago: 5 s of validity left when it arrives.
    let late = client_signing_in_the_past(&proxy.endpoint(), Duration::from_secs(14 * 60 + 55));
    let answer = late
        .put_object()
        .bucket("signed")
        .key("late")
        .body(b"late".to_vec().into())
        .send()
        .await;
    let error = answer.expect_err("refused");
    assert_eq!(error.code(), Some("RequestTimeTooSkewed"), "{error:?}");
    assert!(
        !backend.is_running(),
        "answered while the backend was still down"
    );
    assert_eq!(hold_outcome(&proxy, "signature_expired").await, 1.0);

    backend.restart().await.unwrap();
    let stored = s3.head_object().bucket("signed").key("late").send().await;
    assert!(stored.is_err(), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presigned_url_that_expires_while_held_is_answered_access_denied() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, HOLD).await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("presigned").send().await.unwrap();
    s3.put_object()
        .bucket("presigned")
        .key("object")
        .body(b"object".to_vec().into())
        .send()
        .await
        .unwrap();
    let expiry =
        aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(4)).unwrap();
    let presigned = s3
        .get_object()
        .bucket("presigned")
        .key("object")
        .presigned(expiry)
        .await
        .unwrap();
    let uri: http::Uri = presigned.uri().parse().unwrap();
    backend.kill9();

    let (status, body) = raw_request(
        proxy.address,
        "GET",
        uri.path_and_query().unwrap().as_str(),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
    assert_eq!(s3_code(&body), "AccessDenied");
    assert!(String::from_utf8_lossy(&body).contains("Request has expired"));
    assert!(!backend.is_running());
    assert_eq!(hold_outcome(&proxy, "signature_expired").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_backend_is_up_an_expired_signature_gets_the_backends_own_answer() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, HOLD).await.unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("expired")
        .send()
        .await
        .unwrap();
    // Signed 20 minutes ago, once straight to the backend and once through
    // the proxy: the same refusal.
    let ago = Duration::from_secs(20 * 60);
    let direct = client_signing_in_the_past(&format!("http://{}", backend.address), ago);
    let through = client_signing_in_the_past(&proxy.endpoint(), ago);
    let put = |s3: aws_sdk_s3::Client| async move {
        let error = s3
            .put_object()
            .bucket("expired")
            .key("old")
            .body(b"old".to_vec().into())
            .send()
            .await
            .expect_err("refused by the backend");
        let status = error.raw_response().map(|r| r.status().as_u16());
        (status, error.code().map(str::to_owned))
    };
    assert_eq!(put(through).await, put(direct).await);
    assert_eq!(hold_outcome(&proxy, "signature_expired").await, 0.0);
}
