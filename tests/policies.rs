//! Operator policies: every example answers `firstgate policy test`, `check` compiles them,
//! and a running gateway follows edits to its route policy without restart or failed request,
//! refusing broken edits while the last good version keeps serving.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::vllm::VllmSim;
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::Ordering;

/// `firstgate policy test` on the demo configuration with an example policy.
fn dry_run(policy: &str, input: &[&str]) -> Value {
    let policy = format!("conf/policies/{policy}.rhai");
    let mut args = vec![
        "policy",
        "test",
        "--config",
        "conf/demo.yaml",
        "--policy",
        &policy,
    ];
    args.extend_from_slice(input);
    let (ok, stdout, stderr) = firstgate(&args);
    assert!(ok, "{policy} {input:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

const REQ: &str = "conf/policies/examples/request.json";
const OUTSIDER: &str = "conf/policies/examples/request-outsider.json";

#[test]
fn every_example_policy_answers_a_dry_run() {
    let ending = "conf/policies/examples/state-ending.json";
    let busy = "conf/policies/examples/state-busy.json";
    let cold = "conf/policies/examples/state-cold.json";

    // Least in flight, even on an instance whose job is about to end...
    let d = dry_run("prefer-hot", &["--request", REQ, "--state", ending]);
    assert_eq!(
        (d["decision"].as_str(), d["instance"].as_str()),
        (Some("direct"), Some("127.0.0.1:18001"))
    );
    // ...which this one avoids.
    let d = dry_run("avoid-ending-jobs", &["--request", REQ, "--state", ending]);
    assert_eq!(d["instance"], "127.0.0.1:18002");

    let d = dry_run("federated-order", &["--request", REQ, "--state", busy]);
    assert_eq!(
        (d["decision"].as_str(), d["cluster"].as_str()),
        (Some("direct"), Some("sophia"))
    );
    let d = dry_run("federated-order", &["--request", REQ, "--state", cold]);
    assert_eq!(d["decision"], "compute");
    let d = dry_run("prefer-hot", &["--request", REQ, "--state", cold]);
    assert_eq!(d["decision"], "compute");

    // The reserved instance is the less busy one: members get it, others do not.
    let d = dry_run("reserved-group", &["--request", REQ, "--state", busy]);
    assert_eq!(d["instance"], "127.0.0.1:18002");
    let d = dry_run("reserved-group", &["--request", OUTSIDER, "--state", busy]);
    assert_eq!(d["instance"], "127.0.0.1:18001");

    // Prefix affinity, and vLLM's own queue: the first instance reports 20 waiting.
    let queued = "conf/policies/examples/state-queued.json";
    let prefixed = "conf/policies/examples/request-prefix.json";
    let d = dry_run(
        "prefix-affinity",
        &["--request", prefixed, "--state", queued],
    );
    assert_eq!(
        (d["instance"].as_str(), d["by_prefix"].as_bool()),
        (Some("127.0.0.1:18002"), Some(true)),
        "{d}"
    );

    let a = dry_run(
        "scale-on-demand",
        &["--scale", "conf/policies/examples/scale-waiting.json"],
    );
    assert_eq!(
        a,
        serde_json::json!([{"action": "start", "cluster": "sophia", "count": 1}])
    );
    let a = dry_run(
        "scale-on-demand",
        &["--scale", "conf/policies/examples/scale-idle.json"],
    );
    assert_eq!(a.as_array().unwrap().len(), 1, "keeps min_instances: {a}");
    assert_eq!(a[0]["action"], "stop");
    // Idle an hour, under six times idle_release (30 minutes): kept.
    let a = dry_run(
        "scale-keep-warm",
        &["--scale", "conf/policies/examples/scale-idle.json"],
    );
    assert_eq!(a, serde_json::json!([]));
}

#[test]
fn policy_mistakes_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("route.rhai");
    std::fs::write(
        &policy,
        "fn route(req, candidates) {\n    direct(candidates.hot()\n}\n",
    )
    .unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        "auth: {mode: none}\npolicies:\n  route: route.rhai\nclusters:\n  c:\n    frameworks:\n      f:\n        models:\n          - name: m\n            backends: [127.0.0.1:1]\n",
    )
    .unwrap();
    let (ok, _, stderr) = firstgate(&["check", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("route.rhai line 3"), "{stderr}");

    std::fs::write(&policy, "fn routing(req, candidates) { () }\n").unwrap();
    let (ok, _, stderr) = firstgate(&["check", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("defines no `fn route(req, candidates)`"),
        "{stderr}"
    );

    // A malformed decision is an error, not a default.
    std::fs::write(
        &policy,
        "fn route(req, candidates) {\n    #{ cluster: \"c\" }\n}\n",
    )
    .unwrap();
    let request = dir.path().join("req.json");
    std::fs::write(
        &request,
        r#"{"model": "m", "endpoint": "chat/completions"}"#,
    )
    .unwrap();
    let (ok, _, stderr) = firstgate(&[
        "policy",
        "test",
        "--config",
        config.to_str().unwrap(),
        "--request",
        request.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("route() returned map, expected a decision"),
        "{stderr}"
    );
}

fn route_to(cluster: &str) -> String {
    format!(
        "// Everything to one cluster, unless the request asks for an error.\n\
         fn route(req, candidates) {{\n\
         \x20   if req.header(\"x-explode\") != \"\" {{\n\
         \x20       throw \"asked to fail\";\n\
         \x20   }}\n\
         \x20   direct(candidates.in_cluster(\"{cluster}\"))\n\
         }}\n"
    )
}

/// Writes `text` to `path` in one step (rename), as editors do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn chat(gw: &Gateway, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = gw
        .post("/v1/chat/completions")
        .json(&chat_body(LLAMA, false));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    status_json(req.send().await.unwrap()).await
}

/// A gateway whose route policy (first version: everything to `alpha`) sits in a file it
/// watches every `watch_interval`, with clusters alpha and beta on their own simulators.
async fn alpha_and_beta(
    watch_interval: &str,
) -> (
    Gateway,
    VllmSim,
    VllmSim,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let a = sim(&[LLAMA], |_| {}).await;
    let b = sim(&[LLAMA], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("route.rhai");
    std::fs::write(&policy, route_to("alpha")).unwrap();
    let cluster = |name: &str, backend: std::net::SocketAddr| {
        format!(
            "  {name}:\n    frameworks:\n      vllm:\n        models:\n\
             \x20         - name: {LLAMA}\n            backends: [{backend}]\n"
        )
    };
    let gw = Gateway::start(&format!(
        "policies:\n  route: {}\n  watch_interval: {watch_interval}\nclusters:\n{}{}",
        policy.display(),
        cluster("alpha", a.addr()),
        cluster("beta", b.addr()),
    ))
    .await;
    (gw, a, b, dir, policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_to_the_route_policy_apply_without_restart_and_broken_ones_are_refused() {
    let (gw, a, b, _dir, policy) = alpha_and_beta("100ms").await;

    for _ in 0..3 {
        assert_eq!(chat(&gw, &[]).await.0, 200);
    }
    assert_eq!(
        (
            a.stats().chat_requests.load(Ordering::SeqCst),
            b.stats().chat_requests.load(Ordering::SeqCst)
        ),
        (3, 0)
    );
    // It reads a header: run for every request, as the log says.
    assert!(
        gw.log()
            .contains("it runs for every request (it names `header`)"),
        "{}",
        gw.log()
    );

    // A script error fails that one decision with a 500 naming the file and line.
    let (s, v) = chat(&gw, &[("x-explode", "1")]).await;
    assert_eq!(s, 500);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("route.rhai line 4") && message.contains("asked to fail"),
        "{message}"
    );

    // Edit: from now on to beta. Every request succeeds while the change lands.
    replace(&policy, &route_to("beta"));
    wait_for("requests to reach beta", || async {
        assert_eq!(chat(&gw, &[]).await.0, 200);
        (b.stats().chat_requests.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;

    // A broken edit is refused; traffic stays on the last good version.
    replace(
        &policy,
        "fn route(req, candidates) {\n    direct(candidates.in_cluster(\"alpha\")\n",
    );
    wait_for("the broken edit to be refused", || async {
        let m = gw.metrics().await;
        m.contains("firstgate_policy_reloads_total{hook=\"route\",result=\"refused\"} 1")
            .then_some(())
    })
    .await;
    let before = b.stats().chat_requests.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(chat(&gw, &[]).await.0, 200);
    }
    assert_eq!(b.stats().chat_requests.load(Ordering::SeqCst), before + 3);
    assert!(gw.log().contains("route.rhai line"), "{}", gw.log());
    let m = gw.metrics().await;
    assert!(
        m.contains("firstgate_policy_errors_total{hook=\"route\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policies_at_once() {
    let (gw, _a, b, _dir, policy) = alpha_and_beta("1h").await;
    assert_eq!(chat(&gw, &[]).await.0, 200);
    replace(&policy, &route_to("beta"));
    gw.signal("HUP");
    wait_for("requests to reach beta", || async {
        assert_eq!(chat(&gw, &[]).await.0, 200);
        (b.stats().chat_requests.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert!(
        gw.log().contains("SIGHUP: reloading policies"),
        "{}",
        gw.log()
    );
}

/// The number after `name` in a metrics page (0 when absent).
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_route_decisions_follow_an_instance_going_down_and_coming_back() {
    let (gw, a, b, _dir, policy) = alpha_and_beta("100ms").await;
    // Reads nothing volatile: decided once per situation, then reused.
    replace(
        &policy,
        "fn route(req, candidates) {\n\
         \x20   let alpha = candidates.in_cluster(\"alpha\").hot();\n\
         \x20   if alpha.is_empty() { direct(candidates.hot()) } else { direct(alpha) }\n\
         }\n",
    );
    let reused = "firstgate_route_decisions_reused_total";
    wait_for("decisions to be reused", || async {
        assert_eq!(chat(&gw, &[]).await.0, 200);
        (metric(&gw.metrics().await, reused) >= 3).then_some(())
    })
    .await;
    assert!(
        gw.log()
            .contains("its decisions are reused for requests in the same situation"),
        "{}",
        gw.log()
    );
    let to_beta = b.stats().chat_requests.load(Ordering::SeqCst);

    // alpha fails its health checks: a new situation, and the script sends requests to beta.
    a.faults().unhealthy.store(true, Ordering::SeqCst);
    wait_for("requests to move to beta", || async {
        assert_eq!(chat(&gw, &[]).await.0, 200);
        (b.stats().chat_requests.load(Ordering::SeqCst) > to_beta).then_some(())
    })
    .await;
    let on_alpha = a.stats().chat_requests.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(chat(&gw, &[]).await.0, 200);
    }
    assert_eq!(a.stats().chat_requests.load(Ordering::SeqCst), on_alpha);

    // Healthy again: back to alpha, and that situation's decision is reused once more.
    a.faults().unhealthy.store(false, Ordering::SeqCst);
    wait_for("requests to return to alpha", || async {
        assert_eq!(chat(&gw, &[]).await.0, 200);
        (a.stats().chat_requests.load(Ordering::SeqCst) > on_alpha).then_some(())
    })
    .await;
    let before = metric(&gw.metrics().await, reused);
    for _ in 0..3 {
        assert_eq!(chat(&gw, &[]).await.0, 200);
    }
    assert!(metric(&gw.metrics().await, reused) >= before + 3);
}
