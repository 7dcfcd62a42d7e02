//! The webhook service: registration (validation, destination checks, tenant and
//! env partitioning) and event fan-out into durable delivery rows.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::EventSink;
use super::api::{self, CreateWebhookRequest, CreatedWebhook, Event, WebhookView};
use super::destination;
use crate::keys::api::{InvalidField, KeyView, invalid};
use crate::keys::format::{SecretKey, random_id};
use crate::model::{Env, EventRecord, Timestamp, WebhookRecord};
use crate::principal::{CredentialSource, Principal};
use crate::store::{StoreError, WebhookStore};

/// `key.expiring` is sent this long before a key's expiry.
pub const EXPIRING_NOTICE: Duration = Duration::from_secs(7 * 86_400);
/// At most one `quota.exceeded` per key in this window (per node): a client stuck
/// in a loop of refused runs must not flood its own receiver.
const QUOTA_EVENT_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook not found")]
    NotFound,
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct WebhookService {
    store: Arc<dyn WebhookStore>,
    /// `SANDGATE_WEBHOOK_ALLOW_PRIVATE`: loopback and private destinations allowed.
    allow_private: bool,
    /// Wakes the delivery worker when deliveries are queued.
    wake: Arc<Notify>,
    /// `once` markers known to be recorded, so sweeps skip them without a write.
    sent_once: Mutex<HashSet<String>>,
    /// When each key's last `quota.exceeded` was emitted.
    quota_events: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for WebhookService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookService")
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

impl WebhookService {
    pub fn new(store: Arc<dyn WebhookStore>, allow_private: bool) -> WebhookService {
        WebhookService {
            store,
            allow_private,
            wake: Arc::new(Notify::new()),
            sent_once: Mutex::new(HashSet::new()),
            quota_events: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> Arc<dyn WebhookStore> {
        Arc::clone(&self.store)
    }

    /// Notified whenever deliveries are queued.
    pub fn wake(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    pub fn allow_private(&self) -> bool {
        self.allow_private
    }

    // ---- registration ----

    /// Registers a webhook for the actor's own tenant and env.
    pub async fn create(
        &self,
        actor: &Principal,
        req: CreateWebhookRequest,
    ) -> Result<CreatedWebhook, WebhookError> {
        let url = api::validate_url(&req.url)?;
        let events = api::validate_events(req.events)?;
        if !self.allow_private {
            destination::check_host(&url.host, url.port)
                .await
                .map_err(|refused| invalid("url", format!("url is refused: {refused}")))?;
        }
        let record = WebhookRecord {
            id: random_id("wh_", 24),
            tenant: actor.tenant.clone(),
            env: actor.env,
            url: url.url,
            events,
            secret: SecretKey::new(random_id("whsec_", 32)),
            created_at: Timestamp::now(),
            created_by: (actor.source != CredentialSource::LocalOperator)
                .then(|| actor.key_id.clone()),
        };
        self.store.insert_webhook(&record).await?;
        Ok(CreatedWebhook {
            webhook: WebhookView::from(&record),
            secret: record.secret.expose().to_owned(),
        })
    }

    pub async fn list(&self, actor: &Principal) -> Result<Vec<WebhookView>, WebhookError> {
        let hooks = self.store.list_webhooks(&actor.tenant, actor.env).await?;
        Ok(hooks.iter().map(WebhookView::from).collect())
    }

    /// Deletes one of the actor's tenant and env; anyone else's is "not found".
    pub async fn delete(&self, actor: &Principal, id: &str) -> Result<(), WebhookError> {
        if self
            .store
            .delete_webhook(&actor.tenant, actor.env, id)
            .await?
        {
            Ok(())
        } else {
            Err(WebhookError::NotFound)
        }
    }

    // ---- events ----

    async fn enqueue(
        &self,
        tenant: &str,
        env: Env,
        event_type: &str,
        data: serde_json::Value,
        once: Option<&str>,
    ) -> Result<usize, StoreError> {
        let event = Event {
            id: random_id("evt_", 24),
            event_type: event_type.to_owned(),
            created_at: Timestamp::now(),
            data,
        };
        let record = EventRecord {
            body: serde_json::to_string(&event).expect("plain data serializes"),
            id: event.id,
            event_type: event.event_type,
            created_at: event.created_at,
        };
        let queued = self.store.enqueue_event(tenant, env, &record, once).await?;
        if queued > 0 {
            self.wake.notify_one();
        }
        Ok(queued)
    }

    /// `quota.exceeded` for a run refused because the key's executions are used up.
    pub async fn quota_exceeded(&self, caller: &Principal, key: Option<KeyView>) {
        {
            let mut last = self.quota_events.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if last
                .get(&caller.key_id)
                .is_some_and(|t| now.duration_since(*t) < QUOTA_EVENT_INTERVAL)
            {
                return;
            }
            last.retain(|_, t| now.duration_since(*t) < QUOTA_EVENT_INTERVAL);
            last.insert(caller.key_id.clone(), now);
        }
        let data = match key {
            Some(view) => serde_json::json!({ "key": view }),
            None => serde_json::json!({ "key": { "id": caller.key_id, "name": caller.name } }),
        };
        self.emit(&caller.tenant, caller.env, "quota.exceeded", data)
            .await;
    }

    /// `key.expiring`, once per key and expiry time, for keys expiring within
    /// [`EXPIRING_NOTICE`]. Durable: the "sent" marker commits with the deliveries.
    pub async fn keys_expiring(&self, keys: Vec<KeyView>) -> Result<(), StoreError> {
        for key in keys {
            let Some(expires_at) = key.expires_at else {
                continue;
            };
            let marker = format!("key.expiring:{}:{}", key.id, expires_at.millis());
            if self
                .sent_once
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&marker)
            {
                continue;
            }
            let (tenant, env) = (key.tenant.clone(), key.env);
            let data = serde_json::json!({ "key": key });
            self.enqueue(&tenant, env, "key.expiring", data, Some(&marker))
                .await?;
            self.sent_once
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(marker);
        }
        Ok(())
    }
}

#[async_trait]
impl EventSink for WebhookService {
    async fn emit(&self, tenant: &str, env: Env, event_type: &str, data: serde_json::Value) {
        if let Err(e) = self.enqueue(tenant, env, event_type, data, None).await {
            tracing::error!(error = %e, event_type, "webhook event could not be queued");
        }
    }
}
