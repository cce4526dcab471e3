//! Decode: one Kafka message → the images it announces.
//!
//! Accepted shapes (DESIGN.md "Input events"): S3 event notifications
//! (`Records[]`, eventVersion 2.x), the same inside an SNS envelope,
//! EventBridge `Object Created`, and MinIO (`EventName`, `Key`, `Records[]`).
//! Pure functions; no I/O.

use serde_json::Value;

use crate::config::FilterConfig;
use crate::record::DeadLetterReason;

/// Largest message decoded; bigger ones are dead-lettered as malformed.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Most records decoded from one message by [`decode`]; the pipeline uses
/// `pipeline.max_records_per_message` ([`decode_limited`]).
const MAX_RECORDS: usize = 10_000;
/// Longest object key S3 allows, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest bucket name accepted (S3 allows 63; other stores a little more).
pub const MAX_BUCKET_BYTES: usize = 255;
/// Longest ETag, version id or event time accepted, in bytes (they end up
/// in every output record).
const MAX_FIELD_BYTES: usize = 1024;

/// An S3 object announced by an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub bucket: String,
    /// Decoded key (URL-decoding applied where the shape encodes keys).
    pub key: String,
    pub size: Option<u64>,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    pub event_time: Option<String>,
    /// Announced by `inferstream backfill` (its S3 notifications'
    /// `configurationId`).
    pub backfill: bool,
}

impl ImageRef {
    /// The stable id of its predictions: `bucket/key@version`, else
    /// `@etag` (the event's, else the one S3 answered with).
    pub fn id(&self, fetched_etag: Option<&str>) -> String {
        let tag = self
            .version_id
            .as_deref()
            .or(self.etag.as_deref())
            .or(fetched_etag)
            .unwrap_or("-");
        format!("{}/{}@{}", self.bucket, self.key, tag.trim_matches('"'))
    }
}

/// Why a record was skipped: a counted, terminal outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// `s3:TestEvent`, sent when notifications are configured.
    TestEvent,
    /// A well-formed event that is not an object creation.
    NotCreate,
    /// The key does not match `filter.key_prefixes` / `filter.key_suffixes`.
    KeyFiltered,
    /// A "directory marker" key ending in `/`.
    DirectoryMarker,
}

impl SkipReason {
    pub const ALL: [SkipReason; 4] = [
        SkipReason::TestEvent,
        SkipReason::NotCreate,
        SkipReason::KeyFiltered,
        SkipReason::DirectoryMarker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::TestEvent => "test_event",
            SkipReason::NotCreate => "not_create",
            SkipReason::KeyFiltered => "key_filtered",
            SkipReason::DirectoryMarker => "directory_marker",
        }
    }
}

/// A record that must go to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: DeadLetterReason,
    pub detail: String,
    pub bucket: Option<String>,
    pub key: Option<String>,
}

/// One record of a message, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Image(ImageRef),
    Skip(SkipReason),
    Reject(Rejected),
}

/// Decodes a message into one outcome per record it carries (at least one).
pub fn decode(payload: Option<&[u8]>, filter: &FilterConfig) -> Vec<Outcome> {
    decode_limited(payload, filter, MAX_RECORDS)
}

/// As [`decode`]; a message with more than `max_records` records is one
/// `too_many_records` rejection.
pub fn decode_limited(
    payload: Option<&[u8]>,
    filter: &FilterConfig,
    max_records: usize,
) -> Vec<Outcome> {
    let mut out = decode_unfiltered(payload, max_records.clamp(1, MAX_RECORDS));
    for o in out.iter_mut() {
        if let Outcome::Image(img) = o {
            if let Some(verdict) = apply_filter(img, filter) {
                *o = verdict;
            }
        }
    }
    out
}

fn reject(reason: DeadLetterReason, detail: impl Into<String>) -> Outcome {
    Outcome::Reject(Rejected {
        reason,
        detail: detail.into(),
        bucket: None,
        key: None,
    })
}

fn malformed(detail: impl Into<String>) -> Vec<Outcome> {
    vec![reject(DeadLetterReason::MalformedEvent, detail)]
}

fn decode_unfiltered(payload: Option<&[u8]>, max_records: usize) -> Vec<Outcome> {
    let Some(payload) = payload else {
        return malformed("message has no value (tombstone)");
    };
    if payload.len() > MAX_MESSAGE_BYTES {
        return malformed(format!(
            "message is {} bytes; at most {MAX_MESSAGE_BYTES} are decoded",
            payload.len()
        ));
    }
    let value: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return malformed(format!("not JSON: {e}")),
    };
    decode_value(&value, 0, max_records)
}

fn decode_value(value: &Value, depth: u8, max_records: usize) -> Vec<Outcome> {
    let Some(obj) = value.as_object() else {
        return malformed("event is not a JSON object");
    };

    // SNS envelope: Message is the S3 event as a JSON string.
    if obj.get("Type").and_then(Value::as_str) == Some("Notification")
        && obj.contains_key("Message")
    {
        if depth > 0 {
            return malformed("SNS envelope nested inside another envelope");
        }
        let Some(inner) = obj.get("Message").and_then(Value::as_str) else {
            return malformed("SNS envelope `Message` is not a string");
        };
        return match serde_json::from_str::<Value>(inner) {
            Ok(v) => decode_value(&v, depth + 1, max_records),
            Err(e) => malformed(format!("SNS envelope `Message` is not JSON: {e}")),
        };
    }

    if obj.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return vec![Outcome::Skip(SkipReason::TestEvent)];
    }

    // EventBridge.
    if obj.contains_key("detail-type")
        || obj.get("source").and_then(Value::as_str) == Some("aws.s3")
    {
        return vec![decode_eventbridge(obj)];
    }

    // S3 notification, or MinIO (which adds EventName/Key around Records).
    if let Some(records) = obj.get("Records") {
        let Some(records) = records.as_array() else {
            return malformed("`Records` is not an array");
        };
        if records.is_empty() {
            return malformed("`Records` is empty");
        }
        if records.len() > max_records {
            return vec![reject(
                DeadLetterReason::TooManyRecords,
                format!(
                    "{} records in one message; at most {max_records} (pipeline.max_records_per_message)",
                    records.len()
                ),
            )];
        }
        return records.iter().map(decode_s3_record).collect();
    }

    malformed("not an S3, SNS, EventBridge or MinIO event (no `Records`, `detail-type` or `Type`)")
}

fn str_field<'a>(v: &'a Value, path: &[&str]) -> Result<&'a str, String> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .ok_or_else(|| format!("missing `{}`", path.join(".")))?;
    }
    cur.as_str()
        .ok_or_else(|| format!("`{}` is not a string", path.join(".")))
}

fn opt_str(v: &Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    match cur {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn opt_u64(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

// The closure uses `Err` as an early return carrying the final outcome.
#[allow(clippy::result_large_err)]
fn decode_s3_record(record: &Value) -> Outcome {
    let attempt = || -> Result<Outcome, Outcome> {
        let bad = |d: String| reject(DeadLetterReason::MalformedEvent, d);
        if !record.is_object() {
            return Err(bad("record is not a JSON object".into()));
        }
        let version = str_field(record, &["eventVersion"]).map_err(bad)?;
        if !supported_version(version) {
            return Err(reject(
                DeadLetterReason::UnsupportedEvent,
                format!("eventVersion {version} is not 2.x"),
            ));
        }
        let name = str_field(record, &["eventName"]).map_err(bad)?;
        let raw_bucket = str_field(record, &["s3", "bucket", "name"]).map_err(bad)?;
        let raw_key = str_field(record, &["s3", "object", "key"]).map_err(bad)?;
        let key = url_decode_key(raw_key).map_err(|e| {
            Outcome::Reject(Rejected {
                reason: DeadLetterReason::MalformedEvent,
                detail: e,
                bucket: Some(raw_bucket.to_string()),
                key: Some(raw_key.to_string()),
            })
        })?;
        let name = name.strip_prefix("s3:").unwrap_or(name);
        if !name.starts_with("ObjectCreated:") {
            return Ok(Outcome::Skip(SkipReason::NotCreate));
        }
        Ok(image(ImageRef {
            bucket: raw_bucket.to_string(),
            key,
            size: opt_u64(record, &["s3", "object", "size"]),
            etag: opt_str(record, &["s3", "object", "eTag"])
                .or_else(|| opt_str(record, &["s3", "object", "etag"])),
            version_id: opt_str(record, &["s3", "object", "versionId"]),
            event_time: opt_str(record, &["eventTime"]),
            backfill: opt_str(record, &["s3", "configurationId"]).as_deref()
                == Some(crate::record::BACKFILL_CONFIGURATION_ID),
        }))
    };
    match attempt() {
        Ok(o) | Err(o) => o,
    }
}

fn decode_eventbridge(obj: &serde_json::Map<String, Value>) -> Outcome {
    let v = Value::Object(obj.clone());
    let bad = |d: String| reject(DeadLetterReason::MalformedEvent, d);
    let detail_type = match str_field(&v, &["detail-type"]) {
        Ok(t) => t,
        Err(e) => return bad(e),
    };
    if detail_type != "Object Created" {
        return Outcome::Skip(SkipReason::NotCreate);
    }
    let bucket = match str_field(&v, &["detail", "bucket", "name"]) {
        Ok(b) => b,
        Err(e) => return bad(e),
    };
    let key = match str_field(&v, &["detail", "object", "key"]) {
        Ok(k) => k,
        Err(e) => return bad(e),
    };
    image(ImageRef {
        bucket: bucket.to_string(),
        key: key.to_string(),
        size: opt_u64(&v, &["detail", "object", "size"]),
        etag: opt_str(&v, &["detail", "object", "etag"]),
        version_id: opt_str(&v, &["detail", "object", "version-id"]),
        event_time: opt_str(&v, &["time"]),
        backfill: false,
    })
}

fn image(img: ImageRef) -> Outcome {
    let too_long = |what: &str, len: usize, max: usize| {
        Outcome::Reject(Rejected {
            reason: DeadLetterReason::MalformedEvent,
            detail: format!("{what} is {len} bytes; at most {max}"),
            bucket: Some(img.bucket.clone()),
            key: Some(img.key.clone()),
        })
    };
    if img.bucket.len() > MAX_BUCKET_BYTES {
        return too_long("bucket name", img.bucket.len(), MAX_BUCKET_BYTES);
    }
    if img.key.len() > MAX_KEY_BYTES {
        return too_long("object key", img.key.len(), MAX_KEY_BYTES);
    }
    for (what, field) in [
        ("eTag", &img.etag),
        ("versionId", &img.version_id),
        ("eventTime", &img.event_time),
    ] {
        if let Some(f) = field {
            if f.len() > MAX_FIELD_BYTES {
                return too_long(what, f.len(), MAX_FIELD_BYTES);
            }
        }
    }
    if img.bucket.is_empty() {
        return Outcome::Reject(Rejected {
            reason: DeadLetterReason::MalformedEvent,
            detail: "bucket name is empty".into(),
            bucket: None,
            key: Some(img.key),
        });
    }
    if img.key.is_empty() {
        return Outcome::Reject(Rejected {
            reason: DeadLetterReason::MalformedEvent,
            detail: "object key is empty".into(),
            bucket: Some(img.bucket),
            key: None,
        });
    }
    if img.key.ends_with('/') && img.size.unwrap_or(0) == 0 {
        return Outcome::Skip(SkipReason::DirectoryMarker);
    }
    Outcome::Image(img)
}

/// eventVersion 2.x: the major compared for equality, any minor accepted
/// (AWS sends 2.1-2.3, MinIO 2.0; unknown fields are ignored).
fn supported_version(v: &str) -> bool {
    let mut parts = v.split('.');
    let major = parts.next().and_then(|m| m.parse::<u32>().ok());
    let minor = parts.next().map_or(Some(0), |m| m.parse::<u32>().ok());
    major == Some(2) && minor.is_some()
}

/// Form-URL decoding of S3/MinIO keys: `+` is a space, then percent-decoding.
pub fn url_decode_key(raw: &str) -> Result<String, String> {
    // S3 escapes every `%` in a key as `%25`; a bare one is not S3's.
    let bytes = raw.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Err(format!(
                "key `{raw}` has a `%` that is not a percent escape"
            ));
        }
    }
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("key `{raw}` does not decode to UTF-8"))
}

fn apply_filter(img: &ImageRef, filter: &FilterConfig) -> Option<Outcome> {
    if !filter.allowed_buckets.is_empty()
        && !filter.allowed_buckets.iter().any(|b| b == &img.bucket)
    {
        return Some(Outcome::Reject(Rejected {
            reason: DeadLetterReason::BucketNotAllowed,
            detail: format!("bucket `{}` is not in filter.allowed_buckets", img.bucket),
            bucket: Some(img.bucket.clone()),
            key: Some(img.key.clone()),
        }));
    }
    if !filter.key_prefixes.is_empty()
        && !filter
            .key_prefixes
            .iter()
            .any(|p| img.key.starts_with(p.as_str()))
    {
        return Some(Outcome::Skip(SkipReason::KeyFiltered));
    }
    if !filter.key_suffixes.is_empty() {
        let lower = img.key.to_ascii_lowercase();
        if !filter
            .key_suffixes
            .iter()
            .any(|s| lower.ends_with(&s.to_ascii_lowercase()))
        {
            return Some(Outcome::Skip(SkipReason::KeyFiltered));
        }
    }
    None
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> FilterConfig {
        FilterConfig {
            allowed_buckets: vec![],
            key_prefixes: vec![],
            key_suffixes: vec![],
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/events/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn images(out: &[Outcome]) -> Vec<&ImageRef> {
        out.iter()
            .filter_map(|o| match o {
                Outcome::Image(i) => Some(i),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ids_prefer_version_then_etag() {
        let mut img = ImageRef {
            bucket: "uploads".into(),
            key: "bikes/img 1.png".into(),
            size: None,
            etag: Some("\"abc\"".into()),
            version_id: None,
            event_time: None,
            backfill: false,
        };
        assert_eq!(img.id(None), "uploads/bikes/img 1.png@abc");
        img.version_id = Some("v1".into());
        assert_eq!(img.id(Some("zzz")), "uploads/bikes/img 1.png@v1");
        img.version_id = None;
        img.etag = None;
        assert_eq!(img.id(Some("\"zzz\"")), "uploads/bikes/img 1.png@zzz");
    }

    #[test]
    fn s3_notification_with_encoded_key() {
        let out = decode(Some(&fixture("s3-put.json")), &open());
        let imgs = images(&out);
        assert_eq!(imgs.len(), 1);
        assert_eq!(imgs[0].bucket, "uploads");
        assert_eq!(imgs[0].key, "bikes/img 1+2.png");
        assert_eq!(imgs[0].size, Some(3012));
        assert_eq!(
            imgs[0].etag.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(
            imgs[0].version_id.as_deref(),
            Some("096fKKXTRTtl3on89fVO.nfljtsv6qko")
        );
        assert_eq!(
            imgs[0].event_time.as_deref(),
            Some("2026-11-24T09:00:00.000Z")
        );
    }

    #[test]
    fn several_records_in_one_message_with_a_delete_skipped() {
        let out = decode(Some(&fixture("s3-multi.json")), &open());
        assert_eq!(out.len(), 3);
        assert_eq!(images(&out).len(), 2);
        assert!(out.contains(&Outcome::Skip(SkipReason::NotCreate)));
    }

    #[test]
    fn sns_envelope_is_unwrapped() {
        let out = decode(Some(&fixture("sns-wrapped.json")), &open());
        let imgs = images(&out);
        assert_eq!(imgs.len(), 1);
        assert_eq!(imgs[0].key, "cats/tabby cat.jpg");
    }

    #[test]
    fn eventbridge_key_is_raw() {
        let out = decode(Some(&fixture("eventbridge.json")), &open());
        let imgs = images(&out);
        assert_eq!(imgs.len(), 1);
        assert_eq!(imgs[0].bucket, "uploads");
        assert_eq!(imgs[0].key, "photos/a+b%20c.png");
        assert_eq!(imgs[0].size, Some(5120));
        assert_eq!(
            imgs[0].version_id.as_deref(),
            Some("IYV3p45BT0ac8hjHg1houSdS1a.Mro8e")
        );
    }

    #[test]
    fn minio_keys_decode_slashes() {
        let out = decode(Some(&fixture("minio.json")), &open());
        let imgs = images(&out);
        assert_eq!(imgs.len(), 1);
        assert_eq!(imgs[0].bucket, "images");
        assert_eq!(imgs[0].key, "dir/sub dir/pic.png");
    }

    #[test]
    fn test_event_and_non_create_are_skipped() {
        assert_eq!(
            decode(Some(&fixture("s3-test-event.json")), &open()),
            vec![Outcome::Skip(SkipReason::TestEvent)]
        );
        assert_eq!(
            decode(Some(&fixture("eventbridge-deleted.json")), &open()),
            vec![Outcome::Skip(SkipReason::NotCreate)]
        );
    }

    fn reasons(out: &[Outcome]) -> Vec<DeadLetterReason> {
        out.iter()
            .filter_map(|o| match o {
                Outcome::Reject(r) => Some(r.reason),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn limits_bound_what_one_message_can_make() {
        let record = |key: &str, etag: &str| {
            serde_json::json!({"eventVersion": "2.1", "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": "b"}, "object": {"key": key, "eTag": etag}}})
        };
        let many = serde_json::json!({ "Records": vec![record("k.png", "e"); 17] }).to_string();
        assert_eq!(
            reasons(&decode_limited(Some(many.as_bytes()), &open(), 16)),
            vec![DeadLetterReason::TooManyRecords]
        );
        assert_eq!(
            images(&decode_limited(Some(many.as_bytes()), &open(), 17)).len(),
            17
        );
        for (key, etag) in [
            ("k".repeat(MAX_KEY_BYTES + 1), "e".to_string()),
            ("k".into(), "e".repeat(2000)),
        ] {
            let one = serde_json::json!({ "Records": [record(&key, &etag)] }).to_string();
            assert_eq!(
                reasons(&decode(Some(one.as_bytes()), &open())),
                vec![DeadLetterReason::MalformedEvent]
            );
        }
        let longest =
            serde_json::json!({ "Records": [record(&"k".repeat(MAX_KEY_BYTES), "e")] }).to_string();
        assert_eq!(images(&decode(Some(longest.as_bytes()), &open())).len(), 1);
    }

    #[test]
    fn malformed_input_is_rejected_not_panicked() {
        let cases: &[&[u8]] = &[
            b"",
            b"{",
            b"[]",
            b"42",
            b"{\"Records\": 5}",
            b"{\"Records\": []}",
            b"{\"Records\": [{}]}",
            b"{\"Records\": [{\"eventVersion\": \"2.1\", \"eventName\": \"ObjectCreated:Put\", \"s3\": {\"bucket\": {\"name\": 7}, \"object\": {\"key\": \"a\"}}}]}",
            b"{\"Type\": \"Notification\", \"Message\": \"not json\"}",
            b"{\"Type\": \"Notification\", \"Message\": 3}",
            b"{\"detail-type\": \"Object Created\", \"detail\": {}}",
            b"\xff\xfe",
        ];
        for case in cases {
            let out = decode(Some(case), &open());
            assert_eq!(
                reasons(&out),
                vec![DeadLetterReason::MalformedEvent],
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        assert_eq!(
            reasons(&decode(None, &open())),
            vec![DeadLetterReason::MalformedEvent]
        );
        let deep = "[".repeat(10_000);
        assert_eq!(
            reasons(&decode(Some(deep.as_bytes()), &open())),
            vec![DeadLetterReason::MalformedEvent]
        );
    }

    #[test]
    fn event_version_major_must_be_2_any_minor() {
        assert!(supported_version("2.1"));
        assert!(supported_version("2.3"));
        assert!(supported_version("2.10"));
        assert!(supported_version("2.0"));
        assert!(!supported_version("1.0"));
        assert!(!supported_version("3.0"));
        assert!(!supported_version("two"));
        let ev = br#"{"Records":[{"eventVersion":"3.0","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"k"}}}]}"#;
        assert_eq!(
            reasons(&decode(Some(ev), &open())),
            vec![DeadLetterReason::UnsupportedEvent]
        );
    }

    #[test]
    fn key_decoding() {
        assert_eq!(url_decode_key("a+b%2Bc%2Fd").unwrap(), "a b+c/d");
        assert_eq!(url_decode_key("caf%C3%A9.png").unwrap(), "café.png");
        assert!(url_decode_key("%FF").is_err());
    }

    #[test]
    fn filters() {
        let ev = fixture("s3-put.json");
        let mut f = open();
        f.allowed_buckets = vec!["other".into()];
        assert_eq!(
            reasons(&decode(Some(&ev), &f)),
            vec![DeadLetterReason::BucketNotAllowed]
        );
        f.allowed_buckets = vec!["uploads".into()];
        assert_eq!(images(&decode(Some(&ev), &f)).len(), 1);
        f.key_prefixes = vec!["cats/".into()];
        assert_eq!(
            decode(Some(&ev), &f),
            vec![Outcome::Skip(SkipReason::KeyFiltered)]
        );
        f.key_prefixes = vec!["bikes/".into()];
        f.key_suffixes = vec![".PNG".into()];
        assert_eq!(images(&decode(Some(&ev), &f)).len(), 1);
        f.key_suffixes = vec![".jpg".into()];
        assert_eq!(
            decode(Some(&ev), &f),
            vec![Outcome::Skip(SkipReason::KeyFiltered)]
        );
    }

    #[test]
    fn bare_percent_signs_are_not_keys() {
        assert!(url_decode_key("a%ZZ.png").is_err());
        assert!(url_decode_key("a%2").is_err());
        assert!(url_decode_key("100%").is_err());
        assert_eq!(url_decode_key("100%25+off.png").unwrap(), "100% off.png");
    }

    #[test]
    fn empty_key_and_directory_markers() {
        let ev = br#"{"Records":[{"eventVersion":"2.1","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":""}}},{"eventVersion":"2.1","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"dir/","size":0}}}]}"#;
        let out = decode(Some(ev), &open());
        assert_eq!(reasons(&out), vec![DeadLetterReason::MalformedEvent]);
        assert_eq!(out[1], Outcome::Skip(SkipReason::DirectoryMarker));
    }
}
