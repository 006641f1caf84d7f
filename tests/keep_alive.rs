//! An idle HTTP/1.1 keep-alive connection holds no buffers, and the requests
//! that follow on it are served as if it had never rested: one after
//! another, pipelined in one write, or a head trickled in pieces, each
//! answered in order with the backend's answer (s3s-fs, through the binary).
//! Large uploads, which are read in rounds of their own with large reads,
//! and heads of many fields, served by hyper connections of another kind,
//! are answered in order among the other requests however they arrive.

use std::net::SocketAddr;

use support::relay::Relay;
use support::{ProxyProcess, S3Backend, metric_sample, read_response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bytes of a signed request (payload unsigned) for `path` on `proxy`.
fn request(proxy: SocketAddr, method: &str, path: &str, body: &str) -> Vec<u8> {
    support::signed_request_bytes(proxy, method, path, body)
}

async fn proxy_in_front_of(backend: SocketAddr) -> ProxyProcess {
    let proxy = ProxyProcess::start(&format!("[backend]\naddress = \"{backend}\"\n"))
        .await
        .unwrap();
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    stream
        .write_all(&request(proxy.address(), "PUT", "/rests", ""))
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200, "bucket made");
    proxy
}

/// A connection to `proxy` that has served one request: a PUT of `value`
/// to `/rests/k`.
async fn connection_that_stored_value(proxy: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(&request(proxy, "PUT", "/rests/k", "value"))
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    stream
}

/// Raises this process's open-file limit to `count` (the proxy started
/// after inherits it), as far as the hard limit allows.
fn allow_open_files(count: usize) {
    let needed = count as u64;
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
    if soft < needed {
        rlimit::Resource::NOFILE
            .set(needed.min(hard), hard)
            .unwrap();
    }
}

/// A connection that rests between requests comes back to the thread
/// (`listener.threads`) that served it, where its backend connection waits
/// in that thread's part of the pool: a client that pauses between its
/// requests keeps using one backend connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_back_from_rest_reuses_its_backend_connection() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&format!(
        "[listener]\nthreads = 4\n[backend]\naddress = \"{}\"\n",
        backend.address
    ))
    .await
    .unwrap();
    let opened = || async {
        metric_sample(
            &proxy.admin.metrics().await,
            "s3fp_backend_connections_total",
        )
        .unwrap()
    };
    let address = proxy.address();
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(&request(address, "PUT", "/rests", ""))
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200, "bucket made");
    let after_first = opened().await;
    for i in 0..3 {
        // The client thinks for three times the 100 ms after which a
        // connection rests (the scenario, not a wait for the proxy).
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stream
            .write_all(&request(address, "GET", "/rests", ""))
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200, "GET {i}");
    }
    assert_eq!(
        opened().await,
        after_first,
        "the backend connection of the first request served the others"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_a_rest_are_answered_in_order_however_they_arrive() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_in_front_of(backend.address).await;
    let address = proxy.address();
    let mut stream = TcpStream::connect(address).await.unwrap();
    // One at a time: each answered, then the connection rests.
    for i in 0..3 {
        let put = request(
            address,
            "PUT",
            &format!("/rests/k{i}"),
            &format!("value {i}"),
        );
        stream.write_all(&put).await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200, "PUT k{i}");
    }
    // Three pipelined in one write after the rest.
    let pipelined: Vec<u8> = (0..3)
        .flat_map(|i| request(address, "GET", &format!("/rests/k{i}"), ""))
        .collect();
    stream.write_all(&pipelined).await.unwrap();
    for i in 0..3 {
        let (status, body) = read_response(&mut stream).await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("value {i}").as_str())
        );
    }
    // A PUT whose head and body come in pieces, the first a lone byte.
    let put = request(address, "PUT", "/rests/trickled", "trickled value");
    for piece in [
        &put[..1],
        &put[1..20],
        &put[20..put.len() - 3],
        &put[put.len() - 3..],
    ] {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
    }
    assert_eq!(read_response(&mut stream).await.0, 200);
    stream
        .write_all(&request(address, "GET", "/rests/trickled", ""))
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut stream).await,
        (200, "trickled value".to_owned())
    );
}

/// A body of `length` printable bytes that starts with `tag`.
fn content(tag: &str, length: usize) -> String {
    let mut body = tag.to_owned();
    while body.len() < length {
        body.push_str("0123456789abcdefghijklmnopqrstuvwxyz");
    }
    body.truncate(length);
    body
}

/// Uploads over `listener.max_read_bytes` (512 KiB) go to a hyper connection
/// of their own with large reads, and back: as a connection's first
/// request, pipelined between other requests, two in a row, and with
/// `Expect: 100-continue`, each answered in order, every object stored
/// byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_uploads_among_other_requests_are_answered_in_order_and_stored_whole() {
    const LARGE: usize = 3 << 20;
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_in_front_of(backend.address).await;
    let address = proxy.address();
    let put = |key: &str, body: &str| request(address, "PUT", &format!("/rests/{key}"), body);
    let get = |key: &str| request(address, "GET", &format!("/rests/{key}"), "");
    let first = content("first", LARGE);
    let second = content("second", LARGE);
    let third = content("third", LARGE + 1);

    // The connection's first request.
    let (mut reader, mut writer) = TcpStream::connect(address).await.unwrap().into_split();
    writer.write_all(&put("first", &first)).await.unwrap();
    assert_eq!(read_response(&mut reader).await.0, 200, "PUT first");

    // Pipelined in one write (answers read meanwhile, as a pipelining
    // client must): a GET, a large PUT, a GET of it, two large PUTs in a
    // row, a small PUT.
    let pipelined = [
        get("first"),
        put("second", &second),
        get("second"),
        put("third", &third),
        put("fourth", &first),
        put("small", "small value"),
    ]
    .concat();
    let sending = tokio::spawn(async move {
        writer.write_all(&pipelined).await.unwrap();
        writer
    });
    let answers = [
        (200, first.clone()),
        (200, String::new()),
        (200, second.clone()),
        (200, String::new()),
        (200, String::new()),
        (200, String::new()),
    ];
    for (i, expected) in answers.into_iter().enumerate() {
        assert_eq!(read_response(&mut reader).await, expected, "answer {i}");
    }
    let mut writer = sending.await.unwrap();

    // With `Expect: 100-continue`: the body goes once the 100 came.
    let expecting = put("expected", &second);
    let head_end = expecting.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(expecting[..head_end].to_vec()).unwrap();
    let head = format!("{head}\r\nExpect: 100-continue\r\n\r\n");
    writer.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    reader.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    writer.write_all(second.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut reader).await.0, 200, "PUT expected");

    for (key, value) in [
        ("third", &third),
        ("fourth", &first),
        ("expected", &second),
        ("small", &"small value".to_owned()),
    ] {
        writer.write_all(&get(key)).await.unwrap();
        assert_eq!(
            read_response(&mut reader).await,
            (200, value.clone()),
            "GET {key}"
        );
    }
}

/// Each of 2 000 idle keep-alive connections that served one request costs
/// the proxy under 1 KiB in a debug build once it has rested (100 ms) and
/// left its task (`src/resting.rs`): hyper's buffers alone were over 20 KB,
/// and a rested connection waiting in its task still cost 1.8 KB; a release
/// build spends about 0.8 KB (benches/idle_connections.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_no_buffers() {
    const CONNECTIONS: usize = 2000;
    allow_open_files(2 * CONNECTIONS + 512);
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_in_front_of(backend.address).await;
    let address = proxy.address();
    let get = request(address, "GET", "/rests?location", "");
    let open = |count: usize| {
        let get = get.clone();
        async move {
            let mut streams = Vec::new();
            for _ in 0..count {
                let mut stream = TcpStream::connect(address).await.unwrap();
                stream.write_all(&get).await.unwrap();
                assert_eq!(read_response(&mut stream).await.0, 200);
                streams.push(stream);
            }
            streams
        }
    };
    // A first round leaves the allocator's pools and the backend pool warm.
    drop(open(200).await);
    proxy
        .admin
        .wait_metric("s3fp_client_connections", 0.0)
        .await;
    let before = proxy.resident_bytes();
    let idle = open(CONNECTIONS).await;
    proxy
        .admin
        .wait_metric("s3fp_client_connections", CONNECTIONS as f64)
        .await;
    // A connection frees its buffers once it has rested for 100 ms.
    each_costs_under_1_kib(&proxy, before, CONNECTIONS).await;
    // Still connections: each is served again.
    for mut stream in idle.into_iter().take(10) {
        stream.write_all(&get).await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200);
    }
}

/// Waits (20 s at most) until each of `connections` idle connections costs
/// the proxy under 1 KiB of resident memory over `before`.
async fn each_costs_under_1_kib(proxy: &ProxyProcess, before: u64, connections: usize) {
    let each = || proxy.resident_bytes().saturating_sub(before) / connections as u64;
    let freed = support::wait_until(
        std::time::Duration::from_secs(20),
        "idle connections to cost under 1 KiB each",
        || async { each() < 1 << 10 },
    )
    .await;
    assert!(
        freed.is_ok(),
        "{} bytes per idle keep-alive connection",
        each()
    );
}

/// 2 000 connections opened 64 at a time, each served one request and
/// left idle: the buffers of the burst are freed once the connections rest,
/// and the memory goes back to the system within a second or so (glibc
/// keeps freed memory below live allocations until asked: `heap_trim`).
/// In a debug build each idle connection then costs under 1 KiB; 4.4 KB
/// when the memory stays with the process, 2.2-3 KB when the connections
/// rest in their tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_a_burst_goes_back_once_its_connections_rest() {
    const CONNECTIONS: usize = 2000;
    const AT_ONCE: usize = 64;
    allow_open_files(2 * CONNECTIONS + 512);
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_in_front_of(backend.address).await;
    let address = proxy.address();
    let get = request(address, "GET", "/rests?location", "");
    let burst = |count: usize| {
        let clients = (0..AT_ONCE).map(|_| {
            let get = get.clone();
            tokio::spawn(async move {
                let mut streams = Vec::new();
                for _ in 0..count / AT_ONCE {
                    let mut stream = TcpStream::connect(address).await.unwrap();
                    stream.write_all(&get).await.unwrap();
                    assert_eq!(read_response(&mut stream).await.0, 200);
                    streams.push(stream);
                }
                streams
            })
        });
        futures_util::future::join_all(clients)
    };
    drop(burst(256).await);
    proxy
        .admin
        .wait_metric("s3fp_client_connections", 0.0)
        .await;
    let before = proxy.resident_bytes();
    let idle = burst(CONNECTIONS).await;
    each_costs_under_1_kib(&proxy, before, CONNECTIONS / AT_ONCE * AT_ONCE).await;
    drop(idle);
}

/// A connection resting between requests (outside any task, see
/// `src/resting.rs`) is closed when the proxy closes its connections, as an
/// idle one is, and the proxy then exits at once, not at its grace's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resting_connection_is_closed_when_the_proxy_shuts_down() {
    let backend = S3Backend::start().await.unwrap();
    let config = format!(
        "[backend]\naddress = \"{}\"\n[shutdown]\ndrain_delay = \"200ms\"\ngrace = \"60s\"\n",
        backend.address
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut idle = TcpStream::connect(proxy.address()).await.unwrap();
    idle.write_all(&request(proxy.address(), "GET", "/", ""))
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.0, 200);
    // The client idles (the input under test): the connection rests.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    proxy.signal("-TERM");
    let mut byte = [0u8; 1];
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(10), idle.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed by the proxy (FIN): {closed:?}"
    );
    let exited =
        tokio::time::timeout(std::time::Duration::from_secs(10), proxy.exit_status()).await;
    assert!(
        exited.is_ok_and(|status| status.success()),
        "the proxy exits once its connections are closed"
    );
}

/// The state of the local TCP socket on `port` in /proc/net/tcp (proc(5):
/// `01` established, `08` close-wait), if it is still there.
fn tcp_state(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 3 && fields[1].ends_with(&local)).then(|| fields[3].to_owned())
    })
}

/// `listener.max_head_bytes` (64 KiB) holds on a connection that has served
/// requests too, where hyper's own check, which counts its read buffer,
/// let heads of up to about 120 KiB through: one of exactly the limit is
/// forwarded, one byte more gets hyper's own `431`, and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_limit_holds_on_a_connection_that_served_requests() {
    const LIMIT: usize = 64 << 10;
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_in_front_of(backend.address).await;
    let address = proxy.address();
    let get = request(address, "GET", "/rests/k", "");
    // The signed GET with an `X-Pad` field that makes its head `length` bytes.
    let padded = |length: usize| {
        let head_end = get.len() - 2;
        let pad = length - get.len() - "X-Pad: \r\n".len();
        let field = format!("X-Pad: {}\r\n", "p".repeat(pad));
        [&get[..head_end], field.as_bytes(), b"\r\n"].concat()
    };
    let mut stream = connection_that_stored_value(address).await;
    for length in [LIMIT, LIMIT - 1] {
        stream.write_all(&padded(length)).await.unwrap();
        assert_eq!(
            read_response(&mut stream).await,
            (200, "value".to_owned()),
            "a {length}-byte head"
        );
    }
    for length in [LIMIT + 1, 70 << 10, 100 << 10] {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(&get).await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200);
        stream.write_all(&padded(length)).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(
                "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: "
            ) && answer.ends_with(" GMT\r\n\r\n"),
            "a {length}-byte head: {answer}"
        );
    }
}

/// Heads of more than 100 fields (hyper's default, which the proxy's
/// common rounds keep: see `src/round_kind.rs`) reach the backend through
/// a hyper connection that takes `listener.max_headers` (500): after small
/// requests on the same connection, pipelined after them, and in two
/// writes. Each gets what the backend answers straight: s3s-fs, itself a
/// hyper server, refuses more than 100 with its own `431` and closes, so
/// such a head is the last on its connection here (radosgw takes them:
/// `tests/transparency.rs`). 501 fields get the proxy's own `431`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_of_many_fields_reach_the_backend_among_small_ones() {
    let backend = S3Backend::start().await.unwrap();
    let relay = Relay::start(backend.address).await.unwrap();
    let proxy = proxy_in_front_of(relay.address).await;
    let address = proxy.address();
    let get = request(address, "GET", "/rests/k", "");
    // The signed GET with unsigned `X-Extra-n` fields up to `fields` fields.
    let with_fields = |fields: usize| {
        let head_end = get.len() - 2;
        let has = get[..head_end].split(|&b| b == b'\n').count() - 2;
        let extra: String = (has..fields)
            .map(|n| format!("X-Extra-{n}: {n}\r\n"))
            .collect();
        [&get[..head_end], extra.as_bytes(), b"\r\n"].concat()
    };
    let straight = async |head: &[u8]| {
        let mut stream = TcpStream::connect(backend.address).await.unwrap();
        stream.write_all(head).await.unwrap();
        read_response(&mut stream).await
    };
    // The backend got the head with all its fields.
    let received = |fields: usize| {
        let last = format!("\r\nX-Extra-{}: ", fields - 1);
        let to_backend: Vec<u8> = relay
            .connections()
            .into_iter()
            .flat_map(|connection| connection.to_backend)
            .collect();
        to_backend.windows(last.len()).any(|w| w == last.as_bytes())
    };
    let value = (200, "value".to_owned());

    let mut stream = connection_that_stored_value(address).await;
    for fields in [100, 5, 101] {
        let head = with_fields(fields);
        stream.write_all(&head).await.unwrap();
        let answer = read_response(&mut stream).await;
        assert_eq!(answer, straight(&head).await, "{fields} fields");
        assert!(received(fields), "{fields} fields");
    }

    let (mut reader, mut writer) = TcpStream::connect(address).await.unwrap().into_split();
    let pipelined = [get.clone(), with_fields(100), with_fields(500)].concat();
    let sending = tokio::spawn(async move { writer.write_all(&pipelined).await.unwrap() });
    for fields in [4, 100, 500] {
        let expected = straight(&with_fields(fields)).await;
        let answer = read_response(&mut reader).await;
        assert_eq!(answer, expected, "pipelined, {fields} fields");
    }
    sending.await.unwrap();
    assert!(received(500));

    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(&get).await.unwrap();
    assert_eq!(read_response(&mut stream).await, value);
    let head = with_fields(300);
    let (start, end) = head.split_at(head.len() / 2);
    stream.write_all(start).await.unwrap();
    stream.write_all(end).await.unwrap();
    let answer = read_response(&mut stream).await;
    assert_eq!(answer, straight(&head).await, "in two writes");
    assert!(received(300));

    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(&get).await.unwrap();
    assert_eq!(read_response(&mut stream).await, value);
    stream.write_all(&with_fields(501)).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "501 fields: {}",
        String::from_utf8_lossy(&answer)
    );
    assert!(!received(501));
}

/// A head hyper refuses (`400`), followed by bytes the proxy never reads:
/// the answer comes, then a clean close (FIN), as without the proxy, not a
/// reset that could destroy the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_is_answered_and_the_connection_closed_cleanly() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_in_front_of(backend.address).await;
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    let port = stream.local_addr().unwrap().port();
    let mut refused = b"GET /rests/k HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_vec();
    refused.extend(std::iter::repeat_n(b'z', 20_000));
    stream.write_all(&refused).await.unwrap();
    // Read nothing until the proxy has closed its side.
    support::wait_until(
        std::time::Duration::from_secs(10),
        "the proxy to close the connection",
        || async { tcp_state(port).as_deref() != Some("01") },
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer).await;
    assert!(read.is_ok(), "the connection was reset: {read:?}");
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{answer:?}");
}
