//! A [`Plan`] as bytes and file descriptors, from the server to the zygote.
//!
//! Plain native-endian fields and length-prefixed byte strings (both ends are
//! the same binary). Every descriptor the plan names — the child's pipe ends,
//! the network namespace, the namespaces of [`Mode::Enter`] — travels beside
//! the bytes (`SCM_RIGHTS`) and appears in them as its index in that list, or
//! -1 for none. The zygote gives it the number the descriptor received there.
//! Decoding checks every length and index and never panics: the zygote has no
//! use for a panic (it could not report it, and must not print).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::raw::c_int;

use crate::child::{ChildFds, Mode, Op, Plan};

/// The clone flags the zygote accepts (besides the ones it adds itself): the
/// namespaces a jail's init is made in.
pub(super) const NAMESPACE_FLAGS: c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET;

/// At most this many descriptors per plan (six pipe ends, a network
/// namespace, six namespaces to enter).
pub(super) const MAX_FDS: usize = 16;

/// `plan` and the namespaces to clone it into, with the descriptors to send.
pub(super) fn encode(plan: &Plan, flags: c_int) -> (Vec<u8>, Vec<RawFd>) {
    let mut w = Writer {
        buf: Vec::with_capacity(8 * 1024),
        fds: Vec::with_capacity(MAX_FDS),
    };
    w.i32(flags);
    w.u32(plan.ops.len() as u32);
    for op in &plan.ops {
        match op {
            Op::Mount {
                src,
                dst,
                fstype,
                flags,
                data,
            } => {
                w.u8(0);
                w.opt_cstr(src.as_deref());
                w.cstr(dst);
                w.opt_cstr(fstype.as_deref());
                w.u64(*flags);
                w.opt_cstr(data.as_deref());
            }
            Op::Mkdir { path, mode } => {
                w.u8(1);
                w.cstr(path);
                w.u32(*mode);
            }
            Op::Symlink { target, path } => {
                w.u8(2);
                w.cstr(target);
                w.cstr(path);
            }
            Op::Write {
                path,
                contents,
                mode,
            } => {
                w.u8(3);
                w.cstr(path);
                w.bytes(contents);
                w.u32(*mode);
            }
            Op::Chown { path, uid, gid } => {
                w.u8(4);
                w.cstr(path);
                w.u32(*uid);
                w.u32(*gid);
            }
            Op::PivotRoot { path } => {
                w.u8(5);
                w.cstr(path);
            }
        }
    }
    w.cstr(&plan.hostname);
    w.cstr(&plan.cwd);
    w.u32(plan.uid);
    w.u32(plan.gid);
    w.u32(plan.rlimits.len() as u32);
    for &(resource, value) in &plan.rlimits {
        w.u32(resource);
        w.u64(value);
    }
    w.u32(plan.filter.len() as u32);
    for f in &plan.filter {
        w.buf.extend_from_slice(&f.code.to_ne_bytes());
        w.u8(f.jt);
        w.u8(f.jf);
        w.u32(f.k);
    }
    for strings in [&plan.argv, &plan.envp] {
        w.u32(strings.len() as u32);
        for s in strings {
            w.cstr(s);
        }
    }
    let f = &plan.fds;
    for fd in [f.stdin, f.stdout, f.stderr, f.result, f.report, f.go] {
        w.fd(fd);
    }
    w.fd(plan.netns);
    match plan.mode {
        Mode::OneShot => w.u8(0),
        Mode::SandboxInit => w.u8(1),
        Mode::Enter(ns) => {
            w.u8(2);
            for fd in ns {
                w.fd(fd);
            }
        }
    }
    (w.buf, w.fds)
}

/// The plan in `body`, its descriptors numbered as received in `fds`, with
/// `parent` (the zygote's own pidfd) for the child's check; and its flags.
/// `None` for anything malformed.
pub(super) fn decode(body: &[u8], fds: &[OwnedFd], parent: c_int) -> Option<(Plan, c_int)> {
    let mut r = Reader { buf: body, fds };
    let flags = r.i32()?;
    if flags & !NAMESPACE_FLAGS != 0 {
        return None;
    }
    let n = r.count()?;
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let op = match r.u8()? {
            0 => Op::Mount {
                src: r.opt_cstring()?,
                dst: r.cstring()?,
                fstype: r.opt_cstring()?,
                flags: r.u64()?,
                data: r.opt_cstring()?,
            },
            1 => Op::Mkdir {
                path: r.cstring()?,
                mode: r.u32()?,
            },
            2 => Op::Symlink {
                target: r.cstring()?,
                path: r.cstring()?,
            },
            3 => Op::Write {
                path: r.cstring()?,
                contents: r.bytes()?.to_vec(),
                mode: r.u32()?,
            },
            4 => Op::Chown {
                path: r.cstring()?,
                uid: r.u32()?,
                gid: r.u32()?,
            },
            5 => Op::PivotRoot { path: r.cstring()? },
            _ => return None,
        };
        ops.push(op);
    }
    let hostname = r.cstring()?;
    let cwd = r.cstring()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let n = r.count()?;
    let mut rlimits = Vec::with_capacity(n);
    for _ in 0..n {
        rlimits.push((r.u32()?, r.u64()?));
    }
    let n = r.count()?;
    let mut filter = Vec::with_capacity(n);
    for _ in 0..n {
        let code = u16::from_ne_bytes(r.take(2)?.try_into().ok()?);
        filter.push(libc::sock_filter {
            code,
            jt: r.u8()?,
            jf: r.u8()?,
            k: r.u32()?,
        });
    }
    let mut strings = || -> Option<Vec<CString>> {
        let n = r.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(r.cstring()?);
        }
        Some(v)
    };
    let argv = strings()?;
    let envp = strings()?;
    let fds = ChildFds {
        stdin: r.fd()?,
        stdout: r.fd()?,
        stderr: r.fd()?,
        result: r.fd()?,
        report: r.fd()?,
        go: r.fd()?,
    };
    let netns = r.fd()?;
    let mode = match r.u8()? {
        0 => Mode::OneShot,
        1 => Mode::SandboxInit,
        2 => Mode::Enter([r.fd()?, r.fd()?, r.fd()?, r.fd()?, r.fd()?, r.fd()?]),
        _ => return None,
    };
    if !r.buf.is_empty() {
        return None;
    }
    // Only a sandbox's init runs no program. An exec's helper is a plain clone
    // (it joins namespaces itself); a jail's init builds its root in new mount,
    // PID, IPC and UTS namespaces, never in the zygote's.
    let jail_namespaces =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    let fits = match mode {
        Mode::Enter(_) => flags == 0 && !argv.is_empty(),
        Mode::OneShot => flags & jail_namespaces == jail_namespaces && !argv.is_empty(),
        Mode::SandboxInit => flags & jail_namespaces == jail_namespaces,
    };
    if !fits {
        return None;
    }
    let plan = Plan {
        ops,
        hostname,
        cwd,
        uid,
        gid,
        rlimits,
        filter,
        argv_ptrs: Plan::pointers(&argv),
        envp_ptrs: Plan::pointers(&envp),
        argv,
        envp,
        fds,
        netns,
        mode,
        parent,
    };
    Some((plan, flags))
}

struct Writer {
    buf: Vec<u8>,
    fds: Vec<RawFd>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }

    fn cstr(&mut self, s: &CStr) {
        self.bytes(s.to_bytes());
    }

    fn opt_cstr(&mut self, s: Option<&CStr>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.cstr(s);
            }
        }
    }

    /// A descriptor: its index among those sent, or -1 for none.
    fn fd(&mut self, fd: RawFd) {
        if fd < 0 {
            self.i32(-1);
        } else {
            self.i32(self.fds.len() as i32);
            self.fds.push(fd);
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    fds: &'a [OwnedFd],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_ne_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_ne_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A number of items, each at least a byte: never more than what is left,
    /// so no bogus count makes a large allocation.
    fn count(&mut self) -> Option<usize> {
        let n = self.u32()? as usize;
        (n <= self.buf.len()).then_some(n)
    }

    fn bytes(&mut self) -> Option<&[u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn cstring(&mut self) -> Option<CString> {
        CString::new(self.bytes()?).ok()
    }

    fn opt_cstring(&mut self) -> Option<Option<CString>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.cstring()?)),
            _ => None,
        }
    }

    /// A descriptor index, as the number the descriptor has here (-1 for none).
    fn fd(&mut self) -> Option<c_int> {
        match self.i32()? {
            -1 => Some(-1),
            i => Some(self.fds.get(usize::try_from(i).ok()?)?.as_raw_fd()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: Mode, fds: [c_int; 6]) -> Plan {
        let argv = vec![CString::new("/bin/true").unwrap()];
        let envp = vec![CString::new("A=b").unwrap()];
        Plan {
            ops: vec![
                Op::Mount {
                    src: Some(CString::new("tmpfs").unwrap()),
                    dst: CString::new("/x").unwrap(),
                    fstype: None,
                    flags: libc::MS_NOSUID,
                    data: Some(CString::new("size=1m").unwrap()),
                },
                Op::Write {
                    path: CString::new("/x/f").unwrap(),
                    contents: b"hello\0world".to_vec(),
                    mode: 0o644,
                },
                Op::PivotRoot {
                    path: CString::new("/x").unwrap(),
                },
            ],
            hostname: CString::new("sandbox").unwrap(),
            cwd: CString::new("/workspace").unwrap(),
            uid: 65534,
            gid: 65533,
            rlimits: vec![(libc::RLIMIT_NOFILE, 256)],
            filter: vec![libc::sock_filter {
                code: 6,
                jt: 1,
                jf: 2,
                k: 0x7fff_0000,
            }],
            argv_ptrs: Plan::pointers(&argv),
            envp_ptrs: Plan::pointers(&envp),
            argv,
            envp,
            fds: ChildFds {
                stdin: fds[0],
                stdout: fds[1],
                stderr: fds[2],
                result: fds[3],
                report: fds[4],
                go: fds[5],
            },
            netns: -1,
            mode,
            parent: -1,
        }
    }

    fn devnulls(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect()
    }

    #[test]
    fn a_plan_comes_back_whole_with_the_receivers_descriptors() {
        let sent = sample(
            Mode::Enter([20, 21, 22, 23, 24, 25]),
            [10, 11, 12, 13, 14, 15],
        );
        let (body, fds) = encode(&sent, 0);
        assert_eq!(fds, [10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25]);
        let received = devnulls(fds.len());
        let n = |i: usize| received[i].as_raw_fd();
        let (plan, flags) = decode(&body, &received, 7).unwrap();
        assert_eq!(flags, 0);
        assert_eq!(format!("{:?}", plan.ops), format!("{:?}", sent.ops));
        assert_eq!(plan.hostname, sent.hostname);
        assert_eq!((plan.uid, plan.gid), (65534, 65533));
        assert_eq!(plan.rlimits, sent.rlimits);
        assert_eq!(plan.filter[0].k, 0x7fff_0000);
        assert_eq!((plan.filter[0].jt, plan.filter[0].jf), (1, 2));
        assert_eq!(plan.argv, sent.argv);
        assert_eq!(plan.argv_ptrs.len(), 2);
        assert_eq!(plan.argv_ptrs[0], plan.argv[0].as_ptr());
        assert!(plan.envp_ptrs[1].is_null());
        assert_eq!(plan.fds.stdin, n(0));
        assert_eq!(plan.fds.go, n(5));
        assert_eq!(plan.netns, -1);
        assert_eq!(
            plan.mode,
            Mode::Enter([n(6), n(7), n(8), n(9), n(10), n(11)])
        );
        assert_eq!(plan.parent, 7);
    }

    #[test]
    fn malformed_plans_are_refused() {
        let sent = sample(Mode::OneShot, [10, 11, 12, 13, 14, 15]);
        let flags = crate::namespace_flags(true);
        let (body, fds) = encode(&sent, flags);
        let received = devnulls(fds.len());
        assert!(decode(&body, &received, -1).is_some());
        // Cut anywhere, or one byte too many.
        for len in 0..body.len() {
            assert!(
                decode(&body[..len], &received, -1).is_none(),
                "cut at {len}"
            );
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode(&longer, &received, -1).is_none());
        // A descriptor that was not sent.
        assert!(decode(&body, &received[..5], -1).is_none());
        // Flags that are not namespaces, or a jail's init outside new ones.
        let (body, _) = encode(&sent, flags | libc::CLONE_VM);
        assert!(decode(&body, &received, -1).is_none());
        let (body, _) = encode(&sent, libc::CLONE_NEWPID);
        assert!(decode(&body, &received, -1).is_none());
        // A program-less one-shot run.
        let mut empty = sample(Mode::OneShot, [10, 11, 12, 13, 14, 15]);
        empty.argv.clear();
        let (body, _) = encode(&empty, flags);
        assert!(decode(&body, &received, -1).is_none());
    }
}
