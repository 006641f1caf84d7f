//! The `s3-failover-proxy` binary as an operator runs it: client connections
//! spread over `listener.threads` threads, config validation
//! with `--check`, clear errors naming the bad key, and a graceful SIGTERM:
//! a held request finishes within the grace, or is answered 503 at its end;
//! an admin listener out of file descriptors says so and serves again;
//! world-writable or oversized config and token files, and an admin listener
//! off loopback without a token, stop start-up.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use support::{ProxyProcess, S3Backend, http_status, s3_client, send, wait_until};

const BINARY: &str = env!("CARGO_BIN_EXE_s3-failover-proxy");

fn check(config: &str) -> (bool, String) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(config.as_bytes()).unwrap();
    check_file(file.path(), &[])
}

/// `--check` on `file` with `flags`: whether it passed, and what it printed.
fn check_file(file: &std::path::Path, flags: &[&str]) -> (bool, String) {
    let output = Command::new(BINARY)
        .arg("--config")
        .arg(file)
        .arg("--check")
        .args(flags)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn a_fifo_as_config_file_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.toml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut child = Command::new(BINARY)
        .arg("--config")
        .arg(&fifo)
        .arg("--check")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("--check waits on the FIFO");
        }
        std::thread::sleep(std::time::Duration::from_millis(20)); // polling within the deadline
    }
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(text.contains("not a regular file"), "{text}");
}

#[test]
fn the_example_config_is_valid() {
    let output = Command::new(BINARY)
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.toml"),
            "--check",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bad_config_files_stop_start_up_naming_the_key() {
    let cases = [
        ("[hold]\ntimeoot = \"30s\"\n", "timeoot"),
        ("[hold]\ntimeout = \"thirty\"\n", "timeout"),
        ("[backend]\naddress = \"s3gw\"\n", "backend.address"),
        ("[hold]\nmax_requests = 0\n", "hold.max_requests"),
        ("[probe]\ninterval = \"0ms\"\n", "probe.interval"),
        ("[listener\n", "invalid config file"),
        ("[log]\nformat = \"xml\"\n", "format"),
    ];
    for (config, named) in cases {
        let (ok, message) = check(config);
        assert!(!ok, "{config:?} was accepted");
        assert!(message.contains(named), "{config:?}: {message}");
    }
}

#[test]
fn a_missing_config_file_is_reported() {
    let output = Command::new(BINARY)
        .args(["--config", "/nonexistent/s3fp.toml", "--check"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/s3fp.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_spread_over_the_listener_threads() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&format!(
        "[listener]\nthreads = 3\n[backend]\naddress = \"{}\"\n[log]\nlevel = \"warn\"\n",
        backend.address
    ))
    .await
    .unwrap();
    let before = proxy.thread_cpu_ticks("s3fp-lane-");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["s3fp-lane-0", "s3fp-lane-1", "s3fp-lane-2"],
        "one thread per listener.threads"
    );
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("lanes")
        .send()
        .await
        .unwrap();
    // Six clients, each on a keep-alive connection of its own: two per thread.
    let clients = (0..6).map(|_| {
        let s3 = s3_client(&proxy.endpoint());
        tokio::spawn(async move {
            for _ in 0..300 {
                s3.head_bucket().bucket("lanes").send().await.unwrap();
            }
        })
    });
    for client in clients.collect::<Vec<_>>() {
        client.await.unwrap();
    }
    let after = proxy.thread_cpu_ticks("s3fp-lane-");
    for (lane, ticks) in &after {
        assert!(
            *ticks > before[lane],
            "{lane} served none of the connections: {before:?} then {after:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_held_request_finish_then_exits() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\n[shutdown]\ngrace = \"20s\"\n",
        backend.address
    ))
    .await
    .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("term").send().await.unwrap();

    backend.kill9();
    let put = tokio::spawn({
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("term")
                .key("held")
                .body(ByteStream::from_static(b"held through shutdown"))
                .send()
                .await
        }
    });
    proxy.admin.wait_held(1).await;
    proxy.signal("-TERM");
    let port = proxy.port;
    wait_until(
        Duration::from_secs(10),
        "the proxy to stop accepting",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        http_status(proxy.admin.address, "GET", "/readyz").await,
        Some(503),
        "unready while draining"
    );
    backend.restart().await.unwrap();
    put.await
        .unwrap()
        .expect("the held PUT completes during the shutdown grace");
    let exit = proxy.exit_status().await;
    assert!(exit.success(), "clean exit: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_held_when_the_grace_ends_gets_503_with_retry_after() {
    let backend = S3Backend::stopped().unwrap();
    let proxy = ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\n[hold]\ntimeout = \"60s\"\n[shutdown]\ngrace = \"1s\"\n",
        backend.address
    ))
    .await
    .unwrap();
    let address = proxy.address();
    let held = tokio::spawn(async move {
        let response = send(address, "GET", "/bucket/key", &[], Bytes::new()).await?;
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").cloned();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await?
            .to_bytes();
        anyhow::Ok((status, retry_after, body))
    });
    proxy.admin.wait_held(1).await;
    proxy.signal("-TERM");
    let (status, retry_after, body) = held
        .await
        .unwrap()
        .expect("an answer, not a dropped connection");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "Retry-After, which SDKs honour");
    assert!(body.contains("<Code>ServiceUnavailable</Code>"), "{body}");
    assert!(body.contains("shutting down"), "{body}");
    let exit = proxy.exit_status().await;
    assert!(exit.success(), "clean exit: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_out_of_descriptors_says_so_and_serves_again_once_they_free_up() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start_with_descriptor_limit(
        &format!("[backend]\naddress = \"{}\"\n", backend.address),
        64,
    )
    .await
    .unwrap();
    // Idle admin connections the proxy keeps open until it has no descriptor left.
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(
            tokio::net::TcpStream::connect(proxy.admin.address)
                .await
                .unwrap(),
        );
    }
    proxy
        .wait_for_log("admin accept failed", Duration::from_secs(10))
        .await;
    drop(open);
    wait_until(
        Duration::from_secs(10),
        "the admin listener to serve again",
        || async { http_status(proxy.admin.address, "GET", "/healthz").await == Some(200) },
    )
    .await
    .unwrap();
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token_file() {
    // `--check` binds nothing: the address is only validated.
    let (ok, message) = check("[admin]\naddress = \"0.0.0.0:9090\"\n");
    assert!(!ok, "accepted an open admin listener without a token");
    assert!(message.contains("admin.token_file"), "{message}");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    support::write_secret(&token, "t0ken\n");
    let (ok, message) = check(&format!(
        "[admin]\naddress = \"0.0.0.0:9090\"\ntoken_file = \"{}\"\n",
        token.display()
    ));
    assert!(ok, "{message}");
    support::write_secret(&token, "\n");
    let (ok, message) = check(&format!("[admin]\ntoken_file = \"{}\"\n", token.display()));
    assert!(!ok, "accepted an empty token");
    assert!(message.contains("admin.token_file"), "{message}");
}

#[test]
fn world_writable_files_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("s3fp.toml");
    std::fs::write(&config, "[hold]\ntimeout = \"30s\"\n").unwrap();
    set_mode(&config, 0o666);
    let (ok, message) = check_file(&config, &[]);
    assert!(!ok, "accepted a world-writable config file");
    assert!(
        message.contains(&config.display().to_string()) && message.contains("world-writable"),
        "{message}"
    );
    let (ok, message) = check_file(&config, &["--allow-world-writable"]);
    assert!(ok, "{message}");

    let token = dir.path().join("token");
    support::write_secret(&token, "t0ken");
    set_mode(&token, 0o646);
    set_mode(&config, 0o644);
    std::fs::write(
        &config,
        format!("[admin]\ntoken_file = \"{}\"\n", token.display()),
    )
    .unwrap();
    let (ok, message) = check_file(&config, &[]);
    assert!(!ok, "accepted a world-writable token file");
    assert!(
        message.contains("admin.token_file") && message.contains("world-writable"),
        "{message}"
    );
    assert!(check_file(&config, &["--allow-world-writable"]).0);
}

#[test]
fn a_config_file_over_one_mebibyte_is_refused_by_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("huge.toml");
    // Valid TOML (comments) just over the cap.
    let line = format!("#{}\n", "x".repeat(1023));
    std::fs::write(&config, line.repeat(1025)).unwrap();
    let (ok, message) = check_file(&config, &[]);
    assert!(!ok, "accepted a config file of 1025 KiB");
    assert!(
        message.contains(&config.display().to_string())
            && message.contains("larger than 1048576 bytes"),
        "{message}"
    );
}
