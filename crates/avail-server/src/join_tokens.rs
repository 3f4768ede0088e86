//! Join tokens at rest, and the checks a join makes with one.
//!
//! A token is `avj.<id>.<secret>`: `id` (16 hex digits) names the record
//! `/tokens/<id>`, `secret` (32 random bytes, base64url) is shown once at creation and
//! kept only as its SHA-256. A join consumes one use in the same store transaction
//! that writes the new node's record, so a token of N uses admits at most N nodes,
//! and a name is taken once, whatever the races. A token is refused once expired, used
//! up or revoked (deleted), and a wrong secret is compared in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use avail_model::token::{JoinTokenCreated, JoinTokenInfo, JoinTokenRequest};

/// The prefix of a join token.
pub const PREFIX: &str = "avj.";
/// Most node names a token record remembers.
const MAX_NODES_KEPT: usize = 100;

/// What the store keeps of a join token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its id.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// What it is for.
    pub description: String,
    /// Created, ms.
    pub created_ms: u64,
    /// Expires, ms.
    pub expires_ms: u64,
    /// Joins left.
    pub uses_left: u32,
    /// Joins made.
    pub used: u32,
    /// The nodes that joined with it (the last [`MAX_NODES_KEPT`]).
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// Why a join token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not of the `avj.<id>.<secret>` shape.
    #[error("not a join token")]
    Malformed,
    /// No such token (never made, or revoked).
    #[error("unknown or revoked join token")]
    Unknown,
    /// The secret does not match.
    #[error("invalid join token")]
    BadSecret,
    /// Past its life.
    #[error("join token expired")]
    Expired,
    /// No joins left.
    #[error("join token used up")]
    UsedUp,
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A new token for `req` made at `now_ms`: the token text and its record.
pub fn mint(req: &JoinTokenRequest, now_ms: u64) -> (String, TokenRecord) {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the OS random source works");
    let secret = B64.encode(secret);
    let id = crate::new_uid();
    let rec = TokenRecord {
        secret_sha256: sha256_hex(secret.as_bytes()),
        id: id.clone(),
        description: req.description.clone(),
        created_ms: now_ms,
        expires_ms: now_ms + req.ttl_s * 1000,
        uses_left: req.uses,
        used: 0,
        nodes: vec![],
    };
    (format!("{PREFIX}{id}.{secret}"), rec)
}

/// The id and secret of a token text.
pub fn parse(token: &str) -> Result<(&str, &str), Refusal> {
    let (id, secret) = token
        .strip_prefix(PREFIX)
        .and_then(|r| r.split_once('.'))
        .ok_or(Refusal::Malformed)?;
    let hex_id = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_id || secret.is_empty() || secret.len() > 64 {
        return Err(Refusal::Malformed);
    }
    Ok((id, secret))
}

/// Whether `secret` opens `rec` at `now_ms` for one more join.
pub fn check(rec: &TokenRecord, secret: &str, now_ms: u64) -> Result<(), Refusal> {
    let given = sha256_hex(secret.as_bytes());
    // Equal-length hex digests compared without an early exit.
    let diff = given
        .bytes()
        .zip(rec.secret_sha256.bytes())
        .fold(given.len() ^ rec.secret_sha256.len(), |d, (a, b)| {
            d | usize::from(a ^ b)
        });
    if diff != 0 {
        return Err(Refusal::BadSecret);
    }
    if now_ms >= rec.expires_ms {
        return Err(Refusal::Expired);
    }
    if rec.uses_left == 0 {
        return Err(Refusal::UsedUp);
    }
    Ok(())
}

/// The record after `node` joined with it.
pub fn consumed(rec: &TokenRecord, node: &str) -> TokenRecord {
    let mut r = rec.clone();
    r.uses_left -= 1;
    r.used += 1;
    r.nodes.push(node.to_string());
    if r.nodes.len() > MAX_NODES_KEPT {
        r.nodes.remove(0);
    }
    r
}

/// A record as listed.
pub fn info(rec: &TokenRecord) -> JoinTokenInfo {
    JoinTokenInfo {
        id: rec.id.clone(),
        description: rec.description.clone(),
        created_ms: rec.created_ms,
        expires_ms: rec.expires_ms,
        uses_left: rec.uses_left,
        used: rec.used,
        nodes: rec.nodes.clone(),
    }
}

/// What creating a token answers.
pub fn created(token: String, rec: &TokenRecord) -> JoinTokenCreated {
    JoinTokenCreated {
        token,
        info: info(rec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uses: u32) -> JoinTokenRequest {
        JoinTokenRequest {
            ttl_s: 60,
            uses,
            description: String::new(),
        }
    }

    #[test]
    fn a_token_opens_its_record_until_expired_or_used_up() {
        let (t, rec) = mint(&req(2), 1_000);
        let (id, secret) = parse(&t).unwrap();
        assert_eq!(id, rec.id);
        assert_eq!(check(&rec, secret, 1_000), Ok(()));
        assert_eq!(check(&rec, "wrong", 1_000), Err(Refusal::BadSecret));
        assert_eq!(check(&rec, secret, 61_000), Err(Refusal::Expired));
        let once = consumed(&rec, "a");
        assert_eq!(check(&once, secret, 2_000), Ok(()));
        let twice = consumed(&once, "b");
        assert_eq!(check(&twice, secret, 2_000), Err(Refusal::UsedUp));
        assert_eq!(
            (twice.used, twice.nodes.clone()),
            (2, vec!["a".to_string(), "b".into()])
        );
        // The record never holds the secret.
        assert!(!serde_json::to_string(&rec).unwrap().contains(secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for t in [
            "",
            "avj.",
            "avj.xyz.abc",
            "av1.0123456789abcdef.x",
            "avj.0123456789abcdef.",
        ] {
            assert_eq!(parse(t), Err(Refusal::Malformed), "{t}");
        }
    }
}
