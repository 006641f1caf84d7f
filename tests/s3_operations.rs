//! Plain S3 traffic through the proxy, with a real backend and a real SDK:
//! every operation an S3 application uses arrives byte-exact (signatures
//! verify, checksums match).

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use support::{ProxyUnderTest, S3Backend, metric_sample, object_content, s3_client};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_head_list_delete_pass_through_with_checksums() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());

    s3.create_bucket().bucket("plain").send().await.unwrap();
    let content = object_content(1, 300_000);
    let put = s3
        .put_object()
        .bucket("plain")
        .key("dir/object one.bin")
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .body(ByteStream::from(content.clone()))
        .send()
        .await
        .unwrap();
    assert!(put.e_tag().is_some());

    let head = s3
        .head_object()
        .bucket("plain")
        .key("dir/object one.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(content.len() as i64));

    let got = s3
        .get_object()
        .bucket("plain")
        .key("dir/object one.bin")
        .send()
        .await
        .unwrap();
    assert_eq!(got.e_tag(), put.e_tag());
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        content.as_slice()
    );

    let listed = s3
        .list_objects_v2()
        .bucket("plain")
        .prefix("dir/")
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["dir/object one.bin"]);

    s3.delete_object()
        .bucket("plain")
        .key("dir/object one.bin")
        .send()
        .await
        .unwrap();
    let gone = s3
        .head_object()
        .bucket("plain")
        .key("dir/object one.bin")
        .send()
        .await;
    assert!(gone.is_err(), "deleted object is gone");
    proxy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_is_assembled_exactly() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("multi").send().await.unwrap();

    let upload = s3
        .create_multipart_upload()
        .bucket("multi")
        .key("big")
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap();
    let parts: Vec<Vec<u8>> = vec![
        object_content(1, 5 << 20),
        object_content(2, 5 << 20),
        object_content(3, 1000),
    ];
    let mut completed = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        let number = index as i32 + 1;
        let uploaded = s3
            .upload_part()
            .bucket("multi")
            .key("big")
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(part.clone()))
            .send()
            .await
            .unwrap();
        completed.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(uploaded.e_tag().unwrap())
                .build(),
        );
    }
    s3.complete_multipart_upload()
        .bucket("multi")
        .key("big")
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send()
        .await
        .unwrap();

    let got = s3
        .get_object()
        .bucket("multi")
        .key("big")
        .send()
        .await
        .unwrap();
    let body = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(body.len(), parts.iter().map(Vec::len).sum::<usize>());
    assert_eq!(body.as_ref(), parts.concat().as_slice());
    proxy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_chunked_upload_with_signed_chunks_and_a_crc_trailer_verifies() {
    // A streamed body makes the SDK send `Content-Encoding: aws-chunked` with
    // per-chunk signatures (STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER) and a
    // CRC32 trailer: one altered byte and the backend refuses the upload.
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("chunked").send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload.bin");
    let content = object_content(9, 3 << 20);
    std::fs::write(&path, &content).unwrap();

    s3.put_object()
        .bucket("chunked")
        .key("streamed")
        .body(ByteStream::from_path(&path).await.unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        support::read_object(&s3, "chunked", "streamed").await,
        content.as_slice()
    );
}

/// Connections the proxy has opened to the backend so far.
async fn backend_connections_opened(proxy: &ProxyUnderTest) -> f64 {
    metric_sample(
        &proxy.admin.metrics().await,
        "s3fp_backend_connections_total",
    )
    .expect("the connection counter is exposed")
}

/// s3s-fs behind the proxy, with `bucket/object` (1 KiB of `object_content(seed, ..)`)
/// stored through it; the object's bytes come back with them.
async fn one_object_through_the_proxy(
    bucket: &str,
    seed: usize,
) -> (S3Backend, ProxyUnderTest, aws_sdk_s3::Client, Vec<u8>) {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket(bucket).send().await.unwrap();
    let content = object_content(seed, 1024);
    s3.put_object()
        .bucket(bucket)
        .key("object")
        .body(ByteStream::from(content.clone()))
        .send()
        .await
        .unwrap();
    (backend, proxy, s3, content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_after_another_reuses_the_backend_connection() {
    let (_backend, proxy, s3, content) = one_object_through_the_proxy("reuse", 2).await;

    let requests = 20;
    for _ in 0..requests {
        let got = s3
            .get_object()
            .bucket("reuse")
            .key("object")
            .send()
            .await
            .unwrap();
        assert_eq!(got.body.collect().await.unwrap().into_bytes(), content);
    }

    let opened = backend_connections_opened(&proxy).await;
    assert!(
        opened <= 3.0,
        "{opened} backend connections for {} sequential requests",
        requests + 2
    );
    proxy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upload_after_another_reuses_the_backend_connection() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("uploads").send().await.unwrap();

    let uploads = 20;
    for i in 0..uploads {
        let content = object_content(i, 1024);
        s3.put_object()
            .bucket("uploads")
            .key(format!("object-{i}"))
            .body(ByteStream::from(content.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            support::read_object(&s3, "uploads", &format!("object-{i}")).await,
            content.as_slice()
        );
    }

    let opened = backend_connections_opened(&proxy).await;
    assert!(
        opened <= 3.0,
        "{opened} backend connections for {} sequential uploads and reads",
        uploads * 2 + 1
    );
    proxy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_at_once_keep_their_backend_connections_for_the_next_ones() {
    let (backend, proxy, s3, _) = one_object_through_the_proxy("busy", 3).await;
    let request = support::presigned_get(&s3, "busy", "object").await;
    let opened = || backend_connections_opened(&proxy);

    // 100 clients (more than 64, fewer than the connections the stopped
    // backend's listen queue takes), each with a GET, twice; while the
    // backend is stopped (SIGSTOP) all 100 wait on it at once, each on a
    // backend connection of its own.
    let clients: u16 = 100;
    let mut connections = Vec::new();
    for _ in 0..clients {
        connections.push(tokio::net::TcpStream::connect(proxy.address).await.unwrap());
    }
    let mut opened_by_first = 0.0;
    for round in 0..2 {
        backend.freeze();
        for connection in &mut connections {
            connection.write_all(&request).await.unwrap();
        }
        proxy
            .admin
            .wait_metric("s3fp_backend_in_flight_requests", f64::from(clients))
            .await;
        if round == 0 {
            opened_by_first = opened().await;
        }
        backend.thaw();
        for connection in &mut connections {
            let (status, _) = support::read_response(connection).await;
            assert_eq!(status, 200);
        }
    }
    assert_eq!(
        opened().await,
        opened_by_first,
        "the second round found the first one's backend connections kept"
    );
    proxy.stop().await.unwrap();
}

/// A chunked PUT (no `Content-Length`) to a presigned URL.
async fn chunked_put(s3: &aws_sdk_s3::Client, key: &str, body: &[u8]) -> Vec<u8> {
    let presigned = s3
        .put_object()
        .bucket("versions")
        .key(key)
        .presigned(
            aws_sdk_s3::presigning::PresigningConfig::expires_in(std::time::Duration::from_secs(
                300,
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let uri: http::Uri = presigned.uri().parse().unwrap();
    let mut bytes = format!(
        "PUT {} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        uri.path_and_query().unwrap(),
        uri.authority().unwrap(),
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes.extend_from_slice(b"\r\n0\r\n\r\n");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_keep_alive_client_does_not_downgrade_later_clients() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "").await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("versions").send().await.unwrap();

    // An old client: HTTP/1.0 with keep-alive, answered in HTTP/1.0.
    let mut old = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
    old.write_all(b"GET /versions HTTP/1.0\r\nConnection: keep-alive\r\nHost: s3\r\n\r\n")
        .await
        .unwrap();
    support::read_response(&mut old).await;

    // Later clients speak HTTP/1.1 with chunked bodies, one after another.
    for i in 0..3 {
        let body = object_content(i, 1000);
        let mut client = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
        let put = chunked_put(&s3, &format!("k{i}"), &body).await;
        client.write_all(&put).await.unwrap();
        let (status, answer) = support::read_response(&mut client).await;
        assert_eq!(status, 200, "{answer}");
        let stored = s3
            .get_object()
            .bucket("versions")
            .key(format!("k{i}"))
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        assert_eq!(stored.len(), body.len(), "the whole chunked body is stored");
        assert_eq!(stored.as_ref(), body.as_slice());
    }
}
