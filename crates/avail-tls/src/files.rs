//! Private files: keys and tokens are written readable by their owner only.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Write a secret file readable by its owner only (created 0600 beside the target,
/// synced, then renamed over it: never half-written, never readable by others).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path)
}

/// Write a public file (a certificate): 0644, same all-or-nothing rename.
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_private(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
}
