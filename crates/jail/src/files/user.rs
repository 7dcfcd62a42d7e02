//! Acting on a sandbox's files with the sandbox user's rights, not the server's.
//!
//! The server is root: without care, a file operation it carries out for a
//! client could read a root-only file of a host directory bound into the
//! sandbox, or overwrite a file the sandbox user may not touch. While an
//! [`ActingAs`] guard lives, the calling thread's filesystem identity is the
//! sandbox user's: `setfsuid`/`setfsgid` to the user, no supplementary groups.
//! A filesystem uid other than 0 also takes the file capabilities
//! (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, `CAP_FOWNER`, `CAP_CHOWN`, …) out
//! of the thread's effective set, so the kernel checks every permission as it
//! would for a program inside, and what is created belongs to the user. Other
//! threads of the server keep their identity: these are raw system calls, which
//! change only the calling thread's credentials (glibc's `setgroups` wrapper
//! would change every thread's).
//!
//! Opening `/proc/<init>/root` needs the server's own rights: do it before.

use std::io;

/// Whose rights a file operation uses: the sandbox user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUser {
    pub uid: u32,
    pub gid: u32,
}

/// The calling thread acting as a [`FsUser`]; dropping it restores the
/// thread's own identity.
#[derive(Debug)]
pub(crate) struct ActingAs {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

/// The thread's current filesystem uid or gid (`-1` is not a valid id, so
/// the call changes nothing and returns the current one).
fn current(nr: libc::c_long) -> u32 {
    // SAFETY: setfsuid/setfsgid with an invalid id only reports the current one.
    unsafe { libc::syscall(nr, -1i32 as libc::c_long) as u32 }
}

fn set_id(nr: libc::c_long, id: u32) -> io::Result<()> {
    // SAFETY: changes the calling thread's filesystem uid or gid; no memory effects.
    unsafe { libc::syscall(nr, id as libc::c_long) };
    if current(nr) == id {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "could not take the sandbox user's filesystem identity",
        ))
    }
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the raw setgroups call (this thread only) reads `len` gids.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: getgroups with size 0 only counts the thread's groups.
    let n = unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<libc::gid_t>()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: getgroups writes at most `len` gids into the live buffer.
    let n = unsafe { libc::syscall(libc::SYS_getgroups, groups.len(), groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

impl ActingAs {
    /// From now until the guard drops, this thread's file operations are the
    /// user's. Groups first and the uid last: changing the gid and the groups
    /// needs `CAP_SETGID`, which a non-zero filesystem uid leaves in place.
    pub(crate) fn enter(user: FsUser) -> io::Result<ActingAs> {
        let saved = ActingAs {
            fsuid: current(libc::SYS_setfsuid),
            fsgid: current(libc::SYS_setfsgid),
            groups: groups()?,
        };
        set_groups(&[])?;
        // From here on, `saved` restores whatever was changed if a step fails.
        set_id(libc::SYS_setfsgid, user.gid)?;
        set_id(libc::SYS_setfsuid, user.uid)?;
        Ok(saved)
    }
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        let restored = set_id(libc::SYS_setfsuid, self.fsuid)
            .and_then(|()| set_id(libc::SYS_setfsgid, self.fsgid))
            .and_then(|()| set_groups(&self.groups));
        if restored.is_err() {
            // A server thread left with another identity would fail, or worse,
            // act for the wrong user later: stop rather than go on.
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_the_users_until_the_guard_drops() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let before = (current(libc::SYS_setfsuid), groups().unwrap());
        let dir = root_only_dir();
        std::thread::spawn(move || {
            let guard = ActingAs::enter(FsUser {
                uid: 65534,
                gid: 65534,
            })
            .unwrap();
            assert_eq!(current(libc::SYS_setfsuid), 65534);
            assert_eq!(current(libc::SYS_setfsgid), 65534);
            assert!(groups().unwrap().is_empty());
            // A root-only directory is out of reach, as it is for the user.
            assert_eq!(
                std::fs::read_dir(&dir).unwrap_err().kind(),
                io::ErrorKind::PermissionDenied
            );
            drop(guard);
            assert!(std::fs::read_dir(&dir).is_ok());
            std::fs::remove_dir(&dir).unwrap();
        })
        .join()
        .unwrap();
        // Another thread's identity never changed.
        assert_eq!((current(libc::SYS_setfsuid), groups().unwrap()), before);
    }

    fn root_only_dir() -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sandgate-fsuser-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }
}
