//! The node's own key: made by the agent on its first join, kept in its data dir
//! (`node.key`, 0600), never sent anywhere. Only its public half goes to the server,
//! which binds it to the node's name at the first join. From then on the key is the
//! node: a re-join carries a proof (a signature by the key over the join's name, key
//! and time, [`proof_message`]), and the short-lived certificates the server signs for
//! it authenticate every other call.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rcgen::{KeyPair, SigningKey as _};

use crate::TlsError;
use crate::files::write_private;

/// An agent's key pair (ECDSA P-256).
pub struct NodeKey {
    key: KeyPair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey").finish_non_exhaustive()
    }
}

impl NodeKey {
    /// Load `path`, or make a new key and write it there (0600).
    pub fn load_or_create(path: &Path) -> Result<NodeKey, TlsError> {
        let file_err = |e: &dyn std::fmt::Display| TlsError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        match std::fs::read_to_string(path) {
            Ok(pem) => Ok(NodeKey {
                key: KeyPair::from_pem(&pem).map_err(|e| file_err(&e))?,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate().map_err(|e| TlsError::bad("node key", e))?;
                write_private(path, key.serialize_pem().as_bytes()).map_err(|e| file_err(&e))?;
                Ok(NodeKey { key })
            }
            Err(e) => Err(file_err(&e)),
        }
    }

    /// The public key as the uncompressed point the server signs for.
    pub fn public_raw(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    /// The public key, base64url without padding (as a join carries it).
    pub fn public_b64(&self) -> String {
        B64.encode(self.public_raw())
    }

    /// A proof of holding this key for `message`: an ECDSA P-256 SHA-256 signature
    /// (ASN.1), base64url without padding.
    pub fn prove(&self, message: &[u8]) -> String {
        B64.encode(self.key.sign(message).expect("ring signs with a P-256 key"))
    }

    /// The private key, PEM (for the TLS configuration).
    pub fn private_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// What a re-join proof signs: the node's name, its key and the time, so a proof says
/// nothing about another node or another key, and goes stale.
pub fn proof_message(name: &str, public_key_b64: &str, time_s: u64) -> Vec<u8> {
    format!("avail-join-v1\n{name}\n{public_key_b64}\n{time_s}").into_bytes()
}

/// Whether `proof_b64` is a signature of `message` by the raw P-256 key `public_raw`.
pub fn verify_proof(public_raw: &[u8], message: &[u8], proof_b64: &str) -> bool {
    let Ok(sig) = B64.decode(proof_b64) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_raw)
        .verify(message, &sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_and_message() {
        let d = tempfile::tempdir().unwrap();
        let a = NodeKey::load_or_create(&d.path().join("a.key")).unwrap();
        let b = NodeKey::load_or_create(&d.path().join("b.key")).unwrap();
        let again = NodeKey::load_or_create(&d.path().join("a.key")).unwrap();
        assert_eq!(a.public_raw(), again.public_raw());
        let m = proof_message("node-1", &a.public_b64(), 1000);
        let p = a.prove(&m);
        assert!(verify_proof(a.public_raw(), &m, &p));
        assert!(!verify_proof(b.public_raw(), &m, &p));
        assert!(!verify_proof(
            a.public_raw(),
            &proof_message("node-2", &a.public_b64(), 1000),
            &p
        ));
        assert!(!verify_proof(a.public_raw(), &m, &b.prove(&m)));
        assert!(!verify_proof(a.public_raw(), &m, "not base64!"));
    }
}
