//! Tests of what is specific to the redb backend: the file (durability, corruption,
//! locking), leases across a restart, bounded history and slow watchers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use avail_store::{Compare, Event, Op, RedbOptions, RedbStore, Store, StoreError, Txn, Watch};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.redb");
    (dir, path)
}

fn open(path: &Path) -> RedbStore {
    RedbStore::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn assert_open_error(result: avail_store::Result<RedbStore>, path: &Path) -> String {
    match result {
        Err(StoreError::Open { path: p, reason }) => {
            assert_eq!(p, path.display().to_string(), "error names the file");
            let msg = StoreError::Open {
                path: p,
                reason: reason.clone(),
            }
            .to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            reason
        }
        Err(other) => panic!("expected an Open error, got {other}"),
        Ok(_) => panic!("opened {} although it is not a valid store", path.display()),
    }
}

async fn next_events(w: &mut Watch, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, w.next()).await {
            Ok(Some(e)) => out.push(e),
            Ok(None) => panic!("watch closed after {out:?}"),
            Err(_) => panic!("only {out:?} within {WAIT:?}, expected {n}"),
        }
    }
    out
}

fn revisions(events: &[Event]) -> Vec<u64> {
    events.iter().map(Event::revision).collect()
}

#[tokio::test]
async fn acknowledged_writes_survive_reopen_and_revision_continues() {
    let (_dir, path) = temp();
    let store = open(&path);
    let r1 = store.put("a", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("a", b"2".to_vec(), None).await.unwrap();
    store.put("gone", b"x".to_vec(), None).await.unwrap();
    assert!(store.delete("gone").await.unwrap());
    let t = store
        .txn(Txn {
            compares: vec![Compare::ModRev("a".into(), r2)],
            success: vec![Op::Put {
                key: "b".into(),
                value: b"3".to_vec(),
                lease: None,
            }],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(t.succeeded);
    let before = store.range("").await.unwrap();
    store.close().await.expect("close");

    let store = open(&path);
    assert_eq!(store.range("").await.unwrap(), before, "state after reopen");
    let a = store.get("a").await.unwrap().expect("a");
    assert_eq!(
        (a.value.as_slice(), a.create_rev, a.mod_rev),
        (&b"2"[..], r1, r2)
    );
    assert_eq!(store.revision().await.unwrap(), t.revision);
    let next = store.put("c", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next, t.revision + 1, "revision continues after reopen");
    store.close().await.expect("close");
}

#[tokio::test]
async fn dropped_store_with_a_live_watch_releases_the_file() {
    let (_dir, path) = temp();
    let store = open(&path);
    store.put("a", b"1".to_vec(), None).await.unwrap();
    let mut w = store.watch("", 0).await.unwrap();
    assert_eq!(revisions(&next_events(&mut w, 1).await), [1]);
    drop(store);
    // The watch ends with its store.
    let closed = tokio::time::timeout(WAIT, w.next()).await;
    assert!(matches!(closed, Ok(None)), "watch after drop: {closed:?}");
    let store = open(&path);
    assert_eq!(store.get("a").await.unwrap().unwrap().value, b"1");
}

#[tokio::test]
async fn garbage_file_is_an_open_error_naming_the_path_and_is_left_alone() {
    let (_dir, path) = temp();
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(!reason.is_empty());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the file was modified"
    );

    let text = path.with_file_name("notes.txt");
    std::fs::write(&text, b"this is not a database\n").unwrap();
    assert_open_error(RedbStore::open(&text), &text);
}

#[tokio::test]
async fn empty_file_is_refused_and_a_new_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = temp();
    std::fs::write(&path, b"").unwrap();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("empty"), "{reason}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left alone");

    std::fs::remove_file(&path).unwrap();
    let store = open(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "new store file mode {mode:o}");
    drop(store);
}

#[tokio::test]
async fn damaged_store_file_is_an_open_error() {
    let (_dir, path) = temp();
    let store = open(&path);
    for i in 0..200u32 {
        store
            .put(&format!("k{i:04}"), vec![i as u8; 300], None)
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 16 * 1024, "file of {} bytes", bytes.len());
    // Keep redb's header, scribble over the pages after it.
    for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_open_error(RedbStore::open(&path), &path);
}

#[tokio::test]
async fn unopenable_paths_are_open_errors() {
    let (dir, path) = temp();
    assert_open_error(RedbStore::open(dir.path()), dir.path());
    let missing = dir.path().join("no/such/dir/store.redb");
    assert_open_error(RedbStore::open(&missing), &missing);

    let store = open(&path);
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("already open"), "{reason}");
    drop(store);
}

#[tokio::test]
async fn redb_file_of_another_program_is_refused() {
    let (_dir, path) = temp();
    {
        const OTHER: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("other");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(OTHER).unwrap().insert("x", &1).unwrap();
        txn.commit().unwrap();
    }
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("another program"), "{reason}");
}

#[test]
fn open_outside_a_tokio_runtime_is_an_error() {
    let (_dir, path) = temp();
    let reason = assert_open_error(RedbStore::open(&path), &path);
    assert!(reason.contains("tokio runtime"), "{reason}");
}

#[tokio::test]
async fn zero_options_are_invalid() {
    let (_dir, path) = temp();
    for options in [
        RedbOptions {
            history_events: 0,
            ..RedbOptions::default()
        },
        RedbOptions {
            watch_channel: 0,
            ..RedbOptions::default()
        },
    ] {
        let r = RedbStore::open_with_options(&path, options);
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    }
}

#[tokio::test]
async fn leases_get_a_full_ttl_again_after_reopen() {
    let (_dir, path) = temp();
    let store = open(&path);
    let lease = store.grant_lease(1).await.unwrap();
    store.put("l/k", b"v".to_vec(), Some(lease)).await.unwrap();
    store.close().await.unwrap();
    // Down for longer than the TTL: the lease would have expired had the server run.
    tokio::time::sleep(Duration::from_millis(1300)).await;

    let reopened = Instant::now();
    let store = open(&path);
    let kv = store
        .get("l/k")
        .await
        .unwrap()
        .expect("key of a lease after reopen");
    assert_eq!(kv.lease, Some(lease));
    let rev = store.revision().await.unwrap();
    let mut w = store.watch("l/", rev).await.unwrap();
    store
        .keep_alive(lease)
        .await
        .expect("keep_alive after reopen");
    let other = store.grant_lease(1).await.unwrap();
    assert!(
        other > lease,
        "lease id {other} reused after reopen (had {lease})"
    );

    let events = next_events(&mut w, 1).await;
    assert_eq!(
        events[0],
        Event::Delete {
            key: "l/k".into(),
            revision: rev + 1
        }
    );
    assert!(
        reopened.elapsed() >= Duration::from_millis(900),
        "lease expired {:?} after reopen, before its TTL",
        reopened.elapsed()
    );
    assert!(store.get("l/k").await.unwrap().is_none());
    let r = store.keep_alive(lease).await;
    assert!(
        matches!(r, Err(StoreError::LeaseNotFound(l)) if l == lease),
        "{r:?}"
    );
}

#[tokio::test]
async fn revoked_lease_stays_revoked_after_reopen() {
    let (_dir, path) = temp();
    let store = open(&path);
    let lease = store.grant_lease(30).await.unwrap();
    store.put("k", b"v".to_vec(), Some(lease)).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
    store.close().await.unwrap();
    let store = open(&path);
    assert!(store.get("k").await.unwrap().is_none());
    let r = store.keep_alive(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseNotFound(_))), "{r:?}");
}

#[tokio::test]
async fn trimmed_history_answers_compacted_and_survives_reopen() {
    let (_dir, path) = temp();
    let options = RedbOptions {
        history_events: 5,
        ..RedbOptions::default()
    };
    let store = RedbStore::open_with_options(&path, options.clone()).unwrap();
    for i in 1..=12u8 {
        store.put(&format!("k{i}"), vec![i], None).await.unwrap();
    }
    // Revisions 8..=12 are kept: the newest trimmed, 7, is the oldest start.
    for from in [0, 6] {
        match store.watch("", from).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (from, 7));
            }
            other => panic!("watch from {from}: expected Compacted, got {other:?}"),
        }
    }
    let mut w = store
        .watch("", 7)
        .await
        .expect("watch from the oldest kept start");
    assert_eq!(revisions(&next_events(&mut w, 5).await), [8, 9, 10, 11, 12]);

    // A transaction's events are trimmed together, keeping at least 5.
    let t = store
        .txn(Txn {
            compares: vec![],
            success: (0..3)
                .map(|i| Op::Put {
                    key: format!("t{i}"),
                    value: vec![],
                    lease: None,
                })
                .collect(),
            failure: vec![],
        })
        .await
        .unwrap();
    assert_eq!(t.revision, 13);
    assert!(matches!(
        store.watch("", 9).await,
        Err(StoreError::Compacted { oldest: 10, .. })
    ));
    store.close().await.unwrap();

    let store = RedbStore::open_with_options(&path, options).unwrap();
    assert!(matches!(
        store.watch("", 9).await,
        Err(StoreError::Compacted { oldest: 10, .. })
    ));
    let mut w = store.watch("", 10).await.expect("watch after reopen");
    assert_eq!(
        revisions(&next_events(&mut w, 5).await),
        [11, 12, 13, 13, 13]
    );
}

#[tokio::test]
async fn default_history_replays_across_reopen() {
    let (_dir, path) = temp();
    let store = open(&path);
    for i in 0..20u8 {
        store.put(&format!("k/{i}"), vec![i], None).await.unwrap();
    }
    store.close().await.unwrap();
    let store = open(&path);
    let mut w = store.watch("k/", 0).await.unwrap();
    let events = next_events(&mut w, 20).await;
    assert_eq!(revisions(&events), (1..=20).collect::<Vec<_>>());
    store.put("k/live", vec![], None).await.unwrap();
    assert_eq!(revisions(&next_events(&mut w, 1).await), [21]);
}

#[tokio::test]
async fn watcher_that_falls_behind_is_cancelled_without_gaps() {
    let (_dir, path) = temp();
    let store = RedbStore::open_with_options(
        &path,
        RedbOptions {
            watch_channel: 4,
            ..RedbOptions::default()
        },
    )
    .unwrap();
    let mut slow = store.watch("", 0).await.unwrap();
    let mut fine = store.watch("", 0).await.unwrap();
    let mut seen_by_fine = Vec::new();
    for i in 0..40u8 {
        store.put("k", vec![i], None).await.unwrap();
        seen_by_fine.extend(revisions(&next_events(&mut fine, 1).await));
    }
    assert_eq!(seen_by_fine, (1..=40).collect::<Vec<_>>());
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, slow.next()).await {
            Ok(Some(e)) => got.push(e.revision()),
            Ok(None) => break,
            Err(_) => panic!("slow watcher neither fed nor closed; got {got:?}"),
        }
    }
    assert!(
        !got.is_empty() && got.len() < 40,
        "slow watcher got {got:?}"
    );
    let expected: Vec<u64> = (1..=got.len() as u64).collect();
    assert_eq!(
        got, expected,
        "a cancelled watcher still gets a gap-free prefix"
    );
}

#[tokio::test]
async fn four_mib_value_round_trips_and_survives_reopen() {
    let (_dir, path) = temp();
    let value: Vec<u8> = (0..4 * 1024 * 1024 + 7u32)
        .map(|i| (i % 253) as u8)
        .collect();
    let store = open(&path);
    store.put("big", value.clone(), None).await.unwrap();
    assert!(store.get("big").await.unwrap().unwrap().value == value);
    store.close().await.unwrap();
    let store = open(&path);
    assert!(store.get("big").await.unwrap().unwrap().value == value);
    let mut w = store.watch("big", 0).await.unwrap();
    match &next_events(&mut w, 1).await[0] {
        Event::Put(kv) => assert!(kv.value == value, "history value differs"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn expired_leases_are_deleted_one_revision_per_reaper_tick() {
    let (_dir, path) = temp();
    let store = open(&path);
    let l1 = store.grant_lease(1).await.unwrap();
    let l2 = store.grant_lease(1).await.unwrap();
    for (k, l) in [("e/a", l1), ("e/b", l1), ("e/c", l2)] {
        store.put(k, vec![], Some(l)).await.unwrap();
    }
    let rev = store.revision().await.unwrap();
    let mut w = store.watch("e/", rev).await.unwrap();
    let events = next_events(&mut w, 3).await;
    assert!(
        events.iter().all(|e| matches!(e, Event::Delete { .. })),
        "{events:?}"
    );
    // Both leases expire within a few ms of each other: one or two reaper ticks.
    let revs = revisions(&events);
    assert!(revs[0] == rev + 1 && revs[2] <= rev + 2, "{revs:?}");
    assert_eq!(store.revision().await.unwrap(), revs[2]);
    assert!(store.range("e/").await.unwrap().0.is_empty());
}

/// Concurrent writers are committed in groups (fewer fsyncs than writes), and each
/// write is still its own revision: compare-and-swap increments of one counter from 32
/// tasks lose no increment, every acknowledged revision is distinct, and a watcher sees
/// every value once, in order, with increasing revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_commit_in_groups_each_its_own_revision() {
    let (_dir, path) = temp();
    let store = std::sync::Arc::new(open(&path));
    store.put("/count", b"0".to_vec(), None).await.unwrap();
    let mut watch = store
        .watch("/count", store.revision().await.unwrap())
        .await
        .unwrap();
    const TASKS: usize = 32;
    const EACH: usize = 20;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            let mut done = 0;
            while done < EACH {
                let kv = store.get("/count").await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                // A second write beside each increment: a key of this task's own.
                let r = store
                    .txn(Txn {
                        compares: vec![Compare::ModRev("/count".into(), kv.mod_rev)],
                        success: vec![
                            Op::Put {
                                key: "/count".into(),
                                value: (n + 1).to_string().into_bytes(),
                                lease: None,
                            },
                            Op::Put {
                                key: format!("/mine/{t}"),
                                value: done.to_string().into_bytes(),
                                lease: None,
                            },
                        ],
                        failure: vec![],
                    })
                    .await
                    .unwrap();
                if r.succeeded {
                    revs.push(r.revision);
                    done += 1;
                }
            }
            revs
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.extend(t.await.unwrap());
    }
    let total = TASKS * EACH;
    let kv = store.get("/count").await.unwrap().unwrap();
    assert_eq!(
        kv.value,
        total.to_string().into_bytes(),
        "no increment lost"
    );
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), total, "one revision per write");
    let events = next_events(&mut watch, total).await;
    let values: Vec<u64> = events
        .iter()
        .map(|e| match e {
            Event::Put(kv) => std::str::from_utf8(&kv.value).unwrap().parse().unwrap(),
            Event::Delete { .. } => panic!("no delete"),
        })
        .collect();
    assert_eq!(
        values,
        (1..=total as u64).collect::<Vec<_>>(),
        "every value once, in order"
    );
    let seen = revisions(&events);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "revisions increase");
    assert_eq!(seen, revs, "the watcher sees the revisions acknowledged");

    // Writes that do not contend (a key each) are grouped: fewer commits than writes.
    let commits_before = store.commits();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                store
                    .put(&format!("/mine/{t}"), i.to_string().into_bytes(), None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let commits = store.commits() - commits_before;
    assert!(
        commits < total as u64,
        "{commits} commits for {total} writes: none grouped"
    );
}

/// A write refused without change (a lease that does not exist) is refused alone:
/// the writes grouped with it commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_write_in_a_group_fails_alone() {
    let (_dir, path) = temp();
    let store = std::sync::Arc::new(open(&path));
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let lease = (i % 4 == 0).then_some(999_999);
            (i, store.put(&format!("/k/{i}"), vec![1], lease).await)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if i % 4 == 0 {
            assert!(
                matches!(r, Err(StoreError::LeaseNotFound(999_999))),
                "{r:?}"
            );
            assert!(store.get(&format!("/k/{i}")).await.unwrap().is_none());
        } else {
            let rev = r.unwrap();
            assert_eq!(
                store
                    .get(&format!("/k/{i}"))
                    .await
                    .unwrap()
                    .unwrap()
                    .mod_rev,
                rev
            );
        }
    }
}
