//! The other nodes, as this node reaches them: their peer ports (from the desired
//! state), and mutual TLS to them (`avail_tls::peer`).
//!
//! ```text
//!  ingress forward, contact probe --> http(name): HTTPS to <addr>, verifying <name>.node.avail
//!  ft / ha / move link            --> dial_link(name, addr): TLS, ALPN avail-repl/1
//!  peer port (listener)           <-- is_member(name): a forwarded request counts only from
//!                                     a node of the cluster whose certificate names it
//! ```
//!
//! One pooled HTTP client per peer (its server name fixed to the peer's): a peer that
//! leaves or moves its port loses its client; a renewed certificate of this node drops
//! them all, so that no connection goes on presenting the old one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use avail_model::agent::PeerNode;
use avail_tls::peer::{self, ALPN_REPLICATION};
use avail_tls::{MovableTcp, NodeCert};
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_rustls::{TlsConnector, TlsStream};

/// An HTTP client to one peer.
pub type PeerClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A replication link: TLS over a socket that can move to a replica's runtime.
pub type Link = TlsStream<MovableTcp>;

/// How long a link's TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a link's TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// The other nodes and the TLS that reaches them.
pub struct Peers {
    me: String,
    local: IpAddr,
    ca_pem: String,
    cert: Arc<NodeCert>,
    http_tls: Arc<rustls::ClientConfig>,
    link_tls: Arc<rustls::ClientConfig>,
    /// Name -> peer port.
    table: RwLock<HashMap<String, String>>,
    clients: Mutex<HashMap<String, PeerClient>>,
}

impl Peers {
    /// Peers of node `me` (connections from `local`), trusting `ca_pem`, presenting
    /// `cert`.
    pub fn new(
        me: &str,
        local: IpAddr,
        ca_pem: &str,
        cert: Arc<NodeCert>,
    ) -> Result<Peers, avail_tls::TlsError> {
        Ok(Peers {
            me: me.to_string(),
            local,
            http_tls: peer::client_config(ca_pem, cert.clone(), None)?,
            link_tls: peer::client_config(ca_pem, cert.clone(), Some(ALPN_REPLICATION))?,
            ca_pem: ca_pem.to_string(),
            cert,
            table: RwLock::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The peer port's server side: this node's certificate, peers' certificates
    /// required.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, avail_tls::TlsError> {
        peer::server_config(&self.ca_pem, self.cert.clone())
    }

    /// The cluster's nodes now: a node gone or at another port loses its client.
    pub fn set(&self, nodes: &[PeerNode]) {
        let table: HashMap<String, String> = nodes
            .iter()
            .map(|n| (n.name.clone(), n.addr.clone()))
            .collect();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut old = self.table.write().unwrap_or_else(|p| p.into_inner());
        clients.retain(|name, _| table.get(name) == old.get(name));
        *old = table;
    }

    /// Whether `name` is a node of the cluster (this one included).
    pub fn is_member(&self, name: &str) -> bool {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// The peer port of node `name`.
    pub fn addr(&self, name: &str) -> Option<String> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every other node's name.
    pub fn others(&self) -> Vec<String> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|n| **n != self.me)
            .cloned()
            .collect()
    }

    /// The HTTP client of node `name` and its base URL (`https://<peer port>`).
    pub fn http(&self, name: &str) -> Option<(PeerClient, String)> {
        let addr = self.addr(name)?;
        let base = format!("https://{addr}");
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(name) {
            return Some((c.clone(), base));
        }
        let server_name = peer::server_name(name).ok()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_local_address(Some(self.local));
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.http_tls).clone())
            .https_only()
            .with_server_name_resolver(FixedServerNameResolver::new(server_name))
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        clients.insert(name.to_string(), client.clone());
        Some((client, base))
    }

    /// This node's certificate was renewed: new connections from now on.
    pub fn renew(&self) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// A replication link to node `name` at `target`, from this node's address, on the
    /// runtime this is called on: TCP, then TLS verifying `<name>.node.avail`.
    pub async fn dial_link(&self, name: &str, target: SocketAddr) -> std::io::Result<Link> {
        let sock = if self.local.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_nodelay(true)?;
        sock.bind(SocketAddr::new(self.local, 0))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let server_name = peer::server_name(name).map_err(std::io::Error::other)?;
        let tls =
            TlsConnector::from(self.link_tls.clone()).connect(server_name, MovableTcp::new(tcp));
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(TlsStream::Client(tls))
    }
}
