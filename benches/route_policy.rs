//! One route decision over 10 candidate deployments (2 instances each): the example policy
//! `conf/policies/prefer-hot.rhai` against the built-in Rust rule.
//!
//! `cargo bench --bench route_policy`.

use criterion::{criterion_group, criterion_main, Criterion};
use firstgate::policy::{
    builtin_route, Candidate, Decision, DeploymentState, InstanceView, RouteRequest, Script,
    UserView, ROUTE,
};
use std::path::Path;
use std::sync::Arc;

fn candidates() -> Arc<Vec<Arc<Candidate>>> {
    Arc::new(
        (0..10)
            .map(|i| {
                Arc::new(Candidate {
                    cluster: format!("cluster{i}"),
                    framework: "vllm".into(),
                    // A few cold ones, so the policy has something to filter.
                    state: if i % 3 == 0 {
                        DeploymentState::Cold
                    } else {
                        DeploymentState::Hot
                    },
                    instances: (0..2)
                        .map(|j| InstanceView {
                            id: format!("10.0.{i}.{j}:8000"),
                            healthy: i % 3 != 0,
                            in_flight: ((i * 7 + j * 3) % 11) as i64,
                            latency_ms: 100 + (i * 13 % 50) as i64,
                            ends_in: Some(3600),
                            socket: None,
                            ..Default::default()
                        })
                        .collect(),
                    compute: true,
                    index: i,
                    routing: Default::default(),
                    affinity_slack: 0.5,
                })
            })
            .collect(),
    )
}

fn bench_route(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/policies/prefer-hot.rhai");
    let script = Script::compile(&path, &std::fs::read_to_string(&path).unwrap(), ROUTE).unwrap();
    let req = Arc::new(RouteRequest {
        model: "meta-llama/Meta-Llama-3.1-8B-Instruct".into(),
        endpoint: "chat/completions".into(),
        stream: true,
        user: UserView {
            username: "alice@anl.gov".into(),
            domain: "anl.gov".into(),
            ..UserView::default()
        },
        prompt_bytes: 420,
        ..RouteRequest::default()
    });
    let candidates = candidates();
    let expected = builtin_route(&req, &candidates);
    assert!(matches!(expected, Decision::Direct { .. }));
    // The same decision as it is shown (the lists each chose among differ: hot, and all).
    let shown = |d: &Decision| serde_json::to_value(d).unwrap();
    assert_eq!(
        shown(&script.route(&req, &candidates).unwrap()),
        shown(&expected)
    );

    let mut group = c.benchmark_group("route_10_candidates");
    group.bench_function("rhai_prefer_hot", |b| {
        b.iter(|| script.route(&req, &candidates).unwrap())
    });
    group.bench_function("builtin", |b| b.iter(|| builtin_route(&req, &candidates)));
    group.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
