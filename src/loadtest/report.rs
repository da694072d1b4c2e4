//! What a load test found, per model and level: as a table in FIRST's shape (model,
//! concurrency, tokens/s, requests/s) with more columns, as JSON, and as an SVG chart.

use super::request::Sample;
use crate::svg::{escape, nice_max, short};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; `None` for no values.
    fn of(mut ms: Vec<f64>) -> Option<Percentiles> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Some(Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        })
    }
}

/// One model at one level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub model: String,
    /// Workers (closed loop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Requests sent per second (open loop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// From the end of the warm-up to the last answer.
    pub duration_s: f64,
    /// Requests answered successfully.
    pub requests: u64,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of successful requests, from (due) send to the last byte.
    pub latency_ms: Option<Percentiles>,
    /// Streams only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itl_ms: Option<Percentiles>,
    /// The generator's own CPU over the level, in percent of one core.
    pub generator_cpu_percent: f64,
    /// Stopped early (Ctrl-C).
    pub interrupted: bool,
}

impl LevelResult {
    pub fn new(
        model: &str,
        level: Level,
        samples: &[Sample],
        measured_from: Instant,
        generator_cpu_percent: f64,
        interrupted: bool,
    ) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let last = samples.iter().map(|s| s.finished).max();
        let window = last
            .map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(measured_from)
            })
            .max(Duration::from_millis(1));
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
        let mut errors = BTreeMap::new();
        for e in samples.iter().filter_map(|s| s.error.as_ref()) {
            *errors.entry(e.clone()).or_insert(0) += 1;
        }
        let sum = |f: fn(&Sample) -> u64| ok.iter().map(|s| f(s)).sum::<u64>();
        let (prompt, completion, total) = (
            sum(|s| s.prompt_tokens),
            sum(|s| s.completion_tokens),
            sum(|s| s.total_tokens),
        );
        let secs = window.as_secs_f64();
        let (concurrency, rate) = match level {
            Level::Concurrency(c) => (Some(c), None),
            Level::Rate(r) => (None, Some(r)),
        };
        LevelResult {
            model: model.to_string(),
            concurrency,
            rate,
            duration_s: secs,
            requests: ok.len() as u64,
            errors,
            requests_per_s: ok.len() as f64 / secs,
            output_tokens_per_s: completion as f64 / secs,
            total_tokens_per_s: total as f64 / secs,
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            latency_ms: Percentiles::of(ok.iter().map(|s| ms(s.finished - s.started)).collect()),
            ttft_ms: Percentiles::of(ok.iter().filter_map(|s| s.ttft).map(ms).collect())
                .filter(|_| ok.iter().any(|s| !s.gaps.is_empty())),
            itl_ms: Percentiles::of(
                ok.iter()
                    .flat_map(|s| s.gaps.iter().copied().map(ms))
                    .collect(),
            ),
            generator_cpu_percent,
            interrupted,
        }
    }

    /// The level, as a number for tables and charts.
    pub fn x(&self) -> f64 {
        self.concurrency.map(f64::from).or(self.rate).unwrap_or(0.0)
    }
}

/// A level of load: closed-loop workers, or an open-loop send rate.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    Concurrency(u32),
    Rate(f64),
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub endpoint: String,
    pub stream: bool,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub max_tokens: u32,
    pub seed: u64,
    /// CPU cores the generator could use.
    pub generator_cores: usize,
    pub levels: Vec<LevelResult>,
}

impl Report {
    /// The table, in Markdown: FIRST's columns first (tokens/s is output tokens), then ours.
    pub fn table(&self) -> String {
        let level = if self.levels.iter().any(|l| l.rate.is_some()) {
            "rate"
        } else {
            "concurrency"
        };
        let mut out = format!(
            "| model | {level} | tokens/s | requests/s | total tokens/s | p50 ms | p90 ms | p99 ms \
             | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ok | errors |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        );
        let p = |p: Option<Percentiles>, f: fn(&Percentiles) -> f64| {
            p.as_ref()
                .map_or("-".to_string(), |p| format!("{:.0}", f(p)))
        };
        for l in &self.levels {
            let errors = if l.errors.is_empty() {
                "0".to_string()
            } else {
                l.errors
                    .iter()
                    .map(|(k, n)| format!("{n} × {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                out,
                "| {} | {}{} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                l.model,
                l.x(),
                if l.interrupted { " (stopped)" } else { "" },
                l.output_tokens_per_s,
                l.requests_per_s,
                l.total_tokens_per_s,
                p(l.latency_ms, |p| p.p50),
                p(l.latency_ms, |p| p.p90),
                p(l.latency_ms, |p| p.p99),
                p(l.ttft_ms, |p| p.p50),
                p(l.ttft_ms, |p| p.p99),
                p(l.itl_ms, |p| p.p50),
                p(l.itl_ms, |p| p.p99),
                l.requests,
                errors
            );
        }
        out
    }

    /// Two charts side by side: output tokens/s and p99 latency against the level, one line
    /// per model.
    pub fn svg(&self) -> String {
        const COLOURS: [&str; 6] = [
            "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
        ];
        let mut models: Vec<&str> = Vec::new();
        for l in &self.levels {
            if !models.contains(&l.model.as_str()) {
                models.push(&l.model);
            }
        }
        let x_label = if self.levels.iter().any(|l| l.rate.is_some()) {
            "requests sent per second"
        } else {
            "concurrency"
        };
        let (w, h) = (980.0, 420.0 + 18.0 * models.len() as f64);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        let charts: [(&str, Metric); 2] = [
            ("output tokens/s", |l| l.output_tokens_per_s),
            ("p99 latency (ms)", |l| l.latency_ms.map_or(0.0, |p| p.p99)),
        ];
        let x_max = nice_max(self.levels.iter().map(LevelResult::x).fold(0.0, f64::max));
        for (i, (title, value)) in charts.iter().enumerate() {
            let (left, top, pw, ph) = (70.0 + 490.0 * i as f64, 40.0, 390.0, 300.0);
            let y_max = nice_max(self.levels.iter().map(value).fold(0.0, f64::max));
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n\
                 <rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>",
                left + pw / 2.0,
                left + pw / 2.0,
                top + ph + 36.0
            );
            for t in 0..=4 {
                let f = t as f64 / 4.0;
                let (gx, gy) = (left + f * pw, top + ph - f * ph);
                let _ = writeln!(
                    svg,
                    "<line x1=\"{left}\" y1=\"{gy}\" x2=\"{}\" y2=\"{gy}\" stroke=\"#eee\"/>\
                     <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
                     <text x=\"{gx}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    left + pw,
                    left - 6.0,
                    gy + 4.0,
                    short(f * y_max),
                    top + ph + 16.0,
                    short(f * x_max)
                );
            }
            for (m, model) in models.iter().enumerate() {
                let colour = COLOURS[m % COLOURS.len()];
                let points: Vec<(f64, f64)> = self
                    .levels
                    .iter()
                    .filter(|l| l.model == *model)
                    .map(|l| (left + l.x() / x_max * pw, top + ph - value(l) / y_max * ph))
                    .collect();
                let path: Vec<String> = points
                    .iter()
                    .map(|(x, y)| format!("{x:.1},{y:.1}"))
                    .collect();
                let _ = writeln!(
                    svg,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
                    path.join(" ")
                );
                for (x, y) in points {
                    let _ = writeln!(
                        svg,
                        "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{colour}\"/>"
                    );
                }
            }
        }
        for (m, model) in models.iter().enumerate() {
            let y = 400.0 + 18.0 * m as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"70\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"88\" y=\"{}\">{}</text>",
                y - 10.0,
                COLOURS[m % COLOURS.len()],
                y,
                escape(model)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// A figure of a level that a chart draws.
type Metric = fn(&LevelResult) -> f64;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, ms: u64, error: Option<&str>, tokens: u64) -> Sample {
        Sample {
            started: at,
            finished: at + Duration::from_millis(ms),
            error: error.map(str::to_owned),
            ttft: Some(Duration::from_millis(ms / 4)),
            gaps: vec![Duration::from_millis(10); 3],
            prompt_tokens: 5,
            completion_tokens: tokens,
            total_tokens: 5 + tokens,
        }
    }

    #[test]
    fn rates_percentiles_and_errors_of_a_level() {
        let t0 = Instant::now();
        let mut samples: Vec<Sample> = (1..=100).map(|i| sample(t0, i * 10, None, 10)).collect();
        samples.push(sample(t0, 50, Some("429 requests_per_second"), 0));
        let l = LevelResult::new("m", Level::Concurrency(8), &samples, t0, 3.0, false);
        assert_eq!(l.requests, 100);
        assert_eq!(l.errors.get("429 requests_per_second"), Some(&1));
        assert!((l.duration_s - 1.0).abs() < 1e-9);
        assert!((l.requests_per_s - 100.0).abs() < 1e-6);
        assert!((l.output_tokens_per_s - 1000.0).abs() < 1e-6);
        let p = l.latency_ms.unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (500.0, 900.0, 990.0));
        assert_eq!(l.itl_ms.unwrap().p99, 10.0);
    }

    #[test]
    fn the_table_and_chart_name_every_level() {
        let t0 = Instant::now();
        let samples = [sample(t0, 100, None, 8)];
        let report = Report {
            url: "u".into(),
            endpoint: "chat/completions".into(),
            stream: true,
            duration_s: 1.0,
            warmup_s: 0.0,
            max_tokens: 8,
            seed: 1,
            generator_cores: 2,
            levels: vec![
                LevelResult::new("a<b", Level::Concurrency(1), &samples, t0, 1.0, false),
                LevelResult::new("a<b", Level::Concurrency(4), &samples, t0, 1.0, true),
            ],
        };
        let table = report.table();
        assert!(table.starts_with("| model | concurrency | tokens/s | requests/s |"));
        assert!(
            table.contains("| a<b | 4 (stopped) | 80.00 | 10.00 |"),
            "{table}"
        );
        let svg = report.svg();
        assert!(svg.starts_with("<svg") && svg.contains("a&lt;b") && svg.contains("<polyline"));
    }
}
