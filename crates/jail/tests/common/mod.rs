//! What the jail's test binaries share: the jail (or a "skipped" line where this
//! machine cannot make one), a bash script as a spec, and the sandbox user.
#![allow(dead_code)] // each test binary uses its own part of this

use sandgate_jail::{Config, FsUser, Jail, Sandbox, Spec, Status};

/// The sandbox user, whose rights the file functions use.
pub const USER: FsUser = FsUser {
    uid: 65534,
    gid: 65534,
};

pub fn jail() -> Option<Jail> {
    match Jail::new(Config::default()) {
        Ok(j) => Some(j),
        Err(e) => {
            eprintln!("skipped: the jail is unavailable here: {e}");
            None
        }
    }
}

pub fn sh(script: &str) -> Spec {
    Spec {
        argv: vec!["/bin/bash".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Spec::default()
    }
}

/// Runs `script` in `sandbox`, asserts it exits 0, and returns its stdout.
pub fn run(jail: &Jail, sandbox: &Sandbox, script: &str) -> String {
    let o = jail.exec(sandbox, &sh(script)).unwrap();
    assert_eq!(
        o.status,
        Status::Exited(0),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
