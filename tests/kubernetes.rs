//! The proxy as the s3gw ingress on Kubernetes, against a fake API server that
//! the real `kube` client talks to: EndpointSlice discovery through a crash, a
//! graceful switch-over to a pod on another address, an endpoint published
//! ready before it listens, watch expiry and an API server restart, and the
//! coordinated pause through a Lease, and routing through the Service
//! address (pod and Service on two addresses). A real S3 backend process serves and
//! PutObject traffic flows through the proxy in every scenario; none may fail.

use std::time::Duration;

use bytes::Bytes;
use support::fake_kube::FakeKube;
use support::workload::Workload;
use support::{ProxyUnderTest, S3Backend, http_status, raw_request, s3_client, wait_until};

const NAMESPACE: &str = "s3gw";
const SERVICE: &str = "s3gw-s3gw";
const LEASE: &str = "s3-failover-proxy-pause";

struct Cluster {
    fake: FakeKube,
    backend: S3Backend,
    proxy: ProxyUnderTest,
    s3: aws_sdk_s3::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A serving backend behind a Service the proxy discovers.
    async fn start() -> Cluster {
        Cluster::start_with_pod(S3Backend::start().await.unwrap(), "").await
    }

    /// A cluster whose pod is `backend`, wherever it listens, with extra
    /// `[backend.kubernetes]` keys.
    async fn start_with_pod(backend: S3Backend, kubernetes_keys: &str) -> Cluster {
        let fake = FakeKube::start(NAMESPACE).await;
        fake.set_endpoints(
            SERVICE,
            backend.address.port(),
            &[(&backend.address.ip().to_string(), true, false)],
        );
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "{}{kubernetes_keys}\n[hold]\ntimeout = \"20s\"\n",
            discovery_config(&fake, dir.path())
        );
        let proxy = ProxyUnderTest::start_raw(&config).await.unwrap();
        wait_until(
            Duration::from_secs(10),
            "the proxy to route to the discovered pod",
            || async { proxy.admin.status().await["state"] == "up" },
        )
        .await
        .unwrap();
        let s3 = s3_client(&proxy.endpoint());
        s3.create_bucket().bucket("cluster").send().await.unwrap();
        Cluster {
            fake,
            backend,
            proxy,
            s3,
            _dir: dir,
        }
    }

    /// Publishes the pod's endpoint with these conditions.
    fn pod_endpoint(&self, serving: bool, terminating: bool) {
        let ip = self.backend.address.ip().to_string();
        self.endpoints(&[(&ip, serving, terminating)]);
    }

    fn endpoints(&self, endpoints: &[(&str, bool, bool)]) {
        self.fake
            .set_endpoints(SERVICE, self.backend.address.port(), endpoints);
    }

    async fn wait_state(&self, state: &str, reason: Option<&str>) {
        let what = format!("state {state} {reason:?}");
        wait_until(Duration::from_secs(10), &what, || async {
            let status = self.proxy.admin.status().await;
            status["state"] == state && reason.is_none_or(|r| status["reason"] == r)
        })
        .await
        .unwrap();
    }

    /// Lets the workload run for a moment; the pacing is the scenario.
    async fn traffic(&self) {
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

/// The `[backend.kubernetes]` section pointing at `fake`.
fn discovery_config(fake: &FakeKube, dir: &std::path::Path) -> String {
    format!(
        "[backend.kubernetes]\nnamespace = \"{NAMESPACE}\"\nservice = \"{SERVICE}\"\nport = \"s3\"\nkubeconfig = \"{}\"\n",
        fake.kubeconfig(dir).display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_seen_by_the_api_server_costs_no_request() {
    let mut cluster = Cluster::start().await;
    let workload = Workload::start(&cluster.s3, "cluster");
    cluster.traffic().await;

    cluster.backend.kill9();
    cluster.endpoints(&[("127.0.0.1", false, false)]);
    cluster.wait_state("down", None).await;
    cluster.traffic().await;
    cluster.backend.restart().await.unwrap();
    cluster.traffic().await;
    assert_eq!(
        cluster.proxy.admin.status().await["state"],
        "down",
        "not serving in the API: still held"
    );
    cluster.endpoints(&[("127.0.0.1", true, false)]);
    cluster.wait_state("up", None).await;
    cluster.traffic().await;
    workload.stop_and_check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_switch_over_to_a_pod_on_another_address_costs_no_request() {
    let mut cluster = Cluster::start().await;
    let workload = Workload::start(&cluster.s3, "cluster");
    cluster.traffic().await;

    // The old pod starts terminating: hold new requests, let in-flight finish.
    cluster.endpoints(&[("127.0.0.1", true, true)]);
    cluster.wait_state("down", Some("discovery")).await;
    wait_until(
        Duration::from_secs(10),
        "in-flight requests to drain",
        || async { cluster.proxy.admin.status().await["in_flight"] == 0 },
    )
    .await
    .unwrap();
    cluster.traffic().await;
    cluster.backend.kill9();
    // The replacement is scheduled elsewhere: new IP, same volume.
    cluster.backend.move_to("127.0.0.2");
    cluster.backend.restart().await.unwrap();
    cluster.endpoints(&[("127.0.0.2", true, false)]);
    cluster.wait_state("up", None).await;
    cluster.traffic().await;
    let results = workload.stop_and_check().await;
    assert!(
        results
            .iter()
            .any(|(_, took, _)| *took >= Duration::from_millis(500)),
        "some writes were held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_published_before_its_pod_listens_waits_for_the_probe() {
    let mut cluster = Cluster::start().await;
    let workload = Workload::start(&cluster.s3, "cluster");
    cluster.traffic().await;

    cluster.backend.kill9();
    cluster.backend.move_to("127.0.0.2");
    // "Ready" before radosgw listens (the s3gw chart has no readiness probe).
    cluster.endpoints(&[("127.0.0.2", true, false)]);
    cluster.traffic().await;
    let status = cluster.proxy.admin.status().await;
    assert_eq!(
        status["state"], "down",
        "not trusted before the probe sees S3: {status}"
    );
    cluster.backend.restart().await.unwrap();
    cluster.wait_state("up", None).await;
    cluster.traffic().await;
    workload.stop_and_check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_expiry_and_an_api_server_restart_do_not_disturb_traffic() {
    let mut cluster = Cluster::start().await;
    let workload = Workload::start(&cluster.s3, "cluster");
    cluster.traffic().await;

    cluster.fake.expire_watches();
    cluster.traffic().await;
    cluster.fake.stop();
    cluster.traffic().await;
    cluster.traffic().await;
    assert_eq!(
        cluster.proxy.admin.status().await["state"],
        "up",
        "a control-plane blip is not an outage"
    );
    assert_eq!(
        http_status(cluster.proxy.admin.address, "GET", "/readyz").await,
        Some(200)
    );
    cluster.fake.restart().await;
    cluster.traffic().await;

    // The watch is back: a switch-over is still followed.
    cluster.backend.kill9();
    cluster.backend.move_to("127.0.0.2");
    cluster.backend.restart().await.unwrap();
    cluster.endpoints(&[("127.0.0.2", true, false)]);
    cluster.wait_state("up", None).await;
    wait_until(
        Duration::from_secs(10),
        "traffic on the new pod",
        || async {
            let (status, _) =
                raw_request(cluster.proxy.address, "HEAD", "/cluster", &[], Bytes::new())
                    .await
                    .unwrap();
            status != 503
        },
    )
    .await
    .unwrap();
    cluster.traffic().await;
    workload.stop_and_check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_lease_holds_every_request_until_it_is_deleted_or_expires() {
    let cluster = Cluster::start().await;
    cluster.fake.put_lease(LEASE, "s3gw-pre-stop", 60);
    wait_until(
        Duration::from_secs(10),
        "the Lease to pause the proxy",
        || async { cluster.proxy.admin.status().await["paused"] == true },
    )
    .await
    .unwrap();
    let put = tokio::spawn({
        let s3 = cluster.s3.clone();
        async move {
            s3.put_object()
                .bucket("cluster")
                .key("during-pause")
                .body(aws_sdk_s3::primitives::ByteStream::from_static(b"paused"))
                .send()
                .await
        }
    });
    cluster.proxy.admin.wait_held(1).await;
    cluster.fake.delete_lease(LEASE);
    put.await
        .unwrap()
        .expect("released when the Lease is deleted");
    assert_eq!(cluster.proxy.admin.status().await["paused"], false);

    // A Lease nobody deletes ends by itself.
    cluster.fake.put_lease(LEASE, "forgotten", 2);
    wait_until(
        Duration::from_secs(10),
        "the second Lease to pause",
        || async { cluster.proxy.admin.status().await["paused"] == true },
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(15),
        "the expired Lease to resume",
        || async { cluster.proxy.admin.status().await["paused"] == false },
    )
    .await
    .unwrap();
    let (status, _) = raw_request(cluster.proxy.address, "HEAD", "/cluster", &[], Bytes::new())
        .await
        .unwrap();
    assert_ne!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_ready_only_after_the_first_complete_list() {
    let mut fake = FakeKube::start(NAMESPACE).await;
    fake.stop();
    let dir = tempfile::tempdir().unwrap();
    let config = discovery_config(&fake, dir.path());
    let proxy = ProxyUnderTest::start_unready(&config).await.unwrap();
    assert_eq!(
        http_status(proxy.admin.address, "GET", "/readyz").await,
        Some(503)
    );
    fake.restart().await;
    wait_until(
        Duration::from_secs(15),
        "readiness after the first list",
        || async { http_status(proxy.admin.address, "GET", "/readyz").await == Some(200) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_through_the_service_requests_and_probes_go_to_the_service_address() {
    // The pod and the Service's ClusterIP are two processes on two addresses,
    // each with its own data: where an object lands says where it went.
    let service = S3Backend::start().await.unwrap();
    let mut pod = S3Backend::stopped().unwrap();
    pod.move_to("127.0.0.2");
    pod.restart().await.unwrap();
    let keys = format!(
        "route = \"service\"\nservice_address = \"{}\"",
        service.address
    );
    let mut cluster = Cluster::start_with_pod(pod, &keys).await;
    let on_service = s3_client(&format!("http://{}", service.address));
    let on_pod = s3_client(&format!("http://{}", cluster.backend.address));
    assert!(
        on_service
            .head_bucket()
            .bucket("cluster")
            .send()
            .await
            .is_ok(),
        "the bucket was created through the Service address"
    );
    assert!(
        on_pod.head_bucket().bucket("cluster").send().await.is_err(),
        "nothing reached the pod IP"
    );
    let workload = Workload::start(&cluster.s3, "cluster");
    cluster.traffic().await;

    // The pod process dies but the Service address serves: nothing is held.
    cluster.backend.kill9();
    cluster.traffic().await;
    assert_eq!(cluster.proxy.admin.status().await["state"], "up");
    // Discovery still decides when to hold, although the Service serves.
    cluster.pod_endpoint(false, false);
    cluster.wait_state("down", Some("discovery")).await;
    cluster.traffic().await;
    assert_eq!(cluster.proxy.admin.status().await["state"], "down");
    cluster.pod_endpoint(true, false);
    cluster.wait_state("up", None).await;
    cluster.traffic().await;
    let results = workload.stop().await.0;
    assert!(
        results.iter().all(|(_, _, result)| result.is_ok()),
        "{results:?}"
    );
    for (n, _, _) in &results {
        on_service
            .head_object()
            .bucket("cluster")
            .key(format!("obj-{n:05}"))
            .send()
            .await
            .expect("every object is on the Service's backend");
    }
}
