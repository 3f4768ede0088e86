//! The reply log of an `ft` replica: `Idempotency-Key` -> the reply the guest gave, so a
//! request retried after a failover is answered from the log (`Avail-Replayed: 1`)
//! instead of running twice. It is host state carried in every checkpoint: a delta
//! carries the entries added and the keys removed since the previous capture, a full
//! checkpoint every entry.
//!
//! Bounded and trimmed three ways, oldest first:
//! - **delivered**: a key the ingress assigned (`avail-...`) is removed as soon as that
//!   ingress says it delivered the reply (`Avail-Delivered` on a later request): it will
//!   never retry it, so the log holds only replies still in flight;
//! - **age**: ingress keys after [`RETAIN_INGRESS_MS`] (four times the ingress's retry
//!   window), client keys after [`RETAIN_CLIENT_MS`];
//! - **bytes**: never by evicting an entry before its age is up (a retry of it would run
//!   twice): when the log holds [`MAX_BYTES`] of young entries, the replica refuses new
//!   logged requests (503, counted in `refusals`) until deliveries and age free room.
//!   It can pass the bound by one reply at most.
//!
//! A key is bound to its request: each entry records a digest of the request's method,
//! path and body ([`request_digest`]), and [`ReplyLog::lookup`] tells a repeat (same
//! digest: answered from the log) from a different request reusing the key (answered
//! `422` by the replica, which runs nothing).

use std::collections::{HashMap, VecDeque};

use sha2::{Digest, Sha256};

/// Most bytes of replies (keys, headers, bodies) the log keeps.
pub const MAX_BYTES: usize = 32 << 20;
/// How long a key the ingress assigned is kept when its delivery is never reported.
pub const RETAIN_INGRESS_MS: u64 = 60_000;
/// How long a key the client chose is kept.
pub const RETAIN_CLIENT_MS: u64 = 600_000;
/// Prefix of the keys the ingress assigns.
pub const INGRESS_KEY_PREFIX: &str = "avail-";

/// SHA-256 of a request's method, path (with query) and body, each length-prefixed so
/// that no two different requests share their encoding.
pub fn request_digest(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [method.as_bytes(), path.as_bytes(), body] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// What the log holds for a key and a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Nothing: the request runs.
    Miss,
    /// The reply to this very request (a retry).
    Repeat(&'a Entry),
    /// The key was used by another request: refused, nothing runs.
    Reused,
}

/// A reply the log keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Digest of the request it answered ([`request_digest`]).
    pub request: [u8; 32],
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// When it was logged (ms since the Unix epoch, the primary's clock).
    pub at_ms: u64,
}

impl Entry {
    fn bytes(&self, key: &str) -> usize {
        64 + key.len()
            + self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
    }
}

fn retention(key: &str) -> u64 {
    if key.starts_with(INGRESS_KEY_PREFIX) {
        RETAIN_INGRESS_MS
    } else {
        RETAIN_CLIENT_MS
    }
}

/// The log.
#[derive(Default)]
pub struct ReplyLog {
    /// key -> (insertion sequence, entry).
    entries: HashMap<String, (u64, Entry)>,
    /// Insertion order; a key removed early stays here until it reaches the front
    /// (matched by sequence, so a key logged again is not evicted by its old place).
    order: VecDeque<(u64, String)>,
    seq: u64,
    bytes: usize,
    /// Keys added since the last capture.
    fresh: Vec<String>,
    /// Keys removed since the last capture.
    removed: Vec<String>,
    /// Requests refused because the log was full.
    refusals: u64,
}

impl ReplyLog {
    /// The reply logged under `key`.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key).map(|(_, e)| e)
    }

    /// What the log holds for `key` and the request of digest `request`.
    pub fn lookup(&self, key: &str, request: &[u8; 32]) -> Lookup<'_> {
        match self.get(key) {
            None => Lookup::Miss,
            Some(e) if &e.request == request => Lookup::Repeat(e),
            Some(_) => Lookup::Reused,
        }
    }

    /// Entries kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Requests refused so far because the log was full.
    pub fn refusals(&self) -> u64 {
        self.refusals
    }

    /// Whether a new reply may be logged at `now_ms` (entries past their age are
    /// dropped first). `false` is counted as a refusal.
    pub fn has_room(&mut self, now_ms: u64) -> bool {
        if self.bytes < MAX_BYTES {
            return true;
        }
        self.expire(now_ms);
        let room = self.bytes < MAX_BYTES;
        if !room {
            self.refusals += 1;
        }
        room
    }

    /// Make room for a new reply by evicting the oldest (levels below `ft`, where the
    /// log is best effort: no failover relies on it). Returns how many were evicted.
    pub fn make_room(&mut self, now_ms: u64) -> usize {
        if self.bytes < MAX_BYTES {
            return 0;
        }
        self.expire(now_ms);
        let mut evicted = 0;
        while self.bytes >= MAX_BYTES && !self.entries.is_empty() {
            self.pop_front();
            evicted += 1;
        }
        evicted
    }

    /// Forget what changed since the last capture: nobody takes captures now (no peer);
    /// a peer attached later gets a full image.
    pub fn forget_changes(&mut self) {
        self.fresh.clear();
        self.removed.clear();
    }

    /// Log a reply (a key already logged keeps its first reply). Nothing is evicted:
    /// callers ask [`ReplyLog::has_room`] first.
    pub fn insert(&mut self, key: String, e: Entry) {
        if self.entries.contains_key(&key) {
            return;
        }
        self.seq += 1;
        self.bytes += e.bytes(&key);
        self.order.push_back((self.seq, key.clone()));
        self.entries.insert(key.clone(), (self.seq, e));
        self.fresh.push(key);
    }

    fn skip_dead(&mut self) {
        while let Some((seq, key)) = self.order.front() {
            if self.entries.get(key).is_some_and(|(s, _)| s == seq) {
                return;
            }
            self.order.pop_front();
        }
    }

    fn pop_front(&mut self) {
        debug_assert!(!self.order.is_empty() || self.entries.is_empty());
        self.skip_dead();
        if let Some((_, key)) = self.order.pop_front() {
            self.remove(&key);
        }
    }

    /// Remove `key` (its reply was delivered, or it aged out).
    pub fn remove(&mut self, key: &str) {
        if let Some((_, e)) = self.entries.remove(key) {
            self.bytes -= e.bytes(key);
            self.removed.push(key.to_string());
        }
    }

    /// The ingress delivered the replies of these keys: only its own keys are removed
    /// (a client's key may be retried by the client at any time).
    pub fn delivered<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        for k in keys {
            if k.starts_with(INGRESS_KEY_PREFIX) {
                self.remove(k);
            }
        }
    }

    /// Drop entries past their retention at `now_ms`. Entries are in time order per
    /// kind, so this stops at the first entry still kept of the oldest ones.
    pub fn expire(&mut self, now_ms: u64) {
        loop {
            self.skip_dead();
            let Some((_, key)) = self.order.front() else {
                return;
            };
            let Some((_, e)) = self.entries.get(key) else {
                return;
            };
            // Client keys live longer than ingress keys: an old client entry in front
            // may hold back ingress entries behind it until the byte bound or its own
            // age removes it. Good enough: both bounds still hold.
            if now_ms.saturating_sub(e.at_ms) < retention(key) {
                return;
            }
            self.pop_front();
        }
    }

    fn put(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }

    fn encode(&self, keys: &[String], removed: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        let present: Vec<(&String, &Entry)> = keys
            .iter()
            .filter_map(|k| self.entries.get(k).map(|(_, e)| (k, e)))
            .collect();
        out.extend_from_slice(&(present.len() as u32).to_le_bytes());
        for (k, e) in present {
            Self::put(&mut out, k.as_bytes());
            out.extend_from_slice(&e.at_ms.to_le_bytes());
            out.extend_from_slice(&e.request);
            out.extend_from_slice(&e.status.to_le_bytes());
            out.extend_from_slice(&(e.headers.len() as u32).to_le_bytes());
            for (n, v) in &e.headers {
                Self::put(&mut out, n.as_bytes());
                Self::put(&mut out, v.as_bytes());
            }
            Self::put(&mut out, &e.body);
        }
        out.extend_from_slice(&(removed.len() as u32).to_le_bytes());
        for k in removed {
            Self::put(&mut out, k.as_bytes());
        }
        out
    }

    /// Host state of a delta capture: what changed since the last capture.
    pub fn take_delta(&mut self) -> Vec<u8> {
        let keys = std::mem::take(&mut self.fresh);
        let removed = std::mem::take(&mut self.removed);
        // A key added and removed within one epoch is simply absent from "added"; it is
        // listed as removed, which the receiver ignores for keys it does not have.
        self.encode(&keys, &removed)
    }

    /// Host state of a full capture: every entry, oldest first.
    pub fn take_full(&mut self) -> Vec<u8> {
        self.fresh.clear();
        self.removed.clear();
        let keys: Vec<String> = self
            .order
            .iter()
            .filter(|(seq, k)| self.entries.get(k).is_some_and(|(s, _)| s == seq))
            .map(|(_, k)| k.clone())
            .collect();
        self.encode(&keys, &[])
    }

    /// Parse the host state of a checkpoint: entries added, keys removed. Checks
    /// everything before anything is applied (a torn log changes nothing).
    pub fn parse(host: &[u8]) -> Result<Parsed, String> {
        struct R<'a>(&'a [u8]);
        impl<'a> R<'a> {
            fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
                if self.0.len() < n {
                    return Err("reply log truncated".into());
                }
                let (h, t) = self.0.split_at(n);
                self.0 = t;
                Ok(h)
            }
            fn u32(&mut self) -> Result<u32, String> {
                Ok(u32::from_le_bytes(
                    self.take(4)?.try_into().expect("4 bytes"),
                ))
            }
            fn count(&mut self, min_bytes: usize) -> Result<usize, String> {
                let n = self.u32()? as usize;
                if n.saturating_mul(min_bytes) > self.0.len() {
                    return Err(format!("{n} reply log items in {} bytes", self.0.len()));
                }
                Ok(n)
            }
            fn bytes(&mut self) -> Result<Vec<u8>, String> {
                let n = self.u32()? as usize;
                Ok(self.take(n)?.to_vec())
            }
            fn string(&mut self) -> Result<String, String> {
                String::from_utf8(self.bytes()?)
                    .map_err(|_| "reply log text is not UTF-8".to_string())
            }
        }
        let mut r = R(host);
        let mut parsed = Parsed::default();
        let count = r.count(54)?;
        for _ in 0..count {
            let key = r.string()?;
            let at_ms = u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
            let request: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
            let status = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
            let nh = r.count(8)?;
            let mut headers = Vec::with_capacity(nh);
            for _ in 0..nh {
                headers.push((r.string()?, r.string()?));
            }
            let body = r.bytes()?;
            parsed.added.push((
                key,
                Entry {
                    request,
                    status,
                    headers,
                    body,
                    at_ms,
                },
            ));
        }
        let removed = r.count(4)?;
        for _ in 0..removed {
            parsed.removed.push(r.string()?);
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the reply log", r.0.len()));
        }
        Ok(parsed)
    }

    /// Apply a parsed checkpoint's log (a full checkpoint's replaces the log).
    pub fn apply(&mut self, parsed: Parsed, full: bool) {
        if full {
            let refusals = self.refusals;
            *self = ReplyLog::default();
            self.refusals = refusals;
        }
        for k in &parsed.removed {
            self.remove(k);
        }
        for (k, e) in parsed.added {
            self.insert(k, e);
        }
        self.fresh.clear();
        self.removed.clear();
    }
}

/// A checkpoint's reply log, parsed.
#[derive(Debug, Default)]
pub struct Parsed {
    added: Vec<(String, Entry)>,
    removed: Vec<String>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn best_effort_logs_evict_the_oldest_and_forget_changes() {
        let mut log = ReplyLog::default();
        let big = vec![7u8; 1 << 20];
        for i in 0..40u64 {
            log.make_room(i);
            log.insert(
                format!("k{i}"),
                Entry {
                    request: [0; 32],
                    status: 200,
                    headers: vec![],
                    body: big.clone(),
                    at_ms: i,
                },
            );
            log.forget_changes();
        }
        assert!(log.bytes() <= MAX_BYTES + (1 << 20) + 64, "{}", log.bytes());
        assert!(log.get("k0").is_none(), "the oldest went first");
        assert!(log.get("k39").is_some());
        assert!(log.fresh.is_empty() && log.removed.is_empty());
        assert_eq!(log.refusals(), 0);
    }

    use super::*;

    fn entry(body: &str, at_ms: u64) -> Entry {
        Entry {
            request: request_digest("POST", "/x", body.as_bytes()),
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
            at_ms,
        }
    }

    #[test]
    fn a_key_is_bound_to_its_request() {
        let mut l = ReplyLog::default();
        l.insert("k".into(), entry("a", 1));
        let same = request_digest("POST", "/x", b"a");
        assert_eq!(l.lookup("k", &same), Lookup::Repeat(&entry("a", 1)));
        for other in [
            request_digest("POST", "/x", b"b"),
            request_digest("PUT", "/x", b"a"),
            request_digest("POST", "/y", b"a"),
            // Length prefixes: moving bytes between parts is another request.
            request_digest("POST", "/xa", b""),
        ] {
            assert_eq!(l.lookup("k", &other), Lookup::Reused);
        }
        assert_eq!(l.lookup("other", &same), Lookup::Miss);
        // The digest travels in checkpoints.
        let mut s = ReplyLog::default();
        s.apply(ReplyLog::parse(&l.take_full()).unwrap(), true);
        assert_eq!(s.lookup("k", &same), Lookup::Repeat(&entry("a", 1)));
    }

    fn keys(l: &ReplyLog) -> Vec<String> {
        let mut k: Vec<String> = l.entries.keys().cloned().collect();
        k.sort();
        k
    }

    #[test]
    fn deltas_carry_adds_and_removes_and_full_replaces() {
        let (mut p, mut s) = (ReplyLog::default(), ReplyLog::default());
        p.insert("avail-a".into(), entry("1", 10));
        p.insert("client-b".into(), entry("2", 11));
        s.apply(ReplyLog::parse(&p.take_full()).unwrap(), true);
        assert_eq!(keys(&s), keys(&p));
        p.delivered(["avail-a", "client-b"]);
        p.insert("avail-c".into(), entry("3", 12));
        s.apply(ReplyLog::parse(&p.take_delta()).unwrap(), false);
        assert_eq!(
            keys(&p),
            vec!["avail-c", "client-b"],
            "a client key is not trimmed by delivery"
        );
        assert_eq!(keys(&s), keys(&p));
        assert_eq!(s.get("avail-c"), Some(&entry("3", 12)));
        assert_eq!(s.bytes(), p.bytes());
        // An empty delta changes nothing.
        s.apply(ReplyLog::parse(&p.take_delta()).unwrap(), false);
        assert_eq!(keys(&s), keys(&p));
    }

    #[test]
    fn a_full_log_refuses_instead_of_evicting_young_replies() {
        let mut l = ReplyLog::default();
        let big = "x".repeat(1 << 20);
        let mut logged = 0;
        for i in 0..40u64 {
            if l.has_room(1000 + i) {
                l.insert(format!("avail-{i}"), entry(&big, 1000 + i));
                logged += 1;
            }
        }
        assert!(logged < 40 && l.bytes() < MAX_BYTES + (2 << 20));
        assert_eq!(l.refusals(), 40 - logged);
        assert!(l.get("avail-0").is_some(), "nothing young evicted");
        // Deliveries free room.
        l.delivered(["avail-0", "avail-1"]);
        assert!(l.has_room(2000));
        // So does age.
        let mut l2 = ReplyLog::default();
        for i in 0..40u64 {
            if l2.has_room(0) {
                l2.insert(format!("avail-{i}"), entry(&big, 0));
            }
        }
        assert!(l2.has_room(RETAIN_INGRESS_MS));
        assert_eq!(l2.len(), 0);
    }

    #[test]
    fn expiry_by_age_and_a_key_logged_again_keeps_its_new_place() {
        let mut l = ReplyLog::default();
        l.insert("avail-old".into(), entry("1", 0));
        l.insert("client".into(), entry("2", 0));
        l.delivered(["avail-old"]);
        l.insert("avail-old".into(), entry("3", RETAIN_CLIENT_MS - 1000));
        l.expire(RETAIN_INGRESS_MS + 1);
        assert_eq!(
            keys(&l),
            vec!["avail-old", "client"],
            "the client key holds"
        );
        l.expire(RETAIN_CLIENT_MS);
        assert_eq!(keys(&l), vec!["avail-old"]);
        assert_eq!(l.get("avail-old").unwrap().body, b"3");
        l.expire(RETAIN_CLIENT_MS + RETAIN_INGRESS_MS);
        assert_eq!(l.len(), 0);
        assert_eq!(l.bytes(), 0);
    }

    #[test]
    fn torn_or_padded_logs_are_refused() {
        let mut p = ReplyLog::default();
        p.insert("avail-a".into(), entry("hello", 1));
        let full = p.take_full();
        for cut in 0..full.len() {
            assert!(ReplyLog::parse(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = full.clone();
        padded.push(0);
        assert!(ReplyLog::parse(&padded).is_err());
        // A count far beyond the bytes present is refused before anything is allocated.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend([0; 8]);
        assert!(ReplyLog::parse(&huge).is_err());
    }
}
