//! Source: the Kafka consumer's context (rebalances, lag, offset resets) and
//! the committer, the one thread that commits offsets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::metrics::Metrics;
use crate::pipeline::ack::Tracker;

/// The input consumer.
pub type InputConsumer = StreamConsumer<SourceContext>;

/// Consumer callbacks: drain and commit on revocation, track on assignment.
pub struct SourceContext {
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    pub topic: String,
    pub revoke_drain_timeout: Duration,
    pub commit_timeout: Duration,
    pub committer: Arc<Committer>,
    /// Set while the source keeps its partitions paused: partitions
    /// assigned meanwhile are paused too.
    pub paused: AtomicBool,
}

impl SourceContext {
    pub fn new(
        tracker: Arc<Tracker>,
        metrics: Arc<Metrics>,
        topic: String,
        revoke_drain_timeout: Duration,
        commit_timeout: Duration,
    ) -> SourceContext {
        SourceContext {
            committer: Committer::new(topic.clone(), metrics.clone()),
            tracker,
            metrics,
            topic,
            revoke_drain_timeout,
            commit_timeout,
            paused: AtomicBool::new(false),
        }
    }

    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }

    fn wait_drained(&self, partitions: &[i32]) -> bool {
        // The callback runs inside the consumer's poll on a runtime worker.
        blocking(|| {
            self.tracker
                .wait_drained(partitions, self.revoke_drain_timeout, true)
        })
    }

    fn forget(&self, partitions: &[i32]) {
        for p in partitions {
            let label = p.to_string();
            let _ = self.metrics.consumer_lag.remove_label_values(&[&label]);
            let _ = self.metrics.committed_offset.remove_label_values(&[&label]);
        }
    }
}

/// Runs blocking work on a runtime worker, letting a multi-thread runtime
/// move its other tasks off this thread meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .unwrap_or(false);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (partition, p) in &topic.partitions {
                // Only partitions assigned here: the statistics go on
                // listing partitions after they were revoked.
                if *partition >= 0 && p.consumer_lag >= 0 && self.tracker.is_assigned(*partition) {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[&partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // An offset reset caused by an error (typically: the committed
        // offset fell out of retention, so records were skipped) is only
        // a librdkafka log line; make it a metric and a warning of ours.
        let warning_or_worse = !matches!(
            level,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug
        );
        if fac == "OFFSET" && warning_or_worse && log_message.contains("offset reset") {
            self.metrics.offset_resets.inc();
            tracing::warn!(
                detail = log_message,
                "input offset reset by auto.offset.reset: records between the committed offset and the new position were not processed (retention?)"
            );
            return;
        }
        crate::clients::kafka::log(level, fac, log_message);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = self.partitions(tpl);
        if partitions.is_empty() {
            return;
        }
        let lost = consumer.assignment_lost();
        self.metrics
            .rebalances
            .with_label_values(&[if lost { "lost" } else { "revoke" }])
            .inc();
        let closing = self.tracker.is_closing();
        let pending = self.tracker.pending(&partitions);
        // Past the shutdown deadline there is nothing to wait for: what is
        // still in flight is abandoned (and pinned) already.
        let drained = pending == 0 || (!closing && !lost && self.wait_drained(&partitions));
        let positions: Vec<(i32, i64)> = partitions
            .iter()
            .filter_map(|&p| self.tracker.revoke(p).map(|pos| (p, pos)))
            .collect();
        tracing::info!(
            ?partitions,
            drained,
            in_flight = pending,
            lost,
            "partitions revoked"
        );
        self.forget(&partitions);
        self.metrics
            .assigned_partitions
            .sub(partitions.len() as i64);
        if positions.is_empty() || lost {
            return;
        }
        // Synchronously when possible (the next owner starts from here),
        // but never for longer than kafka.commit_timeout.
        let result = if closing {
            Err(CommitWait::Stopped)
        } else {
            blocking(|| {
                self.committer.commit_blocking(
                    positions.clone(),
                    self.commit_timeout,
                    &self.tracker,
                )
            })
        };
        match result {
            // The partitions' series are gone with them.
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.metrics.commit_failures.inc();
                tracing::warn!(error = %e, "commit on revocation failed; the next owner re-processes from the last commit");
            }
            Err(CommitWait::TimedOut) => {
                self.metrics.commit_failures.inc();
                tracing::warn!(timeout = ?self.commit_timeout, "commit on revocation unanswered; the next owner may re-process from the last commit");
            }
            Err(CommitWait::Stopped) => {
                // Closing: librdkafka sends it before the consumer is gone
                // (close waits for outstanding commits).
                let tpl = offsets_tpl(&self.topic, &positions);
                if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                    self.metrics.commit_failures.inc();
                    tracing::warn!(error = %e, "commit on close failed; the next owner re-processes from the last commit");
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions(tpl);
                for &p in &partitions {
                    self.tracker.assign(p);
                }
                self.metrics
                    .assigned_partitions
                    .add(partitions.len() as i64);
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                if self.paused.load(Ordering::SeqCst) && !partitions.is_empty() {
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::debug!(error = %e, "pausing newly assigned partitions failed");
                    }
                }
                tracing::info!(?partitions, "partitions assigned");
            }
            Rebalance::Error(e) => {
                // rust-rdkafka unassigns everything after a rebalance error.
                let gone = self.tracker.revoke_all();
                self.forget(&gone);
                self.metrics.assigned_partitions.set(0);
                tracing::warn!(error = %e, partitions = ?gone, "rebalance error; partitions dropped without a commit");
            }
            Rebalance::Revoke(_) => {}
        }
    }

    // Commits are synchronous (see [`Committer`]) and handled where they
    // are made; this only keeps the gauge right if librdkafka reports one.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_ok() {
            let positions: Vec<(i32, i64)> = offsets
                .elements_for_topic(&self.topic)
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) if self.tracker.is_assigned(e.partition()) => {
                        Some((e.partition(), o))
                    }
                    _ => None,
                })
                .collect();
            record_committed(&self.metrics, &positions);
        }
    }
}

/// Sets the committed-offset gauges.
pub fn record_committed(metrics: &Metrics, positions: &[(i32, i64)]) {
    for (p, o) in positions {
        metrics
            .committed_offset
            .with_label_values(&[&p.to_string()])
            .set(*o);
    }
}

fn offsets_tpl(topic: &str, positions: &[(i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (p, pos) in positions {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*pos));
    }
    tpl
}

/// Why a blocking commit returned without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitWait {
    /// No answer within the timeout (the commit may still land later).
    TimedOut,
    /// The committer was stopped (shutdown).
    Stopped,
}

struct Request {
    positions: Vec<(i32, i64)>,
    reply: Reply,
    /// A request still queued after this is dropped unsent: whoever asked
    /// stopped waiting, and a late commit could move the group's offset
    /// back behind a newer owner's.
    expires: Option<std::time::Instant>,
}

enum Reply {
    Async(tokio::sync::oneshot::Sender<KafkaResult<()>>),
    Blocking(std::sync::mpsc::SyncSender<KafkaResult<()>>),
}

/// Commits offsets on a thread of its own, one commit at a time.
///
/// librdkafka's synchronous commit is the only one whose result rust-rdkafka
/// reports (fede1024/rust-rdkafka#856), and it waits without a limit
/// (`rd_kafka_commit` waits for its reply with `RD_POLL_INFINITE`); while
/// the group coordinator is unreachable that can be a long time. On this
/// thread it never blocks consumption or the runtime: the source awaits the
/// answer alongside everything else, and a rebalance or the shutdown waits
/// for it at most `kafka.commit_timeout`.
pub struct Committer {
    topic: String,
    metrics: Arc<Metrics>,
    worker: Mutex<Option<std::sync::mpsc::Sender<Request>>>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Committer {
    fn new(topic: String, metrics: Arc<Metrics>) -> Arc<Committer> {
        Arc::new(Committer {
            topic,
            metrics,
            worker: Mutex::new(None),
            handle: Mutex::new(None),
        })
    }

    /// Starts the commit thread for `consumer` (whose context holds this).
    pub fn start(&self, consumer: &Arc<InputConsumer>) -> std::io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let consumer = consumer.clone();
        let topic = self.topic.clone();
        let handle = std::thread::Builder::new()
            .name("inferstream-commit".into())
            .spawn(move || {
                while let Ok(req) = rx.recv() {
                    if req.expires.is_some_and(|t| std::time::Instant::now() >= t) {
                        continue;
                    }
                    let tpl = offsets_tpl(&topic, &req.positions);
                    let result = consumer.commit(&tpl, CommitMode::Sync);
                    match req.reply {
                        Reply::Async(tx) => {
                            let _ = tx.send(result);
                        }
                        Reply::Blocking(tx) => {
                            let _ = tx.try_send(result);
                        }
                    }
                }
            })?;
        *self.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    fn submit(
        &self,
        positions: Vec<(i32, i64)>,
        reply: Reply,
        expires: Option<std::time::Instant>,
    ) -> bool {
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        match worker.as_ref() {
            Some(tx) => tx
                .send(Request {
                    positions,
                    reply,
                    expires,
                })
                .is_ok(),
            None => false,
        }
    }

    /// Sends a commit; the answer comes on the returned channel. `None`
    /// when the committer is stopped.
    pub fn commit(
        &self,
        positions: Vec<(i32, i64)>,
    ) -> Option<tokio::sync::oneshot::Receiver<KafkaResult<()>>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(positions, Reply::Async(tx), None).then_some(rx)
    }

    /// Commits and waits for the answer, at most `timeout`, and no longer
    /// once a stop is asked for (a revocation must not hold the shutdown).
    pub fn commit_blocking(
        &self,
        positions: Vec<(i32, i64)>,
        timeout: Duration,
        tracker: &Tracker,
    ) -> Result<KafkaResult<()>, CommitWait> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + timeout;
        if !self.submit(positions, Reply::Blocking(tx), Some(deadline)) {
            return Err(CommitWait::Stopped);
        }
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(r) => return Ok(r),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(CommitWait::Stopped)
                }
            }
            if std::time::Instant::now() >= deadline || tracker.stop_requested_at().is_some() {
                return Err(CommitWait::TimedOut);
            }
        }
    }

    /// Stops taking commits; the thread ends after the one it is making.
    /// Returns the thread, to be joined (it holds the consumer).
    pub fn stop(&self) -> Option<std::thread::JoinHandle<()>> {
        self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.handle.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Metrics of a finished commit; on failure the positions are offered
    /// again with the next one.
    pub fn settle(&self, tracker: &Tracker, positions: &[(i32, i64)], result: KafkaResult<()>) {
        match result {
            Ok(()) => {
                // Not for partitions revoked meanwhile: their series are gone.
                let still: Vec<(i32, i64)> = positions
                    .iter()
                    .copied()
                    .filter(|(p, _)| tracker.is_assigned(*p))
                    .collect();
                record_committed(&self.metrics, &still);
            }
            Err(e) => {
                self.metrics.commit_failures.inc();
                tracing::warn!(error = %e, "offset commit failed; the positions go again with the next commit (or are re-delivered after a restart)");
                for (p, _) in positions {
                    tracker.resend(*p);
                }
            }
        }
    }
}
