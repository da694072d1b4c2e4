//! Assembles the Pingora server from a validated configuration: the proxy service on the
//! gateway listeners (plain, and HTTPS when configured) behind the edge's connection layer, the
//! admin service (health, readiness, metrics, maintenance), and the background services (the
//! backend monitor, the policies' file watcher and scale runner, Globus Compute's task poller
//! and cluster lifecycle, the edge reloader and the drainer).

use crate::admin::{AdminApp, AdminGuard, OperatorPage};
use crate::auth::persist::VerdictKeeper;
use crate::auth::Authenticator;
use crate::batch::{BatchRunner, Batches, FirstBatchWatcher, Places};
use crate::catalog::{BackendMonitor, Catalog, SharedCatalog};
use crate::compute::relay::StreamRelay;
use crate::compute::relay_redis::RedisRelay;
use crate::compute::{ClusterLifecycle, ComputeClient, ScaleExecutor, TaskPoller};
use crate::config::Config;
use crate::edge::{
    AcceptGate, Admission, AdmissionLimits, CertificateStore, ConnectionTimeouts, DrainState,
    Drainer, EdgeApp, EdgeReloader, Maintenance, TlsEndpoint, TrustedProxies,
};
use crate::metrics::Metrics;
use crate::policy::{PolicyStore, PolicyWatcher, ScaleActuator, ScaleRunner};
use crate::proxy::{ColdPath, Gateway};
use crate::reload::ConfigReloader;
use crate::state::SharedState;
use crate::usage::{
    Accounting, Exemptions, LimitSettings, Limiter, Outputs, RequestCaps, SharedUpkeep, UsageTotals,
};
use anyhow::Context;
use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::{background_service, GenBackgroundService};
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// What the services share, each built once from the configuration.
struct Parts {
    catalog: SharedCatalog,
    metrics: Arc<Metrics>,
    auth: Arc<Authenticator>,
    policies: Arc<PolicyStore>,
    compute: Option<Arc<ComputeClient>>,
    /// Where cold streams' lines come back to (with `compute.streaming`).
    relay: Option<Arc<StreamRelay>>,
    accounting: Arc<Accounting>,
    maintenance: Arc<Maintenance>,
    drain: Arc<DrainState>,
    admission: Arc<Admission>,
    /// The HTTPS listener's certificate, swappable on reload.
    certificate: Option<Arc<CertificateStore>>,
    /// Wakes the scale policy when a request finds no hot instance.
    scale_wake: Arc<tokio::sync::Notify>,
    /// The OpenAI Files and Batch APIs (with `batch:`).
    batches: Option<Arc<Batches>>,
}

/// A server ready to run.
pub struct Assembled {
    server: Server,
    accounting: Arc<Accounting>,
}

impl Assembled {
    /// Serves until shutdown; then writes the usage records still queued, those of requests
    /// cut at the end of the grace period included, and exits.
    pub fn run_forever(self) -> ! {
        exit_when_listeners_fail();
        self.server.run(RunArgs::default());
        self.accounting.flush(Duration::from_secs(10));
        crate::logging::flush_traces();
        std::process::exit(0)
    }
}

/// Builds a ready-to-run server. Resolves backend host names and, with `upgrade`, takes the
/// listening sockets over before returning.
pub fn build(config: &Config, options: ServeOptions) -> anyhow::Result<Assembled> {
    let parts = Parts::build(config)?;
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(config));
    let proxy = proxy_service(config, &parts, &server.configuration)?;
    let reloader = Arc::new(ConfigReloader::new(
        options.config_path.clone(),
        config.clone(),
        parts.catalog.clone(),
        parts.accounting.clone(),
        parts.catalog.load().needs_group_memberships(&config.limits),
        parts.metrics.clone(),
    ));
    let admin = admin_service(config, &parts, reloader.clone())?;
    if !options.upgrade {
        check_addresses_free(config)?;
    }
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
    server.add_service(proxy);
    server.add_service(admin);
    let accounting = parts.accounting.clone();
    server.add_service(GenBackgroundService::new(
        "BG config reloader".into(),
        reloader,
    ));
    add_background_services(&mut server, config, parts, options.config_path);
    Ok(Assembled { server, accounting })
}

/// Fails at once, naming the address, when a listening address cannot be bound (in use, not
/// this host's, no permission). Pingora would retry an address in use for 30 s and then panic
/// its service thread, leaving a process that listens on nothing.
fn check_addresses_free(config: &Config) -> anyhow::Result<()> {
    let tls = config.tls.as_ref().map(|t| ("tls.listen", t.listen));
    let addresses = [
        ("listen", config.listen),
        ("admin_listen", config.admin_listen),
    ];
    for (key, addr) in addresses.into_iter().chain(tls) {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} ({key})"))?;
    }
    Ok(())
}

/// Ends the process when a service cannot build its listeners after all (an address taken
/// between the check above and Pingora's bind): the panic would otherwise stop only that
/// service's thread, and a supervisor would never restart a process that serves nothing.
fn exit_when_listeners_fail() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("Failed to build listeners") {
            eprintln!("error: cannot listen: {message}");
            std::process::exit(1);
        }
    }));
}

/// Pingora's own settings: threads, the drain's upper bound, the upgrade socket.
fn server_conf(config: &Config) -> ServerConf {
    let threads = config.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    ServerConf {
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
    }
}

impl Parts {
    fn build(config: &Config) -> anyhow::Result<Parts> {
        let catalog = Arc::new(Catalog::build(config).context("cannot serve this configuration")?);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a runtime to resolve backends")?
            .block_on(catalog.discover_all());

        // The TLS material is read before anything starts, so a bad file stops the start-up.
        let certificate = match &config.tls {
            Some(tls) => Some(Arc::new(
                CertificateStore::load(&tls.cert, &tls.key).context("tls")?,
            )),
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let state = match &config.state.redis {
            Some(r) => Some(Arc::new(SharedState::new(r, metrics.clone())?)),
            None => None,
        };
        let mut auth = Authenticator::new(
            &config.auth,
            catalog.needs_group_memberships(&config.limits),
        )?;
        if let Some(state) = state.as_ref().filter(|s| s.auth_verdicts) {
            auth.share_verdicts(state.clone());
        }
        let auth = Arc::new(auth);
        let catalog = Arc::new(ArcSwap::new(catalog));
        if !auth.is_enforcing() {
            log::warn!("auth.mode is none: every bearer token is accepted (development only)");
        }
        let compute = match &config.compute {
            Some(c) => {
                let secret = secret_from(&c.client_secret_env, "compute.client_secret_env")?;
                let mut client = ComputeClient::new(c, secret).context("compute")?;
                if let Some(state) = &state {
                    client.share_starts(state.clone());
                }
                Some(Arc::new(client))
            }
            None => None,
        };
        let relay = match config
            .compute
            .as_ref()
            .and_then(|c| Some((c, c.streaming.as_ref()?)))
        {
            Some((c, s)) => {
                let secret = secret_from(&s.secret_env, "compute.streaming.secret_env")?;
                // Replicas behind one advertised host share streams through Redis, keys
                // living as long as a stream may wait.
                let shared = state
                    .clone()
                    .map(|st| RedisRelay::new(st, c.wait + Duration::from_secs(60)));
                Some(StreamRelay::with_shared(secret, shared))
            }
            None => None,
        };
        Ok(Parts {
            relay,
            policies: Arc::new(PolicyStore::load(&config.policies)?),
            accounting: Arc::new(accounting(config, &metrics, state)?),
            maintenance: Arc::new(Maintenance::new(
                config.edge.maintenance_file.clone(),
                config.edge.maintenance.clone(),
            )),
            drain: Arc::new(DrainState::default()),
            admission: Arc::new(admission(config, &metrics)),
            scale_wake: Arc::new(tokio::sync::Notify::new()),
            batches: match &config.batch {
                Some(b) => Some(Arc::new(Batches::open(
                    b.clone(),
                    shared_batch_db(config)?,
                )?)),
                None => None,
            },
            catalog,
            metrics,
            auth,
            compute,
            certificate,
        })
    }
}

/// The PostgreSQL database of `usage.store`, which keeps the batch state too when replicas
/// share it.
fn shared_batch_db(config: &Config) -> anyhow::Result<Option<crate::batch::store::Db>> {
    match &config.usage.store {
        Some(crate::config::UsageStore::Postgres(url)) => Ok(Some(
            crate::batch::store::open_shared(url, crate::usage::store_password(&config.usage)?)?,
        )),
        _ => Ok(None),
    }
}

/// A secret from the environment variable a configuration key names; an empty one is refused
/// like a missing one (an empty token would let anyone in, or fail every call).
fn secret_from(var: &str, key: &str) -> anyhow::Result<String> {
    let secret = std::env::var(var).with_context(|| {
        format!("{key}: the environment variable {var} is not set; export the secret in it")
    })?;
    if secret.trim().is_empty() {
        anyhow::bail!("{key}: the environment variable {var} is empty; export the secret in it");
    }
    Ok(secret)
}

/// Usage records, per-user totals, rate limits (in Redis with `state`) and the access log.
fn accounting(
    config: &Config,
    metrics: &Arc<Metrics>,
    state: Option<Arc<SharedState>>,
) -> anyhow::Result<Accounting> {
    let (outputs, totals) = Outputs::open(config, metrics)?;
    let l = &config.limits;
    let settings = LimitSettings::from(l);
    let accounting = Accounting::new(
        outputs,
        UsageTotals::load(totals),
        match state {
            Some(state) => Limiter::shared(settings, state),
            None => Limiter::local(settings),
        },
        RequestCaps::new(l.max_body_bytes, l.default_max_tokens),
    );
    accounting.set_exemptions(Exemptions::new(l));
    Ok(accounting)
}

/// The connection budget, from the descriptor limit (raised to the hard limit first).
fn admission(config: &Config, metrics: &Arc<Metrics>) -> Admission {
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
    Admission::new(
        limits,
        TrustedProxies::new(config.edge.trusted_proxies.clone()),
        metrics.clone(),
    )
}

/// The API listeners: Pingora's HTTP proxy with the gateway's logic, behind the edge's
/// connection layer (admission, TLS, request heads on deadlines).
fn proxy_service(
    config: &Config,
    parts: &Parts,
    conf: &Arc<ServerConf>,
) -> anyhow::Result<Service<EdgeApp<pingora::proxy::HttpProxy<Gateway>>>> {
    let gateway = Gateway {
        catalog: parts.catalog.clone(),
        auth: parts.auth.clone(),
        metrics: parts.metrics.clone(),
        policies: parts.policies.clone(),
        cold: parts
            .compute
            .as_ref()
            .zip(config.compute.as_ref())
            .map(|(client, c)| ColdPath {
                client: client.clone(),
                wait: c.wait,
                keepalive: c.keepalive,
                metrics: parts.metrics.clone(),
                streaming: parts.relay.clone().zip(c.streaming.clone()),
            }),
        scale_wake: parts.scale_wake.clone(),
        accounting: parts.accounting.clone(),
        edge: config.edge.clone(),
        trusted_proxies: TrustedProxies::new(config.edge.trusted_proxies.clone()),
        maintenance: parts.maintenance.clone(),
        drain: parts.drain.clone(),
        admission: parts.admission.clone(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cors: crate::edge::Cors::new(&config.edge.cors),
        batches: parts.batches.clone(),
    };
    let mut http = pingora::proxy::http_proxy(conf, gateway);
    let mut http_options = HttpServerOptions::default();
    // HTTP/2 without TLS (prior knowledge) on the plain listener, for loopback clients.
    http_options.h2c = true;
    http_options.h2_idle_timeout = Some(config.edge.keepalive_timeout);
    http.server_options = Some(http_options);
    let mut h2 = default_h2_options();
    // The gateway answers heads over `max_header_bytes` itself, with a JSON body; HTTP/2's own
    // limit (whose 431 has no body, and which counts 32 more bytes per header) is only the
    // backstop beyond twice that.
    let h2_ceiling = config.edge.max_header_bytes.saturating_mul(2) + 16 * 1024;
    h2.max_concurrent_streams(config.edge.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(h2_ceiling).unwrap_or(u32::MAX));
    http.h2_options = Some(h2);
    let tls = match (&config.tls, &parts.certificate) {
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
    let app = EdgeApp::new(
        http,
        tls,
        parts.admission.clone(),
        ConnectionTimeouts::from(&config.edge),
        parts.metrics.clone(),
    );
    let mut service = Service::new("firstgate".to_string(), app);
    // Both listeners accept plain TCP: the edge layer runs the TLS handshake itself, on its
    // own deadline, after admission. Pingora gives each connection a 64 KiB read buffer by
    // default; plain HTTP reads straight into the request's own buffers instead (the same
    // number of reads, one copy less, 64 KiB less per open stream), and TLS keeps one record's
    // worth (16 KiB) so that reading a record's header and body stays one read.
    let plain = L4BufferSettings::default().read(0);
    service.add_listener(ListenerConfig::tcp(config.listen.to_string()).l4_buffer(plain));
    if let Some(tls) = &config.tls {
        let records = L4BufferSettings::default().read(16 * 1024);
        service.add_listener(ListenerConfig::tcp(tls.listen.to_string()).l4_buffer(records));
    }
    service.set_connection_filter(Arc::new(AcceptGate(parts.admission.clone())));
    Ok(service)
}

/// The admin listener: health, readiness, metrics, draining, maintenance, the operator's page.
fn admin_service(
    config: &Config,
    parts: &Parts,
    reloader: Arc<ConfigReloader>,
) -> anyhow::Result<Service<AdminApp>> {
    let token = match &config.admin.token_env {
        Some(var) => Some(secret_from(var, "admin.token_env")?),
        None => None,
    };
    let page = OperatorPage::new(
        parts.catalog.clone(),
        parts.maintenance.clone(),
        parts.drain.clone(),
        parts.metrics.clone(),
        parts.policies.clone(),
        reloader.clone(),
        parts.accounting.clone(),
        parts.compute.clone(),
    );
    let guard = AdminGuard::new(
        config.admin_listen,
        &config.admin.allowed_hosts,
        token.as_deref(),
    );
    let app = AdminApp::new(
        page,
        config.clusters.keys().cloned().collect(),
        guard,
        reloader,
    );
    let mut service = Service::new("firstgate admin".to_string(), app);
    service.add_tcp(&config.admin_listen.to_string());
    service.threads = Some(1);
    Ok(service)
}

/// The loops beside the request path.
fn add_background_services(
    server: &mut Server,
    config: &Config,
    parts: Parts,
    config_path: Option<PathBuf>,
) {
    let metrics = &parts.metrics;
    server.add_service(background_service(
        "backend monitor",
        BackendMonitor::new(
            parts.catalog.clone(),
            metrics.clone(),
            config.health_check.interval,
            config.health_check.resolve_interval,
            config.upstream.metrics_interval,
        ),
    ));
    server.add_service(background_service(
        "policy watcher",
        PolicyWatcher::new(
            parts.policies.clone(),
            metrics.clone(),
            config.policies.watch_interval,
        ),
    ));
    let actuator = parts
        .compute
        .as_ref()
        .map(|c| Arc::new(ScaleExecutor::new(c.clone())) as Arc<dyn ScaleActuator>);
    server.add_service(background_service(
        "scale policy",
        ScaleRunner::new(
            parts.catalog.clone(),
            parts.policies.clone(),
            metrics.clone(),
            config.policies.scale_interval,
            actuator,
            parts.scale_wake.clone(),
        ),
    ));
    if let Some(client) = &parts.compute {
        server.add_service(background_service(
            "compute tasks",
            TaskPoller(client.clone()),
        ));
    }
    // Always there: a reload may add clusters to poll.
    server.add_service(background_service(
        "cluster lifecycle",
        ClusterLifecycle::new(
            parts.catalog.clone(),
            parts.compute.clone(),
            metrics.clone(),
        ),
    ));
    let caches = config.auth.mode != crate::config::AuthMode::None;
    if let Some(path) = config.auth.cache.file.as_ref().filter(|_| caches) {
        server.add_service(background_service(
            "auth cache",
            VerdictKeeper {
                auth: parts.auth.clone(),
                path: path.clone(),
                interval: config.auth.cache.save_interval,
                metrics: metrics.clone(),
            },
        ));
    }
    if let Some(batches) = &parts.batches {
        server.add_service(background_service(
            "batch runner",
            BatchRunner::new(
                batches.clone(),
                Places {
                    policies: parts.policies.clone(),
                    catalog: parts.catalog.clone(),
                    compute: parts.compute.clone(),
                },
                config.listen,
                metrics.clone(),
            ),
        ));
        if let Some(client) = &parts.compute {
            server.add_service(background_service(
                "FIRST batch watcher",
                FirstBatchWatcher {
                    batches: batches.clone(),
                    client: client.clone(),
                },
            ));
        }
    }
    server.add_service(background_service(
        "shared state upkeep",
        SharedUpkeep {
            accounting: parts.accounting.clone(),
            refresh: config.usage.refresh_interval,
            metrics: metrics.clone(),
        },
    ));
    server.add_service(background_service(
        "drainer",
        Drainer {
            state: parts.drain.clone(),
            accounting: parts.accounting.clone(),
            grace_period: config.shutdown.grace_period,
        },
    ));
    server.add_service(background_service(
        "edge reloader",
        EdgeReloader {
            config_path,
            certificate: parts.certificate.clone(),
            maintenance: parts.maintenance.clone(),
            accounting: parts.accounting.clone(),
            metrics: metrics.clone(),
        },
    ));
}
