//! Tokens: signed, expiring, verified without a store read.
//!
//! A token is `av1.<payload>.<signature>`: the payload is base64url JSON
//! `{"sub", "role", "iat", "exp"}` and the signature is HMAC-SHA256 over the
//! `av1.<payload>` text with the server's secret key (32 random bytes, created on first
//! start in `<data-dir>/secret.key`, mode 0600). Verification is a MAC check and a clock
//! comparison in memory: no request ever reads the store to authenticate.
//!
//! Roles: `admin` (everything). Agents do not use tokens: a node is its key, proven
//! by the certificate the cluster CA issued for it (see [`crate::identity`]); a new
//! node joins with a join token ([`crate::join_tokens`]), which is not a signed token
//! but a stored, hashed, counted secret.

use std::fs;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
}

/// The verified content of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: user or node name.
    pub sub: String,
    /// Role.
    pub role: Role,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// Not of the `av1.<payload>.<signature>` shape, or the payload does not decode.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match: forged or from another cluster.
    #[error("invalid token signature")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
}

/// Errors setting up the key material.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct KeyError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

/// Signs and verifies tokens with one secret key.
#[derive(Clone)]
pub struct Auth {
    key: [u8; 32],
}

const PREFIX: &str = "av1.";

impl Auth {
    /// An authority with this key.
    pub fn with_key(key: [u8; 32]) -> Auth {
        Auth { key }
    }

    /// Load `<dir>/secret.key`, creating it (0600) with 32 random bytes if absent.
    pub fn load_or_create(dir: &Path) -> Result<Auth, KeyError> {
        let path = dir.join("secret.key");
        let err = |reason: String| KeyError {
            path: path.display().to_string(),
            reason,
        };
        match fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|b: Vec<u8>| err(format!("expected 32 bytes, found {}", b.len())))?;
                Ok(Auth { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| err(format!("random: {e}")))?;
                write_secret(&path, &key).map_err(|e| err(e.to_string()))?;
                Ok(Auth { key })
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    fn mac(&self, text: &str) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(text.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Issue a token.
    pub fn issue(&self, sub: &str, role: Role, now_s: u64, ttl_s: u64) -> String {
        let claims = Claims {
            sub: sub.to_string(),
            role,
            iat: now_s,
            exp: now_s.saturating_add(ttl_s),
        };
        let payload = B64.encode(serde_json::to_vec(&claims).expect("claims serialise"));
        let signed = format!("{PREFIX}{payload}");
        let sig = B64.encode(self.mac(&signed));
        format!("{signed}.{sig}")
    }

    /// Verify a token at time `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (payload, sig) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(PREFIX.as_bytes());
        mac.update(payload.as_bytes());
        // verify_slice compares in constant time.
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = B64
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if now_s >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Write a secret file readable by its owner only (created 0600, then renamed over).
pub use avail_tls::files::write_private as write_secret;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_forge_expire() {
        let a = Auth::with_key([7; 32]);
        let t = a.issue("admin", Role::Admin, 1000, 60);
        let c = a.verify(&t, 1001).unwrap();
        assert_eq!((c.sub.as_str(), c.role), ("admin", Role::Admin));
        assert_eq!(a.verify(&t, 1060), Err(TokenError::Expired));
        let other = Auth::with_key([8; 32]);
        assert_eq!(other.verify(&t, 1001), Err(TokenError::BadSignature));
        // Swap in a payload claiming another role: the signature no longer matches.
        let forged_payload = B64.encode(br#"{"sub":"x","role":"admin","iat":0,"exp":99999999999}"#);
        let sig = t.rsplit('.').next().unwrap();
        assert_eq!(
            a.verify(&format!("av1.{forged_payload}.{sig}"), 1001),
            Err(TokenError::BadSignature)
        );
        assert_eq!(a.verify("garbage", 1001), Err(TokenError::Malformed));
        assert_eq!(a.verify("av1.abc", 1001), Err(TokenError::Malformed));
    }

    #[test]
    fn key_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let a = Auth::load_or_create(d.path()).unwrap();
        let b = Auth::load_or_create(d.path()).unwrap();
        assert_eq!(a.key, b.key);
        let mode = fs::metadata(d.path().join("secret.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(d.path().join("secret.key"), b"short").unwrap();
        let e = Auth::load_or_create(d.path()).err().unwrap();
        assert!(e.to_string().contains("secret.key"), "{e}");
    }
}
