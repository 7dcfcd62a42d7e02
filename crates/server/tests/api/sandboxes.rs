//! Sandboxes through the API (SPEC §4): lifecycle, exec, pause/resume, expiry,
//! ownership.

use std::time::{Duration, Instant};

use sandgate_client::{Client, Method};
use serde_json::{Value, json};

use crate::common::{PostJson, TestApp, assert_error, jail_available, processes_named};

fn create(client: &Client, body: Value) -> Value {
    let r = client.post_json("/v1/sandboxes", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

fn exec(client: &Client, id: &str, body: Value) -> Value {
    let r = client.post_json(&format!("/v1/sandboxes/{id}/exec"), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn get(client: &Client, path: &str) -> sandgate_client::RawResponse {
    client.raw(Method::GET, path, &[], None).unwrap()
}

fn delete(client: &Client, path: &str) -> sandgate_client::RawResponse {
    client.raw(Method::DELETE, path, &[], None).unwrap()
}

#[test]
fn a_sandbox_keeps_files_and_processes_between_execs_until_killed() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let sbx = create(
        &admin,
        json!({"metadata": {"user": "ada"}, "timeoutSec": 120, "env": {"GREETING": "hi"}}),
    );
    let id = sbx["id"].as_str().unwrap();
    assert!(id.starts_with("sbx_"));
    assert_eq!(sbx["state"], "running");
    assert_eq!(sbx["template"], "default");
    assert_eq!(sbx["network"], "none");
    assert_eq!(sbx["metadata"]["user"], "ada");
    assert!(sbx["expiresAt"].is_string() && sbx["memoryMb"].is_u64());

    let r = exec(
        &admin,
        id,
        json!({"command": "echo $GREETING > note; pwd; (sleep 300 &) ; echo ok"}),
    );
    assert_eq!(r["stdout"], "/workspace\nok\n");
    assert_eq!(r["status"], "ok");
    let r = exec(
        &admin,
        id,
        json!({"command": "cat /workspace/note; ps -e | grep -c sleep"}),
    );
    assert_eq!(r["stdout"], "hi\n1\n", "{r}");
    let r = exec(
        &admin,
        id,
        json!({"language": "python", "code": "import os; print(os.getcwd(), open('note').read().strip())"}),
    );
    assert_eq!(r["stdout"], "/workspace hi\n");
    let r = exec(
        &admin,
        id,
        json!({"command": "cat; exit 3", "stdin": "in", "cwd": "/tmp"}),
    );
    assert_eq!(r["stdout"], "in");
    assert_eq!(r["exitCode"], 3);
    assert_eq!(r["status"], "error");
    let r = exec(&admin, id, json!({"command": "sleep 10", "timeoutMs": 200}));
    assert_eq!(r["status"], "timeout");

    assert_eq!(get(&admin, &format!("/v1/sandboxes/{id}")).json()["id"], id);
    assert_eq!(delete(&admin, &format!("/v1/sandboxes/{id}")).status, 204);
    assert_error(
        &get(&admin, &format!("/v1/sandboxes/{id}")),
        404,
        "NOT_FOUND",
    );
    let r = admin.post_json(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"command": "true"}),
    );
    assert_error(&r, 404, "NOT_FOUND");
    assert_error(
        &delete(&admin, &format!("/v1/sandboxes/{id}")),
        404,
        "NOT_FOUND",
    );
}

#[test]
fn lists_filter_by_state_and_metadata_and_page_with_a_cursor() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let a = create(&admin, json!({"metadata": {"team": "red"}}));
    let b = create(&admin, json!({"metadata": {"team": "blue"}}));
    let c = create(&admin, json!({"metadata": {"team": "red"}}));
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = get(&admin, "/v1/sandboxes").json();
    assert_eq!(
        ids(&all),
        [&a["id"], &b["id"], &c["id"]].map(|v| v.as_str().unwrap().to_owned())
    );
    let red = get(&admin, "/v1/sandboxes?metadata.team=red").json();
    assert_eq!(
        ids(&red),
        [&a["id"], &c["id"]].map(|v| v.as_str().unwrap().to_owned())
    );
    let b_id = b["id"].as_str().unwrap();
    admin.post_json(&format!("/v1/sandboxes/{b_id}/pause"), &json!({}));
    assert_eq!(
        ids(&get(&admin, "/v1/sandboxes?state=paused").json()),
        [b_id]
    );
    let page1 = get(&admin, "/v1/sandboxes?limit=2").json();
    assert_eq!(ids(&page1).len(), 2);
    let cursor = page1["nextCursor"].as_str().unwrap();
    let page2 = get(&admin, &format!("/v1/sandboxes?limit=2&cursor={cursor}")).json();
    assert_eq!(ids(&page2), [c["id"].as_str().unwrap()]);
    assert!(page2["nextCursor"].is_null());
    assert_error(
        &get(&admin, "/v1/sandboxes?state=zombie"),
        400,
        "INVALID_REQUEST",
    );
}

#[test]
fn another_tenant_or_env_gets_not_found_everywhere() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let sbx = create(&app.admin(), json!({}));
    let id = sbx["id"].as_str().unwrap();
    let (other_tenant, _) =
        app.create_key(json!({"name": "b", "tenant": "beta", "profile": "admin"}));
    let (other_env, _) = app.create_key(json!({"name": "t", "env": "test", "profile": "admin"}));
    for key in [other_tenant, other_env] {
        let c = app.client(&key);
        assert_error(&get(&c, &format!("/v1/sandboxes/{id}")), 404, "NOT_FOUND");
        assert_error(
            &delete(&c, &format!("/v1/sandboxes/{id}")),
            404,
            "NOT_FOUND",
        );
        for (path, body) in [
            ("exec", json!({"command": "id"})),
            ("pause", json!({})),
            ("resume", json!({})),
            ("timeout", json!({"timeoutSec": 5})),
        ] {
            let r = c.post_json(&format!("/v1/sandboxes/{id}/{path}"), &body);
            assert_error(&r, 404, "NOT_FOUND");
        }
        assert!(
            get(&c, "/v1/sandboxes").json()["data"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
    // Still there for its owner.
    assert_eq!(
        get(&app.admin(), &format!("/v1/sandboxes/{id}")).status,
        200
    );
}

#[test]
fn a_paused_sandbox_refuses_exec_and_pausing_twice_conflicts() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let id = create(&admin, json!({}))["id"].as_str().unwrap().to_owned();
    let r = admin.post_json(&format!("/v1/sandboxes/{id}/pause"), &json!({}));
    assert_eq!(r.json()["state"], "paused");
    assert_error(
        &admin.post_json(&format!("/v1/sandboxes/{id}/pause"), &json!({})),
        409,
        "CONFLICT",
    );
    assert_error(
        &admin.post_json(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"command": "true"}),
        ),
        409,
        "CONFLICT",
    );
    let r = admin.post_json(&format!("/v1/sandboxes/{id}/resume"), &json!({}));
    assert_eq!(r.json()["state"], "running");
    assert_error(
        &admin.post_json(&format!("/v1/sandboxes/{id}/resume"), &json!({})),
        409,
        "CONFLICT",
    );
    assert_eq!(
        exec(&admin, &id, json!({"command": "echo back"}))["stdout"],
        "back\n"
    );
}

#[test]
fn an_expired_sandbox_is_killed_without_any_request() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start_with(|c| c.sandbox_reap_interval = Duration::from_millis(100));
    let admin = app.admin();
    let marker = format!("sbx-expiry-marker-{}", std::process::id());
    let id = create(&admin, json!({"timeoutSec": 1}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    exec(
        &admin,
        &id,
        json!({"command": format!("bash -c '(exec -a {marker} sleep 300) > /dev/null 2>&1 &'")}),
    );
    let leftovers = || processes_named(&marker);
    assert_eq!(leftovers(), 1);
    let started = Instant::now();
    while get(&admin, &format!("/v1/sandboxes/{id}")).status != 404 {
        assert!(started.elapsed() < Duration::from_secs(10), "never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Gone from the API first, then killed: give the kill a moment.
    while leftovers() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a process outlived its sandbox"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Extending the timeout keeps another one alive.
    let id = create(&admin, json!({"timeoutSec": 1}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = admin.post_json(
        &format!("/v1/sandboxes/{id}/timeout"),
        &json!({"timeoutSec": 60}),
    );
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(&admin, &format!("/v1/sandboxes/{id}")).status, 200);
}

#[test]
fn limits_quotas_and_bad_requests() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start_with(|c| c.sandbox_limits.max_per_tenant = 2);
    let admin = app.admin();
    let first = create(&admin, json!({}));
    create(&admin, json!({}));
    let r = admin.post_json("/v1/sandboxes", &json!({}));
    assert_error(&r, 429, "RATE_LIMITED");
    assert!(r.header("retry-after").is_some());
    // Each exec takes one execution.
    let (key, _) =
        app.create_key(json!({"name": "m", "profile": "sandbox-user", "executionsLimit": 1}));
    let id = first["id"].as_str().unwrap();
    let c = app.client(&key);
    // The metered key is in the same tenant and env: it may use the sandbox.
    let r = c.post_json(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"command": "true"}),
    );
    assert_eq!(r.json()["executionsLeft"], 0, "{}", r.text());
    let r = c.post_json(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"command": "true"}),
    );
    assert_error(&r, 429, "QUOTA_EXCEEDED");
    for (body, field) in [
        (json!({"template": "nope"}), "template"),
        (json!({"network": "host"}), "network"),
        (json!({"timeoutSec": 0}), "timeoutSec"),
        (json!({"memoryMb": 1}), "memoryMb"),
    ] {
        let r = admin.post_json("/v1/sandboxes", &body);
        assert_eq!(
            assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
            field
        );
    }
    for (body, field) in [
        (json!({}), "command"),
        (json!({"language": "cobol", "code": "x"}), "language"),
        (json!({"command": "true", "cwd": "relative"}), "cwd"),
        (json!({"command": "true", "timeoutMs": 0}), "timeoutMs"),
    ] {
        let r = admin.post_json(&format!("/v1/sandboxes/{id}/exec"), &body);
        assert_eq!(
            assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
            field
        );
    }
}

/// A raw HTTP/1.1 streaming exec: returns the connection positioned at the body.
fn stream_exec(app: &TestApp, id: &str, body: &Value) -> std::io::BufReader<std::net::TcpStream> {
    use std::io::{BufRead, Write};
    let addr = app.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let body = serde_json::to_vec(body).unwrap();
    write!(
        conn,
        "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Accept: application/x-ndjson\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        app.admin_key,
        body.len()
    )
    .unwrap();
    conn.write_all(&body).unwrap();
    let mut reader = std::io::BufReader::new(conn);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.contains(" 200 "), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            return reader;
        }
    }
}

/// The next ndjson event of a chunked body (one event per chunk; the chunk-size
/// lines and blank separators are skipped).
fn next_event(reader: &mut std::io::BufReader<std::net::TcpStream>) -> Value {
    use std::io::BufRead;
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "the stream ended early");
        let line = line.trim();
        if line.starts_with('{') {
            return serde_json::from_str(line).unwrap();
        }
    }
}

#[test]
fn exec_output_streams_as_it_is_produced() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let id = create(&admin, json!({}))["id"].as_str().unwrap().to_owned();
    // The program waits for a file that only a second exec creates: its first line
    // can only arrive if output streams before the program ends.
    let mut reader = stream_exec(
        &app,
        &id,
        &json!({"command": "echo ready; while [ ! -f /tmp/go ]; do sleep 0.05; done; echo done >&2; exit 2"}),
    );
    assert_eq!(
        next_event(&mut reader),
        json!({"type": "stdout", "data": "ready\n"})
    );
    exec(&admin, &id, json!({"command": "touch /tmp/go"}));
    assert_eq!(
        next_event(&mut reader),
        json!({"type": "stderr", "data": "done\n"})
    );
    let exit = next_event(&mut reader);
    assert_eq!(exit["type"], "exit");
    assert_eq!(exit["exitCode"], 2);
    assert_eq!(exit["stdout"], "ready\n");
    assert_eq!(exit["stderr"], "done\n");
}

#[test]
fn a_client_that_disconnects_stops_its_command() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let id = create(&admin, json!({}))["id"].as_str().unwrap().to_owned();
    let marker = format!("disconnect-marker-{}", std::process::id());
    let mut reader = stream_exec(
        &app,
        &id,
        &json!({"command": format!("echo started; exec bash -c 'exec -a {marker} sleep 300'")}),
    );
    assert_eq!(next_event(&mut reader)["data"], "started\n");
    let running = || processes_named(&marker);
    // `started` is printed just before the exec: wait for the marker to appear.
    let started = Instant::now();
    while running() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the command never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(reader);
    let started = Instant::now();
    while running() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the command outlived its client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The sandbox itself is fine.
    assert_eq!(
        exec(&admin, &id, json!({"command": "echo ok"}))["stdout"],
        "ok\n"
    );
}

#[test]
fn files_are_written_read_listed_and_removed_inside_the_sandbox() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let id = create(&admin, json!({}))["id"].as_str().unwrap().to_owned();
    let files = |path: &str| format!("/v1/sandboxes/{id}/files?path={path}");
    let r = admin
        .raw(
            Method::PUT,
            &files("/workspace/in/data.csv"),
            &[],
            Some(b"a,b\n1,2\n"),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"path": "/workspace/in/data.csv", "size": 8})
    );
    let r = exec(
        &admin,
        &id,
        json!({"command": "wc -l < in/data.csv; echo out > in/result.txt"}),
    );
    assert_eq!(r["stdout"], "2\n");
    assert_eq!(
        get(&admin, &files("/workspace/in/result.txt")).body,
        b"out\n"
    );
    let listing = get(&admin, &files("/workspace/in")).json();
    assert_eq!(listing["path"], "/workspace/in");
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data.csv", "result.txt"]);
    assert_eq!(listing["entries"][0]["type"], "file");
    assert_eq!(delete(&admin, &files("/workspace/in")).status, 204);
    assert_error(&get(&admin, &files("/workspace/in")), 404, "NOT_FOUND");

    // `..` and links made inside stay inside: the sandbox's own /etc/passwd, never
    // the host's; no host file through a link; no /proc.
    let passwd = get(&admin, &files("/workspace/../../../etc/passwd")).text();
    assert!(passwd.contains("sandbox:x:65534"), "{passwd}");
    assert!(
        !std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .contains("sandbox:x:65534:65534:sandbox:/workspace")
    );
    let secret = app.data_dir().join("host-only.txt");
    std::fs::write(&secret, "host only").unwrap();
    exec(
        &admin,
        &id,
        json!({"command": format!("ln -s {} /workspace/leak; ln -s /proc/1/environ /workspace/env", secret.display())}),
    );
    assert_error(&get(&admin, &files("/workspace/leak")), 404, "NOT_FOUND");
    let r = get(&admin, &files("/workspace/env"));
    assert_eq!(
        assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
        "path"
    );
    assert_error(
        &get(&admin, &files("/proc/1/environ")),
        400,
        "INVALID_REQUEST",
    );
    let r = admin
        .raw(Method::PUT, &files("/workspace/leak"), &[], Some(b"x"))
        .unwrap();
    assert_error(&r, 400, "INVALID_REQUEST");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host only");
    let r = admin
        .raw(Method::PUT, &files("/usr/bin/evil"), &[], Some(b"x"))
        .unwrap();
    assert_error(&r, 400, "INVALID_REQUEST");
    assert!(!std::path::Path::new("/usr/bin/evil").exists());
    assert_error(
        &get(&admin, &format!("/v1/sandboxes/{id}/files")),
        400,
        "INVALID_REQUEST",
    );
    assert_error(&get(&admin, &files("relative")), 400, "INVALID_REQUEST");

    // The files routes have the sandbox user's rights, not the server's: a file
    // the user locked itself out of stays locked, root's /sandbox is read-only.
    exec(
        &admin,
        &id,
        json!({"command": "echo locked-away > /workspace/locked; chmod 000 /workspace/locked"}),
    );
    let r = get(&admin, &files("/workspace/locked"));
    assert!(!r.status.is_success(), "{}", r.text());
    assert!(!r.text().contains("locked-away"));
    let r = admin
        .raw(Method::PUT, &files("/sandbox/planted.py"), &[], Some(b"x"))
        .unwrap();
    assert!(!r.status.is_success(), "{}", r.text());

    // Another tenant's sandbox: 404, whatever the path.
    let (other, _) = app.create_key(json!({"name": "b", "tenant": "beta", "profile": "admin"}));
    let r = get(&app.client(&other), &files("/workspace"));
    assert_error(&r, 404, "NOT_FOUND");
}

#[test]
fn code_cells_share_state_like_a_notebook() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let id = create(&admin, json!({}))["id"].as_str().unwrap().to_owned();
    let code = |body: Value| {
        let r = admin.post_json(&format!("/v1/sandboxes/{id}/code"), &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let r = code(json!({"language": "python", "code": "import math\nx = 40\nprint('set')"}));
    assert_eq!(r["stdout"], "set\n");
    assert_eq!(r["status"], "ok");
    assert_eq!(r["result"], Value::Null);
    let r = code(json!({"language": "python", "code": "x + 2"}));
    assert_eq!(r["result"], 42);
    let r = code(json!({"language": "python", "code": "{'root': math.sqrt(x + 9)}"}));
    assert_eq!(r["result"], json!({"root": 7.0}));
    // An error comes back with its traceback; the state survives it.
    let r =
        code(json!({"language": "python", "code": "def f():\n    raise ValueError('bad')\nf()"}));
    assert_eq!(r["status"], "error");
    let stderr = r["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("ValueError: bad") && stderr.contains("<cell>"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("python_kernel") && !stderr.contains(".python-kernel"),
        "{stderr}"
    );
    // A cell past its deadline is interrupted, and the interpreter keeps its state.
    let r =
        code(json!({"language": "python", "code": "y = 1\nwhile True: pass", "timeoutMs": 500}));
    assert_eq!(r["status"], "timeout");
    let r = code(json!({"language": "python", "code": "(x, y)"}));
    assert_eq!(r["result"], json!([40, 1]), "{r}");
    // The interpreter is the sandbox's: exec sees the files it writes.
    code(json!({"language": "python", "code": "open('/workspace/k.txt', 'w').write('from cell')"}));
    assert_eq!(
        exec(&admin, &id, json!({"command": "cat /workspace/k.txt"}))["stdout"],
        "from cell"
    );
    let r = admin.post_json(
        &format!("/v1/sandboxes/{id}/code"),
        &json!({"language": "cobol", "code": "x"}),
    );
    assert_eq!(
        assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
        "language"
    );
}

const ECHO_SERVER: &str = r#"
import json
from http.server import BaseHTTPRequestHandler, HTTPServer
class Echo(BaseHTTPRequestHandler):
    def reply(self):
        n = int(self.headers.get("content-length") or 0)
        out = json.dumps({
            "method": self.command, "path": self.path,
            "authorization": self.headers.get("authorization"),
            "apiKey": self.headers.get("x-api-key"),
            "body": self.rfile.read(n).decode(),
        }).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = reply
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", 8000), Echo).serve_forever()
"#;

#[test]
fn an_opened_port_is_reached_through_sandgate_without_the_callers_key() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let id = create(&admin, json!({}))["id"].as_str().unwrap().to_owned();
    let put = admin
        .raw(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=/workspace/echo.py"),
            &[],
            Some(ECHO_SERVER.as_bytes()),
        )
        .unwrap();
    assert_eq!(put.status, 200);
    exec(
        &admin,
        &id,
        json!({"command": "nohup python3 /workspace/echo.py > /dev/null 2>&1 &"}),
    );
    // Not opened yet: 404.
    let proxied = |path: &str| format!("/v1/sandboxes/{id}/ports/8000/{path}");
    assert_error(&get(&admin, &proxied("x")), 404, "NOT_FOUND");
    let r = admin.post_json(&format!("/v1/sandboxes/{id}/ports"), &json!({"port": 8000}));
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["url"].as_str().unwrap().to_owned();
    assert!(
        url.ends_with(&format!("/v1/sandboxes/{id}/ports/8000/")),
        "{url}"
    );
    // Wait for the server inside to listen.
    let started = Instant::now();
    let answer = loop {
        let r = get(&admin, &proxied("a/b?x=1"));
        if r.status == 201 {
            break r.json();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{}", r.text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(answer["method"], "GET");
    assert_eq!(answer["path"], "/a/b?x=1");
    assert_eq!(
        answer["authorization"],
        Value::Null,
        "the caller's key leaked"
    );
    assert_eq!(answer["apiKey"], Value::Null);
    let r = admin.post_json(&proxied("submit"), &json!({"n": 1}));
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["body"], "{\"n\":1}");
    assert_eq!(r.json()["method"], "POST");
    // Root path too.
    assert_eq!(get(&admin, &proxied("")).json()["path"], "/");
    // Without the scope, with another tenant's key, or without a key: refused.
    let no_ports = app.key_with(&["sandbox:read"]);
    let r = get(&app.client(&no_ports), &proxied("x"));
    assert_eq!(
        assert_error(&r, 403, "FORBIDDEN")["error"]["requiredScope"],
        "sandbox:ports"
    );
    let (other, _) = app.create_key(json!({"name": "b", "tenant": "beta", "profile": "admin"}));
    assert_error(&get(&app.client(&other), &proxied("x")), 404, "NOT_FOUND");
    assert_error(&app.get(None, &proxied("x")), 401, "UNAUTHORIZED");
    // A port where nothing listens inside: the host's listener is never reached.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let host_port = host.local_addr().unwrap().port();
    admin.post_json(
        &format!("/v1/sandboxes/{id}/ports"),
        &json!({"port": host_port}),
    );
    let r = get(&admin, &format!("/v1/sandboxes/{id}/ports/{host_port}/"));
    assert_error(&r, 409, "CONFLICT");
    assert!(host.accept().is_err(), "the proxy reached a host port");
    // Closing it.
    assert_eq!(
        delete(&admin, &format!("/v1/sandboxes/{id}/ports/8000")).status,
        204
    );
    assert_error(&get(&admin, &proxied("x")), 404, "NOT_FOUND");
}
