//! `firstgate policy test`: the decision a policy takes for a request against a given state of
//! the catalog, without serving anything, so operators can try a change before deploying it.

use super::scale::{ScaleAction, ScaleInput};
use super::script::{Script, ROUTE, SCALE};
use super::view::{Candidate, Decision, DeploymentState, InstanceView, RouteRequest};
use super::{builtin_route, PolicyError};
use crate::auth::{rules, Identity};
use crate::config::{AccessList, BackendAddr, Config};
use crate::model_name::normalize;
use crate::openai::Endpoint;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

/// The live state to assume: deployments with their state and instances. Deployments of the
/// configuration not listed are assumed hot, every instance healthy and idle.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogState {
    #[serde(default)]
    pub deployments: Vec<DeploymentStateEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentStateEntry {
    pub cluster: String,
    pub framework: String,
    pub model: String,
    pub state: DeploymentState,
    #[serde(default)]
    pub instances: Vec<InstanceView>,
    #[serde(default)]
    pub compute: bool,
}

/// The route decision for `req` under `policy` (the configured one if `None`; the built-in
/// rule if neither).
pub fn route(
    config: &Config,
    policy: Option<&Path>,
    req: RouteRequest,
    state: &CatalogState,
) -> anyhow::Result<Decision> {
    let endpoint = Endpoint::from_path(&req.endpoint).ok_or_else(|| {
        let known: Vec<&str> = Endpoint::ALL.into_iter().map(Endpoint::path).collect();
        anyhow::anyhow!(
            "request.endpoint {:?}: use one of {}",
            req.endpoint,
            known.join(", ")
        )
    })?;
    let candidates = candidates(config, &req, endpoint, state)?;
    if candidates.is_empty() {
        anyhow::bail!(
            "no deployment of {:?} offering {} is open to {:?}: the gateway would answer 404 or 403 \
             before asking the policy",
            req.model,
            req.endpoint,
            req.user.username
        );
    }
    let req = Arc::new(req);
    let candidates = Arc::new(candidates.into_iter().map(Arc::new).collect::<Vec<_>>());
    let path = policy
        .map(Path::to_path_buf)
        .or_else(|| config.policies.route.clone());
    match path {
        Some(path) => Ok(load(&path, ROUTE)?.route(&req, &candidates)?),
        None => Ok(builtin_route(&req, &candidates)),
    }
}

/// The scale actions for `input` under `policy` (the configured one if `None`).
pub fn scale(
    config: &Config,
    policy: Option<&Path>,
    input: ScaleInput,
) -> anyhow::Result<Vec<ScaleAction>> {
    let path = policy
        .map(Path::to_path_buf)
        .or_else(|| config.policies.scale.clone())
        .ok_or_else(|| anyhow::anyhow!("no scale policy: give --policy or set policies.scale"))?;
    Ok(load(&path, SCALE)?.scale(input)?)
}

pub(super) fn load(path: &Path, hook: (&'static str, usize)) -> Result<Script, PolicyError> {
    let source = std::fs::read_to_string(path).map_err(|e| PolicyError::unreadable(path, &e))?;
    Script::compile(path, &source, hook)
}

/// The deployments of the requested model the user may use, in configuration order.
fn candidates(
    config: &Config,
    req: &RouteRequest,
    endpoint: Endpoint,
    state: &CatalogState,
) -> anyhow::Result<Vec<Candidate>> {
    let wanted = normalize(&req.model);
    let identity = Identity {
        id: req.user.id.clone(),
        username: req.user.username.clone(),
        name: None,
        domain: if req.user.domain.is_empty() {
            Identity::domain_of(&req.user.username)
        } else {
            req.user.domain.clone()
        },
        idp_id: None,
        idp_name: None,
        groups: req.user.groups.clone(),
        service_account: false,
        expires_at: u64::MAX,
        auth_service: "policy-test",
    };
    let mut out = Vec::new();
    for (cluster_name, cluster) in &config.clusters {
        for (fw_name, fw) in &cluster.frameworks {
            if !fw.endpoints.contains(&endpoint) {
                continue;
            }
            for m in &fw.models {
                let names = std::iter::once(&m.name).chain(&m.aliases);
                if !names.into_iter().any(|n| normalize(n) == wanted) {
                    continue;
                }
                let cluster_acl = AccessList {
                    allowed_groups: cluster.allowed_groups.clone(),
                    allowed_domains: cluster.allowed_domains.clone(),
                    ..Default::default()
                };
                let model_acl = AccessList {
                    allowed_groups: m.allowed_groups.clone(),
                    allowed_domains: m.allowed_domains.clone(),
                    ..Default::default()
                };
                if !rules::may_see(&identity, &cluster_acl)
                    || !rules::may_see(&identity, &model_acl)
                {
                    continue;
                }
                let listed = state.deployments.iter().find(|d| {
                    &d.cluster == cluster_name
                        && &d.framework == fw_name
                        && normalize(&d.model) == wanted
                });
                let candidate = match listed {
                    Some(d) => Candidate {
                        cluster: cluster_name.clone(),
                        framework: fw_name.clone(),
                        state: d.state,
                        instances: d.instances.clone(),
                        compute: d.compute,
                        index: out.len(),
                        routing: m.routing.unwrap_or(config.upstream.routing),
                        affinity_slack: config.upstream.affinity_slack,
                    },
                    None => Candidate {
                        cluster: cluster_name.clone(),
                        framework: fw_name.clone(),
                        state: DeploymentState::Hot,
                        instances: m
                            .backends
                            .iter()
                            .map(|b| InstanceView {
                                id: BackendAddr::parse(b, m.tls)
                                    .map_or_else(|_| b.clone(), |a| a.authority()),
                                healthy: true,
                                in_flight: 0,
                                latency_ms: 0,
                                ends_in: None,
                                socket: None,
                                ..Default::default()
                            })
                            .collect(),
                        compute: false,
                        index: out.len(),
                        routing: m.routing.unwrap_or(config.upstream.routing),
                        affinity_slack: config.upstream.affinity_slack,
                    },
                };
                out.push(candidate);
            }
        }
    }
    Ok(out)
}
