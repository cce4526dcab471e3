//! The command line: check-config and endpoint, through the real binary.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image::ImageFormat;
use inferstream::tools::endpoint::model::{expected_confidence, test_image};

use crate::harness::{free_port, http_get};

fn inferstream(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(crate::harness::binary())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().copied())
        .output()
        .expect("run inferstream");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let (code, stdout, stderr) = inferstream(
        &["check-config"],
        &[
            (
                "INFERSTREAM__ALERTS__TOPIC_ARN",
                "arn:aws:sns:us-east-1:123456789012:alerts",
            ),
            (
                "INFERSTREAM__KAFKA__PROPERTIES__SASL_PASSWORD",
                "hunter2-very-secret",
            ),
            ("INFERSTREAM__ROUTE__THRESHOLD", "0.8"),
            // A token that looks like a number is still a string.
            ("INFERSTREAM__CONSOLE__TOKEN", "31415926"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("threshold = 0.8"), "{stdout}");
    assert!(stdout.contains("sasl.password"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "secret printed: {stdout}");
    assert!(stdout.contains("token = \"<redacted>\""), "{stdout}");
    assert!(!stdout.contains("31415926"), "token printed: {stdout}");
}

#[test]
fn check_config_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[route]\nthreshold = 1.5\n[batch]\nmax_images = 0\n").unwrap();
    let (code, _, stderr) = inferstream(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("INFERSTREAM__ALERTS__ENABLED", "false")],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("route.threshold"), "{stderr}");
    assert!(stderr.contains("batch.max_images"), "{stderr}");

    let (code, _, stderr) = inferstream(
        &["check-config"],
        &[("INFERSTREAM__FETCH__CONCURENCY", "3")],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("concurency"), "{stderr}");

    let (code, _, stderr) = inferstream(&["check-config"], &[]);
    assert_eq!(code, 2, "alerts without a topic must be refused");
    assert!(stderr.contains("alerts.topic_arn"), "{stderr}");
}

#[tokio::test]
async fn endpoint_command_serves_ping_and_invocations() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferstream"))
        .args(["endpoint", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start endpoint");
    let url = format!("http://127.0.0.1:{port}/ping");
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok((status, _)) = http_get(&url).await {
            break status;
        }
        assert!(Instant::now() < end, "endpoint did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200);

    // The AWS SDK, pointed at it, gets class probabilities for an image.
    let sdk = crate::harness::aws_config(&format!("http://127.0.0.1:{port}")).await;
    let client = aws_sdk_sagemakerruntime::Client::new(&sdk);
    let png = test_image(1, 0.9, 2, 16, ImageFormat::Png);
    let answer = client
        .invoke_endpoint()
        .endpoint_name("image-classifier")
        .content_type("application/x-image")
        .body(png.into())
        .send()
        .await;
    let _ = child.kill();
    let _ = child.wait();
    let answer = answer.expect("InvokeEndpoint");
    let probs: Vec<f64> = serde_json::from_slice(answer.body.expect("body").as_ref()).unwrap();
    assert_eq!(probs.len(), 2);
    assert!(
        (probs[1] - expected_confidence(0.9, 2)).abs() < 1e-9,
        "{probs:?}"
    );
}

#[test]
fn demo_classifies_every_image_and_writes_the_report() {
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("report");
    let (code, stdout, stderr) = inferstream(
        &[
            "demo",
            "--images",
            "60",
            "--threshold",
            "0.9",
            "--out",
            report.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let row = |name: &str| -> usize {
        stdout
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` row in:\n{stdout}"))
    };
    assert_eq!(row("images"), 60);
    assert_eq!(
        row("accepted") + row("review (alerts)") + row("dead letters"),
        60,
        "{stdout}"
    );
    assert!(
        row("accepted") > 0 && row("review (alerts)") > 0,
        "{stdout}"
    );
    assert!(stdout.contains("threshold 0.9"), "{stdout}");
    assert!(stdout.contains("/metrics"), "{stdout}");
    assert!(
        stdout.contains("console while it runs: http://127.0.0.1:")
            && stdout.contains("(token for Apply: "),
        "{stdout}"
    );
    for chart in [
        "confidence-over-time",
        "confidence-histogram",
        "decisions-by-label",
    ] {
        for ext in ["png", "svg"] {
            assert!(
                report.join(format!("{chart}.{ext}")).exists(),
                "{chart}.{ext}"
            );
        }
    }
}

/// Item 9 (issue #10): properties the delivery guarantee rests on cannot be
/// weakened through the librdkafka passthrough tables; the refusal names
/// the key.
#[test]
fn properties_the_guarantee_rests_on_are_refused_by_name() {
    let cases = [
        (
            "INFERSTREAM__KAFKA__PRODUCER_PROPERTIES__ACKS",
            "1",
            "kafka.producer_properties.\"acks\"",
        ),
        (
            "INFERSTREAM__KAFKA__PROPERTIES__ENABLE_IDEMPOTENCE",
            "false",
            "kafka.properties.\"enable.idempotence\"",
        ),
        (
            "INFERSTREAM__KAFKA__PRODUCER_PROPERTIES__MESSAGE_TIMEOUT_MS",
            "1000",
            "kafka.producer_properties.\"message.timeout.ms\"",
        ),
        (
            "INFERSTREAM__KAFKA__PRODUCER_PROPERTIES__DELIVERY_TIMEOUT_MS",
            "1000",
            "kafka.producer_properties.\"delivery.timeout.ms\"",
        ),
        (
            "INFERSTREAM__KAFKA__PRODUCER_PROPERTIES__REQUEST_REQUIRED_ACKS",
            "0",
            "kafka.producer_properties.\"request.required.acks\"",
        ),
        (
            "INFERSTREAM__KAFKA__CONSUMER_PROPERTIES__ENABLE_AUTO_COMMIT",
            "true",
            "kafka.consumer_properties.\"enable.auto.commit\"",
        ),
        (
            "INFERSTREAM__KAFKA__CONSUMER_PROPERTIES__GROUP_INSTANCE_ID",
            "x",
            "kafka.consumer_properties.\"group.instance.id\"",
        ),
    ];
    for (var, value, key) in cases {
        let (code, _, stderr) = inferstream(
            &["check-config"],
            &[("INFERSTREAM__ALERTS__ENABLED", "false"), (var, value)],
        );
        assert_eq!(code, 2, "{var}={value} was accepted");
        assert!(
            stderr.contains(key) && stderr.contains("managed by inferstream"),
            "{var}: {stderr}"
        );
    }
}

/// Item 10 (issue #10): limits that only fail together are checked
/// together, naming the key and the largest value that works.
#[test]
fn limits_that_cannot_work_together_are_refused_at_start() {
    let base = [("INFERSTREAM__ALERTS__ENABLED", "false")];
    let refused = |env: &[(&str, &str)], needles: &[&str]| {
        let mut all = base.to_vec();
        all.extend_from_slice(env);
        let (code, _, stderr) = inferstream(&["check-config"], &all);
        assert_eq!(code, 2, "{env:?} was accepted");
        for n in needles {
            assert!(stderr.contains(n), "{env:?}: no {n:?} in {stderr}");
        }
    };
    // A 5 MiB image base64-encoded alone is over SageMaker's 6 MiB.
    refused(
        &[
            ("INFERSTREAM__ENDPOINT__MODE", "batch"),
            ("INFERSTREAM__FETCH__MAX_OBJECT_BYTES", "5242880"),
        ],
        &["fetch.max_object_bytes", "4718544"],
    );
    // The circuit must open before an image runs out of attempts.
    refused(
        &[("INFERSTREAM__ENDPOINT__MAX_ATTEMPTS", "3")],
        &["endpoint.circuit_failures"],
    );
    // Every record of a message is in flight at once.
    refused(
        &[("INFERSTREAM__PIPELINE__MAX_IN_FLIGHT", "8")],
        &["pipeline.max_records_per_message", "pipeline.max_in_flight"],
    );
    // Dead letters must fit the producer's message size.
    refused(
        &[(
            "INFERSTREAM__KAFKA__PRODUCER_PROPERTIES__MESSAGE_MAX_BYTES",
            "200000",
        )],
        &["pipeline.dead_letter_payload_bytes", "message.max.bytes"],
    );
    // The defaults are valid in both request modes.
    for mode in ["per-image", "batch"] {
        let (code, _, stderr) = inferstream(
            &["check-config"],
            &[base[0], ("INFERSTREAM__ENDPOINT__MODE", mode)],
        );
        assert_eq!(code, 0, "{mode}: {stderr}");
    }
}
