//! Contained process workloads, with real processes: a workload replaying the attack of
//! issue 11 (serve `/`, read the platform's files by path) gets nothing; it runs as its
//! own uid with no groups, in an empty private directory; its limits are the spec's
//! (cgroup v2 where the machine has the controllers, rlimits otherwise); a fork bomb is
//! bounded; stopping a workload leaves nothing of it behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use avail_client::Client;
use avail_testkit::{Cluster, ok, repo_root, wait_until};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");
const PIDS_MAX: u32 = 48;

/// Answers `/id` (who and where it is) and `/read?p=PATH` (the file, or the listing of
/// a directory; 403 with the error when refused).
const PROBE: &str = r#"
import http.server, json, os, urllib.parse
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        code = 200
        if u.path == '/id':
            status = open('/proc/self/status').read()
            body = json.dumps({
                'pid': os.getpid(), 'uid': os.getuid(), 'euid': os.geteuid(),
                'gid': os.getgid(), 'groups': os.getgroups(), 'cwd': os.getcwd(),
                'listing': os.listdir('.'), 'home': os.environ.get('HOME'),
                'tmpdir': os.environ.get('TMPDIR'),
                'env': sorted(os.environ.keys()),
                'no_new_privs': [l for l in status.splitlines() if l.startswith('NoNewPrivs')],
            }).encode()
        else:
            p = urllib.parse.parse_qs(u.query).get('p', [''])[0]
            try:
                if os.path.isdir(p):
                    body = '\n'.join(os.listdir(p)).encode()
                else:
                    body = open(p, 'rb').read()
            except Exception as e:
                code, body = 403, repr(e).encode()
        self.send_response(code)
        self.send_header('content-length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()
"#;

/// Forks children that leave the process group (`setsid`) and sleep, until fork fails;
/// then answers with how many it made and the error.
const BOMB: &str = r#"
import http.server, json, os, time
n, err = 0, ''
while n < 5000:
    try:
        pid = os.fork()
    except OSError as e:
        err = repr(e)
        break
    if pid == 0:
        os.setsid()
        time.sleep(3600)
        os._exit(0)
    n += 1
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = json.dumps({'forked': n, 'error': err}).encode()
        self.send_response(200)
        self.send_header('content-length', str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()
"#;

async fn get(base: &str, path: &str) -> avail_client::Reply {
    Client::new(base, None, None)
        .raw(Method::GET, path, None, &[])
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn text(r: &avail_client::Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// `avail workload run ... --detach`, then wait until it runs (a node that has just
/// joined may not take work for a moment: the server places the workload when it does).
async fn run(c: &Cluster, name: &str, args: &[&str]) {
    let mut args = args.to_vec();
    args.push("--detach");
    ok(&c.cli(&args));
    c.wait_running_on(name, &Cluster::agent_name(0)).await;
}

async fn run_python(c: &Cluster, name: &str, script: &str, extra: &[&str]) {
    let mut args = vec![
        "workload",
        "run",
        "--name",
        name,
        "--driver",
        "process",
        "--artifact",
        "python3",
        "--arg",
        "-c",
        "--arg",
        script,
    ];
    args.extend_from_slice(extra);
    run(c, name, &args).await;
}

/// What the driver logged for the instance: `contained: uid N, workdir W, cgroup C, ...`.
struct Contained {
    line: String,
    uid: Option<u32>,
    workdir: Option<PathBuf>,
    cgroup: Option<PathBuf>,
}

async fn contained(c: &Cluster, name: &str) -> Contained {
    let line = wait_until(
        &format!("{name}: containment log line"),
        Duration::from_secs(20),
        || async move {
            let out = c.cli(&["workload", "logs", name]);
            let logs = String::from_utf8_lossy(&out.stdout).into_owned();
            logs.lines()
                .find(|l| l.contains("contained: "))
                .map(str::to_string)
                .ok_or(logs)
        },
    )
    .await;
    let field = |key: &str| {
        line.split(", ")
            .flat_map(|p| p.split(": "))
            .find_map(|p| p.strip_prefix(key).map(str::to_string))
    };
    Contained {
        uid: field("uid ").and_then(|u| u.parse().ok()),
        workdir: field("workdir ").map(PathBuf::from),
        cgroup: field("cgroup ").map(PathBuf::from),
        line,
    }
}

/// Live processes whose real uid is `uid`.
fn pids_of_uid(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok());
        if real == Some(uid) && !zombie {
            out.push(pid);
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The limit `name` (e.g. "Max data size") of a process, soft value.
fn rlimit(pid: i64, name: &str) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    limits
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l[name.len()..].split_whitespace().next())
        .unwrap_or_else(|| panic!("{name} not in {limits}"))
        .to_string()
}

#[tokio::test]
async fn process_workloads_are_contained() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root (containment switches users; the tests run as root)");
        return;
    }
    let agent_args = vec![vec![
        "--workload-pids-max".to_string(),
        PIDS_MAX.to_string(),
    ]];
    let mut c = Cluster::start_with(Path::new(BIN), 1, agent_args).await;
    let root = c.server_dir().parent().unwrap().to_path_buf();
    // The cluster's own directory as open as a usual working directory: only the
    // platform's modes protect what is in it.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711)).unwrap();
    let ingress = c.ingress(0);

    // The README's web example: it serves its own, empty directory.
    let web_toml = repo_root(env!("CARGO_MANIFEST_DIR")).join("examples/web.toml");
    run(
        &c,
        "web",
        &["workload", "run", "-f", web_toml.to_str().unwrap()],
    )
    .await;
    let listing = text(&get(&ingress, "/w/web/").await);
    assert!(
        listing.contains("Directory listing") && !listing.contains("<li>"),
        "web lists files: {listing}"
    );
    for path in [
        "/w/web/server/admin.token",
        "/w/web/admin.token",
        "/w/web/secret.key",
        "/w/web/../server/secret.key",
        "/w/web/%2e%2e/server/admin.token",
    ] {
        let r = get(&ingress, path).await;
        assert_eq!(r.status, 404, "{path}: {}", text(&r));
    }
    let web = contained(&c, "web").await;

    // A probe that reads any path it is given.
    run_python(
        &c,
        "probe",
        PROBE,
        &["--cpu-millis", "250", "--memory-mib", "96"],
    )
    .await;
    let probe = contained(&c, "probe").await;
    let id: serde_json::Value =
        serde_json::from_slice(&get(&ingress, "/w/probe/id").await.body).expect("/id answers JSON");
    let uid = id["uid"].as_u64().unwrap() as u32;
    assert_ne!(uid, 0, "{id}");
    assert_eq!(id["euid"], id["uid"], "{id}");
    assert_eq!(id["gid"], id["uid"], "{id}");
    assert_eq!(
        id["groups"],
        serde_json::json!([]),
        "no supplementary groups: {id}"
    );
    assert_eq!(id["listing"], serde_json::json!([]), "cwd not empty: {id}");
    assert_eq!(id["no_new_privs"][0], "NoNewPrivs:\t1", "{id}");
    assert_eq!(probe.uid, Some(uid), "{}", probe.line);
    assert_ne!(web.uid, probe.uid, "a uid per instance");
    let workdir = probe.workdir.clone().expect("a private workdir");
    assert_eq!(id["cwd"], workdir.display().to_string());
    assert_eq!(id["home"], id["cwd"]);
    assert_eq!(id["tmpdir"], id["cwd"]);
    assert_eq!(mode(&workdir), 0o700);
    assert!(
        !id["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k.as_str().is_some_and(|k| k.contains("TOKEN"))),
        "the agent's environment leaked: {id}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&workdir).unwrap().uid(), uid);

    // The platform's files: private modes, and unreadable through the workload.
    let server = c.server_dir();
    let agent_dir = root.join(Cluster::agent_name(0));
    for (p, m) in [
        (server.clone(), 0o700),
        (server.join("artifacts"), 0o700),
        (agent_dir.clone(), 0o700),
        (server.join("secret.key"), 0o600),
        (server.join("admin.token"), 0o600),
        (server.join("ca.key"), 0o600),
        (agent_dir.join("node.key"), 0o600),
        (server.join("store.redb"), 0o600),
    ] {
        assert_eq!(mode(&p), m, "{}", p.display());
    }
    let mut targets = vec![
        server.join("admin.token"),
        server.join("ca.key"),
        agent_dir.join("node.key"),
        server.join("secret.key"),
        server.join("store.redb"),
        server.clone(),
        server.join("artifacts"),
        agent_dir.clone(),
        agent_dir.join("artifacts"),
        workdir.parent().unwrap().to_path_buf(),
        workdir.parent().unwrap().parent().unwrap().to_path_buf(),
        PathBuf::from(format!(
            "/proc/{}/environ",
            c.agents[0].as_ref().unwrap().pid()
        )),
    ];
    targets.push(web.workdir.clone().expect("web has a workdir"));
    for t in &targets {
        let q = format!("/w/probe/read?p={}", t.display());
        let r = get(&ingress, &q).await;
        assert_eq!(r.status, 403, "read {}: {}", t.display(), text(&r));
    }
    // The probe works: it reads what is meant to be public.
    let r = get(&ingress, "/w/probe/read?p=/etc/passwd").await;
    assert_eq!(r.status, 200, "{}", text(&r));

    // Limits: cgroup v2 where the machine has the controllers, rlimits otherwise.
    let pid = id["pid"].as_i64().unwrap();
    match &probe.cgroup {
        Some(cg) => {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == pid.to_string()),
                "pid {pid} not in {}: {procs}",
                cg.display()
            );
            let read = |f: &str| std::fs::read_to_string(cg.join(f)).ok();
            match read("cpu.max") {
                Some(v) => assert_eq!(v.trim(), "25000 100000"),
                None => eprintln!("cgroup part skipped: no cpu controller in {}", cg.display()),
            }
            match read("memory.max") {
                Some(v) => assert_eq!(v.trim(), (96u64 << 20).to_string()),
                None => {
                    eprintln!(
                        "cgroup part skipped: no memory controller in {}",
                        cg.display()
                    );
                    assert_eq!(rlimit(pid, "Max data size"), (96u64 << 20).to_string());
                }
            }
            match read("pids.max") {
                Some(v) => assert_eq!(v.trim(), PIDS_MAX.to_string()),
                None => {
                    eprintln!(
                        "cgroup part skipped: no pids controller in {}",
                        cg.display()
                    );
                    assert_eq!(rlimit(pid, "Max processes"), PIDS_MAX.to_string());
                }
            }
        }
        None => {
            eprintln!(
                "cgroup part skipped: no usable cgroup v2 on this machine ({})",
                probe.line
            );
            assert_eq!(rlimit(pid, "Max data size"), (96u64 << 20).to_string());
            assert_eq!(rlimit(pid, "Max processes"), PIDS_MAX.to_string());
        }
    }

    // A fork bomb whose children leave the process group is bounded, and removing the
    // workload leaves nothing of it behind.
    run_python(&c, "bomb", BOMB, &[]).await;
    let bomb = contained(&c, "bomb").await;
    let r: serde_json::Value =
        serde_json::from_slice(&get(&ingress, "/w/bomb/").await.body).expect("bomb answers");
    let forked = r["forked"].as_u64().unwrap();
    assert!(
        forked < u64::from(PIDS_MAX) && !r["error"].as_str().unwrap().is_empty(),
        "fork was not bounded by {PIDS_MAX}: {r}"
    );
    let bomb_uid = bomb.uid.expect("bomb uid");
    assert!(
        pids_of_uid(bomb_uid).len() as u64 > forked,
        "the bomb's children run as its uid"
    );
    ok(&c.cli(&["workload", "rm", "bomb"]));
    wait_until(
        "no process of the bomb's uid",
        Duration::from_secs(20),
        || {
            let left = pids_of_uid(bomb_uid);
            async move {
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} left: {left:?}", left.len()))
                }
            }
        },
    )
    .await;
    let gone: Vec<PathBuf> = bomb.workdir.into_iter().chain(bomb.cgroup).collect();
    wait_until(
        "bomb's workdir and cgroup removed",
        Duration::from_secs(20),
        || {
            let left: Vec<_> = gone.iter().filter(|p| p.exists()).cloned().collect();
            async move {
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{left:?}"))
                }
            }
        },
    )
    .await;

    // The agent is SIGKILLed: its shims kill their cgroups and every process of their
    // uids, setsid children included; the next run of the agent removes what the dead
    // run left on disk.
    run_python(&c, "bomb2", BOMB, &[]).await;
    let bomb2 = contained(&c, "bomb2").await;
    let uid2 = bomb2.uid.expect("bomb2 uid");
    assert!(!pids_of_uid(uid2).is_empty());
    c.kill_agent(0);
    wait_until(
        "no process of bomb2's uid after the agent died",
        Duration::from_secs(20),
        || {
            let left = pids_of_uid(uid2);
            async move {
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} left: {left:?}", left.len()))
                }
            }
        },
    )
    .await;
    let dead_scope = bomb2.workdir.unwrap().parent().unwrap().to_path_buf();
    assert!(
        dead_scope.exists(),
        "a SIGKILLed agent cleans nothing itself"
    );
    let token = c.join_token();
    c.agents[0] = Some(c.spawn_agent(0, &token));
    c.wait_nodes_ready(1).await;
    let stale: Vec<PathBuf> = std::iter::once(dead_scope).chain(bomb2.cgroup).collect();
    wait_until(
        "the dead run's scope removed",
        Duration::from_secs(20),
        || {
            let left: Vec<_> = stale.iter().filter(|p| p.exists()).cloned().collect();
            async move {
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{left:?}"))
                }
            }
        },
    )
    .await;
}
