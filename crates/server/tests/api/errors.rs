//! Every SPEC §2 error this server can produce today, in the SPEC's shape.

use sandgate_client::Method;
use sandgate_core::keys::format::generate_key;
use sandgate_core::model::Env;
use serde_json::json;

use crate::common::{TestApp, assert_error};

#[test]
fn every_response_has_a_request_id_and_sane_client_ids_are_echoed() {
    let app = TestApp::start();
    let r = app.get(None, "/healthz");
    assert_eq!(r.status.as_u16(), 200);
    assert!(r.header("x-request-id").unwrap().starts_with("req_"));
    let client = app.anonymous();
    let r = client
        .raw(
            Method::GET,
            "/healthz",
            &[("X-Request-Id", "trace-42.a")],
            None,
        )
        .unwrap();
    assert_eq!(r.header("x-request-id"), Some("trace-42.a"));
    let r = client
        .raw(
            Method::GET,
            "/v1/keys",
            &[("X-Request-Id", "bad id with spaces")],
            None,
        )
        .unwrap();
    let body = assert_error(&r, 401, "UNAUTHORIZED");
    assert!(
        body["error"]["requestId"]
            .as_str()
            .unwrap()
            .starts_with("req_")
    );
}

#[test]
fn missing_malformed_and_unknown_credentials_are_unauthorized() {
    let app = TestApp::start();
    assert_error(&app.get(None, "/v1/auth/whoami"), 401, "UNAUTHORIZED");
    assert_error(
        &app.get(Some("not-a-key"), "/v1/auth/whoami"),
        401,
        "UNAUTHORIZED",
    );
    // Right shape, wrong checksum: refused without a lookup.
    let mut bad = app.admin_key.clone();
    bad.replace_range(10..11, if &bad[10..11] == "a" { "b" } else { "a" });
    assert_error(&app.get(Some(&bad), "/v1/auth/whoami"), 401, "UNAUTHORIZED");
    // Valid shape and checksum, never issued.
    let stranger = generate_key(Env::Live);
    assert_error(
        &app.get(Some(stranger.expose()), "/v1/auth/whoami"),
        401,
        "UNAUTHORIZED",
    );
    // The error says nothing about which part failed.
    let a = app.get(Some(&bad), "/v1/keys").json();
    let b = app.get(Some(stranger.expose()), "/v1/keys").json();
    assert_eq!(a["error"]["message"], b["error"]["message"]);
}

#[test]
fn bearer_wins_over_x_api_key() {
    let app = TestApp::start();
    let c = app.anonymous();
    let good = app.admin_key.as_str();
    let bearer_good = format!("Bearer {good}");
    let r = c
        .raw(
            Method::GET,
            "/v1/auth/whoami",
            &[("Authorization", &bearer_good), ("X-API-Key", "junk")],
            None,
        )
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    let r = c
        .raw(
            Method::GET,
            "/v1/auth/whoami",
            &[("authorization", "Bearer junk"), ("x-api-key", good)],
            None,
        )
        .unwrap();
    assert_error(&r, 401, "UNAUTHORIZED");
    let r = c
        .raw(Method::GET, "/v1/auth/whoami", &[("X-API-KEY", good)], None)
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
}

#[test]
fn missing_scope_is_forbidden_and_names_the_scope() {
    let app = TestApp::start();
    let reader = app.key_with(&["sandbox:read"]);
    let body = assert_error(&app.get(Some(&reader), "/v1/keys"), 403, "FORBIDDEN");
    assert_eq!(body["error"]["requiredScope"], "keys:read");
    let r = app
        .client(&reader)
        .raw(Method::POST, "/v1/keys", &[], Some(br#"{"name":"x"}"#))
        .unwrap();
    let body = assert_error(&r, 403, "FORBIDDEN");
    assert_eq!(body["error"]["requiredScope"], "keys:manage");
}

#[test]
fn unknown_routes_methods_and_objects_are_not_found() {
    let app = TestApp::start();
    assert_error(
        &app.get(Some(&app.admin_key), "/v1/nothing"),
        404,
        "NOT_FOUND",
    );
    assert_error(&app.get(None, "/nothing"), 404, "NOT_FOUND");
    let r = app
        .admin()
        .raw(Method::PUT, "/v1/keys", &[], Some(b"{}"))
        .unwrap();
    assert_error(&r, 404, "NOT_FOUND");
    assert_error(
        &app.get(Some(&app.admin_key), "/v1/keys/key_doesnotexist"),
        404,
        "NOT_FOUND",
    );
}

#[test]
fn bad_bodies_are_invalid_requests_naming_the_field() {
    let app = TestApp::start();
    let c = app.admin();
    let post = |body: &str| {
        c.raw(Method::POST, "/v1/keys", &[], Some(body.as_bytes()))
            .unwrap()
    };
    assert_error(&post("{\"name\":"), 400, "INVALID_REQUEST");
    assert_error(&post("[1,2]"), 400, "INVALID_REQUEST");
    let cases = [
        (r#"{}"#, "name"),
        (r#"{"name":""}"#, "name"),
        (r#"{"name":"a","scope":["*"]}"#, "scope"),
        (r#"{"name":"a","scopes":["sandbox:everything"]}"#, "scopes"),
        (r#"{"name":"a","profile":"root"}"#, "profile"),
        (r#"{"name":"a","env":"prod"}"#, "env"),
        (r#"{"name":"a","tenant":"a b"}"#, "tenant"),
        (r#"{"name":"a","expiresAt":"tomorrow"}"#, "expiresAt"),
        (
            r#"{"name":"a","expiresAt":"2001-01-01T00:00:00Z"}"#,
            "expiresAt",
        ),
        (
            r#"{"name":"a","rateLimits":[{"limit":0,"windowSec":60}]}"#,
            "rateLimits",
        ),
        (
            r#"{"name":"a","rateLimits":[{"limit":"x","windowSec":60}]}"#,
            "rateLimits[0].limit",
        ),
        (r#"{"name":"a","allowedIps":["10.0.0.0/40"]}"#, "allowedIps"),
        (r#"{"name":"a","executionsLimit":-1}"#, "executionsLimit"),
    ];
    for (body, field) in cases {
        let error = assert_error(&post(body), 400, "INVALID_REQUEST");
        assert_eq!(error["error"]["field"], field, "{body}");
    }
    let r = c.raw(Method::GET, "/v1/audit?limit=0", &[], None).unwrap();
    assert_eq!(
        assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
        "limit"
    );
}

#[test]
fn bodies_over_the_limit_are_refused() {
    let app = TestApp::start_with(|c| c.max_body_bytes = 1024);
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(4096));
    let r = app
        .admin()
        .raw(Method::POST, "/v1/keys", &[], Some(big.as_bytes()))
        .unwrap();
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
    let small = app
        .admin()
        .raw(Method::POST, "/v1/keys", &[], Some(br#"{"name":"ok"}"#))
        .unwrap();
    assert_eq!(small.status.as_u16(), 201);
}

#[test]
fn revoked_and_expired_keys_are_key_expired() {
    let app = TestApp::start();
    let (key, obj) = app.create_key(json!({"name": "short", "expiresInSec": 1}));
    assert_eq!(app.get(Some(&key), "/v1/auth/whoami").status.as_u16(), 200);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_error(&app.get(Some(&key), "/v1/auth/whoami"), 401, "KEY_EXPIRED");
    assert_eq!(
        app.admin().get_key(obj["id"].as_str().unwrap()).unwrap()["isActive"],
        false
    );

    let (key, obj) = app.create_key(json!({"name": "doomed"}));
    assert_eq!(app.get(Some(&key), "/v1/auth/whoami").status.as_u16(), 200);
    app.admin().revoke_key(obj["id"].as_str().unwrap()).unwrap();
    // Effective on the very next request.
    assert_error(&app.get(Some(&key), "/v1/auth/whoami"), 401, "KEY_EXPIRED");
}

#[test]
fn state_conflicts_are_409() {
    let app = TestApp::start();
    let (_, obj) = app.create_key(json!({"name": "gone"}));
    let id = obj["id"].as_str().unwrap();
    app.admin().revoke_key(id).unwrap();
    let err = app
        .admin()
        .update_key(id, &json!({"name": "back"}))
        .unwrap_err();
    assert_eq!(err.code(), Some("CONFLICT"));
    let err = app.admin().rotate_key(id, None).unwrap_err();
    assert_eq!(err.code(), Some("CONFLICT"));
}

#[test]
fn allowlists_refuse_other_addresses() {
    let app = TestApp::start();
    let (key, _) = app.create_key(json!({"name": "office", "allowedIps": ["10.0.0.0/8"]}));
    assert_error(
        &app.get(Some(&key), "/v1/auth/whoami"),
        403,
        "IP_NOT_ALLOWED",
    );
    let (key, _) = app.create_key(json!({"name": "local", "allowedIps": ["127.0.0.1"]}));
    assert_eq!(app.get(Some(&key), "/v1/auth/whoami").status.as_u16(), 200);
    // A forged X-Forwarded-For from an untrusted peer changes nothing.
    let (key, _) = app.create_key(json!({"name": "vpn", "allowedIps": ["203.0.113.0/24"]}));
    let r = app
        .client(&key)
        .raw(
            Method::GET,
            "/v1/auth/whoami",
            &[("X-Forwarded-For", "203.0.113.5")],
            None,
        )
        .unwrap();
    assert_error(&r, 403, "IP_NOT_ALLOWED");

    let server_wide = TestApp::start_with(|c| c.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()]);
    assert_error(
        &server_wide.get(Some(&server_wide.admin_key), "/v1/auth/whoami"),
        403,
        "IP_NOT_ALLOWED",
    );
    assert_eq!(server_wide.get(None, "/healthz").status.as_u16(), 200);
}

#[test]
fn forwarded_addresses_count_only_from_trusted_proxies() {
    let app = TestApp::start_with(|c| c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]);
    let (key, _) = app.create_key(json!({"name": "vpn", "allowedIps": ["203.0.113.0/24"]}));
    let c = app.client(&key);
    let r = c
        .raw(
            Method::GET,
            "/v1/auth/whoami",
            &[("X-Forwarded-For", "6.6.6.6, 203.0.113.5")],
            None,
        )
        .unwrap();
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    let r = c
        .raw(
            Method::GET,
            "/v1/auth/whoami",
            &[("X-Forwarded-For", "203.0.113.5, 6.6.6.6")],
            None,
        )
        .unwrap();
    assert_error(&r, 403, "IP_NOT_ALLOWED");
    assert_error(
        &app.get(Some(&key), "/v1/auth/whoami"),
        403,
        "IP_NOT_ALLOWED",
    );
}

#[test]
fn tls_serves_the_same_api() {
    let app = TestApp::start_tls();
    assert!(app.url.starts_with("https://"));
    assert_eq!(app.admin().whoami().unwrap()["name"], "admin");
    assert_error(&app.get(None, "/v1/keys"), 401, "UNAUTHORIZED");
    // Plain HTTP to the TLS port gets no API answer.
    let plain = sandgate_client::Client::new(&app.url.replace("https://", "http://"), None);
    assert!(plain.health().is_err());
    // A client that does not trust the certificate refuses to talk.
    let untrusting = sandgate_client::Client::new(&app.url, Some(app.admin_key.clone()));
    assert!(matches!(
        untrusting.whoami(),
        Err(sandgate_client::ClientError::Transport(_))
    ));
}
