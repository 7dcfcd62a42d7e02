//! Linux isolation of one process tree.
//!
//! [`Jail::run`] starts a program as the second process of fresh PID, mount,
//! network, IPC, UTS and cgroup namespaces, in a root built from read-only bind
//! mounts of `/usr` (never the host's `/`), with private size-capped tmpfs `/tmp`,
//! `/workspace` and `/sandbox`, a minimal `/dev`, its own `/proc`, loopback only,
//! the unprivileged sandbox user, `no_new_privs`, no capabilities, a seccomp
//! filter, cgroup limits on memory (no swap), processes and CPU, and rlimits on
//! file size and open files. A wall-clock deadline kills the whole tree; when the
//! program exits, whatever it left running is killed with it; nothing outlives the
//! call, not even the cgroups.
//!
//! The layers, server side first:
//! - [`Jail`] (here): prepares a [`child::Plan`], has the zygote clone it, joins
//!   the child to its cgroups, feeds stdin and collects output until the end or
//!   a limit.
//! - [`zygote`]: the small single-threaded process, forked once from the server
//!   (at the first [`Jail::new`], or earlier with [`start_zygote`]), that makes
//!   every clone — each jail's init and each exec's helper — so that the large,
//!   multi-threaded server never does (a clone would make its memory
//!   copy-on-write). It is the parent of them all; the server holds a pidfd of
//!   each, and all of them die with the server.
//! - [`child`]: the code between `clone` and `execve`, allocation-free.
//! - [`sandbox`]: long-lived sandboxes — an init that stays up, and programs run
//!   inside it by joining its namespaces ([`Jail::create_sandbox`], [`Jail::exec`]).
//! - [`cgroup`]: v1 control groups. [`seccomp`]: the filter. [`netns`]: network
//!   namespaces made ahead of time.
//!
//! Requires root (real, not in a user namespace) and cgroup v1 hierarchies for
//! memory, pids, cpu, cpuacct and freezer.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod cgroup;
mod child;
mod fd;
mod files;
mod layer;
mod netns;
mod sandbox;
mod zygote;

pub use files::{DirEntry, Entry, FileContent, FsUser, Link, MAX_LIST_DEPTH, NewFile, PathInfo};
pub use layer::{CaptureError, CaptureLimits, CaptureReport};
pub use sandbox::{ProgramEnd, Sandbox, Spawned};
pub use zygote::start as start_zygote;
mod seccomp;

use cgroup::{Cgroups, GroupLimits};
use child::{ChildFds, Mode, Op, Plan, Report, Stage};

/// How the jail is set up on this machine.
#[derive(Debug, Clone)]
pub struct Config {
    /// A root-only directory for the jail's mount point.
    pub runtime_dir: PathBuf,
    /// The name of the cgroup under the server's own group that holds every run.
    pub cgroup_name: String,
    /// The sandbox user and group.
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            runtime_dir: PathBuf::from("/run/sandgate"),
            cgroup_name: "sandgate".to_owned(),
            uid: 65534,
            gid: 65534,
            hostname: "sandbox".to_owned(),
        }
    }
}

/// Bounds on one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    /// Memory (RAM; no swap) of the whole tree, tmpfs contents included.
    pub memory_bytes: u64,
    /// Processes and threads at once.
    pub pids: u32,
    /// CPU, in thousandths of a core.
    pub cpu_millicores: u32,
    /// Kept per output stream; more ends the run as [`Status::OutputLimit`].
    pub output_bytes: usize,
    /// Size of each writable tmpfs (`/tmp`, `/workspace`, `/dev/shm`).
    pub tmpfs_bytes: u64,
    /// Largest file the program may write (`RLIMIT_FSIZE`).
    pub file_size_bytes: u64,
    /// Open files per process (`RLIMIT_NOFILE`).
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(10),
            memory_bytes: 256 << 20,
            pids: 128,
            cpu_millicores: 1000,
            output_bytes: 1 << 20,
            tmpfs_bytes: 64 << 20,
            file_size_bytes: 64 << 20,
            open_files: 256,
        }
    }
}

/// A file placed in the read-only `/sandbox` directory before the program starts.
#[derive(Debug, Clone)]
pub struct SandboxFile {
    /// A plain name: no `/`, not `.` or `..`.
    pub name: String,
    pub contents: Vec<u8>,
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// `argv[0]` is an absolute path inside the jail.
    pub argv: Vec<String>,
    /// The whole environment; nothing is inherited from the server.
    pub env: Vec<(String, String)>,
    /// Working directory inside the jail; `/workspace` when empty.
    pub cwd: String,
    pub stdin: Vec<u8>,
    pub files: Vec<SandboxFile>,
    pub limits: Limits,
    /// `Some(size)`: `/sandbox` is left writable (by root only: the server fills
    /// it later with [`Sandbox::write_path`]) with this size; `None`: it holds
    /// `files` and is read-only.
    pub sandbox_dir_for_server: Option<u64>,
}

/// Receives output as it is produced; `false` means nobody listens any more.
pub type Sink<'a> = dyn FnMut(OutputStream, &[u8]) -> bool + 'a;

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The program exited with this code.
    Exited(i32),
    /// The program was killed by this signal (not by the jail).
    Signaled(i32),
    /// The deadline passed; the tree was killed.
    Timeout,
    /// The kernel killed a process of the tree for exceeding the memory limit.
    MemoryLimit,
    /// A stream went past its cap; the tree was killed.
    OutputLimit,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    /// The program's exit code, also for `MemoryLimit` when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the program, when one did.
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// What the program wrote on fd 3, when it stayed within the output cap.
    pub result: Option<Vec<u8>>,
    /// Some output was cut at the cap.
    pub truncated: bool,
    pub duration: Duration,
    pub cpu_time: Duration,
}

/// A jail factory: checks the machine once, then runs any number of programs,
/// concurrently from any threads.
#[derive(Debug)]
pub struct Jail {
    config: Config,
    mount_point: PathBuf,
    pub(crate) cgroups: Cgroups,
    filter: Vec<libc::sock_filter>,
    /// `/bin`, `/lib`, … as on the host: symlinks into `/usr` or directories.
    top_level: Vec<(String, TopLevel)>,
    pub(crate) net_pool: netns::NetPool,
}

/// Numbers runs process-wide: several jails in one process share cgroup names.
pub(crate) static RUN_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
enum TopLevel {
    Symlink(PathBuf),
    Directory,
}

/// Host directories bound read-only, besides `/usr`. Only those that exist are.
const HOST_TOP_LEVEL: &[&str] = &["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"];
/// Host files bound read-only into `/etc` when they exist.
const HOST_ETC_FILES: &[&str] = &["/etc/ld.so.cache", "/etc/localtime"];
const HOST_ETC_DIRS: &[&str] = &["/etc/alternatives"];
/// Network namespaces kept ready (see [`netns`]).
const NET_POOL_SIZE: usize = 4;
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

impl Jail {
    /// Checks that this machine can jail (root, cgroups), prepares the runtime
    /// directory and removes what crashed predecessors left.
    pub fn new(config: Config) -> io::Result<Jail> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the jail needs root to create namespaces and cgroups",
            ));
        }
        fs::create_dir_all(&config.runtime_dir)?;
        let mount_point = config.runtime_dir.join("root");
        fs::create_dir_all(&mount_point)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&config.runtime_dir, fs::Permissions::from_mode(0o700))?;
        let cgroups = Cgroups::detect(&config.cgroup_name)?;
        cgroups.sweep();
        // Every clone is made by the zygote: start it before this process
        // grows further (a no-op when it runs already).
        zygote::start()?;
        let mut top_level = Vec::new();
        for dir in HOST_TOP_LEVEL {
            let path = Path::new(dir);
            match fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    top_level.push((dir.to_string(), TopLevel::Symlink(fs::read_link(path)?)));
                }
                Ok(m) if m.is_dir() => top_level.push((dir.to_string(), TopLevel::Directory)),
                _ => {}
            }
        }
        Ok(Jail {
            config,
            mount_point,
            cgroups,
            filter: seccomp::filter(),
            top_level,
            net_pool: netns::NetPool::start(NET_POOL_SIZE),
        })
    }

    /// Runs a program to its end or its first limit. Blocking: call it from a
    /// thread that may block (`spawn_blocking`).
    pub fn run(&self, spec: &Spec) -> io::Result<Outcome> {
        let plan_parts = self.plan(spec)?;
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
        let result = self.run_in(spec, plan_parts, &group);
        group.kill_all();
        let outcome = result.map(|mut o| {
            o.cpu_time = group.cpu_time();
            let oom = group.oom_kills() > 0
                || (o.signal == Some(libc::SIGKILL) && group.memory_limit_hit());
            if oom && matches!(o.status, Status::Signaled(_) | Status::Exited(1..)) {
                o.status = Status::MemoryLimit;
            }
            o
        });
        group.remove();
        outcome
    }

    fn run_in(&self, spec: &Spec, ops: Vec<Op>, group: &cgroup::Group) -> io::Result<Outcome> {
        let pipes = Pipes::new()?;
        let netns = self.net_pool.take();
        let plan = self.finish_plan(
            spec,
            ops,
            pipes.child_fds(),
            netns.as_ref().map_or(-1, AsRawFd::as_raw_fd),
            Mode::OneShot,
        )?;
        let mut child = zygote::clone(&plan, namespace_flags(netns.is_none()))?;
        let started = Instant::now();
        let ends = pipes.into_server_ends();

        group.attach(child.pid)?;
        write_all(&ends.go, b"g")?;
        drop(ends.go);

        let mut streams = Streams::new(
            ends.stdin,
            &spec.stdin,
            ends.readers,
            spec.limits.output_bytes,
        )?;
        let deadline = started + spec.limits.timeout;
        let mut ended_by: Option<Status> = None;
        while !streams.done() {
            let now = Instant::now();
            if ended_by.is_none() && now >= deadline {
                child.kill();
                ended_by = Some(Status::Timeout);
            }
            let wait = match ended_by {
                // After a kill, the pipes close as soon as the processes are gone.
                Some(_) => Duration::from_millis(100),
                None => deadline.saturating_duration_since(now),
            };
            let progressed = streams.poll(wait)?;
            if streams.over_cap && ended_by.is_none() {
                child.kill();
                ended_by = Some(Status::OutputLimit);
            }
            if !progressed
                && ended_by.is_some()
                && Instant::now() > deadline + Duration::from_secs(2)
            {
                // Something in the tree is unkillable for now; stop waiting for it.
                group.kill_all();
                break;
            }
        }
        child.wait()?;
        let duration = started.elapsed();
        let reports = streams.reports();
        if let Some(r) = reports.iter().find(|r| r.kind == Report::SETUP_FAILED) {
            return Err(setup_error("jail", r, &plan.ops));
        }
        let (exit_code, signal) = program_end(&reports);
        if exit_code.is_none() && signal.is_none() && ended_by.is_none() {
            let status = child
                .exit_status()
                .map_or_else(|| "unknown".to_owned(), |s| s.to_string());
            return Err(io::Error::other(format!(
                "the jail's init ended without a report (wait status {status})"
            )));
        }
        Ok(outcome(
            ended_by,
            exit_code,
            signal,
            streams.outputs,
            duration,
        ))
    }

    /// The filesystem steps of one run (allocation happens here, not in the child).
    fn plan(&self, spec: &Spec) -> io::Result<Vec<Op>> {
        if spec.argv.is_empty() {
            return Err(invalid("argv must not be empty"));
        }
        self.plan_fs(spec)
    }

    /// The filesystem steps alone (a sandbox's init builds them without a program).
    pub(crate) fn plan_fs(&self, spec: &Spec) -> io::Result<Vec<Op>> {
        self.plan_fs_on(spec, None)
    }

    /// [`Jail::plan_fs`], with `/workspace` an overlay of `workspace_lower` (a
    /// template's layer) when one is given.
    pub(crate) fn plan_fs_on(
        &self,
        spec: &Spec,
        workspace_lower: Option<&Path>,
    ) -> io::Result<Vec<Op>> {
        for f in &spec.files {
            if f.name.is_empty() || f.name.contains('/') || f.name == "." || f.name == ".." {
                return Err(invalid(&format!("bad sandbox file name `{}`", f.name)));
            }
        }
        let root = &self.mount_point;
        let at = |p: &str| cstr(root.join(p.trim_start_matches('/')).as_os_str().as_bytes());
        let limits = &spec.limits;
        let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
        let mut ops = Vec::with_capacity(64);
        let tmpfs = |dst: CString, flags: libc::c_ulong, data: String| -> io::Result<Op> {
            Ok(Op::Mount {
                src: Some(cstr(b"tmpfs")?),
                dst,
                fstype: Some(cstr(b"tmpfs")?),
                flags,
                data: Some(cstr(data.as_bytes())?),
            })
        };
        let bind_ro = |ops: &mut Vec<Op>, src: &str, dst: CString| -> io::Result<()> {
            ops.push(Op::Mount {
                src: Some(cstr(src.as_bytes())?),
                dst: dst.clone(),
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            });
            ops.push(Op::Mount {
                src: None,
                dst,
                fstype: None,
                flags: libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nosuid_nodev,
                data: None,
            });
            Ok(())
        };
        const ROOT_OPTIONS: &str = "size=1m,nr_inodes=1024,mode=0755";
        ops.push(tmpfs(at("/")?, nosuid_nodev, ROOT_OPTIONS.to_owned())?);

        // /usr, read-only, without /usr/local (the host's own additions).
        ops.push(Op::Mkdir {
            path: at("/usr")?,
            mode: 0o755,
        });
        bind_ro(&mut ops, "/usr", at("/usr")?)?;
        if Path::new("/usr/local").is_dir() {
            ops.push(tmpfs(
                at("/usr/local")?,
                libc::MS_RDONLY | nosuid_nodev,
                "size=4k,mode=0755".to_owned(),
            )?);
        }
        for (dir, kind) in &self.top_level {
            match kind {
                TopLevel::Symlink(target) => ops.push(Op::Symlink {
                    target: cstr(target.as_os_str().as_bytes())?,
                    path: at(dir)?,
                }),
                TopLevel::Directory => {
                    ops.push(Op::Mkdir {
                        path: at(dir)?,
                        mode: 0o755,
                    });
                    bind_ro(&mut ops, dir, at(dir)?)?;
                }
            }
        }

        // /etc: a handful of generated files and the loader's cache.
        ops.push(Op::Mkdir {
            path: at("/etc")?,
            mode: 0o755,
        });
        let (uid, gid, host) = (self.config.uid, self.config.gid, &self.config.hostname);
        let etc: [(&str, String); 5] = [
            (
                "/etc/passwd",
                format!(
                    "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{uid}:{gid}:sandbox:/workspace:/bin/bash\n"
                ),
            ),
            ("/etc/group", format!("root:x:0:\nsandbox:x:{gid}:\n")),
            (
                "/etc/hosts",
                format!("127.0.0.1\tlocalhost {host}\n::1\tlocalhost\n"),
            ),
            ("/etc/hostname", format!("{host}\n")),
            (
                "/etc/nsswitch.conf",
                "passwd: files\ngroup: files\nhosts: files\n".to_owned(),
            ),
        ];
        for (path, contents) in etc {
            ops.push(Op::Write {
                path: at(path)?,
                contents: contents.into_bytes(),
                mode: 0o644,
            });
        }
        for file in HOST_ETC_FILES {
            if Path::new(file).is_file() {
                ops.push(Op::Write {
                    path: at(file)?,
                    contents: Vec::new(),
                    mode: 0o644,
                });
                bind_ro(&mut ops, file, at(file)?)?;
            }
        }
        for dir in HOST_ETC_DIRS {
            if Path::new(dir).is_dir() {
                ops.push(Op::Mkdir {
                    path: at(dir)?,
                    mode: 0o755,
                });
                bind_ro(&mut ops, dir, at(dir)?)?;
            }
        }

        // /dev: the harmless character devices, descriptors, a small /dev/shm.
        ops.push(Op::Mkdir {
            path: at("/dev")?,
            mode: 0o755,
        });
        const DEV_OPTIONS: &str = "size=64k,nr_inodes=64,mode=0755";
        ops.push(tmpfs(
            at("/dev")?,
            libc::MS_NOSUID | libc::MS_NOEXEC,
            DEV_OPTIONS.to_owned(),
        )?);
        for dev in DEVICES {
            let path = format!("/dev/{dev}");
            ops.push(Op::Write {
                path: at(&path)?,
                contents: Vec::new(),
                mode: 0o666,
            });
            ops.push(Op::Mount {
                src: Some(cstr(path.as_bytes())?),
                dst: at(&path)?,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            });
        }
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            ops.push(Op::Symlink {
                target: cstr(target.as_bytes())?,
                path: at(&format!("/dev/{name}"))?,
            });
        }
        ops.push(Op::Mkdir {
            path: at("/dev/shm")?,
            mode: 0o755,
        });
        let scratch = |mode: &str, owner: bool| {
            let mut s = format!(
                "size={},nr_inodes=65536,mode={mode}",
                limits.tmpfs_bytes.max(4096)
            );
            if owner {
                s.push_str(&format!(",uid={uid},gid={gid}"));
            }
            s
        };
        ops.push(tmpfs(
            at("/dev/shm")?,
            nosuid_nodev,
            scratch("1777", false),
        )?);
        ops.push(Op::Mount {
            src: None,
            dst: at("/dev")?,
            fstype: None,
            flags: libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
            data: Some(cstr(DEV_OPTIONS.as_bytes())?),
        });

        // A fresh /proc that shows only this jail's processes, and only to their
        // owners (the jail's init is root's: invisible to the program).
        ops.push(Op::Mkdir {
            path: at("/proc")?,
            mode: 0o555,
        });
        ops.push(Op::Mount {
            src: Some(cstr(b"proc")?),
            dst: at("/proc")?,
            fstype: Some(cstr(b"proc")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: Some(cstr(b"hidepid=2")?),
        });
        bind_ro(
            &mut ops,
            &format!("{}/proc/sys", root.display()),
            at("/proc/sys")?,
        )?;

        // Writable scratch space.
        for (dir, mode, owner) in [("/tmp", "1777", false), ("/workspace", "0755", true)] {
            ops.push(Op::Mkdir {
                path: at(dir)?,
                mode: 0o755,
            });
            ops.push(tmpfs(at(dir)?, nosuid_nodev, scratch(mode, owner))?);
        }
        if let Some(lower) = workspace_lower {
            ops.extend(layer::workspace_overlay(
                &at("/workspace")?,
                lower,
                uid,
                gid,
            )?);
        }

        // E2B's programs expect a home at /home/user: the same place as /workspace.
        ops.push(Op::Mkdir {
            path: at("/home")?,
            mode: 0o755,
        });
        ops.push(Op::Symlink {
            target: cstr(b"/workspace")?,
            path: at("/home/user")?,
        });

        // /sandbox: the run's files, then read-only.
        ops.push(Op::Mkdir {
            path: at("/sandbox")?,
            mode: 0o755,
        });
        let total: usize = spec.files.iter().map(|f| f.contents.len() + 4096).sum();
        let size = spec.sandbox_dir_for_server.unwrap_or(total as u64 + 65536);
        let sandbox_options = format!("size={size},nr_inodes=1024,mode=0755");
        ops.push(tmpfs(
            at("/sandbox")?,
            nosuid_nodev,
            sandbox_options.clone(),
        )?);
        for f in &spec.files {
            ops.push(Op::Write {
                path: at(&format!("/sandbox/{}", f.name))?,
                contents: f.contents.clone(),
                mode: 0o644,
            });
        }
        if spec.sandbox_dir_for_server.is_none() {
            ops.push(Op::Mount {
                src: None,
                dst: at("/sandbox")?,
                fstype: None,
                flags: libc::MS_REMOUNT | libc::MS_RDONLY | nosuid_nodev,
                data: Some(cstr(sandbox_options.as_bytes())?),
            });
        }

        ops.push(Op::PivotRoot {
            path: cstr(root.as_os_str().as_bytes())?,
        });
        ops.push(Op::Mount {
            src: None,
            dst: cstr(b"/")?,
            fstype: None,
            flags: libc::MS_REMOUNT | libc::MS_RDONLY | nosuid_nodev,
            data: Some(cstr(ROOT_OPTIONS.as_bytes())?),
        });
        Ok(ops)
    }

    pub(crate) fn finish_plan(
        &self,
        spec: &Spec,
        ops: Vec<Op>,
        fds: ChildFds,
        netns: libc::c_int,
        mode: Mode,
    ) -> io::Result<Plan> {
        let argv = spec
            .argv
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains('=') {
                    return Err(invalid(&format!("bad environment variable name `{k}`")));
                }
                cstr(format!("{k}={v}").as_bytes())
            })
            .collect::<io::Result<Vec<_>>>()?;
        let cwd = if spec.cwd.is_empty() {
            "/workspace"
        } else {
            &spec.cwd
        };
        let l = &spec.limits;
        Ok(Plan {
            ops,
            hostname: cstr(self.config.hostname.as_bytes())?,
            cwd: cstr(cwd.as_bytes())?,
            uid: self.config.uid,
            gid: self.config.gid,
            rlimits: vec![
                (libc::RLIMIT_FSIZE, l.file_size_bytes),
                (libc::RLIMIT_NOFILE, l.open_files),
                (libc::RLIMIT_CORE, 0),
            ],
            filter: self.filter.clone(),
            argv_ptrs: Plan::pointers(&argv),
            envp_ptrs: Plan::pointers(&envp),
            argv,
            envp,
            fds,
            netns,
            mode,
            // Set by the zygote, which is the parent.
            parent: -1,
        })
    }
}

/// The six pipes between the server and a jail's child, `(read end, write end)`.
pub(crate) struct Pipes {
    stdin: (OwnedFd, OwnedFd),
    stdout: (OwnedFd, OwnedFd),
    stderr: (OwnedFd, OwnedFd),
    result: (OwnedFd, OwnedFd),
    report: (OwnedFd, OwnedFd),
    go: (OwnedFd, OwnedFd),
}

/// The server's ends, once the child holds its own.
pub(crate) struct ServerEnds {
    pub(crate) stdin: OwnedFd,
    /// stdout, stderr, result, report.
    pub(crate) readers: [OwnedFd; 4],
    pub(crate) go: OwnedFd,
}

impl Pipes {
    pub(crate) fn new() -> io::Result<Pipes> {
        Ok(Pipes {
            stdin: pipe()?,
            stdout: pipe()?,
            stderr: pipe()?,
            result: pipe()?,
            report: pipe()?,
            go: pipe()?,
        })
    }

    /// The child's ends, as numbered here (the plan carries them across the clone).
    pub(crate) fn child_fds(&self) -> ChildFds {
        ChildFds {
            stdin: self.stdin.0.as_raw_fd(),
            stdout: self.stdout.1.as_raw_fd(),
            stderr: self.stderr.1.as_raw_fd(),
            result: self.result.1.as_raw_fd(),
            report: self.report.1.as_raw_fd(),
            go: self.go.0.as_raw_fd(),
        }
    }

    /// After the clone: closes the child's ends here (only the child holds them
    /// now), keeps the server's.
    pub(crate) fn into_server_ends(self) -> ServerEnds {
        ServerEnds {
            stdin: self.stdin.1,
            readers: [self.stdout.0, self.stderr.0, self.result.0, self.report.0],
            go: self.go.1,
        }
    }
}

/// The namespaces a jail's init is cloned into (network only when no ready one
/// is joined instead).
pub(crate) fn namespace_flags(new_network: bool) -> libc::c_int {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if new_network {
        flags | libc::CLONE_NEWNET
    } else {
        flags
    }
}

/// The error for a child that reported a failed setup step.
pub(crate) fn setup_error(what: &str, r: &Report, ops: &[Op]) -> io::Error {
    let step = usize::try_from(r.stage)
        .ok()
        .and_then(|i| ops.get(i))
        .map_or_else(
            || Stage::describe(r.stage).to_owned(),
            |op| format!("{op:?}"),
        );
    io::Error::other(format!(
        "{what} setup failed ({step}): {}",
        io::Error::from_raw_os_error(r.errno)
    ))
}

/// The program's exit code or signal, from its reported wait status.
pub(crate) fn program_end(reports: &[Report]) -> (Option<i32>, Option<i32>) {
    match reports.iter().find(|r| r.kind == Report::EXITED) {
        Some(r) if libc::WIFEXITED(r.status) => (Some(libc::WEXITSTATUS(r.status)), None),
        Some(r) if libc::WIFSIGNALED(r.status) => (None, Some(libc::WTERMSIG(r.status))),
        _ => (None, None),
    }
}

/// A run's outcome: how it ended (the jail's own reason first), and its output.
pub(crate) fn outcome(
    ended_by: Option<Status>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    [out, err, res]: [Captured; 3],
    duration: Duration,
) -> Outcome {
    let status = match (ended_by, exit_code, signal) {
        (Some(s), _, _) => s,
        (None, Some(code), _) => Status::Exited(code),
        (None, None, Some(sig)) => Status::Signaled(sig),
        (None, None, None) => Status::Signaled(libc::SIGKILL),
    };
    Outcome {
        status,
        exit_code,
        signal,
        truncated: out.truncated || err.truncated,
        stdout: out.data,
        stderr: err.data,
        result: (!res.truncated && !res.data.is_empty()).then_some(res.data),
        duration,
        cpu_time: Duration::ZERO,
    }
}

pub(crate) fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned())
}

pub(crate) fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| invalid("a string passed to the jail contains NUL"))
}

/// `(read end, write end)`, both close-on-exec.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn write_all(fd: &OwnedFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writes from a live slice.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an owned fd.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A process the zygote cloned for this server (a jail's init, an exec's
/// helper), killed, waited for and released whatever happens.
///
/// The zygote is its parent and keeps it, once exited, as a zombie until this
/// value is dropped (see [`zygote`]): until then its pid names this process and
/// no other, as for a child of our own.
#[derive(Debug)]
pub(crate) struct Child {
    pub(crate) pid: libc::pid_t,
    /// Refers to the process whatever becomes of its pid; readable once it has
    /// exited.
    pidfd: OwnedFd,
    /// The zygote that cloned it, which reaps it when it is released.
    generation: u64,
    /// Seen exited.
    exited: bool,
}

impl Child {
    pub(crate) fn new(pid: libc::pid_t, pidfd: OwnedFd, generation: u64) -> Child {
        Child {
            pid,
            pidfd,
            generation,
            exited: false,
        }
    }

    /// Killing the PID namespace's init kills every process in the namespace.
    pub(crate) fn kill(&self) {
        if !self.exited {
            fd::signal_pidfd(&self.pidfd, libc::SIGKILL);
        }
    }

    /// Waits until the process has exited. The init of a PID namespace exits
    /// only once every other process of its namespace has.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        while !self.exited {
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd; a pidfd is readable once its process exited.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r > 0 {
                self.exited = true;
            } else if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Whether the process has exited, without waiting.
    pub(crate) fn has_exited(&mut self) -> bool {
        if !self.exited && zygote::readable(&self.pidfd) {
            self.exited = true;
        }
        self.exited
    }

    /// The wait status of the exited process, as its zombie tells it
    /// (`/proc/<pid>/stat`, last field), for error messages.
    pub(crate) fn exit_status(&self) -> Option<i32> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .last()?
            .parse()
            .ok()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.exited {
            self.kill();
            let _ = self.wait();
        }
        zygote::release(self.generation, self.pid);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Captured {
    pub(crate) data: Vec<u8>,
    pub(crate) truncated: bool,
}

/// stdin to feed, stdout/stderr/result/report to drain.
pub(crate) struct Streams<'a> {
    stdin: Option<OwnedFd>,
    stdin_rest: &'a [u8],
    /// Sees stdout and stderr as they come (what is kept, up to the cap); `false`
    /// from it means nobody is listening any more.
    sink: Option<&'a mut Sink<'a>>,
    /// The sink said stop.
    pub(crate) abandoned: bool,
    /// stdout, stderr, result, report; `None` once at end of file.
    pub(crate) readers: [Option<OwnedFd>; 4],
    pub(crate) outputs: [Captured; 3],
    report: Vec<u8>,
    cap: usize,
    pub(crate) over_cap: bool,
}

impl<'a> Streams<'a> {
    pub(crate) fn new(
        stdin: OwnedFd,
        input: &'a [u8],
        readers: [OwnedFd; 4],
        cap: usize,
    ) -> io::Result<Streams<'a>> {
        set_nonblocking(&stdin)?;
        for r in &readers {
            set_nonblocking(r)?;
        }
        Ok(Streams {
            stdin: (!input.is_empty()).then_some(stdin),
            stdin_rest: input,
            sink: None,
            abandoned: false,
            readers: readers.map(Some),
            outputs: Default::default(),
            report: Vec::new(),
            cap,
            over_cap: false,
        })
    }

    pub(crate) fn done(&self) -> bool {
        self.readers.iter().all(Option::is_none)
    }

    /// Waits up to `timeout` for any stream; returns whether anything moved.
    pub(crate) fn poll(&mut self, timeout: Duration) -> io::Result<bool> {
        let mut pfds = Vec::with_capacity(5);
        let mut which = Vec::with_capacity(5);
        for (i, r) in self.readers.iter().enumerate() {
            if let Some(fd) = r {
                pfds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        if let Some(fd) = &self.stdin {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
            which.push(usize::MAX);
        }
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: pfds is a live array of pollfd of the given length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(false);
        }
        for (p, &i) in pfds.iter().zip(&which) {
            if p.revents == 0 {
                continue;
            }
            if i == usize::MAX {
                self.feed_stdin();
            } else {
                self.drain(i);
            }
        }
        Ok(true)
    }

    fn feed_stdin(&mut self) {
        let Some(fd) = &self.stdin else { return };
        // SAFETY: writes from a live slice to an owned non-blocking fd.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                self.stdin_rest.as_ptr().cast(),
                self.stdin_rest.len().min(1 << 16),
            )
        };
        if n > 0 {
            self.stdin_rest = &self.stdin_rest[n as usize..];
        }
        let would_block = n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        // Everything written, or the program closed its stdin (EPIPE): close ours.
        if self.stdin_rest.is_empty() || (n < 0 && !would_block) {
            self.stdin = None;
        }
    }

    fn drain(&mut self, i: usize) {
        let Some(fd) = &self.readers[i] else { return };
        let mut buf = [0u8; 64 * 1024];
        loop {
            // SAFETY: reads into a live stack buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                self.readers[i] = None;
                return;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.readers[i] = None;
                    }
                    return;
                }
                continue;
            }
            let chunk = &buf[..n as usize];
            if i == 3 {
                self.report.extend_from_slice(chunk);
                continue;
            }
            let out = &mut self.outputs[i];
            let room = self.cap.saturating_sub(out.data.len());
            let kept = &chunk[..chunk.len().min(room)];
            out.data.extend_from_slice(kept);
            if let (Some(sink), false) = (self.sink.as_mut(), kept.is_empty() || i > 1) {
                let stream = if i == 0 {
                    OutputStream::Stdout
                } else {
                    OutputStream::Stderr
                };
                if !sink(stream, kept) {
                    self.abandoned = true;
                }
            }
            if chunk.len() > room {
                out.truncated = true;
                // stdout and stderr over the cap end the run; a too-large result
                // is only dropped.
                if i < 2 {
                    self.over_cap = true;
                }
            }
        }
    }

    /// Asks the sink whether anyone still listens (an empty chunk).
    pub(crate) fn check_sink(&mut self) {
        if let Some(sink) = self.sink.as_mut()
            && !sink(OutputStream::Stdout, &[])
        {
            self.abandoned = true;
        }
    }

    pub(crate) fn with_sink(
        mut self,
        sink: &'a mut dyn FnMut(OutputStream, &[u8]) -> bool,
    ) -> Self {
        self.sink = Some(sink);
        self
    }

    pub(crate) fn reports(&self) -> Vec<Report> {
        self.report
            .chunks_exact(Report::SIZE)
            .map(|c| Report::from_bytes(c.try_into().expect("exact chunk")))
            .collect()
    }
}
