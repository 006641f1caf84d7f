//! A raw `#` in a request target is refused, never cut, whatever came before
//! it on the connection; a line that looks like a request inside a body is
//! never taken for one; bytes hyper's URI parser does not take get an S3
//! `InvalidURI` after the answers to the requests before them. Several
//! requests on one keep-alive connection, to s3s-fs through the proxy, with a
//! recording relay showing what the backend received.

use std::net::SocketAddr;

use support::relay::Relay;
use support::{
    ProxyUnderTest, S3Backend, h2_frame, read_response, s3_client, sign_unsigned_payload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BUCKET: &str = "targets";

/// A signed PUT head with an unsigned body of `length` bytes; `wire` is the
/// target as sent, `signed` the one the signature covers.
fn put_head(proxy: SocketAddr, wire: &str, signed: &str, length: usize) -> String {
    let host = proxy.to_string();
    let url = format!("http://{host}{signed}");
    let length = length.to_string();
    let mut head = format!("PUT {wire} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n");
    for (name, value) in sign_unsigned_payload("PUT", &url, &host, &[("content-length", &length)]) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head + "\r\n"
}

fn get_head(proxy: SocketAddr, target: &str) -> String {
    get_head_signed_as(proxy, target, target)
}

/// A signed GET head; `wire` is the target as sent, `signed` the one the
/// signature covers (the signer takes only valid URIs).
fn get_head_signed_as(proxy: SocketAddr, wire: &str, signed: &str) -> String {
    let host = proxy.to_string();
    let url = format!("http://{host}{signed}");
    let mut head = format!("GET {wire} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in sign_unsigned_payload("GET", &url, &host, &[]) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head + "\r\n"
}

async fn setup() -> (S3Backend, Relay, ProxyUnderTest) {
    let backend = S3Backend::start().await.unwrap();
    s3_client(&format!("http://{}", backend.address))
        .create_bucket()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    let relay = Relay::start(backend.address).await.unwrap();
    let proxy = ProxyUnderTest::start(relay.address, "").await.unwrap();
    (backend, relay, proxy)
}

fn received(relay: &Relay) -> String {
    let bytes: Vec<u8> = relay
        .connections()
        .iter()
        .flat_map(|c| c.to_backend.clone())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_hash_after_a_body_without_a_newline_is_refused_not_cut() {
    let (_backend, relay, proxy) = setup().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let first = put_head(proxy.address, "/targets/first", "/targets/first", 4);
    stream.write_all(first.as_bytes()).await.unwrap();
    stream.write_all(b"data").await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);

    // Signed for the key the URI parser would cut it to.
    let cut = put_head(proxy.address, "/targets/fnw#frag", "/targets/fnw", 0);
    stream.write_all(cut.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 400);
    assert!(body.contains("<Code>InvalidURI</Code>"), "{body}");
    assert!(
        !received(&relay).contains("/targets/fnw"),
        "the cut request never reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_line_inside_a_body_does_not_refuse_a_later_request() {
    let (_backend, _relay, proxy) = setup().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let document = b"see\r\nGET /targets/doc.md#section HTTP/1.1\r\n";
    let put = put_head(
        proxy.address,
        "/targets/doc.md",
        "/targets/doc.md",
        document.len(),
    );
    stream.write_all(put.as_bytes()).await.unwrap();
    stream.write_all(document).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);

    let get = get_head(proxy.address, "/targets/doc.md");
    stream.write_all(get.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_bytes(), document);
}

/// Reads to the end of the connection; what came after the answers read.
async fn rest_of(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut rest),
    )
    .await
    .expect("the proxy closes the connection")
    .unwrap();
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_the_uri_parser_refuses_gets_invalid_uri_after_the_answers_before_it() {
    let (_backend, relay, proxy) = setup().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    // Three requests in one write: the refused one in the middle.
    let pipelined = [
        put_head(proxy.address, "/targets/before", "/targets/before", 4) + "data",
        get_head_signed_as(proxy.address, "/targets/angle<x>", "/targets/angle%3Cx%3E"),
        get_head(proxy.address, "/targets/before"),
    ]
    .concat();
    stream.write_all(pipelined.as_bytes()).await.unwrap();

    assert_eq!(read_response(&mut stream).await.0, 200);
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 400);
    assert!(body.contains("<Code>InvalidURI</Code>"), "{body}");
    assert!(
        body.contains("<Resource>/targets/angle&lt;x&gt;</Resource>"),
        "{body}"
    );
    assert_eq!(rest_of(&mut stream).await, b"", "the connection ends there");
    let received = received(&relay);
    assert!(received.contains("PUT /targets/before"), "{received}");
    assert!(
        !received.contains("angle"),
        "never reaches the backend: {received}"
    );
    assert!(
        !received.contains("GET /targets/before"),
        "nor what followed it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_target_sent_byte_by_byte_gets_invalid_uri() {
    let (_backend, relay, proxy) = setup().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let request = get_head_signed_as(proxy.address, "/targets/tick`s", "/targets/tick%60s");
    for byte in request.as_bytes() {
        stream.write_all(&[*byte]).await.unwrap();
        stream.flush().await.unwrap();
    }
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 400);
    assert!(body.contains("<Code>InvalidURI</Code>"), "{body}");
    assert_eq!(rest_of(&mut stream).await, b"");
    assert!(!received(&relay).contains("tick"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_split_across_writes_is_forwarded_whole() {
    let (_backend, relay, proxy) = setup().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let put = put_head(proxy.address, "/targets/split", "/targets/split", 4) + "data";
    let (start, end) = put.split_at(10);
    stream.write_all(start.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream.write_all(end.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    assert!(received(&relay).contains("PUT /targets/split HTTP/1.1"));
}

/// A GET with no body on `stream`, its `:path` as given (HPACK literals).
fn h2_get(encoder: &mut loona_hpack::Encoder<'_>, stream: u32, path: &str) -> Vec<u8> {
    let fields = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "s3"),
    ];
    let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    // END_STREAM | END_HEADERS
    h2_frame(0x1, 0x1 | 0x4, stream, &block)
}

/// Reads frames until each of `streams` has ended; their `:status` and body.
async fn h2_answers(stream: &mut TcpStream, streams: &[u32]) -> Vec<(u16, String)> {
    let mut decoder = loona_hpack::Decoder::new();
    let mut answers: std::collections::HashMap<u32, (u16, Vec<u8>, bool)> = Default::default();
    let ended = |answers: &std::collections::HashMap<u32, (u16, Vec<u8>, bool)>| {
        streams
            .iter()
            .all(|id| answers.get(id).is_some_and(|answer| answer.2))
    };
    while !ended(&answers) {
        let mut header = [0u8; 9];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_exact(&mut header),
        )
        .await
        .expect("the proxy answers")
        .unwrap();
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).await.unwrap();
        let answer = answers.entry(id).or_default();
        match kind {
            0x1 => {
                for (name, value) in decoder.decode(&payload).unwrap() {
                    if name == b":status" {
                        answer.0 = String::from_utf8(value).unwrap().parse().unwrap();
                    }
                }
            }
            0x0 => answer.1.extend_from_slice(&payload),
            _ => continue,
        }
        answer.2 |= flags & 0x1 != 0;
    }
    streams
        .iter()
        .map(|id| {
            let (status, body, _) = &answers[id];
            (*status, String::from_utf8_lossy(body).into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_hash_in_an_http2_path_is_refused_not_cut() {
    let (_backend, relay, proxy) = setup().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let mut encoder = loona_hpack::Encoder::new();
    let bytes = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        h2_frame(0x4, 0, 0, &[]),
        h2_get(&mut encoder, 1, "/targets/hash#frag"),
        h2_get(&mut encoder, 3, "/targets/after"),
    ]
    .concat();
    stream.write_all(&bytes).await.unwrap();

    let answers = h2_answers(&mut stream, &[1, 3]).await;
    assert_eq!(answers[0].0, 400);
    assert!(
        answers[0].1.contains("<Code>InvalidURI</Code>"),
        "{answers:?}"
    );
    assert_ne!(
        answers[1].0, 400,
        "the next request is the backend's to answer"
    );
    let received = received(&relay);
    assert!(received.contains("GET /targets/after"), "{received}");
    assert!(
        !received.contains("/targets/hash"),
        "never cut and sent: {received}"
    );
}
