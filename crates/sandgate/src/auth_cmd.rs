//! `sandgate auth login|whoami|logout`.

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::{output, remote};

#[derive(Debug, Args)]
pub struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Check a key against a server and save both for later commands (file mode 0600).
    Login {
        /// The server (default: SANDGATE_URL, or http://127.0.0.1:8080).
        #[arg(long)]
        url: Option<String>,
        /// The key (default: SANDGATE_API_KEY, else read from standard input).
        #[arg(long)]
        key: Option<String>,
    },
    /// Show the key in use.
    Whoami {
        #[arg(long)]
        json: bool,
    },
    /// Forget the saved key.
    Logout,
}

pub fn run(args: AuthArgs) -> Result<ExitCode> {
    match args.command {
        AuthCommand::Login { url, key } => {
            let url = url.unwrap_or_else(remote::server_url);
            let key = match key.or_else(|| std::env::var("SANDGATE_API_KEY").ok()) {
                Some(k) => k,
                None => {
                    eprint!("API key: ");
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    line.trim().to_owned()
                }
            };
            let who = remote::make_client(&url, Some(key.clone()))?
                .whoami()
                .context("the server refused this key")?;
            let path = remote::save(&remote::SavedCredentials {
                url: url.clone(),
                key,
            })?;
            println!(
                "Logged in to {url} as {} ({}); saved to {}",
                who["name"].as_str().unwrap_or("?"),
                who["keyId"].as_str().unwrap_or("?"),
                path.display()
            );
        }
        AuthCommand::Whoami { json } => {
            let who = remote::client()?.whoami()?;
            if json {
                output::json(&who);
            } else {
                output::fields(&who);
            }
        }
        AuthCommand::Logout => {
            let path = crate::credentials_path();
            match std::fs::remove_file(&path) {
                Ok(()) => println!("removed {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("not logged in"),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
