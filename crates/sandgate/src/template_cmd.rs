//! `sandgate template create|list|get|rebuild|delete`: templates (SPEC §4) from
//! the command line, through a server.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use sandgate_client::{Client, Method};
use serde_json::{Map, Value, json};

use crate::{output, parse, remote};

#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    command: TemplateCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Create a template and start its build.
    Create {
        id: String,
        #[arg(long)]
        description: Option<String>,
        /// A file of the template: PATH=LOCAL_FILE, PATH under /workspace/ (repeatable).
        #[arg(long = "file", value_name = "PATH=LOCAL_FILE")]
        files: Vec<String>,
        /// A setup command, run by /bin/sh -c in /workspace (repeatable, in order).
        #[arg(long = "setup", value_name = "COMMAND")]
        setup: Vec<String>,
        /// An environment variable of the build and its sandboxes (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Default memory of its sandboxes.
        #[arg(long = "memory-mb")]
        memory_mb: Option<u64>,
        /// Default CPUs of its sandboxes.
        #[arg(long)]
        cpus: Option<f64>,
        /// Default lifetime of its sandboxes (e.g. 300s, 1h).
        #[arg(long)]
        timeout: Option<String>,
        /// Wait for the build; exit 1 (with its log) if it fails.
        #[arg(long)]
        wait: bool,
    },
    /// List `default` and your templates.
    List,
    /// Show one template, with its last build's log.
    Get { id: String },
    /// Build a template again.
    Rebuild {
        id: String,
        /// Wait for the build; exit 1 (with its log) if it fails.
        #[arg(long)]
        wait: bool,
    },
    /// Delete a template (sandboxes started from it keep running).
    Delete { id: String },
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

pub fn run(args: TemplateArgs) -> Result<ExitCode> {
    let client = remote::client()?;
    let path = |id: &str| format!("/v1/templates/{}", sandgate_client::encode(id));
    let (value, wait) = match &args.command {
        TemplateCommand::Create {
            id,
            description,
            files,
            setup,
            env,
            memory_mb,
            cpus,
            timeout,
            wait,
        } => {
            let mut body = Map::new();
            body.insert("id".into(), json!(id));
            if let Some(d) = description {
                body.insert("description".into(), json!(d));
            }
            let mut contents = Map::new();
            for f in files {
                let (dest, local) = f
                    .split_once('=')
                    .with_context(|| format!("--file {f}: expected PATH=LOCAL_FILE"))?;
                let text = std::fs::read_to_string(local)
                    .with_context(|| format!("reading {local} (a text file)"))?;
                contents.insert(dest.to_owned(), json!(text));
            }
            if !contents.is_empty() {
                body.insert("files".into(), Value::Object(contents));
            }
            if !setup.is_empty() {
                body.insert("setup".into(), json!(setup));
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
            if let Some(t) = timeout {
                let secs = parse::duration_secs(t).map_err(anyhow::Error::msg)?;
                body.insert("timeoutSec".into(), json!(secs));
            }
            let v = client.call(Method::POST, "/v1/templates", Some(&Value::Object(body)))?;
            (v, *wait)
        }
        TemplateCommand::List => (client.call(Method::GET, "/v1/templates", None)?, false),
        TemplateCommand::Get { id } => (client.call(Method::GET, &path(id), None)?, false),
        TemplateCommand::Rebuild { id, wait } => (
            client.call(Method::POST, &path(id), Some(&json!({})))?,
            *wait,
        ),
        TemplateCommand::Delete { id } => {
            client.call(Method::DELETE, &path(id), None)?;
            (json!({ "id": id, "deleted": true }), false)
        }
    };
    let value = if wait {
        wait_built(&client, &path(value["id"].as_str().unwrap_or_default()))?
    } else {
        value
    };
    if args.json {
        output::json(&value);
    } else if let TemplateCommand::List = args.command {
        let rows = value["data"].as_array().cloned().unwrap_or_default();
        output::table(
            &rows,
            &[
                ("ID", "id"),
                ("STATUS", "status"),
                ("UPDATED", "updatedAt"),
                ("DESCRIPTION", "description"),
            ],
        );
    } else {
        show(&value);
    }
    if wait && value["status"] != "ready" {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls until the build ends; the template then.
fn wait_built(client: &Client, path: &str) -> Result<Value> {
    let started = Instant::now();
    loop {
        let t = client.call(Method::GET, path, None)?;
        if t["status"] != "building" {
            return Ok(t);
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("the build has not ended after an hour");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A template's fields, then its build's log as it is.
fn show(value: &Value) {
    let mut fields = value.clone();
    let log = fields
        .get_mut("build")
        .and_then(|b| b.as_object_mut())
        .and_then(|b| b.remove("log"));
    output::fields(&fields);
    if let Some(Value::String(log)) = log {
        println!("--- build log ---");
        print!("{log}");
    }
}
