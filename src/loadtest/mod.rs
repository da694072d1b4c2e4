//! `firstgate loadtest`: load tests a deployment through its OpenAI API, as FIRST's load tests
//! do, against any gateway URL (either layout) with any token. For each model and level it
//! runs closed-loop workers (or, with `--rate`, sends on a fixed schedule and counts latency
//! from when each request was due, so queueing is not hidden) for the duration, after an
//! optional warm-up, and reports requests/s, tokens/s, latency, time to first token, time
//! between tokens and errors by kind. Requests carry `x-firstgate-loadtest`, so the gateway's
//! usage reports can leave them out.

mod prompts;
mod report;
mod request;

pub use report::{Level, LevelResult, Percentiles, Report};
pub use request::Shape;

use anyhow::{bail, Context};
use prompts::Prompt;
use request::Sample;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The OpenAI base URL (`.../v1`), without a trailing slash.
    pub base_url: String,
    pub token: String,
    pub models: Vec<String>,
    pub levels: Vec<Level>,
    pub duration: Duration,
    pub warmup: Duration,
    pub shape: Shape,
    /// Prompts of about this many tokens (else varied lengths).
    pub prompt_tokens: Option<usize>,
    /// Prompts from a JSONL file.
    pub prompts: Option<PathBuf>,
    pub seed: u64,
    /// Longest a request may take.
    pub timeout: Duration,
}

/// A run's shared state: the stop switch (Ctrl-C) and the progress counters.
#[derive(Default)]
pub struct Control {
    stop: AtomicBool,
    woken: tokio::sync::Notify,
    done: AtomicU64,
    failed: AtomicU64,
}

impl Control {
    /// Stops the run: no new requests, those in flight are abandoned, and the report has what
    /// was measured.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.woken.notify_waiters();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Resolves when the run is stopped.
    async fn until_stopped(&self) {
        let woken = self.woken.notified();
        if !self.stopped() {
            woken.await;
        }
    }
}

/// Runs every model at every level, in order.
pub async fn run(settings: Settings, control: Arc<Control>) -> anyhow::Result<Report> {
    let prompts = match &settings.prompts {
        Some(path) => prompts::from_file(path)?,
        None => prompts::generated(settings.seed, settings.prompt_tokens),
    };
    // Every body is built up front: a mistake shows before any load, and none is built under it.
    let mut bodies = Vec::new();
    for model in &settings.models {
        let b: anyhow::Result<Vec<serde_json::Value>> = prompts
            .iter()
            .map(|p: &Prompt| request::body(model, p, &settings.shape))
            .collect();
        bodies.push(Arc::new(b?));
    }
    let most = settings
        .levels
        .iter()
        .map(|l| match l {
            Level::Concurrency(c) => *c as usize,
            Level::Rate(r) => (*r * settings.timeout.as_secs_f64()).min(10_000.0) as usize,
        })
        .max()
        .unwrap_or(1);
    let client = reqwest::Client::builder()
        .timeout(settings.timeout)
        .pool_max_idle_per_host(most.max(1))
        .build()
        .context("the HTTP client")?;
    let url = format!("{}/{}", settings.base_url, settings.shape.endpoint.path());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut report = Report {
        url: settings.base_url.clone(),
        endpoint: settings.shape.endpoint.path().to_string(),
        stream: settings.shape.stream,
        duration_s: settings.duration.as_secs_f64(),
        warmup_s: settings.warmup.as_secs_f64(),
        max_tokens: settings.shape.max_tokens,
        seed: settings.seed,
        generator_cores: cores,
        levels: Vec::new(),
    };
    for (model, bodies) in settings.models.iter().zip(bodies) {
        for level in &settings.levels {
            if control.stopped() {
                return Ok(report);
            }
            let run = LevelRun {
                client: client.clone(),
                url: url.clone(),
                token: settings.token.clone(),
                bodies: bodies.clone(),
                next: Arc::new(AtomicUsize::new(0)),
                control: control.clone(),
            };
            let cpu_before = own_cpu_seconds();
            let label = format!("{model} {}", level_label(*level));
            let progress = tokio::spawn(progress(
                control.clone(),
                label,
                settings.warmup + settings.duration,
            ));
            let started = Instant::now();
            let (samples, measured_from) =
                run.level(*level, settings.warmup, settings.duration).await;
            progress.abort();
            let cpu = (own_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64() * 100.0;
            if cpu > 80.0 * cores as f64 {
                eprintln!(
                    "\nwarning: the load generator used {cpu:.0}% CPU ({cores} cores): the numbers \
                     at {} may measure it rather than the gateway; run it on another machine",
                    level_label(*level)
                );
            }
            let interrupted = control.stopped();
            report.levels.push(LevelResult::new(
                model,
                *level,
                &samples,
                measured_from,
                cpu,
                interrupted,
            ));
        }
    }
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    Ok(report)
}

fn level_label(level: Level) -> String {
    match level {
        Level::Concurrency(c) => format!("concurrency {c}"),
        Level::Rate(r) => format!("rate {r}/s"),
    }
}

/// One model at one level.
struct LevelRun {
    client: reqwest::Client,
    url: String,
    token: String,
    bodies: Arc<Vec<serde_json::Value>>,
    /// The next prompt (workers take them in turn).
    next: Arc<AtomicUsize>,
    control: Arc<Control>,
}

impl LevelRun {
    /// The samples measured after the warm-up, and when the measurement began.
    async fn level(
        &self,
        level: Level,
        warmup: Duration,
        duration: Duration,
    ) -> (Vec<Sample>, Instant) {
        let measured_from = Instant::now() + warmup;
        let end = measured_from + duration;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        match level {
            Level::Concurrency(workers) => {
                for _ in 0..workers {
                    let worker = self.clone_parts();
                    let samples = samples.clone();
                    tasks.spawn(async move {
                        while Instant::now() < end {
                            let started = Instant::now();
                            let Some(s) = worker.one(started).await else {
                                return;
                            };
                            if started >= measured_from {
                                samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                            }
                        }
                    });
                }
            }
            Level::Rate(rate) => {
                let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
                let start = Instant::now();
                for i in 0u32.. {
                    let due = start + every * i;
                    if due >= end || self.control.stopped() {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = self.control.until_stopped() => break,
                    }
                    let worker = self.clone_parts();
                    let samples = samples.clone();
                    tasks.spawn(async move {
                        if let Some(s) = worker.one(due).await {
                            if due >= measured_from {
                                samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                            }
                        }
                    });
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
        (samples, measured_from)
    }

    fn clone_parts(&self) -> LevelRun {
        LevelRun {
            client: self.client.clone(),
            url: self.url.clone(),
            token: self.token.clone(),
            bodies: self.bodies.clone(),
            next: self.next.clone(),
            control: self.control.clone(),
        }
    }

    /// One request, or `None` when the run was stopped meanwhile.
    async fn one(&self, started: Instant) -> Option<Sample> {
        if self.control.stopped() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.bodies.len();
        let sent = request::send(
            &self.client,
            &self.url,
            &self.token,
            &self.bodies[i],
            started,
        );
        let sample = tokio::select! {
            s = sent => s,
            _ = self.control.until_stopped() => return None,
        };
        let counter = match sample.error {
            None => &self.control.done,
            Some(_) => &self.control.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Some(sample)
    }
}

/// A progress line on standard error: updated in place on a terminal, every 10 s otherwise.
async fn progress(control: Arc<Control>, label: String, total: Duration) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let started = Instant::now();
    let (done0, failed0) = (
        control.done.load(Ordering::Relaxed),
        control.failed.load(Ordering::Relaxed),
    );
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        let done = control.done.load(Ordering::Relaxed) - done0;
        let failed = control.failed.load(Ordering::Relaxed) - failed0;
        let line = format!(
            "{label}: {:>3}/{}s  {done} ok  {failed} failed  {:.1} req/s",
            elapsed.as_secs(),
            total.as_secs(),
            done as f64 / elapsed.as_secs_f64()
        );
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// CPU seconds (user and system) this process has used, from /proc (0 elsewhere).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// CPU seconds (user and system) of process `pid` (`"self"` for this one), from /proc.
pub fn cpu_seconds_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// Checks the settings a user gave.
pub fn validate(s: &Settings) -> anyhow::Result<()> {
    if s.models.is_empty() {
        bail!("--model: give at least one model");
    }
    if s.levels.is_empty() {
        bail!("--concurrency or --rate: give at least one level");
    }
    for l in &s.levels {
        match l {
            Level::Concurrency(0) => bail!("--concurrency: each level is at least 1"),
            Level::Rate(r) if !(*r > 0.0 && r.is_finite()) => {
                bail!("--rate: each level is a positive number of requests per second")
            }
            _ => {}
        }
    }
    if s.duration.is_zero() {
        bail!("--duration: give a length such as 60s");
    }
    if s.shape.stream && s.shape.endpoint.framing() == crate::openai::Framing::None {
        bail!("--stream: {} is not streamed", s.shape.endpoint.path());
    }
    if !(s.base_url.starts_with("http://") || s.base_url.starts_with("https://")) {
        bail!(
            "--url {}: give an http:// or https:// base URL such as http://127.0.0.1:8080/v1",
            s.base_url
        );
    }
    Ok(())
}
