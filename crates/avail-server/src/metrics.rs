//! Prometheus metrics of the control plane (`GET /metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The ft gauges: name (under the `avail_` prefix) and help.
const FT_GAUGES: &[(&str, &str)] = &[
    (
        "ft_protected",
        "1 when the ft workload's secondary is in step (ft:protected)",
    ),
    (
        "ft_generation",
        "Pair generation (goes up on every failover)",
    ),
    (
        "ft_acked_epoch",
        "Last checkpoint epoch the secondary acknowledged",
    ),
    (
        "ft_lag_ms",
        "Age of the oldest reply held for its checkpoint's ack, ms",
    ),
    (
        "ft_lag_bytes",
        "Bytes of checkpoints sent and not acknowledged",
    ),
    ("ft_checkpoints", "Checkpoints sent in this generation"),
    ("ft_reply_log_entries", "Replies kept in the reply log"),
    ("ft_reply_log_bytes", "Bytes kept in the reply log"),
    (
        "ft_reply_log_refusals",
        "Requests refused because the reply log was full of undelivered replies",
    ),
    (
        "ft_tracker",
        "Dirty-page tracker of the primary (label tracker), 1",
    ),
];

/// What the scrape shows of one ft workload.
pub struct FtFigures<'a> {
    /// Workload name.
    pub workload: &'a str,
    /// `ft:protected`, `ft:syncing`, ...
    pub level_state: Option<avail_model::LevelState>,
    /// Pair generation.
    pub generation: u64,
    /// The primary's report.
    pub status: &'a avail_model::FtStatus,
}

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
    /// Nodes declared down.
    pub nodes_down: Counter,
    /// How long a node had been silent when it was declared down, seconds.
    pub detection_seconds: Histogram,
    /// `ha` workloads restarted on another node.
    pub restarts: Counter,
    /// Live level changes.
    pub level_changes: Counter,
    /// Live moves finished (drains).
    pub moves: Counter,
    /// Fences agents reported (an isolated node stopped its ha workloads).
    pub fences: Counter,
    /// How long each live move took, from its start to the handover, seconds.
    pub move_seconds: Histogram,
    /// From a node declared down to the restart of each of its `ha` workloads written
    /// (planned and recorded), seconds.
    pub restart_seconds: Histogram,
    /// Level `ft` figures per workload (and, for `ft_tracker`, dirty tracker), set at
    /// scrape time from what the primaries report.
    ft: Vec<(&'static str, Family<Labels, Gauge>)>,
    /// Event stream followers: connected, live events queued for them, dropped for
    /// falling behind (since the start), set at scrape time.
    followers: [Gauge; 3],
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
        let nodes_down = Counter::default();
        registry.register("nodes_down", "Nodes declared down", nodes_down.clone());
        let detection_seconds = Histogram::new(exponential_buckets(0.1, 1.5, 14));
        registry.register(
            "node_detection_seconds",
            "How long a node had been silent when it was declared down",
            detection_seconds.clone(),
        );
        let restarts = Counter::default();
        registry.register(
            "ha_restarts",
            "ha workloads restarted on another node after their node went down",
            restarts.clone(),
        );
        let level_changes = Counter::default();
        registry.register(
            "level_changes",
            "Live level changes of workloads",
            level_changes.clone(),
        );
        let fences = Counter::default();
        registry.register(
            "fences",
            "Fences agents reported: an isolated node stopped its ha workloads",
            fences.clone(),
        );
        let moves = Counter::default();
        registry.register("moves", "Live moves of workloads finished", moves.clone());
        let move_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "move_seconds",
            "How long each live move took, from its start to the handover",
            move_seconds.clone(),
        );
        let restart_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "ha_restart_seconds",
            "From a node declared down to each of its ha workloads' restart written",
            restart_seconds.clone(),
        );
        let ft: Vec<(&'static str, Family<Labels, Gauge>)> = FT_GAUGES
            .iter()
            .map(|(name, help)| {
                let f = Family::<Labels, Gauge>::default();
                registry.register(*name, *help, f.clone());
                (*name, f)
            })
            .collect();
        let followers = [Gauge::default(), Gauge::default(), Gauge::default()];
        for (g, (name, help)) in followers.iter().zip([
            ("event_followers", "Followers of the event stream connected"),
            (
                "event_follower_queued_events",
                "Live events queued for event stream followers, in all",
            ),
            (
                "event_followers_dropped",
                "Event stream followers dropped for falling behind, since the server started",
            ),
        ]) {
            registry.register(name, help, g.clone());
        }
        Metrics {
            ft,
            followers,
            registry,
            http_requests,
            nodes,
            workloads,
            heartbeats,
            auth_failures,
            nodes_down,
            detection_seconds,
            restarts,
            level_changes,
            moves,
            fences,
            move_seconds,
            restart_seconds,
            scrape_lock: std::sync::Mutex::new(()),
        }
    }

    /// Set the gauges from the current nodes' states, workloads' phases and ft figures,
    /// and render; one scrape at a time, and every known state and phase is set (zero
    /// included). Workloads gone since the last scrape leave the ft gauges.
    pub fn scrape(&self, node_states: &[&str], phases: &[&str], ft: &[FtFigures<'_>]) -> String {
        let _one_at_a_time = self.scrape_lock.lock().unwrap_or_else(|p| p.into_inner());
        for (_, f) in &self.ft {
            f.clear();
        }
        for w in ft {
            let labels: Labels = vec![("workload".into(), w.workload.to_string())];
            let s = w.status;
            let values = [
                (
                    "ft_protected",
                    i64::from(avail_model::LevelState::is_protected(
                        w.level_state,
                        avail_model::Level::Ft,
                    )),
                ),
                ("ft_generation", w.generation as i64),
                ("ft_acked_epoch", s.acked_epoch as i64),
                ("ft_lag_ms", s.lag_ms as i64),
                ("ft_lag_bytes", s.lag_bytes as i64),
                ("ft_checkpoints", s.checkpoints as i64),
                ("ft_reply_log_entries", s.reply_log_entries as i64),
                ("ft_reply_log_bytes", s.reply_log_bytes as i64),
                ("ft_reply_log_refusals", s.reply_log_refusals as i64),
            ];
            for (name, f) in &self.ft {
                if let Some((_, v)) = values.iter().find(|(n, _)| n == name) {
                    f.get_or_create(&labels).set(*v);
                } else if *name == "ft_tracker" {
                    let mut l = labels.clone();
                    l.push(("tracker".into(), s.tracker.clone()));
                    f.get_or_create(&l).set(1);
                }
            }
        }
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

    /// Set the event follower gauges.
    pub fn set_followers(&self, f: crate::followers::FollowerFigures) {
        self.followers[0].set(f.active as i64);
        self.followers[1].set(f.queued as i64);
        self.followers[2].set(f.dropped as i64);
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
