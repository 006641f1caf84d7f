//! A fake Kubernetes API server on loopback that the real `kube` client talks
//! to over HTTP: LIST and WATCH of EndpointSlices and Leases with label and
//! field selectors, a resourceVersion-ordered event log replayed to each watch
//! from the version it asks for, bookmarks, and "410 Expired" sent as an ERROR
//! watch event as the real API server does. The test edits objects, expires
//! watches, and stops and restarts the server on the same port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use super::ChunkFeed;

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/";

/// One change in the log.
#[derive(Clone, Debug)]
struct Change {
    version: u64,
    kind: &'static str,
    action: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    version: u64,
    /// Watches from a version below this get 410 Expired.
    oldest: u64,
    objects: BTreeMap<(&'static str, String), Value>,
    log: Vec<Change>,
}

/// The server and its state.
pub struct FakeKube {
    pub address: SocketAddr,
    namespace: String,
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Option<Change>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

type Body = BoxBody<Bytes, std::io::Error>;

impl FakeKube {
    pub async fn start(namespace: &str) -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut fake = FakeKube {
            address: listener.local_addr().unwrap(),
            namespace: namespace.to_owned(),
            store: Arc::new(Mutex::new(Store::default())),
            changes: broadcast::channel(1024).0,
            task: None,
        };
        fake.serve(listener);
        fake
    }

    /// A kubeconfig file pointing at this server, for the proxy's config.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user:\n    token: test-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {}\ncurrent-context: fake\n",
            self.address, self.namespace
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn serve(&mut self, listener: TcpListener) {
        let (store, changes, namespace) = (
            Arc::clone(&self.store),
            self.changes.clone(),
            self.namespace.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (store, changes, namespace) =
                    (Arc::clone(&store), changes.clone(), namespace.clone());
                let service = hyper::service::service_fn(move |request| {
                    let (store, changes, namespace) =
                        (Arc::clone(&store), changes.clone(), namespace.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(handle(
                            request, &store, &changes, &namespace,
                        ))
                    }
                });
                connections.spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        }));
    }

    /// The API server goes away: listener and every connection closed.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = self.changes.send(None);
    }

    /// The API server comes back on the same port with the same state.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.address).await.unwrap();
        self.serve(listener);
    }

    /// Every watch falls behind: open ones get a 410 ERROR event, and
    /// resuming from any version seen so far is refused with 410.
    pub fn expire_watches(&self) {
        {
            let mut store = self.store.lock().unwrap();
            store.version += 1;
            store.oldest = store.version;
            store.log.clear();
        }
        let _ = self.changes.send(None);
    }

    fn record(&self, kind: &'static str, action: &'static str, mut object: Value) {
        let change = {
            let mut store = self.store.lock().unwrap();
            store.version += 1;
            object["metadata"]["resourceVersion"] = json!(store.version.to_string());
            let name = object["metadata"]["name"].as_str().unwrap().to_owned();
            if action == "DELETED" {
                store.objects.remove(&(kind, name));
            } else {
                store.objects.insert((kind, name), object.clone());
            }
            let change = Change {
                version: store.version,
                kind,
                action,
                object,
            };
            store.log.push(change.clone());
            change
        };
        let _ = self.changes.send(Some(change));
    }

    fn exists(&self, kind: &'static str, name: &str) -> bool {
        self.store
            .lock()
            .unwrap()
            .objects
            .contains_key(&(kind, name.to_owned()))
    }

    /// Creates or replaces the Service's one EndpointSlice: `(ip, serving,
    /// terminating)` per endpoint, all on the named port `s3`.
    pub fn set_endpoints(&self, service: &str, port: u16, endpoints: &[(&str, bool, bool)]) {
        let name = format!("{service}-abcde");
        let action = if self.exists("EndpointSlice", &name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(ip, serving, terminating)| {
                json!({
                    "addresses": [ip],
                    // As with publishNotReadyAddresses: ready says nothing.
                    "conditions": {"ready": true, "serving": serving, "terminating": terminating},
                })
            })
            .collect();
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": format!("uid-{name}"),
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "s3", "port": port, "protocol": "TCP"}],
        });
        self.record("EndpointSlice", action, slice);
    }

    /// A Lease renewed now, valid for `seconds`.
    pub fn put_lease(&self, name: &str, holder: &str, seconds: i32) {
        let action = if self.exists("Lease", name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": self.namespace, "uid": format!("uid-{name}-{now}")},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds, "acquireTime": now, "renewTime": now},
        });
        self.record("Lease", action, lease);
    }

    pub fn delete_lease(&self, name: &str) {
        let object = self
            .store
            .lock()
            .unwrap()
            .objects
            .get(&("Lease", name.to_owned()))
            .cloned();
        if let Some(object) = object {
            self.record("Lease", "DELETED", object);
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The query parameters of a request.
fn query(request: &Request<Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Whether `object` matches `key=value[,key=value]` selectors on labels and fields.
fn matches(object: &Value, labels: Option<&String>, fields: Option<&String>) -> bool {
    let label_ok = labels.is_none_or(|selector| {
        selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((key, value)) => object["metadata"]["labels"][key].as_str() == Some(value),
                None => false,
            })
    });
    let field_ok = fields.is_none_or(|selector| {
        selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some(("metadata.name", value)) => {
                    object["metadata"]["name"].as_str() == Some(value)
                }
                Some(("metadata.namespace", value)) => {
                    object["metadata"]["namespace"].as_str() == Some(value)
                }
                _ => false,
            })
    });
    label_ok && field_ok
}

fn handle(
    request: Request<Incoming>,
    store: &Arc<Mutex<Store>>,
    changes: &broadcast::Sender<Option<Change>>,
    namespace: &str,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let kind = if path == format!("{SLICES}{namespace}/endpointslices") {
        "EndpointSlice"
    } else if path == format!("{LEASES}{namespace}/leases") {
        "Lease"
    } else {
        return json_response(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", &format!("no such path {path}")),
        );
    };
    let params = query(&request);
    let (labels, fields) = (params.get("labelSelector"), params.get("fieldSelector"));
    let watching = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let store = store.lock().unwrap();
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|((k, _), object)| *k == kind && matches(object, labels, fields))
            .map(|(_, object)| object.clone())
            .collect();
        let list = json!({
            "apiVersion": if kind == "Lease" { "coordination.k8s.io/v1" } else { "discovery.k8s.io/v1" },
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": store.version.to_string()},
            "items": items,
        });
        return json_response(StatusCode::OK, list);
    }
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (feed, body) = mpsc::channel::<Bytes>(64);
    let mut live = changes.subscribe();
    let backlog: Result<Vec<Change>, ()> = {
        let store = store.lock().unwrap();
        if from < store.oldest {
            Err(())
        } else {
            Ok(store
                .log
                .iter()
                .filter(|c| c.version > from && c.kind == kind)
                .cloned()
                .collect())
        }
    };
    let (labels, fields) = (labels.cloned(), fields.cloned());
    let store = Arc::clone(store);
    tokio::spawn(async move {
        let send = |value: Value| {
            let feed = feed.clone();
            async move { feed.send(Bytes::from(format!("{value}\n"))).await.is_ok() }
        };
        let Ok(backlog) = backlog else {
            send(expired()).await;
            return;
        };
        let mut seen = from;
        for change in backlog {
            if matches(&change.object, labels.as_ref(), fields.as_ref())
                && !send(event(&change)).await
            {
                return;
            }
            seen = change.version;
        }
        let mut bookmarks = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                change = live.recv() => match change {
                    Ok(Some(change)) if change.kind == kind && change.version > seen => {
                        seen = change.version;
                        if matches(&change.object, labels.as_ref(), fields.as_ref()) && !send(event(&change)).await {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    // Expired or stopped: a behind watch gets 410, as the API server does.
                    Ok(None) | Err(_) => {
                        if seen < store.lock().unwrap().oldest {
                            send(expired()).await;
                        }
                        return;
                    }
                },
                _ = bookmarks.tick() => {
                    let version = store.lock().unwrap().version;
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind,
                        "apiVersion": if kind == "Lease" { "coordination.k8s.io/v1" } else { "discovery.k8s.io/v1" },
                        "metadata": {"resourceVersion": version.to_string()},
                    }});
                    if !send(bookmark).await {
                        return;
                    }
                }
            }
        }
    });
    let mut response = Response::new(ChunkFeed(body).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    response
}

fn event(change: &Change) -> Value {
    json!({"type": change.action, "object": change.object})
}

fn expired() -> Value {
    json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    response
}
