//! Executions refills (`executionsRefill`): `amount` added back every `intervalSec`,
//! up to the limit, atomically with concurrent runs. Observations are compared by
//! their own `nextRefillAt` (which moves by one interval per refill), so nothing
//! here depends on how fast the machine is.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use sandgate_client::Method;
use sandgate_core::model::Timestamp;
use serde_json::{Value, json};

use crate::common::{PostJson, TestApp, assert_error, jail_available};

fn millis(v: &Value) -> i64 {
    Timestamp::parse_rfc3339(v.as_str().expect("a time"))
        .expect("RFC 3339")
        .millis()
}

/// Refills that fell between two observations of a key (object or whoami).
fn refills_between(before: &Value, after: &Value, interval_ms: i64) -> u64 {
    let moved = millis(&after["nextRefillAt"]) - millis(&before["nextRefillAt"]);
    assert!(
        moved >= 0 && moved % interval_ms == 0,
        "the schedule moves by whole intervals: {before} → {after}"
    );
    (moved / interval_ms) as u64
}

fn remaining(v: &Value) -> u64 {
    v["executionsRemaining"]
        .as_u64()
        .expect("executionsRemaining")
}

/// Sleeps until `ms` after the time `t` (a field of a response).
fn sleep_past(t: &Value, ms: i64) {
    let wait = millis(t) + ms - Timestamp::now().millis();
    if wait > 0 {
        std::thread::sleep(Duration::from_millis(wait as u64));
    }
}

#[test]
fn a_refill_is_shown_validated_changed_and_removed() {
    let app = TestApp::start();
    let admin = app.admin();
    let (key, created) = app.create_key(json!({
        "name": "plan", "executionsLimit": 10,
        "executionsRefill": {"amount": 4, "intervalSec": 3600}
    }));
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        created["executionsRefill"],
        json!({"amount": 4, "intervalSec": 3600})
    );
    assert_eq!(created["executionsRemaining"], 10);
    // The first refill falls one interval after creation.
    assert_eq!(
        millis(&created["nextRefillAt"]),
        millis(&created["createdAt"]) + 3_600_000
    );
    let who = app.client(&key).whoami().unwrap();
    assert_eq!(who["executionsRefill"], created["executionsRefill"]);
    assert_eq!(who["nextRefillAt"], created["nextRefillAt"]);
    // Keys without a refill say so.
    let (_, plain) = app.create_key(json!({"name": "plain", "executionsLimit": 5}));
    assert_eq!(plain["executionsRefill"], Value::Null);
    assert_eq!(plain["nextRefillAt"], Value::Null);

    // Invalid refills are refused, naming the field, and change nothing.
    for body in [
        json!({"name": "x", "executionsRefill": {"amount": 1, "intervalSec": 60}}),
        json!({"name": "x", "executionsLimit": 5, "executionsRefill": {"amount": 0, "intervalSec": 60}}),
        json!({"name": "x", "executionsLimit": 5, "executionsRefill": {"amount": 1, "intervalSec": 0}}),
        json!({"name": "x", "executionsLimit": 5, "executionsRefill": {"amount": 1, "intervalSec": 999_999_999_999u64}}),
        json!({"name": "x", "executionsLimit": 5, "executionsRefill": {"amount": 1}}),
        json!({"name": "x", "executionsLimit": 5, "executionsRefill": {"amount": 1, "intervalSec": 60, "cap": 9}}),
        json!({"name": "x", "executionsLimit": 5, "executionsRefill": "100/day"}),
    ] {
        let r = admin.post_json("/v1/keys", &body);
        let err = assert_error(&r, 400, "INVALID_REQUEST");
        let field = err["error"]["field"].as_str().unwrap_or_default();
        assert!(field.starts_with("executionsRefill"), "{body}: {err}");
    }
    let patch = |id: &str, body: Value| {
        let bytes = serde_json::to_vec(&body).unwrap();
        admin
            .raw(
                Method::PATCH,
                &format!("/v1/keys/{id}"),
                &[("content-type", "application/json")],
                Some(&bytes),
            )
            .unwrap()
    };
    let (_, unlimited) = app.create_key(json!({"name": "unlimited"}));
    let unlimited_id = unlimited["id"].as_str().unwrap();
    for body in [
        json!({"executionsRefill": {"amount": 1, "intervalSec": 60}}),
        json!({"executionsRefill": {"amount": 1, "intervalSec": 60}, "executionsLimit": null}),
    ] {
        let r = patch(unlimited_id, body);
        assert_eq!(
            assert_error(&r, 400, "INVALID_REQUEST")["error"]["field"],
            "executionsRefill"
        );
    }
    let r = patch(
        id,
        json!({"executionsLimit": null, "executionsRefill": {"amount": 1, "intervalSec": 60}}),
    );
    assert_error(&r, 400, "INVALID_REQUEST");
    assert_eq!(
        admin.get_key(id).unwrap()["executionsRefill"],
        created["executionsRefill"]
    );

    // The same refill again keeps its schedule; another one starts a new one now.
    let same = admin
        .update_key(
            id,
            &json!({"executionsRefill": {"amount": 4, "intervalSec": 3600}}),
        )
        .unwrap();
    assert_eq!(same["nextRefillAt"], created["nextRefillAt"]);
    let changed = admin
        .update_key(
            id,
            &json!({"executionsRefill": {"amount": 2, "intervalSec": 60}}),
        )
        .unwrap();
    assert_eq!(
        changed["executionsRefill"],
        json!({"amount": 2, "intervalSec": 60})
    );
    assert!(millis(&changed["nextRefillAt"]) < millis(&created["nextRefillAt"]));
    // A limit and a refill given to an unlimited key in one change.
    let both = admin
        .update_key(
            unlimited_id,
            &json!({"executionsLimit": 7, "executionsRefill": {"amount": 7, "intervalSec": 86400}}),
        )
        .unwrap();
    assert_eq!(both["executionsRemaining"], 7);
    assert_eq!(both["executionsRefill"]["amount"], 7);
    // A rotated key shares the counter, and so its refill.
    let rotated = admin.rotate_key(id, Some(60)).unwrap();
    assert_eq!(rotated["executionsRefill"], changed["executionsRefill"]);
    assert_eq!(rotated["nextRefillAt"], changed["nextRefillAt"]);
    // `null` removes the refill; an unlimited key has none.
    let removed = admin
        .update_key(id, &json!({"executionsRefill": null}))
        .unwrap();
    assert_eq!(removed["executionsRefill"], Value::Null);
    assert_eq!(removed["nextRefillAt"], Value::Null);
    assert_eq!(removed["executionsLimit"], 10);
    let unlimited = admin
        .update_key(unlimited_id, &json!({"executionsLimit": null}))
        .unwrap();
    assert_eq!(unlimited["executionsRefill"], Value::Null);
    assert_eq!(unlimited["executionsRemaining"], Value::Null);
}

#[test]
fn each_interval_adds_the_amount_and_never_beyond_the_limit() {
    let app = TestApp::start();
    let admin = app.admin();
    let (_, created) = app.create_key(json!({
        "name": "refilled", "executionsLimit": 3,
        "executionsRefill": {"amount": 2, "intervalSec": 1}
    }));
    let id = created["id"].as_str().unwrap();
    let first = admin.reset_executions(id, Some(0)).unwrap();
    // The reset applied the refills due before it, then set 0 (a refill may have
    // fallen between the reset and its answer).
    assert!([0, 2].contains(&remaining(&first)), "{first}");
    sleep_past(&first["nextRefillAt"], 100);
    let second = admin.get_key(id).unwrap();
    let n = refills_between(&first, &second, 1000);
    assert!(n >= 1, "a refill fell: {first} → {second}");
    assert_eq!(remaining(&second), (remaining(&first) + 2 * n).min(3));
    // Two more intervals: capped at the limit of 3, not 2 + 4.
    sleep_past(&second["nextRefillAt"], 1100);
    let third = admin.get_key(id).unwrap();
    assert!(refills_between(&second, &third, 1000) >= 2);
    assert_eq!(remaining(&third), 3);
}

#[test]
fn refills_and_concurrent_runs_add_up_exactly() {
    if !jail_available() {
        return;
    }
    let app = TestApp::start();
    let admin = app.admin();
    let (key, created) = app.create_key(json!({
        "name": "busy", "scopes": ["sandbox:execute"], "executionsLimit": 1000,
        "executionsRefill": {"amount": 5, "intervalSec": 1}
    }));
    let id = created["id"].as_str().unwrap();
    let run = json!({"language": "bash", "code": "true"});
    let before = admin.reset_executions(id, Some(0)).unwrap();
    sleep_past(&before["nextRefillAt"], 100);
    let start = admin.get_key(id).unwrap();
    let available = remaining(&start);
    assert_eq!(
        available,
        remaining(&before) + 5 * refills_between(&before, &start, 1000)
    );
    assert!(available >= 5);
    // A run takes from what the refills gave back, and says what is left.
    let one = app.client(&key).execute(&run).unwrap();
    let left = one["executionsLeft"].as_u64().unwrap();
    assert!(left >= available - 1, "{left} after {available}");

    // A burst of runs while refills fall: every execution given out is one that
    // was there or was refilled, none twice, none lost.
    let after_one = admin.get_key(id).unwrap();
    let n = 40;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let client = app.client(&key);
            let barrier = Arc::clone(&barrier);
            let run = run.clone();
            std::thread::spawn(move || {
                barrier.wait();
                client.post_json("/v1/execute", &run)
            })
        })
        .collect();
    let responses: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ran = responses.iter().filter(|r| r.status == 200).count() as u64;
    let refused = responses
        .iter()
        .filter(|r| r.status == 429 && r.json()["error"]["code"] == "QUOTA_EXCEEDED")
        .count() as u64;
    assert_eq!(ran + refused, n as u64, "only runs and quota refusals");
    let end = admin.get_key(id).unwrap();
    let refilled = 5 * refills_between(&after_one, &end, 1000);
    assert_eq!(
        remaining(&after_one) + refilled,
        remaining(&end) + ran,
        "{after_one} → {end}: {ran} ran, {refused} refused"
    );
}
