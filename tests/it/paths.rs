//! Failure paths (docs/RELIABILITY.md "Failure paths", issue #10): each
//! test walks one way the at-least-once promise could break, through the
//! real binary, and counts every image afterwards.

use std::time::Duration;

use image::ImageFormat;
use inferstream::tools::endpoint::model::{crash_image, test_image};
use inferstream::tools::endpoint::{Failure, Faults};
use serde_json::Value;

use crate::harness::*;
use crate::pipeline::{tally, upload_images, MINUTE};

/// Item 1: with the endpoint down and images waiting, a SIGTERM whose
/// drain deadline passes must not commit past them.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_past_its_deadline_with_the_endpoint_down_loses_nothing() {
    let stack = Stack::start(Faults::default()).await;
    stack.endpoint.control.fail_with(Some(Failure::Unavailable));
    let n = 60;
    let (uploads, events) = upload_images(&stack, n, "deadline").await;
    stack.produce(&events).await;
    let service = stack
        .service(&[
            ("PIPELINE__SHUTDOWN_TIMEOUT", "2s"),
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "500ms"),
        ])
        .await;
    service
        .wait_metric("inferstream_endpoint_circuit_open", &[], MINUTE, |v| {
            v == 1.0
        })
        .await;
    service
        .wait_metric("inferstream_in_flight_images", &[], MINUTE, |v| {
            v >= n as f64
        })
        .await;
    let status = service.terminate(MINUTE).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");

    // The endpoint comes back; a new instance classifies every image.
    stack.endpoint.control.fail_with(None);
    let _again = stack.service(&[]).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, n, MINUTE).await;
    let (missing, duplicates) = tally(&uploads, &out.records);
    eprintln!("deadline: lost {}, duplicates {duplicates}", missing.len());
    assert!(missing.is_empty(), "never predicted: {missing:?}");
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
}

/// Item 2: hostile messages whose dead-letter records would not fit in a
/// Kafka message must still be dead-lettered, and never stop the service.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_always_fit_and_one_message_never_stops_the_group() {
    let stack = Stack::start(Faults::default()).await;
    let n = 20;
    let (uploads, events) = upload_images(&stack, n, "fit").await;
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        // Valid UTF-8 that JSON escapes six-fold (\u0001).
        ("control characters", vec![1u8; 200_000]),
        // Not UTF-8: base64 grows it by a third.
        ("binary", vec![0xffu8; 750_000]),
        // Just under the decoder's 1 MiB cap.
        ("near the cap", vec![b'a'; 1024 * 1024 - 100]),
    ];
    let mut messages: Vec<(String, Vec<u8>)> = events[..n / 2].to_vec();
    messages.extend(hostile.iter().map(|(k, p)| (k.to_string(), p.clone())));
    messages.extend(events[n / 2..].to_vec());
    stack.produce(&messages).await;
    let mut service = stack.service(&[]).await;

    let mut out = stack.collector();
    out.until("every image and three dead letters", MINUTE, |r| {
        predictions_by_id(r).len() >= n && r.iter().filter(|o| o.topic == DEAD).count() >= 3
    })
    .await;
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(500)).await;
    assert!(
        service.running(),
        "the service stopped: {}",
        service.log_text()
    );
    let (missing, duplicates) = tally(&uploads, &out.records);
    assert!(missing.is_empty(), "never predicted: {missing:?}");
    assert_eq!(duplicates, 0);

    let dead = out.on(DEAD);
    assert_eq!(dead.len(), 3, "{}", summary(&out.records));
    for (name, payload) in &hostile {
        let d = dead
            .iter()
            .find(|d| d.value["payload_bytes"] == payload.len())
            .unwrap_or_else(|| panic!("no dead letter for the {name} message"))
            .value
            .clone();
        assert_eq!(d["reason"], "malformed_event", "{name}");
        assert_eq!(d["payload_truncated"], true, "{name}");
        assert_eq!(
            d["payload_sha256"],
            inferstream::record::sha256_hex(payload),
            "{name}"
        );
        let kept = d["payload"].as_str().unwrap();
        assert!(
            !kept.is_empty() && kept.len() <= 90_000,
            "{name}: {}",
            kept.len()
        );
        assert!(serde_json::to_vec(&d).unwrap().len() < 1_000_000, "{name}");
    }
    let (status, _) = http_get(&service.url("/healthz")).await.unwrap();
    assert_eq!(status, 200);
}

async fn wait_ready(service: &ServiceProc, want: u16, deadline: Duration) {
    let end = std::time::Instant::now() + deadline;
    loop {
        let (status, _) = http_get(&service.url("/readyz")).await.unwrap_or_default();
        if status == want {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "/readyz is {status}, want {want}; log: {}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Item 3: a model container that fails (424 ModelError, original status
/// 500) for 12 s pauses the service; nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_model_container_pauses_the_service_instead_of_dead_lettering() {
    let stack = Stack::start(Faults::default()).await;
    stack.endpoint.control.fail_with(Some(Failure::ModelCrash));
    let n = 40;
    let (uploads, events) = upload_images(&stack, n, "crashing").await;
    stack.produce(&events).await;
    let service = stack
        .service(&[
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "500ms"),
            ("ENDPOINT__CIRCUIT_OPEN_MAX", "2s"),
        ])
        .await;
    let failing_since = std::time::Instant::now();
    service
        .wait_metric("inferstream_endpoint_circuit_open", &[], MINUTE, |v| {
            v == 1.0
        })
        .await;
    wait_ready(&service, 503, MINUTE).await;
    // The container keeps failing for 12 s in all.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(failing_since.elapsed())).await;
    stack.endpoint.control.fail_with(None);

    let mut out = stack.collector();
    out.all_predicted(&stack, n, MINUTE).await;
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
    let (missing, duplicates) = tally(&uploads, &out.records);
    assert!(missing.is_empty(), "never predicted: {missing:?}");
    assert_eq!(duplicates, 0);
    wait_ready(&service, 200, MINUTE).await;
}

/// Item 3: denied access, expired or unknown credentials and an unknown
/// endpoint are nobody's image's fault: the service pauses with a log
/// line naming the cause, and carries on when it is fixed.
#[tokio::test(flavor = "multi_thread")]
async fn denied_expired_or_missing_endpoints_pause_with_the_cause_logged() {
    let stack = Stack::start(Faults::default()).await;
    let service = stack
        .service(&[
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "300ms"),
            ("ENDPOINT__CIRCUIT_OPEN_MAX", "1s"),
        ])
        .await;
    let mut out = stack.collector();
    let kinds = [
        (Failure::AccessDenied, "AccessDeniedException"),
        (Failure::ExpiredToken, "ExpiredTokenException"),
        (Failure::UnrecognizedClient, "UnrecognizedClientException"),
        (Failure::EndpointNotFound, "not found"),
    ];
    let mut all = Vec::new();
    for (i, (failure, cause)) in kinds.iter().enumerate() {
        stack.endpoint.control.fail_with(Some(*failure));
        let (uploads, events) = upload_images(&stack, 5, &format!("systemic{i}")).await;
        stack.produce(&events).await;
        service
            .wait_metric("inferstream_endpoint_circuit_open", &[], MINUTE, |v| {
                v == 1.0
            })
            .await;
        wait_ready(&service, 503, MINUTE).await;
        let log = service.log_all();
        assert!(
            log.lines().any(|l| l.contains(cause) && l.contains("WARN")
                || l.contains(cause) && l.contains("ERROR")),
            "no warning naming {cause}; log: {}",
            service.log_text()
        );
        stack.endpoint.control.fail_with(None);
        all.extend(uploads);
        let want = all.len();
        out.until(&format!("{want} predictions"), MINUTE, |r| {
            predictions_by_id(r).len() >= want
        })
        .await;
        wait_ready(&service, 200, MINUTE).await;
    }
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(300)).await;
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
    let (missing, _) = tally(&all, &out.records);
    assert!(missing.is_empty(), "never predicted: {missing:?}");
}

async fn put_crash_and_good(stack: &Stack, prefix: &str, good: usize) -> Vec<(String, Vec<u8>)> {
    let (_, mut events) = s3_images(stack, good, prefix).await;
    let key = format!("{prefix}/crash.png");
    let etag = stack.put_object("uploads", &key, crash_image(16)).await;
    events.insert(
        good / 2,
        (key.clone(), event(Shape::S3, "uploads", &key, 0, &etag)),
    );
    events
}

fn dead_for(out: &Collector, key: &str) -> Vec<Value> {
    out.on(DEAD)
        .iter()
        .filter(|d| d.value["key"] == key)
        .map(|d| d.value.clone())
        .collect()
}

/// Item 3: in batch mode, one image that crashes the model (a retryable
/// error that keeps failing while other images succeed) is isolated by
/// bisection; its 15 batch-mates get predictions.
#[tokio::test(flavor = "multi_thread")]
async fn batch_mode_isolates_an_image_that_crashes_the_model() {
    let stack = Stack::start(Faults::default()).await;
    let events = put_crash_and_good(&stack, "crashbatch", 15).await;
    stack.produce(&events).await;
    let _service = stack
        .service(&[
            ("ENDPOINT__MODE", "batch"),
            ("BATCH__MAX_WAIT", "500ms"),
            ("ENDPOINT__CONCURRENCY", "1"),
            ("ENDPOINT__MAX_ATTEMPTS", "5"),
            ("ENDPOINT__CIRCUIT_FAILURES", "3"),
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "200ms"),
            ("ENDPOINT__CIRCUIT_OPEN_MAX", "500ms"),
        ])
        .await;
    let mut out = stack.collector();
    out.until("15 predictions and a dead letter", 2 * MINUTE, |r| {
        predictions_by_id(r).len() >= 15 && r.iter().any(|o| o.topic == DEAD)
    })
    .await;
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(300)).await;
    let dead = out.on(DEAD);
    assert_eq!(dead.len(), 1, "{}", summary(&out.records));
    assert_eq!(dead[0].value["key"], "crashbatch/crash.png");
    assert_eq!(dead[0].value["reason"], "endpoint_unavailable");
    let detail = dead[0].value["detail"].as_str().unwrap();
    assert!(
        detail.contains("while the endpoint answered other calls") && detail.contains("ModelError"),
        "{detail}"
    );
    assert_eq!(predictions_by_id(&out.records).len(), 15);
}

/// Item 10: an image that crashes the model, alone on the endpoint after
/// others succeeded, is dead-lettered after its attempts instead of being
/// the circuit's probe for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_poison_image_alone_is_dead_lettered_not_probed_for_ever() {
    let stack = Stack::start(Faults::default()).await;
    let service = stack
        .service(&[
            ("ENDPOINT__MAX_ATTEMPTS", "4"),
            ("ENDPOINT__CIRCUIT_FAILURES", "2"),
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "200ms"),
            ("ENDPOINT__CIRCUIT_OPEN_MAX", "500ms"),
        ])
        .await;
    let (first, events) = upload_images(&stack, 5, "before-poison").await;
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, first.len(), MINUTE).await;
    let events = put_crash_and_good(&stack, "alone", 0).await;
    stack.produce(&events).await;
    out.until("the poison image's dead letter", MINUTE, |r| {
        r.iter().any(|o| o.topic == DEAD)
    })
    .await;
    let dead = dead_for(&out, "alone/crash.png");
    assert_eq!(dead.len(), 1, "{}", summary(&out.records));
    assert_eq!(dead[0]["reason"], "endpoint_unavailable");
    service
        .wait_metric("inferstream_endpoint_circuit_open", &[], MINUTE, |v| {
            v == 0.0
        })
        .await;
}

/// Item 4: an SNS Publish that never answers is cut by `alerts.timeout`;
/// the alert is dead-lettered and the offset committed.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_sns_publish_is_cut_by_its_deadline_and_dead_lettered() {
    let stack = Stack::start(Faults::default()).await;
    // Every connection to "SNS" is held without an answer.
    let proxy = FaultProxy::start(&stack.moto.url, 0.0, 1.0, 5).await;
    let env = [
        ("AWS__SNS__ENDPOINT_URL", proxy.url.as_str()),
        ("ALERTS__MAX_ATTEMPTS", "2"),
        ("ALERTS__TIMEOUT", "1s"),
    ];
    let (_service, d) = crate::pipeline::failed_alert(&stack, "alerts/hung.png", &env).await;
    assert!(
        d["detail"].as_str().unwrap().contains("alerts.timeout"),
        "{d}"
    );
    assert_eq!(proxy.hung.load(std::sync::atomic::Ordering::Relaxed), 2);
}

/// Item 4: data capture whose PutObject never answers neither stalls
/// classification (its backlog is bounded, further lines are dropped and
/// counted) nor the shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_capture_write_stalls_nothing() {
    let stack = Stack::start(Faults::default()).await;
    // More predictions than the old 1,024-line capture channel held.
    let n = 1200;
    let (uploads, events) = upload_images(&stack, n, "hungcapture").await;
    stack.produce(&events).await;
    let proxy = FaultProxy::hang_method(&stack.moto.url, "PUT").await;
    let service = stack
        .service(&[
            ("AWS__S3__ENDPOINT_URL", proxy.url.as_str()),
            ("CAPTURE__ENABLED", "true"),
            ("CAPTURE__DESTINATION", "s3://capture/hung"),
            ("CAPTURE__CAPTURE_INPUT", "true"),
            ("CAPTURE__MAX_OBJECT_BYTES", "100000"),
            ("CAPTURE__TIMEOUT", "1s"),
            ("CAPTURE__MAX_ATTEMPTS", "2"),
            ("PIPELINE__SHUTDOWN_TIMEOUT", "5s"),
        ])
        .await;
    let mut out = stack.collector();
    out.all_predicted(&stack, n, 2 * MINUTE).await;
    let (missing, _) = tally(&uploads, &out.records);
    assert!(missing.is_empty());
    assert!(
        proxy.hung.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no PutObject was held"
    );
    let dropped = service
        .metric("inferstream_capture_dropped_total", &[])
        .await;
    let failed = service
        .metric("inferstream_capture_failed_total", &[])
        .await;
    eprintln!("hung capture: {dropped} lines dropped, {failed} lost in failed writes");
    assert!(dropped > 0.0, "the capture backlog never filled");
    let started = std::time::Instant::now();
    let status = service.terminate(MINUTE).await;
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5) + inferstream::shutdown::WATCHDOG_GRACE,
        "shutdown took {:?}",
        started.elapsed()
    );
}

/// Item 5: a message of 10,000 bad records makes one dead letter (not
/// 10,000 copies of the message), and the images around it go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_with_thousands_of_records_makes_one_bounded_dead_letter() {
    let stack = Stack::start(Faults::default()).await;
    let (uploads, mut events) = upload_images(&stack, 10, "records").await;
    let record = serde_json::json!({
        "eventVersion": "2.1",
        "s3": {"bucket": {"name": "u"}, "object": {"key": "%"}}
    });
    let many = serde_json::json!({ "Records": vec![record; 10_000] }).to_string();
    assert!(
        many.len() > 700_000 && many.len() < 1024 * 1024,
        "{}",
        many.len()
    );
    events.insert(5, ("many".into(), many.clone().into_bytes()));
    stack.produce(&events).await;
    let mut service = stack.service(&[]).await;
    let mut out = stack.collector();
    out.until("the images and the dead letter", MINUTE, |r| {
        predictions_by_id(r).len() >= uploads.len() && r.iter().any(|o| o.topic == DEAD)
    })
    .await;
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(500)).await;
    let dead = out.on(DEAD);
    assert_eq!(dead.len(), 1, "{}", summary(&out.records));
    let d = &dead[0].value;
    assert_eq!(d["reason"], "too_many_records");
    assert_eq!(d["payload_bytes"], many.len());
    assert_eq!(d["payload_truncated"], true);
    assert!(serde_json::to_vec(d).unwrap().len() < 500_000);
    assert!(service.running());
}

/// The endpoint is failing already: once `service` has opened its
/// circuit, it stays down for `time` (a scenario length, not a wait for a
/// condition), then comes back.
async fn down_for(stack: &Stack, service: &ServiceProc, time: Duration) {
    service
        .wait_metric("inferstream_endpoint_circuit_open", &[], MINUTE, |v| {
            v == 1.0
        })
        .await;
    tokio::time::sleep(time).await;
    stack.endpoint.control.fail_with(None);
}

/// Merges single-record S3 notifications into messages of `per` records.
fn merged(events: &[(String, Vec<u8>)], per: usize) -> Vec<(String, Vec<u8>)> {
    events
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let records: Vec<Value> = chunk
                .iter()
                .flat_map(|(_, e)| {
                    let v: Value = serde_json::from_slice(e).unwrap();
                    v["Records"].as_array().unwrap().clone()
                })
                .collect();
            (
                format!("merged-{i}"),
                serde_json::json!({ "Records": records })
                    .to_string()
                    .into_bytes(),
            )
        })
        .collect()
}

/// Uploads `n` images with one S3-shaped event each.
async fn s3_images(stack: &Stack, n: usize, prefix: &str) -> (Vec<String>, Vec<(String, Vec<u8>)>) {
    let mut keys = Vec::new();
    let mut events = Vec::new();
    for i in 0..n {
        let key = format!("{prefix}/{i}.png");
        let etag = stack
            .put_object(
                "uploads",
                &key,
                test_image(i % 2, 0.98, 2, 20, ImageFormat::Png),
            )
            .await;
        events.push((key.clone(), event(Shape::S3, "uploads", &key, 0, &etag)));
        keys.push(key);
    }
    (keys, events)
}

/// Item 6: while it waits for room in flight (the endpoint is down), the
/// source keeps polling Kafka: the group does not evict it after
/// `max.poll.interval.ms`, so nothing is revoked or done twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_source_keeps_polling_kafka_while_it_waits_for_room() {
    let stack = Stack::start(Faults::default()).await;
    stack.endpoint.control.fail_with(Some(Failure::Unavailable));
    let (keys, events) = s3_images(&stack, 36, "polling").await;
    // Messages of 9 images: with 16 in flight, the second waits for room.
    stack.produce(&merged(&events, 9)).await;
    let service = stack
        .service(&[
            ("PIPELINE__MAX_IN_FLIGHT", "16"),
            ("KAFKA__CONSUMER_PROPERTIES__MAX_POLL_INTERVAL_MS", "7000"),
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "500ms"),
            ("ENDPOINT__CIRCUIT_OPEN_MAX", "1s"),
        ])
        .await;
    // Down for twice max.poll.interval.ms.
    down_for(&stack, &service, Duration::from_secs(14)).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, keys.len(), MINUTE).await;
    let by_id = predictions_by_id(&out.records);
    let twice = by_id.values().filter(|v| v.len() > 1).count();
    let log = service.log_all();
    assert!(
        !log.contains("maximum poll interval"),
        "the member was evicted; log: {}",
        service.log_text()
    );
    assert_eq!(twice, 0, "{twice} images classified twice");
    assert_eq!(
        service
            .metric("inferstream_rebalances_total", &["kind=\"revoke\""])
            .await,
        0.0
    );
    assert_eq!(
        service.metric("inferstream_assigned_partitions", &[]).await,
        PARTITIONS as f64
    );
}

/// Item 7: a SIGTERM while the only broker is down (commits cannot be
/// answered) ends within the shutdown budget, exit 0; a restart once the
/// broker is back classifies every image.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_the_broker_down_exits_within_its_budget_and_loses_nothing() {
    let n = 300;
    let (stack, uploads) =
        crate::pipeline::slow_stack_with(Duration::from_millis(10), n, "brokerdown").await;
    let settings = [
        ("ENDPOINT__CONCURRENCY", "2"),
        ("PIPELINE__SHUTDOWN_TIMEOUT", "6s"),
        ("KAFKA__COMMIT_TIMEOUT", "2s"),
    ];
    let service = stack.service(&settings).await;
    let mut out = stack.collector();
    out.until("some predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= n / 5
    })
    .await;
    stack.kafka.broker_down(1).expect("broker down");
    // Let a commit or two go unanswered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = std::time::Instant::now();
    let status = service.terminate(MINUTE).await;
    let took = started.elapsed();
    eprintln!("broker down: SIGTERM to exit {took:?}, {status}");
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(6) + inferstream::shutdown::WATCHDOG_GRACE,
        "took {took:?}"
    );
    stack.kafka.broker_up(1).expect("broker up");
    let _again = stack.service(&settings).await;
    out.all_predicted(&stack, n, 2 * MINUTE).await;
    let (missing, duplicates) = tally(&uploads, &out.records);
    eprintln!(
        "broker down at SIGTERM: lost {}, duplicates {duplicates}",
        missing.len()
    );
    assert!(missing.is_empty(), "never predicted: {missing:?}");
}

/// Item 8: calls keep running while their stage waits to hand results on:
/// GetObjects of large photos in flight while the endpoint is down for
/// longer than `fetch.timeout` finish in time instead of timing out
/// unpolled and being retried.
#[tokio::test(flavor = "multi_thread")]
async fn calls_keep_running_while_their_stage_waits_downstream() {
    use inferstream::tools::endpoint::model::noisy_image;
    let stack = Stack::start(Faults::default()).await;
    stack.endpoint.control.fail_with(Some(Failure::Unavailable));
    let n = 24;
    let mut events = Vec::new();
    for i in 0..n {
        let key = format!("photos/{i}.png");
        let body = noisy_image(i % 2, 0.98, 2, (640, 480), ImageFormat::Png, i as u64);
        assert!(body.len() > 500_000, "{}", body.len());
        let etag = stack.put_object("uploads", &key, body).await;
        events.push((key.clone(), event(Shape::S3, "uploads", &key, 0, &etag)));
    }
    stack.produce(&events).await;
    let service = stack
        .service(&[
            ("FETCH__TIMEOUT", "2s"),
            ("FETCH__CONCURRENCY", "8"),
            // Room for 13 fetched images downstream: the rest wait in fetch.
            ("BATCH__MAX_IMAGES", "1"),
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "500ms"),
            ("ENDPOINT__CIRCUIT_OPEN_MAX", "1s"),
        ])
        .await;
    // Fetches pile up behind the stalled endpoint for 4 x fetch.timeout.
    down_for(&stack, &service, Duration::from_secs(8)).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, n, MINUTE).await;
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
    let retries = service.metric("inferstream_fetch_retries_total", &[]).await;
    let timeouts = service
        .metric("inferstream_inference_errors_total", &["kind=\"timeout\""])
        .await;
    assert_eq!(
        retries, 0.0,
        "GetObjects timed out while nobody polled them"
    );
    assert_eq!(timeouts, 0.0);
}

/// Item 10: an offset reset by auto.offset.reset (the committed offset fell
/// out of retention: records were skipped) is counted and logged.
#[tokio::test(flavor = "multi_thread")]
async fn an_offset_reset_by_retention_is_counted_and_logged() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let stack = Stack::start(Faults::default()).await;
    let brokers = stack.kafka.bootstrap_servers();
    // The mock broker keeps 5 MB per partition: 7 MB pushes the log start
    // of partition 0 past offset 0.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let pad = "x".repeat(1000);
    let test_event = format!(
        r#"{{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"uploads","Pad":"{pad}"}}"#
    );
    let sends = (0..7000).map(|_| {
        producer.send(
            FutureRecord::<(), _>::to(INPUT)
                .partition(0)
                .payload(&test_event),
            rdkafka::util::Timeout::Never,
        )
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e).unwrap();
    }
    // The group committed offset 0 of partition 0 long ago.
    let old: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &stack.group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(INPUT, 0, rdkafka::Offset::Offset(0))
        .unwrap();
    old.commit(&tpl, CommitMode::Sync).unwrap();
    drop(old);

    let service = stack.service(&[]).await;
    service
        .wait_metric("inferstream_offset_resets_total", &[], MINUTE, |v| v >= 1.0)
        .await;
    let log = service.log_all();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("offset reset")),
        "{}",
        service.log_text()
    );
}

// ------------------------------------------------------------------
// Findings of the independent review of the delivery path (issue #10).

/// Review finding: commits that are answered, but always with an error,
/// let completed work pile up uncommitted without bound (and with it the
/// duplicates of a crash). Past 6 × `kafka.commit_timeout` the service
/// stops instead; the restart goes on.
#[tokio::test(flavor = "multi_thread")]
async fn offset_commits_that_keep_failing_stop_the_service() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (stack, uploads) =
        crate::pipeline::slow_stack_with(Duration::from_millis(10), 60, "commitfail").await;
    stack.kafka.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 1000],
    );
    let mut service = stack.service(&[("KAFKA__COMMIT_TIMEOUT", "1s")]).await;
    let status = service.wait_exit(MINUTE).await;
    assert!(!status.success(), "{status}");
    assert!(
        service.log_all().contains("offset commits have failed"),
        "{}",
        service.log_text()
    );
    stack
        .kafka
        .clear_request_errors(RDKafkaApiKey::OffsetCommit);
    let _again = stack.service(&[]).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, uploads.len(), MINUTE).await;
    let (missing, _) = tally(&uploads, &out.records);
    assert!(missing.is_empty());
}

/// Review finding: a SIGTERM that arrives while a revocation waits for
/// in-flight work (here: stuck behind an open circuit) keeps to the
/// shutdown budget, counted from the signal, and exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_revocation_keeps_to_the_budget() {
    let stack = Stack::start(Faults::default()).await;
    stack.endpoint.control.fail_with(Some(Failure::Unavailable));
    let (uploads, events) = upload_images(&stack, 60, "revoking").await;
    stack.produce(&events).await;
    let settings = [("PIPELINE__SHUTDOWN_TIMEOUT", "4s")];
    let a = stack.service(&settings).await;
    a.wait_metric("inferstream_endpoint_circuit_open", &[], MINUTE, |v| {
        v == 1.0
    })
    .await;
    // A second member: `a` gives up partitions and waits (up to
    // kafka.revoke_drain_timeout, 10 s) for their images.
    let _b = stack.service(&settings).await;
    a.wait_metric(
        "inferstream_rebalances_total",
        &["kind=\"revoke\""],
        MINUTE,
        |v| v >= 1.0,
    )
    .await;
    let started = std::time::Instant::now();
    let status = a.terminate(MINUTE).await;
    let took = started.elapsed();
    eprintln!("revoking: SIGTERM to exit {took:?}, {status}");
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(4) + inferstream::shutdown::WATCHDOG_GRACE,
        "{took:?}"
    );
    stack.endpoint.control.fail_with(None);
    let mut out = stack.collector();
    out.all_predicted(&stack, uploads.len(), 2 * MINUTE).await;
}

/// Review finding: a fatal consumer error (a static member fenced by
/// another with the same `kafka.instance_id`) stops the service instead of
/// leaving it running without consuming.
#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_static_member_stops_instead_of_idling() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let stack = Stack::start(Faults::default()).await;
    let mut service = stack.service(&[("KAFKA__INSTANCE_ID", "pod-0")]).await;
    service
        .wait_metric("inferstream_assigned_partitions", &[], MINUTE, |v| v > 0.0)
        .await;
    stack.kafka.request_errors(
        RDKafkaApiKey::Heartbeat,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID; 20],
    );
    let status = service.wait_exit(MINUTE).await;
    assert!(!status.success(), "{status}");
    assert!(service.log_all().contains("fatal Kafka consumer error"));
}

/// Review finding: a client holding a half-sent request to /metrics does
/// not hold the process past its shutdown budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_half_sent_metrics_request_does_not_hold_the_exit() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start(Faults::default()).await;
    let service = stack.service(&[("PIPELINE__SHUTDOWN_TIMEOUT", "3s")]).await;
    let mut conn = tokio::net::TcpStream::connect(service.metrics)
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let status = service.terminate(MINUTE).await;
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(3) + inferstream::shutdown::WATCHDOG_GRACE,
        "{took:?}"
    );
    drop(conn);
}

/// `inferstream_fetch_duration_seconds` is the GetObject that answered, not
/// the failed tries and back-offs before it; the prediction's
/// `latency_ms.fetch` keeps the whole fetch.
#[tokio::test(flavor = "multi_thread")]
async fn fetch_duration_is_the_get_object_and_the_record_keeps_the_whole_fetch() {
    use std::sync::atomic::Ordering;
    let stack = Stack::start(Faults::default()).await;
    let proxy = FaultProxy::outage(&stack.moto.url).await;
    proxy.down.store(false, Ordering::SeqCst);
    let (_, events) = upload_images(&stack, 1, "retried").await;
    let service = stack
        .service(&[
            ("AWS__S3__ENDPOINT_URL", proxy.url.as_str()),
            ("FETCH__MAX_ATTEMPTS", "50"),
        ])
        .await;
    // S3 answers 503 for 1.5 s from the first try on.
    proxy.down.store(true, Ordering::SeqCst);
    stack.produce(&events).await;
    service
        .wait_metric("inferstream_fetch_retries_total", &[], MINUTE, |v| v >= 1.0)
        .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    proxy.down.store(false, Ordering::SeqCst);
    let mut out = stack.collector();
    out.all_predicted(&stack, 1, MINUTE).await;
    let record = out
        .records
        .iter()
        .find(|r| r.topic == RESULTS || r.topic == REVIEW)
        .expect("a prediction");
    let whole = record.value["latency_ms"]["fetch"].as_f64().unwrap();
    assert!(whole >= 1_500.0, "latency_ms.fetch {whole}");
    let count = service
        .metric("inferstream_fetch_duration_seconds_count", &[])
        .await;
    let sum = service
        .metric("inferstream_fetch_duration_seconds_sum", &[])
        .await;
    assert_eq!(count, 1.0);
    assert!(sum < 1.0, "fetch_duration {sum} s for one GetObject");
}

/// `pipeline.max_in_flight_bytes` below one batch of photos, and below one
/// photo: images go on a few at a time, the largest alone; none is lost or
/// held for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_byte_budget_smaller_than_an_image_lets_every_image_through() {
    use inferstream::tools::endpoint::model::noisy_image;
    let stack = Stack::start(Faults::default()).await;
    let n = 9;
    let mut events = Vec::new();
    for i in 0..n {
        let key = format!("budget/{i}.png");
        // The last is over the whole budget (1 MiB).
        let size = if i == n - 1 { (1280, 960) } else { (640, 480) };
        let body = noisy_image(i % 2, 0.98, 2, size, ImageFormat::Png, i as u64);
        assert!(body.len() > 300_000, "{}", body.len());
        if i == n - 1 {
            assert!(body.len() > 1 << 20, "{}", body.len());
        }
        let len = body.len();
        let etag = stack.put_object("uploads", &key, body).await;
        events.push((key.clone(), event(Shape::S3, "uploads", &key, len, &etag)));
    }
    let _service = stack
        .service(&[
            ("PIPELINE__MAX_IN_FLIGHT_BYTES", "1048576"),
            ("BATCH__MAX_IMAGES", "4"),
        ])
        .await;
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, n, MINUTE).await;
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
}

/// Review of issue #16: an endpoint that starts throttling every call while
/// adaptive concurrency has a high limit. The images must wait (the limit
/// falls to one call, then the circuit opens), not spend their attempts
/// and be dead-lettered while the limit comes down.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_that_throttles_everything_makes_images_wait_not_fail() {
    let faults = Faults {
        latency: Duration::from_millis(300),
        ..Faults::default()
    };
    let stack = Stack::start(faults).await;
    let n = 600;
    let (uploads, events) = upload_images(&stack, n, "throttled").await;
    stack.produce(&events).await;
    let service = stack
        .service(&[
            ("ENDPOINT__MODE", "per-image"),
            ("ENDPOINT__CONCURRENCY", "adaptive"),
            ("ENDPOINT__MAX_ATTEMPTS", "5"),
            ("ENDPOINT__CIRCUIT_OPEN_INITIAL", "500ms"),
        ])
        .await;
    service
        .wait_metric("inferstream_endpoint_concurrency_limit", &[], MINUTE, |v| {
            v >= 16.0
        })
        .await;
    stack.endpoint.control.fail_with(Some(Failure::Throttled));
    service
        .wait_metric("inferstream_endpoint_circuit_open", &[], MINUTE, |v| {
            v == 1.0
        })
        .await;
    stack.endpoint.control.fail_with(None);

    let mut out = stack.collector();
    out.all_predicted(&stack, n, MINUTE).await;
    assert!(out.on(DEAD).is_empty(), "{}", summary(&out.records));
    let (missing, _) = tally(&uploads, &out.records);
    assert!(missing.is_empty(), "never predicted: {missing:?}");
    use std::sync::atomic::Ordering::Relaxed;
    assert!(stack.endpoint.stats.throttled.load(Relaxed) > 16);
}
