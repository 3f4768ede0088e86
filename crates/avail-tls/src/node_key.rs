//! The node's own key: made by the agent on its first join, kept in its data dir
//! (`node.key`, 0600), never sent anywhere. Only its public half goes to the server,
//! which binds it to the node's name by the certificate it signs.

use std::path::Path;

use rcgen::KeyPair;

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

    /// The private key, PEM (for the TLS configuration).
    pub fn private_pem(&self) -> String {
        self.key.serialize_pem()
    }
}
