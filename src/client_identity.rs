//! Who a request is from, for fair holding (`hold.max_requests_per_client`):
//! the S3 access key id its signature names, or else the client's address.
//!
//! The access key id is read from where the S3 signing schemes put it:
//! `Authorization: AWS4-HMAC-SHA256 Credential=AKID/...` (SigV4, "Authenticating
//! Requests: Using the Authorization Header"), `X-Amz-Credential=AKID/...`
//! (SigV4 presigned URL), `Authorization: AWS AKID:signature` and
//! `AWSAccessKeyId=AKID` (SigV2). The proxy cannot verify a signature while
//! the backend is down, so a client may claim any key: the per-client share
//! stops one well-behaved but greedy client from filling the queue, and
//! `hold.max_requests` still bounds everything together.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use http::{HeaderMap, Uri, header};

use crate::gate::ClientKey;

/// The key `request` is held under.
pub fn client_key(headers: &HeaderMap, uri: &Uri, address: IpAddr) -> ClientKey {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match access_key_id(headers, uri) {
        Some(key) => ("access key", key).hash(&mut hasher),
        None => ("address", address).hash(&mut hasher),
    }
    ClientKey(hasher.finish())
}

/// The access key id a request's signature names, if any.
fn access_key_id<'r>(headers: &'r HeaderMap, uri: &'r Uri) -> Option<&'r str> {
    if let Some(authorization) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some((_, credential)) = authorization.split_once("Credential=") {
            return credential.split('/').next().filter(|key| !key.is_empty());
        }
        if let Some(v2) = authorization.strip_prefix("AWS ") {
            return v2.split(':').next().filter(|key| !key.is_empty());
        }
    }
    uri.query()?.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        match name {
            // The `/` after the key id is percent-encoded in a query.
            "X-Amz-Credential" => value.split(['/', '%']).next(),
            "AWSAccessKeyId" => Some(value),
            _ => None,
        }
        .filter(|key| !key.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(authorization: Option<&str>, target: &str, address: [u8; 4]) -> ClientKey {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        }
        client_key(&headers, &target.parse().unwrap(), IpAddr::from(address))
    }

    #[test]
    fn every_signing_scheme_names_the_same_client() {
        let v4 = key_of(
            Some(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261130/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
            ),
            "/b/k",
            [127, 0, 0, 1],
        );
        let presigned = key_of(
            None,
            "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261130%2Fus-east-1%2Fs3%2Faws4_request",
            [127, 0, 0, 2],
        );
        let v2 = key_of(Some("AWS AKIDEXAMPLE:c2lnbmF0dXJl"), "/b/k", [127, 0, 0, 3]);
        let v2_presigned = key_of(
            None,
            "/b/k?AWSAccessKeyId=AKIDEXAMPLE&Expires=1",
            [127, 0, 0, 4],
        );
        assert_eq!(v4, presigned);
        assert_eq!(v4, v2);
        assert_eq!(v4, v2_presigned);
    }

    #[test]
    fn an_unsigned_request_is_its_address() {
        let here = key_of(None, "/b/k", [127, 0, 0, 1]);
        assert_eq!(here, key_of(None, "/b/other", [127, 0, 0, 1]));
        assert_ne!(here, key_of(None, "/b/k", [127, 0, 0, 2]));
        let signed = key_of(Some("AWS AKIDEXAMPLE:c2ln"), "/b/k", [127, 0, 0, 1]);
        assert_ne!(here, signed, "two keys from one address are two clients");
    }
}
