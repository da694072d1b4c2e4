//! The hot-node lifecycle: per cluster, a poller runs the status function (FIRST's qstat) and
//! turns the report into instances of each model (a running instance serves once its health
//! check passes; one whose job ends soon is drained; one that disappears is removed), and the
//! scale policy's `start` / `stop` actions become start and stop tasks.

use super::{ComputeClient, ComputeError};
use crate::catalog::{Deployment, JobInfo, JobState, LiveState, SharedCatalog};
use crate::config::BackendAddr;
use crate::metrics::Metrics;
use crate::model_name::normalize;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the status task may take.
const STATUS_WAIT: Duration = Duration::from_secs(60);
/// How long a start request counts as "starting" before its job shows up in a report.
const START_GRACE: Duration = Duration::from_secs(300);

/// How soon a cluster that a reload added is polled at the latest.
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// Polls every cluster's status function and keeps the deployments' instances in line.
pub struct ClusterLifecycle {
    catalog: SharedCatalog,
    /// Globus Compute, for clusters with a `compute:` lifecycle.
    client: Option<Arc<ComputeClient>>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl ClusterLifecycle {
    pub fn new(
        catalog: SharedCatalog,
        client: Option<Arc<ComputeClient>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ClusterLifecycle {
            catalog,
            client,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            metrics,
        }
    }

    /// One status round for `cluster`.
    pub async fn refresh(&self, cluster: &str) -> Result<(), String> {
        let deployments: Vec<Arc<Deployment>> = self
            .catalog
            .load_full()
            .deployments()
            .filter(|d| d.cluster == cluster)
            .cloned()
            .collect();
        if let Some(s) = deployments.iter().find_map(|d| d.status_url.clone()) {
            return self.refresh_from_url(cluster, &s.url, &deployments).await;
        }
        let (Some(lc), Some(client)) = (
            deployments.iter().find_map(|d| d.lifecycle.clone()),
            &self.client,
        ) else {
            return Ok(());
        };
        self.refresh_from_compute(cluster, &lc, client, &deployments)
            .await
            .map_err(|e| e.to_string())
    }

    /// A Metis-style status URL: `{id: {model, status}}`; models not `Live` take no requests.
    async fn refresh_from_url(
        &self,
        cluster: &str,
        url: &str,
        deployments: &[Arc<Deployment>],
    ) -> Result<(), String> {
        let report: Value = self
            .http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("status URL: {e}"))?
            .json()
            .await
            .map_err(|e| format!("status URL: {e}"))?;
        let mut running = Vec::new();
        let mut stopped = Vec::new();
        for d in deployments {
            let want = normalize(&d.backend_model);
            let entry = report
                .as_object()
                .into_iter()
                .flatten()
                .find(|(_, v)| v["model"].as_str().is_some_and(|m| normalize(m) == want));
            let live = entry.is_some_and(|(_, v)| v["status"].as_str() == Some("Live"));
            for (instance, _) in d.pool.instances() {
                instance.set_draining(!live);
            }
            let status = entry
                .and_then(|(_, v)| v["status"].as_str())
                .unwrap_or("Unknown");
            let job = json!({"Models": d.model, "Framework": d.framework, "Cluster": cluster,
                             "Model Status": if live { "running" } else { "stopped" },
                             "Job ID": entry.map(|(id, _)| id.as_str()).unwrap_or_default(),
                             "Job Comments": status});
            if live {
                running.push(job)
            } else {
                stopped.push(job)
            }
        }
        if let Some(entry) = self.catalog.load_full().cluster(cluster) {
            entry
                .jobs
                .store(Arc::new(json!({"running": running, "stopped": stopped})));
        }
        Ok(())
    }

    async fn refresh_from_compute(
        &self,
        cluster: &str,
        lc: &crate::config::ClusterCompute,
        client: &ComputeClient,
        deployments: &[Arc<Deployment>],
    ) -> Result<(), ComputeError> {
        let report = client
            .run(&lc.endpoint, &lc.status_function, &[], STATUS_WAIT)
            .await?;
        let report = super::serialize::unwrap_json_string(report);
        if let Some(entry) = self.catalog.load_full().cluster(cluster) {
            entry.jobs.store(Arc::new(report.clone()));
        }
        for d in deployments {
            let api_port = d.compute.as_ref().map_or(8000, |c| c.api_port);
            let walltime = lc.job_walltime.unwrap_or(d.scaling.keep_hot);
            let jobs = jobs_of(&report, d, api_port, walltime);
            let addrs: Vec<BackendAddr> = jobs
                .iter()
                .filter(|j| j.state != JobState::Queued)
                .filter_map(|j| j.host.as_deref())
                .filter_map(|h| BackendAddr::parse(h, false).ok())
                .collect();
            if d.pool.set_dynamic(addrs) {
                d.pool.discover().await;
                d.pool.check_health().await;
            }
            // Instances whose job ends soon take no new requests.
            let drain_before = lc.drain_before.as_secs() as i64;
            for (instance, _) in d.pool.instances() {
                let ending = jobs.iter().any(|j| {
                    j.host.as_deref() == Some(instance.id())
                        && j.ends_in().is_some_and(|left| left <= drain_before)
                });
                if ending && !instance.is_draining() {
                    log::info!(
                        "draining {} of {} on {cluster}: its job ends soon",
                        instance.id(),
                        d.model
                    );
                }
                instance.set_draining(ending);
            }
            let endpoint_online = match &d.compute {
                Some(c) => client
                    .endpoint_status(&c.endpoint)
                    .await
                    .ok()
                    .map(|s| s.online),
                None => None,
            };
            d.live.store(Arc::new(LiveState {
                jobs,
                endpoint_online,
            }));
        }
        Ok(())
    }

    fn clusters(&self) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        for d in self.catalog.load_full().deployments() {
            let interval = match (&d.status_url, &d.lifecycle) {
                (Some(s), _) => s.interval,
                (None, Some(lc)) if self.client.is_some() => lc.status_interval,
                _ => continue,
            };
            if !out.iter().any(|(c, _)| *c == d.cluster) {
                out.push((d.cluster.clone(), interval));
            }
        }
        out
    }
}

/// The jobs of the report that run `d`'s model, as FIRST's qstat function reports them
/// (`compute-functions/qstat_register_function.py`): `Host Name` is PBS's `exec_host`, `Job
/// State` PBS's state, `Walltime` the time used so far (`resources_used.walltime`). An
/// instance is the job's first host at the model's `api_port`; its job ends `walltime` after
/// it started.
fn jobs_of(report: &Value, d: &Deployment, api_port: u16, walltime: Duration) -> Vec<JobInfo> {
    let want = normalize(&d.backend_model);
    let mut out = Vec::new();
    // FIRST lists a starting job under `running` with `Model Status: starting`; a `starting`
    // list of its own is read too.
    for (key, listed_state) in [
        ("running", JobState::Running),
        ("starting", JobState::Starting),
        ("queued", JobState::Queued),
    ] {
        for job in report[key].as_array().into_iter().flatten() {
            let state = match (job["Job State"].as_str(), job["Model Status"].as_str()) {
                (Some("Q"), _) | (_, Some("queued")) => JobState::Queued,
                (_, Some("starting")) => JobState::Starting,
                _ => listed_state,
            };
            let models = job["Models"].as_str().unwrap_or_default();
            let framework = job["Framework"].as_str().unwrap_or(&d.framework);
            if framework != d.framework || !models.split(',').any(|m| normalize(m.trim()) == want) {
                continue;
            }
            out.push(JobInfo {
                id: job["Job ID"].as_str().unwrap_or_default().to_string(),
                state,
                host: job["Host Name"]
                    .as_str()
                    .and_then(head_node)
                    .map(|h| format!("{h}:{api_port}")),
                walltime_left: job["Walltime"]
                    .as_str()
                    .and_then(seconds_of_hms)
                    .map(|used| (walltime.as_secs().saturating_sub(used), Instant::now())),
            });
        }
    }
    out
}

/// The node running a job's first (head) process, from PBS's `exec_host`
/// (`x1000c0s0b0n0/0*64+x1000c0s0b1n0/0*64`); `None` for `N/A` (not running yet).
fn head_node(exec_host: &str) -> Option<&str> {
    if exec_host.trim() == "N/A" {
        return None;
    }
    let first = exec_host.split('+').next()?.trim();
    let host = first.split('/').next()?.trim();
    (!host.is_empty()).then_some(host)
}

/// `HH:MM:SS` (hours may exceed 24) as seconds.
fn seconds_of_hms(t: &str) -> Option<u64> {
    let mut parts = t.trim().split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(h * 3600 + m * 60 + s)
}

#[async_trait]
impl BackgroundService for ClusterLifecycle {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut next: HashMap<String, Instant> = HashMap::new();
        loop {
            // Read each round: a reload may add or remove clusters.
            let clusters = self.clusters();
            next.retain(|c, _| clusters.iter().any(|(name, _)| name == c));
            for (cluster, interval) in &clusters {
                if next.get(cluster).is_some_and(|t| Instant::now() < *t) {
                    continue;
                }
                if let Err(e) = self.refresh(cluster).await {
                    log::warn!("status of cluster {cluster}: {e}");
                }
                self.metrics
                    .background_runs
                    .with_label_values(&["cluster_status"])
                    .inc();
                next.insert(cluster.clone(), Instant::now() + *interval);
            }
            let wake = next
                .values()
                .min()
                .copied()
                .unwrap_or_else(|| Instant::now() + IDLE_CHECK)
                .min(Instant::now() + IDLE_CHECK);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}

/// Sends submissions in batches and delivers the results of every pending task (one
/// `batch_status` call per interval).
pub struct TaskPoller(pub Arc<ComputeClient>);

#[async_trait]
impl BackgroundService for TaskPoller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = self.0.poll_forever() => {}
            _ = self.0.submit_forever() => {}
        }
    }
}

/// Carries out scale actions: `start` and `stop` tasks on the cluster's endpoint.
pub struct ScaleExecutor {
    client: Arc<ComputeClient>,
    /// Starts requested per deployment (by pointer) and not yet seen in a status report.
    pending: Arc<Mutex<PendingStarts>>,
}

/// Per deployment (by pointer): the job id once known, and when the start was asked.
type PendingStarts = HashMap<usize, Vec<(Option<String>, Instant)>>;

impl ScaleExecutor {
    pub fn new(client: Arc<ComputeClient>) -> Self {
        ScaleExecutor {
            client,
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl crate::policy::ScaleActuator for ScaleExecutor {
    /// Instances requested for `d` that no report shows yet.
    fn pending_starts(&self, d: &Arc<Deployment>) -> usize {
        let live = d.live.load();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let list = pending.entry(Arc::as_ptr(d) as usize).or_default();
        list.retain(|(job, at)| {
            at.elapsed() < START_GRACE
                && !job
                    .as_ref()
                    .is_some_and(|id| live.jobs.iter().any(|j| &j.id == id))
        });
        list.len()
    }

    /// Submits the start function for `count` instances of `d`.
    fn start(&self, d: &Arc<Deployment>, count: u32) {
        let Some(lc) = &d.lifecycle else {
            log::warn!(
                "scale policy asked to start {} on {}, which has no lifecycle",
                d.model,
                d.cluster
            );
            return;
        };
        let Some(function) = lc.start_function.clone() else {
            log::warn!(
                "cluster {} has no start_function; cannot start {}",
                d.cluster,
                d.model
            );
            return;
        };
        let key = Arc::as_ptr(d) as usize;
        let at = Instant::now();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let list = pending.entry(key).or_default();
            list.extend((0..count).map(|_| (None, at)));
        }
        let args = [
            json!({"model": d.backend_model, "framework": d.framework, "cluster": d.cluster,
                   "count": count, "walltime": d.scaling.keep_hot.as_secs(),
                   "api_port": d.compute.as_ref().map_or(8000, |c| c.api_port)}),
        ];
        let (client, pending, endpoint, what) = (
            self.client.clone(),
            self.pending.clone(),
            lc.endpoint.clone(),
            format!("{} on {}", d.model, d.cluster),
        );
        tokio::spawn(async move {
            match client.run(&endpoint, &function, &args, STATUS_WAIT).await {
                Ok(v) => {
                    let ids: Vec<String> = v["job_ids"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|j| j.as_str().map(str::to_owned))
                        .collect();
                    log::info!("started {what}: jobs {ids:?}");
                    let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                    let list = pending.entry(key).or_default();
                    list.retain(|(job, t)| job.is_some() || *t != at);
                    list.extend(ids.into_iter().map(|id| (Some(id), at)));
                }
                Err(e) => {
                    log::error!("starting {what} failed: {e}");
                    let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                    pending.entry(key).or_default().retain(|(_, t)| *t != at);
                }
            }
        });
    }

    /// Submits the stop function for the job behind `instance` (its `host:port`).
    fn stop(&self, d: &Arc<Deployment>, instance: &str) {
        let (Some(lc), Some(job)) = (
            &d.lifecycle,
            d.live
                .load()
                .jobs
                .iter()
                .find(|j| j.host.as_deref() == Some(instance))
                .map(|j| j.id.clone()),
        ) else {
            log::warn!(
                "scale policy asked to stop {instance}, which is not a job of {} on {}",
                d.model,
                d.cluster
            );
            return;
        };
        let Some(function) = lc.stop_function.clone() else {
            log::warn!(
                "cluster {} has no stop_function; cannot stop {instance}",
                d.cluster
            );
            return;
        };
        let Some(target) = d
            .pool
            .instances()
            .into_iter()
            .find(|(i, _)| i.id() == instance)
        else {
            return;
        };
        let target = target.0;
        // New requests go elsewhere at once; one stop task per instance.
        if !target.set_stopping(true) {
            return;
        }
        let (client, endpoint) = (self.client.clone(), lc.endpoint.clone());
        let instance = instance.to_string();
        tokio::spawn(async move {
            match client
                .run(&endpoint, &function, &[json!({"job_id": job})], STATUS_WAIT)
                .await
            {
                Ok(_) => log::info!("stopped {instance} (job {job})"),
                Err(e) => {
                    // It serves again, and the scale policy may try again.
                    target.set_stopping(false);
                    log::error!("stopping {instance} (job {job}) failed: {e}");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbs_exec_host_and_walltime_are_read() {
        assert_eq!(head_node("x1000c0s0b0n0/0*64"), Some("x1000c0s0b0n0"));
        assert_eq!(
            head_node("x1000c0s0b0n0/0*64+x1000c0s0b1n0/0*64"),
            Some("x1000c0s0b0n0")
        );
        assert_eq!(head_node("N/A"), None);
        assert_eq!(head_node(""), None);
        assert_eq!(seconds_of_hms("01:02:03"), Some(3723));
        assert_eq!(seconds_of_hms("100:00:00"), Some(360_000));
        assert_eq!(seconds_of_hms("N/A"), None);
    }
}
