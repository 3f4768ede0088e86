//! The cluster CA: one ECDSA P-256 key the server keeps (`ca.key`, 0600) and its
//! self-signed certificate (`ca.crt`), which every client of the cluster trusts.
//!
//! It signs two kinds of certificate, both short of the CA's own life:
//! - the server's, for its API's addresses (made afresh at every server start);
//! - a node's, for the public key the agent made and sent at join: CN and DNS name the
//!   node, IP SAN its address, usable to serve and to connect. The agent's private key
//!   never leaves its node; the server records the digest of what it issued, and from
//!   then on only a connection presenting that certificate acts as the node.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm,
};

use crate::files::{write_private, write_public};
use crate::{TlsError, cert_digest, now_s};

/// Life of the CA certificate: ten years.
pub const CA_TTL_S: u64 = 10 * 365 * 24 * 3600;
/// Certificates are dated this much before their issue, for clocks a little behind.
const BACKDATE_S: u64 = 300;
/// The CA's subject. Fixed: a loaded key is re-attached to the same issuer name.
const CA_NAME: &str = "avail cluster CA";

/// A certificate the CA issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its digest ([`cert_digest`]).
    pub digest: String,
    /// Not valid after, seconds since the Unix epoch.
    pub not_after_s: u64,
}

/// The cluster's certificate authority.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

fn ca_params(not_before_s: u64) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = time_of(not_before_s)?;
    p.not_after = time_of(not_before_s + CA_TTL_S)?;
    Ok(p)
}

fn time_of(s: u64) -> Result<time::OffsetDateTime, TlsError> {
    time::OffsetDateTime::from_unix_timestamp(s as i64).map_err(|e| TlsError::bad("date", e))
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source works");
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

/// A raw P-256 public key (the uncompressed point an agent sends at join).
struct RawP256<'a>(&'a [u8]);

impl PublicKeyData for RawP256<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Check that `raw` is an uncompressed P-256 point (65 bytes, `0x04 || x || y`).
pub fn check_public_key(raw: &[u8]) -> Result<(), String> {
    if raw.len() != 65 || raw[0] != 0x04 {
        return Err(format!(
            "expected an uncompressed P-256 point (65 bytes starting 0x04), found {} bytes",
            raw.len()
        ));
    }
    Ok(())
}

impl ClusterCa {
    /// Load `<dir>/ca.key` and `<dir>/ca.crt`, or create both when neither exists.
    /// One without the other is refused: a half-made CA is not silently replaced.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa, TlsError> {
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.crt");
        let file_err = |p: &Path, e: &dyn std::fmt::Display| TlsError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        };
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => {
                let key_pem =
                    std::fs::read_to_string(&key_path).map_err(|e| file_err(&key_path, &e))?;
                let cert_pem =
                    std::fs::read_to_string(&cert_path).map_err(|e| file_err(&cert_path, &e))?;
                let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&key_path, &e))?;
                // Only the name, key usages and key id method matter to the issuer.
                let issuer = Issuer::new(ca_params(0)?, key);
                Ok(ClusterCa { issuer, cert_pem })
            }
            (false, false) => {
                let key = KeyPair::generate().map_err(|e| TlsError::bad("CA key", e))?;
                let mut params = ca_params(now_s().saturating_sub(BACKDATE_S))?;
                params.serial_number = Some(serial());
                let cert = params
                    .self_signed(&key)
                    .map_err(|e| TlsError::bad("CA certificate", e))?;
                write_private(&key_path, key.serialize_pem().as_bytes())
                    .map_err(|e| file_err(&key_path, &e))?;
                write_public(&cert_path, cert.pem().as_bytes())
                    .map_err(|e| file_err(&cert_path, &e))?;
                Ok(ClusterCa {
                    issuer: Issuer::new(params, key),
                    cert_pem: cert.pem(),
                })
            }
            (has_key, _) => Err(file_err(
                if has_key { &cert_path } else { &key_path },
                &"missing while its pair exists: restore it, or move both away to make a new CA (every node must then join again)",
            )),
        }
    }

    /// The CA certificate, PEM: what clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `ips` and `localhost`, with a key made for it.
    /// Returns (certificate chain PEM, key PEM).
    pub fn issue_server(&self, ips: &[IpAddr], ttl_s: u64) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::bad("server key", e))?;
        let mut p = leaf_params("avail server", ttl_s)?;
        p.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        p.subject_alt_names.push(SanType::DnsName(
            "localhost".try_into().expect("a valid name"),
        ));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| TlsError::bad("server certificate", e))?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }

    /// A server's client certificate, for the calls one server makes to another (a
    /// follower relaying heartbeats to the leader), with a key made for it: CN and
    /// the one DNS name [`crate::peer::server_dns_name`] (`<id>.server.avail`), client
    /// use only. Returns (certificate chain PEM, key PEM).
    pub fn issue_server_client(&self, id: &str, ttl_s: u64) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::bad("server key", e))?;
        let mut p = leaf_params(id, ttl_s)?;
        p.subject_alt_names = vec![SanType::DnsName(
            crate::peer::server_dns_name(id)
                .try_into()
                .map_err(|e| TlsError::bad("server id", e))?,
        )];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| TlsError::bad("server client certificate", e))?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }

    /// A node's certificate for the raw P-256 public key it sent: CN `name` and the one
    /// DNS name [`crate::peer::node_dns_name`] (`<name>.node.avail`), for both serving
    /// and connecting. No IP address and no name outside `.node.avail`: a node's
    /// certificate can never pass for the API server's (its IPs, `localhost`) nor for
    /// another node's.
    pub fn issue_node(
        &self,
        name: &str,
        public_key: &[u8],
        ttl_s: u64,
    ) -> Result<Issued, TlsError> {
        check_public_key(public_key).map_err(|e| TlsError::bad("node public key", e))?;
        let mut p = leaf_params(name, ttl_s)?;
        p.subject_alt_names = vec![SanType::DnsName(
            crate::peer::node_dns_name(name)
                .try_into()
                .map_err(|e| TlsError::bad("node name", e))?,
        )];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let not_after_s = p.not_after.unix_timestamp() as u64;
        let cert = p
            .signed_by(&RawP256(public_key), &self.issuer)
            .map_err(|e| TlsError::bad("node certificate", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            digest: cert_digest(cert.der()),
            not_after_s,
        })
    }
}

fn leaf_params(cn: &str, ttl_s: u64) -> Result<CertificateParams, TlsError> {
    let now = now_s();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(serial());
    p.not_before = time_of(now.saturating_sub(BACKDATE_S))?;
    p.not_after = time_of(now + ttl_s.min(CA_TTL_S))?;
    Ok(p)
}
