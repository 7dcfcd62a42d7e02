//! Webhooks (SPEC §6): tenants register URLs, and the events of their tenant and
//! env are POSTed there, signed, retried with backoff, delivered at least once.
//!
//! The request path never makes an HTTP call: emitting an event writes one
//! delivery row per subscribed webhook (durable before the request answers) and
//! wakes the [`delivery`] worker, which does the sending. Rows survive restarts; a
//! delivery claimed by a worker that dies is retried when its lease ends.
//!
//! This module must not log a webhook secret, a key, or an event body.

use async_trait::async_trait;

use crate::model::Env;

pub mod api;
pub mod delivery;
pub mod destination;
pub mod service;
pub mod signature;

pub use service::{WebhookError, WebhookService};

/// Every event type a webhook may subscribe to (besides `*`).
pub const EVENT_TYPES: &[&str] = &[
    "key.created",
    "key.updated",
    "key.rotated",
    "key.revoked",
    "key.expired",
    "key.expiring",
    "quota.exceeded",
    "sandbox.created",
    "sandbox.killed",
];

/// Where domain services announce events. `tenant` and `env` are those of the
/// event's subject: only that partition's webhooks receive it.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Never fails the caller: an event that cannot be queued is logged.
    async fn emit(&self, tenant: &str, env: Env, event_type: &str, data: serde_json::Value);
}
