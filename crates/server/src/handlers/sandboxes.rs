//! Sandboxes (SPEC §4): lifecycle, exec, pause/resume, timeout. Every id that is
//! not the caller's (tenant and env) is 404.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sandgate_core::execute::ExecuteResponse;
use sandgate_core::sandboxes::{
    CreateSandboxRequest, ExecRequest, ListFilter, SandboxState, SandboxView, TimeoutRequest,
};
use sandgate_core::store::QuotaExhausted;
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::state::AppState;

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxList {
    pub data: Vec<SandboxView>,
    pub next_cursor: Option<String>,
}

pub async fn create(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<CreateSandboxRequest>,
) -> ApiResult<(StatusCode, Json<SandboxView>)> {
    let view = state.sandboxes().create(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> ApiResult<Json<SandboxList>> {
    let mut filter = ListFilter {
        limit: 100,
        ..ListFilter::default()
    };
    for (k, v) in params {
        match k.as_str() {
            "state" => {
                filter.state = Some(match v.as_str() {
                    "running" => SandboxState::Running,
                    "paused" => SandboxState::Paused,
                    "killed" => SandboxState::Killed,
                    _ => return Err(ApiError::invalid("state", "running, paused or killed")),
                });
            }
            "limit" => {
                filter.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::invalid("limit", "limit must be 1-1000"))?;
            }
            "cursor" => filter.after = Some(v),
            _ => match k.strip_prefix("metadata.") {
                Some(name) if !name.is_empty() => filter.metadata.push((name.to_owned(), v)),
                _ => {
                    return Err(ApiError::invalid(
                        "query",
                        format!("unknown parameter `{k}` (state, metadata.<k>, limit, cursor)"),
                    ));
                }
            },
        }
    }
    let (data, next_cursor) = state.sandboxes().list(&caller, &filter);
    Ok(Json(SandboxList { data, next_cursor }))
}

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<SandboxView>> {
    Ok(Json(state.sandboxes().get(&caller, &id)?))
}

pub async fn kill(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    for (owner, seconds) in state.sandboxes().kill(&caller, &id).await? {
        state.usage().sandbox_seconds(&owner, seconds);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Pause and resume take no fields; reading the (empty) body keeps the
/// connection reusable.
#[derive(Debug, Default, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

pub async fn pause(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(NoFields {}): ApiJson<NoFields>,
) -> ApiResult<Json<SandboxView>> {
    Ok(Json(
        state.sandboxes().set_paused(&caller, &id, true).await?,
    ))
}

pub async fn resume(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(NoFields {}): ApiJson<NoFields>,
) -> ApiResult<Json<SandboxView>> {
    Ok(Json(
        state.sandboxes().set_paused(&caller, &id, false).await?,
    ))
}

pub async fn set_timeout(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<TimeoutRequest>,
) -> ApiResult<Json<SandboxView>> {
    Ok(Json(
        state
            .sandboxes()
            .set_timeout(&caller, &id, req.timeout_sec)
            .await?,
    ))
}

/// Checks the request and the sandbox, takes one execution from the quota, runs.
pub async fn exec(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Json<ExecuteResponse>> {
    let prepared = state.sandboxes().prepare_exec(&caller, &id, req)?;
    let left = match state.keys().consume_execution(&caller).await {
        Ok(left) => left,
        Err(QuotaExhausted::Exhausted) => return Err(ApiError::quota_exceeded()),
        Err(QuotaExhausted::Store(e)) => return Err(e.into()),
    };
    let mut response = state.sandboxes().exec(prepared).await?;
    response.executions_left = left;
    state.usage().execution(&caller, response.cpu_ms);
    state.metrics().execution(response.status);
    Ok(Json(response))
}
