//! Output records, exactly as DESIGN.md "Output records" shows them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub const PREDICTION_SCHEMA: &str = "inferstream.prediction.v1";
pub const DEADLETTER_SCHEMA: &str = "inferstream.deadletter.v1";

/// The closed set of dead-letter reasons (DESIGN.md "Dead letter").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Not JSON, not a known shape, or a required field missing or mistyped.
    MalformedEvent,
    /// A known shape with an unsupported version.
    UnsupportedEvent,
    /// Bucket outside `filter.allowed_buckets`.
    BucketNotAllowed,
    /// GetObject answered NoSuchKey / 404.
    ObjectNotFound,
    /// Object larger than `fetch.max_object_bytes`.
    ObjectTooLarge,
    /// The bytes are not JPEG, PNG, GIF, WebP or BMP.
    NotAnImage,
    /// S3 kept failing (after retries) or denied access.
    FetchFailed,
    /// The endpoint rejected this image (ValidationError, ModelError).
    EndpointRejected,
    /// The endpoint stayed unavailable through every retry.
    EndpointUnavailable,
    /// The endpoint's answer did not have the expected shape or length.
    BadEndpointResponse,
    /// The SNS alert for a review prediction could not be published.
    AlertFailed,
    /// The message announces more records than `pipeline.max_records_per_message`.
    TooManyRecords,
    /// A record on the review topic that is not a review prediction (the
    /// digest alerter reads that topic; something else wrote to it).
    BadReviewRecord,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 13] = [
        DeadLetterReason::MalformedEvent,
        DeadLetterReason::UnsupportedEvent,
        DeadLetterReason::BucketNotAllowed,
        DeadLetterReason::ObjectNotFound,
        DeadLetterReason::ObjectTooLarge,
        DeadLetterReason::NotAnImage,
        DeadLetterReason::FetchFailed,
        DeadLetterReason::EndpointRejected,
        DeadLetterReason::EndpointUnavailable,
        DeadLetterReason::BadEndpointResponse,
        DeadLetterReason::AlertFailed,
        DeadLetterReason::TooManyRecords,
        DeadLetterReason::BadReviewRecord,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MalformedEvent => "malformed_event",
            DeadLetterReason::UnsupportedEvent => "unsupported_event",
            DeadLetterReason::BucketNotAllowed => "bucket_not_allowed",
            DeadLetterReason::ObjectNotFound => "object_not_found",
            DeadLetterReason::ObjectTooLarge => "object_too_large",
            DeadLetterReason::NotAnImage => "not_an_image",
            DeadLetterReason::FetchFailed => "fetch_failed",
            DeadLetterReason::EndpointRejected => "endpoint_rejected",
            DeadLetterReason::EndpointUnavailable => "endpoint_unavailable",
            DeadLetterReason::BadEndpointResponse => "bad_endpoint_response",
            DeadLetterReason::AlertFailed => "alert_failed",
            DeadLetterReason::TooManyRecords => "too_many_records",
            DeadLetterReason::BadReviewRecord => "bad_review_record",
        }
    }
}

/// Where an input came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Accepted,
    Review,
}

impl Decision {
    pub const ALL: [Decision; 2] = [Decision::Accepted, Decision::Review];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accepted => "accepted",
            Decision::Review => "review",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub fetch: f64,
    pub infer: f64,
    pub total: f64,
}

/// The `configurationId` of the S3 notifications `inferstream backfill`
/// produces: their predictions say `"backfill": true`.
pub const BACKFILL_CONFIGURATION_ID: &str = "inferstream-backfill";

/// A prediction on the results (accepted) or review topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub schema: String,
    /// `bucket/key@version-or-etag`: stable across re-deliveries.
    pub id: String,
    pub bucket: String,
    pub key: String,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    pub size: u64,
    pub label: String,
    pub confidence: f64,
    pub scores: BTreeMap<String, f64>,
    pub threshold: f64,
    pub decision: Decision,
    pub endpoint: String,
    pub variant: Option<String>,
    pub event_time: Option<String>,
    pub processed_at: String,
    pub latency_ms: Latency,
    pub source: SourceRef,
    /// Announced by `inferstream backfill`, not by an upload.
    #[serde(default)]
    pub backfill: bool,
}

/// A dead-letter record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema: String,
    pub reason: String,
    pub detail: String,
    pub bucket: Option<String>,
    pub key: Option<String>,
    /// The image's S3 version, when its event named one: which record of
    /// a message that announced several versions of one key failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// The original message (its first `pipeline.dead_letter_payload_bytes`
    /// when longer), as UTF-8 when it is, else base64.
    pub payload: String,
    /// "utf-8" or "base64".
    pub payload_encoding: String,
    /// Size of the whole original message.
    #[serde(default)]
    pub payload_bytes: usize,
    /// SHA-256 of the whole original message, hex.
    #[serde(default)]
    pub payload_sha256: String,
    /// True when `payload` holds only the first bytes of the message.
    #[serde(default)]
    pub payload_truncated: bool,
    pub source: SourceRef,
    pub failed_at: String,
}

/// Longest `detail` of a dead letter, in bytes.
pub const MAX_DETAIL: usize = 2048;
/// Longest `bucket` or `key` a dead letter carries, in bytes.
pub const MAX_OBJECT_NAME: usize = 1024;
/// Room for everything in a dead letter but its payload (fields at their
/// caps, six-fold JSON escaping, the Kafka key and record framing).
const DEAD_LETTER_OVERHEAD: usize =
    6 * (MAX_DETAIL + 2 * MAX_OBJECT_NAME) + 2 * MAX_OBJECT_NAME + 8192;
/// Longest `version_id` a dead letter carries (S3's are 32 bytes): it fits
/// in the room above, so the limits of earlier versions stand. A longer
/// one is left out rather than cut (a cut one would name no version).
pub const MAX_VERSION: usize = 256;

/// The largest dead-letter record (JSON value plus key) made with payloads
/// cut at `payload_cap` bytes: JSON escapes a control character in six.
pub fn max_dead_letter_bytes(payload_cap: usize) -> usize {
    payload_cap
        .saturating_mul(6)
        .saturating_add(DEAD_LETTER_OVERHEAD)
}

/// The largest payload cap whose dead letters fit in `message_max` bytes.
pub fn max_dead_letter_payload(message_max: usize) -> usize {
    message_max.saturating_sub(DEAD_LETTER_OVERHEAD) / 6
}

/// An input message as dead letters carry it: the whole message when it is
/// at most the cap, else a copy of its first bytes with its size and hash
/// (so that a message of a megabyte does not stay in memory with every
/// image it announced).
#[derive(Debug, Clone, Default)]
pub struct Payload {
    head: bytes::Bytes,
    len: usize,
    /// Computed up front only for cut payloads (the rest are hashed when a
    /// dead letter is made).
    sha256: Option<std::sync::Arc<str>>,
}

impl Payload {
    pub fn new(bytes: bytes::Bytes, cap: usize) -> Payload {
        if bytes.len() <= cap {
            return Payload {
                len: bytes.len(),
                head: bytes,
                sha256: None,
            };
        }
        Payload {
            len: bytes.len(),
            sha256: Some(sha256_hex(&bytes).into()),
            head: bytes::Bytes::copy_from_slice(&bytes[..cap]),
        }
    }

    /// Size of the whole message.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes kept (all of them unless [`Payload::is_truncated`]).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    pub fn is_truncated(&self) -> bool {
        self.head.len() < self.len
    }

    pub fn sha256(&self) -> String {
        match &self.sha256 {
            Some(h) => h.to_string(),
            None => sha256_hex(&self.head),
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary, marked with `…`.
pub fn truncate_str(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Kafka key of every output about an object.
pub fn kafka_key(bucket: &str, key: &str) -> String {
    format!("{bucket}/{key}")
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The data-capture `eventId` of a prediction: UUID-shaped, derived from
/// its `id` (the same for every copy of the prediction), so that ground
/// truth keyed by either can be joined to it.
pub fn event_id(prediction_id: &str) -> String {
    let h = sha256_hex(prediction_id.as_bytes());
    // 8-4-4-4-12 hex digits; version nibble 8 (custom), variant 10xx.
    let variant = match u8::from_str_radix(&h[16..17], 16) {
        Ok(v) => format!("{:x}", 8 | (v & 3)),
        Err(_) => "8".into(),
    };
    format!(
        "{}-{}-8{}-{}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        variant,
        &h[17..20],
        &h[20..32]
    )
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl DeadLetter {
    /// A dead letter for `payload`; every field is capped so that the
    /// record fits [`max_dead_letter_bytes`] of the payload's cap.
    pub fn new(
        reason: DeadLetterReason,
        detail: impl Into<String>,
        bucket: Option<String>,
        key: Option<String>,
        payload: &Payload,
        source: SourceRef,
    ) -> DeadLetter {
        let head = payload.head();
        let (text, payload_encoding) = match std::str::from_utf8(head) {
            Ok(s) => (s.to_string(), "utf-8"),
            // A cut in the middle of a character: keep the whole ones.
            Err(e) if payload.is_truncated() && e.error_len().is_none() => (
                String::from_utf8_lossy(&head[..e.valid_up_to()]).into_owned(),
                "utf-8",
            ),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(head),
                "base64",
            ),
        };
        let detail: String = detail.into();
        DeadLetter {
            schema: DEADLETTER_SCHEMA.to_string(),
            reason: reason.as_str().to_string(),
            detail: truncate_str(&detail, MAX_DETAIL),
            bucket: bucket.map(|b| truncate_str(&b, MAX_OBJECT_NAME)),
            key: key.map(|k| truncate_str(&k, MAX_OBJECT_NAME)),
            version_id: None,
            payload: text,
            payload_encoding: payload_encoding.to_string(),
            payload_bytes: payload.len(),
            payload_sha256: payload.sha256(),
            payload_truncated: payload.is_truncated(),
            source,
            failed_at: now_rfc3339(),
        }
    }

    /// The same dead letter, about the image's version `v` (left out when
    /// longer than [`MAX_VERSION`]).
    pub fn with_version(mut self, v: Option<&str>) -> DeadLetter {
        self.version_id = v.filter(|v| v.len() <= MAX_VERSION).map(str::to_string);
        self
    }

    /// The same dead letter without its payload, for when even the capped
    /// record is refused by Kafka (a topic with a smaller limit).
    pub fn without_payload(&self, why: &str) -> DeadLetter {
        let mut d = self.clone();
        d.payload = String::new();
        d.payload_truncated = d.payload_bytes > 0;
        d.detail = truncate_str(
            &format!("{} (payload left out: {why})", d.detail),
            MAX_DETAIL + 200,
        );
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_payloads_are_cut_with_their_size_and_hash() {
        let src = SourceRef {
            topic: "t".into(),
            partition: 0,
            offset: 1,
        };
        // Six-fold escaping, base64, and a cut inside a character.
        let cases: Vec<Vec<u8>> = vec![
            vec![1u8; 200_000],
            vec![0xffu8; 750_000],
            "é".repeat(100_000).into_bytes(),
        ];
        for raw in cases {
            let p = Payload::new(bytes::Bytes::from(raw.clone()), 1001);
            let d = DeadLetter::new(
                DeadLetterReason::MalformedEvent,
                "x".repeat(10_000),
                Some("b".repeat(5000)),
                Some("k".repeat(5000)),
                &p,
                src.clone(),
            )
            .with_version(Some(&"\u{1}".repeat(MAX_VERSION)));
            assert!(d.payload_truncated);
            assert_eq!(d.payload_bytes, raw.len());
            assert_eq!(d.payload_sha256, sha256_hex(&raw));
            let json = serde_json::to_vec(&d).unwrap();
            assert!(json.len() <= max_dead_letter_bytes(1001), "{}", json.len());
            assert!(d.detail.len() <= MAX_DETAIL && d.key.unwrap().len() <= MAX_OBJECT_NAME);
            assert_eq!(d.version_id.map(|v| v.len()), Some(MAX_VERSION));
        }
        let p = Payload::new(bytes::Bytes::from_static(b"{}"), 1001);
        let long = DeadLetter::new(
            DeadLetterReason::FetchFailed,
            "",
            None,
            None,
            &p,
            src.clone(),
        )
        .with_version(Some(&"v".repeat(MAX_VERSION + 1)));
        assert_eq!(long.version_id, None);
        assert!(!p.is_truncated());
        assert_eq!(p.sha256(), sha256_hex(b"{}"));
    }

    #[test]
    fn binary_payloads_are_base64() {
        let src = SourceRef {
            topic: "t".into(),
            partition: 0,
            offset: 1,
        };
        let d = DeadLetter::new(
            DeadLetterReason::MalformedEvent,
            "x",
            None,
            None,
            &Payload::new(bytes::Bytes::from_static(b"\xff\x00"), 100),
            src.clone(),
        );
        assert_eq!(d.payload_encoding, "base64");
        assert_eq!(d.payload, "/wA=");
        let d = DeadLetter::new(
            DeadLetterReason::MalformedEvent,
            "x",
            None,
            None,
            &Payload::new(bytes::Bytes::from_static(b"{}"), 100),
            src,
        );
        assert_eq!(d.payload, "{}");
        assert_eq!(d.reason, "malformed_event");
    }
}
