//! Where requests go and when instances start or stop: operator-written Rhai policies
//! (`route(req, candidates)`, `scale(model)`), compiled once, swapped atomically when their
//! files change or on SIGHUP (a broken edit is refused and the last good version stays), with
//! a built-in route rule when no script is configured.

mod engine;
mod scale;
mod script;
mod service;
mod view;

pub use scale::{ScaleAction, ScaleInput, ScaleInstance};
pub use script::{PolicyError, Script, ROUTE, SCALE};
pub use service::{candidates_of, PolicyWatcher, ScaleRunner};
pub use view::{
    Candidate, Candidates, Decision, DeploymentState, InstanceView, RouteRequest, UserView,
};

use crate::config::PolicyFiles;
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
    /// The route decision: the script's, or the built-in rule's.
    pub fn route(
        &self,
        req: &Arc<RouteRequest>,
        candidates: &Candidates,
    ) -> Result<Decision, PolicyError> {
        match &self.route {
            Some(script) => script.route(req, candidates),
            None => Ok(builtin_route(req, candidates)),
        }
    }
}

/// The built-in rule: the requested cluster if the URL names one, then prefer deployments with
/// a healthy instance, and the instance with the fewest requests in flight.
pub fn builtin_route(req: &RouteRequest, candidates: &[Candidate]) -> Decision {
    let requested: Vec<Candidate> = candidates
        .iter()
        .filter(|c| {
            req.cluster.is_empty() || (c.cluster == req.cluster && c.framework == req.framework)
        })
        .cloned()
        .collect();
    if view::least_in_flight(&requested).is_some() {
        view::direct(&requested, &req.model)
    } else if requested.iter().any(|c| c.compute) {
        view::compute(&requested, &req.model)
    } else {
        view::direct(&requested, &req.model)
    }
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
    /// The source last compiled (or refused) per file, to notice edits.
    seen: Mutex<Vec<Option<String>>>,
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
            let script = Arc::new(Script::compile(path, &source, hook.signature())?);
            match hook {
                Hook::Route => policies.route = Some(script),
                Hook::Scale => policies.scale = Some(script),
            }
            seen.push(Some(source));
        }
        Ok(PolicyStore {
            current: ArcSwap::from_pointee(policies),
            files,
            seen: Mutex::new(seen),
        })
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
            let source = match std::fs::read_to_string(path) {
                Ok(s) => s,
                Err(e) => {
                    let text = format!("unreadable: {e}");
                    if seen[i].as_deref() != Some(text.as_str()) {
                        outcomes.push(Reload::Refused(*hook, PolicyError::unreadable(path, &e)));
                        seen[i] = Some(text);
                    }
                    continue;
                }
            };
            if seen[i].as_deref() == Some(source.as_str()) {
                continue;
            }
            match Script::compile(path, &source, hook.signature()) {
                Ok(script) => {
                    let now = self.current.load();
                    let p = next.get_or_insert_with(|| Policies {
                        route: now.route.clone(),
                        scale: now.scale.clone(),
                        version: now.version + 1,
                    });
                    match hook {
                        Hook::Route => p.route = Some(Arc::new(script)),
                        Hook::Scale => p.scale = Some(Arc::new(script)),
                    }
                    outcomes.push(Reload::Accepted(*hook));
                }
                Err(e) => outcomes.push(Reload::Refused(*hook, e)),
            }
            seen[i] = Some(source);
        }
        if let Some(p) = next {
            self.current.store(Arc::new(p));
        }
        outcomes
    }
}
