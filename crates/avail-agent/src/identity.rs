//! The node's identity on the agent's side: its key (`node.key`, 0600, made at the
//! first start), the certificate the server signed for it (`node.crt`), the client
//! that presents it on every call to the server, and its renewal at half-life.
//!
//! A join sends the public key, a join token when the agent has one, and a proof by
//! the key (the server takes the proof for a name the key already holds, the token for
//! a free name). See `avail_server::identity` for the server's side.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use avail_client::Client;
use avail_model::agent::{JoinRequest, KeyProof, RenewRequest, RenewResponse};
use avail_tls::{NodeCert, NodeKey};

use crate::{AgentConfig, AgentError};

/// The node's key and the certificate it presents.
pub struct Identity {
    key: NodeKey,
    presented: Arc<NodeCert>,
    cert_path: PathBuf,
    ca_pem: String,
    server: Client,
}

fn setup(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::Driver(format!("{what}: {e}"))
}

impl Identity {
    /// Load the node's key from its data dir, making it on the first start.
    pub fn load(cfg: &AgentConfig) -> Result<Identity, AgentError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| setup(&cfg.data_dir.display().to_string(), e))?;
        let key = NodeKey::load_or_create(&cfg.data_dir.join("node.key"))
            .map_err(|e| setup("node key", e))?;
        // Checked now: a wrong CA file is a start-up error, not a retry loop.
        avail_tls::config::parse_certs(&cfg.ca_pem).map_err(|e| setup("--ca-file", e))?;
        let presented = NodeCert::new();
        let tls = avail_tls::client_config(&cfg.ca_pem, Some(presented.clone()))
            .map_err(|e| setup("TLS", e))?;
        Ok(Identity {
            key,
            presented,
            cert_path: cfg.data_dir.join("node.crt"),
            ca_pem: cfg.ca_pem.clone(),
            // Every agent call is safe to repeat on another server.
            server: Client::with_tls(&cfg.server, None, Some(cfg.addr), Some(tls))
                .for_node(&cfg.name)
                .repeatable(),
        })
    }

    /// The node's certificate, as presented to the server and to peers (renewed in
    /// place).
    pub fn node_cert(&self) -> Arc<NodeCert> {
        self.presented.clone()
    }

    /// The client for the server's agent calls: TLS verified against the cluster CA,
    /// presenting the node's certificate, naming the node. Its clones share one pool
    /// of connections, renewed with the certificate.
    pub fn server_client(&self) -> Client {
        self.server.clone()
    }

    /// The client a join is sent with: verified against the cluster CA, presenting no
    /// certificate (the one it holds may have expired), with the join token if any.
    pub fn join_client(&self, cfg: &AgentConfig) -> Result<Client, AgentError> {
        let tls = avail_tls::client_config(&self.ca_pem, None).map_err(|e| setup("TLS", e))?;
        Ok(Client::with_tls(
            &cfg.server,
            cfg.join_token.clone(),
            Some(cfg.addr),
            Some(tls),
        ))
    }

    /// The join request: the agent's declarations, its key and a fresh proof.
    pub fn join_request(&self, cfg: &AgentConfig) -> JoinRequest {
        let public_key = self.key.public_b64();
        let time_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let proof = KeyProof {
            time_s,
            signature: self.key.prove(&avail_tls::node_key::proof_message(
                &cfg.name,
                &public_key,
                time_s,
            )),
        };
        JoinRequest {
            name: cfg.name.clone(),
            address: cfg.addr.to_string(),
            ingress_url: format!(
                "http://{}",
                std::net::SocketAddr::new(cfg.addr, cfg.ingress_port)
            ),
            tags: cfg.tags.clone(),
            capacity: cfg.capacity,
            max_workloads: cfg.max_workloads,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            boot_id: cfg.boot_id.clone(),
            replication_addr: std::net::SocketAddr::new(cfg.addr, cfg.replication_port).to_string(),
            public_key,
            proof: Some(proof),
        }
    }

    /// Present `cert_pem` from now on, on new connections only (the pooled ones, made
    /// with the old certificate, close once idle), and keep it in `node.crt`.
    pub fn adopt(&self, cert_pem: &str) -> Result<(), AgentError> {
        self.presented
            .set(cert_pem, &self.key.private_pem())
            .map_err(|e| setup("node certificate", e))?;
        self.server.renew_connections();
        avail_tls::files::write_public(&self.cert_path, cert_pem.as_bytes())
            .map_err(|e| setup(&self.cert_path.display().to_string(), e))
    }

    /// Renew the certificate at half its remaining life, for as long as the agent
    /// runs. A failed renewal is tried again every 5 s; an expired certificate makes
    /// the heartbeat fail with 401, and the agent then re-joins with its key's proof.
    /// `renewed` runs after each renewal (the peers' connections are made anew).
    pub async fn renew_loop(self: Arc<Identity>, mut expires_s: u64, renewed: impl Fn()) {
        let client = self.server_client();
        loop {
            let now = now_s();
            let wait = expires_s.saturating_sub(now) / 2;
            tokio::time::sleep(Duration::from_secs(wait.max(5))).await;
            let req = RenewRequest {
                public_key: self.key.public_b64(),
            };
            match client
                .post::<_, RenewResponse>("/v1/agent/renew", &req)
                .await
            {
                Ok(r) => match self.adopt(&r.certificate) {
                    Ok(()) => {
                        tracing::info!("node certificate renewed");
                        expires_s = r.certificate_expires_s;
                        renewed();
                    }
                    Err(e) => tracing::warn!("renewal: {e}"),
                },
                Err(e) => tracing::warn!("renewal: {e}"),
            }
        }
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
