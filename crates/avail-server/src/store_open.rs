//! Which store the control plane keeps its state in, opening it, and making sure it is
//! this cluster's.
//!
//! `avail server --store redb` (the default) keeps the store in `<data dir>/store.redb`;
//! `--store etcd://host:port,host:port` keeps it in an etcd cluster, under a key prefix
//! (`--etcd-prefix`, default `/avail/`) so several clusters can share one etcd.
//!
//! **A store is bound to its cluster.** On its first start a server writes a new cluster
//! id both to the store (`/config/cluster_id`) and to its data dir (`cluster.id`, whose
//! keys, CA and tokens belong to that cluster). Afterwards it starts only when the two
//! agree: a store that lost its data (a wiped etcd, a wrong endpoint or prefix, a
//! replaced file) is refused rather than started as an empty cluster, and so is a data
//! dir that is not the store's cluster's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use avail_store::{Compare, EtcdOptions, EtcdStore, Op, RedbStore, Store, Txn};

use crate::{ConfigError, ServerError, keys};

/// Where the control plane keeps its state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreChoice {
    /// Embedded redb in the data dir (one server).
    #[default]
    Redb,
    /// An etcd cluster.
    Etcd {
        /// Its client endpoints, `host:port`.
        endpoints: Vec<String>,
        /// The prefix of every key of this cluster.
        prefix: String,
    },
}

impl StoreChoice {
    /// Parse `redb` or `etcd://host:port[,host:port...]`, with `prefix` for etcd.
    pub fn parse(s: &str, prefix: &str) -> Result<StoreChoice, ConfigError> {
        let bad = |reason: String| ConfigError {
            field: "store",
            reason,
        };
        if s == "redb" {
            return Ok(StoreChoice::Redb);
        }
        let Some(list) = s.strip_prefix("etcd://") else {
            return Err(bad(format!(
                "{s:?}: expected redb or etcd://host:port[,host:port...]"
            )));
        };
        let endpoints: Vec<String> = list.split(',').map(|e| e.trim().to_string()).collect();
        for e in &endpoints {
            let port = e.rsplit_once(':').and_then(|(h, p)| {
                (!h.is_empty() && !h.contains('/'))
                    .then(|| p.parse::<u16>().ok())
                    .flatten()
            });
            if port.is_none_or(|p| p == 0) {
                return Err(bad(format!("etcd endpoint {e:?} is not host:port")));
            }
        }
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() > 128 {
            return Err(ConfigError {
                field: "etcd-prefix",
                reason: format!("{prefix:?}: must start and end with / (at most 128 bytes)"),
            });
        }
        Ok(StoreChoice::Etcd {
            endpoints,
            prefix: prefix.to_string(),
        })
    }
}

impl StoreChoice {
    /// The store, named for errors and logs.
    pub fn describe(&self, dir: &Path) -> String {
        match self {
            StoreChoice::Redb => dir.join("store.redb").display().to_string(),
            StoreChoice::Etcd { endpoints, prefix } => {
                format!("etcd {} (prefix {prefix})", endpoints.join(","))
            }
        }
    }
}

/// What a server's data dir holds of its cluster (the same on every server of it): the
/// cluster id, the token signing key, the CA and the admin token. `private`: readable
/// by the server's user only.
pub const CLUSTER_FILES: &[(&str, bool)] = &[
    ("cluster.id", true),
    ("secret.key", true),
    ("ca.key", true),
    ("ca.crt", false),
    ("admin.token", true),
];

/// Make `to` the data dir of another server of the cluster whose server's data dir is
/// `from` (`avail server --join-from`): the cluster's files are copied (never this
/// server's own id, store or artifacts). A file `to` already holds must be the same.
pub fn adopt_cluster(from: &Path, to: &Path) -> Result<(), ServerError> {
    let io = |p: &Path, e: std::io::Error| ServerError::Io(format!("{}: {e}", p.display()));
    if !from.join("cluster.id").exists() {
        return Err(ServerError::Io(format!(
            "--join-from {}: not a server's data dir of a cluster (no cluster.id): start the first server before the others",
            from.display()
        )));
    }
    for (name, private) in CLUSTER_FILES {
        let (src, dst) = (from.join(name), to.join(name));
        let bytes = std::fs::read(&src).map_err(|e| io(&src, e))?;
        match std::fs::read(&dst) {
            Ok(mine) if mine == bytes => continue,
            Ok(_) => {
                return Err(ServerError::Io(format!(
                    "{} differs from {}: this data dir belongs to another cluster (use an empty data dir)",
                    dst.display(),
                    src.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dst, e)),
        }
        let written = if *private {
            avail_tls::files::write_private(&dst, &bytes)
        } else {
            avail_tls::files::write_public(&dst, &bytes)
        };
        written.map_err(|e| io(&dst, e))?;
    }
    Ok(())
}

/// Path of the data dir's cluster id.
pub fn cluster_id_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster.id")
}

/// This server's id (`server.id` in its data dir, made on its first start): a server
/// restarted with its data dir is the same server (it takes its own leadership back).
pub fn server_id(dir: &Path) -> Result<String, ServerError> {
    let path = dir.join("server.id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err(ServerError::Io(format!("{}: empty", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::new_uid();
            avail_tls::files::write_private(&path, id.as_bytes())
                .map_err(|e| ServerError::Io(format!("{}: {e}", path.display())))?;
            Ok(id)
        }
        Err(e) => Err(ServerError::Io(format!("{}: {e}", path.display()))),
    }
}

/// Open the store `choice` names for the server whose data dir is `dir`.
pub async fn open(choice: &StoreChoice, dir: &Path) -> Result<Arc<dyn Store>, ServerError> {
    Ok(match choice {
        StoreChoice::Redb => {
            let store_path = dir.join("store.redb");
            let key_path = dir.join("secret.key");
            if !store_path.exists() && key_path.exists() {
                return Err(ServerError::Io(format!(
                    "{}: missing, but {} exists: this data dir belongs to an existing cluster whose store is gone; refusing to start it as an empty cluster (restore the store, or start a new cluster in an empty data dir)",
                    store_path.display(),
                    key_path.display()
                )));
            }
            Arc::new(RedbStore::open(&store_path)?)
        }
        StoreChoice::Etcd { endpoints, prefix } => Arc::new(
            EtcdStore::connect(
                endpoints,
                EtcdOptions {
                    key_prefix: prefix.clone(),
                    ..EtcdOptions::default()
                },
            )
            .await?,
        ),
    })
}

/// Check that `store` holds the cluster whose data dir is `dir` (see the module docs),
/// binding the two on a first start. `what` names the store in errors. Returns the
/// cluster id.
pub async fn bind_cluster(
    store: &dyn Store,
    dir: &Path,
    what: &str,
) -> Result<String, ServerError> {
    let path = cluster_id_path(dir);
    let mine = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ServerError::Io(format!("{}: {e}", path.display()))),
    };
    let stored = store
        .get(keys::CLUSTER_ID)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    match (mine, stored) {
        (Some(m), Some(s)) if m == s => Ok(m),
        (Some(m), Some(s)) => Err(ServerError::Io(format!(
            "{what} holds cluster {s}, but this data dir ({}) belongs to cluster {m}: refusing to start (point the server at its own store, or at its own data dir)",
            dir.display()
        ))),
        (Some(m), None) => Err(ServerError::Io(format!(
            "{what} holds no cluster, but this data dir ({}) belongs to cluster {m}: its store lost its data (wiped, or another endpoint or prefix); refusing to start it as an empty cluster (restore the store, or start a new cluster in an empty data dir)",
            dir.display()
        ))),
        (None, Some(s)) => Err(ServerError::Io(format!(
            "{what} holds cluster {s}, and this data dir ({}) is not its (no {}): a server of that cluster needs the cluster's data dir (its keys, CA and tokens)",
            dir.display(),
            path.display()
        ))),
        (None, None) => {
            // A first start, or a store from before cluster ids whose data dir holds the
            // cluster's keys: adopted, but only when the store holds that cluster's
            // nodes or workloads (keys without them are a store that lost its data).
            let keys_here = dir.join("secret.key").exists() || dir.join("ca.key").exists();
            if keys_here && holds_nothing(store).await? {
                return Err(ServerError::Io(format!(
                    "{what} holds no cluster, but this data dir ({}) holds a cluster's keys: its store lost its data (wiped, or another endpoint or prefix); refusing to start it as an empty cluster (restore the store, or start a new cluster in an empty data dir)",
                    dir.display()
                )));
            }
            // Created by compare-and-swap, so two servers starting at once on one empty
            // store do not both win.
            let id = crate::new_uid();
            let bound = store
                .txn(Txn {
                    compares: vec![Compare::ModRev(keys::CLUSTER_ID.into(), 0)],
                    success: vec![Op::Put {
                        key: keys::CLUSTER_ID.into(),
                        value: id.clone().into_bytes(),
                        lease: None,
                    }],
                    failure: vec![],
                })
                .await?;
            if !bound.succeeded {
                return Err(ServerError::Io(format!(
                    "{what} was bound to another cluster while this server started; start it again"
                )));
            }
            avail_tls::files::write_private(&path, id.as_bytes())
                .map_err(|e| ServerError::Io(format!("{}: {e}", path.display())))?;
            tracing::info!(cluster = %id, "new cluster id in {what} and {}", path.display());
            Ok(id)
        }
    }
}

/// Whether `store` holds no node and no workload.
async fn holds_nothing(store: &dyn Store) -> Result<bool, ServerError> {
    for prefix in [keys::NODES, keys::WORKLOADS] {
        if !store.range(prefix).await?.0.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_choices_parse_or_name_the_flag() {
        assert_eq!(StoreChoice::parse("redb", "/avail/"), Ok(StoreChoice::Redb));
        assert_eq!(
            StoreChoice::parse("etcd://127.0.0.1:2379,10.0.0.2:2379", "/a/"),
            Ok(StoreChoice::Etcd {
                endpoints: vec!["127.0.0.1:2379".into(), "10.0.0.2:2379".into()],
                prefix: "/a/".into()
            })
        );
        for bad in [
            "sqlite",
            "etcd://",
            "etcd://host",
            "etcd://h:0",
            "etcd://h:x",
            "etcd://:1",
        ] {
            let e = StoreChoice::parse(bad, "/avail/").unwrap_err();
            assert_eq!(e.field, "store", "{bad}");
        }
        let e = StoreChoice::parse("etcd://h:1", "avail").unwrap_err();
        assert_eq!(e.field, "etcd-prefix");
    }

    #[tokio::test]
    async fn a_store_and_a_data_dir_are_bound_to_one_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let other = RedbStore::open(&dir.path().join("t.redb")).unwrap();
        // First start: bound; again: the same id.
        let id = bind_cluster(&store, &a, "s").await.unwrap();
        assert_eq!(bind_cluster(&store, &a, "s").await.unwrap(), id);
        // Another data dir on this store: refused.
        let e = bind_cluster(&store, &b, "s").await.unwrap_err().to_string();
        assert!(e.contains("not its"), "{e}");
        // This data dir on a store that lost its data: refused, nothing written.
        let e = bind_cluster(&other, &a, "t").await.unwrap_err().to_string();
        assert!(e.contains("holds no cluster"), "{e}");
        assert!(other.get(keys::CLUSTER_ID).await.unwrap().is_none());
        // A data dir with a cluster's keys but no id (from before ids) on an empty
        // store: refused; on a store holding its nodes: adopted.
        let (c, d) = (dir.path().join("c"), dir.path().join("d"));
        for x in [&c, &d] {
            std::fs::create_dir_all(x).unwrap();
            std::fs::write(x.join("secret.key"), b"k").unwrap();
        }
        let empty = RedbStore::open(&dir.path().join("u.redb")).unwrap();
        let e = bind_cluster(&empty, &c, "u").await.unwrap_err().to_string();
        assert!(e.contains("holds a cluster's keys"), "{e}");
        let legacy = RedbStore::open(&dir.path().join("v.redb")).unwrap();
        legacy
            .put(&keys::node("n"), b"{}".to_vec(), None)
            .await
            .unwrap();
        bind_cluster(&legacy, &d, "v").await.unwrap();
        // Two clusters, crossed: refused.
        bind_cluster(&other, &b, "t").await.unwrap();
        let e = bind_cluster(&other, &a, "t").await.unwrap_err().to_string();
        assert!(e.contains("belongs to cluster"), "{e}");
    }
}
