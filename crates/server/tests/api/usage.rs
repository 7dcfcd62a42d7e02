//! `GET /v1/usage`: counted per key and day, scoped to the caller's partition.

use sandgate_client::Method;
use serde_json::{Value, json};

use crate::common::{PostJson, TestApp, assert_error};

fn entry<'a>(page: &'a Value, field: &str, value: &str) -> Option<&'a Value> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[field] == value)
}

#[test]
fn requests_and_denials_are_counted_per_key_and_day() {
    let app = TestApp::start();
    let (key, created) = app.create_key(
        json!({"name": "metered", "tenant": "meter", "scopes": ["sandbox:read", "billing:read"]}),
    );
    let id = created["id"].as_str().unwrap();
    for _ in 0..3 {
        assert_eq!(app.get(Some(&key), "/v1/auth/whoami").status.as_u16(), 200);
    }
    for _ in 0..2 {
        assert_eq!(app.get(Some(&key), "/v1/keys").status.as_u16(), 403);
    }
    let by_key = app
        .admin()
        .call(Method::GET, "/v1/usage?groupBy=key", None)
        .unwrap();
    let mine = entry(&by_key, "keyId", id).expect("a row for the key");
    assert_eq!(mine["requests"], 3);
    assert_eq!(mine["deniedRequests"], 2);
    assert_eq!(mine["executions"], 0);
    assert!(mine.get("cpuMs").is_some() && mine.get("sandboxSeconds").is_some());

    let by_day = app
        .client(&key)
        .call(Method::GET, "/v1/usage?groupBy=day", None)
        .unwrap();
    let days = by_day["data"].as_array().unwrap();
    assert_eq!(days.len(), 1);
    let today = days[0]["day"].as_str().unwrap();
    assert_eq!(today.len(), 10);
    // The tenant's only key: 3 requests, this one, and the 2 refused.
    assert_eq!(days[0]["requests"], 4);
    assert_eq!(days[0]["deniedRequests"], 2);
    // Outside the range: nothing.
    let past = app
        .client(&key)
        .call(Method::GET, "/v1/usage?from=2001-01-01&to=2001-01-31", None)
        .unwrap();
    assert_eq!(past["data"], json!([]));
}

#[test]
fn a_tenant_sees_only_its_own_usage() {
    let app = TestApp::start();
    let (acme, acme_obj) =
        app.create_key(json!({"name": "acme", "tenant": "acme", "scopes": ["billing:read"]}));
    let (globex, globex_obj) =
        app.create_key(json!({"name": "globex", "tenant": "globex", "scopes": ["sandbox:read"]}));
    app.get(Some(&globex), "/v1/auth/whoami");
    let page = app
        .client(&acme)
        .call(Method::GET, "/v1/usage", None)
        .unwrap();
    assert!(entry(&page, "keyId", acme_obj["id"].as_str().unwrap()).is_some());
    assert!(entry(&page, "keyId", globex_obj["id"].as_str().unwrap()).is_none());
}

#[test]
fn bad_usage_parameters_name_the_field() {
    let app = TestApp::start();
    for (query, field) in [
        ("groupBy=tenant", "groupBy"),
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("from=2026-02-01&to=2026-01-01", "from"),
        ("from=2020-01-01&to=2026-01-01", "from"),
    ] {
        let r = app.get(Some(&app.admin_key), &format!("/v1/usage?{query}"));
        assert_eq!(
            assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
            field,
            "{query}"
        );
    }
}

/// Python that burns `secs` of CPU time (not wall time), then prints `burnt`.
fn burn(secs: f64) -> String {
    format!(
        "python3 -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < {secs}: pass\nprint(\"burnt\")'"
    )
}

fn usage_of(app: &TestApp, key_id: &str) -> Value {
    let page = app
        .admin()
        .call(Method::GET, "/v1/usage?groupBy=key", None)
        .unwrap();
    entry(&page, "keyId", key_id)
        .cloned()
        .unwrap_or_else(|| json!({"cpuMs": 0, "sandboxSeconds": 0, "executions": 0}))
}

fn count(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

/// CPU time used in a sandbox is billed to the key that created it, whoever runs
/// there: at each exec's end what was not billed yet, and what background
/// processes used since when the sandbox is killed. Lower bounds are well below
/// what was burnt: the machine's speed never matters.
#[test]
fn sandbox_cpu_and_seconds_are_billed_to_the_creating_key() {
    if !crate::common::jail_available() {
        return;
    }
    let app = TestApp::start();
    let (owner_key, owner) = app.create_key(json!({
        "name": "owner", "tenant": "cpu", "scopes": ["sandbox:*"]
    }));
    let (runner_key, runner) = app.create_key(json!({
        "name": "runner", "tenant": "cpu", "scopes": ["sandbox:execute", "sandbox:files"]
    }));
    let (owner_id, runner_id) = (
        owner["id"].as_str().unwrap(),
        runner["id"].as_str().unwrap(),
    );
    let started = std::time::Instant::now();
    let r = app
        .client(&owner_key)
        .post_json("/v1/sandboxes", &json!({"timeoutSec": 120}));
    assert_eq!(r.status, 201, "{}", r.text());
    let created = std::time::Instant::now();
    let sbx = r.json()["id"].as_str().unwrap().to_owned();
    let runner_client = app.client(&runner_key);
    let exec = |command: String| {
        let r = runner_client.post_json(
            &format!("/v1/sandboxes/{sbx}/exec"),
            &json!({ "command": command }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };

    // An exec that burns 300 ms: its answer and the owner's usage show it.
    let r = exec(burn(0.3));
    assert_eq!(r["stdout"], "burnt\n", "{r}");
    assert!(count(&r, "cpuMs") >= 150, "{r}");
    let after_exec = usage_of(&app, owner_id);
    assert!(count(&after_exec, "cpuMs") >= 150, "{after_exec}");
    assert_eq!(count(&after_exec, "sandboxSeconds"), 0, "still running");
    // The execution is the runner's (its quota), the CPU is the owner's.
    let runner_usage = usage_of(&app, runner_id);
    assert_eq!(count(&runner_usage, "executions"), 1);
    assert_eq!(count(&runner_usage, "cpuMs"), 0);

    // A background process burns 300 ms after its exec has answered; killing the
    // sandbox bills it.
    exec(format!("({} > /workspace/done 2>&1 &)", burn(0.3)));
    let files = |path: &str| {
        runner_client
            .raw(
                Method::GET,
                &format!("/v1/sandboxes/{sbx}/files?path={path}"),
                &[],
                None,
            )
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while files("/workspace/done").text() != "burnt\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the background burn never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let before_kill = usage_of(&app, owner_id);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = app
        .client(&owner_key)
        .raw(Method::DELETE, &format!("/v1/sandboxes/{sbx}"), &[], None)
        .unwrap();
    assert_eq!(r.status, 204);
    let ended = std::time::Instant::now();
    let killed = usage_of(&app, owner_id);
    assert!(
        count(&killed, "cpuMs") >= count(&before_kill, "cpuMs") + 150,
        "{before_kill} → {killed}"
    );
    // Every second begun is billed: at least the time between the answers, at
    // most the time from the create request to the kill's answer, rounded up.
    let seconds = count(&killed, "sandboxSeconds");
    let at_least = ended.duration_since(created).as_secs_f64().floor() as u64;
    let at_most = ended.duration_since(started).as_secs_f64().ceil() as u64;
    assert!(
        (at_least.max(1)..=at_most).contains(&seconds),
        "{seconds} s billed, lived {at_least}..{at_most} s"
    );
    // Billed once: nothing more arrives later.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let later = usage_of(&app, owner_id);
    assert_eq!(
        (count(&later, "cpuMs"), count(&later, "sandboxSeconds")),
        (count(&killed, "cpuMs"), seconds)
    );
}

/// A sandbox killed at its expiry is billed too, by the reaper.
#[test]
fn expired_sandboxes_are_billed() {
    if !crate::common::jail_available() {
        return;
    }
    let app = TestApp::start();
    let (key, created) = app.create_key(json!({"name": "short", "scopes": ["sandbox:*"]}));
    let id = created["id"].as_str().unwrap();
    let client = app.client(&key);
    let r = client.post_json("/v1/sandboxes", &json!({"timeoutSec": 120}));
    assert_eq!(r.status, 201, "{}", r.text());
    let sbx = r.json()["id"].as_str().unwrap().to_owned();
    let r = client.post_json(
        &format!("/v1/sandboxes/{sbx}/exec"),
        &json!({ "command": format!("({} &)", burn(0.2)) }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Its time is up in a second: the reaper kills it, no request needed.
    let r = client.post_json(
        &format!("/v1/sandboxes/{sbx}/timeout"),
        &json!({"timeoutSec": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Billed once the reaper has killed it (the kill bills after the sandbox is
    // gone from listings, so wait for the bill itself).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let usage = loop {
        let usage = usage_of(&app, id);
        if count(&usage, "sandboxSeconds") > 0 {
            break usage;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reaped: {usage}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let r = client.raw(Method::GET, &format!("/v1/sandboxes/{sbx}"), &[], None);
    assert_eq!(r.unwrap().status, 404);
    assert!(count(&usage, "cpuMs") >= 1, "{usage}");
}
