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
        /// Start from this template (default: `default`).
        #[arg(long)]
        template: Option<String>,
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
    /// Run a cell in the sandbox's persistent interpreter (state kept between calls).
    Code {
        id: String,
        /// The cell's code (`-` for standard input).
        code: String,
        /// python or javascript.
        #[arg(long = "lang", default_value = "python")]
        lang: String,
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Read, write, list or remove files inside a sandbox.
    Files {
        id: String,
        #[command(subcommand)]
        op: FilesOp,
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

#[derive(Debug, Subcommand)]
enum FilesOp {
    /// Print a file's bytes (or a directory listing).
    Get { path: String },
    /// Write a file from --from FILE or standard input (parents created).
    Put {
        path: String,
        #[arg(long)]
        from: Option<std::path::PathBuf>,
    },
    /// List a directory.
    Ls { path: String },
    /// Remove a file or a directory tree.
    Rm { path: String },
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
            template,
            timeout,
            metadata,
            env,
            memory_mb,
            cpus,
        } => {
            let mut body = Map::new();
            if let Some(t) = template {
                body.insert("template".into(), json!(t));
            }
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
        SandboxCommand::Code {
            id,
            code,
            lang,
            timeout,
        } => {
            let code = if code == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                text
            } else {
                code.clone()
            };
            let mut body = json!({ "language": lang, "code": code });
            if let Some(t) = timeout {
                body["timeoutMs"] = json!(parse::duration_ms(t).map_err(anyhow::Error::msg)?);
            }
            let r = client.call(Method::POST, &path(id, "/code"), Some(&body))?;
            if args.json {
                output::json(&r);
                return Ok(ExitCode::SUCCESS);
            }
            std::io::stdout().write_all(r["stdout"].as_str().unwrap_or_default().as_bytes())?;
            std::io::stderr().write_all(r["stderr"].as_str().unwrap_or_default().as_bytes())?;
            if !r["result"].is_null() {
                println!("{}", r["result"]);
            }
            return Ok(ExitCode::from(if r["success"] == true { 0 } else { 1 }));
        }
        SandboxCommand::Files { id, op } => return files(&client, id, op, args.json),
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

fn files(
    client: &sandgate_client::Client,
    id: &str,
    op: &FilesOp,
    as_json: bool,
) -> Result<ExitCode> {
    let url = |p: &str| {
        let encoded: String = p
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("/v1/sandboxes/{id}/files?path={encoded}")
    };
    let fail = |r: sandgate_client::RawResponse| -> Result<ExitCode> {
        let e = r.into_result().expect_err("an error status");
        Err(e.into())
    };
    match op {
        FilesOp::Get { path } | FilesOp::Ls { path } => {
            let r = client.raw(Method::GET, &url(path), &[], None)?;
            if !r.status.is_success() {
                return fail(r);
            }
            let is_listing = r
                .header("content-type")
                .is_some_and(|t| t.starts_with("application/json"));
            if is_listing && !as_json {
                let listing = r.json();
                let rows = listing["entries"].as_array().cloned().unwrap_or_default();
                output::table(
                    &rows,
                    &[("NAME", "name"), ("TYPE", "type"), ("SIZE", "size")],
                );
            } else {
                std::io::stdout().write_all(&r.body)?;
            }
        }
        FilesOp::Put { path, from } => {
            let data = match from {
                Some(file) => {
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?
                }
                None => {
                    let mut data = Vec::new();
                    std::io::stdin().read_to_end(&mut data)?;
                    data
                }
            };
            let r = client.raw(Method::PUT, &url(path), &[], Some(&data))?;
            if !r.status.is_success() {
                return fail(r);
            }
            if as_json {
                output::json(&r.json());
            } else {
                output::fields(&r.json());
            }
        }
        FilesOp::Rm { path } => {
            let r = client.raw(Method::DELETE, &url(path), &[], None)?;
            if !r.status.is_success() {
                return fail(r);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
