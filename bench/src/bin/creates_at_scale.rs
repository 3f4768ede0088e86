//! Creates per second through the API on a large inventory: `nodes` nodes without
//! agents ([`avail_bench::fake_nodes`]: real joins, heartbeats at 1 Hz from this
//! process) in 4 zones, racks of 40, every fifth one `compliance=pci` (set by the
//! administrator: nodes may not declare it), then `POST /v1/workloads` with the
//! constraints `zone == tokyo` and `compliance == pci`, by 1 and by 4 clients. Every
//! create is admitted, planned over the whole inventory and placed (no agent runs it).
//!
//! `cargo build --release -p avail -p avail-bench && target/release/creates_at_scale [nodes] [per_run] [redb|etcd]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use avail_bench::fake_nodes::{join_many, keep_alive};
use avail_bench::machine;
use avail_model::api::{ArtifactRef, TagChange};
use avail_model::{Node, NodeState, Phase};
use avail_store::etcd_process::EtcdCluster;
use avail_testkit::{Cluster, guest};

const ZONES: [&str; 4] = ["tokyo", "osaka", "nagoya", "sapporo"];

/// The spec fields of every workload created.
const FIELDS: &str = r#""resources":{"cpu_millis":10,"memory_mib":8},"placement":{"constraints":["zone == tokyo","compliance == pci"]}"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let nodes: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let per_run: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(300);
    let on_etcd = args.get(3).is_some_and(|a| a == "etcd");
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    // Two connections per node at the server (more than its default hard limit here).
    let files = avail_server::raise_file_limit_to(4 * nodes as u64 + 4096);
    println!("open files: {files}");
    let etcd = on_etcd.then(|| EtcdCluster::start(3));
    let mut server_args: Vec<String> = [
        "--heartbeat-ms",
        "1000",
        "--suspect-after-ms",
        "5000",
        "--down-after-ms",
        "10000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(e) = &etcd {
        server_args.extend(["--store".into(), e.store_flag()]);
    }
    rt.block_on(async move {
        let c = Cluster::start_full(&bin, 0, vec![], server_args).await;
        let keys = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let clients = join_many(&c, keys.path(), nodes, "n", |i| {
            let tags: BTreeMap<String, String> = [
                ("zone".to_string(), ZONES[i % 4].to_string()),
                ("rack".to_string(), format!("r{}", i / 40)),
            ]
            .into();
            tags
        })
        .await;
        let beating = keep_alive(Arc::new(clients));
        let admin = c.client().with_timeout(Duration::from_secs(120));
        for i in (0..nodes).step_by(5) {
            let change = TagChange {
                set: [("compliance".to_string(), "pci".to_string())].into(),
                remove: vec![],
            };
            let _: Node = admin
                .patch(&format!("/v1/nodes/n{i}/tags"), &change)
                .await
                .unwrap();
        }
        println!(
            "{nodes} nodes joined and tagged in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        loop {
            let ns: Vec<Node> = admin.get("/v1/nodes").await.unwrap();
            if ns.iter().filter(|n| n.state == NodeState::Ready).count() == nodes {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let bytes = std::fs::read(guest("counter")).unwrap();
        let art: ArtifactRef = admin
            .put_bytes("/v1/artifacts", bytes.into())
            .await
            .unwrap();
        avail_bench::creates(&admin, &art.digest, "warm", FIELDS, Phase::Placed, 20, 1).await;
        let store = if on_etcd { "etcd (3 members)" } else { "redb" };
        for clients in [1, 4, 16] {
            let rate = avail_bench::creates(
                &admin,
                &art.digest,
                &format!("c{clients}-"),
                FIELDS,
                Phase::Placed,
                per_run,
                clients,
            )
            .await;
            println!("{store}, {nodes} nodes, {clients} client(s): {rate:.0} creates/s");
        }
        beating.abort();
    });
    drop(etcd);
}
