//! `inferstream backfill`: classify objects already in S3. It lists a
//! prefix (ListObjectsV2, page by page) and produces one S3 notification
//! per matching object to the input topic, so that the running service
//! classifies them with all its guarantees and its scale-out. The
//! notifications carry `configurationId` `inferstream-backfill`; their
//! predictions say `"backfill": true`.
//!
//! A page's events are all confirmed by Kafka before the checkpoint file
//! moves past the page's last key, so an interrupted backfill resumed with
//! `--resume` leaves no gap and repeats at most one page. Memory holds one
//! page at a time, whatever the number of keys.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::record::BACKFILL_CONFIGURATION_ID;
use crate::tools::events::{announce, Announced};

/// What to backfill and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// Only objects last modified at or after this time.
    pub since: Option<SystemTime>,
    /// Only objects last modified before this time.
    pub until: Option<SystemTime>,
    /// Only keys ending in one of these (compared without case); empty:
    /// every key.
    pub suffixes: Vec<String>,
    /// Events per second at most.
    pub rate: Option<f64>,
    /// List and count only.
    pub dry_run: bool,
    /// Go on from the checkpoint file.
    pub resume: bool,
    pub checkpoint: PathBuf,
    /// Keys per ListObjectsV2 page (S3 answers at most 1,000).
    pub page_size: i32,
}

/// Where a backfill is: written after every page Kafka confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub bucket: String,
    pub prefix: String,
    /// The last key of the last page whose events Kafka confirmed.
    pub last_key: Option<String>,
    /// The filters it runs with: a resume must use the same, or objects
    /// before `last_key` that only the new filters match would be missed.
    pub filters: Filters,
    pub listed: u64,
    pub produced: u64,
    pub complete: bool,
}

/// `--since`, `--until` and `--suffix` as a checkpoint keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    pub since: Option<String>,
    pub until: Option<String>,
    pub suffixes: Vec<String>,
}

impl Filters {
    fn describe(&self) -> String {
        format!(
            "--since {}, --until {}, --suffix {}",
            self.since.as_deref().unwrap_or("(none)"),
            self.until.as_deref().unwrap_or("(none)"),
            if self.suffixes.is_empty() {
                "(none)".to_string()
            } else {
                self.suffixes.join(",")
            }
        )
    }

    fn of(opts: &Options) -> Filters {
        let time = |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339(t).to_string());
        Filters {
            since: time(opts.since),
            until: time(opts.until),
            suffixes: {
                let mut s = opts.suffixes.clone();
                s.sort();
                s.dedup();
                s
            },
        }
    }
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Checkpoint, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the checkpoint {}: {e} (run without --resume to start)",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| format!("the checkpoint {} is not one: {e}", path.display()))
    }

    /// Written whole or not at all (a new file renamed over the old).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write as _;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("cannot write the checkpoint {}: {e}", path.display()))
    }
}

/// `s3://bucket/prefix` → (bucket, prefix as given, without a leading `/`).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("expected s3://bucket/prefix, got {url:?}"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("no bucket in {url:?}: expected s3://bucket/prefix"));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Whether an object is one to backfill.
pub fn wanted(
    key: &str,
    modified: Option<SystemTime>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    suffixes: &[String],
) -> bool {
    if key.ends_with('/') {
        // A "folder" marker, not an image.
        return false;
    }
    if !suffixes.is_empty() {
        let lower = key.to_lowercase();
        if !suffixes.iter().any(|s| lower.ends_with(s.as_str())) {
            return false;
        }
    }
    match (modified, since, until) {
        (None, None, None) => true,
        (None, _, _) => false,
        (Some(m), since, until) => since.is_none_or(|s| m >= s) && until.is_none_or(|u| m < u),
    }
}

/// `--suffix .jpg,PNG` → [".jpg", ".png"].
pub fn parse_suffixes(list: &str) -> Vec<String> {
    list.split(',')
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// One listed object.
struct Listed {
    key: String,
    size: u64,
    etag: String,
    modified: Option<SystemTime>,
}

/// Tries a ListObjectsV2 page up to five times (0.5 s, 1 s, 2 s, 4 s
/// apart).
async fn list_page(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    page_size: i32,
    start_after: Option<&str>,
    token: Option<&str>,
) -> Result<(Vec<Listed>, Option<String>), String> {
    let mut wait = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        let mut req = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .max_keys(page_size)
            // Keys URL-encoded: a key with characters XML cannot carry
            // would otherwise make the page unreadable on every run.
            .encoding_type(aws_sdk_s3::types::EncodingType::Url);
        if let Some(t) = token {
            req = req.continuation_token(t);
        } else if let Some(after) = start_after {
            req = req.start_after(after);
        }
        match tokio::time::timeout(Duration::from_secs(60), req.send()).await {
            Ok(Ok(page)) => {
                let encoded = page.encoding_type() == Some(&aws_sdk_s3::types::EncodingType::Url);
                let mut objects = Vec::with_capacity(page.contents().len());
                for o in page.contents() {
                    let Some(raw) = o.key() else { continue };
                    let key = if encoded {
                        match crate::pipeline::decode::url_decode_key(raw) {
                            Ok(k) => k,
                            Err(e) => {
                                tracing::warn!("left out of the backfill: {e}");
                                continue;
                            }
                        }
                    } else {
                        // A store that ignores EncodingType answers keys as they are.
                        raw.to_string()
                    };
                    objects.push(Listed {
                        key,
                        size: o.size().unwrap_or(0).max(0) as u64,
                        etag: o.e_tag().unwrap_or_default().to_string(),
                        modified: o
                            .last_modified()
                            .and_then(|t| SystemTime::try_from(*t).ok()),
                    });
                }
                let next = match (page.is_truncated(), page.next_continuation_token()) {
                    (Some(true), Some(t)) => Some(t.to_string()),
                    (Some(true), None) => {
                        return Err(format!(
                            "listing s3://{bucket}/{prefix}: S3 said the listing goes on but gave no continuation token"
                        ))
                    }
                    _ => None,
                };
                return Ok((objects, next));
            }
            Ok(Err(e)) if attempt >= 5 => {
                return Err(format!(
                    "listing s3://{bucket}/{prefix}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(e)
                ))
            }
            Err(_) if attempt >= 5 => {
                return Err(format!(
                    "listing s3://{bucket}/{prefix}: no answer within 60 s"
                ))
            }
            _ => {}
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
        attempt += 1;
    }
}

/// Counts shown while it runs and in the summary.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    listed: u64,
    matched: u64,
    produced: u64,
    bytes: u64,
}

/// The matching objects a second listing, running ahead of the one that
/// produces, has counted: with the rate so far, the ETA.
#[derive(Default)]
struct Ahead {
    matched: AtomicU64,
    done: AtomicBool,
}

/// Lists the same objects as the backfill, counting only, so that the
/// progress line can give an ETA (ListObjectsV2 does not say how many
/// keys a prefix holds). It costs a second ListObjectsV2 request per
/// page; a failure only leaves the ETA unknown.
fn count_ahead(
    s3: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    opts: &Options,
    start_after: Option<String>,
    stop: CancellationToken,
) -> Arc<Ahead> {
    let ahead = Arc::new(Ahead::default());
    let counted = ahead.clone();
    let (since, until, suffixes, page_size) = (
        opts.since,
        opts.until,
        opts.suffixes.clone(),
        opts.page_size,
    );
    tokio::spawn(async move {
        let mut token: Option<String> = None;
        loop {
            let page = tokio::select! {
                page = list_page(&s3, &bucket, &prefix, page_size, start_after.as_deref(), token.as_deref()) => page,
                () = stop.cancelled() => return,
            };
            let Ok((objects, next)) = page else {
                tracing::debug!("counting ahead stopped; no ETA");
                return;
            };
            let n = objects
                .iter()
                .filter(|o| wanted(&o.key, o.modified, since, until, &suffixes))
                .count();
            counted.matched.fetch_add(n as u64, Ordering::Relaxed);
            match next {
                Some(t) => token = Some(t),
                None => {
                    counted.done.store(true, Ordering::Release);
                    return;
                }
            }
        }
    });
    ahead
}

/// The progress line.
fn progress_line(c: &Counts, secs: f64, ahead: Option<&Ahead>) -> String {
    let secs = secs.max(0.001);
    let Some(ahead) = ahead else {
        return format!(
            "listed {}, {} match ({} bytes), {:.0} listed/s",
            c.listed,
            c.matched,
            c.bytes,
            c.listed as f64 / secs
        );
    };
    let rate = c.produced as f64 / secs;
    let counted = ahead.matched.load(Ordering::Relaxed);
    let eta = if ahead.done.load(Ordering::Acquire) {
        let left = counted.saturating_sub(c.produced);
        if left == 0 {
            "ETA 0s".to_string()
        } else if rate > 0.0 {
            format!(
                "{left} to go, ETA {}",
                crate::tools::eta(left as f64 / rate)
            )
        } else {
            format!("{left} to go")
        }
    } else {
        format!("{counted} counted so far, ETA when counted")
    };
    format!(
        "listed {}, {} match, {} events produced, {:.0} events/s, {eta}",
        c.listed, c.matched, c.produced, rate
    )
}

/// Paces events to `rate` a second.
struct Pace {
    every: Option<Duration>,
    next: tokio::time::Instant,
}

impl Pace {
    fn new(rate: Option<f64>) -> Pace {
        Pace {
            every: rate
                .filter(|r| *r > 0.0 && r.is_finite())
                .and_then(|r| Duration::try_from_secs_f64(1.0 / r).ok()),
            next: tokio::time::Instant::now(),
        }
    }

    async fn wait(&mut self) {
        if let Some(every) = self.every {
            let now = tokio::time::Instant::now();
            // No bursts to make up for time spent elsewhere.
            self.next = self.next.max(now);
            tokio::time::sleep_until(self.next).await;
            self.next += every;
        }
    }
}

/// `inferstream backfill`.
pub async fn command(path: Option<&Path>, opts: Options) -> ExitCode {
    let cfg = match crate::tools::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match run(&cfg, &opts).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: &crate::Config, opts: &Options) -> Result<ExitCode, String> {
    let (bucket, prefix) = parse_url(&opts.url)?;
    if let (Some(since), Some(until)) = (opts.since, opts.until) {
        if since >= until {
            return Err(format!(
                "--since {} is not before --until {}: no object could match",
                humantime::format_rfc3339(since),
                humantime::format_rfc3339(until)
            ));
        }
    }
    if !(1..=1000).contains(&opts.page_size) {
        return Err(format!(
            "--page-size {} is not between 1 and 1000",
            opts.page_size
        ));
    }
    let mut checkpoint = Checkpoint {
        bucket: bucket.clone(),
        prefix: prefix.clone(),
        last_key: None,
        filters: Filters::of(opts),
        listed: 0,
        produced: 0,
        complete: false,
    };
    if opts.resume {
        let saved = Checkpoint::load(&opts.checkpoint)?;
        if (saved.bucket.as_str(), saved.prefix.as_str()) != (bucket.as_str(), prefix.as_str()) {
            return Err(format!(
                "the checkpoint {} is of s3://{}/{}, not {}",
                opts.checkpoint.display(),
                saved.bucket,
                saved.prefix,
                opts.url
            ));
        }
        if saved.filters != checkpoint.filters {
            return Err(format!(
                "the checkpoint {} was made with other filters ({}) than these ({}): resume with the same --since, --until and --suffix, or start over without --resume",
                opts.checkpoint.display(),
                saved.filters.describe(),
                checkpoint.filters.describe()
            ));
        }
        if saved.complete {
            println!(
                "nothing to do: the backfill of {} is complete ({} events produced)",
                opts.url, saved.produced
            );
            return Ok(ExitCode::SUCCESS);
        }
        checkpoint = saved;
    } else if !opts.dry_run {
        // A fresh start must not throw away an unfinished backfill's place.
        if opts.checkpoint.exists() {
            let saved = Checkpoint::load(&opts.checkpoint).map_err(|e| {
                format!("{e}; delete it (or give another --checkpoint) to start over")
            })?;
            // One of this very backfill that never got past its first page
            // resumes from the start, as a fresh run does: nothing of it
            // is lost by starting over.
            let same = (&saved.bucket, &saved.prefix, &saved.filters)
                == (&checkpoint.bucket, &checkpoint.prefix, &checkpoint.filters);
            if !saved.complete && (saved.last_key.is_some() || !same) {
                return Err(format!(
                    "the checkpoint {} holds an unfinished backfill of s3://{}/{} ({} events produced, up to {}): continue it with --resume, or delete the file (or give another --checkpoint) to start over",
                    opts.checkpoint.display(),
                    saved.bucket,
                    saved.prefix,
                    saved.produced,
                    saved.last_key.as_deref().unwrap_or("the start")
                ));
            }
        }
    }
    if !opts.dry_run && !opts.resume {
        // Written before the first page, so that a run stopped before it
        // has one checkpoint to resume from (not an earlier, complete one).
        checkpoint.save(&opts.checkpoint)?;
    }
    let sdk = crate::clients::aws::sdk_config(cfg).await;
    let s3 = crate::clients::aws::s3_client(&sdk, cfg);
    let producer = crate::tools::producer_unless(opts.dry_run, cfg)?;
    // The first SIGINT or SIGTERM stops at the next step; a second exits
    // at once (the checkpoint is never past an unconfirmed page).
    let stop = CancellationToken::new();
    crate::shutdown::on_signals(stop.clone())
        .map_err(|e| format!("cannot watch for SIGINT and SIGTERM: {e}"))?;
    let mut counts = Counts::default();
    let mut progress = crate::tools::Progress::new("backfill");
    let mut pace = Pace::new(opts.rate);
    let started = Instant::now();
    let mut token: Option<String> = None;
    let resumed_after = checkpoint.last_key.clone();
    let ahead = (!opts.dry_run).then(|| {
        count_ahead(
            s3.clone(),
            bucket.clone(),
            prefix.clone(),
            opts,
            resumed_after.clone(),
            stop.child_token(),
        )
    });
    let _stop_counting = stop.clone().drop_guard();
    loop {
        let listed = tokio::select! {
            page = list_page(
                &s3,
                &bucket,
                &prefix,
                opts.page_size,
                resumed_after.as_deref(),
                token.as_deref(),
            ) => Some(page),
            () = stop.cancelled() => None,
        };
        let Some(listed) = listed else {
            progress.finish();
            return Ok(interrupted_exit(&counts, &checkpoint, opts.dry_run));
        };
        let (objects, next) = listed.map_err(|e| with_resume_hint(e, &checkpoint, opts))?;
        counts.listed += objects.len() as u64;
        let mut sends = Vec::new();
        'objects: for o in &objects {
            if stop.is_cancelled() {
                break;
            }
            if !wanted(&o.key, o.modified, opts.since, opts.until, &opts.suffixes) {
                continue;
            }
            counts.matched += 1;
            counts.bytes += o.size;
            let Some(producer) = &producer else {
                continue;
            };
            let paced = tokio::select! {
                () = pace.wait() => true,
                () = stop.cancelled() => false,
            };
            if !paced {
                break;
            }
            let modified = o
                .modified
                .map(|t| humantime::format_rfc3339_millis(t).to_string())
                .unwrap_or_default();
            let payload = announce(&Announced {
                bucket: &bucket,
                key: &o.key,
                size: Some(o.size),
                etag: Some(&o.etag),
                version_id: None,
                time: &modified,
                configuration_id: BACKFILL_CONFIGURATION_ID,
            });
            let key = format!("{bucket}/{}", o.key);
            let record = FutureRecord::to(&cfg.kafka.input_topic)
                .key(&key)
                .payload(&payload);
            let mut record = record;
            let mut full_for = 0;
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        sends.push(delivery);
                        break;
                    }
                    // The producer's queue is full (kafka.producer_properties
                    // queue.buffering.*): wait for Kafka to take some.
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) if full_for < 600 => {
                        record = back;
                        full_for += 1;
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                            // Interrupted: the page is cut short here.
                            () = stop.cancelled() => break 'objects,
                        }
                    }
                    Err((e, _)) => {
                        return Err(with_resume_hint(
                            format!("Kafka refused an event: {e}"),
                            &checkpoint,
                            opts,
                        ))
                    }
                }
            }
            let queued = Counts {
                produced: counts.produced + sends.len() as u64,
                ..counts
            };
            progress
                .show(|| progress_line(&queued, started.elapsed().as_secs_f64(), ahead.as_deref()));
        }
        // The page counts as done once Kafka has every event of it. After
        // an interruption Kafka gets 10 s more; the checkpoint stays
        // before the page if it does not confirm them all.
        let sent = sends.len() as u64;
        let confirmed = async {
            for delivery in sends {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(format!("Kafka did not take an event: {e}")),
                    Err(_) => return Err("the Kafka producer went away".to_string()),
                }
            }
            Ok(())
        };
        let grace = async {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        };
        tokio::select! {
            done = confirmed => done.map_err(|e| with_resume_hint(e, &checkpoint, opts))?,
            () = grace => {
                progress.finish();
                eprintln!("Kafka did not confirm this page's events within 10 s of the interruption");
                return Ok(interrupted_exit(&counts, &checkpoint, opts.dry_run));
            }
        }
        counts.produced += sent;
        if stop.is_cancelled() {
            // The page was cut short: the checkpoint stays before it.
            progress.finish();
            if !opts.dry_run {
                checkpoint.produced += sent;
                checkpoint.save(&opts.checkpoint)?;
            }
            return Ok(interrupted_exit(&counts, &checkpoint, opts.dry_run));
        }
        if !opts.dry_run {
            if let Some(last) = objects.last() {
                checkpoint.last_key = Some(last.key.clone());
            }
            checkpoint.listed += objects.len() as u64;
            checkpoint.produced += sent;
            checkpoint.complete = next.is_none();
            checkpoint.save(&opts.checkpoint)?;
        }
        progress.show(|| progress_line(&counts, started.elapsed().as_secs_f64(), ahead.as_deref()));
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    progress.finish();
    let secs = started.elapsed().as_secs_f64().max(0.001);
    if opts.dry_run {
        println!(
            "dry run: {} objects listed under {}, {} match ({} bytes); nothing produced ({:.0} listed/s)",
            counts.listed,
            opts.url,
            counts.matched,
            counts.bytes,
            counts.listed as f64 / secs
        );
    } else {
        println!(
            "backfill of {} complete: {} objects listed, {} events produced to {} in {:.1} s ({:.0} events/s){}",
            opts.url,
            counts.listed,
            counts.produced,
            cfg.kafka.input_topic,
            secs,
            counts.produced as f64 / secs,
            if resumed_after.is_some() {
                format!("; {} in all with the runs before", checkpoint.produced)
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Says where to go on from; exit code 130, as for SIGINT.
fn interrupted_exit(counts: &Counts, checkpoint: &Checkpoint, dry_run: bool) -> ExitCode {
    if dry_run {
        eprintln!(
            "interrupted after listing {} objects ({} match); a dry run keeps no checkpoint",
            counts.listed, counts.matched
        );
        return ExitCode::from(130);
    }
    eprintln!(
        "interrupted after {} events; continue with --resume (from after {})",
        counts.produced,
        checkpoint.last_key.as_deref().unwrap_or("the start")
    );
    ExitCode::from(130)
}

fn with_resume_hint(e: String, checkpoint: &Checkpoint, opts: &Options) -> String {
    if opts.dry_run {
        return e;
    }
    format!(
        "{e}; nothing is lost: continue with --resume (from after {})",
        checkpoint.last_key.as_deref().unwrap_or("the start")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_their_prefix_as_given() {
        assert_eq!(
            parse_url("s3://photos/2026/"),
            Ok(("photos".into(), "2026/".into()))
        );
        assert_eq!(parse_url("s3://photos"), Ok(("photos".into(), "".into())));
        assert!(parse_url("photos/2026").is_err());
        assert!(parse_url("s3:///x").is_err());
    }

    #[test]
    fn objects_are_chosen_by_suffix_and_time() {
        let t = |s: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let jpg = parse_suffixes(".JPG, .png");
        assert!(wanted("a/b.jpg", t(5), None, None, &jpg));
        assert!(wanted("a/b.PNG", t(5), None, None, &jpg));
        assert!(!wanted("a/b.gif", t(5), None, None, &jpg));
        assert!(!wanted("a/", t(5), None, None, &[]));
        assert!(wanted("a/b.gif", t(5), t(5), t(6), &[]));
        assert!(!wanted("a/b.gif", t(6), t(5), t(6), &[]));
        assert!(!wanted("a/b.gif", t(4), t(5), None, &[]));
        assert!(!wanted("a/b.gif", None, t(5), None, &[]));
    }

    #[test]
    fn its_events_decode_as_backfill() {
        let payload = announce(&Announced {
            bucket: "uploads",
            key: "bikes/img 1+2.png",
            size: Some(3012),
            etag: Some("\"abc\""),
            version_id: None,
            time: "2026-11-01T00:00:00.000Z",
            configuration_id: BACKFILL_CONFIGURATION_ID,
        });
        let out = crate::pipeline::decode::decode(
            Some(&payload),
            &crate::Config::from_toml_str("[alerts]\nenabled = false\n")
                .unwrap()
                .filter,
        );
        match out.as_slice() {
            [crate::pipeline::decode::Outcome::Image(img)] => {
                assert_eq!(img.key, "bikes/img 1+2.png");
                assert_eq!(img.etag.as_deref(), Some("abc"));
                assert!(img.backfill);
                assert_eq!(img.size, Some(3012));
            }
            other => panic!("{other:?}"),
        }
    }
}
