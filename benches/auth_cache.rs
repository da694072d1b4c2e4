//! The authenticated cache-hit path: a request whose token was already introspected
//! (parse `Authorization`, hash the token, look the verdict up, re-check expiry).
//!
//! `cargo bench --bench auth_cache`. The Globus stand-in answers the one introspection that
//! fills the cache; every measured call is a hit.

use criterion::{criterion_group, criterion_main, Criterion};
use firstgate::auth::{Authenticator, CacheOutcome};
use firstgate::config::{AuthConfig, AuthMode};
use firstgate::sim::globus::{FakeClient, FakeUser, GlobusSim, Seed};
use std::time::Duration;

fn bench_cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seed = Seed {
        clients: vec![FakeClient {
            id: "bench-client".into(),
            secret: "bench-secret".into(),
        }],
        users: vec![FakeUser::new("bench-token", "alice@anl.gov")],
        ..Seed::default()
    };
    let globus = rt
        .block_on(GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed))
        .unwrap();
    std::env::set_var("FG_BENCH_GLOBUS_SECRET", "bench-secret");
    let cfg: AuthConfig = serde_yaml_ng::from_str(&format!(
        "mode: globus\nglobus:\n  client_id: bench-client\n  client_secret_env: FG_BENCH_GLOBUS_SECRET\n\
         \x20 auth_url: {url}\n  groups_url: {url}\nrules:\n  allowed_domains: [anl.gov]\n",
        url = globus.url()
    ))
    .unwrap();
    assert_eq!(cfg.mode, AuthMode::Globus);
    let auth = Authenticator::new(&cfg, false).unwrap();
    let header: &[u8] = b"Bearer bench-token";
    let (first, outcome) = rt.block_on(auth.authenticate(Some(header)));
    assert!(first.is_ok() && outcome == Some(CacheOutcome::Miss));

    let mut group = c.benchmark_group("auth");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let (identity, outcome) = auth.authenticate(Some(header)).await;
            debug_assert_eq!(outcome, Some(CacheOutcome::Hit));
            identity.unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_cache_hit);
criterion_main!(benches);
