//! avail-model: the data model shared by every part of avail.
//!
//! Owns workload specs and their validation, availability levels, nodes and tags,
//! placement constraints, workload status, cluster events, the agent protocol messages
//! and the API error shape. It does no I/O: everything here is plain data and pure
//! functions, so the server, the agent, the CLI and the tests agree on one definition.

pub mod agent;
pub mod api;
pub mod constraint;
pub mod error;
pub mod event;
pub mod level_state;
pub mod node;
pub mod rng;
pub mod spec;
pub mod status;
pub mod token;

pub use constraint::{Constraint, ConstraintOp};
pub use error::{ApiError, ApiErrorBody, ValidationError};
pub use event::{ClusterEvent, EventKind};
pub use level_state::{LevelState, Protection, ReplicaMode};
pub use node::{Node, NodeState};
pub use spec::{
    DriverKind, FtSpec, HaSpec, Level, Placement, Resources, SecondaryLoss, WorkloadSpec,
};
pub use status::{FtStatus, Phase, Workload, WorkloadStatus};

/// Milliseconds since the Unix epoch, the one clock unit of the model.
pub type TimeMs = u64;
