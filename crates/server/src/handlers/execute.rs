//! `POST /v1/execute` and `GET /v1/languages` (SPEC §3).

use axum::Json;
use axum::extract::State;
use sandgate_core::execute::{ExecError, ExecuteRequest, ExecuteResponse, LanguageInfo, catalogue};
use sandgate_core::principal::Principal;
use sandgate_core::store::QuotaExhausted;
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, Caller};
use crate::state::AppState;

#[derive(Debug, Serialize, JsonSchema)]
pub struct LanguageList {
    pub data: Vec<LanguageInfo>,
}

pub async fn languages() -> Json<LanguageList> {
    Json(LanguageList { data: catalogue() })
}

/// Validate, wait for a run slot, take one execution from the quota, run.
/// A request refused for a full server consumes nothing.
pub async fn execute(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> ApiResult<Json<ExecuteResponse>> {
    let executor = state.executor();
    let run = executor.limits().validate(req)?;
    if let Some(why) = executor.unavailable() {
        return Err(ApiError::internal(format!("execution unavailable: {why}")));
    }
    let slot = executor.admit().await.map_err(|busy| {
        tracing::warn!(slots = busy.0, "run refused: every run slot stayed busy");
        ApiError::server_busy(1)
    })?;
    let left = take_execution(&state, &caller).await?;
    let mut response = executor.run(slot, run).await.map_err(|e| match e {
        ExecError::Unavailable(why) => ApiError::internal(why),
        ExecError::Jail(e) => ApiError::internal(e),
    })?;
    response.executions_left = left;
    state.usage().execution(&caller, response.cpu_ms);
    state.metrics().execution(response.status);
    Ok(Json(response))
}

/// One execution taken from the caller's quota before a run starts (what is
/// left, when the key has a limit), or the SPEC's refusal when none is left.
pub async fn take_execution(state: &AppState, caller: &Principal) -> ApiResult<Option<u64>> {
    match state.keys().consume_execution(caller).await {
        Ok(left) => Ok(left),
        Err(QuotaExhausted::Exhausted) => Err(refuse_for_quota(state, caller).await),
        Err(QuotaExhausted::Store(e)) => Err(e.into()),
    }
}

/// A run refused because the key's executions are used up: `quota.exceeded` is
/// queued for the key's webhooks, and the SPEC's 429 returned.
pub async fn refuse_for_quota(state: &AppState, caller: &Principal) -> ApiError {
    let key = state.keys().cached_view(&caller.key_id);
    state.webhooks().quota_exceeded(caller, key).await;
    ApiError::quota_exceeded()
}
