//! `inferstream baseline`: what the model's answers looked like over a
//! period of data capture, written as the baseline that `monitor.baseline`
//! measures drift against.

use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::pipeline::monitor::{Baseline, Tally, BASELINE_SCHEMA};
use crate::tools::report::Point;

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn rfc3339(secs: f64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs_f64(secs.max(0.0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The baseline of the points between `start` and `end` (inclusive).
pub fn build(
    points: &[Point],
    source: &str,
    start: Option<SystemTime>,
    end: Option<SystemTime>,
) -> Baseline {
    let (from, to) = (start.map(secs), end.map(secs));
    let mut tally = Tally::default();
    let (mut first, mut last) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in points
        .iter()
        .filter(|p| from.is_none_or(|f| p.time >= f) && to.is_none_or(|t| p.time <= t))
    {
        tally.add(&p.observation());
        first = first.min(p.time);
        last = last.max(p.time);
    }
    Baseline {
        schema: BASELINE_SCHEMA.into(),
        created_at: crate::record::now_rfc3339(),
        source: source.to_string(),
        start: first.is_finite().then(|| rfc3339(first)),
        end: last.is_finite().then(|| rfc3339(last)),
        tally,
    }
}

/// `inferstream baseline --from CAPTURE --out FILE [--start T] [--end T]`.
pub async fn command(
    path: Option<&Path>,
    from: &str,
    out: &Path,
    start: Option<SystemTime>,
    end: Option<SystemTime>,
) -> ExitCode {
    let cfg = match crate::tools::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let loaded = match crate::tools::report::load_capture(&cfg, from).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let baseline = build(&loaded.points, from, start, end);
    if baseline.tally.predictions == 0 {
        eprintln!(
            "error: no predictions in {from} for that period ({} read, {} lines skipped); nothing to make a baseline of",
            loaded.points.len(),
            loaded.bad_lines
        );
        return ExitCode::FAILURE;
    }
    let json = match serde_json::to_vec_pretty(&baseline) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(out, json) {
        eprintln!("error: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    let t = &baseline.tally;
    println!(
        "baseline of {} predictions ({} to {}) from {from}: {:.1}% below the threshold, labels {:?}; written to {}",
        t.predictions,
        baseline.start.as_deref().unwrap_or("?"),
        baseline.end.as_deref().unwrap_or("?"),
        100.0 * t.review_share(),
        t.labels,
        out.display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(time: f64, confidence: f64) -> Point {
        Point {
            time,
            label: "bicycle".into(),
            confidence,
            threshold: 0.93,
            accepted: confidence >= 0.93,
            id: None,
            event_id: None,
            actual: None,
            size: Some(3000),
            content_type: Some("image/png".into()),
        }
    }

    #[test]
    fn a_baseline_covers_the_period_asked_for() {
        let points: Vec<Point> = (0..100)
            .map(|i| {
                point(
                    1_800_000_000.0 + f64::from(i),
                    if i < 50 { 0.98 } else { 0.5 },
                )
            })
            .collect();
        let b = build(
            &points,
            "dir",
            None,
            Some(UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_049)),
        );
        assert_eq!(b.tally.predictions, 50);
        assert_eq!(b.tally.review, 0);
        assert_eq!(b.start.as_deref(), Some("2027-01-15T08:00:00Z"));
        assert_eq!(b.tally.confidence.counts[9], 50);
        assert_eq!(b.tally.image_types["image/png"], 50);
        let all = build(&points, "dir", None, None);
        assert_eq!((all.tally.predictions, all.tally.review), (100, 50));
    }
}
