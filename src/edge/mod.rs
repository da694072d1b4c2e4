//! The facility edge, in place of nginx: client connections from accept to their request
//! (admission, TLS, timeouts), who the client is behind proxies, the maintenance switch, the
//! HTTPS certificate, and draining on shutdown or hand-over. None of this knows about the
//! proxy; the proxy asks it, and the connection layer hands it requests.

mod admission;
mod certificate;
mod connection;
mod cors;
mod drain;
mod forwarded;
mod h2;
mod head;
mod maintenance;

pub use admission::{
    raise_descriptor_limit, AcceptGate, Admission, AdmissionLimits, ConnectionPermit,
    UpstreamPermit,
};
pub use certificate::CertificateStore;
pub use connection::{ConnectionTimeouts, EdgeApp, TlsEndpoint};
pub use cors::{AllowedOrigin, Cors, Preflight};
pub use drain::{ActiveRequest, DrainState, Drainer};
pub use forwarded::{Client, TrustedProxies};
pub use maintenance::{Maintenance, Notices, DEFAULT_MESSAGE};

use crate::metrics::Metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Re-reads what may change without a restart: on SIGHUP the certificate, the configuration's
/// maintenance notices and the access-log file; every second the maintenance file, and the certificate
/// if its files changed. (The policies have their own watcher.) A file that cannot be read or
/// parsed leaves the previous state in force.
pub struct EdgeReloader {
    /// The configuration file (none for the demo's built-in one).
    pub config_path: Option<PathBuf>,
    pub certificate: Option<Arc<CertificateStore>>,
    pub maintenance: Arc<Maintenance>,
    /// Its access log is reopened on SIGHUP.
    pub accounting: Arc<crate::usage::Accounting>,
    pub metrics: Arc<Metrics>,
}

/// One SIGHUP: the certificate and the configuration's maintenance notices.
fn reload(
    config_path: Option<&Path>,
    certificate: Option<&CertificateStore>,
    maintenance: &Maintenance,
) {
    if let Some(store) = certificate {
        match store.reload() {
            Ok(()) => log::info!("TLS certificate reloaded"),
            Err(e) => log::error!("{e:#}; the previous certificate stays in use"),
        }
    }
    let Some(config_path) = config_path else {
        return;
    };
    match crate::config::load(config_path) {
        Ok(loaded) => {
            maintenance.set_configured(loaded.config.edge.maintenance);
            // The rest of the file is the configuration reloader's (src/reload.rs).
            log::info!(
                "maintenance notices reloaded from {}",
                config_path.display()
            );
        }
        Err(e) => log::error!("{e}; the previous maintenance notices stay in force"),
    }
}

#[async_trait]
impl BackgroundService for EdgeReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot watch SIGHUP: {e}");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    if let Some(log) = &self.accounting.outputs().access_log {
                        log.reopen();
                    }
                    // File reads and certificate parsing stay off the async workers.
                    let (path, certificate, maintenance) =
                        (self.config_path.clone(), self.certificate.clone(), self.maintenance.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        reload(path.as_deref(), certificate.as_deref(), &maintenance)
                    })
                    .await;
                }
                _ = tick.tick() => {
                    if self.maintenance.check_file() {
                        log::warn!("maintenance file changed: {:?}", self.maintenance.notices());
                    }
                    match self.certificate.as_deref().map(CertificateStore::reload_if_changed) {
                        Some(Ok(true)) => log::info!("TLS certificate files changed: reloaded"),
                        Some(Err(e)) => log::error!("{e:#}; the previous certificate stays in use"),
                        Some(Ok(false)) | None => {}
                    }
                }
            }
            self.metrics
                .background_runs
                .with_label_values(&["edge_reload"])
                .inc();
        }
    }
}
