//! The Rhai engine policies run in: sandboxed (operation, depth and size limits, no modules,
//! no `eval`), and the vocabulary scripts use. Loops over candidates and instances stay in
//! Rust; a script chooses among high-level operations (`hot()`, `prefer([...])`,
//! `direct(...)`), which keeps a decision at a few microseconds.
//!
//! Each worker thread has its own engine (the registered vocabulary is identical), so property
//! access never contends on a shared engine; compiled scripts are shared.

use super::scale::{ScaleAction, ScaleInput};
use super::view::{self, Candidate, Candidates, Decision, DeploymentState, RouteRequest};
use rhai::{Array, Dynamic, Engine, EvalAltResult, ImmutableString, OptimizationLevel};
use std::sync::Arc;

type Fallible<T> = Result<T, Box<EvalAltResult>>;

/// The request (`req` in a route script).
#[derive(Clone)]
pub struct Req(pub Arc<RouteRequest>);

/// The candidate list (`candidates`), narrowed by the script's calls.
#[derive(Clone)]
pub struct CandidateList {
    pub model: Arc<str>,
    pub items: Candidates,
    /// The request's prompt key (prefix affinity), if it has a prompt.
    pub prefix: Option<u64>,
}

impl CandidateList {
    fn narrowed(&self, keep: impl Fn(&Candidate) -> bool) -> CandidateList {
        CandidateList {
            model: self.model.clone(),
            items: Arc::new(self.items.iter().filter(|c| keep(c)).cloned().collect()),
            prefix: self.prefix,
        }
    }

    fn with_instances(&self, keep: impl Fn(&view::InstanceView) -> bool) -> CandidateList {
        let items = self
            .items
            .iter()
            .filter_map(|c| {
                let instances: Vec<_> = c.instances.iter().filter(|i| keep(i)).cloned().collect();
                (!instances.is_empty()).then(|| {
                    Arc::new(Candidate {
                        instances,
                        ..Candidate::clone(c)
                    })
                })
            })
            .collect();
        CandidateList {
            model: self.model.clone(),
            items: Arc::new(items),
            prefix: self.prefix,
        }
    }
}

/// An engine with the sandbox limits and the policy vocabulary.
pub fn new_engine() -> Engine {
    let mut e = Engine::new();
    e.set_max_operations(100_000)
        .set_max_call_levels(32)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(8 * 1024)
        .set_max_array_size(1024)
        .set_max_map_size(256)
        .set_strict_variables(true)
        .set_optimization_level(OptimizationLevel::Simple);
    e.disable_symbol("eval");
    e.on_print(|s| log::info!("policy: {s}"));
    e.on_debug(|s, _, pos| log::debug!("policy ({pos}): {s}"));
    register_request(&mut e);
    register_candidates(&mut e);
    register_decisions(&mut e);
    register_scale(&mut e);
    e
}

thread_local! {
    static ENGINE: Engine = new_engine();
}

/// Runs `f` with this thread's engine.
pub fn with_engine<T>(f: impl FnOnce(&Engine) -> T) -> T {
    ENGINE.with(f)
}

thread_local! {
    /// Set when a script turns a decision into text: what it does next may depend on the
    /// instance chosen, so that decision is not reused (`policy::memo`).
    static DECISION_SHOWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a call of a script on this thread) and says whether it turned a decision into
/// text.
pub fn noting_shown_decisions<T>(f: impl FnOnce() -> T) -> (T, bool) {
    DECISION_SHOWN.set(false);
    let out = f();
    (out, DECISION_SHOWN.replace(false))
}

fn register_request(e: &mut Engine) {
    e.register_type_with_name::<Req>("Request")
        .register_get("model", |r: &mut Req| r.0.model.clone())
        .register_get("endpoint", |r: &mut Req| r.0.endpoint.clone())
        .register_get("stream", |r: &mut Req| r.0.stream)
        .register_get("batch", |r: &mut Req| r.0.batch)
        .register_get("cluster", |r: &mut Req| r.0.cluster.clone())
        .register_get("framework", |r: &mut Req| r.0.framework.clone())
        .register_get("username", |r: &mut Req| r.0.user.username.clone())
        .register_get("user_id", |r: &mut Req| r.0.user.id.clone())
        .register_get("domain", |r: &mut Req| r.0.user.domain.clone())
        .register_get("groups", |r: &mut Req| -> Array {
            r.0.user.groups.iter().map(|g| g.clone().into()).collect()
        })
        .register_get("prompt_bytes", |r: &mut Req| r.0.prompt_bytes)
        .register_fn("in_group", |r: &mut Req, g: ImmutableString| {
            r.0.user.groups.iter().any(|x| x.as_str() == g.as_str())
        })
        .register_fn("header", |r: &mut Req, name: ImmutableString| {
            r.0.headers
                .get(&name.to_ascii_lowercase())
                .cloned()
                .unwrap_or_default()
        });
}

fn state_named(name: &str) -> Fallible<DeploymentState> {
    Ok(match name {
        "hot" => DeploymentState::Hot,
        "starting" => DeploymentState::Starting,
        "queued" => DeploymentState::Queued,
        "cold" => DeploymentState::Cold,
        "offline" => DeploymentState::Offline,
        "maintenance" => DeploymentState::Maintenance,
        other => {
            return Err(format!(
                "unknown state {other:?}: use hot, starting, queued, cold, offline or maintenance"
            )
            .into())
        }
    })
}

fn register_candidates(e: &mut Engine) {
    e.register_type_with_name::<CandidateList>("Candidates")
        .register_get("len", |c: &mut CandidateList| c.items.len() as i64)
        .register_fn("len", |c: &mut CandidateList| c.items.len() as i64)
        .register_fn("is_empty", |c: &mut CandidateList| c.items.is_empty())
        .register_fn("hot", |c: &mut CandidateList| {
            c.narrowed(|x| x.state == DeploymentState::Hot)
        })
        .register_fn(
            "in_state",
            |c: &mut CandidateList, s: ImmutableString| -> Fallible<CandidateList> {
                let state = state_named(&s)?;
                Ok(c.narrowed(|x| x.state == state))
            },
        )
        .register_fn(
            "in_cluster",
            |c: &mut CandidateList, name: ImmutableString| {
                c.narrowed(|x| x.cluster == name.as_str())
            },
        )
        .register_fn("requested", |c: &mut CandidateList, r: Req| {
            if r.0.cluster.is_empty() {
                c.clone()
            } else {
                c.narrowed(|x| x.cluster == r.0.cluster && x.framework == r.0.framework)
            }
        })
        .register_fn("with_compute", |c: &mut CandidateList| {
            c.narrowed(|x| x.compute)
        })
        .register_fn(
            "prefer",
            |c: &mut CandidateList, order: Array| -> Fallible<CandidateList> {
                for s in order {
                    let name = s.into_immutable_string().map_err(|t| {
                        format!("prefer() takes a list of state names, found a {t}")
                    })?;
                    let state = state_named(&name)?;
                    let tier = c.narrowed(|x| x.state == state);
                    if !tier.items.is_empty() {
                        return Ok(tier);
                    }
                }
                Ok(c.narrowed(|_| false))
            },
        )
        .register_fn("avoid_ending_within", |c: &mut CandidateList, secs: i64| {
            c.with_instances(|i| i.ends_in.is_none_or(|left| left > secs))
        })
        .register_fn("without_queue", |c: &mut CandidateList| {
            c.with_instances(|i| i.waiting <= 0)
        })
        .register_fn("max_waiting", |c: &mut CandidateList, n: i64| {
            c.with_instances(|i| i.waiting <= n)
        })
        .register_fn(
            "with_instance",
            |c: &mut CandidateList, id: ImmutableString| c.with_instances(|i| i.id == id.as_str()),
        )
        .register_fn(
            "without_instance",
            |c: &mut CandidateList, id: ImmutableString| c.with_instances(|i| i.id != id.as_str()),
        )
        .register_fn("first", |c: &mut CandidateList| -> Fallible<Candidate> {
            c.items
                .first()
                .map(|c| Candidate::clone(c))
                .ok_or_else(|| "first() on an empty candidate list".into())
        });

    e.register_type_with_name::<Candidate>("Candidate")
        .register_get("cluster", |c: &mut Candidate| c.cluster.clone())
        .register_get("framework", |c: &mut Candidate| c.framework.clone())
        .register_get("state", |c: &mut Candidate| c.state.as_str().to_string())
        .register_get("compute", |c: &mut Candidate| c.compute)
        .register_get("instances", |c: &mut Candidate| c.instances.len() as i64)
        .register_get("healthy", |c: &mut Candidate| {
            c.healthy_instances().count() as i64
        })
        .register_get("in_flight", |c: &mut Candidate| {
            c.instances.iter().map(|i| i.in_flight).sum::<i64>()
        })
        // What the backends report themselves (vLLM's /metrics); -1 where nothing is known.
        .register_get("waiting", |c: &mut Candidate| c.waiting())
        .register_get("running", |c: &mut Candidate| c.running())
        .register_get("kv_cache", |c: &mut Candidate| c.kv_cache().unwrap_or(-1.0))
        .register_get("prefix_hit_rate", |c: &mut Candidate| {
            c.prefix_hit_rate().unwrap_or(-1.0)
        })
        .register_get("metrics_age_ms", |c: &mut Candidate| {
            c.metrics_age_ms().unwrap_or(-1)
        })
        .register_get("routing", |c: &mut Candidate| {
            c.routing.as_str().to_string()
        });
}

fn one(c: &Candidate, model: &str) -> CandidateList {
    CandidateList {
        model: model.into(),
        items: Arc::new(vec![Arc::new(c.clone())]),
        prefix: None,
    }
}

fn register_decisions(e: &mut Engine) {
    e.register_type_with_name::<Decision>("Decision")
        .register_fn("direct", |c: CandidateList| {
            view::direct_routed(c.items.iter().map(|c| &**c), &c.model, c.prefix)
        })
        .register_fn("direct_by_prefix", |c: CandidateList| match c.prefix {
            Some(key) => view::direct_by_prefix(c.items.iter().map(|c| &**c), &c.model, key),
            None => view::direct(&c.items, &c.model),
        })
        .register_fn("compute", |c: CandidateList| {
            view::compute(&c.items, &c.model)
        })
        .register_fn("direct", |c: Candidate| {
            let l = one(&c, "the model");
            view::direct(&l.items, &l.model)
        })
        .register_fn("compute", |c: Candidate| {
            let l = one(&c, "the model");
            view::compute(&l.items, &l.model)
        })
        .register_fn(
            "reject",
            |status: i64, message: ImmutableString| -> Fallible<Decision> {
                if !(400..=599).contains(&status) {
                    return Err(format!(
                        "reject() needs an HTTP error status (400-599), got {status}"
                    )
                    .into());
                }
                Ok(Decision::Reject {
                    status: status as u16,
                    message: message.to_string(),
                })
            },
        )
        .register_fn("to_string", |d: &mut Decision| {
            // The text names the instance chosen on this moment's loads (also in `"" + d`).
            DECISION_SHOWN.set(true);
            serde_json::to_string(d).unwrap_or_default()
        });
}

fn register_scale(e: &mut Engine) {
    e.register_type_with_name::<ScaleInput>("Model")
        .register_get("name", |m: &mut ScaleInput| m.model.clone())
        .register_get("clusters", |m: &mut ScaleInput| -> Array {
            m.clusters.iter().map(|c| c.clone().into()).collect()
        })
        .register_get("requests_per_minute", |m: &mut ScaleInput| {
            m.requests_per_minute
        })
        .register_get("tokens_per_minute", |m: &mut ScaleInput| {
            m.tokens_per_minute
        })
        .register_get("waiting", |m: &mut ScaleInput| m.waiting)
        .register_get("cold_waiting", |m: &mut ScaleInput| m.cold_waiting)
        .register_get("in_flight", |m: &mut ScaleInput| m.in_flight)
        .register_get("backend_waiting", |m: &mut ScaleInput| m.backend_waiting)
        .register_get("backend_running", |m: &mut ScaleInput| m.backend_running)
        .register_get("min", |m: &mut ScaleInput| m.min_instances)
        .register_get("max", |m: &mut ScaleInput| m.max_instances)
        .register_get("keep_hot", |m: &mut ScaleInput| m.keep_hot)
        .register_get("idle_release", |m: &mut ScaleInput| m.idle_release)
        .register_get("instances", |m: &mut ScaleInput| m.instances.len() as i64)
        .register_get("starting", |m: &mut ScaleInput| m.starting)
        .register_fn(
            "idle_longer_than",
            |m: &mut ScaleInput, secs: i64| -> Array {
                m.instances
                    .iter()
                    .filter(|i| i.idle >= secs)
                    .map(|i| i.id.clone().into())
                    .collect()
            },
        );
    e.register_type_with_name::<ScaleAction>("Action")
        .register_fn(
            "start",
            |cluster: ImmutableString, count: i64| -> Fallible<ScaleAction> {
                if count < 1 {
                    return Err(format!("start() needs a count of at least 1, got {count}").into());
                }
                Ok(ScaleAction::Start {
                    cluster: cluster.to_string(),
                    count: count as u32,
                })
            },
        )
        .register_fn("stop", |instance: ImmutableString| ScaleAction::Stop {
            instance: instance.to_string(),
        });
}

/// Reads a hook's result as the given type, or says what was returned instead.
pub fn expect<T: Clone + 'static>(value: Dynamic, what: &str) -> Result<T, String> {
    let type_name = value.type_name().to_string();
    value
        .try_cast::<T>()
        .ok_or_else(|| format!("returned {type_name}, expected {what}"))
}
