//! Hostile programs through `POST /v1/execute`: each test tries one way out and
//! proves it is contained, with the server still serving afterwards.

use std::net::TcpListener;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{TestApp, jail_available, processes_named};

fn run_with(app: &TestApp, body: Value) -> Value {
    app.admin().execute(&body).expect("the run is answered")
}

/// The server answers and still runs programs.
#[track_caller]
fn assert_alive(app: &TestApp) {
    assert!(app.admin().whoami().is_ok(), "the server stopped answering");
    let r = app.run("bash", "echo alive");
    assert_eq!(r["stdout"], "alive\n", "{r}");
}

fn stdout(r: &Value) -> &str {
    r["stdout"].as_str().unwrap_or_default()
}

#[test]
fn host_files_are_out_of_reach() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let secret = app.data_dir().join("planted-secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    let project = env!("CARGO_MANIFEST_DIR");
    let targets = [
        secret.display().to_string(),
        app.data_dir().display().to_string(),
        "/root".to_owned(),
        "/etc/shadow".to_owned(),
        project.to_owned(),
        format!("{project}/Cargo.toml"),
        "/work".to_owned(),
        "/var/lib".to_owned(),
        "/usr/local/bin".to_owned(),
    ];
    let code = format!(
        "import os\nfor p in {targets:?}:\n    try:\n        if os.path.isdir(p):\n            print(p, 'LISTED', os.listdir(p))\n        else:\n            print(p, 'READ', open(p).read()[:40])\n    except OSError as e:\n        print(p, 'DENIED', type(e).__name__)\n"
    );
    let r = app.run("python", &code);
    let out = stdout(&r);
    for t in &targets {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{t} ")))
            .unwrap_or_else(|| panic!("no line for {t}: {r}"));
        // /usr/local exists (masked, empty); everything else must be absent.
        let contained = line.contains("DENIED") || line.ends_with("LISTED []");
        assert!(contained, "{line}");
    }
    assert!(!out.contains("host secret"));
    assert_alive(&app);
}

#[test]
fn host_paths_cannot_be_written() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let marker = format!("sandgate-write-probe-{}", std::process::id());
    let paths = [
        format!("/{marker}"),
        format!("/usr/{marker}"),
        format!("/etc/{marker}"),
        format!("/sandbox/{marker}"),
        format!("/dev/{marker}"),
        format!("/tmp/../usr/{marker}"),
        format!("{}/{marker}", app.data_dir().display()),
    ];
    let code = paths
        .iter()
        .map(|p| format!("(echo x > {p}) 2>/dev/null && echo WROTE {p} || echo DENIED {p}"))
        .collect::<Vec<_>>()
        .join("\n");
    let r = app.run("bash", &code);
    assert!(!stdout(&r).contains("WROTE"), "{r}");
    assert_eq!(stdout(&r).lines().count(), paths.len(), "{r}");
    for host in ["/", "/usr", "/etc", "/tmp"] {
        assert!(!std::path::Path::new(host).join(&marker).exists());
    }
    assert!(!app.data_dir().join(&marker).exists());
    // The program's own scratch space does work.
    let r = app.run(
        "bash",
        "echo ok > /tmp/a && echo ok > /workspace/b && cat /tmp/a /workspace/b",
    );
    assert_eq!(stdout(&r), "ok\nok\n");
    assert_alive(&app);
}

#[test]
fn the_network_is_loopback_only() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket\n\
         for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53), ('10.0.0.1', 80)]:\n\
         \x20   s = socket.socket(); s.settimeout(2)\n\
         \x20   try:\n\
         \x20       s.connect((host, port)); print(host, 'CONNECTED')\n\
         \x20   except OSError as e:\n\
         \x20       print(host, 'REFUSED', e.errno)\n\
         srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n\
         c = socket.create_connection(srv.getsockname()); print('own loopback works')\n"
    );
    let r = app.run("python", &code);
    let out = stdout(&r);
    assert!(!out.contains("CONNECTED"), "{r}");
    assert_eq!(out.matches("REFUSED").count(), 4, "{r}");
    assert!(out.contains("own loopback works"), "{r}");
    // Nothing reached the host's listener.
    assert!(
        listener.accept().is_err(),
        "a jailed program connected to the host"
    );
    assert_alive(&app);
}

#[test]
fn host_processes_are_invisible_and_unkillable() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let r = app.run(
        "bash",
        "ls -d /proc/[0-9]* | wc -l; cat /proc/1/cmdline 2>/dev/null && echo SAW-INIT; ps -e -o pid=,comm= | head",
    );
    let out = stdout(&r);
    let visible: usize = out.lines().next().unwrap().trim().parse().unwrap();
    assert!(visible <= 4, "saw {visible} processes: {out}");
    assert!(!out.contains("SAW-INIT"), "{out}");
    assert!(!out.contains("sandgate") && !out.contains("api-"), "{out}");
    // Kill everything it can see: its own background processes die (status
    // 128 + 9), nothing else. Read from `wait`: bash's own "Killed" notices on
    // stderr are not one per job every time.
    let r = app.run(
        "bash",
        "sleep 100 & a=$!; sleep 100 & b=$!; kill -9 -1; wait $a; echo a=$?; wait $b; echo b=$?; echo survived",
    );
    assert_eq!(stdout(&r), "a=137\nb=137\nsurvived\n", "{r}");
    assert_alive(&app);
}

#[test]
fn privileged_calls_fail() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let code = r#"
try() { if "$@" >/dev/null 2>&1; then echo "ALLOWED $*"; else echo "denied $1"; fi; }
try mount -t tmpfs none /tmp
try umount /proc
try hostname hacked
try sh -c 'echo 1 > /proc/sys/vm/drop_caches'
try sh -c 'echo hacked > /proc/sys/kernel/hostname'
try unshare -r true
try unshare -n true
try chroot / true
try /usr/bin/python3 -c 'import ctypes,sys; sys.exit(ctypes.CDLL(None).ptrace(0,0,0,0) != 0)'
try /usr/bin/python3 -c 'import ctypes,sys; sys.exit(ctypes.CDLL(None).setuid(0) != 0)'
hostname
id -u
grep Cap /proc/self/status
grep -E 'NoNewPrivs|Seccomp:' /proc/self/status
"#;
    let r = app.run("bash", code);
    let out = stdout(&r);
    assert!(!out.contains("ALLOWED"), "{out}\n{}", r["stderr"]);
    assert_eq!(out.matches("denied").count(), 10, "{out}");
    assert!(out.contains("\nsandbox\n65534\n"), "{out}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            out.contains(&format!("{cap}:\t0000000000000000")),
            "{cap} not empty: {out}"
        );
    }
    assert!(
        out.contains("NoNewPrivs:\t1") && out.contains("Seccomp:\t2"),
        "{out}"
    );
    assert_alive(&app);
}

#[test]
fn a_fork_bomb_is_contained() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let r = run_with(
        &app,
        json!({"language": "bash", "code": "b() { b | b & }; b; sleep 2; echo after", "timeoutMs": 4000}),
    );
    // Either the process limit stopped it (and the shell went on) or the deadline did.
    let stopped = r["status"] == "timeout"
        || r["stderr"]
            .as_str()
            .unwrap()
            .contains("Resource temporarily unavailable");
    assert!(stopped, "{}", r["status"]);
    assert_alive(&app);
}

#[test]
fn memory_past_the_limit_is_stopped() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let r = run_with(
        &app,
        json!({"language": "python", "code": "x = bytearray(1024 * 1024 * 1024)\nprint('allocated')", "memoryMb": 64}),
    );
    assert_eq!(r["status"], "memory_limit", "{r}");
    assert_eq!(r["success"], false);
    assert!(!stdout(&r).contains("allocated"));
    assert_alive(&app);
}

#[test]
fn the_deadline_is_kept() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let started = std::time::Instant::now();
    let r = run_with(
        &app,
        json!({"language": "python", "code": "while True:\n    pass", "timeoutMs": 500}),
    );
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["exitCode"], Value::Null);
    assert!(started.elapsed() < Duration::from_secs(10));
    // A program that ignores signals is killed just the same.
    let r = run_with(
        &app,
        json!({"language": "bash", "code": "trap '' TERM INT HUP; while :; do :; done", "timeoutMs": 300}),
    );
    assert_eq!(r["status"], "timeout", "{r}");
    assert_alive(&app);
}

#[test]
fn scratch_space_is_capped() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start_with(|c| c.exec_limits.tmpfs_bytes = 8 << 20);
    let r = app.run(
        "bash",
        "head -c 50000000 /dev/zero > /tmp/fill; echo \"exit $?\"; du -sm /tmp | cut -f1",
    );
    let out = stdout(&r);
    assert!(!out.contains("exit 0"), "{r}");
    let mb: u64 = out.lines().last().unwrap().trim().parse().unwrap();
    assert!(mb <= 8, "{out}");
    assert_alive(&app);
}

#[test]
fn a_hundred_megabytes_of_output_is_cut_at_the_cap() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let r = app.run("python", "import sys\nsys.stdout.write('x' * 100_000_000)");
    assert_eq!(r["status"], "output_limit", "{}", r["status"]);
    assert_eq!(r["truncated"], true);
    assert_eq!(stdout(&r).len(), 1024 * 1024);
    assert_alive(&app);
}

#[test]
fn nothing_is_left_running_after_the_program_exits() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let marker = format!("sandgate-bg-marker-{}", std::process::id());
    let r = app.run(
        "bash",
        &format!(
            "nohup setsid bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 & echo started"
        ),
    );
    assert_eq!(stdout(&r), "started\n");
    std::thread::sleep(Duration::from_millis(200));
    let leaked = processes_named(&marker);
    assert_eq!(leaked, 0, "a background process outlived its run");
    assert_alive(&app);
}
