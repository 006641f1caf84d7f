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
use support::{
    FedUpload, ProxyProcess, S3Backend, metric_sample, presigned_get, read_head_and_body,
    read_response, s3_client, wait_until,
};
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

/// s3s-fs with `bucket/object` stored straight in it (no connection of the
/// proxy's kept), the proxy in front with `backend` keys, and a presigned
/// GET of the object as the bytes a client sends.
async fn capped_proxy(bucket: &str, backend_keys: &str) -> (S3Backend, ProxyProcess, Vec<u8>) {
    let backend = S3Backend::start().await.unwrap();
    let direct = s3_client(&format!("http://{}", backend.address));
    direct.create_bucket().bucket(bucket).send().await.unwrap();
    direct
        .put_object()
        .bucket(bucket)
        .key("object")
        .body(ByteStream::from_static(b"the object"))
        .send()
        .await
        .unwrap();
    let proxy = ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\n{backend_keys}\n",
        backend.address
    ))
    .await
    .unwrap();
    let request = presigned_get(&s3_client(&proxy.endpoint()), bucket, "object").await;
    (backend, proxy, request)
}

/// Waits until `what` is on the proxy's one connection to the backend.
async fn on_the_one_backend_connection(proxy: &ProxyProcess, backend: &S3Backend, what: &str) {
    wait_until(
        std::time::Duration::from_secs(10),
        &format!("{what} on the one backend connection"),
        || async { backend_sockets_of(proxy.pid(), backend.address.port()).len() == 1 },
    )
    .await
    .unwrap();
}

/// The head and body of the answer on `client`, which must come within 20 s
/// (`expected` says when).
async fn answer_within_20s(client: &mut TcpStream, expected: &str) -> (String, String) {
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        read_head_and_body(client),
    )
    .await
    .expect(expected)
}

/// Clients that each sent `request` on a connection of their own.
async fn clients_sending(proxy: &ProxyProcess, request: &[u8], count: usize) -> Vec<TcpStream> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let mut client = TcpStream::connect(proxy.address()).await.unwrap();
        client.write_all(request).await.unwrap();
        clients.push(client);
    }
    clients
}

/// With `backend.max_connections`, requests beyond it wait for a
/// connection to come free instead of opening more: six GETs at a backend
/// frozen with SIGSTOP have two connections to it, four wait, and all six
/// get the object once it runs again. The backend is not taken for down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_backend_connection_cap_wait_for_a_connection() {
    let (backend, proxy, request) = capped_proxy("capped", "max_connections = 2").await;
    backend.freeze();
    let mut clients = clients_sending(&proxy, &request, 6).await;
    proxy
        .admin
        .wait_metric("s3fp_backend_connection_waiting_requests", 4.0)
        .await;
    let sockets = backend_sockets_of(proxy.pid(), backend.address.port());
    assert!(sockets.len() <= 2, "{sockets:?}");

    backend.thaw();
    for client in &mut clients {
        let (status, body) = read_response(client).await;
        assert_eq!((status, body.as_str()), (200, "the object"));
    }
    assert_eq!(proxy.admin.outages().await, 0.0);
    assert!(backend_sockets_of(proxy.pid(), backend.address.port()).len() <= 2);
}

/// A request that finds every backend connection busy for
/// `backend.queue_timeout` gets `503 SlowDown` with `Retry-After` (which S3
/// SDKs retry), is never sent, and blames nothing on the backend; the
/// request that held the connection is answered once the backend runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_no_backend_connection_in_time_gets_slow_down() {
    let (backend, proxy, request) =
        capped_proxy("queue", "max_connections = 1\nqueue_timeout = \"1s\"").await;
    backend.freeze();
    let mut holder = clients_sending(&proxy, &request, 1).await;
    on_the_one_backend_connection(&proxy, &backend, "the first request").await;

    let mut late = clients_sending(&proxy, &request, 1).await;
    let (head, body) =
        answer_within_20s(&mut late[0], "answered while the backend is still frozen").await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{head}"
    );
    assert!(body.contains("<Code>SlowDown</Code>"), "{body}");
    proxy
        .wait_for_log("backend_busy", std::time::Duration::from_secs(10))
        .await;

    backend.thaw();
    let (status, body) = read_response(&mut holder[0]).await;
    assert_eq!((status, body.as_str()), (200, "the object"));
    assert_eq!(proxy.admin.outages().await, 0.0);
}

/// The proxy with one backend connection at most and the `backend` keys,
/// held by an upload whose client paused after 10 of its 1 000 bytes (the
/// backend waits for the rest), and the backend then frozen with SIGSTOP:
/// a probe of it would fail.
async fn one_connection_held_by_a_paused_upload(
    bucket: &str,
    backend_keys: &str,
) -> (S3Backend, ProxyProcess, Vec<u8>, FedUpload) {
    let (backend, proxy, request) =
        capped_proxy(bucket, &format!("max_connections = 1\n{backend_keys}")).await;
    let upload = FedUpload::start(proxy.address(), &format!("/{bucket}/paused"), 1000);
    assert!(upload.send(&[b'x'; 10]).await);
    on_the_one_backend_connection(&proxy, &backend, "the upload").await;
    backend.freeze();
    (backend, proxy, request, upload)
}

/// Time spent waiting for a backend connection is not the backend's: with
/// `response_timeout` and `first_byte_timeout` far shorter than
/// `queue_timeout`, a GET that waits for the one connection is neither
/// taken for hung (a probe of the frozen backend would fail: an outage,
/// and the GET a crash suspect) nor answered `504`: it gets `503 SlowDown`
/// at the queue timeout, and no outage is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_backend_connection_is_not_waiting_for_the_backend() {
    let (backend, proxy, request, upload) = one_connection_held_by_a_paused_upload(
        "patience",
        "queue_timeout = \"4s\"\nresponse_timeout = \"1s\"\nfirst_byte_timeout = \"2s\"",
    )
    .await;
    let mut waiting = clients_sending(&proxy, &request, 1).await;
    let (head, body) = answer_within_20s(&mut waiting[0], "answered at the queue timeout").await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}\n{body}");
    assert!(body.contains("<Code>SlowDown</Code>"), "{body}");
    assert_eq!(proxy.admin.outages().await, 0.0);

    backend.thaw();
    assert!(upload.send(&[b'x'; 990]).await);
    assert_eq!(upload.status().await.0, 200);
    assert_eq!(proxy.admin.outages().await, 0.0);
}

/// A client that leaves while its request waits for a backend connection
/// takes the request with it, as a held request goes with its client: it
/// waits no more and is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_leaves_while_it_waits_for_a_backend_connection_is_dropped() {
    let (backend, proxy, request, upload) =
        one_connection_held_by_a_paused_upload("leaving", "queue_timeout = \"5m\"").await;
    let waiting = clients_sending(&proxy, &request, 1).await;
    proxy
        .admin
        .wait_metric("s3fp_backend_connection_waiting_requests", 1.0)
        .await;
    drop(waiting);
    proxy
        .admin
        .wait_metric("s3fp_backend_connection_waiting_requests", 0.0)
        .await;

    backend.thaw();
    assert!(upload.send(&[b'x'; 990]).await);
    assert_eq!(upload.status().await.0, 200);
    let opened = metric_sample(
        &proxy.admin.metrics().await,
        "s3fp_backend_connections_total",
    );
    assert_eq!(opened, Some(1.0), "the upload's, and none for the GET");
    assert_eq!(proxy.admin.outages().await, 0.0);
}
