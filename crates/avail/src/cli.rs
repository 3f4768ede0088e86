//! Command-line interface.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use avail_client::{Client, ClientError};
use avail_model::agent::LogLine;
use avail_model::constraint::parse_tag;
use avail_model::spec::is_digest;
use avail_model::{
    ClusterEvent, DriverKind, Level, Node, Phase, Resources, Workload, WorkloadSpec,
};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::{context, output, up};

/// An error with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code: 1 error, 2 invalid input or unplaceable.
    pub code: u8,
    /// Message.
    pub message: String,
}

impl CliError {
    /// Exit code 1.
    pub fn fail(message: impl Into<String>) -> CliError {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
    /// Exit code 2.
    pub fn invalid(message: impl Into<String>) -> CliError {
        CliError {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        let code = match e.status() {
            Some(400 | 413 | 422) => 2,
            _ => 1,
        };
        CliError {
            code,
            message: e.to_string(),
        }
    }
}

type CliResult = Result<(), CliError>;

/// Output format of reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// avail: an availability-first workload platform.
#[derive(Parser, Debug)]
#[command(name = "avail", version, about, propagate_version = true)]
pub struct Cli {
    /// Output format of reads.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t)]
    pub output: Format,
    /// More logging.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where the client verbs find the server.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Server URL (else AVAIL_ADDR, else the context `avail up` wrote).
    #[arg(long, global = true, env = "AVAIL_ADDR")]
    pub addr: Option<String>,
    /// Admin token (else AVAIL_TOKEN, else the context `avail up` wrote).
    #[arg(long, global = true, env = "AVAIL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA certificate to verify the server with (else AVAIL_CACERT, else
    /// the context `avail up` wrote).
    #[arg(long, global = true, env = "AVAIL_CACERT")]
    pub cacert: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane.
    Server(ServerArgs),
    /// Run a node agent.
    Agent(AgentArgs),
    /// Start a local cluster: one server and N agents on loopback.
    Up(up::UpArgs),
    /// Workloads.
    Workload {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: WorkloadCmd,
    },
    /// Nodes.
    Node {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Cluster-wide settings.
    Cluster {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Join tokens: what a new node needs to join (bounded in time and uses).
    Token {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: crate::tokens::TokenCmd,
    },
    /// Cluster events.
    Events {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        args: EventsArgs,
    },
    /// Internal: runs between an agent and a process workload (see avail-driver).
    #[command(name = "process-shim", hide = true)]
    ProcessShim {
        /// Containment options, `--`, the program and its arguments (read by the
        /// shim itself, before this parser).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Print a shell completion script.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// Data directory (store, keys, tokens, artifacts).
    #[arg(long, default_value = "avail-data/server")]
    data_dir: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// How often agents heartbeat, ms.
    #[arg(long, default_value_t = 200)]
    heartbeat_ms: u64,
    /// A node silent this long is `suspect` (no new placements), ms.
    #[arg(long, default_value_t = 500)]
    suspect_after_ms: u64,
    /// A node silent this long is `down` and its `ha` workloads restart elsewhere, ms.
    /// Its agent, if it is only cut off, stops them itself before that (fencing).
    #[arg(long, default_value_t = 1000)]
    down_after_ms: u64,
    /// Life of node certificates, seconds; agents renew theirs at half of it.
    #[arg(long, default_value_t = 3600)]
    node_cert_ttl_s: u64,
    /// Tag keys only an administrator sets (`avail node tag`); a node declaring one at
    /// its join is refused. Empty (`--admin-tags ''`): nodes declare any tag.
    #[arg(long, value_delimiter = ',', default_values_t = avail_server::DEFAULT_ADMIN_TAGS.iter().map(|k| k.to_string()))]
    admin_tags: Vec<String>,
    /// Where the control plane keeps its state: `redb` (embedded, in the data dir) or
    /// `etcd://host:port[,host:port...]`.
    #[arg(long, default_value = "redb")]
    store: String,
    /// With an etcd store: the prefix of this cluster's keys (several clusters may share
    /// one etcd).
    #[arg(long, default_value = "/avail/")]
    etcd_prefix: String,
    /// Life of the leader's store lease, seconds: a leader that dies is replaced
    /// within about this long.
    #[arg(long, default_value_t = avail_server::leader::LEADER_TTL_S)]
    leader_ttl_s: u64,
    /// Join the cluster of another server (a second or third server on the same
    /// etcd): that server's data dir, whose cluster id, keys, CA and admin token are
    /// copied into this one. Give it the same `--store` and `--etcd-prefix`.
    #[arg(long)]
    join_from: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Server URL, or several comma-separated (the agent fails over between them).
    #[arg(long)]
    server: String,
    /// Join token (`avail token create`): needed for the node's first join only.
    #[arg(
        long,
        conflicts_with = "join_token_file",
        env = "AVAIL_JOIN_TOKEN",
        hide_env_values = true
    )]
    join_token: Option<String>,
    /// File holding the join token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// The cluster CA certificate (the server's `ca.crt`): the only one trusted.
    #[arg(long)]
    ca_file: PathBuf,
    /// Node name.
    #[arg(long)]
    name: String,
    /// The node's own address (listeners and outgoing connections bind to it).
    #[arg(long)]
    addr: IpAddr,
    /// Ingress port.
    #[arg(long, default_value_t = avail_agent::DEFAULT_INGRESS_PORT)]
    port: u16,
    /// Peer port: mutual TLS between nodes (replication links of `ft` workloads,
    /// requests forwarded by other nodes' ingresses, the fencing contact probe).
    #[arg(long, default_value_t = avail_agent::ft::DEFAULT_REPLICATION_PORT)]
    replication_port: u16,
    /// Tags, `key=value` separated by commas.
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// CPU offered, thousandths of a core (default: the machine's cores x 1000, or its
    /// cgroup quota if stricter).
    #[arg(long)]
    cpu_millis: Option<u32>,
    /// Memory offered, MiB (default: the machine's memory, or its cgroup limit if
    /// stricter, less a reserve for the agent: a tenth, at least 256 MiB).
    #[arg(long)]
    memory_mib: Option<u32>,
    /// The most workload replicas this node takes.
    #[arg(long, default_value_t = avail_model::node::DEFAULT_MAX_WORKLOADS)]
    max_workloads: u32,
    /// Memory the node's ft secondaries may hold in checkpoint images, MiB (default:
    /// the memory offered). A secondary that would pass it fails and is replaced.
    #[arg(long)]
    ft_secondary_memory_mib: Option<u64>,
    /// Data directory (artifact cache).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// uids for process workloads, one per running instance (`FIRST-LAST`, above
    /// 65535; no /etc/passwd entries needed). Used when the agent runs as root.
    #[arg(long, default_value_t = avail_driver::contain::DEFAULT_UIDS)]
    workload_uids: avail_driver::contain::uids::UidRange,
    /// Where process workloads get their private working directories (every parent
    /// must let other users through). Default: /var/lib/avail/work as root, else
    /// <data-dir>/work.
    #[arg(long)]
    work_root: Option<PathBuf>,
    /// Processes and threads per process workload instance (pids.max, or RLIMIT_NPROC
    /// without cgroup v2).
    #[arg(long, default_value_t = avail_driver::contain::DEFAULT_PIDS_MAX)]
    workload_pids_max: u32,
    /// Do not put process workloads in cgroups even where cgroup v2 is available.
    #[arg(long)]
    no_cgroups: bool,
}

#[derive(Subcommand, Debug)]
enum WorkloadCmd {
    /// Create a workload from a spec file or flags, and wait until it runs.
    Run(RunArgs),
    /// List workloads.
    List,
    /// Show one workload.
    Show {
        /// Name.
        name: String,
    },
    /// Delete a workload.
    Rm {
        /// Name.
        name: String,
    },
    /// Show a workload's recent log lines.
    Logs {
        /// Name.
        name: String,
        /// Last this many lines.
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// Show a workload's events.
    Events {
        /// Name.
        name: String,
    },
    /// Change a workload's level while it runs (no restart): none, ha or ft. Waits
    /// until the new level's protection is in place (a reservation, a standby or
    /// secondary in step).
    SetLevel {
        /// Name.
        name: String,
        /// The new level: none, ha or ft.
        level: String,
        /// Return at once instead of waiting for the protection.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait, seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Spec file (TOML or JSON); its artifact path is relative to the file.
    #[arg(short = 'f', long = "file", conflicts_with_all = ["name", "driver", "artifact"])]
    file: Option<PathBuf>,
    /// Name.
    #[arg(long)]
    name: Option<String>,
    /// Driver: wasm or process.
    #[arg(long)]
    driver: Option<String>,
    /// wasm: path of the module (uploaded) or its digest; process: the program.
    #[arg(long)]
    artifact: Option<String>,
    /// process: an argument (repeat); `$PORT` is replaced by the port.
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// Level: ft, ha or none.
    #[arg(long)]
    level: Option<String>,
    /// Memory, MiB.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// CPU, thousandths of a core.
    #[arg(long)]
    cpu_millis: Option<u32>,
    /// Placement constraint (repeat), e.g. "zone == tokyo".
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// Placement policy: spread (the least allocated node, default) or pack.
    #[arg(long)]
    policy: Option<String>,
    /// Priority (level ha: restart order when capacity is short; higher first).
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i32>,
    /// Return once accepted; do not wait for the workload to run.
    #[arg(long)]
    detach: bool,
    /// Show where it would go now (both replicas for ft) and create nothing; exits 2
    /// when it does not fit, with the explanation.
    #[arg(long)]
    dry_run: bool,
    /// How long to wait for it to run, seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes.
    List,
    /// Forget a node: its record and its key. Refused while it holds workloads. Its
    /// agent can no longer act; the name is free for a join token.
    Rm {
        /// Node name.
        name: String,
    },
    /// Show one node.
    Show {
        /// Name.
        name: String,
    },
    /// Change a node's tags: `key=value` sets, `key-` removes. Kept across the agent's
    /// restarts; placements follow them from now on.
    Tag {
        /// Node name.
        name: String,
        /// `key=value` or `key-`, one or more.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Move everything off nodes for maintenance, with no lost request: wasm workloads
    /// move live (ft pairs hand over to their secondary), processes restart elsewhere.
    /// Shows progress until the nodes are empty. The nodes take no new work until
    /// `undrain`.
    Drain {
        /// Node names.
        names: Vec<String>,
        /// Every node with this tag (`key=value`) instead of names.
        #[arg(long, conflicts_with = "names")]
        selector: Option<String>,
        /// Return at once instead of waiting until the nodes are empty.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait, seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Let drained nodes take work again.
    Undrain {
        /// Node names.
        names: Vec<String>,
        /// Every node with this tag (`key=value`) instead of names.
        #[arg(long, conflicts_with = "names")]
        selector: Option<String>,
    },
    /// Rolling maintenance: the nodes with a tag, one fault domain at a time: drain the
    /// domain's nodes, run a command (AVAIL_NODES names them), undrain, wait until they
    /// are ready, then the next domain. Stops at the first failure.
    Maintain {
        /// The nodes to maintain: `key=value`, e.g. `zone=tokyo`.
        #[arg(long)]
        selector: String,
        /// The fault-domain tag: one value at a time.
        #[arg(long, default_value = "rack")]
        by: String,
        /// The maintenance command (run with `sh -c`).
        #[arg(long)]
        exec: String,
        /// Longest wait for each drain, seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Show the control plane: which server answers, which leads (and since which
    /// term).
    Control,
    /// Show the level policy: the default level and the minimums by node tag.
    Levels,
    /// Set the level policy. A spec that names no level gets the default; a workload
    /// placed on a node with a minimum's tag runs at least at that level (and cannot
    /// be set lower there).
    SetLevels {
        /// The default level: none, ha or ft (unchanged if not given).
        #[arg(long)]
        default: Option<String>,
        /// A minimum, `key=value:level` (e.g. `compliance=pci:ha`); repeat. Replaces the
        /// minimums when given.
        #[arg(long = "minimum")]
        minimums: Vec<String>,
        /// Remove every minimum.
        #[arg(long, conflicts_with = "minimums")]
        clear_minimums: bool,
    },
}

#[derive(Args, Debug)]
struct EventsArgs {
    /// Keep following new events.
    #[arg(short, long)]
    follow: bool,
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// How many of the most recent events to show.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

fn now_ms() -> u64 {
    avail_server::now_ms()
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> CliResult {
    let fmt = cli.output;
    match cli.command {
        Command::Server(a) => server(a).await,
        Command::Agent(a) => agent(a).await,
        Command::Up(a) => up::run(a).await,
        Command::ProcessShim { .. } => Err(CliError::fail("process-shim runs before the runtime")),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "avail", &mut std::io::stdout());
            Ok(())
        }
        Command::Workload { conn, cmd: w } => {
            let c = client(conn)?;
            match w {
                WorkloadCmd::Run(a) => workload_run(&c, a, fmt).await,
                WorkloadCmd::List => {
                    let ws: Vec<Workload> = c.get("/v1/workloads").await?;
                    print_workloads(&ws, fmt);
                    Ok(())
                }
                WorkloadCmd::Show { name } => {
                    let w: Workload = c.get(&format!("/v1/workloads/{name}")).await?;
                    show_workload(&w, fmt);
                    Ok(())
                }
                WorkloadCmd::Rm { name } => {
                    let r: avail_model::api::Deleted =
                        c.delete(&format!("/v1/workloads/{name}")).await?;
                    match fmt {
                        Format::Json => output::json(&r),
                        Format::Table => println!("workload {name} deleted"),
                    }
                    Ok(())
                }
                WorkloadCmd::Logs { name, tail } => {
                    let lines: Vec<LogLine> = c
                        .get(&format!("/v1/workloads/{name}/logs?tail={tail}"))
                        .await?;
                    match fmt {
                        Format::Json => output::json(&lines),
                        Format::Table => lines.iter().for_each(|l| println!("{}", l.line)),
                    }
                    Ok(())
                }
                WorkloadCmd::SetLevel {
                    name,
                    level,
                    no_wait,
                    timeout,
                } => set_level(&c, fmt, &name, &level, no_wait, timeout).await,
                WorkloadCmd::Events { name } => {
                    let evs: Vec<ClusterEvent> =
                        c.get(&format!("/v1/workloads/{name}/events")).await?;
                    print_events(&evs, fmt);
                    Ok(())
                }
            }
        }
        Command::Node { conn, cmd: n } => {
            let c = client(conn)?;
            match n {
                NodeCmd::List => {
                    let ns: Vec<Node> = c.get("/v1/nodes").await?;
                    print_nodes(&ns, fmt);
                }
                NodeCmd::Rm { name } => {
                    let d: avail_model::api::Deleted =
                        c.delete(&format!("/v1/nodes/{name}")).await?;
                    match fmt {
                        Format::Json => output::json(&d),
                        Format::Table => println!("node {name} removed"),
                    }
                }
                NodeCmd::Show { name } => {
                    let n: Node = c.get(&format!("/v1/nodes/{name}")).await?;
                    match fmt {
                        Format::Json => output::json(&n),
                        Format::Table => print_nodes(std::slice::from_ref(&n), fmt),
                    }
                }
                NodeCmd::Tag { name, changes } => {
                    let mut set = std::collections::BTreeMap::new();
                    let mut remove = Vec::new();
                    for ch in &changes {
                        if let Some(k) = ch.strip_suffix('-').filter(|k| !k.contains('=')) {
                            remove.push(k.to_string());
                        } else {
                            let (k, v) = avail_model::constraint::parse_tag(ch)
                                .map_err(|e| CliError::invalid(e.to_string()))?;
                            set.insert(k, v);
                        }
                    }
                    let body = avail_model::api::TagChange { set, remove };
                    let n: Node = c.patch(&format!("/v1/nodes/{name}/tags"), &body).await?;
                    match fmt {
                        Format::Json => output::json(&n),
                        Format::Table => print_nodes(std::slice::from_ref(&n), fmt),
                    }
                }
                NodeCmd::Drain {
                    names,
                    selector,
                    no_wait,
                    timeout,
                } => {
                    let names = select_nodes(&c, names, selector.as_deref()).await?;
                    drain(&c, &names, no_wait, timeout, fmt).await?;
                }
                NodeCmd::Undrain { names, selector } => {
                    let names = select_nodes(&c, names, selector.as_deref()).await?;
                    for n in &names {
                        let node: Node = c.delete(&format!("/v1/nodes/{n}/drain")).await?;
                        if fmt == Format::Table {
                            println!("node {n}: {}", node.state.as_str());
                        }
                    }
                }
                NodeCmd::Maintain {
                    selector,
                    by,
                    exec,
                    timeout,
                } => maintain(&c, &selector, &by, &exec, timeout, fmt).await?,
            }
            Ok(())
        }
        Command::Cluster {
            conn,
            cmd: ClusterCmd::Control,
        } => {
            let cp: avail_model::api::ControlPlane =
                client(conn)?.get("/v1/cluster/control").await?;
            match fmt {
                Format::Json => output::json(&cp),
                Format::Table => {
                    let role = if cp.leads { "leads" } else { "follows" };
                    println!("answering server: {} ({role})", cp.server);
                    match &cp.leader {
                        Some(l) => {
                            println!("leader: {} at {} (term {})", l.server, l.addr, l.term)
                        }
                        None => println!("leader: none now"),
                    }
                }
            }
            Ok(())
        }
        Command::Cluster { conn, cmd } => {
            let c = client(conn)?;
            let level = |s: &str, what: &str| -> Result<avail_model::Level, CliError> {
                serde_json::from_value(serde_json::json!(s)).map_err(|_| {
                    CliError::invalid(format!("{what}: {s:?} is not one of none, ha, ft"))
                })
            };
            let mut p: avail_model::spec::LevelPolicy = c.get("/v1/cluster/levels").await?;
            if let ClusterCmd::SetLevels {
                default,
                minimums,
                clear_minimums,
            } = cmd
            {
                if let Some(d) = default {
                    p.default = level(&d, "--default")?;
                }
                if clear_minimums {
                    p.minimums.clear();
                }
                if !minimums.is_empty() {
                    p.minimums = minimums
                        .iter()
                        .map(|m| {
                            let (tag, l) = m.rsplit_once(':').ok_or_else(|| {
                                CliError::invalid(format!(
                                    "--minimum: {m:?} is not key=value:level"
                                ))
                            })?;
                            Ok(avail_model::spec::LevelMinimum {
                                tag: tag.to_string(),
                                level: level(l, "--minimum")?,
                            })
                        })
                        .collect::<Result<_, CliError>>()?;
                }
                p = c.put("/v1/cluster/levels", &p).await?;
            }
            match fmt {
                Format::Json => output::json(&p),
                Format::Table => {
                    println!("default level: {}", p.default.as_str());
                    for m in &p.minimums {
                        println!("minimum on {}: {}", m.tag, m.level.as_str());
                    }
                }
            }
            Ok(())
        }
        Command::Token { conn, cmd } => crate::tokens::run(&client(conn)?, cmd, fmt).await,
        Command::Events { conn, args: a } => {
            let c = client(conn)?;
            events(&c, a, fmt).await
        }
    }
}

fn client(conn: ConnArgs) -> Result<Client, CliError> {
    let ConnArgs {
        addr,
        token,
        cacert,
    } = conn;
    let ctx = context::load();
    let addr = addr
        .or_else(|| ctx.as_ref().map(|c| c.server.clone()))
        .ok_or_else(|| CliError::fail("no server address: pass --addr, set AVAIL_ADDR, or start a cluster with `avail up`"))?;
    let token = match token {
        Some(t) => t,
        None => {
            let file = ctx.as_ref().map(|c| c.token_file.clone()).ok_or_else(|| {
                CliError::fail(
                    "no token: pass --token, set AVAIL_TOKEN, or start a cluster with `avail up`",
                )
            })?;
            std::fs::read_to_string(&file)
                .map_err(|e| CliError::fail(format!("reading token {}: {e}", file.display())))?
                .trim()
                .to_string()
        }
    };
    let cacert = cacert.or_else(|| ctx.as_ref().and_then(|c| c.ca_file.clone()));
    let tls = match cacert {
        Some(f) => {
            let pem = std::fs::read_to_string(&f)
                .map_err(|e| CliError::fail(format!("reading CA {}: {e}", f.display())))?;
            Some(
                avail_tls::client_config(&pem, None)
                    .map_err(|e| CliError::fail(format!("CA {}: {e}", f.display())))?,
            )
        }
        None if addr.starts_with("https://") => {
            return Err(CliError::fail(
                "no CA to verify the server with: pass --cacert, set AVAIL_CACERT, or start a cluster with `avail up`",
            ));
        }
        None => None,
    };
    Ok(Client::with_tls(&addr, Some(token), None, tls))
}

/// The nodes named, or those with the tag `selector` (`key=value`); at least one.
async fn select_nodes(
    c: &Client,
    names: Vec<String>,
    selector: Option<&str>,
) -> Result<Vec<String>, CliError> {
    let names = match selector {
        Some(sel) => {
            let (k, v) = avail_model::constraint::parse_tag(sel)
                .map_err(|e| CliError::invalid(format!("--selector: {e}")))?;
            let nodes: Vec<Node> = c.get("/v1/nodes").await?;
            nodes
                .into_iter()
                .filter(|n| n.tags.get(&k) == Some(&v))
                .map(|n| n.name)
                .collect()
        }
        None => names,
    };
    if names.is_empty() {
        return Err(CliError::invalid(
            "no node: name one or more, or give --selector key=value matching some",
        ));
    }
    Ok(names)
}

/// Start draining `names`, then show progress until they are empty.
async fn drain(
    c: &Client,
    names: &[String],
    no_wait: bool,
    timeout: u64,
    fmt: Format,
) -> CliResult {
    let post = |n: String| async move {
        let r: Result<Node, _> = c
            .post(&format!("/v1/nodes/{n}/drain"), &serde_json::json!({}))
            .await;
        r
    };
    let mut started = Vec::new();
    for n in names {
        started.push(post(n.clone()).await?);
    }
    if no_wait {
        if fmt == Format::Json {
            output::json(&started);
        }
        return Ok(());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    let mut last = String::new();
    loop {
        let mut nodes = Vec::new();
        for n in names {
            nodes.push(c.get::<Node>(&format!("/v1/nodes/{n}")).await?);
        }
        let (mut total, mut remaining, mut moving) = (0, 0, 0);
        let mut blocked = None;
        for d in nodes.iter().filter_map(|n| n.drain.as_ref()) {
            total += d.total;
            remaining += d.remaining;
            moving += d.moving;
            blocked = blocked.or(d.blocked.clone());
        }
        let done = total - remaining.min(total);
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width) as usize;
        let line = format!(
            "[{}{}] {done}/{total} moved, {moving} moving{}",
            "#".repeat(filled),
            "-".repeat(width as usize - filled),
            blocked
                .as_deref()
                .map(|b| format!(" (waiting: {b})"))
                .unwrap_or_default()
        );
        if fmt == Format::Table && line != last {
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        if remaining == 0 {
            if tty && fmt == Format::Table {
                eprintln!();
            }
            match fmt {
                Format::Json => output::json(&nodes),
                Format::Table => println!("drained: {}", names.join(", ")),
            }
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            if tty {
                eprintln!();
            }
            return Err(CliError::fail(format!(
                "{remaining} still on {} after {timeout} s{}",
                names.join(", "),
                blocked.map(|b| format!(": {b}")).unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `avail node maintain`: one fault domain at a time, drain, run the command, undrain.
async fn maintain(
    c: &Client,
    selector: &str,
    by: &str,
    exec: &str,
    timeout: u64,
    fmt: Format,
) -> CliResult {
    let names = select_nodes(c, Vec::new(), Some(selector)).await?;
    let nodes: Vec<Node> = c.get("/v1/nodes").await?;
    let mut domains: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for n in nodes.iter().filter(|n| names.contains(&n.name)) {
        let d = n
            .tags
            .get(by)
            .cloned()
            .unwrap_or_else(|| format!("(no {by})"));
        domains.entry(d).or_default().push(n.name.clone());
    }
    for (domain, group) in &domains {
        eprintln!("{by}={domain}: draining {}", group.join(", "));
        drain(c, group, false, timeout, fmt).await?;
        eprintln!("{by}={domain}: running {exec:?}");
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(exec)
            .env("AVAIL_NODES", group.join(","))
            .status()
            .await
            .map_err(|e| CliError::fail(format!("--exec: {e}")))?;
        if !status.success() {
            return Err(CliError::fail(format!(
                "{by}={domain}: the maintenance command failed ({status}); its nodes stay drained"
            )));
        }
        for n in group {
            let _: Node = c.delete(&format!("/v1/nodes/{n}/drain")).await?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let ready = all_ready(c, group).await?;
            if ready {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(CliError::fail(format!(
                    "{by}={domain}: nodes not ready after maintenance: {}",
                    group.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("{by}={domain}: done");
    }
    Ok(())
}

/// Whether every node of `group` is ready.
async fn all_ready(c: &Client, group: &[String]) -> Result<bool, CliError> {
    for n in group {
        let node: Node = c.get(&format!("/v1/nodes/{n}")).await?;
        if node.state != avail_model::NodeState::Ready {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `avail workload set-level`: change the level, then wait until the new level's
/// protection is in place.
async fn set_level(
    c: &Client,
    fmt: Format,
    name: &str,
    level: &str,
    no_wait: bool,
    timeout: u64,
) -> CliResult {
    let level: avail_model::Level = serde_json::from_value(serde_json::json!(level))
        .map_err(|_| CliError::invalid(format!("level: {level:?} is not one of none, ha, ft")))?;
    let before: Workload = c.get(&format!("/v1/workloads/{name}")).await?;
    let mut w: Workload = c
        .put(
            &format!("/v1/workloads/{name}/level"),
            &avail_model::api::LevelChange { level },
        )
        .await?;
    if fmt == Format::Table {
        println!(
            "workload {name}: level {} -> {} (live, no restart)",
            before.spec.level.as_str(),
            level.as_str()
        );
    }
    let protected = |w: &Workload| match w.spec.level {
        avail_model::Level::None => true,
        avail_model::Level::Ft => {
            avail_model::LevelState::is_protected(w.status.level_state, avail_model::Level::Ft)
        }
        avail_model::Level::Ha if w.spec.driver == avail_model::DriverKind::Wasm => {
            avail_model::LevelState::is_protected(w.status.level_state, avail_model::Level::Ha)
                && w.status.reservation.is_some()
        }
        avail_model::Level::Ha => w.status.reservation.is_some(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    while !no_wait && !protected(&w) {
        if std::time::Instant::now() >= deadline {
            return Err(CliError::fail(format!(
                "workload {name} is at level {} but not protected after {timeout} s: {}",
                level.as_str(),
                w.status
                    .message
                    .clone()
                    .or(w.status.level_state.map(|s| s.to_string()))
                    .unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        w = c.get(&format!("/v1/workloads/{name}")).await?;
    }
    match fmt {
        Format::Json => output::json(&w),
        Format::Table if !no_wait => println!(
            "workload {name}: {}",
            w.status
                .level_state
                .map(|s| s.to_string())
                .unwrap_or_else(|| "level none".into())
        ),
        Format::Table => {}
    }
    Ok(())
}

async fn server(a: ServerArgs) -> CliResult {
    let config = avail_server::ServerConfig::new(a.data_dir.clone(), a.listen)
        .with_windows(a.heartbeat_ms, a.suspect_after_ms, a.down_after_ms)
        .and_then(|c| c.with_node_cert_ttl(a.node_cert_ttl_s))
        .and_then(|c| c.with_store(&a.store, &a.etcd_prefix))
        .and_then(|c| c.with_leader_ttl(a.leader_ttl_s))
        .and_then(|c| {
            let keys: Vec<String> = a
                .admin_tags
                .iter()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect();
            c.with_admin_tags(&keys)
        })
        .map_err(|e| CliError::invalid(format!("--{e}")))?;
    let config = avail_server::ServerConfig {
        join_from: a.join_from.clone(),
        ..config
    };
    if config.join_from.is_some() && config.store == avail_server::store_open::StoreChoice::Redb {
        return Err(CliError::invalid(
            "--join-from: servers share one store only on etcd (--store etcd://...)".to_string(),
        ));
    }
    let running = avail_server::start(config)
        .await
        .map_err(|e| CliError::fail(e.to_string()))?;
    eprintln!(
        "avail server listening on https://{}\n  admin token: {}\n  cluster CA:  {}\n  join tokens: `avail token create`",
        running.addr,
        avail_server::admin_token_path(&a.data_dir).display(),
        avail_server::ca_path(&a.data_dir).display()
    );
    let mut running = running;
    let ended = tokio::select! {
        r = running.wait() => Some(r),
        _ = shutdown_signal() => None,
    };
    match ended {
        Some(r) => r.map_err(|e| CliError::fail(e.to_string())),
        None => {
            eprintln!("avail server: shutting down");
            // Another server leads at once, not after the lease runs out, and agents
            // stop being sent here.
            running.stop().await;
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

async fn agent(a: AgentArgs) -> CliResult {
    let join_token = match (a.join_token, a.join_token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(
            std::fs::read_to_string(&f)
                .map_err(|e| CliError::invalid(format!("--join-token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        // A node that joined before proves itself with its key.
        (None, None) => None,
    };
    let ca_pem = std::fs::read_to_string(&a.ca_file)
        .map_err(|e| CliError::invalid(format!("--ca-file {}: {e}", a.ca_file.display())))?;
    let mut tags = BTreeMap::new();
    for t in &a.tags {
        let (k, v) =
            parse_tag(t).map_err(|e| CliError::invalid(format!("--tags: {}", e.message)))?;
        tags.insert(k, v);
    }
    if !avail_model::spec::is_dns_label(&a.name) {
        return Err(CliError::invalid(format!(
            "--name {:?} is not a DNS label",
            a.name
        )));
    }
    let machine = avail_agent::capacity::machine();
    let capacity = Resources {
        cpu_millis: a.cpu_millis.unwrap_or(machine.cpu_millis),
        memory_mib: a.memory_mib.unwrap_or(machine.memory_mib),
    };
    let cfg = avail_agent::AgentConfig {
        data_dir: a
            .data_dir
            .unwrap_or_else(|| PathBuf::from("avail-data").join(&a.name)),
        name: a.name,
        addr: a.addr,
        ingress_port: a.port,
        replication_port: a.replication_port,
        server: a.server,
        join_token,
        ca_pem,
        tags,
        boot_id: avail_agent::new_boot_id(),
        process_shim: std::env::current_exe().ok(),
        contain: avail_agent::contain::ContainSettings {
            uids: a.workload_uids,
            work_root: a.work_root,
            cgroups: !a.no_cgroups,
            pids_max: a.workload_pids_max,
            ..Default::default()
        },
        ft_secondary_memory_mib: a
            .ft_secondary_memory_mib
            .unwrap_or(u64::from(capacity.memory_mib)),
        capacity,
        max_workloads: a.max_workloads,
    };
    avail_agent::run(cfg, shutdown_signal())
        .await
        .map_err(|e| CliError::fail(e.to_string()))
}

/// Build the spec from a file or flags; upload a wasm module given by path.
/// The spec from a file or the flags, and whether it names a level (one that does not
/// gets the cluster's default level).
async fn build_spec(c: &Client, a: &RunArgs) -> Result<(WorkloadSpec, bool), CliError> {
    let mut named = a.level.is_some();
    let (mut spec, base) = if let Some(f) = &a.file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| CliError::invalid(format!("{}: {e}", f.display())))?;
        let spec = WorkloadSpec::parse(&text)
            .map_err(|e| CliError::invalid(format!("{}: {e}", f.display())))?;
        named |= WorkloadSpec::names_level(&text);
        (spec, f.parent().map(PathBuf::from).unwrap_or_default())
    } else {
        let need = |v: &Option<String>, flag: &str| {
            v.clone().ok_or_else(|| {
                CliError::invalid(format!("--{flag} is required (or use -f spec.toml)"))
            })
        };
        let driver = need(&a.driver, "driver")?;
        let mut obj = serde_json::json!({
            "name": need(&a.name, "name")?,
            "driver": driver,
            "artifact": need(&a.artifact, "artifact")?,
        });
        if !a.args.is_empty() {
            obj["args"] = serde_json::json!(a.args);
        }
        let spec =
            WorkloadSpec::parse(&obj.to_string()).map_err(|e| CliError::invalid(e.to_string()))?;
        (spec, PathBuf::new())
    };
    if let Some(l) = &a.level {
        spec.level = serde_json::from_value::<Level>(serde_json::json!(l))
            .map_err(|_| CliError::invalid(format!("level: {l:?} is not one of ft, ha, none")))?;
    }
    if let Some(m) = a.memory_mib {
        spec.resources.memory_mib = m;
    }
    if let Some(c) = a.cpu_millis {
        spec.resources.cpu_millis = c;
    }
    spec.placement
        .constraints
        .extend(a.constraints.iter().cloned());
    if let Some(p) = a.priority {
        spec.ha.priority = p;
    }
    if let Some(p) = &a.policy {
        spec.placement.policy = serde_json::from_value(serde_json::Value::String(p.clone()))
            .map_err(|_| {
                CliError::invalid(format!(
                    "placement.policy: {p:?} is not one of spread, pack"
                ))
            })?;
    }
    // Files named by path are uploaded and named by digest: a wasm module, a VM's
    // kernel and initrd.
    if matches!(spec.driver, DriverKind::Wasm | DriverKind::Qemu) {
        spec.artifact = upload(c, &base, "artifact", &spec.artifact).await?;
    }
    if let Some(vm) = spec.vm.as_mut()
        && let Some(initrd) = &vm.initrd
    {
        vm.initrd = Some(upload(c, &base, "vm.initrd", initrd).await?);
    }
    spec.validate()
        .map_err(|e| CliError::invalid(e.to_string()))?;
    Ok((spec, named))
}

/// The digest of `named` (field `field`): itself when it is one, else the digest of
/// the file at that path (relative to `base`), uploaded.
async fn upload(c: &Client, base: &Path, field: &str, named: &str) -> Result<String, CliError> {
    if is_digest(named) {
        return Ok(named.to_string());
    }
    let path = base.join(named);
    let bytes = std::fs::read(&path)
        .map_err(|e| CliError::invalid(format!("{field}: {}: {e}", path.display())))?;
    #[derive(serde::Deserialize)]
    struct Uploaded {
        digest: String,
    }
    let up: Uploaded = c.put_bytes("/v1/artifacts", bytes.into()).await?;
    Ok(up.digest)
}

async fn workload_run(c: &Client, a: RunArgs, fmt: Format) -> CliResult {
    let (spec, named) = build_spec(c, &a).await?;
    let mut body = serde_json::to_value(&spec).expect("spec serialises");
    if !named && let Some(o) = body.as_object_mut() {
        o.remove("level");
    }
    let body = serde_json::to_vec(&body).expect("spec serialises");
    if a.dry_run {
        let p: avail_model::api::PlanPreview = c
            .post_raw("/v1/workloads?dry_run=true", body.into())
            .await?;
        if fmt == Format::Json {
            output::json(&p);
        }
        if !p.placeable {
            return Err(CliError::invalid(format!(
                "workload {} would not be placed: {}",
                spec.name,
                p.explanation.as_deref().unwrap_or_default()
            )));
        }
        if fmt == Format::Table {
            let node = p.node.as_deref().unwrap_or_default();
            match p.secondary.as_deref() {
                Some(s) => println!(
                    "workload {} would run on {node}, its secondary on {s} (dry run: nothing created)",
                    spec.name,
                ),
                None => println!(
                    "workload {} would run on {node} (dry run: nothing created)",
                    spec.name,
                ),
            }
        }
        return Ok(());
    }
    let w: Workload = c.post_raw("/v1/workloads", body.into()).await?;
    if w.status.phase == Phase::Pending {
        if fmt == Format::Json {
            output::json(&w);
        }
        return Err(CliError::invalid(format!(
            "workload {} created but not placed: {}",
            w.spec.name,
            w.status.message.clone().unwrap_or_default()
        )));
    }
    if a.detach {
        match fmt {
            Format::Json => output::json(&w),
            Format::Table => println!(
                "workload {} placed on {}",
                w.spec.name,
                w.status.node.clone().unwrap_or_default()
            ),
        }
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let mut last = w;
    loop {
        if last.status.phase == Phase::Running {
            match fmt {
                Format::Json => output::json(&last),
                Format::Table => println!(
                    "workload {} running on {}",
                    last.spec.name,
                    last.status.node.clone().unwrap_or_default()
                ),
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CliError::fail(format!(
                "workload {} is {} after {} s: {}",
                last.spec.name,
                last.status.phase.as_str(),
                a.timeout_s,
                last.status.message.clone().unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = c.get(&format!("/v1/workloads/{}", last.spec.name)).await?;
    }
}

fn print_workloads(ws: &[Workload], fmt: Format) {
    if fmt == Format::Json {
        return output::json(&ws);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = ws
        .iter()
        .map(|w| {
            vec![
                w.spec.name.clone(),
                w.spec.driver.as_str().into(),
                w.spec.level.as_str().into(),
                w.status.phase.as_str().into(),
                w.status.node.clone().unwrap_or_else(|| "-".into()),
                w.status.incarnation.to_string(),
                w.status.restarts.to_string(),
                output::age(now, w.created_ms),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "DRIVER",
            "LEVEL",
            "PHASE",
            "NODE",
            "INCARNATION",
            "RESTARTS",
            "AGE",
        ],
        &rows,
    );
}

fn show_workload(w: &Workload, fmt: Format) {
    if fmt == Format::Json {
        return output::json(w);
    }
    let s = &w.spec;
    println!("name:        {}", s.name);
    println!("driver:      {}", s.driver.as_str());
    println!("artifact:    {}", s.artifact);
    println!(
        "level:       {}{}",
        s.level.as_str(),
        w.status
            .level_state
            .as_ref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default()
    );
    println!(
        "resources:   cpu_millis={} memory_mib={}",
        s.resources.cpu_millis, s.resources.memory_mib
    );
    if !s.placement.constraints.is_empty() {
        println!("constraints: {}", s.placement.constraints.join("; "));
    }
    println!("phase:       {}", w.status.phase.as_str());
    println!("node:        {}", w.status.node.as_deref().unwrap_or("-"));
    println!("incarnation: {}", w.status.incarnation);
    if let Some(r) = &w.status.reservation {
        println!("reservation: {r} (restart capacity)");
    }
    if s.level == Level::Ft {
        println!(
            "secondary:   {}",
            w.status.secondary.as_deref().unwrap_or("-")
        );
        println!("generation:  {}", w.status.generation);
        if let Some(ft) = &w.status.ft {
            println!(
                "replication: {} (acked epoch {}, {} checkpoints, lag {} ms / {} bytes, tracker {})",
                ft.mode, ft.acked_epoch, ft.checkpoints, ft.lag_ms, ft.lag_bytes, ft.tracker
            );
        }
    }
    println!("restarts:    {}", w.status.restarts);
    if let Some(m) = &w.status.message {
        println!("message:     {m}");
    }
}

fn print_nodes(ns: &[Node], fmt: Format) {
    if fmt == Format::Json {
        return output::json(&ns);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = ns
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.state.as_str().into(),
                n.address.clone(),
                n.tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{}/{}", n.allocated.cpu_millis, n.capacity.cpu_millis),
                format!("{}/{}", n.allocated.memory_mib, n.capacity.memory_mib),
                format!("{}/{}", n.workloads, n.max_workloads),
                output::age(now, n.last_heartbeat_ms),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "STATE",
            "ADDRESS",
            "TAGS",
            "CPU",
            "MEMORY_MIB",
            "WORKLOADS",
            "HEARTBEAT",
        ],
        &rows,
    );
}

fn print_events(evs: &[ClusterEvent], fmt: Format) {
    if fmt == Format::Json {
        return output::json(&evs);
    }
    let rows: Vec<Vec<String>> = evs.iter().map(event_row).collect();
    output::table(
        &["SEQ", "AGE", "KIND", "WORKLOAD", "NODE", "MESSAGE"],
        &rows,
    );
}

fn event_row(e: &ClusterEvent) -> Vec<String> {
    vec![
        e.seq.to_string(),
        output::age(now_ms(), e.time_ms),
        e.kind.to_string(),
        e.workload.clone().unwrap_or_else(|| "-".into()),
        e.node.clone().unwrap_or_else(|| "-".into()),
        e.message.clone(),
    ]
}

async fn events(c: &Client, a: EventsArgs, fmt: Format) -> CliResult {
    let mut since = a.since;
    loop {
        // The first call shows the most recent events; follow-up calls page forward.
        let query = if since == a.since && !a.follow {
            format!("since={since}&tail=true&limit={}", a.limit)
        } else {
            format!("since={since}")
        };
        let evs: Vec<ClusterEvent> = c.get(&format!("/v1/events?{query}")).await?;
        if let Some(l) = evs.last() {
            since = l.seq;
        }
        if !a.follow {
            print_events(&evs, fmt);
            return Ok(());
        }
        for e in &evs {
            match fmt {
                Format::Json => println!("{}", serde_json::to_string(e).expect("event serialises")),
                Format::Table => println!("{}", event_row(e).join("  ")),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
