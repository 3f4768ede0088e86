//! Bounds on the doors (issue 11, item 6): an `Idempotency-Key` bound to its request,
//! ingress bodies bounded each and together, event followers that do not read dropped.

use std::time::Duration;

use avail_model::Workload;
use avail_testkit::{Cluster, wait_until};
use bytes::Bytes;
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

/// The counter's value through an ingress.
async fn value(c: &Cluster) -> u64 {
    let ing = avail_client::Client::new(&c.ingress(0), None, None);
    let r = ing.raw(Method::GET, "/w/c/value", None, &[]).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["value"].as_u64().unwrap()
}

#[tokio::test]
async fn an_idempotency_key_answers_only_its_own_request() {
    let c = Cluster::start(BIN.as_ref(), 2).await;
    let out = c.run_wasm("c", "counter", &[]);
    assert!(out.status.success(), "{out:?}");
    let running = c
        .wait_workload("c", "running", Duration::from_secs(30), |w: &Workload| {
            w.status
                .node
                .clone()
                .filter(|_| w.status.phase == avail_model::Phase::Running)
                .ok_or_else(|| format!("{:?}", w.status))
        })
        .await;
    // Through the other node's ingress too (forwarded): the digest is the workload's
    // path, method and body wherever the request entered.
    let other = if running == Cluster::agent_name(0) {
        1
    } else {
        0
    };
    for ingress in [c.ingress(other), c.ingress(1 - other)] {
        let ing = avail_client::Client::new(&ingress, None, None);
        let key = format!("k-{ingress}");
        let h = [("idempotency-key", key.as_str())];
        let before = value(&c).await;
        let first = ing
            .raw(
                Method::POST,
                "/w/c/incr",
                Some((Bytes::from("a"), "text/plain")),
                &h,
            )
            .await
            .unwrap();
        assert_eq!(first.status, 200, "{first:?}");
        // The same request again: answered from the log, not run again.
        let again = ing
            .raw(
                Method::POST,
                "/w/c/incr",
                Some((Bytes::from("a"), "text/plain")),
                &h,
            )
            .await
            .unwrap();
        assert_eq!((again.status, &again.body), (first.status, &first.body));
        assert_eq!(
            again.headers.get("avail-replayed").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        // Another body, path or method with the same key: 422 naming the header.
        for (m, path, body) in [
            (Method::POST, "/w/c/incr", "b"),
            (Method::POST, "/w/c/incr?x=1", "a"),
            (Method::PUT, "/w/c/incr", "a"),
        ] {
            let r = ing
                .raw(m.clone(), path, Some((Bytes::from(body), "text/plain")), &h)
                .await
                .unwrap();
            assert_eq!(r.status, 422, "{m} {path} {body}: {r:?}");
            let e: avail_model::ApiErrorBody = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(e.error.field.as_deref(), Some("Idempotency-Key"), "{e:?}");
        }
        assert_eq!(value(&c).await, before + 1, "only the first request ran");
    }
}

/// Send the head of a POST to the ingress with `Content-Length: len` and `sent` bytes
/// of its body, and keep the connection (the body never completes).
async fn hold_body(ingress_addr: &str, len: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(ingress_addr).await.unwrap();
    let head = format!(
        "POST /w/c/incr HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\ncontent-type: text/plain\r\n\r\n"
    );
    let mut bytes = head.into_bytes();
    bytes.resize(bytes.len() + sent, b'x');
    s.write_all(&bytes).await.unwrap();
    s
}

#[tokio::test]
async fn ingress_bodies_are_bounded_each_and_together() {
    use avail_agent::body_budget::{MAX_BODY_BYTES, MAX_BODY_BYTES_IN_FLIGHT};
    let c = Cluster::start(BIN.as_ref(), 1).await;
    let out = c.run_wasm("c", "counter", &[]);
    assert!(out.status.success(), "{out:?}");
    let ing = avail_client::Client::new(&c.ingress(0), None, None);
    // One body past the cap: 413 with a JSON error, before its bytes are read.
    let addr = format!("{}:7480", c.agent_addr(0));
    let mut s = hold_body(&addr, MAX_BODY_BYTES + 1, 4096).await;
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut reply))
        .await
        .expect("a reply")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains(r#""code":"too_large""#), "{reply}");
    drop(s);
    // Bodies that never complete hold the node's whole budget...
    let small = || Some((Bytes::from_static(b"1"), "text/plain"));
    let mut held = Vec::new();
    // A holder that arrives while a probe holds its byte may be refused: add holders
    // until a probe finds the budget spent (with no probe in flight, four fill it).
    let r = loop {
        held.push(hold_body(&addr, MAX_BODY_BYTES, 4096).await);
        let r = ing
            .raw(Method::POST, "/w/c/incr", small(), &[])
            .await
            .unwrap();
        if r.status == 503 {
            break r;
        }
        assert!(
            held.len() < 4 * MAX_BODY_BYTES_IN_FLIGHT / MAX_BODY_BYTES,
            "{} bodies of {MAX_BODY_BYTES} bytes held and a body still taken: {r:?}",
            held.len()
        );
    };
    let e: avail_model::ApiErrorBody = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e.error.code, "unavailable", "{e:?}");
    // A request without a body still runs.
    let r = ing.raw(Method::GET, "/w/c/value", None, &[]).await.unwrap();
    assert_eq!(r.status, 200);
    // The bytes come back when the holders go away.
    drop(held);
    // A body is taken again.
    avail_testkit::until_ok(
        &ing,
        Method::POST,
        "/w/c/incr",
        small(),
        &[],
        Duration::from_secs(30),
    )
    .await;
}

/// A gauge of the server's `/metrics`.
async fn gauge(c: &Cluster, name: &str) -> i64 {
    let text = c.client().get_bytes("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("avail_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test]
async fn a_follower_that_never_reads_is_dropped_and_its_queue_freed() {
    use avail_server::followers::{FOLLOWER_QUEUE, MAX_FOLLOWERS};
    let c = Cluster::start(BIN.as_ref(), 1).await;
    let server = format!("{}.1:7400", c.net);
    let head = format!(
        "GET /v1/events?follow=true HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
        c.admin_token
    );
    // A follower with a tiny receive window that never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stuck = c
        .tls_over(sock.connect(server.parse().unwrap()).await.unwrap())
        .await;
    stuck.write_all(head.as_bytes()).await.unwrap();
    wait_until("the follower counted", Duration::from_secs(30), || async {
        match gauge(&c, "event_followers").await {
            1 => Ok(()),
            n => Err(format!("{n} followers")),
        }
    })
    .await;
    // Events of several KiB each (a node's tags are in its event): a few thousand
    // fill the socket's buffers and then the follower's queue.
    let api = c.client();
    let node = Cluster::agent_name(0);
    let mut set = serde_json::Map::new();
    for i in 0..40 {
        set.insert(format!("k{i:02}-{}", "t".repeat(50)), "v".repeat(60).into());
    }
    let _: serde_json::Value = api
        .patch(
            &format!("/v1/nodes/{node}/tags"),
            &serde_json::json!({"set": set, "remove": []}),
        )
        .await
        .unwrap();
    let mut patches = 0;
    let mut max_queued = 0;
    while gauge(&c, "event_followers_dropped").await == 0 {
        for _ in 0..50 {
            let v = if patches % 2 == 0 { "a" } else { "b" };
            let _: serde_json::Value = api
                .patch(
                    &format!("/v1/nodes/{node}/tags"),
                    &serde_json::json!({"set": {"flip": v}, "remove": []}),
                )
                .await
                .unwrap();
            patches += 1;
        }
        let queued = gauge(&c, "event_follower_queued_events").await;
        assert!(
            queued <= FOLLOWER_QUEUE as i64,
            "queue past its bound: {queued}"
        );
        max_queued = max_queued.max(queued);
        assert!(
            patches < 20_000,
            "no follower dropped after {patches} events (queued {queued})"
        );
    }
    // Dropped: its queue is empty again, whatever it had not read.
    assert_eq!(gauge(&c, "event_follower_queued_events").await, 0);
    eprintln!("dropped after {patches} events; the queue held at most {max_queued}");
    // Followers past the cap are refused with a JSON error; a reading follower works.
    // (From now on: no replay to send them.)
    let live_only = head.replace("follow=true", "follow=true&since=1000000000");
    let now = gauge(&c, "event_followers").await as usize;
    let mut conns = Vec::new();
    for _ in now..MAX_FOLLOWERS {
        let mut s = c.connect_api().await;
        s.write_all(live_only.as_bytes()).await.unwrap();
        conns.push(s);
    }
    wait_until("every slot taken", Duration::from_secs(30), || async {
        match gauge(&c, "event_followers").await as usize {
            MAX_FOLLOWERS => Ok(()),
            n => Err(format!("{n} followers")),
        }
    })
    .await;
    // One more: 429 with a JSON error.
    let mut s = c.connect_api().await;
    s.write_all(
        live_only
            .replace("host: x", "host: x\r\nconnection: close")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
    assert!(reply.contains("too_many_followers"), "{reply}");
    // Closing the others gives the slots back.
    drop(conns);
    drop(stuck);
    // (A closed follower is noticed at its next write: the keep-alive, every 15 s.)
    wait_until("slots back", Duration::from_secs(60), || async {
        match gauge(&c, "event_followers").await {
            0 => Ok(()),
            n => Err(format!("{n} followers")),
        }
    })
    .await;
    let mut s = c.connect_api().await;
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}
