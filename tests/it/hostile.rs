//! Hostile input: dozens of kinds of bad event, each must end as a
//! dead-letter record or a counted skip (or, for odd but valid keys, a
//! prediction); the service never stops and its memory stays bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use image::ImageFormat;
use inferstream::tools::endpoint::model::test_image;
use inferstream::tools::endpoint::Faults;
use serde_json::json;

use crate::harness::*;
use crate::pipeline::MINUTE;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Want {
    Dead(&'static str),
    Skip(&'static str),
    Predicted,
}

fn s3_event(bucket: &str, raw_key: &str) -> Vec<u8> {
    json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": raw_key, "size": 1}}
    }]})
    .to_string()
    .into_bytes()
}

fn record(fields: serde_json::Value) -> Vec<u8> {
    json!({ "Records": [fields] }).to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_bad_input_ends_in_a_dead_letter_or_a_counted_skip() {
    let stack = Stack::start(Faults::default()).await;
    let good = test_image(0, 0.99, 2, 16, ImageFormat::Png);
    let mut png = test_image(0, 0.99, 2, 64, ImageFormat::Png);
    png.truncate(png.len() / 2);
    let mut jpeg = test_image(1, 0.99, 2, 64, ImageFormat::Jpeg);
    jpeg.truncate(jpeg.len() / 3);
    let objects: Vec<(&str, Vec<u8>)> = vec![
        ("h/zero-bytes.png", Vec::new()),
        ("h/truncated.png", png),
        ("h/truncated.jpg", jpeg),
        ("h/text.jpg", b"GIF8 but not really; just text".to_vec()),
        (
            "h/huge.png",
            good.iter()
                .copied()
                .chain(std::iter::repeat_n(7u8, 200_000))
                .collect(),
        ),
        ("h/ünïcödé 🚲.png", good.clone()),
        ("h/a+b c%d.png", good.clone()),
        ("h/../../etc/passwd.png", good.clone()),
        ("h/deleted.png", good.clone()),
    ];
    for (key, body) in &objects {
        stack.put_object("uploads", key, body.clone()).await;
    }
    stack
        .s3
        .delete_object()
        .bucket("uploads")
        .key("h/deleted.png")
        .send()
        .await
        .unwrap();
    let enc = |k: &str| inferstream::tools::events::s3_encode(k);

    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        ("empty message", Vec::new(), Want::Dead("malformed_event")),
        ("truncated JSON", br#"{"Records": [{"eventVersion": "2.1""#.to_vec(), Want::Dead("malformed_event")),
        ("a number", b"42".to_vec(), Want::Dead("malformed_event")),
        ("a string", br#""s3:ObjectCreated:Put""#.to_vec(), Want::Dead("malformed_event")),
        ("an array", b"[1, 2, 3]".to_vec(), Want::Dead("malformed_event")),
        ("null", b"null".to_vec(), Want::Dead("malformed_event")),
        ("not UTF-8", vec![0xff, 0xfe, 0x00, 0x9c, 0x80], Want::Dead("malformed_event")),
        ("byte-order mark", b"\xef\xbb\xbf{}".to_vec(), Want::Dead("malformed_event")),
        ("deeply nested", nested.into_bytes(), Want::Dead("malformed_event")),
        ("900 kB of whitespace", vec![b' '; 900_000], Want::Dead("malformed_event")),
        ("unknown shape", br#"{"hello": "world"}"#.to_vec(), Want::Dead("malformed_event")),
        ("Records not an array", br#"{"Records": 5}"#.to_vec(), Want::Dead("malformed_event")),
        ("Records empty", br#"{"Records": []}"#.to_vec(), Want::Dead("malformed_event")),
        ("record not an object", br#"{"Records": ["x"]}"#.to_vec(), Want::Dead("malformed_event")),
        ("no s3 section", record(json!({"eventVersion": "2.1", "eventName": "ObjectCreated:Put"})), Want::Dead("malformed_event")),
        ("key is a number", record(json!({"eventVersion": "2.1", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "uploads"}, "object": {"key": 7}}})), Want::Dead("malformed_event")),
        ("eventName is a number", record(json!({"eventVersion": "2.1", "eventName": 1, "s3": {"bucket": {"name": "uploads"}, "object": {"key": "k.png"}}})), Want::Dead("malformed_event")),
        ("eventVersion 3.0", record(json!({"eventVersion": "3.0", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "uploads"}, "object": {"key": "k.png"}}})), Want::Dead("unsupported_event")),
        ("eventVersion garbage", record(json!({"eventVersion": "two", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "uploads"}, "object": {"key": "k.png"}}})), Want::Dead("unsupported_event")),
        ("bad percent escape", s3_event("uploads", "h/%ZZ.png"), Want::Dead("malformed_event")),
        ("escape of invalid UTF-8", s3_event("uploads", "h/%FF%FE.png"), Want::Dead("malformed_event")),
        ("SNS Message not JSON", br#"{"Type": "Notification", "Message": "{not json"}"#.to_vec(), Want::Dead("malformed_event")),
        ("SNS Message not a string", br#"{"Type": "Notification", "Message": {"Records": []}}"#.to_vec(), Want::Dead("malformed_event")),
        ("EventBridge without detail", br#"{"detail-type": "Object Created", "source": "aws.s3"}"#.to_vec(), Want::Dead("malformed_event")),
        ("bucket outside the allow-list", s3_event("elsewhere", "h/x.png"), Want::Dead("bucket_not_allowed")),
        ("object deleted before fetch", s3_event("uploads", "h/deleted.png"), Want::Dead("object_not_found")),
        ("empty key", s3_event("uploads", ""), Want::Dead("malformed_event")),
        ("zero-byte object", s3_event("uploads", "h/zero-bytes.png"), Want::Dead("not_an_image")),
        ("text named .jpg", s3_event("uploads", "h/text.jpg"), Want::Dead("not_an_image")),
        ("object over the size cap", s3_event("uploads", "h/huge.png"), Want::Dead("object_too_large")),
        ("truncated PNG", s3_event("uploads", "h/truncated.png"), Want::Dead("endpoint_rejected")),
        ("truncated JPEG", s3_event("uploads", "h/truncated.jpg"), Want::Dead("endpoint_rejected")),
        ("s3:TestEvent", br#"{"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "uploads"}"#.to_vec(), Want::Skip("test_event")),
        ("delete event", record(json!({"eventVersion": "2.1", "eventName": "ObjectRemoved:Delete", "s3": {"bucket": {"name": "uploads"}, "object": {"key": "k.png"}}})), Want::Skip("not_create")),
        ("unknown event name", record(json!({"eventVersion": "2.1", "eventName": "ObjectRestore:Completed", "s3": {"bucket": {"name": "uploads"}, "object": {"key": "k.png"}}})), Want::Skip("not_create")),
        ("EventBridge Object Deleted", br#"{"detail-type": "Object Deleted", "source": "aws.s3", "detail": {"bucket": {"name": "uploads"}, "object": {"key": "k.png"}}}"#.to_vec(), Want::Skip("not_create")),
        ("directory marker", record(json!({"eventVersion": "2.1", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "uploads"}, "object": {"key": "h/folder/", "size": 0}}})), Want::Skip("directory_marker")),
        ("unicode key", s3_event("uploads", &enc("h/ünïcödé 🚲.png")), Want::Predicted),
        ("+ and % in the key", s3_event("uploads", &enc("h/a+b c%d.png")), Want::Predicted),
        (".. in the key", s3_event("uploads", &enc("h/../../etc/passwd.png")), Want::Predicted),
    ];
    assert!(cases.len() >= 30);
    let mut want: BTreeMap<Want, usize> = BTreeMap::new();
    for (_, _, w) in &cases {
        *want.entry(w.clone()).or_default() += 1;
    }
    let payloads: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(name, p, _)| (name.to_string(), p.clone()))
        .collect();
    stack.produce(&payloads).await;
    let service = stack
        .service(&[
            ("FETCH__MAX_OBJECT_BYTES", "100000"),
            ("FILTER__ALLOWED_BUCKETS", "[\"uploads\"]"),
        ])
        .await;

    let dead_wanted: usize = want
        .iter()
        .filter(|(w, _)| matches!(w, Want::Dead(_)))
        .map(|(_, n)| n)
        .sum();
    let predicted_wanted = want.get(&Want::Predicted).copied().unwrap_or(0);
    let mut out = stack.collector();
    out.until("every bad input accounted for", MINUTE, |r| {
        r.iter().filter(|o| o.topic == DEAD).count() >= dead_wanted
            && predictions_by_id(r).len() >= predicted_wanted
    })
    .await;
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(500)).await;

    let mut got: BTreeMap<Want, usize> = BTreeMap::new();
    for o in out.on(DEAD) {
        let reason = o.value["reason"].as_str().unwrap().to_string();
        let reason: &'static str = Box::leak(reason.into_boxed_str());
        *got.entry(Want::Dead(reason)).or_default() += 1;
    }
    for w in want.keys() {
        if let Want::Skip(reason) = w {
            let n = service
                .metric(
                    "inferstream_records_skipped_total",
                    &[&format!("reason=\"{reason}\"")],
                )
                .await;
            got.insert(w.clone(), n as usize);
        }
    }
    got.insert(Want::Predicted, predictions_by_id(&out.records).len());
    assert_eq!(
        got,
        want,
        "outcomes by kind; records: {}",
        summary(&out.records)
    );

    // Still up, and memory bounded after the 900 kB and deeply nested ones.
    let (status, _) = http_get(&service.url("/healthz")).await.unwrap();
    assert_eq!(status, 200);
    let rss_kb = service.rss_kb();
    eprintln!(
        "hostile: {} kinds of input, service RSS {} MiB afterwards",
        cases.len(),
        rss_kb / 1024
    );
    assert!(rss_kb < 300 * 1024, "RSS {rss_kb} kB");
}
