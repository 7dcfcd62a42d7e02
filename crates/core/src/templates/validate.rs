//! The rules a template's fields follow, for creates and changes alike. A
//! template's sandbox defaults obey the same bounds as a sandbox create, so a
//! ready template never makes a create fail.

use std::collections::BTreeMap;

use super::{CreateTemplateRequest, TemplateError, TemplateView, UpdateTemplateRequest};
use crate::keys::api::{InvalidField, invalid};
use crate::sandboxes::SandboxLimits;

const MAX_ID: usize = 64;
const MAX_DESCRIPTION: usize = 1024;
const MAX_FILES: usize = 1000;
/// Contents of all `files` together.
const MAX_FILES_BYTES: usize = 8 << 20;
const MAX_SETUP: usize = 100;
const MAX_COMMAND: usize = 64 << 10;
const MAX_ENV: usize = 128;

/// A checked create request.
#[derive(Debug)]
pub(crate) struct Fields {
    pub id: String,
    pub description: String,
    pub files: BTreeMap<String, String>,
    pub setup: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub timeout_sec: Option<u64>,
    pub network: Option<String>,
}

pub(crate) fn create(
    req: CreateTemplateRequest,
    sl: &SandboxLimits,
) -> Result<Fields, InvalidField> {
    Ok(Fields {
        id: id(req.id)?,
        description: description(req.description.unwrap_or_default())?,
        files: files(req.files.unwrap_or_default())?,
        setup: setup(req.setup.unwrap_or_default())?,
        env: env(req.env.unwrap_or_default())?,
        memory_mb: req.memory_mb.map(|m| memory_mb(m, sl)).transpose()?,
        cpus: req.cpus.map(|c| cpus(c, sl)).transpose()?,
        timeout_sec: req.timeout_sec.map(|t| timeout_sec(t, sl)).transpose()?,
        network: req.network.map(network).transpose()?,
    })
}

/// Applies a change to `view`; whether it needs a new build (`files` or `setup`
/// changed).
pub(crate) fn update(
    view: &mut TemplateView,
    req: UpdateTemplateRequest,
    sl: &SandboxLimits,
) -> Result<bool, TemplateError> {
    let mut rebuild = false;
    if let Some(d) = req.description {
        view.description = description(d)?;
    }
    if let Some(f) = req.files {
        let f = files(f)?;
        rebuild |= f != view.files;
        view.files = f;
    }
    if let Some(s) = req.setup {
        let s = setup(s)?;
        rebuild |= s != view.setup;
        view.setup = s;
    }
    if let Some(e) = req.env {
        view.env = env(e)?;
    }
    if let Some(m) = req.memory_mb {
        view.memory_mb = m.map(|m| memory_mb(m, sl)).transpose()?;
    }
    if let Some(c) = req.cpus {
        view.cpus = c.map(|c| cpus(c, sl)).transpose()?;
    }
    if let Some(t) = req.timeout_sec {
        view.timeout_sec = t.map(|t| timeout_sec(t, sl)).transpose()?;
    }
    if let Some(n) = req.network {
        view.network = n.map(network).transpose()?;
    }
    Ok(rebuild)
}

fn id(id: String) -> Result<String, InvalidField> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(invalid(
            "id",
            format!(
                "id must be 1-{MAX_ID} of a-z, 0-9, '-' and '_', starting with a letter or digit"
            ),
        ));
    }
    Ok(id)
}

fn description(d: String) -> Result<String, InvalidField> {
    if d.len() > MAX_DESCRIPTION {
        return Err(invalid(
            "description",
            format!("at most {MAX_DESCRIPTION} bytes"),
        ));
    }
    Ok(d)
}

/// Paths under `/workspace/` (the only directory a build keeps), without `.`,
/// `..` or empty components.
fn files(files: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, InvalidField> {
    if files.len() > MAX_FILES {
        return Err(invalid("files", format!("at most {MAX_FILES} files")));
    }
    let total: usize = files.values().map(String::len).sum();
    if total > MAX_FILES_BYTES {
        return Err(invalid(
            "files",
            format!("the files' contents add up to more than {MAX_FILES_BYTES} bytes"),
        ));
    }
    for path in files.keys() {
        let rest = path.strip_prefix("/workspace/").unwrap_or_default();
        let ok = path.len() <= 4096
            && !rest.is_empty()
            && !path.contains('\0')
            && rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !ok {
            return Err(invalid(
                "files",
                format!(
                    "`{path}`: a file's path must be under /workspace/ (the directory a build keeps), without `.`, `..` or empty parts"
                ),
            ));
        }
    }
    Ok(files)
}

fn setup(commands: Vec<String>) -> Result<Vec<String>, InvalidField> {
    if commands.len() > MAX_SETUP {
        return Err(invalid("setup", format!("at most {MAX_SETUP} commands")));
    }
    for c in &commands {
        if c.trim().is_empty() || c.len() > MAX_COMMAND || c.contains('\0') {
            return Err(invalid(
                "setup",
                format!("each command must be non-empty and at most {MAX_COMMAND} bytes"),
            ));
        }
    }
    Ok(commands)
}

fn env(env: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, InvalidField> {
    Ok(crate::execute::validate_env(env, MAX_ENV)?
        .into_iter()
        .collect())
}

fn memory_mb(m: u64, sl: &SandboxLimits) -> Result<u64, InvalidField> {
    if !(32..=sl.max_memory_mb).contains(&m) {
        return Err(invalid(
            "memoryMb",
            format!("memoryMb must be between 32 and {}", sl.max_memory_mb),
        ));
    }
    Ok(m)
}

fn cpus(c: f64, sl: &SandboxLimits) -> Result<f64, InvalidField> {
    if !(c >= 0.1 && c <= sl.max_cpus) {
        return Err(invalid(
            "cpus",
            format!("cpus must be between 0.1 and {}", sl.max_cpus),
        ));
    }
    Ok(c)
}

fn timeout_sec(t: u64, sl: &SandboxLimits) -> Result<u64, InvalidField> {
    if t == 0 || t > sl.max_timeout_sec {
        return Err(invalid(
            "timeoutSec",
            format!("timeoutSec must be between 1 and {}", sl.max_timeout_sec),
        ));
    }
    Ok(t)
}

fn network(n: String) -> Result<String, InvalidField> {
    if n != "none" {
        return Err(invalid(
            "network",
            "only `none` (loopback only) is supported",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_stay_under_workspace() {
        let one = |p: &str| files(BTreeMap::from([(p.to_owned(), String::new())]));
        for good in ["/workspace/a.py", "/workspace/pkg/m.py", "/workspace/.env"] {
            assert!(one(good).is_ok(), "{good}");
        }
        for bad in [
            "/workspace/",
            "/workspace",
            "/tmp/x",
            "workspace/x",
            "/workspace/../etc/passwd",
            "/workspace/a/../../x",
            "/workspace//x",
            "/workspace/./x",
            "/workspace/x/",
            "/workspacex/y",
        ] {
            assert_eq!(one(bad).unwrap_err().field, "files", "{bad}");
        }
    }

    #[test]
    fn ids_are_plain_names() {
        for good in ["data-py", "a", "x_1", "9lives"] {
            assert!(id(good.into()).is_ok(), "{good}");
        }
        for bad in ["", "-x", "Data", "a/b", "a.b", "..", &"x".repeat(65)] {
            assert!(id(bad.into()).is_err(), "{bad}");
        }
    }
}
