//! Who is calling: the result of authentication, read by policy, limits and services.
//!
//! A [`Principal`] is built once per key (when the key is loaded into the cache),
//! and shared by `Arc` with every request that presents that key.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::model::{Env, RateLimit, Timestamp};
use crate::net::IpNet;
use crate::scopes::{Scope, ScopeSet};
use crate::shard::{self, Padded};

/// Where a principal's credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// A key in the key store.
    StoredKey,
    /// A key from `SANDGATE_ADMIN_API_KEY` or `SANDGATE_API_KEYS`.
    EnvKey,
    /// A JWT signed by the configured secret or a key of the configured JWKS (SPEC §8).
    Jwt,
    /// A credential the auth callback allowed (SPEC §8).
    Callback,
    /// Auth mode `none`: nobody is authenticated, everybody is this principal.
    Open,
    /// The local operator running `sandgate keys --data-dir` (no credential at all).
    LocalOperator,
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    /// The first 12 characters of the key, when the credential is a sandgate key.
    pub key_prefix: Option<String>,
    pub name: String,
    pub tenant: String,
    pub env: Env,
    pub scopes: ScopeSet,
    /// The scope names as granted, for display.
    pub scope_names: Vec<String>,
    pub source: CredentialSource,
    pub rate_limits: Vec<RateLimit>,
    pub allowed_ips: Vec<IpNet>,
    pub expires_at: Option<Timestamp>,
    /// The executions counter this principal draws from, if any.
    pub quota_id: Option<String>,
    /// Request counting, flushed to storage off the hot path.
    pub usage: Option<Arc<UsageCell>>,
}

impl Principal {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(scope)
    }

    /// Whether this principal may see objects of `tenant` + `env`.
    pub fn can_see(&self, tenant: &str, env: Env) -> bool {
        self.has(Scope::TenantsManage) || (self.tenant == tenant && self.env == env)
    }

    /// The all-powerful local operator of `sandgate keys --data-dir`.
    pub fn local_operator() -> Principal {
        Principal {
            key_id: "local-operator".into(),
            key_prefix: None,
            name: "local operator".into(),
            tenant: "default".into(),
            env: Env::Live,
            scopes: ScopeSet::all(),
            scope_names: vec!["*".into()],
            source: CredentialSource::LocalOperator,
            rate_limits: Vec::new(),
            allowed_ips: Vec::new(),
            expires_at: None,
            quota_id: None,
            usage: None,
        }
    }

    /// Everybody, when authentication is off (auth mode `none`): tenant `default`,
    /// env `live`, every scope.
    pub fn open() -> Principal {
        Principal {
            key_id: "open_mode".into(),
            name: "anyone (authentication is off)".into(),
            source: CredentialSource::Open,
            ..Principal::local_operator()
        }
    }

    /// Counts one request made with this principal's key.
    pub fn record_use(&self, now: Timestamp) {
        if let Some(usage) = &self.usage {
            usage.record(now);
        }
    }
}

/// Requests counted in memory since the last flush, per key: one counter per
/// thread ([`crate::shard`]), summed when read. The counters (2 KiB) are made on
/// the key's first request: a key never used costs a pointer.
#[derive(Debug, Default)]
pub struct UsageCell {
    shards: OnceLock<Box<[Padded<Counters>]>>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    last_used_ms: AtomicI64,
}

impl UsageCell {
    pub fn record(&self, now: Timestamp) {
        let mine = self.mine();
        mine.requests.fetch_add(1, Ordering::Relaxed);
        // Most requests fall in a millisecond already written: a read, no write.
        if mine.last_used_ms.load(Ordering::Relaxed) < now.millis() {
            mine.last_used_ms.fetch_max(now.millis(), Ordering::Relaxed);
        }
    }

    fn mine(&self) -> &Counters {
        &self.shards.get_or_init(shard::per_shard)[shard::this_thread()]
    }

    fn all(&self) -> &[Padded<Counters>] {
        self.shards.get().map_or(&[], |s| s)
    }

    /// Requests counted and not yet taken.
    pub fn pending_requests(&self) -> u64 {
        self.all()
            .iter()
            .map(|s| s.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Takes the requests counted so far (for a flush).
    pub fn take_requests(&self) -> u64 {
        self.all()
            .iter()
            .map(|s| s.requests.swap(0, Ordering::Relaxed))
            .sum()
    }

    /// Gives back requests taken by a flush that failed.
    pub fn put_back(&self, requests: u64) {
        self.mine().requests.fetch_add(requests, Ordering::Relaxed);
    }

    /// The latest use recorded, 0 when none.
    pub fn last_used_ms(&self) -> i64 {
        self.all()
            .iter()
            .map(|s| s.last_used_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_cell_counts_every_thread_and_gives_back_a_failed_flush() {
        let cell = Arc::new(UsageCell::default());
        let threads: Vec<_> = (0..shard::SHARDS + 3)
            .map(|i| {
                let cell = Arc::clone(&cell);
                std::thread::spawn(move || {
                    for j in 0..500 {
                        cell.record(Timestamp::from_millis(1_000 * i as i64 + j));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = (shard::SHARDS as u64 + 3) * 500;
        assert_eq!(cell.pending_requests(), n);
        assert_eq!(
            cell.last_used_ms(),
            1_000 * (shard::SHARDS as i64 + 2) + 499
        );
        assert_eq!(cell.take_requests(), n);
        assert_eq!(cell.pending_requests(), 0);
        cell.put_back(n);
        cell.record(Timestamp::from_millis(1));
        assert_eq!(cell.take_requests(), n + 1);
    }
}
