//! What E2B's protocol needs of a sandbox beyond SPEC §4: access tokens (its
//! in-sandbox agent is reached with a per-sandbox token, not a key), commands
//! left running with their own pid, stdin and signals, and "connect" (resume a
//! paused sandbox, lengthen its life).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    Live, SandboxError, SandboxManager, SandboxState, SandboxView, TokenRefusal, ensure_running,
};
use crate::keys::api::invalid;
use crate::model::Timestamp;
use crate::principal::Principal;
use crate::processes::{ProcessConfig, ProcessEvent, ProcessTable};
use sandgate_jail::{Limits, Spec};
use tokio::sync::mpsc;

pub(super) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A checked command, holding its sandbox (see [`SandboxManager::prepare_process`]).
pub struct PreparedProcess {
    live: Arc<Live>,
    spec: Spec,
    req: StartProcess,
}

impl std::fmt::Debug for PreparedProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedProcess")
            .field("cmd", &self.req.config.cmd)
            .finish_non_exhaustive()
    }
}

/// A command to start and leave running.
#[derive(Debug, Clone, Default)]
pub struct StartProcess {
    pub config: ProcessConfig,
    pub tag: Option<String>,
    /// Keep the process's stdin open for later writes.
    pub stdin: bool,
    /// Kill the process (its whole group) this long after its start.
    pub timeout: Option<Duration>,
}

impl SandboxManager {
    /// The owner of live sandbox `id`, when `token` is its access token. The
    /// comparison is of SHA-256 digests, in constant time.
    pub fn owner_by_token(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<Arc<Principal>, TokenRefusal> {
        let live = self.live().get(id).cloned().ok_or(TokenRefusal::NotFound)?;
        let presented = token_hash(token.unwrap_or_default());
        if token.is_some() && bool::from(presented.ct_eq(&live.access)) {
            Ok(Arc::clone(&live.owner))
        } else {
            Err(TokenRefusal::BadToken)
        }
    }

    /// The access token of the caller's sandbox (E2B's connect returns it).
    pub fn access_token(&self, caller: &Principal, id: &str) -> Result<String, SandboxError> {
        Ok(self.find(caller, id)?.access_token.clone())
    }

    /// The commands left running in the caller's sandbox.
    pub fn processes(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<Arc<ProcessTable>, SandboxError> {
        Ok(Arc::clone(&self.find(caller, id)?.processes))
    }

    /// Starts a command in the caller's sandbox, as the sandbox user, and
    /// leaves it running; its pid inside the sandbox and its output, from the
    /// first byte. [`SandboxManager::prepare_process`], then
    /// [`SandboxManager::start_prepared`].
    pub async fn start_process(
        &self,
        caller: &Principal,
        id: &str,
        req: StartProcess,
    ) -> Result<(u32, mpsc::Receiver<ProcessEvent>), SandboxError> {
        let prepared = self.prepare_process(caller, id, req).await?;
        self.start_prepared(prepared).await
    }

    /// Checks a command to start (its program, arguments, environment and
    /// working directory, which must exist in the sandbox) without starting it.
    pub async fn prepare_process(
        &self,
        caller: &Principal,
        id: &str,
        req: StartProcess,
    ) -> Result<PreparedProcess, SandboxError> {
        let live = self.find(caller, id)?;
        let c = &req.config;
        if c.cmd.is_empty() || !c.cmd.starts_with('/') && c.cmd.contains('/') {
            return Err(invalid("cmd", "cmd must be a program name or an absolute path").into());
        }
        let cwd = c.cwd.clone().unwrap_or_else(|| "/home/user".to_owned());
        if !cwd.starts_with('/') || cwd.contains('\0') {
            return Err(invalid("cwd", "cwd must be an absolute path").into());
        }
        // A bare program name is looked up on the sandbox's PATH, by a shell.
        let mut argv = if c.cmd.starts_with('/') {
            vec![c.cmd.clone()]
        } else {
            ["/bin/sh", "-c", "exec \"$@\"", "sh", &c.cmd]
                .map(str::to_owned)
                .to_vec()
        };
        argv.extend(c.args.iter().cloned());
        if argv.iter().map(String::len).sum::<usize>() > 1 << 20 {
            return Err(invalid("args", "over the limit of 1 MiB").into());
        }
        let mut env = self.process_env(&live, &c.envs)?;
        // The shell's idea of where it is: /home/user, not the /workspace it
        // links to.
        if !env.iter().any(|(k, _)| k == "PWD") {
            env.push(("PWD".into(), cwd.clone()));
        }
        ensure_running(&live)?;
        let is_dir = {
            let (live, cwd) = (Arc::clone(&live), cwd.clone());
            tokio::task::spawn_blocking(move || {
                let guard = live.jail.read().unwrap_or_else(|p| p.into_inner());
                guard
                    .as_ref()
                    .map(|s| s.stat_path(&cwd, true).is_ok_and(|i| i.kind == "dir"))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .ok_or(SandboxError::NotFound)?
        };
        if !is_dir {
            return Err(invalid("cwd", format!("cwd '{cwd}' does not exist")).into());
        }
        let spec = Spec {
            argv,
            env,
            cwd,
            limits: Limits {
                file_size_bytes: self.limits.tmpfs_bytes,
                open_files: 1024,
                ..Limits::default()
            },
            ..Spec::default()
        };
        Ok(PreparedProcess { live, spec, req })
    }

    /// Starts a checked command (after the caller took its execution).
    pub async fn start_prepared(
        &self,
        prepared: PreparedProcess,
    ) -> Result<(u32, mpsc::Receiver<ProcessEvent>), SandboxError> {
        let PreparedProcess { live, spec, req } = prepared;
        let jail = self.jail()?;
        let live_for_spawn = Arc::clone(&live);
        let keep_stdin = req.stdin;
        let spawned = tokio::task::spawn_blocking(move || {
            let guard = live_for_spawn
                .jail
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let sandbox = guard.as_ref().ok_or(SandboxError::NotFound)?;
            Ok::<_, SandboxError>(jail.spawn(sandbox, &spec, keep_stdin)?)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        let (pid, events) = live
            .processes
            .adopt(spawned, req.config, req.tag, req.timeout)
            .map_err(|e| match e {
                crate::processes::ProcessError::Io(e) => SandboxError::Jail(e),
                other => SandboxError::Conflict(other.to_string()),
            })?;
        Ok((pid, events))
    }

    /// The environment of a program run in a sandbox (exec, code cell, started
    /// command): the base, the sandbox's, the request's (each overriding the
    /// one before).
    pub(super) fn process_env(
        &self,
        live: &Live,
        extra: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, SandboxError> {
        let extra = crate::execute::validate_env(extra.clone(), 128)?;
        let mut env = crate::execute::base_env();
        for (k, v) in live.env.iter().chain(extra.iter()) {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        Ok(env)
    }

    /// E2B's connect: resumes the sandbox when paused, and moves its expiry
    /// to `timeout_sec` from now when that is later than it is now.
    pub async fn connect(
        &self,
        caller: &Principal,
        id: &str,
        timeout_sec: Option<u64>,
    ) -> Result<SandboxView, SandboxError> {
        let live = self.find(caller, id)?;
        let paused = live
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .view
            .state
            == SandboxState::Paused;
        if paused {
            match self.set_paused(caller, id, false).await {
                Ok(_) | Err(SandboxError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(secs) = timeout_sec {
            let wanted = Timestamp::from_millis(
                Timestamp::now().millis() + secs.min(self.limits.max_timeout_sec) as i64 * 1000,
            );
            let later = live
                .record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .view
                .expires_at
                < wanted;
            if later && secs > 0 {
                return self
                    .set_timeout(caller, id, secs.min(self.limits.max_timeout_sec))
                    .await;
            }
        }
        self.get(caller, id)
    }
}
