//! The state every handler shares: configuration, services, metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandgate_core::audit::AuditLog;
use sandgate_core::execute::{ExecLimits, Executor, JailConfig};
use sandgate_core::keys::KeyService;
use sandgate_core::keys::env_keys::EnvKeys;
use sandgate_core::keys::format::SecretKey;
use sandgate_core::limits::{KeyRateLimiter, LocalRateLimiter, RateLimiter};
use sandgate_core::model::RateLimit;
use sandgate_core::net::IpNet;
use sandgate_core::sandboxes::{SandboxLimits, SandboxManager, SandboxStore};
use sandgate_core::store::{
    AuditStore, KeyStore, SqliteStore, StoreError, UsageStore, WebhookStore,
};
use sandgate_core::templates::{TemplateLimits, TemplateService, TemplateStore};
use sandgate_core::usage::UsageRecorder;
use sandgate_core::webhooks::WebhookService;
use sandgate_core::webhooks::delivery::DeliveryConfig;

use sandgate_core::principal::Principal;

use crate::callback::{AuthCallback, AuthCallbackConfig};
use crate::jwt::{JwtConfig, JwtVerifier};
use crate::metrics::Metrics;

/// Whether requests are authenticated at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// `keys`: every request needs a credential some source knows.
    #[default]
    Keys,
    /// `none`: authentication is off; everybody is tenant `default`, env `live`,
    /// with every scope. For local development only.
    Open,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AuthMode, String> {
        match s {
            "keys" => Ok(AuthMode::Keys),
            "none" => Ok(AuthMode::Open),
            other => Err(format!("auth mode must be `keys` or `none`, not `{other}`")),
        }
    }
}

/// What `/readyz` and the start-up log say while authentication is off.
pub const AUTH_OFF_WARNING: &str =
    "authentication is off (auth mode none): every request is allowed with every scope";

/// What the server needs to know to run; the binary builds it from env, file and flags.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Server-wide client allowlist; empty = any address.
    pub allowed_ips: Vec<IpNet>,
    /// How often changes made by other processes are picked up.
    pub key_sync_interval: Duration,
    /// How often request counts and last-use times are written.
    pub usage_flush_interval: Duration,
    /// How often passed expiries are looked for (to write `key.expired` events).
    pub expiry_sweep_interval: Duration,
    /// Limits for keys that have none of their own; empty = unlimited.
    pub default_rate_limits: Vec<RateLimit>,
    /// Invalid credentials one client IP may present before it is refused with 429
    /// without any lookup; `None` turns the throttle off.
    pub auth_failure_limit: Option<RateLimit>,
    /// `SANDGATE_ADMIN_API_KEY`: one key with every scope, checked after stored keys.
    pub env_admin_key: Option<SecretKey>,
    /// `SANDGATE_API_KEYS`: keys with the `sandbox-user` profile.
    pub env_api_keys: Vec<SecretKey>,
    /// `keys` (the default) or `none`.
    pub auth_mode: AuthMode,
    /// JWTs (HS256 secret and/or JWKS), checked after environment keys.
    pub jwt: Option<JwtConfig>,
    /// The last credential source, when configured: delegates the decision.
    pub auth_callback: Option<AuthCallbackConfig>,
    /// Bounds on runs and the server-wide cap on simultaneous runs.
    pub exec_limits: ExecLimits,
    /// How programs are jailed on this machine.
    pub jail: JailConfig,
    /// Bounds on long-lived sandboxes.
    pub sandbox_limits: SandboxLimits,
    /// How often expired sandboxes are looked for.
    pub sandbox_reap_interval: Duration,
    /// Bounds on templates and their builds.
    pub template_limits: TemplateLimits,
    /// `SANDGATE_WEBHOOK_ALLOW_PRIVATE=1`: webhooks may point at loopback and private
    /// addresses (a local receiver, tests); refused by default.
    pub webhook_allow_private: bool,
    /// Delay before the first retry of a failed delivery; doubled for each next one.
    pub webhook_retry_base: Duration,
    /// Attempts before a delivery is given up.
    pub webhook_max_attempts: u32,
    /// Timeout of one delivery attempt.
    pub webhook_timeout: Duration,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.into(),
            max_body_bytes: 16 * 1024 * 1024,
            trusted_proxies: Vec::new(),
            allowed_ips: Vec::new(),
            key_sync_interval: Duration::from_millis(500),
            usage_flush_interval: Duration::from_secs(1),
            expiry_sweep_interval: Duration::from_secs(5),
            default_rate_limits: Vec::new(),
            auth_failure_limit: Some(RateLimit {
                limit: 30,
                window_sec: 60,
            }),
            env_admin_key: None,
            env_api_keys: Vec::new(),
            auth_mode: AuthMode::Keys,
            jwt: None,
            auth_callback: None,
            exec_limits: ExecLimits::default(),
            jail: JailConfig::default(),
            sandbox_limits: SandboxLimits::default(),
            sandbox_reap_interval: Duration::from_secs(1),
            template_limits: TemplateLimits::default(),
            webhook_allow_private: false,
            webhook_retry_base: Duration::from_secs(1),
            webhook_max_attempts: 8,
            webhook_timeout: Duration::from_secs(5),
        }
    }

    /// How the webhook worker delivers.
    pub fn delivery(&self) -> DeliveryConfig {
        DeliveryConfig {
            base_delay: self.webhook_retry_base,
            max_attempts: self.webhook_max_attempts.max(1),
            timeout: self.webhook_timeout,
            allow_private: self.webhook_allow_private,
            ..DeliveryConfig::default()
        }
    }
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ServerConfig,
    keys: KeyService,
    audit: AuditLog,
    audit_store: Arc<dyn AuditStore>,
    metrics: Metrics,
    rate_limiter: Arc<dyn RateLimiter>,
    /// Counts invalid credentials per client IP.
    auth_failures: LocalRateLimiter,
    usage: Arc<UsageRecorder>,
    usage_store: Arc<dyn UsageStore>,
    env_keys: EnvKeys,
    jwt: Option<JwtVerifier>,
    auth_callback: Option<AuthCallback>,
    /// Who everybody is in auth mode `none`.
    open_principal: Arc<Principal>,
    executor: Executor,
    sandboxes: SandboxManager,
    templates: Arc<TemplateService>,
    webhooks: Arc<WebhookService>,
}

impl AppState {
    /// Opens the embedded store in the data dir, loads every key, starts the audit writer.
    /// Must be called inside a tokio runtime.
    pub async fn open(config: ServerConfig) -> Result<AppState, StoreError> {
        // First: the jail forks its zygote (the process that makes every jail's
        // clones, a copy of this one) at its first start; the smaller this
        // process is then, the smaller the copy.
        let jail = sandgate_jail::Jail::new(config.jail.clone())
            .map(Arc::new)
            .map_err(|e| e.to_string());
        if let Err(e) = &jail {
            tracing::warn!(error = %e, "programs cannot be jailed here: runs and sandboxes will fail");
        }
        let store = SqliteStore::open(&config.data_dir)?;
        let key_store: Arc<dyn KeyStore> = Arc::new(store.clone());
        let audit_store: Arc<dyn AuditStore> = Arc::new(store.clone());
        let usage_store: Arc<dyn UsageStore> = Arc::new(store.clone());
        let webhook_store: Arc<dyn WebhookStore> = Arc::new(store.clone());
        let template_store: Arc<dyn TemplateStore> = Arc::new(store.clone());
        let sandbox_store = store;
        let webhooks = Arc::new(WebhookService::new(
            webhook_store,
            config.webhook_allow_private,
        ));
        let keys = KeyService::load(key_store)
            .await?
            .with_events(Arc::clone(&webhooks) as _);
        let audit = AuditLog::start(Arc::clone(&audit_store));
        let env_keys = EnvKeys::new(config.env_admin_key.as_ref(), &config.env_api_keys);
        let auth_callback = config.auth_callback.as_ref().map(AuthCallback::new);
        let jwt = config.jwt.as_ref().map(JwtVerifier::new);
        if let Some(jwt) = &jwt {
            jwt.prefetch().await;
        }
        if config.auth_mode == AuthMode::Open {
            tracing::warn!("{AUTH_OFF_WARNING}; never expose this server to untrusted clients");
            if auth_callback.is_some() {
                tracing::warn!("auth mode none: the auth callback is ignored");
            }
        }
        let executor = Executor::new(config.exec_limits.clone(), jail.clone());
        let templates = TemplateService::start(
            jail.clone(),
            config.template_limits.clone(),
            config.sandbox_limits.clone(),
            template_store,
            &config.data_dir,
        )
        .await?;
        let sandbox_store: Arc<dyn SandboxStore> = Arc::new(sandbox_store);
        let usage = Arc::new(UsageRecorder::default());
        let sandboxes = SandboxManager::start(jail, config.sandbox_limits.clone(), sandbox_store)
            .await?
            .with_events(Arc::clone(&webhooks) as _)
            .with_templates(Arc::clone(&templates))
            .with_usage(Arc::clone(&usage));
        Ok(AppState(Arc::new(Inner {
            executor,
            sandboxes,
            templates,
            env_keys,
            jwt,
            auth_callback,
            open_principal: Arc::new(Principal::open()),
            config,
            keys,
            audit,
            audit_store,
            metrics: Metrics::default(),
            rate_limiter: Arc::new(KeyRateLimiter::default()),
            auth_failures: LocalRateLimiter::default(),
            usage,
            usage_store,
            webhooks,
        })))
    }

    pub fn config(&self) -> &ServerConfig {
        &self.0.config
    }

    pub fn keys(&self) -> &KeyService {
        &self.0.keys
    }

    pub fn audit(&self) -> &AuditLog {
        &self.0.audit
    }

    pub fn audit_store(&self) -> &dyn AuditStore {
        &*self.0.audit_store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn rate_limiter(&self) -> &dyn RateLimiter {
        &*self.0.rate_limiter
    }

    pub fn auth_failures(&self) -> &LocalRateLimiter {
        &self.0.auth_failures
    }

    pub fn env_keys(&self) -> &EnvKeys {
        &self.0.env_keys
    }

    pub fn jwt(&self) -> Option<&JwtVerifier> {
        self.0.jwt.as_ref()
    }

    pub fn auth_callback(&self) -> Option<&AuthCallback> {
        self.0.auth_callback.as_ref()
    }

    pub fn open_principal(&self) -> &Arc<Principal> {
        &self.0.open_principal
    }

    /// The credential sources in use, in the order they are checked.
    pub fn credential_sources(&self) -> Vec<String> {
        if self.0.config.auth_mode == AuthMode::Open {
            return vec!["none (authentication is off)".to_owned()];
        }
        let mut sources = vec!["stored API keys".to_owned()];
        if !self.0.env_keys.is_empty() {
            sources.push("environment keys".to_owned());
        }
        if let Some(jwt) = &self.0.jwt {
            sources.push(jwt.describe());
        }
        if let Some(callback) = &self.0.auth_callback {
            sources.push(format!("auth callback {}", callback.display_url()));
        }
        sources
    }

    /// What an operator must know about this server's configuration (`/readyz`).
    pub fn warnings(&self) -> Vec<&'static str> {
        match self.0.config.auth_mode {
            AuthMode::Open => vec![AUTH_OFF_WARNING],
            AuthMode::Keys => Vec::new(),
        }
    }

    pub fn executor(&self) -> &Executor {
        &self.0.executor
    }

    pub fn sandboxes(&self) -> &SandboxManager {
        &self.0.sandboxes
    }

    pub fn templates(&self) -> &Arc<TemplateService> {
        &self.0.templates
    }

    pub fn usage(&self) -> &UsageRecorder {
        &self.0.usage
    }

    pub fn usage_store(&self) -> &Arc<dyn UsageStore> {
        &self.0.usage_store
    }

    pub fn webhooks(&self) -> &WebhookService {
        &self.0.webhooks
    }
}
