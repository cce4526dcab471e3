//! Output records, exactly as DESIGN.md "Output records" shows them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::decode::{DeadLetterReason, ImageRef};

pub const PREDICTION_SCHEMA: &str = "inferstream.prediction.v1";
pub const DEADLETTER_SCHEMA: &str = "inferstream.deadletter.v1";

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
}

/// A dead-letter record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema: String,
    pub reason: String,
    pub detail: String,
    pub bucket: Option<String>,
    pub key: Option<String>,
    /// The original message, as UTF-8 when it is, else base64.
    pub payload: String,
    /// "utf-8" or "base64".
    pub payload_encoding: String,
    pub source: SourceRef,
    pub failed_at: String,
}

/// The stable id of an image: `bucket/key@version`, else `@etag`.
pub fn image_id(img: &ImageRef, fetched_etag: Option<&str>) -> String {
    let tag = img
        .version_id
        .as_deref()
        .or(img.etag.as_deref())
        .or(fetched_etag)
        .unwrap_or("-");
    format!("{}/{}@{}", img.bucket, img.key, tag.trim_matches('"'))
}

/// Kafka key of every output about an object.
pub fn kafka_key(bucket: &str, key: &str) -> String {
    format!("{bucket}/{key}")
}

/// RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl DeadLetter {
    pub fn new(
        reason: DeadLetterReason,
        detail: impl Into<String>,
        bucket: Option<String>,
        key: Option<String>,
        payload: Option<&[u8]>,
        source: SourceRef,
    ) -> DeadLetter {
        let payload = payload.unwrap_or_default();
        let (payload, payload_encoding) = match std::str::from_utf8(payload) {
            Ok(s) => (s.to_string(), "utf-8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(payload),
                "base64",
            ),
        };
        DeadLetter {
            schema: DEADLETTER_SCHEMA.to_string(),
            reason: reason.as_str().to_string(),
            detail: detail.into(),
            bucket,
            key,
            payload,
            payload_encoding: payload_encoding.to_string(),
            source,
            failed_at: now_rfc3339(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_prefer_version_then_etag() {
        let mut img = ImageRef {
            bucket: "uploads".into(),
            key: "bikes/img 1.png".into(),
            size: None,
            etag: Some("\"abc\"".into()),
            version_id: None,
            event_time: None,
        };
        assert_eq!(image_id(&img, None), "uploads/bikes/img 1.png@abc");
        img.version_id = Some("v1".into());
        assert_eq!(image_id(&img, Some("zzz")), "uploads/bikes/img 1.png@v1");
        img.version_id = None;
        img.etag = None;
        assert_eq!(
            image_id(&img, Some("\"zzz\"")),
            "uploads/bikes/img 1.png@zzz"
        );
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
            Some(b"\xff\x00"),
            src.clone(),
        );
        assert_eq!(d.payload_encoding, "base64");
        assert_eq!(d.payload, "/wA=");
        let d = DeadLetter::new(
            DeadLetterReason::MalformedEvent,
            "x",
            None,
            None,
            Some(b"{}"),
            src,
        );
        assert_eq!(d.payload, "{}");
        assert_eq!(d.reason, "malformed_event");
    }
}
