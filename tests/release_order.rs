//! Held requests on release: one object's requests keep their arrival
//! order, different objects go in parallel.
//!
//! The backend (s3s-fs) is SIGKILLed and restarted on the same port while
//! the real proxy holds requests of an AWS SDK client (retries off). For
//! the parallel case a front of the test's own stands between the proxy and
//! the backend: it stops listening while the backend is down (the proxy
//! sees refused connects, as with the backend alone), counts the test's
//! requests in flight at once (from their request line to the first byte of
//! their answer), and holds back the first answer until a second request is
//! in flight (or 10 s passed), so that parallel requests are seen whatever
//! the timing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use support::{ProxyUnderTest, S3Backend, object_content, s3_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Room to hold every request of a test, with release 8 at a time.
const HOLD: &str = "[hold]\ntimeout = \"60s\"\nmax_requests = 1000\n\
                    max_requests_per_client = 1000\nrelease_concurrency = 8\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_then_a_delete_of_one_key_held_together_are_sent_in_that_order() {
    const PAIRS: usize = 20;
    const BUCKET: &str = "order";
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, HOLD).await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();

    backend.kill9();
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    for pair in 0..PAIRS {
        let key = format!("key-{pair}");
        // A body that takes the backend longer than a DELETE does.
        let body = object_content(pair, 256 << 10);
        let put = s3.put_object().bucket(BUCKET).key(&key);
        puts.push(tokio::spawn(put.body(ByteStream::from(body)).send()));
        proxy.admin.wait_held(2 * pair as u64 + 1).await;
        let delete = s3.delete_object().bucket(BUCKET).key(&key);
        deletes.push(tokio::spawn(delete.send()));
        proxy.admin.wait_held(2 * pair as u64 + 2).await;
    }
    backend.restart().await.unwrap();
    for (put, delete) in puts.into_iter().zip(deletes) {
        put.await.unwrap().expect("the PUT is answered");
        delete.await.unwrap().expect("the DELETE is answered");
    }

    let mut present = Vec::new();
    for pair in 0..PAIRS {
        let key = format!("key-{pair}");
        if s3
            .head_object()
            .bucket(BUCKET)
            .key(&key)
            .send()
            .await
            .is_ok()
        {
            present.push(key);
        }
    }
    assert!(
        present.is_empty(),
        "the DELETE ran before the PUT for {} of {PAIRS} keys: {present:?}",
        present.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_for_different_keys_are_released_in_parallel() {
    const KEYS: usize = 100;
    const BUCKET: &str = "parallel";
    let mut backend = S3Backend::start().await.unwrap();
    let mut front = Front::start(backend.address, BUCKET).await;
    let proxy = ProxyUnderTest::start(front.address, HOLD).await.unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();

    backend.kill9();
    front.close().await;
    let puts: Vec<_> = (0..KEYS)
        .map(|n| {
            let put = s3.put_object().bucket(BUCKET).key(format!("key-{n}"));
            let body = ByteStream::from(object_content(n, 1024));
            tokio::spawn(put.body(body).send())
        })
        .collect();
    proxy.admin.wait_held(KEYS as u64).await;
    backend.restart().await.unwrap();
    front.open().await;
    for put in puts {
        put.await.unwrap().expect("every held PUT is answered");
    }

    let peak = front.peak();
    assert!(
        (2..=8).contains(&peak),
        "{peak} requests in flight at once: more than one, at most release_concurrency"
    );
    let listed = s3.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    assert_eq!(listed.key_count(), Some(KEYS as i32));
}

/// Requests of the test's bucket in flight at the front.
#[derive(Debug, Default, Clone, Copy)]
struct InFlight {
    now: usize,
    /// The most at once so far.
    peak: usize,
    /// Answers passed on so far.
    answered: usize,
}

/// The relay in front of the backend (see the module comment).
struct Front {
    address: SocketAddr,
    backend: SocketAddr,
    /// `/bucket/key-`: the request targets counted.
    counted: Arc<str>,
    in_flight: Arc<watch::Sender<InFlight>>,
    accepting: Option<JoinHandle<()>>,
}

impl Front {
    async fn start(backend: SocketAddr, bucket: &str) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut front = Front {
            address: listener.local_addr().unwrap(),
            backend,
            // Not `/bucket/` itself: the SDK's CreateBucket target.
            counted: format!("/{bucket}/key-").into(),
            in_flight: Arc::new(watch::Sender::new(InFlight::default())),
            accepting: None,
        };
        front.accept_on(listener);
        front
    }

    /// Stops listening: connects to the front are refused.
    async fn close(&mut self) {
        if let Some(accepting) = self.accepting.take() {
            accepting.abort();
            let _ = accepting.await;
        }
    }

    /// Listens again on the same address (tokio binds with `SO_REUSEADDR`:
    /// the closed connections' `TIME_WAIT` does not stand in the way).
    async fn open(&mut self) {
        let listener = TcpListener::bind(self.address).await.unwrap();
        self.accept_on(listener);
    }

    fn accept_on(&mut self, listener: TcpListener) {
        let (backend, counted, in_flight) = (
            self.backend,
            Arc::clone(&self.counted),
            Arc::clone(&self.in_flight),
        );
        self.accepting = Some(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let relay = relay(
                    client,
                    backend,
                    Arc::clone(&counted),
                    Arc::clone(&in_flight),
                );
                tokio::spawn(relay);
            }
        }));
    }

    /// The most requests of the test's bucket in flight at once.
    fn peak(&self) -> usize {
        self.in_flight.borrow().peak
    }
}

/// Relays one connection; counts its requests for `counted` targets in
/// flight, and holds back the first answer (those that come before any
/// was passed on) until two are in flight (or 10 s passed).
async fn relay(
    client: TcpStream,
    backend: SocketAddr,
    counted: Arc<str>,
    in_flight: Arc<watch::Sender<InFlight>>,
) {
    let Ok(upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    // A counted request on this connection awaits its answer.
    let awaiting = &std::sync::atomic::AtomicBool::new(false);
    let in_flight = &*in_flight;
    let requests = pump(client_read, upstream_write, |chunk| {
        if !awaiting.load(SEQ) && targets(chunk, &counted) {
            awaiting.store(true, SEQ);
            in_flight.send_modify(|count| {
                count.now += 1;
                count.peak = count.peak.max(count.now);
            });
        }
        std::future::ready(())
    });
    let answers = pump(upstream_read, client_write, move |_| async move {
        if awaiting.swap(false, SEQ) {
            let mut seen = in_flight.subscribe();
            let parallel = seen.wait_for(|count| count.peak >= 2 || count.answered > 0);
            let _ = tokio::time::timeout(Duration::from_secs(10), parallel).await;
            in_flight.send_modify(|count| {
                count.now -= 1;
                count.answered += 1;
            });
        }
    });
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
}

/// Copies `from` to `to` chunk by chunk, each first shown to `before`,
/// until either side ends.
async fn pump<F: Future<Output = ()>>(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut before: impl FnMut(&[u8]) -> F,
) {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut buffer).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        before(&buffer[..n]).await;
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

const SEQ: std::sync::atomic::Ordering = std::sync::atomic::Ordering::SeqCst;

/// True when `chunk` begins with a request line whose target starts with
/// `prefix`.
fn targets(chunk: &[u8], prefix: &str) -> bool {
    let line = chunk
        .split(|&byte| byte == b'\r')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|&byte| byte == b' ');
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    method.iter().all(u8::is_ascii_uppercase) && target.starts_with(prefix.as_bytes())
}
