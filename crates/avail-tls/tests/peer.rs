//! The peer port's mutual TLS, over real loopback sockets: node certificates name one
//! node and nothing else, a client certificate is required, ALPN picks HTTP or a
//! replication link, and a link's socket moves to another runtime mid-session.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use avail_tls::peer::{self, ALPN_HTTP, ALPN_REPLICATION};
use avail_tls::serve::{Limits, PeerCert, serve_peer};
use avail_tls::{ClusterCa, MovableTcp, NodeCert, NodeKey};
use axum::routing::get;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Cluster {
    _dir: tempfile::TempDir,
    ca: ClusterCa,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        Cluster { _dir: dir, ca }
    }

    /// Node `name`'s certificate and key, as its agent holds them.
    fn node(&self, name: &str) -> (Arc<NodeCert>, String) {
        let d = tempfile::tempdir().unwrap();
        let key = NodeKey::load_or_create(&d.path().join("k")).unwrap();
        let issued = self.ca.issue_node(name, key.public_raw(), 3600).unwrap();
        let cert = NodeCert::new();
        cert.set(&issued.cert_pem, &key.private_pem()).unwrap();
        (cert, issued.cert_pem)
    }
}

/// Node `name`'s peer port: HTTP answers the caller's node name check; replication
/// links arrive on the receiver.
async fn peer_port(
    c: &Cluster,
    name: &str,
) -> (
    SocketAddr,
    tokio::sync::mpsc::Receiver<avail_tls::serve::Handoff>,
) {
    let (cert, _) = c.node(name);
    let tls = peer::server_config(c.ca.cert_pem(), cert).unwrap();
    let app = axum::Router::new().route(
        "/is/{node}",
        get(
            |axum::extract::Path(node): axum::extract::Path<String>,
             cert: axum::Extension<PeerCert>| async move {
                cert.0.names_node(&node).to_string()
            },
        ),
    );
    let l = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(serve_peer(l, tls, app, Limits::default(), tx));
    (addr, rx)
}

async fn dial(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<MovableTcp>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(cfg).connect(name, MovableTcp::new(tcp)),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

async fn get_body<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.ok();
    reply
}

#[test]
fn a_node_certificate_names_its_node_only() {
    let c = Cluster::new();
    let (_, pem) = c.node("n1");
    let der = avail_tls::config::parse_certs(&pem).unwrap().remove(0);
    assert!(peer::names_node(&der, "n1"));
    assert!(!peer::names_node(&der, "n2"));
    // A name that would make another DNS name does not pass.
    assert!(!peer::names_node(&der, "n1.node"));
    assert!(!peer::names_node(&der, ""));
}

#[test]
fn server_and_node_certificates_never_pass_for_each_other() {
    let c = Cluster::new();
    let (chain, _key) = c.ca.issue_server_client("5eed", 3600).unwrap();
    let server = avail_tls::config::parse_certs(&chain).unwrap().remove(0);
    assert!(peer::names_server(&server, "5eed"));
    assert!(!peer::names_server(&server, "5eee"));
    assert!(!peer::names_node(&server, "5eed"));
    // A node named like a server's name is still only a node.
    for name in ["5eed", "5eed.server"] {
        let (_, pem) = c.node(name);
        let node = avail_tls::config::parse_certs(&pem).unwrap().remove(0);
        assert!(!peer::names_server(&node, "5eed"), "{name}");
    }
}

#[tokio::test]
async fn the_dialer_verifies_the_name_of_the_node_it_meant() {
    let c = Cluster::new();
    let (addr, _links) = peer_port(&c, "n2").await;
    let (mine, _) = c.node("n1");
    let cfg = peer::client_config(c.ca.cert_pem(), mine, Some(ALPN_HTTP)).unwrap();
    // The right name: the handler sees the dialer's certificate as n1's.
    let mut s = dial(cfg.clone(), addr, peer::server_name("n2").unwrap())
        .await
        .unwrap();
    assert!(get_body(&mut s, "/is/n1").await.ends_with("true"));
    let mut s = dial(cfg.clone(), addr, peer::server_name("n2").unwrap())
        .await
        .unwrap();
    assert!(get_body(&mut s, "/is/n3").await.ends_with("false"));
    // n2's port does not pass for n3, nor for its IP or localhost (the API server's
    // names).
    for wrong in [
        peer::server_name("n3").unwrap(),
        ServerName::IpAddress(LO.into()),
        ServerName::try_from("localhost").unwrap(),
    ] {
        assert!(dial(cfg.clone(), addr, wrong).await.is_err());
    }
}

#[tokio::test]
async fn a_client_without_a_cluster_certificate_is_refused() {
    let c = Cluster::new();
    let (addr, _links) = peer_port(&c, "n2").await;
    // No certificate at all.
    let anonymous = avail_tls::client_config(c.ca.cert_pem(), None).unwrap();
    let r = dial(anonymous, addr, peer::server_name("n2").unwrap()).await;
    let refused = match r {
        Err(_) => true,
        Ok(mut s) => !get_body(&mut s, "/is/n1").await.contains("200 OK"),
    };
    assert!(refused);
    // A node certificate of another cluster's CA.
    let other = Cluster::new();
    let (theirs, _) = other.node("n1");
    let cfg = peer::client_config(c.ca.cert_pem(), theirs, None).unwrap();
    let r = dial(cfg, addr, peer::server_name("n2").unwrap()).await;
    let refused = match r {
        Err(_) => true,
        Ok(mut s) => !get_body(&mut s, "/is/n1").await.contains("200 OK"),
    };
    assert!(refused);
}

/// A replication link is handed over with its certificate, and its socket moves to
/// another runtime (an ft replica's own thread) with the session going on.
#[tokio::test]
async fn replication_links_are_handed_over_and_move_runtimes() {
    let c = Cluster::new();
    let (addr, mut links) = peer_port(&c, "n2").await;
    let (mine, _) = c.node("n1");
    let cfg = peer::client_config(c.ca.cert_pem(), mine, Some(ALPN_REPLICATION)).unwrap();
    let mut s = dial(cfg, addr, peer::server_name("n2").unwrap())
        .await
        .unwrap();
    // TLS 1.3 with the fastest bulk cipher both ends prefer.
    let session = s.get_ref().1;
    assert_eq!(
        session.negotiated_cipher_suite().map(|c| c.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(session.alpn_protocol(), Some(ALPN_REPLICATION));
    s.write_all(b"hello").await.unwrap();
    s.flush().await.unwrap();
    let (link, cert) = tokio::time::timeout(Duration::from_secs(10), links.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(cert.names_node("n1") && !cert.names_node("n2"));
    // Served on another runtime, as a replica's thread does.
    let echoed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut link = tokio_rustls::TlsStream::Server(link);
            link.get_mut().0.rehome().unwrap();
            let mut buf = [0u8; 5];
            link.read_exact(&mut buf).await.unwrap();
            link.write_all(&buf).await.unwrap();
            link.flush().await.unwrap();
            buf
        })
    });
    let mut back = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"hello");
    assert_eq!(&echoed.join().unwrap(), b"hello");
}
