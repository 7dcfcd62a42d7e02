//! The authorization layer: credential → principal → route policy → IP allowlists.
//!
//! Runs after routing, so it knows the route template. A (method, route) missing
//! from the policy is refused, never served: deny by default. Every attempt on a
//! non-public route, allowed or not, becomes an audit row (queued, written in
//! batches). Failures answer only with the SPEC codes; the row keeps the reason.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Extension, MatchedPath, OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sandgate_core::audit::AuthAttempt;
use sandgate_core::keys::callback::callback_key_id;
use sandgate_core::keys::{AuthFailure, format};
use sandgate_core::limits::RateDecision;
use sandgate_core::model::{Outcome, Timestamp};
use sandgate_core::principal::Principal;

use crate::callback::{Call, Decision, Presented};
use crate::error::ApiError;
use crate::jwt::JwtCheck;
use crate::request::RequestInfo;
use crate::routes::{Access, Policy};
use crate::state::{AppState, AuthMode};

pub async fn authorize(
    State(state): State<AppState>,
    Extension(policy): Extension<Arc<Policy>>,
    mut req: Request,
    next: Next,
) -> Response {
    let found = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|r| policy.lookup(req.method(), r.as_str()));
    let Some((access, route)) = found else {
        return ApiError::not_found("route").into_response();
    };
    if access == Access::Public {
        return next.run(req).await;
    }
    let info = req
        .extensions()
        .get::<RequestInfo>()
        .cloned()
        .expect("request_context runs first");
    // An address that keeps presenting invalid credentials is refused before any
    // lookup or audit write: guessing and floods of random keys get nowhere.
    let ip_subject = IpText::new(info.client_ip);
    if let Some(limit) = state.config().auth_failure_limit
        && let Some(retry_after) = state
            .auth_failures()
            .would_refuse(ip_subject.as_str(), limit)
    {
        state.metrics().observe_auth("denied", "throttled");
        drain(req.into_body()).await;
        return ApiError::rate_limited(retry_after).into_response();
    }
    let path = req.uri().path();
    let facts = Facts {
        info: &info,
        method: method_word(req.method()),
        // A route without parameters is its own path: no copy of it for the row.
        path: if path == route {
            Cow::Borrowed(route)
        } else {
            Cow::Owned(path.to_owned())
        },
    };
    // The path as the client sent it, before any nesting stripped a prefix.
    let original_path = req
        .extensions()
        .get::<OriginalUri>()
        .map_or(path, |uri| uri.path());
    let call = Call {
        method: req.method().as_str(),
        path: original_path,
        route,
        request_id: &info.request_id,
    };
    let principal = match decide(&state, req.headers(), &call, access, info.client_ip).await {
        Ok(principal) => principal,
        Err(refusal) => {
            let response = refuse(&state, facts, &ip_subject, req.headers(), refusal).await;
            drain(req.into_body()).await;
            return response;
        }
    };
    let limits = if principal.rate_limits.is_empty() {
        &state.config().default_rate_limits
    } else {
        &principal.rate_limits
    };
    let decision = if limits.is_empty() {
        None
    } else {
        let limiter = state.rate_limiter();
        Some(match limiter.check_now(&principal.key_id, limits) {
            Some(d) => d,
            None => limiter.check(&principal.key_id, limits).await,
        })
    };
    if let Some(d) = decision.filter(|d| !d.allowed) {
        let refusal = Refusal::new(
            ApiError::rate_limited(d.retry_after_secs),
            "rate_limited",
            Some(principal),
        );
        let mut response = refuse(&state, facts, &ip_subject, req.headers(), refusal).await;
        drain(req.into_body()).await;
        rate_limit_headers(&mut response, d);
        return response;
    }
    state.metrics().observe_auth("allowed", "ok");
    let now = Timestamp::now();
    principal.record_use(now);
    state.usage().request(&principal, now);
    let attempt = facts.attempt(now, Some(Arc::clone(&principal)), Outcome::Allowed, None);
    state.audit().record(attempt).await;
    // For the handler (`Caller`); request_context put the info in place.
    if let Some(info) = req.extensions_mut().get_mut::<RequestInfo>() {
        info.caller = Some(principal);
    }
    let mut response = next.run(req).await;
    if let Some(d) = decision {
        rate_limit_headers(&mut response, d);
    }
    response
}

/// Reads what is left of a refused request's body, a bounded amount for a
/// moment at most: an answer sent before its request's body was read makes
/// the HTTP/1.1 connection close, and a client's next request on it (pooled,
/// as SDKs do) would fail. Bodies of known small size were read already
/// ([`crate::body`]); this covers chunked ones (streaming RPCs).
async fn drain(body: axum::body::Body) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        axum::body::to_bytes(body, 1 << 20),
    )
    .await;
}

/// The request's side of its audit row.
struct Facts<'a> {
    info: &'a RequestInfo,
    method: Cow<'static, str>,
    path: Cow<'static, str>,
}

impl Facts<'_> {
    fn attempt(
        self,
        time: Timestamp,
        key: Option<Arc<Principal>>,
        outcome: Outcome,
        reason: Option<&'static str>,
    ) -> AuthAttempt {
        AuthAttempt {
            time,
            request_id: self.info.request_id.clone(),
            client_ip: self.info.client_ip,
            method: self.method,
            path: self.path,
            key,
            presented_prefix: None,
            subject: None,
            outcome,
            reason,
        }
    }
}

/// The standard methods as fixed words; anything else is copied.
fn method_word(method: &Method) -> Cow<'static, str> {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::PATCH, "PATCH"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    match STANDARD.iter().find(|(m, _)| m == method) {
        Some((_, word)) => Cow::Borrowed(word),
        None => Cow::Owned(method.as_str().to_owned()),
    }
}

/// An address written out without an allocation: the failed-auth throttle's subject.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> IpText {
        let mut buf = [0u8; 48];
        let len = match ip {
            // Written by hand: the formatter costs more than the rest of the check.
            IpAddr::V4(v4) => {
                let mut len = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        buf[len] = b'.';
                        len += 1;
                    }
                    if octet >= 100 {
                        buf[len] = b'0' + octet / 100;
                        len += 1;
                    }
                    if octet >= 10 {
                        buf[len] = b'0' + octet / 10 % 10;
                        len += 1;
                    }
                    buf[len] = b'0' + octet % 10;
                    len += 1;
                }
                len
            }
            IpAddr::V6(_) => {
                use std::io::Write;
                let mut rest = &mut buf[..];
                // The longest address text is 45 bytes: this never fails.
                let _ = write!(rest, "{ip}");
                48 - rest.len()
            }
        };
        IpText { buf, len }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

async fn refuse(
    state: &AppState,
    facts: Facts<'_>,
    ip: &IpText,
    headers: &HeaderMap,
    refusal: Refusal,
) -> Response {
    state.metrics().observe_auth("denied", refusal.reason);
    if let Some(key) = &refusal.key {
        state.usage().denied(key);
    }
    if refusal.counts_as_bad_credential
        && let Some(limit) = state.config().auth_failure_limit
    {
        state.auth_failures().count(ip.as_str(), limit);
    }
    let mut attempt = facts.attempt(
        Timestamp::now(),
        refusal.key,
        Outcome::Denied,
        Some(refusal.reason),
    );
    attempt.presented_prefix = credential(headers)
        .and_then(format::prefix_of)
        .map(str::to_owned);
    attempt.subject = refusal.subject;
    state.audit().record(attempt).await;
    refusal.error.into_response()
}

// Named once: a `&str` name would be parsed and checked again on every response.
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// On every response of a rate-limited key. A header value is its own buffer:
/// numbers below 1000 are slices of one static text, a key's limit (the same on
/// each of its requests) is this thread's copy, and only what is left allocates.
fn rate_limit_headers(response: &mut Response, d: RateDecision) {
    thread_local! {
        static LIMIT: std::cell::RefCell<Option<(u32, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    let limit = small_number(d.limit.into()).unwrap_or_else(|| {
        LIMIT.with_borrow_mut(|last| match last {
            Some((n, value)) if *n == d.limit => value.clone(),
            _ => last.insert((d.limit, HeaderValue::from(d.limit))).1.clone(),
        })
    });
    let remaining =
        small_number(d.remaining.into()).unwrap_or_else(|| HeaderValue::from(d.remaining));
    let reset = small_number(d.reset_secs).unwrap_or_else(|| HeaderValue::from(d.reset_secs));
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_LIMIT.clone(), limit);
    headers.insert(RATELIMIT_REMAINING.clone(), remaining);
    headers.insert(RATELIMIT_RESET.clone(), reset);
}

/// The numbers 0 to 999 written one after another (10 of one digit, 90 of two,
/// 900 of three).
static SMALL_NUMBERS: [u8; 2890] = {
    let mut out = [0u8; 2890];
    let (mut n, mut at) = (0, 0);
    while n < 1000 {
        if n >= 100 {
            out[at] = b'0' + (n / 100) as u8;
            at += 1;
        }
        if n >= 10 {
            out[at] = b'0' + (n / 10 % 10) as u8;
            at += 1;
        }
        out[at] = b'0' + (n % 10) as u8;
        at += 1;
        n += 1;
    }
    out
};

/// `n` as a header value without an allocation, when it is below 1000.
fn small_number(n: u64) -> Option<HeaderValue> {
    let n = usize::try_from(n).ok().filter(|n| *n < 1000)?;
    let (start, len) = match n {
        0..=9 => (n, 1),
        10..=99 => (10 + (n - 10) * 2, 2),
        _ => (190 + (n - 100) * 3, 3),
    };
    let digits = axum::body::Bytes::from_static(&SMALL_NUMBERS[start..start + len]);
    HeaderValue::from_maybe_shared(digits).ok()
}

/// A refused request: what the client sees, and what the audit row says.
struct Refusal {
    error: ApiError,
    reason: &'static str,
    key: Option<Arc<Principal>>,
    /// An invalid credential (not a valid key refused for scope, IP or rate).
    counts_as_bad_credential: bool,
    /// The audit row's key id when there is no key: a credential's fingerprint.
    subject: Option<String>,
}

impl Refusal {
    fn new(error: ApiError, reason: &'static str, key: Option<Arc<Principal>>) -> Refusal {
        Refusal {
            error,
            reason,
            key,
            counts_as_bad_credential: false,
            subject: None,
        }
    }

    fn subject(self, subject: Option<String>) -> Refusal {
        Refusal { subject, ..self }
    }

    fn bad_credential(
        error: ApiError,
        reason: &'static str,
        key: Option<Arc<Principal>>,
    ) -> Refusal {
        Refusal {
            counts_as_bad_credential: true,
            ..Refusal::new(error, reason, key)
        }
    }
}

/// What envd answers a request without the sandbox's access token.
const ENVD_UNAUTHORIZED: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// E2B's in-sandbox routes: the sandbox named by `E2b-Sandbox-Id`, opened by
/// its access token (`X-Access-Token`, or the code interpreter's
/// `E2B-Traffic-Access-Token`). The request then acts for the sandbox's owner
/// as the owner's key stands now (a revoked or expired key opens nothing), so
/// a token never does more than its owner's key may.
async fn sandbox_owner(state: &AppState, headers: &HeaderMap) -> Result<Arc<Principal>, Refusal> {
    use sandgate_core::sandboxes::TokenRefusal;
    let token = ["x-access-token", "e2b-traffic-access-token"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(id) = crate::e2b::sandbox_id(headers) else {
        return Err(Refusal::bad_credential(
            ApiError::unauthorized(ENVD_UNAUTHORIZED),
            "missing_sandbox_id",
            None,
        ));
    };
    let owner = match state.sandboxes().owner_by_token(id, token) {
        Ok(owner) => owner,
        Err(TokenRefusal::NotFound) => {
            return Err(Refusal::bad_credential(
                ApiError::sandbox_not_running(id),
                "sandbox_not_found",
                None,
            ));
        }
        Err(TokenRefusal::BadToken) => {
            let reason = if token.is_some() {
                "invalid_access_token"
            } else {
                "missing_credential"
            };
            return Err(Refusal::bad_credential(
                ApiError::unauthorized(ENVD_UNAUTHORIZED),
                reason,
                None,
            ));
        }
    };
    state.keys().current(&owner).map_err(|denied| {
        Refusal::new(ApiError::key_expired(), denied.failure.reason(), denied.key)
    })
}

async fn decide(
    state: &AppState,
    headers: &HeaderMap,
    call: &Call<'_>,
    access: Access,
    client_ip: IpAddr,
) -> Result<Arc<Principal>, Refusal> {
    let server_allowlist = &state.config().allowed_ips;
    if !server_allowlist.is_empty() && !server_allowlist.iter().any(|n| n.contains(client_ip)) {
        return Err(Refusal::new(
            ApiError::ip_not_allowed(),
            "ip_not_allowed_server",
            None,
        ));
    }
    let (principal, scope) = match access {
        Access::SandboxToken(scope) => (Box::pin(sandbox_owner(state, headers)).await?, scope),
        Access::Scope(scope) => (principal(state, headers, call).await?, Some(scope)),
        Access::Authenticated | Access::Public => (principal(state, headers, call).await?, None),
    };
    if !principal.allowed_ips.is_empty()
        && !principal.allowed_ips.iter().any(|n| n.contains(client_ip))
    {
        return Err(Refusal::new(
            ApiError::ip_not_allowed(),
            "ip_not_allowed_key",
            Some(principal),
        ));
    }
    if let Some(scope) = scope
        && !principal.has(scope)
    {
        return Err(Refusal::new(
            ApiError::forbidden(scope, format!("This key lacks the scope {scope}")),
            "missing_scope",
            Some(principal),
        ));
    }
    Ok(principal)
}

/// Who presents the request's credential (everybody is the same principal when
/// authentication is off).
async fn principal(
    state: &AppState,
    headers: &HeaderMap,
    call: &Call<'_>,
) -> Result<Arc<Principal>, Refusal> {
    match state.config().auth_mode {
        AuthMode::Open => Ok(Arc::clone(state.open_principal())),
        AuthMode::Keys => authenticate(state, headers, call).await,
    }
}

/// The credential's principal, from the sources in SPEC §8 order, first match wins:
/// stored keys, environment keys, JWTs, then the auth callback. A source "knows" a
/// credential it can vouch for: a stored key (even revoked), an environment key, a
/// JWT whose signature holds (even expired). Anything else goes on to the next.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    call: &Call<'_>,
) -> Result<Arc<Principal>, Refusal> {
    let Some(presented) = presented(headers) else {
        return Err(Refusal::new(
            ApiError::unauthorized(
                "Missing API key: send Authorization: Bearer <key> or X-API-Key",
            ),
            "missing_credential",
            None,
        ));
    };
    let credential = presented.credential();
    let unknown_reason = match state.keys().verify(credential).await {
        Ok(Some(p)) => return Ok(p),
        Ok(None) => "unknown_credential",
        Err(denied) => match denied.failure {
            AuthFailure::Expired | AuthFailure::Revoked => {
                return Err(Refusal::bad_credential(
                    ApiError::key_expired(),
                    denied.failure.reason(),
                    denied.key,
                ));
            }
            AuthFailure::Malformed | AuthFailure::Unknown => denied.failure.reason(),
        },
    };
    if let Some(p) = state.env_keys().verify(credential) {
        return Ok(p);
    }
    let mut unknown = Refusal::bad_credential(
        ApiError::unauthorized("Invalid API key"),
        unknown_reason,
        None,
    );
    if let Some(jwt) = state.jwt() {
        // Boxed, like the callback below: the stored-key path, taken by nearly
        // every request, then moves a small future instead of one as large as
        // these slower sources' state.
        match Box::pin(jwt.check(credential)).await {
            None => {}
            Some(JwtCheck::Valid(p)) => return Ok(p),
            Some(JwtCheck::Refused {
                reason,
                subject,
                detail,
            }) => {
                if reason == "jwt_invalid_claims" {
                    tracing::warn!(request_id = %call.request_id, %subject, error = %detail, "JWT claims refused");
                } else {
                    tracing::debug!(request_id = %call.request_id, %subject, reason, error = %detail, "JWT refused");
                }
                return Err(Refusal::bad_credential(
                    ApiError::unauthorized("Invalid token"),
                    reason,
                    None,
                )
                .subject(Some(subject)));
            }
            Some(JwtCheck::Unknown { reason, subject }) => {
                unknown =
                    Refusal::bad_credential(ApiError::unauthorized("Invalid token"), reason, None)
                        .subject(Some(subject));
            }
        }
    }
    let Some(callback) = state.auth_callback() else {
        return Err(unknown);
    };
    let subject = || Some(callback_key_id(credential));
    match Box::pin(callback.decide(presented, call)).await {
        Ok(Decision::Allowed(p)) => Ok(p),
        Ok(Decision::Denied { status }) => {
            tracing::debug!(status, "the auth callback refused a credential");
            Err(Refusal::bad_credential(
                ApiError::unauthorized("Invalid credential"),
                "callback_denied",
                None,
            )
            .subject(subject()))
        }
        Ok(Decision::InvalidGrant(e)) => {
            tracing::warn!(request_id = %call.request_id, error = %e, "auth callback reply refused");
            Err(Refusal::new(
                ApiError::unauthorized("Invalid credential"),
                "callback_invalid_grant",
                None,
            )
            .subject(subject()))
        }
        Err(failed) => {
            tracing::error!(
                request_id = %call.request_id,
                callback = %callback.display_url(),
                error = %failed.cause,
                "auth callback failed"
            );
            Err(
                Refusal::new(ApiError::auth_callback_failed(), failed.reason(), None)
                    .subject(subject()),
            )
        }
    }
}

/// The presented credential: a Bearer token wins over `X-API-Key`.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    presented(headers).map(Presented::credential)
}

/// The presented credential and the header it came in.
pub fn presented(headers: &HeaderMap) -> Option<Presented<'_>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .map(Presented::Bearer);
    bearer.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(Presented::ApiKey)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "192.168.100.1",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
    }

    #[test]
    fn rate_limit_headers_say_the_decisions_numbers() {
        for n in 0..1000u64 {
            assert_eq!(small_number(n).unwrap().to_str().unwrap(), n.to_string());
        }
        assert!(small_number(1000).is_none());
        let numbers = [0, 7, 9, 10, 42, 99, 100, 555, 999, 1000, 60_000, u32::MAX];
        for (i, &n) in numbers.iter().enumerate() {
            let other = numbers[(i + 5) % numbers.len()];
            // Twice: the second takes this thread's copy of the limit.
            for _ in 0..2 {
                let mut response = Response::new(axum::body::Body::empty());
                rate_limit_headers(
                    &mut response,
                    RateDecision {
                        allowed: true,
                        limit: n,
                        remaining: other,
                        reset_secs: u64::from(n) * 3,
                        retry_after_secs: 0,
                    },
                );
                let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
                assert_eq!(header("ratelimit-limit"), n.to_string());
                assert_eq!(header("ratelimit-remaining"), other.to_string());
                assert_eq!(header("ratelimit-reset"), (u64::from(n) * 3).to_string());
            }
        }
    }

    #[test]
    fn bearer_wins_over_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("from-header"));
        assert_eq!(credential(&h), Some("from-header"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer from-bearer"),
        );
        assert_eq!(credential(&h), Some("from-bearer"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(credential(&h), Some("from-header"));
        assert_eq!(credential(&HeaderMap::new()), None);
    }
}
