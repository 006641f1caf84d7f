//! A write whose answer was lost is settled by reading it back, exactly once.
//!
//! Between the proxy and the backend (s3s-fs; radosgw with a versioned
//! bucket, where a write stored twice is two versions) stands a front of the
//! test's own that counts the request lines reaching the backend and, for
//! one chosen request, either loses the backend's answer (the backend stored
//! the write, or may have: the test then SIGKILLs and restarts it, the answer
//! is gone for good) or holds back the body's last byte until the test has
//! frozen the backend with SIGSTOP (the backend finishes the write only once
//! thawed, as a paused pod would).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::BodyExt;
use md5::{Digest, Md5};
use support::radosgw::RadosGw;
use support::{
    ProxyUnderTest, REGION, S3Backend, SECRET_KEY, metric_sample, s3_client, s3_code,
    sign_unsigned_payload, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const BUCKET: &str = "settle";

/// The series that is 1 while the proxy's gate is down (an outage seen).
const GATE_DOWN: &str = "s3fp_gate_state{state=\"down\"}";

/// What the front does to the one request it watches for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Forwards the request whole, drops the backend's answer to it; the
    /// point is reached once the backend answered (it executed the write).
    LoseAnswer,
    /// The same, but the point is reached once the body's last byte is on
    /// its way to the backend, whether or not the backend has executed it.
    LoseAnswerOnceSent,
    /// Holds back the body's last byte until [`Front::go`].
    WithholdLastByte,
    /// Never forwards the request (a bodiless one, read whole), and keeps
    /// the connection open until the backend's side closes (the test kills
    /// the backend); its line is not counted.
    Swallow,
}

/// A relay in front of the backend that counts request lines and meddles
/// with the first request whose line starts with its trigger.
struct Front {
    address: SocketAddr,
    shared: Arc<FrontShared>,
}

struct FrontShared {
    backend: SocketAddr,
    plan: Plan,
    trigger: String,
    armed: AtomicBool,
    /// The watched request reached its chosen point.
    reached: Notify,
    go: Notify,
    lines: Mutex<Vec<String>>,
    /// The watched request's head, as the client's SDK wrote it.
    head: Mutex<String>,
}

impl Front {
    async fn start(backend: SocketAddr, plan: Plan, trigger: &str) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(FrontShared {
            backend,
            plan,
            trigger: trigger.to_owned(),
            armed: AtomicBool::new(true),
            reached: Notify::new(),
            go: Notify::new(),
            lines: Mutex::default(),
            head: Mutex::default(),
        });
        let serving = Arc::clone(&shared);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, Arc::clone(&serving)));
            }
        });
        Front { address, shared }
    }

    async fn reached(&self) {
        self.shared.reached.notified().await;
    }

    fn go(&self) {
        self.shared.go.notify_one();
    }

    /// How many request lines starting with `prefix` reached the backend.
    fn count(&self, prefix: &str) -> usize {
        let lines = self.shared.lines.lock().unwrap();
        lines.iter().filter(|line| line.starts_with(prefix)).count()
    }

    /// The value of `name` in the watched request's head, lower-cased.
    fn watched_field(&self, name: &str) -> Option<String> {
        let head = self.shared.head.lock().unwrap();
        head.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_ascii_lowercase())
        })
    }
}

async fn relay(mut client: TcpStream, shared: Arc<FrontShared>) {
    let Ok(mut upstream) = TcpStream::connect(shared.backend).await else {
        return;
    };
    let watched = AtomicBool::new(false);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let requests = async {
        let mut buffer = vec![0u8; 64 << 10];
        // Body bytes of the watched request still to come.
        let mut remaining: Option<usize> = None;
        loop {
            let n = client_read.read(&mut buffer).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let mut read = &buffer[..n];
            let lines = request_lines(read);
            let triggered = lines.iter().any(|l| l.starts_with(&shared.trigger))
                && shared.armed.swap(false, Ordering::SeqCst);
            if triggered && shared.plan == Plan::Swallow {
                shared.reached.notify_one();
                std::future::pending::<()>().await;
            }
            shared.lines.lock().unwrap().extend(lines.iter().cloned());
            if triggered {
                watched.store(true, Ordering::SeqCst);
                let head_end = find(read, b"\r\n\r\n").unwrap() + 4;
                *shared.head.lock().unwrap() =
                    String::from_utf8_lossy(&read[..head_end]).into_owned();
                remaining = Some(content_length(&read[..head_end]) + head_end);
            }
            let mut body_ends = false;
            if let Some(left) = remaining {
                if read.len() >= left {
                    remaining = None;
                    body_ends = true;
                    if shared.plan == Plan::WithholdLastByte {
                        let (most, last) = read.split_at(left - 1);
                        if upstream_write.write_all(most).await.is_err() {
                            return;
                        }
                        shared.reached.notify_one();
                        shared.go.notified().await;
                        read = last;
                    }
                } else {
                    remaining = Some(left - read.len());
                }
            }
            if upstream_write.write_all(read).await.is_err() {
                return;
            }
            if body_ends && shared.plan == Plan::LoseAnswerOnceSent {
                shared.reached.notify_one();
            }
        }
    };
    let responses = async {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = upstream_read.read(&mut buffer).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if shared.plan != Plan::WithholdLastByte && watched.load(Ordering::SeqCst) {
                // The answer is lost: read and drop it until the backend dies.
                if shared.plan == Plan::LoseAnswer {
                    shared.reached.notify_one();
                }
                continue;
            }
            if client_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = responses => {}
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// The request lines (`PUT /bucket/key HTTP/1.1`) in a read.
fn request_lines(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| line.ends_with(b" HTTP/1.1\r"))
        .map(|line| String::from_utf8_lossy(&line[..line.len() - 1]).into_owned())
        .collect()
}

/// The `[settle]` section with the test user's key, its secret in a file.
fn settle_section(dir: &std::path::Path) -> String {
    let secret = dir.join("settle-secret");
    support::write_secret(&secret, SECRET_KEY);
    format!(
        "[settle]\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\nregion = \"{REGION}\"\n",
        support::ACCESS_KEY,
        secret.display()
    )
}

/// The proxy in front of `front`, quick to notice a hang, holding up to 30 s.
async fn proxy(front: &Front, dir: &std::path::Path, settle: bool) -> ProxyUnderTest {
    let section = if settle {
        settle_section(dir)
    } else {
        String::new()
    };
    ProxyUnderTest::start_with(
        front.address,
        "response_timeout = \"500ms\"",
        &format!("[probe]\ntimeout = \"200ms\"\n[hold]\ntimeout = \"30s\"\n{section}"),
    )
    .await
    .unwrap()
}

fn md5_of(bytes: &[u8]) -> [u8; 16] {
    Md5::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// CRC-32 (ISO-HDLC, as S3's `x-amz-checksum-crc32`), big-endian.
fn crc32(bytes: &[u8]) -> [u8; 4] {
    let table: Vec<u32> = (0..256u32)
        .map(|mut c| {
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            c
        })
        .collect();
    let crc = bytes.iter().fold(0xFFFF_FFFFu32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8)
    });
    (!crc).to_be_bytes()
}

fn content(size: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

async fn settles(proxy: &ProxyUnderTest, outcome: &str) -> f64 {
    let series = format!("s3fp_write_settles_total{{outcome=\"{outcome}\"}}");
    metric_sample(&proxy.admin.metrics().await, &series).unwrap_or(0.0)
}

/// Runs `write` through a front that loses its answer; SIGKILLs and
/// restarts the backend once the backend has answered it.
///
/// The restart waits until the proxy saw the outage (its gate down): a
/// backend back before the proxy looks is a failure of one request, not an
/// outage, and is answered `502`.
async fn across_a_lost_answer<T: Send + 'static>(
    setup: &mut Setup,
    write: impl Future<Output = T> + Send + 'static,
) -> T {
    let running = tokio::spawn(write);
    setup.front.reached().await;
    setup.backend.kill9();
    setup.proxy.admin.wait_metric(GATE_DOWN, 1.0).await;
    setup.backend.restart().await.unwrap();
    running.await.unwrap()
}

struct Setup {
    backend: S3Backend,
    front: Front,
    proxy: ProxyUnderTest,
    dir: tempfile::TempDir,
}

async fn setup(plan: Plan, trigger: &str, settle: bool) -> Setup {
    let backend = S3Backend::start().await.unwrap();
    let front = Front::start(backend.address, plan, trigger).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(&front, dir.path(), settle).await;
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    Setup {
        backend,
        front,
        proxy,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_put_with_content_md5_whose_answer_was_lost_is_answered_as_stored() {
    let mut setup = setup(Plan::LoseAnswer, "PUT /settle/big-md5", true).await;
    let body = content(64 << 20, 1);
    let md5 = md5_of(&body);
    let declared = BASE64.encode(md5);
    let proxy_address = setup.proxy.address;
    let sent = body.clone();
    let write = async move {
        let proxy = ProxyAt(proxy_address);
        proxy
            .put("big-md5", sent, &[("content-md5", &declared)])
            .await
    };
    let response = across_a_lost_answer(&mut setup, write).await;
    assert_eq!(response.status(), 200, "{:?}", response.body());
    assert_eq!(response.headers()["etag"], format!("\"{}\"", hex(&md5)));
    assert_eq!(setup.front.count("PUT /settle/big-md5"), 1, "sent once");
    assert_eq!(settles(&setup.proxy, "stored").await, 1.0);
    let stored = support::read_object(&s3_client(&setup.proxy.endpoint()), BUCKET, "big-md5").await;
    assert!(stored == body, "the object is the client's bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_with_a_crc32_header_whose_answer_was_lost_is_answered_as_stored() {
    let mut setup = setup(Plan::LoseAnswer, "PUT /settle/crc32", true).await;
    let body = content(4 << 20, 2);
    let declared = BASE64.encode(crc32(&body));
    let proxy_address = setup.proxy.address;
    let sent = body.clone();
    let value = declared.clone();
    let write = async move {
        let proxy = ProxyAt(proxy_address);
        proxy
            .put("crc32", sent, &[("x-amz-checksum-crc32", &value)])
            .await
    };
    let response = across_a_lost_answer(&mut setup, write).await;
    assert_eq!(response.status(), 200, "{:?}", response.body());
    assert_eq!(
        response.headers()["x-amz-checksum-crc32"],
        declared.as_str()
    );
    assert_eq!(
        response.headers()["etag"],
        format!("\"{}\"", hex(&md5_of(&body)))
    );
    assert_eq!(setup.front.count("PUT /settle/crc32"), 1);
    assert_eq!(settles(&setup.proxy, "stored").await, 1.0);
}

/// A key that must be escaped in the path is read back under the same
/// escaping (the read-back's signature covers the path as sent, encoded
/// once, not normalised).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_a_key_that_needs_escaping_is_settled_too() {
    const KEY: &str = "odd key+\u{fc}&c";
    const ESCAPED: &str = "odd%20key%2B%C3%BC%26c";
    let mut setup = setup(Plan::LoseAnswer, &format!("PUT /settle/{ESCAPED}"), true).await;
    let body = content(4 << 20, 12);
    let s3 = s3_client(&setup.proxy.endpoint());
    let sent = body.clone();
    let write = async move {
        s3.put_object()
            .bucket(BUCKET)
            .key(KEY)
            .body(sent.to_vec().into())
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
            .send()
            .await
    };
    let settled = tokio::time::timeout(
        Duration::from_secs(60),
        across_a_lost_answer(&mut setup, write),
    )
    .await
    .expect("the write reached the front");
    settled.expect("answered as stored");
    assert_eq!(setup.front.count(&format!("PUT /settle/{ESCAPED}")), 1);
    assert_eq!(settles(&setup.proxy, "stored").await, 1.0);
    let stored = support::read_object(&s3_client(&setup.proxy.endpoint()), BUCKET, KEY).await;
    assert!(stored == body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_put_without_a_checksum_is_proven_by_the_md5_of_its_copy_not_replayed() {
    let mut setup = setup(Plan::LoseAnswer, "PUT /settle/kept", true).await;
    let body = content(100 << 10, 7);
    let proxy_address = setup.proxy.address;
    let sent = body.clone();
    let write = async move { ProxyAt(proxy_address).put("kept", sent, &[]).await };
    let response = across_a_lost_answer(&mut setup, write).await;
    assert_eq!(response.status(), 200, "{:?}", response.body());
    assert_eq!(
        response.headers()["etag"],
        format!("\"{}\"", hex(&md5_of(&body)))
    );
    assert_eq!(setup.front.count("PUT /settle/kept"), 1, "not replayed");
    assert_eq!(settles(&setup.proxy, "stored").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_without_a_checksum_and_not_kept_stays_503() {
    let mut setup = setup(Plan::LoseAnswer, "PUT /settle/no-proof", true).await;
    let body = content(4 << 20, 3);
    let proxy_address = setup.proxy.address;
    let write = async move { ProxyAt(proxy_address).put("no-proof", body, &[]).await };
    let response = across_a_lost_answer(&mut setup, write).await;
    assert_eq!(response.status(), 503);
    assert_eq!(s3_code(response.body()), "ServiceUnavailable");
    assert_eq!(
        setup.front.count("PUT /settle/no-proof"),
        1,
        "never replayed"
    );
    assert_eq!(settles(&setup.proxy, "no_proof").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_multipart_upload_whose_answer_was_lost_is_answered_with_its_result() {
    let mut setup = setup(Plan::LoseAnswer, "POST /settle/multi?uploadId", true).await;
    let s3 = s3_client(&setup.proxy.endpoint());
    let upload = s3
        .create_multipart_upload()
        .bucket(BUCKET)
        .key("multi")
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap().to_owned();
    let parts = [content(5 << 20, 4), content(1 << 10, 5)];
    let mut completed = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        let number = index as i32 + 1;
        let uploaded = s3
            .upload_part()
            .bucket(BUCKET)
            .key("multi")
            .upload_id(&upload_id)
            .part_number(number)
            .body(part.clone().into())
            .send()
            .await
            .unwrap();
        completed.push(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(number)
                .e_tag(uploaded.e_tag().unwrap())
                .build(),
        );
    }
    let digests: Vec<u8> = parts.iter().flat_map(|p| md5_of(p)).collect();
    let expected = format!("\"{}-2\"", hex(&md5_of(&digests)));
    let complete = s3
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key("multi")
        .upload_id(&upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send();
    let result = across_a_lost_answer(&mut setup, complete).await;
    let result = result.expect("the Complete result");
    assert_eq!(result.e_tag(), Some(expected.as_str()));
    assert_eq!(result.key(), Some("multi"));
    assert_eq!(setup.front.count("POST /settle/multi?uploadId"), 1);
    assert_eq!(settles(&setup.proxy, "stored").await, 1.0);
}

/// Puts `body` at `key` through the proxy (an SDK PutObject), its ETag.
async fn put_source(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, body: &Bytes) -> String {
    let put = s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap();
    put.e_tag().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_object_whose_answer_was_lost_is_answered_with_its_result() {
    let mut setup = setup(Plan::LoseAnswer, "PUT /settle/copy-destination", true).await;
    let s3 = s3_client(&setup.proxy.endpoint());
    let body = content(3 << 20, 13);
    let etag = put_source(&s3, BUCKET, "copy-source", &body).await;
    let copy = s3
        .copy_object()
        .bucket(BUCKET)
        .key("copy-destination")
        .copy_source(format!("{BUCKET}/copy-source"))
        .copy_source_if_match(&etag)
        .send();
    let result = across_a_lost_answer(&mut setup, copy)
        .await
        .expect("the CopyObject result");
    let copied = result.copy_object_result().expect("a CopyObjectResult");
    assert_eq!(copied.e_tag(), Some(etag.as_str()));
    assert!(copied.last_modified().is_some());
    assert_eq!(
        setup.front.count("PUT /settle/copy-destination"),
        1,
        "sent once"
    );
    assert_eq!(settles(&setup.proxy, "stored").await, 1.0);
    let stored = support::read_object(&s3, BUCKET, "copy-destination").await;
    assert!(stored == body, "the copy is the source's bytes");
}

/// A copy of an object onto itself (a metadata update in place) sent but
/// never executed (the backend crashed first): its destination carries the
/// source's ETag, as it would had the copy run, so it is not settled (the
/// ETag proves nothing) but sent again, and the metadata is the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_onto_itself_that_never_ran_is_sent_again_not_taken_for_done() {
    let mut setup = setup(Plan::Swallow, "PUT /settle/in-place?x-id=CopyObject", true).await;
    let s3 = s3_client(&setup.proxy.endpoint());
    s3.put_object()
        .bucket(BUCKET)
        .key("in-place")
        .body(b"same bytes".to_vec().into())
        .metadata("state", "old")
        .send()
        .await
        .unwrap();
    let copy = s3
        .copy_object()
        .bucket(BUCKET)
        .key("in-place")
        .copy_source(format!("{BUCKET}/in-place"))
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .metadata("state", "new")
        .send();
    across_a_lost_answer(&mut setup, copy)
        .await
        .expect("the copy, sent again");
    let head = s3
        .head_object()
        .bucket(BUCKET)
        .key("in-place")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.metadata()
            .and_then(|m| m.get("state"))
            .map(String::as_str),
        Some("new"),
        "the copy ran"
    );
    assert_eq!(settles(&setup.proxy, "stored").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_a_frozen_backend_that_resumes_is_stored_once() {
    let setup = setup(Plan::WithholdLastByte, "PUT /settle/frozen", true).await;
    let body = content(100 << 10, 6);
    let proxy_address = setup.proxy.address;
    let sent = body.clone();
    let write = tokio::spawn(async move { ProxyAt(proxy_address).put("frozen", sent, &[]).await });
    setup.front.reached().await;
    setup.backend.freeze();
    setup.front.go();
    setup.proxy.admin.wait_reason("hang_timeout").await;
    setup.backend.thaw();
    let response = write.await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.body());
    assert_eq!(
        response.headers()["etag"],
        format!("\"{}\"", hex(&md5_of(&body)))
    );
    wait_until(
        Duration::from_secs(10),
        "the settle to be counted",
        || async { settles(&setup.proxy, "answered").await == 1.0 },
    )
    .await
    .unwrap();
    assert_eq!(setup.front.count("PUT /settle/frozen"), 1, "sent once");
    let stored = support::read_object(&s3_client(&setup.proxy.endpoint()), BUCKET, "frozen").await;
    assert!(stored == body);
}

/// A PutObject by the AWS SDK of a file holding `body`: over plain HTTP
/// the SDK streams it `aws-chunked`, each chunk signed, with a CRC32
/// trailer (STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER).
async fn sdk_put_of_a_file(
    proxy: &ProxyUnderTest,
    dir: &std::path::Path,
    key: &str,
    body: &[u8],
) -> impl Future<
    Output = Result<
        aws_sdk_s3::operation::put_object::PutObjectOutput,
        aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::put_object::PutObjectError>,
    >,
> + Send
+ 'static {
    let path = dir.join(key);
    std::fs::write(&path, body).unwrap();
    let put = s3_client(&proxy.endpoint())
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from_path(&path).await.unwrap());
    async move { put.send().await }
}

/// Checks that the watched request went out `aws-chunked` with a CRC32
/// trailer, as the test means it to.
fn assert_sent_with_a_crc32_trailer(front: &Front) {
    assert_eq!(
        front.watched_field("content-encoding").as_deref(),
        Some("aws-chunked")
    );
    assert_eq!(
        front.watched_field("x-amz-trailer").as_deref(),
        Some("x-amz-checksum-crc32")
    );
    assert_eq!(front.watched_field("x-amz-checksum-crc32"), None);
    assert_eq!(front.watched_field("content-md5"), None);
}

/// An SDK upload of `size` bytes from a file (aws-chunked, CRC32 trailer,
/// no Content-MD5) to `key`, its answer lost: answered as stored, with the
/// trailer's CRC32, sent once, counted `stored`, stored byte-exact.
async fn a_trailer_put_is_settled(
    key: &str,
    size: usize,
    seed: u8,
) -> aws_sdk_s3::operation::put_object::PutObjectOutput {
    let line = format!("PUT /settle/{key}");
    let mut setup = setup(Plan::LoseAnswer, &line, true).await;
    let body = content(size, seed);
    let put = sdk_put_of_a_file(&setup.proxy, setup.dir.path(), key, &body).await;
    let output = across_a_lost_answer(&mut setup, put)
        .await
        .expect("answered as stored");
    assert_sent_with_a_crc32_trailer(&setup.front);
    // The checksum answered is the trailer's, proven equal to the CRC32
    // HeadObject reports.
    assert_eq!(
        output.checksum_crc32(),
        Some(BASE64.encode(crc32(&body)).as_str())
    );
    assert_eq!(setup.front.count(&line), 1, "not replayed");
    assert_eq!(settles(&setup.proxy, "stored").await, 1.0);
    let stored = support::read_object(&s3_client(&setup.proxy.endpoint()), BUCKET, key).await;
    assert!(stored == body);
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_chunked_put_with_a_crc32_trailer_whose_answer_was_lost_is_answered_as_stored() {
    // Fits the replay buffer (1 MiB) with its chunk framing: the trailer is
    // read from the kept body.
    let body = content(512 << 10, 8);
    let output = a_trailer_put_is_settled("trailer", body.len(), 8).await;
    assert_eq!(
        output.e_tag(),
        Some(format!("\"{}\"", hex(&md5_of(&body))).as_str())
    );
}

/// An `aws-chunked` body over the replay buffer is not kept, but its last
/// bytes are: the trailer's CRC32 (the SDKs send no `Content-MD5` by
/// default) proves it stored, though no copy is left to replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_chunked_put_over_the_replay_buffer_whose_answer_was_lost_is_proven_by_its_trailer()
{
    a_trailer_put_is_settled("big-trailer", 3 << 20, 9).await;
}

/// radosgw (a gateway of the test binary's one-node Ceph cluster), the
/// front before it and the proxy before that, with `bucket` made through
/// the proxy and versioned: a write stored twice is two versions.
struct OnRadosGw {
    gateway: RadosGw,
    front: Front,
    proxy: ProxyUnderTest,
    s3: aws_sdk_s3::Client,
    bucket: &'static str,
    _dir: tempfile::TempDir,
}

impl OnRadosGw {
    async fn start(plan: Plan, bucket: &'static str, settle: bool) -> OnRadosGw {
        let gateway = RadosGw::start().await.unwrap();
        let front = Front::start(gateway.address, plan, &format!("PUT /{bucket}/object")).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = proxy(&front, dir.path(), settle).await;
        let s3 = s3_client(&proxy.endpoint());
        s3.create_bucket().bucket(bucket).send().await.unwrap();
        s3.put_bucket_versioning()
            .bucket(bucket)
            .versioning_configuration(
                VersioningConfiguration::builder()
                    .status(BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        OnRadosGw {
            gateway,
            front,
            proxy,
            s3,
            bucket,
            _dir: dir,
        }
    }

    /// The ETags of the versions of `object`, as radosgw lists them.
    async fn versions(&self) -> Vec<String> {
        let listed = self
            .s3
            .list_object_versions()
            .bucket(self.bucket)
            .prefix("object")
            .send()
            .await
            .unwrap();
        listed
            .versions()
            .iter()
            .filter(|v| v.key() == Some("object"))
            .map(|v| v.e_tag().unwrap_or_default().to_owned())
            .collect()
    }

    /// Sends a PUT of `object` from a spawned task.
    fn put(
        &self,
        body: Bytes,
        fields: Vec<(&'static str, String)>,
    ) -> tokio::task::JoinHandle<http::Response<Bytes>> {
        let proxy = ProxyAt(self.proxy.address);
        let bucket = self.bucket;
        tokio::spawn(async move {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
            proxy.put_in(bucket, "object", body, &fields).await
        })
    }

    /// SIGKILLs radosgw once the front reached its point and restarts it
    /// once the proxy saw the outage (see [`across_a_lost_answer`]).
    async fn restart_once_reached(&mut self) {
        self.front.reached().await;
        self.gateway.kill9();
        self.proxy.admin.wait_metric(GATE_DOWN, 1.0).await;
        self.gateway.restart().await.unwrap();
    }

    /// PUTs `object` with its `Content-MD5`, SIGKILLs radosgw once the
    /// front reached its point and restarts it: the client's answer, and
    /// the body's ETag.
    async fn put_with_md5_across_a_kill(&mut self, body: Bytes) -> (http::Response<Bytes>, String) {
        let md5 = md5_of(&body);
        let write = self.put(body, vec![("content-md5", BASE64.encode(md5))]);
        self.restart_once_reached().await;
        (write.await.unwrap(), format!("\"{}\"", hex(&md5)))
    }
}

/// The study's failure: a PUT whose answer a hang delayed, replayed once
/// the backend resumed, stored twice. The hung attempt's own answer wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_a_frozen_radosgw_in_a_versioned_bucket_is_one_version() {
    let rgw = OnRadosGw::start(Plan::WithholdLastByte, "settle-frozen", true).await;
    let body = content(100 << 10, 10);
    let write = rgw.put(body.clone(), Vec::new());
    rgw.front.reached().await;
    rgw.gateway.freeze();
    rgw.front.go();
    rgw.proxy.admin.wait_reason("hang_timeout").await;
    rgw.gateway.thaw();
    let response = write.await.unwrap();
    let etag = format!("\"{}\"", hex(&md5_of(&body)));
    assert_eq!(response.status(), 200, "{:?}", response.body());
    assert_eq!(response.headers()["etag"], etag.as_str());
    assert_eq!(rgw.versions().await, [etag], "exactly one version");
    assert_eq!(rgw.front.count("PUT /settle-frozen/object"), 1, "sent once");
    wait_until(
        Duration::from_secs(10),
        "the settle to be counted",
        || async { settles(&rgw.proxy, "answered").await == 1.0 },
    )
    .await
    .unwrap();
}

/// radosgw stored a `Content-MD5` PUT (small enough to be kept for replay)
/// and was SIGKILLed before its answer reached the proxy: read back, not
/// replayed into a second version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_md5_put_to_radosgw_killed_after_storing_it_is_one_version() {
    let mut rgw = OnRadosGw::start(Plan::LoseAnswer, "settle-md5", true).await;
    let (response, etag) = rgw.put_with_md5_across_a_kill(content(200 << 10, 11)).await;
    assert_eq!(response.status(), 200, "{:?}", response.body());
    assert_eq!(response.headers()["etag"], etag.as_str());
    assert!(response.headers().contains_key("x-amz-version-id"));
    assert_eq!(rgw.versions().await, [etag], "exactly one version");
    assert_eq!(rgw.front.count("PUT /settle-md5/object"), 1, "not replayed");
    assert_eq!(settles(&rgw.proxy, "stored").await, 1.0);
}

/// The same, SIGKILLed as soon as the whole body is on its way, whether or
/// not radosgw has stored it yet (4 MiB: not kept, so never replayed).
/// Whatever radosgw did, the client hears it: `200` only for the one
/// version stored, `503` only when nothing was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_md5_put_to_radosgw_killed_once_sent_is_answered_as_it_ended() {
    let mut rgw = OnRadosGw::start(Plan::LoseAnswerOnceSent, "settle-sent", true).await;
    let (response, etag) = rgw.put_with_md5_across_a_kill(content(4 << 20, 12)).await;
    let versions = rgw.versions().await;
    match response.status().as_u16() {
        200 => {
            assert_eq!(response.headers()["etag"], etag.as_str());
            assert_eq!(versions, [etag], "exactly one version");
            assert_eq!(settles(&rgw.proxy, "stored").await, 1.0);
        }
        503 => {
            assert_eq!(versions, Vec::<String>::new(), "503 for a stored write");
            assert_eq!(settles(&rgw.proxy, "absent").await, 1.0);
        }
        status => panic!("{status}: {:?}", response.body()),
    }
    assert_eq!(
        rgw.front.count("PUT /settle-sent/object"),
        1,
        "not replayed"
    );
}

/// A CopyObject in a versioned bucket, radosgw SIGKILLed after it copied
/// and before its answer reached the proxy: read back against its source,
/// answered with its result, one version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_object_on_radosgw_killed_after_copying_is_one_version() {
    let mut rgw = OnRadosGw::start(Plan::LoseAnswer, "settle-copy", true).await;
    let body = content(300 << 10, 14);
    let etag = put_source(&rgw.s3, rgw.bucket, "source", &body).await;
    let copy = rgw
        .s3
        .copy_object()
        .bucket(rgw.bucket)
        .key("object")
        .copy_source(format!("{}/source", rgw.bucket))
        .copy_source_if_match(&etag)
        .send();
    let copy = tokio::spawn(copy);
    rgw.restart_once_reached().await;
    let result = copy.await.unwrap().expect("the CopyObject result");
    assert_eq!(
        result.copy_object_result().and_then(|r| r.e_tag()),
        Some(etag.as_str())
    );
    assert!(result.version_id().is_some(), "the copy's version id");
    assert!(
        result.copy_source_version_id().is_some(),
        "the source's version id"
    );
    assert_eq!(rgw.versions().await, [etag], "exactly one version");
    assert_eq!(
        rgw.front.count("PUT /settle-copy/object"),
        1,
        "not replayed"
    );
    assert_eq!(settles(&rgw.proxy, "stored").await, 1.0);
}

/// A PUT to a key the client left unescaped (`+`, `=`, `@`: Go's
/// `url.PathEscape` and JavaScript's `encodeURI` leave them), answer lost
/// in a SIGKILL: radosgw checks the read-back's signature over the
/// canonical (escaped) path, as it did the client's, and the write is
/// settled once, not replayed into a second version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_an_unescaped_key_on_radosgw_is_settled_once() {
    let mut rgw = OnRadosGw::start(Plan::LoseAnswer, "settle-raw", true).await;
    let body = content(200 << 10, 16);
    let md5 = md5_of(&body);
    let proxy = ProxyAt(rgw.proxy.address);
    let sent = body.clone();
    let write = tokio::spawn(async move {
        let declared = BASE64.encode(md5);
        proxy
            .put_in(
                "settle-raw",
                "object+1=2@x",
                sent,
                &[("content-md5", &declared)],
            )
            .await
    });
    rgw.restart_once_reached().await;
    let response = write.await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.body());
    assert_eq!(
        rgw.front.count("PUT /settle-raw/object+1=2@x"),
        1,
        "not replayed"
    );
    assert_eq!(settles(&rgw.proxy, "stored").await, 1.0);
    let stored = support::read_object(&rgw.s3, rgw.bucket, "object+1=2@x").await;
    assert!(stored == body);
}

/// An UploadPart whose answer radosgw lost in its SIGKILL: ListParts lists
/// the part with its ETag, the MD5 of the proxy's copy proves it; the part
/// is answered as stored, not sent again, and completes into the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_part_to_radosgw_killed_after_storing_it_is_settled() {
    let mut rgw = OnRadosGw::start(Plan::LoseAnswer, "settle-part", true).await;
    let upload = rgw
        .s3
        .create_multipart_upload()
        .bucket(rgw.bucket)
        .key("object")
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap().to_owned();
    let part = content(512 << 10, 15);
    let etag = format!("\"{}\"", hex(&md5_of(&part)));
    let upload_part = rgw
        .s3
        .upload_part()
        .bucket(rgw.bucket)
        .key("object")
        .upload_id(&upload_id)
        .part_number(1)
        .body(part.clone().into())
        .send();
    let upload_part = tokio::spawn(upload_part);
    rgw.restart_once_reached().await;
    let uploaded = upload_part.await.unwrap().expect("answered as stored");
    assert_eq!(uploaded.e_tag(), Some(etag.as_str()));
    assert_eq!(
        rgw.front.count("PUT /settle-part/object"),
        1,
        "not replayed"
    );
    assert_eq!(settles(&rgw.proxy, "stored").await, 1.0);
    rgw.s3
        .complete_multipart_upload()
        .bucket(rgw.bucket)
        .key("object")
        .upload_id(&upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .parts(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(1)
                        .e_tag(etag)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let stored = support::read_object(&rgw.s3, rgw.bucket, "object").await;
    assert!(stored == part);
}

/// A `[settle]` secret the backend does not accept shows at once, not at
/// the first crash: once the backend answers (it may start after the
/// proxy) the proxy logs the rejection naming the keys, and sets
/// `s3fp_settle_key_rejected`; the right secret written to the file clears
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_settle_secret_is_reported_once_the_backend_answers() {
    let mut backend = S3Backend::stopped().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("settle-secret");
    support::write_secret(&secret, "not-the-secret");
    let config = format!(
        "[backend]\naddress = \"{}\"\n[settle]\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\nregion = \"{REGION}\"\n",
        backend.address,
        support::ACCESS_KEY,
        secret.display()
    );
    let proxy = support::ProxyProcess::start(&config).await.unwrap();
    let rejected =
        || async { metric_sample(&proxy.admin.metrics().await, "s3fp_settle_key_rejected") };
    assert_eq!(
        rejected().await,
        Some(0.0),
        "nothing known before the backend answers"
    );
    backend.restart().await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the key to be rejected",
        || async { rejected().await == Some(1.0) },
    )
    .await
    .unwrap();
    let logged = proxy
        .log_lines()
        .into_iter()
        .find(|line| line.contains("rejects the [settle] key"));
    let logged = logged.expect("an error line");
    assert!(logged.contains("ERROR"), "{logged}");
    assert!(logged.contains("SignatureDoesNotMatch"), "{logged}");
    assert!(logged.contains("settle.secret_access_key_file"), "{logged}");
    // A rotated Secret: the file changes, no signal.
    support::write_secret(&secret, SECRET_KEY);
    // The right key is accepted.
    proxy
        .wait_for_log("accepts the [settle] key", Duration::from_secs(20))
        .await;
    assert_eq!(rejected().await, Some(0.0));
}

/// The proxy's S3 address, for a request sent from a spawned task.
struct ProxyAt(SocketAddr);

impl ProxyAt {
    async fn put(&self, key: &str, body: Bytes, fields: &[(&str, &str)]) -> http::Response<Bytes> {
        put_to(self.0, BUCKET, key, body, fields).await
    }

    async fn put_in(
        &self,
        bucket: &str,
        key: &str,
        body: Bytes,
        fields: &[(&str, &str)],
    ) -> http::Response<Bytes> {
        put_to(self.0, bucket, key, body, fields).await
    }
}

/// A SigV4-signed PUT (payload unsigned) of `body` with `fields`.
async fn put_to(
    address: SocketAddr,
    bucket: &str,
    key: &str,
    body: Bytes,
    fields: &[(&str, &str)],
) -> http::Response<Bytes> {
    let path = format!("/{bucket}/{key}");
    let host = address.to_string();
    let url = format!("http://{host}{path}");
    let signed = sign_unsigned_payload("PUT", &url, &host, fields);
    let mut headers: Vec<(&str, &str)> = fields.to_vec();
    headers.extend(signed.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let response = support::send(address, "PUT", &path, &headers, body)
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_write_waits_to_be_settled_counts_as_held() {
    let mut setup = setup(Plan::LoseAnswer, "PUT /settle/left", true).await;
    let body = content(1 << 20, 7);
    let declared = BASE64.encode(md5_of(&body));
    let proxy = ProxyAt(setup.proxy.address);
    let write =
        tokio::spawn(async move { proxy.put("left", body, &[("content-md5", &declared)]).await });
    setup.front.reached().await;
    // The answer is lost and the backend gone: the read-back waits for it.
    setup.backend.kill9();
    wait_until(
        Duration::from_secs(10),
        "the write held for its read-back",
        || async { setup.proxy.admin.held().await == 1 },
    )
    .await
    .unwrap();
    write.abort();
    setup
        .proxy
        .admin
        .wait_metric("s3fp_hold_outcomes_total{outcome=\"client_gone\"}", 1.0)
        .await;
    assert_eq!(setup.proxy.admin.held().await, 0);
}
