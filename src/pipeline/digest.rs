//! Alert digests, the bookkeeping: review images collected per window and
//! label group, deduplicated by prediction id, limited per hour, and the
//! SNS messages they make. No I/O here; `alerts` reads the review topic,
//! publishes and records what was alerted.
//!
//! A window opens with the first record read after the previous one
//! closed, and closes `alerts.digest_window` later. Its messages are then
//! published in order: per label group, chunks of the group's images (one
//! message unless its prediction ids would not fit SNS's 256 KiB), then one
//! storm summary if images were over `alerts.max_per_hour`. The window's
//! read positions may be committed once all of them are published.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde_json::json;

use crate::config::AlertsConfig;
use crate::pipeline::sink::ascii_subject;
use crate::record::Prediction;

pub const DIGEST_SCHEMA: &str = "inferstream.alert_digest.v1";
pub const STORM_SCHEMA: &str = "inferstream.alert_storm.v1";

/// Bytes of prediction ids in one message's JSON: with the listed text
/// (below) and the rest, a message stays under SNS's 256 KiB.
const IDS_BUDGET: usize = 150_000;
/// Bytes of the lines listing images one by one in one message.
const TEXT_BUDGET: usize = 90_000;
const HOUR_MS: i64 = 3_600_000;

pub use crate::record::now_ms;

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What a digest keeps of a review prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub bucket: String,
    pub key: String,
    pub label: String,
    pub confidence: f64,
    pub threshold: f64,
    pub processed_at: String,
    /// The review topic partition it was read from.
    pub partition: i32,
}

impl Item {
    pub fn new(p: &Prediction, partition: i32) -> Item {
        Item {
            id: p.id.clone(),
            bucket: p.bucket.clone(),
            key: p.key.clone(),
            label: p.label.clone(),
            confidence: p.confidence,
            threshold: p.threshold,
            processed_at: p.processed_at.clone(),
            partition,
        }
    }
}

/// The digest settings, from `[alerts]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub window: Duration,
    pub max_items: usize,
    pub max_per_hour: u32,
    pub dedup_window_ms: i64,
    /// label -> group; labels in none go to `default_group`.
    pub groups: BTreeMap<String, String>,
    pub default_group: String,
    pub review_topic: String,
}

impl Settings {
    pub fn new(a: &AlertsConfig, review_topic: &str) -> Settings {
        let groups = a
            .label_groups
            .iter()
            .flat_map(|(g, labels)| labels.iter().map(move |l| (l.clone(), g.clone())))
            .collect();
        Settings {
            window: a.digest_window,
            max_items: a.digest_max_items.max(1),
            max_per_hour: a.max_per_hour,
            dedup_window_ms: a.dedup_window.as_millis() as i64,
            groups,
            default_group: if a.label_groups.is_empty() {
                "all".into()
            } else {
                "other".into()
            },
            review_topic: review_topic.to_string(),
        }
    }

    fn group_of(&self, label: &str) -> &str {
        self.groups.get(label).unwrap_or(&self.default_group)
    }
}

/// What became of a review image read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Waiting in the window to be listed in a digest.
    Listed,
    /// Alerted already within the dedup window (or waiting already).
    Duplicate,
    /// Over `max_per_hour`: counted in the window's storm summary.
    Storm,
    /// Its partition is not assigned here (any more): ignored.
    NotAssigned,
}

#[derive(Default)]
struct Partition {
    /// Prediction id -> when it was alerted (ms).
    alerted: HashMap<String, i64>,
    /// Records below this offset belong to windows published already
    /// (their positions are recorded on the state topic, commit or not).
    done_below: i64,
    loaded: bool,
    /// Which assignment of the partition this is.
    generation: u64,
}

struct Window {
    opened_ms: i64,
    closes_at: Instant,
    closed_ms: i64,
    groups: BTreeMap<String, VecDeque<Item>>,
    /// partition -> label -> images over the hourly limit.
    storm: BTreeMap<i32, BTreeMap<String, u64>>,
    /// The next offset to read per partition, once this window is published.
    positions: BTreeMap<i32, i64>,
}

impl Window {
    fn is_empty(&self) -> bool {
        self.groups.values().all(VecDeque::is_empty) && self.storm.is_empty()
    }

    fn drop_partition(&mut self, p: i32, held: &mut HashSet<String>) {
        for items in self.groups.values_mut() {
            items.retain(|i| {
                let keep = i.partition != p;
                if !keep {
                    held.remove(&i.id);
                }
                keep
            });
        }
        self.groups.retain(|_, items| !items.is_empty());
        self.storm.remove(&p);
        self.positions.remove(&p);
    }

    fn storm_images(&self) -> u64 {
        self.storm.values().flat_map(|m| m.values()).sum()
    }
}

/// One SNS message to publish, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Digest {
        group: String,
        items: Vec<Item>,
        window_start_ms: i64,
        window_end_ms: i64,
    },
    Storm {
        counts: BTreeMap<String, u64>,
        window_start_ms: i64,
        window_end_ms: i64,
    },
}

/// The alerter's state: assigned partitions with what they alerted, the
/// open window and the closed ones not yet published.
pub struct Book {
    settings: Settings,
    parts: BTreeMap<i32, Partition>,
    open: Option<Window>,
    closed: VecDeque<Window>,
    /// Ids waiting in a window (open or closed).
    held: HashSet<String>,
    /// Images listed (here or, for partitions loaded, by their previous
    /// reader) within the last hour, for `max_per_hour`.
    listed: VecDeque<(i64, String)>,
    listed_ids: HashSet<String>,
    assignments: u64,
}

impl Book {
    pub fn new(settings: Settings) -> Book {
        Book {
            settings,
            parts: BTreeMap::new(),
            open: None,
            closed: VecDeque::new(),
            held: HashSet::new(),
            listed: VecDeque::new(),
            listed_ids: HashSet::new(),
            assignments: 0,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A partition assigned here; its alerted ids must be loaded before
    /// its records are read.
    pub fn assign(&mut self, p: i32) {
        self.revoke(p);
        self.assignments += 1;
        self.parts.insert(
            p,
            Partition {
                generation: self.assignments,
                ..Partition::default()
            },
        );
    }

    /// Which assignment of `p` this is (`None`: not assigned here).
    pub fn generation(&self, p: i32) -> Option<u64> {
        self.parts.get(&p).map(|s| s.generation)
    }

    /// A partition gone: what it had waiting is dropped unpublished (its
    /// offsets are not committed, so the next owner reads it again).
    pub fn revoke(&mut self, p: i32) {
        self.parts.remove(&p);
        if let Some(w) = self.open.as_mut() {
            w.drop_partition(p, &mut self.held);
        }
        for w in &mut self.closed {
            w.drop_partition(p, &mut self.held);
        }
    }

    pub fn revoke_all(&mut self) -> Vec<i32> {
        let all: Vec<i32> = self.parts.keys().copied().collect();
        for &p in &all {
            self.revoke(p);
        }
        all
    }

    pub fn assigned(&self) -> Vec<i32> {
        self.parts.keys().copied().collect()
    }

    pub fn is_assigned(&self, p: i32) -> bool {
        self.parts.contains_key(&p)
    }

    pub fn needs_load(&self, p: i32) -> bool {
        self.parts.get(&p).is_some_and(|s| !s.loaded)
    }

    /// The partition's state, read from the state topic: alerted ids and
    /// the position its published windows reached. Returns the ids older
    /// than the dedup window (to be deleted there).
    pub fn loaded(&mut self, p: i32, state: State, now_ms: i64) -> Vec<String> {
        let Some(part) = self.parts.get_mut(&p) else {
            return Vec::new();
        };
        let mut expired = Vec::new();
        let mut last_hour = Vec::new();
        for (id, at) in state.alerted {
            if now_ms - at > self.settings.dedup_window_ms {
                expired.push(id);
            } else {
                if now_ms - at < HOUR_MS {
                    last_hour.push((at, id.clone()));
                }
                part.alerted.insert(id, at);
            }
        }
        part.done_below = state.done_below;
        part.loaded = true;
        // Listed by the previous reader within the hour: they count
        // against this instance's hourly limit too (once).
        last_hour.sort();
        for (at, id) in last_hour {
            if self.listed_ids.insert(id.clone()) {
                self.listed.push_back((at, id));
            }
        }
        self.listed.make_contiguous().sort();
        expired
    }

    fn window(&mut self, now: Instant, now_ms: i64) -> &mut Window {
        let window = self.settings.window;
        self.open.get_or_insert_with(|| Window {
            opened_ms: now_ms,
            closes_at: now + window,
            closed_ms: now_ms,
            groups: BTreeMap::new(),
            storm: BTreeMap::new(),
            positions: BTreeMap::new(),
        })
    }

    /// A record read that lists nothing (not a review image): its offset
    /// is committed with the window.
    pub fn consume(&mut self, p: i32, offset: i64, now: Instant, now_ms: i64) -> bool {
        if !self.is_assigned(p) {
            return false;
        }
        let w = self.window(now, now_ms);
        let next = w.positions.entry(p).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
        true
    }

    fn listed_last_hour(&mut self, now_ms: i64) -> u64 {
        while self
            .listed
            .front()
            .is_some_and(|(at, _)| now_ms - at >= HOUR_MS)
        {
            if let Some((_, id)) = self.listed.pop_front() {
                self.listed_ids.remove(&id);
            }
        }
        self.listed.len() as u64
    }

    /// A review image read at `offset` of its partition.
    pub fn add(&mut self, item: Item, offset: i64, now: Instant, now_ms: i64) -> Added {
        let p = item.partition;
        if !self.consume(p, offset, now, now_ms) {
            return Added::NotAssigned;
        }
        if self.parts.get(&p).is_some_and(|s| offset < s.done_below) {
            // Read again (a commit that did not land): listed or counted
            // in a storm summary already.
            return Added::Duplicate;
        }
        let dedup = self.settings.dedup_window_ms;
        let alerted = self.parts.get(&p).and_then(|s| s.alerted.get(&item.id));
        if alerted.is_some_and(|at| now_ms - at <= dedup) || self.held.contains(&item.id) {
            return Added::Duplicate;
        }
        let used = self.listed_last_hour(now_ms) + self.held.len() as u64;
        let group = self.settings.group_of(&item.label).to_string();
        let over = used >= u64::from(self.settings.max_per_hour);
        let w = self.window(now, now_ms);
        if over {
            *w.storm.entry(p).or_default().entry(item.label).or_default() += 1;
            return Added::Storm;
        }
        self.held.insert(item.id.clone());
        let w = self.window(now, now_ms);
        w.groups.entry(group).or_default().push_back(item);
        Added::Listed
    }

    /// Whether `offset` of `p` is below what published windows read.
    pub fn already_done(&self, p: i32, offset: i64) -> bool {
        self.parts.get(&p).is_some_and(|s| offset < s.done_below)
    }

    /// When the open window closes.
    pub fn closes_at(&self) -> Option<Instant> {
        self.open.as_ref().map(|w| w.closes_at)
    }

    /// Closes the open window when its time is up (or `force`).
    pub fn close_due(&mut self, now: Instant, now_ms: i64, force: bool) {
        if self
            .open
            .as_ref()
            .is_some_and(|w| force || now >= w.closes_at)
        {
            if let Some(mut w) = self.open.take() {
                w.closed_ms = now_ms;
                self.closed.push_back(w);
            }
        }
    }

    /// Whether closed windows wait to be published.
    pub fn has_closed(&self) -> bool {
        !self.closed.is_empty()
    }

    /// Images read and not yet in a published message.
    pub fn pending_images(&self) -> u64 {
        self.open
            .iter()
            .chain(self.closed.iter())
            .map(|w| w.groups.values().map(|g| g.len() as u64).sum::<u64>() + w.storm_images())
            .sum()
    }

    /// The next message of the oldest closed window, if it has one left,
    /// with at most `limit` images.
    pub fn next(&self, limit: usize) -> Option<Outgoing> {
        let w = self.closed.front()?;
        if let Some((group, items)) = w.groups.iter().find(|(_, i)| !i.is_empty()) {
            let mut bytes = 0;
            let chunk: Vec<Item> = items
                .iter()
                .take(limit.max(1))
                .take_while(|i| {
                    bytes += i.id.len() + 4;
                    bytes <= IDS_BUDGET
                })
                .cloned()
                .collect();
            let mut chunk = if chunk.is_empty() {
                items.iter().take(1).cloned().collect()
            } else {
                chunk
            };
            // The least confident first: they are listed one by one.
            chunk.sort_by(|a, b| a.confidence.total_cmp(&b.confidence));
            return Some(Outgoing::Digest {
                group: group.clone(),
                items: chunk,
                window_start_ms: w.opened_ms,
                window_end_ms: w.closed_ms,
            });
        }
        if !w.storm.is_empty() {
            let mut counts = BTreeMap::<String, u64>::new();
            for by_label in w.storm.values() {
                for (label, n) in by_label {
                    *counts.entry(label.clone()).or_default() += n;
                }
            }
            return Some(Outgoing::Storm {
                counts,
                window_start_ms: w.opened_ms,
                window_end_ms: w.closed_ms,
            });
        }
        None
    }

    /// `out` was published: its images count as alerted. Returns the
    /// (partition, id) pairs to record on the state topic.
    pub fn sent(&mut self, out: &Outgoing, now_ms: i64) -> Vec<(i32, String)> {
        let Some(w) = self.closed.front_mut() else {
            return Vec::new();
        };
        match out {
            Outgoing::Digest { group, items, .. } => {
                let ids: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
                let mut recorded = Vec::new();
                if let Some(queue) = w.groups.get_mut(group) {
                    queue.retain(|i| {
                        if !ids.contains(i.id.as_str()) {
                            return true;
                        }
                        self.held.remove(&i.id);
                        if let Some(part) = self.parts.get_mut(&i.partition) {
                            part.alerted.insert(i.id.clone(), now_ms);
                            recorded.push((i.partition, i.id.clone()));
                        }
                        false
                    });
                    if queue.is_empty() {
                        w.groups.remove(group);
                    }
                }
                for i in items {
                    if self.listed_ids.insert(i.id.clone()) {
                        self.listed.push_back((now_ms, i.id.clone()));
                    }
                }
                recorded
            }
            Outgoing::Storm { .. } => {
                w.storm.clear();
                Vec::new()
            }
        }
    }

    /// Removes the oldest closed window once it has nothing left to
    /// publish; returns its read positions (of partitions still here).
    pub fn finish(&mut self) -> Option<BTreeMap<i32, i64>> {
        if !self.closed.front().is_some_and(Window::is_empty) {
            return None;
        }
        let w = self.closed.pop_front()?;
        let mut positions = BTreeMap::new();
        for (p, next) in w.positions {
            if let Some(part) = self.parts.get_mut(&p) {
                // Never backwards (a window re-reading below a recorded
                // position reads less far).
                part.done_below = part.done_below.max(next);
                positions.insert(p, part.done_below);
            }
        }
        Some(positions)
    }

    /// Forgets alerts older than the dedup window; returns them, to be
    /// deleted from the state topic.
    pub fn prune(&mut self, now_ms: i64) -> Vec<(i32, String)> {
        let dedup = self.settings.dedup_window_ms;
        let mut expired = Vec::new();
        for (p, part) in &mut self.parts {
            part.alerted.retain(|id, at| {
                let keep = now_ms - *at <= dedup;
                if !keep {
                    expired.push((*p, id.clone()));
                }
                keep
            });
        }
        self.listed_last_hour(now_ms);
        expired
    }
}

/// A partition's record on the state topic.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct State {
    /// Prediction id -> when it was alerted (ms).
    pub alerted: HashMap<String, i64>,
    /// The next offset after the windows published so far.
    pub done_below: i64,
}

/// The state topic key of a partition's position (a bucket name, which
/// begins every prediction id, cannot hold `:`).
pub fn position_key(p: i32) -> String {
    format!("position:{p}")
}

/// An SNS message: subject, text, attributes (name, data type, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub subject: String,
    pub body: String,
    pub attributes: Vec<(&'static str, &'static str, String)>,
    /// Images listed in it.
    pub images: usize,
}

impl Message {
    /// Its size as SNS counts it (message, subject and attributes), with
    /// the message JSON-escaped as SNS's envelope (e.g. to an SQS
    /// subscription) carries it, so that it fits there too.
    pub fn bytes(&self) -> usize {
        serde_json::to_string(&self.body).map_or(self.body.len() * 6, |e| e.len())
            + self.subject.len()
            + self
                .attributes
                .iter()
                .map(|(n, t, v)| n.len() + t.len() + v.len())
                .sum::<usize>()
    }
}

fn counts_of<'a>(labels: impl Iterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for l in labels {
        *counts.entry(l.to_string()).or_default() += 1;
    }
    counts
}

/// Labels shown with their counts at most; the rest are summed up.
const MAX_LABELS_SHOWN: usize = 20;

/// The largest `MAX_LABELS_SHOWN` counts, the rest summed as
/// `(other labels)`: a message stays small whatever the labels.
fn top_counts(counts: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.iter().map(|(l, n)| (l.clone(), *n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    if v.len() > MAX_LABELS_SHOWN {
        let rest: u64 = v[MAX_LABELS_SHOWN..].iter().map(|(_, n)| n).sum();
        v.truncate(MAX_LABELS_SHOWN);
        v.push(("(other labels)".into(), rest));
    }
    v
}

/// `bicycle 9, motorcycle 3`: largest first.
fn counts_text(counts: &BTreeMap<String, u64>) -> String {
    top_counts(counts)
        .iter()
        .map(|(l, n)| format!("{l} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The counts as JSON, as many as are shown.
fn counts_json(counts: &BTreeMap<String, u64>) -> serde_json::Map<String, serde_json::Value> {
    top_counts(counts)
        .into_iter()
        .map(|(l, n)| (l, n.into()))
        .collect()
}

/// The S3 console page of an object.
pub fn console_link(region: &str, bucket: &str, key: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    let region = if region.is_empty() {
        "us-east-1"
    } else {
        region
    };
    format!(
        "https://{region}.console.aws.amazon.com/s3/object/{}?region={region}&prefix={}",
        utf8_percent_encode(bucket, KEEP),
        utf8_percent_encode(key, KEEP)
    )
}

/// The text and JSON of `out`; `links[i]` goes with the i-th listed image
/// (the `s3://` URI where missing).
pub fn render(out: &Outgoing, links: &[String], s: &Settings) -> Message {
    match out {
        Outgoing::Digest {
            group,
            items,
            window_start_ms,
            window_end_ms,
        } => {
            let n = items.len();
            let counts = counts_of(items.iter().map(|i| i.label.as_str()));
            let grouped = !s.groups.is_empty();
            let prefix = if grouped {
                format!("[{group}] ")
            } else {
                String::new()
            };
            let noun = if n == 1 { "image needs" } else { "images need" };
            let subject = ascii_subject(&format!(
                "{prefix}{n} {noun} review ({})",
                counts_text(&counts)
            ));
            let mut body = format!(
                "{n} {} classified below the confidence threshold and {} review.\n\n",
                if n == 1 { "image was" } else { "images were" },
                if n == 1 { "needs" } else { "need" },
            );
            if grouped {
                let _ = writeln!(body, "Group:   {group}");
            }
            let _ = writeln!(
                body,
                "Window:  {} to {}",
                rfc3339(*window_start_ms),
                rfc3339(*window_end_ms)
            );
            let _ = writeln!(body, "Labels:  {}\n", counts_text(&counts));
            let mut text = 0;
            let mut shown = 0;
            for (i, item) in items.iter().take(s.max_items).enumerate() {
                let link = links
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("s3://{}/{}", item.bucket, item.key));
                let line = format!(
                    "- {} {:.2} (threshold {:.2})  {}/{}  processed {}\n  {link}\n",
                    item.label,
                    item.confidence,
                    item.threshold,
                    item.bucket,
                    item.key,
                    item.processed_at
                );
                if text + line.len() > TEXT_BUDGET {
                    break;
                }
                text += line.len();
                body.push_str(&line);
                shown += 1;
            }
            if shown < n {
                let rest = counts_of(items[shown..].iter().map(|i| i.label.as_str()));
                let _ = writeln!(
                    body,
                    "\n... and {} more ({}), listed by id below.",
                    n - shown,
                    counts_text(&rest)
                );
            }
            let _ = writeln!(
                body,
                "\nEvery prediction is on the Kafka topic `{}`.\n",
                s.review_topic
            );
            let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
            let json = json!({
                "schema": DIGEST_SCHEMA,
                "group": group,
                "window_start": rfc3339(*window_start_ms),
                "window_end": rfc3339(*window_end_ms),
                "count": n,
                "counts": counts_json(&counts),
                "review_topic": s.review_topic,
                "ids": ids,
            });
            body.push_str("Digest record:\n");
            body.push_str(&json.to_string());
            body.push('\n');
            Message {
                subject,
                body,
                attributes: vec![
                    ("kind", "String", "digest".into()),
                    ("group", "String", group.clone()),
                    ("count", "Number", n.to_string()),
                ],
                images: n,
            }
        }
        Outgoing::Storm {
            counts,
            window_start_ms,
            window_end_ms,
        } => {
            let n: u64 = counts.values().sum();
            let subject = ascii_subject(&format!("Alert storm: {n} more images need review"));
            let json = json!({
                "schema": STORM_SCHEMA,
                "window_start": rfc3339(*window_start_ms),
                "window_end": rfc3339(*window_end_ms),
                "suppressed": n,
                "counts": counts_json(counts),
                "max_per_hour": s.max_per_hour,
                "review_topic": s.review_topic,
            });
            let body = format!(
                "Alert storm: {n} more images need review than alerts.max_per_hour ({}) lets the digests list.\n\n\
                 Window:  {} to {}\n\
                 Labels:  {}\n\n\
                 They are not listed one by one; every prediction is on the Kafka topic `{}`.\n\
                 A storm often means the model or its input changed: look at the confidence\n\
                 panel of the dashboard before going through them.\n\n\
                 Storm record:\n{json}\n",
                s.max_per_hour,
                rfc3339(*window_start_ms),
                rfc3339(*window_end_ms),
                counts_text(counts),
                s.review_topic,
            );
            Message {
                subject,
                body,
                attributes: vec![
                    ("kind", "String", "storm".into()),
                    ("count", "Number", n.to_string()),
                ],
                images: 0,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(groups: &[(&str, &str)]) -> Settings {
        Settings {
            window: Duration::from_secs(60),
            max_items: 3,
            max_per_hour: 10,
            dedup_window_ms: 24 * HOUR_MS,
            groups: groups
                .iter()
                .map(|(l, g)| (l.to_string(), g.to_string()))
                .collect(),
            default_group: if groups.is_empty() { "all" } else { "other" }.into(),
            review_topic: "review".into(),
        }
    }

    fn item(id: &str, label: &str, p: i32) -> Item {
        Item {
            id: id.into(),
            bucket: "uploads".into(),
            key: format!("k/{id}.png"),
            label: label.into(),
            confidence: 0.5,
            threshold: 0.93,
            processed_at: "2026-12-01T15:00:00Z".into(),
            partition: p,
        }
    }

    fn ready(book: &mut Book, parts: &[i32]) {
        for &p in parts {
            book.assign(p);
            book.loaded(p, State::default(), 0);
        }
    }

    /// Publishes everything closed; returns the messages and positions.
    fn drain(book: &mut Book, at: i64) -> (Vec<Outgoing>, Vec<BTreeMap<i32, i64>>) {
        let (mut sent, mut positions) = (Vec::new(), Vec::new());
        loop {
            if let Some(out) = book.next(usize::MAX) {
                book.sent(&out, at);
                sent.push(out);
            } else if let Some(pos) = book.finish() {
                positions.push(pos);
            } else {
                return (sent, positions);
            }
        }
    }

    #[test]
    fn a_window_makes_one_digest_per_group_and_commits_what_it_read() {
        let mut book = Book::new(settings(&[
            ("bicycle", "vehicles"),
            ("motorcycle", "vehicles"),
        ]));
        ready(&mut book, &[0, 1]);
        let t = Instant::now();
        assert_eq!(book.add(item("a", "bicycle", 0), 5, t, 0), Added::Listed);
        assert_eq!(book.add(item("b", "motorcycle", 1), 9, t, 0), Added::Listed);
        assert_eq!(book.add(item("c", "cat", 0), 6, t, 0), Added::Listed);
        assert!(book.consume(1, 10, t, 0));
        book.close_due(t, 0, false);
        assert!(!book.has_closed(), "the window is not over yet");
        book.close_due(t + Duration::from_secs(60), 60_000, false);
        let (sent, positions) = drain(&mut book, 60_000);
        let groups: Vec<(String, usize)> = sent
            .iter()
            .map(|o| match o {
                Outgoing::Digest { group, items, .. } => (group.clone(), items.len()),
                Outgoing::Storm { .. } => ("storm".into(), 0),
            })
            .collect();
        assert_eq!(groups, [("other".into(), 1), ("vehicles".into(), 2)]);
        assert_eq!(positions, [BTreeMap::from([(0, 7), (1, 11)])]);
        assert_eq!(book.pending_images(), 0);
    }

    #[test]
    fn an_id_is_alerted_once_within_the_dedup_window() {
        let mut book = Book::new(settings(&[]));
        ready(&mut book, &[0]);
        let t = Instant::now();
        assert_eq!(book.add(item("a", "cat", 0), 0, t, 0), Added::Listed);
        assert_eq!(
            book.add(item("a", "cat", 0), 1, t, 0),
            Added::Duplicate,
            "waiting"
        );
        book.close_due(t, 0, true);
        drain(&mut book, 1_000);
        assert_eq!(
            book.add(item("a", "cat", 0), 2, t, 2_000),
            Added::Duplicate,
            "alerted"
        );
        // Recorded alerts from the state topic count the same.
        book.assign(1);
        let expired = book.loaded(
            1,
            State {
                alerted: HashMap::from([
                    ("b".to_string(), 1_000),
                    ("old".to_string(), -25 * HOUR_MS),
                ]),
                done_below: 0,
            },
            2_000,
        );
        assert_eq!(expired, ["old"]);
        assert_eq!(book.add(item("b", "cat", 1), 0, t, 2_000), Added::Duplicate);
        assert_eq!(book.add(item("old", "cat", 1), 1, t, 2_000), Added::Listed);
        // Past the window, an image may be alerted again.
        let later = 1_000 + 24 * HOUR_MS + 1;
        assert_eq!(
            book.prune(later),
            [(0, "a".to_string()), (1, "b".to_string())]
        );
        assert_eq!(book.add(item("a", "cat", 0), 3, t, later), Added::Listed);
    }

    #[test]
    fn a_partition_assigned_again_does_not_count_its_listings_twice() {
        let mut book = Book::new(settings(&[]));
        let state = State {
            alerted: (0..6).map(|i| (format!("x{i}"), 1_000)).collect(),
            done_below: 0,
        };
        for _ in 0..3 {
            book.assign(0);
            book.loaded(0, state.clone(), 2_000);
            book.revoke(0);
        }
        book.assign(0);
        book.loaded(0, state, 2_000);
        let t = Instant::now();
        // 10 an hour, 6 used: 4 more are listed.
        let listed = (0..8)
            .filter(|i| book.add(item(&format!("n{i}"), "cat", 0), *i, t, 3_000) == Added::Listed)
            .count();
        assert_eq!(listed, 4);
    }

    #[test]
    fn records_below_the_recorded_position_are_not_counted_again() {
        let mut book = Book::new(settings(&[]));
        book.assign(0);
        book.loaded(
            0,
            State {
                alerted: HashMap::new(),
                done_below: 10,
            },
            0,
        );
        let t = Instant::now();
        assert!(book.already_done(0, 3) && !book.already_done(0, 10));
        assert_eq!(book.add(item("a", "cat", 0), 9, t, 0), Added::Duplicate);
        assert_eq!(book.add(item("b", "cat", 0), 10, t, 0), Added::Listed);
        book.close_due(t, 0, true);
        let (_, positions) = drain(&mut book, 0);
        assert_eq!(positions, [BTreeMap::from([(0, 11)])]);
        // A window that read again below the recorded position does not
        // move it back.
        assert!(book.consume(0, 3, t, 0));
        book.close_due(t, 0, true);
        let (_, positions) = drain(&mut book, 0);
        assert_eq!(positions, [BTreeMap::from([(0, 11)])]);
    }

    #[test]
    fn over_the_hourly_limit_images_are_counted_in_one_storm_summary() {
        let mut book = Book::new(settings(&[]));
        ready(&mut book, &[0]);
        let t = Instant::now();
        let added: Vec<Added> = (0..25)
            .map(|i| {
                book.add(
                    item(&format!("i{i}"), if i % 2 == 0 { "cat" } else { "dog" }, 0),
                    i,
                    t,
                    0,
                )
            })
            .collect();
        assert_eq!(added.iter().filter(|a| **a == Added::Listed).count(), 10);
        book.close_due(t, 0, true);
        let (sent, _) = drain(&mut book, 0);
        assert_eq!(sent.len(), 2);
        let Outgoing::Storm { counts, .. } = &sent[1] else {
            panic!("{sent:?}")
        };
        assert_eq!(counts.values().sum::<u64>(), 15);
        // The hour is used up: the next window lists nothing either ...
        assert_eq!(
            book.add(item("x", "cat", 0), 30, t, 10 * 60_000),
            Added::Storm
        );
        // ... until an hour after the listing.
        assert_eq!(book.add(item("y", "cat", 0), 31, t, HOUR_MS), Added::Listed);
    }

    #[test]
    fn a_revoked_partition_leaves_its_images_unpublished_and_uncommitted() {
        let mut book = Book::new(settings(&[]));
        ready(&mut book, &[0, 1]);
        let t = Instant::now();
        book.add(item("a", "cat", 0), 0, t, 0);
        book.add(item("b", "cat", 1), 0, t, 0);
        book.close_due(t, 0, true);
        book.revoke(1);
        assert!(!book.is_assigned(1));
        assert_eq!(book.add(item("c", "cat", 1), 1, t, 0), Added::NotAssigned);
        let (sent, positions) = drain(&mut book, 0);
        let Outgoing::Digest { items, .. } = &sent[0] else {
            panic!()
        };
        assert_eq!(
            items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(positions, [BTreeMap::from([(0, 1)])]);
    }

    #[test]
    fn many_long_ids_are_split_over_messages_that_fit_sns() {
        let mut s = settings(&[]);
        s.max_per_hour = 10_000;
        let mut book = Book::new(s.clone());
        ready(&mut book, &[0]);
        let t = Instant::now();
        for i in 0..400 {
            let id = format!("{i}-{}", "k".repeat(1000));
            book.add(item(&id, "cat", 0), i, t, 0);
        }
        book.close_due(t, 0, true);
        let mut total = 0;
        while let Some(out) = book.next(usize::MAX) {
            let m = render(&out, &[], &s);
            assert!(m.body.len() < 250_000, "{}", m.body.len());
            assert!(m.subject.len() < 100);
            total += m.images;
            book.sent(&out, 0);
        }
        assert_eq!(total, 400);
        assert!(book.finish().is_some());
    }

    #[test]
    fn a_digest_reads_as_text_and_ends_with_its_ids() {
        let s = settings(&[]);
        let items: Vec<Item> = ["a", "b", "c", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, id)| item(id, if i < 3 { "bicycle" } else { "motorcycle" }, 0))
            .collect();
        let out = Outgoing::Digest {
            group: "all".into(),
            items,
            window_start_ms: 0,
            window_end_ms: 300_000,
        };
        let m = render(&out, &["https://link/a".into()], &s);
        assert_eq!(m.subject, "5 images need review (bicycle 3, motorcycle 2)");
        assert!(m.body.contains("https://link/a"), "{}", m.body);
        assert!(m.body.contains("s3://uploads/k/b.png"), "{}", m.body);
        assert!(m.body.contains("and 2 more (motorcycle 2)"), "{}", m.body);
        assert!(m.body.contains("1970-01-01T00:05:00Z"), "{}", m.body);
        let json_at = m.body.find("{\"").unwrap();
        let v: serde_json::Value = serde_json::from_str(m.body[json_at..].trim()).unwrap();
        assert_eq!(v["schema"], DIGEST_SCHEMA);
        assert_eq!(v["ids"].as_array().unwrap().len(), 5);
        assert_eq!(v["counts"]["bicycle"], 3);
        let storm = render(
            &Outgoing::Storm {
                counts: BTreeMap::from([("cat".to_string(), 7)]),
                window_start_ms: 0,
                window_end_ms: 1,
            },
            &[],
            &s,
        );
        assert_eq!(storm.subject, "Alert storm: 7 more images need review");
        assert!(storm
            .attributes
            .contains(&("kind", "String", "storm".into())));
    }

    #[test]
    fn console_links_encode_the_key() {
        assert_eq!(
            console_link("eu-west-1", "uploads", "bikes/img 1+ü.png"),
            "https://eu-west-1.console.aws.amazon.com/s3/object/uploads?region=eu-west-1&prefix=bikes/img%201%2B%C3%BC.png"
        );
    }
}
