//! Scopes, wildcards and profiles (SPEC §1), and the set type the hot path checks.
//!
//! A [`ScopeSet`] is a bit set: checking a scope is one AND. Names are parsed once,
//! when a key is created or loaded, never per request. This module knows nothing
//! about routes; the route policy lives at the HTTP edge.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One permission. The order is the bit order of [`ScopeSet`]; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    SandboxCreate,
    SandboxRead,
    SandboxDelete,
    SandboxPause,
    SandboxExecute,
    SandboxFiles,
    SandboxPorts,
    TemplateRead,
    TemplateWrite,
    KeysRead,
    KeysManage,
    BillingRead,
    BillingManage,
    WebhooksManage,
    AuditRead,
    MetricsRead,
    TenantsManage,
}

impl Scope {
    pub const ALL: [Scope; 17] = [
        Scope::SandboxCreate,
        Scope::SandboxRead,
        Scope::SandboxDelete,
        Scope::SandboxPause,
        Scope::SandboxExecute,
        Scope::SandboxFiles,
        Scope::SandboxPorts,
        Scope::TemplateRead,
        Scope::TemplateWrite,
        Scope::KeysRead,
        Scope::KeysManage,
        Scope::BillingRead,
        Scope::BillingManage,
        Scope::WebhooksManage,
        Scope::AuditRead,
        Scope::MetricsRead,
        Scope::TenantsManage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SandboxCreate => "sandbox:create",
            Scope::SandboxRead => "sandbox:read",
            Scope::SandboxDelete => "sandbox:delete",
            Scope::SandboxPause => "sandbox:pause",
            Scope::SandboxExecute => "sandbox:execute",
            Scope::SandboxFiles => "sandbox:files",
            Scope::SandboxPorts => "sandbox:ports",
            Scope::TemplateRead => "template:read",
            Scope::TemplateWrite => "template:write",
            Scope::KeysRead => "keys:read",
            Scope::KeysManage => "keys:manage",
            Scope::BillingRead => "billing:read",
            Scope::BillingManage => "billing:manage",
            Scope::WebhooksManage => "webhooks:manage",
            Scope::AuditRead => "audit:read",
            Scope::MetricsRead => "metrics:read",
            Scope::TenantsManage => "tenants:manage",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes, as bits.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ScopeSet(u32);

impl ScopeSet {
    pub const EMPTY: ScopeSet = ScopeSet(0);

    pub fn all() -> ScopeSet {
        Scope::ALL.iter().copied().collect()
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// True when every scope of `other` is in `self`: the no-escalation rule.
    pub fn is_superset_of(self, other: ScopeSet) -> bool {
        other.0 & !self.0 == 0
    }

    pub fn union(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// Parses scope names, wildcards included. Unknown names are an error naming them.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<ScopeSet, UnknownScope> {
        let mut set = ScopeSet::EMPTY;
        for name in names {
            set = set.union(parse_scope_name(name.as_ref())?);
        }
        Ok(set)
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        ScopeSet(iter.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(Scope::as_str))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope `{0}`")]
pub struct UnknownScope(pub String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown profile `{0}`")]
pub struct UnknownProfile(pub String);

fn parse_scope_name(name: &str) -> Result<ScopeSet, UnknownScope> {
    let family = |prefix: &str| -> ScopeSet {
        Scope::ALL
            .iter()
            .copied()
            .filter(|s| s.as_str().split(':').next() == Some(prefix))
            .collect()
    };
    match name {
        "*" => Ok(ScopeSet::all()),
        "sandbox:*" => Ok(family("sandbox")),
        "template:*" => Ok(family("template")),
        "keys:*" => Ok(family("keys")),
        "billing:*" => Ok(family("billing")),
        _ => Scope::ALL
            .iter()
            .find(|s| s.as_str() == name)
            .map(|s| ScopeSet(s.bit()))
            .ok_or_else(|| UnknownScope(name.to_owned())),
    }
}

/// A named bundle of scopes (SPEC §1 "Profiles").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    ReadOnly,
    SandboxUser,
    Admin,
}

impl Profile {
    pub fn parse(name: &str) -> Result<Profile, UnknownProfile> {
        match name {
            "read-only" => Ok(Profile::ReadOnly),
            "sandbox-user" => Ok(Profile::SandboxUser),
            "admin" => Ok(Profile::Admin),
            other => Err(UnknownProfile(other.to_owned())),
        }
    }

    /// The scope names a key created with this profile shows.
    pub fn scope_names(self) -> &'static [&'static str] {
        match self {
            Profile::ReadOnly => &["sandbox:read", "billing:read"],
            Profile::SandboxUser => &[
                "sandbox:create",
                "sandbox:read",
                "sandbox:delete",
                "sandbox:pause",
                "sandbox:execute",
                "sandbox:files",
                "sandbox:ports",
            ],
            Profile::Admin => &[
                "sandbox:*",
                "template:*",
                "keys:*",
                "billing:*",
                "webhooks:manage",
                "audit:read",
                "metrics:read",
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_expand_to_their_family_only() {
        let set = ScopeSet::parse(&["sandbox:*"]).unwrap();
        assert!(set.contains(Scope::SandboxPorts));
        assert!(set.contains(Scope::SandboxCreate));
        assert!(!set.contains(Scope::TemplateRead));
        assert_eq!(set.iter().count(), 7);
        assert_eq!(ScopeSet::parse(&["*"]).unwrap(), ScopeSet::all());
    }

    #[test]
    fn unknown_scope_is_named() {
        assert_eq!(
            ScopeSet::parse(&["sandbox:read", "root"]),
            Err(UnknownScope("root".into()))
        );
        assert!(ScopeSet::parse(&["sandbox:"]).is_err());
    }

    #[test]
    fn admin_profile_excludes_tenants_manage() {
        let admin = ScopeSet::parse(Profile::Admin.scope_names()).unwrap();
        assert!(!admin.contains(Scope::TenantsManage));
        assert!(admin.contains(Scope::KeysManage));
        assert!(ScopeSet::all().is_superset_of(admin));
        assert!(!admin.is_superset_of(ScopeSet::all()));
    }
}
