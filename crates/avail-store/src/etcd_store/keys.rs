//! Keys under the namespace, revisions and lease ids between the model and etcd, and the
//! argument checks made before anything is sent.

use crate::{KeyValue, LeaseId, Result, Revision, StoreError};

/// The key prefix of one store in etcd.
#[derive(Clone, Debug)]
pub(super) struct Namespace(pub(super) String);

impl Namespace {
    /// The etcd key of a store key.
    pub(super) fn key(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.0.len() + key.len());
        k.extend_from_slice(self.0.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The store key of an etcd key (which must be under the prefix and UTF-8).
    pub(super) fn strip(&self, key: &[u8]) -> Result<String> {
        let rest = key.strip_prefix(self.0.as_bytes()).ok_or_else(|| {
            StoreError::Backend(format!(
                "etcd returned key {:?} outside prefix {:?}",
                String::from_utf8_lossy(key),
                self.0
            ))
        })?;
        String::from_utf8(rest.to_vec()).map_err(|_| {
            StoreError::Backend(format!(
                "etcd key {:?} is not UTF-8",
                String::from_utf8_lossy(key)
            ))
        })
    }

    /// The store's view of an etcd key-value.
    pub(super) fn key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            create_rev: revision(kv.create_revision(), "create revision")?,
            mod_rev: revision(kv.mod_revision(), "mod revision")?,
            lease: u64::try_from(kv.lease()).ok().filter(|l| *l != 0),
        })
    }
}

/// `[start, end)` of every key starting with `prefix` (all keys for an empty prefix).
pub(super) fn key_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    for i in (0..prefix.len()).rev() {
        if prefix[i] < 0xff {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            return (prefix.to_vec(), end);
        }
    }
    // All 0xff: every key from the prefix on.
    (prefix.to_vec(), vec![0])
}

/// A revision etcd answered (never negative).
pub(super) fn revision(r: i64, what: &str) -> Result<Revision> {
    Revision::try_from(r).map_err(|_| StoreError::Backend(format!("etcd answered {what} {r}")))
}

/// The revision of a response header.
pub(super) fn header_rev(
    header: Option<&etcd_client::ResponseHeader>,
    what: &str,
) -> Result<Revision> {
    let h = header
        .ok_or_else(|| StoreError::Backend(format!("{what}: etcd answered without a header")))?;
    revision(h.revision(), "header revision")
}

/// etcd's id of a lease; one above `i64::MAX` (or 0) was never granted.
pub(super) fn lease_id(lease: LeaseId) -> Result<i64> {
    match i64::try_from(lease) {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(StoreError::LeaseNotFound(lease)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_range_covers_exactly_the_prefix() {
        assert_eq!(key_range(b"/a/"), (b"/a/".to_vec(), b"/a0".to_vec()));
        assert_eq!(key_range(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
        assert_eq!(key_range(b"\xff\xff"), (b"\xff\xff".to_vec(), vec![0]));
        assert_eq!(key_range(b""), (vec![0], vec![0]));
    }

    #[test]
    fn namespace_adds_and_strips_the_prefix() {
        let ns = Namespace("/avail/".into());
        assert_eq!(ns.key("a/b"), b"/avail/a/b");
        assert_eq!(ns.strip(b"/avail/a/b").unwrap(), "a/b");
        assert!(matches!(ns.strip(b"/other/a"), Err(StoreError::Backend(_))));
    }

    #[test]
    fn lease_ids_beyond_etcd_are_not_found() {
        assert!(matches!(lease_id(0), Err(StoreError::LeaseNotFound(0))));
        assert!(matches!(
            lease_id(u64::MAX),
            Err(StoreError::LeaseNotFound(u64::MAX))
        ));
        assert_eq!(lease_id(7).unwrap(), 7);
    }
}
