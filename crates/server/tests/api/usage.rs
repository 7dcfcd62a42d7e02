//! `GET /v1/usage`: counted per key and day, scoped to the caller's partition.

use sandgate_client::Method;
use serde_json::{Value, json};

use crate::common::{TestApp, assert_error};

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
