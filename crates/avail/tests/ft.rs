//! Level `ft` end to end: the bank guest at level ft on a 3-agent cluster, clients
//! sending transfers with idempotency keys through an ingress, the primary's agent
//! SIGKILLed at a seeded moment. Checked after failover: every acknowledged transfer is
//! applied exactly once (transfer sequence numbers are 1..n with no gap or repeat), the
//! total balance is unchanged, a repeated key is answered from the reply log.
//!
//! `AVAIL_SEED=<n>` reproduces one trial; `AVAIL_FT_TRIALS` sets how many (default 30
//! for one host death, 1 for two successive deaths).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use avail_client::Client;
use avail_model::Workload;
use avail_statepoint::rng::SplitMix64 as Rng;
use avail_testkit::{Cluster, guest, wait_until};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

async fn workload(c: &Cluster) -> Workload {
    c.client().get("/v1/workloads/bank").await.unwrap()
}

async fn protected(c: &Cluster) -> Workload {
    let c2 = c.client();
    wait_until("bank ft:protected", Duration::from_secs(30), || {
        let c2 = c2.clone();
        async move {
            let w: Workload = c2
                .get("/v1/workloads/bank")
                .await
                .map_err(|e| e.to_string())?;
            if w.status.level_state.as_deref() == Some("ft:protected")
                && w.status.secondary.is_some()
            {
                Ok(w)
            } else {
                Err(format!("{:?}", w.status))
            }
        }
    })
    .await
}

/// Run the bank guest at level ft and wait until it is protected.
async fn deploy_bank_ft(c: &Cluster) -> Workload {
    let out = c.cli(&[
        "workload",
        "run",
        "--name",
        "bank",
        "--driver",
        "wasm",
        "--artifact",
        &guest("bank"),
        "--level",
        "ft",
        "--memory-mib",
        "16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    protected(c).await
}

/// The agent index of a node name (`node-2` -> 1).
fn index(node: &str) -> usize {
    node.trim_start_matches("node-").parse::<usize>().unwrap() - 1
}

/// Send one transfer until it is acknowledged (the ingress retries across failover; the
/// client retries on top, with the same key). Returns the reply's JSON.
async fn transfer(
    ingress: &Client,
    key: &str,
    from: u64,
    to: u64,
    amount: u64,
    seed: u64,
) -> serde_json::Value {
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
        match r {
            Ok(r) if r.status == 200 || r.status == 409 => {
                let mut v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                v["_status"] = r.status.as_u16().into();
                v["_replayed"] = r.headers.contains_key("avail-replayed").into();
                return v;
            }
            Ok(r) => assert!(
                Instant::now() < end,
                "seed {seed}: transfer {key} kept failing: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ),
            Err(e) => assert!(
                Instant::now() < end,
                "seed {seed}: transfer {key} kept failing: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One trial: `deaths` successive SIGKILLs of the active replica's host (a new
/// secondary is synced in between), on a cluster of `2 + deaths` agents.
async fn trial(seed: u64, deaths: usize) {
    eprintln!("ft trial seed {seed} (AVAIL_SEED={seed}), {deaths} host death(s)");
    let mut rng = Rng(seed);
    let mut c = Cluster::start(BIN.as_ref(), 2 + deaths).await;
    let w = deploy_bank_ft(&c).await;
    // The client's ingress: a node that is neither of the first pair, and never killed
    // (only active replicas are).
    let pair = [
        index(w.status.node.as_deref().unwrap()),
        index(w.status.secondary.as_deref().unwrap()),
    ];
    let entry = (0..2 + deaths).find(|i| !pair.contains(i)).unwrap();
    let ingress = Client::new(&c.ingress(entry), None, None).with_timeout(Duration::from_secs(20));

    let per_phase = 40;
    let mut applied = Vec::new();
    let mut n = 0;
    for death in 0..=deaths {
        let w = protected(&c).await;
        let primary = w.status.node.clone().unwrap();
        let secondary = w.status.secondary.clone().unwrap();
        assert_ne!(primary, secondary);
        let kill_at = if death < deaths {
            Some(5 + rng.next_u64() % (per_phase - 10))
        } else {
            None
        };
        for i in 0..per_phase {
            if Some(i) == kill_at {
                let victim = index(&primary);
                assert_ne!(
                    victim, entry,
                    "seed {seed}: the client's ingress is not a victim"
                );
                eprintln!("seed {seed}: SIGKILL {primary} (active) after {n} transfers");
                c.kill_agent(victim);
            }
            let (from, to) = (rng.next_u64() % 100, rng.next_u64() % 100);
            let to = if to == from { (to + 1) % 100 } else { to };
            let v = transfer(
                &ingress,
                &format!("t-{seed}-{n}"),
                from,
                to,
                1 + rng.next_u64() % 50,
                seed,
            )
            .await;
            if v["_status"] == 200 {
                applied.push(v["seq"].as_u64().unwrap());
            }
            n += 1;
        }
        if kill_at.is_some() {
            // The former secondary is the active replica now, at a newer generation.
            let after = workload(&c).await;
            assert_eq!(
                after.status.node.as_deref(),
                Some(secondary.as_str()),
                "seed {seed}: {:?}",
                after.status
            );
            assert!(
                after.status.generation > w.status.generation,
                "seed {seed}: {:?}",
                after.status
            );
        }
    }
    // A repeated key is answered from the reply log, not run again.
    let again = transfer(&ingress, &format!("t-{seed}-{}", n - 1), 0, 1, 1, seed).await;
    if again["_status"] == 200 {
        assert_eq!(again["_replayed"], true, "seed {seed}");
        assert_eq!(
            again["seq"].as_u64(),
            applied.last().copied(),
            "seed {seed}"
        );
    }
    let r = ingress
        .raw(Method::GET, "/w/bank/balances", None, &[])
        .await
        .unwrap();
    let b: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(b["total"], 100000, "seed {seed}: total changed");
    let seqs: BTreeSet<u64> = applied.iter().copied().collect();
    assert_eq!(
        seqs.len(),
        applied.len(),
        "seed {seed}: a seq was acknowledged twice: {applied:?}"
    );
    assert_eq!(
        b["transfers"].as_u64().unwrap(),
        applied.len() as u64,
        "seed {seed}: applied transfers != acknowledged ({applied:?})"
    );
    assert_eq!(
        seqs,
        (1..=applied.len() as u64).collect::<BTreeSet<_>>(),
        "seed {seed}: gap in seqs"
    );
}

fn seeds(default_trials: u64) -> Vec<u64> {
    match std::env::var("AVAIL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => {
            let n: u64 = std::env::var("AVAIL_FT_TRIALS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default_trials);
            (1..=n).collect()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ft_survives_two_successive_host_deaths() {
    for s in seeds(1) {
        trial(1000 + s, 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ft_survives_primary_host_death_without_losing_acknowledged_transfers() {
    for s in seeds(30) {
        trial(s, 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_hosts_dead_is_reported_failed_not_lost() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    let w = deploy_bank_ft(&c).await;
    c.kill_agent(index(w.status.node.as_deref().unwrap()));
    c.kill_agent(index(w.status.secondary.as_deref().unwrap()));
    let api = c.client();
    wait_until("bank reported failed", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let w: Workload = api
                .get("/v1/workloads/bank")
                .await
                .map_err(|e| e.to_string())?;
            if w.status.phase == avail_model::Phase::Failed {
                Ok(())
            } else {
                Err(format!("{:?}", w.status))
            }
        }
    })
    .await;
}

/// A module that implements the guest ABI but changes a table at run time: fine at level
/// none, refused at level ft with the reason.
fn table_mutating_module() -> Vec<u8> {
    use wasm_encoder::*;
    let mut m = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]);
    types
        .ty()
        .function([ValType::I32, ValType::I32], [ValType::I64]);
    m.section(&types);
    let mut funcs = FunctionSection::new();
    funcs.function(0);
    funcs.function(1);
    m.section(&funcs);
    let mut tables = TableSection::new();
    tables.table(TableType {
        element_type: RefType::FUNCREF,
        table64: false,
        minimum: 1,
        maximum: None,
        shared: false,
    });
    m.section(&tables);
    let mut mems = MemorySection::new();
    mems.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    m.section(&mems);
    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0);
    exports.export("avail_alloc", ExportKind::Func, 0);
    exports.export("avail_handle", ExportKind::Func, 1);
    m.section(&exports);
    let mut code = CodeSection::new();
    let mut alloc = Function::new([]);
    alloc
        .instruction(&Instruction::I32Const(1024))
        .instruction(&Instruction::End);
    code.function(&alloc);
    let mut handle = Function::new([]);
    handle
        .instruction(&Instruction::I32Const(0))
        .instruction(&Instruction::RefNull(HeapType::FUNC))
        .instruction(&Instruction::TableSet(0))
        .instruction(&Instruction::I64Const(0))
        .instruction(&Instruction::End);
    code.function(&handle);
    m.section(&code);
    m.finish()
}

#[tokio::test]
async fn modules_whose_state_cannot_be_captured_are_refused_for_ft_only() {
    let c = Cluster::start(BIN.as_ref(), 2).await;
    let path = c.dir.path().join("tables.wasm");
    std::fs::write(&path, table_mutating_module()).unwrap();
    let p = path.to_str().unwrap();
    let out = c.cli(&[
        "workload",
        "run",
        "--detach",
        "--name",
        "t-ft",
        "--driver",
        "wasm",
        "--artifact",
        p,
        "--level",
        "ft",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot run at level ft")
            && err.contains("table.set")
            && err.contains("field: artifact"),
        "{err}"
    );
    let out = c.cli(&[
        "workload",
        "run",
        "--detach",
        "--name",
        "t-none",
        "--driver",
        "wasm",
        "--artifact",
        p,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
