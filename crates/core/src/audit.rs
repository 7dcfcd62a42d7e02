//! The audit log: every authentication attempt and every key lifecycle event.
//!
//! Authentication attempts go through [`AuditLog::record`] into a bounded queue (one
//! shard per thread) that one writer drains in batches, so the hot path never waits
//! on a disk write (it waits only if its shard is full: back-pressure, never a
//! dropped row). A queued
//! [`AuthAttempt`] holds what the request already had (the principal by reference
//! count, fixed words, the shared request id) and becomes columns only in the store,
//! so recording one copies no key field. Lifecycle events are not queued: the key
//! service writes them in the same transaction as the change.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{Notify, oneshot};

use crate::model::{AuditRecord, Env, Outcome, Timestamp};
use crate::principal::Principal;
use crate::request_id::RequestId;
use crate::shard::{self, Padded};
use crate::store::AuditStore;

const QUEUE_CAPACITY: usize = 65_536;
const MAX_BATCH: usize = 2_048;
/// How long the writer lets a batch grow before writing it (unless a flush is
/// waiting): under load this turns thousands of small commits a second into
/// fifty large ones. A write costs ~175 µs whatever its size (statements, the
/// log's frames, checkpoints): 20 ms instead of 5 took the writer from ~1.0 to
/// ~0.45 µs per authenticated request (perf, 2-CPU VM). A crash of the process
/// can lose only rows this young or still queued; a listing
/// ([`AuditLog::flush`]) and a graceful stop never wait for it.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);
/// How long a written batch may wait for the disk: batches are committed without
/// waiting for it (safe from a crash of this process at once), and made
/// durable against power loss by a sync at least this often, and by every
/// [`AuditLog::flush`]. One sync a second instead of one per batch is most of
/// what an attempt's row costs otherwise.
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One authentication attempt, allowed or denied, as the request saw it.
#[derive(Debug, Clone)]
pub struct AuthAttempt {
    pub time: Timestamp,
    pub request_id: RequestId,
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

/// The queue of attempts not yet written, and the writer that drains it.
///
/// Recording is a push under an uncontended lock: each thread has its own shard,
/// so two workers never touch one cache line, and only a push into an empty
/// shard wakes the writer (once per batch, not once per request). The writer
/// lets the batch grow for [`LINGER`], takes every shard, and writes; syncs
/// per [`SYNC_EVERY`].
#[derive(Debug, Clone)]
pub struct AuditLog {
    handle: Arc<Handle>,
}

/// Held by every clone of the [`AuditLog`]; its drop tells the writer to write
/// what is left and stop.
#[derive(Debug)]
struct Handle {
    queue: Arc<Queue>,
}

#[derive(Debug)]
struct Queue {
    /// One per thread ([`crate::shard`]).
    shards: Box<[Padded<Mutex<VecDeque<Queued>>>]>,
    /// The writer's doorbell: a shard became non-empty.
    wake: Notify,
    /// Rung when the writer should not let the batch grow: a shard is full, a
    /// flush is waiting, or the log is closing.
    hurry: Notify,
    /// Rung after the writer has taken the shards: room for waiting recorders.
    drained: Notify,
    flushes: Mutex<Vec<oneshot::Sender<()>>>,
    closed: AtomicBool,
}

/// An attempt and when it was queued, on the monotonic clock, stamped under its
/// shard's lock (so every shard is in that order): the writer merges the
/// shards by it, so a request answered before another began always has the
/// smaller seq.
#[derive(Debug)]
struct Queued {
    at: Instant,
    attempt: AuthAttempt,
}

/// Most attempts one shard holds before its recorders wait for the writer
/// (back-pressure, never a dropped row).
const SHARD_CAPACITY: usize = QUEUE_CAPACITY / shard::SHARDS;

impl AuditLog {
    /// Starts the batch writer. Must be called inside a tokio runtime.
    pub fn start(store: Arc<dyn AuditStore>) -> AuditLog {
        let queue = Arc::new(Queue {
            shards: shard::per_shard(),
            wake: Notify::new(),
            hurry: Notify::new(),
            drained: Notify::new(),
            flushes: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(write_batches(Arc::clone(&queue), store));
        AuditLog {
            handle: Arc::new(Handle { queue }),
        }
    }

    /// Queues `attempt`; waits only while this thread's shard is full.
    pub async fn record(&self, mut attempt: AuthAttempt) {
        let queue = &self.handle.queue;
        let shard = &queue.shards[shard::this_thread()];
        loop {
            let Some(back) = queue.try_push(shard, attempt) else {
                return;
            };
            attempt = back;
            let room = queue.drained.notified();
            tokio::pin!(room);
            // Registered before the check again: a drain after it is not missed.
            room.as_mut().enable();
            let Some(back) = queue.try_push(shard, attempt) else {
                return;
            };
            attempt = back;
            queue.hurry.notify_one();
            room.await;
        }
    }

    /// Waits until every attempt recorded before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        lock(&self.handle.queue.flushes).push(done);
        self.handle.queue.hurry.notify_one();
        let _ = wait.await;
    }
}

impl Queue {
    /// Into `shard`, or handed back when it is full; the first row of a shard
    /// rings the writer.
    fn try_push(
        &self,
        shard: &Mutex<VecDeque<Queued>>,
        attempt: AuthAttempt,
    ) -> Option<AuthAttempt> {
        let mut rows = lock(shard);
        if rows.len() >= SHARD_CAPACITY {
            return Some(attempt);
        }
        rows.push_back(Queued {
            at: Instant::now(),
            attempt,
        });
        let first = rows.len() == 1;
        drop(rows);
        if first {
            self.wake.notify_one();
        }
        None
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.hurry.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The writer: sleeps until rung, lets the batch grow (unless hurried), takes
/// every shard at once and writes their rows in the order they were queued, at
/// most [`MAX_BATCH`] to a write.
async fn write_batches(queue: Arc<Queue>, store: Arc<dyn AuditStore>) {
    // Handed to the store and taken back after each write: a batch of this size
    // is a large allocation, not one to make and free hundreds of times a second.
    let mut batch = Arc::new(Vec::with_capacity(MAX_BATCH));
    // The shards' queues are swapped with these, so pushing rarely allocates.
    let mut spares: Vec<VecDeque<Queued>> = Vec::new();
    let mut round: Vec<VecDeque<Queued>> = Vec::new();
    // The first write not yet synced.
    let mut unsynced: Option<Instant> = None;
    loop {
        let rung = async {
            tokio::select! {
                () = queue.wake.notified() => false,
                () = queue.hurry.notified() => true,
            }
        };
        let hurried = match unsynced {
            None => rung.await,
            Some(since) => match tokio::time::timeout_at((since + SYNC_EVERY).into(), rung).await {
                Ok(hurried) => hurried,
                Err(_) => {
                    sync(&*store, &mut unsynced).await;
                    continue;
                }
            },
        };
        if !hurried {
            let _ = tokio::time::timeout(LINGER, queue.hurry.notified()).await;
        }
        let closing = queue.closed.load(Ordering::Acquire);
        // Answered after this round: everything recorded before they asked is
        // in a shard by now.
        let flushes = std::mem::take(&mut *lock(&queue.flushes));
        {
            // One cut through all shards: a row queued after it, in any shard,
            // waits for the next round.
            let mut shards: Vec<_> = queue.shards.iter().map(|s| lock(s)).collect();
            for rows in shards.iter_mut().filter(|r| !r.is_empty()) {
                let spare = spares.pop().unwrap_or_default();
                round.push(std::mem::replace(&mut **rows, spare));
            }
        }
        queue.drained.notify_waiters();
        if !round.is_empty() {
            unsynced.get_or_insert_with(Instant::now);
        }
        // Each shard is in queue order: merged by it, every row moves once.
        while let Some(rows) = round
            .iter_mut()
            .filter(|r| !r.is_empty())
            .min_by_key(|r| r.front().map(|q| q.at))
        {
            let queued = rows.pop_front().expect("a non-empty shard");
            Arc::make_mut(&mut batch).push(queued.attempt);
            if batch.len() == MAX_BATCH {
                write_batch(&*store, &mut batch).await;
            }
        }
        spares.append(&mut round);
        if !batch.is_empty() {
            write_batch(&*store, &mut batch).await;
        }
        let due = unsynced.is_some_and(|since| since.elapsed() >= SYNC_EVERY);
        if unsynced.is_some() && (due || closing || !flushes.is_empty()) {
            sync(&*store, &mut unsynced).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
        if closing {
            return;
        }
    }
}

/// Makes every written batch durable; on failure they stay due for the next try.
async fn sync(store: &dyn AuditStore, unsynced: &mut Option<Instant>) {
    match store.sync_auth_attempts().await {
        Ok(()) => *unsynced = None,
        Err(e) => tracing::error!(error = %e, "audit rows could not be synced to disk"),
    }
}

async fn write_batch(store: &dyn AuditStore, batch: &mut Arc<Vec<AuthAttempt>>) {
    if let Err(e) = write_with_retry(store, batch).await {
        tracing::error!(error = %e, rows = batch.len(), "audit rows could not be written");
    }
    // The store has let go of it: this clears in place.
    Arc::make_mut(batch).clear();
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;

    use super::*;
    use crate::model::AuditQuery;
    use crate::store::StoreError;

    /// Keeps what it is given; a write can be held back until `open` is rung.
    #[derive(Default)]
    struct Recorded {
        rows: Mutex<Vec<(RequestId, bool)>>,
        syncs: AtomicUsize,
        held: AtomicBool,
        open: Notify,
    }

    #[async_trait]
    impl AuditStore for Recorded {
        async fn append_auth_attempts(
            &self,
            batch: Arc<Vec<AuthAttempt>>,
        ) -> Result<(), StoreError> {
            while self.held.load(Ordering::Acquire) {
                self.open.notified().await;
            }
            lock(&self.rows).extend(batch.iter().map(|a| (a.request_id.clone(), false)));
            Ok(())
        }

        async fn sync_auth_attempts(&self) -> Result<(), StoreError> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            for row in lock(&self.rows).iter_mut() {
                row.1 = true;
            }
            Ok(())
        }

        async fn list_audit(&self, _: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
            Ok(Vec::new())
        }

        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn attempt(id: &str) -> AuthAttempt {
        AuthAttempt {
            time: Timestamp::now(),
            request_id: id.into(),
            client_ip: IpAddr::from([127, 0, 0, 1]),
            method: Cow::Borrowed("GET"),
            path: Cow::Borrowed("/v1/auth/whoami"),
            key: None,
            presented_prefix: None,
            subject: None,
            outcome: Outcome::Allowed,
            reason: None,
        }
    }

    fn ids(store: &Recorded) -> Vec<String> {
        lock(&store.rows)
            .iter()
            .map(|(id, _)| id.to_string())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn attempts_one_after_another_keep_their_order_whatever_thread_records_them() {
        let store = Arc::new(Recorded::default());
        let log = AuditLog::start(Arc::clone(&store) as Arc<dyn AuditStore>);
        // Each attempt is recorded by a task of its own, started after the one
        // before was recorded: the tasks land on different threads (shards).
        for i in 0..300 {
            let log = log.clone();
            tokio::spawn(async move { log.record(attempt(&format!("r{i:03}"))).await })
                .await
                .unwrap();
        }
        log.flush().await;
        let expected: Vec<String> = (0..300).map(|i| format!("r{i:03}")).collect();
        assert_eq!(ids(&store), expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_flush_waits_for_every_attempt_before_it_and_puts_them_on_disk() {
        let store = Arc::new(Recorded::default());
        let log = AuditLog::start(Arc::clone(&store) as Arc<dyn AuditStore>);
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..500 {
                        log.record(attempt(&format!("t{t}-{i}"))).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        log.flush().await;
        let rows = lock(&store.rows).clone();
        assert_eq!(rows.len(), 8 * 500);
        assert!(
            rows.iter().all(|(_, synced)| *synced),
            "flushed rows are synced"
        );
        let unique: std::collections::HashSet<_> = rows.iter().map(|(id, _)| id).collect();
        assert_eq!(unique.len(), 8 * 500, "no row written twice");
    }

    #[tokio::test(start_paused = true)]
    async fn written_rows_are_synced_within_a_second_without_a_flush() {
        let store = Arc::new(Recorded::default());
        let log = AuditLog::start(Arc::clone(&store) as Arc<dyn AuditStore>);
        log.record(attempt("lonely")).await;
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(ids(&store), ["lonely"], "written after the linger");
        assert_eq!(store.syncs.load(Ordering::SeqCst), 0, "not synced at once");
        tokio::time::sleep(SYNC_EVERY).await;
        assert_eq!(store.syncs.load(Ordering::SeqCst), 1);
        assert!(lock(&store.rows)[0].1);
        // Nothing new: no more syncs.
        tokio::time::sleep(SYNC_EVERY * 3).await;
        assert_eq!(store.syncs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_makes_recorders_wait_and_loses_nothing() {
        let store = Arc::new(Recorded::default());
        store.held.store(true, Ordering::Release);
        let log = AuditLog::start(Arc::clone(&store) as Arc<dyn AuditStore>);
        // One task records more than its shard holds while the store is stuck.
        let n = SHARD_CAPACITY * 2 + 10;
        let recorder = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..n {
                    log.record(attempt(&format!("{i}"))).await;
                }
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!recorder.is_finished(), "the recorder waits for room");
        store.held.store(false, Ordering::Release);
        store.open.notify_waiters();
        recorder.await.unwrap();
        log.flush().await;
        let expected: Vec<String> = (0..n).map(|i| format!("{i}")).collect();
        assert_eq!(ids(&store), expected);
    }

    #[tokio::test]
    async fn dropping_the_log_writes_what_is_queued() {
        let store = Arc::new(Recorded::default());
        let log = AuditLog::start(Arc::clone(&store) as Arc<dyn AuditStore>);
        log.record(attempt("last words")).await;
        drop(log);
        for _ in 0..100 {
            if store.syncs.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(ids(&store), ["last words"]);
        assert!(lock(&store.rows)[0].1, "synced before the writer stops");
    }
}
