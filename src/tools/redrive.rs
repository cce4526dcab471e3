//! `inferstream redrive`: the dead letters of chosen reasons, back to the
//! input topic (like SQS's dead-letter redrive), once each.
//!
//! Each reason remembers what was redriven in a consumer group of its own
//! on the dead-letter topic (`<kafka.group_id>-redrive-<reason>`): a dead
//! letter of reason R is redriven when its offset is at or past R's
//! committed offset. Every 5,000 messages sent, and at the end, the sends
//! are confirmed by Kafka and then each chosen reason's offsets move past
//! what was read. A crash or Ctrl-C between the two redrives at most those
//! 5,000 again on the next run (duplicates, never losses).
//!
//! A dead letter of one image from a message that announced several sends
//! only that image's record, so the images of the message that succeeded
//! are not classified again.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::pipeline::decode::{decode, Outcome};
use crate::record::{DeadLetter, DeadLetterReason};
use crate::tools::events::{announce, Announced};

/// Redriven when `--reason` is not given: failures a later try can cure
/// without a change to the service or its configuration.
pub const DEFAULT_REASONS: [DeadLetterReason; 4] = [
    DeadLetterReason::ObjectNotFound,
    DeadLetterReason::FetchFailed,
    DeadLetterReason::EndpointUnavailable,
    DeadLetterReason::BadEndpointResponse,
];

/// Sends confirmed and offsets committed after this many, or this many
/// bytes sent.
const CHUNK: usize = 5_000;
const CHUNK_BYTES: usize = 32 << 20;

/// What to redrive.
#[derive(Debug, Clone)]
pub struct Options {
    /// Reasons (names as in dead letters); empty: [`DEFAULT_REASONS`].
    pub reasons: Vec<String>,
    /// Only dead letters that failed at or after this time.
    pub since: Option<SystemTime>,
    pub dry_run: bool,
}

/// What happened to the dead letters read, per reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Sent back to the input topic as they were.
    pub redriven: u64,
    /// Sent as an upload event made anew: the image's own record out of
    /// a message of several, or (the payload cut) from bucket/key.
    pub rebuilt: u64,
    /// Cut and without bucket/key, older than --since, or not from the
    /// input topic: not redriven.
    pub skipped: u64,
    /// Redriven before (below the reason's committed offset).
    pub done_before: u64,
}

/// How a dead letter's message goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// The original message, whole.
    AsItWas,
    /// An upload event of its image alone.
    Rebuilt,
}

/// The message to send back for a dead letter, if there is one: the
/// original message; or, when the dead letter is about one image of a
/// message that announced several, or the payload was cut short, an upload
/// event of that image alone (with the version, eTag and size the
/// original announced, when it can be read).
pub fn original(d: &DeadLetter, filter: &crate::config::FilterConfig) -> Option<(Vec<u8>, Resend)> {
    let image = d.bucket.as_deref().zip(d.key.as_deref());
    if !d.payload_truncated {
        let bytes = if d.payload_encoding == "base64" {
            base64::engine::general_purpose::STANDARD
                .decode(&d.payload)
                .ok()
        } else {
            Some(d.payload.clone().into_bytes())
        };
        if let Some(bytes) = bytes {
            let Some((bucket, key)) = image else {
                return Some((bytes, Resend::AsItWas));
            };
            let outcomes = decode(Some(&bytes), filter);
            if outcomes.len() <= 1 {
                return Some((bytes, Resend::AsItWas));
            }
            let mine = outcomes.iter().find_map(|o| match o {
                Outcome::Image(i) if i.bucket == bucket && i.key == key => Some(i),
                _ => None,
            });
            if let Some(img) = mine {
                let payload = announce(&Announced {
                    bucket,
                    key,
                    size: img.size,
                    etag: img.etag.as_deref(),
                    version_id: img.version_id.as_deref(),
                    time: img.event_time.as_deref().unwrap_or(&d.failed_at),
                    configuration_id: REDRIVE_CONFIGURATION_ID,
                });
                return Some((payload, Resend::Rebuilt));
            }
        }
    }
    let (bucket, key) = image?;
    let payload = announce(&Announced {
        bucket,
        key,
        size: None,
        etag: None,
        version_id: None,
        time: &d.failed_at,
        configuration_id: REDRIVE_CONFIGURATION_ID,
    });
    Some((payload, Resend::Rebuilt))
}

/// The `configurationId` of the upload events redrive makes anew.
pub const REDRIVE_CONFIGURATION_ID: &str = "inferstream-redrive";

/// `inferstream redrive`.
pub async fn command(path: Option<&Path>, opts: Options) -> ExitCode {
    let cfg = match crate::tools::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        let opts = opts.clone();
        move || reasons_and_groups(&cfg, &opts)
    })
    .await;
    let prepared = match result {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&cfg, &opts, prepared).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Per chosen reason, its group's committed offsets; the dead-letter
/// topic's end offsets now.
struct Prepared {
    reasons: Vec<String>,
    committed: BTreeMap<String, BTreeMap<i32, i64>>,
    /// The oldest offset retention has kept, per partition.
    starts: BTreeMap<i32, i64>,
    ends: BTreeMap<i32, i64>,
}

fn group_of(cfg: &crate::Config, reason: &str) -> String {
    format!("{}-redrive-{reason}", cfg.kafka.group_id)
}

/// The reasons to redrive: `--reason`'s, or [`DEFAULT_REASONS`].
pub fn chosen_reasons(asked: &[String]) -> Result<Vec<String>, String> {
    if asked.is_empty() {
        return Ok(DEFAULT_REASONS
            .iter()
            .map(|r| r.as_str().to_string())
            .collect());
    }
    let known: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
    let mut out: Vec<String> = Vec::new();
    for r in asked {
        if r == DeadLetterReason::AlertFailed.as_str() {
            return Err(format!(
                "--reason {r}: those dead letters hold a prediction whose SNS alert failed, not an upload event; the prediction itself is on the review topic"
            ));
        }
        if r == DeadLetterReason::BadReviewRecord.as_str() {
            return Err(format!(
                "--reason {r}: those records came from the review topic, not the input topic, and cannot be redriven"
            ));
        }
        if !known.contains(&r.as_str()) {
            return Err(format!(
                "--reason {r:?} is not a dead-letter reason; the reasons: {}",
                known.join(", ")
            ));
        }
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    Ok(out)
}

/// Where any reason's committed offset is past a partition's end, the
/// topic was made anew (or its offsets reset) and what it holds now was
/// never read: every reason starts that partition again from 0.
fn clamp_to_ends(
    committed: &mut BTreeMap<String, BTreeMap<i32, i64>>,
    ends: &BTreeMap<i32, i64>,
    topic: &str,
) {
    for (p, end) in ends {
        let past: Vec<(String, i64)> = committed
            .iter()
            .filter_map(|(r, o)| o.get(p).filter(|n| **n > *end).map(|n| (r.clone(), *n)))
            .collect();
        if past.is_empty() {
            continue;
        }
        tracing::warn!(
            "{topic} partition {p} ends at {end}, but {past:?} had been redriven past it: the topic was made anew; reading that partition from its start for every reason"
        );
        for offsets in committed.values_mut() {
            offsets.insert(*p, 0);
        }
    }
}

fn reasons_and_groups(cfg: &crate::Config, opts: &Options) -> Result<Prepared, String> {
    let reasons = chosen_reasons(&opts.reasons)?;
    if let Some(since) = opts.since {
        if since > SystemTime::now() {
            return Err(format!(
                "--since {} is in the future: every dead letter of the chosen reasons would be marked handled",
                humantime::format_rfc3339(since)
            ));
        }
    }
    let topic = &cfg.kafka.dead_letter_topic;
    let probe: BaseConsumer = crate::clients::kafka::state_reader_config(&cfg.kafka, "redrive")
        .create()
        .map_err(|e| format!("creating a Kafka consumer (check kafka.brokers): {e}"))?;
    let partitions =
        crate::clients::kafka::partition_count(&probe, topic, "kafka.dead_letter_topic")?;
    let mut ends = BTreeMap::new();
    let mut starts = BTreeMap::new();
    for p in 0..partitions as i32 {
        let (low, high) = probe
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| format!("the end of {topic} partition {p}: {e}"))?;
        ends.insert(p, high);
        starts.insert(p, low);
    }
    let mut committed = BTreeMap::new();
    for r in &reasons {
        let c: BaseConsumer = group_consumer(cfg, &group_of(cfg, r))?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition(topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| format!("what reason {r} redrove before: {e}"))?;
        let offsets = got
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(n) => (e.partition(), n),
                _ => (e.partition(), 0),
            })
            .collect();
        committed.insert(r.clone(), offsets);
    }
    clamp_to_ends(&mut committed, &ends, topic);
    Ok(Prepared {
        reasons,
        committed,
        starts,
        ends,
    })
}

fn group_consumer<C: rdkafka::config::FromClientConfig>(
    cfg: &crate::Config,
    group: &str,
) -> Result<C, String> {
    let mut c = crate::clients::kafka::state_reader_config(&cfg.kafka, group);
    // state_reader_config names the group `<id>-state`: this one is exact.
    // Dead letters past retention are counted, never skipped to the end.
    c.set("group.id", group)
        .set("auto.offset.reset", "earliest");
    c.create()
        .map_err(|e| format!("creating a Kafka consumer (check kafka.brokers): {e}"))
}

/// Sends waiting for Kafka's confirmation, and how far each partition has
/// been handled (read, and sent or skipped): what may be committed once
/// the sends are confirmed.
struct Pending {
    sends: Vec<DeliveryFuture>,
    handled_to: BTreeMap<i32, i64>,
}

/// Waits for every pending send, then moves each reason's offsets up to
/// what was handled (never back).
async fn settle(
    pending: &mut Pending,
    committers: &Arc<Vec<(String, BaseConsumer)>>,
    committed: &mut BTreeMap<String, BTreeMap<i32, i64>>,
    topic: &str,
) -> Result<(), String> {
    for s in pending.sends.drain(..) {
        match s.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(format!("Kafka did not take a message: {e}; what was sent since the last confirmed batch is not marked redriven, so running it again sends that again")),
            Err(_) => return Err("the Kafka producer went away; what was sent since the last confirmed batch is not marked redriven".into()),
        }
    }
    let mut moves: Vec<(usize, TopicPartitionList)> = Vec::new();
    for (i, (reason, _)) in committers.iter().enumerate() {
        let mut tpl = TopicPartitionList::new();
        let mine = committed.entry(reason.clone()).or_default();
        for (p, to) in &pending.handled_to {
            if mine.get(p).copied().unwrap_or(0) < *to {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*to))
                    .map_err(|e| e.to_string())?;
                mine.insert(*p, *to);
            }
        }
        if tpl.count() > 0 {
            moves.push((i, tpl));
        }
    }
    if moves.is_empty() {
        return Ok(());
    }
    let committers = committers.clone();
    let commit = tokio::task::spawn_blocking(move || -> Result<(), String> {
        for (i, tpl) in moves {
            let (reason, c) = &committers[i];
            c.commit(&tpl, rdkafka::consumer::CommitMode::Sync).map_err(|e| {
                format!("recording what reason {reason} redrove: {e}; running it again sends those again")
            })?;
        }
        Ok(())
    });
    match tokio::time::timeout(Duration::from_secs(60), commit).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("recording what was redriven: Kafka did not answer within 60 s; running it again sends the last batch again".into()),
    }
}

async fn run(cfg: &crate::Config, opts: &Options, prep: Prepared) -> Result<(), String> {
    let topic = cfg.kafka.dead_letter_topic.clone();
    let mut committed = prep.committed.clone();
    // Read from the lowest offset any chosen reason has not redriven.
    let mut from: BTreeMap<i32, i64> = BTreeMap::new();
    for offsets in committed.values() {
        for (p, n) in offsets {
            let e = from.entry(*p).or_insert(*n);
            *e = (*e).min(*n);
        }
    }
    let reader: StreamConsumer =
        group_consumer(cfg, &format!("{}-redrive-reader", cfg.kafka.group_id))?;
    let mut tpl = TopicPartitionList::new();
    let mut total = 0;
    let mut expired = 0;
    for (p, end) in &prep.ends {
        let wanted = from.get(p).copied().unwrap_or(0);
        let kept = prep.starts.get(p).copied().unwrap_or(0);
        if wanted < kept {
            // Deleted by retention before any redrive read them.
            expired += kept.min(*end) - wanted;
        }
        let start = wanted.max(kept);
        if start < *end {
            tpl.add_partition_offset(&topic, *p, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
            total += end - start;
        }
    }
    let producer = crate::tools::producer_unless(opts.dry_run, cfg)?;
    let committers: Arc<Vec<(String, BaseConsumer)>> = Arc::new(if opts.dry_run {
        Vec::new()
    } else {
        prep.reasons
            .iter()
            .map(|r| Ok((r.clone(), group_consumer(cfg, &group_of(cfg, r))?)))
            .collect::<Result<_, String>>()?
    });
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    // Records that are not dead letters: how many, and where the first are.
    let mut unreadable = 0u64;
    let mut unreadable_at: Vec<(i32, i64)> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut pending = Pending {
        sends: Vec::new(),
        handled_to: BTreeMap::new(),
    };
    if tpl.count() > 0 {
        reader.assign(&tpl).map_err(|e| e.to_string())?;
    }
    let mut unread: BTreeMap<i32, i64> = tpl
        .elements()
        .iter()
        .map(|e| (e.partition(), prep.ends[&e.partition()]))
        .collect();
    let mut progress = crate::tools::Progress::new("redrive");
    let mut read = 0u64;
    let mut sent = 0u64;
    while !unread.is_empty() {
        let m = match tokio::time::timeout(Duration::from_secs(30), reader.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                unread.remove(&p);
                continue;
            }
            Ok(Err(e)) => return Err(format!("reading {topic}: {e}")),
            Err(_) => return Err(format!("reading {topic}: nothing came for 30 s")),
        };
        let (p, offset) = (m.partition(), m.offset());
        if offset + 1 >= unread.get(&p).copied().unwrap_or(0) {
            unread.remove(&p);
        }
        if offset >= prep.ends[&p] {
            continue;
        }
        read += 1;
        progress.show(|| format!("read {read} of at most {total} dead letters, {sent} sent"));
        let handled = |pending: &mut Pending| {
            pending.handled_to.insert(p, offset + 1);
        };
        let Some(d) = m
            .payload()
            .and_then(|b| serde_json::from_slice::<DeadLetter>(b).ok())
        else {
            unreadable += 1;
            if unreadable_at.len() < 5 {
                unreadable_at.push((p, offset));
            }
            handled(&mut pending);
            continue;
        };
        if !prep.reasons.contains(&d.reason) {
            handled(&mut pending);
            continue;
        }
        let t = tally.entry(d.reason.clone()).or_default();
        if offset < committed[&d.reason].get(&p).copied().unwrap_or(0) {
            t.done_before += 1;
            handled(&mut pending);
            continue;
        }
        let old = opts.since.is_some_and(|since| {
            humantime::parse_rfc3339_weak(&d.failed_at).is_ok_and(|at| at < since)
        });
        let input = d.source.topic == cfg.kafka.input_topic;
        let Some((payload, how)) = original(&d, &cfg.filter).filter(|_| input && !old) else {
            t.skipped += 1;
            handled(&mut pending);
            continue;
        };
        match how {
            Resend::AsItWas => t.redriven += 1,
            Resend::Rebuilt => t.rebuilt += 1,
        }
        if let Some(producer) = &producer {
            let key = d
                .bucket
                .as_ref()
                .zip(d.key.as_ref())
                .map(|(b, k)| format!("{b}/{k}"));
            let mut full_for = 0;
            loop {
                let mut record = FutureRecord::to(&cfg.kafka.input_topic).payload(&payload);
                if let Some(k) = &key {
                    record = record.key(k);
                }
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.sends.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if !pending.sends.is_empty() =>
                    {
                        // Let Kafka catch up, then try again.
                        settle(&mut pending, &committers, &mut committed, &topic).await?;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if full_for < 600 =>
                    {
                        full_for += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err((e, _)) => return Err(format!("Kafka refused a message: {e}")),
                }
            }
            sent += 1;
            pending_bytes += payload.len();
        }
        handled(&mut pending);
        if pending.sends.len() >= CHUNK || pending_bytes >= CHUNK_BYTES {
            settle(&mut pending, &committers, &mut committed, &topic).await?;
            pending_bytes = 0;
        }
    }
    progress.finish();
    if !opts.dry_run {
        // Every chosen reason has now handled everything up to where the
        // reader got (past transaction markers; never past the ends it
        // was to read to).
        if tpl.count() > 0 {
            let at = reader
                .position()
                .map_err(|e| format!("where reading {topic} got: {e}"))?;
            for e in at.elements() {
                if let (Offset::Offset(n), Some(end)) = (e.offset(), prep.ends.get(&e.partition()))
                {
                    let to = pending.handled_to.entry(e.partition()).or_insert(0);
                    *to = (*to).max(n.min(*end));
                }
            }
        }
        settle(&mut pending, &committers, &mut committed, &topic).await?;
    }
    let sum = tally.values().fold(Tally::default(), |a, t| Tally {
        redriven: a.redriven + t.redriven,
        rebuilt: a.rebuilt + t.rebuilt,
        skipped: a.skipped + t.skipped,
        done_before: a.done_before + t.done_before,
    });
    println!(
        "{}{} dead letters redriven to {} ({} as upload events made anew), {} skipped, {} redriven before; reasons: {}",
        if opts.dry_run { "dry run: " } else { "" },
        sum.redriven + sum.rebuilt,
        cfg.kafka.input_topic,
        sum.rebuilt,
        sum.skipped,
        sum.done_before,
        prep.reasons.join(",")
    );
    for (reason, t) in &tally {
        println!(
            "  {reason:<22} redriven {:>6}  made anew {:>6}  skipped {:>6}  before {:>6}",
            t.redriven, t.rebuilt, t.skipped, t.done_before
        );
    }
    if unreadable > 0 {
        let first: Vec<String> = unreadable_at
            .iter()
            .map(|(p, o)| format!("partition {p} offset {o}"))
            .collect();
        println!(
            "  {unreadable} records on {topic} are not dead letters and were passed over (first: {})",
            first.join(", ")
        );
    }
    if expired > 0 {
        println!(
            "  {expired} dead letters were deleted by {topic}'s retention before a redrive read them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::decode::Outcome;
    use crate::record::{Payload, SourceRef};
    use crate::tools::events::{event, Shape};

    fn filter() -> crate::config::FilterConfig {
        crate::Config::from_toml_str("[alerts]\nenabled = false\n")
            .unwrap()
            .filter
    }

    fn letter(key: &str, payload: &[u8], cap: usize) -> DeadLetter {
        DeadLetter::new(
            DeadLetterReason::ObjectNotFound,
            "gone",
            Some("uploads".into()),
            Some(key.into()),
            &Payload::new(payload.to_vec().into(), cap),
            SourceRef {
                topic: "s3-events".into(),
                partition: 0,
                offset: 7,
            },
        )
    }

    fn keys(payload: &[u8]) -> Vec<(String, Option<String>)> {
        crate::pipeline::decode::decode(Some(payload), &filter())
            .into_iter()
            .map(|o| match o {
                Outcome::Image(i) => (i.key, i.version_id),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn one_image_of_a_message_of_several_goes_back_alone_with_its_version() {
        let mut records = Vec::new();
        for (k, v) in [("a b.png", "v1"), ("c+d.png", "v2"), ("e.png", "v3")] {
            let one: serde_json::Value =
                serde_json::from_slice(&event(Shape::S3, "uploads", k, 3, "abc")).unwrap();
            let mut r = one["Records"][0].clone();
            r["s3"]["object"]["versionId"] = serde_json::json!(v);
            records.push(r);
        }
        let whole = serde_json::json!({ "Records": records })
            .to_string()
            .into_bytes();
        let (sent, how) = original(&letter("c+d.png", &whole, 65_536), &filter()).unwrap();
        assert_eq!(how, Resend::Rebuilt);
        assert_eq!(
            keys(&sent),
            vec![("c+d.png".to_string(), Some("v2".to_string()))]
        );
        // A message of one image goes back as it was.
        let single = event(Shape::Sns, "uploads", "a b.png", 3, "abc");
        let (sent, how) = original(&letter("a b.png", &single, 65_536), &filter()).unwrap();
        assert_eq!((sent, how), (single.clone(), Resend::AsItWas));
        // Cut short: made from bucket/key.
        let (sent, how) = original(&letter("a b.png", &single, 40), &filter()).unwrap();
        assert_eq!(how, Resend::Rebuilt);
        assert_eq!(keys(&sent), vec![("a b.png".to_string(), None)]);
    }

    #[test]
    fn a_topic_made_anew_is_read_from_its_start_for_every_reason() {
        let offsets = |a: i64, b: i64| BTreeMap::from([(0, a), (1, b)]);
        let mut committed = BTreeMap::from([
            ("object_not_found".to_string(), offsets(800, 10)),
            ("fetch_failed".to_string(), offsets(300, 20)),
        ]);
        clamp_to_ends(&mut committed, &BTreeMap::from([(0, 500), (1, 30)]), "dl");
        assert_eq!(committed["object_not_found"], offsets(0, 10));
        assert_eq!(committed["fetch_failed"], offsets(0, 20));
    }

    #[test]
    fn reasons_default_to_the_curable_and_refuse_what_is_not_an_upload() {
        assert_eq!(
            chosen_reasons(&[]).unwrap(),
            vec![
                "object_not_found",
                "fetch_failed",
                "endpoint_unavailable",
                "bad_endpoint_response"
            ]
        );
        assert!(chosen_reasons(&["alert_failed".into()]).is_err());
        assert!(chosen_reasons(&["bad_review_record".into()]).is_err());
        // `--reason ""`: refused, not the default.
        assert!(chosen_reasons(&["".into()]).is_err());
        assert!(chosen_reasons(&["nope".into()])
            .unwrap_err()
            .contains("not a dead-letter reason"));
        assert_eq!(
            chosen_reasons(&["not_an_image".into(), "not_an_image".into()]).unwrap(),
            vec!["not_an_image"]
        );
    }
}
