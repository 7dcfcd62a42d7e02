//! The key service: verification on the hot path, and the key lifecycle.
//!
//! Verification is served from an in-memory cache of every key (hash → principal),
//! so a known key costs one SHA-256 and a map lookup, no I/O. The cache is kept
//! true three ways: this node updates it right after each change it commits; a poll
//! of the store's revision counter picks up changes made by other processes (the
//! offline CLI, other nodes) within a second; and a cache miss triggers one bounded,
//! single-flight refresh, so a brand-new key works at once while a flood of unknown
//! keys cannot hammer the store.
//!
//! Lifecycle rules live here, not at the HTTP edge: visibility (another tenant's or
//! env's key is "not found"), no escalation (a key never grants or manages more
//! than it holds), rotation grace, and an audit event for every change, written in
//! the same transaction as the change. Once a change is committed it is announced
//! to the [`EventSink`] (webhooks), with the key object as data (never the key or
//! its hash).

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::api::{
    self, CreateKeyRequest, CreatedKey, InvalidField, KeyView, UpdateKeyRequest, WhoAmI, invalid,
};
use super::format::{self, KeyHash, KeyShape};
use crate::model::{AuditRecord, KeyRecord, Outcome, QuotaRecord, Refill, Timestamp};
use crate::net::IpNet;
use crate::principal::{CredentialSource, Principal, UsageCell};
use crate::scopes::{Profile, Scope, ScopeSet};
use crate::store::{Changes, KeyStore, KeyUsage, QuotaChange, QuotaExhausted, StoreError};
use crate::webhooks::EventSink;

/// Default rotation grace period: 7 days.
pub const DEFAULT_GRACE_SEC: u64 = 7 * 86_400;
/// Longest accepted grace period or key lifetime offset: 10 years.
const MAX_DURATION_SEC: u64 = 10 * 365 * 86_400;
/// A cache miss refreshes from the store at most this often.
const MISS_REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// Why a credential was refused. The edge maps these to SPEC codes; audit rows keep
/// the precise reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Looks like a sandgate key but fails the format or checksum.
    Malformed,
    /// Not a key this server knows.
    Unknown,
    Expired,
    Revoked,
}

/// A refused credential, with the key it named when that key exists (for the audit row).
#[derive(Debug, Clone)]
pub struct Denied {
    pub failure: AuthFailure,
    pub key: Option<Arc<Principal>>,
}

impl From<AuthFailure> for Denied {
    fn from(failure: AuthFailure) -> Denied {
        Denied { failure, key: None }
    }
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Malformed => "malformed_key",
            AuthFailure::Unknown => "unknown_key",
            AuthFailure::Expired => "key_expired",
            AuthFailure::Revoked => "key_revoked",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key not found")]
    NotFound,
    #[error("{message}")]
    Forbidden {
        required_scope: Scope,
        message: String,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The request a change is made in, for its audit row.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
}

struct CachedKey {
    record: KeyRecord,
    principal: Arc<Principal>,
    /// The whoami JSON of this version of the key up to its executions counters,
    /// rendered on first use. `None` when the JSON does not end with the
    /// [`WhoAmICounters`] members: then each answer is rendered whole.
    whoami_head: OnceLock<Option<Box<[u8]>>>,
}

/// The members a whoami ends with: they move with every run and refill.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WhoAmICounters {
    executions_limit: Option<u64>,
    executions_remaining: Option<u64>,
    executions_refill: Option<Refill>,
    next_refill_at: Option<Timestamp>,
}

impl WhoAmICounters {
    fn of(quota: &QuotaRecord) -> WhoAmICounters {
        WhoAmICounters {
            executions_limit: quota.limit,
            executions_remaining: quota.remaining,
            executions_refill: quota.refill,
            next_refill_at: crate::quota::next_refill_at(quota),
        }
    }
}

/// Hashes a SHA-256 digest by folding its words: digests are uniform already, so
/// hashing them again (SipHash, on every request) buys nothing. Only stored keys
/// are inserted, so presented credentials cannot crowd a bucket.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }
}

#[derive(Default)]
struct KeyCache {
    by_hash: HashMap<KeyHash, Arc<CachedKey>, BuildHasherDefault<DigestHasher>>,
    // Looked up on every whoami: foldhash (seeded per process) instead of
    // SipHash, which cost more than the rest of the lookup.
    by_id: HashMap<String, Arc<CachedKey>, foldhash::fast::RandomState>,
    usage: HashMap<String, Arc<UsageCell>, foldhash::fast::RandomState>,
    quotas: HashMap<String, QuotaRecord, foldhash::fast::RandomState>,
    rev: i64,
}

impl KeyCache {
    fn apply(&mut self, changes: Changes) {
        for record in changes.keys {
            self.put(record);
        }
        self.quotas.extend(changes.quotas);
        self.rev = self.rev.max(changes.rev);
    }

    fn put(&mut self, record: KeyRecord) {
        let usage = Arc::clone(self.usage.entry(record.id.clone()).or_default());
        let principal = Arc::new(principal_for(&record, usage));
        let entry = Arc::new(CachedKey {
            record,
            principal,
            whoami_head: OnceLock::new(),
        });
        self.by_hash.insert(entry.record.hash, Arc::clone(&entry));
        self.by_id.insert(entry.record.id.clone(), entry);
    }

    fn pending_requests(&self, key_id: &str) -> u64 {
        self.usage.get(key_id).map_or(0, |u| u.pending_requests())
    }
}

fn principal_for(record: &KeyRecord, usage: Arc<UsageCell>) -> Principal {
    Principal {
        key_id: record.id.clone(),
        key_prefix: Some(record.prefix.clone()),
        name: record.name.clone(),
        tenant: record.tenant.clone(),
        env: record.env,
        // Stored names were validated on the way in; an unknown one grants nothing.
        scopes: record
            .scopes
            .iter()
            .filter_map(|s| ScopeSet::parse(&[s]).ok())
            .fold(ScopeSet::EMPTY, ScopeSet::union),
        scope_names: record.scopes.clone(),
        source: CredentialSource::StoredKey,
        rate_limits: record.rate_limits.clone(),
        allowed_ips: record
            .allowed_ips
            .iter()
            .filter_map(|s| s.parse::<IpNet>().ok())
            .collect(),
        expires_at: record.expires_at,
        quota_id: Some(record.quota_id.clone()),
        usage: Some(usage),
    }
}

/// Keys a thread holds copies of, at most.
const HOT_KEYS: usize = 16;

thread_local! {
    static HOT: RefCell<HotKeys> = RefCell::new(HotKeys::default());
}

/// The valid keys this thread verified lately, each as this thread's own copy
/// of its principal, good while the cache's generation is `generation`. On the
/// path of every request, they spare it the cache's lock and a reference count
/// that every thread serving the key would otherwise pass back and forth.
#[derive(Default)]
struct HotKeys {
    owner: u64,
    generation: u64,
    keys: Vec<HotKey>,
}

struct HotKey {
    hash: KeyHash,
    principal: Arc<Principal>,
    /// The key's executions counter as cached when the copy was made.
    quota: Option<QuotaRecord>,
    whoami_head: OnceCell<Option<Box<[u8]>>>,
}

/// The cache's write lock; moves the generation on before letting go.
struct CacheWrite<'a> {
    guard: RwLockWriteGuard<'a, KeyCache>,
    generation: &'a AtomicU64,
}

impl std::ops::Deref for CacheWrite<'_> {
    type Target = KeyCache;

    fn deref(&self) -> &KeyCache {
        &self.guard
    }
}

impl std::ops::DerefMut for CacheWrite<'_> {
    fn deref_mut(&mut self) -> &mut KeyCache {
        &mut self.guard
    }
}

impl Drop for CacheWrite<'_> {
    fn drop(&mut self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether two key hashes are equal, in a time that does not depend on where
/// they differ.
fn same_hash(a: &KeyHash, b: &KeyHash) -> bool {
    let diff = a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .fold(0u64, |diff, (x, y)| {
            let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().expect("8 bytes"));
            diff | (word(x) ^ word(y))
        });
    std::hint::black_box(diff) == 0
}

pub struct KeyService {
    store: Arc<dyn KeyStore>,
    cache: RwLock<KeyCache>,
    /// Which service a thread's [`HotKeys`] came from (tests run many in one
    /// process).
    id: u64,
    /// Moves on with every write of `cache`, before the lock is let go: a
    /// thread's copies are good while it has not moved since they were made.
    generation: AtomicU64,
    /// Single flight for cache-miss refreshes; holds when the last one ran.
    miss_refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Serialises this node's read-modify-write changes of keys.
    writes: tokio::sync::Mutex<()>,
    /// Told of every committed lifecycle event (webhooks); none for the offline CLI.
    events: Option<Arc<dyn EventSink>>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService").finish_non_exhaustive()
    }
}

impl KeyService {
    /// Loads every key into memory.
    pub async fn load(store: Arc<dyn KeyStore>) -> Result<KeyService, StoreError> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let service = KeyService {
            store,
            cache: RwLock::new(KeyCache::default()),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            miss_refresh: tokio::sync::Mutex::new(None),
            writes: tokio::sync::Mutex::new(()),
            events: None,
        };
        service.sync().await?;
        Ok(service)
    }

    /// Announces every lifecycle event committed from now on to `sink`.
    pub fn with_events(mut self, sink: Arc<dyn EventSink>) -> KeyService {
        self.events = Some(sink);
        self
    }

    /// Tells the event sink about a committed change of `record`.
    async fn announce(&self, event: &str, record: &KeyRecord, extra: Option<(&str, &str)>) {
        let Some(sink) = &self.events else {
            return;
        };
        let mut data = serde_json::json!({ "key": self.view(record) });
        if let Some((name, value)) = extra {
            data[name] = value.into();
        }
        sink.emit(&record.tenant, record.env, event, data).await;
    }

    // ---- the hot path ----

    /// Verifies a sandgate key. `Ok(None)`: not a sandgate key, another source may know it.
    pub async fn verify(&self, credential: &str) -> Result<Option<Arc<Principal>>, Denied> {
        match format::classify(credential) {
            KeyShape::Foreign => return Ok(None),
            KeyShape::Corrupt => return Err(AuthFailure::Malformed.into()),
            KeyShape::Valid(_) => {}
        }
        let hash = format::hash_key(credential);
        let now = Timestamp::now();
        if let Some(found) = self.lookup(&hash, now) {
            return found.map(Some);
        }
        // Boxed: a miss is rare, and its state would make every hit's future larger.
        Box::pin(self.refresh_on_miss()).await;
        self.lookup(&hash, now)
            .unwrap_or(Err(AuthFailure::Unknown.into()))
            .map(Some)
    }

    fn lookup(&self, hash: &KeyHash, now: Timestamp) -> Option<Result<Arc<Principal>, Denied>> {
        if let Some(p) = self.hot_lookup(hash, now) {
            return Some(Ok(p));
        }
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let entry = cache.by_hash.get(hash)?;
        // The map already matched on the hash; compare again in constant time so no
        // code path ever decides on a short-circuiting comparison of secrets.
        if !same_hash(&entry.record.hash, hash) {
            return Some(Err(AuthFailure::Unknown.into()));
        }
        let refuse = |failure| {
            Err(Denied {
                failure,
                key: Some(Arc::clone(&entry.principal)),
            })
        };
        Some(if entry.record.revoked_at.is_some() {
            refuse(AuthFailure::Revoked)
        } else if entry.record.expires_at.is_some_and(|e| e <= now) {
            refuse(AuthFailure::Expired)
        } else {
            Ok(self.hot_insert(&cache, entry))
        })
    }

    /// This thread's copy of a valid key, while nothing in the cache changed
    /// since it was made: no lock, and no count shared with other threads.
    fn hot_lookup(&self, hash: &KeyHash, now: Timestamp) -> Option<Arc<Principal>> {
        self.with_hot_keys(|keys| {
            let key = keys.iter().find(|k| same_hash(&k.hash, hash))?;
            // Expiry is the one thing that changes without a write.
            let expired = key.principal.expires_at.is_some_and(|e| e <= now);
            (!expired).then(|| Arc::clone(&key.principal))
        })
    }

    /// `f` of this thread's copies, when they are this service's and still good.
    fn with_hot_keys<R>(&self, f: impl FnOnce(&[HotKey]) -> Option<R>) -> Option<R> {
        let generation = self.generation.load(Ordering::Acquire);
        HOT.with_borrow(|hot| {
            if (hot.owner, hot.generation) != (self.id, generation) {
                return None;
            }
            f(&hot.keys)
        })
    }

    /// Makes (or finds) this thread's copy of `entry`, a valid key, and hands
    /// it out. Under the cache's read lock: no write runs meanwhile, so the
    /// generation read here is the one `entry` belongs to.
    fn hot_insert(&self, cache: &KeyCache, entry: &CachedKey) -> Arc<Principal> {
        let generation = self.generation.load(Ordering::Acquire);
        HOT.with_borrow_mut(|hot| {
            if (hot.owner, hot.generation) != (self.id, generation) {
                hot.owner = self.id;
                hot.generation = generation;
                hot.keys.clear();
            }
            if let Some(key) = hot.keys.iter().find(|k| k.hash == entry.record.hash) {
                return Arc::clone(&key.principal);
            }
            if hot.keys.len() == HOT_KEYS {
                hot.keys.remove(0);
            }
            let principal = Arc::new(Principal::clone(&entry.principal));
            hot.keys.push(HotKey {
                hash: entry.record.hash,
                principal: Arc::clone(&principal),
                quota: principal
                    .quota_id
                    .as_deref()
                    .and_then(|q| cache.quotas.get(q))
                    .copied(),
                whoami_head: OnceCell::new(),
            });
            principal
        })
    }

    /// Takes the write lock of the cache; the generation moves on when it is let go.
    fn write_cache(&self) -> CacheWrite<'_> {
        CacheWrite {
            guard: self.cache.write().unwrap_or_else(|p| p.into_inner()),
            generation: &self.generation,
        }
    }

    /// `p` as it stands now: a stored key is looked up again by id (so a
    /// revocation, an expiry or a change made since `p` was read counts);
    /// another source's principal stands until its own expiry. For credentials
    /// derived from a key (a sandbox's access token acts for its owner).
    pub fn current(&self, p: &Arc<Principal>) -> Result<Arc<Principal>, Denied> {
        let now = Timestamp::now();
        if p.source != CredentialSource::StoredKey {
            return if p.expires_at.is_some_and(|e| e <= now) {
                Err(Denied {
                    failure: AuthFailure::Expired,
                    key: Some(Arc::clone(p)),
                })
            } else {
                Ok(Arc::clone(p))
            };
        }
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = cache.by_id.get(&p.key_id) else {
            return Err(AuthFailure::Unknown.into());
        };
        let refuse = |failure| {
            Err(Denied {
                failure,
                key: Some(Arc::clone(&entry.principal)),
            })
        };
        if entry.record.revoked_at.is_some() {
            refuse(AuthFailure::Revoked)
        } else if entry.record.expires_at.is_some_and(|e| e <= now) {
            refuse(AuthFailure::Expired)
        } else {
            Ok(Arc::clone(&entry.principal))
        }
    }

    async fn refresh_on_miss(&self) {
        let mut last = self.miss_refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < MISS_REFRESH_INTERVAL) {
            return;
        }
        if let Err(e) = self.sync().await {
            tracing::warn!(error = %e, "key cache refresh failed");
        }
        *last = Some(Instant::now());
    }

    // ---- keeping the cache true ----

    /// Applies every change committed since the last sync (by any process).
    pub async fn sync(&self) -> Result<(), StoreError> {
        let rev = self.cache.read().unwrap_or_else(|p| p.into_inner()).rev;
        let changes = self.store.changes_since(rev).await?;
        if changes.rev != rev {
            self.write_cache().apply(changes);
        }
        Ok(())
    }

    async fn publish(&self) -> Result<(), KeyError> {
        self.sync().await.map_err(KeyError::from)
    }

    /// Writes counted requests and last-use times to the store.
    pub async fn flush_usage(&self) -> Result<(), StoreError> {
        let now = Timestamp::now();
        let batch: Vec<(Arc<UsageCell>, KeyUsage)> = {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            cache
                .usage
                .iter()
                .filter_map(|(id, cell)| {
                    let requests = cell.take_requests();
                    let last = cell.last_used_ms();
                    (requests > 0).then(|| {
                        let usage = KeyUsage {
                            key_id: id.clone(),
                            requests,
                            last_used_at: Timestamp::from_millis(if last > 0 {
                                last
                            } else {
                                now.millis()
                            }),
                        };
                        (Arc::clone(cell), usage)
                    })
                })
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let rows: Vec<KeyUsage> = batch.iter().map(|(_, u)| u.clone()).collect();
        if let Err(e) = self.store.add_key_usage(&rows).await {
            // Put the counts back for the next flush: nothing is lost on a failed write.
            for (cell, u) in &batch {
                cell.put_back(u.requests);
            }
            return Err(e);
        }
        // Reflect the flushed counts in the cached records.
        let mut cache = self.write_cache();
        for u in rows {
            if let Some(entry) = cache.by_id.get(&u.key_id) {
                let mut record = entry.record.clone();
                record.request_count += u.requests;
                record.last_used_at = record.last_used_at.max(Some(u.last_used_at));
                cache.put(record);
            }
        }
        Ok(())
    }

    /// Writes a `key.expired` event for each key whose expiry has passed unrecorded.
    pub async fn record_expired_keys(&self) -> Result<usize, StoreError> {
        let now = Timestamp::now();
        let expired: Vec<KeyRecord> = {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            cache
                .by_id
                .values()
                .filter(|e| {
                    let r = &e.record;
                    !r.expiry_recorded
                        && r.revoked_at.is_none()
                        && r.expires_at.is_some_and(|t| t <= now)
                })
                .map(|e| e.record.clone())
                .collect()
        };
        if expired.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = expired.iter().map(|r| r.id.clone()).collect();
        let audit: Vec<AuditRecord> = expired
            .iter()
            .map(|r| {
                let mut row = lifecycle_row("key.expired", r, None, &RequestContext::default());
                row.time = r.expires_at.unwrap_or(now);
                row
            })
            .collect();
        self.store.record_expiries(&ids, &audit).await?;
        self.sync().await?;
        for record in &expired {
            self.announce("key.expired", record, None).await;
        }
        Ok(ids.len())
    }

    // ---- quotas ----

    /// Takes one execution from the principal's quota before a run starts. Durable:
    /// once this returns, a crash never gives the execution back. `Ok(None)` when the
    /// key is unlimited (no I/O), `Ok(Some(left))` otherwise.
    pub async fn consume_execution(&self, p: &Principal) -> Result<Option<u64>, QuotaExhausted> {
        let Some(quota_id) = p.quota_id.as_deref() else {
            return Ok(None);
        };
        if self.quota(quota_id).limit.is_none() {
            return Ok(None);
        }
        let taken = self.store.consume_execution(quota_id).await;
        let mut cache = self.write_cache();
        match taken {
            Ok(q) => {
                // The whole counter (a refill moved its schedule too), unless a
                // run that finished after this one already put a later state.
                let later = cache
                    .quotas
                    .get(quota_id)
                    .is_none_or(|cached| crate::quota::is_later_use(&q, cached));
                if later {
                    cache.quotas.insert(quota_id.to_owned(), q);
                }
                Ok(q.remaining)
            }
            Err(QuotaExhausted::Exhausted) => {
                if let Some(q) = cache.quotas.get_mut(quota_id) {
                    q.remaining = Some(0);
                }
                Err(QuotaExhausted::Exhausted)
            }
            Err(e) => Err(e),
        }
    }

    // ---- reads ----

    pub fn whoami(&self, p: &Principal) -> WhoAmI {
        let quota = p
            .quota_id
            .as_deref()
            .map(|q| self.quota(q))
            .unwrap_or(UNLIMITED);
        whoami_of(p, quota)
    }

    /// [`KeyService::whoami`] as JSON. For a cached key everything before the
    /// executions counters is rendered once per version of the key; the counters
    /// (which move with every run and refill) are written after it.
    pub fn whoami_json(&self, p: &Arc<Principal>) -> Vec<u8> {
        if let Some(json) = self.hot_whoami_json(p) {
            return json;
        }
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let head = cache
            .by_id
            .get(p.key_id.as_str())
            .filter(|e| Arc::ptr_eq(&e.principal, p))
            .and_then(|e| e.whoami_head.get_or_init(|| whoami_head(p)).as_deref());
        let Some(head) = head else {
            drop(cache);
            return serde_json::to_vec(&self.whoami(p)).expect("plain data serializes");
        };
        let quota = p
            .quota_id
            .as_deref()
            .and_then(|q| cache.quotas.get(q))
            .copied();
        whoami_with(head, quota)
    }

    /// [`KeyService::whoami_json`] from this thread's copy of the key, when `p`
    /// is it and nothing changed since it was made (the executions counter
    /// included: every change of it is a write of the cache).
    fn hot_whoami_json(&self, p: &Arc<Principal>) -> Option<Vec<u8>> {
        self.with_hot_keys(|keys| {
            let key = keys.iter().find(|k| Arc::ptr_eq(&k.principal, p))?;
            let head = key.whoami_head.get_or_init(|| whoami_head(p));
            Some(whoami_with(head.as_deref()?, key.quota))
        })
    }

    /// The cached counter, with the refills due by now.
    fn quota(&self, quota_id: &str) -> QuotaRecord {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .quotas
            .get(quota_id)
            .map_or(UNLIMITED, |q| crate::quota::refilled(*q, Timestamp::now()))
    }

    fn view(&self, record: &KeyRecord) -> KeyView {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let quota = cache
            .quotas
            .get(&record.quota_id)
            .copied()
            .unwrap_or(UNLIMITED);
        KeyView::new(
            record,
            quota,
            cache.pending_requests(&record.id),
            Timestamp::now(),
        )
    }

    /// The key object of a cached key (no I/O).
    pub fn cached_view(&self, id: &str) -> Option<KeyView> {
        let record = {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            cache.by_id.get(id)?.record.clone()
        };
        Some(self.view(&record))
    }

    /// Active keys whose expiry falls within `window` from now.
    pub fn expiring_within(&self, window: Duration) -> Vec<KeyView> {
        let now = Timestamp::now();
        let horizon = now.plus_secs(window.as_secs() as i64);
        let records: Vec<KeyRecord> = {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            cache
                .by_id
                .values()
                .map(|e| &e.record)
                .filter(|r| r.is_active_at(now) && r.expires_at.is_some_and(|t| t <= horizon))
                .cloned()
                .collect()
        };
        records.iter().map(|r| self.view(r)).collect()
    }

    pub async fn list_keys(&self, actor: &Principal) -> Result<Vec<KeyView>, KeyError> {
        let records = self.store.list_keys().await?;
        Ok(records
            .iter()
            .filter(|r| actor.can_see(&r.tenant, r.env))
            .map(|r| self.view(r))
            .collect())
    }

    pub async fn get_key(&self, actor: &Principal, id: &str) -> Result<KeyView, KeyError> {
        let record = self.visible_key(actor, id).await?;
        Ok(self.view(&record))
    }

    async fn visible_key(&self, actor: &Principal, id: &str) -> Result<KeyRecord, KeyError> {
        match self.store.get_key(id).await? {
            Some(r) if actor.can_see(&r.tenant, r.env) => Ok(r),
            _ => Err(KeyError::NotFound),
        }
    }

    /// A key the actor may change: visible, and holding no scope the actor lacks.
    async fn manageable_key(&self, actor: &Principal, id: &str) -> Result<KeyRecord, KeyError> {
        let record = self.visible_key(actor, id).await?;
        let granted = ScopeSet::parse(&record.scopes).unwrap_or(ScopeSet::all());
        require_superset(actor, granted, "manage a key with scopes you do not hold")?;
        Ok(record)
    }

    // ---- the lifecycle ----

    /// Creates the first admin key when the store holds none. Returns it, once.
    pub async fn bootstrap_admin(&self) -> Result<Option<CreatedKey>, KeyError> {
        let _guard = self.writes.lock().await;
        if self.store.count_keys().await? > 0 {
            return Ok(None);
        }
        let req = CreateKeyRequest {
            name: "admin".into(),
            description: Some("created at first start".into()),
            scopes: Some(vec!["*".into()]),
            ..CreateKeyRequest::default()
        };
        let created = self
            .insert_new_key(
                &Principal::local_operator(),
                &RequestContext::default(),
                req,
            )
            .await?;
        Ok(Some(created))
    }

    pub async fn create_key(
        &self,
        actor: &Principal,
        ctx: &RequestContext,
        req: CreateKeyRequest,
    ) -> Result<CreatedKey, KeyError> {
        let _guard = self.writes.lock().await;
        self.insert_new_key(actor, ctx, req).await
    }

    async fn insert_new_key(
        &self,
        actor: &Principal,
        ctx: &RequestContext,
        req: CreateKeyRequest,
    ) -> Result<CreatedKey, KeyError> {
        let now = Timestamp::now();
        let name = api::validate_name(&req.name)?;
        let description = api::validate_description(req.description)?;
        let tenant = req.tenant.unwrap_or_else(|| actor.tenant.clone());
        api::validate_tenant(&tenant)?;
        let env = req.env.unwrap_or(actor.env);
        if (tenant != actor.tenant || env != actor.env) && !actor.has(Scope::TenantsManage) {
            return Err(forbidden(
                Scope::TenantsManage,
                "only a key with tenants:manage may create keys for another tenant or env",
            ));
        }
        let (scopes, granted) = api::resolve_scopes(req.scopes, req.profile)?
            .unwrap_or_else(|| api::profile_scopes(Profile::SandboxUser));
        require_superset(actor, granted, "grant scopes you do not hold")?;
        let expires_at = match (req.expires_at, req.expires_in_sec) {
            (Some(_), Some(_)) => {
                return Err(
                    invalid("expiresInSec", "give either expiresAt or expiresInSec").into(),
                );
            }
            (Some(at), None) => Some(at),
            (None, Some(secs)) => Some(now.plus_secs(bounded_secs("expiresInSec", secs)?)),
            (None, None) => None,
        };
        let expires_at = bounded_expiry(actor, expires_at, now, "expiresAt")?;
        let rate_limits = api::validate_rate_limits(req.rate_limits.unwrap_or_default())?;
        let allowed_ips = api::validate_allowed_ips(req.allowed_ips.unwrap_or_default())?;
        let metadata = api::validate_metadata(req.metadata.unwrap_or_default())?;
        let refill = req
            .executions_refill
            .map(|r| api::validate_refill(r, req.executions_limit))
            .transpose()?;

        let secret = format::generate_key(env);
        let quota_id = format::random_id("quota_", 20);
        let record = KeyRecord {
            id: format::random_id("key_", 24),
            name,
            description,
            env,
            tenant,
            scopes,
            prefix: format::prefix_of(secret.expose())
                .unwrap_or_default()
                .to_owned(),
            hash: format::hash_key(secret.expose()),
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used_at: None,
            request_count: 0,
            rate_limits,
            allowed_ips,
            metadata,
            quota_id: quota_id.clone(),
            rotated_from: None,
            created_by: actor_id(actor),
            expiry_recorded: false,
        };
        let quota = QuotaRecord {
            refill,
            // The first refill falls one interval after creation.
            refilled_at: refill.map(|_| now),
            ..QuotaRecord::new(req.executions_limit)
        };
        let audit = lifecycle_row("key.created", &record, Some(actor), ctx);
        self.store
            .save_keys(
                std::slice::from_ref(&record),
                &[(quota_id, quota)],
                &[audit],
            )
            .await?;
        self.publish().await?;
        self.announce("key.created", &record, None).await;
        Ok(CreatedKey {
            key: self.view(&record),
            secret: secret.expose().to_owned(),
        })
    }

    pub async fn update_key(
        &self,
        actor: &Principal,
        ctx: &RequestContext,
        id: &str,
        req: UpdateKeyRequest,
    ) -> Result<KeyView, KeyError> {
        let _guard = self.writes.lock().await;
        let mut record = self.manageable_key(actor, id).await?;
        if record.revoked_at.is_some() {
            return Err(KeyError::Conflict("a revoked key cannot be changed".into()));
        }
        if let Some(name) = req.name {
            record.name = api::validate_name(&name)?;
        }
        if let Some(description) = req.description {
            record.description = api::validate_description(description)?;
        }
        if let Some((scopes, granted)) = api::resolve_scopes(req.scopes, req.profile)? {
            require_superset(actor, granted, "grant scopes you do not hold")?;
            record.scopes = scopes;
        }
        if let Some(limits) = req.rate_limits {
            record.rate_limits = api::validate_rate_limits(limits)?;
        }
        if let Some(ips) = req.allowed_ips {
            record.allowed_ips = api::validate_allowed_ips(ips)?;
        }
        if let Some(metadata) = req.metadata {
            record.metadata = api::validate_metadata(metadata)?;
        }
        if let Some(expires_at) = req.expires_at {
            record.expires_at = bounded_expiry(actor, expires_at, Timestamp::now(), "expiresAt")?;
            record.expiry_recorded = false;
        }
        let mut quota_changes = Vec::new();
        if let Some(limit) = req.executions_limit {
            quota_changes.push(QuotaChange::SetLimit(limit));
        }
        if let Some(refill) = req.executions_refill {
            let limit = req
                .executions_limit
                .unwrap_or(self.store.get_quota(&record.quota_id).await?.limit);
            let refill = refill.map(|r| api::validate_refill(r, limit)).transpose()?;
            quota_changes.push(QuotaChange::SetRefill(refill));
        }
        let audit = lifecycle_row("key.updated", &record, Some(actor), ctx);
        if !quota_changes.is_empty() {
            self.store
                .change_quota(&record.quota_id, &quota_changes, &[])
                .await?;
        }
        self.store
            .save_keys(&[record.clone()], &[], &[audit])
            .await?;
        self.publish().await?;
        self.announce("key.updated", &record, None).await;
        Ok(self.view(&record))
    }

    pub async fn revoke_key(
        &self,
        actor: &Principal,
        ctx: &RequestContext,
        id: &str,
    ) -> Result<(), KeyError> {
        let _guard = self.writes.lock().await;
        let mut record = self.manageable_key(actor, id).await?;
        if record.revoked_at.is_some() {
            return Ok(());
        }
        record.revoked_at = Some(Timestamp::now());
        let audit = lifecycle_row("key.revoked", &record, Some(actor), ctx);
        self.store
            .save_keys(std::slice::from_ref(&record), &[], &[audit])
            .await?;
        self.publish().await?;
        self.announce("key.revoked", &record, None).await;
        Ok(())
    }

    /// Issues a new key with the same settings; the old one works for `grace_sec` more
    /// (never past its own expiry). Both share one executions counter.
    pub async fn rotate_key(
        &self,
        actor: &Principal,
        ctx: &RequestContext,
        id: &str,
        grace_sec: Option<u64>,
    ) -> Result<CreatedKey, KeyError> {
        let _guard = self.writes.lock().await;
        let now = Timestamp::now();
        let grace = bounded_secs("gracePeriodSec", grace_sec.unwrap_or(DEFAULT_GRACE_SEC))?;
        let mut old = self.manageable_key(actor, id).await?;
        if !old.is_active_at(now) {
            return Err(KeyError::Conflict(
                "only an active key can be rotated".into(),
            ));
        }
        let secret = format::generate_key(old.env);
        let new = KeyRecord {
            id: format::random_id("key_", 24),
            prefix: format::prefix_of(secret.expose())
                .unwrap_or_default()
                .to_owned(),
            hash: format::hash_key(secret.expose()),
            created_at: now,
            last_used_at: None,
            request_count: 0,
            rotated_from: Some(old.id.clone()),
            created_by: actor_id(actor),
            expiry_recorded: false,
            ..old.clone()
        };
        let grace_end = now.plus_secs(grace);
        old.expires_at = Some(old.expires_at.map_or(grace_end, |e| e.min(grace_end)));
        let mut rotated = lifecycle_row("key.rotated", &old, Some(actor), ctx);
        rotated.reason = Some(format!("replaced by {}", new.id));
        let created = lifecycle_row("key.created", &new, Some(actor), ctx);
        self.store
            .save_keys(&[old.clone(), new.clone()], &[], &[rotated, created])
            .await?;
        self.publish().await?;
        self.announce("key.rotated", &old, Some(("replacedBy", &new.id)))
            .await;
        self.announce("key.created", &new, None).await;
        Ok(CreatedKey {
            key: self.view(&new),
            secret: secret.expose().to_owned(),
        })
    }

    pub async fn reset_executions(
        &self,
        actor: &Principal,
        ctx: &RequestContext,
        id: &str,
        remaining: Option<u64>,
    ) -> Result<KeyView, KeyError> {
        let _guard = self.writes.lock().await;
        let record = self.visible_key(actor, id).await?;
        let mut audit = lifecycle_row("key.updated", &record, Some(actor), ctx);
        audit.reason = Some("executions reset".into());
        self.store
            .change_quota(&record.quota_id, &[QuotaChange::Reset(remaining)], &[audit])
            .await?;
        self.publish().await?;
        self.announce("key.updated", &record, None).await;
        Ok(self.view(&record))
    }
}

/// The caller as `GET /v1/auth/whoami` shows it.
fn whoami_of(p: &Principal, quota: QuotaRecord) -> WhoAmI {
    let counters = WhoAmICounters::of(&quota);
    WhoAmI {
        key_id: p.key_id.clone(),
        name: p.name.clone(),
        prefix: p.key_prefix.clone(),
        tenant: p.tenant.clone(),
        env: p.env,
        scopes: p.scope_names.clone(),
        expires_at: p.expires_at,
        rate_limits: p.rate_limits.clone(),
        allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
        executions_limit: counters.executions_limit,
        executions_remaining: counters.executions_remaining,
        executions_refill: counters.executions_refill,
        next_refill_at: counters.next_refill_at,
    }
}

/// `p`'s whoami JSON without its counters' members and the closing `}`, when it
/// ends with them.
fn whoami_head(p: &Principal) -> Option<Box<[u8]>> {
    let mut whole = serde_json::to_vec(&whoami_of(p, UNLIMITED)).expect("plain data serializes");
    let counters =
        serde_json::to_vec(&WhoAmICounters::of(&UNLIMITED)).expect("plain data serializes");
    // Both end with the same members and `}`; the head keeps the `,` before them.
    let tail = counters.get(1..)?;
    if !whole.ends_with(tail) {
        return None;
    }
    whole.truncate(whole.len() - tail.len());
    Some(whole.into_boxed_slice())
}

/// The whoami JSON of a key whose [`whoami_head`] is `head`, with the counters
/// of `quota` (the cached counter; refills due by now are added).
fn whoami_with(head: &[u8], quota: Option<QuotaRecord>) -> Vec<u8> {
    let quota = match quota {
        Some(q) if q.refill.is_some() => crate::quota::refilled(q, Timestamp::now()),
        Some(q) => q,
        None => UNLIMITED,
    };
    let mut out = Vec::with_capacity(head.len() + 160);
    out.extend_from_slice(head);
    if (quota.limit, quota.remaining, quota.refill) == (None, None, None) {
        out.extend_from_slice(unlimited_counters());
        return out;
    }
    serde_json::to_writer(&mut out, &WhoAmICounters::of(&quota)).expect("plain data serializes");
    // The counters' own `{`: the head already opened the object.
    out.remove(head.len());
    out
}

/// The counters' members of a key without an executions limit, and the closing
/// `}`: the same for every such key.
fn unlimited_counters() -> &'static [u8] {
    static TAIL: OnceLock<Vec<u8>> = OnceLock::new();
    TAIL.get_or_init(|| {
        let mut counters =
            serde_json::to_vec(&WhoAmICounters::of(&UNLIMITED)).expect("plain data serializes");
        counters.remove(0);
        counters
    })
}

const UNLIMITED: QuotaRecord = QuotaRecord {
    limit: None,
    remaining: None,
    refill: None,
    refilled_at: None,
};

fn actor_id(actor: &Principal) -> Option<String> {
    (actor.source != CredentialSource::LocalOperator).then(|| actor.key_id.clone())
}

fn forbidden(scope: Scope, message: &str) -> KeyError {
    KeyError::Forbidden {
        required_scope: scope,
        message: message.to_owned(),
    }
}

fn require_superset(actor: &Principal, wanted: ScopeSet, what: &str) -> Result<(), KeyError> {
    match wanted.iter().find(|s| !actor.has(*s)) {
        None => Ok(()),
        Some(missing) => Err(forbidden(
            missing,
            &format!("cannot {what}: missing scope {missing}"),
        )),
    }
}

fn bounded_secs(field: &'static str, secs: u64) -> Result<i64, InvalidField> {
    if secs > MAX_DURATION_SEC {
        return Err(invalid(
            field,
            format!("{field} must be at most {MAX_DURATION_SEC}"),
        ));
    }
    Ok(secs as i64)
}

/// A key never outlives the key that made it, and never expires in the past.
fn bounded_expiry(
    actor: &Principal,
    wanted: Option<Timestamp>,
    now: Timestamp,
    field: &'static str,
) -> Result<Option<Timestamp>, KeyError> {
    if wanted.is_some_and(|t| t <= now) {
        return Err(invalid(field, format!("{field} must be in the future")).into());
    }
    match (actor.expires_at, wanted) {
        (Some(limit), Some(t)) if t > limit => Err(forbidden(
            Scope::TenantsManage,
            "a key cannot outlive the key that manages it",
        )),
        (Some(limit), None) => Ok(Some(limit)),
        (_, wanted) => Ok(wanted),
    }
}

fn lifecycle_row(
    event: &str,
    key: &KeyRecord,
    actor: Option<&Principal>,
    ctx: &RequestContext,
) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: Timestamp::now(),
        event: event.to_owned(),
        client_ip: ctx.client_ip.clone(),
        method: ctx.method.clone(),
        path: ctx.path.clone(),
        key_id: Some(key.id.clone()),
        key_prefix: Some(key.prefix.clone()),
        actor_key_id: actor.map(|a| match a.source {
            CredentialSource::LocalOperator => "local-operator".to_owned(),
            _ => a.key_id.clone(),
        }),
        tenant: Some(key.tenant.clone()),
        env: Some(key.env),
        outcome: Outcome::Allowed,
        reason: None,
        request_id: ctx.request_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RateLimit;
    use crate::store::SqliteStore;

    #[tokio::test]
    async fn whoami_json_is_the_serialized_whoami() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let keys = KeyService::load(Arc::new(store)).await.unwrap();
        let admin = keys.bootstrap_admin().await.unwrap().unwrap().secret;
        let admin = keys.verify(&admin).await.unwrap().unwrap();
        let ctx = RequestContext::default();
        let create = |req: CreateKeyRequest| keys.create_key(&admin, &ctx, req);
        let limited = create(CreateKeyRequest {
            name: "with \"quotes\" and ünïcode".into(),
            rate_limits: Some(vec![RateLimit {
                limit: 5,
                window_sec: 60,
            }]),
            executions_limit: Some(3),
            executions_refill: Some(Refill {
                amount: 2,
                interval_sec: 3600,
            }),
            allowed_ips: Some(vec!["10.0.0.0/8".into(), "::1".into()]),
            expires_in_sec: Some(3600),
            ..CreateKeyRequest::default()
        })
        .await
        .unwrap();
        let plain = create(CreateKeyRequest {
            name: "plain".into(),
            ..CreateKeyRequest::default()
        })
        .await
        .unwrap();
        for secret in [&limited.secret, &plain.secret] {
            let p = keys.verify(secret).await.unwrap().unwrap();
            let expected = serde_json::to_vec(&keys.whoami(&p)).unwrap();
            // First use renders the head, the second takes it from the cache.
            assert_eq!(keys.whoami_json(&p), expected);
            let cached = HOT.with_borrow(|hot| {
                hot.keys.iter().any(|k| {
                    Arc::ptr_eq(&k.principal, &p)
                        && k.whoami_head.get().is_some_and(Option::is_some)
                })
            });
            assert!(cached, "the head of a cached key is kept");
            assert_eq!(keys.whoami_json(&p), expected);
            if p.key_id == limited.key.id {
                keys.consume_execution(&p).await.unwrap();
                let after = keys.whoami_json(&p);
                assert_eq!(after, serde_json::to_vec(&keys.whoami(&p)).unwrap());
                assert_ne!(after, expected, "the counters move");
            }
        }
        // A principal the cache does not hold is rendered whole.
        let local = Arc::new(Principal::local_operator());
        assert_eq!(
            keys.whoami_json(&local),
            serde_json::to_vec(&keys.whoami(&local)).unwrap()
        );
    }

    /// A thread's copy of a key is what the key is now: a revocation counts at
    /// once, on this thread and every other, and so does the key's expiry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_threads_copy_of_a_key_never_outlives_a_change_or_the_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let keys = Arc::new(KeyService::load(Arc::new(store)).await.unwrap());
        let admin = keys.bootstrap_admin().await.unwrap().unwrap().secret;
        let admin = keys.verify(&admin).await.unwrap().unwrap();
        let ctx = RequestContext::default();
        let created = keys
            .create_key(
                &admin,
                &ctx,
                CreateKeyRequest {
                    name: "soon revoked".into(),
                    ..CreateKeyRequest::default()
                },
            )
            .await
            .unwrap();
        let secret = created.secret.clone();
        // Verified on two threads, twice each: the second is this thread's copy.
        let on_threads = |keys: &Arc<KeyService>| {
            (0..2)
                .map(|_| {
                    let (keys, secret) = (Arc::clone(keys), secret.clone());
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        rt.block_on(async {
                            let first = keys.verify(&secret).await;
                            let second = keys.verify(&secret).await;
                            (first.map(|p| p.is_some()), second.map(|p| p.is_some()))
                        })
                    })
                })
                .map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        };
        let first = keys.verify(&secret).await.unwrap().unwrap();
        let again = keys.verify(&secret).await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the thread's own copy");
        for (a, b) in on_threads(&keys) {
            assert!(matches!((a, b), (Ok(true), Ok(true))));
        }
        keys.revoke_key(&admin, &ctx, &created.key.id)
            .await
            .unwrap();
        let refused = keys.verify(&secret).await.unwrap_err();
        assert_eq!(refused.failure, AuthFailure::Revoked);
        for (a, b) in on_threads(&keys) {
            for verdict in [a, b] {
                assert_eq!(verdict.unwrap_err().failure, AuthFailure::Revoked);
            }
        }

        let expiring = keys
            .create_key(
                &admin,
                &ctx,
                CreateKeyRequest {
                    name: "short-lived".into(),
                    expires_in_sec: Some(1),
                    ..CreateKeyRequest::default()
                },
            )
            .await
            .unwrap();
        let secret = expiring.secret.clone();
        keys.verify(&secret).await.unwrap().unwrap();
        keys.verify(&secret).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let refused = keys.verify(&secret).await.unwrap_err();
        assert_eq!(refused.failure, AuthFailure::Expired);
    }
}
