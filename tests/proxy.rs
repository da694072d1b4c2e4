//! What a client of the gateway sees: both URL layouts, streaming, listings, and the errors
//! for every kind of bad request.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

const EMBED: &str = "Salesforce/SFR-Embedding-Mistral";

/// A gateway in front of one chat simulator (cluster sophia, framework vllm) and one
/// embedding simulator, with a 1 MiB body limit.
async fn setup() -> (
    Gateway,
    firstgate::sim::vllm::VllmSim,
    firstgate::sim::vllm::VllmSim,
) {
    let chat = sim(&[LLAMA], |_| {}).await;
    let embed = sim(&[], |c| c.embedding_models = vec![EMBED.to_string()]).await;
    let gw = Gateway::start(&format!(
        "limits:\n  max_body_bytes: 1048576\n\
         clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: {LLAMA}\n            aliases: [llama-8b]\n            backends: [{}]\n\
         \x20         - name: {EMBED}\n            backends: [{}]\n",
        chat.addr(),
        embed.addr()
    ))
    .await;
    (gw, chat, embed)
}

async fn post(gw: &Gateway, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    gw.post(path)
        .header("authorization", "Bearer user-token")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request")
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.expect("JSON error body");
    assert!(v["error"]["message"].is_string(), "envelope: {v}");
    assert!(v["error"]["type"].is_string(), "envelope: {v}");
    (status, v["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_through_both_url_layouts() {
    let (gw, chat, _) = setup().await;
    for path in [
        "/resource_server/sophia/vllm/v1/chat/completions",
        "/v1/chat/completions",
    ] {
        let resp = post(&gw, path, chat_body(LLAMA, false).to_string()).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["x-firstgate-route"], "direct");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert!(v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("tok0"));
    }
    assert_eq!(chat.stats().chat_requests.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_arrives_as_sse_through_both_layouts() {
    let (gw, _chat, _embed) = setup().await;
    for path in [
        "/resource_server/sophia/vllm/v1/chat/completions",
        "/v1/chat/completions",
    ] {
        let resp = post(&gw, path, chat_body(LLAMA, true).to_string()).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let events = sse_events(resp).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let text: String = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_chunk_by_chunk() {
    let chat = sim(&[LLAMA], |c| {
        c.itl = std::time::Duration::from_millis(50);
    })
    .await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat.addr()])).await;
    let mut body = chat_body(LLAMA, true);
    body["max_tokens"] = json!(40);
    let resp = post(&gw, "/v1/chat/completions", body.to_string()).await;
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("tok0") {
        let chunk = stream.next().await.expect("more data").expect("chunk");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // The first token reached the client while the simulator was still generating the rest
    // (40 tokens 50 ms apart): nothing was buffered until the end.
    assert_eq!(chat.stats().streams_completed.load(Ordering::SeqCst), 0);
    assert!(!seen.contains("[DONE]"));
    while let Some(chunk) = stream.next().await {
        seen.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(seen.contains("tok39") && seen.ends_with("data: [DONE]\n\n"));
    assert_eq!(chat.stats().streams_completed.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_embeddings() {
    let (gw, _chat, embed) = setup().await;
    let resp = post(
        &gw,
        "/resource_server/sophia/vllm/v1/completions",
        json!({"model": LLAMA, "prompt": "once upon", "max_tokens": 3}).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 tok2 ");

    let resp = post(
        &gw,
        "/v1/embeddings",
        json!({"model": EMBED, "input": ["a b", "c"]}).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(embed.stats().embedding_requests.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_have_the_expected_shapes() {
    let (gw, _chat, _embed) = setup().await;
    let v: Value = reqwest::get(gw.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [EMBED, LLAMA]);
    assert_eq!(v["data"][0]["object"], "model");

    let v: Value = reqwest::get(gw.url("/resource_server/list-endpoints"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sophia = &v["clusters"]["sophia"];
    assert_eq!(sophia["base_url"], "/resource_server/sophia");
    assert_eq!(
        sophia["frameworks"]["vllm"]["models"],
        json!([EMBED, LLAMA])
    );
    assert_eq!(
        sophia["frameworks"]["vllm"]["endpoints"],
        json!(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
    );

    let v: Value = reqwest::get(gw.url("/resource_server/sophia/models?model_id=llama-8b"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v[0]["id"], LLAMA);
    assert_eq!(v[0]["framework"], "vllm");
    let resp = reqwest::get(gw.url("/resource_server/nowhere/models"))
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 404);
}

/// FIRST's documented `/resource_server/v1/...` path, model retrieval, and the model list under
/// a FIRST-layout base URL (what SDKs and chat front-ends call first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_first_path_and_model_retrieval() {
    let (gw, chat, _) = setup().await;
    let resp = post(
        &gw,
        "/resource_server/v1/chat/completions",
        chat_body(LLAMA, false).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(chat.stats().chat_requests.load(Ordering::Relaxed), 1);

    let get = |path: &'static str| {
        let url = gw.url(path);
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = get("/resource_server/v1/models").await;
    assert_eq!((status, v["object"].as_str()), (200, Some("list")));
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    // By id, with the `/` of `org/model` as is or encoded, and by alias (canonical id back).
    for path in [
        "/v1/models/meta-llama/Meta-Llama-3.1-8B-Instruct",
        "/v1/models/meta-llama%2FMeta-Llama-3.1-8B-Instruct",
        "/resource_server/sophia/vllm/v1/models/llama-8b",
    ] {
        let (status, v) = get(path).await;
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(v["id"], LLAMA, "{path}");
        assert_eq!(v["object"], "model");
    }
    let (status, v) = get("/v1/models/gpt-7").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("endpoint_not_found")),
        "{v}"
    );

    let (status, v) = get("/resource_server/sophia/vllm/v1/models").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [EMBED, LLAMA]);
    let (status, v) = get("/resource_server/nowhere/vllm/v1/models").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("cluster_not_found"))
    );
    let (status, v) = get("/resource_server/sophia/sglang/v1/models").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("framework_not_found"))
    );
}

/// A web page of another origin calls the API: the browser's preflight is answered, and the
/// answer carries the CORS headers with the request id readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_preflight_and_cors_headers() {
    let (gw, _chat, _embed) = setup().await;
    let client = reqwest::Client::new();
    let path = "/resource_server/sophia/vllm/v1/chat/completions";
    let resp = client
        .request(reqwest::Method::OPTIONS, gw.url(path))
        .header("origin", "https://chat.example.org")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["access-control-allow-methods"], "POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );

    let resp = client
        .post(gw.url(path))
        .header("origin", "https://chat.example.org")
        .header("content-type", "application/json")
        .body(chat_body(LLAMA, false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("x-request-id"));
    // An error the gateway answers itself carries them too.
    let resp = client
        .get(gw.url("/v1/models/gpt-7"))
        .header("origin", "https://chat.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    // Not a path: still 404.
    let resp = client
        .request(reqwest::Method::OPTIONS, gw.url("/nope"))
        .header("origin", "https://chat.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_openai_errors() {
    let (gw, chat, _) = setup().await;
    let chat_path = "/resource_server/sophia/vllm/v1/chat/completions";

    let (s, e) = error_of(post(&gw, chat_path, "{not json").await).await;
    assert_eq!(
        (s, e["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    assert!(e["message"].as_str().unwrap().contains("not valid JSON"));

    let (s, e) = error_of(post(&gw, chat_path, r#"{"messages":[]}"#).await).await;
    assert_eq!((s, e["param"].as_str()), (400, Some("model")));

    let mut body = chat_body(LLAMA, false);
    body["api_port"] = json!(8000);
    let (s, e) = error_of(post(&gw, chat_path, body.to_string()).await).await;
    assert_eq!(s, 422);
    assert!(e["message"].as_str().unwrap().contains("api_port"));

    let (s, e) = error_of(post(&gw, chat_path, chat_body("gpt-7", false).to_string()).await).await;
    assert_eq!((s, e["code"].as_str()), (404, Some("endpoint_not_found")));
    assert!(e["message"].as_str().unwrap().contains("gpt-7"));
    let (s, _) = error_of(
        post(
            &gw,
            "/v1/chat/completions",
            chat_body("gpt-7", false).to_string(),
        )
        .await,
    )
    .await;
    assert_eq!(s, 404);

    let (s, e) = error_of(
        post(
            &gw,
            "/resource_server/nowhere/vllm/v1/chat/completions",
            chat_body(LLAMA, false).to_string(),
        )
        .await,
    )
    .await;
    assert_eq!((s, e["code"].as_str()), (404, Some("cluster_not_found")));

    // Parts of the OpenAI API the gateway lacks say so, and what to do, under either base URL.
    for path in ["/v1/files", "/resource_server/sophia/vllm/v1/batches"] {
        let (s, e) = error_of(gw.get(path).bearer_auth("tok").send().await.unwrap()).await;
        let message = e["message"].as_str().unwrap();
        assert_eq!(s, 404, "{path}");
        assert!(
            message.contains("not offered") && message.contains("one by one"),
            "{path}: {message}"
        );
    }

    // FIRST's batch route on a gateway without `batch:`: FIRST's own refusal, in FIRST's
    // envelope `{"error": {"code", "message", "info"}}`.
    let (s, v) = status_json(
        post(
            &gw,
            "/resource_server/sophia/vllm/v1/batches",
            json!({"model": LLAMA, "input_file": "/x.jsonl"}).to_string(),
        )
        .await,
    )
    .await;
    assert_eq!(
        (
            s,
            v["error"]["code"].as_str(),
            v["error"]["info"].is_object()
        ),
        (400, Some("batch_unavailable"), true),
        "{v}"
    );

    let mut big = chat_body(LLAMA, false);
    big["padding"] = json!("x".repeat(2 * 1024 * 1024));
    let (s, e) = error_of(post(&gw, chat_path, big.to_string()).await).await;
    assert_eq!(s, 413);
    assert!(e["message"].as_str().unwrap().contains("1048576"));

    let resp = gw.get(chat_path).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "POST");
    assert_eq!(error_of(resp).await.0, 405);

    let (s, _) = error_of(post(&gw, "/v1/chat/complete", "{}").await).await;
    assert_eq!(s, 404);

    // None of these reached the backend.
    assert_eq!(chat.stats().requests.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_forwarded_byte_exact_and_aliases_rewritten() {
    let (gw, chat, _) = setup().await;
    // > 64 KiB, odd spacing and key order that a re-serializer would change.
    let padding = "ü ".repeat(60_000);
    let body = format!(
        "{{\"messages\": [{{\"role\":\"user\",\"content\":\"{padding}\"}}],   \"model\":\"{LLAMA}\",\"temperature\":1.50}}"
    );
    assert!(body.len() > 64 * 1024);
    let resp = post(
        &gw,
        "/resource_server/sophia/vllm/v1/chat/completions",
        body.clone(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(chat.last_request_body().unwrap(), body.as_bytes());

    // An alias is rewritten to the backend's name and nothing else changes.
    let aliased = body.replace(LLAMA, "LLAMA-8B");
    let resp = post(&gw, "/v1/chat/completions", aliased).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(chat.last_request_body().unwrap(), body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_token_never_reaches_the_backend() {
    let api = sim(&["gpt-oss-120b"], |c| {
        c.api_key = Some("backend-secret".into())
    })
    .await;
    let gw_yaml = format!(
        "clusters:\n  metis:\n    frameworks:\n      api:\n        models:\n\
         \x20         - name: gpt-oss-120b\n            backends: [\"http://{}/v1\"]\n            api_key_env: FG_TEST_METIS_KEY\n",
        api.addr()
    );
    std::env::set_var("FG_TEST_METIS_KEY", "backend-secret");
    let gw = Gateway::start(&gw_yaml).await;
    let resp = post(
        &gw,
        "/resource_server/metis/api/v1/chat/completions",
        chat_body("gpt-oss-120b", false).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let headers = api.last_request_headers().unwrap();
    assert_eq!(headers["authorization"], "Bearer backend-secret");
    assert!(!format!("{headers:?}").contains("user-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_keep_their_status_and_body() {
    let (gw, chat, _) = setup().await;
    let mut body = chat_body(LLAMA, false);
    body["max_tokens"] = json!(-1);
    let resp = post(&gw, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["error"]["type"], "BadRequestError",
        "vLLM's own body: {v}"
    );

    chat.faults().fail_status.store(500, Ordering::SeqCst);
    let resp = post(
        &gw,
        "/v1/chat/completions",
        chat_body(LLAMA, false).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "simulated failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_the_backend_stream() {
    let chat = sim(&[LLAMA], |c| c.itl = std::time::Duration::from_millis(50)).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat.addr()])).await;
    let mut body = chat_body(LLAMA, true);
    body["max_tokens"] = json!(200);
    let resp = post(&gw, "/v1/chat/completions", body.to_string()).await;
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(stream);
    wait_for("the simulator to see the cancellation", || {
        let n = chat.stats().streams_cancelled.load(Ordering::SeqCst);
        async move { (n == 1).then_some(()) }
    })
    .await;
    assert_eq!(chat.stats().streams_completed.load(Ordering::SeqCst), 0);
    // Cancellations are normal, not logged as errors.
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_cluster_model_and_status() {
    let (gw, _chat, _embed) = setup().await;
    post(
        &gw,
        "/v1/chat/completions",
        chat_body(LLAMA, false).to_string(),
    )
    .await;
    let line = format!(
        "firstgate_requests_total{{cluster=\"sophia\",model=\"{LLAMA}\",status=\"200\"}} 1"
    );
    // Counted in the logging phase, which may finish just after the client has its answer.
    let text = wait_for("the request and backend health in the metrics", || async {
        let t = gw.metrics().await;
        (t.contains(&line) && t.contains("firstgate_backend_healthy{")).then_some(t)
    })
    .await;
    assert!(text.contains("firstgate_gateway_overhead_seconds_bucket"));
    assert!(text.contains("firstgate_time_to_first_byte_seconds_count"));
}
