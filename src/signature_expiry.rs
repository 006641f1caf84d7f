//! When a request's signature stops being accepted, so that a hold never
//! outlives it: a request held past that moment would only be released into
//! a certain `403`.
//!
//! The rules are S3's (and radosgw's, which s3gw runs):
//! - Signature Version 4 in the `Authorization` header, and Version 2
//!   (`Authorization: AWS ...`): the request time (`X-Amz-Date`, else `Date`)
//!   must be within 15 minutes of the server's clock, else
//!   `RequestTimeTooSkewed` (S3 API Reference, "Authenticating Requests: Using
//!   the Authorization Header (AWS Signature Version 4)"; radosgw's
//!   `RGW_AUTH_GRACE`).
//! - A presigned URL, Version 4: valid until `X-Amz-Date + X-Amz-Expires`
//!   (seconds), then `AccessDenied` "Request has expired" (S3 API Reference,
//!   "Authenticating Requests: Using Query Parameters").
//! - A presigned URL, Version 2: valid until `Expires` (seconds since the
//!   epoch), then the same.
//!
//! The proxy's clock stands in for the backend's (they run side by side).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Uri, header};

/// How far a header-signed request's time may be from the server's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Which rule ends a signature's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureLimit {
    /// The request time is more than [`MAX_SKEW`] away from the server's
    /// clock: S3's `RequestTimeTooSkewed`.
    Skew,
    /// A presigned URL's expiry: S3's `AccessDenied`, "Request has expired".
    Expiry,
}

/// The moment after which the backend refuses the request's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureEnd {
    pub at: SystemTime,
    pub limit: SignatureLimit,
}

/// When the signature of a request with these headers and target ends;
/// `None` for an anonymous request, or one whose time cannot be read (the
/// backend will judge it; the hold timeout alone bounds its hold).
pub fn signature_end(headers: &HeaderMap, uri: &Uri) -> Option<SignatureEnd> {
    if let Some(query) = uri.query()
        && let Some(end) = presigned_end(query)
    {
        return Some(end);
    }
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if !(authorization.starts_with("AWS4-") || authorization.starts_with("AWS ")) {
        return None;
    }
    let signed_at = match headers.get(crate::s3_header::X_AMZ_DATE) {
        Some(date) => amz_date(date.to_str().ok()?)
            .or_else(|| httpdate::parse_http_date(date.to_str().ok()?).ok())?,
        None => httpdate::parse_http_date(headers.get(header::DATE)?.to_str().ok()?).ok()?,
    };
    Some(SignatureEnd {
        at: signed_at + MAX_SKEW,
        limit: SignatureLimit::Skew,
    })
}

/// The expiry of a presigned URL (Version 4 or 2), if the query is one.
fn presigned_end(query: &str) -> Option<SignatureEnd> {
    let mut date = None;
    let mut expires_in = None;
    let mut expires_at = None;
    let mut v2 = false;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "X-Amz-Date" => date = amz_date(value),
            "X-Amz-Expires" => expires_in = value.parse::<u64>().ok(),
            "Expires" => expires_at = value.parse::<u64>().ok(),
            "AWSAccessKeyId" => v2 = true,
            _ => {}
        }
    }
    let at = match (date, expires_in, expires_at) {
        (Some(date), Some(seconds), _) => date + Duration::from_secs(seconds),
        (None, None, Some(epoch)) if v2 => SystemTime::UNIX_EPOCH + Duration::from_secs(epoch),
        _ => return None,
    };
    Some(SignatureEnd {
        at,
        limit: SignatureLimit::Expiry,
    })
}

/// `X-Amz-Date`'s ISO 8601 basic format, UTC: `20261130T103000Z`.
fn amz_date(text: &str) -> Option<SystemTime> {
    let time = jiff::fmt::strtime::parse("%Y%m%dT%H%M%SZ", text)
        .ok()?
        .to_datetime()
        .ok()?;
    let timestamp = time.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    Some(SystemTime::from(timestamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// 2026-11-30T10:30:00Z.
    const SIGNED: u64 = 1_796_034_600;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_static(name),
                    http::HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn a_header_signed_request_ends_fifteen_minutes_after_its_time() {
        let end = signature_end(
            &headers(&[
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=k/20261130/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=0",
                ),
                ("x-amz-date", "20261130T103000Z"),
            ]),
            &"/bucket/key".parse().unwrap(),
        );
        assert_eq!(
            end,
            Some(SignatureEnd {
                at: at(SIGNED) + MAX_SKEW,
                limit: SignatureLimit::Skew
            })
        );
    }

    #[test]
    fn a_version_2_request_is_timed_by_its_date_header() {
        let end = signature_end(
            &headers(&[
                ("authorization", "AWS key:c2lnbmF0dXJl"),
                ("date", "Mon, 30 Nov 2026 10:30:00 GMT"),
            ]),
            &"/bucket/key".parse().unwrap(),
        );
        assert_eq!(end.map(|end| end.at), Some(at(SIGNED) + MAX_SKEW));
    }

    #[test]
    fn a_presigned_url_ends_at_its_expiry() {
        let v4: Uri = "/bucket/key?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20261130T103000Z&X-Amz-Expires=60&X-Amz-Signature=0"
            .parse()
            .unwrap();
        assert_eq!(
            signature_end(&HeaderMap::new(), &v4),
            Some(SignatureEnd {
                at: at(SIGNED + 60),
                limit: SignatureLimit::Expiry
            })
        );
        let v2: Uri = format!(
            "/bucket/key?AWSAccessKeyId=k&Expires={}&Signature=0",
            SIGNED + 5
        )
        .parse()
        .unwrap();
        assert_eq!(
            signature_end(&HeaderMap::new(), &v2).map(|end| end.at),
            Some(at(SIGNED + 5))
        );
    }

    #[test]
    fn an_anonymous_or_undated_request_has_no_end() {
        assert_eq!(
            signature_end(&HeaderMap::new(), &"/bucket/key?Expires=5".parse().unwrap()),
            None
        );
        assert_eq!(
            signature_end(
                &headers(&[("authorization", "AWS4-HMAC-SHA256 Credential=k")]),
                &"/b/k".parse().unwrap()
            ),
            None
        );
        assert_eq!(
            signature_end(
                &headers(&[
                    ("authorization", "Bearer x"),
                    ("x-amz-date", "20261130T103000Z")
                ]),
                &"/b/k".parse().unwrap()
            ),
            None
        );
    }
}
