//! `firstgate policy replay` on traffic the gateway recorded: a model that starts cold behind
//! the Globus Compute stand-in, the demo's route and scale policies, three bursts of requests
//! with the instance released in between. Replaying the live policies must answer the requests
//! as recorded; a scale policy with a longer keep-alive must show fewer cold starts and more
//! node-hours, in the table, the JSON and the SVG.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::compute_ids::*;
use common::*;
use firstgate::sim::globus::GlobusSim;
use serde_json::Value;
use std::time::Instant;

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct";
const BURSTS: usize = 3;

/// The demo's cold model and policies, with the clock turned up: the scale policy every
/// 200 ms, an instance released after a second idle.
async fn gateway(globus: &GlobusSim) -> Gateway {
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/policies");
    let body = format!(
        "policies:\n  route: {policies}/prefer-hot.rhai\n  scale: {policies}/scale-on-demand.rhai\n  \
         scale_interval: 200ms\n\
         compute:\n  url: {url}\n  auth_url: {url}\n  client_id: svc\n  \
         client_secret_env: FG_TEST_COMPUTE_SECRET\n  wait: 60s\n  poll_interval: 100ms\n  \
         keepalive: 100ms\n\
         clusters:\n  sophia:\n    compute:\n      endpoint: {EP}\n      status_function: {F_STATUS}\n\
         \x20     start_function: {F_START}\n      stop_function: {F_STOP}\n      \
         status_interval: 100ms\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: {MODEL}\n            backends: []\n\
         \x20           compute: {{endpoint: {EP}, function: {F_INFER}}}\n\
         \x20           scaling: {{max_instances: 1, keep_hot: 24h, idle_release: 1s}}\n",
        url = globus.url(),
    );
    Gateway::start_with(
        "auth:\n  mode: none\n",
        &body,
        &[("FG_TEST_COMPUTE_SECRET", "svc-secret")],
    )
    .await
}

/// Sends a streamed chat request and reads it to the end; the route it took.
async fn ask(gw: &Gateway) -> String {
    let r = post_chat(gw, "/v1/chat/completions", None, MODEL, true).await;
    assert_eq!(r.status().as_u16(), 200);
    let route = r.headers()["x-firstgate-route"]
        .to_str()
        .unwrap()
        .to_string();
    let events = sse_events(r).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    route
}

async fn model_state(gw: &Gateway) -> String {
    let v: Value = reqwest::get(gw.url("/resource_server/list-endpoints"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["clusters"]["sophia"]["frameworks"]["vllm"]["model_states"][MODEL]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `firstgate policy replay --config <gw's> --since 1h` with `args`; its standard output.
fn replay(gw: &Gateway, args: &[&str]) -> String {
    let config = gw.config_path();
    let mut all = vec![
        "policy",
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--since",
        "1h",
    ];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = firstgate(&all);
    assert!(ok, "firstgate policy replay {args:?}: {stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_recorded_traffic_agrees_with_it_and_shows_what_a_longer_keep_alive_costs() {
    let globus = lifecycle_facility(300, 300, |_| {}).await;
    let gw = gateway(&globus).await;

    // Three bursts: the first request finds the model cold (through Compute) and wakes the scale
    // policy; requests go on through Compute until the instance is up, then five go to it
    // directly; then nothing until the instance is released for being idle.
    let mut sent = 0;
    for burst in 0..BURSTS {
        assert_eq!(ask(&gw).await, "compute", "burst {burst} starts cold");
        sent += 1;
        let deadline = Instant::now() + DEADLINE;
        while ask(&gw).await != "direct" {
            assert!(Instant::now() < deadline, "burst {burst}: no instance");
            sent += 1;
        }
        sent += 1;
        for _ in 0..5 {
            assert_eq!(ask(&gw).await, "direct");
            sent += 1;
        }
        if burst + 1 < BURSTS {
            wait_for("the idle instance to be released", || async {
                (model_state(&gw).await == "cold").then_some(())
            })
            .await;
            // One stop task per release, not one per scale run while the job ends.
            let stops = &globus.compute().stats.snapshot()["tasks"]["stop"];
            assert_eq!(stops, burst + 1, "stop tasks");
        }
    }
    let starts = globus.compute().stats.snapshot()["tasks"]["start"]
        .as_u64()
        .unwrap();
    assert_eq!(starts, BURSTS as u64, "one instance started per burst");
    wait_for("every request's usage record", || async {
        (usage_rows(&gw, "1 = 1") == sent as i64).then_some(())
    })
    .await;

    // The live policies replayed: the recorded routes, the recorded cold starts.
    let live: Value = serde_json::from_str(&replay(&gw, &["--json"])).unwrap();
    assert_eq!(live["requests"], sent, "{live:#}");
    assert_eq!(live["policies"].as_array().unwrap().len(), 1);
    let model = &live["policies"][0]["models"][0];
    assert_eq!(model["model"], MODEL);
    assert_eq!(model["requests"], sent);
    let differ = model["differ"].as_u64().unwrap();
    assert!(
        differ * 10 <= sent as u64,
        "at least 90% answered as recorded, {differ} of {sent} differ: {live:#}"
    );
    assert_eq!(model["cold_starts"], starts, "{live:#}");
    assert!(model["node_hours"].as_f64().unwrap() > 0.0);
    // The start delay was fitted from the three recorded cold starts.
    let facts = &live["models"][0];
    assert!(
        facts["start_delay_source"]
            .as_str()
            .unwrap()
            .contains("fitted to 3 recorded cold starts"),
        "{facts:#}"
    );
    assert!(facts["queue_wait_s"].as_f64().unwrap() >= 0.6, "{facts:#}");

    // A candidate that keeps idle instances an hour (conf/policies/scale-keep-warm.rhai keeps
    // them six times idle_release): one cold start, the later bursts served hot from their
    // first request, for more node-hours.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/policies/scale-keep-warm.rhai"
    ))
    .unwrap();
    assert!(example.contains("model.idle_release * 6"));
    let keep_warm = gw.config_path().with_file_name("keep-warm.rhai");
    std::fs::write(
        &keep_warm,
        example.replace("model.idle_release * 6", "3600"),
    )
    .unwrap();
    let keep_warm = keep_warm.to_str().unwrap();
    let svg_path = gw.config_path().with_file_name("replay.svg");
    let both: Value = serde_json::from_str(&replay(
        &gw,
        &[
            "--scale",
            keep_warm,
            "--json",
            "--plot",
            svg_path.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let (live, candidate) = (
        &both["policies"][0]["models"][0],
        &both["policies"][1]["models"][0],
    );
    assert_eq!(both["policies"][1]["name"], "candidate");
    assert_eq!(both["policies"][1]["scale"], keep_warm);
    assert_eq!(candidate["cold_starts"], 1, "{both:#}");
    assert!(
        candidate["compute"].as_u64() < live["compute"].as_u64(),
        "fewer requests through Compute: {both:#}"
    );
    assert!(
        candidate["node_hours"].as_f64() > live["node_hours"].as_f64(),
        "more node-hours: {both:#}"
    );
    assert!(candidate["idle_node_hours"].as_f64() > live["idle_node_hours"].as_f64());

    // The SVG: instances over time under each policy against demand.
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
    assert!(svg.contains("instances, live") && svg.contains("instances, candidate"));
    assert!(svg.contains(MODEL));

    // The Markdown table: one row per policy, with its cold starts, and the agreement.
    let table = replay(&gw, &["--scale", keep_warm]);
    let row = |policy: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {MODEL} | {policy} |")))
            .unwrap_or_else(|| panic!("no {policy} row: {table}"))
            .split('|')
            .map(str::trim)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // | model | policy | requests | hot | via Compute | refused | cold starts | ...
    assert_eq!(row("live")[7], starts.to_string(), "{table}");
    assert_eq!(row("candidate")[7], "1", "{table}");
    assert!(table.contains("Agreement of the live policies"), "{table}");
}

#[test]
fn a_replay_of_a_period_with_no_store_or_bad_arguments_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, "auth:\n  mode: none\n").unwrap();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["policy", "replay", "--config", config];
        all.extend_from_slice(args);
        firstgate(&all)
    };
    let (ok, _, err) = run(&["--speed", "0"]);
    assert!(!ok && err.contains("--speed"), "{err}");
    let (ok, _, err) = run(&[
        "--from",
        "2026-12-02T00:00:00Z",
        "--to",
        "2026-12-01T00:00:00Z",
    ]);
    assert!(!ok && err.contains("--from must come before --to"), "{err}");
    let (ok, _, err) = run(&["--from", "yesterday", "--to", "1796591607"]);
    assert!(!ok && err.contains("--from \"yesterday\""), "{err}");
    let (ok, _, err) = run(&["--scale", "/nonexistent/scale.rhai"]);
    assert!(!ok && err.contains("/nonexistent/scale.rhai"), "{err}");
}
