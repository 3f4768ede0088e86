//! The schema of the records in the store, for upgrades.
//!
//! Each build reads and writes records up to [`SCHEMA`]. The cluster's records are at
//! the schema in `/config/schema` (absent: 1, the records of the first builds). A
//! server starts only when it reads that schema: a server older than the cluster's
//! records refuses to start, naming both, rather than misread them. Every server
//! registers the schema it reads ([`crate::membership`]); the leader raises the
//! cluster's schema to the oldest schema among the registered servers, never past it,
//! so that while servers of two builds run side by side (a rolling or blue/green
//! upgrade) every record written is one all of them read, and the newer format is used
//! once the last older server is gone. It is never lowered: a downgrade past a raised
//! schema is refused at start.

use avail_store::{Compare, Op, Store, Txn};

use crate::keys;

/// The newest record schema this build reads and writes.
pub const SCHEMA: u32 = 1;

/// The cluster's record schema, as stored (absent: 1).
pub async fn cluster_schema(store: &dyn Store) -> Result<(u32, u64), avail_store::StoreError> {
    Ok(match store.get(keys::SCHEMA).await? {
        Some(kv) => (parse(&kv.value), kv.mod_rev),
        None => (1, 0),
    })
}

fn parse(bytes: &[u8]) -> u32 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// Whether a server reading up to `mine` may start on a cluster whose records are at
/// `cluster`: the error says why not.
pub fn check(cluster: u32, mine: u32) -> Result<(), String> {
    if cluster > mine {
        return Err(format!(
            "this cluster's records are at schema {cluster}, and this server (avail {}) reads up to schema {mine}: it is older than the cluster; start a newer avail (a downgrade past a schema change is not possible)",
            env!("CARGO_PKG_VERSION")
        ));
    }
    Ok(())
}

/// The schema the cluster's records may be raised to: the oldest among the servers
/// that run (`registered`), when it is above the cluster's now. Pure.
pub fn raise_to(cluster: u32, registered: impl IntoIterator<Item = u32>) -> Option<u32> {
    let oldest = registered.into_iter().min()?;
    (oldest > cluster).then_some(oldest)
}

/// Raise the cluster's schema to `to` if it is still at the revision `at` (0: never
/// written), by compare-and-swap.
pub fn raise_txn(to: u32, at: u64) -> Txn {
    Txn {
        compares: vec![Compare::ModRev(keys::SCHEMA.into(), at)],
        success: vec![Op::Put {
            key: keys::SCHEMA.into(),
            value: to.to_string().into_bytes(),
            lease: None,
        }],
        failure: vec![],
    }
}

impl crate::state::AppState {
    /// Raise the cluster's record schema to the oldest schema among the servers
    /// registered now, when that is above it ([`crate::schema::raise_to`]).
    pub async fn raise_schema(&self) {
        let registered: Vec<u32> = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .servers
            .values()
            .map(|s| s.schema)
            .collect();
        // Nothing to raise while a server reads only the first schema (the floor):
        // no store read then.
        if registered.iter().min().is_none_or(|oldest| *oldest <= 1) {
            return;
        }
        let (now, at) = match crate::schema::cluster_schema(self.store.as_ref()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("reading the cluster's schema: {e}");
                return;
            }
        };
        let Some(to) = crate::schema::raise_to(now, registered) else {
            return;
        };
        let raised = crate::events::NewEvent::new(
            avail_model::EventKind::ClusterSchema,
            None,
            None,
            format!("records are at schema {to} from now on (every server reads it; it was {now})"),
        );
        if let Err(e) = self
            .events
            .commit(crate::schema::raise_txn(to, at), vec![raised])
            .await
        {
            tracing::warn!("raising the cluster's schema: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_server_is_refused_and_the_schema_waits_for_the_oldest_server() {
        assert!(check(1, 1).is_ok());
        assert!(check(1, 2).is_ok(), "a newer server reads older records");
        let e = check(3, 2).unwrap_err();
        assert!(
            e.contains("schema 3") && e.contains("up to schema 2"),
            "{e}"
        );
        assert_eq!(raise_to(1, [2, 2, 1]), None, "a server still reads only 1");
        assert_eq!(raise_to(1, [2, 3]), Some(2));
        assert_eq!(raise_to(2, [2]), None);
        assert_eq!(raise_to(2, []), None);
        assert_eq!(parse(b"2"), 2);
        assert_eq!(
            parse(b"garbage"),
            u32::MAX,
            "unreadable: newer than anything"
        );
    }
}
