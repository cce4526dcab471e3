//! `inferstream redrive`: the dead letters of chosen reasons, back to the
//! input topic (like SQS's dead-letter redrive), once each.
//!
//! Each reason remembers what was redriven in a consumer group of its own
//! on the dead-letter topic (`<kafka.group_id>-redrive-<reason>`): a dead
//! letter of reason R is redriven when its offset is at or past R's
//! committed offset. Every 5,000 messages sent, and at the end, the sends
//! are confirmed by Kafka and then each chosen reason's offsets move past
//! what was read. A crash or Ctrl-C between the two redrives at most those
//! 5,000 again on the next run (duplicates, never losses). A run stopped
//! by an error records what Kafka confirmed before it.
//!
//! Records retention deleted before they were read (before the run, or
//! while it read: the reader stops at a vanished offset instead of
//! skipping) are counted, once: every chosen reason moves past them.
//!
//! A dead letter of one image from a message that announced several sends
//! only that image's record, so the images of the message that succeeded
//! are not classified again.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
                Outcome::Image(i)
                    if i.bucket == bucket
                        && i.key == key
                        && (d.version_id.is_none() || i.version_id == d.version_id) =>
                {
                    Some(i)
                }
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
        version_id: d.version_id.as_deref(),
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

/// Why dead letters of `reason` can never go back to the input topic.
fn refusal(reason: &str) -> Option<&'static str> {
    if reason == DeadLetterReason::AlertFailed.as_str() {
        Some("those dead letters hold a prediction whose SNS alert failed, not an upload event; the prediction itself is on the review topic")
    } else if reason == DeadLetterReason::BadReviewRecord.as_str() {
        Some(
            "those records came from the review topic, not the input topic, and cannot be redriven",
        )
    } else {
        None
    }
}

/// Every reason whose dead letters a redrive may send.
fn redrivable() -> impl Iterator<Item = &'static str> {
    DeadLetterReason::ALL
        .iter()
        .map(|r| r.as_str())
        .filter(|r| refusal(r).is_none())
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
        if let Some(why) = refusal(r) {
            return Err(format!("--reason {r}: {why}"));
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
/// never read: every reason starts that partition again from 0. Returns
/// the partitions of each reason that moved back.
fn clamp_to_ends(
    committed: &mut BTreeMap<String, BTreeMap<i32, i64>>,
    ends: &BTreeMap<i32, i64>,
    topic: &str,
) -> BTreeMap<String, Vec<i32>> {
    let mut moved: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (p, end) in ends {
        let past: Vec<(String, i64)> = committed
            .iter()
            .filter_map(|(r, o)| o.get(p).filter(|n| **n > *end).map(|n| (r.clone(), *n)))
            .collect();
        if past.is_empty() {
            continue;
        }
        tracing::warn!(
            "{topic} partition {p} ends at {end}, but {past:?} had been redriven past it: the topic was made anew; every reason reads that partition from its start"
        );
        for (reason, offsets) in committed.iter_mut() {
            if let Some(n) = offsets.get_mut(p).filter(|n| **n != 0) {
                *n = 0;
                moved.entry(reason.clone()).or_default().push(*p);
            }
        }
    }
    moved
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
    // Every redrivable reason's offsets, chosen or not: a topic made anew
    // is seen by any of them, and reset for all of them at once.
    let mut committed = BTreeMap::new();
    let mut groups = BTreeMap::new();
    for r in redrivable() {
        let c: BaseConsumer = group_consumer(cfg, &group_of(cfg, r), "earliest")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition(topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| format!("what reason {r} redrove before: {e}"))?;
        let mut offsets = BTreeMap::new();
        for e in got.elements() {
            if let Err(err) = e.error() {
                return Err(format!(
                    "what reason {r} redrove before on {topic} partition {}: {err}",
                    e.partition()
                ));
            }
            // No offset: never redriven.
            if let Offset::Offset(n) = e.offset() {
                offsets.insert(e.partition(), n);
            }
        }
        committed.insert(r.to_string(), offsets);
        groups.insert(r, c);
    }
    // The ends after the offsets: an end only grows, so an offset past it
    // was not committed by a redrive running meanwhile (of other reasons),
    // and the topic was made anew.
    let mut ends = BTreeMap::new();
    let mut starts = BTreeMap::new();
    for p in 0..partitions as i32 {
        let (low, high) = probe
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| format!("the end of {topic} partition {p}: {e}"))?;
        ends.insert(p, high);
        starts.insert(p, low);
    }
    // Recorded at once (in a dry run too): kept only in memory, the old
    // offsets would count the new dead letters below them as redriven once
    // the partition grows past them.
    for (r, moved) in clamp_to_ends(&mut committed, &ends, topic) {
        let mut tpl = TopicPartitionList::new();
        for p in moved {
            tpl.add_partition_offset(topic, p, Offset::Offset(0))
                .map_err(|e| e.to_string())?;
        }
        if let Some(c) = groups.get(r.as_str()) {
            c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
                .map_err(|e| {
                    format!("recording that reason {r} reads {topic} from its start again: {e}")
                })?;
        }
    }
    committed.retain(|r, _| reasons.contains(r));
    for offsets in committed.values_mut() {
        for p in ends.keys() {
            offsets.entry(*p).or_insert(0);
        }
    }
    Ok(Prepared {
        reasons,
        committed,
        starts,
        ends,
    })
}

/// A consumer of the dead-letter topic in `group`, never committing by
/// itself; `reset` is what it does at an offset retention deleted.
fn group_consumer<C: rdkafka::config::FromClientConfig>(
    cfg: &crate::Config,
    group: &str,
    reset: &str,
) -> Result<C, String> {
    let mut c = crate::clients::kafka::state_reader_config(&cfg.kafka, group);
    // Set after kafka.consumer_properties, which cannot change them:
    // state_reader_config names the group `<id>-state` (this one is
    // exact), and the end of each partition must be seen.
    c.set("group.id", group)
        .set("client.id", "inferstream-redrive")
        // The committers are never polled: no statistics to pile up.
        .set("statistics.interval.ms", "0")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", reset);
    c.create()
        .map_err(|e| format!("creating a Kafka consumer (check kafka.brokers): {e}"))
}

/// Sends waiting for Kafka's confirmation, each with the dead letter's
/// partition and offset, and how far each partition has been handled
/// (read, and sent or skipped): what may be committed once the sends are
/// confirmed.
struct Pending {
    sends: Vec<(i32, i64, DeliveryFuture)>,
    bytes: usize,
    handled_to: BTreeMap<i32, i64>,
}

/// Waits for every pending send, then moves each reason's offsets up to
/// what was handled (never back). When Kafka failed a send, each partition
/// moves only up to its first failed dead letter (what Kafka confirmed
/// before it is recorded), and the failure is returned.
async fn settle(
    pending: &mut Pending,
    committers: &Arc<Vec<(String, BaseConsumer)>>,
    committed: &mut BTreeMap<String, BTreeMap<i32, i64>>,
    topic: &str,
) -> Result<(), String> {
    pending.bytes = 0;
    let mut failed: Option<String> = None;
    for (p, offset, s) in pending.sends.drain(..) {
        let why = match s.await {
            Ok(Ok(_)) => continue,
            Ok(Err((e, _))) => format!("Kafka did not take the message of the dead letter at {topic} partition {p} offset {offset}: {e}"),
            Err(_) => "the Kafka producer went away".to_string(),
        };
        // Never past a dead letter whose message Kafka did not take.
        let to = pending.handled_to.entry(p).or_insert(offset);
        *to = (*to).min(offset);
        failed.get_or_insert(why);
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
    let recorded = if moves.is_empty() {
        Ok(())
    } else {
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
    };
    match (failed, recorded) {
        (None, r) => r,
        (Some(f), Ok(())) => Err(format!(
            "{f}; what Kafka confirmed before it is recorded, so running it again goes on from there"
        )),
        (Some(f), Err(r)) => Err(format!("{f}; {r}")),
    }
}

/// Records before `kept` (the oldest retention left) that reading, at
/// `next`, never got to: deleted unread. At most up to `end`.
fn deleted_unread(next: i64, kept: i64, end: i64) -> i64 {
    (kept.min(end) - next).max(0)
}

/// Reads partition `p` alone, from `offset`: an error about an offset
/// then concerns that partition, and is queued behind every record of it
/// fetched before.
fn assign_one(reader: &StreamConsumer, topic: &str, p: i32, offset: i64) -> Result<(), String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(offset))
        .map_err(|e| e.to_string())?;
    reader
        .assign(&tpl)
        .map_err(|e| format!("reading {topic} partition {p}: {e}"))
}

/// After librdkafka stopped reading partition `p` at `next`, an offset no
/// longer there: when retention deleted it, reading goes on from the
/// oldest record kept, and the records skipped are counted. Returns how
/// many.
fn after_reset(
    reader: &StreamConsumer,
    topic: &str,
    p: i32,
    next: &mut i64,
    end: i64,
) -> Result<i64, String> {
    // Blocking, but nothing else of this run waits on the runtime now.
    let (low, high) = reader
        .fetch_watermarks(topic, p, Duration::from_secs(10))
        .map_err(|e| format!("reading {topic} partition {p} after its offsets moved: {e}"))?;
    if high < *next {
        return Err(format!(
            "{topic} partition {p} now ends at {high}, before offset {next} where reading was (the topic was made anew, or a new leader lost records); run it again"
        ));
    }
    let gone = deleted_unread(*next, low, end);
    if gone > 0 {
        tracing::warn!(
            "{topic} partition {p}: retention deleted offsets {next} to {} before they were read",
            *next + gone - 1
        );
        *next += gone;
    }
    if *next < end {
        assign_one(reader, topic, p, *next)?;
    }
    Ok(gone)
}

/// Consumer errors that no retry cures.
fn permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
    )
}

/// How long reading a partition may go without a record before the run
/// gives up (transient errors in between are retried by librdkafka).
const STALL: Duration = Duration::from_secs(60);

async fn run(cfg: &crate::Config, opts: &Options, prep: Prepared) -> Result<(), String> {
    let topic = cfg.kafka.dead_letter_topic.clone();
    let mut committed = prep.committed.clone();
    let mut pending = Pending {
        sends: Vec::new(),
        bytes: 0,
        handled_to: BTreeMap::new(),
    };
    // Per partition to read, where to start: the lowest offset any chosen
    // reason has not redriven, or the oldest retention kept.
    let mut to_read: Vec<(i32, i64)> = Vec::new();
    let mut total = 0;
    let mut expired = 0;
    for (p, end) in &prep.ends {
        let wanted = committed
            .values()
            .map(|o| o.get(p).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        let kept = prep.starts.get(p).copied().unwrap_or(0);
        expired += deleted_unread(wanted, kept, *end);
        let start = wanted.max(kept).min(*end);
        // Below it every chosen reason is done (redriven before, or
        // deleted), so a run that reads nothing there still moves them on.
        pending.handled_to.insert(*p, start);
        if start < *end {
            to_read.push((*p, start));
            total += end - start;
        }
    }
    // Reads with auto.offset.reset=error: an offset that retention deletes
    // during the run is seen and counted, not skipped silently.
    let reader: StreamConsumer = group_consumer(
        cfg,
        &format!("{}-redrive-reader", cfg.kafka.group_id),
        "error",
    )?;
    let producer = crate::tools::producer_unless(opts.dry_run, cfg)?;
    let committers: Arc<Vec<(String, BaseConsumer)>> = Arc::new(if opts.dry_run {
        Vec::new()
    } else {
        prep.reasons
            .iter()
            .map(|r| {
                Ok((
                    r.clone(),
                    group_consumer(cfg, &group_of(cfg, r), "earliest")?,
                ))
            })
            .collect::<Result<_, String>>()?
    });
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    // Records that are not dead letters: how many, and where the first are.
    let mut unreadable = 0u64;
    let mut unreadable_at: Vec<(i32, i64)> = Vec::new();
    let mut progress = crate::tools::Progress::new("redrive");
    let mut read = 0u64;
    let mut sent = 0u64;
    // Why the run stopped early, if it did; and whether what was handled
    // is still to be recorded (not when recording itself failed).
    let mut failure: Option<String> = None;
    let mut settled_failure = false;
    // One partition at a time.
    'partitions: for (p, start) in to_read {
        let end = prep.ends[&p];
        let mut next = start;
        if let Err(e) = assign_one(&reader, &topic, p, next) {
            failure = Some(e);
            break;
        }
        // Time spent waiting for this partition's next record (not for
        // Kafka's confirmations, which settle waits for).
        let mut idle = Duration::ZERO;
        let mut last_error: Option<String> = None;
        while next < end {
            if idle > STALL {
                failure = Some(format!(
                    "reading {topic} partition {p} at offset {next}: nothing came for {} s{}",
                    STALL.as_secs(),
                    last_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ));
                break 'partitions;
            }
            let waiting = Instant::now();
            let got = tokio::time::timeout(Duration::from_secs(5), reader.recv()).await;
            idle += waiting.elapsed();
            let m = match got {
                Ok(Ok(m)) => m,
                // The end for now: anything up to `end` not yet read is
                // transaction markers or an open transaction's records.
                Ok(Err(KafkaError::PartitionEOF(q))) if q == p => break,
                Ok(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    match after_reset(&reader, &topic, p, &mut next, end) {
                        Ok(gone) if gone > 0 => {
                            expired += gone;
                            let to = pending.handled_to.entry(p).or_insert(0);
                            *to = (*to).max(next);
                            idle = Duration::ZERO;
                            continue;
                        }
                        // Nothing deleted: not retention (a log cut short
                        // on a new leader?). Tried again after a pause,
                        // until the stall limit.
                        Ok(_) => {
                            last_error = Some(format!(
                                "offset {next} out of range with nothing before it deleted"
                            ));
                            let pause = Instant::now();
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            idle += pause.elapsed();
                            continue;
                        }
                        Err(e) => {
                            failure = Some(e);
                            break 'partitions;
                        }
                    }
                }
                Ok(Err(KafkaError::MessageConsumption(code))) if permanent(code) => {
                    failure = Some(format!("reading {topic} partition {p}: {code}"));
                    break 'partitions;
                }
                Ok(Err(e @ KafkaError::MessageConsumptionFatal(_))) => {
                    failure = Some(format!("reading {topic}: {e}"));
                    break 'partitions;
                }
                // A broker restarting, a leader moving: librdkafka retries.
                Ok(Err(e)) => {
                    tracing::warn!("reading {topic} partition {p}: {e}; retrying");
                    last_error = Some(e.to_string());
                    continue;
                }
                Err(_) => continue,
            };
            let offset = m.offset();
            if m.partition() != p || offset < next {
                continue;
            }
            idle = Duration::ZERO;
            next = offset + 1;
            if offset >= end {
                break;
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
            if let Some(producer) = &producer {
                let key = d
                    .bucket
                    .as_ref()
                    .zip(d.key.as_ref())
                    .map(|(b, k)| format!("{b}/{k}"));
                let mut full_for = 0;
                let refused = loop {
                    let mut record = FutureRecord::to(&cfg.kafka.input_topic).payload(&payload);
                    if let Some(k) = &key {
                        record = record.key(k);
                    }
                    match producer.send_result(record) {
                        Ok(delivery) => {
                            pending.sends.push((p, offset, delivery));
                            break None;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                            if !pending.sends.is_empty() =>
                        {
                            // Let Kafka catch up, then try again.
                            if let Err(e) =
                                settle(&mut pending, &committers, &mut committed, &topic).await
                            {
                                settled_failure = true;
                                break Some(e);
                            }
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                            if full_for < 600 =>
                        {
                            full_for += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err((e, _)) => {
                            let hint = match e {
                                KafkaError::MessageProduction(
                                    RDKafkaErrorCode::MessageSizeTooLarge,
                                ) => " (raise message.max.bytes in [kafka.producer_properties])",
                                _ => "",
                            };
                            break Some(format!(
                                "Kafka refused the message of the dead letter at {topic} partition {p} offset {offset}: {e}{hint}; it and those after it were not redriven"
                            ));
                        }
                    }
                };
                if let Some(e) = refused {
                    failure = Some(e);
                    break 'partitions;
                }
                sent += 1;
                pending.bytes += payload.len();
            }
            match how {
                Resend::AsItWas => t.redriven += 1,
                Resend::Rebuilt => t.rebuilt += 1,
            }
            handled(&mut pending);
            if pending.sends.len() >= CHUNK || pending.bytes >= CHUNK_BYTES {
                if let Err(e) = settle(&mut pending, &committers, &mut committed, &topic).await {
                    failure = Some(e);
                    settled_failure = true;
                    break 'partitions;
                }
            }
        }
        // Read to its end (or its last stable offset): every chosen reason
        // has handled the partition up to where the reader got, past
        // transaction markers, never past the end it was to read to.
        if let Ok(at) = reader.position() {
            for e in at.elements_for_topic(&topic) {
                if let (Offset::Offset(n), true) = (e.offset(), e.partition() == p) {
                    let to = pending.handled_to.entry(p).or_insert(0);
                    *to = (*to).max(n.min(end));
                }
            }
        }
    }
    progress.finish();
    if !opts.dry_run && !settled_failure {
        // After a failure too: what was handled before it is recorded once
        // Kafka confirms it, so the next run does not send it again.
        if let Err(e) = settle(&mut pending, &committers, &mut committed, &topic).await {
            failure = Some(match failure {
                Some(f) => format!("{f}; and then {e}"),
                None => e,
            });
            settled_failure = true;
        }
    }
    let summary = Summary {
        dry_run: opts.dry_run,
        input_topic: &cfg.kafka.input_topic,
        topic: &topic,
        reasons: &prep.reasons,
        tally: &tally,
        unreadable,
        unreadable_at: &unreadable_at,
        expired,
    };
    summary.print();
    match failure {
        None => Ok(()),
        Some(e) if opts.dry_run || settled_failure => Err(e),
        Some(e) => Err(format!(
            "{e}; the dead letters handled before it are recorded, so running it again goes on from there"
        )),
    }
}

/// What a run did, printed at its end.
struct Summary<'a> {
    dry_run: bool,
    input_topic: &'a str,
    topic: &'a str,
    reasons: &'a [String],
    tally: &'a BTreeMap<String, Tally>,
    unreadable: u64,
    unreadable_at: &'a [(i32, i64)],
    expired: i64,
}

impl Summary<'_> {
    fn print(&self) {
        let sum = self.tally.values().fold(Tally::default(), |a, t| Tally {
            redriven: a.redriven + t.redriven,
            rebuilt: a.rebuilt + t.rebuilt,
            skipped: a.skipped + t.skipped,
            done_before: a.done_before + t.done_before,
        });
        println!(
            "{}{} dead letters redriven to {} ({} as upload events made anew), {} skipped, {} redriven before; reasons: {}",
            if self.dry_run { "dry run: " } else { "" },
            sum.redriven + sum.rebuilt,
            self.input_topic,
            sum.rebuilt,
            sum.skipped,
            sum.done_before,
            self.reasons.join(",")
        );
        for (reason, t) in self.tally {
            println!(
                "  {reason:<22} redriven {:>6}  made anew {:>6}  skipped {:>6}  before {:>6}",
                t.redriven, t.rebuilt, t.skipped, t.done_before
            );
        }
        if self.unreadable > 0 {
            let first: Vec<String> = self
                .unreadable_at
                .iter()
                .map(|(p, o)| format!("partition {p} offset {o}"))
                .collect();
            println!(
                "  {} records on {} are not dead letters and were passed over (first: {})",
                self.unreadable,
                self.topic,
                first.join(", ")
            );
        }
        if self.expired > 0 {
            println!(
                "  {} records on {} were deleted by retention before a redrive of these reasons read them (of any reason: they cannot be read now)",
                self.expired, self.topic
            );
        }
    }
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
        // Two versions of one key in one message: the dead letter's own.
        let mut two = Vec::new();
        for v in ["v1", "v2"] {
            let one: serde_json::Value =
                serde_json::from_slice(&event(Shape::S3, "uploads", "same.png", 3, "abc")).unwrap();
            let mut r = one["Records"][0].clone();
            r["s3"]["object"]["versionId"] = serde_json::json!(v);
            two.push(r);
        }
        let two = serde_json::json!({ "Records": two })
            .to_string()
            .into_bytes();
        for v in ["v1", "v2"] {
            let d = letter("same.png", &two, 65_536).with_version(Some(v));
            let (sent, _) = original(&d, &filter()).unwrap();
            assert_eq!(
                keys(&sent),
                vec![("same.png".to_string(), Some(v.to_string()))]
            );
            // Made anew from bucket/key (the payload cut, or left out): the
            // version goes with it.
            let cut = letter("same.png", &two, 256).with_version(Some(v));
            let without = letter("same.png", &two, 65_536)
                .with_version(Some(v))
                .without_payload("too large");
            for d in [cut, without] {
                let (sent, how) = original(&d, &filter()).unwrap();
                assert_eq!(how, Resend::Rebuilt);
                assert_eq!(
                    keys(&sent),
                    vec![("same.png".to_string(), Some(v.to_string()))]
                );
            }
        }
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
        committed.insert("not_an_image".into(), BTreeMap::from([(1, 5)]));
        committed.insert("fetch_failed_never".into(), BTreeMap::from([(0, 0)]));
        let moved = clamp_to_ends(&mut committed, &BTreeMap::from([(0, 500), (1, 30)]), "dl");
        assert_eq!(committed["object_not_found"], offsets(0, 10));
        assert_eq!(committed["fetch_failed"], offsets(0, 20));
        // What moved back is what must be committed; a reason that never
        // redrove that partition, or stood at 0, has nothing to record.
        assert_eq!(
            moved,
            BTreeMap::from([
                ("fetch_failed".to_string(), vec![0]),
                ("object_not_found".to_string(), vec![0]),
            ])
        );
        assert_eq!(committed["not_an_image"], BTreeMap::from([(1, 5)]));
        // Every reason a redrive may send is looked at, not only the chosen.
        assert_eq!(redrivable().count(), DeadLetterReason::ALL.len() - 2);
        assert!(redrivable().all(|r| r != "alert_failed" && r != "bad_review_record"));
    }

    #[test]
    fn records_retention_deleted_before_reading_got_to_them_are_counted_once() {
        // Reading at 100, retention kept from 250, the run reads to 400.
        assert_eq!(deleted_unread(100, 250, 400), 150);
        // Everything to the end deleted: counted up to the end only.
        assert_eq!(deleted_unread(100, 900, 400), 300);
        // Reading already past what was deleted.
        assert_eq!(deleted_unread(300, 250, 400), 0);
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
