//! One-shot run latency: `cargo bench -p sandgate --bench execute`.
//!
//! Starts a real sandgate server in this process (127.0.0.1, port 0, a temporary
//! data dir, production defaults) and measures, in one run on this machine:
//! - `POST /v1/execute` of Python `print(42)` through the HTTP API (a fresh jail
//!   per run: namespaces, mounts, cgroups, seccomp), sequentially and with 2
//!   clients at once;
//! - spawning `/usr/bin/python3 -c 'print(42)'` directly, the same ways.
//!
//! Reports p50/p99 latency, throughput and the ratio of the two p50s. Settings
//! (environment): `SANDGATE_BENCH_RUNS` runs per scenario (100).
//! Needs root and cgroup v1 (the jail's requirements).

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sandgate_client::Client;

mod common;
use common::Server;
use serde_json::json;

fn main() -> ExitCode {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("cannot jail programs here: {e}");
        return ExitCode::FAILURE;
    }
    let runs: usize = std::env::var("SANDGATE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let server = Server::start(|_| {});
    // Let the warm pools (jails for runs, sandboxes) fill: measure the steady state.
    std::thread::sleep(Duration::from_secs(3));
    let client = Client::new(&server.url, Some(server.admin_key.clone()));
    let body = json!({"language": "python", "code": "print(42)"});
    let api = |client: &Client| {
        let r = client.execute(&body).expect("execute");
        assert_eq!(r["stdout"], "42\n", "{r}");
    };
    let bare = || {
        let out = Command::new("/usr/bin/python3")
            .args(["-c", "print(42)"])
            .output()
            .expect("spawn python3");
        assert_eq!(out.stdout, b"42\n");
    };
    // Warm-up: page cache, interpreter versions, connection.
    for _ in 0..5 {
        api(&client);
        bare();
    }
    println!(
        "sandgate execute benchmark: Python print(42), {runs} runs per scenario, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "scenario", "p50 ms", "p99 ms", "runs/s"
    );
    let invalid = json!({"language": "cobol", "code": "x"});
    let http_only = measure(runs, 1, |_| {
        let r = client.execute(&invalid);
        assert_eq!(r.unwrap_err().code(), Some("INVALID_REQUEST"));
    });
    let bare_seq = measure(runs, 1, |_| bare());
    let api_seq = measure(runs, 1, |_| api(&client));
    let bare_par = measure(runs, 2, |_| bare());
    let clients = [client.clone(), client.clone()];
    let api_par = measure(runs, 2, |i| api(&clients[i]));
    for (name, s) in [
        ("HTTP + auth only (a 400)", &http_only),
        ("bare python3, sequential", &bare_seq),
        ("POST /v1/execute, sequential", &api_seq),
        ("bare python3, 2 at once", &bare_par),
        ("POST /v1/execute, 2 at once", &api_par),
    ] {
        println!(
            "{name:<34} {:>9.2} {:>9.2} {:>9.1}",
            s.p50_ms, s.p99_ms, s.per_sec
        );
    }
    println!(
        "p50 ratio execute/bare: sequential {:.2}x, 2 at once {:.2}x (target <= 1.5x)",
        api_seq.p50_ms / bare_seq.p50_ms,
        api_par.p50_ms / bare_par.p50_ms
    );
    server.stop();
    ExitCode::SUCCESS
}

struct Stats {
    p50_ms: f64,
    p99_ms: f64,
    per_sec: f64,
}

/// `runs` calls of `f` spread over `threads` threads; `f` gets the thread index.
fn measure(runs: usize, threads: usize, f: impl Fn(usize) + Sync) -> Stats {
    let started = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                scope.spawn(move || {
                    (0..runs / threads)
                        .map(|_| {
                            let t0 = Instant::now();
                            f(t);
                            t0.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    Stats {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
    }
}
