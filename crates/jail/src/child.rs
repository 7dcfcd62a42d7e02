//! What runs between `clone` and `execve`.
//!
//! The clone is made by the [`zygote`](crate::zygote), a single-threaded copy
//! of the server, but the discipline is the one a child of a multi-threaded
//! process needs, and it is kept: the child does not allocate or take any lock,
//! nor call a C library function that assumes it knows the process's threads
//! (the set*id family): raw system calls instead. Everything it needs — paths,
//! mount options, file contents, argv, envp, the seccomp program — is prepared by
//! the server as a [`Plan`] (rebuilt by the zygote from its wire form), and the
//! child only reads it and makes system calls. Failures are reported on a pipe as
//! a fixed-size record.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_ulong, c_void};
use std::ptr;

/// One filesystem step, carried out in order inside the new mount namespace.
#[derive(Debug)]
pub(crate) enum Op {
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: c_ulong,
        data: Option<CString>,
    },
    Mkdir {
        path: CString,
        mode: u32,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    /// Creates a file with these contents (also used for empty bind targets).
    Write {
        path: CString,
        contents: Vec<u8>,
        mode: u32,
    },
    /// Gives `path` (not following a final symlink) to this owner.
    Chown {
        path: CString,
        uid: u32,
        gid: u32,
    },
    /// Makes `path` the root and detaches the old one.
    PivotRoot {
        path: CString,
    },
}

/// Everything the child needs, prepared by the server.
#[derive(Debug)]
pub(crate) struct Plan {
    pub ops: Vec<Op>,
    pub hostname: CString,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    pub filter: Vec<libc::sock_filter>,
    /// Kept alive for the pointers in `argv_ptrs` and `envp_ptrs` (and sent to
    /// the zygote as strings).
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub argv_ptrs: Vec<*const c_char>,
    pub envp_ptrs: Vec<*const c_char>,
    pub fds: ChildFds,
    /// A ready network namespace to join, or -1 to bring up the one of the clone.
    pub netns: c_int,
    pub mode: Mode,
    /// A pidfd of the process that clones the child (the zygote), or -1: the
    /// child checks that its parent still lives once its parent-death signal is
    /// set, so that a parent dying just before cannot leave it unattached.
    pub parent: c_int,
}

impl Plan {
    /// The NULL-terminated array of pointers `execve` takes, into `strings`
    /// (which must outlive it: the plan keeps both).
    pub(crate) fn pointers(strings: &[CString]) -> Vec<*const c_char> {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(ptr::null()))
            .collect()
    }
}

/// What the cloned child is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Build the jail, run one program, end with it.
    OneShot,
    /// Build the jail, report ready, then only reap until killed.
    SandboxInit,
    /// Join an existing sandbox's namespaces (ipc, uts, net, cgroup, pid, mnt)
    /// and run one program there.
    Enter([c_int; 6]),
}

/// The child's ends of the pipes, as numbered in the parent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildFds {
    pub stdin: c_int,
    pub stdout: c_int,
    pub stderr: c_int,
    pub result: c_int,
    pub report: c_int,
    pub go: c_int,
}

/// A record on the report pipe.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Report {
    pub kind: u32,
    /// For [`Report::SETUP_FAILED`]: the op index, or a negative [`Stage`].
    pub stage: i32,
    pub errno: i32,
    /// For [`Report::EXITED`]: the wait status of the program.
    pub status: i32,
}

impl Report {
    pub const SETUP_FAILED: u32 = 1;
    pub const EXITED: u32 = 2;
    /// A sandbox's init has built the jail.
    pub const READY: u32 = 3;
    /// An entered program started; `status` is its pid (as the server sees it).
    pub const STARTED: u32 = 4;
    pub const SIZE: usize = size_of::<Report>();

    pub(crate) fn from_bytes(b: &[u8; Report::SIZE]) -> Report {
        let word = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        Report {
            kind: u32::from_ne_bytes(word(0)),
            stage: i32::from_ne_bytes(word(4)),
            errno: i32::from_ne_bytes(word(8)),
            status: i32::from_ne_bytes(word(12)),
        }
    }
}

/// Setup steps that are not ops, as reported in [`Report::stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Stage {
    Go = -1,
    CgroupNamespace = -2,
    MakePrivate = -3,
    Hostname = -4,
    Loopback = -5,
    Fork = -6,
    Fds = -7,
    Rlimit = -8,
    Chdir = -9,
    NoNewPrivs = -10,
    Identity = -11,
    Capabilities = -12,
    Seccomp = -13,
    Exec = -14,
    Enter = -15,
}

impl Stage {
    pub(crate) fn describe(stage: i32) -> &'static str {
        match stage {
            -1 => "waiting for the parent",
            -2 => "creating the cgroup namespace",
            -3 => "making mounts private",
            -4 => "setting the hostname",
            -5 => "bringing up loopback",
            -6 => "forking the program",
            -7 => "arranging file descriptors",
            -8 => "setting resource limits",
            -9 => "entering the working directory",
            -10 => "setting no_new_privs",
            -11 => "dropping to the sandbox user",
            -12 => "dropping capabilities",
            -13 => "installing the seccomp filter",
            -14 => "starting the program",
            -15 => "entering the sandbox's namespaces",
            _ => "mounting",
        }
    }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes a failure record and exits. Never returns.
fn fail(report: c_int, stage: i32) -> ! {
    let r = Report {
        kind: Report::SETUP_FAILED,
        stage,
        errno: errno(),
        status: 0,
    };
    send(report, &r);
    // SAFETY: _exit ends the process without running atexit handlers or touching
    // state shared with the parent's other threads.
    unsafe { libc::_exit(126) }
}

fn send(fd: c_int, r: &Report) {
    // SAFETY: `r` is a plain repr(C) value of Report::SIZE bytes; a short or failed
    // write only loses the report, which the parent treats as a setup failure.
    unsafe { libc::write(fd, ptr::from_ref(r).cast::<c_void>(), Report::SIZE) };
}

fn check(ret: c_int, report: c_int, stage: i32) {
    if ret < 0 {
        fail(report, stage);
    }
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(ptr::null(), |s| s.as_ptr())
}

/// The jail's init: pid 1 of the new PID namespace. Builds the filesystem, forks
/// the program, reaps every process, and reports the program's wait status.
/// When it returns... it does not: it exits, and the kernel kills whatever is left
/// in the namespace.
///
/// # Safety
/// Must be called only in the child of a `clone` with new mount, PID, network, IPC
/// and UTS namespaces, once, with a plan prepared by the server.
pub(crate) unsafe fn init(plan: &Plan) -> ! {
    let report = plan.fds.report;
    // SAFETY: (whole function) only system calls on memory owned by `plan` or the
    // stack; no allocation, no locks.
    unsafe {
        prologue(plan);
        if plan.netns >= 0 {
            check(
                libc::setns(plan.netns, libc::CLONE_NEWNET),
                report,
                Stage::Loopback as i32,
            );
        }
        check(
            libc::unshare(libc::CLONE_NEWCGROUP),
            report,
            Stage::CgroupNamespace as i32,
        );
        close_all_but(&[
            plan.fds.stdin,
            plan.fds.stdout,
            plan.fds.stderr,
            plan.fds.result,
            plan.fds.report,
        ]);
        build(plan);
        if plan.mode == Mode::SandboxInit {
            send(
                report,
                &Report {
                    kind: Report::READY,
                    ..Report::default()
                },
            );
            for fd in [
                plan.fds.stdin,
                plan.fds.stdout,
                plan.fds.stderr,
                plan.fds.result,
                plan.fds.report,
            ] {
                libc::close(fd);
            }
            reap_forever();
        }
        run_and_report(plan, report);
    }
}

/// Signal state, parent-death signal, non-dumpable, the wait for the server's
/// go (sent once the child is in its cgroups), and the check that the parent
/// (the zygote) still lives.
///
/// # Safety
/// Child only.
unsafe fn prologue(plan: &Plan) {
    let report = plan.fds.report;
    // SAFETY: system calls on the stack and plan-owned fds only.
    unsafe {
        // Signals: default dispositions (the server ignores SIGPIPE and has handlers),
        // nothing blocked. 32 and 33 belong to the C library and refuse; fine.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // If the zygote dies (it dies with the server), so does the jail. Nobody
        // may read our memory (it is a copy of the zygote's, so of the server's).
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);

        // Wait until the server has put us in our cgroups.
        let mut byte = 0u8;
        if libc::read(plan.fds.go, ptr::from_mut(&mut byte).cast(), 1) != 1 {
            fail(report, Stage::Go as i32);
        }
        libc::close(plan.fds.go);

        // A parent that died before the parent-death signal was set did not
        // send it: then stop here. (getppid cannot tell: it is 0 in a new PID
        // namespace.) A pidfd is readable once its process has exited.
        if plan.parent >= 0 {
            let mut pfd = libc::pollfd {
                fd: plan.parent,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut pfd, 1, 0) != 0 {
                fail(report, Stage::Go as i32);
            }
        }
    }
}

/// The jail's filesystem, hostname and loopback.
///
/// # Safety
/// Child only, in its new mount and UTS namespaces.
unsafe fn build(plan: &Plan) {
    let report = plan.fds.report;
    // SAFETY: system calls on plan-owned memory only.
    unsafe {
        check(
            libc::mount(
                ptr::null(),
                c"/".as_ptr(),
                ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                ptr::null(),
            ),
            report,
            Stage::MakePrivate as i32,
        );
        for (i, op) in plan.ops.iter().enumerate() {
            let stage = i32::try_from(i).unwrap_or(i32::MAX);
            run_op(op, report, stage);
        }
        let hostname = plan.hostname.as_bytes();
        check(
            libc::sethostname(hostname.as_ptr().cast(), hostname.len()),
            report,
            Stage::Hostname as i32,
        );
        if plan.netns < 0 {
            loopback_up(report);
        }
    }
}

/// Forks the program, reaps every child, reports the program's wait status, exits.
///
/// # Safety
/// Child only.
unsafe fn run_and_report(plan: &Plan, report: c_int) -> ! {
    // SAFETY: system calls on plan-owned memory and the stack only.
    unsafe {
        let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as c_ulong, 0, 0, 0, 0);
        if pid < 0 {
            fail(report, Stage::Fork as i32);
        }
        if pid == 0 {
            program(plan);
        }
        let program_pid = pid as libc::pid_t;
        for fd in [
            plan.fds.stdin,
            plan.fds.stdout,
            plan.fds.stderr,
            plan.fds.result,
        ] {
            libc::close(fd);
        }
        if matches!(plan.mode, Mode::Enter(_)) {
            send(
                report,
                &Report {
                    kind: Report::STARTED,
                    status: program_pid,
                    ..Report::default()
                },
            );
        }
        loop {
            let mut status: c_int = 0;
            let reaped = libc::waitpid(-1, &mut status, libc::__WALL);
            if reaped == program_pid {
                send(
                    report,
                    &Report {
                        kind: Report::EXITED,
                        stage: 0,
                        errno: 0,
                        status,
                    },
                );
                libc::_exit(0);
            }
            if reaped < 0 && errno() != libc::EINTR {
                libc::_exit(1);
            }
        }
    }
}

/// A sandbox's init after setup: reaps orphans until the sandbox is killed.
///
/// # Safety
/// Child only.
unsafe fn reap_forever() -> ! {
    // SAFETY: signal mask and waits on the stack only.
    unsafe {
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, ptr::null_mut());
        loop {
            let mut status: c_int = 0;
            while libc::waitpid(-1, &mut status, libc::__WALL | libc::WNOHANG) > 0 {}
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(&chld, &mut info);
        }
    }
}

/// Runs one program inside an existing sandbox: joins its namespaces (the PID
/// namespace takes effect for the forked program), then as [`init`] does for a
/// one-shot run, reporting the program's pid first.
///
/// # Safety
/// Only in the child of a plain `clone`, with `plan.mode` = [`Mode::Enter`].
pub(crate) unsafe fn enter(plan: &Plan) -> ! {
    let report = plan.fds.report;
    let Mode::Enter(ns) = plan.mode else {
        fail(report, Stage::Enter as i32)
    };
    // SAFETY: system calls on plan-owned memory and the stack only.
    unsafe {
        prologue(plan);
        for fd in ns {
            check(libc::setns(fd, 0), report, Stage::Enter as i32);
        }
        close_all_but(&[
            plan.fds.stdin,
            plan.fds.stdout,
            plan.fds.stderr,
            plan.fds.result,
            plan.fds.report,
        ]);
        run_and_report(plan, report);
    }
}

/// The program's side of the second fork: fds, limits, identity, filter, exec.
///
/// # Safety
/// As for [`init`]; called in the forked child of init only.
unsafe fn program(plan: &Plan) -> ! {
    let report = plan.fds.report;
    // SAFETY: (whole function) system calls on plan-owned memory and the stack only.
    unsafe {
        libc::setsid();
        // Move every fd above the targets first, so no dup2 overwrites a source.
        let sources = [
            plan.fds.stdin,
            plan.fds.stdout,
            plan.fds.stderr,
            plan.fds.result,
            plan.fds.report,
        ];
        let mut high = [0 as c_int; 5];
        for (h, fd) in high.iter_mut().zip(sources) {
            *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            check(*h, report, Stage::Fds as i32);
        }
        for (target, fd) in high.iter().take(4).enumerate() {
            check(libc::dup2(*fd, target as c_int), report, Stage::Fds as i32);
        }
        let report = libc::dup3(high[4], 4, libc::O_CLOEXEC);
        if report < 0 {
            fail(high[4], Stage::Fds as i32);
        }
        libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32);

        for &(resource, value) in &plan.rlimits {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            check(
                libc::setrlimit(resource, &lim),
                report,
                Stage::Rlimit as i32,
            );
        }
        check(libc::chdir(plan.cwd.as_ptr()), report, Stage::Chdir as i32);
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            report,
            Stage::NoNewPrivs as i32,
        );
        // Empty the bounding set while we still may, then become the sandbox user:
        // leaving uid 0 clears the permitted, effective and ambient sets.
        for cap in 0..=63 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        // Raw system calls, not the C library's wrappers: those broadcast the change
        // to every thread the library believes exists, and in a child of a
        // multi-threaded clone that list is stale (and its lock may be held).
        for (nr, a, b, c) in [
            (libc::SYS_setgroups, 0, 0, 0),
            (libc::SYS_setresgid, plan.gid, plan.gid, plan.gid),
            (libc::SYS_setresuid, plan.uid, plan.uid, plan.uid),
        ] {
            let ret = libc::syscall(nr, a as libc::c_long, b as libc::c_long, c as libc::c_long);
            check(ret as c_int, report, Stage::Identity as i32);
        }
        drop_capabilities(report);
        let prog = libc::sock_fprog {
            len: plan.filter.len() as u16,
            filter: plan.filter.as_ptr().cast_mut(),
        };
        check(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                ptr::from_ref(&prog),
                0,
                0,
            ),
            report,
            Stage::Seccomp as i32,
        );
        libc::execve(
            plan.argv[0].as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        fail(report, Stage::Exec as i32);
    }
}

/// # Safety
/// Child only; pointers come from the plan.
unsafe fn run_op(op: &Op, report: c_int, stage: i32) {
    // SAFETY: every pointer is a NUL-terminated string owned by the plan.
    unsafe {
        match op {
            Op::Mount {
                src,
                dst,
                fstype,
                flags,
                data,
            } => check(
                libc::mount(
                    opt_ptr(src),
                    dst.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                ),
                report,
                stage,
            ),
            Op::Mkdir { path, mode } => {
                if libc::mkdir(path.as_ptr(), *mode) < 0 && errno() != libc::EEXIST {
                    fail(report, stage);
                }
            }
            Op::Symlink { target, path } => {
                check(libc::symlink(target.as_ptr(), path.as_ptr()), report, stage);
            }
            Op::Write {
                path,
                contents,
                mode,
            } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    *mode,
                );
                check(fd, report, stage);
                let mut rest: &[u8] = contents;
                while !rest.is_empty() {
                    let n = libc::write(fd, rest.as_ptr().cast(), rest.len());
                    if n <= 0 {
                        fail(report, stage);
                    }
                    rest = &rest[n as usize..];
                }
                libc::close(fd);
            }
            Op::Chown { path, uid, gid } => {
                check(libc::lchown(path.as_ptr(), *uid, *gid), report, stage);
            }
            Op::PivotRoot { path } => {
                check(libc::chdir(path.as_ptr()), report, stage);
                let dot: &CStr = c".";
                check(
                    libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as c_int,
                    report,
                    stage,
                );
                check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH), report, stage);
                check(libc::chdir(c"/".as_ptr()), report, stage);
            }
        }
    }
}

/// Closes every fd above 2 except `keep`.
///
/// # Safety
/// Child only.
unsafe fn close_all_but(keep: &[c_int; 5]) {
    let mut sorted = *keep;
    sorted.sort_unstable();
    let mut from: u32 = 3;
    for fd in sorted {
        let fd = fd as u32;
        if fd > from {
            // SAFETY: closing fds has no memory effects.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
pub(crate) struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    pub(crate) fn loopback() -> IfReqFlags {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..2].copy_from_slice(b"lo");
        req
    }
}

/// # Safety
/// Child only.
unsafe fn loopback_up(report: c_int) {
    // SAFETY: a socket, two ioctls on a stack struct of the kernel's layout.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(sock, report, Stage::Loopback as i32);
        let mut req = IfReqFlags::loopback();
        check(
            libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req),
            report,
            Stage::Loopback as i32,
        );
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req),
            report,
            Stage::Loopback as i32,
        );
        libc::close(sock);
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears every capability set (after the uid change they should already be empty;
/// this makes it so regardless of securebits).
///
/// # Safety
/// Child only.
unsafe fn drop_capabilities(report: c_int) {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads the header and two data structs of the kernel's layout.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(ret as c_int, report, Stage::Capabilities as i32);
    // SAFETY: no memory effects.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
}
