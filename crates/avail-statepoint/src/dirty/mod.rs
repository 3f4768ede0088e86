//! Which 4 KiB pages of a memory were written since the last look.
//!
//! Two implementations behind [`DirtyTracker`]: [`shadow::ShadowTracker`], the portable
//! reference (keeps a copy and compares), always available; and
//! [`uffd::UffdTracker`], userfaultfd write-protect + `PAGEMAP_SCAN` (Linux 6.7+, root
//! or `vm.unprivileged_userfaultfd`), checked against the shadow tracker in tests.
//! [`best`] picks at start-up.

pub mod shadow;
pub mod uffd;

/// Reports the pages written since the previous call.
pub trait DirtyTracker: Send {
    /// A short name for status and metrics (`shadow`, `uffd`).
    fn name(&self) -> &'static str;
    /// Indexes of the 4 KiB pages of `memory` that differ from (or did not exist at)
    /// the previous call, in increasing order; the first call reports every non-zero
    /// page. `memory` may have grown since; it never shrinks.
    fn take_dirty(&mut self, memory: &[u8]) -> Vec<u32>;
}

/// The fastest tracker this process can use: userfaultfd when the kernel allows it,
/// else the shadow copy.
pub fn best() -> Box<dyn DirtyTracker> {
    match uffd::UffdTracker::new() {
        Ok(t) => Box::new(t),
        Err(_) => Box::new(shadow::ShadowTracker::default()),
    }
}
