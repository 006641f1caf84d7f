//! The experiment tool end to end: a short run (a few seconds, one restart)
//! against the real proxy in front of a real S3 backend process, through the
//! `run` subcommand as a user calls it; zero failures, a well-formed stats file
//! and SVG charts.

use std::time::Duration;
use tokio::process::Command;

fn s3s_fs() -> String {
    std::env::var("S3S_FS_BIN").unwrap_or_else(|_| {
        format!(
            "{}/.cache/s3fp/tools/bin/s3s-fs",
            std::env::var("HOME").unwrap()
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_experiment_through_the_proxy_has_no_failure_and_writes_its_results() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let backend = format!(
        "{} --host 127.0.0.1 --port {port} --access-key exp-key --secret-key exp-secret-0123456789 {}",
        s3s_fs(),
        data.path().display()
    );
    let config =
        s3_failover_proxy::Config::parse(&format!("[backend]\naddress = \"127.0.0.1:{port}\"\n"))
            .unwrap();
    let s3 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", s3.local_addr().unwrap());
    let listeners = s3_failover_proxy::Listeners::new(s3, None, admin);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(s3_failover_proxy::run(listeners, config, async move {
        let _ = stopped.await;
    }));

    let out = tempfile::tempdir().unwrap();
    let prefix = out.path().join("short");
    let output = Command::new(env!("CARGO_BIN_EXE_s3-outage-experiment"))
        .args([
            "run",
            "--endpoint",
            &endpoint,
            "--bucket",
            "short",
            "--create-bucket",
        ])
        .args([
            "--access-key",
            "exp-key",
            "--secret-key",
            "exp-secret-0123456789",
        ])
        .args([
            "--duration",
            "4s",
            "--restart-every",
            "1500ms",
            "--downtime",
            "700ms",
            "--get-every",
            "4",
        ])
        .args(["--backend-command", &backend])
        .args(["--probe-address", &format!("127.0.0.1:{port}")])
        .args(["--label", "through the proxy"])
        .arg("--out")
        .arg(&prefix)
        .output()
        .await
        .unwrap();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), proxy).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("short_stats.json")).unwrap())
            .unwrap();
    assert_eq!(
        stats["failed"],
        0,
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(stats["requests"].as_u64().unwrap() >= 30);
    let outages = stats["outages"].as_array().unwrap();
    assert!(!outages.is_empty(), "at least one restart");
    for outage in outages {
        assert!(outage["to_frontend_up_ms"].as_f64().unwrap() >= 700.0);
        assert!(outage["to_first_success_ms"].as_f64().is_some());
    }
    let operations = stats["operations"].as_array().unwrap();
    assert!(
        operations.iter().any(|op| op["kind"] == "get"),
        "the GET mix ran"
    );
    for chart in ["short_rtt.svg", "short_percentiles.svg"] {
        let svg = std::fs::read_to_string(out.path().join(chart)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{chart}"
        );
        assert!(
            svg.contains("<rect") || svg.contains("<polyline"),
            "{chart} draws something"
        );
    }
}
