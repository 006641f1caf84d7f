//! Client-side limits of an edge proxy, against the binary and a real s3s-fs:
//! slowloris and idle connections are closed at `listener.header_timeout`
//! while a well-behaved client keeps being served; a client that stops
//! reading a download is cut at `listener.send_timeout` and logged
//! `response_cut`; past `listener.max_connections` a new connection gets
//! `503 SlowDown`; a cap the file-descriptor limit cannot meet stops
//! start-up; large downloads spliced through pipes never run the proxy out
//! of descriptors. None of these is the backend's fault: no outage is
//! counted.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use support::{
    ProxyProcess, S3Backend, free_port, metric_sample, read_response, s3_client, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy_with(backend: &S3Backend, listener: &str) -> ProxyProcess {
    ProxyProcess::start(&format!(
        "{listener}\n[backend]\naddress = \"{}\"\n",
        backend.address
    ))
    .await
    .unwrap()
}

/// Reads until the proxy closes the connection; false if it is still open
/// at `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = [0u8; 64 << 10];
    let reads = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, reads).await.is_ok()
}

/// Stores `size` bytes as `edge/large` through the proxy; a presigned GET
/// of it.
async fn large_object(proxy: &ProxyProcess, size: usize) -> http::Uri {
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("edge").send().await.unwrap();
    s3.put_object()
        .bucket("edge")
        .key("large")
        .body(ByteStream::from(vec![7u8; size]))
        .send()
        .await
        .unwrap();
    let expiry = aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(300));
    let presigned = s3
        .get_object()
        .bucket("edge")
        .key("large")
        .presigned(expiry.unwrap())
        .await
        .unwrap();
    presigned.uri().parse().unwrap()
}

async fn outages(proxy: &ProxyProcess) -> f64 {
    let text = proxy.admin.metrics().await;
    ["refused", "reset", "hang_timeout", "probe_failed"]
        .iter()
        .filter_map(|reason| {
            metric_sample(&text, &format!("s3fp_outages_total{{reason=\"{reason}\"}}"))
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_closed_while_others_are_served() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(&backend, "[listener]\nheader_timeout = \"1s\"").await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("edge").send().await.unwrap();

    // Twenty clients sending a head one byte every 200 ms, forever.
    let slowloris: Vec<_> = (0..20)
        .map(|_| {
            let address = proxy.address();
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(address).await.unwrap();
                let head = b"GET /edge/k HTTP/1.1\r\nHost: s3\r\nX-Slow: ".to_vec();
                let dribble = async {
                    for byte in head.iter().chain(std::iter::repeat(&b'a')).take(100) {
                        if stream.write_all(&[*byte]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await; // the slow client: the input under test
                    }
                };
                dribble.await;
                closed_within(&mut stream, Duration::from_secs(5)).await
            })
        })
        .collect();
    // An idle keep-alive connection after one answer.
    let mut idle = TcpStream::connect(proxy.address()).await.unwrap();
    idle.write_all(b"GET /healthz-is-not-here HTTP/1.1\r\nHost: s3\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut idle).await;

    // A well-behaved client is served all along.
    for i in 0..5 {
        s3.put_object()
            .bucket("edge")
            .key(format!("k{i}"))
            .body(ByteStream::from_static(b"ok"))
            .send()
            .await
            .expect("served while the slow clients hold connections");
    }
    assert!(
        closed_within(&mut idle, Duration::from_secs(10)).await,
        "the idle connection is closed"
    );
    for client in slowloris {
        assert!(client.await.unwrap(), "a slowloris connection is closed");
    }
    assert_eq!(outages(&proxy).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_and_logged_response_cut() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(&backend, "[listener]\nsend_timeout = \"1s\"").await;
    let uri = large_object(&proxy, 32 << 20).await;
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        uri.path_and_query().unwrap(),
        uri.authority().unwrap()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Never reads: the proxy's writes stall once the socket buffers fill.
    wait_until(
        Duration::from_secs(20),
        "the download logged as cut",
        || async {
            proxy
                .log_lines()
                .iter()
                .any(|line| line.contains("path=\"/edge/large\"") && line.contains("response_cut"))
        },
    )
    .await
    .unwrap();
    assert!(
        closed_within(&mut stream, Duration::from_secs(10)).await,
        "the connection is closed"
    );
    assert_eq!(outages(&proxy).await, 0.0);
}

/// The raw path splices a large download through a pipe, two more file
/// descriptors: under a descriptor limit, downloads past the pipes the
/// budget keeps (one per four connections) go through a buffer, and the
/// proxy never runs out of descriptors: new clients are accepted and
/// served, the backend is never taken for down, every download is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_past_the_pipe_budget_go_through_a_buffer_and_descriptors_never_run_out() {
    let backend = S3Backend::start().await.unwrap();
    let config = format!(
        "[listener]\nraw_http1 = true\n[backend]\naddress = \"{}\"\n",
        backend.address
    );
    // About 30 connections fit in 120 descriptors with their pipes.
    let proxy = ProxyProcess::start_with_descriptor_limit(&config, 120)
        .await
        .unwrap();
    const SIZE: usize = 32 << 20;
    let uri = large_object(&proxy, SIZE).await;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        uri.path_and_query().unwrap(),
        uri.authority().unwrap()
    );
    // Downloads that read their first bytes, then stop reading: each holds
    // its backend connection and, while the budget lasts, a pipe.
    let mut downloads = Vec::new();
    for _ in 0..28 {
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut status_line = [0u8; 12];
        stream.read_exact(&mut status_line).await.unwrap();
        assert_eq!(&status_line, b"HTTP/1.1 200");
        downloads.push(stream);
    }
    // A new client is accepted and served meanwhile, each of its requests
    // on a backend connection of its own.
    let s3 = s3_client(&proxy.endpoint());
    for i in 0..4 {
        s3.put_object()
            .bucket("edge")
            .key(format!("small{i}"))
            .body(ByteStream::from_static(b"ok"))
            .send()
            .await
            .expect("served while the downloads stall");
        let got = s3
            .get_object()
            .bucket("edge")
            .key(format!("small{i}"))
            .send()
            .await
            .expect("served while the downloads stall");
        assert_eq!(
            got.body.collect().await.unwrap().into_bytes().as_ref(),
            b"ok"
        );
    }
    // Every download goes on to its end, whole.
    for mut stream in downloads {
        let (_, body) = read_response_after_status(&mut stream).await;
        assert_eq!(body.len(), SIZE);
        assert!(body.iter().all(|&byte| byte == 7), "the object's bytes");
    }
    let log = proxy.log_lines().join("\n");
    assert!(!log.contains("Too many open files"), "{log}");
    assert_eq!(outages(&proxy).await, 0.0);
}

/// The rest of an answer whose first 12 bytes (`HTTP/1.1 200`) were read:
/// its head and its `Content-Length` bytes of body.
async fn read_response_after_status(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_gets_slow_down() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(&backend, "[listener]\nmax_connections = 2").await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        stream
            .write_all(b"GET /edge HTTP/1.1\r\nHost: s3\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut stream).await;
        open.push(stream);
    }

    let mut third = TcpStream::connect(proxy.address()).await.unwrap();
    third
        .write_all(b"GET /edge HTTP/1.1\r\nHost: s3\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = read_response(&mut third).await;
    assert_eq!(status, 503);
    assert!(body.contains("<Code>SlowDown</Code>"), "{body}");
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);
    proxy
        .admin
        .wait_metric("s3fp_client_connections_refused_total", 1.0)
        .await;

    // A connection that ends frees its place.
    drop(open.pop());
    wait_until(Duration::from_secs(10), "a place again", || async {
        let Ok(mut stream) = TcpStream::connect(proxy.address()).await else {
            return false;
        };
        if stream
            .write_all(b"GET /edge HTTP/1.1\r\nHost: s3\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        // Refused connections past the few being answered are just closed.
        let mut status_line = [0u8; 12];
        stream.read_exact(&mut status_line).await.is_ok() && &status_line[9..] != b"503"
    })
    .await
    .unwrap();
}

/// Runs the binary under `ulimit -n descriptors` with `listener` keys; what
/// it printed once it exited (it must, within 10 s).
async fn start_up_under_descriptor_limit(descriptors: u32, listener: &str) -> (bool, String) {
    let mut config = tempfile::NamedTempFile::new().unwrap();
    write!(
        config,
        "[listener]\naddress = \"127.0.0.1:{}\"\n{listener}\n[admin]\naddress = \"127.0.0.1:{}\"\n[backend]\naddress = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port(),
        free_port()
    )
    .unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {descriptors} && exec \"$0\" --config \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_s3-failover-proxy"))
        .arg(config.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), "the proxy to stop", || {
        let exited = child.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    if exited.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cap_the_descriptor_limit_cannot_meet_stops_start_up() {
    let (started, log) = start_up_under_descriptor_limit(256, "max_connections = 1000").await;
    assert!(!started, "{log}");
    assert!(log.contains("listener.max_connections"), "{log}");
    assert!(log.contains("ulimit -n"), "{log}");

    // No room at all, even for the default cap lowered to what fits.
    let (started, log) = start_up_under_descriptor_limit(30, "").await;
    assert!(!started, "{log}");
    assert!(log.contains("no room for client connections"), "{log}");

    // Each of listener.threads keeps descriptors of its own: 300
    // connections need 820 (with their share of pipes), and 200 threads 800
    // more.
    let (started, log) =
        start_up_under_descriptor_limit(1000, "max_connections = 300\nthreads = 200").await;
    assert!(!started, "{log}");
    assert!(
        log.contains("listener.max_connections") && log.contains("listener.threads"),
        "{log}"
    );
    // More threads than the limit allows at all.
    let (started, log) = start_up_under_descriptor_limit(200, "threads = 100").await;
    assert!(!started, "{log}");
    assert!(log.contains("listener.threads = 100"), "{log}");
}

/// An idle client connection keeps no backend connection: with
/// `backend.max_connections` the budget counts one descriptor per client
/// connection and the cap's backend connections, not two per client
/// connection, so more client connections fit the same limit (10 000 in
/// 20 000 with a cap of 1 024), and the proxy serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_connection_cap_lets_more_client_connections_fit_the_descriptor_limit() {
    // 140 connections with their pipes, two threads' and the process's
    // own: 408 descriptors, over 256.
    let listener = "max_connections = 140\nthreads = 2";
    let (started, log) = start_up_under_descriptor_limit(256, listener).await;
    assert!(!started, "{log}");
    assert!(
        log.contains("backend.max_connections"),
        "names the way out: {log}"
    );

    // With 16 backend connections at most: 140 + 18 + 16 + 16 pipes of two
    // and the same 40, 246.
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start_with_descriptor_limit(
        &format!(
            "[listener]\n{listener}\n[backend]\naddress = \"{}\"\nmax_connections = 16\n",
            backend.address
        ),
        256,
    )
    .await
    .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("fits").send().await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..130 {
        idle.push(TcpStream::connect(proxy.address()).await.unwrap());
    }
    s3.put_object()
        .bucket("fits")
        .key("k")
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .expect("served with 130 more client connections open");
    assert_eq!(outages(&proxy).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_a_first_request_line_are_closed() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(&backend, "[listener]\nheader_timeout = \"1s\"").await;
    let long_line = [b"GET /".as_slice(), &[b'a'; 60_000]].concat();
    let starts: [&[u8]; 5] = [b"", b"G", b"\r\n", b"PRI * HTTP/2.0\r\n", &long_line];
    for start in starts {
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        stream.write_all(start).await.unwrap();
        assert!(
            closed_within(&mut stream, Duration::from_secs(10)).await,
            "closed after sending {} bytes",
            start.len()
        );
    }
}

/// A cleartext HTTP/2 connection (prior knowledge) to the proxy: its sender,
/// and the connection task, which ends when the proxy closes it.
async fn h2c(
    address: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(address).await.unwrap();
    // A chatty client: it PINGs every 200 ms even while idle, which must
    // not keep an idle connection open.
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

fn h2_get(
    address: std::net::SocketAddr,
    path: &str,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://{address}{path}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_but_not_one_with_a_request_held() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(
        &backend,
        "[listener]\nheader_timeout = \"1s\"\n[hold]\ntimeout = \"3s\"",
    )
    .await;
    let (mut sender, connection) = h2c(proxy.address()).await;
    let response = sender
        .send_request(h2_get(proxy.address(), "/edge"))
        .await
        .unwrap();
    drop(response);
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(closed.is_ok(), "the idle HTTP/2 connection is closed");

    // A request held longer than the limit keeps its connection: it gets
    // its answer (the hold timeout's 503), not a closed connection.
    backend.kill9();
    let (mut sender, _connection) = h2c(proxy.address()).await;
    let response = sender
        .send_request(h2_get(proxy.address(), "/edge/held"))
        .await
        .expect("answered on the same connection");
    assert_eq!(response.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_the_client_never_opens_a_window_for_is_cut() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with(&backend, "[listener]\nsend_timeout = \"1s\"").await;
    let uri = large_object(&proxy, 8 << 20).await;

    // A client that answers nothing and allows no DATA on its streams
    // (SETTINGS_INITIAL_WINDOW_SIZE = 0), then asks for 8 MiB.
    let mut encoder = loona_hpack::Encoder::new();
    let fields = [
        (":method", "GET".to_owned()),
        (":scheme", "http".to_owned()),
        (":path", uri.path_and_query().unwrap().to_string()),
        (":authority", uri.authority().unwrap().to_string()),
    ];
    let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    let bytes = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        support::h2_frame(0x4, 0, 0, &[0x00, 0x04, 0, 0, 0, 0]),
        support::h2_frame(0x1, 0x1 | 0x4, 1, &block),
    ]
    .concat();
    stream.write_all(&bytes).await.unwrap();
    assert!(
        closed_within(&mut stream, Duration::from_secs(10)).await,
        "the connection is closed"
    );
    proxy
        .admin
        .wait_metric("s3fp_backend_in_flight_requests", 0.0)
        .await;
    assert_eq!(outages(&proxy).await, 0.0);
}
