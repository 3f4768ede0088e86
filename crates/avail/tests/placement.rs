//! Tag-based placement end to end: `avail node tag` changes where new workloads land,
//! `--dry-run` shows the plan (both replicas for ft) and creates nothing, an
//! unplaceable request exits 2 with the explanation, and the operator's tags outlive
//! an agent's restart.

use std::time::Duration;

use avail_model::{Node, Workload};
use avail_testkit::{Cluster, ok, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_avail");

fn run(c: &Cluster, name: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--detach"];
    args.extend_from_slice(extra);
    c.run_wasm(name, "counter", &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_tags_steer_placements_and_dry_run_changes_nothing() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    ok(&c.cli(&["node", "tag", "node-3", "perf=high", "tier=gold"]));
    let n: Node = c.client().get("/v1/nodes/node-3").await.unwrap();
    assert_eq!(n.tags.get("perf").map(String::as_str), Some("high"));

    // Dry run: the plan, nothing created.
    let out = ok(&run(
        &c,
        "a",
        &["--constraint", "perf == high", "--dry-run"],
    ));
    assert!(out.contains("would run on node-3"), "{out}");
    let ws: Vec<Workload> = c.client().get("/v1/workloads").await.unwrap();
    assert!(ws.is_empty(), "a dry run creates nothing: {ws:?}");

    ok(&run(&c, "a", &["--constraint", "perf == high"]));
    let w: Workload = c.client().get("/v1/workloads/a").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-3"));

    // Move the tag: new placements follow.
    ok(&c.cli(&["node", "tag", "node-3", "perf-"]));
    ok(&c.cli(&["node", "tag", "node-1", "perf=high"]));
    ok(&run(&c, "b", &["--constraint", "perf == high"]));
    let w: Workload = c.client().get("/v1/workloads/b").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-1"));

    // ft dry run: both replicas, on two racks.
    let out = ok(&run(&c, "p", &["--level", "ft", "--dry-run"]));
    assert!(out.contains("its secondary on node-"), "{out}");

    // Unplaceable: exit 2 with counts and a note about the tag nobody has.
    let out = run(&c, "g", &["--constraint", "gpu exists", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("3 nodes: 3 filtered by constraint gpu exists")
            && err.contains("no node has the tag \"gpu\""),
        "{err}"
    );
    // Version comparisons.
    ok(&c.cli(&["node", "tag", "node-2", "kernel=6.10"]));
    ok(&c.cli(&["node", "tag", "node-1", "kernel=6.9"]));
    let out = ok(&run(
        &c,
        "k",
        &["--constraint", "kernel >= 6.10", "--dry-run"],
    ));
    assert!(out.contains("would run on node-2"), "{out}");

    // Spread takes the empty node-2; pack one of the two that run a workload (node-1
    // and node-3 tie; the name that sorts first wins).
    let out = ok(&run(&c, "q", &["--dry-run"]));
    assert!(out.contains("would run on node-2"), "{out}");
    let out = ok(&run(&c, "q", &["--policy", "pack", "--dry-run"]));
    assert!(out.contains("would run on node-1"), "{out}");
    let out = c.run_wasm("q", "counter", &["--policy", "tight"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("placement.policy"));

    // Bad input: a bad tag, an unknown node, an unknown operator.
    let out = c.cli(&["node", "tag", "node-1", "bad key=x"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&["node", "tag", "node-9", "a=b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = run(&c, "x", &["--constraint", "zone ~= tokyo", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("placement.constraints[0]"));

    // The operator's tags outlive the agent's restart (its rejoin declares its own).
    c.kill_agent(0);
    let token = c.join_token();
    c.agents[0] = Some(c.spawn_agent(0, &token));
    let api = c.client();
    wait_until("node-1 rejoined", Duration::from_secs(20), || {
        let api = api.clone();
        async move {
            let evs: serde_json::Value = api
                .get("/v1/events?limit=1000")
                .await
                .map_err(|e| e.to_string())?;
            let rejoined = evs.as_array().is_some_and(|a| {
                a.iter()
                    .any(|e| e["kind"] == "node.rejoined" && e["node"] == "node-1")
            });
            if rejoined {
                Ok(())
            } else {
                Err(evs.to_string())
            }
        }
    })
    .await;
    let n: Node = api.get("/v1/nodes/node-1").await.unwrap();
    assert_eq!(
        n.tags.get("perf").map(String::as_str),
        Some("high"),
        "{n:?}"
    );
    assert_eq!(
        n.tags.get("zone").map(String::as_str),
        Some("tokyo"),
        "{n:?}"
    );
}
