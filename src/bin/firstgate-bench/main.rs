//! `firstgate-bench`: the side-by-side load harness behind `scripts/bench.sh`.
//!
//! Starts two simulated vLLM servers as processes (a zero-latency profile and a realistic one),
//! the Globus stand-in in-process, and four targets: the simulator directly, firstgate with
//! everything on (Globus auth with a warm cache, the example route policy, metrics, usage
//! store, access log), firstgate with auth and usage off, and nginx as a plain reverse proxy.
//! Then it measures, on loopback only and bounded in time: small non-streamed chats at fixed
//! offered rates and at saturation, and concurrent streams (time to first token, gaps between
//! chunks, memory per stream), and as many streams as the descriptor limit allows nginx
//! (10,000 where it can), to count what each target fails when descriptors run short. Prints a
//! table and writes JSON under `target/bench/`.

mod light;

use clap::Parser;
use firstgate::sim::globus::{FakeClient, FakeUser, GlobusSim, Seed};
use futures_util::StreamExt;
use serde::Serialize;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "firstgate-bench",
    about = "Side-by-side load harness (loopback only)"
)]
struct Cli {
    /// Directory of the release binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// nginx executable.
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// The light generator instead (wrk and h2load, one thread; every proxy on one thread):
    /// CPU per request where the generator costs little. See `light.rs`.
    #[arg(long)]
    light: bool,
    /// Length of each fixed-rate and saturation run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Offered rates (requests per second) of the fixed-rate runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000")]
    rates: Vec<u64>,
    /// Light generator: run firstgate and the bare Pingora proxy under valgrind's callgrind
    /// and report the instructions each spends per request, and per stream (user space only;
    /// as steady as CPU time on a shared machine is not, for comparing two builds). Each runs
    /// some 50 times slower there: the CPU, rate and time columns are then not costs.
    /// `VALGRIND_OPTS=--cache-sim=yes` adds simulated cache misses to the dumps kept with
    /// `--keep` (`callgrind_annotate` reads them).
    #[arg(long)]
    callgrind: bool,
    /// Light generator: also offer these rates (requests per second, paced by wrk's
    /// `delay()`), where every proxy has time to spare.
    #[arg(long, value_delimiter = ',')]
    light_rates: Vec<u64>,
    /// Light generator: also run the closed loop with a new connection for every request (wrk
    /// sends `Connection: close`): what taking a client connection costs each proxy.
    #[arg(long)]
    light_new_connections: bool,
    /// Concurrent streams (realistic profile).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    streams: Vec<usize>,
    /// Concurrent streams of the descriptor-limit run, which shows what each target does with
    /// more streams than one process has descriptors for (0 skips it). Default: 10,000, or
    /// half the open-file limit where that is lower.
    #[arg(long)]
    edge_streams: Option<usize>,
    /// Workers of the saturation run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Rounds of every scenario, the targets taking turns within each (so that a slower
    /// moment of the shared machine does not fall on one target); each row reports the round
    /// with the median CPU per request (with `--light`, the streams' rounds follow the wrk
    /// rounds and report the median time to first byte).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Redis for the firstgate-redis target: firstgate-full with per-user limits counted in
    /// Redis (`state.redis`); `scripts/bench.sh` starts one. Without it that target is left out.
    #[arg(long)]
    redis: Option<String>,
    /// Only these targets (direct, nginx, pingora-bare, pingora-tuned, firstgate-lite,
    /// firstgate-full, firstgate-redis); default all.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Keep the working directory (configurations and the gateways' logs) and print it.
    #[arg(long)]
    keep: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process killed when dropped.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    /// SIGINT first: every target stops at once and exits normally (nginx's master takes its
    /// workers down with it, where killed outright it leaves them running, holding whatever
    /// descriptors they inherited; Pingora's SIGTERM would wait out its 300 s grace period),
    /// so a profiling build writes its profile. Then SIGKILL.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// CPU seconds (user + system) of a process, its threads and its child processes (nginx's
/// workers), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    std::iter::once(pid)
        .chain(children(pid))
        .map(own_cpu_seconds)
        .sum()
}

fn own_cpu_seconds(pid: u32) -> f64 {
    firstgate::loadtest::cpu_seconds_of(&pid.to_string())
}

/// Resident memory now and at peak, in KiB, with child processes.
fn rss_kib(pid: u32) -> (u64, u64) {
    std::iter::once(pid)
        .chain(children(pid))
        .map(own_rss_kib)
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn own_rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not start listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One target: how to reach each profile, and the process to account CPU and memory to.
struct Target {
    name: &'static str,
    base: String,
    /// `model` per profile (firstgate routes by model) and the path prefix (nginx by path).
    fast: (&'static str, &'static str),
    real: (&'static str, &'static str),
    pid: Option<u32>,
    token: Option<&'static str>,
    /// A gateway's admin listener, for its connection metrics.
    admin: Option<SocketAddr>,
}

impl Target {
    fn url(&self, realistic: bool) -> String {
        let (_, prefix) = if realistic { self.real } else { self.fast };
        format!("{}{prefix}/v1/chat/completions", self.base)
    }

    fn model(&self, realistic: bool) -> &'static str {
        if realistic {
            self.real.0
        } else {
            self.fast.0
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct RunResult {
    target: String,
    scenario: String,
    completed: u64,
    errors: u64,
    achieved_rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Streams only: time to first token and gaps between chunks.
    ttft_mean_ms: Option<f64>,
    ttft_p50_ms: Option<f64>,
    ttft_p99_ms: Option<f64>,
    gap_p99_ms: Option<f64>,
    cpu_s_per_1k: Option<f64>,
    peak_rss_mib: Option<f64>,
    /// Streams only: resident memory added per open stream.
    kib_per_stream: Option<f64>,
    /// The descriptor-limit run on a gateway: its connection metrics afterwards.
    connections: Vec<String>,
    /// Streams only: failed streams by what went wrong.
    errors_by_kind: std::collections::BTreeMap<String, u64>,
    /// CPU seconds per 1,000 requests of every round (the row is the median round's).
    cpu_s_per_1k_rounds: Vec<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn body(model: &str, stream: bool, max_tokens: u32) -> String {
    serde_json::json!({"model": model, "stream": stream, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}]})
    .to_string()
}

fn request(
    client: &reqwest::Client,
    t: &Target,
    realistic: bool,
    stream: bool,
    max_tokens: u32,
) -> reqwest::RequestBuilder {
    let mut r = client
        .post(t.url(realistic))
        .header("content-type", "application/json")
        .body(body(t.model(realistic), stream, max_tokens));
    if let Some(tok) = t.token {
        r = r.bearer_auth(tok);
    }
    r
}

/// Open-loop: requests sent on schedule whatever the answers do; latency counts from the
/// intended send time (no coordinated omission).
async fn fixed_rate(
    client: &reqwest::Client,
    t: &Target,
    rate: u64,
    duration: Duration,
) -> RunResult {
    let started = Instant::now();
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut handles = Vec::with_capacity(total as usize);
    let cpu0 = t.pid.map(cpu_seconds);
    for i in 0..total {
        let due = started + interval * i as u32;
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let req = request(client, t, false, false, 8);
        handles.push(tokio::spawn(async move {
            let ok = match req.send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (ok, due.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    summarize(t, format!("fixed {rate}/s"), handles, started, cpu0).await
}

/// Closed-loop: `concurrency` workers send as fast as answers come.
async fn saturation(
    client: &reqwest::Client,
    t: &Target,
    concurrency: usize,
    duration: Duration,
) -> RunResult {
    let started = Instant::now();
    let cpu0 = t.pid.map(cpu_seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = t.url(false);
        let model = t.model(false);
        let token = t.token;
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while started.elapsed() < duration {
                let t0 = Instant::now();
                let mut r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body(model, false, 8));
                if let Some(tok) = token {
                    r = r.bearer_auth(tok);
                }
                let ok = match r.send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                out.push((ok, t0.elapsed().as_secs_f64() * 1000.0));
            }
            out
        }));
    }
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.unwrap_or_default());
    }
    let handles = samples
        .into_iter()
        .map(|s| tokio::spawn(async move { s }))
        .collect();
    summarize(
        t,
        format!("saturation x{concurrency}"),
        handles,
        started,
        cpu0,
    )
    .await
}

async fn summarize(
    t: &Target,
    scenario: String,
    handles: Vec<tokio::task::JoinHandle<(bool, f64)>>,
    started: Instant,
    cpu0: Option<f64>,
) -> RunResult {
    let mut lat = Vec::new();
    let mut errors = 0;
    for h in handles {
        match h.await {
            Ok((true, ms)) => lat.push(ms),
            _ => errors += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let completed = lat.len() as u64;
    RunResult {
        target: t.name.into(),
        scenario,
        completed,
        errors,
        achieved_rps: completed as f64 / elapsed,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        cpu_s_per_1k: t
            .pid
            .zip(cpu0)
            .map(|(p, c0)| (cpu_seconds(p) - c0) / completed.max(1) as f64 * 1000.0),
        peak_rss_mib: t.pid.map(|p| rss_kib(p).1 as f64 / 1024.0),
        ..RunResult::default()
    }
}

/// `n` streams at once on the realistic profile.
async fn streams(client: &reqwest::Client, t: &Target, n: usize) -> RunResult {
    let cpu0 = t.pid.map(cpu_seconds);
    let rss0 = t.pid.map(|p| rss_kib(p).0);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..n {
        let req = request(client, t, true, true, 20);
        handles.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let resp = match req.send().await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => return Err(format!("status {}", r.status().as_u16())),
                Err(e) if e.is_connect() => return Err("connect".to_string()),
                Err(e) => return Err(format!("send: {}", error_kind(&e))),
            };
            let mut body = resp.bytes_stream();
            let mut ttft = None;
            let mut last = Instant::now();
            let mut gaps = Vec::new();
            let mut done = false;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| format!("body: {}", error_kind(&e)))?;
                let now = Instant::now();
                if ttft.is_none() && chunk.windows(6).any(|w| w == b"\"tok0 ") {
                    ttft = Some(t0.elapsed().as_secs_f64() * 1000.0);
                } else if ttft.is_some() {
                    gaps.push(now.duration_since(last).as_secs_f64() * 1000.0);
                }
                last = now;
                done |= chunk.windows(6).any(|w| w == b"[DONE]");
            }
            if !done {
                return Err("ended without [DONE]".to_string());
            }
            Ok((
                t0.elapsed().as_secs_f64() * 1000.0,
                ttft.unwrap_or(0.0),
                gaps,
            ))
        }));
    }
    // Memory while the streams are in flight: the largest resident size seen.
    if let Some(pid) = t.pid {
        let peak = peak.clone();
        let sampler = tokio::spawn(async move {
            let mut best = 0;
            // Long enough for the largest run (5,000 streams take about 3 s here).
            for _ in 0..500 {
                best = best.max(rss_kib(pid).0);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak.store(best, std::sync::atomic::Ordering::Relaxed);
        });
        let _ = sampler.await;
    }
    let mut lat = Vec::new();
    let mut ttfts = Vec::new();
    let mut gaps = Vec::new();
    let mut errors = 0;
    let mut why = std::collections::BTreeMap::new();
    for h in handles {
        match h.await {
            Ok(Ok((total, ttft, g))) => {
                lat.push(total);
                ttfts.push(ttft);
                gaps.extend(g);
            }
            Ok(Err(kind)) => {
                errors += 1;
                *why.entry(kind).or_insert(0) += 1;
            }
            Err(_) => errors += 1,
        }
    }
    // Streams start together: their rate is over the time until the last one ended.
    let elapsed = lat.iter().copied().fold(0.0, f64::max).max(1.0) / 1000.0;
    for v in [&mut lat, &mut ttfts, &mut gaps] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    let rss_peak = peak.load(std::sync::atomic::Ordering::Relaxed) as f64;
    RunResult {
        target: t.name.into(),
        scenario: format!("{n} streams"),
        completed: lat.len() as u64,
        errors,
        achieved_rps: lat.len() as f64 / elapsed,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        ttft_mean_ms: Some(ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64),
        ttft_p50_ms: Some(pct(&ttfts, 0.5)),
        ttft_p99_ms: Some(pct(&ttfts, 0.99)),
        gap_p99_ms: Some(pct(&gaps, 0.99)),
        cpu_s_per_1k: t
            .pid
            .zip(cpu0)
            .map(|(p, c0)| (cpu_seconds(p) - c0) / lat.len().max(1) as f64 * 1000.0),
        peak_rss_mib: t.pid.map(|p| rss_kib(p).1 as f64 / 1024.0),
        kib_per_stream: rss0
            .filter(|_| rss_peak > 0.0)
            .map(|r0| (rss_peak - r0 as f64).max(0.0) / n as f64),
        errors_by_kind: why,
        ..RunResult::default()
    }
}

/// A gateway's connection-admission metrics (accept waits, connections closed by reason).
async fn connection_metrics(admin: SocketAddr) -> Vec<String> {
    let Ok(resp) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return Vec::new();
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("firstgate_accept_waits_total")
                || l.starts_with("firstgate_client_connections_closed_total")
        })
        .map(str::to_owned)
        .collect()
}

/// The firstgate-redis gateway's histogram of its Redis calls (`firstgate_redis_seconds`):
/// per operation, (upper bound, cumulative count) per bucket, in order.
type RedisBuckets = std::collections::BTreeMap<String, Vec<(f64, f64)>>;

async fn redis_buckets(admin: SocketAddr) -> RedisBuckets {
    let mut ops = RedisBuckets::new();
    let Ok(resp) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return ops;
    };
    let text = resp.text().await.unwrap_or_default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("firstgate_redis_seconds_bucket{") else {
            continue;
        };
        let label = |name: &str| rest.split(&format!("{name}=\"")).nth(1)?.split('"').next();
        let (Some(le), Some(op)) = (label("le"), label("op")) else {
            continue;
        };
        let count = line
            .rsplit(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0);
        let le = le.parse().unwrap_or(f64::INFINITY);
        ops.entry(op.to_string()).or_default().push((le, count));
    }
    ops
}

/// Per operation, the calls between two snapshots and the bucket their 99th percentile falls
/// in.
fn redis_report(what: &str, before: &RedisBuckets, after: &RedisBuckets) {
    println!("\nfirstgate-redis: Redis calls of the {what}, as the gateway timed them");
    for (op, buckets) in after {
        let old = |i: usize| before.get(op).and_then(|b| b.get(i)).map_or(0.0, |b| b.1);
        let delta: Vec<(f64, f64)> = buckets
            .iter()
            .enumerate()
            .map(|(i, (le, c))| (*le, c - old(i)))
            .collect();
        let total = delta.last().map_or(0.0, |b| b.1);
        if total < 1.0 {
            continue;
        }
        let p99 = delta
            .iter()
            .find(|(_, c)| *c >= total * 0.99)
            .map_or(f64::INFINITY, |b| b.0);
        println!(
            "  {op:<16} {total:>10} calls, p99 <= {:.3} ms",
            p99 * 1000.0
        );
    }
}

/// A transport error's kind, without addresses.
fn error_kind(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut last = String::new();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last.chars().take(60).collect()
}

/// The Globus stand-in the "full" gateways introspect the bench token against.
async fn bench_globus() -> anyhow::Result<GlobusSim> {
    Ok(GlobusSim::start(
        "127.0.0.1:0".parse()?,
        Seed {
            clients: vec![FakeClient {
                id: "bench".into(),
                secret: "bench-secret".into(),
            }],
            users: vec![FakeUser::new("bench-token", "bench@anl.gov")],
            ..Seed::default()
        },
    )
    .await?)
}

/// The configurations (without listeners) of firstgate with everything on ("full": Globus,
/// the example route policy, the usage store at `store`, the access log; limits off) and with
/// auth, usage, access log and limits off ("lite"), models `fast` and `real` on those backends.
fn gateway_configs(
    globus: &GlobusSim,
    store: &Path,
    fast: SocketAddr,
    real: SocketAddr,
) -> anyhow::Result<(String, String)> {
    // The per-instance cap defaults to vLLM's own (256 sequences); the simulator takes any
    // number, and nginx has no cap, so it is lifted here to compare the proxying itself. The
    // connect timeout is nginx's default (`proxy_connect_timeout 60s`; the bare proxy has
    // none): thousands of connects at once overflow the simulator's SYN queue
    // (`tcp_max_syn_backlog`), and a connect whose SYN is retried after 1 s and 3 s would miss
    // the gateway's 2 s default, a difference of settings rather than of proxying.
    let models = format!(
        "upstream:\n  max_concurrent_per_backend: 1000000\n  connect_timeout: 60s\n\
         clusters:\n  local:\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: fast\n            backends: [{fast}]\n\
         \x20         - name: real\n            backends: [{real}]\n"
    );
    let policy = std::fs::canonicalize("conf/policies/prefer-hot.rhai")?;
    let full = format!(
        "auth:\n  mode: globus\n  globus:\n    client_id: bench\n    client_secret_env: FG_BENCH_SECRET\n\
         \x20   auth_url: {u}\n    groups_url: {u}\n  rules:\n    allowed_domains: [anl.gov]\n\
         {LIMITS_OFF}policies:\n  route: {policy}\nusage:\n  store: {store}\n{models}",
        u = globus.url(),
        policy = policy.display(),
        store = store.display()
    );
    let lite = format!(
        "auth:\n  mode: none\n{LIMITS_OFF}usage:\n  store: null\naccess_log:\n  enabled: false\n{models}"
    );
    Ok((full, lite))
}

/// Per-user and per-address limits off.
const LIMITS_OFF: &str =
    "limits:\n  requests_per_second: 0\n  ip_requests_per_second: 0\n  max_concurrent_per_user: 0\n";

fn start_sim(
    bin: &Path,
    addr: SocketAddr,
    model: &str,
    ttft: u64,
    itl: u64,
) -> anyhow::Result<Proc> {
    let child = Command::new(bin.join("firstgate-sim"))
        .args(["vllm", "--listen", &addr.to_string(), "--model", model])
        .args(["--ttft-ms", &ttft.to_string(), "--itl-ms", &itl.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc { child })
}

fn start_gateway(
    bin: &Path,
    dir: &Path,
    name: &str,
    body: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    start_gateway_on(bin, dir, name, body, env, 2, None)
}

fn start_gateway_on(
    bin: &Path,
    dir: &Path,
    name: &str,
    body: &str,
    env: &[(&str, &str)],
    threads: usize,
    callgrind: Option<&Path>,
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let addr = free_addr();
    let admin = free_addr();
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!("listen: {addr}\nadmin_listen: {admin}\nthreads: {threads}\n{body}"),
    )?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = program(bin.join("firstgate"), callgrind)
        .args(["serve", "--config"])
        .arg(&config)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok((Proc { child }, addr, admin))
}

/// The floor: a Pingora proxy that only picks the peer (`examples/bare-proxy.rs`), as Pingora
/// sets it up by default, or (`tuned`) with the settings and the allocator firstgate uses.
fn start_bare(
    bin: &Path,
    fast: SocketAddr,
    real: SocketAddr,
    tuned: bool,
    threads: usize,
    callgrind: Option<&Path>,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_addr();
    let (example, flag) = match tuned {
        true => ("examples/bare-proxy-tuned", Some("--tuned")),
        false => ("examples/bare-proxy", None),
    };
    let child = program(bin.join(example), callgrind)
        .args([
            addr.to_string(),
            fast.to_string(),
            real.to_string(),
            threads.to_string(),
        ])
        .args(flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((Proc { child }, addr))
}

/// `path`, or with `callgrind` (its output file) `path` under valgrind's callgrind.
fn program(path: PathBuf, callgrind: Option<&Path>) -> Command {
    match callgrind {
        Some(out) => {
            let mut cmd = Command::new("valgrind");
            cmd.arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(path);
            cmd
        }
        None => Command::new(path),
    }
}

fn start_nginx(
    nginx: &str,
    dir: &Path,
    fast: SocketAddr,
    real: SocketAddr,
    workers: usize,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_addr();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes {workers};\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
             events {{ worker_connections 20000; }}\nworker_rlimit_nofile 40000;\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
             \x20 upstream fast {{ server {fast}; keepalive 256; }}\n  upstream real {{ server {real}; keepalive 256; }}\n\
             \x20 server {{\n    listen {addr};\n    client_max_body_size 20m;\n\
             \x20   location /fast/ {{ proxy_pass http://fast/; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n\
             \x20   location /real/ {{ proxy_pass http://real/; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n\
             \x20 }}\n}}\n",
            dir = dir.display()
        ),
    )?;
    let child = Command::new(nginx)
        .args(["-c"])
        .arg(&conf)
        .args(["-p"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((Proc { child }, addr))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.light {
        return light::run(&cli).await;
    }
    let dir = tempfile_dir()?;
    let bin = cli.bin_dir.clone();
    let (fast, real) = (free_addr(), free_addr());
    let _sim_fast = start_sim(&bin, fast, "fast", 0, 0)?;
    let _sim_real = start_sim(&bin, real, "real", 50, 10)?;
    wait_listening(fast, "the fast simulator").await?;
    wait_listening(real, "the realistic simulator").await?;

    let globus = bench_globus().await?;
    let (full, lite) = gateway_configs(&globus, &dir.join("usage.db"), fast, real)?;
    let (gw_full, full_addr, full_admin) = start_gateway(
        &bin,
        &dir,
        "firstgate-full",
        &full,
        &[("FG_BENCH_SECRET", "bench-secret")],
    )?;
    let (gw_lite, lite_addr, lite_admin) = start_gateway(&bin, &dir, "firstgate-lite", &lite, &[])?;
    // Per-user limits far above the load, so that every request pays for them in Redis
    // (a rate check and a request-in-flight slot) without being refused.
    let redis_gw = match &cli.redis {
        Some(url) => {
            let shared = full.replace(
                LIMITS_OFF,
                &format!(
                    "limits:\n  requests_per_second: 1000000\n  ip_requests_per_second: 0\n  \
                     max_concurrent_per_user: 1000000\nstate:\n  redis:\n    url: {url}\n"
                ),
            );
            let (gw, addr, admin) = start_gateway(
                &bin,
                &dir,
                "firstgate-redis",
                &shared.replace("usage.db", "usage-redis.db"),
                &[("FG_BENCH_SECRET", "bench-secret")],
            )?;
            wait_listening(addr, "firstgate (redis)").await?;
            Some((gw, addr, admin))
        }
        None => None,
    };
    let (ngx, ngx_addr) = start_nginx(&cli.nginx, &dir, fast, real, 2)?;
    let (bare, bare_addr) = start_bare(&bin, fast, real, false, 2, None)?;
    let (tuned, tuned_addr) = start_bare(&bin, fast, real, true, 2, None)?;
    for (a, what) in [
        (full_addr, "firstgate (full)"),
        (lite_addr, "firstgate (lite)"),
        (ngx_addr, "nginx"),
        (bare_addr, "the bare Pingora proxy"),
        (tuned_addr, "the tuned bare Pingora proxy"),
    ] {
        wait_listening(a, what).await?;
    }

    let mut targets = vec![
        Target {
            name: "direct",
            base: format!("http://{fast}"),
            fast: ("fast", ""),
            real: ("real", ""),
            pid: None,
            token: None,
            admin: None,
        },
        Target {
            name: "nginx",
            base: format!("http://{ngx_addr}"),
            fast: ("fast", "/fast"),
            real: ("real", "/real"),
            pid: Some(ngx.pid()),
            token: None,
            admin: None,
        },
        Target {
            name: "pingora-bare",
            base: format!("http://{bare_addr}"),
            fast: ("fast", "/fast"),
            real: ("real", "/real"),
            pid: Some(bare.pid()),
            token: None,
            admin: None,
        },
        Target {
            name: "pingora-tuned",
            base: format!("http://{tuned_addr}"),
            fast: ("fast", "/fast"),
            real: ("real", "/real"),
            pid: Some(tuned.pid()),
            token: None,
            admin: None,
        },
        Target {
            name: "firstgate-lite",
            base: format!("http://{lite_addr}"),
            fast: ("fast", ""),
            real: ("real", ""),
            pid: Some(gw_lite.pid()),
            token: None,
            admin: Some(lite_admin),
        },
        Target {
            name: "firstgate-full",
            base: format!("http://{full_addr}"),
            fast: ("fast", ""),
            real: ("real", ""),
            pid: Some(gw_full.pid()),
            token: Some("bench-token"),
            admin: Some(full_admin),
        },
    ];
    if let Some((gw, addr, admin)) = &redis_gw {
        targets.push(Target {
            name: "firstgate-redis",
            base: format!("http://{addr}"),
            fast: ("fast", ""),
            real: ("real", ""),
            pid: Some(gw.pid()),
            token: Some("bench-token"),
            admin: Some(*admin),
        });
    }
    // Direct to the realistic simulator needs its own base.
    let direct_real = Target {
        name: "direct",
        base: format!("http://{real}"),
        fast: ("fast", ""),
        real: ("real", ""),
        pid: None,
        token: None,
        admin: None,
    };

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(20_000)
        .build()?;
    // Warm up: connections, the token cache, the policy engine.
    for t in &targets {
        for _ in 0..50 {
            let r = request(&client, t, false, false, 4).send().await?;
            anyhow::ensure!(
                r.status().is_success(),
                "{} answered {} while warming up",
                t.name,
                r.status()
            );
        }
    }

    // A proxy needs two descriptors per stream; nginx spreads them over its two workers, a
    // gateway process has one limit for all.
    let edge_streams = cli.edge_streams.unwrap_or_else(|| {
        let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard);
        10_000.min(usize::try_from(hard / 2).unwrap_or(usize::MAX))
    });
    let chosen: Vec<&Target> = targets
        .iter()
        .filter(|t| cli.targets.is_empty() || cli.targets.iter().any(|n| n == t.name))
        .collect();
    // Direct streams go to the realistic simulator.
    let streams_of = |t: &Target| (t.name == "direct").then_some(&direct_real);
    let mut runs = Vec::new();
    let redis_admin = redis_gw.as_ref().map(|(_, _, admin)| *admin);
    // The Redis calls of the fixed-rate runs (latency), apart from the saturation's (queueing).
    let (mut at_rates, mut after_rates) = (RedisBuckets::new(), RedisBuckets::new());
    for round in 1..=cli.rounds.max(1) {
        eprintln!("round {round} of {}", cli.rounds.max(1));
        if let (Some(admin), 1) = (redis_admin, round) {
            at_rates = redis_buckets(admin).await;
        }
        for rate in &cli.rates {
            for t in &chosen {
                runs.push(fixed_rate(&client, t, *rate, cli.duration).await);
            }
        }
        if let (Some(admin), 1) = (redis_admin, round) {
            after_rates = redis_buckets(admin).await;
        }
        for t in &chosen {
            runs.push(saturation(&client, t, cli.concurrency, cli.duration).await);
        }
        for n in &cli.streams {
            for t in &chosen {
                let mut r = streams(&stream_client()?, streams_of(t).unwrap_or(t), *n).await;
                r.target = t.name.into();
                runs.push(r);
            }
        }
    }
    let mut results = median_rounds(runs, &chosen);
    // The descriptor-limit run is about failures, not cost: once.
    if edge_streams > 0 {
        for t in &chosen {
            let mut r = streams(&stream_client()?, streams_of(t).unwrap_or(t), edge_streams).await;
            r.target = t.name.into();
            r.scenario = format!("{edge_streams} streams, fd limit");
            if let Some(admin) = t.admin {
                r.connections = connection_metrics(admin).await;
            }
            results.push(r);
        }
    }
    report(&results, &cli.out)?;
    if let Some(admin) = redis_admin {
        redis_report("first round's fixed rates", &at_rates, &after_rates);
        redis_report(
            "whole run",
            &RedisBuckets::new(),
            &redis_buckets(admin).await,
        );
    }
    drop((gw_full, gw_lite, ngx, bare, tuned, redis_gw));
    if cli.keep {
        println!("working directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// One row per target and scenario (targets in their order, scenarios in the order run): the
/// round with the median CPU per request, with every round's figure beside it, the median of
/// the rounds' mean times to first token, and the first round's memory per stream (later
/// rounds reuse memory the allocator kept from the first).
fn median_rounds(runs: Vec<RunResult>, targets: &[&Target]) -> Vec<RunResult> {
    let mut scenarios: Vec<String> = Vec::new();
    for r in &runs {
        if !scenarios.contains(&r.scenario) {
            scenarios.push(r.scenario.clone());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let mut rows = Vec::new();
    for t in targets {
        for scenario in &scenarios {
            let rounds: Vec<&RunResult> = runs
                .iter()
                .filter(|r| r.target == t.name && &r.scenario == scenario)
                .collect();
            let cpu = |r: &RunResult| r.cpu_s_per_1k.unwrap_or(f64::INFINITY);
            let mut by_cpu = rounds.clone();
            by_cpu.sort_by(|a, b| cpu(a).total_cmp(&cpu(b)));
            let Some(middle) = by_cpu.get(by_cpu.len() / 2) else {
                continue;
            };
            let mut row = (*middle).clone();
            row.cpu_s_per_1k_rounds = rounds.iter().filter_map(|r| r.cpu_s_per_1k).collect();
            row.ttft_mean_ms = median(rounds.iter().filter_map(|r| r.ttft_mean_ms).collect());
            row.kib_per_stream = rounds[0].kib_per_stream;
            rows.push(row);
        }
    }
    rows
}

/// A client for one run of streams, whose connections close when the run is over: the
/// generator holds a descriptor per stream too, and idle connections left from one run would
/// count against the next (in the generator and in the target).
fn stream_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .build()
}

/// Child process ids (nginx workers).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("firstgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn report(results: &[RunResult], out: &Path) -> anyhow::Result<()> {
    println!(
        "{:<15} {:<18} {:>8} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "target",
        "scenario",
        "req/s",
        "errs",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "ttft mean",
        "ttft p50",
        "gap p99",
        "cpu/1k",
        "×nginx",
        "×bare",
        "×tuned",
        "MiB"
    );
    for r in results {
        let same = |target: &str| {
            results
                .iter()
                .find(|d| d.target == target && d.scenario == r.scenario)
        };
        let added = same("direct").map_or(0.0, |d| r.p50_ms - d.p50_ms);
        // CPU per request (or stream) against nginx and the two Pingora floors: the headline
        // figures (throughput on shared cores mostly measures the load generator).
        let cpu_vs = |target: &str| {
            same(target)
                .and_then(|b| Some(r.cpu_s_per_1k? / b.cpu_s_per_1k.filter(|c| *c > 0.0)?))
                .map_or("-".to_string(), |x| format!("{x:.2}"))
        };
        let opt =
            |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        println!(
            "{:<15} {:<18} {:>8.0} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
            r.target,
            r.scenario,
            r.achieved_rps,
            r.errors,
            r.p50_ms,
            r.p99_ms,
            added,
            opt(r.ttft_mean_ms, 1),
            opt(r.ttft_p50_ms, 1),
            opt(r.gap_p99_ms, 1),
            opt(r.cpu_s_per_1k, 3),
            cpu_vs("nginx"),
            cpu_vs("pingora-bare"),
            cpu_vs("pingora-tuned"),
            opt(r.peak_rss_mib, 1)
        );
    }
    let per_stream: Vec<String> = results
        .iter()
        .filter_map(|r| {
            r.kib_per_stream
                .map(|k| format!("{} {}: {k:.1} KiB/stream", r.target, r.scenario))
        })
        .collect();
    if !per_stream.is_empty() {
        println!("\nmemory per open stream: {}", per_stream.join("; "));
    }
    let limit_run: Vec<String> = results
        .iter()
        .filter(|r| r.scenario.ends_with("fd limit"))
        .map(|r| {
            let why: Vec<String> = r
                .errors_by_kind
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            format!(
                "{} {} of {} failed{}{}",
                r.target,
                r.errors,
                r.errors + r.completed,
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", why.join(", "))
                },
                if r.connections.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", r.connections.join(" "))
                }
            )
        })
        .collect();
    if !limit_run.is_empty() {
        println!("\nat the descriptor limit: {}", limit_run.join("; "));
    }
    std::fs::create_dir_all(out)?;
    let path = out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(results)?)?;
    println!("\nJSON: {}", path.display());
    Ok(())
}
