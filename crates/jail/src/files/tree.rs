//! Directory trees inside a sandbox, as its user sees them: entries described
//! without following a final symlink, depth-limited listings, directories made
//! with their parents, renames, removals, and files opened for streaming in or
//! out.
//!
//! Every method acts with the sandbox user's rights ([`super::user`]) and
//! resolves paths as [`super`] does: `openat2(RESOLVE_IN_ROOT)` from the
//! sandbox's root, so `..`, absolute symlinks and chains of them stay inside.
//! Operations on a final component (rename, remove, replace) hold its parent
//! directory resolved that way and name the component alone, never a path
//! string from the host side. Listings open subdirectories one component at a
//! time with `O_NOFOLLOW` and never descend into a symlink, `/proc` or `/sys`.

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use super::user::{ActingAs, FsUser};
use super::{components, cstr, kind_of, refuse_proc_and_sys};
use crate::Sandbox;
use crate::fd::{check, fstat, fstat_at, open_at, read_link_at, read_names};

/// Deepest listing: a sandbox can nest directories far deeper than anyone
/// lists, and each level holds a descriptor and a stack frame.
pub const MAX_LIST_DEPTH: u32 = 128;
/// Links followed when resolving a symlink's target (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// One entry, described as itself (a final symlink is not followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path it was asked by, or found at under a listed directory.
    pub path: String,
    pub name: String,
    /// `st_mode`: the type and permission bits.
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub modified_secs: i64,
    pub modified_nanos: u32,
    /// Set for a symlink.
    pub link: Option<Link>,
}

impl Entry {
    /// `file`, `dir`, `symlink` or `other`.
    pub fn kind(&self) -> &'static str {
        kind_of(self.mode)
    }
}

/// Where a symlink leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The absolute path inside the sandbox it resolves to, or the link's own
    /// text when it leads nowhere that exists.
    pub target: String,
    /// `st_mode` of what it leads to; `None` when that does not exist or is
    /// out of reach (`/proc`, `/sys`).
    pub target_mode: Option<u32>,
}

/// A file being written: the bytes go to a hidden temporary file beside the
/// target, which takes the target's place at [`NewFile::commit`]. Dropped
/// without a commit, the temporary file is removed and the target is as it was.
#[derive(Debug)]
pub struct NewFile {
    dir: OwnedFd,
    name: CString,
    temp: CString,
    file: Option<File>,
    user: FsUser,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Opens one component of `dir` (never following a symlink there).
fn open_component(dir: &OwnedFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    open_at(dir.as_raw_fd(), name, flags | libc::O_NOFOLLOW, 0o600)
}

fn rename_at(from: &OwnedFd, from_name: &CStr, to: &OwnedFd, to_name: &CStr) -> io::Result<()> {
    // SAFETY: renameat of single components under directories we hold.
    check(unsafe {
        libc::renameat(
            from.as_raw_fd(),
            from_name.as_ptr(),
            to.as_raw_fd(),
            to_name.as_ptr(),
        )
    })
    .map(drop)
}

fn unlink_at(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: unlinkat of one component under a directory we hold.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn entry_of(path: String, name: String, st: &libc::stat, link: Option<Link>) -> Entry {
    Entry {
        path,
        name,
        mode: st.st_mode,
        size: st.st_size as u64,
        uid: st.st_uid,
        gid: st.st_gid,
        modified_secs: st.st_mtime,
        modified_nanos: st.st_mtime_nsec as u32,
        link,
    }
}

fn no_name(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} names no entry"),
    )
}

/// A fresh hidden name for a temporary file (the sandbox cannot guess it
/// ahead: a clash, planted or not, only makes the next one be tried).
fn temp_name() -> io::Result<CString> {
    let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    cstr(&format!(".sandgate-upload-{}-{n}", std::process::id()))
}

/// Creates a new temporary file in `dir` (`O_EXCL`: never an existing one,
/// never through a link).
fn create_temp(dir: &OwnedFd, mode: u32) -> io::Result<(CString, File)> {
    loop {
        let temp = temp_name()?;
        match open_component(dir, &temp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) {
            Ok(fd) => {
                // SAFETY: fchmod of an fd we own (the mode is not the umask's).
                check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
                return Ok((temp, File::from(fd)));
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
}

impl Sandbox {
    /// The parent directory of `path` (resolved inside the root) and its last
    /// component.
    fn parent_of(&self, root: &OwnedFd, path: &str) -> io::Result<(OwnedFd, CString)> {
        let parts = components(path);
        let Some((name, parents)) = parts.split_last() else {
            return Err(no_name(path));
        };
        if *name == ".." {
            return Err(no_name(path));
        }
        let dir = self.open_in(
            root,
            &parents.join("/"),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        Ok((dir, cstr(name)?))
    }

    /// The directory `parts` names, made (with its missing parents) when it
    /// does not exist. Each prefix is resolved from the root, so links inside
    /// mean what they mean to the sandbox's programs; a missing one is made in
    /// the directory already resolved before it.
    fn dirs_made(&self, root: &OwnedFd, parts: &[&str]) -> io::Result<OwnedFd> {
        let mut dir = self.open_in(root, "", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        for (i, part) in parts.iter().enumerate() {
            let prefix = parts[..=i].join("/");
            dir = match self.open_in(root, &prefix, libc::O_PATH | libc::O_DIRECTORY, 0) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && *part != ".." => {
                    let c = cstr(part)?;
                    // SAFETY: mkdirat of one component under a directory
                    // already resolved inside the root.
                    let made = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
                    if made < 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(e);
                        }
                    }
                    self.open_in(root, &prefix, libc::O_PATH | libc::O_DIRECTORY, 0)?
                }
                Err(e) => return Err(e),
            };
        }
        Ok(dir)
    }

    /// What a symlink (`name` in `dir`, at `path`) leads to.
    fn link_of(&self, root: &OwnedFd, dir: &OwnedFd, name: &CStr, path: &str) -> Link {
        let text = read_link_at(dir, name)
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target_mode = self
            .open_in(root, path, libc::O_PATH, 0)
            .and_then(|fd| fstat(&fd))
            .ok()
            .map(|st| st.st_mode);
        let target = match target_mode {
            Some(_) => self.resolved(root, path).unwrap_or(text),
            None => text,
        };
        Link {
            target,
            target_mode,
        }
    }

    /// `path` with every symlink in it replaced by what it leads to, as the
    /// kernel resolves it inside the root (the root standing for `/`). Only a
    /// description: nothing is opened by the string it returns.
    fn resolved(&self, root: &OwnedFd, path: &str) -> io::Result<String> {
        let mut done: Vec<String> = Vec::new();
        let mut todo: VecDeque<String> = components(path).into_iter().map(str::to_owned).collect();
        let mut links = 0;
        while let Some(part) = todo.pop_front() {
            if part == ".." {
                done.pop();
                continue;
            }
            let dir = self.open_in(root, &done.join("/"), libc::O_PATH | libc::O_DIRECTORY, 0)?;
            let c = cstr(&part)?;
            let st = fstat_at(&dir, &c)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                done.push(part);
                continue;
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = read_link_at(&dir, &c)?.to_string_lossy().into_owned();
            if target.starts_with('/') {
                done.clear();
            }
            for p in components(&target).into_iter().rev() {
                todo.push_front(p.to_owned());
            }
        }
        Ok(format!("/{}", done.join("/")))
    }

    /// What `path` is, a final symlink described as itself.
    pub fn entry(&self, path: &str, user: FsUser) -> io::Result<Entry> {
        let root = self.root_fd()?;
        let _as = ActingAs::enter(user)?;
        if components(path).is_empty() {
            let st = fstat(&self.open_in(&root, "", libc::O_PATH, 0)?)?;
            return Ok(entry_of("/".into(), "/".into(), &st, None));
        }
        let (dir, name) = self.parent_of(&root, path)?;
        let st = fstat_at(&dir, &name)?;
        let link = (st.st_mode & libc::S_IFMT == libc::S_IFLNK)
            .then(|| self.link_of(&root, &dir, &name, path));
        let name = name.to_string_lossy().into_owned();
        Ok(entry_of(path.to_owned(), name, &st, link))
    }

    /// The entries under directory `path` (a symlink to a directory is
    /// followed, inside the root), `depth` levels down (1: its own entries),
    /// in depth-first order, each directory's entries by name. Symlinks,
    /// `/proc`, `/sys` and directories the user may not read are listed but
    /// not descended into. Stops after `max` entries; the flag says it did.
    pub fn list_tree(
        &self,
        path: &str,
        depth: u32,
        max: usize,
        user: FsUser,
    ) -> io::Result<(Vec<Entry>, bool)> {
        let root = self.root_fd()?;
        let _as = ActingAs::enter(user)?;
        let dir = self.open_in(&root, path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let mut out = Vec::new();
        let full = self.walk(
            &root,
            &dir,
            path,
            depth.clamp(1, MAX_LIST_DEPTH),
            max,
            &mut out,
        )?;
        Ok((out, !full))
    }

    /// Lists `dir` (found at `at`) into `out`; `false` once `max` is reached.
    fn walk(
        &self,
        root: &OwnedFd,
        dir: &OwnedFd,
        at: &str,
        depth: u32,
        max: usize,
        out: &mut Vec<Entry>,
    ) -> io::Result<bool> {
        for c in read_names(dir)? {
            if out.len() >= max {
                return Ok(false);
            }
            let name = c.to_string_lossy().into_owned();
            let Ok(st) = fstat_at(dir, &c) else {
                continue; // gone since the directory was read
            };
            let path = join(at, &name);
            let kind = st.st_mode & libc::S_IFMT;
            let link = (kind == libc::S_IFLNK).then(|| self.link_of(root, dir, &c, &path));
            out.push(entry_of(path.clone(), name, &st, link));
            if kind != libc::S_IFDIR || depth <= 1 {
                continue;
            }
            let Ok(sub) = open_component(dir, &c, libc::O_RDONLY | libc::O_DIRECTORY) else {
                continue; // not readable by the user, or replaced meanwhile
            };
            if refuse_proc_and_sys(&sub).is_err() {
                continue;
            }
            if !self.walk(root, &sub, &path, depth - 1, max, out)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Makes directory `path` and its missing parents, owned by the user.
    /// `false` when it already was a directory; `EEXIST` when something else
    /// is there.
    pub fn make_dirs(&self, path: &str, user: FsUser) -> io::Result<bool> {
        let root = self.root_fd()?;
        let _as = ActingAs::enter(user)?;
        match self.open_in(&root, path, libc::O_PATH, 0) {
            Ok(fd) if fstat(&fd)?.st_mode & libc::S_IFMT == libc::S_IFDIR => return Ok(false),
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::EEXIST)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        self.dirs_made(&root, &components(path))?;
        Ok(true)
    }

    /// Renames `from` to `to` (missing parents of `to` made): `renameat` of
    /// the two final components under their resolved parents, so neither
    /// side's final symlink is followed (a link is moved, or replaced, as
    /// itself). Between two mounts (`/tmp` and `/workspace`), a file or a
    /// symlink is copied then removed; a directory is refused (`EXDEV`).
    pub fn rename_path(&self, from: &str, to: &str, user: FsUser) -> io::Result<()> {
        let root = self.root_fd()?;
        let _as = ActingAs::enter(user)?;
        let (from_dir, from_name) = self.parent_of(&root, from)?;
        let st = fstat_at(&from_dir, &from_name)?;
        let to_parts = components(to);
        let Some((to_name, to_parents)) = to_parts.split_last() else {
            return Err(no_name(to));
        };
        if *to_name == ".." {
            return Err(no_name(to));
        }
        let to_dir = self.dirs_made(&root, to_parents)?;
        let to_name = cstr(to_name)?;
        match rename_at(&from_dir, &from_name, &to_dir, &to_name) {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                self.move_across(&from_dir, &from_name, &st, &to_dir, &to_name)
            }
            other => other,
        }
    }

    /// A rename between two mounts: a copy in a temporary file (or link)
    /// beside the destination, renamed into place, then the source removed.
    fn move_across(
        &self,
        from_dir: &OwnedFd,
        from_name: &CStr,
        st: &libc::stat,
        to_dir: &OwnedFd,
        to_name: &CStr,
    ) -> io::Result<()> {
        let temp = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                let mut source = File::from(open_component(from_dir, from_name, libc::O_RDONLY)?);
                let (temp, mut copy) = create_temp(to_dir, st.st_mode & 0o7777)?;
                if let Err(e) = io::copy(&mut source, &mut copy) {
                    let _ = unlink_at(to_dir, &temp);
                    return Err(e);
                }
                temp
            }
            libc::S_IFLNK => {
                let target = read_link_at(from_dir, from_name)?;
                loop {
                    let temp = temp_name()?;
                    // SAFETY: symlinkat of one new component under a directory we hold.
                    let made = unsafe {
                        libc::symlinkat(target.as_ptr(), to_dir.as_raw_fd(), temp.as_ptr())
                    };
                    if made == 0 {
                        break temp;
                    }
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
            }
            _ => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
        };
        if let Err(e) = rename_at(to_dir, &temp, to_dir, to_name) {
            let _ = unlink_at(to_dir, &temp);
            return Err(e);
        }
        unlink_at(from_dir, from_name)
    }

    /// Removes `path`: a file, a symlink (not what it leads to) or a whole
    /// directory tree.
    pub fn remove_tree(&self, path: &str, user: FsUser) -> io::Result<()> {
        let root = self.root_fd()?;
        let _as = ActingAs::enter(user)?;
        let (dir, name) = self.parent_of(&root, path)?;
        super::remove_at(&dir, &name)
    }

    /// A regular file opened for reading (a final symlink followed, inside
    /// the root), and its size now. A directory is `EISDIR`.
    pub fn open_file(&self, path: &str, user: FsUser) -> io::Result<(File, u64)> {
        let root = self.root_fd()?;
        let _as = ActingAs::enter(user)?;
        let fd = self.open_in(
            &root,
            path,
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )?;
        let st = fstat(&fd)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Ok((File::from(fd), st.st_size as u64)),
            libc::S_IFDIR => Err(io::Error::from_raw_os_error(libc::EISDIR)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )),
        }
    }

    /// Starts writing `path` (missing parents made): a new file that replaces
    /// whatever is there — a file (keeping its permission bits) or a symlink
    /// (not written through) — when committed. A directory is `EISDIR`.
    pub fn replace_file(&self, path: &str, user: FsUser) -> io::Result<NewFile> {
        let root = self.root_fd()?;
        let _as = ActingAs::enter(user)?;
        let parts = components(path);
        let Some((name, parents)) = parts.split_last() else {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        };
        if *name == ".." {
            return Err(no_name(path));
        }
        let dir = self.dirs_made(&root, parents)?;
        let name = cstr(name)?;
        let mode = match fstat_at(&dir, &name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st.st_mode & 0o777,
            _ => 0o644,
        };
        let (temp, file) = create_temp(&dir, mode)?;
        Ok(NewFile {
            dir,
            name,
            temp,
            file: Some(file),
            user,
        })
    }
}

impl NewFile {
    /// The temporary file, to write to.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("only taken by commit")
    }

    /// Puts the written file in the target's place (an atomic rename: a
    /// reader sees the old file or the new one, never a part).
    pub fn commit(mut self) -> io::Result<()> {
        drop(self.file.take());
        let _as = ActingAs::enter(self.user)?;
        rename_at(&self.dir, &self.temp, &self.dir, &self.name)?;
        self.temp = CString::default();
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if self.temp.is_empty() {
            return;
        }
        if let Ok(_as) = ActingAs::enter(self.user) {
            let _ = unlink_at(&self.dir, &self.temp);
        }
    }
}
