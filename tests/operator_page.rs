//! The operator's page on the admin listener: the page itself (no outside asset, never
//! framed) and the JSON it reads, which scripts may read too. The page in a real browser is
//! checked by `scripts/admin-page.sh` (headless Chromium, run by `.ci/run`).

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use serde_json::Value;

async fn admin_json(gw: &Gateway, path: &str) -> (u16, Value) {
    status_json(reqwest::get(gw.admin_url(path)).await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_json_show_models_usage_refusals_and_versions() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "usage:\n  flush_interval: 50ms\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;

    let page = reqwest::get(gw.admin_url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("/api/state") && html.contains("/api/usage"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    for _ in 0..2 {
        assert_eq!(
            post_chat(&gw, SOPHIA_CHAT, None, LLAMA, false)
                .await
                .status(),
            200
        );
    }
    let refused = post_chat(&gw, SOPHIA_CHAT, None, "no-such-model", false).await;
    assert_eq!(refused.status(), 404);
    let request_id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();

    let (status, state) = admin_json(&gw, "/api/state").await;
    assert_eq!(status, 200);
    let model = &state["clusters"][0]["frameworks"][0]["models"][0];
    assert_eq!(state["clusters"][0]["name"], "sophia");
    assert_eq!(model["model"], LLAMA, "{state}");
    assert_eq!(model["state"], "hot", "{state}");
    assert_eq!(model["instances"][0]["healthy"], true, "{state}");
    assert_eq!(model["routing"], "least_in_flight", "{state}");
    // What the instance reports itself (vLLM's /metrics), once the monitor has read it.
    wait_for("the backend's own figures on the page", || async {
        let (_, state) = admin_json(&gw, "/api/state").await;
        let model = &state["clusters"][0]["frameworks"][0]["models"][0];
        let reported = &model["instances"][0]["backend"];
        (reported["waiting"] == 0 && reported["age_ms"].is_u64()).then_some(())
    })
    .await;
    assert!(model["cap"].as_u64().unwrap() > 0);
    assert_eq!(state["gateway"]["ready"], true);
    let recent = &state["errors"]["recent"][0];
    assert_eq!(recent["request_id"], request_id.as_str(), "{state}");
    assert_eq!(recent["status"], 404);
    assert_eq!(
        state["errors"]["by_kind"][recent["code"].as_str().unwrap()],
        1
    );
    assert_eq!(state["config"]["version"], 1);
    assert!(state["config"]["file"]
        .as_str()
        .unwrap()
        .ends_with("gateway.yaml"));

    // Usage of the window, from the store.
    let usage = wait_for("two requests in the usage summary", || async {
        let (_, u) = admin_json(&gw, "/api/usage?window=1h").await;
        (u["total"]["requests"] == 2).then_some(u)
    })
    .await;
    assert_eq!(usage["models"][0]["model"], LLAMA, "{usage}");
    assert_eq!(usage["series"].as_array().unwrap().len(), 1, "{usage}");
    assert!(usage["duration_ms"]["p50"].as_u64().is_some(), "{usage}");
    let (status, e) = admin_json(&gw, "/api/usage?window=2h").await;
    assert_eq!(status, 400);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1h, 24h or 7d"));

    // Maintenance shows on the model, and a refused reload on the configuration.
    let on = reqwest::Client::new()
        .put(gw.admin_url("/maintenance"))
        .json(&serde_json::json!({"cluster": "sophia", "message": "back soon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(on.status(), 200);
    std::fs::write(gw.config_path(), "listen: [this is not valid").unwrap();
    let reload = reqwest::Client::new()
        .post(gw.admin_url("/reload"))
        .header("x-firstgate-admin", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 409);
    let (_, state) = admin_json(&gw, "/api/state").await;
    assert_eq!(state["clusters"][0]["maintenance"], "back soon");
    assert_eq!(
        state["clusters"][0]["frameworks"][0]["models"][0]["state"],
        "maintenance"
    );
    assert!(state["config"]["last_reload"]["refused"]
        .as_str()
        .unwrap()
        .contains("gateway.yaml"));
    assert_eq!(state["config"]["version"], 1);
}
