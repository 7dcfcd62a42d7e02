//! `sandgate keys …`: on the local store with `--data-dir` (bootstrap and recovery,
//! with or without a server running on it), else through the server's API.
//! Both paths take the same request types and print the same JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand};
use sandgate_client::Client;
use sandgate_core::keys::api::{CreateKeyRequest, UpdateKeyRequest};
use sandgate_core::keys::review;
use sandgate_core::keys::{KeyError, KeyService, RequestContext};
use sandgate_core::model::{Env, RateLimit, Refill, Timestamp};
use sandgate_core::principal::Principal;
use sandgate_core::store::{SqliteStore, UsageStore};
use sandgate_core::usage::UsageQuery;
use serde_json::{Value, json};

use crate::{output, parse, remote};

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Work directly on the store in this data dir instead of calling a server.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Print the JSON object.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; its plaintext is printed once.
    Create(CreateArgs),
    /// List keys.
    List,
    /// Show one key.
    Get { id: String },
    /// Change a key's settings.
    Update(UpdateArgs),
    /// Revoke a key now.
    Revoke { id: String },
    /// Issue a new key with the same settings; the old one works for the grace period.
    Rotate {
        id: String,
        /// How long the old key keeps working (e.g. 7d, 12h, 0).
        #[arg(long)]
        grace: Option<String>,
    },
    /// What to look at this week: keys unused for 30+ days, expiring within 7 days,
    /// or refused unusually often.
    Audit,
    /// Set the executions remaining (default: the limit).
    ResetExecutions {
        id: String,
        #[arg(long)]
        remaining: Option<u64>,
    },
}

#[derive(Debug, Args)]
struct LimitArgs {
    /// Scopes, comma-separated or repeated (sandbox:*, keys:read, *, …).
    #[arg(long = "scope", value_delimiter = ',')]
    scopes: Vec<String>,
    /// A scope profile: read-only, sandbox-user, admin.
    #[arg(long)]
    profile: Option<String>,
    /// A rate limit like 60/min (repeatable).
    #[arg(long = "rate-limit")]
    rate_limits: Vec<String>,
    /// Executions allowed in all.
    #[arg(long)]
    executions_limit: Option<u64>,
    /// Add executions back on a schedule, up to the limit: AMOUNT/PERIOD, like
    /// 1000/30d or 100/day.
    #[arg(long)]
    executions_refill: Option<String>,
    /// A CIDR the key may be used from (repeatable).
    #[arg(long = "allowed-ip", value_delimiter = ',')]
    allowed_ips: Vec<String>,
    /// Metadata as key=value (repeatable).
    #[arg(long = "metadata")]
    metadata: Vec<String>,
    #[arg(long)]
    description: Option<String>,
    /// Expire this long from now (90d, 12h, …).
    #[arg(long)]
    expires_in: Option<String>,
    /// Expire at this RFC 3339 time.
    #[arg(long)]
    expires_at: Option<String>,
}

#[derive(Debug, Args)]
struct CreateArgs {
    #[arg(long)]
    name: String,
    /// live or test (default: live, or the calling key's env).
    #[arg(long)]
    env: Option<String>,
    /// The tenant owning the key (default: the caller's).
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, Args)]
struct UpdateArgs {
    id: String,
    #[arg(long)]
    name: Option<String>,
    /// Remove the executions limit (and its refill).
    #[arg(long, conflicts_with_all = ["executions_limit", "executions_refill"])]
    unlimited_executions: bool,
    /// Remove the executions refill.
    #[arg(long, conflicts_with = "executions_refill")]
    no_executions_refill: bool,
    /// Remove the expiry.
    #[arg(long, conflicts_with_all = ["expires_in", "expires_at"])]
    no_expiry: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

impl LimitArgs {
    fn scopes(&self) -> Option<Vec<String>> {
        (!self.scopes.is_empty()).then(|| self.scopes.clone())
    }

    fn rate_limits(&self) -> Result<Option<Vec<RateLimit>>> {
        if self.rate_limits.is_empty() {
            return Ok(None);
        }
        self.rate_limits
            .iter()
            .map(|s| {
                let v = parse::rate_limit(s).map_err(|e| anyhow!(e))?;
                Ok(serde_json::from_value(v)?)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn executions_refill(&self) -> Result<Option<Refill>> {
        self.executions_refill
            .as_deref()
            .map(|s| {
                let v = parse::refill(s).map_err(|e| anyhow!("--executions-refill {e}"))?;
                Ok(serde_json::from_value(v)?)
            })
            .transpose()
    }

    fn metadata(&self) -> Result<Option<BTreeMap<String, String>>> {
        if self.metadata.is_empty() {
            return Ok(None);
        }
        self.metadata
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| anyhow!("metadata `{kv}` is not key=value"))
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    fn expires_at(&self) -> Result<Option<Timestamp>> {
        match (&self.expires_in, &self.expires_at) {
            (Some(_), Some(_)) => Err(anyhow!("give --expires-in or --expires-at, not both")),
            (Some(d), None) => {
                let secs = parse::duration_secs(d).map_err(|e| anyhow!(e))?;
                Ok(Some(Timestamp::now().plus_secs(secs as i64)))
            }
            (None, Some(t)) => Timestamp::parse_rfc3339(t)
                .map(Some)
                .ok_or_else(|| anyhow!("--expires-at `{t}` is not an RFC 3339 time")),
            (None, None) => Ok(None),
        }
    }
}

fn create_request(args: &CreateArgs) -> Result<CreateKeyRequest> {
    let l = &args.limits;
    Ok(CreateKeyRequest {
        name: args.name.clone(),
        description: l.description.clone(),
        scopes: l.scopes(),
        profile: l.profile.clone(),
        env: args
            .env
            .as_deref()
            .map(str::parse::<Env>)
            .transpose()
            .map_err(|e| anyhow!(e))?,
        tenant: args.tenant.clone(),
        expires_at: l.expires_at()?,
        expires_in_sec: None,
        rate_limits: l.rate_limits()?,
        executions_limit: l.executions_limit,
        executions_refill: l.executions_refill()?,
        allowed_ips: (!l.allowed_ips.is_empty()).then(|| l.allowed_ips.clone()),
        metadata: l.metadata()?,
    })
}

fn update_request(args: &UpdateArgs) -> Result<UpdateKeyRequest> {
    let l = &args.limits;
    Ok(UpdateKeyRequest {
        name: args.name.clone(),
        description: l.description.clone().map(Some),
        scopes: l.scopes(),
        profile: l.profile.clone(),
        rate_limits: l.rate_limits()?,
        executions_limit: if args.unlimited_executions {
            Some(None)
        } else {
            l.executions_limit.map(Some)
        },
        executions_refill: if args.no_executions_refill {
            Some(None)
        } else {
            l.executions_refill()?.map(Some)
        },
        allowed_ips: (!l.allowed_ips.is_empty()).then(|| l.allowed_ips.clone()),
        expires_at: if args.no_expiry {
            Some(None)
        } else {
            l.expires_at()?.map(Some)
        },
        metadata: l.metadata()?,
    })
}

/// Where key operations go.
#[expect(clippy::large_enum_variant, reason = "one per process")]
enum Backend {
    Local {
        runtime: tokio::runtime::Runtime,
        service: KeyService,
        store: SqliteStore,
    },
    Remote(Client),
}

impl Backend {
    fn open(data_dir: Option<&PathBuf>) -> Result<Backend> {
        let Some(dir) = data_dir else {
            return Ok(Backend::Remote(remote::client()?));
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let store = SqliteStore::open(dir)
            .with_context(|| format!("opening the store in {}", dir.display()))?;
        let service = runtime.block_on(KeyService::load(Arc::new(store.clone())))?;
        Ok(Backend::Local {
            runtime,
            service,
            store,
        })
    }
}

fn local_context(what: &str) -> RequestContext {
    RequestContext {
        method: Some("CLI".into()),
        path: Some(format!("sandgate keys {what}")),
        ..RequestContext::default()
    }
}

fn local_error(e: KeyError) -> anyhow::Error {
    match e {
        KeyError::Invalid(f) => anyhow!("invalid {}: {}", f.field, f.message),
        other => anyhow!(other),
    }
}

pub fn run(args: KeysArgs) -> Result<ExitCode> {
    let backend = Backend::open(args.data_dir.as_ref())?;
    let operator = Principal::local_operator();
    let value: Value = match (&backend, &args.command) {
        (Backend::Remote(c), KeysCommand::Create(a)) => {
            c.create_key(&serde_json::to_value(create_request(a)?)?)?
        }
        (Backend::Remote(c), KeysCommand::List) => c.list_keys()?,
        (Backend::Remote(c), KeysCommand::Audit) => c.review_keys()?,
        (Backend::Remote(c), KeysCommand::Get { id }) => c.get_key(id)?,
        (Backend::Remote(c), KeysCommand::Update(a)) => {
            c.update_key(&a.id, &serde_json::to_value(update_request(a)?)?)?
        }
        (Backend::Remote(c), KeysCommand::Revoke { id }) => {
            c.revoke_key(id)?;
            json!({ "id": id, "revoked": true })
        }
        (Backend::Remote(c), KeysCommand::Rotate { id, grace }) => {
            c.rotate_key(id, grace_secs(grace.as_deref())?)?
        }
        (Backend::Remote(c), KeysCommand::ResetExecutions { id, remaining }) => {
            c.reset_executions(id, *remaining)?
        }
        (
            Backend::Local {
                runtime,
                service,
                store,
            },
            command,
        ) => runtime.block_on(async {
            let v = match command {
                KeysCommand::Audit => {
                    let now = Timestamp::now();
                    let keys = service.list_keys(&operator).await.map_err(local_error)?;
                    let (from_day, to_day) = review::usage_days(now);
                    let usage = store
                        .query_usage(&UsageQuery {
                            tenant_env: None,
                            from_day,
                            to_day,
                        })
                        .await?;
                    serde_json::to_value(review::review(keys, &usage, now))?
                }
                KeysCommand::Create(a) => serde_json::to_value(
                    service
                        .create_key(&operator, &local_context("create"), create_request(a)?)
                        .await
                        .map_err(local_error)?,
                )?,
                KeysCommand::List => {
                    json!({ "data": service.list_keys(&operator).await.map_err(local_error)? })
                }
                KeysCommand::Get { id } => serde_json::to_value(
                    service.get_key(&operator, id).await.map_err(local_error)?,
                )?,
                KeysCommand::Update(a) => serde_json::to_value(
                    service
                        .update_key(
                            &operator,
                            &local_context("update"),
                            &a.id,
                            update_request(a)?,
                        )
                        .await
                        .map_err(local_error)?,
                )?,
                KeysCommand::Revoke { id } => {
                    service
                        .revoke_key(&operator, &local_context("revoke"), id)
                        .await
                        .map_err(local_error)?;
                    json!({ "id": id, "revoked": true })
                }
                KeysCommand::Rotate { id, grace } => serde_json::to_value(
                    service
                        .rotate_key(
                            &operator,
                            &local_context("rotate"),
                            id,
                            grace_secs(grace.as_deref())?,
                        )
                        .await
                        .map_err(local_error)?,
                )?,
                KeysCommand::ResetExecutions { id, remaining } => serde_json::to_value(
                    service
                        .reset_executions(
                            &operator,
                            &local_context("reset-executions"),
                            id,
                            *remaining,
                        )
                        .await
                        .map_err(local_error)?,
                )?,
            };
            Ok::<Value, anyhow::Error>(v)
        })?,
    };
    print(&args, &value);
    Ok(ExitCode::SUCCESS)
}

fn grace_secs(grace: Option<&str>) -> Result<Option<u64>> {
    grace
        .map(|g| parse::duration_secs(g).map_err(|e| anyhow!(e)))
        .transpose()
}

fn print(args: &KeysArgs, value: &Value) {
    if args.json {
        return output::json(value);
    }
    match &args.command {
        KeysCommand::List => {
            let rows = value["data"].as_array().cloned().unwrap_or_default();
            output::table(
                &rows,
                &[
                    ("ID", "id"),
                    ("NAME", "name"),
                    ("PREFIX", "prefix"),
                    ("TENANT", "tenant"),
                    ("ENV", "env"),
                    ("SCOPES", "scopes"),
                    ("ACTIVE", "isActive"),
                    ("EXPIRES", "expiresAt"),
                    ("LAST USED", "lastUsedAt"),
                ],
            );
        }
        KeysCommand::Create(_) | KeysCommand::Rotate { .. } => {
            let mut shown = value.clone();
            let key = shown
                .as_object_mut()
                .and_then(|o| o.remove("key"))
                .unwrap_or(Value::Null);
            println!(
                "Key (shown only now; store it safely):\n\n  {}\n",
                key.as_str().unwrap_or("?")
            );
            output::fields(&shown);
        }
        KeysCommand::Revoke { id } => println!("revoked {id}"),
        KeysCommand::Audit => {
            for (title, list) in [
                ("Unused for 30 days or more", "unused"),
                ("Expiring within 7 days", "expiring"),
                ("Refused unusually often (last 7 days)", "unusualDenials"),
            ] {
                let rows = value[list].as_array().cloned().unwrap_or_default();
                println!("{title}: {}", rows.len());
                if !rows.is_empty() {
                    output::table(
                        &rows,
                        &[
                            ("ID", "id"),
                            ("NAME", "name"),
                            ("TENANT", "tenant"),
                            ("ENV", "env"),
                            ("WHY", "reason"),
                        ],
                    );
                }
                println!();
            }
        }
        _ => output::fields(value),
    }
}
