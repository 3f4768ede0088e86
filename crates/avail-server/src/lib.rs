//! avail-server: the control plane.
//!
//! Owns the HTTP API under `/v1/` (workloads, nodes, events, artifacts, the agent
//! protocol), authentication by signed tokens, placement through `avail-sched`, node
//! liveness from heartbeats and store leases, cluster events, metrics and the OpenAPI
//! document. State lives in an `avail-store` backend; this crate holds only caches.
//! It does not run workloads (agents do) and does not decide placement itself (the
//! scheduler does; the server applies its plan).

pub mod admission;
pub mod api;
pub mod auth;
pub mod create_plan;
pub mod creates;
pub mod desired;
pub mod drain;
pub mod events;
pub mod followers;
pub mod heard_relay;
pub mod identity;
pub mod join;
pub mod join_tokens;
pub mod keys;
pub mod leader;
pub mod level_change;
pub mod level_policy;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod module_checks;
pub mod pairs;
pub mod pending_plan;
pub mod placement;
pub mod reports;
pub mod restart_plan;
pub mod restarts;
pub mod schema;
pub mod state;
pub mod store_open;
pub mod view;

use avail_model::EventKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::auth::{Auth, Role};
use crate::state::AppState;

/// Lifetime of the admin token: one year.
pub const TOKEN_TTL_S: u64 = 365 * 24 * 3600;
/// Lifetime of the API's server certificate (made afresh at every start): one year.
const SERVER_CERT_TTL_S: u64 = 365 * 24 * 3600;

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
    /// A node not heard from for this long is `suspect` (not schedulable).
    pub suspect_after: Duration,
    /// A node not heard from for this long is `down`: its `ha` workloads are restarted
    /// elsewhere. Its agent stops them itself before that when it is cut off (fencing:
    /// the agent's isolation window is this less a margin).
    pub down_after: Duration,
    /// After this server starts, no node is declared down for this long unless it was
    /// heard and then went silent (the agents need time to find a restarted or new
    /// control plane: no mass restart because the control plane was away).
    pub startup_grace: Duration,
    /// Life of a node certificate; agents renew theirs at half of it.
    pub node_cert_ttl: Duration,
    /// Where the state is kept: embedded redb (default) or etcd.
    pub store: store_open::StoreChoice,
    /// Life of the leader's lease, seconds ([`leader`]).
    pub leader_ttl_s: u64,
    /// Another server's data dir of the cluster this server joins: its cluster files
    /// are copied into this one at start ([`store_open::adopt_cluster`]).
    pub join_from: Option<PathBuf>,
    /// Tag keys only an administrator sets (`avail node tag`): a node may not declare
    /// them at its join, so a node cannot make itself eligible for workloads that
    /// require them (as Kubernetes' NodeRestriction keeps kubelets off reserved labels).
    pub admin_tags: std::collections::BTreeSet<String>,
}

/// Tag keys only an administrator sets, unless configured otherwise.
pub const DEFAULT_ADMIN_TAGS: &[&str] = &["compliance"];

/// Why a liveness configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The flag or field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl ServerConfig {
    /// Defaults fit for a LAN: heartbeat 200 ms, suspect after 500 ms, down after 1 s,
    /// a grace of 5 s after a start.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            data_dir,
            listen,
            heartbeat_interval: Duration::from_millis(200),
            suspect_after: Duration::from_millis(500),
            down_after: Duration::from_millis(1000),
            startup_grace: Duration::from_secs(5),
            node_cert_ttl: Duration::from_secs(3600),
            admin_tags: DEFAULT_ADMIN_TAGS.iter().map(|k| k.to_string()).collect(),
            store: store_open::StoreChoice::Redb,
            leader_ttl_s: leader::LEADER_TTL_S,
            join_from: None,
        }
    }

    /// Set the life of the leader's lease (1 to 60 s; a store may raise it to its
    /// floor, about 2 s on etcd with its default timing).
    pub fn with_leader_ttl(mut self, ttl_s: u64) -> Result<ServerConfig, ConfigError> {
        if !(1..=60).contains(&ttl_s) {
            return Err(ConfigError {
                field: "leader-ttl-s",
                reason: format!("{ttl_s} is out of range 1..=60"),
            });
        }
        self.leader_ttl_s = ttl_s;
        Ok(self)
    }

    /// Keep the state in `store` (`redb`, or `etcd://host:port,...` under `prefix`).
    pub fn with_store(mut self, store: &str, prefix: &str) -> Result<ServerConfig, ConfigError> {
        self.store = store_open::StoreChoice::parse(store, prefix)?;
        Ok(self)
    }

    /// Set the tag keys only an administrator sets (each a valid tag key).
    pub fn with_admin_tags(mut self, keys: &[String]) -> Result<ServerConfig, ConfigError> {
        for k in keys {
            avail_model::constraint::parse_tag(&format!("{k}=x")).map_err(|e| ConfigError {
                field: "admin-tags",
                reason: format!("{k:?}: {}", e.message),
            })?;
        }
        self.admin_tags = keys.iter().cloned().collect();
        Ok(self)
    }

    /// Set the life of node certificates (10 s to 30 days).
    pub fn with_node_cert_ttl(mut self, ttl_s: u64) -> Result<ServerConfig, ConfigError> {
        if !(10..=30 * 24 * 3600).contains(&ttl_s) {
            return Err(ConfigError {
                field: "node-cert-ttl-s",
                reason: format!("{ttl_s} is out of range 10..=2592000"),
            });
        }
        self.node_cert_ttl = Duration::from_secs(ttl_s);
        Ok(self)
    }

    /// Set the liveness windows (ms), checked: heartbeat < suspect < down, the down
    /// window at least two heartbeats and a margin for the agent to fence itself.
    pub fn with_windows(
        mut self,
        heartbeat_ms: u64,
        suspect_after_ms: u64,
        down_after_ms: u64,
    ) -> Result<ServerConfig, ConfigError> {
        let err = |field, reason: String| Err(ConfigError { field, reason });
        if !(50..=10_000).contains(&heartbeat_ms) {
            return err(
                "heartbeat-ms",
                format!("{heartbeat_ms} is out of range 50..=10000"),
            );
        }
        if suspect_after_ms <= heartbeat_ms {
            return err(
                "suspect-after-ms",
                format!("{suspect_after_ms} must be longer than the heartbeat ({heartbeat_ms})"),
            );
        }
        if down_after_ms <= suspect_after_ms || down_after_ms < 2 * heartbeat_ms + 300 {
            return err(
                "down-after-ms",
                format!(
                    "{down_after_ms} must be longer than suspect-after-ms ({suspect_after_ms}) and at least two heartbeats plus 300 ms ({})",
                    2 * heartbeat_ms + 300
                ),
            );
        }
        if down_after_ms > 600_000 {
            return err("down-after-ms", format!("{down_after_ms} is over 600000"));
        }
        self.heartbeat_interval = Duration::from_millis(heartbeat_ms);
        self.suspect_after = Duration::from_millis(suspect_after_ms);
        self.down_after = Duration::from_millis(down_after_ms);
        self.startup_grace = self.startup_grace.max(self.down_after * 2);
        Ok(self)
    }

    /// A blackout: this server heard no node at all for this long. The agents may then
    /// have found the control plane away (every peer silent for their isolation
    /// window, [`avail_model::node::isolation_window`]) and kept serving: no node is
    /// declared down, and the nodes get the grace again. Half a heartbeat short of the
    /// agents' window (their silence is timed from the heartbeats' sending), and over a
    /// heartbeat and a quarter (a small cluster is not a blackout between two beats).
    pub fn blackout_after(&self) -> Duration {
        let window = avail_model::node::isolation_window(self.down_after);
        window
            .saturating_sub(self.heartbeat_interval / 2)
            .max(self.heartbeat_interval * 5 / 4)
    }

    /// TTL of a node's liveness lease in the store, whole seconds (the store's unit):
    /// the down window rounded up. The server declares a node down from its own clock
    /// after [`ServerConfig::down_after`] and revokes the lease; the TTL is the backstop
    /// when the server that renews it is gone.
    pub fn lease_ttl_s(&self) -> u64 {
        self.down_after.as_millis().div_ceil(1000).max(1) as u64
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
    /// The cluster CA or the server certificate.
    #[error("TLS: {0}")]
    Tls(#[from] avail_tls::TlsError),
    /// Listening or data directory I/O.
    #[error("{0}")]
    Io(String),
}

/// Paths of the token files in a data directory.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}
/// Path of the cluster CA certificate (what clients trust).
pub fn ca_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ca.crt")
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

/// Create `dir` if needed and make it `0700`: the store, keys, tokens and artifacts are
/// for the server's user only (process workloads run as other users).
fn private_dir(dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| ServerError::Io(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// A server that is listening.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// This server's registration among the servers (leave it on a clean shutdown).
    pub membership: membership::Membership,
    /// This server's part in the leadership (resign it on a clean shutdown).
    pub leadership: leader::Leadership,
    /// Shared state (for tests and embedding).
    pub state: Arc<AppState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Serve until the task ends.
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        match (&mut self.task).await {
            Ok(r) => r.map_err(|e| ServerError::Io(e.to_string())),
            Err(e) => Err(ServerError::Io(e.to_string())),
        }
    }

    /// A clean stop: give the lead up (another server leads at once) and leave the
    /// servers (agents are no longer sent here).
    pub async fn stop(&self) {
        self.leadership.resign().await;
        self.membership.leave().await;
    }
}

/// Open the data directory and store, create keys and tokens on first start, start the
/// background loops and listen.
pub async fn start(config: ServerConfig) -> Result<Running, ServerError> {
    let dir = &config.data_dir;
    private_dir(dir)?;
    private_dir(&dir.join("artifacts"))?;
    if let Some(from) = &config.join_from {
        store_open::adopt_cluster(from, dir)?;
    }
    let store = store_open::open(&config.store, dir).await?;
    store_open::bind_cluster(store.as_ref(), dir, &config.store.describe(dir)).await?;
    let (records, _) = schema::cluster_schema(store.as_ref()).await?;
    schema::check(records, schema::SCHEMA).map_err(ServerError::Io)?;
    let auth = Auth::load_or_create(dir)?;
    ensure_token(&auth, &admin_token_path(dir), "admin", Role::Admin)?;
    let ca = avail_tls::ClusterCa::load_or_create(dir)?;
    let mut ips = vec![config.listen.ip()];
    if !ips.contains(&std::net::IpAddr::from([127, 0, 0, 1])) {
        ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    let (chain, key) = ca.issue_server(&ips, SERVER_CERT_TTL_S)?;
    let tls = avail_tls::server_config(&chain, &key, Some(ca.cert_pem()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServerError::Io(format!("listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Io(e.to_string()))?;
    let server_id = store_open::server_id(dir)?;
    let leadership = leader::Leadership::start(
        store.clone(),
        server_id.clone(),
        addr.to_string(),
        config.leader_ttl_s,
    );
    // This server's client certificate, for what it asks of the other servers.
    let (client_chain, client_key) = ca.issue_server_client(&server_id, SERVER_CERT_TTL_S)?;
    let client_cert = avail_tls::config::NodeCert::new();
    client_cert.set(&client_chain, &client_key)?;
    let peer_tls = avail_tls::client_config(ca.cert_pem(), Some(client_cert))?;
    let relay = heard_relay::HeardRelay::start(
        store.clone(),
        leadership.clone(),
        peer_tls,
        server_id.clone(),
    );
    let state = AppState::open(store, auth, ca, config).await?;
    let _ = state.leadership.set(leadership.clone());
    let _ = state.relay.set(relay);
    let membership = membership::Membership::start(
        state.store.clone(),
        avail_model::api::ServerInfo {
            id: server_id.clone(),
            api: format!("https://{addr}"),
            version: env!("CARGO_PKG_VERSION").to_string(),
            schema: schema::SCHEMA,
            since_ms: now_ms(),
        },
        state.config.leader_ttl_s,
    );
    state
        .events
        .emit(
            EventKind::ServerStarted,
            None,
            None,
            format!("listening on {addr}"),
        )
        .await;
    tokio::spawn(background(Arc::downgrade(&state), leadership.clone()));
    let app = api::router(state.clone());
    let task = tokio::spawn(avail_tls::serve::serve(
        listener,
        Some(tls),
        app,
        api_limits(),
    ));
    Ok(Running {
        addr,
        membership,
        leadership,
        state,
        task,
    })
}

/// Most connections the API takes: every agent holds two (its heartbeats and its
/// desired-state long poll) and a server may have 10,000 nodes.
pub const API_MAX_CONNECTIONS: usize = 32_768;

/// The API listener's bounds: the defaults, but room for the agents of a large
/// cluster; the process's file limit is raised to match ([`raise_file_limit`]).
fn api_limits() -> avail_tls::serve::Limits {
    let files = raise_file_limit();
    avail_tls::serve::Limits {
        // Keep a quarter of the files for the store, the artifacts and the logs.
        max_connections: API_MAX_CONNECTIONS.min((files as usize) * 3 / 4).max(256),
        ..avail_tls::serve::Limits::default()
    }
}

/// Raise this process's open-file limit to its hard limit (the soft one is often
/// 1,024); the limit in force.
pub fn raise_file_limit() -> u64 {
    raise_file_limit_to(0)
}

/// Raise this process's open-file limits, soft and hard, to at least `files` where it
/// may (root with `CAP_SYS_RESOURCE`), else the soft one to the hard one; the soft
/// limit in force. Processes started afterwards inherit it.
pub fn raise_file_limit_to(files: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct given, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let want = libc::rlimit {
            rlim_cur: files.max(lim.rlim_max),
            rlim_max: files.max(lim.rlim_max),
        };
        let hard = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        for l in [want, hard] {
            if l.rlim_cur >= lim.rlim_cur && libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 {
                lim = l;
                break;
            }
        }
    }
    lim.rlim_cur
}

/// The decision passes, on the leader only (see [`leader`]): liveness verdicts every
/// 50 ms, pending placements and the level policy every second, drains.
async fn background(state: std::sync::Weak<AppState>, leadership: leader::Leadership) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut n: u64 = 0;
    let mut led = None;
    loop {
        tick.tick().await;
        let Some(s) = state.upgrade() else { return };
        let role = leadership.role();
        if led.as_ref() != Some(&role) {
            if let leader::Role::Leader { term } = role {
                s.begin_term();
                s.events
                    .emit(
                        EventKind::ServerLeader,
                        None,
                        None,
                        format!("this server decides from term {term}"),
                    )
                    .await;
            }
            led = Some(role.clone());
        }
        let leader::Role::Leader { term } = role else {
            continue;
        };
        let every_second = n.is_multiple_of(20);
        leader::TERM
            .scope(term, async {
                s.check_liveness().await;
                if every_second {
                    s.place_pending().await;
                    s.enforce_level_policy().await;
                    s.raise_schema().await;
                }
                s.drain_pass().await;
            })
            .await;
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ServerConfig {
        ServerConfig::new("d".into(), "127.0.0.1:0".parse().unwrap())
    }

    #[test]
    fn a_blackout_is_shorter_than_the_agents_isolation_window() {
        // 666 ms window, less half a heartbeat.
        assert_eq!(base().blackout_after(), Duration::from_millis(566));
        // Long heartbeats: never under a heartbeat and a quarter.
        let c = base().with_windows(1000, 2000, 2300).unwrap();
        assert_eq!(c.blackout_after(), Duration::from_millis(1250));
        assert!(c.blackout_after() < avail_model::node::isolation_window(c.down_after));
    }

    #[test]
    fn windows_are_checked_and_name_the_flag() {
        let c = base().with_windows(100, 300, 600).unwrap();
        assert_eq!(c.down_after, Duration::from_millis(600));
        assert_eq!(c.lease_ttl_s(), 1);
        assert_eq!(
            base().with_windows(200, 500, 2500).unwrap().lease_ttl_s(),
            3
        );
        // The grace covers at least two down windows.
        assert_eq!(
            base()
                .with_windows(1000, 5000, 10_000)
                .unwrap()
                .startup_grace,
            Duration::from_secs(20)
        );
        for (hb, s, d, field) in [
            (10, 500, 1000, "heartbeat-ms"),
            (200, 200, 1000, "suspect-after-ms"),
            (200, 500, 500, "down-after-ms"),
            (400, 500, 900, "down-after-ms"),
            (200, 500, 700_000, "down-after-ms"),
        ] {
            let e = base().with_windows(hb, s, d).unwrap_err();
            assert_eq!(e.field, field, "{hb} {s} {d}: {e}");
        }
    }
}
