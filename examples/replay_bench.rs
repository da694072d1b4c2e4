//! How fast `firstgate policy replay` is (`scripts/bench.sh --replay`): a week of synthetic
//! traffic (1,000,000 requests by default, office hours busy, nights quiet) is written to a
//! SQLite usage store through the gateway's own writer, then replayed, as the command does
//! (read the store, simulate the live policies and a candidate, render the table and the
//! SVG), timed. Not a test: a benchmark whose numbers go in docs/benchmarks.md.
//!
//! `cargo run --release --example replay_bench -- [REQUESTS]`

use firstgate::metrics::Metrics;
use firstgate::policy::replay::{replay, ClusterOverrides, ReplayOptions};
use firstgate::usage::retention::Retention;
use firstgate::usage::{Batching, UsageRecord, UsageSink, WriterSink};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const HOT: &str = "meta-llama/Meta-Llama-3.1-8B-Instruct";
const COLD: &str = "meta-llama/Llama-3.3-70B-Instruct";
const WEEK_MS: i64 = 7 * 24 * 3_600_000;
/// The recorded cluster: an instance of the cold model is up this long after the first request
/// that found none, and released after this long idle.
const START_MS: i64 = 5 * 60_000;
const IDLE_RELEASE_MS: i64 = 2 * 3_600_000;

fn main() -> anyhow::Result<()> {
    let requests: u64 = match std::env::args().nth(1) {
        Some(n) => n
            .parse()
            .map_err(|_| anyhow::anyhow!("REQUESTS: a number"))?,
        None => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config_path = dir.path().join("gateway.yaml");
    std::fs::write(&config_path, config(&root))?;
    let loaded = firstgate::config::load(&config_path)?;

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let from_ms = now - WEEK_MS;
    let started = Instant::now();
    let written = write_week(&dir.path().join("firstgate-usage.db"), from_ms, requests)?;
    println!(
        "wrote {written} records of a week in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let opts = ReplayOptions {
        from_ms,
        to_ms: now,
        scale: Some(root.join("conf/policies/scale-keep-warm.rhai")),
        speed: 1.0,
        cluster: ClusterOverrides::default(),
        ..ReplayOptions::default()
    };
    let started = Instant::now();
    let report = replay(&loaded.config, &opts)?;
    let (table, svg) = (report.table(), report.svg());
    let took = started.elapsed();
    println!("{table}");
    println!(
        "replayed {} requests (2 policies) in {:.2} s: {:.0} requests per second; \
         table {} bytes, SVG {} bytes",
        report.requests,
        took.as_secs_f64(),
        report.requests as f64 / took.as_secs_f64(),
        table.len(),
        svg.len()
    );
    Ok(())
}

/// The demo's two kinds of model: one on configured backends, one started on demand (through
/// Globus Compute while cold), with the demo's policies.
fn config(root: &std::path::Path) -> String {
    let policies = root.join("conf/policies");
    let policies = policies.display();
    format!(
        "auth: {{mode: none}}
policies:
  route: {policies}/prefer-hot.rhai
  scale: {policies}/scale-on-demand.rhai
  scale_interval: 30s
compute: {{url: 'http://127.0.0.1:1', auth_url: 'http://127.0.0.1:1', client_id: c, client_secret_env: S}}
clusters:
  sophia:
    compute: {{endpoint: e, status_function: s, start_function: b, stop_function: x}}
    frameworks:
      vllm:
        models:
          - name: {HOT}
            backends: [127.0.0.1:18001, 127.0.0.1:18002]
          - name: {COLD}
            backends: []
            compute: {{endpoint: e, function: f}}
            scaling: {{min_instances: 0, max_instances: 2, keep_hot: 24h, idle_release: 2h}}
"
    )
}

/// Writes `requests` records spread over the week from `from_ms`: each hour's share follows
/// office hours (busy 8:00 to 18:00, a little in the evening, nothing from 1:00 to 6:00), four
/// in ten to the model started on demand, whose routes follow the recorded cluster above.
fn write_week(path: &std::path::Path, from_ms: i64, requests: u64) -> anyhow::Result<u64> {
    let metrics = Arc::new(Metrics::new());
    let sink = WriterSink::sqlite(
        path,
        Batching {
            queue: requests as usize + 1,
            batch: 4096,
            flush_interval: Duration::from_millis(200),
            retention: Retention {
                raw: None,
                rollups: None,
            },
        },
        metrics.clone(),
    )?;
    let weight = |hour: i64| match hour % 24 {
        8..=17 => 10.0,
        18..=23 | 7 => 2.0,
        0 => 1.0,
        _ => 0.0,
    };
    let hours = WEEK_MS / 3_600_000;
    let total: f64 = (0..hours).map(weight).sum();
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut written, mut ready, mut last_served): (u64, Option<i64>, i64) = (0, None, 0);
    for hour in 0..hours {
        let n = (weight(hour) / total * requests as f64).round() as u64;
        let mut times: Vec<i64> = (0..n)
            .map(|_| from_ms + hour * 3_600_000 + rng.i64(0..3_600_000))
            .collect();
        times.sort_unstable();
        for time_ms in times {
            let cold = rng.u8(0..10) < 4;
            let (model, route, instance) = if !cold {
                (HOT, "direct", format!("127.0.0.1:1800{}", 1 + rng.u8(0..2)))
            } else {
                // The recorded cluster: an instance released after IDLE_RELEASE_MS without
                // requests, started START_MS after the first request that found none.
                if ready.is_some_and(|r| time_ms - last_served.max(r) > IDLE_RELEASE_MS) {
                    ready = None;
                }
                if time_ms >= *ready.get_or_insert(time_ms + START_MS) {
                    last_served = time_ms;
                    (COLD, "direct", "10.0.0.7:8000".to_string())
                } else {
                    (COLD, "compute", String::new())
                }
            };
            let completion = 50 + rng.u64(0..400);
            let ttft = 80 + rng.u64(0..120);
            sink.record(UsageRecord {
                request_id: format!("replay-bench-{written}"),
                time_ms,
                user_id: "u".into(),
                username: format!("user{}@anl.gov", rng.u8(0..200)),
                cluster: "sophia".into(),
                framework: "vllm".into(),
                model: model.into(),
                endpoint: "chat/completions".into(),
                route: route.into(),
                status: 200,
                prompt_tokens: 200 + rng.u64(0..2000),
                completion_tokens: completion,
                total_tokens: 0,
                ttft_ms: (route == "direct").then_some(ttft),
                duration_ms: if route == "direct" {
                    ttft + completion * 20
                } else {
                    30_000 + rng.u64(0..10_000)
                },
                instance,
                ..UsageRecord::default()
            });
            written += 1;
        }
    }
    sink.flush(Duration::from_secs(600));
    anyhow::ensure!(metrics.usage_dropped.get() == 0, "records dropped");
    Ok(written)
}
