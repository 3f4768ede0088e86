//! Three servers on a three-member etcd (real processes): every server serves the API,
//! one leads, the agents and the CLI know all three. The control plane survives the
//! loss of any server and of an etcd member, with the workloads untouched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use avail_model::token::{JoinTokenCreated, JoinTokenInfo, JoinTokenRequest};
use avail_model::{Phase, Workload};
use avail_store::etcd_process::EtcdCluster;
use avail_testkit::{Cluster, ok, wait_until};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

async fn three_servers(etcd: &EtcdCluster) -> Cluster {
    Cluster::start_servers(
        BIN.as_ref(),
        3,
        3,
        vec![],
        vec!["--store".into(), etcd.store_flag()],
    )
    .await
}

/// The server that leads, once all that answer agree on it.
async fn leader(c: &Cluster, alive: &[usize]) -> usize {
    wait_until("one leader", Duration::from_secs(20), || async {
        let mut seen = Vec::new();
        for &i in alive {
            seen.push(c.leader_index(i).await);
        }
        match seen.first() {
            Some(Some(l)) if seen.iter().all(|s| *s == Some(*l)) => Ok(*l),
            _ => Err(format!("leaders seen: {seen:?}")),
        }
    })
    .await
}

/// A loop of `POST /w/<name>/incr` through `ingress`, every 20 ms until `stop`: the
/// statuses (and bodies of failures) it got.
fn load(
    ingress: String,
    name: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let path = format!("/w/{name}/incr");
    tokio::spawn(async move {
        let client =
            avail_client::Client::new(&ingress, None, None).with_timeout(Duration::from_secs(5));
        let mut failures = Vec::new();
        let mut last = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match client.raw(Method::POST, &path, None, &[]).await {
                Ok(r) if r.status == 200 => {
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                    let n = v["value"].as_u64().unwrap();
                    if n != last + 1 {
                        failures.push(format!("counter went from {last} to {n}"));
                    }
                    last = n;
                }
                Ok(r) => failures.push(format!(
                    "{}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )),
                Err(e) => failures.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failures
    })
}

/// A loop of API writes (join tokens created) through a client of every server, every
/// 50 ms until `stop`: the ids of those acknowledged.
fn writes(c: &Cluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<String>> {
    writes_with(c.client(), stop)
}

/// [`writes`] through `client`.
fn writes_with(
    client: avail_client::Client,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let client = client.with_timeout(Duration::from_secs(5));
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let req = JoinTokenRequest {
                ttl_s: 600,
                uses: 1,
                description: format!("load {n}"),
            };
            if let Ok(t) = client.post::<_, JoinTokenCreated>("/v1/tokens", &req).await {
                acked.push(t.info.id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        acked
    })
}

/// Stop the loads: every workload request was served, and every acknowledged API
/// write is there.
async fn end_load(
    c: &Cluster,
    stop: &AtomicBool,
    requests: tokio::task::JoinHandle<Vec<String>>,
    acked: tokio::task::JoinHandle<Vec<String>>,
) {
    stop.store(true, Ordering::Relaxed);
    let failures = requests.await.unwrap();
    assert!(
        failures.is_empty(),
        "workload requests failed: {failures:?}\n{}",
        agent_logs(c)
    );
    let acked = acked.await.unwrap();
    assert!(
        acked.len() > 20,
        "only {} API writes acknowledged",
        acked.len()
    );
    assert_all_present(c, &acked).await;
}

/// The last lines of every agent's log, for a failure's message.
fn agent_logs(c: &Cluster) -> String {
    let mut out = String::new();
    for i in 0..3 {
        let name = Cluster::agent_name(i);
        let log =
            std::fs::read_to_string(c.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        out.push_str(&format!("--- {name}\n{}\n", tail.join("\n")));
    }
    out
}

async fn assert_all_present(c: &Cluster, acked: &[String]) {
    let listed: Vec<JoinTokenInfo> = c.client().get("/v1/tokens").await.unwrap();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !listed.iter().any(|t| &t.id == *id))
        .collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

/// Workload `name` still runs its first copy (never restarted).
async fn assert_untouched(c: &Cluster, name: &str) -> Workload {
    let w: Workload = c
        .client()
        .get(&format!("/v1/workloads/{name}"))
        .await
        .unwrap();
    assert_eq!(
        w.status.incarnation, 1,
        "{name} was restarted: {:?}",
        w.status
    );
    w
}

/// `run_wasm` of the counter at `ha` with `constraint`.
fn run_counter(c: &Cluster, name: &str, constraint: &str) {
    ok(&c.run_wasm(
        name,
        "counter",
        &["--level", "ha", "--constraint", constraint],
    ));
}

async fn node_of(c: &Cluster, name: &str) -> (String, u64) {
    let w = c
        .wait_workload(name, "running", Duration::from_secs(30), |w| {
            if w.status.phase == Phase::Running {
                Ok(w.clone())
            } else {
                Err(format!("{:?}", w.status))
            }
        })
        .await;
    (w.status.node.unwrap(), w.status.incarnation)
}

/// SIGKILL of the leading server under client and API load: another leads, every
/// workload request is served (by the same copy: the counter never skips), every
/// acknowledged API write is there, and an `ha` host that dies during the leader change
/// is still restarted elsewhere (after the new leader's grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_under_load_and_nothing_is_lost() {
    let etcd = EtcdCluster::start(3);
    let mut c = three_servers(&etcd).await;
    // steady on node-2 (rack r2) serves the load; victim on a tokyo node loses its host.
    run_counter(&c, "steady", "rack == r2");
    run_counter(&c, "victim", "zone == tokyo");
    let (steady_node, _) = node_of(&c, "steady").await;
    assert_eq!(steady_node, "node-2");
    let (victim_node, _) = node_of(&c, "victim").await;
    let victim_host = avail_testkit::ft::index(&victim_node);

    let stop = Arc::new(AtomicBool::new(false));
    let requests = load(c.ingress(1), "steady", stop.clone());
    let acked = writes(&c, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let old = leader(&c, &[0, 1, 2]).await;
    let killed = Instant::now();
    c.kill_server_at(old);
    c.kill_agent(victim_host);
    let alive: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let new = wait_until("a new leader", Duration::from_secs(20), || async {
        match c.leader_index(alive[0]).await {
            Some(l) if l != old => Ok(l),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eprintln!(
        "server {new} leads {:?} after the SIGKILL of {old}",
        killed.elapsed()
    );

    // The victim is restarted on the other tokyo node.
    let w = c
        .wait_workload(
            "victim",
            "restarted elsewhere",
            Duration::from_secs(40),
            |w| {
                if w.status.phase == Phase::Running
                    && w.status.node.as_deref() != Some(&victim_node)
                {
                    Ok(w.clone())
                } else {
                    Err(format!("{:?}", w.status))
                }
            },
        )
        .await;
    assert!(w.status.incarnation >= 2, "{:?}", w.status);

    // A few seconds of the new leader, then the tally.
    tokio::time::sleep(Duration::from_secs(2)).await;
    end_load(&c, &stop, requests, acked).await;
    let w = assert_untouched(&c, "steady").await;
    assert_eq!(w.status.node.as_deref(), Some("node-2"));
}

/// An etcd member lost, then every server restarted in turn (a rolling restart): the
/// API answers throughout from the servers left, the nodes stay ready, and the
/// workload keeps its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_member_and_each_server_in_turn_can_go() {
    let mut etcd = EtcdCluster::start(3);
    let mut c = three_servers(&etcd).await;
    run_counter(&c, "steady", "rack == r2");
    node_of(&c, "steady").await;
    let stop = Arc::new(AtomicBool::new(false));
    let requests = load(c.ingress(1), "steady", stop.clone());
    let acked = writes(&c, stop.clone());

    // One etcd member (the etcd leader, the worst one) dies.
    let gone = etcd.leader().unwrap_or(0);
    etcd.kill(gone);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.wait_nodes_ready(3).await;

    // Each server in turn: SIGTERM (it resigns), back on its data dir.
    for i in 0..3 {
        c.stop_server_at(i).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.start_server_at(i).await;
        leader(&c, &[0, 1, 2]).await;
    }
    c.wait_nodes_ready(3).await;
    end_load(&c, &stop, requests, acked).await;
    assert_untouched(&c, "steady").await;
}

/// etcd's quorum lost for 10 s (two of three members down): every server says it is
/// not ready, the workloads keep serving (an `ha` one and an `ft` pair), nothing is
/// declared down or restarted; when the quorum is back, so is the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_etcd_quorum_stops_decisions_not_workloads() {
    let mut etcd = EtcdCluster::start(3);
    let c = three_servers(&etcd).await;
    run_counter(&c, "steady", "rack == r2");
    ok(&c.run_wasm("pair", "counter", &["--level", "ft"]));
    node_of(&c, "steady").await;
    let (pair_node, _) = node_of(&c, "pair").await;
    let pair_entry = (avail_testkit::ft::index(&pair_node) + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let requests = load(c.ingress(1), "steady", stop.clone());
    let pair_requests = load(c.ingress(pair_entry), "pair", stop.clone());
    let acked = writes(&c, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let lost = Instant::now();
    etcd.kill(0);
    etcd.kill(1);
    wait_until("no server ready", Duration::from_secs(10), || async {
        let mut ready = Vec::new();
        for i in 0..3 {
            let r = c
                .client_at(i)
                .with_timeout(Duration::from_secs(3))
                .get_bytes("/readyz")
                .await;
            if r.is_ok() {
                ready.push(i);
            }
        }
        if ready.is_empty() {
            Ok(())
        } else {
            Err(format!("ready: {ready:?}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(lost.elapsed())).await;
    etcd.restart(0);
    etcd.restart(1);
    eprintln!("quorum back after {:?}", lost.elapsed());
    leader(&c, &[0, 1, 2]).await;
    c.wait_nodes_ready(3).await;
    // Past the new leader's grace: still nothing declared down.
    tokio::time::sleep(Duration::from_secs(6)).await;

    stop.store(true, Ordering::Relaxed);
    let pair_failures = pair_requests.await.unwrap();
    assert!(
        pair_failures.is_empty(),
        "ft requests failed: {pair_failures:?}\n{}",
        agent_logs(&c)
    );
    end_load(&c, &stop, requests, acked).await;
    for name in ["steady", "pair"] {
        assert_untouched(&c, name).await;
    }
    let events: Vec<avail_model::ClusterEvent> = c.client().get("/v1/events").await.unwrap();
    let downs: Vec<_> = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                avail_model::EventKind::NodeDown | avail_model::EventKind::WorkloadFailed
            )
        })
        .collect();
    assert!(downs.is_empty(), "{downs:?}");
}

/// Blue/green: a green pair of servers joins the blue pair's cluster on the same etcd;
/// the agents, started knowing only blue, learn of green from their heartbeat answers;
/// blue stops; green leads and serves, the workload untouched (the same copy serving
/// all along) and no acknowledged API write lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_servers_take_over_from_blue() {
    let etcd = EtcdCluster::start(3);
    let mut c = Cluster::start_servers(
        BIN.as_ref(),
        2,
        3,
        vec![],
        vec!["--store".into(), etcd.store_flag()],
    )
    .await;
    run_counter(&c, "steady", "rack == r2");
    node_of(&c, "steady").await;
    let stop = Arc::new(AtomicBool::new(false));
    let requests = load(c.ingress(1), "steady", stop.clone());
    // The API client knows all four servers (the green ones refuse connections until
    // they start).
    let everyone: Vec<String> = (0..4).map(|i| c.server_url_at(i)).collect();
    let api = avail_client::Client::with_tls(
        &everyone.join(","),
        Some(c.admin_token.clone()),
        None,
        Some(c.tls()),
    );
    let acked = writes_with(api.clone(), stop.clone());

    // Green joins.
    let (g1, g2) = (c.add_server().await, c.add_server().await);
    wait_until(
        "four servers registered",
        Duration::from_secs(10),
        || async {
            let cp: avail_model::api::ControlPlane = c
                .client_at(g1)
                .get("/v1/cluster/control")
                .await
                .map_err(|e| e.to_string())?;
            if cp.servers.len() == 4 {
                Ok(())
            } else {
                Err(format!("{:?}", cp.servers))
            }
        },
    )
    .await;
    // A few heartbeats: every agent has been told of green.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Blue stops.
    c.stop_server_at(0).await;
    c.stop_server_at(1).await;
    let lead = wait_until("green leads", Duration::from_secs(20), || async {
        match c.leader_index(g1).await {
            Some(l) if l == g1 || l == g2 => Ok(l),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eprintln!("server {lead} (green) leads");
    // The nodes stay ready, heard by green alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nodes: Vec<avail_model::Node> = c.client_at(g2).get("/v1/nodes").await.unwrap();
    assert!(
        nodes
            .iter()
            .all(|n| n.state == avail_model::NodeState::Ready),
        "{nodes:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let failures = requests.await.unwrap();
    assert!(
        failures.is_empty(),
        "workload requests failed: {failures:?}\n{}",
        agent_logs(&c)
    );
    let acked = acked.await.unwrap();
    assert!(
        acked.len() > 20,
        "only {} API writes acknowledged",
        acked.len()
    );
    let listed: Vec<JoinTokenInfo> = c.client_at(g2).get("/v1/tokens").await.unwrap();
    assert!(acked.iter().all(|id| listed.iter().any(|t| &t.id == id)));
    let w: Workload = c.client_at(g2).get("/v1/workloads/steady").await.unwrap();
    assert_eq!(
        w.status.incarnation, 1,
        "steady was restarted: {:?}",
        w.status
    );
}

/// A newer build raised the cluster's records to a schema this build does not read: a
/// server of this build refuses to join, naming both schemas, and the running one is
/// not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_older_than_the_records_refuses_to_start() {
    let etcd = EtcdCluster::single();
    let c = Cluster::start_servers(
        BIN.as_ref(),
        1,
        1,
        vec![],
        vec!["--store".into(), etcd.store_flag()],
    )
    .await;
    let store = avail_store::EtcdStore::connect(
        &etcd.endpoints(),
        avail_store::EtcdOptions {
            key_prefix: "/avail/".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let newer = avail_server::schema::SCHEMA + 1;
    avail_store::Store::put(
        &store,
        "/config/schema",
        newer.to_string().into_bytes(),
        None,
    )
    .await
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "server",
            "--data-dir",
            c.server_dir_at(1).to_str().unwrap(),
            "--listen",
            &format!("{}.2:7400", c.net),
            "--store",
            &etcd.store_flag(),
            "--join-from",
            c.server_dir().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("schema {newer}"))
            && err.contains(&format!("up to schema {}", avail_server::schema::SCHEMA)),
        "{err}"
    );
    let nodes: Vec<avail_model::Node> = c.client().get("/v1/nodes").await.unwrap();
    assert_eq!(nodes.len(), 1);
}
