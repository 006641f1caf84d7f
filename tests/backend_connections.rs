//! The proxy's own connections to the backend carry TCP keep-alive
//! (`backend.tcp_keepalive`), on the raw path's pool and on hyper's alike:
//! read from the kernel's table of sockets (`/proc/net/tcp`, proc(5)), where
//! an idle connection with keep-alive has its keep-alive timer running and
//! one without has no timer at all; and an upload to a backend that is only
//! slow to read is not cut. (A backend whose node vanished, the
//! case this is for, cannot be made on loopback without dropping packets;
//! README "When the backend counts as down" gives the manual check with `tc`.)

use std::collections::HashSet;

use aws_sdk_s3::primitives::ByteStream;
use support::{ProxyProcess, S3Backend, metric_sample, read_response, s3_client, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

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

/// A backend that reads an upload's first MiB, stops reading for `pause`
/// (alive: its kernel acknowledges and answers probes, the window full),
/// then reads the rest and answers `200` with the byte count.
async fn backend_pausing_mid_body(pause: std::time::Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut length = 0usize;
                let mut line = String::new();
                loop {
                    line.clear();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                let first = length.min(1 << 20);
                stream.read_exact(&mut body[..first]).await.unwrap();
                if length > first {
                    // The backend's pause: the scenario, not a wait.
                    tokio::time::sleep(pause).await;
                    stream.read_exact(&mut body[first..]).await.unwrap();
                }
                let count = length.to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{count}",
                    count.len()
                );
                stream.get_mut().write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    address
}

/// Keep-alive must not cut what is merely slow: an upload whose backend
/// stops reading for longer than a silent connection lives
/// (`tcp_keepalive = "1s"`: 4 s) is stored. (`TCP_USER_TIMEOUT`, which
/// Linux also applies to a full window, would cut it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_a_backend_that_pauses_reading_is_not_cut() {
    let backend = backend_pausing_mid_body(std::time::Duration::from_secs(6)).await;
    let proxy = ProxyProcess::start(&format!(
        "[backend]\naddress = \"{backend}\"\ntcp_keepalive = \"1s\"\n"
    ))
    .await
    .unwrap();
    let body = vec![b'x'; 32 << 20];
    let mut client = TcpStream::connect(proxy.address()).await.unwrap();
    let head = format!(
        "PUT /bucket/big HTTP/1.1\r\nHost: s3\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&body).await.unwrap();

    let (status, answer) = read_response(&mut client).await;
    assert_eq!((status, answer.as_str()), (200, "33554432"));
}
