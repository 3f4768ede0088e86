//! The desired state of a node: what its agent should run, with the routes and peers it
//! needs.

use avail_model::agent::{Assignment, DesiredState, Peer, PeerNode, ReplicaRole, Route};
use avail_model::{Level, Phase};

use crate::state::*;

impl AppState {
    /// The desired state of `node` and the route table.
    pub fn desired(&self, node: &str, revision: u64) -> DesiredState {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        let mut out = DesiredState {
            revision,
            peers: v
                .nodes
                .values()
                .map(|n| PeerNode {
                    name: n.name.clone(),
                    addr: n.replication_addr.clone(),
                })
                .collect(),
            ..DesiredState::default()
        };
        for (w, _) in v.workloads.values() {
            let n = w.status.node.as_deref();
            let peer = |name: Option<&str>| {
                let rec = v.nodes.get(name?)?;
                Some(Peer {
                    node: rec.name.clone(),
                    replication_addr: rec.replication_addr.clone(),
                })
            };
            // The other replica: the ft secondary, or the standby of an ha wasm workload
            // on the node holding its reservation (it takes periodic checkpoints, and a
            // restart there resumes from the last one).
            // A live move under way: the copy on the target is synced as a secondary,
            // and the active one hands over to it.
            let other = w
                .status
                .moving_to
                .as_deref()
                .or_else(|| replica_node(w))
                .filter(|o| Some(*o) != n);
            let role = if n == Some(node) {
                Some((ReplicaRole::Active, peer(other)))
            } else if other == Some(node) {
                Some((ReplicaRole::Secondary, peer(n)))
            } else {
                None
            };
            if let Some((role, peer)) = role.filter(|_| w.status.phase != Phase::Stopped) {
                out.assignments.push(Assignment {
                    uid: w.uid.clone(),
                    spec: w.spec.clone(),
                    incarnation: w.status.incarnation,
                    role,
                    generation: w.status.generation,
                    peer,
                    handover: role == ReplicaRole::Active && w.status.moving_to.is_some(),
                });
            }
            // Every workload has a route, so the ingress can tell "not running" (503)
            // from "no such workload" (404).
            out.routes.push(Route {
                workload: w.spec.name.clone(),
                node: n.map(str::to_string),
                incarnation: w.status.incarnation,
                ft: w.spec.level == Level::Ft,
            });
        }
        out
    }
}
