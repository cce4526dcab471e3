//! Model monitoring: a baseline of what the model's answers looked like
//! over a period (made by `inferstream baseline` from data capture), and the
//! drift of the live stream from it over a sliding window, as population
//! stability indices (PSI) of confidence, label mix, image size and image
//! type, and the share of predictions below the threshold.
//!
//! PSI = Σ (a − e) · ln(a / e) over the bins, with a and e the bins' shares
//! (each at least 0.0001, so that an empty bin counts but stays finite).
//! Rules of thumb: below 0.1 stable, 0.1–0.2 moderate, above 0.2 a shift.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

pub const BASELINE_SCHEMA: &str = "inferstream.baseline.v1";

/// Confidence bins: tenths.
pub const CONFIDENCE_EDGES: [f64; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
/// Image size bins, in bytes (the last is open-ended).
pub const SIZE_EDGES: [f64; 8] = [
    0.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    f64::MAX,
];
/// The smallest share a bin counts with.
const MIN_SHARE: f64 = 1e-4;

/// Counts over bins given by their edges (`edges.len() - 1` bins).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn new(edges: &[f64]) -> Histogram {
        Histogram {
            edges: edges.to_vec(),
            counts: vec![0; edges.len().saturating_sub(1)],
        }
    }

    /// The bin of `v`: the last bin includes its upper edge; values
    /// outside go to the first or last bin.
    fn bin(&self, v: f64) -> usize {
        let n = self.counts.len();
        if n == 0 {
            return 0;
        }
        let i = self.edges[1..].partition_point(|e| *e <= v);
        i.min(n - 1)
    }

    pub fn add(&mut self, v: f64) {
        if !self.counts.is_empty() {
            let i = self.bin(v);
            self.counts[i] += 1;
        }
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }
}

/// One prediction as the monitor sees it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub confidence: f64,
    pub label: &'a str,
    pub review: bool,
    pub size: Option<u64>,
    pub content_type: Option<&'a str>,
}

/// What a set of predictions looked like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub predictions: u64,
    pub confidence: Histogram,
    pub labels: BTreeMap<String, u64>,
    pub review: u64,
    pub image_size: Histogram,
    pub image_types: BTreeMap<String, u64>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            predictions: 0,
            confidence: Histogram::new(&CONFIDENCE_EDGES),
            labels: BTreeMap::new(),
            review: 0,
            image_size: Histogram::new(&SIZE_EDGES),
            image_types: BTreeMap::new(),
        }
    }
}

impl Tally {
    pub fn add(&mut self, o: &Observation<'_>) {
        self.predictions += 1;
        self.confidence.add(o.confidence);
        *self.labels.entry(o.label.to_string()).or_default() += 1;
        if o.review {
            self.review += 1;
        }
        if let Some(s) = o.size {
            self.image_size.add(s as f64);
        }
        if let Some(t) = o.content_type {
            *self.image_types.entry(t.to_string()).or_default() += 1;
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.predictions += other.predictions;
        self.confidence.merge(&other.confidence);
        for (l, n) in &other.labels {
            *self.labels.entry(l.clone()).or_default() += n;
        }
        self.review += other.review;
        self.image_size.merge(&other.image_size);
        for (t, n) in &other.image_types {
            *self.image_types.entry(t.clone()).or_default() += n;
        }
    }

    /// The share of predictions below the threshold.
    pub fn review_share(&self) -> f64 {
        if self.predictions == 0 {
            0.0
        } else {
            self.review as f64 / self.predictions as f64
        }
    }
}

/// A baseline: a tally with where and when it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub schema: String,
    pub created_at: String,
    /// The capture it was made from.
    pub source: String,
    /// The period of the predictions in it (RFC 3339).
    pub start: Option<String>,
    pub end: Option<String>,
    #[serde(flatten)]
    pub tally: Tally,
}

impl Baseline {
    /// Reads and checks a baseline file.
    pub fn load(path: &Path) -> Result<Baseline, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let b: Baseline = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is not a baseline (make one with `inferstream baseline`): {e}",
                path.display()
            )
        })?;
        if b.schema != BASELINE_SCHEMA {
            return Err(format!(
                "{} has schema `{}`, expected {BASELINE_SCHEMA}",
                path.display(),
                b.schema
            ));
        }
        let t = &b.tally;
        for (name, h) in [("confidence", &t.confidence), ("image_size", &t.image_size)] {
            if h.edges.len() < 2
                || h.counts.len() + 1 != h.edges.len()
                || h.edges.windows(2).any(|w| w[0] >= w[1])
            {
                return Err(format!(
                    "{}: `{name}` needs increasing edges and one count per bin",
                    path.display()
                ));
            }
        }
        if t.predictions == 0 {
            return Err(format!(
                "{} holds no predictions; make it from a capture with some",
                path.display()
            ));
        }
        Ok(b)
    }
}

fn shares(counts: &[f64]) -> Vec<f64> {
    let total: f64 = counts.iter().sum();
    counts
        .iter()
        .map(|c| {
            if total > 0.0 {
                (c / total).max(MIN_SHARE)
            } else {
                MIN_SHARE
            }
        })
        .collect()
}

/// PSI of `actual` against `expected`, bin by bin.
pub fn psi(expected: &[u64], actual: &[u64]) -> f64 {
    let e = shares(&expected.iter().map(|c| *c as f64).collect::<Vec<_>>());
    let a = shares(&actual.iter().map(|c| *c as f64).collect::<Vec<_>>());
    e.iter().zip(&a).map(|(e, a)| (a - e) * (a / e).ln()).sum()
}

/// PSI over named categories (labels, image types): every name in either.
pub fn psi_named(expected: &BTreeMap<String, u64>, actual: &BTreeMap<String, u64>) -> f64 {
    let names: std::collections::BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    let e: Vec<u64> = names
        .iter()
        .map(|n| expected.get(*n).copied().unwrap_or(0))
        .collect();
    let a: Vec<u64> = names
        .iter()
        .map(|n| actual.get(*n).copied().unwrap_or(0))
        .collect();
    psi(&e, &a)
}

/// Drift of a tally from the baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measures {
    pub predictions: u64,
    pub confidence_psi: f64,
    pub label_psi: f64,
    pub image_size_psi: f64,
    pub image_type_psi: f64,
    pub review_share: f64,
}

pub fn measure(baseline: &Tally, window: &Tally) -> Measures {
    let same_bins = baseline.confidence.edges == window.confidence.edges;
    Measures {
        predictions: window.predictions,
        confidence_psi: if same_bins {
            psi(&baseline.confidence.counts, &window.confidence.counts)
        } else {
            0.0
        },
        label_psi: psi_named(&baseline.labels, &window.labels),
        image_size_psi: if baseline.image_size.edges == window.image_size.edges
            && window.image_size.counts.iter().sum::<u64>() > 0
        {
            psi(&baseline.image_size.counts, &window.image_size.counts)
        } else {
            0.0
        },
        image_type_psi: if window.image_types.is_empty() || baseline.image_types.is_empty() {
            0.0
        } else {
            psi_named(&baseline.image_types, &window.image_types)
        },
        review_share: window.review_share(),
    }
}

/// The live stream's tally over a sliding window of `slices` slices.
pub struct Drift {
    baseline: Baseline,
    slices: Mutex<VecDeque<Tally>>,
    count: usize,
    min_predictions: u64,
    metrics: Arc<Metrics>,
}

/// The window is kept as this many slices (it slides a slice at a time).
pub const SLICES: usize = 10;

impl Drift {
    pub fn new(baseline: Baseline, min_predictions: u64, metrics: Arc<Metrics>) -> Arc<Drift> {
        metrics
            .baseline_review_share
            .set(baseline.tally.review_share());
        Arc::new(Drift {
            baseline,
            slices: Mutex::new(VecDeque::from([Tally::default()])),
            count: SLICES,
            min_predictions,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Tally>> {
        self.slices.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn observe(&self, o: &Observation<'_>) {
        if let Some(t) = self.lock().back_mut() {
            t.add(o);
        }
    }

    /// The window so far, measured against the baseline.
    pub fn measure(&self) -> Measures {
        let mut window = Tally::default();
        for t in self.lock().iter() {
            window.merge(t);
        }
        measure(&self.baseline.tally, &window)
    }

    /// Slides the window by a slice and sets the gauges; the PSI gauges
    /// stay 0 until the window holds `monitor.min_predictions`.
    pub fn tick(&self) -> Measures {
        let m = self.measure();
        {
            let mut slices = self.lock();
            slices.push_back(Tally::default());
            while slices.len() > self.count {
                slices.pop_front();
            }
        }
        let enough = m.predictions >= self.min_predictions;
        let g = |v: f64| if enough { v } else { 0.0 };
        self.metrics.drift_predictions.set(m.predictions as i64);
        self.metrics.drift_confidence_psi.set(g(m.confidence_psi));
        self.metrics.drift_label_psi.set(g(m.label_psi));
        self.metrics.drift_image_size_psi.set(g(m.image_size_psi));
        self.metrics.drift_image_type_psi.set(g(m.image_type_psi));
        self.metrics.review_share.set(m.review_share);
        m
    }

    /// Ticks every `window / SLICES`, until aborted.
    pub async fn run(self: Arc<Self>, window: Duration) {
        let every = (window / SLICES as u32).max(Duration::from_millis(100));
        let mut interval = tokio::time::interval(every);
        interval.tick().await;
        loop {
            interval.tick().await;
            self.tick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(confidences: &[(f64, usize)], label: &str) -> Tally {
        let mut t = Tally::default();
        for (c, n) in confidences {
            for _ in 0..*n {
                t.add(&Observation {
                    confidence: *c,
                    label,
                    review: *c < 0.93,
                    size: Some(3000),
                    content_type: Some("image/png"),
                });
            }
        }
        t
    }

    #[test]
    fn bins_include_their_lower_edge_and_the_last_its_upper() {
        let h = Histogram::new(&CONFIDENCE_EDGES);
        assert_eq!(h.bin(0.0), 0);
        assert_eq!(h.bin(0.1), 1);
        assert_eq!(h.bin(0.95), 9);
        assert_eq!(h.bin(1.0), 9);
        assert_eq!(h.bin(-3.0), 0);
        assert_eq!(Histogram::new(&SIZE_EDGES).bin(1e12), 6);
    }

    #[test]
    fn psi_is_zero_for_the_same_mix_and_large_for_a_shift() {
        let base = tally(&[(0.98, 900), (0.7, 100)], "bicycle");
        let same = tally(&[(0.98, 450), (0.7, 50)], "bicycle");
        let noisy = tally(&[(0.98, 430), (0.7, 70)], "bicycle");
        let shifted = tally(&[(0.98, 250), (0.55, 250)], "bicycle");
        assert!(measure(&base, &same).confidence_psi.abs() < 1e-9);
        assert!(measure(&base, &noisy).confidence_psi < 0.1);
        assert!(measure(&base, &shifted).confidence_psi > 0.2);
        let labels = tally(&[(0.98, 500)], "motorcycle");
        assert!(measure(&base, &labels).label_psi > 0.2);
        assert!((shifted.review_share() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_baseline_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        let b = Baseline {
            schema: BASELINE_SCHEMA.into(),
            created_at: "now".into(),
            source: "s3://capture/x".into(),
            start: None,
            end: None,
            tally: tally(&[(0.98, 9), (0.7, 1)], "bicycle"),
        };
        std::fs::write(&path, serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(Baseline::load(&path).unwrap(), b);
        let mut broken = serde_json::to_value(&b).unwrap();
        broken["confidence"]["counts"] = serde_json::json!([1, 2]);
        std::fs::write(&path, broken.to_string()).unwrap();
        let err = Baseline::load(&path).unwrap_err();
        assert!(err.contains("one count per bin"), "{err}");
        std::fs::write(&path, "{}").unwrap();
        assert!(Baseline::load(&path)
            .unwrap_err()
            .contains("inferstream baseline"));
    }

    #[test]
    fn the_window_slides_a_slice_at_a_time() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let b = Baseline {
            schema: BASELINE_SCHEMA.into(),
            created_at: "now".into(),
            source: String::new(),
            start: None,
            end: None,
            tally: tally(&[(0.98, 90), (0.7, 10)], "bicycle"),
        };
        let drift = Drift::new(b, 20, metrics.clone());
        let o = |c: f64| Observation {
            confidence: c,
            label: "bicycle",
            review: c < 0.93,
            size: Some(3000),
            content_type: Some("image/png"),
        };
        for i in 0..50 {
            drift.observe(&o(if i % 10 == 0 { 0.7 } else { 0.98 }));
        }
        let m = drift.tick();
        assert_eq!(m.predictions, 50);
        assert!(metrics.drift_confidence_psi.get() < 0.1);
        // A shift fills the next slices; the old ones slide out.
        for _ in 0..SLICES {
            for _ in 0..50 {
                drift.observe(&o(0.55));
            }
            drift.tick();
        }
        assert!(metrics.drift_confidence_psi.get() > 0.2);
        assert_eq!(metrics.drift_predictions.get(), 500);
        assert!((metrics.review_share.get() - 1.0).abs() < 1e-9);
    }
}
