//! Storage traits, one per kind of state, and their backends.
//!
//! Services talk to `dyn KeyStore` / `dyn AuditStore` / `dyn WebhookStore` only; SQL lives in the
//! backends (`sqlite` today, PostgreSQL later). Every mutating call is one
//! transaction: a key change and the audit rows that describe it commit together
//! or not at all. Backends never decide policy.

use std::sync::Arc;

use async_trait::async_trait;

use crate::audit::AuthAttempt;

use crate::model::{
    AuditQuery, AuditRecord, DeliveryAttempt, DueDelivery, Env, EventRecord, KeyRecord,
    QuotaRecord, Refill, Timestamp, WebhookRecord,
};
use crate::usage::{UsageQuery, UsageRow};

pub mod audit_batch;
pub mod sqlite;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("a key with this hash already exists")]
    DuplicateKey,
    #[error("no quota `{0}`")]
    NoQuota(String),
}

/// Why an execution could not be taken from a quota.
#[derive(Debug, thiserror::Error)]
pub enum QuotaExhausted {
    #[error("no executions remain")]
    Exhausted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Request-count and last-use increments gathered off the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: String,
    pub requests: u64,
    pub last_used_at: Timestamp,
}

/// What changed since a revision: the cache applies it and remembers `rev`.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub keys: Vec<KeyRecord>,
    pub quotas: Vec<(String, QuotaRecord)>,
    pub rev: i64,
}

/// How a quota's counter changes, applied atomically against concurrent use, after
/// the refills due (see [`crate::quota::apply_change`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaChange {
    /// A new limit (`None` = unlimited, which drops the refill); `remaining` moves
    /// by the difference, never below 0.
    SetLimit(Option<u64>),
    /// Set `remaining` outright (`None` = back to the limit).
    Reset(Option<u64>),
    /// A new refill (its first interval starts now), or none.
    SetRefill(Option<Refill>),
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Inserts or replaces keys (usage columns untouched), creates missing quotas with
    /// the given values, and appends audit rows, in one transaction.
    async fn save_keys(
        &self,
        keys: &[KeyRecord],
        new_quotas: &[(String, QuotaRecord)],
        audit: &[AuditRecord],
    ) -> Result<(), StoreError>;

    async fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    async fn count_keys(&self) -> Result<u64, StoreError>;

    /// Keys and quotas changed after `rev` (0 = everything).
    async fn changes_since(&self, rev: i64) -> Result<Changes, StoreError>;

    async fn add_key_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError>;

    async fn get_quota(&self, quota_id: &str) -> Result<QuotaRecord, StoreError>;

    /// Applies the refills due, then `changes` in order, and appends `audit`, in one
    /// transaction; returns the new state.
    async fn change_quota(
        &self,
        quota_id: &str,
        changes: &[QuotaChange],
        audit: &[AuditRecord],
    ) -> Result<QuotaRecord, StoreError>;

    /// Applies the refills due and takes one execution, atomically; returns the
    /// counter after (its `remaining` is `None` when the quota is unlimited).
    /// `Err(Exhausted)` when none is left, refills included.
    async fn consume_execution(&self, quota_id: &str) -> Result<QuotaRecord, QuotaExhausted>;

    /// Marks keys whose `key.expired` event is written, with that event, atomically.
    async fn record_expiries(
        &self,
        key_ids: &[String],
        audit: &[AuditRecord],
    ) -> Result<(), StoreError>;
}

#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends one row (event `auth`) per attempt, in order, in one transaction.
    /// Shared, not copied: the caller reuses the batch once the store lets go of it.
    /// Committed when this returns, but it may not be on disk until
    /// [`AuditStore::sync_auth_attempts`]: a crash of the process loses nothing
    /// written, a power loss what was not synced.
    async fn append_auth_attempts(&self, batch: Arc<Vec<AuthAttempt>>) -> Result<(), StoreError>;

    /// Puts every attempt appended so far on disk.
    async fn sync_auth_attempts(&self) -> Result<(), StoreError>;

    /// Newest first.
    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;

    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}

#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// Adds each row's counts to the stored (day, key) totals, in one transaction.
    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError>;

    async fn query_usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;
}

#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    async fn insert_webhook(&self, hook: &WebhookRecord) -> Result<(), StoreError>;

    /// The webhooks of one tenant and env, oldest first.
    async fn list_webhooks(&self, tenant: &str, env: Env)
    -> Result<Vec<WebhookRecord>, StoreError>;

    /// Deletes a webhook of that tenant and env, with its pending deliveries.
    /// `false` when there is no such webhook there.
    async fn delete_webhook(&self, tenant: &str, env: Env, id: &str) -> Result<bool, StoreError>;

    /// Writes one delivery, due now, for every webhook of `tenant` + `env` that wants
    /// the event's type, in one transaction; returns how many. With `once`, a marker
    /// is recorded in the same transaction and an event whose marker is already there
    /// is not enqueued again (returns 0).
    async fn enqueue_event(
        &self,
        tenant: &str,
        env: Env,
        event: &EventRecord,
        once: Option<&str>,
    ) -> Result<usize, StoreError>;

    /// Takes up to `limit` deliveries due at `now` and leases them until `lease_until`
    /// (a worker that dies mid-delivery leaves them to be retried then).
    async fn claim_due_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError>;

    /// Records one attempt of a delivery.
    async fn record_attempt(
        &self,
        delivery_id: i64,
        attempt: &DeliveryAttempt,
    ) -> Result<(), StoreError>;
}
