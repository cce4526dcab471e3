//! The latest predictions made here, for the console: rates, the
//! confidence histogram, what share each threshold would send to review,
//! and the queue of the latest review predictions.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// One prediction, as much as the console needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub at_ms: i64,
    pub label: String,
    pub confidence: f64,
    pub review: bool,
}

/// A prediction made here whose true label came (ground truth).
#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    pub label: String,
    pub confidence: f64,
    pub correct: bool,
}

/// The last `capacity` predictions made here, and the last `capacity`
/// judged.
pub struct Recent {
    capacity: usize,
    started_ms: i64,
    seen: Mutex<VecDeque<Seen>>,
    judged: Mutex<VecDeque<Judgment>>,
    review: Mutex<VecDeque<ReviewItem>>,
}

/// Review predictions kept for the console's queue.
pub const REVIEW_QUEUE: usize = 200;

/// A review prediction in the console's queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewItem {
    pub id: String,
    pub bucket: String,
    pub key: String,
    /// The version classified: the object's version id or ETag.
    pub version_id: Option<String>,
    pub etag: Option<String>,
    pub label: String,
    pub confidence: f64,
    pub scores: std::collections::BTreeMap<String, f64>,
    pub processed_at: String,
    /// The label a reviewer gave, once given here.
    pub reviewed: Option<String>,
}

/// Bins of the confidence histogram.
pub const BINS: usize = 20;

/// What the console's live view shows, over the predictions of a period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The seconds the summary covers: the period asked for, or less when
    /// the instance started later or more predictions came than are kept.
    pub seconds: f64,
    /// Predictions in those seconds, and per second over the last minute
    /// of them.
    pub predictions: usize,
    pub per_second: f64,
    pub accepted: usize,
    pub review: usize,
    /// Counts per confidence bin (0–0.05, …, 0.95–1), accepted and review.
    pub histogram_accepted: Vec<usize>,
    pub histogram_review: Vec<usize>,
}

/// For one threshold: the share of the predictions it would send to
/// review, and of the judged ones it would accept the share right.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    pub threshold: f64,
    pub review_share: f64,
    /// None when no judged prediction would be accepted.
    pub accepted_accuracy: Option<f64>,
    pub accepted_judged: usize,
}

impl Recent {
    pub fn new(capacity: usize, started_ms: i64) -> Recent {
        Recent {
            capacity: capacity.max(1),
            started_ms,
            seen: Mutex::new(VecDeque::new()),
            judged: Mutex::new(VecDeque::new()),
            review: Mutex::new(VecDeque::new()),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<ReviewItem>> {
        self.review.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A review prediction, into the queue (the oldest leaves past
    /// [`REVIEW_QUEUE`]; the same id again replaces it).
    pub fn add_review(&self, item: ReviewItem) {
        let mut q = self.queue();
        q.retain(|i| i.id != item.id);
        if q.len() >= REVIEW_QUEUE {
            q.pop_front();
        }
        q.push_back(item);
    }

    /// The queue, newest first.
    pub fn reviews(&self) -> Vec<ReviewItem> {
        self.queue().iter().rev().cloned().collect()
    }

    /// The queued prediction `id`, if it is in the queue.
    pub fn review_item(&self, id: &str) -> Option<ReviewItem> {
        self.queue().iter().find(|i| i.id == id).cloned()
    }

    /// Takes the answer `label` for `id`, unless it is not queued or was
    /// answered already (then the first answer).
    pub fn claim(&self, id: &str, label: &str) -> Result<(), Option<String>> {
        let mut q = self.queue();
        let item = q.iter_mut().find(|i| i.id == id).ok_or(None)?;
        if let Some(first) = &item.reviewed {
            return Err(Some(first.clone()));
        }
        item.reviewed = Some(label.to_string());
        Ok(())
    }

    /// Gives up a claimed answer that could not be recorded.
    pub fn release(&self, id: &str) {
        if let Some(i) = self.queue().iter_mut().find(|i| i.id == id) {
            i.reviewed = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, s: Seen) {
        let mut seen = self.lock();
        if seen.len() >= self.capacity {
            seen.pop_front();
        }
        seen.push_back(s);
    }

    /// The predictions of the last `period_ms` before `now_ms`.
    pub fn summary(&self, now_ms: i64, period_ms: i64) -> Summary {
        let seen = self.lock();
        // Where what is kept starts: the start, or the oldest kept when
        // older ones were dropped.
        let kept_from = match seen.front() {
            Some(oldest) if seen.len() >= self.capacity => oldest.at_ms,
            _ => self.started_ms,
        };
        let from = (now_ms - period_ms).max(kept_from);
        let minute_from = (now_ms - 60_000).max(kept_from);
        let mut s = Summary {
            seconds: (now_ms - from).max(0) as f64 / 1000.0,
            predictions: 0,
            per_second: 0.0,
            accepted: 0,
            review: 0,
            histogram_accepted: vec![0; BINS],
            histogram_review: vec![0; BINS],
        };
        let mut last_minute = 0usize;
        for p in seen.iter().filter(|p| p.at_ms >= from) {
            s.predictions += 1;
            if p.at_ms >= minute_from {
                last_minute += 1;
            }
            if !p.confidence.is_finite() {
                continue;
            }
            let bin = ((p.confidence.clamp(0.0, 1.0) * BINS as f64) as usize).min(BINS - 1);
            if p.review {
                s.review += 1;
                s.histogram_review[bin] += 1;
            } else {
                s.accepted += 1;
                s.histogram_accepted[bin] += 1;
            }
        }
        s.per_second = last_minute as f64 / ((now_ms - minute_from).max(1000) as f64 / 1000.0);
        s
    }

    /// A judged prediction (the oldest leaves past the capacity).
    pub fn add_judged(&self, j: Judgment) {
        let mut judged = self.judged.lock().unwrap_or_else(|p| p.into_inner());
        if judged.len() >= self.capacity {
            judged.pop_front();
        }
        judged.push_back(j);
    }

    /// For the predictions whose label `wanted` says, the share of the
    /// kept ones each threshold from 0.5 to 1 (by 0.01) would send to
    /// review, and the accuracy of the judged ones it would accept.
    /// Returns how many predictions and judgments that covers too.
    pub fn curve(&self, wanted: impl Fn(&str) -> bool) -> (usize, usize, Vec<CurvePoint>) {
        let confidences: Vec<f64> = self
            .lock()
            .iter()
            .filter(|p| wanted(&p.label))
            .map(|p| p.confidence)
            .filter(|c| c.is_finite())
            .collect();
        let judged: Vec<(f64, bool)> = self
            .judged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|j| wanted(&j.label) && j.confidence.is_finite())
            .map(|j| (j.confidence, j.correct))
            .collect();
        let thresholds = (50..=100).map(|i| i as f64 / 100.0);
        let curve = curve_of(&confidences, &judged, thresholds);
        (confidences.len(), judged.len(), curve)
    }
}

/// For each threshold: the share of `confidences` below it (to review),
/// and of `judged` (confidence, right) the share right of those at or
/// above it (accepted). The console's curve and the report's.
pub fn curve_of(
    confidences: &[f64],
    judged: &[(f64, bool)],
    thresholds: impl Iterator<Item = f64>,
) -> Vec<CurvePoint> {
    thresholds
        .map(|threshold| {
            let below = confidences.iter().filter(|c| **c < threshold).count();
            let accepted = judged.iter().filter(|(c, _)| *c >= threshold);
            let (total, right) =
                accepted.fold((0, 0), |(t, r), (_, ok)| (t + 1, r + usize::from(*ok)));
            CurvePoint {
                threshold,
                review_share: below as f64 / confidences.len().max(1) as f64,
                accepted_accuracy: (total > 0).then(|| right as f64 / total as f64),
                accepted_judged: total,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(at_ms: i64, label: &str, confidence: f64) -> Seen {
        Seen {
            at_ms,
            label: label.into(),
            confidence,
            review: confidence < 0.9,
        }
    }

    #[test]
    fn the_summary_covers_the_period_and_the_rate_the_last_minute() {
        let r = Recent::new(100, 0);
        r.add(seen(0, "cat", 0.99));
        for i in 0..30 {
            r.add(seen(500_000 + i, "cat", if i < 10 { 0.7 } else { 0.97 }));
        }
        let s = r.summary(540_000, 600_000);
        assert_eq!((s.predictions, s.accepted, s.review), (31, 21, 10));
        assert_eq!((s.per_second, s.seconds), (0.5, 540.0));
        assert_eq!(s.histogram_review[14], 10);
        assert_eq!(s.histogram_accepted[19], 21);
        // Only the last ten minutes.
        assert_eq!(r.summary(650_000, 600_000).predictions, 30);
    }

    #[test]
    fn the_rate_is_over_what_is_known_not_a_full_minute() {
        // Started 10 s ago: 50 predictions are 5 a second.
        let r = Recent::new(100, 0);
        for i in 0..50 {
            r.add(seen(i * 200, "cat", 0.99));
        }
        let s = r.summary(10_000, 600_000);
        assert_eq!((s.per_second, s.seconds), (5.0, 10.0));
        // More than are kept: the rate and period cover what is kept.
        let r = Recent::new(10, 0);
        for i in 0..1000 {
            r.add(seen(100_000 + i * 10, "cat", 0.99));
        }
        let s = r.summary(110_000, 600_000);
        assert_eq!(s.predictions, 10);
        assert!((s.seconds - 0.1).abs() < 1e-9, "{}", s.seconds);
        assert_eq!(s.per_second, 10.0);
    }

    #[test]
    fn the_review_queue_is_bounded_newest_first_and_remembers_answers() {
        let r = Recent::new(10, 0);
        let item = |i: usize| ReviewItem {
            id: format!("u/k{i}@e"),
            bucket: "u".into(),
            key: format!("k{i}"),
            version_id: None,
            etag: None,
            label: "cat".into(),
            confidence: 0.6,
            scores: Default::default(),
            processed_at: String::new(),
            reviewed: None,
        };
        for i in 0..REVIEW_QUEUE + 5 {
            r.add_review(item(i));
        }
        let q = r.reviews();
        assert_eq!(q.len(), REVIEW_QUEUE);
        assert_eq!(q[0].id, format!("u/k{}@e", REVIEW_QUEUE + 4));
        assert!(r.review_item("u/k0@e").is_none());
        assert_eq!(r.claim("u/k10@e", "dog"), Ok(()));
        assert_eq!(r.claim("u/k10@e", "cat"), Err(Some("dog".into())));
        assert_eq!(r.claim("u/k0@e", "cat"), Err(None));
        assert_eq!(
            r.review_item("u/k10@e").unwrap().reviewed.as_deref(),
            Some("dog")
        );
        r.release("u/k10@e");
        assert_eq!(r.claim("u/k10@e", "cat"), Ok(()));
        // Redelivered: replaced, not doubled.
        r.add_review(item(10));
        assert_eq!(r.reviews().len(), REVIEW_QUEUE);
    }

    #[test]
    fn the_curve_counts_what_each_threshold_sends_to_review() {
        let r = Recent::new(3, 0);
        r.add(seen(0, "dog", 0.1));
        for c in [0.6, 0.8, 0.95] {
            r.add(seen(1, "cat", c));
        }
        // The oldest fell out.
        r.add_judged(Judgment {
            label: "cat".into(),
            confidence: 0.95,
            correct: true,
        });
        r.add_judged(Judgment {
            label: "cat".into(),
            confidence: 0.8,
            correct: false,
        });
        let (n, judged, curve) = r.curve(|_| true);
        assert_eq!((n, judged), (3, 2));
        let at = |t: f64| {
            curve
                .iter()
                .find(|p| (p.threshold - t).abs() < 1e-9)
                .unwrap()
                .review_share
        };
        assert_eq!(at(0.5), 0.0);
        assert!((at(0.81) - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(at(1.0), 1.0);
        assert_eq!(r.curve(|l| l == "dog").0, 0);
        // Accepted at 0.8: one right, one wrong; at 0.9 only the right one.
        let point = |t: f64| {
            curve
                .iter()
                .find(|p| (p.threshold - t).abs() < 1e-9)
                .unwrap()
        };
        assert_eq!(
            (point(0.8).accepted_accuracy, point(0.8).accepted_judged),
            (Some(0.5), 2)
        );
        assert_eq!(point(0.9).accepted_accuracy, Some(1.0));
        assert_eq!(point(1.0).accepted_accuracy, None);
    }
}
