//! Floods against a 1-node cluster, with the resident memory (VmRSS) of the server and
//! the agent before, at the peak and after, each against its own baseline measured in
//! the same run:
//! - slowloris: `n` connections to the API that never finish a TLS handshake and `n`
//!   to the ingress that never finish their headers;
//! - large bodies: 30 requests of 16 MiB each to the ingress, held open at 15 MiB sent
//!   (the node's budget for bodies in flight is 64 MiB);
//! - followers: 64 event followers that never read, while 5,000 events are written.
//!
//! `cargo build --release -p avail -p avail-bench && target/release/floods [connections]`

use std::time::{Duration, Instant};

use avail_bench::machine;
use avail_testkit::Cluster;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn rss_mib(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// The highest RSS of `pid` seen every 50 ms for `d`.
async fn peak(pid: i32, d: Duration) -> f64 {
    let end = Instant::now() + d;
    let mut max: f64 = 0.0;
    while Instant::now() < end {
        max = max.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    max
}

fn row(what: &str, base: f64, top: f64, after: f64) {
    println!(
        "{what:<44} {base:>8.1} {top:>8.1} {after:>8.1}  (peak {:.2}x)",
        top / base
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    rt.block_on(async move {
        let c = Cluster::start(&bin, 1).await;
        let server = c.server.as_ref().unwrap().pid();
        let agent = c.agents[0].as_ref().unwrap().pid();
        let api_addr = format!("{}.1:7400", c.net);
        let ingress_addr = format!("{}:7480", c.agent_addr(0));
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("RSS, MiB                                      baseline     peak    after");

        // Slowloris on both doors.
        let (sb, ab) = (rss_mib(server), rss_mib(agent));
        let mut held = Vec::new();
        for _ in 0..n {
            if let Ok(s) = TcpStream::connect(&api_addr).await {
                held.push(s);
            }
            if let Ok(mut s) = TcpStream::connect(&ingress_addr).await {
                let _ = s.write_all(b"GET /w/x/ HTTP/1.1\r\nHost: x\r\n").await;
                held.push(s);
            }
        }
        let (sp, ap) = tokio::join!(
            peak(server, Duration::from_secs(3)),
            peak(agent, Duration::from_secs(3))
        );
        // The handshake (5 s) and header (10 s) timeouts close them.
        tokio::time::sleep(Duration::from_secs(12)).await;
        drop(held);
        tokio::time::sleep(Duration::from_secs(1)).await;
        row(
            &format!("server, {n} unfinished TLS handshakes"),
            sb,
            sp,
            rss_mib(server),
        );
        row(
            &format!("agent, {n} unfinished request headers"),
            ab,
            ap,
            rss_mib(agent),
        );

        // Large bodies held open.
        let ab = rss_mib(agent);
        let mut bodies = Vec::new();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..30 {
            let Ok(mut s) = TcpStream::connect(&ingress_addr).await else {
                continue;
            };
            let head = format!(
                "POST /w/x/ HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                16 << 20
            );
            if s.write_all(head.as_bytes()).await.is_err() {
                continue;
            }
            for _ in 0..15 {
                let w = tokio::time::timeout(Duration::from_millis(200), s.write_all(&chunk)).await;
                if !matches!(w, Ok(Ok(()))) {
                    break;
                }
            }
            bodies.push(s);
        }
        let ap = peak(agent, Duration::from_secs(3)).await;
        drop(bodies);
        tokio::time::sleep(Duration::from_secs(2)).await;
        row(
            "agent, 30 bodies of 16 MiB held at 15 MiB",
            ab,
            ap,
            rss_mib(agent),
        );

        // Followers that never read, while events are written.
        let sb = rss_mib(server);
        let head = format!(
            "GET /v1/events?follow=true HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
            c.admin_token
        );
        let mut followers = Vec::new();
        for _ in 0..64 {
            let mut s = c.connect_api().await;
            let _ = s.write_all(head.as_bytes()).await;
            followers.push(s);
        }
        let api = c.client();
        let writer = tokio::spawn(async move {
            for i in 0..5000 {
                let change = serde_json::json!({"set": {"flood": format!("v{i}")}, "remove": []});
                let _: Result<serde_json::Value, _> =
                    api.patch("/v1/nodes/node-1/tags", &change).await;
            }
        });
        let sp = peak(server, Duration::from_secs(20)).await;
        writer.abort();
        drop(followers);
        tokio::time::sleep(Duration::from_secs(2)).await;
        row(
            "server, 64 stuck followers, 5,000 events",
            sb,
            sp,
            rss_mib(server),
        );
    });
}
