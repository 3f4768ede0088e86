//! avail-statepoint: the engine of the `ft` level ("statepointing").
//!
//! Owns what it takes to copy a running wasm guest's state to another host and resume it
//! there (design: `shared/design/STATEPOINTING.md`):
//! - [`rewrite`]: the load-time module rewrite that makes all guest state reachable
//!   (every memory and mutable global exported under a reserved name, the start function
//!   turned into an export), and the refusal, with a reason, of modules whose state
//!   cannot be captured;
//! - [`capture`]: full and page-granular delta capture from a wasmtime instance, and
//!   restore into a fresh one;
//! - [`dirty`]: which pages changed since the last capture, behind one trait;
//! - [`state`]: the state image a secondary keeps and applies deltas to;
//! - [`frame`]: the versioned, checksummed checkpoint frame that carries a delta over
//!   the wire; its decoder rejects, never panics;
//! - [`pair`]: the pair protocol (pipelined epochs, acks, output commit, failure
//!   detection, lease-based failover and fencing) as pure state machines.
//!
//! This crate does no network or file I/O: the agent carries out the actions.

pub mod capture;
pub mod dirty;
pub mod frame;
pub mod pair;
pub mod rewrite;
pub mod rng;
pub mod state;

/// Granularity of memory deltas and dirty tracking: the host page, 4 KiB.
pub const PAGE_BYTES: usize = 4096;
/// A WebAssembly page, 64 KiB.
pub const WASM_PAGE_BYTES: usize = 65536;
