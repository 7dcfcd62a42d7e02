//! `sandgate sandbox create|list|get|exec|kill|pause|resume|timeout`: the
//! sandbox API (SPEC §4) from the command line, through a server.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sandgate_client::Method;
use serde_json::{Map, Value, json};

use crate::{output, parse, remote};

#[derive(Debug, Args)]
pub struct SandboxArgs {
    #[command(subcommand)]
    command: SandboxCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Start a sandbox.
    Create {
        /// Kill it after this long (e.g. 300s, 1h).
        #[arg(long)]
        timeout: Option<String>,
        /// Metadata as key=value (repeatable).
        #[arg(long = "metadata", value_name = "K=V")]
        metadata: Vec<String>,
        /// An environment variable of every exec (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        #[arg(long = "memory-mb")]
        memory_mb: Option<u64>,
        #[arg(long)]
        cpus: Option<f64>,
    },
    /// List your sandboxes.
    List {
        /// running or paused.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one sandbox.
    Get { id: String },
    /// Run a command inside (or code, with --lang); exits with its exit code.
    Exec {
        id: String,
        /// The command, run by /bin/sh -c (or the code, with --lang).
        command: String,
        #[arg(long = "lang")]
        lang: Option<String>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// e.g. 30s, 500ms.
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Kill a sandbox and everything in it.
    Kill { id: String },
    /// Freeze every process in it.
    Pause { id: String },
    /// Thaw it.
    Resume { id: String },
    /// Kill it this long from now (e.g. 10m).
    Timeout { id: String, timeout: String },
}

fn pairs(items: &[String], what: &str) -> Result<Map<String, Value>> {
    items
        .iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .with_context(|| format!("--{what} {p}: expected K=V"))?;
            Ok((k.to_owned(), json!(v)))
        })
        .collect()
}

fn seconds(text: &str) -> Result<u64> {
    parse::duration_secs(text).map_err(anyhow::Error::msg)
}

pub fn run(args: SandboxArgs) -> Result<ExitCode> {
    let client = remote::client()?;
    let path = |id: &str, rest: &str| format!("/v1/sandboxes/{id}{rest}");
    let value = match &args.command {
        SandboxCommand::Create {
            timeout,
            metadata,
            env,
            memory_mb,
            cpus,
        } => {
            let mut body = Map::new();
            if let Some(t) = timeout {
                body.insert("timeoutSec".into(), json!(seconds(t)?));
            }
            if !metadata.is_empty() {
                body.insert(
                    "metadata".into(),
                    Value::Object(pairs(metadata, "metadata")?),
                );
            }
            if !env.is_empty() {
                body.insert("env".into(), Value::Object(pairs(env, "env")?));
            }
            if let Some(m) = memory_mb {
                body.insert("memoryMb".into(), json!(m));
            }
            if let Some(c) = cpus {
                body.insert("cpus".into(), json!(c));
            }
            client.call(Method::POST, "/v1/sandboxes", Some(&Value::Object(body)))?
        }
        SandboxCommand::List { state } => {
            let query = state
                .as_deref()
                .map(|s| format!("?state={s}"))
                .unwrap_or_default();
            client.call(Method::GET, &format!("/v1/sandboxes{query}"), None)?
        }
        SandboxCommand::Get { id } => client.call(Method::GET, &path(id, ""), None)?,
        SandboxCommand::Kill { id } => {
            client.call(Method::DELETE, &path(id, ""), None)?;
            json!({ "id": id, "killed": true })
        }
        SandboxCommand::Pause { id } => {
            client.call(Method::POST, &path(id, "/pause"), Some(&json!({})))?
        }
        SandboxCommand::Resume { id } => {
            client.call(Method::POST, &path(id, "/resume"), Some(&json!({})))?
        }
        SandboxCommand::Timeout { id, timeout } => client.call(
            Method::POST,
            &path(id, "/timeout"),
            Some(&json!({ "timeoutSec": seconds(timeout)? })),
        )?,
        SandboxCommand::Exec {
            id,
            command,
            lang,
            cwd,
            env,
            timeout,
        } => {
            let mut body = Map::new();
            match lang {
                Some(l) => {
                    body.insert("language".into(), json!(l));
                    body.insert("code".into(), json!(command));
                }
                None => {
                    body.insert("command".into(), json!(command));
                }
            }
            if let Some(c) = cwd {
                body.insert("cwd".into(), json!(c));
            }
            if !env.is_empty() {
                body.insert("env".into(), Value::Object(pairs(env, "env")?));
            }
            if let Some(t) = timeout {
                let ms = parse::duration_ms(t).map_err(anyhow::Error::msg)?;
                body.insert("timeoutMs".into(), json!(ms));
            }
            if !std::io::stdin().is_terminal() {
                let mut input = String::new();
                std::io::stdin().read_to_string(&mut input)?;
                if !input.is_empty() {
                    body.insert("stdin".into(), json!(input));
                }
            }
            let body = Value::Object(body);
            if args.json {
                let r = client.call(Method::POST, &path(id, "/exec"), Some(&body))?;
                output::json(&r);
                return Ok(ExitCode::SUCCESS);
            }
            // Output appears as the program produces it.
            let r = client.exec_stream(id, &body, |event| {
                let data = event["data"].as_str().unwrap_or_default().as_bytes();
                if event["type"] == "stderr" {
                    let _ = std::io::stderr().write_all(data);
                } else {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(data);
                    let _ = out.flush();
                }
            })?;
            let code = match r["status"].as_str() {
                Some("timeout") => 124,
                Some("memory_limit") => 137,
                _ => r["exitCode"]
                    .as_i64()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(1),
            };
            return Ok(ExitCode::from(code));
        }
    };
    if args.json {
        output::json(&value);
    } else if let SandboxCommand::List { .. } = args.command {
        let rows = value["data"].as_array().cloned().unwrap_or_default();
        output::table(
            &rows,
            &[
                ("ID", "id"),
                ("STATE", "state"),
                ("CREATED", "createdAt"),
                ("EXPIRES", "expiresAt"),
                ("MEMORY MB", "memoryMb"),
            ],
        );
    } else {
        output::fields(&value);
    }
    Ok(ExitCode::SUCCESS)
}
