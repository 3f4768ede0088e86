//! Level `ft` against level `none` on a real 3-agent cluster, same guest, same run:
//! throughput (concurrent closed-loop clients, alternating rounds, `AVAIL_BENCH_ROUNDS`, default 5) and added reply
//! latency (sequential requests), for `bank` transfers and `kv` writes; then the time
//! from SIGKILL of the primary's host to the first reply served by the new primary,
//! over several trials.
//!
//! `cargo build --release -p avail -p avail-bench && target/release/ft_overhead [failover_trials]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use avail_bench::{machine, median, percentile};
use avail_client::Client;
use avail_model::Workload;
use avail_testkit::{Cluster, guest};
use hyper::Method;

fn body_for(kind: &str, i: u64) -> (String, Vec<u8>) {
    match kind {
        "bank" => (
            "/transfer".into(),
            format!(
                r#"{{"from":{},"to":{},"amount":1}}"#,
                i % 100,
                (i + 1) % 100
            )
            .into_bytes(),
        ),
        _ => (format!("/kv/k{}", i % 64), vec![b'x'; 1024]),
    }
}

fn method_for(kind: &str) -> Method {
    if kind == "bank" {
        Method::POST
    } else {
        Method::PUT
    }
}

async fn wait_protected(c: &Cluster, name: &str) -> Workload {
    let api = c.client();
    for _ in 0..600 {
        let w: Workload = api.get(&format!("/v1/workloads/{name}")).await.unwrap();
        if avail_model::LevelState::is_protected(w.status.level_state, avail_model::Level::Ft) {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} not protected");
}

async fn throughput(base: &str, name: &str, kind: &str, conc: usize, d: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (stop, done) = (stop.clone(), done.clone());
        let (base, name, kind) = (base.to_string(), name.to_string(), kind.to_string());
        tasks.push(tokio::spawn(async move {
            let c = Client::new(&base, None, None);
            let mut i = w as u64 * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let (path, body) = body_for(&kind, i);
                let key = format!("{name}-{i}");
                let r = c
                    .raw(
                        method_for(&kind),
                        &format!("/w/{name}{path}"),
                        Some((body.into(), "application/json")),
                        &[("idempotency-key", &key)],
                    )
                    .await;
                if r.is_ok_and(|r| r.status.is_success() || r.status == 409) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    n
}

async fn latencies(base: &str, name: &str, kind: &str, n: u64) -> Vec<Duration> {
    let c = Client::new(base, None, None);
    let mut v = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (path, body) = body_for(kind, i + 5_000_000);
        let key = format!("{name}-lat-{i}");
        let t = Instant::now();
        let r = c
            .raw(
                method_for(kind),
                &format!("/w/{name}{path}"),
                Some((body.into(), "application/json")),
                &[("idempotency-key", &key)],
            )
            .await
            .unwrap();
        v.push(t.elapsed());
        assert!(r.status.is_success() || r.status == 409, "{}", r.status);
    }
    v.sort();
    v
}

fn main() {
    let trials: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let bin = avail_bench::avail_bin();
    // Alternating none/ft rounds of 3 s each; the ratio is the median of the rounds'.
    let rounds: usize = std::env::var("AVAIL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // Closed-loop clients per throughput run (`AVAIL_BENCH_CLIENTS`, default 8 and 64):
    // few clients measure latency as much as throughput (each waits out its reply's
    // round trip); many keep the node busy.
    let clients: Vec<usize> = std::env::var("AVAIL_BENCH_CLIENTS")
        .unwrap_or_else(|_| "8,64".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let rt = avail_bench::runtime();
    rt.block_on(async move {
        println!("machine: {}", machine());
        for kind in ["bank", "kv"] {
            let c = Cluster::start(&bin, 3).await;
            // The ft primary wherever it lands, its secondary on another rack; the none
            // copy on the primary's node; both called through that node's ingress.
            let ft_name = format!("{kind}-ft");
            let out = c.cli(&["workload", "run", "--name", &ft_name, "--driver", "wasm", "--artifact", &guest(kind), "--level", "ft", "--memory-mib", "64"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let w = wait_protected(&c, &ft_name).await;
            println!("{kind}: dirty tracker {}", w.status.ft.as_ref().map(|f| f.tracker.as_str()).unwrap_or("?"));
            let node = w.status.node.clone().unwrap();
            let i = node.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
            let rack = format!("rack == r{}", i + 1);
            let out = c.cli(&["workload", "run", "--name", &format!("{kind}-none"), "--driver", "wasm", "--artifact", &guest(kind), "--memory-mib", "64", "--constraint", &rack]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let base = c.ingress(i);
            for &conc in &clients {
            let (mut none, mut ft, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let n = throughput(&base, &format!("{kind}-none"), kind, conc, Duration::from_secs(3)).await;
                let f = throughput(&base, &format!("{kind}-ft"), kind, conc, Duration::from_secs(3)).await;
                none.push(n);
                ft.push(f);
                ratios.push(f / n);
            }
            let (n, f, r) = (median(none), median(ft), median(ratios));
            println!("{kind}: {conc} clients: throughput none {n:.0}/s, ft {f:.0}/s (medians of {rounds} rounds); ft/none per round, median {:.1}%", 100.0 * r);
            }
            let ln = latencies(&base, &format!("{kind}-none"), kind, 1000).await;
            let lf = latencies(&base, &format!("{kind}-ft"), kind, 1000).await;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{kind}: latency none p50 {:.2} ms p99 {:.2} ms; ft p50 {:.2} ms p99 {:.2} ms; added p50 {:.2} ms p99 {:.2} ms",
                ms(percentile(&ln, 0.5)), ms(percentile(&ln, 0.99)), ms(percentile(&lf, 0.5)), ms(percentile(&lf, 0.99)),
                ms(percentile(&lf, 0.5)) - ms(percentile(&ln, 0.5)), ms(percentile(&lf, 0.99)) - ms(percentile(&ln, 0.99)),
            );
        }
        // Failover: time from SIGKILL of the primary's host to the first reply served by
        // the new primary (the client keeps sending; the ingress retries).
        let mut times = Vec::new();
        for t in 0..trials {
            let mut c = Cluster::start(&bin, 3).await;
            let out = c.cli(&["workload", "run", "--name", "bank", "--driver", "wasm", "--artifact", &guest("bank"), "--level", "ft", "--memory-mib", "16"]);
            assert!(out.status.success());
            let w = wait_protected(&c, "bank").await;
            let idx = |n: &str| n.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
            let (p, s) = (idx(w.status.node.as_deref().unwrap()), idx(w.status.secondary.as_deref().unwrap()));
            let entry = (0..3).find(|i| *i != p && *i != s).unwrap();
            let client = Client::new(&c.ingress(entry), None, None).with_timeout(Duration::from_secs(30));
            for i in 0..20 {
                let (path, body) = body_for("bank", i);
                client.raw(Method::POST, &format!("/w/bank{path}"), Some((body.into(), "application/json")), &[("idempotency-key", &format!("w{i}"))]).await.unwrap();
            }
            let killed = Instant::now();
            c.kill_agent(p);
            let mut i = 100;
            loop {
                let (path, body) = body_for("bank", i);
                let r = client.raw(Method::POST, &format!("/w/bank{path}"), Some((body.into(), "application/json")), &[("idempotency-key", &format!("f{i}"))]).await;
                if let Ok(r) = r && r.status == 200 && r.headers.get("avail-node").is_some_and(|n| n == format!("node-{}", s + 1).as_str()) {
                    break;
                }
                i += 1;
            }
            let took = killed.elapsed();
            eprintln!("failover trial {t}: {:.0} ms", took.as_secs_f64() * 1e3);
            times.push(took);
        }
        times.sort();
        println!(
            "failover ({trials} trials): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    });
}
