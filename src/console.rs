//! The operator console (issue #14): a live view of this instance's
//! predictions, the thresholds in force with what share each would send to
//! review, and changing them for every instance.
//!
//! `GET /` (the page), `GET /api/live`, `GET /api/curve?label=…` and
//! `GET /api/thresholds` are open (bind `console.listen` to loopback or
//! put it behind access control); `POST /api/thresholds` needs
//! `Authorization: Bearer <console.token>`, compared in constant time, and
//! writes the change to `console.control_topic`, which every instance
//! reads. Without the token nothing changes (403). A header, not a cookie,
//! carries the token, so another site cannot make a browser send a change
//! (no CORS is allowed).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::control::{self, Live, Thresholds};
use crate::pipeline::recent::{Recent, ReviewItem};

/// The console page: plain HTML and a little JavaScript, no build step.
const PAGE: &str = include_str!("console.html");

#[derive(Clone)]
struct Console {
    live: Arc<Live>,
    producer: FutureProducer,
    recent: Arc<Recent>,
    metrics: Arc<Metrics>,
    s3: aws_sdk_s3::Client,
    topic: String,
    /// Where reviewers' labels go (monitor.ground_truth_topic).
    truth_topic: String,
    token: Arc<String>,
    labels: Arc<Vec<String>>,
    /// Images larger than this are not shown (fetch.max_object_bytes).
    max_image_bytes: u64,
    timeout: std::time::Duration,
    /// Images read at once, at most (each is held in memory).
    images: Arc<tokio::sync::Semaphore>,
}

/// The largest request body taken (a change or a label is far smaller).
const MAX_BODY: usize = 16 * 1024;

/// Review images the console reads from S3 at once, at most.
const IMAGES_AT_ONCE: usize = 8;

/// What the console shows and changes.
pub struct Parts {
    pub live: Arc<Live>,
    /// Writes changes (see `control::control_producer`).
    pub producer: FutureProducer,
    pub recent: Arc<Recent>,
    pub metrics: Arc<Metrics>,
    /// Reads the images of the review queue.
    pub s3: aws_sdk_s3::Client,
}

/// The live view's period.
const PERIOD_MS: i64 = 10 * 60 * 1000;

/// Serves the console until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    parts: Parts,
    config: &crate::Config,
    stop: CancellationToken,
) {
    let Parts {
        live,
        producer,
        recent,
        metrics,
        s3,
    } = parts;
    let state = Console {
        live,
        producer,
        recent,
        metrics,
        s3,
        truth_topic: config.monitor.ground_truth_topic.clone(),
        max_image_bytes: config.fetch.max_object_bytes,
        timeout: config.fetch.timeout,
        images: Arc::new(tokio::sync::Semaphore::new(IMAGES_AT_ONCE)),
        topic: config.console.control_topic.clone(),
        // A token read from a file often ends in a newline.
        token: Arc::new(config.console.token.0.trim().to_string()),
        labels: Arc::new(config.endpoint.labels.clone()),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/api/live", get(live_view))
        .route("/api/curve", get(curve))
        .route("/api/thresholds", get(current).post(change))
        .route("/api/review", get(review_queue))
        .route("/api/review/image", get(review_image))
        .route("/api/review/label", axum::routing::post(review_label))
        // Changes are small; a body is read before the token is checked.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    // Idle longer than the slowest answer: an image waits up to
    // fetch.timeout, a change with based_on about 25 s.
    let idle = config.fetch.timeout + crate::http::IDLE;
    let limited = crate::http::Limited::new(listener, Some(crate::http::MAX_CONNECTIONS), idle);
    if let Err(e) = axum::serve(limited, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "console stopped");
    }
}

async fn page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (axum::http::header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

/// This instance's predictions of the last ten minutes, dead letters by
/// reason since start, drift, and the thresholds in force.
async fn live_view(State(c): State<Console>) -> Response {
    let m = &c.metrics;
    let dead: std::collections::BTreeMap<&str, u64> = crate::record::DeadLetterReason::ALL
        .iter()
        .map(|r| {
            (
                r.as_str(),
                m.dead_letters.with_label_values(&[r.as_str()]).get(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    Json(serde_json::json!({
        "period_seconds": PERIOD_MS / 1000,
        "summary": c.recent.summary(crate::record::now_ms(), PERIOD_MS),
        "dead_letters": dead,
        "drift": {
            "confidence_psi": m.drift_confidence_psi.get(),
            "label_psi": m.drift_label_psi.get(),
            "review_share": m.review_share.get(),
            "baseline_review_share": m.baseline_review_share.get(),
        },
        "thresholds": *c.live.get(),
        "labels": *c.labels,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct CurveQuery {
    label: Option<String>,
}

/// For a label (or all), the share of the latest predictions each
/// threshold would send to review, and the threshold in force.
async fn curve(
    State(c): State<Console>,
    axum::extract::Query(q): axum::extract::Query<CurveQuery>,
) -> Response {
    let label = q.label.filter(|l| !l.is_empty());
    if let Some(l) = &label {
        if !c.labels.contains(l) {
            return (
                StatusCode::NOT_FOUND,
                format!("{l:?} is not one of endpoint.labels\n"),
            )
                .into_response();
        }
    }
    let t = c.live.get();
    // The default applies to the labels without a threshold of their own.
    let (predictions, judged, points) = match label.as_deref() {
        Some(l) => c.recent.curve(|p| p == l),
        None => c.recent.curve(|p| !t.label_thresholds.contains_key(p)),
    };
    let threshold = label.as_deref().map_or(t.threshold, |l| t.for_label(l));
    Json(serde_json::json!({
        "label": label,
        "predictions": predictions,
        "judged": judged,
        "threshold": threshold,
        "curve": points,
    }))
    .into_response()
}

/// The latest review predictions made here, newest first.
async fn review_queue(State(c): State<Console>) -> Response {
    Json(serde_json::json!({
        "reviews": c.recent.reviews(),
        "labels": *c.labels,
        "ground_truth": !c.truth_topic.is_empty(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ImageQuery {
    id: String,
}

/// The image of a prediction in the review queue, read from S3 by the
/// service (no public URL); nothing else is served.
async fn review_image(
    State(c): State<Console>,
    axum::extract::Query(q): axum::extract::Query<ImageQuery>,
) -> Response {
    let Some(item) = c.recent.review_item(&q.id) else {
        return (StatusCode::NOT_FOUND, "not in the review queue\n").into_response();
    };
    let Ok(_permit) = c.images.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy: try again\n").into_response();
    };
    match tokio::time::timeout(c.timeout, read_image(&c, &item)).await {
        Ok(Ok(bytes)) => image_response(bytes),
        Ok(Err(response)) => response,
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "S3 did not give the image within fetch.timeout\n",
        )
            .into_response(),
    }
}

/// The image `item` was classified on, as bytes; the version classified
/// (version id, else ETag), or nothing.
async fn read_image(c: &Console, item: &ReviewItem) -> Result<Vec<u8>, Response> {
    let mut get = c.s3.get_object().bucket(&item.bucket).key(&item.key);
    if let Some(v) = &item.version_id {
        get = get.version_id(v);
    } else if let Some(e) = &item.etag {
        get = get.if_match(e);
    }
    let out = get.send().await.map_err(|e| {
        tracing::warn!(bucket = %item.bucket, key = %item.key, error = %crate::clients::aws::describe(&e),
            "console: cannot read a review image");
        (
            StatusCode::BAD_GATEWAY,
            "S3 did not give the image as it was classified (see the service's log)\n",
        )
            .into_response()
    })?;
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than fetch.max_object_bytes\n",
        )
            .into_response()
    };
    let announced = out.content_length().unwrap_or(0).max(0) as u64;
    if announced > c.max_image_bytes {
        return Err(too_large());
    }
    let mut body = out.body;
    let mut bytes = Vec::with_capacity(announced as usize);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            tracing::warn!(key = %item.key, error = %e, "console: reading a review image failed");
            (StatusCode::BAD_GATEWAY, "reading the image failed\n").into_response()
        })?;
        if (bytes.len() + chunk.len()) as u64 > c.max_image_bytes {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

fn image_response(bytes: Vec<u8>) -> Response {
    // Only what is an image, with its own type; never sniffed as HTML.
    let Some(kind) = crate::pipeline::fetch::sniff(&bytes) else {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not an image\n").into_response();
    };
    (
        [
            (axum::http::header::CONTENT_TYPE, kind.content_type()),
            (axum::http::header::CACHE_CONTROL, "no-store"),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response()
}

/// A reviewer's label for a queued prediction.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    id: String,
    label: String,
    #[serde(default)]
    by: Option<String>,
}

/// Records a reviewer's label as ground truth (`monitor.ground_truth_topic`),
/// so that accuracy and the threshold curve learn from every review.
async fn review_label(
    State(c): State<Console>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = refused(&headers, &c.token, "a review label") {
        return refused;
    }
    if c.truth_topic.is_empty() {
        return (
            StatusCode::CONFLICT,
            "monitor.ground_truth_topic is not set: reviewers' labels have nowhere to go\n",
        )
            .into_response();
    }
    let answer: Answer = match parsed(&body, r#"{"id": "…", "label": "…"}"#) {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    if !c.labels.contains(&answer.label) {
        return (
            StatusCode::BAD_REQUEST,
            format!("{:?} is not one of endpoint.labels\n", answer.label),
        )
            .into_response();
    }
    // The ground-truth join counts the first label of a prediction only.
    match c.recent.claim(&answer.id, &answer.label) {
        Ok(()) => {}
        Err(None) => return (StatusCode::NOT_FOUND, "not in the review queue\n").into_response(),
        Err(Some(first)) => {
            return (
                StatusCode::CONFLICT,
                format!("already answered {first:?}; the first answer counts\n"),
            )
                .into_response()
        }
    }
    let by = control::printable(&answer.by.unwrap_or_default(), 100);
    let record = serde_json::json!({
        "id": answer.id,
        "label": answer.label,
        "by": if by.trim().is_empty() { "console".to_string() } else { by },
        "at": crate::record::now_rfc3339(),
    });
    let json = record.to_string();
    // Sent by a task of its own: a reviewer who leaves (closing the page
    // drops this handler) must not leave the answer taken but unwritten.
    let (producer, topic, recent, id) = (
        c.producer.clone(),
        c.truth_topic.clone(),
        c.recent.clone(),
        answer.id.clone(),
    );
    let sent = tokio::spawn(async move {
        let send = producer.send(
            rdkafka::producer::FutureRecord::to(&topic)
                .key(&id)
                .payload(&json),
            rdkafka::util::Timeout::Never,
        );
        let sent = send.await.map(|_| ()).map_err(|(e, _)| e.to_string());
        if let Err(e) = &sent {
            recent.release(&id);
            tracing::warn!(id = %id, error = %e, "console: a reviewer's label was not written; it can be given again");
        }
        sent
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match sent {
        Ok(()) => {
            tracing::info!(id = %answer.id, label = %answer.label, "console: a reviewer's label written as ground truth");
            (StatusCode::OK, Json(record)).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Kafka did not confirm the label ({e}); it may still be recorded\n"),
        )
            .into_response(),
    }
}

async fn current(State(c): State<Console>) -> Response {
    Json(serde_json::json!({
        "current": *c.live.get(),
        "history": c.live.history(),
    }))
    .into_response()
}

/// A change asked for: the default threshold and, optionally, per-label
/// ones (replacing them all), and who asks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    threshold: f64,
    #[serde(default)]
    label_thresholds: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    by: Option<String>,
    /// The `at` of the thresholds the change starts from: when given, a
    /// change made meanwhile (anywhere) refuses this one (409).
    #[serde(default)]
    based_on: Option<String>,
}

/// A JSON request body, or the 400 answer naming what was `expected`.
fn parsed<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(
            (
                StatusCode::BAD_REQUEST,
                format!("expected {expected}: {e}\n"),
            )
                .into_response(),
        )
    })
}

/// None when `headers` carry the token, else the 403 answer (and a
/// warning that `what` was refused).
fn refused(headers: &HeaderMap, token: &str, what: &str) -> Option<Response> {
    if authorised(headers, token) {
        return None;
    }
    tracing::warn!("console: {what} without the right token was refused");
    Some(
        (
            StatusCode::FORBIDDEN,
            "changes need Authorization: Bearer <console.token>\n",
        )
            .into_response(),
    )
}

/// Whether `headers` carry `Authorization: Bearer <token>`; never with an
/// empty token. The comparison takes the same time wherever they differ.
fn authorised(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

async fn change(State(c): State<Console>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(refused) = refused(&headers, &c.token, "a change") {
        return refused;
    }
    let asked: Change = match parsed(
        &body,
        r#"{"threshold": 0.9, "label_thresholds": {…}, "by": "…"}"#,
    ) {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    if let Some(base) = &asked.based_on {
        if let Err(e) = read_to_the_end(&c).await {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot tell whether the thresholds changed meanwhile ({e}); try again\n"),
            )
                .into_response();
        }
        let now = c.live.get();
        if now.at != *base {
            return (
                StatusCode::CONFLICT,
                format!(
                    "the thresholds changed meanwhile ({} at {}): look at them and apply again\n",
                    now.by, now.at
                ),
            )
                .into_response();
        }
    }
    let t = Thresholds {
        schema: control::SCHEMA.into(),
        threshold: asked.threshold,
        label_thresholds: asked.label_thresholds,
        by: asked
            .by
            .filter(|b| !b.trim().is_empty())
            .unwrap_or_else(|| "console".into()),
        at: crate::record::now_rfc3339(),
    }
    .tidy();
    if let Err(e) = t.check(&c.labels) {
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    match control::publish(&c.producer, &c.topic, &t).await {
        Ok(()) => {
            tracing::info!(threshold = t.threshold, label_thresholds = ?t.label_thresholds, by = %t.by,
                "console: thresholds change written to the control topic");
            (StatusCode::OK, Json(t)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: the change could not be written");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
    }
}

/// Waits (up to 5 s) until this instance has read the control topic up to
/// where it ends now, so that the thresholds in force here are the latest.
async fn read_to_the_end(c: &Console) -> Result<(), String> {
    let wait = std::time::Duration::from_secs(5);
    let (producer, topic) = (c.producer.clone(), c.topic.clone());
    let ends = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer as _;
        let client = producer.client();
        let md = client
            .fetch_metadata(Some(&topic), wait)
            .map_err(|e| e.to_string())?;
        let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
        (0..partitions as i32)
            .map(|p| {
                client
                    .fetch_watermarks(&topic, p, wait)
                    .map(|ends| (p, ends))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<(i32, (i64, i64))>, String>>()
    })
    .await
    .map_err(|e| e.to_string())??;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let read = c.live.read_to();
        // An empty partition (low = high) has nothing to read.
        if ends
            .iter()
            .all(|(p, (low, high))| read.get(p).copied().unwrap_or(*low) >= *high)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(
                "this instance has not read console.control_topic to its end within 5 s".into(),
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_authorised() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(authorised(&with("Bearer s3cret"), "s3cret"));
        assert!(!authorised(&with("Bearer s3cre"), "s3cret"));
        assert!(!authorised(&with("Bearer s3cret!"), "s3cret"));
        assert!(!authorised(&with("s3cret"), "s3cret"));
        assert!(!authorised(&HeaderMap::new(), "s3cret"));
        // No token configured: nothing is authorised.
        assert!(!authorised(&with("Bearer "), ""));
    }
}
