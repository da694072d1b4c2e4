//! Read-only listings in the shapes clients expect: OpenAI's `GET /v1/models`, FIRST's
//! `list-endpoints`, `/{cluster}/models`, `/{cluster}/jobs` and `usage`.

use crate::catalog::{Catalog, Deployment};
use crate::model_name::normalize;
use crate::policy::state_of;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// `GET /v1/models`: each model once, with the clusters that serve it (`visible` also narrows
/// it to one framework under a FIRST-layout base). Listings show only what `visible` admits (the
/// caller's access lists).
pub fn models(catalog: &Catalog, created: u64, visible: impl Fn(&Deployment) -> bool) -> Bytes {
    let data: Vec<Value> = by_model(catalog, visible)
        .into_iter()
        .map(|(id, clusters)| model_object(id, created, &clusters))
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

/// `GET /v1/models/{id}`: the model named `id` (or one of its aliases) as in the listing;
/// `None` when the caller may not see it or it does not exist.
pub fn model(
    catalog: &Catalog,
    created: u64,
    id: &str,
    visible: impl Fn(&Deployment) -> bool,
) -> Option<Bytes> {
    let wanted = normalize(id);
    let named = |d: &Deployment| {
        std::iter::once(&d.model)
            .chain(&d.aliases)
            .any(|n| normalize(n) == wanted)
    };
    let (id, clusters) = by_model(catalog, |d| named(d) && visible(d))
        .into_iter()
        .next()?;
    Some(Bytes::from(
        model_object(id, created, &clusters).to_string(),
    ))
}

/// Visible models by name, with the clusters serving each.
fn by_model(catalog: &Catalog, visible: impl Fn(&Deployment) -> bool) -> BTreeMap<&str, Vec<&str>> {
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for d in catalog.deployments().filter(|d| visible(d)) {
        by_name.entry(&d.model).or_default().push(&d.cluster);
    }
    by_name
}

fn model_object(id: &str, created: u64, clusters: &[&str]) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "firstgate", "clusters": clusters})
}

/// `GET /resource_server/usage`: the caller's own requests and tokens, per model and in all.
pub fn usage(username: &str, models: &[crate::usage::Totals]) -> Bytes {
    let sum = |f: fn(&crate::usage::Totals) -> u64| models.iter().map(f).sum::<u64>();
    let total = json!({
        "requests": sum(|t| t.requests),
        "prompt_tokens": sum(|t| t.prompt_tokens),
        "completion_tokens": sum(|t| t.completion_tokens),
        "total_tokens": sum(|t| t.total_tokens),
    });
    Bytes::from(json!({"username": username, "models": models, "total": total}).to_string())
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
            let states: Map<String, Value> = fw
                .deployments
                .iter()
                .filter(|d| visible(d))
                .map(|d| {
                    (
                        d.model.clone(),
                        json!(state_of(d, d.pool.has_healthy()).as_str()),
                    )
                })
                .collect();
            frameworks.insert(
                fw_name.clone(),
                json!({"models": models, "endpoints": endpoints, "model_states": states}),
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
    let wanted = model_id.map(normalize);
    let list: Vec<Value> = entry
        .frameworks
        .iter()
        .flat_map(|(fw, f)| f.deployments.iter().map(move |d| (fw, d)))
        .filter(|(_, d)| visible(d))
        .filter(|(_, d)| {
            wanted.as_ref().is_none_or(|w| {
                std::iter::once(&d.model)
                    .chain(&d.aliases)
                    .any(|n| normalize(n) == *w)
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

/// `GET /resource_server/{cluster}/jobs` (FIRST's `JobsByStatus`): the cluster's last status
/// report with the jobs of models the caller may not see removed; for a cluster without a
/// lifecycle, its configured instances. `None` when the cluster does not exist.
pub fn jobs(
    catalog: &Catalog,
    cluster: &str,
    visible: impl Fn(&Deployment) -> bool,
) -> Option<Bytes> {
    let entry = catalog.cluster(cluster)?;
    let deployments: Vec<&std::sync::Arc<Deployment>> = entry
        .frameworks
        .values()
        .flat_map(|f| f.deployments.iter())
        .collect();
    let report = entry.jobs.load();
    let out = if report.is_null() {
        let mut running = Vec::new();
        let mut others = Vec::new();
        for d in deployments.iter().filter(|d| visible(d)) {
            for (i, serving) in d.pool.instances() {
                let job = json!({"Models": d.model, "Framework": d.framework, "Cluster": cluster,
                    "Model Status": if serving { "running" } else { "stopped" },
                    "Job ID": "", "Host Name": i.id(), "Job State": if serving { "R" } else { "" }});
                if serving {
                    running.push(job)
                } else {
                    others.push(job)
                }
            }
        }
        json!({"running": running, "others": others})
    } else {
        (**report).clone()
    };
    let mut out = first_jobs_shape(out);
    // Only jobs of models the caller may see.
    let allowed: Vec<String> = deployments
        .iter()
        .filter(|d| visible(d))
        .map(|d| normalize(&d.backend_model))
        .collect();
    if let Some(obj) = out.as_object_mut() {
        for (key, list) in obj.iter_mut() {
            if key == "cluster_status" {
                continue;
            }
            if let Some(jobs) = list.as_array_mut() {
                // As FIRST's `filter_jobs_for_user`: a job hosting several models keeps only
                // the ones the caller may see, and goes when none is left.
                jobs.retain_mut(|j| {
                    let visible: Vec<&str> = j["Models"]
                        .as_str()
                        .unwrap_or_default()
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty() && allowed.contains(&normalize(m)))
                        .collect();
                    if visible.is_empty() {
                        return false;
                    }
                    j["Models"] = json!(visible.join(","));
                    true
                });
            }
        }
    }
    Some(Bytes::from(out.to_string()))
}

/// The lists of FIRST's `JobsByStatus`, every one present in its answers.
const JOB_LISTS: [&str; 6] = [
    "running",
    "queued",
    "stopped",
    "others",
    "private_batch_running",
    "private_batch_queued",
];

/// A status report in FIRST's `JobsByStatus` shape: the six lists and `cluster_status`, a
/// starting job inside `running` (its `Model Status` says "starting"), whatever a cluster's
/// status function reported (`starting` as a list of its own, `private-batch-*` keys).
/// Other keys are kept as extra fields.
pub fn first_jobs_shape(report: Value) -> Value {
    let Value::Object(mut map) = report else {
        return report;
    };
    let mut out = Map::new();
    for key in JOB_LISTS {
        let mut list = take_list(&mut map, key);
        list.extend(take_list(&mut map, &key.replace('_', "-")));
        if key == "running" {
            list.extend(take_list(&mut map, "starting"));
        }
        out.insert(key.to_string(), Value::Array(list));
    }
    let status = map.remove("cluster_status").unwrap_or_else(|| json!({}));
    out.insert("cluster_status".into(), status);
    out.extend(map);
    Value::Object(out)
}

fn take_list(map: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match map.remove(key) {
        Some(Value::Array(list)) => list,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_shows_only_the_models_the_caller_may_see() {
        let cfg = crate::config::parse(
            std::path::Path::new("t.yaml"),
            "auth: {mode: none}\nclusters:\n  sophia:\n    frameworks:\n      vllm:\n        \
             models:\n          - {name: open-model, backends: [127.0.0.1:1]}\n          \
             - {name: secret-model, backends: [127.0.0.1:2]}\n",
        )
        .unwrap();
        let catalog = Catalog::build(&cfg).unwrap();
        catalog
            .cluster("sophia")
            .unwrap()
            .jobs
            .store(std::sync::Arc::new(json!({
                "running": [{"Models": "open-model,secret-model", "Job ID": "1"},
                            {"Models": "secret-model", "Job ID": "2"}],
            })));
        let out = jobs(&catalog, "sophia", |d| d.model == "open-model").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["running"],
            json!([{"Models": "open-model", "Job ID": "1"}]),
            "{v}"
        );
    }

    #[test]
    fn jobs_in_first_shape() {
        let report = json!({
            "running": [{"Job ID": "1", "Model Status": "running"}],
            "starting": [{"Job ID": "2", "Model Status": "starting"}],
            "private-batch-queued": [{"Job ID": "3"}],
            "cluster_status": {"free_nodes": 4},
        });
        let out = first_jobs_shape(report);
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "running",
                "queued",
                "stopped",
                "others",
                "private_batch_running",
                "private_batch_queued",
                "cluster_status"
            ]
        );
        assert_eq!(out["running"].as_array().unwrap().len(), 2);
        assert_eq!(out["running"][1]["Model Status"], "starting");
        assert_eq!(out["private_batch_queued"][0]["Job ID"], "3");
        assert_eq!(out["cluster_status"]["free_nodes"], 4);
    }
}
