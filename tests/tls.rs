//! TLS at the edge and towards the backend: HTTPS clients (aws-sdk-s3 and an
//! HTTP/2 client) through restarts, certificate rotation and a broken
//! certificate while requests are held, an HTTPS-only backend with its own CA,
//! a client that speaks garbage instead of TLS, and request heads that need
//! another kind of hyper connection on a connection that served requests.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ChecksumAlgorithm;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::tls::{
    TestCa, TlsFront, h2_connect, http1_connect, https_proxy, s3_client_tls, write_pair,
};
use support::{
    ProxyUnderTest, S3Backend, metric_sample, object_content, raw_request, read_response,
    s3_client, sign_unsigned_payload, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn https_endpoint(proxy: &ProxyUnderTest) -> String {
    format!("https://localhost:{}", proxy.tls_address.unwrap().port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_over_https_with_checksums() {
    let backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend.address, &ca, "").await;
    let s3 = s3_client_tls(&https_endpoint(&proxy), &ca);
    s3.create_bucket().bucket("secure").send().await.unwrap();
    let content = object_content(3, 2 << 20);
    s3.put_object()
        .bucket("secure")
        .key("k")
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .body(ByteStream::from(content.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        support::read_object(&s3, "secure", "k").await,
        content.as_slice()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_restarts_cost_https_clients_no_failure() {
    let mut backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend.address, &ca, "").await;
    let s3 = s3_client_tls(&https_endpoint(&proxy), &ca);
    s3.create_bucket().bucket("restarts").send().await.unwrap();

    let writer = tokio::spawn({
        let s3 = s3.clone();
        async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            let mut results = Vec::new();
            for n in 0..40 {
                ticker.tick().await;
                let s3 = s3.clone();
                results.push(tokio::spawn(async move {
                    s3.put_object()
                        .bucket("restarts")
                        .key(format!("k{n}"))
                        .body(ByteStream::from(object_content(n, 1024)))
                        .send()
                        .await
                        .map(|_| ())
                }));
            }
            let mut failures = Vec::new();
            for result in results {
                if let Err(error) = result.await.unwrap() {
                    failures.push(format!("{error:?}"));
                }
            }
            failures
        }
    });
    for _ in 0..2 {
        // Traffic, then a crash and a downtime: the timing is the scenario.
        tokio::time::sleep(Duration::from_millis(800)).await;
        backend.kill9();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        backend.restart().await.unwrap();
    }
    let failures = writer.await.unwrap();
    assert!(failures.is_empty(), "failed over TLS: {failures:?}");
    for n in 0..40 {
        let got = s3
            .get_object()
            .bucket("restarts")
            .key(format!("k{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            got.body.collect().await.unwrap().into_bytes().as_ref(),
            object_content(n, 1024).as_slice()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_connections_and_held_requests_survive() {
    let mut backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend.address, &ca, "").await;
    let tls_address = proxy.tls_address.unwrap();
    let before = ca.presented_certificate(tls_address).await.unwrap();
    let s3 = s3_client_tls(&https_endpoint(&proxy), &ca);
    s3.create_bucket().bucket("rotation").send().await.unwrap();

    backend.kill9();
    let held = tokio::spawn({
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("rotation")
                .key("held")
                .body(ByteStream::from_static(b"held across a rotation"))
                .send()
                .await
        }
    });
    proxy.admin.wait_held(1).await;

    // cert-manager writes a new pair for the same files.
    let renewed = ca.issue("renewed", &["localhost", "127.0.0.1"]);
    let edge = ca.dir.path();
    write_pair(
        &edge.join("edge.crt"),
        &std::fs::read_to_string(&renewed.cert).unwrap(),
        &edge.join("edge.key"),
        &std::fs::read_to_string(&renewed.key).unwrap(),
    );
    wait_until(
        Duration::from_secs(10),
        "new handshakes to present the new certificate",
        || async { ca.presented_certificate(tls_address).await.ok() == Some(renewed.der.clone()) },
    )
    .await
    .unwrap();
    assert_ne!(before, renewed.der);
    assert_eq!(
        proxy.admin.held().await,
        1,
        "the held request is still held"
    );

    backend.restart().await.unwrap();
    held.await
        .unwrap()
        .expect("the request held across the rotation succeeds");
    let metrics = proxy.admin.metrics().await;
    assert_eq!(
        metric_sample(
            &metrics,
            "s3fp_tls_certificate_reloads_total{result=\"success\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_file_is_rejected_and_the_old_pair_keeps_serving() {
    let backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend.address, &ca, "").await;
    let tls_address = proxy.tls_address.unwrap();
    let before = ca.presented_certificate(tls_address).await.unwrap();

    std::fs::write(
        ca.dir.path().join("edge.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the broken pair to be rejected",
        || async {
            metric_sample(
                &proxy.admin.metrics().await,
                "s3fp_tls_certificate_reloads_total{result=\"failure\"}",
            )
            .is_some_and(|failures| failures >= 1.0)
        },
    )
    .await
    .unwrap();
    assert_eq!(ca.presented_certificate(tls_address).await.unwrap(), before);
    let s3 = s3_client_tls(&https_endpoint(&proxy), &ca);
    s3.create_bucket()
        .bucket("still-served")
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_is_held_through_an_outage() {
    let mut backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend.address, &ca, "").await;
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("http2")
        .send()
        .await
        .unwrap();
    let tls_address = proxy.tls_address.unwrap();
    let mut h2 = h2_connect(tls_address, &ca).await.unwrap();

    backend.kill9();
    let host = format!("localhost:{}", tls_address.port());
    let url = format!("https://{host}/http2/object");
    let body = Bytes::from(object_content(5, 300_000));
    let length = body.len().to_string();
    let mut request = http::Request::builder()
        .method("PUT")
        .uri(&url)
        .version(http::Version::HTTP_2)
        .header("content-length", &length);
    for (name, value) in support::sign_unsigned_payload("PUT", &url, &host, &[]) {
        if name != "host" {
            request = request.header(name, value);
        }
    }
    let put = h2.send_request(request.body(Full::new(body.clone())).unwrap());
    let put = tokio::spawn(put);
    proxy.admin.wait_held(1).await;
    backend.restart().await.unwrap();
    let response = put.await.unwrap().unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(
        response.status(),
        200,
        "{:?}",
        response.into_body().collect().await.unwrap().to_bytes()
    );

    let got = s3_client(&proxy.endpoint())
        .get_object()
        .bucket("http2")
        .key("object")
        .send()
        .await
        .unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_only_backend_with_its_own_ca_is_proxied_and_probed_over_tls() {
    let mut backend = S3Backend::start().await.unwrap();
    let backend_ca = TestCa::new("backend CA");
    let backend_files = backend_ca.issue("backend", &["s3gw.test"]);
    let mut front = TlsFront::start(backend.address, &backend_files).await;
    let config = format!(
        "[backend]\naddress = \"{}\"\n[backend.tls]\nca = \"{}\"\nserver_name = \"s3gw.test\"\n",
        front.address,
        backend_ca.ca_file().display()
    );
    let text = config.clone();
    let proxy = ProxyUnderTest::start_raw(&text).await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket()
        .bucket("tls-backend")
        .send()
        .await
        .unwrap();

    front.kill();
    backend.kill9();
    let put = tokio::spawn({
        let s3 = s3.clone();
        async move {
            s3.put_object()
                .bucket("tls-backend")
                .key("k")
                .body(ByteStream::from_static(b"through TLS"))
                .send()
                .await
        }
    });
    proxy.admin.wait_held(1).await;
    backend.restart().await.unwrap();
    front.restart().await;
    put.await
        .unwrap()
        .expect("held until the HTTPS backend handshakes again");
    assert_eq!(
        support::read_object(&s3, "tls-backend", "k").await,
        b"through TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_certificate_is_not_trusted_is_not_up() {
    let backend = S3Backend::start().await.unwrap();
    let (trusted, other) = (TestCa::new("trusted CA"), TestCa::new("other CA"));
    let files = other.issue("backend", &["s3gw.test"]);
    let front = TlsFront::start(backend.address, &files).await;
    let config = format!(
        "[backend]\naddress = \"{}\"\n[backend.tls]\nca = \"{}\"\nserver_name = \"s3gw.test\"\n[hold]\ntimeout = \"500ms\"\n",
        front.address,
        trusted.ca_file().display()
    );
    let proxy = ProxyUnderTest::start_raw(&config).await.unwrap();
    let (status, body) = raw_request(proxy.address, "GET", "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        proxy.admin.status().await["state"],
        "down",
        "a failed handshake is not frontend-up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_handshake_closes_that_connection_only() {
    let backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend.address, &ca, "").await;
    let mut garbage = tokio::net::TcpStream::connect(proxy.tls_address.unwrap())
        .await
        .unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the proxy closes the connection");
    assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"));
    assert_eq!(
        metric_sample(
            &proxy.admin.metrics().await,
            "s3fp_tls_handshake_failures_total"
        ),
        Some(1.0)
    );

    let s3 = s3_client_tls(&https_endpoint(&proxy), &ca);
    s3.create_bucket()
        .bucket("unaffected")
        .send()
        .await
        .unwrap();
}

/// A signed request (payload unsigned) for `path` on `host`, with `extra`
/// unsigned fields.
fn signed_request(host: &str, method: &str, path: &str, extra: &str, body: &str) -> Vec<u8> {
    let url = format!("https://{host}{path}");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in sign_unsigned_payload(method, &url, host, &[]) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n{extra}\r\n", body.len()));
    [head.as_bytes(), body.as_bytes()].concat()
}

/// Over HTTPS, where a connection never rests, a head that needs another
/// kind of hyper connection (one over 16 KiB, so in more than one TLS
/// record and read; one of more than 100 fields) is served after requests
/// on the same connection, as over plain HTTP (`src/round_kind.rs`).
/// (s3s-fs answers more than 100 fields with its own `431`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_heads_and_heads_of_many_fields_are_served_on_a_used_https_connection() {
    let backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(backend.address, &ca, "").await;
    let address = proxy.tls_address.unwrap();
    let host = address.to_string();
    let mut tls = http1_connect(address, &ca).await.unwrap();
    let mut exchange = async |request: Vec<u8>| {
        tls.write_all(&request).await.unwrap();
        let answer = read_response(&mut tls);
        tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .expect("answered")
    };
    let put = |path: &str, body: &str| signed_request(&host, "PUT", path, "", body);
    let get = |extra: &str| signed_request(&host, "GET", "/rounds/k", extra, "");
    assert_eq!(exchange(put("/rounds", "")).await.0, 200);
    assert_eq!(exchange(put("/rounds/k", "value")).await.0, 200);
    let value = (200, "value".to_owned());
    assert_eq!(exchange(get("")).await, value);
    let long = format!("X-Pad: {}\r\n", "p".repeat(20 << 10));
    assert_eq!(exchange(get(&long)).await, value, "a 20 KiB head");
    assert_eq!(exchange(get("")).await, value);
    let many: String = (0..100).map(|n| format!("X-Extra-{n}: {n}\r\n")).collect();
    assert_eq!(exchange(get(&many)).await.0, 431, "s3s-fs's answer");
}
