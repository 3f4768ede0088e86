//! Guest state as data: what a checkpoint carries and what a secondary holds.
//!
//! A [`StateDelta`] lists, per memory, its size and the 4 KiB pages whose content
//! changed, plus the value of every mutable global and the host-side state (opaque
//! bytes here). A full checkpoint is the delta against all-zero memory (only non-zero
//! pages are sent). A secondary keeps a [`StateImage`] and applies deltas to it; applying
//! is all-or-nothing: a delta that does not fit the image is refused and the image is
//! left as it was.

use crate::PAGE_BYTES;

/// The value of one mutable global.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalValue {
    /// i32.
    I32(i32),
    /// i64.
    I64(i64),
    /// f32, as bits.
    F32(u32),
    /// f64, as bits.
    F64(u64),
    /// v128.
    V128(u128),
}

/// Changed pages of one memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryDelta {
    /// Size of the memory after the epoch, in bytes (a multiple of 64 KiB).
    pub size_bytes: u64,
    /// Changed pages: index of the 4 KiB page and its full content.
    pub pages: Vec<(u32, Vec<u8>)>,
}

/// What changed in one epoch (or, for a full checkpoint, everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDelta {
    /// Whether this is a full image: the receiver starts from zeroed memories.
    pub full: bool,
    /// One entry per memory, in the layout's order.
    pub memories: Vec<MemoryDelta>,
    /// Every mutable global, in the layout's order.
    pub globals: Vec<GlobalValue>,
    /// Host-side state of the workload (reply log, virtual clock, ...), opaque here.
    pub host: Vec<u8>,
}

impl StateDelta {
    /// Bytes of page content carried.
    pub fn page_bytes(&self) -> usize {
        self.memories
            .iter()
            .map(|m| m.pages.len() * PAGE_BYTES)
            .sum()
    }
}

/// Why a delta cannot be applied.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A delta before any full image.
    #[error("a delta needs a full image first")]
    NoBase,
    /// The delta's shape does not match the image (memories or globals count).
    #[error("delta does not match the image: {0}")]
    Shape(String),
    /// A page outside the memory, or of the wrong size.
    #[error("bad page: {0}")]
    Page(String),
    /// A memory shrank (wasm memories only grow).
    #[error("memory {0} shrank")]
    Shrank(usize),
}

/// The state a secondary holds: memories, globals and host state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateImage {
    /// Whether a full image has been applied.
    pub based: bool,
    /// Memory contents.
    pub memories: Vec<Vec<u8>>,
    /// Mutable globals.
    pub globals: Vec<GlobalValue>,
    /// Host-side state.
    pub host: Vec<u8>,
}

impl StateImage {
    /// Apply a delta; on error the image is unchanged.
    pub fn apply(&mut self, d: &StateDelta) -> Result<(), ApplyError> {
        if !d.full && !self.based {
            return Err(ApplyError::NoBase);
        }
        if !d.full
            && (d.memories.len() != self.memories.len() || d.globals.len() != self.globals.len())
        {
            return Err(ApplyError::Shape(format!(
                "{} memories and {} globals, image has {} and {}",
                d.memories.len(),
                d.globals.len(),
                self.memories.len(),
                self.globals.len()
            )));
        }
        // Check everything first, so that a bad delta changes nothing.
        for (i, m) in d.memories.iter().enumerate() {
            if !d.full && (m.size_bytes as usize) < self.memories[i].len() {
                return Err(ApplyError::Shrank(i));
            }
            if !(m.size_bytes as usize).is_multiple_of(crate::WASM_PAGE_BYTES) {
                return Err(ApplyError::Page(format!(
                    "memory {i} size {} is not whole wasm pages",
                    m.size_bytes
                )));
            }
            for (idx, data) in &m.pages {
                let end = (*idx as u64 + 1) * PAGE_BYTES as u64;
                if data.len() != PAGE_BYTES || end > m.size_bytes {
                    return Err(ApplyError::Page(format!(
                        "memory {i} page {idx} ({} bytes) outside {} bytes",
                        data.len(),
                        m.size_bytes
                    )));
                }
            }
        }
        if d.full {
            self.memories = d
                .memories
                .iter()
                .map(|m| vec![0u8; m.size_bytes as usize])
                .collect();
        }
        for (mem, m) in self.memories.iter_mut().zip(&d.memories) {
            mem.resize(m.size_bytes as usize, 0);
            for (idx, data) in &m.pages {
                let at = *idx as usize * PAGE_BYTES;
                mem[at..at + PAGE_BYTES].copy_from_slice(data);
            }
        }
        self.globals = d.globals.clone();
        self.host = d.host.clone();
        self.based = true;
        Ok(())
    }

    /// The full delta that recreates this image from zero (non-zero pages only).
    pub fn to_full(&self) -> StateDelta {
        StateDelta {
            full: true,
            memories: self
                .memories
                .iter()
                .map(|mem| MemoryDelta {
                    size_bytes: mem.len() as u64,
                    pages: mem
                        .chunks(PAGE_BYTES)
                        .enumerate()
                        .filter(|(_, c)| c.iter().any(|b| *b != 0))
                        .map(|(i, c)| (i as u32, c.to_vec()))
                        .collect(),
                })
                .collect(),
            globals: self.globals.clone(),
            host: self.host.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_BYTES]
    }

    #[test]
    fn full_then_delta_then_bad_delta_changes_nothing() {
        let mut img = StateImage::default();
        let delta = StateDelta {
            full: false,
            memories: vec![],
            globals: vec![],
            host: vec![],
        };
        assert_eq!(img.apply(&delta), Err(ApplyError::NoBase));
        let full = StateDelta {
            full: true,
            memories: vec![MemoryDelta {
                size_bytes: 65536,
                pages: vec![(3, page(7))],
            }],
            globals: vec![GlobalValue::I32(5)],
            host: b"h".to_vec(),
        };
        img.apply(&full).unwrap();
        assert_eq!(img.memories[0][3 * PAGE_BYTES], 7);
        assert_eq!(img.to_full(), full);
        let grow = StateDelta {
            full: false,
            memories: vec![MemoryDelta {
                size_bytes: 131072,
                pages: vec![(20, page(9))],
            }],
            globals: vec![GlobalValue::I32(6)],
            host: vec![],
        };
        img.apply(&grow).unwrap();
        assert_eq!(img.memories[0].len(), 131072);
        let before = img.clone();
        for bad in [
            StateDelta {
                full: false,
                memories: vec![MemoryDelta {
                    size_bytes: 65536,
                    pages: vec![],
                }],
                globals: vec![GlobalValue::I32(1)],
                host: vec![],
            },
            StateDelta {
                full: false,
                memories: vec![MemoryDelta {
                    size_bytes: 131072,
                    pages: vec![(1, page(1)), (32, page(1))],
                }],
                globals: vec![GlobalValue::I32(1)],
                host: vec![],
            },
            StateDelta {
                full: false,
                memories: vec![MemoryDelta {
                    size_bytes: 131072,
                    pages: vec![(1, vec![1; 10])],
                }],
                globals: vec![GlobalValue::I32(1)],
                host: vec![],
            },
            StateDelta {
                full: false,
                memories: vec![],
                globals: vec![GlobalValue::I32(1)],
                host: vec![],
            },
        ] {
            assert!(img.apply(&bad).is_err(), "{bad:?}");
            assert_eq!(img, before, "a refused delta changes nothing");
        }
    }
}
