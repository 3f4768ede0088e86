//! End to end: a real 3-agent cluster on loopback, driven by the CLI and curl-like
//! requests through every agent's ingress.

use std::time::Duration;

use avail_client::Client;
use avail_model::{Node, NodeState, Phase, Workload};
use avail_testkit::{Cluster, descendants, guest, pid_alive, wait_until};
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "avail failed: {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn call(base: &str, method: Method, path: &str) -> avail_client::Reply {
    Client::new(base, None, None)
        .raw(method, path, None, &[])
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn json(r: &avail_client::Reply) -> serde_json::Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&r.body)))
}

fn header<'a>(r: &'a avail_client::Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn three_node_cluster_end_to_end() {
    let mut c = Cluster::start(BIN.as_ref(), 3).await;

    // Nodes are listed with their tags, all ready.
    let nodes: Vec<Node> = c.client().get("/v1/nodes").await.unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes
            .iter()
            .all(|n| n.state == NodeState::Ready && n.tags.contains_key("zone"))
    );
    let table = ok(&c.cli(&["node", "list"]));
    assert!(
        table.contains("node-1") && table.contains("zone=tokyo") && table.contains("ready"),
        "{table}"
    );

    // Deploy counter with the CLI, pinned to osaka (node-2 is the only osaka node).
    let out = ok(&c.cli(&[
        "workload",
        "run",
        "--name",
        "counter",
        "--driver",
        "wasm",
        "--artifact",
        &guest("counter"),
        "--constraint",
        "zone == osaka",
    ]));
    assert!(out.contains("running on node-2"), "{out}");

    // Every ingress reaches the same instance: increments are seen in order.
    for (i, want) in [(0usize, 1u64), (1, 2), (2, 3), (0, 4)] {
        let r = call(&c.ingress(i), Method::POST, "/w/counter/incr").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(json(&r)["value"], want, "via ingress {i}");
        assert_eq!(header(&r, "avail-node"), "node-2");
        assert_eq!(header(&r, "avail-incarnation"), "1");
    }
    for i in 0..3 {
        let r = call(&c.ingress(i), Method::GET, "/w/counter/value").await;
        assert_eq!(json(&r)["value"], 4);
    }
    // Unknown workload: 404 JSON.
    let r = call(&c.ingress(0), Method::GET, "/w/nope/x").await;
    assert_eq!(r.status, 404);
    assert_eq!(json(&r)["error"]["code"], "not_found");

    // A process workload on node-3 (rack r3). The shell keeps python as its child, so the
    // agent runs shim -> sh -> python: the grandchild too must die with the agent.
    let out = ok(&c.run_web("web", &["--constraint", "rack == r3"]));
    assert!(out.contains("running on node-3"), "{out}");
    let r = call(&c.ingress(0), Method::GET, "/w/web/").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(header(&r, "avail-node"), "node-3");
    let web_pids = descendants(c.agents[2].as_ref().unwrap().pid());
    assert!(
        web_pids.len() >= 3,
        "shim, sh and python under the agent: {web_pids:?}"
    );

    // Workload listing and show.
    let list = ok(&c.cli(&["workload", "list"]));
    assert!(
        list.contains("counter") && list.contains("web") && list.contains("running"),
        "{list}"
    );
    let shown: Workload =
        serde_json::from_str(&ok(&c.cli(&["workload", "show", "counter", "-o", "json"]))).unwrap();
    assert_eq!(shown.status.node.as_deref(), Some("node-2"));

    // SIGKILL node-3's agent: the node goes down, and its process workload dies with it.
    c.kill_agent(2);
    c.wait_node_state("node-3", NodeState::Down, Duration::from_secs(20))
        .await;
    wait_until("web marked failed", Duration::from_secs(10), || {
        let cl = c.client();
        async move {
            let w: Workload = cl
                .get("/v1/workloads/web")
                .await
                .map_err(|e| e.to_string())?;
            if w.status.phase == Phase::Failed {
                Ok(())
            } else {
                Err(format!("{:?}", w.status))
            }
        }
    })
    .await;
    for pid in web_pids {
        wait_until(
            "python process gone",
            Duration::from_secs(10),
            || async move {
                if pid_alive(pid) {
                    Err(format!("pid {pid} alive"))
                } else {
                    Ok(())
                }
            },
        )
        .await;
    }
    let r = call(&c.ingress(0), Method::GET, "/w/web/").await;
    assert_eq!(r.status, 503);
    assert_eq!(header(&r, "retry-after"), "1");

    // Restart the server: everything it acknowledged is back; the counter keeps serving.
    c.kill_server();
    c.start_server().await;
    let ws: Vec<Workload> = c.client().get("/v1/workloads").await.unwrap();
    let mut names: Vec<_> = ws.iter().map(|w| w.spec.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["counter", "web"]);
    let nodes: Vec<Node> = c.client().get("/v1/nodes").await.unwrap();
    assert_eq!(nodes.len(), 3);
    c.wait_node_state("node-1", NodeState::Ready, Duration::from_secs(20))
        .await;
    c.wait_node_state("node-3", NodeState::Down, Duration::from_secs(20))
        .await;
    let r = call(&c.ingress(1), Method::POST, "/w/counter/incr").await;
    assert_eq!(json(&r)["value"], 5);
    let events = ok(&c.cli(&["workload", "events", "counter"]));
    assert!(
        events.contains("workload.created") && events.contains("workload.placed"),
        "{events}"
    );

    // Delete: routes go, the instance stops.
    ok(&c.cli(&["workload", "rm", "counter"]));
    wait_until(
        "counter gone from the ingress",
        Duration::from_secs(10),
        || {
            let base = c.ingress(0);
            async move {
                let r = call(&base, Method::GET, "/w/counter/value").await;
                if r.status == 404 {
                    Ok(())
                } else {
                    Err(format!("{}", r.status))
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn wasm_faults_are_contained() {
    let c = Cluster::start(BIN.as_ref(), 1).await;
    let spec = format!(
        "name = \"faulty\"\ndriver = \"wasm\"\nartifact = \"{}\"\ntimeout_ms = 300\n[resources]\nmemory_mib = 16\n",
        guest("faulty")
    );
    let f = c.dir.path().join("faulty.toml");
    std::fs::write(&f, spec).unwrap();
    ok(&c.cli(&["workload", "run", "-f", f.to_str().unwrap()]));
    let base = c.ingress(0);
    assert_eq!(
        json(&call(&base, Method::GET, "/w/faulty/count").await)["count"],
        1
    );
    assert_eq!(
        json(&call(&base, Method::GET, "/w/faulty/count").await)["count"],
        2
    );
    // A trap: 500, and the instance is re-created (its counter starts again).
    let r = call(&base, Method::GET, "/w/faulty/trap").await;
    assert_eq!(r.status, 500);
    assert_eq!(json(&r)["error"]["code"], "guest_trap");
    assert_eq!(
        json(&call(&base, Method::GET, "/w/faulty/count").await)["count"],
        1
    );
    // A runaway handler: interrupted at its deadline, 504.
    let r = call(&base, Method::GET, "/w/faulty/spin").await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    // Memory above the spec's limit: the guest cannot grow, traps, 500.
    let r = call(&base, Method::POST, "/w/faulty/grow?mib=64").await;
    assert_eq!(r.status, 500);
    assert_eq!(call(&base, Method::GET, "/w/faulty/ok").await.status, 200);
    // Guest log lines reach `avail workload logs`.
    call(&base, Method::GET, "/w/faulty/log").await;
    wait_until(
        "restarts and log line reported",
        Duration::from_secs(10),
        || {
            let c = &c;
            async move {
                let w: Workload = c
                    .client()
                    .get("/v1/workloads/faulty")
                    .await
                    .map_err(|e| e.to_string())?;
                let logs = String::from_utf8_lossy(&c.cli(&["workload", "logs", "faulty"]).stdout)
                    .to_string();
                if w.status.restarts >= 3 && logs.contains("hello from faulty") {
                    Ok(())
                } else {
                    Err(format!("restarts {} logs {logs:?}", w.status.restarts))
                }
            }
        },
    )
    .await;
}

/// Read from `stream` until the text read so far contains `needle` (deadline 10 s).
async fn read_until(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    seen: &mut String,
    needle: &str,
) {
    use tokio::io::AsyncReadExt;
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in the stream; got:\n{seen}"))
            .unwrap();
        assert!(n > 0, "stream closed; got:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn events_stream_replays_then_follows() {
    use tokio::io::AsyncWriteExt;
    let c = Cluster::start(BIN.as_ref(), 1).await;
    let addr = c.server_url().trim_start_matches("https://").to_string();
    let mut s = c.connect_api().await;
    let req = format!(
        "GET /v1/events?follow=true HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        c.admin_token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = String::new();
    read_until(&mut s, &mut seen, "text/event-stream").await;
    read_until(&mut s, &mut seen, "\"kind\":\"node.joined\"").await;
    ok(&c.cli(&[
        "workload",
        "run",
        "--detach",
        "--name",
        "counter",
        "--driver",
        "wasm",
        "--artifact",
        &guest("counter"),
    ]));
    read_until(&mut s, &mut seen, "\"kind\":\"workload.created\"").await;
    read_until(&mut s, &mut seen, "\"kind\":\"workload.running\"").await;
    // The CLI lists the same history.
    let listed = ok(&c.cli(&["events"]));
    assert!(
        listed.contains("workload.running") && listed.contains("server.started"),
        "{listed}"
    );
}
