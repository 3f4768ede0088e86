//! Server membership: every server registers itself in the store under
//! `/servers/<id>` ([`avail_model::api::ServerInfo`]: its API, version and record
//! schema) on a lease it keeps alive, so that every server knows the others: agents
//! are told the current list with every heartbeat answer (servers added, replaced or
//! switched blue/green are found without reconfiguring a node), and the record schema
//! is raised only when every server reads it ([`crate::schema`]).
//!
//! A server that stops cleanly revokes its lease (gone at once); one that dies is gone
//! when its lease runs out.

use std::sync::Arc;
use std::time::Duration;

use avail_model::api::ServerInfo;
use avail_store::{LeaseId, Store, StoreError};

use crate::keys;

/// A server's registration, kept alive by a task (stopped when dropped).
pub struct Membership {
    store: Arc<dyn Store>,
    lease: Arc<std::sync::Mutex<Option<LeaseId>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Membership {
    /// Register `me` with a lease of `ttl_s`, and keep it registered.
    pub fn start(store: Arc<dyn Store>, me: ServerInfo, ttl_s: u64) -> Membership {
        let lease = Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn(keep(store.clone(), me, ttl_s, lease.clone()));
        Membership { store, lease, task }
    }

    /// Leave now (a clean shutdown).
    pub async fn leave(&self) {
        self.task.abort();
        let held = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(l) = held
            && let Err(e) = self.store.revoke_lease(l).await
        {
            tracing::warn!("leaving the servers: {e}");
        }
    }
}

async fn keep(
    store: Arc<dyn Store>,
    me: ServerInfo,
    ttl_s: u64,
    held: Arc<std::sync::Mutex<Option<LeaseId>>>,
) {
    let value = serde_json::to_vec(&me).expect("a server record serialises");
    let period = Duration::from_secs(ttl_s) / 3;
    loop {
        let registered: Result<LeaseId, StoreError> = async {
            let lease = store.grant_lease(ttl_s).await?;
            store
                .put(&keys::server(&me.id), value.clone(), Some(lease))
                .await?;
            Ok(lease)
        }
        .await;
        let lease = match registered {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("registering this server: {e}");
                tokio::time::sleep(period).await;
                continue;
            }
        };
        *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        loop {
            tokio::time::sleep(period).await;
            match store.keep_alive(lease).await {
                Ok(()) => {}
                // Expired (the store was away longer than the lease): register again.
                Err(StoreError::LeaseNotFound(_)) => break,
                Err(e) => tracing::warn!("keeping this server registered: {e}"),
            }
        }
    }
}
