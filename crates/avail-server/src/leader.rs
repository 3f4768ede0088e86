//! Leadership: of the servers on one store, one decides (liveness verdicts, restarts,
//! placements of pending work, drains); every server serves the API.
//!
//! The leader holds the key `/control/leader`, attached to a store lease of
//! [`LEADER_TTL_S`] that it keeps alive; the others watch the key and campaign when it
//! goes (the leader's lease expired or was revoked). The revision at which a leader
//! took the key is its **term**.
//!
//! ```text
//!  campaign: grant lease; txn: if /control/leader absent -> put it (with the lease)
//!            won  -> leader (term = that revision); keep the lease alive every ttl/3
//!            lost -> follower; watch the key; on its delete, campaign again
//!  step down: no keep-alive answered for 2/3 of the TTL (before the lease can
//!             expire, so before anyone else can win): stop deciding at once
//! ```
//!
//! A server restarted with its data dir (the same server id, `server.id`) finds its
//! previous run's key and takes it back at once instead of waiting for the old lease
//! to expire: one server on redb leads from its first moment.
//!
//! **Fencing**: the decision passes run in their term ([`TERM`]); every write they
//! make compares the leader key's revision with the term, so a leader deposed in the
//! middle of a pass (its lease expired while it was paused, say) has its writes
//! refused, even before it notices.
//!
//! Followers relay the heartbeats they receive to the leader ([`crate::heard_relay`]),
//! so liveness is judged by the leader alone whichever server a node speaks to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use avail_store::{Compare, Event, LeaseId, Op, Store, StoreError, Txn};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

tokio::task_local! {
    /// The term a decision pass runs in: every store write it makes compares the leader
    /// key's revision with it ([`crate::events::Events::commit`]), so a leader deposed
    /// while its pass runs writes nothing more. API requests run outside any term.
    pub static TERM: u64;
}

/// The term of the decision pass this task runs, if any.
pub fn current_term() -> Option<u64> {
    TERM.try_with(|t| *t).ok()
}

/// The leader's key.
pub const LEADER_KEY: &str = "/control/leader";
/// Life of the leader's lease, seconds (etcd's default minimum TTL is about 2 s).
pub const LEADER_TTL_S: u64 = 2;

/// This server's part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not deciding; `leader` is the server that leads, when known.
    Follower {
        /// The leading server.
        leader: Option<LeaderRecord>,
    },
    /// Deciding, since `term` (the revision it took the key at).
    Leader {
        /// The term.
        term: u64,
    },
}

/// What the leader's key holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The server's id.
    pub server: String,
    /// Its API address.
    pub addr: String,
    /// When it took the lead.
    pub since_ms: u64,
}

/// This server's view of the leadership, kept by a campaign task (stopped, without
/// resigning, when the last clone is dropped).
#[derive(Clone)]
pub struct Leadership {
    id: String,
    role: watch::Receiver<Role>,
    task: Arc<AbortOnDrop>,
    store: Arc<dyn Store>,
    /// The lease of the key while this server holds it.
    holding: Arc<std::sync::Mutex<Option<LeaseId>>>,
    /// Whether the leader's last keep-alive was answered (see [`Leadership::in_touch`]).
    in_touch: Arc<std::sync::atomic::AtomicBool>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Leadership {
    /// Campaign on `store` as server `id` (serving at `addr`), with a lease of `ttl_s`.
    pub fn start(store: Arc<dyn Store>, id: String, addr: String, ttl_s: u64) -> Leadership {
        let (tx, rx) = watch::channel(Role::Follower { leader: None });
        let holding = Arc::new(std::sync::Mutex::new(None));
        let in_touch = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let task = tokio::spawn(campaign(
            store.clone(),
            id.clone(),
            addr,
            ttl_s,
            tx,
            holding.clone(),
            in_touch.clone(),
        ));
        Leadership {
            id,
            role: rx,
            task: Arc::new(AbortOnDrop(task)),
            store,
            holding,
            in_touch,
        }
    }

    /// Whether this server, leading, is in touch with the store: its last keep-alive
    /// of the lead was answered. A leader out of touch stops vouching for heartbeats at
    /// once (every node then loses the control plane at the same moment, whether it
    /// speaks to the leader or through a follower), before it steps down.
    pub fn in_touch(&self) -> bool {
        self.in_touch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stop campaigning and give the lead up now (a clean shutdown: another server
    /// leads at once instead of after the lease runs out).
    pub async fn resign(&self) {
        self.task.0.abort();
        let held = self
            .holding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(lease) = held
            && let Err(e) = self.store.revoke_lease(lease).await
        {
            tracing::warn!("resigning the lead: {e}");
        }
    }

    /// This server's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The control plane as this server sees it: whether it leads, the leader as the
    /// store says now (a linearizable read), and the `servers` registered.
    pub async fn control_plane(
        &self,
        servers: Vec<avail_model::api::ServerInfo>,
    ) -> Result<avail_model::api::ControlPlane, StoreError> {
        let kv = self.store.get(LEADER_KEY).await?;
        let leader = kv.and_then(|kv| {
            let r: LeaderRecord = serde_json::from_slice(&kv.value).ok()?;
            Some(avail_model::api::LeaderInfo {
                server: r.server,
                addr: r.addr,
                term: kv.mod_rev,
            })
        });
        Ok(avail_model::api::ControlPlane {
            server: self.id.clone(),
            leads: self.is_leader(),
            leader,
            servers,
        })
    }

    /// Whether this server decides now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader { .. })
    }

    /// This server's part now.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Wait until the role satisfies `f` (at most `within`); whether it did.
    pub async fn wait_for(&self, within: Duration, f: impl Fn(&Role) -> bool) -> bool {
        let mut rx = self.role.clone();
        tokio::time::timeout(within, rx.wait_for(|r| f(r)))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn campaign(
    store: Arc<dyn Store>,
    id: String,
    addr: String,
    ttl_s: u64,
    tx: watch::Sender<Role>,
    holding: Arc<std::sync::Mutex<Option<LeaseId>>>,
    in_touch: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut backoff = Duration::from_millis(100);
    while !tx.is_closed() {
        match run_once(store.as_ref(), &id, &addr, ttl_s, &tx, &holding, &in_touch).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!("leadership: {e}; campaigning again in {backoff:?}");
                // A follower cut off from the store keeps the leader it knew: it relays
                // heartbeats there, and the leader says whether it still leads (a
                // follower that forgot it would leave its nodes unheard while the
                // leader hears the others: they would fence).
                let knew = match &*tx.borrow() {
                    Role::Follower { leader } => leader.clone(),
                    Role::Leader { .. } => None,
                };
                tx.send_replace(Role::Follower { leader: knew });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One lease's life: campaign until won, then hold until lost. `Ok` when this server
/// stepped down (a new campaign follows).
async fn run_once(
    store: &dyn Store,
    id: &str,
    addr: &str,
    ttl_s: u64,
    tx: &watch::Sender<Role>,
    holding: &std::sync::Mutex<Option<LeaseId>>,
    in_touch: &std::sync::atomic::AtomicBool,
) -> Result<(), StoreError> {
    // When the lease was last renewed (the request's send time): its life is counted
    // from here, never from an answer's arrival.
    let mut renewed = Instant::now();
    let lease = store.grant_lease(ttl_s).await?;
    let record = LeaderRecord {
        server: id.to_string(),
        addr: addr.to_string(),
        since_ms: crate::now_ms(),
    };
    let value = serde_json::to_vec(&record).expect("record serialises");
    loop {
        let won = store
            .txn(Txn {
                compares: vec![Compare::ModRev(LEADER_KEY.into(), 0)],
                success: vec![Op::Put {
                    key: LEADER_KEY.into(),
                    value: value.clone(),
                    lease: Some(lease),
                }],
                failure: vec![],
            })
            .await?;
        if won.succeeded {
            tracing::info!(term = won.revision, "this server leads");
            *holding.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
            in_touch.store(true, std::sync::atomic::Ordering::Release);
            tx.send_replace(Role::Leader { term: won.revision });
            let held = hold(store, lease, ttl_s, won.revision, renewed, in_touch).await;
            holding.lock().unwrap_or_else(|p| p.into_inner()).take();
            held?;
            tracing::warn!("this server stepped down");
            tx.send_replace(Role::Follower { leader: None });
            let _ = store.revoke_lease(lease).await;
            return Ok(());
        }
        // The key and the revision it was read at, in one read: the watch below
        // starts there (not at the key's own, perhaps long compacted, revision).
        let (kvs, at) = store.range(LEADER_KEY).await?;
        let Some(kv) = kvs.into_iter().find(|kv| kv.key == LEADER_KEY) else {
            continue;
        };
        let Ok(holder) = serde_json::from_slice::<LeaderRecord>(&kv.value) else {
            return Err(StoreError::Backend(format!(
                "{LEADER_KEY} holds no leader record"
            )));
        };
        if holder.server == id {
            // A previous run of this server: take the key back now.
            store
                .txn(Txn {
                    compares: vec![Compare::ModRev(LEADER_KEY.into(), kv.mod_rev)],
                    success: vec![Op::Delete {
                        key: LEADER_KEY.into(),
                    }],
                    failure: vec![],
                })
                .await?;
            if let Some(old) = kv.lease.filter(|l| *l != lease) {
                let _ = store.revoke_lease(old).await;
            }
            continue;
        }
        tx.send_replace(Role::Follower {
            leader: Some(holder),
        });
        wait_until_gone(store, lease, ttl_s, at, &mut renewed).await?;
    }
}

/// Keep `lease` alive until it cannot be, or the key taken at `term` is gone:
/// returns when this server must stop deciding. The lease was last renewed by a
/// request sent at `renewed`; this server stops deciding two thirds of the TTL after
/// the send time of its last renewal that was answered, before the lease can expire.
async fn hold(
    store: &dyn Store,
    lease: LeaseId,
    ttl_s: u64,
    term: u64,
    renewed: Instant,
    in_touch: &std::sync::atomic::AtomicBool,
) -> Result<(), StoreError> {
    let ttl = Duration::from_secs(ttl_s);
    let period = ttl / 3;
    let mut deadline = renewed + ttl * 2 / 3;
    let mut w = store.watch(LEADER_KEY, term).await?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::select! {
            ev = w.next() => match ev {
                // Deleted, or put by another lease: no longer this server's.
                Some(Event::Delete { .. }) | None => return Ok(()),
                Some(Event::Put(kv)) if kv.lease != Some(lease) => return Ok(()),
                Some(Event::Put(_)) => {}
            },
            _ = tokio::time::sleep(period.min(left)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                let sent = Instant::now();
                match tokio::time::timeout(period.min(left), store.keep_alive(lease)).await {
                    Ok(Ok(())) => {
                        deadline = sent + ttl * 2 / 3;
                        in_touch.store(true, std::sync::atomic::Ordering::Release);
                    }
                    Ok(Err(StoreError::LeaseNotFound(_))) => return Ok(()),
                    Ok(Err(e)) => {
                        in_touch.store(false, std::sync::atomic::Ordering::Release);
                        tracing::warn!("leader lease keep-alive: {e}");
                    }
                    Err(_) => {
                        in_touch.store(false, std::sync::atomic::Ordering::Release);
                        tracing::warn!("leader lease keep-alive: no answer in time");
                    }
                }
            }
        }
    }
}

/// Wait until the leader's key, as read at `rev`, changes hands (deleted), keeping
/// this server's own `lease` alive meanwhile (`renewed`: when the last renewal that
/// was answered was sent).
async fn wait_until_gone(
    store: &dyn Store,
    lease: LeaseId,
    ttl_s: u64,
    rev: u64,
    renewed: &mut Instant,
) -> Result<(), StoreError> {
    let mut w = store.watch(LEADER_KEY, rev).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(ttl_s) / 3);
    loop {
        tokio::select! {
            ev = w.next() => match ev {
                Some(Event::Delete { key, .. }) if key == LEADER_KEY => return Ok(()),
                Some(_) => {}
                None => return Err(StoreError::Backend("the leader watch closed".into())),
            },
            _ = tick.tick() => {
                let sent = Instant::now();
                store.keep_alive(lease).await?;
                *renewed = sent;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avail_store::RedbStore;

    fn redb() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("s")).unwrap());
        (dir, store)
    }

    fn leads(r: &Role) -> bool {
        matches!(r, Role::Leader { .. })
    }

    #[tokio::test]
    async fn one_server_leads_at_once_and_again_after_its_restart() {
        let (_dir, store) = redb();
        let a = Leadership::start(store.clone(), "a".into(), "x".into(), 60);
        assert!(a.wait_for(Duration::from_secs(10), leads).await);
        let Role::Leader { term } = a.role() else {
            unreachable!()
        };
        // Another server waits while a holds the key.
        let b = Leadership::start(store.clone(), "b".into(), "y".into(), 60);
        assert!(
            b.wait_for(Duration::from_secs(10), |r| matches!(r,
                Role::Follower { leader: Some(l) } if l.server == "a" && l.addr == "x"))
                .await
        );
        drop(b);
        // a's process dies (its lease lives on) and a restarts: it leads at once, in a
        // new term, without waiting for its old lease (60 s).
        drop(a);
        let a2 = Leadership::start(store.clone(), "a".into(), "x".into(), 60);
        assert!(
            a2.wait_for(
                Duration::from_secs(10),
                |r| matches!(r, Role::Leader { term: t } if *t > term)
            )
            .await
        );
    }

    #[tokio::test]
    async fn a_follower_takes_over_when_the_leaders_lease_ends() {
        let (_dir, store) = redb();
        let a = Leadership::start(store.clone(), "a".into(), "x".into(), 2);
        assert!(a.wait_for(Duration::from_secs(10), leads).await);
        let Role::Leader { term } = a.role() else {
            unreachable!()
        };
        // Its lease is revoked (as when it expires while a is paused): a steps down
        // and, alone, campaigns again and leads in a new term.
        let kv = store.get(LEADER_KEY).await.unwrap().unwrap();
        store.revoke_lease(kv.lease.unwrap()).await.unwrap();
        assert!(
            a.wait_for(
                Duration::from_secs(10),
                |r| matches!(r, Role::Leader { term: t } if *t > term)
            )
            .await
        );
        // With a follower: the leader dies (its lease lives on until it runs out, or is
        // revoked as here), and the follower leads.
        let b = Leadership::start(store.clone(), "b".into(), "y".into(), 2);
        assert!(b.wait_for(Duration::from_secs(10), |r| !leads(r)).await);
        drop(a);
        let kv = store.get(LEADER_KEY).await.unwrap().unwrap();
        store.revoke_lease(kv.lease.unwrap()).await.unwrap();
        assert!(b.wait_for(Duration::from_secs(10), leads).await);
        let holder: LeaderRecord =
            serde_json::from_slice(&store.get(LEADER_KEY).await.unwrap().unwrap().value).unwrap();
        assert_eq!(holder.server, "b");
    }

    /// A leader that resigns (a clean shutdown) is replaced at once, not after its
    /// lease (60 s here) runs out.
    #[tokio::test]
    async fn a_resigning_leader_is_replaced_at_once() {
        let (_dir, store) = redb();
        let a = Leadership::start(store.clone(), "a".into(), "x".into(), 60);
        assert!(a.wait_for(Duration::from_secs(10), leads).await);
        let b = Leadership::start(store.clone(), "b".into(), "y".into(), 60);
        assert!(
            b.wait_for(Duration::from_secs(10), |r| matches!(r,
                Role::Follower { leader: Some(l) } if l.server == "a" && l.addr == "x"))
                .await
        );
        a.resign().await;
        assert!(b.wait_for(Duration::from_secs(10), leads).await);
    }

    /// A write made in a term holds while the term does: once the key changed hands it
    /// is refused, and its event is not recorded.
    #[tokio::test]
    async fn a_deposed_leaders_writes_are_refused() {
        let (_dir, store) = redb();
        let events = crate::events::Events::open(store.clone()).await.unwrap();
        let a = Leadership::start(store.clone(), "a".into(), "x".into(), 5);
        assert!(a.wait_for(Duration::from_secs(10), leads).await);
        let Role::Leader { term } = a.role() else {
            unreachable!()
        };
        let put = |v: &str| Txn {
            compares: vec![],
            success: vec![Op::Put {
                key: "/workloads/w".into(),
                value: v.as_bytes().to_vec(),
                lease: None,
            }],
            failure: vec![],
        };
        let ev = || {
            vec![crate::events::NewEvent::new(
                avail_model::EventKind::WorkloadPlaced,
                Some("w"),
                None,
                "x",
            )]
        };
        let r = TERM
            .scope(term, events.commit(put("1"), ev()))
            .await
            .unwrap();
        assert!(r.succeeded);
        // Another server takes the key (a's lease ran out while it was paused).
        drop(a);
        let kv = store.get(LEADER_KEY).await.unwrap().unwrap();
        store.revoke_lease(kv.lease.unwrap()).await.unwrap();
        let b = Leadership::start(store.clone(), "b".into(), "y".into(), 5);
        assert!(b.wait_for(Duration::from_secs(10), leads).await);
        let r = TERM
            .scope(term, events.commit(put("2"), ev()))
            .await
            .unwrap();
        assert!(!r.succeeded, "a deposed leader's write");
        assert_eq!(
            store.get("/workloads/w").await.unwrap().unwrap().value,
            b"1"
        );
        assert_eq!(events.last_seq().await, 1, "its event not recorded");
        // Outside any term (an API request), the write goes through.
        assert!(events.commit(put("3"), ev()).await.unwrap().succeeded);
    }

    /// On a real etcd: two servers, one leads; the leader's process is gone (its
    /// lease is not revoked), the other leads within the lease's life.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_etcd_the_other_server_leads_when_the_leader_is_gone() {
        let etcd = avail_store::etcd_process::EtcdCluster::single();
        let connect = || async {
            let s: Arc<dyn Store> = Arc::new(
                avail_store::EtcdStore::connect(&etcd.endpoints(), Default::default())
                    .await
                    .unwrap(),
            );
            s
        };
        // Server a on a runtime of its own, on a thread of its own, dropped whole below
        // (a crash: its lease is not revoked).
        let endpoints = etcd.endpoints();
        let (a_tx, a_rx) = std::sync::mpsc::channel();
        let (die_tx, die_rx) = std::sync::mpsc::channel::<()>();
        let server_a = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let s: Arc<dyn Store> = Arc::new(
                    avail_store::EtcdStore::connect(&endpoints, Default::default())
                        .await
                        .unwrap(),
                );
                a_tx.send(Leadership::start(s, "a".into(), "x".into(), LEADER_TTL_S))
                    .unwrap();
                // Runs until told to die.
                tokio::task::spawn_blocking(move || die_rx.recv())
                    .await
                    .ok();
            });
            rt.shutdown_background();
        });
        let a = a_rx.recv().unwrap();
        assert!(a.wait_for(Duration::from_secs(10), leads).await);
        let b = Leadership::start(connect().await, "b".into(), "y".into(), LEADER_TTL_S);
        assert!(b.wait_for(Duration::from_secs(10), |r| !leads(r)).await);
        die_tx.send(()).unwrap();
        server_a.join().unwrap();
        assert!(b.wait_for(Duration::from_secs(10), leads).await);
    }
}
