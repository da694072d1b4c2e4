//! A policy file compiled once, and calls of its hook with errors that name the file and line.

use super::engine::{self, CandidateList, Req};
use super::memo::{RouteMemo, SituationKey};
use super::scale::{ScaleAction, ScaleInput};
use super::view::{Candidates, Decision, RouteRequest};
use rhai::{CallFnOptions, Dynamic, EvalAltResult, Position, Scope, AST};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A failed policy decision or a script that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy {file}{line}: {message}")]
pub struct PolicyError {
    pub file: String,
    /// ` line N`, or empty when the error has no position.
    line: String,
    pub message: String,
}

impl PolicyError {
    fn new(file: &Path, pos: Position, message: impl Into<String>) -> Self {
        let mut message = message.into();
        // Rhai appends its own " (line N, position M)"; the line goes in our prefix.
        if let Some(cut) = message.rfind(" (line ") {
            message.truncate(cut);
        }
        PolicyError {
            file: file.display().to_string(),
            line: pos.line().map(|l| format!(" line {l}")).unwrap_or_default(),
            message,
        }
    }

    pub(super) fn unreadable(path: &Path, e: impl std::fmt::Display) -> Self {
        PolicyError::new(path, Position::NONE, format!("cannot read: {e}"))
    }

    /// The innermost error of a script failure, located at its line.
    fn from_eval(file: &Path, err: &EvalAltResult) -> Self {
        let mut err = err;
        while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = err {
            err = inner;
        }
        PolicyError::new(file, err.position(), err.to_string())
    }
}

/// A compiled policy file with the hook it must define.
pub struct Script {
    pub path: PathBuf,
    ast: AST,
    hook: &'static str,
    /// Its route decisions by situation, or the volatile word that keeps them from being
    /// reused (`None` for other hooks).
    memo: Option<Result<RouteMemo, &'static str>>,
}

/// The route hook's name and arity.
pub const ROUTE: (&str, usize) = ("route", 2);
/// The scale hook's name and arity.
pub const SCALE: (&str, usize) = ("scale", 1);

impl Script {
    /// Compiles `source` and checks that it defines `hook` with the right parameters.
    pub fn compile(
        path: &Path,
        source: &str,
        hook: (&'static str, usize),
    ) -> Result<Script, PolicyError> {
        let ast = engine::with_engine(|e| e.compile(source))
            .map_err(|e| PolicyError::new(path, e.position(), e.to_string()))?;
        let (name, arity) = hook;
        if !ast
            .iter_functions()
            .any(|f| f.name == name && f.params.len() == arity)
        {
            let params = if arity == 2 {
                "req, candidates"
            } else {
                "model"
            };
            return Err(PolicyError::new(
                path,
                Position::NONE,
                format!("defines no `fn {name}({params})`"),
            ));
        }
        Ok(Script {
            path: path.to_path_buf(),
            ast,
            hook: name,
            memo: (hook == ROUTE).then(|| RouteMemo::for_source(source)),
        })
    }

    fn call(&self, args: impl rhai::FuncArgs) -> Result<Dynamic, PolicyError> {
        self.call_named(self.hook, args)
    }

    fn call_named(&self, name: &str, args: impl rhai::FuncArgs) -> Result<Dynamic, PolicyError> {
        engine::with_engine(|e| {
            e.call_fn_with_options::<Dynamic>(
                CallFnOptions::new().eval_ast(false),
                &mut Scope::new(),
                &self.ast,
                name,
                args,
            )
        })
        .map_err(|e| PolicyError::from_eval(&self.path, &e))
    }

    /// Runs the optional `batch(job)` of a route script: where an OpenAI-API batch runs,
    /// `"gateway"` or `"compute"` (the model's batch function on Globus Compute, FIRST's way);
    /// `None` when the script has no such function.
    pub fn batch(&self, job: rhai::Map) -> Option<Result<String, PolicyError>> {
        if !self
            .ast
            .iter_functions()
            .any(|f| f.name == "batch" && f.params.len() == 1)
        {
            return None;
        }
        Some(self.call_named("batch", (job,)).and_then(|out| {
            let place = out.into_string().unwrap_or_default();
            match place.as_str() {
                "gateway" | "compute" => Ok(place),
                other => Err(PolicyError::new(
                    &self.path,
                    Position::NONE,
                    format!("batch() must return \"gateway\" or \"compute\", not {other:?}"),
                )),
            }
        }))
    }

    /// Its route decisions by situation, if they can be reused.
    pub fn memo(&self) -> Option<&RouteMemo> {
        self.memo.as_ref()?.as_ref().ok()
    }

    /// Whether a route script's decisions are reused, said for the log (README, "Decisions
    /// reused"); `None` for other hooks.
    pub fn reuse(&self) -> Option<String> {
        Some(match self.memo.as_ref()? {
            Ok(_) => "its decisions are reused for requests in the same situation".into(),
            Err(word) => format!("it runs for every request (it names `{word}`)"),
        })
    }

    /// Runs `route(req, candidates)`.
    pub fn route(
        &self,
        req: &Arc<RouteRequest>,
        candidates: &Candidates,
    ) -> Result<Decision, PolicyError> {
        self.route_in(req, candidates, None)
    }

    /// Runs `route(req, candidates)` and keeps the decision for `situation` (the request's,
    /// from [`RouteMemo::situation`]) unless the script turned it into text.
    pub fn route_in(
        &self,
        req: &Arc<RouteRequest>,
        candidates: &Candidates,
        situation: Option<SituationKey>,
    ) -> Result<Decision, PolicyError> {
        let list = CandidateList {
            model: req.model.as_str().into(),
            items: candidates.clone(),
            prefix: req.prefix,
        };
        let (out, shown) = engine::noting_shown_decisions(|| self.call((Req(req.clone()), list)));
        let decision = engine::expect::<Decision>(
            out?,
            "a decision: direct(..), compute(..) or reject(status, message)",
        )
        .map_err(|m| PolicyError::new(&self.path, Position::NONE, format!("route() {m}")))?;
        if let (Some(memo), Some(situation), false) = (self.memo(), situation, shown) {
            memo.remember(situation, &decision);
        }
        Ok(decision)
    }

    /// Runs `scale(model)`: an action, a list of actions, or `()` / `[]` for none.
    pub fn scale(&self, input: ScaleInput) -> Result<Vec<ScaleAction>, PolicyError> {
        let out = self.call((input,))?;
        let malformed =
            |m: String| PolicyError::new(&self.path, Position::NONE, format!("scale() {m}"));
        if out.is_unit() {
            return Ok(Vec::new());
        }
        if out.is_array() {
            return out
                .into_array()
                .unwrap_or_default()
                .into_iter()
                .map(|a| {
                    engine::expect::<ScaleAction>(a, "a list of start(cluster, n) / stop(instance)")
                })
                .collect::<Result<_, _>>()
                .map_err(malformed);
        }
        engine::expect::<ScaleAction>(
            out,
            "start(cluster, n), stop(instance), a list of them, or ()",
        )
        .map(|a| vec![a])
        .map_err(malformed)
    }
}
