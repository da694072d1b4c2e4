//! The discrete-event simulation of one pair of policies over the recorded arrivals: each
//! request asks the route policy (with candidates built from the simulated instances, as the
//! gateway builds them from live ones), each scale run asks the scale policy (with the view
//! the live runner gives it), and instances start after the batch queue and the model's load,
//! take `slots` requests at once, drain before their walltime and end when stopped.

use super::report::{ModelResult, PolicyResult};
use super::{Arrival, DeploymentSpec, Facility, ModelFacts, Outcome, Policies};
use crate::policy::view::{self, Candidate, DeploymentState, InstanceView, RouteRequest, UserView};
use crate::policy::{builtin_route, Decision, ScaleAction, ScaleInput, ScaleInstance};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

/// Runs the arrivals of `[from_ms, to_ms)` through `policies`.
pub(super) fn run(
    facility: &Facility,
    policies: &Policies,
    arrivals: &[Arrival],
    from_ms: i64,
    to_ms: i64,
) -> PolicyResult {
    let mut models: Vec<ModelSim> = facility
        .models
        .iter()
        .map(|m| ModelSim::new(m, from_ms))
        .collect();
    let mut policy_errors = 0u64;
    let interval = facility.scale_interval_ms;
    let mut next_tick = from_ms + interval;
    let scale_all = |models: &mut Vec<ModelSim>, at: i64, errors: &mut u64| {
        for m in models.iter_mut() {
            m.advance(at);
            *errors += m.scale(policies, at);
        }
    };
    for a in arrivals {
        while next_tick <= a.at_ms {
            scale_all(&mut models, next_tick, &mut policy_errors);
            next_tick += interval;
        }
        let m = &mut models[a.model];
        m.advance(a.at_ms);
        let (outcome, errors) = m.route(policies, a, facility.admission_wait_ms);
        policy_errors += errors;
        // The live runner is woken when a request finds nothing hot.
        if outcome == Outcome::Compute {
            policy_errors += m.scale(policies, a.at_ms);
        }
    }
    while next_tick < to_ms {
        scale_all(&mut models, next_tick, &mut policy_errors);
        next_tick += interval;
    }
    PolicyResult {
        name: String::new(),
        route: String::new(),
        scale: String::new(),
        policy_errors,
        models: models
            .into_iter()
            .map(|m| m.finish(to_ms, facility.instances_per_node))
            .collect(),
    }
}

/// One simulated instance.
struct Instance {
    id: String,
    /// A configured backend: always there, never stopped, not counted in node-hours.
    fixed: bool,
    /// When its node was allocated (after the batch queue) and when the model was loaded.
    node_from: i64,
    ready: i64,
    job_end: Option<i64>,
    stopped_at: Option<i64>,
    /// End times of the requests it is serving.
    in_flight: BinaryHeap<Reverse<i64>>,
    /// Until when it has been busy, and for how long in total.
    busy_until: i64,
    busy_ms: i64,
}

impl Instance {
    fn new(id: String, node_from: i64, ready: i64, job_end: Option<i64>) -> Instance {
        Instance {
            id,
            fixed: job_end.is_none(),
            node_from,
            ready,
            job_end,
            stopped_at: None,
            in_flight: BinaryHeap::new(),
            busy_until: ready,
            busy_ms: 0,
        }
    }

    fn retire(&mut self, now: i64) {
        while self
            .in_flight
            .peek()
            .is_some_and(|Reverse(end)| *end <= now)
        {
            self.in_flight.pop();
        }
    }

    /// Whether new requests may go to it (not stopped, its job not about to end).
    fn takes_requests(&self, now: i64, drain_before: i64) -> bool {
        self.stopped_at.is_none() && self.job_end.is_none_or(|end| now < end - drain_before)
    }

    /// When it is gone: its job's end, or once stopped and its requests are done.
    fn gone_at(&self) -> Option<i64> {
        let stopped = self.stopped_at.map(|s| s.max(self.busy_until));
        match (self.job_end, stopped) {
            (Some(j), Some(s)) => Some(j.min(s)),
            (j, s) => j.or(s),
        }
    }

    fn serve(&mut self, start: i64, end: i64) {
        let from = start.max(self.busy_until);
        if end > from {
            self.busy_ms += end - from;
        }
        self.busy_until = self.busy_until.max(end);
        self.in_flight.push(Reverse(end));
    }
}

/// An instance asked for: its node comes after the batch queue, the model loads after that.
struct Pending {
    node_from: i64,
    ready: i64,
}

struct DeploymentSim<'a> {
    spec: &'a DeploymentSpec,
    instances: Vec<Instance>,
    pending: Vec<Pending>,
    /// End times of requests through Compute, and start times of requests waiting for a slot.
    compute_ends: BinaryHeap<Reverse<i64>>,
    waiting: BinaryHeap<Reverse<i64>>,
}

impl DeploymentSim<'_> {
    fn serving(&self, now: i64) -> impl Iterator<Item = (usize, &Instance)> {
        self.instances
            .iter()
            .enumerate()
            .filter(move |(_, i)| i.takes_requests(now, self.spec.drain_before_ms))
    }

    fn state(&self, now: i64) -> DeploymentState {
        if self.serving(now).next().is_some() {
            DeploymentState::Hot
        } else if self.pending.iter().any(|p| p.node_from <= now) {
            DeploymentState::Starting
        } else if !self.pending.is_empty() {
            DeploymentState::Queued
        } else if self.spec.compute || self.spec.startable {
            DeploymentState::Cold
        } else {
            DeploymentState::Offline
        }
    }

    /// A slot for a request arriving `now`: on `preferred` if it has room, else the instance
    /// with the fewest in flight that has room, else the one whose first request ends first
    /// (the request waits for it). The instance and when the request would start.
    fn slot(&mut self, preferred: Option<usize>, now: i64) -> Option<(usize, i64)> {
        let slots = self.spec.slots;
        for i in &mut self.instances {
            i.retire(now);
        }
        let has_room = |i: &Instance| i.in_flight.len() < slots;
        if let Some(p) = preferred.filter(|p| has_room(&self.instances[*p])) {
            return Some((p, now));
        }
        let serving: Vec<usize> = self.serving(now).map(|(n, _)| n).collect();
        if let Some(n) = serving
            .iter()
            .copied()
            .filter(|n| has_room(&self.instances[*n]))
            .min_by_key(|n| self.instances[*n].in_flight.len())
        {
            return Some((n, now));
        }
        serving
            .into_iter()
            .filter_map(|n| Some((n, self.instances[n].in_flight.peek()?.0)))
            .min_by_key(|(_, free_at)| *free_at)
    }
}

struct ModelSim<'a> {
    facts: &'a ModelFacts,
    deployments: Vec<DeploymentSim<'a>>,
    queue_wait_ms: i64,
    load_ms: i64,
    /// Demand since the previous scale run, and when that was.
    requests_since: u64,
    tokens_since: u64,
    last_run: i64,
    started: u64,
    result: ModelResult,
    ttft_ms: Vec<u32>,
    node_ms: i64,
    idle_ms: i64,
}

impl<'a> ModelSim<'a> {
    fn new(facts: &'a ModelFacts, from_ms: i64) -> ModelSim<'a> {
        let mut deployments: Vec<DeploymentSim<'a>> = facts
            .deployments
            .iter()
            .map(|spec| DeploymentSim {
                spec,
                instances: spec
                    .fixed
                    .iter()
                    .map(|id| Instance::new(id.clone(), from_ms, from_ms, None))
                    .collect(),
                pending: Vec::new(),
                compute_ends: BinaryHeap::new(),
                waiting: BinaryHeap::new(),
            })
            .collect();
        let mut sim = ModelSim {
            facts,
            queue_wait_ms: (facts.queue_wait_s * 1000.0) as i64,
            load_ms: (facts.load_time_s * 1000.0) as i64,
            requests_since: 0,
            tokens_since: 0,
            last_run: from_ms,
            started: 0,
            result: ModelResult::new(&facts.model),
            ttft_ms: Vec::new(),
            node_ms: 0,
            idle_ms: 0,
            deployments: Vec::new(),
        };
        if let Some(d) = deployments.iter_mut().find(|d| d.spec.startable) {
            for _ in 0..facts.initial_instances {
                sim.started += 1;
                d.instances.push(Instance::new(
                    instance_id(&d.spec.cluster, sim.started),
                    from_ms,
                    from_ms,
                    Some(from_ms + d.spec.walltime_ms),
                ));
            }
        }
        sim.deployments = deployments;
        sim.result
            .instances
            .push((from_ms, sim.instance_count() as u32));
        sim
    }

    fn instance_count(&self) -> usize {
        self.deployments.iter().map(|d| d.instances.len()).sum()
    }

    /// Brings instances up to `now`: those asked for become ready, those ended go.
    fn advance(&mut self, now: i64) {
        let mut changes: Vec<(i64, i32)> = Vec::new();
        for d in &mut self.deployments {
            let mut k = 0;
            while k < d.pending.len() {
                if d.pending[k].ready <= now {
                    let p = d.pending.swap_remove(k);
                    self.started += 1;
                    let id = instance_id(&d.spec.cluster, self.started);
                    let end = p.node_from + d.spec.walltime_ms;
                    d.instances
                        .push(Instance::new(id, p.node_from, p.ready, Some(end)));
                    changes.push((p.ready, 1));
                } else {
                    k += 1;
                }
            }
            let (node_ms, idle_ms) = (&mut self.node_ms, &mut self.idle_ms);
            d.instances.retain(|i| match i.gone_at() {
                Some(gone) if gone <= now => {
                    let (node, idle) = lifetime(i, gone);
                    *node_ms += node;
                    *idle_ms += idle;
                    changes.push((gone, -1));
                    false
                }
                _ => true,
            });
        }
        if !changes.is_empty() {
            changes.sort_unstable();
            let mut count = *self.result.instances.last().map(|(_, c)| c).unwrap_or(&0) as i64;
            for (at, delta) in changes {
                count += delta as i64;
                self.result.instances.push((at, count.max(0) as u32));
            }
        }
    }

    /// Asks the route policy about `a` and serves it in the simulation; its outcome and the
    /// policy errors met.
    fn route(
        &mut self,
        policies: &Policies,
        a: &Arrival,
        admission_wait_ms: i64,
    ) -> (Outcome, u64) {
        let now = a.at_ms;
        self.requests_since += 1;
        self.tokens_since += a.prompt_tokens;
        let offered: Vec<usize> = (0..self.deployments.len())
            .filter(|&n| self.deployments[n].spec.endpoints.contains(&a.endpoint))
            .collect();
        let candidates: Vec<Arc<Candidate>> = offered
            .iter()
            .enumerate()
            .map(|(index, &n)| Arc::new(self.candidate(n, index, now)))
            .collect();
        let req = Arc::new(RouteRequest {
            model: self.facts.model.clone(),
            endpoint: a.endpoint.path().to_string(),
            user: UserView {
                domain: crate::auth::Identity::domain_of(&a.username),
                username: a.username.clone(),
                ..UserView::default()
            },
            prompt_bytes: (a.prompt_tokens * 4) as i64,
            batch: a.batch,
            ..RouteRequest::default()
        });
        let candidates = Arc::new(candidates);
        let (decision, errors) = match &policies.route {
            Some(script) => match script.route(&req, &candidates) {
                Ok(d) => (d, 0),
                // The gateway answers a failing policy 503.
                Err(_) => (view::direct(&[], &req.model), 1),
            },
            None => (builtin_route(&req, &candidates), 0),
        };
        let outcome = match decision {
            Decision::Direct {
                index, instance, ..
            } => self.serve_hot(offered[index], instance.as_deref(), a, admission_wait_ms),
            Decision::Compute { index, .. } => {
                let took = match a.recorded {
                    Outcome::Compute => a.recorded_duration_ms as i64,
                    _ => self.facts.compute_latency_ms as i64,
                };
                self.deployments[offered[index]]
                    .compute_ends
                    .push(Reverse(now + took));
                self.ttft_ms.push(took as u32);
                Outcome::Compute
            }
            Decision::Reject { .. } => Outcome::Refused,
        };
        match outcome {
            Outcome::Hot => self.result.hot += 1,
            Outcome::Compute => self.result.compute += 1,
            Outcome::Refused => self.result.refused += 1,
        }
        self.result.requests += 1;
        if outcome != a.recorded {
            self.result.differ += 1;
        }
        (outcome, errors)
    }

    /// The candidate the gateway would build for deployment `n` at `now`.
    fn candidate(&self, n: usize, index: usize, now: i64) -> Candidate {
        let d = &self.deployments[n];
        Candidate {
            cluster: d.spec.cluster.clone(),
            framework: d.spec.framework.clone(),
            state: d.state(now),
            instances: d
                .serving(now)
                .map(|(_, i)| InstanceView {
                    id: i.id.clone(),
                    healthy: true,
                    in_flight: i.in_flight.iter().filter(|Reverse(e)| *e > now).count() as i64,
                    latency_ms: 0,
                    ends_in: i.job_end.map(|e| (e - now) / 1000),
                    ..InstanceView::default()
                })
                .collect(),
            compute: d.spec.compute,
            routing: d.spec.routing,
            affinity_slack: d.spec.affinity_slack,
            index,
        }
    }

    fn serve_hot(
        &mut self,
        n: usize,
        instance: Option<&str>,
        a: &Arrival,
        admission_wait_ms: i64,
    ) -> Outcome {
        let now = a.at_ms;
        let d = &mut self.deployments[n];
        let preferred =
            instance.and_then(|id| d.serving(now).find(|(_, i)| i.id == id).map(|(k, _)| k));
        // No healthy instance, or every slot busy for longer than the admission wait: 503.
        let Some((k, start)) = d.slot(preferred, now) else {
            return Outcome::Refused;
        };
        if start - now > admission_wait_ms {
            return Outcome::Refused;
        }
        let (ttft, duration) = match (a.recorded, a.recorded_ttft_ms) {
            (Outcome::Hot, Some(ttft)) => (ttft as i64, a.recorded_duration_ms as i64),
            _ => {
                let ttft = self.facts.hot_ttft_ms as i64;
                let gen = a.completion_tokens as f64 * 1000.0 / self.facts.tokens_per_second;
                (ttft, ttft + gen as i64)
            }
        };
        if start > now {
            // It takes the slot of the request ending then.
            d.instances[k].in_flight.pop();
            d.waiting.push(Reverse(start));
        }
        d.instances[k].serve(start, start + duration.max(ttft));
        self.ttft_ms.push((start - now + ttft).max(0) as u32);
        Outcome::Hot
    }

    /// Runs the scale policy at `now` and carries out its actions; the policy errors met.
    fn scale(&mut self, policies: &Policies, now: i64) -> u64 {
        let Some(script) = &policies.scale else {
            return 0;
        };
        let minutes = (now - self.last_run).max(1000) as f64 / 60_000.0;
        let s = &self.facts.scaling;
        let mut input = ScaleInput {
            model: self.facts.model.clone(),
            requests_per_minute: self.requests_since as f64 / minutes,
            tokens_per_minute: self.tokens_since as f64 / minutes,
            min_instances: i64::from(s.min_instances),
            max_instances: i64::from(s.max_instances),
            keep_hot: s.keep_hot.as_secs() as i64,
            idle_release: s.idle_release.as_secs() as i64,
            ..ScaleInput::default()
        };
        (self.last_run, self.requests_since, self.tokens_since) = (now, 0, 0);
        for d in &mut self.deployments {
            if !input.clusters.contains(&d.spec.cluster) {
                input.clusters.push(d.spec.cluster.clone());
            }
            let live = |h: &mut BinaryHeap<Reverse<i64>>| {
                while h.peek().is_some_and(|Reverse(t)| *t <= now) {
                    h.pop();
                }
                h.len() as i64
            };
            input.waiting += live(&mut d.waiting);
            input.cold_waiting += live(&mut d.compute_ends);
            input.starting += d.pending.len() as i64;
            for i in &mut d.instances {
                i.retire(now);
                input.in_flight += i.in_flight.len() as i64;
            }
            for (_, i) in d.serving(now) {
                let busy = i.busy_until > now;
                input.instances.push(ScaleInstance {
                    id: i.id.clone(),
                    cluster: d.spec.cluster.clone(),
                    age: (now - i.ready) / 1000,
                    idle: if busy { 0 } else { (now - i.busy_until) / 1000 },
                    ends_in: i.job_end.map(|e| (e - now) / 1000),
                    healthy: true,
                });
            }
        }
        let actions = match script.scale(input) {
            Ok(actions) => actions,
            Err(_) => return 1,
        };
        for action in actions {
            match action {
                ScaleAction::Start { cluster, count } => {
                    let (queue, load) = (self.queue_wait_ms, self.load_ms);
                    // Like the live actuator: only a cluster that serves the model and can
                    // start instances.
                    if let Some(d) = self
                        .deployments
                        .iter_mut()
                        .find(|d| d.spec.cluster == cluster && d.spec.startable)
                    {
                        for _ in 0..count {
                            d.pending.push(Pending {
                                node_from: now + queue,
                                ready: now + queue + load,
                            });
                        }
                        self.result.cold_starts += u64::from(count);
                    }
                }
                ScaleAction::Stop { instance } => {
                    if let Some(i) = self
                        .deployments
                        .iter_mut()
                        .flat_map(|d| d.instances.iter_mut())
                        .find(|i| i.id == instance && !i.fixed && i.stopped_at.is_none())
                    {
                        i.stopped_at = Some(now);
                    }
                }
            }
        }
        0
    }

    /// The model's figures at the end of the period (instances still running count until
    /// then).
    fn finish(mut self, to_ms: i64, instances_per_node: u32) -> ModelResult {
        self.advance(to_ms);
        for d in &self.deployments {
            for i in &d.instances {
                let (node, idle) = lifetime(i, to_ms);
                self.node_ms += node;
                self.idle_ms += idle;
            }
        }
        let per_node = f64::from(instances_per_node) * 3_600_000.0;
        self.result.node_hours = self.node_ms as f64 / per_node;
        self.result.idle_node_hours = self.idle_ms as f64 / per_node;
        self.result.set_ttft(&mut self.ttft_ms);
        self.result
            .instances
            .push((to_ms, self.instance_count() as u32));
        self.result
    }
}

/// A started instance's id, shaped like the live ones (`host:port`).
fn instance_id(cluster: &str, n: u64) -> String {
    format!("{cluster}-node{n}:8000")
}

/// Node time of a started instance ending at `end` (from its node's allocation), and the part
/// of it spent ready with nothing to do. Configured backends count nothing.
fn lifetime(i: &Instance, end: i64) -> (i64, i64) {
    if i.fixed {
        return (0, 0);
    }
    let node = (end - i.node_from).max(0);
    let ready = (end - i.ready).max(0);
    (node, ready - i.busy_ms.min(ready))
}
