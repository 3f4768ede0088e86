//! Admission (issue 11, item 4): 2,000 tiny workloads on 3 nodes of this machine, each
//! node offering what the machine has. The ones that fit run; the rest wait `pending`
//! with the reason; no node is over its capacity or its workload limit; and the API
//! keeps answering while they are placed. Bounded by generous deadlines only.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use avail_model::node::DEFAULT_MAX_WORKLOADS;
use avail_model::{Node, Phase, Workload};
use avail_testkit::{Cluster, guest, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_avail");

/// Workloads created.
const WORKLOADS: usize = 2000;
/// Requests creating them at once.
const CREATORS: usize = 8;
/// The longest a list of every workload may take while they are placed (a liveness
/// bound, not a measure: the benchmark measures).
const LIST_DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_tiny_workloads_fit_or_wait_with_the_reason() {
    // Each node offers the machine (as `avail agent` does by default).
    let m = avail_agent::capacity::machine();
    let offer = vec![
        "--cpu-millis".to_string(),
        m.cpu_millis.to_string(),
        "--memory-mib".to_string(),
        m.memory_mib.to_string(),
    ];
    let c = Cluster::start_with(BIN.as_ref(), 3, vec![offer; 3]).await;
    let api = c.client().with_timeout(LIST_DEADLINE);
    let bytes = std::fs::read(guest("counter")).unwrap();
    let art: serde_json::Value = api.put_bytes("/v1/artifacts", bytes.into()).await.unwrap();
    let digest = art["digest"].as_str().unwrap().to_string();

    // Creators, and a reader listing everything meanwhile.
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut creators = Vec::new();
    for _ in 0..CREATORS {
        let (api, next, digest) = (api.clone(), next.clone(), digest.clone());
        creators.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= WORKLOADS {
                    return;
                }
                let spec = serde_json::json!({
                    "name": format!("t{i}"), "driver": "wasm", "artifact": digest,
                    "resources": {"cpu_millis": 10, "memory_mib": 16},
                });
                let w: Workload = api
                    .post("/v1/workloads", &spec)
                    .await
                    .unwrap_or_else(|e| panic!("creating t{i}: {e}"));
                assert!(
                    matches!(
                        w.status.phase,
                        Phase::Placed | Phase::Running | Phase::Pending
                    ),
                    "{:?}",
                    w.status
                );
            }
        }));
    }
    let reader = {
        let api = api.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let mut lists = 0;
            // One list every half second (paced: the test checks liveness, not load).
            let mut every = tokio::time::interval(Duration::from_millis(500));
            while next.load(Ordering::Relaxed) < WORKLOADS {
                every.tick().await;
                // Fails the test if a list takes longer than LIST_DEADLINE.
                let ws: Vec<Workload> = api
                    .get("/v1/workloads")
                    .await
                    .unwrap_or_else(|e| panic!("list while placing: {e}"));
                assert!(ws.len() <= WORKLOADS);
                lists += 1;
            }
            lists
        })
    };
    for t in creators {
        t.await.unwrap();
    }
    let lists = reader.await.unwrap();
    eprintln!(
        "created {WORKLOADS} in {:?}, {lists} lists meanwhile",
        started.elapsed()
    );

    // Placed ones run; the others wait with the reason; nothing is over.
    let limit = DEFAULT_MAX_WORKLOADS as usize;
    let fit = 3 * limit.min((m.cpu_millis / 10) as usize);
    let (running, pending) = wait_until(
        "every placed workload running, the rest pending",
        Duration::from_secs(240),
        || {
            let api = api.clone();
            async move {
                let ws: Vec<Workload> =
                    api.get("/v1/workloads").await.map_err(|e| e.to_string())?;
                let running = ws
                    .iter()
                    .filter(|w| w.status.phase == Phase::Running)
                    .count();
                let pending: Vec<&Workload> = ws
                    .iter()
                    .filter(|w| w.status.phase == Phase::Pending)
                    .collect();
                if running == fit && pending.len() == WORKLOADS - fit {
                    Ok((running, pending.len()))
                } else {
                    Err(format!(
                        "{running} running, {} pending of {}",
                        pending.len(),
                        ws.len()
                    ))
                }
            }
        },
    )
    .await;
    eprintln!("{running} running, {pending} pending");
    let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
    for w in ws.iter().filter(|w| w.status.phase == Phase::Pending) {
        let m = w.status.message.as_deref().unwrap_or("");
        assert!(
            m.contains("at their workload limit"),
            "{}: {m}",
            w.spec.name
        );
    }
    let nodes: Vec<Node> = api.get("/v1/nodes").await.unwrap();
    for n in &nodes {
        assert!(n.workloads <= n.max_workloads, "{n:?}");
        assert!(n.capacity.fits(n.allocated), "{n:?}");
        assert_eq!(n.max_workloads, DEFAULT_MAX_WORKLOADS);
        assert_eq!(
            n.capacity.cpu_millis, m.cpu_millis,
            "the node offers the machine"
        );
    }
    // The API still answers a list of everything.
    let t = Instant::now();
    let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
    assert_eq!(ws.len(), WORKLOADS);
    eprintln!("a list of {} took {:?}", ws.len(), t.elapsed());
}
