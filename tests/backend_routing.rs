//! Routing that knows what the backends know: the gateway reads each vLLM instance's own
//! `/metrics` (queue, KV cache, prefix-cache hits) and routes by prefix affinity, so requests
//! that share a prompt start land where their prefix is cached, while an instance with a queue
//! sheds new prefixes. Policies read the same figures.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::vllm::VllmSim;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

const MODEL: &str = "meta-llama/Meta-Llama-3.1-8B-Instruct";

/// `n` simulators of the model.
async fn sims(n: usize) -> Vec<VllmSim> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(sim(&[MODEL], |_| {}).await);
    }
    out
}

/// The gateway over `sims`, scraping every 100 ms, with `extra` YAML (top-level sections)
/// and `model_extra` lines under the model.
async fn gateway(sims: &[VllmSim], upstream: &str, extra: &str) -> Gateway {
    let backends: Vec<String> = sims.iter().map(|s| s.addr().to_string()).collect();
    Gateway::start(&format!(
        "upstream:\n  metrics_interval: 100ms\n{upstream}{extra}\
         clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n          \
         - name: {MODEL}\n            backends: [{}]\n",
        backends.join(", ")
    ))
    .await
}

/// A chat whose prompt starts with the system prompt `system`.
fn chat(system: &str, question: &str) -> Value {
    json!({
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    })
}

/// A system prompt of a few hundred words, different for each `n`.
fn system_prompt(n: usize) -> String {
    (0..300)
        .map(|i| format!("rule{n}-{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn send(gw: &Gateway, body: &Value) {
    let (status, body) = status_json(
        gw.post("/v1/chat/completions")
            .json(body)
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

fn served(sims: &[VllmSim]) -> Vec<u64> {
    sims.iter()
        .map(|s| s.stats().chat_requests.load(Ordering::Relaxed))
        .collect()
}

fn delta(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// The instance a first request with `prompt` goes to.
async fn home_of(gw: &Gateway, sims: &[VllmSim], prompt: &Value) -> usize {
    let before = served(sims);
    send(gw, prompt).await;
    delta(&served(sims), &before)
        .iter()
        .position(|n| *n > 0)
        .expect("one instance served it")
}

/// A `firstgate_backend_*` gauge of one instance, if published.
fn backend_gauge(metrics: &str, name: &str, instance: &VllmSim) -> Option<f64> {
    let label = format!("backend=\"{}\"", instance.addr());
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until the gateway publishes `value` for the instance's `name` gauge.
async fn wait_gauge(gw: &Gateway, name: &str, instance: &VllmSim, ok: impl Fn(f64) -> bool) {
    wait_for(&format!("{name} of {}", instance.addr()), || async {
        let m = gw.metrics().await;
        backend_gauge(&m, name, instance).filter(|v| ok(*v))
    })
    .await;
}

#[tokio::test]
async fn requests_sharing_a_prefix_land_on_one_instance_and_different_prefixes_spread() {
    let sims = sims(4).await;
    let gw = gateway(&sims, "  routing: prefix_affinity\n", "").await;

    let before = served(&sims);
    for q in 0..12 {
        send(&gw, &chat(&system_prompt(0), &format!("question {q}"))).await;
    }
    let shared = delta(&served(&sims), &before);
    assert_eq!(
        shared.iter().filter(|n| **n > 0).count(),
        1,
        "one system prompt, one instance: {shared:?}"
    );
    // That instance found the system prompt in its prefix cache after the first request.
    let home = shared.iter().position(|n| *n > 0).unwrap();
    let hits = sims[home].stats().prefix_cache_hits.load(Ordering::Relaxed);
    assert!(hits >= 11 * 288, "prefix-cache hits {hits}");
    // The gateway reads it back: the instance's hit rate over its last reads.
    wait_gauge(
        &gw,
        "firstgate_backend_prefix_cache_hit_rate",
        &sims[home],
        |v| v > 0.5,
    )
    .await;

    let before = served(&sims);
    for p in 1..=40 {
        send(&gw, &chat(&system_prompt(p), "question")).await;
    }
    let spread = delta(&served(&sims), &before);
    assert!(
        spread.iter().all(|n| (1..=25).contains(n)),
        "forty prefixes over four instances: {spread:?}"
    );
}

#[tokio::test]
async fn least_in_flight_stays_the_default_and_spreads_one_prefix() {
    let sims = sims(2).await;
    let gw = gateway(&sims, "", "").await;
    let before = served(&sims);
    for q in 0..10 {
        send(&gw, &chat(&system_prompt(0), &format!("question {q}"))).await;
    }
    let d = delta(&served(&sims), &before);
    assert!(d.iter().all(|n| *n > 0), "{d:?}");
}

#[tokio::test]
async fn an_instance_reporting_a_queue_sheds_new_prefixes() {
    let sims = sims(3).await;
    let gw = gateway(&sims, "  routing: prefix_affinity\n", "").await;
    let prompt = chat(&system_prompt(7), "question");
    let home = home_of(&gw, &sims, &prompt).await;

    // vLLM on the home instance reports a queue the others do not have; once the gateway has
    // read it, the prefix goes to the next instance on the ring, and stays there.
    sims[home]
        .faults()
        .reported_waiting
        .store(4, Ordering::Relaxed);
    wait_gauge(&gw, "firstgate_backend_waiting", &sims[home], |v| v == 4.0).await;
    let before = served(&sims);
    for _ in 0..6 {
        send(&gw, &prompt).await;
    }
    let moved = delta(&served(&sims), &before);
    assert_eq!(moved[home], 0, "{moved:?}");
    assert_eq!(moved.iter().filter(|n| **n > 0).count(), 1, "{moved:?}");

    // Every instance queueing alike (a busy cluster, not one overloaded node): the prefix
    // comes home, where it is cached.
    for sim in &sims {
        sim.faults().reported_waiting.store(4, Ordering::Relaxed);
    }
    for sim in &sims {
        wait_gauge(&gw, "firstgate_backend_waiting", sim, |v| v == 4.0).await;
    }
    let before = served(&sims);
    send(&gw, &prompt).await;
    assert_eq!(delta(&served(&sims), &before)[home], 1);
}

#[tokio::test]
async fn route_and_scale_policies_read_what_the_backends_report() {
    let sims = sims(2).await;
    let dir = tempfile::tempdir().unwrap();
    let route = dir.path().join("route.rhai");
    std::fs::write(
        &route,
        r#"fn route(req, c) {
            if req.header("x-show") != "" {
                let d = c.first();
                return reject(418, `waiting=${d.waiting} running=${d.running} kv=${d.kv_cache} age=${d.metrics_age_ms} hit=${d.prefix_hit_rate}`);
            }
            direct(c.without_queue())
        }"#,
    )
    .unwrap();
    let scale = dir.path().join("scale.rhai");
    std::fs::write(
        &scale,
        r#"fn scale(m) {
            if m.backend_waiting >= 5 { start("sophia", 1) } else { () }
        }"#,
    )
    .unwrap();
    let gw = gateway(
        &sims,
        "",
        &format!(
            "policies:\n  route: {}\n  scale: {}\n  scale_interval: 100ms\n",
            route.display(),
            scale.display()
        ),
    )
    .await;
    wait_gauge(&gw, "firstgate_backend_waiting", &sims[0], |v| v == 0.0).await;

    // The figures as a script sees them.
    let (status, body) = status_json(
        gw.post("/v1/chat/completions")
            .header("x-show", "1")
            .json(&chat("s", "q"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 418);
    let message = body["error"]["message"].as_str().unwrap().to_string();
    assert!(message.starts_with("waiting=0 running=0 kv=0"), "{message}");
    let age: i64 = message
        .split("age=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1);
    assert!((0..5_000).contains(&age), "{message}");

    // An instance with a queue is left out by `without_queue()`; the scale policy sees the
    // queue as demand and asks for an instance.
    sims[0]
        .faults()
        .reported_waiting
        .store(5, Ordering::Relaxed);
    wait_gauge(&gw, "firstgate_backend_waiting", &sims[0], |v| v == 5.0).await;
    let before = served(&sims);
    for q in 0..6 {
        send(&gw, &chat("s", &format!("q{q}"))).await;
    }
    assert_eq!(delta(&served(&sims), &before), vec![0, 6]);
    wait_for("the scale policy to start an instance", || async {
        let m = gw.metrics().await;
        (metric(
            &m,
            &format!("firstgate_scale_actions_total{{action=\"start\",model=\"{MODEL}\"}}"),
        ) >= 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_failed_scrape_keeps_the_last_figures_and_their_age_grows() {
    let sims = sims(1).await;
    let gw = gateway(&sims, "", "").await;
    sims[0]
        .faults()
        .reported_waiting
        .store(3, Ordering::Relaxed);
    wait_gauge(&gw, "firstgate_backend_waiting", &sims[0], |v| v == 3.0).await;
    wait_gauge(
        &gw,
        "firstgate_backend_metrics_age_seconds",
        &sims[0],
        |v| v < 0.5,
    )
    .await;

    sims[0].faults().metrics_down.store(true, Ordering::Relaxed);
    sims[0]
        .faults()
        .reported_waiting
        .store(0, Ordering::Relaxed);
    wait_gauge(
        &gw,
        "firstgate_backend_metrics_age_seconds",
        &sims[0],
        |v| v > 1.0,
    )
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        backend_gauge(&m, "firstgate_backend_waiting", &sims[0]),
        Some(3.0),
        "the last figures stay"
    );
    assert!(gw.log().contains("cannot read the metrics of backend"));

    // Reads work again: fresh figures, young again.
    sims[0]
        .faults()
        .metrics_down
        .store(false, Ordering::Relaxed);
    wait_gauge(&gw, "firstgate_backend_waiting", &sims[0], |v| v == 0.0).await;
    wait_gauge(
        &gw,
        "firstgate_backend_metrics_age_seconds",
        &sims[0],
        |v| v < 0.5,
    )
    .await;
}

#[tokio::test]
async fn a_prefix_moves_on_when_its_instance_is_above_the_load_bound() {
    let sims = sims(3).await;
    let gw = gateway(&sims, "  routing: prefix_affinity\n", "").await;
    let prompt = chat(&system_prompt(3), "question");
    let home = home_of(&gw, &sims, &prompt).await;

    // Three streams of the prefix hang on its instance: with 3 requests in flight and none
    // on the others, the bound (⌈(1 + 2) × (0 + 1)⌉ = 3 at the default slack) is reached and
    // the next request of the prefix goes on.
    sims[home]
        .faults()
        .stall_after_chunks
        .store(1, Ordering::Relaxed);
    let mut streaming = prompt.clone();
    streaming["stream"] = true.into();
    let mut held = Vec::new();
    for _ in 0..3 {
        let req = gw.post("/v1/chat/completions").json(&streaming);
        held.push(tokio::spawn(async move {
            let resp = req.send().await.expect("request");
            std::future::pending::<()>().await;
            drop(resp);
        }));
    }
    wait_for("three streams hanging on the prefix's instance", || async {
        (sims[home].stats().streams_started.load(Ordering::Relaxed) >= 3).then_some(())
    })
    .await;
    let before = served(&sims);
    // (On the stalled instance it would never be answered.)
    tokio::time::timeout(DEADLINE, send(&gw, &prompt))
        .await
        .expect("the request went to the instance over the bound");
    let d = delta(&served(&sims), &before);
    assert_eq!(d[home], 0, "{d:?}");
    for h in held {
        h.abort();
    }
}
