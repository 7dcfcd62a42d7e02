//! A fixed amount of work per scenario, for counting instructions per request with
//! callgrind, which is repeatable where wall-clock figures are not (a shared,
//! busy machine):
//!
//! ```sh
//! cargo bench -p sandgate --bench auth_instructions --no-run   # prints the binary
//! for n in 2000 6000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg.whoami.$n $BIN whoami $n
//! done
//! # instructions per request = (Ir(6000) - Ir(2000)) / 4000
//! ```
//!
//! Scenarios: `healthz`, `whoami` (valid key), `limited` (whoami with a key that has
//! a never-refusing rate limit): the same requests as `--bench auth`, sent on 8
//! keep-alive connections (one in flight each) to the same in-process server, every
//! response checked to be 200. Taking the difference of two counts cancels the
//! start-up (store, keys) and leaves the cost of the extra requests, the audit
//! writer's and the load generator's share included. The warm pools are off: no
//! jail is needed, and valgrind would trace none of them anyway. Without valgrind it
//! runs too, and prints the wall time.
//!
//! Two biases to keep in mind: valgrind hides the CPU's SHA extensions, so SHA-256
//! runs in software (about 3k instructions of each authenticated request, a tenth
//! of that natively); and it runs one thread at a time, slowly, so the audit
//! writer's batches are smaller than in a real run and its per-batch work (commit,
//! index entries) weighs more per request. User space only: kernel time is not in
//! the counts.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Instant;

use sandgate_client::Client;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::Server;

const CONNECTIONS: usize = 8;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (Some(scenario), Some(count)) = (args.first(), args.get(1).and_then(|n| n.parse().ok()))
    else {
        eprintln!("usage: auth_instructions healthz|whoami|limited REQUESTS");
        return ExitCode::FAILURE;
    };
    let server = Server::start(|config| {
        config.exec_limits.warm_pool = 0;
        config.sandbox_limits.warm_pool = 0;
    });
    let admin = Client::new(&server.url, Some(server.admin_key.clone()));
    let create = |body: serde_json::Value| -> String {
        let created = admin.create_key(&body).expect("create key");
        created["key"].as_str().expect("plaintext key").to_owned()
    };
    let request = match scenario.as_str() {
        "healthz" => request("/healthz", None),
        "whoami" => request(
            "/v1/auth/whoami",
            Some(&create(
                json!({ "name": "bench", "profile": "sandbox-user" }),
            )),
        ),
        "limited" => request(
            "/v1/auth/whoami",
            Some(&create(json!({
                "name": "bench-limited",
                "profile": "sandbox-user",
                "rateLimits": [{"limit": 1_000_000_000u32, "windowSec": 60}],
            }))),
        ),
        other => {
            eprintln!("unknown scenario {other}");
            return ExitCode::FAILURE;
        }
    };
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load generator runtime");
    let started = Instant::now();
    let bad = load.block_on(drive(server.addr, request, count));
    let elapsed = started.elapsed();
    drop(load);
    server.stop();
    println!("{scenario}: {count} requests in {elapsed:?}, {bad} not 200");
    if bad > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn request(path: &str, key: Option<&str>) -> Vec<u8> {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes()
}

/// Sends `count` requests over [`CONNECTIONS`] connections; how many were not 200.
async fn drive(addr: SocketAddr, request: Vec<u8>, count: usize) -> usize {
    let request: std::sync::Arc<[u8]> = request.into();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let n = count / CONNECTIONS + usize::from(i < count % CONNECTIONS);
            tokio::spawn(connection(addr, std::sync::Arc::clone(&request), n))
        })
        .collect();
    let mut bad = 0;
    for t in tasks {
        bad += t.await.expect("connection task");
    }
    bad
}

async fn connection(addr: SocketAddr, request: std::sync::Arc<[u8]>, n: usize) -> usize {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut buf = Vec::with_capacity(8192);
    let mut bad = 0;
    for _ in 0..n {
        stream.write_all(&request).await.expect("write");
        if read_response(&mut stream, &mut buf).await != 200 {
            bad += 1;
        }
    }
    bad
}

/// Reads one response framed by `Content-Length`; returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> u16 {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        read_more(stream, buf).await;
    };
    let head = std::str::from_utf8(&buf[..head_end]).expect("UTF-8 head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .expect("Content-Length");
    let total = head_end + 4 + length;
    while buf.len() < total {
        read_more(stream, buf).await;
    }
    buf.drain(..total);
    status
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    buf.reserve(4096);
    assert!(
        stream.read_buf(buf).await.expect("read") > 0,
        "connection closed by the server"
    );
}
