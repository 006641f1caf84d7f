//! The study's workload: PutObject every 100 ms with retries off, each
//! object's content derived from its number so it can be read back and checked;
//! and a keep-alive GET loop beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;

use super::object_content;

/// Size of each object the workload writes.
pub const OBJECT_SIZE: usize = 4096;

/// One PutObject of the workload: its number, how long it took, how it ended.
pub type PutResult = (usize, Duration, Result<(), String>);

/// A running workload.
pub struct Workload {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<PutResult>>,
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl Workload {
    /// Starts writing `obj-00000`, `obj-00001`... to `bucket` every 100 ms
    /// (at most 600 writes).
    pub fn start(s3: &aws_sdk_s3::Client, bucket: &str) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(put_every_100ms(
            s3.clone(),
            bucket.to_owned(),
            Arc::clone(&stop),
        ));
        Workload {
            stop,
            task,
            s3: s3.clone(),
            bucket: bucket.to_owned(),
        }
    }

    /// Stops, waits for every write, and returns their results.
    pub async fn stop(self) -> (Vec<PutResult>, aws_sdk_s3::Client, String) {
        self.stop.store(true, Ordering::SeqCst);
        (self.task.await.unwrap(), self.s3, self.bucket)
    }

    /// Stops and asserts that no write failed and every object reads back intact.
    pub async fn stop_and_check(self) -> Vec<PutResult> {
        let (results, s3, bucket) = self.stop().await;
        let failures: Vec<_> = results.iter().filter(|(_, _, r)| r.is_err()).collect();
        assert!(
            results.len() >= 10,
            "the workload ran: {} requests",
            results.len()
        );
        assert!(
            failures.is_empty(),
            "{} of {} PutObject failed: {failures:?}",
            failures.len(),
            results.len()
        );
        for (n, _, _) in &results {
            let got = s3
                .get_object()
                .bucket(&bucket)
                .key(key(*n))
                .send()
                .await
                .unwrap();
            let body = got.body.collect().await.unwrap().into_bytes();
            assert_eq!(
                body.as_ref(),
                object_content(*n, OBJECT_SIZE).as_slice(),
                "object {n} intact"
            );
        }
        results
    }
}

fn key(n: usize) -> String {
    format!("obj-{n:05}")
}

async fn put_every_100ms(
    s3: aws_sdk_s3::Client,
    bucket: String,
    stop: Arc<AtomicBool>,
) -> Vec<PutResult> {
    let mut writers = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    for n in 0..600 {
        ticker.tick().await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (s3, bucket) = (s3.clone(), bucket.clone());
        writers.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = s3
                .put_object()
                .bucket(bucket)
                .key(key(n))
                .body(ByteStream::from(object_content(n, OBJECT_SIZE)))
                .send()
                .await;
            (
                n,
                started.elapsed(),
                result.map(|_| ()).map_err(|e| format!("{e:?}")),
            )
        }));
    }
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.unwrap());
    }
    results
}

/// GETs `key` (which must hold `expected`) over keep-alive connections, 40 ms
/// apart, until `stop` is set (at most 2 000 times); returns the failures.
pub fn read_loop(
    s3: &aws_sdk_s3::Client,
    bucket: &'static str,
    key: &'static str,
    expected: &'static [u8],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let s3 = s3.clone();
    tokio::spawn(async move {
        let mut failures = Vec::new();
        for _ in 0..2_000 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match s3.get_object().bucket(bucket).key(key).send().await {
                Ok(object) => {
                    let body = object.body.collect().await.unwrap().into_bytes();
                    assert_eq!(body.as_ref(), expected);
                }
                Err(error) => failures.push(format!("{error:?}")),
            }
            tokio::time::sleep(Duration::from_millis(40)).await; // the client's pace: the input under test
        }
        failures
    })
}
