//! The raw HTTP/1.1 path (`listener.raw_http1`): plain GETs and HEADs are
//! forwarded as bytes, everything else goes through hyper, on the same
//! connection and in order, through the binary in front of s3s-fs.
//! (`tests/transparency.rs` compares the path's answers and what the
//! backend receives with straight access; `tests/download_resume.rs`,
//! `failover.rs`, `false_outages.rs` and `logs.rs` check its outages.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_sdk_s3::primitives::ByteStream;
use support::{ProxyProcess, S3Backend, metric_sample, read_response, s3_client};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn raw_proxy_for(backend: &S3Backend) -> ProxyProcess {
    ProxyProcess::start(&format!(
        "[listener]\nraw_http1 = true\n[backend]\naddress = \"{}\"\n",
        backend.address
    ))
    .await
    .unwrap()
}

/// Requests the raw path took so far.
async fn raw_requests(proxy: &ProxyProcess) -> f64 {
    let metrics = proxy.admin.metrics().await;
    metric_sample(&metrics, "s3fp_raw_http1_requests_total").unwrap()
}

/// Creates `bucket` through `proxy`, with the object `k` holding `v`.
async fn bucket_with_k(proxy: &ProxyProcess, bucket: &str) {
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket(bucket).send().await.unwrap();
    s3.put_object()
        .bucket(bucket)
        .key("k")
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .unwrap();
}

/// A signed request (payload unsigned) for `path` on `proxy`.
fn request(proxy: SocketAddr, method: &str, path: &str, body: &str) -> Vec<u8> {
    support::signed_request_bytes(proxy, method, path, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdks_reads_take_the_raw_path_and_its_writes_do_not() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = raw_proxy_for(&backend).await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("raw").send().await.unwrap();
    s3.put_object()
        .bucket("raw")
        .key("k")
        .body(ByteStream::from_static(b"read as bytes"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw_requests(&proxy).await, 0.0, "writes go through hyper");

    // On the connections that carried the writes.
    let got = s3.get_object().bucket("raw").key("k").send().await.unwrap();
    let body = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(body.as_ref(), b"read as bytes");
    let head = s3
        .head_object()
        .bucket("raw")
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(13));
    let listed = s3.list_objects_v2().bucket("raw").send().await.unwrap();
    assert_eq!(listed.contents().len(), 1);
    assert_eq!(raw_requests(&proxy).await, 3.0, "GET, HEAD, List");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_pipelined_in_one_write_are_answered_in_order() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = raw_proxy_for(&backend).await;
    let address = proxy.address();
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(&request(address, "PUT", "/pipelined", ""))
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200, "bucket made");

    let pipelined = [
        request(address, "PUT", "/pipelined/k", "first"),
        request(address, "GET", "/pipelined/k", ""),
        request(address, "PUT", "/pipelined/k", "second"),
        request(address, "GET", "/pipelined/k", ""),
        request(address, "HEAD", "/pipelined/k", ""),
    ]
    .concat();
    stream.write_all(&pipelined).await.unwrap();
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(read_response(&mut stream).await);
    }
    let bodies: Vec<(u16, &str)> = answers
        .iter()
        .map(|(status, body)| (*status, body.as_str()))
        .collect();
    assert_eq!(
        bodies,
        [(200, ""), (200, "first"), (200, ""), (200, "second")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_rested_between_reads_is_read_on_the_raw_path_again() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = raw_proxy_for(&backend).await;
    let address = proxy.address();
    bucket_with_k(&proxy, "rests").await;

    let mut stream = TcpStream::connect(address).await.unwrap();
    for read in 1..=3 {
        let get = request(address, "GET", "/rests/k", "");
        stream.write_all(&get).await.unwrap();
        assert_eq!(read_response(&mut stream).await, (200, "v".to_owned()));
        assert_eq!(raw_requests(&proxy).await, f64::from(read));
        // The client idles past the rest grace (0.1 s): the connection
        // rests, and its next bytes bring it back.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// A busy keep-alive connection whose GET the raw path handed to hyper
/// during an outage (held, then answered once the backend is back) takes
/// the raw path again at its next GET, without resting first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_to_hyper_in_an_outage_reads_on_the_raw_path_at_its_next_get() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = raw_proxy_for(&backend).await;
    let address = proxy.address();
    bucket_with_k(&proxy, "back").await;
    let get = request(address, "GET", "/back/k", "");
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(&get).await.unwrap();
    assert_eq!(read_response(&mut stream).await, (200, "v".to_owned()));
    assert_eq!(raw_requests(&proxy).await, 1.0);

    backend.kill9();
    stream.write_all(&get).await.unwrap();
    support::wait_until(
        std::time::Duration::from_secs(10),
        "the GET held",
        || async { proxy.admin.held().await == 1 },
    )
    .await
    .unwrap();
    backend.restart().await.unwrap();
    assert_eq!(read_response(&mut stream).await, (200, "v".to_owned()));
    assert_eq!(
        raw_requests(&proxy).await,
        1.0,
        "the held GET went the hyper way"
    );

    // Each next GET is sent as soon as the answer before it came: the
    // connection never rests.
    for _ in 0..3 {
        stream.write_all(&get).await.unwrap();
        assert_eq!(read_response(&mut stream).await, (200, "v".to_owned()));
    }
    assert_eq!(raw_requests(&proxy).await, 4.0, "back on the raw path");
}

/// A head whose lines end in bare LFs (which HTTP parsers take, RFC 9112
/// section 2.2) is answered as one ended with CRLFs: the forwarding lines
/// are never glued to its last field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_lines_end_in_bare_lf_is_answered() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = raw_proxy_for(&backend).await;
    let address = proxy.address();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("bare-lf").send().await.unwrap();
    s3.put_object()
        .bucket("bare-lf")
        .key("k")
        .body(ByteStream::from_static(b"bare"))
        .send()
        .await
        .unwrap();
    let crlf = String::from_utf8(request(address, "GET", "/bare-lf/k", "")).unwrap();
    let bare_lf = crlf.replace("\r\n", "\n");
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(bare_lf.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream).await, (200, "bare".to_owned()));
}

/// The proxy binary with the raw path on, in front of `backend`.
async fn raw_proxy_at(backend: SocketAddr) -> ProxyProcess {
    ProxyProcess::start(&format!(
        "[listener]\nraw_http1 = true\n[backend]\naddress = \"{backend}\"\n"
    ))
    .await
    .unwrap()
}

/// A connection to `proxy` on which `GET /b/k` was sent.
async fn get_b_k(proxy: &ProxyProcess) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    stream
        .write_all(b"GET /b/k HTTP/1.1\r\nHost: s3\r\n\r\n")
        .await
        .unwrap();
    stream
}

/// `GET /b/k` once more on `stream`, and its answer.
async fn get_b_k_again(stream: &mut TcpStream) -> (u16, String) {
    stream
        .write_all(b"GET /b/k HTTP/1.1\r\nHost: s3\r\n\r\n")
        .await
        .unwrap();
    read_response(stream).await
}

/// A backend of the test's own that answers every request on a connection
/// with `answer`, written in the pieces given (each after the previous one
/// was flushed, with a pause between, so that they arrive apart).
async fn scripted_backend(pieces: Vec<Vec<u8>>) -> SocketAddr {
    counted_scripted_backend(pieces).await.0
}

/// [`scripted_backend`], with the count of request heads it received.
async fn counted_scripted_backend(
    pieces: Vec<Vec<u8>>,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let pieces = pieces.clone();
            let counted = std::sync::Arc::clone(&counted);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    head.clear();
                    while !head.ends_with(b"\r\n\r\n") {
                        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    for piece in &pieces {
                        stream.write_all(piece).await.unwrap();
                        stream.flush().await.unwrap();
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
            });
        }
    });
    (address, heads)
}

/// Reads an answer whose body is chunked, to its last chunk and trailers:
/// every byte as it came.
async fn read_chunked_answer(stream: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        while !bytes.ends_with(b"\r\n0\r\nx-checksum: 1\r\n\r\n") {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "closed after {} bytes", bytes.len());
            bytes.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), read)
        .await
        .expect("the whole answer arrives");
    bytes
}

/// A chunked answer whose chunk-size lines and trailer arrive split across
/// reads reaches the client byte for byte as the backend sent it, whatever
/// its length (issue found by a break-it session: the start of a line not
/// whole yet was dropped, past the first 16 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_answer_split_mid_line_arrives_byte_for_byte() {
    let mut pieces = vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: Mon, 01 Jan 2026 00:00:00 GMT\r\n\r\n"
            .to_vec(),
    ];
    for chunk in 0..40u8 {
        pieces.push(b"3".to_vec());
        pieces.push([&b"e8;ext=1\r\n"[..], &[b'a' + chunk % 26; 1000], b"\r\n"].concat());
    }
    pieces.push(b"0\r\nx-check".to_vec());
    pieces.push(b"sum: 1\r\n\r\n".to_vec());
    let backend = scripted_backend(pieces).await;
    let proxy = raw_proxy_at(backend).await;
    let get = b"GET /b/chunked HTTP/1.1\r\nHost: s3\r\n\r\n";
    let mut straight = TcpStream::connect(backend).await.unwrap();
    straight.write_all(get).await.unwrap();
    let expected = read_chunked_answer(&mut straight).await;
    let mut through = TcpStream::connect(proxy.address()).await.unwrap();
    for _ in 0..2 {
        through.write_all(get).await.unwrap();
        let got = read_chunked_answer(&mut through).await;
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the same bytes as straight access");
    }
    assert_eq!(raw_requests(&proxy).await, 2.0);
}

/// The answer's head and the body bytes the backend has sent reach the
/// client at once: nothing waits for more of the body first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_of_an_answer_is_passed_on_before_its_rest_comes() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut byte = [0u8; 1];
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1);
            head.push(byte[0]);
        }
        let start = b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2026 00:00:00 GMT\r\nContent-Length: 20\r\n\r\n0123456789";
        stream.write_all(start).await.unwrap();
        let _ = released.await;
        stream.write_all(b"abcdefghij").await.unwrap();
        let _ = stream.read(&mut byte).await;
    });
    let proxy = raw_proxy_at(backend).await;
    let mut stream = get_b_k(&proxy).await;
    let mut got = Vec::new();
    let mut buffer = [0u8; 1024];
    let start = async {
        while !got.ends_with(b"0123456789") {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), start)
        .await
        .expect("the head and the first body bytes arrive while the backend holds the rest");
    release.send(()).unwrap();
    while !got.ends_with(b"abcdefghij") {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buffer[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
}

/// An answer hyper's client refuses as well (an obs-folded field, a field
/// line starting with a space, lengths that differ or are not numbers) is
/// answered `502`, as the hyper path answers it, and the GET reaches the
/// backend once: it is not handed to the hyper path to be sent again. A
/// `304` whose lengths differ, which hyper passes on, is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_hyper_refuses_is_a_502_and_the_get_is_sent_once() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok"[..],
        b"HTTP/1.1 200 OK\r\n Leading: space\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    ] {
        let (backend, heads) = counted_scripted_backend(vec![answer.to_vec()]).await;
        let proxy = raw_proxy_at(backend).await;
        let mut stream = get_b_k(&proxy).await;
        let (status, body) = read_response(&mut stream).await;
        let shown = String::from_utf8_lossy(answer);
        assert_eq!(status, 502, "{shown}");
        assert!(body.contains("<Code>InternalError</Code>"), "{body}");
        assert_eq!(
            heads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{shown}"
        );
    }
    let not_modified =
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
    let backend = scripted_backend(vec![not_modified.to_vec()]).await;
    let proxy = raw_proxy_at(backend).await;
    let mut stream = get_b_k(&proxy).await;
    assert_eq!(read_response(&mut stream).await.0, 304);
}

/// An answer to HEAD with two `Content-Length` lines reaches the client on
/// both paths (hyper's server refused to write the second to a HEAD and
/// closed the connection without an answer, logging it as answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_answered_with_two_lengths_is_answered_on_both_paths() {
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
    let backend = scripted_backend(vec![answer.to_vec()]).await;
    for raw in [true, false] {
        let proxy = ProxyProcess::start(&format!(
            "[listener]\nraw_http1 = {raw}\n[backend]\naddress = \"{backend}\"\n"
        ))
        .await
        .unwrap();
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        stream
            .write_all(b"HEAD /b/k HTTP/1.1\r\nHost: s3\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            use tokio::io::AsyncReadExt;
            let n = stream.read(&mut byte).await.unwrap();
            assert_eq!(n, 1, "raw_http1 = {raw}: closed after {head:?}");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
    }
}

/// Reads a request head off `stream`, a byte at a time (nothing past it);
/// false when the stream ends first.
async fn read_a_head(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return false;
        }
        head.push(byte[0]);
    }
    true
}

/// A backend that answers each request `200` with `ok`, and on the first
/// connection, once told, sends a `408` nobody asked for and keeps the
/// connection open (as a server whose idle timeout answers before it
/// closes); it reports when those bytes are written.
async fn backend_with_an_unasked_408(
    send_it: tokio::sync::oneshot::Receiver<()>,
    sent: tokio::sync::oneshot::Sender<()>,
) -> SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut unasked = Some((send_it, sent));
        while let Ok((mut stream, _)) = listener.accept().await {
            let unasked = unasked.take();
            tokio::spawn(async move {
                if !read_a_head(&mut stream).await {
                    return;
                }
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                stream.write_all(ok).await.unwrap();
                if let Some((send_it, sent)) = unasked {
                    let _ = send_it.await;
                    let timeout = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n";
                    stream.write_all(timeout).await.unwrap();
                    let _ = sent.send(());
                }
                // Open until the proxy closes it.
                let _ = stream.read(&mut [0u8; 1]).await;
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_backend_sent_unasked_on_an_idle_connection_are_not_an_answer() {
    let (send_it, told) = tokio::sync::oneshot::channel();
    let (sent, written) = tokio::sync::oneshot::channel();
    let backend = backend_with_an_unasked_408(told, sent).await;
    let proxy = raw_proxy_at(backend).await;
    let mut stream = get_b_k(&proxy).await;
    assert_eq!(read_response(&mut stream).await, (200, "ok".into()));
    // The backend connection is back in the pool: the 408 arrives on it.
    send_it.send(()).unwrap();
    written.await.unwrap();
    assert_eq!(get_b_k_again(&mut stream).await, (200, "ok".into()));
    assert_eq!(raw_requests(&proxy).await, 2.0);
}

/// A backend whose idle timer fires as a connection's second request
/// comes: the first request of a connection is answered `200` with `ok`,
/// the next one `408` and the connection closed. Counts request heads.
async fn backend_timing_out_reused_connections() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                for answer in [
                    &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..],
                    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ] {
                    if !read_a_head(&mut stream).await {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    stream.write_all(answer).await.unwrap();
                }
            });
        }
    });
    (address, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_408_on_a_reused_backend_connection_is_not_the_answer() {
    let (backend, heads) = backend_timing_out_reused_connections().await;
    let proxy = raw_proxy_at(backend).await;
    let mut stream = get_b_k(&proxy).await;
    assert_eq!(read_response(&mut stream).await, (200, "ok".into()));
    assert_eq!(get_b_k_again(&mut stream).await, (200, "ok".into()));
    assert_eq!(raw_requests(&proxy).await, 2.0);
    assert_eq!(
        heads.load(Ordering::SeqCst),
        3,
        "the second GET was sent again on a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_408_on_a_new_backend_connection_is_passed_on() {
    let answer = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (backend, heads) = counted_scripted_backend(vec![answer.to_vec()]).await;
    let proxy = raw_proxy_at(backend).await;
    let mut stream = get_b_k(&proxy).await;
    assert_eq!(read_response(&mut stream).await.0, 408);
    assert_eq!(heads.load(Ordering::SeqCst), 1, "sent once");
}

/// A GET still waiting for its answer when the shutdown's drain ends is
/// answered within the grace, as on the hyper path: the raw path cut it
/// unanswered (`499`) as soon as the drain ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_in_flight_when_the_drain_ends_gets_its_answer_within_the_grace() {
    let backend = S3Backend::start().await.unwrap();
    let straight =
        support::raw_request(backend.address, "GET", "/", &[], bytes::Bytes::new()).await;
    let (proxy, sent) = sent_when_the_backend_stops(&backend, "0s").await;
    proxy.signal("-TERM");
    // The drain is over.
    proxy
        .wait_for_log(
            "shutting down: no new connections",
            std::time::Duration::from_secs(10),
        )
        .await;
    backend.thaw();
    let straight = straight
        .ok()
        .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()));
    assert_eq!(
        read_answer(sent).await,
        straight,
        "the backend's answer, as straight from it"
    );
    assert!(proxy.exit_status().await.success());
}

/// A GET whose answer comes once the shutdown's drain has begun gets it
/// with `Connection: close`, as on the hyper path, and its connection ends
/// after it: a client does not send its next request on a connection about
/// to close under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_while_draining_says_connection_close() {
    let backend = S3Backend::start().await.unwrap();
    let (proxy, sent) = sent_when_the_backend_stops(&backend, "3s").await;
    proxy.signal("-TERM");
    proxy
        .wait_for_log("shutting down: unready", std::time::Duration::from_secs(10))
        .await;
    backend.thaw();
    let answer = String::from_utf8_lossy(&sent.await.unwrap()).to_lowercase();
    let head = &answer[..answer.find("\r\n\r\n").expect("an answer")];
    assert!(head.starts_with("http/1.1 403"), "the backend's: {answer}");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(proxy.exit_status().await.success());
}

/// A proxy with `shutdown.drain_delay = drain_delay` in front of `backend`,
/// and a GET sent through it on the raw path that `backend`, stopped
/// (SIGSTOP), has taken and not answered: the task ends with all the
/// client read until the proxy closed the connection.
async fn sent_when_the_backend_stops(
    backend: &S3Backend,
    drain_delay: &str,
) -> (ProxyProcess, tokio::task::JoinHandle<Vec<u8>>) {
    use tokio::io::AsyncReadExt;
    let proxy = ProxyProcess::start(&format!(
        "[listener]\nraw_http1 = true\n[backend]\naddress = \"{}\"\n[shutdown]\ndrain_delay = \"{drain_delay}\"\ngrace = \"30s\"\n",
        backend.address
    ))
    .await
    .unwrap();
    let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
    backend.freeze();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .await
        .unwrap();
    let sent = tokio::spawn(async move {
        let mut read = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            stream.read_to_end(&mut read),
        )
        .await;
        read
    });
    proxy
        .admin
        .wait_metric("s3fp_backend_in_flight_requests", 1.0)
        .await;
    (proxy, sent)
}

/// The status and body of the one answer in what `sent` read, if any.
async fn read_answer(sent: tokio::task::JoinHandle<Vec<u8>>) -> Option<(u16, String)> {
    let read = String::from_utf8(sent.await.unwrap()).unwrap();
    let (head, body) = read.split_once("\r\n\r\n")?;
    let status = head.get(9..12)?.parse().ok()?;
    Some((status, body.to_owned()))
}
