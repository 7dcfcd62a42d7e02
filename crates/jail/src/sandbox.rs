//! Long-lived sandboxes: a jail whose init stays up, and programs run inside it
//! one after another, sharing its filesystem, processes and limits.
//!
//! [`Jail::create_sandbox`] builds the jail as a one-shot run does, but its init
//! reports ready and then only reaps. [`Jail::exec`] runs a program inside: a
//! helper (a plain clone made by the [`zygote`](crate::zygote), like every clone
//! of the jail) joins the sandbox's namespaces and cgroups (as `nsenter` would)
//! and forks the program, which is set up exactly like a one-shot program (uid,
//! capabilities, no_new_privs, seccomp, rlimits). Background processes an exec
//! leaves keep running until the sandbox is killed; killing the sandbox's init
//! ends them all.
//!
//! Inits and helpers are children of the zygote, whose one thread lives as long
//! as the server: their parent-death signal fires when the server dies (the
//! zygote dies with it), never when a server thread ends, so a sandbox outlives
//! the request (and the thread) that created it, and a started program's helper
//! outlives the thread that started it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cgroup::{Group, GroupLimits};
use crate::child::{self, Mode, Report};
use crate::{
    Child, Jail, Outcome, OutputStream, Pipes, RUN_SEQ, Spec, Status, Streams, namespace_flags,
    outcome, program_end, setup_error, write_all, zygote,
};

/// The priority of a sandbox's init (setup and teardown work), 19 the lowest.
const INIT_NICE: libc::c_int = 15;

fn set_nice(pid: libc::pid_t, nice: libc::c_int) {
    // SAFETY: setpriority on our own child; no memory effects.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
}

/// How long a sandbox's init may take to build the jail.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// After an exec's program exits, how long output still in flight is collected
/// (background processes may keep the pipes open for ever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(20);

/// A running sandbox. Dropping it kills everything in it and removes its cgroups.
#[derive(Debug)]
pub struct Sandbox {
    init: Child,
    group: Option<Group>,
    /// The init's ipc, uts, net, cgroup, pid and mnt namespaces, in joining order.
    ns: [OwnedFd; 6],
    created: Instant,
}

const NAMESPACES: [&str; 6] = ["ipc", "uts", "net", "cgroup", "pid", "mnt"];

impl Jail {
    /// Builds a sandbox with `spec`'s files and limits (its `argv` is ignored; its
    /// memory, pids and CPU limits bound everything ever run inside).
    pub fn create_sandbox(&self, spec: &Spec) -> io::Result<Sandbox> {
        let ops = self.plan_fs(spec)?;
        self.create_sandbox_with(spec, ops)
    }

    /// [`Jail::create_sandbox`] with the filesystem steps already planned.
    pub(crate) fn create_sandbox_with(
        &self,
        spec: &Spec,
        ops: Vec<child::Op>,
    ) -> io::Result<Sandbox> {
        let limits = spec.limits;
        let id = format!(
            "{}-{}",
            std::process::id(),
            RUN_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let group = self.cgroups.create(
            &id,
            GroupLimits {
                memory_bytes: limits.memory_bytes,
                pids: limits.pids,
                cpu_millicores: limits.cpu_millicores,
            },
        )?;
        let mut sandbox_group = Some(group);
        let result = self.start_init(spec, ops, sandbox_group.as_ref().expect("just set"));
        match result {
            Ok((init, ns)) => Ok(Sandbox {
                init,
                group: sandbox_group.take(),
                ns,
                created: Instant::now(),
            }),
            Err(e) => {
                if let Some(g) = sandbox_group.take() {
                    g.kill_all();
                    g.remove();
                }
                Err(e)
            }
        }
    }

    fn start_init(
        &self,
        spec: &Spec,
        ops: Vec<child::Op>,
        group: &Group,
    ) -> io::Result<(Child, [OwnedFd; 6])> {
        let pipes = Pipes::new()?;
        let netns = self.net_pool.take();
        let plan = self.finish_plan(
            spec,
            ops,
            pipes.child_fds(),
            netns.as_ref().map_or(-1, AsRawFd::as_raw_fd),
            Mode::SandboxInit,
        )?;
        let mut init = zygote::clone(&plan, namespace_flags(netns.is_none()))?;
        let ends = pipes.into_server_ends();
        // Building and tearing down a sandbox is background work (warm pools):
        // the init runs at a low priority, so that programs already running keep
        // the CPU. What runs inside is started by the server, at its priority.
        set_nice(init.pid, INIT_NICE);
        group.attach(init.pid)?;
        write_all(&ends.go, b"g")?;
        drop(ends.go);
        // The init's program streams are unused: only its report is read.
        let [stdout, stderr, result, report] = ends.readers;
        drop((ends.stdin, stdout, stderr, result));
        match read_report(&report, READY_TIMEOUT)? {
            Some(r) if r.kind == Report::READY => {}
            Some(r) if r.kind == Report::SETUP_FAILED => {
                return Err(setup_error("sandbox", &r, &plan.ops));
            }
            _ => return Err(io::Error::other("the sandbox's init did not get ready")),
        }
        let ns = NAMESPACES.map(|n| File::open(format!("/proc/{}/ns/{n}", init.pid)));
        let [a, b, c, d, e, f] = ns;
        let ns = [
            a?.into(),
            b?.into(),
            c?.into(),
            d?.into(),
            e?.into(),
            f?.into(),
        ];
        // The pid names the init for as long as the zygote keeps it (alive or
        // a zombie); a zygote that died meanwhile kept nothing, but then an
        // init still alive after the opens is the process that was opened.
        if init.has_exited() {
            return Err(io::Error::other("the sandbox's init died while starting"));
        }
        Ok((init, ns))
    }

    /// Starts `spec`'s program inside `sandbox`: a helper cloned by the zygote
    /// joins the sandbox's namespaces and cgroups (as `nsenter` would) and forks
    /// the program. The helper, the server's end of the program's stdin, its
    /// readers (stdout, stderr, result, report), and the sandbox's cgroup.
    fn enter<'s>(&self, sandbox: &'s Sandbox, spec: &Spec) -> io::Result<Entered<'s>> {
        if spec.argv.is_empty() {
            return Err(crate::invalid("argv must not be empty"));
        }
        let group = sandbox
            .group
            .as_ref()
            .ok_or_else(|| io::Error::other("the sandbox is gone"))?;
        let pipes = Pipes::new()?;
        let ns = sandbox.ns.each_ref().map(AsRawFd::as_raw_fd);
        let plan = self.finish_plan(spec, Vec::new(), pipes.child_fds(), -1, Mode::Enter(ns))?;
        let helper = zygote::clone(&plan, 0)?;
        let ends = pipes.into_server_ends();
        group.attach(helper.pid)?;
        write_all(&ends.go, b"g")?;
        Ok(Entered {
            helper,
            stdin: ends.stdin,
            readers: ends.readers,
            group,
        })
    }

    /// Runs a program inside a sandbox, to its end, its deadline or its output cap.
    /// The sandbox's memory, pids and CPU limits apply (not `spec`'s); `spec.files`
    /// are not written (the sandbox's `/sandbox` is read-only).
    pub fn exec(&self, sandbox: &Sandbox, spec: &Spec) -> io::Result<Outcome> {
        self.exec_streaming(sandbox, spec, &mut |_, _| true)
    }

    /// [`Jail::exec`], handing stdout and stderr to `sink` as they are produced.
    /// When `sink` returns `false` (nobody listens any more), the program is killed.
    /// `sink` is also called with an empty chunk now and then, only to ask that.
    pub fn exec_streaming(
        &self,
        sandbox: &Sandbox,
        spec: &Spec,
        sink: &mut dyn FnMut(OutputStream, &[u8]) -> bool,
    ) -> io::Result<Outcome> {
        let Entered {
            mut helper,
            stdin,
            readers,
            group,
        } = self.enter(sandbox, spec)?;
        let started = Instant::now();

        let mut streams =
            Streams::new(stdin, &spec.stdin, readers, spec.limits.output_bytes)?.with_sink(sink);
        let deadline = started + spec.limits.timeout;
        let mut ended_by: Option<Status> = None;
        let mut exited_at: Option<Instant> = None;
        let kill = |streams: &Streams<'_>, helper: &Child| {
            // The program is a session leader: its process group is everything it
            // started that did not leave it.
            if let Some(r) = streams.reports().iter().find(|r| r.kind == Report::STARTED) {
                // SAFETY: kill has no memory effects; the group is the program's.
                unsafe { libc::kill(-r.status, libc::SIGKILL) };
            }
            helper.kill();
        };
        loop {
            if streams.done() {
                break;
            }
            let now = Instant::now();
            if exited_at.is_none() && streams.readers[3].is_none() {
                exited_at = Some(now);
            }
            if exited_at.is_some_and(|t| now >= t + DRAIN_AFTER_EXIT) {
                break;
            }
            if ended_by.is_none() && now >= deadline {
                kill(&streams, &helper);
                ended_by = Some(Status::Timeout);
            }
            let wait = match (ended_by, exited_at) {
                (_, Some(t)) => (t + DRAIN_AFTER_EXIT).saturating_duration_since(now),
                (Some(_), None) => Duration::from_millis(100),
                (None, None) => deadline.saturating_duration_since(now),
            };
            // Wake now and then to notice a listener that went away.
            streams.poll(wait.min(Duration::from_millis(250)))?;
            streams.check_sink();
            if streams.over_cap && ended_by.is_none() {
                kill(&streams, &helper);
                ended_by = Some(Status::OutputLimit);
            }
            if streams.abandoned && ended_by.is_none() {
                // Nobody waits for the answer: stop the program.
                kill(&streams, &helper);
                ended_by = Some(Status::Signaled(libc::SIGKILL));
            }
            if ended_by.is_some() && Instant::now() > deadline + Duration::from_secs(2) {
                break;
            }
        }
        helper.kill();
        helper.wait()?;
        let duration = started.elapsed();
        let reports = streams.reports();
        if let Some(r) = reports.iter().find(|r| r.kind == Report::SETUP_FAILED) {
            return Err(setup_error("exec", r, &[]));
        }
        let (exit_code, signal) = program_end(&reports);
        let mut outcome = outcome(
            ended_by,
            exit_code,
            signal,
            std::mem::take(&mut streams.outputs),
            duration,
        );
        if signal == Some(libc::SIGKILL) && group.oom_kills() > 0 && ended_by.is_none() {
            outcome.status = Status::MemoryLimit;
        }
        Ok(outcome)
    }
}

/// A program just started inside a sandbox ([`Jail::enter`]).
struct Entered<'s> {
    helper: Child,
    stdin: OwnedFd,
    /// stdout, stderr, result, report.
    readers: [OwnedFd; 4],
    group: &'s Group,
}

/// A program started inside a sandbox and left running (see [`Jail::spawn`]).
///
/// The caller owns its pipes and reads them as it likes; the program's end is
/// announced on [`Spawned::report`] (readable, then end of file), and
/// [`Spawned::finish`] turns what was read there into how it ended. Dropping a
/// `Spawned` kills the program's process group.
#[derive(Debug)]
pub struct Spawned {
    helper: Child,
    /// The program's pid as the server sees it; also its process group.
    pid: libc::pid_t,
    /// The program's pid inside the sandbox (what its own `ps` shows).
    pub inner_pid: u32,
    /// Refers to the program for as long as it exists (never to a reused pid).
    pidfd: Option<OwnedFd>,
    /// The write end of the program's stdin, when it was kept open.
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// Where the program's end is reported; end of file once it is.
    pub report: Option<OwnedFd>,
    ended: bool,
}

/// How a spawned program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The program never ran (it could not be set up: working directory, limits).
    pub setup_failed: bool,
}

impl Jail {
    /// Starts a program inside a sandbox and returns at once, the program still
    /// running. Set up exactly as for [`Jail::exec`]; `spec.stdin` is ignored:
    /// with `keep_stdin` the caller gets the write end of the program's stdin,
    /// otherwise the program's stdin is at end of file. `spec.limits.timeout`
    /// is not enforced here: the caller ends the program when it wants.
    pub fn spawn(&self, sandbox: &Sandbox, spec: &Spec, keep_stdin: bool) -> io::Result<Spawned> {
        let Entered {
            helper,
            stdin,
            readers,
            ..
        } = self.enter(sandbox, spec)?;
        let [stdout, stderr, result, report] = readers;
        drop(result);
        let started = match read_report(&report, READY_TIMEOUT)? {
            Some(r) if r.kind == Report::STARTED => r.status,
            Some(r) if r.kind == Report::SETUP_FAILED => {
                return Err(setup_error("spawn", &r, &[]));
            }
            _ => return Err(io::Error::other("the program did not start")),
        };
        // SAFETY: pidfd_open of the program's pid; it cannot have been reused
        // yet: the helper reaps it only after it ends, and reports that below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, started, 0) };
        let pidfd = (pidfd >= 0).then(|| {
            // SAFETY: a fresh fd nobody else owns.
            unsafe { OwnedFd::from_raw_fd(pidfd as libc::c_int) }
        });
        Ok(Spawned {
            helper,
            pid: started,
            inner_pid: inner_pid(started).unwrap_or(started as u32),
            pidfd,
            stdin: keep_stdin.then_some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
            report: Some(report),
            ended: false,
        })
    }
}

/// The pid of `pid` in the innermost PID namespace it belongs to.
fn inner_pid(pid: libc::pid_t) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

impl Spawned {
    /// Sends `signal` to the program's process group (everything it started
    /// that did not leave it), if the program still runs.
    pub fn signal_group(&self, signal: libc::c_int) {
        if self.ended || !self.is_running() {
            return;
        }
        // The program itself first (through its pidfd when there is one): it
        // may not have made its own process group yet.
        match &self.pidfd {
            Some(fd) => crate::fd::signal_pidfd(fd, signal),
            // SAFETY: kill has no memory effects; the program is not reaped.
            None => unsafe {
                libc::kill(self.pid, signal);
            },
        }
        // SAFETY: kill has no memory effects; the group is the program's, and
        // the program has not been reaped (its pidfd is not readable).
        unsafe { libc::kill(-self.pid, signal) };
    }

    /// Whether the program has not ended yet.
    fn is_running(&self) -> bool {
        let Some(fd) = &self.pidfd else {
            return !self.ended;
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, no waiting. A pidfd is readable once its
        // process has exited.
        unsafe { libc::poll(&mut pfd, 1, 0) == 0 }
    }

    /// How the program ended, from everything read from [`Spawned::report`]
    /// up to its end of file; reaps the helper. Blocks only briefly: the helper
    /// exits right after reporting.
    pub fn finish(&mut self, report: &[u8]) -> ProgramEnd {
        self.ended = true;
        let reports: Vec<Report> = report
            .chunks_exact(Report::SIZE)
            .map(|c| Report::from_bytes(c.try_into().expect("exact chunk")))
            .collect();
        let setup_failed = reports.iter().any(|r| r.kind == Report::SETUP_FAILED);
        let (exit_code, signal) = program_end(&reports);
        self.helper.kill();
        let _ = self.helper.wait();
        ProgramEnd {
            exit_code,
            signal,
            setup_failed,
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !self.ended {
            self.signal_group(libc::SIGKILL);
        }
    }
}

impl Sandbox {
    /// The sandbox's init, as the server sees it.
    pub fn init_pid(&self) -> i32 {
        self.init.pid
    }

    /// Whether the sandbox still runs (its init has not died).
    pub fn is_alive(&mut self) -> bool {
        !self.init.has_exited()
    }

    /// Opens `/proc/<init>/<what>` (with `open`'s `flags`), making sure that
    /// what was opened is the init's even if its zygote died (and its pid was
    /// freed): the init is still alive after the open.
    pub(crate) fn open_proc_of_init(&self, what: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
        let path = std::ffi::CString::new(format!("/proc/{}/{what}", self.init.pid))
            .map_err(|_| crate::invalid("a /proc path contains NUL"))?;
        // SAFETY: opens a path from a live C string; the fd is owned below.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if zygote::readable(self.init.pidfd()) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the sandbox has ended",
            ));
        }
        Ok(fd)
    }

    /// CPU time used by everything ever run inside.
    pub fn cpu_time(&self) -> Duration {
        self.group.as_ref().map_or(Duration::ZERO, Group::cpu_time)
    }

    /// How long the sandbox has existed.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// A TCP connection to `127.0.0.1:port` inside the sandbox (its own network
    /// namespace: only what listens in the sandbox can answer). Made on a
    /// short-lived thread that joins the namespace, so no server thread changes.
    pub fn connect_tcp(&self, port: u16, timeout: Duration) -> io::Result<std::net::TcpStream> {
        let netns = self.ns[2].try_clone()?;
        std::thread::Builder::new()
            .name("sandgate-port".into())
            .spawn(move || {
                // SAFETY: setns on this thread only (CLONE_NEWNET is per thread),
                // with an fd we own; the thread ends right after.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                std::net::TcpStream::connect_timeout(&addr, timeout)
            })?
            .join()
            .map_err(|_| io::Error::other("the port thread panicked"))?
    }

    /// Changes the memory and CPU limits of everything inside (a warm sandbox
    /// taken from a pool gets the limits its creator asked for).
    pub fn set_limits(&self, memory_bytes: u64, cpu_millicores: u32) -> io::Result<()> {
        match &self.group {
            Some(g) => g.set_memory_and_cpu(memory_bytes, cpu_millicores),
            None => Err(io::Error::other("the sandbox is gone")),
        }
    }

    /// Freezes (`true`) or thaws every process in the sandbox.
    pub fn set_frozen(&self, frozen: bool) -> io::Result<()> {
        match &self.group {
            Some(g) => g.set_frozen(frozen),
            None => Err(io::Error::other("the sandbox is gone")),
        }
    }

    /// Whether every process inside is frozen (a freeze takes effect shortly
    /// after [`Sandbox::set_frozen`]).
    pub(crate) fn is_frozen(&self) -> bool {
        self.group.as_ref().is_some_and(Group::is_frozen)
    }

    /// Kills everything inside, now, without waiting for execs in progress (they
    /// end as their programs die). [`Sandbox::kill`] or dropping cleans up after.
    pub fn terminate(&self) {
        if let Some(group) = &self.group {
            let _ = group.set_frozen(false);
        }
        self.init.kill();
    }

    /// Kills everything inside and removes the sandbox's cgroups. Returns the CPU
    /// time everything ever run inside used, read once its processes are gone
    /// (the last word of [`Sandbox::cpu_time`]).
    pub fn kill(mut self) -> Duration {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Duration {
        let Some(group) = self.group.take() else {
            return Duration::ZERO;
        };
        // Thaw first: frozen processes cannot die.
        let _ = group.set_frozen(false);
        set_nice(self.init.pid, INIT_NICE);
        self.init.kill();
        // The init of a PID namespace exits only after every other process of
        // the namespace has: once it is reaped, nothing inside runs any more.
        let _ = self.init.wait();
        group.kill_all();
        let used = group.cpu_time();
        group.remove();
        used
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reads one report record, waiting at most `timeout`; `None` at end of file.
fn read_report(fd: &OwnedFd, timeout: Duration) -> io::Result<Option<Report>> {
    let mut buf = [0u8; Report::SIZE];
    let mut got = 0;
    let deadline = Instant::now() + timeout;
    while got < Report::SIZE {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no report in time"));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        // SAFETY: reads into the rest of a live stack buffer.
        let r = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                Report::SIZE - got,
            )
        };
        match r {
            0 => return Ok(None),
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            r => got += r as usize,
        }
    }
    Ok(Some(Report::from_bytes(&buf)))
}
