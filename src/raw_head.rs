//! Which request heads the raw HTTP/1.1 path takes ([`crate::raw_http1`]):
//! read by the watch that follows a connection's bytes, to serve such a
//! head in a raw round ([`crate::round_kind::RoundKind::Raw`]), and by the
//! raw path itself.

/// A head the raw path forwards as it came: `GET` or `HEAD`, HTTP/1.1, a
/// target of [`is_plain_target`] bytes, no body, every field
/// [`is_plain_field`].
pub fn is_raw(head: &httparse::Request<'_, '_>) -> bool {
    matches!(head.method, Some("GET" | "HEAD"))
        && head.version == Some(1)
        && head.path.is_some_and(is_plain_target)
        && head.headers.iter().all(is_plain_field)
}

/// A target this path forwards as it came: origin-form, of bytes hyper
/// and the `http` crate take and keep as they are (unreserved, sub-delims,
/// `:`, `@`, `/`, `?`, `%`: RFC 3986 section 3.3), not starting `//`.
pub fn is_plain_target(target: &str) -> bool {
    target.starts_with('/')
        && !target.starts_with("//")
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b))
}

/// A request field this path forwards as it came: not one that frames a
/// body, expects, names the connection's handling (but a plain
/// `Connection: keep-alive`), or forwards.
pub fn is_plain_field(field: &httparse::Header<'_>) -> bool {
    const NOT_PLAIN: [&str; 11] = [
        "content-length",
        "transfer-encoding",
        "expect",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authorization",
        "x-forwarded-for",
        "x-forwarded-proto",
        "trailer",
    ];
    if field.name.eq_ignore_ascii_case("connection") {
        return field.value.trim_ascii().eq_ignore_ascii_case(b"keep-alive");
    }
    !NOT_PLAIN
        .iter()
        .any(|name| field.name.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(head: &[u8]) -> bool {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut request = httparse::Request::new(&mut slots);
        request.parse(head).unwrap();
        is_raw(&request)
    }

    #[test]
    fn plain_reads_are_raw() {
        assert!(raw(b"GET /b/k?list-type=2 HTTP/1.1\r\nHost: s3\r\n\r\n"));
        assert!(raw(b"HEAD /b/k HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn bodies_expectations_forwarding_and_other_targets_are_not() {
        for head in [
            &b"PUT /b/k HTTP/1.1\r\n\r\n"[..],
            b"GET /b/k HTTP/1.0\r\n\r\n",
            b"GET /b/k HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /b/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /b/k HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /b/k HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET /b/k HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
            b"GET //b/k HTTP/1.1\r\n\r\n",
            b"GET http://s3/b/k HTTP/1.1\r\n\r\n",
            b"GET /b/k#frag HTTP/1.1\r\n\r\n",
            b"GET /b/k\"q HTTP/1.1\r\n\r\n",
        ] {
            assert!(!raw(head), "{}", String::from_utf8_lossy(head));
        }
    }
}
