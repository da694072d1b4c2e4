//! Background work of the policies: watching their files (and SIGHUP) for reloads, and asking
//! the scale policy about each model periodically. Also builds the policies' views of the
//! catalog's live state.

use super::scale::{ScaleInput, ScaleInstance};
use super::view::{Candidate, Candidates, DeploymentState, InstanceView};
use super::{Hook, PolicyStore, Reload};
use crate::catalog::{Catalog, Deployment};
use crate::metrics::Metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The candidates a route policy sees for these deployments, in their live state.
pub fn candidates_of(deployments: &[Arc<Deployment>]) -> Candidates {
    Arc::new(
        deployments
            .iter()
            .enumerate()
            .map(|(index, d)| {
                let instances: Vec<InstanceView> = d
                    .pool
                    .instances()
                    .into_iter()
                    .map(|(i, healthy)| InstanceView {
                        id: i.id(),
                        healthy,
                        in_flight: i.in_flight() as i64,
                        latency_ms: i.recent_latency().map_or(0, |l| l.as_millis() as i64),
                        ends_in: None,
                        socket: Some(i.socket),
                    })
                    .collect();
                let state = if instances.iter().any(|i| i.healthy) {
                    DeploymentState::Hot
                } else {
                    DeploymentState::Offline
                };
                Arc::new(Candidate {
                    cluster: d.cluster.clone(),
                    framework: d.framework.clone(),
                    state,
                    instances,
                    compute: false,
                    index,
                })
            })
            .collect(),
    )
}

/// Reloads the policies when their files change (checked every `interval`) or on SIGHUP.
pub struct PolicyWatcher {
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    interval: Duration,
}

impl PolicyWatcher {
    pub fn new(store: Arc<PolicyStore>, metrics: Arc<Metrics>, interval: Duration) -> Self {
        PolicyWatcher {
            store,
            metrics,
            interval,
        }
    }

    fn reload(&self) {
        for outcome in self.store.reload() {
            match outcome {
                Reload::Accepted(hook) => {
                    log::info!(
                        "{} policy reloaded (version {})",
                        hook.name(),
                        self.store.current().version
                    );
                    self.count(hook, "accepted");
                }
                Reload::Refused(hook, e) => {
                    log::error!("{e}; the previous {} policy stays in force", hook.name());
                    self.count(hook, "refused");
                }
            }
        }
        self.metrics
            .background_runs
            .with_label_values(&["policy_watch"])
            .inc();
    }

    fn count(&self, hook: Hook, result: &str) {
        self.metrics
            .policy_reloads
            .with_label_values(&[hook.name(), result])
            .inc();
    }
}

#[async_trait]
impl BackgroundService for PolicyWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("cannot listen for SIGHUP ({e}); policies reload on file change only");
                None
            }
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                    log::info!("SIGHUP: reloading policies");
                }
            }
            // File reads and compilation stay off the async workers.
            let this = (self.store.clone(), self.metrics.clone(), self.interval);
            let _ = tokio::task::spawn_blocking(move || {
                PolicyWatcher::new(this.0, this.1, this.2).reload()
            })
            .await;
        }
    }
}

/// Asks the scale policy about every model each interval. Until the cold path exists the
/// actions are logged and counted, not carried out.
pub struct ScaleRunner {
    catalog: Arc<Catalog>,
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    interval: Duration,
    previous: Mutex<DemandSnapshot>,
}

/// Demand totals (requests, prompt bytes) per deployment (by pointer) at the previous run,
/// and when that was.
type DemandSnapshot = (Instant, HashMap<usize, (u64, u64)>);

impl ScaleRunner {
    pub fn new(
        catalog: Arc<Catalog>,
        store: Arc<PolicyStore>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> Self {
        ScaleRunner {
            catalog,
            store,
            metrics,
            interval,
            previous: Mutex::new((Instant::now(), HashMap::new())),
        }
    }

    /// The scale policy's view of each model, with demand since the previous run.
    fn inputs(&self) -> Vec<ScaleInput> {
        let mut previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        let minutes = previous.0.elapsed().as_secs_f64().max(1.0) / 60.0;
        let mut by_model: BTreeMap<&str, ScaleInput> = BTreeMap::new();
        let mut totals = HashMap::new();
        for d in self.catalog.deployments() {
            let requests = d.demand.requests.load(Ordering::Relaxed);
            let bytes = d.demand.prompt_bytes.load(Ordering::Relaxed);
            let key = Arc::as_ptr(d) as usize;
            let (r0, b0) = previous.1.get(&key).copied().unwrap_or((requests, bytes));
            totals.insert(key, (requests, bytes));
            let input = by_model
                .entry(d.model.as_str())
                .or_insert_with(|| ScaleInput {
                    model: d.model.clone(),
                    min_instances: i64::from(d.scaling.min_instances),
                    max_instances: i64::from(d.scaling.max_instances),
                    keep_hot: d.scaling.keep_hot.as_secs() as i64,
                idle_release: d.scaling.idle_release.as_secs() as i64,
                    ..ScaleInput::default()
                });
            if !input.clusters.contains(&d.cluster) {
                input.clusters.push(d.cluster.clone());
            }
            input.requests_per_minute += (requests - r0) as f64 / minutes;
            input.tokens_per_minute += (bytes - b0) as f64 / 4.0 / minutes;
            input.waiting += d.demand.waiting.load(Ordering::Relaxed);
            for (i, healthy) in d.pool.instances() {
                input.in_flight += i.in_flight() as i64;
                input.instances.push(ScaleInstance {
                    id: i.id(),
                    cluster: d.cluster.clone(),
                    age: i.age().as_secs() as i64,
                    idle: i.idle().as_secs() as i64,
                    ends_in: None,
                    healthy,
                });
            }
        }
        *previous = (Instant::now(), totals);
        by_model.into_values().collect()
    }

    fn run(&self) {
        let policies = self.store.current();
        let Some(script) = policies.scale.as_ref() else {
            return;
        };
        for input in self.inputs() {
            let model = input.model.clone();
            match script.scale(input) {
                Ok(actions) => {
                    for action in actions {
                        let (kind, what) = match &action {
                            super::ScaleAction::Start { cluster, count } => {
                                ("start", format!("start {count} on {cluster}"))
                            }
                            super::ScaleAction::Stop { instance } => {
                                ("stop", format!("stop {instance}"))
                            }
                        };
                        log::info!("scale policy for {model}: {what} (not carried out: no cold path configured)");
                        self.metrics
                            .scale_actions
                            .with_label_values(&[&model, kind])
                            .inc();
                    }
                }
                Err(e) => {
                    log::error!("{e}");
                    self.metrics
                        .policy_errors
                        .with_label_values(&["scale"])
                        .inc();
                }
            }
        }
        self.metrics
            .background_runs
            .with_label_values(&["scale"])
            .inc();
    }
}

#[async_trait]
impl BackgroundService for ScaleRunner {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.run(),
            }
        }
    }
}
