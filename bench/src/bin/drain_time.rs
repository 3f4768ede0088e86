//! Maintenance: time to drain a node running `n` wasm workloads (the counter guest,
//! level none) under client load, against a baseline in the same run: the time to
//! deploy the same `n` workloads onto that node (upload done, each created through the
//! API and answering). Each workload moves live: a copy on the target is synced as a
//! secondary from a full image, then the workload hands over. Reports the drain time,
//! the ratio to the baseline, each move's time (from the server's `workload.moved`
//! events), and the client's requests and failures during the drain (must be 0).
//!
//! `cargo build --release -p avail -p avail-bench && target/release/drain_time [trials] [n]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use avail_bench::{machine, percentile};
use avail_client::Client;
use avail_model::{ClusterEvent, Node, Phase, Workload};
use avail_testkit::{Cluster, guest};
use hyper::Method;

/// Closed-loop clients sending `POST /incr` to the workloads in turn.
const CLIENTS: usize = 4;

fn main() {
    let mut args = std::env::args().skip(1);
    let trials: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    rt.block_on(async move {
        let (mut drains, mut ratios, mut moves) = (Vec::new(), Vec::new(), Vec::new());
        let (mut sent_all, mut failed_all) = (0, 0);
        for t in 0..trials {
            let c = Cluster::start(&bin, 3).await;
            let api = c.client();
            let bytes = std::fs::read(guest("counter")).unwrap();
            let art: serde_json::Value = api.put_bytes("/v1/artifacts", bytes.into()).await.unwrap();
            let ingress = Client::new(&c.ingress(1), None, None).with_timeout(Duration::from_secs(20));
            // Baseline: deploy n onto node-1 until each answers.
            let deploy = Instant::now();
            for i in 0..n {
                let spec = serde_json::json!({
                    "name": format!("w{i}"), "driver": "wasm", "artifact": art["digest"],
                    "resources": {"cpu_millis": 10, "memory_mib": 16},
                    "placement": {"constraints": ["zone == tokyo"], "policy": "pack"},
                });
                let w: Workload = api.post("/v1/workloads", &spec).await.unwrap();
                assert_eq!(w.status.node.as_deref(), Some("node-1"));
            }
            for i in 0..n {
                loop {
                    let r = ingress.raw(Method::GET, &format!("/w/w{i}/value"), None, &[]).await;
                    if r.is_ok_and(|r| r.status == 200) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let deployed = deploy.elapsed();
            // Load through node-2's ingress while node-1 drains.
            let stop = Arc::new(AtomicBool::new(false));
            let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let mut clients = Vec::new();
            for k in 0..CLIENTS {
                let (stop, sent, failed, ingress) = (stop.clone(), sent.clone(), failed.clone(), ingress.clone());
                clients.push(tokio::spawn(async move {
                    let mut i = k;
                    while !stop.load(Ordering::Relaxed) {
                        let r = ingress.raw(Method::POST, &format!("/w/w{}/incr", i % n), None, &[]).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !r.is_ok_and(|r| r.status == 200) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        i += CLIENTS;
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (sent0, failed0) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
            let since = {
                let evs: Vec<ClusterEvent> = api.get("/v1/events?tail=true&limit=1").await.unwrap();
                evs.last().map(|e| e.seq).unwrap_or(0)
            };
            let start = Instant::now();
            let _: Node = api.post("/v1/nodes/node-1/drain", &serde_json::json!({})).await.unwrap();
            loop {
                let node: Node = api.get("/v1/nodes/node-1").await.unwrap();
                if node.drain.as_ref().is_some_and(|d| d.remaining == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let drained = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            for cl in clients {
                cl.await.unwrap();
            }
            let (sent1, failed1) = (sent.load(Ordering::Relaxed) - sent0, failed.load(Ordering::Relaxed) - failed0);
            let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
            assert!(ws.iter().all(|w| w.status.phase == Phase::Running && w.status.node.as_deref() == Some("node-3")));
            let evs: Vec<ClusterEvent> = api.get(&format!("/v1/events?since={since}&limit=10000")).await.unwrap();
            for e in evs.iter().filter(|e| e.kind == avail_model::EventKind::WorkloadMoved) {
                if let Some(ms) = e.message.rsplit(" in ").next().and_then(|m| m.strip_suffix(" ms")).and_then(|m| m.parse::<u64>().ok()) {
                    moves.push(Duration::from_millis(ms));
                }
            }
            eprintln!(
                "trial {t}: deploy {:.2} s, drain {:.2} s (ratio {:.2}); {sent1} requests during the drain, {failed1} failed",
                deployed.as_secs_f64(), drained.as_secs_f64(), drained.as_secs_f64() / deployed.as_secs_f64()
            );
            drains.push(drained);
            ratios.push(drained.as_secs_f64() / deployed.as_secs_f64());
            sent_all += sent1;
            failed_all += failed1;
        }
        drains.sort();
        moves.sort();
        ratios.sort_by(f64::total_cmp);
        println!(
            "{n} wasm workloads, {trials} trials, {CLIENTS} clients: drain p50 {:.2} s max {:.2} s; drain / deploy p50 {:.2}; each move p50 {} ms p99 {} ms; {sent_all} requests during drains, {failed_all} failed",
            percentile(&drains, 0.5).as_secs_f64(),
            drains.last().unwrap().as_secs_f64(),
            ratios[ratios.len() / 2],
            percentile(&moves, 0.5).as_millis(),
            percentile(&moves, 0.99).as_millis(),
        );
    });
}
