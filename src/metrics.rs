//! Prometheus metrics (`firstgate_` prefix), in the gateway's own registry so several gateways
//! can live in one process (tests). Label values are catalog names only, never client input,
//! so cardinality stays bounded; tokens never appear in labels.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 0.5 ms to 5 min: gateway overhead at the low end, long streams at the top.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];
/// Gateway overhead is small: 10 µs to 50 ms.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
];

pub struct Metrics {
    registry: Registry,
    /// Requests by cluster, model and HTTP status.
    pub requests: IntCounterVec,
    /// Whole-request duration.
    pub request_duration: HistogramVec,
    /// Time from the request's arrival to the first response byte from the backend.
    pub time_to_first_byte: HistogramVec,
    /// Proxied requests not finished yet.
    pub in_flight: IntGaugeVec,
    /// 1 when a backend instance passes its health check.
    pub backend_healthy: IntGaugeVec,
    /// Time the gateway itself spent on a request (parsing, lookup, selection, filters).
    pub overhead: HistogramVec,
    /// Upstream attempts retried on another backend.
    pub retries: IntCounterVec,
    /// Runs of background loops by task.
    pub background_runs: IntCounterVec,
    /// Token-cache lookups by outcome (`hit`, `miss`).
    pub auth_cache: IntCounterVec,
    /// Policy reloads by hook and result (`accepted`, `refused`).
    pub policy_reloads: IntCounterVec,
    /// Policy decisions that failed (script error or limit), by hook.
    pub policy_errors: IntCounterVec,
    /// Actions the scale policy asked for, by model and action.
    pub scale_actions: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let cm = &["cluster", "model"];
        Metrics {
            requests: counter(
                "firstgate_requests_total",
                "Requests answered, by cluster, model and HTTP status.",
                &["cluster", "model", "status"],
            ),
            request_duration: hist(
                "firstgate_request_duration_seconds",
                "Time from request arrival to the last response byte.",
                SECONDS_BUCKETS,
                cm,
            ),
            time_to_first_byte: hist(
                "firstgate_time_to_first_byte_seconds",
                "Time from request arrival to the backend's first response byte.",
                SECONDS_BUCKETS,
                cm,
            ),
            in_flight: gauge(
                "firstgate_in_flight_requests",
                "Proxied requests in progress.",
                cm,
            ),
            backend_healthy: gauge(
                "firstgate_backend_healthy",
                "1 when the backend instance passes its health check, else 0.",
                &["cluster", "model", "backend"],
            ),
            overhead: hist(
                "firstgate_gateway_overhead_seconds",
                "Time the gateway spent on a request itself, excluding waits on client and backend.",
                OVERHEAD_BUCKETS,
                &["route"],
            ),
            retries: counter(
                "firstgate_upstream_retries_total",
                "Requests retried on another backend after a connect failure or a stale connection.",
                cm,
            ),
            background_runs: counter(
                "firstgate_background_runs_total",
                "Completed runs of background loops, by task.",
                &["task"],
            ),
            auth_cache: counter(
                "firstgate_auth_cache_lookups_total",
                "Token-cache lookups by outcome; a miss verifies the token with the identity provider.",
                &["outcome"],
            ),
            policy_reloads: counter(
                "firstgate_policy_reloads_total",
                "Policy file changes, by hook and result (a refused change leaves the last good version in force).",
                &["hook", "result"],
            ),
            policy_errors: counter(
                "firstgate_policy_errors_total",
                "Policy decisions that failed with a script error or an exceeded limit, by hook.",
                &["hook"],
            ),
            scale_actions: counter(
                "firstgate_scale_actions_total",
                "Actions returned by the scale policy, by model and action.",
                &["model", "action"],
            ),
            registry,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
