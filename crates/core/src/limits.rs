//! Rate limits: GCRA (the generic cell rate algorithm), exact under concurrency.
//!
//! A limit `{limit: N, windowSec: W}` is a bucket of N requests that refills at N
//! per W seconds: a burst of N passes at once (and the N+1st simultaneous request is
//! refused), then one more every W/N seconds. Over any span of t seconds at most
//! N + N·t/W requests pass. Several limits on one subject are checked together under
//! one lock, and a request refused by any of them consumes none. The
//! [`RateLimiter`] trait is what the edge calls; [`LocalRateLimiter`] keeps state in
//! this process, a Redis backend will share it between nodes.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_trait::async_trait;

use crate::model::RateLimit;

/// The answer for one request, with what the `RateLimit-*` headers report: the
/// limit with the fewest requests left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until that limit is fully replenished.
    pub reset_secs: u64,
    /// When refused: seconds until a request would pass.
    pub retry_after_secs: u64,
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Counts one request of `subject` against every limit, if all of them allow it.
    async fn check(&self, subject: &str, limits: &[RateLimit]) -> RateDecision;

    /// The decision at once, for a limiter whose state is in this process:
    /// checked on every request of a limited key, it spares the request the
    /// boxed future of [`RateLimiter::check`]. `None`: ask `check`.
    fn check_now(&self, _subject: &str, _limits: &[RateLimit]) -> Option<RateDecision> {
        None
    }

    /// Drops state that no longer limits anything, to bound memory.
    fn forget_idle(&self) {}
}

/// GCRA state of one subject: the theoretical arrival time per limit.
#[derive(Debug, Default)]
struct Cells {
    tats: Vec<Cell>,
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    limit: RateLimit,
    /// [`interval_ns`] of `limit`, divided out once.
    interval: u64,
    /// The theoretical arrival time, in ns since the limiter's epoch.
    tat: u64,
}

/// Limits kept in this process, per subject. `S` hashes the subjects: SipHash
/// (the default) where a client picks them (addresses, for the failed-auth
/// throttle), a faster one where sandgate does (key ids).
#[derive(Debug)]
pub struct LocalRateLimiter<S = std::hash::RandomState> {
    epoch: Instant,
    subjects: Mutex<HashMap<String, Cells, S>>,
    /// How many subjects `subjects` holds, readable without the lock: with
    /// none, [`LocalRateLimiter::would_refuse`] needs no lock at all.
    tracked: AtomicUsize,
}

/// The limiter of keys' rate limits: its subjects are key ids, which sandgate
/// makes (or a JWT's or the auth callback's subject, which their issuer vouches
/// for), so a seeded fast hash will do.
pub type KeyRateLimiter = LocalRateLimiter<foldhash::fast::RandomState>;

impl<S: Default> Default for LocalRateLimiter<S> {
    fn default() -> Self {
        LocalRateLimiter {
            epoch: Instant::now(),
            subjects: Mutex::new(HashMap::default()),
            tracked: AtomicUsize::new(0),
        }
    }
}

fn window_ns(l: RateLimit) -> u64 {
    u64::from(l.window_sec) * 1_000_000_000
}

fn interval_ns(l: RateLimit) -> u64 {
    (window_ns(l) / u64::from(l.limit.max(1))).max(1)
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

impl<S: BuildHasher> LocalRateLimiter<S> {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The decision at `now` (ns since epoch); separate from the clock for tests.
    fn check_at(&self, subject: &str, limits: &[RateLimit], now: u64) -> RateDecision {
        let mut subjects = self.subjects.lock().unwrap_or_else(|p| p.into_inner());
        let cells = match subjects.get_mut(subject) {
            Some(c) => c,
            None => {
                self.tracked.store(subjects.len() + 1, Ordering::Release);
                subjects.entry(subject.to_owned()).or_default()
            }
        };
        // Limits changed since last time: keep the cells that still apply.
        if cells.tats.len() != limits.len()
            || cells.tats.iter().zip(limits).any(|(c, n)| c.limit != *n)
        {
            let old = std::mem::take(&mut cells.tats);
            cells.tats = limits
                .iter()
                .map(|l| Cell {
                    limit: *l,
                    interval: interval_ns(*l),
                    tat: old.iter().find(|o| o.limit == *l).map_or(now, |o| o.tat),
                })
                .collect();
        }
        // First pass: would every limit allow it?
        let mut refused: Option<RateDecision> = None;
        for &Cell {
            limit: l,
            interval: t,
            tat,
        } in &cells.tats
        {
            let tat = tat.max(now);
            let w = window_ns(l);
            if tat + t > now + w {
                let wait = tat + t - (now + w);
                let d = RateDecision {
                    allowed: false,
                    limit: l.limit,
                    remaining: 0,
                    reset_secs: ceil_secs(tat - now),
                    retry_after_secs: ceil_secs(wait).max(1),
                };
                if refused.is_none_or(|r| d.retry_after_secs > r.retry_after_secs) {
                    refused = Some(d);
                }
            }
        }
        if let Some(d) = refused {
            return d;
        }
        // Second pass: consume from all of them; report the tightest.
        let mut report: Option<RateDecision> = None;
        for cell in cells.tats.iter_mut() {
            let (t, w) = (cell.interval, window_ns(cell.limit));
            cell.tat = cell.tat.max(now) + t;
            let remaining = ((now + w).saturating_sub(cell.tat) / t) as u32;
            let d = RateDecision {
                allowed: true,
                limit: cell.limit.limit,
                remaining,
                reset_secs: ceil_secs(cell.tat - now),
                retry_after_secs: 0,
            };
            if report.is_none_or(|r| d.remaining < r.remaining) {
                report = Some(d);
            }
        }
        report.unwrap_or(RateDecision {
            allowed: true,
            limit: 0,
            remaining: 0,
            reset_secs: 0,
            retry_after_secs: 0,
        })
    }

    /// Whether `subject` would be refused now, without counting anything.
    pub fn would_refuse(&self, subject: &str, limit: RateLimit) -> Option<u64> {
        if self.tracked.load(Ordering::Acquire) == 0 {
            return None;
        }
        let now = self.now_ns();
        let subjects = self.subjects.lock().unwrap_or_else(|p| p.into_inner());
        let cell = subjects
            .get(subject)?
            .tats
            .iter()
            .find(|c| c.limit == limit)?;
        let tat = cell.tat.max(now);
        let (t, w) = (cell.interval, window_ns(limit));
        (tat + t > now + w).then(|| ceil_secs(tat + t - (now + w)).max(1))
    }

    /// Counts one event of `subject` against `limit` (used for failed-auth throttling).
    pub fn count(&self, subject: &str, limit: RateLimit) {
        let now = self.now_ns();
        let _ = self.check_at(subject, &[limit], now);
    }

    /// Forgets subjects whose every cell is back to full: bounds memory.
    fn prune(&self) {
        let now = self.now_ns();
        let mut subjects = self.subjects.lock().unwrap_or_else(|p| p.into_inner());
        subjects.retain(|_, cells| cells.tats.iter().any(|c| c.tat > now));
        self.tracked.store(subjects.len(), Ordering::Release);
    }

    pub fn tracked(&self) -> usize {
        self.subjects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[async_trait]
impl<S: BuildHasher + Send + Sync + 'static> RateLimiter for LocalRateLimiter<S> {
    async fn check(&self, subject: &str, limits: &[RateLimit]) -> RateDecision {
        self.check_at(subject, limits, self.now_ns())
    }

    fn check_now(&self, subject: &str, limits: &[RateLimit]) -> Option<RateDecision> {
        Some(self.check_at(subject, limits, self.now_ns()))
    }

    fn forget_idle(&self) {
        self.prune();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(limit: u32, window_sec: u32) -> RateLimit {
        RateLimit { limit, window_sec }
    }

    const S: u64 = 1_000_000_000;

    #[tokio::test]
    async fn the_immediate_check_and_the_awaited_one_count_against_one_bucket() {
        // The keys' limiter, as the server makes it.
        let l = KeyRateLimiter::default();
        let limits = [rl(3, 3600)];
        assert!(l.check_now("k", &limits).expect("local: at once").allowed);
        assert!(l.check("k", &limits).await.allowed);
        let third = l.check_now("k", &limits).unwrap();
        assert!(third.allowed);
        assert_eq!(third.remaining, 0);
        assert!(!l.check("k", &limits).await.allowed);
        assert!(!l.check_now("k", &limits).unwrap().allowed);
    }

    #[test]
    fn a_burst_of_exactly_limit_passes_then_one_per_interval() {
        let l = <LocalRateLimiter>::default();
        let limits = [rl(10, 60)];
        let t0 = 5 * S;
        let passed = (0..25)
            .filter(|_| l.check_at("k", &limits, t0).allowed)
            .count();
        assert_eq!(passed, 10);
        // One more every 6 s.
        assert!(!l.check_at("k", &limits, t0 + 5 * S).allowed);
        assert!(l.check_at("k", &limits, t0 + 6 * S).allowed);
        assert!(!l.check_at("k", &limits, t0 + 6 * S).allowed);
    }

    #[test]
    fn bursts_never_exceed_the_bucket_and_the_rate_holds() {
        let l = <LocalRateLimiter>::default();
        let limits = [rl(7, 10)];
        let mut passed_at = Vec::new();
        for step in 0..2000u64 {
            let now = step * S / 50; // 50 requests a second for 40 s
            if l.check_at("k", &limits, now).allowed {
                passed_at.push(now);
            }
        }
        for (i, start) in passed_at.iter().enumerate() {
            for span in [S, 5 * S, 10 * S, 20 * S] {
                let n = passed_at[i..]
                    .iter()
                    .take_while(|t| **t < start + span)
                    .count() as u64;
                let bound = 7 + 7 * span / (10 * S) + 1;
                assert!(n <= bound, "{n} in {span} ns (bound {bound})");
            }
        }
        // And the long-run rate is the limit's.
        assert!(
            (passed_at.len() as i64 - (7 + 7 * 40 / 10)).abs() <= 1,
            "{}",
            passed_at.len()
        );
    }

    #[test]
    fn all_limits_must_allow_and_a_refusal_consumes_none() {
        let l = <LocalRateLimiter>::default();
        let limits = [rl(100, 60), rl(2, 1)];
        assert!(l.check_at("k", &limits, 0).allowed);
        let d = l.check_at("k", &limits, 0);
        assert!(d.allowed);
        assert_eq!(d.limit, 2);
        assert_eq!(d.remaining, 0);
        let refused = l.check_at("k", &limits, 0);
        assert!(!refused.allowed);
        assert_eq!(refused.limit, 2);
        assert!(refused.retry_after_secs >= 1);
        // The per-minute limit was not charged for the refused request.
        let d = l.check_at("k", &[rl(100, 60)], 0);
        assert_eq!(d.remaining, 97);
    }

    #[test]
    fn subjects_are_independent_and_pruned_when_full() {
        let l = <LocalRateLimiter>::default();
        assert!(l.check_at("a", &[rl(1, 1)], 0).allowed);
        assert!(!l.check_at("a", &[rl(1, 1)], 0).allowed);
        assert!(l.check_at("b", &[rl(1, 1)], 0).allowed);
        assert_eq!(l.tracked(), 2);
        l.prune();
        assert_eq!(l.tracked(), 2, "still limiting at t=0");
    }

    #[test]
    fn a_subject_counted_on_another_thread_is_refused_here() {
        let l = std::sync::Arc::new(<LocalRateLimiter>::default());
        let limit = rl(1, 3600);
        assert_eq!(
            l.would_refuse("203.0.113.7", limit),
            None,
            "nothing tracked"
        );
        let counting = std::sync::Arc::clone(&l);
        std::thread::spawn(move || counting.count("203.0.113.7", limit))
            .join()
            .unwrap();
        assert!(l.would_refuse("203.0.113.7", limit).is_some());
        assert_eq!(
            l.would_refuse("203.0.113.8", limit),
            None,
            "another address"
        );
    }
}
