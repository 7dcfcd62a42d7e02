//! Code contexts (SPEC §10, E2B's code interpreter): notebook-like
//! interpreters inside a sandbox, whose state lasts from one cell to the next.
//!
//! A context is one long-lived kernel (`sandboxes_kernels/context_python.py`
//! or `context_javascript.js`), started inside the sandbox as the sandbox user
//! like any command, and spoken to over its stdin and stdout in JSON lines (the
//! kernel keeps the cell's own output off those pipes). A sandbox has a default
//! context per language from the start, whose kernel starts on first use, and
//! may create more, each with its own working directory.
//!
//! One cell runs at a time per context; the next ones wait their turn. A cell
//! ends by itself, or is interrupted (SIGINT to the kernel's process group:
//! KeyboardInterrupt, the context's state kept) when nobody listens any more
//! or it reaches the server's longest exec time; a cell that does not stop is
//! killed with its kernel. A kernel that died is replaced at the context's
//! next cell; the cell it died in ends with a `ContextRestarting` error.
//! What a kernel sends is parsed and bounded here, never passed on as is: the
//! sandbox's code may have written it. Memory, processes and CPU are bounded
//! by the sandbox's limits. Nothing here knows HTTP or E2B's wire format.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandgate_jail::{Jail, Limits, ProgramEnd, Spawned, Spec};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ensure_running;
use super::{Live, SandboxError, SandboxManager};
use crate::keys::api::{InvalidField, invalid};
use crate::principal::Principal;

const PYTHON_KERNEL: &str = include_str!("../sandboxes_kernels/context_python.py");
const JAVASCRIPT_KERNEL: &str = include_str!("../sandboxes_kernels/context_javascript.js");

/// Contexts one sandbox may have at once (the defaults included).
pub const MAX_CONTEXTS: usize = 32;
/// A context's working directory unless it asks for another (E2B's).
pub const DEFAULT_CWD: &str = "/home/user";
/// Longest line a kernel may send (a large image, say); longer ones are dropped.
const MAX_LINE: usize = 32 << 20;
/// How long a kernel may take to start.
const READY_WAIT: Duration = Duration::from_secs(30);
/// How long an interrupted cell has to stop before it is interrupted again,
/// and then killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
const INTERRUPTS: u32 = 2;
/// Events of a cell waiting for a slow listener (then the kernel waits).
const EVENT_BUFFER: usize = 64;

/// A language that has code contexts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextLanguage {
    Python,
    Javascript,
}

impl ContextLanguage {
    /// The language a request names (none: Python), as E2B's SDKs spell it.
    pub fn parse(name: Option<&str>) -> Result<ContextLanguage, InvalidField> {
        let name = name.map(|n| n.trim().to_ascii_lowercase());
        match name.as_deref() {
            None | Some("" | "python" | "python3") => Ok(ContextLanguage::Python),
            Some("javascript" | "js" | "node" | "nodejs") => Ok(ContextLanguage::Javascript),
            Some(other) => Err(invalid(
                "language",
                format!("no code contexts for `{other}`: python and javascript have them"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ContextLanguage::Python => "python",
            ContextLanguage::Javascript => "javascript",
        }
    }

    /// The kernel's command line: a loader that runs the first line of its
    /// stdin (the kernel's source, a JSON string), so that nothing needs to be
    /// in the sandbox's files and `ps` shows a short line.
    fn argv(self) -> Vec<String> {
        let argv: &[&str] = match self {
            ContextLanguage::Python => &["/usr/bin/python3", "-c", PYTHON_LOADER],
            // For Node's REPL transform of top-level `await`.
            ContextLanguage::Javascript => &[
                "/usr/bin/node",
                "--expose-internals",
                "-e",
                JAVASCRIPT_LOADER,
            ],
        };
        argv.iter().map(|s| (*s).to_owned()).collect()
    }

    /// What the loader reads: the kernel's source as one JSON line.
    fn source_line(self) -> Vec<u8> {
        let source = match self {
            ContextLanguage::Python => PYTHON_KERNEL,
            ContextLanguage::Javascript => JAVASCRIPT_KERNEL,
        };
        let mut line = serde_json::to_vec(source).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

const PYTHON_LOADER: &str =
    "import sys, json; exec(json.loads(sys.stdin.buffer.readline()))  # sandgate code context";
/// Reads up to the first newline with blocking reads (Node's stdin stream is
/// left to the kernel), in a block so that no name of its own is global, and
/// runs it with a direct `eval`, so that the kernel has `require`.
const JAVASCRIPT_LOADER: &str = "{ const b = []; for (const c = Buffer.alloc(65536); !Buffer.concat(b).includes(10);) { \
     const n = require('fs').readSync(0, c); if (n === 0) process.exit(1); b.push(Buffer.from(c.subarray(0, n))); } \
     eval(JSON.parse(Buffer.concat(b).toString('utf8').split('\\n')[0])); } // sandgate code context";

/// What a context is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextInfo {
    pub id: String,
    pub language: ContextLanguage,
    pub cwd: String,
}

/// Where a cell runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextTarget {
    /// The sandbox's default context of a language.
    Default(ContextLanguage),
    Id(String),
}

/// A cell to run.
#[derive(Debug, Clone)]
pub struct CellRequest {
    pub target: ContextTarget,
    pub code: String,
    /// Environment variables for this cell only.
    pub env: BTreeMap<String, String>,
}

/// What a running cell produces, in order. The channel's end is the cell's.
#[derive(Debug, Clone, PartialEq)]
pub enum CellEvent {
    /// The cell began: the context's count of cells, this one included.
    Started {
        execution_count: u64,
    },
    Stdout(String),
    Stderr(String),
    /// A value shown, MIME type → content; `main` for the cell's own value
    /// (its last expression), not for what it displayed on the way.
    Result {
        main: bool,
        data: Map<String, Value>,
    },
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    /// The sandbox ended while the cell ran; nothing follows.
    SandboxGone,
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("context {0} not found")]
    NotFound(String),
    #[error("a sandbox has at most {0} code contexts")]
    TooMany(usize),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

impl From<InvalidField> for ContextError {
    fn from(f: InvalidField) -> Self {
        ContextError::Sandbox(SandboxError::Invalid(f))
    }
}

/// The code contexts of one sandbox.
#[derive(Default)]
pub(super) struct Contexts {
    /// In creation order. The defaults are made on first use of the list.
    all: Mutex<Option<Vec<Arc<Context>>>>,
}

impl Contexts {
    fn with<T>(&self, f: impl FnOnce(&mut Vec<Arc<Context>>) -> T) -> T {
        let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        let all = all.get_or_insert_with(|| {
            [ContextLanguage::Python, ContextLanguage::Javascript]
                .map(|language| Context::new(language, DEFAULT_CWD.to_owned(), true, None))
                .into()
        });
        f(all)
    }

    fn find(&self, id: &str) -> Result<Arc<Context>, ContextError> {
        self.with(|all| all.iter().find(|c| c.info.id == id).cloned())
            .ok_or_else(|| ContextError::NotFound(id.to_owned()))
    }

    /// The context a cell runs in; a default removed earlier is made again.
    fn resolve(&self, target: &ContextTarget) -> Result<Arc<Context>, ContextError> {
        let language = match target {
            ContextTarget::Id(id) => return self.find(id),
            ContextTarget::Default(language) => *language,
        };
        self.with(|all| {
            if let Some(c) = all
                .iter()
                .find(|c| c.is_default && c.info.language == language)
            {
                return Ok(Arc::clone(c));
            }
            if all.len() >= MAX_CONTEXTS {
                return Err(ContextError::TooMany(MAX_CONTEXTS));
            }
            let made = Context::new(language, DEFAULT_CWD.to_owned(), true, None);
            all.push(Arc::clone(&made));
            Ok(made)
        })
    }
}

/// One context and its kernel.
struct Context {
    info: ContextInfo,
    /// One of the sandbox's defaults (what cells naming only a language use).
    is_default: bool,
    /// Held by the running cell, and by a restart or removal: one at a time,
    /// in turn. `None` until the kernel starts, and after it died.
    session: tokio::sync::Mutex<Option<Kernel>>,
    /// The current kernel's process, to interrupt or kill it while a cell
    /// holds `session`.
    process: Mutex<Option<Arc<KernelProcess>>>,
    /// Set by removal: cells still waiting for `session` do not run.
    removed: AtomicBool,
}

impl Context {
    fn new(
        language: ContextLanguage,
        cwd: String,
        is_default: bool,
        kernel: Option<Kernel>,
    ) -> Arc<Context> {
        let process = kernel.as_ref().map(|k| Arc::clone(&k.process));
        Arc::new(Context {
            info: ContextInfo {
                id: context_id(),
                language,
                cwd,
            },
            is_default,
            session: tokio::sync::Mutex::new(kernel),
            process: Mutex::new(process),
            removed: AtomicBool::new(false),
        })
    }

    fn set_process(&self, process: Option<Arc<KernelProcess>>) {
        *self.process.lock().unwrap_or_else(|p| p.into_inner()) = process;
    }

    /// Kills the kernel now (a cell running in it ends).
    fn kill(&self) {
        if let Some(p) = self
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            p.signal(libc::SIGKILL);
        }
    }
}

/// A UUID (version 4), the shape of E2B's context ids.
fn context_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A running kernel: its process, and the two ends of its protocol.
struct Kernel {
    process: Arc<KernelProcess>,
    requests: pipe::Sender,
    events: LineReader,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.process.signal(libc::SIGKILL);
    }
}

impl Kernel {
    async fn send(&mut self, line: &[u8]) -> io::Result<()> {
        let mut rest = line;
        while !rest.is_empty() {
            self.requests.writable().await?;
            match self.requests.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A kernel's process, shared by its [`Kernel`] and the task that sees it end.
struct KernelProcess {
    spawned: Mutex<Spawned>,
    /// How the kernel ended, once it has.
    ended: watch::Receiver<Option<ProgramEnd>>,
}

impl KernelProcess {
    /// Signals the kernel's process group: what the cell started too, as a
    /// terminal's Ctrl-C (and Jupyter's interrupt) does.
    fn signal(&self, signal: libc::c_int) {
        self.spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .signal_group(signal);
    }

    fn has_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// How the kernel ended, waiting at most `wait` for it.
    async fn end(&self, wait: Duration) -> Option<ProgramEnd> {
        let mut ended = self.ended.clone();
        let got = tokio::time::timeout(wait, ended.wait_for(Option::is_some)).await;
        got.ok()?.ok().and_then(|e| *e)
    }
}

/// Follows a kernel's report pipe to its end (logging what it writes to its
/// own stderr: only the kernel's failures go there), then reaps it.
async fn watch_kernel(
    process: Arc<KernelProcess>,
    report: pipe::Receiver,
    stderr: Option<pipe::Receiver>,
    ended: watch::Sender<Option<ProgramEnd>>,
) {
    let mut stderr = stderr;
    let mut report_bytes = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            r = report.readable() => {
                if r.is_err() {
                    break;
                }
                match report.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => report_bytes.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            r = readable(&stderr) => {
                let got = r.and_then(|()| match stderr.as_ref() {
                    Some(rx) => rx.try_read(&mut buf),
                    None => Ok(0),
                });
                match got {
                    Ok(0) => stderr = None,
                    Ok(n) => tracing::debug!(
                        output = %String::from_utf8_lossy(&buf[..n]),
                        "a code context's kernel wrote to its stderr"
                    ),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => stderr = None,
                }
            }
        }
    }
    let end = tokio::task::spawn_blocking(move || {
        process
            .spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish(&report_bytes)
    })
    .await
    .unwrap_or(ProgramEnd {
        exit_code: None,
        signal: None,
        setup_failed: false,
    });
    let _ = ended.send(Some(end));
}

async fn readable(rx: &Option<pipe::Receiver>) -> io::Result<()> {
    match rx {
        Some(rx) => rx.readable().await,
        None => std::future::pending().await,
    }
}

/// A message of a kernel (see the kernels' sources).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum KernelMessage {
    Ready {},
    Start {
        execution_count: u64,
    },
    Stdout {
        text: String,
    },
    Stderr {
        text: String,
    },
    Result {
        #[serde(default)]
        main: bool,
        data: Map<String, Value>,
    },
    Error {
        #[serde(default)]
        name: String,
        #[serde(default)]
        value: String,
        #[serde(default)]
        traceback: String,
    },
    End {},
}

impl KernelMessage {
    fn into_event(self) -> Option<CellEvent> {
        Some(match self {
            KernelMessage::Start { execution_count } => CellEvent::Started { execution_count },
            KernelMessage::Stdout { text } => CellEvent::Stdout(text),
            KernelMessage::Stderr { text } => CellEvent::Stderr(text),
            KernelMessage::Result { main, data } => CellEvent::Result { main, data },
            KernelMessage::Error {
                name,
                value,
                traceback,
            } => CellEvent::Error {
                name,
                value,
                traceback,
            },
            KernelMessage::Ready {} | KernelMessage::End {} => return None,
        })
    }
}

/// Reads a kernel's messages, a line each, at most `limit` long.
/// Cancel-safe: what was read stays in the buffer.
struct LineReader {
    rx: pipe::Receiver,
    limit: usize,
    buf: Vec<u8>,
    /// How much of `buf` holds no newline.
    scanned: usize,
    /// Dropping the rest of a line over the limit.
    skipping: bool,
    chunk: Vec<u8>,
}

impl LineReader {
    fn new(rx: pipe::Receiver, limit: usize) -> LineReader {
        LineReader {
            rx,
            limit,
            buf: Vec::new(),
            scanned: 0,
            skipping: false,
            chunk: vec![0; 64 << 10],
        }
    }

    /// The next message; `None` once the kernel's stdout is closed. Lines
    /// that are not a message are skipped; one over the limit becomes a note
    /// on stderr.
    async fn next(&mut self) -> Option<KernelMessage> {
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + at;
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                if std::mem::take(&mut self.skipping) || line.len() > self.limit {
                    return Some(KernelMessage::Stderr {
                        text: format!(
                            "[sandgate: an output over {} bytes was dropped]\n",
                            self.limit
                        ),
                    });
                }
                match serde_json::from_slice(&line) {
                    Ok(message) => return Some(message),
                    Err(e) => {
                        tracing::debug!(error = %e, "a code context's kernel sent an unreadable line");
                        continue;
                    }
                }
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.limit {
                self.buf.clear();
                self.scanned = 0;
                self.skipping = true;
            }
            if self.rx.readable().await.is_err() {
                return None;
            }
            match self.rx.try_read(&mut self.chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&self.chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
    }
}

/// What starting a kernel takes: the sandbox, and how its commands run.
struct Launcher {
    jail: Arc<Jail>,
    live: Arc<Live>,
    /// The base, the sandbox's.
    env: Vec<(String, String)>,
    file_size_bytes: u64,
}

impl Launcher {
    /// Starts a kernel in `cwd` and waits until it is ready.
    async fn start(&self, language: ContextLanguage, cwd: &str) -> Result<Kernel, SandboxError> {
        let mut env = self.env.clone();
        env.retain(|(k, _)| k != "PWD");
        env.push(("PWD".into(), cwd.to_owned()));
        let spec = Spec {
            argv: language.argv(),
            env,
            cwd: cwd.to_owned(),
            limits: Limits {
                file_size_bytes: self.file_size_bytes,
                open_files: 1024,
                ..Limits::default()
            },
            ..Spec::default()
        };
        let jail = Arc::clone(&self.jail);
        let live = Arc::clone(&self.live);
        let mut spawned = tokio::task::spawn_blocking(move || {
            let guard = live.jail.read().unwrap_or_else(|p| p.into_inner());
            let sandbox = guard.as_ref().ok_or(SandboxError::NotFound)?;
            match sandbox.stat_path(&spec.cwd, true) {
                Ok(found) if found.kind == "dir" => {}
                _ => {
                    let why = format!("cwd '{}' is not a directory in the sandbox", spec.cwd);
                    return Err(SandboxError::Invalid(invalid("cwd", why)));
                }
            }
            Ok(jail.spawn(sandbox, &spec, true)?)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        let missing = || io::Error::other("the kernel's pipes are missing");
        let requests = pipe::Sender::from_owned_fd(spawned.stdin.take().ok_or_else(missing)?)?;
        let events = pipe::Receiver::from_owned_fd(spawned.stdout.take().ok_or_else(missing)?)?;
        let report = pipe::Receiver::from_owned_fd(spawned.report.take().ok_or_else(missing)?)?;
        let stderr = spawned
            .stderr
            .take()
            .map(pipe::Receiver::from_owned_fd)
            .transpose()?;
        let (ended_tx, ended) = watch::channel(None);
        let process = Arc::new(KernelProcess {
            spawned: Mutex::new(spawned),
            ended,
        });
        tokio::spawn(watch_kernel(Arc::clone(&process), report, stderr, ended_tx));
        let mut kernel = Kernel {
            process,
            requests,
            events: LineReader::new(events, MAX_LINE),
        };
        let ready = async {
            kernel.send(&language.source_line()).await.ok()?;
            kernel.events.next().await
        };
        match tokio::time::timeout(READY_WAIT, ready).await {
            Ok(Some(KernelMessage::Ready {})) => Ok(kernel),
            _ if sandbox_ended(&self.live) => Err(SandboxError::NotFound),
            _ => Err(SandboxError::Conflict(format!(
                "the {} interpreter did not start in the sandbox",
                language.as_str()
            ))),
        }
    }
}

/// Whether the sandbox was killed (or is being killed): its jail taken or
/// being taken, or its init dead.
fn sandbox_ended(live: &Live) -> bool {
    let Ok(guard) = live.jail.try_read() else {
        // Only a kill takes the write lock.
        return true;
    };
    match guard.as_ref() {
        None => true,
        Some(sandbox) => !process_runs(sandbox.init_pid()),
    }
}

/// Whether `pid` exists and is not a zombie.
fn process_runs(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S …": the state follows the last parenthesis.
    let state = stat
        .rfind(')')
        .and_then(|at| stat[at + 1..].trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// How a cell's relay ended.
enum Outcome {
    /// The kernel said the cell was over.
    Ended,
    /// The kernel's stdout closed: it died.
    Died,
    /// Interrupted, the cell did not stop.
    Stuck,
}

/// A checked cell, holding its context, ready to run.
pub struct PreparedCell {
    context: Arc<Context>,
    launcher: Launcher,
    code: String,
    env: BTreeMap<String, String>,
    /// The server's longest exec time: the cell is interrupted then.
    limit: Duration,
}

impl std::fmt::Debug for PreparedCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedCell")
            .field("context", &self.context.info.id)
            .finish_non_exhaustive()
    }
}

impl PreparedCell {
    /// Runs the cell (after those before it in its context) and hands its
    /// events to the returned receiver; the cell is interrupted if the
    /// receiver is dropped before its end.
    pub fn run(self) -> mpsc::Receiver<CellEvent> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(self.relay_all(tx));
        rx
    }

    async fn relay_all(self, tx: mpsc::Sender<CellEvent>) {
        let context = Arc::clone(&self.context);
        let mut session = context.session.lock().await;
        if tx.is_closed() {
            return; // nobody waits for it any more
        }
        if context.removed.load(Ordering::SeqCst) {
            let _ = tx
                .send(error_event("ContextRemoved", "the context was removed"))
                .await;
            return;
        }
        if session.as_ref().is_some_and(|k| k.process.has_ended()) {
            *session = None;
        }
        if session.is_none() {
            let info = &context.info;
            match self.launcher.start(info.language, &info.cwd).await {
                Ok(kernel) => {
                    context.set_process(Some(Arc::clone(&kernel.process)));
                    *session = Some(kernel);
                }
                Err(SandboxError::NotFound) => {
                    let _ = tx.send(CellEvent::SandboxGone).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a code context's kernel did not start");
                    let why = e.to_string();
                    let _ = tx.send(error_event("ContextUnavailable", &why)).await;
                    return;
                }
            }
        }
        let Some(kernel) = session.as_mut() else {
            return;
        };
        let request = serde_json::json!({"code": self.code, "env": self.env});
        let mut line = serde_json::to_vec(&request).unwrap_or_default();
        line.push(b'\n');
        let outcome = match kernel.send(&line).await {
            Ok(()) => relay(kernel, &tx, self.limit).await,
            Err(_) => Outcome::Died,
        };
        let last = match outcome {
            Outcome::Ended => return,
            Outcome::Died => {
                let end = kernel.process.end(Duration::from_secs(1)).await;
                if sandbox_ended(&self.launcher.live) {
                    CellEvent::SandboxGone
                } else {
                    error_event("ContextRestarting", &restarted(end))
                }
            }
            Outcome::Stuck => error_event(
                "ContextRestarting",
                "Context was restarted: the cell did not stop when interrupted",
            ),
        };
        *session = None;
        context.set_process(None);
        let _ = tx.send(last).await;
    }
}

fn error_event(name: &str, value: &str) -> CellEvent {
    CellEvent::Error {
        name: name.to_owned(),
        value: value.to_owned(),
        traceback: String::new(),
    }
}

fn restarted(end: Option<ProgramEnd>) -> String {
    let how = match end {
        Some(ProgramEnd {
            exit_code: Some(code),
            ..
        }) => format!("exited with status {code}"),
        Some(ProgramEnd {
            signal: Some(libc::SIGKILL),
            ..
        }) => "was killed (out of memory, or restarted)".to_owned(),
        Some(ProgramEnd {
            signal: Some(sig), ..
        }) => format!("was killed by signal {sig}"),
        _ => "ended".to_owned(),
    };
    format!("Context was restarted: its interpreter {how}")
}

/// Hands the kernel's events for one cell to `tx` until the cell's end. The
/// cell is interrupted when `tx`'s receiver goes away or `limit` passes, again
/// if it goes on, and given up on after that.
async fn relay(kernel: &mut Kernel, tx: &mpsc::Sender<CellEvent>, limit: Duration) -> Outcome {
    let mut wake = Instant::now() + limit;
    let mut interrupts = 0u32;
    let mut listening = true;
    let mut pending: Option<CellEvent> = None;
    let process = Arc::clone(&kernel.process);
    let interrupt = |interrupts: &mut u32, wake: &mut Instant| {
        process.signal(libc::SIGINT);
        *interrupts += 1;
        *wake = Instant::now() + INTERRUPT_GRACE;
    };
    loop {
        tokio::select! {
            permit = tx.reserve(), if listening && pending.is_some() => match permit {
                Ok(permit) => permit.send(pending.take().expect("checked")),
                Err(_) => {
                    listening = false;
                    pending = None;
                    if interrupts == 0 {
                        interrupt(&mut interrupts, &mut wake);
                    }
                }
            },
            message = kernel.events.next(), if pending.is_none() => match message {
                None => return Outcome::Died,
                Some(KernelMessage::End {}) => return Outcome::Ended,
                Some(message) => {
                    if listening {
                        pending = message.into_event();
                    }
                }
            },
            () = tx.closed(), if listening => {
                listening = false;
                pending = None;
                if interrupts == 0 {
                    interrupt(&mut interrupts, &mut wake);
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if interrupts >= INTERRUPTS {
                    return Outcome::Stuck;
                }
                interrupt(&mut interrupts, &mut wake);
            }
        }
    }
}

impl SandboxManager {
    fn launcher(&self, live: Arc<Live>) -> Result<Launcher, SandboxError> {
        Ok(Launcher {
            jail: self.jail()?,
            env: self.process_env(&live, &BTreeMap::new())?,
            live,
            file_size_bytes: self.limits.tmpfs_bytes,
        })
    }

    /// The caller's sandbox's contexts, in creation order (the defaults first).
    pub fn list_contexts(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<Vec<ContextInfo>, ContextError> {
        let live = self.find(caller, id)?;
        Ok(live
            .contexts
            .with(|all| all.iter().map(|c| c.info.clone()).collect()))
    }

    /// A new context, its kernel started in `cwd` (default [`DEFAULT_CWD`];
    /// a relative path is taken from there), which must exist.
    pub async fn create_context(
        &self,
        caller: &Principal,
        id: &str,
        language: ContextLanguage,
        cwd: Option<String>,
    ) -> Result<ContextInfo, ContextError> {
        let cwd = match cwd.filter(|c| !c.trim().is_empty()) {
            None => DEFAULT_CWD.to_owned(),
            Some(c) if c.starts_with('/') => c,
            Some(c) => format!("{DEFAULT_CWD}/{c}"),
        };
        if cwd.contains('\0') || cwd.len() > 4096 {
            return Err(invalid("cwd", "cwd must be a path of at most 4096 bytes").into());
        }
        let live = self.find(caller, id)?;
        ensure_running(&live)?;
        let full = || live.contexts.with(|all| all.len()) >= MAX_CONTEXTS;
        if full() {
            return Err(ContextError::TooMany(MAX_CONTEXTS));
        }
        let launcher = self.launcher(Arc::clone(&live))?;
        let kernel = launcher.start(language, &cwd).await?;
        let context = Context::new(language, cwd, false, Some(kernel));
        live.contexts.with(|all| {
            if all.len() >= MAX_CONTEXTS {
                return Err(ContextError::TooMany(MAX_CONTEXTS));
            }
            all.push(Arc::clone(&context));
            Ok(())
        })?;
        Ok(context.info.clone())
    }

    /// Removes a context and kills its kernel (a cell running in it ends).
    pub async fn remove_context(
        &self,
        caller: &Principal,
        id: &str,
        context_id: &str,
    ) -> Result<(), ContextError> {
        let live = self.find(caller, id)?;
        let context = live.contexts.find(context_id)?;
        live.contexts
            .with(|all| all.retain(|c| !Arc::ptr_eq(c, &context)));
        context.removed.store(true, Ordering::SeqCst);
        context.kill();
        context.session.lock().await.take();
        Ok(())
    }

    /// Gives a context a fresh kernel: its state is gone, its id, language and
    /// working directory stay. A cell running in it ends.
    pub async fn restart_context(
        &self,
        caller: &Principal,
        id: &str,
        context_id: &str,
    ) -> Result<(), ContextError> {
        let live = self.find(caller, id)?;
        ensure_running(&live)?;
        let context = live.contexts.find(context_id)?;
        let launcher = self.launcher(Arc::clone(&live))?;
        context.kill();
        let mut session = context.session.lock().await;
        session.take();
        if context.removed.load(Ordering::SeqCst) {
            return Err(ContextError::NotFound(context_id.to_owned()));
        }
        let info = &context.info;
        let kernel = launcher.start(info.language, &info.cwd).await?;
        context.set_process(Some(Arc::clone(&kernel.process)));
        *session = Some(kernel);
        Ok(())
    }

    /// Checks a cell (sandbox, context, environment); running it is
    /// [`PreparedCell::run`], once the caller took an execution from its quota.
    pub fn prepare_cell(
        &self,
        caller: &Principal,
        id: &str,
        req: CellRequest,
    ) -> Result<PreparedCell, ContextError> {
        let live = self.find(caller, id)?;
        ensure_running(&live)?;
        let env = crate::execute::validate_env(req.env, 128)?
            .into_iter()
            .collect();
        let context = live.contexts.resolve(&req.target)?;
        Ok(PreparedCell {
            context,
            launcher: self.launcher(live)?,
            code: req.code,
            env,
            limit: Duration::from_millis(self.limits.max_exec_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_as_e2b_spells_them() {
        let parse = ContextLanguage::parse;
        assert_eq!(parse(None), Ok(ContextLanguage::Python));
        assert_eq!(parse(Some(" Python ")), Ok(ContextLanguage::Python));
        assert_eq!(parse(Some("js")), Ok(ContextLanguage::Javascript));
        assert_eq!(parse(Some("javascript")), Ok(ContextLanguage::Javascript));
        let refused = parse(Some("r")).expect_err("no R kernel");
        assert_eq!(refused.field, "language");
    }

    #[test]
    fn kernels_travel_as_one_json_line() {
        for language in [ContextLanguage::Python, ContextLanguage::Javascript] {
            let line = language.source_line();
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            let source: String = serde_json::from_slice(&line).expect("a JSON string");
            assert!(source.contains("sandgate"), "{language:?}");
            assert!(language.argv().iter().all(|a| a.len() < 400));
        }
    }

    #[test]
    fn context_ids_are_version_4_uuids() {
        let id = context_id();
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, context_id());
    }

    #[test]
    fn a_live_process_runs_and_a_missing_one_does_not() {
        assert!(process_runs(std::process::id() as i32));
        assert!(!process_runs(i32::MAX));
    }

    #[tokio::test]
    async fn kernel_lines_are_parsed_bounded_and_never_trusted() {
        let (tx, rx) = pipe::pipe().expect("pipe");
        let mut lines = LineReader::new(rx, 64);
        let input = [
            r#"{"type":"ready","pid":7}"#,
            "not json at all",
            r#"{"type":"stdout","text":"hi\n"}"#,
            &format!(r#"{{"type":"stdout","text":"{}"}}"#, "x".repeat(200)),
            r#"{"type":"result","main":true,"data":{"text/plain":"2"}}"#,
            r#"{"type":"error","name":"ValueError"}"#,
            r#"{"type":"end"}"#,
        ]
        .join("\n")
            + "\n";
        let writer = tokio::spawn(async move {
            let mut rest = input.as_bytes();
            while !rest.is_empty() {
                tx.writable().await.expect("writable");
                match tx.try_write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
        });
        assert!(matches!(lines.next().await, Some(KernelMessage::Ready {})));
        let event = |m: Option<KernelMessage>| m.and_then(KernelMessage::into_event);
        assert_eq!(
            event(lines.next().await),
            Some(CellEvent::Stdout("hi\n".into()))
        );
        let Some(CellEvent::Stderr(note)) = event(lines.next().await) else {
            panic!("an overlong line becomes a note")
        };
        assert!(note.contains("dropped"), "{note}");
        let Some(CellEvent::Result { main: true, data }) = event(lines.next().await) else {
            panic!("a result")
        };
        assert_eq!(data["text/plain"], "2");
        assert_eq!(
            event(lines.next().await),
            Some(CellEvent::Error {
                name: "ValueError".into(),
                value: String::new(),
                traceback: String::new()
            })
        );
        assert!(matches!(lines.next().await, Some(KernelMessage::End {})));
        writer.await.expect("writer");
        assert!(lines.next().await.is_none(), "end of file");
    }
}
