//! The request as the backend receives it: the client's request with the
//! target as sent (origin-form from HTTP/2), its version (HTTP/1.0 stays
//! 1.0), hop-by-hop headers gone (a plain `Connection` kept), forwarding
//! headers added unless signed, and hyper's record of the header names' case.
//! Rebuilt, minus the body, for every attempt.

use std::net::SocketAddr;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version, header};
use hyper::body::Incoming;

use crate::config::ForwardingConfig;
use crate::headers;
use crate::quarantine::Fingerprint;
use crate::replay::AttemptBody;

/// What is sent upstream, minus the body: rebuilt for every attempt.
pub struct Outbound {
    pub method: Method,
    pub uri: Uri,
    /// HTTP/1.0 from an HTTP/1.0 client, so the backend decides the
    /// connection's fate as it would for that client; HTTP/1.1 otherwise.
    pub version: Version,
    pub headers: HeaderMap,
    /// The client request's extensions: hyper's record of the header names'
    /// case travels in them, so the backend sees the names as the client
    /// wrote them.
    extensions: http::Extensions,
    /// "The same request" for the quarantine, made when first needed.
    fingerprint: std::sync::OnceLock<Fingerprint>,
}

impl Outbound {
    /// "The same request" for the quarantine.
    pub fn fingerprint(&self) -> &Fingerprint {
        self.fingerprint
            .get_or_init(|| Fingerprint::of(&self.method, &self.uri, &self.headers))
    }
}

impl Outbound {
    /// The request for one attempt, with `body`.
    pub fn request(&self, body: AttemptBody<Incoming>) -> Request<AttemptBody<Incoming>> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
    }
}

/// The request target the backend gets: as hyper parsed it when it is in
/// absolute-form (RFC 9112 section 3.2.2) or origin-form; else (HTTP/2's
/// scheme and authority, an authority-form target) its path and query, `/`
/// when it has none.
fn target(uri: Uri, version: Version) -> Uri {
    let as_parsed = uri.scheme().is_some() || uri.authority().is_none();
    if as_parsed && version != Version::HTTP_2 {
        uri
    } else {
        origin_form(&uri)
    }
}

/// The path and query of `uri` alone (RFC 9112 section 3.2.1).
fn origin_form(uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// The request as the backend should see it: the target as the client sent
/// it (origin-form from HTTP/2), hop-by-hop headers gone, forwarding headers
/// added, everything signed untouched.
pub fn outbound(
    parts: http::request::Parts,
    client: SocketAddr,
    forwarded_for: impl FnOnce() -> HeaderValue,
    scheme: &'static str,
    forwarding: &ForwardingConfig,
) -> Outbound {
    let http::request::Parts {
        method,
        uri,
        version,
        mut headers,
        extensions,
        ..
    } = parts;
    let chunked = version != Version::HTTP_2 && headers.contains_key(header::TRANSFER_ENCODING);
    headers::strip_hop_by_hop(&mut headers);
    if chunked && matches!(method, Method::GET | Method::HEAD | Method::CONNECT) {
        // hyper's client sends a GET, HEAD or CONNECT body of unknown
        // length only when the request says so ("GET, HEAD, and CONNECT
        // almost never have bodies"): without this the body the client
        // chunked would be dropped, and the backend would answer a request
        // it never got (RFC 9110 section 9.3.1: such a body has no defined
        // meaning, and it is the backend's to refuse).
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if version == Version::HTTP_2 && !headers.contains_key(header::HOST) {
        // HTTP/2 carries the host as :authority; HTTP/1.1 needs it as Host.
        // An HTTP/1.1 request without Host reaches the backend without one.
        // (Before the forwarding headers: it counts toward the backend's
        // limits they are kept within.)
        if let Some(value) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
    let client = client.ip();
    headers::add_forwarded(
        &mut headers,
        uri.query(),
        client,
        forwarded_for,
        scheme,
        forwarding,
    );
    let uri = target(uri, version);
    Outbound {
        method,
        uri,
        version: match version {
            Version::HTTP_10 => Version::HTTP_10,
            _ => Version::HTTP_11,
        },
        headers,
        extensions,
        fingerprint: std::sync::OnceLock::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(target: &str, version: Version) -> String {
        super::target(target.parse().unwrap(), version).to_string()
    }

    #[test]
    fn origin_and_absolute_form_targets_go_as_the_client_sent_them() {
        let http11 = Version::HTTP_11;
        assert_eq!(sent("/bucket/key?uploads", http11), "/bucket/key?uploads");
        assert_eq!(sent("*", http11), "*");
        assert_eq!(
            sent("http://s3.local/bucket/key?x=1", http11),
            "http://s3.local/bucket/key?x=1"
        );
    }

    /// An HTTP/2 request whose fields, with the Host it gets from
    /// `:authority`, reach the backend's limit gets no forwarding headers.
    #[test]
    fn an_http2_host_counts_toward_the_backends_limit_on_fields() {
        let forwarding = ForwardingConfig {
            enabled: true,
            trusted_proxies: Vec::new(),
            backend_max_headers: 100,
            backend_max_head_bytes: 16 << 10,
        };
        let mut request = Request::get("https://s3.local/b/k").version(Version::HTTP_2);
        for n in 0..98 {
            request = request.header(format!("x-extra-{n}"), "v");
        }
        let (parts, ()) = request.body(()).unwrap().into_parts();
        let client = "192.0.2.1:5000".parse().unwrap();
        let value = || HeaderValue::from_static("192.0.2.1");
        let sent = outbound(parts, client, value, "https", &forwarding);
        assert_eq!(sent.headers.len(), 99, "98 fields and Host");
        assert!(!sent.headers.contains_key("x-forwarded-for"));
    }

    #[test]
    fn authority_form_and_http2_targets_become_origin_form() {
        assert_eq!(sent("s3.local:80", Version::HTTP_11), "/");
        assert_eq!(sent("https://s3.local/b/k?x", Version::HTTP_2), "/b/k?x");
    }
}
