//! Read-only listings in the shapes clients expect: OpenAI's `GET /v1/models`, FIRST's
//! `list-endpoints` and `/{cluster}/models`.

use crate::catalog::{normalize_model_name, Catalog, Deployment};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// `GET /v1/models`: each model once, with the clusters that serve it.
/// Listings show only what `visible` admits (the caller's access lists).
pub fn models(catalog: &Catalog, created: u64, visible: impl Fn(&Deployment) -> bool) -> Bytes {
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for d in catalog.deployments().filter(|d| visible(d)) {
        by_name.entry(&d.model).or_default().push(&d.cluster);
    }
    let data: Vec<Value> = by_name
        .into_iter()
        .map(|(id, clusters)| {
            json!({"id": id, "object": "model", "created": created, "owned_by": "firstgate", "clusters": clusters})
        })
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

/// `GET /resource_server/list-endpoints` (FIRST's shape).
pub fn list_endpoints(catalog: &Catalog, visible: impl Fn(&Deployment) -> bool) -> Bytes {
    let mut clusters = Map::new();
    for (name, cluster) in catalog.clusters() {
        let mut frameworks = Map::new();
        for (fw_name, fw) in &cluster.frameworks {
            let mut models: Vec<&str> = fw
                .deployments
                .iter()
                .filter(|d| visible(d))
                .map(|d| d.model.as_str())
                .collect();
            if models.is_empty() {
                continue;
            }
            models.sort_unstable();
            let endpoints: Vec<String> = fw
                .endpoints
                .iter()
                .map(|e| format!("/v1/{}", e.path()))
                .collect();
            frameworks.insert(
                fw_name.clone(),
                json!({"models": models, "endpoints": endpoints}),
            );
        }
        if frameworks.is_empty() {
            continue;
        }
        clusters.insert(
            name.clone(),
            json!({"base_url": format!("/resource_server/{name}"), "frameworks": frameworks}),
        );
    }
    Bytes::from(json!({ "clusters": clusters }).to_string())
}

/// `GET /resource_server/{cluster}/models[?model_id=]`; `None` when the cluster, or the asked
/// model, does not exist.
pub fn cluster_models(
    catalog: &Catalog,
    cluster: &str,
    model_id: Option<&str>,
    visible: impl Fn(&Deployment) -> bool,
) -> Option<Bytes> {
    let entry = catalog.cluster(cluster)?;
    let wanted = model_id.map(normalize_model_name);
    let list: Vec<Value> = entry
        .frameworks
        .iter()
        .flat_map(|(fw, f)| f.deployments.iter().map(move |d| (fw, d)))
        .filter(|(_, d)| visible(d))
        .filter(|(_, d)| {
            wanted.as_ref().is_none_or(|w| {
                std::iter::once(&d.model)
                    .chain(&d.aliases)
                    .any(|n| normalize_model_name(n) == *w)
            })
        })
        .map(|(fw, d)| {
            json!({"id": d.model, "object": "model", "cluster": cluster, "framework": fw, "aliases": d.aliases})
        })
        .collect();
    if wanted.is_some() && list.is_empty() {
        return None;
    }
    Some(Bytes::from(Value::Array(list).to_string()))
}
