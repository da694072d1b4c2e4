//! Logs and traces that pipelines can read: plain or JSON application logs without terminal
//! colours in files, the access log as pure JSON lines that survive rotation, W3C trace context
//! to the backends and back, and spans exported over OTLP/HTTP.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The lines of a file that parse as JSON objects, failing on any other line.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            assert!(v.is_object(), "{l}");
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_files_are_plain_and_json_when_asked() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let model = one_model("sophia", "vllm", LLAMA, &[chat.addr()]);
    // Text: no terminal escapes when standard error is a file.
    let gw = Gateway::start(&format!("access_log:\n  path: stderr\n{model}")).await;
    assert_eq!(
        post_chat(&gw, SOPHIA_CHAT, None, LLAMA, false)
            .await
            .status(),
        200
    );
    wait_for("the access line", || async {
        gw.log().contains("\"request_id\"").then_some(())
    })
    .await;
    assert!(!gw.log().contains('\u{1b}'), "{}", gw.log());
    // JSON: every line of standard error is an object (application log and access log).
    let gw = Gateway::start(&format!(
        "log:\n  format: json\naccess_log:\n  path: stderr\n{model}"
    ))
    .await;
    assert_eq!(
        post_chat(&gw, SOPHIA_CHAT, None, LLAMA, false)
            .await
            .status(),
        200
    );
    wait_for("the access line", || async {
        gw.log().contains("\"request_id\"").then_some(())
    })
    .await;
    let lines = json_lines(&gw.log());
    assert!(lines
        .iter()
        .any(|l| l["level"] == "INFO" && l["message"].is_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_survives_rotation_without_losing_a_line() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "access_log:\n  path: {}\nlimits:\n  ip_requests_per_second: 0\n{}",
        path.display(),
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let mut ids = HashSet::new();
    let send = |n: usize| {
        let gw = &gw;
        async move {
            let mut got = Vec::new();
            for _ in 0..n {
                let r = post_chat(gw, SOPHIA_CHAT, None, LLAMA, false).await;
                assert_eq!(r.status(), 200);
                got.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
            }
            got
        }
    };
    ids.extend(send(20).await);
    // logrotate: move the file, then tell the gateway.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    ids.extend(send(10).await);
    gw.signal("HUP");
    wait_for("a new file at the path", || async {
        path.exists().then_some(())
    })
    .await;
    ids.extend(send(20).await);
    let logged = wait_for("every line in one of the two files", || async {
        let text = format!(
            "{}{}",
            std::fs::read_to_string(&rotated).unwrap_or_default(),
            std::fs::read_to_string(&path).unwrap_or_default()
        );
        let lines = json_lines(&text);
        (lines.len() == ids.len()).then_some(lines)
    })
    .await;
    let logged: HashSet<String> = logged
        .iter()
        .map(|l| l["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(logged, ids);
    assert!(std::fs::read_to_string(&path).unwrap().lines().count() >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_reaches_the_backend_the_client_and_the_access_log() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "access_log:\n  path: {}\n{}",
        path.display(),
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = gw
        .post(SOPHIA_CHAT)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("tracestate", "vendor=1")
        .json(&chat_body(LLAMA, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let returned = resp.headers()["traceparent"].to_str().unwrap().to_string();
    let headers = chat.last_request_headers().unwrap();
    let forwarded = headers["traceparent"].to_str().unwrap();
    assert!(
        forwarded.starts_with(&format!("00-{trace}-")),
        "{forwarded}"
    );
    assert!(
        !forwarded.contains("00f067aa0ba902b7"),
        "the gateway is the backend's parent"
    );
    assert_eq!(forwarded, returned);
    assert_eq!(headers["tracestate"], "vendor=1");
    let line = wait_for("the access line", || async {
        let text = std::fs::read_to_string(&path).ok()?;
        json_lines(&text).into_iter().next()
    })
    .await;
    assert_eq!(line["trace_id"], trace);
    // Without a traceparent the gateway starts a trace.
    let resp = post_chat(&gw, SOPHIA_CHAT, None, LLAMA, false).await;
    let started = resp.headers()["traceparent"].to_str().unwrap();
    assert_eq!(started.len(), 55);
    assert_eq!(chat.last_request_headers().unwrap()["traceparent"], started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_to_an_otlp_collector() {
    // A collector on loopback: OTLP/HTTP with JSON bodies.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post({
            let received = received.clone();
            move |body: axum::body::Bytes| async move {
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    received.lock().unwrap().push(v);
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start_with(
        "auth:\n  mode: none\n",
        &format!(
            "tracing:\n  otlp_endpoint: http://{collector}\n{}",
            one_model("sophia", "vllm", LLAMA, &[chat.addr()])
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "200")],
    )
    .await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let resp = gw
        .post(SOPHIA_CHAT)
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .json(&chat_body(LLAMA, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let forwarded = chat.last_request_headers().unwrap()["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let spans = wait_for("the request's spans at the collector", || {
        let received = received.clone();
        async move {
            let spans: Vec<Value> = received
                .lock()
                .unwrap()
                .iter()
                .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
                .flat_map(|r| r["scopeSpans"].as_array().cloned().unwrap_or_default())
                .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
                .filter(|s| s["traceId"] == trace)
                .collect();
            let names: HashSet<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
            let all = [
                "request",
                "authenticate",
                "route",
                "upstream_connect",
                "upstream_first_byte",
            ];
            all.iter().all(|n| names.contains(n)).then_some(spans)
        }
    })
    .await;
    let request = spans.iter().find(|s| s["name"] == "request").unwrap();
    // The client's span is the request span's parent; the backend's parent is the request span.
    assert_eq!(request["parentSpanId"], "b7ad6b7169203331");
    let own = request["spanId"].as_str().unwrap();
    assert!(forwarded.contains(own), "{forwarded} names {own}");
    for child in spans.iter().filter(|s| s["name"] != "request") {
        assert_eq!(child["parentSpanId"], own, "{child}");
    }
}
