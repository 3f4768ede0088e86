//! Model-based property test: random sequences of puts, deletes, compare-and-swaps and
//! transactions against [`RedbStore`] and against a plain in-memory model of the
//! documented semantics. Return values must agree after every step; at the end the key
//! space, the revision and the full watch history must agree, before and after a reopen.
//! On failure proptest prints the minimal failing sequence of steps, which replays it.

use std::collections::{BTreeMap, HashSet};

use avail_store::{Compare, Event, KeyValue, Op, RedbStore, Revision, Store, Txn, TxnResult};
use proptest::prelude::*;

const KEYS: [&str; 4] = ["a", "a/x", "ab", "b"];

#[derive(Clone, Debug)]
enum Step {
    Put(usize, u8),
    Delete(usize),
    /// Compare-and-swap with the key's current `mod_rev` plus `offset` (0: right, else
    /// stale/wrong), or with 0 when `absent`.
    Cas {
        key: usize,
        absent: bool,
        offset: u64,
        value: u8,
    },
    Txn {
        compares: Vec<ModelCompare>,
        success: Vec<ModelOp>,
        failure: Vec<ModelOp>,
    },
}

#[derive(Clone, Debug)]
enum ModelCompare {
    /// `mod_rev` equals the current one plus `offset`.
    ModRev(usize, u64),
    Value(usize, u8),
}

#[derive(Clone, Debug)]
enum ModelOp {
    Put(usize, u8),
    Delete(usize),
}

fn op_strategy() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        (0..KEYS.len(), any::<u8>()).prop_map(|(k, v)| ModelOp::Put(k, v)),
        (0..KEYS.len()).prop_map(ModelOp::Delete),
    ]
}

/// Ops on distinct keys (a key may appear once per branch).
fn branch_strategy() -> impl Strategy<Value = Vec<ModelOp>> {
    prop::collection::vec(op_strategy(), 0..3).prop_map(|ops| {
        let mut seen = HashSet::new();
        ops.into_iter()
            .filter(|op| {
                seen.insert(match op {
                    ModelOp::Put(k, _) | ModelOp::Delete(k) => *k,
                })
            })
            .collect()
    })
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let compare = prop_oneof![
        (0..KEYS.len(), 0..2u64).prop_map(|(k, o)| ModelCompare::ModRev(k, o)),
        (0..KEYS.len(), 0..3u8).prop_map(|(k, v)| ModelCompare::Value(k, v)),
    ];
    prop_oneof![
        (0..KEYS.len(), 0..3u8).prop_map(|(k, v)| Step::Put(k, v)),
        (0..KEYS.len()).prop_map(Step::Delete),
        (0..KEYS.len(), any::<bool>(), 0..2u64, any::<u8>()).prop_map(
            |(key, absent, offset, value)| Step::Cas {
                key,
                absent,
                offset,
                value
            }
        ),
        (
            prop::collection::vec(compare, 0..3),
            branch_strategy(),
            branch_strategy()
        )
            .prop_map(|(compares, success, failure)| Step::Txn {
                compares,
                success,
                failure
            }),
    ]
}

/// The documented semantics, in memory.
#[derive(Default)]
struct Model {
    keys: BTreeMap<String, KeyValue>,
    revision: Revision,
    history: Vec<Event>,
}

impl Model {
    fn mod_rev(&self, key: &str) -> Revision {
        self.keys.get(key).map_or(0, |kv| kv.mod_rev)
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRev(k, r) => self.mod_rev(k) == *r,
            Compare::Value(k, v) => self.keys.get(k).is_some_and(|kv| &kv.value == v),
        }
    }

    fn txn(&mut self, txn: &Txn) -> TxnResult {
        let succeeded = txn.compares.iter().all(|c| self.holds(c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let rev = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_rev = self.keys.get(key).map_or(rev, |kv| kv.create_rev);
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_rev,
                        mod_rev: rev,
                        lease: *lease,
                    };
                    self.keys.insert(key.clone(), kv.clone());
                    events.push(Event::Put(kv));
                }
                Op::Delete { key } => {
                    if self.keys.remove(key).is_some() {
                        events.push(Event::Delete {
                            key: key.clone(),
                            revision: rev,
                        });
                    }
                }
            }
        }
        if !events.is_empty() {
            self.revision = rev;
            self.history.extend(events);
        }
        TxnResult {
            succeeded,
            revision: self.revision,
        }
    }

    fn compare(&self, c: &ModelCompare) -> Compare {
        match c {
            ModelCompare::ModRev(k, offset) => {
                Compare::ModRev(KEYS[*k].into(), self.mod_rev(KEYS[*k]) + offset)
            }
            ModelCompare::Value(k, v) => Compare::Value(KEYS[*k].into(), vec![*v]),
        }
    }
}

fn op(o: &ModelOp) -> Op {
    match o {
        ModelOp::Put(k, v) => Op::Put {
            key: KEYS[*k].into(),
            value: vec![*v],
            lease: None,
        },
        ModelOp::Delete(k) => Op::Delete {
            key: KEYS[*k].into(),
        },
    }
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    let store = RedbStore::open(&path).expect("open");
    let mut model = Model::default();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Put(k, v) => {
                let got = store.put(KEYS[*k], vec![*v], None).await.expect("put");
                let want = model.txn(&Txn {
                    success: vec![op(&ModelOp::Put(*k, *v))],
                    ..Txn::default()
                });
                prop_assert_eq!(got, want.revision, "step {}: {:?}", i, step);
            }
            Step::Delete(k) => {
                let got = store.delete(KEYS[*k]).await.expect("delete");
                let existed = model.keys.contains_key(KEYS[*k]);
                model.txn(&Txn {
                    success: vec![op(&ModelOp::Delete(*k))],
                    ..Txn::default()
                });
                prop_assert_eq!(got, existed, "step {}: {:?}", i, step);
            }
            Step::Cas {
                key,
                absent,
                offset,
                value,
            } => {
                let k = KEYS[*key];
                let expected = if *absent {
                    0
                } else {
                    model.mod_rev(k) + offset
                };
                let got = store
                    .compare_and_swap(k, expected, vec![*value])
                    .await
                    .expect("cas");
                let want = model.txn(&Txn {
                    compares: vec![Compare::ModRev(k.into(), expected)],
                    success: vec![op(&ModelOp::Put(*key, *value))],
                    failure: vec![],
                });
                prop_assert_eq!(
                    got,
                    want.succeeded.then_some(want.revision),
                    "step {}: {:?}",
                    i,
                    step
                );
            }
            Step::Txn {
                compares,
                success,
                failure,
            } => {
                let txn = Txn {
                    compares: compares.iter().map(|c| model.compare(c)).collect(),
                    success: success.iter().map(op).collect(),
                    failure: failure.iter().map(op).collect(),
                };
                let got = store.txn(txn.clone()).await.expect("txn");
                let want = model.txn(&txn);
                prop_assert_eq!(got, want, "step {}: {:?}", i, step);
            }
        }
    }
    check_state(&store, &model).await?;
    store.close().await.expect("close");
    let store = RedbStore::open(&path).expect("reopen");
    check_state(&store, &model).await?;
    store.close().await.expect("close");
    Ok(())
}

async fn check_state(store: &RedbStore, model: &Model) -> Result<(), TestCaseError> {
    let (kvs, rev) = store.range("").await.expect("range");
    prop_assert_eq!(&kvs, &model.keys.values().cloned().collect::<Vec<_>>());
    prop_assert_eq!(rev, model.revision);
    let (under_a, _) = store.range("a/").await.expect("range");
    let want: Vec<&KeyValue> = model
        .keys
        .values()
        .filter(|kv| kv.key.starts_with("a/"))
        .collect();
    prop_assert_eq!(under_a.iter().collect::<Vec<_>>(), want);
    let mut w = store.watch("", 0).await.expect("watch");
    let mut got = Vec::new();
    while got.len() < model.history.len() {
        match tokio::time::timeout(std::time::Duration::from_secs(5), w.next()).await {
            Ok(Some(e)) => got.push(e),
            other => prop_assert!(false, "history ended early: {:?} after {:?}", other, got),
        }
    }
    prop_assert_eq!(&got, &model.history);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn redb_store_follows_the_model(steps in prop::collection::vec(step_strategy(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(steps))?;
    }
}
