//! JWTs as a credential source (SPEC §8 item 3): HS256 with a secret, and
//! RS256/ES256/EdDSA with a JWKS served by a real HTTP peer started by the tests.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use sandgate_client::Method;
use sandgate_core::keys::format::SecretKey;
use sandgate_server::{AuthCallbackConfig, JwtConfig};
use serde_json::{Value, json};

use crate::common::{TestApp, assert_error};

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

/// An RSA public key (2048 bits) as PEM and as JWK modulus: what an attacker can
/// read from the JWKS.
const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA23Eq1qIP9OV5sSuE8lFa
jEaAzEnQIDA6pKh6RerGSdpVi2Ho3Nv8uxXeW9APZB7AavGOJU7YX9Ip1GMxRpwH
zPeNPYu2OevfUxaB/JaqKmFe+0aOWwOKNPGq4OCv1m7B36Ac4a5JEKFy4RuZ2eAZ
XNyumLeRjGpFRGqH1u3Q61uTtOTM774ajVTPqNO1D0Z8roHU009ZnKE1mrtR/Lch
ly1xrWJ2HfTA1DMs1wJyeDeRGWHsugZ3yE/XkoFwOBX/4rKTsHpNJVt3N5zwSDpJ
yE7O6BlyWL/t8IAki555/0vEHvHgCiRU0Ug2CfzXjjcqGhzO21z53kYPao2d8E4l
fwIDAQAB
-----END PUBLIC KEY-----
";
const RSA_N: &str = "23Eq1qIP9OV5sSuE8lFajEaAzEnQIDA6pKh6RerGSdpVi2Ho3Nv8uxXeW9APZB7AavGOJU7YX9Ip1GMxRpwHzPeNPYu2OevfUxaB_JaqKmFe-0aOWwOKNPGq4OCv1m7B36Ac4a5JEKFy4RuZ2eAZXNyumLeRjGpFRGqH1u3Q61uTtOTM774ajVTPqNO1D0Z8roHU009ZnKE1mrtR_Lchly1xrWJ2HfTA1DMs1wJyeDeRGWHsugZ3yE_XkoFwOBX_4rKTsHpNJVt3N5zwSDpJyE7O6BlyWL_t8IAki555_0vEHvHgCiRU0Ug2CfzXjjcqGhzO21z53kYPao2d8E4lfw";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims for `sub` valid for the next hour, with `extra` merged in.
fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({"sub": sub, "exp": now() + 3600, "iat": now()});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

/// A token whose signature is made by hand: HMAC-SHA256 with `key`, whatever it is.
fn hs256_with_raw_key(header: &Value, claims: &Value, key: &[u8]) -> String {
    use ring::hmac;
    let message = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), message.as_bytes());
    format!("{message}.{}", B64.encode(tag.as_ref()))
}

fn jwt_config(tweak: impl FnOnce(&mut JwtConfig)) -> JwtConfig {
    let mut jwt = JwtConfig::new();
    tweak(&mut jwt);
    jwt
}

fn with_secret(tweak: impl FnOnce(&mut JwtConfig)) -> TestApp {
    let jwt = jwt_config(|j| {
        j.secret = Some(SecretKey::new(SECRET.into()));
        tweak(j);
    });
    TestApp::start_with(|c| c.jwt = Some(jwt))
}

fn status(app: &TestApp, token: &str, path: &str) -> u16 {
    app.get(Some(token), path).status.as_u16()
}

#[test]
fn hs256_tokens_grant_their_scopes_tenant_and_env_and_are_audited_by_subject() {
    let app = with_secret(|_| {});
    let token = hs256(&claims(
        "alice@example.com",
        json!({"scope": "openid sandbox:read keys:read", "tenant": "acme", "env": "test"}),
    ));
    let who = app.client(&token).whoami().unwrap();
    assert_eq!(who["keyId"], "jwt_alice@example.com");
    assert_eq!(who["name"], "alice@example.com");
    assert_eq!(who["scopes"], json!(["sandbox:read", "keys:read"]));
    assert_eq!(
        (who["tenant"].as_str(), who["env"].as_str()),
        (Some("acme"), Some("test"))
    );
    assert!(who["expiresAt"].is_string());
    assert_eq!(status(&app, &token, "/v1/keys"), 200);
    // Defaults: tenant `default`, env `live`; no `scope` claim grants no scope.
    let bare = hs256(&claims("bob", json!({})));
    let who = app.client(&bare).whoami().unwrap();
    assert_eq!(
        (who["tenant"].as_str(), who["env"].as_str()),
        (Some("default"), Some("live"))
    );
    assert_eq!(who["scopes"], json!([]));
    let body = assert_error(&app.get(Some(&bare), "/v1/keys"), 403, "FORBIDDEN");
    assert_eq!(body["error"]["requiredScope"], "keys:read");
    // Within the 30 s leeway an expired token still passes.
    let just_expired = hs256(&claims("carol", json!({"exp": now() - 10})));
    assert_eq!(status(&app, &just_expired, "/v1/auth/whoami"), 200);

    let audit = app.admin().audit(&[("limit", "1000")]).unwrap().to_string();
    assert!(audit.contains("jwt_alice@example.com") && audit.contains("jwt_bob"));
    for t in [&token, &bare, &just_expired] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!audit.contains(signature), "a token reached the audit log");
    }
}

#[test]
fn invalid_hs256_tokens_are_401() {
    let app = with_secret(|j| {
        j.issuer = Some("https://issuer.example".into());
        j.audience = vec!["sandgate".into()];
    });
    let good = json!({"iss": "https://issuer.example", "aud": "sandgate"});
    let ok = hs256(&claims("dave", good.clone()));
    assert_eq!(status(&app, &ok, "/v1/auth/whoami"), 200);
    let with = |extra: Value| {
        let mut c = claims("dave", good.clone());
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let mut no_exp = with(json!({}));
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_aud = with(json!({}));
    no_aud.as_object_mut().unwrap().remove("aud");
    let other_secret = EncodingKey::from_secret(b"another-secret-another-secret-another");
    let alg_none = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        B64.encode(with(json!({})).to_string())
    );
    let unsigned = format!("{}x", &alg_none[..alg_none.len() - 1]);
    let cases = [
        ("expired", hs256(&with(json!({"exp": now() - 120})))),
        ("not yet valid", hs256(&with(json!({"nbf": now() + 120})))),
        ("no exp", hs256(&no_exp)),
        (
            "wrong issuer",
            hs256(&with(json!({"iss": "https://evil.example"}))),
        ),
        ("wrong audience", hs256(&with(json!({"aud": "other"})))),
        ("no audience", hs256(&no_aud)),
        (
            "wrong signature",
            sign(Algorithm::HS256, None, &other_secret, &with(json!({}))),
        ),
        ("alg none", alg_none),
        ("alg none with junk signature", unsigned),
        (
            "unknown scope",
            hs256(&with(json!({"scope": "sandbox:reed"}))),
        ),
        ("bad env", hs256(&with(json!({"env": "prod"})))),
        ("no sub", {
            let mut c = with(json!({}));
            c.as_object_mut().unwrap().remove("sub");
            hs256(&c)
        }),
        ("HS384", {
            let key = EncodingKey::from_secret(SECRET.as_bytes());
            sign(Algorithm::HS384, None, &key, &with(json!({})))
        }),
    ];
    for (what, token) in &cases {
        let response = app.get(Some(token), "/v1/auth/whoami");
        assert_eq!(response.status.as_u16(), 401, "{what}: {}", response.text());
        assert_error(&response, 401, "UNAUTHORIZED");
    }
    let audit = app.admin().audit(&[("limit", "1000")]).unwrap().to_string();
    assert!(
        audit.contains("jwt_expired") && audit.contains("jwt_bad_signature"),
        "{audit}"
    );
    for (_, token) in &cases {
        assert!(!audit.contains(token.as_str()));
    }
}

#[test]
fn stored_keys_environment_keys_and_jwts_never_shadow_each_other() {
    let callback = Http::start(|_| (200, "{}".into()));
    let jwt = jwt_config(|j| j.secret = Some(SecretKey::new(SECRET.into())));
    let app = TestApp::start_with(|c| {
        c.jwt = Some(jwt);
        c.env_api_keys = vec![SecretKey::new("env.client.key".into())];
        c.auth_callback = Some(AuthCallbackConfig::new(&callback.url));
    });
    let (stored, created) = app.create_key(json!({"name": "stored", "scopes": ["keys:read"]}));
    let key_id = created["id"].as_str().unwrap().to_owned();
    // A JWT whose subject is the stored key's id is still a JWT.
    let token = hs256(&claims(&key_id, json!({"scope": "sandbox:read"})));
    assert_eq!(
        app.client(&token).whoami().unwrap()["keyId"],
        format!("jwt_{key_id}")
    );
    assert_eq!(
        app.client(&stored).whoami().unwrap()["keyId"],
        key_id.as_str()
    );
    // An environment key shaped like a token is found as an environment key.
    assert!(
        app.client("env.client.key").whoami().unwrap()["keyId"]
            .as_str()
            .unwrap()
            .starts_with("env_")
    );
    // A revoked stored key stays refused; nothing further is asked.
    app.admin()
        .raw(Method::DELETE, &format!("/v1/keys/{key_id}"), &[], None)
        .unwrap();
    assert_error(
        &app.get(Some(&stored), "/v1/auth/whoami"),
        401,
        "KEY_EXPIRED",
    );
    // A token signed with our secret but expired is refused by the JWT source:
    // the callback is never asked about it.
    let expired = hs256(&claims("erin", json!({"exp": now() - 120})));
    assert_error(
        &app.get(Some(&expired), "/v1/auth/whoami"),
        401,
        "UNAUTHORIZED",
    );
    assert_eq!(callback.count(), 0);
    // One the JWT source cannot vouch for (not our signature) goes on to the callback.
    let foreign = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"someone-elses-secret-someone-elses"),
        &claims("frank", json!({})),
    );
    let who = app.client(&foreign).whoami().unwrap();
    assert!(who["keyId"].as_str().unwrap().starts_with("callback_"));
    assert_eq!(callback.count(), 1);
}

/// A tiny HTTP server that answers every request with `reply(path)`, one request a
/// connection, and counts them.
struct Http {
    url: String,
    count: Arc<AtomicUsize>,
}

impl Http {
    fn start(reply: impl Fn(&str) -> (u16, String) + Send + Sync + 'static) -> Http {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        let reply = Arc::new(reply);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (counter, reply) = (Arc::clone(&counter), Arc::clone(&reply));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap_or(0);
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let mut length = 0;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    let _ = std::io::Read::read_exact(&mut reader, &mut body);
                    counter.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = reply(&path);
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let mut stream = stream;
                    let _ = stream.write_all(response.as_bytes());
                });
            }
        });
        Http { url, count }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// A JWKS endpoint whose keys and availability the test changes.
struct JwksServer {
    http: Http,
    keys: Arc<Mutex<Vec<Value>>>,
    down: Arc<AtomicBool>,
}

impl JwksServer {
    fn start(keys: Vec<Value>, delay: Duration) -> JwksServer {
        let keys = Arc::new(Mutex::new(keys));
        let down = Arc::new(AtomicBool::new(false));
        let (k, d) = (Arc::clone(&keys), Arc::clone(&down));
        let http = Http::start(move |_| {
            std::thread::sleep(delay);
            if d.load(Ordering::SeqCst) {
                return (503, "down".into());
            }
            (200, json!({"keys": *k.lock().unwrap()}).to_string())
        });
        JwksServer { http, keys, down }
    }
}

/// An Ed25519 key pair: its signing key and its public JWK.
fn ed25519(kid: &str) -> (EncodingKey, Value) {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": B64.encode(pair.public_key().as_ref()), "kid": kid, "use": "sig"});
    (EncodingKey::from_ed_der(pkcs8.as_ref()), jwk)
}

/// A P-256 key pair: its signing key and its public JWK.
fn p256(kid: &str) -> (EncodingKey, Value) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..]), "kid": kid, "alg": "ES256"});
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

fn with_jwks(url: &str, tweak: impl FnOnce(&mut JwtConfig)) -> TestApp {
    let jwt = jwt_config(|j| {
        j.jwks_url = Some(url.to_owned());
        tweak(j);
    });
    TestApp::start_with(|c| c.jwt = Some(jwt))
}

#[test]
fn jwks_keys_verify_their_own_algorithm_and_rotation_refetches_once() {
    let (ed_key, ed_jwk) = ed25519("ed-1");
    let (ec_key, ec_jwk) = p256("ec-1");
    let rsa_jwk = json!({"kty": "RSA", "n": RSA_N, "e": "AQAB", "kid": "rsa-1", "alg": "RS256"});
    let jwks = JwksServer::start(vec![ed_jwk.clone(), ec_jwk, rsa_jwk], Duration::ZERO);
    let app = with_jwks(&jwks.http.url, |j| {
        j.jwks_min_refresh = Duration::from_millis(200)
    });
    assert_eq!(jwks.http.count(), 1, "fetched once at start");
    let c = claims("svc", json!({"scope": "sandbox:read"}));
    let ed_token = sign(Algorithm::EdDSA, Some("ed-1"), &ed_key, &c);
    let ec_token = sign(Algorithm::ES256, Some("ec-1"), &ec_key, &c);
    let who = app.client(&ed_token).whoami().unwrap();
    assert_eq!(who["keyId"], "jwt_svc");
    assert_eq!(status(&app, &ec_token, "/v1/auth/whoami"), 200);
    assert_eq!(jwks.http.count(), 1, "served from the cache");

    // The algorithm comes from the key: another algorithm, or an HS256 token
    // "signed" with a public key's bytes, is refused.
    let ed_as_es = sign(Algorithm::ES256, Some("ed-1"), &ec_key, &c);
    let rsa_pem_as_secret = hs256_with_raw_key(
        &json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}),
        &c,
        RSA_PUBLIC_PEM.as_bytes(),
    );
    let rsa_n_as_secret = hs256_with_raw_key(
        &json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}),
        &c,
        &B64.decode(RSA_N).unwrap(),
    );
    let ed_x_as_secret = hs256_with_raw_key(
        &json!({"alg": "HS256", "kid": "ed-1"}),
        &c,
        ed_jwk["x"].as_str().unwrap().as_bytes(),
    );
    for forged in [
        &ed_as_es,
        &rsa_pem_as_secret,
        &rsa_n_as_secret,
        &ed_x_as_secret,
    ] {
        assert_error(
            &app.get(Some(forged), "/v1/auth/whoami"),
            401,
            "UNAUTHORIZED",
        );
    }

    // Rotation: a new kid appears; the first token that names it causes one fetch.
    let (new_key, new_jwk) = ed25519("ed-2");
    jwks.keys.lock().unwrap().push(new_jwk);
    std::thread::sleep(Duration::from_millis(250));
    let fetches = jwks.http.count();
    let new_token = sign(Algorithm::EdDSA, Some("ed-2"), &new_key, &c);
    assert_eq!(status(&app, &new_token, "/v1/auth/whoami"), 200);
    assert_eq!(jwks.http.count(), fetches + 1);
    assert_eq!(status(&app, &new_token, "/v1/auth/whoami"), 200);
    assert_eq!(jwks.http.count(), fetches + 1);

    // The JWKS goes down: cached keys keep working; an unknown kid is 401, not a hang.
    jwks.down.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(250));
    let (stranger, _) = ed25519("ed-3");
    let unknown = sign(Algorithm::EdDSA, Some("ed-3"), &stranger, &c);
    assert_error(
        &app.get(Some(&unknown), "/v1/auth/whoami"),
        401,
        "UNAUTHORIZED",
    );
    assert_eq!(jwks.http.count(), fetches + 2, "one failed refresh");
    assert_eq!(status(&app, &ed_token, "/v1/auth/whoami"), 200);
    assert_eq!(status(&app, &new_token, "/v1/auth/whoami"), 200);
}

#[test]
fn a_burst_of_unknown_kids_causes_one_jwks_fetch() {
    let (key, jwk) = ed25519("known");
    let jwks = JwksServer::start(vec![jwk], Duration::from_millis(300));
    let app = with_jwks(&jwks.http.url, |j| {
        j.jwks_min_refresh = Duration::from_secs(2)
    });
    assert_eq!(jwks.http.count(), 1);
    std::thread::sleep(Duration::from_millis(2100));
    let url = app.url.clone();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (url, key) = (url.clone(), key.clone());
            std::thread::spawn(move || {
                let token = sign(
                    Algorithm::EdDSA,
                    Some(&format!("unknown-{i}")),
                    &key,
                    &claims("burst", json!({})),
                );
                sandgate_client::Client::new(&url, Some(token))
                    .raw(Method::GET, "/v1/auth/whoami", &[], None)
                    .unwrap()
                    .status
                    .as_u16()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 401);
    }
    let fetches = jwks.http.count();
    assert!(
        (2..=3).contains(&fetches),
        "{fetches} JWKS fetches for one burst"
    );
    let known = sign(
        Algorithm::EdDSA,
        Some("known"),
        &key,
        &claims("ok", json!({})),
    );
    assert_eq!(status(&app, &known, "/v1/auth/whoami"), 200);
}

#[test]
fn an_unreachable_jwks_is_401_and_the_server_still_starts() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", dead.local_addr().unwrap());
    drop(dead);
    let app = with_jwks(&url, |j| j.jwks_timeout = Duration::from_millis(500));
    let (key, _) = ed25519("k");
    let token = sign(Algorithm::EdDSA, Some("k"), &key, &claims("x", json!({})));
    assert_error(
        &app.get(Some(&token), "/v1/auth/whoami"),
        401,
        "UNAUTHORIZED",
    );
    assert!(app.admin().whoami().is_ok(), "stored keys are unaffected");
}
