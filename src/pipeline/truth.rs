//! Ground truth: true labels joined to this instance's predictions by
//! prediction id (or the capture's `eventId`), for accuracy, per-label
//! precision and recall, and the confusion matrix.
//!
//! Every instance reads all ground truth and joins what it predicted;
//! summed over instances (Prometheus `sum`), the counts cover every
//! prediction once. Predictions are kept for `monitor.ground_truth_window`
//! (at most `MAX_KEPT` of them); a label for a prediction made here
//! longer ago than that is counted as late, one for a prediction made
//! elsewhere (or before a restart) is not counted here.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::pipeline::recent::{Judgment, Recent};
use crate::record::{Decision, Prediction};

/// Predictions kept for joining, at most (about 500 bytes each with their
/// keys: about 100 MB); past it the oldest are expired early.
pub const MAX_KEPT: usize = 200_000;
/// Keys of expired predictions remembered (to count their labels late),
/// at most (about 200 bytes each).
pub const MAX_EXPIRED: usize = 400_000;

/// What a ground-truth label did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Matched a prediction within the window: counted.
    Matched { correct: bool },
    /// Its prediction was made here, longer ago than the window.
    Late,
    /// Its prediction was not made here (another instance, or before a
    /// restart): left to the instance that made it.
    NotHere,
    /// A second label for a prediction already judged: ignored.
    Again,
}

#[derive(Debug, Clone)]
struct Kept {
    label: String,
    confidence: f64,
    review: bool,
    judged: bool,
}

/// A judged prediction: its predicted and true label, and whether it was
/// sent to review.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub predicted: String,
    pub confidence: f64,
    pub actual: String,
    pub review: bool,
}

/// The join state.
pub struct Truth {
    window_ms: i64,
    /// key (prediction id or event id) -> prediction.
    kept: HashMap<String, Kept>,
    /// Keys in the order kept, for expiry; an id and its event id share
    /// one entry here (the id).
    order: VecDeque<(i64, String, String)>,
    /// Event id -> prediction id.
    event_ids: HashMap<String, String>,
    /// Ids expired from `kept` (made here): their labels are late.
    expired: HashSet<String>,
    expired_order: VecDeque<(i64, String)>,
}

impl Truth {
    pub fn new(window: Duration) -> Truth {
        Truth {
            window_ms: window.as_millis() as i64,
            kept: HashMap::new(),
            order: VecDeque::new(),
            event_ids: HashMap::new(),
            expired: HashSet::new(),
            expired_order: VecDeque::new(),
        }
    }

    /// A prediction made here.
    pub fn predicted(
        &mut self,
        id: &str,
        event_id: String,
        label: &str,
        confidence: f64,
        review: bool,
        at_ms: i64,
    ) {
        self.expire(at_ms);
        if self.kept.contains_key(id) {
            return;
        }
        while self.kept.len() >= MAX_KEPT {
            if !self.expire_one() {
                break;
            }
        }
        self.kept.insert(
            id.to_string(),
            Kept {
                label: label.to_string(),
                confidence,
                review,
                judged: false,
            },
        );
        self.event_ids.insert(event_id.clone(), id.to_string());
        self.order.push_back((at_ms, id.to_string(), event_id));
    }

    fn expire_one(&mut self) -> bool {
        let Some((at, id, event_id)) = self.order.pop_front() else {
            return false;
        };
        self.kept.remove(&id);
        self.event_ids.remove(&event_id);
        for key in [id, event_id] {
            if self.expired.insert(key.clone()) {
                self.expired_order.push_back((at, key));
            }
        }
        while self.expired_order.len() > MAX_EXPIRED {
            if let Some((_, key)) = self.expired_order.pop_front() {
                self.expired.remove(&key);
            }
        }
        true
    }

    /// Forgets predictions older than the window (their labels are late
    /// from now on), and late-markers older than twice the window.
    pub fn expire(&mut self, now_ms: i64) {
        while self
            .order
            .front()
            .is_some_and(|(at, _, _)| now_ms - at > self.window_ms)
        {
            self.expire_one();
        }
        while self
            .expired_order
            .front()
            .is_some_and(|(at, _)| now_ms - at > 2 * self.window_ms)
        {
            if let Some((_, id)) = self.expired_order.pop_front() {
                self.expired.remove(&id);
            }
        }
    }

    /// A true label for `key` (a prediction id or an event id).
    pub fn label(&mut self, key: &str, actual: &str, now_ms: i64) -> (Joined, Option<Judged>) {
        self.expire(now_ms);
        let id = self
            .event_ids
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.to_string());
        match self.kept.get_mut(&id) {
            Some(k) if k.judged => (Joined::Again, None),
            Some(k) => {
                k.judged = true;
                let judged = Judged {
                    predicted: k.label.clone(),
                    confidence: k.confidence,
                    actual: actual.to_string(),
                    review: k.review,
                };
                (
                    Joined::Matched {
                        correct: judged.predicted == judged.actual,
                    },
                    Some(judged),
                )
            }
            None if self.expired.contains(&id) => (Joined::Late, None),
            None => (Joined::NotHere, None),
        }
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms as u64)
    }

    /// Predictions kept for joining.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }
}

/// The join of this instance's predictions with the true labels, and the
/// metrics it keeps.
pub struct GroundTruth {
    truth: Mutex<Truth>,
    /// (actual, predicted) -> count, since start.
    matrix: Mutex<BTreeMap<(String, String), u64>>,
    labels: Vec<String>,
    metrics: Arc<Metrics>,
    /// The console's recent predictions, told of each judged one (for the
    /// accuracy each threshold would accept).
    recent: Option<Arc<Recent>>,
}

impl GroundTruth {
    pub fn new(
        window: Duration,
        labels: &[String],
        metrics: Arc<Metrics>,
        recent: Option<Arc<Recent>>,
    ) -> Arc<GroundTruth> {
        Arc::new(GroundTruth {
            truth: Mutex::new(Truth::new(window)),
            matrix: Mutex::new(BTreeMap::new()),
            labels: labels.to_vec(),
            metrics,
            recent,
        })
    }

    fn truth(&self) -> std::sync::MutexGuard<'_, Truth> {
        self.truth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A prediction made here.
    pub fn predicted(&self, p: &Prediction) {
        let event_id = crate::record::event_id(&p.id);
        let mut t = self.truth();
        t.predicted(
            &p.id,
            event_id,
            &p.label,
            p.confidence,
            p.decision == Decision::Review,
            now_ms(),
        );
        self.metrics.ground_truth_waiting.set(t.kept() as i64);
    }

    /// A label as the metrics name it: one of the model's, or `other`.
    fn bounded<'a>(&self, label: &'a str) -> &'a str {
        if self.labels.iter().any(|l| l == label) {
            label
        } else {
            "other"
        }
    }

    /// One ground-truth record.
    pub fn record(&self, payload: &[u8]) -> Joined {
        let Some((key, actual)) = parse(payload, &self.labels) else {
            self.metrics
                .ground_truth_labels
                .with_label_values(&["bad"])
                .inc();
            return Joined::NotHere;
        };
        let (joined, judged) = self.truth().label(&key, &actual, now_ms());
        let outcome = match joined {
            Joined::Matched { .. } => "matched",
            Joined::Late => "late",
            Joined::NotHere => "not_here",
            Joined::Again => "again",
        };
        self.metrics
            .ground_truth_labels
            .with_label_values(&[outcome])
            .inc();
        if let Some(j) = judged {
            self.count(&j);
            if let Some(recent) = &self.recent {
                recent.add_judged(Judgment {
                    label: j.predicted.clone(),
                    confidence: j.confidence,
                    correct: j.predicted == j.actual,
                });
            }
        }
        joined
    }

    fn count(&self, j: &Judged) {
        let (actual, predicted) = (self.bounded(&j.actual), self.bounded(&j.predicted));
        let m = &self.metrics;
        m.confusion.with_label_values(&[actual, predicted]).inc();
        let decision = if j.review { "review" } else { "accepted" };
        m.judged.with_label_values(&[decision]).inc();
        if j.actual == j.predicted {
            m.correct.with_label_values(&[decision]).inc();
        }
        let mut matrix = self.matrix.lock().unwrap_or_else(|p| p.into_inner());
        *matrix
            .entry((actual.to_string(), predicted.to_string()))
            .or_default() += 1;
        let total: u64 = matrix.values().sum();
        let right: u64 = matrix
            .iter()
            .filter(|((a, p), _)| a == p)
            .map(|(_, n)| n)
            .sum();
        m.accuracy.set(right as f64 / total.max(1) as f64);
        for label in [actual, predicted] {
            let tp = matrix
                .get(&(label.to_string(), label.to_string()))
                .copied()
                .unwrap_or(0) as f64;
            let predicted_as: u64 = matrix
                .iter()
                .filter(|((_, p), _)| p == label)
                .map(|(_, n)| n)
                .sum();
            let actually: u64 = matrix
                .iter()
                .filter(|((a, _), _)| a == label)
                .map(|(_, n)| n)
                .sum();
            if predicted_as > 0 {
                m.precision
                    .with_label_values(&[label])
                    .set(tp / predicted_as as f64);
            }
            if actually > 0 {
                m.recall
                    .with_label_values(&[label])
                    .set(tp / actually as f64);
            }
        }
    }

    /// Forgets predictions past the window (their labels are late).
    pub fn expire(&self) {
        let mut t = self.truth();
        t.expire(now_ms());
        self.metrics.ground_truth_waiting.set(t.kept() as i64);
    }

    /// A ground-truth line that could not be read (too long).
    pub fn bad_line(&self) {
        self.metrics
            .ground_truth_labels
            .with_label_values(&["bad"])
            .inc();
    }

    /// How long predictions wait for their label.
    pub fn window(&self) -> Duration {
        self.truth().window()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Reads every partition of `topic` from its end (labels for
    /// predictions made before this start cannot be joined here), until
    /// the task is aborted.
    pub async fn run(self: Arc<Self>, kafka: KafkaConfig, group: String, topic: String) {
        use rdkafka::consumer::StreamConsumer;
        use rdkafka::message::Message as _;
        loop {
            // Off the runtime: metadata blocks, up to 10 s.
            let connect = {
                let (kafka, group, topic) = (kafka.clone(), group.clone(), topic.clone());
                move || -> Result<StreamConsumer, String> {
                    let c: StreamConsumer =
                        crate::clients::kafka::state_reader_config(&kafka, &group)
                            .create()
                            .map_err(|e| e.to_string())?;
                    crate::clients::kafka::assign_all(
                        &c,
                        &topic,
                        |_| rdkafka::Offset::End,
                        "monitor.ground_truth_topic",
                    )?;
                    Ok(c)
                }
            };
            let assigned = tokio::task::spawn_blocking(connect)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            let consumer = match assigned {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "ground truth: cannot read monitor.ground_truth_topic; trying again in 10 s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    continue;
                }
            };
            tracing::info!(%topic, "ground truth: reading true labels");
            loop {
                match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
                    Ok(Ok(m)) => {
                        self.record(m.payload().unwrap_or_default());
                    }
                    // Caught up with a partition: not a failure.
                    Ok(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "ground truth: reading failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(_) => self.expire(),
                }
            }
        }
    }
}

use crate::record::now_ms;

/// `{"id", "label"}`, or Model Monitor's ground-truth line
/// (`groundTruthData.data` the label, or its index in the model's labels;
/// `eventMetadata.eventId` the key): (key, label).
pub fn parse(payload: &[u8], labels: &[String]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if let (Some(id), Some(label)) = (v["id"].as_str(), v["label"].as_str()) {
        return Some((id.to_string(), label.to_string()));
    }
    let key = v["eventMetadata"]["eventId"].as_str()?;
    let data = &v["groundTruthData"];
    let raw = data["data"].as_str()?;
    let text = if data["encoding"].as_str() == Some("BASE64") {
        use base64::Engine as _;
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(raw).ok()?).ok()?
    } else {
        raw.to_string()
    };
    let text = text.trim().trim_matches('"').to_string();
    let label = match text.parse::<usize>() {
        Ok(i) if !labels.contains(&text) => labels.get(i).cloned().unwrap_or(text),
        _ => text,
    };
    Some((key.to_string(), label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_within_the_window_are_judged_once_and_later_ones_are_late() {
        let mut t = Truth::new(Duration::from_secs(60));
        t.predicted("u/a@1", "ev-a".into(), "cat", 0.9, false, 0);
        t.predicted("u/b@1", "ev-b".into(), "dog", 0.6, true, 0);
        assert_eq!(
            t.label("u/a@1", "cat", 1_000),
            (
                Joined::Matched { correct: true },
                Some(Judged {
                    predicted: "cat".into(),
                    confidence: 0.9,
                    actual: "cat".into(),
                    review: false
                })
            )
        );
        assert_eq!(t.label("u/a@1", "dog", 2_000).0, Joined::Again);
        // By event id, as Model Monitor's ground truth names it.
        assert_eq!(
            t.label("ev-b", "cat", 3_000).0,
            Joined::Matched { correct: false }
        );
        t.predicted("u/c@1", "ev-c".into(), "cat", 0.9, false, 10_000);
        assert_eq!(t.label("u/c@1", "cat", 71_000).0, Joined::Late);
        assert_eq!(t.label("u/zz@1", "cat", 71_000).0, Joined::NotHere);
        assert_eq!(t.kept(), 0);
    }

    #[test]
    fn memory_is_bounded_whatever_the_rate() {
        let mut t = Truth::new(Duration::from_secs(3600));
        for i in 0..MAX_KEPT + 10 {
            t.predicted(&format!("id{i}"), format!("ev{i}"), "cat", 0.9, false, 0);
        }
        assert_eq!(t.kept(), MAX_KEPT);
        // The early-expired ones are late, the kept ones not.
        assert_eq!(t.label("id3", "cat", 0).0, Joined::Late);
        t.expire(3_600_001);
        assert_eq!(t.kept(), 0);
        assert!(t.expired.len() <= MAX_EXPIRED && t.expired_order.len() <= MAX_EXPIRED);
    }

    #[test]
    fn both_ground_truth_shapes_are_read() {
        let labels = ["bicycle".to_string(), "motorcycle".to_string()];
        assert_eq!(
            parse(br#"{"id": "u/k@e", "label": "bicycle"}"#, &labels),
            Some(("u/k@e".into(), "bicycle".into()))
        );
        let mm = br#"{"groundTruthData": {"data": "1", "encoding": "CSV"}, "eventMetadata": {"eventId": "ev"}, "eventVersion": "0"}"#;
        assert_eq!(parse(mm, &labels), Some(("ev".into(), "motorcycle".into())));
        assert_eq!(parse(b"nonsense", &labels), None);
    }

    #[test]
    fn accuracy_precision_and_recall_follow_the_matrix() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let labels = ["cat".to_string(), "dog".to_string()];
        let recent = Arc::new(Recent::new(10, 0));
        let g = GroundTruth::new(
            Duration::from_secs(60),
            &labels,
            metrics.clone(),
            Some(recent.clone()),
        );
        for (i, (pred, actual)) in [
            ("cat", "cat"),
            ("cat", "dog"),
            ("dog", "dog"),
            ("dog", "dog"),
        ]
        .iter()
        .enumerate()
        {
            g.truth().predicted(
                &format!("id{i}"),
                format!("ev{i}"),
                pred,
                0.9,
                false,
                now_ms(),
            );
            let rec = format!(r#"{{"id": "id{i}", "label": "{actual}"}}"#);
            assert_eq!(
                g.record(rec.as_bytes()),
                Joined::Matched {
                    correct: pred == actual
                }
            );
        }
        assert_eq!(metrics.accuracy.get(), 0.75);
        assert_eq!(metrics.precision.with_label_values(&["cat"]).get(), 0.5);
        assert_eq!(metrics.recall.with_label_values(&["dog"]).get(), 2.0 / 3.0);
        assert_eq!(
            metrics.confusion.with_label_values(&["dog", "cat"]).get(),
            1
        );
        // The console hears of each: 3 of the 4 accepted at 0.9 right.
        let (_, judged, curve) = recent.curve(|_| true);
        assert_eq!(judged, 4);
        let at_09 = curve.iter().find(|p| p.threshold == 0.9).unwrap();
        assert_eq!(at_09.accepted_accuracy, Some(0.75));
        assert_eq!(curve.last().unwrap().accepted_accuracy, None);
    }
}
