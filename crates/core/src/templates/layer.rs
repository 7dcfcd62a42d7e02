//! Where template layers live on the host, and when they go.
//!
//! One directory per build: `<data dir>/templates/layers/<build id>`. A build's
//! capture writes `templates/tmp/<build id>` and renames it into `layers/` once
//! complete and on disk, so a layer directory is always whole. A [`Layer`] is
//! shared by its template (while that build is the current one) and by every
//! sandbox started from it; once retired (the template rebuilt or deleted) it is
//! removed when its last holder lets go. What a crash leaves in between — a
//! `tmp/` directory, a layer nothing refers to — is swept at the next start.
//!
//! Nothing here follows links inside a layer: removal is `remove_dir_all`, which
//! unlinks symlinks without following them.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A built layer on disk.
#[derive(Debug)]
pub struct Layer {
    path: PathBuf,
    /// No template points to it any more: remove it when the last holder drops it.
    retired: AtomicBool,
}

impl Layer {
    pub(crate) fn new(path: PathBuf) -> Layer {
        Layer {
            path,
            retired: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        if !self.retired.load(Ordering::Relaxed) {
            // Still the template's (server shutdown): kept for the next start.
            return;
        }
        let path = std::mem::take(&mut self.path);
        // Off the caller's thread: a layer may hold many files.
        let spawned = std::thread::Builder::new()
            .name("sandgate-layer-rm".into())
            .spawn(move || remove(&path));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start removing a template layer");
        }
    }
}

fn remove(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => tracing::debug!(layer = %path.display(), "template layer removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(layer = %path.display(), error = %e, "could not remove a template layer")
        }
    }
}

/// The layers directory and the scratch directory beside it.
#[derive(Debug, Clone)]
pub(crate) struct LayerDirs {
    layers: PathBuf,
    tmp: PathBuf,
}

impl LayerDirs {
    /// Creates `templates/layers` and `templates/tmp` under `data_dir` (owner
    /// only) and empties `tmp` (captures a previous server did not finish).
    pub(crate) fn prepare(data_dir: &Path) -> io::Result<LayerDirs> {
        use std::os::unix::fs::PermissionsExt;
        // Absolute: the path becomes an overlay mount option (the data dir may be
        // given relative, as the default `./sandgate-data` is).
        let root = std::fs::canonicalize(data_dir)?.join("templates");
        let dirs = LayerDirs {
            layers: root.join("layers"),
            tmp: root.join("tmp"),
        };
        std::fs::create_dir_all(&dirs.layers)?;
        std::fs::create_dir_all(&dirs.tmp)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(&dirs.tmp)?.flatten() {
            remove(&entry.path());
        }
        let path = dirs.layers.as_os_str().as_encoded_bytes();
        if path.iter().any(|b| b",:\\=\n".contains(b)) {
            tracing::warn!(dir = %dirs.layers.display(),
                "the data dir's path holds , : \\ = or a newline: sandboxes cannot start from templates");
        }
        Ok(dirs)
    }

    /// The layer of build `id`, if it is on disk.
    pub(crate) fn existing(&self, id: &str) -> Option<PathBuf> {
        let path = self.layers.join(checked(id)?);
        std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.is_dir())
            .then_some(path)
    }

    /// Removes every layer whose build is not in `kept`.
    pub(crate) fn sweep(&self, kept: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.layers) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| kept.contains(n)) {
                tracing::info!(layer = ?name, "removing a template layer nothing uses");
                remove(&entry.path());
            }
        }
    }

    /// Where build `id` captures to.
    pub(crate) fn scratch(&self, id: &str) -> io::Result<PathBuf> {
        checked(id)
            .map(|id| self.tmp.join(id))
            .ok_or_else(|| io::Error::other("bad build id"))
    }

    /// Moves build `id`'s finished capture into place, durably; its final path.
    pub(crate) fn commit(&self, id: &str) -> io::Result<PathBuf> {
        let from = self.scratch(id)?;
        let to = self.layers.join(id);
        std::fs::rename(&from, &to)?;
        std::fs::File::open(&self.layers)?.sync_all()?;
        Ok(to)
    }
}

/// A build id as a single path component (they are ours: `bld_` and base62).
fn checked(id: &str) -> Option<&str> {
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_layer_goes_when_its_last_holder_does_and_a_current_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = LayerDirs::prepare(dir.path()).unwrap();
        for id in ["bld_a", "bld_b", "bld_c"] {
            std::fs::create_dir(dirs.scratch(id).unwrap()).unwrap();
            std::os::unix::fs::symlink("/etc", dirs.scratch(id).unwrap().join("etc")).unwrap();
            dirs.commit(id).unwrap();
        }
        std::fs::create_dir(dirs.scratch("bld_unfinished").unwrap()).unwrap();

        let current = std::sync::Arc::new(Layer::new(dirs.existing("bld_a").unwrap()));
        let held = std::sync::Arc::clone(&current);
        drop(current);
        assert!(dirs.existing("bld_a").is_some(), "not retired: kept");
        held.retire();
        drop(held);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while dirs.existing("bld_a").is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(dirs.existing("bld_a").is_none());
        assert!(
            Path::new("/etc/passwd").exists(),
            "the link was not followed"
        );

        // A restart keeps what records refer to and sweeps the rest.
        let dirs = LayerDirs::prepare(dir.path()).unwrap();
        assert!(!dirs.scratch("bld_unfinished").unwrap().exists());
        dirs.sweep(&HashSet::from(["bld_b".to_owned()]));
        assert!(dirs.existing("bld_b").is_some());
        assert!(dirs.existing("bld_c").is_none());
        assert!(dirs.existing("../layers/bld_b").is_none());
    }

    #[test]
    fn layers_have_absolute_paths_whatever_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        // The same directory, named relative to the working directory.
        let cwd = std::env::current_dir().unwrap();
        let up = "../".repeat(cwd.components().count());
        let relative = Path::new(&up).join(dir.path().strip_prefix("/").unwrap());
        assert!(relative.is_relative());
        let dirs = LayerDirs::prepare(&relative).unwrap();
        std::fs::create_dir(dirs.scratch("bld_x").unwrap()).unwrap();
        let path = dirs.commit("bld_x").unwrap();
        assert!(
            path.is_absolute() && path.starts_with(dir.path()),
            "{path:?}"
        );
        assert_eq!(dirs.existing("bld_x"), Some(path));
    }
}
