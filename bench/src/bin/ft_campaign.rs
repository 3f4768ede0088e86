//! The level-`ft` kill campaign: `trials` seeded trials of `avail_testkit::ft::bank_trial`
//! (bank at level ft on a 3-agent cluster, transfers with idempotency keys, the active
//! replica's host SIGKILLed at a seeded moment, every acknowledged transfer checked
//! applied exactly once). Prints violations with their seeds (reproduce one with
//! `AVAIL_SEED=<seed> cargo nextest run -p avail -E 'test(ft_survives_primary)'`),
//! and the failover time from SIGKILL to the first acknowledged transfer after it.
//!
//! `cargo build --release -p avail -p avail-bench && target/release/ft_campaign [trials] [first_seed]`

use std::time::{Duration, Instant};

use avail_bench::{machine, percentile};
use avail_testkit::ft::bank_trial;

fn main() {
    let mut args = std::env::args().skip(1);
    let trials: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let first: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    println!("machine: {}", machine());
    let started = Instant::now();
    let (mut violations, mut acknowledged, mut failovers) = (Vec::new(), 0, Vec::<Duration>::new());
    for seed in first..first + trials {
        let bin = bin.clone();
        // A panic (the cluster did not come up) is counted apart from violations.
        let r = rt.block_on(async move {
            tokio::spawn(async move { bank_trial(&bin, seed, 1).await }).await
        });
        match r {
            Ok(Ok(rep)) => {
                acknowledged += rep.acknowledged;
                failovers.extend(rep.failovers);
            }
            Ok(Err(v)) => {
                println!("VIOLATION {v}");
                violations.push(seed);
            }
            Err(e) => {
                println!("seed {seed}: trial did not run to the end: {e}");
                violations.push(seed);
            }
        }
        let done = seed - first + 1;
        if done.is_multiple_of(50) {
            eprintln!(
                "{done}/{trials} trials, {} failed, {:.0} s",
                violations.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    failovers.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{trials} trials (seeds {first}..={}), {acknowledged} acknowledged transfers, {} failed: {:?}",
        first + trials - 1,
        violations.len(),
        violations
    );
    println!(
        "failover, SIGKILL to the first acknowledged transfer: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} deaths)",
        ms(percentile(&failovers, 0.5)),
        ms(percentile(&failovers, 0.99)),
        ms(failovers.last().copied().unwrap_or_default()),
        failovers.len()
    );
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    if !violations.is_empty() {
        std::process::exit(1);
    }
}
