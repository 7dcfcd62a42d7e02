//! envd's filesystem service (`filesystem.Filesystem`, Connect RPC, JSON):
//! `Stat`, `ListDir`, `MakeDir`, `Move` and `Remove`, unary calls answered
//! with envd's `EntryInfo` messages and error codes (`not_found` for a
//! missing path, `already_exists` for `MakeDir` of a directory, …). Watching
//! directories is not offered (`unimplemented`).
//!
//! The user a call names (`Authorization: Basic`, `user` or `root`) is the
//! sandbox user either way: see [`sandgate_core::sandboxes::files`].

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sandgate_core::sandboxes::SandboxError;
use sandgate_core::sandboxes::files::{EntryInfo, FileType, FsError, MadeDir, check_username};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::SandboxId;
use super::connect::{RpcError, is_unary_json, stream_error, unary_request, unary_response};
use crate::extract::Caller;
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListDirRequest {
    path: String,
    /// A number, or a string (protobuf's JSON allows both for integers).
    depth: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

/// The user named by `Authorization: Basic <base64 of "name:">`, if any.
fn basic_user(headers: &HeaderMap) -> Result<Option<String>, RpcError> {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(None);
    };
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return Ok(None);
    };
    let bad = || RpcError::new("unauthenticated", "malformed Basic authorization");
    let decoded = B64.decode(encoded.trim()).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    Ok(Some(decoded.split(':').next().unwrap_or("").to_owned()))
}

/// A unary call's message, after its codec and user are checked.
fn request<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, RpcError> {
    if !is_unary_json(headers) {
        return Err(RpcError::invalid("only the JSON codec is spoken here"));
    }
    check_username(basic_user(headers)?.as_deref()).map_err(rpc_error)?;
    unary_request(body)
}

pub(crate) fn rpc_error(e: FsError) -> RpcError {
    match e {
        FsError::NotFound(m) => RpcError::not_found(m),
        FsError::AlreadyExists(m) => RpcError::new("already_exists", m),
        FsError::Invalid(m) => RpcError::invalid(m),
        FsError::Denied(m) => RpcError::new("permission_denied", m),
        FsError::NoSpace(m) | FsError::TooLarge(m) => RpcError::new("resource_exhausted", m),
        FsError::UnknownUser(_) => RpcError::new("unauthenticated", e.to_string()),
        FsError::Sandbox(SandboxError::NotFound) => {
            RpcError::new("unavailable", "the sandbox was not found")
        }
        other => {
            tracing::error!(error = %other, "envd filesystem call failed");
            RpcError::internal()
        }
    }
}

fn file_type(kind: FileType) -> &'static str {
    match kind {
        FileType::File => "FILE_TYPE_FILE",
        FileType::Directory => "FILE_TYPE_DIRECTORY",
        FileType::Symlink => "FILE_TYPE_SYMLINK",
        FileType::Unspecified => "FILE_TYPE_UNSPECIFIED",
    }
}

/// A protobuf `Timestamp` in JSON: RFC 3339, UTC, nanoseconds when there are.
fn timestamp(secs: i64, nanos: u32) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(secs).ok()?;
    let mut s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if nanos > 0 {
        s.push_str(&format!(".{nanos:09}"));
    }
    s.push('Z');
    Some(s)
}

/// envd's `EntryInfo` in protobuf's JSON (int64 as a string, defaults left out).
pub(crate) fn entry_json(e: &EntryInfo) -> Value {
    let mut v = json!({
        "name": e.name,
        "type": file_type(e.kind),
        "path": e.path,
        "size": e.size.to_string(),
        "mode": e.mode,
        "permissions": e.permissions,
        "owner": e.owner,
        "group": e.group,
    });
    if let Some(t) = timestamp(e.modified_secs, e.modified_nanos) {
        v["modifiedTime"] = json!(t);
    }
    if let Some(target) = &e.symlink_target {
        v["symlinkTarget"] = json!(target);
    }
    if e.is_symlink {
        v["isSymlink"] = json!(true);
    }
    v
}

fn answer(result: Result<Value, RpcError>) -> Response {
    match result {
        Ok(message) => unary_response(&message),
        Err(e) => e.into_response(),
    }
}

fn depth_of(v: Option<Value>) -> Result<u32, RpcError> {
    let depth = match v {
        None | Some(Value::Null) => Some(0),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    depth
        .and_then(|d| u32::try_from(d).ok())
        .ok_or_else(|| RpcError::invalid("depth must be a non-negative integer"))
}

pub async fn stat(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let req: PathRequest = request(&headers, &body)?;
        let entry = state.sandboxes().stat_entry(&caller, &id, &req.path).await;
        Ok(json!({ "entry": entry_json(&entry.map_err(rpc_error)?) }))
    };
    answer(result.await)
}

/// `ListDir`: depth 0 or 1 lists the directory's own entries.
pub async fn list_dir(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let req: ListDirRequest = request(&headers, &body)?;
        let depth = depth_of(req.depth)?;
        let entries = state
            .sandboxes()
            .list_entries(&caller, &id, &req.path, depth)
            .await
            .map_err(rpc_error)?;
        let entries: Vec<Value> = entries.iter().map(entry_json).collect();
        Ok(json!({ "entries": entries }))
    };
    answer(result.await)
}

/// `MakeDir`: `already_exists` when the directory is there (the SDK answers
/// `false`).
pub async fn make_dir(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let req: PathRequest = request(&headers, &body)?;
        let made = state.sandboxes().make_dir(&caller, &id, &req.path).await;
        match made.map_err(rpc_error)? {
            (MadeDir::Created, entry) => Ok(json!({ "entry": entry_json(&entry) })),
            (MadeDir::AlreadyThere, entry) => Err(RpcError::new(
                "already_exists",
                format!("directory already exists: {}", entry.path),
            )),
        }
    };
    answer(result.await)
}

pub async fn move_entry(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let req: MoveRequest = request(&headers, &body)?;
        let entry = state
            .sandboxes()
            .move_entry(&caller, &id, &req.source, &req.destination)
            .await
            .map_err(rpc_error)?;
        Ok(json!({ "entry": entry_json(&entry) }))
    };
    answer(result.await)
}

pub async fn remove(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let req: PathRequest = request(&headers, &body)?;
        let removed = state
            .sandboxes()
            .remove_entry(&caller, &id, &req.path)
            .await;
        removed.map_err(rpc_error)?;
        Ok(json!({}))
    };
    answer(result.await)
}

/// `CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`: not offered.
pub async fn watcher() -> Response {
    RpcError::unimplemented("watching directories").into_response()
}

/// `WatchDir` (server streaming): not offered.
pub async fn watch_dir() -> Response {
    stream_error(&RpcError::unimplemented("watching directories"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_protobufs_json() {
        assert_eq!(timestamp(0, 0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(
            timestamp(1_714_557_600, 5).unwrap(),
            "2024-05-01T10:00:00.000000005Z"
        );
    }

    #[test]
    fn the_basic_user_is_read_and_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_user(&headers).unwrap(), None);
        headers.insert(header::AUTHORIZATION, "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(basic_user(&headers).unwrap().as_deref(), Some("user"));
        headers.insert(header::AUTHORIZATION, "Basic !!".parse().unwrap());
        assert_eq!(basic_user(&headers).unwrap_err().code, "unauthenticated");
        headers.insert(header::AUTHORIZATION, "Basic YWRtaW46".parse().unwrap());
        let refused = request::<PathRequest>(&headers, b"{}").unwrap_err();
        assert_eq!(refused.code, "unauthenticated");
    }
}
