//! Nothing outlives a run: no process (background, timed out or not) and no
//! cgroup. Its own test binary, so that no other test's runs are in flight.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use sandgate_jail::{Config, Jail, Limits, Spec, Status};

/// This process's jail groups, in every hierarchy that has them.
fn groups_of_this_process() -> Vec<PathBuf> {
    let me = format!("{}-", std::process::id());
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut found = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        for c in controllers.split(',') {
            let base = PathBuf::from(format!("/sys/fs/cgroup/{c}{path}/sandgate"));
            let Ok(entries) = fs::read_dir(&base) else {
                continue;
            };
            found.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&me))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

fn processes_named(marker: &str) -> usize {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(marker))
        .count()
}

#[test]
fn no_process_and_no_cgroup_outlives_a_run() {
    let jail = match Jail::new(Config::default()) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("skipped: the jail is unavailable here: {e}");
            return;
        }
    };
    let marker = format!("sandgate-leak-marker-{}", std::process::id());
    let run = |script: String, timeout_ms: u64| {
        jail.run(&Spec {
            argv: vec!["/bin/bash".into(), "-c".into(), script],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            limits: Limits {
                timeout: Duration::from_millis(timeout_ms),
                ..Limits::default()
            },
            ..Spec::default()
        })
        .unwrap()
    };
    // A background process, detached from the program's session, left behind.
    let o = run(
        format!("setsid bash -c 'exec -a {marker} sleep 300' & disown; echo left"),
        10_000,
    );
    assert_eq!(o.status, Status::Exited(0));
    assert_eq!(o.stdout, b"left\n");
    // The same, killed at the deadline.
    let o = run(format!("(exec -a {marker} sleep 300) & sleep 300"), 300);
    assert_eq!(o.status, Status::Timeout);
    assert_eq!(processes_named(&marker), 0, "a jailed process survived");
    assert!(
        groups_of_this_process().is_empty(),
        "{:?}",
        groups_of_this_process()
    );
}
