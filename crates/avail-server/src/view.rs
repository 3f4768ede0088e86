//! The view: the store mirrored in memory by its watch, with the indexes the scheduler
//! plans on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use avail_model::{Resources, Workload};
use avail_sched::{ClusterView, NodeView};
use avail_store::{Event, StoreError};
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::level_policy::decode_policy;
use crate::state::*;

/// What the store keeps about a node (its liveness is the `/alive/` key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Name.
    pub name: String,
    /// IP address.
    pub address: String,
    /// Ingress base URL.
    pub ingress_url: String,
    /// Tags in force: the agent's, with the operator's changes applied.
    pub tags: BTreeMap<String, String>,
    /// Tags the agent declared when it joined.
    #[serde(default)]
    pub agent_tags: BTreeMap<String, String>,
    /// The operator's changes (`avail node tag`): a value sets the tag, `None` removes
    /// it. They outlive the agent's restarts and rejoins.
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, Option<String>>,
    /// Capacity.
    pub capacity: Resources,
    /// The most workload replicas it takes.
    #[serde(default = "avail_model::node::default_max_workloads")]
    pub max_workloads: u32,
    /// First join.
    pub joined_ms: u64,
    /// Agent version.
    pub agent_version: String,
    /// The agent's replication listener.
    #[serde(default)]
    pub replication_addr: String,
    /// The agent run that last joined.
    #[serde(default)]
    pub boot_id: String,
    /// Being drained (`avail node drain`): it takes no new work and everything on it
    /// is moved off. Kept across the agent's rejoins until `undrain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainRecord>,
    /// The key the name is bound to and the certificates that speak for it.
    #[serde(default)]
    pub identity: crate::identity::NodeIdentity,
}

/// A drain as stored on the node record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    /// When it started.
    pub started_ms: u64,
    /// What was on the node then (replicas, standbys, reservations).
    pub total: u64,
}

impl NodeRecord {
    /// The agent's tags with the operator's changes applied.
    pub fn tags_in_force(&self) -> BTreeMap<String, String> {
        let mut t = self.agent_tags.clone();
        for (k, v) in &self.tag_overrides {
            match v {
                Some(v) => {
                    t.insert(k.clone(), v.clone());
                }
                None => {
                    t.remove(k);
                }
            }
        }
        t
    }
}

/// The cluster as last read from the store.
#[derive(Debug, Default)]
pub struct View {
    /// Revision the view reflects.
    pub rev: u64,
    /// Workloads and their `mod_rev`.
    pub workloads: BTreeMap<String, (Workload, u64)>,
    /// Node records.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Nodes whose liveness key exists.
    pub alive: BTreeSet<String>,
    /// The servers of the cluster, as registered ([`crate::membership`]).
    pub servers: BTreeMap<String, avail_model::api::ServerInfo>,
    /// The leader's liveness verdicts, as last written ([`keys::VERDICTS`]).
    pub verdicts: HashMap<String, avail_model::NodeState>,
    /// Resources placed on each node (primaries and ft secondaries), kept up to date as
    /// workloads change: no scan of the workloads per node.
    pub allocated: HashMap<String, Resources>,
    /// Replicas placed on each node (against its workload limit), kept like `allocated`.
    pub replicas: HashMap<String, u32>,
    /// The scheduler's indexed view, kept up to date as nodes, their tags, their
    /// allocations and (from the liveness tick) their readiness change.
    pub sched: ClusterView,
    /// `mod_rev` of the placement key: the revision a plan is made at.
    pub placement_rev: u64,
    /// The cluster's level policy (the default when none is stored).
    pub policy: avail_model::spec::LevelPolicy,
}

impl View {
    /// Add (`add`) or take away a workload's resources on the nodes it occupies, and
    /// its `ha` reservation.
    pub(crate) fn account(&mut self, w: &Workload, add: bool) {
        if let Some(r) = &w.status.reservation {
            if add {
                self.sched.reserve(
                    r,
                    avail_sched::Reservation {
                        workload: w.spec.name.clone(),
                        priority: w.spec.ha.priority,
                        resources: w.spec.resources,
                    },
                );
            } else {
                self.sched.unreserve(r, &w.spec.name);
            }
        }
        let mut nodes: Vec<&str> = [
            w.status.node.as_deref(),
            w.status.secondary.as_deref(),
            w.status.moving_to.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        nodes.sort_unstable();
        nodes.dedup();
        for n in nodes {
            let a = self.allocated.entry(n.to_string()).or_insert(Resources {
                cpu_millis: 0,
                memory_mib: 0,
            });
            let k = self.replicas.entry(n.to_string()).or_default();
            if add {
                *a = a.saturating_add(w.spec.resources);
                *k = k.saturating_add(1);
                self.sched.allocate(n, w.spec.resources);
            } else {
                *a = a.saturating_sub(w.spec.resources);
                *k = k.saturating_sub(1);
                self.sched.release(n, w.spec.resources);
            }
        }
    }

    pub(crate) fn put_workload(&mut self, name: &str, w: Workload, mod_rev: u64) {
        if let Some((old, _)) = self.workloads.remove(name) {
            self.account(&old, false);
        }
        self.account(&w, true);
        self.workloads.insert(name.to_string(), (w, mod_rev));
    }

    pub(crate) fn delete_workload(&mut self, name: &str) {
        if let Some((old, _)) = self.workloads.remove(name) {
            self.account(&old, false);
        }
    }

    pub(crate) fn put_node(&mut self, rec: NodeRecord) {
        let schedulable = self.sched.node(&rec.name).is_some_and(|n| n.schedulable);
        // A node seen for the first time: the reservations already held on it.
        let reserved = match self.sched.node(&rec.name) {
            Some(n) => n.reserved.clone(),
            None => self
                .workloads
                .values()
                .filter(|(w, _)| w.status.reservation.as_deref() == Some(rec.name.as_str()))
                .map(|(w, _)| avail_sched::Reservation {
                    workload: w.spec.name.clone(),
                    priority: w.spec.ha.priority,
                    resources: w.spec.resources,
                })
                .collect(),
        };
        self.sched.upsert(NodeView {
            name: rec.name.clone(),
            tags: rec.tags.clone(),
            capacity: rec.capacity,
            allocated: self.allocated.get(&rec.name).copied().unwrap_or(Resources {
                cpu_millis: 0,
                memory_mib: 0,
            }),
            workloads: self.replicas.get(&rec.name).copied().unwrap_or(0),
            max_workloads: rec.max_workloads,
            schedulable,
            reserved,
        });
        self.nodes.insert(rec.name.clone(), rec);
    }

    /// The leader's verdict on `name` (none: deleted); the scheduler follows it.
    pub(crate) fn set_verdict(&mut self, name: &str, st: Option<avail_model::NodeState>) {
        match st {
            Some(st) => {
                self.verdicts.insert(name.to_string(), st);
                self.sched
                    .set_schedulable(name, st == avail_model::NodeState::Ready);
            }
            None => {
                self.verdicts.remove(name);
                self.sched.set_schedulable(name, false);
            }
        }
    }

    pub(crate) fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
        self.sched.remove(name);
    }
}

impl AppState {
    pub(crate) async fn load(&self) -> Result<u64, StoreError> {
        let (wl, rev) = self.store.range(keys::WORKLOADS).await?;
        let mut v = View {
            rev,
            ..View::default()
        };
        for kv in wl {
            match serde_json::from_slice::<Workload>(&kv.value) {
                Ok(w) => {
                    let name = w.spec.name.clone();
                    v.put_workload(&name, w, kv.mod_rev);
                }
                Err(e) => tracing::error!("skipping unreadable {}: {e}", kv.key),
            }
        }
        // Ranges are separate reads; revisions only move forward, and the watch replays
        // anything after `rev`, so a later-revision read here is corrected by the watch.
        for kv in self.store.range(keys::NODES).await?.0 {
            if let Ok(n) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                v.put_node(n);
            }
        }
        for kv in self.store.range(keys::ALIVE).await?.0 {
            v.alive.insert(kv.key[keys::ALIVE.len()..].to_string());
        }
        for kv in self.store.range(keys::SERVERS).await?.0 {
            if let Ok(s) = serde_json::from_slice::<avail_model::api::ServerInfo>(&kv.value) {
                v.servers.insert(s.id.clone(), s);
            }
        }
        for kv in self.store.range(keys::VERDICTS).await?.0 {
            if let Ok(st) = serde_json::from_slice(&kv.value) {
                v.set_verdict(&kv.key[keys::VERDICTS.len()..], Some(st));
            }
        }
        if let Some(kv) = self.store.get(keys::LEVEL_POLICY).await? {
            v.policy = decode_policy(&kv.value);
        }
        v.placement_rev = self
            .store
            .get(keys::PLACEMENT)
            .await?
            .map(|kv| kv.mod_rev)
            .unwrap_or(0);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = v;
        self.view_rev.send_replace(rev);
        self.desired_rev.send_replace(rev);
        Ok(rev)
    }

    /// Apply one revision's changes (a write's, whole): the view then reflects that
    /// revision, and says so ([`AppState::wait_view`]) only once all of them are in.
    pub(crate) fn apply(&self, revision: &[Event]) {
        let Some(rev) = revision.iter().map(Event::revision).max() else {
            return;
        };
        let mut desired = false;
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            v.rev = v.rev.max(rev);
            for ev in revision {
                desired |= self.apply_one(&mut v, ev);
            }
        }
        if desired {
            self.desired_rev.send_replace(rev);
        }
        self.view_rev.send_replace(rev);
    }

    /// Apply one change to `v`; whether it changes what nodes are asked to run.
    fn apply_one(&self, v: &mut View, ev: &Event) -> bool {
        let key = ev.key();
        let mut desired = false;
        if let Some(name) = key.strip_prefix(keys::WORKLOADS) {
            desired = true;
            match ev {
                Event::Put(kv) => match serde_json::from_slice::<Workload>(&kv.value) {
                    Ok(w) => v.put_workload(name, w, kv.mod_rev),
                    Err(e) => tracing::error!("unreadable {key}: {e}"),
                },
                Event::Delete { .. } => v.delete_workload(name),
            }
        } else if let Some(name) = key.strip_prefix(keys::NODES) {
            desired = true;
            match ev {
                Event::Put(kv) => {
                    if let Ok(n) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                        v.put_node(n);
                    }
                }
                Event::Delete { .. } => v.delete_node(name),
            }
        } else if key == keys::LEVEL_POLICY {
            v.policy = match ev {
                Event::Put(kv) => decode_policy(&kv.value),
                Event::Delete { .. } => Default::default(),
            };
        } else if key == keys::PLACEMENT {
            v.placement_rev = match ev {
                Event::Put(kv) => kv.mod_rev,
                Event::Delete { .. } => 0,
            };
        } else if let Some(id) = key.strip_prefix(keys::SERVERS) {
            match ev {
                Event::Put(kv) => {
                    if let Ok(s) = serde_json::from_slice::<avail_model::api::ServerInfo>(&kv.value)
                    {
                        v.servers.insert(id.to_string(), s);
                    }
                }
                Event::Delete { .. } => {
                    v.servers.remove(id);
                }
            }
        } else if let Some(name) = key.strip_prefix(keys::VERDICTS) {
            desired = true;
            let st = match ev {
                Event::Put(kv) => serde_json::from_slice(&kv.value).ok(),
                Event::Delete { .. } => None,
            };
            v.set_verdict(name, st);
        } else if let Some(seq) = key.strip_prefix(keys::EVENTS) {
            if let Event::Put(kv) = ev
                && seq.len() == 20
                && let Ok(e) = serde_json::from_slice(&kv.value)
            {
                self.events.publish(e);
            }
        } else if let Some(name) = key.strip_prefix(keys::ALIVE) {
            desired = true;
            match ev {
                Event::Put(_) => v.alive.insert(name.to_string()),
                Event::Delete { .. } => v.alive.remove(name),
            };
        }
        desired
    }

    /// Wait until the view reflects revision `rev` (bounded: 5 s).
    pub async fn wait_view(&self, rev: u64) {
        let mut rx = self.view_rev.subscribe();
        if tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r >= rev))
            .await
            .is_err()
        {
            tracing::warn!("view did not reach revision {rev} within 5 s; answering anyway");
        }
    }

    /// Wait until workloads or nodes change past `rev`, at most `wait`; returns the
    /// current desired revision.
    pub async fn wait_desired(&self, rev: u64, wait: Duration) -> u64 {
        let mut rx = self.desired_rev.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|r| *r > rev)).await;
        *rx.borrow()
    }
}

pub(crate) async fn follow(state: std::sync::Weak<AppState>, mut watch: avail_store::Watch) {
    loop {
        let Some(revision) = watch.next_revision().await else {
            // The watch was dropped (we fell behind): reload and watch again.
            let Some(s) = state.upgrade() else { return };
            tracing::warn!("store watch closed; reloading the view");
            match s.load().await {
                Ok(rev) => match s.store.watch("/", rev).await {
                    Ok(w) => {
                        watch = w;
                        continue;
                    }
                    Err(e) => tracing::error!("re-watch failed: {e}"),
                },
                Err(e) => tracing::error!("reload failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let Some(s) = state.upgrade() else { return };
        s.apply(&revision);
    }
}
