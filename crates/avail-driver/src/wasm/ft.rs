//! The wasm side of level `ft`: a guest whose state can be captured and restored.
//!
//! [`FtModule`] is the module after the statepoint rewrite, compiled once; it makes
//! [`FtGuest`]s either fresh (running the former start function once) or restored from a
//! secondary's image. An `FtGuest` serves calls like a plain instance and, between calls
//! (the guest has no stack then), captures what changed since the last capture. Calls
//! block: the agent makes them off the async threads.
//!
//! A guest that traps or runs past its deadline answers 500 or 504; the caller decides
//! whether it goes on from the state the fault left (level `ft`: the replica's state must
//! stay the one the checkpoints describe) or is made afresh (`none`, `ha`, like a plain
//! instance).

use std::sync::Arc;

use avail_model::WorkloadSpec;
use avail_statepoint::capture::{Capturer, restore};
use avail_statepoint::rewrite::{self, START_EXPORT, StateLayout};
use avail_statepoint::state::{StateDelta, StateImage};
use wasmtime::Module;

use super::{CallFault, InstanceConfig, Live, TICK_MS, WasmDriver, abi};
use crate::{HttpRequest, HttpResponse, LogSink, StartError};

/// A module rewritten for checkpoints and compiled (cached per node by digest).
#[derive(Clone)]
pub struct Compiled {
    module: Module,
    layout: StateLayout,
}

/// A rewritten, compiled module ready to make `ft` guests.
#[derive(Clone)]
pub struct FtModule {
    cfg: InstanceConfig,
    layout: StateLayout,
}

impl WasmDriver {
    /// Check, rewrite and compile a module for level `ft`.
    pub async fn ft_module(
        &self,
        spec: &WorkloadSpec,
        bytes: Arc<[u8]>,
        logs: LogSink,
    ) -> Result<FtModule, StartError> {
        // A digest names the content (the agent checked it): compiled once per node.
        // Anything else as the artifact (a library caller's own name) is not cached.
        let key = spec
            .artifact
            .starts_with("sha256:")
            .then(|| spec.artifact.clone());
        let cached = key.as_ref().and_then(|k| {
            self.compiled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(k)
                .cloned()
        });
        let (module, layout) = match cached {
            Some(c) => (c.module, c.layout),
            None => {
                let engine = self.engine.clone();
                let (module, layout) = tokio::task::spawn_blocking(move || {
                    abi::check_module(&bytes).map_err(StartError::InvalidArtifact)?;
                    let rw = rewrite::rewrite(&bytes)
                        .map_err(|e| StartError::InvalidArtifact(e.to_string()))?;
                    let m = Module::new(&engine, &rw.bytes)
                        .map_err(|e| StartError::InvalidArtifact(format!("compile: {e}")))?;
                    Ok::<_, StartError>((m, rw.layout))
                })
                .await
                .map_err(|e| StartError::Start(format!("compile task: {e}")))??;
                if let Some(key) = key {
                    let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
                    if cache.len() >= super::COMPILED_CACHE
                        && let Some(k) = cache.keys().next().cloned()
                    {
                        cache.remove(&k);
                    }
                    cache.insert(
                        key,
                        Compiled {
                            module: module.clone(),
                            layout: layout.clone(),
                        },
                    );
                }
                (module, layout)
            }
        };
        Ok(FtModule {
            cfg: InstanceConfig {
                engine: self.engine.clone(),
                linker: self.linker.clone(),
                module,
                memory_bytes: spec.resources.memory_mib as usize * (1 << 20),
                deadline_ticks: u64::from(spec.timeout_ms).div_ceil(TICK_MS) + 1,
                logs,
            },
            layout,
        })
    }
}

impl FtModule {
    /// A fresh guest (its start function, if any, runs now, once).
    pub fn fresh(&self) -> Result<FtGuest, String> {
        let mut live = self.cfg.instantiate()?;
        if let Some(start) = live.instance.get_func(&mut live.store, START_EXPORT) {
            start
                .call(&mut live.store, &[], &mut [])
                .map_err(|e| format!("start function: {e:#}"))?;
        }
        Ok(self.guest(live))
    }

    /// A guest resumed from a secondary's image; its clock never reads earlier than
    /// `clock_ms` (the primary's, carried in the checkpoint).
    pub fn restored(&self, image: &StateImage, clock_ms: i64) -> Result<FtGuest, String> {
        let mut live = self.cfg.instantiate()?;
        live.store.data_mut().clock_floor_ms = clock_ms;
        restore(&mut live.store, &live.instance, &self.layout, image).map_err(|e| e.to_string())?;
        Ok(self.guest(live))
    }

    fn guest(&self, live: Live) -> FtGuest {
        FtGuest {
            capturer: Capturer::new(self.layout.clone(), avail_statepoint::dirty::best),
            live,
            deadline_ticks: self.cfg.deadline_ticks,
        }
    }
}

/// A running `ft` guest.
pub struct FtGuest {
    live: Live,
    capturer: Capturer,
    deadline_ticks: u64,
}

impl FtGuest {
    /// Serve one request (blocking). A fault (trap, deadline) is `Err` with its 500 or
    /// 504 reply; the guest goes on from the state the fault left, and the caller decides
    /// whether to keep it (level ft: the checkpoints describe it) or start afresh.
    pub fn call(&mut self, req: &HttpRequest) -> Result<HttpResponse, HttpResponse> {
        match self
            .live
            .call(&abi::encode_request(req), self.deadline_ticks)
        {
            Ok(r) => Ok(r),
            Err(CallFault::Timeout) => Err(HttpResponse::error(
                504,
                "guest_timeout",
                "handler ran past its deadline",
            )),
            Err(CallFault::Trap(m)) => Err(HttpResponse::error(500, "guest_trap", &m)),
        }
    }

    /// Capture what changed since the last capture (everything, the first time), with
    /// `host` as the host-side state (blocking; call between requests).
    pub fn capture(&mut self, host: Vec<u8>) -> Result<StateDelta, String> {
        self.capturer
            .capture(&mut self.live.store, &self.live.instance, host)
            .map_err(|e| e.to_string())
    }

    /// A full image of the state now (for a new secondary); deltas follow from it.
    pub fn capture_full(&mut self, host: Vec<u8>) -> Result<StateDelta, String> {
        self.capturer.reset();
        self.capture(host)
    }

    /// The guest's clock floor (ms), to carry in a checkpoint.
    pub fn clock_ms(&self) -> i64 {
        self.live.store.data().clock_floor_ms
    }

    /// The dirty-page tracker in use.
    pub fn tracker(&self) -> &'static str {
        self.capturer.tracker_name()
    }
}
