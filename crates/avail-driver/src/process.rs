//! The `process` driver: a host process that serves HTTP on `$PORT`.
//!
//! Each start picks a free loopback port and runs the program with `PORT` (and `HOST`)
//! set and `$PORT` substituted in its arguments, in its own process group. A supervisor
//! task restarts it with exponential backoff when it exits (200 ms doubling to 10 s;
//! reset after 30 s of running), on a fresh port. Requests are proxied to
//! `127.0.0.1:$PORT` with the workload's `timeout_ms` (then `504`); until the port accepts
//! connections the instance answers `503`. Output lines go to the workload's log.
//!
//! **A host crash takes the whole workload with it.** With a shim (the agent passes its
//! own executable, `avail process-shim`), the agent starts the shim with
//! `PR_SET_PDEATHSIG = SIGTERM`; the shim leads the process group, runs the program in
//! it, and on SIGTERM kills the whole group, so children and grandchildren of the
//! program die with the agent even when the agent is SIGKILLed. Without a shim (library
//! use, tests), the program itself gets `PR_SET_PDEATHSIG = SIGKILL`, which reaches the
//! direct child only.
//!
//! **Containment** ([`crate::contain`]): an agent's driver runs each instance as its own
//! uid, in an empty private working directory (also `HOME` and `TMPDIR`), with a clean
//! environment (`PATH`, `LANG`, `LC_ALL`, `TZ` of the agent; then the workload's own
//! variables), in a cgroup with the spec's limits where the machine has cgroup v2
//! (rlimits otherwise). The shim applies it in the program's process before exec. When
//! a run ends, everything in the instance's cgroup and everything running as its uid is
//! killed, so a program that left its process group (`setsid`) dies too; when the
//! instance stops, its cgroup and directory are removed and its uid freed. The shim,
//! killed with the agent, kills the cgroup and the uid's processes as well.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use avail_model::agent::InstanceState;
use avail_model::{DriverKind, WorkloadSpec};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use crate::contain::exec::ChildSetup;
use crate::contain::{Confinement, Containment};
use crate::{
    Capabilities, Driver, HttpRequest, HttpResponse, Instance, InstanceStatus, LogSink, StartError,
    StartSpec,
};

/// Largest reply body proxied from a process, bytes.
pub const MAX_REPLY_BYTES: usize = 16 << 20;
/// First restart delay.
pub const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Running this long resets the backoff.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// A started process that does not listen on its port within this time is reported.
pub const READY_WITHIN: Duration = Duration::from_secs(30);
/// The subcommand of the shim executable.
pub const SHIM_SUBCOMMAND: &str = "process-shim";

/// How long stopping an instance waits for its processes, cgroup and directory to be
/// gone.
pub const STOP_WAIT: Duration = Duration::from_secs(10);
/// Variables of the agent's environment a program gets (everything else is cleared).
pub const PASSED_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];
/// `PATH` when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The `process` driver.
pub struct ProcessDriver {
    shim: Option<PathBuf>,
    contain: Arc<Containment>,
}

impl Default for ProcessDriver {
    fn default() -> Self {
        ProcessDriver::with_shim(None)
    }
}

impl ProcessDriver {
    /// A driver that starts programs through `shim process-shim -- program args...`
    /// (see the module docs); `None` starts them directly. No containment.
    pub fn with_shim(shim: Option<PathBuf>) -> ProcessDriver {
        ProcessDriver::new(shim, Arc::new(Containment::none()))
    }

    /// A driver that contains its programs as `contain` says.
    pub fn new(shim: Option<PathBuf>, contain: Arc<Containment>) -> ProcessDriver {
        ProcessDriver { shim, contain }
    }

    /// The containment in force.
    pub fn containment(&self) -> &Containment {
        &self.contain
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }

    async fn start(&self, start: StartSpec<'_>) -> Result<Arc<dyn Instance>, StartError> {
        Ok(self.start_process(start).await?)
    }
}

impl ProcessDriver {
    /// Start an instance (see [`Driver::start`]), as the concrete instance: what a
    /// driver built on this one (qemu) needs of it.
    pub async fn start_process(
        &self,
        start: StartSpec<'_>,
    ) -> Result<Arc<ProcessInstance>, StartError> {
        let port = free_port().map_err(|e| StartError::Start(format!("no free port: {e}")))?;
        let contain = self.contain.clone();
        let spec = start.spec.clone();
        let confinement = tokio::task::spawn_blocking(move || contain.enter(&spec))
            .await
            .map_err(|e| StartError::Start(format!("containment: {e}")))?
            .map_err(|e| StartError::Start(format!("containment: {e}")))?;
        (start.logs)(format!("avail: {}", confinement.describe()));
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            status: Mutex::new(InstanceStatus {
                state: InstanceState::Starting,
                restarts: 0,
                message: None,
            }),
            stop: Notify::new(),
            stopped: AtomicBool::new(false),
            pgid: Mutex::new(None),
            port: AtomicU16::new(port),
            done,
        });
        let (spec, shim, start_logs, shared_for_task) = (
            start.spec.clone(),
            self.shim.clone(),
            start.logs.clone(),
            shared.clone(),
        );
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let workdir = confinement.workdir().map(|p| p.to_path_buf());
        tokio::spawn(async move {
            let confinement = Arc::new(confinement);
            supervise(spec, shim, start_logs, shared_for_task, confinement.clone()).await;
            // The end of the instance: nothing of it survives.
            match Arc::try_unwrap(confinement) {
                Ok(c) => {
                    let _ = tokio::task::spawn_blocking(move || c.release()).await;
                }
                Err(c) => tracing::warn!("instance not released: {}", c.describe()),
            }
            let _ = done_tx.send(true);
        });
        Ok(Arc::new(ProcessInstance {
            timeout: Duration::from_millis(u64::from(start.spec.timeout_ms)),
            shared,
            client,
            workdir,
        }))
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

struct Shared {
    status: Mutex<InstanceStatus>,
    stop: Notify,
    stopped: AtomicBool,
    pgid: Mutex<Option<i32>>,
    /// The port of the current run.
    port: AtomicU16,
    /// Becomes true when the instance's processes, cgroup and directory are gone.
    done: tokio::sync::watch::Receiver<bool>,
}

impl Shared {
    fn set(&self, state: InstanceState, message: Option<String>, restarted: bool) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.state = state;
        if message.is_some() {
            s.message = message;
        }
        if restarted {
            s.restarts += 1;
        }
    }

    fn kill_group(&self) {
        if let Some(pgid) = self.pgid.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: kill(2) with a negative pid signals the process group we created;
            // it has no memory-safety preconditions.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

fn spawn(
    spec: &WorkloadSpec,
    shim: Option<&PathBuf>,
    port: u16,
    confinement: &Confinement,
) -> std::io::Result<Child> {
    let p = port.to_string();
    let args = spec.args.iter().map(|a| a.replace("$PORT", &p));
    let setup = confinement.child_setup();
    let mut cmd = match shim {
        Some(shim) => {
            let mut c = Command::new(shim);
            c.arg(SHIM_SUBCOMMAND)
                .args(setup.to_args())
                .arg("--")
                .arg(&spec.artifact)
                .args(args);
            c
        }
        None => {
            let mut c = Command::new(&spec.artifact);
            c.args(args);
            if setup != ChildSetup::default() {
                let prepared = setup.prepare()?;
                // SAFETY: `apply` makes async-signal-safe system calls only; it runs in
                // the child before exec.
                unsafe {
                    cmd_pre_exec(&mut c, move || prepared.apply());
                }
            }
            c
        }
    };
    cmd.env_clear();
    for k in PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if let Some(w) = confinement.workdir() {
        cmd.env("HOME", w).env("TMPDIR", w);
    }
    cmd.envs(&spec.env)
        .env("PORT", &p)
        .env("HOST", "127.0.0.1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // The shim turns SIGTERM into "kill my whole group"; a bare program just dies.
    let death_signal = if shim.is_some() {
        libc::SIGTERM
    } else {
        libc::SIGKILL
    };
    set_parent_death_signal(&mut cmd, death_signal);
    cmd.spawn()
}

/// Register `f` to run in the child before exec.
///
/// # Safety
/// `f` must only make async-signal-safe calls (it runs between fork and exec).
unsafe fn cmd_pre_exec<F>(cmd: &mut Command, f: F)
where
    F: FnMut() -> std::io::Result<()> + Send + Sync + 'static,
{
    // SAFETY: the caller promises `f` is async-signal-safe.
    unsafe {
        cmd.pre_exec(f);
    }
}

/// Make the child get `signal` when this process dies, closing the race where this
/// process dies between fork and the prctl.
pub fn set_parent_death_signal(cmd: &mut Command, signal: i32) {
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent died"));
            }
            Ok(())
        });
    }
}

/// How long an exit waits for the rest of the program's stderr to be read.
pub const STDERR_DRAIN: Duration = Duration::from_millis(200);

/// Longest output line kept, bytes; the rest of a longer line is dropped.
pub const MAX_LINE_BYTES: usize = 4096;

/// Forward output to the log line by line, never holding more than
/// [`MAX_LINE_BYTES`] of one line in memory.
fn pipe_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
    logs: LogSink,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(r);
        let mut line = Vec::with_capacity(256);
        loop {
            let buf = match reader.fill_buf().await {
                Ok(b) if !b.is_empty() => b,
                _ => break,
            };
            let newline = buf.iter().position(|&b| b == b'\n');
            let take = newline.map_or(buf.len(), |i| i + 1);
            let keep = newline.unwrap_or(take).min(MAX_LINE_BYTES - line.len());
            line.extend_from_slice(&buf[..keep]);
            reader.consume(take);
            if newline.is_some() {
                logs(String::from_utf8_lossy(&line).into_owned());
                line.clear();
            }
        }
        if !line.is_empty() {
            logs(String::from_utf8_lossy(&line).into_owned());
        }
    })
}

async fn wait_ready(port: u16, shared: Arc<Shared>) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    while start.elapsed() < READY_WITHIN {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let s = &mut *shared.status.lock().unwrap_or_else(|p| p.into_inner());
            if s.state == InstanceState::Starting {
                s.state = InstanceState::Running;
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.set(
        InstanceState::Starting,
        Some(format!(
            "not listening on $PORT ({port}) after {} s",
            READY_WITHIN.as_secs()
        )),
        false,
    );
}

/// Kill what is left of a run: the process group, then the cgroup and the uid's
/// processes.
async fn kill_run(shared: &Shared, confinement: &Arc<Confinement>) {
    shared.kill_group();
    let c = confinement.clone();
    let _ = tokio::task::spawn_blocking(move || c.kill_all()).await;
}

async fn supervise(
    spec: WorkloadSpec,
    shim: Option<PathBuf>,
    logs: LogSink,
    shared: Arc<Shared>,
    confinement: Arc<Confinement>,
) {
    let mut backoff = BACKOFF_START;
    let mut port = shared.port.load(Ordering::Acquire);
    while !shared.stopped.load(Ordering::Acquire) {
        let started = Instant::now();
        let exit_msg = match spawn(&spec, shim.as_ref(), port, &confinement) {
            Ok(mut child) => {
                *shared.pgid.lock().unwrap_or_else(|p| p.into_inner()) =
                    child.id().map(|p| p as i32);
                if let Some(o) = child.stdout.take() {
                    pipe_lines(o, logs.clone());
                }
                // The last line this run writes to stderr, said with its exit (a
                // program's reason for failing is usually there).
                let last_error = Arc::new(Mutex::new(None::<String>));
                let stderr_read = child.stderr.take().map(|e| {
                    let (logs, seen) = (logs.clone(), last_error.clone());
                    pipe_lines(
                        e,
                        Arc::new(move |line: String| {
                            *seen.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(line.trim_end().to_string());
                            logs(line)
                        }),
                    )
                });
                let ready = tokio::spawn(wait_ready(port, shared.clone()));
                let r = tokio::select! {
                    r = child.wait() => Some(r),
                    _ = shared.stop.notified() => None,
                };
                ready.abort();
                match r {
                    None => {
                        kill_run(&shared, &confinement).await;
                        let _ = child.wait().await;
                        return;
                    }
                    Some(Ok(st)) => {
                        // Its last words on stderr, once the pipe has passed them on
                        // (bounded: something it started may hold the pipe open).
                        if let Some(read) = stderr_read {
                            let _ = tokio::time::timeout(STDERR_DRAIN, read).await;
                        }
                        let said = last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
                        match said {
                            Some(l) if !l.is_empty() => format!("process exited: {st}: {l}"),
                            _ => format!("process exited: {st}"),
                        }
                    }
                    Some(Err(e)) => format!("wait failed: {e}"),
                }
            }
            Err(e) => format!("cannot start {:?}: {e}", spec.artifact),
        };
        kill_run(&shared, &confinement).await;
        if shared.stopped.load(Ordering::Acquire) {
            // Stopping, and it exited (asked to, or not): no restart.
            return;
        }
        logs(format!(
            "avail: {exit_msg}; restarting in {} ms",
            backoff.as_millis()
        ));
        shared.set(InstanceState::Restarting, Some(exit_msg), true);
        if started.elapsed() >= BACKOFF_RESET_AFTER {
            backoff = BACKOFF_START;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.stop.notified() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        // A fresh port for the next run: the old one may have been taken meanwhile.
        if let Ok(p) = free_port() {
            port = p;
            shared.port.store(p, Ordering::Release);
        }
        shared.set(InstanceState::Starting, None, false);
    }
}

pub use crate::shim::run_shim;

/// One process workload.
pub struct ProcessInstance {
    timeout: Duration,
    shared: Arc<Shared>,
    client: Client<HttpConnector, Full<Bytes>>,
    workdir: Option<PathBuf>,
}

impl ProcessInstance {
    /// The loopback port of the current run.
    pub fn port(&self) -> u16 {
        self.shared.port.load(Ordering::Acquire)
    }

    /// Its private working directory (none without containment).
    pub fn workdir(&self) -> Option<&std::path::Path> {
        self.workdir.as_deref()
    }

    /// Stop it with a grace: no restart from now on; `ask` asks the program to end
    /// (a VM's ACPI power button), then it has `grace` to exit before it is killed.
    pub async fn stop_gracefully(
        &self,
        grace: Duration,
        ask: impl std::future::Future<Output = ()>,
    ) {
        self.shared.stopped.store(true, Ordering::Release);
        ask.await;
        let mut done = self.shared.done.clone();
        let _ = tokio::time::timeout(grace, done.wait_for(|d| *d)).await;
        self.stop().await;
    }
}

#[async_trait]
impl Instance for ProcessInstance {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        if self.shared.stopped.load(Ordering::Acquire) {
            return HttpResponse::error(503, "stopped", "the workload instance is stopped");
        }
        let mut b = hyper::Request::builder()
            .method(req.method.as_str())
            .uri(format!(
                "http://127.0.0.1:{}{}",
                self.shared.port.load(Ordering::Acquire),
                req.path
            ));
        for (n, v) in &req.headers {
            if !is_hop_by_hop(n) && !n.eq_ignore_ascii_case("host") {
                b = b.header(n.as_str(), v.as_str());
            }
        }
        let hreq = match b.body(Full::new(req.body)) {
            Ok(r) => r,
            Err(e) => {
                return HttpResponse::error(400, "bad_request", &format!("cannot forward: {e}"));
            }
        };
        let resp = match tokio::time::timeout(self.timeout, self.client.request(hreq)).await {
            Err(_) => {
                return HttpResponse::error(
                    504,
                    "timeout",
                    &format!("no reply within {} ms", self.timeout.as_millis()),
                );
            }
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return HttpResponse::error(
                    503,
                    "unavailable",
                    &format!("process not answering: {e}"),
                );
            }
        };
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n.as_str()))
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        match Limited::new(resp.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
        {
            Ok(b) => HttpResponse {
                status,
                headers,
                body: b.to_bytes(),
            },
            Err(e) => HttpResponse::error(502, "bad_gateway", &format!("reading the reply: {e}")),
        }
    }

    fn status(&self) -> InstanceStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.stop.notify_waiters();
        self.shared.stop.notify_one();
        self.shared.kill_group();
        self.shared
            .set(InstanceState::Failed, Some("stopped".into()), false);
        let mut done = self.shared.done.clone();
        if tokio::time::timeout(STOP_WAIT, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            tracing::warn!("a process instance was not cleaned up within {STOP_WAIT:?}");
        }
    }
}

/// Headers that belong to one connection and are not forwarded.
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}
