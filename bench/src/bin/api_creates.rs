//! Creates per second through the API, the control plane on redb against the same on
//! etcd (a 3-member etcd on loopback), in the same run: 3 agents, workloads created
//! by `POST /v1/workloads` with 1 and 4 clients at once. Each workload asks for a tag
//! no node has (`zone == nowhere`), so every create is planned, refused by every node
//! and written `pending` with its explanation and events: the control plane's whole
//! create path, with no agent starting anything (2 cores are shared by all).
//!
//! `cargo build --release -p avail -p avail-bench && target/release/api_creates [per_run]`

use std::time::Duration;

use avail_bench::machine;
use avail_model::Phase;
use avail_model::api::ArtifactRef;
use avail_store::etcd_process::EtcdCluster;
use avail_testkit::{Cluster, guest};

/// The spec fields of every workload created.
const FIELDS: &str = r#""placement":{"constraints":["zone == nowhere"]}"#;

async fn run(
    bin: &std::path::Path,
    store: &str,
    server_args: Vec<String>,
    per_run: usize,
) -> Vec<(usize, f64)> {
    let c = Cluster::start_full(bin, 3, vec![], server_args).await;
    let api = c.client().with_timeout(Duration::from_secs(60));
    let bytes = std::fs::read(guest("counter")).unwrap();
    let art: ArtifactRef = api.put_bytes("/v1/artifacts", bytes.into()).await.unwrap();
    // Warm up: the module is checked once per digest.
    avail_bench::creates(&api, &art.digest, "warm", FIELDS, Phase::Pending, 20, 1).await;
    let mut out = Vec::new();
    for clients in [1, 4] {
        let rate = avail_bench::creates(
            &api,
            &art.digest,
            &format!("c{clients}-"),
            FIELDS,
            Phase::Pending,
            per_run,
            clients,
        )
        .await;
        println!("{store}: {clients} client(s): {rate:.0} creates/s");
        out.push((clients, rate));
    }
    out
}

fn main() {
    let per_run: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    let etcd = EtcdCluster::start(3);
    let flag = etcd.store_flag();
    rt.block_on(async move {
        let redb = run(&bin, "redb", vec![], per_run).await;
        let on_etcd = run(&bin, "etcd", vec!["--store".into(), flag], per_run).await;
        println!("| clients | redb | etcd (3 members) | etcd / redb |");
        println!("|---|---|---|---|");
        for ((c, r), (_, e)) in redb.iter().zip(&on_etcd) {
            println!("| {c} | {r:.0}/s | {e:.0}/s | {:.1}% |", 100.0 * e / r);
        }
    });
}
