//! Offset tracking: an input offset is committable only when every output
//! of its message is durable.
//!
//! Each consumed message gets an [`Ack`]. Clones travel with every image and
//! record the message produced; the sinks drop them only after Kafka (and SNS)
//! acknowledged the outputs. When the last clone is dropped the offset is
//! complete. Completion is out of order: per partition the committable
//! position is the lowest offset still pending, or one past the highest seen.
//! A failed output ([`Ack::fail`]) never completes: the position stays below
//! it, and the pipeline is told to stop so that a restart re-delivers it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    pending: BTreeSet<i64>,
    /// One past the highest offset begun.
    next: Option<i64>,
    /// Last position handed out for commit.
    sent: Option<i64>,
}

impl PartitionState {
    fn new(epoch: u64) -> PartitionState {
        PartitionState {
            epoch,
            pending: BTreeSet::new(),
            next: None,
            sent: None,
        }
    }

    fn position(&self) -> Option<i64> {
        self.pending.first().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
struct State {
    partitions: HashMap<i32, PartitionState>,
    next_epoch: u64,
}

/// Per-partition bookkeeping of in-flight input offsets.
pub struct Tracker {
    state: Mutex<State>,
    changed: Condvar,
    fatal: CancellationToken,
    fatal_reason: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Tracker> {
        Arc::new(Tracker {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the sets half-updated
        // in a way that loses data: at worst an offset stays pending.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancelled when an output failed for good; the pipeline stops.
    pub fn fatal(&self) -> &CancellationToken {
        &self.fatal
    }

    pub fn fatal_reason(&self) -> Option<String> {
        self.fatal_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts tracking a partition (on assignment); earlier state is dropped.
    pub fn assign(&self, partition: i32) {
        let mut st = self.lock();
        st.next_epoch += 1;
        let epoch = st.next_epoch;
        st.partitions.insert(partition, PartitionState::new(epoch));
    }

    /// Stops tracking a partition (on revocation); returns its committable position.
    pub fn revoke(&self, partition: i32) -> Option<i64> {
        let mut st = self.lock();
        st.partitions.remove(&partition).and_then(|p| p.position())
    }

    /// Registers a consumed message carrying `images` images; `permit` is
    /// released when the message completes. `None` when the partition is
    /// not assigned here (a message fetched before a revocation and
    /// delivered after it): it is left to the partition's new owner, and
    /// nothing may be committed for it from here.
    pub fn begin(
        self: &Arc<Self>,
        partition: i32,
        offset: i64,
        images: usize,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Option<Ack> {
        let epoch = {
            let mut st = self.lock();
            let p = st.partitions.get_mut(&partition)?;
            p.pending.insert(offset);
            p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
            p.epoch
        };
        self.metrics.in_flight.add(images as i64);
        Some(Ack(Arc::new(AckInner {
            tracker: self.clone(),
            partition,
            offset,
            epoch,
            images,
            failed: AtomicBool::new(false),
            started: Instant::now(),
            _permit: permit,
        })))
    }

    fn complete(&self, partition: i32, offset: i64, epoch: u64, failed: bool) {
        if failed {
            return;
        }
        let mut st = self.lock();
        if let Some(p) = st.partitions.get_mut(&partition) {
            if p.epoch == epoch {
                p.pending.remove(&offset);
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    fn record_failure(&self, partition: i32, offset: i64, why: &str) {
        let mut reason = self.fatal_reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(format!(
                "an output of partition {partition} offset {offset} failed: {why}"
            ));
        }
        drop(reason);
        self.fatal.cancel();
        self.changed.notify_all();
    }

    /// Positions (next offset to consume) that changed since last handed out.
    pub fn positions_to_commit(&self) -> Vec<(i32, i64)> {
        let mut st = self.lock();
        let mut out = Vec::new();
        for (&partition, p) in st.partitions.iter_mut() {
            if let Some(pos) = p.position() {
                if p.sent != Some(pos) {
                    p.sent = Some(pos);
                    out.push((partition, pos));
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Forget what was handed out for `partition` so that the next
    /// [`Tracker::positions_to_commit`] offers it again (after a failed commit).
    pub fn resend(&self, partition: i32) {
        if let Some(p) = self.lock().partitions.get_mut(&partition) {
            p.sent = None;
        }
    }

    /// Current committable positions of the given partitions (all if empty).
    pub fn positions(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        let st = self.lock();
        let mut out: Vec<(i32, i64)> = st
            .partitions
            .iter()
            .filter(|(p, _)| partitions.is_empty() || partitions.contains(p))
            .filter_map(|(&p, s)| s.position().map(|pos| (p, pos)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Offsets still pending in the given partitions (all if empty).
    pub fn pending(&self, partitions: &[i32]) -> usize {
        let st = self.lock();
        st.partitions
            .iter()
            .filter(|(p, _)| partitions.is_empty() || partitions.contains(p))
            .map(|(_, s)| s.pending.len())
            .sum()
    }

    /// Blocks until no offset of `partitions` (all if empty) is pending, a
    /// failure was recorded, or `timeout` passes. True if drained.
    pub fn wait_drained(&self, partitions: &[i32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let pending: usize = st
                .partitions
                .iter()
                .filter(|(p, _)| partitions.is_empty() || partitions.contains(p))
                .map(|(_, s)| s.pending.len())
                .sum();
            if pending == 0 {
                return true;
            }
            if self.fatal.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

struct AckInner {
    tracker: Arc<Tracker>,
    partition: i32,
    offset: i64,
    epoch: u64,
    images: usize,
    failed: AtomicBool,
    started: Instant,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for AckInner {
    fn drop(&mut self) {
        let failed = self.failed.load(Ordering::SeqCst);
        let m = &self.tracker.metrics;
        m.in_flight.sub(self.images as i64);
        if !failed {
            m.end_to_end.observe(self.started.elapsed().as_secs_f64());
        }
        self.tracker
            .complete(self.partition, self.offset, self.epoch, failed);
    }
}

/// Completion handle of one input message; clone it for every output.
#[derive(Clone)]
pub struct Ack(Arc<AckInner>);

impl Ack {
    /// An output of this message could not be made durable: its offset will
    /// never be committed, and the pipeline stops.
    pub fn fail(&self, why: &str) {
        if !self.0.failed.swap(true, Ordering::SeqCst) {
            self.0
                .tracker
                .record_failure(self.0.partition, self.0.offset, why);
        }
    }

    pub fn partition(&self) -> i32 {
        self.0.partition
    }

    pub fn offset(&self) -> i64 {
        self.0.offset
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ack({}@{})", self.0.partition, self.0.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Arc<Tracker> {
        Tracker::new(Arc::new(Metrics::new().unwrap()))
    }

    #[test]
    fn position_is_lowest_pending_under_out_of_order_completion() {
        let t = tracker();
        t.assign(0);
        let a = t.begin(0, 10, 1, None).unwrap();
        let b = t.begin(0, 11, 1, None).unwrap();
        let c = t.begin(0, 12, 1, None).unwrap();
        assert_eq!(t.positions(&[0]), vec![(0, 10)]);
        drop(c);
        assert_eq!(t.positions(&[0]), vec![(0, 10)]);
        drop(a);
        assert_eq!(t.positions(&[0]), vec![(0, 11)]);
        let b2 = b.clone();
        drop(b);
        assert_eq!(t.positions(&[0]), vec![(0, 11)], "a clone still holds it");
        drop(b2);
        assert_eq!(t.positions(&[0]), vec![(0, 13)]);
        assert_eq!(t.pending(&[]), 0);
    }

    #[test]
    fn failed_offset_is_never_passed_and_stops_the_pipeline() {
        let t = tracker();
        t.assign(3);
        let a = t.begin(3, 5, 1, None).unwrap();
        let b = t.begin(3, 6, 1, None).unwrap();
        a.fail("broker said no");
        drop(a);
        drop(b);
        assert_eq!(t.positions(&[3]), vec![(3, 5)]);
        assert!(t.fatal().is_cancelled());
        assert!(t.fatal_reason().unwrap().contains("offset 5"));
    }

    #[test]
    fn positions_to_commit_reports_changes_once() {
        let t = tracker();
        t.assign(1);
        let a = t.begin(1, 0, 1, None).unwrap();
        assert_eq!(t.positions_to_commit(), vec![(1, 0)]);
        assert_eq!(t.positions_to_commit(), vec![]);
        drop(a);
        assert_eq!(t.positions_to_commit(), vec![(1, 1)]);
        t.resend(1);
        assert_eq!(t.positions_to_commit(), vec![(1, 1)]);
    }

    #[test]
    fn messages_of_partitions_not_assigned_here_are_refused() {
        let t = tracker();
        assert!(t.begin(2, 0, 1, None).is_none());
        t.assign(2);
        assert!(t.begin(2, 0, 1, None).is_some());
        t.revoke(2);
        assert!(t.begin(2, 1, 1, None).is_none(), "after revocation");
        assert!(t.positions_to_commit().is_empty());
    }

    #[test]
    fn completions_from_an_earlier_assignment_are_ignored() {
        let t = tracker();
        t.assign(0);
        let old = t.begin(0, 7, 1, None).unwrap();
        assert_eq!(t.revoke(0), Some(7));
        t.assign(0);
        let new = t.begin(0, 7, 1, None).unwrap();
        drop(old);
        assert_eq!(t.positions(&[0]), vec![(0, 7)]);
        drop(new);
        assert_eq!(t.positions(&[0]), vec![(0, 8)]);
    }

    #[test]
    fn wait_drained_returns_when_the_last_ack_drops() {
        let t = tracker();
        t.assign(0);
        let a = t.begin(0, 1, 1, None).unwrap();
        assert!(!t.wait_drained(&[0], Duration::from_millis(10)));
        let h = std::thread::spawn(move || drop(a));
        assert!(t.wait_drained(&[0], Duration::from_secs(10)));
        h.join().unwrap();
    }
}
