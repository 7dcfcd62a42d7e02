//! Ports (SPEC §4): HTTP served inside a sandbox, reached through sandgate with
//! the caller's key (scope `sandbox:ports`). The caller's credentials are never
//! passed on to the program.
//!
//! WebSocket too: a `GET` asking to upgrade to `websocket` is forwarded with its
//! upgrade headers, the program's `101` is relayed, and from then on the two
//! connections are one byte pipe (no WebSocket parsing here). When either side
//! ends (closes, fails, or dies with its sandbox), both connections are closed.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, Caller};
use crate::state::AppState;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenPort {
    pub port: u16,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PortView {
    pub port: u16,
    /// Where the port is reached through sandgate (with the same credential).
    pub url: String,
}

pub async fn open(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<OpenPort>,
) -> ApiResult<Json<PortView>> {
    let port = state.sandboxes().expose_port(&caller, &id, req.port)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    Ok(Json(PortView {
        port,
        url: format!("{scheme}://{host}/v1/sandboxes/{id}/ports/{port}/"),
    }))
}

pub async fn close(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiPath((id, port)): ApiPath<(String, u16)>,
) -> ApiResult<StatusCode> {
    state.sandboxes().close_port(&caller, &id, port)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `…/ports/{port}/` itself.
pub async fn proxy_root(
    state: State<AppState>,
    caller: Caller,
    ApiPath((id, port)): ApiPath<(String, u16)>,
    req: Request,
) -> ApiResult<Response> {
    forward(state, caller, id, port, String::new(), req).await
}

/// `…/ports/{port}/{*path}`.
pub async fn proxy(
    state: State<AppState>,
    caller: Caller,
    ApiPath((id, port, path)): ApiPath<(String, u16, String)>,
    req: Request,
) -> ApiResult<Response> {
    forward(state, caller, id, port, path, req).await
}

/// Headers never passed to the program: the caller's credentials and the
/// connection's own hop-by-hop headers.
const DROPPED: &[&str] = &[
    "authorization",
    "x-api-key",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "host",
];

async fn forward(
    State(state): State<AppState>,
    Caller(caller): Caller,
    id: String,
    port: u16,
    path: String,
    mut req: Request,
) -> ApiResult<Response> {
    // Taken before anything else: the caller's side of a WebSocket upgrade.
    let caller_side = wants_websocket(&req).then(|| hyper::upgrade::on(&mut req));
    let upstream = upstream_request(req, &path, port, caller_side.is_some())?;
    let stream = state.sandboxes().connect_port(&caller, &id, port).await?;
    stream.set_nonblocking(true).map_err(ApiError::internal)?;
    let stream = tokio::net::TcpStream::from_std(stream).map_err(ApiError::internal)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ApiError::internal)?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let mut response = sender.send_request(upstream).await.map_err(|e| {
        ApiError::conflict(format!(
            "the program on port {port} did not answer with HTTP: {e}"
        ))
    })?;
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (Some(caller_side), true) = (caller_side, switched) {
        let program_side = hyper::upgrade::on(&mut response);
        tokio::spawn(pipe(caller_side, program_side));
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::TRANSFER_ENCODING);
    if !switched {
        parts.headers.remove(header::CONNECTION);
        parts.headers.remove("keep-alive");
    }
    Ok(Response::from_parts(parts, Body::new(body)).into_response())
}

/// The caller's request as the program gets it: its path inside, the host it
/// listens on, no credentials and no hop-by-hop headers (but those of a
/// WebSocket upgrade, when it is one).
fn upstream_request(
    req: Request,
    path: &str,
    port: u16,
    upgrade: bool,
) -> ApiResult<hyper::Request<Body>> {
    let (mut parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = format!("/{path}{query}")
        .parse::<Uri>()
        .map_err(|_| ApiError::invalid("path", "not a valid request path"))?;
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    for name in DROPPED {
        parts.headers.remove(*name);
    }
    if let (true, Some(protocol)) = (upgrade, protocol) {
        let connection = HeaderValue::from_static("upgrade");
        parts.headers.insert(header::CONNECTION, connection);
        parts.headers.insert(header::UPGRADE, protocol);
    }
    let host = HeaderValue::from_str(&format!("127.0.0.1:{port}")).map_err(ApiError::internal)?;
    parts.headers.insert(header::HOST, host);
    Ok(hyper::Request::from_parts(parts, body))
}

/// A `GET` with `Connection: upgrade` and `Upgrade: websocket` (tokens,
/// case-insensitive, in comma-separated lists).
fn wants_websocket(req: &Request) -> bool {
    let has = |name: HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    req.method() == Method::GET
        && has(header::CONNECTION, "upgrade")
        && has(header::UPGRADE, "websocket")
}

/// Relays bytes both ways between the caller's upgraded connection and the
/// program's until one side ends, then closes both.
async fn pipe(caller: OnUpgrade, program: OnUpgrade) {
    let (Ok(caller), Ok(program)) = (caller.await, program.await) else {
        return;
    };
    let (mut caller_in, mut caller_out) = tokio::io::split(TokioIo::new(caller));
    let (mut program_in, mut program_out) = tokio::io::split(TokioIo::new(program));
    let up = async {
        let _ = tokio::io::copy(&mut caller_in, &mut program_out).await;
        let _ = program_out.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut program_in, &mut caller_out).await;
        let _ = caller_out.shutdown().await;
    };
    // The first direction to end ends the other: both connections drop here.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
