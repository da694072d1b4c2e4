//! Where requests go and when instances start or stop: operator-written Rhai policies
//! (`route(req, candidates)`, `scale(model)`), compiled once, swapped atomically when their
//! files change or on SIGHUP (a broken edit is refused and the last good version stays), with
//! a built-in route rule when no script is configured.

pub mod dry_run;
mod engine;
mod memo;
pub mod replay;
mod scale;
mod script;
mod service;
mod view;

pub use memo::{Recalled, RouteMemo, Situation, SituationKey};
pub use scale::{ScaleAction, ScaleInput, ScaleInstance};
pub use script::{PolicyError, Script, ROUTE, SCALE};
pub use service::{candidates_of, state_of, PolicyWatcher, ScaleActuator, ScaleRunner};
pub use view::{
    Candidate, Candidates, Decision, DeploymentState, InstanceView, RouteRequest, UserView,
};

use crate::catalog::{Deployment, Instance};
use crate::config::{PolicyFiles, Routing};
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The policies in force. A request holds one snapshot from start to end.
pub struct Policies {
    pub route: Option<Arc<Script>>,
    pub scale: Option<Arc<Script>>,
    /// Increases with every accepted reload.
    pub version: u64,
}

impl Policies {
    fn set(&mut self, hook: Hook, script: Script) {
        let script = Some(Arc::new(script));
        match hook {
            Hook::Route => self.route = script,
            Hook::Scale => self.scale = script,
        }
    }

    /// The route decision: the script's (kept for `situation`, if given), or the built-in
    /// rule's.
    pub fn route(
        &self,
        req: &Arc<RouteRequest>,
        candidates: &Candidates,
        situation: Option<SituationKey>,
    ) -> Result<Decision, PolicyError> {
        match &self.route {
            Some(script) => script.route_in(req, candidates, situation),
            None => Ok(builtin_route(req, candidates)),
        }
    }
}

/// The built-in rule: the requested cluster if the URL names one, then prefer deployments with
/// a healthy instance, and the instance with the fewest requests in flight (or, for models
/// routed by `prefix_affinity`, the prompt's instance on the ring).
pub fn builtin_route(req: &RouteRequest, candidates: &[Arc<Candidate>]) -> Decision {
    let requested = candidates.iter().map(|c| &**c).filter(|c| {
        req.cluster.is_empty() || (c.cluster == req.cluster && c.framework == req.framework)
    });
    if view::least_in_flight(requested.clone()).is_none() && requested.clone().any(|c| c.compute) {
        view::compute_among(requested, &req.model)
    } else {
        view::direct_routed(requested, &req.model, req.prefix)
    }
}

/// The built-in rule's usual outcome, read straight from the deployments (`cluster` and
/// `framework` empty on the federated routes): the healthy instance with the fewest requests
/// in flight among the requested deployments, and its deployment's index. Saves the candidates'
/// snapshot on most requests (some 3,000 instructions, docs/benchmarks.md). `None` where the
/// rule needs the snapshot: a deployment routed by prefix, or no healthy instance (Globus
/// Compute, or the first candidate and a 503).
pub fn builtin_direct(
    deployments: &[Arc<Deployment>],
    cluster: &str,
    framework: &str,
) -> Option<(usize, Arc<Instance>)> {
    if deployments
        .iter()
        .any(|d| d.pool.settings.routing == Routing::PrefixAffinity)
    {
        return None;
    }
    deployments
        .iter()
        .enumerate()
        .filter(|(_, d)| cluster.is_empty() || (d.cluster == cluster && d.framework == framework))
        .filter_map(|(index, d)| {
            let (load, instance) = d.pool.least_in_flight()?;
            Some((load, index, instance))
        })
        .min_by_key(|(load, ..)| *load)
        .map(|(_, index, instance)| (index, instance))
}

/// Which hook a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Route,
    Scale,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Route => "route",
            Hook::Scale => "scale",
        }
    }

    fn signature(self) -> (&'static str, usize) {
        match self {
            Hook::Route => ROUTE,
            Hook::Scale => SCALE,
        }
    }
}

/// A reload's outcome for one file.
#[derive(Debug)]
pub enum Reload {
    Accepted(Hook),
    Refused(Hook, PolicyError),
}

/// Holds the policies in force and reloads them from their files.
pub struct PolicyStore {
    current: ArcSwap<Policies>,
    files: Vec<(Hook, PathBuf)>,
    /// What each file held when last read (its text, or why it could not be read), to
    /// notice edits.
    seen: Mutex<Vec<Option<Result<String, String>>>>,
    /// Per file: when its version in force was loaded, and its last refused edit.
    history: Mutex<Vec<FileHistory>>,
}

/// When a policy file's version in force was loaded (Unix seconds), and its last refused edit.
#[derive(Debug, Clone, Default)]
struct FileHistory {
    loaded_at: u64,
    refused: Option<(u64, String)>,
}

impl PolicyStore {
    /// Loads and compiles the configured files; any error stops the start.
    pub fn load(files: &PolicyFiles) -> Result<PolicyStore, PolicyError> {
        let files: Vec<(Hook, PathBuf)> =
            [(Hook::Route, &files.route), (Hook::Scale, &files.scale)]
                .into_iter()
                .filter_map(|(h, p)| p.clone().map(|p| (h, p)))
                .collect();
        let mut seen = Vec::new();
        let mut policies = Policies {
            route: None,
            scale: None,
            version: 1,
        };
        for (hook, path) in &files {
            let source =
                std::fs::read_to_string(path).map_err(|e| PolicyError::unreadable(path, &e))?;
            let script = Script::compile(path, &source, hook.signature())?;
            if let Some(reuse) = script.reuse() {
                log::info!("route policy {}: {reuse}", path.display());
            }
            policies.set(*hook, script);
            seen.push(Some(Ok(source)));
        }
        let loaded = FileHistory {
            loaded_at: crate::activity::unix_now(),
            refused: None,
        };
        Ok(PolicyStore {
            current: ArcSwap::from_pointee(policies),
            history: Mutex::new(vec![loaded; files.len()]),
            files,
            seen: Mutex::new(seen),
        })
    }

    /// Each policy file: its hook, path, the version in force (counted over all files), when
    /// it was loaded and its last refused edit (for the operator's page).
    pub fn status(&self) -> Vec<serde_json::Value> {
        let version = self.current.load().version;
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        self.files
            .iter()
            .zip(history.iter())
            .map(|((hook, path), h)| {
                serde_json::json!({
                    "hook": hook.name(), "file": path.display().to_string(), "version": version,
                    "loaded_at": h.loaded_at,
                    "refused": h.refused.as_ref().map(|(at, why)| serde_json::json!({"at": at, "why": why})),
                })
            })
            .collect()
    }

    /// The policies in force now.
    pub fn current(&self) -> Arc<Policies> {
        self.current.load_full()
    }

    /// Compiles every file whose text changed since last time and swaps in the ones that
    /// compile; refused files leave their last good version in force. Runs off the request
    /// path (file reads and compilation).
    pub fn reload(&self) -> Vec<Reload> {
        let mut outcomes = Vec::new();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: Option<Policies> = None;
        for (i, (hook, path)) in self.files.iter().enumerate() {
            let read = std::fs::read_to_string(path).map_err(|e| e.to_string());
            if seen[i].as_ref() == Some(&read) {
                continue;
            }
            let source = match &read {
                Ok(source) => source,
                Err(why) => {
                    outcomes.push(Reload::Refused(*hook, PolicyError::unreadable(path, why)));
                    seen[i] = Some(read);
                    continue;
                }
            };
            match Script::compile(path, source, hook.signature()) {
                Ok(script) => {
                    let now = self.current.load();
                    next.get_or_insert_with(|| Policies {
                        route: now.route.clone(),
                        scale: now.scale.clone(),
                        version: now.version + 1,
                    })
                    .set(*hook, script);
                    outcomes.push(Reload::Accepted(*hook));
                }
                Err(e) => outcomes.push(Reload::Refused(*hook, e)),
            }
            seen[i] = Some(read);
        }
        if let Some(p) = next {
            self.current.store(Arc::new(p));
        }
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let now = crate::activity::unix_now();
        for outcome in &outcomes {
            let (hook, refused) = match outcome {
                Reload::Accepted(hook) => (hook, None),
                Reload::Refused(hook, e) => (hook, Some(e.to_string())),
            };
            let Some(i) = self.files.iter().position(|(h, _)| h == hook) else {
                continue;
            };
            match refused {
                None => history[i].loaded_at = now,
                Some(why) => history[i].refused = Some((now, why)),
            }
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cand(
        cluster: &str,
        state: DeploymentState,
        in_flight: &[i64],
        index: usize,
    ) -> Arc<Candidate> {
        Arc::new(Candidate {
            cluster: cluster.into(),
            framework: "vllm".into(),
            state,
            instances: in_flight
                .iter()
                .enumerate()
                .map(|(j, n)| InstanceView {
                    id: format!("{cluster}-{j}:8000"),
                    healthy: state == DeploymentState::Hot,
                    in_flight: *n,
                    latency_ms: 0,
                    ends_in: None,
                    socket: None,
                    ..Default::default()
                })
                .collect(),
            compute: state != DeploymentState::Hot,
            index,
            routing: Default::default(),
            affinity_slack: 0.5,
        })
    }

    fn fixture() -> Candidates {
        Arc::new(vec![
            cand("polaris", DeploymentState::Queued, &[0], 0),
            cand("sophia", DeploymentState::Hot, &[4, 2], 1),
            cand("aurora", DeploymentState::Hot, &[1], 2),
        ])
    }

    fn req(cluster: &str) -> Arc<RouteRequest> {
        Arc::new(RouteRequest {
            model: "m".into(),
            cluster: cluster.into(),
            framework: if cluster.is_empty() { "" } else { "vllm" }.into(),
            ..RouteRequest::default()
        })
    }

    fn script(source: &str) -> Result<Script, PolicyError> {
        Script::compile(Path::new("test.rhai"), source, ROUTE)
    }

    fn instance(d: &Decision) -> Option<&str> {
        match d {
            Decision::Direct { instance, .. } => instance.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn the_builtin_rule_honours_the_url_then_prefers_the_least_loaded_hot_instance() {
        let c = fixture();
        assert_eq!(
            instance(&builtin_route(&req(""), &c)),
            Some("aurora-0:8000")
        );
        assert_eq!(
            instance(&builtin_route(&req("sophia"), &c)),
            Some("sophia-1:8000")
        );
        assert!(matches!(
            builtin_route(&req("polaris"), &c),
            Decision::Compute { index: 0, .. }
        ));
    }

    #[test]
    fn scripts_narrow_and_decide() {
        let c = fixture();
        let s = script(
            r#"fn route(req, c) {
                let best = c.prefer(["queued", "hot"]);
                if best.first().state == "queued" { compute(best) } else { direct(best) }
            }"#,
        )
        .unwrap();
        assert!(matches!(
            s.route(&req(""), &c).unwrap(),
            Decision::Compute { index: 0, .. }
        ));
        let s = script(r#"fn route(req, c) { direct(c.in_cluster("sophia").without_instance("sophia-1:8000")) }"#)
            .unwrap();
        assert_eq!(
            instance(&s.route(&req(""), &c).unwrap()),
            Some("sophia-0:8000")
        );
        let s = script(r#"fn route(req, c) { direct(c.in_state("cold")) }"#).unwrap();
        assert!(matches!(
            s.route(&req(""), &c).unwrap(),
            Decision::Reject { status: 503, .. }
        ));
    }

    #[test]
    fn scripts_read_backend_figures_and_route_by_prefix() {
        let mut sophia = Candidate::clone(&fixture()[1]);
        sophia.index = 0;
        sophia.instances[0].waiting = 3;
        sophia.instances[0].kv_cache = Some(0.5);
        sophia.instances[1].kv_cache = Some(0.25);
        sophia.instances[1].metrics_age_ms = Some(120);
        let c: Candidates = Arc::new(vec![Arc::new(sophia)]);
        let s = script(
            r#"fn route(req, c) {
                let d = c.first();
                if d.waiting != 3 || d.kv_cache != 0.375 || d.metrics_age_ms != 120
                    || d.prefix_hit_rate != -1.0 { return reject(500, "bad figures"); }
                direct(c.without_queue())
            }"#,
        )
        .unwrap();
        assert_eq!(
            instance(&s.route(&req(""), &c).unwrap()),
            Some("sophia-1:8000")
        );
        // By prefix: the same key, the same instance, whatever the loads below the bound.
        let mut with_key = RouteRequest::clone(&req(""));
        with_key.prefix = Some(42);
        let with_key = Arc::new(with_key);
        let s = script("fn route(req, c) { direct_by_prefix(c) }").unwrap();
        let first = s.route(&with_key, &c).unwrap();
        assert!(
            matches!(
                first,
                Decision::Direct {
                    by_prefix: true,
                    ..
                }
            ),
            "{first:?}"
        );
        // Without a prompt key it is the least-loaded instance.
        let d = s.route(&req(""), &c).unwrap();
        assert!(
            matches!(
                d,
                Decision::Direct {
                    by_prefix: false,
                    ..
                }
            ),
            "{d:?}"
        );
    }

    #[test]
    fn bad_decisions_and_runaway_scripts_are_errors() {
        let c = fixture();
        let e = script("fn route(req, c) { reject(200, \"fine\") }")
            .unwrap()
            .route(&req(""), &c);
        assert!(e.unwrap_err().to_string().contains("HTTP error status"));
        let e = script("fn route(req, c) {\n  c.in_state(\"warm\")\n}")
            .unwrap()
            .route(&req(""), &c);
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("test.rhai line 2") && e.contains("unknown state"),
            "{e}"
        );
        let e = script("fn route(req, c) { loop {} }")
            .unwrap()
            .route(&req(""), &c);
        assert!(e.unwrap_err().to_string().contains("Too many operations"));
        assert!(script("fn route(req, c) { eval(\"1\") }").is_err());
        assert!(script("fn other(req, c) { () }").is_err());
        let scale = Script::compile(
            Path::new("s.rhai"),
            "fn scale(m) { [start(\"a\", 1), 7] }",
            SCALE,
        )
        .unwrap();
        let e = scale.scale(ScaleInput::default()).unwrap_err();
        assert!(e.to_string().contains("scale() returned i64"), "{e}");
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("route.rhai");
        std::fs::write(&path, "fn route(req, c) { direct(c) }").unwrap();
        let files = PolicyFiles {
            route: Some(path.clone()),
            ..PolicyFiles::default()
        };
        let store = PolicyStore::load(&files).unwrap();
        let first = store.current();
        assert!(
            store.reload().is_empty(),
            "unchanged files are not recompiled"
        );

        std::fs::write(&path, "fn route(req, c) { direct(c").unwrap();
        assert!(matches!(
            store.reload()[..],
            [Reload::Refused(Hook::Route, _)]
        ));
        assert!(Arc::ptr_eq(&store.current(), &first));

        std::fs::write(&path, "fn route(req, c) { reject(429, \"slow down\") }").unwrap();
        assert!(matches!(
            store.reload()[..],
            [Reload::Accepted(Hook::Route)]
        ));
        let now = store.current();
        assert_eq!(now.version, 2);
        let d = now.route(&req(""), &fixture(), None).unwrap();
        assert_eq!(
            d,
            Decision::Reject {
                status: 429,
                message: "slow down".into()
            }
        );
        // The snapshot a request holds is unaffected.
        assert!(matches!(
            first.route(&req(""), &fixture(), None).unwrap(),
            Decision::Direct { .. }
        ));
    }

    /// Two deployments of `m` with real pools, discovered: sophia (2 instances), polaris (3).
    pub(super) async fn deployments() -> Vec<Arc<Deployment>> {
        let cfg = crate::config::parse(
            Path::new("t.yaml"),
            r#"
auth: {mode: none}
clusters:
  sophia:
    frameworks:
      vllm:
        models:
          - name: m
            backends: [127.0.0.1:1, 127.0.0.1:2]
            health_path: null
  polaris:
    frameworks:
      vllm:
        models:
          - name: m
            backends: [127.0.0.1:3, 127.0.0.1:4, 127.0.0.1:5]
            health_path: null
"#,
        )
        .unwrap();
        let catalog = crate::catalog::Catalog::build(&cfg).unwrap();
        let all = catalog.resolve_federated("m").unwrap().to_vec();
        for d in &all {
            d.pool.discover().await;
        }
        all
    }

    #[tokio::test]
    async fn the_builtin_rule_reads_the_same_choice_without_a_snapshot() {
        let all = &deployments().await;
        let instances: Vec<_> = all
            .iter()
            .flat_map(|d| d.pool.instances())
            .map(|(i, _)| i)
            .collect();
        let with_snapshot = |cluster: &str, framework: &str| {
            let req = RouteRequest {
                model: "m".into(),
                cluster: cluster.into(),
                framework: framework.into(),
                ..Default::default()
            };
            let candidates = candidates_of(all);
            match builtin_route(&req, &candidates) {
                Decision::Direct {
                    index,
                    instance: Some(id),
                    ..
                } => {
                    let view = candidates[index].instances.iter().find(|i| i.id == id);
                    Some((index, view?.socket?))
                }
                _ => None,
            }
        };
        let agree = |step: &str| {
            for (c, f) in [
                ("", ""),
                ("sophia", "vllm"),
                ("polaris", "vllm"),
                ("polaris", "x"),
            ] {
                let direct = builtin_direct(all, c, f).map(|(d, i)| (d, i.socket));
                assert_eq!(direct, with_snapshot(c, f), "{step}, cluster '{c}' '{f}'");
            }
        };
        agree("idle");
        // Loads that move the least-loaded instance around, ties included.
        let mut held = Vec::new();
        for (step, i) in [0, 2, 2, 1, 4, 3, 0, 1].into_iter().enumerate() {
            let d = all.iter().find(|d| {
                d.pool
                    .instances()
                    .iter()
                    .any(|(x, _)| x.socket == instances[i].socket)
            });
            held.push(d.unwrap().pool.try_acquire_at(instances[i].socket).unwrap());
            agree(&format!("load step {step}"));
        }
        let sophia = all.iter().filter(|d| d.cluster == "sophia");
        for (i, _) in sophia.flat_map(|d| d.pool.instances()) {
            i.set_draining(true);
        }
        agree("sophia draining");
        assert!(builtin_direct(all, "sophia", "vllm").is_none());
        for i in &instances {
            i.set_draining(true);
        }
        agree("all draining");
        assert!(builtin_direct(all, "", "").is_none());
    }
}
