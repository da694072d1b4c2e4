//! The Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) for coding
//! agents: passed through to vLLM's under every base with the same routing as chat, events
//! unchanged as they arrive, usage from Anthropic's shapes, both credential headers, and
//! errors in Anthropic's envelope.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use serde_json::{json, Value};

fn config(backend: std::net::SocketAddr) -> String {
    format!(
        "clusters:\n  sophia:\n    frameworks:\n      vllm:\n        \
         endpoints: [chat/completions, messages, messages/count_tokens]\n        models:\n          \
         - name: {LLAMA}\n            backends: [{backend}]\n"
    )
}

/// The `event:` names of an SSE body.
fn kinds(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_pass_through_under_every_base_with_usage_recorded() {
    let vllm = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&config(vllm.addr())).await;
    let body = json!({"model": LLAMA, "max_tokens": 6,
                      "messages": [{"role": "user", "content": "Tell me about Aurora."}]});
    for base in [
        "/v1",
        "/resource_server/v1",
        "/resource_server/sophia/vllm/v1",
    ] {
        let r = gw
            .post(&format!("{base}/messages"))
            .bearer_auth("tok")
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "tools-2024-04-04")
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, v) = status_json(r).await;
        assert_eq!(status, 200, "{base}: {v}");
        assert_eq!(v["type"], "message");
        assert_eq!(v["stop_reason"], "max_tokens");
        assert_eq!(v["usage"]["output_tokens"], 6);
        assert_eq!(v["content"][0]["type"], "text");
    }
    // Anthropic's headers reach vLLM; the client's credential does not.
    let sent = vllm.last_request_headers().unwrap();
    assert_eq!(sent["anthropic-version"], "2023-06-01");
    assert_eq!(sent["anthropic-beta"], "tools-2024-04-04");
    assert_eq!(
        vllm.last_request_body().unwrap(),
        body.to_string().as_bytes()
    );

    // A stream: vLLM's events, unchanged and in order, ending with message_stop.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = gw
        .post("/v1/messages")
        .header("x-api-key", "tok")
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let k = kinds(&text);
    assert_eq!(k.first(), Some(&"message_start"), "{text}");
    assert_eq!(k.iter().filter(|k| **k == "content_block_delta").count(), 6);
    assert_eq!(
        &k[k.len() - 2..],
        ["message_delta", "message_stop"],
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
    let sent = vllm.last_request_headers().unwrap();
    assert!(
        sent.get("x-api-key").is_none(),
        "the user's token reached the backend"
    );
    let sent: Value = serde_json::from_slice(&vllm.last_request_body().unwrap()).unwrap();
    assert!(sent.get("stream_options").is_none(), "{sent}");

    // Counting tokens where the backend serves it.
    let r = gw
        .post("/resource_server/sophia/vllm/v1/messages/count_tokens")
        .bearer_auth("tok")
        .json(&json!({"model": LLAMA, "messages": [{"role": "user", "content": "a b c"}]}))
        .send()
        .await
        .unwrap();
    let (status, v) = status_json(r).await;
    assert_eq!((status, v["input_tokens"].as_u64()), (200, Some(3)), "{v}");

    wait_for("the messages' usage records", || async {
        (usage_rows(&gw, "endpoint = 'messages' AND status = 200") == 4).then_some(())
    })
    .await;
    assert_eq!(
        usage_rows(
            &gw,
            "endpoint = 'messages' AND completion_tokens = 6 AND prompt_tokens > 0 \
             AND tokens_unknown = 0 AND cancelled = 0"
        ),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_on_the_messages_routes_use_anthropics_envelope() {
    let vllm = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&config(vllm.addr())).await;
    let ask = |path: &'static str, body: Value| {
        let req = gw.post(path).bearer_auth("tok").json(&body);
        async move { status_json(req.send().await.unwrap()).await }
    };
    let anthropic = |v: &Value| (v["type"].clone(), v["error"]["type"].clone());

    // `max_tokens` is required, as FIRST checks it.
    let (status, v) = ask(
        "/v1/messages",
        json!({"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        anthropic(&v),
        (json!("error"), json!("invalid_request_error"))
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{v}"
    );
    // An unknown model: 404 not_found_error.
    let (status, v) = ask(
        "/v1/messages",
        json!({"model": "no-such-model", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(anthropic(&v), (json!("error"), json!("not_found_error")));
    // A framework that does not offer messages.
    let chat_only = sim(&[LLAMA], |_| {}).await;
    let gw2 = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat_only.addr()])).await;
    let r = gw2
        .post("/v1/messages")
        .bearer_auth("tok")
        .json(&json!({"model": LLAMA, "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    let (status, v) = status_json(r).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        anthropic(&v),
        (json!("error"), json!("invalid_request_error"))
    );
    // The OpenAI routes keep OpenAI's envelope.
    let (status, v) = ask("/v1/chat/completions", json!({"model": "no-such-model"})).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v.get("type").is_none() && v["error"]["code"].is_string(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_right_after_the_end_of_a_stream_did_not_cancel_it() {
    let vllm = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&config(vllm.addr())).await;
    for _ in 0..10 {
        let mut resp = post_chat(&gw, "/v1/chat/completions", Some("tok"), LLAMA, true).await;
        let mut text = String::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("data: [DONE]") {
                break;
            }
        }
        // Gone at once, as SDKs close their connection after the end marker.
        drop(resp);
    }
    wait_for("ten stream records", || async {
        (usage_rows(&gw, "endpoint = 'chat/completions'") == 10).then_some(())
    })
    .await;
    assert_eq!(usage_rows(&gw, "cancelled = 1"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_drives_the_messages_api() {
    let vllm = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&config(vllm.addr())).await;
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("messages.json");
    let args = [
        "loadtest".to_string(),
        "--url".into(),
        gw.url("/v1"),
        "--token-env".into(),
        "LOADTEST_TOKEN".into(),
        "--model".into(),
        LLAMA.into(),
        "--api".into(),
        "messages".into(),
        "--stream".into(),
        "--concurrency".into(),
        "2".into(),
        "--duration".into(),
        "1s".into(),
        "--max-tokens".into(),
        "4".into(),
        "--json".into(),
        json_path.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_firstgate"))
            .args(args)
            .env("LOADTEST_TOKEN", "tok")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let level = &report["levels"][0];
    assert!(level["requests"].as_u64().unwrap() > 0, "{level}");
    assert_eq!(level["errors"], json!({}), "{level}");
    // Output tokens from Anthropic's usage: four per request.
    assert_eq!(
        level["completion_tokens"].as_u64(),
        level["requests"].as_u64().map(|n| n * 4),
        "{level}"
    );
    assert!(level["ttft_ms"].is_object(), "{level}");
}
