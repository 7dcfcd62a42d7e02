//! The jail's contract, run for real (root and cgroup v1 are required; without
//! them every test says it was skipped). Containment against hostile programs is
//! tested through the API in the server's suite; here: what comes out of a run.

use std::sync::OnceLock;
use std::time::Duration;

use sandgate_jail::{Config, Jail, Limits, Outcome, SandboxFile, Spec, Status};

fn jail() -> Option<&'static Jail> {
    static JAIL: OnceLock<Option<Jail>> = OnceLock::new();
    JAIL.get_or_init(|| match Jail::new(Config::default()) {
        Ok(j) => Some(j),
        Err(e) => {
            eprintln!("skipped: the jail is unavailable here: {e}");
            None
        }
    })
    .as_ref()
}

fn bash(script: &str, limits: Limits) -> Option<Outcome> {
    let spec = Spec {
        argv: vec!["/bin/bash".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        limits,
        ..Spec::default()
    };
    Some(jail()?.run(&spec).expect("the jail runs"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn output_exit_code_stdin_env_and_files_come_through() {
    let Some(jail) = jail() else { return };
    let spec = Spec {
        argv: vec![
            "/bin/bash".into(),
            "-c".into(),
            "read line; echo \"in:$line env:$GREETING cwd:$(pwd) me:$(id -u)\"; \
             cat /sandbox/note.txt; echo oops >&2; printf '{\"a\":1}' >&3; exit 7"
                .into(),
        ],
        env: vec![("GREETING".into(), "hello".into())],
        stdin: b"typed\n".to_vec(),
        files: vec![SandboxFile {
            name: "note.txt".into(),
            contents: b"from a file\n".to_vec(),
        }],
        ..Spec::default()
    };
    let o = jail.run(&spec).unwrap();
    assert_eq!(o.status, Status::Exited(7));
    assert_eq!(o.exit_code, Some(7));
    assert_eq!(
        text(&o.stdout),
        "in:typed env:hello cwd:/workspace me:65534\nfrom a file\n"
    );
    assert_eq!(text(&o.stderr), "oops\n");
    assert_eq!(o.result.as_deref(), Some(&b"{\"a\":1}"[..]));
    assert!(!o.truncated);
}

#[test]
fn large_stdin_is_fed_while_output_is_read() {
    let input = "x".repeat(3 << 20);
    let Some(jail) = jail() else { return };
    let spec = Spec {
        argv: vec!["/bin/bash".into(), "-c".into(), "wc -c".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        stdin: input.into_bytes(),
        ..Spec::default()
    };
    let o = jail.run(&spec).unwrap();
    assert_eq!(text(&o.stdout).trim(), (3 << 20).to_string());
}

#[test]
fn a_signal_is_reported_as_such() {
    let Some(o) = bash("kill -SEGV $$", Limits::default()) else {
        return;
    };
    assert_eq!(o.status, Status::Signaled(libc::SIGSEGV));
    assert_eq!(o.exit_code, None);
}

#[test]
fn the_deadline_kills_the_whole_tree() {
    let limits = Limits {
        timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let Some(o) = bash("sleep 30 & sleep 30 & echo started; wait", limits) else {
        return;
    };
    assert_eq!(o.status, Status::Timeout);
    assert_eq!(text(&o.stdout), "started\n");
    assert!(o.duration < Duration::from_secs(5), "{:?}", o.duration);
}

#[test]
fn memory_past_the_limit_is_a_memory_limit() {
    let limits = Limits {
        memory_bytes: 64 << 20,
        ..Limits::default()
    };
    let script = "/usr/bin/python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'";
    let Some(o) = bash(script, limits) else {
        return;
    };
    assert_eq!(o.status, Status::MemoryLimit, "{}", text(&o.stderr));
}

#[test]
fn output_past_the_cap_ends_the_run() {
    let limits = Limits {
        output_bytes: 100_000,
        ..Limits::default()
    };
    let Some(o) = bash("yes", limits) else { return };
    assert_eq!(o.status, Status::OutputLimit);
    assert_eq!(o.stdout.len(), 100_000);
    assert!(o.truncated);
}

#[test]
fn file_size_is_limited() {
    let limits = Limits {
        file_size_bytes: 1 << 20,
        ..Limits::default()
    };
    let script = "head -c 2000000 /dev/zero > /workspace/big; echo $?; stat -c %s /workspace/big";
    let Some(o) = bash(script, limits) else {
        return;
    };
    let out = text(&o.stdout);
    assert!(out.ends_with("1048576\n"), "{out}");
}

#[test]
fn cpu_time_is_measured() {
    // A fixed amount of work (about half a second), not a fixed time.
    let Some(o) = bash(
        "/usr/bin/python3 -c 'sum(range(20_000_000))'",
        Limits::default(),
    ) else {
        return;
    };
    assert_eq!(o.status, Status::Exited(0));
    assert!(o.cpu_time > Duration::from_millis(100), "{:?}", o.cpu_time);
    assert!(
        o.cpu_time <= o.duration * 2,
        "{:?} in {:?}",
        o.cpu_time,
        o.duration
    );
}

#[test]
fn bad_specs_are_refused_before_anything_runs() {
    let Some(jail) = jail() else { return };
    let err = jail.run(&Spec::default()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let spec = Spec {
        argv: vec!["/bin/true".into()],
        files: vec![SandboxFile {
            name: "../escape".into(),
            contents: vec![],
        }],
        ..Spec::default()
    };
    assert_eq!(
        jail.run(&spec).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    let spec = Spec {
        argv: vec!["/nonexistent".into()],
        ..Spec::default()
    };
    let err = jail.run(&spec).unwrap_err().to_string();
    assert!(err.contains("starting the program"), "{err}");
}
