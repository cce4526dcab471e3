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
//! Memory: the lines waiting for the writer (at most twice
//! `capture.max_object_bytes`), one buffer of up to `max_object_bytes` per
//! open folder (variants × hours open), and the object being written.
//! Lines still buffered when shutdown ends the writer are counted as failed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{CaptureConfig, CaptureFormat};
use crate::metrics::Metrics;
use crate::record::Prediction;

pub const CAPTURE_SCHEMA: &str = "inferstream.capture.v1";

/// One captured inference in the `inferstream` format.
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

/// One captured inference as SageMaker Model Monitor writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SageMakerLine {
    pub capture_data: SageMakerCaptureData,
    pub event_metadata: SageMakerEventMetadata,
    pub event_version: String,
    /// inferstream's prediction (tools made for Model Monitor ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inferstream: Option<Prediction>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SageMakerCaptureData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_input: Option<SageMakerData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_output: Option<SageMakerData>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SageMakerData {
    pub observed_content_type: String,
    /// `INPUT` or `OUTPUT`.
    pub mode: String,
    pub data: String,
    /// `CSV`, `JSON` or `BASE64`.
    pub encoding: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SageMakerEventMetadata {
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_id: Option<String>,
    pub inference_time: String,
}

/// The model's output for a prediction: its scores in the model's class
/// order (`endpoint.labels`), as the endpoint answered them.
fn output_scores(p: &Prediction, labels: &[String]) -> Vec<f64> {
    let in_order: Vec<f64> = labels
        .iter()
        .filter_map(|l| p.scores.get(l).copied())
        .collect();
    if in_order.len() == p.scores.len() {
        in_order
    } else {
        p.scores.values().copied().collect()
    }
}

/// A line ready for the writer: its folder and its bytes.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// `yyyy/mm/dd/hh`, after `<endpoint>/<variant>/` in the SageMaker format.
    pub dir: String,
    pub time: String,
    pub bytes: Vec<u8>,
}

/// Renders a captured prediction as one JSON line in `format`.
pub fn render_line(
    p: &Prediction,
    input: Option<(&str, &[u8])>,
    labels: &[String],
    format: CaptureFormat,
) -> Rendered {
    let output = serde_json::to_string(&output_scores(p, labels)).unwrap_or_default();
    let input_b64 =
        input.map(|(ct, bytes)| (ct, base64::engine::general_purpose::STANDARD.encode(bytes)));
    let hour = hour_path(&p.processed_at);
    let (dir, json) = match format {
        CaptureFormat::Inferstream => (
            hour,
            serde_json::to_vec(&CaptureLine {
                schema: CAPTURE_SCHEMA.to_string(),
                captured_at: p.processed_at.clone(),
                endpoint_input: input_b64.map(|(ct, data)| CapturedData {
                    content_type: ct.to_string(),
                    encoding: "BASE64".into(),
                    data,
                }),
                endpoint_output: CapturedData {
                    content_type: "application/json".into(),
                    encoding: "JSON".into(),
                    data: output,
                },
                inference_ms: p.latency_ms.infer,
                prediction: p.clone(),
            }),
        ),
        CaptureFormat::Sagemaker => (
            format!(
                "{}/{}/{hour}",
                path_segment(&p.endpoint),
                path_segment(p.variant.as_deref().unwrap_or("AllTraffic"))
            ),
            serde_json::to_vec(&SageMakerLine {
                capture_data: SageMakerCaptureData {
                    endpoint_input: input_b64.map(|(ct, data)| SageMakerData {
                        observed_content_type: ct.to_string(),
                        mode: "INPUT".into(),
                        data,
                        encoding: "BASE64".into(),
                    }),
                    endpoint_output: Some(SageMakerData {
                        observed_content_type: "application/json".into(),
                        mode: "OUTPUT".into(),
                        data: output,
                        encoding: "JSON".into(),
                    }),
                },
                event_metadata: SageMakerEventMetadata {
                    event_id: crate::record::event_id(&p.id),
                    inference_id: Some(p.id.clone()),
                    inference_time: p.processed_at.clone(),
                },
                event_version: "0".into(),
                inferstream: Some(p.clone()),
            }),
        ),
    };
    let mut bytes = json.unwrap_or_default();
    bytes.push(b'\n');
    Rendered {
        dir,
        time: p.processed_at.clone(),
        bytes,
    }
}

/// An endpoint or variant name as one S3 key segment.
fn path_segment(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

/// The sending half; cheap to clone.
#[derive(Clone)]
pub struct Capturer {
    tx: mpsc::Sender<(Rendered, OwnedSemaphorePermit)>,
    /// Bytes of lines waiting for the writer, at most.
    budget: Arc<Semaphore>,
    sampling: f64,
    capture_input: bool,
    format: CaptureFormat,
    labels: Arc<[String]>,
    /// Lines handed over and not yet written or counted as failed.
    pending: Arc<std::sync::atomic::AtomicU64>,
    budget_total: u32,
    metrics: Arc<Metrics>,
}

impl Capturer {
    /// Starts the writer task; it ends, after a last flush, when every
    /// `Capturer` clone is dropped. `labels` are the model's classes in
    /// output order.
    pub fn spawn(
        client: aws_sdk_s3::Client,
        cfg: &CaptureConfig,
        labels: &[String],
        metrics: Arc<Metrics>,
    ) -> Option<(Capturer, tokio::task::JoinHandle<()>)> {
        let (bucket, prefix) = cfg.bucket_and_prefix()?;
        let (tx, rx) = mpsc::channel(1024);
        let budget = (cfg.max_object_bytes.saturating_mul(2)).clamp(1 << 20, u32::MAX as usize);
        let pending = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = Writer {
            pending: pending.clone(),
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
                format: cfg.format,
                labels: labels.into(),
                pending,
                budget_total: u32::try_from(budget).unwrap_or(u32::MAX),
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

    /// Hands a prediction (and the image, when input is captured) to the
    /// writer without waiting; one that finds the writer's backlog full is
    /// dropped and counted.
    pub fn offer(&self, p: &Prediction, input: Option<(&str, &[u8])>) {
        let line = render_line(p, input, &self.labels, self.format);
        // A line larger than the whole budget takes all of it (it is not
        // refused for ever).
        let bytes = u32::try_from(line.bytes.len())
            .unwrap_or(u32::MAX)
            .min(self.budget_total);
        let sent = match self.budget.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => self.tx.try_send((line, permit)).is_ok(),
            Err(_) => false,
        };
        if sent {
            self.pending
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.metrics.capture_dropped.inc();
        }
    }

    /// Counts lines handed over and not yet written or counted as failed.
    pub fn pending(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.pending.clone()
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
    pending: Arc<std::sync::atomic::AtomicU64>,
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

/// The `yyyy/mm/dd/hh` a folder ends with.
fn hour_of(dir: &str) -> &str {
    dir.get(dir.len().saturating_sub(13)..).unwrap_or(dir)
}

struct Buffer {
    dir: String,
    first: String,
    lines: usize,
    bytes: Vec<u8>,
    since: Instant,
}

impl Writer {
    /// One buffer per folder (hour, and endpoint and variant in the
    /// SageMaker format): lines of several variants do not cut each
    /// other's objects short.
    async fn run(mut self, mut rx: mpsc::Receiver<(Rendered, OwnedSemaphorePermit)>) {
        let mut bufs: BTreeMap<String, Buffer> = BTreeMap::new();
        loop {
            let oldest = bufs.values().map(|b| b.since).min();
            let line = tokio::select! {
                line = rx.recv() => line,
                _ = async { tokio::time::sleep_until(oldest.unwrap_or_else(Instant::now) + self.interval).await }, if oldest.is_some() => {
                    let due: Vec<String> = bufs
                        .iter()
                        .filter(|(_, b)| b.since + self.interval <= Instant::now())
                        .map(|(d, _)| d.clone())
                        .collect();
                    for d in due {
                        if let Some(b) = bufs.remove(&d) {
                            self.flush(b).await;
                        }
                    }
                    continue;
                }
            };
            let Some((line, _permit)) = line else {
                break;
            };
            // A new hour closes the earlier hours' objects.
            let hour = hour_of(&line.dir);
            let stale: Vec<String> = bufs.keys().filter(|d| hour_of(d) < hour).cloned().collect();
            for d in stale {
                if let Some(b) = bufs.remove(&d) {
                    self.flush(b).await;
                }
            }
            let b = bufs.entry(line.dir.clone()).or_insert_with(|| Buffer {
                dir: line.dir.clone(),
                first: line.time.clone(),
                lines: 0,
                bytes: Vec::new(),
                since: Instant::now(),
            });
            b.bytes.extend_from_slice(&line.bytes);
            b.lines += 1;
            if b.bytes.len() >= self.max_bytes {
                if let Some(b) = bufs.remove(&line.dir) {
                    self.flush(b).await;
                }
            }
        }
        for (_, b) in std::mem::take(&mut bufs) {
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
            format!("{}/{name}", b.dir)
        } else {
            format!("{}/{}/{name}", self.prefix, b.dir)
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
                    self.pending
                        .fetch_sub(b.lines as u64, std::sync::atomic::Ordering::Relaxed);
                    self.metrics.capture_objects.inc();
                    self.metrics.capture_lines.inc_by(b.lines as u64);
                    tracing::debug!(bucket = %self.bucket, %key, lines = b.lines, "capture written");
                    return;
                }
                Ok(Err(e)) => last = crate::clients::aws::describe(&e),
            }
        }
        self.pending
            .fetch_sub(b.lines as u64, std::sync::atomic::Ordering::Relaxed);
        self.metrics.capture_failed.inc_by(b.lines as u64);
        tracing::warn!(bucket = %self.bucket, %key, lines = b.lines, error = %last, "data capture write failed every attempt; lines dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction() -> Prediction {
        serde_json::from_value(serde_json::json!({
            "schema": "inferstream.prediction.v1", "id": "uploads/bikes/a.png@e1", "bucket": "uploads",
            "key": "bikes/a.png", "etag": "e1", "version_id": null, "size": 10,
            "label": "motorcycle", "confidence": 0.61,
            "scores": {"motorcycle": 0.61, "bicycle": 0.39, "aardvark": 0.0},
            "threshold": 0.93, "decision": "review", "endpoint": "image-classifier", "variant": "Blue/1",
            "event_time": null, "processed_at": "2026-11-25T10:03:04.567Z",
            "latency_ms": {"fetch": 1.0, "infer": 2.0, "total": 3.0},
            "source": {"topic": "t", "partition": 0, "offset": 1}
        }))
        .unwrap()
    }

    fn labels() -> Vec<String> {
        ["bicycle", "motorcycle", "aardvark"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn sagemaker_lines_have_exactly_model_monitors_fields() {
        let line = render_line(
            &prediction(),
            Some(("image/png", b"\x89PNG")),
            &labels(),
            CaptureFormat::Sagemaker,
        );
        assert_eq!(line.dir, "image-classifier/Blue_1/2026/11/25/10");
        assert_eq!(line.bytes.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line.bytes).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&v),
            [
                "captureData",
                "eventMetadata",
                "eventVersion",
                "inferstream"
            ]
        );
        assert_eq!(v["eventVersion"], "0");
        assert_eq!(keys(&v["captureData"]), ["endpointInput", "endpointOutput"]);
        for (side, mode, encoding) in [
            ("endpointInput", "INPUT", "BASE64"),
            ("endpointOutput", "OUTPUT", "JSON"),
        ] {
            let d = &v["captureData"][side];
            assert_eq!(keys(d), ["data", "encoding", "mode", "observedContentType"]);
            assert_eq!(d["mode"], mode);
            assert_eq!(d["encoding"], encoding);
        }
        assert_eq!(
            v["captureData"]["endpointInput"]["observedContentType"],
            "image/png"
        );
        assert_eq!(v["captureData"]["endpointInput"]["data"], "iVBORw==");
        // The model's answer, in its class order.
        assert_eq!(
            v["captureData"]["endpointOutput"]["data"],
            "[0.39,0.61,0.0]"
        );
        assert_eq!(
            keys(&v["eventMetadata"]),
            ["eventId", "inferenceId", "inferenceTime"]
        );
        let id = v["eventMetadata"]["eventId"].as_str().unwrap();
        assert_eq!(id, crate::record::event_id("uploads/bikes/a.png@e1"));
        assert_eq!(id.len(), 36);
        assert_eq!(v["eventMetadata"]["inferenceId"], "uploads/bikes/a.png@e1");
        assert_eq!(
            v["eventMetadata"]["inferenceTime"],
            "2026-11-25T10:03:04.567Z"
        );
        assert_eq!(v["inferstream"]["label"], "motorcycle");
        // Without the input, no endpointInput (as with CaptureMode Output).
        let line = render_line(&prediction(), None, &labels(), CaptureFormat::Sagemaker);
        let v: serde_json::Value = serde_json::from_slice(&line.bytes).unwrap();
        assert_eq!(keys(&v["captureData"]), ["endpointOutput"]);
    }

    #[test]
    fn inferstream_lines_keep_their_format() {
        let line = render_line(&prediction(), None, &labels(), CaptureFormat::Inferstream);
        assert_eq!(line.dir, "2026/11/25/10");
        let v: CaptureLine = serde_json::from_slice(&line.bytes).unwrap();
        assert_eq!(v.schema, CAPTURE_SCHEMA);
        assert!(v.endpoint_input.is_none());
        assert_eq!(v.endpoint_output.data, "[0.39,0.61,0.0]");
    }

    #[test]
    fn a_new_hour_is_a_new_folder() {
        assert_eq!(
            hour_of("image-classifier/AllTraffic/2026/11/25/10"),
            "2026/11/25/10"
        );
        assert!(hour_of("x/y/2026/11/25/09") < hour_of("a/b/2026/11/25/10"));
    }

    #[test]
    fn hours_partition_the_keys() {
        assert_eq!(hour_path("2026-11-24T07:33:50.123Z"), "2026/11/24/07");
        let now = hour_path("garbage");
        assert_eq!(now.len(), "yyyy/mm/dd/hh".len());
        assert!(now.starts_with("20"), "{now}");
    }
}
