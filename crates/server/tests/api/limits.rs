//! Rate limits per key (exact under concurrency) and failed-auth throttling.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use sandgate_client::Method;
use sandgate_core::keys::format::generate_key;
use sandgate_core::model::{Env, RateLimit};
use serde_json::json;

use crate::common::{TestApp, assert_error};

/// Fires `n` requests at once from `n` threads; returns the statuses.
fn burst(app: &TestApp, key: &str, n: usize) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let client = app.client(key);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                client
                    .raw(Method::GET, "/v1/auth/whoami", &[], None)
                    .unwrap()
                    .status
                    .as_u16()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn exactly_limit_of_many_simultaneous_requests_pass() {
    let app = TestApp::start();
    let (key, _) =
        app.create_key(json!({"name": "limited", "rateLimits": [{"limit": 7, "windowSec": 60}]}));
    let statuses = burst(&app, &key, 30);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        23,
        "{statuses:?}"
    );
    let r = app.get(Some(&key), "/v1/auth/whoami");
    let body = assert_error(&r, 429, "RATE_LIMITED");
    assert!(body["error"]["message"].is_string());
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(r.header("ratelimit-limit"), Some("7"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    // Refusals are audited.
    let denied = app
        .admin()
        .audit(&[("outcome", "denied"), ("limit", "1000")])
        .unwrap();
    let rate_limited = denied["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reason"] == "rate_limited")
        .count();
    assert_eq!(rate_limited, 24);
}

#[test]
fn successful_responses_carry_the_headers_and_every_limit_applies() {
    let app = TestApp::start();
    let (key, _) = app.create_key(json!({"name": "two", "rateLimits": [
        {"limit": 100, "windowSec": 3600}, {"limit": 3, "windowSec": 1}
    ]}));
    let remaining: Vec<String> = (0..3)
        .map(|_| {
            let r = app.get(Some(&key), "/v1/auth/whoami");
            assert_eq!(r.status.as_u16(), 200);
            assert_eq!(r.header("ratelimit-limit"), Some("3"));
            assert!(r.header("ratelimit-reset").is_some());
            r.header("ratelimit-remaining").unwrap().to_owned()
        })
        .collect();
    assert_eq!(remaining, ["2", "1", "0"]);
    assert_error(&app.get(Some(&key), "/v1/auth/whoami"), 429, "RATE_LIMITED");
    std::thread::sleep(Duration::from_millis(1100));
    let r = app.get(Some(&key), "/v1/auth/whoami");
    assert_eq!(r.status.as_u16(), 200);
    // The hourly limit counted only the requests that passed.
    let r = app.get(Some(&key), "/v1/auth/whoami");
    assert_eq!(r.status.as_u16(), 200);
    // Keys without limits carry no headers.
    assert!(
        app.get(Some(&app.admin_key), "/v1/auth/whoami")
            .header("ratelimit-limit")
            .is_none()
    );
}

#[test]
fn a_server_default_applies_to_keys_without_their_own() {
    let app = TestApp::start_with(|c| {
        c.default_rate_limits = vec![RateLimit {
            limit: 2,
            window_sec: 60,
        }];
    });
    let (plain, _) = app.create_key(json!({"name": "plain"}));
    let (own, _) =
        app.create_key(json!({"name": "own", "rateLimits": [{"limit": 5, "windowSec": 60}]}));
    let plain_ok = (0..4)
        .filter(|_| app.get(Some(&plain), "/v1/auth/whoami").status.as_u16() == 200)
        .count();
    assert_eq!(plain_ok, 2);
    let own_ok = (0..6)
        .filter(|_| app.get(Some(&own), "/v1/auth/whoami").status.as_u16() == 200)
        .count();
    assert_eq!(own_ok, 5);
}

#[test]
fn invalid_credentials_from_one_address_are_throttled_before_any_lookup() {
    let app = TestApp::start_with(|c| {
        c.auth_failure_limit = Some(RateLimit {
            limit: 5,
            window_sec: 60,
        });
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    });
    let from = |ip: &str, key: &str| {
        app.anonymous()
            .raw(
                Method::GET,
                "/v1/auth/whoami",
                &[("X-Forwarded-For", ip), ("X-API-Key", key)],
                None,
            )
            .unwrap()
    };
    let audit_rows = || {
        app.admin()
            .audit(&[("limit", "1000"), ("outcome", "denied")])
            .unwrap()["data"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = audit_rows();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        statuses.push(
            from("198.51.100.1", generate_key(Env::Live).expose())
                .status
                .as_u16(),
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        5,
        "{statuses:?}"
    );
    assert!(statuses[5..].iter().all(|s| *s == 429));
    let r = from("198.51.100.1", &app.admin_key);
    assert_error(&r, 429, "RATE_LIMITED");
    assert!(r.header("retry-after").is_some());
    // Throttled requests never reached the store: only the 5 real attempts were written.
    assert_eq!(audit_rows() - before, 5);
    // Valid keys from other addresses are unaffected.
    assert_eq!(from("198.51.100.2", &app.admin_key).status.as_u16(), 200);
    // A scope refusal is not an invalid credential.
    let reader = app.key_with(&["sandbox:read"]);
    for _ in 0..10 {
        let r = app
            .client(&reader)
            .raw(
                Method::GET,
                "/v1/keys",
                &[("X-Forwarded-For", "198.51.100.3")],
                None,
            )
            .unwrap();
        assert_eq!(r.status.as_u16(), 403);
    }
}
