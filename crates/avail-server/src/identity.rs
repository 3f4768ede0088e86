//! Node identity: which key a node name is bound to, which certificates speak for it,
//! and who may join under a name. Pure decisions over the stored record; the join and
//! renew handlers apply them.
//!
//! ```text
//! first join   agent --(join token, name, public key)--> server
//!              name free?  token valid?  -> bind name to key, token use consumed,
//!                                          certificate for the key (short-lived)
//! re-join      agent --(name, key, proof = sign(key, name|key|time))--> server
//!              proof by the bound key?   -> addresses and tags may change, new cert
//! every call   agent --(TLS with its certificate, avail-node: name)--> server
//!              certificate digest one of the name's last two?  -> acts as the node
//! renew        agent --(TLS with its certificate, same key)--> server -> new cert
//! node rm      admin --> the name and its key are forgotten: only then may a join
//!              token take the name again
//! ```
//! A name held by a node, alive or down, is never taken with a join token.

use serde::{Deserialize, Serialize};

use crate::state::NodeRecord;

/// How many of a node's certificates are honoured at once: the newest and the one
/// before it (connections opened before a renewal go on with theirs).
const CERTS_KEPT: usize = 2;
/// How old or new a re-join proof may be, seconds.
pub const PROOF_WINDOW_S: u64 = 300;

/// A node's identity as bound at its first join.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The node's public key (base64url raw P-256 point).
    pub public_key: String,
    /// The certificates issued for it, newest last.
    #[serde(default)]
    pub certs: Vec<BoundCert>,
}

/// A certificate the server issued to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundCert {
    /// Digest of the certificate (`avail_tls::cert_digest`).
    pub digest: String,
    /// Not valid after, seconds.
    pub not_after_s: u64,
}

impl NodeIdentity {
    /// The identity after `issued` was signed for `public_key`: a new key replaces the
    /// old one's certificates, the same key keeps its newest.
    pub fn with_cert(&self, public_key: &str, issued: &avail_tls::Issued) -> NodeIdentity {
        let mut certs = if self.public_key == public_key {
            self.certs.clone()
        } else {
            vec![]
        };
        certs.push(BoundCert {
            digest: issued.digest.clone(),
            not_after_s: issued.not_after_s,
        });
        let drop = certs.len().saturating_sub(CERTS_KEPT);
        certs.drain(..drop);
        NodeIdentity {
            public_key: public_key.to_string(),
            certs,
        }
    }

    /// Whether a connection presenting the certificate `digest` speaks for the node.
    pub fn accepts(&self, digest: &str, now_s: u64) -> bool {
        self.certs
            .iter()
            .any(|c| c.digest == digest && now_s < c.not_after_s)
    }
}

/// What a join is, once its credentials were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinKind {
    /// A new node under a free name (a join token's use is consumed with it).
    New,
    /// The node holding the name, proven by its key.
    Rejoin,
}

/// Why a join is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// The name is held by another key (or a node from before identities).
    #[error("node {0} exists and this key does not hold it: `avail node rm {0}` frees the name")]
    NameHeld(String),
    /// A re-join proof that does not verify, or is stale.
    #[error(
        "the re-join proof of {0} does not verify (wrong key, or a clock off by more than 5 minutes)"
    )]
    BadProof(String),
    /// A first join without a join token.
    #[error("joining as a new node needs a join token")]
    NoToken,
}

/// Decide a join under `name`: `existing` is the stored record, `proof_ok` whether the
/// request carried a valid, fresh proof by the key it names, `has_token` whether it
/// carried a join token (checked and consumed by the caller for [`JoinKind::New`]).
pub fn decide_join(
    name: &str,
    existing: Option<&NodeRecord>,
    public_key: &str,
    proof: Option<bool>,
    has_token: bool,
) -> Result<JoinKind, JoinRefusal> {
    match existing {
        Some(rec) => {
            let bound =
                !rec.identity.public_key.is_empty() && rec.identity.public_key == public_key;
            match (bound, proof) {
                (true, Some(true)) => Ok(JoinKind::Rejoin),
                (true, Some(false)) => Err(JoinRefusal::BadProof(name.to_string())),
                _ => Err(JoinRefusal::NameHeld(name.to_string())),
            }
        }
        None if has_token => Ok(JoinKind::New),
        None => Err(JoinRefusal::NoToken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str) -> NodeRecord {
        serde_json::from_value(serde_json::json!({
            "name": "n1", "address": "127.0.0.11", "ingress_url": "http://127.0.0.11:7480",
            "tags": {}, "capacity": {"cpu_millis": 1000, "memory_mib": 1024},
            "joined_ms": 0, "agent_version": "x",
            "identity": {"public_key": key, "certs": []}
        }))
        .unwrap()
    }

    #[test]
    fn a_held_name_is_taken_only_by_its_key_with_a_proof() {
        let held = rec("K");
        assert_eq!(
            decide_join("n1", Some(&held), "K", Some(true), false),
            Ok(JoinKind::Rejoin)
        );
        // A token does not take a held name, whatever key or proof comes with it.
        for (key, proof) in [
            ("K", None),
            ("X", None),
            ("X", Some(true)),
            ("X", Some(false)),
        ] {
            assert_eq!(
                decide_join("n1", Some(&held), key, proof, true),
                Err(JoinRefusal::NameHeld("n1".into())),
                "{key} {proof:?}"
            );
        }
        assert_eq!(
            decide_join("n1", Some(&held), "K", Some(false), true),
            Err(JoinRefusal::BadProof("n1".into()))
        );
        // A record from before identities is held by nobody's key.
        assert!(decide_join("n1", Some(&rec("")), "", Some(true), true).is_err());
        assert_eq!(decide_join("n1", None, "K", None, true), Ok(JoinKind::New));
        assert_eq!(
            decide_join("n1", None, "K", None, false),
            Err(JoinRefusal::NoToken)
        );
    }

    #[test]
    fn certificates_rotate_and_expire() {
        let issued = |d: &str| avail_tls::Issued {
            cert_pem: String::new(),
            digest: d.into(),
            not_after_s: 100,
        };
        let id = NodeIdentity::default().with_cert("K", &issued("a"));
        let id = id.with_cert("K", &issued("b")).with_cert("K", &issued("c"));
        assert!(!id.accepts("a", 10));
        assert!(id.accepts("b", 10) && id.accepts("c", 10));
        assert!(!id.accepts("c", 100));
        // A new key drops the old key's certificates.
        let rekeyed = id.with_cert("L", &issued("d"));
        assert!(!rekeyed.accepts("c", 10) && rekeyed.accepts("d", 10));
    }
}
