//! The background service that keeps every deployment's backend state fresh: health checks
//! each interval and host-name re-resolution less often. Publishes backend health as a metric.

use super::SharedCatalog;
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
}

impl BackendMonitor {
    pub fn new(
        catalog: SharedCatalog,
        metrics: Arc<Metrics>,
        health_interval: Duration,
        resolve_interval: Duration,
    ) -> Self {
        BackendMonitor {
            catalog,
            metrics,
            health_interval,
            resolve_interval,
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
}

#[async_trait]
impl BackgroundService for BackendMonitor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
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
