//! The real `sandgate` binary: first start, offline and remote key commands, login,
//! and durability across `kill -9`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sandgate_client::Client;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_sandgate");

/// A `sandgate serve` child process.
struct Server {
    child: Child,
    url: String,
    /// What it printed on standard output (the admin key on first start).
    stdout: String,
}

impl Server {
    fn start(data_dir: &Path) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("SANDGATE_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sandgate serve");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("addr=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server logged its address");
        // Everything on stdout before the listening line is already there.
        let mut stdout = String::new();
        let mut out = child.stdout.take().unwrap();
        let (otx, orx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || otx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        while let Ok(chunk) = orx.recv_timeout(Duration::from_millis(200)) {
            stdout.push_str(&String::from_utf8_lossy(&chunk));
        }
        Server {
            child,
            url: format!("http://{addr}"),
            stdout,
        }
    }

    fn admin_key(&self) -> String {
        find_key(&self.stdout).expect("first start prints the admin key")
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) {
        // The server must shut down gracefully on SIGTERM and exit 0.
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "graceful shutdown exits 0, got {status}");
                return;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_key(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|w| w.starts_with("sg_live_") && w.len() == 46)
        .map(str::to_owned)
}

fn sandgate(args: &[&str], env: &[(&str, &str)], config_dir: &Path) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SANDGATE_URL")
        .env_remove("SANDGATE_API_KEY")
        .env("SANDGATE_CONFIG_DIR", config_dir)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sandgate")
}

#[track_caller]
fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

fn dir_arg(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

#[test]
fn first_start_prints_an_admin_key_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let admin = server.admin_key();
    let who = Client::new(&server.url, Some(admin.clone()))
        .whoami()
        .unwrap();
    assert_eq!(who["scopes"], json!(["*"]));
    server.stop();
    let again = Server::start(&data);
    assert!(
        find_key(&again.stdout).is_none(),
        "printed again: {}",
        again.stdout
    );
    assert!(Client::new(&again.url, Some(admin)).whoami().is_ok());
    // The store is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "data dir mode {mode:o}");
}

#[test]
fn offline_key_commands_work_beside_a_running_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = tmp.path().join("cfg");
    let server = Server::start(&data);
    let d = dir_arg(&data);
    let created = json_of(&sandgate(
        &[
            "keys",
            "create",
            "--data-dir",
            &d,
            "--json",
            "--name",
            "offline",
            "--scope",
            "sandbox:read,keys:read",
            "--tenant",
            "acme",
            "--expires-in",
            "90d",
            "--rate-limit",
            "60/min",
            "--rate-limit",
            "1000/hour",
            "--executions-limit",
            "5",
            "--allowed-ip",
            "127.0.0.1",
            "--metadata",
            "team=infra",
        ],
        &[],
        &cfg,
    ));
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["tenant"], "acme");
    assert_eq!(created["scopes"], json!(["sandbox:read", "keys:read"]));
    assert_eq!(
        created["rateLimits"],
        json!([{"limit": 60, "windowSec": 60}, {"limit": 1000, "windowSec": 3600}])
    );
    assert_eq!(created["executionsLimit"], 5);
    assert!(created["expiresAt"].is_string());

    // The running server accepts a key written by another process.
    let client = Client::new(&server.url, Some(key.clone()));
    assert_eq!(client.whoami().unwrap()["keyId"], id.as_str());

    let listed = json_of(&sandgate(
        &["keys", "list", "--data-dir", &d, "--json"],
        &[],
        &cfg,
    ));
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id.as_str())
    );
    let got = json_of(&sandgate(
        &["keys", "get", &id, "--data-dir", &d, "--json"],
        &[],
        &cfg,
    ));
    assert_eq!(got["name"], "offline");
    assert!(got.get("key").is_none());
    let updated = json_of(&sandgate(
        &[
            "keys",
            "update",
            &id,
            "--data-dir",
            &d,
            "--json",
            "--name",
            "renamed",
            "--executions-limit",
            "9",
        ],
        &[],
        &cfg,
    ));
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["executionsRemaining"], 9);
    let reset = json_of(&sandgate(
        &[
            "keys",
            "reset-executions",
            &id,
            "--remaining",
            "2",
            "--data-dir",
            &d,
            "--json",
        ],
        &[],
        &cfg,
    ));
    assert_eq!(reset["executionsRemaining"], 2);
    let rotated = json_of(&sandgate(
        &[
            "keys",
            "rotate",
            &id,
            "--grace",
            "0",
            "--data-dir",
            &d,
            "--json",
        ],
        &[],
        &cfg,
    ));
    let new_key = rotated["key"].as_str().unwrap().to_owned();

    // Offline changes reach the running server within a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let old = client.whoami();
        let new = Client::new(&server.url, Some(new_key.clone())).whoami();
        if old.as_ref().err().and_then(|e| e.code()) == Some("KEY_EXPIRED") && new.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server never saw the rotation: {old:?} {new:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let new_id = rotated["id"].as_str().unwrap();
    let out = sandgate(&["keys", "revoke", new_id, "--data-dir", &d], &[], &cfg);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(3);
    while Client::new(&server.url, Some(new_key.clone()))
        .whoami()
        .is_ok()
    {
        assert!(Instant::now() < deadline, "server never saw the revocation");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Human output: a table with a header and the key's row.
    let table = sandgate(&["keys", "list", "--data-dir", &d], &[], &cfg);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.lines().next().unwrap().starts_with("ID"), "{text}");
    assert!(text.contains(&id));
    // Bad input is a clear error and a failing exit code.
    let bad = sandgate(
        &[
            "keys",
            "create",
            "--data-dir",
            &d,
            "--name",
            "x",
            "--scope",
            "root",
        ],
        &[],
        &cfg,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("scopes"));
}

#[test]
fn remote_commands_and_login() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = tmp.path().join("cfg");
    let server = Server::start(&data);
    let admin = server.admin_key();
    let env = [
        ("SANDGATE_URL", server.url.as_str()),
        ("SANDGATE_API_KEY", admin.as_str()),
    ];
    let created = json_of(&sandgate(
        &[
            "keys",
            "create",
            "--json",
            "--name",
            "remote",
            "--profile",
            "read-only",
            "--env",
            "test",
        ],
        &env,
        &cfg,
    ));
    assert!(created["key"].as_str().unwrap().starts_with("sg_test_"));
    let id = created["id"].as_str().unwrap();
    let listed = json_of(&sandgate(&["keys", "list", "--json"], &env, &cfg));
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id)
    );
    let out = sandgate(&["keys", "revoke", id], &env, &cfg);
    assert!(out.status.success());
    let got = json_of(&sandgate(&["keys", "get", id, "--json"], &env, &cfg));
    assert_eq!(got["isActive"], false);

    // Without a key, remote commands explain what to do.
    let out = sandgate(
        &["keys", "list"],
        &[("SANDGATE_URL", server.url.as_str())],
        &cfg,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SANDGATE_API_KEY"));

    // Login saves the URL and key (0600) and later commands use them.
    let out = sandgate(
        &["auth", "login", "--url", &server.url, "--key", &admin],
        &[],
        &cfg,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = cfg.join("credentials.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let who = json_of(&sandgate(&["auth", "whoami", "--json"], &[], &cfg));
    assert_eq!(who["name"], "admin");
    let out = sandgate(
        &[
            "auth",
            "login",
            "--url",
            &server.url,
            "--key",
            "sg_live_nope",
        ],
        &[],
        &cfg,
    );
    assert!(!out.status.success(), "a bad key is not saved");
    let who = json_of(&sandgate(&["auth", "whoami", "--json"], &[], &cfg));
    assert_eq!(who["name"], "admin");
}

#[test]
fn nothing_committed_is_lost_on_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let data: PathBuf = tmp.path().join("data");
    let server = Server::start(&data);
    let admin_key = server.admin_key();
    let admin = Client::new(&server.url, Some(admin_key.clone()));
    let mut keys = Vec::new();
    for i in 0..10 {
        let k = admin
            .create_key(&json!({"name": format!("k{i}"), "executionsLimit": 100}))
            .unwrap();
        keys.push(k);
    }
    let revoked = keys[0]["id"].as_str().unwrap().to_owned();
    admin.revoke_key(&revoked).unwrap();
    let limited = keys[1]["id"].as_str().unwrap().to_owned();
    admin.reset_executions(&limited, Some(42)).unwrap();
    let rotated = admin
        .rotate_key(keys[2]["id"].as_str().unwrap(), Some(0))
        .unwrap();
    server.kill9();

    let server = Server::start(&data);
    assert!(
        find_key(&server.stdout).is_none(),
        "no second admin key after a crash"
    );
    let admin = Client::new(&server.url, Some(admin_key));
    let old = Client::new(
        &server.url,
        Some(keys[0]["key"].as_str().unwrap().to_owned()),
    );
    assert_eq!(old.whoami().unwrap_err().code(), Some("KEY_EXPIRED"));
    for k in &keys[3..] {
        let c = Client::new(&server.url, Some(k["key"].as_str().unwrap().to_owned()));
        assert_eq!(c.whoami().unwrap()["keyId"], k["id"]);
    }
    assert_eq!(admin.get_key(&limited).unwrap()["executionsRemaining"], 42);
    let new = Client::new(
        &server.url,
        Some(rotated["key"].as_str().unwrap().to_owned()),
    );
    assert!(new.whoami().is_ok());
    let events = admin.audit(&[("limit", "1000")]).unwrap();
    let kinds: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["event"].as_str())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "key.created").count(),
        12,
        "{kinds:?}"
    );
    for kind in ["key.revoked", "key.rotated", "key.updated"] {
        assert!(kinds.contains(&kind), "{kind} lost in the crash");
    }
}

#[test]
fn graceful_shutdown_writes_pending_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let admin_key = server.admin_key();
    let admin = Client::new(&server.url, Some(admin_key.clone()));
    let k = admin.create_key(&json!({"name": "busy"})).unwrap();
    let c = Client::new(&server.url, Some(k["key"].as_str().unwrap().to_owned()));
    for _ in 0..5 {
        c.whoami().unwrap();
    }
    server.stop();
    let server = Server::start(&data);
    let admin = Client::new(&server.url, Some(admin_key));
    let got = admin.get_key(k["id"].as_str().unwrap()).unwrap();
    assert_eq!(got["requestCount"], 5);
    assert!(got["lastUsedAt"].is_string());
}

/// `sandgate` with input on its standard input.
fn sandgate_with_stdin(
    args: &[&str],
    env: &[(&str, &str)],
    config_dir: &Path,
    input: &[u8],
) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("SANDGATE_URL")
        .env_remove("SANDGATE_API_KEY")
        .env("SANDGATE_CONFIG_DIR", config_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run sandgate");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn run_behaves_like_the_program() {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("skipped: programs cannot be jailed here: {e}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"));
    let key = server.admin_key();
    let env = [
        ("SANDGATE_URL", server.url.as_str()),
        ("SANDGATE_API_KEY", key.as_str()),
    ];
    let config = tmp.path().join("config");

    let program = tmp.path().join("shout.py");
    std::fs::write(
        &program,
        "import sys\nprint(sys.stdin.read().strip() + '!')\nprint('warned', file=sys.stderr)\nsys.exit(3)\n",
    )
    .unwrap();
    let out = sandgate_with_stdin(&["run", program.to_str().unwrap()], &env, &config, b"hi\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi!\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "warned\n");
    assert_eq!(out.status.code(), Some(3), "the program's exit code");

    let out = sandgate(
        &["run", "--lang", "bash", "-c", "echo $((6 * 7))"],
        &env,
        &config,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    assert_eq!(out.status.code(), Some(0));

    let out = sandgate(
        &[
            "run",
            "--lang",
            "javascript",
            "-c",
            "console.log(data.x)",
            "--data",
            "{\"x\": 5}",
        ],
        &env,
        &config,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "5\n");

    let out = sandgate(
        &[
            "run",
            "--lang",
            "python",
            "--timeout",
            "300ms",
            "-c",
            "while True: pass",
        ],
        &env,
        &config,
    );
    assert_eq!(
        out.status.code(),
        Some(124),
        "timeout exits like timeout(1)"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("deadline"));

    // A language the CLI cannot guess is a clear error, before any request.
    let out = sandgate(&["run", "-c", "echo hi"], &env, &config);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lang"));
    let unknown = tmp.path().join("prog.txt");
    std::fs::write(&unknown, "x").unwrap();
    let out = sandgate(&["run", unknown.to_str().unwrap()], &env, &config);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lang"));
}

/// kill -9 in the middle of a burst of runs: the executions quota afterwards is
/// exactly what was consumed — never an execution given back (at most the lowest
/// count any run reported), never one lost (at least one per answered run, at most
/// one per request sent), and no count handed out twice.
#[test]
fn the_quota_survives_kill_9_during_a_burst_of_runs() {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("skipped: programs cannot be jailed here: {e}");
        return;
    }
    const LIMIT: u64 = 200;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let admin_key = server.admin_key();
    let admin = Client::new(&server.url, Some(admin_key.clone()));
    let created = admin
        .create_key(&json!({"name": "burst", "profile": "sandbox-user", "executionsLimit": LIMIT}))
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let client = Client::new(&server.url, Some(key.clone()));
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut sent, mut lefts) = (0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sent += 1;
                    match client.execute(&json!({"language": "bash", "code": "sleep 0.05"})) {
                        Ok(r) => lefts.push(r["executionsLeft"].as_u64().unwrap()),
                        Err(_) => break, // the server is gone
                    }
                }
                (sent, lefts)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut lefts) = (0, Vec::new());
    for w in workers {
        let (s, l) = w.join().unwrap();
        sent += s;
        lefts.extend(l);
    }
    assert!(!lefts.is_empty(), "some runs finished before the kill");

    let server = Server::start(&data);
    let admin = Client::new(&server.url, Some(admin_key));
    let remaining = admin.get_key(&id).unwrap()["executionsRemaining"]
        .as_u64()
        .unwrap();
    let answered = lefts.len() as u64;
    let lowest = *lefts.iter().min().unwrap();
    assert!(remaining <= lowest, "given back: {remaining} > {lowest}");
    assert!(
        LIMIT - remaining >= answered,
        "lost: {remaining} left after {answered} runs"
    );
    assert!(LIMIT - remaining <= sent, "more taken than requested");
    let mut distinct = lefts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), lefts.len(), "a count was handed out twice");
}

/// Refills fall on a schedule kept in the store: intervals that passed while the
/// server was down (killed with -9) are all caught up when it is back, and a
/// refill applied before a crash is never applied again after it. Observations
/// are compared by their `nextRefillAt`, which moves one interval per refill.
#[test]
fn executions_refills_catch_up_after_kill_9_and_never_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let admin_key = server.admin_key();
    let admin = Client::new(&server.url, Some(admin_key.clone()));
    let created = json_of(&sandgate(
        &[
            "keys",
            "create",
            "--json",
            "--name",
            "refilled",
            "--executions-limit",
            "100",
            "--executions-refill",
            "3/1s",
        ],
        &[
            ("SANDGATE_URL", &server.url),
            ("SANDGATE_API_KEY", &admin_key),
        ],
        tmp.path(),
    ));
    assert_eq!(
        created["executionsRefill"],
        json!({"amount": 3, "intervalSec": 1})
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();
    let millis = |v: &Value| {
        sandgate_core::model::Timestamp::parse_rfc3339(v["nextRefillAt"].as_str().unwrap())
            .unwrap()
            .millis()
    };
    let remaining = |v: &Value| v["executionsRemaining"].as_u64().unwrap();
    // What the refills between two observations added, capped at the limit.
    let expect = |before: &Value, after: &Value| {
        let moved = millis(after) - millis(before);
        assert!(moved >= 0 && moved % 1000 == 0, "{before} → {after}");
        (remaining(before) + 3 * (moved / 1000) as u64).min(100)
    };
    let first = admin.reset_executions(&id, Some(0)).unwrap();
    server.kill9();
    // Down for at least three intervals after the first observation's next refill.
    let wait = millis(&first) + 3_200 - sandgate_core::model::Timestamp::now().millis();
    std::thread::sleep(Duration::from_millis(wait.max(0) as u64));

    let server = Server::start(&data);
    let admin = Client::new(&server.url, Some(admin_key.clone()));
    let back = admin.get_key(&id).unwrap();
    assert!(millis(&back) - millis(&first) >= 3_000, "{first} → {back}");
    assert_eq!(
        remaining(&back),
        expect(&first, &back),
        "all missed intervals"
    );
    // A run takes from the refilled counter (and writes the refills it applied).
    let mut last = back;
    if sandgate_jail::Jail::new(sandgate_jail::Config::default()).is_ok() {
        let r = Client::new(&server.url, Some(key))
            .execute(&json!({"language": "bash", "code": "true"}))
            .unwrap();
        assert!(r["executionsLeft"].as_u64().unwrap() >= remaining(&last) - 1);
        let after_run = admin.get_key(&id).unwrap();
        assert_eq!(remaining(&after_run), expect(&last, &after_run) - 1);
        last = after_run;
    }
    server.kill9();
    let server = Server::start(&data);
    let again = Client::new(&server.url, Some(admin_key.clone()))
        .get_key(&id)
        .unwrap();
    assert_eq!(
        remaining(&again),
        expect(&last, &again),
        "not applied twice"
    );
    let env = [
        ("SANDGATE_URL", server.url.as_str()),
        ("SANDGATE_API_KEY", &admin_key),
    ];
    let changed = json_of(&sandgate(
        &[
            "keys",
            "update",
            &id,
            "--json",
            "--executions-refill",
            "50/day",
        ],
        &env,
        tmp.path(),
    ));
    assert_eq!(
        changed["executionsRefill"],
        json!({"amount": 50, "intervalSec": 86_400})
    );
    let removed = json_of(&sandgate(
        &["keys", "update", &id, "--json", "--no-executions-refill"],
        &env,
        tmp.path(),
    ));
    assert_eq!(removed["executionsRefill"], Value::Null);
    assert_eq!(removed["executionsLimit"], 100);
}

/// A server killed with -9 leaves no sandbox process behind, and the next one
/// knows nothing of the old sandboxes (they are 404, marked killed in the store).
#[test]
fn sandboxes_die_with_a_crashed_server() {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("skipped: programs cannot be jailed here: {e}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let admin_key = server.admin_key();
    let admin = Client::new(&server.url, Some(admin_key.clone()));
    let marker = format!("crash-marker-{}", std::process::id());
    let sbx = admin
        .call(
            sandgate_client::Method::POST,
            "/v1/sandboxes",
            Some(&json!({})),
        )
        .unwrap();
    let id = sbx["id"].as_str().unwrap().to_owned();
    let command = format!("bash -c '(exec -a {marker} sleep 300) > /dev/null 2>&1 &'");
    admin
        .call(
            sandgate_client::Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&json!({ "command": command })),
        )
        .unwrap();
    let leftovers = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&marker))
            .count()
    };
    assert_eq!(leftovers(), 1);
    server.kill9();
    let started = Instant::now();
    while leftovers() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a sandbox process survived the server"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = Server::start(&data);
    let admin = Client::new(&server.url, Some(admin_key));
    let err = admin
        .call(
            sandgate_client::Method::GET,
            &format!("/v1/sandboxes/{id}"),
            None,
        )
        .unwrap_err();
    assert_eq!(err.code(), Some("NOT_FOUND"));
}

/// Templates survive `kill -9`: a built one is ready again (its layer found on
/// disk) and starts sandboxes; one that was building is marked failed. Driven
/// through `sandgate template` and `sandgate sandbox create --template`.
#[test]
fn templates_survive_kill_9_and_an_interrupted_build_fails() {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("skipped: programs cannot be jailed here: {e}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let key = server.admin_key();
    let config = tmp.path().join("config");
    let source = tmp.path().join("greet.py");
    std::fs::write(&source, "print('hello from the template')\n").unwrap();
    let env = [
        ("SANDGATE_URL", server.url.as_str()),
        ("SANDGATE_API_KEY", key.as_str()),
    ];
    let built = json_of(&sandgate(
        &[
            "template",
            "create",
            "kept",
            "--file",
            &format!("/workspace/greet.py={}", source.display()),
            "--setup",
            "python3 greet.py > out.txt",
            "--memory-mb",
            "200",
            "--wait",
            "--json",
        ],
        &env,
        &config,
    ));
    assert_eq!(built["status"], "ready", "{built}");
    let building = json_of(&sandgate(
        &[
            "template",
            "create",
            "cut",
            "--setup",
            "sleep 120",
            "--json",
        ],
        &env,
        &config,
    ));
    assert_eq!(building["status"], "building");
    server.kill9();

    let server = Server::start(&data);
    let env = [
        ("SANDGATE_URL", server.url.as_str()),
        ("SANDGATE_API_KEY", key.as_str()),
    ];
    let list = sandgate(&["template", "list"], &env, &config);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("default") && text.contains("kept"), "{text}");
    let cut = json_of(&sandgate(
        &["template", "get", "cut", "--json"],
        &env,
        &config,
    ));
    assert_eq!(cut["status"], "failed", "{cut}");
    assert!(
        cut["build"]["error"]
            .as_str()
            .unwrap()
            .contains("server stopped"),
        "{cut}"
    );
    let kept = json_of(&sandgate(
        &["template", "get", "kept", "--json"],
        &env,
        &config,
    ));
    assert_eq!(kept["status"], "ready");
    assert_eq!(kept["build"]["id"], built["build"]["id"]);
    let sbx = json_of(&sandgate(
        &["sandbox", "create", "--template", "kept", "--json"],
        &env,
        &config,
    ));
    assert_eq!(
        (&sbx["template"], &sbx["memoryMb"]),
        (&json!("kept"), &json!(200))
    );
    let out = sandgate(
        &[
            "sandbox",
            "exec",
            sbx["id"].as_str().unwrap(),
            "cat out.txt",
        ],
        &env,
        &config,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the template\n"
    );
    // Only the kept build's layer is on disk.
    let layers = std::fs::read_dir(data.join("templates/layers"))
        .unwrap()
        .count();
    assert_eq!(layers, 1);
    let out = sandgate(&["template", "rebuild", "kept", "--wait"], &env, &config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("$ python3 greet.py > out.txt"));
    let out = sandgate(&["template", "delete", "cut"], &env, &config);
    assert!(out.status.success());
    let out = sandgate(&["template", "get", "cut"], &env, &config);
    assert!(!out.status.success());
}

#[test]
fn sandbox_commands_drive_a_sandbox() {
    if let Err(e) = sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
        eprintln!("skipped: programs cannot be jailed here: {e}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"));
    let key = server.admin_key();
    let env = [
        ("SANDGATE_URL", server.url.as_str()),
        ("SANDGATE_API_KEY", key.as_str()),
    ];
    let config = tmp.path().join("config");
    let created = json_of(&sandgate(
        &[
            "sandbox",
            "create",
            "--timeout",
            "5m",
            "--metadata",
            "owner=cli",
            "--json",
        ],
        &env,
        &config,
    ));
    let id = created["id"].as_str().unwrap();
    assert_eq!(created["metadata"]["owner"], "cli");
    let out = sandgate(
        &["sandbox", "exec", id, "echo made > f; cat f; exit 5"],
        &env,
        &config,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "made\n");
    assert_eq!(out.status.code(), Some(5));
    let out = sandgate(
        &[
            "sandbox",
            "exec",
            id,
            "--lang",
            "python",
            "print(open('f').read().upper())",
        ],
        &env,
        &config,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "MADE\n\n");
    let list = sandgate(&["sandbox", "list"], &env, &config);
    assert!(String::from_utf8_lossy(&list.stdout).contains(id));
    let out = sandgate_with_stdin(
        &["sandbox", "files", id, "put", "/workspace/in/data.txt"],
        &env,
        &config,
        b"payload",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sandgate(
        &["sandbox", "files", id, "get", "/workspace/in/data.txt"],
        &env,
        &config,
    );
    assert_eq!(out.stdout, b"payload");
    let out = sandgate(
        &["sandbox", "files", id, "ls", "/workspace/in"],
        &env,
        &config,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("data.txt"));
    assert!(
        sandgate(
            &["sandbox", "files", id, "rm", "/workspace/in"],
            &env,
            &config
        )
        .status
        .success()
    );
    let out = sandgate(
        &["sandbox", "files", id, "get", "/workspace/in/data.txt"],
        &env,
        &config,
    );
    assert!(!out.status.success());
    assert!(
        sandgate(&["sandbox", "code", id, "n = 20"], &env, &config)
            .status
            .success()
    );
    let out = sandgate(&["sandbox", "code", id, "n * 2 + 2"], &env, &config);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    assert_eq!(
        json_of(&sandgate(
            &["sandbox", "pause", id, "--json"],
            &env,
            &config
        ))["state"],
        "paused"
    );
    let out = sandgate(&["sandbox", "exec", id, "true"], &env, &config);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("paused"));
    assert_eq!(
        json_of(&sandgate(
            &["sandbox", "resume", id, "--json"],
            &env,
            &config
        ))["state"],
        "running"
    );
    assert!(
        sandgate(&["sandbox", "kill", id], &env, &config)
            .status
            .success()
    );
    let out = sandgate(&["sandbox", "get", id], &env, &config);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn open_mode_refuses_a_public_address_unless_told() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let mut child = Command::new(BIN)
        .args(["serve", "--auth-mode", "none", "--addr", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(&data_dir)
        .env_remove("SANDGATE_ALLOW_OPEN_ON_PUBLIC")
        .env_remove("SANDGATE_AUTH_MODE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sandgate serve");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("sandgate serve --auth-mode none kept running on 0.0.0.0");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("authentication off") && stderr.contains("--allow-open-on-public"),
        "{stderr}"
    );
    assert!(!data_dir.exists(), "refused before opening the store");
}
