//! The digest alerter: reads the review topic in a consumer group of its
//! own and publishes digests (the bookkeeping is in `digest`). The review
//! topic is the durable queue of alerts, so classification never waits for
//! SNS: while SNS is down, digests wait here, the review topic's partitions
//! are paused (and still polled, so the group keeps them), and they are
//! published with their original times once SNS answers again.
//!
//! No duplicates: an image's records all go to one review partition (keyed
//! by `bucket/key`), read by one member at a time. After a message is
//! published, its prediction ids are written to the state topic (compacted,
//! keyed by id, partition = the review partition), which the next owner of
//! the partition reads before its first record; then the window's offsets
//! are committed. A crash between a Publish and its state write is the one
//! way an image can be alerted twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clients::aws::backoff;
use crate::config::{AlertLink, Config};
use crate::metrics::Metrics;
use crate::pipeline::digest::{
    console_link, now_ms, position_key, render, Added, Book, Item, Message, Outgoing, Settings,
    State,
};
use crate::pipeline::sink::{Alerter, KafkaSink, PublishError};
use crate::record::{DeadLetter, DeadLetterReason, Decision, Payload, Prediction, SourceRef};

/// Where digests go: SNS, or (the demo) a channel.
#[derive(Clone)]
pub enum Publisher {
    Sns(Alerter),
    Channel(mpsc::UnboundedSender<Message>),
}

impl Publisher {
    async fn publish(&self, m: &Message) -> Result<(), PublishError> {
        match self {
            Publisher::Sns(a) => a.publish(&m.subject, &m.body, &m.attributes).await,
            Publisher::Channel(tx) => tx.send(m.clone()).map_err(|_| PublishError {
                retryable: true,
                detail: "nobody reads the digests".into(),
            }),
        }
    }
}

/// What each listed image links to.
pub struct Links {
    pub kind: AlertLink,
    pub region: String,
    pub s3: aws_sdk_s3::Client,
    pub expiry: Duration,
}

impl Links {
    async fn link(&self, item: &Item) -> String {
        match self.kind {
            AlertLink::S3 => format!("s3://{}/{}", item.bucket, item.key),
            AlertLink::Console => console_link(&self.region, &item.bucket, &item.key),
            AlertLink::Presigned => {
                let presigned =
                    match aws_sdk_s3::presigning::PresigningConfig::expires_in(self.expiry) {
                        Ok(cfg) => self
                            .s3
                            .get_object()
                            .bucket(&item.bucket)
                            .key(&item.key)
                            .presigned(cfg)
                            .await
                            .map(|r| r.uri().to_string())
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                presigned.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "presigning a link failed; the digest shows the s3:// URI");
                    format!("s3://{}/{}", item.bucket, item.key)
                })
            }
        }
    }
}

/// Rebalance callbacks: the book follows the assignment.
pub struct AlertContext {
    book: Arc<Mutex<Book>>,
    topic: String,
    /// Set while digests wait to be published: partitions assigned
    /// meanwhile are paused too.
    holding: AtomicBool,
    /// Read positions of published windows not yet committed: committed
    /// again until a commit succeeds (one may fail during a rebalance).
    uncommitted: Mutex<BTreeMap<i32, i64>>,
}

fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    book.lock().unwrap_or_else(|p| p.into_inner())
}

impl AlertContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

impl ClientContext for AlertContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::clients::kafka::log(level, fac, log_message);
    }
}

impl ConsumerContext for AlertContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions = self.partitions(tpl);
            let mut book = lock(&self.book);
            let mut uncommitted = self.uncommitted.lock().unwrap_or_else(|p| p.into_inner());
            for &p in &partitions {
                book.revoke(p);
                uncommitted.remove(&p);
            }
            if !partitions.is_empty() {
                tracing::info!(?partitions, "alerts: review partitions revoked");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions(tpl);
                {
                    let mut book = lock(&self.book);
                    for &p in &partitions {
                        book.assign(p);
                    }
                }
                // Nothing is read from a partition before its alerted ids
                // are loaded (the loop resumes it then).
                if !partitions.is_empty() {
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::warn!(error = %e, "alerts: pausing newly assigned partitions failed");
                    }
                    tracing::info!(?partitions, "alerts: review partitions assigned");
                }
            }
            Rebalance::Error(e) => {
                let gone = lock(&self.book).revoke_all();
                tracing::warn!(error = %e, partitions = ?gone, "alerts: rebalance error; partitions dropped");
            }
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "alerts: commit failed; tried again");
            return;
        }
        let mut uncommitted = self.uncommitted.lock().unwrap_or_else(|p| p.into_inner());
        for e in offsets.elements_for_topic(&self.topic) {
            if let Offset::Offset(o) = e.offset() {
                if uncommitted.get(&e.partition()).is_some_and(|u| *u <= o) {
                    uncommitted.remove(&e.partition());
                }
            }
        }
    }
}

/// The review topic's consumer of the digest alerter.
pub type AlertConsumer = StreamConsumer<AlertContext>;

/// The digest alerter, created (and its topics checked) at start-up.
pub struct Alerts {
    consumer: Arc<AlertConsumer>,
    book: Arc<Mutex<Book>>,
    config: Arc<Config>,
    publisher: Publisher,
    links: Links,
    /// Its own producer (state records, dead letters): a delivery timeout
    /// here must not disturb the pipeline's idempotent producer.
    producer: FutureProducer,
    sink: KafkaSink,
    metrics: Arc<Metrics>,
}

/// How long reading a partition's state may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// A partition whose state could not be read, or whose record could not
/// be dead-lettered, is tried again this much later.
const RETRY_PARTITION: Duration = Duration::from_secs(5);
/// How often positions whose commit failed are committed again.
const RECOMMIT_EVERY: Duration = Duration::from_secs(2);
/// How often alerted ids past the dedup window are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The longest prediction id (bucket 63 + key 1,024 + version) and label
/// a review record may have.
const MAX_ID_BYTES: usize = 2048;
const MAX_LABEL_BYTES: usize = 256;
/// SNS takes messages (with subject and attributes) up to 256 KiB; the
/// rest of its envelope (to an SQS subscription) takes about 1 KiB.
const SNS_MAX_BYTES: usize = 256 * 1024 - 2 * 1024;

/// Why a record could not be taken now.
struct NotNow;

impl Alerts {
    /// Creates the consumer and producer and checks the state topic: it
    /// must exist with at least as many partitions as the review topic.
    pub async fn new(
        config: Arc<Config>,
        publisher: Publisher,
        links: Links,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Alerts> {
        let a = &config.alerts;
        let group = a.group_id(&config.kafka);
        let book = Arc::new(Mutex::new(Book::new(Settings::new(
            a,
            &config.kafka.review_topic,
        ))));
        let context = AlertContext {
            book: book.clone(),
            topic: config.kafka.review_topic.clone(),
            holding: AtomicBool::new(false),
            uncommitted: Mutex::new(BTreeMap::new()),
        };
        let consumer: AlertConsumer =
            crate::clients::kafka::alerts_consumer_config(&config.kafka, &group)
                .create_with_context(context)
                .context(
                    "creating the alerts consumer (check kafka.brokers and kafka.properties)",
                )?;
        let producer: FutureProducer = crate::clients::kafka::producer_config(&config.kafka)
            .create()
            .context("creating the alerts producer (check kafka.brokers and kafka.properties)")?;
        let sink = KafkaSink::new(producer.clone(), &config, metrics.clone());
        let alerts = Alerts {
            consumer: Arc::new(consumer),
            book,
            config,
            publisher,
            links,
            producer,
            sink,
            metrics,
        };
        alerts.check_topics().await?;
        Ok(alerts)
    }

    /// The Kafka clients, for the caller to close off the runtime's
    /// threads (closing a consumer blocks) whatever becomes of the task.
    pub fn clients(&self) -> (Arc<AlertConsumer>, FutureProducer) {
        (self.consumer.clone(), self.producer.clone())
    }

    async fn check_topics(&self) -> anyhow::Result<()> {
        let kafka = self.config.kafka.clone();
        let group = self.config.alerts.group_id(&kafka);
        let review = kafka.review_topic.clone();
        let state = self.config.alerts.state_topic.clone();
        let (r, s) = (review.clone(), state.clone());
        let counts = tokio::task::spawn_blocking(move || {
            let client: BaseConsumer = crate::clients::kafka::state_reader_config(&kafka, &group)
                .create()
                .map_err(|e| e.to_string())?;
            // Some(n): n partitions; None: no such topic.
            let count = |topic: &str| -> Result<Option<usize>, String> {
                let md = client
                    .fetch_metadata(Some(topic), Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                    return Ok(None);
                };
                match t.error().map(RDKafkaErrorCode::from) {
                    None => Ok(Some(t.partitions().len())),
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(None),
                    Some(e) => Err(format!("{topic}: {e}")),
                }
            };
            Ok::<_, String>((count(&r)?, count(&s)?))
        })
        .await
        .context("checking alerts.state_topic")?;
        match counts {
            Ok((r, None)) => anyhow::bail!(
                "alerts.state_topic `{state}` does not exist: create it with cleanup.policy=compact and at least {} partitions (as many as kafka.review_topic `{review}`), or set alerts.mode = \"each\"",
                r.map_or("as many".to_string(), |n| n.to_string())
            ),
            Ok((Some(r), Some(s))) if s < r => anyhow::bail!(
                "alerts.state_topic `{state}` has {s} partitions, fewer than kafka.review_topic `{review}` ({r}); add partitions to it"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not check alerts.state_topic now; going on");
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }

    /// Runs until `shutdown`: a Publish under way is finished (within
    /// `alerts.timeout`); what waits unpublished is left uncommitted, for
    /// the next reader of its partition. Fails on a fatal consumer error.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let review_topic = self.config.kafka.review_topic.clone();
        self.consumer
            .subscribe(&[&review_topic])
            .with_context(|| format!("subscribing to kafka.review_topic `{review_topic}`"))?;
        tracing::info!(group = %self.config.alerts.group_id(&self.config.kafka), topic = %review_topic,
            window = ?self.config.alerts.digest_window, "alert digests on");
        let mut state = Loop {
            retry_at: Instant::now(),
            attempt: 0,
            holding: false,
            blocked: HashMap::new(),
            pruned: Instant::now(),
            committed: Instant::now(),
            unrecorded: Vec::new(),
            shutdown,
        };
        let result = loop {
            if state.shutdown.is_cancelled() {
                break Ok(());
            }
            if let Err(e) = self.step(&mut state).await {
                break Err(e);
            }
        };
        // What was published is committed (closing the consumer, which
        // the caller does, waits for the commit); the subscription is left
        // first (see `clients::kafka::leave_subscription`).
        self.commit(&mut state);
        crate::clients::kafka::leave_subscription(&self.consumer, Duration::from_secs(2)).await;
        result
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }

    async fn step(&self, s: &mut Loop) -> anyhow::Result<()> {
        let now = Instant::now();
        if !s.unrecorded.is_empty() && !self.record_pending(s).await {
            // Not one more Publish before what was published is recorded.
            s.retry_at = Instant::now() + RETRY_PARTITION;
        }
        self.unblock(s).await;
        if s.shutdown.is_cancelled() {
            return Ok(());
        }
        if now.duration_since(s.pruned) >= PRUNE_EVERY {
            s.pruned = now;
            let expired = self.book().prune(now_ms());
            self.forget(expired).await;
        }
        if now.duration_since(s.committed) >= RECOMMIT_EVERY {
            self.commit(s);
        }
        self.book().close_due(now, now_ms(), false);
        let closed = self.book().has_closed();
        self.hold(s, closed);
        // A member whose partitions were taken away (noticed at the next
        // poll) must not publish what it read from them.
        if closed
            && now >= s.retry_at
            && s.unrecorded.is_empty()
            && !s.shutdown.is_cancelled()
            && !self.consumer.assignment_lost()
        {
            self.publish_next(s).await;
        }
        self.metrics
            .alerts_pending
            .set(self.book().pending_images() as i64);
        // Wait for a record, the window's end, the next attempt or the stop.
        let mut wake = Instant::now() + Duration::from_secs(1);
        if let Some(t) = self.book().closes_at() {
            wake = wake.min(t);
        }
        if self.book().has_closed() {
            wake = wake.min(s.retry_at);
        }
        if let Some(t) = s.blocked.values().map(|b| b.retry_at).min() {
            wake = wake.min(t);
        }
        let shutdown = s.shutdown.clone();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {}
            m = self.consumer.recv() => match m {
                Ok(m) => {
                    let (p, offset) = (m.partition(), m.offset());
                    let payload = m.payload().unwrap_or_default().to_vec();
                    drop(m);
                    self.arrived(s, p, offset, payload).await;
                }
                Err(e @ KafkaError::MessageConsumptionFatal(_)) => {
                    anyhow::bail!("fatal Kafka consumer error reading kafka.review_topic: {e} (check kafka.instance_id is unique)");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "alerts: reading the review topic failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        Ok(())
    }

    fn pause(&self, partitions: &[i32], pause: bool) {
        if partitions.is_empty() {
            return;
        }
        let tpl = self.tpl(partitions);
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, pause, ?partitions, "alerts: pausing or resuming review partitions failed");
        }
    }

    /// Pauses the review partitions while digests wait to be published
    /// (so that nothing piles up here), resumes them after.
    fn hold(&self, s: &mut Loop, hold: bool) {
        if hold == s.holding {
            return;
        }
        s.holding = hold;
        self.consumer
            .context()
            .holding
            .store(hold, Ordering::SeqCst);
        let ready: Vec<i32> = {
            let book = self.book();
            book.assigned()
                .into_iter()
                .filter(|p| !book.needs_load(*p) && !s.blocked.contains_key(p))
                .collect()
        };
        self.pause(&ready, hold);
    }

    fn tpl(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.config.kafka.review_topic, p);
        }
        tpl
    }

    /// A record read: taken now, or kept (its partition paused) until its
    /// partition's state is loaded and what was kept before it is taken.
    async fn arrived(&self, s: &mut Loop, p: i32, offset: i64, payload: Vec<u8>) {
        let Some(generation) = self.book().generation(p) else {
            return;
        };
        let blocked = self.book().needs_load(p)
            || s.blocked
                .get(&p)
                .is_some_and(|b| b.generation == generation);
        if !blocked && self.take(p, offset, &payload).await.is_ok() {
            return;
        }
        let b = s.blocked.entry(p).or_insert_with(|| Blocked {
            generation,
            kept: VecDeque::new(),
            retry_at: Instant::now(),
        });
        if b.generation != generation {
            *b = Blocked {
                generation,
                kept: VecDeque::new(),
                retry_at: Instant::now(),
            };
        }
        if !blocked {
            b.retry_at = Instant::now() + RETRY_PARTITION;
        }
        b.kept.push_back((offset, payload));
        self.pause(&[p], true);
    }

    /// Loads the state of newly assigned partitions and takes the records
    /// kept for blocked ones, then resumes them.
    async fn unblock(&self, s: &mut Loop) {
        let (assigned, unloaded): (Vec<i32>, Vec<i32>) = {
            let book = self.book();
            let assigned = book.assigned();
            let unloaded = assigned
                .iter()
                .copied()
                .filter(|p| book.needs_load(*p))
                .collect();
            (assigned, unloaded)
        };
        // Partitions gone (or assigned again since) drop what was kept.
        s.blocked.retain(|p, b| {
            assigned.contains(p) && self.book().generation(*p) == Some(b.generation)
        });
        // One load per step: the consumer is polled between them.
        let mut loads = 0;
        for p in unloaded {
            if s.shutdown.is_cancelled() || loads > 0 {
                break;
            }
            let generation = self.book().generation(p).unwrap_or_default();
            let b = s.blocked.entry(p).or_insert_with(|| Blocked {
                generation,
                kept: VecDeque::new(),
                retry_at: Instant::now(),
            });
            if Instant::now() < b.retry_at {
                continue;
            }
            loads += 1;
            if !self.load(p, &s.shutdown).await {
                if let Some(b) = s.blocked.get_mut(&p) {
                    b.retry_at = Instant::now() + RETRY_PARTITION;
                }
            }
        }
        let ready: Vec<i32> = s
            .blocked
            .iter()
            .filter(|(p, b)| Instant::now() >= b.retry_at && !self.book().needs_load(**p))
            .map(|(p, _)| *p)
            .collect();
        for p in ready {
            if s.shutdown.is_cancelled() {
                return;
            }
            let Some(mut b) = s.blocked.remove(&p) else {
                continue;
            };
            while let Some((offset, payload)) = b.kept.pop_front() {
                if self.take(p, offset, &payload).await.is_err() {
                    b.kept.push_front((offset, payload));
                    b.retry_at = Instant::now() + RETRY_PARTITION;
                    break;
                }
            }
            if b.kept.is_empty() {
                if !s.holding {
                    self.pause(&[p], false);
                }
            } else {
                s.blocked.insert(p, b);
            }
        }
    }

    /// Reads partition `p` of the state topic into the book.
    async fn load(&self, p: i32, shutdown: &CancellationToken) -> bool {
        let kafka = self.config.kafka.clone();
        let group = self.config.alerts.group_id(&kafka);
        let topic = self.config.alerts.state_topic.clone();
        let began = Instant::now();
        let read = tokio::task::spawn_blocking(move || {
            read_state(&kafka, &group, &topic, p).and_then(|mut state| {
                // A review topic made again starts its offsets anew: a
                // recorded position past its end is not this topic's.
                let client: BaseConsumer = crate::clients::kafka::state_reader_config(&kafka, &group)
                    .create()
                    .map_err(|e| format!("creating a reader: {e}"))?;
                let (_, high) = client
                    .fetch_watermarks(&kafka.review_topic, p, Duration::from_secs(10))
                    .map_err(|e| format!("offsets of {}/{p}: {e}", kafka.review_topic))?;
                if state.done_below > high {
                    tracing::warn!(partition = p, recorded = state.done_below, end = high,
                        "alerts: the recorded position is past the review partition's end (topic made again?); reading it all");
                    state.done_below = 0;
                }
                Ok(state)
            })
        });
        let read = tokio::select! {
            r = read => r,
            // The reader ends by its own deadline.
            _ = shutdown.cancelled() => return false,
        };
        match read {
            Ok(Ok(state)) => {
                let n = state.alerted.len();
                let done_below = state.done_below;
                let expired = self.book().loaded(p, state, now_ms());
                tracing::info!(partition = p, alerted = n - expired.len(), expired = expired.len(),
                    done_below, took = ?began.elapsed(), "alerts: partition state loaded");
                self.forget(expired.into_iter().map(|id| (p, id)).collect())
                    .await;
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(partition = p, error = %e, "alerts: reading alerts.state_topic failed; the partition waits (paused) and is tried again");
                false
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "alerts: reading alerts.state_topic failed");
                false
            }
        }
    }

    /// Takes one record of the review topic into the book; `NotNow` when
    /// its dead letter (not a prediction) could not be written.
    async fn take(&self, p: i32, offset: i64, payload: &[u8]) -> Result<(), NotNow> {
        let (now, at) = (Instant::now(), now_ms());
        if self.book().already_done(p, offset) {
            // Read again after a commit that did not land: accounted for.
            self.book().consume(p, offset, now, at);
            self.metrics
                .alerts_suppressed
                .with_label_values(&["duplicate"])
                .inc();
            return Ok(());
        }
        let parsed = serde_json::from_slice::<Prediction>(payload).and_then(|pred| {
            // Longer than S3 allows: not one of ours, and it would not fit
            // a message.
            if pred.id.len() > MAX_ID_BYTES || pred.label.len() > MAX_LABEL_BYTES {
                Err(serde::de::Error::custom(format!(
                    "id or label longer than {MAX_ID_BYTES} / {MAX_LABEL_BYTES} bytes"
                )))
            } else {
                Ok(pred)
            }
        });
        match parsed {
            Ok(pred) if pred.decision == Decision::Review => {
                let added = self.book().add(Item::new(&pred, p), offset, now, at);
                let reason = match added {
                    Added::Duplicate => "duplicate",
                    Added::Storm => "storm",
                    Added::Listed | Added::NotAssigned => return Ok(()),
                };
                self.metrics
                    .alerts_suppressed
                    .with_label_values(&[reason])
                    .inc();
                Ok(())
            }
            // An accepted prediction (results and review on one topic).
            Ok(_) => {
                self.book().consume(p, offset, now, at);
                Ok(())
            }
            Err(e) => {
                let d = DeadLetter::new(
                    DeadLetterReason::BadReviewRecord,
                    format!("not a prediction: {e}"),
                    None,
                    None,
                    &Payload::new(
                        payload.to_vec().into(),
                        self.config.pipeline.dead_letter_payload_bytes,
                    ),
                    SourceRef {
                        topic: self.config.kafka.review_topic.clone(),
                        partition: p,
                        offset,
                    },
                );
                let wait = self.config.kafka.commit_timeout;
                match tokio::time::timeout(wait, self.sink.dead_letter(&d)).await {
                    Ok(Ok(())) => {
                        tracing::warn!(partition = p, offset, error = %e, "alerts: a record on the review topic is not a prediction; dead-lettered");
                        self.book().consume(p, offset, now, at);
                        Ok(())
                    }
                    failed => {
                        // Not past it before its dead letter is durable.
                        let why = match failed {
                            Ok(Err(e)) => e,
                            _ => format!("unanswered within kafka.commit_timeout ({wait:?})"),
                        };
                        tracing::error!(partition = p, offset, error = %why, "alerts: dead letter of a bad review record failed; the partition waits and tries again");
                        Err(NotNow)
                    }
                }
            }
        }
    }

    /// The next message of the oldest closed window, as large as SNS takes.
    async fn next_message(&self) -> Option<(Outgoing, Message)> {
        let settings = self.book().settings().clone();
        let mut limit = usize::MAX;
        loop {
            let out = self.book().next(limit)?;
            let mut links = Vec::new();
            let n = match &out {
                Outgoing::Digest { items, .. } => {
                    for item in items.iter().take(settings.max_items) {
                        links.push(self.links.link(item).await);
                    }
                    items.len()
                }
                Outgoing::Storm { .. } => 1,
            };
            let message = render(&out, &links, &settings);
            if message.bytes() <= SNS_MAX_BYTES || n <= 1 {
                return Some((out, message));
            }
            limit = n / 2;
        }
    }

    /// Publishes the next message of the oldest closed window, or, when
    /// it has none left, records and commits how far that window read.
    async fn publish_next(&self, s: &mut Loop) {
        let Some((out, message)) = self.next_message().await else {
            self.finish(s).await;
            return;
        };
        match self.publisher.publish(&message).await {
            Ok(()) => {
                if s.attempt > 0 {
                    tracing::info!(
                        failed_attempts = s.attempt,
                        "alerts: publishing works again; late digests keep their original times"
                    );
                }
                s.attempt = 0;
                s.retry_at = Instant::now();
                let recorded = self.book().sent(&out, now_ms());
                self.metrics.alerts_listed.inc_by(message.images as u64);
                tracing::info!(subject = %message.subject, images = message.images, "alerts: digest published");
                let value = serde_json::json!({ "alerted_at_ms": now_ms() }).to_string();
                s.unrecorded.extend(
                    recorded
                        .into_iter()
                        .map(|(p, id)| (p, id, Some(value.clone()))),
                );
                // Recorded, and the window finished, in this same step: no
                // poll (revocation) or stop comes in between.
                if self.record_pending(s).await {
                    self.finish(s).await;
                }
            }
            Err(e) => {
                s.attempt += 1;
                self.metrics.alerts_failed.inc();
                let wait = backoff(s.attempt, Duration::from_secs(1), Duration::from_secs(30));
                s.retry_at = Instant::now() + wait;
                if e.retryable {
                    tracing::warn!(attempt = s.attempt, retry_in = ?wait, error = %e.detail,
                        "alerts: publishing a digest failed; it waits (classification goes on) and is tried again");
                } else {
                    tracing::error!(attempt = s.attempt, retry_in = ?wait, error = %e.detail,
                        "alerts: SNS refuses the digest (check alerts.topic_arn, the sns:Publish permission, the topic's KMS key); digests wait, classification goes on");
                }
            }
        }
    }

    /// When the oldest closed window has nothing left to publish: records
    /// how far it read (then a re-read skips it) and commits that.
    async fn finish(&self, s: &mut Loop) {
        // Not before the window's alerted ids are recorded.
        if !s.unrecorded.is_empty() || self.book().next(1).is_some() {
            return;
        }
        let Some(positions) = self.book().finish() else {
            return;
        };
        if positions.is_empty() {
            return;
        }
        s.unrecorded.extend(positions.iter().map(|(p, o)| {
            let value = serde_json::json!({ "next_offset": o }).to_string();
            (*p, position_key(*p), Some(value))
        }));
        // Either one, recorded or committed, keeps the window from being
        // read again; the commit goes on while the record is retried.
        self.record_pending(s).await;
        self.consumer
            .context()
            .uncommitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(positions);
        self.commit(s);
    }

    /// Writes what published digests left unrecorded (alerted ids, read
    /// positions); true once all of it is acknowledged.
    async fn record_pending(&self, s: &mut Loop) -> bool {
        let records = std::mem::take(&mut s.unrecorded);
        let wait = if s.shutdown.is_cancelled() {
            self.config.kafka.commit_timeout.min(Duration::from_secs(5))
        } else {
            self.config.kafka.commit_timeout
        };
        let failed = self.write_state(records, wait).await;
        let ok = failed.is_empty();
        if !ok {
            tracing::warn!(
                unrecorded = failed.len(),
                "alerts: alerts.state_topic did not take what was published; no more digests until it does"
            );
        }
        s.unrecorded = failed;
        ok
    }

    /// Commits the read positions of published windows (asynchronously;
    /// what fails is committed again a little later). The state topic
    /// holds the same positions, so a commit that never lands only costs
    /// reading again.
    fn commit(&self, s: &mut Loop) {
        s.committed = Instant::now();
        let positions = self
            .consumer
            .context()
            .uncommitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if positions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &positions {
            let _ =
                tpl.add_partition_offset(&self.config.kafka.review_topic, *p, Offset::Offset(*o));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "alerts: committing the review topic failed; tried again");
        }
    }

    /// Writes records to the state topic, each to its review partition
    /// (`None` deletes), waiting up to `wait`; returns those not taken.
    async fn write_state(
        &self,
        records: Vec<(i32, String, Option<String>)>,
        wait: Duration,
    ) -> Vec<(i32, String, Option<String>)> {
        if records.is_empty() {
            return records;
        }
        let topic = &self.config.alerts.state_topic;
        let sends = records.iter().map(|(p, key, value)| {
            let record = FutureRecord::<str, str>::to(topic)
                .partition(*p)
                .key(key.as_str());
            let record = match value {
                Some(v) => record.payload(v.as_str()),
                None => record,
            };
            self.producer
                .send(record, Timeout::After(Duration::from_secs(1)))
        });
        let results: Vec<Option<String>> =
            match tokio::time::timeout(wait, futures::future::join_all(sends)).await {
                Ok(results) => results
                    .into_iter()
                    .map(|r| r.err().map(|(e, _)| e.to_string()))
                    .collect(),
                Err(_) => vec![Some(format!("unanswered within {wait:?}")); records.len()],
            };
        let mut failed = Vec::new();
        let mut first = None;
        for (record, error) in records.into_iter().zip(results) {
            if let Some(e) = error {
                first.get_or_insert(e);
                failed.push(record);
            }
        }
        if let Some(e) = first {
            tracing::warn!(failed = failed.len(), error = %e, "alerts: writing to alerts.state_topic failed");
        }
        failed
    }

    /// Deletes alerted ids past the dedup window from the state topic
    /// (best effort: what is left is deleted at the next load).
    async fn forget(&self, ids: Vec<(i32, String)>) {
        let records = ids.into_iter().map(|(p, id)| (p, id, None)).collect();
        self.write_state(records, self.config.kafka.commit_timeout)
            .await;
    }
}

/// A partition whose records wait: its state is not loaded yet, or a
/// record of it could not be taken. It stays paused meanwhile.
struct Blocked {
    /// The assignment the records were read in.
    generation: u64,
    kept: VecDeque<(i64, Vec<u8>)>,
    retry_at: Instant,
}

/// The loop's own state.
struct Loop {
    /// When the next Publish may be tried (after a failure).
    retry_at: Instant,
    /// Failed attempts in a row.
    attempt: u32,
    /// Whether the review partitions are paused for unpublished digests.
    holding: bool,
    blocked: HashMap<i32, Blocked>,
    pruned: Instant,
    /// When positions were last committed.
    committed: Instant,
    /// State records of published digests not yet acknowledged.
    unrecorded: Vec<(i32, String, Option<String>)>,
    shutdown: CancellationToken,
}

/// Reads one partition of the state topic to its end.
fn read_state(
    kafka: &crate::config::KafkaConfig,
    group: &str,
    topic: &str,
    p: i32,
) -> Result<State, String> {
    let consumer: BaseConsumer = crate::clients::kafka::state_reader_config(kafka, group)
        .create()
        .map_err(|e| format!("creating a reader: {e}"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, p, Duration::from_secs(10))
        .map_err(|e| format!("offsets of {topic}/{p}: {e}"))?;
    let mut out = State::default();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Beginning)
        .map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + LOAD_TIMEOUT;
    let position = position_key(p);
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "{topic}/{p} not read to its end ({high}) within {LOAD_TIMEOUT:?}"
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let value = m
                    .payload()
                    .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok());
                match m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                    Some(key) if key == position => {
                        if let Some(o) = value.and_then(|v| v["next_offset"].as_i64()) {
                            out.done_below = out.done_below.max(o);
                        }
                    }
                    Some(key) => match value.and_then(|v| v["alerted_at_ms"].as_i64()) {
                        Some(at) => {
                            out.alerted.insert(key.to_string(), at);
                        }
                        None => {
                            out.alerted.remove(key);
                        }
                    },
                    None => {}
                }
                if m.offset() + 1 >= high {
                    return Ok(out);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(out),
            Some(Err(e)) => tracing::debug!(error = %e, "alerts: reading the state topic"),
            None => {}
        }
    }
}
