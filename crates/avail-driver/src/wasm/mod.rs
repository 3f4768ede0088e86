//! The `wasm` driver: core modules (guest ABI v1) on wasmtime.
//!
//! One engine per driver, with epoch interruption: a ticker thread advances the epoch
//! every [`TICK_MS`], and each call sets its deadline from the workload's `timeout_ms`,
//! so a runaway handler traps and is answered `504`. A trap answers `500`. After either,
//! the instance is thrown away and re-created from the compiled module (its state is
//! not trusted any more), and the restart count goes up. Calls into one instance are
//! serialised (handlers run one at a time) by an async lock, so waiting requests hold
//! no thread.

pub mod abi;
pub mod ft;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use avail_model::DriverKind;
use avail_model::agent::InstanceState;
use avail_statepoint::rng::SplitMix64;
use wasmtime::{
    Caller, Config, Engine, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, Trap,
    TypedFunc,
};

use crate::{
    Capabilities, Driver, HttpRequest, HttpResponse, Instance, InstanceStatus, LogSink, StartError,
    StartSpec,
};

/// Epoch tick of the interruption clock, ms.
pub const TICK_MS: u64 = 10;
/// Most elements in one guest table (each costs host memory).
pub const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Most tables in one guest.
pub const MAX_TABLES: usize = 4;
/// Most requests waiting for one instance (handlers run one at a time); more get 503.
pub const MAX_QUEUED_REQUESTS: usize = 256;
/// Longest log line kept from a guest, bytes.
pub const MAX_LOG_LINE_BYTES: usize = 4096;

/// Host-side state of one instance.
struct Host {
    limits: StoreLimits,
    logs: LogSink,
    rng: SplitMix64,
    /// The guest's clock never reads earlier than this (ms): it is the last time it
    /// read, and level ft carries it in checkpoints, so a failover to a host whose clock
    /// is behind never takes the guest's time back.
    clock_floor_ms: i64,
}

/// The `wasm` driver.
pub struct WasmDriver {
    engine: Engine,
    linker: Arc<Linker<Host>>,
    ticker_stop: Arc<AtomicBool>,
    /// Modules rewritten for checkpoints and compiled, by content digest: a restart,
    /// a standby or a move target of a module this node has seen starts without
    /// compiling it again.
    pub(crate) compiled: std::sync::Mutex<std::collections::HashMap<String, ft::Compiled>>,
}

/// Most compiled modules kept per node.
pub const COMPILED_CACHE: usize = 64;

impl WasmDriver {
    /// A driver with its own engine and interruption ticker.
    pub fn new() -> Result<WasmDriver, String> {
        let engine = Engine::new(&config()).map_err(|e| format!("wasmtime engine: {e}"))?;
        let linker = Arc::new(host_linker(&engine).map_err(|e| format!("wasmtime linker: {e}"))?);
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(TICK_MS));
                    e.increment_epoch();
                }
            })
            .map_err(|e| format!("ticker thread: {e}"))?;
        Ok(WasmDriver {
            engine,
            linker,
            ticker_stop,
            compiled: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }
}

/// The engine configuration of the driver (also used to validate modules).
fn config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // Plain anonymous memory (no copy-on-write image mappings): the userfaultfd dirty
    // tracker of level ft write-protects it.
    config.memory_init_cow(false);
    config.max_wasm_stack(1 << 20);
    config
}

/// Check a module as the driver will run it: guest ABI v1 ([`abi::check_module`]) and
/// validation by the same wasmtime configuration (so features the runtime lacks, such as
/// GC or threads, are refused up front). Does not compile it.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    static ENGINE: std::sync::OnceLock<Result<Engine, String>> = std::sync::OnceLock::new();
    abi::check_module(bytes)?;
    let engine = ENGINE
        .get_or_init(|| Engine::new(&config()).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| format!("wasmtime engine: {e}"))?;
    Module::validate(engine, bytes)
        .map_err(|e| format!("not runnable by avail's wasm runtime: {e:#}"))
}

/// Check the ABI of a module and compile it.
fn compile(engine: &Engine, bytes: &[u8]) -> Result<Module, StartError> {
    abi::check_module(bytes).map_err(StartError::InvalidArtifact)?;
    Module::new(engine, bytes).map_err(|e| StartError::InvalidArtifact(format!("compile: {e}")))
}

impl Drop for WasmDriver {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

fn host_linker(engine: &Engine) -> wasmtime::Result<Linker<Host>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(
        "avail",
        "log",
        |mut caller: Caller<'_, Host>, ptr: i32, len: i32| {
            let Some(mem) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
                return;
            };
            let (start, len) = (
                ptr as u32 as usize,
                (len as u32 as usize).min(MAX_LOG_LINE_BYTES),
            );
            let data = mem.data(&caller);
            if let Some(bytes) = data.get(start..start.saturating_add(len)) {
                let line = String::from_utf8_lossy(bytes).into_owned();
                (caller.data().logs)(line);
            }
        },
    )?;
    linker.func_wrap("avail", "now_ms", |mut caller: Caller<'_, Host>| -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let host = caller.data_mut();
        host.clock_floor_ms = host.clock_floor_ms.max(wall);
        host.clock_floor_ms
    })?;
    linker.func_wrap(
        "avail",
        "random",
        |mut caller: Caller<'_, Host>, ptr: i32, len: i32| {
            let Some(mem) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
                return;
            };
            let (start, len) = (ptr as u32 as usize, len as u32 as usize);
            let (data, host) = mem.data_and_store_mut(&mut caller);
            if let Some(buf) = data.get_mut(start..start.saturating_add(len)) {
                for chunk in buf.chunks_mut(8) {
                    let r = host.rng.next_u64().to_le_bytes();
                    chunk.copy_from_slice(&r[..chunk.len()]);
                }
            }
        },
    )?;
    Ok(linker)
}

#[async_trait]
impl Driver for WasmDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Wasm
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }

    async fn start(&self, start: StartSpec<'_>) -> Result<Arc<dyn Instance>, StartError> {
        let bytes = start
            .module
            .ok_or_else(|| StartError::InvalidArtifact("no module bytes".into()))?;
        let engine = self.engine.clone();
        let linker = self.linker.clone();
        let module = {
            let engine = engine.clone();
            tokio::task::spawn_blocking(move || compile(&engine, &bytes))
                .await
                .map_err(|e| StartError::Start(format!("compile task: {e}")))??
        };
        let cfg = InstanceConfig {
            engine,
            linker,
            module,
            memory_bytes: start.spec.resources.memory_mib as usize * (1 << 20),
            deadline_ticks: u64::from(start.spec.timeout_ms).div_ceil(TICK_MS) + 1,
            logs: start.logs,
        };
        let live = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || cfg.instantiate())
                .await
                .map_err(|e| StartError::Start(format!("instantiate task: {e}")))?
                .map_err(StartError::Start)?
        };
        // The instance runs on a thread of its own: a request is one queue hop there and
        // one back (no hand-off to the blocking pool per request).
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let worker_cfg = cfg.clone();
        let stopped = Arc::new(AtomicBool::new(false));
        let worker_stopped = stopped.clone();
        std::thread::Builder::new()
            .name(format!("wasm-{}", start.spec.name))
            .spawn(move || {
                let mut live = Some(live);
                while let Ok((encoded, reply)) = rx.recv() {
                    // Stopped: what is still queued is answered 503 (its sender dropped).
                    if worker_stopped.load(Ordering::Acquire) {
                        break;
                    }
                    let result = match live.as_mut() {
                        Some(l) => l.call(&encoded, worker_cfg.deadline_ticks),
                        None => Err(CallFault::Trap("instance missing".into())),
                    };
                    if result.is_err() {
                        // The guest's state is not trusted after a fault: start afresh.
                        live = worker_cfg.instantiate().ok();
                    }
                    let _ = reply.send(result);
                }
            })
            .map_err(|e| StartError::Start(format!("instance thread: {e}")))?;
        Ok(Arc::new(WasmInstance {
            cfg,
            jobs: Mutex::new(Some(jobs)),
            restarts: AtomicU32::new(0),
            stopped,
            last_error: Mutex::new(None),
            queued: AtomicUsize::new(0),
        }))
    }
}

#[derive(Clone)]
struct InstanceConfig {
    engine: Engine,
    linker: Arc<Linker<Host>>,
    module: Module,
    memory_bytes: usize,
    deadline_ticks: u64,
    logs: LogSink,
}

/// A live wasmtime instance and its entry points.
struct Live {
    instance: wasmtime::Instance,
    store: Store<Host>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    handle: TypedFunc<(i32, i32), i64>,
}

impl InstanceConfig {
    fn instantiate(&self) -> Result<Live, String> {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| format!("seed: {e}"))?;
        let host = Host {
            limits: StoreLimitsBuilder::new()
                .memory_size(self.memory_bytes)
                .table_elements(MAX_TABLE_ELEMENTS)
                .tables(MAX_TABLES)
                .memories(1)
                .instances(1)
                .build(),
            logs: self.logs.clone(),
            rng: SplitMix64(u64::from_le_bytes(seed)),
            clock_floor_ms: 0,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| format!("instantiate: {e}"))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or("no memory export")?;
        let alloc = instance
            .get_typed_func(&mut store, "avail_alloc")
            .map_err(|e| format!("avail_alloc: {e}"))?;
        let handle = instance
            .get_typed_func(&mut store, "avail_handle")
            .map_err(|e| format!("avail_handle: {e}"))?;
        Ok(Live {
            instance,
            store,
            memory,
            alloc,
            handle,
        })
    }
}

/// How a call into the guest failed.
enum CallFault {
    /// Interrupted at the deadline.
    Timeout,
    /// Trapped or returned garbage: instance must be replaced.
    Trap(String),
}

impl Live {
    fn call(&mut self, req: &[u8], deadline_ticks: u64) -> Result<HttpResponse, CallFault> {
        self.store.set_epoch_deadline(deadline_ticks);
        let classify = |e: wasmtime::Error| match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallFault::Timeout,
            _ => CallFault::Trap(format!("{e:#}")),
        };
        let len =
            i32::try_from(req.len()).map_err(|_| CallFault::Trap("request too large".into()))?;
        let ptr = self.alloc.call(&mut self.store, len).map_err(classify)?;
        self.memory
            .write(&mut self.store, ptr as u32 as usize, req)
            .map_err(|_| CallFault::Trap("avail_alloc returned a pointer out of bounds".into()))?;
        let packed = self
            .handle
            .call(&mut self.store, (ptr, len))
            .map_err(classify)?;
        let (rptr, rlen) = (
            (packed as u64 >> 32) as usize,
            (packed as u64 & 0xffff_ffff) as usize,
        );
        if rlen > abi::MAX_RESPONSE_BYTES {
            return Err(CallFault::Trap(format!(
                "response of {rlen} bytes is too large"
            )));
        }
        let data = self.memory.data(&self.store);
        let buf = data
            .get(rptr..rptr.saturating_add(rlen))
            .ok_or_else(|| CallFault::Trap("response out of bounds".into()))?;
        abi::decode_response(buf).map_err(|e| CallFault::Trap(format!("malformed response: {e}")))
    }
}

/// A request for the instance's thread: the encoded request, and where the answer goes.
type Job = (
    Vec<u8>,
    tokio::sync::oneshot::Sender<Result<HttpResponse, CallFault>>,
);

/// One workload's wasm instance (the guest lives on its own thread; see `start`).
pub struct WasmInstance {
    cfg: InstanceConfig,
    /// The instance thread's queue (`None` once stopped: the thread then ends).
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    restarts: AtomicU32,
    stopped: Arc<AtomicBool>,
    last_error: Mutex<Option<String>>,
    queued: AtomicUsize,
}

/// Counts a request as queued for its lifetime.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl Instance for WasmInstance {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        let _queued = Queued(&self.queued);
        if self.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED_REQUESTS {
            return HttpResponse::error(
                503,
                "busy",
                &format!("{MAX_QUEUED_REQUESTS} requests already waiting for this instance"),
            );
        }
        let stopped = || HttpResponse::error(503, "stopped", "the workload instance is stopped");
        if self.stopped.load(Ordering::Acquire) {
            return stopped();
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|j| j.send((abi::encode_request(&req), tx)).is_ok());
        if !sent {
            return stopped();
        }
        let Ok(result) = rx.await else {
            return stopped();
        };
        match result {
            Ok(resp) => resp,
            Err(fault) => {
                self.restarts.fetch_add(1, Ordering::Relaxed);
                let (status, code, msg) = match fault {
                    CallFault::Timeout => (
                        504,
                        "guest_timeout",
                        format!(
                            "handler ran past its deadline of {} ms",
                            self.cfg.deadline_ticks.saturating_sub(1) * TICK_MS
                        ),
                    ),
                    CallFault::Trap(m) => (500, "guest_trap", m),
                };
                (self.cfg.logs)(format!("avail: {code}: {msg}; instance re-created"));
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("{code}: {msg}"));
                HttpResponse::error(status, code, &msg)
            }
        }
    }

    fn status(&self) -> InstanceStatus {
        let state = if self.stopped.load(Ordering::Acquire) {
            InstanceState::Failed
        } else {
            InstanceState::Running
        };
        InstanceStatus {
            state,
            restarts: self.restarts.load(Ordering::Relaxed),
            message: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    async fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        // The thread ends (dropping the instance) at its next request or now.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}
