//! Tenants and envs partition keys: another partition's key is "not found".

use serde_json::json;

use crate::common::{TestApp, assert_error};

#[test]
fn tenants_see_and_touch_only_their_own_keys() {
    let app = TestApp::start();
    let (acme, _) = app.create_key(json!({"name": "acme-admin", "tenant": "acme", "scopes": ["keys:*", "audit:read", "billing:manage"]}));
    let (_, acme_worker) = app
        .create_key(json!({"name": "acme-worker", "tenant": "acme", "scopes": ["sandbox:read"]}));
    let (_, globex_worker) = app.create_key(
        json!({"name": "globex-worker", "tenant": "globex", "scopes": ["sandbox:read"]}),
    );
    let a = app.client(&acme);
    let listed = a.list_keys().unwrap();
    let tenants: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["tenant"].as_str().unwrap())
        .collect();
    assert!(
        tenants.len() >= 2 && tenants.iter().all(|t| *t == "acme"),
        "{tenants:?}"
    );
    assert!(a.get_key(acme_worker["id"].as_str().unwrap()).is_ok());

    let foreign = globex_worker["id"].as_str().unwrap();
    for r in [
        a.get_key(foreign).map(drop),
        a.update_key(foreign, &json!({"name": "mine"})).map(drop),
        a.revoke_key(foreign),
        a.rotate_key(foreign, None).map(drop),
        a.reset_executions(foreign, None).map(drop),
    ] {
        assert_eq!(r.unwrap_err().code(), Some("NOT_FOUND"));
    }
    assert_eq!(app.admin().get_key(foreign).unwrap()["isActive"], true);
    // Keys created by a tenant's key inherit its tenant.
    let sub = a
        .create_key(&json!({"name": "s", "scopes": ["keys:read"]}))
        .unwrap();
    assert_eq!(sub["tenant"], "acme");
    // The operator (tenants:manage) sees every tenant.
    let all = app.admin().list_keys().unwrap();
    let data = all["data"].as_array().unwrap();
    assert!(
        data.iter().any(|k| k["tenant"] == "globex") && data.iter().any(|k| k["tenant"] == "acme")
    );
}

#[test]
fn test_keys_never_see_live_keys() {
    let app = TestApp::start();
    let (test_admin, _) = app.create_key(json!({"name": "t", "env": "test", "scopes": ["keys:*"]}));
    let (_, live) = app.create_key(json!({"name": "live-one", "scopes": ["sandbox:read"]}));
    let t = app.client(&test_admin);
    assert!(
        t.list_keys().unwrap()["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["env"] == "test")
    );
    let r = app.get(
        Some(&test_admin),
        &format!("/v1/keys/{}", live["id"].as_str().unwrap()),
    );
    assert_error(&r, 404, "NOT_FOUND");
    let made = t
        .create_key(&json!({"name": "child", "scopes": ["keys:read"]}))
        .unwrap();
    assert!(made["key"].as_str().unwrap().starts_with("sg_test_"));
}
