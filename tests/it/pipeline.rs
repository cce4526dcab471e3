//! The service end to end: events in, predictions, alerts and dead letters out.

use std::collections::BTreeMap;
use std::time::Duration;

use image::ImageFormat;
use inferstream::tools::endpoint::model::{expected_confidence, test_image, FORMATS};
use inferstream::tools::endpoint::Faults;
use serde_json::Value;

use crate::harness::*;

const LABELS: [&str; 2] = ["bicycle", "motorcycle"];
pub(crate) const MINUTE: Duration = Duration::from_secs(60);

/// An uploaded image and what the model should say about it.
pub(crate) struct Upload {
    pub(crate) key: String,
    pub(crate) id: String,
    label: usize,
    confidence: f64,
    /// JPEG is lossy: its confidence is only close.
    tolerance: f64,
}

impl Upload {
    fn decision(&self) -> &'static str {
        if self.confidence >= 0.93 {
            "accepted"
        } else {
            "review"
        }
    }
}

/// Uploads `n` images (every format, keys with spaces and `+`) and returns
/// them with one event each, in all four shapes in turn. Every tenth image
/// scores 0.70 (review), the others 0.98.
pub(crate) async fn upload_images(
    stack: &Stack,
    n: usize,
    prefix: &str,
) -> (Vec<Upload>, Vec<(String, Vec<u8>)>) {
    use futures::StreamExt as _;
    let puts = (0..n).map(|i| async move {
        let (format, ext) = FORMATS[i % FORMATS.len()];
        let label = i % 2;
        let confidence = if i % 10 == 3 { 0.70 } else { 0.98 };
        let key = format!("{prefix}/set {}/img+{i}.{ext}", i % 7);
        let body = test_image(label, confidence, 2, 24 + (i % 9) as u32, format);
        let size = body.len();
        let etag = stack.put_object("uploads", &key, body).await;
        let shape = SHAPES[i % SHAPES.len()];
        let event = (
            format!("uploads/{key}"),
            event(shape, "uploads", &key, size, &etag),
        );
        let upload = Upload {
            id: format!("uploads/{key}@{etag}"),
            key,
            label,
            confidence: expected_confidence(confidence, 2),
            tolerance: if format == ImageFormat::Jpeg {
                0.02
            } else {
                1e-6
            },
        };
        (upload, event)
    });
    let (uploads, events): (Vec<Upload>, Vec<_>) = futures::stream::iter(puts)
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .unzip();
    (uploads, events)
}

/// A stack whose endpoint answers in `latency`, with `n` images uploaded
/// and their events produced.
pub(crate) async fn slow_stack_with(
    latency: Duration,
    n: usize,
    prefix: &str,
) -> (Stack, Vec<Upload>) {
    let faults = Faults {
        latency,
        ..Faults::default()
    };
    let stack = Stack::start(faults).await;
    let (uploads, events) = upload_images(&stack, n, prefix).await;
    stack.produce(&events).await;
    (stack, uploads)
}

/// Images with no prediction, and predictions beyond the first per image.
pub(crate) fn tally<'a>(uploads: &'a [Upload], records: &[Out]) -> (Vec<&'a str>, usize) {
    let by_id = predictions_by_id(records);
    let missing = uploads
        .iter()
        .filter(|u| !by_id.contains_key(&u.id))
        .map(|u| u.id.as_str())
        .collect();
    let duplicates = by_id.values().map(|v| v.len() - 1).sum();
    (missing, duplicates)
}

/// Every upload has exactly one prediction, on the topic its confidence
/// calls for, with the right label, confidence and key.
fn assert_exactly_one_prediction_each(uploads: &[Upload], records: &[Out]) {
    let by_id = predictions_by_id(records);
    for u in uploads {
        let got = by_id.get(&u.id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            got.len(),
            1,
            "{}: {} predictions: {got:#?}",
            u.id,
            got.len()
        );
        let p = got[0];
        let want_topic = if u.decision() == "accepted" {
            RESULTS
        } else {
            REVIEW
        };
        assert_eq!(p.topic, want_topic, "{}", u.id);
        assert_eq!(p.key, format!("uploads/{}", u.key));
        let v = &p.value;
        assert_eq!(v["schema"], "inferstream.prediction.v1");
        assert_eq!(v["bucket"], "uploads");
        assert_eq!(v["key"], u.key.as_str());
        assert_eq!(v["label"], LABELS[u.label], "{}", u.id);
        assert_eq!(v["decision"], u.decision(), "{}", u.id);
        let conf = v["confidence"].as_f64().unwrap();
        assert!(
            (conf - u.confidence).abs() <= u.tolerance,
            "{}: confidence {conf}, want {}",
            u.id,
            u.confidence
        );
        let scores = v["scores"].as_object().unwrap();
        assert_eq!(scores.len(), 2);
        assert!((scores.values().map(|s| s.as_f64().unwrap()).sum::<f64>() - 1.0).abs() < 1e-6);
        assert_eq!(v["threshold"], 0.93);
        assert_eq!(v["endpoint"], "image-classifier");
        assert_eq!(v["source"]["topic"], INPUT);
        assert!(
            v["latency_ms"]["total"].as_f64().unwrap()
                >= v["latency_ms"]["infer"].as_f64().unwrap()
        );
    }
    assert_eq!(
        by_id.len(),
        uploads.len(),
        "predictions for images never uploaded"
    );
}

async fn happy_path(mode: &str, n: usize) {
    let stack = Stack::start(Faults::default()).await;
    let (uploads, events) = upload_images(&stack, n, mode).await;
    stack.produce(&events).await;
    // Data capture on, with a flush interval longer than the test: what
    // reaches S3 is written by size or by the flush at shutdown.
    let destination = format!("s3://capture/{mode}");
    // Model Monitor's format in per-image mode, inferstream's in batch mode.
    let format = if mode == "batch" {
        "inferstream"
    } else {
        "sagemaker"
    };
    // GetObject through the SDK in batch mode, the lean path in per-image
    // mode: both read every image.
    let lean = if mode == "batch" { "false" } else { "true" };
    let service = stack
        .service(&[
            ("ENDPOINT__MODE", mode),
            ("AWS__S3__LEAN_GET_OBJECT", lean),
            ("CAPTURE__FORMAT", format),
            ("CAPTURE__ENABLED", "true"),
            ("CAPTURE__DESTINATION", &destination),
            ("CAPTURE__CAPTURE_INPUT", "true"),
            ("CAPTURE__MAX_OBJECT_BYTES", "200000"),
            ("CAPTURE__FLUSH_INTERVAL", "10m"),
        ])
        .await;

    let mut out = stack.collector();
    out.all_predicted(&stack, n, MINUTE).await;
    assert!(
        out.on(DEAD).is_empty(),
        "dead letters: {}",
        summary(&out.records)
    );
    assert_exactly_one_prediction_each(&uploads, &out.records);

    let review = uploads.iter().filter(|u| u.decision() == "review").count();
    let alerts = stack.alerts(review, MINUTE).await;
    assert_eq!(alerts.len(), review);

    assert_eq!(
        service
            .metric("inferstream_events_consumed_total", &[])
            .await,
        n as f64
    );
    assert_eq!(
        service.metric("inferstream_predictions_total", &[]).await,
        n as f64
    );
    assert_eq!(
        service
            .metric("inferstream_predictions_total", &["decision=\"review\""])
            .await,
        review as f64
    );
    assert_eq!(
        service
            .metric("inferstream_alerts_published_total", &[])
            .await,
        review as f64
    );
    assert_eq!(
        service.metric("inferstream_in_flight_images", &[]).await,
        0.0
    );
    let ends: i64 = stack.input_ends().values().sum();
    assert_eq!(
        service.metric("inferstream_committed_offset", &[]).await,
        ends as f64,
        "the committed-offset gauges match what the group committed"
    );
    let requests = service
        .metric("inferstream_inference_requests_total", &[])
        .await;
    if mode == "batch" {
        assert!(
            requests < n as f64,
            "batch mode made {requests} calls for {n} images"
        );
    } else {
        assert_eq!(requests, n as f64);
    }
    let (status, _) = http_get(&service.url("/readyz")).await.unwrap();
    assert_eq!(status, 200, "/readyz while consuming");

    let status = service.terminate(MINUTE).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");

    // Every prediction was captured (100% sampling), none lost at shutdown,
    // in hour-partitioned objects, input and output included.
    let captured = stack.captured(mode).await;
    let prediction_field = if format == "sagemaker" {
        "inferstream"
    } else {
        "prediction"
    };
    let mut ids: Vec<&str> = captured
        .iter()
        .map(|(_, l)| l[prediction_field]["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "captured {} distinct of {n}", ids.len());
    assert_eq!(captured.len(), n);
    let objects: std::collections::BTreeSet<&str> =
        captured.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        objects.len() > 1,
        "max_object_bytes should have split the capture: {objects:?}"
    );
    for (key, line) in &captured {
        let parts: Vec<&str> = key.split('/').collect();
        assert!(key.ends_with(".jsonl"));
        assert_eq!(parts[0], mode);
        let hour = |t: &str| format!("{}/{}/{}/{}", &t[0..4], &t[5..7], &t[8..10], &t[11..13]);
        if format == "sagemaker" {
            // Model Monitor's layout and fields.
            assert_eq!(
                parts.len(),
                8,
                "{key}: <prefix>/<endpoint>/<variant>/yyyy/mm/dd/hh/name"
            );
            assert_eq!(parts[1], "image-classifier");
            let t = line["eventMetadata"]["inferenceTime"].as_str().unwrap();
            assert_eq!(parts[3..7].join("/"), hour(t));
            assert_eq!(line["eventVersion"], "0");
            let input = &line["captureData"]["endpointInput"];
            assert_eq!(
                (&input["mode"], &input["encoding"]),
                (&"INPUT".into(), &"BASE64".into())
            );
            assert!(input["observedContentType"]
                .as_str()
                .unwrap()
                .starts_with("image/"));
            let output = &line["captureData"]["endpointOutput"];
            assert_eq!(
                (&output["mode"], &output["encoding"]),
                (&"OUTPUT".into(), &"JSON".into())
            );
            let scores: Vec<f64> = serde_json::from_str(output["data"].as_str().unwrap()).unwrap();
            assert_eq!(scores.len(), 2);
            assert_eq!(line["eventMetadata"]["eventId"].as_str().unwrap().len(), 36);
        } else {
            assert_eq!(parts.len(), 6, "{key}: <prefix>/yyyy/mm/dd/hh/name");
            let t = line["captured_at"].as_str().unwrap();
            assert_eq!(parts[1..5].join("/"), hour(t));
            assert_eq!(line["schema"], "inferstream.capture.v1");
            assert_eq!(line["endpoint_input"]["encoding"], "BASE64");
            let scores: Vec<f64> =
                serde_json::from_str(line["endpoint_output"]["data"].as_str().unwrap()).unwrap();
            assert_eq!(scores.len(), 2);
        }
    }

    // `inferstream report` draws the charts from that capture.
    let charts = tempfile::tempdir().unwrap();
    let stdout = stack.tool(&[
        "report",
        "--from",
        &destination,
        "--out",
        charts.path().to_str().unwrap(),
    ]);
    assert!(
        stdout.contains(&format!("read {n} predictions")),
        "{stdout}"
    );
    assert_charts(
        charts.path(),
        &[
            "confidence-over-time",
            "confidence-histogram",
            "decisions-by-label",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_per_image_200_images_four_shapes() {
    happy_path("per-image", 200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_batch_mode() {
    happy_path("batch", 120).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn low_confidence_goes_to_review_and_to_sns() {
    let stack = Stack::start(Faults::default()).await;
    let mut events = Vec::new();
    let mut want = BTreeMap::new();
    for (i, conf) in [0.55, 0.61, 0.8, 0.92].into_iter().enumerate() {
        let key = format!("review/ü {i}.png");
        let etag = stack
            .put_object(
                "uploads",
                &key,
                test_image(i % 2, conf, 2, 16, ImageFormat::Png),
            )
            .await;
        events.push((key.clone(), event(Shape::S3, "uploads", &key, 0, &etag)));
        want.insert(key, (LABELS[i % 2], expected_confidence(conf, 2)));
    }
    stack.produce(&events).await;
    let _service = stack.service(&[]).await;

    let mut out = stack.collector();
    out.until("review records", MINUTE, |r| {
        r.iter().filter(|o| o.topic == REVIEW).count() >= want.len()
    })
    .await;
    for r in out.on(REVIEW) {
        let (label, conf) = want[r.value["key"].as_str().unwrap()];
        assert_eq!(r.value["label"], label);
        assert_eq!(r.value["decision"], "review");
        assert!((r.value["confidence"].as_f64().unwrap() - conf).abs() < 1e-6);
    }

    let alerts = stack.alerts(want.len(), MINUTE).await;
    let mut seen = Vec::new();
    for a in &alerts {
        assert_eq!(a["Type"], "Notification");
        assert_eq!(a["TopicArn"], stack.topic_arn.as_str());
        let subject = a["Subject"].as_str().unwrap();
        assert!(subject.starts_with("Low confidence: "), "{subject}");
        assert!(
            subject.len() < 100 && subject.is_ascii() && !subject.contains('\n'),
            "{subject}"
        );
        let message = a["Message"].as_str().unwrap();
        let json_at = message
            .find("{\n")
            .expect("the prediction JSON follows the text");
        let record: Value =
            serde_json::from_str(&message[json_at..]).expect("prediction JSON in the alert");
        let key = record["key"].as_str().unwrap().to_string();
        let (label, _) = want[&key];
        assert!(
            message.contains(&format!("s3://uploads/{key}")),
            "{message}"
        );
        let attrs = &a["MessageAttributes"];
        assert_eq!(attrs["label"]["Value"], label);
        assert_eq!(attrs["decision"]["Value"], "review");
        let c: f64 = attrs["confidence"]["Value"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(c < 0.93);
        seen.push(key);
    }
    seen.sort();
    assert_eq!(
        seen,
        want.keys().cloned().collect::<Vec<_>>(),
        "one alert per review image"
    );
    assert!(out.on(RESULTS).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_input_is_dead_lettered_and_the_service_keeps_going() {
    let stack = Stack::start(Faults::default()).await;
    let good = test_image(0, 0.99, 2, 16, ImageFormat::Png);
    let big: Vec<u8> = good
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0u8, 60_000))
        .collect();
    let big_etag = stack.put_object("uploads", "poison/huge.png", big).await;
    let text_etag = stack
        .put_object(
            "uploads",
            "poison/notes.png",
            b"just some text, not a picture".to_vec(),
        )
        .await;
    let other_etag = stack
        .put_object("elsewhere", "poison/ok.png", good.clone())
        .await;
    let good_etag = stack
        .put_object("uploads", "after/good.png", good.clone())
        .await;

    let malformed = b"{\"Records\": [{\"eventVersion\": \"2.1\", ".to_vec();
    let test_event = br#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-24T10:00:00.000Z","Bucket":"uploads","RequestId":"5582815E1AEA5ADF","HostId":"8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"}"#.to_vec();
    let events = vec![
        ("a".to_string(), malformed.clone()),
        (
            "b".to_string(),
            event(Shape::S3, "uploads", "poison/missing.png", 10, "0123"),
        ),
        (
            "c".to_string(),
            event(Shape::S3, "uploads", "poison/huge.png", 60_000, &big_etag),
        ),
        (
            "d".to_string(),
            event(
                Shape::EventBridge,
                "uploads",
                "poison/notes.png",
                29,
                &text_etag,
            ),
        ),
        (
            "e".to_string(),
            event(
                Shape::Sns,
                "elsewhere",
                "poison/ok.png",
                good.len(),
                &other_etag,
            ),
        ),
        ("f".to_string(), test_event),
        (
            "g".to_string(),
            event(
                Shape::Minio,
                "uploads",
                "after/good.png",
                good.len(),
                &good_etag,
            ),
        ),
    ];
    stack.produce(&events).await;
    let service = stack
        .service(&[
            ("FETCH__MAX_OBJECT_BYTES", "50000"),
            ("FILTER__ALLOWED_BUCKETS", "[\"uploads\"]"),
            // A secret in the Kafka passthrough, and logs at info level,
            // to check that neither secrets nor message bodies are logged.
            ("KAFKA__PROPERTIES__SSL_KEY_PASSWORD", "hunter2-do-not-log"),
            ("LOG__LEVEL", "info"),
        ])
        .await;

    let mut out = stack.collector();
    out.until("five dead letters and the good prediction", MINUTE, |r| {
        r.iter().filter(|o| o.topic == DEAD).count() >= 5 && r.iter().any(|o| o.topic == RESULTS)
    })
    .await;
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(500)).await;

    let dead: BTreeMap<String, &Value> = out
        .on(DEAD)
        .iter()
        .map(|o| (o.value["reason"].as_str().unwrap().to_string(), &o.value))
        .collect();
    assert_eq!(
        out.on(DEAD).len(),
        5,
        "one dead letter each: {}",
        summary(&out.records)
    );
    let expect = [
        ("malformed_event", None),
        ("object_not_found", Some(("uploads", "poison/missing.png"))),
        ("object_too_large", Some(("uploads", "poison/huge.png"))),
        ("not_an_image", Some(("uploads", "poison/notes.png"))),
        ("bucket_not_allowed", Some(("elsewhere", "poison/ok.png"))),
    ];
    for (reason, object) in expect {
        let d = dead
            .get(reason)
            .unwrap_or_else(|| panic!("no `{reason}` dead letter: {dead:#?}"));
        assert_eq!(d["schema"], "inferstream.deadletter.v1");
        assert!(!d["detail"].as_str().unwrap().is_empty());
        assert_eq!(d["source"]["topic"], INPUT);
        if let Some((bucket, key)) = object {
            assert_eq!(d["bucket"], bucket, "{reason}");
            assert_eq!(d["key"], key, "{reason}");
        }
        assert_eq!(
            service
                .metric(
                    "inferstream_dead_letters_total",
                    &[&format!("reason=\"{reason}\"")]
                )
                .await,
            1.0,
            "{reason}"
        );
    }
    // The original message travels with its dead letter.
    assert_eq!(
        dead["malformed_event"]["payload"],
        String::from_utf8(malformed).unwrap()
    );
    assert_eq!(
        service
            .metric(
                "inferstream_records_skipped_total",
                &["reason=\"test_event\""]
            )
            .await,
        1.0
    );
    let results = out.on(RESULTS);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].value["key"], "after/good.png");

    let log = std::fs::read_to_string(&service.log).unwrap();
    assert!(log.contains("event rejected"), "the rejections are logged");
    assert!(!log.contains("hunter2"), "a secret reached the log");
    assert!(
        !log.contains("\"eventVersion\": \"2.1\""),
        "a message body reached the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_mode_isolates_the_image_the_model_rejects() {
    let stack = Stack::start(Faults::default()).await;
    let mut events = Vec::new();
    for i in 0..15 {
        let key = format!("mixed/{i}.png");
        let etag = stack
            .put_object(
                "uploads",
                &key,
                test_image(1, 0.99, 2, 16, ImageFormat::Png),
            )
            .await;
        events.push((key.clone(), event(Shape::S3, "uploads", &key, 0, &etag)));
    }
    // A PNG signature with a body the model cannot decode: 424 ModelError.
    let mut broken = test_image(0, 0.99, 2, 64, ImageFormat::Png);
    broken.truncate(broken.len() / 2);
    let etag = stack
        .put_object("uploads", "mixed/broken.png", broken)
        .await;
    events.insert(
        7,
        (
            "broken".into(),
            event(Shape::S3, "uploads", "mixed/broken.png", 0, &etag),
        ),
    );
    stack.produce(&events).await;
    let service = stack
        .service(&[
            ("ENDPOINT__MODE", "batch"),
            // The 16 images make one batch (batch.max_images) however
            // slowly moto answers some of them: the broken one is never
            // alone in a batch of its own.
            ("BATCH__MAX_WAIT", "10s"),
            ("ENDPOINT__CONCURRENCY", "1"),
        ])
        .await;

    let mut out = stack.collector();
    out.until("15 predictions and a dead letter", MINUTE, |r| {
        r.iter().filter(|o| o.topic == RESULTS).count() >= 15 && r.iter().any(|o| o.topic == DEAD)
    })
    .await;
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(300)).await;
    let dead = out.on(DEAD);
    assert_eq!(dead.len(), 1, "{}", summary(&out.records));
    assert_eq!(dead[0].value["reason"], "endpoint_rejected");
    assert_eq!(dead[0].value["key"], "mixed/broken.png");
    assert_eq!(out.on(RESULTS).len(), 15);
    assert!(service.metric("inferstream_batch_splits_total", &[]).await >= 1.0);
    assert!(
        stack
            .endpoint
            .stats
            .model_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

/// Uploads `n` images, starts the service in `mode` with `extra`, and waits
/// until each image has exactly one prediction and none was dead-lettered.
async fn classify_all(stack: &Stack, n: usize, mode: &str, extra: &[(&str, &str)]) -> ServiceProc {
    let (uploads, events) = upload_images(stack, n, mode).await;
    stack.produce(&events).await;
    let mut settings = vec![("ENDPOINT__MODE", mode)];
    settings.extend_from_slice(extra);
    let service = stack.service(&settings).await;
    let mut out = stack.collector();
    out.all_predicted(stack, uploads.len(), MINUTE).await;
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
    assert_exactly_one_prediction_each(&uploads, &out.records);
    service
}

/// An endpoint with two workers that throttles every call beyond them, and
/// images with five attempts each (the fewest the circuit allows):
/// adaptive concurrency finds the endpoint's capacity, and throttling costs
/// no image.
#[tokio::test(flavor = "multi_thread")]
async fn adaptive_concurrency_learns_an_endpoint_that_throttles_beyond_two_workers() {
    let faults = Faults {
        latency: Duration::from_millis(50),
        ..Faults::default()
    };
    let stack = Stack::start_with_workers(faults, 2, Some(0)).await;
    let service = classify_all(
        &stack,
        300,
        "per-image",
        &[
            ("ENDPOINT__CONCURRENCY", "adaptive"),
            ("ENDPOINT__MAX_CONCURRENCY", "32"),
            ("ENDPOINT__MAX_ATTEMPTS", "5"),
        ],
    )
    .await;

    use std::sync::atomic::Ordering::Relaxed;
    let stats = &stack.endpoint.stats;
    let (calls, throttled) = (stats.requests.load(Relaxed), stats.throttled.load(Relaxed));
    // It went past the capacity to find it, and seldom again.
    assert!(throttled > 0, "never throttled: the limit never passed 2");
    assert!(
        throttled * 10 < calls,
        "{throttled} of {calls} calls throttled"
    );
    let limit = service
        .metric("inferstream_endpoint_concurrency_limit", &[])
        .await;
    assert!((1.0..=3.0).contains(&limit), "limit {limit}");
    assert!(
        service
            .metric("inferstream_endpoint_rtt_seconds", &[])
            .await
            >= 0.05
    );
}

async fn faulty_endpoint(mode: &str) {
    // 15% 500s, 15% throttling, and 5% of calls slower than the timeout.
    let faults = Faults {
        failure_rate: 0.15,
        throttle_rate: 0.15,
        slow_rate: 0.05,
        slow_for: Duration::from_secs(3),
        seed: 7,
        ..Faults::default()
    };
    let stack = Stack::start(faults).await;
    let service = classify_all(
        &stack,
        80,
        mode,
        &[
            ("ENDPOINT__MAX_ATTEMPTS", "12"),
            ("ENDPOINT__TIMEOUT", "1s"),
            ("BATCH__MAX_IMAGES", "4"),
        ],
    )
    .await;

    use std::sync::atomic::Ordering::Relaxed;
    let stats = &stack.endpoint.stats;
    assert!(stats.failed.load(Relaxed) > 0, "no 500 was injected");
    assert!(
        stats.throttled.load(Relaxed) > 0,
        "no throttling was injected"
    );
    let kind = |k: &str| format!("kind=\"{k}\"");
    let metric = |k: String| {
        let service = &service;
        async move {
            service
                .metric("inferstream_inference_errors_total", &[&k])
                .await as u64
        }
    };
    // Every slow call ran into endpoint.timeout and was retried.
    let slow = stats.slow.load(Relaxed);
    assert!(slow > 0, "no slow call was injected");
    assert_eq!(metric(kind("timeout")).await, slow);
    // 500s and throttling seen by the service are those the endpoint sent
    // (a slow call's answer may never have been sent: it timed out first).
    let seen = metric(kind("server_error")).await + metric(kind("throttled")).await;
    let sent = stats.failed.load(Relaxed) + stats.throttled.load(Relaxed);
    assert!(
        seen <= sent && seen + slow >= sent,
        "seen {seen}, sent {sent}, slow {slow}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_errors_and_slow_calls_are_retried_per_image() {
    faulty_endpoint("per-image").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_errors_and_slow_calls_are_retried_in_batch_mode() {
    faulty_endpoint("batch").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_loses_nothing() {
    let n = 300;
    let (stack, uploads) = slow_stack_with(Duration::from_millis(40), n, "restart").await;
    let slow = [
        ("ENDPOINT__CONCURRENCY", "2"),
        ("PIPELINE__MAX_IN_FLIGHT", "64"),
    ];
    let mut first = stack.service(&slow).await;

    let mut out = stack.collector();
    out.until("a quarter of the predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= n / 4
    })
    .await;
    first.kill();
    let before = predictions_by_id(&out.records).len();
    assert!(before < n, "the service finished before it was killed");

    let _second = stack.service(&[]).await;
    out.all_predicted(&stack, n, 2 * MINUTE).await;

    let (missing, duplicates) = tally(&uploads, &out.records);
    assert!(missing.is_empty(), "no prediction for {missing:?}");
    eprintln!(
        "restart: {before} predictions before SIGKILL, {duplicates} duplicates after restart"
    );
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_outage_pauses_consumption_probes_and_loses_nothing() {
    // The outage starts with the endpoint and outlasts the set-up below
    // (15 s; `make soak` runs 30 s).
    let outage: u64 = std::env::var("OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let faults = Faults {
        outage_after: Some(Duration::ZERO),
        outage_for: Duration::from_secs(outage),
        ..Faults::default()
    };
    let stack = Stack::start(faults).await;
    let (uploads, events) = upload_images(&stack, 120, "outage").await;
    stack.produce(&events).await;
    let service = stack
        .service(&[
            ("PIPELINE__MAX_IN_FLIGHT", "32"),
            // Without the breaker, 3 attempts would dead-letter everything.
            ("ENDPOINT__MAX_ATTEMPTS", "3"),
            ("ENDPOINT__CIRCUIT_FAILURES", "3"),
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "500ms"),
            ("ENDPOINT__CIRCUIT_OPEN_MAX", "2s"),
        ])
        .await;

    let end = std::time::Instant::now() + MINUTE;
    while service
        .metric("inferstream_endpoint_circuit_open", &[])
        .await
        != 1.0
    {
        assert!(
            std::time::Instant::now() < end,
            "the circuit never opened; log: {}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = http_get(&service.url("/readyz")).await.unwrap();
    assert_eq!(status, 503, "not ready while the endpoint is down");
    // Consumption pauses at the in-flight bound (one more message may be
    // waiting for a permit).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let consumed = service
        .metric("inferstream_events_consumed_total", &[])
        .await;
    assert!(
        consumed <= 33.0,
        "consumed {consumed} with 32 allowed in flight"
    );
    assert!(service.metric("inferstream_in_flight_images", &[]).await <= 32.0);
    // Memory stays flat while it waits.
    let rss_before = service.rss_kb();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = service.rss_kb();
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} kB to {rss_after} kB during the outage"
    );
    assert_eq!(
        service
            .metric("inferstream_endpoint_circuit_open", &[])
            .await,
        1.0,
        "still down"
    );
    // The lag grows where it can be seen (librdkafka statistics, every 5 s).
    let end = std::time::Instant::now() + Duration::from_secs(outage);
    while service.metric("inferstream_consumer_lag", &[]).await <= 0.0 {
        assert!(
            std::time::Instant::now() < end,
            "no consumer lag reported during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lag = service.metric("inferstream_consumer_lag", &[]).await;
    eprintln!("outage: consumer lag {lag} while the circuit was open");

    let mut out = stack.collector();
    out.all_predicted(&stack, uploads.len(), 2 * MINUTE).await;
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
    assert_exactly_one_prediction_each(&uploads, &out.records);
    assert_eq!(
        service
            .metric("inferstream_endpoint_circuit_open", &[])
            .await,
        0.0
    );

    // Probed, not hammered: 120 images x 3 attempts would be 360 calls.
    let refused = stack
        .endpoint
        .stats
        .unavailable
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("outage: {refused} calls refused while the endpoint was down");
    assert!(
        refused > 0 && refused < 60,
        "{refused} calls during the outage"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_drains_commits_and_a_clean_restart_duplicates_nothing() {
    let n = 240;
    let (stack, uploads) = slow_stack_with(Duration::from_millis(30), n, "graceful").await;
    let slow = [
        ("ENDPOINT__CONCURRENCY", "2"),
        ("PIPELINE__SHUTDOWN_TIMEOUT", "20s"),
    ];
    let first = stack.service(&slow).await;

    let mut out = stack.collector();
    out.until("some predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= 40
    })
    .await;
    let started = std::time::Instant::now();
    let status = first.terminate(MINUTE).await;
    let took = started.elapsed();
    assert!(
        status.success(),
        "exit status after SIGTERM under load: {status}"
    );
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}, past pipeline.shutdown_timeout"
    );
    let before = predictions_by_id(&out.records).len();

    let _second = stack.service(&slow).await;
    out.all_predicted(&stack, n, 2 * MINUTE).await;
    eprintln!("graceful: SIGTERM after {before} predictions, exited in {took:?}");
    // Everything completed before the exit was committed: nothing twice.
    assert_exactly_one_prediction_each(&uploads, &out.records);
}

/// One low-confidence image through a service started with `env`: its
/// review record and its single dead letter, which must be `alert_failed`.
pub(crate) async fn failed_alert(
    stack: &Stack,
    key: &str,
    env: &[(&str, &str)],
) -> (ServiceProc, Value) {
    let etag = stack
        .put_object("uploads", key, test_image(1, 0.6, 2, 16, ImageFormat::Png))
        .await;
    stack
        .produce(&[(key.to_string(), event(Shape::S3, "uploads", key, 0, &etag))])
        .await;
    let service = stack.service(env).await;
    let mut out = stack.collector();
    out.until(
        "the review record and the alert_failed dead letter",
        MINUTE,
        |r| r.iter().any(|o| o.topic == REVIEW) && r.iter().any(|o| o.topic == DEAD),
    )
    .await;
    stack.wait_committed_to_end(MINUTE).await;
    assert_eq!(out.on(REVIEW).len(), 1, "the review record is never lost");
    let dead = out.on(DEAD);
    assert_eq!(dead.len(), 1);
    let d = dead[0].value.clone();
    assert_eq!(d["reason"], "alert_failed");
    assert_eq!(d["key"], key);
    // The payload is the prediction whose alert failed.
    let p: Value = serde_json::from_str(d["payload"].as_str().unwrap()).unwrap();
    assert_eq!(p["decision"], "review");
    assert_eq!(
        service.metric("inferstream_alerts_failed_total", &[]).await,
        1.0
    );
    (service, d)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alert_that_cannot_be_published_is_dead_lettered_and_the_review_record_kept() {
    let stack = Stack::start(Faults::default()).await;
    let missing_topic = "arn:aws:sns:us-east-1:123456789012:no-such-topic";
    let env = [
        ("ALERTS__TOPIC_ARN", missing_topic),
        ("ALERTS__MAX_ATTEMPTS", "2"),
    ];
    let (_service, d) = failed_alert(&stack, "alerts/unsent.png", &env).await;
    assert!(d["detail"].as_str().unwrap().contains(missing_topic), "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sns_outage_is_retried_with_backoff_then_dead_lettered_and_recovers() {
    let stack = Stack::start(Faults::default()).await;
    // SNS is reached through a proxy that answers 503 to every request.
    let proxy = FaultProxy::start(&stack.moto.url, 1.0, 0.0, 3).await;
    let env = [
        ("AWS__SNS__ENDPOINT_URL", proxy.url.as_str()),
        ("ALERTS__MAX_ATTEMPTS", "4"),
    ];
    let (_service, d) = failed_alert(&stack, "alerts/outage.png", &env).await;
    assert!(d["detail"].as_str().unwrap().contains("503"), "{d}");
    // Every attempt was made, each on a fresh connection.
    assert_eq!(proxy.slowed.load(std::sync::atomic::Ordering::Relaxed), 4);
}
