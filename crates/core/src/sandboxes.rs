//! Long-lived sandboxes (SPEC §4): lifecycle, exec, pause/resume, expiry.
//!
//! The manager keeps every live sandbox in memory (a jail whose init stays up)
//! and writes each one's record to the store, so a restarted server can mark what
//! its predecessor left as killed (the jail sweeps the processes and cgroups).
//! A sandbox belongs to the tenant and env of the key that created it; any other
//! caller gets "not found", whatever its scopes. Creations and kills (by request,
//! expiry or shutdown) are announced to the [`EventSink`] (webhooks).
//!
//! What a sandbox costs is billed here, to the key that created it (whoever
//! execs in it): its lifetime when it is killed (every second begun), and the CPU time
//! of everything ever run inside (its cgroup's counter, background processes
//! included), at each exec's end the part not billed yet, and the rest when it
//! is killed. Each part of the counter is billed once: nothing twice, nothing lost.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use sandgate_jail::{Jail, Limits, OutputStream, Spec};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::execute::{ExecuteResponse, languages, response_of};
use crate::keys::api::{InvalidField, invalid};
use crate::keys::format::random_id;
use crate::model::{Env, Timestamp};
use crate::principal::Principal;
use crate::processes::ProcessTable;

mod code_contexts;
pub mod files;
mod long_running;
use crate::store::StoreError;
use crate::usage::UsageRecorder;
use crate::webhooks::EventSink;
pub use code_contexts::{
    CellEvent, CellRequest, ContextError, ContextInfo, ContextLanguage, ContextTarget, PreparedCell,
};
use long_running::token_hash;
pub use long_running::{PreparedProcess, StartProcess};

/// Server-wide bounds on sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    /// Running (or paused) sandboxes one tenant may have at once.
    pub max_per_tenant: usize,
    pub default_timeout_sec: u64,
    pub max_timeout_sec: u64,
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    pub default_cpus: f64,
    pub max_cpus: f64,
    /// Processes and threads one sandbox may have at once.
    pub pids: u32,
    /// Size of each of a sandbox's writable tmpfs mounts.
    pub tmpfs_bytes: u64,
    /// Sandboxes kept built and waiting, so that a create takes one at once.
    pub warm_pool: usize,
    pub default_exec_timeout_ms: u64,
    pub max_exec_timeout_ms: u64,
    /// Per stream, per exec.
    pub output_cap_bytes: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            max_per_tenant: 20,
            default_timeout_sec: 300,
            max_timeout_sec: 24 * 3600,
            default_memory_mb: 512,
            max_memory_mb: 4096,
            default_cpus: 1.0,
            max_cpus: 2.0,
            pids: 256,
            tmpfs_bytes: 512 << 20,
            warm_pool: 64,
            default_exec_timeout_ms: 60_000,
            max_exec_timeout_ms: 3_600_000,
            output_cap_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
    Killed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Killed => "killed",
        }
    }
}

/// The sandbox object of SPEC §4.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxView {
    pub id: String,
    pub template: String,
    pub state: SandboxState,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub metadata: BTreeMap<String, String>,
    pub memory_mb: u64,
    pub cpus: f64,
    pub network: String,
}

/// A new sandbox and its access token (returned once, by the create call).
#[derive(Debug)]
pub struct CreatedSandbox {
    pub view: SandboxView,
    pub access_token: String,
}

/// Why an access token did not open a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No live sandbox has that id.
    NotFound,
    /// Missing, or not this sandbox's.
    BadToken,
}

/// What the store keeps of a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxRecord {
    pub view: SandboxView,
    pub tenant: String,
    pub env: Env,
    /// The key that created it (usage is counted against it).
    pub key_id: String,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSandboxRequest {
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub timeout_sec: Option<u64>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment of every exec (an exec's own `env` adds to it).
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Only `none` (loopback only) for now.
    #[serde(default)]
    pub network: Option<String>,
}

/// `POST /v1/sandboxes/{id}/exec`: a `command` (run by `/bin/sh -c`) or a
/// `language` with `code`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecRequest {
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    /// Default `/workspace`.
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `POST /v1/sandboxes/{id}/code`: a cell for the sandbox's persistent
/// interpreter of `language`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CodeRequest {
    /// `python` or `javascript`.
    pub language: String,
    pub code: String,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The persistent Python interpreter and the client that talks to it, placed in
/// every sandbox's read-only `/sandbox`.
const PYTHON_KERNEL: &str = include_str!("sandboxes_kernels/python_kernel.py");
const JAVASCRIPT_KERNEL: &str = include_str!("sandboxes_kernels/javascript_kernel.js");
const CODE_CLIENT: &str = include_str!("sandboxes_kernels/code_client.py");

/// `POST /v1/sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutRequest {
    pub timeout_sec: u64,
}

/// `GET /v1/sandboxes` filters.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<SandboxState>,
    pub metadata: Vec<(String, String)>,
    pub limit: usize,
    /// The id after which the page starts (ids sort by creation).
    pub after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox not found")]
    NotFound,
    #[error("no such file or directory in the sandbox")]
    FileNotFound,
    #[error("that port is not open")]
    PortNotOpen,
    #[error("{0}")]
    Conflict(String),
    #[error("invalid {}: {}", .0.field, .0.message)]
    Invalid(InvalidField),
    #[error("the tenant already has {0} sandboxes, the most it may have")]
    TooMany(usize),
    #[error("sandboxes are unavailable on this server: {0}")]
    Unavailable(String),
    #[error("the jail failed: {0}")]
    Jail(#[from] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<InvalidField> for SandboxError {
    fn from(f: InvalidField) -> Self {
        SandboxError::Invalid(f)
    }
}

pub use sandgate_jail::OutputStream as Stream;

/// Receives exec output as text while it runs; `false` means nobody listens.
pub type TextSink = Box<dyn FnMut(OutputStream, &str) -> bool + Send>;

#[async_trait]
pub trait SandboxStore: Send + Sync + 'static {
    /// Inserts or replaces sandbox records, in order, in one transaction.
    async fn save_sandboxes(&self, records: &[SandboxRecord]) -> Result<(), StoreError>;
    /// Marks every sandbox not already killed as killed (at start-up: whatever a
    /// previous server ran is gone). Returns how many were.
    async fn mark_all_killed(&self, at: Timestamp) -> Result<u64, StoreError>;
}

struct Live {
    record: Mutex<SandboxRecord>,
    env: Vec<(String, String)>,
    /// `None` once killed. Execs hold a read lock for their whole run.
    jail: RwLock<Option<sandgate_jail::Sandbox>>,
    /// Who to bill sandbox-seconds and CPU time to.
    owner: Arc<Principal>,
    /// Ports opened to the outside through sandgate.
    ports: Mutex<std::collections::BTreeSet<u16>>,
    /// The sandbox's access token (E2B's envd and code interpreter routes
    /// authenticate with it instead of a key; E2B's connect hands it to the
    /// owner again), and its SHA-256, which requests are compared against.
    /// Memory only: a sandbox does not outlive the server.
    access_token: String,
    access: [u8; 32],
    /// Commands started inside and left running (E2B's process service).
    processes: Arc<ProcessTable>,
    /// The template layer under its `/workspace`, kept while it runs.
    #[expect(
        dead_code,
        reason = "held so the layer outlives the sandbox's use of it"
    )]
    layer: Option<Arc<crate::templates::Layer>>,
    /// How far the cgroup's CPU counter (ns) is billed; it starts at what
    /// building the jail used, which is not the caller's.
    cpu_billed_ns: AtomicU64,
    /// Notebook-like interpreters (E2B's code interpreter).
    contexts: code_contexts::Contexts,
}

/// Live sandboxes, their limits, and the store that remembers them.
pub struct SandboxManager {
    jail: Result<Arc<Jail>, String>,
    limits: SandboxLimits,
    /// Records go to the store through one writer, in order and in batches: a
    /// sandbox's record is history (a restart marks it killed), so requests do
    /// not wait for a disk flush.
    records: tokio::sync::mpsc::UnboundedSender<SandboxRecord>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    warm: Arc<crate::warm::WarmPool>,
    /// Told of `sandbox.created` and `sandbox.killed` (webhooks).
    events: Option<Arc<dyn EventSink>>,
    /// Resolves `template` (only `default` without it).
    templates: Option<Arc<crate::templates::TemplateService>>,
    /// Where sandbox-seconds and CPU time are billed.
    usage: Option<Arc<UsageRecorder>>,
}

impl std::fmt::Debug for SandboxManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxManager")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl SandboxManager {
    /// Marks what a previous server left as killed.
    pub async fn start(
        jail: Result<Arc<Jail>, String>,
        limits: SandboxLimits,
        store: Arc<dyn SandboxStore>,
    ) -> Result<SandboxManager, StoreError> {
        let stale = store.mark_all_killed(Timestamp::now()).await?;
        if stale > 0 {
            tracing::info!(
                sandboxes = stale,
                "marked sandboxes of a previous run as killed"
            );
        }
        let (records, mut queue) = tokio::sync::mpsc::unbounded_channel::<SandboxRecord>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while queue.recv_many(&mut batch, 256).await > 0 {
                if let Err(e) = store.save_sandboxes(&batch).await {
                    tracing::error!(error = %e, records = batch.len(), "could not record sandboxes");
                }
                batch.clear();
            }
        });
        let warm = Arc::new(crate::warm::WarmPool::default());
        if let (Ok(jail), true) = (&jail, limits.warm_pool > 0) {
            let spec = sandbox_spec(&limits, limits.default_memory_mb, limits.default_cpus);
            tokio::spawn(Arc::clone(&warm).fill(Arc::clone(jail), spec, limits.warm_pool));
        }
        Ok(SandboxManager {
            jail,
            limits,
            records,
            live: Mutex::new(HashMap::new()),
            warm,
            events: None,
            templates: None,
            usage: None,
        })
    }

    /// Bills sandbox-seconds and CPU time to `usage` from now on.
    pub fn with_usage(mut self, usage: Arc<UsageRecorder>) -> SandboxManager {
        self.usage = Some(usage);
        self
    }

    /// Bills the sandbox's CPU counter up to `used`, to its creator; returns the
    /// milliseconds billed now. Whole milliseconds of the counter are billed, so
    /// the parts add up to the total however the counter was read.
    fn bill_cpu(&self, live: &Live, used: Duration) -> u64 {
        let used_ns = u64::try_from(used.as_nanos()).unwrap_or(u64::MAX);
        let before = live.cpu_billed_ns.fetch_max(used_ns, Ordering::AcqRel);
        let ms = (used_ns / 1_000_000).saturating_sub(before / 1_000_000);
        if let (Some(usage), true) = (&self.usage, ms > 0) {
            usage.cpu(&live.owner, ms);
        }
        ms
    }

    /// Announces sandbox creations and kills from now on to `sink`.
    pub fn with_events(mut self, sink: Arc<dyn EventSink>) -> SandboxManager {
        self.events = Some(sink);
        self
    }

    /// Sandboxes may start from the templates of `templates` from now on.
    pub fn with_templates(
        mut self,
        templates: Arc<crate::templates::TemplateService>,
    ) -> SandboxManager {
        self.templates = Some(templates);
        self
    }

    async fn announce(&self, event: &str, record: &SandboxRecord) {
        if let Some(sink) = &self.events {
            let data = serde_json::json!({ "sandbox": record.view, "keyId": record.key_id });
            sink.emit(&record.tenant, record.env, event, data).await;
        }
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    fn record(&self, record: SandboxRecord) {
        if self.records.send(record).is_err() {
            tracing::error!("the sandbox record writer is gone");
        }
    }

    fn jail(&self) -> Result<Arc<Jail>, SandboxError> {
        self.jail
            .as_ref()
            .map(Arc::clone)
            .map_err(|e| SandboxError::Unavailable(e.clone()))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live sandbox `id`, if `caller` owns it.
    fn find(&self, caller: &Principal, id: &str) -> Result<Arc<Live>, SandboxError> {
        let live = self.live().get(id).cloned().ok_or(SandboxError::NotFound)?;
        let owned = {
            let r = live.record.lock().unwrap_or_else(|p| p.into_inner());
            r.tenant == caller.tenant && r.env == caller.env
        };
        if owned {
            Ok(live)
        } else {
            Err(SandboxError::NotFound)
        }
    }

    pub async fn create(
        &self,
        caller: &Arc<Principal>,
        req: CreateSandboxRequest,
    ) -> Result<SandboxView, SandboxError> {
        Ok(self.create_with_access(caller, req).await?.view)
    }

    /// [`SandboxManager::create`], also returning the sandbox's access token
    /// (shown only here; the manager keeps its hash).
    pub async fn create_with_access(
        &self,
        caller: &Arc<Principal>,
        req: CreateSandboxRequest,
    ) -> Result<CreatedSandbox, SandboxError> {
        let l = &self.limits;
        // The template's defaults fill what the request leaves open.
        let (req, layer) = match &self.templates {
            Some(t) => t.prepare_sandbox(caller, req).await?,
            None => (req, None),
        };
        let template = req.template.unwrap_or_else(|| "default".to_owned());
        if template != "default" && layer.is_none() {
            return Err(invalid("template", format!("unknown template `{template}`")).into());
        }
        let network = req.network.unwrap_or_else(|| "none".to_owned());
        if network != "none" {
            return Err(invalid("network", "only `none` (loopback only) is supported").into());
        }
        let timeout_sec = req.timeout_sec.unwrap_or(l.default_timeout_sec);
        if timeout_sec == 0 || timeout_sec > l.max_timeout_sec {
            return Err(invalid(
                "timeoutSec",
                format!("timeoutSec must be between 1 and {}", l.max_timeout_sec),
            )
            .into());
        }
        let memory_mb = req.memory_mb.unwrap_or(l.default_memory_mb);
        if !(32..=l.max_memory_mb).contains(&memory_mb) {
            return Err(invalid(
                "memoryMb",
                format!("memoryMb must be between 32 and {}", l.max_memory_mb),
            )
            .into());
        }
        let cpus = req.cpus.unwrap_or(l.default_cpus);
        if !(cpus >= 0.1 && cpus <= l.max_cpus) {
            return Err(invalid(
                "cpus",
                format!("cpus must be between 0.1 and {}", l.max_cpus),
            )
            .into());
        }
        let metadata = req.metadata.unwrap_or_default();
        if metadata.len() > 64
            || metadata
                .iter()
                .any(|(k, v)| k.len() > 128 || v.len() > 1024)
        {
            return Err(invalid("metadata", "at most 64 entries, short keys and values").into());
        }
        let env = crate::execute::validate_env(req.env.unwrap_or_default(), 128)?;

        let jail = self.jail()?;
        let id = random_id("sbx_", 20);
        let now = Timestamp::now();
        let record = SandboxRecord {
            view: SandboxView {
                id: id.clone(),
                template,
                state: SandboxState::Running,
                created_at: now,
                expires_at: Timestamp::from_millis(now.millis() + timeout_sec as i64 * 1000),
                metadata,
                memory_mb,
                cpus,
                network,
            },
            tenant: caller.tenant.clone(),
            env: caller.env,
            key_id: caller.key_id.clone(),
        };
        let access_token = random_id("sat_", 40);
        // Claim a place under the tenant's cap before the (slow) jail is built.
        let placeholder = Arc::new(Live {
            record: Mutex::new(record.clone()),
            env,
            jail: RwLock::new(None),
            owner: Arc::clone(caller),
            ports: Mutex::new(Default::default()),
            access: token_hash(&access_token),
            access_token: access_token.clone(),
            processes: Arc::default(),
            layer: layer.clone(),
            cpu_billed_ns: AtomicU64::new(0),
            contexts: Default::default(),
        });
        {
            let mut live = self.live();
            let mine = live
                .values()
                .filter(|s| {
                    let r = s.record.lock().unwrap_or_else(|p| p.into_inner());
                    r.tenant == caller.tenant
                })
                .count();
            if mine >= l.max_per_tenant {
                return Err(SandboxError::TooMany(l.max_per_tenant));
            }
            live.insert(id.clone(), Arc::clone(&placeholder));
        }
        // On a template's layer, a new sandbox (it copies nothing); otherwise a
        // warm one when there is one (given the asked limits), else a new one.
        let spec = sandbox_spec(l, memory_mb, cpus);
        let warm = if layer.is_none() {
            self.warm.take()
        } else {
            None
        };
        let sandbox = match (&layer, warm) {
            (None, Some(warm)) => warm
                .set_limits(memory_mb << 20, (cpus * 1000.0).round() as u32)
                .map(|()| warm),
            (layer, _) => {
                let layer = layer.as_ref().map(|l| l.path().to_owned());
                tokio::task::spawn_blocking(move || match layer {
                    Some(path) => jail.create_sandbox_on(&spec, &path),
                    None => jail.create_sandbox(&spec),
                })
                .await
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|r| r)
            }
        };
        let sandbox = match sandbox {
            Ok(s) => s,
            Err(e) => {
                self.live().remove(&id);
                return Err(e.into());
            }
        };
        let built = u64::try_from(sandbox.cpu_time().as_nanos()).unwrap_or(u64::MAX);
        placeholder.cpu_billed_ns.store(built, Ordering::Release);
        *placeholder.jail.write().unwrap_or_else(|p| p.into_inner()) = Some(sandbox);
        self.record(record.clone());
        self.announce("sandbox.created", &record).await;
        Ok(CreatedSandbox {
            view: record.view,
            access_token,
        })
    }

    pub fn get(&self, caller: &Principal, id: &str) -> Result<SandboxView, SandboxError> {
        let live = self.find(caller, id)?;
        let view = live
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .view
            .clone();
        Ok(view)
    }

    /// The caller's live sandboxes, oldest first, one page.
    pub fn list(
        &self,
        caller: &Principal,
        filter: &ListFilter,
    ) -> (Vec<SandboxView>, Option<String>) {
        let mut views: Vec<SandboxView> = self
            .live()
            .values()
            .filter_map(|s| {
                let r = s.record.lock().unwrap_or_else(|p| p.into_inner());
                (r.tenant == caller.tenant && r.env == caller.env).then(|| r.view.clone())
            })
            .filter(|v| filter.state.is_none_or(|s| s == v.state))
            .filter(|v| {
                filter
                    .metadata
                    .iter()
                    .all(|(k, want)| v.metadata.get(k) == Some(want))
            })
            .collect();
        views.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        // A cursor is `<createdAt millis>.<id>` of the last sandbox of a page, so a
        // page boundary survives that sandbox being killed.
        if let Some((millis, id)) = filter
            .after
            .as_deref()
            .and_then(|c| c.split_once('.'))
            .and_then(|(m, id)| Some((m.parse::<i64>().ok()?, id)))
        {
            views.retain(|v| (v.created_at.millis(), v.id.as_str()) > (millis, id));
        }
        let next = (views.len() > filter.limit).then(|| {
            let last = &views[filter.limit - 1];
            format!("{}.{}", last.created_at.millis(), last.id)
        });
        views.truncate(filter.limit);
        (views, next)
    }

    pub async fn kill(&self, caller: &Principal, id: &str) -> Result<(), SandboxError> {
        self.find(caller, id)?;
        self.kill_live(id).await;
        Ok(())
    }

    /// Kills a live sandbox (any owner) and bills what it has not yet.
    async fn kill_live(&self, id: &str) {
        let Some(live) = self.live().remove(id) else {
            return;
        };
        // Kill first (execs in progress end), then take the jail to clean up.
        let cleanup = {
            let live = Arc::clone(&live);
            tokio::task::spawn_blocking(move || {
                if let Some(s) = live.jail.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    s.terminate();
                }
                let taken = live.jail.write().unwrap_or_else(|p| p.into_inner()).take();
                taken.map(sandgate_jail::Sandbox::kill)
            })
        };
        if let Ok(Some(cpu)) = cleanup.await {
            self.bill_cpu(&live, cpu);
        }
        let record = {
            let mut r = live.record.lock().unwrap_or_else(|p| p.into_inner());
            r.view.state = SandboxState::Killed;
            r.clone()
        };
        self.record(record.clone());
        self.announce("sandbox.killed", &record).await;
        // Every second begun is billed, paused ones too (the sandbox holds its
        // memory and files while paused).
        let lived_ms = (Timestamp::now().millis() - record.view.created_at.millis()).max(0);
        if let Some(usage) = &self.usage {
            usage.sandbox_seconds(&live.owner, (lived_ms as u64).div_ceil(1000));
        }
    }

    /// Kills every sandbox whose time is up; how many there were.
    pub async fn reap_expired(&self) -> usize {
        let now = Timestamp::now();
        let due: Vec<String> = self
            .live()
            .iter()
            .filter(|(_, s)| {
                s.record
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .view
                    .expires_at
                    <= now
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            tracing::info!(sandbox = %id, "sandbox expired");
            self.kill_live(id).await;
        }
        due.len()
    }

    /// Kills every sandbox (server shutdown), the warm ones included.
    pub async fn kill_all(&self) {
        self.warm.closed.store(true, Ordering::Relaxed);
        let warm: Vec<_> =
            std::mem::take(&mut *self.warm.ready.lock().unwrap_or_else(|p| p.into_inner()));
        if !warm.is_empty() {
            let _ = tokio::task::spawn_blocking(move || drop(warm)).await;
        }
        let ids: Vec<String> = self.live().keys().cloned().collect();
        for id in ids {
            self.kill_live(&id).await;
        }
    }

    /// `timeoutSec` from now. The clock runs while paused too.
    pub async fn set_timeout(
        &self,
        caller: &Principal,
        id: &str,
        timeout_sec: u64,
    ) -> Result<SandboxView, SandboxError> {
        if timeout_sec == 0 || timeout_sec > self.limits.max_timeout_sec {
            return Err(invalid(
                "timeoutSec",
                format!(
                    "timeoutSec must be between 1 and {}",
                    self.limits.max_timeout_sec
                ),
            )
            .into());
        }
        let live = self.find(caller, id)?;
        let record = {
            let mut r = live.record.lock().unwrap_or_else(|p| p.into_inner());
            r.view.expires_at =
                Timestamp::from_millis(Timestamp::now().millis() + timeout_sec as i64 * 1000);
            r.clone()
        };
        self.record(record.clone());
        Ok(record.view)
    }

    pub async fn set_paused(
        &self,
        caller: &Principal,
        id: &str,
        paused: bool,
    ) -> Result<SandboxView, SandboxError> {
        let live = self.find(caller, id)?;
        let (from, to) = if paused {
            (SandboxState::Running, SandboxState::Paused)
        } else {
            (SandboxState::Paused, SandboxState::Running)
        };
        {
            let mut r = live.record.lock().unwrap_or_else(|p| p.into_inner());
            if r.view.state != from {
                return Err(SandboxError::Conflict(format!(
                    "the sandbox is {}",
                    r.view.state.as_str()
                )));
            }
            let jail = live.jail.read().unwrap_or_else(|p| p.into_inner());
            jail.as_ref()
                .ok_or(SandboxError::NotFound)?
                .set_frozen(paused)?;
            r.view.state = to;
        }
        let record = live
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.record(record.clone());
        Ok(record.view)
    }

    /// Checks an exec request and the sandbox's state; the run itself is
    /// [`SandboxManager::exec`], after the caller took an execution from its quota.
    pub fn prepare_exec(
        &self,
        caller: &Principal,
        id: &str,
        req: ExecRequest,
    ) -> Result<PreparedExec, SandboxError> {
        let live = self.find(caller, id)?;
        let argv = match (req.command, req.language, req.code) {
            (Some(command), None, None) => {
                if command.trim().is_empty() {
                    return Err(invalid("command", "command must not be empty").into());
                }
                vec!["/bin/sh".to_owned(), "-c".to_owned(), command]
            }
            (None, Some(language), Some(code)) => {
                let lang = languages::find(&language)
                    .ok_or_else(|| invalid("language", format!("unknown language `{language}`")))?;
                if code.trim().is_empty() {
                    return Err(invalid("code", "code must not be empty").into());
                }
                let flag = if lang.name == "javascript" {
                    "-e"
                } else {
                    "-c"
                };
                vec![lang.interpreter.to_owned(), flag.to_owned(), code]
            }
            (None, Some(_), None) => return Err(invalid("code", "code is required").into()),
            _ => {
                return Err(
                    invalid("command", "give either `command`, or `language` and `code`").into(),
                );
            }
        };
        if argv[2].len() > 1 << 20 {
            return Err(invalid("command", "over the limit of 1 MiB").into());
        }
        let cwd = req.cwd.unwrap_or_else(|| "/workspace".to_owned());
        if !cwd.starts_with('/') || cwd.contains('\0') {
            return Err(invalid("cwd", "cwd must be an absolute path").into());
        }
        let timeout_ms = self.exec_timeout(req.timeout_ms)?;
        let stdin = req.stdin.unwrap_or_default();
        self.prepare(live, argv, cwd, req.env, stdin, timeout_ms)
    }

    /// A cell for the persistent interpreter: run as an exec of the small client
    /// that starts the interpreter when needed and relays the cell's output. An
    /// exec's deadline ends the client; the interpreter then interrupts the cell
    /// (KeyboardInterrupt) and keeps its state.
    pub fn prepare_code(
        &self,
        caller: &Principal,
        id: &str,
        req: CodeRequest,
    ) -> Result<PreparedExec, SandboxError> {
        if req.language != "python" && req.language != "javascript" {
            return Err(invalid(
                "language",
                "persistent interpreters exist for `python` and `javascript`",
            )
            .into());
        }
        if req.code.trim().is_empty() {
            return Err(invalid("code", "code must not be empty").into());
        }
        let live = self.find(caller, id)?;
        let timeout_ms = self.exec_timeout(req.timeout_ms)?;
        let argv = vec![
            "/usr/bin/python3".into(),
            "-s".into(),
            "-B".into(),
            "/sandbox/.code-client.py".into(),
            req.language,
            timeout_ms.to_string(),
        ];
        self.prepare(live, argv, "/workspace".into(), None, req.code, timeout_ms)
    }

    /// An exec's deadline: asked, or the default, within the maximum.
    fn exec_timeout(&self, asked: Option<u64>) -> Result<u64, SandboxError> {
        let l = &self.limits;
        let timeout_ms = asked.unwrap_or(l.default_exec_timeout_ms);
        if timeout_ms == 0 || timeout_ms > l.max_exec_timeout_ms {
            return Err(invalid(
                "timeoutMs",
                format!("timeoutMs must be between 1 and {}", l.max_exec_timeout_ms),
            )
            .into());
        }
        Ok(timeout_ms)
    }

    /// What every exec shares: the environment (base, the sandbox's, the
    /// request's), the sandbox not paused, the limits of one program.
    fn prepare(
        &self,
        live: Arc<Live>,
        argv: Vec<String>,
        cwd: String,
        env: Option<BTreeMap<String, String>>,
        stdin: String,
        timeout_ms: u64,
    ) -> Result<PreparedExec, SandboxError> {
        let l = &self.limits;
        let env = self.process_env(&live, &env.unwrap_or_default())?;
        ensure_running(&live)?;
        Ok(PreparedExec {
            live,
            spec: Spec {
                sandbox_dir_for_server: None,
                argv,
                env,
                cwd,
                stdin: stdin.into_bytes(),
                files: Vec::new(),
                limits: Limits {
                    timeout: Duration::from_millis(timeout_ms),
                    output_bytes: l.output_cap_bytes,
                    file_size_bytes: l.tmpfs_bytes,
                    open_files: 1024,
                    ..Limits::default()
                },
            },
        })
    }

    pub async fn exec(&self, prepared: PreparedExec) -> Result<ExecuteResponse, SandboxError> {
        self.exec_streaming(prepared, Box::new(|_, _| true)).await
    }

    /// [`SandboxManager::exec`], handing output to `sink` as it is produced, as
    /// text (a UTF-8 sequence split between reads is held back until complete).
    /// `sink` runs on a blocking thread; `false` from it (also asked with an
    /// empty string now and then) means nobody listens: the program is killed.
    pub async fn exec_streaming(
        &self,
        prepared: PreparedExec,
        mut sink: TextSink,
    ) -> Result<ExecuteResponse, SandboxError> {
        let jail = self.jail()?;
        let PreparedExec { live, spec } = prepared;
        let inside = Arc::clone(&live);
        let outcome = tokio::task::spawn_blocking(move || {
            let guard = inside.jail.read().unwrap_or_else(|p| p.into_inner());
            let mut pending: [Vec<u8>; 2] = Default::default();
            let mut text_sink = |stream: OutputStream, bytes: &[u8]| {
                if bytes.is_empty() {
                    return sink(stream, "");
                }
                let buf = &mut pending[usize::from(stream == OutputStream::Stderr)];
                buf.extend_from_slice(bytes);
                let text = utf8_prefix(buf);
                text.is_empty() || sink(stream, &text)
            };
            match guard.as_ref() {
                Some(sandbox) => jail
                    .exec_streaming(sandbox, &spec, &mut text_sink)
                    .map(|o| Some((o, sandbox.cpu_time()))),
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))??;
        let (outcome, cpu) = outcome.ok_or(SandboxError::NotFound)?;
        let mut response = response_of(outcome);
        // The sandbox's CPU since the last bill: this program's, and whatever
        // ran beside it (background processes, other execs).
        response.cpu_ms = self.bill_cpu(&live, cpu);
        Ok(response)
    }
}

impl SandboxManager {
    /// Makes HTTP on `port` inside the sandbox reachable through sandgate.
    pub fn expose_port(
        &self,
        caller: &Principal,
        id: &str,
        port: u16,
    ) -> Result<u16, SandboxError> {
        if port == 0 {
            return Err(invalid("port", "port must be between 1 and 65535").into());
        }
        let live = self.find(caller, id)?;
        live.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port);
        Ok(port)
    }

    pub fn close_port(&self, caller: &Principal, id: &str, port: u16) -> Result<(), SandboxError> {
        let live = self.find(caller, id)?;
        let removed = live
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&port);
        if removed {
            Ok(())
        } else {
            Err(SandboxError::PortNotOpen)
        }
    }

    /// A connection to an exposed port inside the caller's sandbox.
    pub async fn connect_port(
        &self,
        caller: &Principal,
        id: &str,
        port: u16,
    ) -> Result<std::net::TcpStream, SandboxError> {
        let live = self.find(caller, id)?;
        if !live
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&port)
        {
            return Err(SandboxError::PortNotOpen);
        }
        let stream = tokio::task::spawn_blocking(move || {
            let guard = live.jail.read().unwrap_or_else(|p| p.into_inner());
            guard
                .as_ref()
                .map(|s| s.connect_tcp(port, Duration::from_secs(5)))
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
        match stream {
            None => Err(SandboxError::NotFound),
            Some(Ok(s)) => Ok(s),
            Some(Err(_)) => Err(SandboxError::Conflict(format!(
                "nothing in the sandbox answers on port {port}"
            ))),
        }
    }
}

/// Largest file `GET …/files` returns.
pub const MAX_READ_BYTES: u64 = 64 << 20;

impl SandboxManager {
    /// Runs `f` on the caller's live sandbox, on a blocking thread.
    async fn with_sandbox<T: Send + 'static>(
        &self,
        caller: &Principal,
        id: &str,
        f: impl FnOnce(&sandgate_jail::Sandbox) -> io::Result<T> + Send + 'static,
    ) -> Result<T, SandboxError> {
        let live = self.find(caller, id)?;
        let result = tokio::task::spawn_blocking(move || {
            let guard = live.jail.read().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(f)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
        match result {
            None => Err(SandboxError::NotFound),
            Some(r) => r.map_err(file_error),
        }
    }

    /// A file's bytes or a directory's entries, resolved inside the sandbox.
    pub async fn read_file(
        &self,
        caller: &Principal,
        id: &str,
        path: String,
    ) -> Result<sandgate_jail::FileContent, SandboxError> {
        check_path(&path)?;
        self.with_sandbox(caller, id, move |s| {
            s.read_path(&path, MAX_READ_BYTES, SANDBOX_USER)
        })
        .await
    }

    /// Writes a file (parents created), owned by the sandbox user.
    pub async fn write_file(
        &self,
        caller: &Principal,
        id: &str,
        path: String,
        data: Vec<u8>,
    ) -> Result<u64, SandboxError> {
        check_path(&path)?;
        self.with_sandbox(caller, id, move |s| {
            s.write_path(&path, &data, SANDBOX_USER)
        })
        .await
    }

    pub async fn remove_file(
        &self,
        caller: &Principal,
        id: &str,
        path: String,
    ) -> Result<(), SandboxError> {
        check_path(&path)?;
        self.with_sandbox(caller, id, move |s| s.remove_path(&path, SANDBOX_USER))
            .await
    }
}

/// What every sandbox is built from: the interpreters' files, and limits.
fn sandbox_spec(l: &SandboxLimits, memory_mb: u64, cpus: f64) -> Spec {
    Spec {
        files: vec![
            sandgate_jail::SandboxFile {
                name: ".python-kernel.py".into(),
                contents: PYTHON_KERNEL.as_bytes().to_vec(),
            },
            sandgate_jail::SandboxFile {
                name: ".javascript-kernel.js".into(),
                contents: JAVASCRIPT_KERNEL.as_bytes().to_vec(),
            },
            sandgate_jail::SandboxFile {
                name: ".code-client.py".into(),
                contents: CODE_CLIENT.as_bytes().to_vec(),
            },
        ],
        limits: Limits {
            memory_bytes: memory_mb << 20,
            pids: l.pids,
            cpu_millicores: (cpus * 1000.0).round() as u32,
            tmpfs_bytes: l.tmpfs_bytes,
            ..Limits::default()
        },
        ..Spec::default()
    }
}

/// The sandbox user (the jail's default).
const SANDBOX_UID: u32 = 65534;
/// Whose rights the files routes use: the sandbox user's, never the server's.
const SANDBOX_USER: sandgate_jail::FsUser = sandgate_jail::FsUser {
    uid: SANDBOX_UID,
    gid: SANDBOX_GID,
};
const SANDBOX_GID: u32 = 65534;

fn check_path(path: &str) -> Result<(), SandboxError> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(invalid("path", "path must be absolute, like /workspace/data.csv").into());
    }
    Ok(())
}

/// A file operation's failure, in API terms.
fn file_error(e: io::Error) -> SandboxError {
    use io::ErrorKind::*;
    match e.kind() {
        NotFound => SandboxError::FileNotFound,
        _ => {
            // Linux errno values: EROFS, ELOOP, ENOTDIR, EISDIR, ENOSPC.
            let why = match e.raw_os_error() {
                Some(30) => "that part of the sandbox is read-only".to_owned(),
                Some(40) => "the path ends in a symbolic link".to_owned(),
                Some(20) => "a parent of the path is not a directory".to_owned(),
                Some(21) => "the path is a directory".to_owned(),
                Some(28) => "the sandbox's disk is full".to_owned(),
                _ => e.to_string(),
            };
            SandboxError::Invalid(invalid("path", why))
        }
    }
}

/// Takes the longest complete UTF-8 text from the front of `buf` (invalid bytes
/// become U+FFFD), leaving an incomplete trailing sequence for the next read.
fn utf8_prefix(buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(buf) {
            Ok(s) => {
                out.push_str(s);
                buf.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[..valid]).expect("valid prefix"));
                match e.error_len() {
                    // Incomplete at the end: keep it for the next chunk.
                    None => {
                        buf.drain(..valid);
                        return out;
                    }
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        buf.drain(..valid + bad);
                    }
                }
            }
        }
    }
}

/// A checked exec, holding its sandbox.
pub struct PreparedExec {
    live: Arc<Live>,
    spec: Spec,
}

impl std::fmt::Debug for PreparedExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedExec")
            .field("argv0", &self.spec.argv.first())
            .finish()
    }
}

/// Exec, processes and code cells need a running sandbox: a paused one is a 409.
fn ensure_running(live: &Live) -> Result<(), SandboxError> {
    let state = live
        .record
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .view
        .state;
    if state == SandboxState::Paused {
        return Err(SandboxError::Conflict(
            "the sandbox is paused; resume it first".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_utf8_sequences_wait_for_their_end() {
        let snow = "☃".as_bytes();
        let mut buf = vec![b'a', snow[0]];
        assert_eq!(utf8_prefix(&mut buf), "a");
        buf.extend_from_slice(&snow[1..]);
        buf.push(b'b');
        assert_eq!(utf8_prefix(&mut buf), "☃b");
        assert!(buf.is_empty());
        let mut bad = vec![b'x', 0xff, b'y'];
        assert_eq!(utf8_prefix(&mut bad), "x\u{FFFD}y");
    }
}
