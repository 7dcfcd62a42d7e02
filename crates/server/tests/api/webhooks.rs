//! Webhooks through `/v1/webhooks`, delivered to a real HTTP receiver run by the test.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sandgate_client::Method;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::common::{PostJson, TestApp, assert_error, jail_available};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    fn event_type(&self) -> String {
        self.json()["type"].as_str().unwrap_or_default().to_owned()
    }
}

/// A minimal HTTP/1.1 receiver: records every request and answers with the scripted
/// statuses in order, then 200 (or never answers, when hanging).
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::answering(&[])
    }

    fn answering(statuses: &[u16]) -> Receiver {
        Receiver::spawn(statuses.iter().copied().collect(), false)
    }

    /// Accepts connections, reads requests, never answers.
    fn hanging() -> Receiver {
        Receiver::spawn(VecDeque::new(), true)
    }

    fn spawn(statuses: VecDeque<u16>, hang: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let statuses = Arc::new(Mutex::new(statuses));
        let recorded = Arc::clone(&got);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (recorded, statuses) = (Arc::clone(&recorded), Arc::clone(&statuses));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    let Some(request) = read_request(&mut reader) else {
                        return;
                    };
                    recorded.lock().unwrap().push(request);
                    if hang {
                        std::thread::sleep(Duration::from_secs(60));
                        return;
                    }
                    let status = statuses.lock().unwrap().pop_front().unwrap_or(200);
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = reader.get_mut().write_all(answer.as_bytes());
                });
            }
        });
        Receiver { url, got }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until `done` holds of everything received so far.
    fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.received();
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {:?}",
                got.iter().map(Received::event_type).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Deliveries of one event type.
    fn of_type(&self, event_type: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.event_type() == event_type)
            .collect()
    }
}

fn read_request(reader: &mut BufReader<std::net::TcpStream>) -> Option<Received> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Received { headers, body })
}

/// A server whose webhooks may point at 127.0.0.1, retrying fast.
fn app() -> TestApp {
    TestApp::start_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_retry_base = Duration::from_millis(50);
    })
}

/// Registers a webhook with `key`; the 201 body.
fn create_webhook(app: &TestApp, key: &str, url: &str, events: &[&str]) -> Value {
    let r = app
        .client(key)
        .post_json("/v1/webhooks", &json!({"url": url, "events": events}));
    assert_eq!(r.status.as_u16(), 201, "{}", r.text());
    r.json()
}

/// Checks `Sandgate-Signature` the way a receiver would.
fn assert_signed(r: &Received, secret: &str) {
    let header = r.header("sandgate-signature");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header shape: {header:?}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - t.parse::<i64>().unwrap()).abs() < 300, "t={t}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected, "signature does not verify");
    let mut wrong = Hmac::<Sha256>::new_from_slice(b"another secret").unwrap();
    wrong.update(format!("{t}.").as_bytes());
    wrong.update(&r.body);
    assert_ne!(hex(&wrong.finalize().into_bytes()), v1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_secret_is_shown_once_and_listing_hides_it() {
    let app = app();
    let receiver = Receiver::start();
    let created = create_webhook(&app, &app.admin_key, &receiver.url, &["key.created", "*"]);
    assert!(
        created["id"].as_str().unwrap().starts_with("wh_"),
        "{created}"
    );
    assert_eq!(created["url"], receiver.url.as_str());
    assert_eq!(created["events"], json!(["key.created", "*"]));
    assert!(created["createdAt"].as_str().is_some());
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.len() >= 32, "{secret}");

    let listed = app.get(Some(&app.admin_key), "/v1/webhooks").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert_eq!(listed["data"][0]["id"], created["id"]);
    assert!(listed["data"][0].get("secret").is_none(), "{listed}");
    assert!(!listed.to_string().contains(secret));
}

#[test]
fn invalid_webhooks_name_the_field() {
    let app = TestApp::start();
    let admin = app.admin();
    let cases = [
        (json!({"events": ["*"]}), "url"),
        (
            json!({"url": "ftp://example.com/x", "events": ["*"]}),
            "url",
        ),
        (json!({"url": "not a url", "events": ["*"]}), "url"),
        (json!({"url": "https://", "events": ["*"]}), "url"),
        (json!({"url": "https://example.com/x"}), "events"),
        (
            json!({"url": "https://example.com/x", "events": []}),
            "events",
        ),
        (
            json!({"url": "https://example.com/x", "events": ["key.exploded"]}),
            "events",
        ),
        (json!({"url": 5, "events": ["*"]}), "url"),
    ];
    for (body, field) in cases {
        let r = admin.post_json("/v1/webhooks", &body);
        let err = assert_error(&r, 400, "INVALID_REQUEST");
        assert_eq!(err["error"]["field"], field, "{body} → {err}");
    }
    // Managing webhooks takes webhooks:manage.
    let reader = app.key_with(&["keys:read"]);
    let r = app.client(&reader).post_json(
        "/v1/webhooks",
        &json!({"url": "https://example.com/x", "events": ["*"]}),
    );
    let err = assert_error(&r, 403, "FORBIDDEN");
    assert_eq!(err["error"]["requiredScope"], "webhooks:manage");
    assert_error(&app.get(Some(&reader), "/v1/webhooks"), 403, "FORBIDDEN");
}

#[test]
fn private_destinations_are_refused_unless_allowed() {
    let app = TestApp::start();
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.0.0.1/hook",
        "http://192.168.1.20:8080/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
    ] {
        let r = app
            .admin()
            .post_json("/v1/webhooks", &json!({"url": url, "events": ["*"]}));
        let err = assert_error(&r, 400, "INVALID_REQUEST");
        assert_eq!(err["error"]["field"], "url", "{url}: {err}");
    }
    assert_eq!(
        app.get(Some(&app.admin_key), "/v1/webhooks").json()["data"],
        json!([])
    );

    let allowing = TestApp::start_with(|c| c.webhook_allow_private = true);
    create_webhook(
        &allowing,
        &allowing.admin_key,
        "http://127.0.0.1:9/hook",
        &["*"],
    );
}

#[test]
fn webhooks_are_deleted_and_other_partitions_see_none() {
    let app = app();
    let receiver = Receiver::start();
    let created = create_webhook(&app, &app.admin_key, &receiver.url, &["*"]);
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/webhooks/{id}");

    let (acme, _) =
        app.create_key(json!({"name": "acme", "tenant": "acme", "scopes": ["webhooks:manage"]}));
    let (test_env, _) =
        app.create_key(json!({"name": "t", "env": "test", "scopes": ["webhooks:manage"]}));
    for other in [&acme, &test_env] {
        assert_eq!(
            app.get(Some(other), "/v1/webhooks").json()["data"],
            json!([])
        );
        let r = app
            .client(other)
            .raw(Method::DELETE, &path, &[], None)
            .unwrap();
        assert_error(&r, 404, "NOT_FOUND");
    }

    let r = app.admin().raw(Method::DELETE, &path, &[], None).unwrap();
    assert_eq!(r.status.as_u16(), 204);
    assert_eq!(
        app.get(Some(&app.admin_key), "/v1/webhooks").json()["data"],
        json!([])
    );
    let r = app.admin().raw(Method::DELETE, &path, &[], None).unwrap();
    assert_error(&r, 404, "NOT_FOUND");
    // Nothing is delivered to a deleted webhook.
    app.create_key(json!({"name": "after-delete"}));
    std::thread::sleep(Duration::from_millis(500));
    assert!(receiver.received().is_empty());
}

#[test]
fn key_events_are_signed_and_reach_only_their_tenant() {
    let app = app();
    let ours = Receiver::start();
    let theirs = Receiver::start();
    let hook = create_webhook(
        &app,
        &app.admin_key,
        &ours.url,
        &["key.created", "key.revoked"],
    );
    let secret = hook["secret"].as_str().unwrap();
    let (acme_admin, _) = app.create_key(json!({
        "name": "acme-admin", "tenant": "acme", "scopes": ["webhooks:manage", "keys:manage"]
    }));
    create_webhook(&app, &acme_admin, &theirs.url, &["*"]);

    let (plaintext, key) = app.create_key(json!({"name": "worker"}));
    let key_id = key["id"].as_str().unwrap();
    app.admin().revoke_key(key_id).unwrap();
    let acme_key = app
        .client(&acme_admin)
        .create_key(&json!({"name": "acme-worker", "scopes": ["webhooks:manage"]}))
        .unwrap();
    let acme_key_id = acme_key["id"].as_str().unwrap();

    let got = ours.wait_for("key.created and key.revoked", |got| got.len() >= 2);
    let of = |t: &str| got.iter().find(|r| r.event_type() == t).cloned().unwrap();
    let created = &of("key.created");
    assert_signed(created, secret);
    let body = created.json();
    assert!(body["id"].as_str().unwrap().starts_with("evt_"));
    assert!(body["createdAt"].as_str().is_some());
    assert_eq!(body["data"]["key"]["id"], key_id);
    assert_eq!(body["data"]["key"]["tenant"], "default");
    assert_eq!(
        created.header("sandgate-event-id"),
        body["id"].as_str().unwrap()
    );
    assert_eq!(created.header("sandgate-event-type"), "key.created");
    assert_eq!(created.header("content-type"), "application/json");
    let created_text = String::from_utf8(created.body.clone()).unwrap();
    assert!(!created_text.contains(&plaintext) && !created_text.contains("hash"));

    let revoked = &of("key.revoked");
    assert_signed(revoked, secret);
    assert_eq!(revoked.json()["type"], "key.revoked");
    assert_eq!(revoked.json()["data"]["key"]["id"], key_id);
    assert_eq!(revoked.json()["data"]["key"]["isActive"], false);

    let acme_got = theirs.wait_for("acme's key.created", |got| {
        got.iter()
            .any(|r| r.json()["data"]["key"]["id"] == acme_key_id)
    });
    // Each tenant sees only its own keys.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        acme_got
            .iter()
            .all(|r| r.json()["data"]["key"]["tenant"] == "acme")
    );
    assert!(
        theirs
            .received()
            .iter()
            .all(|r| r.json()["data"]["key"]["id"] != key_id)
    );
    assert!(
        ours.received()
            .iter()
            .all(|r| r.json()["data"]["key"]["id"] != acme_key_id)
    );
    assert_eq!(ours.received().len(), 2, "only the subscribed types");
}

#[test]
fn every_key_lifecycle_change_is_delivered() {
    let app = app();
    let receiver = Receiver::start();
    create_webhook(&app, &app.admin_key, &receiver.url, &["*"]);
    let admin = app.admin();
    let (_, key) = app.create_key(json!({"name": "lifecycle"}));
    let id = key["id"].as_str().unwrap();
    admin.update_key(id, &json!({"name": "renamed"})).unwrap();
    let rotated = admin.rotate_key(id, Some(60)).unwrap();
    let new_id = rotated["id"].as_str().unwrap();
    admin.revoke_key(new_id).unwrap();

    let types = ["key.created", "key.updated", "key.rotated", "key.revoked"];
    receiver.wait_for("every lifecycle event", |got| {
        types
            .iter()
            .all(|t| got.iter().any(|r| r.event_type() == *t))
            && got
                .iter()
                .filter(|r| r.event_type() == "key.created")
                .count()
                >= 2
    });
    let updated = &receiver.of_type("key.updated")[0];
    assert_eq!(updated.json()["data"]["key"]["name"], "renamed");
    let rotation = &receiver.of_type("key.rotated")[0];
    assert_eq!(rotation.json()["data"]["key"]["id"], id);
    assert_eq!(rotation.json()["data"]["replacedBy"], new_id);
    assert!(
        receiver
            .of_type("key.created")
            .iter()
            .any(|r| r.json()["data"]["key"]["id"] == new_id)
    );
    assert_eq!(
        receiver.of_type("key.revoked")[0].json()["data"]["key"]["id"],
        new_id
    );
}

#[test]
fn a_failed_delivery_is_retried_until_it_succeeds() {
    let app = app();
    let receiver = Receiver::answering(&[500, 503]);
    let hook = create_webhook(&app, &app.admin_key, &receiver.url, &["key.created"]);
    app.create_key(json!({"name": "retried"}));
    let got = receiver.wait_for("three attempts", |got| got.len() >= 3);
    let ids: Vec<&str> = got.iter().map(|r| r.header("sandgate-event-id")).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(got[0].body, got[2].body, "the same event each time");
    for r in &got {
        assert_signed(r, hook["secret"].as_str().unwrap());
    }
    // Delivered on the third attempt: no fourth.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(receiver.received().len(), 3);
}

#[test]
fn a_delivery_is_given_up_after_its_last_attempt() {
    let app = TestApp::start_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_retry_base = Duration::from_millis(50);
        c.webhook_max_attempts = 3;
    });
    let receiver = Receiver::answering(&[500; 10]);
    create_webhook(&app, &app.admin_key, &receiver.url, &["key.created"]);
    app.create_key(json!({"name": "unlucky"}));
    receiver.wait_for("three attempts", |got| got.len() >= 3);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(receiver.received().len(), 3);
}

#[test]
fn quota_exceeded_is_delivered() {
    if !jail_available() {
        return;
    }
    let app = app();
    let receiver = Receiver::start();
    create_webhook(&app, &app.admin_key, &receiver.url, &["quota.exceeded"]);
    let (key, created) = app.create_key(json!({
        "name": "metered", "scopes": ["sandbox:execute"], "executionsLimit": 0
    }));
    let r = app.client(&key).post_json(
        "/v1/execute",
        &json!({"language": "bash", "code": "echo hi"}),
    );
    assert_error(&r, 429, "QUOTA_EXCEEDED");
    let got = receiver.wait_for("quota.exceeded", |got| !got.is_empty());
    assert_eq!(got[0].json()["type"], "quota.exceeded");
    assert_eq!(got[0].json()["data"]["key"]["id"], created["id"]);
    assert_eq!(got[0].json()["data"]["key"]["executionsRemaining"], 0);
}

#[test]
fn sandbox_lifecycle_and_refused_execs_are_delivered() {
    if !jail_available() {
        return;
    }
    let app = app();
    let receiver = Receiver::start();
    create_webhook(
        &app,
        &app.admin_key,
        &receiver.url,
        &["sandbox.created", "sandbox.killed", "quota.exceeded"],
    );
    let (key, created) = app.create_key(json!({
        "name": "sbx", "profile": "sandbox-user", "executionsLimit": 0
    }));
    let client = app.client(&key);
    let r = client.post_json("/v1/sandboxes", &json!({"timeoutSec": 60}));
    assert_eq!(r.status.as_u16(), 201, "{}", r.text());
    let sbx = r.json();
    let id = sbx["id"].as_str().unwrap();
    let r = client.post_json(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"command": "true"}),
    );
    assert_error(&r, 429, "QUOTA_EXCEEDED");
    let r = client
        .raw(Method::DELETE, &format!("/v1/sandboxes/{id}"), &[], None)
        .unwrap();
    assert_eq!(r.status.as_u16(), 204);

    receiver.wait_for("three events", |got| got.len() >= 3);
    let created_event = &receiver.of_type("sandbox.created")[0];
    assert_eq!(created_event.json()["data"]["sandbox"]["id"], id);
    assert_eq!(created_event.json()["data"]["keyId"], created["id"]);
    let killed = &receiver.of_type("sandbox.killed")[0];
    assert_eq!(killed.json()["data"]["sandbox"]["state"], "killed");
    let quota = &receiver.of_type("quota.exceeded")[0];
    assert_eq!(quota.json()["data"]["key"]["id"], created["id"]);
}

#[test]
fn a_dead_receiver_does_not_slow_requests() {
    let app = TestApp::start_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_timeout = Duration::from_secs(8);
    });
    let hanging = Receiver::hanging();
    create_webhook(&app, &app.admin_key, &hanging.url, &["*"]);
    // Nothing listens here: connections are refused.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    create_webhook(&app, &app.admin_key, &closed_url, &["*"]);

    for i in 0..10 {
        let started = Instant::now();
        let (_, key) = app.create_key(json!({"name": format!("k{i}")}));
        app.admin().revoke_key(key["id"].as_str().unwrap()).unwrap();
        // A request that waited on a delivery would take the 8 s timeout.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    hanging.wait_for("the hanging receiver to be tried", |got| !got.is_empty());
}

#[test]
fn key_expiring_is_sent_once_within_seven_days_of_expiry() {
    let app = app();
    let receiver = Receiver::start();
    create_webhook(&app, &app.admin_key, &receiver.url, &["key.expiring"]);
    let (_, soon) = app.create_key(json!({"name": "soon", "expiresInSec": 3 * 86_400}));
    let (_, later) = app.create_key(json!({"name": "later", "expiresInSec": 30 * 86_400}));
    let got = receiver.wait_for("key.expiring", |got| !got.is_empty());
    assert_eq!(got[0].json()["data"]["key"]["id"], soon["id"]);
    assert_eq!(got[0].json()["data"]["key"]["expiresAt"], soon["expiresAt"]);
    // Several sweeps later (every 200 ms here): still once, and nothing for `later`.
    std::thread::sleep(Duration::from_millis(1500));
    let all = receiver.of_type("key.expiring");
    assert_eq!(
        all.len(),
        1,
        "{:?}",
        all.iter().map(Received::json).collect::<Vec<_>>()
    );
    assert!(
        all.iter()
            .all(|r| r.json()["data"]["key"]["id"] != later["id"])
    );
}
