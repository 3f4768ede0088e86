//! Events commit with their write: against the real redb store, through [`Events`]
//! and through the server's state.

use avail_model::EventKind;
use std::sync::Arc;

use avail_model::{ClusterEvent, Level, Phase, Workload, WorkloadStatus};
use avail_store::{Compare, Op, RedbStore, Store, Txn};
use tokio::sync::broadcast::error::TryRecvError;

use super::*;
use crate::state::StateError;

fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
    (dir, store)
}

fn put(key: &str, value: &[u8]) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
        lease: None,
    }
}

fn event(kind: EventKind) -> NewEvent {
    NewEvent::new(kind, Some("w"), None, kind.as_str())
}

/// Every stored event with its `mod_rev`, in sequence order.
async fn stored(store: &dyn Store) -> Vec<(ClusterEvent, u64)> {
    let (kvs, _) = store.range(keys::EVENTS).await.unwrap();
    kvs.iter()
        .map(|kv| (serde_json::from_slice(&kv.value).unwrap(), kv.mod_rev))
        .collect()
}

fn seqs(events: &[(ClusterEvent, u64)]) -> Vec<u64> {
    events.iter().map(|(e, _)| e.seq).collect()
}

/// What the broadcast holds now, by sequence number.
fn broadcast(rx: &mut tokio::sync::broadcast::Receiver<ClusterEvent>) -> Vec<u64> {
    let mut out = vec![];
    loop {
        match rx.try_recv() {
            Ok(ev) => out.push(ev.seq),
            Err(TryRecvError::Empty) => return out,
            Err(e) => panic!("broadcast: {e}"),
        }
    }
}

/// (a) A write whose compare fails commits neither itself nor its events, and nothing
/// is broadcast.
#[tokio::test]
async fn a_refused_write_records_and_broadcasts_nothing() {
    let (_dir, store) = store();
    let events = Events::open(store.clone()).await.unwrap();
    let mut rx = events.subscribe();
    let at = store
        .put("/workloads/w", b"v1".to_vec(), None)
        .await
        .unwrap();
    let txn = Txn {
        compares: vec![Compare::ModRev("/workloads/w".into(), at + 7)],
        success: vec![put("/workloads/w", b"v2")],
        failure: vec![],
    };
    let r = events
        .commit(txn, vec![event(EventKind::WorkloadPlaced)])
        .await;
    assert!(!r.unwrap().succeeded);
    assert_eq!(
        store.get("/workloads/w").await.unwrap().unwrap().value,
        b"v1"
    );
    assert!(
        stored(&*store).await.is_empty(),
        "an event of a refused write"
    );
    assert_eq!(broadcast(&mut rx), Vec::<u64>::new());
    assert_eq!(events.last_seq().await, 0);
    // The same by compare-and-swap.
    let cas = events
        .compare_and_swap(
            "/workloads/w",
            0,
            b"v3".to_vec(),
            vec![event(EventKind::WorkloadPlaced)],
        )
        .await
        .unwrap();
    assert_eq!(cas, None);
    assert!(stored(&*store).await.is_empty());
    assert_eq!(broadcast(&mut rx), Vec::<u64>::new());
}

/// (b) A committed write and its events are one revision: the same `mod_rev` on the
/// written key and on every event key; the events are broadcast after, in order.
#[tokio::test]
async fn a_write_and_its_events_commit_in_one_revision() {
    let (_dir, store) = store();
    let events = Events::open(store.clone()).await.unwrap();
    let mut rx = events.subscribe();
    let txn = Txn {
        compares: vec![Compare::ModRev("/workloads/w".into(), 0)],
        success: vec![put("/workloads/w", b"v1")],
        failure: vec![],
    };
    let r = events
        .commit(
            txn,
            vec![
                event(EventKind::WorkloadCreated),
                event(EventKind::WorkloadPlaced),
            ],
        )
        .await
        .unwrap();
    assert!(r.succeeded);
    let w = store.get("/workloads/w").await.unwrap().unwrap();
    assert_eq!(w.mod_rev, r.revision);
    let evs = stored(&*store).await;
    assert_eq!(seqs(&evs), [1, 2]);
    assert!(evs.iter().all(|(_, rev)| *rev == r.revision), "{evs:?}");
    assert_eq!(evs[0].0.kind, EventKind::WorkloadCreated);
    assert_eq!(evs[1].0.kind, EventKind::WorkloadPlaced);
    assert_eq!(broadcast(&mut rx), [1, 2]);
    assert_eq!(events.last_seq().await, 2);
    // Compare-and-swap likewise.
    let rev = events
        .compare_and_swap(
            "/workloads/w",
            w.mod_rev,
            b"v2".to_vec(),
            vec![event(EventKind::WorkloadPlaced)],
        )
        .await
        .unwrap()
        .expect("compare holds");
    let evs = stored(&*store).await;
    assert_eq!(evs.last().map(|(e, r)| (e.seq, *r)), Some((3, rev)));
    assert_eq!(broadcast(&mut rx), [3]);
}

/// (c) The numbers a refused write staged go to the next events: no gap, in the store
/// or in the broadcast.
#[tokio::test]
async fn sequence_numbers_stay_dense_after_a_refused_write() {
    let (_dir, store) = store();
    let events = Events::open(store.clone()).await.unwrap();
    let mut rx = events.subscribe();
    events
        .emit(EventKind::ServerStarted, None, None, "up")
        .await;
    for _ in 0..3 {
        let refused = events
            .compare_and_swap(
                "/nodes/a",
                99,
                b"x".to_vec(),
                vec![event(EventKind::NodeJoined), event(EventKind::NodeReady)],
            )
            .await
            .unwrap();
        assert_eq!(refused, None);
    }
    let rev = events
        .compare_and_swap(
            "/nodes/a",
            0,
            b"x".to_vec(),
            vec![event(EventKind::NodeJoined)],
        )
        .await
        .unwrap();
    assert!(rev.is_some());
    events
        .emit(EventKind::NodeReady, None, Some("a"), "ready")
        .await;
    let evs = stored(&*store).await;
    assert_eq!(seqs(&evs), [1, 2, 3]);
    assert_eq!(evs[1].0.kind, EventKind::NodeJoined);
    assert_eq!(broadcast(&mut rx), [1, 2, 3]);
    // A new server counts on from the store.
    let again = Events::open(store.clone()).await.unwrap();
    assert_eq!(again.last_seq().await, 3);
}

/// A write that ends in a store error may have committed (as far as the caller
/// knows): its numbers are never given again, so no later event can overwrite one of
/// it; nothing is broadcast for it.
#[tokio::test]
async fn a_store_error_never_gives_a_number_twice() {
    let (_dir, store) = store();
    let events = Events::open(store.clone()).await.unwrap();
    let mut rx = events.subscribe();
    let txn = Txn {
        compares: vec![],
        success: vec![Op::Put {
            key: "/alive/a".into(),
            value: vec![],
            lease: Some(424_242),
        }],
        failure: vec![],
    };
    let err = events.commit(txn, vec![event(EventKind::NodeReady)]).await;
    assert!(
        matches!(err, Err(avail_store::StoreError::LeaseNotFound(_))),
        "{err:?}"
    );
    assert!(stored(&*store).await.is_empty());
    assert_eq!(broadcast(&mut rx), Vec::<u64>::new());
    events
        .emit(EventKind::ServerStarted, None, None, "after")
        .await;
    assert_eq!(seqs(&stored(&*store).await), [2]);
    assert_eq!(broadcast(&mut rx), [2]);
}

/// An event that rides on the write a report causes is recorded alone when there was
/// nothing to write, and not again when the write carried it.
#[tokio::test]
async fn a_report_is_recorded_alone_only_when_no_write_carried_it() {
    let (_dir, store) = store();
    let events = Events::open(store.clone()).await.unwrap();
    events
        .unless_written(Ok(true), Some(event(EventKind::WorkloadStandbyFailed)))
        .await;
    assert!(stored(&*store).await.is_empty());
    events
        .unless_written(Ok(false), Some(event(EventKind::WorkloadSecondaryFailed)))
        .await;
    let conflict = Err(StateError::Conflict("kept changing".into()));
    events
        .unless_written(conflict, Some(event(EventKind::WorkloadFailed)))
        .await;
    let kinds: Vec<EventKind> = stored(&*store)
        .await
        .into_iter()
        .map(|(e, _)| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            EventKind::WorkloadSecondaryFailed,
            EventKind::WorkloadFailed
        ]
    );
}

/// A trim is due once per [`TRIM_EVERY`], also when a write's events step over the
/// multiple rather than land on it.
#[test]
fn a_trim_is_due_when_a_batch_passes_a_multiple() {
    assert_eq!(trim_due(KEEP_EVENTS + 500, KEEP_EVENTS + 500), Some(10_500));
    assert_eq!(trim_due(KEEP_EVENTS + 499, KEEP_EVENTS + 502), Some(10_500));
    assert_eq!(trim_due(KEEP_EVENTS + 501, KEEP_EVENTS + 502), None);
    assert_eq!(
        trim_due(KEEP_EVENTS, KEEP_EVENTS),
        None,
        "nothing to trim yet"
    );
    assert_eq!(trim_due(1, 1), None);
}

fn workload(name: &str) -> Workload {
    let spec = avail_model::WorkloadSpec::parse(&format!(
        r#"{{"name":"{name}","driver":"wasm","artifact":"x","resources":{{"memory_mib":10,"cpu_millis":10}}}}"#
    ))
    .unwrap();
    Workload {
        uid: name.into(),
        spec,
        status: WorkloadStatus::default(),
        created_ms: 0,
    }
}

/// The workload writes of the server: a conflicting one records no event, a committed
/// one shares its revision with its event.
#[tokio::test]
async fn workload_writes_commit_their_events() {
    let (_dir, state) = crate::state::test_app().await;
    let store = state.store.clone();
    let w = workload("w");
    let rev = state
        .write_workload_with_events(&w, 0, vec![event(EventKind::WorkloadCreated)])
        .await
        .unwrap();
    let conflict = state
        .write_workload_with_events(&w, 0, vec![event(EventKind::WorkloadPlaced)])
        .await;
    assert!(
        matches!(conflict, Err(StateError::Conflict(_))),
        "{conflict:?}"
    );
    let at = state.view.read().unwrap().placement_rev;
    let stale = state
        .write_placement_with_events(&w, rev, at + 1, vec![event(EventKind::WorkloadPlaced)])
        .await;
    assert!(matches!(stale, Err(StateError::StalePlan)), "{stale:?}");
    let evs = stored(&*store).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!((evs[0].0.seq, evs[0].1), (1, rev));
    assert_eq!(evs[0].0.kind, EventKind::WorkloadCreated);
    let placed = state
        .write_placement_with_events(&w, rev, at, vec![event(EventKind::WorkloadPlaced)])
        .await
        .unwrap();
    let kv = store.get(&keys::workload("w")).await.unwrap().unwrap();
    assert_eq!(kv.mod_rev, placed);
    let evs = stored(&*store).await;
    assert_eq!(evs.last().map(|(e, r)| (e.seq, *r)), Some((2, placed)));
}

/// A status update records its events only with the write that changes something,
/// once; an update that changes nothing records none.
#[tokio::test]
async fn a_status_update_records_its_events_with_its_write() {
    let (_dir, state) = crate::state::test_app().await;
    let store = state.store.clone();
    state.write_workload(&workload("w"), 0).await.unwrap();
    let set_failed = |s: &mut WorkloadStatus| {
        let was = s.phase;
        s.phase = Phase::Failed;
        (was != Phase::Failed)
            .then(|| event(EventKind::WorkloadFailed))
            .into_iter()
            .collect()
    };
    assert!(
        state
            .update_status_with_events("w", set_failed)
            .await
            .unwrap()
    );
    assert!(
        !state
            .update_status_with_events("w", set_failed)
            .await
            .unwrap()
    );
    assert!(
        !state
            .update_status_with_events("none", set_failed)
            .await
            .unwrap()
    );
    let evs = stored(&*store).await;
    let kv = store.get(&keys::workload("w")).await.unwrap().unwrap();
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].1, kv.mod_rev);
}

/// A pair lease asked again (its answer lost) is granted again without a write: the
/// failover is one event, in the revision of the write that moved the generation.
#[tokio::test]
async fn a_failover_is_one_event_with_its_write() {
    let (_dir, state) = crate::state::test_app().await;
    let store = state.store.clone();
    let mut w = workload("p");
    w.spec.level = Level::Ft;
    w.status.phase = Phase::Running;
    w.status.node = Some("a".into());
    w.status.secondary = Some("b".into());
    w.status.generation = 1;
    w.status.incarnation = 1;
    state.write_workload(&w, 0).await.unwrap();
    // Whether each write changed the workload: which revisions held it.
    let (_, before) = store.range(keys::WORKLOADS).await.unwrap();
    assert_eq!(state.take_lease("p", "b", 1, 2).await.unwrap(), (true, 2));
    assert_eq!(state.take_lease("p", "b", 1, 2).await.unwrap(), (true, 2));
    let evs = stored(&*store).await;
    let failovers: Vec<_> = evs
        .iter()
        .filter(|(e, _)| e.kind == EventKind::WorkloadFailover)
        .collect();
    assert_eq!(failovers.len(), 1, "{evs:?}");
    let (ev, rev) = failovers[0];
    assert_eq!(ev.node.as_deref(), Some("b"));
    // The write that granted generation 2 is the event's revision: the workload as
    // of that revision (the only write between `before` and the event's revision).
    assert_eq!(*rev, before + 1, "{evs:?}");
}

/// A drain is one write with its event; asked again, nothing is written or recorded.
#[tokio::test]
async fn a_drain_and_its_event_are_one_write() {
    let (_dir, state) = crate::state::test_app().await;
    let store = state.store.clone();
    let rec = serde_json::json!({
        "name": "a", "address": "127.0.0.1", "ingress_url": "http://127.0.0.1:1",
        "tags": {}, "capacity": {"cpu_millis": 1000, "memory_mib": 1000},
        "joined_ms": 0, "agent_version": "t",
    });
    store
        .put(&keys::node("a"), serde_json::to_vec(&rec).unwrap(), None)
        .await
        .unwrap();
    assert!(state.start_drain("a").await.unwrap().is_some());
    assert!(state.start_drain("a").await.unwrap().is_some());
    let kv = store.get(&keys::node("a")).await.unwrap().unwrap();
    let drains: Vec<_> = stored(&*store)
        .await
        .into_iter()
        .filter(|(e, _)| e.kind == EventKind::NodeDraining && e.message.starts_with("drain of a"))
        .collect();
    assert_eq!(drains.len(), 1, "{drains:?}");
    assert_eq!(drains[0].1, kv.mod_rev);
    assert!(state.undrain("a").await.unwrap().is_some());
    let kv = store.get(&keys::node("a")).await.unwrap().unwrap();
    let undrained: Vec<_> = stored(&*store)
        .await
        .into_iter()
        .filter(|(e, _)| e.kind == EventKind::NodeUndrained)
        .map(|(_, r)| r)
        .collect();
    assert_eq!(undrained, [kv.mod_rev]);
}
