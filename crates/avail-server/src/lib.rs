//! avail-server: the control plane.
//!
//! Owns the HTTP API under `/v1/` (workloads, nodes, events, artifacts, the agent
//! protocol), authentication by signed tokens, placement through `avail-sched`, node
//! liveness from heartbeats and store leases, cluster events, metrics and the OpenAPI
//! document. State lives in an `avail-store` backend; this crate holds only caches.
//! It does not run workloads (agents do) and does not decide placement itself (the
//! scheduler does; the server applies its plan).

pub mod api;
pub mod auth;
pub mod events;
pub mod keys;
pub mod metrics;
pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use avail_store::{RedbStore, Store};

use crate::auth::{Auth, Role};
use crate::state::AppState;

/// Lifetime of issued tokens: one year.
pub const TOKEN_TTL_S: u64 = 365 * 24 * 3600;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh random id (16 hex digits).
pub fn new_uid() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    format!("{:016x}", u64::from_le_bytes(b))
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    now_ms() / 1000
}

/// Server configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Data directory: store file, keys, tokens, artifacts.
    pub data_dir: PathBuf,
    /// Address of the API.
    pub listen: SocketAddr,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// A node not heard from for this long is `suspect`.
    pub suspect_after: Duration,
    /// TTL of a node's liveness lease: without a heartbeat for this long it is `down`.
    pub lease_ttl_s: u64,
}

impl ServerConfig {
    /// Defaults fit for a LAN: heartbeat 500 ms, suspect after 1.5 s, down after 3 s.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            data_dir,
            listen,
            heartbeat_interval: Duration::from_millis(500),
            suspect_after: Duration::from_millis(1500),
            lease_ttl_s: 3,
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened (names the file).
    #[error(transparent)]
    Store(#[from] avail_store::StoreError),
    /// Key or token files.
    #[error("key material: {0}")]
    Key(#[from] auth::KeyError),
    /// Listening or data directory I/O.
    #[error("{0}")]
    Io(String),
}

/// Paths of the token files in a data directory.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}
/// Path of the join token file.
pub fn join_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("join.token")
}

fn ensure_token(auth: &Auth, path: &Path, sub: &str, role: Role) -> Result<(), ServerError> {
    let valid = std::fs::read_to_string(path)
        .ok()
        .is_some_and(|t| auth.verify(t.trim(), now_s() + 24 * 3600).is_ok());
    if !valid {
        auth::write_secret(path, auth.issue(sub, role, now_s(), TOKEN_TTL_S).as_bytes())
            .map_err(|e| ServerError::Io(format!("{}: {e}", path.display())))?;
        tracing::info!("wrote {}", path.display());
    }
    Ok(())
}

/// A server that is listening.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// Shared state (for tests and embedding).
    pub state: Arc<AppState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Serve until the task ends.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(r) => r.map_err(|e| ServerError::Io(e.to_string())),
            Err(e) => Err(ServerError::Io(e.to_string())),
        }
    }
}

/// Open the data directory and store, create keys and tokens on first start, start the
/// background loops and listen.
pub async fn start(config: ServerConfig) -> Result<Running, ServerError> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| ServerError::Io(format!("{}: {e}", dir.display())))?;
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.join("store.redb"))?);
    let auth = Auth::load_or_create(dir)?;
    ensure_token(&auth, &admin_token_path(dir), "admin", Role::Admin)?;
    ensure_token(&auth, &join_token_path(dir), "join", Role::Join)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServerError::Io(format!("listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Io(e.to_string()))?;
    let state = AppState::open(store, auth, config).await?;
    state
        .events
        .emit("server.started", None, None, format!("listening on {addr}"))
        .await;
    tokio::spawn(background(Arc::downgrade(&state)));
    let app = api::router(state.clone());
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Running { addr, state, task })
}

async fn background(state: std::sync::Weak<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let Some(s) = state.upgrade() else { return };
        s.check_liveness().await;
        if n.is_multiple_of(4) {
            s.place_pending().await;
        }
        n += 1;
    }
}
