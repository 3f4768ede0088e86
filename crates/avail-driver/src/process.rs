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
//! direct child only. A program that leaves the process group (`setsid`) escapes either
//! way: that needs cgroups, not built yet.

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

/// The `process` driver.
#[derive(Default)]
pub struct ProcessDriver {
    shim: Option<PathBuf>,
}

impl ProcessDriver {
    /// A driver that starts programs through `shim process-shim -- program args...`
    /// (see the module docs); `None` starts them directly.
    pub fn with_shim(shim: Option<PathBuf>) -> ProcessDriver {
        ProcessDriver { shim }
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
        let port = free_port().map_err(|e| StartError::Start(format!("no free port: {e}")))?;
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
        });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        tokio::spawn(supervise(
            start.spec.clone(),
            self.shim.clone(),
            start.logs,
            shared.clone(),
        ));
        Ok(Arc::new(ProcessInstance {
            timeout: Duration::from_millis(u64::from(start.spec.timeout_ms)),
            shared,
            client,
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

fn spawn(spec: &WorkloadSpec, shim: Option<&PathBuf>, port: u16) -> std::io::Result<Child> {
    let p = port.to_string();
    let args = spec.args.iter().map(|a| a.replace("$PORT", &p));
    let mut cmd = match shim {
        Some(shim) => {
            let mut c = Command::new(shim);
            c.arg(SHIM_SUBCOMMAND)
                .arg("--")
                .arg(&spec.artifact)
                .args(args);
            c
        }
        None => {
            let mut c = Command::new(&spec.artifact);
            c.args(args);
            c
        }
    };
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

/// Longest output line kept, bytes; the rest of a longer line is dropped.
pub const MAX_LINE_BYTES: usize = 4096;

/// Forward output to the log line by line, never holding more than
/// [`MAX_LINE_BYTES`] of one line in memory.
fn pipe_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(r: R, logs: LogSink) {
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
    });
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

async fn supervise(spec: WorkloadSpec, shim: Option<PathBuf>, logs: LogSink, shared: Arc<Shared>) {
    let mut backoff = BACKOFF_START;
    let mut port = shared.port.load(Ordering::Acquire);
    while !shared.stopped.load(Ordering::Acquire) {
        let started = Instant::now();
        let exit_msg = match spawn(&spec, shim.as_ref(), port) {
            Ok(mut child) => {
                *shared.pgid.lock().unwrap_or_else(|p| p.into_inner()) =
                    child.id().map(|p| p as i32);
                if let Some(o) = child.stdout.take() {
                    pipe_lines(o, logs.clone());
                }
                if let Some(e) = child.stderr.take() {
                    pipe_lines(e, logs.clone());
                }
                let ready = tokio::spawn(wait_ready(port, shared.clone()));
                let r = tokio::select! {
                    r = child.wait() => Some(r),
                    _ = shared.stop.notified() => None,
                };
                ready.abort();
                match r {
                    None => {
                        shared.kill_group();
                        let _ = child.wait().await;
                        return;
                    }
                    Some(Ok(st)) => format!("process exited: {st}"),
                    Some(Err(e)) => format!("wait failed: {e}"),
                }
            }
            Err(e) => format!("cannot start {:?}: {e}", spec.artifact),
        };
        shared.kill_group();
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

/// Run as the shim between the agent and a process workload (`avail process-shim --
/// program args...`): lead the process group, run the program in it, and when the agent
/// dies (SIGTERM through the parent-death signal) or asks, kill the whole group.
/// Returns the exit code to exit with.
pub fn run_shim(program: &str, args: &[String]) -> i32 {
    extern "C" fn kill_group(_: libc::c_int) {
        // SAFETY: getpgrp and kill are async-signal-safe; this kills our own group,
        // the shim included.
        unsafe {
            libc::kill(-libc::getpgrp(), libc::SIGKILL);
        }
    }
    let handler: extern "C" fn(libc::c_int) = kill_group;
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    let parent = std::process::id() as i32;
    // SAFETY: async-signal-safe calls only, in the child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return Err(std::io::Error::other("shim died"));
            }
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut child) => match child.wait() {
            Ok(st) => st.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
            }),
            Err(e) => {
                eprintln!("avail process-shim: wait: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("avail process-shim: cannot start {program:?}: {e}");
            127
        }
    }
}

/// One process workload.
pub struct ProcessInstance {
    timeout: Duration,
    shared: Arc<Shared>,
    client: Client<HttpConnector, Full<Bytes>>,
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
