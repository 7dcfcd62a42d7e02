//! Template layers: what a build left in a sandbox's `/workspace`, kept on the
//! host, then the read-only lower layer of other sandboxes' `/workspace`.
//!
//! **Capture** ([`Sandbox::capture`]) copies a directory of a sandbox, frozen for
//! the whole copy, into a new host directory. Every name is opened relative to an
//! already-open directory, one component at a time, with `O_NOFOLLOW`, and checked
//! again with `fstat` on what was opened: a symlink the sandbox made is copied as a
//! symlink (its target text means something only inside a sandbox, where it is
//! resolved), never followed; nothing on another filesystem (a mount point) is
//! entered; only directories, regular files and symlinks are kept — FIFOs,
//! sockets and devices are skipped and reported. Copies belong to the sandbox
//! user, without set-id bits; the total size (logical: a sparse file counts its
//! full length) and the number of entries are capped, so a build cannot fill the
//! host's disk. Nothing here ever resolves a path the sandbox wrote.
//!
//! **Use** ([`Jail::create_sandbox_on`]): `/workspace` is an overlay mount whose
//! lower dir is the layer and whose upper and work dirs live inside the sandbox's
//! own size-capped `/workspace` tmpfs, hidden under the overlay. Starting a sandbox
//! copies nothing, its writes go to its own tmpfs only, and the layer is never
//! written (overlayfs does not modify lower layers).

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::child::Op;
use crate::fd::{check, fstat, fstat_at, open_at, read_link_at, read_names};
use crate::{Jail, Sandbox, Spec, cstr, invalid};

/// Bounds on one capture.
#[derive(Debug, Clone, Copy)]
pub struct CaptureLimits {
    /// File bytes (and symlink target lengths) in all.
    pub max_bytes: u64,
    /// Directories, files and symlinks in all.
    pub max_entries: u64,
}

/// What a capture kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureReport {
    pub bytes: u64,
    pub entries: u64,
    /// What was not kept, as `"<kind> <path inside the sandbox>"`.
    pub skipped: Vec<String>,
}

/// Why a capture failed. Paths are the sandbox's, never the host's.
#[derive(Debug)]
pub enum CaptureError {
    /// The files add up to more than [`CaptureLimits::max_bytes`].
    TooLarge { limit: u64 },
    /// More than [`CaptureLimits::max_entries`] entries.
    TooManyEntries { limit: u64 },
    /// Directories nested deeper than [`MAX_DEPTH`].
    TooDeep { path: String },
    /// Reading the sandbox's side (or freezing it).
    Read { path: String, source: io::Error },
    /// Writing the host's copy.
    Write { path: String, source: io::Error },
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::TooLarge { limit } => {
                write!(f, "the files add up to more than the cap of {limit} bytes")
            }
            CaptureError::TooManyEntries { limit } => {
                write!(f, "more than the cap of {limit} files and directories")
            }
            CaptureError::TooDeep { path } => {
                write!(f, "{path}: directories nested deeper than {MAX_DEPTH}")
            }
            CaptureError::Read { path, source } => write!(f, "reading {path}: {source}"),
            CaptureError::Write { path, source } => write!(f, "keeping {path}: {source}"),
        }
    }
}

impl std::error::Error for CaptureError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CaptureError::Read { source, .. } | CaptureError::Write { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Deepest directory nesting a capture follows.
pub const MAX_DEPTH: usize = 128;
/// How long the processes of a sandbox may take to freeze before a capture.
const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Mount options the overlay may not contain in a path (they separate options
/// and layers).
const OVERLAY_SPECIAL: &[u8] = b",:\\\n=";

impl Jail {
    /// [`Jail::create_sandbox`], with `/workspace` showing the directory `layer`
    /// (a capture) copy-on-write: an overlay whose writes go to the sandbox's own
    /// `/workspace` tmpfs. `layer` is the server's own path: absolute, without
    /// `,` `:` `\` `=` or newlines.
    pub fn create_sandbox_on(&self, spec: &Spec, layer: &Path) -> io::Result<Sandbox> {
        if !std::fs::symlink_metadata(layer)?.is_dir() {
            return Err(invalid("a layer must be a directory"));
        }
        let ops = self.plan_fs_on(spec, Some(layer))?;
        self.create_sandbox_with(spec, ops)
    }
}

/// The steps that put an overlay of `lower` on the `/workspace` tmpfs at
/// `workspace` (a path under the jail's future root): its upper and work dirs are
/// made inside that tmpfs, then covered by the overlay itself.
pub(crate) fn workspace_overlay(
    workspace: &CStr,
    lower: &Path,
    uid: u32,
    gid: u32,
) -> io::Result<Vec<Op>> {
    let lower = lower.as_os_str().as_bytes();
    if !lower.starts_with(b"/") || lower.iter().any(|b| OVERLAY_SPECIAL.contains(b)) {
        return Err(invalid(
            "a layer's path must be absolute, without , : \\ = or newlines",
        ));
    }
    let ws = workspace.to_bytes();
    let upper = [ws, b"/.upper"].concat();
    let work = [ws, b"/.work"].concat();
    let mut options = b"lowerdir=".to_vec();
    for part in [lower, b",upperdir=", &upper, b",workdir=", &work] {
        options.extend_from_slice(part);
    }
    // Plain overlay semantics, whatever the module's defaults: no redirects,
    // index, metacopy or inode tricks.
    options.extend_from_slice(b",redirect_dir=off,index=off,metacopy=off,xino=off");
    Ok(vec![
        Op::Mkdir {
            path: cstr(&upper)?,
            mode: 0o755,
        },
        // The upper dir's owner is `/workspace`'s owner as the sandbox sees it.
        Op::Chown {
            path: cstr(&upper)?,
            uid,
            gid,
        },
        Op::Mkdir {
            path: cstr(&work)?,
            mode: 0o700,
        },
        Op::Mount {
            src: Some(cstr(b"overlay")?),
            dst: workspace.to_owned(),
            fstype: Some(cstr(b"overlay")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(cstr(&options)?),
        },
    ])
}

impl Sandbox {
    /// Copies the sandbox's directory `dir` (e.g. `/workspace`) to `dest`, a host
    /// path that must not exist yet (its parent must). The sandbox is frozen during
    /// the copy, so nothing inside can change what is being read. On failure
    /// nothing is left at `dest`; on success it is on disk (`syncfs`). Everything
    /// copied belongs to `uid`:`gid`.
    pub fn capture(
        &self,
        dir: &str,
        dest: &Path,
        limits: &CaptureLimits,
        uid: u32,
        gid: u32,
    ) -> Result<CaptureReport, CaptureError> {
        let read_err = |source| CaptureError::Read {
            path: dir.to_owned(),
            source,
        };
        self.set_frozen(true).map_err(read_err)?;
        let deadline = std::time::Instant::now() + FREEZE_TIMEOUT;
        while !self.is_frozen() {
            if std::time::Instant::now() > deadline {
                let _ = self.set_frozen(false);
                return Err(read_err(io::Error::other("the sandbox did not freeze")));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            // A v1 freezer can stay FREEZING while processes keep forking (a
            // child born during the pass escapes it): asking again freezes those.
            self.set_frozen(true).map_err(read_err)?;
        }
        let result = self.capture_frozen(dir, dest, limits, uid, gid);
        let _ = self.set_frozen(false);
        result
    }

    fn capture_frozen(
        &self,
        dir: &str,
        dest: &Path,
        limits: &CaptureLimits,
        uid: u32,
        gid: u32,
    ) -> Result<CaptureReport, CaptureError> {
        let read_err = |source| CaptureError::Read {
            path: dir.to_owned(),
            source,
        };
        let root = self.root_fd().map_err(read_err)?;
        let src = self
            .open_in(
                &root,
                dir,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(read_err)?;
        let st = fstat(&src).map_err(read_err)?;
        std::fs::create_dir(dest).map_err(|source| CaptureError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let result = (|| {
            let dest_c =
                cstr(dest.as_os_str().as_bytes()).map_err(|source| CaptureError::Write {
                    path: dir.to_owned(),
                    source,
                })?;
            let dst = open_at(
                libc::AT_FDCWD,
                &dest_c,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|source| CaptureError::Write {
                path: dir.to_owned(),
                source,
            })?;
            let mut walk = Walk {
                limits,
                dev: st.st_dev,
                uid,
                gid,
                out: CaptureReport::default(),
            };
            let mut path = dir.trim_end_matches('/').to_owned();
            walk.directory(&src, &dst, &mut path, 0)?;
            finish(&dst, &st, uid, gid).map_err(|source| CaptureError::Write {
                path: dir.to_owned(),
                source,
            })?;
            // On disk before the caller records it as built.
            // SAFETY: syncfs on an fd we own; no memory effects.
            check(unsafe { libc::syncfs(dst.as_raw_fd()) }).map_err(|source| {
                CaptureError::Write {
                    path: dir.to_owned(),
                    source,
                }
            })?;
            Ok(walk.out)
        })();
        if result.is_err() {
            // Our own fresh directory: removing it follows no link.
            let _ = std::fs::remove_dir_all(dest);
        }
        result
    }
}

/// A capture in progress.
struct Walk<'a> {
    limits: &'a CaptureLimits,
    /// The captured directory's filesystem: nothing on another is entered.
    dev: libc::dev_t,
    uid: u32,
    gid: u32,
    out: CaptureReport,
}

impl Walk<'_> {
    /// Copies the entries of `src` into `dst`; `path` names `src` in the sandbox.
    fn directory(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        path: &mut String,
        depth: usize,
    ) -> Result<(), CaptureError> {
        let names = read_names(src).map_err(|source| CaptureError::Read {
            path: path.clone(),
            source,
        })?;
        for name in names {
            let len = path.len();
            path.push('/');
            path.push_str(&String::from_utf8_lossy(name.to_bytes()));
            let r = self.entry(src, dst, &name, path, depth);
            path.truncate(len);
            r?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &CStr,
        path: &mut String,
        depth: usize,
    ) -> Result<(), CaptureError> {
        let read = |source| CaptureError::Read {
            path: path.clone(),
            source,
        };
        let write = |source| CaptureError::Write {
            path: path.clone(),
            source,
        };
        let st = fstat_at(src, name).map_err(read)?;
        if st.st_dev != self.dev {
            self.out.skipped.push(format!("mount point {path}"));
            return Ok(());
        }
        let kind = st.st_mode & libc::S_IFMT;
        if !matches!(kind, libc::S_IFDIR | libc::S_IFREG | libc::S_IFLNK) {
            let what = match kind {
                libc::S_IFIFO => "FIFO",
                libc::S_IFSOCK => "socket",
                libc::S_IFCHR => "character device",
                libc::S_IFBLK => "block device",
                _ => "special file",
            };
            self.out.skipped.push(format!("{what} {path}"));
            return Ok(());
        }
        self.out.entries += 1;
        if self.out.entries > self.limits.max_entries {
            return Err(CaptureError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        match kind {
            libc::S_IFDIR => {
                if depth + 1 > MAX_DEPTH {
                    return Err(CaptureError::TooDeep { path: path.clone() });
                }
                let sub = open_at(
                    src.as_raw_fd(),
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(read)?;
                // What was opened is what was looked at (nothing swapped it).
                let st = fstat(&sub).map_err(read)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR || st.st_dev != self.dev {
                    return Err(read(io::Error::other("changed while being copied")));
                }
                // SAFETY: mkdirat of one plain component under a directory we hold.
                check(unsafe { libc::mkdirat(dst.as_raw_fd(), name.as_ptr(), 0o700) })
                    .map_err(write)?;
                let dsub = open_at(
                    dst.as_raw_fd(),
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .map_err(write)?;
                self.directory(&sub, &dsub, path, depth + 1)?;
                let write = |source| CaptureError::Write {
                    path: path.clone(),
                    source,
                };
                finish(&dsub, &st, self.uid, self.gid).map_err(write)
            }
            libc::S_IFREG => {
                let file = open_at(
                    src.as_raw_fd(),
                    name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
                    0,
                )
                .map_err(read)?;
                let st = fstat(&file).map_err(read)?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_dev != self.dev {
                    return Err(read(io::Error::other("changed while being copied")));
                }
                let size = st.st_size.max(0) as u64;
                let room = self.limits.max_bytes.saturating_sub(self.out.bytes);
                if size > room {
                    return Err(CaptureError::TooLarge {
                        limit: self.limits.max_bytes,
                    });
                }
                let out = open_at(
                    dst.as_raw_fd(),
                    name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(write)?;
                let mut from = io::Read::take(std::fs::File::from(file), room + 1);
                let mut to = std::fs::File::from(out);
                let copied = io::copy(&mut from, &mut to).map_err(write)?;
                if copied > room {
                    return Err(CaptureError::TooLarge {
                        limit: self.limits.max_bytes,
                    });
                }
                self.out.bytes += copied;
                finish(&OwnedFd::from(to), &st, self.uid, self.gid).map_err(write)
            }
            _ => {
                let target = read_link_at(src, name).map_err(read)?;
                let room = self.limits.max_bytes.saturating_sub(self.out.bytes);
                if target.to_bytes().len() as u64 > room {
                    return Err(CaptureError::TooLarge {
                        limit: self.limits.max_bytes,
                    });
                }
                self.out.bytes += target.to_bytes().len() as u64;
                // SAFETY: symlinkat/fchownat/utimensat of one plain component under
                // a directory we hold; none of them follows the new link.
                unsafe {
                    check(libc::symlinkat(
                        target.as_ptr(),
                        dst.as_raw_fd(),
                        name.as_ptr(),
                    ))
                    .map_err(write)?;
                    check(libc::fchownat(
                        dst.as_raw_fd(),
                        name.as_ptr(),
                        self.uid,
                        self.gid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    ))
                    .map_err(write)?;
                    let times = [st.st_atime_spec(), st.st_mtime_spec()];
                    check(libc::utimensat(
                        dst.as_raw_fd(),
                        name.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    ))
                    .map_err(write)?;
                }
                Ok(())
            }
        }
    }
}

/// The access and modification times of a `stat`, as `utimensat` takes them.
trait StatTimes {
    fn st_atime_spec(&self) -> libc::timespec;
    fn st_mtime_spec(&self) -> libc::timespec;
}

impl StatTimes for libc::stat {
    fn st_atime_spec(&self) -> libc::timespec {
        libc::timespec {
            tv_sec: self.st_atime,
            tv_nsec: self.st_atime_nsec,
        }
    }
    fn st_mtime_spec(&self) -> libc::timespec {
        libc::timespec {
            tv_sec: self.st_mtime,
            tv_nsec: self.st_mtime_nsec,
        }
    }
}

/// Gives a copied file or directory its owner, permission bits (no set-id or
/// sticky bits) and times.
fn finish(fd: &OwnedFd, st: &libc::stat, uid: u32, gid: u32) -> io::Result<()> {
    let times = [st.st_atime_spec(), st.st_mtime_spec()];
    // SAFETY: fchown/fchmod/futimens on an fd we own; `times` is a live array of two.
    unsafe {
        check(libc::fchown(fd.as_raw_fd(), uid, gid))?;
        check(libc::fchmod(fd.as_raw_fd(), st.st_mode & 0o777))?;
        check(libc::futimens(fd.as_raw_fd(), times.as_ptr()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_that_would_split_the_mount_options_are_refused() {
        let ws = c"/run/sandgate/root/workspace";
        for bad in [
            "relative/dir",
            "/data/a,b",
            "/data/a:b",
            "/data/a=b",
            "/d\\x",
        ] {
            assert!(
                workspace_overlay(ws, Path::new(bad), 1, 1).is_err(),
                "{bad}"
            );
        }
        let ops = workspace_overlay(ws, Path::new("/data/templates/layers/bld_1"), 1, 1).unwrap();
        let Some(Op::Mount {
            data: Some(data), ..
        }) = ops.last()
        else {
            panic!("{ops:?}")
        };
        assert_eq!(
            data.to_str().unwrap(),
            "lowerdir=/data/templates/layers/bld_1,upperdir=/run/sandgate/root/workspace/.upper,\
             workdir=/run/sandgate/root/workspace/.work,redirect_dir=off,index=off,metacopy=off,xino=off"
        );
    }
}
