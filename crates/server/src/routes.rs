//! Every route of the API, with the access it requires, in one table.
//!
//! This is the file to audit: a route exists only by being added here with an
//! [`Access`], so a route without a declared scope cannot be written. The same
//! table builds the router, the [`Policy`] the authorization layer consults by
//! (method, route template), and the OpenAPI document.

use std::collections::HashMap;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, on};
use sandgate_core::scopes::Scope;
use schemars::{JsonSchema, Schema, SchemaGenerator};

use crate::e2b::{control, files, filesystem, interpreter, process};
use crate::handlers::{audit, execute, keys, meta, ports, sandboxes, templates, usage, webhooks};
use crate::state::AppState;

/// What a route demands of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credential needed (health, readiness, the OpenAPI document).
    Public,
    /// Any valid credential.
    Authenticated,
    /// A valid credential holding this scope.
    Scope(Scope),
    /// E2B's in-sandbox routes: the access token of the sandbox named in
    /// `E2b-Sandbox-Id`, whose owner's key must hold this scope (if any).
    SandboxToken(Option<Scope>),
}

pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// How a route's request or response body is shaped, for the OpenAPI document.
#[derive(Debug, Clone, Copy)]
pub enum Body {
    Json(SchemaFn),
    Text(&'static str),
    Empty,
}

/// One route: method, path template, access, and what the OpenAPI document says of it.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub request: Option<Body>,
    pub status: u16,
    pub response: Body,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    /// One of E2B's routes: errors also carry E2B's shape.
    pub e2b: bool,
}

impl RouteSpec {
    fn new(method: Method, path: &'static str, access: Access, operation_id: &'static str) -> Self {
        RouteSpec {
            method,
            path,
            access,
            operation_id,
            summary: "",
            request: None,
            status: 200,
            response: Body::Empty,
            query: &[],
            e2b: false,
        }
    }

    fn e2b(mut self) -> Self {
        self.e2b = true;
        self
    }

    fn summary(mut self, summary: &'static str) -> Self {
        self.summary = summary;
        self
    }

    fn body<T: JsonSchema>(mut self) -> Self {
        self.request = Some(Body::Json(schema_of::<T>));
        self
    }

    fn returns<T: JsonSchema>(mut self, status: u16) -> Self {
        self.status = status;
        self.response = Body::Json(schema_of::<T>);
        self
    }

    fn returns_text(mut self, content_type: &'static str) -> Self {
        self.response = Body::Text(content_type);
        self
    }

    fn no_content(mut self) -> Self {
        self.status = 204;
        self.response = Body::Empty;
        self
    }

    fn query(mut self, params: &'static [(&'static str, &'static str)]) -> Self {
        self.query = params;
        self
    }
}

fn get(path: &'static str, access: Access, op: &'static str) -> RouteSpec {
    RouteSpec::new(Method::GET, path, access, op)
}
fn post(path: &'static str, access: Access, op: &'static str) -> RouteSpec {
    RouteSpec::new(Method::POST, path, access, op)
}
fn patch(path: &'static str, access: Access, op: &'static str) -> RouteSpec {
    RouteSpec::new(Method::PATCH, path, access, op)
}
fn put(path: &'static str, access: Access, op: &'static str) -> RouteSpec {
    RouteSpec::new(Method::PUT, path, access, op)
}
fn delete(path: &'static str, access: Access, op: &'static str) -> RouteSpec {
    RouteSpec::new(Method::DELETE, path, access, op)
}

/// The router and the specs of every route in it, built together.
#[derive(Debug)]
pub struct RouteTable {
    router: Router<AppState>,
    specs: Vec<RouteSpec>,
}

impl RouteTable {
    fn new() -> Self {
        RouteTable {
            router: Router::new(),
            specs: Vec::new(),
        }
    }

    fn add<H, T>(mut self, spec: RouteSpec, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(spec.method.clone()).expect("a standard method");
        self.router = self.router.route(spec.path, on(filter, handler));
        self.specs.push(spec);
        self
    }

    pub fn specs(&self) -> &[RouteSpec] {
        &self.specs
    }

    pub fn into_parts(self) -> (Router<AppState>, Vec<RouteSpec>) {
        (self.router, self.specs)
    }
}

/// The whole API.
pub fn table() -> RouteTable {
    interpreter_routes(envd_files_routes(e2b_routes(v1_routes())))
}

/// Operations and `/v1`.
fn v1_routes() -> RouteTable {
    use Access::{Authenticated, Public, Scope as Needs};
    RouteTable::new()
        // ---- operations ----
        .add(
            get("/healthz", Public, "healthz")
                .summary("200 while the process serves")
                .returns::<meta::Health>(200),
            meta::healthz,
        )
        .add(
            get("/readyz", Public, "readyz")
                .summary("200 when storage answers")
                .returns::<meta::Readiness>(200),
            meta::readyz,
        )
        .add(
            get("/openapi.json", Public, "openapi")
                .summary("This document")
                .returns_text("application/json"),
            meta::openapi,
        )
        .add(
            get("/metrics", Needs(Scope::MetricsRead), "metrics")
                .summary("Prometheus metrics")
                .returns_text("text/plain; version=0.0.4"),
            meta::metrics,
        )
        // ---- keys ----
        .add(
            get("/v1/auth/whoami", Authenticated, "whoami")
                .summary("The calling key")
                .returns::<sandgate_core::keys::api::WhoAmI>(200),
            keys::whoami,
        )
        .add(
            post("/v1/keys", Needs(Scope::KeysManage), "createKey")
                .summary("Create a key; the plaintext is in this response only")
                .body::<sandgate_core::keys::api::CreateKeyRequest>()
                .returns::<sandgate_core::keys::api::CreatedKey>(201),
            keys::create_key,
        )
        .add(
            get("/v1/keys", Needs(Scope::KeysRead), "listKeys")
                .summary("Keys of the caller's tenant and env (all with tenants:manage)")
                .returns::<keys::KeyList>(200),
            keys::list_keys,
        )
        .add(
            get("/v1/keys/audit", Needs(Scope::KeysRead), "reviewKeys")
                .summary("Keys to look at: unused 30+ days, expiring within 7, unusual denials")
                .returns::<sandgate_core::keys::review::KeyReview>(200),
            keys::review_keys,
        )
        .add(
            get("/v1/keys/{id}", Needs(Scope::KeysRead), "getKey")
                .summary("One key")
                .returns::<sandgate_core::keys::api::KeyView>(200),
            keys::get_key,
        )
        .add(
            patch("/v1/keys/{id}", Needs(Scope::KeysManage), "updateKey")
                .summary("Change a key's settings")
                .body::<sandgate_core::keys::api::UpdateKeyRequest>()
                .returns::<sandgate_core::keys::api::KeyView>(200),
            keys::update_key,
        )
        .add(
            delete("/v1/keys/{id}", Needs(Scope::KeysManage), "revokeKey")
                .summary("Revoke a key now")
                .no_content(),
            keys::revoke_key,
        )
        .add(
            post(
                "/v1/keys/{id}/rotate",
                Needs(Scope::KeysManage),
                "rotateKey",
            )
            .summary("New key with the same settings; the old one works for the grace period")
            .body::<sandgate_core::keys::api::RotateKeyRequest>()
            .returns::<sandgate_core::keys::api::CreatedKey>(201),
            keys::rotate_key,
        )
        .add(
            post(
                "/v1/keys/{id}/reset-executions",
                Needs(Scope::BillingManage),
                "resetExecutions",
            )
            .summary("Set the executions remaining (default: the limit)")
            .body::<sandgate_core::keys::api::ResetExecutionsRequest>()
            .returns::<sandgate_core::keys::api::KeyView>(200),
            keys::reset_executions,
        )
        // ---- execution ----
        .add(
            post("/v1/execute", Needs(Scope::SandboxExecute), "execute")
                .summary("Run code once in a fresh jail; 200 whatever the program did")
                .body::<sandgate_core::execute::ExecuteRequest>()
                .returns::<sandgate_core::execute::ExecuteResponse>(200),
            execute::execute,
        )
        .add(
            get("/v1/languages", Authenticated, "listLanguages")
                .summary("Languages and their runtime versions")
                .returns::<execute::LanguageList>(200),
            execute::languages,
        )
        // ---- sandboxes ----
        .add(
            post(
                "/v1/sandboxes",
                Needs(Scope::SandboxCreate),
                "createSandbox",
            )
            .summary("Start a sandbox; it runs until killed or expired")
            .body::<sandgate_core::sandboxes::CreateSandboxRequest>()
            .returns::<sandgate_core::sandboxes::SandboxView>(201),
            sandboxes::create,
        )
        .add(
            get("/v1/sandboxes", Needs(Scope::SandboxRead), "listSandboxes")
                .summary("The caller's live sandboxes, oldest first")
                .query(&[
                    ("state", "running or paused"),
                    (
                        "metadata.<k>",
                        "only sandboxes whose metadata has k = this value",
                    ),
                    ("limit", "per page, 1-1000 (default 100)"),
                    ("cursor", "nextCursor of the previous page"),
                ])
                .returns::<sandboxes::SandboxList>(200),
            sandboxes::list,
        )
        .add(
            get(
                "/v1/sandboxes/{id}",
                Needs(Scope::SandboxRead),
                "getSandbox",
            )
            .summary("One sandbox")
            .returns::<sandgate_core::sandboxes::SandboxView>(200),
            sandboxes::get,
        )
        .add(
            delete(
                "/v1/sandboxes/{id}",
                Needs(Scope::SandboxDelete),
                "killSandbox",
            )
            .summary("Kill a sandbox and everything in it")
            .no_content(),
            sandboxes::kill,
        )
        .add(
            post(
                "/v1/sandboxes/{id}/pause",
                Needs(Scope::SandboxPause),
                "pauseSandbox",
            )
            .summary("Freeze every process (its expiry clock keeps running)")
            .returns::<sandgate_core::sandboxes::SandboxView>(200),
            sandboxes::pause,
        )
        .add(
            post(
                "/v1/sandboxes/{id}/resume",
                Needs(Scope::SandboxPause),
                "resumeSandbox",
            )
            .summary("Thaw a paused sandbox")
            .returns::<sandgate_core::sandboxes::SandboxView>(200),
            sandboxes::resume,
        )
        .add(
            post(
                "/v1/sandboxes/{id}/timeout",
                Needs(Scope::SandboxCreate),
                "setSandboxTimeout",
            )
            .summary("Kill the sandbox timeoutSec seconds from now")
            .body::<sandgate_core::sandboxes::TimeoutRequest>()
            .returns::<sandgate_core::sandboxes::SandboxView>(200),
            sandboxes::set_timeout,
        )
        .add(
            post(
                "/v1/sandboxes/{id}/exec",
                Needs(Scope::SandboxExecute),
                "execInSandbox",
            )
            .summary(
                "Run a command, or code, inside a sandbox (Accept: application/x-ndjson streams)",
            )
            .body::<sandgate_core::sandboxes::ExecRequest>()
            .returns::<sandgate_core::execute::ExecuteResponse>(200),
            sandboxes::exec,
        )
        .add(
            post(
                "/v1/sandboxes/{id}/code",
                Needs(Scope::SandboxExecute),
                "runCode",
            )
            .summary("Run a cell in the sandbox's persistent interpreter (state kept)")
            .body::<sandgate_core::sandboxes::CodeRequest>()
            .returns::<sandgate_core::execute::ExecuteResponse>(200),
            sandboxes::code,
        )
        .add(
            get(
                "/v1/sandboxes/{id}/files",
                Needs(Scope::SandboxFiles),
                "readSandboxFile",
            )
            .summary("A file's bytes, or a JSON listing of a directory (?path=/abs/path)")
            .query(&[("path", "absolute path inside the sandbox")])
            .returns::<sandboxes::DirListing>(200),
            sandboxes::read_file,
        )
        .add(
            put(
                "/v1/sandboxes/{id}/files",
                Needs(Scope::SandboxFiles),
                "writeSandboxFile",
            )
            .summary("Write the raw body to ?path= (parent directories created)")
            .query(&[("path", "absolute path inside the sandbox")])
            .returns::<sandboxes::Written>(200),
            sandboxes::write_file,
        )
        .add(
            delete(
                "/v1/sandboxes/{id}/files",
                Needs(Scope::SandboxFiles),
                "removeSandboxFile",
            )
            .summary("Remove a file, a link or a directory tree (?path=)")
            .query(&[("path", "absolute path inside the sandbox")])
            .no_content(),
            sandboxes::remove_file,
        )
        .add(
            post("/v1/sandboxes/{id}/ports", Needs(Scope::SandboxPorts), "openPort")
                .summary("Reach HTTP on a port inside the sandbox through sandgate")
                .body::<ports::OpenPort>()
                .returns::<ports::PortView>(200),
            ports::open,
        )
        .add(
            delete("/v1/sandboxes/{id}/ports/{port}", Needs(Scope::SandboxPorts), "closePort")
                .summary("Close an opened port")
                .no_content(),
            ports::close,
        )
        .add(
            get("/v1/sandboxes/{id}/ports/{port}/", Needs(Scope::SandboxPorts), "proxyPortRootGet")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy_root,
        )
        .add(
            get("/v1/sandboxes/{id}/ports/{port}/{*path}", Needs(Scope::SandboxPorts), "proxyPortGet")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy,
        )
        .add(
            post("/v1/sandboxes/{id}/ports/{port}/", Needs(Scope::SandboxPorts), "proxyPortRootPost")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy_root,
        )
        .add(
            post("/v1/sandboxes/{id}/ports/{port}/{*path}", Needs(Scope::SandboxPorts), "proxyPortPost")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy,
        )
        .add(
            put("/v1/sandboxes/{id}/ports/{port}/", Needs(Scope::SandboxPorts), "proxyPortRootPut")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy_root,
        )
        .add(
            put("/v1/sandboxes/{id}/ports/{port}/{*path}", Needs(Scope::SandboxPorts), "proxyPortPut")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy,
        )
        .add(
            patch("/v1/sandboxes/{id}/ports/{port}/", Needs(Scope::SandboxPorts), "proxyPortRootPatch")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy_root,
        )
        .add(
            patch("/v1/sandboxes/{id}/ports/{port}/{*path}", Needs(Scope::SandboxPorts), "proxyPortPatch")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy,
        )
        .add(
            delete("/v1/sandboxes/{id}/ports/{port}/", Needs(Scope::SandboxPorts), "proxyPortRootDelete")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy_root,
        )
        .add(
            delete("/v1/sandboxes/{id}/ports/{port}/{*path}", Needs(Scope::SandboxPorts), "proxyPortDelete")
                .summary("HTTP to the sandbox's port (the caller's credentials are not passed on)")
                .returns_text("*/*"),
            ports::proxy,
        )
        // ---- templates ----
        .add(
            get("/v1/templates", Needs(Scope::TemplateRead), "listTemplates")
                .summary("`default` and the caller's templates, with build status (no logs)")
                .returns::<templates::TemplateList>(200),
            templates::list,
        )
        .add(
            post("/v1/templates", Needs(Scope::TemplateWrite), "createTemplate")
                .summary("Create a template; its build runs in the background (status building)")
                .body::<sandgate_core::templates::CreateTemplateRequest>()
                .returns::<sandgate_core::templates::TemplateView>(201),
            templates::create,
        )
        .add(
            get("/v1/templates/{id}", Needs(Scope::TemplateRead), "getTemplate")
                .summary("One template, with its last build's status, timings and log")
                .returns::<sandgate_core::templates::TemplateView>(200),
            templates::get,
        )
        .add(
            post("/v1/templates/{id}", Needs(Scope::TemplateWrite), "rebuildTemplate")
                .summary("Build the template again; running sandboxes keep their files")
                .returns::<sandgate_core::templates::TemplateView>(200),
            templates::rebuild,
        )
        .add(
            patch("/v1/templates/{id}", Needs(Scope::TemplateWrite), "updateTemplate")
                .summary("Change fields; a change of files or setup rebuilds")
                .body::<sandgate_core::templates::UpdateTemplateRequest>()
                .returns::<sandgate_core::templates::TemplateView>(200),
            templates::update,
        )
        .add(
            delete("/v1/templates/{id}", Needs(Scope::TemplateWrite), "deleteTemplate")
                .summary("Delete a template; running sandboxes keep working")
                .no_content(),
            templates::delete,
        )
        // ---- usage ----
        .add(
            get("/v1/usage", Needs(Scope::BillingRead), "getUsage")
                .summary(
                    "Requests, denied requests, executions, CPU and sandbox time, by key or day",
                )
                .query(&[
                    (
                        "from",
                        "first day, YYYY-MM-DD or RFC 3339 (default: 30 days ago)",
                    ),
                    ("to", "last day, inclusive (default: today)"),
                    ("groupBy", "key (default) or day"),
                ])
                .returns::<usage::UsageList>(200),
            usage::get_usage,
        )
        // ---- audit ----
        .add(
            get("/v1/audit", Needs(Scope::AuditRead), "listAudit")
                .summary("Authentication attempts and key lifecycle events, newest first")
                .query(&[
                    ("keyId", "only rows of this key"),
                    ("outcome", "allowed or denied"),
                    (
                        "event",
                        "auth, key.created, key.updated, key.rotated, key.revoked, key.expired",
                    ),
                    ("limit", "rows per page, 1-1000 (default 100)"),
                    ("cursor", "nextCursor of the previous page"),
                ])
                .returns::<audit::AuditList>(200),
            audit::list_audit,
        )
        // ---- webhooks ----
        .add(
            post("/v1/webhooks", Needs(Scope::WebhooksManage), "createWebhook")
                .summary("Register a webhook for the caller's tenant and env; the secret is in this response only")
                .body::<sandgate_core::webhooks::api::CreateWebhookRequest>()
                .returns::<sandgate_core::webhooks::api::CreatedWebhook>(201),
            webhooks::create_webhook,
        )
        .add(
            get("/v1/webhooks", Needs(Scope::WebhooksManage), "listWebhooks")
                .summary("Webhooks of the caller's tenant and env (no secrets)")
                .returns::<webhooks::WebhookList>(200),
            webhooks::list_webhooks,
        )
        .add(
            delete(
                "/v1/webhooks/{id}",
                Needs(Scope::WebhooksManage),
                "deleteWebhook",
            )
            .summary("Delete a webhook and its pending deliveries")
            .no_content(),
            webhooks::delete_webhook,
        )
}

/// E2B's control plane, envd and code interpreter (SPEC §10), beside `/v1`.
fn e2b_routes(table: RouteTable) -> RouteTable {
    use Access::{SandboxToken, Scope as Needs};
    let envd = |name: &'static str, op: &'static str, scope: Scope| {
        post(name, SandboxToken(Some(scope)), op)
            .summary("envd (Connect RPC, JSON): the sandbox's access token in X-Access-Token")
            .returns_text("application/json")
            .e2b()
    };
    table
        // ---- control plane ----
        .add(
            post("/sandboxes", Needs(Scope::SandboxCreate), "e2bCreateSandbox")
                .summary("E2B: create a sandbox")
                .body::<control::NewSandbox>()
                .returns::<control::E2bSandbox>(201)
                .e2b(),
            control::create,
        )
        .add(
            post("/v2/sandboxes", Needs(Scope::SandboxCreate), "e2bCreateSandboxV2")
                .summary("E2B: create a sandbox")
                .body::<control::NewSandbox>()
                .returns::<control::E2bSandbox>(201)
                .e2b(),
            control::create,
        )
        .add(
            get("/sandboxes", Needs(Scope::SandboxRead), "e2bListSandboxes")
                .summary("E2B: the caller's running and paused sandboxes")
                .query(&[("metadata", "k=v&k2=v2, URL-encoded")])
                .returns::<Vec<control::E2bSandboxDetail>>(200)
                .e2b(),
            control::list,
        )
        .add(
            get("/v2/sandboxes", Needs(Scope::SandboxRead), "e2bListSandboxesV2")
                .summary("E2B: one page of the caller's sandboxes; the next page's token in x-next-token")
                .query(&[
                    ("metadata", "k=v&k2=v2, URL-encoded"),
                    ("state", "running, paused, or both comma-separated"),
                    ("limit", "per page, 1-1000 (default 100)"),
                    ("nextToken", "x-next-token of the previous page"),
                ])
                .returns::<Vec<control::E2bSandboxDetail>>(200)
                .e2b(),
            control::list_v2,
        )
        .add(
            get("/sandboxes/{id}", Needs(Scope::SandboxRead), "e2bGetSandbox")
                .summary("E2B: one sandbox, with its access token")
                .returns::<control::E2bSandboxDetail>(200)
                .e2b(),
            control::get,
        )
        .add(
            delete("/sandboxes/{id}", Needs(Scope::SandboxDelete), "e2bKillSandbox")
                .summary("E2B: kill a sandbox")
                .no_content()
                .e2b(),
            control::kill,
        )
        .add(
            post("/sandboxes/{id}/timeout", Needs(Scope::SandboxCreate), "e2bSetSandboxTimeout")
                .summary("E2B: kill the sandbox `timeout` seconds from now")
                .body::<control::TimeoutBody>()
                .no_content()
                .e2b(),
            control::set_timeout,
        )
        .add(
            post("/sandboxes/{id}/pause", Needs(Scope::SandboxPause), "e2bPauseSandbox")
                .summary("E2B: freeze every process of the sandbox")
                .body::<control::PauseBody>()
                .no_content()
                .e2b(),
            control::pause,
        )
        .add(
            post("/sandboxes/{id}/resume", Needs(Scope::SandboxPause), "e2bResumeSandbox")
                .summary("E2B: thaw a paused sandbox")
                .body::<control::ConnectBody>()
                .returns::<control::E2bSandbox>(201)
                .e2b(),
            control::resume,
        )
        .add(
            post("/sandboxes/{id}/connect", Needs(Scope::SandboxRead), "e2bConnectSandbox")
                .summary("E2B: attach to a sandbox (resumed when paused: needs sandbox:pause; a longer timeout needs sandbox:create)")
                .body::<control::ConnectBody>()
                .returns::<control::E2bSandbox>(200)
                .e2b(),
            control::connect,
        )
        .add(
            post("/v2/sandboxes/{id}/connect", Needs(Scope::SandboxRead), "e2bConnectSandboxV2")
                .summary("E2B: attach to a sandbox (resumed when paused: needs sandbox:pause; a longer timeout needs sandbox:create)")
                .body::<control::ConnectBody>()
                .returns::<control::E2bSandbox>(200)
                .e2b(),
            control::connect,
        )
        // ---- envd: processes ----
        .add(envd("/process.Process/Start", "envdProcessStart", Scope::SandboxExecute), process::start)
        .add(envd("/process.Process/Connect", "envdProcessConnect", Scope::SandboxExecute), process::connect)
        .add(envd("/process.Process/List", "envdProcessList", Scope::SandboxExecute), process::list)
        .add(envd("/process.Process/SendSignal", "envdProcessSendSignal", Scope::SandboxExecute), process::send_signal)
        .add(envd("/process.Process/SendInput", "envdProcessSendInput", Scope::SandboxExecute), process::send_input)
        .add(envd("/process.Process/StreamInput", "envdProcessStreamInput", Scope::SandboxExecute), process::stream_input)
        .add(envd("/process.Process/CloseStdin", "envdProcessCloseStdin", Scope::SandboxExecute), process::close_stdin)
        .add(envd("/process.Process/Update", "envdProcessUpdate", Scope::SandboxExecute), process::update)
        .add(
            get("/health", SandboxToken(None), "envdHealth")
                .summary("envd: 204 while the sandbox runs (its access token needed); the code interpreter (E2b-Sandbox-Port: 49999): 200 \"OK\"")
                .no_content()
                .e2b(),
            crate::e2b::health,
        )
}

/// envd's filesystem service and `/files` (SPEC §10): the sandbox's access
/// token, and `sandbox:files` of its owner's key.
fn envd_files_routes(table: RouteTable) -> RouteTable {
    use Access::SandboxToken;
    let files = SandboxToken(Some(Scope::SandboxFiles));
    let rpc = |name: &'static str, op: &'static str| {
        post(name, files, op)
            .summary("envd (Connect RPC, JSON): the sandbox's access token in X-Access-Token")
            .returns_text("application/json")
            .e2b()
    };
    let query: &'static [(&'static str, &'static str)] = &[
        ("path", "absolute, or relative to /home/user (`~` too)"),
        ("username", "user or root: both are the sandbox user"),
    ];
    table
        .add(rpc("/filesystem.Filesystem/Stat", "envdFilesystemStat"), filesystem::stat)
        .add(rpc("/filesystem.Filesystem/ListDir", "envdFilesystemListDir"), filesystem::list_dir)
        .add(rpc("/filesystem.Filesystem/MakeDir", "envdFilesystemMakeDir"), filesystem::make_dir)
        .add(rpc("/filesystem.Filesystem/Move", "envdFilesystemMove"), filesystem::move_entry)
        .add(rpc("/filesystem.Filesystem/Remove", "envdFilesystemRemove"), filesystem::remove)
        .add(rpc("/filesystem.Filesystem/WatchDir", "envdFilesystemWatchDir"), filesystem::watch_dir)
        .add(rpc("/filesystem.Filesystem/CreateWatcher", "envdFilesystemCreateWatcher"), filesystem::watcher)
        .add(rpc("/filesystem.Filesystem/GetWatcherEvents", "envdFilesystemGetWatcherEvents"), filesystem::watcher)
        .add(rpc("/filesystem.Filesystem/RemoveWatcher", "envdFilesystemRemoveWatcher"), filesystem::watcher)
        .add(
            get("/files", files, "envdDownloadFile")
                .summary("envd: a file's bytes, streamed (gzip with Accept-Encoding: gzip)")
                .query(query)
                .returns_text("application/octet-stream")
                .e2b(),
            files::download,
        )
        .add(
            post("/files", files, "envdUploadFiles")
                .summary("envd: write files from an octet-stream body (?path=) or multipart `file` parts (path in the filename), gzip allowed; parents made")
                .query(query)
                .returns::<Vec<files::WrittenFile>>(200)
                .e2b(),
            files::upload,
        )
}

/// E2B's code interpreter: requests with `E2b-Sandbox-Port: 49999`,
/// authenticated like envd's; every one needs sandbox:execute.
fn interpreter_routes(table: RouteTable) -> RouteTable {
    let access = Access::SandboxToken(Some(Scope::SandboxExecute));
    let route = |spec: RouteSpec, summary: &'static str| spec.summary(summary).e2b();
    table
        .add(
            route(
                post("/execute", access, "interpreterExecute"),
                "Code interpreter: run a cell in a code context; its output streams as JSON lines",
            )
            .body::<interpreter::ExecuteCell>()
            .returns_text("application/x-ndjson"),
            interpreter::execute,
        )
        .add(
            route(
                post("/contexts", access, "interpreterCreateContext"),
                "Code interpreter: a new code context (its own interpreter and state)",
            )
            .body::<interpreter::NewContext>()
            .returns::<interpreter::CodeContext>(200),
            interpreter::create_context,
        )
        .add(
            route(
                get("/contexts", access, "interpreterListContexts"),
                "Code interpreter: the sandbox's code contexts, the default ones first",
            )
            .returns::<Vec<interpreter::CodeContext>>(200),
            interpreter::list_contexts,
        )
        .add(
            route(
                delete("/contexts/{id}", access, "interpreterRemoveContext"),
                "Code interpreter: remove a code context and stop its interpreter",
            )
            .no_content(),
            interpreter::remove_context,
        )
        .add(
            route(
                post(
                    "/contexts/{id}/restart",
                    access,
                    "interpreterRestartContext",
                ),
                "Code interpreter: a fresh interpreter for a code context (its state is gone)",
            )
            .no_content(),
            interpreter::restart_context,
        )
}

/// Who may call what: (route template, method) → access. Consulted on every request.
#[derive(Debug, Default)]
pub struct Policy {
    by_path: HashMap<&'static str, Vec<(Method, Access)>>,
}

impl Policy {
    pub fn from_specs(specs: &[RouteSpec]) -> Policy {
        let mut by_path: HashMap<&'static str, Vec<(Method, Access)>> = HashMap::new();
        for s in specs {
            by_path
                .entry(s.path)
                .or_default()
                .push((s.method.clone(), s.access));
        }
        Policy { by_path }
    }

    /// `None` for a (method, route) the table does not have: the caller must refuse.
    pub fn access(&self, method: &Method, route: &str) -> Option<Access> {
        self.lookup(method, route).map(|(access, _)| access)
    }

    /// Like [`Policy::access`], with the table's own `'static` copy of the template.
    pub fn lookup(&self, method: &Method, route: &str) -> Option<(Access, &'static str)> {
        let (template, methods) = self.by_path.get_key_value(route)?;
        methods
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, a)| (*a, *template))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_policy_and_only_declared_ones_are_public() {
        let table = table();
        let policy = Policy::from_specs(table.specs());
        let public: Vec<&str> = table
            .specs()
            .iter()
            .filter(|s| s.access == Access::Public)
            .map(|s| s.path)
            .collect();
        assert_eq!(public, ["/healthz", "/readyz", "/openapi.json"]);
        for s in table.specs() {
            assert_eq!(
                policy.access(&s.method, s.path),
                Some(s.access),
                "{}",
                s.path
            );
        }
        assert_eq!(policy.access(&Method::PUT, "/v1/keys"), None);
        assert_eq!(policy.access(&Method::GET, "/v1/nope"), None);
    }

    #[test]
    fn method_and_path_together_decide() {
        let policy = Policy::from_specs(table().specs());
        assert_eq!(
            policy.access(&Method::GET, "/v1/keys/{id}"),
            Some(Access::Scope(Scope::KeysRead))
        );
        assert_eq!(
            policy.access(&Method::DELETE, "/v1/keys/{id}"),
            Some(Access::Scope(Scope::KeysManage))
        );
    }
}
