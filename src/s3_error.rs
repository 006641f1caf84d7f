//! The one place where a request the proxy could not complete becomes an S3
//! XML error response (status, `Code`, `Retry-After`), and the one place it
//! becomes a [`RequestOutcome`] for logs and metrics.
//!
//! S3 SDKs retry 503 `SlowDown` and `ServiceUnavailable` on their own and honour
//! `Retry-After`, so every "try again" answer of the proxy uses one of them.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};

use crate::gate::Rejection;
use crate::outcome::RequestOutcome;
use crate::signature_expiry::SignatureLimit;

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Held(#[from] Rejection),
    /// The request reached the backend, which failed, and it may not be replayed.
    #[error("the backend failed after receiving a request that cannot be replayed safely")]
    NotReplayable,
    /// The backend answered with something that is not HTTP.
    #[error("the backend sent an invalid response")]
    BadGateway,
    /// The proxy is shutting down and no longer holds requests.
    #[error("the proxy is shutting down")]
    ShuttingDown,
    /// The client closed its connection while the request was held.
    #[error("the client went away while its request was held")]
    ClientGone,
    /// The client's request body ended early or broke.
    #[error("the client's request body was incomplete")]
    ClientBody,
    /// The request was in flight at two backend crashes, or is the same as
    /// one that was: quarantined, not sent again.
    #[error("the request crashed the backend and is quarantined")]
    Poison,
    /// The request target had a raw `#`, which the URI parser would cut, or
    /// was not a path.
    #[error("the request target is not a path the proxy can forward as sent")]
    InvalidUri,
    /// The listener has `listener.max_connections` client connections open.
    #[error("the proxy has listener.max_connections client connections open")]
    TooManyConnections,
    /// Every slot of `backend.max_connections` stayed taken for
    /// `backend.queue_timeout`: the request was not sent.
    #[error(
        "backend.max_connections connections to the backend stayed busy for backend.queue_timeout"
    )]
    BackendBusy,
    /// An `Expect` other than one `100-continue`.
    #[error("the request has an expectation other than 100-continue")]
    ExpectationFailed,
    /// The client stopped sending its body for `listener.client_body_timeout`.
    #[error("the client sent no body bytes for listener.client_body_timeout")]
    ClientTimeout,
    /// The backend serves but gave no response head within the request's
    /// first-byte timeout; it may still be executing the request.
    #[error("the backend did not answer within the first-byte timeout")]
    SlowBackend,
    /// Held until its signature was about to end: released, the backend
    /// would only have refused it.
    #[error("the request's signature expired while it was held")]
    SignatureExpired(SignatureLimit),
}

impl ProxyError {
    /// How a request answered with this error ended (logs, metrics).
    pub fn outcome(self) -> RequestOutcome {
        match self {
            ProxyError::Held(Rejection::QueueFull) => RequestOutcome::QueueFull,
            ProxyError::Held(Rejection::ClientShare) => RequestOutcome::ClientShare,
            ProxyError::Held(Rejection::HoldTimeout) => RequestOutcome::HoldTimeout,
            ProxyError::Held(Rejection::FailFast) => RequestOutcome::FailFast,
            ProxyError::NotReplayable => RequestOutcome::NotReplayable,
            ProxyError::BadGateway => RequestOutcome::BadGateway,
            ProxyError::ShuttingDown => RequestOutcome::ShuttingDown,
            ProxyError::ClientGone => RequestOutcome::ClientGone,
            ProxyError::ClientBody => RequestOutcome::ClientBody,
            ProxyError::ClientTimeout => RequestOutcome::ClientTimeout,
            ProxyError::InvalidUri => RequestOutcome::InvalidUri,
            ProxyError::TooManyConnections => RequestOutcome::TooManyConnections,
            ProxyError::BackendBusy => RequestOutcome::BackendBusy,
            ProxyError::ExpectationFailed => RequestOutcome::ExpectationFailed,
            ProxyError::Poison => RequestOutcome::Quarantined,
            ProxyError::SlowBackend => RequestOutcome::SlowBackend,
            ProxyError::SignatureExpired(_) => RequestOutcome::SignatureExpired,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(self) -> StatusCode {
        self.status_and_code().0
    }

    fn status_and_code(self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::Held(Rejection::QueueFull | Rejection::ClientShare)
            | ProxyError::TooManyConnections
            | ProxyError::BackendBusy => (StatusCode::SERVICE_UNAVAILABLE, "SlowDown"),
            ProxyError::BadGateway => (StatusCode::BAD_GATEWAY, "InternalError"),
            ProxyError::ClientBody => (StatusCode::BAD_REQUEST, "IncompleteBody"),
            // S3's own name for a client that stopped sending; 408 as the
            // HTTP answer (RFC 9110 section 15.5.9).
            ProxyError::ClientTimeout => (StatusCode::REQUEST_TIMEOUT, "RequestTimeout"),
            ProxyError::SlowBackend => (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout"),
            // S3's own answers to these requests: SDKs sign again and retry
            // RequestTimeTooSkewed; a presigned URL must be issued anew.
            ProxyError::SignatureExpired(SignatureLimit::Skew) => {
                (StatusCode::FORBIDDEN, "RequestTimeTooSkewed")
            }
            ProxyError::SignatureExpired(SignatureLimit::Expiry) => {
                (StatusCode::FORBIDDEN, "AccessDenied")
            }
            ProxyError::InvalidUri => (StatusCode::BAD_REQUEST, "InvalidURI"),
            // RFC 9110 section 15.5.18; S3 has no code of its own for it.
            ProxyError::ExpectationFailed => (StatusCode::EXPECTATION_FAILED, "InvalidRequest"),
            // A client error: S3 SDKs retry 500 and 503, not 400.
            ProxyError::Poison => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            // Nobody reads this answer; 499 marks it in the request log.
            ProxyError::ClientGone => (
                StatusCode::from_u16(499).expect("valid status"),
                "RequestTimeout",
            ),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        }
    }

    fn message(self) -> &'static str {
        match self {
            ProxyError::Held(Rejection::QueueFull) => {
                "Please reduce your request rate: too many requests are waiting for the backend."
            }
            ProxyError::Held(Rejection::ClientShare) => {
                "Please reduce your request rate: you have as many requests waiting for the backend as one client may."
            }
            ProxyError::Held(Rejection::HoldTimeout) => {
                "The storage backend did not come back in time. Please retry."
            }
            ProxyError::Held(Rejection::FailFast) => {
                "The storage backend is unavailable. Please retry later."
            }
            ProxyError::NotReplayable => {
                "The storage backend failed during the request. Please retry."
            }
            ProxyError::BadGateway => "The storage backend sent an invalid response.",
            ProxyError::ShuttingDown => "The proxy is shutting down. Please retry.",
            ProxyError::ClientGone => "The client closed the connection.",
            ProxyError::ClientBody => "The request body ended before its declared length.",
            ProxyError::Poison => {
                "The storage backend failed twice while processing this request; it is quarantined and will not be sent again for a while. Please contact the operator."
            }
            ProxyError::ExpectationFailed => {
                "The only expectation supported is one Expect: 100-continue."
            }
            ProxyError::TooManyConnections => {
                "Please reduce your request rate: the proxy has as many connections open as it takes."
            }
            ProxyError::BackendBusy => {
                "Please reduce your request rate: the proxy has as many connections open to the storage backend as it may, all busy."
            }
            ProxyError::InvalidUri => {
                "Couldn't parse the specified URI: send a path such as /bucket/key, with '#' percent-encoded as %23."
            }
            ProxyError::ClientTimeout => {
                "Your socket connection to the server was not read from or written to within the timeout period."
            }
            ProxyError::SlowBackend => {
                "The storage backend is still working on the request; its outcome is unknown."
            }
            ProxyError::SignatureExpired(SignatureLimit::Skew) => {
                "The difference between the request time and the current time is too large: the request was held while the storage backend was unavailable, until its signature was about to expire. Please sign it again and retry."
            }
            ProxyError::SignatureExpired(SignatureLimit::Expiry) => {
                "Request has expired: the presigned URL expired while the request was held for the storage backend, which was unavailable."
            }
        }
    }

    /// The S3 error response; `HEAD` answers carry no body.
    pub fn to_response(
        self,
        method: &Method,
        resource: &str,
        request_id: &str,
        retry_after: Duration,
    ) -> Response<Bytes> {
        let (status, code) = self.status_and_code();
        let body = if method == Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from(error_xml(code, self.message(), resource, request_id))
        };
        let seconds = retry_after.as_secs().max(1);
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        if self == ProxyError::ClientTimeout {
            // The rest of the body may still be on its way: never read it as
            // the next request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert("x-amz-request-id", id);
        }
        response
    }
}

impl ProxyError {
    /// This error as a whole HTTP/1.1 response that closes the connection
    /// (`Retry-After: 1`), for answers the proxy writes below its HTTP server.
    pub fn to_http1_bytes(self, method: &Method, resource: &str, request_id: &str) -> Vec<u8> {
        let answer = self.to_response(method, resource, request_id, Duration::from_secs(1));
        let (head, body) = answer.into_parts();
        let mut bytes = format!(
            "HTTP/1.1 {} {}\r\n",
            head.status.as_u16(),
            head.status.canonical_reason().unwrap_or_default()
        )
        .into_bytes();
        for (name, value) in &head.headers {
            bytes.extend_from_slice(name.as_str().as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        let framing = format!(
            "content-length: {}\r\nconnection: close\r\ndate: {}\r\n\r\n",
            body.len(),
            httpdate::fmt_http_date(std::time::SystemTime::now())
        );
        bytes.extend_from_slice(framing.as_bytes());
        bytes.extend_from_slice(&body);
        bytes
    }
}

fn error_xml(code: &str, message: &str, resource: &str, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message><Resource>{}</Resource><RequestId>{}</RequestId></Error>",
        xml_escape(message),
        xml_escape(resource),
        xml_escape(request_id),
    )
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(error: ProxyError, method: Method) -> Response<Bytes> {
        error.to_response(&method, "/bucket/a&b", "req-1", Duration::from_secs(2))
    }

    #[test]
    fn a_full_queue_answers_slow_down_with_retry_after() {
        let response = response(ProxyError::Held(Rejection::QueueFull), Method::PUT);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let body = String::from_utf8(response.body().to_vec()).unwrap();
        assert!(body.contains("<Code>SlowDown</Code>"), "{body}");
        assert!(
            body.contains("<Resource>/bucket/a&amp;b</Resource>"),
            "{body}"
        );
        assert!(body.contains("<RequestId>req-1</RequestId>"), "{body}");
    }

    #[test]
    fn a_hold_timeout_answers_service_unavailable() {
        let response = response(ProxyError::Held(Rejection::HoldTimeout), Method::GET);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = String::from_utf8(response.body().to_vec()).unwrap();
        assert!(body.contains("<Code>ServiceUnavailable</Code>"), "{body}");
    }

    #[test]
    fn head_answers_have_no_body() {
        let response = response(ProxyError::NotReplayable, Method::HEAD);
        assert!(response.body().is_empty());
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/xml");
    }
}
