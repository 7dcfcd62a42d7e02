//! The audit log: every authentication attempt and every key lifecycle event.
//!
//! Authentication attempts go through [`AuditLog::record`] into a bounded queue that
//! one writer drains in batches, so the hot path never waits on a disk write (it
//! waits only if the queue is full: back-pressure, never a dropped row). A queued
//! [`AuthAttempt`] holds what the request already had (the principal by reference
//! count, fixed words, the shared request id) and becomes columns only in the store,
//! so recording one copies no key field. Lifecycle events are not queued: the key
//! service writes them in the same transaction as the change.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::model::{AuditRecord, Env, Outcome, Timestamp};
use crate::principal::Principal;
use crate::store::AuditStore;

const QUEUE_CAPACITY: usize = 65_536;
const MAX_BATCH: usize = 2_048;
/// How long the writer lets a batch grow before writing it (unless a flush is
/// waiting): under load this turns thousands of small commits a second into a few
/// hundred large ones. A crash can lose only rows this young or still queued.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// One authentication attempt, allowed or denied, as the request saw it.
#[derive(Debug, Clone)]
pub struct AuthAttempt {
    pub time: Timestamp,
    pub request_id: Arc<str>,
    pub client_ip: IpAddr,
    /// Standard methods are borrowed words.
    pub method: Cow<'static, str>,
    /// Borrowed from the route table when the path is a route without parameters.
    pub path: Cow<'static, str>,
    /// The key presented, when it is known (even when refused as expired or revoked):
    /// the row's key id, prefix, tenant and env come from it.
    pub key: Option<Arc<Principal>>,
    /// Without a known key: the prefix of a credential shaped like a sandgate key.
    pub presented_prefix: Option<String>,
    /// Without a known key: a fingerprint naming the credential (JWT, auth callback).
    pub subject: Option<String>,
    pub outcome: Outcome,
    pub reason: Option<&'static str>,
}

impl AuthAttempt {
    pub fn key_id(&self) -> Option<&str> {
        match &self.key {
            Some(p) => Some(&p.key_id),
            None => self.subject.as_deref(),
        }
    }

    pub fn key_prefix(&self) -> Option<&str> {
        self.key
            .as_ref()
            .and_then(|p| p.key_prefix.as_deref())
            .or(self.presented_prefix.as_deref())
    }

    pub fn tenant(&self) -> Option<&str> {
        self.key.as_ref().map(|p| p.tenant.as_str())
    }

    pub fn env(&self) -> Option<Env> {
        self.key.as_ref().map(|p| p.env)
    }

    /// The row as the audit listing shows it (event `auth`).
    pub fn to_record(&self) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time: self.time,
            event: "auth".to_owned(),
            client_ip: Some(self.client_ip.to_string()),
            method: Some(self.method.clone().into_owned()),
            path: Some(self.path.clone().into_owned()),
            key_id: self.key_id().map(str::to_owned),
            key_prefix: self.key_prefix().map(str::to_owned),
            actor_key_id: None,
            tenant: self.tenant().map(str::to_owned),
            env: self.env(),
            outcome: self.outcome,
            reason: self.reason.map(str::to_owned),
            request_id: Some(self.request_id.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
}

#[derive(Debug)]
enum Message {
    Attempt(AuthAttempt),
    /// Answered once every attempt queued before it is written.
    Flush(oneshot::Sender<()>),
}

impl AuditLog {
    /// Starts the batch writer. Must be called inside a tokio runtime.
    pub fn start(store: Arc<dyn AuditStore>) -> AuditLog {
        let (tx, mut rx) = mpsc::channel::<Message>(QUEUE_CAPACITY);
        tokio::spawn(async move {
            let mut messages = Vec::with_capacity(MAX_BATCH);
            // Handed to the store and taken back after each write: a batch of this
            // size is a large allocation, not one to make and free hundreds of
            // times a second.
            let mut batch = Arc::new(Vec::with_capacity(MAX_BATCH));
            let mut flushes = Vec::new();
            while rx.recv_many(&mut messages, MAX_BATCH).await > 0 {
                let linger_until = tokio::time::Instant::now() + LINGER;
                let rows = Arc::make_mut(&mut batch);
                loop {
                    for m in messages.drain(..) {
                        match m {
                            Message::Attempt(a) => rows.push(a),
                            Message::Flush(done) => flushes.push(done),
                        }
                    }
                    if !flushes.is_empty() || rows.len() >= MAX_BATCH {
                        break;
                    }
                    let room = MAX_BATCH - rows.len();
                    match tokio::time::timeout_at(linger_until, rx.recv_many(&mut messages, room))
                        .await
                    {
                        Ok(n) if n > 0 => continue,
                        _ => break,
                    }
                }
                if !rows.is_empty() {
                    if let Err(e) = write_with_retry(&*store, &batch).await {
                        tracing::error!(error = %e, rows = batch.len(), "audit rows could not be written");
                    }
                    // The store has let go of it: this clears in place.
                    Arc::make_mut(&mut batch).clear();
                }
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        AuditLog { tx }
    }

    pub async fn record(&self, attempt: AuthAttempt) {
        if self.tx.send(Message::Attempt(attempt)).await.is_err() {
            tracing::error!("audit writer is gone; row not recorded");
        }
    }

    /// Waits until every attempt recorded before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write_with_retry(
    store: &dyn AuditStore,
    batch: &Arc<Vec<AuthAttempt>>,
) -> Result<(), crate::store::StoreError> {
    let mut delay = std::time::Duration::from_millis(50);
    for _ in 0..5 {
        match store.append_auth_attempts(Arc::clone(batch)).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "audit write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    store.append_auth_attempts(Arc::clone(batch)).await
}
