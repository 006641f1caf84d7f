//! Early final answers: a backend that rejects an upload before reading its
//! body (here a signature made with the wrong secret, which s3s-fs checks from
//! the head alone) answers `403` while the client is still sending. The client
//! must get that `403` every time, over HTTP/1.1 with and without
//! `Expect: 100-continue` and over HTTP/2, and a rejected upload must not look
//! like an outage. radosgw is the backend whose early answers matter: it
//! does not read the body of a request it refuses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::radosgw::RadosGw;
use support::tls::{TestCa, h2_connect, https_proxy};
use support::{
    ProxyUnderTest, S3Backend, read_response, s3_client, sign_unsigned_payload,
    sign_unsigned_payload_with,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TRIES: usize = 50;
const UPLOAD: usize = 16 << 20;
const WRONG_SECRET: &str = "not-the-secret-key-0123456789";

async fn create_bucket(backend: SocketAddr, bucket: &str) {
    s3_client(&format!("http://{backend}"))
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
}

/// The signed head of a 16 MiB PUT whose signature the backend refuses.
fn forged_put_headers(host: &str, path: &str) -> Vec<(String, String)> {
    let url = format!("http://{host}{path}");
    let length = UPLOAD.to_string();
    sign_unsigned_payload_with(
        WRONG_SECRET,
        "PUT",
        &url,
        host,
        &[("content-length", &length)],
    )
}

/// Sends the forged PUT over HTTP/1.1 as a client that streams its body at
/// once (or, with `expect`, only after a `100 Continue`), and returns the
/// status of the final answer.
async fn forged_put_http1(proxy: SocketAddr, path: &str, expect: bool) -> u16 {
    let host = proxy.to_string();
    let mut head = format!("PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {UPLOAD}\r\n");
    for (name, value) in forged_put_headers(&host, path) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if expect {
        head.push_str("Expect: 100-continue\r\n");
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    if expect {
        let status = read_response(&mut reader).await.0;
        assert_ne!(
            status, 100,
            "the backend refuses before asking for the body"
        );
        return status;
    }
    let upload = tokio::spawn(async move {
        // The backend may close before taking it all; that is its right.
        let _ = writer.write_all(&vec![b'x'; UPLOAD]).await;
        writer
    });
    let status = read_response(&mut reader).await.0;
    drop(upload);
    status
}

/// A 16 MiB PUT sent chunked, without `Content-Length`, signed for the
/// address it is sent to: radosgw refuses it before reading the body.
/// Returns the status of the answer.
async fn chunked_put_http1(proxy: SocketAddr, path: &str) -> u16 {
    let host = proxy.to_string();
    let url = format!("http://{host}{path}");
    let mut head = format!("PUT {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in sign_unsigned_payload("PUT", &url, &host, &[]) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Transfer-Encoding: chunked\r\n\r\n");
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..UPLOAD / chunk.len() {
            let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if writer.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = writer.write_all(b"0\r\n\r\n").await;
    });
    let status = read_response(&mut reader).await.0;
    upload.abort();
    status
}

/// `TRIES` forged uploads through a proxy in front of `backend`: every one
/// gets the backend's 403, and none counts as an outage.
async fn forged_uploads_get_403(backend: SocketAddr, bucket: &str, expect: bool) {
    create_bucket(backend, bucket).await;
    let proxy = ProxyUnderTest::start(backend, "").await.unwrap();
    for attempt in 0..TRIES {
        let path = format!("/{bucket}/k{attempt}");
        let status = forged_put_http1(proxy.address, &path, expect).await;
        assert_eq!(status, 403, "try {attempt}");
    }
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "a refused upload is no outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_upload_over_http1_gets_the_backends_403_every_time() {
    let backend = S3Backend::start().await.unwrap();
    forged_uploads_get_403(backend.address, "early-h1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_upload_with_expect_gets_its_403_before_sending_the_body() {
    let backend = S3Backend::start().await.unwrap();
    forged_uploads_get_403(backend.address, "early-expect", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn radosgw_refusing_a_forged_upload_is_answered_403_every_time() {
    let gateway = RadosGw::start().await.unwrap();
    forged_uploads_get_403(gateway.address, "rgw-early-h1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn radosgw_refusing_a_chunked_upload_is_answered_as_straight_every_time() {
    let gateway = RadosGw::start().await.unwrap();
    create_bucket(gateway.address, "rgw-early-411").await;
    let proxy = ProxyUnderTest::start(gateway.address, "").await.unwrap();
    let straight = chunked_put_http1(gateway.address, "/rgw-early-411/straight").await;
    assert!(straight >= 400, "radosgw refuses it: {straight}");
    for attempt in 0..TRIES {
        let path = format!("/rgw-early-411/k{attempt}");
        let proxied = chunked_put_http1(proxy.address, &path).await;
        assert_eq!(proxied, straight, "try {attempt}");
    }
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "a refused upload is no outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn radosgw_refusing_a_forged_upload_with_expect_never_gets_its_body() {
    let gateway = RadosGw::start().await.unwrap();
    forged_uploads_get_403(gateway.address, "rgw-early-expect", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_upload_over_http2_gets_the_backends_403_every_time() {
    let backend = S3Backend::start().await.unwrap();
    forged_uploads_over_http2_get_403(backend.address, "early-h2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn radosgw_refusing_a_forged_upload_over_http2_is_answered_403_every_time() {
    let gateway = RadosGw::start().await.unwrap();
    forged_uploads_over_http2_get_403(gateway.address, "rgw-early-h2").await;
}

/// The same over HTTP/2 with TLS, all tries on one connection, every other
/// one with `Expect: 100-continue`: the 403 comes back on its stream before
/// the request stream is reset.
async fn forged_uploads_over_http2_get_403(backend: SocketAddr, bucket: &str) {
    create_bucket(backend, bucket).await;
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend, &ca, "").await;
    let tls_address = proxy.tls_address.unwrap();
    let host = format!("localhost:{}", tls_address.port());
    let mut h2 = h2_connect(tls_address, &ca).await.unwrap();
    let body = Bytes::from(vec![b'x'; UPLOAD]);
    for attempt in 0..TRIES {
        let path = format!("/{bucket}/k{attempt}");
        let mut request = http::Request::builder()
            .method("PUT")
            .uri(format!("https://{host}{path}"))
            .version(http::Version::HTTP_2);
        for (name, value) in forged_put_headers(&host, &path) {
            if name != "host" {
                request = request.header(name, value);
            }
        }
        // Every other try expects 100-continue (forwarded to the backend).
        if attempt % 2 == 1 {
            request = request.header("expect", "100-continue");
        }
        let response = h2
            .send_request(request.body(Full::new(body.clone())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("try {attempt}: no answer: {e}"));
        assert_eq!(response.status(), 403, "try {attempt}");
        let error = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&error).contains("SignatureDoesNotMatch"),
            "try {attempt}: {error:?}"
        );
    }
    assert_eq!(
        proxy.admin.outages().await,
        0.0,
        "a refused upload is no outage"
    );
}

/// A backend that answers a PUT with `403` as soon as it has its head, reads
/// nothing of its body and keeps the connection open (what radosgw can do
/// after `100 Continue`), and answers anything else `200`. Returns the
/// request lines it parsed, in order: bytes it never read are parsed as the
/// next request on their connection.
async fn early_refusing_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut connection, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buffer[..end]).to_string();
                        buffer.drain(..end + 4);
                        let line = head.lines().next().unwrap_or_default().to_owned();
                        let status = if line.starts_with("PUT ") {
                            "403 Forbidden"
                        } else {
                            "200 OK"
                        };
                        seen.lock().unwrap().push(line);
                        let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                        if connection.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match connection.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (address, recorded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_before_its_body_was_read_leaves_nothing_for_the_next_client() {
    let (backend, seen) = early_refusing_backend().await;
    let proxy = ProxyUnderTest::start(backend, "").await.unwrap();

    // An upload whose body looks like the start of a request.
    let body = format!(
        "GET /smuggled HTTP/1.1\r\nHost: backend\r\nX-Pad: {}",
        "a".repeat(200)
    );
    let mut uploader = TcpStream::connect(proxy.address).await.unwrap();
    let put = format!(
        "PUT /bucket/key HTTP/1.1\r\nHost: s3\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    uploader.write_all(put.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut uploader).await.0, 403);
    drop(uploader);

    for _ in 0..3 {
        let mut other = TcpStream::connect(proxy.address).await.unwrap();
        other
            .write_all(b"GET /bucket/mine HTTP/1.1\r\nHost: s3\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut other).await.0, 200);
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|line| line.contains("/smuggled")),
        "the refused upload's body reached the backend as a request: {seen:?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|line| line.starts_with("GET /bucket/mine"))
            .count(),
        3,
        "{seen:?}"
    );
    proxy.stop().await.unwrap();
}
