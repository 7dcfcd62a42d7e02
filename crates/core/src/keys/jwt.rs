//! What a verified JWT grants (SPEC §8 item 3): the principal of a token whose
//! signature, expiry and issuer/audience the server crate has already checked.
//! This module only reads claims; it must not do I/O or cryptography.
//!
//! The rule: `sub` is required and names the caller (`jwt_<sub>` in audit rows,
//! never the token). Scopes come from the space-separated `scope` claim (none when
//! absent); the OpenID Connect names (`openid`, `profile`, `email`, …) that identity
//! providers put there are ignored, and any other unknown name rejects the token:
//! a typo never runs with a guess. Tenant and env come from configurable claims
//! (defaults `default` and `live`); an invalid value rejects the token.

use serde_json::{Map, Value};

use super::api;
use super::env_keys::fingerprint;
use super::format::hash_key;
use crate::model::{Env, Timestamp};
use crate::principal::{CredentialSource, Principal};
use crate::scopes::ScopeSet;

/// Scope names identity providers add for OpenID Connect; they grant nothing here.
const OIDC_SCOPES: [&str; 6] = [
    "openid",
    "profile",
    "email",
    "address",
    "phone",
    "offline_access",
];
/// Longest `sub` accepted: it becomes part of a key id.
const MAX_SUBJECT: usize = 200;

/// Which claims carry the tenant and the env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimNames {
    pub tenant: String,
    pub env: String,
}

impl Default for ClaimNames {
    fn default() -> ClaimNames {
        ClaimNames {
            tenant: "tenant".to_owned(),
            env: "env".to_owned(),
        }
    }
}

/// A verified token whose claims sandgate cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token's claims are not a valid grant: {0}")]
pub struct InvalidClaims(pub String);

/// How audit rows name a token's subject.
pub fn jwt_key_id(subject: &str) -> String {
    format!("jwt_{subject}")
}

/// How audit rows name a token that could not be verified: a hash prefix, since
/// its claims (`sub` included) cannot be believed.
pub fn unverified_jwt_id(token: &str) -> String {
    format!("jwt_unverified_{}", fingerprint(&hash_key(token)))
}

/// The subject of verified `claims`, when it is one sandgate can name a caller by.
pub fn subject(claims: &Map<String, Value>) -> Result<&str, InvalidClaims> {
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| InvalidClaims("`sub` is required and must be a string".into()))?;
    if sub.is_empty() || sub.len() > MAX_SUBJECT || sub.chars().any(char::is_control) {
        return Err(InvalidClaims(format!(
            "`sub` must be 1 to {MAX_SUBJECT} bytes without control characters"
        )));
    }
    Ok(sub)
}

/// The principal that verified `claims` grant.
pub fn jwt_principal(
    claims: &Map<String, Value>,
    names: &ClaimNames,
) -> Result<Principal, InvalidClaims> {
    let sub = subject(claims)?;
    let text = |claim: &str| -> Result<Option<&str>, InvalidClaims> {
        match claims.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(InvalidClaims(format!("`{claim}` must be a string"))),
        }
    };
    let tenant = text(&names.tenant)?.unwrap_or("default").to_owned();
    api::validate_tenant(&tenant).map_err(|e| InvalidClaims(format!("tenant: {}", e.message)))?;
    let env = match text(&names.env)? {
        None => Env::Live,
        Some(e) => e.parse().map_err(InvalidClaims)?,
    };
    let scope_names: Vec<String> = text("scope")?
        .unwrap_or_default()
        .split_ascii_whitespace()
        .filter(|s| !OIDC_SCOPES.contains(s))
        .map(str::to_owned)
        .collect();
    let scopes = ScopeSet::parse(&scope_names).map_err(|e| InvalidClaims(e.to_string()))?;
    let expires_at = claims
        .get("exp")
        .and_then(Value::as_i64)
        .map(|secs| Timestamp::from_millis(secs.saturating_mul(1000)));
    Ok(Principal {
        key_id: jwt_key_id(sub),
        key_prefix: None,
        name: sub.to_owned(),
        tenant,
        env,
        scopes,
        scope_names,
        source: CredentialSource::Jwt,
        rate_limits: Vec::new(),
        allowed_ips: Vec::new(),
        expires_at,
        quota_id: None,
        usage: None,
    })
}

/// Whether `credential` has the shape of a compact JWS: three dot-separated
/// base64url parts. A sandgate key never has it.
pub fn looks_like_jwt(credential: &str) -> bool {
    let mut parts = credential.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let base64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !header.is_empty()
        && !payload.is_empty()
        && base64url(header)
        && base64url(payload)
        && base64url(signature)
        && !credential.starts_with("sg_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scopes::Scope;
    use serde_json::json;

    fn claims(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn claims_set_subject_scopes_tenant_and_env() {
        let names = ClaimNames::default();
        let p = jwt_principal(
            &claims(json!({"sub": "alice", "scope": "openid sandbox:read  keys:read", "tenant": "acme", "env": "test", "exp": 2_000_000_000})),
            &names,
        )
        .unwrap();
        assert_eq!(p.key_id, "jwt_alice");
        assert_eq!((p.tenant.as_str(), p.env), ("acme", Env::Test));
        assert!(
            p.has(Scope::SandboxRead) && p.has(Scope::KeysRead) && !p.has(Scope::SandboxCreate)
        );
        assert_eq!(p.scope_names, ["sandbox:read", "keys:read"]);
        assert_eq!(
            p.expires_at,
            Some(Timestamp::from_millis(2_000_000_000_000))
        );
        let p = jwt_principal(&claims(json!({"sub": "bob"})), &names).unwrap();
        assert_eq!((p.tenant.as_str(), p.env), ("default", Env::Live));
        assert_eq!(p.scopes, ScopeSet::EMPTY);
        let custom = ClaimNames {
            tenant: "org".into(),
            env: "stage".into(),
        };
        let p = jwt_principal(
            &claims(json!({"sub": "c", "org": "o1", "stage": "test", "tenant": "x"})),
            &custom,
        )
        .unwrap();
        assert_eq!((p.tenant.as_str(), p.env), ("o1", Env::Test));
    }

    #[test]
    fn invalid_claims_reject_the_token() {
        let names = ClaimNames::default();
        for value in [
            json!({}),
            json!({"sub": ""}),
            json!({"sub": 7}),
            json!({"sub": "a", "scope": "sandbox:reed"}),
            json!({"sub": "a", "scope": ["sandbox:read"]}),
            json!({"sub": "a", "tenant": ""}),
            json!({"sub": "a", "tenant": 3}),
            json!({"sub": "a", "env": "prod"}),
        ] {
            assert!(
                jwt_principal(&claims(value.clone()), &names).is_err(),
                "{value}"
            );
        }
    }

    #[test]
    fn only_three_part_base64url_credentials_look_like_tokens() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        for not in [
            "",
            "a.b",
            "a.b.c.d",
            ".b.c",
            "a..c",
            "a.b.c d",
            "a+b.c.d",
            "sg_live_ab.cd.ef",
            "plain-key",
        ] {
            assert!(!looks_like_jwt(not), "{not}");
        }
        assert!(unverified_jwt_id("a.b.c").starts_with("jwt_unverified_"));
        assert!(!unverified_jwt_id("secret.token.x").contains("secret"));
    }
}
