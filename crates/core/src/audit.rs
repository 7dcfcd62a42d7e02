//! The audit log: every authentication attempt and every key lifecycle event.
//!
//! Authentication rows go through [`AuditLog::record`] into a bounded queue that one
//! writer drains in batches, so the hot path never waits on a disk write (it waits
//! only if the queue is full: back-pressure, never a dropped row). Lifecycle events
//! are not queued: the key service writes them in the same transaction as the change.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::model::AuditRecord;
use crate::store::AuditStore;

const QUEUE_CAPACITY: usize = 65_536;
const MAX_BATCH: usize = 2_048;
/// How long the writer lets a batch grow before writing it (unless a flush is
/// waiting): under load this turns thousands of small commits a second into a few
/// hundred large ones. A crash can lose only rows this young or still queued.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
}

#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "rows are nearly every message; boxing each would cost an allocation"
)]
enum Message {
    Row(AuditRecord),
    /// Answered once every row queued before it is written.
    Flush(oneshot::Sender<()>),
}

impl AuditLog {
    /// Starts the batch writer. Must be called inside a tokio runtime.
    pub fn start(store: Arc<dyn AuditStore>) -> AuditLog {
        let (tx, mut rx) = mpsc::channel::<Message>(QUEUE_CAPACITY);
        tokio::spawn(async move {
            let mut messages = Vec::with_capacity(MAX_BATCH);
            let mut rows = Vec::with_capacity(MAX_BATCH);
            let mut flushes = Vec::new();
            while rx.recv_many(&mut messages, MAX_BATCH).await > 0 {
                let linger_until = tokio::time::Instant::now() + LINGER;
                loop {
                    for m in messages.drain(..) {
                        match m {
                            Message::Row(row) => rows.push(row),
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
                    if let Err(e) = write_with_retry(&*store, &rows).await {
                        tracing::error!(error = %e, rows = rows.len(), "audit rows could not be written");
                    }
                    rows.clear();
                }
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        AuditLog { tx }
    }

    pub async fn record(&self, row: AuditRecord) {
        if self.tx.send(Message::Row(row)).await.is_err() {
            tracing::error!("audit writer is gone; row not recorded");
        }
    }

    /// Waits until every row recorded before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write_with_retry(
    store: &dyn AuditStore,
    batch: &[AuditRecord],
) -> Result<(), crate::store::StoreError> {
    let mut delay = std::time::Duration::from_millis(50);
    for _ in 0..5 {
        match store.append_audit(batch).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "audit write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    store.append_audit(batch).await
}
