//! A uid (and the gid of the same number) per running instance, from a range that
//! belongs to avail alone, shared by every agent on the machine.
//!
//! A uid is held by an exclusive `flock` on `<lock dir>/<uid>`: the kernel drops it when
//! the holder closes it or dies, so a crashed agent's uids come free without clean-up.
//! Whoever takes a uid first kills every process still running as it (a program of a
//! dead agent that escaped), and the holder does so again when the instance ends: a
//! forked helper switches to the uid and sends `kill(-1, SIGKILL)`, which reaches
//! exactly that uid's processes. No `/etc/passwd` entry is needed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Most uids tried per allocation.
pub const MAX_TRIES: u32 = 4096;

/// A range of uids, `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    /// First uid.
    pub first: u32,
    /// Last uid (inclusive).
    pub last: u32,
}

/// Errors of uid ranges and allocation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UidError {
    /// The range does not parse or is not allowed.
    #[error("uid range {input:?}: {reason}")]
    Range {
        /// The text given.
        input: String,
        /// Why.
        reason: String,
    },
    /// Every uid tried is held.
    #[error("no free uid in {first}-{last} ({tried} tried)")]
    Exhausted {
        /// First of the range.
        first: u32,
        /// Last of the range.
        last: u32,
        /// How many were tried.
        tried: u32,
    },
    /// The lock directory or a lock file is not usable.
    #[error("uid lock {path}: {reason}")]
    Lock {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
}

impl std::str::FromStr for UidRange {
    type Err = UidError;
    /// `FIRST-LAST`, both above 65535 (clear of system and ordinary users), at most
    /// 2^31 - 2, FIRST <= LAST.
    fn from_str(s: &str) -> Result<UidRange, UidError> {
        let bad = |reason: &str| UidError::Range {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| bad("expected FIRST-LAST"))?;
        let first: u32 = a.trim().parse().map_err(|_| bad("FIRST is not a number"))?;
        let last: u32 = b.trim().parse().map_err(|_| bad("LAST is not a number"))?;
        if first <= 65_535 {
            return Err(bad("FIRST must be above 65535"));
        }
        if last > i32::MAX as u32 - 1 || first > last {
            return Err(bad("need FIRST <= LAST < 2147483647"));
        }
        Ok(UidRange { first, last })
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// A uid held for one instance; released on drop (its processes are not killed by the
/// drop: see [`sweep`]).
#[derive(Debug)]
pub struct UidLease {
    /// The uid (and gid).
    pub uid: u32,
    _lock: File,
}

/// Take a free uid of `range`, starting at a random one, and kill whatever still runs
/// as it.
pub fn allocate(range: UidRange, lock_dir: &Path) -> Result<UidLease, UidError> {
    let lock_err = |p: &Path, e: std::io::Error| UidError::Lock {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    // Private: a workload that could open a lock file could hold its uid's lock.
    std::fs::create_dir_all(lock_dir)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(lock_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| lock_err(lock_dir, e))?;
    let size = u64::from(range.last - range.first) + 1;
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| UidError::Lock {
        path: lock_dir.display().to_string(),
        reason: format!("random: {e}"),
    })?;
    let start = u64::from_le_bytes(r) % size;
    let tries = size.min(u64::from(MAX_TRIES));
    for i in 0..tries {
        let uid = range.first + ((start + i) % size) as u32;
        let path: PathBuf = lock_dir.join(uid.to_string());
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| lock_err(&path, e))?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            sweep(uid);
            return Ok(UidLease { uid, _lock: f });
        }
    }
    Err(UidError::Exhausted {
        first: range.first,
        last: range.last,
        tried: tries as u32,
    })
}

/// Kill every process running as `uid` (never 0 nor the caller's own uid): a forked
/// helper becomes `uid` and sends `kill(-1, SIGKILL)`. Returns whether the helper ran.
pub fn sweep(uid: u32) -> bool {
    // SAFETY: getuid has no preconditions.
    let own = unsafe { libc::getuid() };
    assert!(
        uid != 0 && uid != own,
        "sweep of uid {uid} would kill the agent"
    );
    // SAFETY: the child only makes async-signal-safe system calls (setgid, setuid,
    // kill, _exit) and never returns into Rust code.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(1);
            }
            libc::kill(-1, libc::SIGKILL);
            libc::_exit(0);
        }
        if pid < 0 {
            return false;
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

/// Whether this process can switch to `uid`: root, and a forked child manages it.
pub fn can_switch_to(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    // SAFETY: as in `sweep`: the child makes system calls only, then _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(uid) == 0
                && libc::setuid(uid) == 0;
            libc::_exit(if ok { 0 } else { 1 });
        }
        if pid < 0 {
            return false;
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_bad_ones_say_why() {
        assert_eq!(
            "900000-999999".parse::<UidRange>().unwrap(),
            UidRange {
                first: 900_000,
                last: 999_999
            }
        );
        for bad in [
            "",
            "5",
            "1000-2000",
            "900000-800000",
            "x-900000",
            "900000-4294967295",
        ] {
            let e = bad.parse::<UidRange>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_held_uid_is_not_given_twice() {
        let dir = std::env::temp_dir().join(format!("avail-uid-test-{}", std::process::id()));
        // Outside the default range: a sweep must not hit a running agent's workload.
        let range = UidRange {
            first: 1_999_000,
            last: 1_999_001,
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: not root (allocation sweeps the uid, which needs root)");
            return;
        }
        let a = allocate(range, &dir).unwrap();
        let b = allocate(range, &dir).unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(matches!(
            allocate(range, &dir),
            Err(UidError::Exhausted { tried: 2, .. })
        ));
        drop(a);
        allocate(range, &dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
