//! sandgate's HTTP edge: the axum router, the layers every request passes, the
//! handlers, and the server's lifecycle (background maintenance, graceful shutdown).
//!
//! A request meets, in order: [`request::request_context`] (request id, client IP,
//! metrics), the body limit, routing, [`auth::authorize`] (credential, policy,
//! allowlists, audit), then its handler.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension};
use axum::middleware;
use axum::response::IntoResponse;
use axum_server::tls_rustls::RustlsConfig;
use sandgate_core::limits::RateLimiter;
use sandgate_core::webhooks::service::EXPIRING_NOTICE;
use tokio::net::TcpListener;
use tower::ServiceBuilder;

pub mod auth;
mod body;
pub mod callback;
pub mod e2b;
pub mod error;
pub mod extract;
pub mod handlers;
pub mod jwt;
pub mod metrics;
pub mod openapi;
pub mod request;
pub mod routes;
pub mod state;

pub use callback::AuthCallbackConfig;
pub use jwt::JwtConfig;
pub use state::{AppState, AuthMode, ServerConfig};

use crate::error::ApiError;
use crate::handlers::meta::OpenApiDoc;
use crate::routes::Policy;

/// The whole HTTP application over `state`.
pub fn app(state: AppState) -> Router {
    let (router, specs) = routes::table().into_parts();
    let policy = Arc::new(Policy::from_specs(&specs));
    let doc = OpenApiDoc(openapi::document(&specs).to_string().into());
    let e2b_routes = Arc::new(e2b::E2bRoutes(
        specs.iter().filter(|s| s.e2b).map(|s| s.path).collect(),
    ));
    // Two stacks, each given to the router at once (outermost first): every
    // `layer` call boxes each route once more, and a request clones each box
    // of its route again at every level it passes (~11 allocations a request
    // with a call per layer, 3 with these two).
    router
        .route_layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(
                    e2b_routes,
                    e2b::e2b_error_shape,
                ))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    auth::authorize,
                )),
        )
        .fallback(|| async { ApiError::not_found("route").into_response() })
        .method_not_allowed_fallback(|| async { ApiError::not_found("route").into_response() })
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    request::request_context,
                ))
                .layer(Extension(doc))
                .layer(Extension(policy))
                .layer(middleware::from_fn(body::buffer_small_bodies))
                .layer(DefaultBodyLimit::max(state.config().max_body_bytes)),
        )
        .with_state(state)
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then stops the
/// background work and writes every pending counter and audit row.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let make_service = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    // Streamed answers (exec output, envd events) are written in small pieces:
    // without TCP_NODELAY each waits for the client's delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    serve_until_flushed(
        &state,
        axum::serve(listener, make_service)
            .with_graceful_shutdown(shutdown)
            .into_future(),
    )
    .await
}

/// Certificate chain and private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Like [`run`], over TLS (rustls with the ring provider; HTTP/1.1 and HTTP/2).
pub async fn run_tls(
    listener: TcpListener,
    state: AppState,
    tls: &TlsFiles,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Another caller may have installed it already; either way ring is in place.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = RustlsConfig::from_pem_file(&tls.cert, &tls.key).await?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(30)));
    });
    let make_service = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    let server = axum_server::from_tcp(listener.into_std()?)?
        .acceptor(acceptor)
        .handle(handle)
        .serve(make_service);
    serve_until_flushed(&state, server).await
}

async fn serve_until_flushed(
    state: &AppState,
    server: impl Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    let maintenance = tokio::spawn(maintain(state.clone()));
    let webhooks = state.webhooks();
    let deliveries = tokio::spawn(sandgate_core::webhooks::delivery::run(
        webhooks.store(),
        webhooks.wake(),
        state.config().delivery(),
    ));
    let result = server.await;
    // A delivery cut short here is retried after its lease, by the next start.
    for task in [maintenance, deliveries] {
        task.abort();
        let _ = task.await;
    }
    flush(state).await;
    result
}

/// Writes what is held in memory: request counts, last-use times, audit rows.
pub async fn flush(state: &AppState) {
    state.executor().shutdown().await;
    state.templates().shutdown().await;
    // Sandboxes do not survive the server: kill them (which bills what they used).
    state.sandboxes().kill_all().await;
    if let Err(e) = state.keys().flush_usage().await {
        tracing::error!(error = %e, "could not write key usage");
    }
    if let Err(e) = state.usage().flush(state.usage_store()).await {
        tracing::error!(error = %e, "could not write usage counters");
    }
    state.audit().flush().await;
}

/// Background upkeep: pick up key changes of other processes, write usage counts,
/// record expiries, announce keys about to expire.
async fn maintain(state: AppState) {
    let config = state.config().clone();
    let mut sync = tokio::time::interval(config.key_sync_interval);
    let mut usage = tokio::time::interval(config.usage_flush_interval);
    let mut expiry = tokio::time::interval(config.expiry_sweep_interval);
    let mut reap = tokio::time::interval(config.sandbox_reap_interval);
    for tick in [&mut sync, &mut usage, &mut expiry, &mut reap] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = sync.tick() => {
                if let Err(e) = state.keys().sync().await {
                    tracing::warn!(error = %e, "key sync failed");
                }
            }
            _ = usage.tick() => {
                if let Err(e) = state.keys().flush_usage().await {
                    tracing::warn!(error = %e, "key usage flush failed");
                }
                if let Err(e) = state.usage().flush(state.usage_store()).await {
                    tracing::warn!(error = %e, "usage flush failed");
                }
            }
            _ = reap.tick() => {
                state.sandboxes().reap_expired().await;
            }
            _ = expiry.tick() => {
                if let Err(e) = state.keys().record_expired_keys().await {
                    tracing::warn!(error = %e, "expiry sweep failed");
                }
                let expiring = state.keys().expiring_within(EXPIRING_NOTICE);
                if let Err(e) = state.webhooks().keys_expiring(expiring).await {
                    tracing::warn!(error = %e, "key.expiring sweep failed");
                }
                state.auth_failures().forget_idle();
                state.rate_limiter().forget_idle();
            }
        }
    }
}
