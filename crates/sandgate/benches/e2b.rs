//! A sandbox's life through the official E2B SDK against the same through
//! `/v1`: `cargo bench -p sandgate --bench e2b`.
//!
//! Starts a real server in this process and runs `fixtures/e2b_roundtrip.py`
//! with the Python that has the pinned SDK (`SANDGATE_E2B_PYTHON`, else the
//! virtualenv `.ci/run` makes in `target/e2b-venv`): per round trip, create a
//! sandbox, run `echo hi`, kill it — `SANDGATE_BENCH_RUNS` times (20) each way,
//! interleaved, p50 and p90 reported with their ratio. Needs root.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

mod common;
use common::Server;

fn main() -> ExitCode {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("cannot jail programs here: {e}");
        return ExitCode::FAILURE;
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("SANDGATE_E2B_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target/e2b-venv/bin/python"));
    let server = Server::start(|_| {});
    println!(
        "sandgate E2B benchmark, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let status = Command::new(&python)
        .arg(manifest.join("benches/fixtures/e2b_roundtrip.py"))
        .env("E2B_API_URL", &server.url)
        .env("E2B_SANDBOX_URL", &server.url)
        .env("E2B_API_KEY", &server.admin_key)
        .status();
    server.stop();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("the benchmark script failed: {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "cannot run {} ({e}): install the SDK with .ci/run or set SANDGATE_E2B_PYTHON",
                python.display()
            );
            ExitCode::FAILURE
        }
    }
}
