//! What a contained program's process does between fork and exec, and how the agent
//! hands it to the shim on the command line.
//!
//! Order in the child (each step a plain system call, async-signal-safe):
//! 1. join the instance's cgroup (write `0` to its `cgroup.procs`; needs root);
//! 2. `setrlimit` for the limits no cgroup enforces;
//! 3. drop every supplementary group (`setgroups(0)`), then `setgid`, then `setuid`;
//! 4. `chdir` into the private working directory (as the workload's user), `umask 077`;
//! 5. `PR_SET_NO_NEW_PRIVS` (no set-uid program can give the privileges back).
//!
//! The caller sets the parent-death signal after these steps: changing credentials
//! clears it.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// A resource limit applied with `setrlimit` (soft = hard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rlimit {
    /// `RLIMIT_NPROC`: processes and threads of the (dedicated) uid.
    Nproc(u64),
    /// `RLIMIT_DATA`: bytes of private writable memory.
    DataBytes(u64),
}

impl Rlimit {
    fn resource(self) -> (libc::__rlimit_resource_t, u64) {
        match self {
            Rlimit::Nproc(n) => (libc::RLIMIT_NPROC, n),
            Rlimit::DataBytes(b) => (libc::RLIMIT_DATA, b),
        }
    }
}

/// Everything the child applies to itself before exec (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChildSetup {
    /// Switch to this uid and gid (dropping all other groups); `None`: keep the
    /// caller's.
    pub user: Option<(u32, u32)>,
    /// The private working directory.
    pub workdir: Option<PathBuf>,
    /// The `cgroup.procs` file of the instance's cgroup.
    pub cgroup_procs: Option<PathBuf>,
    /// Limits no cgroup enforces.
    pub rlimits: Vec<Rlimit>,
}

/// Why the shim's containment arguments are refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShimArgsError {
    /// An option that the shim does not know, or one without its value.
    #[error("process-shim: bad option {0:?}")]
    Option(String),
    /// A value that does not parse.
    #[error("process-shim: {option} {value:?} is not valid")]
    Value {
        /// The option.
        option: String,
        /// Its value.
        value: String,
    },
    /// Nothing to run after `--`.
    #[error("process-shim: no program after --")]
    NoProgram,
}

impl ChildSetup {
    /// The shim's options for this setup (before `--`).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some((uid, gid)) = self.user {
            a.extend([
                "--uid".into(),
                uid.to_string(),
                "--gid".into(),
                gid.to_string(),
            ]);
        }
        if let Some(w) = &self.workdir {
            a.extend(["--workdir".into(), w.display().to_string()]);
        }
        if let Some(c) = &self.cgroup_procs {
            a.extend(["--cgroup-procs".into(), c.display().to_string()]);
        }
        for r in &self.rlimits {
            let v = match r {
                Rlimit::Nproc(n) => format!("nproc={n}"),
                Rlimit::DataBytes(b) => format!("data={b}"),
            };
            a.extend(["--rlimit".into(), v]);
        }
        a
    }

    /// Parse `[options] -- program args...` (what [`ChildSetup::to_args`] writes,
    /// then the command): the setup, the program and its arguments.
    pub fn from_args(args: &[String]) -> Result<(ChildSetup, String, Vec<String>), ShimArgsError> {
        let mut s = ChildSetup::default();
        let (mut uid, mut gid) = (None, None);
        let mut it = args.iter();
        loop {
            let Some(opt) = it.next() else {
                return Err(ShimArgsError::NoProgram);
            };
            if opt == "--" {
                break;
            }
            let val = it
                .next()
                .ok_or_else(|| ShimArgsError::Option(opt.clone()))?;
            let bad = || ShimArgsError::Value {
                option: opt.clone(),
                value: val.clone(),
            };
            match opt.as_str() {
                "--uid" => uid = Some(val.parse::<u32>().map_err(|_| bad())?),
                "--gid" => gid = Some(val.parse::<u32>().map_err(|_| bad())?),
                "--workdir" => s.workdir = Some(PathBuf::from(val)),
                "--cgroup-procs" => s.cgroup_procs = Some(PathBuf::from(val)),
                "--rlimit" => {
                    let (k, v) = val.split_once('=').ok_or_else(bad)?;
                    let v = v.parse::<u64>().map_err(|_| bad())?;
                    s.rlimits.push(match k {
                        "nproc" => Rlimit::Nproc(v),
                        "data" => Rlimit::DataBytes(v),
                        _ => return Err(bad()),
                    });
                }
                _ => return Err(ShimArgsError::Option(opt.clone())),
            }
        }
        s.user = match (uid, gid) {
            (Some(u), Some(g)) => Some((u, g)),
            (None, None) => None,
            _ => return Err(ShimArgsError::Option("--uid and --gid go together".into())),
        };
        let program = it.next().ok_or(ShimArgsError::NoProgram)?.clone();
        Ok((s, program, it.cloned().collect()))
    }

    /// The setup in a form usable after fork (all allocation done here).
    pub fn prepare(&self) -> io::Result<PreparedSetup> {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| io::Error::other(format!("{} contains a NUL byte", p.display())))
        };
        Ok(PreparedSetup {
            user: self.user,
            workdir: self.workdir.as_deref().map(c).transpose()?,
            cgroup_procs: self.cgroup_procs.as_deref().map(c).transpose()?,
            rlimits: self.rlimits.iter().map(|r| r.resource()).collect(),
        })
    }
}

/// A [`ChildSetup`] ready to apply in a forked child.
#[derive(Debug)]
pub struct PreparedSetup {
    user: Option<(u32, u32)>,
    workdir: Option<CString>,
    cgroup_procs: Option<CString>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
}

fn check(r: libc::c_int, what: &'static str) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

impl PreparedSetup {
    /// Apply the setup to the calling process. Only async-signal-safe calls: meant for
    /// the child between fork and exec (`pre_exec`).
    pub fn apply(&self) -> io::Result<()> {
        if let Some(procs) = &self.cgroup_procs {
            // SAFETY: open/write/close on a NUL-terminated path we own; writing "0" moves
            // the calling process into the cgroup.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return check(-1, "open cgroup.procs");
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return check(-1, "join cgroup");
                }
            }
        }
        for &(resource, value) in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit reads the struct we pass; no other memory is involved.
            check(unsafe { libc::setrlimit(resource, &lim) }, "setrlimit")?;
        }
        if let Some((uid, gid)) = self.user {
            // SAFETY: plain credential system calls; setgroups with a count of 0 reads
            // no memory.
            unsafe {
                check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
                check(libc::setgid(gid), "setgid")?;
                check(libc::setuid(uid), "setuid")?;
            }
        }
        if let Some(dir) = &self.workdir {
            // SAFETY: chdir reads a NUL-terminated path we own; umask has no memory
            // effects.
            unsafe {
                check(libc::chdir(dir.as_ptr()), "chdir to the working directory")?;
                libc::umask(0o077);
            }
        }
        // SAFETY: prctl with integer arguments only.
        check(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            "PR_SET_NO_NEW_PRIVS",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_args_round_trip_and_bad_ones_name_the_option() {
        let s = ChildSetup {
            user: Some((900_001, 900_001)),
            workdir: Some("/var/lib/avail/work/n/w.1".into()),
            cgroup_procs: Some("/sys/fs/cgroup/avail/n/w.1/cgroup.procs".into()),
            rlimits: vec![Rlimit::Nproc(256), Rlimit::DataBytes(64 << 20)],
        };
        let mut args = s.to_args();
        args.extend(["--", "python3", "-m", "--uid"].map(String::from));
        let (back, prog, rest) = ChildSetup::from_args(&args).unwrap();
        assert_eq!(back, s);
        assert_eq!(prog, "python3");
        assert_eq!(rest, ["-m", "--uid"]);

        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ChildSetup::from_args(&v(&["--", "sh"])).unwrap(),
            (ChildSetup::default(), "sh".into(), vec![])
        );
        assert_eq!(
            ChildSetup::from_args(&v(&["--uid", "x", "--", "sh"])).unwrap_err(),
            ShimArgsError::Value {
                option: "--uid".into(),
                value: "x".into()
            }
        );
        assert!(matches!(
            ChildSetup::from_args(&v(&["--uid", "5", "--", "sh"])),
            Err(ShimArgsError::Option(_))
        ));
        assert_eq!(
            ChildSetup::from_args(&v(&["--"])).unwrap_err(),
            ShimArgsError::NoProgram
        );
        assert!(matches!(
            ChildSetup::from_args(&v(&["--rlimit", "cpu=1", "--", "sh"])),
            Err(ShimArgsError::Value { .. })
        ));
    }
}
