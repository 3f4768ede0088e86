//! A follower's relay of heartbeats to the leader: the leader alone judges liveness,
//! whichever server a node's heartbeats reach, and no heartbeat costs a store write.
//!
//! ```text
//!  agent --heartbeat--> follower --POST /v1/internal/heard {nodes}--> leader
//!        <--200 state-- (only once the leader heard it, or no leader judges) <--
//! ```
//!
//! A follower answers an agent's heartbeat only when that is safe for the agent's
//! fencing (an agent that is answered does not fence; one that is not, and whose
//! peers still hear the control plane, stops its `ha` workloads): when the leader
//! heard the node, or when no leader judges anyone now, because then the next leader
//! grants a grace before any verdict ([`crate::liveness`]). "No leader judges" is
//! known two ways: the store holds no leader key (a linearizable read), or the leader
//! key's server refuses connections (its process is gone: a dead process judges
//! nothing; a restarted one takes a new term, with its grace). A leader that does not
//! answer in time may be paused or cut off from this server while it still judges:
//! the heartbeat is refused (503, [`avail_client::TRY_ANOTHER_SERVER`]), and the agent
//! tries the next server.
//!
//! Heartbeats arriving together go to the leader in one request (a batch is whatever
//! queued while the previous one was under way): the cost per heartbeat falls as the
//! load grows, and a heartbeat waits at most one round trip to the leader.

use std::sync::Arc;
use std::time::Duration;

use avail_model::NodeState;
use avail_model::api::{HeardBatch, HeardReply};
use tokio::sync::{mpsc, oneshot};

use crate::leader::{LEADER_KEY, LeaderRecord, Leadership, Role};

/// Heartbeats queued at a follower, at most (a full queue refuses the heartbeat).
pub const RELAY_QUEUE: usize = 16_384;
/// Heartbeats in one request to the leader, at most.
pub const MAX_BATCH: usize = 4096;
/// How long a follower waits for the leader's answer.
pub const RELAY_TIMEOUT: Duration = Duration::from_millis(500);

/// What became of a heartbeat at the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Relayed {
    /// The leader heard the node: its state.
    Heard(NodeState),
    /// No leader judges now; the next one grants a grace.
    NoLeader,
    /// Not safe to answer: why.
    Refused(String),
}

/// What a request to the leader came to.
#[derive(Debug)]
pub enum Delivery {
    /// The leader answered with the nodes' states (in the order asked).
    Answered(Vec<Option<NodeState>>),
    /// The leader's address refused the connection: no process there.
    ConnectionRefused,
    /// The server there is no longer the leader.
    NotLeader,
    /// Anything else (a timeout, a TLS or decoding failure).
    Failed(String),
}

/// The answer to each heartbeat of a batch, from what the delivery came to and, when
/// the leader could not answer, whether the store holds a leader key (`None`: not
/// asked or not known). Pure.
pub fn answers(n: usize, delivery: &Delivery, leader_key_held: Option<bool>) -> Vec<Relayed> {
    match delivery {
        Delivery::Answered(states) => (0..n)
            .map(|i| match states.get(i).copied().flatten() {
                Some(st) => Relayed::Heard(st),
                None => Relayed::Refused("the leader does not know this node".into()),
            })
            .collect(),
        Delivery::ConnectionRefused => vec![Relayed::NoLeader; n],
        Delivery::NotLeader | Delivery::Failed(_) if leader_key_held == Some(false) => {
            vec![Relayed::NoLeader; n]
        }
        Delivery::NotLeader => {
            vec![Relayed::Refused("the leader is changing; try again".into()); n]
        }
        Delivery::Failed(why) => vec![Relayed::Refused(format!("the leader: {why}")); n],
    }
}

type Ask = (String, oneshot::Sender<Relayed>);

/// The relay: hand it a heartbeat, get what became of it.
#[derive(Clone)]
pub struct HeardRelay {
    tx: mpsc::Sender<Ask>,
}

impl HeardRelay {
    /// Start relaying for this server (`leadership` says where the leader is),
    /// speaking to other servers with `tls` (the cluster CA, and this server's client
    /// certificate) as server `id`.
    pub fn start(
        store: Arc<dyn avail_store::Store>,
        leadership: Leadership,
        tls: Arc<rustls::ClientConfig>,
        id: String,
    ) -> HeardRelay {
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        tokio::spawn(relay(rx, store, leadership, tls, id));
        HeardRelay { tx }
    }

    /// Relay that `node` was heard.
    pub async fn heard(&self, node: &str) -> Relayed {
        let (tx, rx) = oneshot::channel();
        if self.tx.try_send((node.to_string(), tx)).is_err() {
            return Relayed::Refused("too many heartbeats queued at this server".into());
        }
        rx.await
            .unwrap_or_else(|_| Relayed::Refused("the relay stopped".into()))
    }
}

async fn relay(
    mut rx: mpsc::Receiver<Ask>,
    store: Arc<dyn avail_store::Store>,
    leadership: Leadership,
    tls: Arc<rustls::ClientConfig>,
    id: String,
) {
    // The client of the leader now, by its address.
    let mut client: Option<(String, avail_client::Client)> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let nodes: Vec<String> = batch.iter().map(|(n, _)| n.clone()).collect();
        let delivery = match leadership.role() {
            // Became the leader meanwhile: the caller asks again, here.
            Role::Leader { .. } => Delivery::NotLeader,
            Role::Follower { leader: None } => Delivery::NotLeader,
            Role::Follower {
                leader: Some(LeaderRecord { addr, .. }),
            } => {
                if client.as_ref().is_none_or(|(a, _)| *a != addr) {
                    let c = avail_client::Client::with_tls(
                        &format!("https://{addr}"),
                        None,
                        None,
                        Some(tls.clone()),
                    )
                    .with_timeout(RELAY_TIMEOUT);
                    client = Some((addr.clone(), c));
                }
                let (_, c) = client.as_ref().expect("set above");
                deliver(c, &id, nodes).await
            }
        };
        let held = match delivery {
            Delivery::Answered(_) | Delivery::ConnectionRefused => None,
            _ => match tokio::time::timeout(RELAY_TIMEOUT, store.get(LEADER_KEY)).await {
                Ok(Ok(kv)) => Some(kv.is_some()),
                _ => None,
            },
        };
        let replies = answers(batch.len(), &delivery, held);
        for ((_, tx), answer) in batch.into_iter().zip(replies) {
            let _ = tx.send(answer);
        }
    }
}

/// The header naming the server that calls another (checked against its certificate).
pub const SERVER_HEADER: &str = "avail-server";

async fn deliver(c: &avail_client::Client, id: &str, nodes: Vec<String>) -> Delivery {
    let body = match serde_json::to_vec(&HeardBatch { nodes }) {
        Ok(b) => bytes::Bytes::from(b),
        Err(e) => return Delivery::Failed(e.to_string()),
    };
    let r = c
        .raw(
            hyper::Method::POST,
            "/v1/internal/heard",
            Some((body, "application/json")),
            &[(SERVER_HEADER, id)],
        )
        .await;
    match r {
        Ok(reply) if reply.status == 200 => match serde_json::from_slice::<HeardReply>(&reply.body)
        {
            Ok(h) => Delivery::Answered(h.states),
            Err(e) => Delivery::Failed(format!("unreadable answer: {e}")),
        },
        Ok(reply) if reply.status == 503 => Delivery::NotLeader,
        Ok(reply) => Delivery::Failed(format!(
            "answered {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        )),
        Err(avail_client::ClientError::Connect { refused: true, .. }) => {
            Delivery::ConnectionRefused
        }
        Err(e) => Delivery::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_answered_only_when_the_leader_heard_it_or_none_judges() {
        use NodeState::*;
        let heard = Delivery::Answered(vec![Some(Ready), None]);
        assert_eq!(
            answers(2, &heard, None),
            vec![
                Relayed::Heard(Ready),
                Relayed::Refused("the leader does not know this node".into())
            ]
        );
        // The leader's process is gone: it judges nothing.
        assert_eq!(
            answers(1, &Delivery::ConnectionRefused, None),
            vec![Relayed::NoLeader]
        );
        // A leader that may still judge (slow, cut off, or the key not read): refused.
        for held in [Some(true), None] {
            assert!(matches!(
                answers(1, &Delivery::Failed("timeout".into()), held)[0],
                Relayed::Refused(_)
            ));
            assert!(matches!(
                answers(1, &Delivery::NotLeader, held)[0],
                Relayed::Refused(_)
            ));
        }
        // No leader key in the store: no leader judges.
        assert_eq!(
            answers(1, &Delivery::Failed("timeout".into()), Some(false)),
            vec![Relayed::NoLeader]
        );
    }
}
