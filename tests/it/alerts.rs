//! Alert digests end to end: the real binary reads the review topic and
//! publishes to moto's SNS; the digests are read back through SQS.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use inferstream::tools::endpoint::Faults;
use serde_json::json;

use crate::harness::*;
use crate::pipeline::{upload_images, Upload, MINUTE};

/// Digest mode with every image below the threshold.
fn digests(window: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ALERTS__MODE", "digest".into()),
        ("ALERTS__DIGEST_WINDOW", window.into()),
        ("ROUTE__THRESHOLD", "0.999".into()),
    ]
}

fn env<'a>(settings: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    settings.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn alerts_group(stack: &Stack) -> String {
    format!("{}-alerts", stack.group)
}

/// Every id of `uploads` listed exactly once across `got`.
fn assert_each_listed_once(uploads: &[&Upload], got: &[Digest]) {
    let listed = listed(got);
    let twice: Vec<_> = listed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "alerted more than once: {twice:?}");
    let want: BTreeSet<&str> = uploads.iter().map(|u| u.id.as_str()).collect();
    let have: BTreeSet<&str> = listed.keys().map(String::as_str).collect();
    let missing: Vec<_> = want.difference(&have).collect();
    let unknown: Vec<_> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "missing {missing:?}, unknown {unknown:?}"
    );
}

/// Waits until the alerts group has committed the whole review topic.
async fn wait_alerts_committed(stack: &Stack, deadline: Duration) {
    stack
        .wait_group_committed_to_end(&alerts_group(stack), REVIEW, deadline)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_of_500_review_images_makes_one_digest_per_label_group() {
    let stack = Stack::start(Faults::default()).await;
    let (uploads, events) = upload_images(&stack, 500, "digest").await;
    stack.produce(&events).await;
    let mut settings = digests("30s");
    settings.push(("ALERTS__LABEL_GROUPS__BIKES", "[\"bicycle\"]".into()));
    let service = stack.service(&env(&settings)).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, 500, 2 * MINUTE).await;
    assert_eq!(out.on(REVIEW).len(), 500, "{}", summary(&out.records));

    let mut got = Vec::new();
    stack
        .digests_until(&mut got, "500 ids listed", 2 * MINUTE, |d| {
            listed(d).len() >= 500
        })
        .await;
    got.extend(stack.more_digests(Duration::from_secs(3)).await);
    assert_each_listed_once(&uploads.iter().collect::<Vec<_>>(), &got);
    let groups: BTreeMap<&str, &Digest> = got.iter().map(|d| (d.group.as_str(), d)).collect();
    assert_eq!(
        got.len(),
        2,
        "{:?}",
        got.iter().map(|d| &d.subject).collect::<Vec<_>>()
    );
    assert_eq!(
        groups.keys().copied().collect::<Vec<_>>(),
        ["bikes", "other"]
    );
    assert_eq!(
        groups["bikes"].subject,
        "[bikes] 250 images need review (bicycle 250)"
    );
    assert_eq!(
        groups["other"].subject,
        "[other] 250 images need review (motorcycle 250)"
    );
    let text = &groups["bikes"].text;
    // 50 listed with a console link each, then the rest counted.
    assert_eq!(
        text.matches("console.aws.amazon.com/s3/object/uploads?")
            .count(),
        50,
        "{text}"
    );
    assert!(text.contains("... and 200 more (bicycle 200)"), "{text}");
    assert_eq!(groups["bikes"].record["count"], 250);
    assert_eq!(
        groups["bikes"].record["schema"],
        "inferstream.alert_digest.v1"
    );

    assert_eq!(
        service.metric("inferstream_alerts_listed_total", &[]).await,
        500.0
    );
    assert_eq!(
        service
            .metric("inferstream_alerts_published_total", &[])
            .await,
        2.0
    );
    wait_alerts_committed(&stack, MINUTE).await;
    assert_eq!(
        service
            .metric("inferstream_alerts_pending_images", &[])
            .await,
        0.0
    );
    eprintln!("500 review images in one window: {} digests", got.len());
}

/// A restart mid-window, after an earlier digest: nothing alerted twice
/// (the images re-classified after the restart included), nothing missing.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_mid_window_alerts_every_image_once() {
    let stack = Stack::start(Faults::default()).await;
    let (uploads, events) = upload_images(&stack, 200, "restart").await;
    let mut settings = digests("8s");
    settings.push(("ALERTS__LINK", "presigned".into()));
    let mut first = stack.service(&env(&settings)).await;
    stack.produce(&events[..100]).await;
    let mut got = Vec::new();
    stack
        .digests_until(&mut got, "the first 100 listed", 2 * MINUTE, |d| {
            listed(d).len() >= 100
        })
        .await;
    wait_alerts_committed(&stack, MINUTE).await;
    // Presigned links open the image without credentials.
    let link = got[0]
        .text
        .lines()
        .find(|l| l.contains("X-Amz-Signature="))
        .unwrap_or_else(|| panic!("a presigned link in {}", got[0].text))
        .trim()
        .to_string();
    let (status, _) = http_get(&link).await.expect("GET the presigned link");
    assert_eq!(status, 200, "{link}");

    // The next 100 read into the open window, then SIGKILL before it closes.
    stack.produce(&events[100..]).await;
    first
        .wait_metric("inferstream_alerts_pending_images", &[], MINUTE, |v| {
            v >= 100.0
        })
        .await;
    first.kill();
    assert!(
        stack.more_digests(Duration::ZERO).await.is_empty(),
        "nothing was published for the second window"
    );
    // The first 100 again: re-classified, they are on the review topic twice.
    stack.produce(&events[..100]).await;

    let second = stack.service(&env(&settings)).await;
    stack
        .digests_until(&mut got, "all 200 listed", 2 * MINUTE, |d| {
            listed(d).len() >= 200
        })
        .await;
    let mut out = stack.collector();
    out.until("300 review records", MINUTE, |r| {
        r.iter().filter(|o| o.topic == REVIEW).count() >= 300
    })
    .await;
    wait_alerts_committed(&stack, MINUTE).await;
    got.extend(stack.more_digests(Duration::from_secs(2)).await);
    assert_each_listed_once(&uploads.iter().collect::<Vec<_>>(), &got);
    let duplicates = second
        .metric(
            "inferstream_alerts_suppressed_total",
            &["reason=\"duplicate\""],
        )
        .await;
    assert!(
        duplicates >= 100.0,
        "the re-classified images were recognised as alerted: {duplicates}"
    );
    eprintln!(
        "restart mid-window: {} digests for 200 images, {duplicates} duplicates suppressed after the restart",
        got.len()
    );
}

/// Two instances, one killed mid-window; the survivor takes over its
/// review partitions and their alerted ids.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_killed_in_a_two_instance_group_loses_and_repeats_no_alert() {
    let stack = Stack::start(Faults::default()).await;
    let (uploads, events) = upload_images(&stack, 300, "pair").await;
    let settings = digests("6s");
    let mut a = stack.service(&env(&settings)).await;
    let b = stack.service(&env(&settings)).await;
    // Both own review partitions before anything is produced.
    let end = Instant::now() + MINUTE;
    while ![&a, &b]
        .iter()
        .all(|s| s.log_text().contains("alerts: review partitions assigned"))
    {
        assert!(Instant::now() < end, "alerts groups not formed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.produce(&events[..150]).await;
    let mut got = Vec::new();
    stack
        .digests_until(&mut got, "the first 150 listed", 2 * MINUTE, |d| {
            listed(d).len() >= 150
        })
        .await;
    let a_listed = a.metric("inferstream_alerts_listed_total", &[]).await;
    assert!(
        a_listed > 0.0,
        "both instances published digests (a listed {a_listed})"
    );

    stack.produce(&events[150..]).await;
    a.wait_metric("inferstream_alerts_pending_images", &[], MINUTE, |v| {
        v > 0.0
    })
    .await;
    a.kill();
    // Everything again: duplicates on every review partition, including
    // those whose ids the killed instance had alerted.
    stack.produce(&events).await;
    stack
        .digests_until(&mut got, "all 300 listed", 3 * MINUTE, |d| {
            listed(d).len() >= 300
        })
        .await;
    let mut out = stack.collector();
    out.until("600 review records", 2 * MINUTE, |r| {
        r.iter().filter(|o| o.topic == REVIEW).count() >= 600
    })
    .await;
    wait_alerts_committed(&stack, 2 * MINUTE).await;
    got.extend(stack.more_digests(Duration::from_secs(2)).await);
    assert_each_listed_once(&uploads.iter().collect::<Vec<_>>(), &got);
    let duplicates = b
        .metric(
            "inferstream_alerts_suppressed_total",
            &["reason=\"duplicate\""],
        )
        .await;
    assert!(duplicates >= 150.0, "{duplicates}");
    eprintln!(
        "two instances, one killed: {} digests for 300 images; survivor suppressed {duplicates} duplicates",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sns_outage_stalls_no_classification_and_every_alert_arrives_after() {
    let stack = Stack::start(Faults::default()).await;
    let proxy = FaultProxy::outage(&stack.moto.url).await;
    let outage_began = Instant::now();
    let (uploads, events) = upload_images(&stack, 300, "outage").await;
    let mut settings = digests("2s");
    settings.push(("AWS__SNS__ENDPOINT_URL", proxy.url.clone()));
    let service = stack.service(&env(&settings)).await;
    let began = Instant::now();
    stack.produce(&events).await;
    let mut out = stack.collector();
    out.all_predicted(&stack, 300, 2 * MINUTE).await;
    let classified_in = began.elapsed();
    // Classification and its offsets did not wait for SNS.
    assert!(proxy.down.load(Ordering::SeqCst));
    service
        .wait_metric("inferstream_alerts_failed_total", &[], MINUTE, |v| v >= 1.0)
        .await;
    assert!(stack.more_digests(Duration::ZERO).await.is_empty());
    // The first window's images wait here, the rest on the review topic.
    let pending = service
        .metric("inferstream_alerts_pending_images", &[])
        .await;
    assert!(pending > 0.0, "{pending}");
    // The outage lasts 20 s.
    tokio::time::sleep_until((outage_began + Duration::from_secs(20)).into()).await;
    let failed = service.metric("inferstream_alerts_failed_total", &[]).await;
    proxy.down.store(false, Ordering::SeqCst);
    let recovered = Instant::now();
    let recovered_at = std::time::SystemTime::now();

    let mut got = Vec::new();
    stack
        .digests_until(
            &mut got,
            "all 300 listed after the outage",
            2 * MINUTE,
            |d| listed(d).len() >= 300,
        )
        .await;
    let late = recovered.elapsed();
    got.extend(stack.more_digests(Duration::from_secs(3)).await);
    assert_each_listed_once(&uploads.iter().collect::<Vec<_>>(), &got);
    // With their original times: processed before SNS came back.
    let times: Vec<std::time::SystemTime> = got
        .iter()
        .flat_map(|d| d.text.lines())
        .filter_map(|l| l.split("  processed ").nth(1))
        .map(|t| humantime::parse_rfc3339_weak(t.trim()).expect("a processing time"))
        .collect();
    assert!(!times.is_empty(), "{:?}", got[0].text);
    assert!(
        times.iter().all(|t| *t < recovered_at),
        "every listed image shows its original time, before SNS came back"
    );
    wait_alerts_committed(&stack, MINUTE).await;
    eprintln!(
        "SNS down 20 s: 300 images classified in {classified_in:.1?} while it was down, {failed} publish attempts failed, all 300 alerted {late:.1?} after it came back in {} digests",
        got.len()
    );
}

/// A review prediction as the pipeline writes it.
fn review_record(i: usize, label: &str) -> (String, Vec<u8>) {
    review_record_for(&format!("synthetic/img-{i}.png"), i, label)
}

/// Its prediction id.
fn id_of(key: &str, i: usize) -> String {
    format!("uploads/{key}@e{i}")
}

fn review_record_for(key: &str, i: usize, label: &str) -> (String, Vec<u8>) {
    let v = json!({
        "schema": "inferstream.prediction.v1",
        "id": id_of(key, i),
        "bucket": "uploads", "key": key, "etag": format!("e{i}"), "version_id": null, "size": 100,
        "label": label, "confidence": 0.5, "scores": {label: 0.5},
        "threshold": 0.93, "decision": "review",
        "endpoint": "image-classifier", "variant": null,
        "event_time": null, "processed_at": "2026-12-01T12:00:00.000Z",
        "latency_ms": {"fetch": 1.0, "infer": 1.0, "total": 2.0},
        "source": {"topic": INPUT, "partition": 0, "offset": i},
    });
    (format!("uploads/{key}"), serde_json::to_vec(&v).unwrap())
}

/// 10,000 review records straight onto the review topic (as a backlog
/// after an outage would be), then one that is not a prediction.
async fn review_backlog(stack: &Stack, n: usize) -> HashSet<String> {
    let records: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| review_record(i, if i % 3 == 0 { "motorcycle" } else { "bicycle" }))
        .collect();
    stack.produce_to(REVIEW, &records).await;
    stack
        .produce_to(REVIEW, &[("junk".into(), b"not a prediction".to_vec())])
        .await;
    records
        .iter()
        .map(|(k, _)| {
            let i: usize = k
                .trim_start_matches("uploads/synthetic/img-")
                .trim_end_matches(".png")
                .parse()
                .unwrap();
            format!("uploads/{}@e{i}", k.trim_start_matches("uploads/"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_10000_review_images_lists_the_hourly_limit_and_summarises_the_rest() {
    let stack = Stack::start(Faults::default()).await;
    let ids = review_backlog(&stack, 10_000).await;
    let mut settings = digests("10s");
    settings.push(("ALERTS__MAX_PER_HOUR", "100".into()));
    let service = stack.service(&env(&settings)).await;
    let mut got = Vec::new();
    stack
        .digests_until(&mut got, "a storm summary", 2 * MINUTE, |d| {
            d.iter().any(|d| d.kind == "storm")
        })
        .await;
    wait_alerts_committed(&stack, MINUTE).await;
    got.extend(stack.more_digests(Duration::from_secs(2)).await);
    let listed = listed(&got);
    assert_eq!(listed.len(), 100, "the hourly limit is listed");
    assert!(listed.values().all(|n| *n == 1));
    assert!(listed.keys().all(|id| ids.contains(id)));
    let storms: Vec<&Digest> = got.iter().filter(|d| d.kind == "storm").collect();
    assert_eq!(storms.len(), 1, "one storm summary per window");
    assert_eq!(storms[0].suppressed(), 9_900);
    assert_eq!(
        storms[0].subject,
        "Alert storm: 9900 more images need review"
    );
    assert_eq!(
        service
            .metric("inferstream_alerts_suppressed_total", &["reason=\"storm\""])
            .await,
        9_900.0
    );
    // The record that is not a prediction is dead-lettered, not skipped.
    let mut out = stack.collector();
    out.until("the bad review record's dead letter", MINUTE, |r| {
        r.iter().any(|o| o.topic == DEAD)
    })
    .await;
    let dead = out.on(DEAD);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value["reason"], "bad_review_record");
    assert_eq!(dead[0].value["source"]["topic"], REVIEW);
    eprintln!(
        "storm: 10,000 review images with max_per_hour 100 -> {} messages ({} digests listing 100, 1 storm summary counting 9,900)",
        got.len(),
        got.len() - 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_of_10000_review_images_makes_a_handful_of_digests() {
    let stack = Stack::start(Faults::default()).await;
    let ids = review_backlog(&stack, 10_000).await;
    let mut settings = digests("10s");
    settings.push(("ALERTS__MAX_PER_HOUR", "20000".into()));
    let service = stack.service(&env(&settings)).await;
    let mut got = Vec::new();
    stack
        .digests_until(&mut got, "10,000 listed", 2 * MINUTE, |d| {
            listed(d).len() >= 10_000
        })
        .await;
    wait_alerts_committed(&stack, MINUTE).await;
    got.extend(stack.more_digests(Duration::from_secs(2)).await);
    let listed = listed(&got);
    assert_eq!(listed.len(), 10_000);
    assert!(listed.values().all(|n| *n == 1));
    assert_eq!(listed.keys().cloned().collect::<HashSet<_>>(), ids);
    assert!(got.iter().all(|d| d.kind == "digest"));
    // Split only to fit SNS's 256 KiB.
    assert!(got.len() <= 10, "{} digests", got.len());
    assert!(got.iter().all(|d| d.text.len() < 256 * 1024));
    assert_eq!(
        service.metric("inferstream_alerts_listed_total", &[]).await,
        10_000.0
    );
    eprintln!(
        "backlog: 10,000 review images -> {} digests ({:?} ids each)",
        got.len(),
        got.iter().map(|d| d.ids().len()).collect::<Vec<_>>()
    );
}

/// Review finding: a digest of images whose keys JSON escapes to twice
/// their size was over SNS's 256 KiB, refused, and retried for ever
/// (alerting stalled). It is split until each message fits.
#[tokio::test(flavor = "multi_thread")]
async fn digests_of_keys_that_escape_large_are_split_to_fit_sns() {
    let stack = Stack::start(Faults::default()).await;
    let n = 600;
    let records: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| review_record_for(&format!("{i}/{}", "\"\\".repeat(480)), i, "bicycle"))
        .collect();
    let ids: HashSet<String> = (0..n)
        .map(|i| id_of(&format!("{i}/{}", "\"\\".repeat(480)), i))
        .collect();
    stack.produce_to(REVIEW, &records).await;
    // And one with an id no S3 object can have (300 KB): dead-lettered.
    stack
        .produce_to(
            REVIEW,
            &[review_record_for(&"k".repeat(300_000), 9_999, "bicycle")],
        )
        .await;
    let mut settings = digests("5s");
    settings.push(("ALERTS__LINK", "s3".into()));
    let service = stack.service(&env(&settings)).await;
    let mut got = Vec::new();
    stack
        .digests_until(&mut got, "600 ids listed", 2 * MINUTE, |d| {
            listed(d).len() >= n
        })
        .await;
    let listed = listed(&got);
    assert_eq!(listed.keys().cloned().collect::<HashSet<_>>(), ids);
    assert!(listed.values().all(|n| *n == 1));
    assert!(got.len() > 1, "split into several messages");
    assert_eq!(
        service.metric("inferstream_alerts_failed_total", &[]).await,
        0.0,
        "nothing was refused"
    );
    let mut out = stack.collector();
    out.until("the oversized record's dead letter", MINUTE, |r| {
        r.iter().any(|o| o.topic == DEAD)
    })
    .await;
    assert_eq!(out.on(DEAD)[0].value["reason"], "bad_review_record");
    eprintln!(
        "600 ids of ~1 KB escaping to ~2 KB: {} messages of {:?} ids",
        got.len(),
        got.iter().map(|d| d.ids().len()).collect::<Vec<_>>()
    );
}

/// Review finding: images counted in a storm summary were not recorded,
/// so when the review offsets were read again (a commit that did not land
/// before a crash) they were counted in a second storm summary. The
/// position a published window reached is recorded on the state topic.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_published_but_not_committed_is_not_alerted_again() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let stack = Stack::start(Faults::default()).await;
    let records: Vec<(String, Vec<u8>)> = (0..300).map(|i| review_record(i, "cat")).collect();
    stack.produce_to(REVIEW, &records).await;
    // Every offset commit fails until cleared.
    stack.kafka.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10_000],
    );
    let mut settings = digests("3s");
    settings.push(("ALERTS__MAX_PER_HOUR", "100".into()));
    let mut first = stack.service(&env(&settings)).await;
    let mut got = Vec::new();
    stack
        .digests_until(&mut got, "a storm summary", 2 * MINUTE, |d| {
            d.iter().any(|d| d.kind == "storm")
        })
        .await;
    assert_eq!(listed(&got).len(), 100);
    assert!(
        committed_on(
            &stack.kafka.bootstrap_servers(),
            &alerts_group(&stack),
            REVIEW
        )
        .is_empty(),
        "no commit landed"
    );
    first.kill();
    stack
        .kafka
        .clear_request_errors(RDKafkaApiKey::OffsetCommit);

    let second = stack.service(&env(&settings)).await;
    wait_alerts_committed(&stack, MINUTE).await;
    let again = stack.more_digests(Duration::from_secs(5)).await;
    assert!(
        again.is_empty(),
        "nothing is alerted again: {:?}",
        again.iter().map(|d| &d.subject).collect::<Vec<_>>()
    );
    assert_eq!(
        second
            .metric(
                "inferstream_alerts_suppressed_total",
                &["reason=\"duplicate\""]
            )
            .await,
        300.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_state_topic_is_refused_at_start_naming_the_key() {
    let stack = Stack::start(Faults::default()).await;
    let mut cmd = std::process::Command::new(binary());
    cmd.arg("run")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .envs(stack.service_env(free_port()))
        .env("INFERSTREAM__ALERTS__MODE", "digest")
        .env("INFERSTREAM__ALERTS__STATE_TOPIC", "no-such-state-topic");
    let out = tokio::time::timeout(
        MINUTE,
        tokio::task::spawn_blocking(move || cmd.output().expect("run inferstream")),
    )
    .await
    .expect("the service stops at start")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("alerts.state_topic `no-such-state-topic` does not exist")
            && stderr.contains("cleanup.policy=compact"),
        "{stderr}"
    );
}
