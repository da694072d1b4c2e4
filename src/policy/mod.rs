//! Where a request goes. For now the built-in rule for federated routes; the operator-written
//! Rhai policy replaces it.

use crate::catalog::Deployment;
use crate::config::Endpoint;
use std::sync::Arc;

/// Picks the deployment for a federated request: the first (in cluster order) that offers the
/// endpoint and has a healthy backend, else the first that offers the endpoint (whose error then
/// names it).
pub fn choose_federated(
    candidates: &[Arc<Deployment>],
    endpoint: Endpoint,
) -> Option<&Arc<Deployment>> {
    let mut offering = candidates.iter().filter(|d| d.offers(endpoint));
    let first = offering.clone().next();
    offering.find(|d| d.pool.has_healthy()).or(first)
}
