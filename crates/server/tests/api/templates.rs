//! Templates through the API (SPEC §4 "Templates"): builds, sandboxes started
//! from them copy-on-write, rebuilds and deletes under running sandboxes,
//! ownership, scopes, and setups that try to reach the host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandgate_client::{Client, Method, RawResponse};
use serde_json::{Value, json};

use crate::common::{PostJson, TestApp, assert_error, jail_available};

fn create_template(client: &Client, body: Value) -> Value {
    let r = client.post_json("/v1/templates", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

fn call(client: &Client, method: Method, path: &str, body: Option<Value>) -> RawResponse {
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
    client
        .raw(
            method,
            path,
            &[("content-type", "application/json")],
            bytes.as_deref(),
        )
        .unwrap()
}

/// Polls until the template's build ends; the template then.
fn wait_built(client: &Client, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = call(client, Method::GET, &format!("/v1/templates/{id}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let t = r.json();
        if t["status"] != "building" {
            return t;
        }
        assert!(Instant::now() < deadline, "still building: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sandbox(client: &Client, body: Value) -> String {
    let r = client.post_json("/v1/sandboxes", &body);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}

/// Runs a command in a sandbox; (exit code, stdout + stderr).
fn sh(client: &Client, id: &str, command: &str) -> (i64, String) {
    let r = client.post_json(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({ "command": command }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["exitCode"].as_i64().unwrap_or(-1),
        format!(
            "{}{}",
            v["stdout"].as_str().unwrap(),
            v["stderr"].as_str().unwrap()
        ),
    )
}

/// The layer directories on disk (one per kept build).
fn layers(app: &TestApp) -> Vec<PathBuf> {
    let dir = app.data_dir().join("templates/layers");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until there are `n` layers on disk (removal happens in the background).
#[track_caller]
fn wait_layers(app: &TestApp, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while layers(app).len() != n {
        assert!(Instant::now() < deadline, "layers: {:?}", layers(app));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_built_template_starts_sandboxes_with_its_files_setup_and_defaults() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let t = create_template(
        &admin,
        json!({
            "id": "data-py",
            "description": "python with a venv",
            "files": {
                "/workspace/util.py": "def double(x):\n    return 2 * x\n",
                "/workspace/conf/settings.txt": "mode=fast\n",
            },
            "setup": [
                "echo built > built.txt; id -u > who.txt",
                "python3 -m venv --without-pip venv",
                "printf '#!/bin/sh\\necho tool says $GREETING\\n' > venv/bin/tool && chmod +x venv/bin/tool",
                "venv/bin/python -c 'import util; print(util.double(21))' > answer.txt",
                "cat /etc/hostname > /tmp/not-kept.txt",
            ],
            "env": {"GREETING": "hi"},
            "memoryMb": 256,
            "timeoutSec": 900,
        }),
    );
    // The create answers at once; the build runs in the background.
    assert_eq!(t["status"], "building", "{t}");
    assert_eq!(t["id"], "data-py");
    assert!(t["build"]["id"].as_str().unwrap().starts_with("bld_"));
    let t = wait_built(&admin, "data-py");
    assert_eq!(t["status"], "ready", "{t}");
    let log = t["build"]["log"].as_str().unwrap();
    assert!(
        log.contains("$ echo built > built.txt; id -u > who.txt"),
        "{log}"
    );
    assert!(t["build"]["sizeBytes"].as_u64().unwrap() > 0);
    assert!(t["build"]["durationMs"].is_u64() && t["build"]["finishedAt"].is_string());
    assert!(t["build"]["error"].is_null());

    // The template's defaults apply, the request's own values win.
    let r = admin.post_json("/v1/sandboxes", &json!({"template": "data-py"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let s = r.json();
    assert_eq!(s["template"], "data-py");
    assert_eq!(s["memoryMb"], 256);
    let id = s["id"].as_str().unwrap();
    let (code, out) = sh(
        &admin,
        id,
        "cat built.txt who.txt answer.txt conf/settings.txt; venv/bin/tool; \
         venv/bin/python -c 'import sys; print(sys.prefix)'; ls /tmp; stat -c %U /workspace",
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "built\n65534\n42\nmode=fast\ntool says hi\n/workspace/venv\nsandbox\n"
    );
    let other = sandbox(
        &admin,
        json!({"template": "data-py", "memoryMb": 128, "env": {"GREETING": "yo"}}),
    );
    assert_eq!(
        call(&admin, Method::GET, &format!("/v1/sandboxes/{other}"), None).json()["memoryMb"],
        128
    );
    assert_eq!(sh(&admin, &other, "venv/bin/tool").1, "tool says yo\n");
    // The files API sees the template's files.
    let r = call(
        &admin,
        Method::GET,
        &format!("/v1/sandboxes/{other}/files?path=/workspace/util.py"),
        None,
    );
    assert_eq!(r.text(), "def double(x):\n    return 2 * x\n");

    // Listed beside `default`, without logs.
    let list = call(&admin, Method::GET, "/v1/templates", None).json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["default", "data-py"]);
    assert_eq!(list["data"][1]["status"], "ready");
    assert!(list["data"][1]["build"].get("log").is_none());
}

#[test]
fn sandboxes_from_one_template_never_see_each_others_writes() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    create_template(
        &admin,
        json!({"id": "base", "files": {"/workspace/keep.txt": "original\n"},
               "setup": ["mkdir -p lib && echo lib > lib/a.txt"]}),
    );
    assert_eq!(wait_built(&admin, "base")["status"], "ready");
    let a = sandbox(&admin, json!({"template": "base"}));
    let b = sandbox(&admin, json!({"template": "base"}));
    let (code, out) = sh(
        &admin,
        &a,
        "echo changed > keep.txt && rm -r lib && echo mine > new.txt && mkdir more && \
         echo x > more/x && mv new.txt renamed.txt && ls",
    );
    assert_eq!((code, out.as_str()), (0, "keep.txt\nmore\nrenamed.txt\n"));
    assert_eq!(
        sh(&admin, &b, "cat keep.txt lib/a.txt; ls").1,
        "original\nlib\nkeep.txt\nlib\n"
    );
    let c = sandbox(&admin, json!({"template": "base"}));
    assert_eq!(
        sh(&admin, &c, "cat keep.txt; ls").1,
        "original\nkeep.txt\nlib\n"
    );
    // Nor does the template's layer on disk.
    let [layer] = &layers(&app)[..] else {
        panic!("{:?}", layers(&app))
    };
    assert_eq!(
        std::fs::read_to_string(layer.join("keep.txt")).unwrap(),
        "original\n"
    );
    assert!(!layer.join("renamed.txt").exists() && layer.join("lib/a.txt").exists());
}

#[test]
fn a_failing_setup_fails_the_build_with_its_output_and_no_sandbox_starts() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    create_template(
        &admin,
        json!({"id": "broken", "setup": ["echo step one", "echo oops >&2; exit 3", "echo never"]}),
    );
    let t = wait_built(&admin, "broken");
    assert_eq!(t["status"], "failed", "{t}");
    let log = t["build"]["log"].as_str().unwrap();
    assert!(log.contains("$ echo step one\nstep one\n"), "{log}");
    assert!(
        log.contains("oops") && !log.contains("$ echo never"),
        "{log}"
    );
    let error = t["build"]["error"].as_str().unwrap();
    assert!(error.contains("exited with 3"), "{error}");
    let r = admin.post_json("/v1/sandboxes", &json!({"template": "broken"}));
    let body = assert_error(&r, 409, "CONFLICT");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("failed"),
        "{body}"
    );
    assert!(layers(&app).is_empty());

    // Fixed by a change of its setup, which rebuilds.
    let r = call(
        &admin,
        Method::PATCH,
        "/v1/templates/broken",
        Some(json!({"setup": ["echo fixed > f"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "building");
    assert_eq!(wait_built(&admin, "broken")["status"], "ready");
    let s = sandbox(&admin, json!({"template": "broken"}));
    assert_eq!(sh(&admin, &s, "cat f").1, "fixed\n");
}

#[test]
fn a_template_still_building_refuses_sandboxes_and_can_be_deleted() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    create_template(
        &admin,
        json!({"id": "slow", "setup": ["echo started; sleep 67"]}),
    );
    let r = admin.post_json("/v1/sandboxes", &json!({"template": "slow"}));
    let body = assert_error(&r, 409, "CONFLICT");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("building")
    );
    // The log shows the build's progress.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = call(&admin, Method::GET, "/v1/templates/slow", None).json();
        assert_eq!(t["status"], "building");
        if t["build"]["log"].as_str().unwrap().contains("started\n") {
            break;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Deleting it abandons the build (its sandbox and `sleep` are killed).
    let sleeping = || {
        crate::common::processes_named("sleep 67") + crate::common::processes_named("sleep\u{0}67")
    };
    assert!(sleeping() > 0, "the build's sleep runs");
    assert_eq!(
        call(&admin, Method::DELETE, "/v1/templates/slow", None).status,
        204
    );
    assert_error(
        &call(&admin, Method::GET, "/v1/templates/slow", None),
        404,
        "NOT_FOUND",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping() > 0 {
        assert!(Instant::now() < deadline, "the build's sleep still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(layers(&app).is_empty());
}

#[test]
fn a_rebuild_changes_new_sandboxes_while_running_ones_keep_their_files() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    create_template(&admin, json!({"id": "ver", "setup": ["echo v1 > version"]}));
    let first_build = wait_built(&admin, "ver")["build"]["id"].clone();
    let old = sandbox(&admin, json!({"template": "ver"}));
    assert_eq!(sh(&admin, &old, "cat version").1, "v1\n");

    // A change of setup rebuilds; the running sandbox keeps v1 throughout.
    let r = call(
        &admin,
        Method::PATCH,
        "/v1/templates/ver",
        Some(json!({"setup": ["echo v2 > version"], "description": "second"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let t = wait_built(&admin, "ver");
    assert_eq!(
        (&t["status"], &t["description"]),
        (&json!("ready"), &json!("second"))
    );
    assert_ne!(t["build"]["id"], first_build);
    assert_eq!(
        sh(
            &admin,
            &old,
            "cat version; echo more >> version; cat version"
        )
        .1,
        "v1\nv1\nmore\n"
    );
    let new = sandbox(&admin, json!({"template": "ver"}));
    assert_eq!(sh(&admin, &new, "cat version").1, "v2\n");
    // Both layers are on disk while the old sandbox runs; the old one goes with it.
    assert_eq!(layers(&app).len(), 2);
    assert_eq!(
        call(
            &admin,
            Method::DELETE,
            &format!("/v1/sandboxes/{old}"),
            None
        )
        .status,
        204
    );
    wait_layers(&app, 1);

    // A change of anything else does not rebuild.
    let r = call(
        &admin,
        Method::PATCH,
        "/v1/templates/ver",
        Some(json!({"memoryMb": 300, "env": {"A": "1"}})),
    );
    assert_eq!(r.json()["status"], "ready", "{}", r.text());
    assert_eq!(r.json()["memoryMb"], 300);
    let r = call(
        &admin,
        Method::PATCH,
        "/v1/templates/ver",
        Some(json!({"memoryMb": null})),
    );
    assert!(r.json()["memoryMb"].is_null(), "{}", r.text());

    // An explicit rebuild makes a new build of the same setup.
    let r = call(&admin, Method::POST, "/v1/templates/ver", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "building");
    let t = wait_built(&admin, "ver");
    assert_eq!(t["status"], "ready");
    assert_eq!(sh(&admin, &new, "cat version").1, "v2\n");
    assert_eq!(
        call(
            &admin,
            Method::DELETE,
            &format!("/v1/sandboxes/{new}"),
            None
        )
        .status,
        204
    );
    wait_layers(&app, 1);
}

#[test]
fn a_deleted_template_leaves_its_running_sandboxes_working() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    create_template(&admin, json!({"id": "gone", "setup": ["echo here > f"]}));
    wait_built(&admin, "gone");
    let s = sandbox(&admin, json!({"template": "gone"}));
    assert_eq!(
        call(&admin, Method::DELETE, "/v1/templates/gone", None).status,
        204
    );
    assert_error(
        &call(&admin, Method::GET, "/v1/templates/gone", None),
        404,
        "NOT_FOUND",
    );
    let r = admin.post_json("/v1/sandboxes", &json!({"template": "gone"}));
    assert_eq!(
        assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
        "template"
    );
    assert_eq!(sh(&admin, &s, "cat f; echo w > g; cat g").1, "here\nw\n");
    assert_eq!(layers(&app).len(), 1);
    assert_eq!(
        call(&admin, Method::DELETE, &format!("/v1/sandboxes/{s}"), None).status,
        204
    );
    wait_layers(&app, 0);
    // The id is free again.
    create_template(&admin, json!({"id": "gone"}));
    assert_eq!(wait_built(&admin, "gone")["status"], "ready");
}

#[test]
fn default_always_exists_and_cannot_be_changed() {
    let app = TestApp::start();
    let admin = app.admin();
    let list = call(&admin, Method::GET, "/v1/templates", None).json();
    assert_eq!(list["data"][0]["id"], "default");
    assert_eq!(list["data"][0]["builtin"], true);
    let t = call(&admin, Method::GET, "/v1/templates/default", None).json();
    assert_eq!(
        (&t["status"], &t["builtin"]),
        (&json!("ready"), &json!(true))
    );
    for (method, body) in [
        (Method::PATCH, Some(json!({"setup": ["true"]}))),
        (Method::DELETE, None),
        (Method::POST, None),
    ] {
        let r = call(&admin, method, "/v1/templates/default", body);
        assert_error(&r, 409, "CONFLICT");
    }
    assert_error(
        &admin.post_json("/v1/templates", &json!({"id": "default"})),
        409,
        "CONFLICT",
    );
    // Every tenant has it.
    let (other, _) = app.create_key(json!({"name": "b", "tenant": "beta", "profile": "admin"}));
    let list = call(&app.client(&other), Method::GET, "/v1/templates", None).json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], "default");
}

#[test]
fn invalid_templates_are_refused_naming_the_field() {
    let app = TestApp::start();
    let admin = app.admin();
    for (body, field) in [
        (json!({"id": "Bad Id"}), "id"),
        (json!({}), "id"),
        (json!({"id": "x", "files": {"/etc/passwd": "x"}}), "files"),
        (
            json!({"id": "x", "files": {"/workspace/../etc/x": "x"}}),
            "files",
        ),
        (json!({"id": "x", "files": {"/workspace/": "x"}}), "files"),
        (json!({"id": "x", "setup": ["  "]}), "setup"),
        (json!({"id": "x", "setup": "echo"}), "setup"),
        (json!({"id": "x", "env": {"1X": "v"}}), "env"),
        (json!({"id": "x", "memoryMb": 1}), "memoryMb"),
        (json!({"id": "x", "cpus": 100}), "cpus"),
        (json!({"id": "x", "timeoutSec": 0}), "timeoutSec"),
        (json!({"id": "x", "network": "bridge"}), "network"),
        (json!({"id": "x", "image": "ubuntu"}), "image"),
    ] {
        let r = admin.post_json("/v1/templates", &body);
        let e = assert_error(&r, 400, "INVALID_REQUEST");
        assert_eq!(e["error"]["field"], field, "{body}: {e}");
    }
    create_template(&admin, json!({"id": "dup"}));
    assert_error(
        &admin.post_json("/v1/templates", &json!({"id": "dup"})),
        409,
        "CONFLICT",
    );
    let r = call(
        &admin,
        Method::PATCH,
        "/v1/templates/dup",
        Some(json!({"files": {"/tmp/x": ""}})),
    );
    assert_eq!(
        assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
        "files"
    );
    let r = admin.post_json("/v1/sandboxes", &json!({"template": "nope"}));
    assert_eq!(
        assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
        "template"
    );
}

#[test]
fn another_tenant_or_env_gets_not_found_everywhere() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    create_template(&admin, json!({"id": "mine", "setup": ["echo secret > s"]}));
    wait_built(&admin, "mine");
    let (other_tenant, _) =
        app.create_key(json!({"name": "b", "tenant": "beta", "profile": "admin"}));
    let (other_env, _) = app.create_key(json!({"name": "t", "env": "test", "profile": "admin"}));
    for key in [&other_tenant, &other_env] {
        let c = app.client(key);
        for (method, body) in [
            (Method::GET, None),
            (Method::POST, None),
            (Method::PATCH, Some(json!({"description": "x"}))),
            (Method::DELETE, None),
        ] {
            let r = call(&c, method.clone(), "/v1/templates/mine", body);
            assert_error(&r, 404, "NOT_FOUND");
        }
        let list = call(&c, Method::GET, "/v1/templates", None).json();
        assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
        let r = c.post_json("/v1/sandboxes", &json!({"template": "mine"}));
        assert_eq!(
            assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
            "template"
        );
    }
    // The same id elsewhere is another template.
    let beta = app.client(&other_tenant);
    create_template(&beta, json!({"id": "mine", "setup": ["echo beta > s"]}));
    assert_eq!(wait_built(&beta, "mine")["status"], "ready");
    let s = sandbox(&beta, json!({"template": "mine"}));
    assert_eq!(sh(&beta, &s, "cat s").1, "beta\n");
    let s = sandbox(&admin, json!({"template": "mine"}));
    assert_eq!(sh(&admin, &s, "cat s").1, "secret\n");
}

#[test]
fn template_routes_need_their_scopes() {
    let app = TestApp::start();
    let reader = app.client(&app.key_with(&["template:read"]));
    assert_eq!(
        call(&reader, Method::GET, "/v1/templates", None).status,
        200
    );
    assert_eq!(
        call(&reader, Method::GET, "/v1/templates/default", None).status,
        200
    );
    for (method, path, body) in [
        (Method::POST, "/v1/templates", Some(json!({"id": "x"}))),
        (Method::POST, "/v1/templates/x", None),
        (Method::PATCH, "/v1/templates/x", Some(json!({}))),
        (Method::DELETE, "/v1/templates/x", None),
    ] {
        let r = call(&reader, method, path, body);
        let e = assert_error(&r, 403, "FORBIDDEN");
        assert_eq!(e["error"]["requiredScope"], "template:write");
    }
    let user = app.client(
        &app.create_key(json!({"name": "u", "profile": "sandbox-user"}))
            .0,
    );
    let e = assert_error(
        &call(&user, Method::GET, "/v1/templates", None),
        403,
        "FORBIDDEN",
    );
    assert_eq!(e["error"]["requiredScope"], "template:read");
    // Nothing was created.
    let list = call(&app.admin(), Method::GET, "/v1/templates", None).json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

/// Every regular file under `dir`, never following a link.
fn regular_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            regular_files(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

#[test]
fn a_hostile_setup_gives_no_sandbox_and_no_capture_a_host_file() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let data = app.data_dir().display().to_string();
    let setup = [
        "ln -s /etc/shadow shadow && ln -s /root root && ln -s /etc/passwd passwd".to_owned(),
        format!("ln -s {data} data && ln -s {data}/sandgate.db db"),
        "ln -s ../../../../../../etc/passwd rel && ln -s rel chain1 && ln -s chain1 chain2".into(),
        "mkdir -p deep/er && ln -s ../../.. deep/er/up && ln -s /proc/1/root procroot".into(),
        "ln /etc/passwd hard 2> hard.err || echo 'no hard link' >> refused".into(),
        "mknod dev c 1 3 2> dev.err || echo 'no device' >> refused".into(),
        "mkfifo fifo && python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'"
            .into(),
        // Still running at capture time: flips `race` between a link and a file.
        "(while :; do ln -sf /etc/shadow race; rm -f race; echo x > race; rm -f race; done) \
         > /dev/null 2>&1 & sleep 0.3"
            .into(),
    ];
    create_template(&admin, json!({"id": "evil", "setup": setup}));
    let t = wait_built(&admin, "evil");
    assert_eq!(t["status"], "ready", "{t}");
    let log = t["build"]["log"].as_str().unwrap();
    assert!(log.contains("not kept: FIFO /workspace/fifo"), "{log}");
    assert!(log.contains("not kept: socket /workspace/sock"), "{log}");

    // The capture copied links as links and followed none: no file in any layer
    // holds a host file's contents.
    let [layer] = &layers(&app)[..] else { panic!() };
    for link in [
        "shadow", "root", "passwd", "data", "db", "rel", "chain2", "procroot",
    ] {
        let m = std::fs::symlink_metadata(layer.join(link)).unwrap();
        assert!(m.file_type().is_symlink(), "{link}");
    }
    let host_passwd = std::fs::read("/etc/passwd").unwrap();
    let host_shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    let mut files = Vec::new();
    regular_files(&app.data_dir().join("templates"), &mut files);
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            bytes != host_passwd && bytes != host_shadow,
            "{}",
            f.display()
        );
    }
    assert!(!layer.join("fifo").exists() && !layer.join("sock").exists());
    match std::fs::symlink_metadata(layer.join("race")) {
        Ok(m) if m.file_type().is_symlink() => {}
        Ok(_) => assert_eq!(std::fs::read(layer.join("race")).unwrap(), b"x\n"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
    assert!(!layer.join("hard").exists() && !layer.join("dev").exists());

    // Inside a sandbox from it, every link resolves in the sandbox's own root.
    let s = sandbox(&admin, json!({"template": "evil"}));
    let (_, out) = sh(
        &admin,
        &s,
        "cat refused; cat shadow root/* data/* db 2>&1 | grep -c 'No such file'",
    );
    assert_eq!(out, "no hard link\nno device\n4\n", "{out}");
    let (_, out) = sh(&admin, &s, "cat passwd rel chain2 deep/er/up/etc/passwd");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("sandbox:x:65534"))
            .count(),
        4,
        "{out}"
    );
    assert!(!out.contains("daemon:"), "the host's passwd: {out}");
    let (code, out) = sh(&admin, &s, "ls procroot/ 2>&1");
    assert_ne!(code, 0, "{out}");
    // The files API resolves them inside too.
    for path in [
        "/workspace/shadow",
        "/workspace/data/sandgate.db",
        "/workspace/db",
    ] {
        let r = call(
            &admin,
            Method::GET,
            &format!("/v1/sandboxes/{s}/files?path={path}"),
            None,
        );
        assert_eq!(r.status, 404, "{path}: {}", r.text());
    }
    let r = call(
        &admin,
        Method::GET,
        &format!("/v1/sandboxes/{s}/files?path=/workspace/chain2"),
        None,
    );
    assert!(r.text().contains("sandbox:x:65534") && !r.text().contains("daemon:"));
}

#[test]
fn a_build_past_the_size_cap_fails_and_leaves_nothing_on_disk() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start_with(|c| c.template_limits.max_layer_bytes = 8 << 20);
    let admin = app.admin();
    // Dense: /workspace is only as large as the cap.
    create_template(
        &admin,
        json!({"id": "dense", "setup": ["for i in 1 2 3; do head -c 4000000 /dev/zero > big$i; done"]}),
    );
    // Sparse: little space used, but more than the cap would be copied.
    create_template(
        &admin,
        json!({"id": "sparse", "setup": ["truncate -s 6M a && truncate -s 6M b && ls -s"]}),
    );
    let t = wait_built(&admin, "dense");
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["build"]["log"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{t}"
    );
    let t = wait_built(&admin, "sparse");
    assert_eq!(t["status"], "failed", "{t}");
    let error = t["build"]["error"].as_str().unwrap();
    assert!(error.contains("cap of 8388608 bytes"), "{error}");
    assert!(layers(&app).is_empty());
    let tmp = app.data_dir().join("templates/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}

#[test]
fn e2b_creates_start_from_a_template_named_by_its_id() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    create_template(
        &admin,
        json!({"id": "data", "setup": ["echo from-template > t"]}),
    );
    assert_eq!(wait_built(&admin, "data")["status"], "ready");
    let e2b = |template: &str| {
        let body = serde_json::to_vec(&json!({"templateID": template, "timeout": 60})).unwrap();
        admin
            .raw(
                Method::POST,
                "/sandboxes",
                &[
                    ("content-type", "application/json"),
                    ("x-api-key", app.admin_key.as_str()),
                ],
                Some(&body),
            )
            .unwrap()
    };
    let r = e2b("data");
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    assert_eq!(created["templateID"], "data");
    let id = created["sandboxID"].as_str().unwrap();
    assert_eq!(sh(&admin, id, "cat t").1, "from-template\n");
    assert_eq!(e2b("nope").status, 400);
}
