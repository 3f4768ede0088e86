//! Heartbeats one server absorbs: `nodes` nodes join a real `avail server` (redb) with
//! their own keys and certificates (no agents: this process speaks for all of them,
//! each over its own mutual-TLS connection), then
//! 1. every node sends empty heartbeats back to back, 16 at a time, for 10 s: the
//!    heartbeats per second the server answers, and its CPU meanwhile;
//! 2. every node heartbeats once a second (spread evenly) for 20 s, after 5 s of the
//!    same to settle: the server's CPU (cores, from `/proc/<pid>/stat`), in all and
//!    per 1,000 nodes. It includes the leader's liveness pass over every node every
//!    50 ms, which grows with the nodes, not the heartbeats.
//!
//! `cargo build --release -p avail -p avail-bench && target/release/heartbeats [nodes]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use avail_bench::fake_nodes::{beat, join_many};
use avail_bench::machine;
use avail_testkit::Cluster;

/// CPU seconds (user + system) process `pid` has used.
fn cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn main() {
    let nodes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    rt.block_on(async move {
        let mut c = Cluster::start_full(
            &bin,
            0,
            vec![],
            // Windows long enough that nodes this process cannot keep up with are not
            // declared down meanwhile.
            vec![
                "--heartbeat-ms".into(),
                "1000".into(),
                "--suspect-after-ms".into(),
                "5000".into(),
                "--down-after-ms".into(),
                "10000".into(),
            ],
        )
        .await;
        let pid = c.server_proc(0).unwrap().pid();
        let keys = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let clients = join_many(&c, keys.path(), nodes, "hb-", |_| {
            [("zone".to_string(), "a".to_string())].into()
        })
        .await;
        println!("{nodes} nodes joined in {:.1} s", t.elapsed().as_secs_f64());
        for cl in &clients {
            beat(cl).await;
        }
        let clients = Arc::new(clients);

        // Back to back, 16 at a time.
        let count = Arc::new(AtomicU64::new(0));
        let (c0, t0) = (cpu_s(pid), Instant::now());
        let end = t0 + Duration::from_secs(10);
        let mut tasks = Vec::new();
        for k in 0..16 {
            let (clients, count) = (clients.clone(), count.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = k;
                while Instant::now() < end {
                    beat(&clients[i % clients.len()]).await;
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 16;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = t0.elapsed().as_secs_f64();
        let rate = count.load(Ordering::Relaxed) as f64 / secs;
        let busy = (cpu_s(pid) - c0) / secs;
        println!("back to back: {rate:.0} heartbeats/s, server {busy:.2} cores");

        // 1 Hz each, spread over the second: 5 s to settle, then 20 s measured.
        let c0 = Arc::new(std::sync::Mutex::new((0.0, Instant::now())));
        let mut tasks = Vec::new();
        {
            let c0 = c0.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                *c0.lock().unwrap() = (cpu_s(pid), Instant::now());
            }));
        }
        let per = nodes.div_ceil(64);
        for chunk in 0..64 {
            let clients = clients.clone();
            tasks.push(tokio::spawn(async move {
                let mine: Vec<usize> =
                    (chunk * per..((chunk + 1) * per).min(clients.len())).collect();
                if mine.is_empty() {
                    return;
                }
                let gap = Duration::from_secs(1) / mine.len() as u32;
                let mut tick = tokio::time::interval(gap);
                for _ in 0..25 {
                    for i in &mine {
                        tick.tick().await;
                        beat(&clients[*i]).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (cpu0, t0) = *c0.lock().unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let at_1hz = (cpu_s(pid) - cpu0) / secs;
        println!(
            "1 Hz x {nodes} nodes for {secs:.1} s: server {at_1hz:.3} cores; {:.3} cores per 1,000 nodes",
            at_1hz * 1000.0 / nodes as f64
        );
    });
}
