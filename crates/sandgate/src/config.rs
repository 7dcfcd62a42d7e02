//! The server's configuration: built-in defaults, then `SANDGATE_*` variables, then
//! the TOML file given by `--config`, then flags — each overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sandgate_core::keys::format::SecretKey;
use sandgate_core::net::IpNet;
use sandgate_server::{AuthCallbackConfig, AuthMode, JwtConfig, ServerConfig, TlsFiles};
use serde::Deserialize;

pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "sandgate-data";

/// One layer of settings; `None` leaves the layer below in force.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub addr: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    pub trusted_proxies: Option<Vec<String>>,
    pub allowed_ips: Option<Vec<String>>,
    pub log: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `keys` (default) or `none`.
    pub auth_mode: Option<String>,
    /// In auth mode `none`, listen on a non-loopback address anyway.
    pub allow_open_on_public: Option<bool>,
    pub auth_callback_url: Option<String>,
    pub auth_callback_timeout_ms: Option<u64>,
    /// Cache the callback's "yes" this long; absent or 0: no cache.
    pub auth_callback_cache_ttl_ms: Option<u64>,
    pub webhook_allow_private: Option<bool>,
    /// Runs in progress at once, server-wide.
    pub max_concurrent_runs: Option<usize>,
    /// Live sandboxes one tenant may have.
    pub max_sandboxes_per_tenant: Option<usize>,
    /// Jails kept built for one-shot runs.
    pub run_warm_pool: Option<usize>,
    /// Sandboxes kept built for creates.
    pub sandbox_warm_pool: Option<usize>,
    /// What a template's built `/workspace` may hold, in MiB.
    pub template_max_mb: Option<u64>,
    /// One deadline for all of a template build's setup commands.
    pub template_build_timeout_sec: Option<u64>,
    /// Templates one tenant may have in one env.
    pub max_templates_per_tenant: Option<usize>,
    /// Verify RS256/ES256/EdDSA JWTs with the keys at this URL. (The HS256 secret
    /// comes from `SANDGATE_JWT_SECRET` only.)
    pub jwt_jwks_url: Option<String>,
    pub jwt_issuer: Option<String>,
    /// Accepted `aud` values; the environment gives them comma-separated.
    pub jwt_audience: Option<Vec<String>>,
    pub jwt_tenant_claim: Option<String>,
    pub jwt_env_claim: Option<String>,
}

impl Layer {
    pub fn from_env() -> Result<Layer> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let list =
            |name: &str| var(name).map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
        let millis = |name: &str| {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .with_context(|| format!("{name} must be a number of milliseconds"))
                })
                .transpose()
        };
        let count = |name: &str| {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{name} must be a whole number"))
                })
                .transpose()
        };
        Ok(Layer {
            addr: var("SANDGATE_ADDR"),
            data_dir: var("SANDGATE_DATA_DIR").map(PathBuf::from),
            max_body_bytes: var("SANDGATE_MAX_BODY_BYTES")
                .map(|v| {
                    v.parse()
                        .context("SANDGATE_MAX_BODY_BYTES must be a number of bytes")
                })
                .transpose()?,
            trusted_proxies: list("SANDGATE_TRUSTED_PROXIES"),
            allowed_ips: list("SANDGATE_ALLOWED_IPS"),
            log: var("SANDGATE_LOG"),
            tls_cert: var("SANDGATE_TLS_CERT").map(PathBuf::from),
            tls_key: var("SANDGATE_TLS_KEY").map(PathBuf::from),
            auth_mode: var("SANDGATE_AUTH_MODE"),
            allow_open_on_public: var("SANDGATE_ALLOW_OPEN_ON_PUBLIC")
                .map(|v| match v.trim() {
                    "1" | "true" => Ok(true),
                    "0" | "false" => Ok(false),
                    _ => bail!("SANDGATE_ALLOW_OPEN_ON_PUBLIC must be 1/true or 0/false"),
                })
                .transpose()?,
            auth_callback_url: var("SANDGATE_AUTH_CALLBACK_URL"),
            auth_callback_timeout_ms: millis("SANDGATE_AUTH_CALLBACK_TIMEOUT_MS")?,
            auth_callback_cache_ttl_ms: millis("SANDGATE_AUTH_CALLBACK_CACHE_TTL_MS")?,
            max_concurrent_runs: count("SANDGATE_MAX_CONCURRENT_RUNS")?,
            max_sandboxes_per_tenant: count("SANDGATE_MAX_SANDBOXES_PER_TENANT")?,
            run_warm_pool: count("SANDGATE_RUN_WARM_POOL")?,
            sandbox_warm_pool: count("SANDGATE_SANDBOX_WARM_POOL")?,
            template_max_mb: count("SANDGATE_TEMPLATE_MAX_MB")?.map(|n| n as u64),
            template_build_timeout_sec: count("SANDGATE_TEMPLATE_BUILD_TIMEOUT_SEC")?
                .map(|n| n as u64),
            max_templates_per_tenant: count("SANDGATE_MAX_TEMPLATES_PER_TENANT")?,
            webhook_allow_private: var("SANDGATE_WEBHOOK_ALLOW_PRIVATE")
                .map(|v| flag(&v).context("SANDGATE_WEBHOOK_ALLOW_PRIVATE must be 1 or 0"))
                .transpose()?,
            jwt_jwks_url: var("SANDGATE_JWT_JWKS_URL"),
            jwt_issuer: var("SANDGATE_JWT_ISSUER"),
            jwt_audience: list("SANDGATE_JWT_AUDIENCE"),
            jwt_tenant_claim: var("SANDGATE_JWT_TENANT_CLAIM"),
            jwt_env_claim: var("SANDGATE_JWT_ENV_CLAIM"),
        })
    }

    pub fn from_file(path: &Path) -> Result<Layer> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    fn over(self, below: Layer) -> Layer {
        Layer {
            addr: self.addr.or(below.addr),
            data_dir: self.data_dir.or(below.data_dir),
            max_body_bytes: self.max_body_bytes.or(below.max_body_bytes),
            trusted_proxies: self.trusted_proxies.or(below.trusted_proxies),
            allowed_ips: self.allowed_ips.or(below.allowed_ips),
            log: self.log.or(below.log),
            tls_cert: self.tls_cert.or(below.tls_cert),
            tls_key: self.tls_key.or(below.tls_key),
            auth_mode: self.auth_mode.or(below.auth_mode),
            allow_open_on_public: self.allow_open_on_public.or(below.allow_open_on_public),
            auth_callback_url: self.auth_callback_url.or(below.auth_callback_url),
            auth_callback_timeout_ms: self
                .auth_callback_timeout_ms
                .or(below.auth_callback_timeout_ms),
            auth_callback_cache_ttl_ms: self
                .auth_callback_cache_ttl_ms
                .or(below.auth_callback_cache_ttl_ms),
            webhook_allow_private: self.webhook_allow_private.or(below.webhook_allow_private),
            max_concurrent_runs: self.max_concurrent_runs.or(below.max_concurrent_runs),
            max_sandboxes_per_tenant: self
                .max_sandboxes_per_tenant
                .or(below.max_sandboxes_per_tenant),
            run_warm_pool: self.run_warm_pool.or(below.run_warm_pool),
            sandbox_warm_pool: self.sandbox_warm_pool.or(below.sandbox_warm_pool),
            template_max_mb: self.template_max_mb.or(below.template_max_mb),
            template_build_timeout_sec: self
                .template_build_timeout_sec
                .or(below.template_build_timeout_sec),
            max_templates_per_tenant: self
                .max_templates_per_tenant
                .or(below.max_templates_per_tenant),
            jwt_jwks_url: self.jwt_jwks_url.or(below.jwt_jwks_url),
            jwt_issuer: self.jwt_issuer.or(below.jwt_issuer),
            jwt_audience: self.jwt_audience.or(below.jwt_audience),
            jwt_tenant_claim: self.jwt_tenant_claim.or(below.jwt_tenant_claim),
            jwt_env_claim: self.jwt_env_claim.or(below.jwt_env_claim),
        }
    }
}

/// Everything `sandgate serve` needs.
#[derive(Debug)]
pub struct Settings {
    pub addr: SocketAddr,
    pub server: ServerConfig,
    pub log: String,
    pub tls: Option<TlsFiles>,
}

/// Merges env < file < flags into settings.
pub fn resolve(env: Layer, file: Option<Layer>, flags: Layer) -> Result<Settings> {
    let secret = std::env::var("SANDGATE_JWT_SECRET").ok();
    resolve_with_jwt_secret(env, file, flags, secret)
}

/// [`resolve`], with the HS256 secret given rather than read from the environment.
fn resolve_with_jwt_secret(
    env: Layer,
    file: Option<Layer>,
    flags: Layer,
    jwt_secret: Option<String>,
) -> Result<Settings> {
    let mut merged = flags.over(file.unwrap_or_default().over(env));
    let jwt = jwt_config(&mut merged, jwt_secret)?;
    let addr_text = merged.addr.unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    let addr: SocketAddr = addr_text
        .parse()
        .with_context(|| format!("`{addr_text}` is not a HOST:PORT address"))?;
    let mut server = ServerConfig::new(
        merged
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
    );
    if let Some(n) = merged.max_body_bytes {
        if n == 0 {
            bail!("max_body_bytes must be positive");
        }
        server.max_body_bytes = n;
    }
    server.trusted_proxies = nets(
        merged.trusted_proxies.unwrap_or_default(),
        "trusted proxies",
    )?;
    server.allowed_ips = nets(merged.allowed_ips.unwrap_or_default(), "allowed IPs")?;
    server.webhook_allow_private = merged.webhook_allow_private.unwrap_or(false);
    if let Some(n) = merged.max_concurrent_runs {
        if n == 0 {
            bail!("max_concurrent_runs must be at least 1");
        }
        server.exec_limits.max_concurrent = n;
    }
    if let Some(n) = merged.max_sandboxes_per_tenant {
        server.sandbox_limits.max_per_tenant = n;
    }
    if let Some(n) = merged.run_warm_pool {
        server.exec_limits.warm_pool = n;
    }
    if let Some(n) = merged.sandbox_warm_pool {
        server.sandbox_limits.warm_pool = n;
    }
    if let Some(mb) = merged.template_max_mb {
        if mb == 0 {
            bail!("template_max_mb must be at least 1");
        }
        server.template_limits.max_layer_bytes = mb << 20;
    }
    if let Some(secs) = merged.template_build_timeout_sec {
        if secs == 0 {
            bail!("template_build_timeout_sec must be at least 1");
        }
        server.template_limits.build_timeout = Duration::from_secs(secs);
    }
    if let Some(n) = merged.max_templates_per_tenant {
        server.template_limits.max_per_tenant = n;
    }
    // Secrets come from the environment only, never from a file or a flag.
    server.env_admin_key = std::env::var("SANDGATE_ADMIN_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
        .map(|k| SecretKey::new(k.trim().to_owned()));
    server.env_api_keys = std::env::var("SANDGATE_API_KEYS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| SecretKey::new(k.to_owned()))
        .collect();
    server.auth_mode = match &merged.auth_mode {
        Some(mode) => mode.trim().parse().map_err(anyhow::Error::msg)?,
        None => AuthMode::Keys,
    };
    if server.auth_mode == AuthMode::Open
        && !addr.ip().is_loopback()
        && !merged.allow_open_on_public.unwrap_or(false)
    {
        bail!(
            "auth mode `none` turns authentication off, so anyone who can reach {addr} could do \
             everything; refusing to listen on a non-loopback address. Listen on 127.0.0.1, or \
             pass --allow-open-on-public if that is really wanted"
        );
    }
    server.auth_callback = match merged.auth_callback_url {
        Some(url) => {
            let url = url.trim().to_owned();
            sandgate_server::callback::check_url(&url).map_err(anyhow::Error::msg)?;
            let mut callback = AuthCallbackConfig::new(url);
            if let Some(ms) = merged.auth_callback_timeout_ms {
                if ms == 0 {
                    bail!("auth_callback_timeout_ms must be positive");
                }
                callback.timeout = Duration::from_millis(ms);
            }
            callback.cache_ttl = merged
                .auth_callback_cache_ttl_ms
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis);
            Some(callback)
        }
        None => None,
    };
    server.jwt = jwt;
    let tls = match (merged.tls_cert, merged.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => bail!("TLS needs both a certificate (--tls-cert) and a key (--tls-key)"),
    };
    Ok(Settings {
        addr,
        server,
        log: merged.log.unwrap_or_else(|| "info".to_owned()),
        tls,
    })
}

/// The JWT source, when a secret or a JWKS URL is configured.
fn jwt_config(merged: &mut Layer, secret: Option<String>) -> Result<Option<JwtConfig>> {
    let secret = secret.filter(|s| !s.trim().is_empty());
    let jwks_url = merged.jwt_jwks_url.take().map(|u| u.trim().to_owned());
    let mut jwt = JwtConfig::new();
    let named = [
        ("jwt_issuer", merged.jwt_issuer.is_some()),
        ("jwt_audience", merged.jwt_audience.is_some()),
        ("jwt_tenant_claim", merged.jwt_tenant_claim.is_some()),
        ("jwt_env_claim", merged.jwt_env_claim.is_some()),
    ];
    if secret.is_none() && jwks_url.is_none() {
        if let Some((name, _)) = named.iter().find(|(_, set)| *set) {
            bail!(
                "{name} is set but JWTs are off: set SANDGATE_JWT_SECRET or SANDGATE_JWT_JWKS_URL"
            );
        }
        return Ok(None);
    }
    if let Some(secret) = secret {
        if secret.len() < JwtConfig::MIN_SECRET_BYTES {
            bail!(
                "SANDGATE_JWT_SECRET must be at least {} bytes (256 bits) for HS256",
                JwtConfig::MIN_SECRET_BYTES
            );
        }
        jwt.secret = Some(SecretKey::new(secret));
    }
    if let Some(url) = jwks_url {
        sandgate_server::callback::check_url(&url)
            .map_err(|e| anyhow::anyhow!("jwt_jwks_url: {e}"))?;
        jwt.jwks_url = Some(url);
    }
    jwt.issuer = merged.jwt_issuer.take().filter(|s| !s.trim().is_empty());
    jwt.audience = merged
        .jwt_audience
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.trim().is_empty())
        .collect();
    if let Some(claim) = merged.jwt_tenant_claim.take() {
        jwt.claims.tenant = claim.trim().to_owned();
    }
    if let Some(claim) = merged.jwt_env_claim.take() {
        jwt.claims.env = claim.trim().to_owned();
    }
    if jwt.claims.tenant.is_empty() || jwt.claims.env.is_empty() {
        bail!("jwt_tenant_claim and jwt_env_claim must not be empty");
    }
    Ok(Some(jwt))
}

/// A boolean setting from the environment: `1`/`true`/`yes` or `0`/`false`/`no`.
fn flag(value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => bail!("`{other}` is not a boolean"),
    }
}

/// CIDR lists; `*` alone means "any address" (an empty list).
fn nets(items: Vec<String>, what: &str) -> Result<Vec<IpNet>> {
    if items.iter().any(|s| s == "*") {
        return Ok(Vec::new());
    }
    items
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<IpNet>().with_context(|| format!("in {what}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_and_sandbox_capacities_come_from_the_file() {
        let file: Layer = toml::from_str(
            "max_concurrent_runs = 3\nmax_sandboxes_per_tenant = 5\nrun_warm_pool = 0\nsandbox_warm_pool = 7",
        )
        .unwrap();
        let s = resolve(Layer::default(), Some(file), Layer::default()).unwrap();
        assert_eq!(s.server.exec_limits.max_concurrent, 3);
        assert_eq!(s.server.sandbox_limits.max_per_tenant, 5);
        assert_eq!(s.server.exec_limits.warm_pool, 0);
        assert_eq!(s.server.sandbox_limits.warm_pool, 7);
        let zero: Layer = toml::from_str("max_concurrent_runs = 0").unwrap();
        assert!(resolve(Layer::default(), Some(zero), Layer::default()).is_err());
    }

    #[test]
    fn template_bounds_come_from_the_file() {
        let file: Layer = toml::from_str(
            "template_max_mb = 64\ntemplate_build_timeout_sec = 30\nmax_templates_per_tenant = 3",
        )
        .unwrap();
        let s = resolve(Layer::default(), Some(file), Layer::default()).unwrap();
        let t = &s.server.template_limits;
        assert_eq!(t.max_layer_bytes, 64 << 20);
        assert_eq!(t.build_timeout, Duration::from_secs(30));
        assert_eq!(t.max_per_tenant, 3);
        let zero: Layer = toml::from_str("template_build_timeout_sec = 0").unwrap();
        assert!(resolve(Layer::default(), Some(zero), Layer::default()).is_err());
    }

    #[test]
    fn flags_beat_file_beats_env() {
        let env = Layer {
            addr: Some("127.0.0.1:1".into()),
            data_dir: Some("env-dir".into()),
            max_body_bytes: Some(10),
            ..Layer::default()
        };
        let file = Layer {
            addr: Some("127.0.0.1:2".into()),
            data_dir: Some("file-dir".into()),
            ..Layer::default()
        };
        let flags = Layer {
            addr: Some("127.0.0.1:3".into()),
            ..Layer::default()
        };
        let s = resolve(env, Some(file), flags).unwrap();
        assert_eq!(s.addr.port(), 3);
        assert_eq!(s.server.data_dir, PathBuf::from("file-dir"));
        assert_eq!(s.server.max_body_bytes, 10);
    }

    #[test]
    fn defaults_and_bad_values() {
        let s = resolve(Layer::default(), None, Layer::default()).unwrap();
        assert_eq!(s.addr.to_string(), DEFAULT_ADDR);
        let bad = Layer {
            allowed_ips: Some(vec!["10.0.0.0/99".into()]),
            ..Layer::default()
        };
        assert!(resolve(bad, None, Layer::default()).is_err());
        let star = Layer {
            allowed_ips: Some(vec!["*".into()]),
            ..Layer::default()
        };
        assert!(
            resolve(star, None, Layer::default())
                .unwrap()
                .server
                .allowed_ips
                .is_empty()
        );
        let file: Layer =
            toml::from_str("addr = \"0.0.0.0:9\"\nallowed_ips = [\"10.0.0.0/8\"]").unwrap();
        assert_eq!(file.addr.as_deref(), Some("0.0.0.0:9"));
        assert!(toml::from_str::<Layer>("adr = 1").is_err());
        let half = Layer {
            tls_cert: Some("cert.pem".into()),
            ..Layer::default()
        };
        assert!(resolve(half, None, Layer::default()).is_err());
        assert!(!s.server.webhook_allow_private);
        let file: Layer = toml::from_str("webhook_allow_private = true").unwrap();
        assert!(
            resolve(Layer::default(), Some(file), Layer::default())
                .unwrap()
                .server
                .webhook_allow_private
        );
        assert!(flag("1").unwrap() && !flag("0").unwrap() && flag("maybe").is_err());
    }

    #[test]
    fn open_mode_stays_on_loopback_unless_told() {
        let open = |addr: &str, allow: Option<bool>| Layer {
            addr: Some(addr.into()),
            auth_mode: Some("none".into()),
            allow_open_on_public: allow,
            ..Layer::default()
        };
        let s = resolve(Layer::default(), None, open("127.0.0.1:0", None)).unwrap();
        assert_eq!(s.server.auth_mode, AuthMode::Open);
        assert!(resolve(Layer::default(), None, open("[::1]:0", None)).is_ok());
        let e = resolve(Layer::default(), None, open("0.0.0.0:0", None)).unwrap_err();
        assert!(e.to_string().contains("--allow-open-on-public"), "{e}");
        assert!(resolve(Layer::default(), None, open("0.0.0.0:0", Some(true))).is_ok());
        let keys = Layer {
            addr: Some("0.0.0.0:0".into()),
            auth_mode: Some("keys".into()),
            ..Layer::default()
        };
        assert_eq!(
            resolve(keys, None, Layer::default())
                .unwrap()
                .server
                .auth_mode,
            AuthMode::Keys
        );
        let bad = Layer {
            auth_mode: Some("off".into()),
            ..Layer::default()
        };
        assert!(resolve(bad, None, Layer::default()).is_err());
    }

    #[test]
    fn auth_callback_settings_layer_like_the_others() {
        let env = Layer {
            auth_callback_url: Some("http://127.0.0.1:9/env".into()),
            auth_callback_timeout_ms: Some(500),
            ..Layer::default()
        };
        let file: Layer = toml::from_str(
            "auth_callback_url = \"https://auth.internal/check\"\nauth_callback_cache_ttl_ms = 1000",
        )
        .unwrap();
        let s = resolve(env, Some(file), Layer::default()).unwrap();
        let callback = s.server.auth_callback.unwrap();
        assert_eq!(callback.url, "https://auth.internal/check");
        assert_eq!(callback.timeout, Duration::from_millis(500));
        assert_eq!(callback.cache_ttl, Some(Duration::from_secs(1)));
        let flags = Layer {
            auth_callback_url: Some("http://127.0.0.1:9/flag".into()),
            ..Layer::default()
        };
        let s = resolve(Layer::default(), None, flags).unwrap();
        let callback = s.server.auth_callback.unwrap();
        assert_eq!(callback.url, "http://127.0.0.1:9/flag");
        assert_eq!(callback.timeout, AuthCallbackConfig::DEFAULT_TIMEOUT);
        assert_eq!(callback.cache_ttl, None);
        assert!(
            resolve(Layer::default(), None, Layer::default())
                .unwrap()
                .server
                .auth_callback
                .is_none()
        );
        let bad = Layer {
            auth_callback_url: Some("auth.internal/check".into()),
            ..Layer::default()
        };
        assert!(resolve(bad, None, Layer::default()).is_err());
    }
    #[test]
    fn jwt_settings_layer_like_the_others_and_the_secret_comes_from_the_caller() {
        let secret = || Some("s".repeat(JwtConfig::MIN_SECRET_BYTES));
        let env = Layer {
            jwt_issuer: Some("https://env.example".into()),
            jwt_audience: Some(vec!["a1".into(), "a2".into()]),
            ..Layer::default()
        };
        let file: Layer =
            toml::from_str("jwt_issuer = \"https://file.example\"\njwt_tenant_claim = \"org\"")
                .unwrap();
        let s = resolve_with_jwt_secret(env, Some(file), Layer::default(), secret()).unwrap();
        let jwt = s.server.jwt.unwrap();
        assert_eq!(jwt.issuer.as_deref(), Some("https://file.example"));
        assert_eq!(jwt.audience, ["a1", "a2"]);
        assert_eq!(
            (jwt.claims.tenant.as_str(), jwt.claims.env.as_str()),
            ("org", "env")
        );
        assert_eq!(jwt.leeway, Duration::from_secs(30));
        assert!(jwt.secret.is_some() && jwt.jwks_url.is_none());
        let flags = Layer {
            jwt_jwks_url: Some("https://idp.example/jwks.json".into()),
            ..Layer::default()
        };
        let s = resolve_with_jwt_secret(Layer::default(), None, flags, None).unwrap();
        let jwt = s.server.jwt.unwrap();
        assert!(jwt.secret.is_none());
        assert_eq!(
            jwt.jwks_url.as_deref(),
            Some("https://idp.example/jwks.json")
        );
        // Off without a secret or a JWKS; settings that need one say so.
        let none = resolve_with_jwt_secret(Layer::default(), None, Layer::default(), None);
        assert!(none.unwrap().server.jwt.is_none());
        let orphan = Layer {
            jwt_issuer: Some("x".into()),
            ..Layer::default()
        };
        assert!(resolve_with_jwt_secret(orphan, None, Layer::default(), None).is_err());
        let short = resolve_with_jwt_secret(
            Layer::default(),
            None,
            Layer::default(),
            Some("short".into()),
        );
        assert!(short.unwrap_err().to_string().contains("256 bits"));
        let bad_url = Layer {
            jwt_jwks_url: Some("idp.example/jwks".into()),
            ..Layer::default()
        };
        assert!(resolve_with_jwt_secret(bad_url, None, Layer::default(), None).is_err());
        // The secret is never read from a file.
        assert!(toml::from_str::<Layer>("jwt_secret = \"x\"").is_err());
    }
}
