//! Level `ha` (first increment of issue 6): when a node dies, its `ha` workloads are
//! restarted on another node as a new incarnation, the highest priority first; other
//! workloads on it are reported failed.

use std::time::{Duration, Instant};

use avail_model::{Phase, Workload};
use avail_testkit::{Cluster, ok};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

/// Level ha on node-1: tokyo is node-1 and node-3, and pack ties to the first name, so
/// restarts go to node-3 (the other rack).
const HA_ON_NODE_1: &[&str] = &[
    "--level",
    "ha",
    "--constraint",
    "zone == tokyo",
    "--policy",
    "pack",
];

/// The counter guest as `count` at level ha, on node-1 (tokyo is node-1 and node-3;
/// pack with ties to the first name): its restarts go to node-3.
fn run_count_ha(c: &Cluster) {
    ok(&c.run_wasm("count", "counter", HA_ON_NODE_1));
}

async fn running_elsewhere(c: &Cluster, name: &str, not: &str) -> Workload {
    c.wait_workload(
        name,
        &format!("running off {not}"),
        Duration::from_secs(30),
        |w| {
            if w.status.phase == Phase::Running && w.status.node.as_deref() != Some(not) {
                Ok(w.clone())
            } else {
                Err(format!("{:?}", w.status))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_workloads_restart_elsewhere_when_their_node_dies() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    // Both on node-1 (rack r1), at level ha: a wasm guest and a process; a none
    // workload beside them for contrast.
    run_count_ha(&c);
    ok(&c.run_web("web", HA_ON_NODE_1));
    ok(&c.run_wasm(
        "plain",
        "counter",
        &["--constraint", "zone == tokyo", "--policy", "pack"],
    ));
    let api = c.client();
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    let victim = w.status.node.clone().unwrap();
    for n in ["web", "plain"] {
        let x: Workload = api.get(&format!("/v1/workloads/{n}")).await.unwrap();
        assert_eq!(
            x.status.node.as_deref(),
            Some(victim.as_str()),
            "pack puts {n} beside count"
        );
    }
    let entry = avail_testkit::Cluster::agent_name(1);
    assert_ne!(entry, victim);
    let ingress = avail_client::Client::new(&c.ingress(1), None, None);
    let r = ingress
        .raw(Method::POST, "/w/count/incr", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // Its restart capacity is held on the other tokyo node (another rack), where its
    // standby takes a checkpoint every second.
    let acked = c
        .wait_workload(
            "count",
            "a reservation on node-3 with a standby in step",
            Duration::from_secs(10),
            |w| match (
                w.status.reservation.as_deref(),
                w.status.level_state.map(|s| s.to_string()).as_deref(),
                &w.status.ft,
            ) {
                (Some("node-3"), Some("ha:protected"), Some(ft)) => Ok(ft.acked_epoch),
                _ => Err(format!("{:?}", w.status)),
            },
        )
        .await;
    // Two more checkpoints acknowledged: the increment is in one of them.
    c.wait_workload(
        "count",
        "two more checkpoints",
        Duration::from_secs(10),
        |w| match &w.status.ft {
            Some(ft) if ft.acked_epoch >= acked + 2 => Ok(()),
            _ => Err(format!("{:?}", w.status)),
        },
    )
    .await;
    let killed = Instant::now();
    let i = victim.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    c.kill_agent(i);
    for name in ["count", "web"] {
        let w = running_elsewhere(&c, name, &victim).await;
        assert_eq!(
            w.status.incarnation, 2,
            "{name}: a new incarnation: {:?}",
            w.status
        );
        // zone == tokyo: node-3 is the other tokyo node.
        assert_eq!(
            w.status.node.as_deref(),
            Some("node-3"),
            "{name}: {:?}",
            w.status
        );
    }
    eprintln!(
        "ha restarts running {:.1} s after the SIGKILL",
        killed.elapsed().as_secs_f64()
    );
    // It answers from the new node, as the new incarnation, resumed from its standby's
    // last checkpoint: the increment is still there.
    let r = ingress
        .raw(Method::GET, "/w/count/value", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["value"], 1, "state from the checkpoint: {v}");
    assert_eq!(r.headers.get("avail-node").unwrap(), "node-3");
    assert_eq!(r.headers.get("avail-incarnation").unwrap(), "2");
    let r = ingress
        .raw(Method::GET, "/w/web/", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // The none workload is reported failed, not moved.
    let p: Workload = api.get("/v1/workloads/plain").await.unwrap();
    assert_eq!(p.status.phase, Phase::Failed, "{:?}", p.status);
    assert_eq!(p.status.node.as_deref(), Some(victim.as_str()));
    // The reservation was used; no other tokyo node is left for a new one.
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    assert_eq!(w.status.reservation, None, "{:?}", w.status);
    // The restart is an event naming the lost node.
    let evs: serde_json::Value = api.get("/v1/workloads/count/events").await.unwrap();
    assert!(
        evs.to_string().contains("workload.restarted")
            && evs.to_string().contains(&format!("node {victim} is down")),
        "{evs}"
    );
}

/// Two ha workloads on a node that dies, room for only one on the other node their
/// constraint allows: the higher priority takes it; the other waits pending with the
/// explanation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_go_in_priority_order_when_capacity_is_short() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    let run = |name: &str, extra: &[&str]| ok(&c.run_wasm(name, "counter", extra));
    // Both on node-1 (pack; tokyo is node-1 and node-3), 1500 of 4000 cpu millis each.
    for (name, prio) in [("low", "1"), ("high", "9")] {
        run(
            name,
            &[
                "--level",
                "ha",
                "--priority",
                prio,
                "--constraint",
                "zone == tokyo",
                "--policy",
                "pack",
                "--cpu-millis",
                "1500",
            ],
        );
    }
    let api = c.client();
    for name in ["low", "high"] {
        let w: Workload = api.get(&format!("/v1/workloads/{name}")).await.unwrap();
        assert_eq!(w.status.node.as_deref(), Some("node-1"), "{name}");
    }
    // node-3 keeps room for one of them only.
    run(
        "fill",
        &["--constraint", "rack == r3", "--cpu-millis", "2500"],
    );
    c.kill_agent(0);
    let _ = running_elsewhere(&c, "high", "node-1").await;
    c.wait_pending("low", "short of cpu").await;
}

/// SIGSTOP of the agent running an ha workload for longer than its lease: the server
/// restarts the workload elsewhere; after SIGCONT the stale copy never answers (the
/// woken node refuses while its last contact is older than the isolation window, and
/// the desired state that waited for it moves the workload away), and its late reports
/// do not move the workload back. The partition test below is the one that needs
/// fencing proper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_does_not_serve_its_stale_copy() {
    let c = Cluster::start(BIN.as_ref(), 3).await;
    run_count_ha(&c);
    let api = c.client();
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-1"));
    let stopped = c.agents[0].as_ref().unwrap();
    stopped.signal(libc::SIGSTOP);
    let moved = running_elsewhere(&c, "count", "node-1").await;
    assert_eq!(moved.status.node.as_deref(), Some("node-3"));
    stopped.signal(libc::SIGCONT);
    // For 4 s after waking, node-1 never answers as the workload.
    let at_node1 =
        avail_client::Client::new(&c.ingress(0), None, None).with_timeout(Duration::from_secs(3));
    let end = Instant::now() + Duration::from_secs(4);
    let mut served_elsewhere = 0;
    while Instant::now() < end {
        if let Ok(r) = at_node1.raw(Method::GET, "/w/count/value", None, &[]).await {
            let node = r
                .headers
                .get("avail-node")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            assert_ne!(node, "node-1", "the stale copy answered: {}", r.status);
            if r.status == 200 {
                served_elsewhere += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served_elsewhere > 0,
        "node-1 forwards to the new copy once it has caught up"
    );
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-3"), "{:?}", w.status);
    assert_eq!(w.status.incarnation, 2);
}

/// A node cut off from the server and every peer (iptables on its loopback address):
/// it fences its ha workloads before its lease runs out, the server restarts them
/// elsewhere, and while the cut lasts the cut-off node never answers as the workload
/// (two copies never serve at once). After the cut heals, the node serves nothing stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_fences_its_ha_workloads() {
    use avail_testkit::LinkCut;
    let c = Cluster::start(BIN.as_ref(), 3).await;
    run_count_ha(&c);
    let api = c.client();
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-1"));
    let me = c.agent_addr(0);
    let server = format!("{}.1", c.net);
    let cuts: Vec<LinkCut> = [server, c.agent_addr(1), c.agent_addr(2)]
        .iter()
        .map(|other| LinkCut::new(&me, other))
        .collect();
    let moved = running_elsewhere(&c, "count", "node-1").await;
    assert_eq!(moved.status.node.as_deref(), Some("node-3"));
    // The test reaches node-1 from 127.0.0.1, which is not cut: it must refuse.
    let at_node1 =
        avail_client::Client::new(&c.ingress(0), None, None).with_timeout(Duration::from_secs(2));
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if let Ok(r) = at_node1.raw(Method::GET, "/w/count/value", None, &[]).await {
            assert_ne!(
                r.status, 200,
                "the cut-off node served the workload while it runs on node-3"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(cuts);
    // Healed: node-1 forwards to the live copy; nothing stale answers.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if let Ok(r) = at_node1.raw(Method::GET, "/w/count/value", None, &[]).await
            && r.status == 200
        {
            assert_eq!(r.headers.get("avail-node").unwrap(), "node-3");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-3"), "{:?}", w.status);
    // Heard again, node-1 reports its fence: an event naming what it stopped.
    let evs: serde_json::Value = api.get("/v1/events?limit=1000").await.unwrap();
    let fenced = evs
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "node.fenced")
        .unwrap_or_else(|| panic!("no node.fenced event: {evs}"));
    assert_eq!(fenced["node"], "node-1", "{fenced}");
    assert!(
        fenced["message"].as_str().unwrap().contains("count"),
        "{fenced}"
    );
}

/// The control plane away is not a partition: with the server down longer than the
/// lease, the agents see that their peers lost it too, so the ha workload keeps serving
/// and is not stopped; when the server comes back, nothing is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outage_restarts_nothing() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    run_count_ha(&c);
    // No other workload: the agents know each other from the node list.
    let at_node1 = avail_client::Client::new(&c.ingress(0), None, None);
    let r = at_node1
        .raw(Method::POST, "/w/count/incr", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    c.kill_server();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Still served, from the same copy (the counter kept its value).
    let r = at_node1
        .raw(Method::GET, "/w/count/value", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers.get("avail-incarnation").unwrap(), "1");
    assert_eq!(String::from_utf8_lossy(&r.body), r#"{"value":1}"#);
    c.start_server().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let w: Workload = c.client().get("/v1/workloads/count").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-1"), "{:?}", w.status);
    assert_eq!(w.status.incarnation, 1, "{:?}", w.status);
    let r = at_node1
        .raw(Method::GET, "/w/count/value", None, &[])
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        r#"{"value":1}"#,
        "not restarted"
    );
}

/// The restart goes to the node holding the reservation, even when another node is
/// less loaded; equal priorities do not take reserved capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_go_to_the_reserved_node_first() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    ok(&c.run_wasm(
        "count",
        "counter",
        &["--level", "ha", "--cpu-millis", "1000"],
    ));
    let api = c.client();
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    let home = w.status.node.clone().unwrap();
    let reserved: String = c
        .wait_workload("count", "a reservation", Duration::from_secs(10), |w| {
            w.status
                .reservation
                .clone()
                .ok_or(format!("{:?}", w.status))
        })
        .await;
    assert_ne!(reserved, home);
    // Load the reserved node so that a plain plan (spread: the least allocated) would
    // prefer the third node; the load (same priority) must leave the reserved capacity
    // alone: 4000 - 1000 held.
    let rack = format!("rack == r{}", reserved.trim_start_matches("node-"));
    ok(&c.run_wasm(
        "load",
        "counter",
        &["--constraint", &rack, "--cpu-millis", "3000"],
    ));
    let out = c.run_wasm(
        "more",
        "counter",
        &["--constraint", &rack, "--cpu-millis", "500", "--dry-run"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "the reserved capacity is not for an equal priority"
    );
    let i = home.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    c.kill_agent(i);
    let w = running_elsewhere(&c, "count", &home).await;
    assert_eq!(
        w.status.node.as_deref(),
        Some(reserved.as_str()),
        "{:?}",
        w.status
    );
}

/// The restart target fails: the process cannot start on the node holding its
/// reservation; it is restarted on the next node, away from the one it failed on, and
/// runs there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_restart_target_gives_way_to_the_next_node() {
    let mut c = Cluster::start(BIN.as_ref(), 4).await;
    let marks = c.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let script = format!(
        "if [ -e {}/fail-$AVAIL_NODE ]; then echo cannot start on $AVAIL_NODE; exit 3; fi; exec python3 -m http.server $PORT --bind 127.0.0.1",
        marks.display()
    );
    ok(&c.run_sh("web", &script, &["--level", "ha", "--policy", "pack"]));
    let w = c
        .wait_workload("web", "a reservation", Duration::from_secs(10), |w| match (
            &w.status.node,
            &w.status.reservation,
        ) {
            (Some(n), Some(r)) => Ok((n.clone(), r.clone())),
            _ => Err(format!("{:?}", w.status)),
        })
        .await;
    let (home, reserved) = w;
    // The reserved node cannot run it.
    std::fs::write(marks.join(format!("fail-{reserved}")), b"").unwrap();
    c.kill_agent(avail_testkit::ft::index(&home));
    let w = c
        .wait_workload(
            "web",
            "running on a third node",
            Duration::from_secs(40),
            |w| {
                let n = w.status.node.as_deref();
                if w.status.phase == Phase::Running && n != Some(&home) && n != Some(&reserved) {
                    Ok(w.clone())
                } else {
                    Err(format!("{:?}", w.status))
                }
            },
        )
        .await;
    assert!(w.status.incarnation >= 3, "{:?}", w.status);
    let node = w.status.node.clone().unwrap();
    let ingress =
        avail_client::Client::new(&c.ingress(avail_testkit::ft::index(&node)), None, None);
    let r = ingress
        .raw(Method::GET, "/w/web/", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("avail-node").unwrap(), node.as_str());
    let evs: serde_json::Value = c.client().get("/v1/workloads/web/events").await.unwrap();
    let evs = evs.to_string();
    assert!(
        evs.contains(&format!("node {reserved} is failing it")),
        "{evs}"
    );
    // Exactly once: the failed target no longer holds it (its slot was taken away).
    let nodes: Vec<avail_model::Node> = c.client().get("/v1/nodes").await.unwrap();
    let at_reserved = nodes.iter().find(|n| n.name == reserved).unwrap();
    assert_eq!(at_reserved.allocated.cpu_millis, 0, "{at_reserved:?}");
}

/// Two nodes lost at once, room for only some of their ha workloads on the node left:
/// the highest priorities restart, the others wait pending with the explanation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_lost_at_once_restart_in_priority_order() {
    let small = vec!["--cpu-millis".to_string(), "1000".to_string()];
    let mut c = Cluster::start_with(BIN.as_ref(), 3, vec![vec![], vec![], small]).await;
    // node-3 takes no work while the workloads are placed: they land on node-1 and
    // node-2, their reservations on each other.
    ok(&c.cli(&["node", "drain", "node-3"]));
    for (name, prio) in [("p10", "10"), ("p20", "20"), ("p30", "30"), ("p40", "40")] {
        ok(&c.run_wasm(
            name,
            "counter",
            &["--level", "ha", "--priority", prio, "--cpu-millis", "400"],
        ));
    }
    ok(&c.cli(&["node", "undrain", "node-3"]));
    let api = c.client();
    for name in ["p10", "p20", "p30", "p40"] {
        let w: Workload = api.get(&format!("/v1/workloads/{name}")).await.unwrap();
        assert_ne!(w.status.node.as_deref(), Some("node-3"), "{name}");
    }
    c.kill_agent(0);
    c.kill_agent(1);
    // node-3 (1000 cpu millis) takes two of 400: the two highest priorities.
    for name in ["p40", "p30"] {
        c.wait_running_on(name, "node-3").await;
    }
    for name in ["p20", "p10"] {
        c.wait_pending(name, "short of cpu").await;
    }
}

/// The bank checker at level ha across a SIGKILL: the replies' incarnations never go
/// back (no stale copy answers after the new one: never two at once), the new copy runs
/// on the reserved node exactly once, resumed from its standby's checkpoint (not from
/// the initial state), and within each run every transfer is applied once, in order,
/// with the money kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bank_checker_sees_one_copy_at_a_time_across_a_host_death() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    ok(&c.run_wasm("bank", "bank", HA_ON_NODE_1));
    c.wait_workload("bank", "ha:protected", Duration::from_secs(20), |w| match (
        w.status.node.as_deref(),
        w.status.level_state.map(|s| s.to_string()).as_deref(),
    ) {
        (Some("node-1"), Some("ha:protected")) => Ok(()),
        _ => Err(format!("{:?}", w.status)),
    })
    .await;
    let ingress =
        avail_client::Client::new(&c.ingress(1), None, None).with_timeout(Duration::from_secs(20));
    let client = avail_testkit::ft::Transfers::start(ingress.clone(), "hb");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill_agent(0);
    c.wait_running_on("bank", "node-3").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replies = client.stop().await.expect("the client was served");
    let inc = |v: &serde_json::Value| v["_incarnation"].as_str().unwrap().parse::<u64>().unwrap();
    // Never back to an older run once a newer one answered.
    for w in replies.windows(2) {
        assert!(
            inc(&w[1]) >= inc(&w[0]),
            "a stale copy answered: {} then {}",
            w[0],
            w[1]
        );
    }
    let first = inc(&replies[0]);
    let last = inc(replies.last().unwrap());
    assert_eq!(last, first + 1, "one restart");
    assert!(
        replies
            .iter()
            .filter(|v| inc(v) == last)
            .all(|v| v["_node"] == "node-3")
    );
    // Within a run, one transfer after the other, each applied once.
    for run in [first, last] {
        let seqs: Vec<u64> = replies
            .iter()
            .filter(|v| inc(v) == run && v["_status"] == 200 && v["_replayed"] != true)
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "run {run}: {seqs:?}");
        }
    }
    // Resumed from a checkpoint: the new run went on from a later state than the start.
    let resumed = replies
        .iter()
        .find(|v| inc(v) == last && v["_status"] == 200)
        .and_then(|v| v["seq"].as_u64())
        .unwrap();
    assert!(
        resumed > 1,
        "the restart resumed from a checkpoint: first seq {resumed}"
    );
    let b = avail_testkit::ft::balances(&ingress).await.unwrap();
    assert_eq!(b["total"], 100000, "{b}");
}
