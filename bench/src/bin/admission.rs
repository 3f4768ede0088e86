//! Admission and idle cost (issue 11): in one run, on one agent,
//! - the agent's CPU with 0 workloads (baseline) and with 1,000 idle wasm workloads (the
//!   counter guest, level none), from its process CPU time (`/proc/<pid>/stat`, user +
//!   system) over a window, as % of one core;
//! - `GET /v1/workloads` latency against the empty cluster (baseline) and with 2,000
//!   workloads (the node's limit raised to 1,100: 1,100 run, 900 wait `pending`).
//!
//! `cargo build --release -p avail -p avail-bench && target/release/admission [window_s] [idle]`

use std::time::{Duration, Instant};

use avail_bench::{machine, percentile};
use avail_model::{Phase, Workload};
use avail_testkit::{Cluster, guest, wait_until};

/// Lists timed per figure.
const LISTS: usize = 20;
/// Requests creating workloads at once.
const CREATORS: usize = 8;

/// User + system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the state field.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// % of one core process `pid` used over `window`.
async fn cpu_percent(pid: i32, window: Duration) -> f64 {
    // `/proc` counts in USER_HZ, 100 on Linux whatever the kernel's tick.
    let hz = 100.0;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(window).await;
    let (t1, c1) = (Instant::now(), cpu_ticks(pid));
    (c1 - c0) as f64 / hz / (t1 - t0).as_secs_f64() * 100.0
}

/// Median and p99 of `LISTS` lists of every workload.
async fn list_latency(api: &avail_client::Client) -> (Duration, Duration, usize) {
    let mut times = Vec::new();
    let mut n = 0;
    for _ in 0..LISTS {
        let t = Instant::now();
        let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
        times.push(t.elapsed());
        n = ws.len();
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99), n)
}

/// Create workloads `from..to` of `digest`, `CREATORS` at a time.
async fn create(api: &avail_client::Client, digest: &str, from: usize, to: usize) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..CREATORS {
        let (api, next, digest) = (api.clone(), next.clone(), digest.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= to {
                    return;
                }
                let spec = serde_json::json!({
                    "name": format!("w{i}"), "driver": "wasm", "artifact": digest,
                    "resources": {"cpu_millis": 10, "memory_mib": 16},
                });
                let _: Workload = api.post("/v1/workloads", &spec).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let window = Duration::from_secs(args.next().and_then(|a| a.parse().ok()).unwrap_or(10));
    let idle: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    rt.block_on(async move {
        // One node that takes them all: 1,100 replicas, capacity to match.
        let args = [
            "--max-workloads",
            "1100",
            "--cpu-millis",
            "100000",
            "--memory-mib",
            "100000",
        ]
        .map(String::from)
        .to_vec();
        let c = Cluster::start_with(&bin, 1, vec![args]).await;
        let api = c.client().with_timeout(Duration::from_secs(120));
        let pid = c.agents[0].as_ref().unwrap().pid();
        let (e50, e99, _) = list_latency(&api).await;
        println!("list, empty cluster: p50 {e50:?} p99 {e99:?}");
        let base = cpu_percent(pid, window).await;
        println!("agent CPU, 0 workloads: {base:.2}% of one core over {window:?}");
        let bytes = std::fs::read(guest("counter")).unwrap();
        let art: serde_json::Value = api.put_bytes("/v1/artifacts", bytes.into()).await.unwrap();
        let digest = art["digest"].as_str().unwrap().to_string();
        let t = Instant::now();
        create(&api, &digest, 0, idle).await;
        wait_until("every workload running", Duration::from_secs(600), || {
            let api = api.clone();
            async move {
                let ws: Vec<Workload> =
                    api.get("/v1/workloads").await.map_err(|e| e.to_string())?;
                let running = ws
                    .iter()
                    .filter(|w| w.status.phase == Phase::Running)
                    .count();
                if running == idle {
                    Ok(())
                } else {
                    Err(format!("{running} running"))
                }
            }
        })
        .await;
        println!("{idle} created and running in {:?}", t.elapsed());
        // Let the start-up settle (compiles, first reports) before the window.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let loaded = cpu_percent(pid, window).await;
        println!("agent CPU, {idle} idle workloads: {loaded:.2}% of one core over {window:?}");
        println!(
            "per 1,000 idle workloads: {:.2}% of one core above the baseline",
            (loaded - base) * 1000.0 / idle as f64
        );
        let t = Instant::now();
        create(&api, &digest, idle, 2000).await;
        println!("{} more created in {:?}", 2000 - idle, t.elapsed());
        let (l50, l99, n) = list_latency(&api).await;
        println!("list, {n} workloads: p50 {l50:?} p99 {l99:?}");
        println!(
            "list ratio {n} / empty: p50 {:.0}x",
            l50.as_secs_f64() / e50.as_secs_f64()
        );
    });
}
