//! Live level changes (issue 6): a wasm workload moved none -> ha -> ft -> ha -> none
//! keeps serving and keeps its state throughout, with a client sending requests the
//! whole time, and is never restarted (one incarnation, one node).

use std::time::Duration;

use avail_client::Client;
use avail_model::{Level, Phase, Workload};
use avail_testkit::{Cluster, ok};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_changes_level_live_under_load() {
    let c = Cluster::start(BIN.as_ref(), 3).await;
    ok(&c.run_wasm("bank", "bank", &["--level", "none"]));
    let api = c.client();
    let w: Workload = api.get("/v1/workloads/bank").await.unwrap();
    let home = w.status.node.clone().unwrap();
    // The client goes through an ingress that is not the workload's node.
    let entry = (0..3).find(|i| Cluster::agent_name(*i) != home).unwrap();
    let ingress = Client::new(&c.ingress(entry), None, None).with_timeout(Duration::from_secs(20));

    let client = avail_testkit::ft::Transfers::start(ingress.clone(), "lv");
    let settle = || tokio::time::sleep(Duration::from_millis(700));
    settle().await;
    for level in ["ha", "ft", "ha", "none"] {
        // The CLI waits until the new level's protection is in place.
        let out = c.cli(&["workload", "set-level", "bank", level, "--timeout", "30"]);
        ok(&out);
        let w: Workload = api.get("/v1/workloads/bank").await.unwrap();
        assert_eq!(w.spec.level.as_str(), level);
        match w.spec.level {
            Level::Ft => {
                assert_eq!(
                    w.status.level_state.map(|s| s.to_string()).as_deref(),
                    Some("ft:protected")
                );
                assert!(w.status.secondary.is_some());
                assert_eq!(w.status.reservation, None);
            }
            Level::Ha => {
                assert_eq!(
                    w.status.level_state.map(|s| s.to_string()).as_deref(),
                    Some("ha:protected")
                );
                assert!(w.status.reservation.is_some());
                assert_eq!(w.status.secondary, None);
            }
            Level::None => {
                assert_eq!(w.status.secondary, None);
                assert_eq!(w.status.reservation, None);
            }
        }
        settle().await;
    }
    let acked = client.stop().await.expect("every transfer acknowledged");
    eprintln!(
        "{} transfers acknowledged across the level changes",
        acked.len()
    );
    assert!(acked.len() > 50, "the client kept sending: {}", acked.len());

    // Served throughout by the same run on the same node: never restarted.
    for v in &acked {
        assert_eq!(v["_incarnation"], "1", "{v}");
        assert_eq!(v["_node"], home.as_str(), "{v}");
    }
    // State kept: every acknowledged transfer applied once, in order, money conserved.
    avail_testkit::ft::check_bank(&ingress, &acked)
        .await
        .unwrap();
    // Four level changes, each an event; the workload was never restarted or failed.
    let evs: serde_json::Value = api.get("/v1/workloads/bank/events").await.unwrap();
    let kinds: Vec<&str> = evs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "workload.level_changed")
            .count(),
        4,
        "{evs}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(*k, "workload.restarted" | "workload.failed")),
        "{evs}"
    );
    let w: Workload = api.get("/v1/workloads/bank").await.unwrap();
    assert_eq!(w.status.incarnation, 1, "{:?}", w.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_level_changes_are_refused() {
    let c = Cluster::start(BIN.as_ref(), 1).await;
    ok(&c.run_web("web", &[]));
    // A process cannot be ft: 400 naming the field, exit 2, nothing changed.
    let out = c.cli(&["workload", "set-level", "web", "ft"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("level"));
    let out = c.cli(&["workload", "set-level", "web", "gold"]);
    assert_eq!(out.status.code(), Some(2));
    let out = c.cli(&["workload", "set-level", "nope", "ha"]);
    assert_eq!(out.status.code(), Some(1));
    let api = c.client();
    let r = api
        .raw(
            Method::PUT,
            "/v1/workloads/web/level",
            Some((r#"{"level":"platinum"}"#.into(), "application/json")),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let e: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["error"]["field"], "level", "{e}");
    let w: Workload = api.get("/v1/workloads/web").await.unwrap();
    assert_eq!(w.spec.level, Level::None);
    // none -> ha for a process: a reservation, no restart.
    ok(&c.cli(&["workload", "set-level", "web", "ha", "--no-wait"]));
    let w: Workload = api.get("/v1/workloads/web").await.unwrap();
    assert_eq!(w.spec.level, Level::Ha);
    assert_eq!(w.status.incarnation, 1);
}

/// The cluster's level policy: a default for specs that name no level, and a minimum
/// by node tag that raises what lands on such nodes and refuses going below it, on
/// every path a workload takes onto a node: its create, a pending workload placed
/// later, an `ha` restart after its node died. What cannot run at the minimum is kept
/// off such nodes (pending, saying why), never placed below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_level_policy_sets_defaults_and_minimums() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    // An ha workload on node-1 (tokyo) before anything else: node-3, the other tokyo
    // node, is drained meanwhile.
    ok(&c.cli(&["node", "drain", "node-3"]));
    ok(&c.run_wasm(
        "hop",
        "counter",
        &["--level", "ha", "--constraint", "zone == tokyo"],
    ));
    ok(&c.cli(&["node", "undrain", "node-3"]));
    ok(&c.cli(&["node", "tag", "node-3", "compliance=pci"]));
    // Bad input: named, exit 2, nothing stored.
    let out = c.cli(&["cluster", "set-levels", "--default", "gold"]);
    assert_eq!(out.status.code(), Some(2));
    let out = c.cli(&["cluster", "set-levels", "--minimum", "compliance=pci"]);
    assert_eq!(out.status.code(), Some(2));
    let out = c.cli(&["cluster", "set-levels", "--minimum", "bad tag=x:ha"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("minimums[0].tag"));
    set_levels(&c, &["compliance=pci:ft"]);
    let out = c.cli(&["cluster", "levels"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("default level: ha") && text.contains("compliance=pci: ft"),
        "{text}"
    );
    let api = c.client();
    // No level named: the default. A level named: kept.
    ok(&c.run_wasm("plain", "counter", &["--constraint", "zone == osaka"]));
    ok(&c.run_wasm(
        "named",
        "counter",
        &["--level", "none", "--constraint", "zone == osaka"],
    ));
    let w: Workload = api.get("/v1/workloads/plain").await.unwrap();
    assert_eq!(w.spec.level, Level::Ha);
    let w: Workload = api.get("/v1/workloads/named").await.unwrap();
    assert_eq!(w.spec.level, Level::None);
    // On a pci node: raised to ft, and not to be lowered there.
    ok(&c.run_wasm(
        "card",
        "counter",
        &["--level", "none", "--constraint", "compliance == pci"],
    ));
    let w: Workload = api.get("/v1/workloads/card").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-3"));
    assert_eq!(w.spec.level, Level::Ft, "{:?}", w.status);
    let out = c.cli(&["workload", "set-level", "card", "ha"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compliance=pci"));
    // A process cannot be ft: kept off the pci node, pending with the reason.
    let out = c.run_sh("web", "sleep 100", &["--constraint", "compliance == pci"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not placed") && err.contains("kept off nodes with compliance=pci"),
        "{err}"
    );
    let w: Workload = api.get("/v1/workloads/web").await.unwrap();
    assert_eq!((w.status.phase, w.status.node), (Phase::Pending, None));

    // A pending workload placed later, when a node comes to fit: raised on the pci
    // node. (The process stays pending: it fits there now too, but cannot be ft.)
    let out = c.run_wasm(
        "later",
        "counter",
        &["--level", "none", "--constraint", "perf == high"],
    );
    assert_eq!(out.status.code(), Some(2), "pending at first");
    ok(&c.cli(&["node", "tag", "node-3", "perf=high"]));
    let w = c
        .wait_workload("later", "placed", Duration::from_secs(20), |w| {
            w.status
                .node
                .clone()
                .map(|_| w.clone())
                .ok_or("pending".to_string())
        })
        .await;
    assert_eq!(w.status.node.as_deref(), Some("node-3"));
    assert_eq!(w.spec.level, Level::Ft, "{:?}", w.status);
    assert_raised(&c, "later", avail_model::EventKind::WorkloadPlaced).await;
    let w: Workload = api.get("/v1/workloads/web").await.unwrap();
    assert_eq!(w.status.phase, Phase::Pending, "{:?}", w.status);

    // A minimum added later raises, live, what already runs on such nodes: `named`
    // (level none, on osaka's node-2) goes to ha without a restart.
    ok(&c.run_web("osaka-proc", &["--constraint", "zone == osaka"]));
    set_levels(&c, &["compliance=pci:ft", "zone=osaka:ha"]);
    let w = c
        .wait_workload("named", "raised to ha", Duration::from_secs(20), |w| {
            if w.spec.level == Level::Ha {
                Ok(w.clone())
            } else {
                Err(format!("{:?} {:?}", w.spec.level, w.status))
            }
        })
        .await;
    assert_eq!(w.status.incarnation, 1, "no restart: {:?}", w.status);
    let events: Vec<avail_model::ClusterEvent> =
        api.get("/v1/workloads/named/events").await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == avail_model::EventKind::WorkloadLevelChanged
                && e.message.ends_with(": level ha required on zone=osaka")),
        "{events:?}"
    );

    // A minimum a running workload cannot meet (a process where ft is required): it
    // is left running, said once (not at every pass, though its agent's reports
    // rewrite its status message every heartbeat).
    set_levels(&c, &["compliance=pci:ft", "zone=osaka:ft"]);
    c.wait_workload("named", "raised to ft", Duration::from_secs(20), |w| {
        (w.spec.level == Level::Ft)
            .then_some(())
            .ok_or(format!("{:?}", w.spec.level))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let events: Vec<avail_model::ClusterEvent> =
        api.get("/v1/workloads/osaka-proc/events").await.unwrap();
    let said: Vec<_> = events
        .iter()
        .filter(|e| e.kind == avail_model::EventKind::WorkloadBelowPolicy)
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].message.contains("zone=osaka requires level ft"),
        "{said:?}"
    );
    let w: Workload = api.get("/v1/workloads/osaka-proc").await.unwrap();
    assert_eq!((w.spec.level, w.status.phase), (Level::Ha, Phase::Running));

    // An ha restart: node-1 dies, and its ha workload restarts on node-3, the only
    // tokyo node left, at the level required there.
    let w: Workload = api.get("/v1/workloads/hop").await.unwrap();
    assert_eq!(w.status.node.as_deref(), Some("node-1"), "{:?}", w.status);
    assert_eq!(w.spec.level, Level::Ha);
    c.kill_agent(0);
    let w = c
        .wait_workload("hop", "restarted on node-3", Duration::from_secs(30), |w| {
            if w.status.node.as_deref() == Some("node-3") && w.status.phase == Phase::Running {
                Ok(w.clone())
            } else {
                Err(format!("{:?}", w.status))
            }
        })
        .await;
    assert_eq!(w.spec.level, Level::Ft, "{:?}", w.status);
    assert_raised(&c, "hop", avail_model::EventKind::WorkloadRestarted).await;
}

/// `avail cluster set-levels --default ha` with these minimums (`tag:level`).
fn set_levels(c: &Cluster, minimums: &[&str]) {
    let mut args = vec!["cluster", "set-levels", "--default", "ha"];
    for m in minimums {
        args.extend(["--minimum", m]);
    }
    ok(&c.cli(&args));
}

/// The `kind` event of workload `name` says its level was raised on the pci node.
async fn assert_raised(c: &Cluster, name: &str, kind: avail_model::EventKind) {
    let events: Vec<avail_model::ClusterEvent> = c
        .client()
        .get(&format!("/v1/workloads/{name}/events"))
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == kind && e.message.ends_with("; level ft required on compliance=pci")),
        "{events:?}"
    );
}
