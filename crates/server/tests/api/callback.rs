//! The auth callback (SPEC §8), against real HTTP peers started by the tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandgate_client::{Method, RawResponse};
use sandgate_server::AuthCallbackConfig;
use serde_json::json;

use crate::common::{TestApp, assert_error};

/// One request the peer received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    /// Lower-cased names, in the order received.
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The credential headers it carried, whatever their number.
    fn credential_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "authorization" || k == "x-api-key")
            .cloned()
            .collect()
    }
}

type Reply = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

/// A tiny keep-alive HTTP/1.1 server that records every request and answers with
/// `reply`.
struct Peer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl Peer {
    fn start(reply: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/check", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let reply: Arc<Reply> = Arc::new(reply);
        let (seen2, connections2) = (Arc::clone(&seen), Arc::clone(&connections));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                connections2.fetch_add(1, Ordering::SeqCst);
                let (seen, reply) = (Arc::clone(&seen2), Arc::clone(&reply));
                std::thread::spawn(move || serve_connection(stream, &seen, &*reply));
            }
        });
        Peer {
            url,
            seen,
            connections,
        }
    }

    /// Answers 200 with `body` to everything.
    fn allowing(body: &str) -> Peer {
        let body = body.to_owned();
        Peer::start(move |_| (200, body.clone()))
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_connection(stream: TcpStream, seen: &Mutex<Vec<Seen>>, reply: &Reply) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let request = Seen {
            method,
            path,
            headers,
        };
        let length: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push(request.clone());
        let (status, body) = reply(&request);
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn with_callback(url: &str, tweak: impl FnOnce(&mut AuthCallbackConfig)) -> TestApp {
    let mut callback = AuthCallbackConfig::new(url);
    tweak(&mut callback);
    TestApp::start_with(|c| c.auth_callback = Some(callback))
}

fn send(app: &TestApp, method: Method, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    app.anonymous()
        .raw(method, path, headers, None)
        .expect("request")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn the_callback_gets_one_credential_header_as_received_and_the_request() {
    let peer = Peer::allowing("");
    let app = with_callback(&peer.url, |_| {});

    // Both headers sent: only the Bearer one is forwarded.
    let both = send(
        &app,
        Method::GET,
        "/v1/auth/whoami",
        &[
            ("authorization", &bearer("token-one")),
            ("x-api-key", "api-key-two"),
        ],
    );
    assert_eq!(both.status.as_u16(), 200, "{}", both.text());
    let who = both.json();
    let key_id = who["keyId"].as_str().unwrap().to_owned();
    assert!(key_id.starts_with("callback_"), "{key_id}");
    assert_eq!(who["tenant"], "default");
    assert_eq!(who["env"], "live");
    let scopes = who["scopes"].as_array().unwrap();
    assert_eq!(scopes.len(), 7, "the sandbox-user profile: {scopes:?}");
    assert!(scopes.iter().any(|s| s == "sandbox:execute"));

    // Only X-API-Key: forwarded as X-API-Key.
    let only_key = send(
        &app,
        Method::GET,
        "/v1/languages",
        &[("x-api-key", "api-key-two")],
    );
    assert_eq!(only_key.status.as_u16(), 200, "{}", only_key.text());

    // A templated route: the original path is sent, and scopes still apply.
    let body = assert_error(
        &send(
            &app,
            Method::DELETE,
            "/v1/keys/key_abc",
            &[("authorization", &bearer("token-one"))],
        ),
        403,
        "FORBIDDEN",
    );
    assert_eq!(body["error"]["requiredScope"], "keys:manage");

    let seen = peer.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for s in &seen {
        assert_eq!((s.method.as_str(), s.path.as_str()), ("POST", "/check"));
        assert_eq!(s.credential_headers().len(), 1, "{s:?}");
    }
    assert_eq!(
        seen[0].credential_headers(),
        [("authorization".to_owned(), "Bearer token-one".to_owned())]
    );
    assert_eq!(seen[0].header("x-request-path"), Some("/v1/auth/whoami"));
    assert_eq!(seen[0].header("x-request-method"), Some("GET"));
    assert_eq!(
        seen[1].credential_headers(),
        [("x-api-key".to_owned(), "api-key-two".to_owned())]
    );
    assert_eq!(seen[1].header("x-request-path"), Some("/v1/languages"));
    assert_eq!(seen[2].header("x-request-path"), Some("/v1/keys/key_abc"));
    assert_eq!(seen[2].header("x-request-method"), Some("DELETE"));
    // One agent: the three calls shared one connection.
    assert_eq!(peer.connections.load(Ordering::SeqCst), 1);

    // Audit rows name the credential by fingerprint only.
    let audit = app.admin().audit(&[("limit", "1000")]).unwrap().to_string();
    assert!(audit.contains(&key_id), "{audit}");
    for secret in ["token-one", "api-key-two"] {
        assert!(!audit.contains(secret), "{secret} reached the audit log");
    }
}

#[test]
fn any_status_but_200_is_401() {
    let peer = Peer::start(|s| match s.header("authorization") {
        Some("Bearer good-token-1") => (200, String::new()),
        Some("Bearer redirected-token-2") => (302, String::new()),
        _ => (403, r#"{"error": "no"}"#.to_owned()),
    });
    let app = with_callback(&peer.url, |_| {});
    let good = send(
        &app,
        Method::GET,
        "/v1/auth/whoami",
        &[("authorization", "Bearer good-token-1")],
    );
    assert_eq!(good.status.as_u16(), 200);
    for token in ["bad-token-3", "redirected-token-2"] {
        assert_error(
            &send(
                &app,
                Method::GET,
                "/v1/auth/whoami",
                &[("authorization", &bearer(token))],
            ),
            401,
            "UNAUTHORIZED",
        );
    }
    assert_eq!(peer.seen().len(), 3);
    let audit = app.admin().audit(&[("outcome", "denied")]).unwrap();
    let rows = audit["data"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["reason"] == "callback_denied"
            && r["keyId"]
                .as_str()
                .is_some_and(|k| k.starts_with("callback_"))),
        "{audit}"
    );
    let all = app.admin().audit(&[("limit", "1000")]).unwrap().to_string();
    for secret in ["good-token-1", "redirected-token-2", "bad-token-3"] {
        assert!(!all.contains(secret), "{secret} reached the audit log");
    }
}

#[test]
fn no_credential_and_known_keys_never_reach_the_callback() {
    let peer = Peer::allowing("");
    let app = TestApp::start_with(|c| {
        c.auth_callback = Some(AuthCallbackConfig::new(&peer.url));
        c.env_api_keys = vec![sandgate_core::keys::format::SecretKey::new(
            "ci-secret".into(),
        )];
    });
    assert_error(&app.get(None, "/v1/auth/whoami"), 401, "UNAUTHORIZED");
    assert_error(
        &send(
            &app,
            Method::GET,
            "/v1/auth/whoami",
            &[("authorization", "Basic dXNlcjpwdw==")],
        ),
        401,
        "UNAUTHORIZED",
    );
    // A stored key and an environment key are decided before the callback.
    let stored = app.key_with(&["sandbox:read"]);
    let who = app.client(&stored).whoami().unwrap();
    assert!(who["keyId"].as_str().unwrap().starts_with("key_"));
    assert_eq!(
        app.client("ci-secret").whoami().unwrap()["keyId"]
            .as_str()
            .map(|k| k.starts_with("env_")),
        Some(true)
    );
    // A revoked stored key stays refused as expired; the callback cannot revive it.
    let (gone, created) = app.create_key(json!({"name": "gone"}));
    let revoked = app
        .admin()
        .raw(
            Method::DELETE,
            &format!("/v1/keys/{}", created["id"].as_str().unwrap()),
            &[],
            None,
        )
        .unwrap();
    assert_eq!(revoked.status.as_u16(), 204);
    assert_error(&app.get(Some(&gone), "/v1/auth/whoami"), 401, "KEY_EXPIRED");
    assert!(peer.seen().is_empty(), "{:?}", peer.seen());
}

#[test]
fn an_unreachable_or_slow_callback_is_500_auth_callback_failed() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/check", l.local_addr().unwrap())
    };
    let app = with_callback(&closed, |_| {});
    assert_error(
        &send(
            &app,
            Method::GET,
            "/v1/auth/whoami",
            &[("x-api-key", "whatever")],
        ),
        500,
        "AUTH_CALLBACK_FAILED",
    );

    let slow = Peer::start(|_| {
        std::thread::sleep(Duration::from_millis(1500));
        (200, String::new())
    });
    let app = with_callback(&slow.url, |c| c.timeout = Duration::from_millis(200));
    let body = assert_error(
        &send(
            &app,
            Method::GET,
            "/v1/auth/whoami",
            &[("authorization", "Bearer whatever")],
        ),
        500,
        "AUTH_CALLBACK_FAILED",
    );
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no cause in {body}"
    );
    assert_eq!(slow.seen().len(), 1);
    let audit = app.admin().audit(&[("outcome", "denied")]).unwrap();
    assert!(
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["reason"] == "callback_timeout"),
        "{audit}"
    );
}

#[test]
fn a_json_reply_sets_tenant_env_and_scopes() {
    let peer = Peer::start(|s| {
        match s.header("x-api-key") {
        Some("reader") => (
            200,
            json!({"tenant": "acme", "env": "test", "scopes": ["sandbox:read", "billing:read"], "user": "u1"})
                .to_string(),
        ),
        _ => (200, json!({"scopes": ["sandbox:read", "sandbox:raed"]}).to_string()),
    }
    });
    let app = with_callback(&peer.url, |_| {});
    let who = send(
        &app,
        Method::GET,
        "/v1/auth/whoami",
        &[("x-api-key", "reader")],
    )
    .json();
    assert_eq!(who["tenant"], "acme");
    assert_eq!(who["env"], "test");
    assert_eq!(who["scopes"], json!(["sandbox:read", "billing:read"]));
    let body = assert_error(
        &app.anonymous()
            .raw(
                Method::POST,
                "/v1/execute",
                &[("x-api-key", "reader")],
                Some(br#"{"language": "python", "code": "print(1)"}"#),
            )
            .unwrap(),
        403,
        "FORBIDDEN",
    );
    assert_eq!(body["error"]["requiredScope"], "sandbox:execute");
    // An unknown scope name rejects the grant: refused, not guessed.
    assert_error(
        &send(
            &app,
            Method::GET,
            "/v1/auth/whoami",
            &[("x-api-key", "typo")],
        ),
        401,
        "UNAUTHORIZED",
    );
}

#[test]
fn positive_decisions_are_cached_per_route_when_asked() {
    let peer = Peer::start(|s| match s.header("authorization") {
        Some("Bearer good") => (200, String::new()),
        _ => (401, String::new()),
    });
    let app = with_callback(&peer.url, |c| c.cache_ttl = Some(Duration::from_secs(60)));
    let call = |path: &str, token: &str| {
        send(
            &app,
            Method::GET,
            path,
            &[("authorization", &bearer(token))],
        )
        .status
        .as_u16()
    };
    assert_eq!(call("/v1/auth/whoami", "good"), 200);
    assert_eq!(call("/v1/auth/whoami", "good"), 200);
    assert_eq!(
        peer.seen().len(),
        1,
        "the second whoami came from the cache"
    );
    assert_eq!(call("/v1/languages", "good"), 200);
    assert_eq!(peer.seen().len(), 2, "another route asks again");
    assert_eq!(call("/v1/auth/whoami", "bad"), 401);
    assert_eq!(call("/v1/auth/whoami", "bad"), 401);
    assert_eq!(peer.seen().len(), 4, "refusals are never cached");
}

/// Without a cache, every request asks (a callback may revoke at once).
#[test]
fn without_a_cache_every_request_asks() {
    let peer = Peer::allowing("");
    let app = with_callback(&peer.url, |_| {});
    for _ in 0..3 {
        let r = send(
            &app,
            Method::GET,
            "/v1/auth/whoami",
            &[("authorization", "Bearer t")],
        );
        assert_eq!(r.status.as_u16(), 200);
    }
    assert_eq!(peer.seen().len(), 3);
}
