//! `/metrics` after a real outage: the figures match what the test did, and
//! Prometheus' own `promtool` accepts the exposition.

use std::io::Write;
use std::process::{Command, Stdio};

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use support::{ProxyUnderTest, S3Backend, metric_sample, raw_request, s3_client};

/// The value of one sample, `name{labels}` exactly as exposed.
fn sample(text: &str, series: &str) -> f64 {
    metric_sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_shows_in_the_metrics_as_it_happened() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = ProxyUnderTest::start(backend.address, "[hold]\ntimeout = \"3s\"\n")
        .await
        .unwrap();
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("metered").send().await.unwrap();

    // One crash with five writes held through it.
    backend.kill9();
    let writes: Vec<_> = (0..5)
        .map(|i| {
            let s3 = s3.clone();
            tokio::spawn(async move {
                s3.put_object()
                    .bucket("metered")
                    .key(format!("k{i}"))
                    .body(ByteStream::from_static(b"held"))
                    .send()
                    .await
            })
        })
        .collect();
    proxy.admin.wait_held(5).await;
    backend.restart().await.unwrap();
    for write in writes {
        write.await.unwrap().expect("held write succeeds");
    }

    // A second crash the backend does not come back from in time.
    backend.kill9();
    let (status, _) = raw_request(proxy.address, "GET", "/metered/k0", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 503);

    let text = proxy.admin.metrics().await;
    promtool_check(&text);
    assert_eq!(sample(&text, "s3fp_outages_total{reason=\"refused\"}"), 2.0);
    assert_eq!(
        sample(&text, "s3fp_outage_duration_seconds_count"),
        1.0,
        "one outage ended"
    );
    assert_eq!(
        sample(&text, "s3fp_hold_outcomes_total{outcome=\"released\"}"),
        5.0
    );
    assert_eq!(
        sample(&text, "s3fp_hold_outcomes_total{outcome=\"timed_out\"}"),
        1.0
    );
    assert_eq!(sample(&text, "s3fp_hold_duration_seconds_count"), 6.0);
    assert!(
        sample(&text, "s3fp_hold_duration_seconds_sum") >= 3.0,
        "the timed-out hold lasted 3 s"
    );
    assert_eq!(
        sample(
            &text,
            "s3fp_requests_total{method=\"PUT\",status_class=\"2xx\"}"
        ),
        6.0
    );
    assert_eq!(
        sample(
            &text,
            "s3fp_requests_total{method=\"GET\",status_class=\"5xx\"}"
        ),
        1.0
    );
    assert_eq!(sample(&text, "s3fp_held_requests"), 0.0);
    assert_eq!(sample(&text, "s3fp_gate_state{state=\"down\"}"), 1.0);
    assert!(sample(&text, "s3fp_probes_total{result=\"serving\"}") >= 1.0);
    assert!(sample(&text, "s3fp_probes_total{result=\"not_serving\"}") >= 1.0);
    assert!(sample(&text, "s3fp_request_bytes_total") >= 5.0 * 4.0);
    assert_eq!(sample(&text, "s3fp_build_info{version=\"0.1.0\"}"), 1.0);
}
