//! A sandbox's files as E2B's envd offers them (SPEC §10): paths resolved as
//! envd resolves them, entries with their type, permissions, owner and time,
//! listings to a depth, directories made with their parents, renames,
//! removals, and files streamed out and in.
//!
//! Rules only. The jail resolves every path inside the sandbox's root and acts
//! with the sandbox user's rights (never root's, whoever the request names);
//! the HTTP edge speaks the protocol. envd's two users, `user` and `root`, are
//! both the sandbox user here: sandgate has one, and its home, `/home/user`
//! (a link to `/workspace`), is where relative paths start for either.

use std::io::{self, Write};
use std::sync::Arc;

use sandgate_jail::{FsUser, NewFile};

use super::{Live, SANDBOX_GID, SANDBOX_UID, SandboxError, SandboxManager};
use crate::principal::Principal;

/// Where relative paths and `~` lead.
pub const HOME: &str = "/home/user";
/// Most entries one listing returns.
pub const MAX_LIST_ENTRIES: usize = 50_000;
/// Longest path accepted.
const MAX_PATH: usize = 4096;

const USER: FsUser = FsUser {
    uid: SANDBOX_UID,
    gid: SANDBOX_GID,
};

/// Why a file operation failed, in terms the protocol distinguishes.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The sandbox itself (gone, or the jail failed).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A path that cannot name what the call needs (a directory for a file,
    /// no name at all, a loop of links, …).
    #[error("{0}")]
    Invalid(String),
    /// The sandbox user may not (a read-only part, another's file, /proc).
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    TooLarge(String),
    /// A user name other than envd's two.
    #[error("invalid username: '{0}'")]
    UnknownUser(String),
    #[error("file operation failed: {0}")]
    Io(io::Error),
}

/// envd's user names: `user` or `root` (both the sandbox user), or none.
pub fn check_username(name: Option<&str>) -> Result<(), FsError> {
    match name {
        None | Some("" | "user" | "root") => Ok(()),
        Some(other) => Err(FsError::UnknownUser(other.to_owned())),
    }
}

/// A path as envd resolves it: `~` and relative paths from [`HOME`] (empty:
/// the home itself), then cleaned of `.`, `..` and repeated slashes, lexically
/// (`..` above `/` stays at `/`). The jail resolves links inside the root.
pub fn envd_path(path: &str) -> Result<String, FsError> {
    if path.contains('\0') || path.len() > MAX_PATH {
        return Err(FsError::Invalid(format!(
            "path must have no NUL and at most {MAX_PATH} bytes"
        )));
    }
    let full = match path.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{HOME}{rest}"),
        Some(_) => {
            return Err(FsError::Invalid(format!(
                "cannot expand user-specific home dir in '{path}'"
            )));
        }
        None if path.starts_with('/') => path.to_owned(),
        None => format!("{HOME}/{path}"),
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in full.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// envd's file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    File,
    Directory,
    Symlink,
    Unspecified,
}

/// envd's `EntryInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub name: String,
    /// What the entry is; for a symlink, what it leads to (`Symlink` when it
    /// leads nowhere).
    pub kind: FileType,
    pub is_symlink: bool,
    pub path: String,
    pub size: u64,
    /// Permission bits (a symlink's: its target's).
    pub mode: u32,
    /// Like `ls -l` (Go's `FileMode` string, as envd writes it).
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub modified_secs: i64,
    pub modified_nanos: u32,
    pub symlink_target: Option<String>,
}

fn type_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FileType::File,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::Unspecified,
    }
}

/// Go's `FileMode.String()` of a `st_mode`: type letters (`-` when none),
/// then `rwxrwxrwx`.
fn permissions(mode: u32) -> String {
    let kind = mode & libc::S_IFMT;
    let mut s = String::with_capacity(12);
    let flags = [
        (kind == libc::S_IFDIR, 'd'),
        (kind == libc::S_IFLNK, 'L'),
        (kind == libc::S_IFBLK || kind == libc::S_IFCHR, 'D'),
        (kind == libc::S_IFIFO, 'p'),
        (kind == libc::S_IFSOCK, 'S'),
        (mode & libc::S_ISUID != 0, 'u'),
        (mode & libc::S_ISGID != 0, 'g'),
        (kind == libc::S_IFCHR, 'c'),
        (mode & libc::S_ISVTX != 0, 't'),
    ];
    s.extend(flags.iter().filter(|(on, _)| *on).map(|(_, c)| c));
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// envd's names of the two users (the sandbox user is its `user`).
fn name_of(id: u32) -> String {
    match id {
        0 => "root".to_owned(),
        SANDBOX_UID => "user".to_owned(),
        other => other.to_string(),
    }
}

fn entry_info(e: sandgate_jail::Entry) -> EntryInfo {
    let (kind, mode, symlink_target) = match &e.link {
        None => (type_of(e.mode), e.mode & 0o777, None),
        Some(link) => match link.target_mode {
            Some(m) => (type_of(m), m & 0o777, Some(link.target.clone())),
            None => (FileType::Symlink, 0, Some(link.target.clone())),
        },
    };
    EntryInfo {
        name: e.name,
        kind,
        is_symlink: e.link.is_some(),
        path: e.path,
        size: e.size,
        mode,
        permissions: permissions(e.mode),
        owner: name_of(e.uid),
        group: name_of(e.gid),
        modified_secs: e.modified_secs,
        modified_nanos: e.modified_nanos,
        symlink_target,
    }
}

/// A failed file operation on `path`, in the protocol's terms.
fn fs_error(e: io::Error, path: &str) -> FsError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => FsError::NotFound(format!("path '{path}' does not exist")),
        Some(libc::EACCES | libc::EPERM) => FsError::Denied(format!(
            "permission denied: the sandbox user may not do that to '{path}'"
        )),
        Some(libc::EROFS) => {
            FsError::Denied(format!("'{path}' is on a read-only part of the sandbox"))
        }
        Some(libc::ENOSPC | libc::EDQUOT) => {
            FsError::NoSpace(format!("not enough disk space in the sandbox for '{path}'"))
        }
        Some(libc::EISDIR) => FsError::Invalid(format!("path '{path}' is a directory")),
        Some(libc::ENOTDIR) => {
            FsError::Invalid(format!("a part of path '{path}' is not a directory"))
        }
        Some(libc::ELOOP) => {
            FsError::Invalid(format!("too many levels of symbolic links in '{path}'"))
        }
        Some(libc::ENAMETOOLONG) => FsError::Invalid(format!("a name in '{path}' is too long")),
        Some(libc::ENOTEMPTY) => {
            FsError::Invalid(format!("'{path}' is a directory that is not empty"))
        }
        Some(libc::EINVAL) => FsError::Invalid(format!("invalid operation on '{path}'")),
        _ => match e.kind() {
            io::ErrorKind::PermissionDenied => FsError::Denied(e.to_string()),
            io::ErrorKind::InvalidInput => FsError::Invalid(format!("'{path}': {e}")),
            _ => FsError::Io(e),
        },
    }
}

/// A file to stream out of a sandbox.
#[derive(Debug)]
pub struct Download {
    pub file: std::fs::File,
    /// Its size when opened: what is sent, at most.
    pub size: u64,
    pub path: String,
}

/// A file being streamed into a sandbox (blocking calls: run them off the
/// async threads). It replaces the target, atomically, at [`Upload::finish`];
/// dropped before, it leaves the target as it was.
#[derive(Debug)]
pub struct Upload {
    file: NewFile,
    written: u64,
    limit: u64,
    path: String,
}

impl Upload {
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Appends `data`, refusing to grow the file over the limit.
    pub fn write(&mut self, data: &[u8]) -> Result<(), FsError> {
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(FsError::TooLarge(format!(
                "the file is over the limit of {} bytes",
                self.limit
            )));
        }
        self.file
            .file()
            .write_all(data)
            .map_err(|e| fs_error(e, &self.path))
    }

    /// Puts the file in place; its path.
    pub fn finish(self) -> Result<String, FsError> {
        let path = self.path;
        self.file.commit().map_err(|e| fs_error(e, &path))?;
        Ok(path)
    }
}

/// What [`SandboxManager::make_dir`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MadeDir {
    Created,
    AlreadyThere,
}

impl SandboxManager {
    /// Runs `f` on the caller's live sandbox, on a blocking thread.
    async fn on_files<T: Send + 'static>(
        &self,
        caller: &Principal,
        id: &str,
        f: impl FnOnce(&sandgate_jail::Sandbox) -> Result<T, FsError> + Send + 'static,
    ) -> Result<T, FsError> {
        let live: Arc<Live> = self.find(caller, id)?;
        let result = tokio::task::spawn_blocking(move || {
            let guard = live.jail.read().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(f)
        })
        .await
        .map_err(|e| FsError::Io(io::Error::other(e.to_string())))?;
        result.unwrap_or(Err(FsError::Sandbox(SandboxError::NotFound)))
    }

    /// What `path` is (a final symlink described as itself).
    pub async fn stat_entry(
        &self,
        caller: &Principal,
        id: &str,
        path: &str,
    ) -> Result<EntryInfo, FsError> {
        let path = envd_path(path)?;
        self.on_files(caller, id, move |s| {
            s.entry(&path, USER)
                .map(entry_info)
                .map_err(|e| fs_error(e, &path))
        })
        .await
    }

    /// The entries under directory `path`, `depth` levels down (0 and 1: its
    /// own; at most [`sandgate_jail::MAX_LIST_DEPTH`]), links listed but not
    /// followed; at most [`MAX_LIST_ENTRIES`].
    pub async fn list_entries(
        &self,
        caller: &Principal,
        id: &str,
        path: &str,
        depth: u32,
    ) -> Result<Vec<EntryInfo>, FsError> {
        let path = envd_path(path)?;
        let (entries, cut) = self
            .on_files(caller, id, move |s| {
                s.list_tree(&path, depth.max(1), MAX_LIST_ENTRIES, USER)
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ENOTDIR) => {
                            FsError::Invalid(format!("path '{path}' is not a directory"))
                        }
                        _ => fs_error(e, &path),
                    })
            })
            .await?;
        if cut {
            return Err(FsError::Invalid(format!(
                "the listing has more than {MAX_LIST_ENTRIES} entries; list with a smaller depth"
            )));
        }
        Ok(entries.into_iter().map(entry_info).collect())
    }

    /// Makes directory `path` and its missing parents; the new directory.
    pub async fn make_dir(
        &self,
        caller: &Principal,
        id: &str,
        path: &str,
    ) -> Result<(MadeDir, EntryInfo), FsError> {
        let path = envd_path(path)?;
        self.on_files(caller, id, move |s| {
            let made = match s.make_dirs(&path, USER) {
                Ok(true) => MadeDir::Created,
                Ok(false) => MadeDir::AlreadyThere,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    return Err(FsError::Invalid(format!(
                        "path already exists but it is not a directory: {path}"
                    )));
                }
                Err(e) => return Err(fs_error(e, &path)),
            };
            let entry = s.entry(&path, USER).map_err(|e| fs_error(e, &path))?;
            Ok((made, entry_info(entry)))
        })
        .await
    }

    /// Renames `from` to `to` (missing parents of `to` made); what is at `to`.
    pub async fn move_entry(
        &self,
        caller: &Principal,
        id: &str,
        from: &str,
        to: &str,
    ) -> Result<EntryInfo, FsError> {
        let (from, to) = (envd_path(from)?, envd_path(to)?);
        self.on_files(caller, id, move |s| {
            s.rename_path(&from, &to, USER)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT) => {
                        FsError::NotFound(format!("source file not found: '{from}'"))
                    }
                    Some(libc::EXDEV) => FsError::Invalid(format!(
                        "cannot move directory '{from}' to '{to}': they are on different \
                         filesystems of the sandbox (/tmp and /workspace are separate ones)"
                    )),
                    _ => fs_error(e, &to),
                })?;
            s.entry(&to, USER)
                .map(entry_info)
                .map_err(|e| fs_error(e, &to))
        })
        .await
    }

    /// Removes a file, a symlink (not its target) or a directory tree; a path
    /// that does not exist is not an error (envd's `RemoveAll`).
    pub async fn remove_entry(
        &self,
        caller: &Principal,
        id: &str,
        path: &str,
    ) -> Result<(), FsError> {
        let path = envd_path(path)?;
        self.on_files(caller, id, move |s| match s.remove_tree(&path, USER) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(fs_error(e, &path)),
        })
        .await
    }

    /// A regular file, opened to stream out (a final symlink followed inside
    /// the sandbox).
    pub async fn open_download(
        &self,
        caller: &Principal,
        id: &str,
        path: &str,
    ) -> Result<Download, FsError> {
        let path = envd_path(path)?;
        self.on_files(caller, id, move |s| match s.open_file(&path, USER) {
            Ok((file, size)) => Ok(Download { file, size, path }),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Err(FsError::Invalid(format!(
                "path '{path}' is not a regular file"
            ))),
            Err(e) => Err(fs_error(e, &path)),
        })
        .await
    }

    /// Starts writing `path` (missing parents made), at most `limit` bytes.
    pub async fn start_upload(
        &self,
        caller: &Principal,
        id: &str,
        path: &str,
        limit: u64,
    ) -> Result<Upload, FsError> {
        let path = envd_path(path)?;
        self.on_files(caller, id, move |s| {
            let file = s
                .replace_file(&path, USER)
                .map_err(|e| fs_error(e, &path))?;
            Ok(Upload {
                file,
                written: 0,
                limit,
                path,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_as_envd_resolves_them() {
        for (given, resolved) in [
            ("", "/home/user"),
            ("~", "/home/user"),
            ("~/a/b", "/home/user/a/b"),
            ("notes.txt", "/home/user/notes.txt"),
            ("./a/../b", "/home/user/b"),
            ("/tmp//x/./y/", "/tmp/x/y"),
            ("/../../etc/shadow", "/etc/shadow"),
            ("../../../..", "/"),
            ("/", "/"),
        ] {
            assert_eq!(envd_path(given).unwrap(), resolved, "{given}");
        }
        assert!(matches!(envd_path("~root/x"), Err(FsError::Invalid(_))));
        assert!(matches!(envd_path("a\0b"), Err(FsError::Invalid(_))));
        assert!(envd_path(&"a/".repeat(3000)).is_err());
    }

    #[test]
    fn permissions_read_like_gos_file_modes() {
        assert_eq!(permissions(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(
            permissions(libc::S_IFDIR | libc::S_ISVTX | 0o777),
            "dtrwxrwxrwx"
        );
        assert_eq!(permissions(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
        assert_eq!(
            permissions(libc::S_IFREG | libc::S_ISUID | 0o755),
            "urwxr-xr-x"
        );
        assert_eq!(permissions(libc::S_IFIFO | 0o600), "prw-------");
    }

    #[test]
    fn only_envds_two_users_are_known() {
        for ok in [None, Some(""), Some("user"), Some("root")] {
            assert!(check_username(ok).is_ok());
        }
        assert!(matches!(
            check_username(Some("admin")),
            Err(FsError::UnknownUser(_))
        ));
    }

    #[test]
    fn a_symlink_reports_its_targets_type_or_itself_when_dangling() {
        let base = sandgate_jail::Entry {
            path: "/home/user/l".into(),
            name: "l".into(),
            mode: libc::S_IFLNK | 0o777,
            size: 4,
            uid: SANDBOX_UID,
            gid: SANDBOX_GID,
            modified_secs: 1,
            modified_nanos: 2,
            link: Some(sandgate_jail::Link {
                target: "/workspace".into(),
                target_mode: Some(libc::S_IFDIR | 0o755),
            }),
        };
        let info = entry_info(base.clone());
        assert_eq!(
            (info.kind, info.is_symlink, info.mode),
            (FileType::Directory, true, 0o755)
        );
        assert_eq!(info.symlink_target.as_deref(), Some("/workspace"));
        assert_eq!(
            (info.owner.as_str(), info.permissions.as_str()),
            ("user", "Lrwxrwxrwx")
        );
        let mut dangling = base;
        dangling.link = Some(sandgate_jail::Link {
            target: "/etc/shadow".into(),
            target_mode: None,
        });
        let info = entry_info(dangling);
        assert_eq!((info.kind, info.mode), (FileType::Symlink, 0));
    }
}
