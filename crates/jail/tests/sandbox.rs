//! Long-lived sandboxes: programs run one after another inside the same jail.

use std::time::Duration;

use sandgate_jail::{Limits, Spec, Status};

mod common;
use common::{USER, jail, sh};

fn out(o: &sandgate_jail::Outcome) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn files_and_background_processes_persist_between_execs() {
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    let o = jail
        .exec(&sandbox, &sh("echo kept > /workspace/note; (exec -a bg-worker sleep 300) > /dev/null 2>&1 & echo started"))
        .unwrap();
    assert_eq!(o.status, Status::Exited(0));
    assert_eq!(out(&o), "started\n");
    let o = jail
        .exec(
            &sandbox,
            &sh("cat /workspace/note; ps -eo args | grep -c '^bg-worker'; id -u; hostname"),
        )
        .unwrap();
    assert_eq!(
        out(&o),
        "kept\n1\n65534\nsandbox\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A second sandbox sees none of it.
    let other = jail.create_sandbox(&Spec::default()).unwrap();
    let o = jail
        .exec(
            &other,
            &sh("cat /workspace/note 2>&1; ps -eo args | grep -c '^bg-worker'"),
        )
        .unwrap();
    assert!(out(&o).ends_with("0\n"), "{}", out(&o));
    assert!(out(&o).contains("No such file"));
}

#[test]
fn an_exec_keeps_its_own_deadline_and_the_sandbox_survives_it() {
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    let mut spec = sh("sleep 30");
    spec.limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let o = jail.exec(&sandbox, &spec).unwrap();
    assert_eq!(o.status, Status::Timeout);
    assert!(o.duration < Duration::from_secs(5));
    let o = jail.exec(&sandbox, &sh("echo still here")).unwrap();
    assert_eq!(out(&o), "still here\n");
    let o = jail.exec(&sandbox, &sh("exit 4")).unwrap();
    assert_eq!(o.status, Status::Exited(4));
}

#[test]
fn killing_the_sandbox_ends_everything_in_it() {
    let Some(jail) = jail() else { return };
    let marker = format!("sandbox-kill-marker-{}", std::process::id());
    let mut sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    jail.exec(
        &sandbox,
        &sh(&format!(
            "setsid bash -c 'exec -a {marker} sleep 300' > /dev/null 2>&1 &"
        )),
    )
    .unwrap();
    let alive = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&marker))
            .count()
    };
    assert_eq!(
        alive(),
        1,
        "the background process runs while the sandbox does"
    );
    assert!(sandbox.is_alive());
    sandbox.kill();
    assert_eq!(alive(), 0, "a process outlived its sandbox");
}

#[test]
fn a_frozen_sandbox_uses_no_cpu() {
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    jail.exec(&sandbox, &sh("(while :; do :; done) > /dev/null 2>&1 &"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    sandbox.set_frozen(true).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before = sandbox.cpu_time();
    std::thread::sleep(Duration::from_millis(500));
    let after = sandbox.cpu_time();
    assert!(
        after - before < Duration::from_millis(20),
        "{before:?} -> {after:?}"
    );
    sandbox.set_frozen(false).unwrap();
    // Thawed, it runs again (however busy the machine: wait for it, bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let last = loop {
        let now = sandbox.cpu_time();
        if now > after + Duration::from_millis(100) {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "thawed, it never ran");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Killing it tells the last word: at least what was read before.
    assert!(sandbox.kill() >= last);
}

#[test]
fn a_sandbox_outlives_the_thread_that_created_it() {
    let Some(jail) = jail() else { return };
    let jail = std::sync::Arc::new(jail);
    let maker = std::sync::Arc::clone(&jail);
    let sandbox = std::thread::spawn(move || maker.create_sandbox(&Spec::default()).unwrap())
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let o = jail.exec(&sandbox, &sh("echo alive")).unwrap();
    assert_eq!(out(&o), "alive\n");
}

#[test]
fn files_are_read_and_written_inside_the_sandbox_only() {
    use sandgate_jail::FileContent;
    let Some(jail) = jail() else { return };
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    // Written by the server, owned by the sandbox user, parents created.
    sandbox
        .write_path("/workspace/a/b/c.txt", b"hello", USER)
        .unwrap();
    let o = jail
        .exec(&sandbox, &sh("cat /workspace/a/b/c.txt; stat -c %u /workspace/a/b/c.txt /workspace/a; echo more >> /workspace/a/b/c.txt"))
        .unwrap();
    assert_eq!(
        out(&o),
        "hello65534\n65534\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    match sandbox
        .read_path("/workspace/a/b/c.txt", 1 << 20, USER)
        .unwrap()
    {
        FileContent::File(data) => assert_eq!(data, b"hellomore\n"),
        other => panic!("{other:?}"),
    }
    match sandbox.read_path("/workspace/a", 1 << 20, USER).unwrap() {
        FileContent::Dir(entries) => {
            assert_eq!(entries.len(), 1);
            assert_eq!((entries[0].name.as_str(), entries[0].kind), ("b", "dir"));
        }
        other => panic!("{other:?}"),
    }
    // Hostile links made inside lead nowhere outside.
    let host = format!("/tmp/sandgate-host-secret-{}", std::process::id());
    std::fs::write(&host, "host secret").unwrap();
    jail.exec(
        &sandbox,
        &sh(&format!(
            "cd /workspace; ln -s {host} abs; ln -s ../../../../../..{host} rel; ln -s / root; ln -s /proc/1/environ env"
        )),
    )
    .unwrap();
    for link in [
        "/workspace/abs",
        "/workspace/rel",
        "/workspace/root/..{host}",
    ] {
        let path = link.replace("{host}", &host);
        let err = sandbox.read_path(&path, 1 << 20, USER).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{path}: {err}");
    }
    assert!(
        sandbox
            .read_path("/workspace/../../..", 1 << 20, USER)
            .is_ok(),
        "`..` stops at the root"
    );
    let err = sandbox
        .read_path("/workspace/env", 1 << 20, USER)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(sandbox.read_path("/proc/1/environ", 1 << 20, USER).is_err());
    assert!(sandbox.read_path("/sys", 1 << 20, USER).is_err());
    // Writing through a link or into the read-only root fails; the host is untouched.
    assert!(
        sandbox
            .write_path("/workspace/abs", b"pwned", USER)
            .is_err()
    );
    assert!(
        sandbox
            .write_path("/workspace/root/usr/evil", b"x", USER)
            .is_err()
    );
    assert!(
        sandbox
            .write_path(&format!("/workspace/root/..{host}"), b"x", USER)
            .is_ok()
    );
    assert_eq!(std::fs::read_to_string(&host).unwrap(), "host secret");
    std::fs::remove_file(&host).unwrap();
    // Removing a tree, and a link without its target.
    sandbox.remove_path("/workspace/a", USER).unwrap();
    sandbox.remove_path("/workspace/root", USER).unwrap();
    assert!(sandbox.read_path("/workspace/a", 1 << 20, USER).is_err());
    assert!(
        sandbox.read_path("/usr/bin/env", 1 << 30, USER).is_ok(),
        "the link's target stays"
    );
}
