//! Maintenance (issue 6): `avail node drain` empties a node under client load with no
//! acknowledged request lost: wasm workloads move live at every level (an ft pair
//! hands over to its secondary), a process restarts elsewhere; `undrain` lets the node
//! take work again.

use std::collections::BTreeSet;
use std::time::Duration;

use avail_client::Client;
use avail_model::{Node, NodeState, Phase, Workload};
use avail_testkit::{Cluster, ok};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

async fn value(ingress: &Client, path: &str) -> serde_json::Value {
    let r = ingress.raw(Method::GET, path, None, &[]).await.unwrap();
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_under_load_loses_no_request() {
    let c = Cluster::start(BIN.as_ref(), 3).await;
    // Everything on node-1 (tokyo is node-1 and node-3; pack takes the first name).
    let tokyo = ["--constraint", "zone == tokyo", "--policy", "pack"];
    ok(&c.run_wasm("bank", "bank", &tokyo));
    let with = |level: &'static str| -> Vec<&str> {
        let mut a = vec!["--level", level];
        a.extend(tokyo);
        a
    };
    ok(&c.run_wasm("count", "counter", &with("ha")));
    // ft: its secondary on another rack, and after the handover a new one on the third.
    ok(&c.run_wasm("store", "kv", &["--level", "ft", "--policy", "pack"]));
    ok(&c.run_web("web", &tokyo));
    let api = c.client();
    for n in ["bank", "count", "store", "web"] {
        let w: Workload = api.get(&format!("/v1/workloads/{n}")).await.unwrap();
        assert_eq!(
            w.status.node.as_deref(),
            Some("node-1"),
            "{n}: {:?}",
            w.status
        );
    }
    avail_testkit::ft::protected(&c, "store").await;
    // The client's ingress is node-2, which is not drained.
    let ingress = Client::new(&c.ingress(1), None, None).with_timeout(Duration::from_secs(20));
    for _ in 0..3 {
        ingress
            .raw(Method::POST, "/w/count/incr", None, &[])
            .await
            .unwrap();
    }
    let r = ingress
        .raw(
            Method::PUT,
            "/w/store/kv/k",
            Some(("v1".into(), "text/plain")),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let client = avail_testkit::ft::Transfers::start(ingress.clone(), "dr");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = c.cli(&["node", "drain", "node-1", "--timeout", "60"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("drained: node-1"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = client.stop().await.expect("every transfer acknowledged");

    // Nothing is left on node-1, which takes no new work.
    let n: Node = api.get("/v1/nodes/node-1").await.unwrap();
    assert_eq!(n.state, NodeState::Draining);
    assert_eq!(n.drain.as_ref().map(|d| d.remaining), Some(0), "{n:?}");
    let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
    for w in &ws {
        assert!(
            !avail_server::state::occupies(w, "node-1"),
            "{}: {:?}",
            w.spec.name,
            w.status
        );
        assert_eq!(
            w.status.phase,
            Phase::Running,
            "{}: {:?}",
            w.spec.name,
            w.status
        );
    }

    // The bank moved live, under load: every transfer acknowledged once, in order,
    // some by each node, and the money kept.
    let nodes: BTreeSet<&str> = acked.iter().filter_map(|v| v["_node"].as_str()).collect();
    assert!(
        nodes.contains("node-1") && nodes.len() == 2,
        "answered by {nodes:?}"
    );
    let n = avail_testkit::ft::check_bank(&ingress, &acked)
        .await
        .unwrap();
    eprintln!("{n} transfers acknowledged across the drain");

    // The ha and ft workloads kept their state; the process restarted elsewhere.
    assert_eq!(value(&ingress, "/w/count/value").await["value"], 3);
    let r = ingress
        .raw(Method::GET, "/w/store/kv/k", None, &[])
        .await
        .unwrap();
    assert_eq!(&r.body[..], b"v1");
    let r = ingress
        .raw(Method::GET, "/w/web/", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let evs: serde_json::Value = api.get("/v1/workloads/bank/events").await.unwrap();
    assert!(evs.to_string().contains("workload.moved"), "{evs}");
    let w: Workload = api.get("/v1/workloads/web").await.unwrap();
    assert_eq!(
        w.status.incarnation, 2,
        "the process restarted: {:?}",
        w.status
    );

    // Undrain: it takes work again.
    ok(&c.cli(&["node", "undrain", "node-1"]));
    let n: Node = api.get("/v1/nodes/node-1").await.unwrap();
    assert_eq!(n.state, NodeState::Ready);
    assert!(n.drain.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_input_is_checked() {
    let c = Cluster::start(BIN.as_ref(), 1).await;
    let out = c.cli(&["node", "drain", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = c.cli(&["node", "drain", "--selector", "zone=mars"]);
    assert_eq!(out.status.code(), Some(2));
    let out = c.cli(&["node", "drain", "--selector", "=="]);
    assert_eq!(out.status.code(), Some(2));
    // A drain with nothing to move finishes at once; undrain restores.
    ok(&c.cli(&["node", "drain", "node-1"]));
    ok(&c.cli(&["node", "undrain", "node-1"]));
}

/// Rolling maintenance by tag: one fault domain at a time, drained, the command run
/// with its nodes named, undrained; the workloads keep answering throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_maintenance_goes_one_fault_domain_at_a_time() {
    let c = Cluster::start(BIN.as_ref(), 3).await;
    ok(&c.run_wasm(
        "count",
        "counter",
        &["--level", "ha", "--constraint", "zone == tokyo"],
    ));
    let log = c.dir.path().join("maintained");
    let exec = format!("echo \"$AVAIL_NODES $(date +%s%N)\" >> {}", log.display());
    let out = c.cli(&[
        "node",
        "maintain",
        "--selector",
        "zone=tokyo",
        "--by",
        "rack",
        "--exec",
        &exec,
        "--timeout",
        "60",
    ]);
    ok(&out);
    // tokyo is node-1 (rack r1) and node-3 (rack r3): one after the other.
    let text = std::fs::read_to_string(&log).unwrap();
    let nodes: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(nodes, ["node-1", "node-3"], "{text}");
    let api = c.client();
    let all: Vec<Node> = api.get("/v1/nodes").await.unwrap();
    assert!(
        all.iter()
            .all(|n| n.state == NodeState::Ready && n.drain.is_none()),
        "{all:?}"
    );
    let w: Workload = api.get("/v1/workloads/count").await.unwrap();
    assert_eq!(w.status.phase, Phase::Running, "{:?}", w.status);
    // A failing command stops the rolling maintenance, its domain left drained.
    let out = c.cli(&[
        "node",
        "maintain",
        "--selector",
        "zone=osaka",
        "--exec",
        "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed"));
    let n: Node = api.get("/v1/nodes/node-2").await.unwrap();
    assert_eq!(n.state, NodeState::Draining);
}
