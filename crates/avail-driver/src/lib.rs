//! avail-driver: the drivers that run workloads on a node.
//!
//! Owns the [`Driver`] and [`Instance`] contracts and three drivers: [`wasm`] (wasmtime,
//! guest ABI v1 of `docs/guest-abi.md`), [`process`] (a host process listening on
//! `$PORT`, proxied over HTTP, contained by [`contain`]: its own uid, a private
//! working directory, cgroup v2 limits or rlimits) and [`qemu`] (a virtual machine,
//! run as a contained qemu process). Each driver declares what it can do
//! ([`Capabilities`]) so the control plane can refuse levels a driver cannot give.
//! It does not own placement, routing or the agent's supervision loop: an agent asks a
//! driver for an instance, sends it requests, and reads its status.

pub mod contain;
pub mod http;
pub mod process;
pub mod qemu;
pub mod shim;
pub mod wasm;

use std::sync::Arc;

use async_trait::async_trait;
use avail_model::agent::InstanceState;
use avail_model::{DriverKind, WorkloadSpec};

pub use http::{HttpRequest, HttpResponse};

/// What a driver can do for the availability levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Can run a workload at level `ft` (checkpoint replication).
    pub ft: bool,
    /// Can checkpoint periodically for `ha` restarts.
    pub ha_checkpoint: bool,
    /// Can live-migrate.
    pub live_migrate: bool,
}

impl Capabilities {
    /// Runs workloads at level `none` only.
    pub const NONE: Capabilities = Capabilities {
        ft: false,
        ha_checkpoint: false,
        live_migrate: false,
    };
}

/// Where a driver's instance writes its log lines (bounded by the receiver).
pub type LogSink = Arc<dyn Fn(String) + Send + Sync>;

/// What an instance was started from.
pub struct StartSpec<'a> {
    /// The workload's spec.
    pub spec: &'a WorkloadSpec,
    /// wasm: the module bytes (already fetched and digest-checked by the agent).
    pub module: Option<Arc<[u8]>>,
    /// qemu: the artifacts it names (kernel, initrd), by digest: where the agent keeps
    /// them, fetched and digest-checked.
    pub files: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// Sink for log lines.
    pub logs: LogSink,
}

/// Errors starting an instance.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The artifact is not usable (not wasm, missing ABI exports, ...).
    #[error("invalid artifact: {0}")]
    InvalidArtifact(String),
    /// The instance could not be created (spawn failed, instantiation failed, ...).
    #[error("cannot start: {0}")]
    Start(String),
}

/// Observed state of an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    /// State.
    pub state: InstanceState,
    /// Restarts since it was started on this node.
    pub restarts: u32,
    /// Last error, if any.
    pub message: Option<String>,
}

/// A running workload on this node.
#[async_trait]
pub trait Instance: Send + Sync {
    /// Serve one HTTP request. Never fails: faults become 5xx replies.
    async fn handle(&self, req: HttpRequest) -> HttpResponse;
    /// Current status.
    fn status(&self) -> InstanceStatus;
    /// Stop it and release its resources; the instance answers 503 afterwards.
    async fn stop(&self);
}

/// A driver: makes instances.
#[async_trait]
pub trait Driver: Send + Sync {
    /// Which driver this is.
    fn kind(&self) -> DriverKind;
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// Start an instance of the workload.
    async fn start(&self, start: StartSpec<'_>) -> Result<Arc<dyn Instance>, StartError>;
}
