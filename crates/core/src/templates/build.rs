//! One build: a sandbox isolated like any other, the template's `files` written
//! into `/workspace`, its `setup` commands run in order under one deadline, and
//! `/workspace` captured into a new layer. Blocking: runs on a blocking thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandgate_jail::{CaptureLimits, Jail, Limits, OutputStream, Sandbox, Spec, Status};

use super::layer::LayerDirs;
use super::{TemplateLimits, TemplateView};
use crate::sandboxes::SandboxLimits;

/// The most of a build's log that is kept (its end).
const LOG_CAP: usize = 64 << 10;
/// Output kept per stream of one setup command (the log keeps less).
const COMMAND_OUTPUT_CAP: usize = 1 << 20;
/// The sandbox user (the jail's default), who owns everything built.
const SANDBOX_UID: u32 = 65534;
const SANDBOX_GID: u32 = 65534;

/// A build in progress: its log so far, and how to stop it.
#[derive(Debug)]
pub(crate) struct BuildRun {
    pub(crate) id: String,
    log: Mutex<Log>,
    cancelled: AtomicBool,
    /// The build's sandbox while it exists (a cancel kills it).
    sandbox: Mutex<Option<Arc<Sandbox>>>,
}

#[derive(Debug, Default)]
struct Log {
    bytes: Vec<u8>,
    /// The start was dropped to stay under [`LOG_CAP`].
    cut: bool,
}

impl BuildRun {
    pub(crate) fn new(id: String) -> BuildRun {
        BuildRun {
            id,
            log: Mutex::new(Log::default()),
            cancelled: AtomicBool::new(false),
            sandbox: Mutex::new(None),
        }
    }

    /// Abandons the build: what runs in its sandbox is killed, nothing is kept.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        if let Some(s) = self
            .sandbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            s.terminate();
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn append(&self, bytes: &[u8]) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.bytes.extend_from_slice(bytes);
        if log.bytes.len() > LOG_CAP {
            let cut = log.bytes.len() - LOG_CAP * 3 / 4;
            log.bytes.drain(..cut);
            log.cut = true;
        }
    }

    fn note(&self, line: &str) {
        self.append(format!("[{line}]\n").as_bytes());
    }

    pub(crate) fn log_text(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&log.bytes);
        if log.cut {
            format!("[… the start of the log was cut …]\n{text}")
        } else {
            text.into_owned()
        }
    }
}

/// What a build needs of its template, taken when it starts.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    files: Vec<(String, String)>,
    setup: Vec<String>,
    env: Vec<(String, String)>,
    memory_mb: u64,
    cpus: f64,
    pids: u32,
    deadline: Duration,
}

impl Plan {
    pub(crate) fn of(view: &TemplateView, limits: &TemplateLimits, sl: &SandboxLimits) -> Plan {
        let mut env = crate::execute::base_env();
        for (k, v) in &view.env {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        Plan {
            files: view
                .files
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            setup: view.setup.clone(),
            env,
            memory_mb: view.memory_mb.unwrap_or(sl.default_memory_mb),
            cpus: view.cpus.unwrap_or(sl.default_cpus),
            pids: sl.pids,
            deadline: limits.build_timeout,
        }
    }
}

/// A finished build's layer.
#[derive(Debug)]
pub(crate) struct Built {
    pub(crate) path: std::path::PathBuf,
    pub(crate) bytes: u64,
}

/// Runs the build to its layer, or to the one-line reason it failed (the log
/// has the details).
pub(crate) fn execute(
    jail: &Jail,
    plan: &Plan,
    run: &BuildRun,
    dirs: &LayerDirs,
    limits: &TemplateLimits,
) -> Result<Built, String> {
    let result = build_in_sandbox(jail, plan, run, dirs, limits);
    // The sandbox goes whatever happened (the last handle kills it).
    let sandbox = run.sandbox.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(sandbox);
    if run.is_cancelled() {
        return Err("the build was abandoned".into());
    }
    if let Err(why) = &result {
        run.note(&format!("build failed: {why}"));
    }
    result
}

fn build_in_sandbox(
    jail: &Jail,
    plan: &Plan,
    run: &BuildRun,
    dirs: &LayerDirs,
    limits: &TemplateLimits,
) -> Result<Built, String> {
    let started = Instant::now();
    let spec = Spec {
        limits: Limits {
            memory_bytes: plan.memory_mb << 20,
            pids: plan.pids,
            cpu_millicores: (plan.cpus * 1000.0).round() as u32,
            tmpfs_bytes: limits.max_layer_bytes,
            ..Limits::default()
        },
        ..Spec::default()
    };
    let sandbox = jail.create_sandbox(&spec).map(Arc::new).map_err(|e| {
        tracing::error!(error = %e, build = %run.id, "could not start a build sandbox");
        "could not start the build's sandbox (internal error)".to_owned()
    })?;
    *run.sandbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&sandbox));
    if run.is_cancelled() {
        return Err("abandoned".into());
    }

    if !plan.files.is_empty() {
        run.note(&format!("writing {} files", plan.files.len()));
    }
    for (path, contents) in &plan.files {
        sandbox
            .write_path(
                path,
                contents.as_bytes(),
                sandgate_jail::FsUser {
                    uid: SANDBOX_UID,
                    gid: SANDBOX_GID,
                },
            )
            .map_err(|e| format!("could not write {path}: {e}"))?;
    }

    for command in &plan.setup {
        if run.is_cancelled() {
            return Err("abandoned".into());
        }
        let left = plan.deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(deadline_passed(plan));
        }
        run.append(format!("$ {command}\n").as_bytes());
        let spec = Spec {
            argv: vec!["/bin/sh".into(), "-c".into(), command.clone()],
            env: plan.env.clone(),
            cwd: "/workspace".into(),
            limits: Limits {
                timeout: left,
                output_bytes: COMMAND_OUTPUT_CAP,
                file_size_bytes: limits.max_layer_bytes,
                open_files: 1024,
                ..Limits::default()
            },
            ..Spec::default()
        };
        let mut sink = |_: OutputStream, bytes: &[u8]| {
            run.append(bytes);
            !run.is_cancelled()
        };
        let outcome = jail
            .exec_streaming(&sandbox, &spec, &mut sink)
            .map_err(|e| {
                tracing::error!(error = %e, build = %run.id, "a setup command could not start");
                format!("`{}` could not start (internal error)", short(command))
            })?;
        if run.is_cancelled() {
            return Err("abandoned".into());
        }
        match outcome.status {
            Status::Exited(0) => {}
            Status::Exited(code) => {
                return Err(format!("`{}` exited with {code}", short(command)));
            }
            Status::Signaled(sig) => {
                return Err(format!("`{}` was killed by signal {sig}", short(command)));
            }
            Status::Timeout => return Err(deadline_passed(plan)),
            Status::MemoryLimit => {
                return Err(format!(
                    "`{}` ran out of memory ({} MB, /workspace contents included)",
                    short(command),
                    plan.memory_mb
                ));
            }
            Status::OutputLimit => {
                return Err(format!(
                    "`{}` wrote more than {} MiB of output",
                    short(command),
                    COMMAND_OUTPUT_CAP >> 20
                ));
            }
        }
    }

    let scratch = dirs.scratch(&run.id).map_err(|e| e.to_string())?;
    let caps = CaptureLimits {
        max_bytes: limits.max_layer_bytes,
        max_entries: limits.max_layer_entries,
    };
    let report = sandbox
        .capture("/workspace", &scratch, &caps, SANDBOX_UID, SANDBOX_GID)
        .map_err(|e| format!("/workspace could not be kept: {e}"))?;
    for skipped in &report.skipped {
        run.note(&format!(
            "not kept: {skipped} (only files, directories and links are)"
        ));
    }
    let path = dirs.commit(&run.id).map_err(|e| {
        tracing::error!(error = %e, build = %run.id, "could not move a template layer into place");
        "could not keep /workspace (internal error)".to_owned()
    })?;
    run.note(&format!(
        "kept /workspace: {} bytes in {} entries, built in {:.1} s",
        report.bytes,
        report.entries,
        started.elapsed().as_secs_f64()
    ));
    Ok(Built {
        path,
        bytes: report.bytes,
    })
}

fn deadline_passed(plan: &Plan) -> String {
    format!(
        "the build's deadline of {} s passed",
        plan.deadline.as_secs()
    )
}

/// A command as named in a one-line error.
fn short(command: &str) -> String {
    let line = command.lines().next().unwrap_or_default();
    if line.chars().count() > 80 || line.len() < command.len() {
        format!("{}…", line.chars().take(80).collect::<String>())
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_its_end() {
        let run = BuildRun::new("bld_x".into());
        run.append(b"first\n");
        for _ in 0..100 {
            run.append(&[b'x'; 1000]);
        }
        run.append(b"\nlast\n");
        let text = run.log_text();
        assert!(text.starts_with("[… the start of the log was cut …]\n"));
        assert!(text.ends_with("last\n") && !text.contains("first"));
        assert!(text.len() <= LOG_CAP + 64);
    }

    #[test]
    fn long_commands_are_shortened_in_errors() {
        assert_eq!(short("make"), "make");
        assert_eq!(short("a\nb"), "a…");
        assert_eq!(short(&"y".repeat(100)).chars().count(), 81);
    }
}
