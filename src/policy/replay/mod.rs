//! `firstgate policy replay`: the recorded requests of a period run again, in simulated time,
//! through the policies in force and candidate ones, against a model of the cluster (batch
//! queue, model loading, walltime, slots per instance, generation speed, Compute's latency),
//! so an operator sees what a policy change does to a week of real traffic before it goes live.
//!
//! The simulation is discrete-event: arrivals, scale runs every `scale_interval` (and right
//! after a request finds no hot instance, as the live runner is woken), instances becoming
//! ready and ending. Nothing sleeps and nothing touches the network.

mod report;
mod simulation;

pub use report::{ModelResult, PolicyResult, Report};

use super::dry_run;
use super::script::{Script, ROUTE, SCALE};
use crate::config::{BackendAddr, Config, Routing};
use crate::model_name::normalize;
use crate::openai::Endpoint;
use crate::usage::history::RecordedRequest;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What to replay and against what.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// The period, Unix milliseconds, `[from, to)`.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Candidate policies; each defaults to the one in force.
    pub route: Option<PathBuf>,
    pub scale: Option<PathBuf>,
    /// Arrivals this many times as dense (demand this many times higher); 1 replays as recorded.
    pub speed: f64,
    pub cluster: ClusterOverrides,
}

/// Facts of the cluster model given on the command line instead of fitted or configured.
#[derive(Debug, Clone, Default)]
pub struct ClusterOverrides {
    pub queue_wait: Option<Duration>,
    pub load_time: Option<Duration>,
    pub instances_per_node: Option<u32>,
    pub tokens_per_second: Option<f64>,
    pub compute_latency: Option<Duration>,
}

/// How a request was (or would be) answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Hot,
    Compute,
    Refused,
}

/// A recorded request, ready for the simulation.
struct Arrival {
    at_ms: i64,
    /// Index into `Facility::models`.
    model: usize,
    endpoint: Endpoint,
    username: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    batch: bool,
    recorded: Outcome,
    /// The recorded time to first token and duration, used when the replay answers it the
    /// same way.
    recorded_ttft_ms: Option<u64>,
    recorded_duration_ms: u64,
}

/// A deployment of the configuration, as the simulation needs it.
#[derive(Debug, Clone)]
struct DeploymentSpec {
    cluster: String,
    framework: String,
    endpoints: Vec<Endpoint>,
    /// Instances always there (the configuration's `backends`), by id.
    fixed: Vec<String>,
    compute: bool,
    /// The cluster can start instances (a lifecycle with a start function).
    startable: bool,
    slots: usize,
    routing: Routing,
    affinity_slack: f64,
    walltime_ms: i64,
    drain_before_ms: i64,
}

/// One model: its deployments in configuration order and the facts of its cluster model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFacts {
    pub model: String,
    #[serde(skip)]
    aliases: Vec<String>,
    #[serde(skip)]
    deployments: Vec<DeploymentSpec>,
    #[serde(skip)]
    scaling: crate::config::Scaling,
    /// Batch-queue wait before a node starts, and the model's load time, in seconds.
    pub queue_wait_s: f64,
    pub load_time_s: f64,
    /// Where the start delay comes from: `fitted from N cold starts`, `--queue-wait`, ...
    pub start_delay_source: String,
    pub tokens_per_second: f64,
    pub hot_ttft_ms: f64,
    /// Time until an answer through Compute (which comes whole, FIRST's way).
    pub compute_latency_ms: f64,
    pub slots_per_instance: usize,
    pub walltime_s: f64,
    pub drain_before_s: f64,
    /// Instances running when the period starts (inferred from the records).
    pub initial_instances: usize,
}

/// The configuration's models with the facts the simulation uses.
struct Facility {
    models: Vec<ModelFacts>,
    scale_interval_ms: i64,
    admission_wait_ms: i64,
    instances_per_node: u32,
}

/// Replays the recorded period through the policies in force and, when given, candidates.
pub fn replay(config: &Config, opts: &ReplayOptions) -> anyhow::Result<Report> {
    // The policy files first: a typo in one is reported before a week of records is read.
    let (live, candidate) = Policies::of(config, opts)?;
    let (rows, raw_since) = crate::usage::read_requests(&config.usage, opts.from_ms, opts.to_ms)?;
    simulate(config, opts, &live, candidate.as_ref(), &rows, raw_since)
}

/// [`replay`] of records already read (`rows` in arrival order, raw records complete from
/// `raw_since`).
fn simulate(
    config: &Config,
    opts: &ReplayOptions,
    live: &Policies,
    candidate: Option<&Policies>,
    rows: &[RecordedRequest],
    raw_since: i64,
) -> anyhow::Result<Report> {
    let from_ms = opts.from_ms.max(raw_since);
    if from_ms >= opts.to_ms {
        anyhow::bail!(
            "no raw records in the period: usage.retention removed them up to {} and only \
             hourly rollups remain, which have no arrivals to replay",
            report::rfc3339(raw_since)
        );
    }
    let speed = if opts.speed > 0.0 { opts.speed } else { 1.0 };
    let to_ms = from_ms + ((opts.to_ms - from_ms) as f64 / speed).ceil() as i64;
    let period = &rows[rows.partition_point(|r| r.time_ms < from_ms)
        ..rows.partition_point(|r| r.time_ms < opts.to_ms)];
    let mut facility = facility(config, &opts.cluster);
    let (arrivals, leading, skipped) = arrivals(&facility, period, from_ms, speed);
    fit(&mut facility, &arrivals, &leading, &opts.cluster);

    // The two simulations are independent: one thread each.
    let results = std::thread::scope(|s| {
        let run = |p: &Policies| simulation::run(&facility, p, &arrivals, from_ms, to_ms);
        let other = candidate.map(|c| s.spawn(move || run(c).named("candidate", c)));
        let mut results = vec![run(live).named("live", live)];
        if let Some(other) = other {
            results.push(other.join().expect("the candidate's replay panicked"));
        }
        results
    });
    let bucket_ms = bucket(to_ms - from_ms);
    let mut demand =
        vec![vec![0u32; ((to_ms - from_ms) / bucket_ms + 1) as usize]; facility.models.len()];
    for a in &arrivals {
        demand[a.model][((a.at_ms - from_ms) / bucket_ms) as usize] += 1;
    }
    Ok(Report {
        from_ms,
        to_ms,
        bucket_ms,
        demand,
        raw_since_ms: (raw_since > opts.from_ms).then_some(raw_since),
        speed,
        requests: arrivals.len(),
        skipped,
        scale_interval_s: facility.scale_interval_ms as f64 / 1000.0,
        instances_per_node: facility.instances_per_node,
        models: facility.models,
        policies: results,
    })
}

/// A pair of compiled policies (`None`: the built-in route rule, or no scaling).
pub(crate) struct Policies {
    route_path: Option<PathBuf>,
    scale_path: Option<PathBuf>,
    route: Option<Arc<Script>>,
    scale: Option<Arc<Script>>,
}

impl Policies {
    /// The policies in force, and the candidate pair when a candidate file is given (the
    /// other of the pair is the one in force).
    fn of(config: &Config, opts: &ReplayOptions) -> anyhow::Result<(Policies, Option<Policies>)> {
        let (route, scale) = (&config.policies.route, &config.policies.scale);
        let live = Policies::load(route.clone(), scale.clone())?;
        let candidate = if opts.route.is_some() || opts.scale.is_some() {
            Some(Policies::load(
                opts.route.clone().or(route.clone()),
                opts.scale.clone().or(scale.clone()),
            )?)
        } else {
            None
        };
        Ok((live, candidate))
    }

    fn load(route: Option<PathBuf>, scale: Option<PathBuf>) -> anyhow::Result<Policies> {
        let compile = |p: &Option<PathBuf>, hook| -> anyhow::Result<Option<Arc<Script>>> {
            Ok(match p {
                Some(p) => Some(Arc::new(dry_run::load(p, hook)?)),
                None => None,
            })
        };
        Ok(Policies {
            route: compile(&route, ROUTE)?,
            scale: compile(&scale, SCALE)?,
            route_path: route,
            scale_path: scale,
        })
    }
}

fn facility(config: &Config, o: &ClusterOverrides) -> Facility {
    let mut models: Vec<ModelFacts> = Vec::new();
    for (cluster_name, cluster) in &config.clusters {
        let lifecycle = cluster.compute.as_ref();
        for (fw_name, fw) in &cluster.frameworks {
            for m in &fw.models {
                let spec = DeploymentSpec {
                    cluster: cluster_name.clone(),
                    framework: fw_name.clone(),
                    endpoints: fw.endpoints.clone(),
                    fixed: m
                        .backends
                        .iter()
                        .map(|b| {
                            BackendAddr::parse(b, m.tls)
                                .map_or_else(|_| b.clone(), |a| a.authority())
                        })
                        .collect(),
                    compute: m.compute.is_some(),
                    startable: lifecycle.is_some_and(|l| l.start_function.is_some()),
                    slots: m
                        .max_concurrent_per_backend
                        .unwrap_or(config.upstream.max_concurrent_per_backend)
                        .max(1),
                    routing: m.routing.unwrap_or(config.upstream.routing),
                    affinity_slack: config.upstream.affinity_slack,
                    walltime_ms: lifecycle
                        .and_then(|l| l.job_walltime)
                        .unwrap_or(m.scaling.keep_hot)
                        .as_millis() as i64,
                    drain_before_ms: lifecycle.map_or(0, |l| l.drain_before.as_millis() as i64),
                };
                let key = normalize(&m.name);
                match models.iter_mut().find(|f| normalize(&f.model) == key) {
                    Some(f) => f.deployments.push(spec),
                    None => models.push(ModelFacts {
                        model: m.name.clone(),
                        aliases: m.aliases.iter().map(|a| normalize(a)).collect(),
                        slots_per_instance: spec.slots,
                        walltime_s: spec.walltime_ms as f64 / 1000.0,
                        drain_before_s: spec.drain_before_ms as f64 / 1000.0,
                        deployments: vec![spec],
                        scaling: m.scaling.clone(),
                        queue_wait_s: 0.0,
                        load_time_s: 0.0,
                        start_delay_source: String::new(),
                        tokens_per_second: 0.0,
                        hot_ttft_ms: 0.0,
                        compute_latency_ms: 0.0,
                        initial_instances: 0,
                    }),
                }
            }
        }
    }
    Facility {
        models,
        scale_interval_ms: config.policies.scale_interval.as_millis().max(1) as i64,
        admission_wait_ms: config.upstream.admission_wait.as_millis() as i64,
        instances_per_node: o.instances_per_node.unwrap_or(1).max(1),
    }
}

/// The recorded requests the simulation can replay (a configured model and endpoint, an
/// outcome a policy decides), with arrival times compressed by `speed`; per model, how many
/// instances served its requests before the first that was not served hot (the instances
/// running when the period starts); and how many records were left out.
fn arrivals(
    facility: &Facility,
    rows: &[RecordedRequest],
    from_ms: i64,
    speed: f64,
) -> (Vec<Arrival>, Vec<usize>, usize) {
    let mut out = Vec::with_capacity(rows.len());
    // Per model: the instances of its leading run of requests served hot, until it ends.
    let mut leading: Vec<(Vec<&str>, bool)> = vec![(Vec::new(), false); facility.models.len()];
    let mut last: Option<(&str, usize)> = None;
    for r in rows {
        // Records of one model come in runs: look it up once per run.
        let model = match last {
            Some((name, i)) if name == r.model => Some(i),
            _ => {
                let key = normalize(&r.model);
                facility
                    .models
                    .iter()
                    .position(|m| normalize(&m.model) == key || m.aliases.contains(&key))
            }
        };
        let Some(model) = model else { continue };
        last = Some((&r.model, model));
        // An endpoint no deployment offers now was refused before any policy ran.
        let Some(endpoint) = Endpoint::from_path(&r.endpoint).filter(|e| {
            facility.models[model]
                .deployments
                .iter()
                .any(|d| d.endpoints.contains(e))
        }) else {
            continue;
        };
        let recorded = match (r.route.as_str(), r.status) {
            ("compute", _) => Outcome::Compute,
            ("direct", _) if !r.instance.is_empty() => Outcome::Hot,
            (_, 503) => Outcome::Refused,
            // Client errors, limits and the like: no policy decided them.
            _ => continue,
        };
        let (seen, ended) = &mut leading[model];
        if recorded != Outcome::Hot {
            *ended = true;
        } else if !*ended && !seen.contains(&r.instance.as_str()) {
            seen.push(&r.instance);
        }
        out.push(Arrival {
            at_ms: from_ms + ((r.time_ms - from_ms) as f64 / speed) as i64,
            model,
            endpoint,
            username: r.username.clone(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            batch: r.batch,
            recorded,
            recorded_ttft_ms: r.ttft_ms,
            recorded_duration_ms: r.duration_ms,
        });
    }
    let skipped = rows.len() - out.len();
    let leading = leading.into_iter().map(|(seen, _)| seen.len()).collect();
    (out, leading, skipped)
}

/// Fits the cluster model to the records: time to first token and generation speed from the
/// requests served hot, Compute's latency from those through Compute, and the start delay from
/// the recorded cold starts (the first request that found a model cold to the first served
/// hot after it); command-line values win, then defaults.
fn fit(facility: &mut Facility, arrivals: &[Arrival], leading: &[usize], o: &ClusterOverrides) {
    for (i, m) in facility.models.iter_mut().enumerate() {
        let of_model = || arrivals.iter().filter(move |a| a.model == i);
        let mut hot_ttft: Vec<u64> = of_model()
            .filter(|a| a.recorded == Outcome::Hot)
            .filter_map(|a| a.recorded_ttft_ms)
            .collect();
        m.hot_ttft_ms = median(&mut hot_ttft).unwrap_or(200.0);

        let (tokens, gen_ms) = of_model()
            .filter(|a| a.recorded == Outcome::Hot && a.completion_tokens > 0)
            .filter_map(|a| {
                let gen = a.recorded_duration_ms.saturating_sub(a.recorded_ttft_ms?);
                (gen > 0).then_some((a.completion_tokens, gen))
            })
            .fold((0u64, 0u64), |(t, g), (at, ag)| (t + at, g + ag));
        m.tokens_per_second = o.tokens_per_second.unwrap_or(if gen_ms > 0 {
            tokens as f64 * 1000.0 / gen_ms as f64
        } else {
            50.0
        });

        let mut compute: Vec<u64> = of_model()
            .filter(|a| a.recorded == Outcome::Compute)
            .map(|a| a.recorded_duration_ms)
            .collect();
        m.compute_latency_ms = match o.compute_latency {
            Some(d) => d.as_millis() as f64,
            None => median(&mut compute).unwrap_or(30_000.0),
        };

        let fitted = start_delay(of_model());
        (m.queue_wait_s, m.load_time_s, m.start_delay_source) =
            match (o.queue_wait, o.load_time, fitted) {
                (None, None, Some((ms, spells))) => (
                    ms as f64 / 1000.0,
                    0.0,
                    format!(
                        "fitted to {spells} recorded cold start{}",
                        if spells == 1 { "" } else { "s" }
                    ),
                ),
                (q, l, _) => (
                    q.map_or(60.0, |d| d.as_secs_f64()),
                    l.map_or(120.0, |d| d.as_secs_f64()),
                    match (q, l) {
                        (None, None) => "default (no cold start recorded)".to_string(),
                        _ => "given".to_string(),
                    },
                ),
            };

        // Instances already running when the period starts: those that served the model's
        // first requests, when it has no fixed backends and they were served hot.
        let started = m.deployments.iter().any(|d| d.startable);
        let fixed = m.deployments.iter().any(|d| !d.fixed.is_empty());
        m.initial_instances = if started && !fixed {
            leading[i].min(m.scaling.max_instances as usize)
        } else {
            0
        };
    }
}

/// The start delay (batch queue and model load together, in ms) that best reproduces the
/// recorded cold starts, and how many there were. A cold start is a request through Compute
/// after none was served hot (the live scale runner is woken then); its instance was ready at
/// the earliest after the last request through Compute and at the latest at the first served
/// hot. The delay chosen answers the fewest recorded requests otherwise (through Compute on or
/// after it, hot before it, counted from each cold start).
fn start_delay<'a>(arrivals: impl Iterator<Item = &'a Arrival>) -> Option<(i64, usize)> {
    let (mut cold, mut hot, mut candidates) = (Vec::new(), Vec::new(), Vec::new());
    let mut spells = 0;
    let mut spell: Option<(i64, bool)> = None; // its start, and whether one was served hot
    for a in arrivals {
        match (a.recorded, spell) {
            (Outcome::Compute, None | Some((_, true))) => spell = Some((a.at_ms, false)),
            (Outcome::Compute, Some((t0, false))) => {
                cold.push(a.at_ms - t0);
                candidates.push(a.at_ms - t0 + 1);
            }
            (Outcome::Hot, Some((t0, served))) => {
                if !served {
                    candidates.push(a.at_ms - t0);
                    spell = Some((t0, true));
                    spells += 1;
                }
                hot.push(a.at_ms - t0);
            }
            _ => {}
        }
    }
    if spells == 0 {
        return None;
    }
    cold.sort_unstable();
    hot.sort_unstable();
    let misses =
        |d: i64| (cold.len() - cold.partition_point(|&c| c < d)) + hot.partition_point(|&h| h < d);
    let least = candidates.iter().map(|&d| misses(d)).min()?;
    // Of the delays that do equally well, the middle one.
    let mut best: Vec<i64> = candidates
        .into_iter()
        .filter(|&d| misses(d) == least)
        .collect();
    best.sort_unstable();
    Some((best[best.len() / 2], spells))
}

/// The width of the chart's demand bars for a period: about 120 of them, in whole seconds,
/// minutes or hours.
fn bucket(span_ms: i64) -> i64 {
    let raw = (span_ms / 120).max(1000);
    [1_000, 5_000, 10_000, 60_000, 300_000, 600_000, 3_600_000]
        .into_iter()
        .find(|b| *b >= raw)
        .unwrap_or(3_600_000)
}

/// The median of `v` (reordered), if any.
fn median(v: &mut [u64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable(mid);
    Some(*m as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    /// The demo's cold model (Compute, a cluster that starts instances), `extra` added to its
    /// model entry, with the demo's scale policy.
    fn config(extra: &str) -> Config {
        let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/policies");
        let yaml = format!(
            "auth: {{mode: none}}
policies: {{scale: {policies}/scale-on-demand.rhai, scale_interval: 10s}}
compute: {{url: 'http://127.0.0.1:1', auth_url: 'http://127.0.0.1:1', client_id: c, client_secret_env: S}}
clusters:
  sophia:
    compute: {{endpoint: e, status_function: s, start_function: b, stop_function: x}}
    frameworks:
      vllm:
        models:
          - name: m
            backends: []
            compute: {{endpoint: e, function: f}}
            scaling: {{max_instances: 1, keep_hot: 24h, idle_release: 60s}}
{extra}"
        );
        crate::config::parse(std::path::Path::new("t.yaml"), &yaml).unwrap()
    }

    fn row(time_ms: i64, route: &str, status: u16) -> RecordedRequest {
        RecordedRequest {
            time_ms,
            username: "ada@anl.gov".into(),
            cluster: "sophia".into(),
            framework: "vllm".into(),
            model: "m".into(),
            endpoint: "chat/completions".into(),
            route: route.into(),
            status,
            prompt_tokens: 100,
            completion_tokens: 100,
            ttft_ms: Some(50),
            duration_ms: if route == "compute" { 20_000 } else { 2_050 },
            instance: if route == "direct" {
                "sophia-node1:8000".into()
            } else {
                String::new()
            },
            batch: false,
        }
    }

    /// Three bursts five minutes apart, each finding the model cold: through Compute at 0 s
    /// and 30 s, then hot at 2 and 3 minutes.
    fn bursts() -> Vec<RecordedRequest> {
        (0..3)
            .flat_map(|b| {
                let t = b * 5 * MIN;
                [
                    row(t, "compute", 200),
                    row(t + 30_000, "compute", 200),
                    row(t + 2 * MIN, "direct", 200),
                    row(t + 3 * MIN, "direct", 200),
                ]
            })
            .collect()
    }

    fn opts(scale: Option<&str>) -> ReplayOptions {
        ReplayOptions {
            from_ms: 0,
            to_ms: 20 * MIN,
            scale: scale.map(|s| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(s)),
            speed: 1.0,
            cluster: ClusterOverrides {
                queue_wait: Some(Duration::from_secs(60)),
                load_time: Some(Duration::from_secs(30)),
                ..ClusterOverrides::default()
            },
            ..ReplayOptions::default()
        }
    }

    fn run(config: &Config, opts: &ReplayOptions, rows: &[RecordedRequest]) -> Report {
        let (live, candidate) = Policies::of(config, opts).unwrap();
        simulate(config, opts, &live, candidate.as_ref(), rows, 0).unwrap()
    }

    #[test]
    fn the_live_policy_reproduces_the_recorded_routes_and_a_longer_keep_alive_trades_node_hours_for_cold_starts(
    ) {
        let config = config("");
        let report = run(
            &config,
            &opts(Some("conf/policies/scale-keep-warm.rhai")),
            &bursts(),
        );
        let (live, candidate) = (&report.policies[0], &report.policies[1]);
        let (l, c) = (&live.models[0], &candidate.models[0]);
        assert_eq!(live.agreement(), 1.0, "{l:?}");
        assert_eq!((l.hot, l.compute, l.cold_starts), (6, 6, 3));
        // Released after a minute idle: each instance lives about 90 s + 2 min of requests
        // + a minute idle, from its node's allocation.
        assert!(l.node_hours > 0.15 && l.node_hours < 0.25, "{l:?}");
        // Kept six minutes idle: started once, the later bursts served hot.
        assert_eq!((c.hot, c.compute, c.cold_starts), (10, 2, 1), "{c:?}");
        assert!(c.node_hours > l.node_hours && c.idle_node_hours > l.idle_node_hours);
        assert!(c.ttft_p50_ms < l.ttft_p50_ms, "{c:?} {l:?}");
        // Instances over time: three ups and downs, against one up.
        let ups = |m: &ModelResult| m.instances.windows(2).filter(|w| w[1].1 > w[0].1).count();
        assert_eq!((ups(l), ups(c)), (3, 1));
        let svg = report.svg();
        assert_eq!(svg.matches("<polyline").count(), 2);
    }

    #[test]
    fn without_a_scale_policy_the_model_stays_cold() {
        let mut config = config("");
        config.policies.scale = None;
        let report = run(&config, &opts(None), &bursts());
        let l = &report.policies[0].models[0];
        assert_eq!(
            (l.hot, l.compute, l.cold_starts, l.node_hours),
            (0, 12, 0, 0.0)
        );
        // The recorded hot requests differ.
        assert_eq!(l.differ, 6);
    }

    #[test]
    fn what_no_policy_decided_is_left_out_and_the_rest_kept() {
        let mut rows = bursts();
        let mut other = row(10, "direct", 200);
        other.model = "not-configured".into();
        // Not offered by this framework (only when listed).
        let mut messages = row(20, "direct", 200);
        messages.endpoint = "messages".into();
        // Refused by a limit before any policy ran.
        let limited = row(30, "", 429);
        rows.splice(1..1, [other, messages, limited]);
        let report = run(&config(""), &opts(None), &rows);
        assert_eq!((report.requests, report.skipped), (12, 3));
        assert!(report
            .table()
            .contains("12 requests replayed (3 records left out"));
    }

    #[test]
    fn a_faster_replay_compresses_the_period_and_the_arrivals() {
        let mut o = opts(None);
        o.speed = 2.0;
        let report = run(&config(""), &o, &bursts());
        assert_eq!((report.from_ms, report.to_ms), (0, 10 * MIN));
        assert_eq!(report.requests, 12);
        assert_eq!(report.demand[0].iter().sum::<u32>(), 12);
    }

    #[test]
    fn a_full_instance_holds_requests_up_to_the_admission_wait_then_refuses() {
        // One slot, one fixed backend, a 10 s admission wait; requests of 2 s each.
        let config = crate::config::parse(
            std::path::Path::new("t.yaml"),
            "auth: {mode: none}
upstream: {max_concurrent_per_backend: 1, admission_wait: 10s}
clusters:
  sophia:
    frameworks:
      vllm:
        models:
          - name: m
            backends: [127.0.0.1:9000]
",
        )
        .unwrap();
        // Ten at once, each taking 2.05 s: five start within the wait (at 0, 2.05, 4.1, 6.15
        // and 8.2 s), the others would start after it.
        let rows: Vec<_> = (0..10).map(|_| row(0, "direct", 200)).collect();
        let report = run(&config, &opts(None), &rows);
        let m = &report.policies[0].models[0];
        assert_eq!((m.hot, m.refused), (5, 5), "{m:?}");
        assert_eq!(m.ttft_p95_ms, Some(8_250));
        // A configured backend costs no node-hours.
        assert_eq!(m.node_hours, 0.0);
    }

    #[test]
    fn retention_cuts_the_period_to_where_raw_records_are_complete() {
        let config = config("");
        let o = opts(None);
        let (live, _) = Policies::of(&config, &o).unwrap();
        let report = simulate(&config, &o, &live, None, &bursts(), 5 * MIN).unwrap();
        assert_eq!(
            (report.from_ms, report.raw_since_ms),
            (5 * MIN, Some(5 * MIN))
        );
        assert!(report.table().contains("removed by usage.retention"));
        let err = simulate(&config, &o, &live, None, &[], 30 * MIN).unwrap_err();
        assert!(
            err.to_string().contains("only hourly rollups remain"),
            "{err}"
        );
    }

    #[test]
    fn the_instances_running_at_the_start_are_inferred_from_the_first_requests() {
        // Served hot from the start by two instances: they were running before the period.
        let mut rows = vec![row(0, "direct", 200), row(1000, "direct", 200)];
        rows[1].instance = "sophia-node2:8000".into();
        let config = config("");
        let report = run(&config, &opts(None), &rows);
        // max_instances 1 bounds the inference.
        assert_eq!(report.models[0].initial_instances, 1);
        assert_eq!(report.policies[0].models[0].hot, 2);
    }

    #[test]
    fn the_start_delay_is_fitted_to_reproduce_the_recorded_cold_starts() {
        // Two cold starts: through Compute at 0 and 0.7 s, hot from 0.95 s; through Compute at
        // 5 minutes, hot from 0.735 s after.
        let t = 5 * MIN;
        let rows = [
            row(0, "compute", 200),
            row(700, "compute", 200),
            row(950, "direct", 200),
            row(1000, "direct", 200),
            row(t, "compute", 200),
            row(t + 735, "direct", 200),
            row(t + 800, "direct", 200),
        ];
        let mut o = opts(None);
        o.cluster = ClusterOverrides::default();
        let report = run(&config(""), &o, &rows);
        // Ready between 0.7 and 0.95 s, and by 0.735 s: any delay in 0.701..=0.735 s answers
        // every request as recorded.
        let facts = &report.models[0];
        assert_eq!((facts.queue_wait_s, facts.load_time_s), (0.735, 0.0));
        assert_eq!(facts.start_delay_source, "fitted to 2 recorded cold starts");
        assert_eq!(report.policies[0].agreement(), 1.0);
        // The generation speed and Compute's latency come from the records too.
        assert_eq!(facts.hot_ttft_ms, 50.0);
        assert_eq!(facts.tokens_per_second, 50.0);
        assert_eq!(facts.compute_latency_ms, 20_000.0);
    }
}
