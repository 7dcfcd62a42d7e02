//! Sandbox costs: `cargo bench -p sandgate --bench sandbox`.
//!
//! Starts a real server in this process and measures, through the HTTP API:
//! - `POST /v1/sandboxes` latency, one at a time, and 50 at once (p50/p99);
//! - the same from a template (a fresh jail on the template's layer), one at a
//!   time and 20 at once;
//! - exec round trip (`echo hi`) in a running sandbox, p50/p99;
//! - the server's memory (RSS of this process, the jails' inits included as their
//!   own processes below) with N idle sandboxes, per sandbox;
//! - then kills everything.
//!
//! Settings: `SANDGATE_BENCH_IDLE` idle sandboxes to hold (500),
//! `SANDGATE_BENCH_WARM` the warm pool size (default: the server's). Needs root.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use sandgate_client::{Client, Method};

mod common;
use common::Server;
use serde_json::{Value, json};

fn main() -> ExitCode {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("cannot jail programs here: {e}");
        return ExitCode::FAILURE;
    }
    let idle: usize = std::env::var("SANDGATE_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let warm: Option<usize> = std::env::var("SANDGATE_BENCH_WARM")
        .ok()
        .and_then(|v| v.parse().ok());
    let server = Server::start(|config| {
        config.sandbox_limits.max_per_tenant = idle + 100;
        if let Some(n) = warm {
            config.sandbox_limits.warm_pool = n;
        }
    });
    let client = Client::new(&server.url, Some(server.admin_key.clone()));
    let create = |c: &Client| -> (Duration, String) {
        let t = Instant::now();
        let v = c
            .call(
                Method::POST,
                "/v1/sandboxes",
                Some(&json!({"memoryMb": 64})),
            )
            .expect("create");
        (t.elapsed(), v["id"].as_str().unwrap().to_owned())
    };
    let kill = |c: &Client, id: &str| {
        c.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .expect("kill");
    };
    println!(
        "sandgate sandbox benchmark, {} CPUs, warm pool {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        warm.map_or("the server default".to_owned(), |n| n.to_string())
    );
    // Let the warm pool fill before measuring.
    std::thread::sleep(Duration::from_secs(2));

    // One at a time.
    let mut seq = Vec::new();
    for _ in 0..40 {
        let (d, id) = create(&client);
        seq.push(d);
        kill(&client, &id);
    }
    report("create, one at a time", &mut seq);

    // From a template: a fresh jail whose /workspace is an overlay on its layer.
    client
        .call(
            Method::POST,
            "/v1/templates",
            Some(&json!({"id": "bench", "setup": [
                "python3 -m venv --without-pip venv",
                "for i in $(seq 500); do echo \"x = $i\" > m$i.py; done",
            ]})),
        )
        .expect("create a template");
    let built = loop {
        let t = client
            .call(Method::GET, "/v1/templates/bench", None)
            .unwrap();
        if t["status"] != "building" {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(built["status"], "ready", "{built}");
    let from_template = |c: &Client| -> (Duration, String) {
        let t = Instant::now();
        let v = c
            .call(
                Method::POST,
                "/v1/sandboxes",
                Some(&json!({"memoryMb": 64, "template": "bench"})),
            )
            .expect("create from a template");
        (t.elapsed(), v["id"].as_str().unwrap().to_owned())
    };
    let mut seq = Vec::new();
    for _ in 0..40 {
        let (d, id) = from_template(&client);
        seq.push(d);
        kill(&client, &id);
    }
    report("create from a template", &mut seq);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let c = client.clone();
            std::thread::spawn(move || from_template(&c))
        })
        .collect();
    let results: Vec<(Duration, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut par: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    report("from a template, 20 at once", &mut par);
    for (_, id) in &results {
        kill(&client, id);
    }

    // 50 at once.
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let c = client.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let v = c
                    .call(
                        Method::POST,
                        "/v1/sandboxes",
                        Some(&json!({"memoryMb": 64})),
                    )
                    .expect("create");
                (t.elapsed(), v["id"].as_str().unwrap().to_owned())
            })
        })
        .collect();
    let results: Vec<(Duration, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut par: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    report("create, 50 at once", &mut par);
    for (_, id) in &results {
        kill(&client, id);
    }

    // Exec round trip.
    let (_, id) = create(&client);
    let mut execs = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let r = client
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(&json!({"command": "echo hi"})),
            )
            .expect("exec");
        assert_eq!(r["stdout"], "hi\n");
        execs.push(t.elapsed());
    }
    report("exec `echo hi`", &mut execs);
    kill(&client, &id);

    // Idle sandboxes: memory.
    let before = memory_kib();
    let mut ids = Vec::new();
    let t = Instant::now();
    for _ in 0..idle {
        ids.push(create(&client).1);
    }
    let took = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = memory_kib();
    let listed = client
        .call(Method::GET, "/v1/sandboxes?limit=1000", None)
        .unwrap();
    let alive = listed["data"].as_array().map_or(0, Vec::len);
    println!(
        "{idle} idle sandboxes: created in {:.1} s, {alive} listed as running; memory {} MiB -> {} MiB ({:.0} KiB per sandbox, server process and jail inits)",
        took.as_secs_f64(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / idle.max(1) as f64
    );
    let still = client
        .call(Method::GET, "/v1/auth/whoami", None)
        .map(|_: Value| "yes")
        .unwrap_or("NO");
    println!("server still answering with {idle} idle sandboxes: {still}");
    for id in &ids {
        kill(&client, id);
    }
    server.stop();
    ExitCode::SUCCESS
}

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    println!(
        "{name:<26} p50 {:>8.2} ms   p99 {:>8.2} ms",
        at(0.5),
        at(0.99)
    );
}

/// Resident memory of this process and every process whose parent chain leads to
/// it (the jails' inits and their programs), in KiB, from /proc.
fn memory_kib() -> u64 {
    let me = std::process::id();
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if !descends_from(pid, me) {
            continue;
        }
        // Proportional set size counts shared (copy-on-write) pages fairly.
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        total += rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(ppid) = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return false;
        };
        if ppid == 0 || ppid == pid {
            return false;
        }
        pid = ppid;
    }
    false
}
