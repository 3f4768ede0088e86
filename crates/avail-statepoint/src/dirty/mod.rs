//! Which 4 KiB pages of a memory were written since the last look.
//!
//! Two implementations behind [`DirtyTracker`]: [`shadow::ShadowTracker`], the portable
//! reference (keeps a copy and compares), always available; and a userfaultfd
//! write-protect + `PAGEMAP_SCAN` fast path (Linux 6.7+, design in STATEPOINTING.md),
//! which is checked against the shadow tracker in tests. Only the shadow tracker is
//! built so far.

pub mod shadow;

/// Reports the pages written since the previous call.
pub trait DirtyTracker: Send {
    /// A short name for status and metrics (`shadow`, `uffd`).
    fn name(&self) -> &'static str;
    /// Indexes of the 4 KiB pages of `memory` that differ from (or did not exist at)
    /// the previous call, in increasing order; the first call reports every non-zero
    /// page. `memory` may have grown since; it never shrinks.
    fn take_dirty(&mut self, memory: &[u8]) -> Vec<u32>;
}
