//! The fencing decision of a node that lost the control plane, pure: from what its
//! peers say of their own contact with the control plane, whether this node is the
//! one cut off (fence: stop its `ha` workloads before the server restarts them
//! elsewhere), whether the control plane is away for everyone (serve on), or neither
//! yet. The agent's loop ([`crate::fence_watch`]) asks and acts; the control-plane
//! simulation runs the same functions.

use std::time::Duration;

/// What the peers said in one round of asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRound {
    /// How many were asked (every other node of the cluster).
    pub asked: usize,
    /// How many answered.
    pub answered: usize,
    /// Whether one of them heard the control plane within the isolation window.
    pub heard_by_peer: bool,
    /// Whether every one that answered was last heard by a leader too early to have
    /// been given this node's workloads (no later than this node's last hearing plus
    /// the margin, [`crate::supervisor::Supervisor::company_margin`]).
    pub lost_with_me: bool,
}

/// A round from the peers' answers: how long since a leader heard each, ms (`None`: no
/// answer), with the same of this node (`mine`) and the margin a peer may have been
/// heard after this node and still not be the target of its restart.
pub fn peer_round(
    ages_ms: &[Option<u64>],
    window: Duration,
    mine: Duration,
    margin: Duration,
) -> PeerRound {
    let since = mine.saturating_sub(margin).as_millis();
    PeerRound {
        lost_with_me: ages_ms.iter().flatten().all(|age| u128::from(*age) > since),
        asked: ages_ms.len(),
        answered: ages_ms.iter().flatten().count(),
        heard_by_peer: ages_ms
            .iter()
            .flatten()
            .any(|age| u128::from(*age) < window.as_millis()),
    }
}

/// How long an "away" verdict holds: until two more rounds have had time to decide
/// again (each the rounds' period and the peers' time to answer), with a margin. Two,
/// so that one slow round (a peer busy past its time to answer, which decides nothing
/// new) does not let the verdict lapse while the control plane is still away: a
/// heartbeat sent in such a gap and answered once the servers are back fenced the
/// node's workloads for nothing (seen on a loaded machine, in the quorum-loss test).
/// A verdict must not outlive that: a node paused longer wakes with none, so its first
/// late heartbeat fences it (its workloads may have moved while it slept; found by the
/// control-plane simulation). Well under the grace a new or deafened leader gives the
/// nodes (at least 5 s), so no node is declared down while its verdict holds.
pub fn away_valid_for(window: Duration) -> Duration {
    (round_period(window) + ask_timeout(window)) * 2 + Duration::from_millis(300)
}

/// How often an isolated node asks its peers: a quarter of the isolation window,
/// 25 ms to 200 ms.
pub fn round_period(window: Duration) -> Duration {
    (window / 4).clamp(Duration::from_millis(25), Duration::from_millis(200))
}

/// How long a peer is given to answer: the isolation window, 500 ms to 1 s (a busy
/// peer is not taken for a lost one).
pub fn ask_timeout(window: Duration) -> Duration {
    window.clamp(Duration::from_millis(500), Duration::from_secs(1))
}

/// What a round decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The control plane is away for every other node: no node hears it, so none
    /// can be given this node's workloads; keep serving. Only when every peer
    /// answered: one that did not may be with the control plane, across a split,
    /// and take them over (found by the control-plane simulation).
    pub away: bool,
    /// This node is cut off (a peer hears the server and this node does not reach
    /// it), or isolated (no peer answered two rounds running): stop the `ha` workloads.
    pub fence: bool,
    /// Rounds in a row in which no peer answered, after this one.
    pub unanswered: u32,
}

/// Decide a round. `reached_server`: when a peer hears the server, whether this node
/// then reached it itself (`None` when it did not try). Returns `None` when it did: the
/// control plane was away and is coming back (its own heartbeat follows). A verdict of
/// "away" it had stands, but is not renewed: it runs out ([`away_valid_for`]) unless
/// the heartbeat comes first, and a leader back from an outage that all nodes saw
/// gives them its grace for longer than that.
pub fn decide(round: PeerRound, reached_server: Option<bool>, unanswered: u32) -> Option<Verdict> {
    if round.heard_by_peer && reached_server == Some(true) {
        return None;
    }
    let unanswered = if round.answered == 0 {
        unanswered + 1
    } else {
        0
    };
    let fence = unanswered >= 2 || round.heard_by_peer;
    Some(Verdict {
        away: round.answered > 0
            && round.answered == round.asked
            && !round.heard_by_peer
            && round.lost_with_me,
        fence,
        unanswered: if fence { 0 } else { unanswered },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(666);
    /// Down 1 s, suspect 500 ms, less 50 ms.
    const MARGIN: Duration = Duration::from_millis(450);

    fn round(ages: &[Option<u64>], mine: u64) -> PeerRound {
        peer_round(ages, W, Duration::from_millis(mine), MARGIN)
    }

    #[test]
    fn a_node_fences_when_a_peer_hears_the_server_it_cannot_reach() {
        let r = round(&[Some(100), Some(5000), None], 700);
        assert_eq!(
            r,
            PeerRound {
                asked: 3,
                answered: 2,
                heard_by_peer: true,
                // Heard 600 ms after this node: may be its restart's target.
                lost_with_me: false,
            }
        );
        assert_eq!(
            decide(r, Some(true), 0),
            None,
            "it reached the server after all: nothing to do"
        );
        let v = decide(r, Some(false), 0).unwrap();
        assert!(v.fence && !v.away);
    }

    #[test]
    fn the_control_plane_away_for_all_fences_nobody() {
        let r = round(&[Some(5000), Some(9000)], 5200);
        let v = decide(r, None, 1).unwrap();
        assert_eq!(
            v,
            Verdict {
                away: true,
                fence: false,
                unanswered: 0
            }
        );
    }

    /// Across a split, the nodes on this side have lost the server, and the one that
    /// does not answer may be on the server's side, about to take this node's
    /// workloads: neither away nor cut off yet; the node serves nothing meanwhile.
    #[test]
    fn a_peer_that_does_not_answer_may_be_with_the_control_plane() {
        let r = round(&[Some(5000), None], 5000);
        let v = decide(r, None, 0).unwrap();
        assert_eq!(
            v,
            Verdict {
                away: false,
                fence: false,
                unanswered: 0
            }
        );
    }

    /// A node that wakes from a pause long after its peers last heard the server (they
    /// lost it since, to an outage): it may have been declared down and its workloads
    /// given to one of them before the outage. Not away (found by the simulation).
    #[test]
    fn peers_that_heard_the_server_after_this_node_was_declared_down_are_not_company() {
        // This node silent 4.3 s, the peers 700 ms: they heard the server 3.6 s after it.
        let r = round(&[Some(700), Some(800)], 4300);
        assert!(!r.heard_by_peer && !r.lost_with_me);
        let v = decide(r, None, 0).unwrap();
        assert!(!v.away && !v.fence);
    }

    #[test]
    fn no_peer_answering_two_rounds_running_is_isolation() {
        let r = round(&[None, None], 700);
        let v = decide(r, None, 0).unwrap();
        assert!(!v.fence && !v.away && v.unanswered == 1);
        let v = decide(r, None, v.unanswered).unwrap();
        assert!(v.fence && v.unanswered == 0);
    }
}
