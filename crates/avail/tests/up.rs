//! `avail up`: one command gives a working cluster; Ctrl-C stops all of it; a second
//! `avail up` on the same data dir resumes the cluster with its workloads.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use avail_client::Client;
use avail_model::{Phase, Workload};
use avail_testkit::{Proc, free_net, pid_alive, repo_root, wait_until};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

fn cli(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("HOME", home)
        .env_remove("AVAIL_ADDR")
        .env_remove("AVAIL_TOKEN")
        .env_remove("AVAIL_CONTEXT")
        .output()
        .unwrap()
}

/// [`cli`] that must succeed: its output.
fn cli_ok(home: &Path, args: &[&str]) -> std::process::Output {
    let out = cli(home, args);
    assert!(
        out.status.success(),
        "avail {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run the counter example through the CLI (the context `avail up` wrote: no flags).
fn run_counter(home: &Path) {
    let counter = repo_root(env!("CARGO_MANIFEST_DIR")).join("examples/counter.toml");
    cli_ok(home, &["workload", "run", "-f", counter.to_str().unwrap()]);
}

async fn start_up(home: &Path, data: &Path, net: &str) -> (Proc, serde_json::Value) {
    start_up_with(home, data, net, &[]).await
}

async fn start_up_with(
    home: &Path,
    data: &Path,
    net: &str,
    extra: &[&str],
) -> (Proc, serde_json::Value) {
    let cluster_file = data.join("cluster.json");
    let _ = std::fs::remove_file(&cluster_file);
    let args: Vec<String> = ["up", "--nodes", "2", "--net", net, "--data-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([data.display().to_string()])
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
    let log = home.join(format!(
        "up-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut up = Proc::spawn_with_env(Path::new(BIN), &args, &[("HOME", home)], &log);
    let cluster = wait_until("cluster.json", Duration::from_secs(60), || {
        let running = up.running();
        let f = cluster_file.clone();
        async move {
            if !running {
                return Err("avail up exited".into());
            }
            let text = std::fs::read_to_string(&f).map_err(|e| e.to_string())?;
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())
        }
    })
    .await;
    (up, cluster)
}

#[tokio::test]
async fn up_runs_a_cluster_stops_cleanly_and_resumes() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    let net = free_net();
    let (mut up, cluster) = start_up(home.path(), &data, &net).await;
    let agents = cluster["agents"].as_array().unwrap().clone();
    assert_eq!(agents.len(), 2);
    assert_eq!(cluster["server_url"], format!("https://{net}.1:7400"));
    assert!(Path::new(cluster["token_file"].as_str().unwrap()).exists());
    // One join token for the new nodes, used up by them.
    let tokens = cli(home.path(), &["token", "list", "-o", "json"]);
    let tokens: serde_json::Value = serde_json::from_slice(&tokens.stdout).unwrap();
    assert_eq!(tokens[0]["uses_left"], 0, "{tokens}");
    assert_eq!(tokens[0]["used"], 2, "{tokens}");

    // The CLI finds the cluster through the context `avail up` wrote: no flags.
    run_counter(home.path());
    let ingress = agents[1]["ingress_url"].as_str().unwrap().to_string();
    let r = Client::new(&ingress, None, None)
        .raw(Method::POST, "/w/counter/incr", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Ctrl-C: everything stops.
    up.signal(libc::SIGINT);
    let status = up.child.wait().unwrap();
    assert!(
        status.success(),
        "avail up exit: {status:?}\n{}",
        up.output()
    );
    for a in &agents {
        let pid = a["pid"].as_i64().unwrap() as i32;
        wait_until("agent gone", Duration::from_secs(10), || async move {
            if pid_alive(pid) {
                Err(format!("{pid} alive"))
            } else {
                Ok(())
            }
        })
        .await;
    }

    // Resume: same data dir, the workload comes back and runs.
    let (mut up2, cluster2) = start_up(home.path(), &data, &net).await;
    let token = std::fs::read_to_string(cluster2["token_file"].as_str().unwrap()).unwrap();
    let ca = std::fs::read_to_string(cluster2["ca_file"].as_str().unwrap()).unwrap();
    let api = Client::with_tls(
        cluster2["server_url"].as_str().unwrap(),
        Some(token.trim().to_string()),
        None,
        Some(avail_tls::client_config(&ca, None).unwrap()),
    );
    // The nodes came back with their keys: no new join token was made.
    let tokens = cli(home.path(), &["token", "list", "-o", "json"]);
    let tokens: serde_json::Value = serde_json::from_slice(&tokens.stdout).unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 1, "{tokens}");
    wait_until("counter running again", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let w: Workload = api
                .get("/v1/workloads/counter")
                .await
                .map_err(|e| e.to_string())?;
            if w.status.phase == Phase::Running {
                Ok(())
            } else {
                Err(format!("{:?}", w.status))
            }
        }
    })
    .await;
    let r = Client::new(&ingress, None, None)
        .raw(Method::POST, "/w/counter/incr", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // A new run of the workload: a new incarnation, fresh state (level none).
    assert_eq!(r.headers.get("avail-incarnation").unwrap(), "2");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["value"], 1);
    up2.signal(libc::SIGINT);
    assert!(up2.child.wait().unwrap().success());
}

/// The pids of the processes whose command line contains `pattern`.
fn pids(pattern: &str) -> Vec<i32> {
    let out = Command::new("pgrep")
        .args(["-f", "--", pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `avail up --servers 3`: a 3-member etcd and three servers; the CLI (through the
/// context) and the agents know all three, so the cluster goes on when one server is
/// killed; Ctrl-C stops everything, etcd included, and a second run resumes it.
#[tokio::test]
async fn up_with_three_servers_outlives_one_and_resumes() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    let net = free_net();
    let (mut up, cluster) = start_up_with(home.path(), &data, &net, &["--servers", "3"]).await;
    let urls: Vec<String> = (1..=3).map(|i| format!("https://{net}.{i}:7400")).collect();
    assert_eq!(cluster["server_url"], urls.join(","));
    let out = cli_ok(home.path(), &["cluster", "control", "-o", "json"]);
    let cp: avail_model::api::ControlPlane = serde_json::from_slice(&out.stdout).unwrap();
    let leader = cp.leader.expect("a leader");
    run_counter(home.path());
    let ingress = cluster["agents"][1]["ingress_url"]
        .as_str()
        .unwrap()
        .to_string();
    let incr = || async {
        let r = Client::new(&ingress, None, None)
            .raw(Method::POST, "/w/counter/incr", None, &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    };
    incr().await;

    // The leading server dies: the CLI goes on through the others, a new leader
    // comes, and the workload is served all along.
    let dir_of = |addr: &str| {
        let i: usize = addr
            .split(':')
            .next()
            .unwrap()
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        match i {
            1 => data.join("server"),
            i => data.join(format!("server-{}", i - 1)),
        }
    };
    let leader_dir = dir_of(&leader.addr);
    let killed = pids(&format!("--data-dir {} ", leader_dir.display()));
    assert_eq!(killed.len(), 1, "{killed:?}");
    unsafe {
        libc::kill(killed[0], libc::SIGKILL);
    }
    incr().await;
    let home_path = home.path().to_path_buf();
    wait_until("a new leader", Duration::from_secs(20), || {
        let home = home_path.clone();
        let old = leader.server.clone();
        async move {
            let out = cli(&home, &["cluster", "control", "-o", "json"]);
            let cp: avail_model::api::ControlPlane =
                serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            match cp.leader {
                Some(l) if l.server != old => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    incr().await;
    cli_ok(home.path(), &["node", "list"]);

    // Ctrl-C: up says a server exited already; everything stops, etcd included.
    up.signal(libc::SIGINT);
    let _ = up.child.wait().unwrap();
    let etcd = data.join("etcd");
    wait_until("etcd stopped", Duration::from_secs(20), || {
        let left = pids(&etcd.display().to_string());
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        }
    })
    .await;

    // Resume on the same data dir: the same cluster (the workload is there).
    let (mut up2, _) = start_up_with(home.path(), &data, &net, &["--servers", "3"]).await;
    cli_ok(home.path(), &["workload", "show", "counter", "-o", "json"]);
    wait_until("counter running again", Duration::from_secs(30), || async {
        let r = Client::new(&ingress, None, None)
            .raw(Method::POST, "/w/counter/incr", None, &[])
            .await
            .map_err(|e| e.to_string())?;
        if r.status == 200 {
            Ok(())
        } else {
            Err(format!("{}", r.status))
        }
    })
    .await;
    up2.signal(libc::SIGINT);
    assert!(up2.child.wait().unwrap().success(), "{}", up2.output());
}
