//! `sandgate run [--lang L] FILE|-c CODE`: one run through a server's
//! `POST /v1/execute`, behaving like the program itself: its stdout and stderr on
//! ours, its exit code as ours.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use sandgate_core::execute::LANGUAGES;
use serde_json::{Map, Value, json};

use crate::{output, parse, remote};

/// Exit codes for ends that are not the program's own exit.
const EXIT_TIMEOUT: u8 = 124;
const EXIT_MEMORY_LIMIT: u8 = 137;
const EXIT_OTHER: u8 = 1;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The program's file (`-` for standard input); its extension picks the language.
    #[arg(required_unless_present = "code", conflicts_with = "code")]
    file: Option<PathBuf>,
    /// The program's source, instead of a file (needs --lang).
    #[arg(short = 'c', long = "code")]
    code: Option<String>,
    /// python, javascript or bash.
    #[arg(long = "lang")]
    lang: Option<String>,
    /// JSON visible to the program as `data` and /sandbox/data.json.
    #[arg(long)]
    data: Option<String>,
    /// An environment variable for the program (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Wall-clock limit, e.g. 10s, 500ms, 1m.
    #[arg(long)]
    timeout: Option<String>,
    /// Memory limit in MiB.
    #[arg(long = "memory-mb")]
    memory_mb: Option<u64>,
    /// Print the whole response as JSON instead of acting as the program.
    #[arg(long)]
    json: bool,
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let (code, from_stdin) = match (&args.code, &args.file) {
        (Some(code), _) => (code.clone(), false),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut code = String::new();
            std::io::stdin().read_to_string(&mut code)?;
            (code, true)
        }
        (None, Some(path)) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            false,
        ),
        (None, None) => bail!("give a FILE or -c CODE"),
    };
    let language = match (&args.lang, &args.file) {
        (Some(lang), _) => lang.clone(),
        (None, Some(path)) => language_of(path)?,
        (None, None) => bail!("pass --lang with -c (python, javascript or bash)"),
    };
    let mut body = Map::new();
    body.insert("language".into(), json!(language));
    body.insert("code".into(), json!(code));
    // The program reads our standard input when we have one that is not a terminal.
    if !from_stdin && !std::io::stdin().is_terminal() {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading standard input (is it text?)")?;
        if !input.is_empty() {
            body.insert("stdin".into(), json!(input));
        }
    }
    if let Some(data) = &args.data {
        let value: Value = serde_json::from_str(data).context("--data is not JSON")?;
        body.insert("data".into(), value);
    }
    if !args.env.is_empty() {
        let mut env = Map::new();
        for pair in &args.env {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair}: expected K=V"))?;
            env.insert(k.to_owned(), json!(v));
        }
        body.insert("env".into(), Value::Object(env));
    }
    if let Some(t) = &args.timeout {
        let ms = parse::duration_ms(t).map_err(anyhow::Error::msg)?;
        body.insert("timeoutMs".into(), json!(ms));
    }
    if let Some(mb) = args.memory_mb {
        body.insert("memoryMb".into(), json!(mb));
    }

    let response = remote::client()?.execute(&Value::Object(body))?;
    if args.json {
        output::json(&response);
        return Ok(ExitCode::SUCCESS);
    }
    let text = |k: &str| response[k].as_str().unwrap_or_default().to_owned();
    std::io::stdout().write_all(text("stdout").as_bytes())?;
    std::io::stdout().flush()?;
    std::io::stderr().write_all(text("stderr").as_bytes())?;
    let note = |msg: &str| eprintln!("sandgate: {msg}");
    if response["truncated"] == true {
        note("output was cut at the server's cap");
    }
    let code = match response["status"].as_str().unwrap_or_default() {
        "timeout" => {
            note("the program ran past its deadline and was killed");
            EXIT_TIMEOUT
        }
        "memory_limit" => {
            note("the program went past its memory limit and was killed");
            EXIT_MEMORY_LIMIT
        }
        "output_limit" => {
            note("the program printed more than the output cap and was stopped");
            EXIT_OTHER
        }
        _ => match response["exitCode"].as_i64() {
            Some(c) => u8::try_from(c).unwrap_or(EXIT_OTHER),
            None => {
                note("the program was killed by a signal");
                EXIT_OTHER
            }
        },
    };
    Ok(ExitCode::from(code))
}

fn language_of(path: &std::path::Path) -> Result<String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    LANGUAGES
        .iter()
        .find(|l| l.extensions.contains(&ext))
        .map(|l| l.name.to_owned())
        .with_context(|| {
            format!(
                "cannot tell the language of {} from its extension; pass --lang",
                path.display()
            )
        })
}
