//! Authenticated `GET /v1/workloads/<name>` on a real avail server against a bare axum
//! hello-world handler, same process, same runtime, same load generator, alternating
//! rounds; prints the ratio. Then the cost of TLS: the same server's router, same
//! state, served over TLS (as it is) and over plain HTTP on a second port, alternating
//! rounds; prints TLS / plain.
//!
//! `cargo run --release -p avail-bench --bin api_throughput [-- seconds_per_round rounds concurrency]`

use std::time::Duration;

use avail_bench::{load, load_tls, machine, median};
use avail_client::Client;
use axum::Json;
use axum::routing::get;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let secs = args.first().copied().unwrap_or(3);
    let rounds = args.get(1).copied().unwrap_or(3);
    let conc = args.get(2).copied().unwrap_or(16) as usize;
    let rt = avail_bench::runtime();
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = avail_server::ServerConfig::new(
            dir.path().to_path_buf(),
            "127.0.0.1:0".parse().unwrap(),
        );
        let server = avail_server::start(cfg).await.expect("server");
        let token = std::fs::read_to_string(avail_server::admin_token_path(dir.path()))
            .unwrap()
            .trim()
            .to_string();
        let base = format!("https://{}", server.addr);
        let ca = std::fs::read_to_string(avail_server::ca_path(dir.path())).unwrap();
        let tls = avail_tls::client_config(&ca, None).unwrap();
        let api = Client::with_tls(&base, Some(token.clone()), None, Some(tls.clone()));
        // A workload to read (pending: no nodes; the read path is the same).
        let module = std::fs::read(
            avail_testkit::repo_root(env!("CARGO_MANIFEST_DIR")).join("guests/counter.wasm"),
        )
        .unwrap();
        let up: serde_json::Value = api.put_bytes("/v1/artifacts", module.into()).await.unwrap();
        let spec =
            serde_json::json!({"name": "ledger", "driver": "wasm", "artifact": up["digest"]});
        let _: serde_json::Value = api.post("/v1/workloads", &spec).await.unwrap();

        let bare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_url = format!("http://{}/hello", bare.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/hello",
            get(|| async { Json(serde_json::json!({"hello": "world"})) }),
        );
        tokio::spawn(async move { axum::serve(bare, app).await });

        let avail_url = format!("{base}/v1/workloads/ledger");
        let d = Duration::from_secs(secs);
        // Warm up both.
        load(&bare_url, None, conc, Duration::from_millis(500)).await;
        let t = Some(tls.clone());
        load_tls(
            &avail_url,
            Some(&token),
            conc,
            Duration::from_millis(500),
            t.clone(),
        )
        .await;
        let (mut b, mut a) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let lb = load(&bare_url, None, conc, d).await;
            let la = load_tls(&avail_url, Some(&token), conc, d, t.clone()).await;
            assert_eq!(la.errors + lb.errors, 0, "errors during the run");
            b.push(lb.rps);
            a.push(la.rps);
        }
        let (mb, ma) = (median(b), median(a));
        println!("machine: {}", machine());
        println!("concurrency {conc}, {rounds} alternating rounds of {secs} s");
        println!("bare axum hello-world:                 {mb:>10.0} req/s (median)");
        println!("avail GET /v1/workloads/<name> (auth): {ma:>10.0} req/s (median)");
        println!("ratio: {:.1}%", 100.0 * ma / mb);

        // The cost of TLS: the same router and state over plain HTTP beside it.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_url = format!("http://{}/v1/workloads/ledger", plain.local_addr().unwrap());
        let app = avail_server::api::router(server.state.clone());
        tokio::spawn(avail_tls::serve::serve(
            plain,
            None,
            app,
            Default::default(),
        ));
        load(&plain_url, Some(&token), conc, Duration::from_millis(500)).await;
        let (mut p, mut s) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let lp = load(&plain_url, Some(&token), conc, d).await;
            let ls = load_tls(&avail_url, Some(&token), conc, d, t.clone()).await;
            assert_eq!(lp.errors + ls.errors, 0, "errors during the run");
            p.push(lp.rps);
            s.push(ls.rps);
        }
        let (mp, ms) = (median(p), median(s));
        println!("avail GET over plain HTTP:             {mp:>10.0} req/s (median)");
        println!("avail GET over TLS (as served):        {ms:>10.0} req/s (median)");
        println!("TLS / plain: {:.1}%", 100.0 * ms / mp);
    });
}
