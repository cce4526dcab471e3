//! `inferstream backfill`: the real binary lists moto's S3 and produces to
//! the mock cluster's input topic; the service classifies what it produced.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use inferstream::record::{DeadLetter, DeadLetterReason, Payload, SourceRef};
use inferstream::tools::endpoint::Faults;

use crate::harness::*;
use crate::monitor::upload;
use crate::pipeline::MINUTE;

/// Puts `keys` (tiny bodies: a backfill never reads them) 32 at a time.
async fn put_all(stack: &Stack, keys: &[String]) {
    for chunk in keys.chunks(32) {
        futures::future::join_all(
            chunk
                .iter()
                .map(|k| stack.put_object("uploads", k, b"x".to_vec())),
        )
        .await;
    }
}

/// Events on the input topic per object (`bucket/key`).
async fn events_per_object(stack: &Stack) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in stack.read_topic(INPUT).await {
        assert_eq!(
            r.value["Records"][0]["s3"]["configurationId"], "inferstream-backfill",
            "{}",
            r.value
        );
        *n.entry(r.key).or_default() += 1;
    }
    n
}

/// `inferstream ARGS` with the stack's configuration, whatever its exit.
fn backfill_like(stack: &Stack, args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .envs(stack.service_env(free_port()))
        .output()
        .unwrap()
}

fn backfill(stack: &Stack, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.arg("backfill")
        .args(args)
        .envs(stack.service_env(free_port()));
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_interrupted_halfway_and_resumed_leaves_no_gap() {
    let stack = Stack::start(Faults::default()).await;
    // 25,000 objects in three folders, a quarter of them not images.
    let suffixes = ["jpg", "png", "JPG", "txt"];
    let keys: Vec<String> = (0..25_000)
        .map(|i| {
            format!(
                "photos/{}/img-{i:05}.{}",
                ["a", "b", "c"][i % 3],
                suffixes[i % 4]
            )
        })
        .collect();
    let started = Instant::now();
    put_all(&stack, &keys).await;
    // Outside the prefix: never listed.
    put_all(&stack, &["other/img-1.jpg".to_string()]).await;
    eprintln!("backfill: 25,001 objects put in {:?}", started.elapsed());
    let wanted: Vec<String> = keys
        .iter()
        .filter(|k| !k.ends_with(".txt"))
        .map(|k| format!("uploads/{k}"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.json");
    let checkpoint_arg = checkpoint.to_str().unwrap();

    // A dry run counts and produces nothing.
    let stdout = stack.tool(&[
        "backfill",
        "s3://uploads/photos/",
        "--suffix",
        ".jpg,.png",
        "--dry-run",
    ]);
    assert!(
        stdout
            .contains("25000 objects listed under s3://uploads/photos/, 18750 match (18750 bytes)"),
        "{stdout}"
    );
    assert!(stack.input_ends().values().all(|n| *n == 0));

    // Interrupted at about half.
    let child = backfill(
        &stack,
        &[
            "s3://uploads/photos/",
            "--suffix",
            ".jpg,.png",
            "--rate",
            "3000",
            "--checkpoint",
            checkpoint_arg,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let end = Instant::now() + 2 * MINUTE;
    while stack.input_ends().values().sum::<i64>() < 9_000 {
        assert!(Instant::now() < end, "the backfill did not get to half");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("continue with --resume"), "{stderr}");
    let at_interrupt: i64 = stack.input_ends().values().sum();
    assert!(at_interrupt < wanted.len() as i64, "{at_interrupt}");

    let start = Instant::now();
    let resume = [
        "backfill",
        "s3://uploads/photos/",
        "--suffix",
        ".jpg,.png",
        "--resume",
        "--checkpoint",
        checkpoint_arg,
    ];
    let stdout = stack.tool(&resume);
    eprintln!(
        "backfill: interrupted at {at_interrupt} events; resumed: {} ({:?})",
        stdout.trim(),
        start.elapsed()
    );

    // Every image once, at most one page (1,000 listed) twice; nothing else.
    let got = events_per_object(&stack).await;
    let missing: Vec<&String> = wanted.iter().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(got.len(), wanted.len(), "events for objects not wanted");
    let twice = got.values().filter(|n| **n > 1).count();
    assert!(got.values().all(|n| *n <= 2));
    assert!(twice <= 1000, "{twice} events twice");
    eprintln!("backfill: {} objects, {twice} produced twice", got.len());

    // Complete: resuming again does nothing.
    let again = stack.tool(&resume);
    assert!(again.contains("nothing to do"), "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backfilled_images_are_classified_and_marked_and_since_filters() {
    let stack = Stack::start(Faults::default()).await;
    // Ten images before a moment, ten after; events for none of them.
    let before = upload(&stack, 10, "early", |_| 0.98).await;
    let listed = stack
        .s3
        .list_objects_v2()
        .bucket("uploads")
        .prefix("early/")
        .send()
        .await
        .unwrap();
    let last = listed
        .contents()
        .iter()
        .filter_map(|o| o.last_modified())
        .max()
        .map(|t| std::time::SystemTime::try_from(*t).unwrap())
        .unwrap();
    // S3 keeps times to the second: the next images come a second later.
    let since = last + Duration::from_secs(1);
    while std::time::SystemTime::now() < since + Duration::from_millis(100) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = upload(&stack, 10, "late", |_| 0.98).await;
    assert_eq!((before.len(), after.len()), (10, 10));
    let since = humantime::format_rfc3339_seconds(since).to_string();

    let service = stack.service(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.json");
    let stdout = stack.tool(&[
        "backfill",
        "s3://uploads/",
        "--since",
        &since,
        "--checkpoint",
        checkpoint.to_str().unwrap(),
    ]);
    assert!(
        stdout.contains("20 objects listed") && stdout.contains("10 events produced"),
        "{stdout}"
    );
    let mut out = stack.collector();
    out.until("10 predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= 10
    })
    .await;
    let predictions = predictions_by_id(&out.records);
    assert_eq!(predictions.len(), 10, "{}", summary(&out.records));
    for (id, p) in &predictions {
        assert!(id.starts_with("uploads/late/"), "{id}");
        assert_eq!(p[0].value["backfill"], true, "{}", p[0].value);
    }
    // A live upload's prediction says false.
    let live = upload(&stack, 1, "live", |_| 0.98).await;
    stack.produce(&live).await;
    out.until("the live one", MINUTE, |r| predictions_by_id(r).len() >= 11)
        .await;
    let live_one = out
        .records
        .iter()
        .find(|r| {
            r.value["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("live/"))
        })
        .unwrap();
    assert_eq!(live_one.value["backfill"], false);
    drop(service);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_redriven_after_the_objects_came_are_classified_once() {
    let stack = Stack::start(Faults::default()).await;
    // Ten uploads announced before their objects are there.
    let events = upload(&stack, 10, "later", |_| 0.98).await;
    let mut bodies = Vec::new();
    for (id, _) in &events {
        let key = id.strip_prefix("uploads/").unwrap();
        let body = stack.get_object("uploads", key).await;
        stack
            .s3
            .delete_object()
            .bucket("uploads")
            .key(key)
            .send()
            .await
            .unwrap();
        bodies.push((key.to_string(), body));
    }
    // Three of them announced in one message: each one's dead letter
    // carries the whole message, and each must go back alone.
    let mut records = Vec::new();
    for (_, payload) in &events[..3] {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        records.push(v["Records"][0].clone());
    }
    let three = serde_json::json!({ "Records": records })
        .to_string()
        .into_bytes();
    let mut events: Vec<(String, Vec<u8>)> = events[3..].to_vec();
    events.push(("three".into(), three));
    // And one that is not an image.
    let etag = stack
        .put_object("uploads", "junk.png", b"not an image".to_vec())
        .await;
    let mut all = events.clone();
    all.push((
        "uploads/junk.png".into(),
        event(Shape::S3, "uploads", "junk.png", 12, &etag),
    ));
    let service = stack.service(&[]).await;
    stack.produce(&all).await;
    let mut out = stack.collector();
    out.until("11 dead letters", MINUTE, |r| {
        r.iter().filter(|o| o.topic == DEAD).count() >= 11
    })
    .await;
    assert_eq!(
        out.on(DEAD)
            .iter()
            .filter(|d| d.value["reason"] == "object_not_found")
            .count(),
        10
    );
    // The objects come.
    for (key, body) in bodies {
        stack.put_object("uploads", &key, body).await;
    }
    let dry = stack.tool(&["redrive", "--reason", "object_not_found", "--dry-run"]);
    assert!(dry.contains("dry run: 10 dead letters redriven"), "{dry}");
    let first = stack.tool(&["redrive", "--reason", "object_not_found"]);
    assert!(
        first.contains("10 dead letters redriven to s3-events (3 as upload events made anew)"),
        "{first}"
    );
    out.until("10 predictions", MINUTE, |r| {
        predictions_by_id(r).len() >= 10
    })
    .await;
    // Again: nothing more; the other reason is still there for later.
    let again = stack.tool(&["redrive", "--reason", "object_not_found"]);
    assert!(again.contains("0 dead letters redriven"), "{again}");
    let other = stack.tool(&["redrive", "--reason", "not_an_image", "--dry-run"]);
    assert!(
        other.contains("dry run: 1 dead letters redriven"),
        "{other}"
    );
    stack.wait_committed_to_end(MINUTE).await;
    out.settle(Duration::from_millis(500)).await;
    let predictions = predictions_by_id(&out.records);
    assert_eq!(predictions.len(), 10);
    assert!(
        predictions.values().all(|p| p.len() == 1),
        "{}",
        summary(&out.records)
    );
    let bad = backfill_like(&stack, &["redrive", "--reason", "no_such_reason"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("\"no_such_reason\" is not a dead-letter reason"),
        "{bad:?}"
    );
    drop(service);
}

/// A dead letter of `reason` for `key`, as the service writes them.
fn dead_letter(reason: DeadLetterReason, key: &str, offset: i64) -> (String, Vec<u8>) {
    dead_letter_of(INPUT, reason, key, offset)
}

/// A dead letter of a message on `topic`.
fn dead_letter_of(
    topic: &str,
    reason: DeadLetterReason,
    key: &str,
    offset: i64,
) -> (String, Vec<u8>) {
    let payload = event(Shape::S3, "uploads", key, 3, "abc");
    let d = DeadLetter::new(
        reason,
        "made by the test",
        Some("uploads".into()),
        Some(key.into()),
        &Payload::new(payload.into(), 65_536),
        SourceRef {
            topic: topic.into(),
            partition: 0,
            offset,
        },
    );
    (format!("uploads/{key}"), serde_json::to_vec(&d).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_larger_than_the_producer_queue_sends_everything_once() {
    let stack = Stack::start(Faults::default()).await;
    let mut letters: Vec<(String, Vec<u8>)> = (0..1_000)
        .map(|i| dead_letter(DeadLetterReason::FetchFailed, &format!("q/{i:04}.png"), i))
        .collect();
    letters.push(dead_letter(
        DeadLetterReason::AlertFailed,
        "alert.png",
        1_000,
    ));
    letters.push(("junk".into(), b"not a dead letter".to_vec()));
    stack.produce_to(DEAD, &letters).await;
    // A producer queue of 10 messages: the redrive must wait for Kafka,
    // not fail.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small-queue.toml");
    std::fs::write(
        &config,
        "[kafka.producer_properties]\n\"queue.buffering.max.messages\" = \"10\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    // No --reason: the default reasons, and never alert_failed.
    let out = stack.tool(&["--config", config, "redrive"]);
    assert!(
        out.contains(
            "1000 dead letters redriven to s3-events (0 as upload events made anew), 0 skipped"
        ),
        "{out}"
    );
    assert!(
        out.contains("1 records on inferstream-dead-letter are not dead letters"),
        "{out}"
    );
    let sent = stack.read_topic(INPUT).await;
    let mut keys: Vec<String> = sent.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((sent.len(), keys.len()), (1_000, 1_000));
    assert!(!keys.contains(&"uploads/alert.png".to_string()));
    // Nothing twice on a second run.
    let again = stack.tool(&["--config", config, "redrive"]);
    assert!(again.contains("0 dead letters redriven"), "{again}");
    assert_eq!(stack.read_topic(INPUT).await.len(), 1_000);
    let future = backfill_like(&stack, &["redrive", "--since", "2099-01-01T00:00:00Z"]);
    assert_eq!(future.status.code(), Some(2), "{future:?}");
    assert!(
        String::from_utf8_lossy(&future.stderr).contains("is in the future"),
        "{future:?}"
    );
    let refused = backfill_like(&stack, &["redrive", "--reason", "alert_failed"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not an upload event"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_keeps_odd_keys_and_refuses_what_would_leave_a_gap() {
    let stack = Stack::start(Faults::default()).await;
    let keys = [
        "odd/a b+c.png",
        "odd/ünï cödé.jpg",
        "odd/100%.png",
        "odd/x.gif",
    ];
    for k in keys {
        stack.put_object("uploads", k, b"x".to_vec()).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.json");
    let cp = checkpoint.to_str().unwrap();
    // A checkpoint of an unfinished backfill (as an interruption leaves).
    std::fs::write(
        &checkpoint,
        serde_json::json!({
            "bucket": "uploads", "prefix": "odd/", "last_key": "odd/a b+c.png",
            "filters": {"since": null, "until": null, "suffixes": [".png"]},
            "listed": 1, "produced": 1, "complete": false
        })
        .to_string(),
    )
    .unwrap();
    let fresh = backfill(&stack, &["s3://uploads/odd/", "--checkpoint", cp])
        .output()
        .unwrap();
    assert_eq!(fresh.status.code(), Some(1), "{fresh:?}");
    assert!(
        String::from_utf8_lossy(&fresh.stderr).contains("continue it with --resume"),
        "{fresh:?}"
    );
    let other_filters = backfill(
        &stack,
        &["s3://uploads/odd/", "--resume", "--checkpoint", cp],
    )
    .output()
    .unwrap();
    assert_eq!(other_filters.status.code(), Some(1), "{other_filters:?}");
    assert!(
        String::from_utf8_lossy(&other_filters.stderr).contains("other filters"),
        "{other_filters:?}"
    );
    let zero = backfill(&stack, &["s3://uploads/odd/", "--rate", "0"])
        .output()
        .unwrap();
    assert_eq!(zero.status.code(), Some(2), "{zero:?}");
    assert!(stack.input_ends().values().all(|n| *n == 0));

    // A complete checkpoint of an earlier run; this run fails before its
    // first page (S3 does not answer). Its --resume must start over, not
    // find the old run complete.
    std::fs::write(
        &checkpoint,
        serde_json::json!({
            "bucket": "uploads", "prefix": "odd/", "last_key": "odd/x.gif",
            "filters": {"since": null, "until": null, "suffixes": []},
            "listed": 4, "produced": 4, "complete": true
        })
        .to_string(),
    )
    .unwrap();
    let dead_port = free_port().to_string();
    let no_s3 = || {
        backfill(&stack, &["s3://uploads/odd/", "--checkpoint", cp])
            .env(
                "INFERSTREAM__AWS__S3__ENDPOINT_URL",
                format!("http://127.0.0.1:{dead_port}"),
            )
            .output()
            .unwrap()
    };
    let failed = no_s3();
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("continue with --resume"),
        "{failed:?}"
    );
    // Its checkpoint has no page done: a fresh run may start over (it
    // fails on S3 again, not on the checkpoint).
    let fresh_again = no_s3();
    let stderr = String::from_utf8_lossy(&fresh_again.stderr);
    assert!(!stderr.contains("holds an unfinished backfill"), "{stderr}");
    assert!(stderr.contains("continue with --resume"), "{stderr}");
    // Not so one of another prefix: it is not this backfill's to drop.
    let elsewhere = std::fs::read_to_string(&checkpoint)
        .unwrap()
        .replace("\"odd/\"", "\"elsewhere/\"");
    std::fs::write(&checkpoint, &elsewhere).unwrap();
    let other = no_s3();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("holds an unfinished backfill of s3://uploads/elsewhere/"),
        "{stderr}"
    );
    std::fs::write(&checkpoint, elsewhere.replace("\"elsewhere/\"", "\"odd/\"")).unwrap();
    // The producer's queue holds 10 events, a page has 36: it waits.
    let dir2 = tempfile::tempdir().unwrap();
    let small = dir2.path().join("small-queue.toml");
    std::fs::write(
        &small,
        "[kafka.producer_properties]\n\"queue.buffering.max.messages\" = \"10\"\n",
    )
    .unwrap();
    let many: Vec<String> = (0..32).map(|i| format!("odd/many/{i:02}.png")).collect();
    for k in &many {
        stack.put_object("uploads", k, b"x".to_vec()).await;
    }
    let out = stack.tool(&[
        "--config",
        small.to_str().unwrap(),
        "backfill",
        "s3://uploads/odd/",
        "--resume",
        "--checkpoint",
        cp,
    ]);
    assert!(out.contains("36 events produced"), "{out}");
    let filter = inferstream::Config::from_toml_str("[alerts]\nenabled = false\n")
        .unwrap()
        .filter;
    let mut announced = Vec::new();
    for r in stack.read_topic(INPUT).await {
        let payload = serde_json::to_vec(&r.value).unwrap();
        for o in inferstream::pipeline::decode::decode(Some(&payload), &filter) {
            match o {
                inferstream::pipeline::decode::Outcome::Image(img) => {
                    assert_eq!(
                        img.etag.as_deref(),
                        Some(img.etag.as_deref().unwrap().trim_matches('"'))
                    );
                    announced.push(img.key)
                }
                other => panic!("{other:?}"),
            }
        }
    }
    announced.sort();
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).chain(many).collect();
    want.sort();
    assert_eq!(announced, want);
}

/// A redrive's consumer group of `reason`.
fn redrive_group(stack: &Stack, reason: &str) -> String {
    format!("{}-redrive-{reason}", stack.group)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_sees_a_topic_made_anew_and_what_retention_deleted() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let stack = Stack::start(Faults::default()).await;
    let brokers = stack.kafka.bootstrap_servers();
    // As after the dead-letter topic was deleted and made anew: two reasons
    // had redriven partition 0 to 800, and it is empty now.
    for r in ["object_not_found", "fetch_failed"] {
        commit_on(&brokers, &redrive_group(&stack, r), DEAD, &[(0, 800)]);
    }
    // A redrive of one reason, with nothing to send, records the reset for
    // every reason.
    let first = stack.tool(&["redrive", "--reason", "object_not_found"]);
    assert!(first.contains("0 dead letters redriven"), "{first}");
    for r in ["object_not_found", "fetch_failed"] {
        let now = committed_on(&brokers, &redrive_group(&stack, r), DEAD);
        assert_eq!(now.get(&0), Some(&0), "{r}: {now:?}");
    }
    // The new topic grows past the old offsets: none of it was redriven.
    let letters: Vec<(String, Vec<u8>)> = (0..1_000)
        .map(|i| {
            let reason = if i % 2 == 0 {
                DeadLetterReason::ObjectNotFound
            } else {
                DeadLetterReason::FetchFailed
            };
            dead_letter(reason, &format!("anew/{i:04}.png"), i)
        })
        .collect();
    stack.produce_to_partition(DEAD, 0, &letters).await;
    let second = stack.tool(&["redrive"]);
    assert!(
        second.contains("1000 dead letters redriven to s3-events"),
        "{second}"
    );

    // Retention: the mock cluster keeps about 5 MiB of each partition.
    // Five dead letters, then 8 MB of other records that push them out,
    // then five more.
    let lost: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            dead_letter(
                DeadLetterReason::ObjectNotFound,
                &format!("lost/{i}.png"),
                i,
            )
        })
        .collect();
    stack.produce_to_partition(DEAD, 1, &lost).await;
    let junk: Vec<(String, Vec<u8>)> = (0..80)
        .map(|i| (format!("junk{i}"), vec![b'x'; 100_000]))
        .collect();
    stack.produce_to_partition(DEAD, 1, &junk).await;
    let kept: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            dead_letter(
                DeadLetterReason::ObjectNotFound,
                &format!("kept/{i}.png"),
                i,
            )
        })
        .collect();
    stack.produce_to_partition(DEAD, 1, &kept).await;
    let (low, high) = stack.watermarks(DEAD)[&1];
    assert!(low >= 5 && high == 90, "retention left {low}..{high}");
    // The first fetch answers that its offset is gone, as when retention
    // deletes records while a redrive reads: it goes on from the oldest
    // record kept, and counts what it could not read once.
    stack.kafka.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    let third = stack.tool(&["redrive", "--reason", "object_not_found"]);
    assert!(third.contains("5 dead letters redriven"), "{third}");
    assert!(
        third.contains(&format!(
            "{low} records on inferstream-dead-letter were deleted by retention"
        )),
        "{third}"
    );
    assert!(
        third.contains(&format!(
            "{} records on inferstream-dead-letter are not dead letters",
            85 - low
        )),
        "{third}"
    );
    let fourth = stack.tool(&["redrive", "--reason", "object_not_found"]);
    assert!(fourth.contains("0 dead letters redriven"), "{fourth}");
    assert!(!fourth.contains("deleted by retention"), "{fourth}");
    let sent = stack.read_topic(INPUT).await;
    let mut keys: Vec<String> = sent.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((sent.len(), keys.len()), (1_005, 1_005));
    assert!(keys.iter().all(|k| !k.starts_with("uploads/lost/")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_stopped_by_an_error_keeps_what_kafka_confirmed() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let stack = Stack::start(Faults::default()).await;
    // An input topic of one partition: the sends go in the dead letters'
    // order, so the first that Kafka fails is the first not recorded.
    let single = "single-input";
    stack.kafka.create_topic(single, 1, 1).unwrap();
    let brokers = stack.kafka.bootstrap_servers();
    let key = |i: i64| format!("r/{i:04}.png");
    let letters: Vec<(String, Vec<u8>)> = (0..1_000)
        .map(|i| dead_letter_of(single, DeadLetterReason::FetchFailed, &key(i), i))
        .collect();
    // Batches of 50, so that a fetch of one byte gets 50 at most.
    for chunk in letters.chunks(50) {
        stack.produce_to_partition(DEAD, 0, chunk).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small-batches.toml");
    std::fs::write(
        &config,
        "[kafka]\ninput_topic = \"single-input\"\n\
         [kafka.consumer_properties]\n\"max.partition.fetch.bytes\" = \"1024\"\n\
         [kafka.producer_properties]\n\"batch.num.messages\" = \"50\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let fetch_errors = |errors: &[RDKafkaRespErr]| {
        stack.kafka.request_errors(RDKafkaApiKey::Fetch, errors);
    };
    use RDKafkaRespErr::*;

    // An error librdkafka retries (a broker failing a fetch once) does not
    // end a run.
    fetch_errors(&[RD_KAFKA_RESP_ERR_NO_ERROR, RD_KAFKA_RESP_ERR_UNKNOWN]);
    let dry = stack.tool(&["--config", config, "redrive", "--dry-run"]);
    assert!(dry.contains("dry run: 1000 dead letters redriven"), "{dry}");

    // Two fetches answer, the third is refused for good: reading stops
    // part way, and what Kafka confirmed is recorded.
    fetch_errors(&[
        RD_KAFKA_RESP_ERR_NO_ERROR,
        RD_KAFKA_RESP_ERR_NO_ERROR,
        RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    ]);
    let stopped = backfill_like(&stack, &["--config", config, "redrive"]);
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(1), "{stopped:?}");
    assert!(
        stderr.contains("reading inferstream-dead-letter"),
        "{stderr}"
    );
    assert!(
        stderr.contains("handled before it are recorded"),
        "{stderr}"
    );
    let sent = stack.read_topic(single).await.len() as i64;
    assert!(sent > 0 && sent < 1_000, "{sent} sent before the error");
    let recorded = || {
        committed_on(&brokers, &redrive_group(&stack, "fetch_failed"), DEAD)
            .get(&0)
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(recorded(), sent);
    stack.kafka.clear_request_errors(RDKafkaApiKey::Fetch);

    // Kafka takes the first request of sends and fails the rest: the run
    // fails, and records up to the first dead letter whose message was
    // not taken.
    let mut produce = vec![RD_KAFKA_RESP_ERR_NO_ERROR];
    produce.extend([RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 500]);
    stack.kafka.request_errors(RDKafkaApiKey::Produce, &produce);
    let refused = backfill_like(&stack, &["--config", config, "redrive"]);
    stack.kafka.clear_request_errors(RDKafkaApiKey::Produce);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        stderr.contains("Kafka did not take the message"),
        "{stderr}"
    );
    assert!(
        stderr.contains("what Kafka confirmed before it is recorded"),
        "{stderr}"
    );
    let now = recorded();
    let on_input: std::collections::HashSet<String> = stack
        .read_topic(single)
        .await
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert!(
        now > sent && now < 1_000,
        "recorded {now}, {sent} before; on input {}: {stderr}",
        on_input.len()
    );
    for i in 0..now {
        assert!(
            on_input.contains(&format!("uploads/{}", key(i))),
            "{i} recorded, never sent"
        );
    }

    // The next run sends the rest: every dead letter is on the input topic.
    let rest = stack.tool(&["--config", config, "redrive"]);
    assert!(rest.contains("dead letters redriven"), "{rest}");
    assert_eq!(recorded(), 1_000);
    let all = stack.read_topic(single).await;
    let keys: std::collections::HashSet<String> = all.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 1_000);
}
