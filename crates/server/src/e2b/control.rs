//! E2B's control plane (its `spec/openapi.yml`): create, list, get, kill,
//! timeout, pause, resume and connect, at E2B's paths, on the same sandboxes
//! as `/v1/sandboxes` (same scopes, tenants, envs, limits and audit).
//!
//! E2B names templates its own way: `base` (the SDK's default) and
//! `code-interpreter-v1` (the code interpreter's) are sandgate's `default`.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sandgate_core::model::Timestamp;
use sandgate_core::sandboxes::{
    CreateSandboxRequest, ListFilter, SandboxLimits, SandboxState, SandboxView,
};
use sandgate_core::scopes::Scope;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ENVD_VERSION;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::state::AppState;

/// `POST /sandboxes` (E2B's `NewSandbox`). Fields sandgate has no use for
/// (`autoPause`, `secure`, `mcp`, `network`, …) are accepted and ignored.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct NewSandbox {
    #[serde(rename = "templateID", default)]
    pub template_id: Option<String>,
    /// Seconds until the sandbox is killed.
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars", default)]
    pub env_vars: Option<BTreeMap<String, String>>,
}

/// A created, resumed or connected sandbox (E2B's `Sandbox`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct E2bSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    #[serde(rename = "envdVersion")]
    pub envd_version: &'static str,
    #[serde(rename = "envdAccessToken")]
    pub envd_access_token: String,
    /// Sent back by the code interpreter SDK as `E2B-Traffic-Access-Token`.
    #[serde(rename = "trafficAccessToken")]
    pub traffic_access_token: String,
    pub domain: Option<String>,
}

/// A sandbox as listed or got (E2B's `ListedSandbox` / `SandboxDetail`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct E2bSandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    #[serde(rename = "startedAt")]
    pub started_at: Timestamp,
    #[serde(rename = "endAt")]
    pub end_at: Timestamp,
    #[serde(rename = "envdVersion")]
    pub envd_version: &'static str,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u64,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `running` or `paused`.
    pub state: SandboxState,
    pub metadata: BTreeMap<String, String>,
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    pub domain: Option<String>,
}

fn detail(v: SandboxView, limits: &SandboxLimits, token: Option<String>) -> E2bSandboxDetail {
    E2bSandboxDetail {
        template_id: v.template,
        sandbox_id: v.id,
        client_id: "sandgate",
        started_at: v.created_at,
        end_at: v.expires_at,
        envd_version: ENVD_VERSION,
        cpu_count: v.cpus.ceil().max(1.0) as u64,
        memory_mb: v.memory_mb,
        disk_size_mb: limits.tmpfs_bytes >> 20,
        state: v.state,
        metadata: v.metadata,
        envd_access_token: token,
        domain: None,
    }
}

fn created(v: SandboxView, token: String) -> E2bSandbox {
    E2bSandbox {
        template_id: v.template,
        sandbox_id: v.id,
        client_id: "sandgate",
        envd_version: ENVD_VERSION,
        traffic_access_token: token.clone(),
        envd_access_token: token,
        domain: None,
    }
}

/// sandgate's name for an E2B template name.
fn template_of(e2b: Option<String>) -> String {
    match e2b.as_deref() {
        None | Some("" | "base" | "code-interpreter-v1" | "code-interpreter") => "default".into(),
        Some(other) => other.to_owned(),
    }
}

pub async fn create(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(req): ApiJson<NewSandbox>,
) -> ApiResult<(StatusCode, Json<E2bSandbox>)> {
    let request = CreateSandboxRequest {
        template: Some(template_of(req.template_id)),
        timeout_sec: req.timeout,
        metadata: req.metadata,
        env: req.env_vars,
        ..CreateSandboxRequest::default()
    };
    let made = state
        .sandboxes()
        .create_with_access(&caller, request)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(created(made.view, made.access_token)),
    ))
}

/// `GET /v2/sandboxes`: `metadata` (URL-encoded `k=v&…`), `state`
/// (`running,paused`), `limit`, `nextToken`; the next page's token in the
/// `x-next-token` header.
pub async fn list_v2(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> ApiResult<Response> {
    let mut filter = ListFilter {
        limit: 100,
        ..ListFilter::default()
    };
    let mut states: Vec<SandboxState> = Vec::new();
    for (k, v) in &params {
        match k.as_str() {
            "metadata" => filter.metadata = parse_metadata(v)?,
            "state" => {
                for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    states.push(match s {
                        "running" => SandboxState::Running,
                        "paused" => SandboxState::Paused,
                        _ => return Err(ApiError::invalid("state", "running or paused")),
                    });
                }
            }
            "limit" => filter.limit = crate::handlers::sandboxes::list_limit(v)?,
            "nextToken" => filter.after = Some(v.clone()),
            // Ordering and the other filters of E2B's API are not offered.
            _ => {}
        }
    }
    if states.len() == 1 {
        filter.state = Some(states[0]);
    }
    let (views, next) = state.sandboxes().list(&caller, &filter);
    let limits = state.sandboxes().limits();
    let data: Vec<E2bSandboxDetail> = views.into_iter().map(|v| detail(v, limits, None)).collect();
    let mut response = Json(data).into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert("x-next-token", next);
    }
    Ok(response)
}

/// `GET /sandboxes` (E2B's first listing): every running sandbox, one page.
pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiQuery(params): ApiQuery<HashMap<String, String>>,
) -> ApiResult<Json<Vec<E2bSandboxDetail>>> {
    let mut filter = ListFilter {
        limit: usize::MAX - 1,
        ..ListFilter::default()
    };
    if let Some(m) = params.get("metadata") {
        filter.metadata = parse_metadata(m)?;
    }
    let (views, _) = state.sandboxes().list(&caller, &filter);
    let limits = state.sandboxes().limits();
    Ok(Json(
        views.into_iter().map(|v| detail(v, limits, None)).collect(),
    ))
}

/// `k1=v1&k2=v2`, each part percent-encoded (the SDK encodes twice).
fn parse_metadata(query: &str) -> ApiResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ApiError::invalid("metadata", "metadata is k=v&k2=v2"))?;
        let (k, v) = (percent_decode(k), percent_decode(v));
        // Encoded twice by the SDK: decode what is still encoded.
        out.push((percent_decode(&k), percent_decode(&v)));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn get(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<E2bSandboxDetail>> {
    let view = state.sandboxes().get(&caller, &id)?;
    let token = state.sandboxes().access_token(&caller, &id)?;
    Ok(Json(detail(view, state.sandboxes().limits(), Some(token))))
}

pub async fn kill(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.sandboxes().kill(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `{"timeout": N}` seconds from now.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct TimeoutBody {
    pub timeout: u64,
}

pub async fn set_timeout(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<TimeoutBody>,
) -> ApiResult<StatusCode> {
    state
        .sandboxes()
        .set_timeout(&caller, &id, req.timeout)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pause takes E2B's options (`memory`, …) and ignores them: a paused
/// sandbox keeps its memory (the cgroup freezer).
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct PauseBody {}

pub async fn pause(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(PauseBody {}): ApiJson<PauseBody>,
) -> ApiResult<StatusCode> {
    state.sandboxes().set_paused(&caller, &id, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `{"timeout": N}`: optional, seconds from now.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct ConnectBody {
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// Resume: the sandbox must be paused (else 409).
pub async fn resume(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ConnectBody>,
) -> ApiResult<(StatusCode, Json<E2bSandbox>)> {
    state.sandboxes().set_paused(&caller, &id, false).await?;
    let view = state
        .sandboxes()
        .connect(&caller, &id, req.timeout.filter(|t| *t > 0))
        .await?;
    let token = state.sandboxes().access_token(&caller, &id)?;
    Ok((StatusCode::CREATED, Json(created(view, token))))
}

/// Connect: resumes a paused sandbox (201), or answers a running one (200);
/// `timeout` lengthens its life, never shortens it.
pub async fn connect(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ConnectBody>,
) -> ApiResult<(StatusCode, Json<E2bSandbox>)> {
    let before = state.sandboxes().get(&caller, &id)?;
    let was_paused = before.state == SandboxState::Paused;
    // The route needs sandbox:read; what connect may also do needs more.
    if was_paused && !caller.has(Scope::SandboxPause) {
        return Err(ApiError::forbidden(
            Scope::SandboxPause,
            "Resuming a paused sandbox needs the scope sandbox:pause",
        ));
    }
    let extends = req.timeout.is_some_and(|t| {
        t > 0 && before.expires_at.millis() < Timestamp::now().millis() + t as i64 * 1000
    });
    if extends && !caller.has(Scope::SandboxCreate) {
        return Err(ApiError::forbidden(
            Scope::SandboxCreate,
            "Extending a sandbox's timeout needs the scope sandbox:create",
        ));
    }
    let view = state
        .sandboxes()
        .connect(&caller, &id, req.timeout.filter(|t| *t > 0))
        .await?;
    let token = state.sandboxes().access_token(&caller, &id)?;
    let status = if was_paused {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(created(view, token))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_queries_decode_once_or_twice() {
        let m = parse_metadata("user%253Did=a%2526b&x=1").expect("parses");
        assert_eq!(
            m,
            vec![("user=id".into(), "a&b".into()), ("x".into(), "1".into())]
        );
        assert!(parse_metadata("novalue").is_err());
        assert_eq!(template_of(Some("base".into())), "default");
        assert_eq!(template_of(Some("data-py".into())), "data-py");
    }
}
