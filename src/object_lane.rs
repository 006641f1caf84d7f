//! Which held requests keep their order among themselves: those naming one
//! S3 object. The gate releases the held requests of one [`ObjectLane`] one
//! at a time, in arrival order, each once the one before it was answered
//! (so a PUT and then a DELETE of one key are not reordered by the release
//! concurrency); requests of different lanes go in parallel.
//!
//! A lane is read from the request target alone, as S3 names objects in
//! path-style addressing (`/bucket/key`):
//!
//! - the path is percent-decoded (`/b/a%20b` and `/b/a b` are one key; so
//!   are `/b/%61` and `/b/a`, `%2F` and `/`), and a `+` counts as a space (servers differ on
//!   it); the query does not count (`?x-id=PutObject`, `?tagging`, ...),
//!   nor does the `Host`;
//! - `/bucket/key`: the lane of that key; `/bucket` and `/bucket/`: the
//!   lane of the bucket itself (CreateBucket, DeleteBucket, listings, bucket
//!   settings, DeleteObjects), apart from its keys' lanes; `/` (ListBuckets)
//!   has no lane: it waits for nothing;
//! - an UploadPart or UploadPartCopy (`partNumber` with `uploadId`) is a
//!   lane of its own: the parts of one upload do not depend on each other.
//!
//! The proxy does not know the domain of virtual-hosted buckets
//! (`bucket.s3.example.com/key`), so there the path's first segment is taken
//! for a bucket: one key in two buckets shares a lane, and an object
//! addressed in both styles has two. Sharing a lane is never wrong, it only
//! orders requests that need no order; two lanes for one object (or the two
//! styles mixed) are not ordered. A lane is a 64-bit hash of those parts: a
//! collision only orders two objects too.

use std::hash::{Hash, Hasher};

use http::Uri;

use crate::gate::ObjectLane;

/// The lane of the object (or bucket) `uri` names, if any.
pub fn object_lane(uri: &Uri) -> Option<ObjectLane> {
    let path = decoded(uri.path());
    let path = path.strip_prefix(b"/").unwrap_or(&path);
    let (bucket, key) = match path.iter().position(|&byte| byte == b'/') {
        Some(slash) => (&path[..slash], &path[slash + 1..]),
        None => (path, &path[path.len()..]),
    };
    if bucket.is_empty() {
        return None;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (bucket, key).hash(&mut hasher);
    if !key.is_empty() {
        upload_part(uri.query().unwrap_or("")).hash(&mut hasher);
    }
    Some(ObjectLane(hasher.finish()))
}

/// `(uploadId, partNumber)` of an UploadPart or UploadPartCopy query.
fn upload_part(query: &str) -> Option<(&str, &str)> {
    let value = |name: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
    };
    Some((value("uploadId")?, value("partNumber")?))
}

/// `path` with its `%XX` escapes decoded and `+` read as a space; a `%` that
/// starts no escape stays as it is.
fn decoded(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = match bytes[at] {
            b'%' => bytes.get(at + 1..at + 3).and_then(hex_byte),
            _ => None,
        };
        match (escaped, bytes[at]) {
            (Some(byte), _) => {
                out.push(byte);
                at += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                at += 1;
            }
            (None, byte) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    out
}

/// The byte two hex digits spell.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(digits).ok()?;
    u8::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(target: &str) -> Option<ObjectLane> {
        object_lane(&target.parse().unwrap())
    }

    #[test]
    fn one_key_is_one_lane_however_it_is_escaped_or_queried() {
        let plain = lane("/bucket/a%20b/c");
        assert!(plain.is_some());
        assert_eq!(lane("/bucket/%61%20b/c"), plain);
        assert_eq!(lane("/bucket/a+b/c"), plain);
        assert_eq!(lane("/bucket/a%20b%2Fc"), plain);
        assert_eq!(lane("/bucket/a%20b/c?x-id=PutObject"), plain);
        assert_eq!(lane("/bucket/a%20b/c?tagging"), plain);
        assert_eq!(lane("http://proxy:8080/bucket/a%20b/c"), plain);
        assert_eq!(
            lane("/bucket/100%25"),
            lane("/bucket/100%"),
            "a lone % is kept"
        );
    }

    #[test]
    fn other_keys_and_buckets_are_other_lanes() {
        let key = lane("/bucket/key");
        assert_ne!(lane("/bucket/Key"), key, "keys are case-sensitive");
        assert_ne!(lane("/bucket/key/"), key);
        assert_ne!(lane("/other/key"), key);
        assert_ne!(lane("/bucket"), key);
        assert_ne!(lane("/bucketkey"), key);
    }

    #[test]
    fn a_bucket_is_a_lane_of_its_own_and_the_root_none() {
        assert!(lane("/bucket").is_some());
        assert_eq!(lane("/bucket/"), lane("/bucket"));
        assert_eq!(lane("/bucket?delete"), lane("/bucket"));
        assert_eq!(lane("/"), None);
        assert_eq!(lane("/?x-id=ListBuckets"), None);
    }

    #[test]
    fn each_part_of_an_upload_is_a_lane_of_its_own() {
        let one = lane("/b/k?partNumber=1&uploadId=u");
        assert_eq!(lane("/b/k?uploadId=u&partNumber=1&x-id=UploadPart"), one);
        assert_ne!(lane("/b/k?partNumber=2&uploadId=u"), one);
        assert_ne!(lane("/b/k?partNumber=1&uploadId=u"), lane("/b/k"));
        assert_eq!(lane("/b/k?uploadId=u"), lane("/b/k"), "Complete, Abort");
        assert_eq!(lane("/b/k?partNumber=1"), lane("/b/k"), "a GET of a part");
    }
}
