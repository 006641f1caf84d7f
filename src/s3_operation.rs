//! What the proxy needs to know about an S3 request from its head alone: is
//! it one of the operations a healthy backend may take minutes to answer?
//!
//! The backend does all of the work of these before its first response byte,
//! and it grows with the data: CompleteMultipartUpload (S3 API reference:
//! "Processing of a Complete Multipart Upload request could take several
//! minutes"), CopyObject and UploadPartCopy (a server-side copy of up to
//! 5 GiB), DeleteObjects (up to 1 000 keys) and DeleteBucket.

use http::{HeaderMap, Method, Uri};

/// True for the operations known to be slow before their first byte.
pub fn is_slow(method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
    let query = uri.query().unwrap_or("");
    let has_key = |key: &str| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some(key))
    };
    match *method {
        // CompleteMultipartUpload; DeleteObjects.
        Method::POST => has_key("uploadId") || has_key("delete"),
        // CopyObject and UploadPartCopy.
        Method::PUT => headers.contains_key(crate::s3_header::X_AMZ_COPY_SOURCE),
        // DeleteBucket: a path-style bucket path (or `/` in virtual-hosted style).
        Method::DELETE => is_bucket_path(uri.path()) && query.is_empty(),
        _ => false,
    }
}

/// `/`, `/bucket` or `/bucket/`: no object key.
fn is_bucket_path(path: &str) -> bool {
    let trimmed = path.trim_start_matches('/');
    let bucket = trimmed.strip_suffix('/').unwrap_or(trimmed);
    !bucket.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow(method: Method, target: &str, copy: bool) -> bool {
        let mut headers = HeaderMap::new();
        if copy {
            headers.insert("x-amz-copy-source", "/src/key".parse().unwrap());
        }
        is_slow(&method, &target.parse().unwrap(), &headers)
    }

    #[test]
    fn the_slow_operations_are_recognised() {
        assert!(slow(Method::POST, "/b/k?uploadId=2~abc", false));
        assert!(slow(Method::POST, "/b?delete", false));
        assert!(slow(Method::PUT, "/b/k", true));
        assert!(slow(Method::PUT, "/b/k?partNumber=1&uploadId=x", true));
        assert!(slow(Method::DELETE, "/b", false));
        assert!(slow(Method::DELETE, "/b/", false));
    }

    #[test]
    fn ordinary_requests_are_not_slow() {
        assert!(!slow(Method::PUT, "/b/k", false));
        assert!(!slow(Method::POST, "/b/k?uploads", false));
        assert!(!slow(Method::DELETE, "/b/k", false));
        assert!(!slow(Method::DELETE, "/b/k?uploadId=x", false));
        assert!(!slow(Method::GET, "/b?delete", false));
    }
}
