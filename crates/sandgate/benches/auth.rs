//! Authentication cost, end to end and in process: `cargo bench -p sandgate --bench auth`.
//!
//! 1. Starts a real sandgate server in this process (127.0.0.1, port 0, a temporary
//!    data dir, the production `ServerConfig` defaults) and creates, through the
//!    public API with the bootstrap admin key, a normal key and a key with a rate
//!    limit that never refuses.
//! 2. Drives it with a small load generator written here: N persistent HTTP/1.1
//!    keep-alive connections on raw `TcpStream`s, one request in flight on each,
//!    for a warm-up then a measured interval per scenario. Every response is checked
//!    to be 200. Reports throughput and p50/p99 latency of `GET /healthz` (no auth),
//!    `GET /v1/auth/whoami` (valid key) and whoami with a rate-limited key.
//! 3. Times `KeyService::verify` of a stored key held in the memory cache (format
//!    check, CRC32, SHA-256, map lookup) and one `RateLimiter::check_now`, in a loop.
//!
//! The scenarios take turns: the measured time of each is cut into rounds, and every
//! round runs every scenario once (on its own connections, opened in its first
//! round and kept; a short warm-up, then a slice of the measured time), so a
//! machine that is busier for a second weighs on all of them alike instead of on
//! whichever was running. A scenario's figures are the sum of its slices; the
//! median of the rounds' ratios is printed beside the ratio of the sums.
//!
//! Settings (environment): `SANDGATE_BENCH_SECS` measured seconds per scenario (5),
//! `SANDGATE_BENCH_ROUNDS` slices they are cut into (20), `SANDGATE_BENCH_WARMUP_SECS`
//! warm-up before each slice (0.1), `SANDGATE_BENCH_CONC` connections (32),
//! `SANDGATE_BENCH_ITERS` micro-benchmark iterations (200000), `SANDGATE_BENCH_ONLY`
//! the scenarios to run, by number from 0 in the order of the table (`0,1`: healthz
//! and whoami; for profiling one at a time), all by default.
//!
//! The load generator runs on one thread in this same process, so on a small machine
//! it takes CPU from the server: compare the scenarios with each other (the ratios),
//! not with figures from another machine.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandgate_client::Client;
use sandgate_core::keys::format::SecretKey;
use sandgate_core::model::RateLimit;
use sandgate_server::{AppState, AuthCallbackConfig, JwtConfig, ServerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::Server;

/// The limit of the rate-limited scenario: checked on every request, never refuses.
const NEVER_REFUSING: RateLimit = RateLimit {
    limit: 1_000_000_000,
    window_sec: 60,
};

fn main() -> ExitCode {
    let settings = Settings::from_env();
    println!(
        "sandgate auth benchmark: {} connections, {:?} measured per scenario in {} rounds \
         (each slice after a {:?} warm-up), {} CPUs",
        settings.concurrency,
        settings.measure,
        settings.rounds,
        settings.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    // The peers of the other credential sources: a JWKS and an auth callback.
    let jwks_url = serve_forever(
        serde_json::to_vec(&json!({"keys": [{
            "kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig", "n": RSA_N, "e": "AQAB"
        }]}))
        .expect("JSON"),
    );
    let callback_url = serve_forever(Vec::new());
    let server = Server::start(|config| {
        let mut jwt = JwtConfig::new();
        jwt.secret = Some(SecretKey::new(JWT_SECRET.to_owned()));
        jwt.jwks_url = Some(jwks_url);
        config.jwt = Some(jwt);
        config.auth_callback = Some(AuthCallbackConfig::new(callback_url));
    });
    // Let the warm pools (jails for runs, sandboxes) fill: measure the steady
    // state, with no background work taking CPU from whichever scenario runs first.
    let waited = wait_until_idle();
    println!(
        "the server was idle {:.1} s after it started",
        waited.as_secs_f64()
    );
    let admin = Client::new(&server.url, Some(server.admin_key.clone()));
    let create = |body: serde_json::Value| -> String {
        let created = admin.create_key(&body).expect("create key");
        created["key"].as_str().expect("plaintext key").to_owned()
    };
    let plain_key = create(json!({ "name": "bench", "profile": "sandbox-user" }));
    let limited_key = create(json!({
        "name": "bench-limited",
        "profile": "sandbox-user",
        "rateLimits": [NEVER_REFUSING],
    }));

    let claims = json!({
        "sub": "bench", "scope": "sandbox:execute",
        "exp": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600,
    });
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("HS256 token");
    let mut rs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    rs_header.kid = Some("bench".into());
    let rs256 = jsonwebtoken::encode(
        &rs_header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(RSA_DER),
    )
    .expect("RS256 token");

    let scenarios = [
        Scenario::new("healthz (no auth)", "/healthz", None),
        Scenario::new("whoami (valid key)", "/v1/auth/whoami", Some(&plain_key)),
        Scenario::new(
            "whoami (rate-limited key)",
            "/v1/auth/whoami",
            Some(&limited_key),
        ),
        Scenario::new("whoami (JWT HS256)", "/v1/auth/whoami", Some(&hs256)),
        Scenario::new("whoami (JWT RS256)", "/v1/auth/whoami", Some(&rs256)),
        Scenario::new(
            "whoami (auth callback)",
            "/v1/auth/whoami",
            Some("opaque-token-the-callback-knows"),
        ),
    ];
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load generator runtime");
    let mut results: Vec<Measured> = scenarios.iter().map(|_| Measured::default()).collect();
    // Each scenario's connections, kept open from one slice to its next.
    let mut pools: Vec<Vec<Option<TcpStream>>> = scenarios
        .iter()
        .map(|_| (0..settings.concurrency).map(|_| None).collect())
        .collect();
    for round in 1..=settings.rounds {
        if round % 10 == 1 {
            println!("round {round} of {} ...", settings.rounds);
        }
        for (i, ((s, total), pool)) in scenarios
            .iter()
            .zip(&mut results)
            .zip(&mut pools)
            .enumerate()
        {
            if !settings.runs(i) {
                continue;
            }
            let slice = load.block_on(measure(server.addr, s, pool, &settings));
            total.slices.push(slice.throughput());
            total.merge(slice);
        }
    }
    drop(pools);
    for r in &mut results {
        r.latencies_ns.sort_unstable();
    }
    drop(load);
    server.stop();

    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "scenario", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "non-200", "io errs"
    );
    for (s, r) in scenarios.iter().zip(&results) {
        println!(
            "{:<28} {:>10.0} {:>10.3} {:>10.3} {:>10.2} {:>9} {:>9}",
            s.name,
            r.throughput(),
            ms(r.percentile(50)),
            ms(r.percentile(99)),
            r.cpu_per_request().as_secs_f64() * 1e6,
            r.non_200(),
            r.io_errors,
        );
    }
    let (health, whoami, limited) = (&results[0], &results[1], &results[2]);
    println!();
    println!(
        "throughput ratios: whoami/healthz = {:.2}, limited/healthz = {:.2}, limited/whoami = {:.2}",
        whoami.throughput() / health.throughput(),
        limited.throughput() / health.throughput(),
        limited.throughput() / whoami.throughput(),
    );
    // The same comparison by cost: less sensitive than throughput to how the
    // two CPUs happen to be shared between the server and the load generator.
    println!(
        "CPU per request, healthz/whoami = {:.2}, healthz/limited = {:.2}",
        health.cpu_per_request().as_secs_f64() / whoami.cpu_per_request().as_secs_f64(),
        health.cpu_per_request().as_secs_f64() / limited.cpu_per_request().as_secs_f64(),
    );
    // Each round's two slices ran one after the other: a ratio per round is
    // less swayed by a few seconds of a busier machine than the totals are.
    println!(
        "median of the {} rounds' throughput ratios: whoami/healthz = {:.2}, limited/healthz = {:.2}",
        settings.rounds,
        median_ratio(whoami, health),
        median_ratio(limited, health),
    );
    println!(
        "by credential source, against healthz: stored key {:.2}, JWT HS256 {:.2}, JWT RS256 {:.2}, callback {:.2}",
        whoami.throughput() / health.throughput(),
        results[3].throughput() / health.throughput(),
        results[4].throughput() / health.throughput(),
        results[5].throughput() / health.throughput(),
    );

    println!();
    micro_benchmarks(settings.iterations);

    let mut failed = false;
    for (s, r) in scenarios.iter().zip(&results) {
        for (status, (count, body)) in &r.statuses {
            if *status != 200 {
                failed = true;
                println!(
                    "NON-200 in {}: {count} × {status}, e.g. body: {}",
                    s.name,
                    String::from_utf8_lossy(body)
                );
            }
        }
        if let Some(e) = &r.first_io_error {
            failed = true;
            println!("I/O ERRORS in {}: {} (first: {e})", s.name, r.io_errors);
        }
    }
    if failed {
        println!("benchmark FAILED: some responses were not 200");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[derive(Debug)]
struct Settings {
    /// Before each slice.
    warmup: Duration,
    /// Per scenario, all rounds together.
    measure: Duration,
    rounds: u32,
    concurrency: usize,
    iterations: u64,
    /// Scenario numbers to run; `None`: all.
    only: Option<Vec<usize>>,
}

impl Settings {
    fn from_env() -> Settings {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a valid number")),
                Err(_) => default,
            }
        }
        Settings {
            warmup: Duration::from_secs_f64(var("SANDGATE_BENCH_WARMUP_SECS", 0.1)),
            measure: Duration::from_secs_f64(var("SANDGATE_BENCH_SECS", 5.0)),
            rounds: var("SANDGATE_BENCH_ROUNDS", 20u32).max(1),
            concurrency: var("SANDGATE_BENCH_CONC", 32usize).max(1),
            iterations: var("SANDGATE_BENCH_ITERS", 200_000u64).max(1),
            only: std::env::var("SANDGATE_BENCH_ONLY").ok().map(|v| {
                v.split(',')
                    .map(|n| {
                        n.trim().parse().unwrap_or_else(|_| {
                            panic!("SANDGATE_BENCH_ONLY={v}: not a number list")
                        })
                    })
                    .collect()
            }),
        }
    }

    fn runs(&self, scenario: usize) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.contains(&scenario))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---- the other credential sources' peers ----

const JWT_SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";
/// A throwaway RSA key made for this benchmark (its public half is served as the JWKS).
const RSA_DER: &[u8] = include_bytes!("fixtures/bench-rsa.der");
const RSA_N: &str = "obMEUPRLoMZwGGogn29xWGMNgpNkF8q9Ycl5Q8TC4matEgf7gCt_ED0EFiR2o1Kd67LkkgyMzrbSxNXdbGZrEMjbxJChrV9fry08YkQQ8htWdrWs0BIe3pNf4monXWlUJWl1F8U_mox0DHaWr05fG9n919GOOwUeCddcJ2h05s2SIYmYzr8QZgVa9_1nM_J5D4f4NSw-aeJdiWU0_OTXnODqnbMdK4CJNNa_fTQi6S1BCt199pqdDgbDcP8bv3EHZqJQoWa4_gbjLfZhQIFB_bFv4ey5nbLjLGX1L1XDJqnfVzxskUHCd49dQf0GV_ZNmcnAzSUzvk7aMrtplLPK8w";

/// A keep-alive HTTP/1.1 server on 127.0.0.1 that answers every request with 200
/// and `body` (JSON when not empty): the JWKS, and an auth callback that allows.
fn serve_forever(body: Vec<u8>) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind peer");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let body = Arc::clone(&body);
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut writer = conn.try_clone().expect("clone stream");
                let mut reader = BufReader::new(conn);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut discard = vec![0u8; length];
                    if reader.read_exact(&mut discard).is_err() {
                        return;
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if writer.write_all(head.as_bytes()).is_err()
                        || writer.write_all(&body).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    url
}

// ---- the load generator ----

#[derive(Debug)]
struct Scenario {
    name: &'static str,
    /// The whole request, sent as is on every iteration.
    request: Arc<[u8]>,
}

impl Scenario {
    fn new(name: &'static str, path: &str, key: Option<&str>) -> Scenario {
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
        Scenario {
            name,
            request: request.into_bytes().into(),
        }
    }
}

/// What one scenario (or one connection of it) saw.
#[derive(Debug, Default)]
struct Measured {
    /// Responses completed inside the measured interval.
    requests: u64,
    /// Latency of each of those, in nanoseconds.
    latencies_ns: Vec<u64>,
    measured: Duration,
    /// CPU time of this whole process (server, load generator, audit writer)
    /// during the measured interval.
    cpu: Duration,
    /// Every response of the run (warm-up included): status → (count, first body).
    statuses: BTreeMap<u16, (u64, Vec<u8>)>,
    io_errors: u64,
    first_io_error: Option<String>,
    /// Throughput of each slice, in round order (a scenario's own figures).
    slices: Vec<f64>,
}

/// The median over the rounds of `a`'s slice throughput over `b`'s.
fn median_ratio(a: &Measured, b: &Measured) -> f64 {
    let mut ratios: Vec<f64> = a.slices.iter().zip(&b.slices).map(|(x, y)| x / y).collect();
    if ratios.is_empty() {
        return f64::NAN;
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    }
}

impl Measured {
    /// Adds another connection's or slice's figures (the measured time is the
    /// caller's: connections of one slice share theirs).
    fn merge(&mut self, other: Measured) {
        self.requests += other.requests;
        self.measured += other.measured;
        self.cpu += other.cpu;
        self.latencies_ns.extend(other.latencies_ns);
        for (status, (count, body)) in other.statuses {
            self.statuses.entry(status).or_insert((0, body)).0 += count;
        }
        self.io_errors += other.io_errors;
        if self.first_io_error.is_none() {
            self.first_io_error = other.first_io_error;
        }
    }

    fn throughput(&self) -> f64 {
        self.requests as f64 / self.measured.as_secs_f64()
    }

    /// CPU time (all threads of the process) per completed request.
    fn cpu_per_request(&self) -> Duration {
        self.cpu.div_f64(self.requests.max(1) as f64)
    }

    /// Needs `latencies_ns` sorted.
    fn percentile(&self, p: usize) -> Duration {
        let n = self.latencies_ns.len();
        if n == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.latencies_ns[(n * p / 100).min(n - 1)])
    }

    fn non_200(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| **s != 200)
            .map(|(_, (c, _))| *c)
            .sum()
    }

    fn io_error(&mut self, e: &io::Error) {
        self.io_errors += 1;
        if self.first_io_error.is_none() {
            self.first_io_error = Some(e.to_string());
        }
    }
}

/// Warm-up, then one round's slice of the measured time, on the scenario's
/// `settings.concurrency` connections.
async fn measure(
    addr: SocketAddr,
    scenario: &Scenario,
    pool: &mut [Option<TcpStream>],
    settings: &Settings,
) -> Measured {
    let slice = settings.measure / settings.rounds;
    let warm_end = Instant::now() + settings.warmup;
    let end = warm_end + slice;
    // The process's CPU time over the measured interval, read beside the load.
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(warm_end.into()).await;
        let before = process_cpu();
        tokio::time::sleep_until(end.into()).await;
        process_cpu().saturating_sub(before)
    });
    let tasks: Vec<_> = pool
        .iter_mut()
        .map(|conn| {
            tokio::spawn(connection(
                addr,
                conn.take(),
                Arc::clone(&scenario.request),
                warm_end,
                end,
            ))
        })
        .collect();
    let mut total = Measured::default();
    for (task, conn) in tasks.into_iter().zip(pool) {
        let (stream, seen) = task.await.expect("connection task");
        *conn = stream;
        total.merge(seen);
    }
    total.measured = slice;
    total.cpu = cpu.await.expect("CPU time task");
    total
}

/// Waits 3 s, then (up to a minute in all) until this process uses under 5% of
/// one CPU over a quarter of a second: the server's start-up work (warm pools,
/// built on its blocking threads) is done.
fn wait_until_idle() -> Duration {
    let start = Instant::now();
    let window = Duration::from_millis(250);
    std::thread::sleep(Duration::from_secs(3));
    while start.elapsed() < Duration::from_secs(60) {
        let before = process_cpu();
        std::thread::sleep(window);
        if process_cpu().saturating_sub(before) <= window / 20 {
            break;
        }
    }
    start.elapsed()
}

/// User and system CPU time of every thread of this process so far, from
/// `/proc/self/stat` (in clock ticks, 1/100 s here).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // After the command name (which may hold spaces), field 3 on: utime and stime
    // are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..]
        .split(' ')
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// One keep-alive connection sending `request` back to back until `end`
/// (opened first when `stream` is not); handed back open, for the next slice.
async fn connection(
    addr: SocketAddr,
    mut stream: Option<TcpStream>,
    request: Arc<[u8]>,
    warm_end: Instant,
    end: Instant,
) -> (Option<TcpStream>, Measured) {
    let mut seen = Measured::default();
    // One request in flight, each response read whole: nothing is left over
    // from a slice to the next.
    let mut buf = Vec::with_capacity(8192);
    while Instant::now() < end {
        let s = match &mut stream {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => stream.insert(s),
                Err(e) => {
                    seen.io_error(&e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let start = Instant::now();
        let result = async {
            s.write_all(&request).await?;
            read_response(s, &mut buf).await
        }
        .await;
        let done = Instant::now();
        match result {
            Ok((status, body)) => {
                let entry = seen.statuses.entry(status).or_insert((0, body));
                entry.0 += 1;
                if done >= warm_end && done < end {
                    seen.requests += 1;
                    seen.latencies_ns.push((done - start).as_nanos() as u64);
                }
            }
            Err(e) => {
                seen.io_error(&e);
                stream = None;
                buf.clear();
            }
        }
    }
    (stream, seen)
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one response framed by `Content-Length`; returns its status and, when it
/// is not 200, its body (for the report). Leaves any later bytes in `buf`.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(u16, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        read_more(stream, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("chunked responses are not supported"));
        }
    }
    let length = length.ok_or_else(|| invalid("response without Content-Length"))?;
    let total = head_end + 4 + length;
    while buf.len() < total {
        read_more(stream, buf).await?;
    }
    let body = if status == 200 {
        Vec::new()
    } else {
        buf[head_end + 4..total].to_vec()
    };
    buf.drain(..total);
    Ok((status, body))
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.reserve(4096);
    if stream.read_buf(buf).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed by the server",
        ));
    }
    Ok(())
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

// ---- in-process micro-benchmarks ----

/// `KeyService::verify` of a stored, cached key, exactly as the authorization layer
/// calls it (format and checksum check, SHA-256, cache lookup, expiry/revocation
/// checks), and the rate limiter's check for a key with one limit.
fn micro_benchmarks(iterations: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("micro-benchmark runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = AppState::open(ServerConfig::new(dir.path()))
            .await
            .expect("open state");
        let key = state
            .keys()
            .bootstrap_admin()
            .await
            .expect("bootstrap")
            .expect("an empty store gets an admin key")
            .secret;
        let keys = state.keys();
        let principal = keys
            .verify(&key)
            .await
            .expect("verified")
            .expect("a stored key");

        let verify = time_loop(iterations, || async {
            let p = keys.verify(black_box(&key)).await;
            assert!(matches!(p, Ok(Some(_))), "the cached key verifies");
            let _ = black_box(p);
        })
        .await;
        report(
            "KeyService::verify (cached key, incl. SHA-256)",
            verify,
            iterations,
        );

        let limits = [NEVER_REFUSING];
        let limiter = state.rate_limiter();
        let check = time_loop(iterations, || async {
            // What the edge calls for a local limiter (no future to box).
            let d = limiter
                .check_now(black_box(&principal.key_id), black_box(&limits))
                .expect("a local limiter decides at once");
            assert!(d.allowed, "the limit never refuses");
            black_box(d);
        })
        .await;
        report(
            "RateLimiter::check_now (one limit, local)",
            check,
            iterations,
        );
    });
}

fn report(what: &str, ns_per_op: f64, iterations: u64) {
    println!("{what:<48} {ns_per_op:>8.1} ns/op ({iterations} iterations)");
}

/// Runs `op` `iterations / 10` times to warm up, then `iterations` times; ns per call.
async fn time_loop<F, Fut>(iterations: u64, mut op: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..iterations / 10 {
        op().await;
    }
    let start = Instant::now();
    for _ in 0..iterations {
        op().await;
    }
    start.elapsed().as_nanos() as f64 / iterations as f64
}
