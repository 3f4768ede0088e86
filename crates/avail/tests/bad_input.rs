//! Bad input gets a clear error naming the field, the right status and CLI exit code,
//! and nothing is stored.

use std::time::Duration;

use avail_client::{Client, ClientError};
use avail_model::Workload;
use avail_testkit::{Cluster, Proc, guest, wait_until};
use bytes::Bytes;
use hyper::Method;

const BIN: &str = env!("CARGO_BIN_EXE_avail");

async fn upload(c: &Client, bytes: Vec<u8>) -> String {
    let r: serde_json::Value = c.put_bytes("/v1/artifacts", bytes.into()).await.unwrap();
    r["digest"].as_str().unwrap().to_string()
}

/// POST a raw body to /v1/workloads; return (status, error.field).
async fn create_raw(c: &Client, body: &str) -> (u16, Option<String>, String) {
    match c
        .post_raw::<serde_json::Value>("/v1/workloads", Bytes::from(body.to_string()))
        .await
    {
        Ok(v) => (201, None, v.to_string()),
        Err(ClientError::Api { status, error }) => (status, error.field, error.message),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn invalid_specs_are_refused_with_the_field_named() {
    let c = Cluster::start(BIN.as_ref(), 1).await;
    let api = c.client();
    let counter = upload(&api, std::fs::read(guest("counter")).unwrap()).await;
    let not_wasm = upload(&api, b"#!/bin/sh\necho hi\n".to_vec()).await;
    let no_exports = upload(&api, b"\0asm\x01\0\0\0".to_vec()).await;
    let cases = [
        (format!(r#"{{"name":"a","driver":"docker","artifact":"{counter}"}}"#), "driver"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","level":"gold"}}"#), "level"),
        (format!(r#"{{"name":"Not_A_Label","driver":"wasm","artifact":"{counter}"}}"#), "name"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","resources":{{"memory_mib":0}}}}"#), "resources.memory_mib"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","level":"ft","resources":{{"memory_mib":2048}}}}"#), "resources.memory_mib"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","resources":{{"cpu_millis":-5}}}}"#), "resources.cpu_millis"),
        // Below the floor of 10 millicores (admission counts what a workload asks for).
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","resources":{{"cpu_millis":1}}}}"#), "resources.cpu_millis"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","resources":{{"memory_mib":99999999999}}}}"#), "resources.memory_mib"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","placement":{{"policy":"tight"}}}}"#), "placement.policy"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","colour":"red"}}"#), "colour"),
        (r#"{"name":"a","driver":"wasm"}"#.to_string(), "artifact"),
        (r#"{"name":"a","driver":"wasm","artifact":"sha256:1111111111111111111111111111111111111111111111111111111111111111"}"#.to_string(), "artifact"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{not_wasm}"}}"#), "artifact"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{no_exports}"}}"#), "artifact"),
        (format!(r#"{{"name":"a","driver":"wasm","artifact":"{counter}","placement":{{"constraints":["zone ~ x"]}}}}"#), "placement.constraints[0]"),
        ("{not json".to_string(), "spec"),
    ];
    for (body, field) in &cases {
        let (status, got, msg) = create_raw(&api, body).await;
        assert_eq!(status, 400, "{body}: {msg}");
        assert_eq!(got.as_deref(), Some(*field), "{body}: {msg}");
    }
    let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
    assert!(ws.is_empty(), "nothing stored: {ws:?}");

    // Duplicate name: 409; unknown: 404.
    let good = format!(r#"{{"name":"one","driver":"wasm","artifact":"{counter}"}}"#);
    assert_eq!(create_raw(&api, &good).await.0, 201);
    assert_eq!(create_raw(&api, &good).await.0, 409);
    for path in [
        "/v1/workloads/nope",
        "/v1/nodes/nope",
        "/v1/workloads/nope/events",
    ] {
        let e = api.get::<serde_json::Value>(path).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{path}");
    }
    assert_eq!(
        api.delete::<serde_json::Value>("/v1/workloads/nope")
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );

    // Oversized bodies: 413 with a JSON error.
    let big = format!(
        r#"{{"name":"a","driver":"wasm","artifact":"{counter}","args":["{}"]}}"#,
        "x".repeat(2 << 20)
    );
    let (status, _, msg) = create_raw(&api, &big).await;
    assert_eq!(status, 413, "{msg}");

    // The CLI: invalid input exits 2 with the field named; the artifact file must exist.
    let out = c.cli(&[
        "workload",
        "run",
        "--name",
        "b",
        "--driver",
        "wasm",
        "--artifact",
        "/no/such/file.wasm",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("artifact"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&[
        "workload",
        "run",
        "--name",
        "b",
        "--driver",
        "wasm",
        "--artifact",
        &guest("counter"),
        "--memory-mib",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resources.memory_mib"));
    let out = c.cli(&[
        "workload",
        "run",
        "--name",
        "b",
        "--driver",
        "wasm",
        "--artifact",
        &guest("counter"),
        "--cpu-millis",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resources.cpu_millis"));
    let spec = c.dir.path().join("bad.toml");
    std::fs::write(
        &spec,
        "name = \"b\"\ndriver = \"wasm\"\nartifact = \"x.wasm\"\nflavour = 1\n",
    )
    .unwrap();
    let out = c.cli(&["workload", "run", "-f", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flavour"));
    // Unplaceable: stored as pending with the explanation, CLI exits 2.
    let out = c.cli(&[
        "workload",
        "run",
        "--name",
        "far",
        "--driver",
        "wasm",
        "--artifact",
        &guest("counter"),
        "--constraint",
        "zone == mars",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 filtered by constraint zone == mars"),
        "{err}"
    );
    let out = c.cli(&["workload", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let ws: Vec<Workload> = api.get("/v1/workloads").await.unwrap();
    assert_eq!(ws.len(), 2, "one + the pending far");
    // A known workload that runs nowhere: 503 with Retry-After, not 404.
    let r = wait_until("far is routed", Duration::from_secs(15), || {
        let ingress = Client::new(&c.ingress(0), None, None);
        async move {
            let r = ingress
                .raw(Method::GET, "/w/far/value", None, &[])
                .await
                .map_err(|e| e.to_string())?;
            if r.status == 503 {
                Ok(r)
            } else {
                Err(format!("{}", r.status))
            }
        }
    })
    .await;
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");

    // A file that is not wasm, caught by the server: CLI exit 2, field named.
    let junk = c.dir.path().join("junk.wasm");
    std::fs::write(&junk, b"#!/bin/sh\n").unwrap();
    let out = c.cli(&[
        "workload",
        "run",
        "--name",
        "junk",
        "--driver",
        "wasm",
        "--artifact",
        junk.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("field: artifact") && err.contains("not a WebAssembly module"),
        "{err}"
    );

    // An artifact over 64 MiB: 413, nothing stored.
    let e = api
        .put_bytes::<serde_json::Value>("/v1/artifacts", vec![0u8; (64 << 20) + 1].into())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(413));

    // A node whose ingress is not on its own address is refused.
    let join = c.api(Some(c.join_token()));
    let bad_join = serde_json::json!({
        "name": "evil", "address": "127.0.0.99", "ingress_url": "http://10.1.2.3:80",
        "replication_addr": "127.0.0.99:7481",
        "tags": {}, "capacity": {"cpu_millis": 1, "memory_mib": 1},
        "agent_version": "0", "boot_id": "x", "public_key": ""
    });
    let e = join
        .post::<_, serde_json::Value>("/v1/agent/join", &bad_join)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("ingress_url"), "{e}");
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let c = Cluster::start(BIN.as_ref(), 1).await;
    let anon = c.api(None);
    let forged = c.api(Some(format!("{}x", c.admin_token)));
    let join = c.api(Some(c.join_token()));
    for (client, what) in [
        (&anon, "missing"),
        (&forged, "forged"),
        (&join, "join token"),
    ] {
        let r = client
            .raw(Method::GET, "/v1/workloads", None, &[])
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{what}");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
    }
    // An expired token, signed with the server's own key.
    let key: [u8; 32] = std::fs::read(c.server_dir().join("secret.key"))
        .unwrap()
        .try_into()
        .unwrap();
    let expired = avail_server::auth::Auth::with_key(key).issue(
        "admin",
        avail_server::auth::Role::Admin,
        1000,
        10,
    );
    let r = c
        .api(Some(expired))
        .raw(Method::GET, "/v1/nodes", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(String::from_utf8_lossy(&r.body).contains("expired"));
    // Probes and metrics need no token.
    assert_eq!(
        anon.raw(Method::GET, "/livez", None, &[])
            .await
            .unwrap()
            .status,
        200
    );
    let m = anon.raw(Method::GET, "/metrics", None, &[]).await.unwrap();
    assert!(String::from_utf8_lossy(&m.body).contains("avail_auth_failures_total"));
    let doc: serde_json::Value = anon.get("/v1/openapi.json").await.unwrap();
    assert!(doc["paths"]["/v1/workloads"]["post"].is_object());

    // An agent with a wrong join token is refused, exits non-zero, and the server logs it.
    // (The right shape and a real token's id, but not its secret.)
    let id = c.join_token().split('.').nth(1).unwrap().to_string();
    let foreign = format!("avj.{id}.bm90IHRoZSBzZWNyZXQ");
    let mut bad = c.spawn_agent(5, &foreign);
    let out = bad.failed_exit(Duration::from_secs(20)).await;
    assert!(out.contains("join refused"), "{out}");
    let server_log = c.server.as_ref().unwrap().output();
    assert!(
        server_log.contains("unauthorized") || server_log.contains("rejected"),
        "server log names the refusal"
    );
    drop::<Proc>(bad);
}

#[tokio::test]
async fn corrupt_store_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let store = server_dir.join("store.redb");
    std::fs::write(&store, vec![0xA5u8; 64 * 1024]).unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "server",
            "--data-dir",
            server_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store.redb"), "{err}");
    // Nothing was reset: the file is as it was.
    assert_eq!(std::fs::read(&store).unwrap(), vec![0xA5u8; 64 * 1024]);
}

/// `avail server` on `server_dir`: its exit code and stderr (the start is refused, so
/// it returns).
fn refused_server(server_dir: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(BIN)
        .args([
            "server",
            "--data-dir",
            server_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn zero_length_store_is_refused_not_an_empty_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let store = server_dir.join("store.redb");
    std::fs::write(&store, b"").unwrap();
    let (code, err) = refused_server(&server_dir);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("store.redb") && err.contains("empty"), "{err}");
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 0, "left alone");
}

#[test]
fn missing_store_beside_a_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    std::fs::write(server_dir.join("secret.key"), [7u8; 32]).unwrap();
    let (code, err) = refused_server(&server_dir);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("store.redb") && err.contains("secret.key"),
        "{err}"
    );
    assert!(!server_dir.join("store.redb").exists(), "nothing created");
}

#[test]
fn bad_liveness_windows_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, named) in [
        ("--down-after-ms", "400", "--down-after-ms"),
        ("--heartbeat-ms", "5", "--heartbeat-ms"),
        ("--suspect-after-ms", "100", "--suspect-after-ms"),
    ] {
        let out = std::process::Command::new(BIN)
            .args([
                "server",
                "--data-dir",
                dir.path().join("server").to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                flag,
                value,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{flag} {value}: {err}");
    }
    // Nothing was created by a refused start.
    assert!(!dir.path().join("server").join("store.redb").exists());
}

#[test]
fn cli_basics_and_missing_context() {
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("HOME", home.path())
            .env_remove("AVAIL_ADDR")
            .env_remove("AVAIL_TOKEN")
            .env_remove("AVAIL_CONTEXT")
            .output()
            .unwrap()
    };
    let out = run(&["completion", "bash"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("workload"));
    // No flags, no environment, no context: a clear error, exit 1.
    let out = run(&["node", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("avail up"));
    // Bad flag values: clap's usage error, exit 2.
    let out = run(&["node", "list", "-o", "yaml"]);
    assert_eq!(out.status.code(), Some(2));
}
