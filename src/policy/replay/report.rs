//! What a replay found, per policy and model: as a Markdown table, JSON, and an SVG of
//! instances over time against demand.

use super::ModelFacts;
use crate::svg::{escape, nice_max, short};
use serde::Serialize;
use std::fmt::Write as _;

/// A replay's outcome.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The period replayed (Unix milliseconds; `to_ms` after `speed` compressed it).
    pub from_ms: i64,
    pub to_ms: i64,
    /// Set when usage.retention had removed raw records from the start of the period asked
    /// for: the replay starts here.
    pub raw_since_ms: Option<i64>,
    pub speed: f64,
    /// Requests replayed, and records left out (load tests are never read; client errors,
    /// limits and models or endpoints no longer configured are left out).
    pub requests: usize,
    pub skipped: usize,
    pub scale_interval_s: f64,
    pub instances_per_node: u32,
    /// The cluster model, per model.
    pub models: Vec<ModelFacts>,
    /// The policies in force (`live`) first, then the candidate.
    pub policies: Vec<PolicyResult>,
    /// Requests arriving per bucket of `bucket_ms`, per model (as in `models`).
    pub bucket_ms: i64,
    pub demand: Vec<Vec<u32>>,
}

/// One pair of policies' outcome.
#[derive(Debug, Serialize)]
pub struct PolicyResult {
    /// `live` or `candidate`.
    pub name: String,
    /// The route and scale policy files (or the built-in rule, or none).
    pub route: String,
    pub scale: String,
    /// Policy calls that failed (a failing route policy is answered 503, as live).
    pub policy_errors: u64,
    pub models: Vec<ModelResult>,
}

impl PolicyResult {
    pub(super) fn named(mut self, name: &str, p: &super::Policies) -> PolicyResult {
        let file = |p: &Option<std::path::PathBuf>, none: &str| {
            p.as_ref()
                .map_or_else(|| none.to_string(), |p| p.display().to_string())
        };
        self.name = name.to_string();
        self.route = file(&p.route_path, "built-in rule");
        self.scale = file(&p.scale_path, "none");
        self
    }

    /// The share of requests answered the way they were recorded (hot, through Compute or
    /// refused).
    pub fn agreement(&self) -> f64 {
        let (n, differ) = self
            .models
            .iter()
            .fold((0, 0), |(n, d), m| (n + m.requests, d + m.differ));
        if n == 0 {
            1.0
        } else {
            1.0 - differ as f64 / n as f64
        }
    }
}

/// One model under one pair of policies.
#[derive(Debug, Serialize)]
pub struct ModelResult {
    pub model: String,
    pub requests: u64,
    pub hot: u64,
    pub compute: u64,
    pub refused: u64,
    /// Instances the scale policy started.
    pub cold_starts: u64,
    /// Estimated time to first token of the requests answered (not refused).
    pub ttft_p50_ms: Option<u32>,
    pub ttft_p95_ms: Option<u32>,
    /// Node-hours of started instances (from their node's start), and the part of them spent
    /// ready with no request.
    pub node_hours: f64,
    pub idle_node_hours: f64,
    /// Requests answered otherwise than recorded.
    pub differ: u64,
    /// Instances (started ones and configured backends) over time: `[unix ms, count]` at each
    /// change.
    pub instances: Vec<(i64, u32)>,
}

impl ModelResult {
    pub(super) fn new(model: &str) -> ModelResult {
        ModelResult {
            model: model.to_string(),
            requests: 0,
            hot: 0,
            compute: 0,
            refused: 0,
            cold_starts: 0,
            ttft_p50_ms: None,
            ttft_p95_ms: None,
            node_hours: 0.0,
            idle_node_hours: 0.0,
            differ: 0,
            instances: Vec::new(),
        }
    }

    pub(super) fn set_ttft(&mut self, ms: &mut [u32]) {
        let mut at = |q: f64| {
            if ms.is_empty() {
                return None;
            }
            let k = ((ms.len() - 1) as f64 * q).round() as usize;
            Some(*ms.select_nth_unstable(k).1)
        };
        self.ttft_p50_ms = at(0.5);
        self.ttft_p95_ms = at(0.95);
    }
}

/// Unix milliseconds as RFC 3339 (seconds).
pub(super) fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

impl Report {
    /// The report as Markdown: the period, the cluster model, one row per model and policy,
    /// and the live policies' agreement with the recorded routes.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Policy replay: {} to {}\n",
            rfc3339(self.from_ms),
            rfc3339(self.to_ms)
        );
        let _ = writeln!(
            out,
            "{} requests replayed ({} records left out: client errors, limits, models or \
             endpoints not configured; load tests are never read){}.",
            self.requests,
            self.skipped,
            if self.speed != 1.0 {
                format!(", arrivals {}x as dense as recorded", self.speed)
            } else {
                String::new()
            }
        );
        if let Some(raw) = self.raw_since_ms {
            let _ = writeln!(
                out,
                "\nRaw records before {} were removed by usage.retention; only hourly rollups \
                 remain there, which have no arrivals: the replay starts at {}.",
                rfc3339(raw),
                rfc3339(raw)
            );
        }
        let _ = writeln!(
            out,
            "\n## Cluster model (scale policy every {} s; {} instance(s) per node)\n\n\
             | model | queue wait s | load s | start delay from | tokens/s | hot TTFT ms | \
             Compute ms | slots | walltime h | drain before s | running at start |\n\
             |---|---|---|---|---|---|---|---|---|---|---|",
            self.scale_interval_s, self.instances_per_node
        );
        for m in &self.models {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} | {} | {:.1} | {:.0} | {:.0} | {} | {:.1} | {:.0} | {} |",
                m.model,
                m.queue_wait_s,
                m.load_time_s,
                m.start_delay_source,
                m.tokens_per_second,
                m.hot_ttft_ms,
                m.compute_latency_ms,
                m.slots_per_instance,
                m.walltime_s / 3600.0,
                m.drain_before_s,
                m.initial_instances
            );
        }
        let _ = writeln!(out, "\n## Policies\n");
        for p in &self.policies {
            let _ = writeln!(
                out,
                "- **{}**: route {}, scale {}{}",
                p.name,
                p.route,
                p.scale,
                if p.policy_errors > 0 {
                    format!(" ({} policy calls failed)", p.policy_errors)
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            out,
            "\n## Outcome\n\n\
             | model | policy | requests | hot | via Compute | refused | cold starts | \
             TTFT p50 ms | TTFT p95 ms | node-hours | idle node-hours | differ from recorded |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let ms = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
        for (i, m) in self.models.iter().enumerate() {
            for p in &self.policies {
                let r = &p.models[i];
                if r.requests == 0 && r.cold_starts == 0 {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} |",
                    m.model,
                    p.name,
                    r.requests,
                    r.hot,
                    r.compute,
                    r.refused,
                    r.cold_starts,
                    ms(r.ttft_p50_ms),
                    ms(r.ttft_p95_ms),
                    r.node_hours,
                    r.idle_node_hours,
                    r.differ
                );
            }
        }
        if let Some(live) = self.policies.first() {
            let _ = writeln!(
                out,
                "\nAgreement of the live policies with the recorded routes: {:.1} % of requests \
                 answered as recorded (hot, through Compute or refused).",
                live.agreement() * 100.0
            );
        }
        out
    }

    /// One chart per model: instances over time under each policy (lines) against requests
    /// per minute (grey bars).
    pub fn svg(&self) -> String {
        const COLOURS: [&str; 2] = ["#1f77b4", "#d62728"];
        let shown: Vec<usize> = (0..self.models.len())
            .filter(|&i| self.policies.iter().any(|p| p.models[i].requests > 0))
            .collect();
        let (left, pw, ph, gap) = (70.0, 820.0, 220.0, 90.0);
        let h = 60.0 + gap * 0.5 + shown.len() as f64 * (ph + gap);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"980\" height=\"{h}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        for (p, policy) in self.policies.iter().enumerate() {
            let _ = writeln!(
                svg,
                "<rect x=\"{}\" y=\"14\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"24\">instances, {}</text>",
                left + 220.0 * p as f64,
                COLOURS[p % 2],
                left + 18.0 + 220.0 * p as f64,
                escape(&policy.name)
            );
        }
        let _ = writeln!(
            svg,
            "<rect x=\"{}\" y=\"14\" width=\"12\" height=\"12\" fill=\"#ccc\"/><text x=\"{}\" y=\"24\">requests per minute (right axis)</text>",
            left + 440.0,
            left + 458.0
        );
        let span = (self.to_ms - self.from_ms).max(1) as f64;
        let x = |t: i64| left + (t - self.from_ms) as f64 / span * pw;
        for (row, &i) in shown.iter().enumerate() {
            let top = 60.0 + row as f64 * (ph + gap);
            let per_minute = 60_000.0 / self.bucket_ms as f64;
            let demand_max =
                nice_max(self.demand[i].iter().copied().max().unwrap_or(0) as f64 * per_minute);
            let count_max = self
                .policies
                .iter()
                .flat_map(|p| p.models[i].instances.iter().map(|(_, c)| *c))
                .max()
                .unwrap_or(0)
                .max(1) as f64;
            let _ = writeln!(
                svg,
                "<text x=\"{left}\" y=\"{}\" font-size=\"14\">{}</text>\n\
                 <rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since {} (h)</text>",
                top - 8.0,
                escape(&self.models[i].model),
                left + pw / 2.0,
                top + ph + 36.0,
                rfc3339(self.from_ms)
            );
            for t in 0..=4 {
                let f = t as f64 / 4.0;
                let gy = top + ph - f * ph;
                let _ = writeln!(
                    svg,
                    "<line x1=\"{left}\" y1=\"{gy}\" x2=\"{}\" y2=\"{gy}\" stroke=\"#eee\"/>\
                     <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
                     <text x=\"{}\" y=\"{}\">{}</text>\
                     <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    left + pw,
                    left - 6.0,
                    gy + 4.0,
                    short(f * count_max),
                    left + pw + 6.0,
                    gy + 4.0,
                    short(f * demand_max),
                    left + f * pw,
                    top + ph + 16.0,
                    short(f * span / 3_600_000.0)
                );
            }
            let bar = self.bucket_ms as f64 / span * pw;
            for (b, n) in self.demand[i].iter().enumerate() {
                if *n == 0 {
                    continue;
                }
                let bh = *n as f64 * per_minute / demand_max * ph;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.2}\" height=\"{bh:.1}\" fill=\"#ccc\"/>",
                    x(self.from_ms + b as i64 * self.bucket_ms),
                    top + ph - bh,
                    bar.max(0.5)
                );
            }
            for (p, policy) in self.policies.iter().enumerate() {
                let y = |c: u32| top + ph - f64::from(c) / count_max * ph;
                let mut points = Vec::new();
                let mut previous: Option<u32> = None;
                for &(t, c) in &policy.models[i].instances {
                    if let Some(prev) = previous {
                        points.push(format!("{:.1},{:.1}", x(t), y(prev)));
                    }
                    points.push(format!("{:.1},{:.1}", x(t), y(c)));
                    previous = Some(c);
                }
                let _ = writeln!(
                    svg,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-dasharray=\"{}\"/>",
                    points.join(" "),
                    COLOURS[p % 2],
                    if p == 0 { "none" } else { "6,3" }
                );
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}
