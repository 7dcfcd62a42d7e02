//! `GET /v1/audit`: the caller's tenant and env (every row with tenants:manage).

use axum::Json;
use axum::extract::State;
use sandgate_core::model::{AuditQuery, AuditRecord, Outcome};
use sandgate_core::scopes::Scope;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, Caller};
use crate::state::AppState;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditParams {
    key_id: Option<String>,
    outcome: Option<String>,
    event: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditList {
    pub data: Vec<AuditRecord>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

pub async fn list_audit(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditList>> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be 1-{MAX_LIMIT}"),
        ));
    }
    let outcome = match params.outcome.as_deref() {
        None => None,
        Some("allowed") => Some(Outcome::Allowed),
        Some("denied") => Some(Outcome::Denied),
        Some(_) => {
            return Err(ApiError::invalid(
                "outcome",
                "outcome must be allowed or denied",
            ));
        }
    };
    let before_seq = match params.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor", "cursor is not one this server issued"))?,
        ),
    };
    let query = AuditQuery {
        tenant_env: (!caller.has(Scope::TenantsManage))
            .then(|| (caller.tenant.clone(), caller.env)),
        key_id: params.key_id,
        outcome,
        event: params.event,
        before_seq,
        limit: limit + 1,
    };
    // Rows of earlier requests may still be queued: write them first, so a reader
    // always sees every attempt that happened before its own request.
    state.audit().flush().await;
    let mut data = state.audit_store().list_audit(&query).await?;
    let next_cursor = if data.len() > limit as usize {
        data.truncate(limit as usize);
        data.last().map(|r| r.seq.to_string())
    } else {
        None
    };
    Ok(Json(AuditList { data, next_cursor }))
}
