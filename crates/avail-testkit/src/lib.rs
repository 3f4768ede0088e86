//! avail-testkit: real clusters of `avail` processes on loopback, for tests and benches.
//!
//! A [`Cluster`] is one `avail server` and N `avail agent` processes, each cluster on its
//! own `127.X.Y.0/24` (server `.1`, agents `.11`, `.12`, ...) so that clusters of
//! parallel tests never share an address. Every process is killed (SIGKILL to its
//! process group) and the data dir removed when the cluster is dropped. Waiting is
//! always for a condition with a deadline ([`wait_until`]); a timeout fails with what
//! was last seen.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use avail_client::Client;
use avail_model::{Node, NodeState, Phase};

pub mod ft;
pub mod peer;
pub mod slow_guest;

/// A child process killed with its process group on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawn `bin args` in its own process group, output to `log`.
    pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Proc {
        Self::spawn_with_env(bin, args, &[], log)
    }

    /// Like [`spawn`](Self::spawn), with extra environment variables.
    pub fn spawn_with_env(bin: &Path, args: &[String], env: &[(&str, &Path)], log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it runs in the child before exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin.display()));
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child; no memory involved.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILL the process (a host crash) and reap it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (at most `deadline`) until it exits, check that it failed, and return its
    /// output.
    pub async fn failed_exit(&mut self, deadline: Duration) -> String {
        let end = Instant::now() + deadline;
        while self.running() {
            assert!(
                Instant::now() < end,
                "still running after {deadline:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = self.child.wait().expect("wait");
        assert!(!status.success(), "exited with success:\n{}", self.output());
        self.output()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe {
            libc::kill(-self.pid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Pick a /24 of loopback not in use: `127.X.Y`, with a free port 7400 on `.1`.
pub fn free_net() -> String {
    let seed = std::process::id() as u64
        ^ Instant::now().elapsed().as_nanos() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    for i in 0..1000u64 {
        let v = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(i.wrapping_mul(1442695040888963407));
        let (x, y) = (1 + (v >> 24) % 250, 1 + (v >> 40) % 250);
        let net = format!("127.{x}.{y}");
        let ip: Ipv4Addr = format!("{net}.1").parse().unwrap();
        if TcpListener::bind((ip, 7400)).is_ok()
            && TcpListener::bind((Ipv4Addr::new(127, x as u8, y as u8, 11), 7480)).is_ok()
        {
            return net;
        }
    }
    panic!("no free loopback /24 found");
}

/// Wait until `check` returns `Ok`, polling every 50 ms; panic after `deadline` with the
/// last error.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let end = Instant::now() + deadline;
    let mut last;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Send `method path` (with `body` and `headers`) through `client` until it is
/// answered `200`, polling for up to `deadline`: the reply. A timeout fails with the
/// last status and body (or error).
pub async fn until_ok(
    client: &Client,
    method: hyper::Method,
    path: &str,
    body: Option<(hyper::body::Bytes, &str)>,
    headers: &[(&str, &str)],
    deadline: Duration,
) -> avail_client::Reply {
    wait_until(&format!("{method} {path} answered 200"), deadline, || {
        let (method, body) = (method.clone(), body.clone());
        async move {
            let r = client
                .raw(method, path, body, headers)
                .await
                .map_err(|e| e.to_string())?;
            if r.status == 200 {
                Ok(r)
            } else {
                Err(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
            }
        }
    })
    .await
}

/// A running cluster.
pub struct Cluster {
    /// The `avail` binary.
    pub bin: PathBuf,
    /// The cluster's /24, e.g. `127.31.7`.
    pub net: String,
    /// Data dir (removed on drop).
    pub dir: tempfile::TempDir,
    /// The server process (server 0).
    pub server: Option<Proc>,
    /// Servers 1.. of a cluster of several servers (None once killed).
    pub more_servers: Vec<Option<Proc>>,
    /// How many servers the cluster has (they share one etcd).
    pub servers: usize,
    /// Agent processes by index (None once killed).
    pub agents: Vec<Option<Proc>>,
    /// Admin token.
    pub admin_token: String,
    /// A join token good for 1,000 joins and an hour (made once the server is up).
    pub join_token: String,
    /// Extra command-line arguments of agent `i` (none when absent).
    pub agent_args: Vec<Vec<String>>,
    /// Extra command-line arguments of the server.
    pub server_args: Vec<String>,
}

impl Cluster {
    /// Start a server and `nodes` agents and wait until every node is ready.
    pub async fn start(bin: &Path, nodes: usize) -> Cluster {
        Cluster::start_with(bin, nodes, Vec::new()).await
    }

    /// [`Cluster::start`], agent `i` getting the extra arguments `agent_args[i]`.
    pub async fn start_with(bin: &Path, nodes: usize, agent_args: Vec<Vec<String>>) -> Cluster {
        Cluster::start_full(bin, nodes, agent_args, Vec::new()).await
    }

    /// [`Cluster::start_with`], the server getting `server_args` too.
    pub async fn start_full(
        bin: &Path,
        nodes: usize,
        agent_args: Vec<Vec<String>>,
        server_args: Vec<String>,
    ) -> Cluster {
        Cluster::start_servers(bin, 1, nodes, agent_args, server_args).await
    }

    /// A cluster of `servers` servers (on `{net}.1`, `{net}.2`, ...; more than one
    /// needs an etcd store in `server_args`) and `nodes` agents that know them all.
    pub async fn start_servers(
        bin: &Path,
        servers: usize,
        nodes: usize,
        agent_args: Vec<Vec<String>>,
        server_args: Vec<String>,
    ) -> Cluster {
        assert!((1..=9).contains(&servers));
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            net: free_net(),
            dir: tempfile::tempdir().expect("tempdir"),
            server: None,
            more_servers: (1..servers).map(|_| None).collect(),
            servers,
            agents: Vec::new(),
            admin_token: String::new(),
            join_token: String::new(),
            agent_args,
            server_args,
        };
        c.start_server().await;
        for i in 1..servers {
            c.start_server_at(i).await;
        }
        c.join_token = c.create_join_token(1000, 3600).await;
        for i in 0..nodes {
            let p = c.spawn_agent(i, &c.join_token());
            c.agents.push(Some(p));
        }
        c.wait_nodes_ready(nodes).await;
        // The server counts a node ready once it joined, a moment before its agent
        // has the answer and keeps its certificate.
        for i in 0..nodes {
            let crt = c.dir.path().join(Self::agent_name(i)).join("node.crt");
            wait_until("node certificate kept", Duration::from_secs(10), || {
                let there = crt.exists();
                async move {
                    if there {
                        Ok(())
                    } else {
                        Err("no node.crt".into())
                    }
                }
            })
            .await;
        }
        c
    }

    /// Server base URL: every server's, comma-separated, when there are several.
    pub fn server_url(&self) -> String {
        (0..self.servers)
            .map(|i| self.server_url_at(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Base URL of server `i` alone.
    pub fn server_url_at(&self, i: usize) -> String {
        format!("https://{}.{}:7400", self.net, i + 1)
    }

    /// An admin client of server `i` alone.
    pub fn client_at(&self, i: usize) -> Client {
        Client::with_tls(
            &self.server_url_at(i),
            Some(self.admin_token.clone()),
            None,
            Some(self.tls()),
        )
    }

    /// Data dir of server `i`.
    pub fn server_dir_at(&self, i: usize) -> PathBuf {
        match i {
            0 => self.server_dir(),
            i => self.dir.path().join(format!("server-{i}")),
        }
    }

    /// The index of the server that leads, as server `ask` says.
    pub async fn leader_index(&self, ask: usize) -> Option<usize> {
        let cp: avail_model::api::ControlPlane =
            self.client_at(ask).get("/v1/cluster/control").await.ok()?;
        let addr = cp.leader?.addr;
        (0..self.servers).find(|i| addr == format!("{}.{}:7400", self.net, i + 1))
    }

    /// The cluster CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.server_dir().join("ca.crt")
    }

    /// A TLS configuration trusting the cluster CA (no client certificate).
    pub fn tls(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let pem = std::fs::read_to_string(self.ca_file()).expect("the server wrote its CA");
        avail_tls::client_config(&pem, None).expect("the CA parses")
    }

    /// A client of the API with `token` (none: anonymous), verifying the server.
    pub fn api(&self, token: Option<String>) -> Client {
        Client::with_tls(&self.server_url(), token, None, Some(self.tls()))
    }

    /// A raw TLS connection to the API (for tests that speak HTTP by hand).
    pub async fn connect_api(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let addr = format!("{}.1:7400", self.net);
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect to the API");
        self.tls_over(tcp).await
    }

    /// TLS to the API over a TCP connection already made to it.
    pub async fn tls_over(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let ip: std::net::IpAddr = format!("{}.1", self.net).parse().expect("an address");
        tokio_rustls::TlsConnector::from(self.tls())
            .connect(rustls::pki_types::ServerName::IpAddress(ip.into()), tcp)
            .await
            .expect("TLS handshake with the API")
    }

    /// A new join token for `uses` joins, good for `ttl_s`.
    pub async fn create_join_token(&self, uses: u32, ttl_s: u64) -> String {
        let req = avail_model::token::JoinTokenRequest {
            ttl_s,
            uses,
            description: "testkit".into(),
        };
        let t: avail_model::token::JoinTokenCreated = self
            .client()
            .post("/v1/tokens", &req)
            .await
            .expect("create a join token");
        t.token
    }

    /// The server's data dir.
    pub fn server_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// The join token agents start with.
    pub fn join_token(&self) -> String {
        self.join_token.clone()
    }

    /// Address of agent `i`.
    pub fn agent_addr(&self, i: usize) -> String {
        format!("{}.{}", self.net, 11 + i)
    }

    /// Name of agent `i`.
    pub fn agent_name(i: usize) -> String {
        format!("node-{}", i + 1)
    }

    /// Ingress base URL of agent `i`.
    pub fn ingress(&self, i: usize) -> String {
        format!("http://{}:7480", self.agent_addr(i))
    }

    /// Tags of agent `i`: zones alternate tokyo/osaka, one rack each.
    pub fn agent_tags(i: usize) -> String {
        format!(
            "zone={},rack=r{},dc=dc1",
            if i.is_multiple_of(2) {
                "tokyo"
            } else {
                "osaka"
            },
            i + 1
        )
    }

    /// Start (or restart) the server on the same data dir and wait until it answers.
    pub async fn start_server(&mut self) {
        self.start_server_at(0).await;
    }

    /// Start (or restart) server `i` on its data dir (servers after the first join
    /// the first's cluster) and wait until it answers.
    pub async fn start_server_at(&mut self, i: usize) {
        let dir = self.server_dir_at(i);
        let log = self.dir.path().join(format!(
            "server{i}-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let mut args = vec![
            "server".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--listen".into(),
            format!("{}.{}:7400", self.net, i + 1),
        ];
        if i > 0 {
            args.extend([
                "--join-from".into(),
                self.server_dir().display().to_string(),
            ]);
        }
        let args = [args, self.server_args.clone()].concat();
        let mut p = Proc::spawn(&self.bin, &args, &log);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if !p.running() {
                panic!("server exited:\n{}", p.output());
            }
            let url = self.server_url_at(i);
            if dir.join("admin.token").exists()
                && self.ca_file().exists()
                && Client::with_tls(&url, None, None, Some(self.tls()))
                    .with_timeout(Duration::from_secs(2))
                    .get_bytes("/readyz")
                    .await
                    .is_ok()
            {
                break;
            }
            assert!(Instant::now() < end, "server not ready:\n{}", p.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.admin_token = std::fs::read_to_string(dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        *self.server_slot(i) = Some(p);
    }

    /// Where server `i`'s process is kept.
    fn server_slot(&mut self, i: usize) -> &mut Option<Proc> {
        match i {
            0 => &mut self.server,
            i => &mut self.more_servers[i - 1],
        }
    }

    /// Start one more server (joining the first's cluster), as for a blue/green switch;
    /// its index.
    pub async fn add_server(&mut self) -> usize {
        let i = self.servers;
        assert!(i < 9, "at most 9 servers");
        self.servers += 1;
        self.more_servers.push(None);
        self.start_server_at(i).await;
        i
    }

    /// SIGTERM server `i` (a clean stop: it resigns and leaves) and wait until it
    /// exits.
    pub async fn stop_server_at(&mut self, i: usize) {
        let Some(mut p) = self.server_slot(i).take() else {
            return;
        };
        p.signal(libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while p.running() {
            assert!(Instant::now() < end, "server {i} did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Server `i`'s process, while it runs.
    pub fn server_proc(&mut self, i: usize) -> Option<&mut Proc> {
        self.server_slot(i).as_mut()
    }

    /// SIGKILL server `i`.
    pub fn kill_server_at(&mut self, i: usize) {
        if let Some(mut p) = self.server_slot(i).take() {
            p.kill();
        }
    }

    /// Spawn agent `i` with a join token (not waiting).
    pub fn spawn_agent(&self, i: usize, join_token: &str) -> Proc {
        let name = Self::agent_name(i);
        let data = self.dir.path().join(&name);
        let mut extra = vec!["--tags".into(), Self::agent_tags(i)];
        extra.extend(self.agent_args.get(i).cloned().unwrap_or_default());
        self.spawn_agent_as(i, &name, &data, Some(join_token), &extra)
    }

    /// Spawn an agent on the address of agent `i`, named `name`, keeping its key in
    /// `data_dir`, with `join_token` if given and `extra` arguments (not waiting).
    pub fn spawn_agent_as(
        &self,
        i: usize,
        name: &str,
        data_dir: &Path,
        join_token: Option<&str>,
        extra: &[String],
    ) -> Proc {
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--server".into(),
            self.server_url(),
            "--ca-file".into(),
            self.ca_file().display().to_string(),
            "--name".into(),
            name.to_string(),
            "--addr".into(),
            self.agent_addr(i),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        if let Some(t) = join_token {
            args.extend(["--join-token".into(), t.to_string()]);
        }
        // Tests were written for nodes of 4 cores and 4 GiB whatever the machine: keep
        // that unless the test sets its own (a node offers its machine by default).
        for (flag, value) in [("--cpu-millis", "4000"), ("--memory-mib", "4096")] {
            if !extra.iter().any(|a| a == flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().cloned());
        Proc::spawn(
            &self.bin,
            &args,
            &self.dir.path().join(format!(
                "{}.log",
                data_dir
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| name.to_string())
            )),
        )
    }

    /// `avail workload run` of the example guest `guest_name` as a wasm workload named
    /// `name`, with `extra` arguments.
    pub fn run_wasm(&self, name: &str, guest_name: &str, extra: &[&str]) -> Output {
        self.run_workload(name, "wasm", &guest(guest_name), extra)
    }

    /// `avail workload run` of a process workload named `name`: a python web server on
    /// `$PORT` (run by `sh`, so the agent's shim has a grandchild to take down with it),
    /// with `extra` arguments.
    pub fn run_web(&self, name: &str, extra: &[&str]) -> Output {
        self.run_sh(
            name,
            "python3 -m http.server $PORT --bind 127.0.0.1; true",
            extra,
        )
    }

    /// `avail workload run` of a process workload named `name` running `script` with
    /// `sh -c`, with `extra` arguments.
    pub fn run_sh(&self, name: &str, script: &str, extra: &[&str]) -> Output {
        let mut args = vec!["--arg", "-c", "--arg", script];
        args.extend_from_slice(extra);
        self.run_workload(name, "process", "sh", &args)
    }

    /// `avail workload run -f` of the VM test guest ([`vm_guest`]) named `name`, with
    /// `memory_mib` of RAM, then `extra`.
    pub fn run_vm(&self, name: &str, memory_mib: u32, extra: &[&str]) -> Output {
        let g = vm_guest();
        let spec = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &spec,
            format!(
                "name = \"{name}\"\ndriver = \"qemu\"\nartifact = \"{}\"\n\
                 [resources]\ncpu_millis = 500\nmemory_mib = {memory_mib}\n\
                 [vm]\ninitrd = \"{}\"\n",
                g.kernel.display(),
                g.initrd.display()
            ),
        )
        .expect("write the VM spec");
        let file = spec.display().to_string();
        let mut args = vec!["workload", "run", "-f", file.as_str()];
        args.extend_from_slice(extra);
        self.cli(&args)
    }

    /// `avail workload run --name <name> --driver <driver> --artifact <artifact>`, then
    /// `extra`.
    fn run_workload(&self, name: &str, driver: &str, artifact: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "workload",
            "run",
            "--name",
            name,
            "--driver",
            driver,
            "--artifact",
            artifact,
        ];
        args.extend_from_slice(extra);
        self.cli(&args)
    }

    /// Wait until workload `name` runs on `node`.
    pub async fn wait_running_on(&self, name: &str, node: &str) {
        self.wait_workload(
            name,
            &format!("running on {node}"),
            Duration::from_secs(30),
            |w| {
                if w.status.phase == Phase::Running && w.status.node.as_deref() == Some(node) {
                    Ok(())
                } else {
                    Err(format!("{:?}", w.status))
                }
            },
        )
        .await
    }

    /// Wait until workload `name` is pending with `reason` in its explanation.
    pub async fn wait_pending(&self, name: &str, reason: &str) {
        self.wait_workload(
            name,
            &format!("pending, {reason}"),
            Duration::from_secs(30),
            |w| {
                let why = w
                    .status
                    .message
                    .as_deref()
                    .is_some_and(|m| m.contains(reason));
                if w.status.phase == Phase::Pending && why {
                    Ok(())
                } else {
                    Err(format!("{:?}", w.status))
                }
            },
        )
        .await
    }

    /// Poll workload `name` until `check` accepts it (`Ok`), for up to `deadline`; a
    /// timeout fails with `what` and the last status `check` described.
    pub async fn wait_workload<T>(
        &self,
        name: &str,
        what: &str,
        deadline: Duration,
        check: impl Fn(&avail_model::Workload) -> Result<T, String>,
    ) -> T {
        let api = self.client();
        let path = format!("/v1/workloads/{name}");
        let check = &check;
        wait_until(&format!("{name}: {what}"), deadline, || {
            let (api, path) = (api.clone(), path.clone());
            async move {
                let w: avail_model::Workload = api.get(&path).await.map_err(|e| e.to_string())?;
                check(&w)
            }
        })
        .await
    }

    /// An admin client.
    pub fn client(&self) -> Client {
        self.api(Some(self.admin_token.clone()))
    }

    /// Wait until `n` nodes are ready.
    pub async fn wait_nodes_ready(&self, n: usize) {
        let c = self.client();
        wait_until("nodes ready", Duration::from_secs(60), || {
            let c = c.clone();
            async move {
                let nodes: Vec<Node> = c.get("/v1/nodes").await.map_err(|e| e.to_string())?;
                let ready = nodes.iter().filter(|n| n.state == NodeState::Ready).count();
                if ready >= n {
                    Ok(())
                } else {
                    Err(format!("{ready}/{n} ready: {nodes:?}"))
                }
            }
        })
        .await
    }

    /// Wait until node `name` is in `state`.
    pub async fn wait_node_state(&self, name: &str, state: NodeState, deadline: Duration) {
        let c = self.client();
        wait_until(&format!("node {name} {state:?}"), deadline, || {
            let c = c.clone();
            async move {
                let n: Node = c
                    .get(&format!("/v1/nodes/{name}"))
                    .await
                    .map_err(|e| e.to_string())?;
                if n.state == state {
                    Ok(())
                } else {
                    Err(format!("{:?}", n.state))
                }
            }
        })
        .await
    }

    /// SIGKILL agent `i` (a host crash).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents[i].take() {
            p.kill();
        }
    }

    /// SIGKILL the server.
    pub fn kill_server(&mut self) {
        self.kill_server_at(0);
    }

    /// Run the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .env("AVAIL_ADDR", self.server_url())
            .env("AVAIL_TOKEN", &self.admin_token)
            .env("AVAIL_CACERT", self.ca_file())
            .env("HOME", self.dir.path())
            .output()
            .expect("run avail")
    }
}

/// The VM test guest's files.
#[derive(Clone, Debug)]
pub struct VmGuest {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs serving the counter interface.
    pub initrd: PathBuf,
}

/// The VM test guest, built by `scripts/build-vm-guest.sh` into `target/vm-guest` on
/// first use (once for all test processes: under a file lock; later calls find it up
/// to date).
pub fn vm_guest() -> VmGuest {
    let root = repo_root(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target").join("vm-guest");
    std::fs::create_dir_all(&out).expect("target/vm-guest");
    let lock = std::fs::File::create(out.join(".lock")).expect("lock file");
    lock.lock().expect("lock the VM guest build");
    let built = Command::new(root.join("scripts").join("build-vm-guest.sh"))
        .arg(&out)
        .output()
        .expect("run scripts/build-vm-guest.sh");
    assert!(
        built.status.success(),
        "scripts/build-vm-guest.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    VmGuest {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
    }
}

/// Path of an example guest module, `guests/<name>.wasm`.
pub fn guest(name: &str) -> String {
    repo_root(env!("CARGO_MANIFEST_DIR"))
        .join("guests")
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// The repository root (for guests/ and examples/), from a crate's manifest dir.
pub fn repo_root(manifest_dir: &str) -> PathBuf {
    let mut p = PathBuf::from(manifest_dir);
    while !p.join("guests").exists() {
        assert!(p.pop(), "no guests/ above {manifest_dir}");
    }
    p
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"))
}

/// Every live descendant of `pid` (children, grandchildren, ...), from `/proc`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            // The command name may hold spaces: the ppid is the second field after ')'.
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
                && let Some(ppid) = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse::<i32>().ok())
            {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (c, pp) in &parent_of {
            if *pp == p && !out.contains(c) {
                out.push(*c);
                frontier.push(*c);
            }
        }
    }
    out.retain(|p| pid_alive(*p));
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test shows what every process said (the data dir goes with it).
        if std::thread::panicking() {
            let Ok(dir) = std::fs::read_dir(self.dir.path()) else {
                return;
            };
            let mut logs: Vec<_> = dir
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.sort();
            for p in logs {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("----- {} (last {} lines) -----", p.display(), tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// The stdout of a command that must have succeeded (else its stderr in the panic).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network cut between two loopback addresses, made with iptables (both directions
/// dropped) and removed on drop. Needs root and iptables (`.ci/run` installs it).
pub struct LinkCut {
    rules: Vec<Vec<String>>,
}

impl LinkCut {
    /// Drop every packet between `a` and `b`, both ways.
    pub fn new(a: &str, b: &str) -> LinkCut {
        let rules: Vec<Vec<String>> = [(a, b), (b, a)]
            .iter()
            .map(|(s, d)| {
                ["INPUT", "-s", s, "-d", d, "-j", "DROP"]
                    .iter()
                    .map(|x| x.to_string())
                    .collect()
            })
            .collect();
        for r in &rules {
            let out =
                Command::new("iptables").arg("-I").args(r).output().expect(
                    "iptables must be installed (apt-get install iptables) and run as root",
                );
            assert!(
                out.status.success(),
                "iptables -I {}: {}",
                r.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        LinkCut { rules }
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = Command::new("iptables").arg("-D").args(r).output();
        }
    }
}
