//! The fast dirty tracker: userfaultfd write-protection in async mode plus the
//! `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! The guest memory is registered with a userfaultfd in write-protect mode with
//! `UFFD_FEATURE_WP_ASYNC` (the kernel resolves write faults itself and marks the page
//! written; no fault-handling thread) and `UFFD_FEATURE_WP_UNPOPULATED` (never-touched
//! pages are tracked too). Each call asks `/proc/self/pagemap` for the pages written
//! since the last call and write-protects them again in the same ioctl
//! (`PM_SCAN_WP_MATCHING`), so no byte of memory is read to find them.
//!
//! Needs root or `vm.unprivileged_userfaultfd = 1`, and anonymous private memory (the
//! wasm driver turns wasmtime's copy-on-write memory images off). [`UffdTracker::new`]
//! says why when it cannot be used; the caller then falls back to the shadow tracker.
//! The shadow tracker checks this one in `tests/dirty.rs`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::DirtyTracker;
use crate::PAGE_BYTES;

// Kernel ABI (include/uapi/linux/userfaultfd.h, fs.h of Linux 6.7+).
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// Regions asked for per `PAGEMAP_SCAN` call.
const REGIONS_PER_CALL: usize = 1024;

/// The userfaultfd + `PAGEMAP_SCAN` tracker.
pub struct UffdTracker {
    uffd: OwnedFd,
    pagemap: File,
    /// Base address and length registered so far.
    base: usize,
    len: usize,
    regions: Vec<PageRegion>,
}

fn ioctl<T>(fd: i32, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed #[repr(C)] value of the type the
    // request expects (the caller pairs them); the kernel reads and writes only it.
    let r = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl UffdTracker {
    /// A tracker, or why this kernel or process cannot provide one.
    pub fn new() -> io::Result<UffdTracker> {
        // SAFETY: a plain system call with integer flags; it returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by userfaultfd(2) and is owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api)?;
        let pagemap = File::open("/proc/self/pagemap")?;
        Ok(UffdTracker {
            uffd,
            pagemap,
            base: 0,
            len: 0,
            regions: vec![PageRegion::default(); REGIONS_PER_CALL],
        })
    }

    /// Register `[start, start + len)` for write-protection and protect it.
    fn protect(&mut self, start: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let range = || UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        let mut reg = UffdioRegister {
            range: range(),
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)?;
        let mut wp = UffdioWriteprotect {
            range: range(),
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Pages written in `[base, base + len)` since the last scan, re-protected.
    fn scan(&mut self) -> io::Result<Vec<u32>> {
        let (start, end) = (self.base as u64, (self.base + self.len) as u64);
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: `arg.vec` points at `self.regions`, `vec_len` entries, alive and
            // unaliased for the call; the kernel writes at most that many regions.
            let n = unsafe {
                libc::ioctl(
                    self.pagemap.as_raw_fd(),
                    PAGEMAP_SCAN,
                    &mut arg as *mut PmScanArg,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for r in &self.regions[..n as usize] {
                let (first, last) = (
                    (r.start - start) as usize / PAGE_BYTES,
                    (r.end - start) as usize / PAGE_BYTES,
                );
                out.extend((first..last).map(|p| p as u32));
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

fn nonzero_pages(memory: &[u8], from_page: usize) -> impl Iterator<Item = u32> + '_ {
    memory[from_page * PAGE_BYTES..]
        .chunks(PAGE_BYTES)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(move |(i, _)| (from_page + i) as u32)
}

impl DirtyTracker for UffdTracker {
    fn name(&self) -> &'static str {
        "uffd"
    }

    fn take_dirty(&mut self, memory: &[u8]) -> Vec<u32> {
        let base = memory.as_ptr() as usize;
        if base != self.base || memory.len() < self.len {
            // First call, or the memory moved: start over from its content.
            self.base = base;
            self.len = 0;
        }
        // Should the kernel refuse anything after `new` succeeded, every page is
        // reported: a superset of the dirty pages is always a correct delta.
        let all = || (0..(memory.len() / PAGE_BYTES) as u32).collect::<Vec<u32>>();
        if self.len == 0 {
            self.len = memory.len();
            if self.protect(base, memory.len()).is_err() {
                self.len = 0;
                return all();
            }
            return nonzero_pages(memory, 0).collect();
        }
        let Ok(mut dirty) = self.scan() else {
            self.len = 0;
            return all();
        };
        if memory.len() > self.len {
            // Grown: the new pages are reported by content, then tracked.
            let old_pages = self.len / PAGE_BYTES;
            let (start, len) = (base + self.len, memory.len() - self.len);
            if self.protect(start, len).is_err() {
                self.len = 0;
                return all();
            }
            self.len = memory.len();
            dirty.extend(nonzero_pages(memory, old_pages));
        }
        dirty
    }
}
