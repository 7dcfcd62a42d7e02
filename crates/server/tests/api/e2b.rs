//! The official E2B SDKs (`e2b`, `e2b-code-interpreter`, pinned in
//! `tests/e2b/requirements.txt`) driven against a real sandgate: each test
//! runs one pytest file of `tests/e2b/` with the SDK's three environment
//! variables pointing at a server started here, and a sandgate key.
//!
//! The SDKs live in a virtualenv that `.ci/run` makes (`target/e2b-venv`, or
//! the Python named by `SANDGATE_E2B_PYTHON`); without it these tests say they
//! were skipped.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::json;

use crate::common::{TestApp, jail_available};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python that has the pinned SDKs and pytest, if there is one.
fn sdk_python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let python = std::env::var_os("SANDGATE_E2B_PYTHON")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace().join("target/e2b-venv/bin/python"));
            let ok = Command::new(&python)
                .args(["-c", "import e2b, e2b_code_interpreter, pytest"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                eprintln!(
                    "skipped: the E2B SDKs are not installed at {} (.ci/run installs them; or set SANDGATE_E2B_PYTHON)",
                    python.display()
                );
            }
            ok.then_some(python)
        })
        .clone()
}

/// Runs `tests/e2b/<file>` with pytest against `app`, the SDK configured with
/// `key`; `extra` adds environment variables. Fails with pytest's output.
fn pytest(app: &TestApp, file: &str, key: &str, extra: &[(&str, String)]) {
    let Some(python) = sdk_python() else { return };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2b");
    let mut cmd = Command::new(python);
    cmd.current_dir(&dir)
        .args(["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", file])
        .env("E2B_API_URL", &app.url)
        .env("E2B_SANDBOX_URL", &app.url)
        .env("E2B_API_KEY", key)
        .env("SANDGATE_URL", &app.url)
        .env("SANDGATE_ADMIN_KEY", &app.admin_key)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run pytest");
    assert!(
        out.status.success(),
        "{file} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server for the SDK, and a key of the `sandbox-user` profile.
fn app() -> Option<(TestApp, String)> {
    if !jail_available() || sdk_python().is_none() {
        return None;
    }
    let app = TestApp::start();
    let (key, _) = app.create_key(json!({"name": "e2b", "profile": "sandbox-user"}));
    Some((app, key))
}

#[test]
fn sdk_commands() {
    let Some((app, key)) = app() else { return };
    pytest(&app, "test_commands.py", &key, &[]);
}

#[test]
fn envd_wire_protocol() {
    let Some((app, key)) = app() else { return };
    pytest(&app, "test_protocol.py", &key, &[]);
}

#[test]
fn sdk_sandbox_lifecycle() {
    let Some((app, key)) = app() else { return };
    pytest(&app, "test_lifecycle.py", &key, &[]);
}

#[test]
fn sdk_files() {
    if !jail_available() || sdk_python().is_none() {
        return;
    }
    // Room for the 20 MB round trip, and a disk small enough to fill.
    let limit = 32 << 20;
    let app = TestApp::start_with(|c| {
        c.max_body_bytes = limit;
        c.sandbox_limits.tmpfs_bytes = 64 << 20;
    });
    let (key, _) = app.create_key(json!({"name": "e2b", "profile": "sandbox-user"}));
    let (no_files, _) = app.create_key(json!({
        "name": "no-files",
        "scopes": ["sandbox:create", "sandbox:read", "sandbox:delete", "sandbox:execute"]
    }));
    let data_dir = app.data_dir().display().to_string();
    pytest(
        &app,
        "test_files.py",
        &key,
        &[
            ("SANDGATE_MAX_BODY_BYTES", limit.to_string()),
            ("SANDGATE_DATA_DIR", data_dir),
            ("SANDGATE_NO_FILES_KEY", no_files),
        ],
    );
}

#[test]
fn sdk_is_held_to_sandgate_security() {
    let Some((app, key)) = app() else { return };
    let (other_tenant, _) = app.create_key(json!({
        "name": "other", "profile": "sandbox-user", "tenant": "other-co"
    }));
    let (test_env, _) = app.create_key(json!({
        "name": "test-env", "profile": "sandbox-user", "env": "test"
    }));
    let (limited, _) = app.create_key(json!({
        "name": "limited", "profile": "sandbox-user", "executionsLimit": 3
    }));
    let (no_execute, _) = app.create_key(json!({
        "name": "no-execute",
        "scopes": ["sandbox:create", "sandbox:read", "sandbox:delete", "sandbox:files"]
    }));
    let (read_only, _) = app.create_key(json!({"name": "ro", "profile": "read-only"}));
    let (rate_limited, _) = app.create_key(json!({
        "name": "rate-limited", "profile": "sandbox-user",
        "rateLimits": [{"limit": 4, "windowSec": 3600}]
    }));
    pytest(
        &app,
        "test_security.py",
        &key,
        &[
            ("SANDGATE_OTHER_TENANT_KEY", other_tenant),
            ("SANDGATE_TEST_ENV_KEY", test_env),
            ("SANDGATE_LIMITED_KEY", limited),
            ("SANDGATE_NO_EXECUTE_KEY", no_execute),
            ("SANDGATE_READ_ONLY_KEY", read_only),
            ("SANDGATE_RATE_LIMITED_KEY", rate_limited),
        ],
    );
}

#[test]
fn sdk_code_interpreter() {
    let Some((app, key)) = app() else { return };
    let (limited, _) = app.create_key(json!({
        "name": "limited", "profile": "sandbox-user", "executionsLimit": 3
    }));
    let (no_execute, _) = app.create_key(json!({
        "name": "no-execute",
        "scopes": ["sandbox:create", "sandbox:read", "sandbox:delete", "sandbox:files"]
    }));
    let data_dir = app.data_dir().display().to_string();
    pytest(
        &app,
        "test_code_interpreter.py",
        &key,
        &[
            ("SANDGATE_LIMITED_KEY", limited),
            ("SANDGATE_NO_EXECUTE_KEY", no_execute),
            ("SANDGATE_DATA_DIR", data_dir),
        ],
    );
}
