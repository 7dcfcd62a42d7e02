//! Sandboxes (SPEC §4): lifecycle, exec, pause/resume, timeout. Every id that is
//! not the caller's (tenant and env) is 404.

use std::collections::HashMap;

use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sandgate_core::sandboxes::{
    CodeRequest, CreateSandboxRequest, ExecRequest, ListFilter, PreparedExec, SandboxState,
    SandboxView, Stream, TimeoutRequest,
};
use sandgate_jail::FileContent;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::request::current_request_id;
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
            "limit" => filter.limit = list_limit(&v)?,
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

/// A sandbox listing's `limit` (also E2B's): 1 to 1000.
pub(crate) fn list_limit(v: &str) -> ApiResult<usize> {
    v.parse()
        .ok()
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| ApiError::invalid("limit", "limit must be 1-1000"))
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
    state.sandboxes().kill(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pause and resume take no fields (an empty body, `{}`, or none at all).
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
/// With `Accept: application/x-ndjson` the output streams as it is produced:
/// `{"type":"stdout","data":…}` / `{"type":"stderr",…}` lines, then one
/// `{"type":"exit", …the result fields…}` (or `{"type":"error","error":{…}}`).
/// A client that goes away stops the program.
pub async fn exec(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Response> {
    let prepared = state.sandboxes().prepare_exec(&caller, &id, req)?;
    run_prepared(state, caller, prepared, &headers).await
}

/// A cell for the sandbox's persistent interpreter (state kept between calls; the
/// value of a trailing expression is `result`). Answers like exec, streaming too.
pub async fn code(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CodeRequest>,
) -> ApiResult<Response> {
    let prepared = state.sandboxes().prepare_code(&caller, &id, req)?;
    run_prepared(state, caller, prepared, &headers).await
}

async fn run_prepared(
    state: AppState,
    caller: std::sync::Arc<sandgate_core::principal::Principal>,
    prepared: PreparedExec,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let left = super::execute::take_execution(&state, &caller).await?;
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    if !streaming {
        let mut response = state.sandboxes().exec(prepared).await?;
        response.executions_left = left;
        state.usage().sandbox_execution(&caller);
        state.metrics().execution(response.status);
        return Ok(Json(response).into_response());
    }
    let (lines, body) = mpsc::channel::<Bytes>(64);
    let output = lines.clone();
    let sink = Box::new(move |stream: Stream, text: &str| {
        if text.is_empty() {
            return !output.is_closed();
        }
        let kind = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        output
            .blocking_send(ndjson(&json!({"type": kind, "data": text})))
            .is_ok()
    });
    let request_id = current_request_id();
    tokio::spawn(async move {
        let last = match state.sandboxes().exec_streaming(prepared, sink).await {
            Ok(mut response) => {
                response.executions_left = left;
                state.usage().sandbox_execution(&caller);
                state.metrics().execution(response.status);
                let mut fields = serde_json::to_value(&response).unwrap_or_default();
                if let Some(map) = fields.as_object_mut() {
                    map.insert("type".into(), json!("exit"));
                }
                fields
            }
            Err(e) => {
                let e = ApiError::from(e);
                json!({"type": "error", "error": {
                    "code": e.code(), "message": "the exec failed", "requestId": request_id
                }})
            }
        };
        let _ = lines.send(ndjson(&last)).await;
    });
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        body.recv()
            .await
            .map(|line| (Ok::<Bytes, Infallible>(line), body))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn ndjson(value: &serde_json::Value) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

#[derive(Debug, serde::Deserialize)]
pub struct PathParam {
    path: Option<String>,
}

fn path_of(p: PathParam) -> ApiResult<String> {
    p.path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("path", "give ?path=/absolute/path"))
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DirListing {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Written {
    pub path: String,
    pub size: u64,
}

/// A file's bytes, or a JSON listing when the path is a directory.
pub async fn read_file(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<PathParam>,
) -> ApiResult<Response> {
    let path = path_of(params)?;
    match state
        .sandboxes()
        .read_file(&caller, &id, path.clone())
        .await?
    {
        FileContent::File(data) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
        }
        FileContent::Dir(entries) => Ok(Json(DirListing {
            path,
            entries: entries
                .into_iter()
                .map(|e| FileEntry {
                    name: e.name,
                    kind: e.kind,
                    size: e.size,
                })
                .collect(),
        })
        .into_response()),
    }
}

/// Writes the raw body to the path (parents created).
pub async fn write_file(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<PathParam>,
    body: Body,
) -> ApiResult<Json<Written>> {
    let path = path_of(params)?;
    let limit = state.config().max_body_bytes;
    let data = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::payload_too_large(limit))?;
    let size = state
        .sandboxes()
        .write_file(&caller, &id, path.clone(), data.to_vec())
        .await?;
    Ok(Json(Written { path, size }))
}

pub async fn remove_file(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<PathParam>,
) -> ApiResult<StatusCode> {
    let path = path_of(params)?;
    state.sandboxes().remove_file(&caller, &id, path).await?;
    Ok(StatusCode::NO_CONTENT)
}
