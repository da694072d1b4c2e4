//! The per-request pieces of accounting a finished request pays for on the request path: its
//! usage record handed to the SQLite writer, its access-log line, and its metrics.
//!
//! The writer threads run meanwhile (they share the machine, as in the gateway); only the
//! request side is timed: each sample hands over records in runs of [`RUN`], then waits,
//! untimed, until the writers have caught up, so that no queue overflows into the (cheaper)
//! drop path.
//!
//! `cargo bench --bench accounting`.

use criterion::{criterion_group, criterion_main, Criterion};
use firstgate::config::LogTarget;
use firstgate::metrics::Metrics;
use firstgate::usage::{
    AccessLog, Accounting, Batching, LimitSettings, Limiter, Outputs, Tokens, UsageRecord,
    UsageTotals, WriterSink,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records handed over between two flushes: under the default queue (10,000).
const RUN: u64 = 4096;

fn record(n: u64) -> UsageRecord {
    UsageRecord {
        request_id: format!("0193a8f2-7c1e-7000-8000-{n:012x}"),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        time_ms: 1_764_500_000_000 + n as i64,
        user_id: "b7e9f0a2-1c3d-4e5f-8a9b-0c1d2e3f4a5b".into(),
        username: "alice@anl.gov".into(),
        cluster: "sophia".into(),
        framework: "vllm".into(),
        model: "meta-llama/Meta-Llama-3.1-8B-Instruct".into(),
        endpoint: "chat/completions".into(),
        route: "direct".into(),
        status: 200,
        prompt_tokens: 42,
        completion_tokens: 17,
        total_tokens: 59,
        ttft_ms: Some(12),
        duration_ms: 40,
        bytes_in: 180,
        bytes_out: 620,
        instance: "10.0.0.7:8000".into(),
        ..UsageRecord::default()
    }
}

fn accounting(sink: Option<Arc<WriterSink>>, access_log: Option<AccessLog>) -> Accounting {
    let outputs = Outputs {
        sink: sink.map(|s| s as Arc<dyn firstgate::usage::UsageSink>),
        access_log: access_log.map(Arc::new),
        log_prompts: false,
    };
    Accounting::new(
        outputs,
        UsageTotals::default(),
        Limiter::local(LimitSettings {
            user_rps: 0,
            ip_rps: 0,
            ip_burst: 0,
            window: Duration::from_secs(60),
            max_in_flight: 0,
        }),
        firstgate::usage::RequestCaps::new(1 << 20, 512),
    )
}

/// Times `finish` for `iters` records, flushing (untimed) every [`RUN`].
fn time_finishing(acc: &Accounting, iters: u64, next: &mut u64) -> Duration {
    let mut timed = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let run = left.min(RUN);
        let records: Vec<UsageRecord> = (0..run).map(|i| record(*next + i)).collect();
        let counted: Vec<_> = records
            .iter()
            .map(|r| {
                let tokens = Tokens {
                    prompt: r.prompt_tokens,
                    completion: r.completion_tokens,
                    total: r.total_tokens,
                };
                (r.username.clone(), r.model.clone(), tokens)
            })
            .collect();
        *next += run;
        let client = Some("10.1.2.3".parse().unwrap());
        let t = Instant::now();
        for (r, (user, model, tokens)) in records.into_iter().zip(&counted) {
            acc.finish((user, model, *tokens), || r, None, client);
        }
        timed += t.elapsed();
        acc.flush(Duration::from_secs(30));
        left -= run;
    }
    timed
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("accounting");

    let metrics = Arc::new(Metrics::new());
    let sink = WriterSink::sqlite(
        &dir.path().join("usage.db"),
        Batching {
            queue: 10_000,
            batch: 512,
            flush_interval: Duration::from_millis(200),
            retention: firstgate::usage::retention::Retention {
                raw: None,
                rollups: None,
            },
        },
        metrics.clone(),
    )
    .unwrap();
    let with_store = accounting(Some(sink), None);
    let mut next = 0;
    g.bench_function("usage_record_enqueue", |b| {
        b.iter_custom(|iters| time_finishing(&with_store, iters, &mut next))
    });

    let log = AccessLog::start(
        LogTarget::File(dir.path().join("access.log")),
        metrics.access_log_dropped.clone(),
    )
    .unwrap();
    let with_log = accounting(None, Some(log));
    g.bench_function("access_log_line", |b| {
        b.iter_custom(|iters| time_finishing(&with_log, iters, &mut next))
    });

    // How the gateway made them before: a label lookup per update.
    g.bench_function("metrics_update_with_label_values", |b| {
        b.iter(|| {
            let (cluster, model) = ("sophia", "meta-llama/Meta-Llama-3.1-8B-Instruct");
            for (kind, n) in [("prompt", 42), ("completion", 17)] {
                metrics
                    .tokens
                    .with_label_values(&[cluster, model, kind])
                    .inc_by(n);
            }
            metrics
                .requests
                .with_label_values(&[cluster, model, "200"])
                .inc();
            metrics
                .overhead
                .with_label_values(&["direct"])
                .observe(0.00004);
            metrics
                .request_duration
                .with_label_values(&[cluster, model])
                .observe(0.04);
            metrics
                .time_to_first_byte
                .with_label_values(&[cluster, model])
                .observe(0.012);
            metrics.in_flight.with_label_values(&[cluster, model]).dec();
        })
    });
    // The same updates as the gateway makes them: series resolved once per deployment.
    let series = metrics.deployment("sophia", "meta-llama/Meta-Llama-3.1-8B-Instruct");
    g.bench_function("metrics_update_deployment_series", |b| {
        b.iter(|| {
            series.prompt_tokens.inc_by(42);
            series.completion_tokens.inc_by(17);
            series.answered_ok.inc();
            metrics.observe_overhead("direct", 0.00004);
            series.duration.observe(0.04);
            series.time_to_first_byte.observe(0.012);
            series.in_flight.dec();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
