//! Every metric the service exports, declared in one place.
//!
//! Prefix `inferstream_`; counters end in `_total`, durations are histograms
//! in `_seconds`. Label values are bounded: reasons, kinds, labels from the
//! configuration, decisions and partitions; never keys or offsets.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `kind` label values of `inferstream_rebalances_total`.
pub const REBALANCE_KINDS: [&str; 3] = ["assign", "revoke", "lost"];

/// The `reason` label values of `inferstream_alerts_suppressed_total`.
pub const SUPPRESSED_REASONS: [&str; 2] = ["duplicate", "storm"];

/// Label values known before anything happens, from the modules that own
/// them: class labels from the configuration, decisions and dead-letter
/// reasons from `record`, skip reasons from `decode`, error kinds from
/// `infer`.
pub struct KnownLabels<'a> {
    pub labels: &'a [String],
    pub decisions: &'a [&'a str],
    pub inference_errors: &'a [&'a str],
    pub skip_reasons: &'a [&'a str],
    pub dead_letter_reasons: &'a [&'a str],
}

/// The service's metrics, registered in their own registry.
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounter,
    pub records_skipped: IntCounterVec,
    pub images_fetched: IntCounter,
    pub fetched_bytes: IntCounter,
    pub fetch_duration: Histogram,
    pub fetch_retries: IntCounter,
    pub batch_size: Histogram,
    pub inference_duration: Histogram,
    pub inference_requests: IntCounter,
    pub inference_errors: IntCounterVec,
    pub batch_splits: IntCounter,
    pub predictions: IntCounterVec,
    pub confidence: HistogramVec,
    pub alerts_published: IntCounter,
    pub alerts_failed: IntCounter,
    pub alerts_listed: IntCounter,
    pub alerts_suppressed: IntCounterVec,
    pub alerts_pending: IntGauge,
    pub dead_letters: IntCounterVec,
    pub in_flight: IntGauge,
    pub end_to_end: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub committed_offset: IntGaugeVec,
    pub commit_failures: IntCounter,
    pub capture_lines: IntCounter,
    pub capture_objects: IntCounter,
    pub capture_failed: IntCounter,
    pub capture_dropped: IntCounter,
    pub offset_resets: IntCounter,
    pub rebalances: IntCounterVec,
    pub assigned_partitions: IntGauge,
    pub circuit_open: IntGauge,
    pub endpoint_concurrency: IntGauge,
    pub endpoint_in_flight: IntGauge,
    pub endpoint_rtt: Gauge,
    pub drift_predictions: IntGauge,
    pub drift_confidence_psi: Gauge,
    pub drift_label_psi: Gauge,
    pub drift_image_size_psi: Gauge,
    pub drift_image_type_psi: Gauge,
    pub review_share: Gauge,
    pub baseline_review_share: Gauge,
    pub ground_truth_labels: IntCounterVec,
    pub confusion: IntCounterVec,
    pub judged: IntCounterVec,
    pub correct: IntCounterVec,
    pub accuracy: Gauge,
    pub precision: prometheus::GaugeVec,
    pub recall: prometheus::GaugeVec,
    pub ground_truth_waiting: IntGauge,
    pub ground_truth_objects: IntCounterVec,
}

/// The `outcome` label values of `inferstream_ground_truth_labels_total`.
pub const GROUND_TRUTH_OUTCOMES: [&str; 5] = ["matched", "late", "not_here", "again", "bad"];

fn buckets_seconds() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };

        let m = Metrics {
            events_consumed: reg!(counter("inferstream_events_consumed_total", "Kafka messages consumed from the input topic")?),
            records_skipped: reg!(counter_vec(
                "inferstream_records_skipped_total",
                "Event records skipped on purpose, by reason (test_event, not_create, key_filtered, directory_marker)",
                &["reason"]
            )?),
            images_fetched: reg!(counter("inferstream_images_fetched_total", "Images read from S3")?),
            fetched_bytes: reg!(counter("inferstream_fetched_bytes_total", "Bytes read from S3")?),
            fetch_duration: reg!(histogram("inferstream_fetch_duration_seconds", "S3 GetObject duration including the body", buckets_seconds())?),
            fetch_retries: reg!(counter("inferstream_fetch_retries_total", "S3 GetObject attempts retried")?),
            batch_size: reg!(histogram(
                "inferstream_batch_size",
                "Images per batch",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
            )?),
            inference_duration: reg!(histogram(
                "inferstream_inference_duration_seconds",
                "InvokeEndpoint duration of successful calls",
                buckets_seconds()
            )?),
            inference_requests: reg!(counter("inferstream_inference_requests_total", "InvokeEndpoint calls made, retries included")?),
            inference_errors: reg!(counter_vec(
                "inferstream_inference_errors_total",
                "InvokeEndpoint failures by kind (throttled, unavailable, server_error, timeout, network, rejected, bad_response)",
                &["kind"]
            )?),
            batch_splits: reg!(counter("inferstream_batch_splits_total", "Batches split in two to isolate a rejected image")?),
            predictions: reg!(counter_vec(
                "inferstream_predictions_total",
                "Predictions by label and decision (accepted, review)",
                &["label", "decision"]
            )?),
            confidence: reg!(HistogramVec::new(
                HistogramOpts::new("inferstream_confidence", "Confidence of the top label").buckets(vec![
                    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.0
                ]),
                &["label"]
            )?),
            alerts_published: reg!(counter("inferstream_alerts_published_total", "SNS alerts published")?),
            alerts_failed: reg!(counter("inferstream_alerts_failed_total", "SNS alerts that failed every attempt (each mode); failed Publish attempts of digests")?),
            alerts_listed: reg!(counter("inferstream_alerts_listed_total", "Review images listed in published digests")?),
            alerts_suppressed: reg!(counter_vec(
                "inferstream_alerts_suppressed_total",
                "Review images not listed in a digest, by reason (duplicate: alerted within alerts.dedup_window; storm: over alerts.max_per_hour, counted in a storm summary)",
                &["reason"]
            )?),
            alerts_pending: reg!(IntGauge::new("inferstream_alerts_pending_images", "Review images read by the digest alerter and not yet in a published digest")?),
            dead_letters: reg!(counter_vec("inferstream_dead_letters_total", "Dead-letter records written, by reason", &["reason"])?),
            in_flight: reg!(IntGauge::new("inferstream_in_flight_images", "Images consumed and not yet completed")?),
            end_to_end: reg!(histogram(
                "inferstream_end_to_end_duration_seconds",
                "From consuming the event to every output acknowledged",
                buckets_seconds()
            )?),
            consumer_lag: reg!(IntGaugeVec::new(
                Opts::new("inferstream_consumer_lag", "Messages behind the partition's end, from librdkafka statistics"),
                &["partition"]
            )?),
            committed_offset: reg!(IntGaugeVec::new(
                Opts::new("inferstream_committed_offset", "Last offset committed, per partition"),
                &["partition"]
            )?),
            commit_failures: reg!(counter("inferstream_commit_failures_total", "Offset commits that failed")?),
            capture_lines: reg!(counter("inferstream_capture_lines_total", "Predictions written to data capture")?),
            capture_objects: reg!(counter("inferstream_capture_objects_total", "Data capture objects written to S3")?),
            capture_failed: reg!(counter("inferstream_capture_failed_total", "Captured predictions lost because S3 writes failed every attempt")?),
            capture_dropped: reg!(counter("inferstream_capture_dropped_total", "Predictions left out of data capture because the writer's backlog was full (S3 slow or down)")?),
            offset_resets: reg!(counter("inferstream_offset_resets_total", "Partitions whose consume position was reset by auto.offset.reset (e.g. the committed offset fell out of retention: records skipped)")?),
            rebalances: reg!(counter_vec("inferstream_rebalances_total", "Rebalance events of this instance, by kind (assign, revoke, lost)", &["kind"])?),
            assigned_partitions: reg!(IntGauge::new("inferstream_assigned_partitions", "Input partitions assigned to this instance")?),
            circuit_open: reg!(IntGauge::new("inferstream_endpoint_circuit_open", "1 while the endpoint's circuit breaker is open (images wait, the endpoint is probed)")?),
            endpoint_concurrency: reg!(IntGauge::new("inferstream_endpoint_concurrency_limit", "InvokeEndpoint calls allowed at once: endpoint.concurrency, or what adaptive concurrency has learnt")?),
            endpoint_in_flight: reg!(IntGauge::new("inferstream_endpoint_calls_in_flight", "InvokeEndpoint calls waiting for their answer")?),
            endpoint_rtt: reg!(Gauge::new("inferstream_endpoint_rtt_seconds", "Adaptive concurrency's moving average of InvokeEndpoint round-trip times (0 with a fixed endpoint.concurrency)")?),
            drift_predictions: reg!(IntGauge::new("inferstream_drift_window_predictions", "Predictions in the drift window (monitor.window)")?),
            drift_confidence_psi: reg!(Gauge::new("inferstream_drift_confidence_psi", "Population stability index of the top label's confidence over monitor.window against monitor.baseline (0 until monitor.min_predictions)")?),
            drift_label_psi: reg!(Gauge::new("inferstream_drift_label_psi", "Population stability index of the label mix over monitor.window against monitor.baseline")?),
            drift_image_size_psi: reg!(Gauge::new("inferstream_drift_image_size_psi", "Population stability index of image sizes over monitor.window against monitor.baseline")?),
            drift_image_type_psi: reg!(Gauge::new("inferstream_drift_image_type_psi", "Population stability index of image types over monitor.window against monitor.baseline")?),
            review_share: reg!(Gauge::new("inferstream_review_share", "Share of predictions below the threshold over monitor.window")?),
            baseline_review_share: reg!(Gauge::new("inferstream_baseline_review_share", "Share of predictions below the threshold in monitor.baseline")?),
            ground_truth_labels: reg!(counter_vec(
                "inferstream_ground_truth_labels_total",
                "True labels read, by outcome (matched: a prediction made here within monitor.ground_truth_window; late: made here before it; not_here: another instance's or before a restart; again: judged already; bad: unreadable)",
                &["outcome"]
            )?),
            confusion: reg!(counter_vec("inferstream_confusion_total", "Judged predictions by true and predicted label (the confusion matrix)", &["actual", "predicted"])?),
            judged: reg!(counter_vec("inferstream_judged_predictions_total", "Predictions with a true label, by decision (accepted, review)", &["decision"])?),
            correct: reg!(counter_vec("inferstream_correct_predictions_total", "Judged predictions whose label was right, by decision", &["decision"])?),
            accuracy: reg!(Gauge::new("inferstream_accuracy", "Share of judged predictions whose label was right, since start")?),
            precision: reg!(prometheus::GaugeVec::new(Opts::new("inferstream_precision", "Per predicted label: share right, since start"), &["label"])?),
            recall: reg!(prometheus::GaugeVec::new(Opts::new("inferstream_recall", "Per true label: share found, since start"), &["label"])?),
            ground_truth_waiting: reg!(IntGauge::new("inferstream_ground_truth_waiting", "Predictions made here waiting for their true label (within monitor.ground_truth_window)")?),
            ground_truth_objects: reg!(counter_vec("inferstream_ground_truth_objects_total", "Ground-truth objects from monitor.ground_truth_s3, by outcome (read; failed: resumed at the next listing; list_failed: a listing that stopped part-way)", &["outcome"])?),
            registry,
        };
        Ok(m)
    }

    /// Creates every label combination known in advance, so that each
    /// series exists (at zero) from the start and `rate()` sees its first
    /// increase. The values come from the modules that own them (this
    /// module depends on none of them).
    pub fn init_labels(&self, known: &KnownLabels<'_>) {
        for label in known.labels {
            for decision in known.decisions {
                self.predictions
                    .with_label_values(&[label.as_str(), decision]);
            }
            self.confidence.with_label_values(&[label.as_str()]);
        }
        for kind in known.inference_errors {
            self.inference_errors.with_label_values(&[kind]);
        }
        for kind in REBALANCE_KINDS {
            self.rebalances.with_label_values(&[kind]);
        }
        for reason in SUPPRESSED_REASONS {
            self.alerts_suppressed.with_label_values(&[reason]);
        }
        for outcome in GROUND_TRUTH_OUTCOMES {
            self.ground_truth_labels.with_label_values(&[outcome]);
        }
        for outcome in ["read", "failed", "list_failed"] {
            self.ground_truth_objects.with_label_values(&[outcome]);
        }
        for decision in known.decisions {
            self.judged.with_label_values(&[decision]);
            self.correct.with_label_values(&[decision]);
        }
        for reason in known.skip_reasons {
            self.records_skipped.with_label_values(&[reason]);
        }
        for reason in known.dead_letter_reasons {
            self.dead_letters.with_label_values(&[reason]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
