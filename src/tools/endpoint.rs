//! `inferstream endpoint`: a local model server.
//!
//! It speaks the SageMaker Runtime API (`POST /endpoints/{name}/invocations`,
//! what the AWS SDK calls when `aws.sagemaker.endpoint_url` points here) and
//! the SageMaker container contract (`GET /ping`, `POST /invocations`), in
//! both request modes of the service:
//!
//! - per image: the body is the image (`application/x-image`, `image/*`),
//!   the answer a JSON array of class probabilities, like the SageMaker
//!   built-in image classifier;
//! - batch: `{"instances": [{"b64": "..."}]}` → `{"predictions": [[...]]}`.
//!
//! # The test model
//! Deterministic and documented so that a test can make an image that scores
//! what it needs ([`model::test_image`]). With `N` classes, the image is
//! decoded and the mean red and green channel values `R`, `G` (0..=255) of
//! all pixels decide: the winning class is `min(N-1, R*N/256)`, its
//! probability `1/N + (1-1/N)*G/255`, and the rest is shared equally by the
//! other classes. An undecodable image is a model error (HTTP 424
//! `ModelError` with `OriginalStatusCode` 400), which in a batch request
//! fails the whole request. An image whose mean blue channel is 250 or more
//! ([`model::crash_image`]) crashes the model: HTTP 424 `ModelError` with
//! `OriginalStatusCode` 500, as SageMaker answers when a container fails.
//!
//! # Faults
//! [`Faults`] injects latency, a failure rate (HTTP 500 `InternalFailure`),
//! a throttling rate (HTTP 400 `ThrottlingException`), an outage window
//! (HTTP 503 `ServiceUnavailable`), and slow calls (a fraction answered
//! only after an extra delay), so the service can be tested against a
//! misbehaving endpoint. The outage answers with a chosen [`Failure`]
//! (ServiceUnavailable by default; a crashing container, denied access,
//! expired credentials, an unknown endpoint), and [`EndpointControl`] turns
//! a failure on and off while the server runs. `GET /stats` reports request
//! counts as JSON.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pipeline::adaptive::Limiter;

/// Largest request body accepted, as SageMaker does.
const MAX_BODY: usize = 6 * 1024 * 1024;

/// What the endpoint serves and how it misbehaves.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Endpoint name answered on `/endpoints/{name}/invocations`; `None` answers any name.
    pub name: Option<String>,
    /// Number of classes of the test model.
    pub classes: usize,
    /// Calls served at once, like a model server's workers; further calls
    /// wait for a free worker (0: no limit). With `latency` L and `workers`
    /// C, the endpoint answers at most C calls per L, whoever calls it.
    pub workers: usize,
    /// Calls that may wait for a worker; a call beyond them is throttled
    /// at once (HTTP 400 `ThrottlingException`), as an overloaded endpoint
    /// does. `None`: any number wait.
    pub queue: Option<usize>,
    /// Remember the answer for each distinct image instead of decoding it
    /// again (benchmarks: the model's cost is then only the configured
    /// latency, not this process's CPU).
    pub memoize: bool,
    pub faults: Faults,
}

/// Injected misbehaviour.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added to every call.
    pub latency: Duration,
    /// Added per image in the call.
    pub latency_per_image: Duration,
    /// Fraction of calls answered 500 InternalFailure.
    pub failure_rate: f64,
    /// Fraction of calls answered 400 ThrottlingException.
    pub throttle_rate: f64,
    /// Fraction of calls that answer only after an extra `slow_for`.
    pub slow_rate: f64,
    /// Extra delay of a slow call.
    pub slow_for: Duration,
    /// Outage start, measured from server start.
    pub outage_after: Option<Duration>,
    /// Outage length; calls in the window get `outage_kind`.
    pub outage_for: Duration,
    /// What calls get during the outage.
    pub outage_kind: Failure,
    /// Seed of the fault dice, for repeatable runs.
    pub seed: u64,
}

/// An answer for every call while an outage lasts, as SageMaker Runtime
/// gives it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Failure {
    /// 503 `ServiceUnavailable`.
    #[default]
    Unavailable,
    /// 424 `ModelError` with `OriginalStatusCode` 500: the container failed.
    ModelCrash,
    /// 400 `AccessDeniedException`: the caller may not invoke the endpoint.
    AccessDenied,
    /// 403 `ExpiredTokenException`: the caller's credentials expired.
    ExpiredToken,
    /// 403 `UnrecognizedClientException`: unknown access key.
    UnrecognizedClient,
    /// 400 `ValidationError` "Endpoint … not found".
    EndpointNotFound,
    /// 400 `ThrottlingException`, at once: no room for any call.
    Throttled,
}

impl Failure {
    /// Every kind, with the name `--outage-kind` takes.
    pub const ALL: [(Failure, &'static str); 7] = [
        (Failure::Unavailable, "unavailable"),
        (Failure::ModelCrash, "model-crash"),
        (Failure::AccessDenied, "access-denied"),
        (Failure::ExpiredToken, "expired-token"),
        (Failure::UnrecognizedClient, "unrecognized-client"),
        (Failure::EndpointNotFound, "endpoint-not-found"),
        (Failure::Throttled, "throttled"),
    ];

    /// The kind named `name` (see [`Failure::ALL`]).
    pub fn parse(name: &str) -> Option<Failure> {
        Failure::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(f, _)| *f)
    }

    fn response(self, endpoint: &str) -> Response {
        match self {
            Failure::Unavailable => aws_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "The service is unavailable (injected outage).",
            ),
            Failure::ModelCrash => model_error(
                500,
                "worker died (injected): the model server's process exited",
            ),
            Failure::AccessDenied => aws_error(
                StatusCode::BAD_REQUEST,
                "AccessDeniedException",
                &format!("User: arn:aws:iam::000000000000:user/tests is not authorized to perform: sagemaker:InvokeEndpoint on resource: arn:aws:sagemaker:us-east-1:000000000000:endpoint/{endpoint} (injected)"),
            ),
            Failure::ExpiredToken => aws_error(
                StatusCode::FORBIDDEN,
                "ExpiredTokenException",
                "The security token included in the request is expired (injected)",
            ),
            Failure::UnrecognizedClient => aws_error(
                StatusCode::FORBIDDEN,
                "UnrecognizedClientException",
                "The security token included in the request is invalid (injected)",
            ),
            Failure::EndpointNotFound => aws_error(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                &format!("Endpoint {endpoint} of account 000000000000 not found. (injected)"),
            ),
            Failure::Throttled => aws_error(
                StatusCode::BAD_REQUEST,
                "ThrottlingException",
                "Rate exceeded (injected).",
            ),
        }
    }
}

/// Turns a failure of every call on and off while the endpoint runs.
#[derive(Debug, Default)]
pub struct EndpointControl {
    failing: Mutex<Option<Failure>>,
}

impl EndpointControl {
    /// From now on every call gets `failure`; `None` ends it.
    pub fn fail_with(&self, failure: Option<Failure>) {
        if let Ok(mut f) = self.failing.lock() {
            *f = failure;
        }
    }

    fn current(&self) -> Option<Failure> {
        self.failing.lock().ok().and_then(|f| *f)
    }
}

/// Request counters, shared with whoever started the server.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub requests: AtomicU64,
    pub images: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub throttled: AtomicU64,
    pub unavailable: AtomicU64,
    pub model_errors: AtomicU64,
    pub slow: AtomicU64,
    /// Sum over answered calls of the time from request received to
    /// answer ready, microseconds.
    pub answer_micros: AtomicU64,
}

#[derive(Serialize)]
struct StatsView {
    requests: u64,
    images: u64,
    ok: u64,
    failed: u64,
    throttled: u64,
    unavailable: u64,
    model_errors: u64,
    slow: u64,
}

impl EndpointStats {
    fn view(&self) -> StatsView {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsView {
            requests: g(&self.requests),
            images: g(&self.images),
            ok: g(&self.ok),
            failed: g(&self.failed),
            throttled: g(&self.throttled),
            unavailable: g(&self.unavailable),
            model_errors: g(&self.model_errors),
            slow: g(&self.slow),
        }
    }
}

struct AppState {
    opts: EndpointOptions,
    control: Arc<EndpointControl>,
    started: Instant,
    dice: Mutex<fastrand::Rng>,
    stats: Arc<EndpointStats>,
    workers: Option<Arc<Limiter>>,
    /// Calls waiting for a worker.
    queued: std::sync::atomic::AtomicUsize,
    memo: Mutex<HashMap<u64, Vec<f64>>>,
}

/// Answers remembered at most (then forgotten all at once).
const MEMO_ENTRIES: usize = 65_536;

/// A running endpoint.
pub struct RunningEndpoint {
    pub addr: SocketAddr,
    pub stats: Arc<EndpointStats>,
    /// Switches a failure of every call on and off.
    pub control: Arc<EndpointControl>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    workers: Option<Arc<Limiter>>,
}

impl RunningEndpoint {
    /// The URL to use as `aws.sagemaker.endpoint_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the number of workers (an endpoint scaling in or out);
    /// calls being served finish first. No effect without workers.
    pub fn set_workers(&self, n: usize) {
        if let Some(w) = &self.workers {
            w.set_limit(n);
        }
    }
}

/// Starts serving on `listener` until `shutdown` is cancelled.
pub fn spawn(
    listener: TcpListener,
    opts: EndpointOptions,
    shutdown: CancellationToken,
) -> std::io::Result<RunningEndpoint> {
    let addr = listener.local_addr()?;
    let stats = Arc::new(EndpointStats::default());
    let control = Arc::new(EndpointControl::default());
    let workers = (opts.workers > 0).then(|| Arc::new(Limiter::fixed(opts.workers, None)));
    let state = Arc::new(AppState {
        control: control.clone(),
        dice: Mutex::new(fastrand::Rng::with_seed(opts.faults.seed)),
        workers: workers.clone(),
        queued: Default::default(),
        memo: Mutex::new(HashMap::new()),
        opts,
        started: Instant::now(),
        stats: stats.clone(),
    });
    let app = Router::new()
        .route("/ping", get(|| async { StatusCode::OK }))
        .route("/stats", get(stats_handler))
        .route("/invocations", post(invocations))
        .route("/endpoints/{name}/invocations", post(runtime_invocations))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    Ok(RunningEndpoint {
        addr,
        stats,
        control,
        task,
        workers,
    })
}

/// `inferstream endpoint`: serves on `listen` until SIGTERM or SIGINT.
pub async fn command(listen: &str, opts: EndpointOptions) -> std::process::ExitCode {
    use std::process::ExitCode;
    crate::app::init_logging(crate::config::LogFormat::Text, "info");
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    if let Err(e) = crate::shutdown::on_signals(shutdown.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    let running = match spawn(listener, opts, shutdown) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the endpoint");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(url = %running.url(), "endpoint listening");
    match running.task.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "endpoint failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "endpoint task failed");
            ExitCode::FAILURE
        }
    }
}

async fn stats_handler(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(state.stats.view())
}

async fn runtime_invocations(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(expected) = &state.opts.name {
        if &name != expected {
            return aws_error(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                &format!("Endpoint {name} of account 000000000000 not found."),
            );
        }
    }
    invoke(state, &headers, body).await
}

async fn invocations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    invoke(state, &headers, body).await
}

impl AppState {
    /// The model's answer, remembered per distinct image when `memoize` is on.
    fn classify(&self, img: &[u8], classes: usize) -> Result<Vec<f64>, model::ModelFailure> {
        if !self.opts.memoize {
            return model::classify(img, classes);
        }
        let key = fingerprint(img);
        if let Some(p) = self.memo.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(p);
        }
        let p = model::classify(img, classes)?;
        if let Ok(mut memo) = self.memo.lock() {
            if memo.len() >= MEMO_ENTRIES {
                memo.clear();
            }
            memo.insert(key, p.clone());
        }
        Ok(p)
    }
}

/// A hash of an image: its length and up to 4 KiB of its bytes, evenly
/// spread (cheap for large photos, exact for small images).
fn fingerprint(img: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    img.len().hash(&mut h);
    let step = (img.len() / 4096).max(1);
    for b in img.iter().step_by(step) {
        h.write_u8(*b);
    }
    h.finish()
}

enum Dice {
    Ok,
    Fail,
    Throttle,
    Outage(Failure),
}

impl AppState {
    fn roll(&self) -> Dice {
        let f = &self.opts.faults;
        if let Some(failure) = self.control.current() {
            return Dice::Outage(failure);
        }
        if let Some(after) = f.outage_after {
            let t = self.started.elapsed();
            if t >= after && t < after + f.outage_for {
                return Dice::Outage(f.outage_kind);
            }
        }
        let x = match self.dice.lock() {
            Ok(mut rng) => rng.f64(),
            Err(_) => 1.0,
        };
        if x < f.throttle_rate {
            Dice::Throttle
        } else if x < f.throttle_rate + f.failure_rate {
            Dice::Fail
        } else {
            Dice::Ok
        }
    }
}

/// Waits until `t`, to within a few microseconds: tokio's timer rounds up
/// to the next millisecond, which would add half a millisecond or more to
/// every call, so the last millisecond is spent yielding.
async fn wait_until(t: tokio::time::Instant) {
    let early = Duration::from_millis(1);
    if let Some(before) = t.checked_sub(early) {
        tokio::time::sleep_until(before).await;
    }
    while tokio::time::Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

/// Requests larger than this are parsed and classified on a blocking
/// thread, so that a batch of photos does not stall other connections.
const LARGE_REQUEST: usize = 64 * 1024;

/// Runs `f` on a blocking thread when `large`, else here.
async fn model_work<T: Send + 'static, E: Send + 'static>(
    large: bool,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
    failed: impl FnOnce(String) -> E,
) -> Result<T, E> {
    if large {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) => Err(failed(format!("the model failed: {e}"))),
        }
    } else {
        f()
    }
}

async fn invoke(state: Arc<AppState>, headers: &HeaderMap, body: Bytes) -> Response {
    let received = Instant::now();
    let large = body.len() > LARGE_REQUEST;
    let stats = &state.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let batch = content_type.starts_with("application/json");

    let images: Vec<Vec<u8>> = if batch {
        let body = body.clone();
        match model_work(large, move || parse_instances(&body), |e| e).await {
            Ok(images) => images,
            Err(msg) => {
                stats.model_errors.fetch_add(1, Ordering::Relaxed);
                return model_error(400, &msg);
            }
        }
    } else if content_type.starts_with("application/x-image") || content_type.starts_with("image/")
    {
        vec![body.to_vec()]
    } else {
        stats.model_errors.fetch_add(1, Ordering::Relaxed);
        return model_error(400, &format!("unsupported content type `{content_type}`; send application/x-image, image/* or application/json"));
    };
    stats
        .images
        .fetch_add(images.len() as u64, Ordering::Relaxed);

    // A call waits for a free worker, then takes the whole latency; when
    // `queue` calls wait already, it is throttled at once.
    let _worker = match &state.workers {
        Some(w) => match w.try_acquire() {
            Some(worker) => Some(worker),
            None => {
                // Counted out again however the wait ends (a caller that
                // hangs up drops this future).
                struct Queued<'a>(&'a std::sync::atomic::AtomicUsize);
                impl Drop for Queued<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let waiting = state.queued.fetch_add(1, Ordering::SeqCst);
                let queued = Queued(&state.queued);
                if state.opts.queue.is_some_and(|q| waiting >= q) {
                    stats.throttled.fetch_add(1, Ordering::Relaxed);
                    return aws_error(
                        StatusCode::BAD_REQUEST,
                        "ThrottlingException",
                        "Rate exceeded: every worker is busy and the queue is full.",
                    );
                }
                let worker = w.acquire().await;
                drop(queued);
                Some(worker)
            }
        },
        None => None,
    };
    let dice = state.roll();
    let f = &state.opts.faults;
    let mut delay = f.latency + f.latency_per_image * images.len() as u32;
    if f.slow_rate > 0.0 && state.dice.lock().map(|mut r| r.f64()).unwrap_or(1.0) < f.slow_rate {
        stats.slow.fetch_add(1, Ordering::Relaxed);
        delay += f.slow_for;
    }
    // The latency is the whole answer time once the request is in: the
    // model's work below happens within it, as on a real endpoint. A call
    // waiting for a worker starts its clock when it gets one.
    let started = if state.workers.is_some() {
        Instant::now()
    } else {
        received
    };
    let answer_at = tokio::time::Instant::from_std(started + delay);
    let predictions = {
        let state = state.clone();
        let classes = state.opts.classes;
        model_work(
            large,
            move || {
                images
                    .iter()
                    .enumerate()
                    .map(|(i, img)| {
                        state.classify(img, classes).map_err(|e| match e {
                            model::ModelFailure::BadInput(m) => (400, format!("instance {i}: {m}")),
                            model::ModelFailure::Crashed(m) => (500, format!("instance {i}: {m}")),
                        })
                    })
                    .collect::<Result<Vec<_>, (u16, String)>>()
            },
            |e| (500, e),
        )
        .await
    };
    match dice {
        Dice::Outage(failure) => {
            // Throttling is answered at once, before any work.
            if failure == Failure::Throttled {
                stats.throttled.fetch_add(1, Ordering::Relaxed);
            } else {
                wait_until(answer_at).await;
                stats.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            let name = state.opts.name.as_deref().unwrap_or("image-classifier");
            return failure.response(name);
        }
        Dice::Throttle => {
            wait_until(answer_at).await;
            stats.throttled.fetch_add(1, Ordering::Relaxed);
            return aws_error(
                StatusCode::BAD_REQUEST,
                "ThrottlingException",
                "Rate exceeded (injected).",
            );
        }
        Dice::Fail => {
            wait_until(answer_at).await;
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return aws_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalFailure",
                "An internal failure occurred (injected).",
            );
        }
        Dice::Ok => {}
    }

    wait_until(answer_at).await;
    stats
        .answer_micros
        .fetch_add(received.elapsed().as_micros() as u64, Ordering::Relaxed);
    let predictions = match predictions {
        Ok(p) => p,
        Err((status, e)) => {
            stats.model_errors.fetch_add(1, Ordering::Relaxed);
            return model_error(status, &e);
        }
    };
    stats.ok.fetch_add(1, Ordering::Relaxed);
    let body = if batch {
        serde_json::json!({ "predictions": predictions })
    } else {
        serde_json::json!(predictions.first())
    };
    let mut resp = axum::Json(body).into_response();
    resp.headers_mut().insert(
        "x-amzn-invoked-production-variant",
        HeaderValue::from_static("AllTraffic"),
    );
    resp
}

fn parse_instances(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("request is not JSON: {e}"))?;
    let instances = v
        .get("instances")
        .and_then(|i| i.as_array())
        .ok_or("request has no `instances` array")?;
    instances
        .iter()
        .enumerate()
        .map(|(i, inst)| {
            let b64 = inst
                .get("b64")
                .and_then(|b| b.as_str())
                .ok_or_else(|| format!("instance {i} has no `b64` string"))?;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("instance {i} is not base64: {e}"))
        })
        .collect()
}

fn aws_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = (
        status,
        axum::Json(serde_json::json!({ "__type": code, "message": message })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(code) {
        resp.headers_mut().insert("x-amzn-errortype", v);
    }
    resp
}

/// What SageMaker answers when the container answers `status` (400: it
/// rejects the input; 500: it failed).
fn model_error(status: u16, message: &str) -> Response {
    let side = if status >= 500 { "server" } else { "client" };
    let mut resp = (
        StatusCode::FAILED_DEPENDENCY,
        axum::Json(serde_json::json!({
            "__type": "ModelError",
            "message": format!("Received {side} error ({status}) from primary with message \"{message}\"."),
            "OriginalStatusCode": status,
            "OriginalMessage": message,
            "LogStreamArn": "arn:aws:logs:us-east-1:000000000000:log-group:/aws/sagemaker/Endpoints/image-classifier",
        })),
    )
        .into_response();
    resp.headers_mut()
        .insert("x-amzn-errortype", HeaderValue::from_static("ModelError"));
    resp
}

/// The deterministic test model and images that score what a test needs.
pub mod model {
    use std::io::Cursor;

    use image::{ImageFormat, ImageReader, Limits, Rgb, RgbImage};

    /// Largest decoded image accepted (a decompression bomb is refused).
    const MAX_PIXELS_SIDE: u32 = 8192;
    const MAX_ALLOC: u64 = 256 * 1024 * 1024;

    /// Why the model gave no answer.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ModelFailure {
        /// The input is not an image it can read (a 4xx from the container).
        BadInput(String),
        /// The model crashed on it (a 5xx from the container).
        Crashed(String),
    }

    impl std::fmt::Display for ModelFailure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                ModelFailure::BadInput(m) | ModelFailure::Crashed(m) => f.write_str(m),
            }
        }
    }

    /// Mean blue at or above which the model crashes ([`crash_image`]).
    const CRASH_BLUE: f64 = 250.0;

    /// Class probabilities of an image (see the module docs for the rule).
    pub fn classify(bytes: &[u8], classes: usize) -> Result<Vec<f64>, ModelFailure> {
        let bad = ModelFailure::BadInput;
        let classes = classes.max(1);
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(format!("cannot read image: {e}")))?;
        let mut limits = Limits::default();
        limits.max_image_width = Some(MAX_PIXELS_SIDE);
        limits.max_image_height = Some(MAX_PIXELS_SIDE);
        limits.max_alloc = Some(MAX_ALLOC);
        reader.limits(limits);
        let img = reader
            .decode()
            .map_err(|e| bad(format!("cannot decode image: {e}")))?;
        let rgb = img.to_rgb8();
        let n = u64::from(rgb.width()) * u64::from(rgb.height());
        if n == 0 {
            return Err(bad("image has no pixels".into()));
        }
        let (mut r, mut g, mut b) = (0u64, 0u64, 0u64);
        for p in rgb.pixels() {
            r += u64::from(p[0]);
            g += u64::from(p[1]);
            b += u64::from(p[2]);
        }
        if b as f64 / n as f64 >= CRASH_BLUE {
            return Err(ModelFailure::Crashed(
                "the model crashed on this image (injected: mean blue >= 250)".into(),
            ));
        }
        Ok(probabilities(
            r as f64 / n as f64,
            g as f64 / n as f64,
            classes,
        ))
    }

    /// The rule, from mean red and green (0..=255).
    pub fn probabilities(mean_r: f64, mean_g: f64, classes: usize) -> Vec<f64> {
        let n = classes.max(1);
        if n == 1 {
            return vec![1.0];
        }
        let nf = n as f64;
        let winner = ((mean_r * nf / 256.0) as usize).min(n - 1);
        let top = 1.0 / nf + (1.0 - 1.0 / nf) * (mean_g / 255.0).clamp(0.0, 1.0);
        let rest = (1.0 - top) / (nf - 1.0);
        (0..n)
            .map(|i| if i == winner { top } else { rest })
            .collect()
    }

    /// The confidence the model gives to [`test_image`]`(_, confidence, classes, _)`
    /// (the green channel quantises it to steps of about 1/255).
    pub fn expected_confidence(confidence: f64, classes: usize) -> f64 {
        let (_, g) = colour(0, confidence, classes);
        probabilities(0.0, f64::from(g), classes)[0]
    }

    fn colour(label: usize, confidence: f64, classes: usize) -> (u8, u8) {
        let n = classes.max(1) as f64;
        let r = ((label as f64 + 0.5) * 256.0 / n).floor().clamp(0.0, 255.0) as u8;
        let g = if classes <= 1 {
            255.0
        } else {
            ((confidence - 1.0 / n) / (1.0 - 1.0 / n) * 255.0)
                .round()
                .clamp(0.0, 255.0)
        };
        (r, g as u8)
    }

    /// The formats the service accepts, with a file extension each.
    pub const FORMATS: [(ImageFormat, &str); 5] = [
        (ImageFormat::Png, "png"),
        (ImageFormat::Jpeg, "jpg"),
        (ImageFormat::Gif, "gif"),
        (ImageFormat::WebP, "webp"),
        (ImageFormat::Bmp, "bmp"),
    ];

    /// A solid-colour `size`×`size` image that the model classifies as
    /// `label` with about `confidence` (clamped to at least 1/classes).
    /// `format` is PNG, JPEG (lossy: confidence within ~0.01), GIF, WebP or BMP.
    pub fn test_image(
        label: usize,
        confidence: f64,
        classes: usize,
        size: u32,
        format: ImageFormat,
    ) -> Vec<u8> {
        let (r, g) = colour(label, confidence, classes);
        let mut img = RgbImage::from_pixel(size.max(1), size.max(1), Rgb([r, g, 64]));
        // A little texture so that files are not all the same size; the means stay put.
        let w = img.width();
        if w >= 2 {
            for y in 0..img.height() {
                let a = img.get_pixel(0, y)[2].wrapping_add((y % 7) as u8);
                img.get_pixel_mut(0, y)[2] = a;
            }
        }
        let mut out = Cursor::new(Vec::new());
        if img.write_to(&mut out, format).is_err() {
            // Formats compiled in always encode RGB; fall back to PNG regardless.
            let mut png = Cursor::new(Vec::new());
            let _ = img.write_to(&mut png, ImageFormat::Png);
            return png.into_inner();
        }
        out.into_inner()
    }

    /// A valid PNG that crashes the model (its mean blue is 255): the
    /// endpoint answers 424 `ModelError` with `OriginalStatusCode` 500, and
    /// in a batch request the whole batch fails so.
    pub fn crash_image(size: u32) -> Vec<u8> {
        let img = RgbImage::from_pixel(size.max(1), size.max(1), Rgb([10, 200, 255]));
        let mut out = Cursor::new(Vec::new());
        let _ = img.write_to(&mut out, ImageFormat::Png);
        out.into_inner()
    }

    /// A `width`×`height` image with per-pixel noise, like a photo or a
    /// CIFAR image: about as large as real ones of that size, and still
    /// classified as `label` with about `confidence` (the noise has zero
    /// mean in the red and green channels, away from their limits).
    pub fn noisy_image(
        label: usize,
        confidence: f64,
        classes: usize,
        (width, height): (u32, u32),
        format: ImageFormat,
        seed: u64,
    ) -> Vec<u8> {
        let (r, g) = colour(label, confidence, classes);
        let mut rng = fastrand::Rng::with_seed(seed);
        let jitter = |c: u8, rng: &mut fastrand::Rng| {
            let room = i32::from(c.min(255 - c)).min(24);
            (i32::from(c) + rng.i32(-room..=room)) as u8
        };
        let img = RgbImage::from_fn(width.max(1), height.max(1), |_, _| {
            Rgb([jitter(r, &mut rng), jitter(g, &mut rng), rng.u8(..)])
        });
        let mut out = Cursor::new(Vec::new());
        let written = if format == ImageFormat::Jpeg {
            // Cameras save at high quality.
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .encode_image(&img)
                .is_ok()
        } else {
            img.write_to(&mut out, format).is_ok()
        };
        if !written {
            let mut png = Cursor::new(Vec::new());
            let _ = img.write_to(&mut png, ImageFormat::Png);
            return png.into_inner();
        }
        out.into_inner()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn noisy_images_score_about_what_they_were_made_for() {
            for (format, size, tolerance) in [
                (ImageFormat::Png, (32, 32), 0.01),
                (ImageFormat::Jpeg, (32, 32), 0.03),
                (ImageFormat::Jpeg, (480, 360), 0.03),
            ] {
                for (label, conf) in [(0, 0.97), (1, 0.7), (1, 0.99)] {
                    let img = noisy_image(label, conf, 2, size, format, 7);
                    let p = classify(&img, 2).unwrap();
                    let want = expected_confidence(conf, 2);
                    assert!(
                        (p[label] - want).abs() < tolerance,
                        "{format:?} {size:?}: {} for {want}",
                        p[label]
                    );
                }
            }
        }

        #[test]
        fn test_images_score_what_they_were_made_for() {
            for classes in [1usize, 2, 3, 10] {
                for label in 0..classes {
                    for conf in [0.3, 0.61, 0.93, 0.97, 1.0] {
                        let png = test_image(label, conf, classes, 32, ImageFormat::Png);
                        let p = classify(&png, classes).unwrap();
                        assert_eq!(p.len(), classes);
                        let (best, top) = p.iter().enumerate().fold((0, f64::MIN), |a, (i, &v)| {
                            if v > a.1 {
                                (i, v)
                            } else {
                                a
                            }
                        });
                        let want = expected_confidence(conf, classes);
                        assert!(
                            (top - want).abs() < 1e-9,
                            "{classes} {label} {conf}: {top} vs {want}"
                        );
                        if classes > 1 && conf > 1.0 / classes as f64 + 0.01 {
                            assert_eq!(best, label);
                            assert!((top - conf).abs() < 0.005, "{top} vs {conf}");
                        }
                        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
                    }
                }
            }
        }

        #[test]
        fn jpeg_is_close_enough() {
            let jpg = test_image(1, 0.8, 2, 32, ImageFormat::Jpeg);
            let p = classify(&jpg, 2).unwrap();
            assert!(p[1] > 0.75 && p[1] < 0.85, "{p:?}");
        }

        #[test]
        fn garbage_is_a_model_error_and_the_crash_image_crashes() {
            assert!(matches!(
                classify(&crash_image(8), 2),
                Err(ModelFailure::Crashed(_))
            ));
            assert!(matches!(
                classify(b"not an image", 2),
                Err(ModelFailure::BadInput(_))
            ));
            let mut png = test_image(0, 0.9, 2, 32, ImageFormat::Png);
            png.truncate(png.len() / 2);
            assert!(classify(&png, 2).is_err());
        }
    }
}
