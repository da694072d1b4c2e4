//! The background service that keeps every deployment's backend state fresh: health checks
//! each interval, each instance's own metrics (vLLM's queue, KV cache, prefix-cache hits) on
//! their own interval, and host-name re-resolution less often. Publishes them as metrics.

use super::{backend_metrics, SharedCatalog};
use crate::metrics::Metrics;
use async_trait::async_trait;
use futures_util::future::join_all;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

pub struct BackendMonitor {
    catalog: SharedCatalog,
    metrics: Arc<Metrics>,
    health_interval: Duration,
    resolve_interval: Duration,
    /// Zero: backend metrics are not read.
    metrics_interval: Duration,
}

impl BackendMonitor {
    pub fn new(
        catalog: SharedCatalog,
        metrics: Arc<Metrics>,
        health_interval: Duration,
        resolve_interval: Duration,
        metrics_interval: Duration,
    ) -> Self {
        BackendMonitor {
            catalog,
            metrics,
            health_interval,
            resolve_interval,
            metrics_interval,
        }
    }

    /// Reads every instance's metrics at once (each within its model's timeout), records them
    /// on the instance, and publishes them (`firstgate_backend_*`).
    async fn scrape_all(&self) {
        let catalog = self.catalog.load_full();
        let mut reads = Vec::new();
        for d in catalog.deployments() {
            let s = &d.pool.settings;
            for (instance, _) in d.pool.instances() {
                let url = instance.metrics_url(&s.metrics_path);
                let (client, timeout) = (s.tls.scraper.clone(), s.metrics_timeout);
                reads.push(async move {
                    match backend_metrics::scrape(&client, &url, timeout).await {
                        Ok(r) => instance.backend.record(r),
                        Err(e) => {
                            if instance.backend.failed() {
                                log::warn!(
                                    "cannot read the metrics of backend {} ({url}): {e}; its last \
                                     figures are kept and age",
                                    instance.id()
                                );
                            }
                        }
                    }
                });
            }
        }
        join_all(reads).await;
        for d in catalog.deployments() {
            for (instance, _) in d.pool.instances() {
                let Some(load) = instance.reported() else {
                    continue;
                };
                let labels = [d.cluster.as_str(), d.model.as_str(), instance.id()];
                let m = &self.metrics;
                m.backend_waiting
                    .with_label_values(&labels)
                    .set(load.waiting);
                m.backend_running
                    .with_label_values(&labels)
                    .set(load.running);
                if let Some(kv) = load.kv_cache {
                    m.backend_kv_cache.with_label_values(&labels).set(kv);
                }
                if let Some(rate) = load.prefix_hit_rate {
                    m.backend_prefix_hit_rate
                        .with_label_values(&labels)
                        .set(rate);
                }
                m.backend_metrics_age
                    .with_label_values(&labels)
                    .set(load.age.as_secs_f64());
            }
        }
        self.metrics
            .background_runs
            .with_label_values(&["backend_metrics"])
            .inc();
    }

    /// Scrapes on its own interval, so a slow health round does not delay it (nor the reverse).
    async fn scrape_loop(&self, mut shutdown: ShutdownWatch) {
        if self.metrics_interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.metrics_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.scrape_all().await,
            }
        }
    }

    async fn check_all(&self) {
        join_all(
            self.catalog
                .load_full()
                .deployments()
                .map(|d| d.pool.check_health()),
        )
        .await;
        for d in self.catalog.load_full().deployments() {
            let mut by_state = [("serving", 0), ("unhealthy", 0), ("draining", 0)];
            for (instance, serving) in d.pool.instances() {
                let state = if instance.is_draining() {
                    2
                } else if serving {
                    0
                } else {
                    1
                };
                by_state[state].1 += 1;
            }
            for (state, n) in by_state {
                self.metrics
                    .instances
                    .with_label_values(&[&d.cluster, &d.model, state])
                    .set(n);
            }
            for (instance, healthy) in d.pool.instances() {
                self.metrics
                    .backend_healthy
                    .with_label_values(&[&d.cluster, &d.model, instance.id()])
                    .set(i64::from(healthy));
            }
        }
        self.metrics
            .background_runs
            .with_label_values(&["health_check"])
            .inc();
    }

    /// Health checks each interval, host names resolved again less often.
    async fn health_loop(&self, mut shutdown: ShutdownWatch) {
        let mut health = tokio::time::interval(self.health_interval);
        let mut resolve = tokio::time::interval(self.resolve_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resolve.tick().await; // names were resolved at start-up
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = health.tick() => self.check_all().await,
                _ = resolve.tick() => {
                    join_all(self.catalog.load_full().deployments().map(|d| d.pool.discover())).await;
                    self.metrics.background_runs.with_label_values(&["resolve"]).inc();
                }
            }
        }
    }
}

#[async_trait]
impl BackgroundService for BackendMonitor {
    /// Health checks and metric reads run side by side, each on its own interval.
    async fn start(&self, shutdown: ShutdownWatch) {
        tokio::join!(
            self.scrape_loop(shutdown.clone()),
            self.health_loop(shutdown)
        );
    }
}
