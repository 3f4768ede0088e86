//! The conformance suite against a real etcd (Debian `etcd-server`, started by
//! [`EtcdCluster`]; a missing binary fails every test with a line naming the package),
//! then what only etcd can get wrong: watches resumed after a restart or a cut
//! connection, compaction, leases across a restart, namespaces, bounds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use avail_store::conformance::{self, WAIT};
use avail_store::etcd_process::EtcdCluster;
use avail_store::{EtcdOptions, EtcdStore, Event, Revision, Store, StoreError, Watch};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch as signal;
use tokio::time::Instant;

async fn connect_with(endpoints: Vec<String>, options: EtcdOptions) -> EtcdStore {
    EtcdStore::connect(&endpoints, options)
        .await
        .unwrap_or_else(|e| panic!("connect to etcd at {endpoints:?}: {e}"))
}

async fn connect(cluster: &EtcdCluster, prefix: &str) -> EtcdStore {
    let options = EtcdOptions {
        key_prefix: prefix.into(),
        ..EtcdOptions::default()
    };
    connect_with(cluster.endpoints(), options).await
}

/// A fresh etcd per check: checks count revisions, so no other writer may share it.
async fn make() -> (EtcdCluster, EtcdStore) {
    let cluster = EtcdCluster::single();
    let store = connect(&cluster, "/conformance/").await;
    (cluster, store)
}

avail_store::store_conformance_tests!(make);

/// `run_all` on one etcd, each check in its own namespace: namespaces isolate keys and
/// history (the watch-from-0 check replays only its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_etcd_one_namespace_per_check() {
    let cluster = EtcdCluster::single();
    let (cluster, n) = (&cluster, &AtomicUsize::new(0));
    conformance::run_all(move || async move {
        let i = n.fetch_add(1, Ordering::Relaxed);
        ((), connect(cluster, &format!("/run_all/{i}/")).await)
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Helpers

async fn put(store: &dyn Store, key: &str, value: &str) -> Revision {
    store
        .put(key, value.as_bytes().to_vec(), None)
        .await
        .unwrap_or_else(|e| panic!("put {key:?}: {e}"))
}

/// Waits until the store answers again (after a restart), or panics with the last error.
async fn until_answers(store: &dyn Store) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.revision().await {
            Ok(_) => return,
            Err(e) if Instant::now() >= deadline => panic!("etcd does not answer again: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The next `n` events, or a panic naming what came.
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

fn revisions(events: &[Event]) -> Vec<Revision> {
    events.iter().map(Event::revision).collect()
}

/// A TCP proxy to one etcd that a test can cut: [`Proxy::cut`] closes every proxied
/// connection and refuses new ones until [`Proxy::heal`].
struct Proxy {
    addr: SocketAddr,
    cut: signal::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (cut, cut_rx) = signal::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if *cut_rx.borrow() {
                    continue; // dropped: refused
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy { addr, cut, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn etcd_addr(cluster: &EtcdCluster) -> SocketAddr {
    let url = &cluster.endpoints()[0];
    url.trim_start_matches("http://")
        .parse()
        .expect("etcd address")
}

// ---------------------------------------------------------------------------------------
// Watch resumption

/// A watch survives a SIGKILL and restart of etcd: after the restart it resumes from the
/// last revision it delivered; every revision after `from` arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_etcd_restart_without_loss_or_duplicates() {
    let mut cluster = EtcdCluster::single();
    let store = connect(&cluster, "/resume/").await;
    let mut written = Vec::new();
    for i in 0..5 {
        written.push(put(&store, &format!("w/k{i}"), &i.to_string()).await);
    }
    let from = written[1];
    let mut w = store.watch("w/", from).await.expect("watch");
    let first = next_events(&mut w, 3, "before the restart").await;
    assert_eq!(
        revisions(&first),
        written[2..5],
        "catch-up before the restart"
    );

    cluster.kill(0);
    cluster.restart(0);
    until_answers(&store).await;
    for i in 5..10 {
        written.push(put(&store, &format!("w/k{i}"), &i.to_string()).await);
    }
    let sentinel = put(&store, "w/sentinel", "").await;
    let after = next_events(&mut w, 6, "after the restart").await;
    let mut expected = written[5..10].to_vec();
    expected.push(sentinel);
    assert_eq!(
        revisions(&after),
        expected,
        "events after the restart: none lost, none repeated"
    );
}

/// A watch whose connection is cut while writes go on (through another connection)
/// resumes from its last delivered revision and sees every write of the outage once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_a_cut_connection_with_the_writes_of_the_outage() {
    let cluster = EtcdCluster::single();
    let writer = connect(&cluster, "/cut/").await;
    let proxy = Proxy::start(etcd_addr(&cluster)).await;
    let options = EtcdOptions {
        key_prefix: "/cut/".into(),
        ..EtcdOptions::default()
    };
    let watcher = connect_with(vec![proxy.url()], options).await;
    let from = writer.revision().await.expect("revision");
    let mut w = watcher.watch("k/", from).await.expect("watch");
    let mut written = Vec::new();
    for i in 0..3 {
        written.push(put(&writer, &format!("k/{}", i % 2), &i.to_string()).await);
    }
    let before = next_events(&mut w, 3, "before the cut").await;
    assert_eq!(revisions(&before), written);

    proxy.cut();
    for i in 3..40 {
        written.push(put(&writer, &format!("k/{}", i % 2), &i.to_string()).await);
    }
    // A transaction of several keys: one revision, whose events must arrive together.
    let txn = writer
        .txn(avail_store::Txn {
            compares: vec![],
            success: vec![
                avail_store::Op::Put {
                    key: "k/a".into(),
                    value: b"a".to_vec(),
                    lease: None,
                },
                avail_store::Op::Delete { key: "k/0".into() },
            ],
            failure: vec![],
        })
        .await
        .expect("txn");
    proxy.heal();
    let sentinel = put(&writer, "k/sentinel", "").await;
    let after = next_events(&mut w, 37 + 2 + 1, "after the cut").await;
    let mut expected: Vec<Revision> = written[3..].to_vec();
    expected.extend([txn.revision, txn.revision, sentinel]);
    assert_eq!(revisions(&after), expected, "events of the outage");
    assert!(
        matches!(&after[37], Event::Put(kv) if kv.key == "k/a")
            && matches!(&after[38], Event::Delete { key, .. } if key == "k/0"),
        "the transaction's events in order: {:?}",
        &after[37..39]
    );
}

// ---------------------------------------------------------------------------------------
// Compaction

/// A watch from below etcd's compaction is `Compacted` with `oldest` = the compact
/// revision, including the boundary `C - 1` (a delete at `C` is no longer replayable);
/// from `C` on, the later history replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_below_a_compaction_is_compacted() {
    let cluster = EtcdCluster::single();
    let store = connect(&cluster, "/compact/").await;
    let mut revs = Vec::new();
    for i in 0..6 {
        revs.push(put(&store, &format!("c/k{i}"), "v").await);
    }
    let c = revs[3];
    store.compact(c).await.expect("compact");
    store
        .compact(revs[1])
        .await
        .expect("compacting below is a no-op");
    for from in [0, revs[0], c - 1] {
        match store.watch("c/", from).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (from, c), "watch from {from}");
            }
            other => panic!("watch from {from} below compaction {c}: {other:?}"),
        }
    }
    let mut w = store
        .watch("c/", c)
        .await
        .expect("watch from the compact revision");
    let events = next_events(&mut w, 2, "history after the compaction").await;
    assert_eq!(revisions(&events), revs[4..]);
    let current = store.revision().await.expect("revision");
    assert!(matches!(
        store.compact(current + 10).await,
        Err(StoreError::Invalid(_))
    ));
}

/// A watch whose resume point is compacted while its connection is down closes its
/// channel (the caller re-reads) after what it had delivered: it never skips events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_closes_when_its_resume_point_was_compacted() {
    let cluster = EtcdCluster::single();
    let writer = connect(&cluster, "/gap/").await;
    let proxy = Proxy::start(etcd_addr(&cluster)).await;
    let options = EtcdOptions {
        key_prefix: "/gap/".into(),
        ..EtcdOptions::default()
    };
    let watcher = connect_with(vec![proxy.url()], options).await;
    let from = writer.revision().await.expect("revision");
    let mut w = watcher.watch("k/", from).await.expect("watch");
    let r1 = put(&writer, "k/a", "1").await;
    assert_eq!(
        revisions(&next_events(&mut w, 1, "before the cut").await),
        [r1]
    );

    proxy.cut();
    for i in 0..3 {
        put(&writer, "k/a", &i.to_string()).await;
    }
    let newest = writer.revision().await.expect("revision");
    writer.compact(newest).await.expect("compact");
    proxy.heal();
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(None) => {}
        other => panic!("expected the watch to close, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Leases

/// A lease survives an etcd restart (with its full TTL again, as after a leader change),
/// then, left alone, expires: its keys vanish with delete events in one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_survives_a_restart_then_its_keys_vanish_when_it_expires() {
    let mut cluster = EtcdCluster::single();
    let store = connect(&cluster, "/lease/").await;
    let lease = store.grant_lease(2).await.expect("grant");
    for k in ["l/a", "l/b"] {
        store
            .put(k, b"v".to_vec(), Some(lease))
            .await
            .expect("put with lease");
    }
    put(&store, "l/keep", "v").await;
    cluster.kill(0);
    cluster.restart(0);
    until_answers(&store).await;
    store
        .keep_alive(lease)
        .await
        .expect("lease alive after restart");
    let at = store.revision().await.expect("revision");
    let mut w = store.watch("l/", at).await.expect("watch");
    let events = next_events(&mut w, 2, "deletes of the expiry").await;
    let mut keys: Vec<&str> = events.iter().map(Event::key).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["l/a", "l/b"]);
    assert!(
        events
            .iter()
            .all(|e| matches!(e, Event::Delete { .. }) && e.revision() == events[0].revision()),
        "{events:?}"
    );
    let (left, _) = store.range("l/").await.expect("range");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
}

// ---------------------------------------------------------------------------------------
// Namespaces and bounds

/// Two stores with different prefixes on one etcd see only their own keys and events,
/// with the prefix stripped; the raw etcd key carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_on_one_etcd_are_isolated() {
    let cluster = EtcdCluster::single();
    let a = connect(&cluster, "/a/").await;
    let b = connect(&cluster, "/b/").await;
    let raw = connect(&cluster, "").await;
    let mut wb = b
        .watch("", b.revision().await.expect("rev"))
        .await
        .expect("watch");
    put(&a, "x", "from a").await;
    let rb = put(&b, "x", "from b").await;
    assert_eq!(a.get("x").await.expect("get").expect("x").value, b"from a");
    let (all_b, _) = b.range("").await.expect("range");
    assert_eq!(all_b.len(), 1);
    assert_eq!(
        (all_b[0].key.as_str(), all_b[0].value.as_slice()),
        ("x", &b"from b"[..])
    );
    let e = next_events(&mut wb, 1, "b's watch").await;
    assert_eq!((e[0].key(), e[0].revision()), ("x", rb), "only b's event");
    let (raw_keys, _) = raw.range("/").await.expect("raw range");
    let keys: Vec<&str> = raw_keys.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/a/x", "/b/x"]);
}

/// Calls to an etcd that hangs (SIGSTOP) fail within the request timeout, and work again
/// once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_within_the_timeout_when_etcd_hangs() {
    let cluster = EtcdCluster::single();
    let options = EtcdOptions {
        key_prefix: "/hang/".into(),
        request_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    };
    let store = connect_with(cluster.endpoints(), options).await;
    put(&store, "k", "v").await;
    cluster.pause(0);
    let started = Instant::now();
    let r = store.get("k").await;
    let took = started.elapsed();
    let w = store.watch("", 0).await;
    cluster.resume(0);
    assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
    assert!(matches!(w, Err(StoreError::Backend(_))), "{w:?}");
    assert!(took < Duration::from_secs(4), "get took {took:?}");
    until_answers(&store).await;
    assert_eq!(store.get("k").await.expect("get").expect("k").value, b"v");
}

/// Connecting to nothing is an `Open` error naming the endpoint, within the timeouts.
#[tokio::test]
async fn connect_to_no_etcd_is_an_open_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    match EtcdStore::connect(std::slice::from_ref(&url), EtcdOptions::default()).await {
        Err(StoreError::Open { path, .. }) => assert_eq!(path, url),
        other => panic!("connect to nothing: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A watcher that falls a whole channel behind is cancelled: it gets what was queued, in
/// order, then its channel closes. The history is written first, so that etcd sends it
/// as one catch-up batch, and the runtime has one thread, so that the reader cannot
/// drain the channel while the batch is handed over.
#[tokio::test(flavor = "current_thread")]
async fn slow_watcher_is_cancelled_after_its_channel_fills() {
    let cluster = EtcdCluster::single();
    let options = EtcdOptions {
        key_prefix: "/slow/".into(),
        watch_channel: 4,
        ..EtcdOptions::default()
    };
    let store = connect_with(cluster.endpoints(), options).await;
    let from = store.revision().await.expect("revision");
    let mut written = Vec::new();
    for i in 0..12 {
        written.push(put(&store, "k", &i.to_string()).await);
    }
    let mut w = store.watch("", from).await.expect("watch");
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, w.next()).await {
            Ok(Some(e)) => got.push(e.revision()),
            Ok(None) => break,
            Err(_) => panic!("slow watcher neither cancelled nor fed: {got:?}"),
        }
    }
    assert!(
        got.len() >= 4 && got.len() < written.len() && got[..] == written[..got.len()],
        "a prefix of the writes, then the end: {got:?} of {written:?}"
    );
}

/// On three members, the store moves on when the member it talks to dies: reads at
/// once, writes after at most one failure (a write sent on the dead member's connection
/// before the client noticed it closed has an unknown fate, and is reported so), and the
/// watch resumes on another member with exactly the acknowledged writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_store_moves_on_when_its_member_dies() {
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster.leader().expect("a leader");
    // A follower first in the store's list: the member it talks to. (Killing the
    // leader would stall writes for an election.)
    let victim = (leader + 1) % 3;
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(victim);
    let options = EtcdOptions {
        key_prefix: "/three/".into(),
        ..EtcdOptions::default()
    };
    let store = connect_with(endpoints.clone(), options.clone()).await;
    let r0 = put(&store, "k", "0").await;
    let mut w = store.watch("k", r0).await.expect("watch");
    cluster.kill(victim);

    let mut written = Vec::new();
    let mut failed = Vec::new();
    for i in 1..=20 {
        match store.put("k", i.to_string().into_bytes(), None).await {
            Ok(r) => written.push(r),
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.len() <= 1 && matches!(failed.first(), None | Some(StoreError::Backend(_))),
        "writes failed after the member died: {failed:?}"
    );
    let events = next_events(&mut w, written.len(), "writes with 2 of 3").await;
    assert_eq!(revisions(&events), written, "watch vs acknowledged writes");

    // A new store whose first member is the dead one: it connects (its first read moves
    // on) and writes at once.
    let fresh = connect_with(endpoints, options).await;
    let r = put(&fresh, "k", "fresh").await;
    assert_eq!(fresh.get("k").await.expect("get").expect("k").mod_rev, r);

    cluster.restart(victim);
    assert_eq!(
        store.get("k").await.expect("get").expect("k").value,
        b"fresh"
    );
}
