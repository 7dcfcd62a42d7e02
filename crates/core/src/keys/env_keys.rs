//! Keys given in the environment (`SANDGATE_ADMIN_API_KEY`, `SANDGATE_API_KEYS`), for
//! CI and simple deployments: they need not follow the sandgate format and live
//! only in memory. Each is known by a fingerprint (a hash prefix), never by itself.

use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::api;
use super::format::{KeyHash, SecretKey, hash_key};
use crate::model::Env;
use crate::principal::{CredentialSource, Principal, UsageCell};
use crate::scopes::{Profile, ScopeSet};

/// The environment's keys, checked after stored keys.
#[derive(Debug, Default)]
pub struct EnvKeys {
    keys: Vec<(KeyHash, Arc<Principal>)>,
}

/// Hex of the first bytes of a key's hash: how logs and audit rows name it.
pub fn fingerprint(hash: &KeyHash) -> String {
    hash[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl EnvKeys {
    pub fn new(admin: Option<&SecretKey>, clients: &[SecretKey]) -> EnvKeys {
        let mut keys = Vec::new();
        if let Some(admin) = admin.filter(|k| !k.expose().is_empty()) {
            let hash = hash_key(admin.expose());
            keys.push((
                hash,
                Arc::new(env_principal(
                    "env_admin".into(),
                    "environment admin",
                    ScopeSet::all(),
                    vec!["*".into()],
                )),
            ));
        }
        for key in clients.iter().filter(|k| !k.expose().is_empty()) {
            let hash = hash_key(key.expose());
            let (names, set) = api::profile_scopes(Profile::SandboxUser);
            let id = format!("env_{}", fingerprint(&hash));
            keys.push((
                hash,
                Arc::new(env_principal(id, "environment key", set, names)),
            ));
        }
        EnvKeys { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The principal of `credential`, comparing against every key in constant time.
    pub fn verify(&self, credential: &str) -> Option<Arc<Principal>> {
        if self.keys.is_empty() {
            return None;
        }
        let presented = hash_key(credential);
        let mut found = None;
        for (hash, principal) in &self.keys {
            if bool::from(hash.ct_eq(&presented)) && found.is_none() {
                found = Some(Arc::clone(principal));
            }
        }
        found
    }
}

fn env_principal(
    key_id: String,
    name: &str,
    scopes: ScopeSet,
    scope_names: Vec<String>,
) -> Principal {
    Principal {
        key_id,
        key_prefix: None,
        name: name.to_owned(),
        tenant: "default".to_owned(),
        env: Env::Live,
        scopes,
        scope_names,
        source: CredentialSource::EnvKey,
        rate_limits: Vec::new(),
        allowed_ips: Vec::new(),
        expires_at: None,
        quota_id: None,
        usage: Some(Arc::new(UsageCell::default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scopes::Scope;

    #[test]
    fn admin_and_client_keys_are_found_by_value_only() {
        let keys = EnvKeys::new(
            Some(&SecretKey::new("root-secret".into())),
            &[
                SecretKey::new("client-a".into()),
                SecretKey::new("client-b".into()),
            ],
        );
        assert_eq!(keys.len(), 3);
        let admin = keys.verify("root-secret").unwrap();
        assert!(admin.has(Scope::TenantsManage));
        assert_eq!(admin.key_id, "env_admin");
        let client = keys.verify("client-b").unwrap();
        assert!(client.has(Scope::SandboxExecute) && !client.has(Scope::KeysRead));
        assert!(client.key_id.starts_with("env_") && !client.key_id.contains("client"));
        assert!(keys.verify("client-c").is_none());
        assert!(keys.verify("").is_none());
        assert!(EnvKeys::new(None, &[]).verify("anything").is_none());
    }
}
