//! A request that crashes the backend is stopped: the backend crashes at most
//! twice for it, whatever the client retries, and the requests that were in
//! flight with it at the first crash still succeed.
//!
//! The backend is s3s-fs behind a front of the test's own that plays a backend
//! with a fatal bug: when a request line names the poison key, it crashes (all
//! connections cut, the port refused) and is restarted by its "supervisor"
//! after a short downtime, like a pod restarted by Kubernetes.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use support::{
    FedUpload, ProxyUnderTest, S3Backend, metric_sample, object_content, raw_request, read_object,
    s3_client, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const POISON: &[u8] = b"/poison";
/// How long the crashed backend stays down before its restart.
const DOWNTIME: Duration = Duration::from_millis(300);

/// A backend that crashes on every request naming the poison key.
struct CrashingBackend {
    address: SocketAddr,
    crashes: Arc<AtomicUsize>,
}

impl CrashingBackend {
    async fn start(backend: SocketAddr) -> CrashingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let crashes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(serve(listener, backend, Arc::clone(&crashes)));
        CrashingBackend { address, crashes }
    }

    fn crashes(&self) -> usize {
        self.crashes.load(Ordering::SeqCst)
    }
}

/// Serves until a poison request arrives, crashes, restarts, and so on.
async fn serve(mut listener: TcpListener, backend: SocketAddr, crashes: Arc<AtomicUsize>) {
    let address = listener.local_addr().unwrap();
    loop {
        let crash = Arc::new(tokio::sync::Notify::new());
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = crash.notified() => break,
            };
            let Ok((client, _)) = accepted else { break };
            let task = tokio::spawn(relay(client, backend, Arc::clone(&crash)));
            connections.lock().unwrap().push(task.abort_handle());
        }
        // The crash: every connection cut, the port closed for a while.
        crashes.fetch_add(1, Ordering::SeqCst);
        for connection in connections.lock().unwrap().drain(..) {
            connection.abort();
        }
        drop(listener);
        tokio::time::sleep(DOWNTIME).await;
        listener = TcpListener::bind(address).await.unwrap();
    }
}

/// Relays one connection to s3s-fs; a poison request line crashes the backend.
async fn relay(mut client: TcpStream, backend: SocketAddr, crash: Arc<tokio::sync::Notify>) {
    let Ok(mut upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let requests = async {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = client_read.read(&mut buffer).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            if names_poison(&buffer[..n]) {
                crash.notify_one();
                std::future::pending::<()>().await;
            }
            if upstream_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    let responses = tokio::io::copy(&mut upstream_read, &mut client_write);
    tokio::select! {
        () = requests => {}
        _ = responses => {}
    }
}

/// A request line (`PUT /bucket/poison HTTP/1.1`) naming the poison key.
fn names_poison(bytes: &[u8]) -> bool {
    bytes.split(|&b| b == b'\n').any(|line| {
        line.starts_with(b"PUT ")
            && line.ends_with(b" HTTP/1.1\r")
            && line.windows(POISON.len()).any(|w| w == POISON)
    })
}

/// An upload whose body the test releases in two halves.
struct HeldUpload {
    upload: FedUpload,
    rest: Vec<u8>,
}

async fn start_upload(proxy: SocketAddr, path: &str, content: &[u8]) -> HeldUpload {
    let upload = FedUpload::start(proxy, path, content.len());
    let half = content.len() / 2;
    assert!(upload.send(&content[..half]).await);
    HeldUpload {
        upload,
        rest: content[half..].to_vec(),
    }
}

impl HeldUpload {
    async fn finish(self) -> u16 {
        // The proxy may have answered already (and stopped reading).
        self.upload.send(&self.rest).await;
        self.upload.status().await.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_crashes_the_backend_is_quarantined_after_two_crashes() {
    let backend = S3Backend::start().await.unwrap();
    let crashing = CrashingBackend::start(backend.address).await;
    let proxy = ProxyUnderTest::start(crashing.address, "[hold]\ntimeout = \"20s\"\n")
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("lab").send().await.unwrap();

    // Three innocent uploads in flight, half sent, when the poison arrives.
    let contents: Vec<Vec<u8>> = (0..3).map(|i| object_content(i, 64 << 10)).collect();
    let mut innocents = Vec::new();
    for (i, content) in contents.iter().enumerate() {
        innocents.push(start_upload(proxy.address, &format!("/lab/innocent-{i}"), content).await);
    }
    wait_until(Duration::from_secs(10), "3 uploads in flight", || async {
        proxy.status().await["in_flight"] == 3
    })
    .await
    .unwrap();

    // The poison; once it crashed the backend, the innocent clients send
    // the rest of their bodies.
    let address = proxy.address;
    let poison = move || raw_request(address, "PUT", "/lab/poison", &[], Bytes::from("x"));
    let first = tokio::spawn(poison());
    wait_until(Duration::from_secs(10), "the first crash", || async {
        crashing.crashes() >= 1
    })
    .await
    .unwrap();
    let finishing: Vec<_> = innocents
        .into_iter()
        .map(|upload| tokio::spawn(upload.finish()))
        .collect();
    let (status, body) = first.await.unwrap().unwrap();
    assert_eq!(status, 400, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("<Code>InvalidRequest</Code>"));
    for _ in 0..5 {
        let (status, _) = poison().await.unwrap();
        assert_eq!(status, 400, "a retry is answered at once");
    }

    // The innocent uploads in flight at the first crash still succeed.
    for (i, upload) in finishing.into_iter().enumerate() {
        assert_eq!(upload.await.unwrap(), 200, "innocent {i}");
        let stored = read_object(&s3, "lab", &format!("innocent-{i}")).await;
        assert_eq!(stored, contents[i], "innocent {i} stored once, whole");
    }
    assert_eq!(crashing.crashes(), 2, "the backend crashed twice, no more");

    let status = proxy.status().await;
    let quarantined = status["quarantined"].as_array().unwrap();
    assert_eq!(quarantined.len(), 1, "{status}");
    assert_eq!(quarantined[0]["fingerprint"], "PUT /lab/poison length=1");
    let metrics = proxy.metrics().await;
    let sample = |outcome: &str| {
        metric_sample(
            &metrics,
            &format!("s3fp_quarantine_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap()
    };
    assert_eq!(sample("quarantined"), 1.0);
    assert_eq!(sample("refused"), 5.0);

    // An operator lifts the quarantine: the request reaches the backend again.
    let (status, body) = raw_request(
        proxy.admin,
        "DELETE",
        "/admin/quarantine",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body), r#"{"cleared":1}"#);
    let _ = tokio::time::timeout(Duration::from_secs(5), poison()).await;
    wait_until(Duration::from_secs(5), "a third crash", || async {
        crashing.crashes() >= 3
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_in_flight_at_two_crashes_is_not_quarantined() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\ntimeout = \"20s\"\n")
        .await
        .unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("slow")
        .send()
        .await
        .unwrap();
    let content = object_content(9, 64 << 10);
    // Half sent; the proxy waits for the client's rest through both crashes.
    let upload = start_upload(proxy.address, "/slow/upload", &content).await;
    for crash in 1..=2 {
        wait_until(
            Duration::from_secs(10),
            "the upload at the backend",
            || async { proxy.status().await["in_flight"] == 1 },
        )
        .await
        .unwrap();
        backend.kill9();
        wait_until(Duration::from_secs(10), "the crash seen", || async {
            proxy.outages().await >= f64::from(crash)
        })
        .await
        .unwrap();
        backend.restart().await.unwrap();
    }
    let status = upload.finish().await;
    assert_ne!(status, 400, "not refused as poison");
    let quarantined = proxy.status().await["quarantined"].clone();
    assert_eq!(quarantined, serde_json::json!([]), "nothing quarantined");

    // The client's retry goes through.
    let retry = start_upload(proxy.address, "/slow/upload", &content).await;
    assert_eq!(retry.finish().await, 200);
    let s3 = s3_client(&proxy.endpoint());
    assert_eq!(read_object(&s3, "slow", "upload").await, content);
}
