//! Invisible while the backend is up (issue 10). A differential suite sends
//! every request of a corpus straight to the backend and through the proxy,
//! both through a recording relay (`support::relay`), and compares what the
//! client got and what the backend received. Also: a request-smuggling input
//! through `Expect: 100-continue` followed by other clients' requests, and a
//! large upload with a bad signature that must get the backend's own 403.
//!
//! The suite runs twice per backend: with the raw HTTP/1.1 path off
//! (`listener.raw_http1 = false`: the hyper path serves every request), and
//! with it on (the default), where it must take part of it.
//!
//! Every check is a function of the backend address (and a bucket of its
//! own), so the same checks run against s3s-fs and radosgw: adding a backend
//! is one test function per check. The suite collects every
//! difference of every case and fails once with one report.

use support::S3Backend;
use support::radosgw::RadosGw;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_answers_and_receives_the_same_straight_and_through_the_proxy() {
    let backend = S3Backend::start().await.unwrap();
    suite::assert_no_differences(backend.address, "tx-suite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_answers_and_receives_the_same_straight_and_on_the_raw_path() {
    let backend = S3Backend::start().await.unwrap();
    suite::assert_no_differences_on_the_raw_path(backend.address, "tx-raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_smuggled_past_expect_never_reaches_s3s_fs() {
    let backend = S3Backend::start().await.unwrap();
    smuggling::assert_smuggled_request_never_reaches(backend.address, "tx-smuggle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_upload_with_a_bad_signature_and_expect_gets_the_403_of_s3s_fs_every_time() {
    let backend = S3Backend::start().await.unwrap();
    early_answers::assert_bad_signature_upload_gets_403(backend.address, "tx-early", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_upload_with_a_bad_signature_without_expect_gets_the_403_of_s3s_fs_every_time() {
    let backend = S3Backend::start().await.unwrap();
    early_answers::assert_bad_signature_upload_gets_403(backend.address, "tx-early", false).await;
}

/// The radosgw tests of this binary share one S3 user, so one bucket list:
/// one at a time, or a ListBuckets would see another test's new bucket.
static RADOSGW: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn radosgw_answers_and_receives_the_same_straight_and_through_the_proxy() {
    let _alone = RADOSGW.lock().await;
    let gateway = RadosGw::start().await.unwrap();
    suite::assert_no_differences(gateway.address, "tx-suite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn radosgw_answers_and_receives_the_same_straight_and_on_the_raw_path() {
    let _alone = RADOSGW.lock().await;
    let gateway = RadosGw::start().await.unwrap();
    suite::assert_no_differences_on_the_raw_path(gateway.address, "tx-raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_smuggled_past_expect_never_reaches_radosgw() {
    let _alone = RADOSGW.lock().await;
    let gateway = RadosGw::start().await.unwrap();
    smuggling::assert_smuggled_request_never_reaches(gateway.address, "tx-smuggle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_upload_with_a_bad_signature_and_expect_gets_the_403_of_radosgw_every_time() {
    let _alone = RADOSGW.lock().await;
    let gateway = RadosGw::start().await.unwrap();
    early_answers::assert_bad_signature_upload_gets_403(gateway.address, "tx-early-expect", true)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_upload_with_a_bad_signature_without_expect_gets_the_403_of_radosgw_every_time() {
    let _alone = RADOSGW.lock().await;
    let gateway = RadosGw::start().await.unwrap();
    early_answers::assert_bad_signature_upload_gets_403(gateway.address, "tx-early-plain", false)
        .await;
}

/// The differential suite: the corpus straight and proxied, compared.
mod suite {
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::corpus::{self, Case, Fixture};
    use crate::diff::{self, Captured, Observed};
    use crate::wire::{self, Message, Role};
    use support::ProxyUnderTest;
    use support::relay::{Mark, Relay};

    /// Longest wait for one complete answer.
    const ANSWER_LIMIT: Duration = Duration::from_secs(20);
    /// A connection that moved no byte for this long has delivered everything
    /// it will (stray body bytes follow an answer within microseconds).
    const QUIET: Duration = Duration::from_millis(200);
    const SETTLE_LIMIT: Duration = Duration::from_secs(10);

    /// Through the hyper path alone (`listener.raw_http1 = false`).
    pub async fn assert_no_differences(backend: SocketAddr, bucket: &str) {
        let listener = "[listener]\nraw_http1 = false\n";
        let (cases, differences, _) = run(backend, bucket, listener).await;
        assert!(
            differences.is_empty(),
            "{}",
            diff::report(cases, &differences)
        );
    }

    /// The same, with the raw HTTP/1.1 path on (`listener.raw_http1`): it
    /// must take some of the corpus's requests (its GETs and HEADs), and
    /// answer them as straight access does.
    pub async fn assert_no_differences_on_the_raw_path(backend: SocketAddr, bucket: &str) {
        let listener = "[listener]\nraw_http1 = true\n";
        let (cases, differences, raw) = run(backend, bucket, listener).await;
        assert!(
            differences.is_empty(),
            "{}",
            diff::report(cases, &differences)
        );
        assert!(raw >= 10, "the raw path took {raw} of {cases} requests");
    }

    /// Runs every case through proxies with `extra` in their config;
    /// returns how many ran, every difference found, and how many requests
    /// the raw path took.
    pub async fn run(
        backend: SocketAddr,
        bucket: &str,
        extra: &str,
    ) -> (usize, Vec<diff::Difference>, u64) {
        let fixture = Fixture::create(backend, bucket).await;
        let relay = Relay::start(backend).await.unwrap();
        let cases = corpus::cases(&fixture);
        let mut ids = (Captured::default(), Captured::default());
        let mut differences = Vec::new();
        let mut raw = 0;
        for case in &cases {
            let (found, taken) = run_case(&relay, &fixture, case, &mut ids, extra).await;
            differences.extend(found);
            raw += taken;
        }
        (cases.len(), differences, raw)
    }

    /// Straight first, then through a fresh proxy, same bucket and key.
    async fn run_case(
        relay: &Relay,
        fixture: &Fixture,
        case: &Case,
        (straight_ids, proxied_ids): &mut (Captured, Captured),
        extra: &str,
    ) -> (Vec<diff::Difference>, u64) {
        let straight = straight_path(relay, fixture, case, straight_ids).await;
        let (proxied, raw) = proxied_path(relay, fixture, case, proxied_ids, extra).await;
        // Shown with a failure: what each path got, case by case.
        println!(
            "{:<72} straight: {} | proxied: {}",
            case.name,
            straight.summary(),
            proxied.summary()
        );
        if std::env::var_os("S3FP_TRANSPARENCY_DUMP").is_some() {
            println!("straight:\n{}proxied:\n{}", straight.dump(), proxied.dump());
        }
        let differences = diff::compare(
            case,
            &straight.normalized(straight_ids, case.dependent),
            &proxied.normalized(proxied_ids, case.dependent),
        );
        (differences, raw)
    }

    /// Client -> relay -> backend.
    async fn straight_path(
        relay: &Relay,
        fixture: &Fixture,
        case: &Case,
        ids: &mut Captured,
    ) -> Observed {
        let exchange = (case.request)(ids);
        let mut tries = 0;
        let straight = loop {
            tries += 1;
            fixture.prepare(case).await;
            let mark = relay.mark();
            let answer = wire::send(relay.address, &exchange, ANSWER_LIMIT).await;
            let straight = observed(relay, &mark, answer).await;
            let answered = straight.answer.as_ref().is_ok_and(|a| a.message.complete);
            if answered || tries >= case.straight_tries {
                break straight;
            }
        };
        ids.capture(case, &straight);
        straight
    }

    /// Client -> a fresh proxy -> relay -> backend.
    async fn proxied_path(
        relay: &Relay,
        fixture: &Fixture,
        case: &Case,
        ids: &mut Captured,
        extra: &str,
    ) -> (Observed, u64) {
        fixture.prepare(case).await;
        let exchange = (case.request)(ids);
        let proxy = ProxyUnderTest::start(relay.address, extra).await.unwrap();
        let mark = relay.mark();
        let answer = wire::send(proxy.address, &exchange, ANSWER_LIMIT).await;
        let metrics = proxy.admin.metrics().await;
        let raw = support::metric_sample(&metrics, "s3fp_raw_http1_requests_total").unwrap_or(0.0);
        // Stopping the proxy closes its backend connections, which ends the
        // relay's records sooner than waiting for them to be quiet.
        let _ = tokio::time::timeout(SETTLE_LIMIT, proxy.stop()).await;
        let proxied = observed(relay, &mark, answer).await;
        ids.capture(case, &proxied);
        (proxied, raw as u64)
    }

    /// The answer, and every request the backend received after `mark`.
    async fn observed(
        relay: &Relay,
        mark: &Mark,
        answer: anyhow::Result<wire::Response>,
    ) -> Observed {
        let settled = relay
            .wait_settled(QUIET, SETTLE_LIMIT)
            .await
            .map_err(|e| e.to_string());
        let backend: Vec<Message> = relay
            .since(mark)
            .iter()
            .flat_map(|connection| wire::parse_all(&connection.to_backend, Role::Request))
            .collect();
        Observed {
            answer: answer.map_err(|e| format!("{e:#}")),
            backend,
            settled,
        }
    }
}

/// The corpus: every request of the differential suite, and the objects
/// they need, put straight to the backend before the suite starts.
mod corpus {
    use std::net::SocketAddr;
    use std::time::Duration;

    use aws_sdk_s3::primitives::ByteStream;

    use crate::codec;
    use crate::diff::Captured;
    use crate::sigv4::{Auth, Framing, HOST, Payload, Req, Signer};
    use crate::wire::{Exchange, Response};
    use support::{object_content, s3_client};

    pub type BuildRequest = Box<dyn Fn(&Captured) -> Exchange + Send + Sync>;
    pub type Capture = fn(&Response) -> Vec<(String, String)>;

    pub struct Case {
        pub name: String,
        /// An object put straight to the backend before each path, so both
        /// find the same state (e.g. the object a DELETE removes).
        pub prepare: Option<(String, Vec<u8>)>,
        pub request: BuildRequest,
        /// Values of the answer that later requests use and that the backend
        /// generates anew for each path (an upload id); they are compared as
        /// placeholders.
        pub capture: Option<Capture>,
        /// The request was built from captured values, so its signature
        /// legitimately differs between the two paths.
        pub dependent: bool,
        /// Tries of the straight path until the backend answers: s3s-fs
        /// (hyper without `half_close`) races a half-closed request, answering
        /// it about one time in twelve and otherwise closing first; the
        /// reference is its answer (radosgw always answers).
        pub straight_tries: usize,
        /// What the proxy documents changing for this request (README,
        /// "What the proxy changes"); `None` for "nothing".
        pub change: Option<ProxyChange>,
    }

    /// A change the proxy documents; each is checked for exactly what it
    /// says, everything else must still match.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ProxyChange {
        /// Refused at the proxy: the backend receives nothing and the client
        /// gets `status`, with this S3 error code when the proxy can write a
        /// body (hyper's own parse errors have none).
        Refused {
            status: u16,
            code: Option<&'static str>,
        },
        /// The client's answer is in the client's HTTP version (hyper answers
        /// HTTP/1.0 to HTTP/1.0; RFC 9110 section 6.2 lets each hop use its
        /// own): status lines are compared without the version.
        ClientsVersion,
        /// The `100` the client gets is hyper's own `100 Continue`, sent
        /// when the backend's `100` arrives: interim answers are compared by
        /// status code.
        OwnContinue,
        /// A `Connection` header naming other fields: the fields reach the
        /// backend (so a condition or a digest still applies), the
        /// `Connection` header itself does not (it is hop-by-hop).
        ConnectionOptionsDropped,
        /// `Content-Length` and `Transfer-Encoding: chunked` together: hyper
        /// drops the length and the request is forwarded chunked (RFC 9112
        /// section 6.3); the backend must receive one request with no
        /// `Content-Length`.
        ChunkedNotLength,
    }

    impl Case {
        fn new(name: impl Into<String>, request: Exchange) -> Case {
            Case {
                name: name.into(),
                prepare: None,
                request: Box::new(move |_| request.clone()),
                capture: None,
                dependent: false,
                straight_tries: 1,
                change: None,
            }
        }

        fn dependent(
            name: impl Into<String>,
            request: impl Fn(&Captured) -> Exchange + Send + Sync + 'static,
        ) -> Case {
            Case {
                name: name.into(),
                prepare: None,
                request: Box::new(request),
                capture: None,
                dependent: true,
                straight_tries: 1,
                change: None,
            }
        }

        fn changed(mut self, change: ProxyChange) -> Case {
            self.change = Some(change);
            self
        }

        fn capturing(mut self, capture: Capture) -> Case {
            self.capture = Some(capture);
            self
        }

        fn until_answered(mut self, tries: usize) -> Case {
            self.straight_tries = tries;
            self
        }

        fn prepared(mut self, key: &str, content: Vec<u8>) -> Case {
            self.prepare = Some((key.to_owned(), content));
            self
        }
    }

    /// The bucket, the objects the reads need, and the signing clock.
    pub struct Fixture {
        /// Each test's own: radosgw's tests share one user's buckets.
        pub bucket: String,
        pub signer: Signer,
        /// Content of `obj`.
        pub object: Vec<u8>,
        /// Quoted ETag of `obj`.
        pub etag: String,
        /// Content and ETag of the one part of the multipart upload.
        pub part: Vec<u8>,
        pub part_etag: String,
        backend: aws_sdk_s3::Client,
    }

    impl Fixture {
        /// Creates the bucket and objects straight on the backend.
        pub async fn create(backend: SocketAddr, bucket: &str) -> Fixture {
            let s3 = s3_client(&format!("http://{backend}"));
            s3.create_bucket().bucket(bucket).send().await.unwrap();
            let object = object_content(1, 10_000);
            let part = object_content(3, 100_000);
            let mut fixture = Fixture {
                bucket: bucket.to_owned(),
                signer: Signer::now(),
                etag: String::new(),
                part_etag: String::new(),
                object,
                part,
                backend: s3,
            };
            fixture.etag = fixture.put("obj", fixture.object.clone()).await;
            fixture.part_etag = fixture.put("part-twin", fixture.part.clone()).await;
            fixture.put("big", object_content(2, 1 << 20)).await;
            for key in ["list/a", "list/b/c", "list/b/d", "list/e", "list/f g+h"] {
                fixture.put(key, key.as_bytes().to_vec()).await;
            }
            fixture
        }

        /// Puts an object straight to the backend; its quoted ETag.
        pub async fn put(&self, key: &str, content: Vec<u8>) -> String {
            let put = self
                .backend
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(ByteStream::from(content))
                .send()
                .await
                .unwrap();
            put.e_tag().unwrap().to_owned()
        }

        pub async fn prepare(&self, case: &Case) {
            if let Some((key, content)) = &case.prepare {
                self.put(key, content.clone()).await;
            }
        }

        /// `/{bucket}{rest}`: the corpus names its objects relative to the
        /// fixture's bucket (radosgw's tests share one user's buckets).
        pub fn target(&self, rest: &str) -> String {
            format!("/{}{rest}", self.bucket)
        }

        pub fn req(&self, method: &'static str, rest: &str) -> Req {
            Req::new(method, &self.target(rest))
        }

        pub fn get(&self, rest: &str) -> Req {
            self.req("GET", rest)
        }

        fn put_req(&self, rest: &str, body: Vec<u8>) -> Req {
            self.req("PUT", rest).body(body)
        }

        pub fn build(&self, request: Req) -> Exchange {
            request.build(&self.signer)
        }
    }

    pub fn cases(f: &Fixture) -> Vec<Case> {
        [
            puts(f),
            reads(f),
            keys(f),
            header_cases(f),
            bodies(f),
            multipart(f),
            early_answers(f),
            connections(f),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn puts(f: &Fixture) -> Vec<Case> {
        let small = object_content(10, 1000);
        let mib = object_content(11, 1 << 20);
        let large = object_content(14, 3 << 20);
        let md5 = codec::base64(&codec::hex_decode(f.etag.trim_matches('"')));
        vec![
            Case::new(
                "PUT small",
                f.build(
                    f.put_req("/put-small", small.clone())
                        .signed("Content-Type", "application/octet-stream"),
                ),
            ),
            Case::new(
                "PUT zero bytes",
                f.build(f.put_req("/put-empty", Vec::new())),
            ),
            Case::new("PUT 1 MiB", f.build(f.put_req("/put-1mib", mib.clone()))),
            Case::new(
                "PUT 1 MiB with Expect: 100-continue",
                f.build(f.put_req("/put-1mib-expect", mib).expect_continue()),
            )
            .changed(ProxyChange::OwnContinue),
            // Past `hold.replay_buffer` (1 MiB): spliced on the raw path.
            Case::new("PUT 3 MiB", f.build(f.put_req("/put-3mib", large.clone()))),
            Case::new(
                "PUT 3 MiB with Expect: 100-continue",
                f.build(f.put_req("/put-3mib-expect", large).expect_continue()),
            )
            .changed(ProxyChange::OwnContinue),
            Case::new(
                "PUT with Content-MD5",
                f.build(
                    f.put_req("/put-md5", f.object.clone())
                        .signed("Content-MD5", &md5),
                ),
            ),
            Case::new(
                "PUT without Content-Type",
                f.build(
                    f.put_req("/put-untyped", small.clone())
                        .payload(Payload::Unsigned),
                ),
            ),
            Case::new(
                "PUT with empty and UTF-8 metadata",
                f.build(
                    f.put_req("/put-meta-utf8", small)
                        .signed("x-amz-meta-empty", "")
                        .signed("x-amz-meta-utf8", "café ☕"),
                ),
            ),
            Case::new("GET of the small object", f.build(f.get("/put-small"))),
            Case::new("GET of the zero-byte object", f.build(f.get("/put-empty"))),
            Case::new(
                "HEAD of the UTF-8 metadata object",
                f.build(f.req("HEAD", "/put-meta-utf8")),
            ),
        ]
    }

    fn reads(f: &Fixture) -> Vec<Case> {
        let etag = f.etag.as_str();
        vec![
            Case::new("GET", f.build(f.get("/obj"))),
            Case::new("HEAD", f.build(f.req("HEAD", "/obj"))),
            Case::new("GET 1 MiB", f.build(f.get("/big"))),
            Case::new("Range GET", f.build(f.get("/obj").signed("Range", "bytes=100-199"))),
            Case::new("Range GET of a suffix", f.build(f.get("/obj").signed("Range", "bytes=-10"))),
            Case::new("Range GET beyond the end (416)", f.build(f.get("/obj").signed("Range", "bytes=50000-"))),
            Case::new("GET If-None-Match with the ETag (304)", f.build(f.get("/obj").signed("If-None-Match", etag))),
            Case::new("GET If-Match mismatch (412)", f.build(f.get("/obj").signed("If-Match", "\"0123456789abcdef0123456789abcdef\""))),
            Case::new("HEAD If-None-Match with the ETag (304)", f.build(f.req("HEAD", "/obj").signed("If-None-Match", etag))),
            Case::new("GET with response-content-* overrides", f.build(f.get("/obj?response-content-disposition=attachment%3B%20filename%3D%22r%C3%A9sum%C3%A9.txt%22&response-content-type=text%2Fplain%3B%20charset%3Dutf-8"))),
            Case::new("presigned GET (query auth)", f.build(f.get("/obj").auth(Auth::Presigned))),
            Case::new("ListBuckets", f.build(Req::new("GET", "/"))),
            Case::new("HEAD bucket", f.build(f.req("HEAD", ""))),
            Case::new("GetBucketLocation (?location, no '=')", f.build(f.get("?location"))),
            Case::new("ListObjectsV2 with prefix and delimiter", f.build(f.get("?list-type=2&prefix=list%2F&delimiter=%2F"))),
            Case::new("ListObjectsV2 with encoding-type=url", f.build(f.get("?encoding-type=url&list-type=2&prefix=list%2F"))),
            Case::new("DELETE", f.build(f.req("DELETE", "/to-delete"))).prepared("to-delete", b"doomed".to_vec()),
        ]
    }

    /// Keys that proxies are known to rewrite: (case name, key as on the wire,
    /// key as signed when the wire form is not a valid URI).
    const KEYS: [(&str, &str, Option<&str>); 22] = [
        ("%2B", "a%2Bb", None),
        ("%25", "a%25b", None),
        ("%20", "a%20b", None),
        ("literal +", "a+b", None),
        ("lower-case %2b", "a%2bb", None),
        ("encoded slash %2F", "a%2Fb", None),
        ("double-encoded %252F", "a%252Fb", None),
        ("encoded ? %3F", "q%3Fmark", None),
        ("encoded # %23", "hash%23frag", None),
        ("// in the key", "dir//double", None),
        ("leading /", "/leading", None),
        ("dot segment a/./b", "a/./b", None),
        ("dot-dot segment a/../b", "a/../b", None),
        ("trailing /", "dir/", None),
        ("; in the key", "semi;colon", None),
        ("sub-delims", "sub~!*'()$,=@:", None),
        ("unicode, percent-encoded", "%E2%9C%93-%C3%A9t%C3%A9", None),
        (
            "unicode, raw UTF-8 bytes",
            "raw-\u{e9}t\u{e9}",
            Some("raw-%C3%A9t%C3%A9"),
        ),
        ("raw #", "hash#frag", Some("hash")),
        ("raw backtick", "tick`s", Some("tick%60s")),
        ("raw < and >", "angle<x>", Some("angle%3Cx%3E")),
        ("900-byte key", "", None),
    ];

    /// Keys the proxy refuses with an S3 `InvalidURI`: a raw `#` (the URI
    /// parser would cut the key there), and bytes hyper's URI parser does not
    /// take.
    fn refused_key(key: &str) -> Option<ProxyChange> {
        key.contains(['#', '`', '<', '>'])
            .then_some(ProxyChange::Refused {
                status: 400,
                code: Some("InvalidURI"),
            })
    }

    fn keys(f: &Fixture) -> Vec<Case> {
        // 900 bytes in segments a file system takes (s3s-fs stores keys as paths).
        let long_key = format!("long{}", format!("/{}", "k".repeat(223)).repeat(4));
        let mut cases = Vec::new();
        for (name, key, signed_as) in KEYS {
            let key = if key.is_empty() {
                long_key.as_str()
            } else {
                key
            };
            let target = format!("/{key}");
            let sign = |request: Req| match signed_as {
                Some(signed) => request.sign_as(&f.target(&format!("/{signed}"))),
                None => request,
            };
            let put = sign(f.put_req(&target, format!("content of {name}").into_bytes()));
            let mut put = Case::new(format!("PUT key {name}"), f.build(put));
            let mut get = Case::new(format!("GET key {name}"), f.build(sign(f.get(&target))));
            if let Some(change) = refused_key(key) {
                put = put.changed(change);
                get = get.changed(change);
            }
            cases.push(put);
            cases.push(get);
        }
        cases
    }

    fn header_cases(f: &Fixture) -> Vec<Case> {
        let mut meta = f.put_req("/meta150", b"150 metadata entries".to_vec());
        for i in 0..150 {
            meta = meta.signed(&format!("x-amz-meta-m{i:03}"), &format!("value-{i}"));
        }
        let mut many = f.get("/obj");
        for i in 0..150 {
            many = many.unsigned(&format!("X-Extra-{i:03}"), &format!("{i}"));
        }
        // With Host and the signature's three, 99 fields: one below the 100
        // a hyper-based backend takes, so forwarding headers must not be added.
        let mut near = f.get("/obj");
        for i in 0..95 {
            near = near.unsigned(&format!("X-Extra-{i:03}"), &format!("{i}"));
        }
        vec![
            Case::new(
                "PUT with a wrong Content-MD5 named in Connection",
                f.build(
                    f.put_req("/md5-in-connection", f.object.clone())
                        .signed("Content-MD5", "AAAAAAAAAAAAAAAAAAAAAA==")
                        .unsigned("Connection", "Content-MD5"),
                ),
            )
            .changed(ProxyChange::ConnectionOptionsDropped),
            Case::new(
                "GET in authority form",
                f.build(Req::new("GET", &format!("{HOST}:80")).sign_as("/")),
            )
            .changed(ProxyChange::Refused {
                status: 400,
                code: Some("InvalidURI"),
            }),
            Case::new(
                "PUT with two Expect lines",
                f.build(
                    f.put_req("/two-expects", b"two".to_vec())
                        .unsigned("Expect", "100-continue")
                        .unsigned("Expect", "foo"),
                ),
            )
            .changed(ProxyChange::Refused {
                status: 417,
                code: Some("InvalidRequest"),
            }),
            Case::new("GET with 99 header fields", f.build(near)),
            Case::new("PUT with 150 x-amz-meta-* headers", f.build(meta)),
            Case::new(
                "GET of the object with 150 metadata entries",
                f.build(f.get("/meta150")),
            ),
            Case::new(
                "HEAD of the object with 150 metadata entries",
                f.build(f.req("HEAD", "/meta150")),
            ),
            // A form carries metadata in its body, past a backend's limit on
            // request headers: the answers to GET and HEAD carry 150 headers.
            Case::new(
                "POST object form with 150 x-amz-meta-* fields",
                post_object(f, "post-meta150", 150),
            ),
            Case::new(
                "GET of the form object with 150 metadata entries",
                f.build(f.get("/post-meta150")),
            ),
            Case::new(
                "HEAD of the form object with 150 metadata entries",
                f.build(f.req("HEAD", "/post-meta150")),
            ),
            Case::new("GET with 150 extra request headers", f.build(many)),
            Case::new(
                "PUT with mixed-case header names",
                f.build(
                    f.put_req("/mixed-case", b"mixed".to_vec())
                        .signed("X-Amz-Meta-MixedCase", "Value")
                        .unsigned("X-Custom-CamelCase", "Kept"),
                ),
            ),
            Case::new(
                "GET of the mixed-case metadata object",
                f.build(f.get("/mixed-case")),
            ),
            // hyper's client drops a GET's or HEAD's body unless the
            // request says `Transfer-Encoding: chunked` itself: the backend
            // must get the body (and answer for it) as it would directly.
            Case::new(
                "GET with a chunked body",
                f.build(
                    f.get("/mixed-case")
                        .body(b"hello".to_vec())
                        .framing(Framing::Chunked),
                ),
            ),
            Case::new(
                "HEAD with a chunked body",
                f.build(
                    f.req("HEAD", "/mixed-case")
                        .body(b"hello".to_vec())
                        .framing(Framing::Chunked),
                ),
            ),
            Case::new(
                "GET with an 8000-byte header value",
                f.build(f.get("/obj").unsigned("X-Long-Value", &"v".repeat(8000))),
            ),
            Case::new(
                "GET with a signed X-Forwarded-For",
                f.build(f.get("/obj").signed("X-Forwarded-For", "203.0.113.9")),
            ),
            Case::new(
                "GET with a signed X-Forwarded-Proto",
                f.build(f.get("/obj").signed("X-Forwarded-Proto", "https")),
            ),
            Case::new(
                "GET with two unsigned X-Forwarded-For lines",
                f.build(
                    f.get("/obj")
                        .unsigned("X-Forwarded-For", "203.0.113.1")
                        .unsigned("X-Forwarded-For", "198.51.100.2"),
                ),
            ),
            Case::new(
                "GET with Accept-Encoding and a User-Agent",
                f.build(
                    f.get("/obj")
                        .unsigned("User-Agent", "aws-cli/2.15.0 Python/3.11")
                        .unsigned("Accept-Encoding", "identity"),
                ),
            ),
        ]
    }

    fn bodies(f: &Fixture) -> Vec<Case> {
        let content = object_content(12, 150_000);
        let text = b"a gzip-encoded text object\n".repeat(100);
        vec![
            Case::new(
                "aws-chunked PUT with signed chunks (STREAMING-AWS4-HMAC-SHA256-PAYLOAD)",
                f.build(
                    f.put_req("/chunked-signed", content.clone())
                        .payload(Payload::SignedChunks),
                ),
            ),
            Case::new(
                "GET of the signed-chunks object",
                f.build(f.get("/chunked-signed")),
            ),
            Case::new(
                "aws-chunked PUT with a CRC32 trailer, chunked transfer (STREAMING-UNSIGNED-PAYLOAD-TRAILER)",
                f.build(
                    f.put_req("/chunked-trailer", content)
                        .payload(Payload::TrailerCrc32)
                        .framing(Framing::Chunked),
                ),
            ),
            Case::new(
                "GET of the trailer object",
                f.build(f.get("/chunked-trailer")),
            ),
            Case::new(
                "PUT of a Content-Encoding: gzip object",
                f.build(
                    f.put_req("/gzipped", codec::gzip(&text))
                        .signed("Content-Encoding", "gzip")
                        .signed("Content-Type", "text/plain"),
                ),
            ),
            Case::new(
                "GET of the gzip object with Accept-Encoding: gzip",
                f.build(
                    f.get("/gzipped")
                        .unsigned("Accept-Encoding", "gzip, deflate"),
                ),
            ),
            Case::new(
                "CopyObject from an encoded key",
                f.build(
                    f.put_req("/copy-dest", Vec::new())
                        .signed("x-amz-copy-source", &f.target("/a%2Bb")),
                ),
            )
            .capturing(copy_time),
            Case::new(
                "POST object (browser form upload)",
                post_object(f, "post-object", 0),
            ),
            Case::new(
                "GET of the form-uploaded object",
                f.build(f.get("/post-object")),
            ),
            Case::new(
                "PUT with both Content-Length and Transfer-Encoding",
                f.build(
                    f.put_req("/cl-te", b"smuggle?".to_vec())
                        .framing(Framing::LengthAndChunked),
                ),
            )
            .changed(ProxyChange::ChunkedNotLength),
            Case::new(
                "OPTIONS CORS preflight",
                f.build(
                    f.req("OPTIONS", "/obj")
                        .auth(Auth::Anonymous)
                        .unsigned("Origin", "http://app.example")
                        .unsigned("Access-Control-Request-Method", "PUT"),
                ),
            ),
        ]
    }

    fn multipart(f: &Fixture) -> Vec<Case> {
        let signer = f.signer;
        let part = f.part.clone();
        let (upload, upload_too) = (f.target("/multi"), f.target("/multi"));
        let complete = format!(
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{}</ETag></Part></CompleteMultipartUpload>",
            f.part_etag
        );
        vec![
            Case::new(
                "CreateMultipartUpload",
                f.build(f.req("POST", "/multi?uploads")),
            )
            .capturing(upload_id),
            Case::dependent("UploadPart", move |ids| {
                let target = format!(
                    "{upload}?partNumber=1&uploadId={}",
                    codec::uri_encode(ids.get("<upload-id>"))
                );
                Req::new("PUT", &target).body(part.clone()).build(&signer)
            }),
            Case::dependent("CompleteMultipartUpload", move |ids| {
                let target = format!(
                    "{upload_too}?uploadId={}",
                    codec::uri_encode(ids.get("<upload-id>"))
                );
                Req::new("POST", &target)
                    .body(complete.clone().into_bytes())
                    .build(&signer)
            }),
            Case::new("GET of the multipart object", f.build(f.get("/multi"))),
        ]
    }

    fn early_answers(f: &Fixture) -> Vec<Case> {
        let body = object_content(13, 1024);
        let no_bucket = || Req::new("PUT", "/no-such-bucket-tx/k").body(body.clone());
        let bad_signature = || {
            f.put_req("/bad-signature", body.clone())
                .auth(Auth::WrongSecret)
        };
        // Without `Expect`, how much of a large body reaches the backend
        // before it closes is a race of its own (the 16 MiB tests below).
        let large = object_content(15, 3 << 20);
        let large_bad_signature = || {
            f.put_req("/bad-signature-3mib", large.clone())
                .auth(Auth::WrongSecret)
        };
        vec![
            Case::new("PUT to a missing bucket", f.build(no_bucket())),
            Case::new(
                "PUT to a missing bucket with Expect: 100-continue",
                f.build(no_bucket().expect_continue()),
            ),
            Case::new("PUT with a bad signature", f.build(bad_signature())),
            Case::new(
                "PUT with a bad signature and Expect: 100-continue",
                f.build(bad_signature().expect_continue()),
            ),
            Case::new(
                "PUT 3 MiB with a bad signature and Expect: 100-continue",
                f.build(large_bad_signature().expect_continue()),
            ),
            Case::new(
                "GET with a bad signature",
                f.build(f.get("/obj").auth(Auth::WrongSecret)),
            ),
        ]
    }

    fn connections(f: &Fixture) -> Vec<Case> {
        vec![
            Case::new("HTTP/1.0 GET", f.build(f.get("/obj").http10()))
                .changed(ProxyChange::ClientsVersion),
            Case::new(
                "HTTP/1.0 PUT",
                f.build(f.put_req("/http10", b"one-zero".to_vec()).http10()),
            )
            .changed(ProxyChange::ClientsVersion),
            Case::new(
                "GET, then the client half-closes",
                f.build(f.get("/obj").half_close()),
            )
            .until_answered(100),
            Case::new(
                "GET in absolute form",
                f.build(
                    Req::new("GET", &format!("http://{HOST}{}", f.target("/obj")))
                        .sign_as(&f.target("/obj")),
                ),
            ),
            Case::new(
                "virtual-hosted style GET",
                f.build(Req::new("GET", "/obj").host(&format!("{}.{HOST}", f.bucket))),
            ),
        ]
    }

    /// A browser-style POST upload: a policy signed with SigV4, form fields
    /// and the file in `multipart/form-data`.
    fn post_object(f: &Fixture, key: &str, metadata: usize) -> Exchange {
        let signer = &f.signer;
        let expiration = signer.iso8601_after(Duration::from_secs(3600));
        let (credential, date) = (signer.credential(), signer.amz_date());
        let mut fields = vec![
            ("key".to_owned(), key.to_owned()),
            ("x-amz-algorithm".to_owned(), "AWS4-HMAC-SHA256".to_owned()),
            ("x-amz-credential".to_owned(), credential),
            ("x-amz-date".to_owned(), date),
        ];
        fields.extend((0..metadata).map(|i| (format!("x-amz-meta-m{i:03}"), format!("value-{i}"))));
        let conditions: Vec<String> = [format!(r#"{{"bucket":"{}"}}"#, f.bucket)]
            .into_iter()
            .chain(fields.iter().map(|(n, v)| format!(r#"{{"{n}":"{v}"}}"#)))
            .collect();
        let policy = format!(
            r#"{{"expiration":"{expiration}","conditions":[{}]}}"#,
            conditions.join(",")
        );
        let policy = codec::base64(policy.as_bytes());
        let signature = signer.post_policy_signature(&policy);
        fields.push(("policy".to_owned(), policy));
        fields.push(("x-amz-signature".to_owned(), signature));
        let boundary = "s3fp-form-boundary-7d3c";
        let mut form = Vec::new();
        for (name, value) in fields {
            form.extend(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .bytes(),
            );
        }
        form.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.txt\"\r\nContent-Type: text/plain\r\n\r\nuploaded by a form\r\n--{boundary}--\r\n")
                .bytes(),
        );
        let request = f
            .req("POST", "")
            .auth(Auth::Anonymous)
            .unsigned(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .body(form);
        f.build(request)
    }

    fn upload_id(answer: &Response) -> Vec<(String, String)> {
        codec::xml_value(&answer.message.body, "UploadId")
            .map(|id| ("<upload-id>".to_owned(), id))
            .into_iter()
            .collect()
    }

    /// The copy's LastModified: the time of each path's own copy.
    fn copy_time(answer: &Response) -> Vec<(String, String)> {
        codec::xml_value(&answer.message.body, "LastModified")
            .map(|time| ("<copy-time>".to_owned(), time))
            .into_iter()
            .collect()
    }
}

/// The comparison: what differs between the straight and the proxied path.
mod diff {
    use crate::codec;
    use crate::corpus::{Case, ProxyChange};
    use crate::wire::{Message, Response};

    /// Response headers whose values legitimately vary per request: the date,
    /// and the request ids S3 servers generate anew for every request
    /// (radosgw: `x-amz-request-id` and `x-amz-id-2`). Their names (with case)
    /// are still compared.
    pub const VARYING_RESPONSE_HEADERS: [&str; 3] = ["date", "x-amz-request-id", "x-amz-id-2"];

    /// What the proxy documents adding to a request (README, "Transparency"):
    /// each header and the one element it appends to the client's list. A
    /// header the client signed must arrive untouched instead.
    pub const FORWARDING_HEADERS: [(&str, &str); 2] = [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
    ];

    #[derive(Debug, Clone)]
    pub struct Difference {
        pub case: String,
        pub field: String,
        pub straight: String,
        pub proxied: String,
    }

    /// Backend-generated values per path, as (placeholder, value).
    #[derive(Debug, Default)]
    pub struct Captured(Vec<(String, String)>);

    impl Captured {
        pub fn get(&self, placeholder: &str) -> &str {
            self.0
                .iter()
                .rev()
                .find(|(p, _)| p == placeholder)
                .map_or("missing-captured-value", |(_, v)| v.as_str())
        }

        pub fn capture(&mut self, case: &Case, observed: &Observed) {
            if let (Some(capture), Ok(answer)) = (case.capture, &observed.answer) {
                self.0.extend(capture(answer));
            }
        }
    }

    /// One path's outcome.
    #[derive(Debug, Clone)]
    pub struct Observed {
        pub answer: Result<Response, String>,
        /// Every request the backend received, in connection order.
        pub backend: Vec<Message>,
        pub settled: Result<(), String>,
    }

    impl Observed {
        /// Everything, readable: for `S3FP_TRANSPARENCY_DUMP=1`.
        pub fn dump(&self) -> String {
            let message = |m: &Message| {
                let fields: Vec<String> = m
                    .headers
                    .iter()
                    .map(|(n, v)| format!("    {n}: {v}\n"))
                    .collect();
                format!(
                    "  {}\n{}    body: {}\n",
                    m.start_line,
                    fields.concat(),
                    codec::preview(&m.body, 300)
                )
            };
            let answer = match &self.answer {
                Ok(a) => format!("  interim: {:?}\n{}", a.interim, message(&a.message)),
                Err(e) => format!("  no answer: {e}\n"),
            };
            let backend: Vec<String> = self.backend.iter().map(message).collect();
            format!(
                " client got:\n{answer} backend received:\n{}",
                backend.concat()
            )
        }

        /// The final status line and how many requests the backend received.
        pub fn summary(&self) -> String {
            let answer = match &self.answer {
                Ok(answer) => answer.message.start_line.clone(),
                Err(_) => "no answer".to_owned(),
            };
            format!("{answer}, {} backend request(s)", self.backend.len())
        }

        /// Captured values replaced by their placeholders; for a request built
        /// from them, its signature too (it signs them).
        pub fn normalized(&self, captured: &Captured, dependent: bool) -> Observed {
            let fix = |bytes: &[u8]| {
                let mut bytes = bytes.to_vec();
                for (placeholder, value) in &captured.0 {
                    bytes = codec::replace_all(&bytes, value.as_bytes(), placeholder.as_bytes());
                }
                if dependent {
                    bytes = codec::mask_after(&bytes, b"Signature=", 64);
                }
                bytes
            };
            let fix_text = |text: &str| String::from_utf8_lossy(&fix(text.as_bytes())).into_owned();
            let fix_message = |m: &Message| Message {
                start_line: fix_text(&m.start_line),
                headers: m
                    .headers
                    .iter()
                    .map(|(n, v)| (n.clone(), fix_text(v)))
                    .collect(),
                body: fix(&m.body),
                trailers: m.trailers.clone(),
                complete: m.complete,
            };
            Observed {
                answer: self
                    .answer
                    .as_ref()
                    .map(|a| Response {
                        interim: a.interim.clone(),
                        message: without_echoed_ids(fix_message(&a.message)),
                    })
                    .map_err(Clone::clone),
                backend: self.backend.iter().map(fix_message).collect(),
                settled: self.settled.clone(),
            }
        }
    }

    /// An S3 error body repeats the response's request ids (radosgw's
    /// `<RequestId>`): they vary as the headers do, so they are masked there too.
    fn without_echoed_ids(mut answer: Message) -> Message {
        for (name, value) in &answer.headers {
            let echoed =
                ["x-amz-request-id", "x-amz-id-2"].contains(&name.to_ascii_lowercase().as_str());
            if echoed && !value.is_empty() {
                let placeholder = format!("<{}>", name.to_ascii_lowercase());
                answer.body =
                    codec::replace_all(&answer.body, value.as_bytes(), placeholder.as_bytes());
            }
        }
        answer
    }

    pub fn compare(case: &Case, straight: &Observed, proxied: &Observed) -> Vec<Difference> {
        let mut found = Found {
            case: &case.name,
            list: Vec::new(),
        };
        match case.change {
            Some(ProxyChange::Refused { status, code }) => {
                check_refused(&mut found, proxied, status, code);
                return found.list;
            }
            Some(ProxyChange::ChunkedNotLength) => {
                check_chunked_not_length(&mut found, proxied);
                return found.list;
            }
            _ => {}
        }
        let straight_answered = straight.answer.as_ref().is_ok_and(|a| a.message.complete);
        if case.straight_tries > 1 && !straight_answered {
            // The backend never answered this request (s3s-fs and a
            // half-closed request); radosgw does, and so must the proxy.
            let proxied_status = match &proxied.answer {
                Ok(answer) if answer.message.complete => answer.message.start_line.clone(),
                Ok(answer) => format!("incomplete: {}", answer.message.start_line),
                Err(error) => format!("no answer: {error}"),
            };
            found.field(
                "client: answer (the backend gave none)",
                "HTTP/1.1 200 OK",
                &proxied_status,
            );
            return found.list;
        }
        let (straight, proxied) = (
            documented(case.change, straight),
            documented(case.change, proxied),
        );
        compare_answers(&mut found, &straight.answer, &proxied.answer);
        compare_backend(&mut found, &straight.backend, &proxied.backend);
        found.field(
            "backend connections settled",
            &format!("{:?}", straight.settled),
            &format!("{:?}", proxied.settled),
        );
        found.list
    }

    /// The part of an outcome a documented change leaves to compare.
    fn documented(change: Option<ProxyChange>, observed: &Observed) -> Observed {
        let mut observed = observed.clone();
        if let Ok(answer) = observed.answer.as_mut() {
            match change {
                Some(ProxyChange::ClientsVersion) => {
                    answer.message.start_line = without_version(&answer.message.start_line);
                }
                Some(ProxyChange::OwnContinue) => {
                    for interim in &mut answer.interim {
                        *interim = status_code(interim).to_owned();
                    }
                }
                _ => {}
            }
        }
        if change == Some(ProxyChange::ConnectionOptionsDropped) {
            for request in &mut observed.backend {
                request
                    .headers
                    .retain(|(name, _)| !name.eq_ignore_ascii_case("connection"));
            }
        }
        observed
    }

    fn without_version(status_line: &str) -> String {
        status_line
            .split_once(' ')
            .map_or(status_line, |(_, rest)| rest)
            .to_owned()
    }

    fn status_code(status_line: &str) -> &str {
        status_line.split(' ').nth(1).unwrap_or(status_line)
    }

    /// Through the proxy: the documented refusal, and nothing at the backend.
    fn check_refused(found: &mut Found, proxied: &Observed, status: u16, code: Option<&str>) {
        let expected = match code {
            Some(code) => format!("{status}, <Code>{code}</Code>"),
            None => status.to_string(),
        };
        let got = match &proxied.answer {
            Ok(answer) => {
                let status = status_code(&answer.message.start_line).to_owned();
                let body = String::from_utf8_lossy(&answer.message.body);
                match code {
                    Some(code) if body.contains(&format!("<Code>{code}</Code>")) => {
                        format!("{status}, <Code>{code}</Code>")
                    }
                    Some(_) => format!("{status}, {}", cut(&body, 120)),
                    None => status,
                }
            }
            Err(error) => format!("no answer: {error}"),
        };
        found.field("client: documented refusal", &expected, &got);
        found.field(
            "backend: requests received after a refusal",
            "0",
            &proxied.backend.len().to_string(),
        );
    }

    /// Through the proxy: one request, chunked, without `Content-Length`.
    fn check_chunked_not_length(found: &mut Found, proxied: &Observed) {
        let shape = |m: &Message| {
            let has = |name: &str| m.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
            format!(
                "content-length: {}, transfer-encoding: {}",
                has("content-length"),
                has("transfer-encoding")
            )
        };
        let got: Vec<String> = proxied.backend.iter().map(shape).collect();
        found.field(
            "backend: request forwarded chunked",
            "content-length: false, transfer-encoding: true",
            &got.join(" / "),
        );
    }

    struct Found<'a> {
        case: &'a str,
        list: Vec<Difference>,
    }

    impl Found<'_> {
        fn field(&mut self, field: &str, straight: &str, proxied: &str) {
            if straight != proxied {
                self.list.push(Difference {
                    case: self.case.to_owned(),
                    field: field.to_owned(),
                    straight: straight.to_owned(),
                    proxied: proxied.to_owned(),
                });
            }
        }

        /// Fields compared by (name ignoring case, value); then the case of
        /// the names of the fields both have; then, if both have the same
        /// fields, the order of same-name fields.
        fn headers(
            &mut self,
            field: &str,
            straight: &[(String, String)],
            proxied: &[(String, String)],
        ) {
            let (only_straight, only_proxied, renamed) = field_differences(straight, proxied);
            let same_fields = only_straight.is_empty() && only_proxied.is_empty();
            if !same_fields {
                self.field(
                    field,
                    &show_fields(&only_straight),
                    &show_fields(&only_proxied),
                );
            }
            if !renamed.is_empty() {
                let (s, p): (Vec<String>, Vec<String>) = renamed.into_iter().unzip();
                self.field(&format!("{field}: name case"), &s.join(", "), &p.join(", "));
            }
            if same_fields && same_name_order(straight) != same_name_order(proxied) {
                self.field(
                    &format!("{field}: order of same-name fields"),
                    &show_fields(straight),
                    &show_fields(proxied),
                );
            }
        }

        fn body(&mut self, field: &str, straight: &Message, proxied: &Message) {
            self.field(field, &show_body(straight), &show_body(proxied));
            self.headers(
                &format!("{field} trailers"),
                &straight.trailers,
                &proxied.trailers,
            );
        }
    }

    fn compare_answers(
        found: &mut Found,
        straight: &Result<Response, String>,
        proxied: &Result<Response, String>,
    ) {
        let (straight, proxied) = match (straight, proxied) {
            (Ok(s), Ok(p)) => (s, p),
            _ => {
                let show = |a: &Result<Response, String>| match a {
                    Ok(r) => r.message.start_line.clone(),
                    Err(e) => format!("no answer: {e}"),
                };
                found.field("client: answer", &show(straight), &show(proxied));
                return;
            }
        };
        found.field(
            "client: interim answers",
            &straight.interim.join(", "),
            &proxied.interim.join(", "),
        );
        found.field(
            "client: status line",
            &straight.message.start_line,
            &proxied.message.start_line,
        );
        let varying = |h: &[(String, String)]| -> Vec<(String, String)> {
            h.iter()
                .map(|(n, v)| {
                    match VARYING_RESPONSE_HEADERS.contains(&n.to_ascii_lowercase().as_str()) {
                        true => (n.clone(), "<varies>".to_owned()),
                        false => (n.clone(), v.clone()),
                    }
                })
                .collect()
        };
        found.headers(
            "client: headers",
            &varying(&straight.message.headers),
            &varying(&proxied.message.headers),
        );
        found.body("client: body", &straight.message, &proxied.message);
    }

    fn compare_backend(found: &mut Found, straight: &[Message], proxied: &[Message]) {
        found.field(
            "backend: requests received",
            &straight.len().to_string(),
            &proxied.len().to_string(),
        );
        for (index, (s, p)) in straight.iter().zip(proxied).enumerate() {
            let which = |field: &str| match index {
                0 => format!("backend: {field}"),
                n => format!("backend: request {} {field}", n + 1),
            };
            found.field(&which("request line"), &s.start_line, &p.start_line);
            let (s_headers, p_headers) = without_forwarding(s, p);
            found.headers(&which("headers"), &s_headers, &p_headers);
            found.body(&which("body"), s, p);
        }
        if straight.len() != proxied.len() {
            let show = |m: &[Message]| {
                m.iter()
                    .map(|r| r.start_line.clone())
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            found.field("backend: request lines", &show(straight), &show(proxied));
        }
    }

    /// Drops each forwarding header from both sides when the proxied side is
    /// exactly the client's elements plus what the proxy documents appending,
    /// and the client did not sign it.
    fn without_forwarding(straight: &Message, proxied: &Message) -> (Fields, Fields) {
        let signed = signed_headers(straight);
        let mut s = straight.headers.clone();
        let mut p = proxied.headers.clone();
        for (name, appended) in FORWARDING_HEADERS {
            if signed.iter().any(|h| h == name) {
                continue;
            }
            let (s_elements, mut p_elements) = (elements(&s, name), elements(&p, name));
            let added = p_elements.split_off(s_elements.len().min(p_elements.len()));
            if p_elements == s_elements && added.iter().all(|a| a == appended) {
                s.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                p.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            }
        }
        (s, p)
    }

    fn elements(headers: &[(String, String)], name: &str) -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect()
    }

    /// The names in `SignedHeaders=` (header auth) or `X-Amz-SignedHeaders=` (query auth).
    fn signed_headers(request: &Message) -> Vec<String> {
        let from_header = request
            .header("authorization")
            .and_then(|a| a.split("SignedHeaders=").nth(1))
            .map(|s| s.split(',').next().unwrap_or("").to_owned());
        let from_query = request
            .start_line
            .split("X-Amz-SignedHeaders=")
            .nth(1)
            .map(|s| s.split(['&', ' ']).next().unwrap_or("").replace("%3B", ";"));
        from_header
            .or(from_query)
            .map(|list| list.split(';').map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// (only in `a`, only in `b`), names compared with their case.
    /// Fields only in `a`, fields only in `b` (names compared ignoring
    /// case), and the (a, b) names of fields both have with the name in
    /// another case.
    fn field_differences(
        a: &[(String, String)],
        b: &[(String, String)],
    ) -> (Fields, Fields, Vec<(String, String)>) {
        let mut only_b = b.to_vec();
        let mut only_a = Vec::new();
        let mut renamed = Vec::new();
        for (name, value) in a {
            let same = |(n, v): &(String, String)| n.eq_ignore_ascii_case(name) && v == value;
            match only_b.iter().position(same) {
                Some(at) => {
                    let (other, _) = only_b.remove(at);
                    if &other != name {
                        renamed.push((name.clone(), other));
                    }
                }
                None => only_a.push((name.clone(), value.clone())),
            }
        }
        (only_a, only_b, renamed)
    }

    type Fields = Vec<(String, String)>;

    /// Field order matters only among fields of the same name: the values
    /// of each name, in order.
    fn same_name_order(headers: &[(String, String)]) -> Vec<(String, String)> {
        let mut sorted: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted
    }

    /// Sorted by name (stable: same-name fields keep their order), so a
    /// backend that writes fields in hash order reads the same every run.
    fn show_fields(fields: &[(String, String)]) -> String {
        if fields.is_empty() {
            return "(none)".to_owned();
        }
        let mut sorted = fields.to_vec();
        sorted.sort_by_key(|(n, _)| n.to_ascii_lowercase());
        let shown: Vec<String> = sorted
            .iter()
            .map(|(n, v)| format!("{n}: {}", codec::preview(v.as_bytes(), 120)))
            .collect();
        format!("{} field(s): {}", fields.len(), shown.join(" | "))
    }

    fn show_body(message: &Message) -> String {
        let complete = if message.complete {
            ""
        } else {
            ", INCOMPLETE (connection ended first)"
        };
        format!(
            "{} bytes, sha256 {}{complete}: {}",
            message.body.len(),
            &codec::sha256_hex(&message.body)[..16],
            codec::preview(&message.body, 160)
        )
    }

    /// The report: every difference, grouped by case.
    pub fn report(cases: usize, differences: &[Difference]) -> String {
        let mut affected: Vec<&str> = differences.iter().map(|d| d.case.as_str()).collect();
        affected.dedup();
        let mut text = format!(
            "{} difference(s) in {} of {cases} cases between straight to the backend and through the proxy.\n\nThe same difference in several cases:\n",
            differences.len(),
            affected.len()
        );
        for (difference, count) in recurring(differences) {
            text.push_str(&format!(
                "  {count} cases: {}\n    straight: {}\n    proxied:  {}\n",
                difference.field,
                cut(&difference.straight, 300),
                cut(&difference.proxied, 300)
            ));
        }
        text.push_str("\nEvery difference, case by case:\n");
        let mut current = "";
        for d in differences {
            if d.case != current {
                current = &d.case;
                text.push_str(&format!("\n== {current}\n"));
            }
            text.push_str(&format!(
                "  {}\n    straight: {}\n    proxied:  {}\n",
                d.field,
                cut(&d.straight, 700),
                cut(&d.proxied, 700)
            ));
        }
        text
    }

    /// Differences (field, straight, proxied) found in more than one case, most frequent first.
    fn recurring(differences: &[Difference]) -> Vec<(&Difference, usize)> {
        let mut counted: Vec<(&Difference, usize)> = Vec::new();
        for d in differences {
            let same = |(c, _): &&mut (&Difference, usize)| {
                c.field == d.field && c.straight == d.straight && c.proxied == d.proxied
            };
            match counted.iter_mut().find(same) {
                Some((_, count)) => *count += 1,
                None => counted.push((d, 1)),
            }
        }
        counted.retain(|(_, count)| *count > 1);
        counted.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        counted
    }

    fn cut(text: &str, limit: usize) -> String {
        match text.char_indices().nth(limit) {
            Some((at, _)) => format!("{}... ({} more bytes)", &text[..at], text.len() - at),
            None => text.to_owned(),
        }
    }
}

/// A raw HTTP/1.x client that writes exactly the bytes it is given and reads
/// one answer, and the message parser it shares with the relay's records.
mod wire {
    use std::net::SocketAddr;
    use std::time::Duration;

    use anyhow::{Context, anyhow, bail};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::net::tcp::OwnedWriteHalf;
    use tokio::sync::oneshot;

    use crate::codec;

    /// Largest answer the client buffers.
    const MAX_ANSWER: usize = 64 << 20;
    /// More interim answers than this is a broken server.
    const MAX_INTERIM: usize = 16;

    /// When the client sends the body.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Sending {
        /// Head and body in one write.
        WithHead,
        /// The head; the body only after a `100 Continue`, never if a final
        /// answer comes first (what S3 SDKs do).
        AfterContinue,
    }

    /// One request exactly as it goes on the wire.
    #[derive(Debug, Clone)]
    pub struct Exchange {
        pub head: Vec<u8>,
        pub body: Vec<u8>,
        pub sending: Sending,
        /// Shut down the writing half once the request is written.
        pub half_close: bool,
        /// The answer to a HEAD has no body, whatever its headers say.
        pub head_request: bool,
    }

    /// One HTTP/1.x message as parsed from the wire.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Message {
        pub start_line: String,
        /// In wire order, names as sent.
        pub headers: Vec<(String, String)>,
        /// Without transfer framing (chunk sizes are the hop's own business).
        pub body: Vec<u8>,
        pub trailers: Vec<(String, String)>,
        /// False when the bytes ended before the framing said the message did.
        pub complete: bool,
    }

    impl Message {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        pub fn status(&self) -> u16 {
            self.start_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        }
    }

    /// What a client got: the status lines of interim answers, and the final answer.
    #[derive(Debug, Clone)]
    pub struct Response {
        pub interim: Vec<String>,
        pub message: Message,
    }

    #[derive(Debug, Clone, Copy)]
    pub enum Role {
        Request,
        Response { head_request: bool },
    }

    /// Status and S3 error code of an answer, or why there was none.
    pub fn outcome(answer: &anyhow::Result<Response>) -> String {
        match answer {
            Ok(a) => format!(
                "{} {}",
                a.message.status(),
                codec::xml_value(&a.message.body, "Code").unwrap_or_default()
            ),
            Err(error) => format!("no answer: {error:#}"),
        }
    }

    /// Sends `exchange` on a new connection and reads one final answer.
    pub async fn send(
        address: SocketAddr,
        exchange: &Exchange,
        limit: Duration,
    ) -> anyhow::Result<Response> {
        tokio::time::timeout(limit, send_unbounded(address, exchange))
            .await
            .map_err(|_| anyhow!("no complete answer within {limit:?}"))?
    }

    async fn send_unbounded(address: SocketAddr, exchange: &Exchange) -> anyhow::Result<Response> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let (go, go_ahead) = oneshot::channel();
        // The body is written while the answer is read: a server may answer
        // before it has read the body, and must not find the client stuck.
        let _writer = AbortOnDrop(tokio::spawn(write_request(
            write,
            exchange.clone(),
            go_ahead,
        )));
        let mut reader = Reader {
            read,
            buffer: Vec::new(),
            eof: false,
        };
        let role = Role::Response {
            head_request: exchange.head_request,
        };
        let mut go = Some(go);
        let mut interim = Vec::new();
        let answer = loop {
            let message = reader.next(role).await;
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    return Err(error.context(format!("after {} interim answer(s)", interim.len())));
                }
            };
            if !(100..200).contains(&message.status()) || message.status() == 101 {
                break message;
            }
            if message.status() == 100
                && let Some(go) = go.take()
            {
                let _ = go.send(());
            }
            interim.push(message.start_line);
            if interim.len() > MAX_INTERIM {
                bail!("more than {MAX_INTERIM} interim answers");
            }
        };
        Ok(Response {
            interim,
            message: answer,
        })
    }

    /// The writer task ends with the exchange, however it ends.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    async fn write_request(
        mut write: OwnedWriteHalf,
        exchange: Exchange,
        go_ahead: oneshot::Receiver<()>,
    ) {
        let written = match exchange.sending {
            Sending::WithHead => write
                .write_all(&[exchange.head, exchange.body].concat())
                .await
                .is_ok(),
            Sending::AfterContinue => {
                write.write_all(&exchange.head).await.is_ok()
                    && go_ahead.await.is_ok()
                    && write.write_all(&exchange.body).await.is_ok()
            }
        };
        if written && exchange.half_close {
            let _ = write.shutdown().await;
        }
        // Dropping the writing half would half-close it: keep it until the
        // reader is done and aborts this task.
        std::future::pending::<()>().await;
    }

    struct Reader {
        read: tokio::net::tcp::OwnedReadHalf,
        buffer: Vec<u8>,
        eof: bool,
    }

    impl Reader {
        /// The next complete message; each turn reads more or ends.
        async fn next(&mut self, role: Role) -> anyhow::Result<Message> {
            loop {
                if let Some((message, used)) = parse(&self.buffer, role, self.eof) {
                    self.buffer.drain(..used);
                    return Ok(message);
                }
                if self.eof {
                    bail!(
                        "connection closed after {} byte(s) of an incomplete answer: {}",
                        self.buffer.len(),
                        codec::preview(&self.buffer, 200)
                    );
                }
                if self.buffer.len() > MAX_ANSWER {
                    bail!("an answer larger than {MAX_ANSWER} bytes");
                }
                let mut chunk = vec![0u8; 64 * 1024];
                let read = self
                    .read
                    .read(&mut chunk)
                    .await
                    .context("reading the answer")?;
                self.eof = read == 0;
                self.buffer.extend_from_slice(&chunk[..read]);
            }
        }
    }

    /// Every request in what one connection carried, in order; bytes that do
    /// not parse as a request head become a pseudo-request showing them.
    pub fn parse_all(bytes: &[u8], role: Role) -> Vec<Message> {
        let mut messages = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            match parse(rest, role, true) {
                Some((message, used)) if used > 0 => {
                    messages.push(message);
                    rest = &rest[used..];
                }
                _ => {
                    messages.push(Message {
                        start_line: format!(
                            "(unparsed: {} bytes: {})",
                            rest.len(),
                            codec::preview(rest, 200)
                        ),
                        ..Message::default()
                    });
                    break;
                }
            }
        }
        messages
    }

    enum Framing {
        Empty,
        Length(usize),
        Chunked,
        UntilClose,
    }

    /// One message from the start of `bytes`, and how many bytes it used;
    /// `None` while incomplete. With `eof`, a message cut short is returned
    /// with `complete: false`.
    pub fn parse(bytes: &[u8], role: Role, eof: bool) -> Option<(Message, usize)> {
        let head_end = codec::find(bytes, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&bytes[..head_end - 4]);
        let mut lines = head.split("\r\n");
        let mut message = Message {
            start_line: lines.next()?.to_owned(),
            headers: lines.map(split_field).collect(),
            complete: true,
            ..Message::default()
        };
        let rest = &bytes[head_end..];
        let used = match framing(&message, role) {
            Framing::Empty => 0,
            Framing::Length(length) if length <= rest.len() => {
                message.body = rest[..length].to_vec();
                length
            }
            Framing::Chunked => match dechunk(rest) {
                Some((body, trailers, used)) => {
                    message.body = body;
                    message.trailers = trailers;
                    used
                }
                None if eof => cut_short(&mut message, rest),
                None => return None,
            },
            Framing::Length(_) | Framing::UntilClose if eof => {
                let cut = matches!(framing(&message, role), Framing::Length(_));
                let used = cut_short(&mut message, rest);
                message.complete = !cut;
                used
            }
            Framing::Length(_) | Framing::UntilClose => return None,
        };
        Some((message, head_end + used))
    }

    fn cut_short(message: &mut Message, rest: &[u8]) -> usize {
        message.body = rest.to_vec();
        message.complete = false;
        rest.len()
    }

    fn framing(message: &Message, role: Role) -> Framing {
        let status = message.status();
        if let Role::Response { head_request } = role
            && (head_request || (100..200).contains(&status) || status == 204 || status == 304)
        {
            return Framing::Empty;
        }
        let chunked = message
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .any(|(_, v)| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            return Framing::Chunked;
        }
        match (
            message.header("content-length").map(|v| v.parse::<usize>()),
            role,
        ) {
            (Some(Ok(length)), _) => Framing::Length(length),
            (_, Role::Request) => Framing::Empty,
            (_, Role::Response { .. }) => Framing::UntilClose,
        }
    }

    /// A chunked body decoded: (body, trailer fields, bytes used).
    type Dechunked = (Vec<u8>, Vec<(String, String)>, usize);

    /// Decodes a chunked body, or `None` while incomplete. Every turn
    /// consumes at least one line.
    fn dechunk(bytes: &[u8]) -> Option<Dechunked> {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = at + codec::find(&bytes[at..], b"\r\n")?;
            let size_text = String::from_utf8_lossy(&bytes[at..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let end = at + codec::find(&bytes[at..], b"\r\n")?;
                    if end == at {
                        return Some((body, trailers, at + 2));
                    }
                    trailers.push(split_field(&String::from_utf8_lossy(&bytes[at..end])));
                    at = end + 2;
                }
            }
            let data_end = at.checked_add(size)?;
            if bytes.len() < data_end + 2 {
                return None;
            }
            body.extend_from_slice(&bytes[at..data_end]);
            at = data_end + 2;
        }
    }

    fn split_field(line: &str) -> (String, String) {
        match line.split_once(':') {
            Some((name, value)) => (name.to_owned(), value.trim_matches([' ', '\t']).to_owned()),
            None => (line.to_owned(), String::new()),
        }
    }
}

/// SigV4 for the raw client: a fixed signing time and a fixed Host, so the
/// straight and the proxied request are the same bytes and both verify.
mod sigv4 {
    use std::time::{Duration, SystemTime};

    use aws_sigv4::http_request::{
        PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation,
        SigningSettings, UriPathNormalizationMode, sign,
    };
    use aws_sigv4::sign::v4;
    use aws_smithy_runtime_api::client::identity::Identity;
    use aws_smithy_types::date_time::{DateTime, Format};
    use bytes::Bytes;

    use crate::codec;
    use crate::wire::{Exchange, Sending};
    use support::{ACCESS_KEY, REGION, SECRET_KEY};

    pub const HOST: &str = "s3.test";
    const WRONG_SECRET: &str = "not-the-secret-key-0123456789";
    const CHUNK: usize = 64 * 1024;

    #[derive(Debug, Clone, Copy)]
    pub struct Signer {
        time: SystemTime,
    }

    fn identity(secret: &str) -> Identity {
        aws_credential_types::Credentials::new(ACCESS_KEY, secret, None, None, "test").into()
    }

    /// S3 signs the path as sent: no normalization, no second encoding.
    fn s3_settings() -> SigningSettings {
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings
    }

    impl Signer {
        /// Now, to the second: the backend refuses times far from its clock.
        pub fn now() -> Signer {
            let since_epoch = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap();
            Signer {
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs()),
            }
        }

        /// Authorization headers: (name, value) in the case boto3 writes them,
        /// and the signature (the seed of signed chunks).
        fn headers(
            &self,
            secret: &str,
            method: &str,
            target: &str,
            signed: &[(String, String)],
            payload: SignableBody,
        ) -> (Vec<(String, String)>, String) {
            let identity = identity(secret);
            let mut settings = s3_settings();
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            let params = v4::SigningParams::builder()
                .identity(&identity)
                .region(REGION)
                .name("s3")
                .time(self.time)
                .settings(settings)
                .build()
                .unwrap()
                .into();
            let url = format!("http://{HOST}{target}");
            let headers = signed.iter().map(|(n, v)| (n.as_str(), v.as_str()));
            let signable =
                SignableRequest::new(method, url, headers, payload).expect("a signable request");
            let output = sign(signable, &params).expect("signing");
            let signature = output.signature().to_owned();
            let (headers, _) = output.into_parts().0.into_parts();
            let headers = headers
                .iter()
                .map(|h| (wire_name(h.name()), h.value().to_owned()))
                .collect();
            (headers, signature)
        }

        /// The target with query authentication added (a presigned URL).
        fn presign(&self, method: &str, target: &str) -> String {
            let identity = identity(SECRET_KEY);
            let mut settings = s3_settings();
            settings.signature_location = SignatureLocation::QueryParams;
            settings.expires_in = Some(Duration::from_secs(3600));
            let params = v4::SigningParams::builder()
                .identity(&identity)
                .region(REGION)
                .name("s3")
                .time(self.time)
                .settings(settings)
                .build()
                .unwrap()
                .into();
            let url = format!("http://{HOST}{target}");
            let signable = SignableRequest::new(
                method,
                url,
                [("host", HOST)].into_iter(),
                SignableBody::UnsignedPayload,
            )
            .expect("a signable request");
            let (instructions, _) = sign(signable, &params).expect("presigning").into_parts();
            let query: Vec<String> = instructions
                .params()
                .iter()
                .map(|(n, v)| format!("{}={}", codec::uri_encode(n), codec::uri_encode(v)))
                .collect();
            let separator = if target.contains('?') { '&' } else { '?' };
            format!("{target}{separator}{}", query.join("&"))
        }

        fn chunk_signature(&self, chunk: &[u8], previous: &str) -> String {
            let identity = identity(SECRET_KEY);
            let params = v4::SigningParams::builder()
                .identity(&identity)
                .region(REGION)
                .name("s3")
                .time(self.time)
                .settings(())
                .build()
                .unwrap();
            v4::sign_chunk(&Bytes::copy_from_slice(chunk), previous, &params)
                .expect("signing a chunk")
                .signature()
                .to_owned()
        }

        /// `X-Amz-Date` form: 20261122T101500Z.
        pub fn amz_date(&self) -> String {
            DateTime::from(self.time)
                .fmt(Format::DateTime)
                .unwrap()
                .replace(['-', ':'], "")
        }

        pub fn credential(&self) -> String {
            format!(
                "{ACCESS_KEY}/{}/{REGION}/s3/aws4_request",
                &self.amz_date()[..8]
            )
        }

        pub fn iso8601_after(&self, after: Duration) -> String {
            DateTime::from(self.time + after)
                .fmt(Format::DateTime)
                .unwrap()
        }

        /// The signature of a POST policy (browser-based upload).
        pub fn post_policy_signature(&self, policy: &str) -> String {
            let key = v4::generate_signing_key(SECRET_KEY, self.time, REGION, "s3");
            v4::calculate_signature(key, policy.as_bytes())
        }
    }

    fn wire_name(name: &str) -> String {
        match name {
            "authorization" => "Authorization".to_owned(),
            "x-amz-date" => "X-Amz-Date".to_owned(),
            "x-amz-content-sha256" => "X-Amz-Content-SHA256".to_owned(),
            other => other.to_owned(),
        }
    }

    /// How the payload is signed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Payload {
        /// Its SHA-256 in `x-amz-content-sha256`.
        Hashed,
        Unsigned,
        /// `aws-chunked` with a signature per chunk (STREAMING-AWS4-HMAC-SHA256-PAYLOAD).
        SignedChunks,
        /// `aws-chunked`, unsigned, with a CRC32 trailer (STREAMING-UNSIGNED-PAYLOAD-TRAILER).
        TrailerCrc32,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Auth {
        Header,
        /// Signed with another secret: the backend answers 403.
        WrongSecret,
        /// Query authentication (a presigned URL).
        Presigned,
        Anonymous,
    }

    /// How the body is framed on the wire.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Framing {
        /// `Content-Length` when there is a body or the method has one.
        ContentLength,
        Chunked,
        /// Both headers: the classic smuggling ambiguity.
        LengthAndChunked,
    }

    /// One request before signing. Header names keep the case given here.
    #[derive(Debug, Clone)]
    pub struct Req {
        method: &'static str,
        target: String,
        sign_target: Option<String>,
        version: &'static str,
        host: String,
        signed: Vec<(String, String)>,
        unsigned: Vec<(String, String)>,
        body: Vec<u8>,
        payload: Payload,
        auth: Auth,
        framing: Framing,
        expect: bool,
        half_close: bool,
    }

    impl Req {
        pub fn new(method: &'static str, target: &str) -> Req {
            Req {
                method,
                target: target.to_owned(),
                sign_target: None,
                version: "HTTP/1.1",
                host: HOST.to_owned(),
                signed: Vec::new(),
                unsigned: Vec::new(),
                body: Vec::new(),
                payload: Payload::Hashed,
                auth: Auth::Header,
                framing: Framing::ContentLength,
                expect: false,
                half_close: false,
            }
        }

        /// A header included in SignedHeaders.
        pub fn signed(mut self, name: &str, value: &str) -> Req {
            self.signed.push((name.to_owned(), value.to_owned()));
            self
        }

        /// A header the signature does not cover.
        pub fn unsigned(mut self, name: &str, value: &str) -> Req {
            self.unsigned.push((name.to_owned(), value.to_owned()));
            self
        }

        pub fn body(mut self, body: Vec<u8>) -> Req {
            self.body = body;
            self
        }

        pub fn payload(mut self, payload: Payload) -> Req {
            self.payload = payload;
            self
        }

        pub fn auth(mut self, auth: Auth) -> Req {
            self.auth = auth;
            self
        }

        pub fn framing(mut self, framing: Framing) -> Req {
            self.framing = framing;
            self
        }

        pub fn expect_continue(mut self) -> Req {
            self.expect = true;
            self
        }

        pub fn half_close(mut self) -> Req {
            self.half_close = true;
            self
        }

        pub fn http10(mut self) -> Req {
            self.version = "HTTP/1.0";
            self
        }

        pub fn host(mut self, host: &str) -> Req {
            self.host = host.to_owned();
            self
        }

        /// Signs this target instead of the one on the wire (which is no valid URI).
        pub fn sign_as(mut self, target: &str) -> Req {
            self.sign_target = Some(target.to_owned());
            self
        }

        /// The exact bytes: request line, Host, signed headers, the
        /// signature's headers, unsigned headers, framing, Expect.
        pub fn build(&self, signer: &Signer) -> Exchange {
            let (streaming, body) = self.payload_body(signer);
            let mut target = self.target.clone();
            let mut fields = vec![("Host".to_owned(), self.host.clone())];
            fields.extend(self.signed.iter().cloned());
            fields.extend(streaming.iter().cloned());
            match self.auth {
                Auth::Header | Auth::WrongSecret => {
                    fields.extend(self.authorization(signer, &streaming).0)
                }
                Auth::Presigned => target = signer.presign(self.method, &self.target),
                Auth::Anonymous => {}
            }
            fields.extend(self.unsigned.iter().cloned());
            let body = match self.framing {
                Framing::ContentLength => body,
                Framing::Chunked | Framing::LengthAndChunked => codec::chunked(&body, 16 * 1024),
            };
            let has_body = !body.is_empty() || matches!(self.method, "PUT" | "POST");
            if self.framing != Framing::Chunked && has_body {
                fields.push(("Content-Length".to_owned(), body.len().to_string()));
            }
            if self.framing != Framing::ContentLength {
                fields.push(("Transfer-Encoding".to_owned(), "chunked".to_owned()));
            }
            if self.expect {
                fields.push(("Expect".to_owned(), "100-continue".to_owned()));
            }
            let mut head = format!("{} {target} {}\r\n", self.method, self.version).into_bytes();
            for (name, value) in fields {
                head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            Exchange {
                head,
                body,
                sending: if self.expect {
                    Sending::AfterContinue
                } else {
                    Sending::WithHead
                },
                half_close: self.half_close,
                head_request: self.method == "HEAD",
            }
        }

        fn secret(&self) -> &'static str {
            match self.auth {
                Auth::WrongSecret => WRONG_SECRET,
                _ => SECRET_KEY,
            }
        }

        /// The signature's headers; `streaming` are the aws-chunked headers,
        /// which are signed too.
        fn authorization(
            &self,
            signer: &Signer,
            streaming: &[(String, String)],
        ) -> (Vec<(String, String)>, String) {
            let mut signed = vec![("host".to_owned(), self.host.clone())];
            signed.extend(
                self.signed
                    .iter()
                    .chain(streaming)
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.clone())),
            );
            let payload = match self.payload {
                Payload::Hashed => SignableBody::Bytes(&self.body),
                Payload::Unsigned => SignableBody::UnsignedPayload,
                Payload::SignedChunks => {
                    SignableBody::Precomputed("STREAMING-AWS4-HMAC-SHA256-PAYLOAD".into())
                }
                Payload::TrailerCrc32 => {
                    SignableBody::Precomputed("STREAMING-UNSIGNED-PAYLOAD-TRAILER".into())
                }
            };
            let target = self.sign_target.as_deref().unwrap_or(&self.target);
            signer.headers(self.secret(), self.method, target, &signed, payload)
        }

        /// The aws-chunked headers and the encoded body, or none and the body.
        fn payload_body(&self, signer: &Signer) -> (Vec<(String, String)>, Vec<u8>) {
            let length = self.body.len().to_string();
            let mut headers = vec![
                ("Content-Encoding".to_owned(), "aws-chunked".to_owned()),
                ("x-amz-decoded-content-length".to_owned(), length),
            ];
            match self.payload {
                Payload::Hashed | Payload::Unsigned => (Vec::new(), self.body.clone()),
                Payload::SignedChunks => {
                    let (_, seed) = self.authorization(signer, &headers);
                    (headers, signed_chunks(signer, &self.body, seed))
                }
                Payload::TrailerCrc32 => {
                    headers.push((
                        "x-amz-trailer".to_owned(),
                        "x-amz-checksum-crc32".to_owned(),
                    ));
                    (headers, trailer_chunks(&self.body))
                }
            }
        }
    }

    fn signed_chunks(signer: &Signer, content: &[u8], seed: String) -> Vec<u8> {
        let mut previous = seed;
        let mut body = Vec::new();
        for chunk in content.chunks(CHUNK).chain([&[][..]]) {
            previous = signer.chunk_signature(chunk, &previous);
            body.extend_from_slice(
                format!("{:x};chunk-signature={previous}\r\n", chunk.len()).as_bytes(),
            );
            body.extend_from_slice(chunk);
            body.extend_from_slice(b"\r\n");
        }
        body
    }

    fn trailer_chunks(content: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for chunk in content.chunks(CHUNK) {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(chunk);
            body.extend_from_slice(b"\r\n");
        }
        let crc = codec::base64(&codec::crc32(content).to_be_bytes());
        body.extend_from_slice(format!("0\r\nx-amz-checksum-crc32:{crc}\r\n\r\n").as_bytes());
        body
    }
}

/// Request smuggling through `Expect: 100-continue` (issue 10, section 1): a
/// client announces `Expect: 100-continue` but sends at once a body that is
/// itself an HTTP request; other clients follow through the same proxy. The
/// backend must never get body bytes it did not ask for, and every client
/// must get its own answer.
mod smuggling {
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::codec;
    use crate::corpus::Fixture;
    use crate::sigv4::{Auth, Req};
    use crate::wire::{self, Exchange, Sending};
    use support::ProxyUnderTest;
    use support::relay::{ConnectionRecord, Relay};

    const SMUGGLED: &[u8] = b"GET /some-bucket HTTP/1.1\r\nHost: x\r\n\r\n";
    const ROUNDS: usize = 5;
    const LIMIT: Duration = Duration::from_secs(20);

    pub async fn assert_smuggled_request_never_reaches(backend: SocketAddr, bucket: &str) {
        let fixture = Fixture::create(backend, bucket).await;
        // The issue's input (radosgw rejects it before reading the body), and
        // one every backend rejects early (s3s-fs creates missing buckets).
        let smugglers = [
            smuggler(&fixture, Req::new("PUT", "/no-such-bucket-smuggle/k")),
            smuggler(
                &fixture,
                fixture.req("PUT", "/smuggle").auth(Auth::WrongSecret),
            ),
        ];
        let mut own_answers = Vec::new();
        for exchange in &smugglers {
            own_answers.push(wire::outcome(&wire::send(backend, exchange, LIMIT).await));
        }
        let relay = Relay::start(backend).await.unwrap();
        let proxy = ProxyUnderTest::start(relay.address, "").await.unwrap();
        let mut failures = Vec::new();
        for round in 1..=ROUNDS {
            for (exchange, own) in smugglers.iter().zip(&own_answers) {
                let answer = wire::outcome(&wire::send(proxy.address, exchange, LIMIT).await);
                if &answer != own {
                    failures.push(format!("round {round}: a smuggling client got {answer}, straight to the backend {own}"));
                }
                failures.extend(other_clients(proxy.address, &fixture, round).await);
            }
        }
        let _ = relay.wait_settled(Duration::from_millis(200), LIMIT).await;
        for (index, connection) in relay.connections().iter().enumerate() {
            failures.extend(unasked_bytes(index, connection));
        }
        assert!(
            failures.is_empty(),
            "{} failure(s):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// `request` announcing `Expect: 100-continue` and sending the body
    /// without waiting, as a misbehaving client does.
    fn smuggler(fixture: &Fixture, request: Req) -> Exchange {
        let request = request.body(SMUGGLED.to_vec()).expect_continue();
        Exchange {
            sending: Sending::WithHead,
            ..fixture.build(request)
        }
    }

    /// A ListBuckets and a GET, each on its own connection: each must get its own answer.
    async fn other_clients(proxy: SocketAddr, fixture: &Fixture, round: usize) -> Vec<String> {
        let list = wire::send(proxy, &fixture.build(Req::new("GET", "/")), LIMIT).await;
        let get = wire::send(proxy, &fixture.build(fixture.get("/obj")), LIMIT).await;
        let mut failures = Vec::new();
        if !matches!(&list, Ok(a) if a.message.status() == 200 && codec::find(&a.message.body, format!("<Name>{}</Name>", fixture.bucket).as_bytes()).is_some())
        {
            failures.push(format!(
                "round {round}: the next client's ListBuckets got {}",
                shown(&list)
            ));
        }
        if !matches!(&get, Ok(a) if a.message.status() == 200 && a.message.body == fixture.object) {
            failures.push(format!(
                "round {round}: the next client's GET of obj got {}",
                shown(&get)
            ));
        }
        failures
    }

    /// The smuggled bytes reaching the backend before it asked for the body
    /// with a `100 Continue` after the request's head.
    fn unasked_bytes(index: usize, connection: &ConnectionRecord) -> Vec<String> {
        let mut failures = Vec::new();
        let mut from = 0;
        while let Some(found) = codec::find(&connection.to_backend[from..], &SMUGGLED[..16]) {
            let at = from + found;
            from = at + 1;
            let head = codec::rfind(&connection.to_backend[..at], b"PUT ").unwrap_or(0);
            let answered_by_head = connection.answered_before(head).len();
            let asked = &connection.answered_before(at)[answered_by_head..];
            if codec::find(asked, b" 100 ").is_none() {
                failures.push(format!(
                    "backend connection {index} received the smuggled bytes at byte {at} without asking for them; it had answered: {}; it received: {}",
                    codec::preview(asked, 300),
                    codec::preview(&connection.to_backend[head..], 600)
                ));
            }
        }
        failures
    }

    fn shown(answer: &anyhow::Result<wire::Response>) -> String {
        match answer {
            Ok(a) => format!(
                "{}: {}",
                a.message.start_line,
                codec::preview(&a.message.body, 300)
            ),
            Err(error) => format!("no answer: {error:#}"),
        }
    }
}

/// Early final answers (issue 10, section 2): the backend answers before it
/// read the body, and the client must get that answer.
mod early_answers {
    use std::net::SocketAddr;
    use std::time::Duration;

    use crate::corpus::Fixture;
    use crate::sigv4::{Auth, Payload};
    use crate::wire;
    use support::ProxyUnderTest;

    const TRIES: usize = 20;
    const SIZE: usize = 16 << 20;
    const LIMIT: Duration = Duration::from_secs(30);

    pub async fn assert_bad_signature_upload_gets_403(
        backend: SocketAddr,
        bucket: &str,
        expect: bool,
    ) {
        let fixture = Fixture::create(backend, bucket).await;
        let mut request = fixture
            .req("PUT", "/bad-signature-16mib")
            .body(vec![0x5a; SIZE])
            .payload(Payload::Unsigned)
            .auth(Auth::WrongSecret);
        if expect {
            request = request.expect_continue();
        }
        let upload = fixture.build(request);
        let straight = wire::outcome(&wire::send(backend, &upload, LIMIT).await);
        assert!(
            straight.starts_with("403 "),
            "straight to the backend: {straight}"
        );

        let proxy = ProxyUnderTest::start(backend, "").await.unwrap();
        let mut wrong = Vec::new();
        for attempt in 1..=TRIES {
            let proxied = wire::outcome(&wire::send(proxy.address, &upload, LIMIT).await);
            if proxied != straight {
                wrong.push(format!("try {attempt}: {proxied}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {TRIES} tries did not get the backend's answer ({straight}):\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
}

/// Small encodings the tests need, without more dependencies.
mod codec {

    pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        if needle.is_empty() || haystack.len() < needle.len() {
            return None;
        }
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    pub fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        if needle.is_empty() || haystack.len() < needle.len() {
            return None;
        }
        haystack.windows(needle.len()).rposition(|w| w == needle)
    }

    pub fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(haystack.len());
        let mut rest = haystack;
        while let Some(at) = find(rest, needle) {
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(with);
            rest = &rest[at + needle.len()..];
        }
        out.extend_from_slice(rest);
        out
    }

    /// Replaces the `length` bytes after every `marker` with `<masked>`.
    pub fn mask_after(haystack: &[u8], marker: &[u8], length: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(haystack.len());
        let mut rest = haystack;
        while let Some(at) = find(rest, marker) {
            let end = (at + marker.len() + length).min(rest.len());
            out.extend_from_slice(&rest[..at + marker.len()]);
            out.extend_from_slice(b"<masked>");
            rest = &rest[end..];
        }
        out.extend_from_slice(rest);
        out
    }

    /// Printable text: control and non-ASCII bytes escaped, cut at `limit`.
    pub fn preview(bytes: &[u8], limit: usize) -> String {
        let shown: String = bytes
            .iter()
            .take(limit)
            .flat_map(|&b| std::ascii::escape_default(b))
            .map(char::from)
            .collect();
        match bytes.len() > limit {
            true => format!("{shown}... ({} more bytes)", bytes.len() - limit),
            false => shown,
        }
    }

    pub fn sha256_hex(bytes: &[u8]) -> String {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let hash = suite
            .tls13()
            .expect("a TLS 1.3 suite")
            .common
            .hash_provider
            .hash(bytes);
        hex(hash.as_ref())
    }

    pub fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn hex_decode(text: &str) -> Vec<u8> {
        (0..text.len() / 2)
            .filter_map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
            .collect()
    }

    /// RFC 3986 unreserved characters kept, every other byte percent-encoded.
    pub fn uri_encode(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    pub fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for group in bytes.chunks(3) {
            let n = group
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                match i <= group.len() {
                    true => out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize])),
                    false => out.push('='),
                }
            }
        }
        out
    }

    /// CRC-32 (IEEE), as S3's `x-amz-checksum-crc32`.
    pub fn crc32(bytes: &[u8]) -> u32 {
        !bytes.iter().fold(!0u32, |crc, &b| {
            (0..8).fold(crc ^ u32::from(b), |c, _| match c & 1 {
                1 => (c >> 1) ^ 0xEDB8_8320,
                _ => c >> 1,
            })
        })
    }

    /// A valid gzip member holding `bytes` in stored (uncompressed) blocks.
    pub fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        let mut blocks: Vec<&[u8]> = bytes.chunks(0xffff).collect();
        if blocks.is_empty() {
            blocks.push(&[]);
        }
        for (index, block) in blocks.iter().enumerate() {
            let last = u8::from(index + 1 == blocks.len());
            let length = block.len() as u16;
            out.push(last);
            out.extend_from_slice(&length.to_le_bytes());
            out.extend_from_slice(&(!length).to_le_bytes());
            out.extend_from_slice(block);
        }
        out.extend_from_slice(&crc32(bytes).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out
    }

    /// HTTP/1.1 chunked transfer coding of `bytes` in pieces of `size`.
    pub fn chunked(bytes: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(size) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    /// The text of the first `<tag>...</tag>` in an XML body.
    pub fn xml_value(body: &[u8], tag: &str) -> Option<String> {
        let text = String::from_utf8_lossy(body);
        let start = text.find(&format!("<{tag}>"))? + tag.len() + 2;
        let end = start + text[start..].find(&format!("</{tag}>"))?;
        Some(text[start..end].to_owned()).filter(|v| !v.is_empty())
    }
}
