//! Background work of the policies: watching their files (and SIGHUP) for reloads, and asking
//! the scale policy about each model periodically. Also builds the policies' views of the
//! catalog's live state.

use super::scale::{ScaleInput, ScaleInstance};
use super::view::{Candidate, Candidates, DeploymentState, InstanceView};
use super::{Hook, PolicyStore, Reload};
use crate::catalog::{Deployment, JobState, SharedCatalog};
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
                let live = d.live.load();
                let instances: Vec<InstanceView> = d
                    .pool
                    .instances()
                    .into_iter()
                    .map(|(i, healthy)| {
                        let ends_in = live.ends_in(i.id());
                        let reported = i.reported();
                        InstanceView {
                            healthy,
                            in_flight: i.in_flight() as i64,
                            latency_ms: i.recent_latency().map_or(0, |l| l.as_millis() as i64),
                            ends_in,
                            waiting: reported.map_or(0, |r| r.waiting),
                            running: reported.map_or(0, |r| r.running),
                            kv_cache: reported.and_then(|r| r.kv_cache),
                            prefix_hit_rate: reported.and_then(|r| r.prefix_hit_rate),
                            metrics_age_ms: reported.map(|r| r.age.as_millis() as i64),
                            socket: Some(i.socket),
                            id: i.id().to_owned(),
                        }
                    })
                    .collect();
                let compute = d.compute.is_some() && live.endpoint_online != Some(false);
                let state = state_of(d, instances.iter().any(|i| i.healthy));
                Arc::new(Candidate {
                    cluster: d.cluster.clone(),
                    framework: d.framework.clone(),
                    state,
                    instances,
                    compute,
                    index,
                    routing: d.pool.settings.routing,
                    affinity_slack: d.pool.settings.affinity_slack,
                })
            })
            .collect(),
    )
}

/// A deployment's state: hot with an instance taking requests; else starting or queued from
/// its jobs; else cold if it can run through Compute or be started; else offline.
pub fn state_of(d: &Deployment, serving: bool) -> DeploymentState {
    let live = d.live.load();
    let has = |s: JobState| live.jobs.iter().any(|j| j.state == s);
    if serving {
        DeploymentState::Hot
    } else if has(JobState::Starting) || has(JobState::Running) {
        DeploymentState::Starting
    } else if has(JobState::Queued) {
        DeploymentState::Queued
    } else if (d.compute.is_some() && live.endpoint_online != Some(false))
        || d.lifecycle
            .as_ref()
            .is_some_and(|l| l.start_function.is_some())
    {
        DeploymentState::Cold
    } else {
        DeploymentState::Offline
    }
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
}

/// One reload round, logged and counted (runs on a blocking thread: file reads, compilation).
fn reload(store: &PolicyStore, metrics: &Metrics) {
    for outcome in store.reload() {
        let (hook, result) = match outcome {
            Reload::Accepted(hook) => {
                let now = store.current();
                // A route script says whether its decisions are reused: an edit may change it.
                let reuse = match (hook, &now.route) {
                    (Hook::Route, Some(script)) => script.reuse().map(|r| format!("; {r}")),
                    _ => None,
                };
                log::info!(
                    "{} policy reloaded (version {}){}",
                    hook.name(),
                    now.version,
                    reuse.unwrap_or_default()
                );
                (hook, "accepted")
            }
            Reload::Refused(hook, e) => {
                log::error!("{e}; the previous {} policy stays in force", hook.name());
                (hook, "refused")
            }
        };
        metrics
            .policy_reloads
            .with_label_values(&[hook.name(), result])
            .inc();
    }
    metrics
        .background_runs
        .with_label_values(&["policy_watch"])
        .inc();
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
            let (store, metrics) = (self.store.clone(), self.metrics.clone());
            let _ = tokio::task::spawn_blocking(move || reload(&store, &metrics)).await;
        }
    }
}

/// Carries out scale actions (the cluster lifecycle implements it).
pub trait ScaleActuator: Send + Sync {
    /// Starts `count` instances of `d`.
    fn start(&self, d: &Arc<Deployment>, count: u32);
    /// Stops the instance `instance` (`host:port`) of `d`.
    fn stop(&self, d: &Arc<Deployment>, instance: &str);
    /// Instances of `d` requested and not reported yet.
    fn pending_starts(&self, d: &Arc<Deployment>) -> usize;
}

/// Asks the scale policy about every model each interval (and soon after a request found no
/// hot instance), and hands its actions to the actuator; without one they are only logged.
pub struct ScaleRunner {
    catalog: SharedCatalog,
    store: Arc<PolicyStore>,
    metrics: Arc<Metrics>,
    interval: Duration,
    actuator: Option<Arc<dyn ScaleActuator>>,
    /// Wakes the runner early (a request found no hot instance).
    pub wake: Arc<tokio::sync::Notify>,
    previous: Mutex<DemandSnapshot>,
}

/// Demand totals (requests, prompt bytes) per deployment (by pointer) at the previous run,
/// and when that was.
type DemandSnapshot = (Instant, HashMap<usize, (u64, u64)>);

impl ScaleRunner {
    pub fn new(
        catalog: SharedCatalog,
        store: Arc<PolicyStore>,
        metrics: Arc<Metrics>,
        interval: Duration,
        actuator: Option<Arc<dyn ScaleActuator>>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Self {
        ScaleRunner {
            catalog,
            store,
            metrics,
            interval,
            actuator,
            wake,
            previous: Mutex::new((Instant::now(), HashMap::new())),
        }
    }

    /// The scale policy's view of each model, with demand since the previous run.
    fn inputs(&self) -> Vec<ScaleInput> {
        let mut previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        let minutes = previous.0.elapsed().as_secs_f64().max(1.0) / 60.0;
        let mut by_model: BTreeMap<&str, ScaleInput> = BTreeMap::new();
        let mut totals = HashMap::new();
        let catalog = self.catalog.load_full();
        for d in catalog.deployments() {
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
            input.cold_waiting += d.demand.cold.load(Ordering::Relaxed);
            let live = d.live.load();
            let starting = live
                .jobs
                .iter()
                .filter(|j| j.state != JobState::Running)
                .count()
                + self.actuator.as_ref().map_or(0, |a| a.pending_starts(d));
            input.starting += starting as i64;
            for (i, healthy) in d.pool.instances() {
                input.in_flight += i.in_flight() as i64;
                if let Some(r) = i.reported().filter(|_| healthy) {
                    input.backend_waiting += r.waiting;
                    input.backend_running += r.running;
                }
                // Draining instances are on their way out: the policy may replace them.
                if i.is_draining() {
                    continue;
                }
                let ends_in = live.ends_in(i.id());
                input.instances.push(ScaleInstance {
                    id: i.id().to_owned(),
                    cluster: d.cluster.clone(),
                    age: i.age().as_secs() as i64,
                    idle: i.idle().as_secs() as i64,
                    ends_in,
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
            // What the policy saw, for the operator's page.
            let why = format!(
                "{:.1} requests/min, {} waiting for a slot, {} through Compute, {} in flight, \
                 {} queued in the backends, instances {}..{}",
                input.requests_per_minute,
                input.waiting,
                input.cold_waiting,
                input.in_flight,
                input.backend_waiting,
                input.min_instances,
                input.max_instances
            );
            match script.scale(input) {
                Ok(actions) => {
                    for action in actions {
                        self.metrics.activity.scaled(crate::activity::ScaleEvent {
                            at: crate::activity::unix_now(),
                            model: model.clone(),
                            action: match &action {
                                super::ScaleAction::Start { cluster, count } => {
                                    format!("start {count} on {cluster}")
                                }
                                super::ScaleAction::Stop { instance } => format!("stop {instance}"),
                            },
                            why: why.clone(),
                        });
                        self.carry_out(&model, &action);
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

    fn carry_out(&self, model: &str, action: &super::ScaleAction) {
        let kind = match action {
            super::ScaleAction::Start { .. } => "start",
            super::ScaleAction::Stop { .. } => "stop",
        };
        self.metrics
            .scale_actions
            .with_label_values(&[model, kind])
            .inc();
        let Some(actuator) = &self.actuator else {
            log::info!("scale policy for {model}: {action:?} (not carried out: no Globus Compute configured)");
            return;
        };
        let catalog = self.catalog.load_full();
        let of_model = || catalog.deployments().filter(move |d| d.model == model);
        match action {
            super::ScaleAction::Start { cluster, count } => {
                match of_model().find(|d| &d.cluster == cluster) {
                    Some(d) => {
                        log::info!("scale policy: start {count} of {model} on {cluster}");
                        actuator.start(d, *count);
                    }
                    None => log::warn!(
                        "scale policy asked to start {model} on {cluster}, which does not serve it"
                    ),
                }
            }
            super::ScaleAction::Stop { instance } => {
                let owner = of_model()
                    .find(|d| d.pool.instances().iter().any(|(i, _)| i.id() == *instance));
                match owner {
                    Some(d) => {
                        log::info!("scale policy: stop {instance} of {model}");
                        actuator.stop(d, instance);
                    }
                    None => log::warn!("scale policy asked to stop {instance}, which is not an instance of {model}"),
                }
            }
        }
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
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            self.run();
        }
    }
}
