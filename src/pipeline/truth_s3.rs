//! Ground truth from S3: Model Monitor ground-truth JSON Lines objects
//! (or `{"id", "label"}` lines) under `monitor.ground_truth_s3`, read as
//! they are written and joined by [`GroundTruth`].
//!
//! Every `monitor.ground_truth_poll` the prefix is listed a page at a time
//! (each request within `fetch.timeout`); each `*.jsonl` object written
//! since the start and not read yet is read once, line by line. A read
//! that fails part-way resumes after the last whole line it recorded (a
//! ranged GET of the version listed, by ETag), so no line is counted
//! twice; an object whose ETag changes (overwritten) is read again from
//! the start (labels already judged then count as `again`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::ProvideErrorMetadata as _;

use crate::pipeline::truth::GroundTruth;
use crate::record::now_ms;

/// Objects whose `LastModified` is up to this much before the start are
/// read too (clocks differ between S3 and this host).
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;
/// A ground-truth line longer than this is counted `bad` and skipped.
pub const MAX_LINE: usize = 64 * 1024;
/// Objects remembered as read, at most; past it the oldest are forgotten
/// and objects written before them are no longer read.
const MAX_SEEN: usize = 200_000;

/// One listed object: key, LastModified (ms), ETag (its version), size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub modified_ms: i64,
    pub etag: String,
    /// 0 when the listing did not say.
    pub size: u64,
}

/// Which listed objects to read: `*.jsonl` objects written since the start
/// (labels in older ones are for predictions not kept here), not read yet
/// in their current version (ETag). Objects are remembered for twice
/// `monitor.ground_truth_window` after they were written; older ones are
/// not read any more.
#[derive(Debug)]
pub struct Listing {
    started_ms: i64,
    window_ms: i64,
    max_seen: usize,
    /// Key -> (ETag, LastModified) of the version read.
    seen: HashMap<String, (String, i64)>,
    by_time: BTreeSet<(i64, String)>,
    /// Raised when `seen` is full: objects written before it are not read
    /// (never past an object whose read stopped part-way).
    floor_ms: i64,
    /// Key -> (ETag, LastModified, bytes of whole lines recorded) of
    /// objects whose read stopped part-way.
    partial: HashMap<String, (String, i64, u64)>,
}

impl Listing {
    pub fn new(started_ms: i64, window: Duration) -> Listing {
        Listing::with_limit(started_ms, window, MAX_SEEN)
    }

    fn with_limit(started_ms: i64, window: Duration, max_seen: usize) -> Listing {
        Listing {
            started_ms,
            window_ms: window.as_millis() as i64,
            max_seen,
            seen: HashMap::new(),
            by_time: BTreeSet::new(),
            floor_ms: i64::MIN,
            partial: HashMap::new(),
        }
    }

    fn cutoff(&self, now_ms: i64) -> i64 {
        (self.started_ms - CLOCK_SKEW_MS)
            .max(now_ms - 2 * self.window_ms)
            .max(self.floor_ms)
    }

    /// Forgets objects written before the cutoff.
    pub fn prune(&mut self, now_ms: i64) {
        let cutoff = self.cutoff(now_ms);
        while let Some((modified, key)) = self.by_time.first().cloned() {
            if modified >= cutoff {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&key);
        }
        self.partial
            .retain(|_, (_, modified, _)| *modified >= cutoff);
    }

    /// Whether `o` is to be read now.
    pub fn wanted(&self, o: &Listed, now_ms: i64) -> bool {
        o.key.ends_with(".jsonl")
            && o.modified_ms >= self.cutoff(now_ms)
            && self
                .seen
                .get(&o.key)
                .is_none_or(|(etag, _)| *etag != o.etag)
    }

    /// Where to start reading `o`: after the whole lines already recorded
    /// from this version of it.
    pub fn resume_at(&self, o: &Listed) -> u64 {
        match self.partial.get(&o.key) {
            Some((etag, _, done)) if *etag == o.etag => *done,
            _ => 0,
        }
    }

    /// `o` was read up to `done` bytes and stopped.
    pub fn stopped(&mut self, o: &Listed, done: u64) {
        self.partial
            .insert(o.key.clone(), (o.etag.clone(), o.modified_ms, done));
    }

    /// `o` was read to its end.
    pub fn read(&mut self, o: &Listed) {
        self.partial.remove(&o.key);
        let version = (o.etag.clone(), o.modified_ms);
        if let Some((_, old)) = self.seen.insert(o.key.clone(), version) {
            self.by_time.remove(&(old, o.key.clone()));
        }
        self.by_time.insert((o.modified_ms, o.key.clone()));
        let unfinished = self
            .partial
            .values()
            .map(|(_, modified, _)| *modified)
            .min()
            .unwrap_or(i64::MAX);
        while self.seen.len() > self.max_seen {
            let Some((modified, key)) = self.by_time.pop_first() else {
                break;
            };
            self.seen.remove(&key);
            self.floor_ms = self.floor_ms.max((modified + 1).min(unfinished));
        }
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes; longer
/// ones are reported as `None` (once each) and skipped. Counts the bytes
/// up to the end of the last whole line, where a read can resume.
#[derive(Default)]
pub struct Lines {
    partial: Vec<u8>,
    overlong: bool,
    /// Bytes of the current, unfinished line.
    pending: u64,
    /// Bytes up to and including the last newline.
    pub consumed: u64,
}

impl Lines {
    pub fn push(&mut self, chunk: &[u8], mut each: impl FnMut(Option<&[u8]>)) {
        for piece in chunk.split_inclusive(|b| *b == b'\n') {
            let ends = piece.ends_with(b"\n");
            let body = piece.strip_suffix(b"\n").unwrap_or(piece);
            if !self.overlong {
                if self.partial.len() + body.len() > MAX_LINE {
                    self.overlong = true;
                    self.partial.clear();
                } else {
                    self.partial.extend_from_slice(body);
                }
            }
            self.pending += piece.len() as u64;
            if ends {
                self.end_line(&mut each);
                self.consumed += self.pending;
                self.pending = 0;
            }
        }
    }

    fn end_line(&mut self, each: &mut impl FnMut(Option<&[u8]>)) {
        if self.overlong {
            each(None);
        } else if !self.partial.iter().all(u8::is_ascii_whitespace) {
            each(Some(&self.partial));
        }
        self.partial.clear();
        self.overlong = false;
    }

    /// The end of the input: its last line, if it has no newline.
    pub fn finish(&mut self, mut each: impl FnMut(Option<&[u8]>)) {
        self.end_line(&mut each);
        self.consumed += self.pending;
        self.pending = 0;
    }
}

/// Reads `monitor.ground_truth_s3` into `truth`, until the task is aborted.
pub async fn run(
    truth: Arc<GroundTruth>,
    client: aws_sdk_s3::Client,
    uri: String,
    poll: Duration,
    timeout: Duration,
) {
    let Some((bucket, prefix)) = crate::config::parse_s3_url(&uri) else {
        return;
    };
    let prefix = if prefix.is_empty() {
        prefix
    } else {
        format!("{prefix}/")
    };
    let reader = Reader {
        truth,
        client,
        bucket,
        timeout,
    };
    let mut listing = Listing::new(now_ms(), reader.truth.window());
    tracing::info!(%uri, ?poll, "ground truth: reading true labels from S3");
    loop {
        listing.prune(now_ms());
        let (mut wanted, complete) = reader.list(&prefix, &listing).await;
        if !complete {
            reader.count("list_failed");
        }
        wanted.sort_by(|a, b| (a.modified_ms, &a.key).cmp(&(b.modified_ms, &b.key)));
        for o in wanted {
            let from = listing.resume_at(&o);
            let read = read_object(
                &reader.truth,
                &reader.client,
                &reader.bucket,
                &o,
                from,
                reader.timeout,
            );
            match read.await {
                Ok(_) => {
                    tracing::debug!(key = %o.key, "ground truth: object read");
                    reader.count("read");
                    listing.read(&o);
                }
                Err((e, done)) => {
                    reader.count("failed");
                    listing.stopped(&o, done);
                    tracing::warn!(bucket = %reader.bucket, key = %o.key, error = %e, resume_at = done,
                        "ground truth: reading the object stopped; going on from its last whole line at the next listing");
                }
            }
        }
        reader.truth.expire();
        tokio::time::sleep(poll).await;
    }
}

struct Reader {
    truth: Arc<GroundTruth>,
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Each request, and each wait for more of a body.
    timeout: Duration,
}

impl Reader {
    fn count(&self, outcome: &str) {
        self.truth
            .metrics()
            .ground_truth_objects
            .with_label_values(&[outcome])
            .inc();
    }

    /// The objects under `prefix` to read now, and whether the listing got
    /// to its end (what it got to is read either way).
    async fn list(&self, prefix: &str, listing: &Listing) -> (Vec<Listed>, bool) {
        let mut wanted = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        loop {
            let page = match tokio::time::timeout(self.timeout, pages.next()).await {
                Ok(None) => return (wanted, true),
                Ok(Some(Ok(page))) => page,
                Ok(Some(Err(e))) => {
                    tracing::warn!(bucket = %self.bucket, %prefix, error = %crate::clients::aws::describe(&e),
                        "ground truth: cannot list monitor.ground_truth_s3 (the role needs s3:ListBucket); trying again at the next listing");
                    return (wanted, false);
                }
                Err(_) => {
                    tracing::warn!(bucket = %self.bucket, %prefix,
                        "ground truth: a listing request of monitor.ground_truth_s3 took longer than fetch.timeout; trying again at the next listing");
                    return (wanted, false);
                }
            };
            let now = now_ms();
            for obj in page.contents.unwrap_or_default() {
                let modified = obj.last_modified.and_then(|t| t.to_millis().ok());
                if let (Some(key), Some(modified_ms)) = (obj.key, modified) {
                    let o = Listed {
                        key,
                        modified_ms,
                        etag: obj.e_tag.unwrap_or_default(),
                        size: obj.size.unwrap_or(0).max(0) as u64,
                    };
                    if listing.wanted(&o, now) {
                        wanted.push(o);
                    }
                }
            }
        }
    }
}

/// Reads object `o` of `bucket` from byte `from` into `truth`, line by line
/// (each request, and each wait for more of the body, within `timeout`).
/// Returns the offset after its last line; on failure, the error and the
/// offset after the last whole line recorded, where a read can resume.
pub async fn read_object(
    truth: &GroundTruth,
    client: &aws_sdk_s3::Client,
    bucket: &str,
    o: &Listed,
    from: u64,
    timeout: Duration,
) -> Result<u64, (String, u64)> {
    if from > 0 && o.size > 0 && from >= o.size {
        return Ok(from);
    }
    let mut lines = Lines::default();
    let mut each = |line: Option<&[u8]>| match line {
        Some(line) => {
            truth.record(line);
        }
        None => truth.bad_line(),
    };
    let mut req = client.get_object().bucket(bucket).key(&o.key);
    // The version listed, or nothing: an object overwritten since is read
    // at the next listing, from its start.
    if !o.etag.is_empty() {
        req = req.if_match(&o.etag);
    }
    if from > 0 {
        req = req.range(format!("bytes={from}-"));
    }
    let out = match tokio::time::timeout(timeout, req.send()).await {
        Ok(Ok(out)) => out,
        // Nothing after `from`: it was read to its end.
        Ok(Err(e)) if from > 0 && e.code() == Some("InvalidRange") => return Ok(from),
        Ok(Err(e)) => return Err((crate::clients::aws::describe(&e), from)),
        Err(_) => return Err(("no answer within fetch.timeout".into(), from)),
    };
    let mut body = out.body;
    loop {
        match tokio::time::timeout(timeout, body.next()).await {
            Ok(Some(Ok(chunk))) => lines.push(&chunk, &mut each),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err((
                    format!("reading the body failed: {e}"),
                    from + lines.consumed,
                ))
            }
            Err(_) => {
                return Err((
                    "the body stalled for longer than fetch.timeout".into(),
                    from + lines.consumed,
                ))
            }
        }
    }
    lines.finish(&mut each);
    Ok(from + lines.consumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn o(key: &str, modified_ms: i64) -> Listed {
        Listed {
            key: key.into(),
            modified_ms,
            etag: format!("\"{modified_ms}\""),
            size: 100,
        }
    }

    #[test]
    fn objects_written_since_the_start_are_read_once() {
        let mut l = Listing::new(10 * HOUR, Duration::from_secs(3600));
        let now = 10 * HOUR + 10;
        // Written long before the start: labels of predictions not kept.
        assert!(!l.wanted(&o("gt/old.jsonl", 5 * HOUR), now));
        assert!(!l.wanted(&o("gt/a.json.gz", 10 * HOUR + 1), now));
        assert!(l.wanted(&o("gt/a.jsonl", 10 * HOUR + 1), now));
        l.read(&o("gt/a.jsonl", 10 * HOUR + 1));
        assert!(!l.wanted(&o("gt/a.jsonl", 10 * HOUR + 1), now));
        // Overwritten: read again, even within the same second.
        assert!(l.wanted(&o("gt/a.jsonl", 10 * HOUR + 5), now));
        let same_second = Listed {
            etag: "\"other\"".into(),
            ..o("gt/a.jsonl", 10 * HOUR + 1)
        };
        assert!(l.wanted(&same_second, now));
        // Two windows later it is forgotten and not read again.
        l.prune(13 * HOUR);
        assert!(l.seen.is_empty() && l.by_time.is_empty());
        assert!(!l.wanted(&o("gt/a.jsonl", 10 * HOUR + 1), 13 * HOUR));
        assert!(l.wanted(&o("gt/c.jsonl", 13 * HOUR), 13 * HOUR));
    }

    #[test]
    fn a_read_that_stopped_resumes_after_its_last_whole_line() {
        let mut l = Listing::new(0, Duration::from_secs(3600));
        let a = o("gt/a.jsonl", 10);
        assert_eq!(l.resume_at(&a), 0);
        l.stopped(&a, 40);
        assert_eq!(l.resume_at(&a), 40);
        assert!(l.wanted(&a, 20));
        // Another version starts over.
        assert_eq!(l.resume_at(&o("gt/a.jsonl", 11)), 0);
        let same_second = Listed {
            etag: "\"other\"".into(),
            ..a.clone()
        };
        assert_eq!(l.resume_at(&same_second), 0);
        l.read(&a);
        assert_eq!(l.resume_at(&a), 0);
        assert!(!l.wanted(&a, 20));
    }

    #[test]
    fn past_the_limit_the_oldest_are_forgotten_and_not_read_again() {
        let mut l = Listing::with_limit(0, Duration::from_secs(3600), 3);
        for i in 0..5 {
            l.read(&o(&format!("gt/{i}.jsonl"), i));
        }
        assert_eq!(l.seen.len(), 3);
        // Forgotten, and still listed: not wanted, so not read again.
        for i in 0..5 {
            assert!(!l.wanted(&o(&format!("gt/{i}.jsonl"), i), 10), "{i}");
        }
        assert!(l.wanted(&o("gt/new.jsonl", 6), 10));
    }

    #[test]
    fn the_limit_never_skips_an_object_whose_read_stopped_part_way() {
        let mut l = Listing::with_limit(0, Duration::from_secs(3600), 2);
        let stuck = o("gt/stuck.jsonl", 1);
        l.stopped(&stuck, 10);
        for i in 2..10 {
            l.read(&o(&format!("gt/{i}.jsonl"), i));
        }
        l.prune(20);
        assert!(l.wanted(&stuck, 20));
        assert_eq!(l.resume_at(&stuck), 10);
    }

    #[test]
    fn lines_are_split_across_chunks_and_overlong_ones_reported() {
        let mut got: Vec<Option<String>> = Vec::new();
        let mut lines = Lines::default();
        let mut each = |l: Option<&[u8]>| got.push(l.map(|l| String::from_utf8_lossy(l).into()));
        lines.push(b"{\"a\"", &mut each);
        assert_eq!(lines.consumed, 0);
        lines.push(b": 1}\n\n  \n{\"b\": 2}\n", &mut each);
        assert_eq!(lines.consumed, 22);
        lines.push(&vec![b'x'; MAX_LINE + 1], &mut each);
        lines.push(b"x\n{\"c\": 3}", &mut each);
        assert_eq!(lines.consumed, 22 + MAX_LINE as u64 + 3);
        lines.finish(&mut each);
        assert_eq!(lines.consumed, 22 + MAX_LINE as u64 + 3 + 8);
        assert_eq!(
            got,
            vec![
                Some(r#"{"a": 1}"#.to_string()),
                Some(r#"{"b": 2}"#.to_string()),
                None,
                Some(r#"{"c": 3}"#.to_string()),
            ]
        );
    }
}
