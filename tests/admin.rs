//! Planned switch-over through the admin listener: pause holds new requests
//! and waits for in-flight ones, resume releases them, and a pause ends by
//! itself once the old backend went away and a new one serves. With
//! `admin.token_file`, `/admin/*` needs the bearer token (401 without it)
//! while health, readiness and metrics stay open.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use support::{
    ProxyProcess, ProxyUnderTest, S3Backend, http_status, raw_request, s3_client, send,
    write_secret,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_requests_and_resume_releases_them() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("paused").send().await.unwrap();

    let paused = proxy.admin.post("/admin/pause?wait=5s").await;
    assert_eq!(paused["drained"], true);
    assert_eq!(paused["in_flight"], 0);
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["reason"], "admin_pause");
    // Pause is idempotent.
    assert_eq!(
        proxy.admin.post("/admin/pause?wait=1s").await["paused"],
        true
    );

    let put = tokio::spawn({
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("paused")
                .key("k")
                .body(ByteStream::from_static(b"after the pause"))
                .send()
                .await
        }
    });
    proxy.admin.wait_held(1).await;
    assert_eq!(
        http_status(proxy.admin.address, "GET", "/readyz").await,
        Some(200),
        "still ready while holding"
    );

    let resumed = proxy.admin.post("/admin/resume").await;
    assert_eq!(resumed["paused"], false);
    put.await
        .unwrap()
        .expect("the held PUT completes after resume");
    proxy.admin.post("/admin/resume").await;
    assert_eq!(
        support::read_object(&s3, "paused", "k").await,
        b"after the pause"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reports_requests_still_in_flight() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    // A backend frozen mid-request keeps one request in flight.
    backend.freeze();
    let address = proxy.address;
    let _stuck =
        tokio::spawn(async move { raw_request(address, "GET", "/", &[], Bytes::new()).await });
    support::wait_until(Duration::from_secs(5), "a request in flight", || async {
        proxy.admin.status().await["in_flight"] == 1
    })
    .await
    .unwrap();
    let paused = proxy.admin.post("/admin/pause?wait=200ms").await;
    assert_eq!(paused["drained"], false);
    assert_eq!(paused["in_flight"], 1);
    backend.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_ends_by_itself_when_the_backend_was_replaced() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\nmax_pause = \"60s\"\n")
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("switch").send().await.unwrap();

    // The pre-stop hook of the old backend pauses, then the backend stops.
    proxy.admin.post("/admin/pause?wait=5s").await;
    let put = tokio::spawn({
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("switch")
                .key("during")
                .body(ByteStream::from_static(b"switch-over"))
                .send()
                .await
        }
    });
    proxy.admin.wait_held(1).await;
    backend.kill9();
    // The replacement comes up; nobody calls resume.
    backend.restart().await.unwrap();
    put.await
        .unwrap()
        .expect("released once the new backend serves");
    let status = proxy.admin.status().await;
    assert_eq!(status["paused"], false);
    assert_eq!(status["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_pause_ends_after_max_pause() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\nmax_pause = \"500ms\"\n")
        .await
        .unwrap();
    proxy.admin.post("/admin/pause?wait=1s").await;
    let (status, _) = raw_request(proxy.address, "GET", "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_ne!(
        status, 503,
        "the request waited out the pause and reached the backend"
    );
    assert_eq!(proxy.admin.status().await["paused"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_unknown_paths() {
    let backend = S3Backend::stopped().unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    assert_eq!(
        http_status(proxy.admin.address, "GET", "/healthz").await,
        Some(200)
    );
    assert_eq!(
        http_status(proxy.admin.address, "GET", "/readyz").await,
        Some(200),
        "ready with the backend down"
    );
    assert_eq!(
        http_status(proxy.admin.address, "GET", "/nope").await,
        Some(404)
    );
    assert_eq!(
        http_status(proxy.admin.address, "GET", "/admin/pause").await,
        Some(405)
    );
    let (status, body) = proxy.admin.request("POST", "/admin/pause?wait=soon").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
}

/// The proxy binary with `admin.token_file` holding `token` (the body
/// continues the `[admin]` table the harness writes).
async fn proxy_with_token(
    backend: &S3Backend,
    token_file: &std::path::Path,
    token: &str,
) -> ProxyProcess {
    write_secret(token_file, token);
    ProxyProcess::start(&format!(
        "token_file = \"{}\"\n[backend]\naddress = \"{}\"\n",
        token_file.display(),
        backend.address
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_pause_is_refused_and_an_authenticated_one_works() {
    let backend = S3Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let proxy = proxy_with_token(&backend, &token_file, "k8s-secret-token\n").await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("guarded").send().await.unwrap();

    for (credentials, challenge) in [
        (None, r#"Bearer realm="s3-failover-proxy admin""#),
        (
            Some("Bearer wrong-token"),
            r#"Bearer realm="s3-failover-proxy admin", error="invalid_token""#,
        ),
        (
            Some("Basic k8s-secret-token"),
            r#"Bearer realm="s3-failover-proxy admin", error="invalid_token""#,
        ),
    ] {
        let headers: Vec<(&str, &str)> = credentials
            .map(|value| ("authorization", value))
            .into_iter()
            .collect();
        for (method, path) in [
            ("POST", "/admin/pause?wait=1s"),
            ("GET", "/admin/status"),
            ("DELETE", "/admin/quarantine"),
        ] {
            let refused = send(proxy.admin.address, method, path, &headers, Bytes::new())
                .await
                .unwrap();
            assert_eq!(
                refused.status(),
                401,
                "{method} {path} with {credentials:?}"
            );
            assert_eq!(refused.headers()["www-authenticate"], challenge);
        }
    }
    // The refused pause changed nothing: a PUT goes straight through.
    s3.put_object()
        .bucket("guarded")
        .key("k")
        .body(ByteStream::from_static(b"not held"))
        .send()
        .await
        .expect("not paused by an unauthenticated request");
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http_status(proxy.admin.address, "GET", open).await,
            Some(200),
            "{open}"
        );
    }

    let authorized = proxy.admin.with_token("k8s-secret-token");
    assert_eq!(
        authorized.post("/admin/pause?wait=1s").await["paused"],
        true
    );
    assert_eq!(authorized.post("/admin/resume").await["paused"], false);
    let refusals = proxy
        .log_lines()
        .into_iter()
        .filter(|line| line.contains("admin: request refused"))
        .collect::<Vec<_>>();
    assert_eq!(refusals.len(), 9, "one log line per refusal");
    assert!(
        refusals
            .iter()
            .all(|line| !line.contains("k8s-secret-token")),
        "the token is never logged"
    );
}
