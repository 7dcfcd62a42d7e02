//! How client commands find their server: `SANDGATE_URL` and `SANDGATE_API_KEY`,
//! else what `sandgate auth login` saved, else the default local address.

use anyhow::{Context, Result};
use sandgate_client::Client;
use serde::{Deserialize, Serialize};

use crate::config::DEFAULT_ADDR;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SavedCredentials {
    pub url: String,
    pub key: String,
}

pub fn load_saved() -> Option<SavedCredentials> {
    let text = std::fs::read_to_string(crate::credentials_path()).ok()?;
    serde_json::from_str(&text).ok()
}

/// Saves with mode 0600 from the first byte (the file holds a key).
pub fn save(creds: &SavedCredentials) -> Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let path = crate::credentials_path();
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(serde_json::to_string_pretty(creds)?.as_bytes())?;
    Ok(path)
}

pub fn server_url() -> String {
    std::env::var("SANDGATE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| load_saved().map(|c| c.url))
        .unwrap_or_else(|| format!("http://{DEFAULT_ADDR}"))
}

pub fn client() -> Result<Client> {
    let key = std::env::var("SANDGATE_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .or_else(|| load_saved().map(|c| c.key))
        .context("no API key: set SANDGATE_API_KEY, run `sandgate auth login`, or pass --data-dir to work on a local store")?;
    make_client(&server_url(), Some(key))
}

/// A client of `url`; HTTPS trusts `SANDGATE_CA_CERT` (a PEM file) when it is set.
pub fn make_client(url: &str, key: Option<String>) -> Result<Client> {
    match std::env::var_os("SANDGATE_CA_CERT") {
        Some(path) => {
            let pem = std::fs::read(&path)
                .with_context(|| format!("reading SANDGATE_CA_CERT {}", path.to_string_lossy()))?;
            Ok(Client::with_ca_pem(url, key, &pem)?)
        }
        None => Ok(Client::new(url, key)),
    }
}
