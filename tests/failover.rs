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

/// vLLM's uvicorn closes a kept-alive connection that waits 5 s (its keep-alive timeout) for
/// the next request; the simulator does too, and never one whose answer is still streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_vllm_closes_connections_left_idle_but_not_one_mid_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keep_alive = std::time::Duration::from_millis(300);
    let sim = sim(&[LLAMA], |c| {
        c.keep_alive = keep_alive;
        c.itl = std::time::Duration::from_millis(100); // 5 tokens: longer than the keep-alive
    })
    .await;
    let mut conn = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    let body = chat_body(LLAMA, true).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    let answered = loop {
        let n = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
            .await
            .expect("the simulator answers or closes within the deadline")
            .unwrap_or(0);
        got.extend_from_slice(&buf[..n]);
        if n == 0 || got.ends_with(b"0\r\n\r\n") {
            break started.elapsed();
        }
    };
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("data: [DONE]") && text.ends_with("0\r\n\r\n"),
        "the whole stream arrives though it lasts longer than the keep-alive: {text}"
    );
    assert!(answered > keep_alive, "the stream lasted {answered:?}");
    assert_eq!(sim.connections(), 1);

    // Idle now: closed after the keep-alive, not before.
    let idle = std::time::Instant::now();
    let n = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
        .await
        .expect("an idle connection is closed within the deadline")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert!(
        idle.elapsed() >= keep_alive / 2,
        "closed after {:?}",
        idle.elapsed()
    );
    wait_for("the simulator to count the connection closed", || async {
        (sim.connections() == 0).then_some(())
    })
    .await;
}

/// A backend that closes pooled connections before the gateway lets them go (here the
/// gateway's `idle_timeout` is above the backend's keep-alive, as an operator might set it):
/// the next request is answered on a new connection, not refused with a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_not_used_again() {
    let sim = sim(&[LLAMA], |c| {
        c.keep_alive = std::time::Duration::from_millis(200)
    })
    .await;
    // No metrics scrapes: the connections left are the requests' and the health checks' (one,
    // used every 100 ms in tests, so never idle long enough to be closed).
    let gw = Gateway::start(&format!(
        "upstream:\n  idle_timeout: 60s\n  metrics_interval: 0s\n{}",
        one_model("sophia", "vllm", LLAMA, &[sim.addr()])
    ))
    .await;
    for round in 0..3 {
        let resp = chat(&gw).await;
        assert_eq!(
            resp.status(),
            200,
            "round {round}: {}",
            resp.text().await.unwrap()
        );
        wait_for(
            "the backend to close the request's idle connection",
            || async { (sim.connections() <= 1).then_some(()) },
        )
        .await;
    }
    assert_eq!(sim.stats().chat_requests.load(Ordering::SeqCst), 3);
}
