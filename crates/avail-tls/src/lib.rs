//! avail-tls: the cluster's trust.
//!
//! Owns the cluster CA ([`ca`]: created once by the server, it signs the API's server
//! certificate and every node's certificate), the node's own key ([`node_key`]: made
//! by the agent, never leaves its data dir), rustls configurations for both ends of a
//! connection with a node certificate that can be renewed in place ([`config`]), and
//! the bounded HTTP serving loop every listener uses ([`serve`]: a connection cap,
//! handshake, header and idle timeouts, and the peer's verified certificate handed to
//! the handlers as [`serve::PeerCert`]).
//!
//! It does not decide who may do what: the server maps a verified certificate to a node
//! (by the digest bound at join) and decides; this crate only proves who holds which
//! key.

pub mod ca;
pub mod config;
pub mod files;
pub mod node_key;
pub mod peer;
pub mod serve;

pub use ca::{ClusterCa, Issued};
pub use config::{NodeCert, client_config, server_config};
pub use node_key::NodeKey;
pub use peer::MovableTcp;

/// Errors of key and certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key or certificate file could not be read or written (names the file).
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A certificate or key could not be made or parsed.
    #[error("{what}: {reason}")]
    Bad {
        /// What was being made or read.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

impl TlsError {
    pub(crate) fn bad(what: &'static str, e: impl std::fmt::Display) -> TlsError {
        TlsError::Bad {
            what,
            reason: e.to_string(),
        }
    }
}

/// The SHA-256 of a certificate's DER, as lowercase hex: how the server names the
/// certificate it issued to a node.
pub fn cert_digest(der: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(der);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the Unix epoch.
pub(crate) fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
