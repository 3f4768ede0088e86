//! Node-to-node trust: mutual TLS on a node's peer port.
//!
//! Every node serves one peer port (by default 7481) where only other nodes come:
//! replication links (checkpoints of `ft` secondaries, `ha` standbys, live moves),
//! requests forwarded by another node's ingress, and the contact probe of fencing. Both
//! ends present their node certificate, signed by the cluster CA, and each checks the
//! other's *name*:
//!
//! ```text
//!  dialer (node a)                                   peer port of node b
//!  server name b.node.avail, ALPN avail-repl/1 -->   client certificate required,
//!  or http/1.1, presenting a's certificate            chained to the cluster CA;
//!                                                     its name checked per use
//! ```
//!
//! A node certificate names exactly one DNS name, `<node>.node.avail`
//! ([`node_dns_name`]), and no address: a node cannot pass for the API server, and one
//! node cannot pass for another. The dialer verifies the name of the node it meant to
//! reach ([`server_name`]); the listener checks the client's name against the node it
//! expects (a secondary's primary, the node a forwarded request says it comes from:
//! [`names_node`]).
//!
//! The protocol is chosen by ALPN: [`ALPN_REPLICATION`] for a replication link,
//! [`ALPN_HTTP`] for HTTP.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::TlsError;
use crate::config::{NodeCert, provider, roots};

/// The DNS domain under which node certificates are named.
pub const NODE_DOMAIN: &str = "node.avail";
/// ALPN of HTTP/1.1 on the peer port (forwarded requests, the contact probe); a
/// connection without ALPN is HTTP/1.1 too.
pub const ALPN_HTTP: &[u8] = b"http/1.1";
/// ALPN of a replication link on the peer port.
pub const ALPN_REPLICATION: &[u8] = b"avail-repl/1";

/// The one DNS name in node `name`'s certificate: `<name>.node.avail`.
pub fn node_dns_name(name: &str) -> String {
    format!("{name}.{NODE_DOMAIN}")
}

/// The server name a dialer verifies to reach node `name`.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(node_dns_name(name)).map_err(|e| TlsError::bad("node name", e))
}

/// The domain of the names in servers' client certificates.
pub const SERVER_DOMAIN: &str = "server.avail";

/// The one DNS name in the client certificate of server `id`: `<id>.server.avail`
/// (a node's certificate is only ever issued under `.node.avail`).
pub fn server_dns_name(id: &str) -> String {
    format!("{id}.{SERVER_DOMAIN}")
}

/// Whether the certificate `der` names node `name`. Only meaningful for a certificate
/// already verified against the cluster CA (a handshake's peer certificate).
pub fn names_node(der: &[u8], name: &str) -> bool {
    names_dns(der, &node_dns_name(name))
}

/// Whether the certificate `der` names server `id` ([`server_dns_name`]). Only
/// meaningful for a certificate already verified against the cluster CA.
pub fn names_server(der: &[u8], id: &str) -> bool {
    names_dns(der, &server_dns_name(id))
}

fn names_dns(der: &[u8], name: &str) -> bool {
    let Ok(dns) = ServerName::try_from(name.to_string()) else {
        return false;
    };
    let der = CertificateDer::from(der);
    webpki::EndEntityCert::try_from(&der)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&dns).is_ok())
}

/// The peer port's server side: presents `cert`, requires a client certificate chained
/// to `ca_pem`, offers both protocols. No session resumption: every connection proves
/// its certificate afresh (a resumed session would carry an old one).
pub fn server_config(ca_pem: &str, cert: Arc<NodeCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()
            .map_err(|e| TlsError::bad("client verifier", e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::bad("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![ALPN_REPLICATION.to_vec(), ALPN_HTTP.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A dialer's side: trusts only `ca_pem`, presents `cert`, asks for `alpn` (none:
/// HTTP/1.1, which is what the peer port assumes without ALPN, and what hyper's
/// connector wants to set itself).
pub fn client_config(
    ca_pem: &str,
    cert: Arc<NodeCert>,
    alpn: Option<&[u8]>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::bad("TLS versions", e))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_cert_resolver(cert);
    cfg.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A TCP stream that can move to another tokio runtime while a TLS session runs over
/// it: an `ft` replica's link is accepted on the agent's runtime and then served on the
/// replica's own thread, whose reactor must own the socket.
#[derive(Debug)]
pub struct MovableTcp(Option<TcpStream>);

impl MovableTcp {
    /// Wrap `stream`.
    pub fn new(stream: TcpStream) -> MovableTcp {
        MovableTcp(Some(stream))
    }

    /// Register the socket with the runtime this is called on (a no-op in effect when
    /// it is already there). On failure the socket is gone and every later read or
    /// write fails.
    pub fn rehome(&mut self) -> std::io::Result<()> {
        let s = self.0.take().ok_or_else(gone)?;
        let std = s.into_std()?;
        self.0 = Some(TcpStream::from_std(std)?);
        Ok(())
    }

    /// The socket.
    pub fn get_ref(&self) -> Option<&TcpStream> {
        self.0.as_ref()
    }

    fn inner(self: Pin<&mut Self>) -> std::io::Result<Pin<&mut TcpStream>> {
        match &mut self.get_mut().0 {
            Some(s) => Ok(Pin::new(s)),
            None => Err(gone()),
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "socket lost moving runtimes",
    )
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.inner() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.inner() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
