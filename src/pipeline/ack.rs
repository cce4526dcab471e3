//! Offset tracking: an input offset is committable only when every output
//! of its message is durable.
//!
//! Each consumed message gets an [`Ack`]. Clones travel with every image and
//! record the message produced, and every clone must be finished on purpose:
//! [`Ack::done`] once its output is durable (Kafka, and SNS where it
//! applies), [`Ack::fail`] when it cannot be made durable. The offset is
//! complete when every clone is done. Completion is out of order: per
//! partition the committable position is the lowest offset still pending,
//! or one past the highest seen.
//!
//! An offset with a failed clone never completes: the position stays below
//! it, and the pipeline is told to stop so that a restart re-delivers it. A
//! clone dropped without an outcome (a task aborted at the shutdown
//! deadline, a panic, a closed channel) pins its offset the same way: it
//! never counts as done. Outside shutdown that is a defect, and it stops the
//! pipeline too; after [`Tracker::close`] it is the expected end of work
//! abandoned at the deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    /// Offsets in flight, with how many times each (the same offset can
    /// be delivered again after a rewind).
    pending: BTreeMap<i64, u32>,
    /// One past the highest offset begun.
    next: Option<i64>,
    /// Last position handed out for commit.
    sent: Option<i64>,
}

impl PartitionState {
    fn new(epoch: u64) -> PartitionState {
        PartitionState {
            epoch,
            pending: BTreeMap::new(),
            next: None,
            sent: None,
        }
    }

    fn position(&self) -> Option<i64> {
        // Normally the lowest pending offset is below `next`; after a rewind
        // an offset still in flight from before may be above it.
        self.next
            .map(|n| self.pending.keys().next().map_or(n, |&p| p.min(n)))
    }
}

#[derive(Debug, Default)]
struct State {
    partitions: HashMap<i32, PartitionState>,
    next_epoch: u64,
}

impl State {
    /// Messages in flight in `partitions` (all if empty).
    fn pending(&self, partitions: &[i32]) -> usize {
        self.partitions
            .iter()
            .filter(|(p, _)| partitions.is_empty() || partitions.contains(p))
            .map(|(_, s)| s.pending.values().map(|n| *n as usize).sum::<usize>())
            .sum()
    }
}

/// Per-partition bookkeeping of in-flight input offsets.
pub struct Tracker {
    state: Mutex<State>,
    changed: Condvar,
    fatal: CancellationToken,
    fatal_reason: Mutex<Option<String>>,
    closing: AtomicBool,
    /// When a stop (SIGTERM, a fatal failure) was asked for.
    stop_requested: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Tracker> {
        Arc::new(Tracker {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            closing: AtomicBool::new(false),
            stop_requested: Mutex::new(None),
            metrics,
        })
    }

    /// A stop was asked for: waits made on behalf of a rebalance end now
    /// (the shutdown's own budget takes over).
    pub fn request_stop(&self) {
        let mut at = self
            .stop_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        at.get_or_insert_with(Instant::now);
        drop(at);
        self.wake_waiters();
    }

    /// Wakes [`Tracker::wait_drained`] after a flag outside `state`
    /// changed: notifying under the `state` lock, so that a waiter between
    /// its check and its wait cannot miss it.
    fn wake_waiters(&self) {
        let _st = self.lock();
        self.changed.notify_all();
    }

    /// When a stop was asked for, if it was.
    pub fn stop_requested_at(&self) -> Option<Instant> {
        *self
            .stop_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The service is past its drain: work still in flight is abandoned.
    /// From now on an unfinished [`Ack`] pins its offset without stopping
    /// anything, and revocations commit without waiting.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.wake_waiters();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Whether `partition` is assigned here.
    pub fn is_assigned(&self, partition: i32) -> bool {
        self.lock().partitions.contains_key(&partition)
    }

    /// Whether `partition` is still assigned here in the assignment `epoch`.
    fn is_current(&self, partition: i32, epoch: u64) -> bool {
        self.lock()
            .partitions
            .get(&partition)
            .is_some_and(|p| p.epoch == epoch)
    }

    /// Stops the pipeline: something that must not happen did.
    pub fn fail_pipeline(&self, why: String) {
        let mut reason = self.fatal_reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(why);
        }
        drop(reason);
        self.fatal.cancel();
        self.wake_waiters();
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

    /// Forgets every partition (the assignment was dropped on an error);
    /// returns them.
    pub fn revoke_all(&self) -> Vec<i32> {
        let mut st = self.lock();
        let gone: Vec<i32> = st.partitions.keys().copied().collect();
        st.partitions.clear();
        gone
    }

    /// The current assignment of `partition` here, if it is assigned.
    pub fn epoch(&self, partition: i32) -> Option<u64> {
        self.lock().partitions.get(&partition).map(|p| p.epoch)
    }

    /// Registers a message consumed in assignment `epoch` carrying `images`
    /// images; `permit` is released when the message completes. `None`
    /// when the partition is no longer assigned here in that assignment (a
    /// message fetched before a revocation and handed on after it): it is
    /// left to the partition's new owner, and nothing may be committed for
    /// it from here.
    pub fn begin(
        self: &Arc<Self>,
        partition: i32,
        offset: i64,
        epoch: u64,
        images: usize,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Option<Ack> {
        {
            let mut st = self.lock();
            let p = st.partitions.get_mut(&partition)?;
            if p.epoch != epoch {
                return None;
            }
            *p.pending.entry(offset).or_insert(0) += 1;
            // Offsets grow within an assignment, unless the consumer was
            // rewound (an offset reset, a truncated log): then the records
            // from here on are the ones to account for, and the position
            // must not jump past them to the highest offset seen before.
            p.next = Some(offset + 1);
        }
        self.metrics.in_flight.add(images as i64);
        Some(Ack {
            inner: Arc::new(AckInner {
                tracker: self.clone(),
                partition,
                offset,
                epoch,
                images,
                outcome: AtomicU8::new(PENDING),
                started: Instant::now(),
                _permit: permit,
            }),
            finished: false,
        })
    }

    fn complete(&self, partition: i32, offset: i64, epoch: u64) {
        let mut st = self.lock();
        if let Some(p) = st.partitions.get_mut(&partition) {
            if p.epoch == epoch {
                if let Some(n) = p.pending.get_mut(&offset) {
                    *n -= 1;
                    if *n == 0 {
                        p.pending.remove(&offset);
                    }
                }
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    fn record_failure(&self, partition: i32, offset: i64, why: &str) {
        self.fail_pipeline(format!(
            "an output of partition {partition} offset {offset} failed: {why}"
        ));
    }

    /// A clone of an [`Ack`] was dropped without an outcome.
    fn dropped_unfinished(&self, partition: i32, offset: i64, epoch: u64) {
        if self.is_closing() || self.fatal.is_cancelled() || !self.is_current(partition, epoch) {
            tracing::debug!(
                partition,
                offset,
                "in-flight work abandoned; its offset stays uncommitted"
            );
            return;
        }
        tracing::error!(
            partition,
            offset,
            "an image was dropped before its output was durable; stopping so that a restart re-delivers it"
        );
        self.fail_pipeline(format!(
            "partition {partition} offset {offset}: work was dropped before its output was durable"
        ));
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
        self.lock().pending(partitions)
    }

    /// Blocks until no offset of `partitions` (all if empty) is pending, a
    /// failure was recorded, or `timeout` passes; with `until_stop`, also
    /// when a stop is asked for. True if drained.
    pub fn wait_drained(&self, partitions: &[i32], timeout: Duration, until_stop: bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.pending(partitions) == 0 {
                return true;
            }
            if self.fatal.is_cancelled()
                || self.is_closing()
                || (until_stop && self.stop_requested_at().is_some())
            {
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

/// Every clone finished with [`Ack::done`] so far.
const PENDING: u8 = 0;
/// A clone failed or was dropped unfinished: the offset never completes.
const PINNED: u8 = 1;

struct AckInner {
    tracker: Arc<Tracker>,
    partition: i32,
    offset: i64,
    epoch: u64,
    images: usize,
    outcome: AtomicU8,
    started: Instant,
    _permit: Option<OwnedSemaphorePermit>,
}

impl AckInner {
    fn pin(&self) -> bool {
        self.outcome.swap(PINNED, Ordering::SeqCst) == PENDING
    }
}

impl Drop for AckInner {
    fn drop(&mut self) {
        let m = &self.tracker.metrics;
        m.in_flight.sub(self.images as i64);
        if self.outcome.load(Ordering::SeqCst) == PINNED {
            return;
        }
        m.end_to_end.observe(self.started.elapsed().as_secs_f64());
        self.tracker
            .complete(self.partition, self.offset, self.epoch);
    }
}

/// Completion handle of one input message; clone it for every output and
/// finish each clone with [`Ack::done`], [`Ack::fail`] or [`Ack::abandon`].
pub struct Ack {
    inner: Arc<AckInner>,
    finished: bool,
}

impl Clone for Ack {
    fn clone(&self) -> Ack {
        Ack {
            inner: self.inner.clone(),
            finished: false,
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.finished {
            let i = &self.inner;
            i.pin();
            i.tracker.dropped_unfinished(i.partition, i.offset, i.epoch);
        }
    }
}

impl Ack {
    /// This clone's output is durable (or it had none left to make).
    pub fn done(mut self) {
        self.finished = true;
    }

    /// An output of this message could not be made durable: its offset will
    /// never be committed, and the pipeline stops.
    pub fn fail(mut self, why: &str) {
        self.finished = true;
        if self.inner.pin() {
            self.inner
                .tracker
                .record_failure(self.inner.partition, self.inner.offset, why);
        }
    }

    /// This clone's output will not be made, on purpose (shutdown, or its
    /// partition was revoked): the offset stays uncommitted and is
    /// re-delivered, and nothing stops.
    pub fn abandon(mut self) {
        self.finished = true;
        self.inner.pin();
    }

    pub fn partition(&self) -> i32 {
        self.inner.partition
    }

    pub fn offset(&self) -> i64 {
        self.inner.offset
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ack({}@{})", self.inner.partition, self.inner.offset)
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
        let a = t.begin(0, 10, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        let b = t.begin(0, 11, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        let c = t.begin(0, 12, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        assert_eq!(t.positions(&[0]), vec![(0, 10)]);
        c.done();
        assert_eq!(t.positions(&[0]), vec![(0, 10)]);
        a.done();
        assert_eq!(t.positions(&[0]), vec![(0, 11)]);
        let b2 = b.clone();
        b.done();
        assert_eq!(t.positions(&[0]), vec![(0, 11)], "a clone still holds it");
        b2.done();
        assert_eq!(t.positions(&[0]), vec![(0, 13)]);
        assert_eq!(t.pending(&[]), 0);
    }

    #[test]
    fn failed_offset_is_never_passed_and_stops_the_pipeline() {
        let t = tracker();
        t.assign(3);
        let a = t.begin(3, 5, t.epoch(3).unwrap_or(0), 1, None).unwrap();
        let a2 = a.clone();
        let b = t.begin(3, 6, t.epoch(3).unwrap_or(0), 1, None).unwrap();
        a.fail("broker said no");
        a2.done();
        b.done();
        assert_eq!(t.positions(&[3]), vec![(3, 5)]);
        assert!(t.fatal().is_cancelled());
        assert!(t.fatal_reason().unwrap().contains("offset 5"));
    }

    #[test]
    fn positions_to_commit_reports_changes_once() {
        let t = tracker();
        t.assign(1);
        let a = t.begin(1, 0, t.epoch(1).unwrap_or(0), 1, None).unwrap();
        assert_eq!(t.positions_to_commit(), vec![(1, 0)]);
        assert_eq!(t.positions_to_commit(), vec![]);
        a.done();
        assert_eq!(t.positions_to_commit(), vec![(1, 1)]);
        t.resend(1);
        assert_eq!(t.positions_to_commit(), vec![(1, 1)]);
    }

    #[test]
    fn messages_of_partitions_not_assigned_here_are_refused() {
        let t = tracker();
        assert!(t.begin(2, 0, t.epoch(2).unwrap_or(0), 1, None).is_none());
        t.assign(2);
        assert!(t.begin(2, 0, t.epoch(2).unwrap_or(0), 1, None).is_some());
        t.revoke(2);
        assert!(
            t.begin(2, 1, t.epoch(2).unwrap_or(0), 1, None).is_none(),
            "after revocation"
        );
        assert!(t.positions_to_commit().is_empty());
    }

    #[test]
    fn completions_from_an_earlier_assignment_are_ignored() {
        let t = tracker();
        t.assign(0);
        let old = t.begin(0, 7, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        assert_eq!(t.revoke(0), Some(7));
        t.assign(0);
        let new = t.begin(0, 7, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        old.done();
        assert_eq!(t.positions(&[0]), vec![(0, 7)]);
        new.done();
        assert_eq!(t.positions(&[0]), vec![(0, 8)]);
    }

    #[test]
    fn wait_drained_returns_when_the_last_ack_drops() {
        let t = tracker();
        t.assign(0);
        let a = t.begin(0, 1, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        assert!(!t.wait_drained(&[0], Duration::from_millis(10), true));
        let h = std::thread::spawn(move || a.done());
        assert!(t.wait_drained(&[0], Duration::from_secs(10), true));
        h.join().unwrap();
    }

    #[test]
    fn an_ack_dropped_unfinished_pins_its_offset_and_stops_the_pipeline() {
        let t = tracker();
        t.assign(0);
        let a = t.begin(0, 3, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        let a2 = a.clone();
        let b = t.begin(0, 4, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        a.done();
        drop(a2);
        b.done();
        assert_eq!(t.positions(&[0]), vec![(0, 3)], "3 is never passed");
        assert!(t.fatal().is_cancelled());
        assert!(t.fatal_reason().unwrap().contains("offset 3"));
    }

    #[test]
    fn after_close_unfinished_acks_pin_without_stopping_anything() {
        let t = tracker();
        t.assign(0);
        let a = t.begin(0, 3, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        let b = t.begin(0, 4, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        b.done();
        t.close();
        drop(a);
        assert_eq!(t.positions(&[0]), vec![(0, 3)]);
        assert!(!t.fatal().is_cancelled());
        assert_eq!(
            t.revoke(0),
            Some(3),
            "what the close-time revocation commits"
        );
    }

    #[test]
    fn a_stop_ends_a_rebalance_wait_but_not_the_shutdown_drain() {
        let t = tracker();
        t.assign(0);
        let a = t.begin(0, 1, t.epoch(0).unwrap(), 1, None).unwrap();
        t.request_stop();
        let started = Instant::now();
        assert!(!t.wait_drained(&[0], Duration::from_secs(30), true));
        assert!(started.elapsed() < Duration::from_secs(5));
        let h = std::thread::spawn(move || a.done());
        assert!(t.wait_drained(&[0], Duration::from_secs(30), false));
        h.join().unwrap();
    }

    #[test]
    fn a_stop_right_before_a_wait_is_not_missed() {
        // The stop may come between the waiter's check and its wait; it
        // must still wake it (review of issue #10: a lost wakeup).
        for _ in 0..300 {
            let t = tracker();
            t.assign(0);
            let a = t.begin(0, 1, t.epoch(0).unwrap(), 1, None).unwrap();
            let t2 = t.clone();
            let waiter = std::thread::spawn(move || {
                let started = Instant::now();
                t2.wait_drained(&[0], Duration::from_secs(5), true);
                started.elapsed()
            });
            t.request_stop();
            let waited = waiter.join().unwrap();
            assert!(waited < Duration::from_secs(2), "waited {waited:?}");
            a.abandon();
        }
    }

    #[test]
    fn a_rewound_partition_is_not_committed_past_its_new_records() {
        let t = tracker();
        t.assign(0);
        let e = t.epoch(0).unwrap();
        for o in 100..120 {
            t.begin(0, o, e, 1, None).unwrap().done();
        }
        assert_eq!(t.positions(&[0]), vec![(0, 120)]);
        // The consumer is rewound to 110 (offset reset, truncated log).
        let again = t.begin(0, 110, e, 1, None).unwrap();
        assert_eq!(t.positions(&[0]), vec![(0, 110)]);
        again.done();
        assert_eq!(
            t.positions(&[0]),
            vec![(0, 111)],
            "111..120 are to be read again"
        );
        // An offset above the rewind point still in flight (delivered
        // before a second rewind) does not let the position jump past the
        // records after the rewind point.
        let old = t.begin(0, 119, e, 1, None).unwrap();
        t.begin(0, 111, e, 1, None).unwrap().done();
        assert_eq!(t.positions(&[0]), vec![(0, 112)]);
        old.done();
        // The same offset twice in flight: both must finish.
        let a = t.begin(0, 111, e, 1, None).unwrap();
        let b = t.begin(0, 111, e, 1, None).unwrap();
        a.done();
        assert_eq!(t.positions(&[0]), vec![(0, 111)]);
        b.done();
        assert_eq!(t.positions(&[0]), vec![(0, 112)]);
    }

    #[test]
    fn only_completed_work_is_timed_end_to_end() {
        let t = tracker();
        t.assign(0);
        let e = t.epoch(0).unwrap();
        t.begin(0, 1, e, 1, None).unwrap().done();
        t.begin(0, 2, e, 1, None).unwrap().abandon();
        t.begin(0, 3, e, 1, None).unwrap().fail("no");
        assert_eq!(t.metrics.end_to_end.get_sample_count(), 1);
        assert_eq!(t.metrics.in_flight.get(), 0);
    }

    #[test]
    fn abandoned_and_revoked_acks_pin_without_stopping_anything() {
        let t = tracker();
        t.assign(0);
        let a = t.begin(0, 3, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        let b = t.begin(0, 4, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        a.abandon();
        b.done();
        assert_eq!(t.positions(&[0]), vec![(0, 3)]);
        assert!(!t.fatal().is_cancelled());
        let c = t.begin(0, 5, t.epoch(0).unwrap_or(0), 1, None).unwrap();
        t.revoke(0);
        drop(c);
        assert!(
            !t.fatal().is_cancelled(),
            "a revoked partition's work may be dropped"
        );
    }
}
