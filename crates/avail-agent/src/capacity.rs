//! What a node offers by default: the machine it runs on.
//!
//! CPU: the cores this process may use ([`std::thread::available_parallelism`], which
//! follows the affinity mask) x 1000 millicores, or the cgroup v2 quota (`cpu.max`)
//! when that is stricter. Memory: `MemTotal` of `/proc/meminfo`, or the cgroup's
//! `memory.max` when stricter, less a reserve for the agent itself and the system:
//! [`reserve_mib`], the larger of [`MIN_RESERVE_MIB`] and a tenth of the memory.
//! `avail agent --cpu-millis/--memory-mib` override either.
//!
//! The parsers are pure (tested below); [`machine`] reads the files.

use avail_model::Resources;

/// Memory kept back for the agent and the system, at least, MiB.
pub const MIN_RESERVE_MIB: u32 = 256;

/// The memory kept back from `total_mib`: a tenth, at least [`MIN_RESERVE_MIB`].
pub fn reserve_mib(total_mib: u32) -> u32 {
    (total_mib / 10).max(MIN_RESERVE_MIB)
}

/// Millicores allowed by a cgroup v2 `cpu.max` line (`"200000 100000"`: 2 cores);
/// `None` for `max` (no quota) or a line that does not parse.
pub fn parse_cpu_max(line: &str) -> Option<u32> {
    let mut it = line.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next().unwrap_or("100000").parse().ok()?;
    if period == 0 {
        return None;
    }
    u32::try_from(quota.saturating_mul(1000) / period).ok()
}

/// `MemTotal` of a `/proc/meminfo` text, MiB.
pub fn parse_meminfo_total_mib(text: &str) -> Option<u32> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(u32::try_from(kib / 1024).unwrap_or(u32::MAX))
}

/// A cgroup v2 `memory.max` value, MiB; `None` for `max`.
pub fn parse_memory_max_mib(text: &str) -> Option<u32> {
    let bytes: u64 = text.trim().parse().ok()?;
    Some(u32::try_from(bytes >> 20).unwrap_or(u32::MAX))
}

/// The capacity offered for a machine of `cores`, `total_mib` of memory and the cgroup
/// limits given (`None`: none).
pub fn offer(
    cores: u32,
    cgroup_cpu_millis: Option<u32>,
    total_mib: u32,
    cgroup_memory_mib: Option<u32>,
) -> Resources {
    let cpu = cores.saturating_mul(1000);
    let cpu = cgroup_cpu_millis.map_or(cpu, |q| q.min(cpu));
    let mem = cgroup_memory_mib.map_or(total_mib, |m| m.min(total_mib));
    Resources {
        cpu_millis: cpu.max(1),
        memory_mib: mem.saturating_sub(reserve_mib(mem)).max(1),
    }
}

/// This process's cgroup v2 directory, from `/proc/self/cgroup` (`0::/path`).
fn cgroup_dir() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')))
}

/// What this machine offers (see the module doc).
pub fn machine() -> Resources {
    let cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let dir = cgroup_dir();
    let read = |f: &str| {
        dir.as_ref()
            .and_then(|d| std::fs::read_to_string(d.join(f)).ok())
    };
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo_total_mib(&t))
        .unwrap_or(1024);
    offer(
        cores,
        read("cpu.max").and_then(|l| parse_cpu_max(&l)),
        total,
        read("memory.max").and_then(|t| parse_memory_max_mib(&t)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_takes_the_stricter_limit() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1500));
        assert_eq!(parse_cpu_max("junk"), None);
        assert_eq!(
            parse_meminfo_total_mib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24000)
        );
        assert_eq!(parse_memory_max_mib("max\n"), None);
        assert_eq!(parse_memory_max_mib("1073741824\n"), Some(1024));
        // 2 cores, 24000 MiB, no cgroup limits: a tenth kept back.
        let r = offer(2, None, 24000, None);
        assert_eq!((r.cpu_millis, r.memory_mib), (2000, 21600));
        // A quota of 1.5 cores and a 1 GiB memory.max: those, less the minimum reserve.
        let r = offer(2, Some(1500), 24000, Some(1024));
        assert_eq!((r.cpu_millis, r.memory_mib), (1500, 768));
        // A quota above the cores does not raise the offer.
        assert_eq!(offer(2, Some(8000), 24000, None).cpu_millis, 2000);
        assert!(machine().cpu_millis >= 1000);
    }
}
