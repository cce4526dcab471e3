//! The wiring: source → fetch → batch → infer → route → sinks, with bounded
//! channels between stages and one semaphore bounding images in flight.
//!
//! Every stage is a task that ends when its input closes, so stopping the
//! source drains the rest in order. Offsets are committed by the source task
//! on a timer, on revocation and at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::ack::{Ack, Tracker};
use crate::capture::{CaptureLine, Capturer};
use crate::config::{Config, RequestMode};
use crate::decode::{decode, DeadLetterReason, ImageRef, Outcome};
use crate::fetch::{Fetched, Fetcher};
use crate::infer::{InferError, Inference, Inferrer, Input};
use crate::metrics::Metrics;
use crate::record::{
    image_id, now_rfc3339, DeadLetter, Decision, Latency, Prediction, SourceRef, PREDICTION_SCHEMA,
};
use crate::sink::{Alerter, KafkaSink};
use crate::source::{commit, Positions, SourceContext};

/// One image on its way.
struct Job {
    image: ImageRef,
    ack: Ack,
    source: SourceRef,
    payload: Bytes,
    consumed: Instant,
}

struct FetchedJob {
    job: Job,
    fetched: Fetched,
}

enum Output {
    Prediction(Box<Prediction>),
    DeadLetter(Box<DeadLetter>),
}

/// A running service.
pub struct Service {
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_addr: SocketAddr,
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
    let sdk = crate::aws::sdk_config(&config).await;
    start_with_sdk(config, sdk, shutdown).await
}

/// As [`start`], with the AWS SDK settings given (the demo uses static
/// credentials for its embedded services).
pub async fn start_with_sdk(
    config: Config,
    sdk: aws_config::SdkConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Service> {
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    metrics.init_labels(&config.endpoint.labels);
    let tracker = Tracker::new(metrics.clone());
    let fetcher = Fetcher::new(
        crate::aws::s3_client(&sdk, &config),
        config.fetch.clone(),
        metrics.clone(),
    );
    let inferrer = Inferrer::new(
        crate::aws::sagemaker_client(&sdk, &config),
        config.endpoint.clone(),
        metrics.clone(),
    );
    let capture = if config.capture.enabled {
        tracing::info!(destination = %config.capture.destination,
            sampling_percentage = config.capture.sampling_percentage, "data capture on");
        let client = crate::aws::s3_client(&sdk, &config);
        Capturer::spawn(client, &config.capture, metrics.clone())
    } else {
        None
    };
    let alerter = config.alerts.enabled.then(|| {
        Alerter::new(
            crate::aws::sns_client(&sdk, &config),
            &config,
            metrics.clone(),
        )
    });

    let producer: FutureProducer = crate::kafka::producer_config(&config.kafka)
        .create()
        .context("creating the Kafka producer (check kafka.brokers and kafka.properties)")?;
    let sink = KafkaSink::new(producer.clone(), &config, metrics.clone());

    let context = SourceContext {
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        topic: config.kafka.input_topic.clone(),
        revoke_drain_timeout: config.kafka.revoke_drain_timeout,
    };
    let consumer: StreamConsumer<SourceContext> = crate::kafka::consumer_config(&config.kafka)
        .create_with_context(context)
        .context("creating the Kafka consumer (check kafka.brokers and kafka.properties)")?;
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

    let config = Arc::new(config);
    let task = tokio::spawn({
        let metrics = metrics.clone();
        async move {
            let (capturer, capture_task) = capture.unzip();
            let result = run(
                config, consumer, fetcher, inferrer, sink, alerter, capturer, tracker, metrics,
                shutdown,
            )
            .await;
            // The capture writer flushes its last buffer once the stages are gone.
            if let Some(task) = capture_task {
                if tokio::time::timeout(std::time::Duration::from_secs(30), task)
                    .await
                    .is_err()
                {
                    tracing::warn!("data capture did not finish its last write in 30s");
                }
            }
            // Outputs still queued in librdkafka are delivered before we go.
            let _ = tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                producer.flush(std::time::Duration::from_secs(10))
            })
            .await;
            http_stop.cancel();
            let _ = http.await;
            result
        }
    });
    Ok(Service {
        metrics_addr,
        metrics,
        task,
    })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: Arc<Config>,
    consumer: StreamConsumer<SourceContext>,
    fetcher: Fetcher,
    inferrer: Inferrer,
    sink: KafkaSink,
    alerter: Option<Alerter>,
    capturer: Option<Capturer>,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
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
        batch_in_tx,
        out_tx.clone(),
    ));
    // In per-image mode each image is its own call: it goes on at once,
    // without waiting for batch-mates it does not need.
    let mut batching = config.batch.clone();
    if config.endpoint.mode == RequestMode::PerImage {
        batching.max_images = 1;
    }
    let batch = tokio::spawn(crate::batch::run(batching, batch_in_rx, batch_tx));
    let infer = tokio::spawn(infer_stage(
        batch_rx,
        inferrer,
        config.clone(),
        metrics.clone(),
        capturer,
        out_tx.clone(),
    ));
    let sinks = tokio::spawn(sink_stage(out_rx, sink, alerter, cap));

    source_loop(
        &consumer, &config, &tracker, &metrics, job_tx, out_tx, &shutdown,
    )
    .await;

    // Drain: the stages finish in order once the source's senders are gone.
    let deadline = config.pipeline.shutdown_timeout;
    let drained = {
        let t = tracker.clone();
        tokio::task::spawn_blocking(move || t.wait_drained(&[], deadline))
            .await
            .unwrap_or(false)
    };
    commit(
        &consumer,
        &tracker,
        &metrics,
        &config.kafka.input_topic,
        Positions::All,
    );
    let left = tracker.pending(&[]);
    if drained {
        tracing::info!("drained; offsets committed");
        for t in [fetch, batch, infer, sinks] {
            let _ = t.await;
        }
    } else {
        tracing::warn!(
            in_flight = left,
            "shutdown deadline passed; uncommitted images will be re-delivered on restart"
        );
        for t in [fetch, batch, infer, sinks] {
            t.abort();
        }
    }
    match tracker.fatal_reason() {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}

/// How long the pipeline may stay at its in-flight limit before the input
/// partitions are paused.
const PAUSE_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

async fn source_loop(
    consumer: &StreamConsumer<SourceContext>,
    config: &Config,
    tracker: &Arc<Tracker>,
    metrics: &Metrics,
    job_tx: mpsc::Sender<Job>,
    out_tx: mpsc::Sender<(Output, Ack)>,
    shutdown: &CancellationToken,
) {
    let topic = config.kafka.input_topic.as_str();
    let cap = config.pipeline.max_in_flight;
    let permits = Arc::new(Semaphore::new(cap));
    let mut tick = tokio::time::interval(config.kafka.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = false;
    loop {
        // At the in-flight limit, consumption waits. A short wait is the
        // normal state of a saturated pipeline (permits come back every few
        // milliseconds) and costs nothing: librdkafka keeps prefetching up
        // to its queue limits. Only a long one (the endpoint is down)
        // pauses the partitions, so that the consumer can go on being
        // polled (group membership, rebalances) without receiving. Pausing
        // drops librdkafka's prefetched messages, so doing it on every
        // saturation would cap throughput at a fetch round trip per
        // `max_in_flight` images.
        if permits.available_permits() == 0 && !paused {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tracker.fatal().cancelled() => break,
                _ = tick.tick() => {
                    commit(consumer, tracker, metrics, topic, Positions::Changed);
                    continue;
                }
                _ = permits.acquire() => continue,
                _ = tokio::time::sleep(PAUSE_AFTER) => {
                    set_paused(consumer, true);
                    paused = true;
                    tracing::debug!("in-flight limit reached for {PAUSE_AFTER:?}; partitions paused");
                }
            }
        } else if paused {
            // Paused partitions may be re-assigned unpaused; keep them paused
            // until there is room.
            let full = permits.available_permits() == 0;
            set_paused(consumer, full);
            if !full {
                paused = false;
                tracing::debug!("in-flight limit freed; partitions resumed");
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tracker.fatal().cancelled() => break,
            _ = tick.tick() => commit(consumer, tracker, metrics, topic, Positions::Changed),
            _ = permits.acquire(), if paused => {}
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka consumer error");
                        continue;
                    }
                };
                let partition = msg.partition();
                let offset = msg.offset();
                let payload = msg.payload().map(Bytes::copy_from_slice);
                drop(msg);
                metrics.events_consumed.inc();
                let source = SourceRef { topic: topic.to_string(), partition, offset };
                let outcomes = decode(payload.as_deref(), &config.filter);
                let images = outcomes.iter().filter(|o| matches!(o, Outcome::Image(_))).count();
                let permit = if images > 0 {
                    let want = images.min(cap) as u32;
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        p = permits.clone().acquire_many_owned(want) => p.ok(),
                    }
                } else {
                    None
                };
                let Some(ack) = tracker.begin(partition, offset, images, permit) else {
                    tracing::debug!(partition, offset, "message of a partition no longer assigned here; left to its new owner");
                    continue;
                };
                let payload = payload.unwrap_or_default();
                for outcome in outcomes {
                    match outcome {
                        Outcome::Image(image) => {
                            let job = Job { image, ack: ack.clone(), source: source.clone(), payload: payload.clone(), consumed: Instant::now() };
                            if job_tx.send(job).await.is_err() {
                                return;
                            }
                        }
                        Outcome::Skip(reason) => {
                            metrics.records_skipped.with_label_values(&[reason.as_str()]).inc();
                        }
                        Outcome::Reject(r) => {
                            tracing::info!(partition, offset, reason = r.reason.as_str(), detail = %r.detail, "event rejected");
                            let dl = DeadLetter::new(r.reason, r.detail, r.bucket, r.key, Some(&payload), source.clone());
                            if out_tx.send((Output::DeadLetter(Box::new(dl)), ack.clone())).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
    set_paused(consumer, true);
}

fn set_paused(consumer: &StreamConsumer<SourceContext>, pause: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    if assignment.count() == 0 {
        return;
    }
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, pause, "pause/resume failed");
    }
}

fn dead_letter(job: &Job, reason: DeadLetterReason, detail: String) -> Output {
    tracing::info!(bucket = %job.image.bucket, key = %job.image.key, reason = reason.as_str(), %detail, "dead letter");
    Output::DeadLetter(Box::new(DeadLetter::new(
        reason,
        detail,
        Some(job.image.bucket.clone()),
        Some(job.image.key.clone()),
        Some(&job.payload),
        job.source.clone(),
    )))
}

async fn fetch_stage(
    mut rx: mpsc::Receiver<Job>,
    fetcher: Fetcher,
    concurrency: usize,
    batch_tx: mpsc::Sender<(FetchedJob, u64)>,
    out_tx: mpsc::Sender<(Output, Ack)>,
) {
    futures::stream::poll_fn(|cx| rx.poll_recv(cx))
        .map(|job| {
            let fetcher = &fetcher;
            async move {
                let result = fetcher.fetch(&job.image).await;
                (job, result)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .for_each(|(job, result)| {
            let batch_tx = &batch_tx;
            let out_tx = &out_tx;
            async move {
                match result {
                    Ok(fetched) => {
                        let size = fetched.body.len() as u64;
                        let _ = batch_tx.send((FetchedJob { job, fetched }, size)).await;
                    }
                    Err(e) => {
                        let ack = job.ack.clone();
                        let _ = out_tx
                            .send((dead_letter(&job, e.reason, e.detail), ack))
                            .await;
                    }
                }
            }
        })
        .await;
}

async fn infer_stage(
    mut rx: mpsc::Receiver<Vec<FetchedJob>>,
    inferrer: Inferrer,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    capturer: Option<Capturer>,
    out_tx: mpsc::Sender<(Output, Ack)>,
) {
    // One batch more than calls allowed: it builds its request while
    // waiting for a call slot, so the endpoint never waits for that.
    let batches = config.endpoint.concurrency.max(1) + 1;
    futures::stream::poll_fn(|cx| rx.poll_recv(cx))
        .map(|batch| {
            let inferrer = &inferrer;
            async move {
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
            }
        })
        .buffer_unordered(batches)
        .for_each(|(batch, results)| {
            let out_tx = &out_tx;
            let config = &config;
            let metrics = &metrics;
            let capturer = capturer.as_ref();
            async move {
                for (item, result) in batch.into_iter().zip(results) {
                    let ack = item.job.ack.clone();
                    let (kind, body) = (item.fetched.kind, item.fetched.body.clone());
                    let output = to_output(item, result, config, metrics);
                    if let (Some(c), Output::Prediction(p)) = (capturer, &output) {
                        if c.sampled() {
                            let input = c
                                .captures_input()
                                .then(|| (kind.content_type(), body.as_ref()));
                            c.send(CaptureLine::new(p, input)).await;
                        }
                    }
                    let _ = out_tx.send((output, ack)).await;
                }
            }
        })
        .await;
}

fn to_output(
    item: FetchedJob,
    result: Result<Inference, InferError>,
    config: &Config,
    metrics: &Metrics,
) -> Output {
    let FetchedJob { job, fetched } = item;
    let inference = match result {
        Ok(i) => i,
        Err(e) => return dead_letter(&job, e.reason, e.detail),
    };
    let routed = crate::route::route(&inference.scores, config);
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
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    let image = job.image;
    Output::Prediction(Box::new(Prediction {
        schema: PREDICTION_SCHEMA.to_string(),
        id: image_id(&image, fetched.etag.as_deref()),
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
            total: ms(job.consumed.elapsed()),
        },
        source: job.source,
    }))
}

async fn deliver(
    output: Output,
    sink: &KafkaSink,
    alerter: Option<&Alerter>,
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
                        let d = DeadLetter::new(
                            DeadLetterReason::AlertFailed,
                            detail,
                            Some(p.bucket.clone()),
                            Some(p.key.clone()),
                            serde_json::to_vec(&p).ok().as_deref(),
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
) {
    futures::stream::poll_fn(|cx| rx.poll_recv(cx))
        .map(|(output, ack)| {
            let sink = &sink;
            let alerter = alerter.as_ref();
            async move {
                if let Err(e) = deliver(output, sink, alerter).await {
                    tracing::error!(partition = ack.partition(), offset = ack.offset(), error = %e, "output not durable; stopping so that a restart re-delivers it");
                    ack.fail(&e);
                }
                drop(ack);
            }
        })
        .buffer_unordered(concurrency.max(1))
        .for_each(|()| async {})
        .await;
}
