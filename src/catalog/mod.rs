//! The catalog: which clusters, frameworks and models exist, their aliases, and each model's
//! deployment (where it runs, how to reach it, and the live state of its backend instances).
//!
//! It is built once from the validated configuration and answers name lookups without
//! allocating beyond the normalized key. "Which backend now" lives in [`pool`].

pub mod affinity;
pub mod backend_metrics;
mod discovery;
mod monitor;
mod pool;
mod selection;

pub use monitor::BackendMonitor;
pub use pool::{
    BackendPool, Instance, InstanceGuard, Loaded, PoolError, UpstreamSettings, UpstreamTls,
};

use crate::config::{AccessList, BackendAddr, Config};
use crate::metrics::DeploymentMetrics;
use crate::model_name::normalize;
use crate::openai::Endpoint;
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// One model on one cluster/framework and everything needed to serve it.
#[derive(Debug)]
pub struct Deployment {
    pub cluster: String,
    pub framework: String,
    /// The canonical model name (as configured).
    pub model: String,
    pub aliases: Vec<String>,
    /// The name the backend expects in `model`.
    pub backend_model: String,
    /// Endpoints offered by this deployment.
    pub endpoints: Vec<Endpoint>,
    /// Who may use the cluster, and the model on it.
    pub cluster_access: AccessList,
    pub model_access: AccessList,
    /// Backend instances and their live state.
    pub pool: Arc<BackendPool>,
    /// Demand seen by the gateway, for the scale policy.
    pub demand: Demand,
    /// Bounds for the scale policy.
    pub scaling: crate::config::Scaling,
    /// Running through Globus Compute when no instance is hot.
    pub compute: Option<crate::config::ModelCompute>,
    /// The cluster's instance lifecycle (status, start, stop), if it has one.
    pub lifecycle: Option<crate::config::ClusterCompute>,
    /// Tokens per minute for everyone, and per user (rate limits).
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_minute_per_user: Option<u64>,
    /// The cluster's Metis-style status URL, if it has one.
    pub status_url: Option<crate::config::StatusUrl>,
    /// What the lifecycle last reported.
    pub live: ArcSwap<LiveState>,
    /// Its metric series, resolved on first use and kept.
    pub metrics: OnceLock<DeploymentMetrics>,
    /// A digest of what its pool is built from (backends, TLS, key, timeouts, health checks):
    /// a reload keeps the pool while it is the same.
    pool_key: String,
}

/// What the cluster lifecycle last reported about a deployment.
#[derive(Debug, Clone, Default)]
pub struct LiveState {
    pub jobs: Vec<JobInfo>,
    /// Whether the model's compute endpoint is online (`None`: not known yet, or no compute).
    pub endpoint_online: Option<bool>,
}

/// One batch job running (or about to run) an instance of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub id: String,
    pub state: JobState,
    /// `host:port` of the instance, once it has one.
    pub host: Option<String>,
    /// Seconds of walltime left when reported, and when that was.
    pub walltime_left: Option<(u64, std::time::Instant)>,
}

impl LiveState {
    /// Seconds until the job of the instance `id` (`host:port`) ends, if it runs in one.
    pub fn ends_in(&self, id: &str) -> Option<i64> {
        self.jobs
            .iter()
            .find(|j| j.host.as_deref() == Some(id))
            .and_then(JobInfo::ends_in)
    }
}

impl JobInfo {
    /// Seconds until the job ends, now.
    pub fn ends_in(&self) -> Option<i64> {
        self.walltime_left
            .map(|(left, at)| left as i64 - at.elapsed().as_secs() as i64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Starting,
    Running,
}

/// Counters of the requests routed to a deployment.
#[derive(Debug, Default)]
pub struct Demand {
    pub requests: AtomicU64,
    pub prompt_bytes: AtomicU64,
    /// Requests waiting for a free instance slot.
    pub waiting: AtomicI64,
    /// Requests running through Globus Compute (no instance was hot).
    pub cold: AtomicI64,
}

impl Demand {
    /// Counts a request as waiting until the guard is dropped (also when it is cancelled).
    pub fn waiting(&self) -> WaitingGuard<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(&self.waiting)
    }

    /// Counts a request as running through Compute until the guard is dropped.
    pub fn cold(&self) -> WaitingGuard<'_> {
        self.cold.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(&self.cold)
    }
}

pub struct WaitingGuard<'a>(&'a AtomicI64);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Deployment {
    /// Whether the cluster's and the model's access lists let `identity` see (and use) it.
    pub fn visible_to(&self, identity: &crate::auth::Identity) -> bool {
        crate::auth::rules::may_see(identity, &self.cluster_access)
            && crate::auth::rules::may_see(identity, &self.model_access)
    }

    pub fn offers(&self, endpoint: Endpoint) -> bool {
        self.endpoints.contains(&endpoint)
    }
}

/// Why a lookup found nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    ClusterNotFound {
        cluster: String,
    },
    FrameworkNotFound {
        cluster: String,
        framework: String,
    },
    ModelNotFound {
        cluster: Option<String>,
        model: String,
    },
}

/// Frameworks of a cluster, models of a framework.
#[derive(Debug, Default)]
pub struct ClusterEntry {
    pub frameworks: BTreeMap<String, FrameworkEntry>,
    /// The cluster's last status report, in FIRST's `JobsByStatus` shape (null until one).
    pub jobs: ArcSwap<serde_json::Value>,
}

#[derive(Debug, Default)]
pub struct FrameworkEntry {
    pub endpoints: Vec<Endpoint>,
    /// Deployments in configuration order.
    pub deployments: Vec<Arc<Deployment>>,
    by_name: HashMap<String, usize>,
}

/// The catalog in force, replaced whole on a reload. Readers take the current one with
/// `load_full()` and keep it for what they are doing (a request keeps the snapshot it started
/// with).
pub type SharedCatalog = Arc<ArcSwap<Catalog>>;

/// All clusters and models.
#[derive(Debug, Default)]
pub struct Catalog {
    clusters: BTreeMap<String, ClusterEntry>,
    /// Normalized model name or alias → deployments across clusters (federated routes).
    federated: HashMap<String, Vec<Arc<Deployment>>>,
}

/// Something missing from the environment when the catalog is built for serving.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CatalogError {
    pub field: String,
    pub message: String,
}

impl Catalog {
    /// Builds the catalog. Reads backend API keys from the environment (an unset variable is
    /// an error: the gateway would otherwise fail every request to that backend).
    pub fn build(config: &Config) -> Result<Catalog, CatalogError> {
        Catalog::rebuild(config, &Catalog::default())
    }

    /// Builds the catalog of a reloaded configuration. A model whose backends and connection
    /// settings did not change keeps its pool from `previous` (instances, health, requests in
    /// flight, idle connections) and its last reported state; a cluster keeps its last status
    /// report. Everything else is new; what `previous` alone holds is left to the requests
    /// still using it.
    pub fn rebuild(config: &Config, previous: &Catalog) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog::default();
        let group_names = Arc::new(config.auth.rules.group_names.clone());
        for (cluster_name, cluster) in &config.clusters {
            let mut entry = ClusterEntry::default();
            if let Some(before) = previous.cluster(cluster_name) {
                entry.jobs.store(before.jobs.load_full());
            }
            for (fw_name, fw) in &cluster.frameworks {
                let mut fw_entry = FrameworkEntry {
                    endpoints: fw.endpoints.clone(),
                    ..Default::default()
                };
                for (i, m) in fw.models.iter().enumerate() {
                    let field = format!("clusters.{cluster_name}.frameworks.{fw_name}.models[{i}]");
                    let api_key = match &m.api_key_env {
                        None => None,
                        Some(var) => Some(std::env::var(var).map_err(|_| CatalogError {
                            field: format!("{field}.api_key_env"),
                            message: format!(
                                "the environment variable {var} is not set; export the \
                                 backend's API key in it"
                            ),
                        })?),
                    };
                    let addrs = m
                        .backends
                        .iter()
                        .map(|b| BackendAddr::parse(b, m.tls))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|message| CatalogError {
                            field: format!("{field}.backends"),
                            message,
                        })?;
                    let tls = UpstreamTls::load(m).map_err(|e| CatalogError {
                        field: format!("{field}.tls"),
                        message: format!("{e:#}"),
                    })?;
                    let pool_key = pool_key(config, m, api_key.as_deref());
                    let before = previous
                        .resolve(cluster_name, fw_name, &m.name)
                        .ok()
                        .filter(|d| d.pool_key == pool_key && d.model == m.name);
                    let pool = match before {
                        Some(d) => d.pool.clone(),
                        None => Arc::new(BackendPool::new(
                            addrs,
                            UpstreamSettings::new(&config.upstream, m, api_key, tls),
                            m.health_path.as_deref(),
                            &config.health_check,
                        )),
                    };
                    let live = before.map_or_else(Default::default, |d| d.live.load_full());
                    let deployment = Arc::new(Deployment {
                        cluster: cluster_name.clone(),
                        framework: fw_name.clone(),
                        model: m.name.clone(),
                        aliases: m.aliases.clone(),
                        backend_model: m.backend_model.clone().unwrap_or_else(|| m.name.clone()),
                        endpoints: fw.endpoints.clone(),
                        cluster_access: AccessList {
                            allowed_groups: cluster.allowed_groups.clone(),
                            allowed_domains: cluster.allowed_domains.clone(),
                            group_names: group_names.clone(),
                        },
                        model_access: AccessList {
                            allowed_groups: m.allowed_groups.clone(),
                            allowed_domains: m.allowed_domains.clone(),
                            group_names: group_names.clone(),
                        },
                        pool,
                        pool_key,
                        demand: Demand::default(),
                        scaling: m.scaling.clone(),
                        compute: m.compute.clone(),
                        lifecycle: cluster.compute.clone(),
                        status_url: cluster.status.clone(),
                        tokens_per_minute: m.tokens_per_minute,
                        tokens_per_minute_per_user: m.tokens_per_minute_per_user,
                        live: ArcSwap::new(live),
                        metrics: OnceLock::new(),
                    });
                    for name in std::iter::once(&m.name).chain(&m.aliases) {
                        let key = normalize(name);
                        fw_entry
                            .by_name
                            .insert(key.clone(), fw_entry.deployments.len());
                        let list = catalog.federated.entry(key).or_default();
                        if !list.iter().any(|d| Arc::ptr_eq(d, &deployment)) {
                            list.push(deployment.clone());
                        }
                    }
                    fw_entry.deployments.push(deployment);
                }
                entry.frameworks.insert(fw_name.clone(), fw_entry);
            }
            catalog.clusters.insert(cluster_name.clone(), entry);
        }
        Ok(catalog)
    }

    /// The deployment of `model` on `cluster`/`framework` (FIRST's URL layout).
    pub fn resolve(
        &self,
        cluster: &str,
        framework: &str,
        model: &str,
    ) -> Result<&Arc<Deployment>, LookupError> {
        let c = self
            .clusters
            .get(cluster)
            .ok_or_else(|| LookupError::ClusterNotFound {
                cluster: cluster.to_string(),
            })?;
        let fw = c
            .frameworks
            .get(framework)
            .ok_or_else(|| LookupError::FrameworkNotFound {
                cluster: cluster.to_string(),
                framework: framework.to_string(),
            })?;
        fw.by_name
            .get(&normalize(model))
            .map(|&i| &fw.deployments[i])
            .ok_or_else(|| LookupError::ModelNotFound {
                cluster: Some(cluster.to_string()),
                model: model.to_string(),
            })
    }

    /// Every deployment of `model` across clusters (federated `/v1/...` routes).
    pub fn resolve_federated(&self, model: &str) -> Result<&[Arc<Deployment>], LookupError> {
        self.federated
            .get(&normalize(model))
            .map(Vec::as_slice)
            .ok_or_else(|| LookupError::ModelNotFound {
                cluster: None,
                model: model.to_string(),
            })
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterEntry> {
        self.clusters.get(name)
    }

    pub fn clusters(&self) -> impl Iterator<Item = (&String, &ClusterEntry)> {
        self.clusters.iter()
    }

    /// Every deployment, cluster by cluster, in configuration order.
    pub fn deployments(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.clusters
            .values()
            .flat_map(|c| c.frameworks.values())
            .flat_map(|f| f.deployments.iter())
    }

    /// Whether any cluster or model restricts access by group.
    pub fn uses_group_acls(&self) -> bool {
        self.deployments().any(|d| {
            !d.cluster_access.allowed_groups.is_empty() || !d.model_access.allowed_groups.is_empty()
        })
    }

    /// Whether the authenticator must fetch group memberships for this catalog and `limits`:
    /// group access rules or exempt groups need them.
    pub fn needs_group_memberships(&self, limits: &crate::config::Limits) -> bool {
        self.uses_group_acls() || !limits.exempt_groups.is_empty()
    }

    /// Resolves every backend host name once (at start-up, before traffic).
    pub async fn discover_all(&self) {
        for d in self.deployments() {
            d.pool.discover().await;
        }
    }
}

/// What a model's backend pool depends on, as a SHA-256 digest (the API key is part of it and
/// must not sit in memory in the clear twice).
fn pool_key(config: &Config, m: &crate::config::Model, api_key: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    let text = format!(
        "{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        m.backends,
        m.tls,
        m.tls_ca,
        m.tls_client_cert,
        m.tls_client_key,
        api_key,
        m.health_path,
        m.connect_timeout,
        m.read_timeout,
        m.max_concurrent_per_backend,
        m.routing,
        config.upstream,
        config.health_check,
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let cfg = crate::config::parse(
            std::path::Path::new("t.yaml"),
            r#"
auth: {mode: none}
clusters:
  sophia:
    frameworks:
      vllm:
        models:
          - name: meta-llama/Meta-Llama-3.1-8B-Instruct
            aliases: [llama3-8b]
            backends: [127.0.0.1:1]
  polaris:
    frameworks:
      vllm:
        models:
          - name: meta-llama/Meta-Llama-3.1-8B-Instruct
            backends: [127.0.0.1:2]
"#,
        )
        .unwrap();
        Catalog::build(&cfg).unwrap()
    }

    #[test]
    fn names_match_ignoring_case_and_punctuation() {
        let c = catalog();
        for name in [
            "meta-llama/Meta-Llama-3.1-8B-Instruct",
            "META_LLAMA meta llama 3.1 8b instruct",
            "Llama3-8B",
        ] {
            let d = c.resolve("sophia", "vllm", name).unwrap();
            assert_eq!(d.model, "meta-llama/Meta-Llama-3.1-8B-Instruct");
        }
    }

    #[test]
    fn misses_say_what_is_missing() {
        let c = catalog();
        assert!(matches!(
            c.resolve("nowhere", "vllm", "x"),
            Err(LookupError::ClusterNotFound { .. })
        ));
        assert!(matches!(
            c.resolve("sophia", "tgi", "x"),
            Err(LookupError::FrameworkNotFound { .. })
        ));
        assert!(matches!(
            c.resolve("sophia", "vllm", "gpt-5"),
            Err(LookupError::ModelNotFound { .. })
        ));
    }

    #[test]
    fn federated_lists_every_cluster() {
        let c = catalog();
        let all = c
            .resolve_federated("meta-llama/meta-llama-3.1-8b-instruct")
            .unwrap();
        let clusters: Vec<_> = all.iter().map(|d| d.cluster.as_str()).collect();
        assert_eq!(clusters, ["polaris", "sophia"]);
        // An alias of one cluster only finds that cluster.
        assert_eq!(c.resolve_federated("llama3-8b").unwrap().len(), 1);
    }
}
