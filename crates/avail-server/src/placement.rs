//! Placement: plans by the scheduler over the view, written by compare-and-swap on the
//! placement key; the passes that place pending workloads, `ha` reservations and `ft`
//! secondaries.

use avail_model::EventKind;
use avail_model::{Level, Phase, Workload, WorkloadStatus};
use avail_sched::{Decision, Preference, Request};

use crate::admission::{self, Placement};
use crate::events::NewEvent;
use crate::pending_plan::Pending;
use crate::state::*;
use crate::{keys, now_ms};

impl AppState {
    /// Where `w` would go now, both replicas for an `ft` workload (its secondary on
    /// another value of its spread tag): the `--dry-run` answer. Changes nothing.
    pub fn preview(&self, w: &Workload) -> Decision {
        let pair = (w.spec.level == Level::Ft).then(|| {
            w.spec
                .placement
                .spread
                .clone()
                .unwrap_or_else(|| "rack".into())
        });
        self.decide_avoiding(w, None, pair, Placement::Start).0
    }

    /// Where the `ft` secondary of `w` goes: not on the primary's node, nor in its fault
    /// domain (the tag named by `placement.spread`, default `rack`).
    pub fn decide_secondary(&self, w: &Workload, also_avoid: Option<String>) -> (Decision, u64) {
        let Some(primary) = w.status.node.clone() else {
            return (
                Decision::Unplaceable {
                    explanation: "no primary yet".into(),
                },
                0,
            );
        };
        let tag = w
            .spec
            .placement
            .spread
            .clone()
            .unwrap_or_else(|| "rack".into());
        let domain = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .get(&primary)
            .and_then(|n| n.tags.get(&tag).cloned());
        self.decide_avoiding(
            w,
            Some(avail_sched::Avoid {
                nodes: std::iter::once(primary)
                    .chain(also_avoid)
                    .chain(self.recently_lost())
                    .collect(),
                fault_domain: domain.map(|d| (tag, vec![d])),
            }),
            None,
            Placement::Start,
        )
    }

    /// Nodes an ft pair lost within [`LOST_NODE_AVOID`].
    pub(crate) fn recently_lost(&self) -> Vec<String> {
        let mut lost = self.lost_nodes.lock().unwrap_or_else(|p| p.into_inner());
        lost.retain(|_, at| at.elapsed() < LOST_NODE_AVOID);
        lost.keys().cloned().collect()
    }

    pub(crate) fn decide_avoiding(
        &self,
        w: &Workload,
        avoid: Option<avail_sched::Avoid>,
        pair: Option<String>,
        kind: Placement,
    ) -> (Decision, u64) {
        let policy = self.level_policy();
        let req = self.request(w, avoid.unwrap_or_default(), pair, &policy, kind);
        let seed = self
            .placements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Planned on the indexed view kept up to date as the store changes: no copy,
        // no scan of the workloads.
        let (plan, at) = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            let plan = avail_sched::plan(&v.sched, &[req], &mut avail_model::rng::SplitMix64(seed));
            (plan, v.placement_rev)
        };
        let d = match plan.decisions.into_iter().next().map(|(_, d)| d) {
            Some(Decision::Unplaceable { explanation }) => Decision::Unplaceable {
                explanation: admission::explain(w, &policy, kind, &explanation),
            },
            Some(d) => d,
            None => Decision::Unplaceable {
                explanation: "no decision".into(),
            },
        };
        (d, at)
    }

    /// The scheduler's request for `w` ([`request_for`]).
    pub(crate) fn request(
        &self,
        w: &Workload,
        avoid: avail_sched::Avoid,
        pair: Option<String>,
        policy: &avail_model::spec::LevelPolicy,
        kind: Placement,
    ) -> Request {
        request_for(w, avoid, pair, policy, kind)
    }

    /// Write a placement: the workload if its `mod_rev` is still `expected` (0: create),
    /// and only if no other placement was written since the plan was made at
    /// `placement_rev` (compare-and-swap on the placement key, in one transaction): two
    /// plans, from one server or several, can never both take the same capacity.
    pub async fn write_placement(
        &self,
        w: &Workload,
        expected: u64,
        placement_rev: u64,
    ) -> Result<u64, StateError> {
        self.write_placement_with_events(w, expected, placement_rev, vec![])
            .await
    }

    /// [`write_placement`](Self::write_placement) with `events` committed in the same
    /// transaction (none when it is refused).
    pub async fn write_placement_with_events(
        &self,
        w: &Workload,
        expected: u64,
        placement_rev: u64,
        events: Vec<NewEvent>,
    ) -> Result<u64, StateError> {
        let key = keys::workload(&w.spec.name);
        let txn = avail_store::Txn {
            compares: vec![
                avail_store::Compare::ModRev(key.clone(), expected),
                avail_store::Compare::ModRev(keys::PLACEMENT.into(), placement_rev),
            ],
            success: vec![
                avail_store::Op::Put {
                    key,
                    value: serde_json::to_vec(w).expect("workload serialises"),
                    lease: None,
                },
                keys::placement_written(w.spec.name.clone()),
            ],
            failure: vec![],
        };
        let r = self.events.commit(txn, events).await?;
        if r.succeeded {
            self.wait_view(r.revision).await;
            return Ok(r.revision);
        }
        let now = self.store.get(keys::PLACEMENT).await?.map(|kv| kv.mod_rev);
        if now.unwrap_or(0) != placement_rev {
            Err(StateError::StalePlan)
        } else {
            Err(StateError::Conflict(format!(
                "workload {} changed concurrently",
                w.spec.name
            )))
        }
    }

    /// Place every pending workload that fits now.
    pub async fn place_pending(&self) {
        let _guard = self.placement.lock().await;
        let pending: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| w.status.phase == Phase::Pending)
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        for name in pending {
            let Some((mut w, rev)) = self.workload(&name) else {
                continue;
            };
            let seed = self
                .placements
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (outcome, at) = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                let tags_of = |n: &str| v.nodes.get(n).map(|r| r.tags.clone()).unwrap_or_default();
                (
                    crate::pending_plan::place_pending(&v.sched, &w, &v.policy, &tags_of, seed),
                    v.placement_rev,
                )
            };
            match outcome {
                Pending::Unplaceable(explanation) => {
                    // The reason kept with the workload follows the cluster (a node that
                    // was not ready may now be at its workload limit): written when it
                    // changes.
                    let message = format!("unplaceable: {explanation}");
                    if w.status.message.as_deref() != Some(message.as_str()) {
                        w.status.message = Some(message);
                        w.status.updated_ms = now_ms();
                        let _ = self.write_workload(&w, rev).await;
                    }
                }
                Pending::Placed {
                    workload,
                    node,
                    what,
                } => {
                    // A stale plan is tried again at the next pass (every second).
                    let placed =
                        NewEvent::new(EventKind::WorkloadPlaced, Some(&name), Some(&node), what);
                    let _ = self
                        .write_placement_with_events(&workload, rev, at, vec![placed])
                        .await;
                }
            }
        }
        drop(_guard);
        self.place_secondaries().await;
        self.place_reservations().await;
    }

    /// Give every placed `ha` workload that has none a soft reservation for its restart:
    /// its resources held on a node of another fault domain (the tag named by
    /// `placement.spread`, default `rack`) that its constraints allow. Lower priorities
    /// cannot use it; a higher-priority placement may, and the reservation is then made
    /// again elsewhere.
    pub async fn place_reservations(&self) {
        let _guard = self.placement.lock().await;
        for name in self.placed_lacking(Level::Ha, |s| s.reservation.is_none()) {
            let Some((mut w, rev)) = self.workload(&name) else {
                continue;
            };
            // Where a secondary would go: not the node, nor its fault domain.
            if let (Decision::Place { node: r, .. }, at) = self.decide_secondary(&w, None) {
                w.status.reservation = Some(r.clone());
                let reserved = NewEvent::new(
                    EventKind::WorkloadReserved,
                    Some(&name),
                    Some(&r),
                    format!("restart capacity held on {r}"),
                );
                let _ = self
                    .write_placement_with_events(&w, rev, at, vec![reserved])
                    .await;
            }
        }
    }

    /// Placed or running workloads of `level` whose status `lacks` something.
    pub(crate) fn placed_lacking(
        &self,
        level: Level,
        lacks: impl Fn(&WorkloadStatus) -> bool,
    ) -> Vec<String> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        v.workloads
            .values()
            .filter(|(w, _)| {
                w.spec.level == level
                    && w.status.node.is_some()
                    && lacks(&w.status)
                    && matches!(w.status.phase, Phase::Placed | Phase::Running)
            })
            .map(|(w, _)| w.spec.name.clone())
            .collect()
    }

    /// Take away `name`'s reservation if it is on `node` (a new one is made by the next
    /// reservation pass, away from what made this one go). `why`, an event, is
    /// committed with that write, or recorded alone when there was nothing to write.
    pub(crate) async fn drop_reservation(&self, name: &str, node: &str, why: Option<NewEvent>) {
        let res = self
            .update_status_with_events(name, |s| {
                if s.reservation.as_deref() != Some(node) {
                    return vec![];
                }
                s.reservation = None;
                why.iter().cloned().collect()
            })
            .await;
        self.events.unless_written(res, why).await;
    }

    /// Reservations a higher-priority placement took: the workloads they were held for
    /// get new ones from the next pass.
    pub async fn release_displaced(&self, displaced: &[String], on: &str) {
        for name in displaced {
            let why = NewEvent::new(
                EventKind::WorkloadReservationDisplaced,
                Some(name),
                Some(on),
                format!("its reservation on {on} was taken by a higher priority"),
            );
            self.drop_reservation(name, on, Some(why)).await;
        }
    }

    /// Give every running `ft` workload that has none a secondary on another fault domain.
    pub async fn place_secondaries(&self) {
        self.place_secondaries_avoiding(None).await
    }

    /// [`place_secondaries`](Self::place_secondaries), not on `avoid` (a node just lost by
    /// a pair: it may still look ready for a heartbeat window).
    pub async fn place_secondaries_avoiding(&self, avoid: Option<(&str, &str)>) {
        let _guard = self.placement.lock().await;
        for name in self.placed_lacking(Level::Ft, |s| s.secondary.is_none()) {
            let Some((mut w, rev)) = self.workload(&name) else {
                continue;
            };
            let skip = avoid
                .filter(|(w, _)| *w == name)
                .map(|(_, n)| n.to_string());
            match self.decide_secondary(&w, skip) {
                (Decision::Place { node, .. }, at) => {
                    w.status.secondary = Some(node.clone());
                    w.status.level_state = Some(avail_model::LevelState::new(
                        Level::Ft,
                        avail_model::Protection::Syncing,
                    ));
                    w.status.updated_ms = now_ms();
                    let placed = NewEvent::new(
                        EventKind::WorkloadSecondaryPlaced,
                        Some(&name),
                        Some(&node),
                        format!("secondary on {node} (generation {})", w.status.generation),
                    );
                    let _ = self
                        .write_placement_with_events(&w, rev, at, vec![placed])
                        .await;
                }
                (Decision::Unplaceable { explanation }, _) => {
                    let msg = format!("no node for the secondary: {explanation}");
                    if w.status.message.as_deref() != Some(msg.as_str()) {
                        w.status.message = Some(msg);
                        w.status.level_state = avail_model::LevelState::unprotected(Level::Ft);
                        let _ = self.write_workload(&w, rev).await;
                    }
                }
            }
        }
    }
}

/// The scheduler's request for `w`: its own rules, and kept off the nodes where the
/// level policy would not admit it ([`admission::kept_off`]).
pub fn request_for(
    w: &Workload,
    avoid: avail_sched::Avoid,
    pair: Option<String>,
    policy: &avail_model::spec::LevelPolicy,
    kind: Placement,
) -> Request {
    let mut constraints = w.spec.constraints();
    constraints.extend(admission::kept_off(w, policy, kind));
    constraints.extend(admission::driver_needs(w.spec.driver));
    Request {
        workload: w.spec.name.clone(),
        resources: w.spec.resources,
        constraints,
        preferences: w
            .spec
            .placement
            .affinity
            .iter()
            .filter_map(|a| {
                Some(Preference {
                    rule: avail_model::Constraint::parse(&a.rule).ok()?,
                    weight: a.weight,
                })
            })
            .collect(),
        avoid,
        pair,
        policy: match w.spec.placement.policy {
            avail_model::spec::PlacementPolicy::Spread => avail_sched::Policy::Spread,
            avail_model::spec::PlacementPolicy::Pack => avail_sched::Policy::Pack,
        },
        priority: w.spec.ha.priority,
        ..Request::default()
    }
}
