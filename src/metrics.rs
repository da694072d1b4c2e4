//! Prometheus metrics (`firstgate_` prefix), in the gateway's own registry so several gateways
//! can live in one process (tests). Label values are catalog names only, never client input,
//! so cardinality stays bounded; tokens never appear in labels.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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

/// The routes a request takes (`Target::route`).
const ROUTES: [&str; 3] = ["local", "direct", "compute"];

pub struct Metrics {
    registry: Registry,
    /// Recent refusals and scale actions for the operator's page (not exported).
    pub activity: crate::activity::Activity,
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
    /// What each instance reports itself (vLLM's `/metrics`, last successful read).
    pub backend_waiting: IntGaugeVec,
    pub backend_running: IntGaugeVec,
    pub backend_kv_cache: GaugeVec,
    pub backend_prefix_hit_rate: GaugeVec,
    pub backend_metrics_age: GaugeVec,
    /// Time the gateway itself spent on a request (parsing, lookup, selection, filters).
    pub overhead: HistogramVec,
    /// Upstream attempts retried on another backend.
    pub retries: IntCounterVec,
    /// Runs of background loops by task.
    pub background_runs: IntCounterVec,
    /// Token-cache lookups by outcome (`hit`, `shared`, `miss`).
    pub auth_cache: IntCounterVec,
    /// Policy reloads by hook and result (`accepted`, `refused`).
    pub policy_reloads: IntCounterVec,
    /// Configuration reloads (SIGHUP, `POST /reload`), by result (`applied`, `refused`).
    pub config_reloads: IntCounterVec,
    /// Policy decisions that failed (script error or limit), by hook.
    pub policy_errors: IntCounterVec,
    /// Actions the scale policy asked for, by model and action.
    pub scale_actions: IntCounterVec,
    /// Tokens by cluster, model and kind (`prompt`, `completion`).
    pub tokens: IntCounterVec,
    /// Requests refused by a rate limit, by limit.
    pub rate_limited: IntCounterVec,
    /// Usage records waiting to be written.
    pub usage_queue: IntGauge,
    /// Usage records written to the store.
    pub usage_written: IntCounter,
    /// Usage records lost (queue full or write error).
    pub usage_dropped: IntCounter,
    /// Rows deleted by retention, by table (`usage`, `usage_hourly`).
    pub usage_deleted: IntCounterVec,
    /// Raw rows rolled up after they were written (a store from before rollups).
    pub usage_backfilled: IntCounter,
    /// Responses too large to read their usage from (tokens recorded as unknown).
    pub usage_unscanned: IntCounter,
    /// Failed attempts to write a batch of usage records (each is retried).
    pub usage_write_errors: IntCounter,
    /// Access-log lines lost (the writer fell behind, or could not write).
    pub access_log_dropped: IntCounter,
    /// Globus Compute tasks by outcome (`submitted`, `success`, `failed`, `timeout`).
    pub compute_tasks: IntCounterVec,
    /// Time of each call to the shared state (Redis), by operation.
    pub redis_seconds: HistogramVec,
    /// Calls to the shared state that failed or timed out, by operation.
    pub redis_errors: IntCounterVec,
    /// Unfinished batches by status (`validating`, `in_progress`, `finalizing`, `cancelling`).
    pub batches: IntGaugeVec,
    /// Batch lines done, by result (`completed`, `failed`).
    pub batch_lines: IntCounterVec,
    /// Batch lines not done yet, over every running batch.
    pub batch_lines_waiting: IntGauge,
    /// Backend instances by state (`serving`, `unhealthy`, `draining`).
    pub instances: IntGaugeVec,
    /// Client connections open on the API listeners.
    pub connections: IntGauge,
    /// Client connections the gateway closed before or between requests, by reason.
    pub connections_closed: IntCounterVec,
    /// Times the accept loop paused because `edge.max_connections` were open.
    pub accept_waits: IntCounter,
    /// Series every request touches, resolved once (see [`DeploymentMetrics`]).
    overhead_by_route: [Histogram; 3],
    /// `auth_cache{outcome="hit"}`.
    pub auth_cache_hits: IntCounter,
    /// Route decisions of a script, reused for a request in the same situation
    /// (`policy::memo`).
    pub route_decisions_reused: IntCounter,
}

/// One deployment's series that every request to it updates, resolved once per deployment
/// (the catalog keeps them): `with_label_values` hashes the labels and takes a lock on each
/// call. A deployment built anew (catalog reload) resolves its own; the series themselves live
/// in the registry and carry on.
#[derive(Debug)]
pub struct DeploymentMetrics {
    /// `requests_total{status="200"}` (other statuses are looked up when they happen).
    pub answered_ok: IntCounter,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub duration: Histogram,
    pub time_to_first_byte: Histogram,
    pub in_flight: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            registered(&registry, HistogramVec::new(opts, labels))
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let float_gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, GaugeVec::new(Opts::new(name, help), labels))
        };
        let cm = &["cluster", "model"];
        let overhead = hist(
            "firstgate_gateway_overhead_seconds",
            "Time the gateway spent on a request itself, excluding waits on client and backend.",
            OVERHEAD_BUCKETS,
            &["route"],
        );
        let auth_cache = counter(
            "firstgate_auth_cache_lookups_total",
            "Token-cache lookups by outcome; `shared` came from the replicas' Redis, a miss verifies the token with the identity provider, `joined` waited for another request's verification of the same token.",
            &["outcome"],
        );
        Metrics {
            activity: Default::default(),
            overhead_by_route: ROUTES.map(|r| overhead.with_label_values(&[r])),
            auth_cache_hits: auth_cache.with_label_values(&["hit"]),
            overhead,
            auth_cache,
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
            backend_waiting: gauge(
                "firstgate_backend_waiting",
                "Requests waiting in the backend instance's own queue (vllm:num_requests_waiting), as last read.",
                &["cluster", "model", "backend"],
            ),
            backend_running: gauge(
                "firstgate_backend_running",
                "Requests the backend instance is running (vllm:num_requests_running), as last read.",
                &["cluster", "model", "backend"],
            ),
            backend_kv_cache: float_gauge(
                "firstgate_backend_kv_cache_usage",
                "KV-cache use of the backend instance, 0 to 1 (vllm:kv_cache_usage_perc), as last read.",
                &["cluster", "model", "backend"],
            ),
            backend_prefix_hit_rate: float_gauge(
                "firstgate_backend_prefix_cache_hit_rate",
                "Share of prompt tokens the backend instance found in its prefix cache between its last two reads.",
                &["cluster", "model", "backend"],
            ),
            backend_metrics_age: float_gauge(
                "firstgate_backend_metrics_age_seconds",
                "Time since the backend instance's metrics were last read successfully (grows while reads fail).",
                &["cluster", "model", "backend"],
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
            config_reloads: counter(
                "firstgate_config_reloads_total",
                "Configuration reloads (SIGHUP or POST /reload), by result: applied, or refused (the last good configuration stays).",
                &["result"],
            ),
            policy_reloads: counter(
                "firstgate_policy_reloads_total",
                "Policy file changes, by hook and result (a refused change leaves the last good version in force).",
                &["hook", "result"],
            ),
            route_decisions_reused: registered(
                &registry,
                IntCounter::new(
                    "firstgate_route_decisions_reused_total",
                    "Requests routed by a route script's earlier decision for the same situation instead of running the script (a script that reads no loads, times, headers or prompt sizes; README, \"Decisions reused\").",
                ),
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
            tokens: counter(
                "firstgate_tokens_total",
                "Tokens by cluster, model and kind (prompt, completion), from the backends' usage.",
                &["cluster", "model", "kind"],
            ),
            rate_limited: counter(
                "firstgate_rate_limited_total",
                "Requests answered 429 by a rate limit, by limit.",
                &["limit"],
            ),
            usage_queue: registered(
                &registry,
                IntGauge::new(
                    "firstgate_usage_queue_depth",
                    "Usage records waiting to be written.",
                ),
            ),
            usage_written: registered(
                &registry,
                IntCounter::new(
                    "firstgate_usage_records_written_total",
                    "Usage records committed to the store.",
                ),
            ),
            usage_dropped: registered(
                &registry,
                IntCounter::new(
                    "firstgate_usage_records_dropped_total",
                    "Usage records lost because the queue was full or the store failed.",
                ),
            ),
            usage_deleted: counter(
                "firstgate_usage_rows_deleted_total",
                "Usage rows deleted by retention (usage.retention, usage.rollup_retention), by \
                 table.",
                &["table"],
            ),
            usage_backfilled: registered(
                &registry,
                IntCounter::new(
                    "firstgate_usage_rows_backfilled_total",
                    "Raw usage rows added into the hourly rollups after they were written (a \
                     store from before rollups).",
                ),
            ),
            usage_unscanned: registered(
                &registry,
                IntCounter::new(
                    "firstgate_usage_unscanned_total",
                    "Responses passed through without reading their usage (an SSE event over 1 MiB \
                     or a JSON answer over 4 MiB); their records' tokens are unknown.",
                ),
            ),
            usage_write_errors: registered(
                &registry,
                IntCounter::new(
                    "firstgate_usage_write_errors_total",
                    "Failed attempts to write a batch of usage records (locked, full or read-only \
                     store); each batch is retried with back-off.",
                ),
            ),
            access_log_dropped: registered(
                &registry,
                IntCounter::new(
                    "firstgate_access_log_dropped_total",
                    "Access-log lines lost because the writer fell behind or could not write.",
                ),
            ),
            redis_seconds: hist(
                "firstgate_redis_seconds",
                "Time of each call to the shared state in Redis (state.redis), by operation.",
                OVERHEAD_BUCKETS,
                &["op"],
            ),
            redis_errors: counter(
                "firstgate_redis_errors_total",
                "Calls to Redis that failed or timed out, by operation; limits then follow \
                 state.redis.on_error.",
                &["op"],
            ),
            compute_tasks: counter(
                "firstgate_compute_tasks_total",
                "Globus Compute tasks of the cold path by outcome.",
                &["state"],
            ),
            batches: gauge(
                "firstgate_batches",
                "Unfinished batches of the OpenAI Batch API, by status.",
                &["status"],
            ),
            batch_lines: counter(
                "firstgate_batch_lines_total",
                "Batch lines done, by result (completed: a 2xx answer; failed: another).",
                &["result"],
            ),
            batch_lines_waiting: registered(
                &registry,
                IntGauge::new(
                    "firstgate_batch_lines_waiting",
                    "Lines of running batches not done yet (the batch queue's depth).",
                ),
            ),
            instances: gauge(
                "firstgate_instances",
                "Backend instances by cluster, model and state (serving, unhealthy, draining).",
                &["cluster", "model", "state"],
            ),
            connections: registered(
                &registry,
                IntGauge::new(
                    "firstgate_client_connections",
                    "Client connections open on the API listeners.",
                ),
            ),
            connections_closed: counter(
                "firstgate_client_connections_closed_total",
                "Client connections closed by the gateway before or between requests, by reason \
                 (max_connections_per_ip, tls_handshake_timeout, tls_handshake_failed, \
                 header_timeout, header_too_large, reclaimed_idle, reclaimed_silent).",
                &["reason"],
            ),
            accept_waits: registered(
                &registry,
                IntCounter::new(
                    "firstgate_accept_waits_total",
                    "Times accepting paused because edge.max_connections were open (new \
                     connections wait in the listen backlog).",
                ),
            ),
            registry,
        }
    }

    /// The series of one deployment's requests (resolve once, keep: see [`DeploymentMetrics`]).
    pub fn deployment(&self, cluster: &str, model: &str) -> DeploymentMetrics {
        let cm = [cluster, model];
        DeploymentMetrics {
            answered_ok: self.requests.with_label_values(&[cluster, model, "200"]),
            prompt_tokens: self.tokens.with_label_values(&[cluster, model, "prompt"]),
            completion_tokens: self
                .tokens
                .with_label_values(&[cluster, model, "completion"]),
            duration: self.request_duration.with_label_values(&cm),
            time_to_first_byte: self.time_to_first_byte.with_label_values(&cm),
            in_flight: self.in_flight.with_label_values(&cm),
        }
    }

    /// Observes a request's `gateway_overhead_seconds` on its route (`local`, `direct` or
    /// `compute`).
    pub fn observe_overhead(&self, route: &str, seconds: f64) {
        match ROUTES.iter().position(|r| *r == route) {
            Some(i) => self.overhead_by_route[i].observe(seconds),
            None => self.overhead.with_label_values(&[route]).observe(seconds),
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

/// A status code as a static label value (no allocation per request).
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        411 => "411",
        413 => "413",
        422 => "422",
        429 => "429",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        0 => "0",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

/// Registers a metric whose definition is static (a failure is a programming error).
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("a valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("a unique metric name");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
