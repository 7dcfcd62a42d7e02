//! The first layer every request meets: its id, its client IP, its metrics.
//!
//! The request id (`req_…`, or the client's own `X-Request-Id` when it is sane) is
//! set as a task-local for the rest of the request, so any error built anywhere
//! below can carry it without threading it through every signature; it is echoed
//! on every response. Everything that keeps it (the task-local, [`RequestInfo`],
//! the audit row) holds a [`RequestId`]: inline, no allocation. The client IP is
//! the socket peer, or, only when the peer is a trusted proxy, the right-most
//! untrusted address of `X-Forwarded-For` (else `X-Real-IP`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use sandgate_core::net::{IpNet, canonical};
use sandgate_core::principal::Principal;
use sandgate_core::request_id::RequestId;

use crate::state::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: RequestId;
}

/// The id of the request being served, or `req_unknown` outside one.
pub fn current_request_id() -> String {
    REQUEST_ID
        .try_with(|id| id.to_string())
        .unwrap_or_else(|_| "req_unknown".to_owned())
}

/// Facts about the request gathered before authentication, and then the caller.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub request_id: RequestId,
    pub client_ip: IpAddr,
    /// Set by the authorization layer, taken by the handler ([`crate::extract::Caller`]):
    /// kept here rather than as an extension of its own, which would be one more
    /// allocation per request.
    pub caller: Option<Arc<Principal>>,
}

pub async fn request_context(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = match sane_request_id(req.headers()) {
        Some(id) => RequestId::new(id),
        None => RequestId::generate(),
    };
    let client_ip = client_ip(peer.ip(), req.headers(), &state.config().trusted_proxies);
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    req.extensions_mut().insert(RequestInfo {
        request_id: request_id.clone(),
        client_ip,
        caller: None,
    });
    let mut response = REQUEST_ID.scope(request_id.clone(), next.run(req)).await;
    if let Ok(value) = HeaderValue::from_bytes(request_id.as_bytes()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    state.metrics().observe_request(
        method.as_str(),
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

fn sane_request_id(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let sane = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    sane.then_some(value)
}

/// The caller's address: forwarded headers count only when the peer is trusted.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .collect();
    if !forwarded.is_empty() {
        // Right to left: the first hop our trusted proxies did not add is the client.
        return forwarded
            .iter()
            .rev()
            .copied()
            .find(|ip| !is_trusted(*ip))
            .unwrap_or(forwarded[0]);
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<IpAddr>().ok())
        .map_or(peer, canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarded_headers_are_ignored_from_untrusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-real-ip", "1.2.3.4")]);
        assert_eq!(client_ip(peer, &h, &trusted), peer);
    }

    #[test]
    fn right_most_untrusted_forwarded_address_wins() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.3")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[("x-real-ip", "198.51.100.8")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "198.51.100.8".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn request_ids_must_be_sane() {
        assert_eq!(
            sane_request_id(&headers(&[("x-request-id", "abc-123")])),
            Some("abc-123")
        );
        assert_eq!(sane_request_id(&headers(&[("x-request-id", "a b")])), None);
        let long = "a".repeat(200);
        assert_eq!(sane_request_id(&headers(&[("x-request-id", &long)])), None);
    }
}
