//! E2B's code interpreter (requests with `E2b-Sandbox-Port: 49999`, as
//! e2b-dev/code-interpreter's server answers them), on sandgate's code
//! contexts: `POST /execute` runs a cell and streams what it produces as JSON
//! lines, as it comes (`number_of_executions`, `stdout`, `stderr`, `result`,
//! `error`, then `end_of_execution`); `/contexts` creates, lists, restarts and
//! removes contexts.
//!
//! Every cell is one execution from the sandbox owner's quota. The SDK's
//! `timeout` is its own deadline: it goes away, and a cell whose client went
//! away is interrupted (its context keeps its state). A sandbox killed while a
//! cell runs cuts the stream short, which the SDK reports as the sandbox
//! having been killed.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sandgate_core::execute::RunStatus;
use sandgate_core::model::Timestamp;
use sandgate_core::principal::Principal;
use sandgate_core::sandboxes::{
    CellEvent, CellRequest, ContextError, ContextInfo, ContextLanguage, ContextTarget, SandboxError,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::{INTERPRETER_PORT, SandboxId, sandbox_port};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, Caller};
use crate::state::AppState;

/// `POST /execute`. The SDK sends every member, those it does not use as null.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct ExecuteCell {
    pub code: String,
    /// The context to run in (from `POST /contexts`); not with `language`.
    #[serde(default)]
    pub context_id: Option<String>,
    /// Else the default context of this language: `python` (default) or
    /// `javascript`.
    #[serde(default)]
    pub language: Option<String>,
    /// Environment variables for this cell only.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
}

/// `POST /contexts`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct NewContext {
    /// `python` (default) or `javascript`.
    #[serde(default)]
    pub language: Option<String>,
    /// Default `/home/user`; it must exist.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// A code context, as E2B shows it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CodeContext {
    pub id: String,
    pub language: &'static str,
    pub cwd: String,
}

impl From<ContextInfo> for CodeContext {
    fn from(c: ContextInfo) -> Self {
        CodeContext {
            id: c.id,
            language: c.language.as_str(),
            cwd: c.cwd,
        }
    }
}

/// Only the code interpreter's port is served by these routes.
#[derive(Debug)]
pub struct InterpreterPort;

impl<S: Send + Sync> FromRequestParts<S> for InterpreterPort {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        if sandbox_port(&parts.headers) == INTERPRETER_PORT {
            Ok(InterpreterPort)
        } else {
            Err(ApiError::not_found("route"))
        }
    }
}

fn api_error(e: ContextError, sandbox: &str) -> ApiError {
    match e {
        ContextError::NotFound(id) => ApiError::not_found(&format!("Context {id}")),
        ContextError::TooMany(_) => ApiError::conflict(e.to_string()),
        ContextError::Sandbox(SandboxError::NotFound) => ApiError::sandbox_not_running(sandbox),
        ContextError::Sandbox(e) => e.into(),
    }
}

fn target_of(req: &mut ExecuteCell) -> ApiResult<ContextTarget> {
    let context = req.context_id.take().filter(|c| !c.is_empty());
    let language = req.language.take().filter(|l| !l.is_empty());
    match (context, language) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "Only one of context_id or language can be provided",
        )),
        (Some(id), None) => Ok(ContextTarget::Id(id)),
        (None, language) => Ok(ContextTarget::Default(ContextLanguage::parse(
            language.as_deref(),
        )?)),
    }
}

/// One execution from the caller's quota, or the SPEC's refusal.
async fn take_execution(state: &AppState, caller: &Principal) -> ApiResult<()> {
    crate::handlers::execute::take_execution(state, caller).await?;
    state.usage().execution(caller, 0);
    Ok(())
}

/// `POST /execute`: one cell, its output streamed.
pub async fn execute(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    _: InterpreterPort,
    ApiJson(mut req): ApiJson<ExecuteCell>,
) -> ApiResult<Response> {
    let cell = CellRequest {
        target: target_of(&mut req)?,
        code: req.code,
        env: req.env_vars.unwrap_or_default(),
    };
    let prepared = state
        .sandboxes()
        .prepare_cell(&caller, &id, cell)
        .map_err(|e| api_error(e, &id))?;
    take_execution(&state, &caller).await?;
    Ok(output_stream(state, prepared.run()))
}

/// `POST /contexts`: a new context, its interpreter started.
pub async fn create_context(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    _: InterpreterPort,
    ApiJson(req): ApiJson<NewContext>,
) -> ApiResult<Json<CodeContext>> {
    let language = ContextLanguage::parse(req.language.as_deref())?;
    let info = state
        .sandboxes()
        .create_context(&caller, &id, language, req.cwd)
        .await
        .map_err(|e| api_error(e, &id))?;
    Ok(Json(info.into()))
}

pub async fn list_contexts(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    _: InterpreterPort,
) -> ApiResult<Json<Vec<CodeContext>>> {
    let all = state
        .sandboxes()
        .list_contexts(&caller, &id)
        .map_err(|e| api_error(e, &id))?;
    Ok(Json(all.into_iter().map(CodeContext::from).collect()))
}

pub async fn remove_context(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    _: InterpreterPort,
    ApiPath(context): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state
        .sandboxes()
        .remove_context(&caller, &id, &context)
        .await
        .map_err(|e| api_error(e, &id))?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn restart_context(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    _: InterpreterPort,
    ApiPath(context): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state
        .sandboxes()
        .restart_context(&caller, &id, &context)
        .await
        .map_err(|e| api_error(e, &id))?;
    Ok(StatusCode::NO_CONTENT)
}

/// The cell's events as E2B's JSON lines, `end_of_execution` last; cut short
/// (an error of the body: the connection closes mid-stream) when the sandbox
/// ended under the cell.
fn output_stream(state: AppState, events: mpsc::Receiver<CellEvent>) -> Response {
    let lines = futures_util::stream::unfold(Some((events, false)), move |relay| {
        let state = state.clone();
        async move {
            let (mut events, mut failed) = relay?;
            match events.recv().await {
                Some(event) => {
                    failed |= matches!(event, CellEvent::Error { .. });
                    match output_line(event) {
                        Some(line) => Some((Ok(ndjson(&line)), Some((events, failed)))),
                        None => Some((
                            Err(std::io::Error::other("the sandbox ended during the cell")),
                            None,
                        )),
                    }
                }
                None => {
                    let status = if failed {
                        RunStatus::Error
                    } else {
                        RunStatus::Ok
                    };
                    state.metrics().execution(status);
                    let end = json!({"type": "end_of_execution"});
                    Some((Ok::<Bytes, std::io::Error>(ndjson(&end)), None))
                }
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

fn ndjson(value: &Value) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// One of E2B's output lines (see the SDK's `parse_output`); none for the
/// sandbox's end, which has no line.
fn output_line(event: CellEvent) -> Option<Value> {
    Some(match event {
        CellEvent::Started { execution_count } => {
            json!({"type": "number_of_executions", "execution_count": execution_count})
        }
        CellEvent::Stdout(text) => {
            json!({"type": "stdout", "text": text, "timestamp": Timestamp::now()})
        }
        CellEvent::Stderr(text) => {
            json!({"type": "stderr", "text": text, "timestamp": Timestamp::now()})
        }
        CellEvent::Result { main, data } => result_line(main, data),
        CellEvent::Error {
            name,
            value,
            traceback,
        } => json!({"type": "error", "name": name, "value": value, "traceback": traceback}),
        CellEvent::SandboxGone => return None,
    })
}

/// The MIME types E2B names, and its names for them; others go to `extra`.
const FORMATS: &[(&str, &str)] = &[
    ("text/plain", "text"),
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
    ("e2b/data", "data"),
];

fn result_line(main: bool, mut data: Map<String, Value>) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), "result".into());
    for (mime, name) in FORMATS {
        if let Some(value) = data.remove(*mime) {
            out.insert((*name).into(), value);
        }
    }
    // As E2B's server: a string's quotes are not part of its text.
    if let Some(Value::String(text)) = out.get_mut("text")
        && text.len() >= 2
        && text.starts_with('\'')
        && text.ends_with('\'')
    {
        *text = text[1..text.len() - 1].to_owned();
    }
    if !data.is_empty() {
        out.insert("extra".into(), Value::Object(data));
    }
    out.insert("is_main_result".into(), main.into());
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_take_e2b_names_and_strings_lose_their_quotes() {
        let data = json!({
            "text/plain": "'hello'",
            "text/html": "<b>hello</b>",
            "application/vnd.custom": {"a": 1},
        });
        let Value::Object(data) = data else {
            unreachable!()
        };
        let line = result_line(true, data);
        assert_eq!(line["type"], "result");
        assert_eq!(line["text"], "hello");
        assert_eq!(line["html"], "<b>hello</b>");
        assert_eq!(line["extra"]["application/vnd.custom"]["a"], 1);
        assert_eq!(line["is_main_result"], true);
        let Value::Object(quote) = json!({"text/plain": "'"}) else {
            unreachable!()
        };
        assert_eq!(result_line(false, quote)["text"], "'");
    }

    #[test]
    fn one_of_context_and_language() {
        let mut both = ExecuteCell {
            context_id: Some("c".into()),
            language: Some("python".into()),
            ..ExecuteCell::default()
        };
        assert!(target_of(&mut both).is_err());
        let mut none = ExecuteCell::default();
        assert_eq!(
            target_of(&mut none).ok(),
            Some(ContextTarget::Default(ContextLanguage::Python))
        );
        let mut js = ExecuteCell {
            language: Some("js".into()),
            ..ExecuteCell::default()
        };
        assert_eq!(
            target_of(&mut js).ok(),
            Some(ContextTarget::Default(ContextLanguage::Javascript))
        );
    }
}
