//! `POST /v1/execute` and `GET /v1/languages` (SPEC §3), quotas on runs, and the
//! server-wide cap on simultaneous runs.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{PostJson, TestApp, assert_error, jail_available};

#[test]
fn python_javascript_and_bash_run_with_data_result_stdin_and_env() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let r = admin
        .execute(&json!({
            "language": "python",
            "code": "import sys\nprint(data['n'] * 2)\nprint(sys.stdin.read().upper(), end='')\nresult = {'sum': sum(data['xs'])}",
            "data": {"n": 21, "xs": [1, 2, 3]},
            "stdin": "typed",
        }))
        .unwrap();
    assert_eq!(r["stdout"], "42\nTYPED");
    assert_eq!(r["result"], json!({"sum": 6}));
    assert_eq!(r["status"], "ok");
    assert_eq!(r["success"], true);
    assert_eq!(r["exitCode"], 0);
    assert_eq!(r["truncated"], false);
    assert!(r["durationMs"].is_u64());
    assert!(r.get("executionsLeft").is_none(), "no limit, no field");

    let r = admin
        .execute(&json!({
            "language": "javascript",
            "code": "console.log(process.env.GREETING, data.name); const result = [data.name.length];",
            "data": {"name": "ada"},
            "env": {"GREETING": "hello"},
        }))
        .unwrap();
    assert_eq!(r["stdout"], "hello ada\n");
    assert_eq!(r["result"], json!([3]));

    let r = admin
        .execute(&json!({
            "language": "bash",
            "code": "cat /sandbox/data.json; echo; echo to-stderr >&2; exit 3",
            "data": {"k": "v"},
        }))
        .unwrap();
    assert_eq!(r["stdout"], "{\"k\":\"v\"}\n");
    assert_eq!(r["stderr"], "to-stderr\n");
    assert_eq!(r["exitCode"], 3);
    assert_eq!(r["status"], "error");
    assert_eq!(r["success"], false);
    assert_eq!(r["result"], Value::Null);
}

#[test]
fn errors_are_reported_with_their_traceback() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let r = app.run("python", "x = 1\nraise ValueError('boom')");
    assert_eq!(r["status"], "error");
    assert_eq!(r["exitCode"], 1);
    let stderr = r["stderr"].as_str().unwrap();
    assert!(stderr.contains("ValueError: boom"), "{stderr}");
    assert!(stderr.contains("main.py"), "{stderr}");
    assert!(!stderr.contains("prelude"), "{stderr}");
    let r = app.run("javascript", "throw new Error('bad')");
    assert_eq!(r["status"], "error");
    assert!(r["stderr"].as_str().unwrap().contains("Error: bad"));
}

#[test]
fn languages_are_listed_with_versions_for_any_valid_key() {
    let app = TestApp::start();
    let key = app.key_with(&["keys:read"]);
    let list = app.client(&key).languages().unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["python", "javascript", "bash"]);
    for l in list["data"].as_array().unwrap() {
        let v = l["version"].as_str().unwrap();
        assert!(v.starts_with(|c: char| c.is_ascii_digit()), "{v}");
    }
    assert_error(&app.get(None, "/v1/languages"), 401, "UNAUTHORIZED");
}

#[test]
fn bad_requests_name_the_field() {
    let app = TestApp::start();
    let admin = app.admin();
    for (body, field) in [
        (json!({"language": "cobol", "code": "x"}), "language"),
        (json!({"language": "python", "code": ""}), "code"),
        (
            json!({"language": "python", "code": "x".repeat(2 << 20)}),
            "code",
        ),
        (
            json!({"language": "python", "code": "1", "timeoutMs": 0}),
            "timeoutMs",
        ),
        (
            json!({"language": "python", "code": "1", "timeoutMs": 3_600_000}),
            "timeoutMs",
        ),
        (
            json!({"language": "python", "code": "1", "memoryMb": 1_000_000}),
            "memoryMb",
        ),
        (
            json!({"language": "python", "code": "1", "env": {"LD_PRELOAD": "/x"}}),
            "env",
        ),
        (json!({"language": "python"}), "code"),
    ] {
        let r = admin.post_json("/v1/execute", &body);
        let err = assert_error(&r, 400, "INVALID_REQUEST");
        assert_eq!(err["error"]["field"], field, "{body}");
    }
}

#[test]
fn running_code_needs_the_execute_scope() {
    let app = TestApp::start();
    let key = app.key_with(&["keys:read"]);
    let r = app.client(&key).post_json(
        "/v1/execute",
        &json!({"language": "bash", "code": "echo hi"}),
    );
    let err = assert_error(&r, 403, "FORBIDDEN");
    assert_eq!(err["error"]["requiredScope"], "sandbox:execute");
}

#[test]
fn each_run_takes_one_execution_and_none_left_means_nothing_runs() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let (key, created) = app.create_key(json!({
        "name": "metered", "scopes": ["sandbox:execute"], "executionsLimit": 2
    }));
    let client = app.client(&key);
    let run = json!({"language": "bash", "code": "echo ran >> /tmp/x; echo ok"});
    assert_eq!(client.execute(&run).unwrap()["executionsLeft"], 1);
    assert_eq!(client.execute(&run).unwrap()["executionsLeft"], 0);
    let r = client.post_json("/v1/execute", &run);
    assert_error(&r, 429, "QUOTA_EXCEEDED");
    // A reset gives runs back.
    let id = created["id"].as_str().unwrap();
    app.admin()
        .post_json(&format!("/v1/keys/{id}/reset-executions"), &json!({}));
    assert_eq!(client.execute(&run).unwrap()["executionsLeft"], 1);
}

#[test]
fn exactly_the_quota_of_50_simultaneous_runs_happens() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let (key, created) = app.create_key(json!({
        "name": "burst", "scopes": ["sandbox:execute", "keys:read"], "executionsLimit": 20
    }));
    let n = 50;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let client = app.client(&key);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                client.post_json(
                    "/v1/execute",
                    &json!({"language": "bash", "code": "echo ran"}),
                )
            })
        })
        .collect();
    let responses: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ran: Vec<_> = responses.iter().filter(|r| r.status == 200).collect();
    let refused = responses
        .iter()
        .filter(|r| r.status == 429 && r.json()["error"]["code"] == "QUOTA_EXCEEDED")
        .count();
    assert_eq!(ran.len(), 20);
    assert_eq!(refused, 30);
    assert!(ran.iter().all(|r| r.json()["stdout"] == "ran\n"));
    let mut left: Vec<u64> = ran
        .iter()
        .map(|r| r.json()["executionsLeft"].as_u64().unwrap())
        .collect();
    left.sort_unstable();
    assert_eq!(
        left,
        (0..20).collect::<Vec<u64>>(),
        "each count given out once"
    );
    let id = created["id"].as_str().unwrap();
    let key_view = app.admin().get_key(id).unwrap();
    assert_eq!(key_view["executionsRemaining"], 0);
}

#[test]
fn ten_concurrent_runs_all_succeed() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let admin = app.admin();
            std::thread::spawn(move || {
                admin
                    .execute(&json!({"language": "python", "code": format!("print({i} * 2)")}))
                    .unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().unwrap();
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["stdout"], format!("{}\n", i * 2));
    }
}

#[test]
fn a_full_server_refuses_with_retry_after_and_takes_no_execution() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start_with(|c| {
        c.exec_limits.max_concurrent = 1;
        c.exec_limits.queue_wait = Duration::from_millis(200);
    });
    let (key, _) = app.create_key(json!({
        "name": "q", "scopes": ["sandbox:execute"], "executionsLimit": 10
    }));
    let slow = {
        let admin = app.admin();
        std::thread::spawn(move || {
            admin
                .execute(&json!({"language": "bash", "code": "sleep 2; echo done"}))
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r = app.client(&key).post_json(
        "/v1/execute",
        &json!({"language": "bash", "code": "echo hi"}),
    );
    assert_error(&r, 429, "RATE_LIMITED");
    assert!(r.header("retry-after").is_some());
    assert_eq!(slow.join().unwrap()["stdout"], "done\n");
    // The refused request took nothing: the next run leaves 9.
    let r = app
        .client(&key)
        .execute(&json!({"language": "bash", "code": "echo hi"}))
        .unwrap();
    assert_eq!(r["executionsLeft"], 9);
}
