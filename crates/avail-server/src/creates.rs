//! Creates, committed in groups.
//!
//! A create's own work (parse, admission, the plan) costs microseconds; what costs is
//! its commit: a store transaction (an fsync on redb, a Raft round on etcd) and the
//! wait for this server's view to see it, all under the placement lock so that no two
//! plans take the same capacity. One at a time, that bounds the API at one create per
//! commit. So the creates that arrive while a commit is under way queue here, and one
//! task takes them as a batch (at most [`MAX_BATCH`]): one plan over one snapshot
//! ([`crate::create_plan`]), one transaction holding every record, its events and the
//! compare on the placement key, one wait for the view. Each create's answer is
//! exactly what it would have been alone: a batch is planned in arrival order, a name
//! already taken is refused alone, and a batch refused because another placement came
//! first is planned again.
//!
//! ```text
//!  handlers ──(queue, ≤ MAX_QUEUED)──> batcher task: take ≤ MAX_BATCH
//!                                        lock placement; plan_creates(view snapshot)
//!                                        txn: compare placement_rev, each name free;
//!                                             put records + placement key + events
//!                                        ok:    wait view; answer each
//!                                        stale: wait view; plan again (≤ MAX_ATTEMPTS)
//!                                        a name taken: answer it; the rest again
//! ```

use std::sync::{Arc, Weak};

use avail_model::Workload;
use avail_store::{Compare, Op, Txn};
use tokio::sync::{mpsc, oneshot};

use crate::create_plan::{Create, plan_creates};
use crate::keys;
use crate::state::{AppState, StateError};

/// Creates waiting for the batcher, at most; a create beyond is refused (503).
pub const MAX_QUEUED: usize = 4096;
/// Creates in one batch, at most: one transaction of 3 writes each, under etcd's
/// default limit of 128 operations per transaction.
pub const MAX_BATCH: usize = 32;
/// Plans of one batch before its creates are refused as conflicting.
const MAX_ATTEMPTS: usize = 5;

/// What became of a create.
#[derive(Debug)]
pub enum Created {
    /// Written: the record as written, and the lower-priority workloads whose
    /// reservations its placement took (to be moved).
    Written {
        /// The record.
        workload: Box<Workload>,
        /// Displaced reservations.
        displaced: Vec<String>,
    },
    /// A workload of its name exists.
    Exists,
}

/// One create waiting.
struct Queued {
    workload: Workload,
    reply: oneshot::Sender<Result<Created, StateError>>,
}

/// The queue of creates, and its task.
pub struct Creates {
    tx: mpsc::Sender<Queued>,
}

impl Creates {
    /// The queue, and the receiving end for [`run`].
    fn new() -> (Creates, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        (Creates { tx }, rx)
    }
}

/// Start the batcher of `state`'s creates: it lives while `state` does.
pub(crate) fn start() -> (Creates, impl FnOnce(Weak<AppState>)) {
    let (creates, rx) = Creates::new();
    let start = move |state: Weak<AppState>| {
        tokio::spawn(run(state, rx));
    };
    (creates, start)
}

impl AppState {
    /// Create `w` (admitted: its level set, its module checked): placed where the
    /// scheduler puts it, or pending with why, committed with its events.
    pub async fn create(&self, w: Workload) -> Result<Created, StateError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            StateError::Store(avail_store::StoreError::Backend(
                "the server's create queue stopped".into(),
            ))
        };
        self.creates
            .tx
            .try_send(Queued { workload: w, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StateError::TryAnotherServer(format!(
                    "{MAX_QUEUED} creates are waiting on this server"
                )),
                mpsc::error::TrySendError::Closed(_) => stopped(),
            })?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The batcher: takes what is queued, at most [`MAX_BATCH`] at a time.
async fn run(state: Weak<AppState>, mut rx: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Some(state) = state.upgrade() else {
            return;
        };
        // Answers to callers that are gone are not needed: drop them before the plan.
        batch.retain(|q| !q.reply.is_closed());
        if !batch.is_empty() {
            commit_batch(&state, std::mem::take(&mut batch)).await;
        }
        batch.clear();
    }
}

/// Plan and write `batch`, answering each create.
async fn commit_batch(state: &Arc<AppState>, mut batch: Vec<Queued>) {
    let _guard = state.placement.lock().await;
    for attempt in 1..=MAX_ATTEMPTS {
        let seed = state
            .placements
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let workloads: Vec<Workload> = batch.iter().map(|q| q.workload.clone()).collect();
        let (plan, at) = {
            let v = state.view.read().unwrap_or_else(|p| p.into_inner());
            let exists = |n: &str| v.workloads.contains_key(n);
            let tags_of = |n: &str| v.nodes.get(n).map(|r| r.tags.clone()).unwrap_or_default();
            let plan = plan_creates(&v.sched, &workloads, &exists, &v.policy, &tags_of, seed);
            (plan, v.placement_rev)
        };
        // Names taken are answered now; the rest are written together.
        let mut writes = Vec::new();
        for (q, create) in batch.drain(..).zip(plan) {
            match create {
                Create::Exists => {
                    let _ = q.reply.send(Ok(Created::Exists));
                }
                Create::Write {
                    workload,
                    events,
                    displaced,
                } => writes.push((q, workload, events, displaced)),
            }
        }
        if writes.is_empty() {
            return;
        }
        let mut txn = Txn {
            compares: vec![Compare::ModRev(keys::PLACEMENT.into(), at)],
            success: vec![keys::placement_written("created")],
            failure: vec![],
        };
        let mut events = Vec::new();
        for (_, w, evs, _) in &writes {
            let key = keys::workload(&w.spec.name);
            txn.compares.push(Compare::ModRev(key.clone(), 0));
            txn.success.push(Op::Put {
                key,
                value: serde_json::to_vec(w).expect("workload serialises"),
                lease: None,
            });
            events.extend(evs.iter().cloned());
        }
        let result = state.events.commit(txn, events).await;
        match result {
            Ok(r) if r.succeeded => {
                state.wait_view(r.revision).await;
                for (q, workload, _, displaced) in writes {
                    let _ = q.reply.send(Ok(Created::Written {
                        workload,
                        displaced,
                    }));
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let batch = writes.into_iter().map(|(q, ..)| q).collect();
                answer_all(batch, || StateError::Store(e.clone()));
                return;
            }
        }
        // Refused: another placement came first (plan again on the view that has it),
        // or, with the placement key unchanged, a name was taken meanwhile without a
        // placement (answered now; the rest go again).
        let now = match state.store.get(keys::PLACEMENT).await {
            Ok(kv) => kv.map(|kv| kv.mod_rev).unwrap_or(0),
            Err(e) => {
                let batch = writes.into_iter().map(|(q, ..)| q).collect();
                answer_all(batch, || StateError::Store(e.clone()));
                return;
            }
        };
        batch = Vec::with_capacity(writes.len());
        for (q, w, ..) in writes {
            let taken = now == at
                && matches!(
                    state.store.get(&keys::workload(&w.spec.name)).await,
                    Ok(Some(_))
                );
            if taken {
                let _ = q.reply.send(Ok(Created::Exists));
            } else {
                batch.push(q);
            }
        }
        state.wait_view(now).await;
        if batch.is_empty() || attempt == MAX_ATTEMPTS {
            break;
        }
    }
    answer_all(batch, || {
        StateError::Conflict("other placements kept coming first; try again".into())
    });
}

/// Answer every create of `batch` with `err()`.
fn answer_all(batch: Vec<Queued>, err: impl Fn() -> StateError) {
    for q in batch {
        let _ = q.reply.send(Err(err()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avail_model::{Phase, WorkloadSpec};

    fn workload(name: &str) -> Workload {
        let spec = WorkloadSpec::parse(&format!(
            "name = \"{name}\"\ndriver = \"process\"\nartifact = \"sh\"\n\
             [placement]\nconstraints = [\"zone == nowhere\"]\n"
        ))
        .unwrap();
        Workload {
            uid: crate::new_uid(),
            spec,
            status: Default::default(),
            created_ms: 0,
        }
    }

    /// Creates sent at once are all written, each once with its two events, and the
    /// event numbers stay dense; of several creates of one name exactly one is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_are_each_written_once() {
        let (_dir, state) = crate::state::test_app().await;
        let before = state.events.last_seq().await;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let state = state.clone();
            // Every tenth name is asked for three times.
            let name = if i % 10 == 0 {
                "same".to_string()
            } else {
                format!("w{i}")
            };
            tasks.push(tokio::spawn(async move {
                (name.clone(), state.create(workload(&name)).await)
            }));
        }
        let mut written = 0;
        let mut exists = 0;
        for t in tasks {
            let (name, r) = t.await.unwrap();
            match r.unwrap() {
                Created::Written { workload, .. } => {
                    written += 1;
                    assert_eq!(workload.spec.name, name);
                    assert_eq!(workload.status.phase, Phase::Pending);
                    let (stored, _) = state
                        .workload(&name)
                        .expect("in the view when answered (the whole revision applied)");
                    assert_eq!(stored.uid, workload.uid);
                }
                Created::Exists => {
                    exists += 1;
                    assert_eq!(name, "same");
                }
            }
        }
        assert_eq!((written, exists), (181, 19));
        let after = state.events.last_seq().await;
        assert_eq!(after - before, 2 * 181, "two events each, numbers dense");
        let (kvs, _) = state.store.range(keys::WORKLOADS).await.unwrap();
        assert_eq!(kvs.len(), 181);
    }

    /// A name taken in the store by another writer without a placement (the view may
    /// not have it yet) is refused, and the creates batched with it are written.
    #[tokio::test]
    async fn a_name_taken_behind_the_view_is_refused_alone() {
        let (_dir, state) = crate::state::test_app().await;
        let theirs = workload("taken");
        state
            .store
            .put(
                &keys::workload("taken"),
                serde_json::to_vec(&theirs).unwrap(),
                None,
            )
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            state.create(workload("taken")),
            state.create(workload("free"))
        );
        assert!(matches!(a.unwrap(), Created::Exists));
        assert!(matches!(b.unwrap(), Created::Written { .. }));
        let (kv, _) = state.store.range(&keys::workload("taken")).await.unwrap();
        let stored: Workload = serde_json::from_slice(&kv[0].value).unwrap();
        assert_eq!(stored.uid, theirs.uid, "theirs is untouched");
    }
}
