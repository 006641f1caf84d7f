//! Which request heads the raw HTTP/1.1 path takes ([`crate::raw_http1`]):
//! read by the watch that follows a connection's bytes, to serve such a
//! head in a raw round ([`crate::round_kind::RoundKind::Raw`]), and by the
//! raw path itself: reads without a body ([`is_raw`]) and uploads whose
//! body is spliced to the backend ([`raw_upload`]).

/// A head the raw path forwards as it came: `GET` or `HEAD`, HTTP/1.1, a
/// target of [`is_plain_target`] bytes, no body, every field
/// [`is_plain_field`].
pub fn is_raw(head: &httparse::Request<'_, '_>) -> bool {
    matches!(head.method, Some("GET" | "HEAD"))
        && head.version == Some(1)
        && head.path.is_some_and(is_plain_target)
        && head.headers.iter().all(is_plain_field)
}

/// What the raw path needs to know of an upload it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawUpload {
    /// The body's `Content-Length`, in bytes.
    pub length: u64,
    /// It carries `Expect: 100-continue`: the body comes once the backend
    /// (through the proxy) asks for it (RFC 9110 section 10.1.1).
    pub expects_continue: bool,
}

/// A head the raw path forwards as it came and whose body it splices: a
/// `PUT` (PutObject, UploadPart), HTTP/1.1, a target of [`is_plain_target`]
/// bytes, one `Content-Length` of digits (RFC 9112 section 6.3: with
/// `Transfer-Encoding` the hyper path frames it), at most one `Expect`,
/// `100-continue`, every other field [`is_plain_field`].
pub fn raw_upload(head: &httparse::Request<'_, '_>) -> Option<RawUpload> {
    if head.method != Some("PUT")
        || head.version != Some(1)
        || !head.path.is_some_and(is_plain_target)
    {
        return None;
    }
    let mut length = None;
    let mut expects_continue = false;
    for field in head.headers.iter() {
        if field.name.eq_ignore_ascii_case("content-length") {
            let value = field.value.trim_ascii();
            if length.is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            length = Some(std::str::from_utf8(value).ok()?.parse::<u64>().ok()?);
        } else if field.name.eq_ignore_ascii_case("expect") {
            if expects_continue
                || !field
                    .value
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"100-continue")
            {
                return None;
            }
            expects_continue = true;
        } else if !is_plain_field(field) {
            return None;
        }
    }
    Some(RawUpload {
        length: length?,
        expects_continue,
    })
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

    fn upload(head: &[u8]) -> Option<RawUpload> {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut request = httparse::Request::new(&mut slots);
        request.parse(head).unwrap();
        raw_upload(&request)
    }

    #[test]
    fn a_put_with_one_length_is_a_raw_upload_with_or_without_continue() {
        assert_eq!(
            upload(b"PUT /b/k HTTP/1.1\r\nHost: s3\r\nContent-Length: 2097152\r\n\r\n"),
            Some(RawUpload {
                length: 2 << 20,
                expects_continue: false
            })
        );
        assert_eq!(
            upload(b"PUT /b/k?partNumber=1&uploadId=x HTTP/1.1\r\nexpect: 100-Continue\r\ncontent-length: 7\r\n\r\n"),
            Some(RawUpload {
                length: 7,
                expects_continue: true
            })
        );
    }

    #[test]
    fn uploads_framed_otherwise_or_with_other_fields_are_not_raw() {
        for head in [
            &b"PUT /b/k HTTP/1.1\r\n\r\n"[..],
            b"POST /b/k HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            b"PUT /b/k HTTP/1.0\r\nContent-Length: 5\r\n\r\n",
            b"PUT /b/k HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"PUT /b/k HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"PUT /b/k HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT /b/k HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue, x\r\n\r\n",
            b"PUT /b/k HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\nExpect: 100-continue\r\n\r\n",
            b"PUT /b/k HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
            b"PUT /b/k HTTP/1.1\r\nContent-Length: 5\r\nTrailer: x-amz-checksum-crc32\r\n\r\n",
            b"PUT /b/k#f HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert_eq!(upload(head), None, "{}", String::from_utf8_lossy(head));
        }
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
