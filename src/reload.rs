//! Reloading the configuration without a restart, on SIGHUP or the admin listener's
//! `POST /reload`: the file is read and validated first (a broken edit is refused, logged with
//! its file and line, and the last good configuration keeps serving); then the catalog
//! (clusters, frameworks, models, aliases, backends, access rules) is rebuilt and swapped in
//! whole. Requests in flight keep the catalog they started with; a model whose backends did
//! not change keeps its pool (health, requests in flight, idle connections); removed backends
//! get no new requests and finish what they have. The `limits:` apply to the next request
//! (requests in flight and tokens counted in the current window stay counted). A changed
//! `usage:` store or `access_log:` target is opened before anything is applied (a store or
//! file that cannot be opened refuses the reload); the replaced one writes what it was given,
//! then closes. `log.format` switches at once. Settings that
//! only a new process can take are named in the log as needing `firstgate serve --upgrade`,
//! never silently ignored.

use crate::catalog::{Catalog, SharedCatalog};
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::usage::{Accounting, Exemptions, LimitSettings};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Changed settings that take effect only in a new process.
    pub needs_upgrade: Vec<&'static str>,
}

/// Reloads the configuration file into the running gateway.
pub struct ConfigReloader {
    /// The configuration file (none for the demo's built-in one: nothing to reload).
    path: Option<PathBuf>,
    /// The configuration in force.
    running: Mutex<Config>,
    /// The configuration the process started with: settings only a new process applies are
    /// compared with it (not with the last reload), so a change stays reported until an
    /// upgrade, and a change undone is no longer reported.
    started: Config,
    catalog: SharedCatalog,
    /// The rate limits and request caps.
    accounting: Arc<Accounting>,
    /// The authenticator fetches group memberships (needed by group access rules).
    fetches_groups: bool,
    metrics: Arc<Metrics>,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
    /// What the operator's page shows of the file's history.
    history: Mutex<History>,
}

/// The version in force (1 at start, one more per applied reload), when it was loaded (Unix
/// seconds), and the last refused reload (when, why).
#[derive(Debug, Clone)]
struct History {
    version: u64,
    loaded_at: u64,
    refused: Option<(u64, String)>,
}

impl ConfigReloader {
    pub fn new(
        path: Option<PathBuf>,
        running: Config,
        catalog: SharedCatalog,
        accounting: Arc<Accounting>,
        fetches_groups: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        ConfigReloader {
            path,
            started: running.clone(),
            running: Mutex::new(running),
            catalog,
            accounting,
            fetches_groups,
            metrics,
            busy: tokio::sync::Mutex::new(()),
            history: Mutex::new(History {
                version: 1,
                loaded_at: crate::activity::unix_now(),
                refused: None,
            }),
        }
    }

    /// The configuration file, its version in force, when that was loaded, and the last
    /// refused reload (for the operator's page).
    pub fn status(&self) -> serde_json::Value {
        let History {
            version,
            loaded_at,
            refused,
        } = self
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "file": self.path.as_ref().map_or("(built in)".into(), |p| p.display().to_string()),
            "version": version,
            "loaded_at": loaded_at,
            "last_reload": refused.map(|(at, why)| serde_json::json!({"at": at, "refused": why})),
        })
    }

    /// Reads, checks and applies the file; on any error the running configuration stays.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        let _one = self.busy.lock().await;
        let result = self.try_reload().await;
        let label = if result.is_ok() { "applied" } else { "refused" };
        {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            let now = crate::activity::unix_now();
            match &result {
                Ok(_) => {
                    h.version += 1;
                    h.loaded_at = now;
                }
                Err(e) => h.refused = Some((now, e.clone())),
            }
        }
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(r) if r.needs_upgrade.is_empty() => log::info!("configuration reloaded"),
            Ok(r) => log::warn!(
                "configuration reloaded; changed settings that need `firstgate serve --upgrade` \
                 to take effect: {}",
                r.needs_upgrade.join(", ")
            ),
            Err(e) => log::error!("configuration NOT reloaded, the last good one stays: {e}"),
        }
        result
    }

    async fn try_reload(&self) -> Result<Reloaded, String> {
        let path = self
            .path
            .as_ref()
            .ok_or("this gateway runs a built-in configuration; there is no file to reload")?;
        let config = config::load(path).map_err(|e| e.to_string())?.config;
        let previous = self.catalog.load_full();
        let catalog = Catalog::rebuild(&config, &previous).map_err(|e| e.to_string())?;
        if catalog.needs_group_memberships(&config.limits) && !self.fetches_groups {
            return Err(
                "the new configuration has group access rules or exempt groups, and this \
                 process does not fetch group memberships: it needs `firstgate serve --upgrade`"
                    .into(),
            );
        }
        let old = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Opening a store or a log file is file I/O: off the async workers.
        let (accounting, metrics, new) = (self.accounting.clone(), self.metrics.clone(), config);
        let (outputs, totals, config) = tokio::task::spawn_blocking(move || {
            let (outputs, totals) = accounting.outputs().reopen(&old, &new, &metrics)?;
            anyhow::Ok((outputs, totals, new))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
        // Everything is checked and opened: apply it all.
        catalog.discover_all().await;
        self.catalog.store(Arc::new(catalog));
        self.accounting.set_outputs(outputs, totals);
        let l = &config.limits;
        self.accounting.limits.reconfigure(LimitSettings::from(l));
        self.accounting.set_exemptions(Exemptions::new(l));
        self.accounting
            .caps
            .set(l.max_body_bytes, l.default_max_tokens);
        crate::logging::set_format(config.log.format);
        let needs_upgrade = needs_upgrade(&self.started, &config);
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(Reloaded { needs_upgrade })
    }
}

/// Settings that differ between `old` and `new` and that only a new process applies. The
/// catalog (`clusters`, `upstream`, `health_check` checks), `limits`, `usage`, `access_log`
/// and `log` are applied by the reload; the maintenance notices and the certificate have their
/// own SIGHUP.
fn needs_upgrade(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| !config::same(a, b);
    let mut edge_old = old.edge.clone();
    let mut edge_new = new.edge.clone();
    edge_old.maintenance.clear();
    edge_new.maintenance.clear();
    let sections: [(&'static str, bool); 14] = [
        ("listen", old.listen != new.listen),
        ("admin_listen", old.admin_listen != new.admin_listen),
        ("admin", differs(&old.admin, &new.admin)),
        ("tls", differs(&old.tls, &new.tls)),
        ("edge", differs(&edge_old, &edge_new)),
        ("server", differs(&old.server, &new.server)),
        ("threads", old.threads != new.threads),
        ("auth", differs(&old.auth, &new.auth)),
        ("shutdown", differs(&old.shutdown, &new.shutdown)),
        ("policies", differs(&old.policies, &new.policies)),
        ("tracing", differs(&old.tracing, &new.tracing)),
        ("compute", differs(&old.compute, &new.compute)),
        ("state", differs(&old.state, &new.state)),
        ("batch", differs(&old.batch, &new.batch)),
    ];
    let mut out: Vec<&'static str> = sections
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
    if old.health_check.interval != new.health_check.interval
        || old.health_check.resolve_interval != new.health_check.resolve_interval
    {
        out.push("health_check intervals");
    }
    out
}

#[async_trait]
impl BackgroundService for ConfigReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            log::error!("cannot listen for SIGHUP: the configuration reloads only on POST /reload");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    // The outcome is logged and counted.
                    let _ = self.reload().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
