//! The audit log: every authentication attempt and every key lifecycle event.

use std::time::{Duration, Instant};

use sandgate_core::keys::format::generate_key;
use sandgate_core::model::Env;
use serde_json::{Value, json};

use crate::common::TestApp;

fn rows(app: &TestApp, key: &str, params: &[(&str, &str)]) -> Vec<Value> {
    let page = app.client(key).audit(params).unwrap();
    page["data"].as_array().unwrap().clone()
}

#[test]
fn every_attempt_is_recorded_without_the_key() {
    let app = TestApp::start();
    let (key, created) = app.create_key(json!({"name": "watched", "scopes": ["sandbox:read"]}));
    let id = created["id"].as_str().unwrap();
    let stranger = generate_key(Env::Live);
    app.get(Some(&key), "/v1/auth/whoami");
    app.get(Some(&key), "/v1/keys"); // denied: no keys:read
    app.get(Some(stranger.expose()), "/v1/keys");
    app.get(None, "/v1/keys");

    let mine = rows(&app, &app.admin_key, &[("keyId", id)]);
    let auth: Vec<&Value> = mine.iter().filter(|r| r["event"] == "auth").collect();
    assert_eq!(auth.len(), 2, "{mine:?}");
    let denied = auth
        .iter()
        .find(|r| r["outcome"] == "denied")
        .expect("a denied row");
    assert_eq!(denied["path"], "/v1/keys");
    assert_eq!(denied["method"], "GET");
    assert_eq!(denied["reason"], "missing_scope");
    assert_eq!(denied["keyPrefix"], &key[..12]);
    assert_eq!(denied["clientIp"], "127.0.0.1");
    assert!(denied["requestId"].as_str().unwrap().starts_with("req_"));
    assert!(denied["time"].is_string());
    let allowed = auth
        .iter()
        .find(|r| r["outcome"] == "allowed")
        .expect("an allowed row");
    assert_eq!(allowed["path"], "/v1/auth/whoami");
    assert!(mine.iter().any(|r| r["event"] == "key.created"));

    let denied_rows = rows(
        &app,
        &app.admin_key,
        &[("outcome", "denied"), ("limit", "1000")],
    );
    assert!(denied_rows.iter().all(|r| r["outcome"] == "denied"));
    let unknown = denied_rows
        .iter()
        .find(|r| r["reason"] == "unknown_key")
        .expect("the unknown key is recorded");
    assert_eq!(unknown["keyPrefix"], &stranger.expose()[..12]);
    assert_eq!(unknown["keyId"], Value::Null);
    assert!(
        denied_rows
            .iter()
            .any(|r| r["reason"] == "missing_credential")
    );

    let everything = app.admin().audit(&[("limit", "1000")]).unwrap().to_string();
    for secret in [key.as_str(), stranger.expose(), app.admin_key.as_str()] {
        assert!(
            !everything.contains(secret),
            "a full key reached the audit log"
        );
        assert!(
            !everything.contains(&secret[12..]),
            "a key body reached the audit log"
        );
    }
}

#[test]
fn lifecycle_events_are_recorded_with_their_actor() {
    let app = TestApp::start();
    let admin_id = app.admin().whoami().unwrap()["keyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, created) = app.create_key(json!({"name": "life", "expiresInSec": 1}));
    let id = created["id"].as_str().unwrap();
    app.admin()
        .update_key(id, &json!({"name": "life2"}))
        .unwrap();
    let rotated = app.admin().rotate_key(id, Some(3600)).unwrap();
    let new_id = rotated["id"].as_str().unwrap();
    app.admin().revoke_key(new_id).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let mut events: Vec<Value> = rows(&app, &app.admin_key, &[("keyId", id)]);
        events.extend(rows(&app, &app.admin_key, &[("keyId", new_id)]));
        if events.iter().any(|r| r["event"] == "key.expired") || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let kinds: Vec<&str> = events.iter().filter_map(|r| r["event"].as_str()).collect();
    for kind in [
        "key.created",
        "key.updated",
        "key.rotated",
        "key.revoked",
        "key.expired",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let updated = events.iter().find(|r| r["event"] == "key.updated").unwrap();
    assert_eq!(updated["actorKeyId"], admin_id.as_str());
    assert_eq!(updated["method"], "PATCH");
    let rotated_row = events.iter().find(|r| r["event"] == "key.rotated").unwrap();
    assert!(rotated_row["reason"].as_str().unwrap().contains(new_id));
    // Filtered by event.
    let only = rows(&app, &app.admin_key, &[("event", "key.revoked")]);
    assert!(!only.is_empty() && only.iter().all(|r| r["event"] == "key.revoked"));
}

#[test]
fn pages_follow_the_cursor_newest_first() {
    let app = TestApp::start();
    for _ in 0..7 {
        app.admin().whoami().unwrap();
    }
    let c = app.admin();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut params = vec![("limit", "3"), ("event", "auth")];
        if let Some(c) = &cursor {
            params.push(("cursor", c.as_str()));
        }
        let page = c.audit(&params).unwrap();
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 3);
        seen.extend(
            data.iter()
                .map(|r| r["requestId"].as_str().unwrap().to_owned()),
        );
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no row twice");
    assert!(seen.len() >= 7);
}

#[test]
fn a_tenant_reads_only_its_own_audit_rows() {
    let app = TestApp::start();
    let (acme, _) =
        app.create_key(json!({"name": "acme-auditor", "tenant": "acme", "scopes": ["audit:read"]}));
    let (globex, _) =
        app.create_key(json!({"name": "globex", "tenant": "globex", "scopes": ["sandbox:read"]}));
    app.get(Some(&globex), "/v1/auth/whoami");
    app.get(Some(&acme), "/v1/auth/whoami");
    let seen = rows(&app, &acme, &[("limit", "1000")]);
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|r| r["tenant"] == "acme"), "{seen:?}");
    let all = rows(&app, &app.admin_key, &[("limit", "1000")]);
    assert!(all.iter().any(|r| r["tenant"] == "globex"));
}
