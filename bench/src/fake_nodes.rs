//! Nodes without agents: each joins a real server with its own key and certificate
//! (a join token, a proof of the key) and is then spoken for by the benchmark, over its
//! own mutual-TLS connection from its own loopback address (the API bounds connections
//! per address). For control-plane benchmarks at 1,000s of nodes on one machine.

use std::collections::BTreeMap;
use std::time::Duration;

use avail_client::Client;
use avail_model::Resources;
use avail_model::agent::{Heartbeat, HeartbeatReply, JoinRequest, JoinResponse, KeyProof};
use avail_testkit::Cluster;

/// The loopback address of fake node `i` (127.250.0.1 and on: 250 per /24).
pub fn address(i: usize) -> String {
    format!("127.250.{}.{}", i / 250, 1 + i % 250)
}

/// Join node `name` (fake node `i`) with `tags` and a fresh key kept under `dir`,
/// through `joiner` (a client holding a join token): a client that speaks for it, from
/// its own address.
pub async fn join(
    c: &Cluster,
    dir: &std::path::Path,
    i: usize,
    name: &str,
    tags: BTreeMap<String, String>,
    joiner: &Client,
) -> Client {
    let key = avail_tls::NodeKey::load_or_create(&dir.join(name)).unwrap();
    let public_key = key.public_b64();
    let time_s = avail_server::now_s();
    let proof = KeyProof {
        time_s,
        signature: key.prove(&avail_tls::node_key::proof_message(
            name,
            &public_key,
            time_s,
        )),
    };
    let addr = address(i);
    let req = JoinRequest {
        name: name.to_string(),
        address: addr.clone(),
        ingress_url: format!("http://{addr}:7480"),
        tags,
        capacity: Resources {
            cpu_millis: 4000,
            memory_mib: 4096,
        },
        max_workloads: 110,
        agent_version: "bench".into(),
        boot_id: format!("boot-{i}"),
        replication_addr: format!("{addr}:7481"),
        public_key,
        proof: Some(proof),
    };
    let local: std::net::IpAddr = addr.parse().unwrap();
    let joined: JoinResponse = joiner.post("/v1/agent/join", &req).await.unwrap();
    let cert = avail_tls::NodeCert::new();
    cert.set(&joined.certificate, &key.private_pem()).unwrap();
    let pem = std::fs::read_to_string(c.ca_file()).unwrap();
    let tls = avail_tls::client_config(&pem, Some(cert)).unwrap();
    Client::with_tls(&c.server_url(), None, Some(local), Some(tls))
        .for_node(name)
        .with_timeout(Duration::from_secs(10))
}

/// An empty heartbeat of the node `client` speaks for.
pub async fn beat(client: &Client) {
    let hb = Heartbeat {
        instances: vec![],
        logs: vec![],
        fences: vec![],
    };
    let _: HeartbeatReply = client.post("/v1/agent/heartbeat", &hb).await.unwrap();
}

/// Keep every node of `clients` heartbeating once a second, spread evenly, until the
/// task is aborted. A heartbeat that fails is let go (the next one follows in a
/// second; the server's windows are set long for these benchmarks).
pub fn keep_alive(clients: std::sync::Arc<Vec<Client>>) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    tokio::spawn(async move {
        let gap = Duration::from_secs(1) / clients.len().max(1) as u32;
        let mut tick = tokio::time::interval(gap);
        // As an agent: one heartbeat in flight per node, the next one skipped while it
        // is (so a slow server is not sent a new connection per node per second).
        let busy: std::sync::Arc<Vec<AtomicBool>> =
            std::sync::Arc::new(clients.iter().map(|_| AtomicBool::new(false)).collect());
        loop {
            for (i, c) in clients.iter().enumerate() {
                tick.tick().await;
                if busy[i].swap(true, Ordering::AcqRel) {
                    continue;
                }
                let (c, busy) = (c.clone(), busy.clone());
                tokio::spawn(async move {
                    let hb = Heartbeat {
                        instances: vec![],
                        logs: vec![],
                        fences: vec![],
                    };
                    let _ = c
                        .post::<_, HeartbeatReply>("/v1/agent/heartbeat", &hb)
                        .await;
                    busy[i].store(false, Ordering::Release);
                });
            }
        }
    })
}

/// Join `n` nodes named `<prefix><i>` with the tags `tags_of(i)`, their keys kept under
/// `dir` (a join token takes 1,000 joins: a new one each 1,000): a client for each.
pub async fn join_many(
    c: &Cluster,
    dir: &std::path::Path,
    n: usize,
    prefix: &str,
    tags_of: impl Fn(usize) -> BTreeMap<String, String>,
) -> Vec<Client> {
    let mut joiner = None;
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        if i % 1000 == 0 {
            // One connection for the joins (one after another), kept alive: a
            // connection per join would hold thousands open until they idle out.
            let token = c.create_join_token(1000, 3600).await;
            joiner = Some(Client::with_tls(
                &c.server_url(),
                Some(token),
                None,
                Some(c.tls()),
            ));
        }
        let joiner = joiner.as_ref().expect("made at 0");
        clients.push(join(c, dir, i, &format!("{prefix}{i}"), tags_of(i), joiner).await);
    }
    clients
}
