//! Placements per second of `avail-sched` at 1,000 and 10,000 nodes with 20 tag keys,
//! on one core: a mix of requests (no rule, zone ==, compliance in, cores >=, kernel
//! version and zone !=; ft pairs on racks, a service spread across zones, ha
//! reservations on another rack, three priorities), planned in batches of 1,000 (the plan
//! accounts for its own placements), against a baseline in the same run: the same
//! requests through a plain scan that checks every node's tags one by one (the
//! first scheduler's algorithm). Then the latency of one all-or-nothing batch of 1,000
//! at 10,000 nodes.
//!
//! `cargo build --release -p avail-bench && target/release/sched_throughput`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use avail_bench::machine;
use avail_model::rng::SplitMix64;
use avail_model::{Constraint, Resources};
use avail_sched::{ClusterView, Decision, Group, NodeView, Request, Spread, plan, plan_all};

fn cluster(n: usize, rng: &mut SplitMix64) -> Vec<NodeView> {
    (0..n)
        .map(|i| {
            let mut tags = BTreeMap::new();
            let mut t = |k: &str, v: String| {
                tags.insert(k.to_string(), v);
            };
            t(
                "zone",
                ["tokyo", "osaka", "nagoya", "sapporo"][i % 4].into(),
            );
            t("dc", format!("dc{}", i % 8));
            t("rack", format!("r{}", i / 20));
            t(
                "perf",
                ["high", "standard", "low"][rng.below(3) as usize].into(),
            );
            t(
                "compliance",
                ["pci", "hipaa", "none", "none"][rng.below(4) as usize].into(),
            );
            t(
                "cores",
                ["8", "16", "32", "64"][rng.below(4) as usize].into(),
            );
            t("kernel", format!("6.{}", rng.below(12)));
            if rng.chance(10) {
                t("gpu", "a100".into());
            }
            for k in 0..12 {
                t(&format!("k{k}"), format!("v{}", rng.below(10)));
            }
            NodeView {
                name: format!("node-{i:05}"),
                tags,
                capacity: Resources {
                    cpu_millis: 64_000,
                    memory_mib: 262_144,
                },
                allocated: Resources {
                    cpu_millis: rng.below(32_000) as u32,
                    memory_mib: rng.below(131_072) as u32,
                },
                workloads: 0,
                max_workloads: avail_model::node::DEFAULT_MAX_WORKLOADS,
                schedulable: !rng.chance(3),
                reserved: vec![],
            }
        })
        .collect()
}

fn requests(n: usize, rng: &mut SplitMix64) -> Vec<Request> {
    (0..n)
        .map(|i| {
            let rules: &[&str] = match i % 6 {
                0 => &[],
                1 => &["zone == tokyo"],
                2 => &["compliance in [pci, hipaa]"],
                3 => &["cores >= 16"],
                4 => &["kernel >= 6.8", "zone != osaka"],
                _ => &["perf == high"],
            };
            Request {
                workload: format!("w{i}"),
                resources: Resources {
                    cpu_millis: 100 + rng.below(900) as u32,
                    memory_mib: 128 + rng.below(2048) as u32,
                },
                constraints: rules
                    .iter()
                    .map(|r| Constraint::parse(r).unwrap())
                    .collect(),
                pair: (i % 5 == 0).then(|| "rack".to_string()),
                // Every 7th a member of a service spread evenly across zones; every
                // 11th at level ha, with its restart capacity reserved on another rack.
                group: (i % 7 == 0).then(|| Group {
                    name: "svc".into(),
                    spread: Some(Spread {
                        tag: "zone".into(),
                        targets: vec![],
                    }),
                    ..Group::default()
                }),
                reserve: (i % 11 == 0).then(|| "rack".to_string()),
                priority: (i % 3) as i32,
                ..Request::default()
            }
        })
        .collect()
}

/// The first scheduler's way: every node, every rule, one by one.
fn naive(nodes: &[NodeView], reqs: &[Request]) -> usize {
    let mut used = vec![
        Resources {
            cpu_millis: 0,
            memory_mib: 0
        };
        nodes.len()
    ];
    let mut placed = 0;
    for r in reqs {
        let replicas = if r.pair.is_some() { 2 } else { 1 };
        let mut taken: Vec<usize> = Vec::new();
        for _ in 0..replicas {
            let mut best: Option<(i64, usize)> = None;
            for (i, n) in nodes.iter().enumerate() {
                if !n.schedulable || taken.contains(&i) {
                    continue;
                }
                if let (Some(tag), Some(&p)) = (&r.pair, taken.first())
                    && n.tags.get(tag) == nodes[p].tags.get(tag)
                {
                    continue;
                }
                if !r.constraints.iter().all(|c| c.matches(&n.tags)) {
                    continue;
                }
                let free = n
                    .capacity
                    .saturating_sub(n.allocated)
                    .saturating_sub(used[i]);
                if !free.fits(r.resources) {
                    continue;
                }
                let s = i64::from(free.memory_mib) + i64::from(free.cpu_millis);
                if best.is_none_or(|(bs, _)| s > bs) {
                    best = Some((s, i));
                }
            }
            if let Some((_, i)) = best {
                used[i] = used[i].saturating_add(r.resources);
                taken.push(i);
            }
        }
        if taken.len() == replicas {
            placed += 1;
        }
    }
    placed
}

fn rate(placements: usize, d: Duration) -> f64 {
    placements as f64 / d.as_secs_f64()
}

fn main() {
    println!("machine: {}; one core (one thread)", machine());
    let mut rng = SplitMix64(42);
    let mut per_placement = Vec::new();
    for n in [1_000usize, 10_000] {
        let nodes = cluster(n, &mut rng);
        let view = ClusterView::from_nodes(nodes.clone());
        let reqs = requests(1_000, &mut rng);
        // Indexed scheduler: 20 batches of 1,000.
        let t = Instant::now();
        let mut placed = 0;
        let rounds = 20;
        for round in 0..rounds {
            let p = plan(&view, &reqs, &mut SplitMix64(round));
            placed += p
                .decisions
                .iter()
                .filter(|(_, d)| matches!(d, Decision::Place { .. }))
                .count();
        }
        let fast = t.elapsed();
        // Baseline: 2 batches (it is slow).
        let t = Instant::now();
        let mut placed_naive = 0;
        let naive_rounds = 2;
        for _ in 0..naive_rounds {
            placed_naive += naive(&nodes, &reqs);
        }
        let slow = t.elapsed();
        let r_fast = rate(rounds as usize * reqs.len(), fast);
        let r_slow = rate(naive_rounds * reqs.len(), slow);
        println!(
            "{n} nodes: indexed {r_fast:.0} placements/s ({:.1} us each; {placed} of {} placed), plain scan {r_slow:.0}/s ({placed_naive} of {} placed); ratio {:.1}x",
            1e6 / r_fast,
            rounds as usize * reqs.len(),
            naive_rounds * reqs.len(),
            r_fast / r_slow
        );
        per_placement.push(1e6 / r_fast);
        if n == 10_000 {
            let t = Instant::now();
            let batch: Vec<Request> = requests(1_000, &mut rng)
                .into_iter()
                .map(|mut r| {
                    r.resources.cpu_millis = 100;
                    r.resources.memory_mib = 128;
                    r
                })
                .collect();
            let ok = plan_all(&view, &batch, &mut SplitMix64(7));
            println!(
                "10000 nodes: one all-or-nothing batch of 1000: {:.1} ms ({})",
                t.elapsed().as_secs_f64() * 1e3,
                if ok.is_ok() { "placed" } else { "refused" }
            );
        }
    }
    println!(
        "cost per placement 10k / 1k nodes: {:.2}x (10x the nodes)",
        per_placement[1] / per_placement[0]
    );
}
