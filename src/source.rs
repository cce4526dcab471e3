//! Source: the Kafka consumer's context — rebalances, commits and lag.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::ack::Tracker;
use crate::metrics::Metrics;

/// Consumer callbacks: drain and commit on revocation, track on assignment.
pub struct SourceContext {
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    pub topic: String,
    pub revoke_drain_timeout: Duration,
}

impl SourceContext {
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
                .wait_drained(partitions, self.revoke_drain_timeout)
        })
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
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[&partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
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
        let pending = self.tracker.pending(&partitions);
        let drained = pending == 0 || self.wait_drained(&partitions);
        let mut commit = TopicPartitionList::new();
        for &p in &partitions {
            if let Some(pos) = self.tracker.revoke(p) {
                let _ = commit.add_partition_offset(&self.topic, p, Offset::Offset(pos));
            }
        }
        tracing::info!(
            ?partitions,
            drained,
            in_flight = pending,
            "partitions revoked"
        );
        if commit.count() > 0 && !consumer.assignment_lost() {
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => record_committed(&self.metrics, &self.topic, &commit),
                Err(e) => {
                    self.metrics.commit_failures.inc();
                    tracing::warn!(error = %e, "commit on revocation failed; the next owner re-processes from the last commit");
                }
            }
        }
        self.metrics
            .assigned_partitions
            .sub(partitions.len() as i64);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions(tpl);
                for &p in &partitions {
                    self.tracker.assign(p);
                }
                self.metrics
                    .assigned_partitions
                    .add(partitions.len() as i64);
                tracing::info!(?partitions, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }

    // Commits are synchronous (see [`commit`]) and handled where they are
    // made; this only keeps the gauge right if librdkafka reports one too.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_ok() {
            record_committed(&self.metrics, &self.topic, offsets);
        }
    }
}

fn record_committed(metrics: &Metrics, topic: &str, offsets: &TopicPartitionList) {
    for e in offsets.elements_for_topic(topic) {
        if let Offset::Offset(o) = e.offset() {
            metrics
                .committed_offset
                .with_label_values(&[&e.partition().to_string()])
                .set(o);
        }
    }
}

/// Which positions [`commit`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Those that changed since they were last sent (the timer).
    Changed,
    /// All of them (shutdown).
    All,
}

/// Commits what the tracker says is complete.
///
/// Synchronously, so that the result is known here: rust-rdkafka does not
/// call `commit_callback` for manual asynchronous commits
/// (fede1024/rust-rdkafka#856), which would leave a failed commit unseen
/// until the position moved again. One round trip per
/// `kafka.commit_interval` is cheap.
pub fn commit<C: Consumer<SourceContext>>(
    consumer: &C,
    tracker: &Tracker,
    metrics: &Metrics,
    topic: &str,
    which: Positions,
) {
    let positions = match which {
        Positions::All => tracker.positions(&[]),
        Positions::Changed => tracker.positions_to_commit(),
    };
    if positions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, pos) in &positions {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*pos));
    }
    match blocking(|| consumer.commit(&tpl, CommitMode::Sync)) {
        Ok(()) => record_committed(metrics, topic, &tpl),
        Err(e) => {
            metrics.commit_failures.inc();
            tracing::warn!(error = %e, "offset commit failed; will retry");
            for (p, _) in positions {
                tracker.resend(p);
            }
        }
    }
}
