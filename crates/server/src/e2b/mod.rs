//! E2B compatibility (SPEC §10): the official E2B SDKs, configured with
//! `E2B_API_URL` and `E2B_SANDBOX_URL` pointing here and a sandgate key as
//! `E2B_API_KEY`, work unmodified.
//!
//! Three surfaces share the listener with `/v1`, every route declared in
//! [`crate::routes`] like any other:
//! - the control plane ([`control`]): E2B's REST paths, authenticated with the
//!   key in `X-API-Key` and mapped onto the same sandboxes, scopes, tenants,
//!   limits, quotas and audit as `/v1`;
//! - envd, the in-sandbox agent ([`process`], [`filesystem`], [`files`]):
//!   Connect RPC and plain HTTP, naming the sandbox in `E2b-Sandbox-Id` and
//!   proving access with the sandbox's token in `X-Access-Token` (the
//!   authorization layer checks it, and that the sandbox's owner still holds a
//!   valid key with the route's scope);
//! - the code interpreter ([`interpreter`]; requests with
//!   `E2b-Sandbox-Port: 49999`, authenticated like envd's).
//!
//! Errors on these routes carry E2B's shape, `{"code": <status>, "message"}`,
//! beside the SPEC's `error` object ([`e2b_error_shape`]).

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;

pub mod connect;
pub mod control;
pub mod files;
pub mod filesystem;
pub mod interpreter;
pub mod process;

/// The header naming the sandbox of an envd or code-interpreter request.
pub const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// The header naming the port inside the sandbox a request is for.
pub const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// envd's port, and the code interpreter's.
pub const ENVD_PORT: u16 = 49983;
pub const INTERPRETER_PORT: u16 = 49999;
/// The envd version sandgate speaks as (which protocol details the SDK uses).
pub const ENVD_VERSION: &str = "0.5.7";

/// The route templates of E2B's surfaces (from the route table).
#[derive(Debug, Default)]
pub struct E2bRoutes(pub std::collections::HashSet<&'static str>);

/// The sandbox named by `E2b-Sandbox-Id` (checked by the authorization layer).
#[derive(Debug, Clone)]
pub struct SandboxId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SandboxId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        sandbox_id(&parts.headers)
            .map(|id| SandboxId(id.to_owned()))
            .ok_or_else(|| {
                ApiError::invalid("E2b-Sandbox-Id", "name the sandbox in E2b-Sandbox-Id")
            })
    }
}

pub fn sandbox_id(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(SANDBOX_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The port a sandbox request is for (envd's when not said).
pub fn sandbox_port(headers: &axum::http::HeaderMap) -> u16 {
    headers
        .get(SANDBOX_PORT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(ENVD_PORT)
}

/// `GET /health` (the authorization layer found the sandbox): envd's answer
/// is 204, the code interpreter's (port 49999) 200 with `"OK"`.
pub async fn health(headers: axum::http::HeaderMap) -> Response {
    use axum::response::IntoResponse;
    if sandbox_port(&headers) == INTERPRETER_PORT {
        axum::Json("OK").into_response()
    } else {
        axum::http::StatusCode::NO_CONTENT.into_response()
    }
}

/// Gives the SPEC's error bodies of E2B routes E2B's shape too: the status
/// as a number in `code`, and `message`, at the top level (what E2B's SDKs
/// read), beside the SPEC's `error` object. Connect errors (a string `code`)
/// and successful answers pass untouched.
pub async fn e2b_error_shape(
    axum::extract::State(routes): axum::extract::State<std::sync::Arc<E2bRoutes>>,
    req: Request,
    next: Next,
) -> Response {
    let is_e2b = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some_and(|p| routes.0.contains(p.as_str()));
    let response = next.run(req).await;
    if !is_e2b {
        return response;
    }
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 10).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let mut value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => return Response::from_parts(parts, Body::from(bytes)),
    };
    let message = value
        .pointer("/error/message")
        .and_then(|m| m.as_str())
        .map(str::to_owned);
    if let (Some(message), Some(map)) = (message, value.as_object_mut()) {
        map.insert("code".into(), status.as_u16().into());
        map.insert("message".into(), message.into());
    }
    let body = serde_json::to_vec(&value).unwrap_or_else(|_| bytes.to_vec());
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len() as u64));
    Response::from_parts(parts, Body::from(body))
}
