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
type Pending = HashMap<String, HashMap<i64, Cell>>;

/// In-memory deltas since the last flush.
#[derive(Debug, Default)]
pub struct UsageRecorder {
    pending: Mutex<Pending>,
}

impl UsageRecorder {
    /// On the hot path: a known key costs a lock and two lookups, no allocation.
    fn bump(&self, p: &Principal, f: impl FnOnce(&mut UsageCounts)) {
        let day = day_of(Timestamp::now());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let days = match pending.get_mut(p.key_id.as_str()) {
            Some(days) => days,
            None => pending.entry(p.key_id.clone()).or_default(),
        };
        let cell = days
            .entry(day)
            .or_insert_with(|| (p.tenant.clone(), p.env, UsageCounts::default()));
        f(&mut cell.2);
    }

    pub fn request(&self, p: &Principal) {
        self.bump(p, |c| c.requests += 1);
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
        let taken: Pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
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
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (key_id, days) in taken {
                let mine = pending.entry(key_id).or_default();
                for (day, (tenant, env, counts)) in days {
                    mine.entry(day)
                        .or_insert_with(|| (tenant, env, UsageCounts::default()))
                        .2
                        .add(&counts);
                }
            }
            return Err(e);
        }
        Ok(())
    }
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
}
