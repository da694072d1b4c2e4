//! The operator's page on the admin listener (`GET /`, one HTML file with its script and
//! styles inside, so it needs no outside asset) and the JSON it reads, which scripts may read
//! too:
//!
//! - `GET /api/state`: readiness, maintenance, clusters → frameworks → models → instances
//!   (state, health, requests in flight, the per-instance cap, recent latency, what the
//!   backend reports itself (vLLM's queue, KV cache, prefix-cache hits), walltime left)
//!   and each cluster's jobs by list,
//!   Globus Compute tasks and recent scale actions with the policy's inputs, refusals and
//!   errors by kind with the recent ones, and the configuration's and policies' versions.
//! - `GET /api/usage?window=1h|24h|7d`: the usage store's records of the window summed up
//!   (`usage::report::summary`), read at most every 10 s per window.

use crate::catalog::SharedCatalog;
use crate::compute::ComputeClient;
use crate::edge::{DrainState, Maintenance};
use crate::metrics::Metrics;
use crate::policy::PolicyStore;
use crate::reload::ConfigReloader;
use crate::usage::Accounting;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The page itself.
pub const PAGE: &str = include_str!("page.html");

/// How long a usage summary is reused (the page refreshes every 5 s).
const USAGE_FRESH: Duration = Duration::from_secs(10);

/// What the page shows, from the parts of the running gateway.
pub struct OperatorPage {
    pub catalog: SharedCatalog,
    pub maintenance: Arc<Maintenance>,
    pub drain: Arc<DrainState>,
    pub metrics: Arc<Metrics>,
    pub policies: Arc<PolicyStore>,
    pub reloader: Arc<ConfigReloader>,
    pub accounting: Arc<Accounting>,
    pub compute: Option<Arc<ComputeClient>>,
    /// Summaries by window, and when they were read.
    usage: Mutex<HashMap<&'static str, (Instant, Value)>>,
}

/// The windows the page offers: name, length, chart bucket.
const WINDOWS: [(&str, Duration, Duration); 3] = [
    ("1h", Duration::from_secs(3600), Duration::from_secs(60)),
    (
        "24h",
        Duration::from_secs(86_400),
        Duration::from_secs(1800),
    ),
    (
        "7d",
        Duration::from_secs(7 * 86_400),
        Duration::from_secs(6 * 3600),
    ),
];

impl OperatorPage {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        catalog: SharedCatalog,
        maintenance: Arc<Maintenance>,
        drain: Arc<DrainState>,
        metrics: Arc<Metrics>,
        policies: Arc<PolicyStore>,
        reloader: Arc<ConfigReloader>,
        accounting: Arc<Accounting>,
        compute: Option<Arc<ComputeClient>>,
    ) -> Self {
        OperatorPage {
            catalog,
            maintenance,
            drain,
            metrics,
            policies,
            reloader,
            accounting,
            compute,
            usage: Mutex::default(),
        }
    }

    /// `GET /api/state`.
    pub fn state(&self) -> Value {
        let notices = self.maintenance.notices();
        let catalog = self.catalog.load_full();
        let clusters: Vec<Value> = catalog
            .clusters()
            .map(|(name, cluster)| {
                let under = notices.clusters.get(name).or(notices.global.as_ref());
                let frameworks: Vec<Value> = cluster
                    .frameworks
                    .iter()
                    .map(|(fw, f)| {
                        let views = crate::policy::candidates_of(&f.deployments);
                        let models: Vec<Value> = f
                            .deployments
                            .iter()
                            .zip(views.iter())
                            .map(|(d, view)| {
                                let draining = !view.instances.is_empty()
                                    && d.pool.instances().iter().all(|(i, _)| i.is_draining());
                                let state = if under.is_some() {
                                    "maintenance"
                                } else if draining {
                                    "draining"
                                } else {
                                    view.state.as_str()
                                };
                                let instances: Vec<Value> = d
                                    .pool
                                    .instances()
                                    .iter()
                                    .zip(&view.instances)
                                    .map(|((i, _), v)| {
                                        json!({"id": v.id, "healthy": v.healthy,
                                               "draining": i.is_draining(), "in_flight": v.in_flight,
                                               "latency_ms": i.recent_latency().map(|l| l.as_millis() as u64),
                                               "walltime_left_s": v.ends_in,
                                               "backend": v.metrics_age_ms.map(|age| json!({
                                                   "waiting": v.waiting, "running": v.running,
                                                   "kv_cache": v.kv_cache,
                                                   "prefix_hit_rate": v.prefix_hit_rate,
                                                   "age_ms": age}))})
                                    })
                                    .collect();
                                json!({"model": d.model, "state": state,
                                       "routing": d.pool.settings.routing.as_str(),
                                       "in_flight": view.instances.iter().map(|i| i.in_flight).sum::<i64>(),
                                       "cap": d.pool.settings.max_concurrent, "instances": instances})
                            })
                            .collect();
                        json!({"name": fw, "models": models})
                    })
                    .collect();
                // The cluster's jobs by list (FIRST's JobsByStatus), when it reports them.
                let report = cluster.jobs.load();
                let jobs: serde_json::Map<String, Value> =
                    match crate::admin::listings::first_jobs_shape((**report).clone()) {
                        Value::Object(lists) => lists
                            .into_iter()
                            .filter_map(|(k, v)| Some((k, json!(v.as_array()?.len()))))
                            .collect(),
                        _ => Default::default(),
                    };
                json!({"name": name, "maintenance": notices.clusters.get(name),
                       "jobs": (!report.is_null()).then_some(jobs), "frameworks": frameworks})
            })
            .collect();
        let (recent, by_kind) = self.metrics.activity.refusals();
        let tasks: serde_json::Map<String, Value> = ["submitted", "success", "failed", "timeout"]
            .iter()
            .map(|s| {
                let n = self.metrics.compute_tasks.with_label_values(&[s]).get();
                (s.to_string(), json!(n))
            })
            .collect();
        let mut config = self.reloader.status();
        config["policies"] = json!(self.policies.status());
        json!({
            "gateway": {"ready": self.drain.not_ready_because().is_none(),
                        "not_ready_because": self.drain.not_ready_because()},
            "maintenance_everything": notices.global,
            "clusters": clusters,
            "compute": {"tasks_in_flight": self.compute.as_ref().map_or(0, |c| c.pending()),
                        "tasks": tasks, "scale_actions": self.metrics.activity.scale_actions()},
            "errors": {"by_kind": by_kind, "recent": recent},
            "config": config,
        })
    }

    /// `GET /api/usage?window=`: `Err` names the windows for an unknown one.
    pub async fn usage(&self, window: Option<&str>) -> Result<Value, String> {
        let window = window.unwrap_or("1h");
        let Some(&(name, length, bucket)) = WINDOWS.iter().find(|w| w.0 == window) else {
            return Err(format!(
                "window '{window}' is not offered: use 1h, 24h or 7d"
            ));
        };
        let fresh = self
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .filter(|(at, _)| at.elapsed() < USAGE_FRESH)
            .map(|(_, v)| v.clone());
        if let Some(v) = fresh {
            return Ok(v);
        }
        let Some(sink) = self.accounting.outputs().sink.clone() else {
            return Ok(json!({"store": false}));
        };
        let since_ms = (crate::activity::unix_now() as i64 - length.as_secs() as i64) * 1000;
        let bucket_ms = bucket.as_millis() as i64;
        let read = tokio::task::spawn_blocking(move || sink.summary(since_ms, bucket_ms))
            .await
            .map_err(|e| e.to_string())?;
        let mut v = match read {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                log::warn!("operator page: cannot read the usage store: {e:#}");
                return Err(format!("cannot read the usage store: {e}"));
            }
            None => return Ok(json!({"store": false})),
        };
        v["store"] = json!(true);
        v["window"] = json!(name);
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, (Instant::now(), v.clone()));
        Ok(v)
    }
}
