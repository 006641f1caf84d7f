//! Header rewriting at the proxy: hop-by-hop headers (RFC 9110 section 7.6.1)
//! are dropped in both directions, `X-Forwarded-For`/`-Proto` are added to
//! requests. Everything end-to-end, and so everything SigV4 signs (Host,
//! `Authorization`, `x-amz-*`, `Content-MD5`, `Content-Encoding`), is untouched.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        // A client may not use `Connection` to strip what the backend must see.
        if name != header::HOST
            && name != header::AUTHORIZATION
            && !name.as_str().starts_with("x-amz-")
        {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Adds the client address to `X-Forwarded-For` and sets `X-Forwarded-Proto`.
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, scheme: &'static str) {
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_signed_ones_stay() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(
            header::AUTHORIZATION,
            "AWS4-HMAC-SHA256 ...".parse().unwrap(),
        );
        headers.insert("x-amz-content-sha256", "UNSIGNED-PAYLOAD".parse().unwrap());
        headers.insert(header::CONTENT_ENCODING, "aws-chunked".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key(header::CONNECTION));
        assert!(!headers.contains_key("x-private"));
        assert!(!headers.contains_key(header::TRANSFER_ENCODING));
        assert!(headers.contains_key(header::AUTHORIZATION));
        assert!(headers.contains_key("x-amz-content-sha256"));
        assert_eq!(headers[header::CONTENT_ENCODING], "aws-chunked");
    }

    #[test]
    fn a_connection_header_cannot_strip_signed_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            "authorization, x-amz-date".parse().unwrap(),
        );
        headers.insert(header::AUTHORIZATION, "sig".parse().unwrap());
        headers.insert("x-amz-date", "20260101T000000Z".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(headers.contains_key(header::AUTHORIZATION));
        assert!(headers.contains_key("x-amz-date"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        add_forwarded(&mut headers, "127.0.0.1".parse().unwrap(), "http");
        assert_eq!(headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
    }
}
