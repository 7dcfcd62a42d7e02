//! Processes started inside a sandbox and left running (what E2B's envd calls
//! its process service): a command that outlives the request that started it,
//! whose output any number of clients may follow, whose stdin stays open when
//! asked, and which a client may signal, list, or connect to again later.
//!
//! Each sandbox has one [`ProcessTable`]. A process is known by its pid inside
//! the sandbox. Its output is read by one task and handed to every connected
//! client in order, with back-pressure (a client that does not read holds the
//! program's output up, as a pipe would); a client that goes away is dropped,
//! never the process. A process ends at its own end, at its deadline (its whole
//! process group is killed) or with its sandbox. Nothing here knows HTTP.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandgate_jail::{OutputStream, ProgramEnd, Spawned};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// How many output chunks wait for a slow client before the program waits.
const SUBSCRIBER_BUFFER: usize = 64;
/// Output read after the program exited, while background processes it left
/// may keep its pipes open for ever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(20);
/// How long a connected client may take nothing before it is let go.
const STALLED_CLIENT: Duration = Duration::from_secs(30);
/// Bytes read from a pipe at a time.
const CHUNK: usize = 32 << 10;

/// What a process was started as, shown by [`ProcessTable::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub config: ProcessConfig,
    pub tag: Option<String>,
}

/// How a process ended, in envd's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessExit {
    /// The exit code; -1 when a signal ended it.
    pub exit_code: i32,
    /// It exited by itself (not by a signal).
    pub exited: bool,
    /// `exit status N` or `signal: killed` (as Go's `ProcessState` says it).
    pub status: String,
    /// Set whenever the process did not exit with 0.
    pub error: Option<String>,
}

impl ProcessExit {
    fn of(end: ProgramEnd) -> ProcessExit {
        let (exit_code, exited, status) = match (end.exit_code, end.signal) {
            (Some(code), _) => (code, true, format!("exit status {code}")),
            (None, Some(sig)) => (-1, false, format!("signal: {}", signal_name(sig))),
            (None, None) => (-1, false, "signal: killed".to_owned()),
        };
        let error = if end.setup_failed {
            Some("the process could not be started in the sandbox".to_owned())
        } else {
            (exit_code != 0 || !exited).then(|| status.clone())
        };
        ProcessExit {
            exit_code,
            exited,
            status,
            error,
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "killed",
        libc::SIGTERM => "terminated",
        libc::SIGINT => "interrupt",
        libc::SIGHUP => "hangup",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGABRT => "aborted",
        libc::SIGPIPE => "broken pipe",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        _ => "signaled",
    }
}

/// What a connected client receives, in order; `End` is last.
#[derive(Debug, Clone)]
pub enum ProcessEvent {
    Output(OutputStream, Arc<[u8]>),
    End(ProcessExit),
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process with pid {0} not found")]
    NotFound(u32),
    #[error("{0}")]
    Invalid(String),
    #[error("the process's stdin is closed or was never opened")]
    StdinClosed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Which signals a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// One running process.
struct Proc {
    info: ProcessInfo,
    /// Clients following the output.
    subscribers: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
    /// The program's stdin, while open.
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    /// The program's handle, for signals; taken by the output task at the end.
    control: Mutex<Option<Spawned>>,
}

/// The processes of one sandbox.
#[derive(Default)]
pub struct ProcessTable {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl std::fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTable")
            .field("processes", &self.procs().len())
            .finish()
    }
}

impl ProcessTable {
    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, pid: u32) -> Result<Arc<Proc>, ProcessError> {
        self.procs()
            .get(&pid)
            .cloned()
            .ok_or(ProcessError::NotFound(pid))
    }

    /// Takes charge of a just-spawned program: its output goes to the returned
    /// receiver (and to later [`ProcessTable::connect`]s) until it ends, at
    /// the latest `deadline` from now (its process group is then killed).
    /// Must run inside the tokio runtime.
    pub fn adopt(
        self: &Arc<Self>,
        mut spawned: Spawned,
        config: ProcessConfig,
        tag: Option<String>,
        deadline: Option<Duration>,
    ) -> Result<(u32, mpsc::Receiver<ProcessEvent>), ProcessError> {
        let pid = spawned.inner_pid;
        let stdin = spawned
            .stdin
            .take()
            .map(pipe::Sender::from_owned_fd)
            .transpose()?;
        let readers = [spawned.stdout.take(), spawned.stderr.take()]
            .map(|fd| fd.map(pipe::Receiver::from_owned_fd));
        let [stdout, stderr] = readers;
        let (stdout, stderr) = (stdout.transpose()?, stderr.transpose()?);
        let report = spawned
            .report
            .take()
            .map(pipe::Receiver::from_owned_fd)
            .transpose()?
            .ok_or_else(|| io::Error::other("the spawned program has no report pipe"))?;
        let (first, events) = mpsc::channel(SUBSCRIBER_BUFFER);
        let proc = Arc::new(Proc {
            info: ProcessInfo { pid, config, tag },
            subscribers: Mutex::new(vec![first]),
            stdin: tokio::sync::Mutex::new(stdin),
            control: Mutex::new(Some(spawned)),
        });
        self.procs().insert(pid, Arc::clone(&proc));
        if let Some(after) = deadline {
            // Its own task: a client that does not read holds the output (and
            // so the pump) up, never the deadline.
            let proc = Arc::downgrade(&proc);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(proc) = proc.upgrade()
                    && let Some(s) = proc
                        .control
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                {
                    s.signal_group(libc::SIGKILL);
                }
            });
        }
        let table = Arc::clone(self);
        tokio::spawn(async move {
            let end = pump(&proc, stdout, stderr, report).await;
            table.procs().remove(&pid);
            proc.broadcast(ProcessEvent::End(end)).await;
            proc.subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        });
        Ok((pid, events))
    }

    /// Follows a running process's output from now on.
    pub fn connect(&self, pid: u32) -> Result<mpsc::Receiver<ProcessEvent>, ProcessError> {
        let proc = self.find(pid)?;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        proc.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        Ok(rx)
    }

    /// The running processes, by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut all: Vec<ProcessInfo> = self.procs().values().map(|p| p.info.clone()).collect();
        all.sort_by_key(|p| p.pid);
        all
    }

    /// The pid of the running process with this tag.
    pub fn by_tag(&self, tag: &str) -> Result<u32, ProcessError> {
        self.procs()
            .values()
            .find(|p| p.info.tag.as_deref() == Some(tag))
            .map(|p| p.info.pid)
            .ok_or_else(|| ProcessError::Invalid(format!("no process has the tag `{tag}`")))
    }

    /// Signals the process's group (what it started that did not leave it).
    pub fn signal(&self, pid: u32, signal: Signal) -> Result<(), ProcessError> {
        let proc = self.find(pid)?;
        let control = proc.control.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(spawned) = control.as_ref() {
            spawned.signal_group(match signal {
                Signal::Term => libc::SIGTERM,
                Signal::Kill => libc::SIGKILL,
            });
        }
        Ok(())
    }

    /// Writes to the process's stdin.
    pub async fn write_stdin(&self, pid: u32, data: &[u8]) -> Result<(), ProcessError> {
        let proc = self.find(pid)?;
        let mut stdin = proc.stdin.lock().await;
        let sender = stdin.as_mut().ok_or(ProcessError::StdinClosed)?;
        let mut rest = data;
        while !rest.is_empty() {
            sender.writable().await?;
            match sender.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // The program closed its stdin: nothing more can go there.
                    *stdin = None;
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Closes the process's stdin (it reads end of file).
    pub async fn close_stdin(&self, pid: u32) -> Result<(), ProcessError> {
        let proc = self.find(pid)?;
        proc.stdin.lock().await.take();
        Ok(())
    }
}

impl Proc {
    /// Hands `event` to every client, waiting for slow ones; drops those gone.
    async fn broadcast(&self, event: ProcessEvent) {
        let subscribers: Vec<mpsc::Sender<ProcessEvent>> = self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut gone = Vec::new();
        for s in &subscribers {
            // A client that takes nothing for this long is let go (the
            // process goes on): one stalled reader never stalls a process.
            let sent = tokio::time::timeout(STALLED_CLIENT, s.send(event.clone())).await;
            if !matches!(sent, Ok(Ok(()))) {
                gone.push(s.clone());
            }
        }
        if !gone.is_empty() {
            self.subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|s| !gone.iter().any(|g| g.same_channel(s)));
        }
    }
}

/// Reads the program's output until it ends (and a moment after, for output
/// still in flight); returns how it ended.
async fn pump(
    proc: &Proc,
    mut stdout: Option<pipe::Receiver>,
    mut stderr: Option<pipe::Receiver>,
    report: pipe::Receiver,
) -> ProcessExit {
    let mut report = Some(report);
    let mut report_bytes = Vec::new();
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if stdout.is_none() && stderr.is_none() && report.is_none() {
            break;
        }
        if drain_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
            break;
        }
        let never = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let wake = drain_until.unwrap_or(never);
        tokio::select! {
            r = readable(&stdout) => read_into(proc, &mut stdout, r, OutputStream::Stdout, &mut buf).await,
            r = readable(&stderr) => read_into(proc, &mut stderr, r, OutputStream::Stderr, &mut buf).await,
            r = readable(&report) => {
                let mut ended = false;
                match r {
                    Ok(()) => match report.as_ref().map(|rx| rx.try_read(&mut buf)) {
                        Some(Ok(0)) | None => ended = true,
                        Some(Ok(n)) => report_bytes.extend_from_slice(&buf[..n]),
                        Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Some(Err(_)) => ended = true,
                    },
                    Err(_) => ended = true,
                }
                if ended {
                    report = None;
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    proc.stdin.lock().await.take();
    let spawned = proc
        .control
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let end = match spawned {
        Some(mut s) => tokio::task::spawn_blocking(move || s.finish(&report_bytes))
            .await
            .unwrap_or(ProgramEnd {
                exit_code: None,
                signal: None,
                setup_failed: false,
            }),
        None => ProgramEnd {
            exit_code: None,
            signal: None,
            setup_failed: false,
        },
    };
    ProcessExit::of(end)
}

/// Waits until `rx` is readable; never, when there is none.
async fn readable(rx: &Option<pipe::Receiver>) -> io::Result<()> {
    match rx {
        Some(rx) => rx.readable().await,
        None => std::future::pending().await,
    }
}

/// Reads what is there and hands it on; closes the reader at end of file.
async fn read_into(
    proc: &Proc,
    rx: &mut Option<pipe::Receiver>,
    ready: io::Result<()>,
    stream: OutputStream,
    buf: &mut [u8],
) {
    let Some(reader) = rx.as_ref() else { return };
    if ready.is_err() {
        *rx = None;
        return;
    }
    match reader.try_read(buf) {
        Ok(0) => *rx = None,
        Ok(n) => {
            proc.broadcast(ProcessEvent::Output(stream, Arc::from(&buf[..n])))
                .await
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => *rx = None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_read_like_envd_says_them() {
        let exit = |code, signal| {
            ProcessExit::of(ProgramEnd {
                exit_code: code,
                signal,
                setup_failed: false,
            })
        };
        let ok = exit(Some(0), None);
        assert_eq!((ok.exit_code, ok.exited, ok.error), (0, true, None));
        assert_eq!(ok.status, "exit status 0");
        let failed = exit(Some(3), None);
        assert_eq!(failed.error.as_deref(), Some("exit status 3"));
        let killed = exit(None, Some(libc::SIGKILL));
        assert_eq!((killed.exit_code, killed.exited), (-1, false));
        assert_eq!(killed.status, "signal: killed");
        assert_eq!(killed.error.as_deref(), Some("signal: killed"));
    }
}
