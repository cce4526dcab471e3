//! A circuit breaker for the endpoint: a dead endpoint is probed, not
//! hammered, and images wait for it instead of failing.
//!
//! Closed: calls go through. After `failures` consecutive retryable failures
//! it opens: calls wait. When the open period ends, one call goes through as
//! a probe (half-open); its success closes the breaker and wakes everyone,
//! its failure opens it again for twice as long, up to a maximum. Images
//! waiting on an open breaker keep their place in flight, so the in-flight
//! bound fills up and consumption pauses until the endpoint is back.
//!
//! A systemic failure (credentials refused, the endpoint unknown) opens it
//! at once ([`Breaker::trip`]): one such answer says every call would fail.
//!
//! A call whose probe failed steps aside ([`Breaker::pass_over`]): while a
//! call waits whose probe has not failed, that one probes next. Otherwise
//! images the model cannot take, probing before anything has succeeded,
//! could take every probe for ever and the images behind them would never
//! be tried. When every waiting call has failed a probe (an outage), one of
//! them probes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, period: Duration },
    HalfOpen { period: Duration },
}

pub struct Breaker {
    state: Mutex<State>,
    changed: Notify,
    failures: u32,
    open_initial: Duration,
    open_max: Duration,
    on_change: Box<dyn Fn(bool) + Send + Sync>,
    /// Who waits, and whose probes failed since the last success.
    turns: Mutex<Turns>,
}

#[derive(Default)]
struct Turns {
    /// Calls waiting in `admit`, by caller (how many under each id).
    waiting: HashMap<u64, usize>,
    /// Calls whose probe failed since the last success.
    passed_over: HashSet<u64>,
}

/// Failed probers remembered at most (a call that ended leaves its id
/// until the next success).
const MAX_PASSED_OVER: usize = 10_000;

/// Counts a call as waiting while it is in `admit`; when it leaves, the
/// others look again (it may have been the one a passed-over call waited
/// for).
struct Waiting<'a> {
    breaker: &'a Breaker,
    caller: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        {
            let mut turns = self.breaker.turns();
            if let Some(n) = turns.waiting.get_mut(&self.caller) {
                *n -= 1;
                if *n == 0 {
                    turns.waiting.remove(&self.caller);
                }
            }
        }
        self.breaker.changed.notify_waiters();
    }
}

/// What [`Breaker::admit`] allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed.
    Normal,
    /// This call is the probe of a half-open breaker.
    Probe,
}

impl Breaker {
    /// `on_change(open)` is called on every transition between closed and
    /// not closed (for a gauge and readiness).
    pub fn new(
        failures: u32,
        open_initial: Duration,
        open_max: Duration,
        on_change: impl Fn(bool) + Send + Sync + 'static,
    ) -> Arc<Breaker> {
        Arc::new(Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            changed: Notify::new(),
            failures: failures.max(1),
            open_initial,
            open_max: open_max.max(open_initial),
            on_change: Box::new(on_change),
            turns: Mutex::new(Turns::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn turns(&self) -> std::sync::MutexGuard<'_, Turns> {
        self.turns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        matches!(*self.lock(), State::Closed { .. })
    }

    /// Waits until a call may go through.
    pub async fn admit(&self) -> Admission {
        self.admit_as(u64::MAX).await
    }

    /// As [`Breaker::admit`] for the call `caller` (see
    /// [`Breaker::pass_over`]).
    pub async fn admit_as(&self, caller: u64) -> Admission {
        *self.turns().waiting.entry(caller).or_default() += 1;
        let _waiting = Waiting {
            breaker: self,
            caller,
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut st = self.lock();
                match *st {
                    State::Closed { .. } => return Admission::Normal,
                    State::Open { until, period } if Instant::now() >= until => {
                        let turns = self.turns();
                        let fresh_waits = turns
                            .waiting
                            .keys()
                            .any(|c| *c != caller && !turns.passed_over.contains(c));
                        if turns.passed_over.contains(&caller) && fresh_waits {
                            // A call whose probe has not failed waits: it
                            // probes this time. Looked at again after a
                            // period at the latest.
                            Some(Instant::now() + self.open_initial)
                        } else {
                            *st = State::HalfOpen { period };
                            return Admission::Probe;
                        }
                    }
                    State::Open { until, .. } => Some(until),
                    State::HalfOpen { .. } => None,
                }
            };
            match wait_until {
                Some(until) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// The probe of `caller` failed and it will try again: calls waiting
    /// whose probes have not failed go first.
    pub fn pass_over(&self, caller: u64) {
        let mut turns = self.turns();
        if turns.passed_over.len() >= MAX_PASSED_OVER {
            turns.passed_over.clear();
        }
        turns.passed_over.insert(caller);
    }

    /// The endpoint answered (even with a rejection): close.
    pub fn success(&self) {
        let was_closed = {
            let mut st = self.lock();
            let was = matches!(*st, State::Closed { .. });
            *st = State::Closed { failures: 0 };
            was
        };
        self.turns().passed_over.clear();
        if !was_closed {
            tracing::info!("endpoint answered again; circuit closed");
            (self.on_change)(false);
            self.changed.notify_waiters();
        }
    }

    /// A failure that every call would meet (`cause` says which): open now,
    /// whatever the count. Logged once per opening, with the cause.
    pub fn trip(&self, admission: Admission, cause: &str) {
        let opened = {
            let mut st = self.lock();
            match *st {
                State::Closed { .. } => {
                    *st = State::Open {
                        until: Instant::now() + self.open_initial,
                        period: self.open_initial,
                    };
                    true
                }
                State::HalfOpen { period } if admission == Admission::Probe => {
                    let period = (period * 2).min(self.open_max);
                    *st = State::Open {
                        until: Instant::now() + period,
                        period,
                    };
                    false
                }
                State::Open { .. } | State::HalfOpen { .. } => false,
            }
        };
        if opened {
            tracing::warn!(
                cause,
                "the endpoint refuses every call ({cause}); images wait with the circuit open until it is fixed (check IAM permissions, credentials, endpoint.name)"
            );
            (self.on_change)(true);
        }
        self.changed.notify_waiters();
    }

    /// A retryable failure. True when the breaker is (now) not closed, so
    /// the caller should wait for it rather than count the attempt.
    pub fn failure(&self, admission: Admission) -> bool {
        let opened = {
            let mut st = self.lock();
            match *st {
                State::Closed { failures } if failures + 1 >= self.failures => {
                    *st = State::Open {
                        until: Instant::now() + self.open_initial,
                        period: self.open_initial,
                    };
                    Some(self.open_initial)
                }
                State::Closed { failures } => {
                    *st = State::Closed {
                        failures: failures + 1,
                    };
                    return false;
                }
                State::HalfOpen { period } if admission == Admission::Probe => {
                    let period = (period * 2).min(self.open_max);
                    *st = State::Open {
                        until: Instant::now() + period,
                        period,
                    };
                    None
                }
                // A call admitted before the breaker opened, failing late.
                State::Open { .. } | State::HalfOpen { .. } => return true,
            }
        };
        if let Some(period) = opened {
            tracing::warn!(
                failures = self.failures,
                probe_in = ?period,
                "endpoint failing; circuit open, images wait and the endpoint is probed"
            );
            (self.on_change)(true);
        }
        self.changed.notify_waiters();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn breaker() -> (Arc<Breaker>, Arc<AtomicBool>) {
        let open = Arc::new(AtomicBool::new(false));
        let o = open.clone();
        let b = Breaker::new(
            3,
            Duration::from_secs(1),
            Duration::from_secs(4),
            move |v| o.store(v, Ordering::Relaxed),
        );
        (b, open)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_once() {
        let (b, open) = breaker();
        assert_eq!(b.admit().await, Admission::Normal);
        assert!(!b.failure(Admission::Normal));
        assert!(!b.failure(Admission::Normal));
        assert!(b.failure(Admission::Normal), "third failure opens");
        assert!(open.load(Ordering::Relaxed));

        // Two callers wait; after the open period exactly one probes.
        let started = Instant::now();
        let first = b.admit().await;
        assert_eq!(first, Admission::Probe);
        assert!(started.elapsed() >= Duration::from_secs(1));
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.admit().await });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished(), "no second probe while one is out");

        // The probe fails: open again, twice as long.
        assert!(b.failure(Admission::Probe));
        let again = Instant::now();
        assert_eq!(waiter.await.unwrap(), Admission::Probe);
        assert!(again.elapsed() >= Duration::from_secs(2));

        // Success closes and lets everyone through.
        b.success();
        assert!(!open.load(Ordering::Relaxed));
        assert_eq!(b.admit().await, Admission::Normal);
    }

    /// A call that probes until it gets through: a `bad` one fails every
    /// probe (an image the model cannot take), a good one closes the
    /// breaker with its first.
    async fn call(b: Arc<Breaker>, id: u64, bad: bool) -> u64 {
        loop {
            if b.admit_as(id).await == Admission::Probe {
                if bad {
                    b.failure(Admission::Probe);
                    b.pass_over(id);
                    continue;
                }
                b.success();
            }
            return id;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_whose_probes_failed_let_a_waiting_call_probe_next() {
        let (b, _) = breaker();
        for _ in 0..3 {
            b.failure(Admission::Normal);
        }
        // Two images the model cannot take wait first, in one task (as
        // bisection's halves do), then a good one: it gets a probe.
        let done = tokio::time::timeout(Duration::from_secs(600), async {
            futures::join!(
                call(b.clone(), 1, true),
                call(b.clone(), 2, true),
                call(b.clone(), 3, false)
            )
        })
        .await;
        assert_eq!(done.ok(), Some((1, 2, 3)), "the good call never probed");
        assert!(b.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn alone_a_call_whose_probe_failed_still_probes() {
        let (b, _) = breaker();
        for _ in 0..3 {
            b.failure(Admission::Normal);
        }
        b.pass_over(1);
        let got = tokio::time::timeout(Duration::from_secs(60), b.admit_as(1)).await;
        assert_eq!(got.ok(), Some(Admission::Probe));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_stepped_aside_probes_when_the_other_leaves() {
        let (b, _) = breaker();
        for _ in 0..3 {
            b.failure(Admission::Normal);
        }
        b.pass_over(1);
        // Another call waits, then goes away before the period ends.
        let mut other = Box::pin(b.admit_as(2));
        assert!(futures::poll!(other.as_mut()).is_pending());
        let b1 = b.clone();
        let first = tokio::spawn(async move { b1.admit_as(1).await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(other);
        let got = tokio::time::timeout(Duration::from_secs(60), first).await;
        assert_eq!(got.ok().and_then(Result::ok), Some(Admission::Probe));
    }

    #[tokio::test(start_paused = true)]
    async fn a_systemic_failure_opens_at_once() {
        let (b, open) = breaker();
        b.trip(Admission::Normal, "AccessDeniedException");
        assert!(open.load(Ordering::Relaxed));
        let a = b.admit().await;
        assert_eq!(a, Admission::Probe);
        b.trip(a, "AccessDeniedException");
        assert!(!b.is_closed(), "a failed probe keeps it open");
        b.success();
        assert!(!open.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let (b, open) = breaker();
        b.failure(Admission::Normal);
        b.failure(Admission::Normal);
        b.success();
        b.failure(Admission::Normal);
        b.failure(Admission::Normal);
        assert!(!open.load(Ordering::Relaxed));
        assert!(b.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_period_is_capped() {
        let (b, _) = breaker();
        for _ in 0..3 {
            b.failure(Admission::Normal);
        }
        for _ in 0..5 {
            let a = b.admit().await;
            assert_eq!(a, Admission::Probe);
            b.failure(a);
        }
        let t = Instant::now();
        b.admit().await;
        assert!(t.elapsed() <= Duration::from_secs(4));
    }
}
