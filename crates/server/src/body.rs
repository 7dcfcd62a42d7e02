//! Reads small request bodies in full before anything else sees the request.
//!
//! A response sent before its request's body was read (a refusal by the
//! authorization layer, a handler that takes no body) makes the HTTP/1.1
//! connection close, and a client that reuses pooled connections then fails its
//! next request with "peer disconnected". Bodies up to [`BUFFERED_MAX`] bytes
//! with a declared length are read first, so every answer leaves the connection
//! reusable; larger or chunked bodies stream to the handler as before.

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Larger declared bodies are not buffered.
pub const BUFFERED_MAX: usize = 64 * 1024;

pub async fn buffer_small_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(len) if len > 0 && len <= BUFFERED_MAX => {
            let (parts, body) = req.into_parts();
            match axum::body::to_bytes(body, BUFFERED_MAX).await {
                Ok(bytes) => {
                    next.run(Request::from_parts(parts, Body::from(bytes)))
                        .await
                }
                Err(_) => {
                    ApiError::bad_request("the request body could not be read").into_response()
                }
            }
        }
        _ => next.run(req).await,
    }
}
