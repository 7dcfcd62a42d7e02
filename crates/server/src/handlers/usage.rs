//! `GET /v1/usage`: the caller's tenant and env (every tenant with tenants:manage).

use axum::Json;
use axum::extract::State;
use sandgate_core::model::Timestamp;
use sandgate_core::scopes::Scope;
use sandgate_core::usage::{self, GroupBy, UsageCounts, UsageQuery};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, Caller};
use crate::state::AppState;

/// Longest span one query may cover.
const MAX_DAYS: i64 = 366;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// `YYYY-MM-DD` (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct UsageList {
    pub data: Vec<UsageEntry>,
}

fn day_param(value: Option<&str>, field: &str, default: i64) -> ApiResult<i64> {
    match value {
        None | Some("") => Ok(default),
        Some(s) => usage::parse_day(s).ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("{field} must be YYYY-MM-DD or an RFC 3339 time"),
            )
        }),
    }
}

pub async fn get_usage(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(params): ApiQuery<UsageParams>,
) -> ApiResult<Json<UsageList>> {
    let today = usage::day_of(Timestamp::now());
    let to_day = day_param(params.to.as_deref(), "to", today)?;
    let from_day = day_param(params.from.as_deref(), "from", to_day - 29)?;
    if from_day > to_day || to_day - from_day >= MAX_DAYS {
        return Err(ApiError::invalid(
            "from",
            format!("from must be on or before to, at most {MAX_DAYS} days apart"),
        ));
    }
    let by = match params.group_by.as_deref() {
        None | Some("key") => GroupBy::Key,
        Some("day") => GroupBy::Day,
        Some(_) => return Err(ApiError::invalid("groupBy", "groupBy must be key or day")),
    };
    // Counts still in memory are part of the answer.
    state.usage().flush(state.usage_store()).await?;
    let query = UsageQuery {
        tenant_env: (!caller.has(Scope::TenantsManage))
            .then(|| (caller.tenant.clone(), caller.env)),
        from_day,
        to_day,
    };
    let rows = state.usage_store().query_usage(&query).await?;
    let data = usage::group(rows, by)
        .into_iter()
        .map(|(k, counts)| match by {
            GroupBy::Key => UsageEntry {
                key_id: Some(k),
                day: None,
                counts,
            },
            GroupBy::Day => UsageEntry {
                key_id: None,
                day: Some(k),
                counts,
            },
        })
        .collect();
    Ok(Json(UsageList { data }))
}
