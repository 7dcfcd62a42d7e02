//! `/v1/templates`: thin over [`sandgate_core::templates::TemplateService`].
//! Another tenant's or env's template is 404; `default` cannot be changed (409).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sandgate_core::templates::{CreateTemplateRequest, TemplateView, UpdateTemplateRequest};
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiPath, Caller};
use crate::handlers::sandboxes::NoFields;
use crate::state::AppState;

#[derive(Debug, Serialize, JsonSchema)]
pub struct TemplateList {
    pub data: Vec<TemplateView>,
}

pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> ApiResult<Json<TemplateList>> {
    let data = state.templates().list(&caller).await;
    Ok(Json(TemplateList { data }))
}

pub async fn create(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<CreateTemplateRequest>,
) -> ApiResult<(StatusCode, Json<TemplateView>)> {
    let view = state.templates().create(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<TemplateView>> {
    Ok(Json(state.templates().get(&caller, &id).await?))
}

pub async fn rebuild(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(NoFields {}): ApiJson<NoFields>,
) -> ApiResult<Json<TemplateView>> {
    Ok(Json(state.templates().rebuild(&caller, &id).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateTemplateRequest>,
) -> ApiResult<Json<TemplateView>> {
    Ok(Json(state.templates().update(&caller, &id, req).await?))
}

pub async fn delete(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.templates().delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
