//! Connections to a node's peer port (mutual TLS, see `avail_tls::peer`), as the tests
//! of its trust need them: with the credentials a thief of some node's data dir holds,
//! or with none.

use std::sync::Arc;

use avail_tls::NodeCert;
use avail_tls::peer::{ALPN_HTTP, ALPN_REPLICATION, client_config, server_name};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::Cluster;

/// Whose certificate a connection presents.
#[derive(Clone, Copy, Debug)]
pub enum As {
    /// None at all.
    Anonymous,
    /// Agent `i`'s (its `node.crt` and `node.key`).
    Node(usize),
}

/// Which protocol a connection asks for.
#[derive(Clone, Copy, Debug)]
pub enum Alpn {
    /// A replication link.
    Replication,
    /// HTTP (forwarded requests, the contact probe).
    Http,
}

/// The certificate of agent `i`, read from its data dir.
pub fn node_cert(c: &Cluster, i: usize) -> Arc<NodeCert> {
    let dir = c.dir.path().join(Cluster::agent_name(i));
    let chain = std::fs::read_to_string(dir.join("node.crt")).expect("the agent's certificate");
    let key = avail_tls::NodeKey::load_or_create(&dir.join("node.key")).expect("the agent's key");
    let cert = NodeCert::new();
    cert.set(&chain, &key.private_pem())
        .expect("a usable key pair");
    cert
}

/// A TLS connection to agent `to`'s peer port, presenting `who`'s certificate and
/// verifying `to`'s name. An error is the handshake's (or the first read's: TLS 1.3
/// refuses a client certificate after the client thinks it is done).
pub async fn dial(
    c: &Cluster,
    who: As,
    to: usize,
    alpn: Alpn,
) -> std::io::Result<TlsStream<TcpStream>> {
    let ca = std::fs::read_to_string(c.ca_file()).expect("the cluster CA");
    let cert = match who {
        As::Anonymous => NodeCert::new(),
        As::Node(i) => node_cert(c, i),
    };
    let proto = match alpn {
        Alpn::Replication => ALPN_REPLICATION,
        Alpn::Http => ALPN_HTTP,
    };
    let cfg = client_config(&ca, cert, Some(proto)).expect("a client configuration");
    let tcp = TcpStream::connect(format!("{}:7481", c.agent_addr(to))).await?;
    let name = server_name(&Cluster::agent_name(to)).expect("a node name");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// One HTTP/1.1 `GET path` with `headers` over `stream` (closed after it): the status
/// and the body. By hand, so that a test controls every header that goes out.
pub async fn http_get<S>(mut stream: S, path: &str, headers: &[(&str, &str)]) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: peer\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .expect("send a request");
    let mut reply = Vec::new();
    // A peer that closes without TLS's close_notify ends the read with an error after
    // the reply: what was read counts.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_end(&mut reply),
    )
    .await;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
