//! Route: the top label and its confidence against the threshold.

use crate::config::Config;
use crate::record::Decision;

/// The routing decision for one prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub label: usize,
    pub confidence: f64,
    pub threshold: f64,
    pub decision: Decision,
}

/// The top score's index and value (the first on a tie).
pub fn top(scores: &[f64]) -> (usize, f64) {
    scores
        .iter()
        .copied()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, s)| {
            if s > best.1 {
                (i, s)
            } else {
                best
            }
        })
}

/// [`route_by`] the configuration's thresholds.
pub fn route(scores: &[f64], config: &Config) -> Routed {
    route_by(
        scores,
        &config.endpoint.labels,
        &crate::pipeline::control::Thresholds::from_config(config),
    )
}

/// Picks the top label (the first on a tie) and compares its confidence
/// with that label's threshold: at or above is accepted, below is review.
pub fn route_by(
    scores: &[f64],
    labels: &[String],
    thresholds: &crate::pipeline::control::Thresholds,
) -> Routed {
    let (label, confidence) = top(scores);
    let threshold = labels
        .get(label)
        .map_or(thresholds.threshold, |l| thresholds.for_label(l));
    let decision = if confidence >= threshold {
        Decision::Accepted
    } else {
        Decision::Review
    };
    Routed {
        label,
        confidence,
        threshold,
        decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!("[alerts]\nenabled = false\n{extra}")).unwrap()
    }

    #[test]
    fn threshold_is_inclusive() {
        let c = config("");
        assert_eq!(route(&[0.93, 0.07], &c).decision, Decision::Accepted);
        assert_eq!(route(&[0.929, 0.071], &c).decision, Decision::Review);
        let r = route(&[0.39, 0.61], &c);
        assert_eq!(
            (r.label, r.confidence, r.decision),
            (1, 0.61, Decision::Review)
        );
    }

    #[test]
    fn per_label_thresholds_apply_to_the_top_label() {
        let c = config("[route.label_thresholds]\nmotorcycle = 0.5\n");
        let r = route(&[0.4, 0.6], &c);
        assert_eq!((r.threshold, r.decision), (0.5, Decision::Accepted));
        assert_eq!(route(&[0.6, 0.4], &c).decision, Decision::Review);
    }

    #[test]
    fn ties_go_to_the_first_label() {
        assert_eq!(route(&[0.5, 0.5], &config("")).label, 0);
    }
}
