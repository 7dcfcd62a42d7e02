//! `/v1/webhooks`: thin over [`sandgate_core::webhooks::WebhookService`].

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sandgate_core::webhooks::api::{CreateWebhookRequest, CreatedWebhook, WebhookView};
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiPath, Caller};
use crate::state::AppState;

#[derive(Debug, Serialize, JsonSchema)]
pub struct WebhookList {
    pub data: Vec<WebhookView>,
}

pub async fn create_webhook(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<CreateWebhookRequest>,
) -> ApiResult<(StatusCode, Json<CreatedWebhook>)> {
    let created = state.webhooks().create(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list_webhooks(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> ApiResult<Json<WebhookList>> {
    let data = state.webhooks().list(&caller).await?;
    Ok(Json(WebhookList { data }))
}

pub async fn delete_webhook(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.webhooks().delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
