//! Model monitoring end to end: a baseline made by `inferstream baseline`
//! from the service's own data capture, then drift of a live stream.

use std::time::Duration;

use inferstream::tools::endpoint::model::{test_image, FORMATS};
use inferstream::tools::endpoint::Faults;

use crate::harness::*;
use crate::pipeline::MINUTE;

/// Uploads `n` images whose top label scores `confidence(i)`, and returns
/// their events.
pub(crate) async fn upload(
    stack: &Stack,
    n: usize,
    prefix: &str,
    confidence: impl Fn(usize) -> f64,
) -> Vec<(String, Vec<u8>)> {
    let mut events = Vec::new();
    for i in 0..n {
        let (format, ext) = FORMATS[i % FORMATS.len()];
        let key = format!("{prefix}/img-{i}.{ext}");
        let body = test_image(i % 2, confidence(i), 2, 24, format);
        let size = body.len();
        let etag = stack.put_object("uploads", &key, body).await;
        events.push((
            format!("uploads/{key}"),
            event(Shape::S3, "uploads", &key, size, &etag),
        ));
    }
    events
}

/// Nine in ten images confident, one in ten at 0.70, as in the baseline.
fn usual(i: usize) -> f64 {
    if i % 10 == 3 {
        0.70
    } else {
        0.98
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_stays_low_on_a_stable_stream_and_rises_within_a_window_of_a_shift() {
    let stack = Stack::start(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let baseline = dir.path().join("baseline.json");

    // A week of normal traffic, compressed: 300 images captured.
    let events = upload(&stack, 300, "week", usual).await;
    stack.produce(&events).await;
    let capture = [
        ("CAPTURE__ENABLED", "true"),
        ("CAPTURE__DESTINATION", "s3://capture/week"),
        ("CAPTURE__FLUSH_INTERVAL", "10m"),
    ];
    let service = stack.service(&capture).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, 300, MINUTE).await;
    assert!(service.terminate(MINUTE).await.success());

    let stdout = stack.tool(&[
        "baseline",
        "--from",
        "s3://capture/week",
        "--out",
        baseline.to_str().unwrap(),
    ]);
    assert!(stdout.contains("baseline of 300 predictions"), "{stdout}");
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&baseline).unwrap()).unwrap();
    assert_eq!(b["schema"], "inferstream.baseline.v1");
    assert_eq!(b["review"], 30);
    assert_eq!(b["labels"]["bicycle"], 150);

    // The service against that baseline, with a 10 s window.
    let monitor = [
        ("MONITOR__BASELINE", baseline.to_str().unwrap()),
        ("MONITOR__WINDOW", "10s"),
        ("MONITOR__MIN_PREDICTIONS", "100"),
        ("CAPTURE__ENABLED", "true"),
        ("CAPTURE__DESTINATION", "s3://capture/live"),
        ("CAPTURE__FLUSH_INTERVAL", "10m"),
    ];
    let service = stack.service(&monitor).await;
    assert_eq!(
        service
            .metric("inferstream_baseline_review_share", &[])
            .await,
        0.1
    );
    // A stable stream: the same mix.
    let stable = upload(&stack, 300, "stable", usual).await;
    stack.produce(&stable).await;
    service
        .wait_metric("inferstream_drift_window_predictions", &[], MINUTE, |v| {
            v >= 300.0
        })
        .await;
    for m in [
        "inferstream_drift_confidence_psi",
        "inferstream_drift_label_psi",
        "inferstream_drift_image_size_psi",
        "inferstream_drift_image_type_psi",
    ] {
        let v = service.metric(m, &[]).await;
        assert!(v < 0.1, "{m} is {v} on a stable stream");
    }
    let stable_psi = service
        .metric("inferstream_drift_confidence_psi", &[])
        .await;

    // The model's confidence drops: every image at 0.55.
    let shifted = upload(&stack, 300, "shifted", |_| 0.55).await;
    stack.produce(&shifted).await;
    out.until("the shifted predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= 900
    })
    .await;
    // Within one window of the shifted images being classified.
    let psi = service
        .wait_metric(
            "inferstream_drift_confidence_psi",
            &[],
            Duration::from_secs(10),
            |v| v > 0.2,
        )
        .await;
    let share = service.metric("inferstream_review_share", &[]).await;
    assert!(share > 0.3, "review share {share}");
    eprintln!(
        "drift: confidence PSI {stable_psi:.4} on a stable stream, {psi:.2} after the shift; review share {share:.2} (baseline 0.10)"
    );

    // `report --baseline` draws drift over time from the live capture.
    assert!(service.terminate(MINUTE).await.success());
    let charts = dir.path().join("charts");
    stack.tool(&[
        "report",
        "--from",
        "s3://capture/live",
        "--baseline",
        baseline.to_str().unwrap(),
        "--out",
        charts.to_str().unwrap(),
    ]);
    assert_charts(&charts, &["drift-over-time"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn true_labels_give_accuracy_the_confusion_matrix_and_late_labels() {
    let stack = Stack::start(Faults::default()).await;
    stack
        .kafka
        .create_topic("ground-truth", PARTITIONS, 1)
        .expect("create topic");
    let (uploads, events) = crate::pipeline::upload_images(&stack, 1000, "truth").await;
    let service = stack
        .service(&[
            ("MONITOR__GROUND_TRUTH_TOPIC", "ground-truth"),
            ("MONITOR__GROUND_TRUTH_WINDOW", "20s"),
        ])
        .await;
    let end = std::time::Instant::now() + MINUTE;
    while !service
        .log_text()
        .contains("ground truth: reading true labels")
    {
        assert!(std::time::Instant::now() < end, "{}", service.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, 1000, 2 * MINUTE).await;
    let predicted: std::collections::HashMap<String, String> = predictions_by_id(&out.records)
        .into_iter()
        .map(|(id, r)| (id, r[0].value["label"].as_str().unwrap().to_string()))
        .collect();

    // True labels for 900 of them, one in ten saying the model was wrong;
    // the last 100 are held back to arrive late.
    let other = |l: &str| {
        if l == "bicycle" {
            "motorcycle"
        } else {
            "bicycle"
        }
    };
    let mut expected: std::collections::BTreeMap<(String, String), u64> = Default::default();
    let labels: Vec<(String, Vec<u8>)> = uploads[..900]
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let p = predicted[&u.id].clone();
            let actual = if i % 10 == 0 {
                other(&p).to_string()
            } else {
                p.clone()
            };
            *expected.entry((actual.clone(), p)).or_default() += 1;
            let rec = serde_json::json!({"id": u.id, "label": actual});
            (u.id.clone(), serde_json::to_vec(&rec).unwrap())
        })
        .collect();
    stack.produce_to("ground-truth", &labels).await;
    service
        .wait_metric(
            "inferstream_ground_truth_labels_total",
            &["outcome=\"matched\""],
            MINUTE,
            |v| v >= 900.0,
        )
        .await;
    let accuracy = service.metric("inferstream_accuracy", &[]).await;
    assert!((accuracy - 0.90).abs() <= 0.01, "accuracy {accuracy}");
    for ((actual, predicted), n) in &expected {
        let got = service
            .metric(
                "inferstream_confusion_total",
                &[
                    &format!("actual=\"{actual}\""),
                    &format!("predicted=\"{predicted}\""),
                ],
            )
            .await;
        assert_eq!(got, *n as f64, "confusion {actual} / {predicted}");
    }

    // Past the window, the other 100 labels are late, not judged.
    service
        .wait_metric("inferstream_ground_truth_waiting", &[], MINUTE, |v| {
            v == 0.0
        })
        .await;
    let late: Vec<(String, Vec<u8>)> = uploads[900..]
        .iter()
        .map(|u| {
            let rec = serde_json::json!({"id": u.id, "label": predicted[&u.id]});
            (u.id.clone(), serde_json::to_vec(&rec).unwrap())
        })
        .collect();
    stack.produce_to("ground-truth", &late).await;
    service
        .wait_metric(
            "inferstream_ground_truth_labels_total",
            &["outcome=\"late\""],
            MINUTE,
            |v| v >= 100.0,
        )
        .await;
    assert_eq!(
        service
            .metric("inferstream_judged_predictions_total", &[])
            .await,
        900.0
    );
    assert_eq!(service.metric("inferstream_accuracy", &[]).await, accuracy);
    // Reaching the end of a partition is not a failure (it was taken for
    // one, with a 200 ms pause after every catch-up).
    let log = service.log_all();
    assert!(
        !log.contains("ground truth: reading failed"),
        "{}",
        service.log_text()
    );
    eprintln!("ground truth: 1,000 predictions, 900 labels (10% wrong) -> accuracy {accuracy:.3}; 100 late labels counted as late");
}

#[tokio::test(flavor = "multi_thread")]
async fn model_monitor_ground_truth_objects_in_s3_are_joined_by_event_id() {
    use base64::Engine as _;
    let stack = Stack::start(Faults::default()).await;
    let n = 300;
    let (uploads, events) = crate::pipeline::upload_images(&stack, n, "gts3").await;
    let service = stack
        .service(&[
            ("MONITOR__GROUND_TRUTH_S3", "s3://capture/groundtruth"),
            ("MONITOR__GROUND_TRUTH_POLL", "1s"),
            ("CAPTURE__ENABLED", "true"),
            ("CAPTURE__DESTINATION", "s3://capture/judged"),
            ("CAPTURE__FLUSH_INTERVAL", "10m"),
        ])
        .await;
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, n, 2 * MINUTE).await;
    let predicted: std::collections::HashMap<String, String> = predictions_by_id(&out.records)
        .into_iter()
        .map(|(id, r)| (id, r[0].value["label"].as_str().unwrap().to_string()))
        .collect();

    // Model Monitor ground-truth lines, keyed by the capture's eventId, in
    // three hourly objects: the label's index as CSV, the label itself in
    // base64, and one line in five saying the model was wrong. Plus a line
    // that is not ground truth and one far too long.
    let labels = ["bicycle", "motorcycle"];
    let mut objects: Vec<Vec<u8>> = vec![Vec::new(); 3];
    let mut wrong = 0;
    for (i, u) in uploads.iter().enumerate() {
        let p = predicted[&u.id].as_str();
        let actual = if i % 5 == 0 {
            wrong += 1;
            if p == "bicycle" {
                "motorcycle"
            } else {
                "bicycle"
            }
        } else {
            p
        };
        let data = if i % 2 == 0 {
            serde_json::json!({"data": labels.iter().position(|l| *l == actual).unwrap().to_string(), "encoding": "CSV"})
        } else {
            serde_json::json!({"data": base64::engine::general_purpose::STANDARD.encode(actual), "encoding": "BASE64"})
        };
        let line = serde_json::json!({
            "groundTruthData": data,
            "eventMetadata": {"eventId": inferstream::record::event_id(&u.id)},
            "eventVersion": "0",
        });
        let o = &mut objects[i % 3];
        o.extend_from_slice(&serde_json::to_vec(&line).unwrap());
        o.push(b'\n');
    }
    objects[1].extend_from_slice(b"not ground truth\n");
    objects[2].extend_from_slice(&vec![b'x'; 100_000]);
    objects[2].push(b'\n');
    for (i, body) in objects.into_iter().enumerate() {
        let key = format!("groundtruth/2026/12/01/{:02}/labels-{i}.jsonl", 10 + i);
        stack.put_object("capture", &key, body).await;
    }
    service
        .wait_metric(
            "inferstream_ground_truth_labels_total",
            &["outcome=\"matched\""],
            MINUTE,
            |v| v >= n as f64,
        )
        .await;
    service
        .wait_metric(
            "inferstream_ground_truth_objects_total",
            &["outcome=\"read\""],
            MINUTE,
            |v| v >= 3.0,
        )
        .await;
    assert_eq!(
        service
            .metric(
                "inferstream_ground_truth_labels_total",
                &["outcome=\"bad\""]
            )
            .await,
        2.0
    );
    let accuracy = service.metric("inferstream_accuracy", &[]).await;
    let expected = (n - wrong) as f64 / n as f64;
    assert!(
        (accuracy - expected).abs() < 1e-9,
        "accuracy {accuracy}, expected {expected}"
    );
    // A later object is read by a later listing, which listed the first
    // three again without reading them: nothing is judged twice.
    stack
        .put_object(
            "capture",
            "groundtruth/2026/12/01/13/labels-3.jsonl",
            br#"{"id": "uploads/nobody@1", "label": "bicycle"}"#.to_vec(),
        )
        .await;
    service
        .wait_metric(
            "inferstream_ground_truth_objects_total",
            &["outcome=\"read\""],
            MINUTE,
            |v| v >= 4.0,
        )
        .await;
    assert_eq!(
        service
            .metric(
                "inferstream_ground_truth_labels_total",
                &["outcome=\"not_here\""]
            )
            .await,
        1.0
    );
    assert_eq!(
        service
            .metric(
                "inferstream_ground_truth_labels_total",
                &["outcome=\"again\""]
            )
            .await,
        0.0
    );
    assert_eq!(
        service
            .metric("inferstream_judged_predictions_total", &[])
            .await,
        n as f64
    );
    eprintln!("ground truth from S3: {n} predictions, 3 Model Monitor objects, {wrong} wrong -> accuracy {accuracy:.3}; 2 bad lines counted");

    // `report --ground-truth` joins the same labels to the capture.
    assert!(service.terminate(MINUTE).await.success());
    let dir = tempfile::tempdir().unwrap();
    let stdout = stack.tool(&[
        "report",
        "--from",
        "s3://capture/judged",
        "--ground-truth",
        "s3://capture/groundtruth",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        stdout.contains(&format!(
            "{n} of {n} predictions judged: accuracy {expected:.3}"
        )),
        "{stdout}"
    );
    assert_charts(dir.path(), &["accuracy-over-time", "threshold-curve"]);
}

/// A ground-truth read that stopped part-way goes on, against real S3
/// (moto), after its last whole line: a ranged GET, no line counted twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_ground_truth_read_resumes_after_its_last_whole_line() {
    use inferstream::pipeline::truth::GroundTruth;
    use inferstream::pipeline::truth_s3::{read_object, Listed};
    let moto = Moto::start().await;
    let s3 = s3_client(&aws_config(&moto.url).await);
    s3.create_bucket().bucket("truth").send().await.unwrap();
    let lines = [
        r#"{"id": "uploads/a@1", "label": "bicycle"}"#,
        r#"{"id": "uploads/b@1", "label": "bicycle"}"#,
        r#"{"id": "uploads/c@1", "label": "motorcycle"}"#,
    ];
    let body = format!("{}\n{}\n{}", lines[0], lines[1], lines[2]);
    let etag = s3
        .put_object()
        .bucket("truth")
        .key("t/labels.jsonl")
        .body(body.clone().into_bytes().into())
        .send()
        .await
        .unwrap()
        .e_tag
        .unwrap();
    let metrics = std::sync::Arc::new(inferstream::metrics::Metrics::new().unwrap());
    let labels = ["bicycle".to_string(), "motorcycle".to_string()];
    let truth = GroundTruth::new(Duration::from_secs(60), &labels, metrics.clone(), None);
    let o = Listed {
        key: "t/labels.jsonl".into(),
        modified_ms: 0,
        etag,
        size: body.len() as u64,
    };
    let counted = || {
        metrics
            .ground_truth_labels
            .with_label_values(&["not_here"])
            .get()
    };
    // As if the first line had been recorded before the read stopped.
    let after_first = lines[0].len() as u64 + 1;
    let end = read_object(
        &truth,
        &s3,
        "truth",
        &o,
        after_first,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(end, body.len() as u64);
    assert_eq!(counted(), 2, "the two lines after the first, once each");
    // Read to its end already: nothing asked, nothing counted.
    assert_eq!(
        read_object(&truth, &s3, "truth", &o, end, Duration::from_secs(10)).await,
        Ok(end)
    );
    assert_eq!(counted(), 2);
    // The same when the listing gave no size: S3 answers 416.
    let no_size = Listed {
        size: 0,
        ..o.clone()
    };
    assert_eq!(
        read_object(&truth, &s3, "truth", &no_size, end, Duration::from_secs(10)).await,
        Ok(end)
    );
    // Overwritten since it was listed: nothing read from the new version.
    let stale = Listed {
        etag: "\"0123456789abcdef0123456789abcdef\"".into(),
        ..o.clone()
    };
    let (error, at) = read_object(&truth, &s3, "truth", &stale, 0, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(at, 0);
    assert!(error.contains("PreconditionFailed"), "{error}");
    assert_eq!(counted(), 2);
    // An object that is not there fails where it started.
    let gone = Listed {
        key: "t/gone.jsonl".into(),
        ..o
    };
    let (error, at) = read_object(&truth, &s3, "truth", &gone, 5, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(at, 5);
    assert!(error.contains("NoSuchKey"), "{error}");
}
