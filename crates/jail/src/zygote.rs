//! The zygote: a small single-threaded process that makes every clone of the
//! jail, so that the server never does.
//!
//! A clone without `CLONE_VM` marks every private page of the cloning process
//! copy-on-write. Made from the server — a large multi-threaded process — each
//! one would cost the server a page fault on the first write to each page
//! afterwards, and on every such fault a TLB shootdown of the other CPUs running
//! server threads (inter-processor interrupts; VM exits in a VM), and a sandbox
//! init, a long-lived copy, would keep the server's pages shared for its life.
//! So the server forks one helper once, early (when [`crate::Jail::new`] first
//! runs, or before that from [`crate::start_zygote`]), while its heap is small,
//! and from then on asks it for every clone: a jail's init (one-shot runs and
//! sandboxes) and an exec's helper. The zygote's own address space is small and
//! has one thread, so its clones are cheap and fault nobody else.
//!
//! **The exchange.** A Unix stream socketpair made before the fork, nothing on
//! the filesystem: the server writes a [`Plan`] ([`wire`]) with the descriptors
//! the child needs (`SCM_RIGHTS`: its pipe ends, the network namespace, the
//! namespaces to enter); the zygote rebuilds the plan, clones the child exactly
//! as the server did (same flags, the same [`child::init`] / [`child::enter`]),
//! closes every descriptor it received, and answers with the child's pid (the
//! zygote is in the server's PID namespace: the same number) and a pidfd of it,
//! or the clone's errno. Requests are made one at a time, under a lock.
//!
//! **Parentage.** The zygote is the parent of every child. It does not reap them
//! on its own: an exited child stays a zombie until the server *releases* it
//! (when its [`Child`] is dropped), so a child's pid names that process, and no
//! other, for as long as the server holds it (cgroup attach, `/proc/<pid>`,
//! priority), exactly as when the server was the parent. The server waits with
//! the pidfd (readable once the child has exited) and kills through it.
//!
//! **Death.** The zygote has `PR_SET_PDEATHSIG` `SIGKILL`; its parent is a
//! keeper thread of the server that only waits for it (a parent-death signal
//! follows the *thread* that forked), so it dies with the server, `kill -9`
//! included; it also exits at the socket's end of file. Every child has
//! `PR_SET_PDEATHSIG` `SIGKILL` towards the zygote's one thread, and checks
//! after setting it that the zygote still lives (see [`child`]): so the server's
//! death takes down the zygote and, with it, every jail. A zygote that dies
//! while the server lives takes its jails down too; the server notices (the
//! zygote's pidfd is readable, or the socket fails) and starts another on the
//! next request; a request in flight then fails with an error naming the
//! zygote. One that does not answer within [`ANSWER_TIMEOUT`] is killed.
//!
//! **What the zygote holds.** Its socket, `/dev/null` as standard streams (so no
//! jail holds the server's), a pidfd of itself, and, during one request only, the
//! descriptors of that request: nothing of any sandbox between requests. It
//! ignores terminal and termination signals (the server decides when to stop).
//! Between fork and exit it allocates (glibc's `fork` makes `malloc` safe in the
//! child of a multi-threaded process) but takes no other lock, prints nothing
//! and does not panic.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_int, c_ulong};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::Child;
use crate::child::{self, Mode, Plan};

mod wire;

/// A request: clone a child from the plan that follows.
const CLONE: u32 = 1;
/// A request: these exited children (pids) may be reaped. No answer.
const RELEASE: u32 = 2;
/// The largest plan sent (its files included).
const MAX_BODY: usize = 256 << 20;
/// A zygote that takes longer than this to read a request or answer it is
/// considered hung, and killed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The zygote's end of the socket.
const SOCKET: c_int = 3;

/// The running zygote, if any.
static ZYGOTE: Mutex<Option<Conn>> = Mutex::new(None);
/// Numbers zygotes, so that a child is only ever released to its own parent.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The server's side of one zygote.
#[derive(Debug)]
struct Conn {
    sock: OwnedFd,
    /// The zygote itself: readable once it has died; a way to kill it.
    pidfd: OwnedFd,
    generation: u64,
}

/// Starts the zygote now if it is not running (root only). Called by
/// [`crate::Jail::new`]; a server may call it earlier, before its heap grows
/// (the zygote is a copy of the server as it is at that moment).
pub fn start() -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the jail needs root to create namespaces and cgroups",
        ));
    }
    connected(&mut lock()).map(|_| ())
}

fn lock() -> MutexGuard<'static, Option<Conn>> {
    ZYGOTE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live zygote, started (again) when there is none.
fn connected(slot: &mut Option<Conn>) -> io::Result<&Conn> {
    if slot.as_ref().is_some_and(Conn::exited) {
        // It died (and its jails with it); its keeper thread reaps it.
        *slot = None;
    }
    match slot {
        Some(conn) => Ok(conn),
        None => Ok(slot.insert(Conn::start()?)),
    }
}

/// Has the zygote clone a child from `plan` into the namespaces of `flags`
/// (none for an exec's helper).
pub(crate) fn clone(plan: &Plan, flags: c_int) -> io::Result<Child> {
    let (body, fds) = wire::encode(plan, flags);
    if body.len() > MAX_BODY {
        return Err(crate::invalid("the files of this run are too large"));
    }
    let mut slot = lock();
    let conn = connected(&mut slot)?;
    let generation = conn.generation;
    let answer = conn.send(CLONE, &body, &fds).and_then(|()| conn.answer());
    let (pid, pidfd) = match answer {
        Ok((pid, Some(pidfd))) if pid > 0 => (pid, pidfd),
        Ok((errno, None)) if errno < 0 => return Err(io::Error::from_raw_os_error(-errno)),
        Ok(_) => {
            conn.kill();
            *slot = None;
            return Err(io::Error::other("the jail's zygote answered nonsense"));
        }
        Err(e) => {
            // Dead, or hung: kill it either way; the next request starts another.
            conn.kill();
            *slot = None;
            return Err(io::Error::new(
                e.kind(),
                format!("the jail's zygote failed: {e}"),
            ));
        }
    };
    drop(slot);
    Ok(Child::new(pid, pidfd, generation))
}

/// Lets the zygote of `generation` reap its exited child `pid`. The zygote
/// that cloned it may have died since (its children were then reaped by the
/// system): then there is nothing to do.
pub(crate) fn release(generation: u64, pid: libc::pid_t) {
    let slot = lock();
    if let Some(conn) = slot.as_ref()
        && conn.generation == generation
    {
        // A zygote that cannot be written to is dead or hung: the next clone
        // finds out and replaces it.
        let _ = conn.send(RELEASE, &pid.to_ne_bytes(), &[]);
    }
}

impl Conn {
    /// Forks a zygote from a new keeper thread.
    fn start() -> io::Result<Conn> {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
        let (ours, theirs) = socketpair()?;
        let server = std::process::id();
        let (started_tx, started) = mpsc::channel();
        std::thread::Builder::new()
            .name("sandgate-zygote".into())
            .spawn(move || keep(theirs, server, &started_tx))?;
        let pidfd = started
            .recv()
            .map_err(|_| io::Error::other("the zygote's keeper thread died"))??;
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            set_timeout(&ours, option, ANSWER_TIMEOUT)?;
        }
        Ok(Conn {
            sock: ours,
            pidfd,
            generation,
        })
    }

    fn exited(&self) -> bool {
        readable(&self.pidfd)
    }

    fn kill(&self) {
        crate::fd::signal_pidfd(&self.pidfd, libc::SIGKILL);
    }

    /// A request: its kind, the length of its body, the body; `fds` with it.
    fn send(&self, kind: u32, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&kind.to_ne_bytes());
        header[4..].copy_from_slice(&(body.len() as u32).to_ne_bytes());
        let sent = send_with_fds(self.sock.as_raw_fd(), &[&header, body], fds)?;
        let mut rest = sent.saturating_sub(header.len());
        if sent < header.len() {
            send_all(self.sock.as_raw_fd(), &header[sent..])?;
            rest = 0;
        }
        send_all(self.sock.as_raw_fd(), &body[rest..])
    }

    /// The answer to a clone: the pid, or minus the errno; the child's pidfd.
    fn answer(&self) -> io::Result<(i32, Option<OwnedFd>)> {
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        if !recv_with_fds(self.sock.as_raw_fd(), &mut buf, &mut fds)? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "it died (end of file)",
            ));
        }
        let pid = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
        Ok((pid, fds.into_iter().next()))
    }
}

/// The keeper thread: forks the zygote, then waits for it to end, and reaps it.
/// It lives exactly as long as the zygote: a parent-death signal fires when the
/// thread that forked exits, not only the process.
fn keep(theirs: OwnedFd, server: u32, started: &mpsc::Sender<io::Result<OwnedFd>>) {
    // SAFETY: a fork of a multi-threaded process. The child (the zygote) runs
    // only `serve`, which never returns and uses nothing another thread could
    // have held at the fork but `malloc`, which glibc's `fork` leaves usable.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the fork's child; `theirs` is our end of the socket.
        unsafe { serve(theirs.as_raw_fd(), server) };
    }
    drop(theirs);
    if pid < 0 {
        let _ = started.send(Err(io::Error::last_os_error()));
        return;
    }
    // SAFETY: pidfd_open of our own unreaped child: its pid cannot be reused.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: our unreaped child; it is reaped below.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = started.send(Err(e));
    } else {
        // SAFETY: a fresh fd nobody else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as c_int) };
        let _ = started.send(Ok(pidfd));
    }
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The zygote's life: set up, then answer requests until the server is gone.
///
/// # Safety
/// Only in the child of the keeper's `fork`, with `sock` its end of the socket
/// and `server` the pid of the server process.
unsafe fn serve(sock: RawFd, server: u32) -> ! {
    // SAFETY: (whole function) system calls on our own stack and descriptors,
    // and allocation; no lock but malloc's, no output, no panic.
    unsafe {
        // Die with the server; if it died before this line, now.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() as u32 != server {
            libc::_exit(0);
        }
        // Nobody may read our memory (a copy of the server's).
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        // The server's handlers would run here on its (closed) descriptors:
        // default dispositions, nothing blocked; then ignore what a terminal or
        // a service manager sends the whole group, so that the server alone
        // decides when jails end. SIGCHLD stays default: exited children wait,
        // as zombies, for the server's release. Children reset all of this.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        for sig in [
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGHUP,
            libc::SIGTERM,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Descriptors: /dev/null as 0, 1 and 2, the socket as 3, nothing else
        // of the server's (and so nothing of it in any jail).
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        let high = libc::fcntl(sock, libc::F_DUPFD_CLOEXEC, 10);
        if null < 0 || high < 0 {
            libc::_exit(1);
        }
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        if libc::dup3(high, SOCKET, libc::O_CLOEXEC) != SOCKET {
            libc::_exit(1);
        }
        libc::syscall(libc::SYS_close_range, SOCKET as u32 + 1, u32::MAX, 0u32);
        // Return the free parts of the server's heap: fewer pages to copy at
        // each clone, and fewer shared with the server. (Forked from a 65 MB
        // mostly free heap: 64 MB resident without this, 6 MB with it, and
        // execs 2.7 times faster.)
        libc::malloc_trim(0);
        // A pidfd of ourselves, for the children's check that we still live.
        let me = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) as c_int;

        let mut unreaped: Vec<libc::pid_t> = Vec::new();
        loop {
            let mut header = [0u8; 8];
            let mut fds = Vec::new();
            if !matches!(recv_with_fds(SOCKET, &mut header, &mut fds), Ok(true)) {
                // The server is gone (or broke the protocol): so are we, and
                // every child with us.
                libc::_exit(0);
            }
            let kind = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
            let len = u32::from_ne_bytes([header[4], header[5], header[6], header[7]]) as usize;
            if len > MAX_BODY {
                libc::_exit(1);
            }
            let mut body = vec![0u8; len];
            if recv_all(SOCKET, &mut body).is_err() {
                libc::_exit(0);
            }
            match kind {
                CLONE => answer_clone(&body, &fds, me),
                RELEASE => {
                    for pid in body.chunks_exact(4) {
                        unreaped.push(libc::pid_t::from_ne_bytes([pid[0], pid[1], pid[2], pid[3]]));
                    }
                }
                _ => libc::_exit(1),
            }
            // The child holds its own copies now: keep none.
            drop(fds);
            // Released children have exited: reap them. One still running (not
            // expected) is tried again after the next request.
            unreaped.retain(|&pid| {
                let mut status = 0;
                libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) == 0
            });
        }
    }
}

/// Clones the child of one plan and answers the server.
///
/// # Safety
/// Zygote only.
unsafe fn answer_clone(body: &[u8], fds: &[OwnedFd], me: c_int) {
    let mut pidfd: c_int = -1;
    let result = match wire::decode(body, fds, me) {
        None => -libc::EINVAL,
        Some((plan, flags)) => {
            // SAFETY: a fork-like clone (no shared VM, no new stack) into the
            // plan's namespaces; CLONE_PIDFD stores a pidfd of the child in
            // `pidfd` (the third argument, `parent_tid`, on x86-64 and arm64).
            // The child runs only `child::init` or `child::enter` on its copy of
            // the plan, which neither allocate nor return.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (flags | libc::CLONE_PIDFD | libc::SIGCHLD) as c_ulong,
                    0,
                    &raw mut pidfd,
                    0,
                    0,
                )
            };
            if pid == 0 {
                // SAFETY: the clone's child, in the namespaces its mode expects
                // (checked by `wire::decode`). The zygote's socket goes first:
                // only the zygote may hold it (were the zygote to die now, the
                // server must see the end of file).
                unsafe {
                    libc::close(SOCKET);
                    match plan.mode {
                        Mode::Enter(_) => child::enter(&plan),
                        Mode::OneShot | Mode::SandboxInit => child::init(&plan),
                    }
                }
            }
            if pid < 0 {
                -io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                pid as i32
            }
        }
    };
    let mut answer = [0u8; 8];
    answer[..4].copy_from_slice(&result.to_ne_bytes());
    let sent: &[RawFd] = if pidfd >= 0 { &[pidfd] } else { &[] };
    let ok = send_with_fds(SOCKET, &[&answer], sent).is_ok_and(|n| n == answer.len());
    if pidfd >= 0 {
        // SAFETY: our copy of the pidfd; the server has its own now.
        unsafe { libc::close(pidfd) };
    }
    if !ok {
        // SAFETY: the server is gone: end, and every child with us.
        unsafe { libc::_exit(0) };
    }
}

/// A connected pair of Unix stream sockets, close-on-exec.
fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_timeout(sock: &OwnedFd, option: c_int, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval of the kernel's layout.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a pidfd's process has exited (a pidfd is readable then).
pub(crate) fn readable(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, no waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

/// Room for [`wire::MAX_FDS`] descriptors of control data, suitably aligned.
#[repr(C, align(8))]
struct ControlBuffer([u8; 128]);

/// One `sendmsg` of `parts`, with `fds` attached; how many bytes went.
fn send_with_fds(sock: RawFd, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > wire::MAX_FDS {
        return Err(crate::invalid("too many descriptors for one clone"));
    }
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        })
        .collect();
    let mut control = ControlBuffer([0; 128]);
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    if !fds.is_empty() {
        let data_len = size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        msg.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: the control buffer is large enough for one header and
        // MAX_FDS descriptors (CMSG_SPACE(64) <= 128), and aligned for it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len as usize,
            );
        }
    }
    loop {
        // SAFETY: sendmsg reads the iovecs (live slices) and the control
        // buffer described by `msg`. MSG_NOSIGNAL: a closed peer is an error,
        // not a SIGPIPE.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn send_all(sock: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: send from a live slice; MSG_NOSIGNAL as above.
        let n = unsafe { libc::send(sock, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Fills `buf`, collecting the descriptors that come with its first byte
/// (close-on-exec). `false` at end of file before the first byte.
fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuffer([0; 128]);
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    let n = loop {
        // SAFETY: recvmsg writes into `buf` and the control buffer, both live
        // and of the lengths given.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, "no answer in time")
            } else {
                e
            });
        }
    };
    // SAFETY: walks the control messages recvmsg wrote; each SCM_RIGHTS
    // carries fds that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len - (data as usize - cmsg as usize);
                for i in 0..len / size_of::<c_int>() {
                    let fd = std::ptr::read_unaligned(data.cast::<c_int>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were lost on the way"));
    }
    if n == 0 {
        return Ok(false);
    }
    recv_all(sock, &mut buf[n..])?;
    Ok(true)
}

fn recv_all(sock: RawFd, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: reads into a live slice.
        let n = unsafe { libc::read(sock, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
                    }
                    _ => return Err(e),
                }
            }
            n => buf = &mut buf[n as usize..],
        }
    }
    Ok(())
}
