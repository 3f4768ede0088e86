//! The bounded serving loop: connection cap, handshake, header and idle timeouts, and
//! the verified peer certificate handed to handlers. Real sockets on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use avail_tls::serve::{Limits, PeerCert, serve};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn start(limits: Limits, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> SocketAddr {
    let app = axum::Router::new().route(
        "/",
        get(|peer: Option<axum::Extension<PeerCert>>| async move {
            peer.map(|p| p.0.digest)
                .unwrap_or_else(|| "anonymous".into())
        }),
    );
    let l = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(l, tls, app, limits));
    addr
}

/// Whether the server closes `s` within `deadline` (reads end or fail).
async fn closed_within(s: &mut TcpStream, deadline: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn get_ok(s: &mut TcpStream) -> bool {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200")
}

fn long() -> Limits {
    Limits {
        max_connections: 2,
        max_per_ip: 100,
        handshake_timeout: Duration::from_secs(60),
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_slots_come_back() {
    let addr = start(long(), None).await;
    let mut a = TcpStream::connect(addr).await.unwrap();
    let mut b = TcpStream::connect(addr).await.unwrap();
    assert!(get_ok(&mut a).await && get_ok(&mut b).await);
    // The third is closed at once (well before any timeout of 60 s).
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(10)).await);
    drop((a, b));
    // Freed slots take new connections.
    let ok = served_again(addr).await;
    assert!(ok, "a new connection is served once the others closed");
}

/// One address holding its share of connections does not lock out another address.
#[tokio::test]
async fn one_address_cannot_take_every_slot() {
    let limits = Limits {
        max_connections: 10,
        max_per_ip: 2,
        ..long()
    };
    let addr = start(limits, None).await;
    let mut a = TcpStream::connect(addr).await.unwrap();
    let mut b = TcpStream::connect(addr).await.unwrap();
    assert!(get_ok(&mut a).await && get_ok(&mut b).await);
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(10)).await);
    // Another loopback address is served meanwhile.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((Ipv4Addr::new(127, 0, 0, 2), 0).into()).unwrap();
    let mut other = sock.connect(addr).await.unwrap();
    assert!(get_ok(&mut other).await);
    drop((a, b));
    assert!(served_again(addr).await);
}

async fn served_again(addr: SocketAddr) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if get_ok(&mut s).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let limits = Limits {
        max_connections: 100,
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(800),
        ..long()
    };
    let addr = start(limits, None).await;
    // Slowloris: a request's headers never end.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(10)).await);
    // A kept-alive connection that goes quiet after a request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert!(get_ok(&mut idle).await);
    assert!(closed_within(&mut idle, Duration::from_secs(10)).await);
    // A connection that never says anything.
    let mut mute = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut mute, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn tls_handshakes_are_bounded_and_client_certificates_reach_handlers() {
    let d = tempfile::tempdir().unwrap();
    let ca = avail_tls::ClusterCa::load_or_create(d.path()).unwrap();
    let (chain, key) = ca.issue_server(&[LO], 3600).unwrap();
    let scfg = avail_tls::server_config(&chain, &key, Some(ca.cert_pem())).unwrap();
    let limits = Limits {
        max_connections: 100,
        handshake_timeout: Duration::from_millis(500),
        ..long()
    };
    let addr = start(limits, Some(scfg)).await;
    // A socket that never starts its handshake is closed.
    let mut mute = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut mute, Duration::from_secs(10)).await);
    // A node certificate reaches the handler as its digest.
    let node = avail_tls::NodeKey::load_or_create(&d.path().join("n.key")).unwrap();
    let issued = ca.issue_node("n1", node.public_raw(), 3600).unwrap();
    let id = avail_tls::NodeCert::new();
    id.set(&issued.cert_pem, &node.private_pem()).unwrap();
    let ccfg = avail_tls::client_config(ca.cert_pem(), Some(id)).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(ccfg)
        .connect(rustls::pki_types::ServerName::IpAddress(LO.into()), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.ok();
    assert!(reply.ends_with(&issued.digest), "{reply}");
}
