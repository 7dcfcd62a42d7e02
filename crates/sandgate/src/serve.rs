//! `sandgate serve`: configuration, logging, first-start bootstrap, signals.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use sandgate_server::AppState;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::config::{self, Layer};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long)]
    addr: Option<String>,
    /// Directory for the embedded store (default ./sandgate-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A TOML file of settings (between environment variables and flags in priority).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Largest accepted request body, in bytes.
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// `keys` (default) or `none`: authentication off, for local development only.
    #[arg(long)]
    auth_mode: Option<String>,
    /// With --auth-mode none, listen on a non-loopback address anyway.
    #[arg(long)]
    allow_open_on_public: bool,
    /// Delegate the decision on credentials no other source knows to this URL.
    #[arg(long)]
    auth_callback_url: Option<String>,
    /// Accept JWTs signed by the keys of this JWKS (RS256, ES256, EdDSA).
    #[arg(long)]
    jwt_jwks_url: Option<String>,
    /// Require this `iss` in JWTs.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Require one of these `aud` values in JWTs (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    jwt_audience: Vec<String>,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let file = args.config.as_deref().map(Layer::from_file).transpose()?;
    let flags = Layer {
        addr: args.addr,
        data_dir: args.data_dir,
        max_body_bytes: args.max_body_bytes,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        auth_mode: args.auth_mode,
        allow_open_on_public: args.allow_open_on_public.then_some(true),
        auth_callback_url: args.auth_callback_url,
        jwt_jwks_url: args.jwt_jwks_url,
        jwt_issuer: args.jwt_issuer,
        jwt_audience: (!args.jwt_audience.is_empty()).then_some(args.jwt_audience),
        ..Layer::default()
    };
    let settings = config::resolve(Layer::from_env()?, file, flags)?;
    let filter: Targets = settings
        .log
        .parse()
        .with_context(|| format!("bad log filter `{}`", settings.log))?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .init();

    // Before the runtime and the stores exist: the jail's zygote is a copy of
    // this process as it is now.
    sandgate_core::execute::start_jail_zygote();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(settings))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(settings: config::Settings) -> Result<()> {
    let data_dir = settings.server.data_dir.clone();
    let state = AppState::open(settings.server)
        .await
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    if state.config().env_admin_key.is_some() {
        tracing::info!("SANDGATE_ADMIN_API_KEY is set: no admin key is created in the store");
    } else if let Some(admin) = state.keys().bootstrap_admin().await? {
        // Printed once, to the terminal that started the server; never logged.
        println!(
            "\nsandgate: created the first admin key (scopes *). It is shown only now; store it safely:\n\n  {}\n",
            admin.secret
        );
    }
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("binding {}", settings.addr))?;
    let sources = state.credential_sources().join(" → ");
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = settings.tls.is_some(),
        data_dir = %data_dir.display(),
        credential_sources = %sources,
        "sandgate listening"
    );
    match &settings.tls {
        Some(tls) => sandgate_server::run_tls(listener, state, tls, shutdown_signal()).await?,
        None => sandgate_server::run(listener, state, shutdown_signal()).await?,
    }
    tracing::info!("sandgate stopped; pending counters and audit rows written");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
