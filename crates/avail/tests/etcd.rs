//! The control plane on etcd (`avail server --store etcd://...`): a real etcd started by
//! the store's test kit, a real server and agents. The cluster works as on redb
//! (placement, ingress, an `ha` restart after a node dies), survives a server restart
//! (leading again at once),
//! and the store is bound to its cluster: another data dir on this etcd, or this data
//! dir on an etcd prefix that holds nothing, is refused.

use std::time::Duration;

use avail_model::{Phase, Workload};
use avail_store::etcd_process::EtcdCluster;
use avail_testkit::{Cluster, Proc, ok};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

/// `POST /w/counter/incr` through agent `i`'s ingress: the counter's new value.
async fn incr(c: &Cluster, i: usize) -> u64 {
    let ingress = avail_client::Client::new(&c.ingress(i), None, None);
    let r = avail_testkit::until_ok(
        &ingress,
        Method::POST,
        "/w/counter/incr",
        None,
        &[],
        Duration::from_secs(30),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["value"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_runs_on_etcd() {
    let etcd = EtcdCluster::single();
    let store = etcd.store_flag();
    let mut c = Cluster::start_full(
        BIN.as_ref(),
        3,
        vec![],
        vec!["--store".into(), store.clone()],
    )
    .await;
    ok(&c.run_wasm("counter", "counter", &["--level", "ha"]));
    let w: Workload = c.client().get("/v1/workloads/counter").await.unwrap();
    let home = avail_testkit::ft::index(w.status.node.as_deref().unwrap());
    let entry = (home + 1) % 3;
    assert_eq!(incr(&c, entry).await, 1);

    // Its node dies: restarted elsewhere (the node's liveness lease is etcd's).
    c.kill_agent(home);
    let w = c
        .wait_workload(
            "counter",
            "restarted elsewhere",
            Duration::from_secs(30),
            |w| {
                let moved = w.status.node.as_deref() != Some(&Cluster::agent_name(home));
                if moved && w.status.phase == Phase::Running {
                    Ok(w.clone())
                } else {
                    Err(format!("{:?}", w.status))
                }
            },
        )
        .await;
    assert!(w.status.incarnation >= 2, "{:?}", w.status);
    assert!(incr(&c, entry).await >= 1);

    // The server restarts: everything is still there, and it places new work.
    c.kill_server();
    c.start_server().await;
    let w: Workload = c.client().get("/v1/workloads/counter").await.unwrap();
    assert_eq!(w.status.phase, Phase::Running);
    c.wait_nodes_ready(2).await;
    // It leads again at once (its own previous term's key taken back, not waited out).
    let events: Vec<avail_model::ClusterEvent> = c.client().get("/v1/events").await.unwrap();
    let terms = events
        .iter()
        .filter(|e| e.kind == avail_model::EventKind::ServerLeader)
        .count();
    assert_eq!(terms, 2, "{events:?}");
    ok(&c.run_wasm("second", "counter", &["--level", "none"]));

    // Another data dir on this etcd: not its cluster, refused.
    let other = c.dir.path().join("other-server");
    let refused = |data_dir: &std::path::Path, extra: &[&str], log: &str| {
        let mut args: Vec<String> = vec![
            "server".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("{}.2:7400", c.net),
            "--store".into(),
            store.clone(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Proc::spawn(BIN.as_ref(), &args, &c.dir.path().join(log))
    };
    let mut p = refused(&other, &[], "other.log");
    let out = p.failed_exit(Duration::from_secs(20)).await;
    assert!(out.contains("is not its"), "{out}");
    // This data dir on a prefix of the etcd that holds nothing: refused, not started
    // as an empty cluster.
    let mut p = refused(
        &c.server_dir(),
        &["--etcd-prefix", "/elsewhere/"],
        "empty.log",
    );
    let out = p.failed_exit(Duration::from_secs(20)).await;
    assert!(out.contains("holds no cluster"), "{out}");
    // A bad flag names itself.
    let out = c.cli(&[
        "server",
        "--store",
        "etcd://nohost",
        "--data-dir",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--store"));
}
