//! Level `ha`: time from SIGKILL of a host to the first successful reply of each of its
//! `ha` workloads, split into detection (until the node is reported down) and restart
//! (from then until every workload answers from its new node), with 1, 10 and 100
//! workloads on the lost node, over several trials each (a fresh 3-agent cluster per
//! trial). The workloads are the counter guest, constrained to the two tokyo nodes, so
//! all start on node-1 and restart on node-3, where their reservations are and their
//! standbys hold a checkpoint (taken every second) to resume from.
//!
//! `cargo build --release -p avail -p avail-bench && target/release/ha_restart [trials] [sizes,...]`

use std::time::{Duration, Instant};

use avail_bench::{machine, percentile};
use avail_client::Client;
use avail_model::{Node, NodeState, Phase, Workload};
use avail_testkit::{Cluster, guest};
use hyper::Method;

fn main() {
    let mut args = std::env::args().skip(1);
    let trials: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let sizes: Vec<usize> = args
        .next()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10, 100]);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    rt.block_on(async move {
        for n in sizes {
            let (mut detect, mut restart) = (Vec::new(), Vec::new());
            for t in 0..trials {
                let mut c = Cluster::start(&bin, 3).await;
                let api = c.client();
                let bytes = std::fs::read(guest("counter")).unwrap();
                let art: serde_json::Value = api.put_bytes("/v1/artifacts", bytes.into()).await.unwrap();
                for i in 0..n {
                    let spec = serde_json::json!({
                        "name": format!("w{i}"), "driver": "wasm", "artifact": art["digest"], "level": "ha",
                        "resources": {"cpu_millis": 10, "memory_mib": 16},
                        "placement": {"constraints": ["zone == tokyo"], "policy": "pack"},
                    });
                    // On node-1 (pack): a placement elsewhere (node-1 briefly suspect on
                    // a loaded machine) is made again.
                    loop {
                        let w: Workload = api.post("/v1/workloads", &spec).await.unwrap();
                        if w.status.node.as_deref() == Some("node-1") {
                            break;
                        }
                        let _: serde_json::Value = api.delete(&format!("/v1/workloads/w{i}")).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                // All running and reserved.
                loop {
                    let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
                    // Running, reserved, and the standby in step (a restart resumes from
                    // its checkpoint).
                    if ws.iter().all(|w| {
                        w.status.phase == Phase::Running
                            && w.status.reservation.is_some()
                            && avail_model::LevelState::is_protected(w.status.level_state, avail_model::Level::Ha)
                    }) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let ingress = Client::new(&c.ingress(1), None, None).with_timeout(Duration::from_secs(2));
                let killed = Instant::now();
                c.kill_agent(0);
                loop {
                    let node: Node = api.get("/v1/nodes/node-1").await.unwrap();
                    if node.state == NodeState::Down {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let detected = killed.elapsed();
                let mut pending: Vec<usize> = (0..n).collect();
                while !pending.is_empty() {
                    let mut still = Vec::new();
                    for i in pending {
                        let ok = ingress
                            .raw(Method::GET, &format!("/w/w{i}/value"), None, &[])
                            .await
                            .is_ok_and(|r| r.status == 200 && r.headers.get("avail-node").is_some_and(|v| v == "node-3"));
                        if !ok {
                            still.push(i);
                        }
                    }
                    pending = still;
                    if !pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                let all = killed.elapsed();
                eprintln!("{n} workloads, trial {t}: detected {:.0} ms, all answering {:.0} ms after the kill", detected.as_secs_f64() * 1e3, all.as_secs_f64() * 1e3);
                detect.push(detected);
                restart.push(all - detected);
            }
            detect.sort();
            restart.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{n} workloads, {trials} trials: detection p50 {:.0} ms p99 {:.0} ms; restart after detection p50 {:.0} ms p99 {:.0} ms",
                ms(percentile(&detect, 0.5)), ms(percentile(&detect, 0.99)),
                ms(percentile(&restart, 0.5)), ms(percentile(&restart, 0.99)),
            );
        }
    });
}
