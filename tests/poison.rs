//! A request that crashes the backend is stopped: the backend crashes at most
//! twice for it, whatever the client retries, and the requests that were in
//! flight with it at the first crash still succeed. Requests held during the
//! outage wait until the suspects were sent again, so a second crash cuts
//! none of them.
//!
//! The backend is s3s-fs behind a front of the test's own that plays a backend
//! with a fatal bug: when a request line names the poison key, it crashes (all
//! connections cut, the port refused) and is restarted by its "supervisor"
//! after a short downtime, like a pod restarted by Kubernetes.

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
/// How long the backend works on a poison request before it crashes.
const WORK_BEFORE_CRASH: Duration = Duration::from_millis(100);

/// A backend that crashes on every request naming the poison key.
struct CrashingBackend {
    address: SocketAddr,
    crashes: Arc<AtomicUsize>,
    /// Request lines in the order they reached the backend.
    requests: Arc<Mutex<Vec<String>>>,
    /// Set when the test restarts the backend after a crash.
    restarts: Option<Arc<tokio::sync::Notify>>,
}

/// What the crashing backend shares with its supervisor and connections.
#[derive(Clone)]
struct Shared {
    backend: SocketAddr,
    crashes: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    restarts: Option<Arc<tokio::sync::Notify>>,
}

impl CrashingBackend {
    /// Restarted by its supervisor `DOWNTIME` after each crash.
    async fn start(backend: SocketAddr) -> CrashingBackend {
        CrashingBackend::start_with(backend, None).await
    }

    /// Restarted when the test calls [`CrashingBackend::restart`].
    async fn start_restarted_by_hand(backend: SocketAddr) -> CrashingBackend {
        CrashingBackend::start_with(backend, Some(Arc::default())).await
    }

    async fn start_with(
        backend: SocketAddr,
        restarts: Option<Arc<tokio::sync::Notify>>,
    ) -> CrashingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Shared {
            backend,
            crashes: Arc::default(),
            requests: Arc::default(),
            restarts,
        };
        tokio::spawn(serve(listener, shared.clone()));
        CrashingBackend {
            address,
            crashes: shared.crashes,
            requests: shared.requests,
            restarts: shared.restarts,
        }
    }

    fn crashes(&self) -> usize {
        self.crashes.load(Ordering::SeqCst)
    }

    fn restart(&self) {
        self.restarts
            .as_ref()
            .expect("restarted by hand")
            .notify_one();
    }

    /// The request lines the backend received, in order.
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Serves until a poison request arrives, crashes, restarts, and so on.
async fn serve(mut listener: TcpListener, shared: Shared) {
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
            let task = tokio::spawn(relay(client, shared.clone(), Arc::clone(&crash)));
            connections.lock().unwrap().push(task.abort_handle());
        }
        // The crash: every connection cut, the port closed for a while.
        shared.crashes.fetch_add(1, Ordering::SeqCst);
        for connection in connections.lock().unwrap().drain(..) {
            connection.abort();
        }
        drop(listener);
        match &shared.restarts {
            None => tokio::time::sleep(DOWNTIME).await,
            Some(restart) => restart.notified().await,
        }
        listener = TcpListener::bind(address).await.unwrap();
    }
}

/// Relays one connection to s3s-fs; a poison request line crashes the backend.
async fn relay(mut client: TcpStream, shared: Shared, crash: Arc<tokio::sync::Notify>) {
    let Ok(mut upstream) = TcpStream::connect(shared.backend).await else {
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
            shared
                .requests
                .lock()
                .unwrap()
                .extend(request_lines(&buffer[..n]));
            if names_poison(&buffer[..n]) {
                tokio::time::sleep(WORK_BEFORE_CRASH).await;
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

/// The request lines (`PUT /bucket/key HTTP/1.1`) in a read.
fn request_lines(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| line.ends_with(b" HTTP/1.1\r"))
        .map(|line| String::from_utf8_lossy(&line[..line.len() - 1]).into_owned())
        .collect()
}

/// A request line (`PUT /bucket/poison HTTP/1.1`, or `GET`) naming the
/// poison key.
fn names_poison(bytes: &[u8]) -> bool {
    bytes.split(|&b| b == b'\n').any(|line| {
        (line.starts_with(b"PUT ") || line.starts_with(b"GET "))
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
        proxy.admin.status().await["in_flight"] == 3
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

    let status = proxy.admin.status().await;
    let quarantined = status["quarantined"].as_array().unwrap();
    assert_eq!(quarantined.len(), 1, "{status}");
    assert_eq!(quarantined[0]["fingerprint"], "PUT /lab/poison length=1");
    let metrics = proxy.admin.metrics().await;
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
        proxy.admin.address,
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

/// A plain GET that crashes the backend is stopped the same way when the
/// raw HTTP/1.1 path (the default for plain GETs) sent it first: the
/// backend crashes twice for it, no more, and its retries are refused at
/// once; every other plain GET keeps the raw path meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_crashes_the_backend_on_the_raw_path_is_quarantined_after_two_crashes() {
    let backend = S3Backend::start().await.unwrap();
    let crashing = CrashingBackend::start(backend.address).await;
    let proxy = ProxyUnderTest::start(
        crashing.address,
        "[listener]\nraw_http1 = true\n[hold]\ntimeout = \"20s\"\n",
    )
    .await
    .unwrap();
    let address = proxy.address;
    let get = move |path: &'static str| raw_request(address, "GET", path, &[], Bytes::new());

    let (status, body) = get("/lab/poison").await.unwrap();
    assert_eq!(status, 400, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("<Code>InvalidRequest</Code>"));
    assert_eq!(crashing.crashes(), 2, "the backend crashed twice, no more");
    for _ in 0..3 {
        let (status, _) = get("/lab/poison").await.unwrap();
        assert_eq!(status, 400, "a retry is answered at once");
    }
    assert_eq!(crashing.crashes(), 2);
    let status = proxy.admin.status().await;
    assert_eq!(
        status["quarantined"][0]["fingerprint"], "GET /lab/poison",
        "{status}"
    );

    // While the quarantine remembers it, other GETs take the raw path (once
    // the backend is back: the first is held until then).
    get("/lab/innocent").await.unwrap();
    let raw_requests = || async {
        let metrics = proxy.admin.metrics().await;
        metric_sample(&metrics, "s3fp_raw_http1_requests_total").unwrap_or(0.0)
    };
    let before = raw_requests().await;
    for _ in 0..3 {
        get("/lab/innocent").await.unwrap();
    }
    assert_eq!(
        raw_requests().await - before,
        3.0,
        "other GETs on the raw path"
    );
    let (status, _) = get("/lab/poison").await.unwrap();
    assert_eq!(status, 400, "still refused");
    assert_eq!(crashing.crashes(), 2);
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
            || async { proxy.admin.status().await["in_flight"] == 1 },
        )
        .await
        .unwrap();
        backend.kill9();
        wait_until(Duration::from_secs(10), "the crash seen", || async {
            proxy.admin.outages().await >= f64::from(crash)
        })
        .await
        .unwrap();
        backend.restart().await.unwrap();
    }
    let status = upload.finish().await;
    assert_ne!(status, 400, "not refused as poison");
    let quarantined = proxy.admin.status().await["quarantined"].clone();
    assert_eq!(quarantined, serde_json::json!([]), "nothing quarantined");

    // The client's retry goes through.
    let retry = start_upload(proxy.address, "/slow/upload", &content).await;
    assert_eq!(retry.finish().await, 200);
    let s3 = s3_client(&proxy.endpoint());
    assert_eq!(read_object(&s3, "slow", "upload").await, content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_held_during_a_crash_wait_until_its_suspects_were_sent_again() {
    let backend = S3Backend::start().await.unwrap();
    let crashing = CrashingBackend::start_restarted_by_hand(backend.address).await;
    let proxy = ProxyUnderTest::start(crashing.address, "[hold]\ntimeout = \"20s\"\n")
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("lab").send().await.unwrap();

    // An innocent upload in flight, half sent, when the poison crashes the
    // backend: both are suspects.
    let content = object_content(7, 64 << 10);
    let innocent = start_upload(proxy.address, "/lab/innocent", &content).await;
    wait_until(Duration::from_secs(10), "the upload in flight", || async {
        proxy.admin.status().await["in_flight"] == 1
    })
    .await
    .unwrap();
    let address = proxy.address;
    let poison = tokio::spawn(raw_request(
        address,
        "PUT",
        "/lab/poison",
        &[],
        Bytes::from("x"),
    ));
    wait_until(Duration::from_secs(10), "the first crash", || async {
        crashing.crashes() == 1
    })
    .await
    .unwrap();
    let innocent = tokio::spawn(innocent.finish());

    // Three more requests arrive during the outage and are held with them.
    let held: Vec<_> = (0..3)
        .map(|i| {
            let s3 = s3.clone();
            tokio::spawn(async move {
                s3.put_object()
                    .bucket("lab")
                    .key(format!("held-{i}"))
                    .body(Bytes::from(format!("held {i}")).into())
                    .send()
                    .await
            })
        })
        .collect();
    proxy.admin.wait_held(5).await;

    // Back: the suspects go first, and the poison crashes the backend again.
    crashing.restart();
    wait_until(Duration::from_secs(10), "the second crash", || async {
        crashing.crashes() == 2
    })
    .await
    .unwrap();
    let requests = crashing.requests();
    assert!(
        !requests.iter().any(|line| line.contains("/lab/held-")),
        "no held request reached the backend before the suspects: {requests:#?}"
    );
    // Restarted once the proxy saw it down (as a real restart takes longer
    // than the proxy's check).
    wait_until(
        Duration::from_secs(10),
        "the second outage seen",
        || async { proxy.admin.outages().await >= 2.0 },
    )
    .await
    .unwrap();
    crashing.restart();

    let (status, _) = poison.await.unwrap().unwrap();
    assert_eq!(status, 400, "the poison is stopped");
    assert_eq!(innocent.await.unwrap(), 200);
    assert_eq!(read_object(&s3, "lab", "innocent").await, content);
    for (i, put) in held.into_iter().enumerate() {
        put.await.unwrap().expect("a held request succeeds");
        let line = format!("PUT /lab/held-{i}?x-id=PutObject HTTP/1.1");
        let sent = crashing.requests().iter().filter(|l| **l == line).count();
        assert_eq!(sent, 1, "held-{i} reached the backend once: {line}");
    }
    assert_eq!(crashing.crashes(), 2);
}
