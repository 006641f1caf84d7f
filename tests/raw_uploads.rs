//! Large uploads on the raw path (`src/raw_http1/upload.rs`): a PUT whose
//! body is larger than `hold.replay_buffer` has its body spliced from the
//! client socket to the backend's, in front of s3s-fs. What a client sees
//! must be what the hyper path gives it: the object stored byte for byte,
//! `100 Continue` end to end, the next request on the connection answered,
//! and an S3 error when the client or the backend stops mid-body, with
//! nothing stored. (`tests/transparency.rs` compares 3 MiB PUTs with
//! straight access; `tests/unsafe_replay.rs` kills the backend mid-upload.)

use std::net::SocketAddr;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use support::relay::Relay;
use support::{
    FedUpload, ProxyUnderTest, S3Backend, metric_sample, object_content, read_object, s3_client,
    sign_unsigned_payload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The raw path on, whatever the run asks (`S3FP_TEST_RAW_HTTP1`), and the
/// default replay buffer (1 MiB): uploads over it are spliced.
const RAW: &str = "[listener]\nraw_http1 = true\n";

/// Requests the raw path answered so far.
async fn raw_requests(proxy: &ProxyUnderTest) -> f64 {
    let metrics = proxy.admin.metrics().await;
    metric_sample(&metrics, "s3fp_raw_http1_requests_total").unwrap_or(0.0)
}

/// The head of a signed PUT (payload unsigned) of `length` bytes.
fn put_head(proxy: SocketAddr, path: &str, length: usize, expect: bool) -> Vec<u8> {
    let host = proxy.to_string();
    let signed = sign_unsigned_payload("PUT", &format!("http://{host}{path}"), &host, &[]);
    let mut head = format!("PUT {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in signed {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if expect {
        head.push_str("Expect: 100-continue\r\n");
    }
    head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
    head.into_bytes()
}

/// The head of a signed GET.
fn get_head(proxy: SocketAddr, path: &str) -> Vec<u8> {
    support::signed_request_bytes(proxy, "GET", path, "")
}

/// Reads one answer head and its `Content-Length` body.
async fn read_answer(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = stream.read(&mut byte).await.unwrap();
        assert_eq!(read, 1, "connection ended within a head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, body)
}

async fn proxy_with_bucket(backend: SocketAddr, bucket: &str, extra: &str) -> ProxyUnderTest {
    let proxy = ProxyUnderTest::start(backend, extra).await.unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_upload_past_the_replay_buffer_takes_the_raw_path_and_is_stored_byte_for_byte() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with_bucket(backend.address, "spliced", RAW).await;
    let s3 = s3_client(&proxy.endpoint());
    let content = object_content(1, 6 << 20);
    let before = raw_requests(&proxy).await;

    s3.put_object()
        .bucket("spliced")
        .key("six-mib")
        .body(ByteStream::from(content.clone()))
        .send()
        .await
        .unwrap();

    assert_eq!(
        raw_requests(&proxy).await - before,
        1.0,
        "the raw path answered the PUT"
    );
    assert_eq!(read_object(&s3, "spliced", "six-mib").await, content);
    assert_eq!(proxy.admin.outages().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_expecting_continue_gets_it_and_the_request_after_its_body_is_answered() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with_bucket(backend.address, "pipelined", RAW).await;
    let content = object_content(2, 3 << 20);
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();

    let head = put_head(proxy.address, "/pipelined/k", content.len(), true);
    stream.write_all(&head).await.unwrap();
    let mut asked = [0u8; 25];
    stream.read_exact(&mut asked).await.unwrap();
    assert_eq!(&asked, b"HTTP/1.1 100 Continue\r\n\r\n");
    // The body and, in the same write, the next request: its bytes must not
    // be taken for the body, nor the body's for a request.
    let get = get_head(proxy.address, "/pipelined/k");
    stream
        .write_all(&[content.as_slice(), &get].concat())
        .await
        .unwrap();

    let (put_answer, _) = read_answer(&mut stream).await;
    assert!(put_answer.starts_with("HTTP/1.1 200"), "{put_answer}");
    let (get_answer, body) = read_answer(&mut stream).await;
    assert!(get_answer.starts_with("HTTP/1.1 200"), "{get_answer}");
    assert!(body == content, "the object read back differs");
    assert!(raw_requests(&proxy).await >= 2.0);
    // The connection's watch followed past the spliced body: a target with
    // a raw `#` (which hyper would cut to `/pipelined/a`) is still refused.
    let cut = support::signed_request_bytes(proxy.address, "PUT", "/pipelined/a#b", "v");
    stream.write_all(&cut).await.unwrap();
    let (refused, body) = read_answer(&mut stream).await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert_eq!(support::s3_code(&body), "InvalidURI");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_alternating_with_gets_do_not_pile_up_idle_backend_connections() {
    let backend = S3Backend::start().await.unwrap();
    let relay = Relay::start(backend.address).await.unwrap();
    let proxy = proxy_with_bucket(relay.address, "pairs", RAW).await;
    let before = raw_requests(&proxy).await;
    let content = object_content(3, (3 << 20) / 2);
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();

    let pairs = 12;
    for _ in 0..pairs {
        let put = put_head(proxy.address, "/pairs/k", content.len(), false);
        stream
            .write_all(&[put.as_slice(), &content].concat())
            .await
            .unwrap();
        let (put_answer, _) = read_answer(&mut stream).await;
        assert!(put_answer.starts_with("HTTP/1.1 200"), "{put_answer}");
        stream
            .write_all(&get_head(proxy.address, "/pairs/k"))
            .await
            .unwrap();
        let (get_answer, body) = read_answer(&mut stream).await;
        assert!(get_answer.starts_with("HTTP/1.1 200"), "{get_answer}");
        assert!(body == content, "the object read back differs");
    }

    assert_eq!(raw_requests(&proxy).await - before, f64::from(2 * pairs));
    // Straight to the backend this client holds one connection; the proxy
    // keeps its hyper pool's (the CreateBucket's) and one for the GETs.
    let open = || relay.connections().iter().filter(|c| !c.closed).count();
    let settled = support::wait_until(
        Duration::from_secs(10),
        "at most 2 backend connections open",
        || async { open() <= 2 },
    )
    .await;
    assert!(settled.is_ok(), "{} backend connections open", open());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_mid_upload_gets_408_and_nothing_is_stored() {
    let backend = S3Backend::start().await.unwrap();
    let extra = format!("{RAW}client_body_timeout = \"1s\"\n");
    let proxy = proxy_with_bucket(backend.address, "silent", &extra).await;
    let content = object_content(3, 4 << 20);
    let upload = FedUpload::start(proxy.address, "/silent/k", content.len());
    assert!(upload.send(&content[..2 << 20]).await);
    // Never sends the rest; the feed stays open.

    let response = upload.response.await.unwrap().unwrap();

    assert_eq!(response.status(), 408);
    assert_eq!(response.headers()["connection"], "close");
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(support::s3_code(&body), "RequestTimeout");
    drop(upload.feed);
    let s3 = s3_client(&proxy.endpoint());
    let head = s3.head_object().bucket("silent").key("k").send().await;
    assert!(head.is_err(), "nothing stored: {head:?}");
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "a silent client is no outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_client_stops_short_gets_400_incomplete_body_and_nothing_is_stored() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_with_bucket(backend.address, "short", RAW).await;
    let content = object_content(4, 4 << 20);
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let head = put_head(proxy.address, "/short/k", content.len(), false);

    stream
        .write_all(&[head.as_slice(), &content[..3 << 20]].concat())
        .await
        .unwrap();
    stream.shutdown().await.unwrap();

    let (answer, body) = read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(support::s3_code(&body), "IncompleteBody");
    let s3 = s3_client(&proxy.endpoint());
    let stored = s3.head_object().bucket("short").key("k").send().await;
    assert!(stored.is_err(), "nothing stored: {stored:?}");
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "a short body is no outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_a_frozen_backend_stops_taking_is_found_hung_and_gets_503() {
    let backend = S3Backend::start().await.unwrap();
    let extra = format!("{RAW}[probe]\ntimeout = \"200ms\"\n");
    let proxy = ProxyUnderTest::start_with(backend.address, "response_timeout = \"500ms\"", &extra)
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("frozen").send().await.unwrap();
    let content = object_content(5, 64 << 20);
    let upload = FedUpload::start(proxy.address, "/frozen/k", content.len());
    assert!(upload.send(&content[..4 << 20]).await);

    backend.freeze();
    let FedUpload { feed, response } = upload;
    let feeding = tokio::spawn(async move {
        for chunk in content[4 << 20..].chunks(64 << 10) {
            let chunk = bytes::Bytes::copy_from_slice(chunk);
            if feed.send(chunk).await.is_err() {
                return;
            }
        }
    });
    proxy.admin.wait_reason("hang_timeout").await;
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("answered once the hang was seen")
        .unwrap()
        .unwrap();
    backend.thaw();
    feeding.abort();

    assert_eq!(response.status(), 503);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(support::s3_code(&body), "ServiceUnavailable");
    let stored = s3.head_object().bucket("frozen").key("k").send().await;
    assert!(stored.is_err(), "nothing stored: {stored:?}");
}

/// A backend that answers every request `403` 300 ms after its head came
/// (reading nothing meanwhile: a large body fills the sockets' buffers and
/// stops in the proxy), without `Connection: close`, then reads and drops
/// whatever follows.
async fn refusing_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                tokio::time::sleep(Duration::from_millis(300)).await; // a backend busy elsewhere
                let refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
                if stream.write_all(refusal).await.is_err() {
                    return;
                }
                let mut rest = vec![0u8; 1 << 16];
                while stream.read(&mut rest).await.unwrap_or(0) > 0 {}
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_before_its_body_ended_leaves_its_connection_serving_the_next_request() {
    let backend = refusing_backend().await;
    let proxy = ProxyUnderTest::start_with(backend, "", RAW).await.unwrap();
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let content = object_content(6, 32 << 20);
    let head = put_head(proxy.address, "/refused/k", content.len(), false);
    stream.write_all(&head).await.unwrap();

    let (mut reader, mut writer) = stream.into_split();
    let body = tokio::spawn(async move {
        writer.write_all(&content).await.unwrap();
        writer
    });
    let mut refusal = Vec::new();
    while !refusal.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(reader.read(&mut byte).await.unwrap(), 1);
        refusal.push(byte[0]);
    }
    let refusal = String::from_utf8(refusal).unwrap();
    assert!(refusal.starts_with("HTTP/1.1 403"), "{refusal}");
    assert!(!refusal.to_ascii_lowercase().contains("connection: close"));
    // The whole body went (read and dropped), then the next request: it is
    // answered, not taken for the rest of the body.
    let mut writer = body.await.unwrap();
    writer
        .write_all(&get_head(proxy.address, "/refused/k"))
        .await
        .unwrap();
    let mut stream = reader.reunite(writer).unwrap();
    let (next, _) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .expect("the next request is answered");
    assert!(next.starts_with("HTTP/1.1 403"), "{next}");
}

/// A backend that sends `100 Continue` 500 ms after a head that expects it
/// (reading nothing meanwhile), then reads the `Content-Length` body and
/// answers `200` with the number of body bytes it got.
async fn late_continue_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |value| value.trim().parse().unwrap());
                tokio::time::sleep(Duration::from_millis(500)).await; // a backend slow to ask
                let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                let mut body = vec![0u8; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let got = length.to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{got}",
                    got.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    address
}

/// Sends an upload of `length` bytes expecting `100 Continue` on `stream`:
/// the body once the proxy's `100` came.
async fn upload_after_continue(stream: &mut TcpStream, proxy: SocketAddr, length: usize) {
    stream
        .write_all(&put_head(proxy, "/b/k", length, true))
        .await
        .unwrap();
    let mut asked = [0u8; 25];
    stream.read_exact(&mut asked).await.unwrap();
    assert_eq!(&asked, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(&object_content(9, length)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_late_continue_after_the_body_went_unasked_does_not_stop_it() {
    let backend = late_continue_backend().await;
    let proxy = ProxyUnderTest::start_with(backend, "expect_continue_timeout = \"100ms\"", RAW)
        .await
        .unwrap();
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();

    upload_after_continue(&mut stream, proxy.address, 8 << 20).await;

    let (answer, body) = tokio::time::timeout(Duration::from_secs(20), read_answer(&mut stream))
        .await
        .expect("the upload is answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        body,
        (8 << 20).to_string().into_bytes(),
        "every body byte arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_connection_whose_body_went_unasked_is_not_reused() {
    // Never asks for the body; refuses it 300 ms after the head, once the
    // proxy sent it unasked (2 MiB fit the sockets' buffers by then).
    let backend = refusing_backend().await;
    let proxy = ProxyUnderTest::start_with(
        backend,
        "expect_continue_timeout = \"100ms\"",
        &format!("{RAW}threads = 1\n"),
    )
    .await
    .unwrap();
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    upload_after_continue(&mut stream, proxy.address, 2 << 20).await;
    let (refused, _) = read_answer(&mut stream).await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    // The backend reads what follows on that connection as more of the
    // body: another client's GET sent there would never be answered.
    let mut other = TcpStream::connect(proxy.address).await.unwrap();
    other
        .write_all(&get_head(proxy.address, "/b/other"))
        .await
        .unwrap();
    let (answer, _) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut other))
        .await
        .expect("the other client's GET is answered");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}
