//! The portable dirty tracker: a shadow copy of the memory, compared page by page.
//! Cost is a read of the whole memory per call (about 6 ms at 64 MiB on this machine
//! kind, STATEPOINTING.md): correct everywhere, slow for big guests.

use super::DirtyTracker;
use crate::PAGE_BYTES;

/// Shadow-copy tracker.
#[derive(Debug, Default)]
pub struct ShadowTracker {
    shadow: Vec<u8>,
}

impl DirtyTracker for ShadowTracker {
    fn name(&self) -> &'static str {
        "shadow"
    }

    fn take_dirty(&mut self, memory: &[u8]) -> Vec<u32> {
        // New memory reads as zero to the shadow: pages that grew in and are still all
        // zero are not reported (the receiver zero-fills on growth).
        self.shadow.resize(memory.len(), 0);
        let mut dirty = Vec::new();
        for (i, (now, was)) in memory
            .chunks(PAGE_BYTES)
            .zip(self.shadow.chunks_mut(PAGE_BYTES))
            .enumerate()
        {
            if now != was {
                was.copy_from_slice(now);
                dirty.push(i as u32);
            }
        }
        dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_written_pages_once() {
        let mut t = ShadowTracker::default();
        let mut mem = vec![0u8; 8 * PAGE_BYTES];
        mem[5] = 1;
        assert_eq!(t.take_dirty(&mem), vec![0]);
        assert_eq!(t.take_dirty(&mem), Vec::<u32>::new());
        mem[3 * PAGE_BYTES + 7] = 2;
        mem[7 * PAGE_BYTES] = 3;
        assert_eq!(t.take_dirty(&mem), vec![3, 7]);
        mem.resize(10 * PAGE_BYTES, 0);
        mem[9 * PAGE_BYTES] = 4;
        assert_eq!(t.take_dirty(&mem), vec![9]);
    }
}
