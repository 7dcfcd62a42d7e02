//! Templates (SPEC §4): named, reusable starting points for sandboxes.
//!
//! A template is `files` written into `/workspace`, then `setup` commands run
//! once, in order, in a build sandbox isolated like any other (sandbox user, no
//! network, the template's limits, one deadline for the whole build). What the
//! build leaves in `/workspace` is captured into a **layer** on the host
//! (`<data dir>/templates/layers/<build id>`, see [`layer`]); sandboxes created
//! from the template get it as the read-only lower layer of an overlay
//! `/workspace`, copy-on-write, so starting one copies nothing and what one
//! writes no other sandbox (nor the template) sees. Only `/workspace` (the
//! sandbox user's `HOME`) is captured.
//!
//! Builds run in the background: a create, rebuild or a `PATCH` of `files` or
//! `setup` answers at once with status `building`, and the template becomes
//! `ready` or `failed` (with the commands' output in its log). A template can
//! start sandboxes only while it is `ready`; a new build replaces the layer for
//! new sandboxes, while running ones keep the layer they started on, which is
//! removed when the last of them is gone (or at the next start of the server).
//!
//! Templates belong to the tenant and env of the key that made them; another
//! caller gets "not found" (and an unknown `template` when creating a sandbox).
//! `default` is everyone's, always `ready`, and cannot be changed or deleted
//! (`409`). Records (with the last build's status and log) are kept in the
//! [`TemplateStore`]; a restarted server finds ready layers again and marks
//! builds it was running as failed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sandgate_jail::Jail;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::keys::api::{InvalidField, invalid};
use crate::keys::format::random_id;
use crate::model::{Env, Timestamp};
use crate::principal::Principal;
use crate::sandboxes::{CreateSandboxRequest, SandboxError, SandboxLimits};
use crate::store::StoreError;

mod build;
pub mod layer;
mod validate;

pub use layer::Layer;

/// The template every caller has: the base image, an empty `/workspace`.
pub const DEFAULT_TEMPLATE: &str = "default";

/// Server-wide bounds on templates.
#[derive(Debug, Clone)]
pub struct TemplateLimits {
    /// What a built `/workspace` may hold: file bytes (a sparse file counts its
    /// full length) and link targets. Also the size of the build's `/workspace`.
    pub max_layer_bytes: u64,
    /// Files, directories and links a built `/workspace` may hold.
    pub max_layer_entries: u64,
    /// One deadline for all of a build's setup commands.
    pub build_timeout: Duration,
    /// Templates one tenant may have in one env.
    pub max_per_tenant: usize,
    /// Builds running at once, server-wide; more wait their turn (`building`).
    pub max_concurrent_builds: usize,
}

impl Default for TemplateLimits {
    fn default() -> Self {
        TemplateLimits {
            max_layer_bytes: 512 << 20,
            max_layer_entries: 200_000,
            build_timeout: Duration::from_secs(600),
            max_per_tenant: 50,
            max_concurrent_builds: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TemplateStatus {
    /// A build is running (or waiting for a build slot).
    Building,
    /// The last build succeeded: sandboxes can start from it.
    Ready,
    /// The last build failed: see its log.
    Failed,
}

/// The template object of SPEC §4, with its last build.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateView {
    pub id: String,
    pub description: String,
    /// Written into `/workspace` before `setup` runs: absolute path → contents.
    pub files: BTreeMap<String, String>,
    /// Commands run once by `/bin/sh -c`, in order, in `/workspace`.
    pub setup: Vec<String>,
    /// Environment of the build and default environment of its sandboxes.
    pub env: BTreeMap<String, String>,
    /// Defaults of sandboxes created from it (`null`: the server's default).
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub timeout_sec: Option<u64>,
    pub network: Option<String>,
    /// `true` for `default`, which cannot be changed or deleted.
    pub builtin: bool,
    pub status: TemplateStatus,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The last (or current) build; `null` for `default`.
    pub build: Option<BuildView>,
}

/// One build of a template.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildView {
    pub id: String,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub duration_ms: Option<u64>,
    /// Bytes kept from `/workspace` (when ready).
    pub size_bytes: Option<u64>,
    /// Why it failed, in one line.
    pub error: Option<String>,
    /// Every command and its output (the last 64 KiB); left out of lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// What the store keeps of a template.
#[derive(Debug, Clone)]
pub struct TemplateRecord {
    pub tenant: String,
    pub env: Env,
    pub view: TemplateView,
}

/// `POST /v1/templates`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTemplateRequest {
    /// 1-64 of `a-z`, `0-9`, `-`, `_`, starting with a letter or digit.
    pub id: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Paths under `/workspace/`.
    #[serde(default)]
    pub files: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub setup: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub timeout_sec: Option<u64>,
    /// Only `none` (loopback only) for now.
    #[serde(default)]
    pub network: Option<String>,
}

/// `PATCH /v1/templates/{id}`: absent fields are unchanged; `null` puts a
/// sandbox default back to the server's. A change of `files` or `setup` rebuilds.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateTemplateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(
        default,
        deserialize_with = "crate::keys::api::double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<u64>")]
    pub memory_mb: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "crate::keys::api::double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<f64>")]
    pub cpus: Option<Option<f64>>,
    #[serde(
        default,
        deserialize_with = "crate::keys::api::double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<u64>")]
    pub timeout_sec: Option<Option<u64>>,
    #[serde(
        default,
        deserialize_with = "crate::keys::api::double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub network: Option<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("invalid {}: {}", .0.field, .0.message)]
    Invalid(InvalidField),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<InvalidField> for TemplateError {
    fn from(f: InvalidField) -> Self {
        TemplateError::Invalid(f)
    }
}

#[async_trait]
pub trait TemplateStore: Send + Sync + 'static {
    /// Inserts or replaces a template record.
    async fn save_template(&self, record: &TemplateRecord) -> Result<(), StoreError>;
    async fn delete_template(&self, tenant: &str, env: Env, id: &str) -> Result<(), StoreError>;
    /// Every template of every tenant (at start-up).
    async fn load_templates(&self) -> Result<Vec<TemplateRecord>, StoreError>;
}

/// (tenant, env, id): templates are partitioned like every other object.
type Key = (String, Env, String);

/// A template as the service holds it.
struct Entry {
    record: TemplateRecord,
    /// The built layer, while the template is ready.
    layer: Option<Arc<Layer>>,
    /// The build in progress, if any.
    build: Option<Arc<build::BuildRun>>,
}

/// Templates of every tenant, their builds and layers.
pub struct TemplateService {
    jail: Result<Arc<Jail>, String>,
    limits: TemplateLimits,
    /// The bounds a template's sandbox defaults must respect (as a create would).
    sandbox_limits: SandboxLimits,
    store: Arc<dyn TemplateStore>,
    dirs: layer::LayerDirs,
    /// Held across store writes, so the store sees changes in the order made.
    entries: tokio::sync::Mutex<HashMap<Key, Entry>>,
    /// Build slots ([`TemplateLimits::max_concurrent_builds`]).
    builds: Arc<tokio::sync::Semaphore>,
    /// When this service started (the `default` template's times).
    started_at: Timestamp,
    /// Shutting down: a build cut short is not recorded (the next start marks it
    /// failed).
    closed: AtomicBool,
}

impl std::fmt::Debug for TemplateService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateService")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl TemplateService {
    /// Loads every template, finds their layers under `data_dir`, marks builds a
    /// previous server left unfinished as failed, and removes layers nothing
    /// refers to any more.
    pub async fn start(
        jail: Result<Arc<Jail>, String>,
        limits: TemplateLimits,
        sandbox_limits: SandboxLimits,
        store: Arc<dyn TemplateStore>,
        data_dir: &std::path::Path,
    ) -> Result<Arc<TemplateService>, StoreError> {
        let dirs = layer::LayerDirs::prepare(data_dir)
            .map_err(|e| StoreError::Database(format!("template layers: {e}")))?;
        let now = Timestamp::now();
        let mut entries = HashMap::new();
        let mut kept = HashSet::new();
        for mut record in store.load_templates().await? {
            let mut layer = None;
            let mut changed = false;
            let view = &mut record.view;
            match (view.status, view.build.as_mut()) {
                (TemplateStatus::Building, Some(b)) => {
                    fail(
                        b,
                        now,
                        "the server stopped during the build; rebuild the template",
                    );
                    view.status = TemplateStatus::Failed;
                    changed = true;
                }
                (TemplateStatus::Ready, Some(b)) => match dirs.existing(&b.id) {
                    Some(path) => {
                        kept.insert(b.id.clone());
                        layer = Some(Arc::new(Layer::new(path)));
                    }
                    None => {
                        b.error = Some("its built files are gone; rebuild the template".into());
                        view.status = TemplateStatus::Failed;
                        changed = true;
                    }
                },
                _ => {}
            }
            if changed {
                tracing::warn!(template = %record.view.id, tenant = %record.tenant,
                    "template build did not survive the restart; marked failed");
                store.save_template(&record).await?;
            }
            let key = (record.tenant.clone(), record.env, record.view.id.clone());
            entries.insert(
                key,
                Entry {
                    record,
                    layer,
                    build: None,
                },
            );
        }
        dirs.sweep(&kept);
        Ok(Arc::new(TemplateService {
            jail,
            builds: Arc::new(tokio::sync::Semaphore::new(
                limits.max_concurrent_builds.max(1),
            )),
            limits,
            sandbox_limits,
            store,
            dirs,
            entries: tokio::sync::Mutex::new(entries),
            started_at: now,
            closed: AtomicBool::new(false),
        }))
    }

    pub fn limits(&self) -> &TemplateLimits {
        &self.limits
    }

    /// The built-in template.
    fn default_view(&self) -> TemplateView {
        TemplateView {
            id: DEFAULT_TEMPLATE.to_owned(),
            description: "The base image: Python, Node.js and bash, an empty /workspace".into(),
            files: BTreeMap::new(),
            setup: Vec::new(),
            env: BTreeMap::new(),
            memory_mb: None,
            cpus: None,
            timeout_sec: None,
            network: None,
            builtin: true,
            status: TemplateStatus::Ready,
            created_at: self.started_at,
            updated_at: self.started_at,
            build: None,
        }
    }

    /// `default`, then the caller's templates by id; without build logs.
    pub async fn list(&self, caller: &Principal) -> Vec<TemplateView> {
        let entries = self.entries.lock().await;
        let mut mine: Vec<TemplateView> = entries
            .iter()
            .filter(|((tenant, env, _), _)| *tenant == caller.tenant && *env == caller.env)
            .map(|(_, e)| {
                let mut view = e.record.view.clone();
                if let Some(b) = &mut view.build {
                    b.log = None;
                }
                view
            })
            .collect();
        mine.sort_by(|a, b| a.id.cmp(&b.id));
        let mut all = vec![self.default_view()];
        all.extend(mine);
        all
    }

    /// One template with its build log (as far as it got, while building).
    pub async fn get(&self, caller: &Principal, id: &str) -> Result<TemplateView, TemplateError> {
        if id == DEFAULT_TEMPLATE {
            return Ok(self.default_view());
        }
        let entries = self.entries.lock().await;
        let entry = entries
            .get(&key(caller, id))
            .ok_or(TemplateError::NotFound)?;
        Ok(entry.view_with_live_log())
    }

    /// Creates a template and starts its build; the answer says `building`.
    pub async fn create(
        self: &Arc<Self>,
        caller: &Principal,
        req: CreateTemplateRequest,
    ) -> Result<TemplateView, TemplateError> {
        let spec = validate::create(req, &self.sandbox_limits)?;
        let mut entries = self.entries.lock().await;
        let key = key(caller, &spec.id);
        if spec.id == DEFAULT_TEMPLATE || entries.contains_key(&key) {
            return Err(TemplateError::Conflict(format!(
                "a template `{}` already exists",
                spec.id
            )));
        }
        let mine = entries
            .keys()
            .filter(|(tenant, env, _)| *tenant == caller.tenant && *env == caller.env)
            .count();
        if mine >= self.limits.max_per_tenant {
            return Err(TemplateError::Conflict(format!(
                "the tenant has {mine} templates, the most it may; delete one first"
            )));
        }
        let now = Timestamp::now();
        let mut view = TemplateView {
            id: spec.id,
            description: spec.description,
            files: spec.files,
            setup: spec.setup,
            env: spec.env,
            memory_mb: spec.memory_mb,
            cpus: spec.cpus,
            timeout_sec: spec.timeout_sec,
            network: spec.network,
            builtin: false,
            status: TemplateStatus::Building,
            created_at: now,
            updated_at: now,
            build: None,
        };
        let run = new_build(&mut view, now);
        let record = TemplateRecord {
            tenant: caller.tenant.clone(),
            env: caller.env,
            view,
        };
        self.store.save_template(&record).await?;
        let entry = Entry {
            record,
            layer: None,
            build: Some(Arc::clone(&run)),
        };
        let view = entry.view_with_live_log();
        entries.insert(key.clone(), entry);
        drop(entries);
        self.spawn_build(key, run);
        Ok(view)
    }

    /// Builds the template again from its `files` and `setup` (a build in
    /// progress is abandoned).
    pub async fn rebuild(
        self: &Arc<Self>,
        caller: &Principal,
        id: &str,
    ) -> Result<TemplateView, TemplateError> {
        self.change(caller, id, |_, _| Ok(true)).await
    }

    /// Changes fields; a change of `files` or `setup` starts a new build.
    pub async fn update(
        self: &Arc<Self>,
        caller: &Principal,
        id: &str,
        req: UpdateTemplateRequest,
    ) -> Result<TemplateView, TemplateError> {
        self.change(caller, id, |view, this| {
            validate::update(view, req, &this.sandbox_limits)
        })
        .await
    }

    /// Applies `edit` (which says whether to rebuild) to a copy of the template,
    /// stores it, then makes it the template and starts the build.
    async fn change(
        self: &Arc<Self>,
        caller: &Principal,
        id: &str,
        edit: impl FnOnce(&mut TemplateView, &Self) -> Result<bool, TemplateError>,
    ) -> Result<TemplateView, TemplateError> {
        refuse_default(id)?;
        let mut entries = self.entries.lock().await;
        let key = key(caller, id);
        let entry = entries.get_mut(&key).ok_or(TemplateError::NotFound)?;
        let mut view = entry.record.view.clone();
        let rebuild = edit(&mut view, self)?;
        let now = Timestamp::now();
        view.updated_at = now;
        let run = rebuild.then(|| new_build(&mut view, now));
        let record = TemplateRecord {
            view,
            ..entry.record.clone()
        };
        self.store.save_template(&record).await?;
        entry.record = record;
        if let Some(run) = &run {
            entry.retire();
            entry.layer = None;
            entry.build = Some(Arc::clone(run));
        }
        let view = entry.view_with_live_log();
        drop(entries);
        if let Some(run) = run {
            self.spawn_build(key, run);
        }
        Ok(view)
    }

    /// Deletes a template. Sandboxes started from it keep their layer until they end.
    pub async fn delete(&self, caller: &Principal, id: &str) -> Result<(), TemplateError> {
        refuse_default(id)?;
        let mut entries = self.entries.lock().await;
        let key = key(caller, id);
        if !entries.contains_key(&key) {
            return Err(TemplateError::NotFound);
        }
        self.store.delete_template(&key.0, key.1, &key.2).await?;
        if let Some(entry) = entries.remove(&key) {
            entry.retire();
        }
        Ok(())
    }

    /// Fills in what `req` leaves open from its template (`env` merged, the
    /// request's variables winning) and returns the layer its `/workspace` starts
    /// from (`None` for `default`). A template the caller does not have is an
    /// invalid `template`; one not ready is a conflict.
    pub async fn prepare_sandbox(
        &self,
        caller: &Principal,
        mut req: CreateSandboxRequest,
    ) -> Result<(CreateSandboxRequest, Option<Arc<Layer>>), SandboxError> {
        let name = req
            .template
            .get_or_insert_with(|| DEFAULT_TEMPLATE.to_owned())
            .clone();
        if name == DEFAULT_TEMPLATE {
            return Ok((req, None));
        }
        let entries = self.entries.lock().await;
        let entry = entries
            .get(&key(caller, &name))
            .ok_or_else(|| invalid("template", format!("unknown template `{name}`")))?;
        let view = &entry.record.view;
        let layer = match (view.status, &entry.layer) {
            (TemplateStatus::Ready, Some(layer)) => Arc::clone(layer),
            (TemplateStatus::Building, _) => {
                return Err(SandboxError::Conflict(format!(
                    "template `{name}` is still building; try again when it is ready"
                )));
            }
            _ => {
                return Err(SandboxError::Conflict(format!(
                    "template `{name}` failed to build; see its log and rebuild it"
                )));
            }
        };
        req.timeout_sec = req.timeout_sec.or(view.timeout_sec);
        req.memory_mb = req.memory_mb.or(view.memory_mb);
        req.cpus = req.cpus.or(view.cpus);
        req.network = req.network.or_else(|| view.network.clone());
        if !view.env.is_empty() {
            let mut env = view.env.clone();
            env.extend(req.env.take().unwrap_or_default());
            req.env = Some(env);
        }
        Ok((req, Some(layer)))
    }

    /// Stops builds (server shutdown); layers stay on disk for the next start.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let entries = self.entries.lock().await;
        for entry in entries.values() {
            if let Some(run) = &entry.build {
                run.cancel();
            }
        }
    }

    fn spawn_build(self: &Arc<Self>, key: Key, run: Arc<build::BuildRun>) {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.run_build(key, run).await });
    }

    /// Waits for a build slot, builds on a blocking thread, and records the result
    /// if the build is still the template's current one.
    async fn run_build(self: Arc<Self>, key: Key, run: Arc<build::BuildRun>) {
        let permit = self.builds.clone().acquire_owned().await;
        // The template as it is now (a build waits its turn in `building`).
        let plan = {
            let entries = self.entries.lock().await;
            match entries.get(&key) {
                Some(e) if !run.is_cancelled() => {
                    build::Plan::of(&e.record.view, &self.limits, &self.sandbox_limits)
                }
                _ => return,
            }
        };
        let started = std::time::Instant::now();
        let outcome = match (&self.jail, permit) {
            (Err(why), _) => Err(format!("this server cannot run sandboxes: {why}")),
            (_, Err(_)) => Err("the server is stopping".to_owned()),
            (Ok(jail), Ok(permit)) => {
                let (jail, run2, dirs) = (Arc::clone(jail), Arc::clone(&run), self.dirs.clone());
                let limits = self.limits.clone();
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    build::execute(&jail, &plan, &run2, &dirs, &limits)
                })
                .await
                .unwrap_or_else(|e| Err(format!("the build crashed: {e}")))
            }
        };
        let now = Timestamp::now();
        let mut entries = self.entries.lock().await;
        let current = entries
            .get_mut(&key)
            .filter(|e| e.build.as_ref().is_some_and(|b| Arc::ptr_eq(b, &run)));
        let Some(entry) = current else {
            // Abandoned (rebuilt, changed, deleted): its layer goes.
            if let Ok(built) = outcome {
                Layer::new(built.path).retire();
            }
            return;
        };
        if self.closed.load(Ordering::Relaxed) && outcome.is_err() {
            // Cut short by shutdown: the next start marks it failed.
            return;
        }
        entry.build = None;
        let view = &mut entry.record.view;
        let b = view
            .build
            .as_mut()
            .expect("a building template has a build");
        b.finished_at = Some(now);
        b.duration_ms = Some(started.elapsed().as_millis() as u64);
        b.log = Some(run.log_text());
        match outcome {
            Ok(built) => {
                b.size_bytes = Some(built.bytes);
                view.status = TemplateStatus::Ready;
                entry.layer = Some(Arc::new(Layer::new(built.path)));
            }
            Err(why) => {
                b.error = Some(why);
                view.status = TemplateStatus::Failed;
            }
        }
        tracing::info!(template = %view.id, tenant = %entry.record.tenant,
            status = ?view.status, "template build finished");
        if let Err(e) = self.store.save_template(&entry.record).await {
            tracing::error!(error = %e, template = %entry.record.view.id, "could not record a template build");
        }
    }
}

impl Entry {
    /// The view, with the running build's log so far.
    fn view_with_live_log(&self) -> TemplateView {
        let mut view = self.record.view.clone();
        if let (Some(run), Some(b)) = (&self.build, view.build.as_mut()) {
            b.log = Some(run.log_text());
        }
        view
    }

    /// Abandons the build in progress and lets the layer go once unused.
    fn retire(&self) {
        if let Some(run) = &self.build {
            run.cancel();
        }
        if let Some(layer) = &self.layer {
            layer.retire();
        }
    }
}

fn key(caller: &Principal, id: &str) -> Key {
    (caller.tenant.clone(), caller.env, id.to_owned())
}

fn refuse_default(id: &str) -> Result<(), TemplateError> {
    if id == DEFAULT_TEMPLATE {
        return Err(TemplateError::Conflict(
            "the default template is built in: it cannot be changed, rebuilt or deleted".into(),
        ));
    }
    Ok(())
}

/// Marks `view` as building with a fresh build, and returns that build.
fn new_build(view: &mut TemplateView, now: Timestamp) -> Arc<build::BuildRun> {
    let run = Arc::new(build::BuildRun::new(random_id("bld_", 16)));
    view.status = TemplateStatus::Building;
    view.build = Some(BuildView {
        id: run.id.clone(),
        started_at: now,
        finished_at: None,
        duration_ms: None,
        size_bytes: None,
        error: None,
        log: None,
    });
    run
}

fn fail(b: &mut BuildView, now: Timestamp, why: &str) {
    b.finished_at = Some(now);
    b.error = Some(why.to_owned());
    let log = b.log.get_or_insert_with(String::new);
    log.push_str(&format!("\n[{why}]\n"));
}
