//! What an auth callback's "yes" grants (SPEC §8): the principal of a credential
//! the callback allowed. The HTTP call itself belongs to the server crate; this
//! module only turns a 200 reply into a [`Principal`], and must not do I/O.
//!
//! The rule: an empty or non-JSON-object body grants tenant `default`, env `live`
//! and the `sandbox-user` profile. A body that is a JSON object may set any of
//! `tenant`, `env`, `scopes` (names and wildcards) or `profile`; absent members keep
//! the defaults, other members are ignored. A member that is present but invalid
//! (an unknown scope, a bad tenant, an env other than `live`/`test`) rejects the
//! whole grant: the request is refused rather than run with a guess.

use serde::Deserialize;

use super::api::{self, InvalidField};
use super::env_keys::fingerprint;
use super::format::hash_key;
use crate::model::Env;
use crate::principal::{CredentialSource, Principal};
use crate::scopes::{Profile, ScopeSet};

/// The members of a callback's JSON reply sandgate reads.
#[derive(Debug, Default, Deserialize)]
struct Grant {
    tenant: Option<String>,
    env: Option<String>,
    scopes: Option<Vec<String>>,
    profile: Option<String>,
}

/// A 200 reply whose JSON object sandgate cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the auth callback's reply is not a valid grant: {0}")]
pub struct InvalidGrant(pub String);

impl From<InvalidField> for InvalidGrant {
    fn from(e: InvalidField) -> InvalidGrant {
        InvalidGrant(format!("{}: {}", e.field, e.message))
    }
}

/// How audit rows and logs name a credential the callback judged: `callback_` and a
/// hash prefix, never the credential itself.
pub fn callback_key_id(credential: &str) -> String {
    format!("callback_{}", fingerprint(&hash_key(credential)))
}

/// The principal the callback's 200 reply `body` grants to `credential`.
pub fn callback_principal(credential: &str, body: &[u8]) -> Result<Principal, InvalidGrant> {
    let grant = parse_grant(body)?;
    let tenant = grant.tenant.unwrap_or_else(|| "default".to_owned());
    api::validate_tenant(&tenant)?;
    let env = match grant.env {
        None => Env::Live,
        Some(e) => e.parse().map_err(InvalidGrant)?,
    };
    let (scope_names, scopes) = match (grant.scopes, grant.profile) {
        (Some(_), Some(_)) => {
            return Err(InvalidGrant("give scopes or profile, not both".into()));
        }
        (Some(names), None) => {
            let set = ScopeSet::parse(&names).map_err(|e| InvalidGrant(e.to_string()))?;
            (names, set)
        }
        (None, Some(p)) => {
            let profile = Profile::parse(&p).map_err(|e| InvalidGrant(e.to_string()))?;
            api::profile_scopes(profile)
        }
        (None, None) => api::profile_scopes(Profile::SandboxUser),
    };
    Ok(Principal {
        key_id: callback_key_id(credential),
        key_prefix: None,
        name: "auth callback".to_owned(),
        tenant,
        env,
        scopes,
        scope_names,
        source: CredentialSource::Callback,
        rate_limits: Vec::new(),
        allowed_ips: Vec::new(),
        expires_at: None,
        quota_id: None,
        usage: None,
    })
}

fn parse_grant(body: &[u8]) -> Result<Grant, InvalidGrant> {
    let text = String::from_utf8_lossy(body);
    if !text.trim_start().starts_with('{') {
        return Ok(Grant::default());
    }
    serde_json::from_str(&text).map_err(|e| InvalidGrant(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scopes::Scope;

    #[test]
    fn an_empty_or_plain_reply_grants_the_defaults() {
        for body in [&b""[..], b"OK", b"  \n", b"[1]"] {
            let p = callback_principal("tok", body).unwrap();
            assert_eq!((p.tenant.as_str(), p.env), ("default", Env::Live));
            assert!(p.has(Scope::SandboxExecute) && !p.has(Scope::KeysRead));
            assert_eq!(p.source, CredentialSource::Callback);
        }
    }

    #[test]
    fn a_json_object_sets_tenant_env_and_scopes() {
        let body = br#"{"tenant": "acme", "env": "test", "scopes": ["sandbox:read"], "user": 7}"#;
        let p = callback_principal("tok", body).unwrap();
        assert_eq!((p.tenant.as_str(), p.env), ("acme", Env::Test));
        assert!(p.has(Scope::SandboxRead) && !p.has(Scope::SandboxCreate));
        assert_eq!(p.scope_names, ["sandbox:read"]);
        let p = callback_principal("tok", br#"{"profile": "read-only"}"#).unwrap();
        assert!(p.has(Scope::BillingRead) && !p.has(Scope::SandboxExecute));
        let p = callback_principal("tok", br#"{"scopes": []}"#).unwrap();
        assert_eq!(p.scopes, ScopeSet::EMPTY);
    }

    #[test]
    fn invalid_members_reject_the_grant() {
        for body in [
            &br#"{"scopes": ["sandbox:read", "sandbox:reed"]}"#[..],
            br#"{"env": "prod"}"#,
            br#"{"tenant": ""}"#,
            br#"{"profile": "root"}"#,
            br#"{"scopes": "sandbox:read"}"#,
            br#"{"scopes": ["*"], "profile": "admin"}"#,
            b"{not json",
        ] {
            assert!(
                callback_principal("tok", body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_key_id_is_a_fingerprint() {
        let id = callback_key_id("very-secret-token");
        assert!(id.starts_with("callback_") && id.len() == "callback_".len() + 12);
        assert!(!id.contains("secret"));
        assert_eq!(id, callback_key_id("very-secret-token"));
    }
}
