//! Hot reload of the running binary: on SIGHUP and on a file change, hold
//! settings change live without dropping a held request; an invalid file is
//! rejected and the old configuration stays; a restart-only section
//! (`[backend.kubernetes]`) removed or changed live keeps its running value;
//! a rotated admin token file takes effect without a config change, and a
//! world-writable config file is rejected until its mode is fixed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::fake_kube::FakeKube;
use support::{ProxyProcess, S3Backend, free_port, metric_sample, raw_request, s3_client};

fn backend_section(backend: &S3Backend) -> String {
    format!("[backend]\naddress = \"{}\"\n", backend.address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_hold_timeout_applies_to_requests_already_held() {
    let backend = S3Backend::stopped().unwrap();
    let proxy = ProxyProcess::start(&format!(
        "{}[hold]\ntimeout = \"60s\"\n",
        backend_section(&backend)
    ))
    .await
    .unwrap();
    let address = proxy.address();
    let started = Instant::now();
    let held: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(async move {
                raw_request(address, "GET", &format!("/b/{i}"), &[], Bytes::new()).await
            })
        })
        .collect();
    proxy.admin.wait_held(2).await;

    proxy.write_config(&format!(
        "{}[hold]\ntimeout = \"1s\"\n",
        backend_section(&backend)
    ));
    proxy.signal("-HUP");
    for request in held {
        let (status, body) = request.await.unwrap().unwrap();
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains("<Code>ServiceUnavailable</Code>"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the new 1 s timeout applied, not the old 60 s"
    );
    let metrics = proxy.admin.metrics().await;
    assert!(
        metric_sample(&metrics, "s3fp_config_reloads_total{result=\"success\"}")
            .is_some_and(|reloads| reloads >= 1.0)
    );
    assert_eq!(
        metric_sample(&metrics, "s3fp_config_reloads_total{result=\"failure\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric_sample(&metrics, "s3fp_hold_timeout_seconds"),
        Some(1.0)
    );
    assert_eq!(
        metric_sample(&metrics, "s3fp_hold_outcomes_total{outcome=\"timed_out\"}"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_hold_timeout_written_to_the_file_keeps_held_requests_alive() {
    let mut backend = S3Backend::stopped().unwrap();
    let proxy = ProxyProcess::start(&format!(
        "{}[hold]\ntimeout = \"2s\"\n",
        backend_section(&backend)
    ))
    .await
    .unwrap();
    let address = proxy.address();
    let started = Instant::now();
    let held =
        tokio::spawn(async move { raw_request(address, "HEAD", "/", &[], Bytes::new()).await });
    proxy.admin.wait_held(1).await;

    // No signal: the file watcher sees the change.
    proxy.write_config(&format!(
        "{}[hold]\ntimeout = \"30s\"\n",
        backend_section(&backend)
    ));
    proxy
        .admin
        .wait_metric("s3fp_hold_timeout_seconds", 30.0)
        .await;
    // Outlive the old 2 s deadline; the wait is the scenario.
    let old_deadline = started + Duration::from_millis(2500);
    tokio::time::sleep(old_deadline.saturating_duration_since(Instant::now())).await;
    assert_eq!(
        proxy.admin.status().await["held"],
        1,
        "still held past the old timeout"
    );

    backend.restart().await.unwrap();
    let (status, _) = held.await.unwrap().unwrap();
    assert_ne!(status, 503, "the held request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_rejected_and_the_old_config_stays() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&format!(
        "{}[hold]\ntimeout = \"7s\"\n",
        backend_section(&backend)
    ))
    .await
    .unwrap();
    proxy.write_config("[hold]\ntimeout = \"soon\"\n");
    proxy.signal("-HUP");
    proxy
        .admin
        .wait_metric_at_least("s3fp_config_reloads_total{result=\"failure\"}", 1.0)
        .await;
    let metrics = proxy.admin.metrics().await;
    assert_eq!(
        metric_sample(&metrics, "s3fp_hold_timeout_seconds"),
        Some(7.0)
    );
    assert_eq!(
        metric_sample(&metrics, "s3fp_config_reloads_total{result=\"success\"}"),
        Some(0.0)
    );
    let (status, _) = raw_request(proxy.address(), "HEAD", "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_ne!(status, 503, "still proxying to the configured backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_listen_address_is_reported_and_the_old_socket_keeps_serving() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&backend_section(&backend))
        .await
        .unwrap();
    let other_port = support::free_port();
    let text = std::fs::read_to_string(proxy.config.path())
        .unwrap()
        .replace(
            &format!("127.0.0.1:{}", proxy.port),
            &format!("127.0.0.1:{other_port}"),
        );
    proxy.replace_config(&text);
    proxy.signal("-HUP");
    proxy
        .admin
        .wait_metric_at_least("s3fp_config_reloads_total{result=\"success\"}", 1.0)
        .await;
    let metrics = proxy.admin.metrics().await;
    assert_eq!(
        metric_sample(&metrics, "s3fp_config_reloads_total{result=\"failure\"}"),
        Some(0.0)
    );
    let (status, _) = raw_request(proxy.address(), "HEAD", "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_ne!(status, 503);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", other_port))
            .await
            .is_err()
    );
}

/// The log lines that say a reload kept the running `backend.kubernetes`.
fn kept_discovery_warnings(proxy: &ProxyProcess) -> usize {
    proxy
        .log_lines()
        .iter()
        .filter(|line| line.contains("backend.kubernetes") && line.contains("restart"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_kubernetes_removed_or_changed_live_keeps_discovery_as_started() {
    let pod = S3Backend::start().await.unwrap();
    let fake = FakeKube::start("s3gw").await;
    fake.set_endpoints(
        "s3gw-s3gw",
        pod.address.port(),
        &[("127.0.0.1", true, false)],
    );
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on backend.address: requests sent there would fail.
    let static_backend = format!("[backend]\naddress = \"127.0.0.1:{}\"\n", free_port());
    let discovery = format!(
        "[backend.kubernetes]\nnamespace = \"s3gw\"\nservice = \"s3gw-s3gw\"\nport = \"s3\"\nkubeconfig = \"{}\"\n",
        fake.kubeconfig(dir.path()).display()
    );
    let file = |discovery: &str, hold: &str| {
        format!("{static_backend}{discovery}[hold]\ntimeout = \"{hold}\"\n")
    };
    let proxy = ProxyProcess::start(&file(&discovery, "3s")).await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("live").send().await.unwrap();
    let put = |key: &'static str| {
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("live")
                .key(key)
                .body(aws_sdk_s3::primitives::ByteStream::from_static(b"kept"))
                .send()
                .await
        }
    };

    // The section removed: the pod discovery found still gets the requests.
    proxy.write_config(&file("", "5s"));
    proxy.signal("-HUP");
    proxy
        .admin
        .wait_metric("s3fp_hold_timeout_seconds", 5.0)
        .await;
    put("after-removal").await.expect("still sent to the pod");
    support::wait_until(
        Duration::from_secs(10),
        "the kept backend.kubernetes to be logged",
        || async { kept_discovery_warnings(&proxy) >= 1 },
    )
    .await
    .unwrap();

    // Changed to route through a Service address nobody serves: still the pod.
    let changed = discovery.replace("s3gw-s3gw", "elsewhere")
        + &format!(
            "route = \"service\"\nservice_address = \"127.0.0.1:{}\"\n",
            free_port()
        );
    proxy.write_config(&file(&changed, "4s"));
    proxy.signal("-HUP");
    proxy
        .admin
        .wait_metric("s3fp_hold_timeout_seconds", 4.0)
        .await;
    put("after-change").await.expect("still sent to the pod");
    assert_eq!(proxy.admin.status().await["state"], "up");

    // The section as started is what runs: putting it back changes nothing.
    let warned = kept_discovery_warnings(&proxy);
    proxy.write_config(&file(&discovery, "6s"));
    proxy.signal("-HUP");
    proxy
        .admin
        .wait_metric("s3fp_hold_timeout_seconds", 6.0)
        .await;
    put("after-restore").await.expect("still sent to the pod");
    assert_eq!(kept_discovery_warnings(&proxy), warned, "nothing to keep");
}

/// The status a `GET /admin/status` carrying `token` gets.
async fn status_with_token(proxy: &ProxyProcess, token: &str) -> u16 {
    let admin = proxy.admin.with_token(token);
    admin.request("GET", "/admin/status").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_admin_token_replaces_the_old_one_and_a_broken_one_is_rejected() {
    let backend = S3Backend::stopped().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    support::write_secret(&token_file, "first-token\n");
    // The body continues the `[admin]` table the harness writes.
    let proxy = ProxyProcess::start(&format!(
        "token_file = \"{}\"\n{}",
        token_file.display(),
        backend_section(&backend)
    ))
    .await
    .unwrap();
    assert_eq!(status_with_token(&proxy, "first-token").await, 200);

    // The Secret is rotated; the config file is untouched.
    support::write_secret(&token_file, "second-token\n");
    proxy
        .admin
        .wait_metric_at_least("s3fp_config_reloads_total{result=\"success\"}", 1.0)
        .await;
    assert_eq!(status_with_token(&proxy, "second-token").await, 200);
    assert_eq!(status_with_token(&proxy, "first-token").await, 401);

    // An empty token file fails the reload; the running token stays.
    support::write_secret(&token_file, "");
    proxy
        .admin
        .wait_metric_at_least("s3fp_config_reloads_total{result=\"failure\"}", 1.0)
        .await;
    assert_eq!(status_with_token(&proxy, "second-token").await, 200);
    assert!(
        proxy.log_lines().iter().any(
            |line| line.contains("config reload rejected") && line.contains("admin.token_file")
        ),
        "the rejection names the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_writable_config_file_is_rejected_on_reload_until_fixed() {
    use std::os::unix::fs::PermissionsExt;
    let backend = S3Backend::stopped().unwrap();
    let proxy = ProxyProcess::start(&format!(
        "{}[hold]\ntimeout = \"30s\"\n",
        backend_section(&backend)
    ))
    .await
    .unwrap();
    // World-writable as it appears: the file watcher must not see it
    // otherwise first.
    proxy.write_config_with_mode(
        &format!("{}[hold]\ntimeout = \"5s\"\n", backend_section(&backend)),
        0o666,
    );
    proxy.signal("-HUP");
    proxy
        .admin
        .wait_metric_at_least("s3fp_config_reloads_total{result=\"failure\"}", 1.0)
        .await;
    proxy
        .admin
        .wait_metric("s3fp_hold_timeout_seconds", 30.0)
        .await;
    assert!(
        proxy
            .log_lines()
            .iter()
            .any(|line| line.contains("world-writable")
                && line.contains(&proxy.config.path().display().to_string())),
        "the rejection names the file and the reason"
    );

    let private = std::fs::Permissions::from_mode(0o600);
    std::fs::set_permissions(proxy.config.path(), private).unwrap();
    proxy.signal("-HUP");
    proxy
        .admin
        .wait_metric("s3fp_hold_timeout_seconds", 5.0)
        .await;
}
