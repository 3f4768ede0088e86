//! Joining, renewing and removing nodes, and join tokens: the store side of node
//! identity ([`crate::identity`] decides; this applies).

use avail_model::EventKind;
use std::collections::BTreeMap;

use avail_model::agent::{JoinRequest, JoinResponse, RenewResponse};
use avail_model::token::{JoinTokenCreated, JoinTokenInfo, JoinTokenRequest};
use avail_store::{Compare, Op, Txn};

use crate::events::NewEvent;
use crate::identity::{JoinKind, JoinRefusal, PROOF_WINDOW_S, decide_join};
use crate::join_tokens::{self, Refusal, TokenRecord};
use crate::state::{AppState, NodeRecord, StateError, occupies};
use crate::{keys, now_ms, now_s};

/// Why a join, renewal, removal or token call failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// A field is wrong (names it).
    #[error("{0}")]
    Invalid(#[from] avail_model::ValidationError),
    /// The name or the proof.
    #[error(transparent)]
    Refused(#[from] JoinRefusal),
    /// The join token.
    #[error(transparent)]
    Token(#[from] Refusal),
    /// No such node or token.
    #[error("{0} not found")]
    NotFound(String),
    /// The node still holds workloads (names some).
    #[error("{0}")]
    Busy(String),
    /// Certificate making.
    #[error("certificate: {0}")]
    Cert(#[from] avail_tls::TlsError),
    /// Store failure or a write that kept conflicting.
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<avail_store::StoreError> for JoinError {
    fn from(e: avail_store::StoreError) -> JoinError {
        JoinError::State(e.into())
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, JoinError> {
    serde_json::from_slice(bytes)
        .map_err(|e| JoinError::State(StateError::Conflict(format!("stored record: {e}"))))
}

/// The raw P-256 point of a base64url public key, or an error naming `public_key`.
pub fn public_key_raw(b64: &str) -> Result<Vec<u8>, avail_model::ValidationError> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| {
            avail_model::ValidationError::new("public_key", format!("not base64url: {e}"))
        })?;
    avail_tls::ca::check_public_key(&raw)
        .map_err(|e| avail_model::ValidationError::new("public_key", e))?;
    Ok(raw)
}

impl AppState {
    /// A join: a new node with a join token, or the holder of the name with a proof
    /// by its key. Binds the name to the key, issues a certificate, and writes the
    /// record (and the token's consumed use) in one transaction.
    pub async fn join(
        &self,
        req: JoinRequest,
        token: Option<&str>,
    ) -> Result<JoinResponse, JoinError> {
        req.validate()?;
        self.check_declared_tags(&req)?;
        let raw = public_key_raw(&req.public_key)?;
        let now = now_s();
        let proof = req.proof.as_ref().map(|p| {
            now.abs_diff(p.time_s) <= PROOF_WINDOW_S
                && avail_tls::node_key::verify_proof(
                    &raw,
                    &avail_tls::node_key::proof_message(&req.name, &req.public_key, p.time_s),
                    &p.signature,
                )
        });
        let node_key = keys::node(&req.name);
        for _ in 0..10 {
            let existing = self.store.get(&node_key).await?;
            let old: Option<NodeRecord> =
                existing.as_ref().map(|kv| decode(&kv.value)).transpose()?;
            let kind = decide_join(
                &req.name,
                old.as_ref(),
                &req.public_key,
                proof,
                token.is_some(),
            );
            let kind = kind.inspect_err(|_| {
                self.metrics.auth_failures.inc();
            })?;
            let mut compares = vec![Compare::ModRev(
                node_key.clone(),
                existing.as_ref().map_or(0, |kv| kv.mod_rev),
            )];
            let mut writes = vec![];
            if kind == JoinKind::New {
                let (id, secret) = join_tokens::parse(token.unwrap_or_default())?;
                let Some(kv) = self.store.get(&keys::token(id)).await? else {
                    self.metrics.auth_failures.inc();
                    return Err(Refusal::Unknown.into());
                };
                let rec: TokenRecord = decode(&kv.value)?;
                join_tokens::check(&rec, secret, now_ms()).inspect_err(|_| {
                    self.metrics.auth_failures.inc();
                })?;
                compares.push(Compare::ModRev(keys::token(id), kv.mod_rev));
                writes.push(Op::Put {
                    key: keys::token(id),
                    value: serde_json::to_vec(&join_tokens::consumed(&rec, &req.name))
                        .expect("token serialises"),
                    lease: None,
                });
            }
            let issued =
                self.ca
                    .issue_node(&req.name, &raw, self.config.node_cert_ttl.as_secs())?;
            let rec = node_record(&req, old.as_ref(), &issued);
            writes.push(Op::Put {
                key: node_key.clone(),
                value: serde_json::to_vec(&rec).expect("node serialises"),
                lease: None,
            });
            writes.push(keys::rules_changed());
            let joined = NewEvent::new(
                if old.is_some() {
                    EventKind::NodeRejoined
                } else {
                    EventKind::NodeJoined
                },
                None,
                Some(&rec.name),
                format!("{} at {} tags {:?}", rec.name, rec.address, rec.tags),
            );
            let txn = Txn {
                compares,
                success: writes,
                failure: vec![],
            };
            let r = self.events.commit(txn, vec![joined]).await?;
            if !r.succeeded {
                continue;
            }
            self.wait_view(r.revision).await;
            if old.as_ref().is_some_and(|o| o.boot_id != rec.boot_id) {
                self.node_rebooted(&rec.name).await?;
            }
            self.heard(&rec.name).await?;
            return Ok(JoinResponse {
                certificate: issued.cert_pem,
                certificate_expires_s: issued.not_after_s,
                ca: self.ca.cert_pem().to_string(),
                heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                lease_ttl_ms: self.config.down_after.as_millis() as u64,
            });
        }
        Err(StateError::Conflict(format!("node {} kept changing; try again", req.name)).into())
    }

    /// A fresh certificate for `node`'s own key (the caller proved it is the node by
    /// the certificate its connection presented).
    pub async fn renew(&self, node: &str, public_key: &str) -> Result<RenewResponse, JoinError> {
        let raw = public_key_raw(public_key)?;
        for _ in 0..10 {
            let Some(kv) = self.store.get(&keys::node(node)).await? else {
                return Err(JoinError::NotFound(format!("node {node}")));
            };
            let mut rec: NodeRecord = decode(&kv.value)?;
            if rec.identity.public_key != public_key {
                return Err(avail_model::ValidationError::new(
                    "public_key",
                    "a renewal keeps the node's key (a new key needs a re-join proven by the old one)",
                )
                .into());
            }
            let issued = self
                .ca
                .issue_node(node, &raw, self.config.node_cert_ttl.as_secs())?;
            rec.identity = rec.identity.with_cert(public_key, &issued);
            let value = serde_json::to_vec(&rec).expect("node serialises");
            if let Some(rev) = self
                .store
                .compare_and_swap(&keys::node(node), kv.mod_rev, value)
                .await?
            {
                self.wait_view(rev).await;
                return Ok(RenewResponse {
                    certificate: issued.cert_pem,
                    certificate_expires_s: issued.not_after_s,
                });
            }
        }
        Err(StateError::Conflict(format!("node {node} kept changing; try again")).into())
    }

    /// Forget node `name`: its record, liveness and key. Refused while it holds a
    /// workload (drain it first, or remove the workloads). Its agent can no longer act;
    /// the name is free for a join token.
    pub async fn remove_node(&self, name: &str) -> Result<(), JoinError> {
        let holding: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            if !v.nodes.contains_key(name) {
                return Err(JoinError::NotFound(format!("node {name}")));
            }
            v.workloads
                .values()
                .filter(|(w, _)| occupies(w, name))
                .map(|(w, _)| w.spec.name.clone())
                .take(5)
                .collect()
        };
        if !holding.is_empty() {
            return Err(JoinError::Busy(format!(
                "node {name} still holds {}: drain it (`avail node drain {name}`) or remove them first",
                holding.join(", ")
            )));
        }
        let removed = NewEvent::new(
            EventKind::NodeRemoved,
            None,
            Some(name),
            format!("{name} removed; its key is forgotten"),
        );
        let txn = Txn {
            compares: vec![],
            success: vec![
                Op::Delete {
                    key: keys::node(name),
                },
                Op::Delete {
                    key: keys::alive(name),
                },
                Op::Delete {
                    key: keys::verdict(name),
                },
            ],
            failure: vec![],
        };
        let r = self.events.commit(txn, vec![removed]).await?;
        self.wait_view(r.revision).await;
        Ok(())
    }

    /// A node may declare any tag but those only an administrator sets.
    fn check_declared_tags(&self, req: &JoinRequest) -> Result<(), JoinError> {
        match req.tags.keys().find(|k| self.config.admin_tags.contains(*k)) {
            Some(k) => Err(avail_model::ValidationError::new(
                format!("tags.{k}"),
                format!(
                    "only an administrator sets tag {k:?} (`avail node tag {} {k}=...`); a node may not declare it",
                    req.name
                ),
            )
            .into()),
            None => Ok(()),
        }
    }

    /// Create a join token.
    pub async fn create_join_token(
        &self,
        req: &JoinTokenRequest,
    ) -> Result<JoinTokenCreated, JoinError> {
        req.validate()?;
        let (token, rec) = join_tokens::mint(req, now_ms());
        let created = NewEvent::new(
            EventKind::TokenCreated,
            None,
            None,
            format!(
                "join token {} for {} join(s), {} s",
                rec.id, rec.uses_left, req.ttl_s
            ),
        );
        let txn = Txn {
            compares: vec![],
            success: vec![Op::Put {
                key: keys::token(&rec.id),
                value: serde_json::to_vec(&rec).expect("token serialises"),
                lease: None,
            }],
            failure: vec![],
        };
        self.events.commit(txn, vec![created]).await?;
        Ok(join_tokens::created(token, &rec))
    }

    /// Every join token (no secrets), newest first.
    pub async fn join_tokens(&self) -> Result<Vec<JoinTokenInfo>, JoinError> {
        let mut out: Vec<JoinTokenInfo> = self
            .store
            .range(keys::TOKENS)
            .await?
            .0
            .iter()
            .map(|kv| decode::<TokenRecord>(&kv.value).map(|r| join_tokens::info(&r)))
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|t| std::cmp::Reverse(t.created_ms));
        Ok(out)
    }

    /// Revoke (delete) a join token: by compare on its revision (a join may be
    /// consuming a use of it), retried, so the event goes with the delete that happened.
    pub async fn revoke_join_token(&self, id: &str) -> Result<(), JoinError> {
        let key = keys::token(id);
        for _ in 0..10 {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(JoinError::NotFound(format!("join token {id}")));
            };
            let revoked = NewEvent::new(
                EventKind::TokenRevoked,
                None,
                None,
                format!("join token {id} revoked"),
            );
            let txn = Txn {
                compares: vec![Compare::ModRev(key.clone(), kv.mod_rev)],
                success: vec![Op::Delete { key: key.clone() }],
                failure: vec![],
            };
            if self.events.commit(txn, vec![revoked]).await?.succeeded {
                return Ok(());
            }
        }
        Err(StateError::Conflict(format!("join token {id} kept changing; try again")).into())
    }
}

/// The node's record after a join: what the agent declares, with what outlives
/// rejoins (the operator's tags, the first join's time, a drain) and the new
/// certificate bound to its key.
fn node_record(
    req: &JoinRequest,
    old: Option<&NodeRecord>,
    issued: &avail_tls::Issued,
) -> NodeRecord {
    let mut rec = NodeRecord {
        name: req.name.clone(),
        address: req.address.clone(),
        ingress_url: req.ingress_url.clone(),
        tags: BTreeMap::new(),
        agent_tags: req.tags.clone(),
        tag_overrides: old.map(|o| o.tag_overrides.clone()).unwrap_or_default(),
        capacity: req.capacity,
        max_workloads: req.max_workloads,
        joined_ms: old.map(|o| o.joined_ms).unwrap_or_else(now_ms),
        agent_version: req.agent_version.clone(),
        replication_addr: req.replication_addr.clone(),
        boot_id: req.boot_id.clone(),
        drain: old.and_then(|o| o.drain.clone()),
        identity: old
            .map(|o| o.identity.clone())
            .unwrap_or_default()
            .with_cert(&req.public_key, issued),
    };
    rec.tags = rec.tags_in_force();
    rec
}
