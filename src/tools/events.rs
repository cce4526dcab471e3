//! Upload notifications in the four shapes the service reads (S3, SNS
//! envelope, EventBridge, MinIO), as the services send them. The demo emits
//! them, and the tests do.

use serde_json::{json, Value};

const REGION: &str = "us-east-1";

/// Form-URL-encodes a key as S3 notifications do (`/` kept, space as `+`).
pub fn s3_encode(key: &str) -> String {
    encode(key, true)
}

/// Percent-encodes a key; `keep_slash` leaves `/` as it is (S3), MinIO
/// encodes it as `%2F`.
fn encode(key: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b' ' => out.push('+'),
            b'/' if keep_slash => out.push('/'),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'*' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Where a notification comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    S3,
    Sns,
    EventBridge,
    Minio,
}

/// Every shape, for round-robin use.
pub const SHAPES: [Shape; 4] = [Shape::S3, Shape::Sns, Shape::EventBridge, Shape::Minio];

fn s3_record(bucket: &str, key: &str, size: usize, etag: &str, name: &str, version: &str) -> Value {
    json!({
        "eventVersion": version,
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": "2026-11-24T10:00:00.000Z",
        "eventName": name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.10"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "inferstream",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": format!("arn:aws:s3:::{bucket}")},
            "object": {"key": key, "size": size, "eTag": etag, "sequencer": "0055AED6DCD90281E5"}
        }
    })
}

/// The upload notification of one object in `shape`; `key` is the real
/// (decoded) key and is encoded as each shape does.
pub fn event(shape: Shape, bucket: &str, key: &str, size: usize, etag: &str) -> Vec<u8> {
    let v = match shape {
        Shape::S3 => {
            json!({"Records": [s3_record(bucket, &s3_encode(key), size, etag, "ObjectCreated:Put", "2.1")]})
        }
        Shape::Sns => {
            let inner = json!({"Records": [s3_record(bucket, &s3_encode(key), size, etag, "ObjectCreated:Put", "2.2")]});
            json!({
                "Type": "Notification",
                "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
                "TopicArn": "arn:aws:sns:us-east-1:123456789012:s3-uploads",
                "Subject": "Amazon S3 Notification",
                "Message": inner.to_string(),
                "Timestamp": "2026-11-24T10:00:00.000Z",
                "SignatureVersion": "1",
                "Signature": "EXAMPLE",
                "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService.pem",
                "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"
            })
        }
        Shape::EventBridge => json!({
            "version": "0",
            "id": "17793124-05d4-b198-2fde-7ededc63b103",
            "detail-type": "Object Created",
            "source": "aws.s3",
            "account": "123456789012",
            "time": "2026-11-24T10:00:00Z",
            "region": REGION,
            "resources": [format!("arn:aws:s3:::{bucket}")],
            "detail": {
                "version": "0",
                "bucket": {"name": bucket},
                "object": {"key": key, "size": size, "etag": etag, "sequencer": "617f08299329d189"},
                "request-id": "N4N7GDK58NMKJ12R",
                "requester": "123456789012",
                "source-ip-address": "203.0.113.10",
                "reason": "PutObject"
            }
        }),
        Shape::Minio => {
            let enc = encode(key, false);
            let mut rec = s3_record(bucket, &enc, size, etag, "s3:ObjectCreated:Put", "2.0");
            rec["eventSource"] = json!("minio:s3");
            json!({"EventName": "s3:ObjectCreated:Put", "Key": format!("{bucket}/{key}"), "Records": [rec]})
        }
    };
    v.to_string().into_bytes()
}

/// An S3-shaped notification whose `eventTime` is `at` (the benchmark
/// measures end-to-end latency from it).
pub fn s3_event_at(
    bucket: &str,
    key: &str,
    size: usize,
    etag: &str,
    at: std::time::SystemTime,
) -> Vec<u8> {
    let mut rec = s3_record(
        bucket,
        &s3_encode(key),
        size,
        etag,
        "ObjectCreated:Put",
        "2.1",
    );
    rec["eventTime"] = json!(humantime::format_rfc3339_millis(at).to_string());
    json!({"Records": [rec]}).to_string().into_bytes()
}

/// One object that a made-up notification announces (backfill, redrive).
#[derive(Debug, Clone, Copy)]
pub struct Announced<'a> {
    pub bucket: &'a str,
    /// The real (decoded) key.
    pub key: &'a str,
    pub size: Option<u64>,
    /// With or without the quotes ListObjectsV2 gives it.
    pub etag: Option<&'a str>,
    pub version_id: Option<&'a str>,
    /// RFC 3339, or empty.
    pub time: &'a str,
    /// Tells the service who made it (`inferstream-backfill`, ...).
    pub configuration_id: &'a str,
}

/// An S3 notification (`ObjectCreated:Put`, one record) of `a`, shaped as
/// S3 makes them: the key form-URL-encoded, the eTag without quotes.
pub fn announce(a: &Announced) -> Vec<u8> {
    let mut object = json!({"key": s3_encode(a.key)});
    if let Some(size) = a.size {
        object["size"] = json!(size);
    }
    if let Some(etag) = a
        .etag
        .map(|e| e.trim_matches('"'))
        .filter(|e| !e.is_empty())
    {
        object["eTag"] = json!(etag);
    }
    if let Some(v) = a.version_id.filter(|v| !v.is_empty()) {
        object["versionId"] = json!(v);
    }
    json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": a.time,
        "eventName": "ObjectCreated:Put",
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": a.configuration_id,
            "bucket": {"name": a.bucket, "arn": format!("arn:aws:s3:::{}", a.bucket)},
            "object": object
        }
    }]})
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilterConfig;
    use crate::pipeline::decode::{decode, Outcome};

    #[test]
    fn every_shape_decodes_to_the_same_object() {
        let filter = FilterConfig {
            allowed_buckets: vec![],
            key_prefixes: vec![],
            key_suffixes: vec![],
        };
        for shape in SHAPES {
            let key = "bikes/set 1/img+ü%.png";
            let out = decode(Some(&event(shape, "uploads", key, 12, "abc")), &filter);
            match out.as_slice() {
                [Outcome::Image(img)] => {
                    assert_eq!(img.bucket, "uploads", "{shape:?}");
                    assert_eq!(img.key, key, "{shape:?}");
                    assert_eq!(img.etag.as_deref(), Some("abc"), "{shape:?}");
                }
                other => panic!("{shape:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn s3_event_at_carries_its_time() {
        let filter = FilterConfig {
            allowed_buckets: vec![],
            key_prefixes: vec![],
            key_suffixes: vec![],
        };
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        let out = decode(
            Some(&s3_event_at("uploads", "a b.png", 7, "e", at)),
            &filter,
        );
        match out.as_slice() {
            [Outcome::Image(img)] => {
                assert_eq!(img.key, "a b.png");
                assert_eq!(img.event_time.as_deref(), Some("2026-11-18T11:06:40.123Z"));
            }
            other => panic!("{other:?}"),
        }
    }
}
