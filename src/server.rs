//! Assembles the Pingora server from a validated configuration: the proxy service on the
//! gateway listeners (plain, and HTTPS when configured), the admin service (health,
//! readiness, metrics, maintenance), the backend monitor, the policies' file watcher and
//! scale runner, the edge reloader and the drainer.

use crate::admin::AdminApp;
use crate::auth::Authenticator;
use crate::catalog::{BackendMonitor, Catalog};
use crate::compute::{ClusterLifecycle, ComputeClient, ScaleExecutor, TaskPoller};
use crate::config::Config;
use crate::edge::{
    AcceptGate, Admission, AdmissionLimits, CertificateStore, ConnectionTimeouts, DrainState,
    Drainer, EdgeApp, EdgeReloader, Maintenance, TlsEndpoint, TrustedProxies,
};
use crate::metrics::Metrics;
use crate::policy::{PolicyStore, PolicyWatcher, ScaleActuator, ScaleRunner};
use crate::proxy::{ColdPath, Gateway, GatewayParts};
use crate::usage::{self, Accounting, MemoryLimits, SqliteSink, UsageSink, UsageTotals};
use anyhow::Context;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::sync::Arc;

/// How the process starts.
#[derive(Default)]
pub struct ServeOptions {
    /// Take the listening sockets over from a running gateway (graceful upgrade).
    pub upgrade: bool,
    /// The configuration file, re-read on SIGHUP for the maintenance notices.
    pub config_path: Option<PathBuf>,
    /// Called once everything that can fail has been set up, just before the listening
    /// sockets are taken over (or, without `upgrade`, before serving starts).
    pub prepared: Option<Box<dyn FnOnce()>>,
}

/// Builds a ready-to-run server. Resolves backend host names and, with `upgrade`, takes the
/// listening sockets over before returning.
pub fn build(config: &Config, options: ServeOptions) -> anyhow::Result<Server> {
    let catalog = Arc::new(Catalog::build(config).context("cannot serve this configuration")?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime to resolve backends")?
        .block_on(catalog.discover_all());

    let threads = config.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    // The TLS material is read before anything starts, so a bad file stops the start-up.
    let certificate = match &config.tls {
        Some(tls) => Some(Arc::new(
            CertificateStore::load(&tls.cert, &tls.key).context("tls")?,
        )),
        None => None,
    };
    let conf = ServerConf {
        threads,
        // The drainer exits as soon as nothing is in flight; this is only the upper bound
        // (rounded up: Pingora counts whole seconds).
        grace_period_seconds: Some(config.shutdown.grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(config.shutdown.final_timeout.as_secs()),
        // Pingora's default (128 idle connections in total) is too small for many streams.
        upstream_keepalive_pool_size: 4096,
        upgrade_sock: config.server.upgrade_sock.to_string_lossy().into_owned(),
        pid_file: config.server.pid_file.to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);

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
            config.limits.ip_burst,
            config.limits.token_window,
        )),
        access_log: config.access_log.clone(),
    });
    let maintenance = Arc::new(Maintenance::new(
        config.edge.maintenance_file.clone(),
        config.edge.maintenance.clone(),
    ));
    let drain = Arc::new(DrainState::default());
    let descriptors = crate::edge::raise_descriptor_limit();
    let limits = AdmissionLimits::new(&config.edge, descriptors);
    log::info!(
        "serving up to {} client connections (open-file limit {descriptors}){}",
        limits.max_connections,
        match limits.max_connections_per_ip {
            0 => String::new(),
            n => format!(", {n} per address"),
        }
    );
    let admission = Arc::new(Admission::new(
        limits,
        TrustedProxies::new(config.edge.trusted_proxies.clone()),
        metrics.clone(),
    ));
    let gateway = Gateway::new(GatewayParts {
        catalog: catalog.clone(),
        auth,
        metrics: metrics.clone(),
        policies: policies.clone(),
        cold,
        scale_wake: scale_wake.clone(),
        accounting: accounting.clone(),
        max_body_bytes: config.limits.max_body_bytes,
        edge: config.edge.clone(),
        maintenance: maintenance.clone(),
        drain: drain.clone(),
        admission: admission.clone(),
    });
    let mut http = pingora::proxy::http_proxy(&server.configuration, gateway);
    let mut http_options = HttpServerOptions::default();
    // HTTP/2 without TLS (prior knowledge) on the plain listener, for loopback clients.
    http_options.h2c = true;
    http_options.h2_idle_timeout = Some(config.edge.keepalive_timeout);
    http.server_options = Some(http_options);
    let mut h2 = default_h2_options();
    h2.max_concurrent_streams(config.edge.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.edge.max_header_bytes).unwrap_or(u32::MAX));
    http.h2_options = Some(h2);
    let tls_endpoint = match (&config.tls, &certificate) {
        (Some(tls), Some(store)) => {
            let mut settings =
                TlsSettings::intermediate(&tls.cert.to_string_lossy(), &tls.key.to_string_lossy())
                    .context("tls: cannot set up the listener")?;
            // Handshakes ask the store, so a SIGHUP can swap the certificate.
            settings.set_cert_resolver(store.clone());
            if tls.http2 {
                settings.enable_h2();
            }
            Some(TlsEndpoint {
                listen: tls.listen,
                acceptor: settings.build(),
            })
        }
        _ => None,
    };
    // Both listeners accept plain TCP: the edge layer runs the TLS handshake itself, on its
    // own deadline, after admission.
    let mut proxy = Service::new(
        "firstgate".to_string(),
        EdgeApp::new(
            http,
            tls_endpoint,
            admission.clone(),
            ConnectionTimeouts::from(&config.edge),
            metrics.clone(),
        ),
    );
    proxy.add_tcp(&config.listen.to_string());
    if let Some(tls) = &config.tls {
        proxy.add_tcp(&tls.listen.to_string());
    }
    proxy.set_connection_filter(Arc::new(AcceptGate(admission)));

    let admin_token = match &config.admin.token_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!(
                "admin.token_env: the environment variable {var} is not set; export the admin \
                 listener's bearer token in it"
            )
        })?),
        None => None,
    };
    let mut admin = Service::new(
        "firstgate admin".to_string(),
        AdminApp::new(
            metrics.clone(),
            drain.clone(),
            maintenance.clone(),
            config.clusters.keys().cloned().collect(),
            admin_token,
        ),
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
    // Everything that can fail has been done: only now take the sockets (over), so that a
    // new process that cannot start leaves the running one alone.
    if let Some(prepared) = options.prepared {
        prepared();
    }
    if options.upgrade {
        log::info!(
            "waiting for the running gateway to hand over its sockets on {} (send it SIGQUIT)",
            config.server.upgrade_sock.display()
        );
    }
    server.bootstrap();

    if let Some(client) = &compute {
        server.add_service(background_service(
            "compute tasks",
            TaskPoller(client.clone()),
        ));
    }
    if ClusterLifecycle::has_work(&catalog) {
        server.add_service(background_service(
            "cluster lifecycle",
            ClusterLifecycle::new(catalog, compute, metrics.clone()),
        ));
    }

    server.add_service(background_service(
        "drainer",
        Drainer {
            state: drain,
            usage: accounting.sink.clone(),
            grace_period: config.shutdown.grace_period,
        },
    ));
    server.add_service(background_service(
        "edge reloader",
        EdgeReloader {
            config_path: options.config_path.clone(),
            certificate,
            maintenance,
            metrics: metrics.clone(),
        },
    ));
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(monitor);
    server.add_service(watcher);
    server.add_service(scaler);
    Ok(server)
}
