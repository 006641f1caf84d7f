//! The logs an operator reads: one line per request (method, path, status,
//! time held, bytes, S3 request id) and one per backend state change (from,
//! to, reason, outage length), as text for people or JSON for machines.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use serde_json::Value;
use support::{ProxyProcess, S3Backend, s3_client, wait_until};

/// The proxy in front of `backend`, with `extra` sections of its config.
async fn proxy_for(backend: &S3Backend, extra: &str) -> ProxyProcess {
    ProxyProcess::start(&format!(
        "[backend]\naddress = \"{}\"\n{extra}",
        backend.address
    ))
    .await
    .unwrap()
}

/// The log's JSON records; every line must be one.
fn json_records(proxy: &ProxyProcess) -> Vec<Value> {
    proxy
        .log_lines()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// Waits until a JSON record matches `wanted`, and returns it.
async fn wait_record(proxy: &ProxyProcess, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    wait_until(Duration::from_secs(10), what, || async {
        json_records(proxy).iter().any(&wanted)
    })
    .await
    .unwrap();
    json_records(proxy).into_iter().find(wanted).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_traced_to_the_outage_that_held_it_in_json_logs() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = proxy_for(&backend, "[log]\nformat = \"json\"\n").await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("logs").send().await.unwrap();

    backend.kill9();
    let body = b"written during an outage".to_vec();
    let put = tokio::spawn({
        let (s3, body) = (s3.clone(), body.clone());
        async move {
            s3.put_object()
                .bucket("logs")
                .key("held")
                .body(ByteStream::from(body))
                .send()
                .await
        }
    });
    proxy.admin.wait_held(1).await;
    backend.restart().await.unwrap();
    put.await.unwrap().expect("the held PUT succeeds");

    // s3s-fs sends no request id, and the proxy adds none to a response: the
    // log line carries one of the proxy's own.
    let line = wait_record(&proxy, "the PUT's request line", |r| {
        r["message"] == "request" && r["method"] == "PUT" && r["path"] == "/logs/held"
    })
    .await;
    assert!(!line["request_id"].as_str().unwrap().is_empty(), "{line}");
    assert_eq!(line["method"], "PUT");
    assert_eq!(line["path"], "/logs/held");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], body.len() as u64);
    assert_eq!(line["outcome"], "ok");
    assert!(line["held_ms"].as_u64().unwrap() > 0, "{line}");

    let down = wait_record(&proxy, "the state change to down", |r| r["to"] == "down").await;
    assert_eq!(down["from"], "up");
    // Refused, or reset if a pooled connection to the old process was tried.
    assert!(
        ["refused", "reset"].contains(&down["reason"].as_str().unwrap()),
        "{down}"
    );
    let up = wait_record(&proxy, "the state change back to up", |r| {
        r["to"] == "up" && r["outage_ms"].is_u64()
    })
    .await;
    // RFC 3339 timestamps in one format and zone compare as strings.
    let at = |record: &Value| record["timestamp"].as_str().unwrap().to_owned();
    assert!(
        at(&down) <= at(&up) && at(&up) <= at(&line),
        "the held request was answered after the outage it waited out ended:\n{down}\n{up}\n{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_human_readable_by_default() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_for(&backend, "").await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("text").send().await.unwrap();

    let request_line = |lines: &[String]| {
        lines
            .iter()
            .find(|l| l.contains(" request method=PUT path=\"/text"))
            .cloned()
    };
    wait_until(Duration::from_secs(10), "the request line", || async {
        request_line(&proxy.log_lines()).is_some()
    })
    .await
    .unwrap();
    let line = request_line(&proxy.log_lines()).unwrap();
    assert!(
        !line.contains('\u{1b}'),
        "no colour codes in a file: {line}"
    );
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains("held_ms=0"), "{line}");
    assert!(
        serde_json::from_str::<Value>(&line).is_err(),
        "not JSON: {line}"
    );
}

/// How long a client waits held before it gives up, in the tests that
/// check the time held is logged (a line counts whole milliseconds).
const GIVES_UP_AFTER: Duration = Duration::from_millis(50);

/// An HTTP/2 connection to `proxy` (prior knowledge, cleartext).
async fn h2c(
    proxy: &ProxyProcess,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(proxy.address())
        .await
        .unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends a GET of `path` on `sender`'s connection, and resets its stream
/// (`RST_STREAM` with `CANCEL`, as hyper sends for a dropped response
/// future) once `waiting` says the proxy has the request.
async fn reset_once<F: Future<Output = ()>>(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    proxy: &ProxyProcess,
    path: &str,
    waiting: F,
) {
    let request = http::Request::get(format!("http://{}{path}", proxy.address()))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    waiting.await;
    response.abort();
}

/// Waits for the request line of a GET of `path`, and returns it.
async fn request_line(proxy: &ProxyProcess, path: &str) -> String {
    let pattern = format!(" request method=GET path=\"{path}\" ");
    let find = || proxy.log_lines().into_iter().find(|l| l.contains(&pattern));
    wait_until(
        Duration::from_secs(10),
        &format!("the line of {path}"),
        || async { find().is_some() },
    )
    .await
    .unwrap();
    find().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_http2_request_its_client_resets_is_logged_as_the_client_leaving() {
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = proxy_for(&backend, "[hold]\ntimeout = \"30s\"\n").await;
    let mut sender = h2c(&proxy).await;

    backend.kill9();
    let held_a_while = async {
        proxy.admin.wait_held(1).await;
        tokio::time::sleep(GIVES_UP_AFTER).await;
    };
    reset_once(&mut sender, &proxy, "/reset/held", held_a_while).await;
    let line = request_line(&proxy, "/reset/held").await;
    assert!(line.contains("status=499"), "{line}");
    assert!(line.contains("outcome=\"client_gone\""), "{line}");
    assert!(!line.contains("held_ms=0 "), "the time it was held: {line}");
    proxy
        .admin
        .wait_metric("s3fp_hold_outcomes_total{outcome=\"client_gone\"}", 1.0)
        .await;
    proxy.admin.wait_held(0).await;
    backend.restart().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_request_reset_while_at_the_backend_is_logged_but_was_never_held() {
    let backend = S3Backend::start().await.unwrap();
    let proxy = proxy_for(&backend, "").await;
    let mut sender = h2c(&proxy).await;

    // The backend takes the request and does not answer while stopped.
    backend.freeze();
    let at_backend = proxy
        .admin
        .wait_metric("s3fp_backend_in_flight_requests", 1.0);
    reset_once(&mut sender, &proxy, "/reset/sent", at_backend).await;
    let line = request_line(&proxy, "/reset/sent").await;
    backend.thaw();
    assert!(line.contains("status=499"), "{line}");
    assert!(line.contains("held_ms=0 "), "{line}");
    assert!(line.contains("outcome=\"client_gone\""), "{line}");
    let metrics = proxy.admin.metrics().await;
    assert_eq!(
        support::metric_sample(
            &metrics,
            "s3fp_hold_outcomes_total{outcome=\"client_gone\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_unanswered_when_the_shutdown_grace_ends_is_logged_without_an_answer() {
    request_cut_unanswered_when_the_shutdown_grace_ends_is_logged_without_an_answer(
        "raw_http1 = false\n",
    )
    .await;
}

/// The same on the raw HTTP/1.1 path (`listener.raw_http1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_unanswered_on_the_raw_path_when_the_shutdown_grace_ends_is_logged_without_an_answer()
 {
    request_cut_unanswered_when_the_shutdown_grace_ends_is_logged_without_an_answer(
        "raw_http1 = true\n",
    )
    .await;
}

/// With `listener_keys` in the proxy's `[listener]` section.
async fn request_cut_unanswered_when_the_shutdown_grace_ends_is_logged_without_an_answer(
    listener_keys: &str,
) {
    let backend = S3Backend::start().await.unwrap();
    let proxy = ProxyProcess::start(&format!(
        "[listener]\n{listener_keys}[backend]\naddress = \"{}\"\n[shutdown]\ndrain_delay = \"0s\"\ngrace = \"1s\"\n",
        backend.address
    ))
    .await
    .unwrap();

    // The backend takes the request and does not answer while stopped.
    backend.freeze();
    let sent = tokio::spawn(support::raw_request(
        proxy.address(),
        "GET",
        "/cut/at-grace",
        &[],
        bytes::Bytes::new(),
    ));
    proxy
        .admin
        .wait_metric("s3fp_backend_in_flight_requests", 1.0)
        .await;
    proxy.signal("-TERM");
    let line = request_line(&proxy, "/cut/at-grace").await;
    backend.thaw();
    assert!(
        sent.await.unwrap().is_err(),
        "the client got no answer, its connection was closed"
    );
    assert!(line.contains("status=499"), "no 503 was sent: {line}");
    assert!(line.contains("outcome=\"shutting_down\""), "{line}");
    assert!(proxy.exit_status().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_its_client_resets_while_held_for_the_rest_logs_the_time_held() {
    use http_body_util::BodyExt;
    let mut backend = S3Backend::start().await.unwrap();
    let proxy = proxy_for(&backend, "[hold]\ntimeout = \"30s\"\n").await;
    let s3 = s3_client(&proxy.endpoint());
    s3.create_bucket().bucket("resume").send().await.unwrap();
    let object = support::object_content(1, 32 << 20);
    s3.put_object()
        .bucket("resume")
        .key("big")
        .body(ByteStream::from(object))
        .send()
        .await
        .unwrap();

    let host = proxy.address().to_string();
    let url = format!("http://{host}/resume/big");
    let mut request = http::Request::get(&url);
    for (name, value) in support::sign_unsigned_payload("GET", &url, &host, &[]) {
        if name != "host" {
            request = request.header(name, value);
        }
    }
    let request = request.body(http_body_util::Empty::new()).unwrap();
    let mut sender = h2c(&proxy).await;
    let mut body = sender.send_request(request).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    backend.kill9();
    // The client reads on; the proxy holds the download for its rest.
    let reading = tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
    proxy.admin.wait_held(1).await;
    // The client gives up after a while held (not a wait for the proxy:
    // what the line must count).
    tokio::time::sleep(GIVES_UP_AFTER).await;
    reading.abort();

    let line = request_line(&proxy, "/resume/big").await;
    assert!(line.contains("outcome=\"response_cut\""), "{line}");
    assert!(
        !line.contains(" held_ms=0 "),
        "the time held for the rest: {line}"
    );
    backend.restart().await.unwrap();
}
