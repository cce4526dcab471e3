//! The operator console's thresholds: changed with the token through one
//! instance, followed by every instance through the control topic.

use std::time::{Duration, Instant};

use inferstream::tools::endpoint::Faults;

use crate::harness::*;
use crate::monitor::upload;
use crate::pipeline::MINUTE;

const CONTROL: &str = "inferstream-control";

async fn thresholds(service: &ServiceProc, console: &str) -> serde_json::Value {
    let (status, body) = http_get(&format!("http://{console}/api/thresholds"))
        .await
        .unwrap_or_else(|e| panic!("console: {e}; log: {}", service.log_text()));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `service` logged a thresholds change to `threshold`.
async fn applied(service: &ServiceProc, threshold: f64) -> Duration {
    let start = Instant::now();
    let needle = format!("threshold={threshold}");
    while !service
        .log_all()
        .lines()
        .any(|l| l.contains("thresholds changed") && l.contains(&needle))
    {
        assert!(
            start.elapsed() < MINUTE,
            "no thresholds change to {threshold}; log: {}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_topic_that_does_not_exist_stops_the_start_with_its_name() {
    let stack = Stack::start(Faults::default()).await;
    let out = tokio::task::spawn_blocking({
        let env = stack.service_env(free_port());
        move || {
            std::process::Command::new(binary())
                .arg("run")
                .env_remove("RUST_LOG")
                .envs(env)
                .env("INFERSTREAM__CONSOLE__CONTROL_TOPIC", "no-such-topic")
                .output()
                .expect("run inferstream")
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("console.control_topic")
            && stderr.contains("`no-such-topic` does not exist"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_threshold_applied_with_the_token_reaches_every_instance() {
    let stack = Stack::start(Faults::default()).await;
    stack
        .kafka
        .create_topic(CONTROL, 1, 1)
        .expect("create topic");
    let console = format!("127.0.0.1:{}", free_port());
    let a = stack
        .service(&[
            ("CONSOLE__ENABLED", "true"),
            ("CONSOLE__LISTEN", &console),
            ("CONSOLE__TOKEN", "s3cret"),
            ("CONSOLE__CONTROL_TOPIC", CONTROL),
        ])
        .await;
    let b = stack.service(&[("CONSOLE__CONTROL_TOPIC", CONTROL)]).await;
    assert!(!b.log_all().contains("console on"));
    let before = thresholds(&a, &console).await;
    assert_eq!(before["current"]["threshold"], 0.93);
    assert_eq!(before["current"]["by"], "configuration");

    // Images at 0.70 go to review at 0.93.
    let first = upload(&stack, 40, "before", |_| 0.70).await;
    stack.produce(&first).await;
    let mut out = stack.collector();
    out.until("the first 40", MINUTE, |r| predictions_by_id(r).len() >= 40)
        .await;
    assert_eq!(out.on(REVIEW).len(), 40, "{}", summary(&out.records));

    // Without the token, or with a wrong one, nothing changes.
    let url = format!("http://{console}/api/thresholds");
    let change = r#"{"threshold": 0.5, "by": "ops on call"}"#;
    for headers in [vec![], vec![("Authorization", "Bearer wrong")]] {
        let (status, _) = http_request("POST", &url, &headers, change).await.unwrap();
        assert_eq!(status, 403);
    }
    // Nonsense with the token is refused and changes nothing either.
    let (status, body) = http_request(
        "POST",
        &url,
        &[("Authorization", "Bearer s3cret")],
        r#"{"threshold": 0.5, "label_thresholds": {"cat": 0.2}}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body.trim()),
        (400, "\"cat\" is not one of endpoint.labels")
    );
    assert_eq!(thresholds(&a, &console).await["current"]["threshold"], 0.93);

    // With the token: both instances route by 0.5.
    let (status, body) = http_request("POST", &url, &[("Authorization", "Bearer s3cret")], change)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (in_a, in_b) = futures::join!(applied(&a, 0.5), applied(&b, 0.5));
    eprintln!("console: threshold 0.93 -> 0.5 applied in {in_a:?} on the instance with the console, {in_b:?} on the other");
    let now = thresholds(&a, &console).await;
    assert_eq!(now["current"]["threshold"], 0.5);
    assert_eq!(now["current"]["by"], "ops on call");
    assert_eq!(now["history"].as_array().map(Vec::len), Some(1));

    let second = upload(&stack, 80, "after", |_| 0.70).await;
    stack.produce(&second).await;
    out.until("the next 80", MINUTE, |r| predictions_by_id(r).len() >= 120)
        .await;
    let after: Vec<&Out> = out
        .records
        .iter()
        .filter(|r| {
            r.value["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("after/"))
        })
        .collect();
    assert_eq!(after.len(), 80);
    assert!(
        after
            .iter()
            .all(|r| r.topic == RESULTS && r.value["threshold"] == 0.5),
        "{}",
        summary(&out.records)
    );
    // Both instances classified some of them, by the new threshold.
    for s in [&a, &b] {
        let accepted = s
            .metric("inferstream_predictions_total", &["decision=\"accepted\""])
            .await;
        assert!(accepted > 0.0, "log: {}", s.log_text());
    }

    // The live view and the curve: what this instance predicted.
    let (status, page) = http_get(&format!("http://{console}/")).await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<title>inferstream console</title>") && page.contains("/api/live"));
    let (_, live) = http_get(&format!("http://{console}/api/live"))
        .await
        .unwrap();
    let live: serde_json::Value = serde_json::from_str(&live).unwrap();
    let made_here = a.metric("inferstream_predictions_total", &[]).await;
    let s = &live["summary"];
    assert_eq!(s["predictions"].as_f64(), Some(made_here), "{live}");
    assert_eq!(
        s["accepted"].as_f64().unwrap() + s["review"].as_f64().unwrap(),
        made_here
    );
    let binned: u64 = ["histogram_accepted", "histogram_review"]
        .iter()
        .flat_map(|h| s[h].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()))
        .sum();
    assert_eq!(binned as f64, made_here);
    assert_eq!(live["thresholds"]["threshold"], 0.5);
    // Every image scored 0.70: thresholds up to 0.70 send none to review,
    // above it all of them.
    let (_, curve) = http_get(&format!("http://{console}/api/curve"))
        .await
        .unwrap();
    let curve: serde_json::Value = serde_json::from_str(&curve).unwrap();
    let share = |t: f64| {
        curve["curve"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| (p["threshold"].as_f64().unwrap() - t).abs() < 1e-9)
            .map(|p| p["review_share"].as_f64().unwrap())
            .unwrap()
    };
    assert_eq!((share(0.7), share(0.71)), (0.0, 1.0), "{curve}");
    assert_eq!(curve["threshold"], 0.5);
    let (status, _) = http_get(&format!("http://{console}/api/curve?label=cat"))
        .await
        .unwrap();
    assert_eq!(status, 404);

    // An instance started later reads the latest thresholds before it
    // consumes anything.
    let console_c = format!("127.0.0.1:{}", free_port());
    let c = stack
        .service(&[
            ("CONSOLE__ENABLED", "true"),
            ("CONSOLE__LISTEN", &console_c),
            ("CONSOLE__CONTROL_TOPIC", CONTROL),
        ])
        .await;
    assert_eq!(
        thresholds(&c, &console_c).await["current"]["threshold"],
        0.5
    );
    // It has no token: every change is refused.
    let (status, _) = http_request(
        "POST",
        &format!("http://{console_c}/api/thresholds"),
        &[("Authorization", "Bearer ")],
        change,
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reviewers_label_becomes_ground_truth_and_counts_in_accuracy() {
    let stack = Stack::start(Faults::default()).await;
    stack
        .kafka
        .create_topic(CONTROL, 1, 1)
        .expect("create topic");
    stack
        .kafka
        .create_topic("ground-truth", PARTITIONS, 1)
        .expect("create topic");
    let console = format!("127.0.0.1:{}", free_port());
    let service = stack
        .service(&[
            ("CONSOLE__ENABLED", "true"),
            ("CONSOLE__LISTEN", &console),
            ("CONSOLE__TOKEN", "s3cret"),
            ("CONSOLE__CONTROL_TOPIC", CONTROL),
            ("MONITOR__GROUND_TRUTH_TOPIC", "ground-truth"),
        ])
        .await;
    let end = Instant::now() + MINUTE;
    while !service
        .log_all()
        .contains("ground truth: reading true labels")
    {
        assert!(Instant::now() < end, "{}", service.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ten images the model is unsure of: all to review.
    let events = upload(&stack, 10, "unsure", |_| 0.6).await;
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.until("10 predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= 10
    })
    .await;

    let (status, body) = http_get(&format!("http://{console}/api/review"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let queue: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reviews = queue["reviews"].as_array().unwrap();
    assert_eq!(reviews.len(), 10, "{body}");
    assert_eq!(queue["ground_truth"], true);

    // The image of a queued prediction, as it is in S3; nothing else.
    let first = &reviews[0];
    let id = first["id"].as_str().unwrap();
    let image_url = |id: &str| {
        format!(
            "http://{console}/api/review/image?id={}",
            id.replace('%', "%25")
                .replace(' ', "%20")
                .replace('/', "%2F")
                .replace('@', "%40")
                .replace('"', "%22")
        )
    };
    let (status, bytes) = http_request_bytes("GET", &image_url(id), &[], "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let in_s3 = stack
        .s3
        .get_object()
        .bucket(first["bucket"].as_str().unwrap())
        .key(first["key"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(bytes, in_s3.to_vec());
    let (status, _) = http_get(&image_url("uploads/secret.png@1")).await.unwrap();
    assert_eq!(status, 404);

    // Labels: without the token refused; then one confirmed, one corrected.
    let label_url = format!("http://{console}/api/review/label");
    let predicted = |i: usize| reviews[i]["label"].as_str().unwrap().to_string();
    let other = |l: &str| {
        if l == "bicycle" {
            "motorcycle"
        } else {
            "bicycle"
        }
    };
    let answer = |i: usize, label: &str| {
        serde_json::json!({"id": reviews[i]["id"], "label": label, "by": "reviewer"}).to_string()
    };
    let (status, _) = http_request("POST", &label_url, &[], &answer(0, &predicted(0)))
        .await
        .unwrap();
    assert_eq!(status, 403);
    let auth = [("Authorization", "Bearer s3cret")];
    let (status, _) = http_request("POST", &label_url, &auth, &answer(0, "cat"))
        .await
        .unwrap();
    assert_eq!(status, 400);
    for (i, label) in [(0, predicted(0)), (1, other(&predicted(1)).to_string())] {
        let (status, body) = http_request("POST", &label_url, &auth, &answer(i, &label))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // A second answer would not count: refused.
    let (status, body) = http_request("POST", &label_url, &auth, &answer(0, other(&predicted(0))))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    service
        .wait_metric(
            "inferstream_judged_predictions_total",
            &["decision=\"review\""],
            MINUTE,
            |v| v >= 2.0,
        )
        .await;
    assert_eq!(
        service
            .metric(
                "inferstream_correct_predictions_total",
                &["decision=\"review\""]
            )
            .await,
        1.0
    );
    assert_eq!(service.metric("inferstream_accuracy", &[]).await, 0.5);
    let (_, body) = http_get(&format!("http://{console}/api/review"))
        .await
        .unwrap();
    let queue: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reviewed: Vec<&serde_json::Value> = queue["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["reviewed"].is_null())
        .collect();
    assert_eq!(reviewed.len(), 2, "{body}");
}
