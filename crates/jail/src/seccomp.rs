//! The system-call filter every jailed program runs under.
//!
//! A deny list on top of what an unprivileged user could already not do: calls
//! that change mounts, namespaces, the kernel, the clock or other processes'
//! memory answer `EPERM` (so programs see an ordinary failure, not a crash), and
//! calls of a foreign ABI kill the process. `clone3` answers `ENOSYS`, which makes
//! the C library fall back to `clone`, whose flags the filter can inspect.
//!
//! Written as classic BPF by hand: it is short, and every instruction is here to
//! be audited.

use libc::sock_filter;

// BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LOW: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Namespace flags a jailed program may not pass to `clone`.
const CLONE_NAMESPACES: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// Refused with `EPERM`.
const DENIED: &[libc::c_long] = &[
    // Mounts and the filesystem tree.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_quotactl,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    // Namespaces.
    libc::SYS_unshare,
    libc::SYS_setns,
    // Other processes' memory.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    // Kernel keyring.
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // Kernel programs, tracing, modules.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_fanotify_init,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // The machine itself.
    libc::SYS_reboot,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The filter program, built once per jail and installed by each jailed process.
pub(crate) fn filter() -> Vec<sock_filter> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let enosys = RET_ERRNO | libc::ENOSYS as u32;
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        // x32 system calls (numbers with bit 30 set) are another ABI: refuse them.
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        p.push(jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        p.push(stmt(BPF_RET_K, RET_KILL_PROCESS));
    }
    // Each denied number jumps forward to the shared EPERM return. Layout after the
    // list: [clone3][clone][load arg0][jset][allow][eperm][enosys].
    let n = DENIED.len();
    for (i, nr) in DENIED.iter().enumerate() {
        // From entry i, skip the rest of the list and the four instructions
        // before `allow`, and `allow` itself.
        let to_eperm = (n - i - 1) + 4 + 1;
        p.push(jump(
            BPF_JMP_JEQ_K,
            *nr as u32,
            u8::try_from(to_eperm).expect("deny list fits a BPF jump"),
            0,
        ));
    }
    // clone3: ENOSYS, so libc falls back to clone.
    p.push(jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 5, 0));
    // clone: refuse namespace flags (first argument on x86_64 and aarch64).
    p.push(jump(BPF_JMP_JEQ_K, libc::SYS_clone as u32, 0, 2));
    p.push(stmt(BPF_LD_W_ABS, OFF_ARG0_LOW));
    p.push(jump(BPF_JMP_JSET_K, CLONE_NAMESPACES, 1, 0));
    p.push(stmt(BPF_RET_K, RET_ALLOW));
    p.push(stmt(BPF_RET_K, eperm));
    p.push(stmt(BPF_RET_K, enosys));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small interpreter for the subset of classic BPF the filter uses, so the
    /// jumps are checked without installing anything.
    fn eval(prog: &[sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let ins = prog[pc];
            match ins.code {
                BPF_LD_W_ABS => {
                    acc = match ins.k {
                        OFF_NR => nr,
                        OFF_ARCH => arch,
                        OFF_ARG0_LOW => arg0,
                        k => panic!("load at {k}"),
                    };
                    pc += 1;
                }
                BPF_JMP_JEQ_K | BPF_JMP_JGE_K | BPF_JMP_JSET_K => {
                    let hit = match ins.code {
                        BPF_JMP_JEQ_K => acc == ins.k,
                        BPF_JMP_JGE_K => acc >= ins.k,
                        _ => acc & ins.k != 0,
                    };
                    pc += 1 + usize::from(if hit { ins.jt } else { ins.jf });
                }
                BPF_RET_K => return ins.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn the_filter_allows_ordinary_calls_and_refuses_the_listed_ones() {
        let p = filter();
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let a = AUDIT_ARCH;
        assert_eq!(eval(&p, a, libc::SYS_read as u32, 0), RET_ALLOW);
        assert_eq!(eval(&p, a, libc::SYS_execve as u32, 0), RET_ALLOW);
        for nr in DENIED {
            assert_eq!(eval(&p, a, *nr as u32, 0), eperm, "syscall {nr}");
        }
        assert_eq!(
            eval(&p, a, libc::SYS_clone3 as u32, 0),
            RET_ERRNO | libc::ENOSYS as u32
        );
        let fork_flags = libc::SIGCHLD as u32;
        assert_eq!(eval(&p, a, libc::SYS_clone as u32, fork_flags), RET_ALLOW);
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u32;
        assert_eq!(eval(&p, a, libc::SYS_clone as u32, thread), RET_ALLOW);
        let userns = libc::CLONE_NEWUSER as u32 | fork_flags;
        assert_eq!(eval(&p, a, libc::SYS_clone as u32, userns), eperm);
        assert_eq!(
            eval(&p, a, libc::SYS_clone as u32, libc::CLONE_NEWNET as u32),
            eperm
        );
        assert_eq!(
            eval(&p, 0x4000_0003, libc::SYS_read as u32, 0),
            RET_KILL_PROCESS
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(eval(&p, a, 0x4000_0000 | 1, 0), RET_KILL_PROCESS);
    }
}
