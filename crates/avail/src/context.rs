//! Where the CLI finds its server, token and CA: flags, then `AVAIL_ADDR` / `AVAIL_TOKEN` / `AVAIL_CACERT`,
//! then the context file that `avail up` writes (`$AVAIL_CONTEXT`, else
//! `$HOME/.avail/context.json`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The saved context.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Context {
    /// Server base URL.
    pub server: String,
    /// File holding the admin token.
    pub token_file: PathBuf,
    /// The cluster CA certificate that verifies the server.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Path of the context file.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AVAIL_CONTEXT") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".avail").join("context.json"))
}

/// Read the context file, if any.
pub fn load() -> Option<Context> {
    let text = std::fs::read_to_string(path()?).ok()?;
    serde_json::from_str(&text).ok()
}

/// Write the context file.
pub fn save(ctx: &Context) -> std::io::Result<PathBuf> {
    let p = path().ok_or_else(|| std::io::Error::other("no HOME and no AVAIL_CONTEXT"))?;
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&p, serde_json::to_vec_pretty(ctx)?)?;
    Ok(p)
}
