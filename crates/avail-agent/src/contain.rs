//! How this agent contains its process workloads (see `avail_driver::contain`): the
//! agent's settings, its private data directory, and the probe at start-up, which logs
//! what is in force.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use avail_driver::contain::uids::UidRange;
use avail_driver::contain::{self, ContainConfig, Containment, UserMode};

use crate::AgentConfig;

/// Containment settings of an agent (`avail agent --workload-uids ...`).
#[derive(Clone, Debug)]
pub struct ContainSettings {
    /// uids for process workloads, one per running instance.
    pub uids: UidRange,
    /// Where the instances' working directories live; `None`:
    /// [`contain::DEFAULT_WORK_ROOT`] when the agent is root, else `<data dir>/work`.
    pub work_root: Option<PathBuf>,
    /// Machine-wide lock directory of the uid allocator.
    pub uid_lock_dir: PathBuf,
    /// Use cgroup v2 where the machine has it.
    pub cgroups: bool,
    /// Processes and threads per instance.
    pub pids_max: u32,
}

impl Default for ContainSettings {
    fn default() -> Self {
        ContainSettings {
            uids: contain::DEFAULT_UIDS,
            work_root: None,
            uid_lock_dir: PathBuf::from(contain::DEFAULT_UID_LOCK_DIR),
            cgroups: true,
            pids_max: contain::DEFAULT_PIDS_MAX,
        }
    }
}

/// Make the data directory private (`0700`: artifacts and anything else of the agent
/// are not for workloads), then probe the containment and log it.
pub fn probe(cfg: &AgentConfig) -> Result<Containment, String> {
    let d = &cfg.data_dir;
    std::fs::create_dir_all(d)
        .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("{}: {e}", d.display()))?;
    let s = &cfg.contain;
    let root = contain::running_as_root();
    let work_root = s.work_root.clone().unwrap_or_else(|| {
        if root {
            PathBuf::from(contain::DEFAULT_WORK_ROOT)
        } else {
            d.join("work")
        }
    });
    let c = Containment::probe(ContainConfig {
        uids: s.uids,
        work_root,
        uid_lock_dir: s.uid_lock_dir.clone(),
        cgroups: s.cgroups,
        pids_max: s.pids_max,
        scope: format!("{}.{}", cfg.name, cfg.boot_id),
    })
    .map_err(|e| format!("process containment: {e}"))?;
    match c.user() {
        UserMode::PerInstance(_) => tracing::info!("{}", c.describe()),
        UserMode::Agent { .. } => tracing::warn!("{}", c.describe()),
    }
    Ok(c)
}
