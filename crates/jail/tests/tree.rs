//! Directory trees inside a sandbox, through the server-side file functions:
//! entries, listings, directories, renames, removals and streamed files, with
//! the sandbox user's rights, never reaching a host file.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;

use sandgate_jail::{Sandbox, Spec};

mod common;
use common::{USER, jail, run};

fn write(sandbox: &Sandbox, path: &str, data: &[u8]) {
    let mut f = sandbox.replace_file(path, USER).unwrap();
    f.file().write_all(data).unwrap();
    f.commit().unwrap();
}

fn read(sandbox: &Sandbox, path: &str) -> std::io::Result<Vec<u8>> {
    let (mut f, size) = sandbox.open_file(path, USER)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    assert_eq!(data.len() as u64, size);
    Ok(data)
}

/// A file on the host, outside every sandbox, that no test may change.
struct HostFile(String);

impl HostFile {
    fn new(tag: &str) -> HostFile {
        let path = format!("/tmp/sandgate-tree-{tag}-{}", std::process::id());
        std::fs::write(&path, "host secret").unwrap();
        HostFile(path)
    }
    fn untouched(&self) {
        assert_eq!(std::fs::read_to_string(&self.0).unwrap(), "host secret");
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn entries_listings_dirs_renames_and_removals() {
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    assert!(sandbox.make_dirs("/workspace/a/b", USER).unwrap());
    assert!(
        !sandbox.make_dirs("/workspace/a/b", USER).unwrap(),
        "already there"
    );
    write(&sandbox, "/home/user/a/b/c.txt", b"hello");
    write(&sandbox, "/workspace/a/z.txt", b"zz");
    let err = sandbox.make_dirs("/workspace/a/z.txt", USER).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    assert_eq!(
        run(
            &jail,
            &sandbox,
            "cat /workspace/a/b/c.txt; stat -c '%u %a' /workspace/a/b /workspace/a/b/c.txt"
        ),
        "hello65534 755\n65534 644\n"
    );

    let e = sandbox.entry("/workspace/a/b/c.txt", USER).unwrap();
    assert_eq!(
        (e.name.as_str(), e.kind(), e.size, e.uid),
        ("c.txt", "file", 5, 65534)
    );
    assert_eq!(e.mode & 0o777, 0o644);
    assert!(e.modified_secs > 1_600_000_000);
    let home = sandbox.entry("/home/user", USER).unwrap();
    assert_eq!(home.kind(), "symlink");
    let link = home.link.unwrap();
    assert_eq!(link.target, "/workspace");
    assert_eq!(link.target_mode.unwrap() & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(sandbox.entry("/", USER).unwrap().kind(), "dir");
    let missing = sandbox.entry("/workspace/nope", USER).unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);

    // Depth 1: the directory's own entries; 2: one level more; by name.
    let (one, cut) = sandbox.list_tree("/home/user/a", 1, 100, USER).unwrap();
    assert!(!cut);
    let paths: Vec<&str> = one.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/home/user/a/b", "/home/user/a/z.txt"]);
    let (two, _) = sandbox.list_tree("/home/user/a", 2, 100, USER).unwrap();
    let paths: Vec<&str> = two.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/home/user/a/b",
            "/home/user/a/b/c.txt",
            "/home/user/a/z.txt"
        ]
    );
    let (cut_short, cut) = sandbox.list_tree("/workspace/a", 5, 2, USER).unwrap();
    assert!(cut);
    assert_eq!(cut_short.len(), 2);
    let not_dir = sandbox
        .list_tree("/workspace/a/z.txt", 1, 100, USER)
        .unwrap_err();
    assert_eq!(not_dir.raw_os_error(), Some(libc::ENOTDIR));

    // Renames make the destination's parents; between /tmp and /workspace
    // (two mounts) a file is copied, keeping its bits.
    sandbox
        .rename_path("/workspace/a/z.txt", "/workspace/new/dir/z.txt", USER)
        .unwrap();
    assert_eq!(read(&sandbox, "/workspace/new/dir/z.txt").unwrap(), b"zz");
    assert!(read(&sandbox, "/workspace/a/z.txt").is_err());
    run(
        &jail,
        &sandbox,
        "echo moved > /tmp/m; chmod 750 /tmp/m; ln -s /etc/hostname /tmp/l",
    );
    sandbox.rename_path("/tmp/m", "/workspace/m", USER).unwrap();
    sandbox.rename_path("/tmp/l", "/workspace/l", USER).unwrap();
    assert_eq!(
        run(
            &jail,
            &sandbox,
            "cat /workspace/m; stat -c %a /workspace/m; readlink /workspace/l; ls /tmp"
        ),
        "moved\n750\n/etc/hostname\n"
    );
    let err = sandbox
        .rename_path("/workspace/a", "/tmp/a", USER)
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EXDEV),
        "directories stay on their mount"
    );
    let err = sandbox
        .rename_path("/workspace/nope", "/workspace/x", USER)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);

    sandbox.remove_tree("/workspace/a", USER).unwrap();
    assert!(sandbox.entry("/workspace/a", USER).is_err());
    assert_eq!(
        sandbox
            .remove_tree("/workspace/a", USER)
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::NotFound
    );
}

#[test]
fn a_new_file_replaces_the_old_only_when_committed() {
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    write(&sandbox, "/workspace/f", b"old");
    run(&jail, &sandbox, "chmod 700 /workspace/f");
    let mut pending = sandbox.replace_file("/workspace/f", USER).unwrap();
    pending.file().write_all(b"half").unwrap();
    assert_eq!(read(&sandbox, "/workspace/f").unwrap(), b"old", "not yet");
    drop(pending);
    assert_eq!(read(&sandbox, "/workspace/f").unwrap(), b"old");
    assert_eq!(
        run(&jail, &sandbox, "ls -A /workspace"),
        "f\n",
        "no temporary file left"
    );
    write(&sandbox, "/workspace/f", b"new");
    assert_eq!(
        run(&jail, &sandbox, "cat /workspace/f; stat -c %a /workspace/f"),
        "new700\n"
    );
    let err = sandbox.replace_file("/workspace", USER).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
    let err = sandbox.open_file("/workspace", USER).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
    assert!(
        sandbox.open_file("/dev/zero", USER).is_err(),
        "regular files only"
    );
}

#[test]
fn the_sandbox_users_rights_apply() {
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    run(
        &jail,
        &sandbox,
        "echo private > /workspace/p; chmod 000 /workspace/p",
    );
    let err = read(&sandbox, "/workspace/p").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    // The read-only root and /usr stay read-only, whoever asks.
    assert!(sandbox.replace_file("/etc/passwd", USER).is_err());
    assert!(sandbox.make_dirs("/usr/evil", USER).is_err());
    assert!(sandbox.remove_tree("/usr/bin/env", USER).is_err());
    // A root-only directory of the host bound in (here /usr) is closed to the
    // user, as it is to programs inside.
    let dir = "/usr/share/polkit-1/rules.d";
    let closed = std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o005 == 0);
    if closed {
        let err = sandbox.list_tree(dir, 1, 100, USER).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{dir}");
    }
}

#[test]
fn hostile_links_lead_nowhere_outside() {
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    let host = HostFile::new("target");
    let h = &host.0;
    run(
        &jail,
        &sandbox,
        &format!(
            "cd /workspace; ln -s {h} abs; ln -s ../../../../../..{h} rel; ln -s abs chain; \
             ln -s / root; ln -s /etc/shadow shadow; ln -s /proc/1/root proc; mkdir d; ln -s /tmp d/up"
        ),
    );
    for link in ["abs", "rel", "chain"] {
        let path = format!("/workspace/{link}");
        assert_eq!(
            read(&sandbox, &path).unwrap_err().kind(),
            std::io::ErrorKind::NotFound,
            "{path}"
        );
        let e = sandbox.entry(&path, USER).unwrap();
        assert_eq!(e.kind(), "symlink");
        assert_eq!(e.link.unwrap().target_mode, None, "{path} leads nowhere");
    }
    assert!(read(&sandbox, &format!("/workspace/root/..{h}")).is_err());
    let shadow = sandbox
        .entry("/workspace/shadow", USER)
        .unwrap()
        .link
        .unwrap();
    assert_eq!(
        (shadow.target.as_str(), shadow.target_mode),
        ("/etc/shadow", None)
    );
    let root = sandbox
        .entry("/workspace/root", USER)
        .unwrap()
        .link
        .unwrap();
    assert_eq!(root.target, "/");
    assert!(
        sandbox
            .entry("/workspace/proc", USER)
            .unwrap()
            .link
            .unwrap()
            .target_mode
            .is_none()
    );
    assert!(sandbox.list_tree("/workspace/proc", 1, 100, USER).is_err());
    assert!(sandbox.list_tree("/proc", 1, 100, USER).is_err());
    assert!(sandbox.entry("/proc/1/environ", USER).is_err());

    // A listing shows links as links and never descends through them, nor
    // into /proc from the root.
    let (entries, _) = sandbox.list_tree("/workspace", 3, 10_000, USER).unwrap();
    assert!(
        entries
            .iter()
            .all(|e| !e.path.starts_with("/workspace/root/"))
    );
    let up = entries
        .iter()
        .find(|e| e.path == "/workspace/d/up")
        .unwrap();
    assert_eq!(up.link.as_ref().unwrap().target, "/tmp");
    let (top, _) = sandbox.list_tree("/", 2, 100_000, USER).unwrap();
    assert!(top.iter().any(|e| e.path == "/proc"));
    assert!(
        !top.iter().any(|e| e.path.starts_with("/proc/")),
        "not into /proc"
    );
    assert!(top.iter().any(|e| e.path == "/usr/bin"));

    // Writes and renames through or onto links replace links, or land inside.
    write(&sandbox, "/workspace/abs", b"pwned");
    assert_eq!(
        sandbox.entry("/workspace/abs", USER).unwrap().kind(),
        "file"
    );
    host.untouched();
    write(&sandbox, &format!("/workspace/root/..{h}"), b"inside");
    assert_eq!(run(&jail, &sandbox, &format!("cat {h}")), "inside");
    host.untouched();
    sandbox
        .rename_path("/workspace/rel", "/workspace/renamed", USER)
        .unwrap();
    write(&sandbox, "/workspace/x", b"x");
    sandbox
        .rename_path("/workspace/x", "/workspace/chain", USER)
        .unwrap();
    assert_eq!(
        read(&sandbox, "/workspace/chain").unwrap(),
        b"x",
        "the link was replaced"
    );
    sandbox
        .rename_path("/workspace/chain", "/workspace/root/tmp/through", USER)
        .unwrap();
    assert_eq!(
        run(&jail, &sandbox, "cat /tmp/through"),
        "x",
        "through a link to /: inside"
    );
    sandbox
        .rename_path(
            "/workspace/renamed",
            &format!("/workspace/root/../../..{h}"),
            USER,
        )
        .unwrap();
    host.untouched();
    assert!(
        sandbox
            .rename_path("/workspace/shadow", "/workspace/root/etc/passwd", USER)
            .is_err()
    );
    assert!(
        sandbox
            .make_dirs(&format!("/workspace/root/..{h}.d"), USER)
            .unwrap()
    );
    assert!(!std::path::Path::new(&format!("{h}.d")).exists());
    // Removing a link leaves its target.
    sandbox.remove_tree("/workspace/root", USER).unwrap();
    assert!(read(&sandbox, "/usr/bin/env").is_ok());
    host.untouched();
}
