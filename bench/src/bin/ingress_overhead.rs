//! Ingress overhead: `GET /value` of the counter guest called in-process through the
//! wasm driver, against the same request through the local node's ingress and through
//! another node's ingress (forwarded), on a real 2-agent cluster. Sequential requests;
//! prints p50/p99 latencies and the ratios.
//!
//! `cargo build --release -p avail -p avail-bench && target/release/ingress_overhead [requests]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use avail_bench::{machine, percentile};
use avail_client::Client;
use avail_driver::wasm::WasmDriver;
use avail_driver::{Driver, HttpRequest, StartSpec};
use avail_model::WorkloadSpec;
use avail_testkit::{Cluster, repo_root};
use hyper::Method;

fn report(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let (p50, p99) = (percentile(&v, 0.5), percentile(&v, 0.99));
    println!(
        "{name:<36} p50 {:>8.1} us   p99 {:>8.1} us",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    p50
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let bin = avail_bench::avail_bin();
    let rt = avail_bench::runtime();
    rt.block_on(async move {
        let root = repo_root(env!("CARGO_MANIFEST_DIR"));
        let module: Arc<[u8]> = std::fs::read(root.join("guests/counter.wasm")).unwrap().into();

        // In-process baseline.
        let driver = WasmDriver::new().unwrap();
        let spec = WorkloadSpec::parse(r#"{"name":"counter","driver":"wasm","artifact":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#).unwrap();
        let inst = driver.start(StartSpec { spec: &spec, module: Some(module), files: Default::default(), logs: Arc::new(|_| {}) }).await.unwrap();
        let req = HttpRequest { method: "GET".into(), path: "/value".into(), headers: vec![], body: Default::default() };
        let mut inproc = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r = inst.handle(req.clone()).await;
            inproc.push(t.elapsed());
            assert_eq!(r.status, 200);
        }

        // Real cluster: counter on node-2 (osaka); call node-2's ingress and node-1's.
        let c = Cluster::start(&bin, 2).await;
        let out = c.cli(&["workload", "run", "--name", "counter", "--driver", "wasm", "--artifact", root.join("guests/counter.wasm").to_str().unwrap(), "--constraint", "zone == osaka"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let measure = |base: String| async move {
            let client = Client::new(&base, None, None);
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let r = client.raw(Method::GET, "/w/counter/value", None, &[]).await.unwrap();
                v.push(t.elapsed());
                assert_eq!(r.status, 200);
            }
            v
        };
        let local = measure(c.ingress(1)).await;
        let remote = measure(c.ingress(0)).await;
        println!("machine: {}; {n} sequential requests each", machine());
        let a = report("in-process (driver.handle)", inproc);
        let b = report("ingress, workload on this node", local);
        let r = report("ingress, forwarded to another node", remote);
        println!("local ingress / in-process p50: {:.1}x; forwarded / in-process p50: {:.1}x; forwarding adds {:.0} us at p50",
            b.as_secs_f64() / a.as_secs_f64(), r.as_secs_f64() / a.as_secs_f64(), (r.as_secs_f64() - b.as_secs_f64()) * 1e6);
    });
}
