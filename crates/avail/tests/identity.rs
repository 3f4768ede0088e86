//! Node identity, replayed as an attacker would: with a join token, with a node's own
//! files, or with a socket to the API. Real processes, real TLS.

use std::time::Duration;

use avail_client::Client;
use avail_model::agent::{JoinRequest, KeyProof};
use avail_model::{Node, NodeState};
use avail_testkit::{Cluster, Proc, ok, wait_until};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

/// Wait until `p` exits, failed; its output.
async fn exits(p: &mut Proc) -> String {
    p.failed_exit(Duration::from_secs(20)).await
}

async fn node(c: &Cluster, name: &str) -> Node {
    c.client().get(&format!("/v1/nodes/{name}")).await.unwrap()
}

#[tokio::test]
async fn join_tokens_are_bounded_and_held_names_cannot_be_taken() {
    let mut c = Cluster::start(BIN.as_ref(), 2).await;
    let dir = c.dir.path().to_path_buf();

    // A token for one join: the first new node joins, a second one is refused.
    let once = ok(&c.cli(&["token", "create", "--uses", "1", "--ttl", "10m"]));
    let once = once.trim();
    assert!(once.starts_with("avj."), "{once}");
    let tags = ["--tags".to_string(), Cluster::agent_tags(2)];
    let mut third = c.spawn_agent_as(2, "node-3", &dir.join("node-3"), Some(once), &tags);
    c.wait_nodes_ready(3).await;
    let mut fourth = c.spawn_agent_as(3, "node-4", &dir.join("node-4"), Some(once), &[]);
    assert!(exits(&mut fourth).await.contains("used up"));
    let listed = ok(&c.cli(&["token", "list", "-o", "json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| once.contains(t["id"].as_str().unwrap()))
        .unwrap();
    assert_eq!(
        (entry["uses_left"].as_u64(), entry["used"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(entry["nodes"][0], "node-3");
    assert!(
        !listed
            .to_string()
            .contains(once.rsplit('.').next().unwrap()),
        "no secret listed"
    );

    // A node may not declare a tag only an administrator sets: refused, naming it.
    let pci = [
        "--tags".to_string(),
        "compliance=pci,zone=tokyo".to_string(),
    ];
    let fake = c.create_join_token(1, 600).await;
    let mut fake_pci = c.spawn_agent_as(3, "node-pci", &dir.join("node-pci"), Some(&fake), &pci);
    let out = exits(&mut fake_pci).await;
    assert!(
        out.contains("tags.compliance") && out.contains("avail node tag"),
        "{out}"
    );
    let nodes: Vec<Node> = c.client().get("/v1/nodes").await.unwrap();
    assert!(nodes.iter().all(|n| n.name != "node-pci"));
    // The administrator sets it, and it outlives the node's re-joins (here one that
    // moves the node to another address, which only its key may do).
    ok(&c.cli(&["node", "tag", "node-3", "compliance=pci"]));
    third.kill();
    let mut third = c.spawn_agent_as(4, "node-3", &dir.join("node-3"), None, &tags);
    let moved = c.agent_addr(4);
    wait_until(
        "node-3 re-joined at its new address",
        Duration::from_secs(20),
        || {
            let (c, moved) = (&c, moved.clone());
            async move {
                let n = node(c, "node-3").await;
                if n.address == moved && n.state == NodeState::Ready {
                    Ok(())
                } else {
                    Err(format!("{} {:?}", n.address, n.state))
                }
            }
        },
    )
    .await;
    assert_eq!(
        node(&c, "node-3")
            .await
            .tags
            .get("compliance")
            .map(String::as_str),
        Some("pci")
    );

    // A revoked token is refused.
    let revoked = ok(&c.cli(&["token", "create"])).trim().to_string();
    let id = revoked.split('.').nth(1).unwrap();
    ok(&c.cli(&["token", "revoke", id]));
    let mut late = c.spawn_agent_as(3, "node-4", &dir.join("node-4b"), Some(&revoked), &[]);
    assert!(exits(&mut late).await.contains("revoked"));

    // A valid token does not take a live node's name: refused, and node-1 keeps its
    // address, routes and replication link.
    let fresh = c.create_join_token(10, 600).await;
    let before = node(&c, "node-1").await;
    let mut squat = c.spawn_agent_as(3, "node-1", &dir.join("squatter"), Some(&fresh), &[]);
    let out = exits(&mut squat).await;
    assert!(
        out.contains("node-1 exists") && out.contains("avail node rm"),
        "{out}"
    );
    let after = node(&c, "node-1").await;
    assert_eq!(
        (after.address.clone(), after.state),
        (before.address.clone(), NodeState::Ready)
    );

    // Nor a down node's: node-2 dies, its name stays its own.
    c.kill_agent(1);
    c.wait_node_state("node-2", NodeState::Down, Duration::from_secs(20))
        .await;
    let mut squat = c.spawn_agent_as(3, "node-2", &dir.join("squatter2"), Some(&fresh), &[]);
    assert!(exits(&mut squat).await.contains("node-2 exists"));

    // A node that holds a workload is not removed; an empty one is, and its name is
    // then free for a join token.
    ok(&c.cli(&[
        "workload",
        "run",
        "--name",
        "w",
        "--driver",
        "wasm",
        "--artifact",
        &avail_testkit::guest("counter"),
        "--constraint",
        "rack == r3",
    ]));
    let out = c.cli(&["node", "rm", "node-3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("still holds w"));
    ok(&c.cli(&["node", "rm", "node-2"]));
    let mut new2 = c.spawn_agent_as(3, "node-2", &dir.join("new2"), Some(&fresh), &[]);
    c.wait_node_state("node-2", NodeState::Ready, Duration::from_secs(20))
        .await;
    assert_eq!(node(&c, "node-2").await.address, c.agent_addr(3));
    new2.kill();
    third.kill();
}

/// A client presenting the node certificate kept in `data_dir`, naming `claim`.
fn as_node(c: &Cluster, data_dir: &std::path::Path, claim: &str) -> Client {
    let id = avail_tls::NodeCert::new();
    id.set(
        &std::fs::read_to_string(data_dir.join("node.crt")).unwrap(),
        &std::fs::read_to_string(data_dir.join("node.key")).unwrap(),
    )
    .unwrap();
    let ca = std::fs::read_to_string(c.ca_file()).unwrap();
    let tls = avail_tls::client_config(&ca, Some(id)).unwrap();
    Client::with_tls(&c.server_url(), None, None, Some(tls)).for_node(claim)
}

async fn heartbeat_status(client: &Client) -> u16 {
    let body = br#"{"instances":[],"logs":[],"fences":[]}"#;
    client
        .raw(
            Method::POST,
            "/v1/agent/heartbeat",
            Some((body.to_vec().into(), "application/json")),
            &[],
        )
        .await
        .map(|r| r.status.as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn only_a_nodes_own_key_speaks_for_it() {
    let c = Cluster::start(BIN.as_ref(), 2).await;
    let dir = c.dir.path().to_path_buf();

    // Node-2's own certificate speaks for node-2, never for node-1.
    assert_eq!(
        heartbeat_status(&as_node(&c, &dir.join("node-2"), "node-2")).await,
        200
    );
    assert_eq!(
        heartbeat_status(&as_node(&c, &dir.join("node-2"), "node-1")).await,
        401
    );
    // Neither an admin token nor a join token is an agent.
    for token in [c.admin_token.clone(), c.join_token()] {
        let r = c.api(Some(token)).for_node("node-1");
        assert_eq!(heartbeat_status(&r).await, 401);
    }

    // A re-join as node-1 with another key, even with a valid join token, is refused
    // and changes nothing.
    let before = node(&c, "node-1").await;
    let key = avail_tls::NodeKey::load_or_create(&dir.join("evil.key")).unwrap();
    let now = avail_server::now_s();
    let mut req = JoinRequest {
        name: "node-1".into(),
        address: c.agent_addr(1),
        ingress_url: format!("http://{}:9999", c.agent_addr(1)),
        tags: [("perf".to_string(), "high".to_string())].into(),
        capacity: avail_model::Resources {
            cpu_millis: 1_000_000,
            memory_mib: 1 << 20,
        },
        max_workloads: 110,
        agent_version: "evil".into(),
        boot_id: "evil".into(),
        replication_addr: format!("{}:9998", c.agent_addr(1)),
        public_key: key.public_b64(),
        proof: Some(KeyProof {
            time_s: now,
            signature: key.prove(&avail_tls::node_key::proof_message(
                "node-1",
                &key.public_b64(),
                now,
            )),
        }),
    };
    let joiner = c.api(Some(c.join_token()));
    let e = joiner
        .post::<_, serde_json::Value>("/v1/agent/join", &req)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    // Node-1's real public key with a proof by the attacker's key: refused.
    let real = std::fs::read_to_string(dir.join("node-1").join("node.crt")).unwrap();
    assert!(!real.is_empty());
    let node1_key = avail_tls::NodeKey::load_or_create(&dir.join("node-1").join("node.key"))
        .unwrap()
        .public_b64();
    req.public_key = node1_key;
    let e = joiner
        .post::<_, serde_json::Value>("/v1/agent/join", &req)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let after = node(&c, "node-1").await;
    assert_eq!(
        (after.address, after.tags, after.capacity),
        (before.address, before.tags, before.capacity)
    );

    // The API speaks TLS only, with the cluster's certificate.
    let plain = Client::new(&c.server_url().replace("https://", "http://"), None, None)
        .with_timeout(Duration::from_secs(5));
    assert!(
        plain
            .raw(Method::GET, "/livez", None, &[])
            .await
            .is_ok_and(|r| r.status != 200)
            || plain.raw(Method::GET, "/livez", None, &[]).await.is_err()
    );
    let untrusting = Client::new(&c.server_url(), None, None);
    let e = untrusting
        .raw(Method::GET, "/livez", None, &[])
        .await
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test]
async fn node_certificates_are_renewed_and_old_ones_expire() {
    let c = Cluster::start_full(
        BIN.as_ref(),
        1,
        vec![],
        vec!["--node-cert-ttl-s".into(), "10".into()],
    )
    .await;
    let dir = c.dir.path().to_path_buf();
    let first = std::fs::read_to_string(dir.join("node-1").join("node.crt")).unwrap();
    // Renewed (at half-life) twice over, and the node never leaves `ready`.
    wait_until("two renewals", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(dir.join("node-1.log")).unwrap_or_default();
        async move {
            let n = log.matches("node certificate renewed").count();
            if n >= 2 {
                Ok(())
            } else {
                Err(format!("{n} renewals"))
            }
        }
    })
    .await;
    assert_eq!(node(&c, "node-1").await.state, NodeState::Ready);
    let now = std::fs::read_to_string(dir.join("node-1").join("node.crt")).unwrap();
    assert_ne!(first, now);
    // The first certificate is two renewals old: it no longer speaks for the node
    // (refused at the handshake once expired, by the server before).
    let old_dir = dir.join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::write(old_dir.join("node.crt"), &first).unwrap();
    std::fs::copy(
        dir.join("node-1").join("node.key"),
        old_dir.join("node.key"),
    )
    .unwrap();
    assert_ne!(
        heartbeat_status(&as_node(&c, &old_dir, "node-1")).await,
        200
    );
    assert_eq!(
        heartbeat_status(&as_node(&c, &dir.join("node-1"), "node-1")).await,
        200
    );
}

/// A process workload that answers every `GET` with the request's headers (lowercased).
const ECHO_HEADERS: &str = r#"exec python3 -c 'import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        b = str(s.headers).lower().encode()
        s.send_response(200); s.send_header("content-length", str(len(b))); s.end_headers(); s.wfile.write(b)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()'"#;

/// The ingress's two doors, attacked. On the public port the internal headers a client
/// sends count for nothing (a forged `avail-forwarded` does not stop forwarding, neither
/// it nor `avail-delivered` reaches the workload) and there is no contact probe. The
/// peer port speaks only to nodes of the cluster (mutual TLS), and a node may forward
/// only in its own name.
#[tokio::test]
async fn internal_headers_and_the_peer_port_count_only_from_nodes() {
    use avail_testkit::peer::{Alpn, As, dial, http_get};
    let c = Cluster::start(BIN.as_ref(), 2).await;
    ok(&c.run_sh("echo", ECHO_HEADERS, &[]));
    let node = c
        .wait_workload("echo", "running", Duration::from_secs(30), |w| {
            match (&w.status.phase, &w.status.node) {
                (avail_model::Phase::Running, Some(n)) => Ok(n.clone()),
                _ => Err(format!("{:?}", w.status)),
            }
        })
        .await;
    let here = avail_testkit::ft::index(&node);
    let other = 1 - here;
    let forged = [
        ("avail-forwarded", Cluster::agent_name(other)),
        ("avail-delivered", "k-1".to_string()),
    ];
    let forged: Vec<(&str, &str)> = forged.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Public port, both nodes: served (the other node forwards despite the forged
    // mark), and the workload sees neither internal header.
    for i in [here, other] {
        let ingress = Client::new(&c.ingress(i), None, None);
        let r = avail_testkit::until_ok(
            &ingress,
            Method::GET,
            "/w/echo/",
            None,
            &forged,
            Duration::from_secs(20),
        )
        .await;
        let seen = String::from_utf8_lossy(&r.body).into_owned();
        assert!(seen.contains("host:"), "{seen}");
        assert!(
            !seen.contains("avail-forwarded") && !seen.contains("avail-delivered"),
            "through node {i}: {seen}"
        );
        // No contact probe on the public port.
        let r = ingress
            .raw(Method::GET, "/_avail/contact", None, &[])
            .await
            .unwrap();
        assert_eq!(r.status, 404);
    }

    // The peer port: no certificate of the cluster, no conversation.
    let anon = match dial(&c, As::Anonymous, here, Alpn::Http).await {
        Ok(s) => http_get(s, "/w/echo/", &[]).await.0,
        Err(_) => 0,
    };
    assert_eq!(anon, 0, "an anonymous peer was answered");
    // A node forwarding in another node's name: 403. Nor may a node name itself.
    let other_name = Cluster::agent_name(other);
    for claim in [Cluster::agent_name(here), "node-9".into()] {
        let s = dial(&c, As::Node(other), here, Alpn::Http).await.unwrap();
        let (status, body) = http_get(s, "/w/echo/", &[("avail-forwarded", &claim)]).await;
        assert_eq!(status, 403, "claiming {claim}: {body}");
    }
    let s = dial(&c, As::Node(other), here, Alpn::Http).await.unwrap();
    let (status, body) = http_get(s, "/w/echo/", &[]).await;
    assert_eq!(status, 403, "unmarked: {body}");
    // In its own name: served, and the mark stops at the ingress.
    let s = dial(&c, As::Node(other), here, Alpn::Http).await.unwrap();
    let (status, body) = http_get(s, "/w/echo/", &[("avail-forwarded", &other_name)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("avail-forwarded"), "{body}");
    // The contact probe answers a node, typed.
    let s = dial(&c, As::Node(other), here, Alpn::Http).await.unwrap();
    let (status, body) = http_get(s, "/_avail/contact", &[]).await;
    assert_eq!(status, 200, "{body}");
    let reply: avail_model::agent::ContactReply = serde_json::from_str(&body).unwrap();
    assert!(reply.contact_age_ms < 60_000, "{reply:?}");
}
