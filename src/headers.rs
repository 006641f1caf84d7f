//! Header rewriting at the proxy: hop-by-hop headers (RFC 9110 section 7.6.1)
//! are dropped in both directions (the fields a `Connection` header names are
//! kept), `X-Forwarded-For`/`-Proto` are added to
//! requests unless the signature covers them. Everything end-to-end, and so
//! everything SigV4 signs (Host, `Authorization`, `x-amz-*`, `Content-MD5`,
//! `Content-Encoding`), is untouched.

use std::net::IpAddr;

use http::header::Entry;
use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::config::ForwardingConfig;

const HOP_BY_HOP_COUNT: usize = 8;
/// Named once, so removing them needs no name parsing per request.
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1), but keeps a
/// `Connection` header that only says `close` or `keep-alive`: each side then
/// sees the connection handling the other announced, as it would without the
/// proxy. hyper acts on it too: it closes the client connection after a
/// response that says `close`, and a backend connection whose response says
/// `close` is not pooled.
///
/// Other fields a `Connection` header names are kept, as nginx keeps them:
/// removing them would let a client's `Connection: If-None-Match` turn a
/// conditional write into an overwrite, or `Connection: Content-MD5` skip
/// the integrity check, where the backend alone would have honoured them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most heads carry none but `Connection`: one pass over the names finds
    // them, and nothing is looked up by name that is not there.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(index) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[index] = true;
        }
    }
    let plain = |value: &HeaderValue| {
        value.as_bytes().split(|&b| b == b',').all(|token| {
            let token = token.trim_ascii();
            token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive")
        })
    };
    // `HOP_BY_HOP[0]` is `Connection`: kept when plain.
    present[0] = present[0] && !headers.get_all(header::CONNECTION).iter().all(plain);
    if present.contains(&true) {
        let removed = |name: &HeaderName| {
            HOP_BY_HOP
                .iter()
                .zip(present)
                .any(|(hop, present)| present && hop == name)
        };
        *headers = without(std::mem::take(headers), removed);
    }
}

/// `headers` without the fields `removed` names, the others in their order
/// (`HeaderMap::remove` would move the last field into the gap).
fn without(headers: HeaderMap, removed: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(headers.len());
    // `into_iter` names a field's first value only; the rest follow it.
    let mut name: Option<HeaderName> = None;
    for (first, value) in headers {
        if first.is_some() {
            name = first;
        }
        if let Some(name) = name.as_ref().filter(|name| !removed(name)) {
            kept.append(name.clone(), value);
        }
    }
    kept
}

/// Adds the client to `X-Forwarded-For` and states `X-Forwarded-Proto`,
/// never touching a header the request's signature covers.
///
/// `X-Forwarded-For`: every line the client sent is kept; the client address
/// (`client`, as `written` makes it: [`address_value`], made once per
/// connection) is appended to the last one (no new field line when one
/// exists, so the request does not grow by a header the backend counts), or
/// added as the only one. `X-Forwarded-Proto`: kept when the hop is a trusted proxy (a
/// TLS-terminating load balancer in front; radosgw's
/// `rgw_trust_forwarded_https` relies on it), else set to `scheme`.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    query: Option<&str>,
    client: IpAddr,
    written: impl FnOnce() -> HeaderValue,
    scheme: &'static str,
    forwarding: &ForwardingConfig,
) {
    if !forwarding.enabled {
        return;
    }
    if !room_for_forwarding(headers, query, forwarding) {
        tracing::debug!("request head near the backend's limits: no forwarding headers added");
        return;
    }
    let signed = signed_list(headers, query);
    let (for_signed, proto_signed) = (
        is_signed(signed, X_FORWARDED_FOR.as_str()),
        is_signed(signed, X_FORWARDED_PROTO.as_str()),
    );
    if !for_signed {
        append_forwarded_for(headers, written);
    }
    let trusted = forwarding
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&client));
    let kept = trusted && headers.contains_key(X_FORWARDED_PROTO);
    if !kept && !proto_signed {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
}

/// The most the forwarding headers add: two new field lines.
const FORWARDING_LINES: usize = 2;
const FORWARDING_BYTES: usize = "x-forwarded-for: \r\nx-forwarded-proto: https\r\n".len() + 41;

/// Whether the forwarding headers fit within the backend's limits on a
/// request head, counted as the client sent it (each field line is
/// `name: value\r\n`; the request line is about the target's length).
fn room_for_forwarding(
    headers: &HeaderMap,
    query: Option<&str>,
    forwarding: &ForwardingConfig,
) -> bool {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    room_for_lines(headers.len(), fields, query, forwarding)
}

/// [`room_for_forwarding`] for `lines` field lines of `bytes` bytes.
fn room_for_lines(
    lines: usize,
    bytes: usize,
    query: Option<&str>,
    forwarding: &ForwardingConfig,
) -> bool {
    let request_line = 32 + query.map_or(0, str::len);
    lines + FORWARDING_LINES <= forwarding.backend_max_headers
        && request_line + bytes + FORWARDING_BYTES <= forwarding.backend_max_head_bytes
}

/// Which of `X-Forwarded-For` and `X-Forwarded-Proto` [`add_forwarded`]
/// would add to a request head of these field lines that carries neither
/// (the raw path, [`crate::raw_http1`], appends them as lines of its own:
/// where `add_forwarded` puts them in such a head).
pub fn forwarding_lines(
    fields: &[httparse::Header<'_>],
    query: Option<&str>,
    forwarding: &ForwardingConfig,
) -> (bool, bool) {
    if !forwarding.enabled {
        return (false, false);
    }
    let bytes = fields
        .iter()
        .map(|field| field.name.len() + field.value.len() + 4)
        .sum();
    if !room_for_lines(fields.len(), bytes, query, forwarding) {
        tracing::debug!("request head near the backend's limits: no forwarding headers added");
        return (false, false);
    }
    let authorization = fields
        .iter()
        .find(|field| {
            field
                .name
                .eq_ignore_ascii_case(header::AUTHORIZATION.as_str())
        })
        .and_then(|field| std::str::from_utf8(field.value).ok());
    let signed = signed_list_of(authorization, query);
    (
        !is_signed(signed, X_FORWARDED_FOR.as_str()),
        !is_signed(signed, X_FORWARDED_PROTO.as_str()),
    )
}

// Names made once: a name given as text is parsed for every lookup, and
// copied into an allocation of its own when inserted.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn append_forwarded_for(headers: &mut HeaderMap, client: impl FnOnce() -> HeaderValue) {
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Vacant(entry) => {
            entry.insert(client());
        }
        Entry::Occupied(mut entry) => {
            if let Some(last) = entry.iter_mut().last() {
                let mut value = last.as_bytes().to_vec();
                value.extend_from_slice(b", ");
                value.extend_from_slice(client().as_bytes());
                if let Ok(appended) = HeaderValue::from_bytes(&value) {
                    *last = appended;
                }
            }
        }
    }
}

/// `client` as `X-Forwarded-For` writes it: dotted decimal for IPv4
/// (written digit by digit, the common case of every request), RFC 5952
/// text for IPv6.
pub fn address_value(client: IpAddr) -> HeaderValue {
    let text = match client {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(itoa::Buffer::new().format(octet));
            }
            text
        }
        IpAddr::V6(_) => client.to_string(),
    };
    HeaderValue::try_from(text).expect("an IP address is a valid header value")
}

/// The `SignedHeaders` list of a SigV4 signature as it appears: in the
/// `Authorization` header, or the `X-Amz-SignedHeaders` query parameter of a
/// presigned URL (its `;` then percent-encoded) (AWS, "Signature Version 4
/// signing process").
fn signed_list<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    signed_list_of(authorization, query)
}

/// [`signed_list`] of a request with this `Authorization` value.
fn signed_list_of<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    let from_authorization = authorization.and_then(|v| {
        v.split([',', ' '])
            .find_map(|part| part.trim().strip_prefix("SignedHeaders="))
    });
    from_authorization.or_else(|| {
        query?
            .split('&')
            .find_map(|pair| pair.strip_prefix("X-Amz-SignedHeaders="))
    })
}

/// The names of a [`signed_list`], as written.
fn signed_names(list: &str) -> impl Iterator<Item = &str> {
    list.split(';')
        .flat_map(|part| part.split("%3B"))
        .flat_map(|part| part.split("%3b"))
}

/// Whether the signature's list names `name` (lowercase).
fn is_signed(list: Option<&str>, name: &str) -> bool {
    list.is_some_and(|list| signed_names(list).any(|signed| signed.eq_ignore_ascii_case(name)))
}

/// The header names a SigV4 signature covers, lowercase (see
/// [`signed_list`]).
pub fn signed_headers(headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
    signed_list(headers, query)
        .map(|list| signed_names(list).map(str::to_ascii_lowercase).collect())
        .unwrap_or_default()
}

/// Drops a response's `Content-Length` when it also has a
/// `Transfer-Encoding`, which decides its framing: an intermediary that
/// forwards such a message must remove the `Content-Length` first (RFC 9112
/// section 6.3, item 3), or the client would wait for a length the body
/// never had. Call before [`strip_hop_by_hop`], which drops the
/// `Transfer-Encoding`.
pub fn drop_overridden_content_length(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Keeps the first of several `Content-Length` lines of an answer. hyper's
/// client took them (equal, or on an answer whose length they do not frame:
/// to HEAD, a `204`, a `304`), but its server refuses to write a second one
/// to a HEAD and closes the connection without an answer.
pub fn keep_one_content_length(headers: &mut HeaderMap) {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let (Some(first), Some(_)) = (lengths.next(), lengths.next()) {
        let first = first.clone();
        headers.insert(header::CONTENT_LENGTH, first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

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
        assert_eq!(headers["x-private"], "1", "a named end-to-end field stays");
        assert!(!headers.contains_key(header::TRANSFER_ENCODING));
        assert!(headers.contains_key(header::AUTHORIZATION));
        assert!(headers.contains_key("x-amz-content-sha256"));
        assert_eq!(headers[header::CONTENT_ENCODING], "aws-chunked");
    }

    #[test]
    fn a_plain_connection_header_is_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "Keep-Alive".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers[header::CONNECTION], "Keep-Alive");

        let mut naming = HeaderMap::new();
        naming.insert(header::CONNECTION, "close, If-None-Match".parse().unwrap());
        naming.insert(header::IF_NONE_MATCH, "*".parse().unwrap());
        strip_hop_by_hop(&mut naming);
        assert!(!naming.contains_key(header::CONNECTION));
        assert_eq!(
            naming[header::IF_NONE_MATCH],
            "*",
            "the condition still applies"
        );
    }

    #[test]
    fn fields_keep_their_order_around_a_plain_connection_header() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "s3.local".parse().unwrap());
        headers.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        headers.insert("x-amz-date", "20260101T000000Z".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "connection", "x-amz-date"]);
    }

    #[test]
    fn the_fields_left_keep_their_order_when_hop_by_hop_ones_go() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "s3.local".parse().unwrap());
        headers.insert("x-a", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        headers.insert("x-b", "2".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.append("x-c", "3".parse().unwrap());
        headers.append("x-c", "4".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let fields: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            fields,
            [
                ("host", "s3.local"),
                ("x-a", "1"),
                ("connection", "keep-alive"),
                ("x-b", "2"),
                ("x-c", "3"),
                ("x-c", "4"),
            ]
        );
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

    fn forwarding(trusted: &[&str]) -> ForwardingConfig {
        ForwardingConfig {
            enabled: true,
            trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            backend_max_headers: 100,
            backend_max_head_bytes: 16 << 10,
        }
    }

    #[test]
    fn no_forwarding_header_pushes_a_request_over_the_backends_limits() {
        let mut near_count = HeaderMap::new();
        for i in 0..99 {
            near_count.insert(
                HeaderName::from_bytes(format!("x-amz-meta-{i}").as_bytes()).unwrap(),
                "v".parse().unwrap(),
            );
        }
        forward(&mut near_count, None, &forwarding(&[]));
        assert_eq!(near_count.len(), 99, "nothing added to 99 fields");
        let mut near_size = HeaderMap::new();
        near_size.insert("x-amz-meta-big", "v".repeat(16300).parse().unwrap());
        forward(&mut near_size, None, &forwarding(&[]));
        assert_eq!(near_size.len(), 1, "nothing added to a 16 KiB head");
        let mut small = HeaderMap::new();
        forward(&mut small, None, &forwarding(&[]));
        assert_eq!(small.len(), 2);
    }

    const CLIENT: &str = "192.0.2.1";

    fn forward(headers: &mut HeaderMap, query: Option<&str>, config: &ForwardingConfig) {
        let client = CLIENT.parse().unwrap();
        add_forwarded(
            headers,
            query,
            client,
            || address_value(client),
            "http",
            config,
        );
    }

    #[test]
    fn client_addresses_are_written_as_their_standard_text() {
        for address in [
            "0.0.0.0",
            "10.0.12.3",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(address_value(ip), address);
        }
    }

    #[test]
    fn forwarded_for_is_appended_to_the_last_line_and_every_line_kept() {
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", "203.0.113.7".parse().unwrap());
        headers.append("x-forwarded-for", "198.51.100.2".parse().unwrap());
        forward(&mut headers, None, &forwarding(&[]));
        let lines: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(lines, ["203.0.113.7", "198.51.100.2, 192.0.2.1"]);
        assert_eq!(headers["x-forwarded-proto"], "http");
    }

    #[test]
    fn signed_forwarding_headers_are_untouched() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host;x-forwarded-for;x-forwarded-proto, Signature=0"
                .parse()
                .unwrap(),
        );
        headers.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        forward(&mut headers, None, &forwarding(&[]));
        assert_eq!(headers["x-forwarded-for"], "203.0.113.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn a_presigned_urls_signed_headers_count_too() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        let query = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-SignedHeaders=host%3Bx-forwarded-for";
        forward(&mut headers, Some(query), &forwarding(&[]));
        assert_eq!(headers["x-forwarded-for"], "203.0.113.7");
    }

    #[test]
    fn forwarded_proto_is_kept_only_from_a_trusted_hop() {
        let mut from_trusted = HeaderMap::new();
        from_trusted.insert("x-forwarded-proto", "https".parse().unwrap());
        let mut from_anyone = from_trusted.clone();
        forward(&mut from_trusted, None, &forwarding(&["192.0.2.0/24"]));
        forward(&mut from_anyone, None, &forwarding(&["10.0.0.0/8"]));
        assert_eq!(from_trusted["x-forwarded-proto"], "https");
        assert_eq!(from_anyone["x-forwarded-proto"], "http");
    }

    #[test]
    fn forwarding_switched_off_adds_nothing() {
        let mut headers = HeaderMap::new();
        let off = ForwardingConfig {
            enabled: false,
            ..forwarding(&[])
        };
        forward(&mut headers, None, &off);
        assert!(headers.is_empty());
    }

    #[test]
    fn a_transfer_encoding_overrides_the_content_length_it_came_with() {
        let mut both = HeaderMap::new();
        both.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        both.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        drop_overridden_content_length(&mut both);
        assert!(!both.contains_key(header::CONTENT_LENGTH));
        let mut length_alone = HeaderMap::new();
        length_alone.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        drop_overridden_content_length(&mut length_alone);
        assert_eq!(length_alone[header::CONTENT_LENGTH], "100");
    }
}
