//! avail-agent: the node daemon.
//!
//! Owns what happens on one node: joining the cluster with a join token, heartbeating
//! (which carries instance status and log lines), following the node's desired state
//! (a long poll on the server), running workloads through the drivers
//! ([`supervisor`]), and the node's ingress ([`ingress`]), which answers
//! `/w/<workload>/<path>` for any workload in the cluster by serving it locally or
//! forwarding it to the node that runs it. It does not decide placement.
//!
//! An agent binds its listener **and its outgoing connections** to its own address, so
//! that a partition can be made by address. Killing the agent kills its workloads:
//! wasm instances live in the agent's process, and process workloads die with it
//! (`PR_SET_PDEATHSIG`).

pub mod body_budget;
pub mod capacity;
pub mod contain;
pub mod fence;
pub mod ft;
pub mod identity;
pub mod ingress;
pub mod peers;
pub mod replylog;
pub mod supervisor;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use avail_client::{Client, ClientError};
use avail_model::Resources;
use avail_model::agent::{ContactReply, Heartbeat, HeartbeatReply, JoinResponse};

use crate::identity::Identity;
use crate::supervisor::Supervisor;

/// Default ingress port.
pub const DEFAULT_INGRESS_PORT: u16 = 7480;

/// Agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Node name.
    pub name: String,
    /// The node's own address: listeners and outgoing connections bind to it.
    pub addr: IpAddr,
    /// Ingress port.
    pub ingress_port: u16,
    /// Replication port (`ft` checkpoint streams).
    pub replication_port: u16,
    /// Server base URL, or several comma-separated (failed over between).
    pub server: String,
    /// Join token (needed for the first join only: afterwards the node's key, kept in
    /// the data dir, proves who it is).
    pub join_token: Option<String>,
    /// The cluster CA certificate (PEM): the only one the agent trusts.
    pub ca_pem: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Capacity offered (by default the machine's: [`capacity::machine`]).
    pub capacity: Resources,
    /// The most workload replicas the node takes.
    pub max_workloads: u32,
    /// Memory the node's `ft` secondaries may hold in checkpoint images, MiB.
    pub ft_secondary_memory_mib: u64,
    /// Data directory (artifact cache).
    pub data_dir: PathBuf,
    /// This run of the agent (see [`new_boot_id`]).
    pub boot_id: String,
    /// Executable that provides `process-shim` (the `avail` binary), so that process
    /// workloads and all their children die with the agent.
    pub process_shim: Option<PathBuf>,
    /// How process workloads are contained.
    pub contain: contain::ContainSettings,
}

/// A boot id for this process: pid and start time, unique per run on a machine.
pub fn new_boot_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{nanos:x}", std::process::id())
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The join token was refused.
    #[error("join refused by {server}: {reason}")]
    JoinRefused {
        /// Server URL.
        server: String,
        /// Why.
        reason: String,
    },
    /// Listening failed.
    #[error("ingress: cannot listen on {addr}: {reason}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A driver could not be set up.
    #[error("driver: {0}")]
    Driver(String),
}

/// Join (or re-join) the cluster, retrying while the server is unreachable, and take
/// the certificate it signs. A refusal (400/401/403/409) is final.
async fn join(cfg: &AgentConfig, id: &Identity) -> Result<JoinResponse, AgentError> {
    let joiner = id.join_client(cfg)?;
    let mut delay = Duration::from_millis(100);
    loop {
        // A fresh proof each try: a proof goes stale.
        let req = id.join_request(cfg);
        match joiner.post::<_, JoinResponse>("/v1/agent/join", &req).await {
            Ok(r) => {
                id.adopt(&r.certificate)?;
                tracing::info!(node = %cfg.name, "joined {}", joiner.base());
                return Ok(r);
            }
            Err(
                e @ ClientError::Api {
                    status: 400 | 401 | 403 | 409,
                    ..
                },
            ) => {
                tracing::error!("join refused: {e}");
                return Err(AgentError::JoinRefused {
                    server: joiner.base().to_string(),
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                tracing::warn!("join: {e}; retrying in {} ms", delay.as_millis());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Run the agent until `shutdown` resolves; then stop every workload.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let listen = SocketAddr::new(cfg.addr, cfg.ingress_port);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| AgentError::Listen {
            addr: listen,
            reason: e.to_string(),
        })?;
    let repl_addr = SocketAddr::new(cfg.addr, cfg.replication_port);
    let repl_listener = tokio::net::TcpListener::bind(repl_addr)
        .await
        .map_err(|e| AgentError::Listen {
            addr: repl_addr,
            reason: e.to_string(),
        })?;
    let mut cfg = cfg;
    // VMs run here when qemu does: said as a tag the server places VMs by.
    if let Some(accel) = avail_driver::qemu::QemuDriver::host_accel() {
        cfg.tags
            .insert(avail_model::node::VM_TAG.into(), accel.as_str().into());
    }
    let id = Arc::new(Identity::load(&cfg)?);
    let client = id.server_client();
    let joined = join(&cfg, &id).await?;
    let peers = Arc::new(
        peers::Peers::new(&cfg.name, cfg.addr, &cfg.ca_pem, id.node_cert())
            .map_err(|e| AgentError::Driver(format!("peer TLS: {e}")))?,
    );
    let peer_tls = peers
        .server_config()
        .map_err(|e| AgentError::Driver(format!("peer TLS: {e}")))?;
    let renewed = peers.clone();
    let renewal = tokio::spawn(
        id.clone()
            .renew_loop(joined.certificate_expires_s, move || renewed.renew()),
    );
    let sup =
        Arc::new(Supervisor::new(cfg.clone(), client.clone(), peers).map_err(AgentError::Driver)?);
    let (links_tx, links) = tokio::sync::mpsc::channel(ft::LINK_QUEUE);
    let ingress = tokio::spawn(ingress::serve(
        listener,
        repl_listener,
        peer_tls,
        links_tx,
        sup.clone(),
    ));
    let finder = sup.clone();
    let replication = tokio::spawn(ft::serve_replication(links, move |hello, cert| {
        finder.secondary(hello, cert)
    }));
    let heartbeat = tokio::spawn(heartbeat_loop(cfg.clone(), id, client, sup.clone(), joined));
    let desired = tokio::spawn(supervisor::follow_desired(sup.clone()));
    tracing::info!(node = %cfg.name, "agent ready; ingress on http://{listen}, peer port {repl_addr}");
    shutdown.await;
    tracing::info!("shutting down: stopping workloads");
    heartbeat.abort();
    renewal.abort();
    desired.abort();
    ingress.abort();
    replication.abort();
    sup.stop_all().await;
    Ok(())
}

/// Fencing of level ha: every quarter of the isolation window (at most 200 ms), when the server has not answered for the
/// isolation window, ask the other nodes whether they still hear it. If one does, this
/// node is the one cut off; if none answers, this node is isolated: either way its ha
/// workloads stop before the server declares it down and restarts them elsewhere. If
/// every node that answers has lost the server too, the control plane is away: nothing
/// is restarted elsewhere meanwhile, so nothing stops.
pub(crate) async fn fence_watch(sup: Arc<Supervisor>) {
    // Rounds in a row in which no peer answered.
    let mut unanswered = 0;
    loop {
        tokio::time::sleep(fence::round_period(sup.fence_after())).await;
        if !sup.isolated() || sup.is_fenced() {
            continue;
        }
        // Every peer at once, on their peer ports (mutual TLS: an answer comes from the
        // node named, never from whoever holds a socket). Meanwhile the ingress already refuses the ha workloads (the node
        // is isolated and the control plane not shown away), so a late verdict is
        // safe, and a busy peer gets time to answer: 500 ms to 1 s.
        let window = sup.fence_after();
        let timeout = fence::ask_timeout(window);
        let mut asks = tokio::task::JoinSet::new();
        for name in sup.peers().others() {
            let Some((peer, base)) = sup.peers().http(&name) else {
                continue;
            };
            asks.spawn(async move { contact_age(&peer, &base, timeout).await });
        }
        let mut ages = Vec::new();
        while let Some(age) = asks.join_next().await {
            ages.push(age.ok().flatten());
        }
        let round = fence::peer_round(&ages, window, sup.judged_age(), sup.company_margin());
        let reached = if round.heard_by_peer {
            // A peer hears the server. If this node reaches it too, the control plane
            // was away and is coming back (the peer's heartbeat got through first):
            // this node is not cut off, and its own heartbeat follows.
            Some(
                sup.server_client()
                    .with_timeout(timeout)
                    .raw(hyper::Method::GET, "/livez", None, &[])
                    .await
                    .is_ok_and(|r| r.status == 200),
            )
        } else {
            None
        };
        let Some(verdict) = fence::decide(round, reached, unanswered) else {
            continue;
        };
        if verdict.away != sup.is_away() || verdict.fence {
            tracing::info!(
                away = verdict.away,
                fence = verdict.fence,
                mine_ms = sup.judged_age().as_millis() as u64,
                peers_ms = ?ages,
                lost_with_me = round.lost_with_me,
                "the peers were asked whether the control plane is away"
            );
        }
        sup.set_control_plane_away(verdict.away);
        unanswered = verdict.unanswered;
        if verdict.fence {
            sup.fence().await;
        }
    }
}

/// A peer's contact age, asked on its peer port (mutual TLS: only that node answers).
async fn contact_age(peer: &peers::PeerClient, base: &str, timeout: Duration) -> Option<u64> {
    use http_body_util::BodyExt as _;
    let req = hyper::Request::get(format!("{base}/_avail/contact"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    let ask = async {
        let resp = peer.request(req).await.ok()?;
        if resp.status() != hyper::StatusCode::OK {
            return None;
        }
        let body = http_body_util::Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice::<ContactReply>(&body).ok()
    };
    let reply = tokio::time::timeout(timeout, ask).await.ok()??;
    Some(reply.contact_age_ms)
}

async fn heartbeat_loop(
    cfg: AgentConfig,
    id: Arc<Identity>,
    client: Client,
    sup: Arc<Supervisor>,
    mut joined: JoinResponse,
) {
    sup.set_lease_ttl(Duration::from_millis(joined.lease_ttl_ms));
    tokio::spawn(fence_watch(sup.clone()));
    loop {
        let interval = Duration::from_millis(joined.heartbeat_interval_ms.clamp(50, 10_000));
        let hb = Heartbeat {
            instances: sup.statuses(),
            logs: sup.drain_logs(),
            fences: sup.take_fences(),
        };
        let authed = client.with_timeout(interval * 4);
        // Contact is timed from when the heartbeat left, never from its answer: the
        // server judges this node by when it received it, which is no earlier.
        let sent = std::time::Instant::now();
        match authed
            .post::<_, HeartbeatReply>("/v1/agent/heartbeat", &hb)
            .await
        {
            Ok(reply) => {
                // The windows may have changed (a server restarted with others).
                sup.set_lease_ttl(Duration::from_millis(reply.lease_ttl_ms));
                joined.heartbeat_interval_ms = reply.heartbeat_interval_ms;
                // The servers now (added, replaced, a blue/green switch): every call
                // of this node goes to them from now on (the clients share the list).
                client.set_bases(&reply.servers);
                // Back from an isolation (a pause, a partition) that the peers did not
                // show to be the control plane's: stop the ha workloads first; the fresh
                // desired state says which still belong here. After a control-plane
                // outage they simply go on: the peers showed it away when the heartbeat
                // left, or show it now (a round after it left covers the time since; a
                // leader back from an outage gives the nodes a grace longer than the
                // verdict lasts).
                if sup.is_fenced() || (sup.isolated_at(sent) && !sup.is_away()) {
                    sup.fence().await;
                }
                sup.set_suspect_after(Duration::from_millis(reply.suspect_ms));
                sup.contact(sent, reply.judged);
            }
            Err(ClientError::Api {
                status: 401 | 404, ..
            }) => {
                sup.unreported_fences(hb.fences);
                // The server forgot the node (removed, or a new data dir) or its
                // certificate expired: join again, with the key's proof.
                match join(&cfg, &id).await {
                    Ok(j) => joined = j,
                    Err(e) => tracing::error!("re-join failed: {e}"),
                }
            }
            Err(e) => {
                tracing::warn!("heartbeat: {e}");
                sup.unreported_fences(hb.fences);
            }
        }
        tokio::time::sleep(interval).await;
    }
}
