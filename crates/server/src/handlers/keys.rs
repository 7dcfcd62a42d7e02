//! `/v1/auth/whoami` and `/v1/keys`: thin over [`sandgate_core::keys::KeyService`].

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use sandgate_core::keys::api::{
    CreateKeyRequest, CreatedKey, KeyView, ResetExecutionsRequest, RotateKeyRequest,
    UpdateKeyRequest,
};
use sandgate_core::keys::review::{self, KeyReview};
use sandgate_core::model::Timestamp;
use sandgate_core::scopes::Scope;
use sandgate_core::usage::UsageQuery;
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::ApiResult;
use crate::extract::{ApiJson, ApiPath, Caller, Ctx};
use crate::state::AppState;

#[derive(Debug, Serialize, JsonSchema)]
pub struct KeyList {
    pub data: Vec<KeyView>,
}

/// The body is a [`sandgate_core::keys::api::WhoAmI`], rendered by the key service (mostly cached).
pub async fn whoami(State(state): State<AppState>, Caller(caller): Caller) -> Response {
    let json = state.keys().whoami_json(&caller);
    // Built directly: one header, set once.
    let mut response = Response::new(Body::from(json));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub async fn create_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let created = state.keys().create_key(&caller, &ctx, req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list_keys(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> ApiResult<Json<KeyList>> {
    let data = state.keys().list_keys(&caller).await?;
    Ok(Json(KeyList { data }))
}

/// Keys to look at this week: unused for 30 days, expiring within 7, or refused
/// unusually often (SPEC is silent; see `sandgate_core::keys::review`).
pub async fn review_keys(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> ApiResult<Json<KeyReview>> {
    let now = Timestamp::now();
    let keys = state.keys().list_keys(&caller).await?;
    // Counts still in memory are part of the answer.
    state.usage().flush(state.usage_store()).await?;
    let (from_day, to_day) = review::usage_days(now);
    let usage = state
        .usage_store()
        .query_usage(&UsageQuery {
            tenant_env: (!caller.has(Scope::TenantsManage))
                .then(|| (caller.tenant.clone(), caller.env)),
            from_day,
            to_day,
        })
        .await?;
    Ok(Json(review::review(keys, &usage, now)))
}

pub async fn get_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<KeyView>> {
    Ok(Json(state.keys().get_key(&caller, &id).await?))
}

pub async fn update_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateKeyRequest>,
) -> ApiResult<Json<KeyView>> {
    Ok(Json(
        state.keys().update_key(&caller, &ctx, &id, req).await?,
    ))
}

pub async fn revoke_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.keys().revoke_key(&caller, &ctx, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn rotate_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RotateKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let created = state
        .keys()
        .rotate_key(&caller, &ctx, &id, req.grace_period_sec)
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn reset_executions(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Ctx(ctx): Ctx,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ResetExecutionsRequest>,
) -> ApiResult<Json<KeyView>> {
    let view = state
        .keys()
        .reset_executions(&caller, &ctx, &id, req.remaining)
        .await?;
    Ok(Json(view))
}
