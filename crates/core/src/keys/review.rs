//! What an operator should look at this week (`GET /v1/keys/review`,
//! `sandgate keys audit`): keys nobody has used for a month, keys about to expire,
//! and keys that are refused unusually often.

use std::collections::HashMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::keys::api::KeyView;
use crate::model::Timestamp;
use crate::usage::{UsageRow, day_of};

/// Unused for this long (or never used and created this long ago).
pub const UNUSED_DAYS: i64 = 30;
/// Expiring within this many days.
pub const EXPIRING_DAYS: i64 = 7;
/// Denials are counted over this many days, today included.
pub const DENIAL_DAYS: i64 = 7;
/// At least this many denied requests…
pub const DENIAL_MIN: u64 = 20;
/// …making up at least this share (percent) of the key's requests.
pub const DENIAL_MIN_PERCENT: u64 = 10;

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReviewEntry {
    #[serde(flatten)]
    pub key: KeyView,
    /// Why the key is listed, in words.
    pub reason: String,
    /// Allowed and denied requests over the last [`DENIAL_DAYS`] days.
    pub recent_requests: u64,
    pub recent_denied: u64,
}

#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyReview {
    pub unused: Vec<ReviewEntry>,
    pub expiring: Vec<ReviewEntry>,
    pub unusual_denials: Vec<ReviewEntry>,
}

/// The usage days a review needs: the last [`DENIAL_DAYS`] days up to `now`.
pub fn usage_days(now: Timestamp) -> (i64, i64) {
    let today = day_of(now);
    (today - (DENIAL_DAYS - 1), today)
}

/// Sorts active keys into the three lists (a key may be in several).
pub fn review(keys: Vec<KeyView>, usage: &[UsageRow], now: Timestamp) -> KeyReview {
    let mut recent: HashMap<&str, (u64, u64)> = HashMap::new();
    for row in usage {
        let e = recent.entry(row.key_id.as_str()).or_default();
        e.0 += row.counts.requests;
        e.1 += row.counts.denied_requests;
    }
    let day_ms = 86_400_000;
    let mut out = KeyReview::default();
    for key in keys.into_iter().filter(|k| k.is_active) {
        let (requests, denied) = recent.get(key.id.as_str()).copied().unwrap_or_default();
        let entry = |reason: String| ReviewEntry {
            key: key.clone(),
            reason,
            recent_requests: requests,
            recent_denied: denied,
        };
        let idle_since = key.last_used_at.unwrap_or(key.created_at);
        let idle_days = (now.millis() - idle_since.millis()) / day_ms;
        if idle_days >= UNUSED_DAYS {
            out.unused.push(entry(match key.last_used_at {
                Some(_) => format!("not used for {idle_days} days"),
                None => format!("never used, created {idle_days} days ago"),
            }));
        }
        if let Some(expires) = key.expires_at {
            let left = expires.millis() - now.millis();
            if left > 0 && left <= EXPIRING_DAYS * day_ms {
                let hours = left / 3_600_000;
                out.expiring.push(entry(format!(
                    "expires in {} days {} hours",
                    hours / 24,
                    hours % 24
                )));
            }
        }
        let attempts = requests + denied;
        if denied >= DENIAL_MIN && denied * 100 >= attempts * DENIAL_MIN_PERCENT {
            out.unusual_denials.push(entry(format!(
                "{denied} of {attempts} requests denied in the last {DENIAL_DAYS} days"
            )));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::UsageCounts;

    fn key(
        id: &str,
        created_days_ago: i64,
        last_used_days_ago: Option<i64>,
        expires_in_days: Option<i64>,
        now: Timestamp,
    ) -> KeyView {
        let day = 86_400_000;
        let at = |d: i64| Timestamp::from_millis(now.millis() - d * day);
        let json = serde_json::json!({
            "id": id, "name": id, "description": null, "prefix": "sg_live_abcd", "env": "live",
            "tenant": "default", "scopes": [], "createdAt": at(created_days_ago),
            "expiresAt": expires_in_days.map(|d| at(-d)), "revokedAt": null,
            "lastUsedAt": last_used_days_ago.map(at), "requestCount": 0, "isActive": true,
            "rateLimits": [], "executionsLimit": null, "executionsRemaining": null,
            "allowedIps": [], "metadata": {}, "rotatedFrom": null
        });
        serde_json::from_value(json).expect("a key view")
    }

    #[test]
    fn keys_are_sorted_into_what_needs_a_look() {
        let now = Timestamp::now();
        let keys = vec![
            key("fresh", 1, Some(0), None, now),
            key("idle", 90, Some(31), None, now),
            key("never", 40, None, None, now),
            key("young-never", 3, None, None, now),
            key("expiring", 10, Some(0), Some(3), now),
            key("later", 10, Some(0), Some(30), now),
            key("denied", 10, Some(0), None, now),
            key("few-denied", 10, Some(0), None, now),
        ];
        let row = |k: &str, requests, denied| UsageRow {
            day: day_of(now),
            key_id: k.into(),
            tenant: "default".into(),
            env: crate::model::Env::Live,
            counts: UsageCounts {
                requests,
                denied_requests: denied,
                ..UsageCounts::default()
            },
        };
        let usage = [
            row("denied", 100, 40),
            row("few-denied", 1000, 25),
            row("fresh", 5, 0),
        ];
        let r = review(keys, &usage, now);
        let ids = |v: &[ReviewEntry]| v.iter().map(|e| e.key.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&r.unused), ["idle", "never"]);
        assert_eq!(ids(&r.expiring), ["expiring"]);
        assert_eq!(ids(&r.unusual_denials), ["denied"]);
        assert_eq!(r.unusual_denials[0].recent_denied, 40);
        assert!(r.unused[1].reason.starts_with("never used"));
    }
}
