//! Hot-path pieces: control-field parsing, model resolution, and the SSE usage scan per chunk.
//! (The authenticated cache hit and the route decision have their own benches.)
//!
//! `cargo bench --bench hot_path`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use firstgate::catalog::Catalog;
use firstgate::config;
use firstgate::openai::parse_control_fields;
use firstgate::openai::Endpoint;
use firstgate::usage::UsageScanner;
use std::path::Path;

fn bench(c: &mut Criterion) {
    let small =
        serde_json::json!({"model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "stream": true,
        "max_tokens": 64, "messages": [{"role": "user", "content": "Say hello to the benchmark."}]})
        .to_string();
    let large = serde_json::json!({"model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "lorem ipsum ".repeat(6000)}]})
    .to_string();
    let mut g = c.benchmark_group("hot_path");
    g.bench_function("control_fields_small", |b| {
        b.iter(|| parse_control_fields(small.as_bytes(), Endpoint::ChatCompletions).unwrap())
    });
    g.bench_function("control_fields_72k", |b| {
        b.iter(|| parse_control_fields(large.as_bytes(), Endpoint::ChatCompletions).unwrap())
    });

    let yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/demo.yaml"))
            .unwrap();
    let cfg = config::parse(Path::new("conf/demo.yaml"), &yaml).unwrap();
    // The demo's direct API reads its key from the environment (single-threaded here).
    std::env::set_var("METIS_API_KEY", "bench-key");
    let catalog = Catalog::build(&cfg).unwrap();
    g.bench_function("resolve_first_layout_alias", |b| {
        b.iter(|| catalog.resolve("sophia", "vllm", "LLAMA-3.1-8B").unwrap())
    });
    g.bench_function("resolve_federated", |b| {
        b.iter(|| {
            catalog
                .resolve_federated("meta-llama/Meta-Llama-3.1-8B-Instruct")
                .unwrap()
        })
    });

    let chunk = Bytes::from(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
         \"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok7 \"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    );
    g.bench_function("sse_usage_scan_chunk", |b| {
        let mut scanner = UsageScanner::new(true, true);
        b.iter(|| scanner.feed(&chunk, false))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
