//! Health, readiness, metrics and the OpenAPI document.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::ApiResult;
use crate::state::AppState;

#[derive(Debug, Serialize, JsonSchema)]
pub struct Health {
    pub status: &'static str,
}

pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Readiness {
    pub status: &'static str,
    /// What the operator must know about this server's configuration, such as
    /// "authentication is off"; absent when there is nothing to say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<&'static str>,
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let warnings = state.warnings();
    match state.audit_store().ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(Readiness {
                status: "ok",
                warnings,
            }),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "storage is not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Readiness {
                    status: "storage unavailable",
                    warnings,
                }),
            )
        }
    }
}

/// The OpenAPI document, rendered once at start-up.
#[derive(Debug, Clone)]
pub struct OpenApiDoc(pub Arc<str>);

pub async fn openapi(Extension(doc): Extension<OpenApiDoc>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
}

pub async fn metrics(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    ))
}
