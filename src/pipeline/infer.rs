//! Infer: SageMaker InvokeEndpoint with a concurrency cap, per-call timeout,
//! retries with exponential backoff and jitter, and batch bisection so that
//! one bad image never sinks its batch-mates.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::Value;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::SdkError;
use aws_sdk_sagemakerruntime::operation::invoke_endpoint::InvokeEndpointError;

use crate::clients::aws::{backoff, classify, describe, ErrorClass};
use crate::config::{Concurrency, EndpointConfig, RequestMode};
use crate::metrics::Metrics;
use crate::pipeline::adaptive::{self, Limiter, Outcome, Throttles};
use crate::pipeline::breaker::{Admission, Breaker};
use crate::pipeline::fetch::ImageKind;
use crate::record::DeadLetterReason;

/// Why an image got no prediction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct InferError {
    pub reason: DeadLetterReason,
    pub detail: String,
}

/// A successful inference of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Inference {
    pub scores: Vec<f64>,
    pub duration: Duration,
    pub variant: Option<String>,
}

/// One image to classify.
pub struct Input<'a> {
    pub body: &'a Bytes,
    pub kind: ImageKind,
}

enum CallError {
    /// The endpoint refused this request's content.
    Rejected(String),
    /// The endpoint failed this request through every attempt, while the
    /// circuit stayed closed (it answered other calls meanwhile).
    Unavailable(String),
    /// This request was the circuit's probe (nothing has succeeded yet to
    /// probe with) and failed: a batch is split, so that a batch holding
    /// an image the model cannot take does not stay the probe for ever.
    ProbeFailed(String),
}

impl CallError {
    /// What the images of the call failed with.
    fn into_infer_error(self) -> InferError {
        let (reason, detail) = match self {
            CallError::Rejected(d) => (DeadLetterReason::EndpointRejected, d),
            CallError::Unavailable(d) | CallError::ProbeFailed(d) => {
                (DeadLetterReason::EndpointUnavailable, d)
            }
        };
        InferError { reason, detail }
    }
}

struct CallOk {
    body: Bytes,
    variant: Option<String>,
    duration: Duration,
}

/// A request known to succeed, sent as the circuit's probe instead of an
/// image that may be the reason calls fail.
#[derive(Clone)]
struct Canary {
    body: Bytes,
    content_type: String,
    at: Instant,
}

/// Requests larger than this are not kept as the canary.
const MAX_CANARY_BYTES: usize = 256 * 1024;
/// How long a canary is kept before a newer success replaces it.
const CANARY_REFRESH: Duration = Duration::from_secs(60);
/// Numbers the calls, for the breaker to tell them apart.
static NEXT_CALLER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Attempts per call when bisecting a batch that kept failing.
const BISECT_ATTEMPTS: u32 = 2;

/// The inference client.
#[derive(Clone)]
pub struct Inferrer {
    client: aws_sdk_sagemakerruntime::Client,
    config: Arc<EndpointConfig>,
    calls: Arc<Limiter>,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
    breaker: Arc<Breaker>,
    canary: Arc<Mutex<Option<Canary>>>,
}

impl Inferrer {
    pub fn new(
        client: aws_sdk_sagemakerruntime::Client,
        config: EndpointConfig,
        metrics: Arc<Metrics>,
    ) -> Inferrer {
        let gauges = Some(adaptive::Gauges {
            limit: metrics.endpoint_concurrency.clone(),
            in_flight: metrics.endpoint_in_flight.clone(),
            rtt: metrics.endpoint_rtt.clone(),
        });
        let calls = Arc::new(match config.concurrency {
            Concurrency::Fixed(n) => Limiter::fixed(n, gauges),
            Concurrency::Adaptive => Limiter::adaptive(
                adaptive::Settings {
                    max: config.max_concurrency,
                    ..adaptive::Settings::default()
                },
                gauges,
            ),
        });
        let healthy = Arc::new(AtomicBool::new(true));
        let breaker = {
            let healthy = healthy.clone();
            let metrics = metrics.clone();
            let calls = calls.clone();
            Breaker::new(
                config.circuit_failures,
                config.circuit_open_initial,
                config.circuit_open_max,
                move |open| {
                    healthy.store(!open, Ordering::Relaxed);
                    metrics.circuit_open.set(i64::from(open));
                    if !open {
                        calls.restart();
                    }
                },
            )
        };
        Inferrer {
            client,
            calls,
            config: Arc::new(config),
            metrics,
            healthy,
            breaker,
            canary: Arc::new(Mutex::new(None)),
        }
    }

    /// Calls allowed at once now.
    pub fn concurrency(&self) -> usize {
        self.calls.limit()
    }

    /// False while the circuit is open (the endpoint is down), true again
    /// after its first answer.
    pub fn healthy(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    /// Classifies a batch; one result per input, in order.
    pub async fn infer(&self, inputs: &[Input<'_>]) -> Vec<Result<Inference, InferError>> {
        self.metrics.batch_size.observe(inputs.len() as f64);
        match self.config.mode {
            RequestMode::PerImage => {
                futures::future::join_all(inputs.iter().map(|i| self.infer_one(i))).await
            }
            RequestMode::Batch => {
                let idx: Vec<usize> = (0..inputs.len()).collect();
                let mut out: Vec<Option<Result<Inference, InferError>>> =
                    (0..inputs.len()).map(|_| None).collect();
                for (i, r) in self
                    .infer_group(inputs, idx, self.config.max_attempts)
                    .await
                {
                    out[i] = Some(r);
                }
                out.into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| {
                            Err(InferError {
                                reason: DeadLetterReason::BadEndpointResponse,
                                detail: "no result was produced for this image".into(),
                            })
                        })
                    })
                    .collect()
            }
        }
    }

    async fn infer_one(&self, input: &Input<'_>) -> Result<Inference, InferError> {
        let content_type = if self.config.content_type == "auto" {
            input.kind.content_type()
        } else {
            self.config.content_type.as_str()
        };
        let body = input.body;
        match self
            .call(
                &|| body.to_vec(),
                content_type,
                self.config.max_attempts,
                false,
            )
            .await
        {
            Ok(ok) => {
                let scores =
                    parse_single(&ok.body, self.config.labels.len()).map_err(|detail| {
                        self.metrics
                            .inference_errors
                            .with_label_values(&[BAD_RESPONSE])
                            .inc();
                        InferError {
                            reason: DeadLetterReason::BadEndpointResponse,
                            detail,
                        }
                    })?;
                self.keep_canary(|| body.clone(), body.len(), content_type);
                Ok(Inference {
                    scores,
                    duration: ok.duration,
                    variant: ok.variant,
                })
            }
            Err(e) => Err(e.into_infer_error()),
        }
    }

    /// Remembers a request that succeeded as the circuit's probe, unless a
    /// recent one is kept already.
    fn keep_canary(&self, body: impl FnOnce() -> Bytes, len: usize, content_type: &str) {
        if len > MAX_CANARY_BYTES {
            return;
        }
        let Ok(mut canary) = self.canary.lock() else {
            return;
        };
        if canary
            .as_ref()
            .is_some_and(|c| c.at.elapsed() < CANARY_REFRESH)
        {
            return;
        }
        *canary = Some(Canary {
            body: body(),
            content_type: content_type.to_string(),
            at: Instant::now(),
        });
    }

    fn canary(&self) -> Option<Canary> {
        self.canary.lock().ok().and_then(|c| c.clone())
    }

    /// Classifies the images `idx` of `inputs` in one call. When the call is
    /// refused, or keeps failing while the endpoint answers other calls,
    /// the group is split in halves until the culprit is alone, so that one
    /// image never takes its batch-mates with it.
    fn infer_group<'a>(
        &'a self,
        inputs: &'a [Input<'a>],
        idx: Vec<usize>,
        attempts: u32,
    ) -> BoxFuture<'a, Vec<(usize, Result<Inference, InferError>)>> {
        async move {
            let body = || batch_request(idx.iter().map(|&i| inputs[i].body.as_ref()));
            let split_probe = idx.len() > 1;
            match self
                .call(&body, "application/json", attempts, split_probe)
                .await
            {
                Ok(ok) => match parse_batch(&ok.body, idx.len(), self.config.labels.len()) {
                    Ok(all) => {
                        if let Some(&small) = idx.iter().min_by_key(|&&i| inputs[i].body.len()) {
                            let one = inputs[small].body;
                            self.keep_canary(
                                || Bytes::from(batch_request(std::iter::once(one.as_ref()))),
                                one.len(),
                                "application/json",
                            );
                        }
                        idx.into_iter()
                            .zip(all)
                            .map(|(i, scores)| {
                                (
                                    i,
                                    Ok(Inference {
                                        scores,
                                        duration: ok.duration,
                                        variant: ok.variant.clone(),
                                    }),
                                )
                            })
                            .collect()
                    }
                    Err(detail) => {
                        self.metrics
                            .inference_errors
                            .with_label_values(&[BAD_RESPONSE])
                            .inc();
                        idx.into_iter()
                            .map(|i| {
                                (
                                    i,
                                    Err(InferError {
                                        reason: DeadLetterReason::BadEndpointResponse,
                                        detail: detail.clone(),
                                    }),
                                )
                            })
                            .collect()
                    }
                },
                Err(
                    e @ (CallError::Rejected(_)
                    | CallError::Unavailable(_)
                    | CallError::ProbeFailed(_)),
                ) if idx.len() > 1 => {
                    let (detail, attempts) = match e {
                        // Only a probe failed: the halves keep every attempt.
                        CallError::ProbeFailed(d) => (d, attempts),
                        CallError::Rejected(d) | CallError::Unavailable(d) => {
                            (d, attempts.min(BISECT_ATTEMPTS))
                        }
                    };
                    tracing::debug!(images = idx.len(), %detail, "batch failed, splitting");
                    self.metrics.batch_splits.inc();
                    let mut left = idx;
                    let right = left.split_off(left.len() / 2);
                    let (a, b) = futures::join!(
                        self.infer_group(inputs, left, attempts),
                        self.infer_group(inputs, right, attempts)
                    );
                    a.into_iter().chain(b).collect()
                }
                Err(e) => {
                    let error = e.into_infer_error();
                    idx.into_iter().map(|i| (i, Err(error.clone()))).collect()
                }
            }
        }
        .boxed()
    }

    /// One InvokeEndpoint, as an error class and description on failure.
    async fn send(
        &self,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<CallOk, (ErrorClass, String)> {
        let cfg = &self.config;
        let call = self.calls.acquire().await;
        let start = Instant::now();
        let mut req = self
            .client
            .invoke_endpoint()
            .endpoint_name(&cfg.name)
            .content_type(content_type)
            .accept("application/json")
            .body(aws_sdk_sagemakerruntime::primitives::Blob::new(body));
        if !cfg.variant.is_empty() {
            req = req.target_variant(&cfg.variant);
        }
        self.metrics.inference_requests.inc();
        let result = tokio::time::timeout(cfg.timeout, req.send()).await;
        // Only answers time the model: a refusal may come before it ran.
        // A container that failed on this request (a ModelError with a
        // 5xx) says nothing of the load either.
        call.ended(match &result {
            Ok(Ok(_)) => Some(Outcome::Answered),
            Ok(Err(err)) if model_status(err).is_some_and(|s| s >= 500) => None,
            Ok(Err(err)) => match classify_invoke(err) {
                ErrorClass::Rejected | ErrorClass::Systemic => None,
                ErrorClass::Throttled => Some(Outcome::Throttled),
                ErrorClass::Unavailable | ErrorClass::Timeout | ErrorClass::Network => {
                    Some(Outcome::Failed)
                }
            },
            Err(_) => Some(Outcome::Failed),
        });
        let failure = match result {
            Ok(Ok(resp)) => {
                let duration = start.elapsed();
                self.metrics
                    .inference_duration
                    .observe(duration.as_secs_f64());
                let variant = resp.invoked_production_variant().map(str::to_string);
                let body = resp
                    .body
                    .map(|b| Bytes::from(b.into_inner()))
                    .unwrap_or_default();
                return Ok(CallOk {
                    body,
                    variant,
                    duration,
                });
            }
            Ok(Err(err)) => (classify_invoke(&err), describe(&err)),
            Err(_) => (
                ErrorClass::Timeout,
                format!(
                    "no answer within endpoint.timeout ({})",
                    humantime::format_duration(cfg.timeout)
                ),
            ),
        };
        self.metrics
            .inference_errors
            .with_label_values(&[error_kind(failure.0)])
            .inc();
        Err(failure)
    }

    /// One logical call: up to `max_attempts` attempts with backoff,
    /// through the circuit breaker. The request body is made by
    /// `make_body` once before the first attempt and again for each retry,
    /// so that no copy of a (possibly megabytes) request waits in memory
    /// for a retry that seldom comes.
    ///
    /// Attempts made while the circuit is open do not count: an outage
    /// makes images wait, not fail. When the circuit half-opens, the probe
    /// is the last request that succeeded (the canary) if there is one, so
    /// that an image the model cannot take is not mistaken for an outage
    /// and probed for ever: with the circuit closed again, its own failures
    /// count. Before anything has succeeded there is no canary and the
    /// call itself probes; with `split_probe` (a batch) a failed probe ends
    /// the call, for the batch to be split.
    async fn call(
        &self,
        make_body: &(dyn Fn() -> Vec<u8> + Sync),
        content_type: &str,
        max_attempts: u32,
        split_probe: bool,
    ) -> Result<CallOk, CallError> {
        let cfg = &self.config;
        let mut attempts = 0u32;
        let mut throttled = 0u32;
        let mut throttles = Throttles::default();
        let mut first = Some(make_body());
        let caller = NEXT_CALLER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let admission = self.breaker.admit_as(caller).await;
            if admission == Admission::Probe {
                if let Some(canary) = self.canary() {
                    match self.send(canary.body.to_vec(), &canary.content_type).await {
                        // It answered: the endpoint is up (even a refusal
                        // says so); this image's own call follows.
                        Ok(_) => self.breaker.success(),
                        Err((ErrorClass::Rejected, _)) => self.breaker.success(),
                        Err((ErrorClass::Systemic, detail)) => {
                            self.breaker.trip(admission, &detail)
                        }
                        Err((class, detail)) => {
                            tracing::debug!(kind = error_kind(class), %detail, "probe failed; circuit stays open");
                            self.breaker.failure(admission);
                        }
                    }
                    continue;
                }
            }
            let body = first.take().unwrap_or_else(make_body);
            let (class, detail) = match self.send(body, content_type).await {
                Ok(ok) => {
                    self.breaker.success();
                    return Ok(ok);
                }
                Err(e) => e,
            };
            let kind = error_kind(class);
            match class {
                ErrorClass::Rejected => {
                    // The endpoint answered, so it is up.
                    self.breaker.success();
                    return Err(CallError::Rejected(detail));
                }
                ErrorClass::Systemic => {
                    self.breaker.trip(admission, &detail);
                    continue;
                }
                _ => {}
            }
            // Adaptive concurrency answers throttling by calling less: while
            // its limit can still fall, the image waits without spending an
            // attempt (each throttle cuts the limit, once a round trip). At
            // one call, throttling counts as failing, towards the circuit,
            // so that an endpoint that throttles everything opens it and
            // images wait there. An image throttled again after the limit
            // rose since its last throttle (other calls brought it back up)
            // is throttled for itself: its attempts count. So this ends: at
            // one call, or by a rise.
            if class == ErrorClass::Throttled
                && admission == Admission::Normal
                && self.calls.throttled(&mut throttles)
            {
                throttled += 1;
                tracing::debug!(throttled, %detail, "invoke endpoint throttled; calling less, retrying");
                tokio::time::sleep(backoff(throttled, cfg.backoff_initial, cfg.backoff_max)).await;
                continue;
            }
            if self.breaker.failure(admission) {
                if split_probe && admission == Admission::Probe {
                    return Err(CallError::ProbeFailed(detail));
                }
                // The endpoint is down for everyone: wait for the circuit
                // to close rather than spend this image's attempts. A
                // failed probe lets a waiting image probe next: before
                // anything succeeded (no canary) this image may be the
                // cause, and must not take every probe for ever.
                if admission == Admission::Probe {
                    self.breaker.pass_over(caller);
                }
                tracing::debug!(kind, %detail, "invoke endpoint failed; circuit open, waiting");
                continue;
            }
            attempts += 1;
            if attempts >= max_attempts {
                tracing::warn!(endpoint = %cfg.name, attempts, last = %detail, "endpoint call failed through every attempt while the endpoint answered other calls");
                return Err(CallError::Unavailable(format!(
                    "{attempts} attempts failed while the endpoint answered other calls; last: {detail}"
                )));
            }
            tracing::debug!(attempts, kind, %detail, "invoke endpoint failed, retrying");
            tokio::time::sleep(backoff(attempts, cfg.backoff_initial, cfg.backoff_max)).await;
        }
    }
}

/// Classifies an InvokeEndpoint failure. A `ModelError` is the container's
/// answer: its `OriginalStatusCode` says whether the input was refused (4xx)
/// or the container failed (5xx, retryable) or was overloaded (429). A
/// `ValidationError` naming an endpoint or variant that is not found is
/// true of every call.
pub fn classify_invoke(err: &SdkError<InvokeEndpointError, HttpResponse>) -> ErrorClass {
    match err.as_service_error() {
        Some(InvokeEndpointError::ModelError(m)) => match m.original_status_code() {
            Some(429) => ErrorClass::Throttled,
            Some(s) if s >= 500 => ErrorClass::Unavailable,
            _ => ErrorClass::Rejected,
        },
        Some(InvokeEndpointError::ValidationError(v))
            if v.message()
                .is_some_and(|m| m.to_ascii_lowercase().contains("not found")) =>
        {
            ErrorClass::Systemic
        }
        _ => classify(err),
    }
}

/// The status the container answered, for a `ModelError`.
fn model_status(err: &SdkError<InvokeEndpointError, HttpResponse>) -> Option<i32> {
    match err.as_service_error() {
        Some(InvokeEndpointError::ModelError(m)) => m.original_status_code(),
        _ => None,
    }
}

/// The `kind` label of `inferstream_inference_errors_total`.
pub const fn error_kind(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Throttled => "throttled",
        ErrorClass::Unavailable => "server_error",
        ErrorClass::Timeout => "timeout",
        ErrorClass::Network => "network",
        ErrorClass::Rejected => "rejected",
        ErrorClass::Systemic => "refused",
    }
}

/// The `kind` of an answer whose shape or length does not fit.
pub const BAD_RESPONSE: &str = "bad_response";

/// Every `kind` of `inferstream_inference_errors_total`, for initialising
/// the metric's label values.
pub const ERROR_KINDS: [&str; 7] = [
    error_kind(ErrorClass::Throttled),
    error_kind(ErrorClass::Unavailable),
    error_kind(ErrorClass::Timeout),
    error_kind(ErrorClass::Network),
    error_kind(ErrorClass::Rejected),
    error_kind(ErrorClass::Systemic),
    BAD_RESPONSE,
];

/// `{"instances": [{"b64": "..."}, ...]}`
pub fn batch_request<'a>(images: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let engine = &base64::engine::general_purpose::STANDARD;
    let images: Vec<&[u8]> = images.collect();
    // Sized up front: a request of large images is megabytes, and growing
    // it by doubling copies it several times.
    let size: usize = images
        .iter()
        .map(|i| base64::encoded_len(i.len(), true).unwrap_or(0) + 12)
        .sum();
    let mut out = String::with_capacity(size + 16);
    out.push_str("{\"instances\":[");
    for (i, img) in images.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"b64\":\"");
        engine.encode_string(img, &mut out);
        out.push_str("\"}");
    }
    out.push_str("]}");
    out.into_bytes()
}

fn probabilities(v: &Value, classes: usize) -> Result<Vec<f64>, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("expected an array of {classes} probabilities"))?;
    if arr.len() != classes {
        return Err(format!(
            "{} probabilities for {classes} labels (endpoint.labels)",
            arr.len()
        ));
    }
    arr.iter()
        .map(|x| match x.as_f64() {
            Some(p) if p.is_finite() && (-1e-6..=1.0 + 1e-6).contains(&p) => Ok(p.clamp(0.0, 1.0)),
            _ => Err(format!("`{x}` is not a probability")),
        })
        .collect()
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    if body.len() > 120 {
        format!("{s}…")
    } else {
        s
    }
}

/// A per-image answer: `[p, ...]`, `{"prediction": [p, ...]}`,
/// `{"probabilities": [...]}` or `{"predictions": [[p, ...]]}`.
pub fn parse_single(body: &[u8], classes: usize) -> Result<Vec<f64>, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("answer is not JSON ({e}): {}", snippet(body)))?;
    let inner = match &v {
        Value::Array(_) => &v,
        Value::Object(o) => {
            if let Some(p) = o.get("prediction").or_else(|| o.get("probabilities")) {
                p
            } else if let Some(Value::Array(ps)) = o.get("predictions") {
                if ps.len() != 1 {
                    return Err(format!("{} predictions for one image", ps.len()));
                }
                &ps[0]
            } else {
                return Err(format!("answer has no prediction: {}", snippet(body)));
            }
        }
        _ => return Err(format!("unexpected answer: {}", snippet(body))),
    };
    probabilities(inner, classes)
}

/// A batch answer: `{"predictions": [[p, ...], ...]}` with one entry per image.
pub fn parse_batch(body: &[u8], images: usize, classes: usize) -> Result<Vec<Vec<f64>>, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("answer is not JSON ({e}): {}", snippet(body)))?;
    let preds = v
        .get("predictions")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("answer has no `predictions` array: {}", snippet(body)))?;
    if preds.len() != images {
        return Err(format!("{} predictions for {images} images", preds.len()));
    }
    preds
        .iter()
        .enumerate()
        .map(|(i, p)| probabilities(p, classes).map_err(|e| format!("prediction {i}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_answers_in_every_accepted_shape() {
        assert_eq!(parse_single(b"[0.25, 0.75]", 2).unwrap(), vec![0.25, 0.75]);
        assert_eq!(
            parse_single(br#"{"prediction": [0.1, 0.9]}"#, 2).unwrap(),
            vec![0.1, 0.9]
        );
        assert_eq!(
            parse_single(br#"{"predictions": [[0.1, 0.9]]}"#, 2).unwrap(),
            vec![0.1, 0.9]
        );
        assert!(parse_single(b"[0.5]", 2)
            .unwrap_err()
            .contains("1 probabilities for 2 labels"));
        assert!(parse_single(b"[0.5, \"x\"]", 2).is_err());
        assert!(parse_single(b"[0.5, 7]", 2).is_err());
        assert!(parse_single(b"<html>", 2).unwrap_err().contains("not JSON"));
        assert!(parse_single(b"{}", 2).is_err());
    }

    #[test]
    fn batch_answers_must_match_in_length() {
        let body = br#"{"predictions": [[0.1, 0.9], [0.8, 0.2]]}"#;
        assert_eq!(parse_batch(body, 2, 2).unwrap().len(), 2);
        assert!(parse_batch(body, 3, 2)
            .unwrap_err()
            .contains("2 predictions for 3 images"));
        assert!(parse_batch(br#"{"predictions": [[0.1, 0.9], [0.8]]}"#, 2, 2).is_err());
    }

    #[test]
    fn batch_request_is_instances_b64() {
        let body = batch_request([b"ab".as_slice(), b"c".as_slice()].into_iter());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["instances"][0]["b64"], "YWI=");
        assert_eq!(v["instances"][1]["b64"], "Yw==");
    }
}
