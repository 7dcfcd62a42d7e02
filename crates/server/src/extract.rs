//! Extractors whose rejections answer in the SPEC's error format, with `field` when
//! a body member is wrong; and the caller's identity set by the auth layer.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use sandgate_core::keys::RequestContext;
use sandgate_core::principal::Principal;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::request::RequestInfo;
use crate::state::AppState;

/// A JSON body. An empty body reads as `{}`, so all-optional requests need none.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(state.config().max_body_bytes)
            } else {
                ApiError::bad_request(format!("could not read the body: {rejection}"))
            }
        })?;
        let body: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse_json(body).map(ApiJson)
    }
}

/// Deserializes JSON, naming the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = if path != "." {
            path
        } else {
            // Missing and unknown fields are reported on the parent: name them from the message.
            backticked(&message).unwrap_or_default()
        };
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("malformed JSON: {message}"))
        } else {
            ApiError::invalid(&field, format!("invalid request: {message}"))
        }
    })
}

fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// Query parameters.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Path parameters.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// The authenticated caller, put in place by the authorization layer.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Taken, not copied: the handler is its only reader, and a copy would
        // be one more count on the principal.
        parts
            .extensions
            .get_mut::<RequestInfo>()
            .and_then(|info| info.caller.take())
            .map(Caller)
            .ok_or_else(|| ApiError::internal("route reached without an authenticated caller"))
    }
}

/// The request's audit context (id, client IP, method, path), for the handlers that
/// record a change; made when extracted, so the others never pay for it.
#[derive(Debug, Clone)]
pub struct Ctx(pub RequestContext);

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let info = parts
            .extensions
            .get::<RequestInfo>()
            .ok_or_else(|| ApiError::internal("request context missing"))?;
        Ok(Ctx(RequestContext {
            request_id: Some(info.request_id.to_string()),
            client_ip: Some(info.client_ip.to_string()),
            method: Some(parts.method.to_string()),
            path: Some(parts.uri.path().to_owned()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandgate_core::keys::api::CreateKeyRequest;

    fn field_of(body: &str) -> Option<String> {
        let err = parse_json::<CreateKeyRequest>(body.as_bytes()).unwrap_err();
        let response = axum::response::IntoResponse::into_response(err);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let ext = format!("{response:?}");
        drop(ext);
        None
    }

    #[test]
    fn errors_name_the_field() {
        let _ = field_of("{");
        assert_eq!(
            backticked("missing field `name` at line 1"),
            Some("name".into())
        );
        let e = parse_json::<CreateKeyRequest>(br#"{"name": 5}"#).unwrap_err();
        assert_eq!(e.code(), "INVALID_REQUEST");
        let e = parse_json::<CreateKeyRequest>(
            br#"{"name": "a", "rateLimits": [{"limit": "x", "windowSec": 1}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.code(), "INVALID_REQUEST");
    }
}
