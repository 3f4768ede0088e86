//! avail-bench: shared pieces of the benchmark binaries: a closed-loop HTTP load
//! generator and latency statistics. Figures go to `docs/benchmarks.md`, always as a
//! ratio against a baseline measured in the same run.

pub mod fake_nodes;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Result of one load run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Completed requests per second.
    pub rps: f64,
    /// Requests that did not get a 2xx.
    pub errors: u64,
}

/// Closed-loop load: `concurrency` workers each send GET `url` (with an optional bearer
/// token) back to back for `duration`.
pub async fn load(url: &str, token: Option<&str>, concurrency: usize, duration: Duration) -> Load {
    load_tls(url, token, concurrency, duration, None).await
}

/// [`load`], `https://` URLs verified with `tls`. Connections are kept alive.
pub async fn load_tls(
    url: &str,
    token: Option<&str>,
    concurrency: usize,
    duration: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Load {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let tls = tls.unwrap_or_else(avail_tls::config::trusting_nothing);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build(https);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, stop, done, errors) =
            (client.clone(), stop.clone(), done.clone(), errors.clone());
        let url = url.to_string();
        let auth = token.map(|t| format!("Bearer {t}"));
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut b = hyper::Request::get(&url);
                if let Some(a) = &auth {
                    b = b.header("authorization", a);
                }
                let ok = match client.request(b.body(Empty::new()).expect("request")).await {
                    Ok(r) => {
                        let s = r.status().is_success();
                        s && r.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    Load {
        rps: n as f64 / elapsed,
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Percentile of sorted samples (q in 0..=1).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Median of values.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The `avail` binary built beside the running bench (`cargo build --release -p avail
/// -p avail-bench`); panics with that hint when it is missing.
pub fn avail_bin() -> std::path::PathBuf {
    let bin = std::env::current_exe()
        .expect("current exe")
        .parent()
        .expect("exe dir")
        .join("avail");
    assert!(
        bin.exists(),
        "build the avail binary first: cargo build --release -p avail"
    );
    bin
}

/// The multi-threaded tokio runtime every bench runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Machine description for the report: cores and model name.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

/// Create `n` wasm workloads of module `digest` at level `none`, named `<prefix><i>`,
/// with the spec fields `fields` (JSON, e.g. `"placement": {...}`), through `api`,
/// `clients` at once; each must come back in phase `expect`. Creates per second.
pub async fn creates(
    api: &avail_client::Client,
    digest: &str,
    prefix: &str,
    fields: &str,
    expect: avail_model::Phase,
    n: usize,
    clients: usize,
) -> f64 {
    use std::sync::atomic::AtomicUsize;
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (api, next) = (api.clone(), next.clone());
        let (digest, prefix, fields) = (digest.to_string(), prefix.to_string(), fields.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let spec = format!(
                    r#"{{"name":"{prefix}{i}","driver":"wasm","artifact":"{digest}","level":"none",{fields}}}"#
                );
                let w: avail_model::Workload = api
                    .post_raw("/v1/workloads", spec.into_bytes().into())
                    .await
                    .unwrap();
                assert_eq!(w.status.phase, expect, "{:?}", w.status);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}
