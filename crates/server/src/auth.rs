//! The authorization layer: credential → principal → route policy → IP allowlists.
//!
//! Runs after routing, so it knows the route template. A (method, route) missing
//! from the policy is refused, never served: deny by default. Every attempt on a
//! non-public route, allowed or not, becomes an audit row (queued, written in
//! batches). Failures answer only with the SPEC codes; the row keeps the reason.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Extension, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sandgate_core::keys::service::auth_row;
use sandgate_core::keys::{AuthFailure, RequestContext, format};
use sandgate_core::limits::RateDecision;
use sandgate_core::model::{Outcome, Timestamp};
use sandgate_core::principal::Principal;

use crate::error::ApiError;
use crate::extract::{Caller, Ctx};
use crate::request::RequestInfo;
use crate::routes::{Access, Policy};
use crate::state::AppState;

pub async fn authorize(
    State(state): State<AppState>,
    Extension(policy): Extension<Arc<Policy>>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let Some(access) = route.and_then(|r| policy.access(req.method(), r)) else {
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
    let ip_subject = info.client_ip.to_string();
    if let Some(limit) = state.config().auth_failure_limit
        && let Some(retry_after) = state.auth_failures().would_refuse(&ip_subject, limit)
    {
        state.metrics().observe_auth("denied", "throttled");
        return ApiError::rate_limited(retry_after).into_response();
    }
    let ctx = RequestContext {
        request_id: Some(info.request_id),
        client_ip: Some(ip_subject),
        method: Some(req.method().to_string()),
        path: Some(req.uri().path().to_owned()),
    };
    let principal = match decide(&state, req.headers(), access, info.client_ip).await {
        Ok(principal) => principal,
        Err(refusal) => return refuse(&state, &ctx, req.headers(), refusal).await,
    };
    let limits = if principal.rate_limits.is_empty() {
        &state.config().default_rate_limits
    } else {
        &principal.rate_limits
    };
    let decision = if limits.is_empty() {
        None
    } else {
        Some(state.rate_limiter().check(&principal.key_id, limits).await)
    };
    if let Some(d) = decision.filter(|d| !d.allowed) {
        let refusal = Refusal::new(
            ApiError::rate_limited(d.retry_after_secs),
            "rate_limited",
            Some(principal),
        );
        let mut response = refuse(&state, &ctx, req.headers(), refusal).await;
        rate_limit_headers(&mut response, d);
        return response;
    }
    state.metrics().observe_auth("allowed", "ok");
    state
        .audit()
        .record(auth_row(
            &ctx,
            Some(&principal),
            None,
            Outcome::Allowed,
            None,
        ))
        .await;
    principal.record_use(Timestamp::now());
    state.usage().request(&principal);
    req.extensions_mut().insert(Caller(principal));
    req.extensions_mut().insert(Ctx(ctx));
    let mut response = next.run(req).await;
    if let Some(d) = decision {
        rate_limit_headers(&mut response, d);
    }
    response
}

async fn refuse(
    state: &AppState,
    ctx: &RequestContext,
    headers: &HeaderMap,
    refusal: Refusal,
) -> Response {
    state.metrics().observe_auth("denied", refusal.reason);
    if let Some(key) = &refusal.key {
        state.usage().denied(key);
    }
    let presented = credential(headers);
    if refusal.counts_as_bad_credential
        && let Some(limit) = state.config().auth_failure_limit
        && let Some(ip) = &ctx.client_ip
    {
        state.auth_failures().count(ip, limit);
    }
    state
        .audit()
        .record(auth_row(
            ctx,
            refusal.key.as_deref(),
            presented.and_then(format::prefix_of),
            Outcome::Denied,
            Some(refusal.reason),
        ))
        .await;
    refusal.error.into_response()
}

fn rate_limit_headers(response: &mut Response, d: RateDecision) {
    let headers = response.headers_mut();
    headers.insert("ratelimit-limit", HeaderValue::from(d.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(d.reset_secs));
}

/// A refused request: what the client sees, and what the audit row says.
struct Refusal {
    error: ApiError,
    reason: &'static str,
    key: Option<Arc<Principal>>,
    /// An invalid credential (not a valid key refused for scope, IP or rate).
    counts_as_bad_credential: bool,
}

impl Refusal {
    fn new(error: ApiError, reason: &'static str, key: Option<Arc<Principal>>) -> Refusal {
        Refusal {
            error,
            reason,
            key,
            counts_as_bad_credential: false,
        }
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

async fn decide(
    state: &AppState,
    headers: &HeaderMap,
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
    let Some(credential) = credential(headers) else {
        return Err(Refusal::new(
            ApiError::unauthorized(
                "Missing API key: send Authorization: Bearer <key> or X-API-Key",
            ),
            "missing_credential",
            None,
        ));
    };
    // Sources in order, first match wins: stored keys, then environment keys.
    let principal = match state.keys().verify(credential).await {
        Ok(Some(p)) => p,
        Ok(None) => state.env_keys().verify(credential).ok_or_else(|| {
            Refusal::bad_credential(
                ApiError::unauthorized("Invalid API key"),
                "unknown_credential",
                None,
            )
        })?,
        Err(denied) => match denied.failure {
            AuthFailure::Expired | AuthFailure::Revoked => {
                return Err(Refusal::bad_credential(
                    ApiError::key_expired(),
                    denied.failure.reason(),
                    denied.key,
                ));
            }
            AuthFailure::Malformed | AuthFailure::Unknown => {
                state.env_keys().verify(credential).ok_or_else(|| {
                    Refusal::bad_credential(
                        ApiError::unauthorized("Invalid API key"),
                        denied.failure.reason(),
                        None,
                    )
                })?
            }
        },
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
    if let Access::Scope(scope) = access
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

/// The presented credential: a Bearer token wins over `X-API-Key`.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty());
    bearer.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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
