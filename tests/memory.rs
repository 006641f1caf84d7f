//! Bodies of any size stream through in bounded memory: the proxy process
//! never holds more than a few buffers of an upload or a download, over
//! HTTP/1.1 and over HTTP/2 with TLS (where flow control is what bounds it).

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::tls::{TestCa, h2_connect};
use support::{ChunkFeed, ProxyProcess, S3Backend, free_port, s3_client, sign_unsigned_payload};

const CHUNK: usize = 1 << 20;
/// An upload fed chunk by chunk, or no body at all.
type Body = Either<ChunkFeed, Empty<Bytes>>;
/// Far below the objects' size, far above what a streaming proxy needs.
const MEMORY_LIMIT: u64 = 64 << 20;

/// Chunk `i` of an object: a fixed pattern stamped with its index, so a
/// lost, repeated or reordered chunk shows.
fn chunk(i: usize) -> Bytes {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let mut bytes = PATTERN
        .get_or_init(|| (0..CHUNK).map(|b| (b % 251) as u8).collect())
        .clone();
    bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Bytes::from(bytes)
}

/// A body that produces `chunks` chunks as the connection takes them.
fn object_body(chunks: usize) -> Body {
    let (feed, body) = tokio::sync::mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        for i in 0..chunks {
            feed.send(chunk(i)).await.unwrap();
        }
    });
    Either::Left(ChunkFeed(body))
}

/// A request signed with an unsigned payload, as streaming uploads are.
fn signed(
    method: &str,
    url: &str,
    host: &str,
    version: http::Version,
    body: Body,
) -> http::Request<Body> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(url)
        .version(version);
    for (name, value) in sign_unsigned_payload(method, url, host, &[]) {
        // HTTP/2 carries the host as the :authority pseudo-header.
        if version == http::Version::HTTP_11 || name != "host" {
            request = request.header(name, value);
        }
    }
    request.body(body).unwrap()
}

fn put(url: &str, host: &str, version: http::Version, chunks: usize) -> http::Request<Body> {
    let mut request = signed("PUT", url, host, version, object_body(chunks));
    request
        .headers_mut()
        .insert("content-length", (CHUNK * chunks).into());
    request
}

/// Reads a downloaded object and checks every chunk in order.
async fn assert_object(mut body: Incoming, chunks: usize) {
    let (mut pending, mut index) = (Vec::with_capacity(2 * CHUNK), 0);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            pending.extend_from_slice(&data);
        }
        while pending.len() >= CHUNK {
            assert!(
                pending[..CHUNK] == chunk(index)[..],
                "chunk {index} differs"
            );
            pending.drain(..CHUNK);
            index += 1;
        }
    }
    assert_eq!(
        (index, pending.len()),
        (chunks, 0),
        "whole object read back"
    );
}

/// Where the object goes, and how: `send` makes one request on the
/// connection the test chose.
struct Transfer<'a> {
    proxy: &'a ProxyProcess,
    url: String,
    host: String,
    version: http::Version,
}

impl Transfer<'_> {
    /// Uploads `chunks` chunks, downloads them back and checks every byte,
    /// and that the proxy's peak resident memory stayed under the limit.
    async fn round_trip<F, Fut>(&self, chunks: usize, mut send: F)
    where
        F: FnMut(http::Request<Body>) -> Fut,
        Fut: Future<Output = http::Response<Incoming>>,
    {
        let stored = send(put(&self.url, &self.host, self.version, chunks)).await;
        assert_eq!(stored.version(), self.version);
        assert_eq!(stored.status(), 200);
        let after_upload = self.proxy.peak_resident_bytes();

        let no_body = Either::Right(Empty::new());
        let got = send(signed("GET", &self.url, &self.host, self.version, no_body)).await;
        assert_eq!(got.status(), 200);
        assert_object(got.into_body(), chunks).await;

        let peak = self.proxy.peak_resident_bytes();
        eprintln!("proxy peak resident memory: {} KiB", peak >> 10);
        assert!(
            after_upload < MEMORY_LIMIT && peak < MEMORY_LIMIT,
            "proxy peak resident memory: {} MiB after the upload, {} MiB after the download",
            after_upload >> 20,
            peak >> 20
        );
    }
}

/// The proxy binary in front of `backend` (plus `extra` config), with the
/// bucket the objects go to.
async fn proxy_with_bucket(backend: &S3Backend, extra: &str) -> ProxyProcess {
    let proxy = ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\n{extra}",
        backend.address
    ))
    .await
    .unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("large")
        .send()
        .await
        .unwrap();
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_512_mib_upload_and_download_stream_through_in_bounded_memory() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with_bucket(&backend, "").await;
    let host = proxy.address().to_string();
    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let transfer = Transfer {
        proxy: &proxy,
        url: format!("http://{host}/large/object"),
        host,
        version: http::Version::HTTP_11,
    };
    transfer
        .round_trip(512, |request| {
            let response = client.request(request);
            async move { response.await.unwrap() }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_and_tls_a_256_mib_upload_and_download_stay_in_bounded_memory() {
    let backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let files = ca.issue("edge", &["localhost"]);
    let tls_port = free_port();
    let tls = format!(
        "[listener.tls]\naddress = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        files.cert.display(),
        files.key.display()
    );
    let proxy = proxy_with_bucket(&backend, &tls).await;
    let host = format!("localhost:{tls_port}");
    let mut h2 = h2_connect(([127, 0, 0, 1], tls_port).into(), &ca)
        .await
        .unwrap();
    let transfer = Transfer {
        proxy: &proxy,
        url: format!("https://{host}/large/object"),
        host,
        version: http::Version::HTTP_2,
    };
    transfer
        .round_trip(256, |request| {
            let response = h2.send_request(request);
            async move { response.await.unwrap() }
        })
        .await;
}

/// Raises this process's file-descriptor limit for `connections` sockets
/// here and as many in the proxy, which inherits it.
fn room_for(connections: u64) {
    let needed = 2 * connections + 512;
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
    if soft < needed {
        rlimit::Resource::NOFILE
            .set(needed.min(hard), hard)
            .unwrap();
    }
    let (soft, _) = rlimit::Resource::NOFILE.get().unwrap();
    assert!(
        soft >= needed,
        "this test needs {needed} file descriptors (ulimit -n)"
    );
}

/// Opens `count` connections that each send `head` (as much as the socket
/// takes at once) and never finish it.
async fn unfinished_heads(
    proxy: &ProxyProcess,
    head: &[u8],
    count: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut connections = Vec::new();
    for _ in 0..count {
        let stream = tokio::net::TcpStream::connect(proxy.address())
            .await
            .unwrap();
        let _ = stream.try_write(head);
        connections.push(stream);
    }
    connections
}

/// 700 clients each sending 399 KB of header lines and never finishing (the
/// public report's flood): each gets `431` once past
/// `listener.max_head_bytes`, and resident memory stays bounded, round
/// after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_hundred_oversized_unfinished_heads_keep_memory_bounded() {
    use tokio::io::AsyncReadExt;
    room_for(700);
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with_bucket(&backend, "").await;
    let line = format!("X-Pad: {}\r\n", "p".repeat(1000));
    let head = format!("GET /bucket/k HTTP/1.1\r\nHost: s3\r\n{}", line.repeat(399));
    for round in 1..=2 {
        let mut connections = unfinished_heads(&proxy, head.as_bytes(), 700).await;
        for stream in &mut connections {
            let mut answer = [0u8; 12];
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                stream.read_exact(&mut answer),
            )
            .await
            .expect("the proxy answers every oversized head");
            // A reset (the rest of the head unread) may come first.
            if read.is_ok() {
                assert_eq!(&answer, b"HTTP/1.1 431", "round {round}");
            }
        }
        let peak = proxy.peak_resident_bytes();
        assert!(
            peak < MEMORY_LIMIT,
            "round {round}: peak {} MiB",
            peak >> 20
        );
    }
}

/// 700 heads just under the 64 KiB limit, never finished: the memory each
/// costs is bounded by that limit (hyper's read buffer), not doubled by the
/// proxy's own copy, and once they close it serves the next rounds of 700.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_heads_under_the_limit_cost_no_more_than_the_limit() {
    room_for(700);
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with_bucket(&backend, "").await;
    let line = format!("X-Pad: {}\r\n", "p".repeat(1000));
    let head = format!("GET /bucket/k HTTP/1.1\r\nHost: s3\r\n{}", line.repeat(60));
    let before = proxy.peak_resident_bytes();
    let connections = unfinished_heads(&proxy, head.as_bytes(), 700).await;
    // The proxy cannot parse a head without holding it whole: once its
    // memory grew by 90 % of them, it has read them.
    let held = 700 * head.len() as u64 * 9 / 10;
    support::wait_until(
        std::time::Duration::from_secs(30),
        "the heads read",
        || async { proxy.resident_bytes() >= before + held },
    )
    .await
    .unwrap();
    // The peak once every head is read, as in the rounds below (at 90 % it
    // can be read before the last heads' buffers grew).
    support::wait_until(
        std::time::Duration::from_secs(30),
        "every head read",
        || async { accepted_and_read(proxy.port) == 700 },
    )
    .await
    .unwrap();
    let peak = proxy.peak_resident_bytes();
    let per_head = (peak - before) / 700;
    assert!(
        per_head < 96 << 10,
        "each unfinished 60 KB head cost {} KiB (limit 64 KiB)",
        per_head >> 10
    );
    drop(connections);
    proxy
        .admin
        .wait_metric("s3fp_client_connections", 0.0)
        .await;
    // What they held is free again: three more rounds reuse it rather than
    // growing the process by as much each time (the allocator keeps some of
    // it around: the second round costs up to a third more, then no more).
    for round in 2..=4 {
        let again = unfinished_heads(&proxy, head.as_bytes(), 700).await;
        support::wait_until(
            std::time::Duration::from_secs(30),
            &format!("round {round}'s heads read"),
            || async { accepted_and_read(proxy.port) == 700 },
        )
        .await
        .unwrap();
        drop(again);
        proxy
            .admin
            .wait_metric("s3fp_client_connections", 0.0)
            .await;
    }
    let last_peak = proxy.peak_resident_bytes();
    assert!(
        last_peak < peak + (peak - before) / 2,
        "the memory of closed connections is reused: {} MiB at the first peak, {} MiB after four rounds",
        peak >> 20,
        last_peak >> 20
    );
}

/// Established connections to the local `port` whose every received byte
/// the proxy has read (`rx_queue` 0 in /proc/net/tcp, proc(5)).
fn accepted_and_read(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 4
                && fields[1].ends_with(&local)
                && fields[3] == "01"
                && fields[4]
                    .split(':')
                    .nth(1)
                    .is_some_and(|rx| rx.trim_start_matches('0').is_empty())
        })
        .count()
}
