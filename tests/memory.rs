//! Bodies of any size stream through in bounded memory: the proxy process
//! never holds more than a few buffers of an upload or a download.

mod support;

use bytes::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{ChunkFeed, ProxyProcess, S3Backend, s3_client, sign_unsigned_payload};

const CHUNK: usize = 1 << 20;
const CHUNKS: usize = 512;
/// Far below the object size, far above what a streaming proxy needs.
const MEMORY_LIMIT: u64 = 64 << 20;

/// Chunk `i` of the object: a fixed pattern stamped with its index, so a
/// lost, repeated or reordered chunk shows.
fn chunk(i: usize) -> Bytes {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let mut bytes = PATTERN
        .get_or_init(|| (0..CHUNK).map(|b| (b % 251) as u8).collect())
        .clone();
    bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Bytes::from(bytes)
}

/// PUTs the object with a streamed, unsigned-payload body of known length.
async fn upload(proxy: &ProxyProcess, path: &str) -> u16 {
    let host = proxy.address().to_string();
    let url = format!("http://{host}{path}");
    let mut request = http::Request::builder()
        .method("PUT")
        .uri(&url)
        .header("content-length", (CHUNK * CHUNKS).to_string());
    for (name, value) in sign_unsigned_payload("PUT", &url, &host, &[]) {
        request = request.header(name, value);
    }
    let (feed, body) = tokio::sync::mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        for i in 0..CHUNKS {
            feed.send(chunk(i)).await.unwrap();
        }
    });
    let client: Client<_, ChunkFeed> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request.body(ChunkFeed(body)).unwrap())
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_512_mib_upload_and_download_stream_through_in_bounded_memory() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&format!("[backend]\naddress = \"{}\"\n", backend.address))
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("large").send().await.unwrap();

    assert_eq!(upload(&proxy, "/large/object").await, 200);
    let after_upload = proxy.peak_resident_bytes();

    let got = s3
        .get_object()
        .bucket("large")
        .key("object")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_length(), Some((CHUNK * CHUNKS) as i64));
    let mut body = got.body;
    let (mut pending, mut index) = (Vec::with_capacity(CHUNK), 0);
    while let Some(bytes) = body.next().await {
        pending.extend_from_slice(&bytes.unwrap());
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
        (CHUNKS, 0),
        "whole object read back"
    );

    let peak = proxy.peak_resident_bytes();
    eprintln!("proxy peak resident memory: {} KiB", peak >> 10);
    assert!(
        after_upload < MEMORY_LIMIT && peak < MEMORY_LIMIT,
        "proxy peak resident memory: {} MiB after the upload, {} MiB after the download",
        after_upload >> 20,
        peak >> 20
    );
}
