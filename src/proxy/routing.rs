//! Which deployment and instance serve an inference request: the candidates the user may use,
//! the policy's decision, and what the client is told when the policy refuses or fails.

use super::errors;
use crate::auth::{rules, Identity};
use crate::catalog::{Catalog, Deployment, Instance};
use crate::metrics::Metrics;
use crate::openai::Endpoint;
use crate::openai::{ApiError, ControlFields};
use crate::policy::{self, Decision, Policies, Recalled, RouteRequest, Situation, UserView};
use pingora::http::RequestHeader;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where a request goes.
pub struct Routed {
    pub deployment: Arc<Deployment>,
    /// The instance the decision chose, if any (taken if it still has room).
    pub instance: Option<Pick>,
    /// The policy chose Globus Compute on this deployment.
    pub via_compute: bool,
}

/// An instance a route decision chose.
pub enum Pick {
    /// Named by a script's decision (taken if it is still healthy).
    Named(SocketAddr),
    /// The built-in rule's, serving when it looked (its health not looked up again).
    Serving(Arc<Instance>),
}

/// What the route needs to know about one request.
pub struct Asked<'a> {
    pub cluster: Option<&'a str>,
    pub framework: Option<&'a str>,
    pub endpoint: Endpoint,
    pub model: &'a str,
    pub stream: bool,
    pub body_len: usize,
    /// A line of a batch (background priority).
    pub batch: bool,
    /// The body and its control fields: the start of the prompt makes the prefix-affinity
    /// key.
    pub prompt: (&'a ControlFields, &'a [u8]),
}

/// Whether `identity` may use `d`; the error names the rule that failed.
pub fn check_access(identity: &Identity, d: &Deployment) -> Result<(), ApiError> {
    rules::check_access(identity, &d.cluster_access, || {
        format!("cluster '{}'", d.cluster)
    })
    .and_then(|()| {
        rules::check_access(identity, &d.model_access, || {
            format!("model '{}' on cluster '{}'", d.model, d.cluster)
        })
    })
    .map_err(errors::auth)
}

/// Finds the candidates, asks the policy, and turns its decision into a deployment.
pub fn route(
    catalog: &Catalog,
    policies: &Policies,
    metrics: &Metrics,
    identity: &Identity,
    header: &RequestHeader,
    asked: &Asked<'_>,
) -> Result<Routed, ApiError> {
    // FIRST's layout names the deployment: its lookup and access errors come first.
    if let (Some(c), Some(f)) = (asked.cluster, asked.framework) {
        let d = catalog.resolve(c, f, asked.model).map_err(errors::lookup)?;
        check_access(identity, d)?;
        if !d.offers(asked.endpoint) {
            return Err(errors::endpoint_not_offered(d, asked.endpoint));
        }
    }
    let all = catalog
        .resolve_federated(asked.model)
        .map_err(errors::lookup)?;
    let allowed: Vec<Arc<Deployment>> = all
        .iter()
        .filter(|d| d.offers(asked.endpoint) && check_access(identity, d).is_ok())
        .cloned()
        .collect();
    if allowed.is_empty() {
        // Say which rule refused, or which endpoint is missing, for the first deployment.
        check_access(identity, &all[0])?;
        return Err(errors::endpoint_not_offered(&all[0], asked.endpoint));
    }
    let scripted = policies.route.is_some();
    let (cluster, framework) = (
        asked.cluster.unwrap_or_default(),
        asked.framework.unwrap_or_default(),
    );
    if !scripted {
        if let Some((index, instance)) = policy::builtin_direct(&allowed, cluster, framework) {
            return Ok(Routed {
                deployment: allowed[index].clone(),
                instance: Some(Pick::Serving(instance)),
                via_compute: false,
            });
        }
    }
    // A script whose decisions are reused: this situation's, if it was decided before.
    let memo = policies.route.as_deref().and_then(|s| s.memo());
    let situation = memo.and_then(|memo| {
        let situation = Situation {
            model: &all[0].model,
            endpoint: asked.endpoint.path(),
            stream: asked.stream,
            batch: asked.batch,
            cluster,
            framework,
            user_id: &identity.id,
            username: &identity.username,
            domain: &identity.domain,
            groups: &identity.groups,
        };
        memo.situation(&situation, &allowed)
    });
    if let (Some(memo), Some(situation)) = (memo, &situation) {
        if let Some(recalled) = memo.recall(situation) {
            metrics.route_decisions_reused.inc();
            return routed(recalled, &allowed);
        }
    }
    // The user and the headers are copied only for a script; the built-in rule needs neither.
    let req = Arc::new(RouteRequest {
        model: all[0].model.clone(),
        endpoint: asked.endpoint.path().to_string(),
        stream: asked.stream,
        cluster: cluster.to_string(),
        framework: framework.to_string(),
        user: if scripted {
            UserView {
                id: identity.id.clone(),
                username: identity.username.clone(),
                domain: identity.domain.clone(),
                groups: identity.groups.clone(),
            }
        } else {
            UserView::default()
        },
        prompt_bytes: asked.body_len as i64,
        batch: asked.batch,
        // Hashed only when something may route by it: a script, or a model set to.
        prefix: (scripted
            || allowed
                .iter()
                .any(|d| d.pool.settings.routing == crate::config::Routing::PrefixAffinity))
        .then(|| {
            let (control, body) = asked.prompt;
            control.prefix_key(body, allowed[0].pool.settings.prefix_bytes)
        })
        .flatten(),
        headers: if scripted {
            header
                .headers
                .iter()
                // The batch runner's secret is a credential: never shown to a script.
                .filter(|(name, _)| {
                    name.as_str().starts_with("x-") && name.as_str() != crate::batch::LINE_HEADER
                })
                .filter_map(|(name, v)| {
                    Some((name.as_str().to_string(), v.to_str().ok()?.to_string()))
                })
                .collect()
        } else {
            Default::default()
        },
    });
    let candidates = policy::candidates_of(&allowed);
    let decision = policies.route(&req, &candidates, situation).map_err(|e| {
        log::error!("{e}");
        metrics.policy_errors.with_label_values(&["route"]).inc();
        errors::policy(&e)
    })?;
    match decision {
        Decision::Direct {
            index, instance, ..
        } => {
            let deployment = allowed
                .get(index)
                .ok_or_else(|| errors::policy_index(index))?;
            let instance = instance.and_then(|id| {
                candidates[index]
                    .instances
                    .iter()
                    .find(|i| i.id == id)
                    .and_then(|i| i.socket)
                    .map(Pick::Named)
            });
            Ok(Routed {
                deployment: deployment.clone(),
                instance,
                via_compute: false,
            })
        }
        Decision::Compute { index, .. } => via_compute(&allowed, index),
        Decision::Reject { status, message } => Err(errors::policy_rejected(status, message)),
    }
}

/// Where a decision recalled for this request's situation sends it.
fn routed(recalled: Recalled, allowed: &[Arc<Deployment>]) -> Result<Routed, ApiError> {
    match recalled {
        Recalled::Direct { index, instance } => Ok(Routed {
            deployment: allowed
                .get(index)
                .ok_or_else(|| errors::policy_index(index))?
                .clone(),
            instance: instance.map(Pick::Serving),
            via_compute: false,
        }),
        Recalled::Compute { index } => via_compute(allowed, index),
        Recalled::Reject { status, message } => Err(errors::policy_rejected(status, message)),
    }
}

/// Globus Compute on the deployment `index` of `allowed`, as a decision chose.
fn via_compute(allowed: &[Arc<Deployment>], index: usize) -> Result<Routed, ApiError> {
    let deployment = allowed
        .get(index)
        .ok_or_else(|| errors::policy_index(index))?;
    if deployment.compute.is_none() {
        return Err(errors::compute_unavailable(deployment));
    }
    Ok(Routed {
        deployment: deployment.clone(),
        instance: None,
        via_compute: true,
    })
}
