//! A blocking HTTP client of sandgate's public API, used by the CLI and the tests.
//!
//! Bodies are `serde_json::Value`: the CLI prints them and tests inspect them, and
//! this crate stays free of the server's types. Error responses become
//! [`ClientError::Api`] with the SPEC's code, message and request id.

use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{RootCerts, TlsConfig};

use serde_json::{Value, json};
pub use ureq::http::{HeaderMap, Method, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{code}: {message} (status {status}, request {request_id})")]
    Api {
        status: u16,
        code: String,
        message: String,
        request_id: String,
        body: Value,
    },
    #[error("could not reach sandgate: {0}")]
    Transport(String),
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl ClientError {
    /// The SPEC error code, for API errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A response as received: status, headers, raw body.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as JSON (`null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON when the status is a success, else the API error.
    pub fn into_result(self) -> Result<Value, ClientError> {
        let body = self.json();
        if self.status.is_success() {
            return Ok(body);
        }
        let error = &body["error"];
        Err(ClientError::Api {
            status: self.status.as_u16(),
            code: error["code"].as_str().unwrap_or("UNKNOWN").to_owned(),
            message: error["message"]
                .as_str()
                .map_or_else(|| self.text(), str::to_owned),
            request_id: error["requestId"].as_str().unwrap_or("").to_owned(),
            body,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the server at `base_url` (e.g. `http://127.0.0.1:8080`); for
    /// `https://`, the server's certificate must chain to a public root.
    pub fn new(base_url: &str, key: Option<String>) -> Client {
        Client::build(base_url, key, RootCerts::WebPki)
    }

    /// Like [`Client::new`], trusting only the CA certificates in `ca_pem` for HTTPS
    /// (a private CA or a self-signed server certificate).
    pub fn with_ca_pem(
        base_url: &str,
        key: Option<String>,
        ca_pem: &[u8],
    ) -> Result<Client, ClientError> {
        let certs = ureq::tls::parse_pem(ca_pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(ClientError::Transport(format!(
                    "bad CA certificate: {e}"
                )))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if certs.is_empty() {
            return Err(ClientError::Transport(
                "no certificate in the CA file".into(),
            ));
        }
        Ok(Client::build(
            base_url,
            key,
            RootCerts::Specific(Arc::new(certs)),
        ))
    }

    fn build(base_url: &str, key: Option<String>, roots: RootCerts) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .build();
        Client {
            base: base_url.trim_end_matches('/').to_owned(),
            key,
            agent: config.into(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The same server, another credential.
    pub fn with_key(&self, key: impl Into<String>) -> Client {
        Client {
            key: Some(key.into()),
            ..self.clone()
        }
    }

    /// Sends any request; the key goes in `Authorization: Bearer` unless `headers`
    /// already carry a credential. Never fails on an HTTP error status.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ClientError> {
        let mut builder = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        let has_credential = headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("authorization") || k.eq_ignore_ascii_case("x-api-key")
        });
        if let (Some(key), false) = (&self.key, has_credential) {
            builder = builder.header("Authorization", format!("Bearer {key}"));
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let body = body.unwrap_or_default().to_vec();
        if !body.is_empty() {
            builder = builder.header("Content-Type", "application/json");
        }
        let request = builder
            .body(body)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let mut response = self
            .agent
            .run(request)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// `POST /v1/sandboxes/{id}/exec` streaming: calls `on_event` with each ndjson
    /// event as it arrives (`stdout`, `stderr`) and returns the final `exit` event.
    pub fn exec_stream(
        &self,
        id: &str,
        request: &Value,
        mut on_event: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        use std::io::BufRead;
        let body =
            serde_json::to_vec(request).map_err(|e| ClientError::Transport(e.to_string()))?;
        let mut builder = ureq::http::Request::builder()
            .method(Method::POST)
            .uri(format!("{}/v1/sandboxes/{}/exec", self.base, encode(id)))
            .header("Content-Type", "application/json")
            .header("Accept", "application/x-ndjson");
        if let Some(key) = &self.key {
            builder = builder.header("Authorization", format!("Bearer {key}"));
        }
        let request = builder
            .body(body)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let response = self
            .agent
            .run(request)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if !response.status().is_success() {
            let status = response.status();
            let headers = response.headers().clone();
            let body = response
                .into_body()
                .read_to_vec()
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            return RawResponse {
                status,
                headers,
                body,
            }
            .into_result();
        }
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| ClientError::Transport(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let event: Value =
                serde_json::from_str(&line).map_err(|e| ClientError::Transport(e.to_string()))?;
            match event["type"].as_str() {
                Some("exit") => return Ok(event),
                Some("error") => {
                    return Err(ClientError::Transport(format!(
                        "the exec failed on the server: {}",
                        event["error"]
                    )));
                }
                _ => on_event(&event),
            }
        }
        Err(ClientError::Transport(
            "the stream ended without an exit event".into(),
        ))
    }

    /// A JSON request; the decoded body on success, the API error otherwise.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON values serialize"));
        self.raw(method, path, &[], bytes.as_deref())?.into_result()
    }

    pub fn health(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/healthz", None)
    }

    pub fn whoami(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/auth/whoami", None)
    }

    /// `POST /v1/execute`: runs code once (SPEC §3).
    pub fn execute(&self, request: &Value) -> Result<Value, ClientError> {
        self.call(Method::POST, "/v1/execute", Some(request))
    }

    /// `GET /v1/keys/audit`: keys unused, expiring, or refused unusually often.
    pub fn review_keys(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/keys/audit", None)
    }

    pub fn languages(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/languages", None)
    }

    pub fn create_key(&self, request: &Value) -> Result<Value, ClientError> {
        self.call(Method::POST, "/v1/keys", Some(request))
    }

    pub fn list_keys(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/keys", None)
    }

    pub fn get_key(&self, id: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, &format!("/v1/keys/{}", encode(id)), None)
    }

    pub fn update_key(&self, id: &str, patch: &Value) -> Result<Value, ClientError> {
        self.call(
            Method::PATCH,
            &format!("/v1/keys/{}", encode(id)),
            Some(patch),
        )
    }

    pub fn revoke_key(&self, id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/v1/keys/{}", encode(id)), None)
            .map(drop)
    }

    pub fn rotate_key(
        &self,
        id: &str,
        grace_period_sec: Option<u64>,
    ) -> Result<Value, ClientError> {
        let body = match grace_period_sec {
            Some(g) => json!({ "gracePeriodSec": g }),
            None => json!({}),
        };
        self.call(
            Method::POST,
            &format!("/v1/keys/{}/rotate", encode(id)),
            Some(&body),
        )
    }

    pub fn reset_executions(&self, id: &str, remaining: Option<u64>) -> Result<Value, ClientError> {
        let body = match remaining {
            Some(n) => json!({ "remaining": n }),
            None => json!({}),
        };
        self.call(
            Method::POST,
            &format!("/v1/keys/{}/reset-executions", encode(id)),
            Some(&body),
        )
    }

    /// `GET /v1/audit` with query parameters.
    pub fn audit(&self, params: &[(&str, &str)]) -> Result<Value, ClientError> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let path = if query.is_empty() {
            "/v1/audit".to_owned()
        } else {
            format!("/v1/audit?{}", query.join("&"))
        };
        self.call(Method::GET, &path, None)
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_reserved_characters() {
        assert_eq!(encode("key_ab/../c d"), "key_ab%2F..%2Fc%20d");
    }
}
