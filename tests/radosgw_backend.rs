//! radosgw (Ceph's S3 gateway, the code s3gw runs) as a second real backend:
//! the harness brings it up, the real SDK client talks to it, and its objects
//! survive a SIGKILL and restart; a large object of it comes through the
//! proxy byte for byte; plus one wire habit of radosgw that a proxy must
//! carry through, seen on a raw connection.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use support::radosgw::RadosGw;
use support::{ProxyUnderTest, object_content, read_object, s3_client, sign_unsigned_payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn objects_survive_a_sigkill_and_restart() {
    let mut gateway = RadosGw::start().await.unwrap();
    let s3 = s3_client(&gateway.endpoint());
    s3.create_bucket()
        .bucket("survives-sigkill")
        .send()
        .await
        .unwrap();
    // Over radosgw's 4 MiB stripe: a head object and a tail in RADOS.
    let content = object_content(1, 5 * 1024 * 1024 + 17);
    s3.put_object()
        .bucket("survives-sigkill")
        .key("object")
        .body(ByteStream::from(content.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        read_object(&s3, "survives-sigkill", "object").await,
        content
    );

    gateway.kill9();
    assert!(!gateway.is_running());
    gateway.restart().await.unwrap();

    // A new client: the old one's pooled connections died with the process.
    let s3 = s3_client(&gateway.endpoint());
    assert_eq!(
        read_object(&s3, "survives-sigkill", "object").await,
        content
    );
}

/// radosgw writes header names in mixed case (`ETag`, `Content-Length`);
/// HTTP/1.1 names are case-insensitive, and a proxy is free to lower-case them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_from_radosgw_comes_through_the_proxy_byte_for_byte() {
    let gateway = RadosGw::start().await.unwrap();
    let proxy = ProxyUnderTest::start(gateway.address, "").await.unwrap();
    let direct = s3_client(&gateway.endpoint());
    let proxied = s3_client(&proxy.endpoint());
    direct.create_bucket().bucket("large").send().await.unwrap();
    // Many of radosgw's 4 MiB stripes, read in the proxy's large reads.
    let content = object_content(3, 40 * 1024 * 1024 + 3);
    direct
        .put_object()
        .bucket("large")
        .key("object")
        .body(ByteStream::from(content.clone()))
        .send()
        .await
        .unwrap();

    assert!(read_object(&proxied, "large", "object").await == content);
    let range = proxied
        .get_object()
        .bucket("large")
        .key("object")
        .range("bytes=4194000-12583000")
        .send()
        .await
        .unwrap();
    let ranged = range.body.collect().await.unwrap().into_bytes();
    assert!(ranged[..] == content[4194000..=12583000], "the range");
    // And the next small request on what the large reads left behind.
    let listed = proxied
        .list_objects_v2()
        .bucket("large")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.contents().len(), 1);
}

#[tokio::test]
async fn response_header_names_arrive_in_mixed_case() {
    let gateway = RadosGw::start().await.unwrap();
    let s3 = s3_client(&gateway.endpoint());
    s3.create_bucket()
        .bucket("mixed-case")
        .send()
        .await
        .unwrap();
    let put = s3
        .put_object()
        .bucket("mixed-case")
        .key("object")
        .body(ByteStream::from_static(b"twelve bytes"))
        .send()
        .await
        .unwrap();
    let etag = put.e_tag().unwrap();

    let host = gateway.address.to_string();
    let url = format!("http://{host}/mixed-case/object");
    let mut request = format!("HEAD /mixed-case/object HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in sign_unsigned_payload("HEAD", &url, &host, &[]) {
        if name != "host" {
            request += &format!("{name}: {value}\r\n");
        }
    }
    request += "Connection: close\r\n\r\n";
    let mut stream = TcpStream::connect(gateway.address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("radosgw closes the connection")
        .unwrap();
    let head = String::from_utf8(response).unwrap();
    let lines: Vec<&str> = head.split("\r\n").collect();
    assert_eq!(lines[0], "HTTP/1.1 200 OK", "{head}");
    assert!(lines.contains(&format!("ETag: {etag}").as_str()), "{head}");
    assert!(lines.contains(&"Content-Length: 12"), "{head}");
}

/// A PUT with `Expect: 100-continue` from a client that, as curl and
/// botocore do, waits a second for the `100` and then sends the body anyway,
/// to a radosgw that never sends one (`rgw_print_continue = false`), through
/// a proxy with `backend.expect_continue_timeout` set.
async fn put_expecting_continue(to: std::net::SocketAddr, host: &str, body: &[u8]) -> u16 {
    let url = format!("http://{host}/no-continue/object");
    let length = body.len().to_string();
    let mut head = format!(
        "PUT /no-continue/object HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n"
    );
    let signed = [
        ("content-length", length.as_str()),
        ("expect", "100-continue"),
    ];
    for (name, value) in sign_unsigned_payload("PUT", &url, host, &signed) {
        if !["host", "content-length", "expect"].contains(&name.as_str()) {
            head += &format!("{name}: {value}\r\n");
        }
    }
    head += "\r\n";
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    // The client's own wait for the `100` (the scenario, not a wait for
    // the proxy): a second, then it sends the body whatever came.
    let mut interim = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.peek(&mut interim)).await;
    stream.write_all(body).await.unwrap();
    let answer = async {
        loop {
            let (status, _) = support::read_response(&mut stream).await;
            // A `100 Continue` the client did not wait for comes first.
            if status != 100 {
                return status;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .expect("answered within 20 s")
}

#[tokio::test]
async fn an_upload_expecting_continue_reaches_a_radosgw_that_never_sends_one() {
    upload_reaches_a_radosgw_that_never_sends_continue(b"straight", b"through the proxy").await;
}

/// The same with bodies past `hold.replay_buffer`: on the raw path, spliced.
#[tokio::test]
async fn a_large_upload_expecting_continue_reaches_a_radosgw_that_never_sends_one() {
    let straight = object_content(7, 2 << 20);
    let proxied = object_content(8, 3 << 20);
    upload_reaches_a_radosgw_that_never_sends_continue(&straight, &proxied).await;
}

/// With `backend.expect_continue_timeout`, a body that expects `100` goes
/// to a radosgw that never sends one, and is stored; its connection is not
/// reused.
async fn upload_reaches_a_radosgw_that_never_sends_continue(straight: &[u8], proxied: &[u8]) {
    let gateway = RadosGw::start_with(&[("rgw_print_continue", "false")])
        .await
        .unwrap();
    let s3 = s3_client(&gateway.endpoint());
    s3.create_bucket()
        .bucket("no-continue")
        .send()
        .await
        .unwrap();
    let proxy = ProxyUnderTest::start_with(
        gateway.address,
        "expect_continue_timeout = \"1s\"",
        // One lane: one pool, which a reusable connection goes back to.
        "[listener]\nthreads = 1",
    )
    .await
    .unwrap();
    let host = gateway.address.to_string();
    let connections = || async {
        support::metric_sample(
            &proxy.admin.metrics().await,
            "s3fp_backend_connections_total",
        )
        .unwrap_or(0.0)
    };

    let direct = put_expecting_continue(gateway.address, &host, straight).await;
    assert_eq!(direct, 200);
    let status = put_expecting_continue(proxy.address, &host, proxied).await;
    assert_eq!(status, direct);
    assert!(
        read_object(&s3, "no-continue", "object").await == proxied,
        "the object stored is not the one sent"
    );
    // The body went unasked: radosgw may not have read it, whatever it
    // answered, so its connection is not reused for the next request.
    let before = connections().await;
    let again = put_expecting_continue(proxy.address, &host, b"again").await;
    assert_eq!(again, 200);
    assert_eq!(
        connections().await,
        before + 1.0,
        "a new backend connection"
    );
}
