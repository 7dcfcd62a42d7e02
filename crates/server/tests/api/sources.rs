//! Credential sources beside stored keys: environment keys, and auth mode `none`.
//! (The auth callback has its own module.)

use sandgate_core::keys::format::SecretKey;
use sandgate_server::AuthMode;
use serde_json::json;

use crate::common::{TestApp, assert_error};

#[test]
fn environment_keys_work_beside_stored_keys_and_are_audited_by_fingerprint() {
    let app = TestApp::start_with(|c| {
        c.env_admin_key = Some(SecretKey::new("ci-admin-secret-value".into()));
        c.env_api_keys = vec![
            SecretKey::new("client-one-secret".into()),
            SecretKey::new("client-two-secret".into()),
        ];
    });
    let admin = app.client("ci-admin-secret-value");
    let who = admin.whoami().unwrap();
    assert_eq!(who["keyId"], "env_admin");
    assert_eq!(who["scopes"], json!(["*"]));
    // The env admin can manage stored keys, and stored keys keep working.
    let created = admin
        .create_key(&json!({"name": "from-env-admin"}))
        .unwrap();
    let stored = app.client(created["key"].as_str().unwrap());
    assert_eq!(stored.whoami().unwrap()["name"], "from-env-admin");
    assert!(app.admin().whoami().is_ok());

    let client = app.client("client-two-secret");
    let who = client.whoami().unwrap();
    let id = who["keyId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("env_") && id.len() == 16, "{id}");
    assert!(
        who["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "sandbox:execute")
    );
    let body = assert_error(
        &app.get(Some("client-two-secret"), "/v1/keys"),
        403,
        "FORBIDDEN",
    );
    assert_eq!(body["error"]["requiredScope"], "keys:read");
    assert_error(
        &app.get(Some("client-three-secret"), "/v1/auth/whoami"),
        401,
        "UNAUTHORIZED",
    );

    let audit = app.admin().audit(&[("limit", "1000")]).unwrap();
    let text = audit.to_string();
    assert!(text.contains(&id), "env key audited by fingerprint");
    for secret in [
        "ci-admin-secret-value",
        "client-two-secret",
        "client-three-secret",
    ] {
        assert!(!text.contains(secret), "{secret} reached the audit log");
    }
}

#[test]
fn open_mode_lets_everyone_in_as_default_live_with_every_scope_and_says_so() {
    let app = TestApp::start_with(|c| c.auth_mode = AuthMode::Open);
    let who = app.anonymous().whoami().unwrap();
    assert_eq!(who["tenant"], "default");
    assert_eq!(who["env"], "live");
    assert_eq!(who["scopes"], json!(["*"]));
    // Even a scope-guarded route, and whatever credential is sent.
    let keys = app.get(None, "/v1/keys");
    assert_eq!(keys.status.as_u16(), 200, "{}", keys.text());
    assert_eq!(app.get(Some("not-a-key"), "/v1/audit").status.as_u16(), 200);
    // Routes the policy does not know stay refused.
    assert_error(&app.get(None, "/v1/nope"), 404, "NOT_FOUND");

    let ready = app.get(None, "/readyz");
    assert_eq!(ready.status.as_u16(), 200);
    let warnings = ready.json()["warnings"].clone();
    assert!(
        warnings.as_array().is_some_and(|w| w.iter().any(|m| m
            .as_str()
            .is_some_and(|m| m.contains("authentication is off")))),
        "{warnings}"
    );

    let normal = TestApp::start();
    assert_error(&normal.get(None, "/v1/auth/whoami"), 401, "UNAUTHORIZED");
    assert_eq!(normal.get(None, "/readyz").json(), json!({"status": "ok"}));
}
