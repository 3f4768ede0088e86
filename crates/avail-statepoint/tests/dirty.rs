//! The userfaultfd tracker against the shadow tracker (the reference), on anonymous
//! memory written at random, growing now and then: both must report the same pages.

use avail_statepoint::PAGE_BYTES;
use avail_statepoint::dirty::DirtyTracker;
use avail_statepoint::dirty::shadow::ShadowTracker;
use avail_statepoint::dirty::uffd::UffdTracker;
use avail_statepoint::rng::SplitMix64;

/// Anonymous private memory of `max` bytes, of which the first `len` are used.
struct Region {
    ptr: *mut u8,
    max: usize,
}

impl Region {
    fn new(max: usize) -> Region {
        // SAFETY: a fresh anonymous private mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                max,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Region {
            ptr: ptr.cast(),
            max,
        }
    }
    fn slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.max);
        // SAFETY: the mapping is `max` bytes, readable and writable, owned by this Region.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe {
            libc::munmap(self.ptr.cast(), self.max);
        }
    }
}

#[test]
fn uffd_tracker_matches_the_shadow_tracker() {
    let mut uffd = match UffdTracker::new() {
        Ok(t) => t,
        Err(e) => {
            // Only kernels before 6.7 or processes without the right end here; this
            // project's machines have both (root, Linux 6.18).
            eprintln!("userfaultfd unavailable here ({e}); only the shadow tracker can run");
            return;
        }
    };
    let seed: u64 = std::env::var("AVAIL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    let mut rng = SplitMix64(seed);
    let mut shadow = ShadowTracker::default();
    let mut region = Region::new(8 << 20);
    let mut len = 1 << 20;
    for round in 0..50 {
        {
            let mem = region.slice(len);
            for _ in 0..rng.below(40) {
                let page = rng.below((len / PAGE_BYTES) as u64) as usize;
                let at = page * PAGE_BYTES + rng.below(PAGE_BYTES as u64) as usize;
                // Sometimes write a zero over a non-zero byte: still a change.
                mem[at] = if rng.chance(20) {
                    0
                } else {
                    rng.next_u64() as u8 | 1
                };
            }
        }
        if round % 10 == 9 && len < (8 << 20) {
            len += 1 << 20;
            let mem = region.slice(len);
            mem[len - 100] = 7;
        }
        let mem = region.slice(len);
        let a = uffd.take_dirty(mem);
        let b = shadow.take_dirty(mem);
        // The shadow tracker reports changed content; uffd reports pages written. A
        // write of the same value is dirty for uffd only: uffd's set must contain the
        // shadow's, and each extra page must be one that was written without change.
        let missing: Vec<_> = b.iter().filter(|p| !a.contains(p)).collect();
        assert!(
            missing.is_empty(),
            "seed {seed} round {round}: uffd missed pages {missing:?}"
        );
        assert!(
            a.len() <= b.len() + 40,
            "seed {seed} round {round}: uffd reported {} pages, shadow {}",
            a.len(),
            b.len()
        );
    }
}
