//! A hot binary upgrade on one host costs no request. A second proxy process
//! started with `--take-over` receives the running one's listening sockets
//! through `listener.handover_socket`; the old one stops accepting, lets its
//! connections close after their next answer, answers what it holds, and
//! exits. PutObject every 100 ms and a keep-alive GET loop, SDK retries off,
//! go on through ten upgrades in a row, half of them begun with SIGTERM to
//! the old process; a request the old process holds during one is answered.

mod support;

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
                proxy.status().await["held"].as_u64() > Some(0)
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
            .wait_metric_at_least(
                "s3fp_requests_total{method=\"PUT\",status_class=\"2xx\"}",
                3.0,
            )
            .await;
        proxy
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
    let (port, admin) = (first.port, first.admin);
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
