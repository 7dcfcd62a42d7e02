//! The JSON shapes of `/v1/webhooks` and of the events delivered, with validation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::EVENT_TYPES;
use crate::keys::api::{InvalidField, invalid};
use crate::model::{Timestamp, WebhookRecord};

/// Longest accepted webhook URL.
const MAX_URL_LEN: usize = 2048;

/// `POST /v1/webhooks`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// An `http` or `https` URL; it must resolve to public addresses unless the
    /// server allows private ones.
    pub url: String,
    /// Event types to receive (`key.created`, `quota.exceeded`, …), or `*` for all.
    pub events: Vec<String>,
}

/// A webhook as listed. Never carries the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: Timestamp,
}

impl From<&WebhookRecord> for WebhookView {
    fn from(r: &WebhookRecord) -> WebhookView {
        WebhookView {
            id: r.id.clone(),
            url: r.url.clone(),
            events: r.events.clone(),
            created_at: r.created_at,
        }
    }
}

/// The answer to creation: the webhook plus its signing secret, shown only here.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// Signs every delivery (`Sandgate-Signature`). Shown only in this response.
    pub secret: String,
}

/// The body of every delivery.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `evt_…`; the same on every retry of a delivery.
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub created_at: Timestamp,
    pub data: serde_json::Value,
}

/// A webhook URL that parsed: scheme `http`/`https`, a host, its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub url: String,
    pub host: String,
    pub port: u16,
}

pub fn validate_url(url: &str) -> Result<WebhookUrl, InvalidField> {
    let url = url.trim();
    if url.len() > MAX_URL_LEN {
        return Err(invalid(
            "url",
            format!("url must be at most {MAX_URL_LEN} characters"),
        ));
    }
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|_| invalid("url", "url is not a valid URL"))?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Err(invalid("url", "url must be an http or https URL")),
    };
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| invalid("url", "url must name a host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("url", "url must not carry credentials"));
    }
    Ok(WebhookUrl {
        url: url.to_owned(),
        host: authority.host().to_owned(),
        port: authority.port_u16().unwrap_or(default_port),
    })
}

/// Known types or `*`, at least one; duplicates dropped, order kept.
pub fn validate_events(events: Vec<String>) -> Result<Vec<String>, InvalidField> {
    if events.is_empty() {
        return Err(invalid(
            "events",
            "events must name at least one event type",
        ));
    }
    let mut kept: Vec<String> = Vec::with_capacity(events.len());
    for e in events {
        let e = e.trim().to_owned();
        if e != "*" && !EVENT_TYPES.contains(&e.as_str()) {
            return Err(invalid(
                "events",
                format!(
                    "unknown event type `{e}`; known: *, {}",
                    EVENT_TYPES.join(", ")
                ),
            ));
        }
        if !kept.contains(&e) {
            kept.push(e);
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http_with_a_host() {
        let ok = validate_url("https://hooks.example.com/in?x=1").unwrap();
        assert_eq!((ok.host.as_str(), ok.port), ("hooks.example.com", 443));
        assert_eq!(validate_url("http://[::1]:8080/").unwrap().port, 8080);
        for bad in [
            "",
            "hooks.example.com/in",
            "ftp://example.com/",
            "http://",
            "not a url",
            "https://user:pw@example.com/",
        ] {
            assert_eq!(validate_url(bad).unwrap_err().field, "url", "{bad}");
        }
    }

    #[test]
    fn events_are_known_types_or_star() {
        assert_eq!(
            validate_events(vec!["key.created".into(), "*".into(), "key.created".into()]).unwrap(),
            ["key.created", "*"]
        );
        assert_eq!(validate_events(vec![]).unwrap_err().field, "events");
        assert_eq!(
            validate_events(vec!["key.nope".into()]).unwrap_err().field,
            "events"
        );
    }
}
