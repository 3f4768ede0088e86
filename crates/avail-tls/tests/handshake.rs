//! The CA, a node key and both rustls ends, over a real loopback connection.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;

use avail_tls::{ClusterCa, NodeCert, NodeKey, client_config, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[test]
fn ca_files_are_kept_private_and_reloaded() {
    let d = tempfile::tempdir().unwrap();
    let a = ClusterCa::load_or_create(d.path()).unwrap();
    let b = ClusterCa::load_or_create(d.path()).unwrap();
    assert_eq!(a.cert_pem(), b.cert_pem());
    let mode = |f: &str| {
        std::fs::metadata(d.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca.key"), 0o600);
    assert_eq!(mode("ca.crt"), 0o644);
    // A certificate issued by the reloaded CA chains to the first one's certificate:
    // checked by the handshake test below with the reloaded issuer.
    std::fs::remove_file(d.path().join("ca.crt")).unwrap();
    let e = ClusterCa::load_or_create(d.path()).unwrap_err().to_string();
    assert!(e.contains("ca.crt"), "{e}");
}

#[test]
fn node_keys_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(d.path()).unwrap();
    for bad in [&[][..], &[4u8; 64][..], &[2u8; 65][..]] {
        assert!(ca.issue_node("node-1", bad, 3600).is_err());
    }
}

async fn handshake(
    ca: &ClusterCa,
    server_ca: &ClusterCa,
    present: bool,
) -> Result<Option<String>, String> {
    let d = tempfile::tempdir().unwrap();
    let (chain, key) = server_ca.issue_server(&[LO], 3600).unwrap();
    let scfg = server_config(&chain, &key, Some(server_ca.cert_pem())).unwrap();
    let node = NodeKey::load_or_create(&d.path().join("node.key")).unwrap();
    let issued = ca.issue_node("node-1", node.public_raw(), 3600).unwrap();
    let id = NodeCert::new();
    if present {
        id.set(&issued.cert_pem, &node.private_pem()).unwrap();
    }
    let ccfg = client_config(server_ca.cert_pem(), Some(id)).unwrap();
    let listener = tokio::net::TcpListener::bind((LO, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(scfg)
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let digest = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| avail_tls::cert_digest(c));
        let mut b = [0u8; 2];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(digest)
    });
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(LO.into());
    let client = async {
        let mut tls = TlsConnector::from(ccfg)
            .connect(name, s)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hi").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())
    };
    let c = client.await;
    let s = server.await.unwrap();
    c?;
    let got = s?;
    if let Some(g) = &got {
        assert_eq!(g, &issued.digest);
    }
    Ok(got)
}

#[tokio::test]
async fn node_certificate_is_verified_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(d.path()).unwrap();
    let reloaded = ClusterCa::load_or_create(d.path()).unwrap();
    // Issued by the reloaded CA, verified against the original certificate.
    assert!(handshake(&reloaded, &ca, true).await.unwrap().is_some());
    // No certificate: let in, with no peer identity.
    assert_eq!(handshake(&ca, &ca, false).await.unwrap(), None);
    // A certificate from another cluster's CA is refused.
    let other_dir = tempfile::tempdir().unwrap();
    let other = ClusterCa::load_or_create(other_dir.path()).unwrap();
    assert!(handshake(&other, &ca, true).await.is_err());
}
