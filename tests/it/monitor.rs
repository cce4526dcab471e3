//! Model monitoring end to end: a baseline made by `inferstream baseline`
//! from the service's own data capture, then drift of a live stream.

use std::process::Command;
use std::time::Duration;

use inferstream::tools::endpoint::model::{test_image, FORMATS};
use inferstream::tools::endpoint::Faults;

use crate::harness::*;
use crate::pipeline::MINUTE;

/// Uploads `n` images whose top label scores `confidence(i)`, and returns
/// their events.
async fn upload(
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

    let made = Command::new(binary())
        .args(["baseline", "--from", "s3://capture/week", "--out"])
        .arg(&baseline)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(stack.service_env(free_port()))
        .output()
        .expect("run baseline");
    let stdout = String::from_utf8_lossy(&made.stdout);
    assert!(
        made.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&made.stderr)
    );
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
    let report = Command::new(binary())
        .args(["report", "--from", "s3://capture/live", "--baseline"])
        .arg(&baseline)
        .arg("--out")
        .arg(&charts)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(stack.service_env(free_port()))
        .output()
        .expect("run report");
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    for ext in ["png", "svg"] {
        let f = charts.join(format!("drift-over-time.{ext}"));
        assert!(
            std::fs::metadata(&f)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "{}",
            f.display()
        );
    }
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
    eprintln!("ground truth: 1,000 predictions, 900 labels (10% wrong) -> accuracy {accuracy:.3}; 100 late labels counted as late");
}
