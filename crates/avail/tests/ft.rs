//! Level `ft` end to end: the bank guest at level ft on a 3-agent cluster, clients
//! sending transfers with idempotency keys through an ingress, the primary's agent
//! SIGKILLed at a seeded moment. Checked after failover: every acknowledged transfer is
//! applied exactly once (transfer sequence numbers are 1..n with no gap or repeat), the
//! total balance is unchanged, a repeated key is answered from the reply log.
//!
//! `AVAIL_SEED=<n>` reproduces one trial; `AVAIL_FT_TRIALS` sets how many (default 30
//! for one host death, 1 for two successive deaths).

use std::time::Duration;

use avail_model::Workload;
use avail_testkit::ft::{bank_trial, deploy_bank_ft, index};
use avail_testkit::{Cluster, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_avail");

async fn trial(seed: u64, deaths: usize) {
    eprintln!("ft trial seed {seed} (AVAIL_SEED={seed}), {deaths} host death(s)");
    if let Err(e) = bank_trial(BIN.as_ref(), seed, deaths).await {
        panic!("{e}");
    }
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
    c.wait_workload("bank", "reported failed", Duration::from_secs(30), |w| {
        if w.status.phase == avail_model::Phase::Failed {
            Ok(())
        } else {
            Err(format!("{:?}", w.status))
        }
    })
    .await;
}

/// What makes a test module's state impossible to capture.
#[derive(Clone, Copy, PartialEq)]
enum Uncapturable {
    /// Its handler changes a table (`table.set`).
    TableSet,
    /// It has a mutable `externref` global.
    ExternrefGlobal,
    /// Its memory is shared.
    SharedMemory,
}

/// A module that implements the guest ABI but whose state cannot be captured.
fn uncapturable_module(kind: Uncapturable) -> Vec<u8> {
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
    let shared = kind == Uncapturable::SharedMemory;
    mems.memory(MemoryType {
        minimum: 1,
        maximum: shared.then_some(1),
        memory64: false,
        shared,
        page_size_log2: None,
    });
    m.section(&mems);
    if kind == Uncapturable::ExternrefGlobal {
        let mut globals = GlobalSection::new();
        globals.global(
            GlobalType {
                val_type: ValType::Ref(RefType::EXTERNREF),
                mutable: true,
                shared: false,
            },
            &ConstExpr::ref_null(HeapType::EXTERN),
        );
        m.section(&globals);
    }
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
    if kind == Uncapturable::TableSet {
        handle
            .instruction(&Instruction::I32Const(0))
            .instruction(&Instruction::RefNull(HeapType::FUNC))
            .instruction(&Instruction::TableSet(0));
    }
    handle
        .instruction(&Instruction::I64Const(0))
        .instruction(&Instruction::End);
    code.function(&handle);
    m.section(&code);
    m.finish()
}

#[tokio::test]
async fn modules_whose_state_cannot_be_captured_are_refused_for_ft_only() {
    let c = Cluster::start(BIN.as_ref(), 2).await;
    for (kind, name, reason) in [
        (Uncapturable::TableSet, "tables", "table.set"),
        (Uncapturable::ExternrefGlobal, "externref", "global"),
        (Uncapturable::SharedMemory, "shared", "shared"),
    ] {
        refused_for_ft_only(&c, kind, name, reason).await;
    }
}

async fn refused_for_ft_only(c: &Cluster, kind: Uncapturable, name: &str, reason: &str) {
    let path = c.dir.path().join(format!("{name}.wasm"));
    std::fs::write(&path, uncapturable_module(kind)).unwrap();
    let p = path.to_str().unwrap();
    let out = c.cli(&[
        "workload",
        "run",
        "--detach",
        "--name",
        &format!("{name}-ft"),
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
            && err.contains(reason)
            && err.contains("field: artifact"),
        "{name}: {err}"
    );
    let out = c.cli(&[
        "workload",
        "run",
        "--detach",
        "--name",
        &format!("{name}-none"),
        "--driver",
        "wasm",
        "--artifact",
        p,
    ]);
    assert!(
        out.status.success(),
        "{name} at level none: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requests without a key get one from the ingress; once the ingress has delivered a
/// reply it reports the key and the replica trims it, so the reply log holds only
/// replies still in flight, not every write of the last minute. Client keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_log_is_trimmed_by_delivered_ingress_keys() {
    let c = Cluster::start(BIN.as_ref(), 3).await;
    let w = deploy_bank_ft(&c).await;
    let entry = avail_testkit::ft::bystander(&c, &w);
    let ingress = avail_client::Client::new(&c.ingress(entry), None, None);
    for i in 0..300u64 {
        let body = format!(
            r#"{{"from":{},"to":{},"amount":1}}"#,
            i % 100,
            (i + 1) % 100
        );
        let r = ingress
            .raw(
                hyper::Method::POST,
                "/w/bank/transfer",
                Some((body.into(), "application/json")),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    for i in 0..5u64 {
        let r = ingress
            .raw(
                hyper::Method::POST,
                "/w/bank/transfer",
                Some((r#"{"from":1,"to":2,"amount":1}"#.into(), "application/json")),
                &[("idempotency-key", &format!("client-{i}"))],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    c.wait_workload(
        "bank",
        "the reply log trimmed",
        Duration::from_secs(20),
        |w| {
            let ft = w.status.ft.clone().ok_or("no ft status")?;
            // 305 replies logged; at most one request's worth of deliveries (64) is not
            // reported yet, plus the 5 client keys.
            if ft.reply_log_entries >= 5 && ft.reply_log_entries <= 5 + 64 {
                Ok(())
            } else {
                Err(format!("{ft:?}"))
            }
        },
    )
    .await;
    // A client's key is still answered from the log.
    let r = ingress
        .raw(
            hyper::Method::POST,
            "/w/bank/transfer",
            Some((r#"{"from":1,"to":2,"amount":1}"#.into(), "application/json")),
            &[("idempotency-key", "client-0")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("avail-replayed"));
    // The same figures in Prometheus metrics.
    let m = c
        .client()
        .raw(hyper::Method::GET, "/metrics", None, &[])
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&m.body);
    for want in [
        r#"avail_ft_protected{workload="bank"} 1"#,
        r#"avail_ft_generation{workload="bank"} 1"#,
        r#"avail_ft_reply_log_entries{workload="bank"} "#,
        r#"avail_ft_tracker{workload="bank",tracker="#,
    ] {
        assert!(text.contains(want), "{want} not in\n{text}");
    }
}

/// The replication link between the two replicas is cut (iptables on their loopback
/// addresses) while both hosts live and still reach the control plane: exactly one side
/// goes on, at the next generation; no acknowledged transfer is lost or applied twice;
/// the pair heals with a new secondary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_between_live_replicas_leaves_exactly_one_going_on() {
    use avail_testkit::LinkCut;
    use avail_testkit::ft::{protected, transfer};
    let c = Cluster::start(BIN.as_ref(), 3).await;
    let w = deploy_bank_ft(&c).await;
    let (p, s) = (
        index(w.status.node.as_deref().unwrap()),
        index(w.status.secondary.as_deref().unwrap()),
    );
    let entry = avail_testkit::ft::bystander(&c, &w);
    let ingress = avail_client::Client::new(&c.ingress(entry), None, None)
        .with_timeout(Duration::from_secs(20));
    let mut applied = Vec::new();
    let mut nodes_after = std::collections::BTreeSet::new();
    let mut cut = None;
    for n in 0..80u64 {
        if n == 20 {
            eprintln!(
                "cutting the link between {} and {}",
                c.agent_addr(p),
                c.agent_addr(s)
            );
            cut = Some(LinkCut::new(&c.agent_addr(p), &c.agent_addr(s)));
        }
        let v = transfer(&ingress, &format!("cut-{n}"), n % 100, (n + 7) % 100, 1)
            .await
            .unwrap();
        if v["_status"] == 200 {
            applied.push(v["seq"].as_u64().unwrap());
        }
        if n >= 60 {
            nodes_after.insert(v["_node"].as_str().unwrap_or_default().to_string());
        }
    }
    let after: Workload = c.client().get("/v1/workloads/bank").await.unwrap();
    let winner = after.status.node.clone().unwrap();
    eprintln!("after the cut: {:?}", after.status);
    assert!(
        after.status.generation > w.status.generation,
        "a failover happened: {:?}",
        after.status
    );
    assert!(
        [Cluster::agent_name(p), Cluster::agent_name(s)].contains(&winner),
        "one of the pair goes on: {:?}",
        after.status
    );
    assert_eq!(
        nodes_after,
        std::collections::BTreeSet::from([winner.clone()]),
        "once settled, only the winner answers"
    );
    // The pair heals (the new secondary is not across the cut from the winner).
    let healed = protected(&c, "bank").await;
    assert_eq!(healed.status.node.as_deref(), Some(winner.as_str()));
    drop(cut);
    // Exactly once: seqs 1..n, the total unchanged.
    let b = avail_testkit::ft::balances(&ingress).await.unwrap();
    assert_eq!(b["total"], 100000);
    assert_eq!(
        b["transfers"].as_u64(),
        Some(applied.len() as u64),
        "{applied:?}"
    );
    let seqs: std::collections::BTreeSet<u64> = applied.iter().copied().collect();
    assert_eq!(seqs, (1..=applied.len() as u64).collect(), "{applied:?}");
}

/// A secondary whose node cannot hold its checkpoint image (the node's budget for
/// images, `--ft-secondary-memory-mib`, is 1 MiB; the bank guest's image is larger)
/// refuses it and fails instead of acking; the primary takes the next generation, the
/// control plane places a secondary elsewhere, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_out_of_memory_is_replaced_elsewhere() {
    use avail_testkit::ft::{protected, transfer};
    let tiny = vec!["--ft-secondary-memory-mib".to_string(), "1".to_string()];
    let c = Cluster::start_with(BIN.as_ref(), 3, vec![vec![], tiny]).await;
    avail_testkit::ft::run_bank_ft(&c, &["--detach"]);
    // Placement is deterministic (ties go to the name that sorts first): the primary
    // on node-1, the first secondary on node-2, the node with the tiny budget.
    let api = c.client();
    wait_until(
        "the secondary on node-2 fails for memory",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let ev: serde_json::Value = api
                    .get("/v1/workloads/bank/events")
                    .await
                    .map_err(|e| e.to_string())?;
                let text = ev.to_string();
                if text.contains("workload.secondary_failed") && text.contains("out of memory") {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    let w = protected(&c, "bank").await;
    assert_eq!(w.status.node.as_deref(), Some("node-1"), "{:?}", w.status);
    assert_eq!(
        w.status.secondary.as_deref(),
        Some("node-3"),
        "{:?}",
        w.status
    );
    assert!(w.status.generation >= 2, "{:?}", w.status);
    let ingress = avail_client::Client::new(&c.ingress(2), None, None);
    for n in 0..10u64 {
        let v = transfer(&ingress, &format!("oom-{n}"), n, n + 1, 1)
            .await
            .unwrap();
        assert_eq!(v["seq"].as_u64(), Some(n + 1));
    }
}

/// The replication port of a live secondary, attacked. Without a certificate of the
/// cluster (plain TCP, TLS without a client certificate) nothing is heard; with another
/// node's certificate (a bystander's, stolen from its data dir) a Hello as the primary
/// is closed at once. With the primary's own certificate (a compromised primary), bad
/// frames are refused whole: a corrupt frame, a torn one, one of an older generation and
/// one for another workload are never acked (the secondary asks for a full image); a
/// link for a workload the node does not hold is closed at once. The pair then heals
/// and the workload's state is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_on_the_replication_link_are_refused_whole() {
    use avail_statepoint::frame::{self, Frame};
    use avail_statepoint::state::StateDelta;
    use avail_testkit::ft::{protected, transfer};
    use avail_testkit::peer::{Alpn, As, dial};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn send<S: AsyncWrite + Unpin>(s: &mut S, kind: u8, body: &[u8]) {
        let mut m = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        m.push(kind);
        m.extend_from_slice(body);
        s.write_all(&m).await.unwrap();
    }
    /// The kinds of the messages the secondary sends within `ms` (acks with epochs).
    async fn replies<S: AsyncRead + Unpin>(s: &mut S, ms: u64) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            let mut len = [0u8; 4];
            match tokio::time::timeout_at(end, s.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return out,
            }
            let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
            if s.read_exact(&mut buf).await.is_err() {
                return out;
            }
            let epoch = buf
                .get(9..17)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .unwrap_or(0);
            out.push((buf[0], epoch));
        }
    }
    let hello = |workload: &str, uid: &str, generation: u64| {
        serde_json::json!({"workload": workload, "uid": uid, "generation": generation}).to_string()
    };
    let frame = |workload: &str, generation: u64, epoch: u64| {
        frame::encode(&Frame {
            workload: workload.into(),
            generation,
            epoch,
            delta: StateDelta {
                full: true,
                ..StateDelta::default()
            },
        })
        .unwrap()
    };

    let c = Cluster::start(BIN.as_ref(), 3).await;
    let w = deploy_bank_ft(&c).await;
    let entry = avail_testkit::ft::bystander(&c, &w);
    let ingress = avail_client::Client::new(&c.ingress(entry), None, None)
        .with_timeout(Duration::from_secs(20));
    for n in 0..5u64 {
        transfer(&ingress, &format!("bf-{n}"), n, n + 1, 1)
            .await
            .unwrap();
    }
    let secondary = index(w.status.secondary.as_deref().unwrap());
    let primary = index(w.status.node.as_deref().unwrap());
    let target = format!("{}:7481", c.agent_addr(secondary));
    let g = w.status.generation;
    let bank_hello = hello("bank", &w.uid, g);

    // Plain TCP, speaking the link's protocol: no TLS, nothing heard.
    let mut s = TcpStream::connect(&target).await.unwrap();
    send(&mut s, 1, bank_hello.as_bytes()).await;
    assert!(replies(&mut s, 500).await.is_empty());
    // TLS without a client certificate: refused in the handshake.
    let r = match dial(&c, As::Anonymous, secondary, Alpn::Replication).await {
        Ok(mut s) => {
            send(&mut s, 1, bank_hello.as_bytes()).await;
            replies(&mut s, 500).await
        }
        Err(_) => vec![],
    };
    assert!(r.is_empty(), "an anonymous link was answered: {r:?}");
    // A bystander's certificate, saying Hello as the primary: closed at once.
    let mut s = dial(&c, As::Node(entry), secondary, Alpn::Replication)
        .await
        .expect("a node certificate passes the handshake");
    send(&mut s, 1, bank_hello.as_bytes()).await;
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "another node's link as the primary closed: {r:?}"
    );

    // A workload this node holds no secondary of: closed at once.
    let mut s = dial(&c, As::Node(primary), secondary, Alpn::Replication)
        .await
        .unwrap();
    send(&mut s, 1, hello("nobody", "x", g).as_bytes()).await;
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "link for an unknown workload closed: {r:?}"
    );

    let mut s = dial(&c, As::Node(primary), secondary, Alpn::Replication)
        .await
        .unwrap();
    // The real primary is cut off from its secondary first, or it would dial again and
    // take the link back (the newest link wins) within a millisecond; without it, the
    // secondary waits a failure window before anything else happens.
    let cut = avail_testkit::LinkCut::new(&c.agent_addr(primary), &c.agent_addr(secondary));
    send(&mut s, 1, bank_hello.as_bytes()).await;
    // Corrupt: a good frame with one bit flipped.
    let mut bad = frame("bank", g, 1_000_000);
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    send(&mut s, 2, &bad).await;
    // Another workload's frame, well formed.
    send(&mut s, 2, &frame("other", g, 1_000_001)).await;
    // An older generation's frame, well formed.
    send(&mut s, 2, &frame("bank", g - 1, 1_000_002)).await;
    let got = replies(&mut s, 100).await;
    assert!(
        got.iter().all(|(k, _)| *k != 3),
        "nothing refused may be acked: {got:?}"
    );
    assert!(
        got.iter().any(|(k, _)| *k == 4),
        "a corrupt frame or another workload's gets a request for a full image: {got:?}"
    );
    // Torn: half a frame, then the link closes.
    let torn = frame("bank", g, 1_000_003);
    let mut m = ((torn.len() + 1) as u32).to_le_bytes().to_vec();
    m.push(2);
    m.extend_from_slice(&torn[..torn.len() / 2]);
    s.write_all(&m).await.unwrap();
    drop(s);
    drop(cut);

    // The pair heals (the impostor's link may have cost a generation) and nothing
    // acknowledged was lost.
    let w2 = protected(&c, "bank").await;
    assert!(w2.status.generation >= g);
    for n in 5..10u64 {
        let v = transfer(&ingress, &format!("bf-{n}"), n, n + 1, 1)
            .await
            .unwrap();
        assert_eq!(v["seq"].as_u64(), Some(n + 1), "{v}");
    }
    let b = avail_testkit::ft::balances(&ingress).await.unwrap();
    assert_eq!(b["total"], 100000);
    assert_eq!(b["transfers"], 10);
}

/// Write `module` and a spec for it to the cluster's dir and run it (`avail workload run
/// -f`, without waiting): workload `name` at `level`, handler deadline `timeout_ms`.
fn run_module(c: &Cluster, name: &str, module: &[u8], level: &str, timeout_ms: u32) {
    let dir = c.dir.path();
    std::fs::write(dir.join(format!("{name}.wasm")), module).unwrap();
    let spec = dir.join(format!("{name}.toml"));
    std::fs::write(
        &spec,
        format!(
            "name = \"{name}\"\ndriver = \"wasm\"\nartifact = \"{name}.wasm\"\nlevel = \"{level}\"\ntimeout_ms = {timeout_ms}\n\n[resources]\nmemory_mib = 2\n"
        ),
    )
    .unwrap();
    let out = c.cli(&["workload", "run", "--detach", "-f", spec.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `workload.failover` events of workload `name` so far.
async fn failovers(c: &Cluster, name: &str) -> Vec<String> {
    let ev: Vec<avail_model::ClusterEvent> = c
        .client()
        .get(&format!("/v1/workloads/{name}/events"))
        .await
        .unwrap();
    ev.into_iter()
        .filter(|e| e.kind == avail_model::EventKind::WorkloadFailover)
        .map(|e| e.message)
        .collect()
}

/// The guest's counter through an ingress (`GET`, answered at once).
async fn slow_counter(ingress: &avail_client::Client, name: &str) -> u64 {
    let r = ingress
        .raw(hyper::Method::GET, &format!("/w/{name}/"), None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    avail_testkit::slow_guest::counter(&r.body).expect("an 8-byte counter")
}

/// A guest whose writes take 300 ms each (its deadline is 400 ms), at level ft, under
/// several concurrent clients for some seconds: the replica's link keeps its heartbeats
/// while the guest runs, so nothing fails over: every request is answered 200 once,
/// the generation stays, no `workload.failover` event, the pair stays protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_near_their_deadline_cause_no_failover() {
    use avail_testkit::ft::protected;
    let c = Cluster::start(BIN.as_ref(), 3).await;
    run_module(
        &c,
        "slow",
        &avail_testkit::slow_guest::module(300),
        "ft",
        400,
    );
    let w = protected(&c, "slow").await;
    let entry = avail_testkit::ft::bystander(&c, &w);
    let ingress = avail_client::Client::new(&c.ingress(entry), None, None)
        .with_timeout(Duration::from_secs(30));
    assert_eq!(slow_counter(&ingress, "slow").await, 0);

    // 4 clients x 5 writes of 300 ms: some seconds of a guest busy all the time.
    let (clients, each) = (4, 5u64);
    let mut tasks = Vec::new();
    for k in 0..clients {
        let ingress = ingress.clone();
        tasks.push(tokio::spawn(async move {
            for sent in 0..each {
                let t = std::time::Instant::now();
                let r = ingress
                    .raw(
                        hyper::Method::POST,
                        "/w/slow/write",
                        Some((Vec::new().into(), "application/octet-stream")),
                        &[("idempotency-key", &format!("slow-{k}-{sent}"))],
                    )
                    .await
                    .map_err(|e| format!("client {k} request {sent}: {e}"))?;
                if r.status != 200 {
                    return Err(format!(
                        "client {k} request {sent}: {} after {:?}: {}",
                        r.status,
                        t.elapsed(),
                        String::from_utf8_lossy(&r.body)
                    ));
                }
                if r.headers.contains_key("avail-replayed") {
                    return Err(format!("client {k} request {sent} was replayed"));
                }
            }
            Ok::<u64, String>(each)
        }));
    }
    let mut sent = 0;
    let load = std::time::Instant::now();
    for t in tasks {
        sent += t.await.unwrap().unwrap();
    }
    eprintln!(
        "{sent} writes of 300 ms by {clients} clients in {:?}",
        load.elapsed()
    );
    // Each write ran exactly once, on the one primary.
    assert_eq!(slow_counter(&ingress, "slow").await, sent);
    let after = protected(&c, "slow").await;
    assert_eq!(
        after.status.generation, w.status.generation,
        "{:?}",
        after.status
    );
    assert_eq!(after.status.node, w.status.node, "{:?}", after.status);
    assert_eq!(failovers(&c, "slow").await, Vec::<String>::new());
    let m = c
        .client()
        .raw(hyper::Method::GET, "/metrics", None, &[])
        .await
        .unwrap();
    let want = format!(
        "avail_ft_generation{{workload=\"slow\"}} {}",
        w.status.generation
    );
    assert!(String::from_utf8_lossy(&m.body).contains(&want), "{want}");
}

/// A runaway handler (`timeout_ms = 500`) is stopped at its deadline and answered
/// `504 guest_timeout` well before the 10 s it once took, at levels `ft` and `none`.
/// At `ft` nothing fails over, and the instance goes on from the state the interrupted
/// call left (its counter moved), which the next checkpoint carries to the secondary: a
/// failover afterwards resumes from that same state. At `none` the instance is made
/// afresh (the counter starts again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_handlers_answer_504_at_their_deadline() {
    use avail_testkit::ft::protected;
    use avail_testkit::slow_guest::{RUNAWAY, module};
    let mut c = Cluster::start(BIN.as_ref(), 3).await;
    run_module(&c, "spin-ft", &module(RUNAWAY), "ft", 500);
    run_module(&c, "spin-none", &module(RUNAWAY), "none", 500);
    let w = protected(&c, "spin-ft").await;
    c.wait_workload("spin-none", "running", Duration::from_secs(30), |w| {
        (w.status.phase == avail_model::Phase::Running)
            .then_some(())
            .ok_or_else(|| format!("{:?}", w.status))
    })
    .await;
    let entry = avail_testkit::ft::bystander(&c, &w);
    let ingress = avail_client::Client::new(&c.ingress(entry), None, None)
        .with_timeout(Duration::from_secs(30));
    for (name, after) in [("spin-ft", 1), ("spin-none", 0)] {
        assert_eq!(slow_counter(&ingress, name).await, 0);
        let t = std::time::Instant::now();
        let r = ingress
            .raw(
                hyper::Method::POST,
                &format!("/w/{name}/spin"),
                Some((Vec::new().into(), "application/octet-stream")),
                &[("idempotency-key", &format!("{name}-1"))],
            )
            .await
            .unwrap();
        let took = t.elapsed();
        eprintln!(
            "{name}: a runaway with timeout_ms 500 answered {} in {took:?}",
            r.status
        );
        assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "guest_timeout", "{body}");
        // A generous liveness bound (the figure is in docs/benchmarks.md).
        assert!(took < Duration::from_secs(3), "{name}: 504 after {took:?}");
        assert_eq!(slow_counter(&ingress, name).await, after, "{name}");
    }
    let now = protected(&c, "spin-ft").await;
    assert_eq!(
        now.status.generation, w.status.generation,
        "{:?}",
        now.status
    );
    assert_eq!(failovers(&c, "spin-ft").await, Vec::<String>::new());

    // The secondary holds the state the interrupted call left: the primary's host dies,
    // and the new primary answers with the same counter.
    c.kill_agent(index(w.status.node.as_deref().unwrap()));
    c.wait_workload("spin-ft", "failed over", Duration::from_secs(30), |x| {
        (x.status.node == w.status.secondary && x.status.generation > w.status.generation)
            .then_some(())
            .ok_or_else(|| format!("{:?}", x.status))
    })
    .await;
    assert_eq!(slow_counter(&ingress, "spin-ft").await, 1);
}

/// 100 idle connections held open to each node's replication port (each opened again
/// when the node closes it at its hello deadline) do not stop a new ft workload from
/// reaching `ft:protected`: hellos are read concurrently, each within its own deadline
/// (they were read one after the other, 2 s each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_replication_port_do_not_delay_a_pair() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::io::AsyncReadExt;
    let c = Cluster::start(BIN.as_ref(), 3).await;
    let (stop, opened) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut idle = Vec::new();
    for i in 0..3 {
        let target = format!("{}:7481", c.agent_addr(i));
        for _ in 0..100 {
            let (target, stop, opened) = (target.clone(), stop.clone(), opened.clone());
            idle.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(&target).await {
                        opened.fetch_add(1, Ordering::Relaxed);
                        // Says nothing; waits until the node closes it (or the end).
                        let mut b = [0u8; 1];
                        let _ = tokio::time::timeout(Duration::from_secs(60), s.read(&mut b)).await;
                    }
                    // Paced, so a refused connection is not retried in a tight loop.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
    }
    wait_until("300 idle connections open", Duration::from_secs(30), || {
        let n = opened.load(Ordering::Relaxed);
        async move {
            if n >= 300 {
                Ok(())
            } else {
                Err(format!("{n} opened"))
            }
        }
    })
    .await;
    let t = std::time::Instant::now();
    avail_testkit::ft::run_bank_ft(&c, &["--detach"]);
    let w = avail_testkit::ft::protected(&c, "bank").await;
    eprintln!(
        "ft:protected {:?} after the run, with 100 idle connections on each replication port ({} opened in all)",
        t.elapsed(),
        opened.load(Ordering::Relaxed)
    );
    assert_eq!(w.status.generation, 1, "{:?}", w.status);
    stop.store(true, Ordering::Relaxed);
    for t in idle {
        t.abort();
    }
}
