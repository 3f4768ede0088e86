//! rustls configurations: the server side (with an optional client certificate,
//! verified against the cluster CA), and the client side (trusting only the cluster
//! CA, presenting a node certificate that can be replaced while connections go on).
//! The node-to-node configurations (mutual TLS on the peer port) are in
//! [`crate::peer`].

use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::TlsError;

/// ring's provider, with AES-128-GCM first among the TLS 1.3 suites (both ends prefer
/// it): as strong as a cluster key needs, and the fastest bulk cipher on machines with
/// AES instructions, which counts on replication links carrying checkpoints
/// (docs/benchmarks.md, "The cost of TLS").
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// The certificates in a PEM text.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::bad("certificate PEM", e))?;
    if certs.is_empty() {
        return Err(TlsError::bad("certificate PEM", "no certificate in it"));
    }
    Ok(certs)
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::bad("key PEM", e))
}

pub(crate) fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(ca_pem)? {
        roots
            .add(c)
            .map_err(|e| TlsError::bad("CA certificate", e))?;
    }
    Ok(roots)
}

/// A server configuration for `chain_pem`/`key_pem`. With `client_ca_pem`, a client
/// may present a certificate, which must then chain to that CA (clients without one,
/// such as the CLI with a bearer token, are still let in: the handlers decide).
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::bad("TLS versions", e))?;
    let builder = match client_ca_pem {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::bad("client verifier", e))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(parse_certs(chain_pem)?, parse_key(key_pem)?)
        .map_err(|e| TlsError::bad("server certificate", e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The node's certificate, replaceable in place (a renewed node certificate): new
/// connections present the new one, open ones keep theirs. The agent presents it as a
/// client (to the server and to peers) and as a server (its peer port).
#[derive(Debug, Default)]
pub struct NodeCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl NodeCert {
    /// A node certificate holding nothing yet (nothing is presented).
    pub fn new() -> Arc<NodeCert> {
        Arc::new(NodeCert::default())
    }

    /// Present `chain_pem` with `key_pem` from now on.
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = provider()
            .key_provider
            .load_private_key(parse_key(key_pem)?)
            .map_err(|e| TlsError::bad("node key", e))?;
        let ck = Arc::new(CertifiedKey::new(parse_certs(chain_pem)?, key));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(ck);
        Ok(())
    }

    /// Whether a certificate is set.
    pub fn is_set(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesClientCert for NodeCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

impl ResolvesServerCert for NodeCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// A client configuration trusting only `ca_pem`, presenting `identity` when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<Arc<NodeCert>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::bad("TLS versions", e))?
        .with_root_certificates(roots(ca_pem)?);
    let cfg = match identity {
        Some(id) => {
            let mut cfg = builder.with_client_cert_resolver(id);
            // A resumed session carries the certificate of the session it resumes:
            // after a renewal that would present the old one. Every connection makes
            // a full handshake with the current certificate.
            cfg.resumption = rustls::client::Resumption::disabled();
            cfg
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A client configuration that trusts no certificate at all (plain `http://` only:
/// every `https://` server is refused).
pub fn trusting_nothing() -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    )
}
