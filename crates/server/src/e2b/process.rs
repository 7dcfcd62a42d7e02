//! envd's process service (`process.Process`, Connect RPC, JSON): `Start` and
//! `Connect` stream a command's events (`start` with its pid, `data` with
//! base64 stdout/stderr, `end`, and `keepalive` while idle); `List`,
//! `SendSignal`, `SendInput`, `StreamInput` and `CloseStdin` act on running
//! commands. Every `Start` is one execution from the sandbox owner's quota.
//! A command outlives the stream that started it; its deadline is the
//! stream's `Connect-Timeout-Ms` (none: it runs until it ends or its sandbox
//! does). Pseudo-terminals are not offered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sandgate_core::principal::Principal;
use sandgate_core::processes::{
    ProcessConfig, ProcessError, ProcessEvent, ProcessExit, ProcessTable, Signal,
};
use sandgate_core::sandboxes::{SandboxError, StartProcess};
use sandgate_jail::OutputStream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::SandboxId;
use super::connect::{
    EnvelopeReader, RpcError, end_envelope, envelopes, is_streaming_json, is_unary_json, keepalive,
    message_envelope, stream_error, stream_response, timeout, unary_request, unary_response,
};
use crate::extract::Caller;
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConfigMsg {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: Option<ConfigMsg>,
    pty: Option<Value>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SelectorRequest {
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SignalRequest {
    process: Option<Selector>,
    signal: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct InputMsg {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SendInputRequest {
    process: Option<Selector>,
    input: Option<InputMsg>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputStart {
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputData {
    input: Option<InputMsg>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputRequest {
    start: Option<StreamInputStart>,
    data: Option<StreamInputData>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigOut<'a> {
    cmd: &'a str,
    args: &'a [String],
    envs: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<&'a str>,
}

fn rpc_of_sandbox(e: SandboxError) -> RpcError {
    match e {
        SandboxError::NotFound => RpcError::new("unavailable", "the sandbox was not found"),
        SandboxError::Invalid(f) => RpcError::invalid(f.message),
        SandboxError::Conflict(m) => RpcError::new("failed_precondition", m),
        SandboxError::TooMany(_) => RpcError::new("resource_exhausted", e.to_string()),
        other => {
            tracing::error!(error = %other, "envd process call failed");
            RpcError::internal()
        }
    }
}

fn rpc_of_process(e: ProcessError) -> RpcError {
    match e {
        ProcessError::NotFound(_) => RpcError::not_found(e.to_string()),
        ProcessError::Invalid(m) => RpcError::invalid(m),
        ProcessError::StdinClosed => RpcError::new("failed_precondition", e.to_string()),
        ProcessError::Io(e) => RpcError::new("failed_precondition", e.to_string()),
    }
}

fn table(state: &AppState, caller: &Principal, id: &str) -> Result<Arc<ProcessTable>, RpcError> {
    state
        .sandboxes()
        .processes(caller, id)
        .map_err(rpc_of_sandbox)
}

fn selected(table: &ProcessTable, selector: Option<Selector>) -> Result<u32, RpcError> {
    match selector {
        Some(Selector { pid: Some(pid), .. }) => Ok(pid),
        Some(Selector { tag: Some(tag), .. }) => table.by_tag(&tag).map_err(rpc_of_process),
        _ => Err(RpcError::invalid("select the process by pid or tag")),
    }
}

fn event_json(event: &ProcessEvent) -> Value {
    match event {
        ProcessEvent::Output(stream, bytes) => {
            let which = match stream {
                OutputStream::Stdout => "stdout",
                OutputStream::Stderr => "stderr",
            };
            json!({"event": {"data": {which: B64.encode(bytes)}}})
        }
        ProcessEvent::End(exit) => json!({"event": {"end": end_json(exit)}}),
    }
}

fn end_json(exit: &ProcessExit) -> Value {
    let mut end = json!({
        "exitCode": exit.exit_code,
        "exited": exit.exited,
        "status": exit.status,
    });
    if let Some(e) = &exit.error {
        end["error"] = json!(e);
    }
    end
}

/// Streams `start`, then the process's events until its end, with
/// keepalives while idle; stops (leaving the process running) when the
/// client goes away.
fn event_stream(
    pid: u32,
    mut events: mpsc::Receiver<ProcessEvent>,
    keepalive: Option<Duration>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if tx
            .send(message_envelope(&json!({"event": {"start": {"pid": pid}}})))
            .await
            .is_err()
        {
            return;
        }
        let idle = keepalive.unwrap_or(Duration::from_secs(86_400));
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => {
                        let end = matches!(event, ProcessEvent::End(_));
                        if tx.send(message_envelope(&event_json(&event))).await.is_err() {
                            return;
                        }
                        if end {
                            break;
                        }
                    }
                    None => {
                        let gone = RpcError::new("unavailable", "the process's sandbox ended");
                        let _ = tx.send(end_envelope(Some(&gone))).await;
                        return;
                    }
                },
                _ = tokio::time::sleep(idle) => {
                    if tx.send(message_envelope(&json!({"event": {"keepalive": {}}}))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
        let _ = tx.send(end_envelope(None)).await;
    });
    stream_response(rx)
}

/// `Start`: one execution from the owner's quota, then the command's events.
pub async fn start(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_streaming_json(&headers) {
        return stream_error(&RpcError::invalid("Start takes application/connect+json"));
    }
    let req: StartRequest = match envelopes(&body).and_then(|m| {
        m.first()
            .map(|m| unary_request(m))
            .unwrap_or_else(|| Err(RpcError::invalid("no message")))
    }) {
        Ok(r) => r,
        Err(e) => return stream_error(&e),
    };
    if req.pty.is_some() {
        return stream_error(&RpcError::unimplemented("a pseudo-terminal"));
    }
    let Some(process) = req.process else {
        return stream_error(&RpcError::invalid("process is required"));
    };
    let start = StartProcess {
        config: ProcessConfig {
            cmd: process.cmd,
            args: process.args,
            envs: process.envs,
            cwd: process.cwd.filter(|c| !c.is_empty()),
        },
        tag: req.tag,
        stdin: req.stdin.unwrap_or(true),
        timeout: timeout(&headers),
    };
    let prepared = match state.sandboxes().prepare_process(&caller, &id, start).await {
        Ok(p) => p,
        Err(e) => return stream_error(&rpc_of_sandbox(e)),
    };
    if let Err(refused) = crate::handlers::execute::take_execution(&state, &caller).await {
        let code = match refused.status().as_u16() {
            429 => "resource_exhausted",
            _ => "internal",
        };
        return stream_error(&RpcError::new(code, refused.message()));
    }
    // Its CPU time is billed with the sandbox's, to the sandbox's creator.
    state.usage().sandbox_execution(&caller);
    match state.sandboxes().start_prepared(prepared).await {
        Ok((pid, events)) => event_stream(pid, events, keepalive(&headers)),
        Err(e) => stream_error(&rpc_of_sandbox(e)),
    }
}

/// `Connect`: the events of a running command, from now on.
pub async fn connect(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = (|| {
        let req: SelectorRequest = envelopes(&body).and_then(|m| {
            m.first()
                .map(|m| unary_request(m))
                .unwrap_or_else(|| Err(RpcError::invalid("no message")))
        })?;
        let table = table(&state, &caller, &id)?;
        let pid = selected(&table, req.process)?;
        let events = table.connect(pid).map_err(rpc_of_process)?;
        Ok::<_, RpcError>((pid, events))
    })();
    match result {
        Ok((pid, events)) => event_stream(pid, events, keepalive(&headers)),
        Err(e) => stream_error(&e),
    }
}

pub async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
) -> Response {
    let table = match table(&state, &caller, &id) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let all = table.list();
    let processes: Vec<Value> = all
        .iter()
        .map(|p| {
            let mut info = json!({
                "config": ConfigOut {
                    cmd: &p.config.cmd,
                    args: &p.config.args,
                    envs: &p.config.envs,
                    cwd: p.config.cwd.as_deref(),
                },
                "pid": p.pid,
            });
            if let Some(tag) = &p.tag {
                info["tag"] = json!(tag);
            }
            info
        })
        .collect();
    unary_response(&json!({ "processes": processes }))
}

/// SIGTERM or SIGKILL, by name (`SIGNAL_SIGKILL`) or number.
fn signal_of(v: Option<Value>) -> Result<Signal, RpcError> {
    match v {
        Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => Ok(Signal::Kill),
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => Ok(Signal::Term),
        Some(Value::Number(n)) if n.as_u64() == Some(9) => Ok(Signal::Kill),
        Some(Value::Number(n)) if n.as_u64() == Some(15) => Ok(Signal::Term),
        _ => Err(RpcError::invalid(
            "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL",
        )),
    }
}

pub async fn send_signal(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = (|| {
        if !is_unary_json(&headers) {
            return Err(RpcError::invalid("only the JSON codec is spoken here"));
        }
        let req: SignalRequest = unary_request(&body)?;
        let table = table(&state, &caller, &id)?;
        let pid = selected(&table, req.process)?;
        table
            .signal(pid, signal_of(req.signal)?)
            .map_err(rpc_of_process)
    })();
    match result {
        Ok(()) => unary_response(&json!({})),
        Err(e) => e.into_response(),
    }
}

fn stdin_bytes(input: Option<InputMsg>) -> Result<Vec<u8>, RpcError> {
    match input {
        Some(InputMsg {
            stdin: Some(data), ..
        }) => B64
            .decode(data.as_bytes())
            .map_err(|_| RpcError::invalid("stdin must be base64")),
        Some(InputMsg { pty: Some(_), .. }) => Err(RpcError::unimplemented("a pseudo-terminal")),
        _ => Ok(Vec::new()),
    }
}

pub async fn send_input(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    body: Bytes,
) -> Response {
    let prepared = (|| {
        let req: SendInputRequest = unary_request(&body)?;
        let table = table(&state, &caller, &id)?;
        let pid = selected(&table, req.process)?;
        Ok::<_, RpcError>((table, pid, stdin_bytes(req.input)?))
    })();
    let (table, pid, data) = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match table.write_stdin(pid, &data).await {
        Ok(()) => unary_response(&json!({})),
        Err(e) => rpc_of_process(e).into_response(),
    }
}

pub async fn close_stdin(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    body: Bytes,
) -> Response {
    let prepared = (|| {
        let req: SelectorRequest = unary_request(&body)?;
        let table = table(&state, &caller, &id)?;
        let pid = selected(&table, req.process)?;
        Ok::<_, RpcError>((table, pid))
    })();
    let (table, pid) = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match table.close_stdin(pid).await {
        Ok(()) => unary_response(&json!({})),
        Err(e) => rpc_of_process(e).into_response(),
    }
}

/// `StreamInput` (client streaming): a `start` naming the process, then
/// `data` messages written to its stdin in order; answered once the client
/// ends its stream.
pub async fn stream_input(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    body: Body,
) -> Response {
    let result = async {
        let table = table(&state, &caller, &id)?;
        let mut reader = EnvelopeReader::new(body);
        let mut pid = None;
        while let Some(msg) = reader.next::<StreamInputRequest>().await? {
            if let Some(start) = msg.start {
                pid = Some(selected(&table, start.process)?);
            }
            if let Some(data) = msg.data {
                let pid = pid.ok_or_else(|| RpcError::invalid("send start first"))?;
                let bytes = stdin_bytes(data.input)?;
                table
                    .write_stdin(pid, &bytes)
                    .await
                    .map_err(rpc_of_process)?;
            }
        }
        Ok::<_, RpcError>(())
    }
    .await;
    let (tx, rx) = mpsc::channel(2);
    match result {
        Ok(()) => {
            let _ = tx.try_send(message_envelope(&json!({})));
            let _ = tx.try_send(end_envelope(None));
        }
        Err(e) => {
            let _ = tx.try_send(end_envelope(Some(&e)));
        }
    }
    stream_response(rx)
}

/// `Update` resizes a pseudo-terminal; sandgate has none.
pub async fn update() -> Response {
    RpcError::unimplemented("a pseudo-terminal").into_response()
}
