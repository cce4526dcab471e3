//! The wiring: source → fetch → batch → infer → route → sinks, with bounded
//! channels between stages and one semaphore bounding what is in flight.
//!
//! Every stage is a task that ends when its input closes, so stopping the
//! source drains the rest in order. Calls to S3 and the endpoint run as
//! tasks of their own, so that a stage waiting to hand results downstream
//! never starves calls that are still running (their deadlines run while
//! they are not polled). The source commits offsets through the
//! [`Committer`] on a timer, on revocation and at the end; it keeps polling
//! Kafka whatever it waits for (pausing the partitions when the wait lasts),
//! so that the group never evicts it. Shutdown has one budget,
//! `pipeline.shutdown_timeout`: drain, then commit what is complete, flush,
//! and leave the group.

pub mod ack;
pub mod adaptive;
pub mod alerts;
pub mod batch;
pub mod breaker;
pub mod capture;
pub mod control;
pub mod decode;
pub mod digest;
pub mod fetch;
pub mod infer;
pub mod monitor;
pub mod recent;
pub mod route;
pub mod sink;
pub mod source;
pub mod truth;
pub mod truth_s3;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertMode, Config, RequestMode};
use crate::metrics::{KnownLabels, Metrics};
use crate::pipeline::ack::{Ack, Tracker};
use crate::pipeline::alerts::{Alerts, Links, Publisher};
use crate::pipeline::capture::Capturer;
use crate::pipeline::control::Live;
use crate::pipeline::decode::{decode_limited, ImageRef, Outcome};
use crate::pipeline::fetch::{FetchError, Fetched, Fetcher};
use crate::pipeline::infer::{InferError, Inference, Inferrer, Input};
use crate::pipeline::monitor::{Baseline, Drift, Observation};
use crate::pipeline::sink::{Alerter, KafkaSink};
use crate::pipeline::source::{Committer, InputConsumer, SourceContext};
use crate::pipeline::truth::GroundTruth;
use crate::record::{
    now_rfc3339, DeadLetter, DeadLetterReason, Decision, Latency, Payload, Prediction, SourceRef,
    PREDICTION_SCHEMA,
};

/// What watches the predictions beside the outputs: data capture, drift,
/// ground truth.
struct Watchers {
    capturer: Option<Capturer>,
    drift: Option<Arc<Drift>>,
    truth: Option<Arc<GroundTruth>>,
    /// The latest predictions, for the console.
    recent: Option<Arc<crate::pipeline::recent::Recent>>,
}

/// One image on its way.
struct Job {
    image: ImageRef,
    ack: Ack,
    source: SourceRef,
    payload: Payload,
    consumed: Instant,
}

struct FetchedJob {
    job: Job,
    fetched: Fetched,
    /// Its share of `pipeline.max_in_flight_bytes`, given back when the
    /// image is dropped (once answered, or dead-lettered).
    _bytes: OwnedSemaphorePermit,
}

enum Output {
    Prediction(Box<Prediction>),
    DeadLetter(Box<DeadLetter>),
}

/// A running service.
pub struct Service {
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_addr: SocketAddr,
    /// Where the console is served, when it is on.
    pub console_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    /// Waits until the service stopped: Ok after a clean shutdown, Err when
    /// an output could not be made durable or a stage failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("service task panicked")?
    }
}

/// Starts the service; it runs until `shutdown` is cancelled. AWS
/// credentials and region come from the standard chain.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Service> {
    let sdk = crate::clients::aws::sdk_config(&config).await;
    start_with_sdk(config, sdk, shutdown).await
}

/// The parts [`run`] wires together.
struct Parts {
    consumer: Arc<InputConsumer>,
    committer: Arc<Committer>,
    producer: FutureProducer,
    fetcher: Fetcher,
    inferrer: Inferrer,
    sink: KafkaSink,
    alerter: Option<Alerter>,
    alerts: Option<Alerts>,
    capture: Option<(Capturer, tokio::task::JoinHandle<()>)>,
    drift: Option<Arc<Drift>>,
    truth: Option<Arc<GroundTruth>>,
    /// For ground truth from S3.
    s3: aws_sdk_s3::Client,
    /// The thresholds in force, the control topic's reader and the console.
    live: Arc<Live>,
    control_task: Option<tokio::task::JoinHandle<()>>,
    console: Option<tokio::task::JoinHandle<()>>,
    recent: Option<Arc<crate::pipeline::recent::Recent>>,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    http: tokio::task::JoinHandle<()>,
    http_stop: CancellationToken,
    /// Tells the tracker when a stop is asked for.
    stop_watch: tokio::task::JoinHandle<()>,
}

/// As [`start`], with the AWS SDK settings given (the demo uses static
/// credentials for its embedded services).
pub async fn start_with_sdk(
    config: Config,
    sdk: aws_config::SdkConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Service> {
    start_with(config, sdk, shutdown, None).await
}

/// As [`start_with_sdk`]; alert digests go to `digests` instead of SNS
/// when it is given (the demo prints them).
pub async fn start_with(
    config: Config,
    sdk: aws_config::SdkConfig,
    shutdown: CancellationToken,
    digests: Option<mpsc::UnboundedSender<digest::Message>>,
) -> anyhow::Result<Service> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    metrics.init_labels(&KnownLabels {
        labels: &config.endpoint.labels,
        decisions: &Decision::ALL.map(Decision::as_str),
        inference_errors: &infer::ERROR_KINDS,
        skip_reasons: &decode::SkipReason::ALL.map(|r| r.as_str()),
        dead_letter_reasons: &DeadLetterReason::ALL.map(|r| r.as_str()),
    });
    let tracker = Tracker::new(metrics.clone());
    let fetcher = Fetcher::new(
        crate::clients::aws::s3_client(&sdk, &config),
        config.aws.s3.lean_get_object.then(|| {
            crate::clients::s3get::LeanS3::new(
                &sdk,
                &config.aws.s3.endpoint_url,
                config.aws.s3.force_path_style,
            )
        }),
        config.fetch.clone(),
        metrics.clone(),
    );
    let inferrer = Inferrer::new(
        crate::clients::aws::sagemaker_client(&sdk, &config),
        config.endpoint.clone(),
        metrics.clone(),
    );
    let capture = if config.capture.enabled {
        tracing::info!(destination = %config.capture.destination,
            sampling_percentage = config.capture.sampling_percentage, "data capture on");
        let client = crate::clients::aws::s3_client(&sdk, &config);
        Capturer::spawn(
            client,
            &config.capture,
            &config.endpoint.labels,
            metrics.clone(),
        )
    } else {
        None
    };
    let sns = (config.alerts.enabled && digests.is_none()).then(|| {
        Alerter::new(
            crate::clients::aws::sns_client(&sdk, &config),
            &config,
            metrics.clone(),
        )
    });
    let drift = if config.monitor.baseline.is_empty() {
        None
    } else {
        let baseline = Baseline::load(std::path::Path::new(&config.monitor.baseline))
            .map_err(|e| anyhow::anyhow!("monitor.baseline: {e}"))?;
        tracing::info!(baseline = %config.monitor.baseline, predictions = baseline.tally.predictions,
            window = ?config.monitor.window, "drift monitoring on");
        Some(Drift::new(
            baseline,
            config.monitor.min_predictions,
            metrics.clone(),
        ))
    };
    let recent = config.console.enabled.then(|| {
        Arc::new(crate::pipeline::recent::Recent::new(
            CONSOLE_RECENT,
            crate::record::now_ms(),
        ))
    });
    let truth = (!config.monitor.ground_truth_topic.is_empty()
        || !config.monitor.ground_truth_s3.is_empty())
    .then(|| {
        GroundTruth::new(
            config.monitor.ground_truth_window,
            &config.endpoint.labels,
            metrics.clone(),
            recent.clone(),
        )
    });
    let (alerter, publisher) = match (config.alerts.mode, digests) {
        (AlertMode::Each, _) => (sns, None),
        (AlertMode::Digest, Some(tx)) => (None, Some(Publisher::Channel(tx))),
        (AlertMode::Digest, None) => (None, sns.map(Publisher::Sns)),
    };

    let producer: FutureProducer = crate::clients::kafka::producer_config(&config.kafka)
        .create()
        .context("creating the Kafka producer (check kafka.brokers and kafka.properties)")?;
    let sink = KafkaSink::new(producer.clone(), &config, metrics.clone());
    let alerts = match publisher {
        Some(publisher) if config.alerts.enabled => {
            let links = Links {
                kind: config.alerts.link,
                region: sdk.region().map(ToString::to_string).unwrap_or_default(),
                s3: crate::clients::aws::s3_client(&sdk, &config),
                expiry: config.alerts.presign_expiry,
            };
            Some(Alerts::new(config.clone(), publisher, links, metrics.clone()).await?)
        }
        _ => None,
    };

    let context = SourceContext::new(
        tracker.clone(),
        metrics.clone(),
        config.kafka.input_topic.clone(),
        config.kafka.revoke_drain_timeout,
        config.kafka.commit_timeout,
    );
    let committer = context.committer.clone();
    let consumer: Arc<InputConsumer> = Arc::new(
        crate::clients::kafka::consumer_config(&config.kafka)
            .create_with_context(context)
            .context("creating the Kafka consumer (check kafka.brokers and kafka.properties)")?,
    );
    committer
        .start(&consumer)
        .context("starting the offset commit thread")?;
    // Live thresholds: the control topic read to its end before consuming,
    // so that the first images are routed by its latest thresholds.
    let live = Live::new(&config);
    let control_task = if config.console.control_topic.is_empty() {
        None
    } else {
        let topic = config.console.control_topic.clone();
        let reader = tokio::task::spawn_blocking({
            let (kafka, topic) = (config.kafka.clone(), topic.clone());
            move || crate::pipeline::control::connect(&kafka, &topic, &Default::default())
        })
        .await
        .context("connecting to console.control_topic")?
        .map_err(|e| anyhow::anyhow!("console.control_topic: {e}"))?;
        let caught_up = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(live.clone().run(
            config.kafka.clone(),
            topic.clone(),
            reader,
            caught_up.clone(),
        ));
        tokio::select! {
            _ = caught_up.notified() => {}
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(CONTROL_CATCH_UP) => {
                tracing::warn!(%topic, "control topic: not read to its end within 30 s; routing by the configuration's thresholds until it is");
            }
        }
        let t = live.get();
        tracing::info!(threshold = t.threshold, label_thresholds = ?t.label_thresholds, by = %t.by, "thresholds in force");
        Some(task)
    };
    let mut console_addr = None;
    let console = if let Some(recent) = recent.clone() {
        let listener = tokio::net::TcpListener::bind(&config.console.listen)
            .await
            .with_context(|| {
                format!("cannot listen on console.listen {}", config.console.listen)
            })?;
        if config.console.token.0.is_empty() {
            tracing::warn!("console.token is empty: the console refuses every change");
        }
        console_addr = Some(listener.local_addr()?);
        tracing::info!(console = ?console_addr, "console on");
        let producer = crate::pipeline::control::control_producer(&config.kafka)
            .map_err(|e| anyhow::anyhow!(e))?;
        Some(tokio::spawn({
            let (live, config, stop) = (live.clone(), config.clone(), shutdown.clone());
            let parts = crate::console::Parts {
                live,
                producer,
                recent,
                metrics: metrics.clone(),
                s3: crate::clients::aws::s3_client(&sdk, &config),
            };
            async move { crate::console::serve(listener, parts, &config, stop).await }
        }))
    } else {
        None
    };
    consumer
        .subscribe(&[&config.kafka.input_topic])
        .with_context(|| {
            format!(
                "subscribing to kafka.input_topic `{}`",
                config.kafka.input_topic
            )
        })?;

    let listener = tokio::net::TcpListener::bind(config.metrics_addr())
        .await
        .with_context(|| format!("cannot listen on metrics.listen {}", config.metrics.listen))?;
    let metrics_addr = listener.local_addr()?;
    let healthy = inferrer.healthy();
    let ready_metrics = metrics.clone();
    let ready = Arc::new(move || {
        ready_metrics.assigned_partitions.get() > 0 && healthy.load(Ordering::Relaxed)
    });
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve(
        listener,
        metrics.clone(),
        ready,
        http_stop.clone(),
    ));
    tracing::info!(%metrics_addr, input = %config.kafka.input_topic, group = %config.kafka.group_id,
        endpoint = %config.endpoint.name, mode = ?config.endpoint.mode, "inferstream started");

    let stop_watch = tokio::spawn({
        let (shutdown, tracker) = (shutdown.clone(), tracker.clone());
        async move {
            shutdown.cancelled().await;
            tracker.request_stop();
        }
    });
    let parts = Parts {
        stop_watch,
        consumer,
        committer,
        producer,
        fetcher,
        inferrer,
        sink,
        alerter,
        alerts,
        capture,
        drift,
        truth,
        s3: crate::clients::aws::s3_client(&sdk, &config),
        live,
        control_task,
        console,
        recent,
        tracker,
        metrics: metrics.clone(),
        http,
        http_stop,
    };
    let task = tokio::spawn(run(config, parts, shutdown));
    Ok(Service {
        metrics_addr,
        console_addr,
        metrics,
        task,
    })
}

/// Predictions the console keeps for its live view and threshold curves.
const CONSOLE_RECENT: usize = 100_000;

/// How long the start waits for the control topic to be read to its end.
const CONTROL_CATCH_UP: Duration = Duration::from_secs(30);

/// Time left until `deadline`.
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

async fn run(config: Arc<Config>, parts: Parts, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Parts {
        stop_watch,
        consumer,
        committer,
        producer,
        fetcher,
        inferrer,
        sink,
        alerter,
        alerts,
        capture,
        drift,
        truth,
        s3,
        live,
        control_task,
        console,
        recent,
        tracker,
        metrics,
        http,
        http_stop,
    } = parts;
    // True labels joined to this instance's predictions, until the end.
    let truth_task = truth
        .clone()
        .filter(|_| !config.monitor.ground_truth_topic.is_empty())
        .map(|t| {
            tokio::spawn(t.run(
                config.kafka.clone(),
                config.kafka.group_id.clone(),
                config.monitor.ground_truth_topic.clone(),
            ))
        });
    let truth_s3_task = truth
        .clone()
        .filter(|_| !config.monitor.ground_truth_s3.is_empty())
        .map(|t| {
            tokio::spawn(truth_s3::run(
                t,
                s3.clone(),
                config.monitor.ground_truth_s3.clone(),
                config.monitor.ground_truth_poll,
                config.fetch.timeout,
            ))
        });
    // Drift gauges, a slice of monitor.window at a time, until the end.
    let drift_task = drift
        .clone()
        .map(|d| tokio::spawn(d.run(config.monitor.window)));
    // Digests from the review topic, beside the pipeline; a failure of
    // theirs (or a panic) stops the service: alerts must not end silently.
    let alerts_clients = alerts.as_ref().map(Alerts::clients);
    let alerts_task = alerts.map(|a| {
        let (shutdown, tracker) = (shutdown.clone(), tracker.clone());
        tokio::spawn(async move {
            use futures::FutureExt as _;
            let run = std::panic::AssertUnwindSafe(a.run(shutdown));
            let failure = match run.catch_unwind().await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => "panicked".to_string(),
            };
            tracing::error!(error = %failure, "alert digests stopped");
            tracker.fail_pipeline(format!("alert digests: {failure}"));
        })
    });
    let (capturer, capture_task) = capture.unzip();
    let capture_pending = capturer.as_ref().map(Capturer::pending);
    let cap = config.pipeline.max_in_flight;
    let (job_tx, job_rx) = mpsc::channel::<Job>(cap);
    // Fetched images are the large part of what is in flight; only enough
    // wait to fill the next batches, the rest of the in-flight allowance
    // waits as (small) events, before fetching.
    let (batch_in_tx, batch_in_rx) =
        mpsc::channel::<(FetchedJob, u64)>(config.batch.max_images.max(1) * 2);
    let (batch_tx, batch_rx) = mpsc::channel::<Vec<FetchedJob>>(1);
    let (out_tx, out_rx) = mpsc::channel::<(Output, Ack)>(cap);

    let fetch = tokio::spawn(fetch_stage(
        job_rx,
        fetcher,
        config.fetch.concurrency,
        config.pipeline.max_in_flight_bytes,
        batch_in_tx,
        out_tx.clone(),
    ));
    // In per-image mode each image is its own call: it goes on at once,
    // without waiting for batch-mates it does not need.
    let mut batching = config.batch.clone();
    if config.endpoint.mode == RequestMode::PerImage {
        batching.max_images = 1;
    }
    let batch = tokio::spawn(crate::pipeline::batch::run(batching, batch_in_rx, batch_tx));
    let infer = tokio::spawn(infer_stage(
        batch_rx,
        inferrer,
        config.clone(),
        live,
        metrics.clone(),
        Watchers {
            capturer,
            drift: drift.clone(),
            truth: truth.clone(),
            recent,
        },
        out_tx.clone(),
    ));
    let sinks = tokio::spawn(sink_stage(
        out_rx,
        sink,
        alerter,
        cap,
        config.pipeline.dead_letter_payload_bytes,
    ));

    let mut source = Source {
        consumer: &consumer,
        committer: &committer,
        config: &config,
        tracker: &tracker,
        metrics: &metrics,
        permits: Arc::new(Semaphore::new(cap)),
        job_tx,
        out_tx,
        backlog: VecDeque::new(),
        commit: None,
        commit_failing_since: None,
        paused: false,
    };
    source.run(&shutdown).await;
    let commit_in_flight = source.commit.take();
    drop(source);
    // A stop for a fatal failure is a shutdown too (main's watchdog
    // starts on it).
    tracker.request_stop();
    shutdown.cancel();

    // Shutdown, within one budget that runs from the signal (the source may
    // have been inside a rebalance callback when it came): drain; then
    // commit what is complete and flush (a quarter of the budget, at most
    // 5 s); then leave the group and stop the metrics server (the last
    // EXIT_MARGIN).
    let budget = config.pipeline.shutdown_timeout;
    let began = tracker.stop_requested_at().unwrap_or_else(Instant::now);
    let margin = EXIT_MARGIN.min(budget / 4);
    let end = began + budget;
    let deadline = end - margin;
    let drain_until = deadline - (budget / 4).min(Duration::from_secs(5));
    let drained = {
        let t = tracker.clone();
        let wait = left(drain_until);
        tokio::task::spawn_blocking(move || t.wait_drained(&[], wait, false))
            .await
            .unwrap_or(false)
    };
    // The digest alerter has been stopping since the signal: it finishes
    // a Publish under way (within alerts.timeout).
    if let Some(mut task) = alerts_task {
        if tokio::time::timeout(left(drain_until).max(Duration::from_millis(100)), &mut task)
            .await
            .is_err()
        {
            // Dropped here; its Kafka clients are closed below, off the
            // runtime's threads.
            task.abort();
            let _ = task.await;
            tracing::warn!("alert digests did not stop within the drain; what they read is read again by the next reader");
        }
    }
    // From here on, work still in flight is abandoned: its offsets stay
    // uncommitted (and are re-delivered), nothing else is committed.
    tracker.close();
    let left_in_flight = tracker.pending(&[]);
    if let Some(c) = commit_in_flight {
        // The last periodic commit first, so that the final one is last.
        if let Ok(Ok(result)) = tokio::time::timeout(left(deadline), c.rx).await {
            committer.settle(&tracker, &c.positions, result);
        }
    }
    let positions = tracker.positions(&[]);
    if !positions.is_empty() {
        let wait = left(deadline).min(config.kafka.commit_timeout);
        match committer.commit(positions.clone()) {
            Some(rx) => match tokio::time::timeout(wait, rx).await {
                Ok(Ok(result)) => committer.settle(&tracker, &positions, result),
                _ => {
                    metrics.commit_failures.inc();
                    tracing::warn!(
                        ?wait,
                        "the final offset commit was not answered; uncommitted images will be re-delivered on restart"
                    );
                }
            },
            None => tracing::warn!("offset committer stopped before the final commit"),
        }
    }
    let stages = [fetch, batch, infer, sinks];
    if drained {
        tracing::info!("drained; offsets committed");
        // Their inputs are closed and empty: they end at once.
        for mut t in stages {
            if tokio::time::timeout(left(deadline), &mut t).await.is_err() {
                t.abort();
            }
        }
    } else {
        tracing::warn!(
            in_flight = left_in_flight,
            "shutdown deadline passed; uncommitted images will be re-delivered on restart"
        );
        for t in &stages {
            t.abort();
        }
        for t in stages {
            let _ = t.await;
        }
    }
    // The capture writer flushes its last buffer once the stages are gone.
    if let Some(mut task) = capture_task {
        if tokio::time::timeout(left(deadline), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
            let lost = capture_pending
                .as_ref()
                .map_or(0, |p| p.swap(0, std::sync::atomic::Ordering::Relaxed));
            metrics.capture_failed.inc_by(lost);
            tracing::warn!(
                lines = lost,
                "data capture did not finish its last writes within pipeline.shutdown_timeout; those lines are lost (counted in inferstream_capture_failed_total)"
            );
        }
    }
    // Outputs still queued in librdkafka (of abandoned work) go out if
    // they can; their offsets are not committed either way.
    // Dropping the last producer handle destroys the client, which may
    // take a while (its threads resolve broker names): within the budget,
    // or left behind.
    let flush_for = left(deadline);
    let flush = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        let _ = producer.flush(flush_for);
    });
    let _ = tokio::time::timeout(left(deadline).max(Duration::from_millis(100)), flush).await;
    // The alerter's clients: its producer flushed, its consumer closed
    // (leaving its group), off the runtime's threads, within the budget.
    if let Some((consumer, producer)) = alerts_clients {
        let flush_for = left(deadline);
        let close = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            let _ = producer.flush(flush_for);
            drop(producer);
            drop(consumer);
        });
        let _ = tokio::time::timeout(left(deadline).max(Duration::from_millis(100)), close).await;
    }
    // Leave the group: the commit thread holds the consumer, so it ends
    // first; closing runs the last revocation (which commits, without
    // waiting) and the LeaveGroup.
    if let Some(worker) = committer.stop() {
        let _ = tokio::time::timeout(
            left(deadline),
            tokio::task::spawn_blocking(move || worker.join()),
        )
        .await;
    }
    drop(committer);
    let close_until = end - margin / 2;
    crate::clients::kafka::leave_subscription(&*consumer, left(close_until) / 2).await;
    let close = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(left(close_until).max(Duration::from_millis(100)), close)
        .await
        .is_err()
    {
        tracing::warn!("closing the Kafka consumer outlasted pipeline.shutdown_timeout");
    }
    // The metrics server waits for open connections; one that never sends
    // its request must not hold the exit.
    http_stop.cancel();
    let mut http = http;
    if tokio::time::timeout(left(end).max(Duration::from_millis(100)), &mut http)
        .await
        .is_err()
    {
        http.abort();
    }
    stop_watch.abort();
    for t in [drift_task, truth_task, truth_s3_task, control_task, console]
        .into_iter()
        .flatten()
    {
        t.abort();
    }
    match tracker.fatal_reason() {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

/// The part of `pipeline.shutdown_timeout` kept for leaving the group and
/// stopping the metrics server (a quarter of the budget when smaller).
const EXIT_MARGIN: Duration = Duration::from_millis(1500);

/// How long the pipeline may stay at its in-flight limit before the input
/// partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_millis(500);
/// An offset commit unanswered this many times `kafka.commit_timeout` stops
/// the service (a restart reconnects); until then consumption goes on.
const COMMIT_STUCK_FACTOR: u32 = 6;

/// A consumed message whose outputs are not all handed on yet.
struct Pending {
    partition: i32,
    offset: i64,
    epoch: u64,
    source: SourceRef,
    payload: Payload,
    /// Images and rejections still to hand on (skips are counted at once).
    outcomes: VecDeque<Outcome>,
    images: usize,
    /// In-flight permits the message needs: one per output.
    outputs: usize,
    permit: Option<OwnedSemaphorePermit>,
    ack: Option<Ack>,
    consumed: Instant,
}

/// What the source waits for before it can hand on the next output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocked {
    Permits(u32),
    Jobs,
    Outputs,
}

/// What woke the source loop.
enum Event {
    Stop,
    Committed(Option<KafkaResult<()>>),
    Tick,
    Permit(Option<OwnedSemaphorePermit>),
    Room,
    Pause,
    Message(KafkaResult<(i32, i64, Option<Bytes>)>),
}

struct CommitInFlight {
    positions: Vec<(i32, i64)>,
    rx: tokio::sync::oneshot::Receiver<KafkaResult<()>>,
    since: Instant,
    warned: bool,
}

/// The source loop: consume, decode, hand images and rejections on, commit.
struct Source<'a> {
    consumer: &'a Arc<InputConsumer>,
    committer: &'a Committer,
    config: &'a Config,
    tracker: &'a Arc<Tracker>,
    metrics: &'a Metrics,
    permits: Arc<Semaphore>,
    job_tx: mpsc::Sender<Job>,
    out_tx: mpsc::Sender<(Output, Ack)>,
    backlog: VecDeque<Pending>,
    commit: Option<CommitInFlight>,
    /// Since when every commit answered has failed.
    commit_failing_since: Option<Instant>,
    paused: bool,
}

async fn answer(c: &mut Option<CommitInFlight>) -> Option<KafkaResult<()>> {
    match c {
        Some(c) => (&mut c.rx).await.ok(),
        None => std::future::pending().await,
    }
}

impl Source<'_> {
    /// Runs until `shutdown` or a fatal failure. Whatever it waits for
    /// (in-flight permits, room downstream) it keeps polling the consumer,
    /// so that the group never evicts it (`max.poll.interval.ms`) and
    /// rebalances are served; after [`PAUSE_AFTER`] of waiting the
    /// partitions are paused, so that polling returns nothing meanwhile.
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.config.kafka.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut blocked_since: Option<tokio::time::Instant> = None;
        loop {
            self.forget_revoked();
            let blocked = self.dispatch();
            match blocked {
                None => {
                    blocked_since = None;
                    if self.paused {
                        self.set_paused(false);
                        tracing::debug!("in-flight limit freed; partitions resumed");
                    }
                }
                Some(_) => {
                    blocked_since.get_or_insert_with(tokio::time::Instant::now);
                }
            }
            let want_permits = match blocked {
                Some(Blocked::Permits(n)) => n,
                _ => 0,
            };
            let pause_at = blocked_since.map(|t| t + PAUSE_AFTER);
            // A short wait is the normal state of a saturated pipeline
            // (permits come back every few milliseconds): librdkafka keeps
            // prefetching meanwhile, and pausing (which drops the prefetched
            // messages) on every saturation would cap throughput at a fetch
            // round trip per `max_in_flight` images. A long one pauses, and
            // the consumer is polled all along.
            let poll = blocked.is_none() || self.paused;
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Event::Stop,
                _ = self.tracker.fatal().cancelled() => Event::Stop,
                result = answer(&mut self.commit), if self.commit.is_some() => Event::Committed(result),
                _ = tick.tick() => Event::Tick,
                permit = self.permits.clone().acquire_many_owned(want_permits.max(1)), if want_permits > 0 => {
                    Event::Permit(permit.ok())
                }
                _ = self.job_tx.reserve(), if blocked == Some(Blocked::Jobs) => Event::Room,
                _ = self.out_tx.reserve(), if blocked == Some(Blocked::Outputs) => Event::Room,
                _ = sleep_until(pause_at), if pause_at.is_some() && !self.paused => Event::Pause,
                msg = self.consumer.recv(), if poll => Event::Message(msg.map(|m| {
                    (m.partition(), m.offset(), m.payload().map(Bytes::copy_from_slice))
                })),
            };
            match event {
                Event::Stop => break,
                Event::Committed(result) => {
                    if let Some(c) = self.commit.take() {
                        match result {
                            Some(r) => {
                                let ok = r.is_ok();
                                self.committer.settle(self.tracker, &c.positions, r);
                                if ok {
                                    self.commit_failing_since = None;
                                } else {
                                    self.commit_failed();
                                }
                            }
                            None => {
                                for (p, _) in &c.positions {
                                    self.tracker.resend(*p);
                                }
                            }
                        }
                    }
                }
                Event::Tick => self.commit_tick(),
                Event::Permit(permit) => {
                    if let (Some(permit), Some(front)) = (permit, self.backlog.front_mut()) {
                        front.permit = Some(permit);
                    }
                }
                Event::Room => {}
                Event::Pause => {
                    self.set_paused(true);
                    tracing::debug!("waiting for room in flight for {PAUSE_AFTER:?}; partitions paused, still polling");
                }
                Event::Message(Ok((partition, offset, payload))) => {
                    self.consumed(partition, offset, payload)
                }
                Event::Message(Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_))) => {
                    // The client will not consume again (e.g. a static
                    // member fenced by another with the same instance id).
                    tracing::error!(error = %e, "fatal Kafka consumer error; stopping");
                    self.tracker.fail_pipeline(format!(
                        "fatal Kafka consumer error: {e} (check kafka.instance_id is unique)"
                    ));
                }
                Event::Message(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            }
        }
        // Stop fetching; what was consumed and not handed on is abandoned
        // (its offsets stay uncommitted).
        for mut p in self.backlog.drain(..) {
            if let Some(ack) = p.ack.take() {
                ack.abandon();
            }
        }
        self.set_paused(true);
    }

    /// A commit was answered with an error. Commits that keep failing
    /// (an authorisation error, an offsets topic below its minimum
    /// replicas) would let completed work pile up uncommitted without
    /// bound, and with it the duplicates a crash causes: past
    /// [`COMMIT_STUCK_FACTOR`] × `kafka.commit_timeout` the service stops.
    fn commit_failed(&mut self) {
        let since = *self.commit_failing_since.get_or_insert_with(Instant::now);
        let limit = self.config.kafka.commit_timeout * COMMIT_STUCK_FACTOR;
        if since.elapsed() > limit {
            self.tracker.fail_pipeline(format!(
                "offset commits have failed for {}; stopping so that completed work is not left uncommitted without bound",
                humantime::format_duration(Duration::from_secs(since.elapsed().as_secs()))
            ));
        }
    }

    fn commit_tick(&mut self) {
        match &mut self.commit {
            None => {
                let positions = self.tracker.positions_to_commit();
                if positions.is_empty() {
                    // Nothing left to commit (what failed was for
                    // partitions that moved away, or went again since):
                    // the failures are over.
                    self.commit_failing_since = None;
                    return;
                }
                match self.committer.commit(positions.clone()) {
                    Some(rx) => {
                        self.commit = Some(CommitInFlight {
                            positions,
                            rx,
                            since: Instant::now(),
                            warned: false,
                        })
                    }
                    None => {
                        for (p, _) in positions {
                            self.tracker.resend(p);
                        }
                    }
                }
            }
            Some(c) => {
                let waited = c.since.elapsed();
                let limit = self.config.kafka.commit_timeout;
                if waited > limit && !c.warned {
                    c.warned = true;
                    self.metrics.commit_failures.inc();
                    tracing::warn!(?waited, "offset commit unanswered past kafka.commit_timeout (group coordinator unreachable?); consumption goes on, commits wait");
                }
                if waited > limit * COMMIT_STUCK_FACTOR {
                    self.tracker.fail_pipeline(format!(
                        "an offset commit has not been answered in {}; stopping so that a restart reconnects (nothing uncommitted is lost)",
                        humantime::format_duration(Duration::from_secs(waited.as_secs()))
                    ));
                }
            }
        }
    }

    /// A message arrived: decode it and queue it for [`Source::dispatch`].
    fn consumed(&mut self, partition: i32, offset: i64, payload: Option<Bytes>) {
        self.metrics.events_consumed.inc();
        let Some(epoch) = self.tracker.epoch(partition) else {
            tracing::debug!(
                partition,
                offset,
                "message of a partition not assigned here; left to its owner"
            );
            return;
        };
        let pipeline = &self.config.pipeline;
        let outcomes = decode_limited(
            payload.as_deref(),
            &self.config.filter,
            pipeline.max_records_per_message,
        );
        let mut kept = VecDeque::with_capacity(outcomes.len());
        let mut images = 0;
        for o in outcomes {
            match o {
                Outcome::Skip(reason) => {
                    self.metrics
                        .records_skipped
                        .with_label_values(&[reason.as_str()])
                        .inc();
                }
                Outcome::Image(_) => {
                    images += 1;
                    kept.push_back(o);
                }
                Outcome::Reject(_) => kept.push_back(o),
            }
        }
        self.backlog.push_back(Pending {
            partition,
            offset,
            epoch,
            source: SourceRef {
                topic: self.config.kafka.input_topic.clone(),
                partition,
                offset,
            },
            payload: Payload::new(
                payload.unwrap_or_default(),
                pipeline.dead_letter_payload_bytes,
            ),
            outputs: kept.len(),
            outcomes: kept,
            images,
            permit: None,
            ack: None,
            consumed: Instant::now(),
        });
    }

    /// Drops messages of partitions revoked (or re-assigned) since they
    /// arrived: their new owner consumes them again.
    fn forget_revoked(&mut self) {
        let tracker = self.tracker;
        self.backlog.retain_mut(|p| {
            if tracker.epoch(p.partition) == Some(p.epoch) {
                return true;
            }
            if let Some(ack) = p.ack.take() {
                ack.abandon();
            }
            false
        });
    }

    /// Hands on as many outputs as there is room for, without waiting.
    fn dispatch(&mut self) -> Option<Blocked> {
        let cap = self.config.pipeline.max_in_flight;
        while let Some(front) = self.backlog.front_mut() {
            if front.ack.is_none() {
                let permit = match (front.outputs, front.permit.take()) {
                    (0, _) => None,
                    (_, Some(p)) => Some(p),
                    (n, None) => {
                        let want = n.min(cap) as u32;
                        match self.permits.clone().try_acquire_many_owned(want) {
                            Ok(p) => Some(p),
                            Err(_) => return Some(Blocked::Permits(want)),
                        }
                    }
                };
                match self.tracker.begin(
                    front.partition,
                    front.offset,
                    front.epoch,
                    front.images,
                    permit,
                ) {
                    Some(ack) => front.ack = Some(ack),
                    None => {
                        tracing::debug!(
                            partition = front.partition,
                            offset = front.offset,
                            "message of a partition no longer assigned here; left to its new owner"
                        );
                        self.backlog.pop_front();
                        continue;
                    }
                }
            }
            let Some(ack) = front.ack.as_ref() else {
                self.backlog.pop_front();
                continue;
            };
            while let Some(outcome) = front.outcomes.pop_front() {
                match outcome {
                    Outcome::Image(image) => match self.job_tx.try_reserve() {
                        Ok(slot) => slot.send(Job {
                            image,
                            ack: ack.clone(),
                            source: front.source.clone(),
                            payload: front.payload.clone(),
                            consumed: front.consumed,
                        }),
                        Err(_) => {
                            front.outcomes.push_front(Outcome::Image(image));
                            return Some(Blocked::Jobs);
                        }
                    },
                    Outcome::Reject(r) => match self.out_tx.try_reserve() {
                        Ok(slot) => {
                            tracing::info!(partition = front.partition, offset = front.offset,
                                reason = r.reason.as_str(), detail = %crate::record::truncate_str(&r.detail, 300), "event rejected");
                            let dl = DeadLetter::new(
                                r.reason,
                                r.detail,
                                r.bucket,
                                r.key,
                                &front.payload,
                                front.source.clone(),
                            );
                            slot.send((Output::DeadLetter(Box::new(dl)), ack.clone()));
                        }
                        Err(_) => {
                            front.outcomes.push_front(Outcome::Reject(r));
                            return Some(Blocked::Outputs);
                        }
                    },
                    Outcome::Skip(_) => {}
                }
            }
            // Every output is on its way: the source's own handle is done.
            if let Some(mut p) = self.backlog.pop_front() {
                if let Some(ack) = p.ack.take() {
                    ack.done();
                }
            }
        }
        None
    }

    fn set_paused(&mut self, pause: bool) {
        self.paused = pause;
        self.consumer
            .context()
            .paused
            .store(pause, Ordering::SeqCst);
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if assignment.count() == 0 {
            return;
        }
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, pause, "pause/resume failed");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn dead_letter(
    image: &ImageRef,
    source: SourceRef,
    payload: &Payload,
    reason: DeadLetterReason,
    detail: String,
) -> Output {
    tracing::info!(bucket = %image.bucket, key = %image.key, reason = reason.as_str(), %detail, "dead letter");
    Output::DeadLetter(Box::new(
        DeadLetter::new(
            reason,
            detail,
            Some(image.bucket.clone()),
            Some(image.key.clone()),
            payload,
            source,
        )
        .with_version(image.version_id.as_deref()),
    ))
}

/// `pipeline.max_in_flight_bytes` as a semaphore of KiB.
struct ByteBudget {
    kib: Arc<Semaphore>,
    total_kib: u32,
    /// `fetch.max_object_bytes`.
    max_object: u64,
}

impl ByteBudget {
    fn new(bytes: u64, max_object: u64) -> ByteBudget {
        let total_kib = (bytes / 1024).clamp(1, u64::from(u32::MAX >> 3)) as u32;
        ByteBudget {
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            max_object,
        }
    }

    fn kib(&self, bytes: u64) -> u32 {
        bytes.div_ceil(1024).clamp(1, u64::from(self.total_kib)) as u32
    }

    /// KiB to hold for `image` while it is fetched: its size when the
    /// event gave it; as much as an object may be when not (the surplus
    /// comes back once it is fetched); next to nothing when it is over
    /// `fetch.max_object_bytes` (refused unread). Never more than the whole
    /// budget, so that one large image goes on alone.
    fn share(&self, image: &ImageRef) -> u32 {
        match image.size {
            Some(n) if n > self.max_object => 1,
            Some(n) => self.kib(n),
            None => self.kib(self.max_object),
        }
    }

    /// Fits what `image` holds to the `bytes` fetched: gives back a surplus;
    /// takes more if the event understated the size and there is room now
    /// (it never waits with a fetched image in hand).
    fn fit(&self, held: &mut OwnedSemaphorePermit, bytes: usize) {
        let want = self.kib(bytes as u64) as usize;
        let have = held.num_permits();
        if want < have {
            drop(held.split(have - want));
        } else if want > have {
            if let Ok(more) = self
                .kib
                .clone()
                .try_acquire_many_owned((want - have) as u32)
            {
                held.merge(more);
            }
        }
    }
}

async fn fetch_stage(
    mut rx: mpsc::Receiver<Job>,
    fetcher: Fetcher,
    concurrency: usize,
    max_in_flight_bytes: u64,
    batch_tx: mpsc::Sender<(FetchedJob, u64)>,
    out_tx: mpsc::Sender<(Output, Ack)>,
) {
    // Each GetObject is a task: its deadline (fetch.timeout) runs while it
    // runs, not while this stage waits for the batcher.
    type Done = (Job, Result<Fetched, FetchError>, OwnedSemaphorePermit);
    let mut running: JoinSet<Done> = JoinSet::new();
    let budget = ByteBudget::new(max_in_flight_bytes, fetcher.max_object_bytes());
    // The next job, waiting for its share of the byte budget.
    let mut next: Option<(Job, u32)> = None;
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            done = running.join_next(), if !running.is_empty() => match done {
                Some(Ok((job, Ok(fetched), mut bytes))) => {
                    let size = fetched.body.len() as u64;
                    budget.fit(&mut bytes, fetched.body.len());
                    let item = FetchedJob { job, fetched, _bytes: bytes };
                    if batch_tx.send((item, size)).await.is_err() {
                        return;
                    }
                }
                Some(Ok((job, Err(e), bytes))) => {
                    drop(bytes);
                    let Job { image, ack, source, payload, .. } = job;
                    let output = dead_letter(&image, source, &payload, e.reason, e.detail);
                    if out_tx.send((output, ack)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => tracing::error!(error = %e, "a fetch task failed"),
                None => {}
            },
            bytes = budget.kib.clone().acquire_many_owned(next.as_ref().map_or(0, |(_, n)| *n)),
                if next.is_some() && running.len() < concurrency.max(1) =>
            {
                // Never an error: the semaphore is never closed.
                if let (Ok(bytes), Some((job, _))) = (bytes, next.take()) {
                    let fetcher = fetcher.clone();
                    running.spawn(async move {
                        let result = fetcher.fetch(&job.image).await;
                        (job, result, bytes)
                    });
                }
            },
            job = rx.recv(), if open && next.is_none() => match job {
                Some(job) => {
                    let share = budget.share(&job.image);
                    next = Some((job, share));
                }
                None => open = false,
            },
            else => break,
        }
    }
}

type Inferred = (Vec<FetchedJob>, Vec<Result<Inference, InferError>>);

async fn infer_stage(
    mut rx: mpsc::Receiver<Vec<FetchedJob>>,
    inferrer: Inferrer,
    config: Arc<Config>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    watchers: Watchers,
    out_tx: mpsc::Sender<(Output, Ack)>,
) {
    let Watchers {
        capturer,
        drift,
        truth,
        recent,
    } = watchers;
    // One batch more than calls allowed (a limit adaptive concurrency may
    // change): it builds its request while waiting for a call slot, so the
    // endpoint never waits for that. Each is a task: calls keep running
    // (and their deadlines mean what they say) while this stage waits to
    // hand results on.
    let mut running: JoinSet<Inferred> = JoinSet::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            done = running.join_next(), if !running.is_empty() => match done {
                Some(Ok((batch, results))) => {
                    let thresholds = live.get();
                    let making = Making { config: &config, thresholds: &thresholds, metrics: &metrics };
                    for (item, result) in batch.into_iter().zip(results) {
                        let FetchedJob { job, fetched, .. } = item;
                        let Job { image, ack, source, payload, consumed } = job;
                        let output = match result {
                            Ok(inference) => {
                                let p = prediction(image, source, consumed, &fetched, inference, &making);
                                if let Some(t) = &truth {
                                    t.predicted(&p);
                                }
                                if let Some(r) = &recent {
                                    r.add(crate::pipeline::recent::Seen {
                                        at_ms: crate::record::now_ms(),
                                        label: p.label.clone(),
                                        confidence: p.confidence,
                                        review: p.decision == Decision::Review,
                                    });
                                    if p.decision == Decision::Review {
                                        r.add_review(crate::pipeline::recent::ReviewItem {
                                            id: p.id.clone(),
                                            bucket: p.bucket.clone(),
                                            key: p.key.clone(),
                                            version_id: p.version_id.clone(),
                                            etag: p.etag.clone(),
                                            label: p.label.clone(),
                                            confidence: p.confidence,
                                            scores: p.scores.clone(),
                                            processed_at: p.processed_at.clone(),
                                            reviewed: None,
                                        });
                                    }
                                }
                                if let Some(d) = &drift {
                                    d.observe(&Observation {
                                        confidence: p.confidence,
                                        label: &p.label,
                                        review: p.decision == Decision::Review,
                                        size: Some(fetched.body.len() as u64),
                                        content_type: Some(fetched.kind.content_type()),
                                    });
                                }
                                if let Some(c) = &capturer {
                                    if c.sampled() {
                                        let input = c
                                            .captures_input()
                                            .then(|| (fetched.kind.content_type(), fetched.body.as_ref()));
                                        c.offer(&p, input);
                                    }
                                }
                                Output::Prediction(Box::new(p))
                            }
                            Err(e) => dead_letter(&image, source, &payload, e.reason, e.detail),
                        };
                        if out_tx.send((output, ack)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e)) => tracing::error!(error = %e, "an inference task failed"),
                None => {}
            },
            batch = rx.recv(), if open && running.len() <= inferrer.concurrency() => match batch {
                Some(batch) => {
                    let inferrer = inferrer.clone();
                    running.spawn(async move {
                        let inputs: Vec<Input<'_>> = batch
                            .iter()
                            .map(|f| Input {
                                body: &f.fetched.body,
                                kind: f.fetched.kind,
                            })
                            .collect();
                        let results = inferrer.infer(&inputs).await;
                        drop(inputs);
                        (batch, results)
                    });
                }
                None => open = false,
            },
            else => break,
        }
    }
}

/// What a prediction is made with besides its image.
struct Making<'a> {
    config: &'a Config,
    thresholds: &'a crate::pipeline::control::Thresholds,
    metrics: &'a Metrics,
}

fn prediction(
    image: ImageRef,
    source: SourceRef,
    consumed: Instant,
    fetched: &Fetched,
    inference: Inference,
    with: &Making<'_>,
) -> Prediction {
    let Making {
        config,
        thresholds,
        metrics,
    } = *with;
    let routed =
        crate::pipeline::route::route_by(&inference.scores, &config.endpoint.labels, thresholds);
    let labels = &config.endpoint.labels;
    let label = labels.get(routed.label).cloned().unwrap_or_default();
    metrics
        .predictions
        .with_label_values(&[label.as_str(), routed.decision.as_str()])
        .inc();
    metrics
        .confidence
        .with_label_values(&[label.as_str()])
        .observe(routed.confidence);
    let scores: BTreeMap<String, f64> = labels
        .iter()
        .cloned()
        .zip(inference.scores.iter().copied())
        .collect();
    let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    Prediction {
        schema: PREDICTION_SCHEMA.to_string(),
        id: image.id(fetched.etag.as_deref()),
        size: fetched.body.len() as u64,
        etag: image.etag.clone().or(fetched.etag.clone()),
        version_id: image.version_id.clone(),
        bucket: image.bucket,
        key: image.key,
        label,
        confidence: routed.confidence,
        scores,
        threshold: routed.threshold,
        decision: routed.decision,
        endpoint: config.endpoint.name.clone(),
        variant: inference.variant.or_else(|| {
            (!config.endpoint.variant.is_empty()).then(|| config.endpoint.variant.clone())
        }),
        event_time: image.event_time,
        processed_at: now_rfc3339(),
        latency_ms: Latency {
            fetch: ms(fetched.duration),
            infer: ms(inference.duration),
            total: ms(consumed.elapsed()),
        },
        source,
        backfill: image.backfill,
    }
}

async fn deliver(
    output: Output,
    sink: &KafkaSink,
    alerter: Option<&Alerter>,
    payload_cap: usize,
) -> Result<(), String> {
    match output {
        Output::DeadLetter(d) => sink.dead_letter(&d).await,
        Output::Prediction(p) => {
            if p.decision == Decision::Review {
                if let Some(alerter) = alerter {
                    let (record, alert) = futures::join!(sink.prediction(&p), alerter.alert(&p));
                    record?;
                    if let Err(detail) = alert {
                        tracing::warn!(id = %p.id, %detail, "alert failed; dead-lettered");
                        let json = Bytes::from(serde_json::to_vec(&p).unwrap_or_default());
                        let d = DeadLetter::new(
                            DeadLetterReason::AlertFailed,
                            detail,
                            Some(p.bucket.clone()),
                            Some(p.key.clone()),
                            &Payload::new(json, payload_cap),
                            p.source.clone(),
                        );
                        sink.dead_letter(&d).await?;
                    }
                    return Ok(());
                }
            }
            sink.prediction(&p).await
        }
    }
}

async fn sink_stage(
    mut rx: mpsc::Receiver<(Output, Ack)>,
    sink: KafkaSink,
    alerter: Option<Alerter>,
    concurrency: usize,
    payload_cap: usize,
) {
    futures::stream::poll_fn(|cx| rx.poll_recv(cx))
        .map(|(output, ack)| {
            let sink = &sink;
            let alerter = alerter.as_ref();
            async move {
                match deliver(output, sink, alerter, payload_cap).await {
                    Ok(()) => ack.done(),
                    Err(e) => {
                        tracing::error!(partition = ack.partition(), offset = ack.offset(), error = %e, "output not durable; stopping so that a restart re-delivers it");
                        ack.fail(&e);
                    }
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .for_each(|()| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: Option<u64>) -> ImageRef {
        ImageRef {
            bucket: "b".into(),
            key: "k".into(),
            size,
            etag: None,
            version_id: None,
            event_time: None,
            backfill: false,
        }
    }

    #[test]
    fn an_image_holds_its_size_of_the_byte_budget_and_never_more_than_all() {
        let budget = ByteBudget::new(1 << 20, 4_500_000);
        assert_eq!(budget.total_kib, 1024);
        assert_eq!(budget.share(&image(Some(200_000))), 196);
        // Larger than the budget: all of it, so that it goes on alone.
        assert_eq!(budget.share(&image(Some(1_500_000))), 1024);
        // Over fetch.max_object_bytes: refused unread, holds next to nothing.
        assert_eq!(budget.share(&image(Some(10_000_000))), 1);
        // No size in the event: as much as an object may be (here all).
        assert_eq!(budget.share(&image(None)), 1024);
        // An empty object still holds a KiB.
        assert_eq!(budget.share(&image(Some(0))), 1);
    }

    #[tokio::test]
    async fn what_an_image_holds_is_fitted_to_what_was_fetched() {
        let budget = ByteBudget::new(1 << 20, 4_500_000);
        // No size: all of it, then the surplus back.
        let mut held = budget.kib.clone().acquire_many_owned(1024).await.unwrap();
        budget.fit(&mut held, 100_000);
        assert_eq!(held.num_permits(), 98);
        assert_eq!(budget.kib.available_permits(), 1024 - 98);
        // Understated: more, while there is room.
        let mut small = budget.kib.clone().acquire_many_owned(1).await.unwrap();
        budget.fit(&mut small, 300_000);
        assert_eq!(small.num_permits(), 293);
        // No room: it goes on with what it has, never waiting.
        let _rest = budget
            .kib
            .clone()
            .acquire_many_owned(1024 - 98 - 293)
            .await
            .unwrap();
        budget.fit(&mut held, 200_000);
        assert_eq!(held.num_permits(), 98);
    }
}
