//! Leader failover of the control plane on etcd: two `avail server` processes on a
//! 3-member etcd (one cluster: the second server's data dir is a copy of the first's
//! keys, with its own server id). Each trial SIGKILLs the leading server and measures
//! the time until the other holds the leader key, and until its first decision pass
//! (the `server.leader` event it writes for its term, from its store watch), then
//! starts the killed one again (it follows). No agents: this measures the election and
//! the start of the new term, not what the new leader then does.
//!
//! With `term` as the third argument the leader is stopped cleanly (SIGTERM: it resigns
//! its lease) instead of SIGKILLed.
//!
//! `cargo build --release -p avail -p avail-bench && target/release/leader_failover [trials] [leader_ttl_s] [kill|term]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use avail_bench::{machine, percentile};
use avail_store::etcd_process::EtcdCluster;
use avail_store::{EtcdStore, Store};
use avail_testkit::Proc;

const KEY: &str = "/control/leader";

fn server(bin: &Path, dir: &Path, addr: &str, store: &str, ttl: u64, log: &Path) -> Proc {
    let args: Vec<String> = vec![
        "server".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--listen".into(),
        format!("{addr}:7400"),
        "--store".into(),
        store.into(),
        "--leader-ttl-s".into(),
        ttl.to_string(),
    ];
    Proc::spawn(bin, &args, log)
}

/// The server id holding the leader key and the key's revision, when one does.
async fn holder(store: &EtcdStore) -> Option<(String, u64)> {
    let kv = store.get(KEY).await.ok()??;
    let r: avail_server::leader::LeaderRecord = serde_json::from_slice(&kv.value).ok()?;
    Some((r.server, kv.mod_rev))
}

/// Wait on `events` for the `server.leader` event of a term after `rev`: its term.
async fn first_decision(events: &mut avail_store::Watch, rev: u64) -> u64 {
    while let Some(ev) = events.next().await {
        if let avail_store::Event::Put(kv) = ev
            && let Ok(e) = serde_json::from_slice::<avail_model::ClusterEvent>(&kv.value)
            && e.kind == avail_model::EventKind::ServerLeader
            && let Some(term) = e
                .message
                .rsplit(' ')
                .next()
                .and_then(|t| t.parse::<u64>().ok())
            && term > rev
        {
            return term;
        }
    }
    panic!("the event watch closed");
}

async fn wait_for(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let trials: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let ttl: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let clean = args.get(3).is_some_and(|a| a == "term");
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/avail");
    let etcd = EtcdCluster::start(3);
    let flag = etcd.store_flag();
    let store = EtcdStore::connect(&etcd.endpoints(), Default::default())
        .await
        .expect("etcd answers");
    let tmp = tempfile::tempdir().expect("a temp dir");
    let net = avail_testkit::free_net();
    let dirs = [tmp.path().join("a"), tmp.path().join("b")];
    let addrs = [format!("{net}.1"), format!("{net}.2")];
    let log = |i: usize, n: usize| tmp.path().join(format!("server-{i}-{n}.log"));
    // Server a makes the cluster; b gets a copy of its keys, not its id.
    let mut procs: [Option<Proc>; 2] = [None, None];
    procs[0] = Some(server(&bin, &dirs[0], &addrs[0], &flag, ttl, &log(0, 0)));
    wait_for("server a to lead", Duration::from_secs(30), async || {
        holder(&store).await.is_some()
    })
    .await;
    std::fs::create_dir_all(&dirs[1]).expect("dir b");
    avail_server::store_open::adopt_cluster(&dirs[0], &dirs[1]).expect("copy a's cluster files");
    procs[1] = Some(server(&bin, &dirs[1], &addrs[1], &flag, ttl, &log(1, 0)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = |i: usize| std::fs::read_to_string(dirs[i].join("server.id")).expect("server.id");
    let ids = [id(0), id(1)];
    let mut took: Vec<Duration> = Vec::new();
    let mut decided: Vec<Duration> = Vec::new();
    for n in 1..=trials {
        let (leader, rev) = holder(&store).await.expect("a leader");
        let from = store.revision().await.expect("etcd answers");
        let mut events = store.watch("/events/", from + 1).await.expect("a watch");
        let i = ids.iter().position(|x| *x == leader).expect("one of ours");
        let other = 1 - i;
        // Let the follower settle into its watch.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        let p = procs[i].as_mut().expect("running");
        if clean {
            p.signal(libc::SIGTERM);
        } else {
            p.kill();
        }
        wait_for(
            "the other server to lead",
            Duration::from_secs(30),
            async || {
                holder(&store)
                    .await
                    .is_some_and(|(h, r)| h == ids[other] && r > rev)
            },
        )
        .await;
        let t = t0.elapsed();
        tokio::time::timeout(Duration::from_secs(30), first_decision(&mut events, rev))
            .await
            .expect("the new leader's first decision");
        let d = t0.elapsed();
        println!(
            "trial {n}: server {i} killed, server {other} leads after {} ms, decides after {} ms",
            t.as_millis(),
            d.as_millis()
        );
        took.push(t);
        decided.push(d);
        // The stopped one has exited (its port is free) before it starts again.
        wait_for(
            "the stopped server to exit",
            Duration::from_secs(30),
            async || !procs[i].as_mut().expect("a process").running(),
        )
        .await;
        procs[i] = Some(server(&bin, &dirs[i], &addrs[i], &flag, ttl, &log(i, n)));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("machine: {}", machine());
    took.sort();
    decided.sort();
    println!(
        "first decision of the new leader: p50 {} ms, p99 {} ms, min {} ms, max {} ms",
        percentile(&decided, 0.5).as_millis(),
        percentile(&decided, 0.99).as_millis(),
        decided[0].as_millis(),
        decided[decided.len() - 1].as_millis()
    );
    println!(
        "leader failover ({}), 3-member etcd, lease {ttl} s, {trials} trials: p50 {} ms, p99 {} ms, min {} ms, max {} ms",
        if clean { "SIGTERM" } else { "SIGKILL" },
        percentile(&took, 0.5).as_millis(),
        percentile(&took, 0.99).as_millis(),
        took[0].as_millis(),
        took[took.len() - 1].as_millis()
    );
}
