//! Every clone of the jail is made by the zygote, not by this (multi-threaded)
//! process; a zygote that dies takes its jails with it and is replaced. Its own
//! test binary: killing the zygote would end other tests' sandboxes.

use std::fs;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sandgate_jail::{Spec, Status};

mod common;
use common::{jail, sh};

/// One test at a time: one of them kills the zygote.
static SERIAL: Mutex<()> = Mutex::new(());

/// `(pid, state, parent)` of every process.
fn processes() -> Vec<(i32, char, i32)> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            let mut rest = stat.rsplit(')').next()?.split_whitespace();
            let state = rest.next()?.chars().next()?;
            Some((pid, state, rest.next()?.parse().ok()?))
        })
        .collect()
}

fn parent_of(pid: i32) -> i32 {
    processes()
        .into_iter()
        .find(|p| p.0 == pid)
        .map(|p| p.2)
        .unwrap()
}

fn threads_of(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

#[test]
fn the_zygote_makes_every_clone_and_leaves_no_zombie() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(jail) = jail() else { return };
    let me = std::process::id() as i32;
    let sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    let zygote = parent_of(sandbox.init_pid());
    assert_ne!(zygote, me, "the sandbox's init is not this process's child");
    assert_eq!(parent_of(zygote), me);
    assert_eq!(threads_of(zygote), 1, "the zygote has one thread");
    // An exec's helper and a one-shot run's init are the zygote's children too.
    let spawned = jail.spawn(&sandbox, &sh("sleep 30"), false).unwrap();
    std::thread::scope(|scope| {
        let run = scope.spawn(|| jail.run(&sh("sleep 2; echo done")).unwrap());
        // The sandbox's init, the spawned program's helper, the run's init.
        let started = Instant::now();
        while processes().into_iter().filter(|p| p.2 == zygote).count() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the run's init is not the zygote's child"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mine: Vec<i32> = processes()
            .into_iter()
            .filter(|p| p.2 == me)
            .map(|p| p.0)
            .collect();
        assert_eq!(mine, [zygote], "this process cloned nothing but the zygote");
        assert_eq!(run.join().unwrap().stdout, b"done\n");
    });
    drop(spawned);
    for _ in 0..20 {
        let o = jail.exec(&sandbox, &sh("true")).unwrap();
        assert_eq!(o.status, Status::Exited(0));
    }
    drop(sandbox);
    // Everything ended was reaped: the zygote keeps no zombie.
    let started = Instant::now();
    loop {
        let left: Vec<_> = processes().into_iter().filter(|p| p.2 == zygote).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the zygote still has children: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_zygote_that_dies_takes_its_jails_and_is_replaced() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(jail) = jail() else { return };
    let marker = format!("sandgate-zygote-marker-{}", std::process::id());
    let mut sandbox = jail.create_sandbox(&Spec::default()).unwrap();
    jail.exec(
        &sandbox,
        &sh(&format!("(exec -a {marker} sleep 300) > /dev/null 2>&1 &")),
    )
    .unwrap();
    let zygote = parent_of(sandbox.init_pid());
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(zygote, libc::SIGKILL) }, 0);
    let started = Instant::now();
    while sandbox.is_alive() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the sandbox outlived its zygote"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let leftovers = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&marker))
        .count();
    assert_eq!(leftovers, 0, "a sandbox process survived its zygote");
    assert!(jail.exec(&sandbox, &sh("echo x")).is_err());
    drop(sandbox);
    // The next jail gets a new zygote.
    let again = jail.create_sandbox(&Spec::default()).unwrap();
    assert_ne!(parent_of(again.init_pid()), zygote);
    let o = jail.exec(&again, &sh("echo again")).unwrap();
    assert_eq!(o.stdout, b"again\n");
}
