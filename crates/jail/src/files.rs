//! Files inside a sandbox, from the server.
//!
//! Paths are resolved by the kernel inside the sandbox's own root:
//! `openat2(RESOLVE_IN_ROOT)` on `/proc/<init>/root` treats `..`, absolute
//! symlinks and symlink chains as if the sandbox's root were `/`, so nothing a
//! program inside creates can lead a read or a write to a host file. Parents are
//! created one component at a time relative to an already-resolved directory, and
//! what the server creates belongs to the sandbox user.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::Sandbox;
use crate::fd::{check, fstat, fstat_at, open_at, read_link_at, read_names};

mod tree;
mod user;

pub use tree::{Entry, Link, MAX_LIST_DEPTH, NewFile};
pub use user::FsUser;

const PROC_SUPER_MAGIC: libc::__fsword_t = 0x9fa0;
const SYSFS_MAGIC: libc::__fsword_t = 0x6265_6572;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    pub size: u64,
}

/// What a path is (see [`Sandbox::stat_path`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub modified_secs: i64,
    pub modified_nanos: u32,
    /// What a symlink points to (only when not followed).
    pub symlink_target: Option<String>,
}

fn kind_of(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        _ => "other",
    }
}

/// What a path holds.
#[derive(Debug, Clone)]
pub enum FileContent {
    File(Vec<u8>),
    Dir(Vec<DirEntry>),
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `path` split into its normal components (`.` and empty ones dropped; `..`
/// kept: the kernel resolves it inside the root).
fn components(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

impl Sandbox {
    pub(crate) fn root_fd(&self) -> io::Result<OwnedFd> {
        self.open_proc_of_init("root", libc::O_PATH | libc::O_DIRECTORY)
    }

    /// Opens `path` relative to `dir`, never leaving the sandbox's root.
    pub(crate) fn open_in(
        &self,
        dir: &OwnedFd,
        path: &str,
        flags: libc::c_int,
        mode: u32,
    ) -> io::Result<OwnedFd> {
        let path = cstr(if path.is_empty() { "." } else { path })?;
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: u64::from(mode),
            resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2 reads the path and a struct of the kernel's layout.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how,
                size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        refuse_proc_and_sys(&fd)?;
        Ok(fd)
    }

    /// A file's bytes (at most `max` of them), or a directory's entries, read
    /// with `user`'s rights.
    pub fn read_path(&self, path: &str, max: u64, user: FsUser) -> io::Result<FileContent> {
        let root = self.root_fd()?;
        let _as = user::ActingAs::enter(user)?;
        let fd = self.open_in(&root, path, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
        let mut st: libc::stat = unsafe_zeroed();
        // SAFETY: fstat fills a stack struct.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Ok(FileContent::Dir(list(fd)?)),
            libc::S_IFREG => {
                if st.st_size as u64 > max {
                    return Err(io::Error::new(
                        io::ErrorKind::FileTooLarge,
                        format!("the file is over the limit of {max} bytes"),
                    ));
                }
                let mut file = std::fs::File::from(fd);
                let mut data = Vec::with_capacity(st.st_size as usize);
                io::Read::read_to_end(&mut io::Read::take(&mut file, max + 1), &mut data)?;
                if data.len() as u64 > max {
                    return Err(io::Error::new(
                        io::ErrorKind::FileTooLarge,
                        format!("the file is over the limit of {max} bytes"),
                    ));
                }
                Ok(FileContent::File(data))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or directory",
            )),
        }
    }

    /// What `path` is. With `follow`, a final symlink is followed (inside the
    /// sandbox's root, as always); without, the link itself is described.
    pub fn stat_path(&self, path: &str, follow: bool) -> io::Result<PathInfo> {
        let root = self.root_fd()?;
        let parts = components(path);
        let mut symlink_target = None;
        let st = match parts.split_last() {
            Some((name, parents)) if !follow && *name != ".." => {
                let parent = self.open_in(
                    &root,
                    &parents.join("/"),
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )?;
                let c = cstr(name)?;
                let st = fstat_at(&parent, &c)?;
                if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                    symlink_target = read_link_at(&parent, &c)
                        .ok()
                        .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned());
                }
                st
            }
            _ => fstat(&self.open_in(&root, path, libc::O_PATH, 0)?)?,
        };
        Ok(PathInfo {
            kind: kind_of(st.st_mode),
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            modified_secs: st.st_mtime,
            modified_nanos: st.st_mtime_nsec as u32,
            symlink_target,
        })
    }

    /// Writes `data` to `path` with `user`'s rights, creating missing parent
    /// directories; everything created belongs to `user`. Returns the size
    /// written.
    pub fn write_path(&self, path: &str, data: &[u8], user: FsUser) -> io::Result<u64> {
        let FsUser { uid, gid } = user;
        let parts = components(path);
        let Some((name, parents)) = parts.split_last() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
        };
        if *name == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
        }
        let root = self.root_fd()?;
        let _as = user::ActingAs::enter(user)?;
        // Each prefix is resolved from the sandbox's root (so links inside mean
        // what they mean to its programs); a missing one is made in its parent.
        let mut dir = self.open_in(&root, "/", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        for (i, part) in parents.iter().enumerate() {
            let prefix = parents[..=i].join("/");
            dir = match self.open_in(&root, &prefix, libc::O_PATH | libc::O_DIRECTORY, 0) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && *part != ".." => {
                    let c = cstr(part)?;
                    // SAFETY: mkdirat/fchownat of one plain component under a
                    // directory already resolved inside the root.
                    unsafe {
                        check(libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755))?;
                        check(libc::fchownat(
                            dir.as_raw_fd(),
                            c.as_ptr(),
                            uid,
                            gid,
                            libc::AT_SYMLINK_NOFOLLOW,
                        ))?;
                    }
                    self.open_in(&root, &prefix, libc::O_PATH | libc::O_DIRECTORY, 0)?
                }
                Err(e) => return Err(e),
            };
        }
        let fd = self.open_in(
            &dir,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
            0o644,
        )?;
        // SAFETY: fchown of an fd we own.
        check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
        let mut file = std::fs::File::from(fd);
        io::Write::write_all(&mut file, data)?;
        Ok(data.len() as u64)
    }

    /// Removes a file, a symlink (not what it points to) or a directory tree,
    /// with `user`'s rights.
    pub fn remove_path(&self, path: &str, user: FsUser) -> io::Result<()> {
        let parts = components(path);
        let Some((name, parents)) = parts.split_last() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot remove /",
            ));
        };
        if *name == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
        }
        let root = self.root_fd()?;
        let _as = user::ActingAs::enter(user)?;
        let parent = self.open_in(
            &root,
            &parents.join("/"),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        remove_at(&parent, &cstr(name)?)
    }
}

/// The sandbox's /proc shows its init, a copy of the server's memory and
/// environment; /sys is the host's. Neither is reachable through the files API.
fn refuse_proc_and_sys(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fstatfs fills a stack struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on an fd we hold.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) })?;
    if matches!(fs.f_type, PROC_SUPER_MAGIC | SYSFS_MAGIC) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "/proc and /sys are not reachable through the files API",
        ));
    }
    Ok(())
}

/// `unlinkat`, recursing into directories by single components (never following
/// a symlink, never into /proc or /sys).
fn remove_at(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: unlinkat of one component under an fd we hold.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EISDIR) {
        return Err(e);
    }
    let sub = open_at(
        dir.as_raw_fd(),
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    refuse_proc_and_sys(&sub)?;
    for entry in read_names(&sub)? {
        remove_at(&sub, &entry)?;
    }
    // SAFETY: as above, for the now empty directory.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })?;
    Ok(())
}

/// The entries of an open directory (not `.` and `..`), sorted by name.
fn list(dir: OwnedFd) -> io::Result<Vec<DirEntry>> {
    let mut entries = Vec::new();
    for name in read_names(&dir)? {
        let st = fstat_at(&dir, &name).ok();
        entries.push(DirEntry {
            name: name.to_string_lossy().into_owned(),
            kind: st.map_or("other", |st| kind_of(st.st_mode)),
            size: st.map_or(0, |st| st.st_size as u64),
        });
    }
    Ok(entries)
}

fn unsafe_zeroed() -> libc::stat {
    // SAFETY: `stat` is plain old data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}
