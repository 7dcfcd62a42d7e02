//! Ports (SPEC §4): HTTP served inside a sandbox, reached through sandgate with
//! the caller's key (scope `sandbox:ports`). The caller's credentials are never
//! passed on to the program.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    req: Request,
) -> ApiResult<Response> {
    let stream = state.sandboxes().connect_port(&caller, &id, port).await?;
    stream.set_nonblocking(true).map_err(ApiError::internal)?;
    let stream = tokio::net::TcpStream::from_std(stream).map_err(ApiError::internal)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ApiError::internal)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let (mut parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = format!("/{path}{query}")
        .parse::<Uri>()
        .map_err(|_| ApiError::invalid("path", "not a valid request path"))?;
    for name in DROPPED {
        parts.headers.remove(*name);
    }
    let host = HeaderValue::from_str(&format!("127.0.0.1:{port}")).map_err(ApiError::internal)?;
    parts.headers.insert(header::HOST, host);
    let upstream = hyper::Request::from_parts(parts, body);
    let response = sender.send_request(upstream).await.map_err(|e| {
        ApiError::conflict(format!(
            "the program on port {port} did not answer with HTTP: {e}"
        ))
    })?;
    let (mut parts, body) = response.into_parts();
    for name in ["connection", "keep-alive", "transfer-encoding"] {
        parts.headers.remove(name);
    }
    Ok(Response::from_parts(parts, Body::new(body)).into_response())
}
