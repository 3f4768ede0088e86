//! Capture a rewritten module's state from a wasmtime instance, and restore it into a
//! fresh one.
//!
//! Capture runs only at a quiescent point (between two handler calls: the guest has no
//! stack), copies the pages its [`DirtyTracker`]s report plus every mutable global, and
//! returns a [`StateDelta`]. The first capture is a full image. Restore writes a
//! [`StateImage`] into a fresh instance of the same rewritten module: grows each memory to
//! the image's size, copies it, sets every global. Restore-then-run equals just-run
//! (property-tested in `tests/replay.rs`).

use wasmtime::{AsContextMut, Instance, Memory, Val};

use crate::PAGE_BYTES;
use crate::dirty::DirtyTracker;
use crate::rewrite::{GlobalKind, StateLayout};
use crate::state::{GlobalValue, MemoryDelta, StateDelta, StateImage};

/// Why a capture or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The instance does not have what the layout names: not the rewritten module.
    #[error("instance lacks {0}: not an instance of the rewritten module")]
    Missing(String),
    /// The image does not fit the instance.
    #[error("image does not fit the instance: {0}")]
    Mismatch(String),
    /// Growing a memory to the image's size failed (limits).
    #[error("cannot grow memory {0}: {1}")]
    Grow(usize, String),
}

/// Captures deltas from one instance; one tracker per memory.
pub struct Capturer {
    layout: StateLayout,
    make_tracker: Box<dyn Fn() -> Box<dyn DirtyTracker> + Send>,
    trackers: Vec<Box<dyn DirtyTracker>>,
    captured: bool,
}

impl Capturer {
    /// A capturer for an instance of a module with this layout.
    pub fn new(
        layout: StateLayout,
        make_tracker: impl Fn() -> Box<dyn DirtyTracker> + Send + 'static,
    ) -> Capturer {
        let trackers = layout.memories.iter().map(|_| make_tracker()).collect();
        Capturer {
            layout,
            make_tracker: Box::new(make_tracker),
            trackers,
            captured: false,
        }
    }

    /// Make the next capture a full image (for a new secondary).
    pub fn reset(&mut self) {
        self.trackers = self
            .layout
            .memories
            .iter()
            .map(|_| (self.make_tracker)())
            .collect();
        self.captured = false;
    }

    /// The tracker in use (for status and metrics).
    pub fn tracker_name(&self) -> &'static str {
        self.trackers.first().map(|t| t.name()).unwrap_or("none")
    }

    /// Capture what changed since the previous capture (everything, the first time),
    /// with `host` as the host-side state.
    pub fn capture(
        &mut self,
        mut store: impl AsContextMut,
        instance: &Instance,
        host: Vec<u8>,
    ) -> Result<StateDelta, CaptureError> {
        let mut store = store.as_context_mut();
        let mut memories = Vec::with_capacity(self.layout.memories.len());
        for (name, tracker) in self.layout.memories.iter().zip(self.trackers.iter_mut()) {
            let mem = memory(&mut store, instance, name)?;
            let data = mem.data(&store);
            let pages = tracker
                .take_dirty(data)
                .into_iter()
                .map(|i| {
                    let at = i as usize * PAGE_BYTES;
                    (i, data[at..at + PAGE_BYTES].to_vec())
                })
                .collect();
            memories.push(MemoryDelta {
                size_bytes: data.len() as u64,
                pages,
            });
        }
        let globals = read_globals(&mut store, instance, &self.layout)?;
        let full = !self.captured;
        self.captured = true;
        Ok(StateDelta {
            full,
            memories,
            globals,
            host,
        })
    }
}

fn memory(
    store: &mut impl AsContextMut,
    instance: &Instance,
    name: &str,
) -> Result<Memory, CaptureError> {
    instance
        .get_memory(store.as_context_mut(), name)
        .ok_or_else(|| CaptureError::Missing(format!("memory export {name}")))
}

fn read_globals(
    store: &mut impl AsContextMut,
    instance: &Instance,
    layout: &StateLayout,
) -> Result<Vec<GlobalValue>, CaptureError> {
    let mut out = Vec::with_capacity(layout.globals.len());
    for (name, _) in &layout.globals {
        let g = instance
            .get_global(store.as_context_mut(), name)
            .ok_or_else(|| CaptureError::Missing(format!("global export {name}")))?;
        out.push(match g.get(store.as_context_mut()) {
            Val::I32(v) => GlobalValue::I32(v),
            Val::I64(v) => GlobalValue::I64(v),
            Val::F32(v) => GlobalValue::F32(v),
            Val::F64(v) => GlobalValue::F64(v),
            Val::V128(v) => GlobalValue::V128(v.as_u128()),
            other => {
                return Err(CaptureError::Mismatch(format!(
                    "global {name} holds {other:?}"
                )));
            }
        });
    }
    Ok(out)
}

/// Restore `image` into a fresh instance of the rewritten module.
pub fn restore(
    mut store: impl AsContextMut,
    instance: &Instance,
    layout: &StateLayout,
    image: &StateImage,
) -> Result<(), CaptureError> {
    let mut store = store.as_context_mut();
    if image.memories.len() != layout.memories.len() || image.globals.len() != layout.globals.len()
    {
        return Err(CaptureError::Mismatch(format!(
            "image has {} memories and {} globals, the module {} and {}",
            image.memories.len(),
            image.globals.len(),
            layout.memories.len(),
            layout.globals.len()
        )));
    }
    for (i, (name, bytes)) in layout.memories.iter().zip(&image.memories).enumerate() {
        let mem = memory(&mut store, instance, name)?;
        let have = mem.data_size(&store);
        if bytes.len() < have {
            return Err(CaptureError::Mismatch(format!(
                "memory {i}: image {} bytes, instance already {have}",
                bytes.len()
            )));
        }
        let grow_pages = ((bytes.len() - have) / crate::WASM_PAGE_BYTES) as u64;
        if grow_pages > 0 {
            mem.grow(&mut store, grow_pages)
                .map_err(|e| CaptureError::Grow(i, e.to_string()))?;
        }
        mem.data_mut(&mut store).copy_from_slice(bytes);
    }
    for ((name, kind), value) in layout.globals.iter().zip(&image.globals) {
        let g = instance
            .get_global(&mut store, name)
            .ok_or_else(|| CaptureError::Missing(format!("global export {name}")))?;
        let v = match (kind, value) {
            (GlobalKind::I32, GlobalValue::I32(v)) => Val::I32(*v),
            (GlobalKind::I64, GlobalValue::I64(v)) => Val::I64(*v),
            (GlobalKind::F32, GlobalValue::F32(v)) => Val::F32(*v),
            (GlobalKind::F64, GlobalValue::F64(v)) => Val::F64(*v),
            (GlobalKind::V128, GlobalValue::V128(v)) => Val::V128((*v).into()),
            (k, v) => {
                return Err(CaptureError::Mismatch(format!(
                    "global {name} is {k:?}, image has {v:?}"
                )));
            }
        };
        g.set(&mut store, v)
            .map_err(|e| CaptureError::Mismatch(format!("global {name}: {e}")))?;
    }
    Ok(())
}
