//! Property tests of the decoder ("fuzzing" with proptest; cargo-fuzz needs
//! a nightly toolchain this project does not use). Seeds are the sample
//! events in `tests/fixtures/events/`; proptest keeps any failing input in
//! `proptest-regressions/` so that it is replayed on every run.
//!
//! The properties: decoding never panics, every message has at least one
//! outcome (nothing vanishes), and every image has a bucket and a key.
//! `PROPTEST_CASES=100000 cargo test --lib decode::fuzz` runs a longer
//! budget (docs/RELIABILITY.md).

use proptest::prelude::*;
use serde_json::Value;

use super::*;

fn seeds() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/events");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    assert!(out.len() >= 5, "fixtures missing in {dir}");
    out
}

fn open() -> FilterConfig {
    FilterConfig {
        allowed_buckets: vec!["uploads".into()],
        key_prefixes: vec![],
        key_suffixes: vec![],
    }
}

fn check(payload: &[u8]) {
    let out = decode(Some(payload), &open());
    assert!(
        !out.is_empty(),
        "a message vanished: {:?}",
        String::from_utf8_lossy(payload)
    );
    for o in &out {
        if let Outcome::Image(img) = o {
            assert!(!img.bucket.is_empty() && !img.key.is_empty(), "{img:?}");
        }
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| Edit::Delete(i, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len().max(1);
        match e {
            Edit::Flip(i, b) => {
                if !bytes.is_empty() {
                    let i = i % len;
                    bytes[i] ^= b;
                }
            }
            Edit::Truncate(i) => bytes.truncate(i % len),
            Edit::Insert(i, b) => {
                let i = i % len.min(bytes.len() + 1).max(1);
                let at = i.min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
            Edit::Delete(i, n) => {
                let at = (i % len).min(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
        }
    }
    bytes
}

/// JSON values of any shape, a few levels deep, with the field names the
/// decoder looks for among the keys.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("Records".to_string()),
        Just("eventVersion".to_string()),
        Just("eventName".to_string()),
        Just("s3".to_string()),
        Just("bucket".to_string()),
        Just("object".to_string()),
        Just("name".to_string()),
        Just("key".to_string()),
        Just("size".to_string()),
        Just("Type".to_string()),
        Just("Message".to_string()),
        Just("detail-type".to_string()),
        Just("detail".to_string()),
        Just("source".to_string()),
        Just("Event".to_string()),
        "[a-zA-Z]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("2.1".to_string()),
            Just("ObjectCreated:Put".to_string()),
            Just("Notification".to_string()),
            Just("Object Created".to_string()),
            Just("aws.s3".to_string()),
            Just("uploads".to_string()),
            ".{0,12}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&bytes);
    }

    #[test]
    fn mutated_sample_events(seed in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..8)) {
        let seeds = seeds();
        let base = seeds[seed.index(seeds.len())].clone();
        check(&apply(base, &edits));
    }

    #[test]
    fn arbitrary_json(v in json()) {
        check(v.to_string().as_bytes());
        // The same value as an SNS envelope's Message, and as a record.
        let sns = serde_json::json!({"Type": "Notification", "Message": v.to_string()});
        check(sns.to_string().as_bytes());
        let rec = serde_json::json!({"Records": [v]});
        check(rec.to_string().as_bytes());
    }
}
