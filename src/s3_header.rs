//! The S3 API's own header field names that the proxy looks up on every
//! request or response, made once: a name given as text is parsed (checked
//! and lower-cased) again on every lookup. Names from the S3 API reference
//! (Common Request Headers, Common Response Headers, PutObject, CopyObject).

use http::HeaderName;

/// The backend's id for a request (S3 Common Response Headers).
pub const X_AMZ_REQUEST_ID: HeaderName = HeaderName::from_static("x-amz-request-id");
/// When a request was signed, `yyyyMMddTHHmmssZ` (SigV4).
pub const X_AMZ_DATE: HeaderName = HeaderName::from_static("x-amz-date");
/// The object a PUT copies from (CopyObject, UploadPartCopy).
pub const X_AMZ_COPY_SOURCE: HeaderName = HeaderName::from_static("x-amz-copy-source");
/// The offset an appending PUT writes at (PutObject on directory buckets):
/// such a write is not idempotent.
pub const X_AMZ_WRITE_OFFSET_BYTES: HeaderName =
    HeaderName::from_static("x-amz-write-offset-bytes");
