//! `TestApp`: a real sandgate server on port 0 with its own data dir, driven
//! through the public HTTP API by the blocking client.

use std::thread::JoinHandle;

use sandgate_client::{Client, Method, RawResponse};
use sandgate_server::{AppState, ServerConfig, TlsFiles};
use serde_json::{Value, json};

pub struct TestApp {
    pub url: String,
    pub admin_key: String,
    /// The self-signed certificate of a TLS server.
    ca_pem: Option<Vec<u8>>,
    /// Removed when the app is dropped.
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestApp {
    pub fn start() -> TestApp {
        TestApp::start_with(|_| {})
    }

    /// Starts a server whose configuration `tweak` may change.
    pub fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestApp {
        TestApp::start_inner(tweak, false)
    }

    /// A server speaking HTTPS with a fresh self-signed certificate for 127.0.0.1.
    pub fn start_tls() -> TestApp {
        TestApp::start_inner(|_| {}, true)
    }

    fn start_inner(tweak: impl FnOnce(&mut ServerConfig), tls: bool) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = tls.then(|| {
            let cert =
                rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                    .expect("self-signed certificate");
            let files = TlsFiles {
                cert: dir.path().join("cert.pem"),
                key: dir.path().join("key.pem"),
            };
            std::fs::write(&files.cert, cert.cert.pem()).unwrap();
            std::fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();
            (files, cert.cert.pem().into_bytes())
        });
        let ca_pem = tls.as_ref().map(|(_, pem)| pem.clone());
        let tls_files = tls.map(|(files, _)| files);
        let mut config = ServerConfig::new(dir.path());
        config.key_sync_interval = std::time::Duration::from_millis(100);
        config.usage_flush_interval = std::time::Duration::from_millis(200);
        config.expiry_sweep_interval = std::time::Duration::from_millis(200);
        // Small warm pools: every test starts its own server.
        config.sandbox_limits.warm_pool = 2;
        config.exec_limits.warm_pool = 2;
        tweak(&mut config);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let state = AppState::open(config).await.expect("open state");
                let admin = state
                    .keys()
                    .bootstrap_admin()
                    .await
                    .expect("bootstrap")
                    .expect("empty store gets an admin key");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("addr");
                ready_tx.send((addr, admin.secret)).expect("report ready");
                let shutdown = async {
                    let _ = stopped.await;
                };
                match tls_files {
                    Some(files) => {
                        sandgate_server::run_tls(listener, state, &files, shutdown).await
                    }
                    None => sandgate_server::run(listener, state, shutdown).await,
                }
                .expect("serve");
            });
        });
        let (addr, admin_key) = ready_rx.recv().expect("server started");
        let scheme = if ca_pem.is_some() { "https" } else { "http" };
        TestApp {
            url: format!("{scheme}://{addr}"),
            ca_pem,
            admin_key,
            _dir: dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The server's data dir (for tests that try to reach it from a jail).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Runs `code` with the admin key; the response body.
    pub fn run(&self, language: &str, code: &str) -> Value {
        self.admin()
            .execute(&json!({"language": language, "code": code}))
            .expect("execute")
    }

    pub fn admin(&self) -> Client {
        self.make_client(Some(self.admin_key.clone()))
    }

    pub fn anonymous(&self) -> Client {
        self.make_client(None)
    }

    pub fn client(&self, key: &str) -> Client {
        self.make_client(Some(key.to_owned()))
    }

    fn make_client(&self, key: Option<String>) -> Client {
        match &self.ca_pem {
            Some(pem) => Client::with_ca_pem(&self.url, key, pem).expect("CA"),
            None => Client::new(&self.url, key),
        }
    }

    /// Creates a key with the admin key; returns (plaintext, key object).
    pub fn create_key(&self, body: Value) -> (String, Value) {
        let created = self.admin().create_key(&body).expect("create key");
        let key = created["key"].as_str().expect("plaintext key").to_owned();
        (key, created)
    }

    /// A key with exactly these scopes, in tenant `default`, env `live`.
    pub fn key_with(&self, scopes: &[&str]) -> String {
        self.create_key(json!({ "name": "t", "scopes": scopes })).0
    }

    pub fn get(&self, key: Option<&str>, path: &str) -> RawResponse {
        let client = match key {
            Some(k) => self.client(k),
            None => self.anonymous(),
        };
        client.raw(Method::GET, path, &[], None).expect("request")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `POST` with a JSON body, whatever the answer.
pub trait PostJson {
    fn post_json(&self, path: &str, body: &Value) -> RawResponse;
}

impl PostJson for Client {
    fn post_json(&self, path: &str, body: &Value) -> RawResponse {
        let bytes = serde_json::to_vec(body).expect("JSON");
        self.raw(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            Some(&bytes),
        )
        .expect("request")
    }
}

/// Host processes whose command line contains `marker` (jailed processes are
/// host processes too, so a leaked one shows here).
pub fn processes_named(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(marker))
        .count()
}

/// Whether this machine can jail programs (root, cgroup v1); tests of runs say
/// they were skipped when it cannot.
pub fn jail_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(
        || match sandgate_jail::Jail::new(sandgate_jail::Config::default()) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipped: programs cannot be jailed here: {e}");
                false
            }
        },
    )
}

/// Asserts an error response's status and SPEC code, and that it carries a request id.
#[track_caller]
pub fn assert_error(response: &RawResponse, status: u16, code: &str) -> Value {
    let body = response.json();
    assert_eq!(
        response.status.as_u16(),
        status,
        "unexpected status; body: {}",
        response.text()
    );
    assert_eq!(body["error"]["code"], code, "body: {body}");
    let request_id = body["error"]["requestId"].as_str().expect("requestId");
    assert_eq!(response.header("x-request-id"), Some(request_id));
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    body
}
