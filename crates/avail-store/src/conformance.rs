//! The conformance suite that every [`Store`] backend must pass.
//!
//! It is written only against the [`Store`] trait. Each `check_*` function takes a store
//! and panics with a message saying what was expected and what was seen. Two ways to run
//! it:
//! - [`run_all`] runs every check, each on a fresh store from a factory;
//! - [`store_conformance_tests!`](crate::store_conformance_tests) generates one
//!   `#[tokio::test]` per check, so a test runner reports (and parallelises) them one by one.
//!
//! Both take a factory `make: Fn() -> impl Future<Output = (G, S)>` returning a guard `G`
//! (a temp dir, a server process, or `()`) kept alive as long as the store `S`.
//!
//! What a check needs from the store it is given:
//! - **fresh**: no keys and no history under `conf/` (the watch-from-0 check replays all
//!   history of its prefix);
//! - **no other writer while the check runs**: checks assert that a write moves the
//!   global revision by exactly one. [`run_all`] runs the checks one after another,
//!   except the two slow lease checks ([`check_lease_expiry`],
//!   [`check_keep_alive_extends`]), which assert no revision steps and run concurrently.
//!
//! Timing: waits are deadline loops ([`WAIT`]), never a bare sleep used as
//! synchronisation; the whole suite takes a few seconds, most of it in the two 1 s-TTL
//! lease checks.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn, Watch};

/// Longest a check waits for an expected event or state before failing.
pub const WAIT: Duration = Duration::from_secs(5);

/// Runs every check, each on a fresh store from `make` (see the [module docs](self)).
///
/// `make` returns a guard (kept alive while the store is used) and the store.
pub async fn run_all<G, S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = (G, S)>,
{
    // Keep this list in step with `store_conformance_tests!`.
    macro_rules! run {
        ($($check:ident),* $(,)?) => {$(
            let (guard, store) = make().await;
            $check(&store).await;
            drop(store);
            drop(guard);
        )*};
    }
    run!(
        check_put_get_delete_revisions,
        check_invalid_arguments,
        check_range_prefix,
        check_compare_and_swap,
        check_txn_atomic,
        check_large_value,
        check_watch_from_zero,
        check_watch_from_revision,
        check_watch_during_writes,
        check_watch_deletes,
        check_revoke_lease,
        check_unknown_lease,
        check_concurrent_cas_counter,
    );
    let (g1, s1) = make().await;
    let (g2, s2) = make().await;
    tokio::join!(check_lease_expiry(&s1), check_keep_alive_extends(&s2));
    drop((s1, s2));
    drop((g1, g2));
}

/// Generates one `#[tokio::test]` per conformance check (see [`conformance`](crate::conformance)).
///
/// `$make` is an expression callable as `$make()` returning a future of `(guard, store)`,
/// e.g. an `async fn` or a closure `|| async { ... }`. The calling crate needs `tokio`
/// with the `macros` and `rt-multi-thread` features.
///
/// ```ignore
/// async fn make() -> (tempfile::TempDir, RedbStore) { ... }
/// avail_store::store_conformance_tests!(make);
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        // Keep this list in step with `conformance::run_all`.
        $crate::store_conformance_tests!(@tests $make;
            check_put_get_delete_revisions,
            check_invalid_arguments,
            check_range_prefix,
            check_compare_and_swap,
            check_txn_atomic,
            check_large_value,
            check_watch_from_zero,
            check_watch_from_revision,
            check_watch_during_writes,
            check_watch_deletes,
            check_revoke_lease,
            check_unknown_lease,
            check_concurrent_cas_counter,
            check_lease_expiry,
            check_keep_alive_extends,
        );
    };
    (@tests $make:expr; $($check:ident),* $(,)?) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $check() {
            let (_guard, store) = ($make)().await;
            $crate::conformance::$check(&store).await;
        }
    )*};
}

// ---------------------------------------------------------------------------------------
// Helpers

async fn rev(store: &dyn Store) -> Revision {
    store.revision().await.expect("revision")
}

async fn put(store: &dyn Store, key: &str, value: &[u8]) -> Revision {
    store
        .put(key, value.to_vec(), None)
        .await
        .unwrap_or_else(|e| panic!("put {key:?}: {e}"))
}

async fn get(store: &dyn Store, key: &str) -> Option<KeyValue> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key:?}: {e}"))
}

async fn watch(store: &dyn Store, prefix: &str, from_rev: Revision) -> Watch {
    store
        .watch(prefix, from_rev)
        .await
        .unwrap_or_else(|e| panic!("watch {prefix:?} from {from_rev}: {e}"))
}

/// The next event of a watch, or a panic naming `what` after [`WAIT`].
async fn next_event(w: &mut Watch, what: &str) -> Event {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("{what}: watch closed while waiting for an event"),
        Err(_) => panic!("{what}: no event within {WAIT:?}"),
    }
}

/// The next `n` events of a watch.
async fn next_events(w: &mut Watch, n: usize, what: &str) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, w.next()).await {
            Ok(Some(e)) => out.push(e),
            Ok(None) => panic!("{what}: watch closed after {out:?}, expected {n} events"),
            Err(_) => panic!("{what}: only {out:?} within {WAIT:?}, expected {n} events"),
        }
    }
    out
}

fn put_event(e: &Event) -> &KeyValue {
    match e {
        Event::Put(kv) => kv,
        other => panic!("expected a put event, got {other:?}"),
    }
}

fn assert_put(e: &Event, key: &str, value: &[u8], revision: Revision) {
    let kv = put_event(e);
    assert_eq!(
        (kv.key.as_str(), kv.value.as_slice(), kv.mod_rev),
        (key, value, revision),
        "put event {e:?}"
    );
}

fn assert_delete(e: &Event, key: &str, revision: Revision) {
    assert_eq!(
        e,
        &Event::Delete {
            key: key.to_string(),
            revision
        },
        "expected the delete of {key:?} at {revision}"
    );
}

/// Polls `probe` every 50 ms until it reports `true`, or panics after `within` with the
/// last thing it saw.
async fn eventually<F, Fut>(what: &str, within: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (bool, String)>,
{
    let deadline = Instant::now() + within;
    loop {
        let (ok, seen) = probe().await;
        if ok {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not true within {within:?}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_invalid<T: std::fmt::Debug>(r: crate::Result<T>, what: &str) {
    match r {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

fn is_lease_not_found<T: std::fmt::Debug>(r: crate::Result<T>, lease: LeaseId, what: &str) {
    match r {
        Err(StoreError::LeaseNotFound(l)) if l == lease => {}
        other => panic!("{what}: expected LeaseNotFound({lease}), got {other:?}"),
    }
}

fn put_op(key: &str, value: &[u8]) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.to_vec(),
        lease: None,
    }
}

fn delete_op(key: &str) -> Op {
    Op::Delete {
        key: key.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// Get, put and delete; `create_rev` vs `mod_rev`; one revision per write; deleting an
/// absent key does not move the revision.
pub async fn check_put_get_delete_revisions(store: &dyn Store) {
    let (a, b) = ("conf/basic/a", "conf/basic/b");
    let r0 = rev(store).await;
    assert_eq!(get(store, a).await, None, "fresh store has {a:?}");

    let r1 = put(store, a, b"1").await;
    assert_eq!(r1, r0 + 1, "a put bumps the revision by one");
    assert_eq!(rev(store).await, r1);
    let kv = get(store, a).await.expect("a after put");
    assert_eq!(
        kv,
        KeyValue {
            key: a.into(),
            value: b"1".to_vec(),
            create_rev: r1,
            mod_rev: r1,
            lease: None
        }
    );

    let r2 = put(store, a, b"2").await;
    assert_eq!(r2, r1 + 1);
    let kv = get(store, a).await.expect("a after update");
    assert_eq!(
        (kv.value.as_slice(), kv.create_rev, kv.mod_rev),
        (&b"2"[..], r1, r2)
    );

    let r3 = put(store, b, b"").await;
    assert_eq!(r3, r2 + 1);
    assert_eq!(get(store, b).await.expect("empty value").value, b"");

    assert!(
        store.delete(a).await.expect("delete"),
        "delete of a present key"
    );
    assert_eq!(
        rev(store).await,
        r3 + 1,
        "a delete bumps the revision by one"
    );
    assert_eq!(get(store, a).await, None, "a after delete");
    assert!(
        !store.delete(a).await.expect("delete"),
        "delete of an absent key"
    );
    assert_eq!(
        rev(store).await,
        r3 + 1,
        "deleting an absent key keeps the revision"
    );

    let r5 = put(store, a, b"3").await;
    assert_eq!(r5, r3 + 2);
    let kv = get(store, a).await.expect("a recreated");
    assert_eq!(
        (kv.create_rev, kv.mod_rev),
        (r5, r5),
        "a recreated key gets a new create_rev"
    );
}

/// Empty keys and a zero TTL are refused with `Invalid`, and change nothing; so is a key
/// written twice in one transaction branch.
pub async fn check_invalid_arguments(store: &dyn Store) {
    let r0 = rev(store).await;
    is_invalid(store.get("").await, "get of the empty key");
    is_invalid(
        store.put("", b"x".to_vec(), None).await,
        "put of the empty key",
    );
    is_invalid(store.delete("").await, "delete of the empty key");
    is_invalid(
        store.compare_and_swap("", 0, b"x".to_vec()).await,
        "cas of the empty key",
    );
    is_invalid(
        store
            .txn(Txn {
                compares: vec![],
                success: vec![put_op("conf/invalid/a", b"1"), put_op("", b"2")],
                failure: vec![],
            })
            .await,
        "txn with an empty key",
    );
    is_invalid(
        store
            .txn(Txn {
                compares: vec![Compare::Value(String::new(), vec![])],
                success: vec![put_op("conf/invalid/a", b"1")],
                failure: vec![],
            })
            .await,
        "txn comparing the empty key",
    );
    is_invalid(
        store
            .txn(Txn {
                compares: vec![],
                success: vec![put_op("conf/invalid/a", b"1"), delete_op("conf/invalid/a")],
                failure: vec![],
            })
            .await,
        "txn writing one key twice",
    );
    is_invalid(store.grant_lease(0).await, "lease with TTL 0");
    assert_eq!(
        get(store, "conf/invalid/a").await,
        None,
        "refused txn wrote"
    );
    assert_eq!(rev(store).await, r0, "refused calls moved the revision");
}

/// Range by prefix returns keys in order, only those under the prefix (`a/` excludes
/// `ab`), with the revision read at.
pub async fn check_range_prefix(store: &dyn Store) {
    let p = "conf/range/";
    for k in ["a/2", "ab", "a/1", "a", "b/1", "a/1/x"] {
        put(store, &format!("{p}{k}"), k.as_bytes()).await;
    }
    let current = rev(store).await;

    let (kvs, at) = store.range(&format!("{p}a/")).await.expect("range");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["conf/range/a/1", "conf/range/a/1/x", "conf/range/a/2"],
        "range of {p}a/"
    );
    assert_eq!(at, current, "range revision");
    for kv in &kvs {
        assert_eq!(
            Some(kv),
            get(store, &kv.key).await.as_ref(),
            "range entry vs get"
        );
    }

    let (all, _) = store.range(p).await.expect("range");
    let keys: Vec<&str> = all.iter().map(|kv| &kv.key[p.len()..]).collect();
    assert_eq!(
        keys,
        ["a", "a/1", "a/1/x", "a/2", "ab", "b/1"],
        "range of {p}"
    );

    let (none, at) = store.range(&format!("{p}zz")).await.expect("range");
    assert!(none.is_empty(), "range of an empty prefix: {none:?}");
    assert_eq!(at, current);
}

/// Compare-and-swap: 0 means absent; a stale or wrong revision fails and changes nothing;
/// the right one succeeds.
pub async fn check_compare_and_swap(store: &dyn Store) {
    let k = "conf/cas/k";
    let r0 = rev(store).await;
    let r1 = store
        .compare_and_swap(k, 0, b"a".to_vec())
        .await
        .expect("cas")
        .expect("cas on an absent key with 0");
    assert_eq!(r1, r0 + 1);

    let fail = store
        .compare_and_swap(k, 0, b"b".to_vec())
        .await
        .expect("cas");
    assert_eq!(fail, None, "cas with 0 on a present key");
    let wrong = store
        .compare_and_swap(k, r1 + 100, b"b".to_vec())
        .await
        .expect("cas");
    assert_eq!(wrong, None, "cas with a wrong revision");
    assert_eq!(rev(store).await, r1, "failed cas moved the revision");
    assert_eq!(get(store, k).await.expect("k").value, b"a");

    let r2 = store
        .compare_and_swap(k, r1, b"b".to_vec())
        .await
        .expect("cas")
        .expect("cas with the current mod_rev");
    assert_eq!(r2, r1 + 1);
    let kv = get(store, k).await.expect("k");
    assert_eq!(
        (kv.value.as_slice(), kv.create_rev, kv.mod_rev),
        (&b"b"[..], r1, r2)
    );

    let stale = store
        .compare_and_swap(k, r1, b"c".to_vec())
        .await
        .expect("cas");
    assert_eq!(stale, None, "cas with a stale revision");
    assert_eq!(get(store, k).await.expect("k").value, b"b");

    assert!(store.delete(k).await.expect("delete"));
    let again = store
        .compare_and_swap(k, 0, b"d".to_vec())
        .await
        .expect("cas");
    assert!(again.is_some(), "cas with 0 after delete");
}

/// Multi-key transactions: all writes of the chosen branch under one revision, with the
/// other branch untouched; `ModRev` and `Value` compares; no bump without a write.
pub async fn check_txn_atomic(store: &dyn Store) {
    let p = "conf/txn/";
    let (a, b, c, f) = ("conf/txn/a", "conf/txn/b", "conf/txn/c", "conf/txn/f");
    let ra = put(store, a, b"1").await;
    put(store, b, b"1").await;
    let r0 = rev(store).await;
    let mut w = watch(store, p, r0).await;

    let res = store
        .txn(Txn {
            compares: vec![
                Compare::ModRev(a.into(), ra),
                Compare::Value(b.into(), b"1".to_vec()),
                Compare::ModRev("conf/txn/absent".into(), 0),
            ],
            success: vec![put_op(a, b"2"), put_op(c, b"new"), delete_op(b)],
            failure: vec![put_op(f, b"x")],
        })
        .await
        .expect("txn");
    assert!(res.succeeded, "all compares hold: {res:?}");
    let r1 = r0 + 1;
    assert_eq!(res.revision, r1, "one revision for the whole transaction");
    let kv = get(store, a).await.expect("a");
    assert_eq!(
        (kv.value.as_slice(), kv.create_rev, kv.mod_rev),
        (&b"2"[..], ra, r1)
    );
    let kv = get(store, c).await.expect("c");
    assert_eq!((kv.create_rev, kv.mod_rev), (r1, r1));
    assert_eq!(get(store, b).await, None, "b deleted by the txn");
    assert_eq!(get(store, f).await, None, "failure branch ran too");
    let events = next_events(&mut w, 3, "events of the txn").await;
    assert_put(&events[0], a, b"2", r1);
    assert_put(&events[1], c, b"new", r1);
    assert_delete(&events[2], b, r1);

    // A stale ModRev: the failure branch runs, the success branch does not.
    let res = store
        .txn(Txn {
            compares: vec![Compare::ModRev(c.into(), r1), Compare::ModRev(a.into(), ra)],
            success: vec![put_op(a, b"3")],
            failure: vec![put_op(f, b"fail"), delete_op(c)],
        })
        .await
        .expect("txn");
    assert!(!res.succeeded, "stale compare must fail: {res:?}");
    assert_eq!(res.revision, r1 + 1);
    assert_eq!(
        get(store, a).await.expect("a").value,
        b"2",
        "success branch ran"
    );
    assert_eq!(get(store, f).await.expect("f").value, b"fail");
    assert_eq!(get(store, c).await, None);

    // Value compares: mismatch and absent key fail; an empty failure branch writes nothing.
    for (what, compare) in [
        ("value mismatch", Compare::Value(a.into(), b"1".to_vec())),
        ("value of an absent key", Compare::Value(b.into(), vec![])),
    ] {
        let res = store
            .txn(Txn {
                compares: vec![compare],
                success: vec![put_op(a, b"never")],
                failure: vec![],
            })
            .await
            .expect("txn");
        assert!(!res.succeeded, "{what}: compare must fail");
        assert_eq!(res.revision, r1 + 1, "{what}: no write, no new revision");
    }
    let res = store
        .txn(Txn {
            compares: vec![Compare::Value(a.into(), b"2".to_vec())],
            success: vec![delete_op("conf/txn/absent")],
            failure: vec![],
        })
        .await
        .expect("txn");
    assert!(res.succeeded, "value compare that holds");
    assert_eq!(
        res.revision,
        r1 + 1,
        "a branch that only deletes absent keys is no write"
    );
    let res = store.txn(Txn::default()).await.expect("empty txn");
    assert_eq!((res.succeeded, res.revision), (true, r1 + 1), "empty txn");
    assert_eq!(get(store, a).await.expect("a").value, b"2");
    assert_eq!(rev(store).await, r1 + 1);
}

/// A 1 MiB value round-trips through put, get, range and watch.
pub async fn check_large_value(store: &dyn Store) {
    let k = "conf/large/k";
    let value: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r0 = rev(store).await;
    let mut w = watch(store, "conf/large/", r0).await;
    let r = store.put(k, value.clone(), None).await.expect("put 1 MiB");
    assert!(
        get(store, k).await.expect("k").value == value,
        "1 MiB value differs after get"
    );
    let (kvs, _) = store.range("conf/large/").await.expect("range");
    assert!(
        kvs.len() == 1 && kvs[0].value == value,
        "1 MiB value differs after range"
    );
    let e = next_event(&mut w, "put of 1 MiB").await;
    assert!(
        put_event(&e).value == value && e.revision() == r,
        "1 MiB watch event"
    );
}

/// Watch from 0 replays the prefix's whole history in order, then live events; keys
/// outside the prefix (`conf/wzero/` vs `conf/wzeroX`) are filtered out.
pub async fn check_watch_from_zero(store: &dyn Store) {
    let p = "conf/wzero/";
    let (a, b, c) = ("conf/wzero/a", "conf/wzero/b", "conf/wzero/c");
    let ra = put(store, a, b"1").await;
    put(store, "conf/wzeroX", b"outside").await;
    let rb = put(store, b, b"2").await;
    assert!(store.delete(a).await.expect("delete"));
    let rd = rev(store).await;

    let mut w = watch(store, p, 0).await;
    let events = next_events(&mut w, 3, "history from 0").await;
    assert_put(&events[0], a, b"1", ra);
    assert_put(&events[1], b, b"2", rb);
    assert_delete(&events[2], a, rd);

    put(store, "conf/wzeroY", b"outside").await;
    let rc = put(store, c, b"3").await;
    let e = next_event(&mut w, "live put after history").await;
    assert_put(&e, c, b"3", rc);
}

/// Watch from a revision replays only later events, then goes live; a watch from the
/// current or a future revision sees only what comes after it.
pub async fn check_watch_from_revision(store: &dyn Store) {
    let p = "conf/wrev/";
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(put(store, &format!("{p}k{i}"), &[i]).await);
    }
    let mut w = watch(store, p, revs[1]).await;
    let mut now = watch(store, p, revs[4]).await;
    let mut future = watch(store, p, revs[4] + 2).await;
    let events = next_events(&mut w, 3, "catch up from revs[1]").await;
    for (i, e) in events.iter().enumerate() {
        let k = i + 2;
        assert_put(e, &format!("{p}k{k}"), &[k as u8], revs[k]);
    }
    for i in 5..8u8 {
        revs.push(put(store, &format!("{p}k{i}"), &[i]).await);
    }
    for (i, &r) in revs.iter().enumerate().skip(5) {
        let key = format!("{p}k{i}");
        let e = next_event(&mut w, "live after catch-up").await;
        assert_put(&e, &key, &[i as u8], r);
        let e = next_event(&mut now, "watch from the current revision").await;
        assert_put(&e, &key, &[i as u8], r);
    }
    let e = next_event(&mut future, "watch from a future revision").await;
    assert_put(&e, &format!("{p}k7"), &[7], revs[7]);
}

/// Watchers registered while a writer runs see every event after their start revision
/// exactly once, in order: the hand-over from history to live events has no gap and no
/// duplicate.
pub async fn check_watch_during_writes(store: &dyn Store) {
    const WRITES: usize = 150;
    const STARTS: [usize; 3] = [30, 70, 110];
    let p = "conf/wrace/";
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(Vec::<Revision>::new());
    let writer = async {
        for i in 0..WRITES {
            let r = put(store, &format!("{p}k{}", i % 7), format!("{i}").as_bytes()).await;
            progress_tx.send_modify(|revs| revs.push(r));
            tokio::task::yield_now().await;
        }
    };
    let watcher = |start: usize| {
        let mut progress = progress_rx.clone();
        async move {
            let from = progress
                .wait_for(|revs| revs.len() > start)
                .await
                .expect("writer alive")[start];
            let w = watch(store, p, from).await;
            (from, w)
        }
    };
    let ((), (f0, w0), (f1, w1), (f2, w2)) = tokio::join!(
        writer,
        watcher(STARTS[0]),
        watcher(STARTS[1]),
        watcher(STARTS[2])
    );
    let mut written = progress_rx.borrow().clone();
    assert_eq!(written.len(), WRITES);
    // A last write after the watchers caught up: any extra or repeated event before it
    // shows up as a mismatch.
    written.push(put(store, &format!("{p}sentinel"), b"").await);
    for (from, mut w) in [(f0, w0), (f1, w1), (f2, w2)] {
        let expected: Vec<Revision> = written.iter().copied().filter(|r| *r > from).collect();
        let events = next_events(&mut w, expected.len(), "watch started mid-stream").await;
        let got: Vec<Revision> = events.iter().map(Event::revision).collect();
        assert_eq!(
            got, expected,
            "watch from {from}: revisions seen vs written"
        );
    }
}

/// Watch sees deletes, including those of a transaction, at the right revision; deleting
/// an absent key emits nothing.
pub async fn check_watch_deletes(store: &dyn Store) {
    let p = "conf/wdel/";
    let (a, b, c, d) = ("conf/wdel/a", "conf/wdel/b", "conf/wdel/c", "conf/wdel/d");
    put(store, a, b"1").await;
    put(store, b, b"1").await;
    let mut w = watch(store, p, rev(store).await).await;

    assert!(store.delete(a).await.expect("delete a"));
    let r1 = rev(store).await;
    assert_delete(&next_event(&mut w, "delete a").await, a, r1);

    assert!(!store.delete(a).await.expect("delete absent a"));
    let res = store
        .txn(Txn {
            compares: vec![],
            success: vec![delete_op(b), put_op(c, b"2")],
            failure: vec![],
        })
        .await
        .expect("txn");
    let events = next_events(&mut w, 2, "txn delete + put").await;
    assert_delete(&events[0], b, res.revision);
    assert_put(&events[1], c, b"2", res.revision);

    let rd = put(store, d, b"3").await;
    assert_eq!(
        rd,
        res.revision + 1,
        "delete of an absent key moved the revision"
    );
    assert_put(&next_event(&mut w, "put after nothing").await, d, b"3", rd);
}

/// A lease's keys are deleted, with delete events in one revision, when it expires; keys
/// without the lease stay; the expired lease is gone.
pub async fn check_lease_expiry(store: &dyn Store) {
    let p = "conf/lexp/";
    let (a, b, keep) = ("conf/lexp/a", "conf/lexp/b", "conf/lexp/keep");
    let granted = Instant::now();
    let lease = store.grant_lease(1).await.expect("grant");
    for k in [a, b] {
        store
            .put(k, b"v".to_vec(), Some(lease))
            .await
            .expect("put with lease");
    }
    put(store, keep, b"v").await;
    assert_eq!(get(store, a).await.expect("a").lease, Some(lease));
    let mut w = watch(store, p, rev(store).await).await;

    eventually("keys of an expired 1 s lease are deleted", WAIT, || async {
        let (kvs, _) = store.range(p).await.expect("range");
        let keys: Vec<String> = kvs.into_iter().map(|kv| kv.key).collect();
        (keys == [keep], format!("{keys:?}"))
    })
    .await;
    assert!(
        granted.elapsed() >= Duration::from_millis(900),
        "a 1 s lease expired after {:?}",
        granted.elapsed()
    );
    let events = next_events(&mut w, 2, "deletes of the expiry").await;
    let mut keys: Vec<&str> = events.iter().map(Event::key).collect();
    keys.sort_unstable();
    assert_eq!(keys, [a, b], "expiry events {events:?}");
    assert!(
        events.iter().all(
            |e| matches!(e, Event::Delete { revision, .. } if *revision == events[0].revision())
        ),
        "expiry deletes must be deletes in one revision: {events:?}"
    );
    is_lease_not_found(
        store.keep_alive(lease).await,
        lease,
        "keep_alive after expiry",
    );
    is_lease_not_found(
        store.put(a, b"v".to_vec(), Some(lease)).await,
        lease,
        "put with an expired lease",
    );
    assert_eq!(get(store, keep).await.expect("keep").value, b"v");
}

/// `keep_alive` renews a lease to its full TTL: kept alive, its key outlives the TTL;
/// left alone, it expires.
pub async fn check_keep_alive_extends(store: &dyn Store) {
    let k = "conf/lkeep/k";
    let lease = store.grant_lease(1).await.expect("grant");
    store
        .put(k, b"v".to_vec(), Some(lease))
        .await
        .expect("put with lease");
    let start = Instant::now();
    // Renew every 250 ms for 1.6 s: well past the 1 s TTL.
    while start.elapsed() < Duration::from_millis(1600) {
        store
            .keep_alive(lease)
            .await
            .expect("keep_alive of a live lease");
        assert!(
            get(store, k).await.is_some(),
            "key of a kept-alive lease gone after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    store
        .keep_alive(lease)
        .await
        .expect("keep_alive of a live lease");
    assert!(get(store, k).await.is_some(), "key gone after keep-alives");
    eventually("key deleted once keep-alives stop", WAIT, || async {
        let kv = get(store, k).await;
        (kv.is_none(), format!("{kv:?}"))
    })
    .await;
}

/// Revoking a lease deletes its keys at once, in one revision; a key re-put without the
/// lease or moved to another lease survives; the lease is gone afterwards.
pub async fn check_revoke_lease(store: &dyn Store) {
    let p = "conf/lrev/";
    let (a, b, detached, moved) = ("conf/lrev/a", "conf/lrev/b", "conf/lrev/d", "conf/lrev/m");
    let lease = store.grant_lease(60).await.expect("grant");
    let other = store.grant_lease(60).await.expect("grant");
    assert_ne!(lease, other, "two leases with one id");
    for k in [a, b, detached, moved] {
        store
            .put(k, b"v".to_vec(), Some(lease))
            .await
            .expect("put with lease");
    }
    put(store, detached, b"no lease").await;
    store
        .put(moved, b"other".to_vec(), Some(other))
        .await
        .expect("move to the other lease");
    assert_eq!(get(store, detached).await.expect("d").lease, None);
    assert_eq!(get(store, moved).await.expect("m").lease, Some(other));

    let r0 = rev(store).await;
    let mut w = watch(store, p, r0).await;
    store.revoke_lease(lease).await.expect("revoke");
    assert_eq!(
        rev(store).await,
        r0 + 1,
        "revoke deletes its keys in one revision"
    );
    let events = next_events(&mut w, 2, "deletes of the revoke").await;
    let mut keys: Vec<&str> = events.iter().map(Event::key).collect();
    keys.sort_unstable();
    assert_eq!(keys, [a, b]);
    for e in &events {
        assert!(
            matches!(e, Event::Delete { revision, .. } if *revision == r0 + 1),
            "{e:?}"
        );
    }
    let (kvs, _) = store.range(p).await.expect("range");
    let left: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(left, [detached, moved], "keys after revoke");
    is_lease_not_found(
        store.keep_alive(lease).await,
        lease,
        "keep_alive after revoke",
    );
    is_lease_not_found(store.revoke_lease(lease).await, lease, "second revoke");

    store.revoke_lease(other).await.expect("revoke other");
    assert_eq!(
        get(store, moved).await,
        None,
        "moved key survives its new lease"
    );
}

/// Unknown leases: put (alone or in a transaction) writes nothing, keep-alive and revoke
/// fail, all with `LeaseNotFound`.
pub async fn check_unknown_lease(store: &dyn Store) {
    let (k, other) = ("conf/lunknown/k", "conf/lunknown/other");
    let dead = store.grant_lease(60).await.expect("grant");
    store.revoke_lease(dead).await.expect("revoke");
    let r0 = rev(store).await;
    is_lease_not_found(
        store.put(k, b"v".to_vec(), Some(dead)).await,
        dead,
        "put with a revoked lease",
    );
    is_lease_not_found(
        store
            .txn(Txn {
                compares: vec![],
                success: vec![
                    put_op(other, b"v"),
                    Op::Put {
                        key: k.into(),
                        value: b"v".to_vec(),
                        lease: Some(dead),
                    },
                ],
                failure: vec![],
            })
            .await,
        dead,
        "txn putting with a revoked lease",
    );
    assert_eq!(get(store, k).await, None);
    assert_eq!(
        get(store, other).await,
        None,
        "txn with a bad lease applied part"
    );
    assert_eq!(rev(store).await, r0, "failed puts moved the revision");
    is_lease_not_found(store.keep_alive(dead).await, dead, "keep_alive");
    is_lease_not_found(store.revoke_lease(dead).await, dead, "revoke");
}

/// 8 tasks × 50 compare-and-swap increments of one counter with retries end at exactly
/// 400, and the watch sees 400 puts with strictly increasing revisions and values 1..=400.
pub async fn check_concurrent_cas_counter(store: &dyn Store) {
    const PER_TASK: u64 = 50;
    /// Bound on attempts for one increment; contention of 8 writers needs far fewer.
    const MAX_ATTEMPTS: usize = 10_000;
    let key = "conf/counter/n";
    let mut w = watch(store, "conf/counter/", rev(store).await).await;
    let task = |id: usize| async move {
        for _ in 0..PER_TASK {
            let mut attempts = 0;
            loop {
                attempts += 1;
                assert!(
                    attempts <= MAX_ATTEMPTS,
                    "task {id}: no increment in {MAX_ATTEMPTS} tries"
                );
                let (n, mod_rev) = match get(store, key).await {
                    Some(kv) => {
                        let n: u64 = String::from_utf8_lossy(&kv.value).parse().expect("counter");
                        (n, kv.mod_rev)
                    }
                    None => (0, 0),
                };
                let next = (n + 1).to_string().into_bytes();
                if store
                    .compare_and_swap(key, mod_rev, next)
                    .await
                    .expect("cas")
                    .is_some()
                {
                    break;
                }
            }
        }
    };
    tokio::join!(
        task(0),
        task(1),
        task(2),
        task(3),
        task(4),
        task(5),
        task(6),
        task(7)
    );
    let total = 8 * PER_TASK;
    assert_eq!(
        get(store, key).await.expect("counter").value,
        total.to_string().into_bytes(),
        "lost or doubled increments"
    );
    let events = next_events(&mut w, total as usize, "counter events").await;
    for (i, pair) in events.windows(2).enumerate() {
        assert!(
            pair[0].revision() < pair[1].revision(),
            "revisions not increasing at {i}: {pair:?}"
        );
    }
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            put_event(e).value,
            (i + 1).to_string().into_bytes(),
            "event {i}"
        );
    }
}
