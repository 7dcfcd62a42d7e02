//! One-shot execution (SPEC §3): validate a run request against the server's
//! limits, run it in a fresh jail, and shape the answer.
//!
//! Owns the run's limits and the server-wide cap on simultaneous runs. It does not
//! know keys or quotas: the caller takes an execution from the quota between
//! [`Executor::admit`] (a slot is held) and [`Executor::run`] (the program starts).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use sandgate_jail::{Jail, Limits, SandboxFile, Spec, Status};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::keys::api::{InvalidField, invalid};

pub mod languages;

pub use languages::{LANGUAGES, Language, LanguageInfo, catalogue};
pub use sandgate_jail::Config as JailConfig;

/// The server's bounds on one run. Requests ask within them.
#[derive(Debug, Clone)]
pub struct ExecLimits {
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    /// Per stream; output beyond it is cut and the run ends as `output_limit`.
    pub output_cap_bytes: usize,
    pub max_code_bytes: usize,
    pub max_stdin_bytes: usize,
    pub max_data_bytes: usize,
    pub max_env_vars: usize,
    /// Processes and threads one run may have at once.
    pub pids: u32,
    /// CPU cores one run may use (fractions allowed).
    pub cpus: f64,
    /// Size of each of the run's writable tmpfs mounts (`/tmp`, `/workspace`).
    pub tmpfs_bytes: u64,
    /// Runs in progress at once, server-wide.
    pub max_concurrent: usize,
    /// How long a run waits for a free slot before it is refused.
    pub queue_wait: Duration,
    /// Jails kept built and waiting for runs.
    pub warm_pool: usize,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits {
            default_timeout_ms: 10_000,
            max_timeout_ms: 60_000,
            default_memory_mb: 256,
            max_memory_mb: 2_048,
            output_cap_bytes: 1024 * 1024,
            max_code_bytes: 1024 * 1024,
            max_stdin_bytes: 8 * 1024 * 1024,
            max_data_bytes: 8 * 1024 * 1024,
            max_env_vars: 128,
            pids: 128,
            cpus: 1.0,
            tmpfs_bytes: 64 * 1024 * 1024,
            max_concurrent: 16,
            queue_wait: Duration::from_secs(10),
            warm_pool: 4,
        }
    }
}

/// `POST /v1/execute`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecuteRequest {
    /// `python`, `javascript` or `bash` (see `GET /v1/languages`).
    pub language: String,
    pub code: String,
    #[serde(default)]
    pub stdin: Option<String>,
    /// Any JSON: `data` in Python and JavaScript, and `/sandbox/data.json`.
    #[serde(default)]
    pub data: Option<serde_json::Value>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Ok,
    Error,
    Timeout,
    MemoryLimit,
    OutputLimit,
}

/// The answer to a run, whatever the program did.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteResponse {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    /// `null` when the program was killed by a signal.
    pub exit_code: Option<i32>,
    /// The program's top-level `result`, when JSON-serialisable (Python, JavaScript).
    pub result: Option<serde_json::Value>,
    pub status: RunStatus,
    pub duration_ms: u64,
    pub truncated: bool,
    /// Present when the key has an executions limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executions_left: Option<u64>,
    /// CPU time the run used, in milliseconds. For an exec or code cell in a
    /// sandbox: what the sandbox used since the part billed before (this program,
    /// and whatever ran beside it, background processes included).
    pub cpu_ms: u64,
}

/// A request that passed validation, with every bound resolved.
#[derive(Debug, Clone)]
pub struct Run {
    pub language: &'static Language,
    pub code: String,
    pub stdin: Vec<u8>,
    pub data: Option<Vec<u8>>,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub memory_bytes: u64,
}

/// Environment variables a request may not set: they would change how the
/// interpreter or the loader start, not what the program sees.
const RESERVED_ENV: &[&str] = &[
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "PYTHONHOME",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "NODE_OPTIONS",
    "BASH_ENV",
    "ENV",
];

impl ExecLimits {
    pub fn validate(&self, req: ExecuteRequest) -> Result<Run, InvalidField> {
        let language = languages::find(&req.language).ok_or_else(|| {
            let known: Vec<&str> = LANGUAGES.iter().map(|l| l.name).collect();
            invalid(
                "language",
                format!(
                    "unknown language `{}`; one of: {}",
                    req.language,
                    known.join(", ")
                ),
            )
        })?;
        if req.code.trim().is_empty() {
            return Err(invalid("code", "code must not be empty"));
        }
        if req.code.len() > self.max_code_bytes {
            return Err(invalid(
                "code",
                format!("code is over the limit of {} bytes", self.max_code_bytes),
            ));
        }
        let stdin = req.stdin.unwrap_or_default().into_bytes();
        if stdin.len() > self.max_stdin_bytes {
            return Err(invalid(
                "stdin",
                format!("stdin is over the limit of {} bytes", self.max_stdin_bytes),
            ));
        }
        let data = match req.data {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let bytes = serde_json::to_vec(&v).expect("JSON values serialize");
                if bytes.len() > self.max_data_bytes {
                    return Err(invalid(
                        "data",
                        format!("data is over the limit of {} bytes", self.max_data_bytes),
                    ));
                }
                Some(bytes)
            }
        };
        let env = validate_env(req.env.unwrap_or_default(), self.max_env_vars)?;
        let timeout_ms = req.timeout_ms.unwrap_or(self.default_timeout_ms);
        if timeout_ms == 0 || timeout_ms > self.max_timeout_ms {
            return Err(invalid(
                "timeoutMs",
                format!("timeoutMs must be between 1 and {}", self.max_timeout_ms),
            ));
        }
        let memory_mb = req.memory_mb.unwrap_or(self.default_memory_mb);
        if !(16..=self.max_memory_mb).contains(&memory_mb) {
            return Err(invalid(
                "memoryMb",
                format!("memoryMb must be between 16 and {}", self.max_memory_mb),
            ));
        }
        Ok(Run {
            language,
            code: req.code,
            stdin,
            data,
            env,
            timeout: Duration::from_millis(timeout_ms),
            memory_bytes: memory_mb * 1024 * 1024,
        })
    }
}

pub fn validate_env(
    env: BTreeMap<String, String>,
    max: usize,
) -> Result<Vec<(String, String)>, InvalidField> {
    if env.len() > max {
        return Err(invalid("env", format!("at most {max} variables")));
    }
    env.into_iter()
        .map(|(k, v)| {
            let name_ok = !k.is_empty()
                && k.len() <= 256
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                return Err(invalid(
                    "env",
                    format!("`{k}` is not a valid variable name"),
                ));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(invalid("env", format!("`{k}` may not be set")));
            }
            if v.contains('\0') || v.len() > 64 * 1024 {
                return Err(invalid("env", format!("the value of `{k}` is not allowed")));
            }
            Ok((k, v))
        })
        .collect()
}

/// Forks the jail's zygote (the small process that makes every clone of the
/// jail, see `sandgate_jail`) now, while this process is still small: a server
/// calls it first thing, before its runtime and stores grow, since the zygote is
/// a copy of the process as it is then. Does nothing where programs cannot be
/// jailed (not root); any error is left for `Jail::new` to report.
pub fn start_jail_zygote() {
    let _ = sandgate_jail::start_zygote();
}

/// Runs programs, at most `max_concurrent` at once.
#[derive(Debug)]
pub struct Executor {
    limits: ExecLimits,
    slots: Arc<Semaphore>,
    /// The jail, or why this machine cannot jail (the server still serves the rest).
    jail: Result<Arc<Jail>, String>,
    /// Jails built ahead of time; each serves one run, then is torn down.
    warm: Arc<crate::warm::WarmPool>,
}

/// A held run slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot(#[expect(dead_code, reason = "held for its Drop")] OwnedSemaphorePermit);

/// Every slot stayed busy for the whole wait.
#[derive(Debug, thiserror::Error)]
#[error("all {0} run slots are busy")]
pub struct Busy(pub usize);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("execution is unavailable on this server: {0}")]
    Unavailable(String),
    #[error("the jail failed: {0}")]
    Jail(#[from] io::Error),
}

/// The environment every program starts with; the request's `env` adds to it.
const BASE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/bin:/bin"),
    ("HOME", "/workspace"),
    ("TMPDIR", "/tmp"),
    ("LANG", "C.UTF-8"),
    ("USER", "sandbox"),
];

/// [`BASE_ENV`] as owned pairs.
pub fn base_env() -> Vec<(String, String)> {
    BASE_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Executor {
    /// Starts keeping `warm_pool` jails ready when called inside a tokio runtime.
    pub fn new(limits: ExecLimits, jail: Result<Arc<Jail>, String>) -> Executor {
        let slots = Arc::new(Semaphore::new(limits.max_concurrent.max(1)));
        let warm = Arc::new(crate::warm::WarmPool::default());
        if let (Ok(j), Ok(runtime), true) = (
            &jail,
            tokio::runtime::Handle::try_current(),
            limits.warm_pool > 0,
        ) {
            let spec = warm_spec(&limits, limits.default_memory_mb << 20);
            runtime.spawn(Arc::clone(&warm).fill(Arc::clone(j), spec, limits.warm_pool));
        }
        Executor {
            limits,
            slots,
            jail,
            warm,
        }
    }

    pub fn limits(&self) -> &ExecLimits {
        &self.limits
    }

    /// Tears down the warm jails (server shutdown).
    pub async fn shutdown(&self) {
        self.warm.close().await;
    }

    /// Why runs cannot happen here, when they cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.jail.as_ref().err().map(String::as_str)
    }

    /// Waits (bounded) for a free slot.
    pub async fn admit(&self) -> Result<Slot, Busy> {
        let acquire = Arc::clone(&self.slots).acquire_owned();
        match tokio::time::timeout(self.limits.queue_wait, acquire).await {
            Ok(Ok(permit)) => Ok(Slot(permit)),
            _ => Err(Busy(self.limits.max_concurrent)),
        }
    }

    /// Runs a validated request in a jail of its own, holding `slot` until it
    /// ends. The jail is a warm one when one is ready (given this run's memory
    /// limit), else built now; the run's files are written into its `/sandbox`,
    /// the program runs inside, and the jail is torn down after the answer. The
    /// run finishes (within its deadline) even if the caller stops waiting.
    pub async fn run(&self, slot: Slot, run: Run) -> Result<ExecuteResponse, ExecError> {
        let jail = Arc::clone(
            self.jail
                .as_ref()
                .map_err(|e| ExecError::Unavailable(e.clone()))?,
        );
        let warm = self.warm.take();
        let l = &self.limits;
        let (memory, cpu) = (run.memory_bytes, millicores(l.cpus));
        let fresh = warm_spec(l, memory);
        let (files, program) = self.program(run);
        let outcome = tokio::task::spawn_blocking(move || {
            let sandbox = match warm {
                Some(s) => {
                    s.set_limits(memory, cpu)?;
                    s
                }
                None => jail.create_sandbox(&fresh)?,
            };
            let outcome = (|| {
                for f in &files {
                    sandbox.write_path(
                        &format!("/sandbox/{}", f.name),
                        &f.contents,
                        sandgate_jail::FsUser { uid: 0, gid: 0 },
                    )?;
                }
                let mut outcome = jail.exec(&sandbox, &program)?;
                outcome.cpu_time = sandbox.cpu_time();
                Ok::<_, io::Error>(outcome)
            })();
            drop(slot);
            // Whatever the program left behind dies with its jail, after the answer.
            std::thread::spawn(move || sandbox.kill());
            outcome
        })
        .await
        .map_err(|e| ExecError::Jail(io::Error::other(e.to_string())))??;
        Ok(response_of(outcome))
    }

    /// The files for `/sandbox` and the program to run.
    fn program(&self, run: Run) -> (Vec<SandboxFile>, Spec) {
        let lang = run.language;
        let file_name = |path: &str| path.rsplit('/').next().unwrap_or(path).to_owned();
        // The prelude only gives `data` and takes `result`: a Python program that
        // names neither runs directly (the prelude costs a millisecond or two).
        let direct = lang.name == "python"
            && run.data.is_none()
            && !run.code.contains("data")
            && !run.code.contains("result");
        let argv = if direct {
            vec![
                lang.interpreter.to_owned(),
                "-s".to_owned(),
                "-B".to_owned(),
                lang.code_file.to_owned(),
            ]
        } else {
            lang.argv()
        };
        let mut files = vec![SandboxFile {
            name: file_name(lang.code_file),
            contents: run.code.into_bytes(),
        }];
        if let (Some((path, prelude)), false) = (lang.prelude, direct) {
            files.push(SandboxFile {
                name: file_name(path),
                contents: prelude.as_bytes().to_vec(),
            });
        }
        if let Some(data) = run.data {
            files.push(SandboxFile {
                name: file_name(languages::DATA_FILE),
                contents: data,
            });
        }
        let mut env: Vec<(String, String)> = BASE_ENV
            .iter()
            .filter(|(k, _)| !run.env.iter().any(|(name, _)| name == k))
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.extend(run.env);
        let l = &self.limits;
        let spec = Spec {
            argv,
            env,
            cwd: "/workspace".to_owned(),
            stdin: run.stdin,
            files: Vec::new(),
            limits: Limits {
                timeout: run.timeout,
                output_bytes: l.output_cap_bytes,
                file_size_bytes: l.tmpfs_bytes,
                open_files: 1024,
                ..Limits::default()
            },
            sandbox_dir_for_server: None,
        };
        (files, spec)
    }
}

fn millicores(cpus: f64) -> u32 {
    (cpus * 1000.0).round().clamp(10.0, 1_000_000.0) as u32
}

/// The jail of a one-shot run: its `/sandbox` is filled by the server per run
/// (code, prelude, data), so it is left writable by root, sized for the largest.
fn warm_spec(l: &ExecLimits, memory_bytes: u64) -> Spec {
    Spec {
        limits: Limits {
            memory_bytes,
            pids: l.pids,
            cpu_millicores: millicores(l.cpus),
            tmpfs_bytes: l.tmpfs_bytes,
            ..Limits::default()
        },
        sandbox_dir_for_server: Some((l.max_code_bytes + l.max_data_bytes + (1 << 20)) as u64),
        ..Spec::default()
    }
}

/// The API's answer for a jail outcome.
pub fn response_of(o: sandgate_jail::Outcome) -> ExecuteResponse {
    let status = match o.status {
        Status::Exited(0) => RunStatus::Ok,
        Status::Exited(_) | Status::Signaled(_) => RunStatus::Error,
        Status::Timeout => RunStatus::Timeout,
        Status::MemoryLimit => RunStatus::MemoryLimit,
        Status::OutputLimit => RunStatus::OutputLimit,
    };
    let result = o
        .result
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    ExecuteResponse {
        success: status == RunStatus::Ok,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        exit_code: match o.status {
            Status::Timeout | Status::OutputLimit => None,
            _ => o.exit_code,
        },
        result,
        status,
        duration_ms: o.duration.as_millis() as u64,
        truncated: o.truncated,
        executions_left: None,
        cpu_ms: o.cpu_time.as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(language: &str, code: &str) -> ExecuteRequest {
        ExecuteRequest {
            language: language.into(),
            code: code.into(),
            ..ExecuteRequest::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        let l = ExecLimits::default();
        assert_eq!(l.validate(req("cobol", "x")).unwrap_err().field, "language");
        assert_eq!(l.validate(req("python", "  ")).unwrap_err().field, "code");
        let big = "x".repeat(l.max_code_bytes + 1);
        assert_eq!(l.validate(req("python", &big)).unwrap_err().field, "code");
        let mut r = req("python", "print(1)");
        r.timeout_ms = Some(l.max_timeout_ms + 1);
        assert_eq!(l.validate(r).unwrap_err().field, "timeoutMs");
        let mut r = req("python", "print(1)");
        r.memory_mb = Some(l.max_memory_mb + 1);
        assert_eq!(l.validate(r).unwrap_err().field, "memoryMb");
        let mut r = req("python", "print(1)");
        r.env = Some([("LD_PRELOAD".to_owned(), "/x.so".to_owned())].into());
        assert_eq!(l.validate(r).unwrap_err().field, "env");
        let mut r = req("python", "print(1)");
        r.env = Some([("A=B".to_owned(), "x".to_owned())].into());
        assert_eq!(l.validate(r).unwrap_err().field, "env");
        let ok = l.validate(req("bash", "echo hi")).unwrap();
        assert_eq!(ok.timeout, Duration::from_millis(l.default_timeout_ms));
    }
}
