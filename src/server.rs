//! Assembles the Pingora server from a validated configuration: the proxy service on the
//! gateway listener, the admin service (health, metrics), the backend monitor, and the
//! policies' file watcher and scale runner.

use crate::admin::AdminApp;
use crate::auth::Authenticator;
use crate::catalog::{BackendMonitor, Catalog};
use crate::compute::{ClusterLifecycle, ComputeClient, ScaleExecutor, TaskPoller};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::{PolicyStore, PolicyWatcher, ScaleActuator, ScaleRunner};
use crate::proxy::{ColdPath, Gateway, GatewayParts};
use crate::usage::{self, Accounting, MemoryLimits, SqliteSink, UsageSink, UsageTotals};
use anyhow::Context;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;

/// Builds a ready-to-run server. Resolves backend host names before returning.
pub fn build(config: &Config) -> anyhow::Result<Server> {
    let catalog = Arc::new(Catalog::build(config).context("cannot serve this configuration")?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime to resolve backends")?
        .block_on(catalog.discover_all());

    let threads = config.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(config.shutdown.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.shutdown.final_timeout.as_secs()),
        // Pingora's default (128 idle connections in total) is too small for many streams.
        upstream_keepalive_pool_size: 4096,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let auth = Arc::new(Authenticator::new(&config.auth, catalog.uses_group_acls())?);
    if !auth.is_enforcing() {
        log::warn!("auth.mode is none: every bearer token is accepted (development only)");
    }
    let metrics = Arc::new(Metrics::new());
    let policies = Arc::new(PolicyStore::load(&config.policies)?);
    let compute = match &config.compute {
        Some(c) => {
            let secret = std::env::var(&c.client_secret_env).with_context(|| {
                format!(
                    "compute.client_secret_env: the environment variable {} is not set; export \
                     the service account's secret in it",
                    c.client_secret_env
                )
            })?;
            Some(Arc::new(ComputeClient::new(c, secret).context("compute")?))
        }
        None => None,
    };
    let scale_wake = Arc::new(tokio::sync::Notify::new());
    let cold = compute
        .as_ref()
        .zip(config.compute.as_ref())
        .map(|(client, c)| ColdPath {
            client: client.clone(),
            wait: c.wait,
            keepalive: c.keepalive,
            metrics: metrics.clone(),
        });
    let accounting = Arc::new(Accounting {
        sink: match &config.usage.store {
            Some(path) => Some(SqliteSink::start(
                path,
                config.usage.queue,
                config.usage.batch,
                config.usage.flush_interval,
                metrics.clone(),
            )? as Arc<dyn UsageSink>),
            None => None,
        },
        totals: match &config.usage.store {
            Some(path) => UsageTotals::load(
                usage::sink::open(path)
                    .and_then(|c| usage::sink::totals(&c, 0, None, None))
                    .with_context(|| format!("usage.store {}", path.display()))?,
            ),
            None => UsageTotals::default(),
        },
        limits: Box::new(MemoryLimits::new(
            config.limits.requests_per_second,
            config.limits.ip_requests_per_second,
            config.limits.token_window,
        )),
        access_log: config.access_log.clone(),
    });
    let gateway = Gateway::new(GatewayParts {
        catalog: catalog.clone(),
        auth,
        metrics: metrics.clone(),
        policies: policies.clone(),
        cold,
        scale_wake: scale_wake.clone(),
        accounting: accounting.clone(),
        max_body_bytes: config.limits.max_body_bytes,
    });
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "firstgate");
    proxy.add_tcp(&config.listen.to_string());

    let mut admin = Service::new(
        "firstgate admin".to_string(),
        AdminApp::new(metrics.clone()),
    );
    admin.add_tcp(&config.admin_listen.to_string());
    admin.threads = Some(1);

    let monitor = background_service(
        "backend monitor",
        BackendMonitor::new(
            catalog.clone(),
            metrics.clone(),
            config.health_check.interval,
            config.health_check.resolve_interval,
        ),
    );
    let watcher = background_service(
        "policy watcher",
        PolicyWatcher::new(
            policies.clone(),
            metrics.clone(),
            config.policies.watch_interval,
        ),
    );
    let actuator: Option<Arc<dyn ScaleActuator>> = compute
        .as_ref()
        .map(|c| Arc::new(ScaleExecutor::new(c.clone())) as Arc<dyn ScaleActuator>);
    let scaler = background_service(
        "scale policy",
        ScaleRunner::new(
            catalog.clone(),
            policies,
            metrics.clone(),
            config.policies.scale_interval,
            actuator,
            scale_wake,
        ),
    );
    if let Some(client) = &compute {
        server.add_service(background_service(
            "compute tasks",
            TaskPoller(client.clone()),
        ));
    }
    if ClusterLifecycle::has_work(&catalog) {
        server.add_service(background_service(
            "cluster lifecycle",
            ClusterLifecycle::new(catalog, compute, metrics),
        ));
    }

    if let Some(sink) = accounting.sink.clone() {
        server.add_service(background_service("usage flush", UsageFlusher(sink)));
    }
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(monitor);
    server.add_service(watcher);
    server.add_service(scaler);
    Ok(server)
}

/// Writes every queued usage record when the server shuts down.
struct UsageFlusher(Arc<dyn UsageSink>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for UsageFlusher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let _ = shutdown.changed().await;
        let sink = self.0.clone();
        let _ = tokio::task::spawn_blocking(move || sink.flush(std::time::Duration::from_secs(10)))
            .await;
        log::info!("usage records flushed");
    }
}
