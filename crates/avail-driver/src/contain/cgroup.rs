//! cgroup v2: one cgroup per contained instance, limits from its spec, killed whole.
//!
//! Layout: `<cgroup2 mount>/avail/<scope>/<instance>`, where the scope is one agent run
//! (`<node>.<boot id>`). The probe finds the cgroup2 mount in `/proc/self/mountinfo`
//! (`/sys/fs/cgroup` on a pure cgroup v2 machine; a hybrid machine's
//! `/sys/fs/cgroup/unified` otherwise), creates the scope and enables the `cpu`,
//! `memory` and `pids` controllers down to it as far as the machine allows. A cgroup
//! without a controller still groups the processes: `cgroup.kill` (or a kill of every
//! pid listed) takes down everything the program started, `setsid` or not; the
//! controllers it lacks are replaced by rlimits (see [`super`]).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Controllers avail uses.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// `cpu.max` period, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest `cpu.max` quota the kernel takes, microseconds.
pub const CPU_MIN_QUOTA_US: u64 = 1_000;
/// How long a kill waits for the cgroup to empty.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// Errors of cgroup operations; each names the file or directory.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {reason}")]
pub struct CgroupError {
    /// The file or directory.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> CgroupError {
    CgroupError {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The mount point of the cgroup2 hierarchy, if any (`/sys/fs/cgroup` preferred).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(left.split_whitespace().nth(4)?))
        })
        .collect();
    found.sort_by_key(|p| p != Path::new("/sys/fs/cgroup"));
    found.into_iter().next()
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// One agent run's cgroup, under which its instances' cgroups live.
#[derive(Clone, Debug)]
pub struct CgroupScope {
    /// `<mount>/avail/<scope>`.
    pub dir: PathBuf,
    /// The controllers its children get (of [`CONTROLLERS`]).
    pub controllers: Vec<String>,
}

impl CgroupScope {
    /// Create `<mount>/avail/<scope>` and enable what it can of [`CONTROLLERS`] on the
    /// way; removes scopes of agent runs that are gone (`is_stale` says which).
    pub fn create(
        mount: &Path,
        scope: &str,
        is_stale: impl Fn(&str) -> bool,
    ) -> Result<CgroupScope, CgroupError> {
        let base = mount.join("avail");
        let dir = base.join(scope);
        std::fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name != scope && e.path().is_dir() && is_stale(&name) {
                    remove_tree(&e.path());
                }
            }
        }
        let available = words(&mount.join("cgroup.controllers"));
        for c in CONTROLLERS
            .iter()
            .filter(|c| available.iter().any(|a| a == *c))
        {
            // Each level passes the controller to the next; a refusal (a parent that
            // holds processes, a controller held by a v1 hierarchy) leaves it out.
            for parent in [mount, base.as_path(), dir.as_path()] {
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}"));
            }
        }
        let controllers = words(&dir.join("cgroup.subtree_control"))
            .into_iter()
            .filter(|c| CONTROLLERS.contains(&c.as_str()))
            .collect();
        Ok(CgroupScope { dir, controllers })
    }

    /// Whether the children get `controller`.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// A cgroup for one instance, with its limits written.
    pub fn instance(&self, name: &str, limits: &Limits) -> Result<InstanceCgroup, CgroupError> {
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir).map_err(|e| err(&dir, e))?;
        let cg = InstanceCgroup { dir };
        let write = |file: &str, value: String| {
            let p = cg.dir.join(file);
            std::fs::write(&p, &value).map_err(|e| err(&p, format!("writing {value:?}: {e}")))
        };
        let set = || -> Result<(), CgroupError> {
            if self.has("cpu") {
                write("cpu.max", limits.cpu_max())?;
            }
            if self.has("memory") {
                write("memory.max", limits.memory_bytes.to_string())?;
                // Best effort: no swap to escape the limit into; OOM takes the group.
                let _ = write("memory.swap.max", "0".into());
                let _ = write("memory.oom.group", "1".into());
            }
            if self.has("pids") {
                write("pids.max", limits.pids.to_string())?;
            }
            Ok(())
        };
        if let Err(e) = set() {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Kill everything left in the scope and remove it.
    pub fn remove(&self) {
        remove_tree(&self.dir);
    }
}

/// What a cgroup allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Thousandths of a core.
    pub cpu_millis: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u32,
}

impl Limits {
    /// The `cpu.max` line: `<quota> <period>` in microseconds.
    pub fn cpu_max(&self) -> String {
        let quota = (u64::from(self.cpu_millis) * CPU_PERIOD_US / 1000).max(CPU_MIN_QUOTA_US);
        format!("{quota} {CPU_PERIOD_US}")
    }
}

/// One instance's cgroup.
#[derive(Debug)]
pub struct InstanceCgroup {
    /// Its directory.
    pub dir: PathBuf,
}

impl InstanceCgroup {
    /// Its `cgroup.procs` file (a process joins by writing its pid, or `0`).
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Kill every process in it and wait (up to [`KILL_WAIT`]) until it is empty;
    /// whether it is.
    pub fn kill(&self) -> bool {
        kill_cgroup(&self.dir)
    }

    /// Kill what is in it and remove it.
    pub fn remove(&self) {
        remove_tree(&self.dir);
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kill a cgroup's processes (`cgroup.kill`, else SIGKILL to each listed pid until none
/// is left) and wait for it to empty, up to [`KILL_WAIT`].
fn kill_cgroup(dir: &Path) -> bool {
    let killer = dir.join("cgroup.kill");
    let has_kill = killer.exists();
    let end = Instant::now() + KILL_WAIT;
    loop {
        let left = pids(dir);
        if left.is_empty() && !populated(dir) {
            return true;
        }
        if has_kill {
            let _ = std::fs::write(&killer, "1");
        } else {
            for pid in left {
                // SAFETY: kill(2) has no memory effects; the pid is in our cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if Instant::now() > end {
            tracing::warn!("{}: processes left after {KILL_WAIT:?}", dir.display());
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Kill and remove a cgroup and the cgroups below it, children first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    kill_cgroup(dir);
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files an instance's cgroup gets, written into a plain directory standing in
    /// for a cgroup2 scope with every controller (the integration test checks a real
    /// cgroup where the machine has the controllers).
    #[test]
    fn instance_limits_are_written_for_each_controller() {
        let dir = std::env::temp_dir().join(format!("avail-cgroup-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let limits = Limits {
            cpu_millis: 250,
            memory_bytes: 96 << 20,
            pids: 64,
        };
        let all = CgroupScope {
            dir: dir.clone(),
            controllers: CONTROLLERS.map(String::from).to_vec(),
        };
        let cg = all.instance("w.1", &limits).unwrap();
        let read = |f: &str| std::fs::read_to_string(cg.dir.join(f)).ok();
        assert_eq!(read("cpu.max").as_deref(), Some("25000 100000"));
        assert_eq!(read("memory.max"), Some((96u64 << 20).to_string()));
        assert_eq!(read("memory.swap.max").as_deref(), Some("0"));
        assert_eq!(read("pids.max").as_deref(), Some("64"));
        assert_eq!(cg.procs(), dir.join("w.1/cgroup.procs"));

        let none = CgroupScope {
            dir: dir.clone(),
            controllers: vec!["pids".into()],
        };
        let cg2 = none.instance("w.2", &limits).unwrap();
        assert!(!cg2.dir.join("cpu.max").exists());
        assert!(!cg2.dir.join("memory.max").exists());
        assert_eq!(
            std::fs::read_to_string(cg2.dir.join("pids.max")).unwrap(),
            "64"
        );
        // A name taken is an error naming the directory.
        let e = none.instance("w.2", &limits).unwrap_err();
        assert!(e.path.ends_with("w.2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpu_max_from_millis() {
        let l = |cpu_millis| Limits {
            cpu_millis,
            memory_bytes: 1,
            pids: 1,
        };
        assert_eq!(l(200).cpu_max(), "20000 100000");
        assert_eq!(l(1000).cpu_max(), "100000 100000");
        assert_eq!(l(2500).cpu_max(), "250000 100000");
        assert_eq!(l(1).cpu_max(), "1000 100000");
    }
}
