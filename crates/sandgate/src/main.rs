//! The `sandgate` binary: parses arguments and calls the libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod auth_cmd;
mod config;
mod keys_cmd;
mod output;
mod parse;
mod remote;
mod run_cmd;
mod sandbox_cmd;
mod serve;
mod template_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "sandgate",
    version,
    about = "Run untrusted code in isolated sandboxes behind real API-key auth"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the server.
    Serve(serve::ServeArgs),
    /// Manage API keys, locally (--data-dir) or through a server.
    Keys(keys_cmd::KeysArgs),
    /// Log in to a server, or show who you are.
    Auth(auth_cmd::AuthArgs),
    /// Run a program once on a server; exits with its exit code.
    Run(run_cmd::RunArgs),
    /// Create, use and kill sandboxes on a server.
    Sandbox(sandbox_cmd::SandboxArgs),
    /// Create, build and delete templates on a server.
    Template(template_cmd::TemplateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Keys(args) => keys_cmd::run(args),
        Command::Auth(args) => auth_cmd::run(args),
        Command::Run(args) => run_cmd::run(args),
        Command::Sandbox(args) => sandbox_cmd::run(args),
        Command::Template(args) => template_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where `sandgate auth login` keeps the server URL and key.
pub fn credentials_path() -> PathBuf {
    let dir = std::env::var_os("SANDGATE_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CONFIG_HOME").map(|d| PathBuf::from(d).join("sandgate")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/sandgate")))
        .unwrap_or_else(|| PathBuf::from(".sandgate"));
    dir.join("credentials.json")
}
