//! The JSON shapes of the key API (SPEC §5): requests with their validation, and
//! the key object. Shared by the HTTP edge, the offline CLI and the OpenAPI document.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{Env, KeyRecord, QuotaRecord, RateLimit, Refill, Timestamp};
use crate::net::IpNet;
use crate::scopes::{Profile, ScopeSet};

/// A request field that failed validation; becomes `400 INVALID_REQUEST` with `field`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

pub fn invalid(field: &'static str, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Scope names, wildcards allowed. Without scopes or profile: `sandbox-user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Default: the creator's env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Env>,
    /// Default: the creator's tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<Vec<RateLimit>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executions_limit: Option<u64>,
    /// Every `intervalSec`, `amount` executions are added back, up to the limit
    /// (which it needs). The first refill falls `intervalSec` after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executions_refill: Option<Refill>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `PATCH /v1/keys/{id}`: absent fields stay; `null` clears the nullable ones.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateKeyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub description: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<Vec<RateLimit>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<u64>")]
    pub executions_limit: Option<Option<u64>>,
    /// A new refill (its first interval starts now; the same one again keeps its
    /// schedule), or `null` for none. An unlimited key has none.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<Refill>")]
    pub executions_refill: Option<Option<Refill>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub expires_at: Option<Option<Timestamp>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `POST /v1/keys/{id}/rotate`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateKeyRequest {
    /// How long the old key keeps working; default 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period_sec: Option<u64>,
}

/// `POST /v1/keys/{id}/reset-executions`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResetExecutionsRequest {
    /// Default: the key's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
}

pub(crate) fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The key object of every key response. Never carries the hash or the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub prefix: String,
    pub env: Env,
    pub tenant: String,
    pub scopes: Vec<String>,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    pub request_count: u64,
    pub is_active: bool,
    pub rate_limits: Vec<RateLimit>,
    pub executions_limit: Option<u64>,
    /// Refills included: what the next run finds.
    pub executions_remaining: Option<u64>,
    pub executions_refill: Option<Refill>,
    /// When the next refill falls (`null` without a refill).
    pub next_refill_at: Option<Timestamp>,
    pub allowed_ips: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// The key this one replaced by rotation.
    pub rotated_from: Option<String>,
}

impl KeyView {
    pub fn new(
        record: &KeyRecord,
        quota: QuotaRecord,
        pending_requests: u64,
        now: Timestamp,
    ) -> Self {
        let quota = crate::quota::refilled(quota, now);
        KeyView {
            id: record.id.clone(),
            name: record.name.clone(),
            description: record.description.clone(),
            prefix: record.prefix.clone(),
            env: record.env,
            tenant: record.tenant.clone(),
            scopes: record.scopes.clone(),
            created_at: record.created_at,
            expires_at: record.expires_at,
            revoked_at: record.revoked_at,
            last_used_at: record.last_used_at,
            request_count: record.request_count + pending_requests,
            is_active: record.is_active_at(now),
            rate_limits: record.rate_limits.clone(),
            executions_limit: quota.limit,
            executions_remaining: quota.remaining,
            executions_refill: quota.refill,
            next_refill_at: crate::quota::next_refill_at(&quota),
            allowed_ips: record.allowed_ips.clone(),
            metadata: record.metadata.clone(),
            rotated_from: record.rotated_from.clone(),
        }
    }
}

/// The answer to key creation and rotation: the key object plus the plaintext, once.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: KeyView,
    /// The plaintext key. Shown only in this response.
    #[serde(rename = "key")]
    pub secret: String,
}

/// `GET /v1/auth/whoami`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub key_id: String,
    pub name: String,
    pub prefix: Option<String>,
    pub tenant: String,
    pub env: Env,
    pub scopes: Vec<String>,
    pub expires_at: Option<Timestamp>,
    pub rate_limits: Vec<RateLimit>,
    pub allowed_ips: Vec<String>,
    pub executions_limit: Option<u64>,
    pub executions_remaining: Option<u64>,
    pub executions_refill: Option<Refill>,
    pub next_refill_at: Option<Timestamp>,
}

// ---- validation shared by create and update ----

const MAX_NAME: usize = 128;
const MAX_DESCRIPTION: usize = 1024;
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY: usize = 128;
const MAX_METADATA_VALUE: usize = 1024;
const MAX_RATE_LIMITS: usize = 8;
const MAX_ALLOWED_IPS: usize = 256;
/// Longest rate-limit window: 31 days.
const MAX_WINDOW_SEC: u32 = 31 * 86_400;
/// Longest refill interval: 10 years.
const MAX_REFILL_INTERVAL_SEC: u64 = 10 * 365 * 86_400;

pub(crate) fn validate_name(name: &str) -> Result<String, InvalidField> {
    let name = name.trim();
    if name.is_empty() {
        return Err(invalid("name", "name must not be empty"));
    }
    if name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            format!("name must be at most {MAX_NAME} printable characters"),
        ));
    }
    Ok(name.to_owned())
}

pub(crate) fn validate_description(d: Option<String>) -> Result<Option<String>, InvalidField> {
    match d {
        Some(d) if d.chars().count() > MAX_DESCRIPTION => Err(invalid(
            "description",
            format!("description must be at most {MAX_DESCRIPTION} characters"),
        )),
        Some(d) if d.is_empty() => Ok(None),
        other => Ok(other),
    }
}

pub fn validate_tenant(tenant: &str) -> Result<(), InvalidField> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "tenant",
            "tenant must be 1-64 characters of letters, digits, '-', '_' or '.'",
        ))
    }
}

/// Scope names and the set they grant, from `scopes` or `profile` (not both).
pub(crate) fn resolve_scopes(
    scopes: Option<Vec<String>>,
    profile: Option<String>,
) -> Result<Option<(Vec<String>, ScopeSet)>, InvalidField> {
    match (scopes, profile) {
        (Some(_), Some(_)) => Err(invalid(
            "profile",
            "give either scopes or profile, not both",
        )),
        (Some(names), None) => {
            let set = ScopeSet::parse(&names).map_err(|e| invalid("scopes", e.to_string()))?;
            if set == ScopeSet::EMPTY {
                return Err(invalid("scopes", "a key needs at least one scope"));
            }
            let mut unique = Vec::with_capacity(names.len());
            for n in names {
                if !unique.contains(&n) {
                    unique.push(n);
                }
            }
            Ok(Some((unique, set)))
        }
        (None, Some(p)) => {
            let profile = Profile::parse(&p).map_err(|e| invalid("profile", e.to_string()))?;
            Ok(Some(profile_scopes(profile)))
        }
        (None, None) => Ok(None),
    }
}

pub(crate) fn profile_scopes(profile: Profile) -> (Vec<String>, ScopeSet) {
    let names: Vec<String> = profile
        .scope_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let set = ScopeSet::parse(&names).expect("profiles name known scopes");
    (names, set)
}

pub(crate) fn validate_rate_limits(limits: Vec<RateLimit>) -> Result<Vec<RateLimit>, InvalidField> {
    if limits.len() > MAX_RATE_LIMITS {
        return Err(invalid(
            "rateLimits",
            format!("at most {MAX_RATE_LIMITS} rate limits"),
        ));
    }
    for l in &limits {
        if l.limit == 0 || l.window_sec == 0 || l.window_sec > MAX_WINDOW_SEC {
            return Err(invalid(
                "rateLimits",
                format!("limit must be >= 1 and windowSec between 1 and {MAX_WINDOW_SEC}"),
            ));
        }
    }
    Ok(limits)
}

/// A refill needs a limit to refill up to (`limit` is what the key will have).
pub(crate) fn validate_refill(refill: Refill, limit: Option<u64>) -> Result<Refill, InvalidField> {
    if limit.is_none() {
        return Err(invalid(
            "executionsRefill",
            "executionsRefill needs an executionsLimit to refill up to",
        ));
    }
    if refill.amount == 0 || refill.amount > i64::MAX as u64 {
        return Err(invalid(
            "executionsRefill",
            "executionsRefill.amount must be at least 1",
        ));
    }
    if refill.interval_sec == 0 || refill.interval_sec > MAX_REFILL_INTERVAL_SEC {
        return Err(invalid(
            "executionsRefill",
            format!("executionsRefill.intervalSec must be between 1 and {MAX_REFILL_INTERVAL_SEC}"),
        ));
    }
    Ok(refill)
}

pub(crate) fn validate_allowed_ips(ips: Vec<String>) -> Result<Vec<String>, InvalidField> {
    if ips.len() > MAX_ALLOWED_IPS {
        return Err(invalid(
            "allowedIps",
            format!("at most {MAX_ALLOWED_IPS} entries"),
        ));
    }
    ips.into_iter()
        .map(|ip| {
            ip.parse::<IpNet>()
                .map(|net| net.to_string())
                .map_err(|e| invalid("allowedIps", e.to_string()))
        })
        .collect()
}

pub(crate) fn validate_metadata(
    m: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, InvalidField> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(invalid(
            "metadata",
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    if m.iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE)
    {
        return Err(invalid(
            "metadata",
            format!(
                "metadata keys must be 1-{MAX_METADATA_KEY} bytes and values at most {MAX_METADATA_VALUE}"
            ),
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_str::<CreateKeyRequest>(r#"{"name":"a","scope":["*"]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `scope`"));
    }

    #[test]
    fn patch_distinguishes_null_from_absent() {
        let p: UpdateKeyRequest = serde_json::from_str(r#"{"executionsLimit":null}"#).unwrap();
        assert_eq!(p.executions_limit, Some(None));
        let p: UpdateKeyRequest = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(p.executions_limit, None);
    }

    #[test]
    fn scopes_and_profiles() {
        assert!(resolve_scopes(Some(vec!["*".into()]), Some("admin".into())).is_err());
        let (names, _) = resolve_scopes(None, Some("read-only".into()))
            .unwrap()
            .unwrap();
        assert_eq!(names, ["sandbox:read", "billing:read"]);
        assert_eq!(
            resolve_scopes(Some(vec!["nope".into()]), None)
                .unwrap_err()
                .field,
            "scopes"
        );
        assert!(resolve_scopes(Some(vec![]), None).is_err());
    }

    #[test]
    fn allowed_ips_are_normalised() {
        assert_eq!(
            validate_allowed_ips(vec!["10.0.0.1".into()]).unwrap(),
            ["10.0.0.1/32"]
        );
        assert_eq!(
            validate_allowed_ips(vec!["10.0.0.0/33".into()])
                .unwrap_err()
                .field,
            "allowedIps"
        );
    }
}
