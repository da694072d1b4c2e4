//! Backends going away: requests move to a healthy instance, and a model with none left gets
//! a 503 that names it.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::Ordering;

async fn chat(gw: &Gateway) -> reqwest::Response {
    post_chat(gw, SOPHIA_CHAT, None, LLAMA, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_instances_and_survive_one_going_down() {
    let a = sim(&[LLAMA], |_| {}).await;
    let mut b = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[a.addr(), b.addr()])).await;

    for _ in 0..6 {
        assert_eq!(chat(&gw).await.status(), 200);
    }
    let (na, nb) = (
        a.stats().requests.load(Ordering::SeqCst),
        b.stats().requests.load(Ordering::SeqCst),
    );
    assert!(na > 0 && nb > 0, "both instances used: {na} / {nb}");

    // b refuses connections from now on; no request may fail, before or after the health
    // check notices.
    b.stop_listening().await;
    for _ in 0..10 {
        let resp = chat(&gw).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    assert_eq!(b.stats().requests.load(Ordering::SeqCst), nb);
    assert_eq!(a.stats().requests.load(Ordering::SeqCst), na + 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_instances_down_is_a_503_naming_model_and_cluster() {
    let mut a = sim(&[LLAMA], |_| {}).await;
    let mut b = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[a.addr(), b.addr()])).await;
    a.stop_listening().await;
    b.stop_listening().await;

    // Straight away (connects refused) and once health checks have marked both down.
    for _ in 0..2 {
        let resp = chat(&gw).await;
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().contains_key("retry-after"));
        let v: Value = resp.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(LLAMA) && msg.contains("sophia"), "{msg}");
        wait_for("both backends marked down", || async {
            let m = gw.metrics().await;
            (m.matches("firstgate_backend_healthy{").count() == 2
                && !m
                    .lines()
                    .any(|l| l.starts_with("firstgate_backend_healthy{") && l.ends_with(" 1")))
            .then_some(())
        })
        .await;
    }

    // Back up: served again once the health check sees it.
    a.resume_listening().await.unwrap();
    wait_for("a request to succeed again", || async {
        (chat(&gw).await.status() == 200).then_some(())
    })
    .await;
}
