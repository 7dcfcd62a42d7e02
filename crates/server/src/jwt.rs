//! JWT verification (SPEC §8 item 3): the credential source between environment
//! keys and the auth callback.
//!
//! Owns the cryptographic check and the JWKS cache; what verified claims grant is a
//! domain rule, in [`sandgate_core::keys::jwt`]. The algorithm is never taken from
//! the token alone: with the secret it is HS256, with a JWKS it is the one the key
//! of the token's `kid` implies (kty/crv/alg), and the token's `alg` must equal it.
//! `alg: none` cannot be parsed, and a JWKS never yields an HMAC key, so a token
//! "signed" with a public key's bytes is refused.
//!
//! The JWKS is fetched with ureq on tokio's blocking pool and kept in memory. An
//! unknown `kid` triggers a refresh at most once per `jwks_min_refresh`, one fetch at
//! a time (concurrent misses wait for it); a failed fetch keeps the last good set.
//! Nothing here logs a token: refusals name a reason and a subject or fingerprint.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use sandgate_core::keys::format::SecretKey;
use sandgate_core::keys::jwt::{
    ClaimNames, jwt_key_id, jwt_principal, looks_like_jwt, subject, unverified_jwt_id,
};
use sandgate_core::principal::Principal;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::callback::display_url;

/// Largest JWKS document read.
const MAX_JWKS_BYTES: u64 = 256 * 1024;

/// How JWTs are verified; at least one of `secret` and `jwks_url` is set.
#[derive(Clone)]
pub struct JwtConfig {
    /// `SANDGATE_JWT_SECRET`: HS256 tokens are verified with it (environment only).
    pub secret: Option<SecretKey>,
    /// `SANDGATE_JWT_JWKS_URL`: RS256, ES256 and EdDSA tokens are verified with its keys.
    pub jwks_url: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Accepted `aud` values (any one), when not empty.
    pub audience: Vec<String>,
    pub claims: ClaimNames,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Whole-fetch deadline of the JWKS.
    pub jwks_timeout: Duration,
    /// Fewest time between two JWKS fetches caused by unknown `kid`s.
    pub jwks_min_refresh: Duration,
    /// A key set older than this is fetched again before it is used.
    pub jwks_max_age: Duration,
}

impl JwtConfig {
    /// RFC 7518 §3.2: an HS256 key has at least 256 bits.
    pub const MIN_SECRET_BYTES: usize = 32;

    pub fn new() -> JwtConfig {
        JwtConfig {
            secret: None,
            jwks_url: None,
            issuer: None,
            audience: Vec::new(),
            claims: ClaimNames::default(),
            leeway: Duration::from_secs(30),
            jwks_timeout: Duration::from_secs(3),
            jwks_min_refresh: Duration::from_secs(10),
            jwks_max_age: Duration::from_secs(15 * 60),
        }
    }
}

impl Default for JwtConfig {
    fn default() -> JwtConfig {
        JwtConfig::new()
    }
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("jwks_url", &self.jwks_url.as_deref().map(display_url))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("claims", &self.claims)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

/// What the JWT source says about a credential.
#[derive(Debug)]
pub enum JwtCheck {
    /// A valid token.
    Valid(Arc<Principal>),
    /// Signed by a trusted key, but expired, not yet valid, for another issuer or
    /// audience, or with claims sandgate cannot honour: refused, whatever comes next.
    Refused {
        reason: &'static str,
        subject: String,
        /// For the log only.
        detail: String,
    },
    /// Not a token this server can verify (bad signature, unknown key, malformed):
    /// a later source may know the credential.
    Unknown {
        reason: &'static str,
        subject: String,
    },
}

/// A key of the JWKS, with the one algorithm it verifies.
#[derive(Clone)]
struct VerifyingKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

pub struct JwtVerifier {
    config: JwtConfig,
    secret: Option<DecodingKey>,
    jwks: Option<Jwks>,
    /// Tokens that verified lately (by SHA-256), until their `exp` but at most
    /// [`VERIFIED_TTL`]: a client sends the same token many times, and an RSA
    /// verification costs tens of microseconds. The short bound keeps a key taken
    /// out of the JWKS from being honoured for long.
    verified: std::sync::Mutex<HashMap<[u8; 32], Verified>>,
}

/// A verified token's principal, and until when (unix seconds) it is trusted.
type Verified = (Arc<Principal>, u64);

/// Longest a verified token is trusted without being verified again.
const VERIFIED_TTL: u64 = 60;
/// Verified tokens remembered at most (the cache empties when full).
const VERIFIED_MAX: usize = 10_000;

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> JwtVerifier {
        JwtVerifier {
            secret: config
                .secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            jwks: config.jwks_url.as_deref().map(|url| Jwks::new(url, config)),
            config: config.clone(),
            verified: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// How the start-up log names this source.
    pub fn describe(&self) -> String {
        let mut kinds = Vec::new();
        if self.secret.is_some() {
            kinds.push("HS256 secret".to_owned());
        }
        if let Some(jwks) = &self.jwks {
            kinds.push(format!("JWKS {}", display_url(&jwks.url)));
        }
        format!("JWT ({})", kinds.join(", "))
    }

    /// Fetches the JWKS once, so the first token need not wait for it.
    pub async fn prefetch(&self) {
        if let Some(jwks) = &self.jwks {
            jwks.refresh(None).await;
        }
    }

    /// Checks `token`. `None` when it does not have a JWT's shape.
    pub async fn check(&self, token: &str) -> Option<JwtCheck> {
        if !looks_like_jwt(token) {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        if let Some((principal, until)) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            && now < *until
        {
            return Some(JwtCheck::Valid(Arc::clone(principal)));
        }
        let unknown = |reason| JwtCheck::Unknown {
            reason,
            subject: unverified_jwt_id(token),
        };
        // Rejects `alg: none` and every algorithm jsonwebtoken does not know.
        let Ok(header) = decode_header(token) else {
            return Some(unknown("jwt_malformed"));
        };
        let verifying = if header.alg == Algorithm::HS256 {
            self.secret.clone().map(|key| VerifyingKey {
                key,
                algorithm: Algorithm::HS256,
            })
        } else if let Some(jwks) = &self.jwks {
            jwks.key(header.kid.as_deref()).await
        } else {
            None
        };
        let Some(verifying) = verifying else {
            return Some(unknown("jwt_unknown_key"));
        };
        if verifying.algorithm != header.alg {
            return Some(unknown("jwt_wrong_algorithm"));
        }
        let validation = self.validation(verifying.algorithm);
        let claims = match decode::<Map<String, Value>>(token, &verifying.key, &validation) {
            Ok(data) => data.claims,
            Err(e) => return Some(self.failed(token, &verifying, e)),
        };
        Some(match jwt_principal(&claims, &self.config.claims) {
            Ok(principal) => {
                let principal = Arc::new(principal);
                let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(now);
                let until = exp.min(now + VERIFIED_TTL);
                let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                if verified.len() >= VERIFIED_MAX {
                    verified.clear();
                }
                verified.insert(digest, (Arc::clone(&principal), until));
                JwtCheck::Valid(principal)
            }
            Err(e) => JwtCheck::Refused {
                reason: "jwt_invalid_claims",
                subject: subject(&claims).map_or_else(|_| unverified_jwt_id(token), jwt_key_id),
                detail: e.to_string(),
            },
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        if self.config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.config.audience);
            validation.required_spec_claims.insert("aud".into());
        }
        validation
    }

    /// Why `token` failed: a claim check (the signature held) or the signature.
    fn failed(
        &self,
        token: &str,
        verifying: &VerifyingKey,
        e: jsonwebtoken::errors::Error,
    ) -> JwtCheck {
        use jsonwebtoken::errors::ErrorKind;
        let reason = match e.kind() {
            ErrorKind::ExpiredSignature => "jwt_expired",
            ErrorKind::ImmatureSignature => "jwt_not_yet_valid",
            ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => "jwt_wrong_issuer_or_audience",
            ErrorKind::MissingRequiredClaim(_) => "jwt_invalid_claims",
            ErrorKind::InvalidSignature => {
                return JwtCheck::Unknown {
                    reason: "jwt_bad_signature",
                    subject: unverified_jwt_id(token),
                };
            }
            _ => {
                return JwtCheck::Unknown {
                    reason: "jwt_malformed",
                    subject: unverified_jwt_id(token),
                };
            }
        };
        // The signature held: the subject can be believed, for the audit row.
        let mut lax = Validation::new(verifying.algorithm);
        lax.validate_exp = false;
        lax.validate_aud = false;
        lax.required_spec_claims.clear();
        let subject = decode::<Map<String, Value>>(token, &verifying.key, &lax)
            .ok()
            .and_then(|d| subject(&d.claims).ok().map(jwt_key_id))
            .unwrap_or_else(|| unverified_jwt_id(token));
        JwtCheck::Refused {
            reason,
            subject,
            detail: e.to_string(),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The JWKS and when it was fetched.
struct KeySet {
    keys: HashMap<String, VerifyingKey>,
    fetched_at: Option<Instant>,
}

/// The cached key set of one JWKS URL.
struct Jwks {
    url: String,
    agent: ureq::Agent,
    min_refresh: Duration,
    max_age: Duration,
    set: RwLock<Arc<KeySet>>,
    /// Held during a fetch (single flight); remembers when the last one started.
    refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    fn new(url: &str, config: &JwtConfig) -> Jwks {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.jwks_timeout))
            .build()
            .into();
        Jwks {
            url: url.to_owned(),
            agent,
            min_refresh: config.jwks_min_refresh,
            max_age: config.jwks_max_age,
            set: RwLock::new(Arc::new(KeySet {
                keys: HashMap::new(),
                fetched_at: None,
            })),
            refresh: tokio::sync::Mutex::new(None),
        }
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.set.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The key named `kid`; a token without `kid` may use the only key of a
    /// one-key set. Refreshes the set when the key is unknown or the set is old.
    async fn key(&self, kid: Option<&str>) -> Option<VerifyingKey> {
        let set = self.current();
        let fresh = set.fetched_at.is_some_and(|at| at.elapsed() < self.max_age);
        if fresh && let Some(key) = find(&set, kid) {
            return Some(key);
        }
        self.refresh(Some(set.fetched_at)).await;
        find(&self.current(), kid)
    }

    /// Fetches the set unless another fetch replaced `seen` meanwhile, or the last
    /// one started less than `min_refresh` ago (`seen = None`: unconditionally).
    async fn refresh(&self, seen: Option<Option<Instant>>) {
        let mut last = self.refresh.lock().await;
        if let Some(seen) = seen {
            if self.current().fetched_at != seen {
                return;
            }
            if last.is_some_and(|at| at.elapsed() < self.min_refresh) {
                return;
            }
        }
        *last = Some(Instant::now());
        let request = self.agent.get(&self.url);
        let fetched = tokio::task::spawn_blocking(move || {
            let mut response = request.call().map_err(|e| e.to_string())?;
            if response.status() != 200 {
                return Err(format!("status {}", response.status()));
            }
            response
                .body_mut()
                .with_config()
                .limit(MAX_JWKS_BYTES)
                .read_to_vec()
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .and_then(|body| parse_jwks(&body));
        match fetched {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), jwks = %display_url(&self.url), "JWKS fetched");
                *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(KeySet {
                    keys,
                    fetched_at: Some(Instant::now()),
                });
            }
            Err(e) => tracing::warn!(
                jwks = %display_url(&self.url),
                error = %e,
                "JWKS fetch failed; keeping the last good key set"
            ),
        }
    }
}

fn find(set: &KeySet, kid: Option<&str>) -> Option<VerifyingKey> {
    match kid {
        Some(kid) => set.keys.get(kid).cloned(),
        None if set.keys.len() == 1 => set.keys.values().next().cloned(),
        None => None,
    }
}

/// The usable keys of a JWKS document, by `kid`. Keys sandgate cannot use (HMAC,
/// encryption keys, other curves or algorithms, no `kid`) are skipped.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, VerifyingKey>, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for value in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if let Some(key) = verifying_key(&jwk) {
            keys.insert(kid, key);
        }
    }
    Ok(keys)
}

/// The key and its one algorithm, from the JWK's own parameters.
fn verifying_key(jwk: &Jwk) -> Option<VerifyingKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let (algorithm, expected) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, KeyAlgorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Algorithm::EdDSA, KeyAlgorithm::EdDSA)
        }
        // Symmetric keys never come from a JWKS; other curves are not supported.
        _ => return None,
    };
    if jwk.common.key_algorithm.is_some_and(|a| a != expected) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyingKey { key, algorithm })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asymmetric_signing_keys_are_taken_from_a_jwks() {
        let body = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed-enc", "use": "enc"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed-as-hs", "alg": "HS256"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa-pss", "alg": "PS256"},
            {"kty": "weird"}
        ]});
        let keys = parse_jwks(body.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["ed"]);
        assert_eq!(keys["ed"].algorithm, Algorithm::EdDSA);
        assert!(parse_jwks(b"[]").is_err());
    }
}
