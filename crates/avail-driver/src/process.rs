//! The `process` driver: a host process that serves HTTP on `$PORT`.
//!
//! The agent picks a free loopback port, starts the program with `PORT` (and `HOST`)
//! set and `$PORT` substituted in its arguments, in its own process group, with
//! `PR_SET_PDEATHSIG = SIGKILL` so that the death of the agent (a host crash) takes the
//! process with it. A supervisor task restarts the process with exponential backoff
//! when it exits (200 ms doubling to 10 s; reset after 30 s of running). Requests are
//! proxied to `127.0.0.1:$PORT`; until the port accepts connections the instance
//! answers `503`. Output lines go to the workload's log.
//!
//! Not covered: grandchildren that leave the process group survive an agent crash
//! (pdeathsig reaches the direct child only).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The `process` driver.
#[derive(Default)]
pub struct ProcessDriver;

#[async_trait]
impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ft: false,
            ha_checkpoint: false,
            live_migrate: false,
        }
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
        });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        tokio::spawn(supervise(
            start.spec.clone(),
            port,
            start.logs,
            shared.clone(),
        ));
        Ok(Arc::new(ProcessInstance {
            port,
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

fn spawn(spec: &WorkloadSpec, port: u16) -> std::io::Result<Child> {
    let p = port.to_string();
    let mut cmd = Command::new(&spec.artifact);
    cmd.args(spec.args.iter().map(|a| a.replace("$PORT", &p)))
        .envs(&spec.env)
        .env("PORT", &p)
        .env("HOST", "127.0.0.1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("parent died"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn pipe_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(r: R, logs: LogSink) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            logs(line);
        }
    });
}

async fn wait_ready(port: u16, shared: Arc<Shared>) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let s = &mut *shared.status.lock().unwrap_or_else(|p| p.into_inner());
            if s.state == InstanceState::Starting {
                s.state = InstanceState::Running;
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn supervise(spec: WorkloadSpec, port: u16, logs: LogSink, shared: Arc<Shared>) {
    let mut backoff = BACKOFF_START;
    while !shared.stopped.load(Ordering::Acquire) {
        let started = Instant::now();
        let exit_msg = match spawn(&spec, port) {
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
        shared.set(InstanceState::Starting, None, false);
    }
}

/// One process workload.
pub struct ProcessInstance {
    port: u16,
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
            .uri(format!("http://127.0.0.1:{}{}", self.port, req.path));
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
        let resp = match self.client.request(hreq).await {
            Ok(r) => r,
            Err(e) => {
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
