//! Settling an ambiguous write by reading back.
//!
//! A PutObject, UploadPart, CopyObject or CompleteMultipartUpload whose
//! request reached the backend but whose response was lost (a crash, a cut connection, a
//! hang) may or may not have been executed. Replaying it blindly stores it
//! twice when it was (two versions in a versioned bucket); answering `503`
//! fails a write that succeeded. Once the backend serves again the proxy
//! asks it ([`Write::read_back`]: HeadObject, or ListParts for a part) and
//! compares what is stored with what the client declared ([`Declared`]: the
//! RFC 1864 `Content-MD5`, an `x-amz-checksum-*` value from a header or an
//! `aws-chunked` trailer, the length) or, for a body the proxy still keeps,
//! with the MD5 of the kept copy (a single-part ETag is the MD5 of the
//! object, except under SSE-KMS or SSE-C, where it never matches and the
//! write is treated as not proven). A copy is compared with its source
//! ([`compare_copy`]: the same ETag and length, the copy's conditions
//! holding for the source). Only bytes proven equal make a
//! [`Settlement::Stored`]; [`crate::proxy`] then answers the client the success
//! it would have got ([`success`]), and otherwise applies the replay rule.
//!
//! The read-back is signed with SigV4 by the proxy's own `[settle]`
//! credentials ([`SettleCredentials`]): the client's signature covers its
//! method and path and cannot be reused for a HEAD. Without credentials no
//! write is settled. This module parses, compares and signs; the one request
//! it sends goes on a fresh connection through the backend's [`Connector`].

use std::fmt;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};

use crate::config::SettleCredentials;
use crate::connector::Connector;
use crate::outcome::SettleOutcome;

/// Largest read-back answer read (a ListParts page of one part, a HEAD).
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// The checksum algorithms of S3's `x-amz-checksum-<name>` fields.
const ALGORITHMS: [&str; 5] = ["crc32", "crc32c", "crc64nvme", "sha1", "sha256"];

/// A write whose outcome can be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// `PUT /bucket/key` with a body (not a copy, not a part).
    PutObject,
    /// `PUT /bucket/key?partNumber=N&uploadId=U` with a body.
    UploadPart { upload_id: String, part_number: u32 },
    /// `PUT /bucket/key` with `x-amz-copy-source` (not a part).
    CopyObject { source: CopySource },
    /// `POST /bucket/key?uploadId=U`.
    CompleteMultipartUpload { upload_id: String },
}

impl Write {
    /// The write this request is, if it can be settled; conditional writes
    /// (`If-Match`, `If-None-Match`) cannot: equal bytes do not prove their
    /// condition held. Nor can UploadPartCopy (a range of the source is
    /// not read back), nor a copy onto its own source.
    pub fn of(method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Write> {
        let conditional =
            headers.contains_key(header::IF_MATCH) || headers.contains_key(header::IF_NONE_MATCH);
        if conditional {
            return None;
        }
        let upload_id = query_value(uri, "uploadId");
        let part_number = query_value(uri, "partNumber");
        // The AWS SDKs add `x-id=<operation>`, which S3 ignores.
        let other_query = uri.query().is_some_and(|q| {
            q.split('&').any(|p| {
                !["uploadId=", "partNumber=", "x-id="]
                    .iter()
                    .any(|known| p.starts_with(known))
            })
        });
        let copy = headers.contains_key(crate::s3_header::X_AMZ_COPY_SOURCE);
        match (method, upload_id, part_number, other_query) {
            (&Method::PUT, None, None, false) if copy => {
                let source = CopySource::of(headers)?;
                // An in-place copy proves nothing by its ETag.
                (!source.is_destination(uri.path())).then_some(Write::CopyObject { source })
            }
            (&Method::PUT, _, _, _) if copy => None,
            (&Method::PUT, None, None, false) => Some(Write::PutObject),
            (&Method::PUT, Some(upload_id), Some(number), false) => Some(Write::UploadPart {
                upload_id,
                part_number: number.parse().ok().filter(|n| *n > 0)?,
            }),
            (&Method::POST, Some(upload_id), None, false) => {
                Some(Write::CompleteMultipartUpload { upload_id })
            }
            _ => None,
        }
    }

    /// The path and query of the read-back: HeadObject of the key, or
    /// ListParts of the upload (from the part asked about, one part).
    pub fn read_back(&self, path: &str) -> String {
        match self {
            Write::PutObject | Write::CopyObject { .. } => path.to_owned(),
            Write::UploadPart {
                upload_id,
                part_number,
            } => format!(
                "{path}?max-parts=1&part-number-marker={}&uploadId={upload_id}",
                part_number - 1
            ),
            Write::CompleteMultipartUpload { upload_id } => {
                format!("{path}?max-parts=1&uploadId={upload_id}")
            }
        }
    }
}

/// The raw value of `name` in the query, if present.
fn query_value(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| value.to_owned())
    })
}

/// What a CopyObject copies, and on which conditions: `x-amz-copy-source`
/// and the `x-amz-copy-source-if-*` fields (S3 API Reference, CopyObject).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySource {
    /// The HeadObject target of the source: `/bucket/key`, escaped as the
    /// client sent it, with its `?versionId=` if any.
    pub path_and_query: String,
    /// `x-amz-copy-source-if-match`: the source's ETag must be this.
    pub if_match: Option<String>,
    /// `x-amz-copy-source-if-none-match`: the source's ETag must not be this.
    pub if_none_match: Option<String>,
    /// `x-amz-copy-source-if-modified-since`.
    pub if_modified_since: Option<SystemTime>,
    /// `x-amz-copy-source-if-unmodified-since`.
    pub if_unmodified_since: Option<SystemTime>,
}

impl CopySource {
    /// From a CopyObject's fields; `None` when the source is not a
    /// `bucket/key` or a condition is unreadable (nothing to compare with).
    pub fn of(headers: &HeaderMap) -> Option<CopySource> {
        let source = headers
            .get(crate::s3_header::X_AMZ_COPY_SOURCE)?
            .to_str()
            .ok()?;
        let source = source.strip_prefix('/').unwrap_or(source);
        let (path, query) = source.split_once('?').unwrap_or((source, ""));
        if !path.contains('/') || path.contains(|c: char| c.is_ascii_whitespace()) {
            return None;
        }
        let version = query.split('&').find(|pair| pair.starts_with("versionId="));
        let text = |name: &str| -> Result<Option<String>, ()> {
            match headers.get(name) {
                None => Ok(None),
                Some(value) => value
                    .to_str()
                    .map(|v| Some(v.trim().to_owned()))
                    .map_err(|_| ()),
            }
        };
        let date = |name: &str| -> Result<Option<SystemTime>, ()> {
            text(name)?
                .map(|v| httpdate::parse_http_date(&v).map_err(|_| ()))
                .transpose()
        };
        Some(CopySource {
            path_and_query: match version {
                Some(version) => format!("/{path}?{version}"),
                None => format!("/{path}"),
            },
            if_match: text("x-amz-copy-source-if-match").ok()?,
            if_none_match: text("x-amz-copy-source-if-none-match").ok()?,
            if_modified_since: date("x-amz-copy-source-if-modified-since").ok()?,
            if_unmodified_since: date("x-amz-copy-source-if-unmodified-since").ok()?,
        })
    }

    /// True when the conditions hold for `source` as it is now, with S3's
    /// precedence (CopyObject, "Conditional requests"): an ETag condition
    /// present decides alone (`if-match` true copies whatever
    /// `if-unmodified-since` says; `if-none-match` false refuses whatever
    /// `if-modified-since` says). `Last-Modified` has whole seconds, so a
    /// date in the same second as it is taken either way.
    fn holds_for(&self, source: &Stored) -> bool {
        let same_etag = |wanted: &str| {
            wanted.split(',').any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.trim_matches('"') == source.etag.trim_matches('"')
            })
        };
        let modified = source.last_modified;
        let dates_hold = || {
            self.if_modified_since
                .is_none_or(|since| modified.is_some_and(|at| at >= since))
                && self
                    .if_unmodified_since
                    .is_none_or(|since| modified.is_some_and(|at| at <= since))
        };
        match (&self.if_match, &self.if_none_match) {
            (Some(wanted), _) => same_etag(wanted),
            (None, Some(unwanted)) => !same_etag(unwanted),
            (None, None) => dates_hold(),
        }
    }

    /// True when the source is the copy's own destination (a metadata
    /// update in place, or a version restored over its key): whatever the
    /// copy did, the destination carries the source's ETag, so it proves
    /// nothing. `destination` is the request's path as sent; a
    /// virtual-hosted path (`/key`) is compared with the source's key.
    pub fn is_destination(&self, destination: &str) -> bool {
        let decoded = |path: &str| percent_encoding::percent_decode_str(path).collect::<Vec<u8>>();
        let source = self.path_and_query.split('?').next().unwrap_or_default();
        let source = decoded(source);
        let destination = decoded(destination);
        let key = source
            .iter()
            .skip(1)
            .position(|&b| b == b'/')
            .map(|slash| &source[slash + 1..]);
        source == destination || key.is_some_and(|key| key == destination.as_slice())
    }
}

/// One `x-amz-checksum-<algorithm>` value: the algorithm's lower-case name
/// and the base64 digest as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: &'static str,
    pub value: String,
}

impl Checksum {
    /// The header field that carries it.
    pub fn field(&self) -> String {
        format!("x-amz-checksum-{}", self.algorithm)
    }

    /// The first checksum field in `headers` (a header, or a trailer block).
    fn in_fields(headers: &HeaderMap) -> Option<Checksum> {
        ALGORITHMS.iter().find_map(|algorithm| {
            let value = headers.get(format!("x-amz-checksum-{algorithm}"))?;
            Some(Checksum {
                algorithm,
                value: value.to_str().ok()?.trim().to_owned(),
            })
        })
    }
}

/// What a write declared about its body, to compare with what is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// RFC 1864 `Content-MD5`: the MD5 of the body (16 bytes).
    pub md5: Option<[u8; 16]>,
    /// An `x-amz-checksum-*` header, or the trailer an `aws-chunked` body
    /// ended with.
    pub checksum: Option<Checksum>,
    /// The object's length in bytes: `x-amz-decoded-content-length` for an
    /// `aws-chunked` body, else `Content-Length`.
    pub length: Option<u64>,
}

impl Declared {
    /// What the request's header fields declare.
    pub fn of(headers: &HeaderMap) -> Declared {
        let md5 = headers
            .get("content-md5")
            .and_then(|v| BASE64.decode(v.as_bytes()).ok())
            .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok());
        let length_field = match is_aws_chunked(headers) {
            true => "x-amz-decoded-content-length",
            false => "content-length",
        };
        let length = headers
            .get(length_field)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Declared {
            md5,
            checksum: Checksum::in_fields(headers),
            length,
        }
    }

    /// Adds the checksum of an `aws-chunked` trailer, when the header
    /// fields named none.
    pub fn with_trailer(mut self, trailer: Option<Checksum>) -> Declared {
        if self.checksum.is_none() {
            self.checksum = trailer;
        }
        self
    }
}

/// True when the body is `aws-chunked` (SigV4 streaming): its bytes on the
/// wire are not the object's.
pub fn is_aws_chunked(headers: &HeaderMap) -> bool {
    let streaming = headers
        .get("x-amz-content-sha256")
        .is_some_and(|v| v.as_bytes().starts_with(b"STREAMING-"));
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|c| c.trim() == "aws-chunked"));
    streaming || encoded
}

/// The object bytes and trailer fields of a whole `aws-chunked` body:
/// `<hex size>[;chunk-signature=..]\r\n<data>\r\n` repeated, a zero-size
/// chunk, then trailer lines up to an empty line. `None` when malformed.
pub fn decode_aws_chunked(encoded: &[u8]) -> Option<(Vec<u8>, HeaderMap)> {
    let mut data = Vec::new();
    let mut rest = encoded;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some((data, trailer_fields(rest)));
        }
        data.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

/// The checksum in the trailer of an `aws-chunked` body whose last bytes
/// are `tail`: the fields after its last chunk line that is `0` or `0;...`
/// (the zero-size chunk; no trailer line looks like it).
pub fn trailer_in_tail(tail: &[u8]) -> Option<Checksum> {
    let lines: Vec<&[u8]> = tail.split(|&b| b == b'\n').collect();
    let last_chunk = lines.iter().rposition(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line == b"0" || line.starts_with(b"0;")
    })?;
    let fields = lines[last_chunk + 1..].join(&b'\n');
    Checksum::in_fields(&trailer_fields(&fields))
}

/// `name:value` lines up to the first empty one.
fn trailer_fields(block: &[u8]) -> HeaderMap {
    let mut fields = HeaderMap::new();
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            break;
        };
        let name = HeaderName::from_bytes(line[..colon].trim_ascii());
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            fields.append(name, value);
        }
    }
    fields
}

/// What the proxy still keeps of a whole body: its object bytes' MD5 and
/// the checksum of its `aws-chunked` trailer (computed only when a settle
/// asks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptBody {
    pub md5: [u8; 16],
    pub trailer: Option<Checksum>,
}

impl KeptBody {
    /// From the kept frames of a whole body; `None` for a malformed
    /// `aws-chunked` body.
    pub fn of(frames: &[Bytes], aws_chunked: bool) -> Option<KeptBody> {
        if !aws_chunked {
            let mut md5 = Md5::new();
            frames.iter().for_each(|f| md5.update(f));
            return Some(KeptBody {
                md5: md5.finalize().into(),
                trailer: None,
            });
        }
        let (data, trailer) = decode_aws_chunked(&frames.concat())?;
        Some(KeptBody {
            md5: Md5::digest(&data).into(),
            trailer: Checksum::in_fields(&trailer),
        })
    }
}

/// What the backend said it stores: HeadObject's fields, or one part of a
/// ListParts answer, with the answer's request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The ETag as sent, quotes included.
    pub etag: String,
    /// Bytes stored.
    pub length: Option<u64>,
    /// `x-amz-checksum-*` values the backend returned.
    pub checksums: Vec<Checksum>,
    /// The header fields to give the client: `x-amz-request-id`,
    /// `x-amz-id-2`, `x-amz-version-id`, `x-amz-server-side-encryption*`.
    pub fields: HeaderMap,
    /// HeadObject's `Last-Modified` (whole seconds).
    pub last_modified: Option<SystemTime>,
}

/// Response fields copied from the read-back to the client's answer.
const COPIED_FIELDS: [&str; 6] = [
    "x-amz-request-id",
    "x-amz-id-2",
    "x-amz-version-id",
    "x-amz-server-side-encryption",
    "x-amz-server-side-encryption-aws-kms-key-id",
    "x-amz-server-side-encryption-bucket-key-enabled",
];

impl Stored {
    /// From a HeadObject answer's fields.
    pub fn of_head(headers: &HeaderMap) -> Option<Stored> {
        let etag = headers.get(header::ETAG)?.to_str().ok()?.to_owned();
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let checksums = ALGORITHMS
            .iter()
            .filter_map(|algorithm| {
                let value = headers.get(format!("x-amz-checksum-{algorithm}"))?;
                Some(Checksum {
                    algorithm,
                    value: value.to_str().ok()?.to_owned(),
                })
            })
            .collect();
        Some(Stored {
            etag,
            length,
            checksums,
            fields: copied_fields(headers),
            last_modified: headers
                .get(header::LAST_MODIFIED)
                .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok()),
        })
    }

    /// From a ListParts page: the `<Part>` numbered `part_number`, if listed.
    pub fn of_part(xml: &str, part_number: u32, headers: &HeaderMap) -> Option<Stored> {
        let part = xml.split("<Part>").skip(1).find(|part| {
            element(part, "PartNumber").and_then(|n| n.parse().ok()) == Some(part_number)
        })?;
        // A part listed without its ETag (s3s-fs) is there, but only a
        // checksum can prove it.
        let etag = element(part, "ETag").map(unescape).unwrap_or_default();
        let checksums = ["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"]
            .iter()
            .zip(ALGORITHMS)
            .filter_map(|(tag, algorithm)| {
                Some(Checksum {
                    algorithm,
                    value: element(part, &format!("Checksum{tag}"))?.to_owned(),
                })
            })
            .collect();
        Some(Stored {
            etag,
            length: element(part, "Size").and_then(|s| s.parse().ok()),
            checksums,
            fields: copied_fields(headers),
            last_modified: None,
        })
    }

    /// True when what is stored was written before `arrived` (the write's
    /// arrival at the proxy, less a second for `Last-Modified`'s whole
    /// seconds and the two clocks): an object left by an earlier write,
    /// not by this one, whatever its bytes.
    pub fn predates(&self, arrived: SystemTime) -> bool {
        let earliest = arrived
            .checked_sub(std::time::Duration::from_secs(1))
            .unwrap_or(arrived);
        self.last_modified.is_some_and(|at| at < earliest)
    }

    /// The ETag as an MD5 digest, when it is one (a single-part object not
    /// encrypted with SSE-KMS or SSE-C).
    fn md5(&self) -> Option<[u8; 16]> {
        let hex = self.etag.trim_matches('"');
        let bytes = decode_hex(hex)?;
        <[u8; 16]>::try_from(bytes).ok()
    }
}

fn copied_fields(headers: &HeaderMap) -> HeaderMap {
    let mut fields = HeaderMap::new();
    for name in COPIED_FIELDS {
        if let Some(value) = headers.get(name) {
            fields.insert(HeaderName::from_static(name), value.clone());
        }
    }
    fields
}

/// The text of the first `<tag>..</tag>` in `xml`.
pub(crate) fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].trim())
}

/// XML text with its five predefined entities replaced.
fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the read-back proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The backend stores exactly the client's bytes.
    Stored(Stored),
    /// Nothing there (HeadObject `404`, the part not listed).
    Absent,
    /// Something else there: another length, checksum or MD5.
    Different,
    /// Something there, but nothing the client sent or the proxy kept can
    /// prove it is these bytes.
    NoProof,
}

impl Settlement {
    pub fn outcome(&self) -> SettleOutcome {
        match self {
            Settlement::Stored(_) => SettleOutcome::Stored,
            Settlement::Absent => SettleOutcome::Absent,
            Settlement::Different => SettleOutcome::Different,
            Settlement::NoProof => SettleOutcome::NoProof,
        }
    }
}

/// Compares what is stored with what the client declared, then with the
/// kept body's MD5 (asked for only when needed). Any evidence of a
/// difference wins; equal bytes need one digest proven equal.
pub fn compare(
    declared: &Declared,
    kept: impl FnOnce() -> Option<KeptBody>,
    stored: Stored,
) -> Settlement {
    if declared
        .length
        .zip(stored.length)
        .is_some_and(|(d, s)| d != s)
    {
        return Settlement::Different;
    }
    let mut kept = Some(kept);
    let mut cached: Option<Option<KeptBody>> = None;
    let mut kept = move || {
        cached
            .get_or_insert_with(|| kept.take().and_then(|kept| kept()))
            .clone()
    };
    // A copy that does not match its own Content-MD5 was refused by the
    // backend (`BadDigest`): whatever is stored is not this write.
    if let (Some(md5), Some(copy)) = (declared.md5, declared.md5.and_then(|_| kept()))
        && copy.md5 != md5
    {
        return Settlement::Different;
    }
    let mut proven = false;
    if let Some(checksum) = &declared.checksum
        && let Some(same) = stored
            .checksums
            .iter()
            .find(|c| c.algorithm == checksum.algorithm)
    {
        if same.value != checksum.value {
            return Settlement::Different;
        }
        proven = true;
    }
    let stored_md5 = stored.md5();
    if let (Some(md5), Some(stored_md5)) = (declared.md5, stored_md5) {
        if md5 != stored_md5 {
            return Settlement::Different;
        }
        proven = true;
    }
    if !proven && let Some(kept) = kept() {
        match stored_md5 {
            Some(stored_md5) if stored_md5 == kept.md5 => proven = true,
            Some(_) => return Settlement::Different,
            None => {}
        }
    }
    // The client's answer needs the ETag (a part's, for its Complete).
    match proven && !stored.etag.is_empty() {
        true => Settlement::Stored(stored),
        false => Settlement::NoProof,
    }
}

/// Compares a copy with its source: proven when the copy carries the
/// source's ETag (the MD5 of its bytes, or of its parts' digests) and
/// length, and the copy's `x-amz-copy-source-if-*` conditions hold for the
/// source. A source that no longer meets them, or that has no ETag, leaves
/// nothing to prove the copy by. A proven copy carries the source's version
/// id as `x-amz-copy-source-version-id`, for the client's answer.
pub fn compare_copy(conditions: &CopySource, source: &Stored, mut copy: Stored) -> Settlement {
    if source.etag.is_empty() || !conditions.holds_for(source) {
        return Settlement::NoProof;
    }
    let same_length = source
        .length
        .zip(copy.length)
        .is_none_or(|(source, copy)| source == copy);
    if copy.etag != source.etag || !same_length {
        return Settlement::Different;
    }
    if let Some(version) = source.fields.get("x-amz-version-id") {
        copy.fields
            .insert("x-amz-copy-source-version-id", version.clone());
    }
    Settlement::Stored(copy)
}

/// The ETag S3 gives an object completed from parts: the MD5 of the
/// concatenated MD5 digests of the parts (their ETags), then `-<count>`.
/// `None` when a part's ETag is not an MD5.
pub fn multipart_etag(part_etags: &[String]) -> Option<String> {
    let mut md5 = Md5::new();
    for etag in part_etags {
        md5.update(decode_hex(etag.trim_matches('"')).filter(|b| b.len() == 16)?);
    }
    Some(format!(
        "\"{}-{}\"",
        encode_hex(&md5.finalize()),
        part_etags.len()
    ))
}

/// True when a ListParts page lists at least one part.
pub fn lists_a_part(page: &[u8]) -> bool {
    page.windows(6).any(|w| w == b"<Part>")
}

/// The part ETags a CompleteMultipartUpload body lists, in order.
pub fn listed_parts(body: &[u8]) -> Option<Vec<String>> {
    let xml = std::str::from_utf8(body).ok()?;
    let parts: Vec<String> = xml
        .split("<Part>")
        .skip(1)
        .map(|part| element(part, "ETag").map(unescape))
        .collect::<Option<_>>()?;
    (!parts.is_empty()).then_some(parts)
}

/// The success a PutObject or UploadPart would have got: `200`, the ETag,
/// the checksum the client declared, and the read-back's request id,
/// version id and encryption fields.
pub fn success(stored: &Stored, declared: &Declared) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    let headers = response.headers_mut();
    headers.extend(stored.fields.clone());
    if let Ok(etag) = HeaderValue::from_str(&stored.etag) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(checksum) = &declared.checksum
        && let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(checksum.field().as_bytes()),
            HeaderValue::from_str(&checksum.value),
        )
    {
        headers.insert(name, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}

/// The `CompleteMultipartUploadResult` the client would have got.
pub fn complete_success(stored: &Stored, host: &str, path: &str) -> Response<Bytes> {
    let trimmed = path.trim_start_matches('/');
    let (bucket, key) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    // The result names the key as stored, not as escaped in the path.
    let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <CompleteMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <Location>http://{host}{path}</Location><Bucket>{bucket}</Bucket><Key>{key}</Key>\
         <ETag>{etag}</ETag></CompleteMultipartUploadResult>",
        host = escape(host),
        etag = escape(&stored.etag),
        path = escape(path),
        bucket = escape(bucket),
        key = escape(&key),
    );
    xml_success(xml, stored)
}

/// The `CopyObjectResult` the client would have got: the copy's ETag and
/// `LastModified`, its version id and the source's (see [`compare_copy`]).
pub fn copy_success(copy: &Stored) -> Response<Bytes> {
    let last_modified = copy
        .last_modified
        .map(|at| humantime::format_rfc3339_millis(at).to_string())
        .unwrap_or_default();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <CopyObjectResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <LastModified>{last_modified}</LastModified><ETag>{etag}</ETag></CopyObjectResult>",
        etag = escape(&copy.etag),
    );
    xml_success(xml, copy)
}

/// A `200` carrying `xml` and the read-back's fields of `stored`.
fn xml_success(xml: String, stored: &Stored) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(xml));
    let headers = response.headers_mut();
    headers.extend(stored.fields.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    response
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Bytes a SigV4 canonical URI leaves as they are in a path (RFC 3986
/// unreserved characters, and `/`); AWS Signature Version 4, "Create a
/// canonical request".
const PATH_KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// `path_and_query` with its path in SigV4's canonical form: decoded, then
/// every byte but the unreserved ones and `/` percent-encoded, never
/// normalised (`//` and `/./` stay). S3 servers differ in how they form the
/// canonical URI of a path that arrives with raw `+`, `=`, `@`, `'`: s3s-fs
/// takes the path as received, radosgw re-encodes it; a path sent already
/// in canonical form is the same to both. The key it names does not change.
fn canonical_target(path_and_query: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    let path = percent_encoding::percent_encode(&decoded, PATH_KEPT).to_string();
    match query {
        Some(query) => format!("{path}?{query}"),
        None => path,
    }
}

/// Why a read-back got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    #[error("cannot connect to the backend: {0}")]
    Connect(std::io::Error),
    #[error("the read-back failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the read-back answer was unreadable or over {MAX_ANSWER_BYTES} bytes")]
    Body,
    #[error("cannot sign the read-back: {0}")]
    Sign(String),
    #[error("the backend answered {0}")]
    Status(StatusCode),
}

/// One read-back answer: status, fields and (bounded) body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl SettleCredentials {
    /// Sends `method path_and_query` with `host` as `Host`, signed with
    /// these credentials, on a fresh connection.
    pub async fn ask(
        &self,
        connector: &Connector,
        method: Method,
        host: &str,
        path_and_query: &str,
    ) -> Result<Answer, ReadBackError> {
        let mut request = Request::builder()
            .method(method)
            .uri(canonical_target(path_and_query))
            .header(header::HOST, host)
            .header("x-amz-checksum-mode", "ENABLED")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ReadBackError::Sign(e.to_string()))?;
        self.sign(&mut request, host)?;
        let stream = connector.connect().await.map_err(ReadBackError::Connect)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|_| ReadBackError::Body)?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// SigV4 over the method, target, `host`, `x-amz-date` and the empty
    /// payload's SHA-256 (`x-amz-content-sha256`, which S3 requires).
    fn sign(&self, request: &mut Request<Empty<Bytes>>, host: &str) -> Result<(), ReadBackError> {
        use aws_sigv4::http_request::{
            PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
            SigningSettings, UriPathNormalizationMode, sign,
        };
        use aws_sigv4::sign::v4;
        let failed = |e: &dyn fmt::Display| ReadBackError::Sign(e.to_string());
        let identity = aws_credential_types::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            None,
            None,
            "settle",
        )
        .into();
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        // S3's canonical request takes the path as sent: encoded once, not
        // normalised (`a%20b`, `dir//x`, `dir/./x` stay as they are).
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| failed(&e))?
            .into();
        let url = format!("http://{host}{}", request.uri());
        let fields = request
            .headers()
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let signable = SignableRequest::new(
            request.method().as_str(),
            &url,
            fields,
            SignableBody::Bytes(&[]),
        )
        .map_err(|e| failed(&e))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| failed(&e))?
            .into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn stored(etag: &str, length: u64, checksums: &[(&'static str, &str)]) -> Stored {
        Stored {
            etag: etag.to_owned(),
            length: Some(length),
            checksums: checksums
                .iter()
                .map(|(algorithm, value)| Checksum {
                    algorithm,
                    value: (*value).to_owned(),
                })
                .collect(),
            fields: HeaderMap::new(),
            last_modified: None,
        }
    }

    /// MD5("hello"), as ETag and as Content-MD5.
    const HELLO_ETAG: &str = "\"5d41402abc4b2a76b9719d911017c592\"";
    const HELLO_MD5: &str = "XUFAKrxLKna5cZ2REBfFkg==";

    fn no_kept() -> Option<KeptBody> {
        None
    }

    #[test]
    fn writes_are_told_apart_by_method_and_query() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let plain = HeaderMap::new();
        assert_eq!(
            Write::of(&Method::PUT, &uri("/b/k"), &plain),
            Some(Write::PutObject)
        );
        assert_eq!(
            Write::of(&Method::PUT, &uri("/b/k?partNumber=3&uploadId=xyz"), &plain),
            Some(Write::UploadPart {
                upload_id: "xyz".into(),
                part_number: 3
            })
        );
        assert_eq!(
            Write::of(&Method::POST, &uri("/b/k?uploadId=xyz"), &plain),
            Some(Write::CompleteMultipartUpload {
                upload_id: "xyz".into()
            })
        );
        assert_eq!(
            Write::of(&Method::PUT, &uri("/b/k?x-id=PutObject"), &plain),
            Some(Write::PutObject)
        );
        assert_eq!(Write::of(&Method::POST, &uri("/b/k?uploads"), &plain), None);
        assert_eq!(Write::of(&Method::PUT, &uri("/b/k?tagging"), &plain), None);
        let copy = headers(&[("x-amz-copy-source", "/b/other")]);
        assert!(matches!(
            Write::of(&Method::PUT, &uri("/b/k?x-id=CopyObject"), &copy),
            Some(Write::CopyObject { .. })
        ));
        let part_copy = "/b/k?partNumber=1&uploadId=xyz";
        assert_eq!(Write::of(&Method::PUT, &uri(part_copy), &copy), None);
        let conditional = headers(&[("if-none-match", "*")]);
        assert_eq!(Write::of(&Method::PUT, &uri("/b/k"), &conditional), None);
    }

    #[test]
    fn a_part_is_read_back_with_list_parts_from_the_part_before() {
        let write = Write::UploadPart {
            upload_id: "u1".into(),
            part_number: 4,
        };
        assert_eq!(
            write.read_back("/b/k"),
            "/b/k?max-parts=1&part-number-marker=3&uploadId=u1"
        );
    }

    #[test]
    fn content_md5_equal_to_the_etag_proves_the_bytes() {
        let declared = Declared::of(&headers(&[
            ("content-md5", HELLO_MD5),
            ("content-length", "5"),
        ]));
        let verdict = compare(&declared, no_kept, stored(HELLO_ETAG, 5, &[]));
        assert!(matches!(verdict, Settlement::Stored(_)), "{verdict:?}");
    }

    #[test]
    fn a_kept_body_that_does_not_match_its_content_md5_is_different() {
        // The backend refused it (BadDigest): the object there, with the
        // declared MD5, is an earlier one.
        let declared = Declared::of(&headers(&[("content-md5", HELLO_MD5)]));
        let other_bytes = || KeptBody::of(&[Bytes::from_static(b"jello")], false);
        assert_eq!(
            compare(&declared, other_bytes, stored(HELLO_ETAG, 5, &[])),
            Settlement::Different
        );
    }

    #[test]
    fn an_object_older_than_the_write_predates_it() {
        let at = |seconds| std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
        let mut object = stored(HELLO_ETAG, 5, &[]);
        object.last_modified = Some(at(100));
        assert!(object.predates(at(102)), "written two seconds before");
        assert!(!object.predates(at(101)), "within Last-Modified's second");
        assert!(!object.predates(at(99)));
        object.last_modified = None;
        assert!(!object.predates(at(102)), "unknown: not judged by time");
    }

    #[test]
    fn another_md5_or_length_is_different() {
        let declared = Declared::of(&headers(&[
            ("content-md5", HELLO_MD5),
            ("content-length", "5"),
        ]));
        let other = "\"00000000000000000000000000000000\"";
        assert_eq!(
            compare(&declared, no_kept, stored(other, 5, &[])),
            Settlement::Different
        );
        assert_eq!(
            compare(&declared, no_kept, stored(HELLO_ETAG, 6, &[])),
            Settlement::Different
        );
    }

    #[test]
    fn a_declared_checksum_is_compared_with_the_stored_one() {
        let declared = Declared::of(&headers(&[("x-amz-checksum-crc32", "NhCmhg==")]));
        let same = stored("\"opaque\"", 5, &[("crc32", "NhCmhg==")]);
        assert!(matches!(
            compare(&declared, no_kept, same),
            Settlement::Stored(_)
        ));
        let other = stored("\"opaque\"", 5, &[("crc32", "AAAAAA==")]);
        assert_eq!(compare(&declared, no_kept, other), Settlement::Different);
        let none = stored("\"opaque\"", 5, &[]);
        assert_eq!(compare(&declared, no_kept, none), Settlement::NoProof);
    }

    #[test]
    fn without_a_declaration_only_the_kept_body_proves_anything() {
        let declared = Declared::of(&headers(&[("content-length", "5")]));
        assert_eq!(
            compare(&declared, no_kept, stored(HELLO_ETAG, 5, &[])),
            Settlement::NoProof
        );
        let kept = || {
            KeptBody::of(
                &[Bytes::from_static(b"hel"), Bytes::from_static(b"lo")],
                false,
            )
        };
        assert!(matches!(
            compare(&declared, kept, stored(HELLO_ETAG, 5, &[])),
            Settlement::Stored(_)
        ));
        let other = || KeptBody::of(&[Bytes::from_static(b"jello")], false);
        assert_eq!(
            compare(&declared, other, stored(HELLO_ETAG, 5, &[])),
            Settlement::Different
        );
    }

    #[test]
    fn the_kept_body_is_not_digested_when_a_declared_checksum_proves_it() {
        // A Content-MD5 is checked against the kept copy (the backend
        // refuses a body that does not match it); a checksum needs no copy.
        let declared = Declared::of(&headers(&[("x-amz-checksum-crc32", "NhCmhg==")]));
        let kept = || -> Option<KeptBody> { panic!("digested on the way") };
        assert!(matches!(
            compare(
                &declared,
                kept,
                stored(HELLO_ETAG, 5, &[("crc32", "NhCmhg==")])
            ),
            Settlement::Stored(_)
        ));
    }

    #[test]
    fn the_trailer_is_found_in_the_last_bytes_of_a_body() {
        let end = b"a\r\n0\r\nxyz\r\n0;chunk-signature=ab\r\nx-amz-checksum-crc32:NhCmhg==\r\nx-amz-trailer-signature:cd\r\n\r\n";
        let whole = decode_aws_chunked(
            b"3\r\nhel\r\n0;chunk-signature=ab\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n",
        )
        .map(|(_, fields)| Checksum::in_fields(&fields));
        assert_eq!(trailer_in_tail(end), whole.flatten());
        assert!(trailer_in_tail(end).is_some());
        assert_eq!(trailer_in_tail(b"no chunk line here"), None);
    }

    #[test]
    fn an_aws_chunked_body_is_decoded_with_its_trailer() {
        let encoded = b"3;chunk-signature=ab\r\nhel\r\n2\r\nlo\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\nx-amz-trailer-signature:cd\r\n\r\n";
        let kept = KeptBody::of(&[Bytes::from_static(encoded)], true).unwrap();
        assert_eq!(BASE64.encode(kept.md5), HELLO_MD5);
        assert_eq!(
            kept.trailer,
            Some(Checksum {
                algorithm: "crc32",
                value: "NhCmhg==".into()
            })
        );
        assert_eq!(KeptBody::of(&[Bytes::from_static(b"zz\r\n")], true), None);
    }

    #[test]
    fn a_part_is_found_in_a_list_parts_page() {
        let xml = "<ListPartsResult><Part><PartNumber>2</PartNumber><ETag>&quot;5d41402abc4b2a76b9719d911017c592&quot;</ETag><Size>5</Size><ChecksumCRC32>NhCmhg==</ChecksumCRC32></Part></ListPartsResult>";
        let part = Stored::of_part(xml, 2, &HeaderMap::new()).unwrap();
        assert_eq!(part.etag, HELLO_ETAG);
        assert_eq!(part.length, Some(5));
        assert_eq!(part.checksums[0].value, "NhCmhg==");
        assert_eq!(Stored::of_part(xml, 3, &HeaderMap::new()), None);
    }

    #[test]
    fn a_part_listed_without_its_etag_is_there_but_not_proven_by_md5() {
        let xml = "<ListPartsResult><Part><PartNumber>1</PartNumber><Size>5</Size></Part></ListPartsResult>";
        let part = Stored::of_part(xml, 1, &HeaderMap::new()).expect("listed");
        let declared = Declared::of(&headers(&[("content-md5", HELLO_MD5)]));
        assert_eq!(compare(&declared, no_kept, part), Settlement::NoProof);
        let xml = "<ListPartsResult><Part><PartNumber>1</PartNumber><Size>5</Size><ChecksumCRC32>NhCmhg==</ChecksumCRC32></Part></ListPartsResult>";
        let part = Stored::of_part(xml, 1, &HeaderMap::new()).expect("listed");
        let declared = Declared::of(&headers(&[("x-amz-checksum-crc32", "NhCmhg==")]));
        assert_eq!(
            compare(&declared, no_kept, part),
            Settlement::NoProof,
            "proven, but no ETag to answer with"
        );
    }

    #[test]
    fn the_multipart_etag_is_the_md5_of_the_part_digests() {
        // Two parts "hello" and "hello": md5(md5("hello") || md5("hello")).
        let parts = listed_parts(
            b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"5d41402abc4b2a76b9719d911017c592\"</ETag></Part>\
              <Part><PartNumber>2</PartNumber><ETag>&quot;5d41402abc4b2a76b9719d911017c592&quot;</ETag></Part></CompleteMultipartUpload>",
        )
        .unwrap();
        let digest = Md5::digest(
            decode_hex("5d41402abc4b2a76b9719d911017c592")
                .unwrap()
                .repeat(2),
        );
        assert_eq!(
            multipart_etag(&parts).unwrap(),
            format!("\"{}-2\"", encode_hex(&digest))
        );
        assert_eq!(multipart_etag(&["\"opaque\"".to_owned()]), None);
    }

    #[test]
    fn the_success_carries_etag_checksum_and_request_id() {
        let mut stored = stored(HELLO_ETAG, 5, &[]);
        stored
            .fields
            .insert("x-amz-request-id", HeaderValue::from_static("tx1"));
        let declared = Declared::of(&headers(&[("x-amz-checksum-crc32", "NhCmhg==")]));
        let response = success(&stored, &declared);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["etag"], HELLO_ETAG);
        assert_eq!(response.headers()["x-amz-checksum-crc32"], "NhCmhg==");
        assert_eq!(response.headers()["x-amz-request-id"], "tx1");
    }

    const MONDAY: &str = "Mon, 30 Nov 2026 10:00:00 GMT";
    const TUESDAY: &str = "Tue, 01 Dec 2026 10:00:00 GMT";

    fn source_as(fields: &[(&str, &str)]) -> CopySource {
        let mut all = vec![("x-amz-copy-source", "src/dir/a%20b?versionId=v7")];
        all.extend_from_slice(fields);
        CopySource::of(&headers(&all)).unwrap()
    }

    fn modified_on(mut stored: Stored, date: &str) -> Stored {
        stored.last_modified = Some(httpdate::parse_http_date(date).unwrap());
        stored
    }

    #[test]
    fn a_copy_source_is_read_back_as_sent_with_its_version() {
        assert_eq!(source_as(&[]).path_and_query, "/src/dir/a%20b?versionId=v7");
        let plain = headers(&[("x-amz-copy-source", "/src/key")]);
        assert_eq!(CopySource::of(&plain).unwrap().path_and_query, "/src/key");
        let no_key = headers(&[("x-amz-copy-source", "bucket-only")]);
        assert_eq!(CopySource::of(&no_key), None);
        let bad_date = headers(&[
            ("x-amz-copy-source", "/src/key"),
            ("x-amz-copy-source-if-modified-since", "yesterday"),
        ]);
        assert_eq!(CopySource::of(&bad_date), None);
    }

    #[test]
    fn a_copy_with_its_sources_etag_and_length_is_stored_with_the_source_version() {
        let mut source = stored(HELLO_ETAG, 5, &[]);
        source
            .fields
            .insert("x-amz-version-id", HeaderValue::from_static("v7"));
        let verdict = compare_copy(&source_as(&[]), &source, stored(HELLO_ETAG, 5, &[]));
        let Settlement::Stored(copy) = verdict else {
            panic!("{verdict:?}");
        };
        assert_eq!(copy.fields["x-amz-copy-source-version-id"], "v7");
        let other = stored("\"0123456789abcdef0123456789abcdef\"", 5, &[]);
        assert_eq!(
            compare_copy(&source_as(&[]), &source, other),
            Settlement::Different
        );
        let shorter = stored(HELLO_ETAG, 4, &[]);
        assert_eq!(
            compare_copy(&source_as(&[]), &source, shorter),
            Settlement::Different
        );
    }

    #[test]
    fn a_copy_whose_conditions_fail_for_the_source_now_is_not_proven() {
        let source = modified_on(stored(HELLO_ETAG, 5, &[]), MONDAY);
        let copy = || stored(HELLO_ETAG, 5, &[]);
        let proven = |fields: &[(&str, &str)]| {
            matches!(
                compare_copy(&source_as(fields), &source, copy()),
                Settlement::Stored(_)
            )
        };
        assert!(proven(&[("x-amz-copy-source-if-match", HELLO_ETAG)]));
        assert!(!proven(&[("x-amz-copy-source-if-match", "\"other\"")]));
        assert!(proven(&[("x-amz-copy-source-if-none-match", "\"other\"")]));
        assert!(!proven(&[("x-amz-copy-source-if-none-match", HELLO_ETAG)]));
        assert!(proven(&[(
            "x-amz-copy-source-if-unmodified-since",
            TUESDAY
        )]));
        assert!(!proven(&[("x-amz-copy-source-if-modified-since", TUESDAY)]));
        assert!(
            proven(&[("x-amz-copy-source-if-modified-since", MONDAY)]),
            "same second"
        );
        // S3's precedence: an ETag condition decides alone.
        assert!(proven(&[
            ("x-amz-copy-source-if-match", HELLO_ETAG),
            (
                "x-amz-copy-source-if-unmodified-since",
                "Sun, 29 Nov 2026 10:00:00 GMT"
            ),
        ]));
        assert!(proven(&[
            ("x-amz-copy-source-if-none-match", "\"other\""),
            ("x-amz-copy-source-if-modified-since", TUESDAY),
        ]));
        assert!(proven(&[(
            "x-amz-copy-source-if-modified-since",
            "Sun, 29 Nov 2026 10:00:00 GMT"
        )]));
        let untagged = stored("", 5, &[]);
        assert_eq!(
            compare_copy(&source_as(&[]), &untagged, copy()),
            Settlement::NoProof
        );
    }

    #[test]
    fn a_copy_onto_its_own_source_is_not_settled() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let onto = |source: &str, destination: &str| {
            let copy = headers(&[("x-amz-copy-source", source)]);
            Write::of(&Method::PUT, &uri(destination), &copy).is_none()
        };
        assert!(onto("b/dir/k%2B1", "/b/dir/k+1"));
        assert!(onto("/b/k?versionId=v1", "/b/k"));
        assert!(onto("b/k", "/k"), "virtual-hosted: the same key");
        assert!(!onto("b/k", "/b/k2"));
        assert!(!onto("b/k", "/c/k"));
    }

    #[test]
    fn a_settled_copy_is_answered_with_its_copy_object_result() {
        let mut copy = modified_on(stored(HELLO_ETAG, 5, &[]), MONDAY);
        copy.fields.insert(
            "x-amz-copy-source-version-id",
            HeaderValue::from_static("v7"),
        );
        let response = copy_success(&copy);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-amz-copy-source-version-id"], "v7");
        let xml = std::str::from_utf8(response.body()).unwrap();
        assert!(
            xml.contains("<LastModified>2026-11-30T10:00:00.000Z</LastModified>"),
            "{xml}"
        );
        assert!(
            xml.contains("<ETag>&quot;5d41402abc4b2a76b9719d911017c592&quot;</ETag>"),
            "{xml}"
        );
    }

    #[test]
    fn a_read_back_path_is_in_canonical_form_whatever_the_client_escaped() {
        assert_eq!(
            canonical_target("/b/a+b=c@d'(1)!"),
            "/b/a%2Bb%3Dc%40d%27%281%29%21"
        );
        assert_eq!(
            canonical_target("/b/odd%20key%2B%C3%BC%26c?uploadId=x%2By"),
            "/b/odd%20key%2B%C3%BC%26c?uploadId=x%2By"
        );
        assert_eq!(canonical_target("/b/dir//./k~1"), "/b/dir//./k~1");
        assert_eq!(canonical_target("/b/%ff%2f"), "/b/%FF/");
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let credentials = SettleCredentials {
            access_key_id: "AK".into(),
            secret_access_key: "very-secret".into(),
            region: "us-east-1".into(),
            secret_access_key_file: "/run/secret".into(),
        };
        assert!(!format!("{credentials:?}").contains("very-secret"));
    }
}
