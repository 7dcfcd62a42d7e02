//! Usage accounting: requests, denied requests, executions, CPU time and
//! sandbox-seconds per key and UTC day, for `GET /v1/usage`.
//!
//! Counting happens in memory on the request path (one short lock); a background
//! flush adds the deltas to the store in one transaction, and a failed flush keeps
//! them for the next. It owns no policy: who may read which rows is the caller's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::Serialize;

use crate::model::{Env, Timestamp};
use crate::principal::Principal;
use crate::shard::{self, Padded};
use crate::store::{StoreError, UsageStore};

/// Counters of one key on one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageCounts {
    pub requests: u64,
    pub denied_requests: u64,
    pub executions: u64,
    pub cpu_ms: u64,
    pub sandbox_seconds: u64,
}

impl UsageCounts {
    fn add(&mut self, other: &UsageCounts) {
        self.requests += other.requests;
        self.denied_requests += other.denied_requests;
        self.executions += other.executions;
        self.cpu_ms += other.cpu_ms;
        self.sandbox_seconds += other.sandbox_seconds;
    }
}

/// One row of pending or stored usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub key_id: String,
    pub tenant: String,
    pub env: Env,
    pub counts: UsageCounts,
}

/// How `GET /v1/usage` groups rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Day,
}

/// A usage query: days `[from_day, to_day]`, a partition unless operator-wide.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub tenant_env: Option<(String, Env)>,
    pub from_day: i64,
    pub to_day: i64,
}

pub fn day_of(t: Timestamp) -> i64 {
    t.millis().div_euclid(86_400_000)
}

/// `YYYY-MM-DD` of a day number.
pub fn day_string(day: i64) -> String {
    let date = time::Date::from_julian_day((day + 2_440_588) as i32).unwrap_or(time::Date::MIN);
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// A day number from `YYYY-MM-DD` or an RFC 3339 time.
pub fn parse_day(s: &str) -> Option<i64> {
    if let Some(t) = Timestamp::parse_rfc3339(s) {
        return Some(day_of(t));
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(s, &format).ok()?;
    Some(i64::from(date.to_julian_day()) - 2_440_588)
}

type Cell = (String, Env, UsageCounts);

/// key id → day → deltas.
type Pending = HashMap<String, HashMap<i64, Cell, Hasher>, Hasher>;

/// Seeded per process, and several times faster than SipHash on short keys.
type Hasher = foldhash::fast::RandomState;

/// In-memory deltas since the last flush, one map per thread ([`crate::shard`]):
/// two workers counting requests of one key never share a lock.
#[derive(Debug)]
pub struct UsageRecorder {
    pending: Box<[Padded<Mutex<Pending>>]>,
}

impl Default for UsageRecorder {
    fn default() -> Self {
        UsageRecorder {
            pending: shard::per_shard(),
        }
    }
}

impl UsageRecorder {
    /// On the hot path: a known key costs an uncontended lock and two lookups,
    /// no allocation.
    fn bump(&self, p: &Principal, f: impl FnOnce(&mut UsageCounts)) {
        self.bump_at(p, Timestamp::now(), f);
    }

    fn bump_at(&self, p: &Principal, now: Timestamp, f: impl FnOnce(&mut UsageCounts)) {
        let day = day_of(now);
        let mut pending = lock(&self.pending[shard::this_thread()]);
        let days = match pending.get_mut(p.key_id.as_str()) {
            Some(days) => days,
            None => pending.entry(p.key_id.clone()).or_default(),
        };
        let cell = days
            .entry(day)
            .or_insert_with(|| (p.tenant.clone(), p.env, UsageCounts::default()));
        f(&mut cell.2);
    }

    /// One request, made `now` (the caller has the time already).
    pub fn request(&self, p: &Principal, now: Timestamp) {
        self.bump_at(p, now, |c| c.requests += 1);
    }

    pub fn denied(&self, p: &Principal) {
        self.bump(p, |c| c.denied_requests += 1);
    }

    /// One run, with what it cost.
    pub fn execution(&self, p: &Principal, cpu_ms: u64) {
        self.bump(p, |c| {
            c.executions += 1;
            c.cpu_ms += cpu_ms;
        });
    }

    /// One exec or code cell in a sandbox; its CPU time is billed with the
    /// sandbox's (see [`UsageRecorder::cpu`]).
    pub fn sandbox_execution(&self, p: &Principal) {
        self.bump(p, |c| c.executions += 1);
    }

    /// CPU time used inside a sandbox, billed to the key that created it.
    pub fn cpu(&self, p: &Principal, cpu_ms: u64) {
        self.bump(p, |c| c.cpu_ms += cpu_ms);
    }

    pub fn sandbox_seconds(&self, p: &Principal, seconds: u64) {
        self.bump(p, |c| c.sandbox_seconds += seconds);
    }

    /// Adds every pending delta to the store; on failure they stay for the next flush.
    pub async fn flush(&self, store: &Arc<dyn UsageStore>) -> Result<(), StoreError> {
        let mut taken = Pending::default();
        for shard in self.pending.iter() {
            let mine = std::mem::take(&mut *lock(shard));
            if taken.is_empty() {
                taken = mine;
            } else {
                merge(&mut taken, mine);
            }
        }
        if taken.is_empty() {
            return Ok(());
        }
        let rows: Vec<UsageRow> = taken
            .iter()
            .flat_map(|(key_id, days)| {
                days.iter()
                    .map(move |(day, (tenant, env, counts))| UsageRow {
                        day: *day,
                        key_id: key_id.clone(),
                        tenant: tenant.clone(),
                        env: *env,
                        counts: *counts,
                    })
            })
            .collect();
        if let Err(e) = store.add_usage(&rows).await {
            merge(&mut lock(&self.pending[shard::this_thread()]), taken);
            return Err(e);
        }
        Ok(())
    }
}

/// Adds `from`'s deltas to `into`'s.
fn merge(into: &mut Pending, from: Pending) {
    for (key_id, days) in from {
        let mine = into.entry(key_id).or_default();
        for (day, (tenant, env, counts)) in days {
            mine.entry(day)
                .or_insert_with(|| (tenant, env, UsageCounts::default()))
                .2
                .add(&counts);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sums stored rows by key or by day.
pub fn group(rows: Vec<UsageRow>, by: GroupBy) -> Vec<(String, UsageCounts)> {
    let mut groups: std::collections::BTreeMap<String, UsageCounts> = Default::default();
    for r in rows {
        let k = match by {
            GroupBy::Key => r.key_id,
            GroupBy::Day => day_string(r.day),
        };
        groups.entry(k).or_default().add(&r.counts);
    }
    groups.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip() {
        let d = parse_day("2026-11-25").unwrap();
        assert_eq!(day_string(d), "2026-11-25");
        assert_eq!(parse_day("2026-11-25T23:59:59Z"), Some(d));
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("25/11/2026"), None);
        assert_eq!(day_of(Timestamp::from_millis(86_400_000 * 3 + 5)), 3);
    }

    /// Counts made on many threads at once (each in its own shard) are flushed
    /// whole, once; a failed flush keeps them for the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn requests_counted_on_every_thread_are_flushed_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn UsageStore> =
            Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let recorder = Arc::new(UsageRecorder::default());
        let p = Arc::new(Principal {
            key_id: "key_a".into(),
            tenant: "acme".into(),
            ..Principal::local_operator()
        });
        let now = Timestamp::now();
        let threads: Vec<_> = (0..shard::SHARDS + 3)
            .map(|_| {
                let (recorder, p) = (Arc::clone(&recorder), Arc::clone(&p));
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        recorder.request(&p, now);
                    }
                    recorder.execution(&p, 7);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        recorder.flush(&store).await.unwrap();
        recorder.flush(&store).await.unwrap();
        let day = day_of(now);
        let rows = store
            .query_usage(&UsageQuery {
                tenant_env: None,
                from_day: day,
                to_day: day,
            })
            .await
            .unwrap();
        let n = shard::SHARDS as u64 + 3;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].counts.requests, n * 1000);
        assert_eq!(rows[0].counts.executions, n);
        assert_eq!(rows[0].counts.cpu_ms, n * 7);
    }
}
