//! Data capture, like SageMaker Model Monitor's: sampled predictions written
//! to S3 as JSON Lines objects under `<prefix>/yyyy/mm/dd/hh/`.
//!
//! Lines are buffered and an object is written when the buffer reaches
//! `capture.max_object_bytes`, when its oldest line is `capture.flush_interval`
//! old, when the hour changes, and when the service stops. Capture is best
//! effort by design: it never holds back offset commits or the pipeline. A
//! write that fails every attempt (each bounded by `capture.timeout`) is
//! counted and logged, not retried forever; lines offered while twice
//! `capture.max_object_bytes` already wait for the writer are dropped and
//! counted, so a slow or hung S3 never fills memory or stalls inference.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::CaptureConfig;
use crate::metrics::Metrics;
use crate::record::Prediction;

pub const CAPTURE_SCHEMA: &str = "inferstream.capture.v1";

/// One captured inference, one JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureLine {
    pub schema: String,
    pub captured_at: String,
    /// The image sent to the endpoint, when `capture.capture_input` is on.
    #[serde(default)]
    pub endpoint_input: Option<CapturedData>,
    /// The endpoint's answer for this image: the class probabilities.
    pub endpoint_output: CapturedData,
    pub inference_ms: f64,
    /// The prediction record as it went to Kafka (event metadata included).
    pub prediction: Prediction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapturedData {
    pub content_type: String,
    /// "BASE64" or "JSON".
    pub encoding: String,
    pub data: String,
}

impl CaptureLine {
    pub fn new(prediction: &Prediction, input: Option<(&str, &[u8])>) -> CaptureLine {
        let scores: Vec<f64> = prediction.scores.values().copied().collect();
        CaptureLine {
            schema: CAPTURE_SCHEMA.to_string(),
            captured_at: prediction.processed_at.clone(),
            endpoint_input: input.map(|(content_type, bytes)| CapturedData {
                content_type: content_type.to_string(),
                encoding: "BASE64".into(),
                data: base64::engine::general_purpose::STANDARD.encode(bytes),
            }),
            endpoint_output: CapturedData {
                content_type: "application/json".into(),
                encoding: "JSON".into(),
                data: serde_json::to_string(&scores).unwrap_or_default(),
            },
            inference_ms: prediction.latency_ms.infer,
            prediction: prediction.clone(),
        }
    }
}

/// The sending half; cheap to clone.
#[derive(Clone)]
pub struct Capturer {
    tx: mpsc::Sender<(CaptureLine, OwnedSemaphorePermit)>,
    /// Bytes of lines waiting for the writer, at most.
    budget: Arc<Semaphore>,
    sampling: f64,
    capture_input: bool,
    metrics: Arc<Metrics>,
}

impl CaptureLine {
    /// About how many bytes the line takes, written out.
    fn estimated_bytes(&self) -> usize {
        let p = &self.prediction;
        // Strings from the event may be escaped up to six-fold in JSON.
        let from_event = p.id.len()
            + p.bucket.len()
            + p.key.len()
            + p.etag.as_ref().map_or(0, String::len)
            + p.version_id.as_ref().map_or(0, String::len)
            + p.event_time.as_ref().map_or(0, String::len);
        // Each score appears in the prediction and in the output data.
        let scores: usize = p.scores.keys().map(|l| 6 * l.len() + 64).sum();
        self.endpoint_input.as_ref().map_or(0, |d| d.data.len()) + 6 * from_event + scores + 2048
    }
}

impl Capturer {
    /// Starts the writer task; it ends, after a last flush, when every
    /// `Capturer` clone is dropped.
    pub fn spawn(
        client: aws_sdk_s3::Client,
        cfg: &CaptureConfig,
        metrics: Arc<Metrics>,
    ) -> Option<(Capturer, tokio::task::JoinHandle<()>)> {
        let (bucket, prefix) = cfg.bucket_and_prefix()?;
        let (tx, rx) = mpsc::channel(1024);
        let budget = (cfg.max_object_bytes.saturating_mul(2)).clamp(1 << 20, u32::MAX as usize);
        let writer = Writer {
            client,
            bucket,
            prefix,
            instance: format!("{:016x}", fastrand::u64(..)),
            seq: 0,
            max_bytes: cfg.max_object_bytes,
            interval: cfg.flush_interval,
            max_attempts: cfg.max_attempts.max(1),
            timeout: cfg.timeout,
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(writer.run(rx));
        Some((
            Capturer {
                tx,
                budget: Arc::new(Semaphore::new(budget)),
                sampling: cfg.sampling_percentage / 100.0,
                capture_input: cfg.capture_input,
                metrics,
            },
            task,
        ))
    }

    /// Whether this prediction is in the sample.
    pub fn sampled(&self) -> bool {
        self.sampling >= 1.0 || fastrand::f64() < self.sampling
    }

    pub fn captures_input(&self) -> bool {
        self.capture_input
    }

    /// Hands a line to the writer without waiting; a line that finds the
    /// writer's backlog full is dropped and counted.
    pub fn offer(&self, line: CaptureLine) {
        let bytes = u32::try_from(line.estimated_bytes()).unwrap_or(u32::MAX);
        let sent = match self.budget.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => self.tx.try_send((line, permit)).is_ok(),
            Err(_) => false,
        };
        if !sent {
            self.metrics.capture_dropped.inc();
        }
    }
}

struct Writer {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    instance: String,
    seq: u64,
    max_bytes: usize,
    interval: Duration,
    max_attempts: u32,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// `yyyy/mm/dd/hh` of an RFC 3339 time (of now, if it is not one).
fn hour_path(time: &str) -> String {
    let now;
    let time = if humantime::parse_rfc3339(time).is_ok() {
        time
    } else {
        now = crate::record::now_rfc3339();
        &now
    };
    let part = |a: usize, b: usize| time.get(a..b).unwrap_or("00");
    format!(
        "{}/{}/{}/{}",
        part(0, 4),
        part(5, 7),
        part(8, 10),
        part(11, 13)
    )
}

struct Buffer {
    hour: String,
    first: String,
    lines: usize,
    bytes: Vec<u8>,
    since: Instant,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<(CaptureLine, OwnedSemaphorePermit)>) {
        let mut buf: Option<Buffer> = None;
        loop {
            let deadline = buf.as_ref().map(|b| b.since + self.interval);
            let line = tokio::select! {
                line = rx.recv() => line,
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => {
                    if let Some(b) = buf.take() {
                        self.flush(b).await;
                    }
                    continue;
                }
            };
            let Some((line, _permit)) = line else {
                break;
            };
            let hour = hour_path(&line.captured_at);
            if buf.as_ref().is_some_and(|b| b.hour != hour) {
                if let Some(b) = buf.take() {
                    self.flush(b).await;
                }
            }
            let b = buf.get_or_insert_with(|| Buffer {
                hour,
                first: line.captured_at.clone(),
                lines: 0,
                bytes: Vec::new(),
                since: Instant::now(),
            });
            if serde_json::to_writer(&mut b.bytes, &line).is_ok() {
                b.bytes.push(b'\n');
                b.lines += 1;
            }
            if b.bytes.len() >= self.max_bytes {
                if let Some(b) = buf.take() {
                    self.flush(b).await;
                }
            }
        }
        if let Some(b) = buf.take() {
            self.flush(b).await;
        }
    }

    async fn flush(&mut self, b: Buffer) {
        self.seq += 1;
        // 2026-11-24T07:33:50.123Z → 33-50-123
        let stamp: String = b
            .first
            .get(14..23)
            .unwrap_or("00:00.000")
            .replace([':', '.'], "-");
        let name = format!("{stamp}-{}-{:06}.jsonl", self.instance, self.seq);
        let key = if self.prefix.is_empty() {
            format!("{}/{name}", b.hour)
        } else {
            format!("{}/{}/{name}", self.prefix, b.hour)
        };
        let body = bytes::Bytes::from(b.bytes);
        let mut last = String::new();
        for attempt in 0..self.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(crate::clients::aws::backoff(
                    attempt,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                ))
                .await;
            }
            let put = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_type("application/jsonl")
                .body(body.clone().into())
                .send();
            match tokio::time::timeout(self.timeout, put).await {
                Err(_) => {
                    last = format!(
                        "no answer within capture.timeout ({})",
                        humantime::format_duration(self.timeout)
                    )
                }
                Ok(Ok(_)) => {
                    self.metrics.capture_objects.inc();
                    self.metrics.capture_lines.inc_by(b.lines as u64);
                    tracing::debug!(bucket = %self.bucket, %key, lines = b.lines, "capture written");
                    return;
                }
                Ok(Err(e)) => last = crate::clients::aws::describe(&e),
            }
        }
        self.metrics.capture_failed.inc_by(b.lines as u64);
        tracing::warn!(bucket = %self.bucket, %key, lines = b.lines, error = %last, "data capture write failed every attempt; lines dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_budget_counts_a_line_at_least_at_its_size() {
        let labels: Vec<String> = (0..2000).map(|i| format!("class-{i:05}")).collect();
        let mut p: Prediction = serde_json::from_value(serde_json::json!({
            "schema": "inferstream.prediction.v1", "id": "b/\u{1}\u{1}@e", "bucket": "b",
            "key": "\u{1}".repeat(500), "etag": "e", "version_id": null, "size": 1,
            "label": "class-00000", "confidence": 0.5, "scores": {}, "threshold": 0.9,
            "decision": "review", "endpoint": "x", "variant": null, "event_time": null,
            "processed_at": "2026-11-25T10:00:00.000Z",
            "latency_ms": {"fetch": 1.0, "infer": 1.0, "total": 1.0},
            "source": {"topic": "t", "partition": 0, "offset": 1}
        }))
        .unwrap();
        p.scores = labels.iter().map(|l| (l.clone(), 0.123456789)).collect();
        let line = CaptureLine::new(&p, Some(("image/png", &[7u8; 3000])));
        let written = serde_json::to_vec(&line).unwrap().len();
        assert!(
            line.estimated_bytes() >= written,
            "{} < {written}",
            line.estimated_bytes()
        );
    }

    #[test]
    fn hours_partition_the_keys() {
        assert_eq!(hour_path("2026-11-24T07:33:50.123Z"), "2026/11/24/07");
        let now = hour_path("garbage");
        assert_eq!(now.len(), "yyyy/mm/dd/hh".len());
        assert!(now.starts_with("20"), "{now}");
    }
}
