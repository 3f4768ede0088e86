//! The level-`ft` kill trial, shared by the test suite (30 seeded trials in CI) and the
//! campaign benchmark (`ft_campaign`, 1,000 trials): the `bank` guest at level ft,
//! transfers with idempotency keys through an ingress that is never killed, the active
//! replica's host SIGKILLed at a seeded moment. After the failover(s) the checker
//! confirms every acknowledged transfer was applied exactly once (transfer sequence
//! numbers are 1..n with no gap or repeat), the total is unchanged, and a repeated key
//! is answered from the reply log.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use avail_client::Client;
use avail_model::Workload;
use avail_statepoint::rng::SplitMix64 as Rng;
use hyper::Method;

use crate::Cluster;

/// The workload `name`, waited for until it is `ft:protected` with a secondary.
pub async fn protected(c: &Cluster, name: &str) -> Workload {
    c.wait_workload(name, "ft:protected", Duration::from_secs(30), |w| {
        if avail_model::LevelState::is_protected(w.status.level_state, avail_model::Level::Ft)
            && w.status.secondary.is_some()
        {
            Ok(w.clone())
        } else {
            Err(format!("{:?}", w.status))
        }
    })
    .await
}

/// `avail workload run` of the bank guest as `bank` at level ft (16 MiB), with `extra`
/// arguments; asserts it was accepted.
pub fn run_bank_ft(c: &Cluster, extra: &[&str]) {
    let mut args = vec!["--level", "ft", "--memory-mib", "16"];
    args.extend_from_slice(extra);
    let out = c.run_wasm("bank", "bank", &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run the bank guest as `bank` at level ft and wait until it is protected.
pub async fn deploy_bank_ft(c: &Cluster) -> Workload {
    run_bank_ft(c, &[]);
    protected(c, "bank").await
}

/// The index of an agent that holds neither replica of `w` (a client's entry point
/// that is never a victim).
pub fn bystander(c: &Cluster, w: &Workload) -> usize {
    let pair = [w.status.node.as_deref(), w.status.secondary.as_deref()];
    (0..c.agents.len())
        .find(|i| !pair.contains(&Some(Cluster::agent_name(*i).as_str())))
        .expect("a node outside the pair")
}

/// The agent index of a node name (`node-2` -> 1).
pub fn index(node: &str) -> usize {
    node.trim_start_matches("node-").parse::<usize>().unwrap() - 1
}

/// Send one transfer until it is acknowledged (the ingress retries across a failover;
/// the client retries on top, with the same key). Returns the reply's JSON with
/// `_status`, `_replayed`, `_node` (the node that answered) and `_incarnation` added, or an error after 30 s of failures.
pub async fn transfer(
    ingress: &Client,
    key: &str,
    from: u64,
    to: u64,
    amount: u64,
) -> Result<serde_json::Value, String> {
    let body = format!(r#"{{"from":{from},"to":{to},"amount":{amount}}}"#);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ingress
            .raw(
                Method::POST,
                "/w/bank/transfer",
                Some((body.clone().into(), "application/json")),
                &[("idempotency-key", key)],
            )
            .await;
        let failure = match r {
            Ok(r) if r.status == 200 || r.status == 409 => {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&r.body).map_err(|e| format!("reply: {e}"))?;
                v["_status"] = r.status.as_u16().into();
                v["_replayed"] = r.headers.contains_key("avail-replayed").into();
                v["_node"] = r
                    .headers
                    .get("avail-node")
                    .and_then(|n| n.to_str().ok())
                    .unwrap_or_default()
                    .into();
                v["_incarnation"] = r
                    .headers
                    .get("avail-incarnation")
                    .and_then(|n| n.to_str().ok())
                    .unwrap_or_default()
                    .into();
                return Ok(v);
            }
            Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= end {
            return Err(format!("transfer {key} kept failing: {failure}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a clean trial saw.
#[derive(Clone, Debug)]
pub struct TrialReport {
    /// Transfers acknowledged with 200.
    pub acknowledged: usize,
    /// Per host death: from the SIGKILL to the first acknowledged transfer after it.
    pub failovers: Vec<Duration>,
}

/// One trial: `deaths` successive SIGKILLs of the active replica's host (a new
/// secondary is synced in between), on a cluster of `2 + deaths` agents. `Err` is a
/// violation of the guarantees (or the workload not served for 30 s), with the seed.
pub async fn bank_trial(bin: &Path, seed: u64, deaths: usize) -> Result<TrialReport, String> {
    let mut rng = Rng(seed);
    let mut c = Cluster::start(bin, 2 + deaths).await;
    let w = deploy_bank_ft(&c).await;
    // The client's ingress: a node that is neither of the first pair, and never killed
    // (only active replicas are).
    let entry = bystander(&c, &w);
    let ingress = Client::new(&c.ingress(entry), None, None).with_timeout(Duration::from_secs(20));
    let fail = |m: String| format!("seed {seed}: {m}");

    let per_phase = 40;
    let mut applied = Vec::new();
    let mut failovers = Vec::new();
    let mut n = 0;
    // The last transfer sent (from, to, amount): repeated at the end.
    let mut last = (0, 1, 1);
    for death in 0..=deaths {
        let w = protected(&c, "bank").await;
        let primary = w.status.node.clone().unwrap();
        let secondary = w.status.secondary.clone().unwrap();
        if primary == secondary {
            return Err(fail(format!("primary and secondary on {primary}")));
        }
        let kill_at = if death < deaths {
            Some(5 + rng.next_u64() % (per_phase - 10))
        } else {
            None
        };
        let mut killed = None;
        for i in 0..per_phase {
            if Some(i) == kill_at {
                let victim = index(&primary);
                assert_ne!(victim, entry, "the client's ingress is never a victim");
                eprintln!("seed {seed}: SIGKILL {primary} (active) after {n} transfers");
                killed = Some(Instant::now());
                c.kill_agent(victim);
            }
            let (from, to) = (rng.next_u64() % 100, rng.next_u64() % 100);
            let to = if to == from { (to + 1) % 100 } else { to };
            let amount = 1 + rng.next_u64() % 50;
            last = (from, to, amount);
            let v = transfer(&ingress, &format!("t-{seed}-{n}"), from, to, amount)
                .await
                .map_err(fail)?;
            if let Some(t) = killed.take() {
                failovers.push(t.elapsed());
            }
            if v["_status"] == 200 {
                applied.push(
                    v["seq"]
                        .as_u64()
                        .ok_or_else(|| fail(format!("no seq: {v}")))?,
                );
            }
            n += 1;
        }
        if kill_at.is_some() {
            // The former secondary is the active replica now, at a newer generation.
            let after: Workload = c
                .client()
                .get("/v1/workloads/bank")
                .await
                .map_err(|e| fail(e.to_string()))?;
            if after.status.node.as_deref() != Some(secondary.as_str())
                || after.status.generation <= w.status.generation
            {
                return Err(fail(format!(
                    "after the death of {primary} the active replica is not {secondary} at a newer generation: {:?}",
                    after.status
                )));
            }
        }
    }
    // A repeated request (same key, same body) is answered from the reply log, not run
    // again. (The same key with another body is refused: `422`.)
    let (from, to, amount) = last;
    let again = transfer(&ingress, &format!("t-{seed}-{}", n - 1), from, to, amount)
        .await
        .map_err(fail)?;
    if again["_status"] == 200
        && (again["_replayed"] != true || again["seq"].as_u64() != applied.last().copied())
    {
        return Err(fail(format!(
            "a repeated key was not answered from the log: {again}"
        )));
    }
    check_seqs(&ingress, &applied).await.map_err(fail)?;
    Ok(TrialReport {
        acknowledged: applied.len(),
        failovers,
    })
}

/// The bank's balances (`GET /w/bank/balances` through `ingress`).
pub async fn balances(ingress: &Client) -> Result<serde_json::Value, String> {
    let r = ingress
        .raw(Method::GET, "/w/bank/balances", None, &[])
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&r.body).map_err(|e| format!("balances: {e}"))
}

/// The bank checker over the `seq`s of acknowledged transfers (one closed-loop client,
/// one run of the workload): each acknowledged once, 1..n without a gap, and the
/// balances read through `ingress` keep the total and count n transfers. Returns n.
pub async fn check_seqs(ingress: &Client, seqs: &[u64]) -> Result<u64, String> {
    let b = balances(ingress).await?;
    if b["total"] != 100000 {
        return Err(format!("total changed: {b}"));
    }
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    if distinct.len() != seqs.len() {
        return Err(format!("a seq was acknowledged twice: {seqs:?}"));
    }
    if b["transfers"].as_u64() != Some(seqs.len() as u64) {
        return Err(format!(
            "{} transfers applied, {} acknowledged ({seqs:?})",
            b["transfers"],
            seqs.len()
        ));
    }
    if distinct != (1..=seqs.len() as u64).collect::<BTreeSet<_>>() {
        return Err(format!("gap in seqs: {seqs:?}"));
    }
    Ok(seqs.len() as u64)
}

/// [`check_seqs`] over the replies of acknowledged transfers (from [`transfer`]).
pub async fn check_bank(ingress: &Client, acked: &[serde_json::Value]) -> Result<u64, String> {
    let seqs: Vec<u64> = acked
        .iter()
        .filter(|v| v["_status"] == 200)
        .map(|v| v["seq"].as_u64().ok_or_else(|| format!("no seq: {v}")))
        .collect::<Result<_, _>>()?;
    check_seqs(ingress, &seqs).await
}

/// A closed-loop client sending bank transfers through an ingress, each until it is
/// acknowledged ([`transfer`], keys `<prefix>-<n>`), until stopped: the load of the
/// availability tests.
pub struct Transfers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Result<Vec<serde_json::Value>, String>>,
}

impl Transfers {
    /// Start sending.
    pub fn start(ingress: Client, prefix: &str) -> Transfers {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (halt, prefix) = (stop.clone(), prefix.to_string());
        let task = tokio::spawn(async move {
            let mut replies = Vec::new();
            let mut n = 0u64;
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                let (from, to) = (n % 100, (n * 7 + 1) % 100);
                let to = if to == from { (to + 1) % 100 } else { to };
                let v = transfer(&ingress, &format!("{prefix}-{n}"), from, to, 1 + n % 20).await?;
                replies.push(v);
                n += 1;
            }
            Ok(replies)
        });
        Transfers { stop, task }
    }

    /// Stop, and the replies in the order they came; `Err` if a transfer was never
    /// acknowledged.
    pub async fn stop(self) -> Result<Vec<serde_json::Value>, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.map_err(|e| e.to_string())?
    }
}
