//! A hot binary upgrade on one host costs no request. A second proxy process
//! started with `--take-over` receives the running one's listening sockets
//! through `listener.handover_socket`; the old one stops accepting, lets its
//! connections close after their next answer, answers what it holds, and
//! exits. PutObject every 100 ms and a keep-alive GET loop, SDK retries off,
//! go on through ten upgrades in a row, half of them begun with SIGTERM to
//! the old process; a request the old process holds during one is answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::workload::{Workload, read_loop};
use support::{ProxyProcess, S3Backend, read_object, s3_client};

fn config(backend: &S3Backend, handover_socket: &std::path::Path) -> String {
    format!(
        "[listener]\nhandover_socket = \"{}\"\n[backend]\naddress = \"{}\"\n[shutdown]\ndrain_delay = \"1s\"\ngrace = \"20s\"\n",
        handover_socket.display(),
        backend.address
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_hot_upgrades_in_a_row_cost_no_request() {
    let mut backend = S3Backend::start().await.unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let handover_socket = sockets.path().join("handover.sock");
    let mut proxy = ProxyProcess::start(&config(&backend, &handover_socket))
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("upgrade").send().await.unwrap();
    s3.put_object()
        .bucket("upgrade")
        .key("read-me")
        .body(b"steady".to_vec().into())
        .send()
        .await
        .unwrap();
    let writes = Workload::start(&s3, "upgrade");
    let stop_reads = Arc::new(AtomicBool::new(false));
    let reads = read_loop(
        &s3,
        "upgrade",
        "read-me",
        b"steady",
        Arc::clone(&stop_reads),
    );

    for round in 0..10 {
        let held = (round == 4).then(|| {
            // The backend goes away: the old process holds what arrives.
            backend.kill9();
            let s3 = s3.clone();
            tokio::spawn(async move {
                s3.put_object()
                    .bucket("upgrade")
                    .key("held-during-upgrade")
                    .body(b"held".to_vec().into())
                    .send()
                    .await
            })
        });
        if held.is_some() {
            support::wait_until(Duration::from_secs(10), "requests held", || async {
                proxy.admin.status().await["held"].as_u64() > Some(0)
            })
            .await
            .unwrap();
        }
        let successor = if round % 2 == 0 {
            // The new process first: the old one drains by itself.
            proxy.take_over().await.unwrap()
        } else {
            // SIGTERM first: the old one serves through its drain delay, and
            // the new one takes the sockets over meanwhile.
            proxy.signal("-TERM");
            proxy.take_over().await.unwrap()
        };
        let old = std::mem::replace(&mut proxy, successor);
        if let Some(held) = held {
            backend.restart().await.unwrap();
            held.await
                .unwrap()
                .expect("the request held by the old process is answered");
            assert_eq!(
                read_object(&s3, "upgrade", "held-during-upgrade").await,
                b"held"
            );
        }
        let status = old.exit_status().await;
        assert!(
            status.success(),
            "round {round}: the old process exits cleanly ({status})"
        );
        // Both loops carry on through the new process before the next round.
        proxy
            .admin
            .wait_metric_at_least(
                "s3fp_requests_total{method=\"PUT\",status_class=\"2xx\"}",
                3.0,
            )
            .await;
        proxy
            .admin
            .wait_metric_at_least(
                "s3fp_requests_total{method=\"GET\",status_class=\"2xx\"}",
                3.0,
            )
            .await;
    }

    stop_reads.store(true, Ordering::SeqCst);
    let failed_reads = reads.await.unwrap();
    assert!(failed_reads.is_empty(), "failed GETs: {failed_reads:?}");
    let results = writes.stop_and_check().await;
    assert!(results.len() >= 30, "{} writes", results.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_over_with_no_proxy_running_starts_as_usual() {
    let backend = S3Backend::start().await.unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let handover_socket = sockets.path().join("handover.sock");
    let first = ProxyProcess::start(&config(&backend, &handover_socket))
        .await
        .unwrap();
    // The first process stops for good; its socket file goes with it.
    first.signal("-TERM");
    let (port, admin) = (first.port, first.admin.address);
    let config_text = std::fs::read_to_string(first.config.path()).unwrap();
    assert!(first.exit_status().await.success());
    assert!(
        !handover_socket.exists(),
        "the socket file is removed on exit"
    );

    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), config_text).unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_s3-failover-proxy"))
        .arg("--config")
        .arg(config.path())
        .arg("--take-over")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = support::wait_until(Duration::from_secs(10), "the proxy ready", || async {
        support::http_status(admin, "GET", "/readyz").await == Some(200)
    })
    .await;
    let s3 = s3_client(&format!("http://127.0.0.1:{port}"));
    let listed = s3.list_buckets().send().await;
    let _ = second.kill();
    let _ = second.wait();
    ready.unwrap();
    listed.expect("served on the configured address");
}

/// Starts the binary with `config` and `--take-over`, waits (at most 10 s)
/// for it to exit, and returns its stderr; one that starts serving instead
/// is stopped and fails the test.
async fn take_over_expecting_failure(config: &std::path::Path) -> String {
    start_expecting_failure(config, &["--take-over"]).await
}

/// [`take_over_expecting_failure`] with any extra arguments.
async fn start_expecting_failure(config: &std::path::Path, extra: &[&str]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_s3-failover-proxy"))
        .arg("--config")
        .arg(config)
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = support::wait_until(Duration::from_secs(10), "the take-over to fail", || {
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        async move { exited }
    })
    .await;
    if exited.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        exited.is_ok() && !output.status.success(),
        "the take-over fails ({:?})",
        output.status
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_socket_is_never_replaced() {
    let backend = S3Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, "data").unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\naddress = \"127.0.0.1:{}\"\n{}[admin]\naddress = \"127.0.0.1:{}\"\n",
            support::free_port(),
            config_body_listener_keys(&backend, &precious),
            support::free_port()
        ),
    )
    .unwrap();
    let message = take_over_expecting_failure(&config).await;
    assert!(message.contains("listener.handover_socket"), "{message}");
    assert!(message.contains("not a socket"), "{message}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "data");
}

/// The `[listener]` keys of [`config`], for a config written by hand.
fn config_body_listener_keys(backend: &S3Backend, handover_socket: &std::path::Path) -> String {
    let body = config(backend, handover_socket);
    let rest = body.strip_prefix("[listener]\n").unwrap();
    let (listener, backend_and_shutdown) = rest.split_at(rest.find("\n[").unwrap() + 1);
    format!("{listener}{backend_and_shutdown}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_during_the_old_process_grace_serves_at_once_and_its_held_requests_are_answered()
 {
    let mut backend = S3Backend::start().await.unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let old = ProxyProcess::start(&config(&backend, &sockets.path().join("handover.sock")))
        .await
        .unwrap();
    let s3 = s3_client(&old.endpoint());
    s3.create_bucket().bucket("grace").send().await.unwrap();
    backend.kill9();
    let held = {
        let s3 = s3.clone();
        tokio::spawn(async move {
            s3.put_object()
                .bucket("grace")
                .key("held")
                .body(b"held".to_vec().into())
                .send()
                .await
        })
    };
    old.admin.wait_held(1).await;
    old.signal("-TERM");
    // Past its drain delay, the old process no longer accepts.
    support::wait_until(
        Duration::from_secs(10),
        "the old process to stop accepting",
        || async {
            old.log_lines()
                .iter()
                .any(|line| line.contains("no new connections"))
        },
    )
    .await
    .unwrap();

    let new = old.take_over().await.unwrap();
    backend.restart().await.unwrap();
    held.await
        .unwrap()
        .expect("the request held by the old process is answered");
    s3.put_object()
        .bucket("grace")
        .key("after")
        .body(b"after".to_vec().into())
        .send()
        .await
        .expect("the new process serves on the same address");
    assert_eq!(read_object(&s3, "grace", "held").await, b"held");
    assert!(old.exit_status().await.success());
    assert!(
        support::http_status(new.admin.address, "GET", "/readyz").await == Some(200),
        "the new process answers on the admin address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_proxy_refuses_a_take_over_and_serves_on() {
    let backend = S3Backend::start().await.unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(&config(&backend, &sockets.path().join("handover.sock")))
        .await
        .unwrap();
    let (status, _) = support::raw_request(
        proxy.admin.address,
        "POST",
        "/admin/pause",
        &[],
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let message = take_over_expecting_failure(proxy.config.path()).await;
    assert!(message.contains("paused"), "{message}");
    // Without --take-over, a second proxy is told to use it.
    let message = start_expecting_failure(proxy.config.path(), &[]).await;
    assert!(message.contains("--take-over"), "{message}");
    let (status, _) = support::raw_request(
        proxy.admin.address,
        "POST",
        "/admin/resume",
        &[],
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "the old process still owns the admin address");
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("still-served")
        .send()
        .await
        .expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_admin_connection_leaves_the_old_process_after_a_take_over() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut backend = S3Backend::start().await.unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let mut old = ProxyProcess::start(&config(&backend, &sockets.path().join("handover.sock")))
        .await
        .unwrap();
    let s3 = s3_client(&old.endpoint());
    s3.create_bucket().bucket("checked").send().await.unwrap();
    // A request held by the old process keeps it alive after the take-over.
    backend.kill9();
    let held = {
        let s3 = s3.clone();
        tokio::spawn(async move { s3.list_objects_v2().bucket("checked").send().await })
    };
    old.admin.wait_held(1).await;
    let mut checker = tokio::net::TcpStream::connect(old.admin.address)
        .await
        .unwrap();
    checker
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = support::read_response(&mut checker).await;
    assert_eq!(status, 200);

    let _new = old.take_over().await.unwrap();
    // The old process closes the idle keep-alive connection: the checker's
    // next request goes to the new one on a new connection.
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), checker.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed, nothing more sent: {closed:?}"
    );
    assert!(old.is_running(), "the old process still holds a request");
    backend.restart().await.unwrap();
    held.await
        .unwrap()
        .expect("answered once the backend is back");
}
