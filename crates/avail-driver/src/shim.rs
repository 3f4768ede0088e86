//! The shim between an agent and a process workload (`avail process-shim [containment
//! options] -- program args...`).
//!
//! It leads the workload's process group and stays root; the program's process applies
//! the containment to itself before exec ([`crate::contain::exec`]) and gets
//! `PR_SET_PDEATHSIG = SIGKILL` (set after the credential change, which clears it).
//! When the agent dies, the shim gets SIGTERM (its own parent-death signal) and kills,
//! in this order: the instance's cgroup (`cgroup.kill`), every process of the
//! instance's uid (the shim becomes that uid and sends `kill(-1, SIGKILL)`), and its
//! process group, itself included.

use std::ffi::CString;
use std::sync::OnceLock;

use crate::contain::exec::ChildSetup;

/// What the SIGTERM handler kills, prepared before it is installed.
struct KillTargets {
    cgroup_kill: Option<CString>,
    uid: Option<u32>,
}

static TARGETS: OnceLock<KillTargets> = OnceLock::new();

extern "C" fn on_sigterm(_: libc::c_int) {
    // SAFETY: only async-signal-safe calls (open, write, close, setgid, setuid, kill,
    // getpgrp) on data prepared before the handler was installed; the shim has one
    // thread, so setuid changes the whole process.
    unsafe {
        if let Some(t) = TARGETS.get() {
            if let Some(k) = &t.cgroup_kill {
                let fd = libc::open(k.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"1".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            if let Some(uid) = t.uid
                && uid != 0
                && libc::setgid(uid) == 0
                && libc::setuid(uid) == 0
            {
                libc::kill(-1, libc::SIGKILL);
            }
        }
        libc::kill(-libc::getpgrp(), libc::SIGKILL);
    }
}

/// Run as the shim: `args` are what follows `process-shim` (options, `--`, the program
/// and its arguments). Returns the exit code to exit with.
pub fn run_shim(args: &[String]) -> i32 {
    let (setup, program, args) = match ChildSetup::from_args(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("avail {e}");
            return 2;
        }
    };
    let prepared = match setup.prepare() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("avail process-shim: {e}");
            return 2;
        }
    };
    let cgroup_kill = setup.cgroup_procs.as_ref().and_then(|p| {
        CString::new(
            p.with_file_name("cgroup.kill")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .ok()
    });
    let _ = TARGETS.set(KillTargets {
        cgroup_kill,
        uid: setup.user.map(|(u, _)| u),
    });
    let handler: extern "C" fn(libc::c_int) = on_sigterm;
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let mut cmd = std::process::Command::new(&program);
    cmd.args(&args);
    let parent = std::process::id() as i32;
    // SAFETY: async-signal-safe calls only, in the child before exec: the containment
    // first (it changes credentials, which clears the parent-death signal), then the
    // parent-death signal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            prepared.apply()?;
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return Err(std::io::Error::other("shim died"));
            }
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut child) => match child.wait() {
            Ok(st) => st.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
            }),
            Err(e) => {
                eprintln!("avail process-shim: wait: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("avail process-shim: cannot start {program:?}: {e}");
            127
        }
    }
}
