//! Containment of process workloads: their own user, a private working directory,
//! and cgroup v2 limits where the machine has them (rlimits where it does not).
//!
//! ```text
//!  agent (root)                           instance "web.3"
//!  ├─ Containment::probe   once:  uid range, work root, cgroup scope
//!  └─ Containment::enter   per instance:
//!       uid 9xxxxx  ── flock <lock dir>/<uid>, sweep leftovers of the uid
//!       workdir     ── <work root>/<scope>/web.3   0700, owned by the uid
//!                      (<work root> and <scope> are 0711: reachable, not listable)
//!       cgroup      ── <cgroup2>/avail/<scope>/web.3: cpu.max, memory.max, pids.max
//!       rlimits     ── RLIMIT_DATA / RLIMIT_NPROC for what no cgroup controller limits
//!  shim (root) ── fork ── join cgroup, setrlimit, setgroups(0), setgid, setuid,
//!                         chdir workdir, NO_NEW_PRIVS ── exec program
//!  end of instance: kill the cgroup (and every process of the uid), remove the cgroup
//!  and the workdir, free the uid.
//! ```
//!
//! When the agent is not root it cannot switch users: programs then run as the agent's
//! own user (they can read what that user can) and [`Containment::describe`] says so.
//! Scopes (`<node>.<boot id>`) of agent runs whose process is gone are removed at the
//! next probe.

pub mod cgroup;
pub mod exec;
pub mod uids;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use avail_model::WorkloadSpec;

use self::cgroup::{CgroupScope, InstanceCgroup, Limits};
use self::exec::{ChildSetup, Rlimit};
use self::uids::{UidLease, UidRange};

/// Default range of workload uids.
pub const DEFAULT_UIDS: UidRange = UidRange {
    first: 900_000,
    last: 999_999,
};
/// Default work root of an agent running as root.
pub const DEFAULT_WORK_ROOT: &str = "/var/lib/avail/work";
/// Default lock directory of the uid allocator (machine-wide: every agent shares it).
pub const DEFAULT_UID_LOCK_DIR: &str = "/run/avail/uids";
/// Default `pids.max` (and `RLIMIT_NPROC`) of an instance.
pub const DEFAULT_PIDS_MAX: u32 = 256;

/// How an agent contains its process workloads.
#[derive(Clone, Debug)]
pub struct ContainConfig {
    /// uids to run programs as (when the agent is root).
    pub uids: UidRange,
    /// Where the per-instance working directories live.
    pub work_root: PathBuf,
    /// Where the uid locks live.
    pub uid_lock_dir: PathBuf,
    /// Use cgroup v2 when the machine has it.
    pub cgroups: bool,
    /// Processes and threads per instance.
    pub pids_max: u32,
    /// This agent run's name: `<node>.<boot id>`; its directories and cgroups.
    pub scope: String,
}

/// Errors setting up containment; each names what it was about.
#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    /// A directory could not be made or fixed.
    #[error("{path}: {reason}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// No uid.
    #[error(transparent)]
    Uid(#[from] uids::UidError),
    /// A cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
}

fn dir_err(p: &Path, e: impl std::fmt::Display) -> ContainError {
    ContainError::Dir {
        path: p.display().to_string(),
        reason: e.to_string(),
    }
}

/// Which user programs run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserMode {
    /// A uid of this range per instance.
    PerInstance(UidRange),
    /// The agent's own uid (it is not root): no separation from the agent.
    Agent {
        /// The agent's uid.
        uid: u32,
    },
}

/// What an agent's containment gives, probed once ([`Containment::probe`]).
#[derive(Debug)]
pub struct Containment {
    cfg: ContainConfig,
    user: UserMode,
    cgroups: Option<CgroupScope>,
    /// `None` for [`Containment::none`]: programs run in the agent's directory.
    scope_dir: Option<PathBuf>,
    next: AtomicU64,
}

/// Whether this process runs as root (effective uid 0).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a scope name `<node>.<pid hex>-<nanos hex>` belongs to an agent that is gone.
pub fn scope_is_stale(name: &str) -> bool {
    let Some((_, boot)) = name.rsplit_once('.') else {
        return false;
    };
    let Some(pid) = boot
        .split_once('-')
        .and_then(|(p, _)| i32::from_str_radix(p, 16).ok())
    else {
        return false;
    };
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn mode(p: &Path, m: u32) -> Result<(), ContainError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).map_err(|e| dir_err(p, e))
}

impl Containment {
    /// No containment: programs run as the caller, in its directory (library use).
    pub fn none() -> Containment {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        Containment {
            cfg: ContainConfig {
                uids: DEFAULT_UIDS,
                work_root: PathBuf::new(),
                uid_lock_dir: PathBuf::new(),
                cgroups: false,
                pids_max: DEFAULT_PIDS_MAX,
                scope: String::new(),
            },
            user: UserMode::Agent { uid },
            cgroups: None,
            scope_dir: None,
            next: AtomicU64::new(1),
        }
    }

    /// A file every instance may read and none may change or list: `src` linked (or
    /// copied) as `<scope>/shared/<name>`, mode 0444, in a directory that is reachable
    /// and not listable (0711). For a VM's kernel and initrd, named by their digest.
    /// Without containment, `src` itself.
    pub fn shared_file(&self, name: &str, src: &Path) -> Result<PathBuf, ContainError> {
        let Some(scope) = &self.scope_dir else {
            return Ok(src.to_path_buf());
        };
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(dir_err(Path::new(name), "not a plain file name"));
        }
        let dir = scope.join("shared");
        std::fs::create_dir_all(&dir).map_err(|e| dir_err(&dir, e))?;
        mode(&dir, 0o711)?;
        let dst = dir.join(name);
        if !dst.exists() {
            // A name of its own: two instances may share the same file at once.
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.{}.{n}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(src, &tmp).is_err() {
                std::fs::copy(src, &tmp).map_err(|e| dir_err(&tmp, e))?;
            }
            mode(&tmp, 0o444)?;
            std::fs::rename(&tmp, &dst).map_err(|e| dir_err(&dst, e))?;
        }
        Ok(dst)
    }

    /// Probe the machine and set up this agent run's directories and cgroup scope.
    pub fn probe(cfg: ContainConfig) -> Result<Containment, ContainError> {
        // SAFETY: getuid has no preconditions.
        let own = unsafe { libc::getuid() };
        let user = if uids::can_switch_to(cfg.uids.first) {
            UserMode::PerInstance(cfg.uids)
        } else {
            UserMode::Agent { uid: own }
        };
        let per_instance = matches!(user, UserMode::PerInstance(_));
        // The work root and the scope: reachable by every uid, listable by none.
        let traverse = if per_instance { 0o711 } else { 0o700 };
        std::fs::create_dir_all(&cfg.work_root).map_err(|e| dir_err(&cfg.work_root, e))?;
        mode(&cfg.work_root, traverse)?;
        if let Ok(entries) = std::fs::read_dir(&cfg.work_root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name != cfg.scope && scope_is_stale(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let scope_dir = cfg.work_root.join(&cfg.scope);
        std::fs::create_dir_all(&scope_dir).map_err(|e| dir_err(&scope_dir, e))?;
        mode(&scope_dir, traverse)?;
        if per_instance {
            check_reachable(&scope_dir)?;
        }
        let cgroups = if cfg.cgroups && own == 0 {
            match cgroup::cgroup2_mount() {
                Some(m) => match CgroupScope::create(&m, &cfg.scope, scope_is_stale) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!("cgroup v2 not usable: {e}");
                        None
                    }
                },
                None => None,
            }
        } else {
            None
        };
        Ok(Containment {
            cfg,
            user,
            cgroups,
            scope_dir: Some(scope_dir),
            next: AtomicU64::new(1),
        })
    }

    /// Which user programs run as.
    pub fn user(&self) -> &UserMode {
        &self.user
    }

    /// The cgroup scope, when cgroups are in use.
    pub fn cgroup_scope(&self) -> Option<&CgroupScope> {
        self.cgroups.as_ref()
    }

    /// One line saying what is in force, for the agent's log.
    pub fn describe(&self) -> String {
        let user = match &self.user {
            UserMode::PerInstance(r) => format!("a uid per instance from {r}"),
            UserMode::Agent { uid } => format!(
                "the agent's own uid {uid} (not root: cannot switch users; workloads can read what the agent can)"
            ),
        };
        let dir = match &self.scope_dir {
            Some(d) => format!("private working directories under {}", d.display()),
            None => "the agent's working directory".into(),
        };
        let limits = match &self.cgroups {
            Some(s) => {
                let missing: Vec<&str> = cgroup::CONTROLLERS
                    .iter()
                    .copied()
                    .filter(|c| !s.has(c))
                    .collect();
                if missing.is_empty() {
                    format!("cgroup v2 at {} (cpu, memory, pids)", s.dir.display())
                } else {
                    format!(
                        "cgroup v2 at {} (controllers {:?}; missing {missing:?}: {})",
                        s.dir.display(),
                        s.controllers,
                        self.fallback_note(s)
                    )
                }
            }
            None => format!("no cgroup v2: {}", self.fallback_note_none()),
        };
        format!("process workloads run as {user}, in {dir}; limits: {limits}")
    }

    fn fallback_note(&self, s: &CgroupScope) -> String {
        let mut n = Vec::new();
        if !s.has("memory") {
            n.push("memory by RLIMIT_DATA");
        }
        if !s.has("pids") {
            n.push(if self.per_instance() {
                "processes by RLIMIT_NPROC"
            } else {
                "processes not limited"
            });
        }
        if !s.has("cpu") {
            n.push("cpu not limited");
        }
        n.join(", ")
    }

    fn fallback_note_none(&self) -> String {
        format!(
            "memory by RLIMIT_DATA, {}, cpu not limited, no cgroup kill",
            if self.per_instance() {
                "processes by RLIMIT_NPROC"
            } else {
                "processes not limited"
            }
        )
    }

    fn per_instance(&self) -> bool {
        matches!(self.user, UserMode::PerInstance(_))
    }

    /// Set up one instance of `spec`: its uid, working directory and cgroup. Blocking
    /// (file system and cgroup writes).
    pub fn enter(&self, spec: &WorkloadSpec) -> Result<Confinement, ContainError> {
        let Some(scope_dir) = &self.scope_dir else {
            return Ok(Confinement::default());
        };
        let name = format!(
            "{}.{}",
            spec.name,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let lease = match &self.user {
            UserMode::PerInstance(r) => Some(uids::allocate(*r, &self.cfg.uid_lock_dir)?),
            UserMode::Agent { .. } => None,
        };
        let mut c = Confinement {
            per_instance_uid: lease.as_ref().map(|l| l.uid),
            lease,
            ..Confinement::default()
        };
        match self.set_up(&mut c, scope_dir, &name, spec) {
            Ok(()) => Ok(c),
            Err(e) => {
                // Undo what was made (directory, cgroup) and free the uid.
                c.release();
                Err(e)
            }
        }
    }

    fn set_up(
        &self,
        c: &mut Confinement,
        scope_dir: &Path,
        name: &str,
        spec: &WorkloadSpec,
    ) -> Result<(), ContainError> {
        let workdir = scope_dir.join(name);
        // A leftover of the same name (impossible within one run) is removed first.
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir(&workdir).map_err(|e| dir_err(&workdir, e))?;
        c.workdir = Some(workdir.clone());
        mode(&workdir, 0o700)?;
        if let Some(uid) = c.per_instance_uid {
            std::os::unix::fs::chown(&workdir, Some(uid), Some(uid))
                .map_err(|e| dir_err(&workdir, e))?;
        }
        let limits = Limits {
            cpu_millis: spec.resources.cpu_millis,
            memory_bytes: u64::from(spec.resources.memory_mib) << 20,
            pids: self.cfg.pids_max,
        };
        if let Some(scope) = &self.cgroups {
            c.cgroup = Some(scope.instance(name, &limits)?);
        }
        let has = |ctl: &str| self.cgroups.as_ref().is_some_and(|s| s.has(ctl));
        if !has("memory") {
            c.rlimits.push(Rlimit::DataBytes(limits.memory_bytes));
        }
        if !has("pids") && c.per_instance_uid.is_some() {
            c.rlimits.push(Rlimit::Nproc(u64::from(limits.pids)));
        }
        c.limits = Some(limits);
        c.cpu_limited = has("cpu");
        Ok(())
    }
}

/// Every ancestor of `dir` must let other users through (`o+x`), or a workload could
/// not reach its working directory.
fn check_reachable(dir: &Path) -> Result<(), ContainError> {
    use std::os::unix::fs::PermissionsExt;
    for a in dir.ancestors() {
        let m = std::fs::metadata(a).map_err(|e| dir_err(a, e))?;
        if m.permissions().mode() & 0o001 == 0 {
            return Err(dir_err(
                dir,
                format!(
                    "{} (mode {:o}) does not let other users through: a workload's uid could not reach its working directory; choose another --work-root",
                    a.display(),
                    m.permissions().mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// One instance's containment: its uid, directory, cgroup and limits. Undone by
/// [`Confinement::release`] (blocking).
#[derive(Debug, Default)]
pub struct Confinement {
    lease: Option<UidLease>,
    per_instance_uid: Option<u32>,
    workdir: Option<PathBuf>,
    cgroup: Option<InstanceCgroup>,
    rlimits: Vec<Rlimit>,
    limits: Option<Limits>,
    cpu_limited: bool,
}

impl Confinement {
    /// What the program's process applies to itself before exec.
    pub fn child_setup(&self) -> ChildSetup {
        ChildSetup {
            user: self.per_instance_uid.map(|u| (u, u)),
            workdir: self.workdir.clone(),
            cgroup_procs: self.cgroup.as_ref().map(InstanceCgroup::procs),
            rlimits: self.rlimits.clone(),
        }
    }

    /// The working directory, if private.
    pub fn workdir(&self) -> Option<&Path> {
        self.workdir.as_deref()
    }

    /// The per-instance uid, if any.
    pub fn uid(&self) -> Option<u32> {
        self.per_instance_uid
    }

    /// The instance's cgroup directory, if any.
    pub fn cgroup_dir(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(|c| c.dir.as_path())
    }

    /// One line for the workload's log.
    pub fn describe(&self) -> String {
        let Some(l) = self.limits else {
            return "not contained".into();
        };
        let mut parts = vec![match self.per_instance_uid {
            Some(u) => format!("uid {u}"),
            None => "the agent's uid".into(),
        }];
        if let Some(w) = &self.workdir {
            parts.push(format!("workdir {}", w.display()));
        }
        match &self.cgroup {
            Some(c) => parts.push(format!("cgroup {}", c.dir.display())),
            None => parts.push("no cgroup".into()),
        }
        parts.push(if self.cpu_limited {
            format!("cpu.max {}", l.cpu_max())
        } else {
            "cpu not limited".into()
        });
        for r in &self.rlimits {
            parts.push(match r {
                Rlimit::Nproc(n) => format!("RLIMIT_NPROC {n}"),
                Rlimit::DataBytes(b) => format!("RLIMIT_DATA {} MiB", b >> 20),
            });
        }
        if !self
            .rlimits
            .iter()
            .any(|r| matches!(r, Rlimit::DataBytes(_)))
        {
            parts.push(format!("memory.max {} MiB", l.memory_bytes >> 20));
        }
        if self.cgroup.is_some() && !self.rlimits.iter().any(|r| matches!(r, Rlimit::Nproc(_))) {
            parts.push(format!("pids.max {}", l.pids));
        }
        format!("contained: {}", parts.join(", "))
    }

    /// Kill every process of the instance: its cgroup, and everything running as its
    /// uid. Blocking (waits for the cgroup to empty, up to [`cgroup::KILL_WAIT`]).
    pub fn kill_all(&self) {
        if let Some(c) = &self.cgroup {
            c.kill();
        }
        if let Some(uid) = self.per_instance_uid {
            uids::sweep(uid);
        }
    }

    /// Kill everything, remove the cgroup and the working directory, free the uid.
    /// Blocking.
    pub fn release(mut self) {
        self.kill_all();
        if let Some(c) = self.cgroup.take() {
            c.remove();
        }
        if let Some(w) = self.workdir.take()
            && let Err(e) = std::fs::remove_dir_all(&w)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", w.display());
        }
        drop(self.lease.take());
    }
}

impl Containment {
    /// Remove this run's scope (its directory and cgroup) when the agent stops; what
    /// is still in it is killed.
    pub fn remove_scope(&self) {
        if let Some(s) = &self.cgroups {
            s.remove();
        }
        if let Some(d) = &self.scope_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_scopes_are_those_of_dead_agents() {
        let me = format!("node-1.{:x}-{:x}", std::process::id(), 12345);
        assert!(!scope_is_stale(&me));
        assert!(scope_is_stale("node-1.7ffffffe-1"));
        assert!(!scope_is_stale("something-else"));
    }
}
