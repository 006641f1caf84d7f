//! The proxy's own connections to the backend carry TCP keep-alive
//! (`backend.tcp_keepalive`), on the raw path's pool and on hyper's alike:
//! read from the kernel's table of sockets (`/proc/net/tcp`, proc(5)), where
//! an idle connection with keep-alive has its keep-alive timer running and
//! one without has no timer at all. (A backend whose node vanished, the
//! case this is for, cannot be made on loopback without dropping packets;
//! README "When the backend counts as down" gives the manual check with `tc`.)

use std::collections::HashSet;

use aws_sdk_s3::primitives::ByteStream;
use support::{ProxyProcess, S3Backend, metric_sample, s3_client, wait_until};

/// The kernel's timer kinds in `/proc/net/tcp` (proc(5): `tr`).
const KEEPALIVE_TIMER: u32 = 2;

/// A connection the proxy holds open to the backend.
#[derive(Debug)]
struct BackendSocket {
    /// The kind of timer running on it: 0 none, 2 keep-alive.
    timer: u32,
    /// When it fires, in clock ticks (`USER_HZ`, 100 per second) from now.
    due_in_ticks: u64,
}

/// The established connections to `backend_port` that process `pid` holds.
fn backend_sockets_of(pid: u32, backend_port: u16) -> Vec<BackendSocket> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (remote, state, timer, inode) = (fields[2], fields[3], fields[5], fields[9]);
            let port = u16::from_str_radix(remote.split(':').nth(1)?, 16).ok()?;
            // 01: ESTABLISHED.
            if port != backend_port || state != "01" || !inodes.contains(inode) {
                return None;
            }
            let (kind, due) = timer.split_once(':')?;
            Some(BackendSocket {
                timer: u32::from_str_radix(kind, 16).ok()?,
                due_in_ticks: u64::from_str_radix(due, 16).ok()?,
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_connection_has_tcp_keepalive_running() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\ntcp_keepalive = \"7s\"\n",
        backend.address
    ))
    .await
    .unwrap();
    // Writes go through hyper's pool, reads through the raw path's.
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("keepalive").send().await.unwrap();
    s3.put_object()
        .bucket("keepalive")
        .key("k")
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .unwrap();
    let got = s3
        .get_object()
        .bucket("keepalive")
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"v"
    );

    let port = backend.address.port();
    let pid = proxy.pid();
    // Each pool keeps its connection once the answers are read: hyper's,
    // and the raw path's when it took the read (not when the suite runs
    // with it off, `S3FP_TEST_RAW_HTTP1=0`).
    let raw_reads = metric_sample(
        &proxy.admin.metrics().await,
        "s3fp_raw_http1_requests_total",
    )
    .unwrap_or(0.0);
    let pools = if raw_reads > 0.0 { 2 } else { 1 };
    wait_until(
        std::time::Duration::from_secs(10),
        "an idle backend connection in each pool",
        || async { backend_sockets_of(pid, port).len() >= pools },
    )
    .await
    .unwrap();
    let sockets = backend_sockets_of(pid, port);
    for socket in &sockets {
        assert_eq!(socket.timer, KEEPALIVE_TIMER, "{sockets:?}");
        assert!(socket.due_in_ticks <= 700, "within 7 s: {sockets:?}");
    }
}
