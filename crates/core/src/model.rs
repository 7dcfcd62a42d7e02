//! Plain data shared by the services and the storage backends: envs, timestamps,
//! stored key rows, audit rows, webhooks and their deliveries. No behaviour beyond conversions lives here.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::keys::format::{KeyHash, SecretKey};

/// The partition a key lives in: `live` and `test` data never meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Env {
    Live,
    Test,
}

impl Env {
    pub fn as_str(self) -> &'static str {
        match self {
            Env::Live => "live",
            Env::Test => "test",
        }
    }
}

impl FromStr for Env {
    type Err = String;
    fn from_str(s: &str) -> Result<Env, String> {
        match s {
            "live" => Ok(Env::Live),
            "test" => Ok(Env::Test),
            other => Err(format!("env must be `live` or `test`, not `{other}`")),
        }
    }
}

impl fmt::Display for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point in time with millisecond precision, shown as an RFC 3339 UTC string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        // Straight from the clock: `OffsetDateTime::now_utc` would first compute the
        // calendar date, which the hot path (several calls a request) never needs.
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    pub fn from_millis(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn plus_secs(self, secs: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(secs.saturating_mul(1000)))
    }

    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        Some(Timestamp((t.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom("expected an RFC 3339 time"))
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time"})
    }
}

/// One rate limit of a key: at most `limit` requests per `window_sec` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub limit: u32,
    pub window_sec: u32,
}

/// `executionsRefill`: every `intervalSec` seconds, `amount` executions are added
/// back to what remains, never beyond the executions limit; intervals that passed
/// unseen are all caught up, with the same cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Refill {
    #[schemars(range(min = 1))]
    pub amount: u64,
    #[schemars(range(min = 1))]
    pub interval_sec: u64,
}

/// A stored API key. Carries the hash, never the plaintext.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub env: Env,
    pub tenant: String,
    /// Scope names as granted (wildcards kept, profiles expanded).
    pub scopes: Vec<String>,
    pub prefix: String,
    pub hash: KeyHash,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    pub request_count: u64,
    pub rate_limits: Vec<RateLimit>,
    pub allowed_ips: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// Keys rotated from one another share one executions counter.
    pub quota_id: String,
    /// The key this one replaced by rotation.
    pub rotated_from: Option<String>,
    /// The key that created this one (`None` for bootstrap keys).
    pub created_by: Option<String>,
    /// Set once the `key.expired` audit event has been written.
    pub expiry_recorded: bool,
}

impl KeyRecord {
    pub fn is_active_at(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// The executions counter of a key (or of a family of rotated keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRecord {
    /// `None` = unlimited.
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Executions given back on a schedule; only with a limit.
    pub refill: Option<Refill>,
    /// Where the refill schedule stands: refills fall at this time plus whole
    /// multiples of the interval. Set with the refill, moved by each refill.
    pub refilled_at: Option<Timestamp>,
}

impl QuotaRecord {
    /// A counter of `limit` executions, all remaining, without refill.
    pub fn new(limit: Option<u64>) -> QuotaRecord {
        QuotaRecord {
            limit,
            remaining: limit,
            refill: None,
            refilled_at: None,
        }
    }
}

/// Whether an audited attempt was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
        }
    }
}

/// One row of the audit log: an authentication attempt or a key lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Store-assigned sequence number; also the pagination cursor.
    #[serde(skip)]
    pub seq: i64,
    pub time: Timestamp,
    /// `auth`, `key.created`, `key.updated`, `key.rotated`, `key.revoked`, `key.expired`.
    pub event: String,
    pub client_ip: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub key_id: Option<String>,
    pub key_prefix: Option<String>,
    /// The key that performed a lifecycle change, when not the key itself.
    pub actor_key_id: Option<String>,
    /// Tenant and env the row belongs to, when known (unknown credentials: none).
    pub tenant: Option<String>,
    pub env: Option<Env>,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub request_id: Option<String>,
}

/// Filters of an audit listing.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// `None` = every tenant (operators only).
    pub tenant_env: Option<(String, Env)>,
    pub key_id: Option<String>,
    pub outcome: Option<Outcome>,
    pub event: Option<String>,
    /// Rows with `seq` below this (newest first).
    pub before_seq: Option<i64>,
    pub limit: u32,
}

/// A registered webhook: where a tenant's events go. The secret is kept as is
/// (it must sign every delivery) and is never logged.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRecord {
    pub id: String,
    /// The tenant and env whose events it receives (those of the key that made it).
    pub tenant: String,
    pub env: Env,
    pub url: String,
    /// Event types, or `*` for every type.
    pub events: Vec<String>,
    pub secret: SecretKey,
    pub created_at: Timestamp,
    /// The key that created it.
    pub created_by: Option<String>,
}

impl WebhookRecord {
    pub fn wants(&self, event_type: &str) -> bool {
        self.events.iter().any(|e| e == "*" || e == event_type)
    }
}

/// One event, serialized once: the exact bytes every delivery sends and signs.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: String,
    pub event_type: String,
    pub created_at: Timestamp,
    /// The JSON body `{"id", "type", "createdAt", "data"}`.
    pub body: String,
}

/// A delivery that is due, claimed by a worker, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub body: String,
    pub url: String,
    pub secret: SecretKey,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    pub at: Timestamp,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Why it failed, when it did (no secrets: a status or a transport error).
    pub error: Option<String>,
    pub delivered: bool,
    /// When to try again; `None` = no more attempts (delivered or given up).
    pub next_attempt_at: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_as_rfc3339_utc() {
        let t = Timestamp::from_millis(1_764_043_571_123);
        let s = t.to_string();
        assert_eq!(s, "2025-11-25T04:06:11.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&s), Some(t));
        assert_eq!(
            Timestamp::parse_rfc3339("2025-11-25T05:06:11.123+01:00"),
            Some(t)
        );
        assert_eq!(Timestamp::parse_rfc3339("yesterday"), None);
    }
}
