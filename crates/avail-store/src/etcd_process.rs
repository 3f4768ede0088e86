//! Real etcd processes for tests: [`EtcdCluster`] starts one or more `etcd` members
//! (Debian package [`ETCD_PACKAGE`]) on loopback, waits until they answer, and kills
//! them (SIGKILL to the process group) and removes their data when dropped.
//!
//! Each member has its own loopback address `127.X.Y.(1 + i)` (one random `127.X.Y` per
//! cluster, checked free), with the client port [`CLIENT_PORT`] and the peer port
//! [`PEER_PORT`], so that parallel tests never share a port and a partition test can cut
//! links by address. Data lives under `/dev/shm` when it has 1 GiB free (fsync is then
//! cheap), otherwise the temp dir; it survives [`EtcdCluster::kill`] so that
//! [`EtcdCluster::restart`] brings the same member back.
//!
//! Timing flags: heartbeat [`HEARTBEAT_MS`], election timeout [`ELECTION_MS`]: elections
//! take well under a second, and etcd's lease TTL floor (`⌈1.5 × election timeout⌉`) is
//! 1 s, the model's smallest TTL.
//!
//! Blocking calls (process start, health polls); call them from a thread that lives as
//! long as the cluster (a test's runtime thread): the members die with the thread that
//! spawned them (`PR_SET_PDEATHSIG`), so that no etcd outlives a crashed test.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The Debian package that has `/usr/bin/etcd`.
pub const ETCD_PACKAGE: &str = "etcd-server";
/// Client port of every member (on its own address).
pub const CLIENT_PORT: u16 = 2379;
/// Peer port of every member (on its own address).
pub const PEER_PORT: u16 = 2380;
/// etcd's `--heartbeat-interval` here.
pub const HEARTBEAT_MS: u64 = 50;
/// etcd's `--election-timeout` here.
pub const ELECTION_MS: u64 = 500;
/// Longest wait for a member (or a cluster) to answer `/health` after a start.
pub const START_WAIT: Duration = Duration::from_secs(30);
/// `/dev/shm` holds the data only with this much free: each member preallocates a
/// 64 MiB write-ahead log segment, in memory there.
const SHM_MIN_FREE_BYTES: u64 = 1 << 30;
/// Most clusters of members tried on other addresses when a start fails early.
const START_ATTEMPTS: usize = 3;

/// The `etcd` binary: the first `etcd` on `PATH`, or `/usr/bin/etcd`. Panics with one
/// line naming the package when there is none.
pub fn etcd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"));
    for candidate in on_path.chain([PathBuf::from("/usr/bin/etcd")]) {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "etcd not found on PATH nor at /usr/bin/etcd: install the Debian package \
         {ETCD_PACKAGE} (apt-get install -y {ETCD_PACKAGE}; scripts/test.sh does)"
    );
}

/// One member: its addresses, data dir and process (if running).
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    ip: Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdMember {
    /// `http://ip:port` of the client port.
    pub fn client_url(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.ip)
    }

    /// `http://ip:port` of the peer port.
    pub fn peer_url(&self) -> String {
        format!("http://{}:{PEER_PORT}", self.ip)
    }

    /// The member's loopback address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the member logged so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn spawn(&mut self, initial_cluster: &str, token: &str) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("create {}: {e}", self.log.display()));
        let err = log.try_clone().expect("clone log file");
        let (client, peer) = (self.client_url(), self.peer_url());
        let mut cmd = Command::new(etcd_binary());
        cmd.args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", token])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_MS.to_string()])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it runs in the child before exec and touches
        // no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn etcd member {}: {e}", self.name));
        self.child = Some(child);
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's process group; no memory involved.
            unsafe {
                libc::kill(-(pid as i32), sig);
            }
        }
    }

    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL when it has not exited within 5 s.
    fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Whether `/health` answers `"health":"true"` (the member has a leader and can
    /// serve), with what it said.
    fn healthy(&self) -> (bool, String) {
        match self.http("GET", "/health", "") {
            Ok(body) => (body.contains(r#""health":"true""#), body),
            Err(e) => (false, e.to_string()),
        }
    }

    /// Whether the member says it is the leader (etcd's JSON gateway to
    /// `Maintenance.Status`: its own id in the header, and the leader's id).
    fn is_leader(&self) -> bool {
        let Ok(response) = self.http("POST", "/v3/maintenance/status", "{}") else {
            return false;
        };
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
        let Ok(status) = serde_json::from_str::<serde_json::Value>(body) else {
            return false;
        };
        let own = &status["header"]["member_id"];
        !own.is_null() && *own == status["leader"]
    }

    /// One HTTP/1.1 request to the client port; the whole response (at most 64 KiB).
    fn http(&self, method: &str, path: &str, body: &str) -> std::io::Result<String> {
        let addr = SocketAddr::from((self.ip, CLIENT_PORT));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut response = String::new();
        s.take(64 * 1024).read_to_string(&mut response)?;
        Ok(response)
    }
}

/// A cluster of etcd members on loopback (see the [module docs](self)).
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    root: PathBuf,
    initial_cluster: String,
    token: String,
    /// Whether the data outlives the cluster value (`avail up`'s etcd).
    keep_data: bool,
}

impl EtcdCluster {
    /// One member, started and answering.
    pub fn single() -> EtcdCluster {
        Self::start(1)
    }

    /// `size` members (1, 3 or 5 make sense), started and answering. Panics with the
    /// members' logs when they do not answer within [`START_WAIT`].
    pub fn start(size: usize) -> EtcdCluster {
        assert!(size >= 1, "an etcd cluster needs a member");
        etcd_binary();
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Self::prepare(size);
            for i in 0..size {
                let (ic, token) = (cluster.initial_cluster.clone(), cluster.token.clone());
                cluster.members[i].spawn(&ic, &token);
            }
            match cluster.wait_all_healthy(START_WAIT) {
                Ok(()) => return cluster,
                // Another process took an address between the check and the start: try
                // elsewhere.
                Err(e) if e.contains("address already in use") => last_failure = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("etcd did not start in {START_ATTEMPTS} attempts: {last_failure}");
    }

    /// Members on the addresses `ips` with their data under `root` (`m<i>.etcd`, logs
    /// `m<i>.log`), kept when dropped: started on the data of an earlier run when it is
    /// there (etcd then ignores its initial-cluster flags), afresh otherwise. Waits
    /// until every member answers healthy; the error carries their logs.
    pub fn persistent(root: &Path, ips: &[Ipv4Addr]) -> Result<EtcdCluster, String> {
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let mut cluster = Self::assemble(root.to_path_buf(), ips, "avail-up".into(), true);
        for i in 0..cluster.members.len() {
            let (ic, token) = (cluster.initial_cluster.clone(), cluster.token.clone());
            cluster.members[i].spawn(&ic, &token);
        }
        cluster.wait_all_healthy(START_WAIT)?;
        Ok(cluster)
    }

    /// Client URLs of every member, for [`EtcdStore::connect`](crate::EtcdStore::connect).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::client_url).collect()
    }

    /// `avail server --store` for this cluster: `etcd://host:port,host:port,...`.
    pub fn store_flag(&self) -> String {
        let hosts: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_string())
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// The members.
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// The index of the member that is the leader now, if one says so.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(EtcdMember::is_leader)
    }

    /// SIGKILL member `i` (a crash); its data stays for [`restart`](Self::restart).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// SIGSTOP member `i` and wait until all its threads are stopped: it holds its
    /// connections but answers nothing.
    pub fn pause(&self, i: usize) {
        let m = &self.members[i];
        m.signal(libc::SIGSTOP);
        let pid = m.pid().expect("pause of a member that is not running");
        let deadline = Instant::now() + START_WAIT;
        loop {
            let states = thread_states(pid);
            if !states.is_empty() && states.iter().all(|s| *s == 'T') {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not stopped within {START_WAIT:?}: thread states {states:?}",
                m.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGCONT member `i` after [`pause`](Self::pause).
    pub fn resume(&self, i: usize) {
        self.members[i].signal(libc::SIGCONT);
    }

    /// Kill member `i` if it runs, start it again on the same addresses and data, and wait
    /// until it answers (in a cluster: until it has a leader again).
    pub fn restart(&mut self, i: usize) {
        self.members[i].kill();
        let (ic, token) = (self.initial_cluster.clone(), self.token.clone());
        self.members[i].spawn(&ic, &token);
        if let Err(e) = self.wait_healthy(&[i], START_WAIT) {
            panic!("{e}");
        }
    }

    fn wait_all_healthy(&mut self, within: Duration) -> Result<(), String> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.wait_healthy(&all, within)
    }

    /// Polls `/health` of `which` members every 50 ms until all answer healthy; the error
    /// names what was last seen and carries the logs.
    fn wait_healthy(&mut self, which: &[usize], within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let mut seen = Vec::new();
            let mut all = true;
            for &i in which {
                let m = &mut self.members[i];
                if !m.running() {
                    return Err(format!(
                        "etcd member {} exited at start; its log:\n{}",
                        m.name,
                        m.log()
                    ));
                }
                let (ok, said) = m.healthy();
                all &= ok;
                seen.push(format!("{}: {}", m.name, said.lines().last().unwrap_or("")));
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = which
                    .iter()
                    .map(|&i| format!("--- {}:\n{}", self.members[i].name, self.members[i].log()))
                    .collect();
                return Err(format!(
                    "etcd not healthy within {within:?}; last seen {seen:?}\n{}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Members `m<i>` on `ips`, with their data and logs under `root`, not started.
    fn assemble(root: PathBuf, ips: &[Ipv4Addr], token: String, keep_data: bool) -> EtcdCluster {
        let members: Vec<EtcdMember> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| EtcdMember {
                name: format!("m{i}"),
                ip: *ip,
                data_dir: root.join(format!("m{i}.etcd")),
                log: root.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        EtcdCluster {
            members,
            root,
            initial_cluster,
            token,
            keep_data,
        }
    }

    /// Addresses, dirs and names for `size` members, not started.
    fn prepare(size: usize) -> EtcdCluster {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = (u64::from(std::process::id()) << 32) ^ nanos ^ n.wrapping_mul(0x9e37_79b9);
        let base = free_loopback_net(seed, size);
        let shm = Path::new("/dev/shm");
        let tmp = if free_bytes(shm).is_some_and(|b| b >= SHM_MIN_FREE_BYTES) {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let token = format!("avail-etcd-{}-{n}-{nanos}", std::process::id());
        let root = tmp.join(&token);
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let ips: Vec<Ipv4Addr> = (0..size)
            .map(|i| Ipv4Addr::new(127, base.0, base.1, 1 + i as u8))
            .collect();
        Self::assemble(root, &ips, token, false)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if self.keep_data {
                m.stop();
            } else {
                m.kill();
            }
        }
        if !self.keep_data {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The state letter (`R`, `S`, `T`, ...) of every thread of process `pid`, from `/proc`.
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        // The state follows the command name, which is in parentheses.
        .filter_map(|stat| stat.rsplit_once(") ")?.1.chars().next())
        .collect()
}

/// Free bytes of the file system at `dir`, if it can be asked.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `st` points to writable memory
    // of the right type; statvfs writes it only when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A `127.X.Y` whose `.1 ..= .size` have both ports free (a bind check), from `seed`.
fn free_loopback_net(seed: u64, size: usize) -> (u8, u8) {
    assert!(size < 250, "too many members");
    for i in 0..1000u64 {
        let v = seed
            .wrapping_add(i)
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let (x, y) = (1 + ((v >> 24) % 250) as u8, 1 + ((v >> 40) % 250) as u8);
        let free = (0..size).all(|m| {
            let ip = Ipv4Addr::new(127, x, y, 1 + m as u8);
            TcpListener::bind((ip, CLIENT_PORT)).is_ok()
                && TcpListener::bind((ip, PEER_PORT)).is_ok()
        });
        if free {
            return (x, y);
        }
    }
    panic!("no free 127.X.Y for etcd in 1000 tries");
}
