//! boto3 over HTTPS: PutObject arrives as an `aws-chunked` body with
//! `STREAMING-UNSIGNED-PAYLOAD-TRAILER`, chunked transfer encoding, no
//! Content-Length and a CRC32 trailer. It must stream through untouched, and
//! be held correctly before it is sent.

use std::process::Stdio;

use support::tls::TestCa;
use support::{ACCESS_KEY, ProxyUnderTest, S3Backend, SECRET_KEY, s3_client};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/boto3_https.py");

/// Runs the boto3 script against the proxy's HTTPS listener.
fn boto3_put_get(proxy: &ProxyUnderTest, ca: &TestCa, key: &str) -> tokio::process::Child {
    tokio::process::Command::new("python3")
        .arg(SCRIPT)
        .args([
            "--endpoint",
            &format!("https://localhost:{}", proxy.tls_address.unwrap().port()),
        ])
        .arg("--ca")
        .arg(ca.ca_file())
        .args(["--bucket", "boto", "--key", key, "--size", "3145728"])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with boto3 (.ci/run installs it)")
}

async fn report(child: tokio::process::Child) -> serde_json::Value {
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "boto3 failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}

fn assert_aws_chunked(report: &serde_json::Value) {
    let headers = &report["headers"];
    assert_eq!(headers["Content-Encoding"], "aws-chunked", "{report}");
    assert_eq!(headers["Transfer-Encoding"], "chunked", "{report}");
    assert_eq!(
        headers["Content-Length"],
        serde_json::Value::Null,
        "{report}"
    );
    assert_eq!(
        headers["X-Amz-Content-SHA256"], "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "{report}"
    );
    assert_eq!(headers["X-Amz-Trailer"], "x-amz-checksum-crc32", "{report}");
    assert_eq!(report["intact"], true);
}

async fn https_proxy(backend: &S3Backend, ca: &TestCa) -> ProxyUnderTest {
    let files = ca.issue("edge", &["localhost"]);
    let config = format!(
        "[listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        files.cert.display(),
        files.key.display()
    );
    let proxy = ProxyUnderTest::start(backend.address, &config)
        .await
        .unwrap();
    s3_client(&proxy.endpoint())
        .create_bucket()
        .bucket("boto")
        .send()
        .await
        .unwrap();
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_chunked_upload_with_a_crc_trailer_streams_through() {
    let backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(&backend, &ca).await;
    let report = report(boto3_put_get(&proxy, &ca, "streamed")).await;
    assert_aws_chunked(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_chunked_upload_is_held_through_a_restart() {
    let mut backend = S3Backend::start().await.unwrap();
    let ca = TestCa::new("edge CA");
    let proxy = https_proxy(&backend, &ca).await;
    backend.kill9();
    let child = boto3_put_get(&proxy, &ca, "held");
    proxy.admin.wait_held(1).await;
    backend.restart().await.unwrap();
    let report = report(child).await;
    assert_aws_chunked(&report);
}
