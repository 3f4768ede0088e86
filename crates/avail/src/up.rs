//! `avail up`: a local cluster of real processes on loopback.
//!
//! One `avail server` on 127.0.0.1 and N `avail agent`s on 127.0.0.11, .12, ..., each
//! tagged (zones alternate tokyo/osaka, one rack per node), as child processes that die
//! with this one (`PR_SET_PDEATHSIG`). Writes `<data-dir>/cluster.json` and the CLI
//! context, prints what to try, and on Ctrl-C stops the agents, then the server. A
//! second `avail up` on the same data dir resumes the cluster with its workloads.
//!
//! `--servers 3` (or 5): an etcd of as many members on .245, .246, ... (data in
//! `<data-dir>/etcd`) and that many servers on .1, .2, ..., the later ones joining the
//! first's cluster; the agents and the CLI context list every server.

use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use avail_client::Client;
use avail_model::{Node, NodeState};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::cli::{CliError, shutdown_signal};
use crate::context;

/// Flags of `avail up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of agents.
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// Number of servers: 1 (its store embedded), or 3 or 5 on an etcd of as many
    /// members, started here.
    #[arg(long, default_value_t = 1)]
    servers: u8,
    /// Data directory of the whole cluster.
    #[arg(long, default_value = "avail-data")]
    data_dir: PathBuf,
    /// First three octets of the cluster's loopback addresses: the server gets .1,
    /// agents .11, .12, ...
    #[arg(long, default_value = "127.0.0")]
    net: String,
    /// Server port.
    #[arg(long, default_value_t = 7400)]
    server_port: u16,
    /// Agent ingress port.
    #[arg(long, default_value_t = avail_agent::DEFAULT_INGRESS_PORT)]
    ingress_port: u16,
    /// Do not write the CLI context file.
    #[arg(long)]
    no_context: bool,
}

/// What `cluster.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    /// Server base URL (several comma-separated, as agents and the CLI take them).
    pub server_url: String,
    /// Admin token file.
    pub token_file: PathBuf,
    /// The cluster CA certificate (`curl --cacert`, `avail --cacert`).
    pub ca_file: PathBuf,
    /// Agents.
    pub agents: Vec<AgentEntry>,
}

/// One agent of `cluster.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentEntry {
    /// Node name.
    pub name: String,
    /// Address.
    pub address: String,
    /// Ingress base URL.
    pub ingress_url: String,
    /// Tags.
    pub tags: Vec<String>,
    /// PID of the agent process.
    pub pid: u32,
}

fn spawn_child(args: &[String], env: &[(&str, &str)], log: &Path) -> Result<Child, CliError> {
    let exe =
        std::env::current_exe().map_err(|e| CliError::fail(format!("own executable: {e}")))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| CliError::fail(format!("{}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| CliError::fail(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Own process groups: a terminal's Ctrl-C reaches `avail up` only, which then
        // stops the agents before the server.
        .process_group(0)
        .kill_on_drop(true);
    avail_driver::process::set_parent_death_signal(&mut cmd, libc::SIGKILL);
    cmd.spawn()
        .map_err(|e| CliError::fail(format!("spawning {args:?}: {e}")))
}

/// The cluster's data dir and the server's, `0700` (also when they exist from an earlier
/// run): nothing in them is for other users, process workloads included; the logs of
/// an earlier run become `0600`.
fn private_dirs(dir: &Path, server_dir: &Path) -> Result<(), CliError> {
    let fail = |p: &Path, e: std::io::Error| CliError::fail(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(server_dir).map_err(|e| fail(server_dir, e))?;
    for d in [dir, server_dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(d, e))?;
    }
    for entry in std::fs::read_dir(dir).map_err(|e| fail(dir, e))?.flatten() {
        let p = entry.path();
        if p.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail(&p, e))?;
        }
    }
    Ok(())
}

/// Write `bytes` to `path` with mode `0600`.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Run `avail up`.
pub async fn run(a: UpArgs) -> Result<(), CliError> {
    let dir = abs(&a.data_dir);
    let ip = |last: u8| -> Result<Ipv4Addr, CliError> {
        format!("{}.{last}", a.net)
            .parse::<Ipv4Addr>()
            .map_err(|_| {
                CliError::invalid(format!(
                    "--net {:?}: expected three octets like 127.0.0",
                    a.net
                ))
            })
    };
    if !a.net.starts_with("127.") {
        return Err(CliError::invalid(
            "--net must be a loopback prefix (127.x.y)",
        ));
    }
    if a.nodes == 0 || a.nodes > 200 {
        return Err(CliError::invalid("--nodes must be 1..=200"));
    }
    let server_dir = dir.join("server");
    private_dirs(&dir, &server_dir)?;
    // A cluster.json of an earlier run is stale until this run is ready (scripts and
    // tests wait for it to appear).
    let cluster_path = dir.join("cluster.json");
    match std::fs::remove_file(&cluster_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(CliError::fail(format!("{}: {e}", cluster_path.display())));
        }
        _ => {}
    }
    if !matches!(a.servers, 1 | 3 | 5) {
        return Err(CliError::invalid("--servers must be 1, 3 or 5"));
    }
    // Several servers share an etcd of as many members, kept in the data dir.
    let etcd = if a.servers > 1 {
        let ips = (0..a.servers)
            .map(|i| ip(245 + i))
            .collect::<Result<Vec<Ipv4Addr>, CliError>>()?;
        let root = dir.join("etcd");
        let cluster = avail_store::etcd_process::EtcdCluster::persistent(&root, &ips)
            .map_err(|e| CliError::fail(format!("etcd: {e}")))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| CliError::fail(format!("{}: {e}", root.display())))?;
        Some(cluster)
    } else {
        None
    };
    let token_file = avail_server::admin_token_path(&server_dir);
    let ca_file = avail_server::ca_path(&server_dir);
    let mut servers = Vec::new();
    let mut urls = Vec::new();
    let mut probe = None;
    for i in 0..a.servers {
        let url = format!("https://{}:{}", ip(1 + i)?, a.server_port);
        let data = match i {
            0 => server_dir.clone(),
            i => dir.join(format!("server-{i}")),
        };
        let mut args = vec![
            "server".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("{}:{}", ip(1 + i)?, a.server_port),
        ];
        if let Some(etcd) = &etcd {
            args.extend(["--store".into(), etcd.store_flag()]);
        }
        if i > 0 {
            args.extend(["--join-from".into(), server_dir.display().to_string()]);
        }
        let log = match i {
            0 => dir.join("server.log"),
            i => dir.join(format!("server-{i}.log")),
        };
        let mut server = spawn_child(&args, &[], &log)?;
        probe = Some(wait_ready(&mut server, &url, &data, &log).await?);
        servers.push(server);
        urls.push(url);
    }
    let server_url = urls.join(",");
    let tls = probe.expect("at least one server");
    let token = std::fs::read_to_string(&token_file)
        .map_err(|e| CliError::fail(format!("{}: {e}", token_file.display())))?;
    let admin = Client::with_tls(&server_url, Some(token.trim().to_string()), None, Some(tls))
        .with_timeout(Duration::from_secs(2));
    // Nodes that joined before prove themselves with their keys; the new ones get one
    // join token, good for them only and for ten minutes, passed in the environment
    // (a command line is readable by every user of the machine).
    let new_nodes = (0..a.nodes)
        .filter(|i| {
            !dir.join(format!("node-{}", i + 1))
                .join("node.key")
                .exists()
        })
        .count() as u32;
    let join_token = if new_nodes > 0 {
        let req = avail_model::token::JoinTokenRequest {
            ttl_s: 600,
            uses: new_nodes,
            description: "avail up".into(),
        };
        let t: avail_model::token::JoinTokenCreated = admin.post("/v1/tokens", &req).await?;
        Some(t.token)
    } else {
        None
    };
    let mut agents = Vec::new();
    let mut entries = Vec::new();
    for i in 0..a.nodes {
        let name = format!("node-{}", i + 1);
        let addr = ip(11 + i)?;
        let zone = if i % 2 == 0 { "tokyo" } else { "osaka" };
        let tags = vec![
            format!("zone={zone}"),
            format!("rack=r{}", i + 1),
            "dc=dc1".to_string(),
        ];
        let child = spawn_child(
            &[
                "agent".into(),
                "--server".into(),
                server_url.clone(),
                "--ca-file".into(),
                ca_file.display().to_string(),
                "--name".into(),
                name.clone(),
                "--addr".into(),
                addr.to_string(),
                "--port".into(),
                a.ingress_port.to_string(),
                "--tags".into(),
                tags.join(","),
                "--data-dir".into(),
                dir.join(&name).display().to_string(),
            ],
            &join_token
                .as_deref()
                .map(|t| vec![("AVAIL_JOIN_TOKEN", t)])
                .unwrap_or_default(),
            &dir.join(format!("{name}.log")),
        )?;
        entries.push(AgentEntry {
            name,
            address: addr.to_string(),
            ingress_url: format!("http://{addr}:{}", a.ingress_port),
            tags,
            pid: child.id().unwrap_or(0),
        });
        agents.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = admin
            .get::<Vec<Node>>("/v1/nodes")
            .await
            .map(|ns| {
                entries.iter().all(|e| {
                    ns.iter()
                        .any(|n| n.name == e.name && n.state == NodeState::Ready)
                })
            })
            .unwrap_or(false);
        if ready {
            break;
        }
        for (e, c) in entries.iter().zip(agents.iter_mut()) {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(CliError::fail(format!(
                    "agent {} exited ({st}); see {}",
                    e.name,
                    dir.join(format!("{}.log", e.name)).display()
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(CliError::fail(
                "agents not ready after 60 s; see the logs in the data dir",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cluster = ClusterFile {
        server_url: server_url.clone(),
        token_file: token_file.clone(),
        ca_file: ca_file.clone(),
        agents: entries,
    };
    let ctx_note = if a.no_context {
        String::new()
    } else {
        match context::save(&context::Context {
            server: server_url.clone(),
            token_file,
            ca_file: Some(ca_file.clone()),
        }) {
            Ok(p) => format!("CLI context written to {}\n", p.display()),
            Err(e) => format!("(could not write the CLI context: {e})\n"),
        }
    };
    // cluster.json last: scripts and tests take its appearance as "ready".
    write_private(
        &cluster_path,
        &serde_json::to_vec_pretty(&cluster).expect("cluster serialises"),
    )
    .map_err(|e| CliError::fail(format!("{}: {e}", cluster_path.display())))?;
    let first = &cluster.agents[0];
    println!(
        "avail cluster up: {} {server_url}, {} agents\n{ctx_note}cluster file: {}\n\nTry:\n  avail node list\n  curl --cacert {} {}/livez\n  avail workload run --name counter --driver wasm --artifact guests/counter.wasm\n  curl -X POST {}/w/counter/incr\n\nCtrl-C stops the cluster; `avail up` on the same data dir resumes it.",
        if urls.len() > 1 { "servers" } else { "server" },
        cluster.agents.len(),
        cluster_path.display(),
        cluster.ca_file.display(),
        urls[0],
        first.ingress_url
    );
    let failed = tokio::select! {
        biased;
        _ = shutdown_signal() => None,
        m = all_exited(&mut servers) => Some(m),
    };
    eprintln!("stopping agents and servers");
    for c in agents.iter_mut() {
        terminate(c).await;
    }
    for s in servers.iter_mut() {
        terminate(s).await;
    }
    // The store last (its members stop cleanly and keep their data).
    drop(etcd);
    match failed {
        Some(m) => Err(CliError::fail(m)),
        None => Ok(()),
    }
}

/// Wait for a server (`servers[i]`, whose data dir is `data`) to write its CA and
/// token, then to answer over TLS at `url`: the TLS configuration that trusts it.
async fn wait_ready(
    server: &mut Child,
    url: &str,
    data: &Path,
    log: &Path,
) -> Result<Arc<rustls::ClientConfig>, CliError> {
    let token_file = avail_server::admin_token_path(data);
    let ca_file = avail_server::ca_path(data);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probe = None;
    loop {
        if let Ok(Some(st)) = server.try_wait() {
            return Err(CliError::fail(format!(
                "server exited ({st}); see {}",
                log.display()
            )));
        }
        if probe.is_none() && token_file.exists() {
            probe = std::fs::read_to_string(&ca_file)
                .ok()
                .and_then(|pem| avail_tls::client_config(&pem, None).ok());
        }
        if let Some(tls) = &probe
            && Client::with_tls(url, None, None, Some(tls.clone()))
                .with_timeout(Duration::from_secs(2))
                .get_bytes("/readyz")
                .await
                .is_ok()
        {
            return Ok(tls.clone());
        }
        if Instant::now() > deadline {
            return Err(CliError::fail(format!(
                "server not ready after 30 s; see {}",
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves when every one of `servers` has exited. One server exiting ends the
/// cluster; of several, each that exits is reported and the others go on (the
/// cluster outlives any one server).
async fn all_exited(servers: &mut [Child]) -> String {
    let mut gone = vec![false; servers.len()];
    loop {
        for (i, s) in servers.iter_mut().enumerate() {
            if !gone[i]
                && let Ok(Some(st)) = s.try_wait()
            {
                gone[i] = true;
                eprintln!("avail up: server {} exited ({st})", i + 1);
            }
        }
        if gone.iter().all(|g| *g) {
            return "every server exited".into();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM, then SIGKILL after 5 s.
async fn terminate(c: &mut Child) {
    if let Some(pid) = c.id() {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), c.wait())
        .await
        .is_err()
    {
        let _ = c.kill().await;
    }
}
