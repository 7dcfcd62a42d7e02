//! The auth callback (SPEC §8): the last credential source, which hands the whole
//! decision to the operator's HTTP service.
//!
//! Owns the outgoing call (one pooled ureq agent, run on tokio's blocking pool so a
//! slow callback never stalls a worker), how its answer is read (200 allows, any
//! other status refuses, no answer in time fails) and the optional cache of
//! positive decisions. What a 200 grants is a domain rule, in
//! [`sandgate_core::keys::callback`]. Nothing here logs a credential: errors name
//! the callback's host, never the headers sent to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::Uri;
use sandgate_core::keys::callback::{InvalidGrant, callback_principal};
use sandgate_core::keys::format::{KeyHash, hash_key};
use sandgate_core::principal::Principal;
use sandgate_core::request_id::RequestId;

/// Largest reply body read from the callback.
const MAX_REPLY_BYTES: u64 = 64 * 1024;
/// Most decisions the cache holds; past it, expired ones go, then all.
const MAX_CACHED: usize = 10_000;

/// Where the callback is and how long to wait for it.
#[derive(Clone)]
pub struct AuthCallbackConfig {
    /// `http://` or `https://` URL that receives one POST per undecided request.
    pub url: String,
    /// Whole-call deadline (connect, send, reply); past it the request fails with 500.
    pub timeout: Duration,
    /// Keep a "yes" this long per (credential, method, route); `None` asks every time.
    pub cache_ttl: Option<Duration>,
}

impl AuthCallbackConfig {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);

    pub fn new(url: impl Into<String>) -> AuthCallbackConfig {
        AuthCallbackConfig {
            url: url.into(),
            timeout: AuthCallbackConfig::DEFAULT_TIMEOUT,
            cache_ttl: None,
        }
    }
}

impl std::fmt::Debug for AuthCallbackConfig {
    // The URL may carry a password or a token in its query: show only where it goes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCallbackConfig")
            .field("url", &display_url(&self.url))
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .finish()
    }
}

/// Checks that `url` is an absolute `http`/`https` URL with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("auth callback URL is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("auth callback URL must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("auth callback URL has no host".into());
    }
    Ok(())
}

/// `scheme://host[:port]/path` of `url`, without user info or query: safe to log.
pub fn display_url(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(uri) => format!(
            "{}://{}{}{}",
            uri.scheme_str().unwrap_or("?"),
            uri.host().unwrap_or("?"),
            uri.port().map(|p| format!(":{p}")).unwrap_or_default(),
            uri.path()
        ),
        Err(_) => "<invalid URL>".to_owned(),
    }
}

/// The credential as the client sent it, Bearer winning over `X-API-Key`.
#[derive(Clone, Copy)]
pub enum Presented<'a> {
    Bearer(&'a str),
    ApiKey(&'a str),
}

impl<'a> Presented<'a> {
    pub fn credential(self) -> &'a str {
        match self {
            Presented::Bearer(t) | Presented::ApiKey(t) => t,
        }
    }
}

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Presented::Bearer(_) => "Bearer(<redacted>)",
            Presented::ApiKey(_) => "ApiKey(<redacted>)",
        })
    }
}

/// The request the callback is asked about.
#[derive(Debug)]
pub struct Call<'a> {
    pub method: &'a str,
    /// The original path, sent as `X-Request-Path`.
    pub path: &'a str,
    /// The route template, part of the cache key.
    pub route: &'a str,
    pub request_id: &'a RequestId,
}

/// What the callback answered.
#[derive(Debug)]
pub enum Decision {
    Allowed(Arc<Principal>),
    /// Any status but 200.
    Denied {
        status: u16,
    },
    /// A 200 whose JSON object sandgate cannot honour: refused, never guessed.
    InvalidGrant(InvalidGrant),
}

/// The callback could not be asked: unreachable, timed out, or broken mid-reply.
#[derive(Debug)]
pub struct CallbackFailed {
    pub timed_out: bool,
    /// For the log only.
    pub cause: String,
}

impl CallbackFailed {
    /// The audit row's reason.
    pub fn reason(&self) -> &'static str {
        if self.timed_out {
            "callback_timeout"
        } else {
            "callback_unreachable"
        }
    }
}

pub struct AuthCallback {
    url: String,
    /// Keeps connections to the callback open between requests.
    agent: ureq::Agent,
    cache: Option<DecisionCache>,
}

impl std::fmt::Debug for AuthCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCallback")
            .field("url", &display_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl AuthCallback {
    pub fn new(config: &AuthCallbackConfig) -> AuthCallback {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect is "another status": following it would resend the credential.
            .max_redirects(0)
            .timeout_global(Some(config.timeout))
            .build()
            .into();
        AuthCallback {
            url: config.url.clone(),
            agent,
            cache: config.cache_ttl.map(DecisionCache::new),
        }
    }

    /// Where the callback is, safe to log.
    pub fn display_url(&self) -> String {
        display_url(&self.url)
    }

    /// Asks the callback about `presented` (or answers from the cache).
    pub async fn decide(
        &self,
        presented: Presented<'_>,
        call: &Call<'_>,
    ) -> Result<Decision, CallbackFailed> {
        let credential = presented.credential();
        let cache_key = self.cache.as_ref().map(|_| CacheKey {
            credential: hash_key(credential),
            method: call.method.to_owned(),
            route: call.route.to_owned(),
        });
        if let (Some(cache), Some(key)) = (&self.cache, &cache_key)
            && let Some(principal) = cache.get(key)
        {
            return Ok(Decision::Allowed(principal));
        }
        let (name, value) = match presented {
            Presented::Bearer(t) => ("authorization", format!("Bearer {t}")),
            Presented::ApiKey(k) => ("x-api-key", k.to_owned()),
        };
        let request = self
            .agent
            .post(&self.url)
            .header(name, value)
            .header("x-request-path", call.path)
            .header("x-request-method", call.method)
            .header("x-request-id", call.request_id.as_str());
        let (status, body) = tokio::task::spawn_blocking(move || {
            let mut response = request.send_empty()?;
            // Read even a refusal's body, so the connection can be reused.
            let body = response
                .body_mut()
                .with_config()
                .limit(MAX_REPLY_BYTES)
                .read_to_vec();
            Ok::<_, ureq::Error>((response.status().as_u16(), body))
        })
        .await
        .map_err(|e| CallbackFailed {
            timed_out: false,
            cause: e.to_string(),
        })?
        .map_err(failed)?;
        if status != 200 {
            return Ok(Decision::Denied { status });
        }
        let body = match body {
            Ok(body) => body,
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                return Ok(Decision::InvalidGrant(InvalidGrant(format!(
                    "reply over {MAX_REPLY_BYTES} bytes"
                ))));
            }
            Err(e) => return Err(failed(e)),
        };
        match callback_principal(credential, &body) {
            Ok(principal) => {
                let principal = Arc::new(principal);
                if let (Some(cache), Some(key)) = (&self.cache, cache_key) {
                    cache.put(key, Arc::clone(&principal));
                }
                Ok(Decision::Allowed(principal))
            }
            Err(invalid) => Ok(Decision::InvalidGrant(invalid)),
        }
    }
}

fn failed(e: ureq::Error) -> CallbackFailed {
    let timed_out = match &e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    };
    CallbackFailed {
        timed_out,
        cause: e.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    /// SHA-256 of the credential: the cache never holds a credential.
    credential: KeyHash,
    method: String,
    route: String,
}

/// Recent "yes" answers. Off by default: while an entry lives, the callback is not
/// asked again, so a revocation on its side takes up to the TTL to be seen.
struct DecisionCache {
    ttl: Duration,
    entries: Mutex<HashMap<CacheKey, (Instant, Arc<Principal>)>>,
}

impl DecisionCache {
    fn new(ttl: Duration) -> DecisionCache {
        DecisionCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &CacheKey) -> Option<Arc<Principal>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(key) {
            Some((at, principal)) if at.elapsed() < self.ttl => Some(Arc::clone(principal)),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: CacheKey, principal: Arc<Principal>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_CACHED {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if entries.len() >= MAX_CACHED {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), principal));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_logged_without_secrets() {
        assert!(check_url("http://127.0.0.1:9000/auth").is_ok());
        assert!(check_url("https://auth.example.com/check?x=1").is_ok());
        assert!(check_url("ftp://auth.example.com/").is_err());
        assert!(check_url("/auth").is_err());
        assert!(check_url("not a url").is_err());
        assert_eq!(
            display_url("https://user:pw@auth.example.com:8443/check?token=s3cret"),
            "https://auth.example.com:8443/check"
        );
    }

    #[test]
    fn cached_decisions_expire() {
        let cache = DecisionCache::new(Duration::from_millis(50));
        let key = CacheKey {
            credential: hash_key("t"),
            method: "GET".into(),
            route: "/v1/auth/whoami".into(),
        };
        assert!(cache.get(&key).is_none());
        cache.put(key.clone(), Arc::new(Principal::open()));
        assert!(cache.get(&key).is_some());
        let other_route = CacheKey {
            route: "/v1/keys".into(),
            ..key.clone()
        };
        assert!(cache.get(&other_route).is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(&key).is_none());
    }
}
