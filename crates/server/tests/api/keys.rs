//! The key lifecycle through `/v1/keys` and `/v1/auth/whoami`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{TestApp, assert_error};

fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_created_key_is_shown_once_and_works() {
    let app = TestApp::start();
    let (key, created) = app.create_key(json!({
        "name": "ci-worker",
        "description": "runs CI",
        "metadata": {"team": "infra"},
        "rateLimits": [{"limit": 60, "windowSec": 60}],
        "executionsLimit": 1000,
        "allowedIps": ["127.0.0.1", "10.0.0.0/8"]
    }));
    assert!(key.starts_with("sg_live_") && key.len() == 46, "{key}");
    assert_eq!(created["prefix"], &key[..12]);
    assert!(created["id"].as_str().unwrap().starts_with("key_"));
    assert_eq!(created["tenant"], "default");
    assert_eq!(created["env"], "live");
    assert_eq!(created["isActive"], true);
    assert_eq!(created["executionsLimit"], 1000);
    assert_eq!(created["executionsRemaining"], 1000);
    assert_eq!(created["allowedIps"], json!(["127.0.0.1/32", "10.0.0.0/8"]));
    assert_eq!(created["metadata"], json!({"team": "infra"}));
    assert_eq!(created["requestCount"], 0);
    assert_eq!(created["lastUsedAt"], Value::Null);
    // Default scopes: the sandbox-user profile.
    assert_eq!(
        created["scopes"],
        json!([
            "sandbox:create",
            "sandbox:read",
            "sandbox:delete",
            "sandbox:pause",
            "sandbox:execute",
            "sandbox:files",
            "sandbox:ports"
        ])
    );
    let id = created["id"].as_str().unwrap();
    let fetched = app.admin().get_key(id).unwrap();
    assert!(
        fetched.get("key").is_none(),
        "the plaintext is shown only once"
    );
    let listed = app.admin().list_keys().unwrap();
    let text = listed.to_string();
    assert!(!text.contains(&key) && !text.contains("hash"), "{text}");
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id)
    );

    let who = app.client(&key).whoami().unwrap();
    assert_eq!(who["keyId"], id);
    assert_eq!(who["name"], "ci-worker");
    assert_eq!(who["prefix"], &key[..12]);
    assert_eq!(who["executionsRemaining"], 1000);
    assert_eq!(who["rateLimits"], json!([{"limit": 60, "windowSec": 60}]));
}

#[test]
fn profiles_and_test_keys() {
    let app = TestApp::start();
    let (_, ro) = app.create_key(json!({"name": "ro", "profile": "read-only"}));
    assert_eq!(ro["scopes"], json!(["sandbox:read", "billing:read"]));
    let (key, test) = app.create_key(json!({"name": "t", "env": "test", "profile": "admin"}));
    assert!(key.starts_with("sg_test_"));
    assert_eq!(test["env"], "test");
    assert_eq!(app.client(&key).whoami().unwrap()["env"], "test");
}

#[test]
fn use_is_counted_off_the_hot_path() {
    let app = TestApp::start();
    let (key, created) = app.create_key(json!({"name": "counted"}));
    let id = created["id"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        app.client(&key).whoami().unwrap();
    }
    poll_until("lastUsedAt and requestCount", || {
        let k = app.admin().get_key(&id).unwrap();
        k["requestCount"] == 3 && k["lastUsedAt"].is_string()
    });
}

#[test]
fn patch_changes_only_what_is_given() {
    let app = TestApp::start();
    let (key, created) =
        app.create_key(json!({"name": "p", "executionsLimit": 10, "metadata": {"a": "1"}}));
    let id = created["id"].as_str().unwrap();
    let c = app.admin();
    let k = c
        .update_key(id, &json!({"name": "renamed", "scopes": ["sandbox:read"], "rateLimits": [{"limit": 5, "windowSec": 1}]}))
        .unwrap();
    assert_eq!(k["name"], "renamed");
    assert_eq!(k["scopes"], json!(["sandbox:read"]));
    assert_eq!(k["metadata"], json!({"a": "1"}));
    assert_eq!(k["executionsLimit"], 10);
    // The change is effective on the very next request.
    let who = app.client(&key).whoami().unwrap();
    assert_eq!(who["scopes"], json!(["sandbox:read"]));
    assert_eq!(who["name"], "renamed");

    let k = c.update_key(id, &json!({"executionsLimit": 20})).unwrap();
    assert_eq!(k["executionsLimit"], 20);
    assert_eq!(k["executionsRemaining"], 20);
    let k = c
        .update_key(id, &json!({"executionsLimit": null, "description": "d"}))
        .unwrap();
    assert_eq!(k["executionsLimit"], Value::Null);
    assert_eq!(k["description"], "d");
    let k = c
        .update_key(id, &json!({"expiresAt": "2999-01-01T00:00:00Z"}))
        .unwrap();
    assert_eq!(k["expiresAt"], "2999-01-01T00:00:00.000Z");
    let k = c.update_key(id, &json!({"expiresAt": null})).unwrap();
    assert_eq!(k["expiresAt"], Value::Null);
    let err = c.update_key(id, &json!({"scopes": []})).unwrap_err();
    assert_eq!(err.code(), Some("INVALID_REQUEST"));
}

#[test]
fn reset_executions_sets_the_counter() {
    let app = TestApp::start();
    let (_, created) = app.create_key(json!({"name": "q", "executionsLimit": 100}));
    let id = created["id"].as_str().unwrap();
    let k = app.admin().reset_executions(id, Some(7)).unwrap();
    assert_eq!(k["executionsRemaining"], 7);
    let k = app.admin().reset_executions(id, None).unwrap();
    assert_eq!(k["executionsRemaining"], 100);
    // billing:manage is the scope, not keys:manage.
    let keys_only = app.key_with(&["keys:*"]);
    let err = app
        .client(&keys_only)
        .reset_executions(id, None)
        .unwrap_err();
    assert_eq!(err.code(), Some("FORBIDDEN"));
    let billing = app.key_with(&["billing:manage"]);
    assert!(app.client(&billing).reset_executions(id, Some(1)).is_ok());
}

#[test]
fn revocation_is_immediate_and_idempotent() {
    let app = TestApp::start();
    let (key, created) = app.create_key(json!({"name": "r"}));
    let id = created["id"].as_str().unwrap();
    app.client(&key).whoami().unwrap();
    app.admin().revoke_key(id).unwrap();
    assert_error(&app.get(Some(&key), "/v1/auth/whoami"), 401, "KEY_EXPIRED");
    app.admin().revoke_key(id).unwrap();
    let k = app.admin().get_key(id).unwrap();
    assert_eq!(k["isActive"], false);
    assert!(k["revokedAt"].is_string());
}

#[test]
fn rotation_keeps_the_old_key_for_the_grace_period_only() {
    let app = TestApp::start();
    let (old_key, created) = app.create_key(json!({
        "name": "rotating", "profile": "read-only", "executionsLimit": 50, "metadata": {"k": "v"}
    }));
    let old_id = created["id"].as_str().unwrap();
    let rotated = app.admin().rotate_key(old_id, Some(2)).unwrap();
    let new_key = rotated["key"].as_str().unwrap();
    assert_ne!(new_key, old_key);
    assert_ne!(rotated["id"], old_id);
    assert_eq!(rotated["rotatedFrom"], old_id);
    for field in [
        "name",
        "scopes",
        "tenant",
        "env",
        "metadata",
        "executionsLimit",
    ] {
        assert_eq!(rotated[field], created[field], "{field}");
    }
    // During the grace period both keys work.
    assert_eq!(
        app.client(new_key).whoami().unwrap()["keyId"],
        rotated["id"]
    );
    assert_eq!(app.client(&old_key).whoami().unwrap()["keyId"], old_id);
    std::thread::sleep(Duration::from_millis(2200));
    assert_error(
        &app.get(Some(&old_key), "/v1/auth/whoami"),
        401,
        "KEY_EXPIRED",
    );
    assert_eq!(
        app.get(Some(new_key), "/v1/auth/whoami").status.as_u16(),
        200
    );
}

#[test]
fn rotation_never_extends_the_old_keys_expiry() {
    let app = TestApp::start();
    let (_, created) = app.create_key(json!({"name": "brief", "expiresInSec": 60}));
    let id = created["id"].as_str().unwrap();
    app.admin().rotate_key(id, Some(7 * 86_400)).unwrap();
    let old = app.admin().get_key(id).unwrap();
    assert_eq!(old["expiresAt"], created["expiresAt"]);
    // Default grace: 7 days.
    let (_, forever) = app.create_key(json!({"name": "forever"}));
    let fid = forever["id"].as_str().unwrap();
    app.admin().rotate_key(fid, None).unwrap();
    let old = app.admin().get_key(fid).unwrap();
    assert!(old["expiresAt"].is_string());
    assert_eq!(old["isActive"], true);
}

#[test]
fn rotation_with_zero_grace_ends_the_old_key_now() {
    let app = TestApp::start();
    let (old_key, created) = app.create_key(json!({"name": "leaked"}));
    app.admin()
        .rotate_key(created["id"].as_str().unwrap(), Some(0))
        .unwrap();
    assert_error(
        &app.get(Some(&old_key), "/v1/auth/whoami"),
        401,
        "KEY_EXPIRED",
    );
}

#[test]
fn no_key_can_grant_more_than_it_holds() {
    let app = TestApp::start();
    let (manager, manager_obj) =
        app.create_key(json!({"name": "mgr", "scopes": ["keys:*", "sandbox:read"]}));
    let m = app.client(&manager);
    let forbidden = |r: Result<Value, sandgate_client::ClientError>, scope: &str| {
        let err = r.unwrap_err();
        assert_eq!(err.code(), Some("FORBIDDEN"), "{err}");
        if let sandgate_client::ClientError::Api { body, .. } = err {
            assert_eq!(body["error"]["requiredScope"], scope);
        }
    };
    forbidden(
        m.create_key(&json!({"name": "x", "scopes": ["*"]})),
        "sandbox:create",
    );
    forbidden(
        m.create_key(&json!({"name": "x", "profile": "admin"})),
        "sandbox:create",
    );
    forbidden(
        m.create_key(&json!({"name": "x", "scopes": ["sandbox:read"], "tenant": "other"})),
        "tenants:manage",
    );
    forbidden(
        m.create_key(&json!({"name": "x", "scopes": ["sandbox:read"], "env": "test"})),
        "tenants:manage",
    );
    // Within its power it may.
    let ok = m
        .create_key(&json!({"name": "sub", "scopes": ["sandbox:read"]}))
        .unwrap();
    let sub_id = ok["id"].as_str().unwrap();
    // Widening an existing key, or its own, is refused.
    forbidden(
        m.update_key(sub_id, &json!({"scopes": ["sandbox:execute"]})),
        "sandbox:execute",
    );
    let own_id = manager_obj["id"].as_str().unwrap();
    forbidden(
        m.update_key(own_id, &json!({"scopes": ["*"]})),
        "sandbox:create",
    );
    // A stronger key cannot be rotated (that would hand out its power) or revoked.
    let (_, strong) = app.create_key(json!({"name": "strong", "scopes": ["sandbox:*"]}));
    let strong_id = strong["id"].as_str().unwrap();
    assert_eq!(
        m.rotate_key(strong_id, None).unwrap_err().code(),
        Some("FORBIDDEN")
    );
    assert_eq!(
        m.revoke_key(strong_id).unwrap_err().code(),
        Some("FORBIDDEN")
    );
    assert_eq!(app.admin().get_key(strong_id).unwrap()["isActive"], true);
}

#[test]
fn a_key_never_outlives_the_key_that_made_it() {
    let app = TestApp::start();
    let (manager, mgr) =
        app.create_key(json!({"name": "temp-mgr", "scopes": ["keys:*"], "expiresInSec": 3600}));
    let m = app.client(&manager);
    let sub = m
        .create_key(&json!({"name": "sub", "scopes": ["keys:read"]}))
        .unwrap();
    assert_eq!(sub["expiresAt"], mgr["expiresAt"]);
    let err = m
        .create_key(&json!({"name": "sub", "scopes": ["keys:read"], "expiresInSec": 7200}))
        .unwrap_err();
    assert_eq!(err.code(), Some("FORBIDDEN"));
}

#[test]
fn the_keys_audit_lists_expiring_keys_and_unusual_denials() {
    let app = TestApp::start();
    let (_, expiring) = app.create_key(json!({"name": "soon", "expiresInSec": 3 * 86_400}));
    let (_, later) = app.create_key(json!({"name": "later", "expiresInSec": 30 * 86_400}));
    let (noisy, noisy_view) = app.create_key(json!({"name": "noisy", "scopes": ["keys:read"]}));
    let client = app.client(&noisy);
    for _ in 0..25 {
        // keys:manage is missing: each attempt is denied and counted against the key.
        let r = client
            .raw(
                sandgate_client::Method::POST,
                "/v1/keys",
                &[],
                Some(br#"{"name":"x"}"#),
            )
            .unwrap();
        assert_eq!(r.status, 403);
    }
    let review = app.admin().review_keys().unwrap();
    let ids = |list: &str| -> Vec<String> {
        review[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(ids("expiring").contains(&expiring["id"].as_str().unwrap().to_owned()));
    assert!(!ids("expiring").contains(&later["id"].as_str().unwrap().to_owned()));
    let noisy_id = noisy_view["id"].as_str().unwrap();
    assert_eq!(ids("unusualDenials"), [noisy_id]);
    let entry = &review["unusualDenials"][0];
    assert_eq!(entry["recentDenied"], 25);
    assert!(entry["reason"].as_str().unwrap().contains("25 of"));
    assert!(ids("unused").is_empty(), "every key here is new");
    // The noisy key may read keys, so it may see this view too — of its own tenant.
    assert!(client.review_keys().is_ok());
    let no_read = app.key_with(&["sandbox:execute"]);
    let r = app.get(Some(&no_read), "/v1/keys/audit");
    assert_eq!(
        assert_error(&r, 403, "FORBIDDEN")["error"]["requiredScope"],
        "keys:read"
    );
}
