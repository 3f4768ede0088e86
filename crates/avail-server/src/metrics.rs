//! Prometheus metrics of the control plane (`GET /metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by method, matched route and status.
    pub http_requests: Family<Labels, Counter>,
    /// Nodes by state, set at scrape time.
    pub nodes: Family<Labels, Gauge>,
    /// Workloads by phase, set at scrape time.
    pub workloads: Family<Labels, Gauge>,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Requests refused by authentication.
    pub auth_failures: Counter,
    scrape_lock: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register everything.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("avail");
        let http_requests = Family::<Labels, Counter>::default();
        let nodes = Family::<Labels, Gauge>::default();
        let workloads = Family::<Labels, Gauge>::default();
        let heartbeats = Counter::default();
        let auth_failures = Counter::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            http_requests.clone(),
        );
        registry.register("nodes", "Nodes by state", nodes.clone());
        registry.register("workloads", "Workloads by phase", workloads.clone());
        registry.register(
            "agent_heartbeats",
            "Agent heartbeats received",
            heartbeats.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused by authentication",
            auth_failures.clone(),
        );
        Metrics {
            registry,
            http_requests,
            nodes,
            workloads,
            heartbeats,
            auth_failures,
            scrape_lock: std::sync::Mutex::new(()),
        }
    }

    /// Set the gauges from the current nodes' states and workloads' phases, and render;
    /// one scrape at a time, and every known state and phase is set (zero included).
    pub fn scrape(&self, node_states: &[&str], phases: &[&str]) -> String {
        let _one_at_a_time = self.scrape_lock.lock().unwrap_or_else(|p| p.into_inner());
        let count = |all: &[&str], v: &str| all.iter().filter(|x| **x == v).count() as i64;
        for st in ["ready", "suspect", "down", "draining"] {
            self.nodes
                .get_or_create(&vec![("state".into(), st.into())])
                .set(count(node_states, st));
        }
        for ph in ["pending", "placed", "running", "failed", "stopped"] {
            self.workloads
                .get_or_create(&vec![("phase".into(), ph.into())])
                .set(count(phases, ph));
        }
        self.render()
    }

    /// Count one request. Unknown methods are counted as `other`, so a client cannot
    /// grow the label set.
    pub fn request(&self, method: &str, route: &str, status: u16) {
        const KNOWN: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
        let method = if KNOWN.contains(&method) {
            method
        } else {
            "other"
        };
        self.http_requests
            .get_or_create(&vec![
                ("method".into(), method.into()),
                ("route".into(), route.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
